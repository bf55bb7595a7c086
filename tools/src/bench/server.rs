//! Concurrent conversations through the real server: an in-process server on `127.0.0.1:0` with
//! the given engine and an in-memory store, and one real WebSocket client per conversation, so the
//! figures include the protocol, sessions and revision streaming, not only the engine.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use super::{summarize, ConcurrencyResult, Conversation};
use dllm_chat::chat::MessageOptions;
use dllm_chat::config::Config;
use dllm_chat::engine::{DecodeOptions, Engine};

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

/// What a client sends of a conversation, in a new session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Asked {
    /// The last user message alone: a single question.
    LastMessage,
    /// Every user message in order, each after the reply to the one before: the server keeps the
    /// history, with the replies its own model gave.
    EveryUserTurn,
}

/// Replies to the first `total` conversations, `level` WebSocket clients at a time: each client sends
/// what `asked` says of one conversation in a new session with `options`, reads each reply until
/// `response.done`, then takes the next conversation. Every reply is one entry of the result.
pub async fn run_concurrent(
    config: &Config,
    engine: Arc<dyn Engine>,
    conversations: &[Conversation],
    options: &DecodeOptions,
    asked: Asked,
    level: usize,
    total: usize,
) -> Result<ConcurrencyResult, ServerBenchError> {
    let mut config = config.clone();
    config.server.bind = "127.0.0.1:0".parse().expect("loopback address");
    config.store.url = "memory".into();
    config.server.max_connections = config.server.max_connections.max(level);
    // One loopback address and one key send every message: the bench measures replies, not
    // the shared quotas.
    config.quotas.key_messages_per_minute = 0;
    config.quotas.ip_requests_per_minute = 0;
    let store = dllm_chat::sessions::open(&config.store)
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
    let services =
        dllm_chat::app::assemble(config, engine, store).map_err(|e| ServerBenchError::Start(e.to_string()))?;
    let server = tokio::spawn(dllm_chat::run(listener, services, async {
        let _ = stopped.await;
    }));

    // Every option, so a fixed or factor case runs that schedule and not the server's default.
    let wire_options = serde_json::to_value(MessageOptions::from(options)).expect("options serialize");
    let started = Instant::now();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let clients = (0..level.max(1)).map(|_| async {
        let mut runs = Vec::new();
        loop {
            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if i >= total || conversations.is_empty() {
                return Ok::<_, ServerBenchError>(runs);
            }
            let c = &conversations[i % conversations.len()];
            let mut messages: Vec<String> = c
                .turns
                .iter()
                .filter(|t| t.role == "user")
                .map(|t| t.content.clone())
                .collect();
            if asked == Asked::LastMessage {
                messages = messages.split_off(messages.len().saturating_sub(1));
            }
            runs.extend(one_client(&url, messages, wire_options.clone(), options.max_tokens).await?);
        }
    });
    let runs = futures_util::future::try_join_all(clients).await;
    let wall = started.elapsed();
    let _ = stop.send(());
    let _ = server.await;
    let runs: Vec<ClientRun> = runs?.into_iter().flatten().collect();
    Ok(summarize(
        level,
        wall,
        runs.iter().map(|r| (r.first_revision, r.total, r.tokens)),
    ))
}

/// One conversation: connect, create a session, send each message once the reply to the one
/// before is done, and time every reply.
async fn one_client(
    url: &str,
    messages: Vec<String>,
    options: Value,
    canvas: usize,
) -> Result<Vec<ClientRun>, ServerBenchError> {
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
    let mut runs = Vec::with_capacity(messages.len());
    for content in messages {
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
                    runs.push(ClientRun {
                        first_revision: first_revision.unwrap_or(total),
                        total,
                        // Every canvas position was decoded, end padding included (as in the engine table).
                        tokens: canvas.max(event["usage"]["completion_tokens"].as_u64().unwrap_or(0) as usize),
                    });
                    break;
                }
                Some("response.done") | Some("error") => return Err(fail(format!("reply failed: {event}"))),
                _ => {}
            }
        }
    }
    let _ = ws.close(None).await;
    Ok(runs)
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
