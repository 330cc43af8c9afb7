//! Memory through the supervisor, on the fake server given a GGUF's `-m` (it does not read it):
//! estimated from the file before the first start, measured while it runs, learned when it
//! stops, and the learned figure remembered in the state store for the next llmvisor.

mod support;

use std::time::Duration;

use llmvisor::gguf::write::{GgufWriter, Meta};
use llmvisor::supervisor::ModelCell;
use llmvisor::Supervisor;
use support::Scratch;

const WITHIN: Duration = Duration::from_secs(10);

fn write_gguf(s: &Scratch) -> String {
    let bytes = GgufWriter::default()
        .meta("general.architecture", Meta::Str("llama".into()))
        .meta("llama.block_count", Meta::U32(2))
        .meta("llama.context_length", Meta::U32(1024))
        .meta("llama.embedding_length", Meta::U32(64))
        .meta("llama.attention.head_count", Meta::U32(4))
        .tensor("blk.0.w", &[64, 64], 0)
        .tensor("blk.1.w", &[64, 64], 0)
        .bytes();
    let path = s.path("tiny.gguf");
    std::fs::write(&path, bytes).unwrap();
    path.display().to_string()
}

/// Waits (on the cell's change notifications) until its memory source is `source`.
async fn wait_for_source(cell: &ModelCell, source: &str) {
    let mut rx = cell.subscribe();
    let wait = async {
        while cell.status().memory_source != source {
            rx.changed().await.unwrap();
        }
    };
    tokio::time::timeout(WITHIN, wait)
        .await
        .unwrap_or_else(|_| panic!("memory source stayed {}", cell.status().memory_source));
}

#[tokio::test]
async fn estimated_then_measured_then_learned_and_remembered() {
    let s = Scratch::new();
    let gguf = write_gguf(&s);
    let config = s.config(vec![s.model("m", &["-m", &gguf, "-c", "1024"])]);
    let sup = Supervisor::new(&config).await.unwrap();
    let cell = sup.model("m").unwrap();
    let st = cell.status();
    assert_eq!(st.memory_source, "estimated");
    let estimate = st.memory_detail.estimate.clone().unwrap();
    assert_eq!(st.memory, Some(estimate.total));
    assert_eq!(estimate.weights, 2 * 64 * 64 * 4);
    assert_eq!(estimate.ctx, 1024);

    let lease = sup.acquire("m").await.unwrap();
    let st = cell.status();
    assert_eq!(st.memory_source, "measured");
    let ram = st.memory_detail.measured.as_ref().unwrap().ram;
    assert!(ram > 1024 * 1024, "the fake server's PSS: {ram}");
    assert_eq!(st.memory, Some(ram));
    drop(lease);
    sup.unload("m", false).await.unwrap();
    let st = cell.status();
    assert_eq!(st.memory_source, "learned");
    let learned = st.memory_detail.learned.unwrap();
    assert!(learned >= ram);
    sup.shutdown().await;

    // A new llmvisor on the same state dir: learned from the store before any start.
    let sup = Supervisor::new(&config).await.unwrap();
    let cell = sup.model("m").unwrap();
    wait_for_source(&cell, "learned").await;
    assert_eq!(cell.status().memory, Some(learned));

    // Other flags are another shape: estimated again.
    sup.shutdown().await;
    let other = s.config(vec![s.model("m", &["-m", &gguf, "-c", "512"])]);
    let sup = Supervisor::new(&other).await.unwrap();
    assert_eq!(sup.model("m").unwrap().status().memory_source, "estimated");
    sup.shutdown().await;
    s.assert_all_gone(WITHIN).await;
}
