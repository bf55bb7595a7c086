//! Subsystem errors to wire errors: the one place codes are chosen, so the protocol, the
//! metrics label and the docs agree.

use crate::engine::EngineError;
use crate::protocol::{ErrorCode, WireError};
use crate::sessions::StoreError;

pub(super) fn from_store(e: &StoreError) -> WireError {
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

pub(super) fn from_engine(e: &EngineError) -> WireError {
    let code = match e {
        EngineError::ContextOverflow { .. } => ErrorCode::ContextOverflow,
        EngineError::Overloaded { .. } => ErrorCode::Overloaded,
        EngineError::Stopped => ErrorCode::ShuttingDown,
        EngineError::Load { .. }
        | EngineError::NotDiffusion(_)
        | EngineError::NoMaskToken
        | EngineError::Template(_)
        | EngineError::Decode(_) => ErrorCode::Internal,
    };
    WireError::new(code, e.to_string())
}
