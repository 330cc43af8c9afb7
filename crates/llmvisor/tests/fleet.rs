//! Fleet mode (issue 15) against a real 3-member etcd cluster and three `llmvisor serve`
//! processes on loopback, with fake-llm models. Skipped (with a message) when etcd is not
//! installed: run scripts/setup-fleet.sh.
#![cfg(feature = "fleet")]

mod support;

use std::time::{Duration, Instant};

use llmvisor::cluster::hop::{self, HopRequest};
use support::fleet::{
    chat, etcd_or_skip, get, post, post_with, send_full, Etcd, FleetNode, CLIENT_KEY, CLUSTER_KEY,
};

/// One fleet test at a time: each runs three etcd members and three daemons, and their timing
/// assertions (lease expiry, elections) need the machine they were written for, not nine such
/// clusters at once on two cores.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A fleet name of its own per test, so tests sharing nothing but the binary never meet.
fn fleet_name(test: &str) -> String {
    format!("{test}-{}", std::process::id())
}

fn nodes(
    n: usize,
    fleet: &str,
    etcd: &Etcd,
    lease_ttl: &str,
    models: &[(&str, &str, &str)],
) -> Vec<FleetNode> {
    let eps = etcd.endpoints();
    let mut out: Vec<FleetNode> = (0..n)
        .map(|i| FleetNode::new(&format!("n{i}"), fleet, &eps, lease_ttl, models))
        .collect();
    for node in &mut out {
        node.start();
    }
    out
}

fn total_spawns(nodes: &[FleetNode], model: &str) -> usize {
    nodes.iter().map(|n| n.spawned(model).len()).sum()
}

fn running_on(nodes: &[FleetNode], model: &str) -> Vec<String> {
    nodes
        .iter()
        .filter(|n| !n.running(model).is_empty())
        .map(|n| n.id.clone())
        .collect()
}

/// A hop to `url` (node `to`) of `POST /v1/chat/completions` with `body`, signed with the
/// cluster key as node `n9` would (`sent_body`: another body than the one signed).
fn signed_hop(
    url: &str,
    to: &str,
    body: &str,
    sent_body: Option<&str>,
) -> http::Request<axum::body::Body> {
    signed_hop_at(url, to, body, sent_body, hop::unix_now(), &hop::new_nonce())
}

fn signed_hop_at(
    url: &str,
    to: &str,
    body: &str,
    sent_body: Option<&str>,
    time: u64,
    nonce: &str,
) -> http::Request<axum::body::Body> {
    let path = "/v1/chat/completions";
    let digest = hop::body_sha256(body.as_bytes());
    let mut req = http::Request::builder()
        .method("POST")
        .uri(format!("{url}{path}"))
        .header("content-type", "application/json")
        .body(axum::body::Body::from(
            sent_body.unwrap_or(body).to_string(),
        ))
        .unwrap();
    HopRequest {
        method: "POST",
        path_and_query: path,
        body: &digest,
        from: "n9",
        to,
        place: false,
        time,
        nonce,
    }
    .write_headers(CLUSTER_KEY.as_bytes(), req.headers_mut());
    req
}

