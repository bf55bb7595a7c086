//! The LLaDA / llama transformer in candle, written to compute exactly what llama.cpp's `llada` and `llama`
//! graphs compute, so that exported weights reproduce the trained function.
//!
//! Per layer: `h = x + attn(rmsnorm(x))`, then `h + ffn(rmsnorm(h))` with the SwiGLU
//! `ffn_down(silu(ffn_gate(x)) * ffn_up(x))`; a final RMSNorm and an output projection, its own matrix or
//! (`tied_embeddings`) the token embedding, as llama.cpp reads a file without `output.weight`. Attention has
//! as many key/value heads as query heads, scale `1/sqrt(head_dim)` and RoPE in llama.cpp's "normal" layout
//! (`LLAMA_ROPE_TYPE_NORM`, which `llama_model_rope_type` returns for both `LLM_ARCH_LLAMA` and
//! `LLM_ARCH_LLADA`): adjacent pairs `(x[2i], x[2i+1])` rotate by `pos * base^(-2i/head_dim)`. Linear layers
//! have no biases. The diffusion model attends to every non-padding key; the autoregressive twin is causal.
//!
//! Every parameter lives in a [`VarMap`] under its GGUF tensor name (`token_embd.weight`,
//! `blk.N.attn_q.weight`, ...), so a checkpoint written with [`VarMap::save`] maps one to one onto the
//! exported file. candle keeps a linear weight as `(out, in)` and the embedding as `(vocab, embd)`; read
//! row-major, that is exactly the data of the ggml tensors of shape `[in, out]` and `[embd, vocab]`.

use std::collections::HashMap;

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Module, Result, Tensor, Var, D};
use candle_nn::{Linear, VarMap};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// Which graph the model runs and which loss trains it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Objective {
    /// LLaDA masked diffusion: non-causal attention, exported as `llada`.
    Diffusion,
    /// The same-size twin: causal attention, next-token loss, exported as `llama`.
    Autoregressive,
}

impl Objective {
    pub fn causal(self) -> bool {
        self == Objective::Autoregressive
    }

    pub fn name(self) -> &'static str {
        match self {
            Objective::Diffusion => "diffusion",
            Objective::Autoregressive => "autoregressive",
        }
    }

    pub fn architecture(self) -> ggml_ext::Architecture {
        match self {
            Objective::Diffusion => ggml_ext::Architecture::Llada,
            Objective::Autoregressive => ggml_ext::Architecture::Llama,
        }
    }
}

impl std::str::FromStr for Objective {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "diffusion" | "llada" => Ok(Objective::Diffusion),
            "autoregressive" | "ar" | "llama" => Ok(Objective::Autoregressive),
            other => Err(format!("unknown objective {other:?} (diffusion | autoregressive)")),
        }
    }
}

/// The transformer's shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub vocab_size: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_ff: usize,
    /// Written to the GGUF; the trained positions are far fewer.
    pub context_length: usize,
    pub rope_freq_base: f32,
    pub rms_eps: f32,
    /// Logits through the token embedding instead of a separate output matrix, so writing a token the
    /// prompt holds does not depend on a trained output row for that token.
    #[serde(default)]
    pub tied_embeddings: bool,
}

impl ModelConfig {
    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.n_head == 0 || self.n_embd % self.n_head != 0 {
            return Err(format!(
                "n_embd {} is not a multiple of n_head {}",
                self.n_embd, self.n_head
            ));
        }
        if self.head_dim() % 2 != 0 {
            return Err(format!("head_dim {} must be even for RoPE", self.head_dim()));
        }
        if self.n_layer == 0 || self.n_ff == 0 || self.vocab_size == 0 {
            return Err("n_layer, n_ff and vocab_size must be positive".into());
        }
        Ok(())
    }

    /// The GGUF hyper-parameters of this shape under `objective`'s architecture.
    pub fn hyperparams(&self, objective: Objective) -> ggml_ext::Hyperparams {
        ggml_ext::Hyperparams {
            architecture: objective.architecture(),
            n_embd: self.n_embd,
            n_head: self.n_head,
            n_head_kv: self.n_head,
            n_ff: self.n_ff,
            n_layer: self.n_layer,
            context_length: self.context_length,
            rope_freq_base: self.rope_freq_base,
            rms_eps: self.rms_eps,
            tied_embeddings: self.tied_embeddings,
        }
    }

    /// Every parameter as (GGUF name, candle shape), in GGUF order.
    pub fn parameter_shapes(&self) -> Vec<(String, Vec<usize>)> {
        self.hyperparams(Objective::Diffusion)
            .tensor_shapes(self.vocab_size)
            .into_iter()
            .map(|(name, mut shape)| {
                // ggml lists the fastest-varying dimension first; candle the slowest.
                shape.reverse();
                (name, shape)
            })
            .collect()
    }

    pub fn parameter_count(&self) -> usize {
        self.parameter_shapes()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }
}

