//! Small random-weight models that llama.cpp loads as real GGUF files.
//!
//! A fixture has the exact tensor layout of a LLaDA model, a byte-level BPE vocabulary (every byte
//! is a token, so any text tokenizes), ChatML control tokens, a mask token and a ChatML chat
//! template. Its replies are gibberish, but every code path that does not depend on meaning (the
//! protocol, the denoising loop, caching, batching) runs exactly as with a trained model. The same
//! tensors can be written under the `llama` architecture: llama.cpp then runs the identical graph
//! with causal attention and a KV cache, which later serves as an oracle for cached attention.

use std::path::Path;

use crate::gguf::{GgufError, GgufWriter};

/// Control tokens appended after the byte and merge tokens, in this order.
pub const SPECIAL_TOKENS: [&str; 4] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mdm_mask|>"];

/// A ChatML template that llama.cpp's built-in template detection recognises.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// A few merges so the BPE path is exercised; llama.cpp refuses a `gpt2` vocabulary without any.
const MERGES: [(&str, &str); 6] = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("o", "u")];

/// GGUF token types (llama.cpp's `llama_token_type`).
const TOKEN_NORMAL: i32 = 1;
const TOKEN_CONTROL: i32 = 3;

/// Which architecture name the tensors are written under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// `llada`: llama.cpp's diffusion path (non-causal, no KV cache).
    Llada,
    /// `llama`: the same graph, causal by default, with a KV cache.
    Llama,
}

impl Architecture {
    pub fn name(self) -> &'static str {
        match self {
            Architecture::Llada => "llada",
            Architecture::Llama => "llama",
        }
    }
}

/// Shape and seed of a fixture model.
#[derive(Debug, Clone)]
pub struct FixtureSpec {
    pub architecture: Architecture,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub n_ff: usize,
    pub n_layer: usize,
    pub context_length: usize,
    pub seed: u64,
}

impl Default for FixtureSpec {
    fn default() -> Self {
        Self {
            architecture: Architecture::Llada,
            n_embd: 64,
            n_head: 4,
            n_head_kv: 4,
            n_ff: 128,
            n_layer: 2,
            context_length: 2048,
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
pub fn vocabulary() -> (Vec<String>, Vec<i32>, Vec<String>) {
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
    (tokens, types, merges)
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
    let (tokens, types, merges) = vocabulary();
    let n_vocab = tokens.len();
    let special_id = |name: &str| (tokens.iter().position(|t| t == name).expect("special token present")) as u32;
    let arch = spec.architecture.name();
    let head_dim = spec.n_embd / spec.n_head;
    let n_embd_kv = head_dim * spec.n_head_kv;

    let mut w = GgufWriter::new();
    w.set_str("general.architecture", arch)?
        .set_str("general.name", "dllm-chat random fixture")?
        .set_u32(&format!("{arch}.context_length"), spec.context_length as u32)?
        .set_u32(&format!("{arch}.embedding_length"), spec.n_embd as u32)?
        .set_u32(&format!("{arch}.block_count"), spec.n_layer as u32)?
        .set_u32(&format!("{arch}.feed_forward_length"), spec.n_ff as u32)?
        .set_u32(&format!("{arch}.attention.head_count"), spec.n_head as u32)?
        .set_u32(&format!("{arch}.attention.head_count_kv"), spec.n_head_kv as u32)?
        .set_f32(&format!("{arch}.rope.freq_base"), 10_000.0)?
        .set_f32(&format!("{arch}.attention.layer_norm_rms_epsilon"), 1e-5)?
        .set_u32(&format!("{arch}.vocab_size"), n_vocab as u32)?
        .set_str("tokenizer.ggml.model", "gpt2")?
        .set_str("tokenizer.ggml.pre", "default")?
        .set_str_array("tokenizer.ggml.tokens", &tokens)?
        .set_i32_array("tokenizer.ggml.token_type", &types)?
        .set_str_array("tokenizer.ggml.merges", &merges)?
        .set_u32("tokenizer.ggml.bos_token_id", special_id("<|endoftext|>"))?
        .set_u32("tokenizer.ggml.eos_token_id", special_id("<|endoftext|>"))?
        .set_u32("tokenizer.ggml.eot_token_id", special_id("<|im_end|>"))?
        .set_u32("tokenizer.ggml.padding_token_id", special_id("<|endoftext|>"))?
        .set_u32("tokenizer.ggml.mask_token_id", special_id("<|mdm_mask|>"))?
        .set_bool("tokenizer.ggml.add_bos_token", false)?
        .set_bool("tokenizer.ggml.add_eos_token", false)?
        .set_str("tokenizer.chat_template", CHATML_TEMPLATE)?;

    let mut rng = Rng(spec.seed.max(1));
    let e = spec.n_embd;
    let proj = |rng: &mut Rng, n_in: usize, n_out: usize| rng.fill(n_in * n_out, 1.0 / (n_in as f32).sqrt());
    w.add_f32("token_embd.weight", &[e, n_vocab], rng.fill(e * n_vocab, 1.0))?;
    for l in 0..spec.n_layer {
        w.add_f32(&format!("blk.{l}.attn_norm.weight"), &[e], vec![1.0; e])?
            .add_f32(&format!("blk.{l}.attn_q.weight"), &[e, e], proj(&mut rng, e, e))?
            .add_f32(
                &format!("blk.{l}.attn_k.weight"),
                &[e, n_embd_kv],
                proj(&mut rng, e, n_embd_kv),
            )?
            .add_f32(
                &format!("blk.{l}.attn_v.weight"),
                &[e, n_embd_kv],
                proj(&mut rng, e, n_embd_kv),
            )?
            .add_f32(&format!("blk.{l}.attn_output.weight"), &[e, e], proj(&mut rng, e, e))?
            .add_f32(&format!("blk.{l}.ffn_norm.weight"), &[e], vec![1.0; e])?
            .add_f32(
                &format!("blk.{l}.ffn_gate.weight"),
                &[e, spec.n_ff],
                proj(&mut rng, e, spec.n_ff),
            )?
            .add_f32(
                &format!("blk.{l}.ffn_up.weight"),
                &[e, spec.n_ff],
                proj(&mut rng, e, spec.n_ff),
            )?
            .add_f32(
                &format!("blk.{l}.ffn_down.weight"),
                &[spec.n_ff, e],
                proj(&mut rng, spec.n_ff, e),
            )?;
    }
    w.add_f32("output_norm.weight", &[e], vec![1.0; e])?;
    // A larger output scale makes the random model's distributions peaked, so confidence-based
    // policies see a realistic spread of confidences instead of a flat distribution.
    w.add_f32(
        "output.weight",
        &[e, n_vocab],
        rng.fill(e * n_vocab, 4.0 / (e as f32).sqrt()),
    )?;
    w.write(path)
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
        let (tokens, types, merges) = vocabulary();
        assert_eq!(tokens.len(), 256 + MERGES.len() + SPECIAL_TOKENS.len());
        assert_eq!(&tokens[tokens.len() - 4..], &SPECIAL_TOKENS.map(String::from));
        assert_eq!(types.iter().filter(|t| **t == TOKEN_CONTROL).count(), 4);
        for m in &merges {
            let joined: String = m.split(' ').collect();
            assert!(tokens.contains(&joined), "merge {m} has no token");
        }
    }
}