/// Polls `cond` every 50 ms until it holds, failing with `what` after `within`.
async fn eventually(within: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_concurrent_requests_over_three_nodes_spawn_once() {
    let _serial = SERIAL.lock().await;
    if etcd_or_skip().is_none() {
        return;
    }
    let etcd = Etcd::start(3);
    let fleet = fleet_name("spawn-once");
    let nodes = nodes(
        3,
        &fleet,
        &etcd,
        "3s",
        &[("m", "--startup-delay 500ms", "")],
    );
    let urls: Vec<String> = nodes.iter().map(|n| n.url.clone()).collect();
    let tasks: Vec<_> = (0..30)
        .map(|i| {
            let url = urls[i % 3].clone();
            tokio::spawn(async move { post(&url, "/v1/chat/completions", &chat("m")).await })
        })
        .collect();
    for t in tasks {
        let (status, body) = t.await.unwrap().expect("node answered");
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(
        total_spawns(&nodes, "m"),
        1,
        "exactly one spawn cluster-wide"
    );
    assert_eq!(running_on(&nodes, "m").len(), 1);

    // The cluster view agrees, and /api/models names the node it speaks for.
    let (status, body) = get(&urls[0], "/api/cluster").await.unwrap();
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["nodes"].as_array().unwrap().len(), 3, "{v}");
    let placements = v["placements"].as_array().unwrap();
    assert_eq!(placements.len(), 1, "{v}");
    assert_eq!(placements[0]["node"], running_on(&nodes, "m")[0].as_str());
    let (_, body) = get(&urls[1], "/api/models").await.unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v[0]["node"], "n1", "{v}");

    // A hop only reaches the model where it is placed (hops themselves:
    // a_hop_is_signed_and_never_carries_the_cluster_key).
    let elsewhere = nodes.iter().find(|n| n.running("m").is_empty()).unwrap();
    let (status, _, body) = send_full(signed_hop(&elsewhere.url, &elsewhere.id, &chat("m"), None))
        .await
        .unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("fleet_not_placed_here"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_of_the_holding_node_moves_the_model_within_lease_ttl() {
    let _serial = SERIAL.lock().await;
    if etcd_or_skip().is_none() {
        return;
    }
    let etcd = Etcd::start(3);
    let fleet = fleet_name("kill9");
    let mut nodes = nodes(
        3,
        &fleet,
        &etcd,
        "3s",
        &[("m", "--startup-delay 500ms", "")],
    );
    let (status, body) = post(&nodes[0].url, "/v1/chat/completions", &chat("m"))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let holder = running_on(&nodes, "m");
    assert_eq!(holder.len(), 1);
    let h = nodes.iter().position(|n| n.id == holder[0]).unwrap();
    let children = nodes[h].spawned("m");

    nodes[h].kill9();
    // Its servers die with it (parent-death signal), nothing is left running.
    support::assert_gone(&children, Duration::from_secs(10)).await;

    // Through another node: answered once the dead node's lease has expired and the model has
    // been started elsewhere (lease_ttl 3 s + load 0.5 s; the margin is for a busy machine).
    let other = (h + 1) % 3;
    let began = Instant::now();
    let (status, body) = post(&nodes[other].url, "/v1/chat/completions", &chat("m"))
        .await
        .unwrap();
    let took = began.elapsed();
    assert_eq!(status, 200, "{body}");
    eprintln!(
        "kill -9 → answered through {} after {took:?}",
        nodes[other].id
    );
    assert!(took < Duration::from_secs(12), "took {took:?}");
    let now = running_on(&nodes, "m");
    assert_eq!(now.len(), 1, "{now:?}");
    assert_ne!(now[0], nodes[h].id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_run_on_two_nodes_and_share_the_load() {
    let _serial = SERIAL.lock().await;
    if etcd_or_skip().is_none() {
        return;
    }
    let etcd = Etcd::start(3);
    let fleet = fleet_name("replicas");
    let nodes = nodes(
        3,
        &fleet,
        &etcd,
        "3s",
        &[("m", "--chunks 3 --chunk-delay 100ms", "replicas = 2")],
    );
    // Through the third node only, which forwards to the replica with the fewest in flight.
    let urls: Vec<String> = nodes.iter().map(|n| n.url.clone()).collect();
    let tasks: Vec<_> = (0..12)
        .map(|_| {
            let url = urls[2].clone();
            tokio::spawn(async move { post(&url, "/v1/chat/completions", &chat("m")).await })
        })
        .collect();
    for t in tasks {
        let (status, body) = t.await.unwrap().expect("node answered");
        assert_eq!(status, 200, "{body}");
    }
    let on = running_on(&nodes, "m");
    assert_eq!(on.len(), 2, "two instances on two nodes: {on:?}");
    assert_eq!(total_spawns(&nodes, "m"), 2);
    let (_, body) = get(&urls[0], "/api/cluster").await.unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["placements"].as_array().unwrap().len(), 2, "{v}");
    // Both served: each instance's /metrics-free evidence is the forwarding node's view.
    let (_, metrics) = get(&urls[2], "/metrics").await.unwrap();
    assert!(
        metrics.contains("llmvisor_fleet_forwards_total"),
        "{metrics}"
    );
    // Load spread: each instance's node proxied some of the 12 requests to its server.
    let mut served = Vec::new();
    for n in nodes.iter().filter(|n| !n.running("m").is_empty()) {
        let (_, m) = get(&n.url, "/metrics").await.unwrap();
        let count: u64 = m
            .lines()
            .find_map(|l| l.strip_prefix("llmvisor_proxy_overhead_seconds_count "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no proxy count in {m}"));
        served.push((n.id.clone(), count));
    }
    eprintln!("requests served per instance: {served:?}");
    assert!(served.iter().all(|(_, c)| *c > 0), "{served:?}");
    assert_eq!(served.iter().map(|(_, c)| c).sum::<u64>(), 12, "{served:?}");
    // The placement gauges (from the watch, which may lag the claims by a moment).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, metrics) = get(&urls[2], "/metrics").await.unwrap();
        let gauges = metrics
            .lines()
            .filter(|l| l.starts_with("llmvisor_fleet_placements{model=\"m\""))
            .count();
        if gauges == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "{metrics}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The placements `/api/cluster` of `url` lists, as (model, node).
async fn placements(url: &str) -> Vec<(String, String)> {
    let Ok((200, body)) = get(url, "/api/cluster").await else {
        return Vec::new();
    };
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["placements"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["model"].as_str().unwrap().to_string(),
                p["node"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigstop_beyond_lease_ttl_replaces_and_sigcont_stops_the_stale_server() {
    let _serial = SERIAL.lock().await;
    use rustix::process::Signal;
    if etcd_or_skip().is_none() {
        return;
    }
    let etcd = Etcd::start(3);
    let fleet = fleet_name("sigstop");
    let nodes = nodes(3, &fleet, &etcd, "3s", &[("m", "", "")]);
    let (status, body) = post(&nodes[0].url, "/v1/chat/completions", &chat("m"))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let h = nodes
        .iter()
        .position(|n| !n.running("m").is_empty())
        .unwrap();
    let stale = nodes[h].running("m");
    let other = (h + 1) % 3;

    nodes[h].serve().signal(Signal::STOP);
    // Its lease expires (3 s): the placement goes.
    let deadline = Instant::now() + Duration::from_secs(20);
    while placements(&nodes[other].url)
        .await
        .iter()
        .any(|(_, n)| *n == nodes[h].id)
    {
        assert!(
            Instant::now() < deadline,
            "placement on the stopped node never expired"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, body) = post(&nodes[other].url, "/v1/chat/completions", &chat("m"))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let placed = placements(&nodes[other].url).await;
    assert_eq!(placed.len(), 1, "{placed:?}");
    assert_ne!(placed[0].1, nodes[h].id);

    // SIGCONT: the node finds its lease gone, fences, and stops its stale server.
    nodes[h].serve().signal(Signal::CONT);
    support::assert_gone(&stale, Duration::from_secs(20)).await;
    nodes[h]
        .serve()
        .wait_for_log("registered again", Duration::from_secs(20));
    eventually(Duration::from_secs(10), "one instance cluster-wide", || {
        running_on(&nodes, "m").len() == 1
    })
    .await;
    // It is back in the fleet, with no placement.
    let (_, body) = get(&nodes[h].url, "/api/cluster").await.unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["nodes"].as_array().unwrap().len(), 3, "{v}");
    assert_eq!(v["fenced"], false, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_quorum_loss_keeps_local_serving_and_refuses_new_placements() {
    let _serial = SERIAL.lock().await;
    if etcd_or_skip().is_none() {
        return;
    }
    let mut etcd = Etcd::start(3);
    let fleet = fleet_name("quorum");
    let nodes = nodes(3, &fleet, &etcd, "3s", &[("a", "", ""), ("b", "", "")]);
    let (status, body) = post(&nodes[0].url, "/v1/chat/completions", &chat("a"))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let a_pids = nodes[0].running("a");
    assert_eq!(a_pids.len(), 1, "placed on the node asked first");

    // One member down: no effect.
    etcd.kill(0);
    let (status, body) = post(&nodes[1].url, "/v1/chat/completions", &chat("a"))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");

    // Two down: no quorum. Local serving goes on; a new placement gets 503 with the reason.
    etcd.kill(1);
    nodes[0]
        .serve()
        .wait_for_log("etcd has no quorum", Duration::from_secs(30));
    let (status, body) = post(&nodes[0].url, "/v1/chat/completions", &chat("a"))
        .await
        .unwrap();
    assert_eq!(status, 200, "local serving goes on: {body}");
    let (status, body) = post(&nodes[1].url, "/v1/chat/completions", &chat("b"))
        .await
        .unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("etcd is unavailable"), "{body}");
    assert_eq!(nodes[0].running("a"), a_pids, "never fenced");

    // Quorum back: normal.
    etcd.restart(0);
    etcd.restart(1);
    etcd.wait_healthy(Duration::from_secs(30));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = post(&nodes[1].url, "/v1/chat/completions", &chat("b"))
            .await
            .unwrap();
        if status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no placement after quorum came back: {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        nodes[0].running("a"),
        a_pids,
        "the model served through the outage still runs; n0's log:
{}",
        nodes[0].serve().stderr_so_far()
    );
    assert_eq!(total_spawns(&nodes, "a"), 1);
    assert_eq!(total_spawns(&nodes, "b"), 1);
}

/// Forwarded vs local latency to the response head and throughput, for a ready model.
/// `cargo test -p llmvisor --features fleet --test fleet bench -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run on demand"]
async fn bench_forwarded_vs_local() {
    let _serial = SERIAL.lock().await;
    if etcd_or_skip().is_none() {
        return;
    }
    let etcd = Etcd::start(3);
    let fleet = fleet_name("bench");
    let nodes = nodes(2, &fleet, &etcd, "5s", &[("m", "--chunks 1", "")]);
    let (status, _) = post(&nodes[0].url, "/v1/chat/completions", &chat("m"))
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert!(
        !nodes[0].running("m").is_empty(),
        "placed on the node asked"
    );
    // The same model on a daemon without [cluster], for the cost of fleet mode itself.
    let single = support::Scratch::new();
    let config = single.write_config(&[("m", "--chunks 1")], "");
    let plain = support::serve::ServeProcess::start(&config);
    let (status, _) = post(&plain.url, "/v1/chat/completions", &chat("m"))
        .await
        .unwrap();
    assert_eq!(status, 200);
    for (label, url) in [
        ("single", &plain.url),
        ("local", &nodes[0].url),
        ("forwarded", &nodes[1].url),
    ] {
        let mut lat = Vec::new();
        for _ in 0..300 {
            let began = Instant::now();
            let (status, _) = post(url, "/v1/chat/completions", &chat("m")).await.unwrap();
            assert_eq!(status, 200);
            lat.push(began.elapsed());
        }
        lat.sort();
        let began = Instant::now();
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let url = url.clone();
                tokio::spawn(async move {
                    for _ in 0..50 {
                        let (s, _) = post(&url, "/v1/chat/completions", &chat("m"))
                            .await
                            .unwrap();
                        assert_eq!(s, 200);
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let rps = 400.0 / began.elapsed().as_secs_f64();
        eprintln!(
            "{label:>9}: p50 {:?} p90 {:?} p99 {:?} (300 sequential); {rps:.0} req/s (8 concurrent, 400 requests)",
            lat[150], lat[270], lat[297]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_loaded_through_the_api_gets_a_placement_and_keeps_running() {
    let _serial = SERIAL.lock().await;
    if etcd_or_skip().is_none() {
        return;
    }
    let etcd = Etcd::start(3);
    let fleet = fleet_name("apiload");
    let nodes = nodes(2, &fleet, &etcd, "2s", &[("m", "", "")]);
    let (status, body) = post(&nodes[1].url, "/api/models/m/load", "").await.unwrap();
    assert_eq!(status, 200, "{body}");
    let pids = nodes[1].running("m");
    assert_eq!(pids.len(), 1);
    // The reconciliation (every lease_ttl / 3) claims a slot for it rather than stopping it.
    let deadline = Instant::now() + Duration::from_secs(15);
    while placements(&nodes[0].url).await != [("m".to_string(), "n1".to_string())] {
        assert!(
            Instant::now() < deadline,
            "no placement for the loaded model"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Requests through the other node go there; nothing else is started.
    let (status, body) = post(&nodes[0].url, "/v1/chat/completions", &chat("m"))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(nodes[1].running("m"), pids);
    assert_eq!(total_spawns(&nodes, "m"), 1);
}

/// A small deterministic generator (xorshift), seeded from the clock and printed.
struct Rng(u64);
impl Rng {
    fn next(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Random `kill -9`s, SIGTERMs and restarts of nodes under a steady request stream (bounded:
/// `FLEET_CHAOS_SECS`, default 20 s): every request succeeds or gets a clean 5xx, never more than
/// `replicas` instances (sampled every 100 ms), no orphans at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_of_kills_and_restarts_under_a_request_stream() {
    let _serial = SERIAL.lock().await;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    if etcd_or_skip().is_none() {
        return;
    }
    let secs: u64 = std::env::var("FLEET_CHAOS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("chaos: {secs} s, seed {seed}");
    let mut rng = Rng(seed);
    let etcd = Etcd::start(3);
    let fleet = fleet_name("chaos");
    let mut nodes = nodes(3, &fleet, &etcd, "2s", &[("m", "--chunks 2", "")]);
    let urls: Vec<String> = nodes.iter().map(|n| n.url.clone()).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, clean_5xx, unreachable) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    let clients: Vec<_> = (0..2)
        .map(|c| {
            let (urls, stop) = (urls.clone(), stop.clone());
            let (ok, clean_5xx, unreachable) = (ok.clone(), clean_5xx.clone(), unreachable.clone());
            tokio::spawn(async move {
                let mut i = c;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    match post(&urls[i % 3], "/v1/chat/completions", &chat("m")).await {
                        Ok((200, _)) => ok.fetch_add(1, Ordering::Relaxed),
                        Ok((s, body)) if s >= 500 => {
                            assert!(body.contains("\"error\""), "unclean {s}: {body}");
                            clean_5xx.fetch_add(1, Ordering::Relaxed)
                        }
                        Ok((s, body)) => panic!("status {s}: {body}"),
                        // The node asked is down (killed by the chaos loop).
                        Err(_) => unreachable.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();

    let began = Instant::now();
    let mut max_running = 0;
    let mut next_event = Instant::now() + Duration::from_millis(1500);
    while began.elapsed() < Duration::from_secs(secs) {
        let running: usize = nodes.iter().map(|n| n.running("m").len()).sum();
        max_running = max_running.max(running);
        assert!(running <= 1, "{running} instances of a replicas = 1 model");
        if Instant::now() >= next_event {
            let i = rng.next(3) as usize;
            let alive = nodes.iter().filter(|n| n.serve.is_some()).count();
            if nodes[i].serve.is_none() {
                nodes[i].start();
                eprintln!("chaos: restarted {}", nodes[i].id);
            } else if alive > 1 {
                if rng.next(2) == 0 {
                    nodes[i].kill9();
                    eprintln!("chaos: kill -9 {}", nodes[i].id);
                } else {
                    let status = nodes[i]
                        .serve
                        .as_mut()
                        .unwrap()
                        .terminate(Duration::from_secs(20));
                    assert!(status.success(), "{status}");
                    nodes[i].serve = None;
                    eprintln!("chaos: SIGTERM {}", nodes[i].id);
                }
            }
            next_event = Instant::now() + Duration::from_millis(1000 + rng.next(2000));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let (ok, clean, down) = (
        ok.load(Ordering::Relaxed),
        clean_5xx.load(Ordering::Relaxed),
        unreachable.load(Ordering::Relaxed),
    );
    eprintln!("chaos: {ok} × 200, {clean} × clean 5xx, {down} × node down; at most {max_running} instance(s)");
    assert!(ok > 0);
    let spawned: Vec<u32> = nodes.iter().flat_map(|n| n.spawned("m")).collect();
    for n in &mut nodes {
        n.kill9();
    }
    support::assert_gone(&spawned, Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_stream_is_not_buffered() {
    let _serial = SERIAL.lock().await;
    use http_body_util::BodyExt;
    if etcd_or_skip().is_none() {
        return;
    }
    let etcd = Etcd::start(3);
    let fleet = fleet_name("stream");
    let nodes = nodes(
        2,
        &fleet,
        &etcd,
        "3s",
        &[("m", "--chunks 6 --chunk-delay 300ms", "")],
    );
    let (status, _) = post(&nodes[0].url, "/upstream/m/health", "{}")
        .await
        .unwrap();
    assert!(status < 500, "{status}");
    assert!(
        !nodes[0].running("m").is_empty(),
        "placed on the node asked"
    );

    let body = r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let auth = format!("Bearer {}", support::fleet::CLIENT_KEY);
    let began = Instant::now();
    let (status, headers, mut incoming) = support::http::send(
        "POST",
        &format!("{}/v1/chat/completions", nodes[1].url),
        &[
            ("content-type", "application/json"),
            ("authorization", &auth),
        ],
        body.to_string(),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-llmvisor-node"], "n0", "forwarded to the holder");
    let mut first = None;
    while let Some(frame) = incoming.frame().await {
        if frame.unwrap().data_ref().is_some_and(|d| !d.is_empty()) && first.is_none() {
            first = Some(began.elapsed());
        }
    }
    let (first, total) = (first.expect("some data"), began.elapsed());
    eprintln!("forwarded stream: first bytes after {first:?}, end after {total:?}");
    // Six chunks 300 ms apart: the first must arrive long before the last is produced.
    assert!(total >= Duration::from_millis(1500), "{total:?}");
    assert!(
        first + Duration::from_millis(1000) < total,
        "buffered: first {first:?}, total {total:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preloaded_model_runs_once_and_moves_by_itself_when_its_node_dies() {
    let _serial = SERIAL.lock().await;
    if etcd_or_skip().is_none() {
        return;
    }
    let etcd = Etcd::start(3);
    let fleet = fleet_name("preload");
    let eps = etcd.endpoints();
    let mut nodes: Vec<FleetNode> = (0..3)
        .map(|i| {
            FleetNode::with_top(
                &format!("n{i}"),
                &fleet,
                &eps,
                "2s",
                &[("m", "--startup-delay 300ms", "")],
                "preload = [\"m\"]",
            )
        })
        .collect();
    for n in &mut nodes {
        n.start();
    }
    eventually(Duration::from_secs(20), "the preloaded model runs", || {
        running_on(&nodes, "m").len() == 1
    })
    .await;
    assert_eq!(total_spawns(&nodes, "m"), 1, "one start fleet-wide");
    let h = nodes
        .iter()
        .position(|n| !n.running("m").is_empty())
        .unwrap();
    let children = nodes[h].spawned("m");

    // Its node dies: another node starts it when the lease expires, with no request at all.
    let began = Instant::now();
    nodes[h].kill9();
    support::assert_gone(&children, Duration::from_secs(10)).await;
    eventually(Duration::from_secs(20), "the preloaded model moved", || {
        running_on(&nodes, "m").len() == 1
    })
    .await;
    eprintln!("preloaded model running again after {:?}", began.elapsed());
    assert_eq!(total_spawns(&nodes, "m"), 2);
    assert_ne!(running_on(&nodes, "m")[0], nodes[h].id);
}

// ----- issue 19: fleet mode does not trust etcd (or the network) blindly ----------------------

/// Two started nodes `n0`, `n1` on a one-member etcd, each with its own models.
fn two_nodes(
    etcd: &Etcd,
    fleet: &str,
    n0: &[(&str, &str, &str)],
    n1: &[(&str, &str, &str)],
) -> Vec<FleetNode> {
    let eps = etcd.endpoints();
    let mut out = vec![
        FleetNode::new("n0", fleet, &eps, "3s", n0),
        FleetNode::new("n1", fleet, &eps, "3s", n1),
    ];
    for n in &mut out {
        n.start();
    }
    out
}

/// A request with the client key and `headers`.
fn client_request(
    method: &str,
    url: &str,
    path: &str,
    body: &str,
) -> http::Request<axum::body::Body> {
    http::Request::builder()
        .method(method)
        .uri(format!("{url}{path}"))
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {CLIENT_KEY}"))
        .body(axum::body::Body::from(body.to_string()))
        .unwrap()
}

/// `llmvisor_fleet_placements_claimed_total` of a node.
async fn claimed(url: &str) -> u64 {
    let (_, body) = get(url, "/metrics").await.unwrap();
    body.lines()
        .find_map(|l| l.strip_prefix("llmvisor_fleet_placements_claimed_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no claimed counter in {body}"))
}

/// The etcd lease of node `id`'s record in `fleet`.
async fn node_lease(etcd: &Etcd, fleet: &str, id: &str) -> i64 {
    let mut c = etcd.client(None).await;
    let resp = c
        .get(format!("/llmvisor/{fleet}/nodes/{id}"), None)
        .await
        .unwrap();
    resp.kvs()[0].lease()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_over_tls_admits_only_nodes_with_a_client_certificate() {
    let _serial = SERIAL.lock().await;
    if etcd_or_skip().is_none() {
        return;
    }
    let etcd = Etcd::start_tls();
    let tls = etcd.tls().unwrap();
    let fleet = fleet_name("tls");
    let eps = etcd.endpoints();
    assert!(eps[0].starts_with("https://"), "{eps:?}");
    let creds = format!(
        "etcd_ca = {:?}\netcd_cert = {:?}\netcd_key = {:?}",
        tls.ca, tls.client_cert, tls.client_key
    );
    let mut n0 = FleetNode::with_cluster("n0", &fleet, &eps, "3s", &[("m", "", "")], &creds);
    n0.start();
    let (status, body) = post(&n0.url, "/v1/chat/completions", &chat("m"))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(n0.running("m").len(), 1);

    // Without a client certificate etcd refuses the node, and the node says why.
    let ca_only = format!("etcd_ca = {:?}", tls.ca);
    let n1 = FleetNode::with_cluster("n1", &fleet, &eps, "3s", &[("m", "", "")], &ca_only);
    let (status, stderr) =
        support::serve::ServeProcess::run_to_exit(n1.config(), Duration::from_secs(60));
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("cannot connect to etcd at https://127.0.0.1:"),
        "{stderr}"
    );
    assert!(stderr.contains("set etcd_cert and etcd_key"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_with_auth_admits_only_nodes_with_the_password() {
    let _serial = SERIAL.lock().await;
    if etcd_or_skip().is_none() {
        return;
    }
    let etcd = Etcd::start(1);
    etcd.enable_auth("root-password-0123", "node-password-0123")
        .await;
    let fleet = fleet_name("auth");
    let eps = etcd.endpoints();
    let secrets = tempfile::tempdir().unwrap();
    let with_password = |id: &str, password: &str| {
        use std::os::unix::fs::PermissionsExt;
        let file = secrets.path().join(format!("{id}-etcd-password"));
        std::fs::write(&file, format!("{password}\n")).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let cluster = format!("etcd_user = \"node\"\netcd_password_file = {file:?}");
        FleetNode::with_cluster(id, &fleet, &eps, "3s", &[("m", "", "")], &cluster)
    };
    let mut n0 = with_password("n0", "node-password-0123");
    n0.start();
    let (status, body) = post(&n0.url, "/v1/chat/completions", &chat("m"))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");

    let anonymous = FleetNode::new("n1", &fleet, &eps, "3s", &[("m", "", "")]);
    let (status, stderr) =
        support::serve::ServeProcess::run_to_exit(anonymous.config(), Duration::from_secs(60));
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("etcd has authentication enabled: set etcd_user"),
        "{stderr}"
    );

    let wrong = with_password("n2", "not-the-password");
    let (status, stderr) =
        support::serve::ServeProcess::run_to_exit(wrong.config(), Duration::from_secs(60));
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains("etcd refused the credentials"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_placement_that_does_not_match_its_nodes_record_gets_no_request() {
    let _serial = SERIAL.lock().await;
    if etcd_or_skip().is_none() {
        return;
    }
    let etcd = Etcd::start(1);
    let fleet = fleet_name("forged");
    let models = [("m", "", "replicas = 2"), ("w", "", "replicas = 2")];
    let nodes = two_nodes(&etcd, &fleet, &models, &models);
    // Where a forged advertise URL would send prompts: nothing may ever connect here.
    let trap = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    trap.set_nonblocking(true).unwrap();
    let trap_url = format!("http://{}", trap.local_addr().unwrap());

    let lease = node_lease(&etcd, &fleet, "n1").await;
    let forged = |model: &str, advertise: &str| {
        serde_json::json!({"model": model, "node": "n1", "advertise": advertise, "slot": 0, "since_ms": 0})
            .to_string()
    };
    let mut c = etcd.client(None).await;
    // n1's lease, but another advertise URL than n1's record.
    let on_lease = etcd_client::PutOptions::new().with_lease(lease);
    c.put(
        format!("/llmvisor/{fleet}/placements/m/0"),
        forged("m", &trap_url),
        Some(on_lease),
    )
    .await
    .unwrap();
    // n1's advertise URL, but not on n1's lease.
    c.put(
        format!("/llmvisor/{fleet}/placements/w/0"),
        forged("w", &nodes[1].url),
        None,
    )
    .await
    .unwrap();

    for _ in 0..3 {
        for model in ["m", "w"] {
            let (status, body) = post(&nodes[0].url, "/v1/chat/completions", &chat(model))
                .await
                .unwrap();
            assert_eq!(status, 200, "{model}: {body}");
        }
    }
    assert!(
        trap.accept().is_err(),
        "a forged advertise URL got a connection"
    );
    // Served by a placement of its own on n0; n1 was never asked for the one it does not hold.
    assert_eq!(nodes[0].spawned("m").len(), 1);
    assert_eq!(nodes[0].spawned("w").len(), 1);
    assert!(nodes[1].spawned("w").is_empty() && nodes[1].spawned("m").is_empty());

    let (_, body) = get(&nodes[0].url, "/api/cluster").await.unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["ignored_placements"].as_array().unwrap().len(), 2, "{v}");
    assert_eq!(v["placements"].as_array().unwrap().len(), 2, "{v}");
    // Warned about once each, not per request.
    let log = nodes[0].serve().stderr_so_far();
    for key in ["placements/m/0", "placements/w/0"] {
        let warnings = log
            .lines()
            .filter(|l| l.contains("ignoring a placement") && l.contains(key))
            .count();
        assert_eq!(warnings, 1, "{key}:\n{log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hop_is_signed_and_never_carries_the_cluster_key() {
    let _serial = SERIAL.lock().await;
    if etcd_or_skip().is_none() {
        return;
    }
    let etcd = Etcd::start(1);
    let fleet = fleet_name("signed");
    let m = [("m", "", "nodes = [\"n1\"]")];
    let nodes = two_nodes(&etcd, &fleet, &m, &m);
    // Through n0 to the model on n1: what reaches the model has no cluster key anywhere.
    let req = client_request("POST", &nodes[0].url, "/upstream/m/echo", r#"{"x":1}"#);
    let (status, headers, body) = send_full(req).await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["x-llmvisor-node"], "n1");
    assert!(
        !body.contains(CLUSTER_KEY),
        "the cluster key travelled: {body}"
    );
    assert!(!body.contains("x-llmvisor-cluster-key"), "{body}");

    let n1 = &nodes[1];
    let (status, _, body) = send_full(signed_hop(&n1.url, "n1", &chat("m"), None))
        .await
        .unwrap();
    assert_eq!(
        status, 200,
        "a signed hop passes without a client key: {body}"
    );
    // The same hop again: refused (the nonce is spent).
    let nonce = hop::new_nonce();
    let now = hop::unix_now();
    let once = || signed_hop_at(&n1.url, "n1", &chat("m"), None, now, &nonce);
    assert_eq!(send_full(once()).await.unwrap().0, 200);
    let (status, _, body) = send_full(once()).await.unwrap();
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("already used"), "{body}");
    // Signed a minute ago, for another node, over another body: refused.
    let stale = signed_hop_at(&n1.url, "n1", &chat("m"), None, now - 60, &hop::new_nonce());
    let (status, _, body) = send_full(stale).await.unwrap();
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("-60 s away"), "{body}");
    let (status, _, body) = send_full(signed_hop(&n1.url, "n0", &chat("m"), None))
        .await
        .unwrap();
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("signature does not verify"), "{body}");
    let other = chat("m").replace("hi", "something else");
    let (status, _, body) = send_full(signed_hop(&n1.url, "n1", &chat("m"), Some(&other)))
        .await
        .unwrap();
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("does not match its signed digest"), "{body}");
    // The old bearer form no longer opens anything, nor does a hop open the management API.
    let bearer = [
        ("x-llmvisor-hop", "n0"),
        ("x-llmvisor-cluster-key", CLUSTER_KEY),
    ];
    let (status, body) = post_with(&n1.url, "/v1/chat/completions", &chat("m"), &bearer)
        .await
        .unwrap();
    assert_eq!(status, 401, "{body}");
    let (status, _) = post_with(&n1.url, "/api/models/m/unload", "", &bearer)
        .await
        .unwrap();
    assert_eq!(status, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_writes_placements_only_under_its_own_lease() {
    let _serial = SERIAL.lock().await;
    if etcd_or_skip().is_none() {
        return;
    }
    let etcd = Etcd::start(1);
    let fleet = fleet_name("own-lease");
    let m = [("m", "", "nodes = [\"n1\"]")];
    let nodes = two_nodes(&etcd, &fleet, &m, &m);
    // Asked through n0 for a model only n1 may run: n0 asks n1 to claim it, n1 writes it.
    let (status, body) = post(&nodes[0].url, "/v1/chat/completions", &chat("m"))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        claimed(&nodes[0].url).await,
        0,
        "n0 wrote a placement for n1"
    );
    assert_eq!(claimed(&nodes[1].url).await, 1);
    let mut c = etcd.client(None).await;
    let placed = c
        .get(format!("/llmvisor/{fleet}/placements/m/0"), None)
        .await
        .unwrap();
    assert_eq!(
        placed.kvs()[0].lease(),
        node_lease(&etcd, &fleet, "n1").await
    );
    assert_eq!(nodes[1].running("m").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_through_another_node_reaches_the_model() {
    let _serial = SERIAL.lock().await;
    if etcd_or_skip().is_none() {
        return;
    }
    let etcd = Etcd::start(1);
    let fleet = fleet_name("upstream");
    let m = [("m", "", "nodes = [\"n1\"]")];
    let nodes = two_nodes(&etcd, &fleet, &m, &m);
    let req = client_request("GET", &nodes[0].url, "/upstream/m/echo/tail?q=1", "");
    let (status, headers, body) = send_full(req).await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["x-llmvisor-node"], "n1");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["path"], "/echo/tail", "{v}");
    assert_eq!(v["query"], "q=1", "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hop_to_a_node_outside_the_models_nodes_is_refused() {
    let _serial = SERIAL.lock().await;
    if etcd_or_skip().is_none() {
        return;
    }
    let etcd = Etcd::start(1);
    let fleet = fleet_name("nodes");
    // The two configs disagree: n0 believes m runs on n1, n1 that it runs on n0 only.
    let nodes = two_nodes(
        &etcd,
        &fleet,
        &[("m", "", "nodes = [\"n1\"]")],
        &[("m", "", "nodes = [\"n0\"]")],
    );
    let (status, body) = post(&nodes[0].url, "/v1/chat/completions", &chat("m"))
        .await
        .unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("fleet_no_room") && body.contains("exclude it"),
        "{body}"
    );
    let (status, _, body) = send_full(signed_hop(&nodes[1].url, "n1", &chat("m"), None))
        .await
        .unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("fleet_not_placed_here"), "{body}");
    assert!(
        nodes[1].spawned("m").is_empty(),
        "n1 ran a model its nodes exclude"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_servers_not_placed_header_is_neither_trusted_nor_passed_on() {
    let _serial = SERIAL.lock().await;
    if etcd_or_skip().is_none() {
        return;
    }
    let etcd = Etcd::start(1);
    let fleet = fleet_name("not-placed");
    let m = [(
        "m",
        "--response-header x-llmvisor-not-placed:1",
        "nodes = [\"n1\"]",
    )];
    let nodes = two_nodes(&etcd, &fleet, &m, &m);
    // Placed (and loaded) first, so the timed request below only measures the hop.
    let (status, body) = post(&nodes[1].url, "/v1/chat/completions", &chat("m"))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let began = Instant::now();
    let req = client_request("POST", &nodes[0].url, "/v1/chat/completions", &chat("m"));
    let (status, headers, body) = send_full(req).await.unwrap();
    let took = began.elapsed();
    assert_eq!(status, 200, "{body}");
    assert!(
        !headers.contains_key("x-llmvisor-not-placed"),
        "{headers:?}"
    );
    // Trusting it would route the request again and again for lease_ttl + 2 s (5 s).
    assert!(took < Duration::from_secs(3), "took {took:?}");
}
