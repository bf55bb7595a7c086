//! A client that sends and never reads cannot make the server hold what it does not read: with
//! 32 long replies streaming to it (about 25 MB of revisions), most revisions are skipped and the
//! server process's peak resident memory stays within a few MiB of its peak for the same replies
//! streamed to a client that reads them, because each connection's outbox is bounded and a
//! reader that falls behind skips intermediate revisions.
//! Meanwhile other clients are served. The server runs as its own process (`dllm-chat serve`) so
//! its memory is its own.

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::Client;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

/// Sessions, each streaming one long reply to the reader that never reads.
const SESSIONS: usize = 32;
/// What the replies may add to the server's peak memory when nobody reads them, over its peak
/// for the same replies read, well under the 25 MB of revisions a server that queued them all
/// would hold on top. Seen here: +2.4 and +7.0 MiB (the read peak itself ranged 54-63 MiB).
/// The skipped revisions, counted below, are the exact check.
const MOST_GROWTH_KIB: u64 = 16 * 1024;
/// Of the 32 x 512 revisions, at least this share never reaches the silent client's queue.
const LEAST_SKIPPED_SHARE: f64 = 0.5;

struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    async fn start() -> Self {
        let addr = common::free_loopback_addr();
        let child = Command::new(env!("CARGO_BIN_EXE_dllm-chat"))
            .args(["serve", "--bind", &addr.to_string(), "--store", "memory"])
            .env("DLLM_MODEL__PATH", common::fixture_model())
            .env("DLLM_MODEL__THREADS", "1")
            .env("DLLM_MODEL__CONTEXT_LENGTH", "1024")
            // Only the current block is computed each step: long replies, little compute.
            .env("DLLM_MODEL__CACHE", "dual")
            // Each followed reply buffers this many events for its watchers: 32 replies at the
            // default 64 would hold 3 MiB of revisions by design, this keeps the bound small
            // beside what an unbounded server would hold (most of 25 MB).
            .env("DLLM_CHAT__WATCH_BUFFER", "8")
            // One more than the silent client's replies: another client is not queued behind them.
            .env("DLLM_LIMITS__MAX_RUNNING_REPLIES", (SESSIONS + 1).to_string())
            .env("DLLM_LIMITS__KEPT_CONVERSATION_CACHES", (SESSIONS + 1).to_string())
            .env("DLLM_LIMITS__MESSAGE_BURST", "1000")
            .env("DLLM_LIMITS__MESSAGES_PER_MINUTE", "6000")
            // The silent client must not be dropped for missing pongs during the test.
            .env("DLLM_SERVER__PING_INTERVAL_MS", "60000")
            .env("DLLM_SERVER__IDLE_TIMEOUT_MS", "120000")
            // glibc gives each thread that allocates under contention an arena of its own, and
            // how many the replies touch varies from run to run: without a cap the growth seen
            // here ranged from 2 to 30 MiB over runs with the same revisions skipped; with two
            // arenas, 1.5-4.8 MiB.
            .env("MALLOC_ARENA_MAX", "2")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("dllm-chat starts");
        let server = Self { child, addr };
        common::wait_ready(addr).await;
        server
    }

    async fn connect(&self) -> Client {
        Client::connect(&format!("ws://{}/v1/chat", self.addr)).await
    }

    fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("VmRSS in /proc/PID/status")
    }
}

/// A 512-token reply in `steps` revisions.
fn long_message(session: &str, steps: usize) -> serde_json::Value {
    json!({"type": "message.create", "session_id": session, "content": "tell me everything",
           "options": {"max_tokens": 512, "steps": steps, "block_length": 32, "policy": "fixed"}})
}

/// The server's count of revisions skipped for slow readers, from `/metrics`.
async fn revisions_skipped(server: &Server) -> f64 {
    let (status, body) = common::http_get(&format!("http://{}/metrics", server.addr)).await;
    assert_eq!(status, 200, "{body}");
    body.lines()
        .find_map(|l| l.strip_prefix("dllm_revisions_skipped_total "))
        .map_or(0.0, |v| v.trim().parse().expect("a number"))
}

