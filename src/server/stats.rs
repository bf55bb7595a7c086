//! `GET /v1/stats`: the timing feed of every replica ([`crate::chat::stats`]) as a WebSocket
//! of JSON text frames, one record each, for admin keys only (anyone with auth off).
//!
//! The key comes as `Authorization: Bearer`, as `?api_key=` when `auth.allow_query_key` is on,
//! or, for browsers (which cannot set headers on a WebSocket), in the subprotocol list:
//! `new WebSocket(url, ["dllm-stats", "key." + key])`; the server answers `dllm-stats`. The feed
//! only sends: frames from the client are ignored. A reader too slow for the feed skips records.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::broadcast::error::RecvError;

use super::auth::{authenticate_admin, origin_allowed};
use super::connection::{refuse, ConnectParams, CLOSE_GOING_AWAY, CLOSE_POLICY, CLOSE_TRY_AGAIN};
use super::{errors, AppState};

/// The subprotocol the dashboard asks for.
pub(super) const PROTOCOL: &str = "dllm-stats";
/// The prefix of the subprotocol entry that carries the key.
const KEY_PROTOCOL: &str = "key.";
/// A feed that sent nothing for this long gets a ping.
const PING_EVERY: Duration = Duration::from_secs(20);

/// The key in `Sec-WebSocket-Protocol` (`key.<key>`), if any.
fn protocol_key(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|p| p.trim().strip_prefix(KEY_PROTOCOL).map(str::to_owned))
}

pub(super) async fn upgrade(
    ws: WebSocketUpgrade,
    State(state): State<Arc<AppState>>,
    Query(params): Query<ConnectParams>,
    mut headers: HeaderMap,
) -> Response {
    if !origin_allowed(&state.config.server.allowed_origins, &headers) {
        crate::metrics::error("forbidden_origin");
        return (StatusCode::FORBIDDEN, "origin not allowed\n").into_response();
    }
    if headers.get(header::AUTHORIZATION).is_none() {
        if let Some(key) = protocol_key(&headers) {
            if let Ok(v) = format!("Bearer {key}").parse() {
                headers.insert(header::AUTHORIZATION, v);
            }
        }
    }
    let caller = authenticate_admin(&state, &headers, params.api_key());
    let permit = state.connections.clone().try_acquire_owned().ok();
    ws.protocols([PROTOCOL]).on_upgrade(move |socket| {
        let tasks = state.tasks.clone();
        tasks.track_future(async move {
            match (caller, permit) {
                (Err(refused), _) => {
                    refuse(socket, errors::from_refused(refused), CLOSE_POLICY, "unauthorized").await;
                }
                (_, None) => {
                    let e = errors::too_many_connections();
                    refuse(socket, e, CLOSE_TRY_AGAIN, "too many connections").await;
                }
                (Ok(_), Some(_permit)) => feed(socket, state).await,
            }
        })
    })
}

/// Sends every record until the client goes or the server shuts down.
async fn feed(socket: WebSocket, state: Arc<AppState>) {
    let mut records = state.chat.stats_feed();
    let (mut sink, mut stream) = socket.split();
    let mut pings = tokio::time::interval(PING_EVERY);
    pings.tick().await;
    let close = loop {
        tokio::select! {
            record = records.recv() => match record {
                Ok(json) => {
                    if sink.send(Message::Text(json.as_ref().into())).await.is_err() {
                        break None;
                    }
                }
                Err(RecvError::Lagged(n)) => tracing::debug!(skipped = n, "slow timing feed reader"),
                Err(RecvError::Closed) => break Some((CLOSE_GOING_AWAY, "server shutting down")),
            },
            frame = stream.next() => match frame {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break None,
                Some(Ok(_)) => {}
            },
            _ = pings.tick() => {
                if sink.send(Message::Ping(Vec::new().into())).await.is_err() {
                    break None;
                }
            }
            _ = state.shutdown.cancelled() => break Some((CLOSE_GOING_AWAY, "server shutting down")),
        }
    };
    if let Some((code, reason)) = close {
        let frame = CloseFrame {
            code,
            reason: reason.into(),
        };
        let _ = sink.send(Message::Close(Some(frame))).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_read_from_the_subprotocol_list() {
        let mut h = HeaderMap::new();
        assert_eq!(protocol_key(&h), None);
        h.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            "dllm-stats, key.dk_abc123".parse().unwrap(),
        );
        assert_eq!(protocol_key(&h).as_deref(), Some("dk_abc123"));
    }
}
