//! Conversation sessions: ordered message history, ownership and expiry.
//!
//! Sessions live behind [`SessionStore`] so any replica can serve any session: Redis in
//! production ([`redis`]), an in-process map as the zero-setup default ([`memory`]). Both pass
//! the same contract tests (`tests/store_contract.rs`).
//!
//! Appends are idempotent per `client_message_id`: resending a message returns the stored one
//! instead of storing it twice.

pub mod memory;
pub mod redis;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

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
    Cancelled,
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
    /// Appends `message` unless one with the same `client_message_id` exists; refreshes expiry.
    async fn append(&self, id: &str, message: StoredMessage) -> Result<Appended, StoreError>;
    /// Checks the store answers (for `/ready`).
    async fn ping(&self) -> Result<(), StoreError>;
}

/// Opens the store named by `store.url`.
pub async fn open(config: &crate::config::StoreConfig) -> Result<std::sync::Arc<dyn SessionStore>, StoreError> {
    let ttl = std::time::Duration::from_secs(config.session_ttl_secs);
    if config.url == "memory" {
        Ok(std::sync::Arc::new(MemoryStore::new(ttl)))
    } else {
        let store = RedisStore::connect(
            &config.url,
            &config.key_prefix,
            ttl,
            std::time::Duration::from_millis(config.connect_timeout_ms),
            std::time::Duration::from_millis(config.command_timeout_ms),
        )
        .await?;
        Ok(std::sync::Arc::new(store))
    }
}
