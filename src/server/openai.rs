//! The OpenAI-compatible HTTP front end: `POST /v1/chat/completions` (plain, and streamed as
//! server-sent events) and `GET /v1/models`, as OpenAI's client libraries speak them. A thin
//! translator over the conversation core, like the WebSocket front end.
//!
//! A diffusion reply is not written left to right, but an OpenAI stream only appends: the stream
//! sends the *settled prefix* of each revision (the text before its first masked position, which
//! no later step changes) as deltas, then the rest with `finish_reason`. With
//! `"dllm": {"revisions": true}` every chunk also carries the whole revision
//! (`dllm_revision: {revision, text, masked}`), which standard clients ignore.
//!
//! Stateless by default: the request carries the history and nothing is stored. The
//! `session_id` extension sends the last user message to a stored session instead, under the
//! same rules as the WebSocket front end (one reply per session, history in the store).

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, Stream};
use serde::Deserialize;
use serde_json::{json, Value};

use super::auth::authenticate;
use super::{errors, AppState};
use crate::chat::{
    ChatEvent, ChatStream, DoneEvent, MessageOptions, NewConversation, NewMessage, ReplyEvent, ReplyStatus, Usage,
};
use crate::engine::ChatTurn;
use crate::protocol::{ErrorCode, WireError};

#[derive(Debug, Deserialize)]
struct CompletionRequest {
    model: String,
    messages: Vec<RequestMessage>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    max_tokens: Option<usize>,
    #[serde(default)]
    max_completion_tokens: Option<usize>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    n: Option<u32>,
    /// Extension: answer within this stored session.
    #[serde(default)]
    session_id: Option<String>,
    /// Extension: diffusion settings.
    #[serde(default)]
    dllm: Option<DllmExtension>,
}

#[derive(Debug, Default, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DllmExtension {
    /// Every chunk carries the whole revision too.
    #[serde(default)]
    revisions: bool,
    /// Decode options as `message.create` takes them.
    #[serde(default)]
    options: Option<MessageOptions>,
}

#[derive(Debug, Deserialize)]
struct RequestMessage {
    role: String,
    content: Content,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

impl Content {
    fn text(self) -> Result<String, ApiError> {
        match self {
            Content::Text(t) => Ok(t),
            Content::Parts(parts) => parts
                .into_iter()
                .map(|p| match (p.kind.as_str(), p.text) {
                    ("text", Some(t)) => Ok(t),
                    (kind, _) => Err(ApiError::invalid(format!(
                        "content parts of type {kind:?} are not supported; send text"
                    ))),
                })
                .collect(),
        }
    }
}

/// An error in OpenAI's shape, with its status.
struct ApiError {
    status: StatusCode,
    kind: &'static str,
    code: String,
    message: String,
    retry_after_ms: Option<u64>,
}

impl ApiError {
    fn invalid(message: impl Into<String>) -> Self {
        Self::from_wire(errors::invalid_request(ErrorCode::InvalidField, message))
    }

    fn from_wire(e: WireError) -> Self {
        crate::metrics::error(e.code.as_str());
        let (status, kind, code) = match e.code {
            ErrorCode::Unauthorized => (StatusCode::UNAUTHORIZED, "invalid_request_error", "invalid_api_key"),
            ErrorCode::SessionNotFound | ErrorCode::ResponseNotFound => {
                (StatusCode::NOT_FOUND, "invalid_request_error", e.code.as_str())
            }
            ErrorCode::MessageTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error", e.code.as_str()),
            ErrorCode::ContextOverflow => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "context_length_exceeded",
            ),
            ErrorCode::Busy => (StatusCode::CONFLICT, "invalid_request_error", e.code.as_str()),
            ErrorCode::RateLimited | ErrorCode::Overloaded => {
                (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", e.code.as_str())
            }
            ErrorCode::StoreUnavailable | ErrorCode::ShuttingDown | ErrorCode::GeneratorLost => {
                (StatusCode::SERVICE_UNAVAILABLE, "server_error", e.code.as_str())
            }
            ErrorCode::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "server_error", e.code.as_str()),
            ErrorCode::InvalidJson | ErrorCode::UnknownType | ErrorCode::InvalidField | ErrorCode::UnsupportedFrame => {
                (StatusCode::BAD_REQUEST, "invalid_request_error", e.code.as_str())
            }
        };
        Self {
            status,
            kind,
            code: code.to_owned(),
            message: e.message,
            retry_after_ms: e.retry_after_ms,
        }
    }

    fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body())).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS || self.status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert("retry-after", errors::retry_after_header(self.retry_after_ms));
        }
        response
    }
}

fn owner(state: &AppState, headers: &HeaderMap) -> Result<String, ApiError> {
    authenticate(state, headers, None).map_err(|refused| ApiError::from_wire(errors::from_refused(refused)))
}

fn model_id(state: &AppState) -> String {
    crate::models::display_name(&state.config.model.path)
}

/// `GET /v1/models`: the one model this service runs.
pub(super) async fn models(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(e) = owner(&state, &headers) {
        return e.into_response();
    }
    Json(json!({
        "object": "list",
        "data": [{"id": model_id(&state), "object": "model", "created": 0, "owned_by": "dllm-chat"}],
    }))
    .into_response()
}

/// `POST /v1/chat/completions`.
pub(super) async fn completions(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    match start(&state, &headers, &body).await {
        Ok(started) if started.stream => sse(state, started).into_response(),
        Ok(started) => whole(started).await.into_response(),
        Err(e) => e.into_response(),
    }
}

/// A request that passed every check, with its reply under way.
struct Started {
    id: String,
    model: String,
    created: i64,
    stream: bool,
    include_usage: bool,
    revisions: bool,
    max_tokens: usize,
    placeholder: String,
    events: ChatStream,
}

async fn start(state: &AppState, headers: &HeaderMap, body: &[u8]) -> Result<Started, ApiError> {
    let owner = owner(state, headers)?;
    let request: CompletionRequest = serde_json::from_slice(body).map_err(|e| {
        ApiError::from_wire(errors::invalid_request(
            ErrorCode::InvalidJson,
            format!("request body: {e}"),
        ))
    })?;
    let model = model_id(state);
    if request.model != model {
        return Err(ApiError {
            status: StatusCode::NOT_FOUND,
            kind: "invalid_request_error",
            code: "model_not_found".into(),
            message: format!(
                "the model {:?} does not exist; this service runs {model:?}",
                request.model
            ),
            retry_after_ms: None,
        });
    }
    if request.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid("only n = 1 is supported"));
    }
    let dllm = request.dllm.unwrap_or_default();
    let mut options = dllm.options.unwrap_or_default();
    options.max_tokens = request
        .max_completion_tokens
        .or(request.max_tokens)
        .or(options.max_tokens);
    options.temperature = request.temperature.or(options.temperature);
    options.seed = request.seed.or(options.seed);

    let mut system = None;
    let mut turns = Vec::new();
    for (i, m) in request.messages.into_iter().enumerate() {
        let content = m.content.text()?;
        match m.role.as_str() {
            "system" | "developer" if i == 0 => system = Some(content),
            _ => turns.push(ChatTurn { role: m.role, content }),
        }
    }
    let chat = &state.chat;
    let wire = |e: &crate::chat::ChatError| ApiError::from_wire(errors::from_chat(e));
    let validation = |e: &crate::chat::ValidationError| ApiError::from_wire(errors::from_validation(e));
    let events = match request.session_id {
        Some(session_id) => {
            let content = match turns.pop() {
                Some(t) if t.role == "user" => t.content,
                _ => return Err(validation(&crate::chat::ValidationError::NoUserMessage)),
            };
            let message = chat
                .validator()
                .message(NewMessage {
                    session_id,
                    content,
                    client_message_id: None,
                    options,
                })
                .map_err(|e| validation(&e))?;
            let mut events = chat.send(&owner, message).await.map_err(|e| wire(&e))?;
            // Accepted, then Created or Refused: the reply's own events follow.
            loop {
                match events.next().await {
                    Some(ChatEvent::Created { .. }) => break events,
                    Some(ChatEvent::Refused(e)) => return Err(wire(&e)),
                    Some(ChatEvent::Accepted { .. } | ChatEvent::Reply(_)) => continue,
                    None => return Err(ApiError::invalid("this message was answered already")),
                }
            }
        }
        None => {
            let conversation = chat
                .validator()
                .conversation(NewConversation { system, turns, options })
                .map_err(|e| validation(&e))?;
            chat.complete(&owner, conversation).await.map_err(|e| wire(&e))?
        }
    };
    let max_tokens = request
        .max_completion_tokens
        .or(request.max_tokens)
        .unwrap_or(state.config.decode.max_tokens);
    Ok(Started {
        id: format!("chatcmpl-{}", uuid::Uuid::new_v4().simple()),
        model,
        created: chrono::Utc::now().timestamp(),
        stream: request.stream,
        include_usage: request.stream_options.is_some_and(|o| o.include_usage),
        revisions: dllm.revisions,
        max_tokens,
        placeholder: state.config.prompt.mask_placeholder.clone(),
        events,
    })
}

