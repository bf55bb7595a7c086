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
#[serde(try_from = "CountOrWord", into = "CountOrWord")]
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

/// How far past the current block a cached-engine reply's canvas is computed. A block's first
/// step computes the canvas up to this many cells past the block's end and the block's steps
/// attend to those alone; the masks further out join at a later block's first step. The masks
/// past a short reply's end cost a third of its first step, and a model trained on replies of up
/// to 64 cells answers worse on a canvas of 128 masks than on the part it knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "CountOrWord", into = "CountOrWord")]
pub enum Lookahead {
    /// The rest of the canvas, however long.
    All,
    /// At most this many cells past the current block.
    Cells(usize),
}

impl Lookahead {
    /// Where the computed part of a canvas of `canvas` cells ends while the block ending at
    /// `block_end` is denoised.
    pub fn end(self, block_end: usize, canvas: usize) -> usize {
        match self {
            Lookahead::All => canvas,
            Lookahead::Cells(n) => block_end.saturating_add(n).min(canvas),
        }
    }
}

/// A setting written as a count or a word: `history_window` (`"trained"`, `"off"` or tokens) and
/// `lookahead` (`"all"` or cells). Environment variables arrive as text, so a word may hold a count.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
enum CountOrWord {
    Count(usize),
    Word(String),
}

impl CountOrWord {
    /// The count, or the word when it is not a number.
    fn parsed(self) -> Result<usize, String> {
        match self {
            CountOrWord::Count(n) => Ok(n),
            CountOrWord::Word(w) => w.parse::<usize>().map_err(|_| w),
        }
    }
}

impl TryFrom<CountOrWord> for HistoryWindow {
    type Error = String;

    fn try_from(setting: CountOrWord) -> Result<Self, String> {
        match setting.parsed() {
            Ok(0) => Err("a history window of 0 tokens leaves no room for the message".into()),
            Ok(n) => Ok(HistoryWindow::Tokens(n)),
            Err(w) if w == "trained" => Ok(HistoryWindow::Trained),
            Err(w) if w == "off" => Ok(HistoryWindow::Off),
            Err(w) => Err(format!("{w:?} is not \"trained\", \"off\" or a number of tokens")),
        }
    }
}

impl From<HistoryWindow> for CountOrWord {
    fn from(window: HistoryWindow) -> Self {
        match window {
            HistoryWindow::Trained => CountOrWord::Word("trained".into()),
            HistoryWindow::Off => CountOrWord::Word("off".into()),
            HistoryWindow::Tokens(n) => CountOrWord::Count(n),
        }
    }
}

impl TryFrom<CountOrWord> for Lookahead {
    type Error = String;

    fn try_from(setting: CountOrWord) -> Result<Self, String> {
        match setting.parsed() {
            Ok(n) => Ok(Lookahead::Cells(n)),
            Err(w) if w == "all" => Ok(Lookahead::All),
            Err(w) => Err(format!("{w:?} is not \"all\" or a number of cells")),
        }
    }
}

impl From<Lookahead> for CountOrWord {
    fn from(lookahead: Lookahead) -> Self {
        match lookahead {
            Lookahead::All => CountOrWord::Word("all".into()),
            Lookahead::Cells(n) => CountOrWord::Count(n),
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
    /// How far past the current block the canvas is computed (cached engine only).
    pub lookahead: Lookahead,
    /// Start a prompt from the longest start of it a conversation cache holds instead of
    /// prefilling everything: the conversation's history from its previous turn, or a shared
    /// system prompt copied from another conversation's cache (cached engine only).
    pub reuse_history: bool,
    /// Prefill the system prompt as a chunk of its own, which every conversation with that system
    /// prompt then shares (cached engine only).
    pub share_system_prompt: bool,
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
    /// Running replies stepped in one evaluation (0: all); replies arriving meanwhile wait for
    /// one such pass, not for a step of every running reply (diffusion engines).
    pub per_evaluation: usize,
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

    #[test]
    fn lookaheads_read_as_all_or_a_count_and_end_inside_the_canvas() {
        let read = |text: &str| serde_json::from_str::<Lookahead>(text).map_err(|e| e.to_string());
        assert_eq!(read(r#""all""#), Ok(Lookahead::All));
        assert_eq!(read("0"), Ok(Lookahead::Cells(0)));
        assert_eq!(read(r#""16""#), Ok(Lookahead::Cells(16)));
        assert!(read(r#""half""#).unwrap_err().contains("\"half\" is not \"all\""));
        assert!(read("-1").is_err());
        assert_eq!(serde_json::to_string(&Lookahead::All).unwrap(), r#""all""#);
        assert_eq!(Lookahead::Cells(16).end(32, 128), 48);
        assert_eq!(Lookahead::Cells(16).end(64, 64), 64);
        assert_eq!(Lookahead::Cells(0).end(32, 64), 32);
        assert_eq!(Lookahead::All.end(32, 128), 128);
    }
}
