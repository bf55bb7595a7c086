//! The shared quotas (`[quotas]`) across replicas on one real `redis-server`: connections per key
//! and per client address, messages per key over the WebSocket and the OpenAI endpoint, requests
//! per address before authentication, and the slots of a replica killed with `kill -9` freed
//! within `quotas.slot_ttl_secs`. Two in-process replicas share one Redis key prefix; the killed
//! one is a `dllm-chat serve` process.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{test_config, Client, TestServer};
use dllm_chat::config::{ApiKey, Config};
use dllm_chat::keys::KeyDigest;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

const ALICE: &str = "sk_alice_quota_test_key_0123456789";
const BOB: &str = "sk_bob_quota_test_key_0123456789";

/// Two keys, the Redis store under a prefix of its own, and the quotas `edit` sets (the rest off).
fn config(edit: impl FnOnce(&mut Config)) -> Config {
    let mut c = test_config();
    c.store.url = common::redis_url();
    c.auth.keys = vec![
        ApiKey::with_digest("alice", KeyDigest::of(ALICE)),
        ApiKey::with_digest("bob", KeyDigest::of(BOB)),
    ];
    let q = &mut c.quotas;
    q.key_connections = 0;
    q.key_messages_per_minute = 0;
    q.ip_connections = 0;
    q.ip_requests_per_minute = 0;
    edit(&mut c);
    c
}

async fn replicas(config: &Config) -> (TestServer, TestServer) {
    (
        TestServer::start(config.clone()).await,
        TestServer::start(config.clone()).await,
    )
}

async fn connect(server: &TestServer, key: &str) -> Client {
    server
        .connect_with(&[("authorization", &format!("Bearer {key}"))])
        .await
}

/// The connection was refused with `code` and close 1013; returns the error.
async fn expect_refused(client: &mut Client, code: &str) -> Value {
    let e = client.recv().await;
    expect_closed_after(client, &e, code).await;
    e
}

/// `e`, the event the client got, is the error `code`, and a close 1013 follows it.
async fn expect_closed_after(client: &mut Client, e: &Value, code: &str) {
    assert_eq!(e["type"], "error", "{e}");
    assert_eq!(e["error"]["code"], code, "{e}");
    match client.next_frame().await {
        Some(Message::Close(Some(f))) => assert_eq!(u16::from(f.code), 1013, "{f:?}"),
        other => panic!("expected close 1013, got {other:?}"),
    }
}

/// Whether a connection with `key` is let in (a session can be made on it); a refused one is
/// checked to be `overloaded` with close 1013.
async fn admitted(server: &TestServer, key: &str) -> Option<Client> {
    let mut client = connect(server, key).await;
    client
        .send(json!({"type": "session.create", "event_id": "probe"}))
        .await;
    let first = client.recv().await;
    if first["type"] == "session.created" {
        return Some(client);
    }
    expect_closed_after(&mut client, &first, "overloaded").await;
    None
}

