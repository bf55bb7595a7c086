//! Our own ggml graph (`ggml_ext::runtime`) against llama.cpp on the same GGUF files: the no-cache
//! computation against llama.cpp's `llada` graph, cached attention against the `llama` twin with the
//! prefix in llama.cpp's KV cache, and the cache mechanics (batching, reuse across turns, the dual
//! cache's suffix) against recomputation.

mod common;

use std::path::{Path, PathBuf};

use ggml_ext::runtime::{DiffusionModel, Head, Predictions, RuntimeConfig, Segment};
use llama_cpp_2::context::params::{LlamaAttentionType, LlamaContextParams};
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;

/// A short prompt-like sequence and a canvas-like window (fixture ids; 265 is the mask token).
const PREFIX: [i32; 24] = [
    264, 10, 200, 33, 7, 120, 99, 45, 46, 47, 265, 1, 2, 3, 150, 151, 152, 20, 21, 22, 23, 24, 25, 263,
];
const WINDOW: [i32; 10] = [265, 265, 70, 71, 265, 265, 265, 72, 265, 262];

/// A prompt and a canvas of realistic sizes: 64 queries and more take ggml's tiled flash-attention
/// kernel, in llama.cpp and in our graph alike.
fn long_prefix() -> Vec<i32> {
    (0..90).map(|i| i * 37 % 262).collect()
}

fn long_window() -> Vec<i32> {
    (0..64).map(|i| if i % 3 == 0 { i * 11 % 262 } else { 265 }).collect()
}

fn config() -> RuntimeConfig {
    RuntimeConfig {
        threads: 1,
        ..RuntimeConfig::default()
    }
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn logits(p: Predictions) -> Vec<f32> {
    match p {
        Predictions::Logits(rows) => rows.concat(),
        other => panic!("{other:?}"),
    }
}

/// llama.cpp's logits for `tokens` (all rows). With `prefix`, the twin decodes it first into its KV
/// cache and then `tokens` after it, non-causally.
fn llama_cpp_logits(path: &Path, prefix: &[i32], tokens: &[i32]) -> Vec<f32> {
    let backend = dllm_chat::engine::vocab::backend().unwrap();
    let model = LlamaModel::load_from_file(backend, path, &LlamaModelParams::default()).unwrap();
    let mut params = LlamaContextParams::default()
        .with_n_ctx(std::num::NonZeroU32::new(256))
        .with_n_batch(256)
        .with_n_ubatch(256)
        .with_n_threads(1);
    if !prefix.is_empty() {
        params = params.with_attention_type(LlamaAttentionType::NonCausal);
    }
    let mut ctx = model.new_context(backend, params).unwrap();
    let mut batch = LlamaBatch::new(256, 1);
    if !prefix.is_empty() {
        for (i, t) in prefix.iter().enumerate() {
            batch.add(LlamaToken(*t), i as i32, &[0], false).unwrap();
        }
        ctx.decode(&mut batch).unwrap();
        batch.clear();
    }
    for (i, t) in tokens.iter().enumerate() {
        batch
            .add(LlamaToken(*t), (prefix.len() + i) as i32, &[0], true)
            .unwrap();
    }
    ctx.decode(&mut batch).unwrap();
    (0..tokens.len() as i32)
        .flat_map(|i| ctx.get_logits_ith(i).to_vec())
        .collect()
}

/// Our no-cache computation: everything as one segment over an empty cache.
fn our_full_logits(model: &mut DiffusionModel, tokens: &[i32]) -> Vec<f32> {
    let mut cache = model.new_cache(256).unwrap();
    let rows: Vec<usize> = (0..tokens.len()).collect();
    let mut seg = [Segment {
        cache: &mut cache,
        tokens,
        offset: 0,
        cells: &[],
        span: tokens.len(),
        outputs: &rows,
        temperature: 1.0,
        commit: false,
        chunk_ends: &[],
    }];
    logits(model.eval(&mut seg, Head::Logits).unwrap().remove(0))
}

fn sequence() -> Vec<i32> {
    PREFIX.iter().chain(&WINDOW).copied().collect()
}

fn quantized(kind: ggml_ext::WeightType, dir: &Path) -> PathBuf {
    let out = dir.join(format!("fixture-{kind:?}.gguf"));
    ggml_ext::quantize(&common::fixture_model(), &out, kind, 1).unwrap();
    out
}

#[test]
fn no_cache_logits_equal_llama_cpps_llada_graph() {
    let dir = tempfile::tempdir().unwrap();
    let sequence = || -> Vec<i32> { long_prefix().into_iter().chain(long_window()).collect() };
    // F32 and Q8_0 run the same kernels in the same order (flash attention over F16 K/V included)
    // and are bit-identical today (measured max abs diff 0); the tolerance leaves room for a ggml
    // update that reorders a sum. For Q4_0 llama.cpp repacks the weights into its interleaved CPU
    // layout, whose kernels quantize activations differently: measured 0.14 on logits of magnitude
    // ~12, within Q4_0's own quantization noise.
    for (path, tolerance) in [
        (common::fixture_model(), 1e-4),
        (quantized(ggml_ext::WeightType::Q8_0, dir.path()), 1e-4),
        (quantized(ggml_ext::WeightType::Q4_0, dir.path()), 0.25),
    ] {
        let reference = llama_cpp_logits(&path, &[], &sequence());
        let mut model = DiffusionModel::load(&path, config()).unwrap();
        let ours = our_full_logits(&mut model, &sequence());
        let diff = max_diff(&reference, &ours);
        assert!(diff <= tolerance, "{}: max abs diff {diff}", path.display());
        // And the comparison can fail: a changed token changes the logits.
        let mut other = sequence();
        other[3] = 99;
        assert!(max_diff(&reference, &our_full_logits(&mut model, &other)) > 1e-2);
    }
}

/// Dream (biased Q/K/V, NEOX RoPE) with grouped-query attention, against llama.cpp's `dream` graph.
#[test]
fn dream_no_cache_logits_equal_llama_cpps_dream_graph() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dream.gguf");
    let mut spec = ggml_ext::FixtureSpec::default();
    spec.hyperparams.architecture = ggml_ext::Architecture::Dream;
    spec.hyperparams.n_head_kv = 2;
    ggml_ext::write_llada_fixture(&path, &spec).unwrap();
    let sequence: Vec<i32> = long_prefix().into_iter().chain(long_window()).collect();
    let reference = llama_cpp_logits(&path, &[], &sequence);
    let mut model = DiffusionModel::load(&path, config()).unwrap();
    assert_eq!(model.shape().family, ggml_ext::runtime::Family::Dream);
    assert_eq!(model.shape().family.logit_shift(), 1);
    let diff = max_diff(&reference, &our_full_logits(&mut model, &sequence));
    assert!(diff <= 1e-4, "max abs diff {diff}");
}

