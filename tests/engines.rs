//! Both diffusion engines on a real GGUF (the fixture): schedules, seeds, context limits,
//! cancellation, the wait queue and refusals run against the reference engine (llama.cpp) and the
//! cached engine (our ggml graph) alike; then what only the cached engine does (batching, history
//! reuse); then the autoregressive engine on the bundled twin.

mod common;

use std::time::Duration;

use dllm_chat::config::Config;
use dllm_chat::engine::{
    CacheMode, Capacity, ChatTurn, Completion, DecodeOptions, Engine, EngineError, EngineEvent, EngineKind,
    GenerateRequest, HistoryWindow, Lookahead, Revision, Schedule, Selection, StopReason,
};

fn request(content: &str, options: DecodeOptions) -> GenerateRequest {
    GenerateRequest {
        system: "You are a test.".into(),
        turns: vec![ChatTurn {
            role: "user".into(),
            content: content.into(),
        }],
        options,
    }
}

fn options(max_tokens: usize, steps: usize, schedule: Schedule) -> DecodeOptions {
    DecodeOptions {
        max_tokens,
        steps,
        block_length: 8,
        schedule,
        selection: Selection::Confidence,
        defer_repeats: false,
        temperature: 0.0,
        seed: 3,
        fill_canvas: false,
    }
}

/// The test config once per engine: the reference engine and the cached engine in both cache modes.
fn both_engines() -> [Config; 3] {
    let mut reference = common::test_config();
    reference.model.engine = EngineKind::Reference;
    let mut prefix = common::test_config();
    prefix.model.engine = EngineKind::Cached;
    prefix.model.cache = CacheMode::Prefix;
    let mut dual = prefix.clone();
    dual.model.cache = CacheMode::Dual;
    [reference, prefix, dual]
}

fn cached_config() -> Config {
    let mut config = common::test_config();
    config.model.engine = EngineKind::Cached;
    config
}

fn text(event: EngineEvent) -> String {
    match event {
        EngineEvent::Finished(c) => c.text,
        other => panic!("{other:?}"),
    }
}

fn turn(role: &str, content: &str) -> ChatTurn {
    ChatTurn {
        role: role.into(),
        content: content.into(),
    }
}

/// Runs one reply to the end and returns (revisions, final event).
async fn run(engine: &dyn Engine, req: GenerateRequest) -> (Vec<dllm_chat::engine::Revision>, EngineEvent) {
    let mut stream = engine.submit(req).unwrap();
    let mut revisions = vec![];
    loop {
        let event = tokio::time::timeout(common::WAIT, stream.events.recv())
            .await
            .unwrap()
            .expect("event");
        match event {
            EngineEvent::Revision(r) => revisions.push(r),
            EngineEvent::Started { .. } => {}
            other => return (revisions, other),
        }
    }
}

#[tokio::test]
async fn fixed_schedule_takes_exactly_its_steps_unless_an_end_token_comes_first() {
    for config in both_engines() {
        let engine = common::start_engine(&config).await;
        assert_eq!(engine.info().architecture, "llada");
        let (revs, done) = run(engine.as_ref(), request("hello", options(16, 16, Schedule::Fixed))).await;
        let EngineEvent::Finished(c) = done else {
            panic!("{done:?}")
        };
        assert_eq!(c.reason, StopReason::Completed);
        assert_eq!(c.steps, revs.len());
        assert!(revs.iter().all(|r| r.unmasked == 1), "one token per step");
        // 16 steps at most: fewer only if an end token cut the reply short.
        assert!(revs.len() <= 16);
        assert_eq!(revs.len() == 16, c.completion_tokens == 16);
        let (revs, _) = run(engine.as_ref(), request("hello", options(16, 4, Schedule::Fixed))).await;
        assert!(revs.len() <= 4, "4 steps unmask 4 positions each: {}", revs.len());
    }
}

/// Each step reports its arithmetic: llama.cpp's full recompute of prompt and canvas costs more
/// per step than the prefix cache (the block and what follows it), and that more than the dual
/// cache (the block alone).
#[tokio::test]
async fn steps_report_their_arithmetic_and_caching_cuts_it() {
    let mut per_step = Vec::new();
    for config in both_engines() {
        let engine = common::start_engine(&config).await;
        let (_, done) = run(engine.as_ref(), request("hello", options(16, 16, Schedule::Fixed))).await;
        let EngineEvent::Finished(c) = done else {
            panic!("{done:?}")
        };
        assert!(c.steps > 2, "{c:?}");
        per_step.push(c.phases.step_flops / c.steps as f64);
    }
    let [reference, prefix, dual] = per_step[..] else {
        unreachable!("three engines")
    };
    assert!(dual > 0.0 && prefix > dual && reference > prefix, "{per_step:?}");
}

