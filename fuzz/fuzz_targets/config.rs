//! A config file of arbitrary bytes over the defaults: `Config::load` + `validate` (and what a
//! valid config builds at startup) never panic.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use dllm_chat::chat::Validator;
use dllm_chat::config::Config;
use libfuzzer_sys::fuzz_target;

fn scratch() -> &'static PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| std::env::temp_dir().join(format!("dllm-fuzz-config-{}.toml", std::process::id())))
}

fuzz_target!(|data: &[u8]| {
    let path = scratch();
    std::fs::write(path, data).unwrap();
    if let Ok(config) = Config::load(Some(path)) {
        if config.validate().is_ok() {
            let _ = Validator::new(&config.decode, &config.limits);
            let _ = config.engine_settings();
        }
    }
});
