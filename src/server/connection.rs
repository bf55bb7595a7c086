//! One WebSocket connection of `/v1/chat`.
//!
//! The socket is split: a writer task owns the sink and drains a bounded queue of outgoing
//! events; the reader loop parses frames, enforces limits and dispatches. Replies run as their
//! own tasks and push revisions into the same queue. When the queue is full, intermediate
//! revisions are skipped (each one carries the whole reply); every other event waits for room.
//!
//! A server-side ping timer drops peers that stopped answering (tungstenite answers pings but
//! never sends them).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use futures_util::{SinkExt, StreamExt};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde::Deserialize;
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{errors, reply, AppState};
use crate::protocol::{self, ClientEvent, ErrorCode, MessageCreate, ServerEvent, WireError, WireMessage};
use crate::sessions::StoredMessage;

/// WebSocket close codes (RFC 6455).
const CLOSE_GOING_AWAY: u16 = 1001;
const CLOSE_POLICY: u16 = 1008;
const CLOSE_TOO_BIG: u16 = 1009;
const CLOSE_TRY_AGAIN: u16 = 1013;

/// What the writer task sends.
pub(super) enum Outgoing {
    Event(ServerEvent),
    Ping,
    Close(u16, &'static str),
}

/// Sending half used by the reader loop and reply tasks.
#[derive(Clone)]
pub(super) struct Outbox(mpsc::Sender<Outgoing>);

impl Outbox {
    /// Sends an event, waiting for room. Returns false once the connection is gone.
    pub async fn send(&self, event: ServerEvent) -> bool {
        self.0.send(Outgoing::Event(event)).await.is_ok()
    }

    /// Sends an event only if there is room right now; returns whether it was queued.
    pub fn try_send(&self, event: ServerEvent) -> bool {
        self.0.try_send(Outgoing::Event(event)).is_ok()
    }

    pub async fn error(&self, error: WireError) {
        crate::metrics::error(error.code.as_str());
        self.send(ServerEvent::Error { error }).await;
    }

    pub fn is_closed(&self) -> bool {
        self.0.is_closed()
    }
}

#[derive(Deserialize)]
pub(super) struct ConnectParams {
    api_key: Option<String>,
}

/// `GET /v1/chat`: authenticates, takes a connection permit, upgrades. Refusals are sent as an
/// `error` event and a close frame, which browsers can read (an HTTP 401 on upgrade they cannot).
pub(super) async fn upgrade(
    ws: WebSocketUpgrade,
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Query(params): Query<ConnectParams>,
    headers: HeaderMap,
) -> Response {
    let owner = authenticate(&state, &headers, params.api_key.as_deref());
    let permit = state.connections.clone().try_acquire_owned().ok();
    let hard = state.config.limits.hard_frame_bytes;
    ws.max_message_size(hard)
        .max_frame_size(hard)
        .on_upgrade(move |socket| {
            let tasks = state.tasks.clone();
            tasks.track_future(async move {
                match (owner, permit) {
                    (None, _) => {
                        let e = WireError::new(ErrorCode::Unauthorized, "missing or unknown API key");
                        refuse(socket, e, CLOSE_POLICY, "unauthorized").await;
                    }
                    (_, None) => {
                        let e = WireError::new(ErrorCode::Overloaded, "too many open connections; try again later");
                        refuse(socket, e, CLOSE_TRY_AGAIN, "too many connections").await;
                    }
                    (Some(owner), Some(permit)) => serve(socket, state, owner, peer, permit).await,
                }
            })
        })
}

/// The owner name for the presented key; `Some("anonymous")` with auth off.
fn authenticate(state: &AppState, headers: &HeaderMap, query_key: Option<&str>) -> Option<String> {
    let keys = &state.config.auth.keys;
    if keys.is_empty() {
        return Some("anonymous".into());
    }
    let bearer = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let presented = bearer.or(query_key)?;
    keys.iter().find(|k| k.key == presented).map(|k| k.name.clone())
}

async fn refuse(mut socket: WebSocket, error: WireError, code: u16, reason: &'static str) {
    crate::metrics::error(error.code.as_str());
    if let Ok(text) = serde_json::to_string(&ServerEvent::Error { error }) {
        let _ = socket.send(Message::Text(text.into())).await;
    }
    let _ = socket
        .send(Message::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        })))
        .await;
}

/// Per-connection state shared with reply tasks.
pub(super) struct Connection {
    pub state: Arc<AppState>,
    pub owner: String,
    pub outbox: Outbox,
    /// Running replies of this connection, by response id.
    pub replies: Mutex<HashMap<String, CancellationToken>>,
    pub reply_tasks: TaskTracker,
    rate: DefaultDirectRateLimiter,
}