/// The cached engine's head computes entropies only when a reply selects by them; one that does
/// gets them (the canvas checks in debug builds), and the order differs from confidence's.
#[tokio::test]
async fn selection_by_entropy_gets_the_heads_entropies() {
    let engine = common::start_engine(&cached_config()).await;
    let mut replies = Vec::new();
    for selection in [Selection::Confidence, Selection::Entropy] {
        let options = DecodeOptions {
            selection,
            ..options(16, 16, Schedule::Fixed)
        };
        let (revisions, done) = run(engine.as_ref(), request("hello", options)).await;
        assert!(matches!(done, EngineEvent::Finished(_)), "{done:?}");
        replies.push(revisions.into_iter().map(|r| r.text).collect::<Vec<_>>());
    }
    assert_ne!(replies[0], replies[1], "the two selections unmask in different orders");
}

#[tokio::test]
async fn same_seed_same_reply_and_temperature_changes_it() {
    for config in both_engines() {
        let engine = common::start_engine(&config).await;
        let mut o = options(24, 24, Schedule::Threshold { tau: 0.9 });
        o.temperature = 1.0;
        let a = text(run(engine.as_ref(), request("hi", o.clone())).await.1);
        let b = text(run(engine.as_ref(), request("hi", o.clone())).await.1);
        assert_eq!(a, b, "same seed, same reply");
        let mut texts = std::collections::HashSet::new();
        for seed in 0..5 {
            o.seed = seed;
            texts.insert(text(run(engine.as_ref(), request("hi", o.clone())).await.1));
        }
        assert!(texts.len() > 1, "different seeds sample different replies");
    }
}

#[tokio::test]
async fn prompt_that_cannot_fit_is_context_overflow() {
    for mut config in both_engines() {
        config.model.context_length = 64;
        // One place in the wait queue: the refused prompt must give it back.
        config.limits.max_waiting_replies = 1;
        let engine = common::start_engine(&config).await;
        assert_eq!(engine.info().context_length, 64);
        let (_, done) = run(
            engine.as_ref(),
            request(&"word ".repeat(100), options(16, 16, Schedule::Fixed)),
        )
        .await;
        match done {
            EngineEvent::Failed(EngineError::ContextOverflow { needed, limit }) => {
                assert_eq!(limit, 48);
                assert!(needed > 48);
            }
            other => panic!("{other:?}"),
        }
        let (_, done) = run(engine.as_ref(), request("hi", options(8, 8, Schedule::Fixed))).await;
        assert!(matches!(done, EngineEvent::Finished(_)), "{done:?}");
    }
}

