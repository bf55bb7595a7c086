//! The `dllm-train` command line: `corpus` writes the train and held-out dialogs of a domain, `tokenizer`
//! trains a byte-level BPE tokenizer on a written corpus, `train` trains a diffusion model or its
//! autoregressive twin, `export` writes a checkpoint as GGUF, and `pipeline` runs all of it.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use candle_core::Device;
use clap::{Parser, Subcommand};
use dllm_train::corpus::{self, CorpusConfig, NamePieces, SplitStats, TRAIN_FILE};
use dllm_train::domain::Domain;
use dllm_train::export;
use dllm_train::model::{gguf_tokens, load_checkpoint, Objective};
use dllm_train::tokenizer::{self, TokenizerConfig};
use dllm_train::train::{self, Preset, SpecialIds, TrainState};

#[derive(Parser)]
#[command(
    name = "dllm-train",
    version,
    about = "Corpus and tokenizer tooling for dllm-chat domain models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate train.jsonl, heldout.jsonl and manifest.json from a domain file.
    Corpus {
        #[arg(long)]
        domain: PathBuf,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Dialogs in both splits together.
        #[arg(long)]
        dialogs: usize,
        #[arg(long)]
        out: PathBuf,
        /// Share of the dialogs that goes to the held-out split [default: 0.05].
        #[arg(long)]
        heldout_fraction: Option<f64>,
        /// A short dialog has between 1 and this many user turns [default: 4].
        #[arg(long)]
        max_user_turns: Option<usize>,
        /// Share of dialogs with more user turns than --max-user-turns, up to --long-user-turns [default: 0.3].
        #[arg(long)]
        long_dialog_rate: Option<f64>,
        /// The most user turns of a long dialog [default: 12].
        #[arg(long)]
        long_user_turns: Option<usize>,
        /// Chance that a turn is a follow-up when one is possible [default: 0.6].
        #[arg(long)]
        follow_up_rate: Option<f64>,
        /// Chance that a user message is typed casually (lowercase start, no final punctuation) [default: 0.25].
        #[arg(long)]
        casual_rate: Option<f64>,
        /// Chance that a training message gets a greeting or sign-off from the domain's [chatter] [default: 0.3].
        #[arg(long)]
        chatter_rate: Option<f64>,
        /// Chance that a standalone turn names an order or product [default: 0.35].
        #[arg(long)]
        slot_rate: Option<f64>,
        /// Chance that a training product's model name is composed from the domain's name syllables [default: 0.5].
        #[arg(long)]
        composed_name_rate: Option<f64>,
        /// Compose training product names from the word pieces of this tokenizer.json instead of the domain's
        /// syllables, so that every piece is written in some training reply.
        #[arg(long)]
        name_pieces_from: Option<PathBuf>,
    },
    /// Train a byte-level BPE tokenizer on a corpus directory's train split, rendered as ChatML.
    Tokenizer {
        /// A directory written by `dllm-train corpus`.
        #[arg(long)]
        corpus: PathBuf,
        #[arg(long, default_value_t = 4096)]
        vocab_size: usize,
        /// A pair must occur this often to be merged.
        #[arg(long, default_value_t = 2)]
        min_frequency: u64,
        /// Where to write tokenizer.json.
        #[arg(long)]
        out: PathBuf,
    },
    /// Train a diffusion model (or its autoregressive twin) on a corpus directory's train split.
    Train {
        /// A directory written by `dllm-train corpus`.
        #[arg(long)]
        corpus: PathBuf,
        /// tokenizer.json written by `dllm-train tokenizer`.
        #[arg(long)]
        tokenizer: PathBuf,
        /// Checkpoint directory: model.safetensors and state.json.
        #[arg(long)]
        out: PathBuf,
        /// diffusion | autoregressive
        #[arg(long)]
        objective: Objective,
        /// tiny | small | medium
        #[arg(long)]
        preset: Preset,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Stop after this many minutes (the step count is fitted to it after the first steps).
        #[arg(long)]
        max_minutes: Option<f64>,
        /// Override the preset's step count.
        #[arg(long)]
        steps: Option<usize>,
        /// Override the preset's batch size.
        #[arg(long)]
        batch_size: Option<usize>,
        /// Override the preset's peak learning rate.
        #[arg(long)]
        lr: Option<f64>,
        /// Save a checkpoint every this many steps.
        #[arg(long)]
        save_every: Option<usize>,
        /// Start from these weights instead of random ones: a checkpoint (model.safetensors) or an exported
        /// GGUF file (e.g. a bundled Q8_0 model, whose vocabulary must be --tokenizer's), of the same shape.
        #[arg(long)]
        init_from: Option<PathBuf>,
        /// Override the preset's loss weight of reply tokens that copy an order number or product.
        #[arg(long)]
        copy_weight: Option<f32>,
        /// Read logits through the token embedding (no separate output matrix, no `output.weight` in the
        /// exported file). Starting from untied weights keeps their embedding and drops their output matrix.
        #[arg(long)]
        tied_embeddings: bool,
        /// cpu, or cuda[:N] (a build with `--features cuda`).
        #[arg(long, default_value = "cpu", value_parser = parse_device)]
        device: Device,
    },
    /// Write a checkpoint as an F32 GGUF, plus F16 and Q8_0 copies.
    Export {
        /// model.safetensors written by `dllm-train train` (state.json must sit next to it).
        #[arg(long)]
        ckpt: PathBuf,
        #[arg(long)]
        tokenizer: PathBuf,
        /// The F32 file.
        #[arg(long)]
        out: PathBuf,
        /// diffusion (written as `llada`) | autoregressive (written as `llama`).
        #[arg(long)]
        objective: Objective,
        /// The Q8_0 file (default: next to --out, `-f32` replaced by `-q8_0`).
        #[arg(long)]
        q8: Option<PathBuf>,
        /// The F16 file (default: next to --out, `-f32` replaced by `-f16`).
        #[arg(long)]
        f16: Option<PathBuf>,
        #[arg(long, default_value_t = 2)]
        threads: usize,
    },
    /// Add `diffusion.shift_logits` (false for `llada`, true for `dream`) to GGUF files in place,
    /// tensors and every other key unchanged (checked); `llama` files and files that have the key
    /// are left alone.
    AddShiftLogits {
        /// GGUF files to update.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Add `dllm.trained_prompt_tokens` to GGUF files trained before exports wrote it: the longest
    /// prompt of the corpus's training dialogs as `train` packs them, tensors and every other key
    /// unchanged (checked).
    AddTrainedPrompt {
        /// The corpus directory the files were trained on.
        #[arg(long)]
        corpus: PathBuf,
        /// The tokenizer.json they were trained with; must give the files' vocabulary.
        #[arg(long)]
        tokenizer: PathBuf,
        /// Reply canvas of the training run (replies longer are cut, as in training).
        #[arg(long, default_value_t = 64)]
        reply_len: usize,
        /// Context of the training run.
        #[arg(long, default_value_t = 1024)]
        context_length: usize,
        /// GGUF files to update.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// corpus -> tokenizer -> train the autoregressive twin -> export -> train the diffusion model,
    /// starting from the twin's weights -> export.
    Pipeline {
        #[arg(long)]
        domain: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// tiny | small | medium
        #[arg(long)]
        preset: Preset,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Train the diffusion model from random weights instead of adapting the twin.
        #[arg(long)]
        from_scratch: bool,
        /// Time budget of the diffusion training run (and of the twin's, unless --twin-max-minutes is set).
        #[arg(long)]
        max_minutes: Option<f64>,
        /// Time budget of the autoregressive twin's training run.
        #[arg(long)]
        twin_max_minutes: Option<f64>,
        /// Override the preset's dialog count.
        #[arg(long)]
        dialogs: Option<usize>,
        /// Override the preset's step count.
        #[arg(long)]
        steps: Option<usize>,
        /// Override the preset's batch size (both models).
        #[arg(long)]
        batch_size: Option<usize>,
        /// After training the tokenizer, write the corpus again with training product names composed from its
        /// word pieces (`corpus --name-pieces-from`) at this rate instead of the syllable names.
        #[arg(long)]
        name_pieces_rate: Option<f64>,
        /// Both models read logits through the token embedding (see `train --tied-embeddings`).
        #[arg(long)]
        tied_embeddings: bool,
        /// cpu, or cuda[:N] (a build with `--features cuda`).
        #[arg(long, default_value = "cpu", value_parser = parse_device)]
        device: Device,
    },
}

fn main() -> anyhow::Result<()> {
    keep_freed_memory();
    match Cli::parse().command {
        Command::Corpus {
            domain,
            seed,
            dialogs,
            out,
            heldout_fraction,
            max_user_turns,
            long_dialog_rate,
            long_user_turns,
            follow_up_rate,
            casual_rate,
            chatter_rate,
            slot_rate,
            composed_name_rate,
            name_pieces_from,
        } => {
            let name_pieces = match name_pieces_from {
                Some(path) => Some(name_pieces_of(&path)?),
                None => None,
            };
            let defaults = CorpusConfig::new(seed, dialogs);
            let config = CorpusConfig {
                heldout_fraction: heldout_fraction.unwrap_or(defaults.heldout_fraction),
                max_user_turns: max_user_turns.unwrap_or(defaults.max_user_turns),
                long_dialog_rate: long_dialog_rate.unwrap_or(defaults.long_dialog_rate),
                long_user_turns: long_user_turns.unwrap_or(defaults.long_user_turns),
                follow_up_rate: follow_up_rate.unwrap_or(defaults.follow_up_rate),
                casual_rate: casual_rate.unwrap_or(defaults.casual_rate),
                chatter_rate: chatter_rate.unwrap_or(defaults.chatter_rate),
                slot_rate: slot_rate.unwrap_or(defaults.slot_rate),
                composed_name_rate: composed_name_rate.unwrap_or(defaults.composed_name_rate),
                name_pieces,
                ..defaults
            };
            run_corpus(&domain, &config, &out)?;
        }
        Command::Tokenizer {
            corpus: dir,
            vocab_size,
            min_frequency,
            out,
        } => {
            let config = TokenizerConfig {
                vocab_size,
                min_frequency,
            };
            run_tokenizer(&dir, &config, &out)?;
        }
        Command::Train {
            corpus: dir,
            tokenizer: tokenizer_path,
            out,
            objective,
            preset,
            seed,
            max_minutes,
            steps,
            batch_size,
            lr,
            save_every,
            init_from,
            copy_weight,
            tied_embeddings,
            device,
        } => {
            let overrides = Overrides {
                max_minutes,
                init_from,
                steps,
                batch_size,
                lr,
                save_every,
                copy_weight,
                tied_embeddings,
            };
            run_train(
                &dir,
                &tokenizer_path,
                &out,
                objective,
                preset,
                seed,
                &overrides,
                &device,
            )?;
        }
        Command::Export {
            ckpt,
            tokenizer: tokenizer_path,
            out,
            objective,
            q8,
            f16,
            threads,
        } => {
            let q8 = q8.unwrap_or_else(|| export::sibling(&out, "q8_0"));
            let f16 = f16.unwrap_or_else(|| export::sibling(&out, "f16"));
            run_export(&ckpt, &tokenizer_path, &out, &f16, &q8, objective, threads)?;
        }
        Command::AddShiftLogits { files } => {
            for file in files {
                let update = export::add_shift_logits(&file, &file)?;
                println!("{}: {update:?}", file.display());
            }
        }
        Command::AddTrainedPrompt {
            corpus: dir,
            tokenizer: tokenizer_path,
            reply_len,
            context_length,
            files,
        } => {
            let tok = tokenizer::load(&tokenizer_path)?;
            let manifest = corpus::read_manifest(&dir)?;
            let dialogs = corpus::read_jsonl(&dir.join(TRAIN_FILE))?;
            let (examples, _) =
                train::build_examples(&manifest.system_prompt, &dialogs, &tok, reply_len, context_length, 1.0)?;
            let longest = examples
                .iter()
                .map(train::Example::longest_prompt)
                .max()
                .context("the corpus has no training dialog")?;
            for file in files {
                check_vocabulary(&file, &tok, &tokenizer_path)?;
                export::add_trained_prompt(&file, &file, longest)?;
                println!("{}: dllm.trained_prompt_tokens = {longest}", file.display());
            }
        }
        Command::Pipeline {
            domain,
            out,
            preset,
            seed,
            from_scratch,
            max_minutes,
            twin_max_minutes,
            dialogs,
            steps,
            batch_size,
            name_pieces_rate,
            tied_embeddings,
            device,
        } => {
            let started = Instant::now();
            let corpus_dir = out.join("corpus");
            let config = CorpusConfig::new(seed, dialogs.unwrap_or(preset.dialogs()));
            run_corpus(&domain, &config, &corpus_dir)?;
            let tokenizer_path = corpus_dir.join("tokenizer.json");
            let tok_config = TokenizerConfig {
                vocab_size: preset.vocab_size(),
                min_frequency: 2,
            };
            run_tokenizer(&corpus_dir, &tok_config, &tokenizer_path)?;
            if let Some(rate) = name_pieces_rate {
                let with_pieces = CorpusConfig {
                    composed_name_rate: rate,
                    name_pieces: Some(name_pieces_of(&tokenizer_path)?),
                    ..config
                };
                run_corpus(&domain, &with_pieces, &corpus_dir)?;
            }
            let name = domain.file_stem().and_then(|s| s.to_str()).unwrap_or("model");
            let twin_ckpt = out.join("llama-ckpt").join(train::CHECKPOINT_FILE);
            for (objective, arch) in [(Objective::Autoregressive, "llama"), (Objective::Diffusion, "llada")] {
                let adapt = objective == Objective::Diffusion && !from_scratch;
                let overrides = Overrides {
                    max_minutes: match objective {
                        Objective::Diffusion => max_minutes,
                        Objective::Autoregressive => twin_max_minutes.or(max_minutes),
                    },
                    init_from: adapt.then(|| twin_ckpt.clone()),
                    // Adapting a trained causal model takes a gentler peak than random weights do.
                    lr: adapt.then(|| preset.config(objective, 0, seed).learning_rate / 2.0),
                    steps,
                    batch_size,
                    tied_embeddings,
                    ..Overrides::default()
                };
                let ckpt_dir = out.join(format!("{arch}-ckpt"));
                run_train(
                    &corpus_dir,
                    &tokenizer_path,
                    &ckpt_dir,
                    objective,
                    preset,
                    seed,
                    &overrides,
                    &device,
                )?;
                let f32_path = out.join(format!("{name}-{arch}-f32.gguf"));
                run_export(
                    &ckpt_dir.join(train::CHECKPOINT_FILE),
                    &tokenizer_path,
                    &f32_path,
                    &export::sibling(&f32_path, "f16"),
                    &export::sibling(&f32_path, "q8_0"),
                    objective,
                    2,
                )?;
            }
            // The service prompts with this; a model of another domain than the built-in
            // prompt's is served with `prompt.system_file` pointing here.
            let prompt_path = out.join("system-prompt.md");
            let manifest = corpus::read_manifest(&corpus_dir)?;
            std::fs::write(&prompt_path, format!("{}\n", manifest.system_prompt))
                .with_context(|| format!("writing {}", prompt_path.display()))?;
            println!("pipeline finished in {:.1?}", started.elapsed());
            println!(
                "serve it: DLLM_MODEL__PATH={} DLLM_PROMPT__SYSTEM_FILE={} scripts/serve",
                out.join(format!("{name}-llada-q8_0.gguf")).display(),
                prompt_path.display()
            );
        }
    }
    Ok(())
}

/// `cpu`, `cuda` or `cuda:N`.
fn parse_device(name: &str) -> Result<Device, String> {
    let ordinal = match name {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        other => other
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| format!("unknown device {other:?} (cpu | cuda | cuda:N)"))?,
    };
    if !candle_core::utils::cuda_is_available() {
        return Err("this dllm-train was built without CUDA: rebuild with `--features cuda`".into());
    }
    Device::new_cuda(ordinal).map_err(|e| format!("opening CUDA device {ordinal}: {e}"))
}

