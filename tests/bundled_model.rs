//! The bundled Northwind models (`models/`): both load in llama.cpp, the diffusion model loads in
//! our graph, and the service answers support questions with them through the real server.

mod common;

use std::path::PathBuf;

use common::TestServer;
use dllm_chat::engine::HistoryWindow;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use serde_json::json;

fn bundled(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models").join(name)
}

#[test]
fn both_bundled_models_load_in_llama_cpp_and_the_diffusion_model_in_our_graph() {
    let backend = dllm_chat::engine::vocab::backend().unwrap();
    for (file, architecture) in [
        ("northwind-llada-q8_0.gguf", "llada"),
        ("northwind-llama-q8_0.gguf", "llama"),
    ] {
        let path = bundled(file);
        assert!(
            std::fs::metadata(&path).unwrap().len() < 30 << 20,
            "{file} is at most 30 MB"
        );
        let model = LlamaModel::load_from_file(backend, &path, &LlamaModelParams::default()).unwrap();
        assert_eq!(model.meta_val_str("general.architecture").unwrap(), architecture);
    }
    let runtime = ggml_ext::runtime::DiffusionModel::load(
        &bundled("northwind-llada-q8_0.gguf"),
        ggml_ext::runtime::RuntimeConfig::default(),
    )
    .unwrap();
    assert_eq!(runtime.shape().n_layer, 4);
    assert!(runtime.shape().mask_token.is_some());
    // The built-in path serves the same bytes.
    let builtin = dllm_chat::models::resolve(dllm_chat::models::BUILTIN_NORTHWIND).unwrap();
    assert_eq!(
        std::fs::read(builtin).unwrap(),
        std::fs::read(bundled("northwind-llada-q8_0.gguf")).unwrap()
    );
}

/// A server on the built-in model with a 64-token canvas in blocks of 32, as the eval and bench run it.
async fn bundled_server() -> TestServer {
    TestServer::start(bundled_config()).await
}

fn bundled_config() -> dllm_chat::config::Config {
    let mut config = common::test_config();
    config.model.path = dllm_chat::models::resolve(dllm_chat::models::BUILTIN_NORTHWIND)
        .unwrap()
        .display()
        .to_string();
    config.decode.max_tokens = 64;
    config.decode.steps = 64;
    config.decode.block_length = 32;
    config
}

/// Sends `question` in `session` and returns the completed reply's text.
async fn ask(client: &mut common::Client, session: &str, question: &str) -> String {
    let events = client.exchange(session, question, json!({})).await;
    let done = events.last().unwrap();
    assert_eq!(done["status"], "completed", "{done}");
    done["text"].as_str().unwrap().to_owned()
}

/// Questions phrased as in training get their policy back, over a WebSocket, with the default
/// engine and decoding settings. The model routes most training phrasings right, not all (98% of the
/// replies of 300 training dialogs, `models/README.md`), so the test needs five of six. A reply
/// that hands over to a person is marked so, in `response.done` and in the history.
#[tokio::test]
async fn the_service_answers_support_questions_with_the_bundled_model() {
    let server = bundled_server().await;
    let mut client = server.connect().await;
    let session = client.create_session().await;
    let mut marked = Vec::new();
    let questions = [
        ("Do gift cards expire?", "never expire"),
        ("Can I talk to a human?", "human agent"),
        ("Will my gift card ever expire?", "never expire"),
        ("Get me a human agent", "human agent"),
        ("Do gift card balances expire?", "never expire"),
        ("Please escalate this to a human", "human agent"),
    ];
    let mut answered = 0;
    for (question, expected) in questions {
        let events = client.exchange(&session, question, json!({})).await;
        let done = events.last().unwrap();
        assert_eq!(done["status"], "completed", "{done}");
        let text = done["text"].as_str().unwrap();
        eprintln!("{question:?}: {text}");
        answered += usize::from(text.contains(expected));
        let handover = done.get("handover") == Some(&json!(true));
        assert_eq!(
            handover,
            text.to_lowercase().contains("handing you over to a human"),
            "{done}"
        );
        marked.push(handover);
    }
    let n = questions.len();
    assert!(answered + 1 >= n, "{answered} of {n} questions got their policy");
    assert!(
        marked.iter().filter(|m| **m).count() >= 2,
        "hand-overs marked: {marked:?}"
    );

    client
        .send(json!({"type": "session.resume", "session_id": session}))
        .await;
    let resumed = client.until("session.resumed").await;
    let history = resumed.last().unwrap()["messages"].as_array().unwrap().clone();
    let stored: Vec<bool> = history
        .iter()
        .filter(|m| m["role"] == "assistant")
        .map(|m| m.get("handover") == Some(&json!(true)))
        .collect();
    assert_eq!(stored, marked, "the history marks the same replies");
    server.stop().await;
}

