//! Every kind of bad input gets its typed error code (with the client's `event_id`), and the
//! same connection then completes a normal exchange: nothing the user sent before is lost.

mod common;

use common::{test_config, Client, TestServer};
use dllm_chat::config::ApiKey;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

async fn expect_error(client: &mut Client, code: &str) -> Value {
    let e = client.recv().await;
    assert_eq!(e["type"], "error", "{e}");
    assert_eq!(e["error"]["code"], code, "{e}");
    assert!(!e["error"]["message"].as_str().unwrap().is_empty());
    e
}

/// A normal exchange still works and the history holds exactly the accepted messages.
async fn still_works(client: &mut Client, session: &str, expected_messages: usize) {
    let events = client.exchange(session, "still there?", json!({})).await;
    assert_eq!(events.last().unwrap()["status"], "completed", "{events:?}");
    client
        .send(json!({"type": "session.resume", "session_id": session}))
        .await;
    let resumed = client.recv().await;
    assert_eq!(
        resumed["messages"].as_array().unwrap().len(),
        expected_messages,
        "{resumed}"
    );
}

#[tokio::test]
async fn malformed_frames_get_typed_errors_and_the_connection_survives() {
    let server = TestServer::start(test_config()).await;
    let mut c = server.connect().await;
    let session = c.create_session().await;
    c.exchange(&session, "first message", json!({})).await;

    c.send_raw(Message::Text("{not json".into())).await;
    expect_error(&mut c, "invalid_json").await;
    c.send(json!({"type": "no.such.type", "event_id": "e-1"})).await;
    let e = expect_error(&mut c, "unknown_type").await;
    assert_eq!(e["error"]["event_id"], "e-1");
    c.send(json!({"type": "message.create", "event_id": "e-2", "session_id": session}))
        .await;
    let e = expect_error(&mut c, "invalid_field").await;
    assert_eq!(e["error"]["event_id"], "e-2");
    c.send(json!({"type": "message.create", "session_id": session, "content": 42}))
        .await;
    expect_error(&mut c, "invalid_field").await;
    c.send(json!({"event_id": "no-type"})).await;
    expect_error(&mut c, "invalid_field").await;
    c.send_raw(Message::Binary(vec![1, 2, 3].into())).await;
    expect_error(&mut c, "unsupported_frame").await;
    c.send(json!({"type": "message.create", "session_id": session, "content": "x", "options": {"max_tokens": 100000}}))
        .await;
    expect_error(&mut c, "invalid_field").await;
    c.send(json!({"type": "message.create", "session_id": session, "content": "x", "options": {"temperature": "hot"}}))
        .await;
    expect_error(&mut c, "invalid_field").await;

    still_works(&mut c, &session, 4).await;
    server.stop().await;
}

#[tokio::test]
async fn size_and_content_limits() {
    let mut config = test_config();
    config.limits.max_frame_bytes = 2048;
    config.limits.max_message_chars = 100;
    let server = TestServer::start(config).await;
    let mut c = server.connect().await;
    let session = c.create_session().await;

    let big = "a".repeat(4096);
    c.send(json!({"type": "message.create", "session_id": session, "content": big}))
        .await;
    expect_error(&mut c, "message_too_large").await;
    c.send(json!({"type": "message.create", "session_id": session, "content": "b".repeat(101)}))
        .await;
    let e = expect_error(&mut c, "message_too_large").await;
    assert!(e["error"]["message"].as_str().unwrap().contains("100"));
    c.send(json!({"type": "message.create", "session_id": session, "content": "   "}))
        .await;
    expect_error(&mut c, "invalid_field").await;

    still_works(&mut c, &session, 2).await;

    // Beyond the hard limit the frame is not read at all: close 1009 on that connection only.
    let mut reckless = server.connect().await;
    let huge = "z".repeat(server.config.limits.hard_frame_bytes + 1);
    reckless.send_raw(Message::Text(huge.into())).await;
    match reckless.next_frame().await {
        Some(Message::Close(Some(f))) => assert_eq!(u16::from(f.code), 1009),
        other => panic!("expected close 1009, got {other:?}"),
    }
    still_works(&mut c, &session, 4).await;
    server.stop().await;
}

