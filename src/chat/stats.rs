//! The timing feed behind the live latency dashboard: one record per finished reply and a
//! summary of each replica once a second, for every replica on the store.
//!
//! The reply task hands its [`DoneEvent`] to the [`StatsBus`] at its end; a ticker adds the
//! summary from [`crate::metrics::live`]. With a shared store (Redis) every record goes through
//! the store ([`SessionStore::publish_stats`]) and a relay reads all replicas' records back onto
//! this replica's in-process channel, so every feed shows every replica; with the memory store
//! records go onto the channel directly. Subscribers get JSON text; a slow one skips records.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::events::{DoneEvent, ReplyStatus};
use crate::sessions::SessionStore;

/// Records buffered per subscriber before a slow one skips some.
const BUFFER: usize = 1024;
/// How long a relay read blocks on the store.
const RELAY_BLOCK: Duration = Duration::from_millis(1000);
/// The summary's period.
const SUMMARY_EVERY: Duration = Duration::from_secs(1);

/// One record of the timing feed, as JSON `{"type": "reply" | "summary", ...}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum StatsRecord {
    Reply(ReplyRecord),
    Summary(SummaryRecord),
}

/// A finished reply's timings and usage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplyRecord {
    pub replica: String,
    pub status: ReplyStatus,
    pub queue_ms: f64,
    pub first_revision_ms: f64,
    pub total_ms: f64,
    pub steps: usize,
    /// Completion tokens per denoising step (0 without steps).
    pub tokens_per_step: f64,
    pub prompt_tokens: usize,
    pub cached_prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Milliseconds since the Unix epoch.
    pub at: i64,
}

/// One replica's load, once a second.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SummaryRecord {
    pub replica: String,
    pub running: i64,
    pub waiting: i64,
    pub connections: i64,
    /// Errors by code in the last second.
    pub errors: BTreeMap<String, u64>,
    pub at: i64,
}

impl ReplyRecord {
    pub fn of(replica: &str, done: &DoneEvent) -> Self {
        let t = &done.timings;
        let u = &done.usage;
        Self {
            replica: replica.to_owned(),
            status: done.status,
            queue_ms: t.queue_ms,
            first_revision_ms: t.first_revision_ms,
            total_ms: t.total_ms,
            steps: t.steps,
            tokens_per_step: if t.steps > 0 {
                u.completion_tokens as f64 / t.steps as f64
            } else {
                0.0
            },
            prompt_tokens: u.prompt_tokens,
            cached_prompt_tokens: u.cached_prompt_tokens,
            completion_tokens: u.completion_tokens,
            at: now_ms(),
        }
    }
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// The errors counted between two cumulative snapshots.
fn errors_since(before: &BTreeMap<&'static str, u64>, now: &BTreeMap<&'static str, u64>) -> BTreeMap<String, u64> {
    now.iter()
        .filter_map(|(code, n)| {
            let d = n.saturating_sub(before.get(code).copied().unwrap_or(0));
            (d > 0).then(|| ((*code).to_owned(), d))
        })
        .collect()
}

/// The core's timing-feed bus.
pub struct StatsBus {
    replica: String,
    store: Arc<dyn SessionStore>,
    local: broadcast::Sender<Arc<str>>,
}

impl StatsBus {
    pub fn new(replica: String, store: Arc<dyn SessionStore>) -> Self {
        Self {
            replica,
            store,
            local: broadcast::channel(BUFFER).0,
        }
    }

    /// Every replica's records from now on, as JSON.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<str>> {
        self.local.subscribe()
    }

    /// Publishes the record of a reply that ended here. Never waits: the store write runs in a
    /// task of its own, and a record that cannot be shared is dropped with a debug line.
    pub fn reply_done(self: &Arc<Self>, done: &DoneEvent) {
        self.publish(StatsRecord::Reply(ReplyRecord::of(&self.replica, done)));
    }

    fn publish(self: &Arc<Self>, record: StatsRecord) {
        let json: Arc<str> = serde_json::to_string(&record).expect("records serialize").into();
        let bus = self.clone();
        tokio::spawn(async move {
            match bus.store.publish_stats(&json).await {
                Ok(true) => {}
                Ok(false) => {
                    let _ = bus.local.send(json);
                }
                Err(e) => tracing::debug!(error = %e, "timing record not shared"),
            }
        });
    }

    /// Starts the summary ticker and, with a shared store, the relay of every replica's records.
    pub fn start(self: &Arc<Self>, shutdown: CancellationToken) {
        tokio::spawn(summaries(self.clone(), shutdown.clone()));
        tokio::spawn(relay(self.clone(), shutdown));
    }
}

/// This replica's summary once a second, until `shutdown`.
async fn summaries(bus: Arc<StatsBus>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(SUMMARY_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut before = crate::metrics::live().errors;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let live = crate::metrics::live();
        let errors = errors_since(&before, &live.errors);
        before = live.errors;
        bus.publish(StatsRecord::Summary(SummaryRecord {
            replica: bus.replica.clone(),
            running: live.running,
            waiting: live.waiting,
            connections: live.connections,
            errors,
            at: now_ms(),
        }));
    }
}

/// Every replica's records from a shared store onto this replica's channel, until `shutdown`.
/// Returns at once when the store is not shared.
async fn relay(bus: Arc<StatsBus>, shutdown: CancellationToken) {
    let mut cursor: Option<String> = None;
    loop {
        let read = tokio::select! {
            r = bus.store.read_stats(cursor.as_deref(), RELAY_BLOCK) => r,
            _ = shutdown.cancelled() => return,
        };
        match read {
            Ok(None) => return,
            Ok(Some(batch)) => {
                cursor = Some(batch.cursor);
                for record in batch.records {
                    let _ = bus.local.send(record.into());
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "timing feed relay: store read failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(RELAY_BLOCK) => {}
                    _ = shutdown.cancelled() => return,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::events::{Timings, Usage};

    #[test]
    fn a_reply_record_carries_the_done_events_timings_and_usage() {
        let done = DoneEvent {
            status: ReplyStatus::Completed,
            text: "hi".into(),
            revisions: 4,
            usage: Usage {
                prompt_tokens: 30,
                cached_prompt_tokens: 20,
                completion_tokens: 12,
            },
            timings: Timings {
                queue_ms: 1.5,
                first_revision_ms: 9.0,
                total_ms: 40.0,
                steps: 4,
                ..Timings::default()
            },
            handover: false,
            error: None,
        };
        let json = serde_json::to_value(StatsRecord::Reply(ReplyRecord::of("replica_a", &done))).unwrap();
        assert_eq!(json["type"], "reply");
        assert_eq!(json["status"], "completed");
        assert_eq!(json["replica"], "replica_a");
        assert_eq!(json["tokens_per_step"], 3.0);
        assert_eq!(json["cached_prompt_tokens"], 20);
        assert_eq!(json["first_revision_ms"], 9.0);
        assert!(json["at"].as_i64().unwrap() > 1_600_000_000_000);
    }

    #[test]
    fn summary_errors_are_the_difference_of_two_snapshots() {
        let before = BTreeMap::from([("overloaded", 2), ("busy", 1)]);
        let now = BTreeMap::from([("overloaded", 5), ("busy", 1), ("unauthorized", 1)]);
        assert_eq!(
            errors_since(&before, &now),
            BTreeMap::from([("overloaded".to_owned(), 3), ("unauthorized".to_owned(), 1)])
        );
    }
}
