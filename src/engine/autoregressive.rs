//! The autoregressive engine: a next-token model (the bundled Northwind twin, or any llama-family
//! GGUF) through llama.cpp, behind the same trait, queue and scheduler as the diffusion engines,
//! so the same server, protocol, widget and bench serve either kind side by side.
//!
//! The reply is the canvas filled left to right, one position per step; a revision (the reply so
//! far, no placeholders) goes out every `tokens_per_revision` tokens. Every running reply has its
//! own sequence in one llama.cpp context, and one step decodes the next token of all of them in
//! one batch. A sequence's K/V stays after its reply: the next turn of a conversation starts with
//! the prompt it shares with what a sequence holds (exact for a causal model) and decodes only the
//! rest. Sampling is the canvas's (greedy, or seeded temperature sampling).
//!
//! One dedicated thread owns the model and its context (the context borrows the model).

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
use super::{Capacity, Engine, EngineError, EngineInfo};

/// Loads the model on a new thread and returns the engine once it is ready (or failed to load).
/// Blocks: call it from a blocking context.
pub fn start(settings: &EngineSettings, model_path: PathBuf) -> Result<impl Engine, EngineError> {
    let settings = settings.clone();
    jobs::spawn(
        "autoregressive-engine",
        settings.max_waiting,
        settings.history_window,
        move |intake, ready| {
            let loaded = match ChatModel::load(&model_path, false, Family::Autoregressive) {
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
                    // One token per reply a step: a step of every sequence is small, so it is never split.
                    scheduler::run(worker, intake, &loaded, "", settings.max_running, 0);
                }
                Err(e) => ready(Err(e)),
            };
        },
    )
}

/// One llama.cpp sequence and the tokens its K/V holds.
struct Sequence {
    tokens: Vec<i32>,
    busy: bool,
    last_used: u64,
}

/// What a running reply holds: its sequence and the token to feed next (the prompt's last token,
/// then each token the reply chose).
struct Reply {
    seq: usize,
    next: i32,
}

struct Worker<'m> {
    info: EngineInfo,
    arithmetic: Arithmetic,
    ctx: LlamaContext<'m>,
    batch: LlamaBatch<'static>,
    sequences: Vec<Sequence>,
    /// Tokens one sequence may hold (prompt + reply).
    per_sequence: usize,
    /// Tokens one decode takes: a prompt is prefilled in chunks of this many.
    batch_size: usize,
    tokens_per_revision: usize,
    clock: u64,
}

impl Backend for Worker<'_> {
    type State = Reply;

    const SHOWS_MASKS: bool = false;

    fn steps_per_revision(&self) -> usize {
        self.tokens_per_revision
    }

    /// Picks the idle sequence sharing the longest prefix with the prompt and decodes the rest of
    /// the prompt but its last token (the first step feeds that one).
    fn admit(&mut self, job: &Job) -> Result<(Reply, usize), EngineError> {
        let prompt = &job.prompt.tokens;
        let Some((&last, head)) = prompt.split_last() else {
            return Err(EngineError::Decode("empty prompt".into()));
        };
        if prompt.len() + job.options.max_tokens > self.per_sequence {
            return Err(EngineError::ContextOverflow {
                needed: prompt.len() + job.options.max_tokens,
                limit: self.per_sequence,
            });
        }
        let (seq, kept) = self.pick(head)?;
        let decoded = (|| {
            self.ctx
                .clear_kv_cache_seq(Some(seq as u32), Some(kept as u32), None)
                .map_err(|e| EngineError::Decode(e.to_string()))?;
            for (start, chunk) in head[kept..].chunks(self.batch_size).enumerate() {
                let offset = kept + start * self.batch_size;
                self.batch.clear();
                for (i, &t) in chunk.iter().enumerate() {
                    self.batch
                        .add(LlamaToken(t), (offset + i) as i32, &[seq as i32], false)
                        .map_err(|e| EngineError::Decode(e.to_string()))?;
                }
                self.ctx
                    .decode(&mut self.batch)
                    .map_err(|e| EngineError::Decode(e.to_string()))?;
            }
            Ok(())
        })();
        let s = &mut self.sequences[seq];
        if let Err(e) = decoded {
            // What the sequence holds is unknown now: start it from nothing next time.
            s.tokens.clear();
            s.busy = false;
            return Err(e);
        }
        s.tokens = head.to_vec();
        crate::metrics::prompt_tokens(kept, prompt.len() - kept);
        Ok((Reply { seq, next: last }, kept))
    }

    /// The next token of every running reply, in one batch.
    fn step(&mut self, replies: &mut [Running<Reply>], stepped: &mut dyn FnMut(&mut Running<Reply>, Step)) {
        self.batch.clear();
        for r in replies.iter() {
            let position = self.sequences[r.state.seq].tokens.len() as i32;
            self.batch
                .add(LlamaToken(r.state.next), position, &[r.state.seq as i32], true)
                .expect("the batch holds a token per sequence");
        }
        let decoding = Instant::now();
        let decoded = self.ctx.decode(&mut self.batch);
        let compute = decoding.elapsed();
        crate::metrics::engine_step(compute, replies.len());
        if let Err(e) = decoded {
            let error = EngineError::Decode(e.to_string());
            for r in replies.iter_mut() {
                self.sequences[r.state.seq].tokens.clear();
                stepped(r, Err(error.clone()));
            }
            return;
        }
        for (row, r) in replies.iter_mut().enumerate() {
            let position = r.canvas.active_positions()[0];
            let logits = self.ctx.get_logits_ith(row as i32);
            let unmasked = r.canvas.step(&[position], &[logits]);
            let fed = r.state.next;
            let keys = self.sequences[r.state.seq].tokens.len() + 1;
            let flops = self.arithmetic.flops(1, 1, keys);
            self.sequences[r.state.seq].tokens.push(fed);
            r.state.next = r.canvas.tokens()[position];
            stepped(
                r,
                Ok(Stepped {
                    unmasked,
                    compute,
                    flops,
                }),
            );
        }
    }

    /// The sequence keeps its K/V for the conversation's next turn.
    fn release(&mut self, reply: Reply) {
        self.sequences[reply.seq].busy = false;
    }
}

