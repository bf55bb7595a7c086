//! Configuration: the built-in `config/default.toml`, an optional file, `DLLM_*` environment
//! variables and command-line flags, merged in that order and validated once at startup.
//!
//! Validation errors name the setting (`limits.max_frame_bytes`) and the rule it broke, so an
//! operator can fix the file without reading code.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

use crate::engine::{
    CacheMode, DeviceKind, EngineKind, EngineSettings, HistoryWindow, Lookahead, PolicyKind, Selection,
};

/// The built-in defaults, also the documented reference of every setting.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");
/// The built-in system prompt.
pub const DEFAULT_SYSTEM_PROMPT: &str = include_str!("../prompts/system.md");

/// Errors from loading or validating configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration could not be read: {0}")]
    Load(#[from] Box<figment::Error>),
    #[error("invalid setting `{setting}`: {reason}")]
    Invalid { setting: &'static str, reason: String },
    /// A setting inside a list, named with its index (`auth.keys[2].digest`).
    #[error("invalid setting `{setting}`: {reason}")]
    InvalidEntry { setting: String, reason: String },
    #[error("system prompt file {path:?} could not be read: {source}")]
    SystemPrompt { path: PathBuf, source: std::io::Error },
}

/// The command-line flags every binary takes (flattened into each one's arguments).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct CommonArgs {
    /// Configuration file (TOML); the built-in defaults apply to anything it leaves out.
    #[arg(long, global = true, env = "DLLM_CONFIG")]
    pub config: Option<PathBuf>,
    /// GGUF model path, `builtin:northwind` (the bundled model) or `builtin:fixture`.
    #[arg(long, global = true)]
    pub model: Option<String>,
    /// Engine implementation.
    #[arg(long, global = true, value_enum)]
    pub engine: Option<crate::engine::EngineKind>,
}

/// Settings the command line can give, over the file and the environment.
#[derive(Debug, Clone, Default)]
pub struct Flags {
    /// `--model`
    pub model: Option<String>,
    /// `--engine`
    pub engine: Option<crate::engine::EngineKind>,
    /// `--bind`
    pub bind: Option<String>,
    /// `--store`
    pub store: Option<String>,
}

