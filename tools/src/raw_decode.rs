//! llama.cpp's raw greedy decode loop on an autoregressive GGUF, with nothing of the service
//! around it: the prompt in one batch, then one token per decode until an end token. The eval
//! scores the twin with it, and the bench measures the autoregressive engine against it.
//! Blocking: runs llama.cpp on the calling thread.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::path::Path;
use std::time::{Duration, Instant};

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;

use dllm_chat::engine::vocab::{backend, chat_tokens};
use dllm_chat::engine::{ChatTurn, EngineError};

/// One reply of the loop.
#[derive(Debug, Clone)]
pub struct RawReply {
    pub text: String,
    pub prompt_tokens: usize,
    /// Tokens before the end token.
    pub completion_tokens: usize,
    /// From the start of the prompt's decode to the end token (rendering the prompt excluded).
    pub latency: Duration,
}

/// Replies greedily to each chat (system turn included) with at most `max_tokens` tokens.
pub fn replies(
    model_path: &Path,
    threads: usize,
    context_length: usize,
    max_tokens: usize,
    chats: &[Vec<ChatTurn>],
) -> Result<Vec<RawReply>, EngineError> {
    let load = |reason: String| EngineError::Load {
        path: model_path.display().to_string(),
        reason,
    };
    let backend = backend()?;
    let model = LlamaModel::load_from_file(backend, model_path, &LlamaModelParams::default())
        .map_err(|e| load(e.to_string()))?;
    let template = model
        .chat_template(None)
        .map_err(|e| EngineError::Template(e.to_string()))?;
    let n_ctx = context_length.min(model.n_ctx_train() as usize) as u32;
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(n_ctx))
        .with_n_batch(n_ctx)
        .with_n_threads(threads as i32)
        .with_n_threads_batch(threads as i32);
    let mut ctx = model.new_context(backend, params).map_err(|e| load(e.to_string()))?;
    let vocab = model.vocab();
    let mut batch = LlamaBatch::new(n_ctx as usize, 1);
    let decode_err = |e: llama_cpp_2::DecodeError| EngineError::Decode(e.to_string());
    let mut pieces: HashMap<i32, Vec<u8>> = HashMap::new();
    let mut out = Vec::with_capacity(chats.len());
    for chat in chats {
        let prompt = chat_tokens(&model, &template, chat)?;
        if prompt.len() + max_tokens > n_ctx as usize {
            return Err(EngineError::ContextOverflow {
                needed: prompt.len() + max_tokens,
                limit: n_ctx as usize,
            });
        }
        let started = Instant::now();
        ctx.clear_kv_cache();
        batch.clear();
        for (i, t) in prompt.iter().enumerate() {
            batch
                .add(LlamaToken(*t), i as i32, &[0], i + 1 == prompt.len())
                .map_err(|e| load(e.to_string()))?;
        }
        ctx.decode(&mut batch).map_err(decode_err)?;
        let mut reply: Vec<u8> = Vec::new();
        let mut generated = 0;
        let mut last = batch.n_tokens() - 1;
        while generated < max_tokens {
            let logits = ctx.get_logits_ith(last);
            let next = logits
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(i, _)| i as i32)
                .unwrap_or(0);
            if vocab.is_eog(LlamaToken(next)) {
                break;
            }
            generated += 1;
            reply.extend_from_slice(
                pieces
                    .entry(next)
                    .or_insert_with(|| vocab.token_to_piece(LlamaToken(next), false, None)),
            );
            batch.clear();
            batch
                .add(LlamaToken(next), (prompt.len() + generated - 1) as i32, &[0], true)
                .map_err(|e| load(e.to_string()))?;
            ctx.decode(&mut batch).map_err(decode_err)?;
            last = 0;
        }
        out.push(RawReply {
            text: String::from_utf8_lossy(&reply).into_owned(),
            prompt_tokens: prompt.len(),
            completion_tokens: generated,
            latency: started.elapsed(),
        });
    }
    Ok(out)
}
