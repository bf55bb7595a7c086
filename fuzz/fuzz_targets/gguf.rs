//! The GGUF reader (`DiffusionModel::load`) on arbitrary bytes: an error, or a model that runs
//! a short prefill; never a panic, an abort or a huge allocation.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use ggml_ext::runtime::{DiffusionModel, RuntimeConfig};
use libfuzzer_sys::fuzz_target;

fn scratch() -> &'static PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| std::env::temp_dir().join(format!("dllm-fuzz-{}.gguf", std::process::id())))
}

fuzz_target!(|data: &[u8]| {
    let path = scratch();
    std::fs::write(path, data).unwrap();
    let Ok(mut model) = DiffusionModel::load(path, RuntimeConfig::default()) else {
        return;
    };
    let n_vocab = model.shape().n_vocab as i32;
    let tokens: Vec<i32> = (0..4).map(|i| i % n_vocab.max(1)).collect();
    if let Ok(mut cache) = model.new_cache(16) {
        let _ = model.prefill(&mut cache, &tokens);
    }
});
