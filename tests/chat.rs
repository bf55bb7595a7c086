//! End to end over a real WebSocket: a session, a reply streamed as whole revisions, history
//! that survives a reconnect, cancel, idempotent resends, Redis persistence, HTTP endpoints and
//! graceful shutdown.

mod common;

use common::{http_get, revisions, test_config, TestServer};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

/// Asks for a reply long enough (256 steps) to act on while it runs.
async fn send_long(client: &mut common::Client, session: &str) {
    client
        .send(
            json!({"type": "message.create", "session_id": session, "content": "long please",
                     "options": {"max_tokens": 256, "steps": 256, "block_length": 32}}),
        )
        .await;
}

/// Checks the invariants every reply must hold and returns the final text.
fn check_reply(events: &[serde_json::Value], placeholder: &str) -> String {
    let revs = revisions(events);
    assert!(revs.len() >= 2, "at least two revisions: {events:?}");
    let masked: Vec<u64> = revs.iter().map(|r| r["masked"].as_u64().unwrap()).collect();
    assert!(
        masked.windows(2).all(|w| w[1] <= w[0]),
        "masked never increases: {masked:?}"
    );
    assert_eq!(*masked.last().unwrap(), 0, "masked reaches 0");
    assert!(masked[0] > 0, "the first revision still has masks");
    // Every revision is the whole reply: the first one shows placeholders for what is masked.
    assert!(revs[0]["text"].as_str().unwrap().contains(placeholder));
    let numbers: Vec<u64> = revs.iter().map(|r| r["revision"].as_u64().unwrap()).collect();
    assert!(
        numbers.windows(2).all(|w| w[1] > w[0]),
        "revision numbers increase: {numbers:?}"
    );
    let done = events.last().unwrap();
    assert_eq!(done["type"], "response.done");
    assert_eq!(done["status"], "completed", "{done}");
    let last = revs.last().unwrap()["text"].as_str().unwrap();
    let text = done["text"].as_str().unwrap();
    assert_eq!(
        text,
        last.replace(placeholder, ""),
        "final text equals the last revision"
    );
    assert!(done["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
    assert_eq!(done["timings"]["steps"].as_u64().unwrap() as usize, revs.len());
    assert!(done["timings"]["total_ms"].as_f64().unwrap() >= done["timings"]["first_revision_ms"].as_f64().unwrap());
    text.to_owned()
}

#[tokio::test]
async fn reply_streams_revisions_and_history_survives_reconnect() {
    let server = TestServer::start(test_config()).await;
    let placeholder = server.config.prompt.mask_placeholder.clone();
    let mut client = server.connect().await;
    let session = client.create_session().await;

    let events = client
        .exchange(&session, "Where is my order NW-12345?", json!({"steps": 16}))
        .await;
    assert_eq!(events[0]["type"], "message.accepted");
    assert_eq!(events[1]["type"], "response.created");
    let text = check_reply(&events, &placeholder);
    drop(client);

    let mut again = server.connect().await;
    again
        .send(json!({"type": "session.resume", "session_id": session, "event_id": "r1"}))
        .await;
    let resumed = again.recv().await;
    assert_eq!(resumed["type"], "session.resumed", "{resumed}");
    assert_eq!(resumed["event_id"], "r1");
    let messages = resumed["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 2);
    assert_eq!(messages[0]["role"], "user");
    assert_eq!(messages[0]["content"], "Where is my order NW-12345?");
    assert_eq!(messages[0]["id"], events[0]["message_id"]);
    assert_eq!(messages[1]["role"], "assistant");
    assert_eq!(messages[1]["content"], text.as_str());
    assert_eq!(messages[1]["status"], "completed");

    // "Messages after my last seen id" for widgets that already hold part of the history.
    let first_id = messages[0]["id"].as_str().unwrap();
    again
        .send(json!({"type": "session.resume", "session_id": session, "after": first_id}))
        .await;
    let tail = again.recv().await;
    assert_eq!(tail["messages"].as_array().unwrap().len(), 1);
    assert_eq!(tail["messages"][0]["role"], "assistant");

    // The same connection goes on with a second turn.
    let events = again
        .exchange(&session, "And can I still cancel it?", json!({"threshold": 0.5}))
        .await;
    check_reply(&events, &placeholder);
    server.stop().await;
}

/// `session.update` sets and removes metadata keys; the stored metadata comes back on resume from
/// another connection; bad metadata gets `invalid_field` and the connection goes on.
#[tokio::test]
async fn session_metadata_is_updated_by_key_and_read_back_on_resume() {
    for store in ["memory", "redis"] {
        let mut config = test_config();
        if store == "redis" {
            config.store.url = common::redis_url();
        }
        let server = TestServer::start(config).await;
        let mut client = server.connect().await;
        client
            .send(json!({"type": "session.create", "metadata": {"page": "/boots", "locale": "en"}}))
            .await;
        let created = client.recv().await;
        let session = created["session_id"].as_str().unwrap().to_owned();

        client
            .send(
                json!({"type": "session.update", "session_id": session, "event_id": "u1",
                         "metadata": {"user": {"id": "u-42", "name": "Ada"}, "locale": null}}),
            )
            .await;
        let updated = client.recv().await;
        assert_eq!(updated["type"], "session.updated", "{store}: {updated}");
        assert_eq!(updated["event_id"], "u1");
        let expected = json!({"page": "/boots", "user": {"id": "u-42", "name": "Ada"}});
        assert_eq!(updated["metadata"], expected, "{store}");

        client
            .send(json!({"type": "session.update", "session_id": session, "metadata": "Ada", "event_id": "u2"}))
            .await;
        let refused = client.recv().await;
        assert_eq!(refused["error"]["code"], "invalid_field", "{store}: {refused}");
        assert_eq!(refused["error"]["event_id"], "u2");

        let mut other = server.connect().await;
        other
            .send(json!({"type": "session.resume", "session_id": session}))
            .await;
        let resumed = other.recv().await;
        assert_eq!(resumed["metadata"], expected, "{store}: {resumed}");
        // The first connection still works after the refusal.
        let events = client.exchange(&session, "hello", json!({})).await;
        assert_eq!(events.last().unwrap()["status"], "completed", "{store}");
        server.stop().await;
    }
}

/// Revisions reach the client as the engine makes them, not bunched up at the end, and
/// `timings` splits the reply into phases that add up to its total.
#[tokio::test]
async fn revisions_arrive_as_they_are_made_and_the_timings_add_up() {
    let server = TestServer::start(test_config()).await;
    let mut client = server.connect().await;
    let session = client.create_session().await;
    let sent = std::time::Instant::now();
    send_long(&mut client, &session).await;
    let mut first_revision = None;
    let (done, done_at) = loop {
        let e = client.recv().await;
        if e["type"] == "response.revision" && first_revision.is_none() {
            first_revision = Some(sent.elapsed());
        }
        if e["type"] == "response.done" {
            break (e, sent.elapsed());
        }
    };
    let first_revision = first_revision.expect("revisions came");
    assert!(
        first_revision * 2 < done_at,
        "the first revision came at {first_revision:?}, the end at {done_at:?}"
    );

    let t = &done["timings"];
    let f = |k: &str| t[k].as_f64().unwrap_or_else(|| panic!("timings.{k} in {t}"));
    assert_eq!(t["steps"], 256, "{t}");
    let parts = [
        "queue_ms",
        "prompt_ms",
        "prefill_ms",
        "denoise_ms",
        "revision_ms",
        "between_steps_ms",
        "handoff_ms",
    ];
    let sum: f64 = parts.iter().map(|k| f(k)).sum();
    assert!((sum - f("total_ms")).abs() < 0.5, "the parts add up to {sum}: {t}");
    assert!(parts.iter().all(|k| f(k) >= 0.0), "{t}");
    assert!(f("compute_ms") > 0.0 && f("compute_ms") <= f("denoise_ms"), "{t}");
    assert!(f("denoise_ms") > f("prefill_ms"), "256 steps outweigh one prefill: {t}");
    server.stop().await;
}

#[tokio::test]
async fn reference_engine_streams_whole_revisions_too() {
    let mut config = test_config();
    config.model.engine = dllm_chat::engine::EngineKind::Reference;
    let server = TestServer::start(config).await;
    let placeholder = server.config.prompt.mask_placeholder.clone();
    let mut client = server.connect().await;
    let session = client.create_session().await;
    for content in ["Where is my order NW-12345?", "And can I still cancel it?"] {
        let events = client.exchange(&session, content, json!({"steps": 16})).await;
        check_reply(&events, &placeholder);
    }
    client
        .send(json!({"type": "session.resume", "session_id": session}))
        .await;
    assert_eq!(client.recv().await["messages"].as_array().unwrap().len(), 4);
    server.stop().await;
}

#[tokio::test]
async fn threshold_policy_needs_fewer_steps_than_one_token_per_step() {
    let server = TestServer::start(test_config()).await;
    let mut client = server.connect().await;
    let session = client.create_session().await;
    let fixed = client
        .exchange(&session, "hello", json!({"steps": 16, "max_tokens": 16}))
        .await;
    let adaptive = client
        .exchange(&session, "hello", json!({"threshold": 0.05, "max_tokens": 16}))
        .await;
    let steps = |events: &[serde_json::Value]| events.last().unwrap()["timings"]["steps"].as_u64().unwrap();
    assert_eq!(fixed.last().unwrap()["status"], "completed");
    assert_eq!(adaptive.last().unwrap()["status"], "completed");
    assert!(
        steps(&adaptive) < steps(&fixed),
        "threshold {} vs fixed {}",
        steps(&adaptive),
        steps(&fixed)
    );
    server.stop().await;
}

#[tokio::test]
async fn cancel_stops_the_reply_and_marks_it() {
    let server = TestServer::start(test_config()).await;
    let mut client = server.connect().await;
    let session = client.create_session().await;
    send_long(&mut client, &session).await;
    let created = client.until("response.created").await;
    let response_id = created.last().unwrap()["response_id"].as_str().unwrap().to_owned();
    client
        .send(json!({"type": "response.cancel", "response_id": response_id}))
        .await;
    let events = client.until("response.done").await;
    let done = events.last().unwrap();
    assert_eq!(done["status"], "cancelled", "{done}");
    assert!(done["timings"]["steps"].as_u64().unwrap() < 256);

    client
        .send(json!({"type": "session.resume", "session_id": session}))
        .await;
    let resumed = client.recv().await;
    assert_eq!(resumed["messages"][1]["status"], "cancelled");

    // Cancelling again names the response as not running.
    client
        .send(json!({"type": "response.cancel", "response_id": response_id, "event_id": "c2"}))
        .await;
    let e = client.recv().await;
    assert_eq!(e["error"]["code"], "response_not_found");
    assert_eq!(e["error"]["event_id"], "c2");
    server.stop().await;
}

#[tokio::test]
async fn resent_message_is_stored_once_and_answered_once() {
    let server = TestServer::start(test_config()).await;
    let mut client = server.connect().await;
    let session = client.create_session().await;
    let msg = json!({"type": "message.create", "session_id": session, "content": "hi", "client_message_id": "m-1"});
    client.send(msg.clone()).await;
    let first = client.until("response.done").await;
    client.send(msg).await;
    let accepted = client.recv().await;
    assert_eq!(accepted["type"], "message.accepted");
    assert_eq!(accepted["duplicate"], true);
    assert_eq!(accepted["message_id"], first[0]["message_id"]);
    client
        .send(json!({"type": "session.resume", "session_id": session}))
        .await;
    let resumed = client.recv().await;
    assert_eq!(
        resumed["type"], "session.resumed",
        "no second reply was generated: {resumed}"
    );
    assert_eq!(resumed["messages"].as_array().unwrap().len(), 2);
    server.stop().await;
}

#[tokio::test]
async fn redis_store_keeps_the_conversation_for_another_replica() {
    let mut config = test_config();
    config.store.url = common::redis_url();
    let server = TestServer::start(config.clone()).await;
    let mut client = server.connect().await;
    let session = client.create_session().await;
    let events = client.exchange(&session, "hello from replica one", json!({})).await;
    assert_eq!(events.last().unwrap()["status"], "completed");
    server.stop().await;

    // The messages are in Redis under the documented keys.
    let redis = redis::Client::open(common::redis_url()).unwrap();
    let mut conn = redis.get_multiplexed_async_connection().await.unwrap();
    let key = format!("{}:{{{}}}:messages", config.store.key_prefix, session);
    let raw: Vec<String> = redis::AsyncCommands::lrange(&mut conn, &key, 0, -1).await.unwrap();
    assert_eq!(raw.len(), 2);
    assert!(raw[0].contains("hello from replica one"));
    let ttl: i64 = redis::AsyncCommands::ttl(&mut conn, &key).await.unwrap();
    assert!(ttl > 0 && ttl <= config.store.session_ttl_secs as i64, "ttl {ttl}");

    // A second server on the same Redis resumes the session.
    let other = TestServer::start(config).await;
    let mut client = other.connect().await;
    client
        .send(json!({"type": "session.resume", "session_id": session}))
        .await;
    let resumed = client.recv().await;
    assert_eq!(resumed["messages"].as_array().unwrap().len(), 2, "{resumed}");
    other.stop().await;
}

#[tokio::test]
async fn health_ready_and_metrics() {
    let server = TestServer::start(test_config()).await;
    let (status, body) = http_get(&server.http_url("/health")).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = http_get(&server.http_url("/ready")).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"ready\""), "{body}");

    let mut client = server.connect().await;
    let session = client.create_session().await;
    client.exchange(&session, "hi", json!({})).await;
    client.send(json!({"type": "bogus"})).await;
    client.recv().await;
    let (status, text) = http_get(&server.http_url("/metrics")).await;
    assert_eq!(status, 200);
    for name in [
        "dllm_time_to_first_revision_seconds_bucket",
        "dllm_reply_latency_seconds_bucket",
        "dllm_queue_time_seconds_bucket",
        "dllm_steps_per_reply_bucket",
        "dllm_tokens_per_step_bucket",
        "dllm_reply_tokens_per_second_bucket",
        "dllm_active_connections",
        "dllm_replies_running",
        "dllm_replies_waiting",
        "dllm_errors_total{code=\"unknown_type\"}",
    ] {
        assert!(text.contains(name), "missing {name} in\n{text}");
    }
    server.stop().await;
}

#[tokio::test]
async fn shutdown_lets_replies_finish_and_sends_a_close_frame() {
    let mut config = test_config();
    config.server.shutdown_grace_ms = 20_000;
    let mut server = TestServer::start(config).await;
    let mut client = server.connect().await;
    let session = client.create_session().await;
    client
        .send(json!({"type": "message.create", "session_id": session, "content": "hi", "options": {"max_tokens": 64, "steps": 64}}))
        .await;
    client.until("response.revision").await;
    server.begin_stop();
    // While the running reply finishes, the connection stays and refuses new messages.
    client
        .send(json!({"type": "message.create", "session_id": session, "content": "one more", "event_id": "late"}))
        .await;
    let events = client.until("response.done").await;
    let refused = events
        .iter()
        .find(|e| e["type"] == "error")
        .unwrap_or_else(|| panic!("the late message was refused: {events:?}"));
    assert_eq!(refused["error"]["code"], "shutting_down", "{refused}");
    assert_eq!(refused["error"]["event_id"], "late");
    assert_eq!(
        events.last().unwrap()["status"],
        "completed",
        "the running reply finished within the grace period"
    );
    match client.next_frame().await {
        Some(Message::Close(Some(frame))) => assert_eq!(u16::from(frame.code), 1001),
        other => panic!("expected a close frame, got {other:?}"),
    }
    server.stop().await;
}

#[tokio::test]
async fn another_connection_resumes_a_running_reply_in_one_process() {
    let server = TestServer::start(test_config()).await;
    let mut asker = server.connect().await;
    let session = asker.create_session().await;
    send_long(&mut asker, &session).await;
    let started = asker.until("response.revision").await;
    let response_id = started[1]["response_id"].as_str().unwrap().to_owned();

    let mut other = server.connect().await;
    other
        .send(json!({"type": "session.resume", "session_id": session}))
        .await;
    let resumed = other.recv().await;
    assert_eq!(resumed["running"]["response_id"], response_id.as_str(), "{resumed}");
    let seen = resumed["running"]["revision"].as_u64().unwrap();
    let watched = other.until("response.done").await;
    let asked = asker.until("response.done").await;
    let first = revisions(&watched)[0]["revision"].as_u64().unwrap();
    assert!(
        first > seen,
        "the watch goes on after the snapshot: {first} after {seen}"
    );
    assert_eq!(watched.last().unwrap()["text"], asked.last().unwrap()["text"]);

    // response.resume of an ended response answers its end; an unknown one is not found.
    other
        .send(json!({"type": "response.resume", "response_id": response_id, "event_id": "r1"}))
        .await;
    let ack = other.recv().await;
    assert_eq!(
        (ack["type"].as_str(), ack["event_id"].as_str()),
        (Some("response.resumed"), Some("r1"))
    );
    let again = other.until("response.done").await;
    assert_eq!(again.last().unwrap()["text"], asked.last().unwrap()["text"]);
    other
        .send(json!({"type": "response.resume", "response_id": "resp_nope"}))
        .await;
    assert_eq!(other.recv().await["error"]["code"], "response_not_found");
    server.stop().await;
}

#[tokio::test]
async fn orphaned_replies_are_cancelled_when_configured_so() {
    let mut config = test_config();
    config.chat.finish_orphaned_replies = false;
    let server = TestServer::start(config).await;
    let mut asker = server.connect().await;
    let session = asker.create_session().await;
    send_long(&mut asker, &session).await;
    asker.until("response.revision").await;
    drop(asker);
    let mut later = server.connect().await;
    let deadline = std::time::Instant::now() + common::WAIT;
    let messages = loop {
        later
            .send(json!({"type": "session.resume", "session_id": session}))
            .await;
        let resumed = later.until("session.resumed").await.pop().unwrap();
        if resumed["running"].is_null() {
            break resumed["messages"].as_array().unwrap().clone();
        }
        assert!(std::time::Instant::now() < deadline, "the reply ended");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(messages.len(), 2, "{messages:?}");
    assert_eq!(
        messages[1]["status"], "cancelled",
        "stopped when its client left: {messages:?}"
    );
    server.stop().await;
}
