//! One contract for every session store: the in-process store and Redis (a real redis-server,
//! see `.ci/run`) must behave the same.

mod common;

use std::sync::Arc;
use std::time::Duration;

use dllm_chat::config::StoreConfig;
use dllm_chat::sessions::{self, MessageStatus, Role, SessionStore, StoreError, StoredMessage};
use serde_json::json;

async fn stores(ttl_secs: u64) -> Vec<(&'static str, Arc<dyn SessionStore>)> {
    let defaults = dllm_chat::config::Config::defaults().store;
    let memory = StoreConfig {
        url: "memory".into(),
        session_ttl_secs: ttl_secs,
        ..defaults.clone()
    };
    let redis = StoreConfig {
        url: common::redis_url(),
        key_prefix: format!("dllm-contract-{}", uuid::Uuid::new_v4().simple()),
        session_ttl_secs: ttl_secs,
        ..defaults
    };
    let redis_store = sessions::open(&redis).await.unwrap_or_else(|e| {
        panic!(
            "Redis at {} is needed for these tests (start redis-server): {e}",
            redis.url
        )
    });
    vec![
        ("memory", sessions::open(&memory).await.unwrap()),
        ("redis", redis_store),
    ]
}

fn user(content: &str, client_id: Option<&str>) -> StoredMessage {
    StoredMessage::new(Role::User, content.into(), None, client_id.map(String::from))
}

#[tokio::test]
async fn create_get_and_ordered_history() {
    for (name, store) in stores(60).await {
        let info = store.create("alice", json!({"page": "/help"})).await.unwrap();
        let got = store.get(&info.id).await.unwrap();
        assert_eq!(got, info, "{name}");
        assert_eq!(got.metadata["page"], "/help", "{name}");
        assert!(store.messages(&info.id).await.unwrap().is_empty(), "{name}");

        let first = store.append(&info.id, user("one", None)).await.unwrap();
        let reply = StoredMessage::new(Role::Assistant, "two".into(), Some(MessageStatus::Completed), None);
        store.append(&info.id, reply).await.unwrap();
        store.append(&info.id, user("three", None)).await.unwrap();
        let history = store.messages(&info.id).await.unwrap();
        let contents: Vec<_> = history.iter().map(|m| m.content.as_str()).collect();
        assert_eq!(contents, vec!["one", "two", "three"], "{name}");
        assert_eq!(history[0], first.message, "{name}: stored exactly as appended");
        assert_eq!(history[1].status, Some(MessageStatus::Completed), "{name}");
    }
}

#[tokio::test]
async fn client_message_id_makes_append_idempotent() {
    for (name, store) in stores(60).await {
        let s = store.create("bob", json!({})).await.unwrap();
        let a = store.append(&s.id, user("hello", Some("c-1"))).await.unwrap();
        assert!(!a.duplicate, "{name}");
        let b = store.append(&s.id, user("hello again", Some("c-1"))).await.unwrap();
        assert!(b.duplicate, "{name}");
        assert_eq!(b.message, a.message, "{name}: the first message is returned");
        store.append(&s.id, user("other", Some("c-2"))).await.unwrap();
        assert_eq!(store.messages(&s.id).await.unwrap().len(), 2, "{name}");
    }
}

#[tokio::test]
async fn unknown_sessions_are_not_found() {
    for (name, store) in stores(60).await {
        assert!(
            matches!(store.get("sess_nope").await, Err(StoreError::NotFound(_))),
            "{name}"
        );
        assert!(
            matches!(store.messages("sess_nope").await, Err(StoreError::NotFound(_))),
            "{name}"
        );
        let r = store.append("sess_nope", user("x", None)).await;
        assert!(matches!(r, Err(StoreError::NotFound(_))), "{name}");
        store.ping().await.unwrap();
    }
}

#[tokio::test]
async fn sessions_expire_without_activity_and_activity_refreshes() {
    for (name, store) in stores(1).await {
        let idle = store.create("carol", json!({})).await.unwrap();
        let active = store.create("carol", json!({})).await.unwrap();
        store.append(&active.id, user("keep", None)).await.unwrap();
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            store.get(&active.id).await.unwrap();
        }
        assert!(
            matches!(store.get(&idle.id).await, Err(StoreError::NotFound(_))),
            "{name}: idle session expired"
        );
        assert_eq!(
            store.messages(&active.id).await.unwrap().len(),
            1,
            "{name}: active session kept its history"
        );
    }
}

#[tokio::test]
async fn redis_unreachable_is_a_typed_error() {
    let config = StoreConfig {
        url: "redis://127.0.0.1:1".into(),
        connect_timeout_ms: 500,
        ..dllm_chat::config::Config::defaults().store
    };
    let started = std::time::Instant::now();
    match sessions::open(&config).await {
        Err(StoreError::Unavailable(m)) => assert!(m.contains("127.0.0.1:1"), "{m}"),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("connected to a closed port"),
    }
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "gave up in {:?}",
        started.elapsed()
    );
}
