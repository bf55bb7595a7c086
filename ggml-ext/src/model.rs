//! Writing a complete diffusion (or twin) model file: hyper-parameters, a byte-level BPE
//! vocabulary with ChatML control tokens, a chat template, and the weights under llama.cpp's
//! tensor names. The random fixtures and the trained export both go through [`write_model`], so
//! a file that loads in the tests is laid out exactly like a shipped one.

use std::path::Path;

use crate::gguf::{GgufError, GgufWriter};

/// GGUF token types (llama.cpp's `llama_token_type`).
pub const TOKEN_NORMAL: i32 = 1;
pub const TOKEN_CONTROL: i32 = 3;

/// A ChatML template that llama.cpp's built-in template detection recognises.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Which architecture name the tensors are written under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// `llada`: llama.cpp's diffusion path (non-causal, no KV cache).
    Llada,
    /// `llama`: the same graph, causal by default, with a KV cache (the autoregressive twin).
    Llama,
    /// `dream`: the qwen2 layout (biased Q/K/V projections, NEOX RoPE), non-causal.
    Dream,
}

/// The key llama.cpp's converter writes for diffusion models: whether the logits at position `i`
/// predict token `i + 1` (Dream's convention, `true`) or token `i` itself (LLaDA's, `false`).
/// llama.cpp's diffusion example assumes `true` when the key is missing.
pub const SHIFT_LOGITS_KEY: &str = "diffusion.shift_logits";

impl Architecture {
    /// The value of [`SHIFT_LOGITS_KEY`] a file of this architecture carries; `None` for the
    /// autoregressive `llama`, which is no diffusion model.
    pub fn shift_logits(self) -> Option<bool> {
        match self {
            Architecture::Llada => Some(false),
            Architecture::Dream => Some(true),
            Architecture::Llama => None,
        }
    }

    /// The architecture of a `general.architecture` name.
    pub fn from_name(name: &str) -> Option<Self> {
        [Architecture::Llada, Architecture::Llama, Architecture::Dream]
            .into_iter()
            .find(|a| a.name() == name)
    }

    pub fn name(self) -> &'static str {
        match self {
            Architecture::Llada => "llada",
            Architecture::Llama => "llama",
            Architecture::Dream => "dream",
        }
    }
}

/// Transformer shape (LLaDA / llama layout: RMSNorm, RoPE, SwiGLU).
#[derive(Debug, Clone, PartialEq)]
pub struct Hyperparams {
    pub architecture: Architecture,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub n_ff: usize,
    pub n_layer: usize,
    pub context_length: usize,
    pub rope_freq_base: f32,
    pub rms_eps: f32,
    /// The output projection is `token_embd` itself, so the file has no `output.weight`; llama.cpp and
    /// the cached engine both read logits through the token embedding then.
    pub tied_embeddings: bool,
}

impl Hyperparams {
    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }

    pub fn n_embd_kv(&self) -> usize {
        self.head_dim() * self.n_head_kv
    }

    /// Every tensor the architecture needs, as (name, shape in ggml order), for a vocabulary of
    /// `n_vocab` tokens.
    pub fn tensor_shapes(&self, n_vocab: usize) -> Vec<(String, Vec<usize>)> {
        let (e, kv, ff) = (self.n_embd, self.n_embd_kv(), self.n_ff);
        let mut shapes = vec![("token_embd.weight".to_owned(), vec![e, n_vocab])];
        for l in 0..self.n_layer {
            for (name, shape) in [
                ("attn_norm", vec![e]),
                ("attn_q", vec![e, e]),
                ("attn_k", vec![e, kv]),
                ("attn_v", vec![e, kv]),
                ("attn_output", vec![e, e]),
                ("ffn_norm", vec![e]),
                ("ffn_gate", vec![e, ff]),
                ("ffn_up", vec![e, ff]),
                ("ffn_down", vec![ff, e]),
            ] {
                shapes.push((format!("blk.{l}.{name}.weight"), shape));
            }
            if self.architecture == Architecture::Dream {
                for (name, n) in [("attn_q", e), ("attn_k", kv), ("attn_v", kv)] {
                    shapes.push((format!("blk.{l}.{name}.bias"), vec![n]));
                }
            }
        }
        shapes.push(("output_norm.weight".to_owned(), vec![e]));
        if !self.tied_embeddings {
            shapes.push(("output.weight".to_owned(), vec![e, n_vocab]));
        }
        shapes
    }
}

