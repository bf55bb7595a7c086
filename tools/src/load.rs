//! Load on one replica over loopback: how many WebSocket connections it holds, what an idle one
//! costs, and what chatting clients see under it.
//!
//! [`run`] starts `dllm-chat serve` as a child process on a free loopback port (so its memory can
//! be read from `/proc` apart from the clients'), opens connections in steps (1,000, 2,000, …)
//! all at once, times each handshake, reads the server's resident memory once they are idle, and
//! then has some of them chat. Every loop is bounded by a count and a deadline, and all traffic
//! stays on 127.0.0.1.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What to measure.
#[derive(Debug, Clone)]
pub struct LoadPlan {
    /// The `dllm-chat` binary to start.
    pub server: PathBuf,
    /// `--model` for the server.
    pub model: String,
    /// Connection counts to reach, in order (each step adds to the last).
    pub steps: Vec<usize>,
    /// Of the connections held, how many then chat at once.
    pub chatting: usize,
    /// Messages each chatting client sends.
    pub messages: usize,
    /// The longest any one step may take.
    pub step_deadline: Duration,
}

/// One connection step.
#[derive(Debug, Clone)]
pub struct StepResult {
    pub connections: usize,
    pub opened: usize,
    /// Why connections failed, with counts.
    pub failures: Vec<(String, usize)>,
    pub handshake_p50: Duration,
    pub handshake_p99: Duration,
    pub server_rss_kib: u64,
    /// Resident memory added per connection since the server was idle.
    pub kib_per_connection: f64,
}

/// The chatting phase.
#[derive(Debug, Clone, Default)]
pub struct ChatResult {
    pub clients: usize,
    pub replies: usize,
    /// Error codes the server answered, with counts.
    pub errors: Vec<(String, usize)>,
    pub first_revision_p50: Duration,
    pub first_revision_p99: Duration,
    pub reply_p50: Duration,
    pub reply_p99: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("starting the server: {0}")]
    Start(String),
}

struct Server {
    child: Child,
    port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    async fn start(plan: &LoadPlan, max_connections: usize) -> Result<Self, LoadError> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| LoadError::Start(e.to_string()))?
            .port();
        let child = Command::new(&plan.server)
            .args(["serve", "--bind", &format!("127.0.0.1:{port}"), "--model", &plan.model])
            .env("DLLM_SERVER__MAX_CONNECTIONS", max_connections.to_string())
            // Chatting clients send as fast as they get answers.
            .env("DLLM_LIMITS__MESSAGE_BURST", "1000")
            .env("DLLM_LIMITS__MESSAGES_PER_MINUTE", "6000")
            // Every client is one loopback address and one key: the shared quotas would
            // measure themselves, not the replica.
            .env("DLLM_QUOTAS__IP_CONNECTIONS", "0")
            .env("DLLM_QUOTAS__IP_REQUESTS_PER_MINUTE", "0")
            .env("DLLM_QUOTAS__KEY_CONNECTIONS", "0")
            .env("DLLM_QUOTAS__KEY_MESSAGES_PER_MINUTE", "0")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| LoadError::Start(format!("{}: {e}", plan.server.display())))?;
        let server = Self { child, port };
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            if Instant::now() > deadline {
                return Err(LoadError::Start("the server did not listen within 60 s".into()));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(server)
    }

    fn url(&self) -> String {
        format!("ws://127.0.0.1:{}/v1/chat", self.port)
    }

    /// Resident memory, from `/proc/PID/status`.
    fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse().ok())
            })
            .unwrap_or(0)
    }
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn tally(items: impl IntoIterator<Item = String>) -> Vec<(String, usize)> {
    let mut counts = std::collections::BTreeMap::new();
    for item in items {
        *counts.entry(item).or_insert(0) += 1;
    }
    counts.into_iter().collect()
}

/// Opens `n` connections at once; returns the sockets and each handshake's time or failure.
async fn open(url: &str, n: usize, deadline: Duration) -> (Vec<Socket>, Vec<Duration>, Vec<String>) {
    let attempts = (0..n).map(|_| async {
        let started = Instant::now();
        match tokio::time::timeout(deadline, tokio_tungstenite::connect_async(url)).await {
            Ok(Ok((socket, _))) => Ok((socket, started.elapsed())),
            Ok(Err(e)) => Err(e.to_string().chars().take(60).collect::<String>()),
            Err(_) => Err("timed out".to_owned()),
        }
    });
    let mut sockets = Vec::new();
    let mut times = Vec::new();
    let mut failures = Vec::new();
    for r in futures_util::future::join_all(attempts).await {
        match r {
            Ok((s, t)) => {
                sockets.push(s);
                times.push(t);
            }
            Err(e) => failures.push(e),
        }
    }
    (sockets, times, failures)
}

async fn next_event(socket: &mut Socket, deadline: Instant) -> Option<Value> {
    loop {
        let frame = tokio::time::timeout_at(deadline.into(), socket.next()).await.ok()??;
        match frame.ok()? {
            Message::Text(t) => return serde_json::from_str(t.as_str()).ok(),
            Message::Close(_) => return None,
            _ => continue,
        }
    }
}

