//! The `dllm-tools` binary: `generate` runs one reply from the command line and prints every
//! revision, `eval` scores held-out dialogs, `bench` measures latency and throughput. The service
//! itself is the `dllm-chat` binary (`serve`); `load` starts it and puts it under load.

use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::{Parser, Subcommand};
use dllm_chat::chat::{MessageOptions, Validator};
use dllm_chat::config::{CommonArgs, Config, ModelConfig};
use dllm_chat::engine::{self, ChatTurn, EngineEvent, EngineKind, GenerateRequest};

#[derive(Parser)]
#[command(
    version,
    about = "Tools around the dllm-chat service: one reply, held-out evaluation, benchmark"
)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate one reply and print each revision and a timing line.
    Generate {
        #[arg(long)]
        prompt: String,
        #[command(flatten)]
        decode: DecodeArgs,
    },
    /// Score held-out dialogs through the real inference path and print a table.
    Eval(EvalArgs),
    /// Measure reply latency and throughput side by side and print markdown tables.
    Bench(BenchArgs),
    /// Hold many WebSocket connections on one replica (a `dllm-chat serve` child on loopback) and
    /// print handshake times, memory per connection and chat latency under that load.
    Load(LoadArgs),
}

/// Options of `load`.
#[derive(clap::Args)]
struct LoadArgs {
    /// The `dllm-chat` binary; by default the one beside this binary.
    #[arg(long)]
    server: Option<PathBuf>,
    /// Connection counts to reach, one step after another.
    #[arg(long, value_delimiter = ',', default_value = "1000,2000,5000")]
    connections: Vec<usize>,
    /// Of the connections held, how many then chat at once.
    #[arg(long, default_value_t = 100)]
    chatting: usize,
    /// Messages each chatting client sends.
    #[arg(long, default_value_t = 3)]
    messages: usize,
    /// The longest one step (or the chatting phase) may take, in seconds.
    #[arg(long, default_value_t = 120)]
    step_deadline_secs: u64,
}

/// Options of `eval`.
#[derive(clap::Args)]
struct EvalArgs {
    /// Held-out dialogs (JSONL from `dllm-train corpus`).
    #[arg(long)]
    heldout: PathBuf,
    /// Reference dialogs whose replies define each intent's answers (the train split).
    #[arg(long)]
    reference: PathBuf,
    /// The autoregressive twin (a `llama` GGUF or `builtin:northwind-twin`) to score beside the
    /// diffusion model.
    #[arg(long)]
    twin: Option<String>,
    /// Score only the first N held-out dialogs.
    #[arg(long)]
    max_dialogs: Option<usize>,
    /// Score only dialogs with at least this many user turns (long conversations).
    #[arg(long, default_value_t = 1)]
    min_user_turns: usize,
    /// Also print the first N replies beside the user message and the gold reply.
    #[arg(long, default_value_t = 0)]
    show: usize,
    /// Also print the diffusion model's intent and fact accuracy per intent.
    #[arg(long)]
    by_intent: bool,
    /// Also print every diffusion reply with a doubled or fused piece.
    #[arg(long)]
    doubled: bool,
    /// Also print intent, fact and slot accuracy by user turn position (1-2, 3-5, 6-8, 9-12, 13+)
    /// and by prompt length (<128, 128-255, 256-511, 512+ tokens), for each model scored.
    #[arg(long)]
    by_turn: bool,
    #[command(flatten)]
    decode: DecodeArgs,
}

