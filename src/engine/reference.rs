//! The reference engine: llama.cpp's own diffusion path through `llama-cpp-2`.
//!
//! llama.cpp keeps no KV cache for diffusion architectures, so every step decodes the whole
//! `[prompt + canvas]` non-causally and reads the logits of the active positions. This is the
//! baseline every faster engine is measured and checked against.
//!
//! With `prefix_cache`, the same thread runs the *prefix-cache* mode instead: a LLaDA file is
//! rewritten under the `llama` architecture (same weights) and run with non-causal attention and
//! llama.cpp's KV cache. The prompt is decoded once per reply into its own sequence; each step
//! decodes only the canvas, which attends non-causally to the cached prompt and to itself. The
//! cached prompt has not seen the reply, so this is an approximation of the full recompute (the
//! one Fast-dLLM's prefix cache makes); its quality cost is measured by `dllm-chat eval`.
//!
//! One dedicated thread owns the model and its context (llama.cpp contexts are not `Send`).
//! Requests queue on a channel; the thread runs up to `max_running` replies at once,
//! interleaving them one step each in turn, so a long reply does not hold back a short one.

use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Mutex, OnceLock};
use std::time::Instant;

use llama_cpp_2::context::params::{LlamaAttentionType, LlamaContextParams};
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};
use llama_cpp_2::token::LlamaToken;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::canvas::{render, Canvas};
use super::prompt::{self, FittedPrompt};
use super::{
    ChatTurn, Completion, Engine, EngineError, EngineEvent, EngineInfo, GenerateRequest, ReplyStream, Revision,
    StopReason,
};

/// Architectures llama.cpp runs as diffusion models.
const DIFFUSION_ARCHITECTURES: [&str; 4] = ["llada", "llada-moe", "dream", "rnd1"];

/// Settings of the reference engine.
#[derive(Debug, Clone)]
pub struct ReferenceConfig {
    pub model_path: PathBuf,
    /// CPU threads llama.cpp uses per decode.
    pub threads: usize,
    /// Context window (prompt + canvas); capped at the model's training context.
    pub context_length: usize,
    /// Replies denoised at once (interleaved step by step).
    pub max_running: usize,
    /// Replies allowed to wait for a running slot before `submit` fails fast.
    pub max_waiting: usize,
    /// Shown in revisions for each masked position.
    pub mask_placeholder: String,
    /// Decode the prompt once per reply and keep its K/V (see the module docs).
    pub prefix_cache: bool,
}

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

struct Job {
    request: GenerateRequest,
    events: mpsc::UnboundedSender<EngineEvent>,
    cancel: CancellationToken,
    queued_at: Instant,
}

/// Handle to the engine thread. Dropping it lets the thread finish its replies and exit.
pub struct ReferenceEngine {
    jobs: std_mpsc::Sender<Job>,
    info: EngineInfo,
    waiting: Arc<AtomicUsize>,
    max_waiting: usize,
}

impl ReferenceEngine {
    /// Loads the model on a new thread and returns once it is ready (or failed to load).
    /// Blocks: call it from a blocking context.
    pub fn start(config: ReferenceConfig) -> Result<Self, EngineError> {
        let (jobs, job_rx) = std_mpsc::channel();
        let (ready_tx, ready_rx) = std_mpsc::channel();
        let waiting = Arc::new(AtomicUsize::new(0));
        let thread_waiting = waiting.clone();
        let max_waiting = config.max_waiting;
        std::thread::Builder::new()
            .name("reference-engine".into())
            .spawn(move || {
                let loaded = match Loaded::load(&config) {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let worker = match Worker::new(&loaded, &config) {
                    Ok(w) => w,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(loaded.info.clone()));
                worker.run(job_rx, &thread_waiting);
            })
            .map_err(|e| EngineError::Load {
                path: String::new(),
                reason: e.to_string(),
            })?;
        let info = ready_rx.recv().map_err(|_| EngineError::Stopped)??;
        Ok(Self {
            jobs,
            info,
            waiting,
            max_waiting,
        })
    }
}

impl Engine for ReferenceEngine {
    fn submit(&self, request: GenerateRequest) -> Result<ReplyStream, EngineError> {
        let waiting = self.waiting.fetch_add(1, Ordering::AcqRel);
        if waiting >= self.max_waiting {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(EngineError::Overloaded { waiting });
        }
        let (events, rx) = mpsc::unbounded_channel();
        let cancel = CancellationToken::new();
        let job = Job {
            request,
            events,
            cancel: cancel.clone(),
            queued_at: Instant::now(),
        };
        if self.jobs.send(job).is_err() {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(EngineError::Stopped);
        }
        crate::metrics::engine_load(None, Some(waiting + 1));
        Ok(ReplyStream { events: rx, cancel })
    }

