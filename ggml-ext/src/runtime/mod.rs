//! Our own diffusion forward pass on ggml: a GGUF's weights in backend memory, a K/V cache per
//! conversation, and one graph evaluation that advances many conversations at once.
//!
//! The unit of work is a [`Segment`]: some tokens of one conversation placed after its committed
//! prefix, attending non-causally to a span of that conversation's cache cells. The same call
//! covers every use:
//! - *prefill* (`commit`): the prompt's tokens after the prefix, appended to it. A prompt is
//!   committed in chunks (one per turn), each chunk seeing the prefix, the earlier chunks and
//!   itself, so the next turn extends a cached prefix with exactly the result a fresh prefill would
//!   give. All chunks of a prompt go into one evaluation (a block-causal attention mask), so a
//!   prompt of several turns costs one graph, not one per turn;
//! - *no cache*: an empty prefix and the whole `[prompt + canvas]` as one segment (llama.cpp's
//!   reference computation);
//! - *prefix cache*: the canvas (or the current block and what follows it) over the cached prompt;
//! - *dual cache*: only the current block, over the prompt and the K/V the last full pass left for
//!   the rest of the canvas.
//!
//! [`Arithmetic`] counts what an evaluation costs and [`matmul_rate`] measures how fast this machine
//! multiplies matrices, so a benchmark can compare the two.
//!
//! All `unsafe` code of the runtime is in this module tree.

mod arithmetic;
mod backend;
mod graph;
mod kv_cache;
mod weights;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use llama_cpp_sys_2 as sys;

pub use arithmetic::{matmul_rate, Arithmetic, Matrix};
pub use backend::Device;
pub use graph::Head;
pub use kv_cache::KvCache;
pub use weights::{Family, ModelShape};

/// Errors of the runtime.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RuntimeError {
    #[error("model file {path:?} could not be loaded: {reason}")]
    Load { path: String, reason: String },
    #[error("architecture {0:?} is not supported by the cached engine (llada and dream are)")]
    Architecture(String),
    #[error("device: {0}")]
    Device(String),
    #[error("out of memory allocating {0}")]
    Alloc(String),
    #[error("invalid segment: {0}")]
    Segment(String),
    #[error("invalid cache copy: {0}")]
    Cache(String),
    #[error("the graph failed to compute (ggml status {0})")]
    Compute(i32),
}

/// How the runtime is set up.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    pub device: Device,
    /// CPU threads per evaluation.
    pub threads: usize,
    /// Most segments one evaluation may batch.
    pub max_segments: usize,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            threads: 1,
            max_segments: 16,
        }
    }
}

/// Some tokens of one conversation to evaluate (see the module docs).
pub struct Segment<'a> {
    pub cache: &'a mut KvCache,
    pub tokens: &'a [i32],
    /// Cell of `tokens[0]`, counted from the end of the committed prefix.
    pub offset: usize,
    /// Cells of the tokens one by one (ascending, counted like `offset`) when they are not the
    /// run from `offset` on: a step that recomputes only some cells of a block, the others'
    /// keys and values staying as cached; `offset` is then unused. Empty: `offset, offset + 1, ...`.
    pub cells: &'a [usize],
    /// Cells after the prefix the segment attends to; at least `offset + tokens.len()`.
    pub span: usize,
    /// Indexes into `tokens` whose predictions are wanted.
    pub outputs: &'a [usize],
    /// Softmax temperature for the top-k head (values <= 0 mean 1).
    pub temperature: f32,
    /// Append `tokens` to the committed prefix afterwards (needs `offset == 0` and `span == tokens.len()`).
    pub commit: bool,
    /// For a committing segment, where its chunks end inside `tokens` (ascending, each inside
    /// `1..tokens.len()`; the last chunk ends with `tokens`): a token sees the prefix, the earlier
    /// chunks and its own chunk, not the chunks after it. Empty: one chunk.
    pub chunk_ends: &'a [usize],
}

impl<'a> Segment<'a> {
    /// A prefill: `tokens` appended to the committed prefix, in chunks ending at `chunk_ends`.
    pub fn prefill(cache: &'a mut KvCache, tokens: &'a [i32], chunk_ends: &'a [usize]) -> Self {
        Self {
            cache,
            tokens,
            offset: 0,
            cells: &[],
            span: tokens.len(),
            outputs: &[],
            temperature: 1.0,
            commit: true,
            chunk_ends,
        }
    }
}

