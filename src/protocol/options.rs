//! Decode options of `message.create`, validated against the configured defaults and limits.
//!
//! Policy choice when `policy` is not given: `threshold` given -> threshold; `factor` given ->
//! factor; `steps` given -> the fixed schedule; otherwise `decode.policy` from config.

use serde::{Deserialize, Serialize};

use super::{ErrorCode, WireError};
use crate::config::{DecodeConfig, LimitsConfig, PolicyKind};
use crate::engine::{DecodeOptions, Schedule, Selection};

/// Options as the client sent them; every field is optional.
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
    pub temperature: Option<f32>,
    pub seed: Option<u64>,
}

fn invalid(message: String) -> WireError {
    WireError::new(ErrorCode::InvalidField, message)
}

impl MessageOptions {
    /// Fills defaults from `decode` and checks every value against `limits`.
    pub fn resolve(&self, decode: &DecodeConfig, limits: &LimitsConfig) -> Result<DecodeOptions, WireError> {
        let max_tokens = self.max_tokens.unwrap_or(decode.max_tokens);
        if max_tokens == 0 || max_tokens > limits.max_reply_tokens {
            return Err(invalid(format!(
                "options.max_tokens must be 1..={}; given {max_tokens}",
                limits.max_reply_tokens
            )));
        }
        let steps = self.steps.unwrap_or(decode.steps.min(max_tokens));
        if steps == 0 || steps > limits.max_steps {
            return Err(invalid(format!(
                "options.steps must be 1..={}; given {steps}",
                limits.max_steps
            )));
        }
        let block_length = self.block_length.unwrap_or(decode.block_length);
        if block_length == 0 {
            return Err(invalid("options.block_length must be at least 1; given 0".into()));
        }
        let threshold = self.threshold.unwrap_or(decode.threshold);
        if !(threshold > 0.0 && threshold <= 1.0) {
            return Err(invalid(format!(
                "options.threshold must be in (0, 1]; given {threshold}"
            )));
        }
        let factor = self.factor.unwrap_or(decode.factor);
        if !(factor > 0.0 && factor.is_finite()) {
            return Err(invalid(format!("options.factor must be positive; given {factor}")));
        }
        let temperature = self.temperature.unwrap_or(decode.temperature);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(invalid(format!(
                "options.temperature must be in [0, 2]; given {temperature}"
            )));
        }
        let policy = self.policy.unwrap_or(if self.threshold.is_some() {
            PolicyKind::Threshold
        } else if self.factor.is_some() {
            PolicyKind::Factor
        } else if self.steps.is_some() {
            PolicyKind::Fixed
        } else {
            decode.policy
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
            selection: self.selection.unwrap_or(decode.selection),
            temperature,
            seed: self.seed.unwrap_or(decode.seed),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn resolve(o: MessageOptions) -> Result<DecodeOptions, WireError> {
        let c = Config::defaults();
        o.resolve(&c.decode, &c.limits)
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
        assert_eq!(e.code, ErrorCode::InvalidField);
        assert!(e.message.contains("100000"), "{}", e.message);
        assert!(resolve(MessageOptions {
            threshold: Some(1.5),
            ..Default::default()
        })
        .is_err());
        assert!(resolve(MessageOptions {
            temperature: Some(-1.0),
            ..Default::default()
        })
        .is_err());
        assert!(resolve(MessageOptions {
            steps: Some(0),
            ..Default::default()
        })
        .is_err());
        assert!(resolve(MessageOptions {
            block_length: Some(0),
            ..Default::default()
        })
        .is_err());
    }
}
