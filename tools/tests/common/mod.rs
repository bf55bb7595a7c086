//! What the tools' integration tests share: the random-weight fixture model behind the default
//! engine, and a short fixed-schedule reply.

use std::sync::Arc;

use dllm_chat::config::Config;
use dllm_chat::engine::{self, DecodeOptions, Engine, Schedule, Selection};

/// The test config on the fixture model, with one ggml thread (tests run in parallel).
pub fn fixture_config() -> Config {
    let path = dllm_chat::models::fixture_in(&std::env::temp_dir().join("dllm-chat-tests")).expect("fixture model");
    let mut config = Config::defaults();
    config.model.path = path.display().to_string();
    config.model.context_length = 1024;
    config.model.threads = 1;
    config
}

/// The default engine on `config`'s model.
pub async fn start_engine(config: &Config) -> Arc<dyn Engine> {
    let (settings, path) = (config.engine_settings(), config.model.path.clone().into());
    tokio::task::spawn_blocking(move || engine::start(&settings, path))
        .await
        .unwrap()
        .expect("engine starts")
}

/// Greedy replies of `max_tokens` positions, one per step.
pub fn fixed_options(max_tokens: usize) -> DecodeOptions {
    DecodeOptions {
        max_tokens,
        steps: max_tokens,
        block_length: max_tokens,
        schedule: Schedule::Fixed,
        selection: Selection::Confidence,
        defer_repeats: false,
        temperature: 0.0,
        seed: 0,
        fill_canvas: false,
    }
}
