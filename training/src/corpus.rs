//! Dialog generation: turns a validated [`Domain`] into seeded, reproducible multi-turn dialogs, writes them as
//! JSONL (`train.jsonl`, `heldout.jsonl`, plus `manifest.json`), reads them back, and renders them as ChatML.
//! Train and held-out dialogs draw from disjoint pools (phrasings, order numbers, products), so an eval on the
//! held-out split measures generalisation rather than recall.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::domain::{fill, Domain, Intent, Position, Product, SlotKind};

pub const IM_START: &str = "<|im_start|>";
pub const IM_END: &str = "<|im_end|>";

pub const TRAIN_FILE: &str = "train.jsonl";
pub const HELDOUT_FILE: &str = "heldout.jsonl";
pub const MANIFEST_FILE: &str = "manifest.json";

#[derive(Debug, thiserror::Error)]
pub enum CorpusError {
    #[error("corpus setting {field}: {problem}")]
    Config { field: &'static str, problem: String },
    #[error("{path:?}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path:?} line {line}: {source}")]
    Json {
        path: PathBuf,
        line: usize,
        #[source]
        source: serde_json::Error,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Heldout,
}

impl Split {
    fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Heldout => "heldout",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Dialog {
    pub id: String,
    pub split: Split,
    pub turns: Vec<Turn>,
}

/// One message. User turns carry the labels a later eval needs; assistant turns only the reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "lowercase")]
pub enum Turn {
    User {
        content: String,
        intent: String,
        /// Strings the assistant's reply must contain.
        facts: Vec<String>,
        /// Slot values this turn uses, whether named in it or carried over from an earlier turn.
        slots: BTreeMap<String, String>,
    },
    Assistant {
        content: String,
    },
}

impl Turn {
    pub fn role(&self) -> &'static str {
        match self {
            Turn::User { .. } => "user",
            Turn::Assistant { .. } => "assistant",
        }
    }

    pub fn content(&self) -> &str {
        match self {
            Turn::User { content, .. } | Turn::Assistant { content } => content,
        }
    }
}

/// Knobs of the generator; [`CorpusConfig::validate`] checks them before any dialog is made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CorpusConfig {
    pub seed: u64,
    /// Dialogs in both splits together.
    pub dialogs: usize,
    /// Share of `dialogs` that goes to the held-out split.
    pub heldout_fraction: f64,
    /// A short dialog has between 1 and this many user turns.
    pub max_user_turns: usize,
    /// Share of dialogs that are long: more than `max_user_turns` user turns, up to `long_user_turns`, with
    /// topic switches, thanks in the middle and follow-ups to something named many turns before.
    #[serde(default)]
    pub long_dialog_rate: f64,
    /// The most user turns of a long dialog.
    #[serde(default = "default_long_user_turns")]
    pub long_user_turns: usize,
    /// Chance that a turn is a follow-up when one is possible.
    pub follow_up_rate: f64,
    /// Chance that a phrasing is typed casually (lowercase start, no final punctuation).
    pub casual_rate: f64,
    /// Chance that a training phrasing gets an opener, a closer or both from the domain's `[chatter]`.
    pub chatter_rate: f64,
    /// Chance that a standalone turn names an order or a product (when one is left to ask about). Replies that
    /// copy a slot are what teaches the model to copy, so they are drawn more often than their share of intents.
    pub slot_rate: f64,
    /// Chance that a training product's model name is composed from the domain's `name_syllables` instead of
    /// drawn from its `names` list (when it has syllables).
    #[serde(default)]
    pub composed_name_rate: f64,
    /// Compose training names from these tokenizer pieces instead of the domain's syllables.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name_pieces: Option<NamePieces>,
}

/// The word pieces of a tokenizer's vocabulary, to compose training product names from. The output layer only
/// learns to write tokens that some training reply writes, and a held-out name can split into pieces that no
/// listed or syllable-composed name contains; names built from every piece leave none of them unlearned.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NamePieces {
    /// Capitalised pieces that start a word after a space (`Sol` of the token `ĠSol`).
    pub initials: Vec<String>,
    /// Lower-case pieces inside a word (`st`, `ice`).
    pub continuations: Vec<String>,
}

