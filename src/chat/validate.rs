//! Validation of what a front end hands the conversation core: one [`Validator`], built from the
//! configured defaults and limits, turns raw input into a [`ValidMessage`]. Config validation uses
//! the same rules for the `decode.*` defaults, so every bound is written once.
//!
//! Policy choice when `policy` is not given: `threshold` given -> threshold; `factor` given ->
//! factor; `steps` given -> the fixed schedule; otherwise `decode.policy` from config.

use serde::{Deserialize, Serialize};

use crate::config::{DecodeConfig, LimitsConfig};
use crate::engine::{ChatTurn, DecodeOptions, PolicyKind, Schedule, Selection};

/// Decode options as a client sent them; every field is optional.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessageOptions {
    pub max_tokens: Option<usize>,
    pub steps: Option<usize>,
    pub block_length: Option<usize>,
    pub policy: Option<PolicyKind>,
    pub threshold: Option<f32>,
    pub factor: Option<f32>,
    pub selection: Option<Selection>,
    pub defer_repeats: Option<bool>,
    pub temperature: Option<f32>,
    pub seed: Option<u64>,
}

impl From<&DecodeOptions> for MessageOptions {
    /// Every option spelled out, the policy too, so a client that sends them gets exactly
    /// `options` whatever the server's defaults are (the bench and eval clients).
    fn from(o: &DecodeOptions) -> Self {
        let (policy, threshold, factor) = match o.schedule {
            Schedule::Fixed => (PolicyKind::Fixed, None, None),
            Schedule::Threshold { tau } => (PolicyKind::Threshold, Some(tau), None),
            Schedule::Factor { factor } => (PolicyKind::Factor, None, Some(factor)),
        };
        Self {
            max_tokens: Some(o.max_tokens),
            steps: Some(o.steps),
            block_length: Some(o.block_length),
            policy: Some(policy),
            threshold,
            factor,
            selection: Some(o.selection),
            defer_repeats: Some(o.defer_repeats),
            temperature: Some(o.temperature),
            seed: Some(o.seed),
        }
    }
}

/// A user message as a front end received it.
#[derive(Debug, Clone, PartialEq)]
pub struct NewMessage {
    pub session_id: String,
    pub content: String,
    /// Makes resending safe: a message with an id the session holds is not stored again.
    pub client_message_id: Option<String>,
    pub options: MessageOptions,
}

/// A message that passed every check: the only kind the conversation core accepts.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidMessage {
    pub session_id: String,
    pub content: String,
    pub client_message_id: Option<String>,
    pub options: DecodeOptions,
}

/// A whole conversation handed in at once, for a reply that is not stored (a stateless front
/// end's request).
#[derive(Debug, Clone, PartialEq)]
pub struct NewConversation {
    /// Replaces the configured system prompt when given.
    pub system: Option<String>,
    /// Oldest first; roles `user` and `assistant`; the last one is the user's.
    pub turns: Vec<ChatTurn>,
    pub options: MessageOptions,
}

/// A conversation that passed every check.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidConversation {
    pub system: Option<String>,
    pub turns: Vec<ChatTurn>,
    pub options: DecodeOptions,
}

/// Why input was refused. Messages state the rule and the given value.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ValidationError {
    #[error("`content` must not be empty")]
    EmptyContent,
    #[error("`content` has {chars} characters; the limit is {limit}")]
    ContentTooLong { chars: usize, limit: usize },
    #[error("the conversation must end with a user message")]
    NoUserMessage,
    #[error(
        "message {index} has role {role:?}; expected \"user\" or \"assistant\" (one system message may come first)"
    )]
    Role { index: usize, role: String },
    #[error("{scope}.{field} must be {rule}; given {given}")]
    Option {
        /// `options` for a client's value, `decode` for a configured default.
        scope: &'static str,
        field: &'static str,
        rule: String,
        given: String,
    },
}

impl ValidationError {
    fn option(field: &'static str, rule: impl Into<String>, given: impl ToString) -> Self {
        ValidationError::Option {
            scope: "options",
            field,
            rule: rule.into(),
            given: given.to_string(),
        }
    }
}

/// The checks, with the defaults and limits they apply.
#[derive(Debug, Clone)]
pub struct Validator {
    decode: DecodeConfig,
    max_message_chars: usize,
    max_reply_tokens: usize,
    max_steps: usize,
}

impl Validator {
    /// The validator of these settings; fails when the `decode.*` defaults themselves break a
    /// rule (the error names the setting).
    pub fn new(decode: &DecodeConfig, limits: &LimitsConfig) -> Result<Self, ValidationError> {
        let validator = Self {
            decode: decode.clone(),
            max_message_chars: limits.max_message_chars,
            max_reply_tokens: limits.max_reply_tokens,
            max_steps: limits.max_steps,
        };
        let explicit = MessageOptions {
            steps: Some(decode.steps),
            ..Default::default()
        };
        for options in [MessageOptions::default(), explicit] {
            validator.options(&options).map_err(|e| match e {
                ValidationError::Option { field, rule, given, .. } => ValidationError::Option {
                    scope: "decode",
                    field,
                    rule,
                    given,
                },
                other => other,
            })?;
        }
        Ok(validator)
    }