/// Waits until no session in `sessions` has a running reply; returns the peak memory seen.
async fn until_done(server: &Server, sessions: &[String]) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut peak = server.rss_kib();
    for session in sessions {
        loop {
            peak = peak.max(server.rss_kib());
            // A connection per look: resuming a running reply also follows it, which this one
            // does not want.
            let mut look = server.connect().await;
            look.send(json!({"type": "session.resume", "session_id": session}))
                .await;
            let resumed = look.until("session.resumed").await.pop().unwrap();
            if resumed.get("running").is_none() {
                break;
            }
            assert!(Instant::now() < deadline, "the replies did not finish");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    peak.max(server.rss_kib())
}

/// Asks for a 512-revision reply in each of `sessions` on `sink`, and has another client
/// exchange a message while they stream; returns the peak memory until they are all done.
async fn stream_replies<S>(server: &Server, sink: &mut S, sessions: &[String]) -> u64
where
    S: futures_util::Sink<Message> + Unpin,
    S::Error: std::fmt::Debug,
{
    for session in sessions {
        sink.send(Message::Text(long_message(session, 512).to_string().into()))
            .await
            .unwrap();
    }
    let mut other = server.connect().await;
    let session = other.create_session().await;
    let events = other.exchange(&session, "still there?", json!({})).await;
    assert_eq!(events.last().unwrap()["status"], "completed", "{events:?}");
    until_done(server, sessions).await
}

#[tokio::test]
async fn a_client_that_never_reads_does_not_grow_the_servers_memory() {
    let server = Server::start().await;
    let mut setup = server.connect().await;

    // The same replies, with the same other client, to a client that reads them first: the
    // conversation caches, the engine's buffers for these batches and the allocator's arenas
    // are what they will be, and the peak while they stream is the baseline.
    let mut read = Vec::new();
    for _ in 0..SESSIONS {
        read.push(setup.create_session().await);
    }
    let (reading, mut events) = tokio_tungstenite::connect_async(format!("ws://{}/v1/chat", server.addr))
        .await
        .unwrap()
        .0
        .split();
    let reader = tokio::spawn(async move {
        let mut done = 0;
        while done < SESSIONS {
            let Some(Ok(Message::Text(text))) = events.next().await else {
                panic!("the reading client's socket closed");
            };
            done += usize::from(text.contains("\"response.done\""));
        }
    });
    let mut reading = reading;
    let baseline = stream_replies(&server, &mut reading, &read).await;
    reader.await.unwrap();

    let mut unread = Vec::new();
    for _ in 0..SESSIONS {
        unread.push(setup.create_session().await);
    }
    let (mut silent, _) = tokio_tungstenite::connect_async(format!("ws://{}/v1/chat", server.addr))
        .await
        .unwrap();
    let skipped_before = revisions_skipped(&server).await;
    let peak = stream_replies(&server, &mut silent, &unread).await;
    let skipped = revisions_skipped(&server).await - skipped_before;
    let growth = peak.saturating_sub(baseline);
    let revisions = (SESSIONS * 512) as f64;
    eprintln!(
        "{SESSIONS} replies of 512 revisions: server RSS peak {} MiB streamed to a client that read them, \
         {} MiB to one that never read (+{growth} KiB); {skipped} of {revisions} revisions skipped",
        baseline / 1024,
        peak / 1024
    );
    assert!(
        skipped >= revisions * LEAST_SKIPPED_SHARE,
        "only {skipped} of {revisions} revisions were skipped: the server queued what nobody read"
    );
    assert!(
        growth < MOST_GROWTH_KIB,
        "the server's memory grew by {growth} KiB more while nobody read"
    );
    // The silent client's messages were all taken: every reply is stored.
    let mut watcher = server.connect().await;
    for session in &unread {
        let history = watcher.history(session).await;
        assert_eq!(history.len(), 2, "{history:?}");
    }
    drop(silent);
}
