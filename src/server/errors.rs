//! Subsystem errors to wire errors: the one place codes are chosen, so the protocol, the
//! metrics label and the docs agree.

use super::auth::Refused;
use crate::chat::{ChatError, FailureKind, ReplyFailure, ValidationError};
use crate::engine::EngineError;
use crate::protocol::{ErrorCode, WireError};
use crate::quotas::QuotaError;
use crate::sessions::StoreError;

pub(super) fn from_chat(e: &ChatError) -> WireError {
    match e {
        ChatError::Invalid(v) => from_validation(v),
        ChatError::SessionNotFound(_) => WireError::new(ErrorCode::SessionNotFound, e.to_string()),
        ChatError::ResponseNotFound(_) => WireError::new(ErrorCode::ResponseNotFound, e.to_string()),
        ChatError::Busy => WireError::new(
            ErrorCode::Busy,
            "a reply is still running in this session; wait for response.done or send response.cancel",
        ),
        ChatError::ShuttingDown => WireError::new(ErrorCode::ShuttingDown, "the server is shutting down; reconnect"),
        ChatError::Quota(q) => from_quota(q),
        ChatError::Store(s) => from_store(s),
        ChatError::Engine(e) => from_engine(e),
    }
}

/// A shared quota's refusal: a rate is `rate_limited` (with when to retry), a full connection
/// quota `overloaded`, as the per-process limits are.
pub(super) fn from_quota(e: &QuotaError) -> WireError {
    match e {
        QuotaError::RateLimited { .. } => {
            WireError::new(ErrorCode::RateLimited, e.to_string()).with_retry_after(e.retry_after())
        }
        QuotaError::Full { .. } => WireError::new(ErrorCode::Overloaded, e.to_string()),
        QuotaError::Store(s) => from_store(s),
    }
}

/// The errors of the port itself, before anything reaches the conversation core.
pub(super) fn from_refused(refused: Refused) -> WireError {
    WireError::new(ErrorCode::Unauthorized, refused.message())
}

pub(super) fn too_many_connections() -> WireError {
    WireError::new(ErrorCode::Overloaded, "too many open connections; try again later")
}

pub(super) fn binary_frame() -> WireError {
    WireError::new(
        ErrorCode::UnsupportedFrame,
        "binary frames are not supported; send JSON text frames",
    )
}

pub(super) fn frame_too_large(bytes: usize, limit: usize) -> WireError {
    WireError::new(
        ErrorCode::MessageTooLarge,
        format!("frame of {bytes} bytes exceeds the limit of {limit} bytes"),
    )
}

pub(super) fn rate_limited(per_minute: u32, retry_after: std::time::Duration) -> WireError {
    WireError::new(
        ErrorCode::RateLimited,
        format!("more than {per_minute} messages per minute on this connection"),
    )
    .with_retry_after(Some(retry_after))
}

/// `Retry-After` (whole seconds, rounded up; 1 when the wait is not known).
pub(super) fn retry_after_header(retry_after_ms: Option<u64>) -> axum::http::HeaderValue {
    axum::http::HeaderValue::from(retry_after_ms.map_or(1, |ms| ms.div_ceil(1000).max(1)))
}

/// A request the HTTP front end could not read.
pub(super) fn invalid_request(code: ErrorCode, message: impl Into<String>) -> WireError {
    WireError::new(code, message)
}

/// A reply that ended without its terminal event.
pub(super) fn reply_vanished() -> WireError {
    WireError::new(ErrorCode::Internal, "the reply ended without a result")
}

pub(super) fn from_validation(e: &ValidationError) -> WireError {
    let code = match e {
        ValidationError::ContentTooLong { .. } => ErrorCode::MessageTooLarge,
        ValidationError::EmptyContent
        | ValidationError::Option { .. }
        | ValidationError::NoUserMessage
        | ValidationError::Role { .. } => ErrorCode::InvalidField,
    };
    WireError::new(code, e.to_string())
}

/// A store failure while issuing or redeeming a ticket (no session is involved).
pub(super) fn from_ticket_store(e: &StoreError) -> WireError {
    match e {
        StoreError::Unavailable(_) => from_store(e),
        other => WireError::new(ErrorCode::Internal, format!("ticket not stored: {other}")),
    }
}

fn from_store(e: &StoreError) -> WireError {
    match e {
        StoreError::NotFound(id) => WireError::new(
            ErrorCode::SessionNotFound,
            format!("session {id} does not exist or has expired"),
        ),
        StoreError::Unavailable(_) => WireError::new(
            ErrorCode::StoreUnavailable,
            "the session store is unavailable; try again shortly",
        ),
        StoreError::Corrupt(m) => WireError::new(ErrorCode::Internal, format!("session data is corrupt: {m}")),
    }
}

fn from_engine(e: &EngineError) -> WireError {
    let code = match e {
        EngineError::ContextOverflow { .. } => ErrorCode::ContextOverflow,
        // A full wait queue or every conversation cache in use: the client may retry.
        EngineError::Overloaded(_) => ErrorCode::Overloaded,
        EngineError::Stopped => ErrorCode::ShuttingDown,
        EngineError::Load { .. }
        | EngineError::NotDiffusion(_)
        | EngineError::Diffusion(_)
        | EngineError::NoMaskToken
        | EngineError::Template(_)
        | EngineError::Decode(_) => ErrorCode::Internal,
    };
    WireError::new(code, e.to_string())
}

pub(super) fn from_failure(f: &ReplyFailure) -> WireError {
    let code = match f.kind {
        FailureKind::GeneratorLost => ErrorCode::GeneratorLost,
        FailureKind::ContextOverflow => ErrorCode::ContextOverflow,
        FailureKind::Overloaded => ErrorCode::Overloaded,
        FailureKind::StoreUnavailable => ErrorCode::StoreUnavailable,
        FailureKind::ShuttingDown => ErrorCode::ShuttingDown,
        FailureKind::Internal => ErrorCode::Internal,
    };
    WireError::new(code, f.message.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Capacity;

    #[test]
    fn every_capacity_error_is_overloaded() {
        for capacity in [Capacity::Queue { waiting: 64 }, Capacity::Caches { caches: 8 }] {
            assert_eq!(
                from_engine(&EngineError::Overloaded(capacity)).code,
                ErrorCode::Overloaded
            );
        }
        assert_eq!(from_engine(&EngineError::Decode("x".into())).code, ErrorCode::Internal);
    }
}
