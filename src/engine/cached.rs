//! The cached engine: our own ggml graph ([`ggml_ext::runtime`]) with a K/V cache per
//! conversation and one batched graph evaluation per step for the running replies (up to
//! `limits.replies_per_evaluation` of them).
//!
//! Per reply:
//! 1. *Prefill*: the prompt is committed to a cache chunk by chunk, one chunk per earlier turn
//!    ([`prompt::turn_boundaries`](super::prompt::turn_boundaries)). A cache left by an earlier turn of the same conversation (its
//!    tokens a prefix of the new prompt, ending on a boundary) is extended instead of refilled.
//! 2. *Refresh* at the start of every block: the canvas up to the lookahead past the block
//!    ([`Lookahead`](super::settings::Lookahead)) is computed over the prompt, leaving the K/V of
//!    those cells in the cache; the masks further out join at a later block's refresh.
//! 3. *Steps* inside the block: with [`CacheMode::Prefix`] the block and everything after it are
//!    recomputed; with [`CacheMode::Dual`] only the block's cells that the previous step
//!    predicted, attending to the cached K/V of the rest of the canvas from the last refresh
//!    (Fast-dLLM's prefix and dual caches, the dual one shrinking as its block settles). Both are
//!    approximations of the full recompute; `dllm-tools eval` measures what they cost.
//!
//! The steps of a pass of running replies go into one graph evaluation, whose head returns the top-k
//! tokens, probabilities and entropy of each masked position of the current blocks.
//!
//! LLaDA and Dream files both run; Dream's logits are shifted by one position, so its prompt's last
//! token is computed with the canvas instead of being committed.
//!
//! The thread owns the model and the caches. Prompts arrive as tokens with their turn boundaries,
//! prepared by the prompt thread in front of the queue ([`jobs`](super::jobs)).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use ggml_ext::runtime::{Arithmetic, Device, DiffusionModel, Head, KvCache, Predictions, RuntimeConfig, Segment};

use super::jobs::{self, Job, Loaded};
use super::policy::Selection;
use super::prompt::Chunking;
use super::scheduler::{self, Backend, Running, Step, Stepped};
use super::settings::{CacheMode, DeviceKind, EngineSettings};
use super::vocab::{ChatModel, Family};
use super::{Capacity, Engine, EngineError, EngineInfo};

/// Loads the model on a new thread and returns the engine once it is ready (or failed to load).
/// Dropping the engine lets the thread finish its replies and exit. Blocks: call it from a blocking
/// context.
pub fn start(settings: &EngineSettings, model_path: PathBuf) -> Result<impl Engine, EngineError> {
    let settings = settings.clone();
    jobs::spawn(
        "cached-engine",
        settings.max_waiting,
        settings.history_window,
        move |intake, ready| {
            // Only the vocabulary and the template: the weights are the runtime's.
            let chat = match ChatModel::load(&model_path, true, Family::Diffusion) {
                Ok(c) => Arc::new(c),
                Err(e) => return ready(Err(e)),
            };
            match Worker::load(settings, &model_path, &chat.architecture) {
                Ok(worker) => {
                    ready(Ok(Loaded {
                        info: worker.info.clone(),
                        chat: chat.clone(),
                        chunking: if worker.settings.share_system_prompt {
                            Chunking::SystemAndTurns
                        } else {
                            Chunking::Turns
                        },
                    }));
                    let (placeholder, max_running, per_evaluation) = (
                        worker.settings.mask_placeholder.clone(),
                        worker.settings.max_running,
                        worker.settings.per_evaluation,
                    );
                    scheduler::run(worker, intake, &chat, &placeholder, max_running, per_evaluation);
                }
                Err(e) => ready(Err(e)),
            }
        },
    )
}

/// A conversation cache and what the engine knows about its contents.
struct Slot {
    cache: KvCache,
    /// Ends of the committed chunks, ascending; the cache can be cut back to any of them exactly.
    chunk_ends: Vec<usize>,
    busy: bool,
    last_used: u64,
}

