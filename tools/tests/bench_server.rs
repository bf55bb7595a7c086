//! The bench's server runs: a real in-process server on loopback with the fixture engine and real
//! WebSocket clients, asked single questions or whole conversations.

mod common;

use dllm_tools::bench::{self, server::Asked};
use dllm_tools::eval::read_dialogs;

const DIALOGS: &str = r#"{"id":"heldout-000000","split":"heldout","turns":[{"role":"user","content":"Where is NW-12345?","intent":"track","facts":["NW-12345"],"slots":{"order":"NW-12345"}},{"role":"assistant","content":"Order NW-12345 has shipped."},{"role":"user","content":"When does it arrive?","intent":"delivery","facts":[],"slots":{}},{"role":"assistant","content":"In 3 to 5 days."},{"role":"user","content":"Thanks!","intent":"thanks","facts":[],"slots":{}},{"role":"assistant","content":"You're welcome."}]}
{"id":"heldout-000001","split":"heldout","turns":[{"role":"user","content":"Return policy?","intent":"returns","facts":["30 days"],"slots":{}},{"role":"assistant","content":"Returns within 30 days."},{"role":"user","content":"And refunds?","intent":"refunds","facts":[],"slots":{}},{"role":"assistant","content":"Within 5 days."}]}
"#;

#[tokio::test]
async fn a_conversation_run_sends_every_user_turn_and_times_every_reply() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("heldout.jsonl");
    std::fs::write(&file, DIALOGS).unwrap();
    let conversations = bench::conversations(&read_dialogs(&file).unwrap());
    assert_eq!(conversations.len(), 2);

    let config = common::fixture_config();
    let engine = common::start_engine(&config).await;
    let options = common::fixed_options(8);
    for (asked, replies) in [(Asked::LastMessage, 2), (Asked::EveryUserTurn, 3 + 2)] {
        let run = bench::server::run_concurrent(&config, engine.clone(), &conversations, &options, asked, 2, 2)
            .await
            .expect("the run completes");
        assert_eq!(run.replies.len(), replies, "{asked:?}");
        assert!(run.replies.iter().all(|d| !d.is_zero()), "{asked:?}: {:?}", run.replies);
    }
}