    fn info(&self) -> &EngineInfo {
        &self.info
    }
}

/// The model and what is derived from it once.
struct Loaded {
    model: LlamaModel,
    info: EngineInfo,
    template: LlamaChatTemplate,
    mask: i32,
    end_tokens: Vec<i32>,
    /// Bytes of every token, so rendering a revision never calls into llama.cpp.
    pieces: Vec<Vec<u8>>,
    /// Dream predicts position i from row i - 1.
    logit_shift: usize,
}

impl Loaded {
    fn load(config: &ReferenceConfig) -> Result<Self, EngineError> {
        let path = config.model_path.display().to_string();
        let load_err = |reason: String| EngineError::Load {
            path: path.clone(),
            reason,
        };
        if !config.model_path.is_file() {
            return Err(load_err("no such file".into()));
        }
        let backend = backend()?;
        let file = if config.prefix_cache {
            cache_twin(&config.model_path)?
        } else {
            config.model_path.clone()
        };
        let model = LlamaModel::load_from_file(backend, &file, &LlamaModelParams::default())
            .map_err(|e| load_err(e.to_string()))?;
        let mut architecture = model
            .meta_val_str("general.architecture")
            .map_err(|e| load_err(e.to_string()))?;
        if config.prefix_cache {
            architecture = "llada".into();
        } else if !DIFFUSION_ARCHITECTURES.contains(&architecture.as_str()) {
            return Err(EngineError::NotDiffusion(architecture));
        }
        let vocab = model.vocab();
        let mask = vocab.mask().0;
        if mask < 0 {
            return Err(EngineError::NoMaskToken);
        }
        let end_tokens = vocab.tokens().filter(|t| vocab.is_eog(*t)).map(|t| t.0).collect();
        let pieces = vocab.tokens().map(|t| vocab.token_to_piece(t, false, None)).collect();
        let template = model
            .chat_template(None)
            .map_err(|e| EngineError::Template(e.to_string()))?;
        let context_length = config.context_length.min(model.n_ctx_train() as usize);
        let logit_shift = usize::from(architecture == "dream");
        drop(vocab);
        Ok(Self {
            info: EngineInfo {
                engine: if config.prefix_cache {
                    "prefix-cache"
                } else {
                    "reference"
                },
                model_path: path,
                architecture,
                context_length,
            },
            model,
            template,
            mask,
            end_tokens,
            pieces,
            logit_shift,
        })
    }

