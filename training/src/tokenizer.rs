//! Byte-level BPE tokenizer training on the ChatML-rendered corpus, saving and loading `tokenizer.json`, and the
//! export of the vocabulary and merges in the form a GGUF writer stores (`tokenizer.ggml.tokens`,
//! `tokenizer.ggml.merges`). The special tokens always take ids 0..3 in [`SPECIAL_TOKENS`] order, and the full
//! 256-byte alphabet is in the vocabulary, so any text tokenizes and decodes back exactly.
//!
//! Text is split as Qwen2 does before the byte-level mapping. llama.cpp does not run a tokenizer.json's
//! pre-tokenizer but its own copy, chosen by `tokenizer.ggml.pre` ([`GGML_PRE`]), so the split has to be one
//! llama.cpp knows. Qwen2's also puts every digit in its own piece: an order number from the held-out range
//! then uses the same tokens as training ones instead of unseen multi-digit merges.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::{ModelWrapper, TrainerWrapper};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::corpus::{render_chatml, Dialog, IM_END, IM_START};

pub const ENDOFTEXT: &str = "<|endoftext|>";
/// The mask token a diffusion LM denoises.
pub const MASK: &str = "<|mdm_mask|>";
/// Special tokens in id order: `<|endoftext|>` is 0, `<|mdm_mask|>` is 3.
pub const SPECIAL_TOKENS: [&str; 4] = [ENDOFTEXT, IM_START, IM_END, MASK];
/// Distinct byte values, each of which ByteLevel maps to one alphabet character.
const BYTE_ALPHABET: usize = 256;
/// The `tokenizer.ggml.pre` value under which llama.cpp applies [`PRE_TOKENIZER_REGEX`].
pub const GGML_PRE: &str = "qwen2";
/// Qwen2's pre-tokenizer split, as in its tokenizer.json.
const PRE_TOKENIZER_REGEX: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("tokenizer setting {field}: {problem}")]
    Config { field: &'static str, problem: String },
    #[error("BPE training failed: {0}")]
    Train(#[source] tokenizers::Error),
    #[error("tokenizer file {path:?}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: tokenizers::Error,
    },
    #[error("tokenizer model is not BPE")]
    NotBpe,
    #[error("BPE merges could not be read: {0}")]
    Merges(#[source] serde_json::Error),
    #[error("vocabulary ids are not contiguous around id {0}")]
    VocabNotContiguous(usize),
    #[error("special token {token:?} has id {found:?}, expected {expected}")]
    SpecialId {
        token: &'static str,
        found: Option<u32>,
        expected: u32,
    },
}

#[derive(Debug, Clone)]
pub struct TokenizerConfig {
    /// Upper bound on the vocabulary, specials and byte alphabet included. A small corpus may run out of
    /// merges (or of pairs seen `min_frequency` times) before reaching it.
    pub vocab_size: usize,
    /// A pair must occur this often to be merged.
    pub min_frequency: u64,
}

impl TokenizerConfig {
    /// The smallest vocabulary that still holds the specials and the byte alphabet.
    pub const MIN_VOCAB_SIZE: usize = SPECIAL_TOKENS.len() + BYTE_ALPHABET;
}

/// The vocabulary and merges as a GGUF writer stores them.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufVocab {
    /// Token strings in id order (ByteLevel-encoded: a space is `Ġ`, a newline `Ċ`).
    pub tokens: Vec<String>,
    /// Merges by rank, each as `"left right"` (ByteLevel tokens never contain a space).
    pub merges: Vec<String>,
}

