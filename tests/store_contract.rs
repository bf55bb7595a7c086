//! One contract for every session store: the in-process store and Redis (a real redis-server,
//! see `.ci/run`) must behave the same.

mod common;

use std::sync::Arc;
use std::time::Duration;

use dllm_chat::config::StoreConfig;
use dllm_chat::sessions::{
    self, Begin, Lease, LeaseState, LoggedEvent, MessageStatus, ReplyStart, Role, SessionStore, StoreError,
    StoredMessage, TailCursor,
};
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

fn start(lease_ms: u64) -> ReplyStart {
    ReplyStart {
        response_id: format!("resp_{}", uuid::Uuid::new_v4().simple()),
        replica: "replica_test".into(),
        lease_ms,
    }
}

fn event(seq: u64) -> LoggedEvent {
    LoggedEvent {
        seq,
        payload: format!("{{\"n\":{seq}}}"),
    }
}

fn assistant(content: &str, status: MessageStatus) -> StoredMessage {
    StoredMessage::new(Role::Assistant, content.into(), Some(status), None)
}

/// Begins a reply that must start; returns its lease and the stored user message's id.
async fn begin(store: &dyn SessionStore, session: &str, content: &str, lease_ms: u64) -> (Lease, String) {
    match store
        .begin_reply(session, user(content, None), &start(lease_ms))
        .await
        .unwrap()
    {
        Begin::Started { appended, lease } => (lease, appended.message.id),
        Begin::Busy => panic!("the session had no running reply"),
    }
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
        store
            .set_metadata(&info.id, json!({"page": "/help", "user": {"id": "u1"}}))
            .await
            .unwrap();
        assert_eq!(
            store.get(&info.id).await.unwrap().metadata["user"]["id"],
            "u1",
            "{name}"
        );
        let unknown = store.set_metadata("sess_nope", json!({})).await;
        assert!(matches!(unknown, Err(StoreError::NotFound(_))), "{name}: {unknown:?}");
        assert!(
            matches!(store.get("sess_nope").await, Err(StoreError::NotFound(_))),
            "{name}: not created by it"
        );

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

#[tokio::test]
async fn one_reply_per_session_and_busy_stores_nothing() {
    for (name, store) in stores(60).await {
        let s = store.create("dan", json!({})).await.unwrap();
        let (lease, message_id) = begin(store.as_ref(), &s.id, "first", 5_000).await;
        assert_eq!(lease.session_id, s.id);
        let running = store.running_reply(&s.id).await.unwrap().expect("running");
        assert_eq!(
            (running.response_id.as_str(), running.message_id.as_str(), running.token),
            (lease.response_id.as_str(), message_id.as_str(), lease.token),
            "{name}"
        );
        let second = store
            .begin_reply(&s.id, user("second", None), &start(5_000))
            .await
            .unwrap();
        assert!(matches!(second, Begin::Busy), "{name}: a second reply is refused");
        assert_eq!(
            store.messages(&s.id).await.unwrap().len(),
            1,
            "{name}: busy stored nothing"
        );

        let done = assistant("answer", MessageStatus::Completed);
        let state = store.finish_reply(&lease, Some(done), Some(&event(9))).await.unwrap();
        assert_eq!(state, LeaseState::Held, "{name}");
        assert!(store.running_reply(&s.id).await.unwrap().is_none(), "{name}");
        let history = store.messages(&s.id).await.unwrap();
        assert_eq!(history.len(), 2, "{name}");
        assert_eq!(history[1].content, "answer", "{name}");

        let (next, _) = begin(store.as_ref(), &s.id, "third", 5_000).await;
        assert!(next.token > lease.token, "{name}: fencing tokens increase");
        let r = store.begin_reply("sess_nope", user("x", None), &start(5_000)).await;
        assert!(matches!(r, Err(StoreError::NotFound(_))), "{name}");
    }
}

#[tokio::test]
async fn a_resent_message_is_not_stored_twice_by_begin() {
    for (name, store) in stores(60).await {
        let s = store.create("erin", json!({})).await.unwrap();
        let Begin::Started { appended, lease } = store
            .begin_reply(&s.id, user("hi", Some("c-9")), &start(5_000))
            .await
            .unwrap()
        else {
            panic!("{name}: started")
        };
        store.finish_reply(&lease, None, None).await.unwrap();
        let Begin::Started { appended: again, .. } = store
            .begin_reply(&s.id, user("hi", Some("c-9")), &start(5_000))
            .await
            .unwrap()
        else {
            panic!("{name}: started again")
        };
        assert!(again.duplicate, "{name}");
        assert_eq!(again.message.id, appended.message.id, "{name}");
        let running = store.running_reply(&s.id).await.unwrap().unwrap();
        assert_eq!(
            running.message_id, appended.message.id,
            "{name}: the reply answers the first copy"
        );
        assert_eq!(store.messages(&s.id).await.unwrap().len(), 1, "{name}");
    }
}

#[tokio::test]
async fn writes_under_an_expired_lease_are_refused() {
    for (name, store) in stores(60).await {
        let s = store.create("fay", json!({})).await.unwrap();
        let (lease, _) = begin(store.as_ref(), &s.id, "q", 300).await;
        assert_eq!(
            store.log_event(&lease, &event(1)).await.unwrap(),
            LeaseState::Held,
            "{name}"
        );
        assert_eq!(
            store.renew_lease(&lease, 300).await.unwrap(),
            LeaseState::Held,
            "{name}"
        );
        tokio::time::sleep(Duration::from_millis(450)).await;
        assert_eq!(
            store.renew_lease(&lease, 300).await.unwrap(),
            LeaseState::Lost,
            "{name}"
        );
        assert_eq!(
            store.log_event(&lease, &event(2)).await.unwrap(),
            LeaseState::Lost,
            "{name}"
        );
        let late = assistant("late", MessageStatus::Completed);
        let state = store.finish_reply(&lease, Some(late), Some(&event(3))).await.unwrap();
        assert_eq!(state, LeaseState::Lost, "{name}: a late finish writes nothing");
        assert_eq!(store.messages(&s.id).await.unwrap().len(), 1, "{name}");
        let log = store.reply_log(&lease.response_id).await.unwrap().unwrap();
        let seqs: Vec<u64> = log.newest.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, vec![1], "{name}: only the event written under the lease");

        // The reply awaits recovery: still busy, and listed as expired.
        let busy = store
            .begin_reply(&s.id, user("again", None), &start(5_000))
            .await
            .unwrap();
        assert!(matches!(busy, Begin::Busy), "{name}");
        let expired = store.expired_replies(10).await.unwrap();
        let lost = expired
            .iter()
            .find(|r| r.session_id == s.id)
            .unwrap_or_else(|| panic!("{name}: listed"));
        let failed = assistant("", MessageStatus::Failed);
        assert!(
            store.recover_reply(lost, failed.clone(), &event(2)).await.unwrap(),
            "{name}"
        );
        assert!(
            !store.recover_reply(lost, failed, &event(2)).await.unwrap(),
            "{name}: recovered once"
        );
        let history = store.messages(&s.id).await.unwrap();
        assert_eq!(history.len(), 2, "{name}");
        assert_eq!(history[1].status, Some(MessageStatus::Failed), "{name}");
        assert!(store.running_reply(&s.id).await.unwrap().is_none(), "{name}");
        assert!(
            store
                .expired_replies(10)
                .await
                .unwrap()
                .iter()
                .all(|r| r.session_id != s.id),
            "{name}"
        );
        begin(store.as_ref(), &s.id, "after recovery", 5_000).await;
    }
}

