//! Latency and throughput benchmark of an engine on multi-turn conversations, measured side by
//! side in one run so the ratios compare like with like.
//!
//! Each case runs the same conversations (held-out dialogs, history of earlier turns included)
//! with one decode configuration and reports median reply latency, tokens/s and steps per reply.
//! A second table runs the same set of conversations N at a time through one engine and reports aggregate
//! tokens/s, time-to-first-revision and reply percentiles and the process's peak memory;
//! [`server`] runs them through the real server over WebSockets.
//!
//! With an intent classifier, each case also scores its replies: the share whose closest answer
//! template belongs to the intent the held-out dialog expects (the eval's intent accuracy).

pub mod server;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use dllm_chat::engine::{self, ChatTurn, DecodeOptions, Engine, EngineError, GenerateRequest, Phases};
use dllm_train::corpus::{Dialog, Turn};

use crate::eval::IntentClassifier;

/// One engine and decode configuration to measure.
#[derive(Clone)]
pub struct Case {
    pub name: String,
    pub engine: std::sync::Arc<dyn Engine>,
    pub options: DecodeOptions,
    /// Reply to each conversation's previous turn first (unmeasured).
    pub warm: bool,
}

/// Figures for one case.
#[derive(Debug, Clone)]
pub struct CaseResult {
    pub name: String,
    pub replies: usize,
    pub median_latency: Duration,
    pub tokens_per_second: f64,
    pub steps_per_reply: f64,
    pub prompt_tokens: f64,
    /// Share of replies of the expected intent, when a classifier was given.
    pub intent_accuracy: Option<f64>,
    /// Where a reply's time went, on average (none for llama.cpp's raw loop).
    pub mean_phases: Option<Phases>,
    pub mean_latency: Duration,
}

/// Figures for one concurrency level.
#[derive(Debug, Clone)]
pub struct ConcurrencyResult {
    pub conversations: usize,
    pub aggregate_tokens_per_second: f64,
    pub first_revision_p50: Duration,
    pub first_revision_p99: Duration,
    pub reply_p50: Duration,
    pub reply_p99: Duration,
    /// Every reply's latency, ascending.
    pub replies: Vec<Duration>,
    /// Peak resident memory of the process so far, in MiB (Linux; 0 elsewhere).
    pub peak_rss_mib: f64,
}

/// A conversation to reply to: the turns up to a user message, and the intent the reply should have.
#[derive(Debug, Clone)]
pub struct Conversation {
    pub turns: Vec<ChatTurn>,
    pub intent: Option<String>,
    /// The order number or product the last user turn is about.
    pub slots: BTreeMap<String, String>,
}

impl Conversation {
    /// The conversation as it stood at the previous user turn (its prompt is a prefix of this one's).
    pub fn previous_turn(&self) -> Option<Conversation> {
        let last = self.turns.iter().rposition(|t| t.role == "user")?;
        let previous = self.turns[..last].iter().rposition(|t| t.role == "user")?;
        Some(Conversation {
            turns: self.turns[..=previous].to_vec(),
            intent: None,
            slots: BTreeMap::new(),
        })
    }
}

/// Long conversations: consecutive dialogs chained into one conversation of `user_turns` user
/// turns (a customer asking about one thing after another), each up to its last user message.
/// The last dialog's expectations score the reply.
pub fn long_conversations(dialogs: &[Dialog], user_turns: usize) -> Vec<Conversation> {
    let mut out = Vec::new();
    let mut chained: Vec<Turn> = Vec::new();
    for d in dialogs {
        chained.extend(d.turns.iter().cloned());
        let users = chained.iter().filter(|t| matches!(t, Turn::User { .. })).count();
        if users >= user_turns {
            let dialog = Dialog {
                turns: std::mem::take(&mut chained),
                ..d.clone()
            };
            out.extend(conversations(std::slice::from_ref(&dialog)));
        }
    }
    out
}

/// The conversation before the last assistant turn of each dialog that has history (at least
/// two user turns), so every prompt carries earlier turns.
pub fn conversations(dialogs: &[Dialog]) -> Vec<Conversation> {
    dialogs
        .iter()
        .filter(|d| d.turns.iter().filter(|t| matches!(t, Turn::User { .. })).count() >= 2)
        .filter_map(|d| {
            let last_user = d.turns.iter().rposition(|t| matches!(t, Turn::User { .. }))?;
            let Turn::User { intent, slots, .. } = &d.turns[last_user] else {
                return None;
            };
            Some(Conversation {
                turns: d.turns[..=last_user]
                    .iter()
                    .map(|t| ChatTurn {
                        role: t.role().to_owned(),
                        content: t.content().to_owned(),
                    })
                    .collect(),
                intent: Some(intent.clone()),
                slots: slots.clone(),
            })
        })
        .collect()
}

