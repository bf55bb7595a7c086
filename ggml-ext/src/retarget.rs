//! Rewriting a GGUF model under another architecture name, weights untouched.
//!
//! A LLaDA model is llama.cpp's `llama` graph with non-causal attention, but llama.cpp keeps a KV
//! cache only for `llama`. The same weights written as `llama` and run with non-causal attention
//! therefore give the LLaDA function *with* a KV cache, which is what the prefix-cache engine
//! runs. Quantized tensors are copied byte for byte.

use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};

use crate::model::KeyValue;
use llama_cpp_sys_2 as sys;

#[derive(Debug, thiserror::Error)]
pub enum RetargetError {
    #[error("path {0:?} is not valid UTF-8 or contains a NUL byte")]
    BadPath(PathBuf),
    #[error("{0:?} is not a readable GGUF file")]
    Read(PathBuf),
    #[error("{path:?} has architecture {found:?}, expected {expected:?}")]
    Architecture {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error("key {0:?} has a type this tool does not copy")]
    KeyType(String),
    #[error("ggml failed to write {0:?}")]
    Write(PathBuf),
}

fn c_path(p: &Path) -> Result<CString, RetargetError> {
    p.to_str()
        .and_then(|s| CString::new(s).ok())
        .ok_or_else(|| RetargetError::BadPath(p.to_owned()))
}

/// Owns what `gguf_init_from_file` returns: the metadata and the ggml context with the tensors.
struct Loaded {
    gguf: *mut sys::gguf_context,
    tensors: *mut sys::ggml_context,
}

impl Drop for Loaded {
    fn drop(&mut self) {
        // SAFETY: both were created by `gguf_init_from_file` and are freed once.
        unsafe {
            sys::gguf_free(self.gguf);
            if !self.tensors.is_null() {
                sys::ggml_free(self.tensors);
            }
        }
    }
}

/// Writes `output`: the model `input` (architecture `from`) under architecture `to`, with every
/// `from.*` hyper-parameter copied as `to.*`.
pub fn retarget(input: &Path, output: &Path, from: &str, to: &str) -> Result<(), RetargetError> {
    let (c_in, c_out) = (c_path(input)?, c_path(output)?);
    let mut tensors: *mut sys::ggml_context = std::ptr::null_mut();
    let params = sys::gguf_init_params {
        no_alloc: false,
        ctx: &mut tensors,
    };
    // SAFETY: the path is NUL-terminated; on success gguf allocates `tensors` and loads every
    // tensor's data into it; both are owned by `Loaded` from here on.
    let gguf = unsafe { sys::gguf_init_from_file(c_in.as_ptr(), params) };
    if gguf.is_null() {
        return Err(RetargetError::Read(input.to_owned()));
    }
    let src = Loaded { gguf, tensors };
    let prefix = format!("{from}.");
    let dst = crate::gguf::OwnedGguf::new();
    // SAFETY: `src.gguf` is a live context; every key id is below `gguf_get_n_kv`; strings
    // returned by gguf stay valid while `src` lives; `dst` copies what it is given.
    unsafe {
        sys::gguf_set_kv(dst.0, src.gguf);
        for id in 0..sys::gguf_get_n_kv(src.gguf) {
            let key = CStr::from_ptr(sys::gguf_get_key(src.gguf, id))
                .to_string_lossy()
                .into_owned();
            if key == "general.architecture" {
                // `gguf_get_val_str` asserts (aborts) on a value of another type.
                if sys::gguf_get_kv_type(src.gguf, id) != sys::GGUF_TYPE_STRING {
                    return Err(RetargetError::KeyType(key));
                }
                let found = CStr::from_ptr(sys::gguf_get_val_str(src.gguf, id))
                    .to_string_lossy()
                    .into_owned();
                if found != from {
                    return Err(RetargetError::Architecture {
                        path: input.to_owned(),
                        found,
                        expected: from.to_owned(),
                    });
                }
                let arch = CString::new(to).map_err(|_| RetargetError::KeyType(key.clone()))?;
                sys::gguf_set_val_str(dst.0, c"general.architecture".as_ptr(), arch.as_ptr());
                continue;
            }
            let Some(rest) = key.strip_prefix(&prefix) else {
                continue;
            };
            let new_key = CString::new(format!("{to}.{rest}")).map_err(|_| RetargetError::KeyType(key.clone()))?;
            let k = new_key.as_ptr();
            match sys::gguf_get_kv_type(src.gguf, id) {
                sys::GGUF_TYPE_UINT32 => sys::gguf_set_val_u32(dst.0, k, sys::gguf_get_val_u32(src.gguf, id)),
                sys::GGUF_TYPE_INT32 => sys::gguf_set_val_i32(dst.0, k, sys::gguf_get_val_i32(src.gguf, id)),
                sys::GGUF_TYPE_FLOAT32 => sys::gguf_set_val_f32(dst.0, k, sys::gguf_get_val_f32(src.gguf, id)),
                sys::GGUF_TYPE_BOOL => sys::gguf_set_val_bool(dst.0, k, sys::gguf_get_val_bool(src.gguf, id)),
                _ => return Err(RetargetError::KeyType(key)),
            }
        }
        // The ggml context also holds the file's data blob; copy only the named model tensors.
        for id in 0..sys::gguf_get_n_tensors(src.gguf) {
            let t = sys::ggml_get_tensor(src.tensors, sys::gguf_get_tensor_name(src.gguf, id));
            if t.is_null() {
                return Err(RetargetError::Read(input.to_owned()));
            }
            sys::gguf_add_tensor(dst.0, t);
        }
        if !sys::gguf_write_to_file(dst.0, c_out.as_ptr(), false) {
            return Err(RetargetError::Write(output.to_owned()));
        }
    }
    Ok(())
}

