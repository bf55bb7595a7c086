//! What a reply looks like to everyone who watches it: whole-reply revisions and one terminal
//! event. These are logged in the session store as JSON, so a watcher on any replica reads the
//! same events the generating replica produced.

use serde::{Deserialize, Serialize};

/// One event of a reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ReplyEvent {
    Revision(RevisionEvent),
    Done(DoneEvent),
}

impl ReplyEvent {
    /// The position in the reply log: revisions by number, the terminal event after them all.
    pub fn seq(&self) -> u64 {
        match self {
            ReplyEvent::Revision(r) => r.revision as u64,
            ReplyEvent::Done(d) => d.revisions as u64 + 1,
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("reply events serialize")
    }
}

/// The whole reply after one denoising step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RevisionEvent {
    /// 1, 2, … in the order they were produced.
    pub revision: usize,
    pub step: usize,
    /// Masked positions show the configured placeholder.
    pub text: String,
    pub masked: usize,
}

/// How a reply ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplyStatus {
    Completed,
    Cancelled,
    Failed,
}

/// The end of a reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DoneEvent {
    pub status: ReplyStatus,
    pub text: String,
    /// Revisions produced before it.
    pub revisions: usize,
    pub usage: Usage,
    pub timings: Timings,
    /// A completed reply that hands the conversation to a person (`chat.handover_phrases`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub handover: bool,
    /// Why it failed; or, beside `completed`, why the reply was not saved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ReplyFailure>,
}

/// A failure a watcher is told about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplyFailure {
    pub kind: FailureKind,
    pub message: String,
}

/// The kinds of reply failure; the server maps each to its wire code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// The replica generating it died, stalled past its lease or lost the store.
    GeneratorLost,
    ContextOverflow,
    Overloaded,
    StoreUnavailable,
    ShuttingDown,
    Internal,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    /// Prompt tokens taken from the conversation's cache instead of being computed again.
    pub cached_prompt_tokens: usize,
    pub completion_tokens: usize,
}

/// A reply's timings. `total_ms` runs from the message reaching the engine to the reply's end and
/// splits into `queue_ms + prompt_ms + prefill_ms + denoise_ms + revision_ms + between_steps_ms +
/// handoff_ms` (a failed reply has only the first few).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Timings {
    /// Waiting for the prompt thread and for a running slot.
    pub queue_ms: f64,
    /// Rendering the template, tokenizing and fitting the history.
    pub prompt_ms: f64,
    /// Computing the prompt's K/V not cached from earlier turns.
    pub prefill_ms: f64,
    /// The denoising steps (each step's whole batch).
    pub denoise_ms: f64,
    /// Of `denoise_ms`, the model's evaluation; the rest is host work.
    pub compute_ms: f64,
    /// Building revisions (detokenizing the canvas).
    pub revision_ms: f64,
    /// In the engine between this reply's steps (other replies' prefills, scheduling).
    pub between_steps_ms: f64,
    /// Handing the request to the engine and its events back to the conversation core.
    pub handoff_ms: f64,
    pub first_revision_ms: f64,
    pub total_ms: f64,
    pub steps: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_through_their_logged_form_and_order_by_seq() {
        let revision = ReplyEvent::Revision(RevisionEvent {
            revision: 3,
            step: 3,
            text: "Hi ░".into(),
            masked: 1,
        });
        let done = ReplyEvent::Done(DoneEvent {
            status: ReplyStatus::Failed,
            text: String::new(),
            revisions: 3,
            usage: Usage::default(),
            timings: Timings::default(),
            handover: false,
            error: Some(ReplyFailure {
                kind: FailureKind::GeneratorLost,
                message: "gone".into(),
            }),
        });
        for e in [&revision, &done] {
            let back: ReplyEvent = serde_json::from_str(&e.to_json()).unwrap();
            assert_eq!(&back, e);
        }
        assert!(done.seq() > revision.seq());
        assert!(done.to_json().contains("\"generator_lost\""));
    }
}
