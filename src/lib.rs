//! dllm-chat: a real-time WebSocket chat service for diffusion language models.
//!
//! A reply starts as a row of [MASK] tokens; every denoising step revises the whole reply and the
//! service streams that revision to the client. Conversations live in a session store (Redis in
//! production) so any replica can serve any session.
//!
//! Layout, from the wire inwards:
//! - [`server`]: the port: WebSocket connections, replies, `/health`, `/ready`, `/metrics`,
//!   shutdown. Subsystem errors become wire errors only there.
//! - [`protocol`]: the JSON events of `/v1/chat` and the validation of decode options.
//! - [`sessions`]: conversation history behind the `SessionStore` trait (Redis, in-memory).
//! - [`engine`]: diffusion engines behind the `Engine` trait, unmasking policies, the canvas.
//! - [`models`]: where model files come from, including the built-in random fixture.
//! - [`metrics`]: Prometheus names, buckets and recorder.
//! - [`config`]: settings from the built-in defaults, a file, the environment and flags.
//!
//! Native code (llama.cpp, ggml) runs on engine threads, never on the async runtime; all
//! `unsafe` lives in the `ggml-ext` crate.

pub mod config;
pub mod engine;
pub mod metrics;
pub mod models;
pub mod protocol;
pub mod server;
pub mod sessions;

pub use server::{run, Services};
