//! One WebSocket connection of `/v1/chat`: frames in, calls of the conversation core, events
//! out.
//!
//! The socket is split: a writer task owns the sink and drains the connection's [`Outbox`]; the
//! reader loop parses frames, enforces the connection's limits and dispatches. Each reply the
//! connection asked for or resumed is forwarded by a task of its own ([`forward`]); when the
//! connection goes, those tasks are dropped (the replies themselves belong to the core and, with
//! `chat.finish_orphaned_replies`, finish and are stored).
//!
//! A server-side ping timer drops peers that stopped answering (tungstenite answers pings but
//! never sends them).

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde::Deserialize;
use tokio::sync::OwnedSemaphorePermit;
use tokio::task::JoinSet;
use tokio_util::task::TaskTracker;

use super::auth::{authenticate, client_address, origin_allowed, widget, Refused, Widget, WidgetCheck};
use super::forward::{forward, Source};
use super::outbox::{write_loop, Outbox};
use super::{errors, AppState};
use crate::chat::{ChatEvent, NewMessage, ReplyWatch};
use crate::protocol::{self, ClientEvent, ErrorCode, MessageCreate, ServerEvent, WireError, WireMessage, WireRunning};
use crate::quotas::{ConnectionSlots, QuotaError};
use crate::sessions::StoredMessage;

/// WebSocket close codes (RFC 6455).
pub(super) const CLOSE_GOING_AWAY: u16 = 1001;
const CLOSE_INVALID_DATA: u16 = 1007;
pub(super) const CLOSE_POLICY: u16 = 1008;
const CLOSE_TOO_BIG: u16 = 1009;
pub(super) const CLOSE_TRY_AGAIN: u16 = 1013;

/// How long, after the core has ended every reply on shutdown, forwarders get to deliver the
/// last events before the socket closes.
const FLUSH_AFTER_DRAIN: Duration = Duration::from_millis(500);

#[derive(Deserialize)]
pub(super) struct ConnectParams {
    api_key: Option<String>,
    /// A one-time ticket from `POST /v1/tickets`.
    ticket: Option<String>,
}

impl ConnectParams {
    pub(super) fn api_key(&self) -> Option<&str> {
        self.api_key.as_deref()
    }
}

/// `GET /v1/chat`: checks the `Origin` (a browser page not in `server.allowed_origins` gets
/// HTTP 403, before anything else), takes the connection's permit and slots and authenticates
/// it ([`admit`]), upgrades. The other refusals are sent as an `error` event and a close frame, which browsers can read (an
/// HTTP 401 on upgrade they cannot).
pub(super) async fn upgrade(
    ws: WebSocketUpgrade,
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Query(params): Query<ConnectParams>,
    headers: HeaderMap,
) -> Response {
    let forbidden = || {
        crate::metrics::error("forbidden_origin");
        tracing::debug!(%peer, "upgrade from an origin not allowed refused");
        (StatusCode::FORBIDDEN, "origin not allowed\n").into_response()
    };
    // A widget key carries its own origins; everything else the server-wide allow-list.
    let widget = match widget(&state, params.api_key.as_deref(), &headers) {
        WidgetCheck::WrongOrigin => return forbidden(),
        WidgetCheck::Allowed(w) => Some(w),
        WidgetCheck::NotWidget if !origin_allowed(&state.config.server.allowed_origins, &headers) => {
            return forbidden();
        }
        WidgetCheck::NotWidget => None,
    };
    let messages_per_minute = widget
        .as_ref()
        .and_then(|w| w.messages_per_minute)
        .unwrap_or(state.config.limits.messages_per_minute);
    let address = client_address(&state.config.server.client_address_header, peer, &headers);
    let admission = admit(&state, &params, &headers, widget, address).await;
    let hard = state.config.limits.hard_frame_bytes;
    let server = &state.config.server;
    ws.max_message_size(hard)
        .max_frame_size(hard)
        .read_buffer_size(server.ws_read_buffer_bytes)
        .write_buffer_size(server.ws_write_buffer_bytes)
        // A peer that stopped reading fills the outbox, not this buffer: the writer task waits
        // on the socket, and revisions are skipped before they are queued.
        .max_write_buffer_size(server.ws_write_buffer_bytes + hard)
        .on_upgrade(move |socket| {
            let tasks = state.tasks.clone();
            tasks.track_future(async move {
                match admission {
                    Ok(admitted) => serve(socket, state, admitted, messages_per_minute, peer).await,
                    Err(Denied::Refused(refused)) => {
                        refuse(socket, errors::from_refused(refused), CLOSE_POLICY, "unauthorized").await;
                    }
                    Err(Denied::TryAgain(error)) => {
                        let reason = match error.code {
                            ErrorCode::StoreUnavailable => "store unavailable",
                            _ => "too many connections",
                        };
                        refuse(socket, error, CLOSE_TRY_AGAIN, reason).await;
                    }
                }
            })
        })
}