/// Options of `bench`.
#[derive(clap::Args)]
struct BenchArgs {
    /// Dialogs (JSONL from `dllm-train corpus`); those with earlier turns become the conversations.
    #[arg(long)]
    dialogs: PathBuf,
    /// Conversations measured per case (each reply length gets its own).
    #[arg(long, default_value_t = 8)]
    conversations: usize,
    /// Training dialogs (JSONL) whose answers classify replies by intent; adds intent accuracy.
    #[arg(long)]
    reference: Option<PathBuf>,
    /// Reply lengths (canvas tokens) to measure.
    #[arg(long, value_delimiter = ',', default_value = "64,128")]
    reply_tokens: Vec<usize>,
    /// Concurrent conversation counts for the throughput table.
    #[arg(long, value_delimiter = ',', default_value = "1,4,8,16")]
    concurrency: Vec<usize>,
    /// Replies per concurrency level (default: the largest level, so every client starts at
    /// once); more keep replies arriving while others run, as in a live service.
    #[arg(long)]
    concurrent_replies: Option<usize>,
    /// Threshold of the adaptive cases.
    #[arg(long, default_value_t = 0.9)]
    threshold: f32,
    /// Block length of every case.
    #[arg(long, default_value_t = 32)]
    block_length: usize,
    /// Chain consecutive dialogs into conversations of this many user turns (long histories,
    /// 300-600 prompt tokens at 6-10 turns); 0 measures the dialogs as they are.
    #[arg(long, default_value_t = 0)]
    history_turns: usize,
    /// The autoregressive twin (a GGUF or `builtin:northwind-twin`): adds it through the
    /// autoregressive engine, llama.cpp's raw decode loop on it, and both kinds through the server.
    #[arg(long)]
    twin: Option<String>,
    /// Threads of the twin's engine [default: model.threads]: one decode token is too little work
    /// to share between threads that the server's own threads preempt.
    #[arg(long)]
    twin_threads: Option<usize>,
    /// Alternating rounds of the side-by-side run of both kinds through the server (diffusion,
    /// twin, diffusion, ...), so that the machine's drift between runs hits both alike.
    #[arg(long, default_value_t = 5)]
    side_by_side_rounds: usize,
}

/// Decode options on the command line; unset ones come from `[decode]`.
#[derive(clap::Args)]
struct DecodeArgs {
    /// Reply canvas length in tokens [default: decode.max_tokens]
    #[arg(long)]
    max_tokens: Option<usize>,
    /// Most denoising steps per reply [default: decode.steps]
    #[arg(long)]
    steps: Option<usize>,
    /// Tokens per semi-autoregressive block [default: decode.block_length]
    #[arg(long)]
    block_length: Option<usize>,
    /// Confidence a position needs to be unmasked under the threshold policy [default: decode.threshold]
    #[arg(long)]
    threshold: Option<f32>,
    /// 0 picks the most likely token; above 0 samples [default: decode.temperature]
    #[arg(long)]
    temperature: Option<f32>,
    /// Sampling seed [default: decode.seed]
    #[arg(long)]
    seed: Option<u64>,
    /// Whether a position that would say a piece twice in a row waits a step
    /// [default: decode.defer_repeats]
    #[arg(long)]
    defer_repeats: Option<bool>,
}

impl DecodeArgs {
    fn options(self) -> MessageOptions {
        MessageOptions {
            max_tokens: self.max_tokens,
            steps: self.steps,
            block_length: self.block_length,
            threshold: self.threshold,
            temperature: self.temperature,
            seed: self.seed,
            defer_repeats: self.defer_repeats,
            ..Default::default()
        }
    }
}

fn main() -> anyhow::Result<()> {
    dllm_chat::app::init_tracing();
    let cli = Cli::parse();
    let config = cli.common.load(None, None)?;
    config.validate()?;

    let runtime = tokio::runtime::Runtime::new()?;
    match cli.command {
        Command::Generate { prompt, decode } => runtime.block_on(generate(config, prompt, decode.options())),
        Command::Eval(args) => runtime.block_on(eval(config, args)),
        Command::Bench(args) => runtime.block_on(bench(config, args)),
        Command::Load(args) => runtime.block_on(load(config, args)),
    }
}

async fn start_engine(config: &Config) -> anyhow::Result<std::sync::Arc<dyn engine::Engine>> {
    let model_path = dllm_chat::models::resolve(&config.model.path)?;
    tracing::info!(model = %model_path.display(), "loading model");
    let settings = config.engine_settings();
    let started = Instant::now();
    let engine = tokio::task::spawn_blocking(move || engine::start(&settings, model_path)).await??;
    tracing::info!(ms = started.elapsed().as_millis() as u64, "model loaded");
    Ok(engine)
}

async fn generate(config: Config, prompt: String, options: MessageOptions) -> anyhow::Result<()> {
    let options = Validator::new(&config.decode, &config.limits)?.options(&options)?;
    let engine = start_engine(&config).await?;
    let request = GenerateRequest {
        system: config.system_prompt()?,
        turns: vec![ChatTurn {
            role: "user".into(),
            content: prompt,
        }],
        options,
    };
    let started = Instant::now();
    let mut stream = engine.submit(request)?;
    let mut first = None;
    while let Some(event) = stream.events.recv().await {
        match event {
            EngineEvent::Started { prompt_tokens, .. } => println!("prompt: {prompt_tokens} tokens"),
            EngineEvent::Revision(r) => {
                first.get_or_insert_with(|| started.elapsed());
                println!("[step {:>3} masked {:>3}] {}", r.step, r.masked, r.text);
            }
            EngineEvent::Finished(c) => {
                let total = started.elapsed();
                println!("\n{}", c.text);
                println!(
                    "timing: first revision {:.1} ms, total {:.1} ms, {} steps, {} tokens, {:.1} tokens/s",
                    first.unwrap_or_default().as_secs_f64() * 1e3,
                    total.as_secs_f64() * 1e3,
                    c.steps,
                    c.completion_tokens,
                    c.completion_tokens as f64 / total.as_secs_f64()
                );
                return Ok(());
            }
            EngineEvent::Failed(e) => return Err(e.into()),
        }
    }
    anyhow::bail!("the engine stopped before the reply finished")
}

