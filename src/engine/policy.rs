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
