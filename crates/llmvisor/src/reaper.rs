//! The registry of our children's process groups, and reaping of orphaned grandchildren.
//!
//! llmvisor marks itself a child subreaper: when a server started through a wrapper script leaves
//! a grandchild behind, that grandchild is reparented to us instead of to PID 1 (which, in some
//! containers, never reaps). We then reap such orphans ourselves — but only those in one of our
//! servers' process groups, and never a group leader: the leaders are our direct children and
//! their exit status belongs to the task that awaits them (reaping with `wait(-1)` would steal it).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use rustix::process::{Pid, WaitOptions};
use tokio::signal::unix::{signal, SignalKind};

use crate::pidfd::LeaderGroup;
use crate::procfs;

/// Process groups of the servers this llmvisor started and that may still have members.
#[derive(Clone, Default)]
pub struct Registry {
    inner: Arc<Mutex<RegistryInner>>,
}

#[derive(Default)]
struct RegistryInner {
    /// Each group through its leader's pidfd (see [`LeaderGroup`]: never signalled by a number
    /// that may have been recycled).
    live: HashMap<u32, LeaderGroup>,
    /// Every group ever registered: orphans of a group can outlive its leader's bookkeeping.
    ever: HashSet<u32>,
}

impl Registry {
    pub fn insert(&self, group: LeaderGroup) {
        let mut inner = self.lock();
        inner.ever.insert(group.pgid());
        inner.live.insert(group.pgid(), group);
    }

    pub fn remove(&self, pgid: u32) {
        self.lock().live.remove(&pgid);
    }

    pub fn live(&self) -> Vec<u32> {
        self.lock().live.keys().copied().collect()
    }

    fn is_ours(&self, pgid: u32) -> bool {
        self.lock().ever.contains(&pgid)
    }

    /// The registry stays usable even if a thread panicked while holding the lock: its sets are
    /// updated one call at a time, never left half-written.
    fn lock(&self) -> MutexGuard<'_, RegistryInner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// SIGKILL every live group, synchronously (the supervisor is being dropped).
    pub fn kill_all(&self) {
        let groups: Vec<LeaderGroup> = self.lock().live.values().cloned().collect();
        for group in groups {
            group.signal(rustix::process::Signal::KILL);
        }
    }

    /// Reaps zombie children of ours that belong to one of our groups but are not its leader.
    pub fn reap_orphans(&self) -> usize {
        let mut reaped = 0;
        for pid in procfs::own_children() {
            let Some(stat) = procfs::stat(pid) else {
                continue;
            };
            if stat.is_zombie() && stat.pid != stat.pgrp && self.is_ours(stat.pgrp) {
                if let Some(p) = Pid::from_raw(pid as i32) {
                    if let Ok(Some(_)) = rustix::process::waitpid(Some(p), WaitOptions::NOHANG) {
                        reaped += 1;
                    }
                }
            }
        }
        reaped
    }
}

/// Makes this process a child subreaper and starts the task that reaps orphans on SIGCHLD.
pub fn start(registry: Registry) -> tokio::task::JoinHandle<()> {
    if let Err(e) = rustix::process::set_child_subreaper(Some(rustix::process::getpid())) {
        tracing::warn!("cannot become a child subreaper: {e}");
    }
    tokio::spawn(async move {
        let Ok(mut sigchld) = signal(SignalKind::child()) else {
            tracing::warn!("cannot listen for SIGCHLD; orphans will not be reaped");
            return;
        };
        while sigchld.recv().await.is_some() {
            let n = registry.reap_orphans();
            if n > 0 {
                tracing::debug!(reaped = n, "reaped orphaned grandchildren");
            }
        }
    })
}
