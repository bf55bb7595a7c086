//! The forward graph of one evaluation: the tokens of several segments (one per conversation)
//! concatenated, so every projection and feed-forward reads the weights once for all of them, and
//! attention run per segment over that conversation's own cache cells only.
//!
//! Per layer and segment, the segment's new keys and values are first copied into its (F16) cache at
//! the cells the segment computes; attention then reads cells `0..len + span` of the cache, i.e. the
//! committed prefix, whatever scratch cells earlier evaluations left (the dual cache's suffix) and the
//! segment itself. Attention is non-causal: every query sees every key it is given, except in a
//! chunked prefill, where a block-causal mask keeps each chunk from seeing the chunks after it.
//!
//! The graph ends either in the logits of the requested rows, or, for decoding, in a softmax over
//! them followed by the top-k token ids, their probabilities and the entropy per row, so only a few
//! numbers per position leave the device.

use llama_cpp_sys_2 as sys;

use super::weights::Weights;
use super::Segment;

/// Queries from which ggml's CPU flash attention uses its tiled kernel (`GGML_FA_TILE_Q`).
const FA_TILE_QUERIES: usize = 64;

/// What the graph's head produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Head {
    /// Raw logits of every output row.
    Logits,
    /// Softmax, then the `k` most likely tokens per row (the mask token excluded), and with
    /// `entropy` each row's entropy: a logarithm per vocabulary entry, about a twentieth of a
    /// small model's step, so only when a policy reads it.
    TopK { k: usize, entropy: bool },
}

/// Graph nodes an evaluation of `segments` segments may need (views count as nodes in ggml).
pub(crate) fn graph_size(n_layer: usize, segments: usize) -> usize {
    256 + segments + n_layer * (48 + 32 * segments.max(1))
}

/// The graph's input and output tensors, filled and read by the caller.
pub(crate) struct Built {
    pub tokens: *mut sys::ggml_tensor,
    pub positions: *mut sys::ggml_tensor,
    /// Per segment, the F16 `[n_kv, queries]` block-causal mask of a chunked prefill (null
    /// for a segment without chunks).
    pub chunk_masks: Vec<*mut sys::ggml_tensor>,
    /// Per segment, the I64 cache cells of its tokens when they are not one run (null when
    /// they are).
    pub cell_rows: Vec<*mut sys::ggml_tensor>,
    /// Rows whose outputs are wanted (null when none are).
    pub out_rows: *mut sys::ggml_tensor,
    /// `[n_vocab]` added to the logits (minus infinity on excluded tokens); top-k head only.
    pub bias: *mut sys::ggml_tensor,
    /// `[1, n_out]` inverse temperatures; top-k head only.
    pub inv_temperature: *mut sys::ggml_tensor,
    pub logits: *mut sys::ggml_tensor,
    pub top_ids: *mut sys::ggml_tensor,
    pub top_probs: *mut sys::ggml_tensor,
    /// Null unless the head was asked for entropies.
    pub neg_entropy: *mut sys::ggml_tensor,
}

