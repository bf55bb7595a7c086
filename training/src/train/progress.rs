//! What a run shows while it trains: a progress bar on a terminal, plain lines otherwise.
//!
//! [`Progress`] wraps an `indicatif` bar whose message carries the smoothed loss, learning rate and speed.
//! When the bar is hidden (output is not a terminal, as in CI or a log file), log lines go to stdout and a
//! status line is printed every 25 steps and at the last planned step instead.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

/// The bar, or plain lines where it is hidden.
pub(super) struct Progress {
    bar: ProgressBar,
}

/// Where a run stands after a step.
pub(super) struct StepStatus {
    pub step: usize,
    pub planned: usize,
    /// Smoothed training loss.
    pub loss: f64,
    /// The loss of the step's batch.
    pub batch_loss: f64,
    pub lr: f64,
    pub tokens_seen: usize,
    pub elapsed: Duration,
}

impl Progress {
    /// A bar of `planned` steps.
    pub(super) fn new(planned: usize) -> Self {
        let bar = ProgressBar::new(planned as u64);
        bar.set_style(
            ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        Progress { bar }
    }

    /// Prints `line` above the bar, or to stdout when the bar is hidden.
    pub(super) fn log(&self, line: String) {
        if self.bar.is_hidden() {
            println!("{line}");
        } else {
            self.bar.println(line);
        }
    }

    /// The plan changed to `planned` steps.
    pub(super) fn set_planned(&self, planned: usize) {
        self.bar.set_length(planned as u64);
    }

    /// Shows the run after a step.
    pub(super) fn step(&self, s: StepStatus) {
        let StepStatus {
            step,
            planned,
            loss: smoothed,
            batch_loss: value,
            lr,
            tokens_seen,
            elapsed,
        } = s;
        let tps = tokens_seen as f64 / elapsed.as_secs_f64().max(1e-9);
        self.bar.set_position(step as u64);
        self.bar
            .set_message(format!("loss {smoothed:.4} lr {lr:.2e} {tps:.0} tok/s"));
        if self.bar.is_hidden() && (step % 25 == 0 || step == planned) {
            println!(
                "step {step}/{planned} loss {smoothed:.4} (batch {value:.4}) lr {lr:.2e} {tps:.0} tok/s {:.1} min",
                elapsed.as_secs_f64() / 60.0
            );
        }
    }

    pub(super) fn finish(&self) {
        self.bar.finish();
    }
}