#[tokio::test]
async fn a_live_lease_is_not_recovered() {
    for (name, store) in stores(60).await {
        let s = store.create("gus", json!({})).await.unwrap();
        let (lease, message_id) = begin(store.as_ref(), &s.id, "q", 5_000).await;
        let running = dllm_chat::sessions::RunningReply {
            session_id: s.id.clone(),
            response_id: lease.response_id.clone(),
            message_id,
            token: lease.token,
            replica: "replica_test".into(),
            started_at: chrono::Utc::now(),
        };
        let failed = assistant("", MessageStatus::Failed);
        assert!(
            !store.recover_reply(&running, failed, &event(1)).await.unwrap(),
            "{name}"
        );
        assert!(store
            .expired_replies(10)
            .await
            .unwrap()
            .iter()
            .all(|r| r.session_id != s.id));
        assert_eq!(
            store.log_event(&lease, &event(1)).await.unwrap(),
            LeaseState::Held,
            "{name}"
        );
    }
}

#[tokio::test]
async fn cancel_requests_reach_the_lease_holder() {
    for (name, store) in stores(60).await {
        let s = store.create("hal", json!({})).await.unwrap();
        let (lease, _) = begin(store.as_ref(), &s.id, "q", 5_000).await;
        assert!(!store.request_cancel(&s.id, "resp_other").await.unwrap(), "{name}");
        assert!(store.request_cancel(&s.id, &lease.response_id).await.unwrap(), "{name}");
        let state = store.log_event(&lease, &event(1)).await.unwrap();
        assert_eq!(state, LeaseState::CancelRequested, "{name}");
        assert_eq!(
            store.renew_lease(&lease, 5_000).await.unwrap(),
            LeaseState::CancelRequested
        );
        store.finish_reply(&lease, None, Some(&event(2))).await.unwrap();
        assert!(
            !store.request_cancel(&s.id, &lease.response_id).await.unwrap(),
            "{name}: ended"
        );
    }
}

