//! The conversation core: the rules of a conversation, the same for every front end (the
//! WebSocket protocol today; HTTP and webhook front ends call the same methods) and for every
//! replica on one session store.
//!
//! It takes a [`ValidMessage`] and answers with a stream of domain events ([`ChatEvent`]:
//! accepted, created, revisions, done). It owns the session lease (one reply per session across
//! replicas), history -> prompt, every store write, cancellation and resume.
//!
//! - [`validate`]: raw input -> [`ValidMessage`], the one place limits are checked.
//! - [`events`]: the reply events every watcher sees, logged in the store.
//! - `handover`: recognises the reply that hands the conversation to a person.
//! - `hub`: fan-out of reply events to the watchers on this replica (and the tail that brings
//!   in replies generated elsewhere).
//! - `reply`: one reply generated here, written under the lease.
//! - `recovery`: ends the replies of dead or stalled replicas as `generator_lost`.
//! - [`stats`]: the timing feed (a record per finished reply, a summary per replica each
//!   second) across replicas, behind the live latency dashboard.
//! - [`error`]: the core's typed errors, [`ChatError`].

pub mod error;
pub mod events;
mod handover;
mod hub;
mod recovery;
mod reply;
pub mod stats;
pub mod validate;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use self::error::ChatError;
pub use self::events::{DoneEvent, FailureKind, ReplyEvent, ReplyFailure, ReplyStatus, RevisionEvent, Timings, Usage};
pub use self::hub::ReplyWatch;
pub use self::validate::{
    MessageOptions, NewConversation, NewMessage, ValidConversation, ValidMessage, ValidationError, Validator,
};
use crate::config::ChatConfig;
use crate::engine::{ChatTurn, Engine, GenerateRequest};
use crate::quotas::Quotas;
use crate::sessions::{Begin, MessageStatus, ReplyStart, Role, SessionInfo, SessionStore, StoredMessage};

/// What the core is built from.
pub struct ChatParts {
    pub config: ChatConfig,
    pub validator: Validator,
    pub store: Arc<dyn SessionStore>,
    pub engine: Arc<dyn Engine>,
    pub system_prompt: String,
    /// Each key's message rate, shared across replicas.
    pub quotas: Arc<Quotas>,
}

/// State shared by the core's tasks.
pub(crate) struct Core {
    config: ChatConfig,
    store: Arc<dyn SessionStore>,
    engine: Arc<dyn Engine>,
    system_prompt: String,
    quotas: Arc<Quotas>,
    handover: Arc<handover::Handover>,
    hub: Arc<hub::Hub>,
    stats: Arc<stats::StatsBus>,
    /// This process's name in the store's running-reply records.
    replica: String,
    /// Replies generated here: response id -> (session id, cancel token).
    local_replies: Mutex<HashMap<String, (String, CancellationToken)>>,
    replies: TaskTracker,
    /// Cancelled when the core drains: no new replies, background tasks stop.
    shutdown: CancellationToken,
}

/// The conversation core. Cheap to clone.
#[derive(Clone)]
pub struct Chat {
    core: Arc<Core>,
    validator: Arc<Validator>,
}

/// A running reply as a (re)connecting client first sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct RunningSnapshot {
    pub response_id: String,
    pub message_id: String,
    /// The newest revision so far; `None` before the first.
    pub latest: Option<RevisionEvent>,
}

/// A session as `resume_session` finds it.
pub struct Resumed {
    pub metadata: serde_json::Value,
    pub messages: Vec<StoredMessage>,
    /// The reply still running, with a watch that delivers the rest of it.
    pub running: Option<(RunningSnapshot, ReplyWatch)>,
}

/// What a sent message leads to, in order: `Accepted`, then `Created` and the reply's events,
/// or `Refused` when the reply could not start. A resend of an answered message ends after
/// `Accepted`.
#[derive(Debug, Clone)]
pub enum ChatEvent {
    Accepted { message_id: String, duplicate: bool },
    Created { response_id: String, message_id: String },
    Reply(ReplyEvent),
    Refused(Arc<ChatError>),
}

