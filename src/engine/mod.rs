//! The engine behind a trait: the service hands it a conversation and decode options and gets
//! back a stream of whole-reply revisions.
//!
//! Engines own their native (llama.cpp / ggml) state on dedicated threads. A request travels on a
//! channel to the engine's prompt thread, which turns the conversation into fitted prompt tokens,
//! and on to the engine thread; each reply gets its own event channel back. Dropping the
//! [`ReplyStream`] or cancelling its token stops the reply at the next step.
//!
//! - [`policy`]: which positions to unmask each step (fixed, threshold, factor).
//! - [`canvas`]: the reply canvas, sampling and rendering, shared by all engines.
//! - [`cached`]: our own ggml graph with per-conversation K/V caches and batched steps.
//! - [`reference`]: llama.cpp's own diffusion path, recomputing `[prompt + canvas]` every step.
//! - [`autoregressive`]: an autoregressive model through llama.cpp, one token per step, the
//!   baseline diffusion is measured against.
//! - [`prompt`]: history truncation to the context window and the turn boundaries of a prompt.
//! - [`vocab`]: what engines read through llama.cpp: vocabulary, chat template, architecture.
//! - [`jobs`]: the queue between the service and an engine thread, with the prompt thread in
//!   front of it.
//! - [`scheduler`]: the loop every engine thread runs over that queue; engines differ only in
//!   how they admit a reply and compute a step.
//! - [`settings`]: what an engine is started with; the configuration builds it.

pub mod autoregressive;
pub mod cached;
pub mod canvas;
pub(crate) mod jobs;
pub mod policy;
pub mod prompt;
pub mod reference;
pub mod repeats;
pub(crate) mod scheduler;
pub mod settings;
pub mod vocab;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use policy::{PolicyKind, Schedule, Selection};
pub use settings::{CacheMode, DeviceKind, EngineKind, EngineSettings, HistoryWindow, Lookahead};

/// One message of the conversation as the engine sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatTurn {
    pub role: String,
    pub content: String,
}

/// Validated decode options for one reply.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodeOptions {
    /// Canvas length: the most tokens the reply can have.
    pub max_tokens: usize,
    /// Total denoising steps budget of the fixed schedule (spread over the blocks).
    pub steps: usize,
    /// Positions per block; blocks are decoded left to right.
    pub block_length: usize,
    pub schedule: Schedule,
    pub selection: Selection,
    /// A position that would say a piece twice in a row waits a step (see
    /// [`repeats`]).
    pub defer_repeats: bool,
    /// 0 is greedy.
    pub temperature: f32,
    pub seed: u64,
    /// Decide every canvas position and take every step of the budget, as llama.cpp's diffusion
    /// example does: no early stop at the reply's end, and an end token may be committed at any
    /// position. The reply is still cut at the first end token. Only the bench's baseline (a)
    /// sets it; the protocol has no such option.
    pub fill_canvas: bool,
}

/// A reply to generate.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// System prompt, kept when history is truncated.
    pub system: String,
    /// The conversation, oldest first, ending with the user's new message.
    pub turns: Vec<ChatTurn>,
    pub options: DecodeOptions,
}

/// What an engine reports about a reply, in order: `Started`, `Revision`s, then `Finished` or
/// `Failed`.
#[derive(Debug, Clone)]
pub enum EngineEvent {
    Started {
        prompt_tokens: usize,
        /// Of those, tokens whose K/V came from the conversation's cache (not recomputed).
        cached_tokens: usize,
        /// Oldest turns left out to fit the context window.
        dropped_turns: usize,
        /// Waiting for the prompt thread and a running slot (not preparing the prompt itself).
        queue_wait: Duration,
    },
    Revision(Revision),
    Finished(Completion),
    Failed(EngineError),
}

/// The whole reply after one denoising step.
#[derive(Debug, Clone, PartialEq)]
pub struct Revision {
    pub step: usize,
    /// The reply so far, masked positions shown as the placeholder.
    pub text: String,
    /// Masked positions left in the reply.
    pub masked: usize,
    /// Positions unmasked by this step.
    pub unmasked: usize,
}

/// Why a reply stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    Completed,
    Cancelled,
}

/// A finished (or cancelled) reply.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub reason: StopReason,
    /// The final text; for a cancelled reply, the unmasked tokens so far.
    pub text: String,
    pub completion_tokens: usize,
    pub steps: usize,
    pub phases: Phases,
}

/// Where a reply's time went inside the engine. From submission to the end, the phases add up:
/// `queue + prompt + prefill + denoise + revision + between_steps`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Phases {
    /// Waiting for the prompt thread and then for a running slot.
    pub queue: Duration,
    /// Rendering the chat template, tokenizing and fitting the history (the prompt thread).
    pub prompt: Duration,
    /// Computing the prompt's K/V into the conversation cache (what it did not hold already).
    pub prefill: Duration,
    /// The reply's denoising steps, from the start of each step to the moment its result was
    /// ready; with several replies in one batch, each waits for the whole batch.
    pub denoise: Duration,
    /// Of `denoise`, the time in the model's evaluation (the rest is host work: planning the
    /// step, choosing what to unmask, waiting for other replies' evaluations).
    pub compute: Duration,
    /// Building revisions: detokenizing the canvas and handing the event over.
    pub revision: Duration,
    /// The arithmetic of the reply's own part of its steps' evaluations, in floating-point
    /// operations ([`ggml_ext::runtime::Arithmetic`]); over `compute`, the rate its steps reached.
    pub step_flops: f64,
    /// Inside the engine but in none of the above: other replies' prefills and the scheduler's
    /// bookkeeping between steps.
    pub between_steps: Duration,
}