/// Trains a byte-level BPE tokenizer on `texts`.
pub fn train<I, S>(texts: I, config: &TokenizerConfig) -> Result<Tokenizer, TokenizerError>
where
    I: Iterator<Item = S> + Send,
    S: AsRef<str> + Send,
{
    if config.vocab_size < TokenizerConfig::MIN_VOCAB_SIZE {
        return Err(TokenizerError::Config {
            field: "vocab_size",
            problem: format!(
                "{} is below the minimum of {}",
                config.vocab_size,
                TokenizerConfig::MIN_VOCAB_SIZE
            ),
        });
    }
    let specials: Vec<AddedToken> = SPECIAL_TOKENS
        .iter()
        .map(|token| AddedToken::from(*token, true))
        .collect();
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(config.vocab_size)
        .min_frequency(config.min_frequency)
        .show_progress(false)
        .special_tokens(specials)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build()
        .into();

    let split = Split::new(
        SplitPattern::Regex(PRE_TOKENIZER_REGEX.to_owned()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .expect("the Qwen2 regex compiles");
    let mut tokenizer = Tokenizer::new(BPE::default());
    // No prefix space: ChatML content follows a newline, and encode -> decode must give back the exact text.
    // The regex already split the text, so ByteLevel only maps bytes.
    let byte_level = ByteLevel::new(false, false, false);
    tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![
        PreTokenizerWrapper::Split(split),
        PreTokenizerWrapper::ByteLevel(byte_level),
    ])));
    tokenizer.with_decoder(Some(byte_level));
    // Encoding cuts the specials out before the BPE model sees the text; training must too, or it spends merges
    // spelling `<|im_start|>` out of `<|`, `im`, ... (the trainer adds the specials to the vocabulary itself).
    let pieces = texts.flat_map(|text| between_specials(text.as_ref()));
    tokenizer.train(&mut trainer, pieces).map_err(TokenizerError::Train)?;

    for (expected, token) in (0u32..).zip(SPECIAL_TOKENS) {
        let found = tokenizer.token_to_id(token);
        if found != Some(expected) {
            return Err(TokenizerError::SpecialId { token, found, expected });
        }
    }
    Ok(tokenizer)
}

/// The non-empty stretches of `text` between special tokens.
fn between_specials(text: &str) -> Vec<String> {
    let mut pieces = vec![text.to_owned()];
    for special in SPECIAL_TOKENS {
        pieces = pieces
            .iter()
            .flat_map(|piece| piece.split(special))
            .filter(|piece| !piece.is_empty())
            .map(str::to_owned)
            .collect();
    }
    pieces
}

/// Trains on dialogs rendered as ChatML with `system` as the system prompt, as the service will prompt.
pub fn train_on_dialogs(
    system: &str,
    dialogs: &[Dialog],
    config: &TokenizerConfig,
) -> Result<Tokenizer, TokenizerError> {
    train(
        dialogs.iter().map(|dialog| render_chatml(system, &dialog.turns)),
        config,
    )
}

pub fn save(tokenizer: &Tokenizer, path: &Path) -> Result<(), TokenizerError> {
    tokenizer.save(path, true).map_err(|source| TokenizerError::File {
        path: path.to_owned(),
        source,
    })
}

pub fn load(path: &Path) -> Result<Tokenizer, TokenizerError> {
    Tokenizer::from_file(path).map_err(|source| TokenizerError::File {
        path: path.to_owned(),
        source,
    })
}

