//! Loading a diffusion GGUF into backend memory: the hyper-parameters from its metadata and every
//! tensor, kept in its stored type (F32, F16, Q8_0, Q4_0, Q4_K, ...) because ggml's matrix
//! multiplication reads them directly.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use llama_cpp_sys_2 as sys;

use super::RuntimeError;

/// `ggml_rope_ext` modes.
const ROPE_NORMAL: i32 = 0;
const ROPE_NEOX: i32 = 2;

/// The diffusion architectures this graph runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// LLaDA: the llama layout (no biases, adjacent-pair RoPE), attention non-causal.
    Llada,
    /// Dream: the qwen2 layout (biased Q/K/V, NEOX RoPE); position `i` is predicted from row `i - 1`.
    Dream,
}

impl Family {
    pub(crate) fn rope_mode(self) -> i32 {
        match self {
            Family::Llada => ROPE_NORMAL,
            Family::Dream => ROPE_NEOX,
        }
    }

    /// How many positions the logits are shifted: row `i` predicts position `i + shift`.
    pub fn logit_shift(self) -> usize {
        match self {
            Family::Llada => 0,
            Family::Dream => 1,
        }
    }
}

/// What the graph needs to know about a loaded model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelShape {
    pub family: Family,
    pub n_vocab: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub n_layer: usize,
    pub context_length: usize,
    pub rope_freq_base: f32,
    pub rms_eps: f32,
    /// `tokenizer.ggml.mask_token_id`, if the file names one.
    pub mask_token: Option<i32>,
    /// Row `i` of the logits predicts position `i + logit_shift`: 1 where the file says
    /// `diffusion.shift_logits = true`, 0 where it says `false`, the family's convention where it
    /// says nothing.
    pub logit_shift: usize,
}

impl ModelShape {
    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }

    pub fn n_embd_kv(&self) -> usize {
        self.head_dim() * self.n_head_kv
    }
}

/// One transformer block's tensors (pointers into the weights context).
pub(crate) struct Layer {
    pub attn_norm: *mut sys::ggml_tensor,
    pub wq: *mut sys::ggml_tensor,
    pub wk: *mut sys::ggml_tensor,
    pub wv: *mut sys::ggml_tensor,
    pub bq: Option<*mut sys::ggml_tensor>,
    pub bk: Option<*mut sys::ggml_tensor>,
    pub bv: Option<*mut sys::ggml_tensor>,
    pub wo: *mut sys::ggml_tensor,
    pub ffn_norm: *mut sys::ggml_tensor,
    pub ffn_gate: *mut sys::ggml_tensor,
    pub ffn_up: *mut sys::ggml_tensor,
    pub ffn_down: *mut sys::ggml_tensor,
}

/// The weights in backend memory.
pub(crate) struct Weights {
    pub shape: ModelShape,
    pub token_embd: *mut sys::ggml_tensor,
    pub output_norm: *mut sys::ggml_tensor,
    pub output: *mut sys::ggml_tensor,
    pub layers: Vec<Layer>,
    ctx: *mut sys::ggml_context,
    buffer: sys::ggml_backend_buffer_t,
    /// Bytes of tensor data.
    pub bytes: usize,
}

impl Drop for Weights {
    fn drop(&mut self) {
        // SAFETY: both were created in `load` and are freed once; the tensors die with them.
        unsafe {
            sys::ggml_backend_buffer_free(self.buffer);
            sys::ggml_free(self.ctx);
        }
    }
}

/// The metadata of an open GGUF file, freed on drop.
struct Gguf(*mut sys::gguf_context);

impl Drop for Gguf {
    fn drop(&mut self) {
        // SAFETY: created by `gguf_init_from_file`, freed once.
        unsafe { sys::gguf_free(self.0) }
    }
}

impl Gguf {
    fn key(&self, name: &str) -> Option<i64> {
        let c = CString::new(name).ok()?;
        // SAFETY: `self.0` is live and `c` NUL-terminated.
        let id = unsafe { sys::gguf_find_key(self.0, c.as_ptr()) };
        (id >= 0).then_some(id)
    }