impl CommonArgs {
    /// The configuration these flags (and `bind`, `store` where a binary has them) select.
    pub fn load(&self, bind: Option<String>, store: Option<String>) -> Result<Config, ConfigError> {
        let flags = Flags {
            model: self.model.clone(),
            engine: self.engine,
            bind,
            store,
        };
        Config::load_with(self.config.as_deref(), &flags)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub limits: LimitsConfig,
    pub quotas: QuotasConfig,
    pub model: ModelConfig,
    pub decode: DecodeConfig,
    pub store: StoreConfig,
    pub chat: ChatConfig,
    pub auth: AuthConfig,
    pub prompt: PromptConfig,
    pub chatwoot: ChatwootConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub bind: SocketAddr,
    pub max_connections: usize,
    pub shutdown_grace_ms: u64,
    pub ping_interval_ms: u64,
    pub idle_timeout_ms: u64,
    pub outgoing_queue: usize,
    pub listen_backlog: u32,
    pub ws_read_buffer_bytes: usize,
    pub ws_write_buffer_bytes: usize,
    /// Origins (`scheme://host[:port]`, or `"*"`) a browser may open a WebSocket from; empty =
    /// any. Upgrades without an `Origin` header (non-browser clients) are always allowed.
    pub allowed_origins: Vec<String>,
    /// Where the built support widget (`widget.js`) and its demo page (`index.html`) are read
    /// from at request time; relative paths start at the working directory.
    pub web_dir: PathBuf,
    /// The header a proxy in front names the client's address in (its last entry counts);
    /// empty: the socket's peer address.
    pub client_address_header: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    pub max_frame_bytes: usize,
    pub hard_frame_bytes: usize,
    pub max_message_chars: usize,
    pub max_running_replies: usize,
    pub replies_per_evaluation: usize,
    pub max_waiting_replies: usize,
    pub kept_conversation_caches: usize,
    pub messages_per_minute: u32,
    pub message_burst: u32,
    pub max_reply_tokens: usize,
    pub max_steps: usize,
}

/// Limits shared by every replica on the session store ([`crate::quotas`]); 0 turns one off.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotasConfig {
    pub key_connections: usize,
    pub key_messages_per_minute: u32,
    pub key_message_burst: u32,
    pub ip_connections: usize,
    pub ip_requests_per_minute: u32,
    pub ip_request_burst: u32,
    pub slot_ttl_secs: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub path: String,
    pub engine: EngineKind,
    pub cache: CacheMode,
    /// Canvas cells past the current block the cached engine computes: `"all"` or a count.
    pub lookahead: Lookahead,
    pub reuse_history: bool,
    /// The system prompt is a prompt chunk of its own, shared by every conversation.
    pub share_system_prompt: bool,
    pub device: DeviceKind,
    pub top_k: usize,
    pub threads: usize,
    pub context_length: usize,
    /// How much history a prompt keeps inside the context: `"trained"`, `"off"` or tokens.
    pub history_window: HistoryWindow,
    /// The autoregressive engine sends a revision every this many tokens.
    pub tokens_per_revision: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecodeConfig {
    pub max_tokens: usize,
    pub steps: usize,
    pub block_length: usize,
    pub policy: PolicyKind,
    pub threshold: f32,
    pub factor: f32,
    pub selection: Selection,
    /// A position that would say a piece twice in a row waits a step, unless it is the step's best.
    pub defer_repeats: bool,
    pub temperature: f32,
    pub seed: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    pub url: String,
    pub key_prefix: String,
    pub session_ttl_secs: u64,
    pub connect_timeout_ms: u64,
    pub command_timeout_ms: u64,
    pub reply_log_ttl_secs: u64,
    pub reply_log_events: usize,
}

/// Settings of the conversation core.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatConfig {
    /// A session lease lasts this long unless renewed (every third of it) while its reply runs.
    pub lease_ms: u64,
    /// How often each replica looks for replies whose lease expired.
    pub recovery_interval_ms: u64,
    /// The longest one blocking read of remote reply logs waits.
    pub tail_block_ms: u64,
    /// A reply whose asking client went away still finishes and is stored.
    pub finish_orphaned_replies: bool,
    /// Events buffered per watched reply before a slow watcher skips revisions.
    pub watch_buffer: usize,
    /// A completed reply containing one of these (case-insensitive) hands the conversation to a
    /// person: it is marked `handover` (the widget shows it, the Chatwoot bot opens the
    /// conversation for an agent).
    pub handover_phrases: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    pub keys: Vec<ApiKey>,
    /// Accept `?api_key=` on WebSocket upgrades (URLs end up in proxy and access logs).
    pub allow_query_key: bool,
    /// Publishable keys for the support widget, each bound to the origins of its pages.
    #[serde(default)]
    pub widget_keys: Vec<WidgetKey>,
    /// A one-time ticket from `POST /v1/tickets` admits one WebSocket upgrade within this long.
    pub ticket_ttl_secs: u64,
}

/// A publishable key for the support widget: public (it sits in a page), so it is bound to the
/// origins that may present it, and sessions record `widget:<name>` as their owner.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WidgetKey {
    pub name: String,
    /// `pk_…`
    pub key: String,
    /// `scheme://host[:port]` of the pages that embed the widget.
    pub origins: Vec<String>,
    /// Messages per minute per connection, instead of `limits.messages_per_minute`.
    #[serde(default)]
    pub messages_per_minute: Option<u32>,
}

