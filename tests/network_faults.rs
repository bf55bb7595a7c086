//! Network faults, through a small TCP proxy of the test's own on loopback whose mode the test
//! switches (pass, blackhole, reset, delay): between the service and Redis, a blackholed Redis
//! behaves like a paused one (requests fail in time, the service recovers) and a slow one only
//! makes turns slower; between a client and the service, a socket reset mid-reply leaves neither
//! the reply nor the session lease behind.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{http_get, test_config, Client, TestServer};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A request made while Redis is unreachable must fail within this long.
const DEADLINE: Duration = Duration::from_secs(2);
/// Once Redis is reachable again, the service must answer within this long.
const RECOVERY: Duration = Duration::from_secs(3);

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    /// Bytes go through.
    Pass,
    /// Connections are accepted and read, and nothing goes anywhere: packets lost in a partition.
    Blackhole,
    /// Every connection, open or new, is closed with a reset (RST).
    Reset,
    /// Bytes go through after this long.
    Delay(Duration),
}

/// A TCP proxy from a loopback port to `upstream`.
struct FaultProxy {
    port: u16,
    mode: watch::Sender<Mode>,
}

impl FaultProxy {
    async fn start(upstream: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (mode, _) = watch::channel(Mode::Pass);
        let modes = mode.clone();
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let upstream = upstream.clone();
                let mode = modes.subscribe();
                tokio::spawn(async move {
                    if *mode.borrow() == Mode::Reset {
                        return reset(client);
                    }
                    let Ok(server) = TcpStream::connect(&upstream).await else {
                        return reset(client);
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (client, server) = (Arc::new(client), Arc::new(server));
                    let up = tokio::spawn(pump(client.clone(), server.clone(), mode.clone()));
                    let down = tokio::spawn(pump(server.clone(), client.clone(), mode.clone()));
                    let _ = tokio::join!(up, down);
                    if let (Ok(client), Ok(server)) = (Arc::try_unwrap(client), Arc::try_unwrap(server)) {
                        reset(client);
                        reset(server);
                    }
                });
            }
        });
        Self { port, mode }
    }

    fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }
}

/// Closes `stream` with a reset instead of an orderly shutdown.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

/// Copies `from` to `to` under the current mode until either side closes or the mode is reset.
async fn pump(from: Arc<TcpStream>, to: Arc<TcpStream>, mut mode: watch::Receiver<Mode>) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        tokio::select! {
            readable = from.readable() => {
                if readable.is_err() {
                    return;
                }
                let n = match from.try_read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(_) => return,
                };
                let current = *mode.borrow();
                match current {
                    Mode::Pass => {}
                    Mode::Blackhole => continue,
                    Mode::Reset => return,
                    Mode::Delay(d) => tokio::time::sleep(d).await,
                }
                if write_all(&to, &buf[..n]).await.is_err() {
                    return;
                }
            }
            changed = mode.changed() => {
                if changed.is_err() || *mode.borrow() == Mode::Reset {
                    return;
                }
            }
        }
    }
}