impl NamePieces {
    /// Picks the pieces out of byte-level BPE token strings, where `Ġ` stands for a leading space.
    pub fn from_tokens<S: AsRef<str>>(tokens: &[S]) -> Self {
        let lower = |s: &str| s.chars().all(|c| c.is_ascii_lowercase());
        let mut pieces = NamePieces::default();
        for token in tokens.iter().map(AsRef::as_ref) {
            if let Some(word) = token.strip_prefix('\u{120}') {
                let mut chars = word.chars();
                if chars.next().is_some_and(|c| c.is_ascii_uppercase()) && lower(chars.as_str()) {
                    pieces.initials.push(word.to_owned());
                }
            } else if !token.is_empty() && lower(token) {
                pieces.continuations.push(token.to_owned());
            }
        }
        pieces
    }

    fn is_empty(&self) -> bool {
        self.initials.is_empty() || self.continuations.is_empty()
    }
}

impl CorpusConfig {
    /// The settings `dllm-train pipeline` uses.
    pub fn new(seed: u64, dialogs: usize) -> Self {
        CorpusConfig {
            seed,
            dialogs,
            heldout_fraction: 0.05,
            max_user_turns: 4,
            long_dialog_rate: 0.3,
            long_user_turns: 12,
            follow_up_rate: 0.6,
            casual_rate: 0.25,
            chatter_rate: 0.3,
            slot_rate: 0.35,
            composed_name_rate: 0.5,
            name_pieces: None,
        }
    }

    fn validate(&self) -> Result<(), CorpusError> {
        if self.max_user_turns == 0 {
            return Err(CorpusError::Config {
                field: "max_user_turns",
                problem: "must be at least 1".into(),
            });
        }
        if self.long_dialog_rate > 0.0 && self.long_user_turns <= self.max_user_turns {
            return Err(CorpusError::Config {
                field: "long_user_turns",
                problem: format!(
                    "{} leaves long dialogs no room above max_user_turns ({})",
                    self.long_user_turns, self.max_user_turns
                ),
            });
        }
        for (field, value) in [
            ("heldout_fraction", self.heldout_fraction),
            ("long_dialog_rate", self.long_dialog_rate),
            ("follow_up_rate", self.follow_up_rate),
            ("casual_rate", self.casual_rate),
            ("chatter_rate", self.chatter_rate),
            ("slot_rate", self.slot_rate),
            ("composed_name_rate", self.composed_name_rate),
        ] {
            if !(0.0..=1.0).contains(&value) {
                return Err(CorpusError::Config {
                    field,
                    problem: format!("{value} is not between 0 and 1"),
                });
            }
        }
        Ok(())
    }

    /// The most user turns any dialog can have.
    pub fn most_user_turns(&self) -> usize {
        if self.long_dialog_rate > 0.0 {
            self.long_user_turns.max(self.max_user_turns)
        } else {
            self.max_user_turns
        }
    }

    /// How many of `dialogs` are held out.
    pub fn heldout_dialogs(&self) -> usize {
        ((self.dialogs as f64) * self.heldout_fraction).round() as usize
    }
}

fn default_long_user_turns() -> usize {
    12
}

#[derive(Debug, Clone, PartialEq)]
pub struct Corpus {
    pub train: Vec<Dialog>,
    pub heldout: Vec<Dialog>,
}

/// Generates both splits. The same domain and config always give the same dialogs.
pub fn generate(domain: &Domain, config: &CorpusConfig) -> Result<Corpus, CorpusError> {
    config.validate()?;
    // Intents do not repeat within a dialog, and every turn can fall back to a standalone intent.
    let standalone = domain
        .intents
        .iter()
        .filter(|i| !i.is_contextual() && i.position == Position::Any)
        .count();
    if standalone < config.most_user_turns() {
        return Err(CorpusError::Config {
            field: "max_user_turns",
            problem: format!("the domain has only {standalone} standalone intents to fill a dialog"),
        });
    }
    let heldout_count = config.heldout_dialogs();
    // Each split gets its own stream, so the held-out dialogs do not shift when the train count changes.
    let mut master = StdRng::seed_from_u64(config.seed);
    let mut train_rng = StdRng::from_rng(&mut master);
    let mut heldout_rng = StdRng::from_rng(&mut master);
    let train_pool = Pool::new(domain, Split::Train);
    let heldout_pool = Pool::new(domain, Split::Heldout);
    Ok(Corpus {
        train: (0..config.dialogs - heldout_count)
            .map(|i| train_pool.dialog(i, config, &mut train_rng))
            .collect(),
        heldout: (0..heldout_count)
            .map(|i| heldout_pool.dialog(i, config, &mut heldout_rng))
            .collect(),
    })
}

