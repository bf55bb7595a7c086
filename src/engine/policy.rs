//! Unmasking policies: which masked positions of the canvas become tokens at each step.
//!
//! This is pure logic over per-position candidates (the sampled token, its probability, the
//! runner-up's probability and the entropy), so every engine shares it and it is unit-tested
//! without a model. The policies follow the published ones: LLaDA's fixed block schedule,
//! Fast-dLLM's confidence threshold and its factor variant.

use serde::{Deserialize, Serialize};

/// How many positions to unmask per step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Schedule {
    /// A fixed budget of steps per block, spread evenly over the block's masked positions.
    Fixed,
    /// Every candidate whose top-1 probability is at least `tau` (always at least one).
    Threshold { tau: f32 },
    /// Sorted by probability, the n-th (1-based) candidate is taken while `p_n >= 1 - f / (n + 1)`
    /// (always at least one).
    Factor { factor: f32 },
}

/// The schedules by name, as configuration and clients choose them; the parameters (`tau`,
/// `factor`) come separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyKind {
    Fixed,
    Threshold,
    Factor,
}

/// Which candidates are preferred when only some can be unmasked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Selection {
    /// Highest probability of the chosen token first.
    #[default]
    Confidence,
    /// Largest gap between the top-1 and top-2 probabilities first.
    Margin,
    /// Lowest entropy of the position's distribution first.
    Entropy,
}

/// What the model proposes for one masked position.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    /// Index in the canvas.
    pub position: usize,
    pub token: i32,
    /// Probability of `token`.
    pub prob: f32,
    /// Probability of the best token other than `token`.
    pub runner_up: f32,
    /// Entropy of the position's distribution, in nats.
    pub entropy: f32,
}

impl Selection {
    /// Higher is better.
    fn score(self, c: &Candidate) -> f32 {
        match self {
            Selection::Confidence => c.prob,
            Selection::Margin => c.prob - c.runner_up,
            Selection::Entropy => -c.entropy,
        }
    }
}

/// Picks the positions to unmask this step.
///
/// `fixed_quota` is how many positions the fixed schedule unmasks now (see [`fixed_quota`]); the
/// adaptive schedules ignore it. Returns candidates in the order they were chosen; never empty
/// when `candidates` is not, so every step makes progress.
pub fn choose(
    schedule: Schedule,
    selection: Selection,
    mut candidates: Vec<Candidate>,
    fixed_quota: usize,
) -> Vec<Candidate> {
    if candidates.is_empty() {
        return candidates;
    }
    // Stable order for ties: better score first, then earlier position.
    candidates.sort_by(|a, b| {
        selection
            .score(b)
            .total_cmp(&selection.score(a))
            .then(a.position.cmp(&b.position))
    });
    let take = match schedule {
        Schedule::Fixed => fixed_quota.clamp(1, candidates.len()),
        Schedule::Threshold { tau } => candidates.iter().filter(|c| c.prob >= tau).count().max(1),
        Schedule::Factor { factor } => {
            let mut by_prob: Vec<f32> = candidates.iter().map(|c| c.prob).collect();
            by_prob.sort_by(|a, b| b.total_cmp(a));
            let n = by_prob
                .iter()
                .enumerate()
                .take_while(|(i, p)| **p >= 1.0 - factor / (*i as f32 + 2.0))
                .count();
            n.max(1)
        }
    };
    candidates.truncate(take);
    candidates
}

/// The longest span [`defer_repeats`] looks for, in tokens: a word of up to a few pieces.
pub const REPEAT_SPAN: usize = 4;

/// Of `chosen` (in the order [`choose`] returns them), the ones to unmask now: a candidate that,
/// written into `tokens` beside the decided tokens and the candidates kept before it, completes a
/// span said twice in a row (up to [`REPEAT_SPAN`] tokens: "5 5" of "$14.955", "Head lamp Head
/// lamp") stays masked for now. The first candidate is always kept, so a step makes progress.
///
/// Positions unmasked in one step are sampled independently of each other: two neighbours that
/// both expect the same piece each take it, and the reply says it twice. A step later the model
/// sees the piece in place and decides the other position again.
pub fn defer_repeats(chosen: Vec<Candidate>, tokens: &[i32], mask: i32) -> Vec<Candidate> {
    let mut canvas = tokens.to_vec();
    let mut kept = Vec::with_capacity(chosen.len());
    for (i, c) in chosen.into_iter().enumerate() {
        canvas[c.position] = c.token;
        if i > 0 && repeats_at(&canvas, c.position, mask) {
            canvas[c.position] = mask;
        } else {
            kept.push(c);
        }
    }
    kept
}

/// Whether some span of `canvas` said twice in a row, with no masked position, covers `position`.
fn repeats_at(canvas: &[i32], position: usize, mask: i32) -> bool {
    (1..=REPEAT_SPAN).any(|k| {
        let first = (position + 1).saturating_sub(2 * k);
        (first..=position).filter(|s| s + 2 * k <= canvas.len()).any(|s| {
            let (a, b) = (&canvas[s..s + k], &canvas[s + k..s + 2 * k]);
            a == b && !a.contains(&mask)
        })
    })
}