async fn write_all(to: &TcpStream, mut bytes: &[u8]) -> std::io::Result<()> {
    while !bytes.is_empty() {
        to.writable().await?;
        match to.try_write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The proxy itself works: bytes go through, a reset closes an open connection at once.
#[tokio::test]
async fn the_proxy_passes_bytes_and_resets_connections() {
    let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = echo.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = echo.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let proxy = FaultProxy::start(upstream).await;
    let mut s = TcpStream::connect(("127.0.0.1", proxy.port)).await.unwrap();
    s.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
    proxy.set(Mode::Reset);
    let read = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "the open connection was closed: {read:?}"
    );
}

async fn server_via(proxy: &FaultProxy) -> TestServer {
    let mut config = test_config();
    config.store.url = format!("redis://127.0.0.1:{}", proxy.port);
    TestServer::start(config).await
}

fn redis_upstream() -> String {
    common::redis_url()
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .to_owned()
}

async fn user_messages(client: &mut Client, session: &str) -> Vec<String> {
    client
        .history(session)
        .await
        .iter()
        .filter(|m| m["role"] == "user")
        .map(|m| m["content"].as_str().unwrap().to_owned())
        .collect()
}

/// A short turn whose `client_message_id` is its content.
async fn try_turn(client: &mut Client, session: &str, content: &str) -> Result<Vec<Value>, Value> {
    client.try_turn(session, content, content).await
}

#[tokio::test]
async fn a_blackholed_redis_fails_requests_in_time_and_the_service_recovers() {
    let proxy = FaultProxy::start(redis_upstream()).await;
    let server = server_via(&proxy).await;
    let mut client = server.connect().await;
    let session = client.create_session().await;
    try_turn(&mut client, &session, "before").await.unwrap();

    proxy.set(Mode::Blackhole);
    let asked = Instant::now();
    let error = try_turn(&mut client, &session, "into the void").await.unwrap_err();
    let took = asked.elapsed();
    assert_eq!(error["error"]["code"], "store_unavailable", "{error}");
    assert!(took < DEADLINE, "refused after {took:?}");
    let asked = Instant::now();
    let (status, body) = http_get(&server.http_url("/ready")).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        asked.elapsed() < DEADLINE,
        "/ready answered after {:?}",
        asked.elapsed()
    );

    proxy.set(Mode::Pass);
    let back = Instant::now();
    loop {
        match try_turn(&mut client, &session, "after").await {
            Ok(events) => {
                assert_eq!(events.last().unwrap()["status"], "completed", "{events:?}");
                break;
            }
            Err(e) => {
                assert_eq!(e["error"]["code"], "store_unavailable", "{e}");
                assert!(
                    back.elapsed() < RECOVERY,
                    "still refused {:?} after the partition",
                    back.elapsed()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    eprintln!(
        "after a Redis blackhole: answering again {:?} after it ended",
        back.elapsed()
    );
    let users = user_messages(&mut client, &session).await;
    assert_eq!(users, vec!["before", "after"], "the refused message was not stored");
    server.stop().await;
}

#[tokio::test]
async fn a_slow_redis_makes_turns_slower_and_nothing_fails() {
    let proxy = FaultProxy::start(redis_upstream()).await;
    let server = server_via(&proxy).await;
    let mut client = server.connect().await;
    let session = client.create_session().await;
    // Each way, well inside the command timeout (store.command_timeout_ms, 1 s).
    proxy.set(Mode::Delay(Duration::from_millis(50)));
    let started = Instant::now();
    for turn in ["one", "two"] {
        let events = try_turn(&mut client, &session, turn).await.unwrap();
        assert_eq!(events.last().unwrap()["status"], "completed", "{events:?}");
    }
    eprintln!("two turns with 50 ms each way to Redis: {:?}", started.elapsed());
    assert_eq!(user_messages(&mut client, &session).await, vec!["one", "two"]);
    server.stop().await;
}

#[tokio::test]
async fn a_client_socket_reset_mid_reply_leaves_no_reply_or_lease_behind() {
    let server = TestServer::start(test_config()).await;
    let proxy = FaultProxy::start(server.addr.to_string()).await;
    let mut client = Client::connect(&format!("ws://127.0.0.1:{}/v1/chat", proxy.port)).await;
    let session = client.create_session().await;
    client
        .send(
            json!({"type": "message.create", "session_id": session, "content": "long please",
                     "options": {"max_tokens": 256, "steps": 256, "block_length": 32}}),
        )
        .await;
    client.until("response.revision").await;
    proxy.set(Mode::Reset);
    drop(client);

    // The reply outlives its socket (chat.finish_orphaned_replies) and is stored; then the session
    // takes the next message at once: no lease is left behind.
    let mut direct = server.connect().await;
    let deadline = Instant::now() + common::WAIT;
    let history = loop {
        direct
            .send(json!({"type": "session.resume", "session_id": session}))
            .await;
        let resumed = direct.until("session.resumed").await.pop().unwrap();
        if resumed.get("running").is_none() {
            break resumed["messages"].as_array().unwrap().clone();
        }
        assert!(Instant::now() < deadline, "the reply still runs: {resumed}");
        direct.until("response.done").await;
    };
    assert_eq!(history.len(), 2, "{history:?}");
    assert_eq!(history[1]["status"], "completed", "{history:?}");
    let events = direct.exchange(&session, "and now?", json!({})).await;
    assert_eq!(events.last().unwrap()["status"], "completed", "not busy: {events:?}");
    server.stop().await;
}