/// Why an upgrade is answered with an error and a close.
enum Denied {
    /// Close 1008.
    Refused(Refused),
    /// Close 1013: no connection slot (here or shared), or the store did not answer.
    TryAgain(WireError),
}

/// A connection let in, and what it holds while it is open.
struct Admitted {
    owner: String,
    _permit: OwnedSemaphorePermit,
    _slots: ConnectionSlots,
}

/// This server's connection permit, the address's shared slot, the key (or ticket), then the
/// key's shared slot: a full server refuses before it authenticates or spends a ticket.
async fn admit(
    state: &AppState,
    params: &ConnectParams,
    headers: &HeaderMap,
    widget: Option<Widget>,
    address: std::net::IpAddr,
) -> Result<Admitted, Denied> {
    let quota = |e: QuotaError| Denied::TryAgain(errors::from_quota(&e));
    let permit = state
        .connections
        .clone()
        .try_acquire_owned()
        .map_err(|_| Denied::TryAgain(errors::too_many_connections()))?;
    let mut slots = state.quotas.connection(address).await.map_err(quota)?;
    let owner = match (widget, params.ticket.as_deref()) {
        (Some(w), _) => w.owner,
        (None, Some(ticket)) => match state.tickets.redeem(ticket).await {
            Ok(Some(owner)) => owner,
            Ok(None) => return Err(Denied::Refused(Refused::Ticket)),
            Err(e) => return Err(Denied::TryAgain(errors::from_ticket_store(&e))),
        },
        (None, None) => authenticate(state, headers, params.api_key.as_deref()).map_err(Denied::Refused)?,
    };
    if let Err(e) = slots.add_key(&owner).await {
        slots.release().await;
        return Err(quota(e));
    }
    Ok(Admitted {
        owner,
        _permit: permit,
        _slots: slots,
    })
}

pub(super) async fn refuse(mut socket: WebSocket, error: WireError, code: u16, reason: &'static str) {
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

/// Per-connection state.
struct Connection {
    state: Arc<AppState>,
    owner: String,
    outbox: Outbox,
    /// The forwarders of this connection's replies; aborted when it closes.
    forwarders: Mutex<JoinSet<()>>,
    /// The same forwarders, for waiting until they are done (on shutdown).
    running: TaskTracker,
    rate: DefaultDirectRateLimiter,
    /// The rate `rate` enforces: `limits.messages_per_minute`, or its widget key's own.
    messages_per_minute: u32,
}

async fn serve(
    socket: WebSocket,
    state: Arc<AppState>,
    admitted: Admitted,
    messages_per_minute: u32,
    peer: SocketAddr,
) {
    let Admitted {
        owner,
        // Held while the connection is open.
        _permit,
        _slots,
    } = admitted;
    crate::metrics::connection_opened();
    tracing::debug!(%peer, %owner, "connection opened");
    let (sink, mut stream) = socket.split();
    let (outbox, rx) = Outbox::new(state.config.server.outgoing_queue);
    let writer = tokio::spawn(write_loop(sink, rx));

    let limits = &state.config.limits;
    let quota = Quota::per_minute(NonZeroU32::new(messages_per_minute).expect("validated"))
        .allow_burst(NonZeroU32::new(limits.message_burst).expect("validated"));
    let conn = Connection {
        owner,
        outbox,
        forwarders: Mutex::new(JoinSet::new()),
        running: TaskTracker::new(),
        rate: RateLimiter::direct(quota),
        messages_per_minute,
        state: state.clone(),
    };

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
                    Some(Ok(Message::Text(text))) => conn.on_text(text.as_str()).await,
                    Some(Ok(Message::Binary(_))) => {
                        conn.outbox.error(errors::binary_frame()).await;
                    }
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                    Some(Ok(Message::Close(_))) | None => break None,
                    Some(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "connection error");
                        // Only a frame over the hard limit or a text frame that is not UTF-8
                        // leaves a socket worth a close frame (RFC 6455: 1009, 1007).
                        break match e.into_inner().downcast_ref::<tungstenite::Error>() {
                            Some(tungstenite::Error::Capacity(_)) => {
                                Some((CLOSE_TOO_BIG, "frame exceeds limits.hard_frame_bytes"))
                            }
                            Some(tungstenite::Error::Utf8(_)) => Some((CLOSE_INVALID_DATA, "text frame is not valid UTF-8")),
                            _ => None,
                        };
                    }
                }
            }
            _ = pings.tick() => {
                if last_seen.elapsed() > idle_timeout {
                    tracing::debug!(%peer, "dropping idle peer");
                    break Some((CLOSE_GOING_AWAY, "idle timeout"));
                }
                conn.outbox.ping().await;
            }
            // On shutdown the connection stays open while its replies finish (the core gives
            // them the grace period, then cancels them) and answers new messages with
            // `shutting_down`; it closes once they are delivered, or shortly after the core
            // has ended them all.
            _ = async { conn.running.close(); conn.running.wait().await }, if state.shutdown.is_cancelled() => {
                break Some((CLOSE_GOING_AWAY, "server shutting down"));
            }
            _ = async {
                state.drained.cancelled().await;
                tokio::time::sleep(FLUSH_AFTER_DRAIN).await;
            }, if state.shutdown.is_cancelled() => break Some((CLOSE_GOING_AWAY, "server shutting down")),
            _ = state.shutdown.cancelled(), if !state.shutdown.is_cancelled() => {}
        }
    };

    let mut forwarders = std::mem::take(&mut *conn.forwarders.lock().expect("forwarders poisoned"));
    forwarders.shutdown().await;
    if let Some((code, reason)) = close {
        conn.outbox.close(code, reason).await;
    }
    drop(conn);
    let _ = writer.await;
    crate::metrics::connection_closed();
    tracing::debug!(%peer, "connection closed");
}