/// The latest referent of each kind a dialog has named.
#[derive(Default)]
struct Named {
    order: Option<Referent>,
    product: Option<Referent>,
}

impl Named {
    fn set(&mut self, referent: Referent) {
        match referent.kind() {
            SlotKind::Order => self.order = Some(referent),
            SlotKind::Product => self.product = Some(referent),
        }
    }

    fn get(&self, kind: SlotKind) -> Option<&Referent> {
        match kind {
            SlotKind::Order => self.order.as_ref(),
            SlotKind::Product => self.product.as_ref(),
        }
    }
}

/// What one split may draw from.
struct Pool<'a> {
    domain: &'a Domain,
    split: Split,
    product_names: &'a [String],
}

/// A thing an earlier turn named, which follow-ups refer back to.
enum Referent {
    Order(String),
    Product(Product),
}

impl Referent {
    fn kind(&self) -> SlotKind {
        match self {
            Referent::Order(_) => SlotKind::Order,
            Referent::Product(_) => SlotKind::Product,
        }
    }

    fn slots(&self) -> BTreeMap<String, String> {
        match self {
            Referent::Order(number) => BTreeMap::from([("order".to_owned(), number.clone())]),
            Referent::Product(product) => BTreeMap::from([
                ("product".to_owned(), product.name.clone()),
                ("warranty".to_owned(), product.warranty.clone()),
            ]),
        }
    }
}

impl<'a> Pool<'a> {
    fn new(domain: &'a Domain, split: Split) -> Self {
        let product_names = match split {
            Split::Train => &domain.catalog.names,
            Split::Heldout => &domain.catalog.heldout_names,
        };
        Pool {
            domain,
            split,
            product_names,
        }
    }

