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

    /// Makes this cache's committed prefix `source`'s first `len` cells: their keys, values and
    /// tokens, copied exactly. Conversations that start alike (the same system prompt) then
    /// compute that start once.
    pub fn copy_prefix_from(&mut self, source: &KvCache, len: usize) -> Result<(), RuntimeError> {
        if source.model_id != self.model_id {
            return Err(RuntimeError::Cache("the source cache belongs to another model".into()));
        }
        if len > source.len || len > self.capacity {
            return Err(RuntimeError::Cache(format!(
                "{len} cells do not fit: the source holds {}, this cache {} at most",
                source.len, self.capacity
            )));
        }
        let mut staging: Vec<u8> = Vec::new();
        for (to, from) in self.k.iter().zip(&source.k).chain(self.v.iter().zip(&source.v)) {
            // SAFETY: both tensors are allocated in backend buffers, F16 `[n_embd_kv, capacity]`
            // of the same model (same `model_id`, so the same row size `nb[1]`); the first `len`
            // cells are the first `len * nb[1]` bytes of each, inside both capacities (checked
            // above), and `staging` holds that many bytes.
            unsafe {
                let bytes = (**from).nb[1] * len;
                staging.resize(bytes, 0);
                sys::ggml_backend_tensor_get(*from, staging.as_mut_ptr().cast(), 0, bytes);
                sys::ggml_backend_tensor_set(*to, staging.as_ptr().cast(), 0, bytes);
            }
        }
        self.len = len;
        self.tokens.clear();
        self.tokens.extend_from_slice(&source.tokens[..len]);
        Ok(())
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
