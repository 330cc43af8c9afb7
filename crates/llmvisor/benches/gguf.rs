//! Reading the header of each real test model (scripts/setup-llama.sh): metadata and tensor
//! table, the vocabulary skipped. Goal: under 5 ms per file.
//!
//! ```text
//! eval "$(scripts/setup-llama.sh)" && cargo bench -p llmvisor --bench gguf
//! ```

use std::path::PathBuf;

fn main() {
    divan::main();
}

fn model(var: &str) -> Option<PathBuf> {
    std::env::var_os(var).map(PathBuf::from)
}

#[divan::bench(args = ["LLAMA_MODEL", "LLAMA_MODEL_SMOL"])]
fn open_header(bencher: divan::Bencher, var: &str) {
    let Some(path) = model(var) else {
        eprintln!("{var} not set: nothing to read");
        return;
    };
    bencher.bench(|| llmvisor::gguf::Gguf::open(&path).expect("a readable GGUF"));
}
