//! The supervisor core against real child processes (the fake server).

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use llmvisor::{AcquireError, Phase, Supervisor};
use support::{assert_gone, assert_no_zombies, Scratch};

const GONE_WITHIN: Duration = Duration::from_secs(5);

async fn finish(sup: Supervisor, scratch: &Scratch) {
    sup.shutdown().await;
    for m in sup.status() {
        assert_eq!(m.pid, None, "{} still has a pid after shutdown", m.id);
    }
    scratch.assert_all_gone(GONE_WITHIN).await;
    assert_no_zombies(&scratch.all_pids());
}

async fn concurrent_acquires_spawn_once(n: usize) {
    let s = Scratch::new();
    let sup = Supervisor::new(&s.config(vec![s.model("a", &["--startup-delay", "300ms"])]))
        .await
        .unwrap();
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let sup = sup.clone();
            tokio::spawn(async move { sup.acquire("a").await.map(|l| l.url()) })
        })
        .collect();
    let mut urls = Vec::new();
    for t in tasks {
        urls.push(t.await.unwrap().unwrap());
    }
    urls.dedup();
    assert_eq!(urls.len(), 1, "every caller must get the same server");
    assert_eq!(s.pids("a.pids").len(), 1, "exactly one spawn");
    finish(sup, &s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_concurrent_acquires_spawn_once() {
    concurrent_acquires_spawn_once(10).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hundred_concurrent_acquires_spawn_once() {
    concurrent_acquires_spawn_once(100).await;
}

#[tokio::test]
async fn rapid_sequential_acquires_spawn_once() {
    let s = Scratch::new();
    let sup = Supervisor::new(&s.config(vec![s.model("a", &[])]))
        .await
        .unwrap();
    let mut url = None;
    for _ in 0..10 {
        let lease = sup.acquire("a").await.unwrap();
        assert!(url.is_none() || url.as_deref() == Some(lease.url().as_str()));
        url = Some(lease.url());
    }
    assert_eq!(s.pids("a.pids").len(), 1);
    finish(sup, &s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn different_models_start_in_parallel() {
    let s = Scratch::new();
    let sup = Supervisor::new(&s.config(vec![
        s.model("a", &["--startup-delay", "1s"]),
        s.model("b", &["--startup-delay", "1s"]),
    ]))
    .await
    .unwrap();
    let began = Instant::now();
    let (a, b) = tokio::join!(sup.acquire("a"), sup.acquire("b"));
    let wall = began.elapsed();
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_ne!(a.url(), b.url(), "different ports");
    assert_eq!(s.pids("a.pids").len(), 1);
    assert_eq!(s.pids("b.pids").len(), 1);
    // Serial loads would take >= 2 s; parallel ones about 1 s. The margin absorbs a slow machine.
    assert!(wall >= Duration::from_secs(1), "{wall:?}");
    assert!(
        wall < Duration::from_millis(1800),
        "loads did not overlap: {wall:?}"
    );
    drop((a, b));
    finish(sup, &s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_model_never_waits_for_another_models_load() {
    let s = Scratch::new();
    let sup = Supervisor::new(&s.config(vec![
        s.model("a", &[]),
        s.model("b", &["--startup-delay", "3s"]),
    ]))
    .await
    .unwrap();
    drop(sup.acquire("a").await.unwrap());
    let loading = {
        let sup = sup.clone();
        tokio::spawn(async move { sup.acquire("b").await.map(drop) })
    };
    sup.model("b")
        .unwrap()
        .wait_for_phase(|p| p == Phase::Starting)
        .await;
    let mut slowest = Duration::ZERO;
    for _ in 0..50 {
        let t = Instant::now();
        let lease = sup.acquire("a").await.unwrap();
        slowest = slowest.max(t.elapsed());
        drop(lease);
    }
    assert_eq!(
        sup.model("b").unwrap().phase(),
        Phase::Starting,
        "b must still be loading"
    );
    assert!(
        slowest < Duration::from_millis(5),
        "slowest acquire of a took {slowest:?}"
    );
    loading.await.unwrap().unwrap();
    finish(sup, &s).await;
}

#[tokio::test]
async fn crashed_server_is_noticed_and_restarted_on_next_acquire() {
    let s = Scratch::new();
    // Policy `stop`: the next acquire restarts it (automatic restarts are tested in health.rs).
    let mut m = s.model("a", &["--crash-after", "1"]);
    m.health.on_unhealthy = llmvisor::config::OnUnhealthy::Stop;
    let sup = Supervisor::new(&s.config(vec![m])).await.unwrap();
    let lease = sup.acquire("a").await.unwrap();
    let first_pid = sup.status()[0].pid.unwrap();
    // One request makes it crash.
    let url = format!("{}/v1/completions", lease.url());
    let r = support::http::request("POST", &url, &[], "{}").await;
    assert_eq!(r.status, 200);
    // The lease learns that its server is gone without anyone sending a request.
    tokio::time::timeout(GONE_WITHIN, lease.server_gone())
        .await
        .unwrap();
    assert!(!lease.is_up());
    let cell = sup.model("a").unwrap();
    cell.wait_for_phase(|p| p == Phase::Stopped).await;
    let st = cell.status();
    assert_eq!(st.last_exit.as_deref(), Some("exit code 3"));
    assert_eq!(st.pid, None);
    drop(lease);
    let again = sup.acquire("a").await.unwrap();
    assert_eq!(s.pids("a.pids").len(), 2, "restarted once");
    assert_ne!(sup.status()[0].pid.unwrap(), first_pid);
    assert_eq!(sup.status()[0].restarts, 1);
    drop(again);
    finish(sup, &s).await;
}

/// A SIGKILL someone else sent (as the kernel's OOM killer would): the usual `last_exit`; where
/// this machine's cgroup counts OOM kills, the count did not move, so no hint; where it does
/// not, the hint.
#[tokio::test]
async fn a_sigkill_not_ours_is_told_apart_from_an_oom_kill() {
    let s = Scratch::new();
    let mut m = s.model("a", &[]);
    m.health.on_unhealthy = llmvisor::config::OnUnhealthy::Stop;
    let sup = Supervisor::new(&s.config(vec![m])).await.unwrap();
    let lease = sup.acquire("a").await.unwrap();
    let pid = sup.status()[0].pid.unwrap();
    let target = rustix::process::Pid::from_raw(pid as i32).unwrap();
    rustix::process::kill_process(target, rustix::process::Signal::KILL).unwrap();
    tokio::time::timeout(GONE_WITHIN, lease.server_gone())
        .await
        .unwrap();
    let cell = sup.model("a").unwrap();
    cell.wait_for_phase(|p| p == Phase::Stopped).await;
    let st = cell.status();
    assert_eq!(st.last_exit.as_deref(), Some("signal 9 (SIGKILL)"));
    let error = st.error.unwrap_or_default();
    let counted = llmvisor::supervisor::oom::OomCounter::own_cgroup()
        .read()
        .is_some();
    assert_eq!(
        error.contains(llmvisor::supervisor::oom::OOM_HINT),
        !counted,
        "counted: {counted}; {error}"
    );
    assert!(!error.contains("OOM killer"), "{error}");
    drop(lease);
    finish(sup, &s).await;
}

#[tokio::test]
async fn startup_crash_loop_backs_off_with_a_clear_error() {
    let s = Scratch::new();
    let sup = Supervisor::new(&s.config(vec![s.model("a", &["--exit-at-startup", "7"])]))
        .await
        .unwrap();
    let err = sup.acquire("a").await.unwrap_err();
    match &err {
        AcquireError::StartFailed {
            reason,
            log_tail,
            retry_after,
            ..
        } => {
            assert!(reason.contains("exit code 7"), "{reason}");
            assert!(
                log_tail.iter().any(|l| l.contains("exiting at startup")),
                "{log_tail:?}"
            );
            assert!(retry_after.is_none());
        }
        other => panic!("unexpected error: {other}"),
    }
    // Immediately again: fails fast, with the reason and a retry time, without a new spawn.
    for _ in 0..20 {
        match sup.acquire("a").await.unwrap_err() {
            AcquireError::StartFailed {
                reason,
                retry_after,
                ..
            } => {
                assert!(reason.contains("exit code 7"), "{reason}");
                assert!(retry_after.is_some());
            }
            other => panic!("unexpected error: {other}"),
        }
    }
    assert_eq!(s.pids("a.pids").len(), 1, "no hot loop");
    let st = sup.model("a").unwrap().status();
    assert_eq!(st.state, Phase::Failed);
    assert!(st.error.unwrap().contains("exit code 7"));
    // An explicit load skips the backoff (and fails again, honestly).
    assert!(sup.load("a").await.is_err());
    assert_eq!(s.pids("a.pids").len(), 2);
    finish(sup, &s).await;
}

#[tokio::test]
async fn startup_timeout_kills_the_server_and_says_so() {
    let s = Scratch::new();
    let mut m = s.model("a", &["--startup-delay", "60s"]);
    m.startup_timeout = Duration::from_millis(500);
    let sup = Supervisor::new(&s.config(vec![m])).await.unwrap();
    let err = sup.acquire("a").await.unwrap_err();
    assert!(matches!(err, AcquireError::StartTimeout { .. }), "{err}");
    assert!(err.to_string().contains("did not become ready"));
    assert_gone(&s.pids("a.pids"), GONE_WITHIN).await;
    finish(sup, &s).await;
}

#[tokio::test]
async fn child_ignoring_sigterm_and_its_grandchild_are_gone_within_stop_timeout() {
    let s = Scratch::new();
    let gc_file = s.path("grandchild.pids");
    let mut m = s.model(
        "a",
        &[
            "--ignore-sigterm",
            "--fork-grandchild",
            "--grandchild-pid-file",
            gc_file.to_str().unwrap(),
        ],
    );
    m.stop_timeout = Duration::from_millis(500);
    let sup = Supervisor::new(&s.config(vec![m])).await.unwrap();
    drop(sup.acquire("a").await.unwrap());
    let child = s.pids("a.pids")[0];
    let grandchild = s.pids("grandchild.pids")[0];
    assert!(llmvisor::procfs::is_alive(grandchild));
    let t = Instant::now();
    sup.unload("a", false).await.unwrap();
    let took = t.elapsed();
    assert!(!llmvisor::procfs::is_alive(child));
    assert!(!llmvisor::procfs::is_alive(grandchild));
    assert!(took < Duration::from_millis(1500), "stop took {took:?}");
    assert_eq!(
        sup.status()[0].last_exit.as_deref(),
        Some("signal 9 (SIGKILL)")
    );
    finish(sup, &s).await;
}

#[tokio::test]
async fn unload_waits_for_leases_unless_forced() {
    let s = Scratch::new();
    let sup = Supervisor::new(&s.config(vec![s.model("a", &[])]))
        .await
        .unwrap();
    let lease = sup.acquire("a").await.unwrap();
    let unload = {
        let sup = sup.clone();
        tokio::spawn(async move { sup.unload("a", false).await })
    };
    let cell = sup.model("a").unwrap();
    cell.wait_for_phase(|p| p == Phase::Stopping).await;
    assert!(lease.is_up(), "draining must not touch the server");
    assert!(!unload.is_finished());
    drop(lease);
    let st = unload.await.unwrap().unwrap();
    assert_eq!(st.state, Phase::Stopped);

    // Forced: the lease learns its server is gone.
    let lease = sup.acquire("a").await.unwrap();
    sup.unload("a", true).await.unwrap();
    tokio::time::timeout(GONE_WITHIN, lease.server_gone())
        .await
        .unwrap();
    assert_eq!(cell.status().leases, 0);
    drop(lease);
    assert_eq!(cell.status().leases, 0);
    finish(sup, &s).await;
}

#[tokio::test]
async fn ttl_stops_only_after_the_last_lease_ends() {
    let s = Scratch::new();
    let mut m = s.model("a", &[]);
    m.ttl = Some(Duration::from_millis(300));
    let sup = Supervisor::new(&s.config(vec![m])).await.unwrap();
    let cell = sup.model("a").unwrap();
    let lease = sup.acquire("a").await.unwrap();
    // Several TTLs pass while the lease lives: nothing happens.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(cell.phase(), Phase::Ready);
    let released = Instant::now();
    drop(lease);
    tokio::time::timeout(GONE_WITHIN, cell.wait_for_phase(|p| p == Phase::Stopped))
        .await
        .unwrap();
    let idle = released.elapsed();
    assert!(idle >= Duration::from_millis(300), "stopped after {idle:?}");
    finish(sup, &s).await;
}

#[tokio::test]
async fn a_new_acquire_cancels_the_ttl() {
    let s = Scratch::new();
    let mut m = s.model("a", &[]);
    m.ttl = Some(Duration::from_millis(400));
    let sup = Supervisor::new(&s.config(vec![m])).await.unwrap();
    let cell = sup.model("a").unwrap();
    drop(sup.acquire("a").await.unwrap());
    tokio::time::sleep(Duration::from_millis(250)).await;
    let lease = sup.acquire("a").await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        cell.phase(),
        Phase::Ready,
        "the TTL of the first lease must not fire"
    );
    drop(lease);
    assert_eq!(s.pids("a.pids").len(), 1);
    finish(sup, &s).await;
}

#[tokio::test]
async fn children_carry_the_instance_marker_and_their_output_is_captured() {
    let s = Scratch::new();
    let mut m = s.model(
        "a",
        &[
            "--print-env",
            "LLMVISOR_INSTANCE",
            "--print-env",
            "GREETING",
            "--log-lines",
            "3",
        ],
    );
    m.env.insert("GREETING".into(), "hello-${MODEL_ID}".into());
    let sup = Supervisor::new(&s.config(vec![m])).await.unwrap();
    let lease = sup.acquire("a").await.unwrap();
    let logs = sup.logs("a").unwrap();
    let expected_marker = format!("env LLMVISOR_INSTANCE={}", sup.instance_id());
    // Output is read asynchronously: wait for it rather than sleeping.
    let (mut lines, mut rx) = logs.follow();
    let deadline = Instant::now() + GONE_WITHIN;
    while !(lines.iter().any(|l| l == &expected_marker)
        && lines.iter().any(|l| l.contains("fake-llm log line 3")))
    {
        assert!(Instant::now() < deadline, "{lines:?}");
        if let Ok(Ok(l)) = tokio::time::timeout(Duration::from_millis(100), rx.recv()).await {
            lines.push(l);
        }
    }
    assert!(
        lines.iter().any(|l| l == "env GREETING=hello-a"),
        "{lines:?}"
    );
    let file = std::fs::read_to_string(s.state_dir().join("logs/a.log")).unwrap();
    assert!(file.contains(&expected_marker));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(s.state_dir())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(
        mode & 0o077,
        0,
        "state dir must not be group/world accessible"
    );
    drop(lease);
    finish(sup, &s).await;
}

#[tokio::test]
async fn unknown_model_names_the_known_ones() {
    let s = Scratch::new();
    let mut m = s.model("alpha", &[]);
    m.aliases = vec!["a".into()];
    let sup = Supervisor::new(&s.config(vec![m, s.model("beta", &[])]))
        .await
        .unwrap();
    let err = sup.acquire("gamma").await.unwrap_err();
    assert!(matches!(err, AcquireError::UnknownModel { .. }));
    assert!(err.to_string().contains("alpha, beta"), "{err}");
    // An alias reaches the same model.
    let lease = sup.acquire("a").await.unwrap();
    assert_eq!(lease.model(), "alpha");
    drop(lease);
    finish(sup, &s).await;
}

#[tokio::test]
async fn shutdown_stops_every_server_in_parallel() {
    let s = Scratch::new();
    let mut a = s.model("a", &["--ignore-sigterm"]);
    a.stop_timeout = Duration::from_millis(800);
    let mut b = s.model("b", &["--ignore-sigterm"]);
    b.stop_timeout = Duration::from_millis(800);
    let sup = Supervisor::new(&s.config(vec![a, b])).await.unwrap();
    let (la, lb) = tokio::join!(sup.acquire("a"), sup.acquire("b"));
    drop((la.unwrap(), lb.unwrap()));
    let t = Instant::now();
    sup.shutdown().await;
    let took = t.elapsed();
    // Serial stops would take 2 × 800 ms.
    assert!(took < Duration::from_millis(1500), "shutdown took {took:?}");
    assert!(matches!(
        sup.acquire("a").await,
        Err(AcquireError::Unavailable { .. })
    ));
    finish(sup, &s).await;
}

#[tokio::test]
async fn dropping_the_supervisor_kills_its_children() {
    let s = Scratch::new();
    let sup = Supervisor::new(&s.config(vec![s.model("a", &[])]))
        .await
        .unwrap();
    let lease = sup.acquire("a").await.unwrap();
    let pid = s.pids("a.pids")[0];
    drop(lease);
    drop(sup);
    assert_gone(&[pid], Duration::from_secs(1)).await;
}

#[tokio::test]
async fn waiters_that_give_up_do_not_cancel_the_start_for_others() {
    let s = Scratch::new();
    let sup = Arc::new(
        Supervisor::new(&s.config(vec![s.model("a", &["--startup-delay", "500ms"])]))
            .await
            .unwrap(),
    );
    // The first caller gives up early (a client that disconnected)...
    let impatient = tokio::time::timeout(Duration::from_millis(100), sup.acquire("a")).await;
    assert!(impatient.is_err());
    // ...the start goes on, and the next caller joins it.
    let lease = sup.acquire("a").await.unwrap();
    assert_eq!(s.pids("a.pids").len(), 1);
    drop(lease);
    let sup = Arc::try_unwrap(sup).ok().unwrap();
    finish(sup, &s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_taken_during_startup_is_retried_on_another_port_without_the_caller_noticing() {
    let s = Scratch::new();
    let flag = s.path("first-attempt-done");
    let holder_pid = s.path("holder.pid");
    // First attempt: another process (in its own session, so not in our group) grabs the port
    // the child was given, and the child dies as a server that lost the bind race would.
    // Second attempt: a normal server.
    let script = format!(
        r#"if [ ! -e {flag} ]; then
  touch {flag}
  setsid python3 -c 'import os, socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen()
open(sys.argv[2], "w").write(str(os.getpid())); time.sleep(60)' "$1" {holder} &
  n=0; while [ ! -s {holder} ] && [ $n -lt 500 ]; do sleep 0.01; n=$((n+1)); done
  echo "couldn't bind HTTP server socket, port: $1" >&2
  exit 1
fi
exec {fake} --port "$1""#,
        flag = flag.display(),
        holder = holder_pid.display(),
        fake = support::fake_llm().display(),
    );
    let mut m = s.model("m", &[]);
    m.cmd = vec![
        "sh".into(),
        "-c".into(),
        script,
        "sh".into(),
        "${PORT}".into(),
    ];
    let sup = Supervisor::new(&s.config(vec![m])).await.unwrap();
    let lease = sup
        .acquire("m")
        .await
        .expect("the caller must not notice the retry");
    let holder: u32 = std::fs::read_to_string(&holder_pid)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let taken_port = {
        let logs = sup.logs("m").unwrap().tail(100);
        assert!(
            logs.iter()
                .any(|l| l.contains("was taken by another process; retrying")),
            "{logs:?}"
        );
        assert!(logs.iter().any(|l| l.contains("(attempt 2)")), "{logs:?}");
        logs.iter()
            .find_map(|l| {
                l.strip_prefix("llmvisor: port ")?
                    .split(' ')
                    .next()?
                    .parse::<u16>()
                    .ok()
            })
            .unwrap()
    };
    assert_ne!(lease.endpoint().port(), Some(taken_port));
    drop(lease);
    sup.shutdown().await;
    // The port holder is ours to clean up, by pid.
    let pid = rustix::process::Pid::from_raw(holder as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::KILL).unwrap();
    assert_gone(&[holder], GONE_WITHIN).await;
    s.assert_all_gone(GONE_WITHIN).await;
}
