//! Prometheus metrics: names, buckets and the recorder.
//!
//! Names follow what people already chart for LLM servers (time to first token, end-to-end
//! latency, queue time, running/waiting requests) with "revision" in place of "token", since a
//! diffusion reply is streamed as whole revisions. Histograms get explicit buckets so Prometheus
//! can aggregate them across replicas. Every failure counts once in `dllm_errors_total{code}`.
//!
//! Beside the recorder, cheap process-wide atomics keep the live figures the timing feed's
//! once-a-second summary reads ([`live`]): connections, running and waiting replies, errors.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const TIME_TO_FIRST_REVISION: &str = "dllm_time_to_first_revision_seconds";
pub const REPLY_LATENCY: &str = "dllm_reply_latency_seconds";
pub const QUEUE_TIME: &str = "dllm_queue_time_seconds";
pub const STEPS_PER_REPLY: &str = "dllm_steps_per_reply";
pub const TOKENS_PER_STEP: &str = "dllm_tokens_per_step";
pub const REPLY_TOKENS_PER_SECOND: &str = "dllm_reply_tokens_per_second";
pub const ACTIVE_CONNECTIONS: &str = "dllm_active_connections";
pub const REPLIES_RUNNING: &str = "dllm_replies_running";
pub const REPLIES_WAITING: &str = "dllm_replies_waiting";
pub const REPLIES_TOTAL: &str = "dllm_replies_total";
pub const ERRORS_TOTAL: &str = "dllm_errors_total";
pub const REVISIONS_SKIPPED: &str = "dllm_revisions_skipped_total";
pub const REPLIES_RECOVERED: &str = "dllm_replies_recovered_total";
pub const PROMPT_TOKENS: &str = "dllm_prompt_tokens_total";
pub const ENGINE_STEP: &str = "dllm_engine_step_seconds";
pub const ENGINE_BATCH: &str = "dllm_engine_batch_replies";
pub const REPLY_PHASE: &str = "dllm_reply_phase_seconds";

const SECONDS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Phases of a reply last from well under a millisecond (a cached prompt) to seconds.
const PHASE_SECONDS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
const COUNTS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0];
const RATES: &[f64] = &[1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0];

/// Installs the process-wide recorder once and returns the handle `/metrics` renders.
/// Several servers in one process (tests) share it.
pub fn install() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = [
                (TIME_TO_FIRST_REVISION, SECONDS),
                (REPLY_LATENCY, SECONDS),
                (QUEUE_TIME, SECONDS),
                (STEPS_PER_REPLY, COUNTS),
                (TOKENS_PER_STEP, COUNTS),
                (REPLY_TOKENS_PER_SECOND, RATES),
                (ENGINE_STEP, SECONDS),
                (ENGINE_BATCH, COUNTS),
                (REPLY_PHASE, PHASE_SECONDS),
            ]
            .into_iter()
            .fold(PrometheusBuilder::new(), |b, (name, buckets)| {
                b.set_buckets_for_metric(Matcher::Full(name.into()), buckets)
                    .expect("buckets are non-empty")
            });
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (an embedding application); then our
            // handle renders only what it records itself, which is still correct.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

static LIVE_CONNECTIONS: AtomicI64 = AtomicI64::new(0);
static LIVE_RUNNING: AtomicI64 = AtomicI64::new(0);
static LIVE_WAITING: AtomicI64 = AtomicI64::new(0);
/// Errors by code since the process started.
static LIVE_ERRORS: Mutex<BTreeMap<&'static str, u64>> = Mutex::new(BTreeMap::new());

/// The live figures of this process, as the gauges and the error counter show them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Live {
    pub connections: i64,
    pub running: i64,
    pub waiting: i64,
    /// Errors by code since the process started.
    pub errors: BTreeMap<&'static str, u64>,
}

/// The live figures now.
pub fn live() -> Live {
    Live {
        connections: LIVE_CONNECTIONS.load(Ordering::Relaxed),
        running: LIVE_RUNNING.load(Ordering::Relaxed),
        waiting: LIVE_WAITING.load(Ordering::Relaxed),
        errors: LIVE_ERRORS.lock().expect("error counts poisoned").clone(),
    }
}

pub fn error(code: &'static str) {
    counter!(ERRORS_TOTAL, "code" => code).increment(1);
    *LIVE_ERRORS
        .lock()
        .expect("error counts poisoned")
        .entry(code)
        .or_default() += 1;
}

pub fn connection_opened() {
    gauge!(ACTIVE_CONNECTIONS).increment(1.0);
    LIVE_CONNECTIONS.fetch_add(1, Ordering::Relaxed);
}

pub fn connection_closed() {
    gauge!(ACTIVE_CONNECTIONS).decrement(1.0);
    LIVE_CONNECTIONS.fetch_sub(1, Ordering::Relaxed);
}

/// Engine gauges; `None` leaves a figure unchanged.
pub fn engine_load(running: Option<usize>, waiting: Option<usize>) {
    if let Some(r) = running {
        gauge!(REPLIES_RUNNING).set(r as f64);
        LIVE_RUNNING.store(r as i64, Ordering::Relaxed);
    }
    if let Some(w) = waiting {
        gauge!(REPLIES_WAITING).set(w as f64);
        LIVE_WAITING.store(w as i64, Ordering::Relaxed);
    }
}

pub fn queue_time(wait: Duration) {
    histogram!(QUEUE_TIME).record(wait.as_secs_f64());
}

pub fn first_revision(latency: Duration) {
    histogram!(TIME_TO_FIRST_REVISION).record(latency.as_secs_f64());
}

