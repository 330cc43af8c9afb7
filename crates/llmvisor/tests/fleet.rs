//! Fleet mode (issue 15) against a real 3-member etcd cluster and three `llmvisor serve`
//! processes on loopback, with fake-llm models. Skipped (with a message) when etcd is not
//! installed: run scripts/setup-fleet.sh.
#![cfg(feature = "fleet")]

mod support;

use std::time::{Duration, Instant};

use support::fleet::{chat, etcd_or_skip, get, post, Etcd, FleetNode};

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
}
