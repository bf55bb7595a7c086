//! From packed examples to loss batches: data order, padding, masking and the attention layout.
//!
//! [`epoch_batches`] decides which examples share a batch, one seeded epoch at a time.
//! [`diffusion_batch`] pads each reply to a drawn canvas length, masks it with a stratified ratio `t`
//! ([`stratified_ratios`], [`mask_reply`]) and lays the dialog out in attention groups the way the cached
//! engine prefills it at inference; [`autoregressive_batch`] lays each dialog out as one causal sequence.
//! Both return a [`LossBatch`] for the loss. All randomness comes from the `rng` passed in, in a fixed
//! order, so a seed fixes every batch.

use candle_core::Device;
use rand::seq::SliceRandom;
use rand::Rng;

use super::{Example, LossBatch, SpecialIds};
use crate::model::{Batch, Objective, Place};

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
/// the cached engine computes at inference: the prompt is prefilled chunk by chunk (the system prompt, the
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
                // Group 0 is the system prompt's chunk; then each turn's prompt and its noisy reply.
                let group = 2 * k as u32 + 2;
                let clean_previous = k.checked_sub(1).map_or(&[][..], |p| e.turns[p].reply.as_slice());
                for (j, &tok) in clean_previous.iter().chain(&turn.prompt).enumerate() {
                    let chunk = if k == 0 && j < e.system_len { 0 } else { group };
                    placed.push((tok, Place::new(position, chunk, true)));
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

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    use super::*;
    use crate::train::ReplyTurn;

    use crate::train::example::TEST_IDS as IDS;

    fn example(system_len: usize, turns: &[(&[u32], &[u32])]) -> Example {
        Example {
            system_len,
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
        // `a` starts with a system prompt of two tokens, `b` with none that tokenizes apart.
        let a = example(2, &[(&[1, 7, 8, 9], &[20, 21, 2]), (&[10, 11], &[22, 2])]);
        let b = example(0, &[(&[1, 7, 8, 9, 10, 11], &[23, 2])]);
        let reply_len = 8;
        let mut padded_lengths = std::collections::BTreeSet::new();
        for _ in 0..50 {
            let lb = diffusion_batch(&[&a, &b], reply_len, IDS, &mut rng, &Device::Cpu).unwrap();
            let tokens: Vec<Vec<u32>> = lb.batch.tokens.to_vec2().unwrap();
            let seq = tokens[0].len();
            // Runs of (group, first position, length) of a: system prompt, prompt, noisy reply, clean reply +
            // prompt, noisy reply.
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
            assert_eq!(groups, [0, 2, 3, 4, 5]);
            let (first_reply, clean, second_reply) = (runs[2], runs[3], runs[4]);
            assert_eq!((runs[0].1, runs[0].3), (0, 2));
            assert_eq!((runs[1].1, runs[1].3), (2, 2));
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
        let a = example(0, &[(&[1, 7, 8], &[20, 21, 2]), (&[9], &[24, 2])]);
        let b = example(0, &[(&[1, 7], &[22, 2])]);
        let lb = autoregressive_batch(&[&a, &b], IDS, &Device::Cpu).unwrap();
        // seq = 9; a: positions 2,3,4 predict 20,21,2 and 6,7 predict 24,2; b: 9+1, 9+2 predict 22, 2.
        assert_eq!(lb.positions, vec![2, 3, 4, 6, 7, 10, 11]);
        assert_eq!(lb.targets, vec![20, 21, 2, 24, 2, 22, 2]);
        let tokens: Vec<Vec<u32>> = lb.batch.tokens.to_vec2().unwrap();
        assert_eq!(tokens[0], vec![1, 7, 8, 20, 21, 2, 9, 24, 2]);
        assert!((lb.weights.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }
}