impl Connection {
    async fn on_text(&self, text: &str) {
        let limits = &self.state.config.limits;
        if text.len() > limits.max_frame_bytes {
            let e = errors::frame_too_large(text.len(), limits.max_frame_bytes);
            return self.outbox.error(e).await;
        }
        let envelope = match protocol::parse(text) {
            Ok(e) => e,
            Err(e) => return self.outbox.error(e).await,
        };
        let event_id = envelope.event_id;
        let result = match envelope.event {
            ClientEvent::SessionCreate { metadata } => self.create_session(metadata, &event_id).await,
            ClientEvent::SessionResume { session_id, after } => {
                self.resume_session(&session_id, after.as_deref(), &event_id).await
            }
            ClientEvent::SessionUpdate { session_id, metadata } => {
                self.update_session(&session_id, metadata, &event_id).await
            }
            ClientEvent::MessageCreate(m) => self.create_message(m, &event_id).await,
            ClientEvent::ResponseCancel { response_id } => self
                .state
                .chat
                .cancel(&self.owner, &response_id)
                .await
                .map_err(|e| errors::from_chat(&e)),
            ClientEvent::ResponseResume {
                response_id,
                after_revision,
            } => {
                self.resume_response(&response_id, after_revision.unwrap_or(0), &event_id)
                    .await
            }
        };
        if let Err(e) = result {
            self.outbox.error(e.with_event_id(event_id)).await;
        }
    }

    fn spawn_forwarder(&self, response_id: String, source: Source, event_id: Option<String>) {
        let outbox = self.outbox.clone();
        self.forwarders
            .lock()
            .expect("forwarders poisoned")
            .spawn(
                self.running
                    .track_future(forward(outbox, response_id, source, event_id)),
            );
    }

    async fn create_session(&self, metadata: serde_json::Value, event_id: &Option<String>) -> Result<(), WireError> {
        let info = self
            .state
            .chat
            .create_session(&self.owner, metadata)
            .await
            .map_err(|e| errors::from_chat(&e))?;
        self.outbox
            .send(ServerEvent::SessionCreated {
                session_id: info.id,
                event_id: event_id.clone(),
            })
            .await;
        Ok(())
    }

    async fn update_session(
        &self,
        session_id: &str,
        patch: serde_json::Map<String, serde_json::Value>,
        event_id: &Option<String>,
    ) -> Result<(), WireError> {
        let metadata = self
            .state
            .chat
            .update_session(&self.owner, session_id, patch)
            .await
            .map_err(|e| errors::from_chat(&e))?;
        self.outbox
            .send(ServerEvent::SessionUpdated {
                session_id: session_id.to_owned(),
                metadata,
                event_id: event_id.clone(),
            })
            .await;
        Ok(())
    }