/// The events of one sent message.
pub struct ChatStream {
    queued: VecDeque<ChatEvent>,
    watch: Option<ReplyWatch>,
    /// Cancels the reply when the stream is dropped before its end, unless
    /// `chat.finish_orphaned_replies`.
    orphan: Option<tokio_util::sync::DropGuard>,
}

impl ChatStream {
    pub async fn next(&mut self) -> Option<ChatEvent> {
        if let Some(e) = self.queued.pop_front() {
            return Some(e);
        }
        let event = self.watch.as_mut()?.next().await;
        if event.is_none() || matches!(event, Some(ReplyEvent::Done(_))) {
            self.watch = None;
            if let Some(guard) = self.orphan.take() {
                guard.disarm();
            }
        }
        event.map(ChatEvent::Reply)
    }
}

impl Chat {
    /// Builds the core and starts its background tasks (the tail of remote replies, recovery of
    /// lost ones). Call inside a tokio runtime.
    pub fn start(parts: ChatParts) -> Self {
        let ChatParts {
            config,
            validator,
            store,
            engine,
            system_prompt,
            quotas,
        } = parts;
        let replica = format!("replica_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let core = Arc::new(Core {
            hub: Arc::new(hub::Hub::new(config.watch_buffer)),
            handover: Arc::new(handover::Handover::new(&config.handover_phrases)),
            stats: Arc::new(stats::StatsBus::new(replica.clone(), store.clone())),
            replica,
            config,
            store,
            engine,
            system_prompt,
            quotas,
            local_replies: Mutex::new(HashMap::new()),
            replies: TaskTracker::new(),
            shutdown: CancellationToken::new(),
        });
        tokio::spawn(hub::tail(
            core.hub.clone(),
            core.store.clone(),
            Duration::from_millis(core.config.tail_block_ms),
            core.shutdown.clone(),
        ));
        tokio::spawn(recovery::run(core.clone()));
        core.stats.start(core.shutdown.clone());
        Self {
            core,
            validator: Arc::new(validator),
        }
    }

    pub fn validator(&self) -> &Validator {
        &self.validator
    }

    /// The timing feed of every replica on the store, as JSON records ([`stats::StatsRecord`]).
    pub fn stats_feed(&self) -> tokio::sync::broadcast::Receiver<Arc<str>> {
        self.core.stats.subscribe()
    }

    /// This replica's name in the timing feed and the store's running-reply records.
    pub fn replica(&self) -> &str {
        &self.core.replica
    }

    pub fn engine(&self) -> &dyn Engine {
        self.core.engine.as_ref()
    }

    /// Checks the store answers (for readiness).
    pub async fn store_ready(&self) -> Result<(), crate::sessions::StoreError> {
        self.core.store.ping().await
    }

    pub async fn create_session(&self, owner: &str, metadata: serde_json::Value) -> Result<SessionInfo, ChatError> {
        Ok(self.core.store.create(owner, metadata).await?)
    }

    /// Sets top-level metadata keys of the session (a `null` value removes the key) and returns
    /// the whole metadata after it. Concurrent updates of different keys can overwrite each
    /// other (the last one wins): metadata is the page's description of its visitor, written by
    /// one page at a time.
    pub async fn update_session(
        &self,
        owner: &str,
        session_id: &str,
        patch: serde_json::Map<String, serde_json::Value>,
    ) -> Result<serde_json::Value, ChatError> {
        let info = self.owned(owner, session_id).await?;
        let mut metadata = match info.metadata {
            serde_json::Value::Object(map) => map,
            _ => serde_json::Map::new(),
        };
        for (key, value) in patch {
            if value.is_null() {
                metadata.remove(&key);
            } else {
                metadata.insert(key, value);
            }
        }
        let metadata = serde_json::Value::Object(metadata);
        self.core.store.set_metadata(session_id, metadata.clone()).await?;
        Ok(metadata)
    }

    /// The session an outside conversation id names (a live-chat platform's), made on first use.
    pub async fn session_by_alias(
        &self,
        owner: &str,
        alias: &str,
        metadata: serde_json::Value,
    ) -> Result<SessionInfo, ChatError> {
        let info = self.core.store.aliased(alias, owner, metadata).await?;
        if info.owner != owner {
            return Err(ChatError::SessionNotFound(info.id));
        }
        Ok(info)
    }

    /// The session's messages after `after` (all of them when `after` is absent or unknown),
    /// and its running reply if there is one.
    pub async fn resume_session(
        &self,
        owner: &str,
        session_id: &str,
        after: Option<&str>,
    ) -> Result<Resumed, ChatError> {
        let info = self.owned(owner, session_id).await?;
        let store = &self.core.store;
        // Running first: a reply that ends in between then still reaches the client through
        // the watch, instead of falling between the two reads.
        let running = store.running_reply(session_id).await?;
        let mut messages = store.messages(session_id).await?;
        let start = after
            .and_then(|id| messages.iter().position(|m| m.id == id))
            .map_or(0, |i| i + 1);
        messages.drain(..start);
        let running = match running {
            Some(r) => self
                .core
                .hub
                .watch(store.as_ref(), &r.response_id, 0)
                .await?
                .map(|mut watch| {
                    let latest = watch.latest().cloned();
                    // The snapshot shows the newest revision; the watch goes on after it.
                    watch.skip_through(latest.as_ref().map_or(0, |r| r.revision));
                    let snapshot = RunningSnapshot {
                        response_id: r.response_id,
                        message_id: r.message_id,
                        latest,
                    };
                    (snapshot, watch)
                }),
            None => None,
        };
        Ok(Resumed {
            metadata: info.metadata,
            messages,
            running,
        })
    }

    /// The rest of one response after revision `after_revision`: its newest revision (if newer)
    /// and everything that follows, or its end if it already ended.
    pub async fn resume_response(
        &self,
        owner: &str,
        response_id: &str,
        after_revision: usize,
    ) -> Result<ReplyWatch, ChatError> {
        let store = &self.core.store;
        let not_found = || ChatError::ResponseNotFound(response_id.to_owned());
        let log = store.reply_log(response_id).await?.ok_or_else(not_found)?;
        self.owned_response(owner, &log.session_id, response_id).await?;
        self.core
            .hub
            .watch(store.as_ref(), response_id, after_revision)
            .await?
            .ok_or_else(not_found)
    }

    /// Stores the user's message and starts its reply, unless one already runs in the session
    /// (on any replica): then `Busy`, and nothing is stored.
    pub async fn send(&self, owner: &str, message: ValidMessage) -> Result<ChatStream, ChatError> {
        let core = &self.core;
        if core.shutdown.is_cancelled() {
            return Err(ChatError::ShuttingDown);
        }
        self.owned(owner, &message.session_id).await?;
        core.quotas.key_message(owner).await?;
        let ValidMessage {
            session_id,
            content,
            client_message_id,
            options,
        } = message;
        let store = &core.store;

        // A resend of an answered message needs no lease.
        if let Some(cid) = &client_message_id {
            let history = store.messages(&session_id).await?;
            if let Some(earlier) = history.iter().find(|m| m.client_message_id.as_ref() == Some(cid)) {
                if turns_for(&history, &earlier.id).is_none() {
                    return Ok(ChatStream::ended(ChatEvent::Accepted {
                        message_id: earlier.id.clone(),
                        duplicate: true,
                    }));
                }
            }
        }

        let user = StoredMessage::new(Role::User, content, None, client_message_id);
        let start = ReplyStart {
            response_id: format!("resp_{}", uuid::Uuid::new_v4().simple()),
            replica: core.replica.clone(),
            lease_ms: core.config.lease_ms,
        };
        let (appended, lease) = match store.begin_reply(&session_id, user, &start).await? {
            Begin::Started { appended, lease } => (appended, lease),
            Begin::Busy => return Err(ChatError::Busy),
        };
        let accepted = ChatEvent::Accepted {
            message_id: appended.message.id.clone(),
            duplicate: appended.duplicate,
        };
        let release = || async {
            if let Err(e) = store.finish_reply(&lease, None, None).await {
                tracing::warn!(session = %session_id, error = %e, "lease not released; it expires by itself");
            }
        };
        let history = match store.messages(&session_id).await {
            Ok(h) => h,
            Err(e) => {
                release().await;
                return Ok(ChatStream::refused(accepted, e.into()));
            }
        };
        let Some(turns) = turns_for(&history, &appended.message.id) else {
            // Answered on another replica between the check above and the lease.
            release().await;
            return Ok(ChatStream::ended(accepted));
        };

        let request = GenerateRequest {
            system: core.system_prompt.clone(),
            turns,
            options,
        };
        let submitted = Instant::now();
        let stream = match core.engine.submit(request) {
            Ok(s) => s,
            Err(e) => {
                release().await;
                return Ok(ChatStream::refused(accepted, e.into()));
            }
        };
        let response_id = lease.response_id.clone();
        // Subscribed before the reply task runs, so this watch misses nothing and needs no log.
        core.hub.open_local(&response_id);
        let watch = core.hub.local_watch(&response_id, &session_id);
        let cancel = stream.cancel.clone();
        core.local_replies
            .lock()
            .expect("local replies poisoned")
            .insert(response_id.clone(), (session_id.clone(), cancel.clone()));
        let task = reply::Reply {
            core: core.clone(),
            lease,
            stream,
            submitted,
        };
        core.replies.spawn(task.run());
        let created = ChatEvent::Created {
            response_id,
            message_id: appended.message.id,
        };
        Ok(ChatStream {
            queued: VecDeque::from([accepted, created]),
            watch: Some(watch),
            orphan: (!core.config.finish_orphaned_replies).then(|| cancel.drop_guard()),
        })
    }

    /// A reply to a whole conversation that is not stored: no session, no lease. The reply is
    /// cancelled when the returned stream is dropped before its end.
    pub async fn complete(&self, owner: &str, conversation: ValidConversation) -> Result<ChatStream, ChatError> {
        let core = &self.core;
        if core.shutdown.is_cancelled() {
            return Err(ChatError::ShuttingDown);
        }
        core.quotas.key_message(owner).await?;
        let request = GenerateRequest {
            system: conversation.system.unwrap_or_else(|| core.system_prompt.clone()),
            turns: conversation.turns,
            options: conversation.options,
        };
        let submitted = Instant::now();
        let stream = core.engine.submit(request)?;
        let response_id = format!("resp_{}", uuid::Uuid::new_v4().simple());
        core.hub.open_local(&response_id);
        let watch = core.hub.local_watch(&response_id, "");
        let cancel = stream.cancel.clone();
        core.local_replies
            .lock()
            .expect("local replies poisoned")
            .insert(response_id.clone(), (String::new(), cancel.clone()));
        core.replies
            .spawn(reply::run_unstored(core.clone(), response_id, stream, submitted));
        Ok(ChatStream {
            queued: VecDeque::new(),
            watch: Some(watch),
            orphan: Some(cancel.drop_guard()),
        })
    }

    /// Stops a running reply of one of `owner`'s sessions, on whichever replica generates it.
    /// Its watchers get `Done` with status `cancelled`.
    pub async fn cancel(&self, owner: &str, response_id: &str) -> Result<(), ChatError> {
        let not_found = || ChatError::ResponseNotFound(response_id.to_owned());
        let local = self
            .core
            .local_replies
            .lock()
            .expect("local replies poisoned")
            .get(response_id)
            .cloned();
        if let Some((session_id, token)) = local {
            self.owned_response(owner, &session_id, response_id).await?;
            token.cancel();
            return Ok(());
        }
        let store = &self.core.store;
        let log = store.reply_log(response_id).await?.ok_or_else(not_found)?;
        self.owned_response(owner, &log.session_id, response_id).await?;
        if store.request_cancel(&log.session_id, response_id).await? {
            Ok(())
        } else {
            Err(not_found())
        }
    }

    /// Refuses new replies, lets running ones finish for up to `grace`, then cancels the rest
    /// and waits for them to be stored.
    pub async fn drain(&self, grace: Duration) {
        let core = &self.core;
        core.shutdown.cancel();
        core.replies.close();
        if tokio::time::timeout(grace, core.replies.wait()).await.is_err() {
            for (_, token) in core.local_replies.lock().expect("local replies poisoned").values() {
                token.cancel();
            }
            core.replies.wait().await;
        }
    }

    /// As [`Chat::owned`] for a response of `session_id`: another owner's response reads as not
    /// found; a store that does not answer stays a store error.
    async fn owned_response(&self, owner: &str, session_id: &str, response_id: &str) -> Result<(), ChatError> {
        match self.owned(owner, session_id).await {
            Err(ChatError::SessionNotFound(_)) => Err(ChatError::ResponseNotFound(response_id.to_owned())),
            other => other.map(|_| ()),
        }
    }

    /// Checks that `session_id` exists and belongs to `owner`. Another owner's session reads as
    /// not found, so ids cannot be probed.
    async fn owned(&self, owner: &str, session_id: &str) -> Result<SessionInfo, ChatError> {
        let info = self.core.store.get(session_id).await?;
        if info.owner != owner {
            return Err(ChatError::SessionNotFound(session_id.to_owned()));
        }
        Ok(info)
    }
}

