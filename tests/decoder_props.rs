//! Property tests of the decoders that read hostile input: `protocol::parse` (client frames),
//! `Validator::options` / `message` (decode options and content), and `Config::load` +
//! `validate` (TOML over the defaults). None may panic; errors are typed; what is accepted is
//! within the documented bounds (`docs/protocol.md`).

use std::io::Write;

use dllm_chat::chat::{MessageOptions, NewMessage, Validator};
use dllm_chat::config::Config;
use dllm_chat::engine::{PolicyKind, Schedule, Selection};
use dllm_chat::protocol::{parse, ClientEvent, ErrorCode};
use proptest::prelude::*;
use serde_json::{json, Map, Value};

/// The codes `parse` may give (docs/protocol.md, "Errors").
const PARSE_CODES: [ErrorCode; 3] = [ErrorCode::InvalidJson, ErrorCode::UnknownType, ErrorCode::InvalidField];

const TYPES: [&str; 5] = [
    "session.create",
    "session.resume",
    "message.create",
    "response.cancel",
    "response.resume",
];

const FIELDS: [&str; 12] = [
    "type",
    "event_id",
    "session_id",
    "content",
    "client_message_id",
    "options",
    "metadata",
    "after",
    "response_id",
    "after_revision",
    "max_tokens",
    "steps",
];

fn json_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("JSON has no NaN or infinity", |f| f.is_finite())
            .prop_map(Value::from),
        ".{0,12}".prop_map(Value::from),
        prop::sample::select(TYPES.to_vec()).prop_map(Value::from),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    json_leaf().prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec(
                (
                    prop_oneof![prop::sample::select(FIELDS.to_vec()).prop_map(String::from), ".{0,6}"],
                    inner
                ),
                0..6
            )
            .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// A frame-shaped object: a `type` (usually a real one), maybe an `event_id`, random fields.
fn frame_object() -> impl Strategy<Value = Value> {
    let kind = prop_oneof![4 => prop::sample::select(TYPES.to_vec()).prop_map(Value::from), 1 => json_leaf()];
    let event_id = prop_oneof![2 => ".{0,8}".prop_map(Value::from), 1 => json_leaf()];
    let fields = prop::collection::vec((prop::sample::select(FIELDS.to_vec()), json_value()), 0..6);
    (prop::option::of(kind), prop::option::of(event_id), fields).prop_map(|(kind, event_id, fields)| {
        let mut m = Map::new();
        for (k, v) in fields {
            m.insert(k.into(), v);
        }
        if let Some(k) = kind {
            m.insert("type".into(), k);
        }
        if let Some(e) = event_id {
            m.insert("event_id".into(), e);
        }
        Value::Object(m)
    })
}

fn check_parse(text: &str) -> Result<(), TestCaseError> {
    let event_id = serde_json::from_str::<Value>(text)
        .ok()
        .and_then(|v| v.get("event_id").and_then(Value::as_str).map(str::to_owned));
    match parse(text) {
        Ok(envelope) => prop_assert_eq!(envelope.event_id, event_id),
        Err(e) => {
            prop_assert!(PARSE_CODES.contains(&e.code), "code {:?} for {}", e.code, text);
            prop_assert!(!e.message.is_empty());
            if event_id.is_some() {
                prop_assert_eq!(e.event_id, event_id, "{}", text);
            }
        }
    }
    Ok(())
}

fn options_value() -> impl Strategy<Value = Value> {
    let num = prop_oneof![
        Just(json!(0)),
        Just(json!(1)),
        Just(json!(-1)),
        Just(json!(u64::MAX)),
        (0u64..2000).prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        (-3.0f64..3.0).prop_map(Value::from),
        json_leaf(),
    ];
    let names = vec![
        "max_tokens",
        "steps",
        "block_length",
        "policy",
        "threshold",
        "factor",
        "selection",
        "temperature",
        "seed",
    ];
    let enum_value = prop::sample::select(vec![
        "fixed",
        "threshold",
        "factor",
        "confidence",
        "margin",
        "entropy",
        "x",
    ])
    .prop_map(Value::from);
    prop::collection::vec(
        (prop::sample::select(names), prop_oneof![3 => num, 1 => enum_value]),
        0..6,
    )
    .prop_map(|kv| Value::Object(kv.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()))
}

