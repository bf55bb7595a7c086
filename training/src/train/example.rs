//! Training dialogs as packed examples, the unit the batches are drawn from.
//!
//! [`build_examples`] tokenizes each dialog into one [`Example`]: per assistant turn a [`ReplyTurn`] with
//! the tokens since the previous reply and the reply itself, so that the turns concatenated are the dialog's
//! ChatML render. A dialog is cut at the first reply that does not fit (too long for the canvas, past the
//! context, or a prompt that does not tokenize as a continuation). Reply tokens that repeat an order number
//! or product the user named weigh [`TrainConfig::copy_weight`](super::TrainConfig::copy_weight) in the
//! loss. [`SpecialIds`] are the special tokens' ids that batching needs.

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::corpus::{render_chatml, Dialog, Turn, IM_END, IM_START};
use crate::model::Objective;
use crate::tokenizer::{ENDOFTEXT, MASK};

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

/// One reply of a training dialog and the tokens between it and the reply before.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplyTurn {
    /// For the first reply the system prompt and the user turn, for later ones the `\n` after the previous
    /// `<|im_end|>` and the user turn; always ending in `<|im_start|>assistant\n`.
    pub prompt: Vec<u32>,
    /// The reply's content tokens and `<|im_end|>`, unpadded.
    pub reply: Vec<u32>,
    /// Loss weight of each reply token: [`TrainConfig::copy_weight`] where the token spells a slot value (an
    /// order number or product the user named), 1 elsewhere.
    pub reply_weights: Vec<f32>,
}

impl ReplyTurn {
    /// The loss weight of reply position `i`; padding past the reply weighs 1.
    pub(super) fn weight(&self, i: usize) -> f32 {
        self.reply_weights.get(i).copied().unwrap_or(1.0)
    }
}

/// One training dialog, packed: the turns' `prompt ++ reply` concatenated are the ChatML render of the
/// dialog, so every reply trains in one sequence instead of one sequence per reply that repeats the history.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub turns: Vec<ReplyTurn>,
    /// Tokens at the start of the first prompt that are the system prompt's message, which the
    /// cached engine prefills as a chunk of its own (`model.share_system_prompt`); 0 where it does
    /// not tokenize apart from the first user turn.
    pub system_len: usize,
}

impl Example {
    /// Tokens in the packed sequence: the dialog for next-token; for diffusion (at most) every reply padded
    /// to `reply_len` and, for the turns after it, a clean copy of every reply but the last.
    pub fn packed_len(&self, objective: Objective, reply_len: usize) -> usize {
        let dialog: usize = self.turns.iter().map(|t| t.prompt.len() + t.reply.len()).sum();
        match objective {
            Objective::Autoregressive => dialog,
            Objective::Diffusion => {
                let last = self.turns.last().map_or(0, |t| t.reply.len());
                dialog - last + self.turns.len() * reply_len
            }
        }
    }

    /// The replies in the example.
    pub fn replies(&self) -> usize {
        self.turns.len()
    }

    /// The longest prompt of the example's replies: all the turns before its last reply, in tokens.
    pub fn longest_prompt(&self) -> usize {
        let before_last: usize = self
            .turns
            .iter()
            .rev()
            .skip(1)
            .map(|t| t.prompt.len() + t.reply.len())
            .sum();
        before_last + self.turns.last().map_or(0, |t| t.prompt.len())
    }
}

