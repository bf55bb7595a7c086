//! The short version of `dllm-tools load` that CI runs: a real `dllm-chat serve` child on
//! loopback holds a few hundred WebSocket connections opened at once, some of which then chat.
//! It checks that everything was served; the figures (handshake times, memory per connection)
//! are printed, not asserted: the full run is the tool's.

use std::time::Duration;

use dllm_tools::load::{report, run, LoadPlan};

#[tokio::test]
async fn a_replica_holds_a_burst_of_connections_and_answers_them() {
    // Integration tests run from target/<profile>/deps; the service binary sits one level up
    // (`cargo test --workspace` builds it for the service's own tests).
    let exe = std::env::current_exe().unwrap();
    let server = exe.parent().and_then(|d| d.parent()).unwrap().join("dllm-chat");
    assert!(
        server.exists(),
        "{} is built by `cargo test --workspace`",
        server.display()
    );
    let plan = LoadPlan {
        server,
        model: "builtin:fixture".into(),
        steps: vec![300],
        chatting: 8,
        messages: 2,
        step_deadline: Duration::from_secs(60),
    };
    let (steps, chat) = run(&plan).await.expect("the load run completes");
    println!("{}", report(&steps, &chat));
    let step = &steps[0];
    assert_eq!(step.opened, 300, "every connection was accepted: {:?}", step.failures);
    assert!(step.failures.is_empty(), "{:?}", step.failures);
    assert!(step.server_rss_kib > 0, "the server's memory was read");
    assert_eq!(
        chat.replies, 16,
        "every chatting client got its replies: {:?}",
        chat.errors
    );
    assert!(chat.errors.is_empty(), "{:?}", chat.errors);
}
