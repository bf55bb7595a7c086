//! Quality evaluation on held-out dialogs through the real inference paths: the diffusion model
//! through an [`Engine`], its autoregressive twin through llama.cpp's causal decode
//! ([`crate::raw_decode`]).
//!
//! Every assistant turn of a held-out dialog is generated from the gold history before it
//! (teacher forcing) and scored: intent (the reply is closest to answers of the expected intent
//! in the reference corpus), facts (every expected fact appears), slots (the order number or
//! product of the dialog appears verbatim), exact match, and tokens per step.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use dllm_chat::engine::{ChatTurn, DecodeOptions, Engine, EngineError, GenerateRequest};
use dllm_train::corpus::{CorpusError, Dialog, Turn};

/// Errors from evaluation.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(transparent)]
    Corpus(#[from] CorpusError),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// Reads a JSONL dialog file of `dllm-train corpus` (`train.jsonl`, `heldout.jsonl`). A line that
/// does not match the corpus schema, a misspelt field included, is an error naming its line.
pub fn read_dialogs(path: &Path) -> Result<Vec<Dialog>, EvalError> {
    Ok(dllm_train::corpus::read_jsonl(path)?)
}

/// What a user turn expects of the reply to it.
#[derive(Debug, Clone, Copy)]
struct Expected<'a> {
    content: &'a str,
    /// The turn's position among the dialog's user turns, from 1.
    turn: usize,
    intent: &'a str,
    facts: &'a [String],
    slots: &'a BTreeMap<String, String>,
}

/// Words of a reply with digit runs replaced, so answers of one intent compare alike whatever
/// order number or price they mention.
fn words(text: &str) -> HashSet<String> {
    text.to_lowercase()
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(|w| {
            if w.chars().all(|c| c.is_ascii_digit()) {
                "#".to_owned()
            } else {
                w.to_owned()
            }
        })
        .collect()
}

/// `text` with each slot value (order number, product, warranty) replaced by its placeholder, so answers
/// of one intent compare alike whichever order or product they name.
fn without_slots(text: &str, slots: &BTreeMap<String, String>) -> String {
    let mut values: Vec<(&String, &String)> = slots.iter().collect();
    // Longer values first, so a product name is replaced before any shorter value inside it.
    values.sort_by_key(|(_, value)| std::cmp::Reverse(value.len()));
    values
        .into_iter()
        .filter(|(_, value)| !value.is_empty())
        .fold(text.to_owned(), |text, (key, value)| {
            text.replace(value.as_str(), &format!("{{{key}}}"))
        })
}

/// Assigns a reply to the answer template it overlaps most (Jaccard on words, slot values replaced by
/// their placeholders). A template can belong to several intents ("return order NW-1" and "can I
/// return it?" get the same answer); a reply is right for any of them.
#[derive(Clone)]
pub struct IntentClassifier {
    templates: Vec<(HashSet<String>, BTreeSet<String>)>,
}

impl IntentClassifier {
    /// Reference answers: every (user intent -> following assistant reply) pair of `dialogs`.
    pub fn new(dialogs: &[Dialog]) -> Self {
        let mut by_template: BTreeMap<Vec<String>, BTreeSet<String>> = BTreeMap::new();
        for d in dialogs {
            for pair in d.turns.windows(2) {
                if let [Turn::User { intent, slots, .. }, Turn::Assistant { content }] = pair {
                    let mut key: Vec<String> = words(&without_slots(content, slots)).into_iter().collect();
                    key.sort();
                    by_template.entry(key).or_default().insert(intent.clone());
                }
            }
        }
        let templates = by_template
            .into_iter()
            .map(|(key, intents)| (key.into_iter().collect(), intents))
            .collect();
        Self { templates }
    }

    /// Whether the template closest to `reply` (ties included) belongs to `intent`. `slots` are the
    /// values the turn is about; in the reply they count as their placeholders. A reply that
    /// shares no word with any template (an empty one among them) is wrong for every intent:
    /// otherwise every template would tie at 0 and it would count as right.
    pub fn matches(&self, reply: &str, slots: &BTreeMap<String, String>, intent: &str) -> bool {
        let w = words(&without_slots(reply, slots));
        let scored: Vec<(f32, &BTreeSet<String>)> = self
            .templates
            .iter()
            .map(|(template, intents)| {
                let inter = template.intersection(&w).count() as f32;
                let union = template.union(&w).count().max(1) as f32;
                (inter / union, intents)
            })
            .collect();
        let best = scored.iter().map(|(score, _)| *score).fold(f32::NEG_INFINITY, f32::max);
        if best <= 0.0 {
            return false;
        }
        scored
            .iter()
            .any(|(score, intents)| *score == best && intents.contains(intent))
    }
}

