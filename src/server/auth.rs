//! Who is calling: the API key a request presents, as the owner name sessions record. One check
//! for every front end on the port.

use axum::http::HeaderMap;

use super::AppState;

/// The owner name for the key in `Authorization: Bearer` (or `query_key`, which browsers need
/// for WebSockets); `Some("anonymous")` with auth off, `None` for a missing or unknown key.
pub(super) fn authenticate(state: &AppState, headers: &HeaderMap, query_key: Option<&str>) -> Option<String> {
    let keys = &state.config.auth.keys;
    if keys.is_empty() {
        return Some("anonymous".into());
    }
    let bearer = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let presented = bearer.or(query_key)?;
    keys.iter().find(|k| k.key == presented).map(|k| k.name.clone())
}