/// Fills `varmap` with freshly initialised parameters drawn from `seed`: norms at 1, every matrix normal with
/// std 0.02, the two residual projections (`attn_output`, `ffn_down`) scaled down by `sqrt(2 * n_layer)`.
pub fn init_params(config: &ModelConfig, seed: u64, device: &Device) -> Result<VarMap> {
    let mut rng = StdRng::seed_from_u64(seed);
    let varmap = VarMap::new();
    {
        let mut data = varmap.data().lock().expect("varmap lock");
        for (name, shape) in config.parameter_shapes() {
            let len: usize = shape.iter().product();
            let values: Vec<f32> = if name.ends_with("norm.weight") {
                vec![1.0; len]
            } else {
                let std = if name.contains("attn_output") || name.contains("ffn_down") {
                    0.02 / ((2 * config.n_layer) as f32).sqrt()
                } else {
                    0.02
                };
                (0..len).map(|_| normal(&mut rng) * std).collect()
            };
            let tensor = Tensor::from_vec(values, shape, device)?;
            data.insert(name, Var::from_tensor(&tensor)?);
        }
    }
    Ok(varmap)
}

/// A standard normal sample (Box-Muller), so initialisation depends on nothing but the seed.
fn normal(rng: &mut StdRng) -> f32 {
    let u1: f64 = rng.random::<f64>().max(1e-12);
    let u2: f64 = rng.random::<f64>();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

struct Block {
    attn_norm: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ffn_norm: Tensor,
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// The transformer over the parameters of a [`VarMap`] (or of a loaded checkpoint).
pub struct Transformer {
    config: ModelConfig,
    embedding: Tensor,
    blocks: Vec<Block>,
    output_norm: Tensor,
    output: Linear,
    device: Device,
}

/// Where a token sits for attention: its RoPE position and its attention group. A query sees every key of
/// its own group and the keys of earlier groups that are `visible_later`; a packed dialog uses this to train
/// all its replies in one sequence while each reply sees only the conversation before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Place {
    pub position: u32,
    pub group: u32,
    pub visible_later: bool,
}

impl Place {
    pub fn new(position: u32, group: u32, visible_later: bool) -> Self {
        Place {
            position,
            group,
            visible_later,
        }
    }

    /// Position `position` of an unpacked sequence: one group, everything visible.
    pub fn plain(position: usize) -> Self {
        Place {
            position: position as u32,
            group: 0,
            visible_later: true,
        }
    }
}

/// One batch of right-padded sequences.
pub struct Batch {
    /// `(batch, seq)` token ids.
    pub tokens: Tensor,
    /// Which positions hold real tokens, per sequence (padding keys are masked out of attention).
    pub valid: Vec<Vec<bool>>,
    /// The place of every position, per sequence (padding included).
    pub places: Vec<Vec<Place>>,
}

impl Batch {
    /// Pads `sequences` with `pad` to the longest one; token `i` of a sequence sits at position `i`.
    pub fn new(sequences: &[Vec<u32>], pad: u32, device: &Device) -> Result<Self> {
        let placed: Vec<(Vec<u32>, Vec<Place>)> = sequences
            .iter()
            .map(|s| (s.clone(), (0..s.len()).map(Place::plain).collect()))
            .collect();
        Self::placed(&placed, pad, device)
    }

    /// Pads `sequences` (tokens and their places, equally long) with `pad` to the longest one.
    pub fn placed(sequences: &[(Vec<u32>, Vec<Place>)], pad: u32, device: &Device) -> Result<Self> {
        let len = sequences.iter().map(|(t, _)| t.len()).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(sequences.len() * len);
        let mut valid = Vec::with_capacity(sequences.len());
        let mut places = Vec::with_capacity(sequences.len());
        for (seq, place) in sequences {
            if seq.len() != place.len() {
                candle_core::bail!("{} tokens but {} places", seq.len(), place.len());
            }
            ids.extend_from_slice(seq);
            ids.extend(std::iter::repeat_n(pad, len - seq.len()));
            let mut v = vec![true; seq.len()];
            v.resize(len, false);
            valid.push(v);
            let mut p = place.clone();
            p.extend((seq.len()..len).map(Place::plain));
            places.push(p);
        }
        Ok(Batch {
            tokens: Tensor::from_vec(ids, (sequences.len(), len), device)?,
            valid,
            places,
        })
    }
}

impl Transformer {
    pub fn from_varmap(config: &ModelConfig, varmap: &VarMap) -> Result<Self> {
        let data = varmap.data().lock().expect("varmap lock");
        let tensors: HashMap<String, Tensor> = data.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect();
        Self::from_tensors(config, &tensors)
    }

    /// Builds the model over named tensors (GGUF names, candle shapes), checking every shape.
    pub fn from_tensors(config: &ModelConfig, tensors: &HashMap<String, Tensor>) -> Result<Self> {
        config.validate().map_err(candle_core::Error::msg)?;
        let shapes: HashMap<String, Vec<usize>> = config.parameter_shapes().into_iter().collect();
        let get = |name: &str| -> Result<Tensor> {
            let t = tensors
                .get(name)
                .ok_or_else(|| candle_core::Error::msg(format!("missing tensor {name}")))?;
            let want = &shapes[name];
            if t.dims() != want.as_slice() {
                candle_core::bail!("tensor {name} has shape {:?}, expected {want:?}", t.dims());
            }
            Ok(t.clone())
        };
        let lin = |name: String| -> Result<Linear> { Ok(Linear::new(get(&name)?, None)) };
        let mut blocks = Vec::with_capacity(config.n_layer);
        for l in 0..config.n_layer {
            blocks.push(Block {
                attn_norm: get(&format!("blk.{l}.attn_norm.weight"))?,
                q: lin(format!("blk.{l}.attn_q.weight"))?,
                k: lin(format!("blk.{l}.attn_k.weight"))?,
                v: lin(format!("blk.{l}.attn_v.weight"))?,
                o: lin(format!("blk.{l}.attn_output.weight"))?,
                ffn_norm: get(&format!("blk.{l}.ffn_norm.weight"))?,
                gate: lin(format!("blk.{l}.ffn_gate.weight"))?,
                up: lin(format!("blk.{l}.ffn_up.weight"))?,
                down: lin(format!("blk.{l}.ffn_down.weight"))?,
            });
        }
        let embedding = get("token_embd.weight")?;
        let device = embedding.device().clone();
        // Sharing the embedding's tensor makes backprop add both uses into its one gradient.
        let output = if config.tied_embeddings {
            Linear::new(embedding.clone(), None)
        } else {
            lin("output.weight".to_owned())?
        };
        Ok(Transformer {
            config: config.clone(),
            embedding,
            blocks,
            output_norm: get("output_norm.weight")?,
            output,
            device,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Hidden states after the last block, before the final norm: `(batch, seq, embd)`.
    pub fn hidden(&self, batch: &Batch, causal: bool) -> Result<Tensor> {
        let (b, t) = batch.tokens.dims2()?;
        let mask = attention_mask(batch, causal, &self.device)?;
        let (cos, sin) = self.rope_at(batch)?;
        let flat = batch.tokens.flatten_all()?;
        let mut x = self
            .embedding
            .index_select(&flat, 0)?
            .reshape((b, t, self.config.n_embd))?;
        for block in &self.blocks {
            let h = rms_norm(&x, &block.attn_norm, self.config.rms_eps)?;
            let a = self.attention(block, &h, &mask, &cos, &sin)?;
            x = (x + a)?;
            let h = rms_norm(&x, &block.ffn_norm, self.config.rms_eps)?;
            let f = block
                .down
                .forward(&(block.gate.forward(&h)?.silu()? * block.up.forward(&h)?)?)?;
            x = (x + f)?;
        }
        Ok(x)
    }

    /// cos and sin at every token's position: `(batch, 1, seq, head_dim/2)`.
    fn rope_at(&self, batch: &Batch) -> Result<(Tensor, Tensor)> {
        let (b, t) = batch.tokens.dims2()?;
        let flat: Vec<u32> = batch.places.iter().flatten().map(|p| p.position).collect();
        let longest = flat.iter().max().map_or(0, |&p| p as usize + 1);
        let (cos, sin) = rope_tables(
            longest,
            self.config.head_dim(),
            self.config.rope_freq_base,
            &self.device,
        )?;
        let index = Tensor::from_vec(flat, b * t, &self.device)?;
        let half = self.config.head_dim() / 2;
        let at = |table: Tensor| table.index_select(&index, 0)?.reshape((b, 1, t, half));
        Ok((at(cos)?, at(sin)?))
    }

    /// Logits for the rows of `hidden` (any leading shape, last dim embd).
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let h = rms_norm(hidden, &self.output_norm, self.config.rms_eps)?;
        self.output.forward(&h)
    }

    /// Logits at every position: `(batch, seq, vocab)`.
    pub fn forward(&self, batch: &Batch, causal: bool) -> Result<Tensor> {
        let h = self.hidden(batch, causal)?;
        self.logits(&h)
    }

    fn attention(&self, block: &Block, x: &Tensor, mask: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let (b, t, e) = x.dims3()?;
        let (nh, hd) = (self.config.n_head, self.config.head_dim());
        let split = |y: Tensor| -> Result<Tensor> { y.reshape((b, t, nh, hd))?.transpose(1, 2)?.contiguous() };
        let q = rope(&split(block.q.forward(x)?)?, cos, sin)?;
        let k = rope(&split(block.k.forward(x)?)?, cos, sin)?;
        let v = split(block.v.forward(x)?)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let scores = (q.matmul(&k.t()?.contiguous()?)? * scale)?.broadcast_add(mask)?;
        let probs = softmax_last(&scores)?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, e))?;
        block.o.forward(&out)
    }
}

/// `(batch, 1, seq, seq)` additive mask: 0 where query `i` may see key `j`, a large negative value where the
/// key is padding, (causal) in the future, or in another group that is not an earlier one's visible key.
/// Built with tensor ops on `device` from per-position vectors, so a GPU run does not spend each step
/// filling `batch * seq * seq` floats on the host.
pub fn attention_mask(batch: &Batch, causal: bool, device: &Device) -> Result<Tensor> {
    let b = batch.valid.len();
    let t = batch.valid.first().map_or(0, Vec::len);
    let per_position = |f: &dyn Fn(&Place, bool) -> f32| -> Result<Tensor> {
        let values: Vec<f32> = batch
            .places
            .iter()
            .zip(&batch.valid)
            .flat_map(|(places, valid)| places.iter().zip(valid).map(|(p, &v)| f(p, v)))
            .collect();
        Tensor::from_vec(values, (b, 1, t), device)
    };
    let group = per_position(&|p, _| p.group as f32)?;
    let visible = per_position(&|p, _| f32::from(u8::from(p.visible_later)))?;
    let valid = per_position(&|_, v| f32::from(u8::from(v)))?;
    let (query_group, key_group) = (group.reshape((b, 1, t, 1))?, group.reshape((b, 1, 1, t))?);
    let same = key_group.broadcast_eq(&query_group)?.to_dtype(DType::F32)?;
    let earlier = key_group.broadcast_lt(&query_group)?.to_dtype(DType::F32)?;
    let shown_earlier = earlier.broadcast_mul(&visible.reshape((b, 1, 1, t))?)?;
    let mut allowed = same
        .maximum(&shown_earlier)?
        .broadcast_mul(&valid.reshape((b, 1, 1, t))?)?;
    if causal {
        let index = Tensor::arange(0u32, t as u32, device)?;
        let past = index
            .reshape((1, t))?
            .broadcast_le(&index.reshape((t, 1))?)?
            .to_dtype(DType::F32)?;
        allowed = allowed.broadcast_mul(&past)?;
    }
    // 1 -> 0 and 0 -> -1e9.
    allowed.affine(1e9, -1e9)
}

/// cos and sin of `pos * base^(-2i/head_dim)` as `(seq, head_dim/2)` tables.
pub fn rope_tables(seq: usize, head_dim: usize, base: f32, device: &Device) -> Result<(Tensor, Tensor)> {
    let half = head_dim / 2;
    let mut cos = Vec::with_capacity(seq * half);
    let mut sin = Vec::with_capacity(seq * half);
    for pos in 0..seq {
        for i in 0..half {
            let theta = pos as f64 * (base as f64).powf(-2.0 * i as f64 / head_dim as f64);
            cos.push(theta.cos() as f32);
            sin.push(theta.sin() as f32);
        }
    }
    Ok((
        Tensor::from_vec(cos, (seq, half), device)?,
        Tensor::from_vec(sin, (seq, half), device)?,
    ))
}

/// RoPE in llama.cpp's normal layout on `(batch, head, seq, head_dim)`: each adjacent pair
/// `(x[2i], x[2i+1])` becomes `(x0 cos - x1 sin, x0 sin + x1 cos)`. `cos` and `sin` broadcast to
/// `(batch, head, seq, head_dim/2)`. Built from differentiable ops.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (b, h, t, d) = x.dims4()?;
    let pairs = x.reshape((b, h, t, d / 2, 2))?;
    let x0 = pairs.narrow(4, 0, 1)?.squeeze(4)?;
    let x1 = pairs.narrow(4, 1, 1)?.squeeze(4)?;
    let r0 = (x0.broadcast_mul(cos)? - x1.broadcast_mul(sin)?)?;
    let r1 = (x0.broadcast_mul(sin)? + x1.broadcast_mul(cos)?)?;
    Tensor::stack(&[r0, r1], 4)?.reshape((b, h, t, d))
}

