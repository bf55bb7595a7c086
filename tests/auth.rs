//! Keys and isolation, black-box: digest and (deprecated) plain keys on the WebSocket and the
//! OpenAI endpoint, keys in the URL off by default, one-time tickets, the `Origin` allow-list,
//! and another key's sessions and replies answered exactly like unknown ones.

mod common;

use common::{test_config, Client, TestServer};
use dllm_chat::config::{ApiKey, Config};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::{self, Message};

const WIDGET_KEY: &str = "dk_widget-test-key-000000000001";
/// `printf %s dk_widget-test-key-000000000001 | sha256sum`
const WIDGET_DIGEST: &str = "sha256:e94bce9dc7c35bc421f42671bb4e1b6d6a120d6f339759089590f31cc637d873";
const DASHBOARD_KEY: &str = "dk_dashboard-test-key-0000000002";
/// `printf %s dk_dashboard-test-key-0000000002 | sha256sum`
const DASHBOARD_DIGEST: &str = "sha256:64c76ba2bb31870ba333bda626ce5b921631bf5d9ef2516a3d5360efbcefb478";

fn digest_key(name: &str, digest: &str) -> ApiKey {
    ApiKey {
        name: name.into(),
        digest: Some(digest.into()),
        key: None,
        admin: false,
    }
}

/// Two keys, configured by digest.
fn two_keys() -> Config {
    let mut config = test_config();
    config.auth.keys = vec![
        digest_key("widget", WIDGET_DIGEST),
        digest_key("dashboard", DASHBOARD_DIGEST),
    ];
    config
}

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

async fn with_key(server: &TestServer, key: &str) -> Client {
    server.connect_with(&[("authorization", &bearer(key))]).await
}

/// The connection was refused as `unauthorized` with close 1008; returns the error's message.
async fn expect_unauthorized(client: &mut Client) -> String {
    let e = client.recv().await;
    assert_eq!(e["type"], "error", "{e}");
    assert_eq!(e["error"]["code"], "unauthorized", "{e}");
    match client.next_frame().await {
        Some(Message::Close(Some(f))) => assert_eq!(u16::from(f.code), 1008),
        other => panic!("expected close 1008, got {other:?}"),
    }
    e["error"]["message"].as_str().unwrap().to_owned()
}

/// The connection is let in: a session can be made on it.
async fn expect_in(client: &mut Client) {
    client.create_session().await;
}

#[tokio::test]
async fn digest_keys_are_accepted_as_bearer_tokens_and_nothing_else_is() {
    let server = TestServer::start(two_keys()).await;
    expect_in(&mut with_key(&server, WIDGET_KEY).await).await;
    expect_in(&mut with_key(&server, DASHBOARD_KEY).await).await;

    let message = expect_unauthorized(&mut server.connect().await).await;
    assert!(!message.is_empty());
    for wrong in [
        "dk_widget-test-key-000000000002",
        &WIDGET_KEY[..WIDGET_KEY.len() - 1],
        // The digest is not the key.
        WIDGET_DIGEST,
        &WIDGET_DIGEST["sha256:".len()..],
        "",
    ] {
        let mut c = server.connect_with(&[("authorization", &bearer(wrong))]).await;
        expect_unauthorized(&mut c).await;
    }
    let mut not_bearer = server.connect_with(&[("authorization", WIDGET_KEY)]).await;
    expect_unauthorized(&mut not_bearer).await;
    server.stop().await;
}

#[tokio::test]
async fn deprecated_plain_keys_still_work() {
    let mut config = test_config();
    config.auth.keys = vec![
        ApiKey {
            name: "legacy".into(),
            digest: None,
            key: Some("legacy-plain-key-0001".into()),
            admin: false,
        },
        digest_key("widget", WIDGET_DIGEST),
    ];
    let server = TestServer::start(config).await;
    expect_in(&mut with_key(&server, "legacy-plain-key-0001").await).await;
    expect_in(&mut with_key(&server, WIDGET_KEY).await).await;
    expect_unauthorized(&mut with_key(&server, "legacy-plain-key-0002").await).await;
    server.stop().await;
}

#[tokio::test]
async fn keys_in_the_url_are_refused_unless_allowed() {
    let server = TestServer::start(two_keys()).await;
    assert!(!server.config.auth.allow_query_key, "off by default");
    let url = format!("ws://{}/v1/chat", server.addr);
    let message = expect_unauthorized(&mut Client::connect(&format!("{url}?api_key={WIDGET_KEY}")).await).await;
    assert!(message.contains("allow_query_key"), "{message}");
    // Not even next to a valid header: the key in the URL has leaked already.
    let mut both = Client::connect_with(
        &format!("{url}?api_key={WIDGET_KEY}"),
        &[("authorization", &bearer(WIDGET_KEY))],
    )
    .await;
    expect_unauthorized(&mut both).await;
    server.stop().await;

    let mut config = two_keys();
    config.auth.allow_query_key = true;
    let server = TestServer::start(config).await;
    let url = format!("ws://{}/v1/chat", server.addr);
    expect_in(&mut Client::connect(&format!("{url}?api_key={WIDGET_KEY}")).await).await;
    expect_unauthorized(&mut Client::connect(&format!("{url}?api_key=dk_not-a-key-000000000")).await).await;
    // Headers still work alongside.
    expect_in(&mut with_key(&server, DASHBOARD_KEY).await).await;
    server.stop().await;
}