/// A file without `output.weight` (tied embeddings): both llama.cpp and our graph read logits through
/// `token_embd`.
#[test]
fn tied_embeddings_logits_equal_llama_cpps_llada_graph() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tied.gguf");
    let mut spec = ggml_ext::FixtureSpec::default();
    spec.hyperparams.tied_embeddings = true;
    ggml_ext::write_llada_fixture(&path, &spec).unwrap();
    let sequence: Vec<i32> = long_prefix().into_iter().chain(long_window()).collect();
    let reference = llama_cpp_logits(&path, &[], &sequence);
    let mut model = DiffusionModel::load(&path, config()).unwrap();
    let diff = max_diff(&reference, &our_full_logits(&mut model, &sequence));
    assert!(diff <= 1e-4, "max abs diff {diff}");
    // Same seed, own output matrix: other logits, so the file above really was read without one.
    let untied = llama_cpp_logits(&common::fixture_model(), &[], &sequence);
    assert!(max_diff(&reference, &untied) > 1e-2);
}

/// Below 64 queries llama.cpp runs ggml's per-key flash-attention loop; our graph multiplies the
/// scores and values out in F32 (several times faster there). The two round differently: measured
/// max abs diff 0.008 on logits of magnitude ~12 for this 34-token sequence.
#[test]
fn short_sequences_differ_from_llama_cpp_only_by_kernel_rounding() {
    let reference = llama_cpp_logits(&common::fixture_model(), &[], &sequence());
    let mut model = DiffusionModel::load(&common::fixture_model(), config()).unwrap();
    let diff = max_diff(&reference, &our_full_logits(&mut model, &sequence()));
    assert!(diff <= 2e-2, "max abs diff {diff}");
}