/// llama.cpp's RMSNorm with a weight: `x / sqrt(mean(x^2) + eps) * w` over the last dimension.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let inv = (ms + eps as f64)?.sqrt()?.recip()?;
    x.broadcast_mul(&inv)?.broadcast_mul(weight)
}

/// Softmax over the last dimension from differentiable ops.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&sum)
}

/// Log-softmax over the last dimension from differentiable ops.
pub fn log_softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&lse)
}

/// Reads the tensors of a GGUF file this crate exported (or any file with the same tensor names), each
/// dequantized to F32 in candle's dimension order, so that training can continue from a shipped Q8_0 model.
pub fn load_gguf(path: &std::path::Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let mut file = std::fs::File::open(path)?;
    let content = gguf_file::Content::read(&mut file).map_err(|e| e.with_path(path))?;
    let mut tensors = HashMap::new();
    for name in content.tensor_infos.keys() {
        let tensor = content.tensor(&mut file, name, device)?.dequantize(device)?;
        tensors.insert(name.clone(), tensor.to_dtype(DType::F32)?);
    }
    Ok(tensors)
}

/// A GGUF file's `tokenizer.ggml.tokens`, in id order.
pub fn gguf_tokens(path: &std::path::Path) -> Result<Vec<String>> {
    let mut file = std::fs::File::open(path)?;
    let content = gguf_file::Content::read(&mut file).map_err(|e| e.with_path(path))?;
    match content.metadata.get("tokenizer.ggml.tokens") {
        Some(value) => value.to_vec()?.iter().map(|t| t.to_string().cloned()).collect(),
        None => candle_core::bail!("{} has no tokenizer.ggml.tokens", path.display()),
    }
}

