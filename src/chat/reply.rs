//! One reply generated on this replica: engine events become reply events, each written to the
//! session's reply log under the session lease before watchers here see it; the lease is renewed
//! beside it; the end stores the assistant's message in the same fenced write as the terminal
//! event.
//!
//! Losing the lease (it expired while this replica stalled, or the store stayed away past it)
//! stops the reply without another write: another replica ends it as `generator_lost`, and the
//! watchers here are told the same.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::events::{DoneEvent, FailureKind, ReplyEvent, ReplyFailure, ReplyStatus, RevisionEvent, Timings, Usage};
use super::handover::Handover;
use super::Core;
use crate::engine::{EngineError, EngineEvent, Phases, ReplyStream, StopReason};
use crate::sessions::{Lease, LeaseState, LoggedEvent, MessageStatus, Role, SessionStore, StoredMessage};

/// A running reply and what it needs.
pub(super) struct Reply {
    pub core: Arc<Core>,
    pub lease: Lease,
    pub stream: ReplyStream,
    pub submitted: Instant,
}

/// What the lease keeper last learned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Keeper {
    Held,
    CancelRequested,
    Lost,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub(super) fn failure(kind: FailureKind, message: impl Into<String>) -> ReplyFailure {
    ReplyFailure {
        kind,
        message: message.into(),
    }
}

fn engine_failure(e: &EngineError) -> ReplyFailure {
    let kind = match e {
        EngineError::ContextOverflow { .. } => FailureKind::ContextOverflow,
        // A full wait queue or every conversation cache in use: the client may retry.
        EngineError::Overloaded(_) => FailureKind::Overloaded,
        EngineError::Stopped => FailureKind::ShuttingDown,
        _ => FailureKind::Internal,
    };
    failure(kind, e.to_string())
}

/// The terminal event of a reply whose generator was lost.
pub(super) fn lost(revisions: usize, message: &str) -> DoneEvent {
    DoneEvent {
        status: ReplyStatus::Failed,
        text: String::new(),
        revisions,
        usage: Usage::default(),
        timings: Timings::default(),
        handover: false,
        error: Some(failure(FailureKind::GeneratorLost, message)),
    }
}

/// Renews `lease` every third of its length until `stop`; reports through the watch. A lease it
/// could not renew before its own deadline counts as lost: the holder must stop by itself.
async fn keep_lease(
    store: Arc<dyn SessionStore>,
    lease: Lease,
    lease_ms: u64,
    report: watch::Sender<Keeper>,
    stop: CancellationToken,
) {
    let length = Duration::from_millis(lease_ms);
    let every = length / 3;
    let mut deadline = Instant::now() + length;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.cancelled() => return,
        }
        let asked = Instant::now();
        let renewed = tokio::time::timeout(every, store.renew_lease(&lease, lease_ms)).await;
        let state = match renewed {
            Ok(Ok(LeaseState::Held)) => Keeper::Held,
            Ok(Ok(LeaseState::CancelRequested)) => Keeper::CancelRequested,
            Ok(Ok(LeaseState::Lost)) => Keeper::Lost,
            Ok(Err(_)) | Err(_) if Instant::now() + every < deadline => continue,
            Ok(Err(_)) | Err(_) => Keeper::Lost,
        };
        if state != Keeper::Lost {
            deadline = asked + length;
        }
        let _ = report.send(state);
        if state == Keeper::Lost {
            return;
        }
    }
}

impl Timings {
    /// Fills in the engine's phases; what the engine does not account for is hand-off.
    fn split(&mut self, p: &Phases) {
        self.queue_ms = ms(p.queue);
        self.prompt_ms = ms(p.prompt);
        self.prefill_ms = ms(p.prefill);
        self.denoise_ms = ms(p.denoise);
        self.compute_ms = ms(p.compute);
        self.revision_ms = ms(p.revision);
        self.between_steps_ms = ms(p.between_steps);
        let engine = p.queue + p.prompt + p.prefill + p.denoise + p.revision + p.between_steps;
        self.handoff_ms = (self.total_ms - ms(engine)).max(0.0);
    }
}