#[test]
fn prefix_cache_logits_equal_the_llama_twin_with_a_cached_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let twin = dir.path().join("twin.gguf");
    ggml_ext::retarget(&common::fixture_model(), &twin, "llada", "llama").unwrap();
    let (prefix, window) = (long_prefix(), long_window());
    let reference = llama_cpp_logits(&twin, &prefix, &window);

    let mut model = DiffusionModel::load(&common::fixture_model(), config()).unwrap();
    let mut cache = model.new_cache(256).unwrap();
    model.prefill(&mut cache, &prefix).unwrap();
    assert_eq!(cache.len(), prefix.len());
    let rows: Vec<usize> = (0..window.len()).collect();
    let mut seg = [Segment {
        cache: &mut cache,
        tokens: &window,
        offset: 0,
        cells: &[],
        span: window.len(),
        outputs: &rows,
        temperature: 1.0,
        commit: false,
        chunk_ends: &[],
    }];
    let ours = logits(model.eval(&mut seg, Head::Logits).unwrap().remove(0));
    let diff = max_diff(&reference, &ours);
    assert!(diff <= 1e-4, "max abs diff {diff}");
    // The cached prefix really is an approximation of the full recompute.
    let whole: Vec<i32> = prefix.iter().chain(&window).copied().collect();
    let full = our_full_logits(&mut model, &whole);
    let full_window = &full[prefix.len() * model.shape().n_vocab..];
    assert!(max_diff(full_window, &ours) > 1e-3);
}

/// One segment's window logits over a prefix cache, alone or in a batch.
fn window_logits(
    model: &mut DiffusionModel,
    caches: &mut [ggml_ext::runtime::KvCache],
    windows: &[&[i32]],
) -> Vec<Vec<f32>> {
    let rows: Vec<Vec<usize>> = windows.iter().map(|w| (0..w.len()).collect()).collect();
    let mut segs: Vec<Segment> = caches
        .iter_mut()
        .zip(windows)
        .zip(&rows)
        .map(|((cache, w), r)| Segment {
            cache,
            tokens: w,
            offset: 0,
            cells: &[],
            span: w.len(),
            outputs: r,
            temperature: 1.0,
            commit: false,
            chunk_ends: &[],
        })
        .collect();
    model
        .eval(&mut segs, Head::Logits)
        .unwrap()
        .into_iter()
        .map(logits)
        .collect()
}

#[test]
fn batched_segments_equal_unbatched_ones() {
    let mut model = DiffusionModel::load(&common::fixture_model(), config()).unwrap();
    let prompts: [&[i32]; 3] = [&PREFIX, &PREFIX[5..], &[264, 40, 41, 42, 263]];
    let windows: [&[i32]; 3] = [&WINDOW, &WINDOW[..4], &[265, 265, 265, 265, 265, 265, 80]];
    let mut caches: Vec<_> = prompts
        .iter()
        .map(|p| {
            let mut c = model.new_cache(64).unwrap();
            model.prefill(&mut c, p).unwrap();
            c
        })
        .collect();
    let alone: Vec<Vec<f32>> = (0..3)
        .map(|i| window_logits(&mut model, &mut caches[i..i + 1], &windows[i..i + 1]).remove(0))
        .collect();
    let together = window_logits(&mut model, &mut caches, &windows);
    for i in 0..3 {
        let diff = max_diff(&alone[i], &together[i]);
        assert!(diff <= 1e-5, "segment {i}: {diff}");
    }
    assert!(
        max_diff(&together[0][..together[1].len()], &together[1]) > 1e-3,
        "different prompts differ"
    );
}

