//! The per-address request quota (`quotas.ip_requests_per_minute`, shared by every replica):
//! every request to `/v1/*` and `/integrations/*`, a WebSocket upgrade among them, passes it
//! before anything authenticates it, so guessing keys or flooding upgrades is throttled per
//! client address. A refusal is HTTP 429 with `Retry-After`, its body shaped for both this
//! API's clients (`code`) and OpenAI's (`type`).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::auth::client_address;
use super::{errors, AppState};
use crate::protocol::ErrorCode;

pub(super) async fn address_rate(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
    next: Next,
) -> Response {
    let address = client_address(&state.config.server.client_address_header, peer, request.headers());
    let Err(e) = state.quotas.address_request(address).await else {
        return next.run(request).await;
    };
    let e = errors::from_quota(&e);
    crate::metrics::error(e.code.as_str());
    let (status, kind) = match e.code {
        ErrorCode::RateLimited => (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error"),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "server_error"),
    };
    let body = json!({"error": {
        "code": e.code.as_str(),
        "type": kind,
        "message": e.message,
        "retry_after_ms": e.retry_after_ms,
    }});
    let mut response = (status, Json(body)).into_response();
    response
        .headers_mut()
        .insert("retry-after", errors::retry_after_header(e.retry_after_ms));
    response
}
