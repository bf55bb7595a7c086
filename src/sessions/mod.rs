//! Conversation sessions: ordered message history, ownership and expiry.
//!
//! Sessions live behind [`SessionStore`] so any replica can serve any session: Redis in
//! production ([`redis`]), an in-process map as the zero-setup default ([`memory`]). Both pass
//! the same contract tests (`tests/store_contract.rs`).
//!
//! Appends are idempotent per `client_message_id`: resending a message returns the stored one
//! instead of storing it twice.
//!
//! Stores also coordinate replies across replicas ([`lease`]): a session lease with a fencing
//! token so one replica at a time answers a session, a capped log of each reply's newest events
//! that any replica can read and tail, and the records that let a live replica end the reply of
//! a dead one. The Redis store sends its commands on a connection that is replaced after a
//! timeout (`commands`), so a partition that drops packets does not leave it stuck.

mod commands;
pub mod lease;
pub mod memory;
pub mod redis;

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

pub use self::lease::{
    Begin, Lease, LeaseState, LoggedEvent, ReplyLog, ReplyStart, RunningReply, TailBatch, TailCursor,
};
pub use self::memory::MemoryStore;
pub use self::redis::RedisStore;

/// Who wrote a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    User,
    Assistant,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// How an assistant message ended; user messages have none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageStatus {
    Completed,
    /// Stopped on request; holds the text unmasked so far.
    Cancelled,
    /// Its generator was lost before it ended; holds no text and does not answer the message.
    Failed,
}

impl MessageStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            MessageStatus::Completed => "completed",
            MessageStatus::Cancelled => "cancelled",
            MessageStatus::Failed => "failed",
        }
    }
}

/// A message as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredMessage {
    pub id: String,
    pub role: Role,
    pub content: String,
    pub created_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<MessageStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_message_id: Option<String>,
    /// An assistant reply that handed the conversation to a person.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub handover: bool,
}

impl StoredMessage {
    /// A new message with a fresh id, stamped now.
    pub fn new(role: Role, content: String, status: Option<MessageStatus>, client_message_id: Option<String>) -> Self {
        Self {
            id: format!("msg_{}", uuid::Uuid::new_v4().simple()),
            role,
            content,
            created_at: Utc::now(),
            status,
            client_message_id,
            handover: false,
        }
    }
}

/// A session's header.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionInfo {
    pub id: String,
    /// Name of the API key that created it ("anonymous" with auth off).
    pub owner: String,
    pub created_at: DateTime<Utc>,
    pub metadata: serde_json::Value,
}

/// Result of an append.
#[derive(Debug, Clone, PartialEq)]
pub struct Appended {
    /// The stored message: the new one, or the earlier one with the same `client_message_id`.
    pub message: StoredMessage,
    pub duplicate: bool,
}

/// Errors from session stores.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("session {0} does not exist or has expired")]
    NotFound(String),
    #[error("session store unavailable: {0}")]
    Unavailable(String),
    #[error("session store returned corrupt data: {0}")]
    Corrupt(String),
}

impl From<::redis::RedisError> for StoreError {
    fn from(e: ::redis::RedisError) -> Self {
        StoreError::Unavailable(e.to_string())
    }
}

/// Where sessions live.
#[async_trait]
pub trait SessionStore: Send + Sync {
    /// Creates an empty session owned by `owner`.
    async fn create(&self, owner: &str, metadata: serde_json::Value) -> Result<SessionInfo, StoreError>;
    /// The session's header, refreshing its expiry.
    async fn get(&self, id: &str) -> Result<SessionInfo, StoreError>;
    /// All messages, oldest first.
    async fn messages(&self, id: &str) -> Result<Vec<StoredMessage>, StoreError>;
    /// Keeps a one-time ticket (by its digest) for `owner` for `ttl`.
    async fn put_ticket(&self, digest: &str, owner: &str, ttl: Duration) -> Result<(), StoreError>;
    /// Takes a ticket: its owner the first time, `None` afterwards, after expiry or when unknown.
    async fn take_ticket(&self, digest: &str) -> Result<Option<String>, StoreError>;
    /// Takes a slot of the `max` that `scope` (a key or a client address) shares across
    /// replicas, for `holder`, until `ttl` from now; false when all are held (taking its own
    /// slot again is not another one). Slots whose holder
    /// stopped renewing them (a replica that died) are free again after their `ttl`.
    async fn take_slot(&self, scope: &str, holder: &str, max: usize, ttl: Duration) -> Result<bool, StoreError>;
    /// Extends each held `(scope, holder)` slot to `ttl` from now (holding it again if it lapsed).
    async fn renew_slots(&self, slots: &[(String, String)], ttl: Duration) -> Result<(), StoreError>;
    /// Frees a slot; freeing one not held does nothing.
    async fn release_slot(&self, scope: &str, holder: &str) -> Result<(), StoreError>;
    /// Counts one event against `scope`'s rate, shared across replicas: `per_minute` on average,
    /// up to `burst` at once. `None` when it is allowed, else how long until one would be.
    async fn take_rate(&self, scope: &str, per_minute: u32, burst: u32) -> Result<Option<Duration>, StoreError>;
    /// Replaces the session's metadata; `NotFound` when the session is gone.
    async fn set_metadata(&self, id: &str, metadata: serde_json::Value) -> Result<(), StoreError>;
    /// Appends `message` unless one with the same `client_message_id` exists; refreshes expiry.
    async fn append(&self, id: &str, message: StoredMessage) -> Result<Appended, StoreError>;
    /// Checks the store answers (for `/ready`).
    async fn ping(&self) -> Result<(), StoreError>;
    /// The session `alias` names (an outside system's conversation id), created for `owner` with
    /// `metadata` on first use. The alias lives as long as its session.
    async fn aliased(&self, alias: &str, owner: &str, metadata: serde_json::Value) -> Result<SessionInfo, StoreError>;

