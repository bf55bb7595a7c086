//! The domain file (`config/domains/*.toml`): its typed schema, loading, and the validation that makes the
//! generated corpus trustworthy. Validation rejects anything the generator or a later eval would silently get
//! wrong (a fact missing from its answer, a held-out phrasing that also appears in training, a placeholder no
//! slot fills, a business fact no intent covers), and every error names the offending field.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Why a domain file was rejected. `field` is a dotted path such as `intents.track_order.phrasings[2]`.
#[derive(Debug, thiserror::Error)]
pub enum DomainError {
    #[error("domain file {path:?} could not be read: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("domain file does not match the schema: {0}")]
    Parse(#[from] toml::de::Error),
    #[error("{field} must not be empty")]
    Empty { field: String },
    #[error("{field}: {value:?} appears more than once")]
    Duplicate { field: String, value: String },
    #[error("{field}: placeholder {{{placeholder}}} is not provided by this intent's slot")]
    UnknownPlaceholder { field: String, placeholder: String },
    #[error("{field}: expected exactly the placeholders {expected:?}")]
    SlotMismatch { field: String, expected: Vec<String> },
    #[error("{field}: fact {fact:?} does not appear verbatim in the answer")]
    FactNotInAnswer { field: String, fact: String },
    #[error("{field}: held-out phrasing {phrasing:?} is also a training phrasing")]
    HeldoutOverlap { field: String, phrasing: String },
    #[error("{field}: {name:?} does not name a known entry")]
    UnknownReference { field: String, name: String },
    #[error("knowledge.{fact} is covered by no intent")]
    Uncovered { fact: String },
    #[error("{field}: {problem}")]
    Invalid { field: String, problem: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Domain {
    pub assistant: Assistant,
    pub orders: Orders,
    pub catalog: Catalog,
    pub chatter: Chatter,
    /// Business facts by id; each must be listed in some intent's `covers`.
    pub knowledge: BTreeMap<String, String>,
    pub intents: Vec<Intent>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Assistant {
    /// Sent by the service ahead of every dialog; the corpus uses it only to render ChatML.
    pub system_prompt: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Orders {
    pub prefix: String,
    /// Numbers are zero-padded to this many digits.
    pub digits: u32,
    /// Inclusive range every order number is drawn from.
    pub range: [u32; 2],
    /// Share of the numbers reserved for held-out dialogs. A fixed scramble of the number picks them, so both
    /// splits see every digit at every position and still never share a number.
    pub heldout_share: f64,
}

impl Orders {
    /// The order number for `n`, such as `NW-04217`.
    pub fn format(&self, n: u32) -> String {
        format!("{}{:0width$}", self.prefix, n, width = self.digits as usize)
    }

    /// Whether `n` belongs to the held-out split.
    pub fn is_heldout(&self, n: u32) -> bool {
        // SplitMix64's finaliser: neighbouring numbers land far apart, so the choice has no visible pattern.
        let mut x = u64::from(n).wrapping_add(0x9E37_79B9_7F4A_7C15);
        x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        x ^= x >> 31;
        (x as f64 / u64::MAX as f64) < self.heldout_share
    }
}

/// Words customers wrap around a request. Training dialogs add them to some phrasings so the model learns to
/// answer the request, not the greeting or sign-off around it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Chatter {
    /// Put before a phrasing, such as `Hi, `.
    pub openers: Vec<String>,
    /// Put after a phrasing, such as ` Thanks!`.
    pub closers: Vec<String>,
}

/// Products are made, not listed: a product line's pattern with a model name in `{name}`. Training dialogs draw
/// from hundreds of combinations, so a reply can only name the right product by copying it from the question.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Catalog {
    pub lines: Vec<ProductLine>,
    /// Model names for training dialogs.
    pub names: Vec<String>,
    /// Syllables that training dialogs also compose model names from (two or three, capitalized), so that
    /// naming the right product has to be learned as copying. Optional.
    #[serde(default)]
    pub name_syllables: Vec<String>,
    /// Model names that appear only in held-out dialogs.
    pub heldout_names: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProductLine {
    /// The product's name with `{name}` where the model name goes, such as `{name} 2-Person Tent`.
    pub pattern: String,
    /// Fills `{warranty}`, worded to follow "a" ("1-year", "lifetime").
    pub warranty: String,
}

impl ProductLine {
    pub fn product(&self, name: &str) -> Product {
        Product {
            name: self.pattern.replace("{name}", name),
            warranty: self.warranty.clone(),
        }
    }
}

/// One product as a dialog names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Product {
    pub name: String,
    pub warranty: String,
}

/// What a turn refers to. An order provides `{order}`; a product provides `{product}` and `{warranty}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SlotKind {
    Order,
    Product,
}

impl SlotKind {
    /// The placeholder every phrasing of an intent with this `slot` must contain.
    pub fn placeholder(self) -> &'static str {
        match self {
            SlotKind::Order => "order",
            SlotKind::Product => "product",
        }
    }

    /// Every placeholder a referent of this kind can fill in answers and facts.
    pub fn provides(self) -> &'static [&'static str] {
        match self {
            SlotKind::Order => &["order"],
            SlotKind::Product => &["product", "warranty"],
        }
    }
}

