//! Diffusion extensions over ggml, and the only crate in the workspace with `unsafe` code.
//!
//! The service talks to llama.cpp through `llama-cpp-2`; whatever that crate does not wrap and we
//! need (the `gguf_*` writer, the quantizer, our own diffusion graph) is wrapped here once,
//! behind a small safe API, with a `// SAFETY:` note on every unsafe block.
//!
//! Layout:
//! - [`gguf`]: a safe writer for GGUF files (metadata and F32 tensors).
//! - [`model`]: complete model files (hyper-parameters, BPE vocabulary, chat template, weights).
//! - [`quantize`]: F16 / Q8_0 / Q4_0 re-encoding with llama.cpp's quantizer.
//! - [`retarget`]: the same weights under another architecture name (LLaDA as `llama`), or with one
//!   metadata key added.
//! - [`fixture`]: small random-weight `llada` models for tests and benchmarks.
//! - [`runtime`]: our own diffusion forward pass on ggml (weights, per-conversation K/V caches,
//!   batched segments, on-graph top-k), which the service's cached engine runs.

pub mod fixture;
pub mod gguf;
pub mod model;
pub mod quantize;
pub mod retarget;
pub mod runtime;

pub use fixture::{write_llada_fixture, FixtureSpec};
pub use gguf::{GgufError, GgufWriter};
pub use model::{write_model, Architecture, Hyperparams, KeyValue, Vocabulary, SHIFT_LOGITS_KEY, TRAINED_PROMPT_KEY};
pub use quantize::{quantize, QuantizeError, WeightType};
pub use retarget::{retarget, set_key, RetargetError};
