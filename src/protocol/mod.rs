//! The wire protocol of `/v1/chat`: JSON text frames tagged by `type` (see `docs/protocol.md`).
//!
//! [`parse`] turns a frame into a [`ClientEvent`] or a typed [`WireError`] that still carries the
//! client's `event_id`, so a client can match every error to what it sent. Nothing here touches
//! sessions or the engine: the conversation core (`chat`) validates what a frame carries, and the
//! reply types it reports (usage, timings, status) are written here as they are.

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use crate::chat::events::{ReplyStatus as DoneStatus, Timings, Usage};
pub use crate::chat::MessageOptions;

/// Stable error codes; clients may branch on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    InvalidJson,
    UnknownType,
    InvalidField,
    MessageTooLarge,
    UnsupportedFrame,
    Unauthorized,
    SessionNotFound,
    ResponseNotFound,
    Busy,
    Overloaded,
    RateLimited,
    ContextOverflow,
    StoreUnavailable,
    GeneratorLost,
    ShuttingDown,
    Internal,
}

impl ErrorCode {
    /// The code as it appears on the wire and in the `code` label of the error counter.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::InvalidField => "invalid_field",
            ErrorCode::MessageTooLarge => "message_too_large",
            ErrorCode::UnsupportedFrame => "unsupported_frame",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::SessionNotFound => "session_not_found",
            ErrorCode::ResponseNotFound => "response_not_found",
            ErrorCode::Busy => "busy",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::ContextOverflow => "context_overflow",
            ErrorCode::StoreUnavailable => "store_unavailable",
            ErrorCode::GeneratorLost => "generator_lost",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::Internal => "internal",
        }
    }
}

/// The body of an `error` event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct WireError {
    pub code: ErrorCode,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
    /// On `rate_limited`: how long until the next try would be allowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

impl WireError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            event_id: None,
            retry_after_ms: None,
        }
    }

    pub fn with_retry_after(mut self, wait: Option<std::time::Duration>) -> Self {
        self.retry_after_ms = wait.map(|w| w.as_millis().max(1) as u64);
        self
    }

    pub fn with_event_id(mut self, event_id: Option<String>) -> Self {
        self.event_id = event_id;
        self
    }
}

/// A parsed client frame.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    pub event_id: Option<String>,
    pub event: ClientEvent,
}

/// What clients send.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientEvent {
    SessionCreate {
        metadata: Value,
    },
    SessionResume {
        session_id: String,
        after: Option<String>,
    },
    /// Top-level metadata keys to set (a `null` value removes the key).
    SessionUpdate {
        session_id: String,
        metadata: serde_json::Map<String, Value>,
    },
    MessageCreate(MessageCreate),
    ResponseCancel {
        response_id: String,
    },
    ResponseResume {
        response_id: String,
        after_revision: Option<usize>,
    },
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct MessageCreate {
    pub session_id: String,
    pub content: String,
    #[serde(default)]
    pub client_message_id: Option<String>,
    #[serde(default)]
    pub options: MessageOptions,
}

#[derive(Deserialize)]
struct SessionCreateWire {
    #[serde(default)]
    metadata: Option<serde_json::Map<String, Value>>,
}

#[derive(Deserialize)]
struct SessionResumeWire {
    session_id: String,
    #[serde(default)]
    after: Option<String>,
}

#[derive(Deserialize)]
struct SessionUpdateWire {
    session_id: String,
    metadata: serde_json::Map<String, Value>,
}

#[derive(Deserialize)]
struct ResponseCancelWire {
    response_id: String,
}

#[derive(Deserialize)]
struct ResponseResumeWire {
    response_id: String,
    #[serde(default)]
    after_revision: Option<usize>,
}