impl ChatStream {
    fn ended(event: ChatEvent) -> Self {
        Self {
            queued: VecDeque::from([event]),
            watch: None,
            orphan: None,
        }
    }

    fn refused(accepted: ChatEvent, error: ChatError) -> Self {
        Self {
            queued: VecDeque::from([accepted, ChatEvent::Refused(Arc::new(error))]),
            watch: None,
            orphan: None,
        }
    }
}

/// The conversation up to and including the user message `message_id`, or `None` when it is
/// unknown or already answered (a completed or cancelled reply follows it; a failed one does not
/// count). Cancelled and failed replies are left out of the prompt.
fn turns_for(history: &[StoredMessage], message_id: &str) -> Option<Vec<ChatTurn>> {
    let index = history.iter().position(|m| m.id == message_id)?;
    let answered = history[index + 1..]
        .iter()
        .any(|m| m.role == Role::Assistant && m.status != Some(MessageStatus::Failed));
    if answered {
        return None;
    }
    Some(
        history[..=index]
            .iter()
            .filter(|m| !matches!(m.status, Some(MessageStatus::Cancelled | MessageStatus::Failed)))
            .map(|m| ChatTurn {
                role: m.role.as_str().to_owned(),
                content: m.content.clone(),
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: Role, content: &str, status: Option<MessageStatus>) -> StoredMessage {
        StoredMessage::new(role, content.into(), status, None)
    }

    #[test]
    fn turns_skip_cancelled_and_failed_replies_and_detect_answered_resends() {
        let h = vec![
            msg(Role::User, "a", None),
            msg(Role::Assistant, "partial", Some(MessageStatus::Cancelled)),
            msg(Role::User, "b", None),
            msg(Role::Assistant, "", Some(MessageStatus::Failed)),
        ];
        let turns = turns_for(&h, &h[2].id).unwrap();
        assert_eq!(
            turns.iter().map(|t| t.content.as_str()).collect::<Vec<_>>(),
            vec!["a", "b"],
            "a failed reply does not answer its message and stays out of the prompt"
        );
        // The first message was answered (even if only partially): a resend generates nothing.
        assert!(turns_for(&h, &h[0].id).is_none());
        assert!(turns_for(&h, "unknown").is_none());
    }
}
