use std::io::Cursor;
use std::time::Instant;

use proptest::prelude::*;

use super::write::{GgufWriter, Meta};
use super::*;

/// A small llama-like model: 4 layers, grouped-query attention, a vocabulary array.
fn tiny() -> GgufWriter {
    let mut w = GgufWriter::default()
        .meta("general.architecture", Meta::Str("llama".into()))
        .meta("general.name", Meta::Str("Tiny".into()))
        .meta("general.size_label", Meta::Str("1M".into()))
        .meta("general.file_type", Meta::U32(1))
        .meta("llama.block_count", Meta::U32(4))
        .meta("llama.context_length", Meta::U32(2048))
        .meta("llama.embedding_length", Meta::U32(64))
        .meta("llama.attention.head_count", Meta::U32(8))
        .meta("llama.attention.head_count_kv", Meta::U32(2))
        .meta(
            "tokenizer.chat_template",
            Meta::Str("{{ messages }}".into()),
        )
        .meta(
            "tokenizer.ggml.tokens",
            Meta::ArrStr(vec!["a".into(), "b".into()]),
        )
        .tensor("token_embd.weight", &[64, 2], 1);
    for il in 0..4 {
        w = w
            .tensor(&format!("blk.{il}.attn_q.weight"), &[64, 64], 8)
            .tensor(&format!("blk.{il}.attn_norm.weight"), &[64], 0);
    }
    w
}

fn parse(bytes: &[u8]) -> Result<read::FileHeader, String> {
    read_header_from(Cursor::new(bytes), bytes.len() as u64)
}

fn open_bytes(bytes: &[u8]) -> Gguf {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    std::fs::write(&path, bytes).unwrap();
    Gguf::open(&path).unwrap()
}

#[test]
fn reads_facts_and_tensors() {
    let g = open_bytes(&tiny().bytes());
    assert_eq!(g.architecture(), Some("llama"));
    assert_eq!(g.block_count(), Some(4));
    assert_eq!(g.context_length(), Some(2048));
    assert_eq!(g.head_count_kv(), Some(PerLayer::All(2)));
    // No key_length in the file: embedding / heads.
    assert_eq!(g.key_length(), Some(8));
    assert_eq!(g.sliding_window(), None);
    assert_eq!(g.swa_layers(), vec![false; 4]);
    assert_eq!(
        (g.name(), g.size_label(), g.file_type()),
        (Some("Tiny"), Some("1M"), Some(1))
    );
    assert_eq!(g.chat_template(), Some("{{ messages }}"));
    assert_eq!(g.tensors.len(), 9);
    let q = g
        .tensors
        .iter()
        .find(|t| t.name == "blk.2.attn_q.weight")
        .unwrap();
    assert_eq!(
        (q.layer, q.bytes, types::type_name(q.ggml_type)),
        (Some(2), 64 * 64 / 32 * 34, "q8_0".into())
    );
    let (layers, other) = g.bytes_by_layer();
    assert_eq!(layers, vec![64 * 64 / 32 * 34 + 64 * 4; 4]);
    assert_eq!(other, 64 * 2 * 2);
    assert_eq!(g.tensor_bytes(), layers.iter().sum::<u64>() + other);
}

#[test]
fn per_layer_heads_and_sliding_window() {
    let base = || {
        GgufWriter::default()
            .meta("general.architecture", Meta::Str("gemma3".into()))
            .meta("gemma3.block_count", Meta::U32(8))
            .meta("gemma3.attention.head_count", Meta::U32(4))
            .meta("gemma3.attention.sliding_window", Meta::U32(512))
    };
    // Gemma 3's default: every 6th layer full.
    let g = open_bytes(&base().bytes());
    assert_eq!(
        g.swa_layers(),
        vec![true, true, true, true, true, false, true, true]
    );
    let g = open_bytes(
        &base()
            .meta("gemma3.attention.sliding_window_pattern", Meta::U32(2))
            .bytes(),
    );
    assert_eq!(
        g.swa_layers(),
        vec![true, false, true, false, true, false, true, false]
    );
    let pattern = vec![false, true, true, true, false, true, true, true];
    let g = open_bytes(
        &base()
            .meta(
                "gemma3.attention.sliding_window_pattern",
                Meta::ArrBool(pattern.clone()),
            )
            .meta(
                "gemma3.attention.head_count_kv",
                Meta::ArrU32(vec![1, 0, 2, 2, 2, 2, 2, 2]),
            )
            .bytes(),
    );
    assert_eq!(g.swa_layers(), pattern);
    let kv = g.head_count_kv().unwrap();
    assert_eq!(
        (kv.at(0), kv.at(1), kv.at(7), kv.at(99), kv.max()),
        (1, 0, 2, 0, 2)
    );
}

