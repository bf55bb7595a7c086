//! From a conversation to prompt tokens: fitting it into the context window and finding the turn
//! boundaries inside the prompt.
//!
//! The prompt is the system prompt plus as many of the newest turns as fit beside the reply
//! canvas, and within the history window when there is one. The model's chat template and
//! tokenizer are passed in as a [`Renderer`], so this logic is tested without a model and every
//! engine truncates the same way.
//!
//! Both steps cost time linear in the conversation, not quadratic: a session's whole history comes
//! in with every message, and rendering it once per dropped turn took seconds for long sessions.
//! Each turn's own rendering is tokenized once to estimate the fit, which a couple of exact
//! renderings then confirm; boundaries tokenize only what each earlier turn adds.

use super::{ChatTurn, EngineError, GenerateRequest};

/// A model's chat template and tokenizer.
pub trait Renderer {
    /// `chat` through the chat template; with `open_reply`, ending with the opening of the
    /// assistant's turn.
    fn apply_template(&self, chat: &[ChatTurn], open_reply: bool) -> Result<String, EngineError>;
    /// `text` as tokens, control tokens included.
    fn tokenize(&self, text: &str) -> Vec<i32>;
}

/// Where an engine that caches prompts chunk by chunk wants them cut ([`turn_boundaries`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunking {
    /// Not at all: the engine does not cache by chunk.
    None,
    /// After each earlier user turn's prompt, which a later turn's prompt extends.
    Turns,
    /// After the system prompt too, so conversations with the same system prompt share their
    /// first chunk.
    SystemAndTurns,
}

/// A prompt ready for an engine.
#[derive(Debug, Clone, PartialEq)]
pub struct Prompt {
    pub tokens: Vec<i32>,
    /// Oldest turns left out to fit the context window.
    pub dropped_turns: usize,
    /// [`turn_boundaries`] of `tokens`, when asked for.
    pub boundaries: Vec<usize>,
}

/// The prompt of `request`, fitted beside its canvas into a `context`-token window and into
/// `window` prompt tokens when given (see [`fit_window`]), with the chunk boundaries `chunking`
/// asks for.
pub fn prepare(
    renderer: &impl Renderer,
    request: &GenerateRequest,
    context: usize,
    window: Option<usize>,
    chunking: Chunking,
) -> Result<Prompt, EngineError> {
    let canvas = request.options.max_tokens;
    let budget = context.checked_sub(canvas).ok_or(EngineError::ContextOverflow {
        needed: canvas,
        limit: context,
    })?;
    let fitted = match window.filter(|&w| w < budget) {
        Some(window) => fit_window(renderer, &request.system, &request.turns, window, budget)?,
        None => fit(renderer, &request.system, &request.turns, budget)?,
    };
    let boundaries = match chunking {
        Chunking::None => Vec::new(),
        _ => turn_boundaries(
            renderer,
            &fitted.chat,
            &fitted.tokens,
            chunking == Chunking::SystemAndTurns,
        )?,
    };
    Ok(Prompt {
        tokens: fitted.tokens,
        dropped_turns: fitted.dropped_turns,
        boundaries,
    })
}

/// A prompt that fits the context window.
#[derive(Debug, Clone, PartialEq)]
pub struct FittedPrompt {
    pub tokens: Vec<i32>,
    /// Oldest turns left out.
    pub dropped_turns: usize,
    /// The messages rendered: the system prompt (if any) and the kept turns.
    pub chat: Vec<ChatTurn>,
}

/// Fits the prompt into `window` tokens, the longest prompt the model was trained on, dropping
/// whole exchanges: the kept history starts with a user turn, as every training prompt does. A
/// last turn too long for the window alone is fitted into `budget` (the context) instead: the
/// window is a preference, the context a limit.
pub fn fit_window(
    renderer: &impl Renderer,
    system: &str,
    turns: &[ChatTurn],
    window: usize,
    budget: usize,
) -> Result<FittedPrompt, EngineError> {
    let fitted = match fit(renderer, system, turns, window) {
        Err(EngineError::ContextOverflow { .. }) => return fit(renderer, system, turns, budget),
        other => other?,
    };
    let mut dropped = fitted.dropped_turns;
    while dropped + 1 < turns.len() && turns[dropped].role != "user" {
        dropped += 1;
    }
    if dropped == fitted.dropped_turns {
        return Ok(fitted);
    }
    render_prompt(renderer, system, turns, dropped)
}