#[tokio::test]
async fn reply_logs_keep_the_newest_events_and_tails_see_new_ones() {
    for (name, store) in stores(60).await {
        let s = store.create("ivy", json!({})).await.unwrap();
        let (lease, _) = begin(store.as_ref(), &s.id, "q", 5_000).await;
        let empty = store
            .reply_log(&lease.response_id)
            .await
            .unwrap()
            .expect("known at once");
        assert_eq!(empty.session_id, s.id, "{name}");
        assert!(empty.newest.is_empty(), "{name}");
        for seq in 1..=20 {
            store.log_event(&lease, &event(seq)).await.unwrap();
        }
        let log = store.reply_log(&lease.response_id).await.unwrap().unwrap();
        let seqs: Vec<u64> = log.newest.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, vec![19, 20], "{name}: the two newest, oldest first");
        assert_eq!(log.newest[1].payload, event(20).payload, "{name}");

        let cursor = TailCursor {
            session_id: s.id.clone(),
            response_id: lease.response_id.clone(),
            cursor: log.cursor.clone(),
        };
        let nothing = store
            .tail(std::slice::from_ref(&cursor), Duration::from_millis(100))
            .await
            .unwrap();
        assert!(nothing.is_empty(), "{name}: nothing new: {nothing:?}");
        let writer = {
            let store = store.clone();
            let lease = lease.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                store.finish_reply(&lease, None, Some(&event(21))).await.unwrap();
            })
        };
        let started = std::time::Instant::now();
        let batches = store
            .tail(std::slice::from_ref(&cursor), Duration::from_secs(5))
            .await
            .unwrap();
        assert!(started.elapsed() < Duration::from_secs(2), "{name}: woken by the write");
        writer.await.unwrap();
        assert_eq!(batches.len(), 1, "{name}");
        assert_eq!(
            batches[0].events.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![21],
            "{name}"
        );
        assert!(store.reply_log("resp_unknown").await.unwrap().is_none(), "{name}");
    }
}

#[tokio::test]
async fn an_alias_names_one_session_until_it_expires() {
    for (name, store) in stores(1).await {
        let a = store
            .aliased("chatwoot:1:42", "bot", json!({"conversation": 42}))
            .await
            .unwrap();
        let again = store.aliased("chatwoot:1:42", "bot", json!({})).await.unwrap();
        assert_eq!(again.id, a.id, "{name}: the same alias, the same session");
        assert_eq!(again.metadata["conversation"], 42, "{name}: made once");
        let other = store.aliased("chatwoot:1:43", "bot", json!({})).await.unwrap();
        assert_ne!(other.id, a.id, "{name}");
        tokio::time::sleep(Duration::from_millis(2100)).await;
        let fresh = store.aliased("chatwoot:1:42", "bot", json!({})).await.unwrap();
        assert_ne!(fresh.id, a.id, "{name}: an expired session is replaced");
    }
}

