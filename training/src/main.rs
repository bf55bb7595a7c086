//! The `dllm-train` command line: `corpus` writes the train and held-out dialogs of a domain, `tokenizer`
//! trains a byte-level BPE tokenizer on a written corpus.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::{Parser, Subcommand};
use dllm_train::corpus::{self, CorpusConfig, SplitStats, TRAIN_FILE};
use dllm_train::domain::Domain;
use dllm_train::tokenizer::{self, TokenizerConfig};

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
        /// Share of the dialogs that goes to the held-out split.
        #[arg(long, default_value_t = 0.05)]
        heldout_fraction: f64,
        /// Each dialog has between 1 and this many user turns.
        #[arg(long, default_value_t = 4)]
        max_user_turns: usize,
        /// Chance that a turn is a follow-up when one is possible.
        #[arg(long, default_value_t = 0.6)]
        follow_up_rate: f64,
        /// Chance that a user message is typed casually (lowercase start, no final punctuation).
        #[arg(long, default_value_t = 0.25)]
        casual_rate: f64,
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
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Corpus {
            domain,
            seed,
            dialogs,
            out,
            heldout_fraction,
            max_user_turns,
            follow_up_rate,
            casual_rate,
        } => {
            let started = Instant::now();
            let parsed = Domain::load(&domain)?;
            let config = CorpusConfig {
                seed,
                dialogs,
                heldout_fraction,
                max_user_turns,
                follow_up_rate,
                casual_rate,
            };
            let generated = corpus::generate(&parsed, &config)?;
            let manifest = corpus::write_corpus(&out, &domain.display().to_string(), &parsed, &config, &generated)?;
            println!("wrote {} in {:.2?}", out.display(), started.elapsed());
            print_stats("train", &manifest.train);
            print_stats("heldout", &manifest.heldout);
        }
        Command::Tokenizer {
            corpus: dir,
            vocab_size,
            min_frequency,
            out,
        } => {
            let started = Instant::now();
            let manifest = corpus::read_manifest(&dir)?;
            let dialogs = corpus::read_jsonl(&dir.join(TRAIN_FILE))?;
            let config = TokenizerConfig {
                vocab_size,
                min_frequency,
            };
            let trained = tokenizer::train_on_dialogs(&manifest.system_prompt, &dialogs, &config)
                .with_context(|| format!("training on {}", dir.display()))?;
            tokenizer::save(&trained, &out)?;
            let vocab = tokenizer::gguf_vocab(&trained)?;
            println!(
                "wrote {} in {:.2?}: {} tokens ({} requested), {} merges, trained on {} dialogs",
                out.display(),
                started.elapsed(),
                vocab.tokens.len(),
                vocab_size,
                vocab.merges.len(),
                dialogs.len()
            );
        }
    }
    Ok(())
}

fn print_stats(split: &str, stats: &SplitStats) {
    println!(
        "{split}: {} dialogs, {} user turns, {} distinct user utterances, dialogs by user turns {:?}",
        stats.dialogs, stats.user_turns, stats.distinct_user_utterances, stats.dialogs_by_user_turns
    );
}
