//! The `dllm-chat` binary: `serve` runs the chat service. The command-line tools (`generate`,
//! `eval`, `bench`) are the `dllm-tools` binary (`tools/`).

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use dllm_chat::config::Config;
use dllm_chat::engine::EngineKind;
use serde_json::{json, Map, Value};

#[derive(Parser)]
#[command(version, about = "Real-time chat service for diffusion language models")]
struct Cli {
    /// Configuration file (TOML); the built-in defaults apply to anything it leaves out.
    #[arg(long, global = true, env = "DLLM_CONFIG")]
    config: Option<PathBuf>,
    /// GGUF model path, `builtin:northwind` (the bundled model) or `builtin:fixture`.
    #[arg(long, global = true)]
    model: Option<String>,
    /// Engine implementation.
    #[arg(long, global = true, value_enum)]
    engine: Option<EngineKind>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the WebSocket chat endpoint and the HTTP endpoints.
    Serve {
        /// Address to listen on.
        #[arg(long)]
        bind: Option<String>,
        /// Session store: `memory` or a `redis://` URL.
        #[arg(long)]
        store: Option<String>,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,llama_cpp_2=error,llama-cpp-2=error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let mut patch = Map::new();
    let mut section = |name: &str, key: &str, value: Value| {
        let entry = patch.entry(name).or_insert_with(|| json!({}));
        entry[key] = value;
    };
    if let Some(m) = &cli.model {
        section("model", "path", json!(m));
    }
    if let Some(e) = cli.engine {
        section("model", "engine", serde_json::to_value(e)?);
    }
    let Command::Serve { bind, store } = &cli.command;
    if let Some(b) = bind {
        section("server", "bind", json!(b));
    }
    if let Some(s) = store {
        section("store", "url", json!(s));
    }
    let config = Config::load(cli.config.as_deref())?.merged(Value::Object(patch))?;
    let runtime = tokio::runtime::Runtime::new()?;
    match cli.command {
        Command::Serve { .. } => runtime.block_on(serve(config)),
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let (bind, backlog) = (config.server.bind, config.server.listen_backlog);
    let services = dllm_chat::app::build(config).await?;
    let listener = dllm_chat::bind(bind, backlog).with_context(|| format!("binding {bind}"))?;
    dllm_chat::run(listener, services, shutdown_signal()).await?;
    Ok(())
}

/// Resolves on ctrl-c or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    tracing::info!("shutdown requested");
}