    fn string(&self, name: &str) -> Option<String> {
        let id = self.key(name)?;
        // SAFETY: `id` is a valid key of this context; the type is checked before reading.
        unsafe {
            if sys::gguf_get_kv_type(self.0, id) != sys::GGUF_TYPE_STRING {
                return None;
            }
            Some(
                CStr::from_ptr(sys::gguf_get_val_str(self.0, id))
                    .to_string_lossy()
                    .into_owned(),
            )
        }
    }

    /// An integer value of any width, or an array's first element (some files store per-layer arrays).
    fn int(&self, name: &str) -> Option<i64> {
        let id = self.key(name)?;
        // SAFETY: `id` is valid; each getter is called only for its own type.
        unsafe {
            let ty = sys::gguf_get_kv_type(self.0, id);
            Some(match ty {
                sys::GGUF_TYPE_UINT8 => sys::gguf_get_val_u8(self.0, id) as i64,
                sys::GGUF_TYPE_INT8 => sys::gguf_get_val_i8(self.0, id) as i64,
                sys::GGUF_TYPE_UINT16 => sys::gguf_get_val_u16(self.0, id) as i64,
                sys::GGUF_TYPE_INT16 => sys::gguf_get_val_i16(self.0, id) as i64,
                sys::GGUF_TYPE_UINT32 => sys::gguf_get_val_u32(self.0, id) as i64,
                sys::GGUF_TYPE_INT32 => sys::gguf_get_val_i32(self.0, id) as i64,
                sys::GGUF_TYPE_UINT64 => sys::gguf_get_val_u64(self.0, id) as i64,
                sys::GGUF_TYPE_INT64 => sys::gguf_get_val_i64(self.0, id),
                sys::GGUF_TYPE_ARRAY
                    if sys::gguf_get_arr_type(self.0, id) == sys::GGUF_TYPE_INT32
                        && sys::gguf_get_arr_n(self.0, id) > 0 =>
                {
                    *(sys::gguf_get_arr_data(self.0, id) as *const i32) as i64
                }
                _ => return None,
            })
        }
    }

    fn float(&self, name: &str) -> Option<f32> {
        let id = self.key(name)?;
        // SAFETY: `id` is valid and the type is checked first.
        unsafe {
            (sys::gguf_get_kv_type(self.0, id) == sys::GGUF_TYPE_FLOAT32).then(|| sys::gguf_get_val_f32(self.0, id))
        }
    }

    fn bool(&self, name: &str) -> Option<bool> {
        let id = self.key(name)?;
        // SAFETY: `id` is valid and the type is checked first.
        unsafe {
            (sys::gguf_get_kv_type(self.0, id) == sys::GGUF_TYPE_BOOL).then(|| sys::gguf_get_val_bool(self.0, id))
        }
    }
}

