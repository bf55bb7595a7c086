//! Training-data tooling for small dllm-chat domain models: a seeded dialog generator and a byte-level BPE
//! tokenizer trainer, driven by one domain file per business (`config/domains/*.toml`).
//!
//! Layout:
//! - [`domain`]: the domain file's schema, loading and validation.
//! - [`corpus`]: seeded dialog generation for the train and held-out splits, JSONL I/O, ChatML rendering.
//! - [`tokenizer`]: byte-level BPE training, `tokenizer.json` I/O, and the vocabulary/merges export for GGUF.
//! - [`model`]: the LLaDA / llama transformer in candle, matching llama.cpp's graphs.
//! - [`train`]: supervised examples, the diffusion and autoregressive losses, and the training loop.
//! - [`export`]: checkpoints to GGUF (F32, F16, Q8_0) that llama.cpp loads.
//! - `main.rs`: the `dllm-train` CLI (`corpus`, `tokenizer`, `train`, `export`, `pipeline`).

pub mod corpus;
pub mod domain;
pub mod export;
pub mod model;
pub mod tokenizer;
pub mod train;
