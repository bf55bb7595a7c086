//! Many replicas on one Redis, as real processes: the `dllm-chat serve` binary twice on one
//! `redis-server`, real WebSocket clients, and real signals (`kill -9`, `SIGSTOP`/`SIGCONT`).
//!
//! One reply per session across replicas, a reply resumed mid-way on the other replica, a reply
//! cancelled from the other replica, and a dead or stalled generator whose reply another replica
//! ends as `generator_lost` within the lease plus two seconds.

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{http_get, Client};
use serde_json::{json, Value};
use tokio::sync::Mutex;

/// The lease the replicas run with: short, so a lost generator is noticed quickly.
const LEASE_MS: u64 = 1500;

/// Replica processes compete for two cores; the tests here take turns so their timings hold.
static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

/// A long reply on the fixture model (about 8 ms a step on one thread): seconds, so there is
/// time to act while it runs.
fn long() -> Value {
    json!({"max_tokens": 512, "steps": 512, "block_length": 32})
}

struct Replica {
    child: Child,
    addr: SocketAddr,
}

impl Replica {
    /// Starts `dllm-chat serve` on a free loopback port with the Redis store under `prefix`
    /// and waits until `/ready` answers 200.
    async fn start(prefix: &str) -> Self {
        let addr = common::free_loopback_addr();
        let port = addr.port();
        let log = std::fs::File::create(std::env::temp_dir().join(format!("{prefix}-{port}.log"))).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_dllm-chat"))
            .args(["serve", "--bind", &addr.to_string(), "--store", &common::redis_url()])
            .env("DLLM_MODEL__PATH", common::fixture_model())
            .env("DLLM_MODEL__THREADS", "1")
            .env("DLLM_MODEL__CONTEXT_LENGTH", "1024")
            .env("DLLM_STORE__KEY_PREFIX", prefix)
            .env("DLLM_CHAT__LEASE_MS", LEASE_MS.to_string())
            .env("DLLM_CHAT__RECOVERY_INTERVAL_MS", "200")
            .env("RUST_LOG", "info,llama_cpp_2=error")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("dllm-chat starts");
        let replica = Self { child, addr };
        common::wait_ready(addr).await;
        replica
    }

    async fn connect(&self) -> Client {
        Client::connect(&format!("ws://{}/v1/chat", self.addr)).await
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{name}");
    }

    fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn prefix() -> String {
    format!("dllm-replicas-{}", uuid::Uuid::new_v4().simple())
}

async fn two_replicas() -> (String, Replica, Replica) {
    let p = prefix();
    let a = Replica::start(&p).await;
    let b = Replica::start(&p).await;
    (p, a, b)
}

/// A long reply under way on `replica`: its client (past the first revision), the session, and
/// the events so far (`message.accepted`, `response.created`, the first revision).
async fn long_reply(replica: &Replica, message: Value) -> (Client, String, Vec<Value>) {
    let mut asker = replica.connect().await;
    let session = asker.create_session().await;
    let mut message = message;
    message["type"] = json!("message.create");
    message["session_id"] = json!(session);
    if message.get("options").is_none() {
        message["options"] = long();
    }
    asker.send(message).await;
    let started = asker.until("response.revision").await;
    (asker, session, started)
}

/// A client on `replica` that resumed `session`, and the `session.resumed` it got.
async fn resumed_on(replica: &Replica, session: &str) -> (Client, Value) {
    let mut client = replica.connect().await;
    client
        .send(json!({"type": "session.resume", "session_id": session}))
        .await;
    let resumed = client.recv().await;
    assert_eq!(resumed["type"], "session.resumed", "{resumed}");
    (client, resumed)
}

/// Checks the revisions of `events` and returns the final text.
fn check_stream(events: &[Value], after_revision: u64) -> String {
    let revisions = common::revisions(events);
    assert!(!revisions.is_empty(), "some revisions arrive: {events:?}");
    let numbers: Vec<u64> = revisions.iter().map(|r| r["revision"].as_u64().unwrap()).collect();
    assert!(numbers[0] > after_revision, "{numbers:?} after {after_revision}");
    assert!(
        numbers.windows(2).all(|w| w[1] > w[0]),
        "revision numbers increase: {numbers:?}"
    );
    let masked: Vec<u64> = revisions.iter().map(|r| r["masked"].as_u64().unwrap()).collect();
    assert!(
        masked.windows(2).all(|w| w[1] <= w[0]),
        "masked never increases: {masked:?}"
    );
    let done = events.last().unwrap();
    assert_eq!(done["type"], "response.done");
    assert_eq!(done["status"], "completed", "{done}");
    done["text"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn concurrent_messages_on_two_replicas_give_one_reply_and_one_busy() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let (_, a, b) = two_replicas().await;
    let mut on_a = a.connect().await;
    let mut on_b = b.connect().await;
    for round in 0..5 {
        let session = on_a.create_session().await;
        let send = |content: &str| json!({"type": "message.create", "session_id": session, "content": content});
        let (sa, sb) = (send("from a"), send("from b"));
        tokio::join!(on_a.send(sa), on_b.send(sb));
        let (first_a, first_b) = tokio::join!(on_a.recv(), on_b.recv());
        let (winner, loser_event) = match (first_a["type"].as_str(), first_b["type"].as_str()) {
            (Some("message.accepted"), Some("error")) => (&mut on_a, first_b),
            (Some("error"), Some("message.accepted")) => (&mut on_b, first_a),
            _ => panic!("round {round}: exactly one accepted: {first_a} / {first_b}"),
        };
        assert_eq!(loser_event["error"]["code"], "busy", "round {round}: {loser_event}");
        let done = winner.until("response.done").await;
        assert_eq!(done.last().unwrap()["status"], "completed");
        let messages = on_a.history(&session).await;
        let roles: Vec<&str> = messages.iter().map(|m| m["role"].as_str().unwrap()).collect();
        assert_eq!(roles, vec!["user", "assistant"], "round {round}: {messages:?}");
    }
}

#[tokio::test]
async fn a_reply_resumed_on_the_other_replica_streams_to_its_end() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let (_, a, b) = two_replicas().await;
    let (mut asker, session, started) = long_reply(&a, json!({"content": "tell me everything"})).await;
    let response_id = started[1]["response_id"].as_str().unwrap().to_owned();

    let (mut watcher, resumed) = resumed_on(&b, &session).await;
    let running = &resumed["running"];
    assert_eq!(running["response_id"], response_id.as_str(), "{resumed}");
    assert_eq!(running["message_id"], started[0]["message_id"], "{resumed}");
    let seen = running["revision"].as_u64().unwrap();
    assert!(seen >= 1, "the running reply's newest revision: {running}");
    assert_eq!(
        resumed["messages"].as_array().unwrap().len(),
        1,
        "only the user message so far"
    );

    // A third client picks up the same response by id, later.
    let mut late = b.connect().await;
    late.send(json!({"type": "response.resume", "response_id": response_id, "after_revision": 2}))
        .await;
    assert_eq!(late.recv().await["type"], "response.resumed");

    let watched = watcher.until("response.done").await;
    let asked = asker.until("response.done").await;
    let text = check_stream(&watched, seen);
    assert_eq!(
        text,
        asked.last().unwrap()["text"].as_str().unwrap(),
        "the same reply on both replicas"
    );
    let late_events = late.until("response.done").await;
    assert_eq!(check_stream(&late_events, 2), text);

    // Once ended, response.resume answers with the end at once.
    late.send(json!({"type": "response.resume", "response_id": response_id}))
        .await;
    let again = late.until("response.done").await;
    assert_eq!(again.last().unwrap()["text"], text.as_str());
}

#[tokio::test]
async fn cancel_from_the_other_replica_stops_the_reply() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let (_, a, b) = two_replicas().await;
    let (mut asker, session, started) = long_reply(&a, json!({"content": "long"})).await;
    let response_id = started[1]["response_id"].as_str().unwrap().to_owned();
    let mut other = b.connect().await;
    other
        .send(json!({"type": "response.cancel", "response_id": response_id, "event_id": "c"}))
        .await;
    let done = asker.until("response.done").await;
    let done = done.last().unwrap();
    assert_eq!(done["status"], "cancelled", "{done}");
    assert!(done["timings"]["steps"].as_u64().unwrap() < 512);
    let messages = other.history(&session).await;
    assert_eq!(messages[1]["status"], "cancelled");
}

