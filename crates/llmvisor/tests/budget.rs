//! Memory budget, max_loaded, exclusive groups and the fair admission queue.

mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use llmvisor::config::GroupConfig;
use llmvisor::{AcquireError, Phase, Supervisor};
use support::http::{request, TestDaemon};
use support::Scratch;

const WITHIN: Duration = Duration::from_secs(5);
const GIB: u64 = 1024 * 1024 * 1024;

/// Samples /proc every 2 ms until stopped; records the most servers of `scratch` alive at once.
fn watch_concurrency(
    s: &Scratch,
) -> (
    Arc<AtomicBool>,
    Arc<AtomicUsize>,
    std::thread::JoinHandle<()>,
) {
    let stop = Arc::new(AtomicBool::new(false));
    let max = Arc::new(AtomicUsize::new(0));
    let root = s.root().to_owned();
    let (stop2, max2) = (stop.clone(), max.clone());
    let t = std::thread::spawn(move || {
        let scratch = Scratch::at(root);
        while !stop2.load(Ordering::Relaxed) {
            let alive = scratch
                .all_pids()
                .into_iter()
                .filter(|p| llmvisor::procfs::is_alive(*p))
                .count();
            max2.fetch_max(alive, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(2));
        }
        std::mem::forget(scratch); // owned by the test
    });
    (stop, max, t)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_loaded_one_stops_a_before_b_starts() {
    let s = Scratch::new();
    let mut cfg = s.config(vec![s.model("a", &[]), s.model("b", &[])]);
    cfg.max_loaded = Some(1);
    let sup = Supervisor::new(&cfg).await.unwrap();
    let (stop, max, watcher) = watch_concurrency(&s);
    for round in 0..3 {
        let a = sup.acquire("a").await.unwrap();
        assert_eq!(
            sup.model("b").unwrap().phase(),
            Phase::Stopped,
            "round {round}"
        );
        drop(a);
        let b = sup.acquire("b").await.unwrap();
        assert_eq!(
            sup.model("a").unwrap().phase(),
            Phase::Stopped,
            "round {round}"
        );
        let alive: Vec<u32> = s
            .all_pids()
            .into_iter()
            .filter(|p| llmvisor::procfs::is_alive(*p))
            .collect();
        assert_eq!(alive.len(), 1, "round {round}: {alive:?}");
        drop(b);
    }
    stop.store(true, Ordering::Relaxed);
    watcher.join().unwrap();
    assert_eq!(max.load(Ordering::Relaxed), 1, "two servers ran at once");
    assert_eq!(
        sup.model("a")
            .unwrap()
            .stats
            .evictions
            .load(Ordering::Relaxed),
        3
    );
    sup.shutdown().await;
    s.assert_all_gone(WITHIN).await;
}

const STREAM: &str = r#"{"model":"a","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streaming_answer_is_never_cut_by_eviction() {
    let s = Scratch::new();
    let mut cfg = s.config(vec![
        s.model("a", &["--chunks", "8", "--chunk-delay", "150ms"]),
        s.model("b", &[]),
    ]);
    cfg.max_loaded = Some(1);
    let d = TestDaemon::start(cfg).await;
    let (status, _, body) = d.send_chat(STREAM).await;
    assert_eq!(status, 200);
    let stream_done = tokio::spawn(async move {
        use http_body_util::BodyExt;
        let bytes = body.collect().await.unwrap().to_bytes();
        (Instant::now(), String::from_utf8_lossy(&bytes).into_owned())
    });
    let asked = Instant::now();
    let r = d.post("/v1/completions", r#"{"model":"b"}"#).await;
    let b_answered = Instant::now();
    assert_eq!(r.status, 200, "{}", r.text());
    let (a_done, text) = stream_done.await.unwrap();
    assert!(
        text.contains("tok7 ") && text.trim_end().ends_with("data: [DONE]"),
        "a was cut: {text}"
    );
    assert!(
        b_answered >= a_done,
        "b was served before a's stream finished"
    );
    assert!(
        b_answered - asked >= Duration::from_millis(600),
        "b did not wait for a"
    );
    assert_eq!(d.model("a").await["state"], "stopped");
    d.stop().await;
    s.assert_all_gone(WITHIN).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_timeout_shorter_than_the_stream_gives_503_and_the_stream_completes() {
    let s = Scratch::new();
    let mut cfg = s.config(vec![
        s.model("a", &["--chunks", "8", "--chunk-delay", "150ms"]),
        s.model("b", &[]),
    ]);
    cfg.max_loaded = Some(1);
    cfg.queue_timeout = Duration::from_millis(300);
    let d = TestDaemon::start(cfg).await;
    let (status, _, body) = d.send_chat(STREAM).await;
    assert_eq!(status, 200);
    let stream_done = tokio::spawn(async move {
        use http_body_util::BodyExt;
        String::from_utf8_lossy(&body.collect().await.unwrap().to_bytes()).into_owned()
    });
    let r = d.post("/v1/completions", r#"{"model":"b"}"#).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.headers.contains_key("retry-after"));
    let msg = r.error()["message"].as_str().unwrap().to_owned();
    assert!(
        msg.contains("queue_timeout") && msg.contains("a (1 leases)"),
        "{msg}"
    );
    let text = stream_done.await.unwrap();
    assert!(
        text.trim_end().ends_with("data: [DONE]"),
        "a was cut: {text}"
    );
    // The eviction was called off: a keeps serving.
    let a = d.model("a").await;
    assert_eq!(a["state"], "ready", "{a}");
    assert_eq!(s.pids("b.pids").len(), 0);
    d.stop().await;
    s.assert_all_gone(WITHIN).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_evicts_the_least_recently_used_idle_model_never_a_pinned_one() {
    let s = Scratch::new();
    let sized = |id: &str, pinned: bool| {
        let mut m = s.model(id, &[]);
        m.memory = Some(GIB);
        m.pinned = pinned;
        m
    };
    let mut cfg = s.config(vec![
        sized("p", true),
        sized("x", false),
        sized("y", false),
        sized("z", false),
    ]);
    cfg.memory_budget = Some(3 * GIB);
    let sup = Supervisor::new(&cfg).await.unwrap();
    // p (pinned) is the oldest use of all; then x, then y.
    for id in ["p", "x", "y"] {
        drop(sup.acquire(id).await.unwrap());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(sup.acquire("z").await.unwrap());
    assert_eq!(
        sup.model("p").unwrap().phase(),
        Phase::Ready,
        "pinned is never evicted"
    );
    assert_eq!(
        sup.model("x").unwrap().phase(),
        Phase::Stopped,
        "x was the least recently used"
    );
    assert_eq!(sup.model("y").unwrap().phase(), Phase::Ready);
    assert_eq!(sup.model("z").unwrap().phase(), Phase::Ready);
    let status = sup.model("z").unwrap().status();
    assert_eq!(status.memory, Some(GIB.max(status.memory.unwrap())));
    sup.shutdown().await;
    s.assert_all_gone(WITHIN).await;
}

/// `memory_budget = "auto"` on a machine with 10 GiB available at start: 9 GiB with the
/// default 1 GiB reserve, 7 GiB with a 3 GiB one; a reload keeps the first reading.
#[tokio::test]
async fn an_auto_budget_is_the_ram_available_at_start_less_the_reserve() {
    let s = Scratch::new();
    let mut small = s.model("small", &[]);
    small.memory = Some(8 * GIB);
    let mut big = s.model("big", &[]);
    big.memory = Some(9 * GIB + 1);
    let mut cfg = s.config(vec![small, big]);
    cfg.budgets.memory_auto = true;
    let machine = llmvisor::supervisor::Machine {
        mem_available: Some(10 * GIB),
        gpus: Vec::new(),
    };
    let sup = Supervisor::with_machine(&cfg, machine, Arc::new(llmvisor::gpu::NoGpus))
        .await
        .unwrap();
    assert_eq!(sup.memory_budget(), Some(9 * GIB));
    let err = sup.acquire("big").await.unwrap_err();
    let reason = err.to_string();
    assert!(
        reason.contains(
            "memory_budget is 9 GiB (auto: 10 GiB available at start less memory_reserve 1 GiB)"
        ),
        "{reason}"
    );
    drop(sup.acquire("small").await.unwrap());
    // A larger reserve on reload: from the same first reading.
    cfg.budgets.memory_reserve = 3 * GIB;
    sup.reconfigure(&cfg).await;
    assert_eq!(sup.memory_budget(), Some(7 * GIB));
    sup.unload("small", false).await.unwrap();
    let err = sup.acquire("small").await.unwrap_err();
    assert!(err.to_string().contains("memory_budget is 7 GiB"), "{err}");
    sup.shutdown().await;
}

#[tokio::test]
async fn a_model_bigger_than_the_budget_fails_at_once() {
    let s = Scratch::new();
    let mut m = s.model("huge", &[]);
    m.memory = Some(10 * GIB);
    let mut cfg = s.config(vec![m]);
    cfg.memory_budget = Some(4 * GIB);
    let sup = Supervisor::new(&cfg).await.unwrap();
    let t = Instant::now();
    let err = sup.acquire("huge").await.unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(1));
    match &err {
        AcquireError::NoRoom {
            retry_after,
            reason,
            ..
        } => {
            assert!(retry_after.is_none());
            assert!(
                reason.contains("can never fit") && reason.contains("10 GiB"),
                "{reason}"
            );
        }
        other => panic!("unexpected: {other}"),
    }
    assert_eq!(s.pids("huge.pids").len(), 0);
    sup.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exclusive_group_members_take_turns() {
    let s = Scratch::new();
    let mut cfg = s.config(vec![
        s.model("a", &[]),
        s.model("b", &[]),
        s.model("c", &[]),
    ]);
    cfg.groups.insert(
        "gpu".into(),
        GroupConfig {
            members: vec!["a".into(), "b".into()],
            exclusive: true,
            ..GroupConfig::default()
        },
    );
    let sup = Supervisor::new(&cfg).await.unwrap();
    drop(sup.acquire("a").await.unwrap());
    drop(sup.acquire("c").await.unwrap());
    drop(sup.acquire("b").await.unwrap());
    assert_eq!(sup.model("a").unwrap().phase(), Phase::Stopped);
    assert_eq!(sup.model("b").unwrap().phase(), Phase::Ready);
    assert_eq!(
        sup.model("c").unwrap().phase(),
        Phase::Ready,
        "not in the group"
    );
    sup.shutdown().await;
    s.assert_all_gone(WITHIN).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interleaved_bursts_swap_once_per_batch_and_all_complete() {
    let s = Scratch::new();
    let ids = ["a", "b", "c"];
    let mut cfg = s.config(
        ids.iter()
            .map(|id| s.model(id, &["--startup-delay", "100ms"]))
            .collect(),
    );
    cfg.max_loaded = Some(1);
    let d = Arc::new(TestDaemon::start(cfg).await);
    let began = Instant::now();
    // 3 rounds of 8 requests per model, interleaved a, b, c, a, b, c, …, all at once.
    let mut tasks = Vec::new();
    for i in 0..24 {
        let id = ids[i % 3];
        let url = format!("{}/v1/completions", d.url);
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let r = request(
                "POST",
                &url,
                &[("content-type", "application/json")],
                format!(r#"{{"model":"{id}"}}"#),
            )
            .await;
            (r.status, t.elapsed())
        }));
    }
    let mut slowest = Duration::ZERO;
    for t in tasks {
        let (status, took) = t.await.unwrap();
        assert_eq!(status, 200);
        slowest = slowest.max(took);
    }
    // One start per model for the whole burst: each batch is served by one swap.
    let spawns: Vec<usize> = ids
        .iter()
        .map(|id| s.pids(&format!("{id}.pids")).len())
        .collect();
    assert_eq!(spawns, [1, 1, 1], "a swap per request instead of per batch");
    // Bounded: three loads of ~100 ms plus stops; far below the queue timeout.
    assert!(
        slowest < Duration::from_secs(5),
        "slowest request took {slowest:?}"
    );
    assert!(began.elapsed() < Duration::from_secs(6));
    let d = Arc::try_unwrap(d).ok().unwrap();
    d.stop().await;
    s.assert_all_gone(WITHIN).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_memory_and_queued() {
    let s = Scratch::new();
    let mut a = s.model("a", &["--chunks", "4", "--chunk-delay", "200ms"]);
    a.memory = Some(GIB);
    let mut cfg = s.config(vec![a, s.model("b", &[])]);
    cfg.max_loaded = Some(1);
    let d = Arc::new(TestDaemon::start(cfg).await);
    let (status, _, body) = d.send_chat(STREAM).await;
    assert_eq!(status, 200);
    let a = d.model("a").await;
    assert!(a["memory"].as_u64().unwrap() >= GIB, "{a}");
    let d2 = d.clone();
    let waiting =
        tokio::spawn(async move { d2.post("/v1/completions", r#"{"model":"b"}"#).await.status });
    let deadline = Instant::now() + WITHIN;
    while d.model("b").await["queued"] != 1 {
        assert!(Instant::now() < deadline, "b never showed as queued");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(body);
    assert_eq!(waiting.await.unwrap(), 200);
    let metrics = d.get("/metrics").await.text();
    assert!(
        metrics.contains("llmvisor_model_evictions_total{model=\"a\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("llmvisor_model_queue_wait_seconds_count{model=\"b\"} 1"),
        "{metrics}"
    );
    let d = Arc::try_unwrap(d).ok().unwrap();
    d.stop().await;
    s.assert_all_gone(WITHIN).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preloaded_pinned_model_is_ready_without_a_request_and_survives_pressure() {
    let s = Scratch::new();
    let mut p = s.model("p", &[]);
    p.pinned = true;
    p.ttl = Some(Duration::from_millis(100));
    let mut cfg = s.config(vec![p, s.model("a", &[]), s.model("b", &[])]);
    cfg.max_loaded = Some(2);
    cfg.preload = vec!["p".into()];
    let d = TestDaemon::start(cfg).await;
    llmvisor::daemon::preload(&d.state);
    let deadline = Instant::now() + WITHIN;
    while d.model("p").await["state"] != "ready" {
        assert!(Instant::now() < deadline, "preload did not start p");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let pid = d.model("p").await["pid"].clone();
    for id in ["a", "b", "a", "b"] {
        let r = d
            .post("/v1/completions", &format!(r#"{{"model":"{id}"}}"#))
            .await;
        assert_eq!(r.status, 200);
    }
    // Pinned: neither evicted by a and b taking turns, nor idled out by its 100 ms TTL.
    let p = d.model("p").await;
    assert_eq!(
        (p["state"].as_str(), p["pid"].clone(), p["pinned"].as_bool()),
        (Some("ready"), pid, Some(true))
    );
    d.stop().await;
    s.assert_all_gone(WITHIN).await;
}

/// Issue 9: a reload that pins a running model must reach the admission scheduler, not only the
/// actor (the cell used to keep the `pinned` and `memory` it was created with).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_pinned_by_a_reload_is_never_evicted() {
    let s = Scratch::new();
    let mut cfg = s.config(vec![s.model("a", &[]), s.model("b", &[])]);
    cfg.max_loaded = Some(1);
    let sup = Supervisor::new(&cfg).await.unwrap();
    sup.load("a").await.unwrap();
    let a_pid = sup.model("a").unwrap().status().pid;

    cfg.models[0].pinned = true;
    cfg.models[0].memory = Some(3 * GIB);
    let summary = sup.reconfigure(&cfg).await;
    assert_eq!(summary.changed, vec!["a".to_string()]);
    let a = sup.model("a").unwrap();
    assert!(a.pinned(), "the cell did not take the reloaded `pinned`");
    assert_eq!(a.memory().bytes, Some(3 * GIB), "nor the reloaded `memory`");

    let err = sup.acquire("b").await.unwrap_err();
    assert!(
        matches!(
            &err,
            AcquireError::NoRoom {
                retry_after: None,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("pinned"), "{err}");
    let status = a.status();
    assert_eq!(
        (status.state, status.pid),
        (Phase::Ready, a_pid),
        "the pinned model was evicted or restarted by the reload"
    );
    sup.shutdown().await;
    s.assert_all_gone(WITHIN).await;
}
