//! What an evaluation of a model costs in arithmetic, and how fast this machine multiplies
//! matrices through ggml, so a benchmark can say how close a denoising step comes to the
//! machine's limit.
//!
//! The count is read from a GGUF's tensor shapes, so it holds for any llama-layout file (a
//! diffusion model or its autoregressive twin): every 2-D `blk.*` matrix is applied to every
//! evaluated token, the output matrix (or the token embedding, when tied) to every output row, and
//! attention pairs every query with every key it sees, once for the scores and once for the values.
//! Norms, rotary embeddings and the softmax are left out: they are a few operations per element,
//! not per weight.

use std::ffi::{CStr, CString};
use std::path::Path;
use std::time::{Duration, Instant};

use llama_cpp_sys_2 as sys;

use super::RuntimeError;

/// A weight matrix: its encoding and dimensions (ggml order: `cols` is the input width).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Matrix {
    /// ggml's name for the encoding, e.g. `q8_0`.
    pub encoding: String,
    ggml_type: sys::ggml_type,
    pub cols: usize,
    pub rows: usize,
}

/// A model's arithmetic, in multiply-adds.
#[derive(Debug, Clone, PartialEq)]
pub struct Arithmetic {
    /// Per evaluated token, summed over the layers' weight matrices.
    pub per_token: f64,
    /// Per output row (the logits' projection).
    pub per_output: f64,
    /// Per (query, key) pair: the attention scores and the weighted values, over all layers.
    pub per_pair: f64,
    /// The largest layer matrix, which [`matmul_rate`] multiplies.
    pub largest: Matrix,
}

impl Arithmetic {
    /// Reads the tensor shapes of the GGUF at `path` (no weights are loaded).
    pub fn of_file(path: &Path) -> Result<Self, RuntimeError> {
        let fail = |reason: &str| RuntimeError::Load {
            path: path.display().to_string(),
            reason: reason.to_owned(),
        };
        let c_path = path
            .to_str()
            .and_then(|s| CString::new(s).ok())
            .ok_or_else(|| fail("the path is not valid UTF-8"))?;
        let mut meta: *mut sys::ggml_context = std::ptr::null_mut();
        let params = sys::gguf_init_params {
            no_alloc: true,
            ctx: &mut meta,
        };
        // SAFETY: `c_path` is NUL-terminated; with `no_alloc` ggml only creates tensor descriptors
        // in `meta`. A null return means the file is not a readable GGUF (and `meta` stays null).
        let gguf = unsafe { sys::gguf_init_from_file(c_path.as_ptr(), params) };
        if gguf.is_null() {
            return Err(fail("not a readable GGUF file"));
        }
        let mut counted = Arithmetic {
            per_token: 0.0,
            per_output: 0.0,
            per_pair: 0.0,
            largest: Matrix {
                encoding: String::new(),
                ggml_type: sys::GGML_TYPE_F32,
                cols: 0,
                rows: 0,
            },
        };
        let (mut output, mut embedding) = (None, None);
        // SAFETY: `gguf` and `meta` are live until freed below; every tensor named in the file has a
        // descriptor in `meta`, and ggml's type names are static strings.
        unsafe {
            for i in 0..sys::gguf_get_n_tensors(gguf) {
                let name = CStr::from_ptr(sys::gguf_get_tensor_name(gguf, i));
                let t = sys::ggml_get_tensor(meta, name.as_ptr());
                if t.is_null() || (*t).ne[2] != 1 || (*t).ne[1] == 1 {
                    continue;
                }
                let matrix = Matrix {
                    encoding: CStr::from_ptr(sys::ggml_type_name((*t).type_))
                        .to_string_lossy()
                        .into_owned(),
                    ggml_type: (*t).type_,
                    cols: (*t).ne[0] as usize,
                    rows: (*t).ne[1] as usize,
                };
                let macs = (matrix.cols * matrix.rows) as f64;
                let name = name.to_string_lossy();
                if name == "output.weight" {
                    output = Some(macs);
                } else if name == "token_embd.weight" {
                    embedding = Some(macs);
                } else if name.starts_with("blk.") {
                    counted.per_token += macs;
                    if name.ends_with(".attn_q.weight") {
                        // Scores and values: one multiply-add per query feature and key, each.
                        counted.per_pair += 2.0 * matrix.rows as f64;
                    }
                    if macs > (counted.largest.cols * counted.largest.rows) as f64 {
                        counted.largest = matrix;
                    }
                }
            }
            sys::gguf_free(gguf);
            sys::ggml_free(meta);
        }
        counted.per_output = output.or(embedding).unwrap_or(0.0);
        if counted.per_token == 0.0 {
            return Err(fail("the file has no layer matrices"));
        }
        Ok(counted)
    }

    /// Floating-point operations (a multiply-add counts two) of evaluating `tokens` tokens that
    /// attend to `keys` cells each and return `outputs` rows of logits.
    pub fn flops(&self, tokens: usize, outputs: usize, keys: usize) -> f64 {
        let (tokens, outputs, keys) = (tokens as f64, outputs as f64, keys as f64);
        2.0 * (tokens * self.per_token + outputs * self.per_output + tokens * keys * self.per_pair)
    }
}

