//! The types of reply coordination: the session lease that lets one replica at a time generate a
//! session's reply, and the reply log every replica can read it from.
//!
//! A lease carries a fencing token (a per-session counter bumped on every grant). Every write of a
//! reply names its lease; the store refuses a write whose token is not the live lease's, so a
//! replica that stalled past its lease cannot write late. The reply log holds the newest events of
//! one response as opaque JSON (the chat layer owns their shape) with a numbered `seq`.

use chrono::{DateTime, Utc};

use super::Appended;

/// A granted session lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub session_id: String,
    pub response_id: String,
    /// The fencing token: strictly increasing per session.
    pub token: u64,
}

/// What a fenced write or a renewal found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseState {
    /// The lease is ours; the write was done.
    Held,
    /// The lease is ours and someone asked for the reply to stop; the write was done.
    CancelRequested,
    /// The lease expired or another holder has it; nothing was written.
    Lost,
}

/// A reply to start: the user message it answers and who generates it.
#[derive(Debug, Clone)]
pub struct ReplyStart {
    pub response_id: String,
    /// Which replica generates it (recorded for operators).
    pub replica: String,
    pub lease_ms: u64,
}

/// The outcome of [`super::SessionStore::begin_reply`].
#[derive(Debug, Clone)]
pub enum Begin {
    /// The user message is stored (or was already) and the lease is ours.
    Started { appended: Appended, lease: Lease },
    /// Another reply of the session runs (or a dead one awaits recovery): nothing was stored.
    Busy,
}

/// A reply that is running, or whose generator died before it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunningReply {
    pub session_id: String,
    pub response_id: String,
    /// The user message it answers.
    pub message_id: String,
    pub token: u64,
    pub replica: String,
    pub started_at: DateTime<Utc>,
}

/// One event of a reply log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedEvent {
    pub seq: u64,
    pub payload: String,
}

/// The newest events of a response and where to read on from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyLog {
    pub session_id: String,
    /// Oldest first; at most the two newest events (each revision carries the whole reply, so
    /// the newest revision and the terminal event are all a reader needs).
    pub newest: Vec<LoggedEvent>,
    /// Opaque position after `newest`, for [`super::SessionStore::tail`].
    pub cursor: String,
}

/// Where a tail reads one response from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TailCursor {
    pub session_id: String,
    pub response_id: String,
    pub cursor: String,
}

/// Events a tail read found for one response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TailBatch {
    pub response_id: String,
    pub events: Vec<LoggedEvent>,
    /// The position after `events`.
    pub cursor: String,
}
