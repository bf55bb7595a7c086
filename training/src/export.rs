//! Exporting a checkpoint as GGUF: the F32 file through [`ggml_ext::write_model`], then F16 and Q8_0 copies
//! through llama.cpp's quantizer.
//!
//! The diffusion model is written as `llada`, the autoregressive twin as `llama`; both carry the trained
//! byte-level BPE vocabulary (`tokenizer.ggml.pre = "qwen2"`), the four specials as control tokens, and the
//! ChatML template. A candle tensor's row-major data is the ggml tensor's data, with the dimensions listed in
//! the opposite order.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::Tensor;
use ggml_ext::model::{CHATML_TEMPLATE, TOKEN_CONTROL, TOKEN_NORMAL};
use ggml_ext::{KeyValue, Vocabulary, WeightType};
use tokenizers::Tokenizer;

use crate::model::{ModelConfig, Objective};
use crate::tokenizer::{gguf_vocab, GGML_PRE, SPECIAL_TOKENS};
use crate::train::SpecialIds;

/// The GGUF vocabulary of a trained tokenizer.
pub fn vocabulary(tokenizer: &Tokenizer) -> anyhow::Result<Vocabulary> {
    let vocab = gguf_vocab(tokenizer)?;
    let ids = SpecialIds::of(tokenizer)?;
    let types = vocab
        .tokens
        .iter()
        .map(|t| {
            if SPECIAL_TOKENS.contains(&t.as_str()) {
                TOKEN_CONTROL
            } else {
                TOKEN_NORMAL
            }
        })
        .collect();
    Ok(Vocabulary {
        tokens: vocab.tokens,
        types,
        merges: vocab.merges,
        pre: GGML_PRE.to_owned(),
        end_of_text: ids.end_of_text,
        end_of_turn: ids.im_end,
        mask: ids.mask,
    })
}

/// Writes the F32 GGUF of `tensors` (GGUF names, candle shapes), with the longest prompt the model
/// was trained on when known.
pub fn write_f32(
    path: &Path,
    config: &ModelConfig,
    objective: Objective,
    tokenizer: &Tokenizer,
    trained_prompt_tokens: Option<usize>,
    tensors: &HashMap<String, Tensor>,
) -> anyhow::Result<()> {
    let vocab = vocabulary(tokenizer)?;
    if vocab.tokens.len() != config.vocab_size {
        bail!(
            "the tokenizer has {} tokens but the model was trained for {}",
            vocab.tokens.len(),
            config.vocab_size
        );
    }
    let hp = config.hyperparams(objective);
    let mut out = Vec::new();
    for (name, ggml_shape) in hp.tensor_shapes(config.vocab_size) {
        let t = tensors
            .get(&name)
            .with_context(|| format!("checkpoint has no tensor {name}"))?;
        let want: Vec<usize> = ggml_shape.iter().rev().copied().collect();
        if t.dims() != want.as_slice() {
            bail!("tensor {name} has shape {:?}, expected {want:?}", t.dims());
        }
        let data: Vec<f32> = t.flatten_all()?.to_vec1()?;
        out.push((name, ggml_shape, data));
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    let extra: Vec<(&str, KeyValue)> = trained_prompt_tokens
        .map(|n| (ggml_ext::TRAINED_PROMPT_KEY, KeyValue::U32(n as u32)))
        .into_iter()
        .collect();
    ggml_ext::write_model(path, &hp, &vocab, CHATML_TEMPLATE, &extra, out)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Where the F16 and Q8_0 copies of an F32 file go by default: `x-f32.gguf` gives `x-f16.gguf` and
/// `x-q8_0.gguf`; any other `x.gguf` gives `x-f16.gguf` and `x-q8_0.gguf` too.
pub fn sibling(f32_path: &Path, suffix: &str) -> PathBuf {
    let stem = f32_path.file_stem().and_then(|s| s.to_str()).unwrap_or("model");
    let base = stem.strip_suffix("-f32").unwrap_or(stem);
    f32_path.with_file_name(format!("{base}-{suffix}.gguf"))
}

/// The files one export wrote.
#[derive(Debug, Clone)]
pub struct Exported {
    pub f32: PathBuf,
    pub f16: Option<PathBuf>,
    pub q8_0: Option<PathBuf>,
}

/// Writes the F32 file, then (when given) its F16 and Q8_0 re-encodings.
pub fn export(
    f32_path: &Path,
    f16_path: Option<&Path>,
    q8_path: Option<&Path>,
    config: &ModelConfig,
    objective: Objective,
    tokenizer: &Tokenizer,
    trained_prompt_tokens: Option<usize>,
    tensors: &HashMap<String, Tensor>,
    threads: usize,
) -> anyhow::Result<Exported> {
    write_f32(f32_path, config, objective, tokenizer, trained_prompt_tokens, tensors)?;
    for (path, kind) in [(f16_path, WeightType::F16), (q8_path, WeightType::Q8_0)] {
        if let Some(path) = path {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            ggml_ext::quantize(f32_path, path, kind, threads)
                .with_context(|| format!("writing {} as {kind:?}", path.display()))?;
        }
    }
    Ok(Exported {
        f32: f32_path.to_owned(),
        f16: f16_path.map(Path::to_owned),
        q8_0: q8_path.map(Path::to_owned),
    })
}

/// [`ggml_ext::TRAINED_PROMPT_KEY`] of a GGUF file, if it has one.
pub fn trained_prompt_tokens(path: &Path) -> anyhow::Result<Option<usize>> {
    let (_, content) = read_gguf(path)?;
    content
        .metadata
        .get(ggml_ext::TRAINED_PROMPT_KEY)
        .map(|v| v.to_u32().map(|n| n as usize))
        .transpose()
        .map_err(|e| anyhow::anyhow!("{}: {}: {e}", path.display(), ggml_ext::TRAINED_PROMPT_KEY))
}

/// What [`add_shift_logits`] did to a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyUpdate {
    /// The key was added with this value.
    Added(bool),
    /// The file already carried the key with the value its architecture needs; nothing written.
    AlreadyThere(bool),
    /// The architecture (named) is no diffusion model (the `llama` twin); nothing written.
    NotDiffusion(String),
}

fn read_gguf(path: &Path) -> anyhow::Result<(Vec<u8>, candle_core::quantized::gguf_file::Content)> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let content = candle_core::quantized::gguf_file::Content::read(&mut std::io::Cursor::new(&bytes))
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok((bytes, content))
}