/// The system prompt the held-out dialogs were written under: their corpus's `manifest.json` when
/// it sits beside them (a model of another domain than the built-in prompt's), unless
/// `prompt.system_file` is set; the configured prompt otherwise.
fn eval_system_prompt(config: &Config, heldout: &std::path::Path) -> anyhow::Result<String> {
    let dir = heldout.parent().unwrap_or(std::path::Path::new("."));
    if config.prompt.system_file.is_empty() && dir.join(dllm_train::corpus::MANIFEST_FILE).is_file() {
        let manifest = dllm_train::corpus::read_manifest(dir)?;
        tracing::info!(corpus = %dir.display(), "system prompt from the corpus manifest");
        return Ok(manifest.system_prompt);
    }
    Ok(config.system_prompt()?)
}

async fn eval(config: Config, args: EvalArgs) -> anyhow::Result<()> {
    use dllm_tools::eval;
    let EvalArgs {
        heldout,
        reference,
        twin,
        max_dialogs,
        min_user_turns,
        show,
        by_intent,
        doubled,
        by_turn,
        decode,
    } = args;
    let options = Validator::new(&config.decode, &config.limits)?.options(&decode.options())?;
    // Resolved before the diffusion model's long run, so a wrong name fails at once.
    let twin = twin
        .map(|name| dllm_chat::models::resolve(&name).map(|file| (name, file)))
        .transpose()?;
    let mut dialogs = eval::read_dialogs(&heldout)?;
    dialogs.retain(|d| d.turns.len() / 2 >= min_user_turns);
    dialogs.truncate(max_dialogs.unwrap_or(usize::MAX));
    let classifier = eval::IntentClassifier::new(&eval::read_dialogs(&reference)?);
    let system = eval_system_prompt(&config, &heldout)?;
    let engine = start_engine(&config).await?;
    let diffusion = eval::evaluate_engine(engine.as_ref(), &system, &dialogs, &classifier, &options).await?;
    let name = format!(
        "{} ({} engine, {:?}, {} tokens)",
        config.model.path,
        engine.info().engine,
        options.schedule,
        options.max_tokens
    );
    let mut rows = vec![diffusion.row(&name)];
    if show > 0 {
        println!("{name}:\n{}", diffusion.show(show));
    }
    if by_intent {
        println!("{name}, by intent:\n{}", diffusion.by_intent());
    }
    if doubled {
        println!(
            "{name}, replies with a doubled or fused piece:\n{}",
            diffusion.doubled_replies()
        );
    }
    // Printed after the main table.
    let mut breakdowns = Vec::new();
    let mut breakdown = |name: &str, report: &eval::Report| {
        if by_turn {
            breakdowns.push(format!("{name}, by turn:\n{}", report.by_turn()));
            breakdowns.push(format!("{name}, by prompt length:\n{}", report.by_prompt_length()));
        }
    };
    breakdown(&name, &diffusion);
    if let Some((twin, file)) = twin {
        let (threads, ctx, max_tokens) = (config.model.threads, config.model.context_length, options.max_tokens);
        let report = tokio::task::spawn_blocking(move || {
            eval::evaluate_autoregressive(&file, threads, ctx, max_tokens, &system, &dialogs, &classifier)
                .map(|r| (r, format!("{twin} (autoregressive, greedy)")))
        })
        .await??;
        if show > 0 {
            println!("{}:\n{}", report.1, report.0.show(show));
        }
        breakdown(&report.1, &report.0);
        rows.push(report.0.row(&report.1));
    }
    println!("{}", eval::TABLE_HEADER);
    for row in rows {
        println!("{row}");
    }
    for table in breakdowns {
        println!("\n{table}");
    }
    Ok(())
}

