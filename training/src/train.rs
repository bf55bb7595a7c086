//! Supervised fine-tuning data and the training loop for both objectives.
//!
//! Every assistant turn of a training dialog is one example: the prompt is the ChatML render of the system
//! prompt and the turns before it, ending in `<|im_start|>assistant\n` (byte-identical to what llama.cpp's
//! ChatML template renders), and the reply is the assistant's content tokens followed by `<|im_end|>`.
//!
//! - **Diffusion** (LLaDA SFT): the reply is padded with `<|endoftext|>` to [`TrainConfig::reply_len`]
//!   positions. Per example `t ~ U(eps, 1]`; every reply position (padding included) is replaced by
//!   `<|mdm_mask|>` with probability `t`. The loss is the cross-entropy at masked positions weighted by
//!   `1/t`, summed, divided by the reply length and averaged over the batch. Prompt tokens are never masked
//!   and carry no loss; attention is bidirectional over the non-padding keys.
//! - **Autoregressive** twin: causal attention, next-token cross-entropy on the reply up to and including
//!   `<|im_end|>`, averaged over those tokens.
//!
//! Batches are right-padded with `<|endoftext|>`; padded keys are masked out of attention and padded
//! positions out of the loss. Data order, masking and initialisation all derive from one seed.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use candle_core::{Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarMap};
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::corpus::{render_chatml, Dialog, Turn, IM_END, IM_START};
use crate::model::{init_params, log_softmax_last, Batch, ModelConfig, Objective, Transformer};
use crate::tokenizer::{ENDOFTEXT, MASK};

/// The lower bound of the masking ratio `t`.
pub const MIN_MASK_RATIO: f64 = 1e-3;
/// Checkpoint and state file names inside a checkpoint directory.
pub const CHECKPOINT_FILE: &str = "model.safetensors";
pub const STATE_FILE: &str = "state.json";

/// Ids of the four special tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpecialIds {
    pub end_of_text: u32,
    pub im_start: u32,
    pub im_end: u32,
    pub mask: u32,
}

impl SpecialIds {
    pub fn of(tokenizer: &Tokenizer) -> anyhow::Result<Self> {
        let id = |t: &str| {
            tokenizer
                .token_to_id(t)
                .with_context(|| format!("tokenizer has no {t} token"))
        };
        Ok(SpecialIds {
            end_of_text: id(ENDOFTEXT)?,
            im_start: id(IM_START)?,
            im_end: id(IM_END)?,
            mask: id(MASK)?,
        })
    }
}

/// One supervised example.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// System prompt, earlier turns and `<|im_start|>assistant\n`.
    pub prompt: Vec<u32>,
    /// The reply's content tokens and `<|im_end|>`, unpadded.
    pub reply: Vec<u32>,
    /// Loss weight of each reply token: [`TrainConfig::copy_weight`] where the token spells a slot value (an
    /// order number or product the user named), 1 elsewhere.
    pub reply_weights: Vec<f32>,
}

impl Example {
    /// The loss weight of reply position `i`; padding past the reply weighs 1.
    fn weight(&self, i: usize) -> f32 {
        self.reply_weights.get(i).copied().unwrap_or(1.0)
    }
}

/// Turns dialogs into examples, skipping replies longer than `reply_len` (with `<|im_end|>`) and sequences
/// longer than `max_len`. Returns the examples and the number skipped.
pub fn build_examples(
    system: &str,
    dialogs: &[Dialog],
    tokenizer: &Tokenizer,
    reply_len: usize,
    max_len: usize,
    copy_weight: f32,
) -> anyhow::Result<(Vec<Example>, usize)> {
    let ids = SpecialIds::of(tokenizer)?;
    let encode = |text: &str| {
        tokenizer
            .encode(text, false)
            .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))
    };
    let mut examples = Vec::new();
    let mut skipped = 0;
    for dialog in dialogs {
        for (i, turn) in dialog.turns.iter().enumerate() {
            let Turn::Assistant { content } = turn else { continue };
            let mut prompt_text = render_chatml(system, &dialog.turns[..i]);
            prompt_text.push_str(IM_START);
            prompt_text.push_str("assistant\n");
            let prompt = encode(&prompt_text)?.get_ids().to_vec();
            let encoded = encode(content)?;
            let mut reply = encoded.get_ids().to_vec();
            reply.push(ids.im_end);
            if reply.len() > reply_len || prompt.len() + reply_len > max_len {
                skipped += 1;
                continue;
            }
            let slot_spans = slot_spans(content, dialog.turns[..i].last());
            let mut reply_weights: Vec<f32> = encoded
                .get_offsets()
                .iter()
                .map(|&(start, end)| {
                    let copied = slot_spans.iter().any(|span| start < span.end && span.start < end);
                    if copied {
                        copy_weight
                    } else {
                        1.0
                    }
                })
                .collect();
            reply_weights.push(1.0);
            examples.push(Example {
                prompt,
                reply,
                reply_weights,
            });
        }
    }
    Ok((examples, skipped))
}