#[tokio::test]
async fn content_too_long_for_the_context_is_context_overflow() {
    let mut config = test_config();
    config.model.context_length = 1024;
    config.limits.max_message_chars = 4000;
    let server = TestServer::start(config).await;
    let mut c = server.connect().await;
    let session = c.create_session().await;
    c.send(
        json!({"type": "message.create", "session_id": session, "content": "word ".repeat(790), "event_id": "long"}),
    )
    .await;
    let events = c.until("response.done").await;
    let error = events.iter().find(|e| e["type"] == "error").expect("an error event");
    assert_eq!(error["error"]["code"], "context_overflow", "{error}");
    assert_eq!(error["error"]["event_id"], "long");
    assert_eq!(events.last().unwrap()["status"], "failed");
    // The user's message was stored before generation and stays; the next turn fits again
    // because older turns are dropped from the prompt.
    let events = c
        .exchange(&session, "short", json!({"max_tokens": 8, "steps": 8}))
        .await;
    assert_eq!(events.last().unwrap()["status"], "completed", "{events:?}");
    server.stop().await;
}

#[tokio::test]
async fn unknown_and_foreign_sessions_are_not_found() {
    let mut config = test_config();
    config.auth.keys = vec![
        ApiKey::plain("widget", "key-widget-0123456789"),
        ApiKey::plain("dashboard", "key-dashboard-0123456789"),
    ];
    // Keys in the URL, as browsers send them (off by default; tests/auth.rs covers both).
    config.auth.allow_query_key = true;
    let server = TestServer::start(config).await;
    let url = format!("ws://{}/v1/chat", server.addr);

    let mut none = Client::connect(&url).await;
    expect_error(&mut none, "unauthorized").await;
    match none.next_frame().await {
        Some(Message::Close(Some(f))) => assert_eq!(u16::from(f.code), 1008),
        other => panic!("expected close 1008, got {other:?}"),
    }
    let mut wrong = Client::connect(&format!("{url}?api_key=nope")).await;
    expect_error(&mut wrong, "unauthorized").await;

    let mut widget = Client::connect(&format!("{url}?api_key=key-widget-0123456789")).await;
    let mut dashboard = Client::connect(&format!("{url}?api_key=key-dashboard-0123456789")).await;
    let session = widget.create_session().await;
    widget.exchange(&session, "mine", json!({})).await;

    dashboard
        .send(json!({"type": "session.resume", "session_id": session}))
        .await;
    expect_error(&mut dashboard, "session_not_found").await;
    dashboard
        .send(json!({"type": "message.create", "session_id": session, "content": "theirs"}))
        .await;
    expect_error(&mut dashboard, "session_not_found").await;
    widget
        .send(json!({"type": "session.resume", "session_id": "sess_doesnotexist"}))
        .await;
    expect_error(&mut widget, "session_not_found").await;

    still_works(&mut widget, &session, 4).await;
    server.stop().await;
}

#[tokio::test]
async fn second_message_while_a_reply_runs_is_busy() {
    let server = TestServer::start(test_config()).await;
    let mut c = server.connect().await;
    let session = c.create_session().await;
    c.send(
        json!({"type": "message.create", "session_id": session, "content": "one",
                  "options": {"max_tokens": 256, "steps": 256}}),
    )
    .await;
    c.until("response.created").await;
    c.send(json!({"type": "message.create", "session_id": session, "content": "two", "event_id": "b"}))
        .await;
    let events = c.until("error").await;
    let e = events.last().unwrap();
    assert_eq!(e["error"]["code"], "busy", "{e}");
    assert_eq!(e["error"]["event_id"], "b");
    let done = c.until("response.done").await;
    assert_eq!(done.last().unwrap()["status"], "completed");
    // The rejected message was not stored; the client still has it and can resend.
    still_works(&mut c, &session, 4).await;
    server.stop().await;
}

#[tokio::test]
async fn rate_limit_and_connection_limit() {
    let mut config = test_config();
    config.limits.messages_per_minute = 2;
    config.limits.message_burst = 2;
    config.server.max_connections = 1;
    let server = TestServer::start(config).await;
    let mut c = server.connect().await;
    let session = c.create_session().await;
    c.exchange(&session, "one", json!({})).await;
    c.exchange(&session, "two", json!({})).await;
    c.send(json!({"type": "message.create", "session_id": session, "content": "three"}))
        .await;
    expect_error(&mut c, "rate_limited").await;

    let mut extra = server.connect().await;
    expect_error(&mut extra, "overloaded").await;
    match extra.next_frame().await {
        Some(Message::Close(Some(f))) => assert_eq!(u16::from(f.code), 1013),
        other => panic!("expected close 1013, got {other:?}"),
    }
    // The first connection still works for everything but new messages.
    c.send(json!({"type": "session.resume", "session_id": session})).await;
    let resumed = c.recv().await;
    assert_eq!(resumed["messages"].as_array().unwrap().len(), 4);
    server.stop().await;
}