    /// In one atomic step: unless the session has a running reply, appends the user's `message`
    /// (idempotently, as [`SessionStore::append`]) and grants the session lease for `start`.
    async fn begin_reply(
        &self,
        session_id: &str,
        message: StoredMessage,
        start: &ReplyStart,
    ) -> Result<Begin, StoreError>;
    /// Extends a held lease by `lease_ms` from now.
    async fn renew_lease(&self, lease: &Lease, lease_ms: u64) -> Result<LeaseState, StoreError>;
    /// Appends `event` to the reply's log if `lease` is still held.
    async fn log_event(&self, lease: &Lease, event: &LoggedEvent) -> Result<LeaseState, StoreError>;
    /// Ends the reply if `lease` is still held: appends `message` (when given) to the history and
    /// `event` (when given) to the log, keeps the log for `store.reply_log_ttl_secs` and releases
    /// the lease.
    async fn finish_reply(
        &self,
        lease: &Lease,
        message: Option<StoredMessage>,
        event: Option<&LoggedEvent>,
    ) -> Result<LeaseState, StoreError>;
    /// The session's running reply, if one runs or awaits recovery.
    async fn running_reply(&self, session_id: &str) -> Result<Option<RunningReply>, StoreError>;
    /// Asks the generator of a running reply to stop; false when the reply is not running.
    async fn request_cancel(&self, session_id: &str, response_id: &str) -> Result<bool, StoreError>;
    /// The newest events of a response and its session; `None` once the log expired (or never
    /// existed).
    async fn reply_log(&self, response_id: &str) -> Result<Option<ReplyLog>, StoreError>;
    /// Waits up to `block` for events after the cursors; returns at once when some are there.
    async fn tail(&self, cursors: &[TailCursor], block: Duration) -> Result<Vec<TailBatch>, StoreError>;
    /// Running replies whose lease has expired: their generator died or stalled.
    async fn expired_replies(&self, limit: usize) -> Result<Vec<RunningReply>, StoreError>;
    /// Ends `reply` for its lost generator, if its lease is still expired and it is still the
    /// same reply: appends `message` and `event` as [`SessionStore::finish_reply`] does. Returns
    /// whether it did (another replica may have been first).
    async fn recover_reply(
        &self,
        reply: &RunningReply,
        message: StoredMessage,
        event: &LoggedEvent,
    ) -> Result<bool, StoreError>;

    /// Shares one timing-feed record (JSON) with every replica on this store. `Ok(false)`: the
    /// store is not shared (the memory store), so the caller delivers it in-process.
    async fn publish_stats(&self, _record: &str) -> Result<bool, StoreError> {
        Ok(false)
    }
    /// Waits up to `block` for timing-feed records published after `cursor` (`None`: after
    /// now); returns them with the cursor to pass next. `Ok(None)`: the store is not shared.
    async fn read_stats(&self, _cursor: Option<&str>, _block: Duration) -> Result<Option<StatsBatch>, StoreError> {
        Ok(None)
    }
}

/// Timing-feed records read from a shared store, and where the next read starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatsBatch {
    pub records: Vec<String>,
    pub cursor: String,
}

/// How long things live in a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Sessions expire after this long without activity.
    pub session_ttl: Duration,
    /// A reply's log is kept this long after the reply ended.
    pub reply_log_ttl: Duration,
    /// Events kept per reply log (the newest).
    pub reply_log_events: usize,
}

impl Retention {
    pub fn of(config: &crate::config::StoreConfig) -> Self {
        Self {
            session_ttl: Duration::from_secs(config.session_ttl_secs),
            reply_log_ttl: Duration::from_secs(config.reply_log_ttl_secs),
            reply_log_events: config.reply_log_events,
        }
    }
}

/// Opens the store named by `store.url`.
pub async fn open(config: &crate::config::StoreConfig) -> Result<std::sync::Arc<dyn SessionStore>, StoreError> {
    let retention = Retention::of(config);
    if config.url == "memory" {
        Ok(std::sync::Arc::new(MemoryStore::new(retention)))
    } else {
        let store = RedisStore::connect(
            &config.url,
            &config.key_prefix,
            retention,
            Duration::from_millis(config.connect_timeout_ms),
            Duration::from_millis(config.command_timeout_ms),
        )
        .await?;
        Ok(std::sync::Arc::new(store))
    }
}
