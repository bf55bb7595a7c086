//! One reply: submit the conversation to the engine, forward every revision, store the
//! assistant's message when it ends, and report `response.done`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::connection::Connection;
use super::{errors, AppState};
use crate::engine::{ChatTurn, DecodeOptions, EngineEvent, GenerateRequest, Revision, StopReason};
use crate::protocol::{DoneStatus, ErrorCode, ServerEvent, Timings, Usage, WireError};
use crate::sessions::{MessageStatus, Role, StoredMessage};

/// Marks a session busy on this replica for as long as it lives.
pub(super) struct BusyGuard {
    state: Arc<AppState>,
    session_id: String,
}

impl BusyGuard {
    /// `None` when the session already has a running reply.
    pub fn acquire(state: Arc<AppState>, session_id: &str) -> Option<Self> {
        let inserted = state
            .busy_sessions
            .lock()
            .expect("busy set poisoned")
            .insert(session_id.to_owned());
        inserted.then(|| Self {
            state,
            session_id: session_id.to_owned(),
        })
    }
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.state
            .busy_sessions
            .lock()
            .expect("busy set poisoned")
            .remove(&self.session_id);
    }
}

/// The conversation up to and including the user message `message_id`, or `None` when an
/// assistant message already follows it (a resent message that was answered). Cancelled
/// (partial) replies are left out of the prompt.
pub(super) fn turns_for(history: &[StoredMessage], message_id: &str) -> Option<Vec<ChatTurn>> {
    let index = history.iter().position(|m| m.id == message_id)?;
    if history[index + 1..].iter().any(|m| m.role == Role::Assistant) {
        return None;
    }
    Some(
        history[..=index]
            .iter()
            .filter(|m| m.status != Some(MessageStatus::Cancelled))
            .map(|m| ChatTurn {
                role: m.role.as_str().to_owned(),
                content: m.content.clone(),
            })
            .collect(),
    )
}

/// Submits the reply and spawns the task that streams it.
pub(super) async fn start(
    conn: Arc<Connection>,
    busy: BusyGuard,
    session_id: String,
    message_id: String,
    turns: Vec<ChatTurn>,
    options: DecodeOptions,
    event_id: Option<String>,
) -> Result<(), WireError> {
    let request = GenerateRequest {
        system: conn.state.system_prompt.clone(),
        turns,
        options,
    };
    let submitted = Instant::now();
    let stream = conn.state.engine.submit(request).map_err(|e| errors::from_engine(&e))?;
    let response_id = format!("resp_{}", uuid::Uuid::new_v4().simple());
    conn.replies
        .lock()
        .expect("replies poisoned")
        .insert(response_id.clone(), stream.cancel.clone());
    conn.outbox
        .send(ServerEvent::ResponseCreated {
            response_id: response_id.clone(),
            session_id: session_id.clone(),
            message_id,
            event_id: event_id.clone(),
        })
        .await;
    let task = Reply {
        conn: conn.clone(),
        session_id,
        response_id,
        event_id,
        submitted,
        cancel: stream.cancel,
    };
    conn.reply_tasks.spawn(async move {
        task.stream(stream.events).await;
        drop(busy);
    });
    Ok(())
}

struct Reply {
    conn: Arc<Connection>,
    session_id: String,
    response_id: String,
    event_id: Option<String>,
    submitted: Instant,
    /// Cancelling also happens when the connection goes away.
    cancel: CancellationToken,
}