/// A byte-level BPE vocabulary as llama.cpp's `gpt2` tokenizer model stores it.
#[derive(Debug, Clone, PartialEq)]
pub struct Vocabulary {
    /// Token strings in id order (GPT-2 byte-to-unicode form for byte tokens).
    pub tokens: Vec<String>,
    /// [`TOKEN_NORMAL`] or [`TOKEN_CONTROL`] per token.
    pub types: Vec<i32>,
    /// Merges as `"left right"`; llama.cpp refuses a `gpt2` vocabulary without any.
    pub merges: Vec<String>,
    /// llama.cpp's pre-tokenizer name (`tokenizer.ggml.pre`), e.g. `qwen2` or `default`.
    pub pre: String,
    pub end_of_text: u32,
    pub end_of_turn: u32,
    pub mask: u32,
}

/// Our own key: the longest prompt (in tokens) the model was trained on. The service fits
/// conversations into it by default (`model.history_window = "trained"`).
pub const TRAINED_PROMPT_KEY: &str = "dllm.trained_prompt_tokens";

/// The value of a scalar metadata key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyValue {
    Bool(bool),
    U32(u32),
}

/// Writes a model file: metadata, vocabulary, chat template, the `extra` keys (after the others)
/// and `tensors` (name, shape, data).
pub fn write_model(
    path: &Path,
    hp: &Hyperparams,
    vocab: &Vocabulary,
    chat_template: &str,
    extra: &[(&str, KeyValue)],
    tensors: Vec<(String, Vec<usize>, Vec<f32>)>,
) -> Result<(), GgufError> {
    let arch = hp.architecture.name();
    let mut w = GgufWriter::new();
    w.set_str("general.architecture", arch)?
        .set_str("general.name", "dllm-chat model")?
        .set_u32(&format!("{arch}.context_length"), hp.context_length as u32)?
        .set_u32(&format!("{arch}.embedding_length"), hp.n_embd as u32)?
        .set_u32(&format!("{arch}.block_count"), hp.n_layer as u32)?
        .set_u32(&format!("{arch}.feed_forward_length"), hp.n_ff as u32)?
        .set_u32(&format!("{arch}.attention.head_count"), hp.n_head as u32)?
        .set_u32(&format!("{arch}.attention.head_count_kv"), hp.n_head_kv as u32)?
        .set_f32(&format!("{arch}.rope.freq_base"), hp.rope_freq_base)?
        .set_f32(&format!("{arch}.attention.layer_norm_rms_epsilon"), hp.rms_eps)?
        .set_u32(&format!("{arch}.vocab_size"), vocab.tokens.len() as u32)?
        .set_str("tokenizer.ggml.model", "gpt2")?
        .set_str("tokenizer.ggml.pre", &vocab.pre)?
        .set_str_array("tokenizer.ggml.tokens", &vocab.tokens)?
        .set_i32_array("tokenizer.ggml.token_type", &vocab.types)?
        .set_str_array("tokenizer.ggml.merges", &vocab.merges)?
        .set_u32("tokenizer.ggml.bos_token_id", vocab.end_of_text)?
        .set_u32("tokenizer.ggml.eos_token_id", vocab.end_of_text)?
        .set_u32("tokenizer.ggml.eot_token_id", vocab.end_of_turn)?
        .set_u32("tokenizer.ggml.padding_token_id", vocab.end_of_text)?
        .set_u32("tokenizer.ggml.mask_token_id", vocab.mask)?
        .set_bool("tokenizer.ggml.add_bos_token", false)?
        .set_bool("tokenizer.ggml.add_eos_token", false)?
        .set_str("tokenizer.chat_template", chat_template)?;
    if let Some(shift) = hp.architecture.shift_logits() {
        w.set_bool(SHIFT_LOGITS_KEY, shift)?;
    }
    for &(key, value) in extra {
        match value {
            KeyValue::Bool(v) => w.set_bool(key, v)?,
            KeyValue::U32(v) => w.set_u32(key, v)?,
        };
    }
    for (name, shape, data) in tensors {
        w.add_f32(&name, &shape, data)?;
    }
    w.write(path)
}
