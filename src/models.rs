//! Where model files come from: a GGUF path; `builtin:northwind`, the bundled Northwind support
//! model (`models/northwind-llada-q8_0.gguf`, compiled into the binary and written out on first
//! use); `builtin:northwind-twin`, its autoregressive twin (`models/northwind-llama-q8_0.gguf`);
//! or `builtin:fixture`, a small random-weight LLaDA model for tests that need no meaning. The
//! built-ins let the service run on a fresh machine with nothing downloaded.

use std::path::{Path, PathBuf};

use ggml_ext::fixture::{write_llada_fixture, FixtureSpec};

/// The model path value that selects the built-in fixture.
pub const BUILTIN_FIXTURE: &str = "builtin:fixture";
/// The model path value that selects the bundled Northwind model.
pub const BUILTIN_NORTHWIND: &str = "builtin:northwind";
/// The model path value that selects the bundled model's autoregressive twin.
pub const BUILTIN_NORTHWIND_TWIN: &str = "builtin:northwind-twin";

/// The bundled model's bytes (see `models/README.md`).
const NORTHWIND: &[u8] = include_bytes!("../models/northwind-llada-q8_0.gguf");
/// Its autoregressive twin's: the same corpus, tokenizer and size, trained to predict the next token.
const NORTHWIND_TWIN: &[u8] = include_bytes!("../models/northwind-llama-q8_0.gguf");

/// Errors from resolving a model path.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model file {0:?} does not exist")]
    Missing(PathBuf),
    #[error("the built-in model could not be written to {path:?}: {reason}")]
    Builtin { path: PathBuf, reason: String },
}

/// The name a model goes by in APIs that list models: the built-in's name, else the file's stem.
pub fn display_name(path: &str) -> String {
    if let Some(name) = path.strip_prefix("builtin:") {
        return name.to_owned();
    }
    std::path::Path::new(path)
        .file_stem()
        .map_or_else(|| path.to_owned(), |s| s.to_string_lossy().into_owned())
}

/// Turns `model.path` into a file on disk.
pub fn resolve(path: &str) -> Result<PathBuf, ModelError> {
    let dir = std::env::temp_dir().join("dllm-chat");
    match path {
        BUILTIN_FIXTURE => return fixture_in(&dir),
        BUILTIN_NORTHWIND => return northwind_in(&dir),
        BUILTIN_NORTHWIND_TWIN => return bundled_in(&dir, "northwind-llama-q8_0", NORTHWIND_TWIN),
        _ => {}
    }
    let path = PathBuf::from(path);
    if path.is_file() {
        Ok(path)
    } else {
        Err(ModelError::Missing(path))
    }
}

/// Writes the default fixture into `dir` unless it is there already.
pub fn fixture_in(dir: &Path) -> Result<PathBuf, ModelError> {
    write_once(&dir.join("fixture-llada-v1.gguf"), |tmp| {
        write_llada_fixture(tmp, &FixtureSpec::default()).map_err(|e| e.to_string())
    })
}

/// Writes the bundled Northwind model into `dir` unless this exact file is there already (the name
/// carries its size and a hash of its bytes, so a rebuilt binary never serves an older model).
pub fn northwind_in(dir: &Path) -> Result<PathBuf, ModelError> {
    bundled_in(dir, "northwind-llada-q8_0", NORTHWIND)
}

/// Writes a bundled model's `bytes` into `dir` as `stem-SIZE-HASH.gguf` unless it is there.
fn bundled_in(dir: &Path, stem: &str, bytes: &[u8]) -> Result<PathBuf, ModelError> {
    let mut hasher = std::hash::DefaultHasher::new();
    std::hash::Hash::hash(bytes, &mut hasher);
    let name = format!(
        "{stem}-{}-{:016x}.gguf",
        bytes.len(),
        std::hash::Hasher::finish(&hasher)
    );
    write_once(&dir.join(name), |tmp| {
        std::fs::write(tmp, bytes).map_err(|e| e.to_string())
    })
}

/// Creates `path` with `write` unless it exists. The file is written under a temporary name and
/// renamed, so concurrent processes never load a half-written file.
fn write_once(path: &Path, write: impl FnOnce(&Path) -> Result<(), String>) -> Result<PathBuf, ModelError> {
    if path.is_file() {
        return Ok(path.to_owned());
    }
    let fail = |reason: String| ModelError::Builtin {
        path: path.to_owned(),
        reason,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| fail(e.to_string()))?;
    let tmp = dir.join(format!(".{}.tmp", uuid::Uuid::new_v4().simple()));
    write(&tmp).map_err(fail)?;
    std::fs::rename(&tmp, path).map_err(|e| fail(e.to_string()))?;
    Ok(path.to_owned())
}