/// A client credential: exactly one of `digest` (`sha256:<64 hex>` of the key) and `key` (the
/// key itself; deprecated). `name` is what sessions record as their owner, so the secret itself
/// is never written to the store.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKey {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// May read the live timing feed (`GET /v1/stats`) behind the dashboard.
    #[serde(default)]
    pub admin: bool,
}

impl ApiKey {
    /// An entry holding the key's digest.
    pub fn with_digest(name: impl Into<String>, digest: crate::keys::KeyDigest) -> Self {
        Self {
            name: name.into(),
            digest: Some(digest.to_string()),
            key: None,
            admin: false,
        }
    }

    /// An entry holding the key itself (deprecated in configuration files).
    pub fn plain(name: impl Into<String>, key: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            digest: None,
            key: Some(key.into()),
            admin: false,
        }
    }
}

/// Never shows a plain key, so a logged or printed configuration leaks no credential.
impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKey")
            .field("name", &self.name)
            .field("digest", &self.digest)
            .field("key", &self.key.as_ref().map(|_| "<redacted>"))
            .field("admin", &self.admin)
            .finish()
    }
}

/// The Chatwoot agent bot (`POST /integrations/chatwoot`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatwootConfig {
    pub enabled: bool,
    /// Chatwoot's address, `https://app.chatwoot.com` say.
    pub base_url: String,
    pub account_id: u64,
    /// The agent bot's access token (sent as `api_access_token`).
    pub bot_token: String,
    /// The webhook URL carries it as `?secret=`; other requests are refused.
    pub webhook_secret: String,
    /// The longest one call to Chatwoot may take.
    pub request_timeout_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptConfig {
    pub system_file: String,
    pub mask_placeholder: String,
}