#[test]
fn appending_a_turn_equals_a_fresh_chunked_prefill() {
    let mut model = DiffusionModel::load(&common::fixture_model(), config()).unwrap();
    let (turn1, turn2) = PREFIX.split_at(14);
    // Reused: turn 1 prefilled, a reply denoised over it (scratch cells written), then turn 2 appended.
    let mut reused = model.new_cache(64).unwrap();
    model.prefill(&mut reused, turn1).unwrap();
    window_logits(&mut model, std::slice::from_mut(&mut reused), &[&WINDOW]);
    model.prefill(&mut reused, turn2).unwrap();
    // Fresh: both chunks into a new cache.
    let mut fresh = model.new_cache(64).unwrap();
    model.prefill(&mut fresh, turn1).unwrap();
    model.prefill(&mut fresh, turn2).unwrap();
    assert_eq!(reused.tokens(), fresh.tokens());
    let a = window_logits(&mut model, std::slice::from_mut(&mut reused), &[&WINDOW]).remove(0);
    let b = window_logits(&mut model, std::slice::from_mut(&mut fresh), &[&WINDOW]).remove(0);
    assert_eq!(max_diff(&a, &b), 0.0);
    // Truncating to the first chunk and appending a different second turn also matches a fresh run.
    reused.truncate(turn1.len());
    model.prefill(&mut reused, &[30, 31, 32]).unwrap();
    let mut fresh = model.new_cache(64).unwrap();
    model.prefill(&mut fresh, turn1).unwrap();
    model.prefill(&mut fresh, &[30, 31, 32]).unwrap();
    let a = window_logits(&mut model, std::slice::from_mut(&mut reused), &[&WINDOW]).remove(0);
    let b = window_logits(&mut model, std::slice::from_mut(&mut fresh), &[&WINDOW]).remove(0);
    assert_eq!(max_diff(&a, &b), 0.0);
}

/// With more than one thread the CPU backend keeps a pool of workers across evaluations; many
/// evaluations through it (models made and dropped in turn) give one thread's results.
#[test]
fn evaluations_through_the_kept_thread_pool_equal_one_threads() {
    let path = common::fixture_model();
    let mut one = DiffusionModel::load(&path, config()).unwrap();
    let mut cache = one.new_cache(64).unwrap();
    one.prefill(&mut cache, &PREFIX).unwrap();
    let expected = window_logits(&mut one, std::slice::from_mut(&mut cache), &[&WINDOW]).remove(0);
    for _ in 0..3 {
        let mut pooled = DiffusionModel::load(&path, RuntimeConfig { threads: 2, ..config() }).unwrap();
        assert!(pooled.device_description().contains("2 threads"));
        for _ in 0..20 {
            let mut cache = pooled.new_cache(64).unwrap();
            pooled.prefill(&mut cache, &PREFIX).unwrap();
            let got = window_logits(&mut pooled, std::slice::from_mut(&mut cache), &[&WINDOW]).remove(0);
            assert!(max_diff(&expected, &got) <= 1e-5, "{}", max_diff(&expected, &got));
        }
    }
}

#[test]
fn a_copied_prefix_equals_its_own_prefill() {
    let mut model = DiffusionModel::load(&common::fixture_model(), config()).unwrap();
    let (system, turn) = PREFIX.split_at(9);
    // The source holds the shared start and a turn of its own, and has denoised a reply (scratch).
    let mut source = model.new_cache(64).unwrap();
    model.prefill(&mut source, system).unwrap();
    model.prefill(&mut source, &[40, 41, 42, 43]).unwrap();
    window_logits(&mut model, std::slice::from_mut(&mut source), &[&WINDOW]);
    // The copy takes the shared start over cells that held other tokens' keys and values, and
    // appends its own turn.
    let mut copied = model.new_cache(64).unwrap();
    model.prefill(&mut copied, &[7; 12]).unwrap();
    copied.copy_prefix_from(&source, system.len()).unwrap();
    assert_eq!(copied.tokens(), system);
    model.prefill(&mut copied, turn).unwrap();
    let mut fresh = model.new_cache(64).unwrap();
    model.prefill(&mut fresh, system).unwrap();
    model.prefill(&mut fresh, turn).unwrap();
    assert_eq!(copied.tokens(), fresh.tokens());
    let a = window_logits(&mut model, std::slice::from_mut(&mut copied), &[&WINDOW]).remove(0);
    let b = window_logits(&mut model, std::slice::from_mut(&mut fresh), &[&WINDOW]).remove(0);
    assert_eq!(max_diff(&a, &b), 0.0);
}

