//! The OpenAI-compatible endpoint, driven by the real `openai` Python package
//! (`tests/openai/client.py`; `scripts/deps` installs the pinned version from
//! `tests/openai/requirements.txt`).

mod common;

use common::{test_config, TestServer};
use dllm_chat::config::ApiKey;
use dllm_chat::keys::KeyDigest;
use serde_json::json;

const KEY: &str = "sk-openai-test-0001";

#[tokio::test]
async fn the_openai_python_client_gets_completions_streams_and_errors() {
    let mut config = test_config();
    config.auth.keys = vec![ApiKey::with_digest("openai-tests", KeyDigest::of(KEY))];
    config.limits.max_message_chars = 4000;
    let model = dllm_chat::models::display_name(&config.model.path);
    let server = TestServer::start(config).await;

    let mut ws = server
        .connect_with(&[("authorization", &format!("Bearer {KEY}"))])
        .await;
    let session = ws.create_session().await;

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/openai/client.py");
    let run = tokio::process::Command::new("python3")
        .args([script, &format!("http://{}/v1", server.addr), KEY, &model, &session])
        .output();
    let output = tokio::time::timeout(std::time::Duration::from_secs(120), run)
        .await
        .expect("the client finishes")
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the openai client failed (is `openai` installed? scripts/deps installs it)\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("all checks passed"), "{stdout}");

    // The session_id extension stored its turn like any other front end would.
    ws.send(json!({"type": "session.resume", "session_id": session})).await;
    let resumed = ws.recv().await;
    let messages = resumed["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 2, "{resumed}");
    assert_eq!(messages[0]["content"], "hi from the openai client");
    assert_eq!(messages[1]["status"], "completed");
    server.stop().await;
}

#[tokio::test]
async fn browsers_on_allowed_origins_may_call_the_api_and_others_may_not() {
    let mut config = test_config();
    config.server.allowed_origins = vec!["http://shop.example".into()];
    let server = TestServer::start(config).await;
    let http = reqwest::Client::new();
    let preflight = |origin: &'static str| {
        http.request(reqwest::Method::OPTIONS, server.http_url("/v1/chat/completions"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "authorization,content-type")
            .send()
    };
    let allowed = preflight("http://shop.example").await.unwrap();
    let headers = allowed.headers();
    assert_eq!(headers["access-control-allow-origin"], "http://shop.example");
    let methods = headers["access-control-allow-methods"].to_str().unwrap().to_lowercase();
    assert!(methods.contains("post"), "{methods}");
    let asked = headers["access-control-allow-headers"].to_str().unwrap().to_lowercase();
    assert!(
        asked.contains("authorization") && asked.contains("content-type"),
        "{asked}"
    );

    let refused = preflight("http://evil.example").await.unwrap();
    assert!(
        refused.headers().get("access-control-allow-origin").is_none(),
        "another origin gets no CORS grant: {:?}",
        refused.headers()
    );
    let models = http
        .get(server.http_url("/v1/models"))
        .header("origin", "http://shop.example")
        .send()
        .await
        .unwrap();
    assert_eq!(models.status(), 200);
    assert_eq!(models.headers()["access-control-allow-origin"], "http://shop.example");
    server.stop().await;
}
