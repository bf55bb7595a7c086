//! The reference engine: llama.cpp's own diffusion path through `llama-cpp-2`.
//!
//! llama.cpp keeps no KV cache for diffusion architectures, so every step decodes the whole
//! `[prompt + canvas]` non-causally and reads the logits of the active positions. This is the
//! baseline every faster engine is measured and checked against.
//!
//! One dedicated thread owns the model and its context (the context borrows the model, and a
//! decode blocks for a whole step). Requests queue on a channel; the thread runs up to
//! `max_running` replies at once through the engine's scheduler, interleaving them one step each
//! in turn, so a long reply does not hold back a short one.

use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use ggml_ext::runtime::Arithmetic;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::token::LlamaToken;

use super::jobs::{self, Job, Loaded};
use super::prompt::Chunking;
use super::scheduler::{self, Backend, Running, Step, Stepped};
use super::settings::EngineSettings;
use super::vocab::{backend, ChatModel, Family};
use super::{Engine, EngineError, EngineInfo};

/// Loads the model on a new thread and returns the engine once it is ready (or failed to load).
/// Dropping the engine lets the thread finish its replies and exit. Blocks: call it from a blocking
/// context.
pub fn start(settings: &EngineSettings, model_path: PathBuf) -> Result<impl Engine, EngineError> {
    let settings = settings.clone();
    jobs::spawn(
        "reference-engine",
        settings.max_waiting,
        settings.history_window,
        move |intake, ready| {
            let loaded = match ChatModel::load(&model_path, false, Family::Diffusion) {
                Ok(l) => Arc::new(l),
                Err(e) => return ready(Err(e)),
            };
            match Worker::new(&loaded, &settings, &model_path) {
                Ok(worker) => {
                    ready(Ok(Loaded {
                        info: worker.info.clone(),
                        chat: loaded.clone(),
                        chunking: Chunking::None,
                    }));
                    scheduler::run(
                        worker,
                        intake,
                        &loaded,
                        &settings.mask_placeholder,
                        settings.max_running,
                        settings.per_evaluation,
                    );
                }
                Err(e) => ready(Err(e)),
            };
        },
    )
}

struct Worker<'m> {
    loaded: &'m ChatModel,
    info: EngineInfo,
    arithmetic: Arithmetic,
    ctx: LlamaContext<'m>,
    batch: LlamaBatch<'static>,
}

impl Backend for Worker<'_> {
    /// Nothing: the prompt is recomputed with the canvas every step.
    type State = ();

    fn admit(&mut self, _: &Job) -> Result<((), usize), EngineError> {
        Ok(((), 0))
    }

    /// One step of every running reply, one full-recompute decode each.
    fn step(&mut self, replies: &mut [Running<()>], stepped: &mut dyn FnMut(&mut Running<()>, Step)) {
        for r in replies.iter_mut() {
            let active = r.canvas.active_positions();
            self.batch.clear();
            let first_row = self.add_to_batch(r, &active);
            let decoding = Instant::now();
            let step = match self.ctx.decode(&mut self.batch) {
                Ok(()) => {
                    let compute = decoding.elapsed();
                    let rows: Vec<&[f32]> = active
                        .iter()
                        .map(|p| self.ctx.get_logits_ith((first_row + p) as i32))
                        .collect();
                    let unmasked = r.canvas.step(&active, &rows);
                    let tokens = self.batch.n_tokens() as usize;
                    let flops = self.arithmetic.flops(tokens, active.len(), tokens);
                    Ok(Stepped {
                        unmasked,
                        compute,
                        flops,
                    })
                }
                Err(e) => Err(EngineError::Decode(e.to_string())),
            };
            stepped(r, step);
        }
    }

    fn release(&mut self, _: ()) {}
}

impl<'m> Worker<'m> {
    fn new(loaded: &'m ChatModel, settings: &EngineSettings, model_path: &Path) -> Result<Self, EngineError> {
        let context_length = settings.context_length.min(loaded.n_ctx_train);
        let n_ctx = context_length as u32;
        let threads = settings.threads.max(1) as i32;
        // Non-causal attention needs the whole sequence in one micro-batch.
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(n_ctx))
            .with_n_batch(n_ctx)
            .with_n_ubatch(n_ctx)
            .with_n_threads(threads)
            .with_n_threads_batch(threads);
        let arithmetic = Arithmetic::of_file(model_path).map_err(|e| EngineError::Load {
            path: model_path.display().to_string(),
            reason: e.to_string(),
        })?;
        let model_path = model_path.display().to_string();
        let ctx = loaded
            .model
            .new_context(backend()?, params)
            .map_err(|e| EngineError::Load {
                path: model_path.clone(),
                reason: e.to_string(),
            })?;
        Ok(Self {
            arithmetic,
            loaded,
            info: EngineInfo {
                engine: "reference",
                model_path,
                architecture: loaded.architecture.clone(),
                context_length,
                history_window: None,
            },
            ctx,
            batch: LlamaBatch::new(n_ctx as usize, 1),
        })
    }

    /// Adds `[prompt + canvas]` to the batch, asking for the logits of the `active` canvas
    /// positions. Returns the batch row whose logits predict canvas position 0, so position `p`
    /// reads row `first + p` (Dream's rows are shifted by one). The batch holds a context window
    /// and the prompt was fitted beside the canvas into one.
    fn add_to_batch(&mut self, r: &Running<()>, active: &[usize]) -> usize {
        let prompt = &r.job.prompt.tokens;
        let prompt_len = prompt.len();
        let shift = self.loaded.logit_shift;
        let wanted = |i: usize| i + shift >= prompt_len && active.contains(&(i + shift - prompt_len));
        for (i, &t) in prompt.iter().chain(r.canvas.tokens()).enumerate() {
            self.batch
                .add(LlamaToken(t), i as i32, &[0], wanted(i))
                .expect("the batch holds a context window");
        }
        prompt_len - shift
    }
}