#[tokio::test]
async fn dead_peers_are_dropped_by_the_ping_timer() {
    let mut config = test_config();
    config.server.ping_interval_ms = 100;
    config.server.idle_timeout_ms = 300;
    let server = TestServer::start(config).await;
    // A raw TCP peer that upgrades and then never reads or answers pings.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let req = format!(
        "GET /v1/chat HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        server.addr
    );
    tcp.write_all(req.as_bytes()).await.unwrap();
    // Read until the server closes the socket: it must, since this peer never pongs.
    let mut buf = vec![0u8; 4096];
    let closed = tokio::time::timeout(common::WAIT, async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "server dropped the silent peer");
    server.stop().await;
}

#[tokio::test]
async fn a_full_engine_queue_is_overloaded_and_the_message_stays() {
    let mut config = test_config();
    config.limits.max_running_replies = 1;
    config.limits.max_waiting_replies = 1;
    let server = TestServer::start(config).await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        let mut c = server.connect().await;
        let session = c.create_session().await;
        clients.push((c, session));
    }
    for (c, session) in clients.iter_mut() {
        c.send(
            json!({"type": "message.create", "session_id": session, "content": "long",
                      "options": {"max_tokens": 256, "steps": 256}, "event_id": "q"}),
        )
        .await;
        assert_eq!(c.recv().await["type"], "message.accepted");
    }
    // One runs, one waits; with three at once the queue is full for at least one of them.
    let mut overloaded = 0;
    for (c, session) in clients.iter_mut() {
        let next = c.recv().await;
        if next["type"] == "error" {
            assert_eq!(next["error"]["code"], "overloaded", "{next}");
            assert_eq!(next["error"]["event_id"], "q");
            overloaded += 1;
            // The refused message was stored; the user resends it once there is room.
            c.send(json!({"type": "session.resume", "session_id": session})).await;
            let resumed = c.recv().await;
            assert_eq!(resumed["messages"].as_array().unwrap().len(), 1, "{resumed}");
        } else {
            assert_eq!(next["type"], "response.created", "{next}");
            assert_eq!(c.until("response.done").await.last().unwrap()["status"], "completed");
        }
    }
    assert!(overloaded >= 1, "a queue of one was never full");
    server.stop().await;
}

#[tokio::test]
async fn the_same_client_message_id_racing_on_two_connections_is_stored_once() {
    let server = TestServer::start(test_config()).await;
    let mut a = server.connect().await;
    let mut b = server.connect().await;
    let session = a.create_session().await;
    let message = json!({"type": "message.create", "session_id": session, "content": "once",
                         "client_message_id": "race-1", "options": {"max_tokens": 16, "steps": 16}});
    tokio::join!(a.send(message.clone()), b.send(message.clone()));
    let (first_a, first_b) = tokio::join!(a.recv(), b.recv());
    let kinds = [first_a["type"].as_str().unwrap(), first_b["type"].as_str().unwrap()];
    let (winner, other) = match kinds {
        ["message.accepted", _] => (&mut a, first_b),
        [_, "message.accepted"] => (&mut b, first_a),
        _ => panic!("one of them is accepted: {first_a} / {first_b}"),
    };
    // The other is told `busy` (the reply runs) or, if it came after the end, `duplicate`.
    assert!(
        other["error"]["code"] == "busy" || other["duplicate"] == true,
        "{other}"
    );
    assert_eq!(
        winner.until("response.done").await.last().unwrap()["status"],
        "completed"
    );
    a.send(json!({"type": "session.resume", "session_id": session})).await;
    let resumed = a.until("session.resumed").await.pop().unwrap();
    let messages = resumed["messages"].as_array().unwrap();
    let users = messages.iter().filter(|m| m["role"] == "user").count();
    assert_eq!((users, messages.len()), (1, 2), "stored once, answered once: {resumed}");
    server.stop().await;
}
