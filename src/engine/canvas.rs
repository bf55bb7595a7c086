//! The reply canvas: a fixed-length row of tokens that starts all-[MASK] and is unmasked step by
//! step, block by block, until every position before the first end token holds a token.
//!
//! The canvas owns the sampling (greedy or seeded temperature sampling over one position's
//! logits) and the bookkeeping of the fixed schedule; which positions to unmask is decided by
//! [`policy`](super::policy). Engines only supply logits for [`Canvas::active_positions`].

use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use ggml_ext::runtime::TopK;

use super::policy::{self, Candidate, Schedule, Selection};
use super::repeats::Repeats;
use super::DecodeOptions;

/// A reply being denoised.
pub struct Canvas {
    tokens: Vec<i32>,
    mask: i32,
    end_tokens: Vec<i32>,
    block_length: usize,
    steps_per_block: usize,
    schedule: Schedule,
    selection: Selection,
    defer_repeats: bool,
    fill_canvas: bool,
    /// Each token's bytes, for the repeat rule to read words ([`Repeats`]; empty: tokens only).
    pieces: Arc<[Vec<u8>]>,
    temperature: f32,
    rng: StdRng,
    /// Block the fixed schedule is counting steps for, and how many it has used there.
    block: usize,
    steps_in_block: usize,
    steps: usize,
}

impl Canvas {
    /// A fully masked canvas of `options.max_tokens` positions. `end_tokens` end the reply
    /// (end-of-text and end-of-turn); `mask` is the model's mask token.
    pub fn new(options: &DecodeOptions, mask: i32, end_tokens: Vec<i32>) -> Self {
        let blocks = options.max_tokens.div_ceil(options.block_length);
        Self {
            tokens: vec![mask; options.max_tokens],
            mask,
            end_tokens,
            block_length: options.block_length,
            steps_per_block: (options.steps / blocks).max(1),
            schedule: options.schedule,
            selection: options.selection,
            defer_repeats: options.defer_repeats,
            fill_canvas: options.fill_canvas,
            pieces: Arc::from(Vec::new()),
            temperature: options.temperature,
            rng: StdRng::seed_from_u64(options.seed),
            block: 0,
            steps_in_block: 0,
            steps: 0,
        }
    }

    /// Lets the repeat rule (`defer_repeats`) read words through the vocabulary's `pieces`.
    pub fn with_pieces(mut self, pieces: Arc<[Vec<u8>]>) -> Self {
        self.pieces = pieces;
        self
    }

    /// All canvas tokens, masked positions holding the mask token.
    pub fn tokens(&self) -> &[i32] {
        &self.tokens
    }

    /// Steps taken so far.
    pub fn steps(&self) -> usize {
        self.steps
    }

    /// Length of the reply: the position of the first unmasked end token, or the canvas length.
    pub fn reply_len(&self) -> usize {
        self.tokens
            .iter()
            .position(|t| *t != self.mask && self.end_tokens.contains(t))
            .unwrap_or(self.tokens.len())
    }

    /// Masked positions inside the reply. Never increases: tokens are never re-masked and the
    /// reply only gets shorter when an earlier end token appears.
    pub fn masked(&self) -> usize {
        self.tokens[..self.reply_len()]
            .iter()
            .filter(|t| **t == self.mask)
            .count()
    }

    pub fn is_complete(&self) -> bool {
        self.tokens[..self.decoded_len()].iter().all(|t| *t != self.mask)
    }

    /// The positions that must be decided: the reply's, or with `fill_canvas` the whole canvas.
    fn decoded_len(&self) -> usize {
        if self.fill_canvas {
            self.tokens.len()
        } else {
            self.reply_len()
        }
    }

    /// The masked positions of the current block (the first block with a masked position among
    /// those to decide): the positions whose logits the next step needs.
    pub fn active_positions(&self) -> Vec<usize> {
        let len = self.decoded_len();
        let Some(first) = self.tokens[..len].iter().position(|t| *t == self.mask) else {
            return Vec::new();
        };
        let block = first / self.block_length;
        let end = ((block + 1) * self.block_length).min(len);
        (first..end).filter(|p| self.tokens[*p] == self.mask).collect()
    }

    /// Runs one denoising step given the logits of each active position (same order as
    /// [`Self::active_positions`]). Returns how many positions were unmasked.
    pub fn step(&mut self, active: &[usize], logits: &[&[f32]]) -> usize {
        self.step_with(
            active,
            logits,
            |canvas, position, row| canvas.sample(position, row),
            |row| ranked_logits(row),
        )
    }