/// Parses one text frame.
pub fn parse(text: &str) -> Result<Envelope, WireError> {
    let value: Value = serde_json::from_str(text)
        .map_err(|e| WireError::new(ErrorCode::InvalidJson, format!("frame is not valid JSON: {e}")))?;
    let Value::Object(map) = &value else {
        return Err(WireError::new(ErrorCode::InvalidJson, "frame must be a JSON object"));
    };
    let event_id = match map.get("event_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(WireError::new(ErrorCode::InvalidField, "`event_id` must be a string")),
    };
    let fail = |code, message: String| WireError::new(code, message).with_event_id(event_id.clone());
    let kind = match map.get("type") {
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(fail(ErrorCode::InvalidField, "`type` must be a string".into())),
        None => return Err(fail(ErrorCode::InvalidField, "missing field `type`".into())),
    };
    fn fields<T: for<'de> Deserialize<'de>>(kind: &str, value: Value) -> Result<T, String> {
        serde_json::from_value(value).map_err(|e| format!("{kind}: {e}"))
    }
    let invalid = |m| fail(ErrorCode::InvalidField, m);
    let event = match kind.as_str() {
        "session.create" => {
            let w: SessionCreateWire = fields(&kind, value).map_err(invalid)?;
            ClientEvent::SessionCreate { metadata: Value::Object(w.metadata.unwrap_or_default()) }
        }
        "session.resume" => {
            let w: SessionResumeWire = fields(&kind, value).map_err(invalid)?;
            ClientEvent::SessionResume { session_id: w.session_id, after: w.after }
        }
        "session.update" => {
            let w: SessionUpdateWire = fields(&kind, value).map_err(invalid)?;
            ClientEvent::SessionUpdate { session_id: w.session_id, metadata: w.metadata }
        }
        "message.create" => ClientEvent::MessageCreate(fields(&kind, value).map_err(invalid)?),
        "response.cancel" => {
            let w: ResponseCancelWire = fields(&kind, value).map_err(invalid)?;
            ClientEvent::ResponseCancel { response_id: w.response_id }
        }
        "response.resume" => {
            let w: ResponseResumeWire = fields(&kind, value).map_err(invalid)?;
            ClientEvent::ResponseResume { response_id: w.response_id, after_revision: w.after_revision }
        }
        other => {
            return Err(fail(
                ErrorCode::UnknownType,
                format!(
                    "unknown event type {other:?}; expected session.create, session.resume, session.update, message.create, response.cancel or response.resume"
                ),
            ))
        }
    };
    Ok(Envelope { event_id, event })
}

/// A message in `session.resumed`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireMessage {
    pub id: String,
    pub role: String,
    pub content: String,
    pub created_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// An assistant reply that handed the conversation to a person.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub handover: bool,
}

/// The reply still running when a session is resumed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireRunning {
    pub response_id: String,
    /// The user message it answers.
    pub message_id: String,
    /// The newest revision so far; 0 (with empty `text` and no `masked`) before the first.
    pub revision: usize,
    pub text: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub masked: Option<usize>,
}

