//! Health monitoring of ready servers: a hung server is restarted; a crash loop ends in
//! `failed` with the reason and the server's output, and an explicit load recovers it.

mod support;

use std::time::{Duration, Instant};

use llmvisor::{AcquireError, Phase, Supervisor};
use support::Scratch;

const WITHIN: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_server_is_restarted_and_a_crash_loop_fails_then_recovers_on_load() {
    let s = Scratch::new();
    // Every instance stops answering /health 400 ms after it starts.
    let mut m = s.model("m", &["--hang-health-after", "400ms", "--log-lines", "1"]);
    m.health.interval = Some(Duration::from_millis(100));
    m.health.failures = 2;
    let sup = Supervisor::new(&s.config(vec![m])).await.unwrap();
    let cell = sup.model("m").unwrap();
    let lease = sup.acquire("m").await.unwrap();
    let ready_at = Instant::now();
    let first = cell.status().pid.unwrap();

    // Hung at 0.4 s, seen after 2 failed probes of up to 0.1 s each, restarted at once.
    let deadline = ready_at + WITHIN;
    let second = loop {
        let st = cell.status();
        if st.state == Phase::Ready && st.pid.is_some() && st.pid != Some(first) {
            break st;
        }
        assert!(Instant::now() < deadline, "never restarted: {st:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let took = ready_at.elapsed();
    // interval × threshold + hang delay + startup, with a wide margin for a noisy machine.
    assert!(took < Duration::from_secs(3), "restart took {took:?}");
    assert_eq!(second.restarts, 1);
    assert!(
        !lease.is_up(),
        "the lease learned that its server was replaced"
    );
    drop(lease);
    assert_eq!(s.pids("m.pids").len(), 2);

    // It keeps hanging: after three failures in a row the model is failed, with the reason.
    tokio::time::timeout(WITHIN, cell.wait_for_phase(|p| p == Phase::Failed))
        .await
        .expect("crash loop never reached failed");
    let st = cell.status();
    let error = st.error.unwrap();
    assert!(
        error.contains("crash loop") && error.contains("health checks"),
        "{error}"
    );
    assert!(
        error.contains("fake-llm log line 1"),
        "log tail missing: {error}"
    );
    assert_eq!(st.pid, None);
    let spawns = s.pids("m.pids").len();
    // While failed, requests fail fast instead of restarting it.
    let err = sup.acquire("m").await.unwrap_err();
    assert!(
        matches!(
            err,
            AcquireError::StartFailed {
                retry_after: Some(_),
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(s.pids("m.pids").len(), spawns);

    // An explicit load recovers it.
    let status = sup.load("m").await.unwrap();
    assert_eq!(status.state, Phase::Ready);
    assert_eq!(s.pids("m.pids").len(), spawns + 1);
    sup.shutdown().await;
    s.assert_all_gone(WITHIN).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_stop_leaves_a_crashed_server_stopped_until_the_next_request() {
    let s = Scratch::new();
    let mut m = s.model("m", &["--crash-after", "1"]);
    m.health.on_unhealthy = llmvisor::config::OnUnhealthy::Stop;
    let sup = Supervisor::new(&s.config(vec![m])).await.unwrap();
    let lease = sup.acquire("m").await.unwrap();
    let r = support::http::request(
        "POST",
        &format!("{}/v1/completions", lease.url()),
        &[],
        "{}",
    )
    .await;
    assert_eq!(r.status, 200);
    lease.server_gone().await;
    drop(lease);
    let cell = sup.model("m").unwrap();
    cell.wait_for_phase(|p| p == Phase::Stopped).await;
    // No restart by itself: give an automatic restart ample time to show up, then check.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(cell.phase(), Phase::Stopped);
    assert_eq!(s.pids("m.pids").len(), 1);
    sup.shutdown().await;
    s.assert_all_gone(WITHIN).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_restart_brings_a_crashed_server_back_by_itself() {
    let s = Scratch::new();
    let sup = Supervisor::new(&s.config(vec![s.model("m", &["--crash-after", "1"])]))
        .await
        .unwrap();
    let lease = sup.acquire("m").await.unwrap();
    let first = lease.url();
    let r = support::http::request("POST", &format!("{first}/v1/completions"), &[], "{}").await;
    assert_eq!(r.status, 200);
    drop(lease);
    let cell = sup.model("m").unwrap();
    let deadline = Instant::now() + WITHIN;
    while s.pids("m.pids").len() < 2 || cell.phase() != Phase::Ready {
        assert!(
            Instant::now() < deadline,
            "not restarted: {:?}",
            cell.status()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(cell.status().restarts, 1);
    sup.shutdown().await;
    s.assert_all_gone(WITHIN).await;
}
