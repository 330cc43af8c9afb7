//! One running child process: its exit, its output, and how it is stopped.
//!
//! A watcher task owns the `tokio::process::Child` and is the only place it is awaited (and so
//! reaped); everyone else learns the exit status from a watch channel. Stopping always targets the
//! whole process group, because servers started through wrapper scripts leave grandchildren in it.

use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

use rustix::process::Signal;
use tokio::io::AsyncRead;
use tokio::process::Child;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::logs::LogSink;
use crate::procfs;
use crate::reaper::Registry;
use crate::spawn::signal_group;

/// Poll interval while waiting for a process group to empty.
const GROUP_POLL: Duration = Duration::from_millis(10);
/// After SIGKILL, how long to wait for the kernel to finish the group off before giving up.
const KILL_GRACE: Duration = Duration::from_secs(2);

pub struct ChildProcess {
    pid: u32,
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
        registry.insert(pid);
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

    /// SIGTERM to the group, up to `grace` for it to exit, then SIGKILL. Returns once the leader
    /// is reaped and no live process is left in the group.
    pub async fn stop(&self, grace: Duration) -> ExitStatus {
        let deadline = Instant::now() + grace;
        if self.exit_status().is_none() {
            signal_group(self.pid, Signal::TERM);
        }
        let status = tokio::select! {
            s = self.exited() => Some(s),
            _ = tokio::time::sleep_until(deadline) => None,
        };
        let status = match status {
            Some(s) => s,
            None => {
                tracing::info!(
                    pid = self.pid,
                    "did not exit within {grace:?} of SIGTERM; sending SIGKILL"
                );
                signal_group(self.pid, Signal::KILL);
                self.exited().await
            }
        };
        self.finish_group(deadline).await;
        status
    }

    /// After the leader exited: give the rest of its group until `deadline` (they got SIGTERM
    /// with it), then SIGKILL whatever is left and wait for it to go.
    pub async fn finish_group(&self, deadline: Instant) {
        while Instant::now() < deadline && !procfs::live_group_members(self.pid).is_empty() {
            tokio::time::sleep(GROUP_POLL).await;
        }
        self.kill_group_and_wait().await;
    }

    /// SIGKILL to the whole group, then wait (bounded) until no live member is left.
    pub async fn kill_group_and_wait(&self) {
        signal_group(self.pid, Signal::KILL);
        let give_up = Instant::now() + KILL_GRACE;
        while !procfs::live_group_members(self.pid).is_empty() {
            if Instant::now() >= give_up {
                tracing::warn!(pgid = self.pid, "processes of the group survived SIGKILL");
                return;
            }
            tokio::time::sleep(GROUP_POLL).await;
        }
        if self.exit_status().is_some() {
            self.registry.remove(self.pid);
        }
    }
}
