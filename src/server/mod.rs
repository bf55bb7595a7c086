//! The network edge: one port serving the WebSocket chat endpoint and the operational HTTP
//! endpoints, plus graceful shutdown. A thin translator: frames become calls of the conversation
//! core ([`crate::chat::Chat`]) and its events become frames.
//!
//! - [`connection`]: one WebSocket connection (frames, limits, pings, dispatch).
//! - [`outbox`]: a connection's outgoing queue and the task that writes it to the socket.
//! - [`forward`]: one reply's events onto a connection, with the slow-reader policy.
//! - [`openai`]: the OpenAI-compatible `/v1/chat/completions` and `/v1/models`.
//! - [`http`]: `/health`, `/ready`, `/metrics`.
//! - [`web`]: the support widget (`/widget.js`) and its demo page (`/`).
//! - [`auth`]: the API key check every front end uses.
//! - [`errors`]: the only place subsystem errors become wire errors.
//!
//! [`run`] takes any bound listener and any shutdown future, so tests run the real server on
//! `127.0.0.1:0`.

mod auth;
mod connection;
mod errors;
mod forward;
mod http;
mod openai;
mod outbox;
mod web;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::chat::Chat;
use crate::config::Config;

/// What the server is built from.
pub struct Services {
    pub config: Config,
    pub chat: Chat,
}

/// State shared by every connection.
pub(crate) struct AppState {
    pub config: Config,
    pub chat: Chat,
    pub metrics: PrometheusHandle,
    /// One permit per open WebSocket; taken before the upgrade so overload is refused cheaply.
    pub connections: Arc<Semaphore>,
    /// Cancelled when shutdown starts.
    pub shutdown: CancellationToken,
    /// Cancelled once the core has finished or cancelled every running reply.
    pub drained: CancellationToken,
    /// Every connection task, so shutdown can wait for their close frames.
    pub tasks: TaskTracker,
}

/// Errors that stop the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("serving failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Serves until `shutdown` resolves, then stops accepting, lets running replies finish within
/// `server.shutdown_grace_ms`, cancels the rest and closes every socket with a close frame.
pub async fn run(
    listener: TcpListener,
    services: Services,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let Services { config, chat } = services;
    if config.auth.keys.is_empty() {
        tracing::warn!("no API keys configured: authentication is OFF and every client is \"anonymous\"");
    }
    let state = Arc::new(AppState {
        connections: Arc::new(Semaphore::new(config.server.max_connections)),
        config,
        chat,
        metrics: crate::metrics::install(),
        shutdown: CancellationToken::new(),
        drained: CancellationToken::new(),
        tasks: TaskTracker::new(),
    });
    let drain = state.clone();
    tokio::spawn(async move {
        shutdown.await;
        drain.shutdown.cancel();
        let grace = Duration::from_millis(drain.config.server.shutdown_grace_ms);
        drain.chat.drain(grace).await;
        drain.drained.cancel();
    });

    let app = Router::new()
        .route("/v1/chat", get(connection::upgrade))
        .route("/v1/chat/completions", post(openai::completions))
        .route("/v1/models", get(openai::models))
        .route("/health", get(http::health))
        .route("/ready", get(http::ready))
        .route("/metrics", get(http::metrics))
        .route("/", get(web::demo))
        .route("/widget.js", get(web::widget))
        .layer(DefaultBodyLimit::max(state.config.limits.hard_frame_bytes))
        .with_state(state.clone());
    let engine = state.chat.engine().info().engine;
    tracing::info!(addr = %listener.local_addr()?, engine, "serving");
    let token = state.shutdown.clone();
    // Revisions are small frames sent one after another: without TCP_NODELAY each waits for
    // the client's delayed ACK (about 40 ms) instead of leaving at once.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set");
        }
    });
    axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(async move { token.cancelled().await })
        .await?;
    state.tasks.close();
    state.tasks.wait().await;
    state.drained.cancelled().await;
    tracing::info!("shut down");
    Ok(())
}