/// Loads `path` onto `backend`.
pub(crate) fn load(path: &Path, backend: sys::ggml_backend_t) -> Result<Weights, RuntimeError> {
    let fail = |reason: String| RuntimeError::Load {
        path: path.display().to_string(),
        reason,
    };
    let c_path = path
        .to_str()
        .and_then(|s| CString::new(s).ok())
        .ok_or_else(|| fail("the path is not valid UTF-8".into()))?;
    if !path.is_file() {
        return Err(fail("no such file".into()));
    }
    let mut meta: *mut sys::ggml_context = std::ptr::null_mut();
    let params = sys::gguf_init_params {
        no_alloc: true,
        ctx: &mut meta,
    };
    // SAFETY: `c_path` is NUL-terminated; with `no_alloc` ggml creates tensor descriptors in `meta`
    // without data. A null return means the file is not a readable GGUF.
    let raw = unsafe { sys::gguf_init_from_file(c_path.as_ptr(), params) };
    if raw.is_null() {
        return Err(fail("not a readable GGUF file".into()));
    }
    let gguf = Gguf(raw);
    // From here `meta` is owned by the returned `Weights` (or freed on the error paths below).
    let free_meta = |e: RuntimeError| {
        // SAFETY: `meta` came from `gguf_init_from_file` and nothing else holds it yet.
        unsafe { sys::ggml_free(meta) };
        e
    };

    let arch = gguf.string("general.architecture").unwrap_or_default();
    let family = match arch.as_str() {
        "llada" => Family::Llada,
        "dream" => Family::Dream,
        other => return Err(free_meta(RuntimeError::Architecture(other.to_owned()))),
    };
    let tensor = |name: &str| {
        let c = CString::new(name).expect("tensor names have no NUL");
        // SAFETY: `meta` is live; a missing tensor yields null.
        let t = unsafe { sys::ggml_get_tensor(meta, c.as_ptr()) };
        (!t.is_null()).then_some(t)
    };
    let required = |name: &str| tensor(name).ok_or_else(|| fail(format!("missing tensor {name}")));
    let k = |key: &str| format!("{arch}.{key}");
    // A negative count or one past `usize` is as good as missing (never a wrapped, huge size).
    let int = |key: &str| gguf.int(&k(key)).and_then(|v| usize::try_from(v).ok());

    let build = || -> Result<(ModelShape, Vec<Layer>, [*mut sys::ggml_tensor; 3]), RuntimeError> {
        let token_embd = required("token_embd.weight")?;
        let output_norm = required("output_norm.weight")?;
        // Tied embeddings when the file has no separate output matrix.
        let output = tensor("output.weight").unwrap_or(token_embd);
        let n_embd = int("embedding_length").ok_or_else(|| fail(format!("missing {arch}.embedding_length")))?;
        let n_layer = int("block_count").ok_or_else(|| fail(format!("missing {arch}.block_count")))?;
        let n_head = int("attention.head_count").ok_or_else(|| fail(format!("missing {arch}.attention.head_count")))?;
        let n_head_kv = int("attention.head_count_kv").unwrap_or(n_head);
        if n_head == 0 || n_embd % n_head != 0 || n_head_kv == 0 || n_head % n_head_kv != 0 {
            return Err(fail(format!(
                "unsupported head layout: {n_head} heads, {n_head_kv} kv heads, width {n_embd}"
            )));
        }
        // SAFETY: `token_embd` is a tensor descriptor of `meta`.
        let n_vocab = usize::try_from(unsafe { (*token_embd).ne[1] }).unwrap_or(0);
        if n_vocab == 0 {
            return Err(fail("token_embd.weight has no rows".into()));
        }
        let mask_token = match gguf.int("tokenizer.ggml.mask_token_id") {
            None => None,
            Some(m) if (0..n_vocab as i64).contains(&m) => Some(m as i32),
            Some(m) => {
                return Err(fail(format!(
                    "tokenizer.ggml.mask_token_id {m} is not a token (the vocabulary has {n_vocab})"
                )))
            }
        };
        let logit_shift = match gguf.bool(crate::SHIFT_LOGITS_KEY) {
            Some(shift) => usize::from(shift),
            None => family.logit_shift(),
        };
        let shape = ModelShape {
            logit_shift,
            family,
            n_vocab,
            n_embd,
            n_head,
            n_head_kv,
            n_layer,
            context_length: int("context_length").unwrap_or(4096),
            rope_freq_base: gguf.float(&k("rope.freq_base")).unwrap_or(10_000.0),
            rms_eps: gguf.float(&k("attention.layer_norm_rms_epsilon")).unwrap_or(1e-5),
            mask_token,
        };
        // Not `with_capacity(n_layer)`: the count comes from the file, and a missing layer's
        // tensors end the loop with an error long before a huge count matters.
        let mut layers = Vec::new();
        for l in 0..n_layer {
            let w = |n: &str| required(&format!("blk.{l}.{n}.weight"));
            let b = |n: &str| tensor(&format!("blk.{l}.{n}.bias"));
            layers.push(Layer {
                attn_norm: w("attn_norm")?,
                wq: w("attn_q")?,
                wk: w("attn_k")?,
                wv: w("attn_v")?,
                bq: b("attn_q"),
                bk: b("attn_k"),
                bv: b("attn_v"),
                wo: w("attn_output")?,
                ffn_norm: w("ffn_norm")?,
                ffn_gate: w("ffn_gate")?,
                ffn_up: w("ffn_up")?,
                ffn_down: w("ffn_down")?,
            });
        }
        check_shapes(&shape, token_embd, output_norm, output, &layers).map_err(fail)?;
        check_data_fits(path, &gguf).map_err(fail)?;
        Ok((shape, layers, [token_embd, output_norm, output]))
    };
    let (shape, layers, [token_embd, output_norm, output]) = build().map_err(free_meta)?;

    // SAFETY: `meta` holds descriptors only; ggml allocates one backend buffer for all of them.
    let buffer = unsafe { sys::ggml_backend_alloc_ctx_tensors(meta, backend) };
    if buffer.is_null() {
        return Err(free_meta(fail("the backend could not allocate the weights".into())));
    }
    // SAFETY: `buffer` was just allocated.
    unsafe { sys::ggml_backend_buffer_set_usage(buffer, sys::GGML_BACKEND_BUFFER_USAGE_WEIGHTS) };
    let weights = Weights {
        shape,
        token_embd,
        output_norm,
        output,
        layers,
        ctx: meta,
        buffer,
        bytes: 0,
    };
    read_tensor_data(path, &gguf, weights)
}