/// The machine's limit for the model at `path`: ggml's CPU mat-mul rate for its largest layer
/// matrix, in its own encoding, against as many columns as a long prefill has, and against the 32
/// of one block's step; printed, and the first returned (FLOP/s).
fn machine_matmul_rate(path: &Path, threads: usize) -> anyhow::Result<f64> {
    use ggml_ext::runtime::{matmul_rate, Arithmetic};
    let largest = Arithmetic::of_file(path)?.largest;
    let (wide, narrow) = (
        matmul_rate(&largest, 512, threads, 30)?,
        matmul_rate(&largest, 32, threads, 200)?,
    );
    println!(
        "ggml's mat-mul rate on this machine ({} weights, {} x {}, {threads} threads, fastest run): \
         {:.1} GFLOP/s against 512 columns, {:.1} against 32\n",
        largest.encoding,
        largest.rows,
        largest.cols,
        wide / 1e9,
        narrow / 1e9
    );
    Ok(wide)
}

async fn bench(mut config: Config, args: BenchArgs) -> anyhow::Result<()> {
    use dllm_chat::engine::{CacheMode, DecodeOptions, Schedule, Selection};
    use dllm_tools::bench::{self, Case};
    use dllm_tools::eval;
    let dialogs = eval::read_dialogs(&args.dialogs)?;
    let pool = match args.history_turns {
        0 => bench::conversations(&dialogs),
        turns => bench::long_conversations(&dialogs, turns),
    };
    let per_length = args.conversations;
    anyhow::ensure!(
        pool.len() >= per_length * args.reply_tokens.len(),
        "{} has {} dialogs with earlier turns; {} are needed ({} per reply length)",
        args.dialogs.display(),
        pool.len(),
        per_length * args.reply_tokens.len(),
        per_length
    );
    let classifier = match &args.reference {
        Some(path) => Some(eval::IntentClassifier::new(&eval::read_dialogs(path)?)),
        None => None,
    };
    let system = config.system_prompt()?;
    let most = args.concurrency.iter().copied().max().unwrap_or(1);
    config.limits.max_running_replies = most;
    config.limits.kept_conversation_caches = config.limits.kept_conversation_caches.max(most);
    config.limits.max_waiting_replies = config.limits.max_waiting_replies.max(most);
    let with_engine = |engine: EngineKind, cache: CacheMode, reuse_history: bool| Config {
        model: ModelConfig {
            engine,
            cache,
            reuse_history,
            ..config.model.clone()
        },
        ..config.clone()
    };
    // Only case (e) starts prompts from what a cache holds (the conversation's previous turn, or the
    // system prompt another conversation cached); the others prefill every prompt. Case (e) is the
    // service's default, so it also serves the concurrency and server runs.
    let reference = start_engine(&with_engine(EngineKind::Reference, CacheMode::Prefix, false)).await?;
    let prefix = start_engine(&with_engine(EngineKind::Cached, CacheMode::Prefix, false)).await?;
    let dual = start_engine(&with_engine(EngineKind::Cached, CacheMode::Dual, false)).await?;
    let reused = start_engine(&with_engine(EngineKind::Cached, CacheMode::Dual, true)).await?;
    let twin_threads = args.twin_threads.unwrap_or(config.model.threads);
    let twin = match &args.twin {
        Some(path) => {
            let mut twin = with_engine(EngineKind::Autoregressive, CacheMode::Prefix, true);
            twin.model.path = path.clone();
            twin.model.threads = twin_threads;
            let file = dllm_chat::models::resolve(path)?;
            // (t') warms each conversation's history on an engine of its own.
            Some((start_engine(&twin).await?, start_engine(&twin).await?, file))
        }
        None => None,
    };
    let options = |max_tokens: usize, schedule: Schedule| DecodeOptions {
        max_tokens,
        steps: max_tokens,
        block_length: args.block_length.min(max_tokens),
        schedule,
        selection: Selection::Confidence,
        defer_repeats: config.decode.defer_repeats,
        temperature: 0.0,
        seed: 0,
        fill_canvas: false,
    };
    let tau = args.threshold;
    println!(
        "model: {}  threads: {} (twin: {})  conversations per reply length: {per_length}  block: {}",
        reference.info().model_path,
        config.model.threads,
        twin_threads,
        args.block_length
    );
    let matmul_rate = machine_matmul_rate(Path::new(&reference.info().model_path), config.model.threads)?;
    for (i, &tokens) in args.reply_tokens.iter().enumerate() {
        // Fresh conversations per reply length, so no engine has seen them.
        let conversations = &pool[i * per_length..(i + 1) * per_length];
        let threshold = options(tokens, Schedule::Threshold { tau });
        // (a) is llama.cpp's diffusion example as it runs: every position decided, every step
        // taken, none of our rules; (a') stops at the reply's end, as every engine here does.
        let llama_cpp = DecodeOptions {
            fill_canvas: true,
            defer_repeats: false,
            ..options(tokens, Schedule::Fixed)
        };
        let cases = [
            (
                "(a) reference, fixed 1 token/step, all steps",
                &reference,
                llama_cpp,
                false,
            ),
            (
                "(a') reference, fixed 1 token/step, early stop",
                &reference,
                options(tokens, Schedule::Fixed),
                false,
            ),
            ("(b) reference, threshold", &reference, threshold.clone(), false),
            ("(c) cached: prefix cache, threshold", &prefix, threshold.clone(), false),
            ("(d) cached: dual cache, threshold", &dual, threshold.clone(), false),
            (
                "(e) cached: dual cache, threshold, history cached by the previous turn",
                &reused,
                threshold.clone(),
                true,
            ),
        ]
        .map(|(name, engine, options, warm)| Case {
            name: format!("{name}, {tokens} tokens"),
            engine: engine.clone(),
            options,
            warm,
        });
        let mut cases = cases.to_vec();
        if let Some((cold, warmed, _)) = &twin {
            for (name, engine, warm) in [
                ("(t) autoregressive twin", cold, false),
                (
                    "(t') autoregressive twin, history cached by the previous turn",
                    warmed,
                    true,
                ),
            ] {
                cases.push(Case {
                    name: format!("{name}, up to {tokens} tokens"),
                    engine: engine.clone(),
                    options: threshold.clone(),
                    warm,
                });
            }
        }
        let mut results = bench::run_cases(&system, conversations, &cases, classifier.as_ref()).await?;
        if let Some((_, _, file)) = &twin {
            let (file, system, owned) = (file.clone(), system.clone(), conversations.to_vec());
            let model = ModelConfig {
                threads: twin_threads,
                ..config.model.clone()
            };
            let classifier = classifier.clone();
            let name = format!("(t0) llama.cpp's raw decode loop on the twin, up to {tokens} tokens");
            results.push(
                tokio::task::spawn_blocking(move || {
                    bench::raw_case(name, &file, &model, &system, &owned, tokens, classifier.as_ref())
                })
                .await??,
            );
        }
        println!("{}", bench::cases_table(&results));
        println!(
            "Where the time goes (mean ms per reply):\n\n{}",
            bench::phases_table(&results, matmul_rate)
        );
    }
    let adaptive = options(args.reply_tokens[0], Schedule::Threshold { tau });
    let replies = args.concurrent_replies.unwrap_or(most);
    // Every run below gets conversations no earlier run asked (while the pool lasts), so no prompt
    // is found whole in a cache an earlier run left.
    let mut asked = per_length * args.reply_tokens.len();
    let mut unasked = |n: usize| {
        let next: Vec<bench::Conversation> = (asked..asked + n).map(|i| pool[i % pool.len()].clone()).collect();
        asked += n;
        next
    };
    for engine in [&reference, &reused] {
        let mut levels = Vec::new();
        for &level in &args.concurrency {
            let conversations = unasked(replies);
            levels.push(
                bench::run_concurrent(engine.as_ref(), &system, &conversations, &adaptive, level, replies).await?,
            );
        }
        println!(
            "{} engine{}, threshold {tau}, {} tokens, {replies} replies N at a time (engine API):\n{}",
            engine.info().engine,
            if engine.info().engine == "cached" {
                " (dual cache)"
            } else {
                ""
            },
            adaptive.max_tokens,
            bench::concurrency_table(&levels)
        );
    }
    // The same through the real server: WebSocket clients, sessions and streamed revisions.
    let mut levels = Vec::new();
    for &level in &args.concurrency {
        let conversations = unasked(replies);
        levels.push(
            bench::server::run_concurrent(
                &config,
                reused.clone(),
                &conversations,
                &adaptive,
                bench::server::Asked::LastMessage,
                level,
                replies,
            )
            .await?,
        );
    }
    println!(
        "cached engine (dual cache) through the server, {replies} replies N at a time (WebSocket clients, \
         a new session per conversation, last user message only), threshold {tau}, {} tokens:\n{}",
        adaptive.max_tokens,
        bench::concurrency_table(&levels)
    );
    if let Some((twin, _, _)) = &twin {
        // Side by side through the server, one conversation at a time, in alternating rounds: the
        // same single questions, then the same multi-turn conversations (every user turn in one
        // session, each model answering its own history).
        let n_rounds = args.side_by_side_rounds.max(1);
        let engines = [reused.clone(), twin.clone()];
        for (asked, what) in [
            (
                bench::server::Asked::LastMessage,
                format!("the same {most} single questions"),
            ),
            (
                bench::server::Asked::EveryUserTurn,
                format!(
                    "the same {most} multi-turn conversations (every user turn, each model answering its own history)"
                ),
            ),
        ] {
            println!(
                "diffusion (cached, dual cache, threshold {tau}) and its autoregressive twin through the server, {what} \
                 one at a time (new ones each round), up to {} tokens, {n_rounds} alternating rounds (reply p50 ms, diffusion / twin):",
                adaptive.max_tokens
            );
            let mut rounds = Vec::new();
            for _ in 0..n_rounds {
                let conversations = unasked(most);
                let mut pair = Vec::new();
                for engine in &engines {
                    pair.push(
                        bench::server::run_concurrent(
                            &config,
                            engine.clone(),
                            &conversations,
                            &adaptive,
                            asked,
                            1,
                            most,
                        )
                        .await?,
                    );
                }
                rounds.push(pair);
            }
            print_side_by_side(rounds, &engines);
        }
    }
    Ok(())
}