fn typed_options() -> impl Strategy<Value = MessageOptions> {
    let size = || prop::option::of(prop_oneof![0usize..2000, Just(usize::MAX), any::<usize>()]);
    let float = || {
        prop::option::of(prop_oneof![
            -3.0f32..3.0,
            any::<f32>(),
            Just(f32::NAN),
            Just(f32::INFINITY),
            Just(0.0),
            Just(1.0),
            Just(2.0)
        ])
    };
    let policy = prop::option::of(prop::sample::select(vec![
        PolicyKind::Fixed,
        PolicyKind::Threshold,
        PolicyKind::Factor,
    ]));
    let selection = prop::option::of(prop::sample::select(vec![
        Selection::Confidence,
        Selection::Margin,
        Selection::Entropy,
    ]));
    (
        size(),
        size(),
        size(),
        policy,
        float(),
        float(),
        selection,
        float(),
        prop::option::of(any::<u64>()),
        prop::option::of(any::<bool>()),
    )
        .prop_map(
            |(
                max_tokens,
                steps,
                block_length,
                policy,
                threshold,
                factor,
                selection,
                temperature,
                seed,
                defer_repeats,
            )| {
                MessageOptions {
                    max_tokens,
                    steps,
                    block_length,
                    policy,
                    threshold,
                    factor,
                    selection,
                    defer_repeats,
                    temperature,
                    seed,
                }
            },
        )
}

fn validator() -> (Validator, Config) {
    let c = Config::defaults();
    (Validator::new(&c.decode, &c.limits).unwrap(), c)
}

fn check_options(o: &MessageOptions) -> Result<(), TestCaseError> {
    let (v, c) = validator();
    let Ok(d) = v.options(o) else { return Ok(()) };
    let l = &c.limits;
    prop_assert!((1..=l.max_reply_tokens).contains(&d.max_tokens), "{:?}", d);
    prop_assert!((1..=l.max_steps).contains(&d.steps), "{:?}", d);
    prop_assert!(d.block_length >= 1 && d.block_length <= d.max_tokens, "{:?}", d);
    prop_assert!((0.0..=2.0).contains(&d.temperature), "{:?}", d);
    match d.schedule {
        Schedule::Fixed => {}
        Schedule::Threshold { tau } => prop_assert!(tau > 0.0 && tau <= 1.0, "{:?}", d),
        Schedule::Factor { factor } => prop_assert!(factor > 0.0 && factor.is_finite(), "{:?}", d),
    }
    // What the client gave is what is used.
    if let Some(m) = o.max_tokens {
        prop_assert_eq!(d.max_tokens, m);
    }
    if let Some(s) = o.steps {
        prop_assert_eq!(d.steps, s);
    }
    if let Some(s) = o.seed {
        prop_assert_eq!(d.seed, s);
    }
    Ok(())
}

/// Keys of the config, with a few that do not exist.
fn config_key() -> impl Strategy<Value = (&'static str, &'static str)> {
    prop::sample::select(vec![
        ("server", "bind"),
        ("server", "max_connections"),
        ("server", "ping_interval_ms"),
        ("server", "idle_timeout_ms"),
        ("server", "outgoing_queue"),
        ("server", "listen_backlog"),
        ("server", "ws_read_buffer_bytes"),
        ("server", "allowed_origins"),
        ("limits", "max_frame_bytes"),
        ("limits", "hard_frame_bytes"),
        ("limits", "max_message_chars"),
        ("limits", "max_running_replies"),
        ("limits", "kept_conversation_caches"),
        ("limits", "messages_per_minute"),
        ("limits", "message_burst"),
        ("limits", "max_reply_tokens"),
        ("limits", "max_steps"),
        ("quotas", "key_connections"),
        ("quotas", "key_message_burst"),
        ("quotas", "ip_requests_per_minute"),
        ("quotas", "slot_ttl_secs"),
        ("server", "client_address_header"),
        ("model", "path"),
        ("model", "engine"),
        ("model", "device"),
        ("model", "top_k"),
        ("model", "threads"),
        ("model", "context_length"),
        ("decode", "max_tokens"),
        ("decode", "steps"),
        ("decode", "block_length"),
        ("decode", "policy"),
        ("decode", "threshold"),
        ("decode", "factor"),
        ("decode", "temperature"),
        ("store", "url"),
        ("store", "reply_log_events"),
        ("chat", "lease_ms"),
        ("auth", "keys"),
        ("prompt", "mask_placeholder"),
        ("chatwoot", "enabled"),
        ("chatwoot", "base_url"),
        ("chatwoot", "webhook_secret"),
        ("nope", "nothing"),
        ("server", "bogus"),
    ])
}