impl Reply {
    async fn stream(self, mut events: tokio::sync::mpsc::UnboundedReceiver<EngineEvent>) {
        let outbox = self.conn.outbox.clone();
        let mut usage = Usage::default();
        let mut timings = Timings::default();
        let mut revisions = 0;
        // The newest revision the client has not seen because the outbox was full.
        let mut skipped: Option<ServerEvent> = None;
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let outcome = loop {
            if outbox.is_closed() {
                self.cancel.cancel();
            }
            let Some(event) = events.recv().await else {
                break Err(WireError::new(
                    ErrorCode::Internal,
                    "the engine stopped during the reply",
                ));
            };
            match event {
                EngineEvent::Started {
                    prompt_tokens,
                    cached_tokens,
                    queue_wait,
                    dropped_turns,
                } => {
                    usage.prompt_tokens = prompt_tokens;
                    usage.cached_prompt_tokens = cached_tokens;
                    timings.queue_ms = ms(queue_wait);
                    crate::metrics::queue_time(queue_wait);
                    if dropped_turns > 0 {
                        tracing::debug!(session = %self.session_id, dropped_turns, "history truncated to fit the context");
                    }
                }
                EngineEvent::Revision(Revision {
                    step,
                    text,
                    masked,
                    unmasked,
                }) => {
                    revisions += 1;
                    if revisions == 1 {
                        timings.first_revision_ms = ms(self.submitted.elapsed());
                        crate::metrics::first_revision(self.submitted.elapsed());
                    }
                    crate::metrics::step(unmasked);
                    let event = ServerEvent::ResponseRevision {
                        response_id: self.response_id.clone(),
                        revision: revisions,
                        step,
                        text,
                        masked,
                    };
                    if outbox.try_send(event.clone()) {
                        skipped = None;
                    } else {
                        crate::metrics::revision_skipped();
                        skipped = Some(event);
                    }
                }
                EngineEvent::Finished(c) => break Ok(c),
                EngineEvent::Failed(e) => break Err(errors::from_engine(&e)),
            }
        };
        // The client always sees the last revision before `response.done`.
        if let Some(event) = skipped {
            outbox.send(event).await;
        }
        self.conn
            .replies
            .lock()
            .expect("replies poisoned")
            .remove(&self.response_id);
        timings.total_ms = ms(self.submitted.elapsed());

        let done = match outcome {
            Ok(c) => {
                usage.completion_tokens = c.completion_tokens;
                timings.steps = c.steps;
                let (status, stored_status) = match c.reason {
                    StopReason::Completed => (DoneStatus::Completed, MessageStatus::Completed),
                    StopReason::Cancelled => (DoneStatus::Cancelled, MessageStatus::Cancelled),
                };
                let label = if status == DoneStatus::Completed {
                    "completed"
                } else {
                    "cancelled"
                };
                crate::metrics::reply_done(label, self.submitted.elapsed(), c.steps, c.completion_tokens);
                let message = StoredMessage::new(Role::Assistant, c.text.clone(), Some(stored_status), None);
                if let Err(e) = self.conn.state.store.append(&self.session_id, message).await {
                    tracing::warn!(session = %self.session_id, error = %e, "assistant message not stored");
                    let mut error = errors::from_store(&e);
                    error.message = format!("the reply was not saved to the session: {}", error.message);
                    outbox.error(error.with_event_id(self.event_id.clone())).await;
                }
                ServerEvent::ResponseDone {
                    response_id: self.response_id,
                    status,
                    text: c.text,
                    usage,
                    timings,
                    error: None,
                }
            }
            Err(error) => {
                crate::metrics::reply_done("failed", self.submitted.elapsed(), 0, 0);
                let error = error.with_event_id(self.event_id.clone());
                outbox.error(error.clone()).await;
                ServerEvent::ResponseDone {
                    response_id: self.response_id,
                    status: DoneStatus::Failed,
                    text: String::new(),
                    usage,
                    timings,
                    error: Some(error),
                }
            }
        };
        outbox.send(done).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: Role, content: &str, status: Option<MessageStatus>) -> StoredMessage {
        StoredMessage::new(role, content.into(), status, None)
    }

    #[test]
    fn turns_skip_cancelled_replies_and_detect_answered_resends() {
        let h = vec![
            msg(Role::User, "a", None),
            msg(Role::Assistant, "partial", Some(MessageStatus::Cancelled)),
            msg(Role::User, "b", None),
        ];
        let turns = turns_for(&h, &h[2].id).unwrap();
        assert_eq!(
            turns.iter().map(|t| t.content.as_str()).collect::<Vec<_>>(),
            vec!["a", "b"]
        );
        // The first message was answered (even if only partially): a resend generates nothing.
        assert!(turns_for(&h, &h[0].id).is_none());
        assert!(turns_for(&h, "unknown").is_none());
    }
}
