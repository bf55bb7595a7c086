//! The settings of a training run and the named presets that fill them in.
//!
//! A [`TrainConfig`] holds everything a run is told: the objective, the model's shape, the seed, batch size
//! and step count, the optimiser's settings (peak learning rate, schedule floor, warmup, weight decay,
//! gradient clip), the diffusion canvas length, the copy weight, how often to save, an optional time budget
//! and an optional checkpoint to start from. It is stored in every checkpoint's `state.json`. A [`Preset`]
//! (`tiny`, `small`, `medium`) is a named `TrainConfig` for a vocabulary size, plus the corpus and tokenizer
//! sizes the pipeline uses with it.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::model::{ModelConfig, Objective};

/// Shape and optimisation settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub objective: Objective,
    pub model: ModelConfig,
    pub seed: u64,
    pub batch_size: usize,
    pub steps: usize,
    pub learning_rate: f64,
    /// The schedule decays (cosine) to `learning_rate * min_lr_ratio`.
    pub min_lr_ratio: f64,
    pub warmup_steps: usize,
    pub weight_decay: f64,
    /// Global gradient-norm clip (0 disables).
    pub grad_clip: f64,
    /// Most reply positions of a diffusion example: each reply is padded with end tokens to a length drawn
    /// between its own and this. Inference canvases up to this long are what the model knows.
    pub reply_len: usize,
    /// Loss weight of reply tokens that copy an order number or product from the conversation. Copying an
    /// unseen value is the skill the held-out slots test, and those few tokens are easily drowned out.
    #[serde(default = "unit_weight")]
    pub copy_weight: f32,
    pub save_every: usize,
    /// Wall-clock budget; the step count is cut to what fits once the first steps are timed.
    pub max_minutes: Option<f64>,
    /// Start from this checkpoint's weights (same shape) instead of a random initialisation: the
    /// diffusion model adapts its autoregressive twin, as Dream and DiffuLLaMA adapt causal models.
    #[serde(default)]
    pub init_from: Option<PathBuf>,
}

/// Named sizes: `tiny` for CI, `small` for the shipped model, `medium` for a GPU run (`--device cuda`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    Tiny,
    Small,
    Medium,
}

impl std::str::FromStr for Preset {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tiny" => Ok(Preset::Tiny),
            "small" => Ok(Preset::Small),
            "medium" => Ok(Preset::Medium),
            other => Err(format!("unknown preset {other:?} (tiny | small | medium)")),
        }
    }
}

impl Preset {
    /// Dialogs the pipeline generates for this preset.
    pub fn dialogs(self) -> usize {
        match self {
            Preset::Tiny => 300,
            Preset::Small | Preset::Medium => 20_000,
        }
    }

    /// The tokenizer's vocabulary bound for this preset.
    pub fn vocab_size(self) -> usize {
        match self {
            Preset::Tiny => 1024,
            Preset::Small | Preset::Medium => 4096,
        }
    }

    pub fn config(self, objective: Objective, vocab_size: usize, seed: u64) -> TrainConfig {
        let (n_embd, n_layer, n_head, n_ff) = match self {
            Preset::Tiny => (64, 2, 2, 128),
            Preset::Small => (256, 4, 4, 704),
            Preset::Medium => (384, 6, 6, 1024),
        };
        let model = ModelConfig {
            vocab_size,
            n_embd,
            n_layer,
            n_head,
            n_ff,
            context_length: 1024,
            rope_freq_base: 10000.0,
            rms_eps: 1e-5,
            tied_embeddings: false,
        };
        match self {
            Preset::Tiny => TrainConfig {
                objective,
                model,
                seed,
                batch_size: 4,
                steps: 200,
                learning_rate: 3e-3,
                min_lr_ratio: 0.1,
                warmup_steps: 20,
                weight_decay: 0.01,
                grad_clip: 1.0,
                reply_len: 64,
                copy_weight: 3.0,
                save_every: 100,
                max_minutes: None,
                init_from: None,
            },
            Preset::Small => TrainConfig {
                objective,
                model,
                seed,
                batch_size: 8,
                steps: 6000,
                learning_rate: 2e-3,
                min_lr_ratio: 0.1,
                warmup_steps: 100,
                weight_decay: 0.05,
                grad_clip: 1.0,
                reply_len: 64,
                copy_weight: 3.0,
                save_every: 250,
                max_minutes: None,
                init_from: None,
            },
            Preset::Medium => TrainConfig {
                objective,
                model,
                seed,
                batch_size: 32,
                steps: 20_000,
                learning_rate: 1e-3,
                min_lr_ratio: 0.1,
                warmup_steps: 200,
                weight_decay: 0.05,
                grad_clip: 1.0,
                reply_len: 64,
                copy_weight: 3.0,
                save_every: 1000,
                max_minutes: None,
                init_from: None,
            },
        }
    }
}

fn unit_weight() -> f32 {
    1.0
}