#[tokio::test]
async fn cancel_and_dropped_receiver_stop_the_reply() {
    for config in both_engines() {
        let engine = common::start_engine(&config).await;
        let mut stream = engine
            .submit(request("hi", options(256, 256, Schedule::Fixed)))
            .unwrap();
        loop {
            if let EngineEvent::Revision(_) = stream.events.recv().await.unwrap() {
                break;
            }
        }
        stream.cancel.cancel();
        let finished = loop {
            match tokio::time::timeout(common::WAIT, stream.events.recv())
                .await
                .unwrap()
                .unwrap()
            {
                EngineEvent::Finished(c) => break c,
                EngineEvent::Revision(_) => continue,
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(finished.reason, StopReason::Cancelled);
        assert!(finished.steps < 256);

        // A dropped receiver frees the engine for the next reply.
        drop(
            engine
                .submit(request("hi", options(256, 256, Schedule::Fixed)))
                .unwrap(),
        );
        let (_, done) = run(engine.as_ref(), request("hi", options(8, 8, Schedule::Fixed))).await;
        assert!(matches!(done, EngineEvent::Finished(_)), "{done:?}");
    }
}

#[tokio::test]
async fn full_wait_queue_fails_fast_with_overloaded() {
    for mut config in both_engines() {
        config.limits.max_running_replies = 1;
        config.limits.max_waiting_replies = 2;
        let engine = common::start_engine(&config).await;
        let mut accepted = vec![];
        let mut overloaded = 0;
        for _ in 0..10 {
            match engine.submit(request("hi", options(256, 256, Schedule::Fixed))) {
                Ok(s) => accepted.push(s),
                Err(EngineError::Overloaded(Capacity::Queue { .. })) => overloaded += 1,
                Err(e) => panic!("{e}"),
            }
        }
        assert!(overloaded >= 7 - 1, "overloaded {overloaded}");
        assert!(accepted.len() <= 4, "accepted {}", accepted.len());
        for s in &accepted {
            s.cancel.cancel();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_non_diffusion_gguf_is_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("llama.gguf");
    let mut spec = ggml_ext::FixtureSpec::default();
    spec.hyperparams.architecture = ggml_ext::Architecture::Llama;
    ggml_ext::write_llada_fixture(&path, &spec).unwrap();
    let settings = cached_config().engine_settings();
    let err = tokio::task::spawn_blocking(move || dllm_chat::engine::start(&settings, path).err())
        .await
        .unwrap()
        .expect("refused");
    assert!(matches!(err, EngineError::NotDiffusion(ref a) if a == "llama"), "{err}");

    // And a diffusion model on the autoregressive engine.
    let mut config = common::test_config();
    config.model.engine = EngineKind::Autoregressive;
    let settings = config.engine_settings();
    let fixture = common::fixture_model();
    let err = tokio::task::spawn_blocking(move || dllm_chat::engine::start(&settings, fixture).err())
        .await
        .unwrap()
        .expect("refused");
    assert!(matches!(err, EngineError::Diffusion(ref a) if a == "llada"), "{err}");
}

/// Runs one request to its end: (revisions, the completion, cached and prompt tokens).
async fn run_to_end(
    engine: &dyn Engine,
    turns: Vec<ChatTurn>,
    options: DecodeOptions,
) -> (Vec<Revision>, Completion, usize, usize) {
    let mut stream = engine
        .submit(GenerateRequest {
            system: "You are a support assistant.".into(),
            turns,
            options,
        })
        .unwrap();
    let (mut revisions, mut cached, mut prompt) = (Vec::new(), 0, 0);
    loop {
        match stream.events.recv().await.expect("an event") {
            EngineEvent::Started {
                cached_tokens,
                prompt_tokens,
                ..
            } => (cached, prompt) = (cached_tokens, prompt_tokens),
            EngineEvent::Revision(r) => revisions.push(r),
            EngineEvent::Finished(c) => return (revisions, c, cached, prompt),
            EngineEvent::Failed(e) => panic!("{e}"),
        }
    }
}

/// The bundled twin through the autoregressive engine, as `engine = "auto"` picks it: revisions
/// are the growing reply (no placeholders, every `tokens_per_revision` tokens, each a prefix of
/// the next), the answer is the twin's, and the next turn of the conversation reuses the K/V of
/// the first instead of computing its prompt again.
#[tokio::test]
async fn the_autoregressive_engine_serves_the_twin_and_reuses_the_history() {
    let mut config = common::test_config();
    config.model.path = dllm_chat::models::resolve(dllm_chat::models::BUILTIN_NORTHWIND_TWIN)
        .unwrap()
        .display()
        .to_string();
    config.model.tokens_per_revision = 3;
    let engine = common::start_engine(&config).await;
    assert_eq!(engine.info().engine, "autoregressive");
    assert_eq!(engine.info().architecture, "llama");
    let greedy = options(64, 64, Schedule::Threshold { tau: 0.9 });

    let first = vec![turn("user", "Do gift cards expire?")];
    let (revisions, done, cached, _) = run_to_end(engine.as_ref(), first.clone(), greedy.clone()).await;
    assert_eq!(cached, 0, "nothing cached yet");
    assert_eq!(done.reason, StopReason::Completed);
    assert!(done.text.contains("never expire"), "{:?}", done.text);
    eprintln!(
        "{} revisions: {:?}",
        revisions.len(),
        revisions.iter().map(|r| (r.step, r.text.as_str())).collect::<Vec<_>>()
    );
    assert!(revisions.len() >= 2, "{revisions:?}");
    for pair in revisions.windows(2) {
        assert!(pair[1].text.starts_with(&pair[0].text), "{pair:?}");
    }
    for r in &revisions[..revisions.len() - 1] {
        assert_eq!(r.step % 3, 0, "a revision every 3 tokens: {r:?}");
    }
    let last = revisions.last().unwrap();
    assert_eq!(last.text, done.text, "the last revision is the reply");
    assert_eq!(last.masked, 0);
    assert!(
        !revisions.iter().any(|r| r.text.contains('\u{2591}')),
        "no placeholders"
    );
    assert_eq!(
        done.steps,
        done.completion_tokens + 1,
        "one token per step, the end token last"
    );

    let mut second = first;
    second.push(turn("assistant", &done.text));
    second.push(turn("user", "Can I talk to a human?"));
    let (_, done, cached, prompt) = run_to_end(engine.as_ref(), second, greedy).await;
    eprintln!(
        "second turn: {cached} of {prompt} prompt tokens reused; {:?}",
        done.text
    );
    assert!(
        cached * 2 > prompt,
        "{cached} of {prompt} prompt tokens reused from the first turn"
    );
    assert!(done.text.contains("human agent"), "{:?}", done.text);
}

#[tokio::test]
async fn quantized_models_load_and_reply() {
    let dir = tempfile::tempdir().unwrap();
    for mut config in both_engines() {
        for (weight_type, name) in [
            (ggml_ext::WeightType::Q8_0, "q8_0.gguf"),
            (ggml_ext::WeightType::Q4_0, "q4_0.gguf"),
        ] {
            let out = dir.path().join(name);
            ggml_ext::quantize(&common::fixture_model(), &out, weight_type, 1).unwrap();
            let f32_size = std::fs::metadata(common::fixture_model()).unwrap().len();
            assert!(
                std::fs::metadata(&out).unwrap().len() < f32_size / 2,
                "{name} is smaller than F32"
            );
            config.model.path = out.display().to_string();
            let engine = common::start_engine(&config).await;
            let (revs, done) = run(engine.as_ref(), request("hi", options(8, 8, Schedule::Fixed))).await;
            assert!(!revs.is_empty());
            assert!(matches!(done, EngineEvent::Finished(_)), "{name}: {done:?}");
        }
        let err = ggml_ext::quantize(
            &dir.path().join("missing.gguf"),
            &dir.path().join("x.gguf"),
            ggml_ext::WeightType::F16,
            1,
        );
        assert!(matches!(err, Err(ggml_ext::QuantizeError::Failed { .. })));
    }
}

/// The retargeted `llama` file run non-causally over the whole sequence computes exactly what
/// llama.cpp's `llada` graph computes, so the twin is an exact oracle for cached attention
/// (`tests/runtime.rs`).
#[tokio::test]
async fn llada_retargeted_as_llama_gives_identical_logits() {
    use llama_cpp_2::context::params::{LlamaAttentionType, LlamaContextParams};
    use llama_cpp_2::llama_batch::LlamaBatch;
    use llama_cpp_2::model::params::LlamaModelParams;
    use llama_cpp_2::model::LlamaModel;
    use llama_cpp_2::token::LlamaToken;
    let dir = tempfile::tempdir().unwrap();
    let twin = dir.path().join("twin.gguf");
    ggml_ext::retarget(&common::fixture_model(), &twin, "llada", "llama").unwrap();
    let err = ggml_ext::retarget(&twin, &dir.path().join("x.gguf"), "llada", "llama").unwrap_err();
    assert!(matches!(err, ggml_ext::RetargetError::Architecture { .. }), "{err}");

    let logits = |path: std::path::PathBuf, attention: Option<LlamaAttentionType>| {
        let backend = dllm_chat::engine::vocab::backend().unwrap();
        let model = LlamaModel::load_from_file(backend, &path, &LlamaModelParams::default()).unwrap();
        let mut params = LlamaContextParams::default()
            .with_n_ctx(std::num::NonZeroU32::new(64))
            .with_n_batch(64)
            .with_n_ubatch(64)
            .with_n_threads(1);
        if let Some(a) = attention {
            params = params.with_attention_type(a);
        }
        let mut ctx = model.new_context(backend, params).unwrap();
        let tokens = [10, 200, 33, 7, 265, 265, 265, 90];
        let mut batch = LlamaBatch::new(64, 1);
        for (i, t) in tokens.iter().enumerate() {
            batch.add(LlamaToken(*t), i as i32, &[0], true).unwrap();
        }
        ctx.decode(&mut batch).unwrap();
        (0..tokens.len() as i32)
            .flat_map(|i| ctx.get_logits_ith(i).to_vec())
            .collect::<Vec<f32>>()
    };
    let (llada, llama_non_causal, llama_causal) = tokio::task::spawn_blocking(move || {
        (
            logits(common::fixture_model(), None),
            logits(twin.clone(), Some(LlamaAttentionType::NonCausal)),
            logits(twin, None),
        )
    })
    .await
    .unwrap();
    let max_diff = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
    assert!(
        max_diff(&llada, &llama_non_causal) <= 1e-4,
        "{}",
        max_diff(&llada, &llama_non_causal)
    );
    assert!(max_diff(&llada, &llama_causal) > 1e-2, "causal attention must differ");
}

#[tokio::test]
async fn dream_models_reply_in_every_engine() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dream.gguf");
    let mut spec = ggml_ext::FixtureSpec::default();
    spec.hyperparams.architecture = ggml_ext::Architecture::Dream;
    ggml_ext::write_llada_fixture(&path, &spec).unwrap();
    for mut config in both_engines() {
        config.model.path = path.display().to_string();
        let engine = common::start_engine(&config).await;
        assert_eq!(engine.info().architecture, "dream");
        let (revs, done) = run(engine.as_ref(), request("hi", options(16, 16, Schedule::Fixed))).await;
        let EngineEvent::Finished(c) = done else {
            panic!("{done:?}")
        };
        assert_eq!(c.steps, revs.len());
        assert!(c.steps <= 16 && c.steps > 0);
    }
}

#[tokio::test]
async fn cached_replies_batched_with_others_equal_replies_alone() {
    let mut config = cached_config();
    config.limits.max_running_replies = 3;
    let engine = common::start_engine(&config).await;
    assert_eq!(engine.info().engine, "cached");
    let o = options(16, 16, Schedule::Fixed);
    let alone = text(run(engine.as_ref(), request("first conversation", o.clone())).await.1);
    // The same reply while two other conversations share its graph evaluations.
    let (a, b, c) = tokio::join!(
        run(engine.as_ref(), request("first conversation", o.clone())),
        run(
            engine.as_ref(),
            request("a second, different and longer conversation", o.clone())
        ),
        run(engine.as_ref(), request("third", o.clone())),
    );
    assert_eq!(text(a.1), alone);
    assert_ne!(text(b.1), alone, "other prompts give other replies");
    assert!(matches!(c.1, EngineEvent::Finished(_)));
}

/// The lookahead bounds what a block's first step computes and what the block attends to (on the
/// bundled model, whose replies vary from cell to cell): one past the canvas replies exactly as the
/// whole canvas does, in both cache modes; none at all computes less per step, and its first block
/// says what a canvas of that block alone says.
#[tokio::test]
async fn the_lookahead_bounds_the_canvas_a_block_computes() {
    let question = || request("how do returns work?", options(32, 32, Schedule::Fixed));
    let bundled = dllm_chat::models::resolve(dllm_chat::models::BUILTIN_NORTHWIND)
        .unwrap()
        .display()
        .to_string();
    for cache in [CacheMode::Prefix, CacheMode::Dual] {
        let engine_with = |lookahead| {
            let mut config = cached_config();
            config.model.path = bundled.clone();
            config.model.cache = cache;
            config.model.lookahead = lookahead;
            // One cache, so each reply writes over the cells of the one before it: a step that
            // attended to cells its block did not compute would read another conversation's.
            config.limits.max_running_replies = 1;
            config.limits.kept_conversation_caches = 1;
            async move {
                let engine = common::start_engine(&config).await;
                let other = request(
                    "where is my order NW-55555? it has not arrived",
                    options(32, 32, Schedule::Fixed),
                );
                text(run(engine.as_ref(), other).await.1);
                engine
            }
        };
        let mut by_lookahead = Vec::new();
        for lookahead in [Lookahead::All, Lookahead::Cells(64), Lookahead::Cells(0)] {
            let engine = engine_with(lookahead).await;
            let EngineEvent::Finished(c) = run(engine.as_ref(), question()).await.1 else {
                panic!("the reply did not finish")
            };
            by_lookahead.push((c.text, c.steps, c.phases.step_flops));
        }
        let [all, past_the_canvas, none] = &by_lookahead[..] else {
            unreachable!("three lookaheads")
        };
        assert_eq!(all, past_the_canvas, "{cache:?}");
        assert!(
            none.2 / (none.1 as f64) < all.2 / (all.1 as f64),
            "{cache:?}: {by_lookahead:?}"
        );
        let engine = engine_with(Lookahead::All).await;
        let mut first_block_alone = question();
        first_block_alone.options = options(8, 8, Schedule::Fixed);
        let first_block = text(run(engine.as_ref(), first_block_alone).await.1);
        assert!(
            first_block.split_whitespace().count() > 1 && none.0.starts_with(&first_block),
            "{cache:?}: {first_block:?} then {:?}",
            none.0
        );
    }
}

/// Runs one reply to the end: its (prompt tokens, cached prompt tokens) and its text.
async fn started(engine: &dyn Engine, req: GenerateRequest) -> ((usize, usize), String) {
    let mut stream = engine.submit(req).unwrap();
    let mut first = None;
    loop {
        match stream.events.recv().await.expect("event") {
            EngineEvent::Started {
                prompt_tokens,
                cached_tokens,
                ..
            } => first = Some((prompt_tokens, cached_tokens)),
            EngineEvent::Finished(c) => return (first.expect("started"), c.text),
            EngineEvent::Revision(_) => {}
            other => panic!("{other:?}"),
        }
    }
}

/// The next turn extends the conversation's cache (reported as cached prompt tokens) and replies
/// exactly as an engine that prefills the whole history.
#[tokio::test]
async fn next_turn_reuses_the_cached_history_exactly() {
    let reuse = common::start_engine(&cached_config()).await;
    let mut fresh_config = cached_config();
    fresh_config.model.reuse_history = false;
    let fresh = common::start_engine(&fresh_config).await;
    let o = options(16, 16, Schedule::Fixed);
    let first = vec![turn("user", "Where is my order NW-12345?")];
    let second = vec![
        first[0].clone(),
        turn("assistant", "It shipped yesterday."),
        turn("user", "Can I still cancel it?"),
    ];
    let with_turns = |turns: &Vec<ChatTurn>| GenerateRequest {
        system: "You are a test.".into(),
        turns: turns.clone(),
        options: o.clone(),
    };
    let ((p1, c1), _) = started(&*reuse, with_turns(&first)).await;
    assert_eq!(c1, 0, "nothing cached yet");
    let ((p2, c2), reused_text) = started(&*reuse, with_turns(&second)).await;
    assert_eq!(c2, p1, "the first turn's whole prompt came from the cache");
    assert!(p2 > p1);
    let ((_, c3), fresh_text) = started(&*fresh, with_turns(&second)).await;
    assert_eq!(c3, 0);
    assert_eq!(reused_text, fresh_text);
    // Asking the same again reuses the whole prompt.
    let ((_, c4), again) = started(&*reuse, with_turns(&second)).await;
    assert_eq!(c4, p2);
    assert_eq!(again, fresh_text);
}

/// A new conversation copies the system prompt's chunk from another conversation's cache and
/// replies exactly as it does with nothing cached; without the shared chunk nothing is copied.
#[tokio::test]
async fn a_new_conversation_copies_the_shared_system_prompt_exactly() {
    let shared = common::start_engine(&cached_config()).await;
    let cold = common::start_engine(&cached_config()).await;
    let mut unshared_config = cached_config();
    unshared_config.model.share_system_prompt = false;
    let unshared = common::start_engine(&unshared_config).await;
    let request = |question: &str| GenerateRequest {
        system: "You are a test assistant for the shop.".into(),
        turns: vec![turn("user", question)],
        options: options(16, 16, Schedule::Fixed),
    };
    let ask = request("Where is my order NW-12345?");
    let other = request("Do you ship to Canada?");
    // Another conversation leaves its cache behind.
    let ((first_prompt, _), _) = started(&*shared, request("Tell me everything about returns.")).await;
    let ((p, copied), text) = started(&*shared, ask.clone()).await;
    assert!(copied > 0 && copied < p, "the system prompt is copied: {copied} of {p}");
    assert!(
        copied < first_prompt,
        "only the shared start: {copied} of {first_prompt}"
    );
    let ((_, none), cold_text) = started(&*cold, ask.clone()).await;
    assert_eq!(none, 0, "nothing cached yet");
    assert_eq!(text, cold_text);
    // The same start from an idle cache, for a second conversation on the cold engine.
    let ((_, again), other_text) = started(&*cold, other.clone()).await;
    assert_eq!(again, copied);
    let (_, fresh_other) = started(&*common::start_engine(&cached_config()).await, other.clone()).await;
    assert_eq!(other_text, fresh_other);
    let _ = started(&*unshared, ask).await;
    let ((_, nothing), _) = started(&*unshared, other).await;
    assert_eq!(nothing, 0, "without its own chunk the system prompt is not shared");
}

/// The fixture with `key = value` set, written into `dir`.
fn stamped_fixture(dir: &tempfile::TempDir, key: &str, value: ggml_ext::KeyValue) -> std::path::PathBuf {
    let path = dir.path().join("stamped-fixture.gguf");
    ggml_ext::set_key(&common::fixture_model(), &path, key, value).unwrap();
    path
}

/// A model file that records the longest prompt it was trained on gets long histories fitted into
/// it by default (whole exchanges dropped, the new message kept), in every engine; `"off"` keeps
/// what the context holds, and a window past the context changes nothing.
#[tokio::test]
async fn histories_are_fitted_into_the_trained_prompt_length_the_file_records() {
    let dir = tempfile::tempdir().unwrap();
    let stamped = stamped_fixture(&dir, ggml_ext::TRAINED_PROMPT_KEY, ggml_ext::KeyValue::U32(150));
    let turns: Vec<ChatTurn> = (0..21)
        .map(|i| turn(["user", "assistant"][i % 2], &format!("turn number {i} says something")))
        .collect();
    for mut config in both_engines() {
        config.model.path = stamped.display().to_string();
        config.model.context_length = 512;
        let engine = common::start_engine(&config).await;
        assert_eq!(engine.info().history_window, Some(150), "{}", engine.info().engine);
        let (_, _, _, trained) = run_to_end(engine.as_ref(), turns.clone(), options(8, 8, Schedule::Fixed)).await;
        // The fixture's tokenizer spends about 35 tokens on a turn: some history is kept.
        assert!(
            (60..=150).contains(&trained),
            "{}: a {trained}-token prompt",
            engine.info().engine
        );
        drop(engine);

        for (window, name) in [(HistoryWindow::Off, "off"), (HistoryWindow::Tokens(5000), "5000")] {
            config.model.history_window = window;
            let engine = common::start_engine(&config).await;
            assert_eq!(engine.info().history_window, None, "{name}");
            let (_, _, _, prompt) = run_to_end(engine.as_ref(), turns.clone(), options(8, 8, Schedule::Fixed)).await;
            assert!(prompt > 300, "{name}: {prompt}-token prompt: the history was cut");
        }
        config.model.history_window = HistoryWindow::Tokens(250);
        let engine = common::start_engine(&config).await;
        assert_eq!(engine.info().history_window, Some(250));
        let (_, _, _, prompt) = run_to_end(engine.as_ref(), turns.clone(), options(8, 8, Schedule::Fixed)).await;
        assert!(prompt > trained && prompt <= 250, "{prompt}");
        // A new message longer than the window alone is fitted into the context instead.
        config.model.history_window = HistoryWindow::Tokens(20);
        let engine = common::start_engine(&config).await;
        let (_, done, _, prompt) = run_to_end(engine.as_ref(), turns.clone(), options(8, 8, Schedule::Fixed)).await;
        assert!(prompt > 300, "{prompt}");
        assert!(!done.text.is_empty());
    }
}

/// `diffusion.shift_logits` decides which logits row predicts a position, in every engine: the
/// fixture (LLaDA, `false`) stamped `true` replies differently from the same weights unstamped.
#[tokio::test]
async fn engines_honour_the_shift_logits_key() {
    let dir = tempfile::tempdir().unwrap();
    let shifted = stamped_fixture(&dir, ggml_ext::SHIFT_LOGITS_KEY, ggml_ext::KeyValue::Bool(true));
    for config in both_engines() {
        let mut texts = Vec::new();
        for path in [common::fixture_model(), shifted.clone()] {
            let mut config = config.clone();
            config.model.path = path.display().to_string();
            let engine = common::start_engine(&config).await;
            let (_, done) = run(engine.as_ref(), request("hi there", options(16, 16, Schedule::Fixed))).await;
            texts.push(text(done));
        }
        assert_ne!(texts[0], texts[1], "{:?}: the key changed nothing", config.model.engine);
    }
}
