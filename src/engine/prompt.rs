//! Fitting a conversation into the context window.
//!
//! The prompt is the system prompt plus as many of the newest turns as fit beside the reply
//! canvas. The rendering itself (the model's chat template, then tokenization) is passed in, so
//! this logic is tested without a model and every engine truncates the same way.

use super::{ChatTurn, EngineError};

/// A prompt that fits the context window.
#[derive(Debug, Clone, PartialEq)]
pub struct FittedPrompt {
    pub tokens: Vec<i32>,
    /// Oldest turns left out.
    pub dropped_turns: usize,
    /// The messages rendered: the system prompt (if any) and the kept turns.
    pub chat: Vec<ChatTurn>,
}

/// Drops the oldest turns (never the system prompt or the last turn) until the rendered prompt
/// has at most `budget` tokens. `render` turns `[system, turns...]` into prompt tokens.
pub fn fit<F>(system: &str, turns: &[ChatTurn], budget: usize, mut render: F) -> Result<FittedPrompt, EngineError>
where
    F: FnMut(&[ChatTurn]) -> Result<Vec<i32>, EngineError>,
{
    let system_turn = (!system.is_empty()).then(|| ChatTurn {
        role: "system".into(),
        content: system.into(),
    });
    let mut needed = 0;
    for dropped in 0..turns.len().max(1) {
        let mut chat: Vec<ChatTurn> = system_turn.iter().cloned().collect();
        chat.extend_from_slice(&turns[dropped.min(turns.len())..]);
        let tokens = render(&chat)?;
        if tokens.len() <= budget {
            return Ok(FittedPrompt {
                tokens,
                dropped_turns: dropped,
                chat,
            });
        }
        needed = tokens.len();
    }
    Err(EngineError::ContextOverflow { needed, limit: budget })
}

/// Where the prompts of the earlier user turns of `chat` end inside `tokens` (the prompt of the
/// whole `chat`), ascending. These are the chunk boundaries of a cached prefill: the prompt a turn
/// had is a prefix of every later turn's prompt, so a conversation's cache can be extended turn by
/// turn. A rendering that is not a token prefix of `tokens` (the tokenizer merged across the
/// boundary) is skipped, so the boundaries depend only on the conversation, not on what is cached.
pub fn turn_boundaries<F>(chat: &[ChatTurn], tokens: &[i32], mut render: F) -> Result<Vec<usize>, EngineError>
where
    F: FnMut(&[ChatTurn]) -> Result<Vec<i32>, EngineError>,
{
    let mut boundaries = Vec::new();
    let last = chat.len().saturating_sub(1);
    for (i, turn) in chat.iter().enumerate().take(last) {
        if turn.role != "user" {
            continue;
        }
        let earlier = render(&chat[..=i])?;
        let end = earlier.len();
        if end > 0 && end < tokens.len() && tokens.starts_with(&earlier) && boundaries.last() < Some(&end) {
            boundaries.push(end);
        }
    }
    Ok(boundaries)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn turn(role: &str, content: &str) -> ChatTurn {
        ChatTurn {
            role: role.into(),
            content: content.into(),
        }
    }

    /// One token per character of every message.
    fn by_chars(chat: &[ChatTurn]) -> Result<Vec<i32>, EngineError> {
        Ok(chat.iter().flat_map(|t| t.content.chars().map(|c| c as i32)).collect())
    }

    #[test]
    fn keeps_everything_when_it_fits() {
        let turns = vec![turn("user", "abc"), turn("assistant", "de"), turn("user", "f")];
        let fitted = fit("S", &turns, 100, by_chars).unwrap();
        assert_eq!(fitted.dropped_turns, 0);
        assert_eq!(fitted.tokens.len(), 7);
    }

    #[test]
    fn drops_oldest_turns_but_keeps_system_and_last() {
        let turns = vec![turn("user", "aaaa"), turn("assistant", "bbbb"), turn("user", "cc")];
        let fitted = fit("SS", &turns, 8, by_chars).unwrap();
        assert_eq!(fitted.dropped_turns, 1);
        assert_eq!(fitted.tokens, "SSbbbbcc".chars().map(|c| c as i32).collect::<Vec<_>>());
        let fitted = fit("SS", &turns, 4, by_chars).unwrap();
        assert_eq!(fitted.dropped_turns, 2);
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
        let tokens = by_chars(&chat).unwrap();
        assert_eq!(turn_boundaries(&chat, &tokens, by_chars).unwrap(), vec![3, 6]);
        // A rendering that is not a prefix of the whole prompt is no boundary.
        let odd = |c: &[ChatTurn]| {
            by_chars(c).map(|mut t| {
                if c.len() == 2 {
                    t.push(0);
                }
                t
            })
        };
        assert_eq!(turn_boundaries(&chat, &tokens, odd).unwrap(), vec![6]);
    }

    #[test]
    fn overflow_when_last_turn_alone_is_too_long() {
        let turns = vec![turn("user", "a"), turn("user", "0123456789")];
        let err = fit("S", &turns, 5, by_chars).unwrap_err();
        assert!(
            matches!(err, EngineError::ContextOverflow { needed: 11, limit: 5 }),
            "{err:?}"
        );
    }
}
