//! The composition root: the one place start-up builds the service from its configuration (the
//! model, the engine, the session store and the conversation core), for `serve` and for tests;
//! and the logging both binaries set up.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::chat::{Chat, ChatParts, ValidationError, Validator};
use crate::config::{Config, ConfigError};
use crate::engine::{self, Engine, EngineError};
use crate::models::ModelError;
use crate::quotas::Quotas;
use crate::server::Services;
use crate::sessions::{self, SessionStore, StoreError};
use crate::tickets::Tickets;

/// Logs to stderr, at `RUST_LOG`'s levels (llama.cpp's own chatter off by default).
pub fn init_tracing() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,llama_cpp_2=error,llama-cpp-2=error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
}

/// Why the service could not be built.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("invalid setting: {0}")]
    Defaults(#[from] ValidationError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("opening the session store {url}: {source}")]
    Store { url: String, source: StoreError },
}

/// Validates `config`, loads the model onto its engine thread, opens the store and starts the
/// conversation core. Call inside a tokio runtime.
pub async fn build(config: Config) -> Result<Services, StartError> {
    config.validate()?;
    // Settings are checked before the model loads, which takes a while.
    Validator::new(&config.decode, &config.limits)?;
    config.system_prompt()?;
    let model_path = crate::models::resolve(&config.model.path)?;
    tracing::info!(model = %model_path.display(), "loading model");
    let started = Instant::now();
    let settings = config.engine_settings();
    let engine = tokio::task::spawn_blocking(move || engine::start(&settings, model_path))
        .await
        .map_err(|e| EngineError::Load {
            path: config.model.path.clone(),
            reason: e.to_string(),
        })??;
    tracing::info!(ms = started.elapsed().as_millis() as u64, "model loaded");
    let store = sessions::open(&config.store)
        .await
        .map_err(|source| StartError::Store {
            url: config.store.url.clone(),
            source,
        })?;
    assemble(config, engine, store)
}

/// The service on an engine and a store that are already running (the benchmark shares one
/// engine between cases). Call inside a tokio runtime.
pub fn assemble(config: Config, engine: Arc<dyn Engine>, store: Arc<dyn SessionStore>) -> Result<Services, StartError> {
    config.validate()?;
    let tickets = Tickets::new(store.clone(), Duration::from_secs(config.auth.ticket_ttl_secs));
    let quotas = Quotas::start(store.clone(), config.quotas.clone());
    let chat = Chat::start(ChatParts {
        quotas: quotas.clone(),
        validator: Validator::new(&config.decode, &config.limits)?,
        system_prompt: config.system_prompt()?,
        config: config.chat.clone(),
        store,
        engine,
    });
    Ok(Services {
        config,
        chat,
        tickets,
        quotas,
    })
}