/// The prompt of the system prompt and `turns[dropped..]`.
fn render_prompt(
    renderer: &impl Renderer,
    system: &str,
    turns: &[ChatTurn],
    dropped: usize,
) -> Result<FittedPrompt, EngineError> {
    let mut chat = Vec::with_capacity(turns.len() - dropped + 1);
    if !system.is_empty() {
        chat.push(ChatTurn {
            role: "system".into(),
            content: system.into(),
        });
    }
    chat.extend_from_slice(&turns[dropped..]);
    let tokens = renderer.tokenize(&renderer.apply_template(&chat, true)?);
    Ok(FittedPrompt {
        tokens,
        dropped_turns: dropped,
        chat,
    })
}

/// Drops the fewest oldest turns (never the system prompt or the last turn) for the prompt to
/// have at most `budget` tokens.
///
/// Each earlier turn is rendered and tokenized on its own once, newest first, until the budget is
/// spent: that estimates how many turns fit. Exact renderings of the whole prompt then confirm the
/// estimate, one turn at a time: two of them (the prompt, and the one with a turn more that does
/// not fit) when the template renders every message by itself, as ChatML does.
pub fn fit(
    renderer: &impl Renderer,
    system: &str,
    turns: &[ChatTurn],
    budget: usize,
) -> Result<FittedPrompt, EngineError> {
    let prompt = |dropped: usize| render_prompt(renderer, system, turns, dropped);
    let fits = |p: &FittedPrompt| p.tokens.len() <= budget;
    // The shortest prompt, the system prompt and the last turn: if it does not fit, nothing does.
    let last = turns.len().saturating_sub(1);
    let shortest = prompt(last)?;
    if !fits(&shortest) {
        return Err(EngineError::ContextOverflow {
            needed: shortest.tokens.len(),
            limit: budget,
        });
    }
    let mut size = shortest.tokens.len();
    let mut dropped = last;
    while dropped > 0 {
        let own = renderer
            .tokenize(&renderer.apply_template(std::slice::from_ref(&turns[dropped - 1]), false)?)
            .len();
        if size + own > budget {
            break;
        }
        size += own;
        dropped -= 1;
    }
    let mut best = if dropped == last { shortest } else { prompt(dropped)? };
    if fits(&best) {
        while best.dropped_turns > 0 {
            let more = prompt(best.dropped_turns - 1)?;
            if !fits(&more) {
                break;
            }
            best = more;
        }
    } else {
        // The estimate kept too much; the shortest prompt fits, so this stops.
        while !fits(&best) {
            best = prompt(best.dropped_turns + 1)?;
        }
    }
    Ok(best)
}

