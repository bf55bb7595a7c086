//! The checkpoint directory a run writes and reads.
//!
//! A checkpoint directory holds the weights (`model.safetensors`, [`CHECKPOINT_FILE`]) and the run's
//! [`TrainState`] (`state.json`, [`STATE_FILE`]): its config, how far it got and its smoothed loss. Both are
//! written to temporary files and then renamed, so an interrupted save leaves no half-written file.
//! [`init_weights`] starts a run from an earlier checkpoint or from an exported GGUF file.

use std::path::Path;

use anyhow::Context;
use candle_core::Device;
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use super::TrainConfig;
use crate::model::load_gguf;

/// Checkpoint and state file names inside a checkpoint directory.
pub const CHECKPOINT_FILE: &str = "model.safetensors";
pub const STATE_FILE: &str = "state.json";

/// What a checkpoint directory's `state.json` records.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainState {
    pub config: TrainConfig,
    pub step: usize,
    pub planned_steps: usize,
    /// Smoothed training loss at `step`.
    pub loss: f64,
    pub tokens_seen: usize,
    pub elapsed_seconds: f64,
    /// Packed dialogs trained on.
    pub examples: usize,
    /// Replies left out of them (too long, or past the context).
    pub skipped_examples: usize,
    /// The longest prompt trained on, in tokens, this run's and (when it started from an exported
    /// file that records one) the earlier runs'; exports record it as
    /// [`ggml_ext::TRAINED_PROMPT_KEY`].
    #[serde(default)]
    pub trained_prompt_tokens: Option<usize>,
}

impl TrainState {
    pub fn read(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join(STATE_FILE);
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }
}

/// Writes the checkpoint and its state atomically (temporary files, then renames).
pub(super) fn save_checkpoint(dir: &Path, varmap: &VarMap, state: &TrainState) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!("{CHECKPOINT_FILE}.tmp"));
    varmap
        .save(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, dir.join(CHECKPOINT_FILE))?;
    let tmp = dir.join(format!("{STATE_FILE}.tmp"));
    std::fs::write(&tmp, serde_json::to_string_pretty(state)?)?;
    std::fs::rename(&tmp, dir.join(STATE_FILE))?;
    Ok(())
}

/// Sets every parameter from a checkpoint (`model.safetensors`) or from an exported GGUF file (`*.gguf`, any
/// weight type), which must hold a tensor of the same name and shape for each.
pub fn init_weights(varmap: &mut VarMap, path: &Path, device: &Device) -> anyhow::Result<()> {
    if path.extension().is_some_and(|e| e == "gguf") {
        let weights = load_gguf(path, device)?;
        let mut names: Vec<String> = varmap.data().lock().expect("varmap lock").keys().cloned().collect();
        names.sort();
        for name in names {
            let tensor = weights.get(&name).with_context(|| format!("no tensor {name}"))?;
            varmap.set_one(&name, tensor)?;
        }
    } else {
        varmap.load(path)?;
    }
    Ok(())
}