/// This machine's rate, in floating-point operations per second, of ggml's CPU matrix multiply
/// for `matrix` (random weights in its encoding) against `columns` F32 columns on `threads`
/// threads: the fastest of `runs` products, since anything else on the machine only slows one
/// down.
pub fn matmul_rate(matrix: &Matrix, columns: usize, threads: usize, runs: usize) -> Result<f64, RuntimeError> {
    let (cols, rows, columns) = (matrix.cols, matrix.rows, columns.max(1));
    // SAFETY: pure size computations.
    let mem_size = unsafe { 8 * sys::ggml_tensor_overhead() + sys::ggml_graph_overhead() };
    let params = sys::ggml_init_params {
        mem_size,
        mem_buffer: std::ptr::null_mut(),
        no_alloc: true,
    };
    let weights: Vec<f32> = (0..cols * rows)
        .map(|i| ((i * 2_654_435_761) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    let input: Vec<f32> = (0..cols * columns)
        .map(|i| ((i * 40_503) % 1000) as f32 / 1000.0)
        .collect();
    // SAFETY: `ctx` is a descriptor-only context with room for the three tensors and the graph; the
    // backend buffer allocates their data; the weight bytes are encoded by ggml's own quantizer
    // into a buffer of exactly `ggml_row_size * rows` bytes; everything is freed before returning.
    unsafe {
        let ctx = sys::ggml_init(params);
        if ctx.is_null() {
            return Err(RuntimeError::Alloc("the mat-mul context".into()));
        }
        let cpu = sys::ggml_backend_cpu_init();
        if cpu.is_null() {
            sys::ggml_free(ctx);
            return Err(RuntimeError::Device("the CPU backend failed to start".into()));
        }
        sys::ggml_backend_cpu_set_n_threads(cpu, threads.max(1) as i32);
        let w = sys::ggml_new_tensor_2d(ctx, matrix.ggml_type, cols as i64, rows as i64);
        let x = sys::ggml_new_tensor_2d(ctx, sys::GGML_TYPE_F32, cols as i64, columns as i64);
        let y = sys::ggml_mul_mat(ctx, w, x);
        let gf = sys::ggml_new_graph(ctx);
        sys::ggml_build_forward_expand(gf, y);
        let buffer = sys::ggml_backend_alloc_ctx_tensors(ctx, cpu);
        let result = if buffer.is_null() {
            Err(RuntimeError::Alloc("the mat-mul tensors".into()))
        } else {
            let mut encoded = vec![0u8; sys::ggml_row_size(matrix.ggml_type, cols as i64) * rows];
            sys::ggml_quantize_chunk(
                matrix.ggml_type,
                weights.as_ptr(),
                encoded.as_mut_ptr().cast(),
                0,
                rows as i64,
                cols as i64,
                std::ptr::null(),
            );
            sys::ggml_backend_tensor_set(w, encoded.as_ptr().cast(), 0, encoded.len());
            sys::ggml_backend_tensor_set(x, input.as_ptr().cast(), 0, input.len() * 4);
            let mut best = Duration::MAX;
            let mut status = sys::GGML_STATUS_SUCCESS;
            // One unmeasured run first: the threads start and the weights come into cache.
            for _ in 0..=runs.max(1) {
                let started = Instant::now();
                status = sys::ggml_backend_graph_compute(cpu, gf);
                if status != sys::GGML_STATUS_SUCCESS {
                    break;
                }
                best = best.min(started.elapsed());
            }
            sys::ggml_backend_buffer_free(buffer);
            if status != sys::GGML_STATUS_SUCCESS {
                Err(RuntimeError::Compute(status))
            } else {
                Ok(2.0 * (cols * rows * columns) as f64 / best.as_secs_f64().max(1e-12))
            }
        };
        sys::ggml_backend_free(cpu);
        sys::ggml_free(ctx);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixture::{write_llada_fixture, FixtureSpec};

    #[test]
    fn counts_follow_the_tensor_shapes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        let spec = FixtureSpec::default();
        write_llada_fixture(&path, &spec).unwrap();
        let a = Arithmetic::of_file(&path).unwrap();
        let h = &spec.hyperparams;
        let (e, kv, ff) = (h.n_embd as f64, h.n_embd_kv() as f64, h.n_ff as f64);
        let per_layer = e * e * 2.0 + e * kv * 2.0 + e * ff * 3.0;
        assert_eq!(a.per_token, per_layer * h.n_layer as f64);
        let n_vocab = crate::fixture::vocabulary().tokens.len() as f64;
        assert_eq!(a.per_output, e * n_vocab);
        assert_eq!(a.per_pair, 2.0 * e * h.n_layer as f64);
        // The first feed-forward matrix, [n_embd -> n_ff], is the largest (n_ff > n_embd).
        assert_eq!((a.largest.cols, a.largest.rows), (h.n_embd, h.n_ff));
        assert_eq!(a.largest.encoding, "f32");
        // Ten tokens over 30 keys with 3 outputs.
        let flops = 2.0 * (10.0 * a.per_token + 3.0 * a.per_output + 300.0 * a.per_pair);
        assert_eq!(a.flops(10, 3, 30), flops);
    }

    #[test]
    fn the_rate_is_a_measured_positive_figure() {
        let matrix = Matrix {
            encoding: "q8_0".into(),
            ggml_type: sys::GGML_TYPE_Q8_0,
            cols: 256,
            rows: 128,
        };
        let rate = matmul_rate(&matrix, 64, 1, 3).unwrap();
        // 2 * 256 * 128 * 64 operations: a CPU does them in more than a nanosecond and less than
        // a second.
        assert!(rate.is_finite() && rate > 4.2e6 && rate < 4.2e15, "{rate}");
    }
}
