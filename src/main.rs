//! The `dllm-chat` binary: `serve` runs the chat service, `keys new` makes an API key. The
//! command-line tools (`generate`, `eval`, `bench`) are the `dllm-tools` binary (`tools/`).

use anyhow::Context;
use clap::{Parser, Subcommand};
use dllm_chat::config::{CommonArgs, Config};

#[derive(Parser)]
#[command(version, about = "Real-time chat service for diffusion language models")]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
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
    /// API keys for `[[auth.keys]]`.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Print a new random key and the `[[auth.keys]]` table (with its digest) that admits it.
    New {
        /// The name sessions created with the key record as their owner.
        #[arg(long, default_value = "default")]
        name: String,
    },
}

fn main() -> anyhow::Result<()> {
    dllm_chat::app::init_tracing();
    let cli = Cli::parse();
    let (bind, store) = match cli.command {
        Command::Serve { bind, store } => (bind, store),
        Command::Keys {
            command: KeysCommand::New { name },
        } => return new_key(&name),
    };
    let config = cli.common.load(bind, store)?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(serve(config))
}

/// `keys new`: the key goes to the client, the table (holding only its digest) into the
/// configuration. Nothing is stored: a lost key is replaced, not recovered.
fn new_key(name: &str) -> anyhow::Result<()> {
    anyhow::ensure!(!name.trim().is_empty(), "--name must not be empty");
    let key = dllm_chat::keys::generate();
    println!("# The key, for the client (shown once; the service keeps only its digest):");
    println!("{key}");
    println!();
    println!("# For the service's configuration file:");
    print!("{}", dllm_chat::keys::config_snippet(name, &key));
    Ok(())
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