    fn phrasings(&self, intent: &'a Intent) -> &'a [String] {
        match self.split {
            Split::Train => &intent.phrasings,
            Split::Heldout => &intent.heldout_phrasings,
        }
    }

    fn referent(&self, kind: SlotKind, config: &CorpusConfig, rng: &mut StdRng) -> Referent {
        match kind {
            SlotKind::Order => {
                let orders = &self.domain.orders;
                let [lo, hi] = orders.range;
                // Validation keeps the held-out share strictly between 0 and 1, so both splits have numbers.
                let n = std::iter::repeat_with(|| rng.random_range(lo..=hi))
                    .find(|&n| orders.is_heldout(n) == (self.split == Split::Heldout))
                    .expect("repeat_with never ends");
                Referent::Order(orders.format(n))
            }
            SlotKind::Product => {
                let line = self
                    .domain
                    .catalog
                    .lines
                    .choose(rng)
                    .expect("validated: lines not empty");
                Referent::Product(line.product(&self.product_name(config, rng)))
            }
        }
    }

    /// A held-out name, or for training a listed name or (at `composed_name_rate`) a composed one that is never
    /// a held-out name: an initial and one or two continuations from `name_pieces` when given, else two or
    /// three of the domain's syllables.
    fn product_name(&self, config: &CorpusConfig, rng: &mut StdRng) -> String {
        let syllables = &self.domain.catalog.name_syllables;
        let pieces = config.name_pieces.as_ref().filter(|p| !p.is_empty());
        let composable = pieces.is_some() || !syllables.is_empty();
        if self.split == Split::Heldout || !composable || !rng.random_bool(config.composed_name_rate) {
            return self
                .product_names
                .choose(rng)
                .expect("validated: names not empty")
                .clone();
        }
        let heldout = &self.domain.catalog.heldout_names;
        let mut compose = || match pieces {
            Some(pieces) => {
                let mut word = pieces.initials.choose(rng).expect("checked: not empty").clone();
                for _ in 0..rng.random_range(1..=2) {
                    word.push_str(pieces.continuations.choose(rng).expect("checked: not empty"));
                }
                word
            }
            None => {
                let count = rng.random_range(2..=3);
                let word: String = (0..count)
                    .map(|_| syllables.choose(rng).expect("checked: syllables not empty").as_str())
                    .collect();
                capitalize(&word)
            }
        };
        std::iter::repeat_with(&mut compose)
            .find(|name| !heldout.iter().any(|h| h.eq_ignore_ascii_case(name)))
            .expect("repeat_with never ends")
    }

    /// A training phrasing sometimes comes wrapped in a greeting or sign-off; held-out phrasings stay as written.
    fn chatter(&self, intent: &Intent, phrasing: String, config: &CorpusConfig, rng: &mut StdRng) -> String {
        if self.split == Split::Heldout || intent.position != Position::Any || !rng.random_bool(config.chatter_rate) {
            return phrasing;
        }
        let chatter = &self.domain.chatter;
        let (open, close) = match rng.random_range(0..3) {
            0 => (true, false),
            1 => (false, true),
            _ => (true, true),
        };
        let mut text = String::new();
        if open {
            text.push_str(chatter.openers.choose(rng).expect("validated: openers not empty"));
            text.push_str(&lowercase_first(&phrasing));
        } else {
            text.push_str(&phrasing);
        }
        if close {
            text.push_str(chatter.closers.choose(rng).expect("validated: closers not empty"));
        }
        text
    }

    fn dialog(&self, index: usize, config: &CorpusConfig, rng: &mut StdRng) -> Dialog {
        let long = config.long_dialog_rate > 0.0 && rng.random_bool(config.long_dialog_rate);
        let user_turns = if long {
            rng.random_range(config.max_user_turns + 1..=config.long_user_turns)
        } else {
            rng.random_range(1..=config.max_user_turns)
        };
        let mut turns = Vec::with_capacity(2 * user_turns);
        // The latest order and the latest product named: a follow-up about one may come many turns after
        // it was named, with the other named in between.
        let mut named = Named::default();
        let mut asked: Vec<&str> = Vec::with_capacity(user_turns);
        for turn in 0..user_turns {
            let intent = self.pick_intent(turn, user_turns, &asked, &named, config, rng);
            if let Some(kind) = intent.slot {
                named.set(self.referent(kind, config, rng));
            }
            // pick_intent offers a `needs` intent only when that kind was named.
            let slots = intent
                .referent()
                .and_then(|kind| named.get(kind))
                .map(Referent::slots)
                .unwrap_or_default();
            let phrasing = self
                .phrasings(intent)
                .choose(rng)
                .expect("validated: phrasings not empty");
            let phrasing = if rng.random_bool(config.casual_rate) {
                casual(phrasing)
            } else {
                phrasing.clone()
            };
            let phrasing = self.chatter(intent, phrasing, config, rng);
            let answer = fill(&intent.answer, &slots);
            turns.push(Turn::User {
                content: fill(&phrasing, &slots),
                intent: intent.name.clone(),
                facts: intent.facts.iter().map(|fact| fill(fact, &slots)).collect(),
                slots,
            });
            turns.push(Turn::Assistant { content: answer });
            asked.push(&intent.name);
        }
        Dialog {
            id: format!("{}-{index:06}", self.split.name()),
            split: self.split,
            turns,
        }
    }

    /// Picks the intent of user turn `turn` (0-based) of `user_turns`, never one already `asked` in this dialog.
    /// When a follow-up is possible it is taken with probability `follow_up_rate`; otherwise a standalone intent
    /// is drawn uniformly.
    fn pick_intent(
        &self,
        turn: usize,
        user_turns: usize,
        asked: &[&str],
        named: &Named,
        config: &CorpusConfig,
        rng: &mut StdRng,
    ) -> &'a Intent {
        let eligible = |intent: &&Intent| {
            let placed = match intent.position {
                Position::Any => true,
                Position::First => turn == 0,
                Position::Last => turn > 0 && turn + 1 == user_turns,
                Position::Later => turn > 0,
            };
            let fresh = !asked.contains(&intent.name.as_str());
            let follows = intent.after.is_empty() || asked.last().is_some_and(|p| intent.after.iter().any(|a| a == p));
            let has_context = intent.needs.is_none_or(|kind| named.get(kind).is_some());
            placed && fresh && follows && has_context
        };
        let (contextual, standalone): (Vec<&Intent>, Vec<&Intent>) = self
            .domain
            .intents
            .iter()
            .filter(eligible)
            .partition(|intent| intent.is_contextual());
        let pool = if !contextual.is_empty() && (standalone.is_empty() || rng.random_bool(config.follow_up_rate)) {
            contextual
        } else {
            let (slotted, plain): (Vec<&Intent>, Vec<&Intent>) =
                standalone.into_iter().partition(|intent| intent.slot.is_some());
            if !slotted.is_empty() && (plain.is_empty() || rng.random_bool(config.slot_rate)) {
                slotted
            } else {
                plain
            }
        };
        pool.choose(rng)
            .expect("checked in generate: enough standalone intents")
    }
}

