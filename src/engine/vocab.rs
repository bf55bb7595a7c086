//! What every engine reads from a GGUF through llama.cpp besides the weights: the architecture,
//! the vocabulary (mask and end tokens, each token's bytes for rendering revisions) and the chat
//! template that turns a conversation into prompt tokens.

use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};

use super::prompt::Renderer;
use super::{ChatTurn, EngineError};

/// Architectures llama.cpp runs as diffusion models.
pub const DIFFUSION_ARCHITECTURES: [&str; 4] = ["llada", "llada-moe", "dream", "rnd1"];

/// llama.cpp's backend may be initialised once per process; engines may start concurrently.
pub fn backend() -> Result<&'static LlamaBackend, EngineError> {
    static BACKEND: OnceLock<LlamaBackend> = OnceLock::new();
    static INIT: Mutex<()> = Mutex::new(());
    let _guard = INIT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(b) = BACKEND.get() {
        return Ok(b);
    }
    llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
    let b = LlamaBackend::init().map_err(|e| EngineError::Load {
        path: String::new(),
        reason: e.to_string(),
    })?;
    Ok(BACKEND.get_or_init(|| b))
}

/// Which kind of model an engine needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// A diffusion model with a mask token.
    Diffusion,
    /// Any other architecture llama.cpp runs (it predicts the next token).
    Autoregressive,
}

/// The `general.architecture` of the GGUF at `path` (a vocabulary-only load).
pub fn architecture(path: &Path) -> Result<String, EngineError> {
    Ok(load_llama(path, true)?.1)
}

/// `path` through llama.cpp (only its vocabulary and metadata with `vocab_only`), and its
/// `general.architecture`.
fn load_llama(path: &Path, vocab_only: bool) -> Result<(LlamaModel, String), EngineError> {
    let load_err = |reason: String| EngineError::Load {
        path: path.display().to_string(),
        reason,
    };
    if !path.is_file() {
        return Err(load_err("no such file".into()));
    }
    let params = LlamaModelParams::default().with_vocab_only(vocab_only);
    let model = LlamaModel::load_from_file(backend()?, path, &params).map_err(|e| load_err(e.to_string()))?;
    let architecture = model
        .meta_val_str("general.architecture")
        .map_err(|e| load_err(e.to_string()))?;
    Ok((model, architecture))
}

/// Whether llama.cpp runs `architecture` as a diffusion model.
pub fn is_diffusion(architecture: &str) -> bool {
    DIFFUSION_ARCHITECTURES.contains(&architecture)
}

/// A model as llama.cpp loaded it, with what is derived from it once.
pub struct ChatModel {
    pub model: LlamaModel,
    pub architecture: String,
    pub template: LlamaChatTemplate,
    /// The mask token of a diffusion model; -1 (no token) for an autoregressive one.
    pub mask: i32,
    /// End-of-text and end-of-turn tokens: the first one unmasked ends the reply.
    pub end_tokens: Vec<i32>,
    /// Bytes of every token, so rendering a revision never calls into llama.cpp.
    pub pieces: Arc<[Vec<u8>]>,
    /// The model's training context (0 for a vocabulary-only load).
    pub n_ctx_train: usize,
    /// The longest prompt the model was trained on, where the file records it.
    pub trained_prompt_tokens: Option<usize>,
    /// Row `i` of the logits predicts position `i + logit_shift`: as `diffusion.shift_logits`
    /// says where the file carries it, else by the architecture (Dream shifts, LLaDA does not).
    pub logit_shift: usize,
}

impl ChatModel {
    /// Loads `path`; with `vocab_only`, only the vocabulary and metadata (another runtime holds the
    /// weights). Refuses files of the other `family`, and diffusion models without a mask token.
    pub fn load(path: &Path, vocab_only: bool, family: Family) -> Result<Self, EngineError> {
        let (model, architecture) = load_llama(path, vocab_only)?;
        let vocab = model.vocab();
        let mask = match (family, is_diffusion(&architecture)) {
            (Family::Diffusion, false) => return Err(EngineError::NotDiffusion(architecture)),
            (Family::Autoregressive, true) => return Err(EngineError::Diffusion(architecture)),
            (Family::Diffusion, true) if vocab.mask().0 < 0 => return Err(EngineError::NoMaskToken),
            (Family::Diffusion, true) => vocab.mask().0,
            (Family::Autoregressive, false) => -1,
        };
        let end_tokens = vocab.tokens().filter(|t| vocab.is_eog(*t)).map(|t| t.0).collect();
        let pieces: Arc<[Vec<u8>]> = vocab.tokens().map(|t| vocab.token_to_piece(t, false, None)).collect();
        let template = model
            .chat_template(None)
            .map_err(|e| EngineError::Template(e.to_string()))?;
        let n_ctx_train = model.n_ctx_train() as usize;
        let trained_prompt_tokens = model
            .meta_val_str(ggml_ext::TRAINED_PROMPT_KEY)
            .ok()
            .and_then(|v| v.parse().ok());
        let logit_shift = match model.meta_val_str(ggml_ext::SHIFT_LOGITS_KEY).as_deref() {
            Ok("true") => 1,
            Ok("false") => 0,
            _ => usize::from(architecture == "dream"),
        };
        Ok(Self {
            model,
            architecture,
            template,
            mask,
            end_tokens,
            pieces,
            n_ctx_train,
            trained_prompt_tokens,
            logit_shift,
        })
    }

    /// The text of `tokens[..reply_len]`, each masked position shown as `placeholder`.
    pub fn render(&self, tokens: &[i32], reply_len: usize, placeholder: &str) -> String {
        super::canvas::render(tokens, reply_len, self.mask, &self.pieces, placeholder)
    }
}

/// Prompts are rendered and tokenized off the engine thread, on its prompt thread: llama.cpp's
/// chat templating is a pure function and its tokenizer only reads the vocabulary, which is
/// immutable once loaded (`LlamaModel` is `Send + Sync`).
impl Renderer for ChatModel {
    fn apply_template(&self, chat: &[ChatTurn], open_reply: bool) -> Result<String, EngineError> {
        render_chat(&self.model, &self.template, chat, open_reply)
    }

    fn tokenize(&self, text: &str) -> Vec<i32> {
        tokenize(&self.model, text)
    }
}

/// Renders `chat` with `template` and tokenizes it, control tokens included: the prompt of a reply.
pub fn chat_tokens(
    model: &LlamaModel,
    template: &LlamaChatTemplate,
    chat: &[ChatTurn],
) -> Result<Vec<i32>, EngineError> {
    Ok(tokenize(model, &render_chat(model, template, chat, true)?))
}

/// `chat` through `template`; with `open_reply`, ending with the opening of the assistant's turn.
fn render_chat(
    model: &LlamaModel,
    template: &LlamaChatTemplate,
    chat: &[ChatTurn],
    open_reply: bool,
) -> Result<String, EngineError> {
    let messages = chat
        .iter()
        .map(|t| LlamaChatMessage::new(t.role.clone(), t.content.clone()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| EngineError::Template(e.to_string()))?;
    model
        .apply_chat_template(template, &messages, open_reply)
        .map_err(|e| EngineError::Template(e.to_string()))
}

/// `text` as tokens, control tokens included, no BOS added (templates write their own).
fn tokenize(model: &LlamaModel, text: &str) -> Vec<i32> {
    model
        .vocab()
        .tokenize(text.as_bytes(), false, true)
        .into_iter()
        .map(|t| t.0)
        .collect()
}