#[test]
fn copying_more_than_a_cache_holds_or_across_models_is_refused() {
    let path = common::fixture_model();
    let mut model = DiffusionModel::load(&path, config()).unwrap();
    let other = DiffusionModel::load(&path, config()).unwrap();
    let mut source = model.new_cache(64).unwrap();
    model.prefill(&mut source, &PREFIX[..10]).unwrap();
    let mut small = model.new_cache(8).unwrap();
    let mut foreign = other.new_cache(64).unwrap();
    for (cache, len) in [(&mut small, 9), (&mut foreign, 4)] {
        let err = cache.copy_prefix_from(&source, len).unwrap_err();
        assert!(matches!(err, ggml_ext::runtime::RuntimeError::Cache(_)), "{err}");
        assert!(cache.is_empty(), "a refused copy leaves the cache alone");
    }
    let mut fits = model.new_cache(64).unwrap();
    let err = fits.copy_prefix_from(&source, 11).unwrap_err();
    assert!(err.to_string().contains("the source holds 10"), "{err}");
    fits.copy_prefix_from(&source, 10).unwrap();
    assert_eq!(fits.tokens(), &PREFIX[..10]);
}

#[test]
fn a_chunked_prefill_in_one_evaluation_equals_one_evaluation_per_chunk() {
    let mut model = DiffusionModel::load(&common::fixture_model(), config()).unwrap();
    let first_turn = &PREFIX[..6];
    // After the cached first turn: a short chunk, one of 64 tokens and more (ggml's tiled kernel),
    // and a last one.
    let rest: Vec<i32> = PREFIX[6..].iter().copied().chain(long_prefix()).collect();
    let ends = [7, 7 + 70];
    let mut one_by_one = model.new_cache(256).unwrap();
    model.prefill(&mut one_by_one, first_turn).unwrap();
    let mut start = 0;
    for end in ends.into_iter().chain(std::iter::once(rest.len())) {
        model.prefill(&mut one_by_one, &rest[start..end]).unwrap();
        start = end;
    }
    let mut together = model.new_cache(256).unwrap();
    model.prefill(&mut together, first_turn).unwrap();
    model.prefill_chunks(&mut together, &rest, &ends).unwrap();
    assert_eq!(together.tokens(), one_by_one.tokens());
    let a = window_logits(&mut model, std::slice::from_mut(&mut one_by_one), &[&WINDOW]).remove(0);
    let b = window_logits(&mut model, std::slice::from_mut(&mut together), &[&WINDOW]).remove(0);
    let diff = max_diff(&a, &b);
    assert!(diff <= 1e-4, "chunked in one evaluation vs one per chunk: {diff}");
    // Without the mask every chunk would see the ones after it: a different cache.
    let mut unmasked = model.new_cache(256).unwrap();
    model.prefill(&mut unmasked, first_turn).unwrap();
    model.prefill(&mut unmasked, &rest).unwrap();
    let c = window_logits(&mut model, std::slice::from_mut(&mut unmasked), &[&WINDOW]).remove(0);
    assert!(max_diff(&a, &c) > 1e-3, "the chunks change the result");
}

#[test]
fn chunk_ends_outside_the_tokens_or_out_of_order_are_refused() {
    let mut model = DiffusionModel::load(&common::fixture_model(), config()).unwrap();
    let mut cache = model.new_cache(64).unwrap();
    for ends in [&[0][..], &[10], &[12], &[5, 3], &[4, 4]] {
        let err = model.prefill_chunks(&mut cache, &PREFIX[..10], ends).unwrap_err();
        assert!(err.to_string().contains("chunk ends"), "{ends:?}: {err}");
    }
    let err = model
        .eval(
            &mut [Segment {
                cache: &mut cache,
                tokens: &WINDOW,
                offset: 0,
                cells: &[],
                span: WINDOW.len(),
                outputs: &[0],
                temperature: 1.0,
                commit: false,
                chunk_ends: &[3],
            }],
            Head::Logits,
        )
        .unwrap_err();
    assert!(err.to_string().contains("committing"), "{err}");
    assert_eq!(cache.len(), 0);
}