    /// Runs one denoising step given each active position's most likely tokens (probabilities
    /// after temperature, mask token excluded), as the cached engine's graph returns them. With a
    /// temperature the token is sampled among those `k`.
    pub fn step_top_k(&mut self, active: &[usize], tops: &[TopK]) -> usize {
        self.step_with(active, tops, Self::sample_top_k, |top| {
            top.tokens.iter().copied().zip(top.probs.iter().copied()).collect()
        })
    }

    /// One step: a candidate per active position from its row, then the policy's choice.
    /// `ranked` lists a row's likeliest tokens with their probabilities, best first.
    fn step_with<R>(
        &mut self,
        active: &[usize],
        rows: &[R],
        sample: impl Fn(&mut Self, usize, &R) -> Candidate,
        ranked: impl Fn(&R) -> Vec<(i32, f32)>,
    ) -> usize {
        debug_assert_eq!(active.len(), rows.len());
        if active.is_empty() {
            return 0;
        }
        // An end token fixes the reply's length. Most replies end well before the canvas does, so end tokens
        // are often the most confident guesses; committed early they squeeze the content into the few
        // positions left before them. An end token is therefore only committed at the first masked position,
        // once everything before it is decided (at most one step later than otherwise).
        // `fill_canvas` is llama.cpp's algorithm, which has no such rule.
        let first_masked = active[0];
        let mut candidates: Vec<Candidate> = active
            .iter()
            .zip(rows)
            .map(|(&position, row)| sample(self, position, row))
            .collect();
        if !self.fill_canvas {
            candidates.retain(|c| c.position == first_masked || !self.end_tokens.contains(&c.token));
        }
        let block = active[0] / self.block_length;
        if block != self.block {
            self.block = block;
            self.steps_in_block = 0;
        }
        let quota = policy::fixed_quota(active.len(), self.steps_per_block.saturating_sub(self.steps_in_block));
        let mut chosen = policy::choose(self.schedule, self.selection, candidates.clone(), quota);
        if self.defer_repeats {
            let rule = Repeats {
                mask: self.mask,
                end_tokens: &self.end_tokens,
                pieces: &self.pieces,
            };
            chosen = rule.defer(chosen, &candidates, &self.tokens);
            if let [forced] = chosen.as_mut_slice() {
                if rule.says_word_twice(&self.tokens, forced) {
                    let row = active
                        .iter()
                        .position(|p| *p == forced.position)
                        .expect("chosen among active");
                    if let Some(other) = self.instead_of_repeat(&rule, forced, ranked(&rows[row]), first_masked) {
                        *forced = other;
                    }
                }
            }
        }
        for c in &chosen {
            self.tokens[c.position] = c.token;
        }
        self.steps_in_block += 1;
        self.steps += 1;
        chosen.len()
    }

    /// Nothing else could go first, so `forced` would write a word said twice: the position's
    /// likeliest token in `ranked` that repeats nothing instead (an end token only where one may
    /// go), if there is one.
    fn instead_of_repeat(
        &self,
        rule: &Repeats<'_>,
        forced: &Candidate,
        ranked: Vec<(i32, f32)>,
        first_masked: usize,
    ) -> Option<Candidate> {
        let allowed = |t: i32| t != self.mask && (forced.position == first_masked || !self.end_tokens.contains(&t));
        ranked
            .into_iter()
            .filter(|(token, _)| *token != forced.token && allowed(*token))
            .map(|(token, prob)| Candidate { token, prob, ..*forced })
            .find(|c| !rule.completes(&self.tokens, c))
    }