/// How many of `masked_in_block` positions the fixed schedule unmasks when `steps_left` steps
/// remain for the block: the remainder goes to the earliest steps, as in LLaDA.
pub fn fixed_quota(masked_in_block: usize, steps_left: usize) -> usize {
    masked_in_block.div_ceil(steps_left.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(position: usize, prob: f32) -> Candidate {
        Candidate {
            position,
            token: position as i32,
            prob,
            runner_up: 0.0,
            entropy: 1.0 - prob,
        }
    }

    #[test]
    fn threshold_takes_every_confident_position() {
        let cs = vec![cand(0, 0.95), cand(1, 0.5), cand(2, 0.91), cand(3, 0.2)];
        let chosen = choose(Schedule::Threshold { tau: 0.9 }, Selection::Confidence, cs, 0);
        let positions: Vec<_> = chosen.iter().map(|c| c.position).collect();
        assert_eq!(positions, vec![0, 2]);
    }

    #[test]
    fn threshold_always_takes_at_least_the_best() {
        let cs = vec![cand(0, 0.3), cand(1, 0.6), cand(2, 0.1)];
        let chosen = choose(Schedule::Threshold { tau: 0.9 }, Selection::Confidence, cs, 0);
        assert_eq!(chosen.len(), 1);
        assert_eq!(chosen[0].position, 1);
    }

    #[test]
    fn factor_rule_shrinks_with_rank() {
        // f = 1: p1 >= 0.5, p2 >= 2/3, p3 >= 0.75, p4 >= 0.8.
        let cs = vec![cand(0, 0.99), cand(1, 0.7), cand(2, 0.76), cand(3, 0.79)];
        let chosen = choose(Schedule::Factor { factor: 1.0 }, Selection::Confidence, cs, 0);
        // Sorted: 0.99, 0.79, 0.76, 0.7 -> 0.99 ok, 0.79 ok, 0.76 ok, 0.7 < 0.8 stops.
        assert_eq!(chosen.len(), 3);
    }

    #[test]
    fn fixed_takes_quota_by_selection() {
        let mut cs = vec![cand(0, 0.5), cand(1, 0.6), cand(2, 0.7)];
        cs[0].runner_up = 0.0; // margin 0.5
        cs[1].runner_up = 0.55; // margin 0.05
        cs[2].runner_up = 0.3; // margin 0.4
        let chosen = choose(Schedule::Fixed, Selection::Margin, cs.clone(), 2);
        let positions: Vec<_> = chosen.iter().map(|c| c.position).collect();
        assert_eq!(positions, vec![0, 2]);
        let chosen = choose(Schedule::Fixed, Selection::Confidence, cs, 2);
        let positions: Vec<_> = chosen.iter().map(|c| c.position).collect();
        assert_eq!(positions, vec![2, 1]);
    }

    #[test]
    fn entropy_prefers_peaked_positions() {
        let mut cs = vec![cand(0, 0.5), cand(1, 0.5)];
        cs[0].entropy = 2.0;
        cs[1].entropy = 0.1;
        let chosen = choose(Schedule::Fixed, Selection::Entropy, cs, 1);
        assert_eq!(chosen[0].position, 1);
    }

    const M: i32 = -1;

    fn proposing(position: usize, token: i32, prob: f32) -> Candidate {
        Candidate {
            token,
            ..cand(position, prob)
        }
    }

    fn kept(chosen: Vec<Candidate>, tokens: &[i32]) -> Vec<usize> {
        defer_repeats(chosen, tokens, M).iter().map(|c| c.position).collect()
    }

    #[test]
    fn a_piece_said_twice_waits_unless_it_is_the_best() {
        // "$14.95" decided, "5" proposed after it and a "for" after that.
        let tokens = [10, 11, 12, 5, M, M];
        assert_eq!(
            kept(vec![proposing(5, 20, 0.99), proposing(4, 5, 0.95)], &tokens),
            vec![5]
        );
        // Two neighbours proposing the same piece: the better one goes first, the other waits.
        let tokens = [10, M, M, 12];
        assert_eq!(
            kept(vec![proposing(2, 7, 0.99), proposing(1, 7, 0.95)], &tokens),
            vec![2]
        );
        // The best candidate is kept even where it repeats: every step makes progress.
        assert_eq!(kept(vec![proposing(4, 5, 0.95)], &[10, 11, 12, 5, M]), vec![4]);
        // A different piece is no repeat.
        assert_eq!(
            kept(vec![proposing(2, 7, 0.99), proposing(1, 8, 0.95)], &tokens),
            vec![2, 1]
        );
    }

    #[test]
    fn a_word_of_several_pieces_said_twice_waits() {
        // "The Head lamp [ ] [ ] has": "Head lamp" again would say the word twice.
        let tokens = [1, 30, 31, M, M, 40];
        assert_eq!(
            kept(vec![proposing(3, 30, 0.99), proposing(4, 31, 0.97)], &tokens),
            vec![3]
        );
        // Spans past REPEAT_SPAN are not looked for: a long phrase may come back.
        let long: Vec<i32> = (0..5).chain(0..4).chain([M]).collect();
        assert_eq!(
            kept(vec![proposing(0, 0, 0.99), proposing(9, 4, 0.9)], &long),
            vec![0, 9]
        );
        // A masked position between the copies is no repeat (yet).
        assert!(!repeats_at(&[30, 31, M, 30, 31], 4, M));
        assert!(repeats_at(&[30, 31, 30, 31, 7], 3, M));
        assert!(!repeats_at(&[30, 31, 30, 31, 7], 4, M));
    }

    #[test]
    fn fixed_quota_spreads_remainder_first() {
        // 32 positions over 5 steps: 7, 7, 6, 6, 6.
        let mut left = 32;
        let mut quotas = vec![];
        for steps_left in (1..=5).rev() {
            let q = fixed_quota(left, steps_left);
            quotas.push(q);
            left -= q;
        }
        assert_eq!(quotas, vec![7, 7, 6, 6, 6]);
        assert_eq!(fixed_quota(3, 0), 3);
    }
}