/// The vocabulary in id order and the merges in rank order.
pub fn gguf_vocab(tokenizer: &Tokenizer) -> Result<GgufVocab, TokenizerError> {
    let vocab = tokenizer.get_vocab(true);
    let mut tokens = vec![None; vocab.len()];
    for (token, id) in vocab {
        let slot = tokens
            .get_mut(id as usize)
            .ok_or(TokenizerError::VocabNotContiguous(id as usize))?;
        *slot = Some(token);
    }
    let tokens = tokens
        .into_iter()
        .enumerate()
        .map(|(id, token)| token.ok_or(TokenizerError::VocabNotContiguous(id)))
        .collect::<Result<Vec<_>, _>>()?;

    // The BPE model keeps merges private; its serialized form lists them in rank order as pairs.
    #[derive(Deserialize)]
    struct Merges {
        merges: Vec<(String, String)>,
    }
    let ModelWrapper::BPE(bpe) = tokenizer.get_model() else {
        return Err(TokenizerError::NotBpe);
    };
    let json = serde_json::to_value(bpe).map_err(TokenizerError::Merges)?;
    let Merges { merges } = serde_json::from_value(json).map_err(TokenizerError::Merges)?;
    Ok(GgufVocab {
        tokens,
        merges: merges
            .into_iter()
            .map(|(left, right)| format!("{left} {right}"))
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::corpus::{generate, test_config, CorpusConfig, NamePieces, Turn};
    use crate::domain::northwind;

    fn small_tokenizer(dialogs: usize, vocab_size: usize) -> (Tokenizer, Vec<String>) {
        let domain = northwind();
        let corpus = generate(&domain, &test_config(9, dialogs)).unwrap();
        let system = &domain.assistant.system_prompt;
        let config = TokenizerConfig {
            vocab_size,
            min_frequency: 2,
        };
        let tokenizer = train_on_dialogs(system, &corpus.train, &config).unwrap();
        let texts = corpus
            .train
            .iter()
            .chain(&corpus.heldout)
            .map(|d| render_chatml(system, &d.turns))
            .collect();
        (tokenizer, texts)
    }

    /// Tokens of the held-out names (as written after a space) that no training reply writes.
    fn unwritten_name_tokens(tokenizer: &Tokenizer, train: &[Dialog], heldout_names: &[String]) -> Vec<String> {
        let written: std::collections::HashSet<u32> = train
            .iter()
            .flat_map(|d| &d.turns)
            .filter(|t| matches!(t, Turn::Assistant { .. }))
            .flat_map(|t| tokenizer.encode(t.content(), false).unwrap().get_ids().to_vec())
            .collect();
        let mut unwritten: Vec<String> = heldout_names
            .iter()
            .flat_map(|name| {
                tokenizer
                    .encode(format!(" {name}"), false)
                    .unwrap()
                    .get_tokens()
                    .to_vec()
            })
            .filter(|token| !written.contains(&tokenizer.token_to_id(token).unwrap()))
            .collect();
        unwritten.sort();
        unwritten.dedup();
        unwritten
    }

    #[test]
    fn names_composed_from_vocabulary_pieces_write_the_tokens_of_held_out_names() {
        let domain = northwind();
        let config = test_config(9, 8000);
        let corpus = generate(&domain, &config).unwrap();
        let tok_config = TokenizerConfig {
            vocab_size: 4096,
            min_frequency: 2,
        };
        let tokenizer = train_on_dialogs(&domain.assistant.system_prompt, &corpus.train, &tok_config).unwrap();
        let pieces = NamePieces::from_tokens(&gguf_vocab(&tokenizer).unwrap().tokens);
        assert!(pieces.initials.contains(&"Sol".to_owned()) && pieces.continuations.contains(&"ing".to_owned()));
        let names = &domain.catalog.heldout_names;
        let from_syllables = unwritten_name_tokens(&tokenizer, &corpus.train, names);
        let with_pieces = CorpusConfig {
            name_pieces: Some(pieces),
            composed_name_rate: 1.0,
            ..config
        };
        let from_pieces = unwritten_name_tokens(&tokenizer, &generate(&domain, &with_pieces).unwrap().train, names);
        eprintln!("unwritten: {from_syllables:?} with syllables, {from_pieces:?} with pieces");
        // Pieces drawn at random are not all written in a corpus this small, but most are.
        assert!(from_syllables.len() >= 20, "{from_syllables:?}");
        assert!(from_pieces.len() * 4 <= from_syllables.len(), "{from_pieces:?}");
    }

    #[test]
    fn every_dialog_round_trips_exactly() {
        let (tokenizer, mut texts) = small_tokenizer(120, 700);
        // Bytes the corpus never contains must still survive, thanks to the full byte alphabet.
        texts.push("Café ☃ 🙂\t\r\n  tabs, \u{0}nul and <|im_start|> mid-text".to_owned());
        for text in &texts {
            let ids = tokenizer.encode(text.as_str(), false).unwrap().get_ids().to_vec();
            assert_eq!(&tokenizer.decode(&ids, false).unwrap(), text);
        }
    }

    #[test]
    fn specials_have_ids_0_to_3_and_encode_as_single_tokens() {
        let (tokenizer, texts) = small_tokenizer(40, 500);
        for (id, token) in (0u32..).zip(SPECIAL_TOKENS) {
            assert_eq!(tokenizer.token_to_id(token), Some(id));
            assert_eq!(tokenizer.encode(token, false).unwrap().get_ids(), [id]);
        }
        let ids = tokenizer.encode(texts[0].as_str(), false).unwrap().get_ids().to_vec();
        assert_eq!(ids[0], 1, "a dialog starts with <|im_start|>");
        assert_eq!(
            ids.iter().filter(|&&id| id == 1).count(),
            ids.iter().filter(|&&id| id == 2).count()
        );
        assert!(
            ids.iter().filter(|&&id| id == 1).count() >= 3,
            "system, user and assistant messages"
        );
    }

    #[test]
    fn vocab_size_is_as_requested_and_exports_for_gguf() {
        let (tokenizer, _) = small_tokenizer(200, 600);
        assert_eq!(tokenizer.get_vocab_size(true), 600);
        let vocab = gguf_vocab(&tokenizer).unwrap();
        assert_eq!(vocab.tokens.len(), 600);
        assert_eq!(vocab.tokens[..4], SPECIAL_TOKENS);
        // No merges were spent on the pieces of the specials.
        assert!(
            vocab.tokens[4..].iter().all(|t| !t.contains("<|") && !t.contains("|>")),
            "special fragments"
        );
        // Every byte has a token, and each merge joins two existing tokens into a third.
        for byte_char in ByteLevel::alphabet() {
            assert!(vocab.tokens.contains(&byte_char.to_string()), "{byte_char:?} missing");
        }
        // At least one merge per learned token; two pairs ("a"+"bc", "ab"+"c") may yield the same token.
        assert!(vocab.merges.len() >= 600 - TokenizerConfig::MIN_VOCAB_SIZE);
        for merge in &vocab.merges {
            let (left, right) = merge.split_once(' ').unwrap();
            assert!(vocab.tokens.iter().any(|t| t == left) && vocab.tokens.iter().any(|t| t == right));
            assert!(vocab.tokens.contains(&format!("{left}{right}")), "{merge}");
        }
    }

    #[test]
    fn digits_are_single_tokens_so_heldout_order_numbers_look_like_train_ones() {
        let (tokenizer, _) = small_tokenizer(200, 600);
        let encoding = tokenizer.encode("Where is NW-80417?", false).unwrap();
        let digits: Vec<&str> = encoding
            .get_tokens()
            .iter()
            .map(String::as_str)
            .filter(|t| t.chars().all(|c| c.is_ascii_digit()))
            .collect();
        assert_eq!(digits, ["8", "0", "4", "1", "7"]);
    }

    #[test]
    fn between_specials_cuts_out_every_special() {
        assert_eq!(
            between_specials("<|im_start|>user\nhi<|im_end|>\n<|mdm_mask|>"),
            ["user\nhi", "\n"]
        );
    }

    #[test]
    fn tiny_corpus_stops_below_the_requested_size() {
        let (tokenizer, _) = small_tokenizer(2, 50_000);
        let size = tokenizer.get_vocab_size(true);
        assert!(size > TokenizerConfig::MIN_VOCAB_SIZE && size < 50_000, "{size}");
        assert!(matches!(
            train(
                ["x"].into_iter(),
                &TokenizerConfig {
                    vocab_size: 100,
                    min_frequency: 1
                }
            ),
            Err(TokenizerError::Config {
                field: "vocab_size",
                ..
            })
        ));
    }

    #[test]
    fn training_is_deterministic_and_survives_save_and_load() {
        let (a, _) = small_tokenizer(80, 520);
        let (b, _) = small_tokenizer(80, 520);
        assert_eq!(a.to_string(false).unwrap(), b.to_string(false).unwrap());
        let path = std::env::temp_dir().join(format!("dllm-train-tokenizer-{}.json", std::process::id()));
        save(&a, &path).unwrap();
        let loaded = load(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(gguf_vocab(&loaded).unwrap(), gguf_vocab(&a).unwrap());
    }
}
