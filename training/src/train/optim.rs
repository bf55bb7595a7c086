//! How the weights are updated: the learning-rate schedule and AdamW with gradient clipping.
//!
//! [`learning_rate`] warms up linearly over `warmup_steps`, then decays on a cosine to
//! `learning_rate * min_lr_ratio` at the planned last step (the plan can shrink under a time budget, and the
//! schedule follows it). [`Optimiser`] is AdamW (betas 0.9 and 0.95) in two groups, the matrices with weight
//! decay and the norm gains without, stepped after the gradients are clipped to a global norm.

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarMap};

use super::TrainConfig;

/// Learning rate at `step` of `total`: linear warmup, then cosine decay to `min_lr_ratio`.
pub fn learning_rate(config: &TrainConfig, step: usize, total: usize) -> f64 {
    let peak = config.learning_rate;
    if step < config.warmup_steps {
        return peak * (step + 1) as f64 / config.warmup_steps as f64;
    }
    let span = total.saturating_sub(config.warmup_steps).max(1) as f64;
    let progress = ((step - config.warmup_steps) as f64 / span).min(1.0);
    let floor = peak * config.min_lr_ratio;
    floor + (peak - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// AdamW over a model's parameters in two groups, with a global gradient-norm clip.
pub(super) struct Optimiser {
    decay: AdamW,
    plain: AdamW,
    /// Every parameter, the decayed group first, each group by name.
    all_vars: Vec<Var>,
    grad_clip: f64,
}

impl Optimiser {
    /// The optimiser of `varmap`'s parameters with `config`'s learning rate, weight decay and clip.
    pub(super) fn new(varmap: &VarMap, config: &TrainConfig) -> candle_core::Result<Self> {
        // Weight decay on the matrices only, not on the norm gains.
        let (mut decay, mut no_decay): (Vec<Var>, Vec<Var>) = (Vec::new(), Vec::new());
        {
            let data = varmap.data().lock().expect("varmap lock");
            let mut names: Vec<&String> = data.keys().collect();
            names.sort();
            for name in names {
                let var = data[name].clone();
                if name.ends_with("norm.weight") {
                    no_decay.push(var);
                } else {
                    decay.push(var);
                }
            }
        }
        let all_vars: Vec<Var> = decay.iter().chain(&no_decay).cloned().collect();
        let params = |wd: f64| ParamsAdamW {
            lr: config.learning_rate,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: wd,
        };
        let opt_decay = AdamW::new(decay, params(config.weight_decay))?;
        let opt_plain = AdamW::new(no_decay, params(0.0))?;
        Ok(Optimiser {
            decay: opt_decay,
            plain: opt_plain,
            all_vars,
            grad_clip: config.grad_clip,
        })
    }

    pub(super) fn set_learning_rate(&mut self, lr: f64) {
        self.decay.set_learning_rate(lr);
        self.plain.set_learning_rate(lr);
    }

    /// Scales `grads` down to the clip norm if their global norm is above it (a clip of 0 disables this),
    /// then steps both groups.
    pub(super) fn step(&mut self, mut grads: GradStore) -> candle_core::Result<()> {
        if self.grad_clip > 0.0 {
            // One read of the norm per step: on a GPU every read back is a synchronisation.
            let squares = self
                .all_vars
                .iter()
                .filter_map(|var| grads.get(var.as_tensor()))
                .map(|g| g.sqr()?.sum_all())
                .collect::<candle_core::Result<Vec<_>>>()?;
            let norm = (Tensor::stack(&squares, 0)?.sum_all()?.to_scalar::<f32>()? as f64).sqrt();
            if norm > self.grad_clip {
                let scale = self.grad_clip / norm;
                for var in &self.all_vars {
                    if let Some(g) = grads.remove(var.as_tensor()) {
                        grads.insert(var.as_tensor(), (g * scale)?);
                    }
                }
            }
        }
        self.decay.step(&grads)?;
        self.plain.step(&grads)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Objective;
    use crate::train::Preset;

    #[test]
    fn learning_rate_warms_up_then_decays() {
        let config = Preset::Tiny.config(Objective::Diffusion, 300, 1);
        assert!(learning_rate(&config, 0, 200) < learning_rate(&config, 10, 200));
        assert!((learning_rate(&config, 19, 200) - config.learning_rate).abs() < 1e-12);
        assert!(learning_rate(&config, 100, 200) < config.learning_rate);
        assert!((learning_rate(&config, 200, 200) - config.learning_rate * config.min_lr_ratio).abs() < 1e-9);
    }
}