impl<'m> Worker<'m> {
    fn new(loaded: &'m ChatModel, settings: &EngineSettings, model_path: &Path) -> Result<Self, EngineError> {
        let per_sequence = settings.context_length.min(loaded.n_ctx_train).max(1);
        let sequences = settings.kept_caches.max(settings.max_running).max(1);
        let threads = settings.threads.max(1) as i32;
        let n_ctx = u32::try_from(per_sequence * sequences).map_err(|_| EngineError::Load {
            path: model_path.display().to_string(),
            reason: "context_length x kept_caches is too large".into(),
        })?;
        let batch = per_sequence.max(sequences).min(2048) as u32;
        // A K/V buffer per sequence: with one shared buffer every decode attends over the cells
        // of all kept conversations (masked), and a step slows down with each one kept.
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(n_ctx))
            .with_n_batch(batch)
            .with_n_ubatch(batch)
            .with_n_seq_max(sequences as u32)
            .with_kv_unified(false)
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
        tracing::info!(sequences, per_sequence, "autoregressive engine loaded");
        Ok(Self {
            arithmetic,
            info: EngineInfo {
                engine: "autoregressive",
                model_path,
                architecture: loaded.architecture.clone(),
                context_length: per_sequence,
                history_window: None,
            },
            ctx,
            batch: LlamaBatch::new(batch as usize, 1),
            sequences: (0..sequences)
                .map(|_| Sequence {
                    tokens: Vec::new(),
                    busy: false,
                    last_used: 0,
                })
                .collect(),
            per_sequence,
            batch_size: batch as usize,
            tokens_per_revision: settings.tokens_per_revision.max(1),
            clock: 0,
        })
    }

    /// The idle sequence that shares the longest prefix with `tokens` (ties: the least recently
    /// used), marked busy; and how many of its tokens stay.
    fn pick(&mut self, tokens: &[i32]) -> Result<(usize, usize), EngineError> {
        let best = self
            .sequences
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.busy)
            .map(|(i, s)| {
                let shared = s.tokens.iter().zip(tokens).take_while(|(a, b)| a == b).count();
                (shared, std::cmp::Reverse(s.last_used), i)
            })
            .max()
            .ok_or(EngineError::Overloaded(Capacity::Caches {
                caches: self.sequences.len(),
            }))?;
        let (shared, _, index) = best;
        self.clock += 1;
        let s = &mut self.sequences[index];
        s.busy = true;
        s.last_used = self.clock;
        Ok((index, shared))
    }
}