struct Measured {
    text: String,
    latency: Duration,
    first_revision: Duration,
    tokens: usize,
    steps: usize,
    prompt_tokens: usize,
    phases: Phases,
}

async fn measure(
    engine: &dyn Engine,
    system: &str,
    turns: Vec<ChatTurn>,
    options: &DecodeOptions,
) -> Result<Measured, EngineError> {
    let request = GenerateRequest {
        system: system.to_owned(),
        turns,
        options: options.clone(),
    };
    let outcome = engine::complete(engine, request).await?;
    // A diffusion reply decodes its whole canvas, end padding included; an autoregressive one
    // only the tokens it wrote.
    let decoded = match engine.info().engine {
        "autoregressive" => outcome.completion.completion_tokens,
        _ => options.max_tokens.max(outcome.completion.completion_tokens),
    };
    Ok(Measured {
        text: outcome.completion.text,
        latency: outcome.total,
        first_revision: outcome.first_revision,
        tokens: decoded,
        steps: outcome.completion.steps,
        prompt_tokens: outcome.prompt_tokens,
        phases: outcome.completion.phases,
    })
}

/// The value at fraction `p` of `sorted` (ascending); zero for none.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

/// Runs every case over the same conversations, one reply at a time, conversation by
/// conversation (each one through every case before the next), so the machine's drift hits the
/// cases alike. With `warm`, each conversation's previous turn is replied to first (unmeasured),
/// so an engine that keeps conversation caches starts from the cached history; such a case needs
/// an engine of its own, or it would find the whole prompt cached by another case.
pub async fn run_cases(
    system: &str,
    conversations: &[Conversation],
    cases: &[Case],
    classifier: Option<&IntentClassifier>,
) -> Result<Vec<CaseResult>, EngineError> {
    let mut measured: Vec<Vec<Measured>> = cases.iter().map(|_| Vec::new()).collect();
    let mut correct = vec![0usize; cases.len()];
    for c in conversations {
        for ((case, measured), correct) in cases.iter().zip(&mut measured).zip(&mut correct) {
            if case.warm {
                if let Some(previous) = c.previous_turn() {
                    measure(case.engine.as_ref(), system, previous.turns, &case.options).await?;
                }
            }
            let m = measure(case.engine.as_ref(), system, c.turns.clone(), &case.options).await?;
            if let (Some(classifier), Some(intent)) = (classifier, &c.intent) {
                *correct += usize::from(classifier.matches(&m.text, &c.slots, intent));
            }
            measured.push(m);
        }
    }
    let scored = conversations.iter().filter(|c| c.intent.is_some()).count();
    Ok(cases
        .iter()
        .zip(measured)
        .zip(correct)
        .map(|((case, measured), correct)| {
            let mut latencies: Vec<Duration> = measured.iter().map(|m| m.latency).collect();
            latencies.sort();
            let total_time: f64 = measured.iter().map(|m| m.latency.as_secs_f64()).sum();
            let tokens: usize = measured.iter().map(|m| m.tokens).sum();
            let n = measured.len().max(1) as f64;
            CaseResult {
                name: case.name.clone(),
                replies: measured.len(),
                median_latency: percentile(&latencies, 0.5),
                tokens_per_second: tokens as f64 / total_time.max(1e-9),
                steps_per_reply: measured.iter().map(|m| m.steps).sum::<usize>() as f64 / n,
                prompt_tokens: measured.iter().map(|m| m.prompt_tokens).sum::<usize>() as f64 / n,
                intent_accuracy: (classifier.is_some() && scored > 0).then(|| correct as f64 / scored as f64),
                mean_phases: Some(mean_phases(measured.iter().map(|m| &m.phases))),
                mean_latency: Duration::from_secs_f64(total_time / n),
            }
        })
        .collect())
}