fn usage(u: &Usage) -> Value {
    json!({"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
           "total_tokens": u.prompt_tokens + u.completion_tokens,
           "prompt_tokens_details": {"cached_tokens": u.cached_prompt_tokens}})
}

/// `stop` when the model ended the reply, `length` when the canvas filled up.
fn finish_reason(done: &DoneEvent, max_tokens: usize) -> &'static str {
    if done.usage.completion_tokens >= max_tokens {
        "length"
    } else {
        "stop"
    }
}

/// A failed reply as the error it amounts to.
fn failed(done: &DoneEvent) -> ApiError {
    ApiError::from_wire(
        done.error
            .as_ref()
            .map_or_else(errors::reply_vanished, errors::from_failure),
    )
}

/// The reply as one `chat.completion`.
async fn whole(mut s: Started) -> Result<Json<Value>, ApiError> {
    let done = loop {
        match s.events.next().await {
            Some(ChatEvent::Reply(ReplyEvent::Done(done))) => break done,
            Some(_) => continue,
            None => return Err(ApiError::from_wire(errors::reply_vanished())),
        }
    };
    if done.status == ReplyStatus::Failed {
        return Err(failed(&done));
    }
    Ok(Json(json!({
        "id": s.id, "object": "chat.completion", "created": s.created, "model": s.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": done.text},
                     "finish_reason": finish_reason(&done, s.max_tokens), "logprobs": null}],
        "usage": usage(&done.usage),
    })))
}

/// The text of `revision` that no later step changes: everything before its first masked
/// position (a character cut in half at that boundary is left for later).
fn settled_prefix<'a>(revision: &'a str, placeholder: &str) -> &'a str {
    let end = revision.find(placeholder).unwrap_or(revision.len());
    revision[..end].trim_end_matches('\u{FFFD}')
}

/// What the stream has sent so far.
struct Streaming {
    started: Started,
    sent: String,
    phase: Phase,
}

enum Phase {
    Opening,
    Reply,
    Closing(Vec<Value>),
    Ended,
}

impl Streaming {
    fn chunk(&self, delta: Value, finish_reason: Option<&str>, extra: Option<(&str, Value)>) -> Value {
        let s = &self.started;
        let mut chunk = json!({
            "id": s.id, "object": "chat.completion.chunk", "created": s.created, "model": s.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": null}],
        });
        if let Some((key, value)) = extra {
            chunk[key] = value;
        }
        chunk
    }