/// Prints alternating rounds of diffusion / twin replies: each round's p50 ratio, the p50 of all
/// rounds' replies together, and the median round's figures.
fn print_side_by_side(
    rounds: Vec<Vec<dllm_tools::bench::ConcurrencyResult>>,
    engines: &[std::sync::Arc<dyn engine::Engine>; 2],
) {
    let p50_ms = |r: &dllm_tools::bench::ConcurrencyResult| r.reply_p50.as_secs_f64() * 1e3;
    let ratio = |pair: &[dllm_tools::bench::ConcurrencyResult]| p50_ms(&pair[0]) / p50_ms(&pair[1]).max(1e-9);
    let ratios: Vec<String> = rounds
        .iter()
        .map(|pair| {
            format!(
                "{:.1} / {:.1} = {:.2}x",
                p50_ms(&pair[0]),
                p50_ms(&pair[1]),
                ratio(pair)
            )
        })
        .collect();
    println!("- rounds: {}", ratios.join("; "));
    // Each round asks other questions, and some take a diffusion reply many more steps than
    // others: the medians of all rounds' replies together say more than any one round.
    let pooled = |k: usize| {
        let mut all: Vec<std::time::Duration> = rounds.iter().flat_map(|pair| pair[k].replies.clone()).collect();
        all.sort();
        (all.len(), dllm_tools::bench::percentile(&all, 0.5).as_secs_f64() * 1e3)
    };
    let ((replies, diffusion), (_, autoregressive)) = (pooled(0), pooled(1));
    println!(
        "- all {replies} replies of each: reply p50 {diffusion:.1} / {autoregressive:.1} ms = {:.2}x",
        diffusion / autoregressive.max(1e-9)
    );
    let mut rounds = rounds;
    rounds.sort_by(|a, b| ratio(a).total_cmp(&ratio(b)));
    let median = &rounds[rounds.len() / 2];
    for (engine, r) in engines.iter().zip(median) {
        println!(
            "- {} (median round): first revision p50 {:.1} ms, reply p50 {:.1} ms / p99 {:.1} ms",
            engine.info().engine,
            r.first_revision_p50.as_secs_f64() * 1e3,
            r.reply_p50.as_secs_f64() * 1e3,
            r.reply_p99.as_secs_f64() * 1e3
        );
    }
    println!(
        "- diffusion / twin median reply latency, median round: {:.2}x\n",
        ratio(median)
    );
}

async fn load(config: Config, args: LoadArgs) -> anyhow::Result<()> {
    let server = match args.server {
        Some(s) => s,
        None => std::env::current_exe()?.with_file_name("dllm-chat"),
    };
    let plan = dllm_tools::load::LoadPlan {
        server,
        model: config.model.path.clone(),
        steps: args.connections,
        chatting: args.chatting,
        messages: args.messages,
        step_deadline: std::time::Duration::from_secs(args.step_deadline_secs),
    };
    let (steps, chat) = dllm_tools::load::run(&plan).await?;
    println!(
        "one replica ({}), loopback, all connections of a step opened at once:\n",
        plan.model
    );
    print!("{}", dllm_tools::load::report(&steps, &chat));
    Ok(())
}
