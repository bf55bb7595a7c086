//! `POST /v1/tickets`: a one-time ticket for a browser WebSocket upgrade
//! ([`crate::tickets`]). The caller authenticates with its API key as for every other endpoint;
//! the answer is `201 {"ticket": "tk_…", "expires_in": 60}`, errors are `{"error": {code,
//! message}}` as on the WebSocket.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::auth::authenticate;
use super::{errors, AppState};
use crate::protocol::{ErrorCode, WireError};

fn error(status: StatusCode, e: WireError) -> Response {
    crate::metrics::error(e.code.as_str());
    let mut response = (
        status,
        Json(json!({"error": {"code": e.code.as_str(), "message": e.message}})),
    )
        .into_response();
    if status == StatusCode::SERVICE_UNAVAILABLE {
        response
            .headers_mut()
            .insert("retry-after", HeaderValue::from_static("1"));
    }
    response
}

pub(super) async fn issue(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let owner = match authenticate(&state, &headers, None) {
        Ok(owner) => owner,
        Err(refused) => return error(StatusCode::UNAUTHORIZED, errors::from_refused(refused)),
    };
    match state.tickets.issue(&owner).await {
        Ok(t) => (
            StatusCode::CREATED,
            [("cache-control", "no-store")],
            Json(json!({"ticket": t.ticket, "expires_in": t.expires_in.as_secs()})),
        )
            .into_response(),
        Err(e) => {
            let e = errors::from_ticket_store(&e);
            let status = match e.code {
                ErrorCode::StoreUnavailable => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            };
            error(status, e)
        }
    }
}