    fn render_prompt(&self, chat: &[ChatTurn]) -> Result<Vec<i32>, EngineError> {
        chat_tokens(&self.model, &self.template, chat)
    }
}

/// The `llama`-architecture copy of a LLaDA file, written once next to the system's temp files
/// and reused while the source is unchanged (keyed by path, size and modification time).
fn cache_twin(path: &std::path::Path) -> Result<PathBuf, EngineError> {
    let fail = |reason: String| EngineError::Load {
        path: path.display().to_string(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| fail(e.to_string()))?;
    let modified = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    let mut hasher = std::hash::DefaultHasher::new();
    std::hash::Hash::hash(&(path, meta.len(), modified), &mut hasher);
    let dir = std::env::temp_dir().join("dllm-chat");
    let twin = dir.join(format!("llama-twin-{:016x}.gguf", std::hash::Hasher::finish(&hasher)));
    if twin.is_file() {
        return Ok(twin);
    }
    std::fs::create_dir_all(&dir).map_err(|e| fail(e.to_string()))?;
    let tmp = dir.join(format!(".twin-{}.gguf", uuid::Uuid::new_v4().simple()));
    ggml_ext::retarget(path, &tmp, "llada", "llama").map_err(|e| match e {
        ggml_ext::RetargetError::Architecture { found, .. } => EngineError::NotDiffusion(format!(
            "{found} (the prefix-cache engine runs llada models; use --engine reference for others)"
        )),
        other => fail(other.to_string()),
    })?;
    std::fs::rename(&tmp, &twin).map_err(|e| fail(e.to_string()))?;
    Ok(twin)
}

/// Renders `chat` with the model's chat template (ending with the assistant's turn opening) and
/// tokenizes it, control tokens included.
pub(crate) fn chat_tokens(
    model: &LlamaModel,
    template: &LlamaChatTemplate,
    chat: &[ChatTurn],
) -> Result<Vec<i32>, EngineError> {
    let messages = chat
        .iter()
        .map(|t| LlamaChatMessage::new(t.role.clone(), t.content.clone()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| EngineError::Template(e.to_string()))?;
    let text = model
        .apply_chat_template(template, &messages, true)
        .map_err(|e| EngineError::Template(e.to_string()))?;
    Ok(model
        .vocab()
        .tokenize(text.as_bytes(), false, true)
        .into_iter()
        .map(|t| t.0)
        .collect())
}

/// A reply in progress.
struct Active {
    job: Job,
    /// KV-cache sequence of this reply (prefix-cache mode).
    seq: i32,
    prompt: Vec<i32>,
    canvas: Canvas,
}

struct Worker<'m> {
    loaded: &'m Loaded,
    ctx: LlamaContext<'m>,
    batch: LlamaBatch<'static>,
    max_running: usize,
    placeholder: String,
    prefix_cache: bool,
    /// KV-cache sequences not held by a running reply.
    free_seqs: Vec<i32>,
}

impl<'m> Worker<'m> {
    fn new(loaded: &'m Loaded, config: &ReferenceConfig) -> Result<Self, EngineError> {
        let n_ctx = loaded.info.context_length as u32;
        let threads = config.threads.max(1) as i32;
        let max_running = config.max_running.max(1);
        // Non-causal attention needs the whole sequence in one micro-batch.
        let mut params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(n_ctx))
            .with_n_batch(n_ctx)
            .with_n_ubatch(n_ctx)
            .with_n_threads(threads)
            .with_n_threads_batch(threads);
        if config.prefix_cache {
            // One KV sequence of `n_ctx` cells per running reply.
            params = params
                .with_n_ctx(NonZeroU32::new(n_ctx * max_running as u32))
                .with_n_seq_max(max_running as u32)
                .with_attention_type(LlamaAttentionType::NonCausal);
        }
        let ctx = loaded
            .model
            .new_context(backend()?, params)
            .map_err(|e| EngineError::Load {
                path: loaded.info.model_path.clone(),
                reason: e.to_string(),
            })?;
        Ok(Self {
            loaded,
            ctx,
            batch: LlamaBatch::new(n_ctx as usize, 1),
            max_running,
            placeholder: config.mask_placeholder.clone(),
            prefix_cache: config.prefix_cache,
            free_seqs: (0..max_running as i32).rev().collect(),
        })
    }

    fn run(mut self, jobs: std_mpsc::Receiver<Job>, waiting: &AtomicUsize) {
        let mut queue: VecDeque<Job> = VecDeque::new();
        let mut active: Vec<Active> = Vec::new();
        let mut open = true;
        loop {
            if active.is_empty() && queue.is_empty() {
                if !open {
                    return;
                }
                match jobs.recv() {
                    Ok(job) => queue.push_back(job),
                    Err(_) => return,
                }
            }
            loop {
                match jobs.try_recv() {
                    Ok(job) => queue.push_back(job),
                    Err(std_mpsc::TryRecvError::Empty) => break,
                    Err(std_mpsc::TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            }
            while active.len() < self.max_running {
                let Some(job) = queue.pop_front() else { break };
                waiting.fetch_sub(1, Ordering::AcqRel);
                if let Some(a) = self.admit(job) {
                    active.push(a);
                }
            }
            crate::metrics::engine_load(Some(active.len()), Some(waiting.load(Ordering::Relaxed)));
            self.step_round(&mut active);
        }
    }

    /// Fits the prompt (and, with the prefix cache, decodes it into a free sequence) and announces
    /// the reply; `None` when it failed or was already cancelled.
    fn admit(&mut self, job: Job) -> Option<Active> {
        let queue_wait = job.queued_at.elapsed();
        let options = &job.request.options;
        let context = self.loaded.info.context_length;
        let fitted = context
            .checked_sub(options.max_tokens)
            .ok_or(EngineError::ContextOverflow {
                needed: options.max_tokens,
                limit: context,
            })
            .and_then(|budget| {
                prompt::fit(&job.request.system, &job.request.turns, budget, |chat| {
                    self.loaded.render_prompt(chat)
                })
            });
        let FittedPrompt { tokens, dropped_turns } = match fitted {
            Ok(f) => f,
            Err(e) => {
                let _ = job.events.send(EngineEvent::Failed(e));
                return None;
            }
        };
        let seq = if self.prefix_cache {
            self.free_seqs.pop().expect("a free sequence per running reply")
        } else {
            0
        };
        if self.prefix_cache {
            if let Err(e) = self.prefill(seq, &tokens) {
                self.release(seq);
                let _ = job.events.send(EngineEvent::Failed(e));
                return None;
            }
        }
        let started = EngineEvent::Started {
            prompt_tokens: tokens.len(),
            dropped_turns,
            queue_wait,
        };
        if job.events.send(started).is_err() {
            self.release(seq);
            return None;
        }
        let canvas = Canvas::new(options, self.loaded.mask, self.loaded.end_tokens.clone());
        Some(Active {
            job,
            seq,
            prompt: tokens,
            canvas,
        })
    }

    /// One step of every running reply. With the prefix cache, the canvases of several replies
    /// go into one decode (each in its own sequence), so they share each read of the weights;
    /// the full recompute decodes one reply at a time.
    fn step_round(&mut self, replies: &mut Vec<Active>) {
        // Cancelled replies end before anything is decoded for them.
        replies.retain_mut(|a| {
            let stop = a.job.cancel.is_cancelled() || a.job.events.is_closed();
            if stop {
                self.finish(a, StopReason::Cancelled);
                self.release(a.seq);
            }
            !stop
        });
        let capacity = self.loaded.info.context_length;
        let mut keep = vec![true; replies.len()];
        let mut start = 0;
        while start < replies.len() {
            self.batch.clear();
            let mut planned: Vec<(usize, usize, Vec<usize>)> = Vec::new();
            let mut end = start;
            while end < replies.len() && (planned.is_empty() || self.prefix_cache) {
                let a = &replies[end];
                let needed = a.canvas.tokens().len() + if self.prefix_cache { 0 } else { a.prompt.len() };
                if !planned.is_empty() && self.batch.n_tokens() as usize + needed > capacity {
                    break;
                }
                let active = a.canvas.active_positions();
                let first_row = self.add_to_batch(a, &active);
                planned.push((end, first_row, active));
                end += 1;
            }
            let decoded = self
                .ctx
                .decode(&mut self.batch)
                .map_err(|e| EngineError::Decode(e.to_string()));
            for (i, first_row, active) in planned {
                let a = &mut replies[i];
                keep[i] = match &decoded {
                    Ok(()) => self.apply(a, &active, first_row),
                    Err(e) => {
                        let _ = a.job.events.send(EngineEvent::Failed(e.clone()));
                        false
                    }
                };
                if !keep[i] {
                    self.release(a.seq);
                }
            }
            start = end;
        }
        let mut flags = keep.into_iter();
        replies.retain(|_| flags.next().unwrap_or(false));
    }

    /// Takes the decoded logits of `a`'s active positions into its canvas and reports the
    /// revision; returns whether the reply continues.
    fn apply(&mut self, a: &mut Active, active: &[usize], first_row: usize) -> bool {
        let rows: Vec<&[f32]> = active
            .iter()
            .map(|p| self.ctx.get_logits_ith((first_row + p) as i32))
            .collect();
        let unmasked = a.canvas.step(active, &rows);
        let revision = Revision {
            step: a.canvas.steps(),
            text: self.render(&a.canvas, &self.placeholder),
            masked: a.canvas.masked(),
            unmasked,
        };
        if a.job.events.send(EngineEvent::Revision(revision)).is_err() {
            return false;
        }
        if a.canvas.is_complete() {
            self.finish(a, StopReason::Completed);
            return false;
        }
        true
    }

    fn finish(&self, a: &Active, reason: StopReason) {
        let completion = Completion {
            reason,
            text: self.render(&a.canvas, ""),
            completion_tokens: a.canvas.reply_len(),
            steps: a.canvas.steps(),
        };
        let _ = a.job.events.send(EngineEvent::Finished(completion));
    }

    fn render(&self, canvas: &Canvas, placeholder: &str) -> String {
        render(
            canvas.tokens(),
            canvas.reply_len(),
            self.loaded.mask,
            &self.loaded.pieces,
            placeholder,
        )
    }

    /// Returns a reply's KV sequence, emptied, to the free list (prefix-cache mode).
    fn release(&mut self, seq: i32) {
        if self.prefix_cache {
            let _ = self.ctx.clear_kv_cache_seq(Some(seq as u32), None, None);
            self.free_seqs.push(seq);
        }
    }

    /// Decodes the prompt into `seq`'s cache (prefix-cache mode).
    fn prefill(&mut self, seq: i32, prompt: &[i32]) -> Result<(), EngineError> {
        let _ = self.ctx.clear_kv_cache_seq(Some(seq as u32), None, None);
        self.batch.clear();
        for (i, &t) in prompt.iter().enumerate() {
            self.batch
                .add(LlamaToken(t), i as i32, &[seq], i + 1 == prompt.len())
                .map_err(|e| EngineError::Decode(e.to_string()))?;
        }
        self.ctx
            .decode(&mut self.batch)
            .map_err(|e| EngineError::Decode(e.to_string()))
    }

    /// Adds what one step of `a` needs to the batch, asking for the logits of the `active` canvas
    /// positions. Returns the batch row of canvas position 0, so position `p`'s logits are row
    /// `first + p`. The batch was sized for the context window, and callers check that it fits.
    ///
    /// Full recompute: `[prompt + canvas]`. Prefix cache: the canvas alone, after dropping the
    /// previous step's canvas cells so only the prompt stays cached.
    fn add_to_batch(&mut self, a: &Active, active: &[usize]) -> usize {
        let prompt_len = a.prompt.len();
        let offset = self.batch.n_tokens() as usize;
        let add = |batch: &mut LlamaBatch, t: i32, pos: usize, seq: i32, logits: bool| {
            batch
                .add(LlamaToken(t), pos as i32, &[seq], logits)
                .expect("the batch holds a context window");
        };
        if self.prefix_cache {
            let _ = self
                .ctx
                .clear_kv_cache_seq(Some(a.seq as u32), Some(prompt_len as u32), None);
            for (p, &t) in a.canvas.tokens().iter().enumerate() {
                add(&mut self.batch, t, prompt_len + p, a.seq, active.contains(&p));
            }
            offset
        } else {
            let shift = self.loaded.logit_shift;
            let wanted = |i: usize| i + shift >= prompt_len && active.contains(&(i + shift - prompt_len));
            for (i, &t) in a.prompt.iter().chain(a.canvas.tokens()).enumerate() {
                add(&mut self.batch, t, i, a.seq, wanted(i));
            }
            offset + prompt_len - shift
        }
    }
}
