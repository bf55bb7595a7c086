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

use crate::engine::Selection;

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
    #[error("system prompt file {path:?} could not be read: {source}")]
    SystemPrompt { path: PathBuf, source: std::io::Error },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub limits: LimitsConfig,
    pub model: ModelConfig,
    pub decode: DecodeConfig,
    pub store: StoreConfig,
    pub chat: ChatConfig,
    pub auth: AuthConfig,
    pub prompt: PromptConfig,
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
    /// Where the built support widget (`widget.js`) and its demo page (`index.html`) are read
    /// from at request time; relative paths start at the working directory.
    pub web_dir: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    pub max_frame_bytes: usize,
    pub hard_frame_bytes: usize,
    pub max_message_chars: usize,
    pub max_running_replies: usize,
    pub max_waiting_replies: usize,
    pub kept_conversation_caches: usize,
    pub messages_per_minute: u32,
    pub message_burst: u32,
    pub max_reply_tokens: usize,
    pub max_steps: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub path: String,
    pub engine: EngineKind,
    pub cache: crate::engine::cached::CacheMode,
    pub reuse_history: bool,
    pub device: DeviceKind,
    pub top_k: usize,
    pub threads: usize,
    pub context_length: usize,
}

/// Which engine implementation serves replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum EngineKind {
    /// Our own ggml graph: K/V caches per conversation, batched steps (LLaDA models).
    Cached,
    /// llama.cpp's diffusion path: the whole `[prompt + reply]` is recomputed every step.
    Reference,
}

/// Where the cached engine runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum DeviceKind {
    Cpu,
    Gpu,
}

/// How many positions each step unmasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyKind {
    Fixed,
    Threshold,
    Factor,
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
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    pub keys: Vec<ApiKey>,
}

/// A client credential. `name` is what sessions record as their owner, so the secret itself is
/// never written to the store.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKey {
    pub name: String,
    pub key: String,
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
        for (i, k) in self.auth.keys.iter().enumerate() {
            if k.name.is_empty() || k.key.len() < 8 {
                return Err(ConfigError::Invalid {
                    setting: "auth.keys",
                    reason: format!("entry {i} needs a non-empty name and a key of at least 8 characters"),
                });
            }
        }
        Ok(())
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