/// A casually typed variant: lowercase first letter, no final punctuation. It normalizes like the original,
/// so held-out checks still hold.
fn casual(phrasing: &str) -> String {
    lowercase_first(phrasing.trim_end_matches(['?', '.', '!']))
}

fn capitalize(word: &str) -> String {
    let mut chars = word.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// `text` (a template: slots are still placeholders) with its first letter lowercased, unless that is the word "I".
fn lowercase_first(text: &str) -> String {
    let first_word = text.split_whitespace().next().unwrap_or("");
    if first_word == "I" || first_word.starts_with("I'") {
        return text.to_owned();
    }
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// Renders a dialog as ChatML, the format the service prompts the model with.
pub fn render_chatml(system: &str, turns: &[Turn]) -> String {
    let mut text = String::new();
    let messages = std::iter::once(("system", system)).chain(turns.iter().map(|turn| (turn.role(), turn.content())));
    for (role, content) in messages {
        text.push_str(IM_START);
        text.push_str(role);
        text.push('\n');
        text.push_str(content);
        text.push_str(IM_END);
        text.push('\n');
    }
    text
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SplitStats {
    pub dialogs: usize,
    pub user_turns: usize,
    pub distinct_user_utterances: usize,
    /// Dialog count by number of user turns (index 0 = one turn).
    pub dialogs_by_user_turns: Vec<usize>,
}

impl SplitStats {
    pub fn of(dialogs: &[Dialog], max_user_turns: usize) -> Self {
        let mut by_turns = vec![0; max_user_turns];
        let mut distinct = BTreeSet::new();
        let mut user_turns = 0;
        for dialog in dialogs {
            let users: Vec<&Turn> = dialog.turns.iter().filter(|t| matches!(t, Turn::User { .. })).collect();
            user_turns += users.len();
            distinct.extend(users.iter().map(|t| t.content()));
            if let Some(count) = users.len().checked_sub(1).and_then(|i| by_turns.get_mut(i)) {
                *count += 1;
            }
        }
        SplitStats {
            dialogs: dialogs.len(),
            user_turns,
            distinct_user_utterances: distinct.len(),
            dialogs_by_user_turns: by_turns,
        }
    }
}

/// Describes a written corpus; the tokenizer step reads the system prompt from it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub domain: String,
    pub config: CorpusConfig,
    pub system_prompt: String,
    pub train: SplitStats,
    pub heldout: SplitStats,
}

/// Writes `train.jsonl`, `heldout.jsonl` and `manifest.json` into `dir`, creating it if needed.
pub fn write_corpus(
    dir: &Path,
    domain_path: &str,
    domain: &Domain,
    config: &CorpusConfig,
    corpus: &Corpus,
) -> Result<Manifest, CorpusError> {
    std::fs::create_dir_all(dir).map_err(|source| CorpusError::Io {
        path: dir.to_owned(),
        source,
    })?;
    write_jsonl(&dir.join(TRAIN_FILE), &corpus.train)?;
    write_jsonl(&dir.join(HELDOUT_FILE), &corpus.heldout)?;
    let manifest = Manifest {
        domain: domain_path.to_owned(),
        config: config.clone(),
        system_prompt: domain.assistant.system_prompt.clone(),
        train: SplitStats::of(&corpus.train, config.most_user_turns()),
        heldout: SplitStats::of(&corpus.heldout, config.most_user_turns()),
    };
    let path = dir.join(MANIFEST_FILE);
    let json = serde_json::to_string_pretty(&manifest).expect("manifest serializes");
    std::fs::write(&path, json + "\n").map_err(|source| CorpusError::Io { path, source })?;
    Ok(manifest)
}

pub fn write_jsonl(path: &Path, dialogs: &[Dialog]) -> Result<(), CorpusError> {
    let io_error = |source| CorpusError::Io {
        path: path.to_owned(),
        source,
    };
    let mut out = BufWriter::new(File::create(path).map_err(io_error)?);
    for dialog in dialogs {
        serde_json::to_writer(&mut out, dialog).expect("dialogs serialize");
        out.write_all(b"\n").map_err(io_error)?;
    }
    out.flush().map_err(io_error)
}

pub fn read_jsonl(path: &Path) -> Result<Vec<Dialog>, CorpusError> {
    let io_error = |source| CorpusError::Io {
        path: path.to_owned(),
        source,
    };
    let reader = BufReader::new(File::open(path).map_err(io_error)?);
    let mut dialogs = Vec::new();
    for (index, line) in reader.lines().enumerate() {
        let line = line.map_err(io_error)?;
        if line.trim().is_empty() {
            continue;
        }
        dialogs.push(serde_json::from_str(&line).map_err(|source| CorpusError::Json {
            path: path.to_owned(),
            line: index + 1,
            source,
        })?);
    }
    Ok(dialogs)
}

pub fn read_manifest(dir: &Path) -> Result<Manifest, CorpusError> {
    let path = dir.join(MANIFEST_FILE);
    let text = std::fs::read_to_string(&path).map_err(|source| CorpusError::Io {
        path: path.clone(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| CorpusError::Json { path, line: 1, source })
}

#[cfg(test)]
pub(crate) fn test_config(seed: u64, dialogs: usize) -> CorpusConfig {
    CorpusConfig {
        heldout_fraction: 0.25,
        ..CorpusConfig::new(seed, dialogs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{normalize, northwind};

    fn jsonl(dialogs: &[Dialog]) -> String {
        dialogs
            .iter()
            .map(|d| serde_json::to_string(d).unwrap() + "\n")
            .collect()
    }

    fn user_turns(dialog: &Dialog) -> impl Iterator<Item = (&str, &str, &BTreeMap<String, String>)> {
        dialog.turns.iter().filter_map(|turn| match turn {
            Turn::User {
                content, intent, slots, ..
            } => Some((content.as_str(), intent.as_str(), slots)),
            Turn::Assistant { .. } => None,
        })
    }

    #[test]
    fn generation_is_deterministic_per_seed_and_differs_across_seeds() {
        let domain = northwind();
        let a = generate(&domain, &test_config(7, 300)).unwrap();
        let b = generate(&domain, &test_config(7, 300)).unwrap();
        let c = generate(&domain, &test_config(8, 300)).unwrap();
        assert_eq!(jsonl(&a.train), jsonl(&b.train));
        assert_eq!(jsonl(&a.heldout), jsonl(&b.heldout));
        assert_ne!(jsonl(&a.train), jsonl(&c.train));
        assert_ne!(jsonl(&a.heldout), jsonl(&c.heldout));
        assert_eq!((a.train.len(), a.heldout.len()), (225, 75));
    }

    #[test]
    fn dialogs_alternate_roles_within_the_turn_limit() {
        let domain = northwind();
        let config = test_config(3, 400);
        let corpus = generate(&domain, &config).unwrap();
        let mut lengths = BTreeSet::new();
        for dialog in corpus.train.iter().chain(&corpus.heldout) {
            let roles: Vec<&str> = dialog.turns.iter().map(Turn::role).collect();
            let intents: BTreeSet<&str> = user_turns(dialog).map(|(_, intent, _)| intent).collect();
            assert_eq!(intents.len(), roles.len() / 2, "{}: an intent repeats", dialog.id);
            assert_eq!(roles.len() % 2, 0, "{}", dialog.id);
            assert!(
                roles.chunks(2).all(|pair| pair == ["user", "assistant"]),
                "{}",
                dialog.id
            );
            lengths.insert(roles.len() / 2);
        }
        assert_eq!(lengths, (1..=config.most_user_turns()).collect());
    }

    #[test]
    fn heldout_dialogs_use_no_train_phrasing_order_or_product() {
        let domain = northwind();
        let corpus = generate(&domain, &test_config(11, 800)).unwrap();
        let train_phrasings: BTreeSet<String> = domain
            .intents
            .iter()
            .flat_map(|i| i.phrasings.iter().map(|p| normalize(p)))
            .collect();
        let train_orders: BTreeSet<&str> = corpus
            .train
            .iter()
            .flat_map(user_turns)
            .filter_map(|(_, _, slots)| slots.get("order").map(String::as_str))
            .collect();
        let train_names = &domain.catalog.names;
        let mut orders_seen = 0;
        for dialog in &corpus.heldout {
            assert_eq!(dialog.split, Split::Heldout);
            for (content, intent, slots) in user_turns(dialog) {
                // Undo the slot filling to recover the template the turn was written from.
                let mut template = content.to_owned();
                for (name, value) in slots {
                    template = template.replace(value.as_str(), &format!("{{{name}}}"));
                }
                assert!(
                    !train_phrasings.contains(&normalize(&template)),
                    "{intent}: {content:?} is a train phrasing"
                );
                if let Some(order) = slots.get("order") {
                    orders_seen += 1;
                    assert!(!train_orders.contains(order.as_str()), "{order} also appears in train");
                    let n: u32 = order.trim_start_matches(domain.orders.prefix.as_str()).parse().unwrap();
                    assert!(domain.orders.is_heldout(n), "{order} is not a held-out number");
                }
                if let Some(product) = slots.get("product") {
                    assert!(
                        domain
                            .catalog
                            .heldout_names
                            .iter()
                            .any(|name| product.contains(name.as_str()))
                            && !train_names
                                .iter()
                                .any(|name| product.split(' ').any(|word| word == name)),
                        "{product} is not a held-out product"
                    );
                }
            }
        }
        assert!(orders_seen > 0 && !train_orders.is_empty());
    }

    #[test]
    fn training_composes_product_names_that_are_never_held_out() {
        let domain = northwind();
        let catalog = &domain.catalog;
        // Any split into syllables counts: a short syllable can be a prefix of the one that was drawn.
        fn composed_of(rest: &str, syllables: &[String], parts: usize) -> bool {
            if rest.is_empty() {
                return parts == 0;
            }
            parts > 0
                && syllables.iter().any(|s| {
                    rest.strip_prefix(s.as_str())
                        .is_some_and(|r| composed_of(r, syllables, parts - 1))
                })
        }
        let composed_from_syllables =
            |name: &str| (2..=3).any(|parts| composed_of(&name.to_lowercase(), &catalog.name_syllables, parts));
        let names_of = |dialogs: &[Dialog]| -> Vec<String> {
            dialogs
                .iter()
                .flat_map(user_turns)
                .filter_map(|(_, _, slots)| slots.get("product").cloned())
                .map(|product| {
                    let line = catalog
                        .lines
                        .iter()
                        .find(|line| {
                            let (before, after) = line.pattern.split_once("{name}").unwrap();
                            product.starts_with(before) && product.ends_with(after)
                        })
                        .unwrap_or_else(|| panic!("{product} matches no product line"));
                    let (before, after) = line.pattern.split_once("{name}").unwrap();
                    product[before.len()..product.len() - after.len()].to_owned()
                })
                .collect()
        };
        let config = test_config(5, 1200);
        let corpus = generate(&domain, &config).unwrap();
        let train = names_of(&corpus.train);
        let composed: Vec<&String> = train.iter().filter(|n| !catalog.names.contains(n)).collect();
        assert!(
            composed.len() * 4 > train.len() && composed.len() * 4 < 3 * train.len(),
            "{} of {} names composed at rate {}",
            composed.len(),
            train.len(),
            config.composed_name_rate
        );
        for name in &composed {
            assert!(composed_from_syllables(name), "{name} is neither listed nor composed");
            assert!(!catalog.heldout_names.iter().any(|h| h.eq_ignore_ascii_case(name)));
        }
        let heldout = names_of(&corpus.heldout);
        assert!(!heldout.is_empty() && heldout.iter().all(|n| catalog.heldout_names.contains(n)));

        let none = generate(
            &domain,
            &CorpusConfig {
                composed_name_rate: 0.0,
                ..config
            },
        )
        .unwrap();
        assert!(names_of(&none.train).iter().all(|n| catalog.names.contains(n)));
    }

    #[test]
    fn follow_ups_reuse_the_latest_order_or_product() {
        let domain = northwind();
        let corpus = generate(&domain, &test_config(5, 1000)).unwrap();
        let (mut order_follow_ups, mut product_follow_ups) = (0, 0);
        // Follow-ups to a referent named three or more turns before, with another kind named in between.
        let (mut distant, mut across_other_kind) = (0, 0);
        for dialog in corpus.train.iter().chain(&corpus.heldout) {
            let mut introduced: Vec<(usize, SlotKind, String)> = Vec::new();
            for (turn, pair) in dialog.turns.chunks(2).enumerate() {
                let (
                    Turn::User {
                        content, intent, slots, ..
                    },
                    Turn::Assistant { content: answer },
                ) = (&pair[0], &pair[1])
                else {
                    panic!("{}: turns do not pair up", dialog.id);
                };
                let intent = domain.intent(intent).unwrap();
                if let Some(kind) = intent.slot {
                    let value = &slots[kind.placeholder()];
                    assert!(
                        content.contains(value.as_str()),
                        "{}: {content:?} lacks {value}",
                        dialog.id
                    );
                    introduced.push((turn, kind, value.clone()));
                }
                if let Some(kind) = intent.needs {
                    let at = introduced
                        .iter()
                        .rposition(|(_, k, _)| *k == kind)
                        .expect("follow-up without an earlier referent of its kind");
                    let (named_at, _, value) = &introduced[at];
                    assert_eq!(
                        &slots[kind.placeholder()],
                        value,
                        "{}: follow-up refers to another than the latest {kind:?}",
                        dialog.id
                    );
                    distant += usize::from(turn - named_at >= 3);
                    across_other_kind += usize::from(at + 1 < introduced.len());
                    assert!(
                        answer.contains(value.as_str()),
                        "{}: {answer:?} lacks {value}",
                        dialog.id
                    );
                    match kind {
                        SlotKind::Order => order_follow_ups += 1,
                        SlotKind::Product => product_follow_ups += 1,
                    }
                }
            }
        }
        assert!(
            order_follow_ups > 20 && product_follow_ups > 20,
            "{order_follow_ups} {product_follow_ups}"
        );
        assert!(distant > 10 && across_other_kind > 10, "{distant} {across_other_kind}");
    }

    #[test]
    fn long_dialogs_come_at_their_rate_in_both_splits_with_thanks_in_the_middle() {
        let domain = northwind();
        let config = test_config(9, 1200);
        let corpus = generate(&domain, &config).unwrap();
        for split in [&corpus.train, &corpus.heldout] {
            let long = split
                .iter()
                .filter(|d| d.turns.len() / 2 > config.max_user_turns)
                .count();
            let share = long as f64 / split.len() as f64;
            assert!(
                (share - config.long_dialog_rate).abs() < 0.06,
                "{long} of {}",
                split.len()
            );
            assert!(split.iter().all(|d| d.turns.len() / 2 <= config.long_user_turns));
        }
        let thanks_midway = corpus
            .train
            .iter()
            .filter(|d| {
                let intents: Vec<&str> = user_turns(d).map(|(_, intent, _)| intent).collect();
                intents[..intents.len() - 1].contains(&"thanks")
            })
            .count();
        assert!(thanks_midway > 10, "{thanks_midway}");
        let short_only = generate(
            &domain,
            &CorpusConfig {
                long_dialog_rate: 0.0,
                ..config.clone()
            },
        )
        .unwrap();
        assert!(short_only
            .train
            .iter()
            .all(|d| d.turns.len() / 2 <= config.max_user_turns));
    }

    #[test]
    fn chatml_rendering() {
        let turns = [
            Turn::User {
                content: "Hi".into(),
                intent: "greeting".into(),
                facts: vec![],
                slots: BTreeMap::new(),
            },
            Turn::Assistant {
                content: "Hello!".into(),
            },
        ];
        assert_eq!(
            render_chatml("Be kind.", &turns),
            "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
             <|im_start|>assistant\nHello!<|im_end|>\n"
        );
    }

    #[test]
    fn jsonl_round_trips_with_the_documented_shape() {
        let domain = northwind();
        let corpus = generate(&domain, &test_config(2, 40)).unwrap();
        let dir = std::env::temp_dir().join(format!("dllm-train-corpus-{}", std::process::id()));
        let manifest = write_corpus(&dir, "northwind.toml", &domain, &test_config(2, 40), &corpus).unwrap();
        assert_eq!(read_jsonl(&dir.join(TRAIN_FILE)).unwrap(), corpus.train);
        assert_eq!(read_jsonl(&dir.join(HELDOUT_FILE)).unwrap(), corpus.heldout);
        assert_eq!(read_manifest(&dir).unwrap(), manifest);
        let first_line = std::fs::read_to_string(dir.join(TRAIN_FILE)).unwrap();
        let value: serde_json::Value = serde_json::from_str(first_line.lines().next().unwrap()).unwrap();
        assert_eq!(value["split"], "train");
        assert_eq!(value["turns"][0]["role"], "user");
        assert!(value["turns"][0]["facts"].is_array() && value["turns"][0]["slots"].is_object());
        assert_eq!(
            value["turns"][1].as_object().unwrap().keys().collect::<Vec<_>>(),
            ["content", "role"]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn invalid_config_is_rejected() {
        let mut config = test_config(1, 10);
        config.follow_up_rate = 1.5;
        assert!(matches!(
            generate(&northwind(), &config),
            Err(CorpusError::Config {
                field: "follow_up_rate",
                ..
            })
        ));
        let mut config = test_config(1, 10);
        config.long_user_turns = config.max_user_turns;
        assert!(matches!(
            generate(&northwind(), &config),
            Err(CorpusError::Config {
                field: "long_user_turns",
                ..
            })
        ));
    }
}
