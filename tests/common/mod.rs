//! Shared helpers for the black-box tests: a real server on 127.0.0.1:0 with the real reference
//! engine on the fixture GGUF, a real WebSocket client, and a real Redis.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use dllm_chat::config::Config;
use dllm_chat::engine::{self, Engine};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long any single wait in a test may take before it fails.
pub const WAIT: Duration = Duration::from_secs(30);

/// The random-weight fixture model, written once per machine.
pub fn fixture_model() -> PathBuf {
    dllm_chat::models::fixture_in(&std::env::temp_dir().join("dllm-chat-tests")).expect("fixture model")
}

/// The Redis the tests use: `DLLM_TEST_REDIS_URL`, else the default local port. `.ci/run` starts it.
pub fn redis_url() -> String {
    std::env::var("DLLM_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A config for tests: memory store, small replies, a unique Redis key prefix.
pub fn test_config() -> Config {
    let mut c = Config::defaults();
    c.server.bind = "127.0.0.1:0".parse().unwrap();
    c.model.path = fixture_model().display().to_string();
    c.model.context_length = 1024;
    // One ggml thread per engine: tests run in parallel on small machines, and spinning worker
    // threads of several engines would fight over the cores.
    c.model.threads = 1;
    c.decode.max_tokens = 16;
    c.decode.steps = 16;
    c.decode.block_length = 8;
    c.store.key_prefix = format!("dllm-test-{}", uuid::Uuid::new_v4().simple());
    c
}

pub async fn start_engine(config: &Config) -> Arc<dyn Engine> {
    let settings = config.engine_settings();
    let path = PathBuf::from(&config.model.path);
    tokio::task::spawn_blocking(move || engine::start(&settings, path))
        .await
        .unwrap()
        .expect("engine starts")
}

pub struct TestServer {
    pub addr: SocketAddr,
    pub config: Config,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl TestServer {
    pub async fn start(config: Config) -> Self {
        let services = dllm_chat::app::build(config.clone()).await.expect("service builds");
        let listener = tokio::net::TcpListener::bind(config.server.bind).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(async move {
            dllm_chat::run(listener, services, async {
                let _ = rx.await;
            })
            .await
            .expect("server runs");
        });
        Self {
            addr,
            config,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    pub async fn connect(&self) -> Client {
        Client::connect(&format!("ws://{}/v1/chat", self.addr)).await
    }

    /// Connects to `/v1/chat` with extra headers on the upgrade request.
    pub async fn connect_with(&self, headers: &[(&str, &str)]) -> Client {
        Client::connect_with(&format!("ws://{}/v1/chat", self.addr), headers).await
    }

    pub fn http_url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Signals shutdown and waits for the server to return.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(WAIT, task)
                .await
                .expect("server stops in time")
                .unwrap();
        }
    }

    pub fn begin_stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// A loopback address with a port free right now, for a server process of a test's own.
pub fn free_loopback_addr() -> SocketAddr {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("127.0.0.1:{port}").parse().unwrap()
}

/// Waits until the server process on `addr` answers `/ready` with 200 (panics after [`WAIT`]).
pub async fn wait_ready(addr: SocketAddr) {
    let deadline = std::time::Instant::now() + WAIT;
    let url = format!("http://{addr}/ready");
    loop {
        if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(1), reqwest::get(&url)).await {
            if r.status().is_success() {
                return;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the server on {addr} did not become ready"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A real WebSocket client.
pub struct Client {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl Client {
    pub async fn connect(url: &str) -> Self {
        let (ws, _) = tokio_tungstenite::connect_async(url).await.expect("websocket connects");
        Self { ws }
    }

    /// Connects with extra headers (`Authorization`, `Origin`, ...) on the upgrade request.
    pub async fn connect_with(url: &str, headers: &[(&str, &str)]) -> Self {
        Self::try_connect_with(url, headers).await.expect("websocket connects")
    }

    /// Like [`Client::connect_with`], but an upgrade the server refuses (an HTTP status instead
    /// of 101 comes as `tungstenite::Error::Http`) is returned instead of panicking.
    pub async fn try_connect_with(
        url: &str,
        headers: &[(&str, &str)],
    ) -> Result<Self, tokio_tungstenite::tungstenite::Error> {
        let mut request = url.into_client_request()?;
        for (name, value) in headers {
            let name = http::HeaderName::from_bytes(name.as_bytes()).expect("a header name");
            request
                .headers_mut()
                .insert(name, http::HeaderValue::from_str(value).expect("a header value"));
        }
        let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(request))
            .await
            .expect("upgrade answered in time")?;
        Ok(Self { ws })
    }

    pub async fn send(&mut self, v: Value) {
        self.ws.send(Message::Text(v.to_string().into())).await.unwrap();
    }

    pub async fn send_raw(&mut self, m: Message) {
        self.ws.send(m).await.unwrap();
    }

    /// The next JSON event (pings are skipped); panics on close or timeout. The deadline counts from
    /// the call, so the server's keep-alive pings cannot extend it.
    pub async fn recv(&mut self) -> Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let m = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .expect("event in time");
            match m {
                Some(Ok(Message::Text(t))) => return serde_json::from_str(t.as_str()).unwrap(),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    /// The next frame of any kind, or `None` when the stream ended.
    pub async fn next_frame(&mut self) -> Option<Message> {
        tokio::time::timeout(WAIT, self.ws.next())
            .await
            .expect("frame in time")
            .and_then(|r| r.ok())
    }

    /// Events until one of type `kind` (inclusive).
    pub async fn until(&mut self, kind: &str) -> Vec<Value> {
        let mut events = vec![];
        loop {
            let e = self.recv().await;
            let done = e["type"] == kind;
            events.push(e);
            if done {
                return events;
            }
        }
    }

    pub async fn create_session(&mut self) -> String {
        self.send(json!({"type": "session.create"})).await;
        let e = self.recv().await;
        assert_eq!(e["type"], "session.created", "{e}");
        e["session_id"].as_str().unwrap().to_owned()
    }

    /// Sends a short message (8 tokens) with `client_message_id` `id`: its events up to
    /// `response.done`, or the error it got first (for tests of faults, where refusals are expected).
    pub async fn try_turn(&mut self, session: &str, content: &str, id: &str) -> Result<Vec<Value>, Value> {
        self.send(
            json!({"type": "message.create", "session_id": session, "content": content,
                          "client_message_id": id, "options": {"max_tokens": 8, "steps": 8}}),
        )
        .await;
        let first = self.recv().await;
        if first["type"] == "error" {
            return Err(first);
        }
        let mut events = vec![first];
        events.extend(self.until("response.done").await);
        Ok(events)
    }

    /// The session's stored messages, through `session.resume`.
    pub async fn history(&mut self, session: &str) -> Vec<Value> {
        self.send(json!({"type": "session.resume", "session_id": session}))
            .await;
        let resumed = self.until("session.resumed").await.pop().unwrap();
        resumed["messages"].as_array().unwrap().clone()
    }

    /// Sends a message and returns every event up to and including `response.done`.
    pub async fn exchange(&mut self, session_id: &str, content: &str, options: Value) -> Vec<Value> {
        self.send(json!({"type": "message.create", "session_id": session_id, "content": content, "options": options}))
            .await;
        self.until("response.done").await
    }
}

/// The revisions and the done event of one exchange.
pub fn revisions(events: &[Value]) -> Vec<&Value> {
    events.iter().filter(|e| e["type"] == "response.revision").collect()
}

/// GET over loopback; returns (status, body).
pub async fn http_get(url: &str) -> (u16, String) {
    let r = tokio::time::timeout(WAIT, reqwest::get(url))
        .await
        .expect("response in time")
        .expect("request");
    let status = r.status().as_u16();
    (status, r.text().await.unwrap())
}
