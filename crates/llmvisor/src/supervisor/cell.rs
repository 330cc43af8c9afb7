//! One model's cell: what everyone can see of a model — its phase, its leases, its server's
//! address — behind a mutex that guards a few words and is never held across an `.await`.
//!
//! The fast path — a ready model — never talks to the model's actor (see `actor.rs`):
//! [`ModelCell::acquire`] takes the mutex, sees `Ready`, counts a lease and returns, so a ready
//! model never waits on anyone. Everything else is a [`Command`] to the actor.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use super::error::AcquireError;
use super::lease::Lease;
use super::memory::Memory;
use super::server::RemoteServer;
use super::status::{ModelStatus, Phase};
use crate::config::ModelConfig;
use crate::logs::LogSink;
use crate::metrics::{Histogram, START_BOUNDS};
use crate::sync::LockExt;

/// The part of a model everyone can see.
pub struct ModelCell {
    pub id: Arc<str>,
    pub logs: Arc<LogSink>,
    pub stats: ModelStats,
    pub(super) state: Mutex<CellState>,
    commands: mpsc::UnboundedSender<Command>,
    /// Bumped on every phase change, so waiters (CLI progress, tests) can await transitions.
    pub(super) changed: watch::Sender<u64>,
    /// Connections to its server at once: one permit per proxied request in flight.
    pub(super) connections: Connections,
    /// `kv_persist`: saved bytes, the reuse check after a restore, counters.
    pub kv: super::kv::KvCell,
}

/// A model's counters at one moment, as plain numbers: what the daemon's /metrics and the
/// event stream read (they never touch the cell's atomics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub starts: u64,
    pub start_failures: u64,
    pub evictions: u64,
    pub swaps: u64,
    /// Proxied requests holding a connection slot, and the slots there are.
    pub connections_in_use: usize,
    pub max_connections: usize,
}

/// The per-server connection limit: a semaphore whose size follows the config.
pub(super) struct Connections {
    slots: Arc<tokio::sync::Semaphore>,
    limit: Mutex<usize>,
}

impl Connections {
    fn new(limit: usize) -> Self {
        Self {
            slots: Arc::new(tokio::sync::Semaphore::new(limit)),
            limit: Mutex::new(limit),
        }
    }

    /// Grows or shrinks the limit (a reload); permits in use are not taken back, a shrink
    /// takes effect as they are returned.
    pub(super) fn resize(&self, to: usize) {
        let mut limit = self.limit.locked();
        if to > *limit {
            self.slots.add_permits(to - *limit);
        } else if to < *limit {
            let mut owed = *limit - to;
            owed -= self.slots.forget_permits(owed);
            // Permits in use: take them back as they come home.
            if owed > 0 {
                let slots = self.slots.clone();
                tokio::spawn(async move {
                    if let Ok(p) = slots.acquire_many_owned(owed as u32).await {
                        p.forget();
                    }
                });
            }
        }
        *limit = to;
    }

    fn limit(&self) -> usize {
        *self.limit.locked()
    }
}

/// Counters for `/metrics`.
pub struct ModelStats {
    pub starts: AtomicU64,
    pub start_failures: AtomicU64,
    /// Time from the start request to ready, per successful start.
    pub start_time: Histogram,
    /// Times this model was stopped to make room for another.
    pub evictions: AtomicU64,
    /// Time a start waited for room (admission), per start.
    pub queue_wait: Histogram,
    /// Starts that had to wait for other models to stop (swaps).
    pub swaps: AtomicU64,
}

pub(super) struct CellState {
    pub(super) phase: Phase,
    /// Leases of the current run.
    pub(super) leases: usize,
    /// Incremented per start; a lease counts only against the run it was given for.
    pub(super) run: u64,
    pub(super) endpoint: Option<crate::upstream::Endpoint>,
    /// Becomes true when the current run's server is gone; leases watch it.
    pub(super) down: Option<watch::Receiver<bool>>,
    pub(super) pid: Option<u32>,
    pub(super) aliases: Vec<String>,
    pub(super) last_exit: Option<String>,
    pub(super) ready_ms: Option<u64>,
    pub(super) error: Option<String>,
    pub(super) last_used: Instant,
    /// Counted against the limits: from admission until the process has exited.
    pub(super) admitted: bool,
    /// The figure it was admitted on, or last re-counted at after growing.
    pub(super) admitted_bytes: Option<u64>,
    /// Bytes per GPU it was admitted on (`gpu::place`); empty on CPU.
    pub(super) placed: BTreeMap<u32, u64>,
    /// Waiting in the admission queue for room.
    pub(super) queued: bool,
    /// Acquirers waiting for this model's start.
    pub(super) waiting: usize,
    /// Why its start waits for room, while it does (set by admission).
    pub(super) wait_reason: Option<String>,
    pub(super) memory: Memory,
    pub(super) pinned: bool,
    pub(super) source: &'static str,
    pub(super) file: Option<String>,
    /// Ollama's `keep_alive` of the last request that gave one: the idle time before the server
    /// stops, instead of `ttl` (`Some(None)`: never).
    pub(super) keep_alive: Option<Option<std::time::Duration>>,
    /// Set while the current run is another instance's server we attached to.
    pub(super) remote: Option<Arc<RemoteServer>>,
    /// Other instances hold leases on our server (refreshed every second).
    pub(super) remote_held: bool,
}

