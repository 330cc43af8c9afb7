//! How long reading a GGUF header takes (issue 20: "the header of every test file in < 5 ms").
//!
//! ```text
//! LLAMA_MODEL=~/.cache/llmvisor/models/gemma-3-270m-q4_k_m.gguf cargo bench -p llmvisor --bench gguf
//! ```
//!
//! `open` reads the header of `LLAMA_MODEL` (and `LLAMA_MODEL_SMOL` when set) from the page
//! cache: metadata, a vocabulary skipped string by string (262,144 in Gemma 3), the tensor table.

use std::path::Path;

fn main() {
    divan::main();
}

/// The files named by the environment, as strings (what divan can show as an argument).
fn files() -> Vec<String> {
    ["LLAMA_MODEL", "LLAMA_MODEL_SMOL"]
        .iter()
        .filter_map(|v| std::env::var(v).ok())
        .collect()
}

#[divan::bench(args = files())]
fn open(path: &str) -> llmvisor::gguf::Gguf {
    llmvisor::gguf::Gguf::open(Path::new(path)).expect("a readable GGUF file")
}
