//! The reference engine: llama.cpp's own diffusion path through `llama-cpp-2`.
//!
//! llama.cpp keeps no KV cache for diffusion architectures, so every step decodes the whole
//! `[prompt + canvas]` non-causally and reads the logits of the active positions. This is the
//! baseline every faster engine is measured and checked against.
//!
//! One dedicated thread owns the model and its context (llama.cpp contexts are not `Send`).
//! Requests queue on a channel; the thread runs up to `max_running` replies at once,
//! interleaving them one step each in turn, so a long reply does not hold back a short one.

use std::num::NonZeroU32;
use std::path::{Path, PathBuf};

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::token::LlamaToken;

use super::canvas::Canvas;
use super::jobs::{self, Intake, Job};
use super::prompt::FittedPrompt;
use super::settings::EngineSettings;
use super::vocab::{backend, ChatModel};
use super::{Engine, EngineError, EngineEvent, EngineInfo, StopReason};

/// Loads the model on a new thread and returns the engine once it is ready (or failed to load).
/// Dropping the engine lets the thread finish its replies and exit. Blocks: call it from a blocking
/// context.
pub fn start(settings: &EngineSettings, model_path: PathBuf) -> Result<impl Engine, EngineError> {
    let settings = settings.clone();
    jobs::spawn("reference-engine", settings.max_waiting, move |intake, ready| {
        let loaded = match ChatModel::load(&model_path, false) {
            Ok(l) => l,
            Err(e) => return ready(Err(e)),
        };
        match Worker::new(&loaded, &settings, &model_path) {
            Ok(worker) => {
                ready(Ok(worker.info.clone()));
                worker.run(intake);
            }
            Err(e) => ready(Err(e)),
        };
    })
}

/// A reply in progress.
struct Active {
    job: Job,
    prompt: Vec<i32>,
    canvas: Canvas,
}

struct Worker<'m> {
    loaded: &'m ChatModel,
    info: EngineInfo,
    ctx: LlamaContext<'m>,
    batch: LlamaBatch<'static>,
    max_running: usize,
    placeholder: String,
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
        let model_path = model_path.display().to_string();
        let ctx = loaded
            .model
            .new_context(backend()?, params)
            .map_err(|e| EngineError::Load {
                path: model_path.clone(),
                reason: e.to_string(),
            })?;
        Ok(Self {
            loaded,
            info: EngineInfo {
                engine: "reference",
                model_path,
                architecture: loaded.architecture.clone(),
                context_length,
            },
            ctx,
            batch: LlamaBatch::new(n_ctx as usize, 1),
            max_running: settings.max_running.max(1),
            placeholder: settings.mask_placeholder.clone(),
        })
    }

    fn run(mut self, mut intake: Intake) {
        let mut active: Vec<Active> = Vec::new();
        while let Some(jobs) = intake.take(active.len(), self.max_running - active.len()) {
            active.extend(jobs.into_iter().filter_map(|job| self.admit(job)));
            self.step_round(&mut active);
        }
    }

    /// Fits the prompt and announces the reply; `None` when it failed.
    fn admit(&mut self, job: Job) -> Option<Active> {
        let queue_wait = job.queued_at.elapsed();
        let fitted = self.loaded.fit_prompt(&job.request, self.info.context_length);
        let FittedPrompt {
            tokens, dropped_turns, ..
        } = match fitted {
            Ok(f) => f,
            Err(e) => {
                job.fail(e);
                return None;
            }
        };
        let started = EngineEvent::Started {
            prompt_tokens: tokens.len(),
            cached_tokens: 0,
            dropped_turns,
            queue_wait,
        };
        if job.events.send(started).is_err() {
            return None;
        }
        let canvas = Canvas::new(&job.request.options, self.loaded.mask, self.loaded.end_tokens.clone());
        Some(Active {
            job,
            prompt: tokens,
            canvas,
        })
    }

    /// One step of every running reply, one full-recompute decode each.
    fn step_round(&mut self, replies: &mut Vec<Active>) {
        replies.retain(|a| {
            let stop = a.job.abandoned();
            if stop {
                a.job.finish(&a.canvas, self.loaded, StopReason::Cancelled);
            }
            !stop
        });
        let mut keep = Vec::with_capacity(replies.len());
        for a in replies.iter_mut() {
            let active = a.canvas.active_positions();
            self.batch.clear();
            let first_row = self.add_to_batch(a, &active);
            let decoded = self
                .ctx
                .decode(&mut self.batch)
                .map_err(|e| EngineError::Decode(e.to_string()));
            keep.push(match decoded {
                Ok(()) => self.apply(a, &active, first_row),
                Err(e) => {
                    a.job.fail(e);
                    false
                }
            });
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
        a.job.report_step(&a.canvas, self.loaded, &self.placeholder, unmasked)
    }

    /// Adds `[prompt + canvas]` to the batch, asking for the logits of the `active` canvas
    /// positions. Returns the batch row whose logits predict canvas position 0, so position `p`
    /// reads row `first + p` (Dream's rows are shifted by one). The batch holds a context window
    /// and `admit` checked that the reply fits one.
    fn add_to_batch(&mut self, a: &Active, active: &[usize]) -> usize {
        let prompt_len = a.prompt.len();
        let shift = self.loaded.logit_shift();
        let wanted = |i: usize| i + shift >= prompt_len && active.contains(&(i + shift - prompt_len));
        for (i, &t) in a.prompt.iter().chain(a.canvas.tokens()).enumerate() {
            self.batch
                .add(LlamaToken(t), i as i32, &[0], wanted(i))
                .expect("the batch holds a context window");
        }
        prompt_len - shift
    }
}
