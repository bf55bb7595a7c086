//! The timing feed `GET /v1/stats` over real WebSockets: a record per finished reply and a
//! summary each second, admin keys only, and every replica's records on every replica's feed
//! through a real Redis.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{test_config, Client, TestServer};
use dllm_chat::config::{ApiKey, Config};
use serde_json::{json, Value};

const ADMIN_KEY: &str = "dk_stats-admin-key-000000000001";
const USER_KEY: &str = "dk_stats-user-key-0000000000002";

fn with_keys() -> Config {
    let mut config = test_config();
    let mut admin = ApiKey::plain("ops", ADMIN_KEY);
    admin.admin = true;
    config.auth.keys = vec![admin, ApiKey::plain("widget", USER_KEY)];
    config
}

async fn feed(server: &TestServer, headers: &[(&str, &str)]) -> Client {
    Client::connect_with(&format!("ws://{}/v1/stats", server.addr), headers).await
}

/// The next record of `kind` on the feed, within `within`.
async fn next_of(feed: &mut Client, kind: &str, within: Duration) -> Value {
    tokio::time::timeout(within, async {
        loop {
            let r = feed.recv().await;
            if r["type"] == kind {
                return r;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("a {kind} record within {within:?}"))
}

fn assert_reply_record(r: &Value) {
    assert_eq!(r["type"], "reply", "{r}");
    assert_eq!(r["status"], "completed", "{r}");
    assert!(r["replica"].as_str().unwrap().starts_with("replica_"), "{r}");
    for f in ["queue_ms", "first_revision_ms", "total_ms", "tokens_per_step"] {
        assert!(r[f].as_f64().is_some(), "{f} in {r}");
    }
    assert!(
        r["total_ms"].as_f64().unwrap() >= r["first_revision_ms"].as_f64().unwrap(),
        "{r}"
    );
    assert!(r["first_revision_ms"].as_f64().unwrap() > 0.0, "{r}");
    let steps = r["steps"].as_u64().unwrap();
    let tokens = r["completion_tokens"].as_u64().unwrap();
    assert!(steps > 0 && tokens > 0, "{r}");
    let per_step = r["tokens_per_step"].as_f64().unwrap();
    assert!((per_step - tokens as f64 / steps as f64).abs() < 1e-9, "{r}");
    assert!(r["prompt_tokens"].as_u64().unwrap() > 0, "{r}");
    assert!(r["cached_prompt_tokens"].as_u64().is_some(), "{r}");
    assert!(r["at"].as_i64().unwrap() > 1_600_000_000_000, "{r}");
}

#[tokio::test]
async fn two_replies_make_two_reply_records_and_summaries_follow_each_second() {
    let server = TestServer::start(with_keys()).await;
    let bearer = format!("Bearer {ADMIN_KEY}");
    let mut stats = feed(&server, &[("Authorization", &bearer)]).await;
    // The first summary also shows the feed is subscribed before the replies start.
    let summary = next_of(&mut stats, "summary", Duration::from_secs(3)).await;
    for f in ["running", "waiting", "connections"] {
        assert!(summary[f].as_i64().is_some(), "{f} in {summary}");
    }
    assert!(summary["errors"].is_object(), "{summary}");

    let user = format!("Bearer {USER_KEY}");
    let mut chat = server.connect_with(&[("Authorization", &user)]).await;
    let session = chat.create_session().await;
    for text in ["hello", "again"] {
        let events = chat.exchange(&session, text, json!({})).await;
        assert_eq!(events.last().unwrap()["status"], "completed");
    }
    let first = next_of(&mut stats, "reply", Duration::from_secs(5)).await;
    let second = next_of(&mut stats, "reply", Duration::from_secs(5)).await;
    assert_reply_record(&first);
    assert_reply_record(&second);
    assert_eq!(first["replica"], second["replica"]);
    let summary = next_of(&mut stats, "summary", Duration::from_secs(2)).await;
    assert_eq!(summary["replica"], first["replica"]);
    assert!(
        summary["connections"].as_i64().unwrap() >= 1,
        "the chat client counts: {summary}"
    );
    server.stop().await;
}

#[tokio::test]
async fn only_admin_keys_read_the_feed_and_browsers_send_theirs_as_a_subprotocol() {
    let server = TestServer::start(with_keys()).await;
    let user = format!("Bearer {USER_KEY}");
    for headers in [vec![("Authorization", user.as_str())], vec![]] {
        let mut refused = feed(&server, &headers).await;
        let e = refused.recv().await;
        assert_eq!(e["type"], "error", "{e}");
        assert_eq!(e["error"]["code"], "unauthorized", "{e}");
        match refused.next_frame().await {
            Some(tokio_tungstenite::tungstenite::Message::Close(Some(c))) => assert_eq!(u16::from(c.code), 1008),
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
    let protocols = format!("dllm-stats, key.{ADMIN_KEY}");
    let mut admitted = feed(&server, &[("Sec-WebSocket-Protocol", &protocols)]).await;
    next_of(&mut admitted, "summary", Duration::from_secs(3)).await;
    server.stop().await;
}

#[tokio::test]
async fn a_reply_on_one_replica_shows_on_the_other_replicas_feed_through_redis() {
    let mut a = test_config();
    a.store.url = common::redis_url();
    let mut b = a.clone();
    b.store.key_prefix = a.store.key_prefix.clone();
    let a = TestServer::start(a).await;
    let b = TestServer::start(b).await;
    let mut on_b = feed(&b, &[]).await;
    next_of(&mut on_b, "summary", Duration::from_secs(3)).await;

    let mut chat = a.connect().await;
    let session = chat.create_session().await;
    chat.exchange(&session, "hello", json!({})).await;
    let reply = next_of(&mut on_b, "reply", Duration::from_secs(5)).await;
    assert_reply_record(&reply);

    // Both replicas' summaries reach B's feed; the reply came from the one that is not B.
    let mut replicas = BTreeSet::new();
    tokio::time::timeout(Duration::from_secs(5), async {
        while replicas.len() < 2 {
            replicas.insert(
                next_of(&mut on_b, "summary", Duration::from_secs(3)).await["replica"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
            );
        }
    })
    .await
    .expect("summaries of both replicas");
    assert!(
        replicas.contains(reply["replica"].as_str().unwrap()),
        "{replicas:?} {reply}"
    );
    a.stop().await;
    b.stop().await;
}