#[tokio::test]
async fn a_ticket_is_taken_once_and_not_after_it_expires() {
    for (name, store) in stores(60).await {
        store
            .put_ticket("sha256:aa", "alice", Duration::from_secs(60))
            .await
            .unwrap();
        store
            .put_ticket("sha256:bb", "bob", Duration::from_millis(50))
            .await
            .unwrap();
        assert_eq!(
            store.take_ticket("sha256:aa").await.unwrap().as_deref(),
            Some("alice"),
            "{name}"
        );
        assert_eq!(
            store.take_ticket("sha256:aa").await.unwrap(),
            None,
            "{name}: taken once"
        );
        assert_eq!(store.take_ticket("sha256:cc").await.unwrap(), None, "{name}: unknown");
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert_eq!(store.take_ticket("sha256:bb").await.unwrap(), None, "{name}: expired");
    }
}

#[tokio::test]
async fn slots_are_capped_renewed_released_and_lapse_after_their_ttl() {
    let ttl = Duration::from_millis(300);
    for (name, store) in stores(60).await {
        assert!(store.take_slot("key:alice", "r1:1", 2, ttl).await.unwrap(), "{name}");
        assert!(store.take_slot("key:alice", "r2:1", 2, ttl).await.unwrap(), "{name}");
        assert!(
            !store.take_slot("key:alice", "r1:2", 2, ttl).await.unwrap(),
            "{name}: full"
        );
        assert!(
            store.take_slot("key:alice", "r1:1", 2, ttl).await.unwrap(),
            "{name}: a holder taking its own slot again is not a third"
        );
        assert!(
            store.take_slot("key:bob", "r1:3", 2, ttl).await.unwrap(),
            "{name}: per scope"
        );
        store.release_slot("key:alice", "r2:1").await.unwrap();
        store.release_slot("key:alice", "r9:9").await.unwrap();
        assert!(
            store.take_slot("key:alice", "r1:2", 2, ttl).await.unwrap(),
            "{name}: released"
        );

        // r1 keeps renewing; r1:2 is not renewed and lapses.
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_millis(150)).await;
            store
                .renew_slots(&[("key:alice".into(), "r1:1".into())], ttl)
                .await
                .unwrap();
        }
        assert!(
            store.take_slot("key:alice", "r3:1", 2, ttl).await.unwrap(),
            "{name}: lapsed"
        );
        assert!(
            !store.take_slot("key:alice", "r3:2", 2, ttl).await.unwrap(),
            "{name}: the renewed one is still held"
        );
        store.renew_slots(&[], ttl).await.unwrap();
    }
}

#[tokio::test]
async fn a_rate_allows_its_burst_then_one_per_interval_per_scope() {
    for (name, store) in stores(60).await {
        // 600 a minute: one every 100 ms, three at once.
        for i in 0..3 {
            assert_eq!(
                store.take_rate("ip:10.0.0.1", 600, 3).await.unwrap(),
                None,
                "{name}: {i}"
            );
        }
        let wait = store
            .take_rate("ip:10.0.0.1", 600, 3)
            .await
            .unwrap()
            .expect("over the burst");
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(100),
            "{name}: {wait:?}"
        );
        assert_eq!(store.take_rate("ip:10.0.0.2", 600, 3).await.unwrap(), None, "{name}");
        tokio::time::sleep(wait + Duration::from_millis(5)).await;
        assert_eq!(
            store.take_rate("ip:10.0.0.1", 600, 3).await.unwrap(),
            None,
            "{name}: refilled"
        );
        assert!(
            store.take_rate("ip:10.0.0.1", 600, 3).await.unwrap().is_some(),
            "{name}"
        );
    }
}
