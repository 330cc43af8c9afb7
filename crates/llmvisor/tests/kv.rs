//! `kv_persist` against the fake server (fast, deterministic): a server that refuses the
//! slot save route still stops, with a warning and a `kv_failed` event; a request racing the
//! stop is served by the next server. (The real save and restore: `e2e_kv.rs`.)

mod support;

use std::time::Duration;

use llmvisor::{Phase, Supervisor};
use support::{assert_no_zombies, Scratch};

/// A fake-llm model with kv_persist on (set here: the config parser allows it only for
/// llama-server commands) whose /slots says slot 0 holds tokens and whose save is refused.
fn refusing(s: &Scratch) -> llmvisor::config::ModelConfig {
    let mut m = s.model("a", &["--refuse-slot-save"]);
    m.kv_persist = true;
    m.kv_save_timeout = Duration::from_secs(5);
    m
}

#[tokio::test]
async fn a_refused_save_is_a_warning_and_an_event_and_the_stop_goes_on() {
    let s = Scratch::new();
    let sup = Supervisor::new(&s.config(vec![refusing(&s)]))
        .await
        .unwrap();
    let mut events = sup.kv_events();
    drop(sup.acquire("a").await.unwrap());
    let status = tokio::time::timeout(Duration::from_secs(10), sup.unload("a", false))
        .await
        .expect("the unload must not hang on a refused save")
        .unwrap();
    assert_eq!(status.state, Phase::Stopped);
    let e = events.recv().await.unwrap();
    assert_eq!(e.kind, "kv_failed");
    assert_eq!(e.slot, Some(0));
    assert!(
        e.reason
            .as_deref()
            .unwrap()
            .contains("does not support slots action"),
        "{e:?}"
    );
    let cell = sup.model("a").unwrap();
    assert_eq!(cell.kv.counters().save_failures, 1);
    assert_eq!(cell.kv.counters().saves, 0);
    // Nothing half-written is left, and /api/models says what is on disk: nothing.
    let dir = s.state_dir().join("kv").join("a");
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
    assert_eq!(status.kv_saved, Some(0));
    sup.shutdown().await;
    s.assert_all_gone(Duration::from_secs(5)).await;
    assert_no_zombies(&s.all_pids());
}

#[tokio::test]
async fn a_request_racing_the_stop_is_served_by_the_next_server() {
    let s = Scratch::new();
    let sup = Supervisor::new(&s.config(vec![refusing(&s)]))
        .await
        .unwrap();
    drop(sup.acquire("a").await.unwrap());
    let cell = sup.model("a").unwrap();
    let unload = tokio::spawn({
        let sup = sup.clone();
        async move { sup.unload("a", false).await }
    });
    cell.wait_for_phase(|p| p == Phase::Stopping).await;
    // Arrives while the save and the stop run: waits for them, then gets a new server.
    let lease = tokio::time::timeout(Duration::from_secs(20), sup.acquire("a"))
        .await
        .unwrap()
        .unwrap();
    assert!(lease.is_up());
    unload.await.unwrap().unwrap();
    assert_eq!(
        s.pids("a.pids").len(),
        2,
        "stopped, then started again for the request"
    );
    drop(lease);
    sup.shutdown().await;
    s.assert_all_gone(Duration::from_secs(5)).await;
    assert_no_zombies(&s.all_pids());
}
