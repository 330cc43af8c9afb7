//! Stopping one server's process group (`ChildProcess::stop`): SIGTERM, the grace, SIGKILL —
//! with real processes.

mod support;

use std::os::unix::process::ExitStatusExt;
use std::sync::Arc;
use std::time::Duration;

use llmvisor::child::ChildProcess;
use llmvisor::logs::LogSink;
use llmvisor::procfs;
use llmvisor::reaper::Registry;
use support::Procs;
use tokio::process::Command;

/// Reads the pid a shell wrote to `path` (bounded).
async fn read_pid(path: &std::path::Path) -> u32 {
    for _ in 0..500 {
        if let Some(pid) = std::fs::read_to_string(path)
            .ok()
            .and_then(|t| t.trim().parse().ok())
        {
            return pid;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{} never written", path.display());
}

#[tokio::test]
async fn a_member_ignoring_sigterm_is_killed_through_the_leaders_pidfd_after_the_leader_is_reaped()
{
    // Orphaned members come to this process, which reaps them below.
    rustix::process::set_child_subreaper(Some(rustix::process::getpid())).unwrap();
    // The leader and its group (the member) are killed and reaped by pid when the test ends,
    // pass or fail.
    let mut procs = Procs::default();
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("member.pid");
    // The leader dies of SIGTERM; the member it leaves in its group ignores SIGTERM (and
    // writes its pid only once it does).
    let script = format!(
        "sh -c 'trap \"\" TERM; echo $$ > {}; exec sleep 300' & exec sleep 300",
        pid_file.display()
    );
    let child = Command::new("sh")
        .args(["-c", &script])
        .process_group(0)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    procs.adopt_group(child.id().expect("a just-spawned child has a pid"));
    let registry = Registry::default();
    let process = ChildProcess::launch(child, Arc::new(LogSink::new(None)), registry.clone());
    let leader = process.pid();
    let member = read_pid(&pid_file).await;
    procs.adopt(member);
    assert_eq!(procfs::stat(member).map(|s| s.pgrp), Some(leader));
    assert_eq!(registry.live(), vec![leader]);

    let began = std::time::Instant::now();
    let status = process.stop(Duration::from_millis(300)).await;
    let took = began.elapsed();
    let member_alive = procfs::is_alive(member);
    // Reap the member (our orphan now), by pid; should it have survived, `procs` kills it.
    drop(procs);
    assert!(!member_alive, "the member survived stop()");
    assert!(
        took >= Duration::from_millis(300),
        "SIGTERM alone stopped the member"
    );
    assert_eq!(status.signal(), Some(15), "the leader went on SIGTERM");
    assert!(registry.live().is_empty(), "the group is off the registry");
    assert!(procfs::live_group_members(leader).is_empty());
}