/// The most likely tokens of one output row.
#[derive(Debug, Clone, PartialEq)]
pub struct TopK {
    /// Token ids, most likely first.
    pub tokens: Vec<i32>,
    /// Their probabilities (after temperature), same order.
    pub probs: Vec<f32>,
    /// Entropy of the row's distribution, in nats; NaN unless the head was asked for it.
    pub entropy: f32,
}

/// What one evaluation returns per segment, in the order of `outputs`.
#[derive(Debug, Clone, PartialEq)]
pub enum Predictions {
    Logits(Vec<Vec<f32>>),
    TopK(Vec<TopK>),
}

/// A loaded diffusion model and the device it runs on.
pub struct DiffusionModel {
    id: u64,
    // Field order is drop order: weights and caches before the backend.
    weights: weights::Weights,
    backend: backend::Backend,
    config: RuntimeConfig,
    /// Added to the logits before the softmax: minus infinity on the mask token.
    bias: Vec<f32>,
}

// SAFETY: the model owns its weights and backend outright and needs `&mut` to evaluate; no
// pointer in it is shared with another owner, so moving it to the engine thread is sound.
unsafe impl Send for DiffusionModel {}

impl DiffusionModel {
    /// Loads `path` (a `llada` or `dream` GGUF of any weight type ggml multiplies).
    pub fn load(path: &Path, config: RuntimeConfig) -> Result<Self, RuntimeError> {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let mut backend = backend::Backend::new(config.device, config.threads)?;
        let weights = weights::load(path, backend.primary())?;
        backend.start_scheduler(graph::graph_size(weights.shape.n_layer, config.max_segments))?;
        let mut bias = vec![0.0; weights.shape.n_vocab];
        if let Some(m) = weights.shape.mask_token.filter(|m| (*m as usize) < bias.len()) {
            bias[m as usize] = f32::NEG_INFINITY;
        }
        Ok(Self {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            weights,
            backend,
            config,
            bias,
        })
    }

    pub fn shape(&self) -> &ModelShape {
        &self.weights.shape
    }

    /// Bytes of weights in device memory.
    pub fn weight_bytes(&self) -> usize {
        self.weights.bytes
    }

    /// The backend, for logs: e.g. `CPU (2 threads)`.
    pub fn device_description(&self) -> &str {
        self.backend.description()
    }

    /// A cache for one conversation of up to `capacity` cells (prompt and canvas).
    pub fn new_cache(&self, capacity: usize) -> Result<KvCache, RuntimeError> {
        KvCache::new(self.id, &self.weights.shape, capacity, self.backend.primary())
    }

    /// Appends `tokens` to `cache`'s committed prefix as one chunk.
    pub fn prefill(&mut self, cache: &mut KvCache, tokens: &[i32]) -> Result<(), RuntimeError> {
        self.prefill_chunks(cache, tokens, &[])
    }

    /// Appends `tokens` to `cache`'s committed prefix in chunks ending at `chunk_ends` (see
    /// [`Segment::chunk_ends`]), in one evaluation.
    pub fn prefill_chunks(
        &mut self,
        cache: &mut KvCache,
        tokens: &[i32],
        chunk_ends: &[usize],
    ) -> Result<(), RuntimeError> {
        if tokens.is_empty() {
            return Ok(());
        }
        self.eval(&mut [Segment::prefill(cache, tokens, chunk_ends)], Head::Logits)
            .map(drop)
    }

