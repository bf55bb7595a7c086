//! The GGUF reader (`DiffusionModel::load`) on hostile files: random bytes, real fixture bytes
//! mutated or truncated, and well-formed files whose metadata lies about the tensors. Every case
//! must end in an error or a model that runs; never a panic, an abort or a huge allocation.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ggml_ext::model::{Architecture, Hyperparams};
use ggml_ext::runtime::{DiffusionModel, RuntimeConfig};
use ggml_ext::{write_llada_fixture, FixtureSpec, GgufWriter};
use proptest::prelude::*;

/// A fixture small enough to mutate quickly (about 40 KiB).
fn small_spec() -> FixtureSpec {
    FixtureSpec {
        hyperparams: Hyperparams {
            architecture: Architecture::Llada,
            n_embd: 16,
            n_head: 2,
            n_head_kv: 2,
            n_ff: 32,
            n_layer: 1,
            context_length: 64,
            rope_freq_base: 10_000.0,
            rms_eps: 1e-5,
            tied_embeddings: false,
        },
        seed: 7,
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    bytes: Vec<u8>,
    scratch: PathBuf,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("small.gguf");
        write_llada_fixture(&path, &small_spec()).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        Fixture {
            scratch: dir.path().to_owned(),
            _dir: dir,
            bytes,
        }
    })
}

/// Loads `bytes` from a file of their own; a model that loads must also run a short prefill.
fn load_bytes(bytes: &[u8]) -> Result<(), String> {
    let dir = tempfile::tempdir_in(&fixture().scratch).unwrap();
    let path = dir.path().join("case.gguf");
    std::fs::write(&path, bytes).unwrap();
    load_and_run(&path)
}

fn load_and_run(path: &Path) -> Result<(), String> {
    let mut model = DiffusionModel::load(path, RuntimeConfig::default()).map_err(|e| e.to_string())?;
    let shape = model.shape().clone();
    let n_vocab = shape.n_vocab as i32;
    let tokens: Vec<i32> = (0..4).map(|i| i % n_vocab.max(1)).collect();
    let mut cache = model.new_cache(16).map_err(|e| e.to_string())?;
    model.prefill(&mut cache, &tokens).map_err(|e| e.to_string())
}

#[test]
fn the_unmodified_fixture_loads_and_runs() {
    let f = fixture();
    assert!(f.bytes.len() < 100 * 1024, "{} bytes", f.bytes.len());
    load_bytes(&f.bytes).unwrap();
    // `DLLM_FUZZ_SEED_DIR=fuzz/corpus/gguf` writes this fixture as the gguf fuzz target's seed.
    if let Some(dir) = std::env::var_os("DLLM_FUZZ_SEED_DIR") {
        std::fs::write(Path::new(&dir).join("seed-fixture.gguf"), &f.bytes).unwrap();
    }
}

#[test]
fn every_truncation_of_the_header_is_an_error() {
    let f = fixture();
    // Every prefix through the metadata, then a sample of prefixes into the tensor data.
    let cuts = (0..f.bytes.len().min(12_000))
        .step_by(7)
        .chain((12_000..f.bytes.len()).step_by(997));
    for cut in cuts {
        assert!(load_bytes(&f.bytes[..cut]).is_err(), "a file cut at {cut} loaded");
    }
}

/// Boundary values for length and count fields.
fn nasty_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just(1),
        Just(u32::MAX as u64),
        Just(i32::MAX as u64),
        Just(1 << 31),
        Just(1 << 40),
        Just(u64::MAX),
        Just(u64::MAX - 7),
        Just(i64::MAX as u64),
        any::<u64>(),
    ]
}

#[derive(Debug, Clone)]
enum Mutation {
    Byte(usize, u8),
    Word(usize, u64),
    Truncate(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    // Most of the interesting structure (counts, lengths, types, shapes, offsets) is in the
    // first few KiB; the tensor data behind it is only bytes.
    let pos = prop_oneof![3 => 0usize..8192, 1 => any::<usize>()];
    prop_oneof![
        (pos.clone(), any::<u8>()).prop_map(|(p, b)| Mutation::Byte(p, b)),
        (pos.clone(), nasty_u64()).prop_map(|(p, w)| Mutation::Word(p, w)),
        pos.prop_map(Mutation::Truncate),
    ]
}

/// Applies `m` to `bytes`; a mutation with no room left (after an earlier truncation) does nothing.
fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    let n = bytes.len();
    match *m {
        Mutation::Byte(p, b) if n > 0 => bytes[p % n] = b,
        Mutation::Word(p, w) if n > 8 => {
            let p = p % (n - 8);
            bytes[p..p + 8].copy_from_slice(&w.to_le_bytes());
        }
        Mutation::Truncate(p) if n > 0 => bytes.truncate(p % n),
        _ => {}
    }
}