fn run_corpus(domain: &Path, config: &CorpusConfig, out: &Path) -> anyhow::Result<()> {
    let started = Instant::now();
    let parsed = Domain::load(domain)?;
    let generated = corpus::generate(&parsed, config)?;
    let manifest = corpus::write_corpus(out, &domain.display().to_string(), &parsed, config, &generated)?;
    println!("wrote {} in {:.2?}", out.display(), started.elapsed());
    print_stats("train", &manifest.train);
    print_stats("heldout", &manifest.heldout);
    Ok(())
}

/// The word pieces of a trained tokenizer's vocabulary.
fn name_pieces_of(tokenizer_path: &Path) -> anyhow::Result<NamePieces> {
    let tok = tokenizer::load(tokenizer_path)?;
    let pieces = NamePieces::from_tokens(&tokenizer::gguf_vocab(&tok)?.tokens);
    println!(
        "{} word-initial and {} inner name pieces from {}",
        pieces.initials.len(),
        pieces.continuations.len(),
        tokenizer_path.display()
    );
    Ok(pieces)
}

fn run_tokenizer(dir: &Path, config: &TokenizerConfig, out: &Path) -> anyhow::Result<()> {
    let started = Instant::now();
    let manifest = corpus::read_manifest(dir)?;
    let dialogs = corpus::read_jsonl(&dir.join(TRAIN_FILE))?;
    let trained = tokenizer::train_on_dialogs(&manifest.system_prompt, &dialogs, config)
        .with_context(|| format!("training on {}", dir.display()))?;
    tokenizer::save(&trained, out)?;
    let vocab = tokenizer::gguf_vocab(&trained)?;
    println!(
        "wrote {} in {:.2?}: {} tokens ({} requested), {} merges, trained on {} dialogs",
        out.display(),
        started.elapsed(),
        vocab.tokens.len(),
        config.vocab_size,
        vocab.merges.len(),
        dialogs.len()
    );
    Ok(())
}