/// What a running reply holds here.
struct Reply {
    slot: usize,
    /// The block whose start refreshed the canvas cells in the cache.
    refreshed: Option<usize>,
    /// Prompt tokens kept out of the committed prefix (Dream: the last one, whose row predicts the
    /// first canvas position).
    lead: Vec<i32>,
    /// The positions the previous step predicted: still masked, or unmasked by it.
    last_active: Vec<usize>,
    /// The cells the current block's steps attend to, from the block's first step
    /// ([`EngineSettings::lookahead`]); those after them are not in the cache.
    visible: usize,
}

/// The cache a new reply gets.
#[derive(Debug, PartialEq, Eq)]
enum Choice {
    /// An existing idle cache, keeping its first `reuse` tokens.
    Idle { index: usize, reuse: usize },
    /// A new, empty cache.
    New,
}

/// What an existing cache offers a new prompt.
#[derive(Debug, Clone, Copy)]
struct Offer {
    /// Tokens of the new prompt it holds exactly, ending on a chunk end of both.
    held: usize,
    /// Whether that is all it holds, so taking it for the prompt loses nothing.
    whole: bool,
    busy: bool,
    last_used: u64,
}

/// Picks a cache for a new reply from what the existing ones offer. The idle cache that holds the
/// longest start of the prompt and nothing more wins (the conversation's own cache from its
/// previous turn; ties go to the least recently used one). Otherwise a new cache is made while
/// fewer than `limit` exist, so other conversations keep theirs; at the limit the least recently
/// used idle one is overwritten, keeping what it holds of the prompt. A start that another cache
/// holds is copied from it afterwards ([`Worker::pick_slot`]). With every cache busy at the limit
/// there is no room: a capacity error, not a failure, so the service reports it as overload. The
/// scheduler admits at most `max_running` replies and `limit` is at least that, so this is a guard
/// rather than a state the engine reaches.
fn choose_slot(offers: &[Offer], limit: usize) -> Result<Choice, EngineError> {
    let idle = || offers.iter().enumerate().filter(|(_, o)| !o.busy);
    let extended = idle()
        .filter(|(_, o)| o.whole && o.held > 0)
        .max_by_key(|(i, o)| (o.held, std::cmp::Reverse(o.last_used), *i));
    if let Some((index, o)) = extended {
        return Ok(Choice::Idle { index, reuse: o.held });
    }
    if offers.len() < limit {
        return Ok(Choice::New);
    }
    match idle().min_by_key(|(i, o)| (o.last_used, *i)) {
        Some((index, o)) => Ok(Choice::Idle { index, reuse: o.held }),
        None => Err(EngineError::Overloaded(Capacity::Caches { caches: offers.len() })),
    }
}

/// One reply's part of a step's evaluation.
struct Planned {
    tokens: Vec<i32>,
    offset: usize,
    /// The cells of `tokens` when they are not the run from `offset` on.
    cells: Vec<usize>,
    span: usize,
    active: Vec<usize>,
    outputs: Vec<usize>,
    /// The arithmetic of evaluating it.
    flops: f64,
}

struct Worker {
    model: DiffusionModel,
    arithmetic: Arithmetic,
    info: EngineInfo,
    settings: EngineSettings,
    context: usize,
    slots: Vec<Slot>,
    clock: u64,
}

impl Backend for Worker {
    type State = Reply;

    /// Picks a conversation cache for the prompt and prefills what it lacks.
    fn admit(&mut self, job: &Job) -> Result<(Reply, usize), EngineError> {
        let tokens = &job.prompt.tokens;
        let shift = self.model.shape().logit_shift;
        let committed = &tokens[..tokens.len().saturating_sub(shift)];
        let boundaries: Vec<usize> = job
            .prompt
            .boundaries
            .iter()
            .copied()
            .filter(|b| *b < committed.len())
            .collect();
        let slot = self.pick_slot(committed, &boundaries)?;
        let cached_tokens = self.prefill(slot, committed, &boundaries)?;
        let reply = Reply {
            slot,
            refreshed: None,
            lead: tokens[committed.len()..].to_vec(),
            last_active: Vec::new(),
            visible: 0,
        };
        Ok((reply, cached_tokens))
    }

