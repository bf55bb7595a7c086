//! `protocol::parse` on arbitrary bytes: never panics; errors carry a code `parse` documents and
//! keep a string `event_id`.
#![no_main]

use dllm_chat::protocol::{parse, ErrorCode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let event_id = serde_json::from_str::<serde_json::Value>(text)
        .ok()
        .and_then(|v| v.get("event_id").and_then(|e| e.as_str()).map(str::to_owned));
    match parse(text) {
        Ok(e) => assert_eq!(e.event_id, event_id),
        Err(e) => {
            assert!(matches!(
                e.code,
                ErrorCode::InvalidJson | ErrorCode::UnknownType | ErrorCode::InvalidField
            ));
            if event_id.is_some() {
                assert_eq!(e.event_id, event_id);
            }
        }
    }
});
