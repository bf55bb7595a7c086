//! dllm-tools: the command-line tools around the dllm-chat service, kept out of the service library.
//!
//! - [`bench`]: side-by-side latency and throughput figures for engines and policies, through the
//!   engine API and through the real server over WebSockets.
//! - [`eval`]: held-out quality evaluation through the real inference paths.
//! - [`load`]: connections held, memory per connection and chat latency under load, on one
//!   replica over loopback.
//! - [`raw_decode`]: llama.cpp's raw greedy decode loop on an autoregressive GGUF (the twin's
//!   eval, and the bench's baseline for the autoregressive engine).
//! - `main.rs`: the `dllm-tools` CLI (`generate`, `eval`, `bench`, `load`).
//!
//! Dialogs are read as `dllm-train`'s corpus types ([`dllm_train::corpus::Dialog`]), the one
//! declaration of the corpus JSONL schema.

pub mod bench;
pub mod eval;
pub mod load;
pub mod raw_decode;