    /// One denoising step of each reply of the pass, in one graph evaluation.
    fn step(&mut self, replies: &mut [Running<Reply>], stepped: &mut dyn FnMut(&mut Running<Reply>, Step)) {
        let started = Instant::now();
        let plans: Vec<Planned> = replies.iter_mut().map(|r| self.plan(r)).collect();
        let mut caches: Vec<Option<&mut KvCache>> = self.slots.iter_mut().map(|s| Some(&mut s.cache)).collect();
        let mut segments: Vec<Segment> = replies
            .iter()
            .zip(&plans)
            .map(|(r, p)| Segment {
                cache: caches[r.state.slot].take().expect("one running reply per cache"),
                tokens: &p.tokens,
                offset: p.offset,
                cells: &p.cells,
                span: p.span,
                outputs: &p.outputs,
                temperature: r.job.options.temperature,
                commit: false,
                chunk_ends: &[],
            })
            .collect();
        let head = Head::TopK {
            k: self.settings.top_k,
            entropy: replies.iter().any(|r| r.job.options.selection == Selection::Entropy),
        };
        let evaluating = Instant::now();
        let evaluated = self.model.eval(&mut segments, head);
        let compute = evaluating.elapsed();
        drop(segments);
        crate::metrics::engine_step(started.elapsed(), replies.len());
        let predictions = match evaluated {
            Ok(p) => p,
            Err(e) => {
                let error = EngineError::Decode(e.to_string());
                for r in replies.iter_mut() {
                    stepped(r, Err(error.clone()));
                }
                return;
            }
        };
        for ((r, plan), predicted) in replies.iter_mut().zip(plans).zip(predictions) {
            let Predictions::TopK(tops) = predicted else {
                unreachable!("the top-k head returns top-k predictions")
            };
            let unmasked = r.canvas.step_top_k(&plan.active, &tops);
            stepped(
                r,
                Ok(Stepped {
                    unmasked,
                    compute,
                    flops: plan.flops,
                }),
            );
        }
    }

    /// The cache stays with its contents for the conversation's next turn.
    fn release(&mut self, reply: Reply) {
        self.slots[reply.slot].busy = false;
    }
}

impl Worker {
    fn load(settings: EngineSettings, model_path: &Path, architecture: &str) -> Result<Self, EngineError> {
        let runtime = RuntimeConfig {
            device: match settings.device {
                DeviceKind::Cpu => Device::Cpu,
                DeviceKind::Gpu => Device::Gpu,
            },
            threads: settings.threads,
            max_segments: settings.max_running.max(1),
        };
        let load_error = |reason: String| EngineError::Load {
            path: model_path.display().to_string(),
            reason,
        };
        let arithmetic = Arithmetic::of_file(model_path).map_err(|e| load_error(e.to_string()))?;
        let model = DiffusionModel::load(model_path, runtime).map_err(|e| match e {
            ggml_ext::runtime::RuntimeError::Architecture(a) => EngineError::NotDiffusion(a),
            other => load_error(other.to_string()),
        })?;
        // A vocabulary-only load has no training context; the runtime read it from the GGUF.
        let context = settings.context_length.min(model.shape().context_length);
        tracing::info!(
            device = model.device_description(),
            weights_mib = model.weight_bytes() / (1 << 20),
            "cached engine loaded"
        );
        Ok(Self {
            info: EngineInfo {
                engine: "cached",
                model_path: model_path.display().to_string(),
                architecture: architecture.into(),
                context_length: context,
                history_window: None,
            },
            model,
            arithmetic,
            settings,
            context,
            slots: Vec::new(),
            clock: 0,
        })
    }