/// Where the prompts of the earlier user turns of `chat` end inside `tokens` (the prompt of the
/// whole `chat`), ascending; with `after_system`, where the system prompt's message ends as well.
/// These are the chunk boundaries of a cached prefill: the prompt a turn had is a prefix of every
/// later turn's prompt, so a conversation's cache can be extended turn by turn, and the system
/// prompt's chunk is the same in every conversation. A rendering that is not a token prefix of
/// `tokens` (the tokenizer merged across the boundary) is skipped, so the boundaries depend only
/// on the conversation, not on what is cached.
///
/// Each earlier prompt is rendered as text, but only the text it adds to the previous boundary's
/// prompt is tokenized and compared with `tokens` there, so each token is tokenized once. Only
/// where that part does not line up (a tokenizer that treats the start of a text specially) is the
/// whole earlier prompt tokenized.
pub fn turn_boundaries(
    renderer: &impl Renderer,
    chat: &[ChatTurn],
    tokens: &[i32],
    after_system: bool,
) -> Result<Vec<usize>, EngineError> {
    let mut boundaries = Vec::new();
    // The text of the last earlier prompt found in `tokens`, and where its tokens end.
    let mut anchor = (String::new(), 0);
    let last = chat.len().saturating_sub(1);
    for (i, turn) in chat.iter().enumerate().take(last) {
        // The system prompt's chunk is its message alone; a user turn's ends with the reply's opening.
        let system = after_system && i == 0 && turn.role == "system";
        if turn.role != "user" && !system {
            continue;
        }
        let earlier = renderer.apply_template(&chat[..=i], !system)?;
        let by_part = earlier.strip_prefix(anchor.0.as_str()).and_then(|part| {
            let part = renderer.tokenize(part);
            tokens[anchor.1..].starts_with(&part).then(|| anchor.1 + part.len())
        });
        let end = by_part.or_else(|| {
            let whole = renderer.tokenize(&earlier);
            tokens.starts_with(&whole).then_some(whole.len())
        });
        let Some(end) = end else {
            continue;
        };
        if end > 0 && end < tokens.len() && boundaries.last() < Some(&end) {
            boundaries.push(end);
        }
        anchor = (earlier, end);
    }
    Ok(boundaries)
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    fn turn(role: &str, content: &str) -> ChatTurn {
        ChatTurn {
            role: role.into(),
            content: content.into(),
        }
    }

    /// Every message's content, one token per character, counting the characters tokenized.
    #[derive(Default)]
    struct ByChars {
        /// Prepended to every rendering (a template that starts each prompt with a marker).
        start: &'static str,
        /// Between messages (a template whose message alone renders shorter than in a chat).
        join: &'static str,
        /// A rendering of exactly two messages gets a stray character (not a prefix of more).
        odd_pair: bool,
        /// Every tokenized text starts with token 0 (as SentencePiece's space prefix does).
        mark_start: bool,
        tokenized: Cell<usize>,
    }

    impl Renderer for ByChars {
        fn apply_template(&self, chat: &[ChatTurn], _open_reply: bool) -> Result<String, EngineError> {
            let contents: Vec<&str> = chat.iter().map(|t| t.content.as_str()).collect();
            let mut text = format!("{}{}", self.start, contents.join(self.join));
            if self.odd_pair && chat.len() == 2 {
                text.push('!');
            }
            Ok(text)
        }

        fn tokenize(&self, text: &str) -> Vec<i32> {
            self.tokenized.set(self.tokenized.get() + text.chars().count());
            let marker = self.mark_start.then_some(0);
            marker.into_iter().chain(text.chars().map(|c| c as i32)).collect()
        }
    }

    fn tokens(text: &str) -> Vec<i32> {
        text.chars().map(|c| c as i32).collect()
    }

    /// The fit by definition: the fewest dropped turns whose whole prompt fits.
    fn fit_by_definition(r: &ByChars, system: &str, turns: &[ChatTurn], budget: usize) -> Option<usize> {
        let mut chat: Vec<ChatTurn> = vec![turn("system", system)];
        chat.extend_from_slice(turns);
        (0..turns.len().max(1)).find(|d| {
            let mut c = vec![chat[0].clone()];
            c.extend_from_slice(&turns[*d..]);
            r.tokenize(&r.apply_template(&c, true).unwrap()).len() <= budget
        })
    }

    #[test]
    fn keeps_everything_when_it_fits() {
        let turns = vec![turn("user", "abc"), turn("assistant", "de"), turn("user", "f")];
        let fitted = fit(&ByChars::default(), "S", &turns, 100).unwrap();
        assert_eq!(fitted.dropped_turns, 0);
        assert_eq!(fitted.tokens.len(), 7);
    }

    #[test]
    fn drops_oldest_turns_but_keeps_system_and_last() {
        let turns = vec![turn("user", "aaaa"), turn("assistant", "bbbb"), turn("user", "cc")];
        let fitted = fit(&ByChars::default(), "SS", &turns, 8).unwrap();
        assert_eq!(fitted.dropped_turns, 1);
        assert_eq!(fitted.tokens, tokens("SSbbbbcc"));
        let fitted = fit(&ByChars::default(), "SS", &turns, 4).unwrap();
        assert_eq!(fitted.dropped_turns, 2);
    }

    #[test]
    fn the_fit_is_the_fewest_dropped_turns_even_where_the_estimate_is_off() {
        let turns: Vec<ChatTurn> = (0..12)
            .map(|i| turn(["user", "assistant"][i % 2], &"x".repeat(1 + i % 4)))
            .collect();
        // A marker per rendering makes each turn's own rendering overstate what it adds to a
        // prompt, a separator between messages understate it.
        for (start, join) in [("", ""), ("#", ""), ("####", ""), ("", "|"), ("", "||||"), ("##", "|")] {
            let r = ByChars {
                start,
                join,
                ..Default::default()
            };
            for budget in 4..40 {
                let fitted = fit(&r, "S", &turns, budget).ok().map(|f| f.dropped_turns);
                assert_eq!(
                    fitted,
                    fit_by_definition(&r, "S", &turns, budget),
                    "start {start:?}, join {join:?}, budget {budget}"
                );
            }
        }
    }

    #[test]
    fn fitting_a_long_history_tokenizes_about_the_window_not_the_history() {
        let turns: Vec<ChatTurn> = (0..2000)
            .map(|i| turn(["user", "assistant"][i % 2], "0123456789"))
            .collect();
        let r = ByChars::default();
        let fitted = fit(&r, "S", &turns, 200).unwrap();
        assert_eq!(fitted.tokens.len(), 191);
        assert_eq!(fitted.dropped_turns, 1981);
        // The shortest prompt, each kept turn and one more, then the prompt and the one a turn
        // longer: about three windows, however long the history.
        assert!(
            r.tokenized.get() <= 3 * 200 + 30,
            "{} characters tokenized",
            r.tokenized.get()
        );
        let before = r.tokenized.get();
        turn_boundaries(&r, &fitted.chat, &fitted.tokens, true).unwrap();
        assert!(r.tokenized.get() - before <= 200, "{}", r.tokenized.get() - before);
    }

    #[test]
    fn boundaries_are_the_earlier_turns_prompts() {
        let chat = vec![
            turn("system", "S"),
            turn("user", "ab"),
            turn("assistant", "cd"),
            turn("user", "e"),
            turn("assistant", "f"),
            turn("user", "g"),
        ];
        let r = ByChars::default();
        let all = r.tokenize(&r.apply_template(&chat, true).unwrap());
        assert_eq!(turn_boundaries(&r, &chat, &all, false).unwrap(), vec![3, 6]);
        // The system prompt's message is a chunk of its own when asked for.
        assert_eq!(turn_boundaries(&r, &chat, &all, true).unwrap(), vec![1, 3, 6]);
        // A rendering that is not a prefix of the whole prompt is no boundary.
        let odd = ByChars {
            odd_pair: true,
            ..Default::default()
        };
        assert_eq!(turn_boundaries(&odd, &chat, &all, false).unwrap(), vec![6]);
        // A tokenizer that marks the start of every text gets its boundaries from whole renderings.
        let marked = ByChars {
            mark_start: true,
            ..Default::default()
        };
        let all = marked.tokenize(&marked.apply_template(&chat, true).unwrap());
        assert_eq!(turn_boundaries(&marked, &chat, &all, false).unwrap(), vec![4, 7]);
        assert_eq!(turn_boundaries(&marked, &chat, &all, true).unwrap(), vec![2, 4, 7]);
        // Without a system prompt the first chunk is the first turn's, as before.
        let no_system = &chat[1..];
        let all = r.tokenize(&r.apply_template(no_system, true).unwrap());
        assert_eq!(turn_boundaries(&r, no_system, &all, true).unwrap(), vec![2, 5]);
    }

    #[test]
    fn overflow_when_last_turn_alone_is_too_long() {
        let turns = vec![turn("user", "a"), turn("user", "0123456789")];
        let err = fit(&ByChars::default(), "S", &turns, 5).unwrap_err();
        assert!(
            matches!(err, EngineError::ContextOverflow { needed: 11, limit: 5 }),
            "{err:?}"
        );
    }

    #[test]
    fn a_window_drops_whole_exchanges_and_gives_way_to_the_context_for_a_long_last_turn() {
        let turns = vec![
            turn("user", "aa"),
            turn("assistant", "bbb"),
            turn("user", "cc"),
            turn("assistant", "dd"),
            turn("user", "e"),
        ];
        let r = ByChars::default();
        // "S" + "dd" + "e" fits 4 tokens, but would start the history with a reply.
        let fitted = fit_window(&r, "S", &turns, 4, 100).unwrap();
        assert_eq!(fitted.dropped_turns, 4);
        assert_eq!(fitted.tokens, tokens("Se"));
        let fitted = fit_window(&r, "S", &turns, 6, 100).unwrap();
        assert_eq!((fitted.dropped_turns, fitted.tokens), (2, tokens("Sccdde")));
        // Everything fits the window: nothing dropped.
        assert_eq!(fit_window(&r, "S", &turns, 11, 100).unwrap().dropped_turns, 0);
        // A last turn longer than the window alone is fitted into the context.
        let long_last = vec![turn("user", "aa"), turn("assistant", "b"), turn("user", "0123456789")];
        let fitted = fit_window(&r, "S", &long_last, 5, 14).unwrap();
        assert_eq!(fitted.dropped_turns, 0);
        let fitted = fit_window(&r, "S", &long_last, 5, 12).unwrap();
        assert_eq!(fitted.dropped_turns, 1);
        assert!(matches!(
            fit_window(&r, "S", &long_last, 5, 8),
            Err(EngineError::ContextOverflow { .. })
        ));
    }
}