    pub fn message(&self, m: NewMessage) -> Result<ValidMessage, ValidationError> {
        self.content(&m.content, true)?;
        Ok(ValidMessage {
            options: self.options(&m.options)?,
            session_id: m.session_id,
            content: m.content,
            client_message_id: m.client_message_id,
        })
    }

    pub fn conversation(&self, c: NewConversation) -> Result<ValidConversation, ValidationError> {
        for (index, turn) in c.turns.iter().enumerate() {
            if turn.role != "user" && turn.role != "assistant" {
                return Err(ValidationError::Role {
                    index,
                    role: turn.role.clone(),
                });
            }
            self.content(&turn.content, turn.role == "user" && index + 1 == c.turns.len())?;
        }
        if c.turns.last().is_none_or(|t| t.role != "user") {
            return Err(ValidationError::NoUserMessage);
        }
        if let Some(system) = &c.system {
            self.content(system, false)?;
        }
        Ok(ValidConversation {
            options: self.options(&c.options)?,
            system: c.system,
            turns: c.turns,
        })
    }

    /// A message's text: within the length limit, and not blank when `required`.
    fn content(&self, content: &str, required: bool) -> Result<(), ValidationError> {
        if required && content.trim().is_empty() {
            return Err(ValidationError::EmptyContent);
        }
        let chars = content.chars().count();
        if chars > self.max_message_chars {
            return Err(ValidationError::ContentTooLong {
                chars,
                limit: self.max_message_chars,
            });
        }
        Ok(())
    }