/// A discovered model's GGUF, for `/api/models`' `file`.
pub(super) fn found_file(cfg: &ModelConfig) -> Option<String> {
    cfg.found.as_ref().map(|f| f.file.display().to_string())
}

pub(crate) enum Command {
    /// `explicit`: an operator's load, which skips a running backoff.
    Acquire {
        explicit: bool,
        reply: oneshot::Sender<Result<Lease, AcquireError>>,
    },
    /// The lease count of run `run` dropped to zero.
    Idle { run: u64 },
    Unload {
        force: bool,
        reply: oneshot::Sender<()>,
    },
    /// New settings; `applied` is answered once the actor has taken them (a restart they need
    /// may still follow).
    Reconfigure {
        cfg: Arc<ModelConfig>,
        applied: oneshot::Sender<()>,
    },
    /// Stop for good (shutdown or the model was removed); the actor exits afterwards.
    /// `keep_kv`: save the server's KV state first (shutdown, not a removed model).
    Retire {
        reply: oneshot::Sender<()>,
        keep_kv: bool,
    },
    /// From admission: stop to make room — now if idle, else once the leases end.
    Evict,
    /// From admission: the start that wanted the room gave up; keep serving if still running.
    CancelEvict,
    /// From admission, for a running model that grew past its figure: stop now if idle; if a
    /// lease came meanwhile, keep serving (a busy model is never stopped for growth).
    EvictIdle,
}

impl ModelCell {
    pub(super) fn new(
        cfg: &ModelConfig,
        log_path: std::path::PathBuf,
        commands: mpsc::UnboundedSender<Command>,
        kv: super::kv::KvCell,
    ) -> Self {
        ModelCell {
            id: cfg.id.as_str().into(),
            logs: Arc::new(LogSink::new(Some(log_path))),
            stats: ModelStats {
                starts: AtomicU64::new(0),
                start_failures: AtomicU64::new(0),
                start_time: Histogram::new(START_BOUNDS),
                evictions: AtomicU64::new(0),
                queue_wait: Histogram::new(START_BOUNDS),
                swaps: AtomicU64::new(0),
            },
            state: Mutex::new(CellState {
                phase: Phase::Stopped,
                leases: 0,
                run: 0,
                endpoint: None,
                down: None,
                pid: None,
                aliases: cfg.aliases.clone(),
                last_exit: None,
                ready_ms: None,
                error: None,
                last_used: Instant::now(),
                admitted: false,
                admitted_bytes: None,
                placed: BTreeMap::new(),
                queued: false,
                waiting: 0,
                wait_reason: None,
                memory: Memory::for_config(cfg),
                pinned: cfg.pinned,
                source: cfg.source(),
                file: found_file(cfg),
                keep_alive: None,
                remote: None,
                remote_held: false,
            }),
            commands,
            changed: watch::channel(0).0,
            connections: Connections::new(cfg.connection_limit()),
            kv,
        }
    }

