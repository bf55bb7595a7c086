//! Who is calling, and from where: the API key a request presents, as the owner name sessions
//! record (one check for every front end on the port), the client's address (behind a proxy,
//! from the header it sets), and the `Origin` allow-list of browser WebSocket upgrades.

use std::net::{IpAddr, SocketAddr};

use axum::http::{header, HeaderMap};

use super::AppState;

/// Why a request was not let in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refused {
    /// No key, or one no `[[auth.keys]]` entry matches.
    UnknownKey,
    /// A key in the URL while `auth.allow_query_key` is off.
    QueryKey,
    /// A known key without `admin = true`, where an admin key is needed.
    NotAdmin,
    /// A ticket that is unknown, already used or expired.
    Ticket,
}

impl Refused {
    pub(super) fn message(self) -> &'static str {
        match self {
            Refused::UnknownKey => "missing or unknown API key",
            Refused::QueryKey => {
                "API keys in the URL are not accepted (auth.allow_query_key is off); send Authorization: Bearer <key>"
            }
            Refused::NotAdmin => "this needs an admin key (an [[auth.keys]] entry with admin = true)",
            Refused::Ticket => {
                "unknown, used or expired ticket; ask POST /v1/tickets for a new one (each admits one connection)"
            }
        }
    }
}

/// The owner name for the key in `Authorization: Bearer` (or `query_key`, `?api_key=` on a
/// WebSocket upgrade, when `auth.allow_query_key` is on); `"anonymous"` with auth off.
pub(super) fn authenticate(state: &AppState, headers: &HeaderMap, query_key: Option<&str>) -> Result<String, Refused> {
    caller(state, headers, query_key).map(|(owner, _)| owner)
}

/// As [`authenticate`], but only for an admin key (`admin = true`); anyone with auth off.
pub(super) fn authenticate_admin(
    state: &AppState,
    headers: &HeaderMap,
    query_key: Option<&str>,
) -> Result<String, Refused> {
    match caller(state, headers, query_key)? {
        (owner, true) => Ok(owner),
        (_, false) => Err(Refused::NotAdmin),
    }
}

/// The owner name of the presented key and whether it is an admin key; with auth off
/// `"anonymous"`, an admin.
fn caller(state: &AppState, headers: &HeaderMap, query_key: Option<&str>) -> Result<(String, bool), Refused> {
    if state.keys.is_empty() {
        return Ok(("anonymous".into(), true));
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
        .lookup(presented)
        .map(|(owner, admin)| (owner.to_owned(), admin))
        .ok_or(Refused::UnknownKey)
}

/// A widget key that was let in.
pub(super) struct Widget {
    pub owner: String,
    pub messages_per_minute: Option<u32>,
}

/// What a `pk_…` key in the URL amounts to.
pub(super) enum WidgetCheck {
    /// No widget key presented: the API key rules apply.
    NotWidget,
    Allowed(Widget),
    /// A known widget key from an origin it is not bound to (or from no browser page at all).
    WrongOrigin,
}

/// Checks a publishable widget key (`?api_key=pk_…`) against the origins it is bound to. An
/// unknown `pk_` key is `NotWidget`, and then fails as an unknown API key.
pub(super) fn widget(state: &AppState, query_key: Option<&str>, headers: &HeaderMap) -> WidgetCheck {
    let Some(presented) = query_key.filter(|k| k.starts_with("pk_")) else {
        return WidgetCheck::NotWidget;
    };
    let Some(key) = state.config.auth.widget_keys.iter().find(|w| w.key == presented) else {
        return WidgetCheck::NotWidget;
    };
    let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
    match origin {
        Some(o) if key.origins.iter().any(|a| a == "*" || a.eq_ignore_ascii_case(o)) => WidgetCheck::Allowed(Widget {
            owner: format!("widget:{}", key.name),
            messages_per_minute: key.messages_per_minute,
        }),
        _ => WidgetCheck::WrongOrigin,
    }
}

/// The client's address: the last entry of `header` (`server.client_address_header`: the entry
/// the proxy in front added) when that is set and the request carries it, else the peer's.
pub(super) fn client_address(header: &str, peer: SocketAddr, headers: &HeaderMap) -> IpAddr {
    if header.is_empty() {
        return peer.ip();
    }
    headers
        .get_all(header)
        .iter()
        .next_back()
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.rsplit(',').next())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(peer.ip())
}

/// Whether a WebSocket upgrade may proceed under `server.allowed_origins`: always with an
/// empty list or without an `Origin` header (not a browser), else only from a listed origin
/// (or with `"*"` listed). Scheme and host compare case-insensitively.
pub(super) fn origin_allowed(allowed: &[String], headers: &HeaderMap) -> bool {
    if allowed.is_empty() {
        return true;
    }
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let Ok(origin) = origin.to_str() else {
        return false;
    };
    allowed.iter().any(|a| a == "*" || a.eq_ignore_ascii_case(origin))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin(value: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(v) = value {
            h.insert(header::ORIGIN, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn the_client_address_is_the_peer_unless_a_proxy_header_is_configured_and_sent() {
        let peer: SocketAddr = "10.0.0.9:5000".parse().unwrap();
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "203.0.113.7, 198.51.100.2".parse().unwrap());
        assert_eq!(client_address("", peer, &h), peer.ip(), "no header configured");
        assert_eq!(
            client_address("x-forwarded-for", peer, &h).to_string(),
            "198.51.100.2",
            "the entry the proxy added, not the one the client sent"
        );
        assert_eq!(client_address("x-real-ip", peer, &h), peer.ip(), "not sent");
        h.insert("x-real-ip", "not an address".parse().unwrap());
        assert_eq!(client_address("x-real-ip", peer, &h), peer.ip(), "unreadable");
    }

    #[test]
    fn origins_are_checked_only_when_listed_and_sent() {
        let listed = vec![
            "https://chat.example.com".to_owned(),
            "http://localhost:3000".to_owned(),
        ];
        assert!(origin_allowed(&[], &origin(Some("https://evil.example"))));
        assert!(origin_allowed(&listed, &origin(None)));
        assert!(origin_allowed(&listed, &origin(Some("https://chat.example.com"))));
        assert!(origin_allowed(&listed, &origin(Some("HTTPS://Chat.Example.com"))));
        assert!(origin_allowed(&listed, &origin(Some("http://localhost:3000"))));
        assert!(!origin_allowed(&listed, &origin(Some("http://localhost:3001"))));
        assert!(!origin_allowed(&listed, &origin(Some("http://chat.example.com"))));
        assert!(!origin_allowed(
            &listed,
            &origin(Some("https://chat.example.com.evil.example"))
        ));
        assert!(!origin_allowed(&listed, &origin(Some("null"))));
        assert!(origin_allowed(&["*".to_owned()], &origin(Some("null"))));
    }
}