/// Scores of one evaluation run.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub replies: usize,
    pub intent_correct: usize,
    /// Replies to turns that expect facts; turns that expect none are not scored for facts.
    pub fact_turns: usize,
    pub facts_correct: usize,
    pub slot_turns: usize,
    pub slots_correct: usize,
    pub exact: usize,
    /// Replies with a doubled or fused piece the gold reply does not have ([`doubled_piece`]).
    pub doubled: usize,
    pub completion_tokens: usize,
    pub steps: usize,
    pub latencies: Vec<Duration>,
    /// Every scored reply, in order, for inspection (`dllm-tools eval --show`).
    pub samples: Vec<Sample>,
}

/// One scored reply.
#[derive(Debug, Clone)]
pub struct Sample {
    pub user: String,
    pub intent: String,
    pub gold: String,
    pub reply: String,
    pub intent_correct: bool,
    /// `None` for a turn that expects no facts.
    pub facts_correct: Option<bool>,
    /// `None` for a turn that names no order or product.
    pub slot_correct: Option<bool>,
    /// The turn's position among the dialog's user turns, from 1.
    pub turn: usize,
    /// Prompt tokens the reply was generated from (system prompt and history included).
    pub prompt_tokens: usize,
}

/// Turn positions reported apart by [`Report::by_turn`], inclusive; later turns go to a last `13+` row.
pub const TURN_BUCKETS: [(usize, usize); 4] = [(1, 2), (3, 5), (6, 8), (9, 12)];
/// Lower bounds of the prompt length buckets of [`Report::by_prompt_length`], in tokens.
pub const PROMPT_BUCKETS: [usize; 4] = [0, 128, 256, 512];

/// The row of [`Report::by_turn`] a user turn at position `turn` (from 1) lands in.
pub fn turn_bucket(turn: usize) -> String {
    TURN_BUCKETS
        .iter()
        .find(|(lo, hi)| (*lo..=*hi).contains(&turn))
        .map(|(lo, hi)| format!("{lo}-{hi}"))
        .unwrap_or_else(|| format!("{}+", TURN_BUCKETS[TURN_BUCKETS.len() - 1].1 + 1))
}

/// The row of [`Report::by_prompt_length`] a prompt of `tokens` tokens lands in: `<128`, `128-255`,
/// `256-511`, `512+`.
pub fn prompt_bucket(tokens: usize) -> String {
    let i = PROMPT_BUCKETS.iter().rposition(|&lo| tokens >= lo).unwrap_or(0);
    match (i, PROMPT_BUCKETS.get(i + 1)) {
        (0, Some(next)) => format!("<{next}"),
        (_, Some(next)) => format!("{}-{}", PROMPT_BUCKETS[i], next - 1),
        (_, None) => format!("{}+", PROMPT_BUCKETS[i]),
    }
}

impl Report {
    fn score(
        &mut self,
        classifier: &IntentClassifier,
        user: Expected<'_>,
        prompt_tokens: usize,
        gold: &str,
        reply: &str,
    ) {
        self.replies += 1;
        let intent_correct = classifier.matches(reply, user.slots, user.intent);
        self.intent_correct += usize::from(intent_correct);
        let lower = reply.to_lowercase();
        let facts_correct =
            (!user.facts.is_empty()).then(|| user.facts.iter().all(|f| lower.contains(&f.to_lowercase())));
        if let Some(ok) = facts_correct {
            self.fact_turns += 1;
            self.facts_correct += usize::from(ok);
        }
        let slots: Vec<&String> = ["order", "product"].iter().filter_map(|k| user.slots.get(*k)).collect();
        let slot_correct = (!slots.is_empty()).then(|| slots.iter().all(|s| reply.contains(s.as_str())));
        if let Some(ok) = slot_correct {
            self.slot_turns += 1;
            self.slots_correct += usize::from(ok);
        }
        if reply.trim() == gold.trim() {
            self.exact += 1;
        }
        self.doubled += usize::from(doubled_piece(reply, gold).is_some());
        self.samples.push(Sample {
            user: user.content.to_owned(),
            intent: user.intent.to_owned(),
            gold: gold.to_owned(),
            reply: reply.to_owned(),
            intent_correct,
            facts_correct,
            slot_correct,
            turn: user.turn,
            prompt_tokens,
        });
    }

