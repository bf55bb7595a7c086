//! dllm-chat: a real-time WebSocket chat service for diffusion language models.
//!
//! A reply starts as a row of [MASK] tokens; every denoising step revises the whole reply and the
//! service streams that revision to the client. Conversations live in a session store (Redis in
//! production) so any replica can serve any session.
//!
//! Layout, from the wire inwards:
//! - [`server`]: the port: WebSocket connections, `/health`, `/ready`, `/metrics`, shutdown. A
//!   thin translator over [`chat`]; subsystem errors become wire errors only there.
//! - [`protocol`]: the JSON events of `/v1/chat`.
//! - [`chat`]: the conversation core every front end calls: validation, the session lease (one
//!   reply per session across replicas), history -> prompt, every store write, reply streams
//!   that any replica can resume, recovery of replies whose replica died.
//! - [`sessions`]: history, leases and reply logs behind the `SessionStore` trait (Redis,
//!   in-memory).
//! - [`engine`]: diffusion engines behind the `Engine` trait, unmasking policies, the canvas.
//! - [`models`]: where model files come from, including the built-in random fixture.
//! - [`metrics`]: Prometheus names, buckets and recorder.
//! - [`keys`]: API keys: generation, digests, the constant-time check.
//! - [`tickets`]: one-time tickets that let a browser page open an authenticated WebSocket.
//! - [`quotas`]: connection and rate limits per key and per client address, shared by every
//!   replica on the store.
//! - [`config`]: settings from the built-in defaults, a file, the environment and flags.
//! - [`app`]: the composition root that builds all of the above from a [`config::Config`].
//!
//! Native code (llama.cpp, ggml) runs on engine threads, never on the async runtime; all
//! `unsafe` lives in the `ggml-ext` crate.

pub mod app;
pub mod chat;
pub mod config;
pub mod engine;
pub mod keys;
pub mod metrics;
pub mod models;
pub mod protocol;
pub mod quotas;
pub mod server;
pub mod sessions;
pub mod tickets;

pub use server::{bind, run, Services};