/// Errors from engines, grouped by what the caller can do about them: start-up failures (the
/// model file), a request that cannot succeed as given, capacity (the same request may succeed
/// later) and runtime failures.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    // Start-up.
    #[error("model file {path:?} could not be loaded: {reason}")]
    Load { path: String, reason: String },
    #[error("the model is not a diffusion model (architecture {0:?}); use a LLaDA or Dream GGUF")]
    NotDiffusion(String),
    #[error("the model has no mask token (tokenizer.ggml.mask_token_id)")]
    NoMaskToken,
    #[error("the model is a diffusion model (architecture {0:?}); use the cached or reference engine")]
    Diffusion(String),
    // The request.
    #[error("the prompt needs {needed} tokens with the reply but the context holds {limit}")]
    ContextOverflow { needed: usize, limit: usize },
    /// Capacity: the engine has no room for the reply now; the client may retry.
    #[error(transparent)]
    Overloaded(Capacity),
    // Runtime failures.
    #[error("the chat template could not be applied: {0}")]
    Template(String),
    #[error("llama.cpp failed to decode: {0}")]
    Decode(String),
    #[error("the engine has stopped")]
    Stopped,
}

/// What an engine ran out of.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Capacity {
    /// The wait queue is full (`submit` fails fast).
    #[error("{waiting} replies are already waiting; try again later")]
    Queue { waiting: usize },
    /// Every conversation cache holds a running reply.
    #[error("all {caches} conversation caches are in use; try again later")]
    Caches { caches: usize },
}

/// The receiving end of one reply.
pub struct ReplyStream {
    pub events: mpsc::UnboundedReceiver<EngineEvent>,
    /// Cancels the reply; the engine answers with `Finished` and [`StopReason::Cancelled`].
    pub cancel: CancellationToken,
}

/// A reply run to its end by [`complete`].
#[derive(Debug, Clone)]
pub struct Outcome {
    pub completion: Completion,
    pub prompt_tokens: usize,
    /// From submission to the first revision (zero when none came).
    pub first_revision: Duration,
    /// From submission to the end.
    pub total: Duration,
}

/// Submits `request` and waits for its end, for tools that need the result rather than the
/// stream (the eval and bench tools).
pub async fn complete(engine: &dyn Engine, request: GenerateRequest) -> Result<Outcome, EngineError> {
    let started = std::time::Instant::now();
    let mut stream = engine.submit(request)?;
    let mut first_revision = None;
    let mut prompt_tokens = 0;
    loop {
        match stream.events.recv().await {
            Some(EngineEvent::Started { prompt_tokens: p, .. }) => prompt_tokens = p,
            Some(EngineEvent::Revision(_)) => {
                first_revision.get_or_insert_with(|| started.elapsed());
            }
            Some(EngineEvent::Finished(completion)) => {
                return Ok(Outcome {
                    completion,
                    prompt_tokens,
                    first_revision: first_revision.unwrap_or_default(),
                    total: started.elapsed(),
                })
            }
            Some(EngineEvent::Failed(e)) => return Err(e),
            None => return Err(EngineError::Stopped),
        }
    }
}

/// Facts about the loaded model.
#[derive(Debug, Clone)]
pub struct EngineInfo {
    /// Which engine implementation runs.
    pub engine: &'static str,
    pub model_path: String,
    pub architecture: String,
    /// Tokens of context each reply may use (prompt + canvas).
    pub context_length: usize,
    /// The most prompt tokens a reply's history is fitted into, when less than the context
    /// (`model.history_window`); set once the vocabulary is loaded.
    pub history_window: Option<usize>,
}

/// A diffusion engine.
pub trait Engine: Send + Sync {
    /// Queues a reply. Fails fast with [`Capacity::Queue`] when the wait queue is full.
    fn submit(&self, request: GenerateRequest) -> Result<ReplyStream, EngineError>;
    fn info(&self) -> &EngineInfo;
}

/// Starts the engine `settings.kind` selects, loading the model on its own thread. Blocks until
/// the model is loaded: call it from a blocking context.
pub fn start(settings: &EngineSettings, model_path: PathBuf) -> Result<Arc<dyn Engine>, EngineError> {
    let kind = match settings.kind {
        EngineKind::Auto if vocab::is_diffusion(&vocab::architecture(&model_path)?) => EngineKind::Cached,
        EngineKind::Auto => EngineKind::Autoregressive,
        kind => kind,
    };
    Ok(match kind {
        EngineKind::Auto | EngineKind::Cached => Arc::new(cached::start(settings, model_path)?),
        EngineKind::Reference => Arc::new(reference::start(settings, model_path)?),
        EngineKind::Autoregressive => Arc::new(autoregressive::start(settings, model_path)?),
    })
}