/// A training step allocates and frees tensors of a few MB per op. By default glibc gives such blocks back to
/// the kernel and page-faults them in again at the next op, which cost about an eighth of the small preset's
/// training throughput on the 2-core machine (673-711 -> 764-822 tokens/s over the same 30 steps).
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes glibc's allocation thresholds. It runs first in `main`, before any other
    // thread exists. A value glibc rejects leaves that threshold at its default, which is only slower.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
    }
}

/// Fails unless the GGUF `file` was trained with `tok` (read from `tokenizer_path`).
fn check_vocabulary(file: &Path, tok: &tokenizers::Tokenizer, tokenizer_path: &Path) -> anyhow::Result<()> {
    let tokens = gguf_tokens(file).with_context(|| format!("reading {}", file.display()))?;
    if tokens != tokenizer::gguf_vocab(tok)?.tokens {
        anyhow::bail!(
            "{} was trained with another vocabulary than {} ({} tokens there, {} here)",
            file.display(),
            tokenizer_path.display(),
            tokens.len(),
            tok.get_vocab_size(true)
        );
    }
    Ok(())
}

/// Command-line changes to a preset's training settings.
#[derive(Default)]
struct Overrides {
    max_minutes: Option<f64>,
    init_from: Option<PathBuf>,
    steps: Option<usize>,
    batch_size: Option<usize>,
    lr: Option<f64>,
    save_every: Option<usize>,
    copy_weight: Option<f32>,
    tied_embeddings: bool,
}

