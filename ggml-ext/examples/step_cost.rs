//! What one evaluation of a model costs by its size: prefills of 32 and 126 tokens, a burst of
//! short prompts prefilled one after another or in one evaluation, steps of 8-64 masked tokens
//! over a 126-token prompt, each with the top-k head with and without entropies, and a dual-cache
//! block step over its whole block or only the cells it needs; variants are measured in
//! alternating rounds so the machine's noise hits them alike.
//!
//! `cargo run --example step_cost -- MODEL.gguf [THREADS]`; prints the median and the 10th
//! percentile of each in milliseconds.

use std::path::Path;
use std::time::Instant;

use ggml_ext::runtime::{Device, DiffusionModel, Head, KvCache, RuntimeConfig, Segment};

/// Rounds per case; each runs every variant `PER_ROUND` times after one unmeasured run.
const ROUNDS: usize = 20;
const PER_ROUND: usize = 15;
const PROMPT: usize = 126;
/// A burst: this many single questions (a system prompt and one message) arriving together.
const BURST: usize = 8;
const QUESTION: usize = 45;

type Run<'a> = Box<dyn FnMut(&mut DiffusionModel, &mut KvCache) + 'a>;

fn main() {
    let mut args = std::env::args().skip(1);
    let path = args.next().expect("usage: step_cost MODEL.gguf [THREADS]");
    let threads = args.next().map_or(2, |t| t.parse().expect("THREADS is a number"));
    let config = RuntimeConfig {
        device: Device::Cpu,
        threads,
        max_segments: BURST,
    };
    let mut model = DiffusionModel::load(Path::new(&path), config).expect("a llada or dream GGUF");
    let mask = model.shape().mask_token.expect("the model has a mask token");
    let n_vocab = model.shape().n_vocab as i32;
    let mut cache = model.new_cache(PROMPT + 64).expect("a cache");
    let prompt: Vec<i32> = (0..PROMPT as i32).map(|i| (i * 7 + 3) % (n_vocab - 1)).collect();
    println!("{path}, {threads} threads; ms per evaluation, median (10th percentile)");

    for len in [32usize, PROMPT] {
        let tokens = &prompt[..len];
        let ends = [len / 2];
        let run: Run = Box::new(move |m, c| {
            c.truncate(0);
            m.prefill_chunks(c, tokens, &ends).expect("prefill");
        });
        report(
            &format!("prefill of {len} tokens in 2 chunks"),
            &mut model,
            &mut cache,
            vec![("", run)],
        );
    }
    let burst: Vec<(&str, Run)> = [("one evaluation each", false), ("all in one evaluation", true)]
        .into_iter()
        .map(|(name, together)| {
            let mut caches: Vec<KvCache> = (0..BURST)
                .map(|_| model.new_cache(QUESTION).expect("a cache"))
                .collect();
            let prompts: Vec<Vec<i32>> = (0..BURST).map(|b| prompt[b..b + QUESTION].to_vec()).collect();
            let run: Run = Box::new(move |m, _| {
                caches.iter_mut().for_each(|c| c.truncate(0));
                if together {
                    let mut segments: Vec<Segment> = caches
                        .iter_mut()
                        .zip(&prompts)
                        .map(|(c, p)| Segment::prefill(c, p, &[]))
                        .collect();
                    m.eval(&mut segments, Head::Logits).expect("prefill");
                } else {
                    for (c, p) in caches.iter_mut().zip(&prompts) {
                        m.prefill(c, p).expect("prefill");
                    }
                }
            });
            (name, run)
        })
        .collect();
    report(
        &format!("prefills of {BURST} prompts of {QUESTION} tokens"),
        &mut model,
        &mut cache,
        burst,
    );
    cache.truncate(0);
    model.prefill(&mut cache, &prompt).expect("prefill");
    for n in [8usize, 16, 32, 64] {
        let tokens = vec![mask; n];
        let outputs: Vec<usize> = (0..n.min(32)).collect();
        let variants: Vec<(&str, Run)> = [("with entropies", true), ("without", false)]
            .into_iter()
            .map(|(name, entropy)| {
                let (tokens, outputs) = (tokens.clone(), outputs.clone());
                let run: Run = Box::new(move |m, c| {
                    let mut segments = [Segment {
                        cache: c,
                        tokens: &tokens,
                        offset: 0,
                        cells: &[],
                        span: 64,
                        outputs: &outputs,
                        temperature: 1.0,
                        commit: false,
                        chunk_ends: &[],
                    }];
                    m.eval(&mut segments, Head::TopK { k: 4, entropy }).expect("step");
                });
                (name, run)
            })
            .collect();
        let label = format!("step of {n} tokens, {} outputs", outputs.len());
        report(&label, &mut model, &mut cache, variants);
    }
    // A dual-cache block step over a 32-cell block, whole or only 22 of its cells (every third
    // settled), 12 outputs either way.
    let picked: Vec<usize> = (0..32).filter(|c| c % 3 != 2).collect();
    let block: Vec<(&str, Run)> = [("whole block", false), ("22 picked cells", true)]
        .into_iter()
        .map(|(name, gathered)| {
            let picked = picked.clone();
            let tokens = vec![mask; if gathered { picked.len() } else { 32 }];
            let outputs: Vec<usize> = if gathered {
                (0..12).collect()
            } else {
                picked[..12].to_vec()
            };
            let run: Run = Box::new(move |m, c| {
                let mut segments = [Segment {
                    cache: c,
                    tokens: &tokens,
                    offset: 0,
                    cells: if gathered { &picked } else { &[] },
                    span: 64,
                    outputs: &outputs,
                    temperature: 1.0,
                    commit: false,
                    chunk_ends: &[],
                }];
                m.eval(&mut segments, Head::TopK { k: 4, entropy: false })
                    .expect("step");
            });
            (name, run)
        })
        .collect();
    report("a block step, 12 outputs", &mut model, &mut cache, block);
}

fn report(label: &str, model: &mut DiffusionModel, cache: &mut KvCache, mut variants: Vec<(&str, Run)>) {
    let mut times = vec![Vec::new(); variants.len()];
    for _ in 0..ROUNDS {
        for ((_, run), times) in variants.iter_mut().zip(&mut times) {
            run(model, cache);
            for _ in 0..PER_ROUND {
                let started = Instant::now();
                run(model, cache);
                times.push(started.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    let figures: Vec<String> = variants
        .iter()
        .zip(&mut times)
        .map(|((name, _), t)| {
            t.sort_by(f64::total_cmp);
            format!(
                "{name}{}{:.3} ({:.3})",
                if name.is_empty() { "" } else { " " },
                t[t.len() / 2],
                t[t.len() / 10]
            )
        })
        .collect();
    println!("- {label}: {}", figures.join(", "));
}