    /// Samples a token for one position. The mask token is never proposed.
    fn sample(&mut self, position: usize, logits: &[f32]) -> Candidate {
        let temperature = if self.temperature > 0.0 { self.temperature } else { 1.0 };
        let mask = self.mask as usize;
        let max = logits
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != mask)
            .map(|(_, l)| *l)
            .fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<f32> = logits
            .iter()
            .enumerate()
            .map(|(i, l)| {
                if i == mask {
                    0.0
                } else {
                    ((l - max) / temperature).exp()
                }
            })
            .collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);

        let token = if self.temperature > 0.0 {
            let mut r: f32 = self.rng.random();
            probs
                .iter()
                .position(|p| {
                    r -= p;
                    r < 0.0
                })
                .unwrap_or_else(|| argmax(&probs))
        } else {
            argmax(&probs)
        };
        let prob = probs[token];
        let runner_up = probs
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != token)
            .map(|(_, p)| *p)
            .fold(0.0, f32::max);
        let entropy = -probs.iter().filter(|p| **p > 0.0).map(|p| p * p.ln()).sum::<f32>();
        Candidate {
            position,
            token: token as i32,
            prob,
            runner_up,
            entropy,
        }
    }

    fn sample_top_k(&mut self, position: usize, top: &TopK) -> Candidate {
        debug_assert!(
            self.selection != Selection::Entropy || top.entropy.is_finite(),
            "selection by entropy needs the head's entropies"
        );
        let pick = if self.temperature > 0.0 && top.probs.len() > 1 {
            let mut r = self.rng.random::<f32>() * top.probs.iter().sum::<f32>();
            top.probs
                .iter()
                .position(|p| {
                    r -= p;
                    r < 0.0
                })
                .unwrap_or(0)
        } else {
            0
        };
        let runner_up = top
            .probs
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != pick)
            .map(|(_, p)| *p)
            .fold(0.0, f32::max);
        Candidate {
            position,
            token: top.tokens[pick],
            prob: top.probs[pick],
            runner_up,
            entropy: top.entropy,
        }
    }

    /// The current block's canvas range: the block of the first masked position inside the reply.
    pub fn current_block(&self) -> Option<std::ops::Range<usize>> {
        let first = *self.active_positions().first()?;
        let start = first / self.block_length * self.block_length;
        Some(start..(start + self.block_length).min(self.tokens.len()))
    }
}

/// How many of a logits row's tokens [`ranked_logits`] lists.
const RANKED: usize = 8;

/// The [`RANKED`] likeliest tokens of a logits row with their probabilities, best first.
fn ranked_logits(logits: &[f32]) -> Vec<(i32, f32)> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = logits.iter().map(|l| (l - max).exp()).sum();
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|a, b| logits[*b].total_cmp(&logits[*a]));
    order
        .into_iter()
        .take(RANKED)
        .map(|i| (i as i32, (logits[i] - max).exp() / sum))
        .collect()
}

fn argmax(values: &[f32]) -> usize {
    values
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0)))
        .map(|(i, _)| i)
        .unwrap_or(0)
}