// The command's flags, one argument each.
#[allow(clippy::too_many_arguments)]
fn run_train(
    dir: &Path,
    tokenizer_path: &Path,
    out: &Path,
    objective: Objective,
    preset: Preset,
    seed: u64,
    overrides: &Overrides,
    device: &Device,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let manifest = corpus::read_manifest(dir)?;
    let dialogs = corpus::read_jsonl(&dir.join(TRAIN_FILE))?;
    let tok = tokenizer::load(tokenizer_path)?;
    if let Some(init) = overrides
        .init_from
        .as_deref()
        .filter(|p| p.extension().is_some_and(|e| e == "gguf"))
    {
        // Weights are only worth continuing from under the tokenizer they were trained with.
        check_vocabulary(init, &tok, tokenizer_path)?;
    }
    let mut config = preset.config(objective, tok.get_vocab_size(true), seed);
    config.max_minutes = overrides.max_minutes;
    config.init_from = overrides.init_from.clone();
    config.steps = overrides.steps.unwrap_or(config.steps);
    config.batch_size = overrides.batch_size.unwrap_or(config.batch_size);
    config.learning_rate = overrides.lr.unwrap_or(config.learning_rate);
    config.save_every = overrides.save_every.unwrap_or(config.save_every).max(1);
    config.copy_weight = overrides.copy_weight.unwrap_or(config.copy_weight);
    config.model.tied_embeddings = overrides.tied_embeddings;
    let (examples, skipped) = train::build_examples(
        &manifest.system_prompt,
        &dialogs,
        &tok,
        config.reply_len,
        config.model.context_length,
        config.copy_weight,
    )?;
    println!(
        "{} packed dialogs ({} replies) from {} dialogs in {:.2?}",
        examples.len(),
        examples.iter().map(train::Example::replies).sum::<usize>(),
        dialogs.len(),
        started.elapsed()
    );
    train::train(&config, &examples, skipped, SpecialIds::of(&tok)?, out, device)?;
    Ok(())
}