impl Config {
    /// Defaults, then `file` (when given), then `DLLM_*` environment variables. Not validated.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Toml::string(DEFAULT_TOML));
        if let Some(file) = file {
            if !file.is_file() {
                return Err(ConfigError::Invalid {
                    setting: "--config",
                    reason: format!("{} is not a readable file", file.display()),
                });
            }
            figment = figment.merge(Toml::file(file));
        }
        // Only `DLLM_<SECTION>__<KEY>` variables are settings; others with the prefix (the test
        // suite's `DLLM_TEST_REDIS_URL`, say) belong to other tools.
        figment = figment.merge(
            Env::prefixed("DLLM_")
                .filter(|key| key.as_str().contains("__"))
                .split("__"),
        );
        figment.extract().map_err(|e| ConfigError::Load(Box::new(e)))
    }

    /// The built-in defaults alone (no file, no environment), for tests and tools.
    pub fn defaults() -> Self {
        Figment::from(Toml::string(DEFAULT_TOML))
            .extract()
            .expect("built-in defaults parse")
    }

    /// `load`, then the command-line flags both binaries share. Not validated.
    pub fn load_with(file: Option<&Path>, flags: &Flags) -> Result<Self, ConfigError> {
        let mut patch = serde_json::Map::new();
        let mut set = |section: &str, key: &str, value: serde_json::Value| {
            let entry = patch
                .entry(section)
                .or_insert_with(|| serde_json::Value::Object(Default::default()));
            entry[key] = value;
        };
        if let Some(m) = &flags.model {
            set("model", "path", m.clone().into());
        }
        if let Some(e) = flags.engine {
            set(
                "model",
                "engine",
                serde_json::to_value(e).expect("engine kinds serialize"),
            );
        }
        if let Some(b) = &flags.bind {
            set("server", "bind", b.clone().into());
        }
        if let Some(s) = &flags.store {
            set("store", "url", s.clone().into());
        }
        Self::load(file)?.merged(serde_json::Value::Object(patch))
    }

    /// Applies overrides given as a serializable patch (e.g. command-line flags).
    pub fn merged<T: Serialize>(self, patch: T) -> Result<Self, ConfigError> {
        Figment::from(Serialized::defaults(self))
            .merge(Serialized::defaults(patch))
            .extract()
            .map_err(|e| ConfigError::Load(Box::new(e)))
    }

    /// Checks every rule that config alone can break.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn positive(setting: &'static str, v: usize) -> Result<(), ConfigError> {
            if v == 0 {
                return Err(ConfigError::Invalid {
                    setting,
                    reason: "must be at least 1".into(),
                });
            }
            Ok(())
        }
        let s = &self.server;
        let l = &self.limits;
        positive("server.max_connections", s.max_connections)?;
        positive("server.ping_interval_ms", s.ping_interval_ms as usize)?;
        positive("server.outgoing_queue", s.outgoing_queue)?;
        positive("server.listen_backlog", s.listen_backlog as usize)?;
        positive("server.ws_read_buffer_bytes", s.ws_read_buffer_bytes)?;
        if s.idle_timeout_ms <= s.ping_interval_ms {
            return Err(ConfigError::Invalid {
                setting: "server.idle_timeout_ms",
                reason: format!("must exceed server.ping_interval_ms ({})", s.ping_interval_ms),
            });
        }
        positive("limits.max_frame_bytes", l.max_frame_bytes)?;
        if l.hard_frame_bytes < l.max_frame_bytes {
            return Err(ConfigError::Invalid {
                setting: "limits.hard_frame_bytes",
                reason: format!("must be at least limits.max_frame_bytes ({})", l.max_frame_bytes),
            });
        }
        positive("limits.max_message_chars", l.max_message_chars)?;
        positive("limits.max_running_replies", l.max_running_replies)?;
        if l.kept_conversation_caches < l.max_running_replies {
            return Err(ConfigError::Invalid {
                setting: "limits.kept_conversation_caches",
                reason: format!(
                    "must be at least limits.max_running_replies ({})",
                    l.max_running_replies
                ),
            });
        }
        if self.model.top_k < 2 {
            return Err(ConfigError::Invalid {
                setting: "model.top_k",
                reason: "must be at least 2 (the margin selection needs the runner-up)".into(),
            });
        }
        positive("limits.messages_per_minute", l.messages_per_minute as usize)?;
        let q = &self.quotas;
        positive("quotas.key_message_burst", q.key_message_burst as usize)?;
        positive("quotas.ip_request_burst", q.ip_request_burst as usize)?;
        positive("quotas.slot_ttl_secs", q.slot_ttl_secs as usize)?;
        let header = &s.client_address_header;
        if !header.is_empty() && axum::http::HeaderName::from_bytes(header.as_bytes()).is_err() {
            return Err(ConfigError::Invalid {
                setting: "server.client_address_header",
                reason: format!("{header:?} is not a header name"),
            });
        }
        positive("limits.message_burst", l.message_burst as usize)?;
        positive("limits.max_reply_tokens", l.max_reply_tokens)?;
        positive("limits.max_steps", l.max_steps)?;
        positive("model.threads", self.model.threads)?;
        if self.model.context_length < 16 {
            return Err(ConfigError::Invalid {
                setting: "model.context_length",
                reason: "must be at least 16".into(),
            });
        }
        if self.model.path.is_empty() {
            return Err(ConfigError::Invalid {
                setting: "model.path",
                reason: "must name a GGUF file".into(),
            });
        }
        let store = &self.store;
        if store.url != "memory" && !store.url.starts_with("redis://") && !store.url.starts_with("rediss://") {
            return Err(ConfigError::Invalid {
                setting: "store.url",
                reason: format!("must be \"memory\" or a redis:// URL, got {:?}", store.url),
            });
        }
        positive("store.session_ttl_secs", store.session_ttl_secs as usize)?;
        positive("store.connect_timeout_ms", store.connect_timeout_ms as usize)?;
        positive("store.command_timeout_ms", store.command_timeout_ms as usize)?;
        positive("store.reply_log_ttl_secs", store.reply_log_ttl_secs as usize)?;
        if store.reply_log_events < 2 {
            return Err(ConfigError::Invalid {
                setting: "store.reply_log_events",
                reason: "must be at least 2 (the newest revision and the terminal event)".into(),
            });
        }
        let chat = &self.chat;
        if chat.lease_ms < 300 {
            return Err(ConfigError::Invalid {
                setting: "chat.lease_ms",
                reason: "must be at least 300 (it is renewed every third of it)".into(),
            });
        }
        positive("chat.recovery_interval_ms", chat.recovery_interval_ms as usize)?;
        positive("chat.tail_block_ms", chat.tail_block_ms as usize)?;
        positive("chat.watch_buffer", chat.watch_buffer)?;
        let cw = &self.chatwoot;
        if cw.enabled {
            if !(cw.base_url.starts_with("http://") || cw.base_url.starts_with("https://")) {
                return Err(ConfigError::Invalid {
                    setting: "chatwoot.base_url",
                    reason: format!("must be an http:// or https:// URL, got {:?}", cw.base_url),
                });
            }
            if cw.bot_token.is_empty() {
                return Err(ConfigError::Invalid {
                    setting: "chatwoot.bot_token",
                    reason: "must be set when chatwoot.enabled".into(),
                });
            }
            if cw.webhook_secret.len() < 16 {
                return Err(ConfigError::Invalid {
                    setting: "chatwoot.webhook_secret",
                    reason: "must be at least 16 characters when chatwoot.enabled".into(),
                });
            }
            positive("chatwoot.request_timeout_ms", cw.request_timeout_ms as usize)?;
        }
        for (i, origin) in s.allowed_origins.iter().enumerate() {
            check_origin(origin).map_err(|reason| ConfigError::InvalidEntry {
                setting: format!("server.allowed_origins[{i}]"),
                reason,
            })?;
        }
        for (i, w) in self.auth.widget_keys.iter().enumerate() {
            let invalid = |field: &str, reason: String| ConfigError::InvalidEntry {
                setting: format!("auth.widget_keys[{i}].{field}"),
                reason,
            };
            if w.name.trim().is_empty() {
                return Err(invalid("name", "must not be empty".into()));
            }
            if !w.key.starts_with("pk_") || w.key.len() < 16 {
                return Err(invalid(
                    "key",
                    "must start with \"pk_\" and have at least 16 characters".into(),
                ));
            }
            if w.origins.is_empty() {
                return Err(invalid(
                    "origins",
                    "must list the origins of the pages that embed the widget".into(),
                ));
            }
            for origin in &w.origins {
                check_origin(origin).map_err(|reason| invalid("origins", reason))?;
            }
            if w.messages_per_minute == Some(0) {
                return Err(invalid("messages_per_minute", "must be at least 1".into()));
            }
        }
        positive("auth.ticket_ttl_secs", self.auth.ticket_ttl_secs as usize)?;
        positive("model.tokens_per_revision", self.model.tokens_per_revision)?;
        self.validate_keys()
    }

    fn validate_keys(&self) -> Result<(), ConfigError> {
        use crate::keys::{KeyDigest, MIN_PLAIN_KEY_CHARS};
        let invalid = |i: usize, field: &str, reason: String| ConfigError::InvalidEntry {
            setting: format!("auth.keys[{i}].{field}"),
            reason,
        };
        let mut seen: Vec<KeyDigest> = Vec::new();
        for (i, k) in self.auth.keys.iter().enumerate() {
            if k.name.trim().is_empty() {
                return Err(invalid(
                    i,
                    "name",
                    "must not be empty (sessions record it as their owner)".into(),
                ));
            }
            let (field, digest) = match (&k.digest, &k.key) {
                (Some(d), None) => (
                    "digest",
                    d.parse::<KeyDigest>()
                        .map_err(|e| invalid(i, "digest", e.to_string()))?,
                ),
                (None, Some(key)) => {
                    if key.chars().count() < MIN_PLAIN_KEY_CHARS {
                        return Err(invalid(
                            i,
                            "key",
                            format!(
                                "must be at least {MIN_PLAIN_KEY_CHARS} characters (`dllm-chat keys new` makes one)"
                            ),
                        ));
                    }
                    ("key", KeyDigest::of(key))
                }
                (Some(_), Some(_)) => {
                    return Err(invalid(i, "key", "give either `digest` or `key`, not both".into()));
                }
                (None, None) => {
                    return Err(invalid(
                        i,
                        "digest",
                        "missing: give `digest = \"sha256:...\"` (`dllm-chat keys new` prints one)".into(),
                    ));
                }
            };
            if let Some(j) = seen.iter().position(|d| *d == digest) {
                return Err(invalid(i, field, format!("the same key as auth.keys[{j}]")));
            }
            seen.push(digest);
        }
        Ok(())
    }

    /// What the engine is started with: `[model]` (but the path), the engine's `[limits]` and the
    /// mask placeholder.
    pub fn engine_settings(&self) -> EngineSettings {
        let (m, l) = (&self.model, &self.limits);
        EngineSettings {
            kind: m.engine,
            device: m.device,
            cache_mode: m.cache,
            lookahead: m.lookahead,
            reuse_history: m.reuse_history,
            share_system_prompt: m.share_system_prompt,
            top_k: m.top_k,
            threads: m.threads,
            context_length: m.context_length,
            history_window: m.history_window,
            max_running: l.max_running_replies,
            per_evaluation: l.replies_per_evaluation,
            max_waiting: l.max_waiting_replies,
            kept_caches: l.kept_conversation_caches,
            mask_placeholder: self.prompt.mask_placeholder.clone(),
            tokens_per_revision: m.tokens_per_revision,
        }
    }

    /// The system prompt text: the configured file, or the built-in one.
    pub fn system_prompt(&self) -> Result<String, ConfigError> {
        if self.prompt.system_file.is_empty() {
            return Ok(DEFAULT_SYSTEM_PROMPT.trim().to_owned());
        }
        let path = PathBuf::from(&self.prompt.system_file);
        std::fs::read_to_string(&path)
            .map(|s| s.trim().to_owned())
            .map_err(|source| ConfigError::SystemPrompt { path, source })
    }
}

