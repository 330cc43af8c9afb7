//! Each store's layout, built in a temp folder with small GGUF files.

use std::path::{Path, PathBuf};

use super::*;
use crate::gguf::write::{GgufWriter, Meta};

fn gguf(arch: &str, ctx: u32) -> Vec<u8> {
    GgufWriter::default()
        .meta("general.architecture", Meta::Str(arch.into()))
        .meta("general.file_type", Meta::U32(15))
        .meta(&format!("{arch}.context_length"), Meta::U32(ctx))
        .meta(&format!("{arch}.block_count"), Meta::U32(1))
        .tensor("token_embd.weight", &[64, 32], 1)
        .tensor("blk.0.attn_q.weight", &[64, 64], 1)
        .bytes()
}

fn split_part(k: u32, n: u32) -> Vec<u8> {
    GgufWriter::default()
        .meta("general.architecture", Meta::Str("llama".into()))
        .meta("llama.context_length", Meta::U32(4096))
        .meta("split.no", Meta::U32(k - 1))
        .meta("split.count", Meta::U32(n))
        .meta("split.tensors.count", Meta::U32(n))
        .tensor(&format!("blk.{k}.attn_q.weight"), &[64, 64], 1)
        .bytes()
}

fn put(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

fn env_of(home: &Path) -> impl Fn(&str) -> Option<String> {
    let home = home.display().to_string();
    move |name| (name == "HOME").then(|| home.clone())
}

fn ids(d: &Discovery) -> Vec<&str> {
    d.found.iter().map(|f| f.id.as_str()).collect()
}

fn only(stores: &[Source], dirs: Vec<PathBuf>) -> Settings {
    Settings {
        models_dirs: dirs,
        stores: stores.to_vec(),
        ..Settings::default()
    }
}

#[test]
fn a_folder_with_a_split_model_a_projector_and_bad_files() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("models");
    put(
        &dir.join("gemma-3-270m-q4_k_m.gguf"),
        &gguf("gemma3", 32768),
    );
    put(&dir.join("vision/llava-q8_0.gguf"), &gguf("llama", 2048));
    put(&dir.join("vision/mmproj-llava-f16.gguf"), &gguf("clip", 0));
    put(&dir.join("big/m-00001-of-00002.gguf"), &split_part(1, 2));
    put(&dir.join("big/m-00002-of-00002.gguf"), &split_part(2, 2));
    let mut truncated = gguf("llama", 2048);
    truncated.truncate(40);
    put(&dir.join("broken.gguf"), &truncated);
    std::os::unix::fs::symlink(dir.join("nowhere.gguf"), dir.join("dangling.gguf")).unwrap();
    put(&dir.join("notes.txt"), b"not a model");

    let d = discover(
        &only(&[], vec![dir.clone(), tmp.path().join("missing")]),
        &env_of(tmp.path()),
    );
    assert_eq!(
        ids(&d),
        ["big/m", "gemma-3-270m-q4_k_m", "vision/llava-q8_0"],
        "{:#?}",
        d.warnings
    );
    let split = &d.found[0];
    assert_eq!(split.file, dir.join("big/m-00001-of-00002.gguf"));
    assert!(split.size > 0);
    let llava = &d.found[2];
    assert_eq!(
        llava.mmproj.as_deref(),
        Some(&*dir.join("vision/mmproj-llava-f16.gguf"))
    );
    assert_eq!(d.found[1].facts.context_length, Some(32768));
    assert_eq!(d.found[1].facts.quantization(), Some("Q4_K_M"));
    let warned: Vec<String> = d
        .warnings
        .iter()
        .map(|w| w.path.display().to_string())
        .collect();
    for bad in ["broken.gguf", "dangling.gguf", "missing"] {
        assert!(
            warned.iter().any(|w| w.ends_with(bad)),
            "no warning for {bad}: {:#?}",
            d.warnings
        );
    }
    assert_eq!(d.warnings.len(), 3, "{:#?}", d.warnings);
}

#[test]
fn a_folder_that_cannot_be_read_is_a_warning() {
    let tmp = tempfile::tempdir().unwrap();
    // A file where a folder should be: read_dir fails even for root.
    put(&tmp.path().join("file"), b"x");
    let d = discover(
        &only(&[], vec![tmp.path().join("file")]),
        &env_of(tmp.path()),
    );
    assert!(d.found.is_empty());
    assert_eq!(d.warnings.len(), 1, "{:#?}", d.warnings);
    assert!(
        d.warnings[0].message.contains("cannot read this folder"),
        "{}",
        d.warnings[0]
    );
}

