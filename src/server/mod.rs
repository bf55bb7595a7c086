//! The network edge: one port serving the WebSocket chat endpoint and the operational HTTP
//! endpoints, plus graceful shutdown.
//!
//! - [`connection`]: one WebSocket connection (frames, limits, pings, dispatch).
//! - [`reply`]: one reply, from the stored user message to the stored assistant message.
//! - [`http`]: `/health`, `/ready`, `/metrics`.
//! - [`errors`]: the only place subsystem errors become wire errors.
//!
//! [`run`] takes any bound listener and any shutdown future, so tests run the real server on
//! `127.0.0.1:0`.

mod connection;
mod errors;
mod http;
mod reply;

use std::collections::HashSet;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::engine::Engine;
use crate::sessions::SessionStore;

/// What the server is built from.
pub struct Services {
    pub config: Config,
    pub store: Arc<dyn SessionStore>,
    pub engine: Arc<dyn Engine>,
    pub system_prompt: String,
}

/// State shared by every connection.
pub(crate) struct AppState {
    pub config: Config,
    pub store: Arc<dyn SessionStore>,
    pub engine: Arc<dyn Engine>,
    pub system_prompt: String,
    pub metrics: PrometheusHandle,
    /// One permit per open WebSocket; taken before the upgrade so overload is refused cheaply.
    pub connections: Arc<Semaphore>,
    /// Sessions with a reply running on this replica: a session runs one reply at a time, so
    /// its history stays a strict user/assistant alternation.
    pub busy_sessions: Mutex<HashSet<String>>,
    /// Cancelled when shutdown starts.
    pub shutdown: CancellationToken,
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
    let Services {
        config,
        store,
        engine,
        system_prompt,
    } = services;
    if config.auth.keys.is_empty() {
        tracing::warn!("no API keys configured: authentication is OFF and every client is \"anonymous\"");
    }
    let state = Arc::new(AppState {
        connections: Arc::new(Semaphore::new(config.server.max_connections)),
        config,
        store,
        engine,
        system_prompt,
        metrics: crate::metrics::install(),
        busy_sessions: Mutex::new(HashSet::new()),
        shutdown: CancellationToken::new(),
        tasks: TaskTracker::new(),
    });
    let token = state.shutdown.clone();
    tokio::spawn(async move {
        shutdown.await;
        token.cancel();
    });

    let app = Router::new()
        .route("/v1/chat", get(connection::upgrade))
        .route("/health", get(http::health))
        .route("/ready", get(http::ready))
        .route("/metrics", get(http::metrics))
        .with_state(state.clone());
    tracing::info!(addr = %listener.local_addr()?, engine = state.engine.info().engine, "serving");
    let token = state.shutdown.clone();
    axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(async move { token.cancelled().await })
        .await?;
    state.tasks.close();
    state.tasks.wait().await;
    tracing::info!("shut down");
    Ok(())
}