async fn post_ticket(server: &TestServer, key: Option<&str>) -> (u16, Value) {
    call(reqwest::Client::new().post(server.http_url("/v1/tickets")), key).await
}

/// A browser page gets a one-time ticket from its backend: it admits one upgrade, as the key
/// that asked for it; a second use, a racing use, an expired or a made-up ticket is refused.
#[tokio::test]
async fn a_ticket_admits_one_upgrade_as_the_key_that_asked_for_it() {
    for store in ["memory", "redis"] {
        let mut config = two_keys();
        config.auth.ticket_ttl_secs = 1;
        if store == "redis" {
            config.store.url = common::redis_url();
        }
        let server = TestServer::start(config).await;
        let url = format!("ws://{}/v1/chat", server.addr);
        let ticket = |body: &Value| body["ticket"].as_str().unwrap().to_owned();

        for wrong in [None, Some("dk_not-a-key-000000000")] {
            let (status, body) = post_ticket(&server, wrong).await;
            assert_eq!(status, 401, "{store}: {body}");
            assert_eq!(body["error"]["code"], "unauthorized", "{store}: {body}");
        }
        let (status, body) = post_ticket(&server, Some(WIDGET_KEY)).await;
        assert_eq!(status, 201, "{store}: {body}");
        assert_eq!(body["expires_in"], 1, "{store}: {body}");
        let first = ticket(&body);
        assert!(first.starts_with("tk_"), "{first}");

        // In as `widget`: its session is widget's, not dashboard's.
        let mut page = Client::connect(&format!("{url}?ticket={first}")).await;
        let session = page.create_session().await;
        let mut owner = with_key(&server, WIDGET_KEY).await;
        owner
            .send(json!({"type": "session.resume", "session_id": session}))
            .await;
        assert_eq!(owner.recv().await["type"], "session.resumed", "{store}");
        let mut other = with_key(&server, DASHBOARD_KEY).await;
        other
            .send(json!({"type": "session.resume", "session_id": session}))
            .await;
        assert_eq!(other.recv().await["error"]["code"], "session_not_found", "{store}");

        // Used once; a made-up one never.
        let message = expect_unauthorized(&mut Client::connect(&format!("{url}?ticket={first}")).await).await;
        assert!(message.contains("ticket"), "{message}");
        expect_unauthorized(&mut Client::connect(&format!("{url}?ticket=tk_{}", "0".repeat(64))).await).await;

        // Two upgrades racing with one ticket: exactly one gets in.
        let (_, body) = post_ticket(&server, Some(DASHBOARD_KEY)).await;
        let raced = format!("{url}?ticket={}", ticket(&body));
        let (mut a, mut b) = tokio::join!(Client::connect(&raced), Client::connect(&raced));
        a.send(json!({"type": "session.create"})).await;
        b.send(json!({"type": "session.create"})).await;
        let (a, b) = tokio::join!(a.recv(), b.recv());
        let mut kinds = [
            a["type"].as_str().unwrap().to_owned(),
            b["type"].as_str().unwrap().to_owned(),
        ];
        kinds.sort();
        assert_eq!(kinds, ["error", "session.created"], "{store}: {a} {b}");

        // Expired after auth.ticket_ttl_secs.
        let (_, body) = post_ticket(&server, Some(WIDGET_KEY)).await;
        tokio::time::sleep(std::time::Duration::from_millis(1_300)).await;
        expect_unauthorized(&mut Client::connect(&format!("{url}?ticket={}", ticket(&body))).await).await;
        server.stop().await;
    }
}

/// The HTTP status of a refused upgrade, or `None` when it upgraded (and a session works).
async fn upgrade_status(server: &TestServer, headers: &[(&str, &str)]) -> Option<u16> {
    upgrade_status_at(&format!("ws://{}/v1/chat", server.addr), headers).await
}

