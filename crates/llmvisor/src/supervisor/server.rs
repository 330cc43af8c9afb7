//! The server behind a ready model: a child of this llmvisor, or one that another llmvisor
//! process on the same state dir owns and this one *attaches* to.
//!
//! Several llmvisor processes sharing a state dir run at most one server per model: the first
//! to claim the model in the store starts it; the others use it through a remote lease in the
//! store, renewed by a heartbeat, which keeps the owner from idling it out or evicting it. An
//! attached server is watched: when its owner dies (its lock is released) or stops the server
//! (its record goes), the attached model here goes back to stopped, and the next acquire claims
//! and starts it anew.

use std::process::ExitStatus;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use super::Context;
use crate::child::ChildProcess;
use crate::owner::{self, Liveness};
use crate::store::RemoteLease;

/// How often an attached server's owner and record are checked, and the lease renewed.
const WATCH_INTERVAL: Duration = Duration::from_millis(250);
const HEARTBEAT_EVERY: u32 = 8; // × WATCH_INTERVAL = 2 s
/// A remote lease not renewed for this long is dead (its holder stopped heartbeating).
pub const REMOTE_LEASE_TTL: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub enum Server {
    Local(Arc<ChildProcess>),
    Remote(Arc<RemoteServer>),
    /// A stand-in for a process in the actor's unit tests.
    #[cfg(test)]
    Double(Arc<super::double::ServerDouble>),
}

impl Server {
    pub fn pid(&self) -> u32 {
        match self {
            Server::Local(p) => p.pid(),
            Server::Remote(r) => r.pid,
            #[cfg(test)]
            Server::Double(d) => d.pid,
        }
    }

    /// Stops the server: our child's group with SIGTERM, `grace`, SIGKILL (its status); an
    /// attached server is only let go of (`None`: dropping it ends our remote lease).
    pub async fn stop(&self, grace: std::time::Duration) -> Option<ExitStatus> {
        match self {
            Server::Local(p) => Some(p.stop(grace).await),
            Server::Remote(_) => None,
            #[cfg(test)]
            Server::Double(d) => Some(d.stop(grace).await),
        }
    }

    /// After the server ended by itself: whatever it left in its process group goes too.
    pub async fn clear_group(&self) {
        if let Server::Local(p) = self {
            p.kill_group_and_wait().await;
        }
    }

    pub fn local(&self) -> Option<&Arc<ChildProcess>> {
        match self {
            Server::Local(p) => Some(p),
            _ => None,
        }
    }

    /// Resolves when the server is gone: our child's exit status, or `None` for an attached
    /// server whose owner died or stopped it.
    pub async fn ended(&self) -> Option<ExitStatus> {
        match self {
            Server::Local(p) => Some(p.exited().await),
            Server::Remote(r) => {
                let mut gone = r.gone.clone();
                let _ = gone.wait_for(|g| *g).await;
                None
            }
            #[cfg(test)]
            Server::Double(d) => Some(d.exited().await),
        }
    }

    pub fn remote(&self) -> Option<&Arc<RemoteServer>> {
        match self {
            Server::Remote(r) => Some(r),
            _ => None,
        }
    }
}

pub struct RemoteServer {
    pub owner: String,
    pub pid: u32,
    /// With the pid, names the server process for all time within a boot.
    start_time: u64,
    state_dir: std::path::PathBuf,
    gone: watch::Receiver<bool>,
    /// Dropping it (detach) ends the watcher, which then removes the remote lease.
    _detach: watch::Sender<()>,
}

impl RemoteServer {
    /// False once its owner is known dead or its server process is gone — checked now (one
    /// flock probe, one /proc read), not at the next watch tick, so a request never goes to a
    /// server that just died. (A SIGKILLed owner's lock outlives its server by a few
    /// milliseconds: the process itself is the better witness.)
    pub fn usable(&self) -> bool {
        !*self.gone.borrow()
            && Self::process_alive(self.pid, self.start_time)
            && owner::probe(&self.state_dir, &self.owner) == Liveness::Alive
    }

    /// True if `pid` runs, not a zombie, and is the process that started at `start_time`.
    pub fn process_alive(pid: u32, start_time: u64) -> bool {
        crate::procfs::is_same_process(pid, start_time)
    }

    /// Attaches to `owner`'s server `pid` for `model`: takes a remote lease and watches it.
    pub async fn attach(
        ctx: &Arc<Context>,
        model: &str,
        owner: &str,
        pid: u32,
        start_time: u64,
    ) -> Arc<Self> {
        let lease_id = format!("{}:{model}", ctx.instance_id);
        let lease = RemoteLease {
            id: lease_id.clone(),
            model: model.to_owned(),
            holder: ctx.instance_id.to_string(),
            expires_at: SystemTime::now() + REMOTE_LEASE_TTL,
        };
        if let Err(e) = ctx.store.put_remote_lease(&lease).await {
            tracing::warn!(model, "cannot record the remote lease: {e}");
        }
        let (gone_tx, gone) = watch::channel(false);
        let (detach, mut detached) = watch::channel(());
        let (task_ctx, model, owner_id) = (ctx.clone(), model.to_owned(), owner.to_owned());
        tokio::spawn(async move {
            let mut tick = 0u32;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(WATCH_INTERVAL) => {}
                    _ = detached.changed() => break,
                }
                tick += 1;
                let alive = owner::probe(&task_ctx.state_dir, &owner_id) == Liveness::Alive;
                let recorded = match task_ctx.store.children().await {
                    Ok(children) => children
                        .iter()
                        .any(|c| c.instance_id == owner_id && c.pid == pid && c.model == model),
                    Err(_) => true, // the store is busy or broken: judge by the owner alone
                };
                if !alive || !recorded {
                    tracing::info!(model, owner = %owner_id, "the server this instance used is gone ({})",
                        if alive { "its owner stopped it" } else { "its owner died" });
                    let _ = gone_tx.send(true);
                    break;
                }
                if tick % HEARTBEAT_EVERY == 0 {
                    let renewed = task_ctx
                        .store
                        .renew_remote_lease(&lease_id, SystemTime::now() + REMOTE_LEASE_TTL)
                        .await;
                    if let Err(e) = renewed {
                        tracing::warn!(model, "cannot renew the remote lease: {e}");
                    }
                }
            }
            let _ = task_ctx.store.remove_remote_lease(&lease_id).await;
        });
        Arc::new(Self {
            owner: owner.to_owned(),
            pid,
            start_time,
            state_dir: ctx.state_dir.clone(),
            gone,
            _detach: detach,
        })
    }
}
