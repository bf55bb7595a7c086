//! Errors of the conversation core. Front ends turn them into their own wire errors in one place
//! each (`server/errors.rs` for the WebSocket protocol).

use super::validate::ValidationError;
use crate::engine::EngineError;
use crate::quotas::QuotaError;
use crate::sessions::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// Unknown, expired or another owner's session (the same answer for all three, so ids
    /// cannot be probed).
    #[error("session {0} does not exist or has expired")]
    SessionNotFound(String),
    #[error("no running or recent response {0}")]
    ResponseNotFound(String),
    #[error("a reply is still running in this session; wait for its end or cancel it")]
    Busy,
    #[error("the service is shutting down")]
    ShuttingDown,
    /// The key's shared message rate (`quotas.key_messages_per_minute`); nothing was stored.
    #[error(transparent)]
    Quota(#[from] QuotaError),
    #[error(transparent)]
    Store(StoreError),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

impl From<StoreError> for ChatError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(id) => ChatError::SessionNotFound(id),
            other => ChatError::Store(other),
        }
    }
}
