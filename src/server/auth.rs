//! Who is calling: the API key a request presents, as the owner name sessions record. One check
//! for every front end on the port.

use axum::http::{header, HeaderMap};

use super::AppState;

/// Why a request was not let in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refused {
    /// No key, or one no `[[auth.keys]]` entry matches.
    UnknownKey,
    /// A key in the URL while `auth.allow_query_key` is off.
    QueryKey,
}

impl Refused {
    pub(super) fn message(self) -> &'static str {
        match self {
            Refused::UnknownKey => "missing or unknown API key",
            Refused::QueryKey => {
                "API keys in the URL are not accepted (auth.allow_query_key is off); send Authorization: Bearer <key>"
            }
        }
    }
}

/// The owner name for the key in `Authorization: Bearer` (or `query_key`, `?api_key=` on a
/// WebSocket upgrade, when `auth.allow_query_key` is on); `"anonymous"` with auth off.
pub(super) fn authenticate(state: &AppState, headers: &HeaderMap, query_key: Option<&str>) -> Result<String, Refused> {
    if state.keys.is_empty() {
        return Ok("anonymous".into());
    }
    if query_key.is_some() && !state.config.auth.allow_query_key {
        return Err(Refused::QueryKey);
    }
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let presented = bearer.or(query_key).ok_or(Refused::UnknownKey)?;
    state
        .keys
        .owner(presented)
        .map(str::to_owned)
        .ok_or(Refused::UnknownKey)
}
