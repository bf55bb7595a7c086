//! A safe writer for GGUF files over ggml's `gguf_*` C API.
//!
//! Values are collected in Rust and handed to ggml only in [`GgufWriter::write`], so the native
//! contexts live for exactly one call and are always freed, even on error.

use std::ffi::{c_char, c_void, CString};
use std::path::Path;

use llama_cpp_sys_2 as sys;

/// Errors from building or writing a GGUF file.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("GGUF key or tensor name {0:?} contains a NUL byte")]
    NulInName(String),
    #[error("GGUF string value for {0:?} contains a NUL byte")]
    NulInValue(String),
    #[error("tensor {name:?}: shape {shape:?} holds {expected} values but {given} were given")]
    ShapeMismatch {
        name: String,
        shape: Vec<usize>,
        expected: usize,
        given: usize,
    },
    #[error("tensor {name:?}: a tensor has 1 to 4 dimensions, {dims} were given")]
    BadRank { name: String, dims: usize },
    #[error("path {0:?} is not valid UTF-8 or contains a NUL byte")]
    BadPath(std::path::PathBuf),
    #[error("ggml could not allocate {0} bytes for the tensors")]
    Alloc(usize),
    #[error("ggml failed to write {0:?}")]
    Write(std::path::PathBuf),
}

enum Value {
    Str(CString),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    StrArray(Vec<CString>),
    I32Array(Vec<i32>),
}

struct Tensor {
    name: CString,
    shape: Vec<usize>,
    data: Vec<f32>,
}

/// Collects metadata and F32 tensors, then writes them as one GGUF file.
///
/// Shapes use ggml's order: `shape[0]` is the innermost (contiguous) dimension, so a matrix that
/// maps `n_in` to `n_out` features has shape `[n_in, n_out]`.
#[derive(Default)]
pub struct GgufWriter {
    kv: Vec<(CString, Value)>,
    tensors: Vec<Tensor>,
}

fn key(name: &str) -> Result<CString, GgufError> {
    CString::new(name).map_err(|_| GgufError::NulInName(name.to_owned()))
}

fn text(name: &str, value: &str) -> Result<CString, GgufError> {
    CString::new(value).map_err(|_| GgufError::NulInValue(name.to_owned()))
}

impl GgufWriter {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn set_str(&mut self, name: &str, value: &str) -> Result<&mut Self, GgufError> {
        let v = Value::Str(text(name, value)?);
        self.kv.push((key(name)?, v));
        Ok(self)
    }

    pub fn set_u32(&mut self, name: &str, value: u32) -> Result<&mut Self, GgufError> {
        self.kv.push((key(name)?, Value::U32(value)));
        Ok(self)
    }

    pub fn set_i32(&mut self, name: &str, value: i32) -> Result<&mut Self, GgufError> {
        self.kv.push((key(name)?, Value::I32(value)));
        Ok(self)
    }

    pub fn set_f32(&mut self, name: &str, value: f32) -> Result<&mut Self, GgufError> {
        self.kv.push((key(name)?, Value::F32(value)));
        Ok(self)
    }

    pub fn set_bool(&mut self, name: &str, value: bool) -> Result<&mut Self, GgufError> {
        self.kv.push((key(name)?, Value::Bool(value)));
        Ok(self)
    }

    pub fn set_str_array<S: AsRef<str>>(&mut self, name: &str, values: &[S]) -> Result<&mut Self, GgufError> {
        let values = values
            .iter()
            .map(|v| text(name, v.as_ref()))
            .collect::<Result<_, _>>()?;
        self.kv.push((key(name)?, Value::StrArray(values)));
        Ok(self)
    }

    pub fn set_i32_array(&mut self, name: &str, values: &[i32]) -> Result<&mut Self, GgufError> {
        self.kv.push((key(name)?, Value::I32Array(values.to_vec())));
        Ok(self)
    }

    /// Adds an F32 tensor; `shape` is in ggml order (innermost first).
    pub fn add_f32(&mut self, name: &str, shape: &[usize], data: Vec<f32>) -> Result<&mut Self, GgufError> {
        if shape.is_empty() || shape.len() > 4 {
            return Err(GgufError::BadRank {
                name: name.to_owned(),
                dims: shape.len(),
            });
        }
        let expected: usize = shape.iter().product();
        if expected != data.len() {
            return Err(GgufError::ShapeMismatch {
                name: name.to_owned(),
                shape: shape.to_vec(),
                expected,
                given: data.len(),
            });
        }
        self.tensors.push(Tensor {
            name: key(name)?,
            shape: shape.to_vec(),
            data,
        });
        Ok(self)
    }