/// One `u32` or `i32` metadata override for the hyper-parameters the reader uses.
fn metadata_value() -> impl Strategy<Value = (&'static str, i64)> {
    let key = prop::sample::select(vec![
        "llada.embedding_length",
        "llada.block_count",
        "llada.attention.head_count",
        "llada.attention.head_count_kv",
        "llada.context_length",
        "tokenizer.ggml.mask_token_id",
    ]);
    let value = prop_oneof![
        -3i64..70,
        Just(i32::MIN as i64),
        Just(i32::MAX as i64),
        Just(u32::MAX as i64),
        Just(1 << 30),
        Just(-1),
    ];
    (key, value)
}

/// A file with the small fixture's tensors (in `shapes_of` layout) and metadata from `hp`, with
/// `overrides` written last (a key given twice keeps the later value).
fn write_lying(path: &Path, shapes_of: &Hyperparams, overrides: &[(&str, i64)]) {
    let hp = &small_spec().hyperparams;
    let mut w = GgufWriter::new();
    w.set_str("general.architecture", "llada").unwrap();
    let defaults = [
        ("llada.embedding_length", hp.n_embd as i64),
        ("llada.block_count", hp.n_layer as i64),
        ("llada.attention.head_count", hp.n_head as i64),
        ("llada.attention.head_count_kv", hp.n_head_kv as i64),
        ("llada.context_length", hp.context_length as i64),
        ("tokenizer.ggml.mask_token_id", 3),
    ];
    for (key, value) in defaults {
        let value = overrides
            .iter()
            .rev()
            .find(|(k, _)| *k == key)
            .map_or(value, |(_, v)| *v);
        if value < 0 || value > u32::MAX as i64 {
            w.set_i32(key, value as i32).unwrap();
        } else {
            w.set_u32(key, value as u32).unwrap();
        }
    }
    for (name, shape) in shapes_of.tensor_shapes(20) {
        let n = shape.iter().product();
        w.add_f32(&name, &shape, vec![0.01; n]).unwrap();
    }
    w.write(path).unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_are_an_error(bytes in prop::collection::vec(any::<u8>(), 0..512), magic in any::<bool>()) {
        let mut bytes = bytes;
        if magic && bytes.len() >= 8 {
            // Get past the magic and version so the counts behind them are random.
            bytes[..4].copy_from_slice(b"GGUF");
            bytes[4..8].copy_from_slice(&3u32.to_le_bytes());
        }
        prop_assert!(load_bytes(&bytes).is_err());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn mutated_fixtures_load_or_fail_cleanly(mutations in prop::collection::vec(mutation(), 1..4)) {
        let mut bytes = fixture().bytes.clone();
        for m in &mutations {
            apply(&mut bytes, m);
        }
        // Either outcome is fine; returning at all is the property.
        let _ = load_bytes(&bytes);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn metadata_that_lies_about_the_tensors_is_refused_or_runs(
        overrides in prop::collection::vec(metadata_value(), 0..3),
        n_embd in prop::sample::select(vec![8usize, 16, 24]),
        n_head in prop::sample::select(vec![1usize, 2, 4]),
        n_ff in prop::sample::select(vec![16usize, 32]),
        n_layer in 0usize..3,
    ) {
        let shapes_of = Hyperparams { n_embd, n_head, n_head_kv: n_head, n_ff, n_layer, ..small_spec().hyperparams };
        let dir = tempfile::tempdir_in(&fixture().scratch).unwrap();
        let path = dir.path().join("lying.gguf");
        write_lying(&path, &shapes_of, &overrides);
        let _ = load_and_run(&path);
    }
}

#[test]
fn retarget_refuses_an_architecture_that_is_not_a_string() {
    let dir = tempfile::tempdir_in(&fixture().scratch).unwrap();
    let (input, output) = (dir.path().join("in.gguf"), dir.path().join("out.gguf"));
    let mut w = GgufWriter::new();
    w.set_u32("general.architecture", 7).unwrap();
    w.add_f32("token_embd.weight", &[4, 2], vec![0.0; 8]).unwrap();
    w.write(&input).unwrap();
    assert!(ggml_ext::retarget(&input, &output, "llada", "llama").is_err());
}
