use super::*;
use crate::gguf::write::{GgufWriter, Meta};

fn cmd(s: &str) -> Vec<String> {
    shell_words::split(s).unwrap()
}

fn mib(b: u64) -> f64 {
    b as f64 / MIB as f64
}

/// A llama-like model of 4 layers: 2 KV heads of 16, f16 layer weights of 64 KiB each.
fn tiny(dir: &Path) -> PathBuf {
    let mut w = GgufWriter::default()
        .meta("general.architecture", Meta::Str("llama".into()))
        .meta("llama.block_count", Meta::U32(4))
        .meta("llama.context_length", Meta::U32(4096))
        .meta("llama.embedding_length", Meta::U32(128))
        .meta("llama.feed_forward_length", Meta::U32(256))
        .meta("llama.attention.head_count", Meta::U32(8))
        .meta("llama.attention.head_count_kv", Meta::U32(2))
        .meta(
            "tokenizer.ggml.tokens",
            Meta::ArrStr(vec!["a".into(); 1000]),
        )
        .tensor("token_embd.weight", &[128, 1000], 1)
        .tensor("output.weight", &[128, 1000], 1);
    for il in 0..4 {
        w = w.tensor(&format!("blk.{il}.ffn_up.weight"), &[128, 256], 1);
    }
    let path = dir.join("tiny.gguf");
    std::fs::write(&path, w.bytes()).unwrap();
    path
}

#[test]
fn the_parts_of_a_small_model() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny(dir.path());
    let e = for_command(
        &cmd(&format!("llama-server -m {} -c 1000 -np 1", m.display())),
        None,
        &[],
    )
    .unwrap()
    .unwrap();
    // -c 1000 is padded to 1024 cells; 4 layers × 2 heads × 16 × (K + V) × 2 bytes.
    assert_eq!(e.ctx, 1024);
    assert_eq!(e.kv_cache, 1024 * 4 * 2 * 16 * 2 * 2);
    assert_eq!(e.weights, 2 * 128 * 1000 * 2 + 4 * 128 * 256 * 2);
    // A micro-batch of 512 tokens: 4 × (3·256 + 5·128) bytes each, and the f16 mask.
    assert_eq!(e.compute, 512 * 4 * (3 * 256 + 5 * 128) + 512 * 2 * 1024);
    assert_eq!(e.overhead, 1000 * 4 + SERVER_BASE + SERVER_PER_TOKEN * 1000);
    assert_eq!(e.total, e.weights + e.kv_cache + e.compute + e.overhead);
    assert!(e.gpu.is_empty());

    // -c 0 (and no -c): the trained context. -np absent: 4 slots, one unified cache.
    let trained = for_command(&cmd(&format!("s -m {} -c 0", m.display())), None, &[])
        .unwrap()
        .unwrap();
    assert_eq!(trained.ctx, 4096);
    // q8_0 keys: 34 bytes per 32 values instead of 64.
    let q8 = for_command(
        &cmd(&format!("s -m {} -c 1024 -ctk q8_0", m.display())),
        None,
        &[],
    )
    .unwrap()
    .unwrap();
    assert_eq!(q8.kv_cache, 1024 * 4 * (34 + 64));
}

#[test]
fn offloaded_layers_count_on_their_gpu() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny(dir.path());
    let at = |flags: &str, gpus: &[u32]| {
        for_command(
            &cmd(&format!("s -m {} -c 1024 -np 1 {flags}", m.display())),
            None,
            gpus,
        )
        .unwrap()
        .unwrap()
    };
    let layer = 128 * 256 * 2;
    let kv_layer = 1024 * 2 * 16 * 2 * 2;
    let output = 128 * 1000 * 2;
    // -ngl 3 as llama.cpp counts it: the last two layers and the output layer on the GPU;
    // their weights and KV go there, the rest stays in RAM.
    let three = at("-ngl 3", &[0]);
    let cpu = at("-ngl 3", &[]);
    assert_eq!(cpu.weights - three.weights, 2 * layer + output);
    assert_eq!(cpu.kv_cache - three.kv_cache, 2 * kv_layer);
    assert_eq!(
        three.gpu[&0],
        2 * layer + output + 2 * kv_layer + cpu.compute
    );
    assert_eq!(
        three.compute, 0,
        "the compute buffer is where the last layer runs"
    );
    // Everything (the default) on two GPUs split 1:1: the output layer goes too.
    let all = at("", &[0, 1]);
    assert_eq!(
        all.weights,
        128 * 1000 * 2,
        "only the input embeddings stay in RAM"
    );
    assert_eq!(all.kv_cache, 0);
    assert_eq!(all.gpu.len(), 2);
    let gpu_total: u64 = all.gpu.values().sum();
    assert_eq!(
        gpu_total,
        4 * layer + 128 * 1000 * 2 + 4 * kv_layer + cpu.compute
    );
    // -ts 1,0: all on the first.
    assert_eq!(
        at("-ts 1,0", &[0, 1]).gpu.keys().collect::<Vec<_>>(),
        vec![&0]
    );
}

