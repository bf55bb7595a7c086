//! Operational HTTP endpoints on the chat port.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use serde_json::json;

use super::AppState;

/// Liveness: the process answers.
pub(super) async fn health() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

/// Readiness: the model is loaded (it is, once the server runs) and the store answers.
pub(super) async fn ready(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let info = state.chat.engine().info();
    let model = json!({"engine": info.engine, "path": info.model_path, "architecture": info.architecture,
                       "context_length": info.context_length});
    match state.chat.store_ready().await {
        Ok(()) if !state.shutdown.is_cancelled() => (
            StatusCode::OK,
            Json(json!({"status": "ready", "model": model, "store": "ok"})),
        ),
        Ok(()) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "shutting_down"})),
        ),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "unavailable", "model": model, "store": e.to_string()})),
        ),
    }
}

/// Prometheus text exposition.
pub(super) async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    ([("content-type", "text/plain; version=0.0.4")], state.metrics.render())
}