/// Where in a dialog an intent may be used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Position {
    #[default]
    Any,
    /// Only as the opening turn.
    First,
    /// Only as the closing turn of a dialog with more than one user turn.
    Last,
    /// Any turn but the first: thanks in the middle of a long conversation, or at its end.
    Later,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Intent {
    pub name: String,
    /// Ids from `[knowledge]` this intent teaches.
    pub covers: Vec<String>,
    /// The referent every phrasing names; it becomes the dialog's context for later follow-ups.
    #[serde(default)]
    pub slot: Option<SlotKind>,
    /// The referent this follow-up takes from an earlier turn; its phrasings name nothing.
    #[serde(default)]
    pub needs: Option<SlotKind>,
    /// If not empty, the intent may only directly follow one of these intents.
    #[serde(default)]
    pub after: Vec<String>,
    #[serde(default)]
    pub position: Position,
    pub phrasings: Vec<String>,
    /// Used only by held-out dialogs, so an eval measures generalisation to unseen wording.
    pub heldout_phrasings: Vec<String>,
    pub answer: String,
    /// Strings (templates, like the answer) a correct reply must contain.
    pub facts: Vec<String>,
}

impl Intent {
    /// The referent kind whose values fill this intent's templates, if any.
    pub fn referent(&self) -> Option<SlotKind> {
        self.slot.or(self.needs)
    }

    /// Whether the intent depends on the turn before it or on the dialog's context.
    pub fn is_contextual(&self) -> bool {
        self.needs.is_some() || !self.after.is_empty()
    }
}

impl Domain {
    /// Reads, parses and validates a domain file.
    pub fn load(path: &Path) -> Result<Self, DomainError> {
        let text = std::fs::read_to_string(path).map_err(|source| DomainError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text)
    }

    /// Parses and validates domain TOML.
    pub fn from_toml(text: &str) -> Result<Self, DomainError> {
        let domain: Domain = toml::from_str(text)?;
        domain.validate()?;
        Ok(domain)
    }

    pub fn intent(&self, name: &str) -> Option<&Intent> {
        self.intents.iter().find(|intent| intent.name == name)
    }

    fn validate(&self) -> Result<(), DomainError> {
        non_empty("assistant.system_prompt", &self.assistant.system_prompt)?;
        self.validate_orders()?;
        self.validate_catalog()?;
        for (field, words) in [
            ("chatter.openers", &self.chatter.openers),
            ("chatter.closers", &self.chatter.closers),
        ] {
            if words.is_empty() {
                return Err(DomainError::Empty { field: field.into() });
            }
            for (i, word) in words.iter().enumerate() {
                non_empty(&format!("{field}[{i}]"), word)?;
            }
        }
        if self.knowledge.is_empty() {
            return Err(DomainError::Empty {
                field: "knowledge".into(),
            });
        }
        for (id, statement) in &self.knowledge {
            non_empty(&format!("knowledge.{id}"), statement)?;
        }
        if self.intents.is_empty() {
            return Err(DomainError::Empty {
                field: "intents".into(),
            });
        }
        let mut names = BTreeSet::new();
        for intent in &self.intents {
            if !names.insert(intent.name.as_str()) {
                return Err(DomainError::Duplicate {
                    field: "intents.name".into(),
                    value: intent.name.clone(),
                });
            }
        }
        for intent in &self.intents {
            self.validate_intent(intent, &names)?;
        }
        // The generator needs something to say in an opening turn of any dialog.
        if !self
            .intents
            .iter()
            .any(|i| !i.is_contextual() && i.position == Position::Any)
        {
            return Err(DomainError::Empty {
                field: "intents (without needs, after or position)".into(),
            });
        }
        self.validate_heldout_disjoint()?;
        let covered: BTreeSet<&str> = self
            .intents
            .iter()
            .flat_map(|i| i.covers.iter().map(String::as_str))
            .collect();
        if let Some(fact) = self.knowledge.keys().find(|id| !covered.contains(id.as_str())) {
            return Err(DomainError::Uncovered { fact: fact.clone() });
        }
        Ok(())
    }