/// Renders the reply part of `tokens` (up to `reply_len`) as text: runs of unmasked tokens are
/// decoded from their bytes, each masked position shows `placeholder`.
pub fn render(tokens: &[i32], reply_len: usize, mask: i32, pieces: &[Vec<u8>], placeholder: &str) -> String {
    let mut text = String::new();
    let mut run: Vec<u8> = Vec::new();
    for &t in &tokens[..reply_len] {
        if t == mask {
            text.push_str(&String::from_utf8_lossy(&run));
            run.clear();
            text.push_str(placeholder);
        } else if let Some(piece) = pieces.get(t as usize) {
            run.extend_from_slice(piece);
        }
    }
    text.push_str(&String::from_utf8_lossy(&run));
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    const MASK: i32 = 9;
    const END: i32 = 8;

    fn options(max_tokens: usize, steps: usize, block_length: usize, schedule: Schedule) -> DecodeOptions {
        DecodeOptions {
            max_tokens,
            steps,
            block_length,
            schedule,
            selection: Selection::Confidence,
            defer_repeats: false,
            temperature: 0.0,
            seed: 1,
            fill_canvas: false,
        }
    }

    /// Logits that strongly prefer `token`.
    fn peaked(token: usize, strength: f32) -> Vec<f32> {
        let mut l = vec![0.0; 10];
        l[token] = strength;
        l
    }

    fn run_step(c: &mut Canvas, f: impl Fn(usize) -> Vec<f32>) -> usize {
        let active = c.active_positions();
        let rows: Vec<Vec<f32>> = active.iter().map(|p| f(*p)).collect();
        let refs: Vec<&[f32]> = rows.iter().map(|r| r.as_slice()).collect();
        c.step(&active, &refs)
    }

    #[test]
    fn fixed_schedule_walks_blocks_left_to_right() {
        let mut c = Canvas::new(&options(8, 8, 4, Schedule::Fixed), MASK, vec![END]);
        assert_eq!(c.active_positions(), vec![0, 1, 2, 3]);
        // Later positions are more confident, but only the first block is active.
        for _ in 0..4 {
            assert_eq!(run_step(&mut c, |p| peaked(p % 8, 1.0 + p as f32)), 1);
        }
        assert_eq!(c.active_positions(), vec![4, 5, 6, 7]);
        assert_eq!(c.masked(), 4);
    }

    #[test]
    fn with_defer_repeats_neighbours_proposing_one_token_take_turns() {
        let every = |p: usize| peaked(if p == 7 { 0 } else { 7 }, 8.0);
        let mut c = Canvas::new(&options(8, 8, 8, Schedule::Threshold { tau: 0.5 }), MASK, vec![END]);
        assert_eq!(run_step(&mut c, every), 8);
        let mut c = Canvas::new(
            &DecodeOptions {
                defer_repeats: true,
                ..options(8, 8, 8, Schedule::Threshold { tau: 0.5 })
            },
            MASK,
            vec![END],
        );
        // Ties go to the earlier position: 0, 2, 4, 6 and the different token at 7 are kept.
        assert_eq!(run_step(&mut c, every), 5);
        assert_eq!(&c.tokens()[..8], &[7, MASK, 7, MASK, 7, MASK, 7, 0]);
    }

    #[test]
    fn a_word_said_twice_that_nothing_can_defer_takes_the_next_best_token() {
        // Token 7 is " Poles", token 1 " has". " Poles" is decided at 0; position 1 wants it
        // again and position 2 wants to end the reply, which it may not do before 1 is decided.
        let pieces: Arc<[Vec<u8>]> = (0..10)
            .map(|t| match t {
                7 => b" Poles".to_vec(),
                1 => b" has".to_vec(),
                _ => format!(" w{t}").into_bytes(),
            })
            .collect();
        let second = |p: usize| match p {
            1 => {
                let mut l = peaked(7, 8.0);
                l[1] = 5.0;
                l
            }
            _ => peaked(END as usize, 12.0),
        };
        for (defer_repeats, expected) in [(false, 7), (true, 1)] {
            let o = DecodeOptions {
                defer_repeats,
                ..options(3, 3, 3, Schedule::Threshold { tau: 0.9 })
            };
            let mut c = Canvas::new(&o, MASK, vec![END]).with_pieces(pieces.clone());
            assert_eq!(
                run_step(&mut c, |p| if p == 0 { peaked(7, 12.0) } else { vec![0.0; 10] }),
                1
            );
            assert_eq!(run_step(&mut c, second), 1);
            assert_eq!(c.tokens()[1], expected, "defer_repeats = {defer_repeats}");
        }
    }

    #[test]
    fn fewer_steps_unmask_more_per_step() {
        let mut c = Canvas::new(&options(8, 2, 4, Schedule::Fixed), MASK, vec![END]);
        assert_eq!(run_step(&mut c, |p| peaked(p % 8, 5.0)), 4);
        assert_eq!(run_step(&mut c, |p| peaked(p % 8, 5.0)), 4);
        assert!(c.is_complete());
        assert_eq!(c.steps(), 2);
    }

    #[test]
    fn end_token_cuts_the_reply_and_masked_never_grows() {
        let mut c = Canvas::new(&options(8, 8, 8, Schedule::Threshold { tau: 0.9 }), MASK, vec![END]);
        let mut last = c.masked();
        // Position 3 confidently predicts the end token, everything else is unsure.
        while !c.is_complete() {
            run_step(&mut c, |p| {
                if p == 3 {
                    peaked(END as usize, 20.0)
                } else {
                    peaked(p, 0.5)
                }
            });
            assert!(c.masked() <= last);
            last = c.masked();
        }
        assert_eq!(c.reply_len(), 3);
    }

    #[test]
    fn end_tokens_wait_until_everything_before_them_is_decided() {
        let mut c = Canvas::new(&options(8, 8, 8, Schedule::Threshold { tau: 0.9 }), MASK, vec![END]);
        // Position 0 is unsure; every later position is sure the reply has ended.
        let rows = |p: usize| {
            if p == 0 {
                peaked(4, 0.5)
            } else {
                peaked(END as usize, 20.0)
            }
        };
        assert_eq!(run_step(&mut c, rows), 1);
        assert_eq!(c.tokens()[0], 4);
        assert!(c.tokens()[1..].iter().all(|t| *t == MASK), "{:?}", c.tokens());
        assert_eq!(c.reply_len(), 8);
        // Now the first masked position may end the reply.
        assert_eq!(run_step(&mut c, rows), 1);
        assert_eq!(c.reply_len(), 1);
        assert!(c.is_complete());
    }

    #[test]
    fn fill_canvas_takes_every_step_and_lets_an_end_token_go_anywhere() {
        // Position 1 is sure the reply ends there; the others are unsure.
        let rows = |p: usize| {
            if p == 1 {
                peaked(END as usize, 20.0)
            } else {
                peaked(p, 0.5)
            }
        };
        let fill = DecodeOptions {
            fill_canvas: true,
            ..options(8, 8, 4, Schedule::Fixed)
        };
        let mut c = Canvas::new(&fill, MASK, vec![END]);
        assert_eq!(run_step(&mut c, rows), 1);
        assert_eq!(
            c.tokens()[1],
            END,
            "the end token went first, before position 0 was decided"
        );
        assert_eq!(c.reply_len(), 1);
        let mut steps = 1;
        while !c.is_complete() {
            assert_eq!(run_step(&mut c, rows), 1);
            steps += 1;
        }
        assert_eq!(steps, 8, "every step of the budget, past the reply's end");
        assert!(c.tokens().iter().all(|t| *t != MASK), "{:?}", c.tokens());
        assert_eq!((c.reply_len(), c.masked()), (1, 0));

        // Without it the end token waits for position 0 and decoding stops at the reply's end.
        let mut c = Canvas::new(&options(8, 8, 4, Schedule::Fixed), MASK, vec![END]);
        run_step(&mut c, rows);
        assert_ne!(c.tokens()[1], END);
        while !c.is_complete() {
            run_step(&mut c, rows);
        }
        assert!(c.steps() < 8 && c.tokens().contains(&MASK), "{:?}", c.tokens());
    }

    #[test]
    fn mask_token_is_never_sampled() {
        let mut c = Canvas::new(&options(2, 2, 2, Schedule::Fixed), MASK, vec![END]);
        run_step(&mut c, |_| peaked(MASK as usize, 50.0));
        assert!(c.tokens().iter().filter(|t| **t != MASK).all(|t| *t != MASK));
        assert_eq!(c.masked(), 1);
    }

    #[test]
    fn same_seed_same_samples() {
        let sample_all = |seed| {
            let mut o = options(6, 6, 6, Schedule::Fixed);
            o.temperature = 1.0;
            o.seed = seed;
            let mut c = Canvas::new(&o, MASK, vec![]);
            while !c.is_complete() {
                run_step(&mut c, |_| vec![0.0; 9]);
            }
            c.tokens().to_vec()
        };
        assert_eq!(sample_all(7), sample_all(7));
        assert_ne!(sample_all(7), sample_all(8));
    }

    #[test]
    fn top_k_step_takes_the_most_likely_and_samples_with_a_seed() {
        let top = |position: usize| TopK {
            tokens: vec![position as i32, 7],
            probs: vec![0.6, 0.3],
            entropy: 0.9,
        };
        let mut c = Canvas::new(&options(4, 4, 4, Schedule::Fixed), MASK, vec![END]);
        let active = c.active_positions();
        let tops: Vec<TopK> = active.iter().map(|p| top(*p)).collect();
        assert_eq!(c.step_top_k(&active, &tops), 1);
        assert_eq!(c.tokens()[0], 0, "greedy takes the first of the top-k");
        assert_eq!(c.current_block(), Some(0..4));

        let sample_all = |seed| {
            let mut o = options(6, 6, 6, Schedule::Fixed);
            o.temperature = 1.0;
            o.seed = seed;
            let mut c = Canvas::new(&o, MASK, vec![]);
            while !c.is_complete() {
                let active = c.active_positions();
                let tops: Vec<TopK> = active.iter().map(|p| top(*p)).collect();
                c.step_top_k(&active, &tops);
            }
            c.tokens().to_vec()
        };
        assert_eq!(sample_all(3), sample_all(3));
        assert!(
            (0..8).any(|s| sample_all(s).contains(&7)),
            "the runner-up is sampled sometimes"
        );
    }

    #[test]
    fn render_shows_placeholders_and_joins_bytes() {
        // "é" split over two tokens still renders once both are unmasked.
        let pieces = vec![b"h".to_vec(), b"i".to_vec(), vec![0xC3], vec![0xA9]];
        assert_eq!(render(&[0, 1, 2, 3], 4, MASK, &pieces, "_"), "hié");
        assert_eq!(render(&[0, MASK, 1, MASK], 4, MASK, &pieces, "_"), "h_i_");
        assert_eq!(render(&[0, 1, 2, 3], 2, MASK, &pieces, "_"), "hi");
    }
}