pub fn step(tokens_unmasked: usize) {
    histogram!(TOKENS_PER_STEP).record(tokens_unmasked as f64);
}

/// Prompt tokens of a new reply: `reused` from a conversation's cache, `computed` prefilled.
pub fn prompt_tokens(reused: usize, computed: usize) {
    counter!(PROMPT_TOKENS, "source" => "cache").increment(reused as u64);
    counter!(PROMPT_TOKENS, "source" => "computed").increment(computed as u64);
}

/// One batched engine step: its duration and how many replies it advanced.
pub fn engine_step(duration: Duration, replies: usize) {
    histogram!(ENGINE_STEP).record(duration.as_secs_f64());
    histogram!(ENGINE_BATCH).record(replies as f64);
}

/// Where a finished reply's time went in the engine, one observation per phase.
pub fn reply_phases(p: &crate::engine::Phases) {
    for (phase, d) in [
        ("queue", p.queue),
        ("prompt", p.prompt),
        ("prefill", p.prefill),
        ("denoise", p.denoise),
        ("compute", p.compute),
        ("revision", p.revision),
        ("between_steps", p.between_steps),
    ] {
        histogram!(REPLY_PHASE, "phase" => phase).record(d.as_secs_f64());
    }
}

/// `n` revisions a slow reader did not get (each revision carries the whole reply).
pub fn revisions_skipped(n: u64) {
    counter!(REVISIONS_SKIPPED).increment(n);
}

/// A reply whose generator was lost was ended by this replica.
pub fn reply_recovered() {
    counter!(REPLIES_RECOVERED).increment(1);
}

/// A reply ended with `status` (completed, cancelled, failed).
pub fn reply_done(status: &'static str, total: Duration, steps: usize, tokens: usize) {
    counter!(REPLIES_TOTAL, "status" => status).increment(1);
    if status == "completed" {
        histogram!(REPLY_LATENCY).record(total.as_secs_f64());
        histogram!(STEPS_PER_REPLY).record(steps as f64);
        if total > Duration::ZERO {
            histogram!(REPLY_TOKENS_PER_SECOND).record(tokens as f64 / total.as_secs_f64());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every metric this module defines.
    const ALL: &[&str] = &[
        TIME_TO_FIRST_REVISION,
        REPLY_LATENCY,
        QUEUE_TIME,
        STEPS_PER_REPLY,
        TOKENS_PER_STEP,
        REPLY_TOKENS_PER_SECOND,
        ACTIVE_CONNECTIONS,
        REPLIES_RUNNING,
        REPLIES_WAITING,
        REPLIES_TOTAL,
        ERRORS_TOTAL,
        REVISIONS_SKIPPED,
        REPLIES_RECOVERED,
        PROMPT_TOKENS,
        ENGINE_STEP,
        ENGINE_BATCH,
        REPLY_PHASE,
    ];
    const HISTOGRAMS: &[&str] = &[
        TIME_TO_FIRST_REVISION,
        REPLY_LATENCY,
        QUEUE_TIME,
        STEPS_PER_REPLY,
        TOKENS_PER_STEP,
        REPLY_TOKENS_PER_SECOND,
        ENGINE_STEP,
        ENGINE_BATCH,
        REPLY_PHASE,
    ];

    /// The `dllm_*` names in a text.
    fn names(text: &str) -> Vec<&str> {
        let mut found = Vec::new();
        let mut rest = text;
        while let Some(i) = rest.find("dllm_") {
            let tail = &rest[i..];
            let end = tail
                .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
                .unwrap_or(tail.len());
            found.push(&tail[..end]);
            rest = &tail[end..];
        }
        found
    }

    #[test]
    fn every_metric_the_grafana_dashboard_queries_is_one_we_define() {
        let dashboard: serde_json::Value =
            serde_json::from_str(include_str!("../deploy/grafana/dllm-chat.json")).expect("the dashboard is JSON");
        let mut queried = 0;
        for panel in dashboard["panels"].as_array().expect("panels") {
            for target in panel["targets"].as_array().expect("targets") {
                let expr = target["expr"].as_str().expect("an expr");
                for name in names(expr) {
                    queried += 1;
                    let series = ["_bucket", "_sum", "_count"]
                        .iter()
                        .find_map(|suffix| name.strip_suffix(suffix));
                    let known = if let Some(h) = series.filter(|h| HISTOGRAMS.contains(h)) {
                        HISTOGRAMS.contains(&h)
                    } else {
                        ALL.contains(&name) && !HISTOGRAMS.contains(&name)
                    };
                    assert!(
                        known,
                        "panel {:?} queries {name}, which src/metrics.rs does not define",
                        panel["title"]
                    );
                    if expr.contains("histogram_quantile") {
                        assert!(
                            name.ends_with("_bucket"),
                            "a quantile of {name} needs its _bucket series"
                        );
                    }
                }
            }
        }
        assert!(queried >= HISTOGRAMS.len(), "the dashboard queries hardly anything");
        let everything = dashboard.to_string();
        for h in HISTOGRAMS {
            let charted = names(&everything)
                .iter()
                .any(|n| *n == format!("{h}_bucket") || *n == format!("{h}_sum"));
            assert!(charted, "no panel charts {h}");
        }
    }

    #[test]
    fn the_name_scanner_finds_suffixed_names() {
        assert_eq!(
            names("rate(dllm_errors_total{a=\"b\"}[1m]) / dllm_x_bucket"),
            vec!["dllm_errors_total", "dllm_x_bucket"]
        );
    }
}