fn toml_value() -> impl Strategy<Value = String> {
    prop_oneof![
        (0i64..5000).prop_map(|v| v.to_string()),
        any::<i64>().prop_map(|v| v.to_string()),
        Just("-1".to_owned()),
        Just("0".to_owned()),
        Just("18446744073709551615".to_owned()),
        Just("99999999999999999999999".to_owned()),
        (-3.0f64..3.0).prop_map(|f| format!("{f:?}")),
        Just("nan".to_owned()),
        Just("inf".to_owned()),
        any::<bool>().prop_map(|b| b.to_string()),
        "[ -~]{0,16}".prop_map(|s| format!("{s:?}")),
        Just("\"redis://127.0.0.1:1\"".to_owned()),
        Just("\"http://x\"".to_owned()),
        Just("[]".to_owned()),
        Just("[\"*\", \"http://a.example\", \"\"]".to_owned()),
        Just("[{ name = \"a\", key = \"0123456789abcdef0123456789abcdef\" }, { name = \"\" }]".to_owned()),
        Just("{}".to_owned()),
    ]
}

fn toml_snippet() -> impl Strategy<Value = String> {
    let structured = prop::collection::vec((config_key(), toml_value()), 0..8).prop_map(|entries| {
        let mut out = String::new();
        for ((section, key), value) in entries {
            out.push_str(&format!("[{section}]\n{key} = {value}\n"));
        }
        out
    });
    // Duplicate tables are a TOML error, which is fine: that error must come back typed too.
    prop_oneof![4 => structured, 1 => "[ -~\n]{0,64}"]
}