/// Writes `output`: the model `input` with `key` set to `value` (added after the other keys, or
/// replaced where the file has it), every other key and every tensor (quantized ones byte for
/// byte) copied unchanged. Adds metadata to a shipped file without re-exporting it.
pub fn set_key(input: &Path, output: &Path, key: &str, value: KeyValue) -> Result<(), RetargetError> {
    let (c_in, c_out) = (c_path(input)?, c_path(output)?);
    let c_key = CString::new(key).map_err(|_| RetargetError::KeyType(key.to_owned()))?;
    let mut tensors: *mut sys::ggml_context = std::ptr::null_mut();
    let params = sys::gguf_init_params {
        no_alloc: false,
        ctx: &mut tensors,
    };
    // SAFETY: as in `retarget`: the path is NUL-terminated, and on success both contexts are owned
    // by `Loaded`.
    let gguf = unsafe { sys::gguf_init_from_file(c_in.as_ptr(), params) };
    if gguf.is_null() {
        return Err(RetargetError::Read(input.to_owned()));
    }
    let src = Loaded { gguf, tensors };
    let dst = crate::gguf::OwnedGguf::new();
    // SAFETY: `src` is live for the whole block; `gguf_set_kv` copies every key of `src.gguf`
    // into `dst`, and the setters copy the NUL-terminated key; the tensors added point into
    // `src.tensors`, which outlives the write.
    unsafe {
        sys::gguf_set_kv(dst.0, src.gguf);
        match value {
            KeyValue::Bool(v) => sys::gguf_set_val_bool(dst.0, c_key.as_ptr(), v),
            KeyValue::U32(v) => sys::gguf_set_val_u32(dst.0, c_key.as_ptr(), v),
        }
        for id in 0..sys::gguf_get_n_tensors(src.gguf) {
            let t = sys::ggml_get_tensor(src.tensors, sys::gguf_get_tensor_name(src.gguf, id));
            if t.is_null() {
                return Err(RetargetError::Read(input.to_owned()));
            }
            sys::gguf_add_tensor(dst.0, t);
        }
        if !sys::gguf_write_to_file(dst.0, c_out.as_ptr(), false) {
            return Err(RetargetError::Write(output.to_owned()));
        }
    }
    Ok(())
}
