//! A bounded wire fuzzer against a live server on loopback: random and truncated JSON frames,
//! deep nesting, strings just under and over `limits.max_frame_bytes`, binary frames, invalid
//! UTF-8 in a text frame, a ping flood and half-open sockets. After each burst the same
//! connection and a second client still complete a normal exchange, every bad input got its
//! documented error (or close) code, and the session holds exactly the accepted messages.

mod common;

use std::time::{Duration, Instant};

use common::{test_config, Client, TestServer};
use dllm_chat::protocol::parse;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::Message;

const MAX_FRAME: usize = 4096;
const HARD_FRAME: usize = 16384;
/// Random frames per burst; each waits for its error, so the whole test stays within seconds.
const RANDOM_FRAMES: usize = 150;

/// The error event for one bad frame; its code and (when the frame had a string one) event_id.
async fn expect_error(c: &mut Client, code: &str, event_id: Option<&str>, sent: &str) {
    let e = c.recv().await;
    let shown: String = sent.chars().take(120).collect();
    assert_eq!(e["type"], "error", "{e} for {shown}");
    assert_eq!(e["error"]["code"], code, "{e} for {shown}");
    assert!(!e["error"]["message"].as_str().unwrap_or("").is_empty(), "{e}");
    if let Some(id) = event_id {
        assert_eq!(e["error"]["event_id"], id, "{e} for {shown}");
    }
}

/// Sends `text` and checks the answer against what `protocol::parse` says of it (frames that
/// parse are not sent: the fuzzer only sends bad input).
async fn send_bad_text(c: &mut Client, text: String) -> bool {
    let code = if text.len() > MAX_FRAME {
        "message_too_large".to_owned()
    } else {
        match parse(&text) {
            Ok(_) => return false,
            Err(e) => e.code.as_str().to_owned(),
        }
    };
    let event_id = if text.len() > MAX_FRAME {
        None
    } else {
        serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v.get("event_id").and_then(Value::as_str).map(str::to_owned))
    };
    c.send_raw(Message::Text(text.clone().into())).await;
    expect_error(c, &code, event_id.as_deref(), &text).await;
    true
}

fn random_value(rng: &mut StdRng, depth: usize) -> Value {
    let choice = if depth > 3 {
        rng.random_range(0..5)
    } else {
        rng.random_range(0..8)
    };
    match choice {
        0 => Value::Null,
        1 => json!(rng.random::<bool>()),
        2 => json!(rng.random::<i64>()),
        3 => json!(rng.random::<f64>() * 1e6),
        4 => {
            let words = ["", "x", "session.create", "message.create", "é", "\u{0}", "☃", "\\"];
            json!(words[rng.random_range(0..words.len())])
        }
        5 => Value::Array(
            (0..rng.random_range(0..4))
                .map(|_| random_value(rng, depth + 1))
                .collect(),
        ),
        _ => {
            let keys = [
                "type",
                "event_id",
                "session_id",
                "content",
                "options",
                "response_id",
                "after_revision",
                "metadata",
                "max_tokens",
                "zz",
            ];
            Value::Object(
                (0..rng.random_range(0..5))
                    .map(|_| {
                        (
                            keys[rng.random_range(0..keys.len())].to_owned(),
                            random_value(rng, depth + 1),
                        )
                    })
                    .collect(),
            )
        }
    }
}

/// One random bad frame: a random object with a real type most of the time, random text, or a
/// truncated frame.
fn random_frame(rng: &mut StdRng, session: &str) -> String {
    let types = [
        "session.create",
        "session.resume",
        "message.create",
        "response.cancel",
        "response.resume",
        "nope",
    ];
    match rng.random_range(0..4) {
        0 => {
            let len = rng.random_range(0..40);
            (0..len).map(|_| char::from(rng.random_range(0x20u8..0x7f))).collect()
        }
        1 => {
            let mut v = json!({"type": "message.create", "session_id": session, "content": "hi", "event_id": "t"});
            v["options"] = random_value(rng, 2);
            let text = v.to_string();
            let cut = rng.random_range(0..text.len());
            text[..cut].to_owned()
        }
        _ => {
            let mut v = random_value(rng, 3);
            if !v.is_object() {
                v = json!({});
            }
            if rng.random_bool(0.8) {
                v["type"] = json!(types[rng.random_range(0..types.len())]);
            }
            if rng.random_bool(0.5) {
                v["event_id"] = json!(format!("ev-{}", rng.random::<u16>()));
            }
            v.to_string()
        }
    }
}

/// A normal exchange on `c` in `session`, then the history holds `expected` messages.
async fn exchange_and_count(c: &mut Client, session: &str, expected: usize) {
    let events = c.exchange(session, "still there?", json!({})).await;
    assert_eq!(events.last().unwrap()["status"], "completed", "{events:?}");
    c.send(json!({"type": "session.resume", "session_id": session})).await;
    let resumed = c.recv().await;
    assert_eq!(resumed["type"], "session.resumed", "{resumed}");
    assert_eq!(resumed["messages"].as_array().unwrap().len(), expected, "{resumed}");
}

/// A second client, on its own session and then on the fuzzed one (read only).
async fn second_client_works(server: &TestServer, fuzzed: &str, expected: usize) {
    let mut other = server.connect().await;
    let own = other.create_session().await;
    exchange_and_count(&mut other, &own, 2).await;
    other
        .send(json!({"type": "session.resume", "session_id": fuzzed}))
        .await;
    let resumed = other.recv().await;
    assert_eq!(resumed["messages"].as_array().unwrap().len(), expected, "{resumed}");
}