/// Byte ranges of `reply` that repeat a slot value of the user turn it answers.
fn slot_spans(reply: &str, user: Option<&Turn>) -> Vec<std::ops::Range<usize>> {
    let Some(Turn::User { slots, .. }) = user else {
        return Vec::new();
    };
    ["order", "product"]
        .iter()
        .filter_map(|key| slots.get(*key))
        .flat_map(|value| reply.match_indices(value.as_str()).map(|(at, v)| at..at + v.len()))
        .collect()
}

/// Pads `reply` to `len` with `pad`.
pub fn pad_reply(reply: &[u32], len: usize, pad: u32) -> Vec<u32> {
    let mut out = reply.to_vec();
    out.resize(len, pad);
    out
}

/// The diffusion corruption of one example: `prompt ++ padded reply` with each reply position replaced by
/// `mask` with probability `t`. Returns the noisy sequence and, per position, whether it was masked.
pub fn mask_sequence(
    prompt: &[u32],
    padded_reply: &[u32],
    t: f64,
    mask: u32,
    rng: &mut impl Rng,
) -> (Vec<u32>, Vec<bool>) {
    let mut tokens = prompt.to_vec();
    let mut masked = vec![false; prompt.len()];
    for &tok in padded_reply {
        let m = rng.random::<f64>() < t;
        tokens.push(if m { mask } else { tok });
        masked.push(m);
    }
    (tokens, masked)
}

/// Samples the masking ratio `t ~ U(eps, 1]`.
pub fn sample_ratio(rng: &mut impl Rng) -> f64 {
    MIN_MASK_RATIO + (1.0 - MIN_MASK_RATIO) * (1.0 - rng.random::<f64>())
}

/// A batch ready for the loss: the padded input, the flat (batch * seq) positions that carry loss, their
/// target ids and weights (the loss is `-sum(weight * log p(target))`).
pub struct LossBatch {
    pub batch: Batch,
    pub positions: Vec<u32>,
    pub targets: Vec<u32>,
    pub weights: Vec<f32>,
    /// Tokens in the batch, padding excluded.
    pub tokens: usize,
}

/// Builds the diffusion batch of `examples`: masks drawn from `rng`, redrawn if nothing at all was masked.
pub fn diffusion_batch(
    examples: &[&Example],
    reply_len: usize,
    ids: SpecialIds,
    rng: &mut impl Rng,
    device: &Device,
) -> candle_core::Result<LossBatch> {
    let b = examples.len();
    let padded: Vec<Vec<u32>> = examples
        .iter()
        .map(|e| pad_reply(&e.reply, reply_len, ids.end_of_text))
        .collect();
    let seq = examples.iter().map(|e| e.prompt.len() + reply_len).max().unwrap_or(0);
    loop {
        let mut seqs = Vec::with_capacity(b);
        let (mut positions, mut targets, mut weights) = (Vec::new(), Vec::new(), Vec::new());
        for (bi, (e, reply)) in examples.iter().zip(&padded).enumerate() {
            let t = sample_ratio(rng);
            let (tokens, masked) = mask_sequence(&e.prompt, reply, t, ids.mask, rng);
            for (p, &m) in masked.iter().enumerate() {
                if m {
                    positions.push((bi * seq + p) as u32);
                    targets.push(reply[p - e.prompt.len()]);
                    let position = p - e.prompt.len();
                    weights.push(e.weight(position) / (t * reply_len as f64 * b as f64) as f32);
                }
            }
            seqs.push(tokens);
        }
        if positions.is_empty() {
            continue;
        }
        let tokens = seqs.iter().map(Vec::len).sum();
        return Ok(LossBatch {
            batch: Batch::new(&seqs, ids.end_of_text, device)?,
            positions,
            targets,
            weights,
            tokens,
        });
    }
}

