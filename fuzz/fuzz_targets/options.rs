//! `options` of a `message.create` frame, then `Validator::options` / `message`: never panics,
//! and what is accepted is within the documented bounds.
#![no_main]

use std::sync::OnceLock;

use dllm_chat::chat::{NewMessage, Validator};
use dllm_chat::config::Config;
use dllm_chat::engine::Schedule;
use dllm_chat::protocol::{parse, ClientEvent};
use libfuzzer_sys::fuzz_target;

fn setup() -> &'static (Validator, Config) {
    static V: OnceLock<(Validator, Config)> = OnceLock::new();
    V.get_or_init(|| {
        let c = Config::defaults();
        (Validator::new(&c.decode, &c.limits).unwrap(), c)
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // The input is the value of `options` (and, after a NUL, the content).
    let (options, content) = text.split_once('\0').unwrap_or((text, "hi"));
    let Ok(options) = serde_json::from_str::<serde_json::Value>(options) else {
        return;
    };
    let frame =
        serde_json::json!({"type": "message.create", "session_id": "s", "content": content, "options": options});
    let Ok(e) = parse(&frame.to_string()) else {
        return;
    };
    let ClientEvent::MessageCreate(m) = e.event else {
        panic!("a message.create frame parsed as another event")
    };
    let (v, c) = setup();
    let l = &c.limits;
    if let Ok(d) = v.options(&m.options) {
        assert!((1..=l.max_reply_tokens).contains(&d.max_tokens));
        assert!((1..=l.max_steps).contains(&d.steps));
        assert!(d.block_length >= 1 && d.block_length <= d.max_tokens);
        assert!((0.0..=2.0).contains(&d.temperature));
        match d.schedule {
            Schedule::Fixed => {}
            Schedule::Threshold { tau } => assert!(tau > 0.0 && tau <= 1.0),
            Schedule::Factor { factor } => assert!(factor > 0.0 && factor.is_finite()),
        }
    }
    let message = NewMessage {
        session_id: m.session_id,
        content: m.content,
        client_message_id: m.client_message_id,
        options: m.options,
    };
    if let Ok(valid) = v.message(message) {
        assert!(!valid.content.trim().is_empty());
        assert!(valid.content.chars().count() <= l.max_message_chars);
    }
});
