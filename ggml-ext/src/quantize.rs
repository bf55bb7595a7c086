//! Re-encoding a GGUF model's weights (F16, Q8_0, Q4_0) with llama.cpp's own quantizer.

use std::ffi::CString;
use std::path::{Path, PathBuf};

use llama_cpp_sys_2 as sys;

/// Target weight encodings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightType {
    F16,
    Q8_0,
    Q4_0,
}

impl WeightType {
    fn ftype(self) -> sys::llama_ftype {
        match self {
            WeightType::F16 => sys::LLAMA_FTYPE_MOSTLY_F16,
            WeightType::Q8_0 => sys::LLAMA_FTYPE_MOSTLY_Q8_0,
            WeightType::Q4_0 => sys::LLAMA_FTYPE_MOSTLY_Q4_0,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum QuantizeError {
    #[error("path {0:?} is not valid UTF-8 or contains a NUL byte")]
    BadPath(PathBuf),
    #[error("llama.cpp could not quantize {input:?} to {output:?} (code {code})")]
    Failed { input: PathBuf, output: PathBuf, code: u32 },
}

fn c_path(p: &Path) -> Result<CString, QuantizeError> {
    p.to_str()
        .and_then(|s| CString::new(s).ok())
        .ok_or_else(|| QuantizeError::BadPath(p.to_owned()))
}

/// Writes `output`: `input` with its weight matrices re-encoded as `weight_type`.
pub fn quantize(input: &Path, output: &Path, weight_type: WeightType, threads: usize) -> Result<(), QuantizeError> {
    let (c_in, c_out) = (c_path(input)?, c_path(output)?);
    // SAFETY: the default parameters are plain data; the paths are NUL-terminated and outlive the
    // call; llama.cpp reads `input` and writes `output` and keeps no pointer afterwards.
    let code = unsafe {
        let mut params = sys::llama_model_quantize_default_params();
        params.ftype = weight_type.ftype();
        params.nthread = threads as i32;
        sys::llama_model_quantize(c_in.as_ptr(), c_out.as_ptr(), &params)
    };
    if code == 0 {
        Ok(())
    } else {
        Err(QuantizeError::Failed {
            input: input.to_owned(),
            output: output.to_owned(),
            code,
        })
    }
}