#[tokio::test]
async fn a_killed_generator_is_reported_lost_and_the_resend_is_answered_once() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let (_, mut a, b) = two_replicas().await;
    let (_asker, session, _) = long_reply(&a, json!({"content": "long one", "client_message_id": "c-1"})).await;
    let message = json!({"type": "message.create", "session_id": session, "content": "long one",
                         "client_message_id": "c-1", "options": long()});
    let (mut watcher, resumed) = resumed_on(&b, &session).await;
    assert!(resumed["running"].is_object(), "{resumed}");
    a.kill9();
    let killed = Instant::now();
    let events = watcher.until("response.done").await;
    let lost_after = killed.elapsed();
    let done = events.last().unwrap();
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error"]["code"], "generator_lost", "{done}");
    assert!(
        lost_after < Duration::from_millis(LEASE_MS + 2000),
        "generator_lost after {lost_after:?}"
    );
    eprintln!("generator_lost reached the other replica's client {lost_after:?} after kill -9 (lease {LEASE_MS} ms)");

    let messages = watcher.history(&session).await;
    let statuses: Vec<&Value> = messages.iter().map(|m| &m["status"]).collect();
    assert_eq!(statuses, vec![&Value::Null, &json!("failed")], "{messages:?}");

    // The client resends its message: generated once, stored once.
    watcher.send(message.clone()).await;
    let events = watcher.until("response.done").await;
    assert_eq!(events[0]["duplicate"], true, "{:?}", events[0]);
    assert_eq!(events.last().unwrap()["status"], "completed");
    watcher.send(message).await;
    let accepted = watcher.recv().await;
    assert_eq!(accepted["duplicate"], true);
    let messages = watcher.history(&session).await;
    let statuses: Vec<&Value> = messages.iter().map(|m| &m["status"]).collect();
    assert_eq!(
        statuses,
        vec![&Value::Null, &json!("failed"), &json!("completed")],
        "{messages:?}"
    );
}

#[tokio::test]
async fn a_stalled_generator_cannot_write_late() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let (_, a, b) = two_replicas().await;
    let (mut asker, session, _) = long_reply(&a, json!({"content": "long"})).await;
    let (mut watcher, resumed) = resumed_on(&b, &session).await;
    assert!(resumed["running"].is_object(), "{resumed}");

    a.signal("STOP");
    let stopped = Instant::now();
    let events = watcher.until("response.done").await;
    let lost_after = stopped.elapsed();
    assert_eq!(events.last().unwrap()["error"]["code"], "generator_lost");
    assert!(lost_after < Duration::from_millis(LEASE_MS + 2000), "{lost_after:?}");
    eprintln!("generator_lost {lost_after:?} after SIGSTOP (lease {LEASE_MS} ms)");
    a.signal("CONT");

    // The stalled replica wakes up, finds its lease gone and tells its own client so, without
    // writing anything.
    let own = asker.until("response.done").await;
    let own = own.last().unwrap();
    assert_eq!(own["status"], "failed", "{own}");
    assert_eq!(own["error"]["code"], "generator_lost", "{own}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let messages = watcher.history(&session).await;
    let assistants: Vec<&Value> = messages.iter().filter(|m| m["role"] == "assistant").collect();
    assert_eq!(assistants.len(), 1, "one assistant message for the turn: {messages:?}");
    assert_eq!(assistants[0]["status"], "failed");

    // The session is free again on either replica.
    let events = asker.exchange(&session, "again", json!({})).await;
    assert_eq!(events.last().unwrap()["status"], "completed");
    let (status, _) = http_get(&format!("http://{}/ready", a.addr)).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_reply_outlives_the_socket_that_asked_for_it() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let (_, a, b) = two_replicas().await;
    let options = json!({"max_tokens": 256, "steps": 256, "block_length": 32});
    let (asker, session, _) = long_reply(&a, json!({"content": "long", "options": options})).await;
    drop(asker);

    let (mut later, resumed) = resumed_on(&b, &session).await;
    if resumed["running"].is_object() {
        let events = later.until("response.done").await;
        assert_eq!(events.last().unwrap()["status"], "completed");
    }
    let messages = later.history(&session).await;
    assert_eq!(messages.len(), 2, "{messages:?}");
    assert_eq!(
        messages[1]["status"], "completed",
        "the orphaned reply finished and was stored"
    );
}
