//! Supervised fine-tuning data and the training loop for both objectives.
//!
//! A training dialog is one packed example: per assistant turn, the tokens since the previous reply (the
//! system prompt or the `\n` after `<|im_end|>`, the user turn, `<|im_start|>assistant\n`; byte-identical
//! to what llama.cpp's ChatML template renders) and the reply (content tokens and `<|im_end|>`). Every reply
//! trains in the one sequence; one example per reply would repeat the history each time, which made up most
//! of the tokens of a multi-turn dialog.
//!
//! - **Diffusion** (LLaDA SFT): each reply is padded with `<|endoftext|>` to a length drawn up to
//!   [`TrainConfig::reply_len`], draws a stratified `t ~ U(eps, 1]`, and every reply position (padding
//!   included) is replaced by `<|mdm_mask|>` with probability `t`. The loss is the cross-entropy at masked
//!   positions weighted by `1/t`, summed, divided by the reply length and averaged over the batch's replies.
//!   Prompt tokens are never masked and carry no loss. Attention groups ([`diffusion_batch`]) keep each
//!   reply to the conversation before it, at the positions it has at inference.
//! - **Autoregressive** twin: the dialog as one causal sequence, next-token cross-entropy on every reply up to
//!   and including `<|im_end|>`, averaged over those tokens.
//!
//! Batches are right-padded with `<|endoftext|>`; padded keys are masked out of attention and padded
//! positions out of the loss. Data order, masking and initialisation all derive from one seed.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use candle_core::{Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::model::{init_params, Batch, Objective, Place, Transformer};

mod checkpoint;
mod config;
mod example;
mod loss;

use checkpoint::save_checkpoint;
pub use checkpoint::{init_weights, TrainState, CHECKPOINT_FILE, STATE_FILE};
pub use config::{Preset, TrainConfig};
pub use example::{build_examples, Example, ReplyTurn, SpecialIds};
pub use loss::{loss, LossBatch};

/// The lower bound of the masking ratio `t`.
pub const MIN_MASK_RATIO: f64 = 1e-3;

/// Pads `reply` to `len` with `pad`.
pub fn pad_reply(reply: &[u32], len: usize, pad: u32) -> Vec<u32> {
    let mut out = reply.to_vec();
    out.resize(len, pad);
    out
}

/// Replaces each token of `padded_reply` by `mask` with probability `t`. Returns the noisy reply and, per
/// position, whether it was masked.
pub fn mask_reply(padded_reply: &[u32], t: f64, mask: u32, rng: &mut impl Rng) -> (Vec<u32>, Vec<bool>) {
    padded_reply
        .iter()
        .map(|&tok| {
            let m = rng.random::<f64>() < t;
            (if m { mask } else { tok }, m)
        })
        .unzip()
}

/// `n` masking ratios in `(eps, 1]`, one per reply of a batch, stratified: one uniform offset spaced by
/// `1/n` (the low-discrepancy sampler of MDLM), then shuffled. Each is still `U(eps, 1]`, but a batch always
/// spans the whole range, which lowers the variance of the `1/t`-weighted loss.
pub fn stratified_ratios(n: usize, rng: &mut impl Rng) -> Vec<f64> {
    let offset = rng.random::<f64>();
    let mut ratios: Vec<f64> = (0..n)
        .map(|i| {
            let u = (offset + i as f64 / n as f64).fract();
            MIN_MASK_RATIO + (1.0 - MIN_MASK_RATIO) * (1.0 - u)
        })
        .collect();
    ratios.shuffle(rng);
    ratios
}