/// Checks that `new` is `old` with `key = value` added and nothing else changed: every
/// other key with the same type and value, the same tensor table (names, types, shapes, offsets)
/// and a byte-identical tensor data section. Read with candle's GGUF parser, not the ggml writer
/// that produced `new`.
pub fn check_only_key_added(old: &Path, new: &Path, key: &str, value: KeyValue) -> anyhow::Result<()> {
    let (old_bytes, old_c) = read_gguf(old)?;
    let (new_bytes, new_c) = read_gguf(new)?;
    if old_c.metadata.contains_key(key) {
        bail!("{} already has {key}", old.display());
    }
    use candle_core::quantized::gguf_file::Value;
    match (new_c.metadata.get(key), value) {
        (Some(Value::Bool(v)), KeyValue::Bool(want)) if *v == want => {}
        (Some(Value::U32(v)), KeyValue::U32(want)) if *v == want => {}
        (other, _) => bail!("{} has {key} = {other:?}, expected {value:?}", new.display()),
    }
    if new_c.metadata.len() != old_c.metadata.len() + 1 {
        bail!(
            "{} has {} keys, expected {} + 1",
            new.display(),
            new_c.metadata.len(),
            old_c.metadata.len()
        );
    }
    for (k, v) in &old_c.metadata {
        let w = new_c
            .metadata
            .get(k)
            .with_context(|| format!("{} lost key {k}", new.display()))?;
        // `Value` has no `PartialEq`; its `Debug` form names the type and prints floats exactly.
        if format!("{v:?}") != format!("{w:?}") {
            bail!("key {k} changed from {v:?} to {w:?}");
        }
    }
    let table = |c: &candle_core::quantized::gguf_file::Content| -> std::collections::BTreeMap<String, String> {
        c.tensor_infos
            .iter()
            .map(|(k, t)| (k.clone(), format!("{t:?}")))
            .collect()
    };
    if table(&old_c) != table(&new_c) {
        bail!("the tensor table of {} differs from {}", new.display(), old.display());
    }
    let data =
        |bytes: &[u8], c: &candle_core::quantized::gguf_file::Content| bytes[c.tensor_data_offset as usize..].to_vec();
    if data(&old_bytes, &old_c) != data(&new_bytes, &new_c) {
        bail!("the tensor data of {} differs from {}", new.display(), old.display());
    }
    Ok(())
}

/// Writes `output` (which may be `input`): the GGUF `input` with [`ggml_ext::SHIFT_LOGITS_KEY`] added
/// as its architecture needs (`false` for `llada`, `true` for `dream`), tensors and every other key
/// unchanged, checked by [`check_only_key_added`] before it replaces `output`. Files of other
/// architectures, and files that carry the key already, are left alone.
pub fn add_shift_logits(input: &Path, output: &Path) -> anyhow::Result<KeyUpdate> {
    let key = ggml_ext::SHIFT_LOGITS_KEY;
    let (_, content) = read_gguf(input)?;
    let arch = match content.metadata.get("general.architecture") {
        Some(v) => v
            .to_string()
            .map_err(|e| anyhow::anyhow!("general.architecture: {e}"))?
            .clone(),
        None => bail!("{} has no general.architecture", input.display()),
    };
    let Some(value) = ggml_ext::Architecture::from_name(&arch).and_then(|a| a.shift_logits()) else {
        return Ok(KeyUpdate::NotDiffusion(arch));
    };
    if let Some(v) = content.metadata.get(key) {
        let v = v.to_bool().map_err(|e| anyhow::anyhow!("{key}: {e}"))?;
        if v != value {
            bail!("{} ({arch}) has {key} = {v}, expected {value}", input.display());
        }
        return Ok(KeyUpdate::AlreadyThere(v));
    }
    add_key(input, output, key, KeyValue::Bool(value))?;
    Ok(KeyUpdate::Added(value))
}

/// Writes `output` (which may be `input`): `input` with `key = value` added, checked by
/// [`check_only_key_added`] before it replaces `output`.
fn add_key(input: &Path, output: &Path, key: &str, value: KeyValue) -> anyhow::Result<()> {
    let tmp = output.with_extension("gguf.tmp");
    ggml_ext::set_key(input, &tmp, key, value).with_context(|| format!("writing {}", tmp.display()))?;
    if let Err(e) = check_only_key_added(input, &tmp, key, value) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, output).with_context(|| format!("renaming {} to {}", tmp.display(), output.display()))
}