    /// The chunks that follow `event`.
    fn on(&mut self, event: ReplyEvent) -> Vec<Value> {
        match event {
            ReplyEvent::Revision(r) => {
                let settled = settled_prefix(&r.text, &self.started.placeholder);
                let fresh = settled
                    .strip_prefix(self.sent.as_str())
                    .filter(|rest| !rest.is_empty())
                    .map(str::to_owned);
                let revision = json!({"revision": r.revision, "text": r.text, "masked": r.masked});
                let extra = self.started.revisions.then_some(("dllm_revision", revision));
                match fresh {
                    Some(text) => {
                        self.sent.push_str(&text);
                        vec![self.chunk(json!({"content": text}), None, extra)]
                    }
                    None if extra.is_some() => vec![self.chunk(json!({}), None, extra)],
                    None => Vec::new(),
                }
            }
            ReplyEvent::Done(done) if done.status == ReplyStatus::Failed => vec![failed(&done).body()],
            ReplyEvent::Done(done) => {
                let rest = done.text.strip_prefix(self.sent.as_str()).unwrap_or_else(|| {
                    tracing::warn!("a settled prefix changed; the stream cannot retract it");
                    ""
                });
                let delta = if rest.is_empty() {
                    json!({})
                } else {
                    json!({"content": rest})
                };
                let mut chunks = vec![self.chunk(delta, Some(finish_reason(&done, self.started.max_tokens)), None)];
                if self.started.include_usage {
                    let s = &self.started;
                    chunks.push(json!({
                        "id": s.id, "object": "chat.completion.chunk", "created": s.created, "model": s.model,
                        "choices": [], "usage": usage(&done.usage),
                    }));
                }
                chunks
            }
        }
    }

    /// The next batch of SSE data lines; `None` after `[DONE]`.
    async fn next(&mut self) -> Option<Vec<String>> {
        loop {
            match std::mem::replace(&mut self.phase, Phase::Ended) {
                Phase::Opening => {
                    self.phase = Phase::Reply;
                    let first = self.chunk(json!({"role": "assistant", "content": ""}), None, None);
                    return Some(vec![first.to_string()]);
                }
                Phase::Reply => match self.started.events.next().await {
                    Some(ChatEvent::Reply(event)) => {
                        let done = matches!(event, ReplyEvent::Done(_));
                        let chunks = self.on(event);
                        if done {
                            self.phase = Phase::Closing(chunks);
                            continue;
                        }
                        self.phase = Phase::Reply;
                        if !chunks.is_empty() {
                            return Some(chunks.iter().map(Value::to_string).collect());
                        }
                    }
                    Some(_) => self.phase = Phase::Reply,
                    None => {
                        let error = ApiError::from_wire(errors::reply_vanished());
                        self.phase = Phase::Closing(vec![error.body()]);
                    }
                },
                Phase::Closing(chunks) => {
                    let mut lines: Vec<String> = chunks.iter().map(Value::to_string).collect();
                    lines.push("[DONE]".into());
                    return Some(lines);
                }
                Phase::Ended => return None,
            }
        }
    }
}

/// The reply as server-sent events, ending with `data: [DONE]`.
fn sse(state: Arc<AppState>, started: Started) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let streaming = Streaming {
        started,
        sent: String::new(),
        phase: Phase::Opening,
    };
    let events = stream::unfold(streaming, |mut s| async move {
        let lines = s.next().await?;
        Some((stream::iter(lines.into_iter().map(|l| Ok(Event::default().data(l)))), s))
    });
    let every = std::time::Duration::from_millis(state.config.server.ping_interval_ms);
    Sse::new(futures_util::StreamExt::flatten(events)).keep_alive(KeepAlive::new().interval(every))
}

#[cfg(test)]
mod tests {
    use super::settled_prefix;

    #[test]
    fn the_settled_prefix_ends_at_the_first_mask_and_never_inside_a_character() {
        assert_eq!(settled_prefix("Your order ░░ on ░░ way", "░"), "Your order ");
        assert_eq!(settled_prefix("All done.", "░"), "All done.");
        assert_eq!(settled_prefix("░ leading", "░"), "");
        assert_eq!(
            settled_prefix("caf\u{FFFD}░", "░"),
            "caf",
            "half a character waits for its other half"
        );
    }
}