async fn serve(
    socket: WebSocket,
    state: Arc<AppState>,
    owner: String,
    peer: SocketAddr,
    _permit: OwnedSemaphorePermit,
) {
    crate::metrics::connection_opened();
    tracing::debug!(%peer, %owner, "connection opened");
    let (sink, mut stream) = socket.split();
    let (tx, rx) = mpsc::channel(state.config.server.outgoing_queue);
    let writer = tokio::spawn(write_loop(sink, rx));

    let limits = &state.config.limits;
    let quota = Quota::per_minute(NonZeroU32::new(limits.messages_per_minute).expect("validated"))
        .allow_burst(NonZeroU32::new(limits.message_burst).expect("validated"));
    let conn = Arc::new(Connection {
        owner,
        outbox: Outbox(tx),
        replies: Mutex::new(HashMap::new()),
        reply_tasks: TaskTracker::new(),
        rate: RateLimiter::direct(quota),
        state: state.clone(),
    });

    let server = &state.config.server;
    let mut pings = tokio::time::interval(Duration::from_millis(server.ping_interval_ms));
    pings.tick().await;
    let idle_timeout = Duration::from_millis(server.idle_timeout_ms);
    let mut last_seen = Instant::now();
    let close = loop {
        tokio::select! {
            frame = stream.next() => {
                last_seen = Instant::now();
                match frame {
                    Some(Ok(Message::Text(text))) => conn.clone().on_text(text.as_str()).await,
                    Some(Ok(Message::Binary(_))) => {
                        let e = WireError::new(ErrorCode::UnsupportedFrame, "binary frames are not supported; send JSON text frames");
                        conn.outbox.error(e).await;
                    }
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                    Some(Ok(Message::Close(_))) | None => break None,
                    Some(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "connection error");
                        // Only a frame over the hard limit leaves a socket worth a close frame.
                        let too_big = matches!(
                            e.into_inner().downcast_ref::<tungstenite::Error>(),
                            Some(tungstenite::Error::Capacity(_))
                        );
                        break too_big.then_some((CLOSE_TOO_BIG, "frame exceeds limits.hard_frame_bytes"));
                    }
                }
            }
            _ = pings.tick() => {
                if last_seen.elapsed() > idle_timeout {
                    tracing::debug!(%peer, "dropping idle peer");
                    break Some((CLOSE_GOING_AWAY, "idle timeout"));
                }
                let _ = conn.outbox.0.send(Outgoing::Ping).await;
            }
            _ = state.shutdown.cancelled() => break Some((CLOSE_GOING_AWAY, "server shutting down")),
        }
    };

    // Replies of a vanished peer stop now; on shutdown they get the grace period first.
    conn.reply_tasks.close();
    if state.shutdown.is_cancelled() {
        let grace = Duration::from_millis(server.shutdown_grace_ms);
        let _ = tokio::time::timeout(grace, conn.reply_tasks.wait()).await;
    }
    conn.cancel_replies();
    conn.reply_tasks.wait().await;
    if let Some((code, reason)) = close {
        let _ = conn.outbox.0.send(Outgoing::Close(code, reason)).await;
    }
    drop(conn);
    let _ = writer.await;
    crate::metrics::connection_closed();
    tracing::debug!(%peer, "connection closed");
}

async fn write_loop(mut sink: futures_util::stream::SplitSink<WebSocket, Message>, mut rx: mpsc::Receiver<Outgoing>) {
    while let Some(out) = rx.recv().await {
        let message = match out {
            Outgoing::Event(event) => match serde_json::to_string(&event) {
                Ok(text) => Message::Text(text.into()),
                Err(e) => {
                    tracing::error!(error = %e, "event did not serialize");
                    continue;
                }
            },
            Outgoing::Ping => Message::Ping(Default::default()),
            Outgoing::Close(code, reason) => {
                let _ = sink
                    .send(Message::Close(Some(CloseFrame {
                        code,
                        reason: reason.into(),
                    })))
                    .await;
                break;
            }
        };
        if sink.send(message).await.is_err() {
            break;
        }
    }
    let _ = sink.close().await;
}

impl Connection {
    fn cancel_replies(&self) {
        for token in self.replies.lock().expect("replies poisoned").values() {
            token.cancel();
        }
    }

    async fn on_text(self: Arc<Self>, text: &str) {
        let limits = &self.state.config.limits;
        if text.len() > limits.max_frame_bytes {
            let e = WireError::new(
                ErrorCode::MessageTooLarge,
                format!(
                    "frame of {} bytes exceeds the limit of {} bytes",
                    text.len(),
                    limits.max_frame_bytes
                ),
            );
            return self.outbox.error(e).await;
        }
        let envelope = match protocol::parse(text) {
            Ok(e) => e,
            Err(e) => return self.outbox.error(e).await,
        };
        let event_id = envelope.event_id;
        let result = match envelope.event {
            ClientEvent::SessionCreate { metadata } => self.create_session(metadata, event_id.clone()).await,
            ClientEvent::SessionResume { session_id, after } => {
                self.resume_session(&session_id, after.as_deref(), event_id.clone())
                    .await
            }
            ClientEvent::MessageCreate(m) => self.clone().create_message(m, event_id.clone()).await,
            ClientEvent::ResponseCancel { response_id } => self.cancel_response(&response_id),
        };
        if let Err(e) = result {
            self.outbox.error(e.with_event_id(event_id)).await;
        }
    }