/// Turns dialogs into packed examples. A dialog is cut before a reply longer than `reply_len` (with
/// `<|im_end|>`), before one whose prompt and padded reply would pass `max_len`, and before one whose
/// prompt does not tokenize as a continuation of the turns before it. Returns the examples and the number of
/// replies left out.
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
    let system_ids = encode(&render_chatml(system, &[]))?.get_ids().to_vec();
    let mut examples = Vec::new();
    let mut skipped = 0;
    for dialog in dialogs {
        let mut turns = Vec::new();
        // The dialog's tokens so far; with this reply padded, the packed diffusion sequence.
        let mut history: Vec<u32> = Vec::new();
        let replies = dialog
            .turns
            .iter()
            .filter(|t| matches!(t, Turn::Assistant { .. }))
            .count();
        for (i, turn) in dialog.turns.iter().enumerate() {
            let Turn::Assistant { content } = turn else { continue };
            let mut prompt_text = render_chatml(system, &dialog.turns[..i]);
            prompt_text.push_str(IM_START);
            prompt_text.push_str("assistant\n");
            let full_prompt = encode(&prompt_text)?.get_ids().to_vec();
            let encoded = encode(content)?;
            let mut reply = encoded.get_ids().to_vec();
            reply.push(ids.im_end);
            let Some(prompt) = full_prompt.strip_prefix(history.as_slice()) else {
                break;
            };
            if reply.len() > reply_len || history.len() + prompt.len() + reply_len > max_len {
                break;
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
            let prompt = prompt.to_vec();
            history.extend_from_slice(&prompt);
            history.extend_from_slice(&reply);
            turns.push(ReplyTurn {
                prompt,
                reply,
                reply_weights,
            });
        }
        skipped += replies - turns.len();
        if !turns.is_empty() {
            let system_len = if turns[0].prompt.starts_with(&system_ids) && turns[0].prompt.len() > system_ids.len() {
                system_ids.len()
            } else {
                0
            };
            examples.push(Example { turns, system_len });
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

/// Special-token ids of the tests' four-token fixtures.
#[cfg(test)]
pub(super) const TEST_IDS: SpecialIds = SpecialIds {
    end_of_text: 0,
    im_start: 1,
    im_end: 2,
    mask: 3,
};

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::corpus::{generate, test_config, Corpus};
    use crate::domain::northwind;
    use crate::tokenizer::{train_on_dialogs, TokenizerConfig};
    use crate::train::autoregressive_batch;

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

    #[test]
    fn tokens_that_copy_a_slot_value_weigh_more() {
        let (_, tok, examples) = northwind_examples(9, 200);
        let mut copied_replies = 0;
        for e in &examples {
            let mut context = Vec::new();
            for turn in &e.turns {
                context.extend_from_slice(&turn.prompt);
                assert_eq!(turn.reply_weights.len(), turn.reply.len());
                let heavy: Vec<u32> = turn
                    .reply
                    .iter()
                    .zip(&turn.reply_weights)
                    .filter(|(_, &w)| w == 3.0)
                    .map(|(&t, _)| t)
                    .collect();
                if heavy.is_empty() {
                    assert!(turn.reply_weights.iter().all(|&w| w == 1.0));
                } else {
                    copied_replies += 1;
                    // The heavy tokens spell a value that the conversation so far already contains.
                    let heavy_text = tok.decode(&heavy, false).unwrap();
                    let value = heavy_text.trim();
                    assert!(
                        value.starts_with("NW-") || value.split(' ').count() >= 2,
                        "{heavy_text:?}"
                    );
                    let context_text = tok.decode(&context, false).unwrap();
                    assert!(context_text.contains(value), "{value:?} is not in the conversation");
                }
                context.extend_from_slice(&turn.reply);
            }
        }
        assert!(copied_replies > 20, "{copied_replies}");
        // The next-token batch carries the weights.
        let copy = examples
            .iter()
            .find(|e| e.turns.iter().any(|t| t.reply_weights.contains(&3.0)))
            .unwrap();
        let lb = autoregressive_batch(&[copy], TEST_IDS, &Device::Cpu).unwrap();
        let max = lb.weights.iter().cloned().fold(0.0, f32::max);
        let min = lb.weights.iter().cloned().fold(f32::MAX, f32::min);
        assert!((max / min - 3.0).abs() < 1e-4);
    }

    #[test]
    fn a_packed_example_is_the_chatml_render_of_its_dialog() {
        let (corpus, tok, examples) = northwind_examples(5, 40);
        assert_eq!(examples.len(), corpus.train.len());
        let system = &northwind().assistant.system_prompt;
        for (dialog, ex) in corpus.train.iter().zip(&examples) {
            assert_eq!(ex.replies(), dialog.turns.len() / 2);
            let mut tokens = Vec::new();
            for turn in &ex.turns {
                assert!(tok
                    .decode(&turn.prompt, false)
                    .unwrap()
                    .ends_with("<|im_start|>assistant\n"));
                assert_eq!(*turn.reply.last().unwrap(), tok.token_to_id(IM_END).unwrap());
                tokens.extend_from_slice(&turn.prompt);
                tokens.extend_from_slice(&turn.reply);
            }
            let rendered = render_chatml(system, &dialog.turns);
            assert_eq!(tok.decode(&tokens, false).unwrap(), rendered.trim_end_matches('\n'));
            // The system prompt's chunk is its message, as the engine renders it alone.
            let system_chunk = tok.decode(&ex.turns[0].prompt[..ex.system_len], false).unwrap();
            assert_eq!(system_chunk, render_chatml(system, &[]));
        }
    }

    #[test]
    fn the_longest_prompt_is_the_last_replys_prompt_as_the_service_tokenizes_it() {
        let (corpus, tok, examples) = northwind_examples(5, 40);
        let system = &northwind().assistant.system_prompt;
        for (dialog, ex) in corpus.train.iter().zip(&examples) {
            let last_reply = dialog.turns.len() - 1;
            let mut prompt = render_chatml(system, &dialog.turns[..last_reply]);
            prompt.push_str("<|im_start|>assistant\n");
            assert_eq!(
                ex.longest_prompt(),
                tok.encode(prompt.as_str(), false).unwrap().len(),
                "{}",
                dialog.id
            );
        }
    }
}