    /// Fills defaults from `decode.*` and checks every value against `limits.*`.
    pub fn options(&self, o: &MessageOptions) -> Result<DecodeOptions, ValidationError> {
        let d = &self.decode;
        let max_tokens = o.max_tokens.unwrap_or(d.max_tokens);
        if max_tokens == 0 || max_tokens > self.max_reply_tokens {
            let rule = format!("1..={} (limits.max_reply_tokens)", self.max_reply_tokens);
            return Err(ValidationError::option("max_tokens", rule, max_tokens));
        }
        let steps = o.steps.unwrap_or(d.steps.min(max_tokens));
        if steps == 0 || steps > self.max_steps {
            let rule = format!("1..={} (limits.max_steps)", self.max_steps);
            return Err(ValidationError::option("steps", rule, steps));
        }
        let block_length = o.block_length.unwrap_or(d.block_length);
        if block_length == 0 {
            return Err(ValidationError::option("block_length", "at least 1", 0));
        }
        let threshold = o.threshold.unwrap_or(d.threshold);
        if !(threshold > 0.0 && threshold <= 1.0) {
            return Err(ValidationError::option("threshold", "in (0, 1]", threshold));
        }
        let factor = o.factor.unwrap_or(d.factor);
        if !(factor > 0.0 && factor.is_finite()) {
            return Err(ValidationError::option("factor", "positive", factor));
        }
        let temperature = o.temperature.unwrap_or(d.temperature);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ValidationError::option("temperature", "in [0, 2]", temperature));
        }
        let policy = o.policy.unwrap_or(if o.threshold.is_some() {
            PolicyKind::Threshold
        } else if o.factor.is_some() {
            PolicyKind::Factor
        } else if o.steps.is_some() {
            PolicyKind::Fixed
        } else {
            d.policy
        });
        let schedule = match policy {
            PolicyKind::Fixed => Schedule::Fixed,
            PolicyKind::Threshold => Schedule::Threshold { tau: threshold },
            PolicyKind::Factor => Schedule::Factor { factor },
        };
        Ok(DecodeOptions {
            max_tokens,
            steps,
            block_length: block_length.min(max_tokens),
            schedule,
            selection: o.selection.unwrap_or(d.selection),
            defer_repeats: o.defer_repeats.unwrap_or(d.defer_repeats),
            temperature,
            seed: o.seed.unwrap_or(d.seed),
            fill_canvas: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn validator() -> Validator {
        let c = Config::defaults();
        Validator::new(&c.decode, &c.limits).unwrap()
    }

    fn resolve(o: MessageOptions) -> Result<DecodeOptions, ValidationError> {
        validator().options(&o)
    }

    fn message(content: &str) -> NewMessage {
        NewMessage {
            session_id: "s".into(),
            content: content.into(),
            client_message_id: None,
            options: MessageOptions::default(),
        }
    }

    #[test]
    fn defaults_come_from_config() {
        let c = Config::defaults();
        let d = resolve(MessageOptions::default()).unwrap();
        assert_eq!(d.max_tokens, c.decode.max_tokens);
        assert_eq!(
            d.schedule,
            Schedule::Threshold {
                tau: c.decode.threshold
            }
        );
    }

    #[test]
    fn options_spelled_out_from_decode_options_resolve_to_the_same_options() {
        for schedule in [
            Schedule::Fixed,
            Schedule::Threshold { tau: 0.7 },
            Schedule::Factor { factor: 2.5 },
        ] {
            let wanted = DecodeOptions {
                max_tokens: 48,
                steps: 12,
                block_length: 16,
                schedule,
                selection: Selection::Margin,
                defer_repeats: !crate::config::Config::defaults().decode.defer_repeats,
                temperature: 0.5,
                seed: 7,
                fill_canvas: false,
            };
            assert_ne!(
                resolve(MessageOptions::default()).unwrap(),
                wanted,
                "the defaults alone would pass this test"
            );
            // Through the wire form the bench and eval clients send.
            let wire = serde_json::to_string(&MessageOptions::from(&wanted)).unwrap();
            let sent: MessageOptions = serde_json::from_str(&wire).unwrap();
            assert_eq!(resolve(sent).unwrap(), wanted, "{wire}");
        }
    }

    #[test]
    fn policy_follows_the_fields_given() {
        let d = resolve(MessageOptions {
            steps: Some(8),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(d.schedule, Schedule::Fixed);
        let d = resolve(MessageOptions {
            steps: Some(8),
            threshold: Some(0.5),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(d.schedule, Schedule::Threshold { tau: 0.5 });
        let d = resolve(MessageOptions {
            factor: Some(2.0),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(d.schedule, Schedule::Factor { factor: 2.0 });
    }

    #[test]
    fn limits_are_enforced_with_the_value_in_the_message() {
        let e = resolve(MessageOptions {
            max_tokens: Some(100_000),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("100000"), "{e}");
        assert!(e.to_string().contains("options.max_tokens"), "{e}");
        for bad in [
            MessageOptions {
                threshold: Some(1.5),
                ..Default::default()
            },
            MessageOptions {
                temperature: Some(-1.0),
                ..Default::default()
            },
            MessageOptions {
                steps: Some(0),
                ..Default::default()
            },
            MessageOptions {
                block_length: Some(0),
                ..Default::default()
            },
            MessageOptions {
                factor: Some(f32::INFINITY),
                ..Default::default()
            },
        ] {
            assert!(resolve(bad.clone()).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn a_conversation_ends_with_a_user_message_of_known_roles() {
        let v = validator();
        let turn = |role: &str, content: &str| ChatTurn {
            role: role.into(),
            content: content.into(),
        };
        let conversation = |turns: Vec<ChatTurn>| NewConversation {
            system: None,
            turns,
            options: MessageOptions::default(),
        };
        let ok = v
            .conversation(conversation(vec![
                turn("user", "a"),
                turn("assistant", "b"),
                turn("user", "c"),
            ]))
            .unwrap();
        assert_eq!(ok.turns.len(), 3);
        assert_eq!(
            v.conversation(conversation(vec![turn("user", "a"), turn("assistant", "b")])),
            Err(ValidationError::NoUserMessage)
        );
        assert_eq!(
            v.conversation(conversation(vec![])),
            Err(ValidationError::NoUserMessage)
        );
        assert!(matches!(
            v.conversation(conversation(vec![turn("tool", "x"), turn("user", "a")])),
            Err(ValidationError::Role { index: 0, .. })
        ));
        assert_eq!(
            v.conversation(conversation(vec![turn("user", " ")])),
            Err(ValidationError::EmptyContent)
        );
    }

    #[test]
    fn configured_defaults_that_break_a_rule_name_the_setting() {
        let mut c = Config::defaults();
        c.decode.max_tokens = c.limits.max_reply_tokens + 1;
        let e = Validator::new(&c.decode, &c.limits).unwrap_err().to_string();
        assert!(e.starts_with("decode.max_tokens must be"), "{e}");
        let mut c = Config::defaults();
        c.decode.steps = c.limits.max_steps + 1;
        let e = Validator::new(&c.decode, &c.limits).unwrap_err().to_string();
        assert!(e.starts_with("decode.steps"), "{e}");
        let mut c = Config::defaults();
        c.decode.threshold = 0.0;
        let e = Validator::new(&c.decode, &c.limits).unwrap_err().to_string();
        assert!(e.starts_with("decode.threshold"), "{e}");
    }

    #[test]
    fn content_must_be_present_and_within_the_limit() {
        let v = validator();
        assert_eq!(v.message(message("  \n")).unwrap_err(), ValidationError::EmptyContent);
        let limit = Config::defaults().limits.max_message_chars;
        let long = "é".repeat(limit + 1);
        assert_eq!(
            v.message(message(&long)).unwrap_err(),
            ValidationError::ContentTooLong {
                chars: limit + 1,
                limit
            }
        );
        let ok = v.message(message(&"é".repeat(limit))).unwrap();
        assert_eq!(ok.content.chars().count(), limit);
    }
}