#[test]
fn commands_without_a_gguf_and_unknowable_ones() {
    assert_eq!(
        for_command(&cmd("python serve.py --port 1"), None, &[]),
        Ok(None)
    );
    assert_eq!(for_command(&cmd("s -m ${MODEL}"), None, &[]), Ok(None));
    let hf = for_command(&cmd("llama-server -hf org/model"), None, &[]).unwrap_err();
    assert!(hf.0.contains("-hf"), "{hf}");
    let missing = for_command(&cmd("s -m /nonexistent/x.gguf"), None, &[]).unwrap_err();
    assert!(missing.0.contains("/nonexistent/x.gguf"), "{missing}");
    let dir = tempfile::tempdir().unwrap();
    tiny(dir.path());
    // A relative -m is found under cwd.
    let rel = for_command(&cmd("s -m tiny.gguf"), Some(dir.path()), &[]).unwrap();
    assert!(rel.is_some());
    let bad = for_command(&cmd("s -m tiny.gguf -ctk q9_9"), Some(dir.path()), &[]).unwrap_err();
    assert!(bad.0.contains("q9_9"), "{bad}");
}

/// The real test models: each part as llama-server itself reports its buffers (`-lv 4` lines
/// "model buffer size", "KV buffer size", "compute buffer size", build 11434 on x86-64 AVX2),
/// within 2 %.
#[test]
fn real_models_match_llama_servers_buffers() {
    let (Some(gemma), Some(smol)) = (
        std::env::var_os("LLAMA_MODEL"),
        std::env::var_os("LLAMA_MODEL_SMOL"),
    ) else {
        eprintln!("skipping: LLAMA_MODEL / LLAMA_MODEL_SMOL not set (run scripts/test.sh)");
        return;
    };
    // (model, flags, weights, KV, compute) in MiB, as printed.
    let cases: &[(&std::ffi::OsString, &str, f64, f64, f64)] = &[
        (&smol, "-c 512 -np 1", 92.10, 11.25, 15.14),
        (&smol, "-c 2048 -np 1", 92.10, 45.00, 16.64),
        (&smol, "-c 32768 -np 1", 92.10, 720.00, 46.64),
        (&smol, "-c 16384 -np 4", 92.10, 360.00, 18.64),
        (
            &smol,
            "-c 32768 -np 1 -fa on -ctk q8_0 -ctv q8_0",
            92.10,
            382.50,
            46.67,
        ),
        (&smol, "-c 2048 -np 1 -ub 128", 92.10, 45.00, 4.16),
        (&smol, "-c 8192 -np 1 -fa off", 92.10, 180.00, 167.51),
        (&gemma, "-c 512 -np 1", 235.16 + 12.66, 1.50 + 7.50, 19.28),
        (&gemma, "-c 2048 -np 1", 235.16 + 12.66, 6.00 + 15.00, 21.28),
        (
            &gemma,
            "-c 32768 -np 1",
            235.16 + 12.66,
            96.00 + 15.00,
            51.28,
        ),
        (
            &gemma,
            "-c 8192 -np 4",
            235.16 + 12.66,
            24.00 + 60.00,
            21.28,
        ),
        (
            &gemma,
            "-c 32768 -np 1 -fa on -ctk q8_0 -ctv q8_0",
            235.16 + 12.66,
            51.00 + 7.97,
            51.81,
        ),
        (
            &gemma,
            "-c 2048 -np 1 -ub 2048 -b 2048",
            235.16 + 12.66,
            6.00 + 30.00,
            89.11,
        ),
    ];
    for (model, flags, weights, kv, compute) in cases {
        let c = format!("llama-server -m {} {flags}", model.to_string_lossy());
        let e = for_command(&cmd(&c), None, &[]).unwrap().unwrap();
        for (part, got, want) in [
            ("weights", e.weights, *weights),
            ("kv", e.kv_cache, *kv),
            ("compute", e.compute, *compute),
        ] {
            let err = (mib(got) - want).abs() / want;
            assert!(
                err < 0.02,
                "{c}: {part} {:.2} MiB, llama-server says {want}",
                mib(got)
            );
        }
    }
}
