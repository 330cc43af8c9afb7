//! `kill -9` of a process running the supervisor leaves no child alive (parent-death signal).
//!
//! The test re-runs its own binary as the helper process (the ignored test `helper_process`,
//! selected by an environment variable), so no extra binary is needed.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use llmvisor::Supervisor;
use support::{assert_gone, Procs, Scratch};

const HELPER_ENV: &str = "LLMVISOR_TEST_HELPER_DIR";

#[tokio::test]
async fn kill9_of_the_supervisor_process_kills_ready_and_loading_children() {
    let s = Scratch::new();
    // The helper's orphans are reparented to us, so we can reap them: no zombie outlives the test.
    rustix::process::set_child_subreaper(Some(rustix::process::getpid())).unwrap();
    // The helper never exits by itself: killed and reaped by pid should the test fail before it
    // kills it (its children, in `s`'s pid files, are then killed and reaped by `s`).
    let mut procs = Procs::default();
    let mut helper = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "helper_process",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HELPER_ENV, s.root())
        .env("FAKE_LLM_BIN", support::fake_llm())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    procs.adopt(helper.id());
    let mut lines = BufReader::new(helper.stdout.take().unwrap()).lines();
    let pids = loop {
        let line = lines.next().expect("helper ended early").unwrap();
        // libtest prints "test helper_process ... " on the same line.
        if let Some((_, rest)) = line.split_once("CHILDREN ") {
            break rest
                .split_whitespace()
                .map(|p| p.parse::<u32>().unwrap())
                .collect::<Vec<_>>();
        }
    };
    assert_eq!(pids.len(), 2);
    for &p in &pids {
        assert!(llmvisor::procfs::is_alive(p), "child {p} should be running");
    }
    let loading = llmvisor::procfs::stat(pids[1]).unwrap();
    assert_eq!(
        loading.pgrp, pids[1],
        "each child leads its own process group"
    );

    helper.kill().unwrap(); // SIGKILL
    helper.wait().unwrap();
    assert_gone(&pids, Duration::from_secs(1)).await;
}

/// The helper: a supervisor with one ready model and one still loading; prints their pids and
/// waits to be killed.
#[test]
#[ignore = "run by kill9_of_the_supervisor_process_kills_ready_and_loading_children"]
fn helper_process() {
    let Ok(dir) = std::env::var(HELPER_ENV) else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let s = Scratch::at(dir.into());
        let sup = Supervisor::new(&s.config(vec![
            s.model("ready", &[]),
            s.model("loading", &["--startup-delay", "60s"]),
        ]))
        .await
        .unwrap();
        let lease = sup.acquire("ready").await.unwrap();
        let sup2 = sup.clone();
        tokio::spawn(async move { sup2.acquire("loading").await });
        let loading = loop {
            if let Some(p) = s.pids("loading.pids").first() {
                break *p;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let ready = s.pids("ready.pids")[0];
        println!("CHILDREN {ready} {loading}");
        std::future::pending::<()>().await;
        drop(lease);
    });
}