fn run_export(
    ckpt: &Path,
    tokenizer_path: &Path,
    f32_path: &Path,
    f16_path: &Path,
    q8_path: &Path,
    objective: Objective,
    threads: usize,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let dir = ckpt.parent().unwrap_or(Path::new("."));
    let state = TrainState::read(dir)?;
    if state.config.objective != objective {
        anyhow::bail!(
            "{} was trained with the {} objective, not {}",
            ckpt.display(),
            state.config.objective.name(),
            objective.name()
        );
    }
    let tok = tokenizer::load(tokenizer_path)?;
    let tensors = load_checkpoint(ckpt, &Device::Cpu).with_context(|| format!("reading {}", ckpt.display()))?;
    let written = export::export(
        f32_path,
        Some(f16_path),
        Some(q8_path),
        &state.config.model,
        objective,
        &tok,
        state.trained_prompt_tokens,
        &tensors,
        threads,
    )?;
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len() as f64 / 1e6).unwrap_or(0.0);
    println!(
        "exported {} (step {}, loss {:.4}) as {} in {:.2?}: {} ({:.1} MB), {} ({:.1} MB), {} ({:.1} MB)",
        ckpt.display(),
        state.step,
        state.loss,
        objective.architecture().name(),
        started.elapsed(),
        written.f32.display(),
        size(&written.f32),
        f16_path.display(),
        size(f16_path),
        q8_path.display(),
        size(q8_path),
    );
    Ok(())
}

fn print_stats(split: &str, stats: &SplitStats) {
    println!(
        "{split}: {} dialogs, {} user turns, {} distinct user utterances, dialogs by user turns {:?}",
        stats.dialogs, stats.user_turns, stats.distinct_user_utterances, stats.dialogs_by_user_turns
    );
}

#[cfg(test)]
mod tests {
    use super::parse_device;

    #[test]
    fn devices_parse_or_say_what_is_wrong() {
        assert!(matches!(parse_device("cpu"), Ok(candle_core::Device::Cpu)));
        let unknown = parse_device("gpu").unwrap_err();
        assert!(unknown.contains("cpu | cuda | cuda:N"), "{unknown}");
        assert!(parse_device("cuda:x").unwrap_err().contains("unknown device"));
        if !candle_core::utils::cuda_is_available() {
            for name in ["cuda", "cuda:1"] {
                let err = parse_device(name).unwrap_err();
                assert!(err.contains("--features cuda"), "{err}");
            }
        }
    }
}