/// Builds the next-token batch of `examples`: `prompt ++ reply`, loss on every reply token.
pub fn autoregressive_batch(examples: &[&Example], ids: SpecialIds, device: &Device) -> candle_core::Result<LossBatch> {
    let seqs: Vec<Vec<u32>> = examples
        .iter()
        .map(|e| [e.prompt.as_slice(), &e.reply].concat())
        .collect();
    let seq = seqs.iter().map(Vec::len).max().unwrap_or(0);
    let (mut positions, mut targets, mut weights) = (Vec::new(), Vec::new(), Vec::new());
    for (bi, e) in examples.iter().enumerate() {
        for (j, &tok) in e.reply.iter().enumerate() {
            positions.push((bi * seq + e.prompt.len() - 1 + j) as u32);
            targets.push(tok);
            weights.push(e.weight(j));
        }
    }
    let total = targets.len() as f32;
    weights.iter_mut().for_each(|w| *w /= total);
    Ok(LossBatch {
        tokens: seqs.iter().map(Vec::len).sum(),
        batch: Batch::new(&seqs, ids.end_of_text, device)?,
        positions,
        targets,
        weights,
    })
}

/// `-sum(weight * log p(target))` over the batch's loss positions.
pub fn loss(model: &Transformer, lb: &LossBatch, causal: bool) -> candle_core::Result<Tensor> {
    let device = lb.batch.tokens.device();
    let hidden = model.hidden(&lb.batch, causal)?;
    let e = model.config().n_embd;
    let flat = hidden.reshape(((), e))?;
    let n = lb.positions.len();
    let rows = flat.index_select(&Tensor::from_slice(&lb.positions, n, device)?, 0)?;
    let logp = log_softmax_last(&model.logits(&rows)?)?;
    let targets = Tensor::from_slice(&lb.targets, (n, 1), device)?;
    let picked = logp.gather(&targets, 1)?.squeeze(1)?;
    let weights = Tensor::from_slice(&lb.weights, n, device)?;
    (picked * weights)?.sum_all()?.neg()
}

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
    /// Reply positions per diffusion example (padding included).
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

/// Named sizes: `tiny` for CI, `small` for the shipped model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    Tiny,
    Small,
}

impl std::str::FromStr for Preset {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tiny" => Ok(Preset::Tiny),
            "small" => Ok(Preset::Small),
            other => Err(format!("unknown preset {other:?} (tiny | small)")),
        }
    }
}

impl Preset {
    /// Dialogs the pipeline generates for this preset.
    pub fn dialogs(self) -> usize {
        match self {
            Preset::Tiny => 300,
            Preset::Small => 20_000,
        }
    }

    /// The tokenizer's vocabulary bound for this preset.
    pub fn vocab_size(self) -> usize {
        match self {
            Preset::Tiny => 1024,
            Preset::Small => 4096,
        }
    }

    pub fn config(self, objective: Objective, vocab_size: usize, seed: u64) -> TrainConfig {
        let (n_embd, n_layer, n_head, n_ff) = match self {
            Preset::Tiny => (64, 2, 2, 128),
            Preset::Small => (256, 4, 4, 704),
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
                batch_size: 16,
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
        }
    }
}

fn unit_weight() -> f32 {
    1.0
}

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
    pub examples: usize,
    pub skipped_examples: usize,
}

impl TrainState {
    pub fn read(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join(STATE_FILE);
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }
}

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

/// One epoch's batches: a seeded shuffle, sorted by length within windows of 32 batches (less padding),
/// then the batches shuffled again.
pub fn epoch_batches(lengths: &[usize], batch_size: usize, rng: &mut impl Rng) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.shuffle(rng);
    let mut batches = Vec::new();
    for window in order.chunks(batch_size * 32) {
        let mut w = window.to_vec();
        w.sort_by_key(|&i| lengths[i]);
        batches.extend(
            w.chunks(batch_size)
                .filter(|c| c.len() == batch_size)
                .map(<[usize]>::to_vec),
        );
    }
    batches.shuffle(rng);
    batches
}

