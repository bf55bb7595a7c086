//! What an engine is started with: [`EngineSettings`] and the kinds it chooses between.
//!
//! These types belong to the engine so that the engine depends on nothing above it: the
//! configuration (`[model]`, the engine's `[limits]` and the mask placeholder of `[prompt]`)
//! deserializes into these enums and builds the settings at the composition root.

use serde::{Deserialize, Serialize};

/// Which engine implementation serves replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum EngineKind {
    /// By the model file: `cached` for a diffusion model, `autoregressive` for any other.
    Auto,
    /// Our own ggml graph: K/V caches per conversation, batched steps (LLaDA models).
    Cached,
    /// llama.cpp's diffusion path: the whole `[prompt + reply]` is recomputed every step.
    Reference,
    /// An autoregressive model (llama family) through llama.cpp, one token per step, its K/V
    /// cache kept per conversation: the baseline a diffusion reply is compared with.
    Autoregressive,
}

/// Where the cached engine runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum DeviceKind {
    Cpu,
    Gpu,
}

/// What the cached engine's steps inside a block recompute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum CacheMode {
    /// The current block and the rest of the canvas after it.
    Prefix,
    /// Only the current block; the rest of the canvas comes from the cache. The default: it
    /// scores as the prefix cache does on the held-out dialogs, with less work per step.
    #[default]
    Dual,
}

/// How much of a conversation's history a prompt keeps. The context window bounds it in any case;
/// a model trained on short prompts answers long ones worse than the same question with less
/// history, so by default prompts are fitted to the longest prompt it was trained on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "WindowSetting", into = "WindowSetting")]
pub enum HistoryWindow {
    /// The longest prompt the model file records it was trained on
    /// (`dllm.trained_prompt_tokens`); the context window alone for files that record none.
    #[default]
    Trained,
    /// The context window alone.
    Off,
    /// At most this many prompt tokens.
    Tokens(usize),
}

impl HistoryWindow {
    /// The prompt tokens to fit into, given what the model file records; `None`: the context
    /// window alone.
    pub fn tokens(self, trained: Option<usize>) -> Option<usize> {
        match self {
            HistoryWindow::Trained => trained,
            HistoryWindow::Off => None,
            HistoryWindow::Tokens(n) => Some(n),
        }
    }
}

/// `history_window` as written in the configuration: `"trained"`, `"off"` or a token count.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
enum WindowSetting {
    Tokens(usize),
    Word(String),
}

impl TryFrom<WindowSetting> for HistoryWindow {
    type Error = String;

    fn try_from(setting: WindowSetting) -> Result<Self, String> {
        match setting {
            WindowSetting::Tokens(0) => Err("a history window of 0 tokens leaves no room for the message".into()),
            WindowSetting::Tokens(n) => Ok(HistoryWindow::Tokens(n)),
            WindowSetting::Word(w) if w == "trained" => Ok(HistoryWindow::Trained),
            WindowSetting::Word(w) if w == "off" => Ok(HistoryWindow::Off),
            WindowSetting::Word(w) => match w.parse::<usize>() {
                Ok(n) => HistoryWindow::try_from(WindowSetting::Tokens(n)),
                Err(_) => Err(format!("{w:?} is not \"trained\", \"off\" or a number of tokens")),
            },
        }
    }
}

impl From<HistoryWindow> for WindowSetting {
    fn from(window: HistoryWindow) -> Self {
        match window {
            HistoryWindow::Trained => WindowSetting::Word("trained".into()),
            HistoryWindow::Off => WindowSetting::Word("off".into()),
            HistoryWindow::Tokens(n) => WindowSetting::Tokens(n),
        }
    }
}

/// Everything an engine needs besides the model file.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineSettings {
    pub kind: EngineKind,
    /// The cached engine's device; the reference engine runs where llama.cpp was built to.
    pub device: DeviceKind,
    /// Cached engine only.
    pub cache_mode: CacheMode,
    /// Extend an idle conversation cache whose tokens start the new prompt instead of prefilling
    /// everything (cached engine only).
    pub reuse_history: bool,
    /// Tokens per position the cached engine's graph returns (temperature sampling chooses among
    /// them).
    pub top_k: usize,
    /// CPU threads per decode.
    pub threads: usize,
    /// Tokens of context per reply (prompt + canvas); capped at the model's training context.
    pub context_length: usize,
    /// How much history a prompt keeps inside the context.
    pub history_window: HistoryWindow,
    /// Replies denoised at once: batched into one graph evaluation per step (cached) or
    /// interleaved one step each (reference).
    pub max_running: usize,
    /// Replies allowed to wait for a running slot before `submit` fails fast.
    pub max_waiting: usize,
    /// Conversation caches kept, running ones included; idle ones wait for their next turn
    /// (cached engine only).
    pub kept_caches: usize,
    /// Shown in revisions for each masked position.
    pub mask_placeholder: String,
    /// The autoregressive engine sends a revision (the reply so far) every this many tokens.
    pub tokens_per_revision: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_windows_read_as_a_word_or_a_count_and_refuse_the_rest() {
        let read = |text: &str| serde_json::from_str::<HistoryWindow>(text).map_err(|e| e.to_string());
        assert_eq!(read(r#""trained""#), Ok(HistoryWindow::Trained));
        assert_eq!(read(r#""off""#), Ok(HistoryWindow::Off));
        assert_eq!(read("231"), Ok(HistoryWindow::Tokens(231)));
        // Environment variables arrive as text.
        assert_eq!(read(r#""231""#), Ok(HistoryWindow::Tokens(231)));
        assert!(read("0").unwrap_err().contains("0 tokens"));
        assert!(read(r#""sometimes""#).unwrap_err().contains("\"sometimes\" is not"));
        assert_eq!(serde_json::to_string(&HistoryWindow::Tokens(5)).unwrap(), "5");
        assert_eq!(HistoryWindow::Trained.tokens(Some(231)), Some(231));
        assert_eq!(HistoryWindow::Trained.tokens(None), None);
        assert_eq!(HistoryWindow::Off.tokens(Some(231)), None);
    }
}