    fn validate_orders(&self) -> Result<(), DomainError> {
        let orders = &self.orders;
        non_empty("orders.prefix", &orders.prefix)?;
        // 10^9 is the largest power of ten below u32::MAX, so numbers always fit.
        if !(1..=9).contains(&orders.digits) {
            return Err(invalid("orders.digits", "must be between 1 and 9"));
        }
        let [lo, hi] = orders.range;
        if lo > hi {
            return Err(invalid("orders.range", "start is above end"));
        }
        if hi >= 10u32.pow(orders.digits) {
            return Err(invalid(
                "orders.range",
                &format!("end does not fit in {} digits", orders.digits),
            ));
        }
        if hi - lo < 99 {
            return Err(invalid("orders.range", "holds fewer than 100 numbers"));
        }
        if !(orders.heldout_share > 0.0 && orders.heldout_share < 1.0) {
            return Err(invalid("orders.heldout_share", "must be above 0 and below 1"));
        }
        // The generator draws until it hits a number of the split it needs: both splits must have one.
        let mut splits = (lo..=hi).map(|n| orders.is_heldout(n));
        if !(splits.clone().any(|held_out| held_out) && splits.any(|held_out| !held_out)) {
            return Err(invalid(
                "orders.heldout_share",
                "leaves one split without order numbers in orders.range",
            ));
        }
        Ok(())
    }

    fn validate_catalog(&self) -> Result<(), DomainError> {
        let catalog = &self.catalog;
        if catalog.lines.is_empty() {
            return Err(DomainError::Empty {
                field: "catalog.lines".into(),
            });
        }
        for (i, line) in catalog.lines.iter().enumerate() {
            let field = format!("catalog.lines[{i}]");
            non_empty(&format!("{field}.warranty"), &line.warranty)?;
            if line.pattern.matches("{name}").count() != 1 || placeholders(&line.pattern).count() != 1 {
                return Err(DomainError::SlotMismatch {
                    field: format!("{field}.pattern"),
                    expected: vec!["name".into()],
                });
            }
        }
        let mut seen = BTreeSet::new();
        for (field, names) in [
            ("catalog.names", &catalog.names),
            ("catalog.heldout_names", &catalog.heldout_names),
        ] {
            if names.is_empty() {
                return Err(DomainError::Empty { field: field.into() });
            }
            for (i, name) in names.iter().enumerate() {
                non_empty(&format!("{field}[{i}]"), name)?;
                if !seen.insert(name.as_str()) {
                    return Err(DomainError::Duplicate {
                        field: format!("{field}[{i}]"),
                        value: name.clone(),
                    });
                }
            }
        }
        for (i, syllable) in catalog.name_syllables.iter().enumerate() {
            let field = format!("catalog.name_syllables[{i}]");
            non_empty(&field, syllable)?;
            if !syllable.chars().all(char::is_alphabetic) {
                return Err(invalid(&field, "must be letters only"));
            }
        }
        Ok(())
    }

