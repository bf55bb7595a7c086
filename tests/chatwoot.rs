//! The Chatwoot agent bot against a **fake Chatwoot**: a real Chatwoot (Rails, Postgres, Redis,
//! Sidekiq) cannot run on these machines, so a small HTTP server here plays its part, following
//! its documented agent-bot API (`POST /api/v1/accounts/{account}/conversations/{id}/messages`,
//! `toggle_status`, `toggle_typing_status`, the `api_access_token` header). Everything else is
//! real: the server, the bundled model, HTTP over loopback.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::routing::post;
use axum::{Json, Router};
use common::{test_config, TestServer};
use serde_json::{json, Value};

const TOKEN: &str = "bot-token-for-tests";
const SECRET: &str = "webhook-secret-for-tests";

/// What the fake Chatwoot was asked: (conversation, action, body).
type Calls = Arc<Mutex<Vec<(u64, String, Value)>>>;

async fn fake_chatwoot() -> (String, Calls) {
    let calls: Calls = Arc::default();
    async fn record(
        State(calls): State<Calls>,
        Path((_account, conversation, action)): Path<(u64, u64, String)>,
        headers: HeaderMap,
        Json(body): Json<Value>,
    ) -> Json<Value> {
        assert_eq!(headers["api_access_token"], TOKEN, "the bot authenticates as itself");
        calls.lock().unwrap().push((conversation, action, body));
        Json(json!({"id": 1}))
    }
    let app = Router::new()
        .route(
            "/api/v1/accounts/{account}/conversations/{conversation}/{action}",
            post(record),
        )
        .with_state(calls.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, calls)
}

fn webhook(id: u64, conversation: u64, message_type: &str, content: &str) -> Value {
    json!({"event": "message_created", "id": id, "message_type": message_type, "content": content,
           "conversation": {"id": conversation, "status": "pending"}, "account": {"id": 1},
           "sender": {"id": 9, "name": "Visitor"}})
}

/// The calls for `conversation` once its typing went off again (the bot's last call).
async fn calls_until_typing_off(calls: &Calls, conversation: u64) -> Vec<(String, Value)> {
    let deadline = Instant::now() + common::WAIT;
    loop {
        let mine: Vec<(String, Value)> = calls
            .lock()
            .unwrap()
            .iter()
            .filter(|(c, _, _)| *c == conversation)
            .map(|(_, a, b)| (a.clone(), b.clone()))
            .collect();
        if mine
            .last()
            .is_some_and(|(a, b)| a == "toggle_typing_status" && b["typing_status"] == "off")
        {
            return mine;
        }
        assert!(
            Instant::now() < deadline,
            "the bot finished conversation {conversation}: {mine:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn the_bot_answers_incoming_messages_once_and_hands_over_to_a_human() {
    let (chatwoot_url, calls) = fake_chatwoot().await;
    let mut config = test_config();
    config.model.path = dllm_chat::models::BUILTIN_NORTHWIND.into();
    config.decode.max_tokens = 64;
    config.decode.steps = 64;
    config.decode.block_length = 32;
    config.chatwoot.enabled = true;
    config.chatwoot.base_url = chatwoot_url;
    config.chatwoot.account_id = 1;
    config.chatwoot.bot_token = TOKEN.into();
    config.chatwoot.webhook_secret = SECRET.into();
    let server = TestServer::start(config).await;
    let http = reqwest::Client::new();
    let hook = server.http_url(&format!("/integrations/chatwoot?secret={SECRET}"));
    let send = |body: Value| http.post(&hook).json(&body).send();

    // An incoming message: typing on, one reply, typing off; not handed over.
    let r = send(webhook(101, 7, "incoming", "Where is my order NW-12345?"))
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let seen = calls_until_typing_off(&calls, 7).await;
    let actions: Vec<&str> = seen.iter().map(|(a, _)| a.as_str()).collect();
    assert_eq!(
        actions,
        vec!["toggle_typing_status", "messages", "toggle_typing_status"],
        "{seen:?}"
    );
    assert_eq!(seen[0].1["typing_status"], "on");
    let reply = seen[1].1["content"].as_str().unwrap();
    assert!(
        reply.contains("NW-12345"),
        "the bundled model answers about the order: {reply}"
    );
    assert_eq!(seen[1].1["message_type"], "outgoing");

    // The bot's own message comes back as outgoing, and the same incoming message may be
    // delivered twice: neither is answered.
    assert_eq!(send(webhook(102, 7, "outgoing", reply)).await.unwrap().status(), 200);
    assert_eq!(
        send(webhook(101, 7, "incoming", "Where is my order NW-12345?"))
            .await
            .unwrap()
            .status(),
        202
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    let messages = |c: u64| {
        calls
            .lock()
            .unwrap()
            .iter()
            .filter(|(conv, a, _)| *conv == c && a == "messages")
            .count()
    };
    assert_eq!(messages(7), 1, "one reply for one incoming message");

    // Asking for a person: the reply hands over and the conversation is opened for an agent.
    send(webhook(201, 8, "incoming", "Can I talk to a human?"))
        .await
        .unwrap();
    let seen = calls_until_typing_off(&calls, 8).await;
    let actions: Vec<&str> = seen.iter().map(|(a, _)| a.as_str()).collect();
    assert_eq!(
        actions,
        vec![
            "toggle_typing_status",
            "messages",
            "toggle_status",
            "toggle_typing_status"
        ],
        "{seen:?}"
    );
    assert_eq!(seen[2].1["status"], "open");
    assert!(
        !calls
            .lock()
            .unwrap()
            .iter()
            .any(|(c, a, _)| *c == 7 && a == "toggle_status"),
        "the order question was not handed over"
    );

    // The conversation is one session: a second message answers with the first in its history.
    send(webhook(103, 7, "incoming", "thanks!")).await.unwrap();
    let deadline = Instant::now() + common::WAIT;
    while messages(7) < 2 {
        assert!(Instant::now() < deadline, "the second message was answered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A wrong secret is refused.
    let wrong = server.http_url("/integrations/chatwoot?secret=nope");
    let r = http
        .post(&wrong)
        .json(&webhook(301, 9, "incoming", "hi"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    server.stop().await;
}
