//! Issue 21: discovery of 1,000 GGUF files at start, and `GET /api/tags`' body over them.
//! The files are sparse: each holds a real model's header (the first 4 MiB of LLAMA_MODEL_SMOL,
//! else LLAMA_MODEL) and that model's size as a hole. Goals: discovery < 1 s, tags < 10 ms.
//!
//! ```text
//! set -a; eval "$(scripts/setup-llama.sh)"; set +a; cargo bench -p llmvisor --bench discover
//! ```
//! (bench/discover.sh measures the same through the binary and HTTP.)

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use llmvisor::discover::{self, Settings};

const FILES: usize = 1000;
const HEADER_BYTES: usize = 4 << 20;

fn main() {
    divan::main();
}

/// The folder of sparse files (made once per run; removed with the process's temp dir).
fn folder() -> Option<&'static Path> {
    static DIR: OnceLock<Option<tempfile::TempDir>> = OnceLock::new();
    DIR.get_or_init(|| {
        let model = std::env::var_os("LLAMA_MODEL_SMOL")
            .or_else(|| std::env::var_os("LLAMA_MODEL"))
            .map(PathBuf::from)?;
        let size = std::fs::metadata(&model).ok()?.len();
        let mut header = vec![0u8; HEADER_BYTES];
        let n = std::fs::File::open(&model).ok()?.read(&mut header).ok()?;
        header.truncate(n);
        let dir = tempfile::tempdir().ok()?;
        for i in 0..FILES {
            let mut f =
                std::fs::File::create(dir.path().join(format!("model-{i:04}.gguf"))).ok()?;
            f.write_all(&header).ok()?;
            f.set_len(size).ok()?;
        }
        Some(dir)
    })
    .as_ref()
    .map(|d| d.path())
}

fn settings(dir: &Path) -> Settings {
    Settings {
        models_dirs: vec![dir.to_owned()],
        stores: Vec::new(),
        ..Settings::default()
    }
}

#[divan::bench(sample_count = 10)]
fn discover_1000(bencher: divan::Bencher) {
    let Some(dir) = folder() else {
        eprintln!("LLAMA_MODEL_SMOL / LLAMA_MODEL not set: nothing to read");
        return;
    };
    let s = settings(dir);
    bencher.bench(|| {
        let d = discover::discover(&s, &|_| None);
        assert_eq!(d.found.len(), FILES, "{:?}", d.warnings.first());
        d
    });
}

#[divan::bench(sample_count = 50)]
fn tags_body_1000(bencher: divan::Bencher) {
    let Some(dir) = folder() else { return };
    let mut cfg = llmvisor::config::parse("", None).unwrap();
    cfg.discovery = settings(dir);
    let d = discover::discover(&cfg.discovery, &|_| None);
    let server = Path::new("/usr/bin/llama-server");
    cfg.models = d
        .found
        .iter()
        .map(|f| discover::to_model(f, &cfg.discovery, server))
        .collect();
    bencher.bench(|| serde_json::to_vec(&llmvisor::daemon::tags_json(&cfg)).unwrap());
}