    /// The cache [`choose_slot`] picks for `tokens`, created when it is a new one. Marks it busy and
    /// cuts it back to the prefix it shares exactly with `tokens`; when another cache (running or
    /// idle) holds a longer start of `tokens`, such as the system prompt every conversation begins
    /// with, copies that start from it.
    fn pick_slot(&mut self, tokens: &[i32], boundaries: &[usize]) -> Result<usize, EngineError> {
        let reuse_history = self.settings.reuse_history;
        let held = |slot: &Slot| {
            if !reuse_history {
                return 0;
            }
            boundaries
                .iter()
                .chain(std::iter::once(&tokens.len()))
                .rev()
                .find(|b| slot.chunk_ends.contains(b) && slot.cache.tokens().get(..**b) == Some(&tokens[..**b]))
                .copied()
                .unwrap_or(0)
        };
        let offers: Vec<Offer> = self
            .slots
            .iter()
            .map(|s| {
                let held = held(s);
                Offer {
                    held,
                    whole: held == s.cache.len(),
                    busy: s.busy,
                    last_used: s.last_used,
                }
            })
            .collect();
        let limit = self.settings.kept_caches.max(self.settings.max_running);
        let (index, reuse) = match choose_slot(&offers, limit)? {
            Choice::Idle { index, reuse } => (index, reuse),
            Choice::New => {
                let cache = self
                    .model
                    .new_cache(self.context)
                    .map_err(|e| EngineError::Decode(e.to_string()))?;
                self.slots.push(Slot {
                    cache,
                    chunk_ends: Vec::new(),
                    busy: false,
                    last_used: 0,
                });
                (self.slots.len() - 1, 0)
            }
        };
        self.clock += 1;
        let slot = &mut self.slots[index];
        slot.busy = true;
        slot.last_used = self.clock;
        slot.cache.truncate(reuse);
        slot.chunk_ends.retain(|e| *e <= reuse);
        let donor = offers
            .iter()
            .enumerate()
            .filter(|(i, o)| *i != index && o.held > reuse)
            .max_by_key(|(_, o)| o.held);
        if let Some((from, offer)) = donor {
            let (to, from) = two_slots(&mut self.slots, index, from);
            if let Err(e) = to.cache.copy_prefix_from(&from.cache, offer.held) {
                to.busy = false;
                return Err(EngineError::Decode(e.to_string()));
            }
            to.chunk_ends = from.chunk_ends.iter().copied().filter(|e| *e <= offer.held).collect();
        }
        Ok(index)
    }

    /// Commits what `slot` lacks of `tokens`, one chunk per turn boundary, in one evaluation.
    /// Returns how many tokens were already there.
    fn prefill(&mut self, slot: usize, tokens: &[i32], boundaries: &[usize]) -> Result<usize, EngineError> {
        let s = &mut self.slots[slot];
        let reused = s.cache.len();
        let ends: Vec<usize> = boundaries.iter().copied().filter(|b| *b > reused).collect();
        let chunk_ends: Vec<usize> = ends.iter().map(|e| e - reused).collect();
        if let Err(e) = self.model.prefill_chunks(&mut s.cache, &tokens[reused..], &chunk_ends) {
            s.busy = false;
            return Err(EngineError::Decode(e.to_string()));
        }
        s.chunk_ends.extend(ends);
        if tokens.len() > reused {
            s.chunk_ends.push(tokens.len());
        }
        crate::metrics::prompt_tokens(reused, tokens.len() - reused);
        Ok(reused)
    }