#[tokio::test]
async fn hostile_frames_get_documented_errors_and_nothing_else_changes() {
    let started = Instant::now();
    let mut config = test_config();
    config.limits.max_frame_bytes = MAX_FRAME;
    config.limits.hard_frame_bytes = HARD_FRAME;
    // The fuzzer's frames are not messages, but leave the limiter out of the picture.
    config.limits.messages_per_minute = 10_000;
    config.limits.message_burst = 10_000;
    let server = TestServer::start(config).await;
    let mut c = server.connect().await;
    let session = c.create_session().await;
    exchange_and_count(&mut c, &session, 2).await;
    // The history after the next exchange (each adds the user message and the reply).
    let mut accepted = 4;

    // Burst 1: random, mistyped and truncated frames.
    let mut rng = StdRng::seed_from_u64(0xD11A);
    let mut sent = 0;
    while sent < RANDOM_FRAMES {
        let frame = random_frame(&mut rng, &session);
        if send_bad_text(&mut c, frame).await {
            sent += 1;
        }
    }
    exchange_and_count(&mut c, &session, accepted).await;
    accepted += 2;

    // Burst 2: deep nesting (past serde_json's recursion limit) under the frame limit.
    for frame in [
        "[".repeat(3000),
        format!("{}{}", "[".repeat(1000), "]".repeat(1000)),
        format!(
            r#"{{"type":"session.create","event_id":"deep","metadata":{}1{}}}"#,
            r#"{"a":"#.repeat(300),
            "}".repeat(300)
        ),
        format!(
            r#"{{"type":"message.create","event_id":"deep2","session_id":"{session}","content":"x","options":{}0{}}}"#,
            "[".repeat(200),
            "]".repeat(200)
        ),
    ] {
        assert!(frame.len() <= MAX_FRAME);
        assert!(send_bad_text(&mut c, frame).await);
    }

    // Burst 3: strings just under and just over limits.max_frame_bytes.
    let frame_of = |len: usize| {
        let head = r#"{"type":"no.such.type","event_id":"big","pad":""#;
        let tail = r#""}"#;
        format!("{head}{}{tail}", "p".repeat(len - head.len() - tail.len()))
    };
    for len in [MAX_FRAME - 1, MAX_FRAME, MAX_FRAME + 1, MAX_FRAME * 2, HARD_FRAME] {
        let frame = frame_of(len);
        assert_eq!(frame.len(), len);
        assert!(send_bad_text(&mut c, frame).await);
    }
    // A multi-byte string over the limit in bytes but not in characters is still too large.
    let head = r#"{"type":"message.create","session_id":"s","content":""#;
    let frame = format!("{head}{}\"}}", "é".repeat(MAX_FRAME / 2));
    assert!(frame.chars().count() < MAX_FRAME && frame.len() > MAX_FRAME);
    assert!(send_bad_text(&mut c, frame).await);

    // Burst 4: binary frames, empty and not.
    for payload in [
        vec![],
        vec![0u8; 10],
        b"{\"type\":\"session.create\"}".to_vec(),
        vec![0xff; 5000],
    ] {
        c.send_raw(Message::Binary(payload.into())).await;
        expect_error(&mut c, "unsupported_frame", None, "binary").await;
    }

    // Burst 5: a ping flood; the server answers (or coalesces) and stays usable.
    for i in 0..500u32 {
        c.send_raw(Message::Ping(i.to_be_bytes().to_vec().into())).await;
    }
    exchange_and_count(&mut c, &session, accepted).await;
    accepted += 2;
    second_client_works(&server, &session, accepted - 2).await;

    // Burst 6: half-open sockets (TCP only, and a handshake that stops half-way) while clients
    // keep working.
    let mut half_open = Vec::new();
    for i in 0..8 {
        let mut tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        if i % 2 == 1 {
            tcp.write_all(b"GET /v1/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n")
                .await
                .unwrap();
        }
        half_open.push(tcp);
    }
    exchange_and_count(&mut c, &session, accepted).await;
    accepted += 2;
    second_client_works(&server, &session, accepted - 2).await;

    // Burst 7: a frame over limits.hard_frame_bytes closes only that connection, with 1009.
    let mut reckless = server.connect().await;
    reckless
        .send_raw(Message::Text("z".repeat(HARD_FRAME + 1).into()))
        .await;
    match reckless.next_frame().await {
        Some(Message::Close(Some(f))) => assert_eq!(u16::from(f.code), 1009),
        other => panic!("expected close 1009, got {other:?}"),
    }

    // Burst 8: invalid UTF-8 in a text frame, sent as a raw frame: that connection closes with
    // 1007 (RFC 6455, invalid frame payload data); no other connection notices.
    let mut broken = server.connect().await;
    let frame = Frame::message(vec![b'{', 0xff, 0xfe, b'}'], OpCode::Data(Data::Text), true);
    broken.send_raw(Message::Frame(frame)).await;
    match broken.next_frame().await {
        Some(Message::Close(Some(f))) => assert_eq!(u16::from(f.code), 1007),
        other => panic!("expected close 1007, got {other:?}"),
    }

    exchange_and_count(&mut c, &session, accepted).await;
    accepted += 2;
    second_client_works(&server, &session, accepted - 2).await;
    drop(half_open);
    assert!(
        started.elapsed() < Duration::from_secs(120),
        "took {:?}",
        started.elapsed()
    );
    server.stop().await;
}