/// Builds the diffusion batch of packed `examples`. Each reply is padded with end tokens to a length drawn
/// between its own and `reply_len` (the model learns to stop wherever the canvas ends, and the batch carries
/// less padding), draws its own `t` ([`stratified_ratios`]) and is masked. Attention groups rebuild what
/// the cached engine computes at inference: the prompt is prefilled chunk by chunk (the system prompt and
/// first user turn, then each earlier reply with the user turn after it), every chunk seeing the ones
/// before it, and the canvas sees them all. So a noisy reply is its own group that no later group sees,
/// and the turns after it see a clean copy of the reply, grouped with the next prompt at the positions the
/// reply had. The loss weight of a masked position is `1 / (t * reply_len)` averaged over the batch's
/// replies. Masks are redrawn if nothing at all was masked.
pub fn diffusion_batch(
    examples: &[&Example],
    reply_len: usize,
    ids: SpecialIds,
    rng: &mut impl Rng,
    device: &Device,
) -> candle_core::Result<LossBatch> {
    let replies: usize = examples.iter().map(|e| e.replies()).sum();
    loop {
        let mut ratios = stratified_ratios(replies, rng).into_iter();
        let mut seqs: Vec<(Vec<u32>, Vec<Place>)> = Vec::with_capacity(examples.len());
        // (sequence, index) of every masked position, its target and weight.
        let (mut masked_at, mut targets, mut weights) = (Vec::new(), Vec::new(), Vec::new());
        for (bi, e) in examples.iter().enumerate() {
            let mut placed: Vec<(u32, Place)> = Vec::new();
            let mut position = 0u32;
            for (k, turn) in e.turns.iter().enumerate() {
                let group = 2 * k as u32;
                let clean_previous = k.checked_sub(1).map_or(&[][..], |p| e.turns[p].reply.as_slice());
                for &tok in clean_previous.iter().chain(&turn.prompt) {
                    placed.push((tok, Place::new(position, group, true)));
                    position += 1;
                }
                let padded_len = rng.random_range(turn.reply.len()..=reply_len.max(turn.reply.len()));
                let padded = pad_reply(&turn.reply, padded_len, ids.end_of_text);
                let t = ratios.next().expect("one ratio per reply");
                let (noisy, masked) = mask_reply(&padded, t, ids.mask, rng);
                for (j, (&tok, &m)) in noisy.iter().zip(&masked).enumerate() {
                    if m {
                        masked_at.push((bi, placed.len()));
                        targets.push(padded[j]);
                        weights.push(turn.weight(j) / (t * reply_len as f64 * replies as f64) as f32);
                    }
                    placed.push((tok, Place::new(position + j as u32, group + 1, false)));
                }
            }
            seqs.push(placed.into_iter().unzip());
        }
        if masked_at.is_empty() {
            continue;
        }
        let seq = seqs.iter().map(|(t, _)| t.len()).max().unwrap_or(0);
        return Ok(LossBatch {
            batch: Batch::placed(&seqs, ids.end_of_text, device)?,
            positions: masked_at.iter().map(|&(bi, i)| (bi * seq + i) as u32).collect(),
            targets,
            weights,
            tokens: seqs.iter().map(|(t, _)| t.len()).sum(),
        });
    }
}