    fn validate_intent(&self, intent: &Intent, names: &BTreeSet<&str>) -> Result<(), DomainError> {
        let base = format!("intents.{}", intent.name);
        if intent.slot.is_some() && intent.needs.is_some() {
            return Err(invalid(&base, "sets both `slot` and `needs`"));
        }
        if intent.covers.is_empty() {
            return Err(DomainError::Empty {
                field: format!("{base}.covers"),
            });
        }
        for id in &intent.covers {
            if !self.knowledge.contains_key(id) {
                return Err(DomainError::UnknownReference {
                    field: format!("{base}.covers"),
                    name: id.clone(),
                });
            }
        }
        for name in &intent.after {
            if !names.contains(name.as_str()) {
                return Err(DomainError::UnknownReference {
                    field: format!("{base}.after"),
                    name: name.clone(),
                });
            }
        }

        let expected: Vec<String> = intent
            .slot
            .map(|kind| kind.placeholder().to_owned())
            .into_iter()
            .collect();
        let mut seen = BTreeSet::new();
        for (list, phrasings) in [
            ("phrasings", &intent.phrasings),
            ("heldout_phrasings", &intent.heldout_phrasings),
        ] {
            if phrasings.is_empty() {
                return Err(DomainError::Empty {
                    field: format!("{base}.{list}"),
                });
            }
            for (i, phrasing) in phrasings.iter().enumerate() {
                let field = format!("{base}.{list}[{i}]");
                non_empty(&field, phrasing)?;
                let found: BTreeSet<&str> = placeholders(phrasing).collect();
                if found.iter().copied().ne(expected.iter().map(String::as_str)) {
                    return Err(DomainError::SlotMismatch { field, expected });
                }
                if !seen.insert(normalize(phrasing)) {
                    return Err(DomainError::Duplicate {
                        field,
                        value: phrasing.clone(),
                    });
                }
            }
        }

        let provided = intent.referent().map_or(&[][..], SlotKind::provides);
        non_empty(&format!("{base}.answer"), &intent.answer)?;
        check_placeholders(&format!("{base}.answer"), &intent.answer, provided)?;
        if intent.facts.is_empty() {
            return Err(DomainError::Empty {
                field: format!("{base}.facts"),
            });
        }
        for (i, fact) in intent.facts.iter().enumerate() {
            let field = format!("{base}.facts[{i}]");
            non_empty(&field, fact)?;
            check_placeholders(&field, fact, provided)?;
            if !intent.answer.contains(fact.as_str()) {
                return Err(DomainError::FactNotInAnswer {
                    field,
                    fact: fact.clone(),
                });
            }
        }
        Ok(())
    }

    /// No held-out phrasing of any intent may equal (after [`normalize`]) a training phrasing of any intent,
    /// otherwise "unseen wording" in the eval would be a lie.
    fn validate_heldout_disjoint(&self) -> Result<(), DomainError> {
        let train: BTreeSet<String> = self
            .intents
            .iter()
            .flat_map(|i| i.phrasings.iter().map(|p| normalize(p)))
            .collect();
        for intent in &self.intents {
            for (i, phrasing) in intent.heldout_phrasings.iter().enumerate() {
                if train.contains(&normalize(phrasing)) {
                    return Err(DomainError::HeldoutOverlap {
                        field: format!("intents.{}.heldout_phrasings[{i}]", intent.name),
                        phrasing: phrasing.clone(),
                    });
                }
            }
        }
        Ok(())
    }
}

/// The comparison form of a phrasing: lowercase, single-spaced, without trailing punctuation. The generator's
/// casual variants (lowercase start, no final punctuation) normalize to the same string as their template.
pub fn normalize(text: &str) -> String {
    let words: Vec<&str> = text.split_whitespace().collect();
    words.join(" ").trim_end_matches(['?', '.', '!']).to_lowercase()
}

/// Names between `{` and `}` in a template. An unclosed `{` yields the rest of the text, which no slot
/// provides, so validation reports it.
pub fn placeholders(template: &str) -> impl Iterator<Item = &str> {
    template
        .split('{')
        .skip(1)
        .map(|rest| rest.split_once('}').map_or(rest, |(name, _)| name))
}

/// Replaces each `{name}` with its value from `slots`.
pub fn fill(template: &str, slots: &BTreeMap<String, String>) -> String {
    let mut text = template.to_owned();
    for (name, value) in slots {
        text = text.replace(&format!("{{{name}}}"), value);
    }
    text
}