/// The figures of llama.cpp's raw decode loop ([`crate::raw_decode`]) on `conversations`, as a
/// case of the same table. Blocking.
pub fn raw_case(
    name: String,
    model_path: &std::path::Path,
    model: &dllm_chat::config::ModelConfig,
    system: &str,
    conversations: &[Conversation],
    max_tokens: usize,
    classifier: Option<&IntentClassifier>,
) -> Result<CaseResult, EngineError> {
    let chats: Vec<Vec<ChatTurn>> = conversations
        .iter()
        .map(|c| {
            let mut chat = vec![ChatTurn {
                role: "system".into(),
                content: system.to_owned(),
            }];
            chat.extend(c.turns.iter().cloned());
            chat
        })
        .collect();
    let replies = crate::raw_decode::replies(model_path, model.threads, model.context_length, max_tokens, &chats)?;
    let mut latencies: Vec<Duration> = replies.iter().map(|r| r.latency).collect();
    latencies.sort();
    let total: f64 = latencies.iter().map(Duration::as_secs_f64).sum();
    let n = replies.len().max(1) as f64;
    let scored = conversations.iter().filter(|c| c.intent.is_some()).count();
    let correct = conversations
        .iter()
        .zip(&replies)
        .filter(|(c, r)| match (classifier, &c.intent) {
            (Some(classifier), Some(intent)) => classifier.matches(&r.text, &c.slots, intent),
            _ => false,
        })
        .count();
    Ok(CaseResult {
        name,
        replies: replies.len(),
        median_latency: percentile(&latencies, 0.5),
        tokens_per_second: replies.iter().map(|r| r.completion_tokens).sum::<usize>() as f64 / total.max(1e-9),
        steps_per_reply: replies.iter().map(|r| r.completion_tokens + 1).sum::<usize>() as f64 / n,
        prompt_tokens: replies.iter().map(|r| r.prompt_tokens).sum::<usize>() as f64 / n,
        intent_accuracy: (classifier.is_some() && scored > 0).then(|| correct as f64 / scored as f64),
        mean_phases: None,
        mean_latency: Duration::from_secs_f64(total / n),
    })
}

/// Replies to the first `total` conversations (cycling if there are fewer), `level` at a time: each
/// of `level` clients takes the next conversation when its reply is done. Every level does the same
/// work, so aggregate throughput compares across levels.
pub async fn run_concurrent(
    engine: &dyn Engine,
    system: &str,
    conversations: &[Conversation],
    options: &DecodeOptions,
    level: usize,
    total: usize,
) -> Result<ConcurrencyResult, EngineError> {
    let started = Instant::now();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let clients = (0..level.max(1)).map(|_| async {
        let mut measured = Vec::new();
        loop {
            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if i >= total || conversations.is_empty() {
                return Ok::<_, EngineError>(measured);
            }
            let c = &conversations[i % conversations.len()];
            measured.push(measure(engine, system, c.turns.clone(), options).await?);
        }
    });
    let measured: Vec<Measured> = futures_util::future::try_join_all(clients)
        .await?
        .into_iter()
        .flatten()
        .collect();
    let wall = started.elapsed();
    Ok(summarize(
        level,
        wall,
        measured.iter().map(|m| (m.first_revision, m.latency, m.tokens)),
    ))
}

/// Throughput and percentiles of `(first revision, reply latency, tokens)` measured over `wall`.
pub(crate) fn summarize(
    level: usize,
    wall: Duration,
    runs: impl Iterator<Item = (Duration, Duration, usize)>,
) -> ConcurrencyResult {
    let (mut first, mut replies, mut tokens) = (Vec::new(), Vec::new(), 0);
    for (f, r, t) in runs {
        first.push(f);
        replies.push(r);
        tokens += t;
    }
    first.sort();
    replies.sort();
    ConcurrencyResult {
        conversations: level,
        aggregate_tokens_per_second: tokens as f64 / wall.as_secs_f64().max(1e-9),
        first_revision_p50: percentile(&first, 0.5),
        first_revision_p99: percentile(&first, 0.99),
        reply_p50: percentile(&replies, 0.5),
        reply_p99: percentile(&replies, 0.99),
        replies,
        peak_rss_mib: peak_rss_mib(),
    }
}

/// `VmHWM` of this process in MiB, or 0 where `/proc` is missing.
pub(crate) fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Markdown table of `results`, with each case's latency ratio to the first case.
pub fn cases_table(results: &[CaseResult]) -> String {
    let mut out = String::from(
        "| case | replies | prompt tokens | median latency ms | tokens/s | steps/reply | intent acc. | speed-up vs first |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    let base = results.first().map(|r| r.median_latency.as_secs_f64()).unwrap_or(1.0);
    for r in results {
        out.push_str(&format!(
            "| {} | {} | {:.0} | {:.1} | {:.1} | {:.1} | {} | {:.2}x |\n",
            r.name,
            r.replies,
            r.prompt_tokens,
            r.median_latency.as_secs_f64() * 1e3,
            r.tokens_per_second,
            r.steps_per_reply,
            r.intent_accuracy.map_or("-".into(), |a| format!("{:.1}%", a * 100.0)),
            base / r.median_latency.as_secs_f64().max(1e-9)
        ));
    }
    out
}

fn mean_phases<'a>(phases: impl Iterator<Item = &'a Phases>) -> Phases {
    let mut sum = Phases::default();
    let mut n = 0u32;
    for p in phases {
        sum.queue += p.queue;
        sum.prompt += p.prompt;
        sum.prefill += p.prefill;
        sum.denoise += p.denoise;
        sum.compute += p.compute;
        sum.revision += p.revision;
        sum.between_steps += p.between_steps;
        sum.step_flops += p.step_flops;
        n += 1;
    }
    let n = n.max(1);
    Phases {
        queue: sum.queue / n,
        prompt: sum.prompt / n,
        prefill: sum.prefill / n,
        denoise: sum.denoise / n,
        compute: sum.compute / n,
        revision: sum.revision / n,
        between_steps: sum.between_steps / n,
        step_flops: sum.step_flops / f64::from(n),
    }
}