fn check_config(snippet: &str) -> Result<(), TestCaseError> {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(snippet.as_bytes()).unwrap();
    if let Ok(config) = Config::load(Some(file.path())) {
        if config.validate().is_ok() {
            // A valid config builds a validator or says which default breaks a rule.
            let _ = Validator::new(&config.decode, &config.limits);
            let _ = config.engine_settings();
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn parse_never_panics_on_arbitrary_text(text in "\\PC{0,64}") {
        check_parse(&text)?;
    }

    #[test]
    fn parse_never_panics_on_arbitrary_json(value in json_value()) {
        check_parse(&value.to_string())?;
    }

    #[test]
    fn parse_types_every_error_of_frame_shaped_objects(value in frame_object()) {
        check_parse(&value.to_string())?;
    }

    #[test]
    fn truncated_frames_are_invalid_json(value in frame_object(), cut in any::<prop::sample::Index>()) {
        let text = value.to_string();
        let cut = cut.index(text.len());
        if let Some(prefix) = text.get(..cut) {
            check_parse(prefix)?;
            if cut < text.len() {
                prop_assert_eq!(parse(prefix).unwrap_err().code, ErrorCode::InvalidJson);
            }
        }
    }

    #[test]
    fn valid_frames_round_trip_their_fields(
        event_id in prop::option::of(".{0,10}"),
        session_id in ".{0,10}",
        content in ".{0,20}",
        client_message_id in prop::option::of(".{0,10}"),
        id in ".{0,10}",
        after in prop::option::of(".{0,10}"),
        after_revision in prop::option::of(any::<usize>()),
        max_tokens in prop::option::of(any::<usize>()),
        seed in prop::option::of(any::<u64>()),
        metadata in prop::collection::btree_map(".{0,5}", json_leaf(), 0..4),
    ) {
        let with_id = |mut v: Value| {
            if let Some(e) = &event_id {
                v["event_id"] = json!(e);
            }
            v.to_string()
        };
        let e = parse(&with_id(json!({"type": "session.create", "metadata": metadata}))).unwrap();
        prop_assert_eq!(&e.event_id, &event_id);
        let expected: Map<String, Value> = metadata.into_iter().collect();
        prop_assert_eq!(e.event, ClientEvent::SessionCreate { metadata: Value::Object(expected) });

        let e = parse(&with_id(json!({"type": "session.resume", "session_id": session_id, "after": after}))).unwrap();
        prop_assert_eq!(e.event, ClientEvent::SessionResume { session_id: session_id.clone(), after: after.clone() });

        let mut options = Map::new();
        if let Some(m) = max_tokens { options.insert("max_tokens".into(), json!(m)); }
        if let Some(s) = seed { options.insert("seed".into(), json!(s)); }
        let e = parse(&with_id(json!({"type": "message.create", "session_id": session_id, "content": content,
            "client_message_id": client_message_id, "options": options}))).unwrap();
        let ClientEvent::MessageCreate(m) = e.event else { panic!("not a message") };
        prop_assert_eq!(&m.session_id, &session_id);
        prop_assert_eq!(&m.content, &content);
        prop_assert_eq!(&m.client_message_id, &client_message_id);
        prop_assert_eq!(m.options.max_tokens, max_tokens);
        prop_assert_eq!(m.options.seed, seed);

        let e = parse(&with_id(json!({"type": "response.cancel", "response_id": id}))).unwrap();
        prop_assert_eq!(e.event, ClientEvent::ResponseCancel { response_id: id.clone() });
        let e = parse(&with_id(json!({"type": "response.resume", "response_id": id, "after_revision": after_revision}))).unwrap();
        prop_assert_eq!(e.event_id, event_id);
        prop_assert_eq!(e.event, ClientEvent::ResponseResume { response_id: id, after_revision });
    }

    #[test]
    fn options_from_the_wire_resolve_within_bounds(options in options_value()) {
        let frame = json!({"type": "message.create", "session_id": "s", "content": "hi", "options": options});
        match parse(&frame.to_string()) {
            Ok(e) => {
                let ClientEvent::MessageCreate(m) = e.event else { panic!("not a message") };
                check_options(&m.options)?;
            }
            Err(e) => prop_assert_eq!(e.code, ErrorCode::InvalidField),
        }
    }

    #[test]
    fn typed_options_resolve_within_bounds(options in typed_options()) {
        check_options(&options)?;
    }

    #[test]
    fn messages_are_accepted_only_within_the_content_rules(content in "\\PC{0,40}|\\s{0,5}", long in 0usize..3, options in typed_options()) {
        let (v, c) = validator();
        let content = match long {
            0 => content,
            1 => "é".repeat(c.limits.max_message_chars),
            _ => "é".repeat(c.limits.max_message_chars + 1),
        };
        let m = NewMessage { session_id: "s".into(), content: content.clone(), client_message_id: None, options };
        if let Ok(valid) = v.message(m) {
            prop_assert!(!valid.content.trim().is_empty());
            prop_assert!(valid.content.chars().count() <= c.limits.max_message_chars);
            prop_assert!(valid.options.block_length <= valid.options.max_tokens);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn config_load_and_validate_never_panic(snippet in toml_snippet()) {
        check_config(&snippet)?;
    }
}

/// The committed cargo-fuzz corpus of `target` (`fuzz/corpus/`, seeds and what the runs found),
/// as UTF-8 inputs: the fuzz targets skip the rest too.
fn fuzz_corpus(target: &str) -> Vec<(String, String)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut inputs: Vec<(String, String)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|entry| {
            let path = entry.unwrap().path();
            let text = String::from_utf8(std::fs::read(&path).unwrap()).ok()?;
            Some((path.file_name().unwrap().to_string_lossy().into_owned(), text))
        })
        .collect();
    inputs.sort();
    assert!(!inputs.is_empty(), "no corpus in {}", dir.display());
    inputs
}

/// Every input the fuzzers kept still holds the properties, on stable, in every test run.
#[test]
fn the_committed_fuzz_corpora_hold_the_same_properties() {
    let mut replayed = 0;
    for (name, text) in fuzz_corpus("protocol_parse") {
        check_parse(&text).unwrap_or_else(|e| panic!("protocol_parse/{name}: {e}"));
        replayed += 1;
    }
    for (name, text) in fuzz_corpus("options") {
        // As the fuzz target reads it: the options' JSON, then after a NUL the content.
        let (options, content) = text.split_once('\0').unwrap_or((&text, "hi"));
        let Ok(options) = serde_json::from_str::<Value>(options) else {
            continue;
        };
        let frame = json!({"type": "message.create", "session_id": "s", "content": content, "options": options});
        if let Ok(envelope) = parse(&frame.to_string()) {
            let ClientEvent::MessageCreate(m) = envelope.event else {
                panic!("options/{name}: a message.create frame parsed as another event")
            };
            check_options(&m.options).unwrap_or_else(|e| panic!("options/{name}: {e}"));
        }
        replayed += 1;
    }
    for (name, text) in fuzz_corpus("config") {
        check_config(&text).unwrap_or_else(|e| panic!("config/{name}: {e}"));
        replayed += 1;
    }
    eprintln!("{replayed} committed fuzz inputs replayed");
    assert!(replayed > 10, "{replayed}");
}
