//! One running child process: its exit, its output, and how it is stopped.
//!
//! A watcher task owns the `tokio::process::Child` and is the only place it is awaited (and so
//! reaped); everyone else learns the exit status from a watch channel. Stopping always targets the
//! whole process group, because servers started through wrapper scripts leave grandchildren in it
//! — through the leader's pidfd, taken at launch, never by a group number that may have been
//! recycled (see [`LeaderGroup`]).

use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

use rustix::process::Signal;
use tokio::io::AsyncRead;
use tokio::process::Child;
use tokio::sync::watch;

use crate::escalate::{self, escalate, Outcome, Targets};
use crate::logs::LogSink;
use crate::pidfd::LeaderGroup;
use crate::procfs;
use crate::reaper::Registry;
use crate::units;

pub struct ChildProcess {
    pid: u32,
    /// The process group, through the leader's pidfd taken before the leader could be reaped.
    group: LeaderGroup,
    exit: watch::Receiver<Option<ExitStatus>>,
    registry: Registry,
    /// How many of the output pipes have reached end of file.
    output_closed: watch::Receiver<usize>,
    pipes: usize,
}

impl ChildProcess {
    /// Takes over a freshly spawned child: captures its output into `logs`, awaits its exit, and
    /// records its group in `registry` until the group is gone.
    pub fn launch(mut child: Child, logs: Arc<LogSink>, registry: Registry) -> Self {
        let pid = child.id().expect("a just-spawned child has a pid");
        // Nothing has awaited the child yet, so it is unreaped and `pid` surely names it.
        let group = LeaderGroup::of_child(pid);
        registry.insert(group.clone());
        let (closed_tx, output_closed) = watch::channel(0usize);
        let closed_tx = Arc::new(closed_tx);
        let mut pipes = 0;
        for pipe in [
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn AsyncRead + Send + Unpin>),
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn AsyncRead + Send + Unpin>),
        ]
        .into_iter()
        .flatten()
        {
            pipes += 1;
            let (logs, closed_tx) = (logs.clone(), closed_tx.clone());
            tokio::spawn(async move {
                logs.capture(pipe).await;
                closed_tx.send_modify(|n| *n += 1);
            });
        }
        let (tx, exit) = watch::channel(None);
        tokio::spawn(async move {
            let status = child.wait().await;
            let status = status.unwrap_or_else(|e| {
                tracing::error!(pid, "waiting for child failed: {e}");
                // Cannot happen for a child we own; treat it as killed.
                std::os::unix::process::ExitStatusExt::from_raw(9)
            });
            let _ = tx.send(Some(status));
        });
        Self {
            pid,
            group,
            exit,
            registry,
            output_closed,
            pipes,
        }
    }

    /// Waits (at most `within`) until the child's output pipes are closed and every line is in
    /// the log sink — so a failure message can quote the server's last words. Bounded, because
    /// a grandchild may hold the pipes open.
    pub async fn output_drained(&self, within: Duration) {
        let mut rx = self.output_closed.clone();
        let pipes = self.pipes;
        let _ = tokio::time::timeout(within, rx.wait_for(|n| *n >= pipes)).await;
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The exit status, once the child has exited (and been reaped).
    pub fn exit_status(&self) -> Option<ExitStatus> {
        *self.exit.borrow()
    }

    /// Resolves when the child has exited.
    pub async fn exited(&self) -> ExitStatus {
        let mut rx = self.exit.clone();
        let status = rx.wait_for(Option::is_some).await;
        match status {
            Ok(s) => s.expect("wait_for returned Some"),
            // The watcher task is gone without a status: only at runtime shutdown.
            Err(_) => std::os::unix::process::ExitStatusExt::from_raw(9),
        }
    }

    /// SIGTERM to the group, up to `grace` for it to go, then SIGKILL (see [`escalate`]).
    /// Returns once the leader is reaped and, unless something survived SIGKILL, no live
    /// process is left in the group.
    pub async fn stop(&self, grace: Duration) -> ExitStatus {
        let outcome = escalate(&mut self.group_target(), grace).await;
        if outcome == Outcome::Killed {
            tracing::info!(
                pid = self.pid,
                "did not exit within {} of SIGTERM; sent SIGKILL",
                units::format_duration(grace)
            );
        }
        self.finished(outcome);
        self.exited().await
    }

    /// SIGKILL to the whole group, then wait (bounded) until no live member is left.
    pub async fn kill_group_and_wait(&self) {
        let outcome = escalate::kill(&mut self.group_target()).await;
        self.finished(outcome);
    }

    fn group_target(&self) -> GroupTarget<'_> {
        GroupTarget { child: self }
    }

    /// After an escalation: a group that is gone (its leader reaped, no live member) leaves
    /// the registry.
    fn finished(&self, outcome: Outcome) {
        if outcome.all_gone() {
            self.registry.remove(self.pid);
        } else {
            tracing::warn!(pgid = self.pid, "processes of the group survived SIGKILL");
        }
    }
}

/// A server's process group as a target of [`escalate`]: signalled through its leader's pidfd
/// ([`LeaderGroup`]), gone once the leader is reaped and no live process is left in the group.
struct GroupTarget<'a> {
    child: &'a ChildProcess,
}

impl Targets for GroupTarget<'_> {
    fn signal(&mut self, sig: Signal) {
        self.child.group.signal(sig);
    }

    fn all_gone(&self) -> bool {
        // The group id is the leader's pid: while the leader is unreaped it names our group;
        // after, the members found are ours as long as any are left (a group id is not handed
        // out again while the group has members). A recycled number could only make us wait
        // longer (bounded), never signal: signals go through the pidfd.
        self.child.exit_status().is_some() && procfs::live_group_members(self.child.pid).is_empty()
    }
}
