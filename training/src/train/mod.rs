//! Supervised fine-tuning data and the training loop for both objectives.
//!
//! A training dialog is one packed example: per assistant turn, the tokens since the previous reply (the
//! system prompt or the `\n` after `<|im_end|>`, the user turn, `<|im_start|>assistant\n`; byte-identical
//! to what llama.cpp's ChatML template renders) and the reply (content tokens and `<|im_end|>`). Every reply
//! trains in the one sequence; one example per reply would repeat the history each time, which made up most
//! of the tokens of a multi-turn dialog.
//!
//! - **Diffusion** (LLaDA SFT): each reply is padded with `<|endoftext|>` to a length drawn up to
//!   [`TrainConfig::reply_len`], draws a stratified `t ~ U(eps, 1]`, and every reply position (padding
//!   included) is replaced by `<|mdm_mask|>` with probability `t`. The loss is the cross-entropy at masked
//!   positions weighted by `1/t`, summed, divided by the reply length and averaged over the batch's replies.
//!   Prompt tokens are never masked and carry no loss. Attention groups ([`diffusion_batch`]) keep each
//!   reply to the conversation before it, at the positions it has at inference.
//! - **Autoregressive** twin: the dialog as one causal sequence, next-token cross-entropy on every reply up to
//!   and including `<|im_end|>`, averaged over those tokens.
//!
//! Batches are right-padded with `<|endoftext|>`; padded keys are masked out of attention and padded
//! positions out of the loss. Data order, masking and initialisation all derive from one seed.
//!
//! This module is the loop, [`train`]: each step draws a batch, sets the scheduled learning rate, takes
//! the loss and an optimiser step, checks the time budget, shows progress and saves a checkpoint every
//! `save_every` steps. The parts live in submodules, their public items re-exported here:
//! - `config`: [`TrainConfig`] and the named [`Preset`]s.
//! - `example`: dialogs packed into [`Example`]s, and the [`SpecialIds`] they use.
//! - `batch`: data order, padding, masking and the attention layout of a batch.
//! - `loss`: [`LossBatch`] and the weighted negative log-likelihood, [`loss()`].
//! - `optim`: the [`learning_rate`] schedule and AdamW with gradient clipping.
//! - `budget`: how many steps fit in `max_minutes`.
//! - `checkpoint`: the checkpoint directory, [`TrainState`] and [`init_weights`].
//! - `progress`: the progress bar and log lines.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::Device;
use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::model::{init_params, Objective, Transformer};

mod batch;
mod budget;
mod checkpoint;
mod config;
mod example;
mod loss;
mod optim;
mod progress;

pub use batch::{
    autoregressive_batch, diffusion_batch, epoch_batches, mask_reply, pad_reply, stratified_ratios, MIN_MASK_RATIO,
};
use budget::TimeBudget;
use checkpoint::save_checkpoint;
pub use checkpoint::{init_weights, TrainState, CHECKPOINT_FILE, STATE_FILE};
pub use config::{Preset, TrainConfig};
pub use example::{build_examples, Example, ReplyTurn, SpecialIds};
pub use loss::{loss, LossBatch};
pub use optim::learning_rate;
use optim::Optimiser;
use progress::{Progress, StepStatus};

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct TrainReport {
    pub checkpoint: PathBuf,
    pub state: TrainState,
    pub tokens_per_second: f64,
}

