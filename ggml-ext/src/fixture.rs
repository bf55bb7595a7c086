//! Small random-weight models that llama.cpp loads as real GGUF files.
//!
//! A fixture has the exact tensor layout of a LLaDA (or, on request, Dream) model, a byte-level BPE vocabulary (every byte
//! is a token, so any text tokenizes), ChatML control tokens, a mask token and a ChatML chat
//! template. Its replies are gibberish, but every code path that does not depend on meaning (the
//! protocol, the denoising loop, caching, batching) runs exactly as with a trained model. The same
//! tensors can be written under the `llama` architecture: llama.cpp then runs the identical graph
//! with causal attention and a KV cache, which later serves as an oracle for cached attention.

use std::path::Path;

use crate::gguf::GgufError;
use crate::model::{write_model, Architecture, Hyperparams, Vocabulary, CHATML_TEMPLATE, TOKEN_CONTROL, TOKEN_NORMAL};

/// Control tokens appended after the byte and merge tokens, in this order.
pub const SPECIAL_TOKENS: [&str; 4] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mdm_mask|>"];

/// A few merges so the BPE path is exercised.
const MERGES: [(&str, &str); 6] = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("o", "u")];

/// Shape and seed of a fixture model.
#[derive(Debug, Clone)]
pub struct FixtureSpec {
    pub hyperparams: Hyperparams,
    pub seed: u64,
}

impl Default for FixtureSpec {
    fn default() -> Self {
        Self {
            hyperparams: Hyperparams {
                architecture: Architecture::Llada,
                n_embd: 64,
                n_head: 4,
                n_head_kv: 4,
                n_ff: 128,
                n_layer: 2,
                context_length: 2048,
                rope_freq_base: 10_000.0,
                rms_eps: 1e-5,
                tied_embeddings: false,
            },
            seed: 42,
        }
    }
}

/// The GPT-2 byte-to-unicode table: printable bytes map to themselves, the rest to code points
/// from U+0100 upwards, so every byte has a visible, distinct character.
pub fn byte_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        table[b as usize] = if printable {
            char::from(b)
        } else {
            let c = char::from_u32(next).expect("valid code point");
            next += 1;
            c
        };
    }
    table
}

/// The fixture vocabulary: 256 byte tokens, one token per merge, then [`SPECIAL_TOKENS`].
pub fn vocabulary() -> Vocabulary {
    let mut tokens: Vec<String> = byte_to_unicode().iter().map(|c| c.to_string()).collect();
    let mut types = vec![TOKEN_NORMAL; tokens.len()];
    let mut merges = Vec::new();
    for (a, b) in MERGES {
        merges.push(format!("{a} {b}"));
        tokens.push(format!("{a}{b}"));
        types.push(TOKEN_NORMAL);
    }
    for special in SPECIAL_TOKENS {
        tokens.push(special.to_owned());
        types.push(TOKEN_CONTROL);
    }
    let id = |name: &str| tokens.iter().position(|t| t == name).expect("special token present") as u32;
    Vocabulary {
        end_of_text: id("<|endoftext|>"),
        end_of_turn: id("<|im_end|>"),
        mask: id("<|mdm_mask|>"),
        pre: "default".into(),
        tokens,
        types,
        merges,
    }
}

/// Deterministic xorshift64* stream of uniform values in [-1, 1).
struct Rng(u64);

impl Rng {
    fn next_unit(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let bits = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40;
        (bits as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// Values with standard deviation `std` (uniform, so the scale is sqrt(3) * std).
    fn fill(&mut self, n: usize, std: f32) -> Vec<f32> {
        let scale = std * 3f32.sqrt();
        (0..n).map(|_| self.next_unit() * scale).collect()
    }
}

/// Writes a random-weight fixture model to `path`.
pub fn write_llada_fixture(path: &Path, spec: &FixtureSpec) -> Result<(), GgufError> {
    let vocab = vocabulary();
    let hp = &spec.hyperparams;
    let mut rng = Rng(spec.seed.max(1));
    let tensors = hp
        .tensor_shapes(vocab.tokens.len())
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let data = if name.ends_with(".bias") {
                rng.fill(n, 0.5)
            } else if shape.len() == 1 {
                vec![1.0; n]
            } else if name == "token_embd.weight" {
                rng.fill(n, 1.0)
            } else if name == "output.weight" {
                // A larger output scale makes the random model's distributions peaked, so
                // confidence-based policies see a realistic spread of confidences.
                rng.fill(n, 4.0 / (shape[0] as f32).sqrt())
            } else {
                rng.fill(n, 1.0 / (shape[0] as f32).sqrt())
            };
            (name, shape, data)
        })
        .collect();
    write_model(path, hp, &vocab, CHATML_TEMPLATE, &[], tensors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_table_is_a_bijection() {
        let table = byte_to_unicode();
        let mut seen = std::collections::HashSet::new();
        assert!(table.iter().all(|c| seen.insert(*c)));
        assert_eq!(table[b'a' as usize], 'a');
        assert_eq!(table[b' ' as usize], 'Ġ');
    }

    #[test]
    fn vocabulary_ends_with_specials_and_has_merge_tokens() {
        let v = vocabulary();
        assert_eq!(v.tokens.len(), 256 + MERGES.len() + SPECIAL_TOKENS.len());
        assert_eq!(&v.tokens[v.tokens.len() - 4..], &SPECIAL_TOKENS.map(String::from));
        assert_eq!(v.types.iter().filter(|t| **t == TOKEN_CONTROL).count(), 4);
        for m in &v.merges {
            let joined: String = m.split(' ').collect();
            assert!(v.tokens.contains(&joined), "merge {m} has no token");
        }
        assert_eq!(v.tokens[v.mask as usize], "<|mdm_mask|>");
    }
}
