//! What survives a SIGKILL of llmvisor, and who cleans it up: the next llmvisor on the same
//! state dir, or `llmvisor gc`.

mod support;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use rustix::process::Signal;
use support::http::request;
use support::serve::ServeProcess;
use support::{assert_gone, fake_llm, reap_zombie_children, Procs, Scratch};

const BIN: &str = env!("CARGO_BIN_EXE_llmvisor");

/// A model whose server is started by a wrapper shell, so the server is a grandchild of
/// llmvisor that escapes the parent-death signal (only the shell gets it).
fn wrapper_config(s: &Scratch) -> PathBuf {
    let text = format!(
        r#"state_dir = {state:?}
port_range = [{lo}, {hi}]

[models.w]
cmd = ["sh", "-c", "{fake} --port $1 --pid-file {pids} & wait", "sh", "${{PORT}}"]
stop_timeout = "2s"
"#,
        state = s.state_dir().display().to_string(),
        lo = s.ports.0,
        hi = s.ports.1,
        fake = fake_llm().display(),
        pids = s.path("w.pids").display(),
    );
    let path = s.path("llmvisor.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn become_subreaper() {
    // Orphans of the killed daemon come to us, so we can reap them: no zombie outlives a test.
    rustix::process::set_child_subreaper(Some(rustix::process::getpid())).unwrap();
}

fn gc(s: &Scratch, dry_run: bool) -> String {
    let mut cmd = Command::new(BIN);
    cmd.args(["gc", "--state-dir", s.state_dir().to_str().unwrap()]);
    if dry_run {
        cmd.arg("--dry-run");
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "gc failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Starts the daemon, loads `w`, SIGKILLs the daemon; returns the escaped grandchild's pid.
/// The wrapper shell goes into `procs` (the grandchild is in `s`'s pid file): should the test
/// fail, it is killed and reaped, not left a zombie of ours.
async fn orphan_a_grandchild(s: &Scratch, config: &std::path::Path, procs: &mut Procs) -> u32 {
    let mut d = ServeProcess::start(config);
    let r = request("POST", &format!("{}/api/models/w/load", d.url), &[], "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let wrapper = r.json()["pid"].as_u64().unwrap() as u32;
    procs.adopt(wrapper);
    let grandchild = s.pids("w.pids")[0];
    assert_ne!(wrapper, grandchild);
    d.signal(Signal::KILL);
    d.child.wait().unwrap();
    assert_gone(&[wrapper], Duration::from_secs(1)).await;
    // The scenario is real: the grandchild outlived llmvisor.
    assert!(
        llmvisor::procfs::is_alive(grandchild),
        "grandchild died with its parent"
    );
    grandchild
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_llmvisor_on_the_state_dir_stops_an_escaped_grandchild() {
    become_subreaper();
    let s = Scratch::new();
    let mut procs = Procs::default();
    let config = wrapper_config(&s);
    let grandchild = orphan_a_grandchild(&s, &config, &mut procs).await;

    let started = Instant::now();
    let mut d = ServeProcess::start(&config);
    let line = d.wait_for_log(&format!("stopped pid {grandchild}"), Duration::from_secs(2));
    assert!(line.contains("dead"), "{line}");
    assert_gone(
        &[grandchild],
        Duration::from_secs(2).saturating_sub(started.elapsed()),
    )
    .await;
    assert_eq!(d.terminate(Duration::from_secs(10)).code(), Some(0));
    s.assert_all_gone(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_dry_run_reports_then_gc_stops_and_finally_finds_nothing() {
    become_subreaper();
    let s = Scratch::new();
    let mut procs = Procs::default();
    let config = wrapper_config(&s);
    let grandchild = orphan_a_grandchild(&s, &config, &mut procs).await;

    let report = gc(&s, true);
    assert!(
        report.contains(&format!("would stop pid {grandchild}")),
        "{report}"
    );
    assert!(
        llmvisor::procfs::is_alive(grandchild),
        "dry run must not signal"
    );

    let report = gc(&s, false);
    assert!(
        report.contains(&format!("stopped pid {grandchild}")),
        "{report}"
    );
    assert_gone(&[grandchild], Duration::from_secs(2)).await;

    let report = gc(&s, false);
    assert!(
        !report.contains("stopped pid") && !report.contains("would stop"),
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_of_load_and_unload_leaves_nothing() {
    become_subreaper();
    let s = Scratch::new();
    let text = format!(
        "state_dir = {:?}\nport_range = [{}, {}]\n[models.m]\ncmd = \"{} --port ${{PORT}} --pid-file {} --startup-delay 150ms\"\nstop_timeout = \"1s\"\n",
        s.state_dir().display().to_string(),
        s.ports.0,
        s.ports.1,
        fake_llm().display(),
        s.path("m.pids").display()
    );
    let config = s.path("llmvisor.toml");
    std::fs::write(&config, text).unwrap();
    let began = Instant::now();
    // A cheap deterministic "random": each round kills at a different point of the cycle.
    let delays_ms = [0u64, 7, 23, 51, 90, 130, 160, 200, 260, 330];
    for round in 0..20 {
        let d = ServeProcess::start(&config);
        let url = d.url.clone();
        let cycle = tokio::spawn(async move {
            loop {
                request("POST", &format!("{url}/api/models/m/load"), &[], "").await;
                request("POST", &format!("{url}/api/models/m/unload"), &[], "").await;
            }
        });
        tokio::time::sleep(Duration::from_millis(delays_ms[round % delays_ms.len()])).await;
        d.signal(Signal::KILL);
        let mut d = d;
        d.child.wait().unwrap();
        cycle.abort();
        assert_gone(&s.all_pids(), Duration::from_secs(1)).await;
    }
    let report = gc(&s, false);
    assert!(
        !report.contains("stopped pid") && !report.contains("would stop"),
        "{report}"
    );
    reap_zombie_children(&s.all_pids());
    s.assert_all_gone(Duration::from_secs(1)).await;
    assert!(
        began.elapsed() < Duration::from_secs(60),
        "took {:?}",
        began.elapsed()
    );
}

/// Runs `llmvisor serve`, which must refuse to start (exit 1); returns its stderr.
fn serve_fails_at_startup(config: &std::path::Path) -> String {
    let out = Command::new(BIN)
        .args(["serve", "--config", config.to_str().unwrap()])
        .args([
            "--listen",
            &format!("127.0.0.1:{}", support::serve::closed_port()),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_corrupt_state_db_is_a_clear_error_that_names_the_file_and_the_fix() {
    let s = Scratch::new();
    let config = wrapper_config(&s);
    std::fs::create_dir_all(s.state_dir()).unwrap();
    let db = s.state_dir().join("state.db");
    std::fs::write(&db, vec![0x5au8; 8192]).unwrap();
    let err = serve_fails_at_startup(&config);
    assert!(err.contains(&db.display().to_string()), "{err}");
    assert!(err.contains("move it aside"), "{err}");
    // Nothing was overwritten.
    assert_eq!(std::fs::read(&db).unwrap(), vec![0x5au8; 8192]);
}

#[test]
fn an_unusable_state_dir_is_a_clear_error_at_startup() {
    let s = Scratch::new();
    let config = wrapper_config(&s);
    // A regular file where the state dir should be (root ignores permission bits).
    std::fs::write(s.state_dir(), b"not a dir").unwrap();
    let err = serve_fails_at_startup(&config);
    assert!(
        err.contains("state directory") && err.contains(&s.state_dir().display().to_string()),
        "{err}"
    );
}
