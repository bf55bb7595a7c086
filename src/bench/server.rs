//! Concurrent conversations through the real server: an in-process server on `127.0.0.1:0` with
//! the given engine and an in-memory store, and one real WebSocket client per conversation, so the
//! figures include the protocol, sessions and revision streaming, not only the engine.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use super::{peak_rss_mib, percentile, ConcurrencyResult, Conversation};
use crate::config::Config;
use crate::engine::{DecodeOptions, Engine, Schedule};

/// Errors of a server run.
#[derive(Debug, thiserror::Error)]
pub enum ServerBenchError {
    #[error("could not start the server: {0}")]
    Start(String),
    #[error("client: {0}")]
    Client(String),
}

/// What one client measured.
struct ClientRun {
    first_revision: Duration,
    total: Duration,
    tokens: usize,
}

/// Runs `level` clients at once, each in its own new session, sending the last user message of one
/// conversation (cycling through them) with `options`, and reading until `response.done`.
pub async fn run_concurrent(
    config: &Config,
    engine: Arc<dyn Engine>,
    system_prompt: &str,
    conversations: &[Conversation],
    options: &DecodeOptions,
    level: usize,
) -> Result<ConcurrencyResult, ServerBenchError> {
    let mut config = config.clone();
    config.server.bind = "127.0.0.1:0".parse().expect("loopback address");
    config.store.url = "memory".into();
    config.server.max_connections = config.server.max_connections.max(level);
    let store = crate::sessions::open(&config.store)
        .await
        .map_err(|e| ServerBenchError::Start(e.to_string()))?;
    let listener = tokio::net::TcpListener::bind(config.server.bind)
        .await
        .map_err(|e| ServerBenchError::Start(e.to_string()))?;
    let url = format!(
        "ws://{}/v1/chat",
        listener
            .local_addr()
            .map_err(|e| ServerBenchError::Start(e.to_string()))?
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let services = crate::Services {
        config,
        store,
        engine,
        system_prompt: system_prompt.to_owned(),
    };
    let server = tokio::spawn(crate::run(listener, services, async {
        let _ = stopped.await;
    }));

    let mut wire_options = json!({"max_tokens": options.max_tokens, "block_length": options.block_length});
    if let Schedule::Threshold { tau } = options.schedule {
        wire_options["threshold"] = json!(tau);
    }
    let started = Instant::now();
    let clients = conversations.iter().cycle().take(level).map(|c| {
        let content = c
            .turns
            .iter()
            .rev()
            .find(|t| t.role == "user")
            .map(|t| t.content.clone())
            .unwrap_or_default();
        one_client(&url, content, wire_options.clone(), options.max_tokens)
    });
    let runs = futures_util::future::try_join_all(clients).await;
    let wall = started.elapsed().as_secs_f64();
    let _ = stop.send(());
    let _ = server.await;
    let runs = runs?;

    let mut first: Vec<Duration> = runs.iter().map(|r| r.first_revision).collect();
    let mut totals: Vec<Duration> = runs.iter().map(|r| r.total).collect();
    first.sort();
    totals.sort();
    Ok(ConcurrencyResult {
        conversations: level,
        aggregate_tokens_per_second: runs.iter().map(|r| r.tokens).sum::<usize>() as f64 / wall.max(1e-9),
        first_revision_p50: percentile(&first, 0.5),
        first_revision_p99: percentile(&first, 0.99),
        reply_p50: percentile(&totals, 0.5),
        reply_p99: percentile(&totals, 0.99),
        peak_rss_mib: peak_rss_mib(),
    })
}

/// One conversation: connect, create a session, send the message, read until `response.done`.
async fn one_client(url: &str, content: String, options: Value, canvas: usize) -> Result<ClientRun, ServerBenchError> {
    let fail = |e: String| ServerBenchError::Client(e);
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .map_err(|e| fail(e.to_string()))?;
    let send = |v: Value| Message::Text(v.to_string().into());
    ws.send(send(json!({"type": "session.create"})))
        .await
        .map_err(|e| fail(e.to_string()))?;
    let created = next_event(&mut ws).await?;
    let session = created["session_id"]
        .as_str()
        .ok_or_else(|| fail(format!("expected session.created, got {created}")))?
        .to_owned();
    let sent = Instant::now();
    ws.send(send(
        json!({"type": "message.create", "session_id": session, "content": content, "options": options}),
    ))
    .await
    .map_err(|e| fail(e.to_string()))?;
    let mut first_revision = None;
    loop {
        let event = next_event(&mut ws).await?;
        match event["type"].as_str() {
            Some("response.revision") => {
                first_revision.get_or_insert_with(|| sent.elapsed());
            }
            Some("response.done") if event["status"] == "completed" => {
                let total = sent.elapsed();
                let _ = ws.close(None).await;
                return Ok(ClientRun {
                    first_revision: first_revision.unwrap_or(total),
                    total,
                    // Every canvas position was decoded, end padding included (as in the engine table).
                    tokens: canvas.max(event["usage"]["completion_tokens"].as_u64().unwrap_or(0) as usize),
                });
            }
            Some("response.done") | Some("error") => return Err(fail(format!("reply failed: {event}"))),
            _ => {}
        }
    }
}

async fn next_event<S>(ws: &mut S) -> Result<Value, ServerBenchError>
where
    S: StreamExt<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => {
                return serde_json::from_str(&text).map_err(|e| ServerBenchError::Client(e.to_string()))
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(ServerBenchError::Client(e.to_string())),
            None => return Err(ServerBenchError::Client("the server closed the connection".into())),
        }
    }
}
