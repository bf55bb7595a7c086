//! The network edge: one port serving the WebSocket chat endpoint and the operational HTTP
//! endpoints, plus graceful shutdown. A thin translator: frames become calls of the conversation
//! core ([`crate::chat::Chat`]) and its events become frames.
//!
//! - [`connection`]: one WebSocket connection (frames, limits, pings, dispatch).
//! - [`outbox`]: a connection's outgoing queue and the task that writes it to the socket.
//! - [`forward`]: one reply's events onto a connection, with the slow-reader policy.
//! - [`openai`]: the OpenAI-compatible `/v1/chat/completions` and `/v1/models`.
//! - [`chatwoot`]: the Chatwoot agent bot's webhook.
//! - [`http`]: `/health`, `/ready`, `/metrics`.
//! - [`stats`]: the timing feed `/v1/stats` behind the dashboard (admin keys only).
//! - [`tickets`]: `POST /v1/tickets`, one-time tickets for browser upgrades.
//! - [`web`]: the support widget (`/widget.js`), its demo page (`/`) and the latency dashboard
//!   (`/dashboard`).
//! - [`auth`]: the API key check every front end uses, the client's address, and the `Origin`
//!   allow-list.
//! - [`limits`]: the per-address request quota in front of every API route.
//! - [`errors`]: the only place subsystem errors become wire errors.
//!
//! [`run`] takes any bound listener and any shutdown future, so tests run the real server on
//! `127.0.0.1:0`.

mod auth;
mod chatwoot;
mod connection;
mod errors;
mod forward;
mod http;
mod limits;
mod openai;
mod outbox;
mod stats;
mod tickets;
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
use crate::keys::{BadKeyEntry, KeyRing};
use crate::quotas::Quotas;
use crate::tickets::Tickets;

/// What the server is built from.
pub struct Services {
    pub config: Config,
    pub chat: Chat,
    pub tickets: Tickets,
    pub quotas: Arc<Quotas>,
}

/// State shared by every connection.
pub(crate) struct AppState {
    pub config: Config,
    pub chat: Chat,
    pub tickets: Tickets,
    /// Connection slots and request rates shared with every replica on the store.
    pub quotas: Arc<Quotas>,
    pub metrics: PrometheusHandle,
    /// The digests of `config.auth.keys`, computed once at start.
    pub keys: KeyRing,
    /// One permit per open WebSocket; taken before the upgrade so overload is refused cheaply.
    pub connections: Arc<Semaphore>,
    /// The Chatwoot bot's API client, when `chatwoot.enabled`.
    pub chatwoot: Option<Arc<chatwoot::ChatwootClient>>,
    /// Cancelled when shutdown starts.
    pub shutdown: CancellationToken,
    /// Cancelled once the core has finished or cancelled every running reply.
    pub drained: CancellationToken,
    /// Every connection task, so shutdown can wait for their close frames.
    pub tasks: TaskTracker,
}

/// Binds `addr` with a listen backlog of `backlog` (tokio's `TcpListener::bind` uses 128, which
/// makes a burst of connects wait for SYN retransmits).
pub fn bind(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// CORS for `origins` (validated as `scheme://host[:port]` or `"*"`); none allows no other origin.
fn cors(origins: &[String]) -> tower_http::cors::CorsLayer {
    use axum::http::{header, HeaderValue, Method};
    use tower_http::cors::{AllowOrigin, CorsLayer};
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    CorsLayer::new()
        .allow_origin(allow)
        .allow_methods([Method::GET, Method::POST])
        .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
        .max_age(std::time::Duration::from_secs(600))
}

/// Errors that stop the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("serving failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Keys(#[from] BadKeyEntry),
    #[error("the Chatwoot bot: {0}")]
    Chatwoot(#[from] chatwoot::ChatwootError),
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
        chat,
        tickets,
        quotas,
    } = services;
    let keys = KeyRing::new(&config.auth)?;
    warn_about_auth(&config);
    let chatwoot = match config.chatwoot.enabled {
        true => Some(Arc::new(chatwoot::ChatwootClient::new(&config.chatwoot)?)),
        false => None,
    };
    let state = Arc::new(AppState {
        chatwoot,
        keys,
        connections: Arc::new(Semaphore::new(config.server.max_connections)),
        config,
        chat,
        tickets,
        quotas,
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

    // Browsers on the allowed origins may call the OpenAI-compatible API from their pages.
    let api = Router::new()
        .route("/v1/chat/completions", post(openai::completions))
        .route("/v1/models", get(openai::models))
        .layer(cors(&state.config.server.allowed_origins));
    // Every API route passes the client address's request quota first.
    let limited = Router::new()
        .route("/v1/chat", get(connection::upgrade))
        .route("/v1/stats", get(stats::upgrade))
        .route("/v1/tickets", post(tickets::issue))
        .merge(api)
        .route("/integrations/chatwoot", post(chatwoot::webhook))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            limits::address_rate,
        ));
    let app = Router::new()
        .merge(limited)
        .route("/health", get(http::health))
        .route("/ready", get(http::ready))
        .route("/metrics", get(http::metrics))
        .route("/", get(web::demo))
        .route("/widget.js", get(web::widget))
        .route("/dashboard", get(web::dashboard))
        .route("/dashboard.js", get(web::dashboard_script))
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

/// The start-up warnings about authentication settings. Never logs a key or a digest.
fn warn_about_auth(config: &Config) {
    let auth = &config.auth;
    if auth.keys.is_empty() {
        tracing::warn!("no API keys configured: authentication is OFF and every client is \"anonymous\"");
    }
    for (i, k) in auth.keys.iter().enumerate() {
        if k.key.is_some() {
            tracing::warn!(
                name = %k.name,
                "DEPRECATED: auth.keys[{i}] holds a plain `key`; replace it with \
                 `digest = \"sha256:<hex>\"` (printf %s KEY | sha256sum), or make a new key with \
                 `dllm-chat keys new`"
            );
        }
    }
    if auth.allow_query_key && !auth.keys.is_empty() {
        tracing::warn!("auth.allow_query_key is on: keys sent as ?api_key= end up in proxy and access logs");
    }
}