/// Builds the graph into `gf`.
///
/// # Safety
/// `ctx` must be a live no-alloc context with room for [`graph_size`] tensors, `gf` a graph of that
/// size in it, and every segment's cache made for `w` with enough capacity (checked by the caller).
pub(crate) unsafe fn build(
    ctx: *mut sys::ggml_context,
    gf: *mut sys::ggml_cgraph,
    w: &Weights,
    segments: &[Segment<'_>],
    n_out: usize,
    head: Head,
) -> Built {
    let s = &w.shape;
    let (hd, n_head, n_head_kv) = (s.head_dim() as i64, s.n_head as i64, s.n_head_kv as i64);
    let n_embd_kv = s.n_embd_kv() as i64;
    let n_total: usize = segments.iter().map(|g| g.tokens.len()).sum();
    let n_total = n_total as i64;
    let scale = 1.0 / (hd as f32).sqrt();

    let tokens = sys::ggml_new_tensor_1d(ctx, sys::GGML_TYPE_I32, n_total);
    sys::ggml_set_input(tokens);
    let positions = sys::ggml_new_tensor_1d(ctx, sys::GGML_TYPE_I32, n_total);
    sys::ggml_set_input(positions);
    let chunk_masks: Vec<*mut sys::ggml_tensor> = segments
        .iter()
        .map(|g| {
            if g.chunk_ends.is_empty() {
                return std::ptr::null_mut();
            }
            let n_kv = (g.cache.len + g.span) as i64;
            let mask = sys::ggml_new_tensor_2d(ctx, sys::GGML_TYPE_F16, n_kv, g.tokens.len() as i64);
            sys::ggml_set_input(mask);
            mask
        })
        .collect();

    let cell_rows: Vec<*mut sys::ggml_tensor> = segments
        .iter()
        .map(|g| {
            if g.cells.is_empty() {
                return std::ptr::null_mut();
            }
            let rows = sys::ggml_new_tensor_1d(ctx, sys::GGML_TYPE_I64, g.tokens.len() as i64);
            sys::ggml_set_input(rows);
            rows
        })
        .collect();

    let out_rows = if n_out > 0 {
        let rows = sys::ggml_new_tensor_1d(ctx, sys::GGML_TYPE_I32, n_out as i64);
        sys::ggml_set_input(rows);
        rows
    } else {
        std::ptr::null_mut()
    };

    let mut x = sys::ggml_get_rows(ctx, w.token_embd, tokens);
    for (l, layer) in w.layers.iter().enumerate() {
        // After the last layer's keys and values only the output rows matter: a prefill stops at
        // the cache copies, a step carries on with its output rows alone (as llama.cpp does).
        let last = l + 1 == w.layers.len();
        let mut cur = sys::ggml_rms_norm(ctx, x, s.rms_eps);
        cur = sys::ggml_mul(ctx, cur, layer.attn_norm);
        let project = |wt, bias: Option<*mut sys::ggml_tensor>| {
            let p = sys::ggml_mul_mat(ctx, wt, cur);
            match bias {
                Some(b) => sys::ggml_add(ctx, p, b),
                None => p,
            }
        };
        let q = project(layer.wq, layer.bq);
        let k = project(layer.wk, layer.bk);
        let v = project(layer.wv, layer.bv);
        let rope = |t, heads| {
            let t = sys::ggml_reshape_3d(ctx, t, hd, heads, n_total);
            sys::ggml_rope_ext(
                ctx,
                t,
                positions,
                std::ptr::null_mut(),
                hd as i32,
                s.family.rope_mode(),
                s.context_length as i32,
                s.rope_freq_base,
                1.0,
                0.0,
                1.0,
                32.0,
                1.0,
            )
        };
        let q = rope(q, n_head);
        let k = rope(k, n_head_kv);

        let mut outs = Vec::with_capacity(segments.len());
        let mut first = 0i64;
        for ((g, mask), cell_rows) in segments.iter().zip(&chunk_masks).zip(&cell_rows) {
            let n = g.tokens.len() as i64;
            let at = (g.cache.len + g.offset) as i64;
            let n_kv = (g.cache.len + g.span) as i64;
            let (kc, vc) = (g.cache.k[l], g.cache.v[l]);
            let row = (*kc).nb[1];
            let elem = (*kc).nb[0];

            // New keys and values into the cache cells this segment computes.
            for (src, dst) in [(k, kc), (v, vc)] {
                let new = sys::ggml_view_2d(
                    ctx,
                    src,
                    n_embd_kv,
                    n,
                    n_embd_kv as usize * 4,
                    first as usize * n_embd_kv as usize * 4,
                );
                let written = if cell_rows.is_null() {
                    let cells = sys::ggml_view_2d(ctx, dst, n_embd_kv, n, row, at as usize * row);
                    sys::ggml_cpy(ctx, new, cells)
                } else {
                    // Scattered cells: one row each, converted to the cache's F16.
                    sys::ggml_set_rows(ctx, dst, new, *cell_rows)
                };
                sys::ggml_build_forward_expand(gf, written);
            }

            if last && n_out == 0 {
                first += n;
                continue;
            }
            // Attention over cells 0..n_kv (the copies above were expanded first, so they run first).
            let q_g = sys::ggml_view_3d(
                ctx,
                q,
                hd,
                n_head,
                n,
                (*q).nb[1],
                (*q).nb[2],
                first as usize * (*q).nb[2],
            );
            let q_g = sys::ggml_permute(ctx, q_g, 0, 2, 1, 3);
            let keys = sys::ggml_view_3d(ctx, kc, hd, n_kv, n_head_kv, row, hd as usize * elem, 0);
            let values = sys::ggml_view_3d(ctx, vc, hd, n_kv, n_head_kv, row, hd as usize * elem, 0);
            outs.push(attention(ctx, q_g, keys, values, *mask, scale));
            first += n;
        }
        if last && n_out == 0 {
            break;
        }
        let mut attn = concat_columns(ctx, outs);
        if last {
            attn = sys::ggml_get_rows(ctx, attn, out_rows);
            x = sys::ggml_get_rows(ctx, x, out_rows);
        }
        let attn = sys::ggml_mul_mat(ctx, layer.wo, attn);
        let ffn_in = sys::ggml_add(ctx, attn, x);

        let mut cur = sys::ggml_rms_norm(ctx, ffn_in, s.rms_eps);
        cur = sys::ggml_mul(ctx, cur, layer.ffn_norm);
        let gate = sys::ggml_mul_mat(ctx, layer.ffn_gate, cur);
        let up = sys::ggml_mul_mat(ctx, layer.ffn_up, cur);
        let hidden = sys::ggml_swiglu_split(ctx, gate, up);
        let down = sys::ggml_mul_mat(ctx, layer.ffn_down, hidden);
        x = sys::ggml_add(ctx, down, ffn_in);
    }

    let null = std::ptr::null_mut();
    let mut built = Built {
        tokens,
        positions,
        chunk_masks,
        cell_rows,
        out_rows: null,
        bias: null,
        inv_temperature: null,
        logits: null,
        top_ids: null,
        top_probs: null,
        neg_entropy: null,
    };
    if n_out == 0 {
        // Prefill only: the cache copies are the result (expanded with the last layer).
        return built;
    }
    built.out_rows = out_rows;
    // `x` holds the output rows alone since the last layer's attention.
    let mut cur = sys::ggml_rms_norm(ctx, x, s.rms_eps);
    cur = sys::ggml_mul(ctx, cur, w.output_norm);
    let logits = sys::ggml_mul_mat(ctx, w.output, cur);
    match head {
        Head::Logits => {
            sys::ggml_set_output(logits);
            sys::ggml_build_forward_expand(gf, logits);
            built.logits = logits;
        }
        Head::TopK { k, entropy } => {
            let n_vocab = s.n_vocab as i64;
            let bias = sys::ggml_new_tensor_1d(ctx, sys::GGML_TYPE_F32, n_vocab);
            sys::ggml_set_input(bias);
            let inv_t = sys::ggml_new_tensor_2d(ctx, sys::GGML_TYPE_F32, 1, n_out as i64);
            sys::ggml_set_input(inv_t);
            let scaled = sys::ggml_mul(ctx, sys::ggml_add(ctx, logits, bias), inv_t);
            let probs = sys::ggml_soft_max(ctx, scaled);
            let ids = sys::ggml_cont(ctx, sys::ggml_top_k(ctx, probs, k as i32));
            let picked = sys::ggml_get_rows(ctx, sys::ggml_reshape_3d(ctx, probs, 1, n_vocab, n_out as i64), ids);
            for t in [ids, picked] {
                sys::ggml_set_output(t);
                sys::ggml_build_forward_expand(gf, t);
            }
            if entropy {
                let logp = sys::ggml_log(ctx, sys::ggml_clamp(ctx, probs, 1e-30, 1.0));
                let neg_entropy = sys::ggml_sum_rows(ctx, sys::ggml_mul(ctx, probs, logp));
                sys::ggml_set_output(neg_entropy);
                sys::ggml_build_forward_expand(gf, neg_entropy);
                built.neg_entropy = neg_entropy;
            }
            built.bias = bias;
            built.inv_temperature = inv_t;
            built.top_ids = ids;
            built.top_probs = picked;
        }
    }
    built
}

/// Attention of the queries `q` (`[hd, n, n_head]`) over `keys` and `values` (`[hd, n_kv,
/// n_head_kv]`, F16), with an optional mask; returns `[n_embd, n]`.
///
/// From [`FA_TILE_QUERIES`] queries on, ggml's CPU flash attention with F32 accumulation, as
/// llama.cpp runs it. Below that its per-key loop is about ten times slower than its tiled kernel,
/// and padding the queries up to the tile wastes the padded rows' work, so a denoising step of a
/// few tokens multiplies the scores and values out instead (an 8-token step: 1.8 -> 1.1-1.2 ms on the
/// bundled model, 2 threads).
unsafe fn attention(
    ctx: *mut sys::ggml_context,
    q: *mut sys::ggml_tensor,
    keys: *mut sys::ggml_tensor,
    values: *mut sys::ggml_tensor,
    mask: *mut sys::ggml_tensor,
    scale: f32,
) -> *mut sys::ggml_tensor {
    let (hd, n, n_head) = ((*q).ne[0], (*q).ne[1], (*q).ne[2]);
    if n as usize >= FA_TILE_QUERIES {
        let o = sys::ggml_flash_attn_ext(ctx, q, keys, values, mask, scale, 0.0, 0.0);
        sys::ggml_prec_set_acc(o, sys::GGML_PREC_F32);
        return sys::ggml_reshape_2d(ctx, o, hd * n_head, n);
    }
    // Scores `[n_kv, n, n_head]`, softmax over the keys, then the values (copied with the keys
    // innermost) weighted by them: `[hd, n, n_head]`, heads moved next to the features.
    let scores = sys::ggml_mul_mat(ctx, sys::ggml_cast(ctx, keys, sys::GGML_TYPE_F32), q);
    sys::ggml_mul_mat_set_prec(scores, sys::GGML_PREC_F32);
    let weights = sys::ggml_soft_max_ext(ctx, scores, mask, scale, 0.0);
    // F32 keys and values, so the queries and weights stay F32 too (F16 products round them to
    // about 1e-3).
    let values_t = sys::ggml_cast(ctx, sys::ggml_permute(ctx, values, 1, 0, 2, 3), sys::GGML_TYPE_F32);
    let out = sys::ggml_mul_mat(ctx, values_t, weights);
    let out = sys::ggml_cont(ctx, sys::ggml_permute(ctx, out, 0, 2, 1, 3));
    sys::ggml_reshape_2d(ctx, out, hd * n_head, n)
}

/// Joins `[n_embd, n_i]` blocks along the token dimension, pairwise so each value moves O(log n) times.
unsafe fn concat_columns(ctx: *mut sys::ggml_context, mut parts: Vec<*mut sys::ggml_tensor>) -> *mut sys::ggml_tensor {
    while parts.len() > 1 {
        parts = parts
            .chunks(2)
            .map(|pair| match pair {
                [a, b] => sys::ggml_concat(ctx, *a, *b, 1),
                [a] => *a,
                _ => unreachable!("chunks of two"),
            })
            .collect();
    }
    parts[0]
}