/// Trains `config` on `examples` and writes `out/model.safetensors` and `out/state.json` every
/// `save_every` steps and at the end.
pub fn train(
    config: &TrainConfig,
    examples: &[Example],
    skipped: usize,
    ids: SpecialIds,
    out: &Path,
    device: &Device,
) -> anyhow::Result<TrainReport> {
    config.model.validate().map_err(anyhow::Error::msg)?;
    if examples.len() < config.batch_size {
        bail!(
            "{} examples are fewer than one batch of {}",
            examples.len(),
            config.batch_size
        );
    }
    let mut varmap = init_params(&config.model, config.seed, device)?;
    if let Some(init) = &config.init_from {
        init_weights(&mut varmap, init, device).with_context(|| format!("initialising from {}", init.display()))?;
    }
    let model = Transformer::from_varmap(&config.model, &varmap)?;
    let causal = config.objective.causal();

    let mut optimiser = Optimiser::new(&varmap, config)?;

    let mut data_rng = StdRng::seed_from_u64(config.seed ^ 0x5eed_da7a);
    let mut mask_rng = StdRng::seed_from_u64(config.seed ^ 0x0ba5_c0de);
    let lengths: Vec<usize> = examples
        .iter()
        .map(|e| e.packed_len(config.objective, config.reply_len))
        .collect();

    let mut planned = config.steps;
    let mut budget = config.max_minutes.map(|m| TimeBudget::from_minutes(m, config.steps));
    let progress = Progress::new(planned);
    progress.log(format!(
        "training {} ({} parameters) on {} dialogs, {} replies ({} left out), batch {} dialogs, up to {} steps{}",
        config.objective.name(),
        config.model.parameter_count(),
        examples.len(),
        examples.iter().map(Example::replies).sum::<usize>(),
        skipped,
        config.batch_size,
        planned,
        budget
            .as_ref()
            .map_or(String::new(), |b| format!(" or {:.1} min", b.minutes())),
    ));

    let started = Instant::now();
    let mut batches = Vec::new().into_iter();
    let mut smoothed = f64::NAN;
    let mut tokens_seen = 0usize;
    let mut step = 0;
    let earlier = match &config.init_from {
        Some(path) if path.extension().is_some_and(|e| e == "gguf") => crate::export::trained_prompt_tokens(path)?,
        Some(path) => path
            .parent()
            .and_then(|dir| TrainState::read(dir).ok())
            .and_then(|state| state.trained_prompt_tokens),
        None => None,
    };
    let trained_prompt_tokens = examples.iter().map(Example::longest_prompt).chain(earlier).max();
    let state_at = |step: usize, planned: usize, loss: f64, tokens: usize| TrainState {
        config: config.clone(),
        step,
        planned_steps: planned,
        loss,
        tokens_seen: tokens,
        elapsed_seconds: started.elapsed().as_secs_f64(),
        examples: examples.len(),
        skipped_examples: skipped,
        trained_prompt_tokens,
    };
    while step < planned {
        let next = match batches.next() {
            Some(b) => b,
            None => {
                batches = epoch_batches(&lengths, config.batch_size, &mut data_rng).into_iter();
                batches.next().context("no batches")?
            }
        };
        let chosen: Vec<&Example> = next.iter().map(|&i| &examples[i]).collect();
        let lb = match config.objective {
            Objective::Diffusion => diffusion_batch(&chosen, config.reply_len, ids, &mut mask_rng, device)?,
            Objective::Autoregressive => autoregressive_batch(&chosen, ids, device)?,
        };
        let lr = learning_rate(config, step, planned);
        optimiser.set_learning_rate(lr);
        let loss_t = loss(&model, &lb, causal)?;
        let value = loss_t.to_scalar::<f32>()? as f64;
        if !value.is_finite() {
            bail!("loss is {value} at step {step}");
        }
        optimiser.step(loss_t.backward()?)?;
        step += 1;
        tokens_seen += lb.tokens;
        smoothed = if smoothed.is_nan() {
            value
        } else {
            0.98 * smoothed + 0.02 * value
        };

        let elapsed = started.elapsed();
        if let Some(budget) = &mut budget {
            // The plan follows the recent speed so that the run fills its budget; so does the schedule.
            let check = budget.after_step(step, elapsed, planned);
            if let Some(replan) = check.replan {
                progress.set_planned(replan.planned);
                if replan.announce {
                    progress.log(format!(
                        "{:.2} s/step: planning {} steps to fit {:.1} min",
                        replan.seconds_per_step,
                        replan.planned,
                        budget.minutes()
                    ));
                }
            }
            if check.exhausted {
                progress.log(format!("time budget reached at step {step}"));
            }
            planned = check.planned;
        }
        progress.step(StepStatus {
            step,
            planned,
            loss: smoothed,
            batch_loss: value,
            lr,
            tokens_seen,
            elapsed,
        });
        if step % config.save_every == 0 && step < planned {
            save_checkpoint(out, &varmap, &state_at(step, planned, smoothed, tokens_seen))?;
        }
    }
    let state = state_at(step, planned, smoothed, tokens_seen);
    save_checkpoint(out, &varmap, &state)?;
    progress.finish();
    let tokens_per_second = tokens_seen as f64 / started.elapsed().as_secs_f64().max(1e-9);
    progress.log(format!(
        "finished {step} steps in {:.1} min: loss {smoothed:.4}, {tokens_per_second:.0} tok/s; wrote {}",
        state.elapsed_seconds / 60.0,
        out.join(CHECKPOINT_FILE).display()
    ));
    Ok(TrainReport {
        checkpoint: out.join(CHECKPOINT_FILE),
        state,
        tokens_per_second,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::corpus::{generate, test_config};
    use crate::domain::northwind;
    use crate::tokenizer::{train_on_dialogs, TokenizerConfig};

    #[test]
    fn training_is_deterministic_given_the_seed() {
        let domain = northwind();
        let corpus = generate(&domain, &test_config(6, 30)).unwrap();
        let system = &domain.assistant.system_prompt;
        let tok = train_on_dialogs(
            system,
            &corpus.train,
            &TokenizerConfig {
                vocab_size: 400,
                min_frequency: 2,
            },
        )
        .unwrap();
        let ids = SpecialIds::of(&tok).unwrap();
        let (examples, skipped) = build_examples(system, &corpus.train, &tok, 64, 1024, 3.0).unwrap();
        let mut config = Preset::Tiny.config(Objective::Autoregressive, tok.get_vocab_size(true), 3);
        config.model.n_embd = 32;
        config.model.n_ff = 64;
        config.steps = 12;
        config.warmup_steps = 2;
        config.batch_size = 4;
        let dir = std::env::temp_dir().join(format!("dllm-train-test-{}", std::process::id()));
        let a = train(&config, &examples, skipped, ids, &dir.join("a"), &Device::Cpu).unwrap();
        let b = train(&config, &examples, skipped, ids, &dir.join("b"), &Device::Cpu).unwrap();
        assert_eq!(a.state.step, 12);
        assert_eq!(a.state.loss, b.state.loss);
        let wa = std::fs::read(dir.join("a").join(CHECKPOINT_FILE)).unwrap();
        let wb = std::fs::read(dir.join("b").join(CHECKPOINT_FILE)).unwrap();
        assert_eq!(wa, wb);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