    async fn create_session(&self, metadata: serde_json::Value, event_id: Option<String>) -> Result<(), WireError> {
        let info = self
            .state
            .store
            .create(&self.owner, metadata)
            .await
            .map_err(|e| errors::from_store(&e))?;
        self.outbox
            .send(ServerEvent::SessionCreated {
                session_id: info.id,
                event_id,
            })
            .await;
        Ok(())
    }

    /// Checks that `session_id` exists and belongs to this connection's key. Another key's
    /// session reads as not found, so ids cannot be probed.
    async fn owned_session(&self, session_id: &str) -> Result<(), WireError> {
        let info = self
            .state
            .store
            .get(session_id)
            .await
            .map_err(|e| errors::from_store(&e))?;
        if info.owner != self.owner {
            return Err(errors::from_store(&crate::sessions::StoreError::NotFound(
                session_id.to_owned(),
            )));
        }
        Ok(())
    }

    async fn resume_session(
        &self,
        session_id: &str,
        after: Option<&str>,
        event_id: Option<String>,
    ) -> Result<(), WireError> {
        self.owned_session(session_id).await?;
        let messages = self
            .state
            .store
            .messages(session_id)
            .await
            .map_err(|e| errors::from_store(&e))?;
        // Messages after the client's last seen id; an unknown id (stale client) gets everything.
        let start = after
            .and_then(|id| messages.iter().position(|m| m.id == id))
            .map_or(0, |i| i + 1);
        let messages = messages[start..].iter().map(to_wire).collect();
        self.outbox
            .send(ServerEvent::SessionResumed {
                session_id: session_id.to_owned(),
                messages,
                event_id,
            })
            .await;
        Ok(())
    }

    async fn create_message(self: Arc<Self>, m: MessageCreate, event_id: Option<String>) -> Result<(), WireError> {
        let state = &self.state;
        let limits = &state.config.limits;
        if self.rate.check().is_err() {
            return Err(WireError::new(
                ErrorCode::RateLimited,
                format!(
                    "more than {} messages per minute on this connection",
                    limits.messages_per_minute
                ),
            ));
        }
        if m.content.trim().is_empty() {
            return Err(WireError::new(ErrorCode::InvalidField, "`content` must not be empty"));
        }
        let chars = m.content.chars().count();
        if chars > limits.max_message_chars {
            return Err(WireError::new(
                ErrorCode::MessageTooLarge,
                format!(
                    "`content` has {chars} characters; the limit is {}",
                    limits.max_message_chars
                ),
            ));
        }
        let options = m.options.resolve(&state.config.decode, limits)?;
        if state.shutdown.is_cancelled() {
            return Err(WireError::new(
                ErrorCode::ShuttingDown,
                "the server is shutting down; reconnect",
            ));
        }
        self.owned_session(&m.session_id).await?;
        let busy = reply::BusyGuard::acquire(state.clone(), &m.session_id).ok_or_else(|| {
            WireError::new(
                ErrorCode::Busy,
                "a reply is still running in this session; wait for response.done or send response.cancel",
            )
        })?;

        // The user's message is stored before anything is generated, so it survives any failure.
        let message = StoredMessage::new(crate::sessions::Role::User, m.content, None, m.client_message_id);
        let appended = state
            .store
            .append(&m.session_id, message)
            .await
            .map_err(|e| errors::from_store(&e))?;
        let history = state
            .store
            .messages(&m.session_id)
            .await
            .map_err(|e| errors::from_store(&e))?;
        self.outbox
            .send(ServerEvent::MessageAccepted {
                session_id: m.session_id.clone(),
                message_id: appended.message.id.clone(),
                duplicate: appended.duplicate,
                event_id: event_id.clone(),
            })
            .await;
        let Some(turns) = reply::turns_for(&history, &appended.message.id) else {
            // A resent message that was already answered: nothing more to do.
            return Ok(());
        };
        reply::start(
            self.clone(),
            busy,
            m.session_id,
            appended.message.id,
            turns,
            options,
            event_id,
        )
        .await
    }

    fn cancel_response(&self, response_id: &str) -> Result<(), WireError> {
        match self.replies.lock().expect("replies poisoned").get(response_id) {
            Some(token) => {
                token.cancel();
                Ok(())
            }
            None => Err(WireError::new(
                ErrorCode::ResponseNotFound,
                format!("no running response {response_id} on this connection"),
            )),
        }
    }
}

fn to_wire(m: &StoredMessage) -> WireMessage {
    WireMessage {
        id: m.id.clone(),
        role: m.role.as_str().to_owned(),
        content: m.content.clone(),
        created_at: m.created_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        status: m.status.map(|s| match s {
            crate::sessions::MessageStatus::Completed => "completed".to_owned(),
            crate::sessions::MessageStatus::Cancelled => "cancelled".to_owned(),
        }),
    }
}
