//! The daemon binary's signals: SIGHUP reloads the config, SIGTERM stops everything and exits 0.

mod support;

use std::time::{Duration, Instant};

use rustix::process::Signal;
use support::http::request;
use support::serve::ServeProcess;
use support::{assert_gone, Scratch};

const WITHIN: Duration = Duration::from_secs(10);

async fn model(url: &str, id: &str) -> serde_json::Value {
    request("GET", &format!("{url}/api/models/{id}"), &[], "")
        .await
        .json()
}

async fn load(url: &str, id: &str) -> u64 {
    let r = request("POST", &format!("{url}/api/models/{id}/load"), &[], "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["pid"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_only_what_changed_and_rejects_a_broken_file() {
    let s = Scratch::new();
    let path = s.write_config(&[("a", ""), ("b", "")], "stop_timeout = \"2s\"");
    let d = ServeProcess::start(&path);
    let (a1, b1) = (load(&d.url, "a").await, load(&d.url, "b").await);

    s.write_config(
        &[("a", ""), ("b", "--chunks 2"), ("c", "")],
        "stop_timeout = \"2s\"",
    );
    d.signal(Signal::HUP);
    d.wait_for_log("config reloaded", WITHIN);
    assert_eq!(
        model(&d.url, "a").await["pid"],
        a1,
        "unchanged model keeps its pid"
    );
    let deadline = Instant::now() + WITHIN;
    let b = loop {
        let b = model(&d.url, "b").await;
        if b["state"] == "ready" && b["pid"] != b1 {
            break b;
        }
        assert!(Instant::now() < deadline, "b was not restarted: {b}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(b["restarts"], 1);
    assert_eq!(model(&d.url, "c").await["state"], "stopped");

    std::fs::write(&path, "[models.a]\ncmd = []\n").unwrap();
    d.signal(Signal::HUP);
    d.wait_for_log("config reload rejected", WITHIN);
    assert_eq!(model(&d.url, "a").await["pid"], a1, "old config kept");
    assert_eq!(model(&d.url, "c").await["id"], "c");
    let r = request(
        "POST",
        &format!("{}/v1/completions", d.url),
        &[],
        r#"{"model":"a"}"#,
    )
    .await;
    assert_eq!(r.status, 200);
    let mut d = d;
    assert_eq!(d.terminate(WITHIN).code(), Some(0));
    s.assert_all_gone(WITHIN).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_two_ready_models_stops_both_and_exits_zero() {
    let s = Scratch::new();
    // One of them ignores SIGTERM: it must be SIGKILLed after its stop_timeout.
    let path = s.write_config(
        &[("a", ""), ("b", "--ignore-sigterm")],
        "stop_timeout = \"2s\"",
    );
    let mut d = ServeProcess::start(&path);
    let pids = [
        load(&d.url, "a").await as u32,
        load(&d.url, "b").await as u32,
    ];
    let status = d.terminate(WITHIN);
    assert_eq!(status.code(), Some(0), "{}", d.stderr_so_far());
    assert_gone(&pids, Duration::from_millis(100)).await;
    s.assert_all_gone(WITHIN).await;
}