/// Ollama's store: a manifest per tag naming `sha256-` blobs.
fn ollama_store(root: &Path, name: &str, tag: &str, ns: &str, blob: &[u8]) -> String {
    let hex = format!("{:0>64}", format!("{:x}", blob.len() + name.len()));
    put(&root.join(format!("blobs/sha256-{hex}")), blob);
    let params = br#"{"stop":["<end_of_turn>"],"temperature":0.1}"#;
    let phex = format!("{:0>64}", "abc");
    put(&root.join(format!("blobs/sha256-{phex}")), params);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": "sha256:00", "size": 2},
        "layers": [
            {"mediaType": "application/vnd.ollama.image.model", "digest": format!("sha256:{hex}"), "size": blob.len()},
            {"mediaType": "application/vnd.ollama.image.params", "digest": format!("sha256:{phex}"), "size": params.len()},
        ]
    });
    put(
        &root.join(format!("manifests/registry.ollama.ai/{ns}/{name}/{tag}")),
        manifest.to_string().as_bytes(),
    );
    hex
}

#[test]
fn ollamas_store() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join(".ollama/models");
    let hex = ollama_store(&root, "gemma3", "270m", "library", &gguf("gemma3", 32768));
    ollama_store(&root, "m", "latest", "me", &gguf("llama", 2048));
    ollama_store(&root, "nano", "e2b", "library", &gguf("gemma3n", 2048));
    // A manifest whose blob is gone.
    put(
        &root.join("manifests/registry.ollama.ai/library/gone/latest"),
        br#"{"layers":[{"mediaType":"application/vnd.ollama.image.model","digest":"sha256:dead"}]}"#,
    );
    let d = discover(&only(&[Source::Ollama], vec![]), &env_of(tmp.path()));
    assert_eq!(
        ids(&d),
        ["gemma3:270m", "me/m:latest", "nano:e2b"],
        "{:#?}",
        d.warnings
    );
    let g = &d.found[0];
    assert_eq!(g.source, Source::Ollama);
    assert_eq!(g.file, root.join(format!("blobs/sha256-{hex}")));
    let extras = g.ollama.as_ref().unwrap();
    assert_eq!(extras.digest, hex);
    assert_eq!(extras.params["stop"][0], "<end_of_turn>");
    assert_eq!(d.warnings.len(), 2, "{:#?}", d.warnings);
    assert!(d
        .warnings
        .iter()
        .any(|w| w.path.ends_with("gone/latest") && w.message.contains("missing")));
    assert!(d
        .warnings
        .iter()
        .any(|w| w.message.contains("gemma3n") && w.message.contains("own engine")));
}

#[test]
fn the_hugging_face_cache_with_symlinks_refs_and_quants() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = tmp.path().join(".cache/huggingface/hub");
    let repo = hub.join("models--unsloth--Qwen3-8B-GGUF");
    put(&repo.join("blobs/aaa"), &gguf("qwen3", 40960));
    put(&repo.join("blobs/bbb"), &gguf("qwen3", 40960));
    put(&repo.join("refs/main"), b"rev2");
    let snap = repo.join("snapshots/rev2");
    std::fs::create_dir_all(&snap).unwrap();
    std::os::unix::fs::symlink("../../blobs/aaa", snap.join("Qwen3-8B-Q4_K_M.gguf")).unwrap();
    std::os::unix::fs::symlink("../../blobs/bbb", snap.join("Qwen3-8B-Q8_0.gguf")).unwrap();
    std::os::unix::fs::symlink("../../blobs/ccc", snap.join("Qwen3-8B-F16.gguf")).unwrap();
    // An older revision is not served.
    put(
        &repo.join("snapshots/rev1/Qwen3-8B-Q2_K.gguf"),
        &gguf("qwen3", 40960),
    );
    let one = hub.join("models--HuggingFaceTB--SmolLM2-135M-Instruct-GGUF");
    put(&one.join("snapshots/r/smollm2.gguf"), &gguf("llama", 8192));

    let d = discover(&only(&[Source::HuggingFace], vec![]), &env_of(tmp.path()));
    assert_eq!(
        ids(&d),
        [
            "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF",
            "unsloth/Qwen3-8B-GGUF:Q4_K_M",
            "unsloth/Qwen3-8B-GGUF:Q8_0"
        ],
        "{:#?}",
        d.warnings
    );
    assert_eq!(d.found[1].file, snap.join("Qwen3-8B-Q4_K_M.gguf"));
    assert_eq!(
        d.warnings.len(),
        1,
        "the dangling F16 link: {:#?}",
        d.warnings
    );
    assert!(d.warnings[0].path.ends_with("Qwen3-8B-F16.gguf"));
}