    /// Writes everything collected so far to `path`.
    pub fn write(&self, path: &Path) -> Result<(), GgufError> {
        let c_path = path
            .to_str()
            .and_then(|p| CString::new(p).ok())
            .ok_or_else(|| GgufError::BadPath(path.to_owned()))?;
        let ctx = OwnedGguf::new();
        for (name, value) in &self.kv {
            ctx.set(name, value);
        }

        let data_bytes: usize = self.tensors.iter().map(|t| t.data.len() * 4).sum();
        // SAFETY: `ggml_tensor_overhead` is a pure function.
        let overhead = unsafe { sys::ggml_tensor_overhead() };
        let mem_size = data_bytes + overhead * (self.tensors.len() + 1) + 64 * self.tensors.len();
        let tensors = GgmlContext::new(mem_size).ok_or(GgufError::Alloc(mem_size))?;
        for t in &self.tensors {
            let ne: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
            // SAFETY: the context was sized above for every tensor plus overhead; `ne` holds
            // `shape.len()` (1..=4, checked in `add_f32`) dimensions.
            let tensor = unsafe { sys::ggml_new_tensor(tensors.0, sys::GGML_TYPE_F32, ne.len() as i32, ne.as_ptr()) };
            if tensor.is_null() {
                return Err(GgufError::Alloc(mem_size));
            }
            // SAFETY: `tensor` is a fresh F32 tensor of exactly `data.len()` elements (checked in
            // `add_f32`) whose data buffer the context allocated; the name is NUL-terminated.
            // `gguf_add_tensor` keeps a pointer to the tensor data, which stays alive in
            // `tensors` until after `gguf_write_to_file` below.
            unsafe {
                sys::ggml_set_name(tensor, t.name.as_ptr());
                std::ptr::copy_nonoverlapping(t.data.as_ptr(), (*tensor).data.cast::<f32>(), t.data.len());
                sys::gguf_add_tensor(ctx.0, tensor);
            }
        }
        // SAFETY: both contexts are valid; the path is NUL-terminated.
        let ok = unsafe { sys::gguf_write_to_file(ctx.0, c_path.as_ptr(), false) };
        drop(tensors);
        if ok {
            Ok(())
        } else {
            Err(GgufError::Write(path.to_owned()))
        }
    }
}

/// Owns a `gguf_context` for the duration of one write.
pub(crate) struct OwnedGguf(pub(crate) *mut sys::gguf_context);

impl OwnedGguf {
    pub(crate) fn new() -> Self {
        // SAFETY: `gguf_init_empty` has no preconditions and returns an owned context.
        Self(unsafe { sys::gguf_init_empty() })
    }

    fn set(&self, name: &CString, value: &Value) {
        let k = name.as_ptr();
        // SAFETY: `self.0` is a live context; every pointer handed over points to data that
        // outlives the call, and gguf copies keys, strings and arrays into its own storage.
        unsafe {
            match value {
                Value::Str(s) => sys::gguf_set_val_str(self.0, k, s.as_ptr()),
                Value::U32(v) => sys::gguf_set_val_u32(self.0, k, *v),
                Value::I32(v) => sys::gguf_set_val_i32(self.0, k, *v),
                Value::F32(v) => sys::gguf_set_val_f32(self.0, k, *v),
                Value::Bool(v) => sys::gguf_set_val_bool(self.0, k, *v),
                Value::StrArray(items) => {
                    let ptrs: Vec<*const c_char> = items.iter().map(|s| s.as_ptr()).collect();
                    sys::gguf_set_arr_str(self.0, k, ptrs.as_ptr().cast_mut(), ptrs.len());
                }
                Value::I32Array(items) => sys::gguf_set_arr_data(
                    self.0,
                    k,
                    sys::GGUF_TYPE_INT32,
                    items.as_ptr().cast::<c_void>(),
                    items.len(),
                ),
            }
        }
    }
}

impl Drop for OwnedGguf {
    fn drop(&mut self) {
        // SAFETY: the context was created by `gguf_init_empty` and is freed once.
        unsafe { sys::gguf_free(self.0) }
    }
}

/// Owns a ggml context that allocates tensor data in its own arena.
struct GgmlContext(*mut sys::ggml_context);

impl GgmlContext {
    fn new(mem_size: usize) -> Option<Self> {
        let params = sys::ggml_init_params {
            mem_size,
            mem_buffer: std::ptr::null_mut(),
            no_alloc: false,
        };
        // SAFETY: ggml allocates `mem_size` bytes itself since `mem_buffer` is null.
        let ctx = unsafe { sys::ggml_init(params) };
        (!ctx.is_null()).then_some(Self(ctx))
    }
}

impl Drop for GgmlContext {
    fn drop(&mut self) {
        // SAFETY: created by `ggml_init`, freed once.
        unsafe { sys::ggml_free(self.0) }
    }
}