/// A reply's engine events turned into reply events, with its usage, timings and metrics.
pub(super) struct Progress {
    submitted: Instant,
    handover: Arc<Handover>,
    usage: Usage,
    timings: Timings,
    revisions: usize,
}

/// What one engine event amounts to.
pub(super) enum Step {
    /// Nothing for watchers (the reply started).
    Quiet,
    Revision(ReplyEvent),
    /// The end: the event, and the message to store (none for a failure).
    Done(DoneEvent, Option<StoredMessage>),
}

impl Progress {
    pub fn new(submitted: Instant, handover: Arc<Handover>) -> Self {
        Self {
            submitted,
            handover,
            usage: Usage::default(),
            timings: Timings::default(),
            revisions: 0,
        }
    }

    /// `None` (the engine's channel closed) counts as a failure.
    pub fn step(&mut self, event: Option<EngineEvent>) -> Step {
        let Some(event) = event else {
            return self.fail(failure(FailureKind::Internal, "the engine stopped during the reply"));
        };
        match event {
            EngineEvent::Started {
                prompt_tokens,
                cached_tokens,
                queue_wait,
                dropped_turns,
            } => {
                self.usage.prompt_tokens = prompt_tokens;
                self.usage.cached_prompt_tokens = cached_tokens;
                self.timings.queue_ms = ms(queue_wait);
                crate::metrics::queue_time(queue_wait);
                if dropped_turns > 0 {
                    tracing::debug!(dropped_turns, "history truncated to fit the context");
                }
                Step::Quiet
            }
            EngineEvent::Revision(r) => {
                self.revisions += 1;
                if self.revisions == 1 {
                    self.timings.first_revision_ms = ms(self.submitted.elapsed());
                    crate::metrics::first_revision(self.submitted.elapsed());
                }
                crate::metrics::step(r.unmasked);
                Step::Revision(ReplyEvent::Revision(RevisionEvent {
                    revision: self.revisions,
                    step: r.step,
                    text: r.text,
                    masked: r.masked,
                }))
            }
            EngineEvent::Finished(c) => {
                self.usage.completion_tokens = c.completion_tokens;
                self.timings.steps = c.steps;
                self.timings.total_ms = ms(self.submitted.elapsed());
                self.timings.split(&c.phases);
                let (status, stored, label) = match c.reason {
                    StopReason::Completed => (ReplyStatus::Completed, MessageStatus::Completed, "completed"),
                    StopReason::Cancelled => (ReplyStatus::Cancelled, MessageStatus::Cancelled, "cancelled"),
                };
                crate::metrics::reply_done(label, self.submitted.elapsed(), c.steps, c.completion_tokens);
                let handover = status == ReplyStatus::Completed && self.handover.is_handover(&c.text);
                let mut message = StoredMessage::new(Role::Assistant, c.text.clone(), Some(stored), None);
                message.handover = handover;
                let done = DoneEvent {
                    status,
                    text: c.text,
                    revisions: self.revisions,
                    usage: self.usage,
                    timings: self.timings,
                    handover,
                    error: None,
                };
                Step::Done(done, Some(message))
            }
            EngineEvent::Failed(e) => self.fail(engine_failure(&e)),
        }
    }

    fn fail(&mut self, error: ReplyFailure) -> Step {
        self.timings.total_ms = ms(self.submitted.elapsed());
        crate::metrics::reply_done("failed", self.submitted.elapsed(), 0, 0);
        let done = DoneEvent {
            status: ReplyStatus::Failed,
            text: String::new(),
            revisions: self.revisions,
            usage: self.usage,
            timings: self.timings,
            handover: false,
            error: Some(error),
        };
        Step::Done(done, None)
    }

    /// The end of a reply whose lease was lost.
    pub fn lost(&self) -> DoneEvent {
        crate::metrics::reply_done("failed", self.submitted.elapsed(), 0, 0);
        lost(
            self.revisions,
            "this replica lost the session lease; the reply was not saved",
        )
    }
}