/// Writes the checkpoint and its state atomically (temporary files, then renames).
fn save_checkpoint(dir: &Path, varmap: &VarMap, state: &TrainState) -> anyhow::Result<()> {
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

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct TrainReport {
    pub checkpoint: PathBuf,
    pub state: TrainState,
    pub tokens_per_second: f64,
}

/// Trains `config` on `examples` and writes `out/model.safetensors` and `out/state.json` every
/// `save_every` steps and at the end.
pub fn train(
    config: &TrainConfig,
    examples: &[Example],
    skipped: usize,
    ids: SpecialIds,
    out: &Path,
) -> anyhow::Result<TrainReport> {
    config.model.validate().map_err(anyhow::Error::msg)?;
    if examples.len() < config.batch_size {
        bail!(
            "{} examples are fewer than one batch of {}",
            examples.len(),
            config.batch_size
        );
    }
    let device = Device::Cpu;
    let mut varmap = init_params(&config.model, config.seed, &device)?;
    if let Some(init) = &config.init_from {
        varmap
            .load(init)
            .with_context(|| format!("initialising from {}", init.display()))?;
    }
    let model = Transformer::from_varmap(&config.model, &varmap)?;
    let causal = config.objective.causal();

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
    let mut opt_decay = AdamW::new(decay, params(config.weight_decay))?;
    let mut opt_plain = AdamW::new(no_decay, params(0.0))?;

    let mut data_rng = StdRng::seed_from_u64(config.seed ^ 0x5eed_da7a);
    let mut mask_rng = StdRng::seed_from_u64(config.seed ^ 0x0ba5_c0de);
    let lengths: Vec<usize> = examples
        .iter()
        .map(|e| match config.objective {
            Objective::Diffusion => e.prompt.len() + config.reply_len,
            Objective::Autoregressive => e.prompt.len() + e.reply.len(),
        })
        .collect();

    let mut planned = config.steps;
    let budget = config.max_minutes.map(|m| Duration::from_secs_f64(m * 60.0));
    let bar = ProgressBar::new(planned as u64);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let log = |line: String| {
        if bar.is_hidden() {
            println!("{line}");
        } else {
            bar.println(line);
        }
    };
    log(format!(
        "training {} ({} parameters) on {} examples ({} skipped), batch {}, up to {} steps{}",
        config.objective.name(),
        config.model.parameter_count(),
        examples.len(),
        skipped,
        config.batch_size,
        planned,
        budget.map_or(String::new(), |b| format!(" or {:.1} min", b.as_secs_f64() / 60.0)),
    ));

    let started = Instant::now();
    let mut batches = Vec::new().into_iter();
    let mut smoothed = f64::NAN;
    let mut tokens_seen = 0usize;
    let mut step = 0;
    let state_at = |step: usize, planned: usize, loss: f64, tokens: usize| TrainState {
        config: config.clone(),
        step,
        planned_steps: planned,
        loss,
        tokens_seen: tokens,
        elapsed_seconds: started.elapsed().as_secs_f64(),
        examples: examples.len(),
        skipped_examples: skipped,
    };
    const TIMED_STEPS: usize = 20;
    let mut window_start = Duration::ZERO;
    while step < planned {
        let next = match batches.next() {
            Some(b) => b,
            None => {
                batches = epoch_batches(&lengths, config.batch_size, &mut data_rng).into_iter();
                batches.next().context("no batches")?
            }
        };
        let chosen: Vec<&Example> = next.iter().map(|&i| &examples[i]).collect();
        let lb = match config.objective {
            Objective::Diffusion => diffusion_batch(&chosen, config.reply_len, ids, &mut mask_rng, &device)?,
            Objective::Autoregressive => autoregressive_batch(&chosen, ids, &device)?,
        };
        let lr = learning_rate(config, step, planned);
        opt_decay.set_learning_rate(lr);
        opt_plain.set_learning_rate(lr);
        let loss_t = loss(&model, &lb, causal)?;
        let value = loss_t.to_scalar::<f32>()? as f64;
        if !value.is_finite() {
            bail!("loss is {value} at step {step}");
        }
        let mut grads = loss_t.backward()?;
        if config.grad_clip > 0.0 {
            let mut sq = 0f64;
            for var in &all_vars {
                if let Some(g) = grads.get(var.as_tensor()) {
                    sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
                }
            }
            let norm = sq.sqrt();
            if norm > config.grad_clip {
                let scale = config.grad_clip / norm;
                for var in &all_vars {
                    if let Some(g) = grads.remove(var.as_tensor()) {
                        grads.insert(var.as_tensor(), (g * scale)?);
                    }
                }
            }
        }
        opt_decay.step(&grads)?;
        opt_plain.step(&grads)?;
        step += 1;
        tokens_seen += lb.tokens;
        smoothed = if smoothed.is_nan() {
            value
        } else {
            0.98 * smoothed + 0.02 * value
        };

        let elapsed = started.elapsed();
        if let Some(budget) = budget {
            // Re-plan every few steps from the recent speed (the machine may be shared), so the run
            // fills its budget; the cosine schedule follows the plan.
            if step % TIMED_STEPS == 0 {
                let per_step = (elapsed - window_start).as_secs_f64() / TIMED_STEPS as f64;
                window_start = elapsed;
                let fit = step + ((budget.as_secs_f64() - elapsed.as_secs_f64()).max(0.0) / per_step) as usize;
                let fit = fit.clamp(step, config.steps);
                if fit != planned {
                    planned = fit;
                    bar.set_length(planned as u64);
                    if step == TIMED_STEPS || step % (TIMED_STEPS * 10) == 0 {
                        log(format!(
                            "{per_step:.2} s/step: planning {planned} steps to fit {:.1} min",
                            budget.as_secs_f64() / 60.0
                        ));
                    }
                }
            }
            if elapsed >= budget && step < planned {
                log(format!("time budget reached at step {step}"));
                planned = step;
            }
        }
        let tps = tokens_seen as f64 / elapsed.as_secs_f64().max(1e-9);
        bar.set_position(step as u64);
        bar.set_message(format!("loss {smoothed:.4} lr {lr:.2e} {tps:.0} tok/s"));
        if bar.is_hidden() && (step % 25 == 0 || step == planned) {
            println!(
                "step {step}/{planned} loss {smoothed:.4} (batch {value:.4}) lr {lr:.2e} {tps:.0} tok/s {:.1} min",
                elapsed.as_secs_f64() / 60.0
            );
        }
        if step % config.save_every == 0 && step < planned {
            save_checkpoint(out, &varmap, &state_at(step, planned, smoothed, tokens_seen))?;
        }
    }
    let state = state_at(step, planned, smoothed, tokens_seen);
    save_checkpoint(out, &varmap, &state)?;
    bar.finish();
    let tokens_per_second = tokens_seen as f64 / started.elapsed().as_secs_f64().max(1e-9);
    log(format!(
        "finished {step} steps in {:.1} min: loss {smoothed:.4}, {tokens_per_second:.0} tok/s; wrote {}",
        state.elapsed_seconds / 60.0,
        out.join(CHECKPOINT_FILE).display()
    ));
    Ok(TrainReport {
        checkpoint: out.join(CHECKPOINT_FILE),
        state,
        tokens_per_second,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::corpus::{generate, test_config, Corpus};
    use crate::domain::northwind;
    use crate::tokenizer::{train_on_dialogs, TokenizerConfig};

    const IDS: SpecialIds = SpecialIds {
        end_of_text: 0,
        im_start: 1,
        im_end: 2,
        mask: 3,
    };

    /// A generated Northwind corpus, a tokenizer trained on it and its training examples.
    fn northwind_examples(seed: u64, dialogs: usize) -> (Corpus, Tokenizer, Vec<Example>) {
        let domain = northwind();
        let corpus = generate(&domain, &test_config(seed, dialogs)).unwrap();
        let system = &domain.assistant.system_prompt;
        let config = TokenizerConfig {
            vocab_size: 600,
            min_frequency: 2,
        };
        let tok = train_on_dialogs(system, &corpus.train, &config).unwrap();
        let (examples, _) = build_examples(system, &corpus.train, &tok, 64, 1024, 3.0).unwrap();
        (corpus, tok, examples)
    }

    fn example(prompt: &[u32], reply: &[u32]) -> Example {
        Example {
            prompt: prompt.to_vec(),
            reply: reply.to_vec(),
            reply_weights: vec![1.0; reply.len()],
        }
    }

    #[test]
    fn tokens_that_copy_a_slot_value_weigh_more() {
        let (_, tok, examples) = northwind_examples(9, 200);
        let mut copied_replies = 0;
        for e in &examples {
            assert_eq!(e.reply_weights.len(), e.reply.len());
            let heavy: Vec<u32> = e
                .reply
                .iter()
                .zip(&e.reply_weights)
                .filter(|(_, &w)| w == 3.0)
                .map(|(&t, _)| t)
                .collect();
            if heavy.is_empty() {
                assert!(e.reply_weights.iter().all(|&w| w == 1.0));
                continue;
            }
            copied_replies += 1;
            let heavy_text = tok.decode(&heavy, false).unwrap();
            let prompt_text = tok.decode(&e.prompt, false).unwrap();
            // The heavy tokens spell a value that the conversation so far already contains.
            let value = heavy_text.trim();
            assert!(
                value.starts_with("NW-") || value.split(' ').count() >= 2,
                "{heavy_text:?}"
            );
            assert!(prompt_text.contains(value), "{value:?} is not in the prompt");
        }
        assert!(copied_replies > 20, "{copied_replies}");
        // The diffusion and next-token batches carry the weights.
        let copy = examples.iter().find(|e| e.reply_weights.contains(&3.0)).unwrap();
        let lb = autoregressive_batch(&[copy], IDS, &Device::Cpu).unwrap();
        let max = lb.weights.iter().cloned().fold(0.0, f32::max);
        let min = lb.weights.iter().cloned().fold(f32::MAX, f32::min);
        assert!((max / min - 3.0).abs() < 1e-4);
    }

    #[test]
    fn masking_touches_only_the_reply_and_about_a_t_fraction() {
        let mut rng = StdRng::seed_from_u64(1);
        let prompt: Vec<u32> = (10..40).collect();
        let reply = pad_reply(&[50, 51, 52, 2], 64, 0);
        for &t in &[0.1, 0.5, 0.9] {
            let mut masked_count = 0;
            let trials = 400;
            for _ in 0..trials {
                let (tokens, masked) = mask_sequence(&prompt, &reply, t, IDS.mask, &mut rng);
                assert_eq!(tokens.len(), prompt.len() + reply.len());
                assert_eq!(&tokens[..prompt.len()], prompt.as_slice());
                assert!(masked[..prompt.len()].iter().all(|m| !m));
                for (p, &m) in masked.iter().enumerate().skip(prompt.len()) {
                    let want = if m { IDS.mask } else { reply[p - prompt.len()] };
                    assert_eq!(tokens[p], want);
                }
                masked_count += masked.iter().filter(|&&m| m).count();
            }
            let fraction = masked_count as f64 / (trials * reply.len()) as f64;
            assert!((fraction - t).abs() < 0.02, "t {t}: masked fraction {fraction}");
        }
        for _ in 0..1000 {
            let t = sample_ratio(&mut rng);
            assert!(t > MIN_MASK_RATIO - 1e-12 && t <= 1.0);
        }
    }

    #[test]
    fn diffusion_batch_puts_loss_on_masked_reply_positions_only() {
        let mut rng = StdRng::seed_from_u64(4);
        let a = example(&[1, 7, 8, 9], &[20, 21, 2]);
        let b = example(&[1, 7, 8, 9, 10, 11], &[22, 2]);
        let lb = diffusion_batch(&[&a, &b], 8, IDS, &mut rng, &Device::Cpu).unwrap();
        let seq = 6 + 8;
        let tokens: Vec<Vec<u32>> = lb.batch.tokens.to_vec2().unwrap();
        assert_eq!(tokens[0].len(), seq);
        assert_eq!(lb.batch.valid[0].iter().filter(|&&v| v).count(), 4 + 8);
        assert!(lb.batch.valid[1].iter().all(|&v| v));
        for (&p, &target) in lb.positions.iter().zip(&lb.targets) {
            let (bi, pos) = (p as usize / seq, p as usize % seq);
            let ex = [&a, &b][bi];
            assert!(pos >= ex.prompt.len() && pos < ex.prompt.len() + 8);
            assert_eq!(tokens[bi][pos], IDS.mask);
            assert_eq!(target, pad_reply(&ex.reply, 8, 0)[pos - ex.prompt.len()]);
        }
        assert!(!lb.positions.is_empty());
    }

    #[test]
    fn autoregressive_batch_predicts_each_reply_token_from_the_one_before() {
        let a = example(&[1, 7, 8], &[20, 21, 2]);
        let b = example(&[1, 7], &[22, 2]);
        let lb = autoregressive_batch(&[&a, &b], IDS, &Device::Cpu).unwrap();
        // seq = 6; a: positions 2,3,4 predict 20,21,2; b: positions 6+1, 6+2 predict 22, 2.
        assert_eq!(lb.positions, vec![2, 3, 4, 7, 8]);
        assert_eq!(lb.targets, vec![20, 21, 2, 22, 2]);
        assert!((lb.weights.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }

    #[test]
    fn examples_render_the_prompt_like_chatml_and_end_replies_with_im_end() {
        let (corpus, tok, examples) = northwind_examples(5, 40);
        let assistant_turns: usize = corpus
            .train
            .iter()
            .map(|d| d.turns.iter().filter(|t| matches!(t, Turn::Assistant { .. })).count())
            .sum();
        assert!(examples.len() > assistant_turns / 2);
        let first = &corpus.train[0];
        let ex = &examples[0];
        let prompt = tok.decode(&ex.prompt, false).unwrap();
        let system = &northwind().assistant.system_prompt;
        let want = format!("{}<|im_start|>assistant\n", render_chatml(system, &first.turns[..1]));
        assert_eq!(prompt, want);
        assert_eq!(
            tok.decode(&ex.reply, false).unwrap(),
            format!("{}<|im_end|>", first.turns[1].content())
        );
        assert_eq!(*ex.reply.last().unwrap(), tok.token_to_id(IM_END).unwrap());
    }

    #[test]
    fn learning_rate_warms_up_then_decays() {
        let config = Preset::Tiny.config(Objective::Diffusion, 300, 1);
        assert!(learning_rate(&config, 0, 200) < learning_rate(&config, 10, 200));
        assert!((learning_rate(&config, 19, 200) - config.learning_rate).abs() < 1e-12);
        assert!(learning_rate(&config, 100, 200) < config.learning_rate);
        assert!((learning_rate(&config, 200, 200) - config.learning_rate * config.min_lr_ratio).abs() < 1e-9);
    }

    #[test]
    fn training_is_deterministic_given_the_seed() {
        let domain = northwind();
        let corpus = generate(&domain, &test_config(6, 30)).unwrap();
        let system = &domain.assistant.system_prompt;
        let tok = train_on_dialogs(
            system,
            &corpus.train,
            &TokenizerConfig {
                vocab_size: 400,
                min_frequency: 2,
            },
        )
        .unwrap();
        let ids = SpecialIds::of(&tok).unwrap();
        let (examples, skipped) = build_examples(system, &corpus.train, &tok, 64, 1024, 3.0).unwrap();
        let mut config = Preset::Tiny.config(Objective::Autoregressive, tok.get_vocab_size(true), 3);
        config.model.n_embd = 32;
        config.model.n_ff = 64;
        config.steps = 12;
        config.warmup_steps = 2;
        config.batch_size = 4;
        let dir = std::env::temp_dir().join(format!("dllm-train-test-{}", std::process::id()));
        let a = train(&config, &examples, skipped, ids, &dir.join("a")).unwrap();
        let b = train(&config, &examples, skipped, ids, &dir.join("b")).unwrap();
        assert_eq!(a.state.step, 12);
        assert_eq!(a.state.loss, b.state.loss);
        let wa = std::fs::read(dir.join("a").join(CHECKPOINT_FILE)).unwrap();
        let wb = std::fs::read(dir.join("b").join(CHECKPOINT_FILE)).unwrap();
        assert_eq!(wa, wb);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