    /// A markdown table of intent, fact and slot accuracy by user turn position ([`TURN_BUCKETS`]).
    pub fn by_turn(&self) -> String {
        let mut rows: Vec<String> = TURN_BUCKETS.iter().map(|(lo, _)| turn_bucket(*lo)).collect();
        rows.push(turn_bucket(usize::MAX));
        self.breakdown("turns", &rows, |s| turn_bucket(s.turn))
    }

    /// A markdown table of intent, fact and slot accuracy by prompt length in tokens ([`PROMPT_BUCKETS`]).
    pub fn by_prompt_length(&self) -> String {
        let rows: Vec<String> = PROMPT_BUCKETS.iter().map(|&lo| prompt_bucket(lo)).collect();
        self.breakdown("prompt tokens", &rows, |s| prompt_bucket(s.prompt_tokens))
    }

    /// One row per bucket of `rows` (in that order; a bucket without replies only when it is one of
    /// the first four, so the usual rows always show), each sample in the bucket `of` names.
    fn breakdown(&self, title: &str, rows: &[String], of: impl Fn(&Sample) -> String) -> String {
        #[derive(Default)]
        struct Tally {
            n: usize,
            intent: usize,
            fact_turns: usize,
            facts: usize,
            slot_turns: usize,
            slots: usize,
        }
        let mut tally: HashMap<String, Tally> = HashMap::new();
        for s in &self.samples {
            let t = tally.entry(of(s)).or_default();
            t.n += 1;
            t.intent += usize::from(s.intent_correct);
            t.fact_turns += usize::from(s.facts_correct.is_some());
            t.facts += usize::from(s.facts_correct == Some(true));
            t.slot_turns += usize::from(s.slot_correct.is_some());
            t.slots += usize::from(s.slot_correct == Some(true));
        }
        let cell = |ok: usize, n: usize| {
            if n == 0 {
                "n/a".to_owned()
            } else {
                format!("{:.1}% ({n})", Self::pct(ok, n))
            }
        };
        let mut table = format!("| {title} | replies | intent | fact | slot |\n| --- | --- | --- | --- | --- |\n");
        for (i, row) in rows.iter().enumerate() {
            let t = tally.remove(row).unwrap_or_default();
            if t.n == 0 && i >= PROMPT_BUCKETS.len().min(TURN_BUCKETS.len()) {
                continue;
            }
            table.push_str(&format!(
                "| {row} | {} | {} | {} | {} |\n",
                t.n,
                cell(t.intent, t.n),
                cell(t.facts, t.fact_turns),
                cell(t.slots, t.slot_turns)
            ));
        }
        table
    }

    /// A markdown table of intent and fact accuracy per expected intent, weakest first.
    pub fn by_intent(&self) -> String {
        // Per intent: replies, intent right, turns with facts, facts right.
        let mut tally: HashMap<&str, (usize, usize, usize, usize)> = HashMap::new();
        for s in &self.samples {
            let entry = tally.entry(s.intent.as_str()).or_default();
            entry.0 += 1;
            entry.1 += usize::from(s.intent_correct);
            entry.2 += usize::from(s.facts_correct.is_some());
            entry.3 += usize::from(s.facts_correct == Some(true));
        }
        let mut rows: Vec<_> = tally.into_iter().collect();
        rows.sort_by(|a, b| {
            let share = |(n, ok, _, _): (usize, usize, usize, usize)| ok as f64 / n as f64;
            share(a.1).total_cmp(&share(b.1)).then(a.0.cmp(b.0))
        });
        let mut table = String::from("| intent | replies | intent | fact |\n| --- | --- | --- | --- |\n");
        for (intent, (n, intent_ok, fact_turns, facts_ok)) in rows {
            let fact = if fact_turns == 0 {
                "n/a".to_owned()
            } else {
                format!("{:.0}%", Self::pct(facts_ok, fact_turns))
            };
            table.push_str(&format!(
                "| {intent} | {n} | {:.0}% | {fact} |\n",
                Self::pct(intent_ok, n)
            ));
        }
        table
    }