/// Reads a checkpoint written by [`VarMap::save`].
pub fn load_checkpoint(path: &std::path::Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let tensors = candle_core::safetensors::load(path, device)?;
    tensors
        .into_iter()
        .map(|(k, v)| Ok((k, v.to_dtype(DType::F32)?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_config() -> ModelConfig {
        ModelConfig {
            vocab_size: 50,
            n_embd: 16,
            n_layer: 2,
            n_head: 2,
            n_ff: 24,
            context_length: 64,
            rope_freq_base: 10000.0,
            rms_eps: 1e-5,
            tied_embeddings: false,
        }
    }

    #[test]
    fn rope_rotates_adjacent_pairs_like_llama_cpp() {
        let dev = Device::Cpu;
        let d = 8;
        let t = 3;
        let values: Vec<f32> = (0..t * d).map(|i| (i as f32 * 0.37).sin() + 0.1 * i as f32).collect();
        let x = Tensor::from_vec(values.clone(), (1, 1, t, d), &dev).unwrap();
        let (cos, sin) = rope_tables(t, d, 10000.0, &dev).unwrap();
        let got: Vec<f32> = rope(&x, &cos, &sin).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        // By hand: position p, pair i rotates (x[2i], x[2i+1]) by p * 10000^(-2i/d).
        for p in 0..t {
            for i in 0..d / 2 {
                let theta = p as f64 * 10000f64.powf(-((2 * i) as f64) / d as f64);
                let (x0, x1) = (values[p * d + 2 * i] as f64, values[p * d + 2 * i + 1] as f64);
                let want0 = x0 * theta.cos() - x1 * theta.sin();
                let want1 = x0 * theta.sin() + x1 * theta.cos();
                assert!((got[p * d + 2 * i] as f64 - want0).abs() < 1e-5, "p {p} i {i}");
                assert!((got[p * d + 2 * i + 1] as f64 - want1).abs() < 1e-5, "p {p} i {i}");
            }
        }
        // Position 0 is the identity; position 1, pair 0 is a rotation by exactly 1 radian.
        assert_eq!(&got[..d], &values[..d]);
        let (a, b) = (values[d], values[d + 1]);
        assert!((got[d] - (a * 1f32.cos() - b * 1f32.sin())).abs() < 1e-6);
        assert!((got[d + 1] - (a * 1f32.sin() + b * 1f32.cos())).abs() < 1e-6);
    }

    #[test]
    fn init_is_deterministic_and_shaped_for_gguf() {
        let c = tiny_config();
        let a = init_params(&c, 7, &Device::Cpu).unwrap();
        let b = init_params(&c, 7, &Device::Cpu).unwrap();
        let z = init_params(&c, 8, &Device::Cpu).unwrap();
        let get = |m: &VarMap, n: &str| -> Vec<f32> {
            m.data().lock().unwrap()[n]
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        assert_eq!(get(&a, "blk.1.attn_q.weight"), get(&b, "blk.1.attn_q.weight"));
        assert_ne!(get(&a, "blk.1.attn_q.weight"), get(&z, "blk.1.attn_q.weight"));
        let data = a.data().lock().unwrap();
        assert_eq!(data["token_embd.weight"].as_tensor().dims(), &[50, 16]);
        assert_eq!(data["blk.0.ffn_down.weight"].as_tensor().dims(), &[16, 24]);
        assert_eq!(data["blk.0.ffn_gate.weight"].as_tensor().dims(), &[24, 16]);
        assert_eq!(data.len(), 2 + 9 * 2 + 1);
    }

    #[test]
    fn causal_logits_ignore_the_future_and_padding_is_invisible() {
        let c = tiny_config();
        let vm = init_params(&c, 3, &Device::Cpu).unwrap();
        let m = Transformer::from_varmap(&c, &vm).unwrap();
        let dev = Device::Cpu;
        let full = Batch::new(&[vec![5, 6, 7, 8]], 0, &dev).unwrap();
        let prefix = Batch::new(&[vec![5, 6, 9, 9]], 0, &dev).unwrap();
        let lf: Vec<Vec<f32>> = m.forward(&full, true).unwrap().squeeze(0).unwrap().to_vec2().unwrap();
        let lp: Vec<Vec<f32>> = m.forward(&prefix, true).unwrap().squeeze(0).unwrap().to_vec2().unwrap();
        assert_eq!(lf[1], lp[1]);
        // Non-causal: a later token changes earlier logits.
        let nf: Vec<Vec<f32>> = m.forward(&full, false).unwrap().squeeze(0).unwrap().to_vec2().unwrap();
        let np: Vec<Vec<f32>> = m
            .forward(&prefix, false)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2()
            .unwrap();
        assert_ne!(nf[1], np[1]);
        // A padded sequence gives the same logits at its real positions as the unpadded one.
        let padded = Batch::new(&[vec![5, 6, 7], vec![1, 2, 3, 4, 5]], 0, &dev).unwrap();
        let alone = Batch::new(&[vec![5, 6, 7]], 0, &dev).unwrap();
        let lpad: Vec<Vec<Vec<f32>>> = m.forward(&padded, false).unwrap().to_vec3().unwrap();
        let lal: Vec<Vec<Vec<f32>>> = m.forward(&alone, false).unwrap().to_vec3().unwrap();
        for p in 0..3 {
            for (a, b) in lpad[0][p].iter().zip(&lal[0][p]) {
                assert!((a - b).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn attention_mask_allows_own_group_earlier_visible_groups_and_real_keys() {
        let dev = Device::Cpu;
        let place = Place::new;
        let packed = vec![
            place(0, 0, true),
            place(1, 0, true),
            place(2, 1, false),
            place(3, 1, false),
            place(2, 2, true),
        ];
        let plain: Vec<Place> = (0..3).map(Place::plain).collect();
        let batch = Batch::placed(&[(vec![5; 5], packed), (vec![5; 3], plain)], 0, &dev).unwrap();
        let allowed = |causal: bool| -> Vec<Vec<Vec<u8>>> {
            let mask: Vec<Vec<Vec<f32>>> = attention_mask(&batch, causal, &dev)
                .unwrap()
                .squeeze(1)
                .unwrap()
                .to_vec3()
                .unwrap();
            mask.iter()
                .map(|rows| {
                    rows.iter()
                        .map(|row| {
                            row.iter()
                                .map(|&m| {
                                    assert!(m == 0.0 || m == -1e9, "{m}");
                                    u8::from(m == 0.0)
                                })
                                .collect()
                        })
                        .collect()
                })
                .collect()
        };
        let open = allowed(false);
        assert_eq!(
            open[0],
            [
                [1, 1, 0, 0, 0],
                [1, 1, 0, 0, 0],
                [1, 1, 1, 1, 0],
                [1, 1, 1, 1, 0],
                [1, 1, 0, 0, 1]
            ]
        );
        // The second sequence's two padding keys are hidden from every query.
        assert!(open[1].iter().all(|row| row == &[1, 1, 1, 0, 0]));
        let causal = allowed(true);
        assert_eq!(
            causal[0],
            [
                [1, 0, 0, 0, 0],
                [1, 1, 0, 0, 0],
                [1, 1, 1, 0, 0],
                [1, 1, 1, 1, 0],
                [1, 1, 0, 0, 1]
            ]
        );
        assert_eq!(causal[1][2], [1, 1, 1, 0, 0]);
        assert_eq!(causal[1][0], [1, 0, 0, 0, 0]);
    }

    #[test]
    fn packed_groups_see_only_earlier_visible_groups_at_their_own_positions() {
        let c = tiny_config();
        let vm = init_params(&c, 4, &Device::Cpu).unwrap();
        let m = Transformer::from_varmap(&c, &vm).unwrap();
        let dev = Device::Cpu;
        let place = Place::new;
        // [a b | c d (hidden) | e]: e sits at position 2, where c would be.
        let places = vec![
            place(0, 0, true),
            place(1, 0, true),
            place(2, 1, false),
            place(3, 1, false),
            place(2, 2, true),
        ];
        let packed = |tokens: Vec<u32>, causal: bool| {
            let batch = Batch::placed(&[(tokens, places.clone())], 0, &dev).unwrap();
            m.forward(&batch, causal)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap()
        };
        let base = packed(vec![5, 6, 7, 8, 9], false);
        // A hidden group is invisible to later groups, a later group to earlier ones.
        let hidden_changed = packed(vec![5, 6, 7, 11, 9], false);
        assert_eq!(base[4], hidden_changed[4]);
        assert_ne!(base[2], hidden_changed[2]);
        let later_changed = packed(vec![5, 6, 7, 8, 12], false);
        assert_eq!(base[..4], later_changed[..4]);
        // A visible earlier group does reach later groups.
        let visible_changed = packed(vec![13, 6, 7, 8, 9], false);
        assert_ne!(base[4], visible_changed[4]);
        assert_ne!(base[2], visible_changed[2]);
        // Causal and packed, e sees a b at positions 0 1 and itself at 2, like the plain [a b e].
        let causal = packed(vec![5, 6, 7, 8, 9], true);
        let plain = Batch::new(&[vec![5, 6, 9]], 0, &dev).unwrap();
        let plain: Vec<Vec<f32>> = m.forward(&plain, true).unwrap().squeeze(0).unwrap().to_vec2().unwrap();
        for (a, b) in causal[4].iter().zip(&plain[2]) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }
}