/// Builds the next-token batch of packed `examples`: each dialog in one causal sequence, loss on every
/// reply token (`<|im_end|>` included), averaged over them.
pub fn autoregressive_batch(examples: &[&Example], ids: SpecialIds, device: &Device) -> candle_core::Result<LossBatch> {
    let seq = examples
        .iter()
        .map(|e| e.packed_len(Objective::Autoregressive, 0))
        .max()
        .unwrap_or(0);
    let mut seqs = Vec::with_capacity(examples.len());
    let (mut positions, mut targets, mut weights) = (Vec::new(), Vec::new(), Vec::new());
    for (bi, e) in examples.iter().enumerate() {
        let mut tokens: Vec<u32> = Vec::with_capacity(seq);
        for turn in &e.turns {
            tokens.extend_from_slice(&turn.prompt);
            for (j, &tok) in turn.reply.iter().enumerate() {
                positions.push((bi * seq + tokens.len() - 1) as u32);
                targets.push(tok);
                weights.push(turn.weight(j));
                tokens.push(tok);
            }
        }
        seqs.push(tokens);
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
    device: &Device,
) -> anyhow::Result<TrainReport> {
    config.model.validate().map_err(anyhow::Error::msg)?;
    if examples.len() < config.batch_size {
        bail!(
            "{} examples are fewer than one batch of {}",
            examples.len(),
            config.batch_size
        );
    }
    let mut varmap = init_params(&config.model, config.seed, device)?;
    if let Some(init) = &config.init_from {
        init_weights(&mut varmap, init, device).with_context(|| format!("initialising from {}", init.display()))?;
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
        .map(|e| e.packed_len(config.objective, config.reply_len))
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
        "training {} ({} parameters) on {} dialogs, {} replies ({} left out), batch {} dialogs, up to {} steps{}",
        config.objective.name(),
        config.model.parameter_count(),
        examples.len(),
        examples.iter().map(Example::replies).sum::<usize>(),
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
            Objective::Diffusion => diffusion_batch(&chosen, config.reply_len, ids, &mut mask_rng, device)?,
            Objective::Autoregressive => autoregressive_batch(&chosen, ids, device)?,
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
            // One read of the norm per step: on a GPU every read back is a synchronisation.
            let squares = all_vars
                .iter()
                .filter_map(|var| grads.get(var.as_tensor()))
                .map(|g| g.sqr()?.sum_all())
                .collect::<candle_core::Result<Vec<_>>>()?;
            let norm = (Tensor::stack(&squares, 0)?.sum_all()?.to_scalar::<f32>()? as f64).sqrt();
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
    use crate::corpus::{generate, test_config};
    use crate::domain::northwind;
    use crate::tokenizer::{train_on_dialogs, TokenizerConfig};

    const IDS: SpecialIds = SpecialIds {
        end_of_text: 0,
        im_start: 1,
        im_end: 2,
        mask: 3,
    };

    fn example(turns: &[(&[u32], &[u32])]) -> Example {
        Example {
            turns: turns
                .iter()
                .map(|(prompt, reply)| ReplyTurn {
                    prompt: prompt.to_vec(),
                    reply: reply.to_vec(),
                    reply_weights: vec![1.0; reply.len()],
                })
                .collect(),
        }
    }

    #[test]
    fn masking_replaces_about_a_t_fraction_of_the_reply() {
        let mut rng = StdRng::seed_from_u64(1);
        let reply = pad_reply(&[50, 51, 52, 2], 64, 0);
        for &t in &[0.1, 0.5, 0.9] {
            let mut masked_count = 0;
            let trials = 400;
            for _ in 0..trials {
                let (tokens, masked) = mask_reply(&reply, t, IDS.mask, &mut rng);
                assert_eq!(tokens.len(), reply.len());
                for (p, &m) in masked.iter().enumerate() {
                    assert_eq!(tokens[p], if m { IDS.mask } else { reply[p] });
                }
                masked_count += masked.iter().filter(|&&m| m).count();
            }
            let fraction = masked_count as f64 / (trials * reply.len()) as f64;
            assert!((fraction - t).abs() < 0.02, "t {t}: masked fraction {fraction}");
        }
        for n in [1, 7, 20] {
            let mut ratios = stratified_ratios(n, &mut rng);
            assert_eq!(ratios.len(), n);
            assert!(ratios.iter().all(|&t| t > MIN_MASK_RATIO - 1e-12 && t <= 1.0));
            // One per stratum of width 1/n.
            ratios.sort_by(f64::total_cmp);
            for pair in ratios.windows(2) {
                let gap = (pair[1] - pair[0]) / (1.0 - MIN_MASK_RATIO);
                assert!((gap - 1.0 / n as f64).abs() < 1e-9, "{ratios:?}");
            }
        }
    }

    #[test]
    fn diffusion_batch_lays_out_replies_like_the_cached_prefill() {
        let mut rng = StdRng::seed_from_u64(4);
        let a = example(&[(&[1, 7, 8, 9], &[20, 21, 2]), (&[10, 11], &[22, 2])]);
        let b = example(&[(&[1, 7, 8, 9, 10, 11], &[23, 2])]);
        let reply_len = 8;
        let mut padded_lengths = std::collections::BTreeSet::new();
        for _ in 0..50 {
            let lb = diffusion_batch(&[&a, &b], reply_len, IDS, &mut rng, &Device::Cpu).unwrap();
            let tokens: Vec<Vec<u32>> = lb.batch.tokens.to_vec2().unwrap();
            let seq = tokens[0].len();
            // Runs of (group, first position, length) of a: prompt, noisy reply, clean reply + prompt, noisy reply.
            let places = &lb.batch.places[0];
            let valid = lb.batch.valid[0].iter().filter(|&&v| v).count();
            let mut runs: Vec<(u32, u32, usize, usize)> = Vec::new();
            for (i, p) in places[..valid].iter().enumerate() {
                match runs.last_mut() {
                    Some(run) if run.0 == p.group => {
                        assert_eq!(p.position, run.1 + run.3 as u32, "positions run on within a group");
                        run.3 += 1;
                    }
                    _ => runs.push((p.group, p.position, i, 1)),
                }
                // No later group sees a noisy reply.
                assert_eq!(p.visible_later, p.group % 2 == 0);
            }
            let groups: Vec<u32> = runs.iter().map(|r| r.0).collect();
            assert_eq!(groups, [0, 1, 2, 3]);
            let (first_reply, clean, second_reply) = (runs[1], runs[2], runs[3]);
            assert_eq!((runs[0].1, runs[0].3), (0, 4));
            assert!((3..=reply_len).contains(&first_reply.3) && (2..=reply_len).contains(&second_reply.3));
            padded_lengths.insert(first_reply.3);
            // The clean copy sits where the noisy reply starts; the next reply follows the unpadded one.
            assert_eq!(first_reply.1, 4);
            assert_eq!(clean.1, 4);
            assert_eq!(tokens[0][clean.2..clean.2 + clean.3], [20, 21, 2, 10, 11]);
            assert_eq!(second_reply.1, 9);
            let noisy = [
                (0, first_reply.2, &a.turns[0]),
                (0, second_reply.2, &a.turns[1]),
                (1, 6, &b.turns[0]),
            ];
            for (&p, &target) in lb.positions.iter().zip(&lb.targets) {
                let (bi, pos) = (p as usize / seq, p as usize % seq);
                assert_eq!(tokens[bi][pos], IDS.mask);
                let &(_, start, turn) = noisy
                    .iter()
                    .find(|(b, start, _)| *b == bi && (*start..start + reply_len).contains(&pos))
                    .expect("loss only on noisy reply positions");
                assert_eq!(target, pad_reply(&turn.reply, reply_len, 0)[pos - start]);
            }
            assert!(!lb.positions.is_empty());
        }
        // Padding lengths vary between the reply's own and reply_len.
        assert!(padded_lengths.len() >= 4, "{padded_lengths:?}");
    }

    #[test]
    fn autoregressive_batch_predicts_every_reply_token_from_the_one_before() {
        let a = example(&[(&[1, 7, 8], &[20, 21, 2]), (&[9], &[24, 2])]);
        let b = example(&[(&[1, 7], &[22, 2])]);
        let lb = autoregressive_batch(&[&a, &b], IDS, &Device::Cpu).unwrap();
        // seq = 9; a: positions 2,3,4 predict 20,21,2 and 6,7 predict 24,2; b: 9+1, 9+2 predict 22, 2.
        assert_eq!(lb.positions, vec![2, 3, 4, 6, 7, 10, 11]);
        assert_eq!(lb.targets, vec![20, 21, 2, 24, 2, 22, 2]);
        let tokens: Vec<Vec<u32>> = lb.batch.tokens.to_vec2().unwrap();
        assert_eq!(tokens[0], vec![1, 7, 8, 20, 21, 2, 9, 24, 2]);
        assert!((lb.weights.iter().sum::<f32>() - 1.0).abs() < 1e-6);
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
        let a = train(&config, &examples, skipped, ids, &dir.join("a"), &Device::Cpu).unwrap();
        let b = train(&config, &examples, skipped, ids, &dir.join("b"), &Device::Cpu).unwrap();
        assert_eq!(a.state.step, 12);
        assert_eq!(a.state.loss, b.state.loss);
        let wa = std::fs::read(dir.join("a").join(CHECKPOINT_FILE)).unwrap();
        let wb = std::fs::read(dir.join("b").join(CHECKPOINT_FILE)).unwrap();
        assert_eq!(wa, wb);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