    /// The cell's state. Never poisoned: no code panics while holding it, and if some did, the
    /// few words it guards are still consistent enough to serve and stop by.
    pub(super) fn lock(&self) -> MutexGuard<'_, CellState> {
        self.state.locked()
    }

    /// Acquires a lease, starting the server if needed.
    pub async fn acquire(self: &Arc<Self>, explicit: bool) -> Result<Lease, AcquireError> {
        if let Some(lease) = self.try_acquire_ready() {
            return Ok(lease);
        }
        let (reply, rx) = oneshot::channel();
        self.send(Command::Acquire { explicit, reply })
            .map_err(|reason| self.unavailable(reason))?;
        rx.await
            .map_err(|_| self.unavailable("llmvisor is shutting down"))?
    }

    /// The fast path: a lease on a ready model, or `None`.
    pub fn try_acquire_ready(self: &Arc<Self>) -> Option<Lease> {
        let mut st = self.lock();
        if st.phase != Phase::Ready || st.remote.as_ref().is_some_and(|r| !r.usable()) {
            return None;
        }
        Some(self.grant(&mut st))
    }

    /// Counts a lease against the current run. Caller holds the lock and has checked `Ready`.
    pub(super) fn grant(self: &Arc<Self>, st: &mut CellState) -> Lease {
        st.leases += 1;
        st.last_used = Instant::now();
        Lease::new(
            self.clone(),
            st.run,
            st.endpoint.clone().expect("a ready model has an endpoint"),
            st.down.clone().expect("a ready model has a run"),
        )
    }

    /// Called by a lease's drop.
    pub(crate) fn release(&self, run: u64) {
        let mut st = self.lock();
        if st.run != run || st.leases == 0 {
            return; // a lease of an earlier run, already written off
        }
        st.leases -= 1;
        st.last_used = Instant::now();
        if st.leases == 0 {
            let _ = self.commands.send(Command::Idle { run });
        }
    }

    pub(crate) fn send(&self, cmd: Command) -> Result<(), &'static str> {
        self.commands
            .send(cmd)
            .map_err(|_| "llmvisor is shutting down")
    }

    pub(super) fn unavailable(&self, reason: &str) -> AcquireError {
        AcquireError::Unavailable {
            model: self.id.to_string(),
            reason: reason.to_owned(),
        }
    }

    pub fn status(&self) -> ModelStatus {
        let st = self.lock();
        ModelStatus {
            id: self.id.to_string(),
            aliases: st.aliases.clone(),
            state: st.phase,
            pid: st.pid,
            port: st.endpoint.as_ref().and_then(|e| e.port()),
            url: st.endpoint.as_ref().map(|e| e.base_url()),
            leases: st.leases,
            // Every start after the first (attaching to another instance's server counts too).
            restarts: self.stats.starts.load(Ordering::Relaxed).saturating_sub(1) as u32,
            last_exit: st.last_exit.clone(),
            ready_ms: st.ready_ms,
            error: st.error.clone(),
            memory: st.memory.bytes,
            memory_source: st.memory.source,
            memory_detail: st.memory.detail(),
            gpus: st.placed.keys().copied().collect(),
            queued: if st.queued { st.waiting } else { 0 },
            wait_reason: if st.queued {
                st.wait_reason.clone()
            } else {
                None
            },
            pinned: st.pinned,
            source: st.source,
            file: st.file.clone(),
            kv_saved: self.kv.saved_bytes(),
        }
    }

    /// Ollama's `keep_alive` for this model from now on: `Some(d)` stops its idle server after
    /// `d` (zero: once idle), `None` never; replaces `ttl` until the next call.
    pub fn set_keep_alive(&self, keep_alive: Option<std::time::Duration>) {
        self.lock().keep_alive = Some(keep_alive);
    }

    /// Waits for one of the server's connection slots (`max_connections`); the permit is held
    /// for the request and returned when dropped.
    pub async fn connection_slot(&self) -> tokio::sync::OwnedSemaphorePermit {
        self.connections
            .slots
            .clone()
            .acquire_owned()
            .await
            .expect("the connection semaphore is never closed")
    }

    /// The model's counters now.
    pub fn counters(&self) -> Counters {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (connections_in_use, max_connections) = self.connections_in_use();
        Counters {
            starts: load(&self.stats.starts),
            start_failures: load(&self.stats.start_failures),
            evictions: load(&self.stats.evictions),
            swaps: load(&self.stats.swaps),
            connections_in_use,
            max_connections,
        }
    }

    /// (in use, limit) of the server's connection slots.
    pub fn connections_in_use(&self) -> (usize, usize) {
        let limit = self.connections.limit();
        let free = self.connections.slots.available_permits();
        (limit.saturating_sub(free), limit)
    }

    pub fn memory(&self) -> Memory {
        self.lock().memory.clone()
    }

    pub fn pinned(&self) -> bool {
        self.lock().pinned
    }

    /// Other instances use our server of this model.
    pub(crate) fn remote_held(&self) -> bool {
        self.lock().remote_held
    }

    pub(crate) fn admitted(&self) -> bool {
        self.lock().admitted
    }

    pub(crate) fn set_admitted(&self, admitted: bool) {
        let mut st = self.lock();
        st.admitted = admitted;
        st.admitted_bytes = st.memory.bytes;
        if !admitted {
            st.placed.clear();
        }
    }

    /// Admitted with these bytes per GPU.
    pub(crate) fn set_placed(&self, placed: BTreeMap<u32, u64>) {
        self.lock().placed = placed;
    }

    /// Bytes per GPU it was admitted on.
    pub(crate) fn placed(&self) -> BTreeMap<u32, u64> {
        self.lock().placed.clone()
    }

    pub(crate) fn set_wait_reason(&self, reason: Option<String>) {
        self.lock().wait_reason = reason;
    }

    pub(crate) fn set_queued(&self, queued: bool) {
        self.lock().queued = queued;
    }

    pub fn phase(&self) -> Phase {
        self.lock().phase
    }

    pub fn last_used(&self) -> Instant {
        self.lock().last_used
    }

    /// A receiver that changes whenever the phase does.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Waits until `pred(phase)` holds.
    pub async fn wait_for_phase(&self, pred: impl Fn(Phase) -> bool) {
        let mut rx = self.subscribe();
        loop {
            if pred(self.phase()) {
                return;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }
}