#[test]
fn lm_studio_and_llama_cpp_caches() {
    let tmp = tempfile::tempdir().unwrap();
    let lms = tmp.path().join(".lmstudio/models");
    put(
        &lms.join("lmstudio-community/gemma-3-270m-it-GGUF/gemma-3-270m-it-Q4_K_M.gguf"),
        &gguf("gemma3", 32768),
    );
    put(
        &lms.join("bartowski/two/two-Q4_K_M.gguf"),
        &gguf("llama", 2048),
    );
    put(
        &lms.join("bartowski/two/two-Q8_0.gguf"),
        &gguf("llama", 2048),
    );
    let cache = tmp.path().join(".cache/llama.cpp");
    put(
        &cache.join("ggml-org_gemma-3-270m-GGUF_gemma-3-270m-Q8_0.gguf"),
        &gguf("gemma3", 32768),
    );
    let d = discover(
        &only(&[Source::LmStudio, Source::LlamaCpp], vec![]),
        &env_of(tmp.path()),
    );
    assert_eq!(
        ids(&d),
        [
            "bartowski/two:Q4_K_M",
            "bartowski/two:Q8_0",
            "ggml-org_gemma-3-270m-GGUF_gemma-3-270m-Q8_0",
            "lmstudio-community/gemma-3-270m-it-GGUF"
        ],
        "{:#?}",
        d.warnings
    );
    assert_eq!(d.found[2].source, Source::LlamaCpp);
    assert_eq!(d.found[3].source, Source::LmStudio);
}

#[test]
fn commands_get_the_port_a_bounded_context_and_the_projector() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    put(&dir.join("big-ctx.gguf"), &gguf("llama", 131072));
    put(&dir.join("small-ctx.gguf"), &gguf("llama", 2048));
    put(&dir.join("embed.gguf"), &gguf("bert", 512));
    let d = discover(&only(&[], vec![dir.clone()]), &env_of(tmp.path()));
    let server = Path::new("/opt/llama-server");
    let s = Settings::default();
    let cmd = |i: usize, s: &Settings| to_model(&d.found[i], s, server).cmd.join(" ");
    let big = cmd(0, &s);
    assert_eq!(
        big,
        format!(
            "/opt/llama-server -m {} --port ${{PORT}} -c 8192",
            dir.join("big-ctx.gguf").display()
        )
    );
    assert!(cmd(2, &s).ends_with("-c 2048"), "{}", cmd(2, &s));
    assert!(
        cmd(1, &s).ends_with("-c 512 --embeddings"),
        "{}",
        cmd(1, &s)
    );
    let with_args = Settings {
        discovered_args: vec!["--ctx-size=1024".into(), "-ngl".into(), "0".into()],
        ..Settings::default()
    };
    assert!(
        cmd(0, &with_args).ends_with("--port ${PORT} --ctx-size=1024 -ngl 0"),
        "{}",
        cmd(0, &with_args)
    );
    let m = to_model(&d.found[0], &s, server);
    assert!(m.uses_port());
    assert_eq!(m.found.as_ref().unwrap().source, Source::ModelsDir);
}

#[test]
fn the_llama_server_is_found_in_three_places_or_named_in_the_error() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().display().to_string();
    let bin = tmp.path().join("bin");
    let env = |path: &str| {
        let (home, path) = (home.clone(), path.to_owned());
        move |name: &str| match name {
            "HOME" => Some(home.clone()),
            "PATH" => Some(path.clone()),
            _ => None,
        }
    };
    let none = llama_server(&Settings::default(), 3, &env("/nonexistent")).unwrap_err();
    let msg = none.to_string();
    assert!(
        msg.contains("llama_server") && msg.contains("PATH") && msg.contains("llama.cpp-*"),
        "{msg}"
    );
    let built = tmp
        .path()
        .join(".cache/llmvisor/llama.cpp-1/bin/llama-server");
    put(&built, b"#!/bin/sh\n");
    std::fs::set_permissions(&built, std::fs::Permissions::from_mode(0o755)).unwrap();
    assert_eq!(
        llama_server(&Settings::default(), 1, &env("/nonexistent")).unwrap(),
        built
    );
    let on_path = bin.join("llama-server");
    put(&on_path, b"#!/bin/sh\n");
    std::fs::set_permissions(&on_path, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = bin.display().to_string();
    assert_eq!(
        llama_server(&Settings::default(), 1, &env(&path)).unwrap(),
        on_path
    );
    let configured = Settings {
        llama_server: Some(built.display().to_string()),
        ..Settings::default()
    };
    assert_eq!(llama_server(&configured, 1, &env(&path)).unwrap(), built);
}

#[test]
fn quants_in_file_names() {
    assert_eq!(
        quant_of_file_name("Qwen3-8B-Q4_K_M.gguf").as_deref(),
        Some("Q4_K_M")
    );
    assert_eq!(
        quant_of_file_name("gemma-3-270m-q4_k_m").as_deref(),
        Some("Q4_K_M")
    );
    assert_eq!(
        quant_of_file_name("SmolLM2-135M-Instruct.Q4_1.gguf").as_deref(),
        Some("Q4_1")
    );
    assert_eq!(
        quant_of_file_name("m-IQ4_XS-00001-of-00002.gguf").as_deref(),
        Some("IQ4_XS")
    );
    assert_eq!(
        quant_of_file_name("Qwen3-8B-BF16.gguf").as_deref(),
        Some("BF16")
    );
    assert_eq!(quant_of_file_name("Qwen3-8B.gguf"), None);
}
