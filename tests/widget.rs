//! The support widget in a real browser: builds `web/` (`npm run build`) and runs
//! `web/tests/widget.spec.mjs`, then `web/tests/dashboard.spec.mjs` (playwright-core driving Debian's `/usr/bin/chromium`, no browser
//! download) against this crate's `dllm-chat` binary. What it checks is listed at the top of the
//! spec. Without chromium, node or `web/node_modules` it fails when `CI` is set and otherwise
//! prints how to install them (`scripts/deps` does) and passes.

mod common;

use std::path::Path;
use std::process::Command;

use common::{test_config, TestServer};

async fn get(url: &str) -> (u16, String, String, String) {
    let r = reqwest::get(url).await.expect("request");
    let header = |name: &str| {
        r.headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    };
    let (content_type, cache) = (header("content-type"), header("cache-control"));
    (r.status().as_u16(), content_type, cache, r.text().await.unwrap())
}

#[tokio::test]
async fn the_widget_and_demo_page_are_served_from_web_dir_or_say_how_to_build_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config();
    config.server.web_dir = dir.path().to_path_buf();
    let server = TestServer::start(config).await;

    let (status, _, cache, body) = get(&server.http_url("/")).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(cache, "no-store");
    assert!(body.contains("npm ci &amp;&amp; npm run build"), "{body}");
    let (status, _, _, body) = get(&server.http_url("/widget.js")).await;
    assert_eq!(status, 503);
    assert!(body.contains("npm ci && npm run build"), "{body}");

    // Read at request time: a build appearing later is served without a restart.
    std::fs::write(dir.path().join("widget.js"), "console.log('widget')").unwrap();
    std::fs::write(dir.path().join("index.html"), "<!doctype html><title>shop</title>").unwrap();
    let (status, content_type, cache, body) = get(&server.http_url("/widget.js")).await;
    assert_eq!((status, body.as_str()), (200, "console.log('widget')"));
    assert_eq!(content_type, "text/javascript; charset=utf-8");
    assert_eq!(cache, "public, max-age=300");
    let (status, content_type, cache, body) = get(&server.http_url("/")).await;
    assert_eq!(status, 200);
    assert_eq!(content_type, "text/html; charset=utf-8");
    assert_eq!(cache, "no-cache");
    assert!(body.contains("<title>shop</title>"));
    server.stop().await;
}

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

#[test]
fn the_widget_streams_resumes_and_reconnects_in_a_real_browser() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let web = root.join("web");
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    let mut missing = Vec::new();
    if !Path::new(&chromium).exists() {
        missing.push(format!("{chromium} (apt-get install chromium)"));
    }
    if Command::new("node").arg("--version").output().is_err() {
        missing.push("node (Node.js 20 or newer)".into());
    }
    if !web.join("node_modules/playwright-core").exists() {
        missing.push("web/node_modules (npm ci in web/)".into());
    }
    if !missing.is_empty() {
        let message = format!(
            "the browser test needs {}; scripts/deps installs them",
            missing.join(", ")
        );
        assert!(!ci(), "{message}");
        eprintln!("SKIPPED (not CI): {message}");
        return;
    }

    let build = Command::new("npm")
        .args(["run", "build"])
        .current_dir(&web)
        .output()
        .expect("npm runs");
    assert!(
        build.status.success(),
        "npm run build failed\n{}\n{}",
        String::from_utf8_lossy(&build.stdout),
        String::from_utf8_lossy(&build.stderr)
    );

    // The widget, then the latency dashboard, on the same build.
    for (spec, passed) in [
        ("tests/widget.spec.mjs", "all widget checks passed"),
        ("tests/dashboard.spec.mjs", "all dashboard checks passed"),
    ] {
        let run = Command::new("node")
            .arg(web.join(spec))
            .current_dir(root)
            .env("DLLM_BIN", env!("CARGO_BIN_EXE_dllm-chat"))
            .env("CHROMIUM", &chromium)
            .output()
            .expect("node runs");
        let stdout = String::from_utf8_lossy(&run.stdout);
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(
            run.status.success() && stdout.contains(passed),
            "the browser test {spec} failed\n{stdout}\n{stderr}"
        );
        // The checks that passed and where the screenshots are, for `cargo test -- --nocapture`.
        println!("{stdout}");
    }
}