#[tokio::test]
async fn browser_upgrades_from_other_origins_get_403() {
    let mut config = two_keys();
    config.server.allowed_origins = vec!["https://chat.example.com".into(), "http://localhost:3000".into()];
    let server = TestServer::start(config).await;
    let key = bearer(WIDGET_KEY);
    let auth = ("authorization", key.as_str());
    assert_eq!(
        upgrade_status(&server, &[auth, ("origin", "https://chat.example.com")]).await,
        None
    );
    assert_eq!(
        upgrade_status(&server, &[auth, ("origin", "http://localhost:3000")]).await,
        None
    );
    // Non-browser clients send no Origin.
    assert_eq!(upgrade_status(&server, &[auth]).await, None);
    for foreign in [
        "https://evil.example",
        "http://chat.example.com",
        "https://chat.example.com.evil.example",
        "http://localhost:3001",
        "null",
    ] {
        assert_eq!(
            upgrade_status(&server, &[auth, ("origin", foreign)]).await,
            Some(403),
            "{foreign}"
        );
    }
    // The origin is checked before the key: a valid key does not help, and no key gets 403 too.
    assert_eq!(
        upgrade_status(&server, &[("origin", "https://evil.example")]).await,
        Some(403)
    );
    server.stop().await;

    // "*" allows any; no list (the default) checks nothing.
    let mut config = test_config();
    config.server.allowed_origins = vec!["*".into()];
    let server = TestServer::start(config).await;
    assert_eq!(
        upgrade_status(&server, &[("origin", "https://anywhere.example")]).await,
        None
    );
    server.stop().await;
    let server = TestServer::start(test_config()).await;
    assert!(server.config.server.allowed_origins.is_empty());
    assert_eq!(
        upgrade_status(&server, &[("origin", "https://anywhere.example")]).await,
        None
    );
    server.stop().await;
}

/// `request` with an optional bearer key; (status, JSON body).
async fn call(request: reqwest::RequestBuilder, key: Option<&str>) -> (u16, Value) {
    let request = match key {
        Some(key) => request.bearer_auth(key),
        None => request,
    };
    let response = tokio::time::timeout(common::WAIT, request.send())
        .await
        .expect("answered in time")
        .expect("request");
    let status = response.status().as_u16();
    (status, serde_json::from_str(&response.text().await.unwrap()).unwrap())
}

async fn get_models(server: &TestServer, key: Option<&str>) -> (u16, Value) {
    call(reqwest::Client::new().get(server.http_url("/v1/models")), key).await
}

#[tokio::test]
async fn the_openai_endpoint_takes_digest_keys_and_refuses_others_with_401() {
    let server = TestServer::start(two_keys()).await;
    let (status, body) = get_models(&server, Some(WIDGET_KEY)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "list", "{body}");
    assert_eq!(body["data"].as_array().unwrap().len(), 1, "{body}");
    for wrong in [Some("dk_widget-test-key-000000000002"), Some(WIDGET_DIGEST), None] {
        let (status, body) = get_models(&server, wrong).await;
        assert_eq!(status, 401, "{wrong:?}: {body}");
        assert_eq!(body["error"]["code"], "invalid_api_key", "{body}");
    }
    server.stop().await;
}

/// Sends `event` and returns the error it gets: (code, message with `id` replaced by `<id>`).
async fn refusal(client: &mut Client, event: Value, id: &str) -> (String, String) {
    client.send(event.clone()).await;
    let e = client.recv().await;
    assert_eq!(e["type"], "error", "{event} got {e}");
    let message = e["error"]["message"].as_str().unwrap();
    assert!(!message.contains("widget"), "{message}");
    (
        e["error"]["code"].as_str().unwrap().to_owned(),
        message.replace(id, "<id>"),
    )
}

/// Each of the calls naming a session or a reply: the answer for one of another key's
/// ids, and for an id that never existed.
async fn compare(client: &mut Client, foreign: &str, unknown: &str, event: impl Fn(&str) -> Value) -> (String, String) {
    let theirs = refusal(client, event(foreign), foreign).await;
    let missing = refusal(client, event(unknown), unknown).await;
    assert_eq!(theirs, missing, "{}", event("ID"));
    theirs
}

