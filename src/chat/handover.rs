//! Recognising the reply that hands a conversation to a person. The bundled model answers
//! "talk to a human" with a fixed sentence; the core marks such a reply, the message stored for
//! it and its `response.done` (`handover: true`), so every front end shows or acts on it the
//! same way: the widget draws it as a hand-over, the Chatwoot bot opens the conversation for an
//! agent.

/// The phrases (`chat.handover_phrases`) that mark a hand-over, matched case-insensitively.
#[derive(Debug, Clone, Default)]
pub(crate) struct Handover {
    phrases: Vec<String>,
}

impl Handover {
    pub fn new(phrases: &[String]) -> Self {
        Self {
            phrases: phrases
                .iter()
                .map(|p| p.trim().to_lowercase())
                .filter(|p| !p.is_empty())
                .collect(),
        }
    }

    pub fn is_handover(&self, reply: &str) -> bool {
        if self.phrases.is_empty() {
            return false;
        }
        let reply = reply.to_lowercase();
        self.phrases.iter().any(|p| reply.contains(p.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_a_phrase_anywhere_in_any_case_and_ignores_blank_phrases() {
        let handover = Handover::new(&["Handing you over to a human".into(), "  ".into()]);
        assert!(handover.is_handover("Of course. I'm HANDING YOU OVER TO A HUMAN agent now."));
        assert!(!handover.is_handover("Your order ships tomorrow."));
        assert!(!Handover::new(&["".into()]).is_handover("anything"));
        assert!(!Handover::default().is_handover("handing you over to a human"));
    }
}