impl Reply {
    pub async fn run(self) {
        let Reply {
            core,
            lease,
            stream,
            submitted,
        } = self;
        let ReplyStream { mut events, cancel } = stream;
        let response_id = lease.response_id.clone();
        let (report, mut kept) = watch::channel(Keeper::Held);
        let stop_keeper = CancellationToken::new();
        tokio::spawn(keep_lease(
            core.store.clone(),
            lease.clone(),
            core.config.lease_ms,
            report,
            stop_keeper.clone(),
        ));
        let _stop_keeper = stop_keeper.drop_guard();

        let mut progress = Progress::new(submitted, core.handover.clone());
        let end = loop {
            let event = tokio::select! {
                event = events.recv() => event,
                changed = kept.changed() => {
                    // A keeper that is gone without a word cannot vouch for the lease either.
                    let state = if changed.is_ok() { *kept.borrow() } else { Keeper::Lost };
                    match state {
                        Keeper::Held => {}
                        Keeper::CancelRequested => cancel.cancel(),
                        Keeper::Lost => break None,
                    }
                    continue;
                }
            };
            match progress.step(event) {
                Step::Quiet => {}
                Step::Revision(event) => {
                    match core.store.log_event(&lease, &logged(&event)).await {
                        Ok(LeaseState::Held) => {}
                        Ok(LeaseState::CancelRequested) => cancel.cancel(),
                        Ok(LeaseState::Lost) => break None,
                        // Watchers here still see it; watchers elsewhere see the next one.
                        Err(e) => tracing::warn!(response = %response_id, error = %e, "revision not logged"),
                    }
                    core.hub.publish(&response_id, event);
                }
                Step::Done(done, message) => break Some((done, message)),
            }
        };

        let done = match end {
            None => None,
            Some((done, message)) => {
                let event = ReplyEvent::Done(done.clone());
                match core.store.finish_reply(&lease, message, Some(&logged(&event))).await {
                    Ok(LeaseState::Held | LeaseState::CancelRequested) => Some(done),
                    Ok(LeaseState::Lost) => None,
                    Err(e) => {
                        tracing::warn!(session = %lease.session_id, error = %e, "reply not stored");
                        Some(DoneEvent {
                            error: Some(failure(
                                FailureKind::StoreUnavailable,
                                format!("the reply was not saved to the session: {e}"),
                            )),
                            ..done
                        })
                    }
                }
            }
        };
        let done = done.unwrap_or_else(|| {
            cancel.cancel();
            tracing::warn!(session = %lease.session_id, response = %response_id, "session lease lost; reply stopped");
            progress.lost()
        });
        core.local_replies
            .lock()
            .expect("local replies poisoned")
            .remove(&response_id);
        core.stats.reply_done(&done);
        core.hub.publish(&response_id, ReplyEvent::Done(done));
    }
}

/// A reply to a conversation that is not stored (a stateless front end's): engine events
/// become reply events for its watchers here, and nothing is written.
pub(super) async fn run_unstored(core: Arc<Core>, response_id: String, stream: ReplyStream, submitted: Instant) {
    let ReplyStream { mut events, cancel: _ } = stream;
    let mut progress = Progress::new(submitted, core.handover.clone());
    loop {
        match progress.step(events.recv().await) {
            Step::Quiet => {}
            Step::Revision(event) => core.hub.publish(&response_id, event),
            Step::Done(done, _) => {
                core.local_replies
                    .lock()
                    .expect("local replies poisoned")
                    .remove(&response_id);
                core.stats.reply_done(&done);
                core.hub.publish(&response_id, ReplyEvent::Done(done));
                return;
            }
        }
    }
}

pub(super) fn logged(event: &ReplyEvent) -> LoggedEvent {
    LoggedEvent {
        seq: event.seq(),
        payload: event.to_json(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Capacity;

    #[test]
    fn no_free_conversation_cache_fails_the_reply_as_overloaded() {
        let failure = engine_failure(&EngineError::Overloaded(Capacity::Caches { caches: 8 }));
        assert_eq!(failure.kind, FailureKind::Overloaded);
        assert!(failure.message.contains("conversation caches"), "{}", failure.message);
        assert_eq!(
            engine_failure(&EngineError::Decode("x".into())).kind,
            FailureKind::Internal
        );
    }
}