/// Retries `admitted` until it lets a connection in: freed slots are released in the background.
async fn admitted_soon(server: &TestServer, key: &str, within: Duration) -> (Client, Duration) {
    let start = Instant::now();
    loop {
        if let Some(client) = admitted(server, key).await {
            return (client, start.elapsed());
        }
        assert!(start.elapsed() < within, "no slot came free within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn connections_per_key_and_per_address_are_counted_over_both_replicas() {
    let config = config(|c| {
        c.quotas.key_connections = 2;
        c.quotas.ip_connections = 3;
    });
    let (a, b) = replicas(&config).await;

    let alice_a = admitted(&a, ALICE).await.expect("first of alice's two");
    let alice_b = admitted(&b, ALICE)
        .await
        .expect("second of alice's two, on the other replica");
    let mut third = connect(&a, ALICE).await;
    let e = expect_refused(&mut third, "overloaded").await;
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("this key already holds 2"),
        "{e}"
    );
    // Bob's key has its own count, but the address is shared: three in all from 127.0.0.1.
    let bob = admitted(&b, BOB).await.expect("bob's first, the address's third");
    let mut fourth = connect(&a, BOB).await;
    let e = expect_refused(&mut fourth, "overloaded").await;
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("this address already holds 3"),
        "{e}"
    );

    // A closed connection frees its slots on every replica.
    drop(alice_b);
    let (_alice, waited) = admitted_soon(&a, ALICE, Duration::from_secs(2)).await;
    eprintln!("a slot freed on one replica was taken on the other after {waited:?}");
    drop((alice_a, bob));
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_keys_message_rate_is_shared_by_the_replicas_and_its_front_ends() {
    let config = config(|c| {
        c.quotas.key_messages_per_minute = 6;
        c.quotas.key_message_burst = 3;
    });
    let (a, b) = replicas(&config).await;
    let mut on_a = connect(&a, ALICE).await;
    let session = on_a.create_session().await;
    for i in 0..2 {
        on_a.try_turn(&session, "hello", &format!("a{i}"))
            .await
            .expect("within the burst");
    }
    let mut on_b = connect(&b, ALICE).await;
    on_b.try_turn(&session, "hello", "b0")
        .await
        .expect("the burst's last, on the other replica");
    let refused = on_b.try_turn(&session, "one too many", "b1").await.unwrap_err();
    assert_eq!(refused["error"]["code"], "rate_limited", "{refused}");
    let wait = refused["error"]["retry_after_ms"].as_u64().expect("retry_after_ms");
    assert!(wait > 0 && wait <= 10_000, "one message every 10 s: {refused}");
    // Nothing of the refused message was stored, and the connection goes on.
    let history = on_b.history(&session).await;
    assert_eq!(history.len(), 6, "{history:?}");
    assert!(history.iter().all(|m| m["content"] != "one too many"), "{history:?}");

    // The OpenAI endpoint counts against the same key; another key does not.
    let models: Value = reqwest::Client::new()
        .get(a.http_url("/v1/models"))
        .bearer_auth(BOB)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let model = models["data"][0]["id"].as_str().expect("a model id").to_owned();
    let completions = |key: &'static str| {
        let url = a.http_url("/v1/chat/completions");
        let model = model.clone();
        async move {
            reqwest::Client::new()
                .post(url)
                .bearer_auth(key)
                .json(&json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}))
                .send()
                .await
                .unwrap()
        }
    };
    let limited = completions(ALICE).await;
    assert_eq!(limited.status(), 429);
    let retry_after: u64 = limited.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=10).contains(&retry_after), "{retry_after}");
    let body: Value = limited.json().await.unwrap();
    assert_eq!(body["error"]["type"], "rate_limit_error", "{body}");
    let other = completions(BOB).await;
    assert_ne!(other.status(), 429, "bob's key has its own rate");
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn requests_per_address_are_limited_before_authentication_on_every_replica() {
    let config = config(|c| {
        c.quotas.ip_requests_per_minute = 6;
        c.quotas.ip_request_burst = 4;
    });
    let (a, b) = replicas(&config).await;
    let http = reqwest::Client::new();
    let ticket = |server: &TestServer| {
        http.post(server.http_url("/v1/tickets"))
            .bearer_auth("sk_guessed")
            .send()
    };
    for server in [&a, &b, &a, &b] {
        assert_eq!(
            ticket(server).await.unwrap().status(),
            401,
            "a wrong key, within the burst"
        );
    }
    for server in [&a, &b] {
        let limited = ticket(server).await.unwrap();
        assert_eq!(limited.status(), 429, "the burst is spent on both replicas");
        assert!(limited.headers().contains_key("retry-after"));
        let body: Value = limited.json().await.unwrap();
        assert_eq!(body["error"]["code"], "rate_limited", "{body}");
    }
    // Upgrades count too; health checks do not.
    let upgrade = Client::try_connect_with(&format!("ws://{}/v1/chat", a.addr), &[]).await;
    match upgrade {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 429),
        Err(e) => panic!("expected HTTP 429, got {e}"),
        Ok(_) => panic!("an upgrade over the address's rate was let in"),
    }
    for server in [&a, &b] {
        assert_eq!(common::http_get(&server.http_url("/health")).await.0, 200);
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_replica_killed_with_kill_9_frees_its_connection_slots_within_the_ttl() {
    const TTL_SECS: u64 = 2;
    let config = config(|c| {
        c.quotas.key_connections = 2;
        c.quotas.slot_ttl_secs = TTL_SECS;
    });
    let addr = common::free_loopback_addr();
    let file = std::env::temp_dir().join(format!("{}.toml", config.store.key_prefix));
    std::fs::write(
        &file,
        format!(
            "[[auth.keys]]\nname = \"alice\"\ndigest = \"{}\"\n\n[quotas]\nkey_connections = 2\nslot_ttl_secs = {TTL_SECS}\n",
            KeyDigest::of(ALICE)
        ),
    )
    .unwrap();
    let mut doomed = Command::new(env!("CARGO_BIN_EXE_dllm-chat"))
        .args(["serve", "--bind", &addr.to_string(), "--store", &common::redis_url()])
        .arg("--config")
        .arg(&file)
        .env("DLLM_MODEL__PATH", common::fixture_model())
        .env("DLLM_MODEL__THREADS", "1")
        .env("DLLM_STORE__KEY_PREFIX", &config.store.key_prefix)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("dllm-chat starts");
    common::wait_ready(addr).await;
    let url = format!("ws://{addr}/v1/chat");
    let auth = format!("Bearer {ALICE}");
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut client = Client::connect_with(&url, &[("authorization", &auth)]).await;
        client.create_session().await;
        held.push(client);
    }
    let survivor = TestServer::start(config).await;
    // Renewed while the doomed replica lives: still full after more than a TTL.
    tokio::time::sleep(Duration::from_secs(TTL_SECS * 2)).await;
    assert!(
        admitted(&survivor, ALICE).await.is_none(),
        "the live replica's slots lapsed"
    );

    // SIGKILL: no close frames, no released slots.
    doomed.kill().unwrap();
    doomed.wait().unwrap();
    let _ = std::fs::remove_file(&file);
    let (_client, waited) = admitted_soon(&survivor, ALICE, Duration::from_secs(TTL_SECS + 2)).await;
    eprintln!("after kill -9, alice's slots were free again after {waited:?} (slot TTL {TTL_SECS} s)");
    drop(held);
    survivor.stop().await;
}