/// One client's conversation: `messages` turns, each timed to its first revision and its end.
async fn converse(socket: &mut Socket, messages: usize, deadline: Instant) -> (Vec<(Duration, Duration)>, Vec<String>) {
    let mut timings = Vec::new();
    let mut errors = Vec::new();
    let create = json!({"type": "session.create"}).to_string();
    if socket.send(Message::Text(create.into())).await.is_err() {
        return (timings, vec!["send failed".into()]);
    }
    let Some(session) = next_event(socket, deadline)
        .await
        .and_then(|e| e["session_id"].as_str().map(String::from))
    else {
        return (timings, vec!["no session".into()]);
    };
    for i in 0..messages {
        let message = json!({"type": "message.create", "session_id": session,
                             "content": format!("Where is my order NW-{:05}?", 10000 + i)});
        let sent = Instant::now();
        if socket.send(Message::Text(message.to_string().into())).await.is_err() {
            errors.push("send failed".into());
            break;
        }
        let mut first = None;
        let mut created = false;
        loop {
            let Some(event) = next_event(socket, deadline).await else {
                errors.push("no answer before the deadline".into());
                return (timings, errors);
            };
            match event["type"].as_str() {
                Some("response.created") => created = true,
                Some("response.revision") => {
                    first.get_or_insert_with(|| sent.elapsed());
                }
                Some("response.done") => {
                    if let Some(code) = event["error"]["code"].as_str() {
                        errors.push(code.to_owned());
                    } else {
                        timings.push((first.unwrap_or_default(), sent.elapsed()));
                    }
                    break;
                }
                // An error before `response.created` ends the turn; one after it is repeated
                // in `response.done`, counted there.
                Some("error") if !created => {
                    errors.push(event["error"]["code"].as_str().unwrap_or("error").to_owned());
                    break;
                }
                _ => {}
            }
        }
    }
    (timings, errors)
}

/// Runs the plan: connection steps, then the chatting phase on the connections held.
pub async fn run(plan: &LoadPlan) -> Result<(Vec<StepResult>, ChatResult), LoadError> {
    let most = plan.steps.iter().copied().max().unwrap_or(0);
    let server = Server::start(plan, most + 16).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle_rss = server.rss_kib();
    let mut held: Vec<Socket> = Vec::new();
    let mut steps = Vec::new();
    for &target in &plan.steps {
        let add = target.saturating_sub(held.len());
        let (sockets, mut times, failures) = open(&server.url(), add, plan.step_deadline).await;
        held.extend(sockets);
        times.sort();
        // Let the server settle (tasks parked, buffers at rest) before reading its memory.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rss = server.rss_kib();
        steps.push(StepResult {
            connections: target,
            opened: held.len(),
            failures: tally(failures),
            handshake_p50: quantile(&times, 0.5),
            handshake_p99: quantile(&times, 0.99),
            server_rss_kib: rss,
            kib_per_connection: rss.saturating_sub(idle_rss) as f64 / held.len().max(1) as f64,
        });
        if held.len() < target {
            break;
        }
    }

    let clients = plan.chatting.min(held.len());
    let deadline = Instant::now() + plan.step_deadline;
    let conversations = held
        .iter_mut()
        .take(clients)
        .map(|socket| converse(socket, plan.messages, deadline));
    let results = futures_util::future::join_all(conversations).await;
    let mut first: Vec<Duration> = Vec::new();
    let mut total: Vec<Duration> = Vec::new();
    let mut errors = Vec::new();
    for (timings, errs) in results {
        for (f, t) in timings {
            first.push(f);
            total.push(t);
        }
        errors.extend(errs);
    }
    first.sort();
    total.sort();
    let chat = ChatResult {
        clients,
        replies: total.len(),
        errors: tally(errors),
        first_revision_p50: quantile(&first, 0.5),
        first_revision_p99: quantile(&first, 0.99),
        reply_p50: quantile(&total, 0.5),
        reply_p99: quantile(&total, 0.99),
    };
    drop(held);
    Ok((steps, chat))
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

fn counts(c: &[(String, usize)]) -> String {
    if c.is_empty() {
        return "none".into();
    }
    c.iter()
        .map(|(k, n)| format!("{k} x{n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The figures as markdown tables.
pub fn report(steps: &[StepResult], chat: &ChatResult) -> String {
    let mut out = String::from(
        "| connections | opened | handshake p50 ms | handshake p99 ms | server RSS MiB | KiB per connection | failures |\n\
         | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for s in steps {
        out += &format!(
            "| {} | {} | {} | {} | {:.1} | {:.1} | {} |\n",
            s.connections,
            s.opened,
            ms(s.handshake_p50),
            ms(s.handshake_p99),
            s.server_rss_kib as f64 / 1024.0,
            s.kib_per_connection,
            counts(&s.failures)
        );
    }
    out += &format!(
        "\n{} of them chatting at once: {} replies, first revision p50 / p99 {} / {} ms, reply p50 / p99 {} / {} ms, errors: {}\n",
        chat.clients,
        chat.replies,
        ms(chat.first_revision_p50),
        ms(chat.first_revision_p99),
        ms(chat.reply_p50),
        ms(chat.reply_p99),
        counts(&chat.errors)
    );
    out
}