    /// The first `n` samples as readable lines.
    pub fn show(&self, n: usize) -> String {
        self.samples
            .iter()
            .take(n)
            .map(|s| {
                format!(
                    "user:  {}\nintent: {}\ngold:  {}\nreply: {}\n",
                    s.user, s.intent, s.gold, s.reply
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Every reply with a doubled or fused piece, the piece beside the reply and the gold reply.
    pub fn doubled_replies(&self) -> String {
        self.samples
            .iter()
            .filter_map(|s| {
                doubled_piece(&s.reply, &s.gold)
                    .map(|piece| format!("piece: {piece}\nreply: {}\ngold:  {}\n", s.reply, s.gold))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn pct(n: usize, d: usize) -> f64 {
        if d == 0 {
            0.0
        } else {
            100.0 * n as f64 / d as f64
        }
    }

    pub fn intent_accuracy(&self) -> f64 {
        Self::pct(self.intent_correct, self.replies)
    }
    /// Of the replies to turns that expect facts.
    pub fn fact_accuracy(&self) -> f64 {
        Self::pct(self.facts_correct, self.fact_turns)
    }
    pub fn slot_accuracy(&self) -> f64 {
        Self::pct(self.slots_correct, self.slot_turns)
    }
    pub fn exact_match(&self) -> f64 {
        Self::pct(self.exact, self.replies)
    }
    pub fn doubled_rate(&self) -> f64 {
        Self::pct(self.doubled, self.replies)
    }
    pub fn tokens_per_step(&self) -> f64 {
        self.completion_tokens as f64 / self.steps.max(1) as f64
    }
    pub fn median_latency(&self) -> Duration {
        let mut l = self.latencies.clone();
        l.sort();
        l.get(l.len() / 2).copied().unwrap_or_default()
    }

    /// A markdown table row: name | replies | intent | fact | slot | exact | doubled | tokens/step |
    /// median ms.
    pub fn row(&self, name: &str) -> String {
        format!(
            "| {name} | {} | {:.1}% | {:.1}% ({} turns) | {:.1}% ({} turns) | {:.1}% | {:.1}% ({}) | {:.2} | {:.0} |",
            self.replies,
            self.intent_accuracy(),
            self.fact_accuracy(),
            self.fact_turns,
            self.slot_accuracy(),
            self.slot_turns,
            self.exact_match(),
            self.doubled_rate(),
            self.doubled,
            self.tokens_per_step(),
            self.median_latency().as_secs_f64() * 1e3
        )
    }
}

pub const TABLE_HEADER: &str = "| model | replies | intent | fact | slot | exact | doubled | tokens/step | median ms |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |";

/// The first glitch of `reply` where two neighbouring positions settled on the same piece: a word
/// said twice in a row ("arrives arrives"), or a word that is a gold word with a piece of it
/// repeated in place ("YesYes", "$14.955", "-year-year"). Only what the gold reply does not
/// have itself counts, so "NW-55123" in both is no glitch.
pub fn doubled_piece(reply: &str, gold: &str) -> Option<String> {
    let norm = |w: &str| {
        w.trim_matches(|c: char| !c.is_alphanumeric() && c != '$' && c != '-')
            .to_lowercase()
    };
    let gold_words: Vec<String> = gold.split_whitespace().map(norm).collect();
    let gold_pairs: HashSet<(&str, &str)> = gold_words.windows(2).map(|p| (p[0].as_str(), p[1].as_str())).collect();
    let words: Vec<String> = reply.split_whitespace().map(norm).collect();
    for pair in words.windows(2) {
        if !pair[0].is_empty() && pair[0] == pair[1] && !gold_pairs.contains(&(pair[0].as_str(), pair[1].as_str())) {
            return Some(format!("{} {}", pair[0], pair[1]));
        }
    }
    let known: HashSet<&str> = gold_words.iter().map(String::as_str).collect();
    for word in &words {
        if word.is_empty() || known.contains(word.as_str()) {
            continue;
        }
        let chars: Vec<char> = word.chars().collect();
        for len in 1..=chars.len() / 2 {
            for start in 0..=chars.len() - 2 * len {
                if chars[start..start + len] != chars[start + len..start + 2 * len] {
                    continue;
                }
                let once: String = chars[..start + len].iter().chain(&chars[start + 2 * len..]).collect();
                if known.contains(once.as_str()) {
                    return Some(word.clone());
                }
            }
        }
    }
    None
}

/// (history before the turn, what the user turn expects, the gold reply) for every assistant turn
/// that answers a user turn.
fn cases(dialogs: &[Dialog]) -> impl Iterator<Item = (Vec<ChatTurn>, Expected<'_>, &str)> {
    dialogs.iter().flat_map(|d| {
        d.turns.windows(2).enumerate().filter_map(move |(i, p)| {
            let turn = d.turns[..=i].iter().filter(|t| matches!(t, Turn::User { .. })).count();
            let [Turn::User {
                content,
                intent,
                facts,
                slots,
            }, Turn::Assistant { content: gold }] = p
            else {
                return None;
            };
            let turns = d.turns[..=i]
                .iter()
                .map(|t| ChatTurn {
                    role: t.role().to_owned(),
                    content: t.content().to_owned(),
                })
                .collect();
            let expected = Expected {
                content,
                turn,
                intent,
                facts,
                slots,
            };
            Some((turns, expected, gold.as_str()))
        })
    })
}

/// Evaluates a diffusion engine.
pub async fn evaluate_engine(
    engine: &dyn Engine,
    system: &str,
    dialogs: &[Dialog],
    classifier: &IntentClassifier,
    options: &DecodeOptions,
) -> Result<Report, EvalError> {
    let mut report = Report::default();
    for (turns, user, gold) in cases(dialogs) {
        let request = GenerateRequest {
            system: system.to_owned(),
            turns,
            options: options.clone(),
        };
        let outcome = dllm_chat::engine::complete(engine, request).await?;
        let completion = outcome.completion;
        report.latencies.push(outcome.total);
        report.completion_tokens += completion.completion_tokens;
        report.steps += completion.steps;
        report.score(classifier, user, outcome.prompt_tokens, gold, &completion.text);
    }
    Ok(report)
}

/// Evaluates an autoregressive (causal, `llama`) GGUF with llama.cpp's greedy decode loop
/// ([`crate::raw_decode`]): one token per step. Blocking.
pub fn evaluate_autoregressive(
    model_path: &Path,
    threads: usize,
    context_length: usize,
    max_tokens: usize,
    system: &str,
    dialogs: &[Dialog],
    classifier: &IntentClassifier,
) -> Result<Report, EvalError> {
    let cases: Vec<_> = cases(dialogs).collect();
    let chats: Vec<Vec<ChatTurn>> = cases
        .iter()
        .map(|(turns, _, _)| {
            let mut chat = vec![ChatTurn {
                role: "system".into(),
                content: system.to_owned(),
            }];
            chat.extend(turns.iter().cloned());
            chat
        })
        .collect();
    let replies = crate::raw_decode::replies(model_path, threads, context_length, max_tokens, &chats)?;
    let mut report = Report::default();
    for ((_, user, gold), reply) in cases.into_iter().zip(replies) {
        report.latencies.push(reply.latency);
        report.completion_tokens += reply.completion_tokens;
        report.steps += reply.completion_tokens.max(1);
        report.score(classifier, user, reply.prompt_tokens, gold, &reply.text);
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dialog(pairs: &[(&str, &str, &str)]) -> Dialog {
        let mut turns = vec![];
        for (intent, user, reply) in pairs {
            turns.push(Turn::User {
                content: user.to_string(),
                intent: intent.to_string(),
                facts: vec![],
                slots: BTreeMap::new(),
            });
            turns.push(Turn::Assistant {
                content: reply.to_string(),
            });
        }
        Dialog {
            id: "train-000000".into(),
            split: dllm_train::corpus::Split::Train,
            turns,
        }
    }

    fn slots(turn: &mut Turn) -> &mut BTreeMap<String, String> {
        match turn {
            Turn::User { slots, .. } => slots,
            Turn::Assistant { .. } => panic!("an assistant turn has no slots"),
        }
    }

    /// A dialog as `dllm-train corpus` writes it (the example of `training/README.md`).
    const CORPUS_LINE: &str = concat!(
        r#"{"id":"train-000001","split":"train","turns":["#,
        r#"{"role":"user","content":"Has my order shipped?","intent":"track_order_ask","facts":["order number","NW-"],"slots":{}},"#,
        r#"{"role":"assistant","content":"I can look that up. What's your order number? It starts with NW- followed by 5 digits."},"#,
        r#"{"role":"user","content":"The number is NW-75369","intent":"give_order_number","facts":["NW-75369","tracking link"],"slots":{"order":"NW-75369"}},"#,
        r#"{"role":"assistant","content":"Thanks! I looked up order NW-75369. When it ships, we email you the tracking link, so keep an eye on your inbox."}]}"#
    );

    fn read_lines(lines: &[&str]) -> Result<Vec<Dialog>, EvalError> {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("dialogs.jsonl");
        std::fs::write(&file, lines.join("\n") + "\n").unwrap();
        read_dialogs(&file)
    }

    #[test]
    fn a_line_of_the_corpus_format_parses_into_scored_cases() {
        let dialogs = read_lines(&[CORPUS_LINE]).unwrap();
        assert_eq!(dialogs.len(), 1);
        assert_eq!(dialogs[0].turns.len(), 4);
        let cases: Vec<_> = cases(&dialogs).collect();
        assert_eq!(cases.len(), 2, "one case per assistant turn");
        let (history, expected, gold) = &cases[1];
        assert_eq!(history.len(), 3, "the gold history up to the user turn");
        assert_eq!(history[2].role, "user");
        assert_eq!(expected.content, "The number is NW-75369");
        assert_eq!(expected.intent, "give_order_number");
        assert_eq!(expected.facts, ["NW-75369", "tracking link"]);
        assert_eq!(expected.slots.get("order").map(String::as_str), Some("NW-75369"));
        assert!(gold.starts_with("Thanks! I looked up order NW-75369."));
    }

    #[test]
    fn a_misspelt_required_field_is_an_error_naming_the_line() {
        for (field, misspelt) in [
            ("intent", "intnet"),
            ("facts", "fact"),
            ("slots", "slot"),
            ("content", "contents"),
            ("turns", "turn"),
            ("split", "splt"),
        ] {
            let broken = CORPUS_LINE.replace(&format!("\"{field}\""), &format!("\"{misspelt}\""));
            let error = read_lines(&[CORPUS_LINE, &broken])
                .err()
                .unwrap_or_else(|| panic!("{misspelt} instead of {field} was read"))
                .to_string();
            assert!(
                error.contains("line 2") && error.contains(&format!("missing field `{field}`")),
                "{error}"
            );
        }
    }

    #[test]
    fn classifier_picks_the_closest_template_whatever_slot_it_names() {
        let mut reference = vec![dialog(&[
            ("returns", "return?", "Returns are accepted within 30 days of delivery."),
            (
                "track",
                "where?",
                "Order NW-12345 ships soon; the tracking link is emailed.",
            ),
            (
                "track_followup",
                "and it?",
                "Order NW-12345 ships soon; the tracking link is emailed.",
            ),
        ])];
        slots(&mut reference[0].turns[2]).insert("order".into(), "NW-12345".into());
        slots(&mut reference[0].turns[4]).insert("order".into(), "NW-12345".into());
        let c = IntentClassifier::new(&reference);
        assert_eq!(c.templates.len(), 2, "one template per distinct answer");
        let slots = BTreeMap::from([("order".to_owned(), "NW-99999".to_owned())]);
        let reply = "Order NW-99999 ships soon; the tracking link is emailed.";
        // Two intents share the template: the reply is right for both and wrong for the third.
        assert!(c.matches(reply, &slots, "track"));
        assert!(c.matches(reply, &slots, "track_followup"));
        assert!(!c.matches(reply, &slots, "returns"));
        assert!(c.matches("returns within 30 days", &BTreeMap::new(), "returns"));
    }

    #[test]
    fn report_scores_facts_slots_and_exact_match() {
        let reference = vec![dialog(&[("track", "q", "Order NW-1 ships.")])];
        let c = IntentClassifier::new(&reference);
        let facts = vec!["ships".to_owned()];
        let slots = BTreeMap::from([("order".to_owned(), "NW-77777".to_owned())]);
        let user = Expected {
            content: "q",
            turn: 1,
            intent: "track",
            facts: &facts,
            slots: &slots,
        };
        let mut r = Report::default();
        r.score(&c, user, 0, "Order NW-77777 ships.", "Order NW-77777 ships.");
        r.score(&c, user, 0, "Order NW-77777 ships.", "Order NW-11111 is late.");
        assert_eq!(
            (
                r.replies,
                r.exact,
                r.fact_turns,
                r.facts_correct,
                r.slot_turns,
                r.slots_correct
            ),
            (2, 1, 2, 1, 2, 1)
        );
        assert_eq!(r.intent_correct, 2);
        assert!(
            r.by_intent().contains("| track | 2 | 100% | 50% |"),
            "{}",
            r.by_intent()
        );
    }

    fn track_classifier() -> IntentClassifier {
        IntentClassifier::new(&[dialog(&[
            ("track", "where?", "Order NW-1 ships today."),
            ("returns", "return?", "Returns are accepted within 30 days."),
        ])])
    }

    #[test]
    fn an_empty_or_unrelated_reply_is_wrong_for_every_intent() {
        let c = track_classifier();
        let none = BTreeMap::new();
        for reply in ["", "   ", "zebra quantum marmalade"] {
            assert!(!c.matches(reply, &none, "track"), "{reply:?} must not count as track");
            assert!(
                !c.matches(reply, &none, "returns"),
                "{reply:?} must not count as returns"
            );
        }
        assert!(c.matches("it ships today", &none, "track"));
    }

    #[test]
    fn turns_without_expected_facts_are_not_scored_for_facts() {
        let c = track_classifier();
        let (facts, none) = (vec!["30 days".to_owned()], Vec::new());
        let slots = BTreeMap::new();
        let with = Expected {
            content: "return?",
            turn: 1,
            intent: "returns",
            facts: &facts,
            slots: &slots,
        };
        let without = Expected { facts: &none, ..with };
        let mut r = Report::default();
        r.score(&c, without, 0, "Returns are accepted within 30 days.", "");
        assert_eq!((r.fact_turns, r.facts_correct), (0, 0), "no facts expected: not scored");
        assert_eq!(r.fact_accuracy(), 0.0, "nothing scored is not 100%");
        r.score(
            &c,
            with,
            0,
            "Returns are accepted within 30 days.",
            "Returns take 14 days.",
        );
        r.score(
            &c,
            with,
            0,
            "Returns are accepted within 30 days.",
            "Returns within 30 DAYS.",
        );
        assert_eq!((r.fact_turns, r.facts_correct), (2, 1));
        assert_eq!(r.fact_accuracy(), 50.0);
        assert_eq!(r.intent_correct, 2, "the empty reply was wrong, both others right");
        assert!(r.row("m").contains("50.0% (2 turns)"), "{}", r.row("m"));
        assert!(
            r.by_intent().contains("| returns | 3 | 67% | 50% |"),
            "{}",
            r.by_intent()
        );
    }

    #[test]
    fn doubled_and_fused_pieces_are_found_unless_the_gold_has_them() {
        let gold = "Standard shipping is $14.95 and takes 3-5 business days after your return arrives.";
        for (reply, found) in [
            (
                "Standard shipping is $14.955 and takes 3-5 business days.",
                Some("$14.955"),
            ),
            (
                "within 5-7 business days after your return arrives arrives",
                Some("arrives arrives"),
            ),
            ("StandardStandard shipping is $14.95", Some("standardstandard")),
            (
                "Standard shipping is $14.95 and takes 3-5 business days after your return arrives.",
                None,
            ),
            ("Shipping takes days and days", None),
            ("", None),
        ] {
            assert_eq!(doubled_piece(reply, gold).as_deref(), found, "{reply:?}");
        }
        // What the gold reply itself repeats is no glitch.
        assert_eq!(
            doubled_piece("Order NW-55123 is on its way", "Order NW-55123 is on its way"),
            None
        );
        assert_eq!(doubled_piece("bye bye!", "Bye bye! Have a great day."), None);
        assert_eq!(
            doubled_piece("All gear has a 1-year-year warranty", "All gear has a 1-year warranty"),
            Some("1-year-year".into())
        );
    }

    #[test]
    fn a_reply_without_the_turns_slot_value_fails_the_slot() {
        let c = track_classifier();
        let slots = BTreeMap::from([("order".to_owned(), "NW-55555".to_owned())]);
        let user = Expected {
            content: "where is NW-55555?",
            turn: 1,
            intent: "track",
            facts: &[],
            slots: &slots,
        };
        let mut r = Report::default();
        r.score(
            &c,
            user,
            0,
            "Order NW-55555 ships today.",
            "Order NW-12345 ships today.",
        );
        r.score(
            &c,
            user,
            0,
            "Order NW-55555 ships today.",
            "Order NW-55555 ships today.",
        );
        assert_eq!((r.slot_turns, r.slots_correct, r.exact), (2, 1, 1));
    }

    #[test]
    fn turn_positions_land_in_their_bucket() {
        for (turn, bucket) in [
            (1, "1-2"),
            (2, "1-2"),
            (3, "3-5"),
            (5, "3-5"),
            (6, "6-8"),
            (8, "6-8"),
            (9, "9-12"),
            (12, "9-12"),
            (13, "13+"),
            (40, "13+"),
        ] {
            assert_eq!(turn_bucket(turn), bucket, "turn {turn}");
        }
    }

    #[test]
    fn prompt_lengths_land_in_their_bucket() {
        for (tokens, bucket) in [
            (0, "<128"),
            (127, "<128"),
            (128, "128-255"),
            (255, "128-255"),
            (256, "256-511"),
            (511, "256-511"),
            (512, "512+"),
            (4096, "512+"),
        ] {
            assert_eq!(prompt_bucket(tokens), bucket, "{tokens} tokens");
        }
    }

    #[test]
    fn cases_number_user_turns_from_one() {
        let d = dialog(&[("a", "1", "r1"), ("b", "2", "r2"), ("c", "3", "r3")]);
        let turns: Vec<(usize, usize)> = cases(std::slice::from_ref(&d))
            .map(|(history, expected, _)| (expected.turn, history.len()))
            .collect();
        // The history before turn n holds 2(n - 1) turns and the user turn itself.
        assert_eq!(turns, vec![(1, 1), (2, 3), (3, 5)]);
    }

    #[test]
    fn by_turn_and_by_prompt_length_split_the_scores() {
        let c = track_classifier();
        let facts = vec!["ships".to_owned()];
        let slots = BTreeMap::from([("order".to_owned(), "NW-55555".to_owned())]);
        let at = |turn| Expected {
            content: "where is NW-55555?",
            turn,
            intent: "track",
            facts: &facts,
            slots: &slots,
        };
        let gold = "Order NW-55555 ships today.";
        let mut r = Report::default();
        // Turns 1 and 2: right, short prompts.
        r.score(&c, at(1), 90, gold, gold);
        r.score(&c, at(2), 130, gold, gold);
        // Turn 7: wrong order number, still the track answer; a 300-token prompt.
        r.score(&c, at(7), 300, gold, "Order NW-12345 ships today.");
        // Turn 10: an unrelated reply, a 600-token prompt.
        r.score(&c, at(10), 600, gold, "zebra quantum marmalade");
        let by_turn = r.by_turn();
        for row in [
            "| 1-2 | 2 | 100.0% (2) | 100.0% (2) | 100.0% (2) |",
            "| 3-5 | 0 | n/a | n/a | n/a |",
            "| 6-8 | 1 | 100.0% (1) | 100.0% (1) | 0.0% (1) |",
            "| 9-12 | 1 | 0.0% (1) | 0.0% (1) | 0.0% (1) |",
        ] {
            assert!(by_turn.contains(row), "{row} missing from\n{by_turn}");
        }
        assert!(!by_turn.contains("13+"), "an empty 13+ row is left out:\n{by_turn}");
        let by_prompt = r.by_prompt_length();
        for row in [
            "| <128 | 1 | 100.0% (1) |",
            "| 128-255 | 1 | 100.0% (1) |",
            "| 256-511 | 1 | 100.0% (1) | 100.0% (1) | 0.0% (1) |",
            "| 512+ | 1 | 0.0% (1) |",
        ] {
            assert!(by_prompt.contains(row), "{row} missing from\n{by_prompt}");
        }
        r.score(&c, at(13), 700, gold, gold);
        assert!(r.by_turn().contains("| 13+ | 1 |"), "{}", r.by_turn());
    }
}