/// The dimensions of `t` (ggml order, innermost first), trailing 1s dropped.
fn dims(t: *mut sys::ggml_tensor) -> Vec<i64> {
    // SAFETY: `t` is a live tensor descriptor.
    let mut ne = unsafe { (*t).ne }.to_vec();
    while ne.len() > 1 && ne[ne.len() - 1] == 1 {
        ne.pop();
    }
    ne
}

/// Every tensor the graph uses has the shape the hyper-parameters imply, so a file whose
/// metadata and tensors disagree is refused here instead of failing a ggml assertion (an abort)
/// when the first graph is built.
fn check_shapes(
    shape: &ModelShape,
    token_embd: *mut sys::ggml_tensor,
    output_norm: *mut sys::ggml_tensor,
    output: *mut sys::ggml_tensor,
    layers: &[Layer],
) -> Result<(), String> {
    let as_i64 = |v: usize| i64::try_from(v).map_err(|_| format!("dimension {v} is too large"));
    let (e, kv, vocab) = (
        as_i64(shape.n_embd)?,
        as_i64(shape.n_embd_kv())?,
        as_i64(shape.n_vocab)?,
    );
    let expect = |name: &str, t: *mut sys::ggml_tensor, want: &[i64]| {
        let got = dims(t);
        if got == want {
            Ok(())
        } else {
            Err(format!(
                "tensor {name} has shape {got:?}, the metadata implies {want:?}"
            ))
        }
    };
    expect("token_embd.weight", token_embd, &[e, vocab])?;
    expect("output_norm.weight", output_norm, &[e])?;
    expect("output.weight", output, &[e, vocab])?;
    for (l, layer) in layers.iter().enumerate() {
        let name = |n: &str| format!("blk.{l}.{n}");
        // The feed-forward width is not needed elsewhere; take it from the gate and hold the
        // other two to it.
        let ff = dims(layer.ffn_gate).get(1).copied().unwrap_or(0);
        if ff <= 0 {
            return Err(format!("tensor {} has no rows", name("ffn_gate.weight")));
        }
        expect(&name("attn_norm.weight"), layer.attn_norm, &[e])?;
        expect(&name("attn_q.weight"), layer.wq, &[e, e])?;
        expect(&name("attn_k.weight"), layer.wk, &[e, kv])?;
        expect(&name("attn_v.weight"), layer.wv, &[e, kv])?;
        expect(&name("attn_output.weight"), layer.wo, &[e, e])?;
        expect(&name("ffn_norm.weight"), layer.ffn_norm, &[e])?;
        expect(&name("ffn_gate.weight"), layer.ffn_gate, &[e, ff])?;
        expect(&name("ffn_up.weight"), layer.ffn_up, &[e, ff])?;
        expect(&name("ffn_down.weight"), layer.ffn_down, &[ff, e])?;
        for (n, bias, width) in [
            ("attn_q", layer.bq, e),
            ("attn_k", layer.bk, kv),
            ("attn_v", layer.bv, kv),
        ] {
            if let Some(b) = bias {
                expect(&name(&format!("{n}.bias")), b, &[width])?;
            }
        }
    }
    Ok(())
}

