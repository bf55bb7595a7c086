//! One conversation's attention keys and values in backend memory.
//!
//! Cells `0..len` hold the *committed* prefix (system prompt, history, new user turn), appended
//! chunk by chunk. Cells after `len` are scratch for the reply: each evaluation writes the K/V of the
//! tokens it computes there, so a later evaluation can attend to them without recomputing them
//! (that is the dual cache: the masked suffix's K/V, refreshed at block boundaries).
//!
//! Keys and values are stored as F16 `[n_embd_kv, capacity]` (one cell per column), the layout and
//! type llama.cpp's flash attention reads.

use llama_cpp_sys_2 as sys;

use super::weights::ModelShape;
use super::RuntimeError;

/// The cache of one conversation. Made by [`DiffusionModel::new_cache`](super::DiffusionModel::new_cache)
/// and only usable with that model.
pub struct KvCache {
    pub(crate) model_id: u64,
    pub(crate) k: Vec<*mut sys::ggml_tensor>,
    pub(crate) v: Vec<*mut sys::ggml_tensor>,
    pub(crate) capacity: usize,
    pub(crate) len: usize,
    /// The committed tokens, so a later turn can tell whether its prompt extends them.
    pub(crate) tokens: Vec<i32>,
    ctx: *mut sys::ggml_context,
    buffer: sys::ggml_backend_buffer_t,
}

// SAFETY: the cache is a backend buffer plus descriptors with no thread affinity; `&mut` access is
// required for every use, so moving it between threads cannot race.
unsafe impl Send for KvCache {}

impl KvCache {
    pub(crate) fn new(
        model_id: u64,
        shape: &ModelShape,
        capacity: usize,
        backend: sys::ggml_backend_t,
    ) -> Result<Self, RuntimeError> {
        let n_layer = shape.n_layer;
        let params = sys::ggml_init_params {
            // SAFETY: pure size computation.
            mem_size: 2 * n_layer * unsafe { sys::ggml_tensor_overhead() },
            mem_buffer: std::ptr::null_mut(),
            no_alloc: true,
        };
        // SAFETY: `no_alloc` context for descriptors only; null is handled.
        let ctx = unsafe { sys::ggml_init(params) };
        if ctx.is_null() {
            return Err(RuntimeError::Alloc("cache descriptors".into()));
        }
        let kv = shape.n_embd_kv() as i64;
        let (mut k, mut v) = (Vec::with_capacity(n_layer), Vec::with_capacity(n_layer));
        for _ in 0..n_layer {
            // SAFETY: `ctx` has room for 2 * n_layer descriptors.
            unsafe {
                k.push(sys::ggml_new_tensor_2d(ctx, sys::GGML_TYPE_F16, kv, capacity as i64));
                v.push(sys::ggml_new_tensor_2d(ctx, sys::GGML_TYPE_F16, kv, capacity as i64));
            }
        }
        // SAFETY: allocates every descriptor of `ctx` in one buffer of `backend`.
        let buffer = unsafe { sys::ggml_backend_alloc_ctx_tensors(ctx, backend) };
        if buffer.is_null() {
            // SAFETY: `ctx` is not referenced elsewhere.
            unsafe { sys::ggml_free(ctx) };
            let bytes = 2 * n_layer * kv as usize * capacity * 2;
            return Err(RuntimeError::Alloc(format!("a {bytes}-byte KV cache")));
        }
        Ok(Self {
            model_id,
            k,
            v,
            capacity,
            len: 0,
            tokens: Vec::new(),
            ctx,
            buffer,
        })
    }

    /// Cells the cache holds in all (prefix and scratch).
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Committed prefix length.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The committed tokens.
    pub fn tokens(&self) -> &[i32] {
        &self.tokens
    }

    /// Forgets everything, keeping the memory for the next conversation.
    pub fn clear(&mut self) {
        self.len = 0;
        self.tokens.clear();
    }

    /// Drops the committed prefix after `len` tokens (cells past it become scratch).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
        self.tokens.truncate(self.len);
    }
}

impl Drop for KvCache {
    fn drop(&mut self) {
        // SAFETY: created in `new`, freed once; descriptors die with their context.
        unsafe {
            sys::ggml_backend_buffer_free(self.buffer);
            sys::ggml_free(self.ctx);
        }
    }
}