    /// Evaluates `segments` in one graph and returns each one's predictions. Committing segments
    /// extend their prefix afterwards. On error no cache's committed prefix changes.
    pub fn eval(&mut self, segments: &mut [Segment<'_>], head: Head) -> Result<Vec<Predictions>, RuntimeError> {
        self.validate(segments, head)?;
        let n_out: usize = segments.iter().map(|g| g.outputs.len()).sum();
        let size = self.backend.graph_size();
        let params = sys::ggml_init_params {
            // SAFETY: pure size computations.
            mem_size: unsafe { size * sys::ggml_tensor_overhead() + sys::ggml_graph_overhead_custom(size, false) },
            mem_buffer: std::ptr::null_mut(),
            no_alloc: true,
        };
        // SAFETY: a descriptor-only context, freed by `ctx` below on every path.
        let ctx = Context(unsafe { sys::ggml_init(params) });
        if ctx.0.is_null() {
            return Err(RuntimeError::Alloc("the graph context".into()));
        }
        // SAFETY: `ctx` has room for `size` descriptors and the graph; `validate` checked shapes,
        // token ids and cache capacities, so every view stays inside its tensor.
        let built = unsafe {
            let gf = sys::ggml_new_graph_custom(ctx.0, size, false);
            let built = graph::build(ctx.0, gf, &self.weights, segments, n_out, head);
            let sched = self.backend.sched();
            sys::ggml_backend_sched_reset(sched);
            if !sys::ggml_backend_sched_alloc_graph(sched, gf) {
                return Err(RuntimeError::Alloc("the graph's activations".into()));
            }
            self.set_inputs(&built, segments, n_out);
            let status = sys::ggml_backend_sched_graph_compute(sched, gf);
            if status != sys::GGML_STATUS_SUCCESS {
                return Err(RuntimeError::Compute(status));
            }
            built
        };
        let predictions = self.read_outputs(&built, segments, n_out, head);
        for g in segments.iter_mut().filter(|g| g.commit) {
            g.cache.len += g.tokens.len();
            g.cache.tokens.extend_from_slice(g.tokens);
        }
        Ok(predictions)
    }

    fn validate(&self, segments: &[Segment<'_>], head: Head) -> Result<(), RuntimeError> {
        let bad = |m: String| Err(RuntimeError::Segment(m));
        if segments.is_empty() {
            return bad("no segments".into());
        }
        if segments.len() > self.config.max_segments {
            return bad(format!(
                "{} segments, at most {} per evaluation",
                segments.len(),
                self.config.max_segments
            ));
        }
        if let Head::TopK { k, .. } = head {
            if k == 0 || k > self.weights.shape.n_vocab {
                return bad(format!("top-k of {k} over {} tokens", self.weights.shape.n_vocab));
            }
        }
        let n_vocab = self.weights.shape.n_vocab as i32;
        for g in segments {
            let n = g.tokens.len();
            if g.cache.model_id != self.id {
                return bad("the cache belongs to another model".into());
            }
            if n == 0 {
                return bad("a segment has no tokens".into());
            }
            if g.cells.is_empty() && g.span < g.offset + n {
                return bad(format!(
                    "span {} does not cover cells {}..{}",
                    g.span,
                    g.offset,
                    g.offset + n
                ));
            }
            if g.cache.len + g.span > g.cache.capacity {
                return bad(format!(
                    "{} cached + {} cells exceed the cache's {} cells",
                    g.cache.len, g.span, g.cache.capacity
                ));
            }
            if !g.cells.is_empty() {
                if g.cells.len() != n || g.commit {
                    return bad(format!(
                        "{} cells for {n} tokens (a committing segment has none)",
                        g.cells.len()
                    ));
                }
                if !g.cells.is_sorted_by(|a, b| a < b) || g.cells[n - 1] >= g.span {
                    return bad(format!(
                        "cells {:?} are not ascending inside the span {}",
                        g.cells, g.span
                    ));
                }
            }
            if g.commit && (g.offset != 0 || g.span != n) {
                return bad("a committing segment starts at the prefix end and spans only itself".into());
            }
            if !g.chunk_ends.is_empty() {
                if !g.commit {
                    return bad("only a committing segment has chunks".into());
                }
                let inside = g.chunk_ends.iter().all(|e| (1..n).contains(e));
                if !inside || !g.chunk_ends.is_sorted_by(|a, b| a < b) {
                    return bad(format!("chunk ends {:?} are not ascending inside 1..{n}", g.chunk_ends));
                }
            }
            if let Some(t) = g.tokens.iter().find(|t| **t < 0 || **t >= n_vocab) {
                return bad(format!("token id {t} outside the vocabulary of {n_vocab}"));
            }
            if let Some(o) = g.outputs.iter().find(|o| **o >= n) {
                return bad(format!("output row {o} of a {n}-token segment"));
            }
        }
        Ok(())
    }

    /// # Safety
    /// `built` must come from a graph over `segments` whose tensors are allocated.
    unsafe fn set_inputs(&self, built: &graph::Built, segments: &[Segment<'_>], n_out: usize) {
        let mut tokens = Vec::new();
        let mut positions = Vec::new();
        let mut rows = Vec::with_capacity(n_out);
        let mut inv_t = Vec::with_capacity(n_out);
        for g in segments {
            let first = tokens.len();
            tokens.extend_from_slice(g.tokens);
            if g.cells.is_empty() {
                let at = (g.cache.len + g.offset) as i32;
                positions.extend((0..g.tokens.len() as i32).map(|j| at + j));
            } else {
                positions.extend(g.cells.iter().map(|c| (g.cache.len + c) as i32));
            }
            rows.extend(g.outputs.iter().map(|o| (first + o) as i32));
            let t = if g.temperature > 0.0 { g.temperature } else { 1.0 };
            inv_t.extend(std::iter::repeat_n(1.0 / t, g.outputs.len()));
        }
        set(built.tokens, &tokens);
        set(built.positions, &positions);
        for (g, rows) in segments.iter().zip(&built.cell_rows).filter(|(_, r)| !r.is_null()) {
            let cells: Vec<i64> = g.cells.iter().map(|c| (g.cache.len + c) as i64).collect();
            set(*rows, &cells);
        }
        for (g, mask) in segments.iter().zip(&built.chunk_masks).filter(|(_, m)| !m.is_null()) {
            set(*mask, &chunk_mask(g));
        }
        if !built.out_rows.is_null() {
            set(built.out_rows, &rows);
        }
        if !built.bias.is_null() {
            set(built.bias, &self.bias);
            set(built.inv_temperature, &inv_t);
        }
    }

    fn read_outputs(
        &self,
        built: &graph::Built,
        segments: &[Segment<'_>],
        n_out: usize,
        head: Head,
    ) -> Vec<Predictions> {
        let counts = segments.iter().map(|g| g.outputs.len());
        if n_out == 0 {
            return counts.map(|_| Predictions::Logits(Vec::new())).collect();
        }
        match head {
            Head::Logits => {
                let n_vocab = self.weights.shape.n_vocab;
                // SAFETY: the logits tensor is `[n_vocab, n_out]` F32, computed and contiguous.
                let all: Vec<f32> = unsafe { get(built.logits, n_vocab * n_out) };
                let mut rows = all.chunks(n_vocab).map(<[f32]>::to_vec);
                counts
                    .map(|c| Predictions::Logits(rows.by_ref().take(c).collect()))
                    .collect()
            }
            Head::TopK { k, .. } => {
                // SAFETY: ids `[k, n_out]` I32, probabilities `[1, k, n_out]` F32 and the negated
                // entropies `[1, n_out]` F32 are computed, contiguous outputs.
                let (ids, probs, neg_h): (Vec<i32>, Vec<f32>, Vec<f32>) = unsafe {
                    (
                        get(built.top_ids, k * n_out),
                        get(built.top_probs, k * n_out),
                        if built.neg_entropy.is_null() {
                            vec![f32::NAN; n_out]
                        } else {
                            get(built.neg_entropy, n_out)
                        },
                    )
                };
                let mut rows = (0..n_out).map(|r| {
                    // ggml's top-k leaves the k entries unordered.
                    let mut pairs: Vec<(i32, f32)> = (0..k).map(|j| (ids[r * k + j], probs[r * k + j])).collect();
                    pairs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                    TopK {
                        tokens: pairs.iter().map(|p| p.0).collect(),
                        probs: pairs.iter().map(|p| p.1).collect(),
                        entropy: -neg_h[r],
                    }
                });
                counts
                    .map(|c| Predictions::TopK(rows.by_ref().take(c).collect()))
                    .collect()
            }
        }
    }
}

/// The block-causal mask of a chunked prefill, F16 `[n_kv, tokens]`: row `j` (a token of chunk `c`)
/// is 0 on the cells up to the end of chunk `c` and minus infinity after.
fn chunk_mask(g: &Segment<'_>) -> Vec<u16> {
    const ZERO: u16 = 0x0000;
    const MINUS_INFINITY: u16 = 0xFC00;
    let n = g.tokens.len();
    let n_kv = g.cache.len + g.span;
    let mut mask = vec![ZERO; n_kv * n];
    let mut start = 0;
    for end in g.chunk_ends.iter().copied().chain(std::iter::once(n)) {
        for j in start..end {
            mask[j * n_kv + g.cache.len + end..(j + 1) * n_kv].fill(MINUS_INFINITY);
        }
        start = end;
    }
    mask
}

/// Frees a graph context on drop.
struct Context(*mut sys::ggml_context);

impl Drop for Context {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: created by `ggml_init`, freed once.
            unsafe { sys::ggml_free(self.0) }
        }
    }
}

/// # Safety
/// `t` must be an allocated tensor of exactly `data.len()` elements of `T`'s ggml type.
unsafe fn set<T>(t: *mut sys::ggml_tensor, data: &[T]) {
    sys::ggml_backend_tensor_set(t, data.as_ptr().cast(), 0, std::mem::size_of_val(data));
}

/// # Safety
/// `t` must be a computed, contiguous tensor of at least `n` elements of `T`'s ggml type.
unsafe fn get<T: Default + Clone>(t: *mut sys::ggml_tensor, n: usize) -> Vec<T> {
    let mut out = vec![T::default(); n];
    sys::ggml_backend_tensor_get(t, out.as_mut_ptr().cast(), 0, std::mem::size_of_val(out.as_slice()));
    out
}