/// Markdown table of where each case's reply time goes (means per reply, ms): the engine's
/// phases, and what is left of the reply's latency outside them (hand-off to and from the
/// engine's threads). Then the rate the steps' evaluations reached (their arithmetic over their
/// compute time) and its share of `matmul_rate`, the machine's mat-mul rate (FLOP/s).
pub fn phases_table(results: &[CaseResult], matmul_rate: f64) -> String {
    let mut out = String::from(
        "| case | mean latency | queue | prompt | prefill | denoise | of which compute | host per step | revisions | between steps | hand-off | step GFLOP/s | of mat-mul rate |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    for r in results {
        let Some(p) = &r.mean_phases else {
            continue;
        };
        let engine = p.queue + p.prompt + p.prefill + p.denoise + p.revision + p.between_steps;
        let host_per_step = ms(p.denoise.saturating_sub(p.compute)) / r.steps_per_reply.max(1.0);
        let step_rate = p.step_flops / p.compute.as_secs_f64().max(1e-9);
        out.push_str(&format!(
            "| {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.3} | {:.2} | {:.2} | {:.2} | {:.1} | {:.0}% |\n",
            r.name,
            ms(r.mean_latency),
            ms(p.queue),
            ms(p.prompt),
            ms(p.prefill),
            ms(p.denoise),
            ms(p.compute),
            host_per_step,
            ms(p.revision),
            ms(p.between_steps),
            ms(r.mean_latency.saturating_sub(engine)),
            step_rate / 1e9,
            100.0 * step_rate / matmul_rate.max(1.0),
        ));
    }
    out
}

/// Markdown table of concurrency results, with aggregate throughput relative to the first row.
pub fn concurrency_table(results: &[ConcurrencyResult]) -> String {
    let mut out = String::from(
        "| conversations | aggregate tokens/s | vs first | first revision p50/p99 ms | reply p50/p99 ms | peak RSS MiB |\n\
         | --- | --- | --- | --- | --- | --- |\n",
    );
    let base = results.first().map(|r| r.aggregate_tokens_per_second).unwrap_or(1.0);
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    for r in results {
        out.push_str(&format!(
            "| {} | {:.1} | {:.2}x | {:.0} / {:.0} | {:.0} / {:.0} | {:.0} |\n",
            r.conversations,
            r.aggregate_tokens_per_second,
            r.aggregate_tokens_per_second / base.max(1e-9),
            ms(r.first_revision_p50),
            ms(r.first_revision_p99),
            ms(r.reply_p50),
            ms(r.reply_p99),
            r.peak_rss_mib
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dialog(id: usize, users: usize) -> Dialog {
        let mut turns = Vec::new();
        for u in 0..users {
            turns.push(Turn::User {
                content: format!("question {id}.{u}"),
                intent: format!("intent{id}"),
                facts: Vec::new(),
                slots: BTreeMap::new(),
            });
            turns.push(Turn::Assistant {
                content: format!("answer {id}.{u}"),
            });
        }
        Dialog {
            id: format!("d{id}"),
            split: dllm_train::corpus::Split::Heldout,
            turns,
        }
    }

    #[test]
    fn long_conversations_chain_dialogs_up_to_the_asked_user_turns() {
        let dialogs: Vec<Dialog> = (0..6).map(|i| dialog(i, 1 + i % 3)).collect();
        // User turns 1, 2, 3, 1, 2, 3: chains of at least 4 are (1+2+3) and (1+2+3).
        let long = long_conversations(&dialogs, 4);
        assert_eq!(long.len(), 2);
        for c in &long {
            let users = c.turns.iter().filter(|t| t.role == "user").count();
            assert_eq!(users, 6, "{:?}", c.turns);
            assert_eq!(c.turns.last().unwrap().role, "user");
        }
        assert_eq!(
            long[0].intent.as_deref(),
            Some("intent2"),
            "the last dialog's intent scores it"
        );
        assert_eq!(long[0].turns[0].content, "question 0.0");
    }
}