#[test]
fn split_model_reads_as_one() {
    let dir = tempfile::tempdir().unwrap();
    let part = |no: u32, tensors: &[&str]| {
        let mut w = GgufWriter::default()
            .meta("split.no", Meta::U32(no))
            .meta("split.count", Meta::U32(2))
            .meta("split.tensors.count", Meta::U32(3));
        if no == 0 {
            w = w.meta("general.architecture", Meta::Str("llama".into()));
        }
        for t in tensors {
            w = w.tensor(t, &[32, 4], 0);
        }
        w.bytes()
    };
    std::fs::write(
        dir.path().join("m-00001-of-00002.gguf"),
        part(0, &["a", "blk.0.b"]),
    )
    .unwrap();
    let second = dir.path().join("m-00002-of-00002.gguf");
    // Naming either part, before the second exists: an error that says what is missing.
    let err = Gguf::open(&dir.path().join("m-00001-of-00002.gguf")).unwrap_err();
    assert!(
        err.to_string().contains("m-00002-of-00002.gguf is missing"),
        "{err}"
    );
    std::fs::write(&second, part(1, &["blk.1.c"])).unwrap();
    let g = Gguf::open(&second).unwrap();
    assert_eq!(g.files.len(), 2);
    assert_eq!(g.architecture(), Some("llama"));
    let names: Vec<_> = g
        .tensors
        .iter()
        .map(|t| (t.name.as_str(), t.file))
        .collect();
    assert_eq!(names, vec![("a", 0), ("blk.0.b", 0), ("blk.1.c", 1)]);
    assert_eq!(g.tensor_bytes(), 3 * 32 * 4 * 4);
    // A part whose tensors do not add up to split.tensors.count.
    std::fs::write(&second, part(1, &[])).unwrap();
    let err = Gguf::open(&second).unwrap_err();
    assert!(
        err.to_string().contains("should hold 3 tensors but hold 2"),
        "{err}"
    );
}

#[test]
fn bad_headers_are_clear_errors() {
    let good = tiny().bytes();
    let err = |bytes: &[u8]| parse(bytes).unwrap_err();
    assert!(err(b"").contains("magic number"));
    assert!(err(b"GGML\x03\0\0\0").contains("not a GGUF file"));
    let mut v = good.clone();
    v[4..8].copy_from_slice(&3u32.to_be_bytes());
    assert!(err(&v).contains("big-endian"));
    v[4..8].copy_from_slice(&9u32.to_le_bytes());
    assert!(err(&v).contains("version 9"));
    // A tensor count of 2^60: refused before anything is allocated for it.
    let mut v = good.clone();
    v[8..16].copy_from_slice(&(1u64 << 60).to_le_bytes());
    assert!(err(&v).contains("tensor table"), "{}", err(&v));
    // The data cut short (a half-downloaded model).
    let e = err(&good[..good.len() - 1]);
    assert!(e.contains("past the end of the file"), "{e}");
    // A first key claiming to be 2^40 bytes long.
    let mut v = good.clone();
    v[24..32].copy_from_slice(&(1u64 << 40).to_le_bytes());
    assert!(err(&v).contains("bytes long"), "{}", err(&v));
}

#[test]
fn long_arrays_are_skipped_not_kept() {
    let tokens: Vec<String> = (0..5000).map(|i| format!("t{i}")).collect();
    let bytes = GgufWriter::default()
        .meta("tokenizer.ggml.tokens", Meta::ArrStr(tokens))
        .meta("after", Meta::U32(7))
        .bytes();
    let h = parse(&bytes).unwrap();
    assert_eq!(
        h.metadata["tokenizer.ggml.tokens"],
        Value::Skipped { len: 5000 }
    );
    assert_eq!(h.metadata["after"], Value::U64(7));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Any bytes at all: a result, never a panic.
    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = parse(&bytes);
    }

    /// A valid header with some bytes overwritten and possibly cut short: a result, never a
    /// panic; cut short inside the header, always an error.
    #[test]
    fn damaged_headers_never_panic(
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut bytes = tiny().bytes();
        for (at, b) in edits {
            let i = at.index(bytes.len());
            bytes[i] = b;
        }
        let len = cut.index(bytes.len() + 1);
        let result = parse(&bytes[..len]);
        if len < 24 {
            prop_assert!(result.is_err());
        }
    }

    /// Lengths and counts set to huge values anywhere: an error, quickly (no allocation of
    /// that size, no loop of that length).
    #[test]
    fn huge_lengths_are_refused(at in 8usize..200, huge in (1u64 << 33)..u64::MAX) {
        let mut bytes = tiny().bytes();
        bytes[at..at + 8].copy_from_slice(&huge.to_le_bytes());
        let start = Instant::now();
        let _ = parse(&bytes);
        prop_assert!(start.elapsed().as_secs() < 1);
    }
}

/// The real test models (scripts/setup-llama.sh): their facts as llama-server prints them, and
/// the header read in under 5 ms in an optimised build (`cargo bench --bench gguf` too); a debug
/// build, about ten times slower at the vocabulary loop, gets 50 ms.
#[test]
fn real_models() {
    for var in ["LLAMA_MODEL", "LLAMA_MODEL_SMOL"] {
        let Some(path) = std::env::var_os(var) else {
            eprintln!("skipping {var}: not set (run scripts/test.sh)");
            continue;
        };
        let start = Instant::now();
        let g = Gguf::open(Path::new(&path)).unwrap();
        let took = start.elapsed();
        eprintln!("{var}: header read in {took:?}");
        let limit_ms = if cfg!(debug_assertions) { 50 } else { 5 };
        assert!(took.as_millis() < limit_ms, "{var}: {took:?}");
        // Every byte of the file is header, padding or a tensor.
        assert!(g.tensor_bytes() <= g.file_bytes && g.tensor_bytes() > g.file_bytes * 9 / 10);
        match g.architecture() {
            Some("gemma3") => {
                assert_eq!(g.block_count(), Some(18));
                assert_eq!(g.sliding_window(), Some(512));
                assert_eq!(g.swa_layers().iter().filter(|&&s| !s).count(), 3);
                assert_eq!(g.head_count_kv(), Some(PerLayer::All(1)));
                assert_eq!(g.key_length(), Some(256));
            }
            Some("llama") => {
                assert_eq!(g.block_count(), Some(30));
                assert_eq!(g.head_count_kv(), Some(PerLayer::All(3)));
                assert_eq!(g.key_length(), Some(64));
                assert_eq!(g.context_length(), Some(8192));
            }
            other => panic!("{var}: unexpected architecture {other:?}"),
        }
    }
}