/// What the server sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum ServerEvent {
    #[serde(rename = "session.created")]
    SessionCreated {
        session_id: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        event_id: Option<String>,
    },
    #[serde(rename = "session.resumed")]
    SessionResumed {
        session_id: String,
        /// What `session.create` and `session.update` stored.
        metadata: Value,
        messages: Vec<WireMessage>,
        /// The reply still running; its remaining events follow on this connection.
        #[serde(skip_serializing_if = "Option::is_none")]
        running: Option<WireRunning>,
        #[serde(skip_serializing_if = "Option::is_none")]
        event_id: Option<String>,
    },
    #[serde(rename = "session.updated")]
    SessionUpdated {
        session_id: String,
        /// The session's whole metadata after the update.
        metadata: Value,
        #[serde(skip_serializing_if = "Option::is_none")]
        event_id: Option<String>,
    },
    #[serde(rename = "response.resumed")]
    ResponseResumed {
        response_id: String,
        session_id: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        event_id: Option<String>,
    },
    #[serde(rename = "message.accepted")]
    MessageAccepted {
        session_id: String,
        message_id: String,
        /// True when a message with the same `client_message_id` was stored before.
        duplicate: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        event_id: Option<String>,
    },
    #[serde(rename = "response.created")]
    ResponseCreated {
        response_id: String,
        session_id: String,
        message_id: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        event_id: Option<String>,
    },
    #[serde(rename = "response.revision")]
    ResponseRevision {
        response_id: String,
        revision: usize,
        step: usize,
        text: String,
        masked: usize,
    },
    #[serde(rename = "response.done")]
    ResponseDone {
        response_id: String,
        status: DoneStatus,
        text: String,
        usage: Usage,
        timings: Timings,
        /// The reply hands the conversation to a person.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        handover: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<WireError>,
    },
    #[serde(rename = "error")]
    Error { error: WireError },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_client_event() {
        let e = parse(r#"{"type":"session.create","event_id":"e1"}"#).unwrap();
        assert_eq!(e.event_id.as_deref(), Some("e1"));
        assert!(matches!(e.event, ClientEvent::SessionCreate { .. }));
        let e = parse(r#"{"type":"message.create","session_id":"s","content":"hi","options":{"steps":4}}"#).unwrap();
        let ClientEvent::MessageCreate(m) = e.event else {
            panic!()
        };
        assert_eq!(m.options.steps, Some(4));
        let e = parse(r#"{"type":"response.cancel","response_id":"r"}"#).unwrap();
        assert_eq!(
            e.event,
            ClientEvent::ResponseCancel {
                response_id: "r".into()
            }
        );
        let e = parse(r#"{"type":"response.resume","response_id":"r","after_revision":3}"#).unwrap();
        assert_eq!(
            e.event,
            ClientEvent::ResponseResume {
                response_id: "r".into(),
                after_revision: Some(3)
            }
        );
        let e = parse(r#"{"type":"session.resume","session_id":"s","after":"m1"}"#).unwrap();
        assert_eq!(
            e.event,
            ClientEvent::SessionResume {
                session_id: "s".into(),
                after: Some("m1".into())
            }
        );
        let e =
            parse(r#"{"type":"session.update","session_id":"s","metadata":{"user":{"id":"u1"},"page":null}}"#).unwrap();
        let ClientEvent::SessionUpdate { session_id, metadata } = e.event else {
            panic!()
        };
        assert_eq!(session_id, "s");
        assert_eq!(metadata["user"]["id"], "u1");
        assert!(metadata["page"].is_null());
    }

    #[test]
    fn errors_are_typed_and_keep_event_id() {
        assert_eq!(parse("{not json").unwrap_err().code, ErrorCode::InvalidJson);
        assert_eq!(parse("[1]").unwrap_err().code, ErrorCode::InvalidJson);
        let e = parse(r#"{"type":"nope","event_id":"x"}"#).unwrap_err();
        assert_eq!((e.code, e.event_id.as_deref()), (ErrorCode::UnknownType, Some("x")));
        let e = parse(r#"{"type":"message.create","event_id":"y","session_id":"s"}"#).unwrap_err();
        assert_eq!((e.code, e.event_id.as_deref()), (ErrorCode::InvalidField, Some("y")));
        assert!(e.message.contains("content"), "{}", e.message);
        let e = parse(r#"{"type":"message.create","session_id":"s","content":5}"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidField);
        let e = parse(r#"{"type":"message.create","session_id":"s","content":"a","options":{"bogus":1}}"#);
        assert_eq!(e.unwrap_err().code, ErrorCode::InvalidField);
        assert_eq!(parse(r#"{"event_id":"z"}"#).unwrap_err().code, ErrorCode::InvalidField);
        let e = parse(r#"{"type":"session.update","session_id":"s","metadata":[1]}"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidField);
    }

    #[test]
    fn server_events_serialize_with_type_tag() {
        let v = serde_json::to_value(ServerEvent::Error {
            error: WireError::new(ErrorCode::Busy, "x"),
        })
        .unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["code"], "busy");
        assert!(v["error"].get("event_id").is_none());
    }
}
