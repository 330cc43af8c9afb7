//! Per-server connection slots (`max_connections`): a server never gets more proxied requests
//! at once than it has slots; the rest wait in llmvisor, up to `queue_timeout`.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use support::http::TestDaemon;
use support::Scratch;

const WITHIN: Duration = Duration::from_secs(5);
const STREAM: &str = r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
/// Five chunks, 250 ms apart: each answer takes at least a second.
const SLOW: &[&str] = &["--chunks", "5", "--chunk-delay", "250ms"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_beyond_the_servers_slots_wait_in_llmvisor() {
    let s = Scratch::new();
    let mut m = s.model("m", SLOW);
    m.max_connections = Some(2);
    let d = Arc::new(TestDaemon::start(s.config(vec![m])).await);
    assert_eq!(d.post("/api/models/m/load", "").await.status, 200);

    let began = Instant::now();
    let requests: Vec<_> = (0..4)
        .map(|_| {
            let d = d.clone();
            tokio::spawn(async move { d.post("/v1/chat/completions", STREAM).await })
        })
        .collect();
    // While they run, never more than 2 hold a slot.
    let mut most = 0;
    while !requests.iter().all(|r| r.is_finished()) {
        let cell = d.state.sup.model("m").unwrap();
        let (in_use, limit) = cell.connections_in_use();
        assert_eq!(limit, 2);
        most = most.max(in_use);
        assert!(in_use <= 2, "{in_use} requests at the server at once");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for r in requests {
        assert_eq!(r.await.unwrap().status, 200);
    }
    assert_eq!(most, 2, "the slots were used");
    // Two waves of ~1 s: a lower bound only (a slow machine is slower, never faster).
    assert!(
        began.elapsed() >= Duration::from_millis(1900),
        "4 one-second answers through 2 slots took {:?}",
        began.elapsed()
    );
    let metrics = d.get("/metrics").await.text();
    assert!(
        metrics.contains("llmvisor_model_max_connections{model=\"m\"} 2"),
        "{metrics}"
    );
    let d = Arc::try_unwrap(d).ok().unwrap();
    d.stop().await;
    s.assert_all_gone(WITHIN).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_waits_longer_than_queue_timeout_for_a_slot_gets_a_503() {
    let s = Scratch::new();
    let mut m = s.model("m", &["--chunks", "8", "--chunk-delay", "250ms"]);
    m.max_connections = Some(1);
    let mut cfg = s.config(vec![m]);
    cfg.queue_timeout = Duration::from_millis(300);
    let d = Arc::new(TestDaemon::start(cfg).await);
    assert_eq!(d.post("/api/models/m/load", "").await.status, 200);
    let long = tokio::spawn({
        let d = d.clone();
        async move { d.post("/v1/chat/completions", STREAM).await }
    });
    // Wait until the long one holds the slot.
    let deadline = Instant::now() + WITHIN;
    while d.state.sup.model("m").unwrap().connections_in_use().0 == 0 {
        assert!(
            Instant::now() < deadline,
            "the first request never got its slot"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let r = d.post("/v1/chat/completions", STREAM).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.headers.contains_key("retry-after"));
    let msg = r.error()["message"].as_str().unwrap().to_owned();
    assert!(
        msg.contains("max_connections") && msg.contains("300ms"),
        "{msg}"
    );
    assert_eq!(long.await.unwrap().status, 200, "the first one is unharmed");
    let d = Arc::try_unwrap(d).ok().unwrap();
    d.stop().await;
    s.assert_all_gone(WITHIN).await;
}
