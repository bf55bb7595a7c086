//! The support widget and its demo page: `GET /widget.js` and `GET /` (and the latency
//! dashboard, `GET /dashboard` with `/dashboard.js`), read from
//! `server.web_dir` (the Vite build output, `web/dist`) at request time, so a rebuilt widget is
//! served without a restart. Missing files answer 503 with how to build them; the build output
//! is never committed.

use std::path::Path;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::AppState;

/// `widget.js` has no content hash in its name (sites embed a fixed URL), so caches revalidate
/// after five minutes; the demo page is always revalidated.
const WIDGET_CACHE: &str = "public, max-age=300";
const PAGE_CACHE: &str = "no-cache";

/// The widget script, for any site that embeds it.
pub(super) async fn widget(State(state): State<Arc<AppState>>) -> Response {
    serve(
        &state.config.server.web_dir,
        "widget.js",
        "text/javascript; charset=utf-8",
        WIDGET_CACHE,
    )
    .await
}

/// The live latency dashboard (it reads `/v1/stats`).
pub(super) async fn dashboard(State(state): State<Arc<AppState>>) -> Response {
    serve(
        &state.config.server.web_dir,
        "dashboard.html",
        "text/html; charset=utf-8",
        PAGE_CACHE,
    )
    .await
}

/// The dashboard's script (uPlot bundled in).
pub(super) async fn dashboard_script(State(state): State<Arc<AppState>>) -> Response {
    serve(
        &state.config.server.web_dir,
        "dashboard.js",
        "text/javascript; charset=utf-8",
        PAGE_CACHE,
    )
    .await
}

/// The demo storefront that embeds the widget.
pub(super) async fn demo(State(state): State<Arc<AppState>>) -> Response {
    serve(
        &state.config.server.web_dir,
        "index.html",
        "text/html; charset=utf-8",
        PAGE_CACHE,
    )
    .await
}

async fn serve(dir: &Path, name: &str, content_type: &'static str, cache: &'static str) -> Response {
    let path = dir.join(name);
    match tokio::fs::read(&path).await {
        Ok(body) => (
            [
                (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
                (header::CACHE_CONTROL, HeaderValue::from_static(cache)),
                (header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
            ],
            body,
        )
            .into_response(),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "web file missing; build web/ first");
            not_built(dir, name)
        }
    }
}

/// 503 naming the missing file and the commands that build it.
fn not_built(dir: &Path, name: &str) -> Response {
    let dir = dir.display().to_string();
    let text = format!(
        "{name} is not built: {dir}/{name} is missing. Run `npm ci && npm run build` in web/ \
         (scripts/serve does), or point server.web_dir at the build output."
    );
    let headers = [(header::CACHE_CONTROL, HeaderValue::from_static("no-store"))];
    if name.ends_with(".html") {
        let page = format!(
            "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Widget not built</title></head>\
             <body style=\"font:16px/1.5 system-ui,sans-serif;max-width:40em;margin:4em auto;padding:0 1em\">\
             <h1>The support widget is not built</h1><p><code>{}</code> is missing.</p>\
             <p>Run <code>npm ci &amp;&amp; npm run build</code> in <code>web/</code> (or <code>scripts/serve</code>, \
             which does), or point <code>server.web_dir</code> at the build output.</p></body></html>",
            escape(&format!("{dir}/{name}"))
        );
        let html = [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        )];
        (StatusCode::SERVICE_UNAVAILABLE, headers, html, page).into_response()
    } else {
        let plain = [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        )];
        (StatusCode::SERVICE_UNAVAILABLE, headers, plain, text).into_response()
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