fn check_placeholders(field: &str, template: &str, provided: &[&str]) -> Result<(), DomainError> {
    match placeholders(template).find(|name| !provided.contains(name)) {
        Some(name) => Err(DomainError::UnknownPlaceholder {
            field: field.to_owned(),
            placeholder: name.to_owned(),
        }),
        None => Ok(()),
    }
}

fn non_empty(field: &str, value: &str) -> Result<(), DomainError> {
    if value.trim().is_empty() {
        return Err(DomainError::Empty {
            field: field.to_owned(),
        });
    }
    Ok(())
}

fn invalid(field: &str, problem: &str) -> DomainError {
    DomainError::Invalid {
        field: field.to_owned(),
        problem: problem.to_owned(),
    }
}

/// The shipped Northwind domain, for tests across the crate.
#[cfg(test)]
pub(crate) const NORTHWIND_TOML: &str = include_str!("../../config/domains/northwind.toml");

#[cfg(test)]
pub(crate) fn northwind() -> Domain {
    Domain::from_toml(NORTHWIND_TOML).expect("northwind.toml is valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every domain file in `config/domains`, by name: what holds for one business holds for each.
    fn shipped_domains() -> Vec<(&'static str, Domain)> {
        [
            ("northwind", NORTHWIND_TOML),
            ("harbor-dental", include_str!("../../config/domains/harbor-dental.toml")),
        ]
        .into_iter()
        .map(|(name, text)| (name, Domain::from_toml(text).unwrap_or_else(|e| panic!("{name}: {e}"))))
        .collect()
    }

    #[test]
    fn every_domain_file_is_listed_here() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/domains");
        let mut files: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|f| f.ends_with(".toml"))
            .collect();
        files.sort();
        let mut listed: Vec<String> = shipped_domains().iter().map(|(n, _)| format!("{n}.toml")).collect();
        listed.sort();
        assert_eq!(files, listed);
    }

    /// The bundled model is trained on the domain's system prompt and served with the service's
    /// built-in one: they must stay the same text.
    #[test]
    fn northwind_system_prompt_is_the_services_prompt() {
        let service = include_str!("../../prompts/system.md").trim();
        assert_eq!(northwind().assistant.system_prompt, service);
    }

    #[test]
    fn domains_parse_and_validate() {
        for (name, domain) in shipped_domains() {
            assert!(
                domain.intents.len() >= 25,
                "{name}: only {} intents",
                domain.intents.len()
            );
            let catalog = &domain.catalog;
            assert!(
                catalog.lines.len() * catalog.names.len() >= 1000,
                "{name}: too few train products to force copying"
            );
            assert!(catalog.heldout_names.len() >= 10, "{name}");
            for intent in &domain.intents {
                assert!(
                    intent.phrasings.len() >= 8,
                    "{} has {} phrasings",
                    intent.name,
                    intent.phrasings.len()
                );
                assert!(
                    !intent.heldout_phrasings.is_empty(),
                    "{} has no held-out phrasings",
                    intent.name
                );
                for fact in &intent.facts {
                    assert!(
                        intent.answer.contains(fact.as_str()),
                        "{}: {fact:?} not in answer",
                        intent.name
                    );
                }
            }
        }
    }

    #[test]
    fn heldout_phrasings_are_unseen_and_knowledge_is_covered() {
        for (_, domain) in shipped_domains() {
            let train: BTreeSet<String> = domain
                .intents
                .iter()
                .flat_map(|i| i.phrasings.iter().map(|p| normalize(p)))
                .collect();
            for intent in &domain.intents {
                for phrasing in &intent.heldout_phrasings {
                    assert!(
                        !train.contains(&normalize(phrasing)),
                        "{}: {phrasing:?} is also trained",
                        intent.name
                    );
                }
            }
            for id in domain.knowledge.keys() {
                assert!(
                    domain.intents.iter().any(|i| i.covers.contains(id)),
                    "knowledge.{id} is uncovered"
                );
            }
        }
    }

    #[test]
    fn follow_ups_reuse_a_referent_some_intent_introduces() {
        for (_, domain) in shipped_domains() {
            for intent in domain.intents.iter().filter(|i| i.needs.is_some()) {
                assert!(
                    domain.intents.iter().any(|other| other.slot == intent.needs),
                    "{} needs a slot no intent introduces",
                    intent.name
                );
                let kind = intent.needs.unwrap();
                assert!(
                    intent.answer.contains(&format!("{{{}}}", kind.placeholder())),
                    "{}",
                    intent.name
                );
            }
        }
    }

    #[test]
    fn heldout_phrasing_that_is_trained_elsewhere_is_rejected() {
        let broken = NORTHWIND_TOML.replacen("\"Good evening\",", "\"Tell me a joke!\",", 1);
        match Domain::from_toml(&broken) {
            Err(DomainError::HeldoutOverlap { field, .. }) => {
                assert_eq!(field, "intents.greeting.heldout_phrasings[0]")
            }
            other => panic!("expected HeldoutOverlap, got {other:?}"),
        }
    }

    #[test]
    fn fact_missing_from_answer_is_rejected() {
        let broken = NORTHWIND_TOML.replacen("facts = [\"US and Canada only\"]", "facts = [\"worldwide\"]", 1);
        match Domain::from_toml(&broken) {
            Err(DomainError::FactNotInAnswer { field, fact }) => {
                assert_eq!(field, "intents.shipping_regions.facts[0]");
                assert_eq!(fact, "worldwide");
            }
            other => panic!("expected FactNotInAnswer, got {other:?}"),
        }
    }

    #[test]
    fn phrasing_without_its_slot_is_rejected() {
        let broken = NORTHWIND_TOML.replacen("\"Can you track {order}?\"", "\"Can you track it?\"", 1);
        match Domain::from_toml(&broken) {
            Err(DomainError::SlotMismatch { field, .. }) => assert_eq!(field, "intents.track_order.phrasings[1]"),
            other => panic!("expected SlotMismatch, got {other:?}"),
        }
    }

    #[test]
    fn unknown_field_bad_order_share_and_name_in_both_splits_are_rejected() {
        let typo = NORTHWIND_TOML.replacen("heldout_share", "held_out_share", 1);
        assert!(matches!(Domain::from_toml(&typo), Err(DomainError::Parse(_))));
        for share in ["heldout_share = 1.0", "heldout_share = 0.000001"] {
            let broken = NORTHWIND_TOML.replacen("heldout_share = 0.2", share, 1);
            match Domain::from_toml(&broken) {
                Err(DomainError::Invalid { field, .. }) => assert_eq!(field, "orders.heldout_share"),
                other => panic!("{share}: expected Invalid, got {:?}", other.err()),
            }
        }
        let both = NORTHWIND_TOML.replacen("\"Solstice\",", "\"Aspen\",", 1);
        match Domain::from_toml(&both) {
            Err(DomainError::Duplicate { field, value }) => {
                assert_eq!((field.as_str(), value.as_str()), ("catalog.heldout_names[0]", "Aspen"))
            }
            other => panic!("expected Duplicate, got {:?}", other.err()),
        }
    }

    #[test]
    fn order_numbers_split_by_share_across_every_leading_digit() {
        let orders = northwind().orders;
        let [lo, hi] = orders.range;
        let heldout: Vec<u32> = (lo..=hi).filter(|&n| orders.is_heldout(n)).collect();
        let share = heldout.len() as f64 / f64::from(hi - lo + 1);
        assert!((share - orders.heldout_share).abs() < 0.01, "held-out share {share}");
        let lead = |n: &u32| n / 10u32.pow(orders.digits - 1);
        let heldout_leads: BTreeSet<u32> = heldout.iter().map(lead).collect();
        let train_leads: BTreeSet<u32> = (lo..=hi).filter(|&n| !orders.is_heldout(n)).map(|n| lead(&n)).collect();
        assert_eq!(heldout_leads, train_leads);
    }

    #[test]
    fn normalize_and_fill() {
        assert_eq!(normalize("  Where is   my Order?! "), "where is my order");
        let slots = BTreeMap::from([("order".to_owned(), "NW-01234".to_owned())]);
        assert_eq!(
            fill("Order {order} ships {order}.", &slots),
            "Order NW-01234 ships NW-01234."
        );
        assert_eq!(placeholders("a {b} c {d").collect::<Vec<_>>(), ["b", "d"]);
        let orders = northwind().orders;
        assert_eq!(orders.format(4217), "NW-04217");
    }
}
