//! Diffusion extensions over ggml, and the only crate in the workspace with `unsafe` code.
//!
//! The service talks to llama.cpp through `llama-cpp-2`; whatever that crate does not wrap and we
//! need (the `gguf_*` writer today, our own diffusion graph later) is wrapped here once, behind a
//! small safe API, with a `// SAFETY:` note on every unsafe block.
//!
//! Layout:
//! - [`gguf`]: a safe writer for GGUF files (metadata and F32 tensors).
//! - [`fixture`]: small random-weight `llada` models with a real byte-level BPE vocabulary and a
//!   ChatML template, for tests and benchmarks that must not depend on downloaded weights.

pub mod fixture;
pub mod gguf;

pub use fixture::{write_llada_fixture, FixtureSpec};
pub use gguf::{GgufError, GgufWriter};