#[tokio::test]
async fn another_keys_sessions_and_replies_read_exactly_like_unknown_ones() {
    let server = TestServer::start(two_keys()).await;
    let mut widget = with_key(&server, WIDGET_KEY).await;
    let mut dashboard = with_key(&server, DASHBOARD_KEY).await;
    let session = widget.create_session().await;
    let done = widget.exchange(&session, "mine", json!({})).await;
    let finished = done.last().unwrap()["response_id"].as_str().unwrap().to_owned();

    // A reply of widget's that still runs while dashboard tries it.
    widget
        .send(
            json!({"type": "message.create", "session_id": session, "content": "long one",
                     "options": {"max_tokens": 256, "steps": 256, "block_length": 32}}),
        )
        .await;
    let created = widget.until("response.created").await;
    let running = created.last().unwrap()["response_id"].as_str().unwrap().to_owned();

    let no_session = format!("sess_{}", uuid::Uuid::new_v4().simple());
    let no_response = format!("resp_{}", uuid::Uuid::new_v4().simple());
    let resume = |id: &str| json!({"type": "session.resume", "session_id": id, "event_id": "r"});
    let message = |id: &str| json!({"type": "message.create", "session_id": id, "content": "theirs", "event_id": "m"});
    let cancel = |id: &str| json!({"type": "response.cancel", "response_id": id, "event_id": "c"});
    let resume_response =
        |id: &str| json!({"type": "response.resume", "response_id": id, "after_revision": 0, "event_id": "rr"});
    let update =
        |id: &str| json!({"type": "session.update", "session_id": id, "metadata": {"user": "x"}, "event_id": "u"});

    let d = &mut dashboard;
    let (code, _) = compare(d, &session, &no_session, resume).await;
    assert_eq!(code, "session_not_found");
    let (code, _) = compare(d, &session, &no_session, message).await;
    assert_eq!(code, "session_not_found");
    let (code, _) = compare(d, &session, &no_session, update).await;
    assert_eq!(code, "session_not_found");
    for response in [&running, &finished] {
        let (code, _) = compare(d, response, &no_response, cancel).await;
        assert_eq!(code, "response_not_found");
        let (code, _) = compare(d, response, &no_response, resume_response).await;
        assert_eq!(code, "response_not_found");
    }

    // Nothing dashboard did touched widget's session: the reply was still running (widget's
    // own cancel stops it; a refused cancel would answer `response_not_found`) and no message
    // was added.
    widget
        .send(json!({"type": "response.cancel", "response_id": running, "event_id": "own"}))
        .await;
    let mut events = widget.until("response.done").await;
    assert_eq!(events.last().unwrap()["status"], "cancelled", "{events:?}");
    widget
        .send(json!({"type": "session.resume", "session_id": session}))
        .await;
    events.extend(widget.until("session.resumed").await);
    assert!(!events.iter().any(|e| e["type"] == "error"), "{events:?}");
    let resumed = events.last().unwrap();
    assert!(resumed["metadata"].get("user").is_none(), "{resumed}");
    let messages = resumed["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 4, "{messages:?}");
    assert_eq!(messages[1]["status"], "completed");
    assert_eq!(messages[3]["status"], "cancelled");
    server.stop().await;
}

/// The HTTP status of a refused upgrade of `url`, or `None` when it upgraded (and a session works).
async fn upgrade_status_at(url: &str, headers: &[(&str, &str)]) -> Option<u16> {
    match Client::try_connect_with(url, headers).await {
        Ok(mut c) => {
            expect_in(&mut c).await;
            None
        }
        Err(tungstenite::Error::Http(response)) => Some(response.status().as_u16()),
        Err(e) => panic!("upgrade failed otherwise: {e}"),
    }
}

#[tokio::test]
async fn a_widget_key_works_only_from_the_origins_it_is_bound_to() {
    let mut config = two_keys();
    // Server-wide, only the operator's dashboard origin; the widget key brings its own.
    config.server.allowed_origins = vec!["https://ops.example".into()];
    config.auth.widget_keys = vec![dllm_chat::config::WidgetKey {
        name: "shop".into(),
        key: "pk_shop_0123456789abcdef".into(),
        origins: vec!["https://shop.example".into()],
        messages_per_minute: Some(30),
    }];
    let server = TestServer::start(config).await;
    let url = format!("ws://{}/v1/chat?api_key=pk_shop_0123456789abcdef", server.addr);
    // Accepted in the URL although auth.allow_query_key is off: it is public by design.
    assert!(!server.config.auth.allow_query_key);
    assert_eq!(
        upgrade_status_at(&url, &[("origin", "https://shop.example")]).await,
        None
    );
    for refused in [
        vec![("origin", "https://evil.example")],
        vec![("origin", "https://ops.example")],
        vec![],
    ] {
        assert_eq!(upgrade_status_at(&url, &refused).await, Some(403), "{refused:?}");
    }
    // An unknown pk_ key is just an unknown key (and a query key, which is off).
    let unknown = format!("ws://{}/v1/chat?api_key=pk_nope_0123456789abcdef", server.addr);
    let mut c = Client::connect_with(&unknown, &[("origin", "https://ops.example")]).await;
    expect_unauthorized(&mut c).await;

    // The widget's sessions are its own: an API key's connection cannot see them.
    let mut widget = Client::connect_with(&url, &[("origin", "https://shop.example")]).await;
    let session = widget.create_session().await;
    let mut api = with_key(&server, DASHBOARD_KEY).await;
    api.send(json!({"type": "session.resume", "session_id": session})).await;
    assert_eq!(api.recv().await["error"]["code"], "session_not_found");
    server.stop().await;
}
