//! The evaluation paths run real GGUF files: the diffusion fixture through the default engine
//! and its `llama` twin through llama.cpp's causal decode.

mod common;

use dllm_tools::eval::{evaluate_autoregressive, evaluate_engine, read_dialogs, IntentClassifier};

const DIALOGS: &str = r#"{"id":"heldout-000000","split":"heldout","turns":[{"role":"user","content":"Where is NW-12345?","intent":"track","facts":["NW-12345"],"slots":{"order":"NW-12345"}},{"role":"assistant","content":"Order NW-12345 has shipped."},{"role":"user","content":"Thanks!","intent":"thanks","facts":[],"slots":{}},{"role":"assistant","content":"You're welcome."}]}
{"id":"heldout-000001","split":"heldout","turns":[{"role":"user","content":"Return policy?","intent":"returns","facts":["30 days"],"slots":{}},{"role":"assistant","content":"Returns within 30 days."}]}
"#;

#[tokio::test]
async fn both_inference_paths_score_every_assistant_turn() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("heldout.jsonl");
    std::fs::write(&file, DIALOGS).unwrap();
    let dialogs = read_dialogs(&file).unwrap();
    let classifier = IntentClassifier::new(&dialogs);
    assert!(classifier.matches("Returns within 30 days.", &Default::default(), "returns"));
    assert!(!classifier.matches("Returns within 30 days.", &Default::default(), "track"));

    let engine = common::start_engine(&common::fixture_config()).await;
    let options = common::fixed_options(8);
    let report = evaluate_engine(engine.as_ref(), "Be brief.", &dialogs, &classifier, &options)
        .await
        .unwrap();
    assert_eq!(report.replies, 3);
    assert_eq!(report.slot_turns, 1);
    assert_eq!(report.latencies.len(), 3);
    assert!(report.steps >= 3 && report.steps <= 24, "{}", report.steps);

    let twin = dir.path().join("twin.gguf");
    let mut spec = ggml_ext::FixtureSpec::default();
    spec.hyperparams.architecture = ggml_ext::Architecture::Llama;
    ggml_ext::write_llada_fixture(&twin, &spec).unwrap();
    let report = tokio::task::spawn_blocking(move || {
        evaluate_autoregressive(&twin, 1, 1024, 8, "Be brief.", &dialogs, &classifier)
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(report.replies, 3);
    assert!(report.completion_tokens <= 24);
    // Autoregressive decoding produces one token per step (a reply ending at once counts one step).
    assert!(
        report.steps >= 3 && report.steps >= report.completion_tokens,
        "{report:?}"
    );
    assert!(report.tokens_per_step() <= 1.0);
    assert!(report.row("twin").starts_with("| twin | 3 |"));
}
