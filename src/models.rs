//! Where model files come from: a GGUF path, or `builtin:fixture`, a small random-weight LLaDA
//! model written on first use so the service runs on a fresh machine with nothing downloaded.

use std::path::{Path, PathBuf};

use ggml_ext::fixture::{write_llada_fixture, FixtureSpec};

/// The model path value that selects the built-in fixture.
pub const BUILTIN_FIXTURE: &str = "builtin:fixture";

/// Errors from resolving a model path.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model file {0:?} does not exist")]
    Missing(PathBuf),
    #[error("the built-in fixture model could not be written to {path:?}: {reason}")]
    Fixture { path: PathBuf, reason: String },
}

/// Turns `model.path` into a file on disk.
pub fn resolve(path: &str) -> Result<PathBuf, ModelError> {
    if path == BUILTIN_FIXTURE {
        let dir = std::env::temp_dir().join("dllm-chat");
        return fixture_in(&dir);
    }
    let path = PathBuf::from(path);
    if path.is_file() {
        Ok(path)
    } else {
        Err(ModelError::Missing(path))
    }
}

/// Writes the default fixture into `dir` unless it is there already. The file is written under
/// a temporary name and renamed, so concurrent processes never load a half-written file.
pub fn fixture_in(dir: &Path) -> Result<PathBuf, ModelError> {
    let path = dir.join("fixture-llada-v1.gguf");
    if path.is_file() {
        return Ok(path);
    }
    let fail = |reason: String| ModelError::Fixture {
        path: path.clone(),
        reason,
    };
    std::fs::create_dir_all(dir).map_err(|e| fail(e.to_string()))?;
    let tmp = dir.join(format!(".fixture-{}.gguf", uuid::Uuid::new_v4().simple()));
    write_llada_fixture(&tmp, &FixtureSpec::default()).map_err(|e| fail(e.to_string()))?;
    std::fs::rename(&tmp, &path).map_err(|e| fail(e.to_string()))?;
    Ok(path)
}