/// Every tensor's data lies inside the file, so the backend buffer (allocated from the sizes the
/// file claims) is never larger than the file itself.
fn check_data_fits(path: &Path, gguf: &Gguf) -> Result<(), String> {
    let file_len = std::fs::metadata(path).map_err(|e| e.to_string())?.len();
    // SAFETY: `gguf.0` is live; every index is below `gguf_get_n_tensors`.
    unsafe {
        let data_offset = sys::gguf_get_data_offset(gguf.0) as u64;
        for i in 0..sys::gguf_get_n_tensors(gguf.0) {
            let offset = sys::gguf_get_tensor_offset(gguf.0, i) as u64;
            let size = sys::gguf_get_tensor_size(gguf.0, i) as u64;
            let end = data_offset.checked_add(offset).and_then(|s| s.checked_add(size));
            if end.is_none_or(|end| end > file_len) {
                let name = CStr::from_ptr(sys::gguf_get_tensor_name(gguf.0, i)).to_string_lossy();
                return Err(format!(
                    "tensor {name:?} claims {size} bytes at offset {offset}, past the end of the file ({file_len} bytes)"
                ));
            }
        }
    }
    Ok(())
}

/// Copies every tensor's bytes from the file into its backend memory.
fn read_tensor_data(path: &Path, gguf: &Gguf, mut weights: Weights) -> Result<Weights, RuntimeError> {
    let fail = |reason: String| RuntimeError::Load {
        path: path.display().to_string(),
        reason,
    };
    let mut file = File::open(path).map_err(|e| fail(e.to_string()))?;
    // SAFETY: `gguf.0` is live.
    let (n_tensors, data_offset) = unsafe { (sys::gguf_get_n_tensors(gguf.0), sys::gguf_get_data_offset(gguf.0)) };
    let mut bytes = Vec::new();
    for i in 0..n_tensors {
        // SAFETY: `i` is a valid tensor index; the name is NUL-terminated and lives with `gguf`.
        let (name, offset) = unsafe {
            (
                sys::gguf_get_tensor_name(gguf.0, i),
                sys::gguf_get_tensor_offset(gguf.0, i),
            )
        };
        // SAFETY: every GGUF tensor has a descriptor of the same name in the weights context.
        let t = unsafe { sys::ggml_get_tensor(weights.ctx, name) };
        if t.is_null() {
            continue;
        }
        // SAFETY: `t` is a live descriptor.
        let size = unsafe { sys::ggml_nbytes(t) };
        bytes.resize(size, 0);
        let start = (data_offset as u64)
            .checked_add(offset as u64)
            .ok_or_else(|| fail(format!("tensor offset {offset} overflows")))?;
        file.seek(SeekFrom::Start(start))
            .and_then(|_| file.read_exact(&mut bytes))
            .map_err(|e| fail(format!("reading tensor data: {e}")))?;
        // SAFETY: `t` is allocated in the weights buffer with exactly `size` bytes.
        unsafe { sys::ggml_backend_tensor_set(t, bytes.as_ptr().cast(), 0, size) };
        weights.bytes += size;
    }
    Ok(weights)
}