/// Writes `output` (which may be `input`): `input` with [`ggml_ext::TRAINED_PROMPT_KEY`] added as
/// `tokens`, tensors and every other key unchanged (checked). A file that has the key already is
/// refused: the value is a fact of its training, not a setting.
pub fn add_trained_prompt(input: &Path, output: &Path, tokens: usize) -> anyhow::Result<()> {
    if let Some(has) = trained_prompt_tokens(input)? {
        bail!(
            "{} records {} = {has} already",
            input.display(),
            ggml_ext::TRAINED_PROMPT_KEY
        );
    }
    let tokens = u32::try_from(tokens).context("a prompt length past u32")?;
    add_key(input, output, ggml_ext::TRAINED_PROMPT_KEY, KeyValue::U32(tokens))
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;
    use std::sync::{Mutex, OnceLock};

    use candle_core::Device;
    use candle_nn::VarMap;
    use llama_cpp_2::context::params::{KvCacheType, LlamaContextParams};
    use llama_cpp_2::llama_backend::LlamaBackend;
    use llama_cpp_2::llama_batch::LlamaBatch;
    use llama_cpp_2::model::params::LlamaModelParams;
    use llama_cpp_2::model::LlamaModel;
    use llama_cpp_2::token::LlamaToken;

    use super::*;
    use crate::corpus::{generate, render_chatml, test_config};
    use crate::domain::northwind;
    use crate::model::{gguf_tokens, init_params, Batch, Transformer};
    use crate::tokenizer::{train_on_dialogs, TokenizerConfig};
    use crate::train::init_weights;

    /// llama.cpp's backend may be initialised once per process.
    fn backend() -> &'static LlamaBackend {
        static BACKEND: OnceLock<LlamaBackend> = OnceLock::new();
        static INIT: Mutex<()> = Mutex::new(());
        let _guard = INIT.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = BACKEND.get() {
            return b;
        }
        llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
        let b = LlamaBackend::init().expect("llama.cpp backend");
        BACKEND.get_or_init(|| b)
    }

    fn test_tokenizer() -> Tokenizer {
        let domain = northwind();
        let corpus = generate(&domain, &test_config(2, 30)).unwrap();
        train_on_dialogs(
            &domain.assistant.system_prompt,
            &corpus.train,
            &TokenizerConfig {
                vocab_size: 320,
                min_frequency: 2,
            },
        )
        .unwrap()
    }

    /// A model small enough to export and load in a test.
    fn test_model_config(tokenizer: &Tokenizer) -> ModelConfig {
        ModelConfig {
            vocab_size: tokenizer.get_vocab_size(true),
            n_embd: 64,
            n_layer: 2,
            n_head: 4,
            n_ff: 96,
            context_length: 256,
            rope_freq_base: 10000.0,
            rms_eps: 1e-5,
            tied_embeddings: false,
        }
    }

    fn tensors_of(varmap: &VarMap) -> HashMap<String, Tensor> {
        let data = varmap.data().lock().unwrap();
        data.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect()
    }

    /// Exports random weights under `objective` and returns the largest difference between the logits
    /// llama.cpp computes for a short sequence and candle's forward pass.
    fn max_logit_diff(objective: Objective, seed: u64, tied_embeddings: bool) -> f32 {
        let tokenizer = test_tokenizer();
        let config = ModelConfig {
            tied_embeddings,
            ..test_model_config(&tokenizer)
        };
        // A larger init than training uses, so that attention and RoPE visibly shape the logits.
        let varmap = init_params(&config, seed, &Device::Cpu).unwrap();
        {
            let data = varmap.data().lock().unwrap();
            for (name, var) in data.iter() {
                if !name.ends_with("norm.weight") {
                    var.set(&(var.as_tensor() * 5.0).unwrap()).unwrap();
                }
            }
        }
        let tensors = tensors_of(&varmap);
        let dir = std::env::temp_dir().join(format!(
            "dllm-export-test-{}-{}-{tied_embeddings}",
            std::process::id(),
            objective.name()
        ));
        let f32_path = dir.join("m-f32.gguf");
        let q8 = sibling(&f32_path, "q8_0");
        export(
            &f32_path,
            None,
            Some(&q8),
            &config,
            objective,
            &tokenizer,
            None,
            &tensors,
            2,
        )
        .unwrap();
        assert!(q8.exists());
        let written = crate::model::load_gguf(&f32_path, &Device::Cpu).unwrap();
        assert_eq!(written.contains_key("output.weight"), !tied_embeddings);

        let ids: Vec<u32> = tokenizer
            .encode(
                "<|im_start|>user\nWhere is my order NW-12345?<|im_end|>\n<|im_start|>assistant\n",
                false,
            )
            .unwrap()
            .get_ids()
            .to_vec();
        let mut ids = ids;
        ids.extend([3, 3, 3, 3]);
        let n = ids.len();

        let model_t = Transformer::from_tensors(&config, &tensors).unwrap();
        let batch = Batch::new(&[ids.clone()], 0, &Device::Cpu).unwrap();
        let ours: Vec<Vec<f32>> = model_t
            .forward(&batch, objective.causal())
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2()
            .unwrap();

        let backend = backend();
        let model = LlamaModel::load_from_file(backend, &f32_path, &LlamaModelParams::default()).unwrap();
        assert_eq!(model.n_vocab() as usize, config.vocab_size);
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(256))
            .with_n_batch(256)
            .with_n_ubatch(256)
            .with_n_threads(2)
            .with_n_threads_batch(2)
            // F32 everywhere on llama.cpp's side too: no F16 KV cache, no flash attention.
            .with_type_k(KvCacheType::F32)
            .with_type_v(KvCacheType::F32)
            .with_flash_attention_policy(llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_DISABLED);
        let mut ctx = model.new_context(backend, params).unwrap();
        let mut lbatch = LlamaBatch::new(256, 1);
        for (p, &id) in ids.iter().enumerate() {
            lbatch.add(LlamaToken::new(id as i32), p as i32, &[0], true).unwrap();
        }
        ctx.decode(&mut lbatch).unwrap();
        let mut max = 0f32;
        let mut spread = 0f32;
        for (p, row) in ours.iter().enumerate().take(n) {
            let theirs = ctx.get_logits_ith(p as i32);
            assert_eq!(theirs.len(), row.len());
            for (a, b) in row.iter().zip(theirs) {
                max = max.max((a - b).abs());
                spread = spread.max(a.abs());
            }
        }
        // The comparison means something only if the logits are far from zero.
        assert!(spread > 0.1, "logits too small to compare: {spread}");
        let _ = std::fs::remove_dir_all(&dir);
        eprintln!(
            "{}: max |candle - llama.cpp| = {max:e} over {n} positions (max |logit| {spread})",
            objective.name()
        );
        max
    }

    #[test]
    fn llama_export_reproduces_candle_logits() {
        let diff = max_logit_diff(Objective::Autoregressive, 11, false);
        assert!(diff < 1e-3, "max abs diff {diff}");
    }

    #[test]
    fn llada_export_reproduces_candle_logits() {
        let diff = max_logit_diff(Objective::Diffusion, 12, false);
        assert!(diff < 1e-3, "max abs diff {diff}");
    }

    #[test]
    fn tied_llada_export_has_no_output_matrix_and_reproduces_candle_logits() {
        let diff = max_logit_diff(Objective::Diffusion, 13, true);
        assert!(diff < 1e-3, "max abs diff {diff}");
    }

    #[test]
    fn training_starts_from_an_exported_gguf_with_its_weights_and_vocabulary() {
        let tokenizer = test_tokenizer();
        let config = test_model_config(&tokenizer);
        let values = |varmap: &VarMap| -> HashMap<String, Vec<f32>> {
            let data = varmap.data().lock().unwrap();
            data.iter()
                .map(|(k, v)| (k.clone(), v.as_tensor().flatten_all().unwrap().to_vec1().unwrap()))
                .collect()
        };
        let trained = init_params(&config, 21, &Device::Cpu).unwrap();
        let tensors = tensors_of(&trained);
        let dir = std::env::temp_dir().join(format!("dllm-init-test-{}", std::process::id()));
        let f32_path = dir.join("m-f32.gguf");
        let q8 = sibling(&f32_path, "q8_0");
        export(
            &f32_path,
            None,
            Some(&q8),
            &config,
            Objective::Diffusion,
            &tokenizer,
            None,
            &tensors,
            2,
        )
        .unwrap();
        let want = values(&trained);

        let mut exact = init_params(&config, 22, &Device::Cpu).unwrap();
        init_weights(&mut exact, &f32_path, &Device::Cpu).unwrap();
        assert_eq!(values(&exact), want);

        let mut quantized = init_params(&config, 22, &Device::Cpu).unwrap();
        init_weights(&mut quantized, &q8, &Device::Cpu).unwrap();
        for (name, got) in values(&quantized) {
            let reference = &want[&name];
            let scale = reference.iter().fold(0f32, |m, x| m.max(x.abs()));
            let err = got.iter().zip(reference).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            // Q8_0 keeps 8 bits per value under one scale per 32: errors stay near 1/254 of the largest.
            assert!(err <= scale / 100.0, "{name}: error {err} against max {scale}");
        }
        assert_eq!(gguf_tokens(&q8).unwrap(), gguf_vocab(&tokenizer).unwrap().tokens);

        let wider = ModelConfig { n_embd: 128, ..config };
        let mut other_shape = init_params(&wider, 22, &Device::Cpu).unwrap();
        let err = init_weights(&mut other_shape, &q8, &Device::Cpu).unwrap_err();
        assert!(format!("{err:#}").contains("shape"), "{err:#}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Checks a trained export against its checkpoint and prints a sample reply. Run with
    /// `DLLM_CKPT=dir/model.safetensors DLLM_GGUF=file-f32.gguf DLLM_TOKENIZER=tokenizer.json
    /// cargo test -p dllm-train trained_export -- --ignored --nocapture`.
    #[test]
    #[ignore = "needs a trained checkpoint and its export (env DLLM_CKPT, DLLM_GGUF, DLLM_TOKENIZER)"]
    fn trained_export_matches_checkpoint_and_answers() {
        let env = |k: &str| PathBuf::from(std::env::var(k).unwrap_or_else(|_| panic!("set {k}")));
        let (ckpt, gguf, tok_path) = (env("DLLM_CKPT"), env("DLLM_GGUF"), env("DLLM_TOKENIZER"));
        let state = crate::train::TrainState::read(ckpt.parent().unwrap()).unwrap();
        let objective = state.config.objective;
        let tokenizer = crate::tokenizer::load(&tok_path).unwrap();
        let tensors = crate::model::load_checkpoint(&ckpt, &Device::Cpu).unwrap();
        let model_t = Transformer::from_tensors(&state.config.model, &tensors).unwrap();
        let system = northwind().assistant.system_prompt;
        let prompt = format!(
            "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\nWhere is my order NW-48213?<|im_end|>\n<|im_start|>assistant\n"
        );
        let prompt_ids: Vec<u32> = tokenizer.encode(prompt.as_str(), false).unwrap().get_ids().to_vec();
        let reply_len = state.config.reply_len;
        let mut ids = prompt_ids.clone();
        if objective == Objective::Diffusion {
            ids.extend(std::iter::repeat_n(3u32, reply_len));
        }
        let n = ids.len();
        let backend = backend();
        let model = LlamaModel::load_from_file(backend, &gguf, &LlamaModelParams::default()).unwrap();
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(1024))
            .with_n_batch(1024)
            .with_n_ubatch(1024)
            .with_n_threads(1)
            .with_n_threads_batch(1)
            .with_type_k(KvCacheType::F32)
            .with_type_v(KvCacheType::F32)
            .with_flash_attention_policy(llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_DISABLED);
        let mut ctx = model.new_context(backend, params).unwrap();
        let mut lbatch = LlamaBatch::new(1024, 1);
        let decode =
            |ctx: &mut llama_cpp_2::context::LlamaContext, lbatch: &mut LlamaBatch, ids: &[u32], from: usize| {
                lbatch.clear();
                for (p, &id) in ids.iter().enumerate().skip(from) {
                    lbatch.add(LlamaToken::new(id as i32), p as i32, &[0], true).unwrap();
                }
                ctx.decode(lbatch).unwrap();
            };
        decode(&mut ctx, &mut lbatch, &ids, 0);
        let ours: Vec<Vec<f32>> = model_t
            .forward(
                &Batch::new(&[ids.clone()], 0, &Device::Cpu).unwrap(),
                objective.causal(),
            )
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2()
            .unwrap();
        let mut max = 0f32;
        for (p, row) in ours.iter().enumerate().take(n) {
            for (a, b) in row.iter().zip(ctx.get_logits_ith(p as i32)) {
                max = max.max((a - b).abs());
            }
        }
        eprintln!(
            "{}: trained max |candle - llama.cpp| = {max:e} over {n} positions",
            objective.name()
        );
        assert!(max < 1e-3);

        let argmax = |row: &[f32]| -> (u32, f32) {
            let m = row.iter().cloned().fold(f32::MIN, f32::max);
            let z: f32 = row.iter().map(|x| (x - m).exp()).sum();
            let (i, &v) = row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap();
            (i as u32, (v - m).exp() / z)
        };
        let reply: Vec<u32> = match objective {
            Objective::Autoregressive => {
                ctx.clear_kv_cache();
                let mut seq = prompt_ids.clone();
                decode(&mut ctx, &mut lbatch, &seq, 0);
                let mut out = Vec::new();
                // Index of the last token within the batch just decoded.
                let mut last = seq.len() - 1;
                for _ in 0..reply_len {
                    let (tok, _) = argmax(ctx.get_logits_ith(last as i32));
                    last = 0;
                    out.push(tok);
                    if tok == 2 || tok == 0 {
                        break;
                    }
                    seq.push(tok);
                    lbatch.clear();
                    lbatch
                        .add(LlamaToken::new(tok as i32), (seq.len() - 1) as i32, &[0], true)
                        .unwrap();
                    ctx.decode(&mut lbatch).unwrap();
                }
                out
            }
            Objective::Diffusion => {
                // LLaDA's low-confidence remasking, one token per step.
                let p0 = prompt_ids.len();
                let mut seq = ids.clone();
                for _ in 0..reply_len {
                    decode(&mut ctx, &mut lbatch, &seq, 0);
                    let best = (p0..n)
                        .filter(|&p| seq[p] == 3)
                        .map(|p| {
                            let (tok, prob) = argmax(ctx.get_logits_ith(p as i32));
                            (p, tok, prob)
                        })
                        .max_by(|a, b| a.2.total_cmp(&b.2))
                        .unwrap();
                    seq[best.0] = best.1;
                }
                seq[p0..].to_vec()
            }
        };
        eprintln!("reply: {:?}", tokenizer.decode(&reply, false).unwrap());
    }

    /// Exports random weights of the test shape under `objective`: (F32, Q8_0) paths in `dir`.
    fn export_random(dir: &Path, objective: Objective, seed: u64) -> (PathBuf, PathBuf) {
        let tokenizer = test_tokenizer();
        let config = test_model_config(&tokenizer);
        let tensors = tensors_of(&init_params(&config, seed, &Device::Cpu).unwrap());
        let f32_path = dir.join(format!("{}-{seed}-f32.gguf", objective.name()));
        let q8 = sibling(&f32_path, "q8_0");
        export(
            &f32_path,
            None,
            Some(&q8),
            &config,
            objective,
            &tokenizer,
            None,
            &tensors,
            2,
        )
        .unwrap();
        (f32_path, q8)
    }

    /// `diffusion.shift_logits` as llama.cpp reads it (`meta_val_str` prints a bool as `true` / `false`).
    fn llama_cpp_shift_logits(path: &Path) -> Option<String> {
        let model = LlamaModel::load_from_file(backend(), path, &LlamaModelParams::default()).unwrap();
        model.meta_val_str(ggml_ext::SHIFT_LOGITS_KEY).ok()
    }

    fn candle_meta(path: &Path, key: &str) -> Option<String> {
        let (_, content) = read_gguf(path).unwrap();
        content.metadata.get(key).map(|v| format!("{v:?}"))
    }

    #[test]
    fn exports_record_the_longest_trained_prompt_and_old_files_get_it_added_once() {
        let dir = std::env::temp_dir().join(format!("dllm-trained-prompt-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let tokenizer = test_tokenizer();
        let config = test_model_config(&tokenizer);
        let tensors = tensors_of(&init_params(&config, 5, &Device::Cpu).unwrap());
        let f32_path = dir.join("recorded-f32.gguf");
        let q8 = sibling(&f32_path, "q8_0");
        let objective = Objective::Diffusion;
        export(
            &f32_path,
            None,
            Some(&q8),
            &config,
            objective,
            &tokenizer,
            Some(321),
            &tensors,
            2,
        )
        .unwrap();
        for path in [&f32_path, &q8] {
            assert_eq!(trained_prompt_tokens(path).unwrap(), Some(321), "{}", path.display());
            // llama.cpp reads it too: the service takes it from there.
            let model = LlamaModel::load_from_file(backend(), path, &LlamaModelParams::default()).unwrap();
            assert_eq!(model.meta_val_str(ggml_ext::TRAINED_PROMPT_KEY).unwrap(), "321");
        }
        let (_, old) = export_random(&dir, objective, 6);
        assert_eq!(trained_prompt_tokens(&old).unwrap(), None);
        let stamped = dir.join("stamped-q8_0.gguf");
        add_trained_prompt(&old, &stamped, 231).unwrap();
        assert_eq!(trained_prompt_tokens(&stamped).unwrap(), Some(231));
        check_only_key_added(&old, &stamped, ggml_ext::TRAINED_PROMPT_KEY, KeyValue::U32(231)).unwrap();
        let err = add_trained_prompt(&stamped, &stamped, 300).unwrap_err();
        assert!(err.to_string().contains("already"), "{err}");
        assert_eq!(trained_prompt_tokens(&stamped).unwrap(), Some(231));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn exports_carry_shift_logits_false_for_llada_and_none_for_the_twin() {
        let dir = std::env::temp_dir().join(format!("dllm-shift-test-{}", std::process::id()));
        let (llada_f32, llada_q8) = export_random(&dir, Objective::Diffusion, 31);
        let (llama_f32, llama_q8) = export_random(&dir, Objective::Autoregressive, 32);
        for path in [&llada_f32, &llada_q8] {
            assert_eq!(
                llama_cpp_shift_logits(path).as_deref(),
                Some("false"),
                "{}",
                path.display()
            );
            assert_eq!(
                candle_meta(path, ggml_ext::SHIFT_LOGITS_KEY).as_deref(),
                Some("Bool(false)")
            );
        }
        for path in [&llama_f32, &llama_q8] {
            assert_eq!(llama_cpp_shift_logits(path), None, "{}", path.display());
        }
        // A Dream-layout file (the same writer, through the fixture) gets `true`.
        let dream = dir.join("dream.gguf");
        let mut spec = ggml_ext::FixtureSpec::default();
        spec.hyperparams.architecture = ggml_ext::Architecture::Dream;
        ggml_ext::write_llada_fixture(&dream, &spec).unwrap();
        assert_eq!(
            candle_meta(&dream, ggml_ext::SHIFT_LOGITS_KEY).as_deref(),
            Some("Bool(true)")
        );
        assert_eq!(llama_cpp_shift_logits(&dream).as_deref(), Some("true"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn add_shift_logits_adds_only_the_key_to_a_file_without_it() {
        let dir = std::env::temp_dir().join(format!("dllm-add-shift-test-{}", std::process::id()));
        let (_, twin_q8) = export_random(&dir, Objective::Autoregressive, 41);
        // A `llada` file as exported before the key existed: the twin's Q8_0 weights renamed.
        let legacy = dir.join("legacy-llada-q8_0.gguf");
        ggml_ext::retarget(&twin_q8, &legacy, "llama", "llada").unwrap();
        assert_eq!(candle_meta(&legacy, ggml_ext::SHIFT_LOGITS_KEY), None);
        assert_eq!(llama_cpp_shift_logits(&legacy), None);
        let before = std::fs::read(&legacy).unwrap();

        let updated = dir.join("updated-llada-q8_0.gguf");
        assert_eq!(add_shift_logits(&legacy, &updated).unwrap(), KeyUpdate::Added(false));
        assert_eq!(std::fs::read(&legacy).unwrap(), before, "the input is not touched");
        check_only_key_added(&legacy, &updated, ggml_ext::SHIFT_LOGITS_KEY, KeyValue::Bool(false)).unwrap();
        assert_eq!(llama_cpp_shift_logits(&updated).as_deref(), Some("false"));
        // The same weights as llama.cpp loads them.
        assert_eq!(
            crate::model::load_gguf(&legacy, &Device::Cpu).unwrap().len(),
            crate::model::load_gguf(&updated, &Device::Cpu).unwrap().len()
        );

        // A second run, and the twin, write nothing.
        let again = std::fs::read(&updated).unwrap();
        assert_eq!(
            add_shift_logits(&updated, &updated).unwrap(),
            KeyUpdate::AlreadyThere(false)
        );
        assert_eq!(std::fs::read(&updated).unwrap(), again);
        let twin_before = std::fs::read(&twin_q8).unwrap();
        assert_eq!(
            add_shift_logits(&twin_q8, &twin_q8).unwrap(),
            KeyUpdate::NotDiffusion("llama".into())
        );
        assert_eq!(std::fs::read(&twin_q8).unwrap(), twin_before);

        // The check fails where something besides the key differs: other weights, or the key's value.
        let (_, other_q8) = export_random(&dir, Objective::Autoregressive, 42);
        let other_legacy = dir.join("other-legacy-llada-q8_0.gguf");
        ggml_ext::retarget(&other_q8, &other_legacy, "llama", "llada").unwrap();
        let other = dir.join("other-llada-q8_0.gguf");
        assert_eq!(
            add_shift_logits(&other_legacy, &other).unwrap(),
            KeyUpdate::Added(false)
        );
        let err = check_only_key_added(&legacy, &other, ggml_ext::SHIFT_LOGITS_KEY, KeyValue::Bool(false)).unwrap_err();
        assert!(format!("{err:#}").contains("tensor data"), "{err:#}");
        let err =
            check_only_key_added(&legacy, &twin_q8, ggml_ext::SHIFT_LOGITS_KEY, KeyValue::Bool(false)).unwrap_err();
        assert!(format!("{err:#}").contains("Bool(false)"), "{err:#}");
        let err =
            check_only_key_added(&legacy, &updated, ggml_ext::SHIFT_LOGITS_KEY, KeyValue::Bool(true)).unwrap_err();
        assert!(format!("{err:#}").contains("expected Bool(true)"), "{err:#}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The shipped files: the diffusion model says `false`, the twin carries no key.
    #[test]
    fn bundled_models_carry_shift_logits() {
        let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models");
        let key = ggml_ext::SHIFT_LOGITS_KEY;
        assert_eq!(
            candle_meta(&models.join("northwind-llada-q8_0.gguf"), key).as_deref(),
            Some("Bool(false)")
        );
        assert_eq!(candle_meta(&models.join("northwind-llama-q8_0.gguf"), key), None);
    }

    /// Inputs where two tokenizers are most likely to part ways.
    fn odd_inputs() -> Vec<String> {
        let mut inputs: Vec<String> = [
            "",
            " ",
            "   ",
            "\n",
            "\n\n\n",
            "\t\t x",
            "a  b   c    d",
            "trailing   ",
            "   leading",
            "line\r\nwindows\r\n",
            " \n \n  \n",
            "0123456789",
            "NW-00000 and NW-99999",
            "$14.95, 3.14159, 1,000,000 and 12:30pm",
            "!!!???... ;-) :::",
            "(hello) [world] {x} <y> \"quoted\" 'single'",
            "a--b__c//d\\\\e",
            "it's they're we've I'M you'll he'd DON'T",
            "café naïve résumé Ångström Straße",
            "e\u{301}te\u{301} (combining accents)",
            "日本語のテキスト、中文测试。한국어",
            "😀👍🏽🇨🇦 family: 👨‍👩‍👧 ❤️",
            "zero\u{200b}width\u{feff}marks",
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
            "<|mdm_mask|><|mdm_mask|> <|endoftext|>",
            "half a special: <|im_sta and <|im_end",
        ]
        .map(str::to_owned)
        .to_vec();
        inputs.push("x".repeat(5000));
        inputs.push("supercalifragilistic".repeat(60));
        inputs.push(format!("NW-{}", "1".repeat(1000)));
        inputs.push("ab ".repeat(2000));
        inputs
    }

    /// The texts where `tokenizer` (tokenizer.json) and llama.cpp (the exported vocabulary, tokenized
    /// as the service does: no BOS, control tokens parsed when `parse_special`) give different ids.
    fn mismatches(
        tokenizer: &Tokenizer,
        model: &LlamaModel,
        texts: &[String],
        parse_special: bool,
    ) -> Vec<(String, Vec<u32>, Vec<u32>)> {
        texts
            .iter()
            .filter_map(|text| {
                let ours = tokenizer.encode(text.as_str(), false).unwrap().get_ids().to_vec();
                let theirs: Vec<u32> = model
                    .vocab()
                    .tokenize(text.as_bytes(), false, parse_special)
                    .into_iter()
                    .map(|t| t.0 as u32)
                    .collect();
                (ours != theirs).then(|| (text.clone(), ours, theirs))
            })
            .collect()
    }

    #[test]
    fn llama_cpp_and_the_trained_tokenizer_give_the_same_ids() {
        let domain = northwind();
        let corpus = generate(
            &domain,
            &crate::corpus::CorpusConfig {
                heldout_fraction: 0.2,
                ..crate::corpus::CorpusConfig::new(5, 400)
            },
        )
        .unwrap();
        let system = &domain.assistant.system_prompt;
        let tokenizer = train_on_dialogs(
            system,
            &corpus.train,
            &TokenizerConfig {
                vocab_size: 2048,
                min_frequency: 2,
            },
        )
        .unwrap();
        let config = test_model_config(&tokenizer);
        let tensors = tensors_of(&init_params(&config, 51, &Device::Cpu).unwrap());
        let dir = std::env::temp_dir().join(format!("dllm-tok-test-{}", std::process::id()));
        let q8 = dir.join("m-q8_0.gguf");
        export(
            &dir.join("m-f32.gguf"),
            None,
            Some(&q8),
            &config,
            Objective::Diffusion,
            &tokenizer,
            None,
            &tensors,
            2,
        )
        .unwrap();
        let model = LlamaModel::load_from_file(backend(), &q8, &LlamaModelParams::default()).unwrap();

        let mut messages: Vec<String> = vec![system.clone()];
        for dialog in corpus.train.iter().chain(&corpus.heldout) {
            messages.extend(dialog.turns.iter().map(|t| t.content().to_owned()));
            messages.push(render_chatml(system, &dialog.turns));
        }
        assert!(!corpus.heldout.is_empty());
        let n_messages = messages.len();
        let odd = odd_inputs();
        messages.extend(odd.iter().cloned());
        let bad = mismatches(&tokenizer, &model, &messages, true);
        for (text, ours, theirs) in bad.iter().take(5) {
            eprintln!("{text:?}\n  tokenizer.json: {ours:?}\n  llama.cpp:      {theirs:?}");
        }
        assert!(
            bad.is_empty(),
            "{} of {} texts tokenize differently (first: {:?})",
            bad.len(),
            messages.len(),
            bad.first().map(|b| &b.0)
        );
        eprintln!(
            "{} corpus texts ({} train + {} held-out dialogs) and {} odd inputs: identical ids",
            n_messages,
            corpus.train.len(),
            corpus.heldout.len(),
            odd.len()
        );

        // The comparison can fail: llama.cpp without control-token parsing spells the specials out
        // of bytes, where tokenizer.json (and the service) read them as one token each.
        let specials = mismatches(&tokenizer, &model, &odd, false);
        let texts: Vec<&str> = specials.iter().map(|b| b.0.as_str()).collect();
        assert!(texts.contains(&"<|mdm_mask|><|mdm_mask|> <|endoftext|>"), "{texts:?}");
        assert!(!texts.contains(&"0123456789"), "{texts:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The same comparison on a real model: every message and rendered dialog of a corpus directory,
    /// tokenized by its tokenizer.json and by a GGUF exported with it. Run with absolute paths (tests
    /// run in `training/`): `DLLM_CORPUS=/abs/dir DLLM_TOKENIZER=/abs/dir/tokenizer.json
    /// DLLM_GGUF=/abs/models/northwind-llada-q8_0.gguf cargo test -p dllm-train --lib trained_tokenizer
    /// -- --ignored --nocapture`.
    #[test]
    #[ignore = "needs a corpus, its tokenizer.json and a GGUF exported with it (env DLLM_CORPUS, DLLM_TOKENIZER, DLLM_GGUF)"]
    fn trained_tokenizer_and_llama_cpp_give_the_same_ids() {
        let env = |k: &str| PathBuf::from(std::env::var(k).unwrap_or_else(|_| panic!("set {k}")));
        let (dir, tok_path, gguf) = (env("DLLM_CORPUS"), env("DLLM_TOKENIZER"), env("DLLM_GGUF"));
        let tokenizer = crate::tokenizer::load(&tok_path).unwrap();
        assert_eq!(
            gguf_tokens(&gguf).unwrap(),
            gguf_vocab(&tokenizer).unwrap().tokens,
            "the GGUF was not exported with this tokenizer"
        );
        let system = crate::corpus::read_manifest(&dir).unwrap().system_prompt;
        let mut texts = vec![system.clone()];
        let mut dialogs = 0;
        for file in [crate::corpus::TRAIN_FILE, crate::corpus::HELDOUT_FILE] {
            for dialog in crate::corpus::read_jsonl(&dir.join(file)).unwrap() {
                dialogs += 1;
                texts.extend(dialog.turns.iter().map(|t| t.content().to_owned()));
                texts.push(render_chatml(&system, &dialog.turns));
            }
        }
        texts.sort();
        texts.dedup();
        texts.extend(odd_inputs());
        let model = LlamaModel::load_from_file(backend(), &gguf, &LlamaModelParams::default()).unwrap();
        let bad = mismatches(&tokenizer, &model, &texts, true);
        for (text, ours, theirs) in bad.iter().take(5) {
            eprintln!("{text:?}\n  tokenizer.json: {ours:?}\n  llama.cpp:      {theirs:?}");
        }
        eprintln!(
            "{dialogs} dialogs, {} distinct texts: {} differ",
            texts.len(),
            bad.len()
        );
        assert!(bad.is_empty());
    }

    #[test]
    fn vocabulary_marks_the_specials_as_control_tokens() {
        let tok = test_tokenizer();
        let v = vocabulary(&tok).unwrap();
        assert_eq!(&v.tokens[..4], &SPECIAL_TOKENS.map(str::to_owned));
        assert_eq!(
            &v.types[..5],
            &[TOKEN_CONTROL, TOKEN_CONTROL, TOKEN_CONTROL, TOKEN_CONTROL, TOKEN_NORMAL]
        );
        assert!(v.types[4..].iter().all(|&t| t == TOKEN_NORMAL));
        assert_eq!((v.end_of_text, v.end_of_turn, v.mask), (0, 2, 3));
        assert_eq!(v.pre, "qwen2");
    }

    #[test]
    fn siblings_replace_the_f32_suffix() {
        assert_eq!(sibling(Path::new("/m/x-f32.gguf"), "q8_0"), Path::new("/m/x-q8_0.gguf"));
        assert_eq!(sibling(Path::new("/m/x.gguf"), "f16"), Path::new("/m/x-f16.gguf"));
    }
}