/// An order number the user gives comes back verbatim, and a follow-up in the same session ("can I
/// still cancel it?") answers about that order: the conversation context reaches the model. The model
/// copies most numbers, not all (held-out slot accuracy in `models/README.md`), so the test asks about
/// several and needs most of them back.
#[tokio::test]
async fn an_order_number_question_gets_that_number_back() {
    let server = bundled_server().await;
    let orders = [
        "NW-48214", "NW-90317", "NW-25563", "NW-61870", "NW-37402", "NW-15938", "NW-72651", "NW-84096",
    ];
    let (mut asked, mut followed) = (0, 0);
    for order in orders {
        // A connection per order: one connection's message burst is smaller than the whole test.
        let mut client = server.connect().await;
        let session = client.create_session().await;
        let text = ask(&mut client, &session, &format!("Where is my order {order}?")).await;
        eprintln!("{order}: {text}");
        assert!(text.contains("NW-"), "{order}: the reply names no order: {text:?}");
        asked += usize::from(text.contains(order));
        let text = ask(&mut client, &session, "Can I still cancel it?").await;
        eprintln!("{order} follow-up: {text}");
        assert!(text.contains("cancel"), "{order} follow-up: {text:?}");
        followed += usize::from(text.contains(order));
    }
    let n = orders.len();
    eprintln!("verbatim: {asked}/{n} asked, {followed}/{n} followed up");
    assert!(asked * 4 >= n * 3, "{asked} of {n} numbers came back");
    assert!(followed * 4 >= n * 3, "{followed} of {n} follow-ups named the order");
    server.stop().await;
}

/// `builtin:northwind-twin` is served by the autoregressive engine (`engine = "auto"`) through the
/// same server and protocol: the revisions grow the reply left to right.
#[tokio::test]
async fn the_twin_is_served_by_the_autoregressive_engine_through_the_same_protocol() {
    let mut config = common::test_config();
    config.model.path = dllm_chat::models::resolve(dllm_chat::models::BUILTIN_NORTHWIND_TWIN)
        .unwrap()
        .display()
        .to_string();
    let server = TestServer::start(config).await;
    let mut client = server.connect().await;
    let session = client.create_session().await;
    let events = client
        .exchange(&session, "Do gift cards expire?", json!({"max_tokens": 64}))
        .await;
    let done = events.last().unwrap();
    assert_eq!(done["status"], "completed", "{done}");
    let text = done["text"].as_str().unwrap();
    assert!(text.contains("never expire"), "{text}");
    let revisions: Vec<&str> = common::revisions(&events)
        .iter()
        .map(|r| r["text"].as_str().unwrap())
        .collect();
    assert!(revisions.len() >= 2, "{events:?}");
    assert!(revisions.windows(2).all(|w| w[1].starts_with(w[0])), "{revisions:?}");
    assert_eq!(*revisions.last().unwrap(), text);
    server.stop().await;
}

/// A ten-turn support conversation in one session, in phrasings the model never saw in training
/// (the held-out ones of the domain file): an order, then warranty, returns, refunds, express
/// shipping, payment, discounts, gift cards, loyalty points and a human agent. The model was trained on
/// prompts of at most 231 tokens and the file says so; by the sixth turn the history is longer. With
/// the default history window the later turns are answered as well as the early ones (the model
/// misroutes about one held-out question in six, so four of five must hold); with the whole
/// history they fell apart before the window existed, which the test prints beside.
#[tokio::test]
async fn a_ten_turn_conversation_holds_with_the_history_window() {
    let turns = [
        ("Is NW-48214 on its way?", "NW-48214"),
        ("Tell me about warranty coverage", "lifetime"),
        ("What are the rules for sending stuff back?", "30 days"),
        ("How many days until the refund posts?", "5-7 business days"),
        ("Price of rush shipping?", "$14.95"),
        ("Is Amex ok?", "American Express"),
        ("Can students save on gear?", "10%"),
        ("Will my gift card stop working someday?", "never expire"),
        ("Explain the points system", "Trail Points"),
        ("Can a live agent take over?", "human agent"),
    ];
    let mut later = Vec::new();
    for window in [HistoryWindow::Trained, HistoryWindow::Off] {
        let mut config = bundled_config();
        config.model.history_window = window;
        let server = TestServer::start(config).await;
        let mut client = server.connect().await;
        let session = client.create_session().await;
        let mut right = 0;
        for (i, (question, fact)) in turns.iter().enumerate() {
            let text = ask(&mut client, &session, question).await;
            eprintln!("{window:?} turn {}: {question:?}: {text}", i + 1);
            right += usize::from(i >= 5 && text.contains(fact));
        }
        later.push(right);
        server.stop().await;
    }
    eprintln!(
        "turns 6-10 right: {} with the window, {} with the whole history",
        later[0], later[1]
    );
    assert!(
        later[0] >= 4,
        "{} of turns 6-10 right with the history window",
        later[0]
    );
}