    async fn resume_session(
        &self,
        session_id: &str,
        after: Option<&str>,
        event_id: &Option<String>,
    ) -> Result<(), WireError> {
        let resumed = self
            .state
            .chat
            .resume_session(&self.owner, session_id, after)
            .await
            .map_err(|e| errors::from_chat(&e))?;
        let (running, watch) = match resumed.running {
            Some((snapshot, watch)) => {
                let latest = snapshot.latest;
                let running = WireRunning {
                    response_id: snapshot.response_id,
                    message_id: snapshot.message_id,
                    revision: latest.as_ref().map_or(0, |r| r.revision),
                    text: latest.as_ref().map(|r| r.text.clone()).unwrap_or_default(),
                    masked: latest.as_ref().map(|r| r.masked),
                };
                (Some(running), Some(watch))
            }
            None => (None, None),
        };
        self.outbox
            .send(ServerEvent::SessionResumed {
                session_id: session_id.to_owned(),
                metadata: resumed.metadata,
                messages: resumed.messages.iter().map(to_wire).collect(),
                running,
                event_id: event_id.clone(),
            })
            .await;
        if let Some(watch) = watch {
            self.follow(watch);
        }
        Ok(())
    }

    async fn resume_response(
        &self,
        response_id: &str,
        after_revision: usize,
        event_id: &Option<String>,
    ) -> Result<(), WireError> {
        let watch = self
            .state
            .chat
            .resume_response(&self.owner, response_id, after_revision)
            .await
            .map_err(|e| errors::from_chat(&e))?;
        self.outbox
            .send(ServerEvent::ResponseResumed {
                response_id: response_id.to_owned(),
                session_id: watch.session_id.clone(),
                event_id: event_id.clone(),
            })
            .await;
        self.follow(watch);
        Ok(())
    }

    /// Forwards the rest of a reply this connection resumed; the revision the client was just
    /// shown comes again only if it is the newest.
    fn follow(&self, watch: ReplyWatch) {
        let response_id = watch.response_id.clone();
        self.spawn_forwarder(response_id, Source::Watch(watch), None);
    }

    async fn create_message(&self, m: MessageCreate, event_id: &Option<String>) -> Result<(), WireError> {
        let chat = &self.state.chat;
        if let Err(not_until) = self.rate.check() {
            let wait = not_until.wait_time_from(governor::clock::Clock::now(&governor::clock::DefaultClock::default()));
            return Err(errors::rate_limited(self.messages_per_minute, wait));
        }
        let message = chat
            .validator()
            .message(NewMessage {
                session_id: m.session_id.clone(),
                content: m.content,
                client_message_id: m.client_message_id,
                options: m.options,
            })
            .map_err(|e| errors::from_validation(&e))?;
        let mut stream = chat
            .send(&self.owner, message)
            .await
            .map_err(|e| errors::from_chat(&e))?;
        // The first events are there at once; the reply's own come through a forwarder, so
        // this connection goes on reading frames meanwhile.
        while let Some(event) = stream.next().await {
            match event {
                ChatEvent::Accepted { message_id, duplicate } => {
                    self.outbox
                        .send(ServerEvent::MessageAccepted {
                            session_id: m.session_id.clone(),
                            message_id,
                            duplicate,
                            event_id: event_id.clone(),
                        })
                        .await;
                }
                ChatEvent::Created {
                    response_id,
                    message_id,
                } => {
                    self.outbox
                        .send(ServerEvent::ResponseCreated {
                            response_id: response_id.clone(),
                            session_id: m.session_id.clone(),
                            message_id,
                            event_id: event_id.clone(),
                        })
                        .await;
                    self.spawn_forwarder(response_id, Source::Sent(stream), event_id.clone());
                    return Ok(());
                }
                ChatEvent::Refused(e) => return Err(errors::from_chat(&e)),
                // A reply's events only come after its `Created`.
                ChatEvent::Reply(_) => {}
            }
        }
        Ok(())
    }
}

fn to_wire(m: &StoredMessage) -> WireMessage {
    WireMessage {
        id: m.id.clone(),
        role: m.role.as_str().to_owned(),
        content: m.content.clone(),
        created_at: m.created_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        status: m.status.map(|s| s.as_str().to_owned()),
        handover: m.handover,
    }
}