/// An allowed origin is `"*"` or a serialized origin as browsers send it: `scheme://host` with
/// an optional `:port`, no path, no trailing slash.
fn check_origin(origin: &str) -> Result<(), String> {
    if origin == "*" {
        return Ok(());
    }
    let rule = || format!("must be \"*\" or scheme://host[:port] with no path, got {origin:?}");
    let (scheme, rest) = origin.split_once("://").ok_or_else(rule)?;
    let scheme_ok = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme.chars().all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
    let (host, port) = match rest.rsplit_once(':') {
        // An IPv6 literal holds colons of its own: `[::1]` or `[::1]:8080`.
        Some((host, port)) if !port.contains(']') => (host, Some(port)),
        _ => (rest, None),
    };
    let host_ok = !host.is_empty()
        && if let Some(inner) = host.strip_prefix('[') {
            inner
                .strip_suffix(']')
                .is_some_and(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok())
        } else {
            host.chars().all(|c| c.is_ascii_alphanumeric() || "-.".contains(c))
        };
    let port_ok = port.is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.parse::<u16>().is_ok_and(|p| p > 0));
    if scheme_ok && host_ok && port_ok {
        Ok(())
    } else {
        Err(rule())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Config::defaults().validate().unwrap();
    }

    #[test]
    fn errors_name_the_setting() {
        let mut c = Config::defaults();
        c.limits.hard_frame_bytes = 10;
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("limits.hard_frame_bytes"), "{err}");

        let mut c = Config::defaults();
        c.store.url = "postgres://x".into();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("store.url"), "{err}");

        let mut c = Config::defaults();
        c.chat.lease_ms = 10;
        assert!(c.validate().unwrap_err().to_string().contains("chat.lease_ms"));
    }

    fn with_keys(keys: Vec<ApiKey>) -> Config {
        let mut c = Config::defaults();
        c.auth.keys = keys;
        c
    }

    fn key_error(keys: Vec<ApiKey>) -> String {
        with_keys(keys).validate().unwrap_err().to_string()
    }

    #[test]
    fn key_entries_need_exactly_one_valid_key_or_digest() {
        use crate::keys::KeyDigest;
        let good = || ApiKey::with_digest("widget", KeyDigest::of("widget-key-0123456789"));
        with_keys(vec![good(), ApiKey::plain("legacy", "legacy-key-0123456789")])
            .validate()
            .unwrap();

        let mut bad = good();
        bad.digest = Some("sha256:0123".into());
        let err = key_error(vec![good(), ApiKey::plain("legacy", "legacy-key-0123456789"), bad]);
        assert!(err.contains("auth.keys[2].digest"), "{err}");
        assert!(err.contains("64 hex"), "{err}");

        let mut both = good();
        both.key = Some("legacy-key-0123456789".into());
        assert!(key_error(vec![both]).contains("auth.keys[0].key"));
        let mut neither = good();
        neither.digest = None;
        assert!(key_error(vec![good(), neither]).contains("auth.keys[1].digest"));

        let err = key_error(vec![ApiKey::plain("short", "fifteen-chars-x")]);
        assert!(err.contains("auth.keys[0].key") && err.contains("16"), "{err}");
        with_keys(vec![ApiKey::plain("long", "sixteen-chars-xx")])
            .validate()
            .unwrap();

        let err = key_error(vec![ApiKey::with_digest(" ", KeyDigest::of("k"))]);
        assert!(err.contains("auth.keys[0].name"), "{err}");

        let err = key_error(vec![good(), ApiKey::plain("again", "widget-key-0123456789")]);
        assert!(
            err.contains("auth.keys[1].key") && err.contains("auth.keys[0]"),
            "{err}"
        );
    }

    #[test]
    fn plain_keys_never_show_in_debug_output() {
        let c = with_keys(vec![ApiKey::plain("legacy", "legacy-key-0123456789")]);
        let shown = format!("{c:?}");
        assert!(
            shown.contains("legacy") && !shown.contains("legacy-key-0123456789"),
            "{shown}"
        );
    }

    #[test]
    fn allowed_origins_are_bare_origins() {
        for ok in [
            "*",
            "https://chat.example.com",
            "http://localhost:8080",
            "http://127.0.0.1:3000",
            "http://[::1]:8080",
            "https://[2001:db8::1]",
            "chrome-extension://abcdef",
        ] {
            check_origin(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "",
            "chat.example.com",
            "https://",
            "https://chat.example.com/",
            "https://chat.example.com/app",
            "https://chat.example.com?x=1",
            "https://user@chat.example.com",
            "https://chat.example.com:",
            "https://chat.example.com:0",
            "https://chat.example.com:99999",
            "https://*.example.com",
            "http://[::1",
            "null",
            "1http://x",
        ] {
            assert!(check_origin(bad).is_err(), "{bad:?} was accepted");
        }
        let mut c = Config::defaults();
        c.server.allowed_origins = vec!["https://ok.example".into(), "https://bad.example/path".into()];
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("server.allowed_origins[1]"), "{err}");
    }

    #[test]
    fn patches_override_defaults() {
        #[derive(Serialize)]
        struct Patch {
            store: serde_json::Value,
        }
        let c = Config::defaults()
            .merged(Patch {
                store: serde_json::json!({"url": "redis://127.0.0.1:6379"}),
            })
            .unwrap();
        assert_eq!(c.store.url, "redis://127.0.0.1:6379");
        assert_eq!(c.store.key_prefix, "dllm");
    }
}