    /// What `r` computes this step: the canvas up to the lookahead at a block's start, then the
    /// block and what follows it up to there (prefix cache) or, with the dual cache, only the
    /// block's cells the previous step predicted: those still masked, and those it unmasked, whose
    /// keys and values were computed with the mask and now get their token's. A cell settled
    /// before that keeps the keys and values of the step after it settled, so a block step shrinks
    /// as the block fills (about 22 of a 32-token block's cells on the held-out questions).
    ///
    /// The cells after the committed prompt hold `lead ++ canvas`: with Dream's shifted logits the
    /// prompt's last token stays uncommitted, so the row predicting canvas position `p` is cell `p`
    /// for both families.
    fn plan(&self, r: &mut Running<Reply>) -> Planned {
        let active = r.canvas.active_positions();
        let block = r.canvas.current_block().expect("a running reply has a masked position");
        let block_index = block.start / r.job.options.block_length.max(1);
        let cells: Vec<i32> = r.state.lead.iter().chain(r.canvas.tokens()).copied().collect();
        let lead = r.state.lead.len();
        let refresh = r.state.refreshed != Some(block_index);
        if refresh {
            r.state.visible = lead + self.settings.lookahead.end(block.end, r.canvas.tokens().len());
        }
        let visible = r.state.visible;
        let keys = self.slots[r.state.slot].cache.len() + visible;
        let last_active = std::mem::replace(&mut r.state.last_active, active.clone());
        if !refresh && self.settings.cache_mode == CacheMode::Dual {
            // Cell `p` predicts position `p`; the token at `p` sits in cell `p + lead`.
            let mut picked: Vec<usize> = last_active
                .iter()
                .flat_map(|p| [*p, p + lead])
                .filter(|c| *c < visible)
                .collect();
            picked.sort_unstable();
            picked.dedup();
            return Planned {
                flops: self.arithmetic.flops(picked.len(), active.len(), keys),
                tokens: picked.iter().map(|c| cells[*c]).collect(),
                offset: picked[0],
                span: visible,
                outputs: active
                    .iter()
                    .map(|p| picked.binary_search(p).expect("an active position was active before"))
                    .collect(),
                cells: picked,
                active,
            };
        }
        let window = if refresh {
            r.state.refreshed = Some(block_index);
            0..visible
        } else {
            block.start..visible
        };
        Planned {
            flops: self.arithmetic.flops(window.len(), active.len(), keys),
            tokens: cells[window.clone()].to_vec(),
            offset: window.start,
            span: visible,
            outputs: active.iter().map(|p| p - window.start).collect(),
            cells: Vec::new(),
            active,
        }
    }
}

/// `slots[to]` to write and `slots[from]` to read, `to != from`.
fn two_slots(slots: &mut [Slot], to: usize, from: usize) -> (&mut Slot, &Slot) {
    if to < from {
        let (low, high) = slots.split_at_mut(from);
        (&mut low[to], &high[0])
    } else {
        let (low, high) = slots.split_at_mut(to);
        (&mut high[0], &low[from])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(held: usize, whole: bool, busy: bool, last_used: u64) -> Offer {
        Offer {
            held,
            whole,
            busy,
            last_used,
        }
    }

    #[test]
    fn a_conversation_extends_its_own_cache_else_gets_a_new_one_then_the_least_recently_used() {
        // The longest start held by an idle cache that holds nothing more wins; among equal
        // ones, the least recently used. A busy cache is never taken.
        let offers = [
            offer(10, true, false, 5),
            offer(40, true, true, 1),
            offer(30, true, false, 9),
            offer(30, true, false, 2),
            offer(35, false, false, 1),
        ];
        assert_eq!(choose_slot(&offers, 8).unwrap(), Choice::Idle { index: 3, reuse: 30 });
        // Caches that hold more than the start they share (another conversation after the same
        // system prompt) are kept while there is room for a new one ...
        let offers = [
            offer(12, false, false, 5),
            offer(0, true, true, 1),
            offer(12, false, false, 2),
        ];
        assert_eq!(choose_slot(&offers, 8).unwrap(), Choice::New);
        // ... and at the limit the least recently used idle one is overwritten, keeping the start.
        assert_eq!(choose_slot(&offers, 3).unwrap(), Choice::Idle { index: 2, reuse: 12 });
        let offers = [offer(0, false, false, 5), offer(0, true, false, 7)];
        assert_eq!(choose_slot(&offers, 2).unwrap(), Choice::Idle { index: 0, reuse: 0 });
    }

    #[test]
    fn every_cache_busy_at_the_limit_is_a_capacity_error() {
        let busy = [offer(12, true, true, 1), offer(0, true, true, 2)];
        let err = choose_slot(&busy, 2).unwrap_err();
        assert!(
            matches!(err, EngineError::Overloaded(Capacity::Caches { caches: 2 })),
            "{err:?}"
        );
        assert_eq!(choose_slot(&busy, 3).unwrap(), Choice::New);
    }
}