#[test]
fn dual_cache_block_step_reuses_the_suffix_of_the_last_full_pass() {
    let mut model = DiffusionModel::load(&common::fixture_model(), config()).unwrap();
    let mut cache = model.new_cache(64).unwrap();
    model.prefill(&mut cache, &PREFIX).unwrap();
    let all_rows: Vec<usize> = (0..WINDOW.len()).collect();
    // Full pass over the canvas: writes every canvas cell's K/V.
    let full = logits(
        model
            .eval(
                &mut [Segment {
                    cache: &mut cache,
                    tokens: &WINDOW,
                    offset: 0,
                    cells: &[],
                    span: WINDOW.len(),
                    outputs: &all_rows,
                    temperature: 1.0,
                    commit: false,
                    chunk_ends: &[],
                }],
                Head::Logits,
            )
            .unwrap()
            .remove(0),
    );
    // Block 4..7 alone, attending to the cached cells of the rest of the canvas: same logits.
    let block = &WINDOW[4..7];
    let rows = [0, 1, 2];
    let mut seg = [Segment {
        cache: &mut cache,
        tokens: block,
        offset: 4,
        cells: &[],
        span: WINDOW.len(),
        outputs: &rows,
        temperature: 1.0,
        commit: false,
        chunk_ends: &[],
    }];
    let dual = logits(model.eval(&mut seg, Head::Logits).unwrap().remove(0));
    let n_vocab = model.shape().n_vocab;
    assert!(max_diff(&full[4 * n_vocab..7 * n_vocab], &dual) <= 1e-5);
    // A changed block token changes the block's own logits even with the suffix cached.
    let changed = [265, 70, 265];
    let mut seg = [Segment {
        cache: &mut cache,
        tokens: &changed,
        offset: 4,
        cells: &[],
        span: WINDOW.len(),
        outputs: &rows,
        temperature: 1.0,
        commit: false,
        chunk_ends: &[],
    }];
    let other = logits(model.eval(&mut seg, Head::Logits).unwrap().remove(0));
    assert!(max_diff(&dual, &other) > 1e-3);
}

/// A step over some cells of the canvas, one by one.
fn picked_step(
    model: &mut DiffusionModel,
    cache: &mut ggml_ext::runtime::KvCache,
    cells: &[usize],
    tokens: &[i32],
) -> Result<Vec<f32>, ggml_ext::runtime::RuntimeError> {
    let rows: Vec<usize> = (0..tokens.len()).collect();
    let mut seg = [Segment {
        cache,
        tokens,
        offset: cells[0],
        cells,
        span: WINDOW.len(),
        outputs: &rows,
        temperature: 1.0,
        commit: false,
        chunk_ends: &[],
    }];
    Ok(logits(model.eval(&mut seg, Head::Logits)?.remove(0)))
}

#[test]
fn a_step_over_picked_cells_reuses_the_others_and_writes_its_own() {
    let mut model = DiffusionModel::load(&common::fixture_model(), config()).unwrap();
    let n_vocab = model.shape().n_vocab;
    let mut cache = model.new_cache(64).unwrap();
    model.prefill(&mut cache, &PREFIX).unwrap();
    let full = window_logits(&mut model, std::slice::from_mut(&mut cache), &[&WINDOW]).remove(0);
    // Cells 1, 4 and 8 with their own tokens, over the others' cached keys and values: the full
    // pass's rows.
    let cells = [1, 4, 8];
    let same: Vec<i32> = cells.iter().map(|c| WINDOW[*c]).collect();
    let picked = picked_step(&mut model, &mut cache, &cells, &same).unwrap();
    for (i, c) in cells.iter().enumerate() {
        let diff = max_diff(
            &full[c * n_vocab..(c + 1) * n_vocab],
            &picked[i * n_vocab..(i + 1) * n_vocab],
        );
        assert!(diff <= 1e-5, "cell {c}: {diff}");
    }
    // New tokens in cells 1 and 4 change every row, and their keys and values stay in the cache:
    // a later step over cell 8 alone sees them.
    let changed = [70, 71, WINDOW[8]];
    let after = picked_step(&mut model, &mut cache, &cells, &changed).unwrap();
    assert!(max_diff(&picked, &after) > 1e-3);
    let alone = picked_step(&mut model, &mut cache, &[8], &[WINDOW[8]]).unwrap();
    assert!(max_diff(&after[2 * n_vocab..], &alone) <= 1e-5);
    assert!(max_diff(&full[8 * n_vocab..9 * n_vocab], &alone) > 1e-3);
    // Cells out of order, outside the span or not one per token are refused.
    for (cells, tokens) in [(&[4, 1][..], &[70, 71][..]), (&[1, 10], &[70, 71]), (&[1, 2], &[70])] {
        let err = picked_step(&mut model, &mut cache, cells, tokens).unwrap_err();
        assert!(err.to_string().contains("cells"), "{cells:?}: {err}");
    }
}

#[test]
fn top_k_head_agrees_with_a_softmax_of_the_logits() {
    let mut model = DiffusionModel::load(&common::fixture_model(), config()).unwrap();
    let mask = model.shape().mask_token.expect("the fixture names its mask token");
    let seq = sequence();
    let full = our_full_logits(&mut model, &seq);
    let n_vocab = model.shape().n_vocab;
    let mut cache = model.new_cache(128).unwrap();
    let rows: Vec<usize> = (PREFIX.len()..seq.len()).collect();
    let temperature = 0.7;
    let mut seg = [Segment {
        cache: &mut cache,
        tokens: &seq,
        offset: 0,
        cells: &[],
        span: seq.len(),
        outputs: &rows,
        temperature,
        commit: false,
        chunk_ends: &[],
    }];
    let Predictions::TopK(tops) = model
        .eval(&mut seg, Head::TopK { k: 3, entropy: true })
        .unwrap()
        .remove(0)
    else {
        panic!("top-k head")
    };
    assert_eq!(tops.len(), rows.len());
    for (top, &row) in tops.iter().zip(&rows) {
        let l = &full[row * n_vocab..(row + 1) * n_vocab];
        let max = l
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != mask as usize)
            .map(|(_, v)| *v)
            .fold(f32::MIN, f32::max);
        let e: Vec<f32> = l
            .iter()
            .enumerate()
            .map(|(i, v)| {
                if i == mask as usize {
                    0.0
                } else {
                    ((v - max) / temperature).exp()
                }
            })
            .collect();
        let sum: f32 = e.iter().sum();
        let p: Vec<f32> = e.iter().map(|x| x / sum).collect();
        let mut order: Vec<usize> = (0..n_vocab).collect();
        order.sort_by(|a, b| p[*b].total_cmp(&p[*a]));
        assert_eq!(top.tokens, order[..3].iter().map(|i| *i as i32).collect::<Vec<_>>());
        assert!(!top.tokens.contains(&mask));
        for (t, q) in top.tokens.iter().zip(&top.probs) {
            assert!((p[*t as usize] - q).abs() <= 1e-5, "{} vs {q}", p[*t as usize]);
        }
        let entropy: f32 = -p.iter().filter(|x| **x > 0.0).map(|x| x * x.ln()).sum::<f32>();
        assert!((entropy - top.entropy).abs() <= 1e-3, "{entropy} vs {}", top.entropy);
    }
    // Without entropies the head skips them and returns the same tokens and probabilities.
    let head = Head::TopK { k: 3, entropy: false };
    let Predictions::TopK(plain) = model.eval(&mut seg, head).unwrap().remove(0) else {
        panic!("top-k head")
    };
    for (a, b) in plain.iter().zip(&tops) {
        assert_eq!((&a.tokens, &a.probs), (&b.tokens, &b.probs));
        assert!(a.entropy.is_nan(), "{}", a.entropy);
    }
}

#[test]
fn bad_segments_are_typed_errors_and_leave_the_cache_alone() {
    let mut model = DiffusionModel::load(&common::fixture_model(), config()).unwrap();
    let mut cache = model.new_cache(16).unwrap();
    let err = model.prefill(&mut cache, &[1; 20]).unwrap_err();
    assert!(err.to_string().contains("exceed"), "{err}");
    let err = model.prefill(&mut cache, &[1, 99_999]).unwrap_err();
    assert!(err.to_string().contains("vocabulary"), "{err}");
    assert_eq!(cache.len(), 0);
    let err = DiffusionModel::load(Path::new("/nonexistent.gguf"), config())
        .err()
        .unwrap();
    assert!(err.to_string().contains("no such file"), "{err}");
}
