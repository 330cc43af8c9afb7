//! The actor of one model: the only place its lifecycle is decided (start, join a start, stop,
//! TTL, eviction, crashes, health). Slow work (admission, spawning, readiness, stopping) runs in
//! tasks that report back as events, so the actor keeps answering messages meanwhile.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::admission::{AdmitError, Msg as AdmissionMsg};
use super::cell::{Command, ModelCell};
use super::error::AcquireError;
use super::lease::Lease;
use super::memory::measure_group;
use super::start::{start_server, Running, StartFailure};
use super::status::Phase;
use super::Context;
use crate::config::{ModelConfig, OnUnhealthy};
use crate::readiness::probe;
use crate::spawn::describe_exit;

/// How often the owner of a server looks for other instances' leases on it.
const REMOTE_LEASE_CHECK: Duration = Duration::from_secs(1);
/// How often an idle server's memory is measured again.
const MEASURE_INTERVAL: Duration = Duration::from_secs(10);
/// A run that stayed up this long ends a crash streak.
const STABLE_RUN: Duration = Duration::from_secs(30);
/// Crashes or health failures in a row that make a crash loop.
const CRASH_LOOP_LIMIT: u32 = 3;
/// How long a crash-looping model stays `failed` before requests may start it again.
const CRASH_LOOP_COOLDOWN: Duration = Duration::from_secs(60);
/// Requests that may wait for one model's start while it waits for room.
const MAX_WAITERS: usize = 4096;
/// Lines of server output attached to a start failure.
pub const ERROR_TAIL_LINES: usize = 20;
/// Backoff after the first failed start; doubles per consecutive failure up to the cap.
const BACKOFF_BASE: Duration = Duration::from_secs(1);
const BACKOFF_CAP: Duration = Duration::from_secs(60);

/// Creates a model's cell and its actor task.
pub(crate) fn spawn_model(
    cfg: Arc<ModelConfig>,
    ctx: Arc<Context>,
) -> (Arc<ModelCell>, tokio::task::JoinHandle<()>) {
    let (commands, rx) = mpsc::unbounded_channel();
    let log_path = ctx.state_dir.join("logs").join(format!("{}.log", cfg.id));
    let cell = Arc::new(ModelCell::new(&cfg, log_path, commands));
    let (events_tx, events) = mpsc::unbounded_channel();
    let actor = Actor {
        cell: cell.clone(),
        cfg,
        ctx,
        commands: rx,
        events,
        events_tx,
        waiters: Vec::new(),
        unload_waiters: Vec::new(),
        running: None,
        cancel_start: None,
        draining: false,
        restart_after_stop: false,
        retiring: None,
        ttl_deadline: None,
        failures: 0,
        backoff_until: None,
        last_failure: None,
        exit: false,
        awaiting_admission: None,
        withdrawn_by_unload: false,
        evicting: false,
        crash_streak: 0,
        restart_at: None,
        unhealthy: None,
        measured_at: None,
    };
    let task = tokio::spawn(actor.run());
    (cell, task)
}

enum Next {
    Command(Command),
    Event(Event),
    /// The server ended by itself: our child's status, or `None` for an attached one.
    Crashed(Option<std::process::ExitStatus>),
    Ttl,
    /// The backoff before an automatic restart has passed.
    Restart,
    /// The cool-down of a failed model has passed.
    CooledDown,
}

/// Results of the slow work the actor hands to tasks.
enum Event {
    Admitted(Result<(), AdmitError>),
    /// The store said whether other instances hold leases on our idle server.
    TtlChecked {
        held: bool,
    },
    /// The health monitor of run `run` gave up on the server.
    Unhealthy {
        run: u64,
        reason: String,
    },
    Started(Result<Running, StartFailure>),
    /// A stop finished: our child's status, or `None` after detaching from another's server.
    Stopped(Option<std::process::ExitStatus>),
}

struct Actor {
    cell: Arc<ModelCell>,
    cfg: Arc<ModelConfig>,
    ctx: Arc<Context>,
    commands: mpsc::UnboundedReceiver<Command>,
    events: mpsc::UnboundedReceiver<Event>,
    events_tx: mpsc::UnboundedSender<Event>,
    /// Acquirers waiting for the start in progress (or the next one).
    waiters: Vec<oneshot::Sender<Result<Lease, AcquireError>>>,
    unload_waiters: Vec<oneshot::Sender<()>>,
    /// The server of the current run, while it runs.
    running: Option<Running>,
    /// Present while a start is in progress; sending (or dropping) cancels it.
    cancel_start: Option<oneshot::Sender<()>>,
    /// A stop is wanted once the leases end (unload, reconfigure, retire).
    draining: bool,
    /// After the stop, start again (reconfigured while running).
    restart_after_stop: bool,
    retiring: Option<oneshot::Sender<()>>,
    ttl_deadline: Option<Instant>,
    failures: u32,
    backoff_until: Option<Instant>,
    last_failure: Option<AcquireError>,
    /// Set once retired: the actor loop ends.
    exit: bool,
    /// Waiting for admission (room under the limits) before the real start.
    awaiting_admission: Option<Instant>,
    /// Withdrawn from admission by an unload: its waiters are answered, not restarted for.
    withdrawn_by_unload: bool,
    /// Draining because admission chose this model to make room.
    evicting: bool,
    /// Crashes and health failures in a row (reset by a run that stayed up for a while).
    crash_streak: u32,
    /// When to start again after a crash or an unhealthy server (restart policy).
    restart_at: Option<Instant>,
    /// Set while stopping a server the health monitor gave up on.
    unhealthy: Option<String>,
    /// When the server's memory was last measured.
    measured_at: Option<Instant>,
}

impl Actor {
    async fn run(mut self) {
        while !self.exit {
            let ttl = self.ttl_deadline;
            let restart_at = self.restart_at;
            let cooldown = self
                .backoff_until
                .filter(|_| self.cell.phase() == Phase::Failed);
            let watch_crash = self.stopping_task_absent();
            let server = self.running.as_ref().map(|r| r.server.clone());
            let crashed = async move {
                match server {
                    Some(s) => s.ended().await,
                    None => std::future::pending().await,
                }
            };
            let next = tokio::select! {
                cmd = self.commands.recv() => match cmd {
                    Some(cmd) => Next::Command(cmd),
                    None => break,
                },
                Some(event) = self.events.recv() => Next::Event(event),
                status = crashed, if watch_crash => Next::Crashed(status),
                _ = sleep_until_opt(ttl), if ttl.is_some() => Next::Ttl,
                _ = sleep_until_opt(restart_at), if restart_at.is_some() => Next::Restart,
                _ = sleep_until_opt(cooldown), if cooldown.is_some() => Next::CooledDown,
            };
            match next {
                Next::Command(cmd) => self.on_command(cmd),
                Next::Event(Event::Admitted(result)) => self.on_admitted(result),
                Next::Event(Event::Started(result)) => self.on_started(result),
                Next::Event(Event::Stopped(status)) => self.on_stopped(status),
                Next::Event(Event::Unhealthy { run, reason }) => self.on_unhealthy(run, reason),
                Next::Event(Event::TtlChecked { held }) => self.on_ttl_checked(held),
                Next::Crashed(status) => self.on_crash(status),
                Next::Ttl => self.on_ttl(),
                Next::Restart => {
                    self.restart_at = None;
                    if matches!(self.cell.phase(), Phase::Stopped) && self.retiring.is_none() {
                        tracing::info!(model = %self.cfg.id, "restarting");
                        self.begin_start();
                    }
                }
                Next::CooledDown => {
                    self.backoff_until = None;
                    if self.cell.phase() == Phase::Failed {
                        tracing::info!(model = %self.cfg.id, "cool-down over; the next request starts it again");
                        self.set_phase(Phase::Stopped);
                    }
                }
            }
        }
    }

    /// While a stop task runs it owns the exit; the actor must not treat it as a crash.
    fn stopping_task_absent(&self) -> bool {
        self.cell.phase() != Phase::Stopping || self.draining
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Acquire { explicit, reply } => self.on_acquire(explicit, reply),
            Command::Idle { run } => self.on_idle(run),
            Command::Unload { force, reply } => {
                self.unload_waiters.push(reply);
                self.request_stop(force);
            }
            Command::Reconfigure(cfg) => {
                if *cfg == *self.cfg {
                    return;
                }
                self.cell.state.lock().unwrap().aliases = cfg.aliases.clone();
                self.cfg = cfg;
                match self.cell.phase() {
                    Phase::Ready | Phase::Starting => {
                        self.restart_after_stop = true;
                        self.request_stop(false);
                    }
                    _ => {}
                }
            }
            Command::Evict => self.on_evict(),
            Command::CancelEvict => {
                if self.evicting
                    && self.draining
                    && self.running.is_some()
                    && self.unload_waiters.is_empty()
                    && !self.restart_after_stop
                {
                    self.evicting = false;
                    self.draining = false;
                    self.set_phase(Phase::Ready);
                    if self.cell.status().leases == 0 {
                        self.arm_ttl();
                    }
                }
            }
            Command::Retire { reply } => {
                self.retiring = Some(reply);
                self.fail_waiters("the model was removed or llmvisor is shutting down");
                self.request_stop(true);
            }
        }
    }

    fn on_acquire(&mut self, explicit: bool, reply: oneshot::Sender<Result<Lease, AcquireError>>) {
        if self.retiring.is_some() {
            let _ = reply.send(Err(self.cell.unavailable("llmvisor is shutting down")));
            return;
        }
        let remote_gone = {
            let st = self.cell.state.lock().unwrap();
            st.phase == Phase::Ready && st.remote.as_ref().is_some_and(|r| !r.usable())
        };
        if remote_gone {
            // The instance whose server we used died a moment ago: start over (claim it).
            self.on_crash(None);
        }
        let phase = {
            let mut st = self.cell.state.lock().unwrap();
            if st.phase == Phase::Ready {
                let lease = self.cell.grant(&mut st);
                drop(st);
                let _ = reply.send(Ok(lease));
                return;
            }
            st.phase
        };
        if self.awaiting_admission.is_some() && self.waiters.len() >= MAX_WAITERS {
            let _ = reply.send(Err(AcquireError::NoRoom {
                model: self.cfg.id.clone(),
                reason: format!("{MAX_WAITERS} requests already wait for this model to get room"),
                retry_after: Some(Duration::from_secs(1)),
            }));
            return;
        }
        match phase {
            Phase::Starting | Phase::Stopping => {
                self.waiters.push(reply);
                self.sync_waiting();
            }
            Phase::Stopped | Phase::Failed => {
                if let (Some(until), false) = (self.backoff_until, explicit) {
                    let now = Instant::now();
                    if now < until {
                        let _ = reply.send(Err(self.backoff_error(until - now)));
                        return;
                    }
                }
                self.waiters.push(reply);
                self.sync_waiting();
                self.begin_start();
            }
            Phase::Ready => unreachable!("handled above"),
        }
    }

    fn backoff_error(&self, retry_after: Duration) -> AcquireError {
        match self.last_failure.clone() {
            Some(AcquireError::StartFailed {
                model,
                reason,
                log_tail,
                ..
            }) => AcquireError::StartFailed {
                model,
                reason: format!(
                    "{reason} (failed {} times in a row; next try in {}s)",
                    self.failures,
                    retry_after.as_secs_f64().ceil()
                ),
                log_tail,
                retry_after: Some(retry_after),
            },
            Some(AcquireError::StartTimeout {
                model,
                after,
                log_tail,
            }) => AcquireError::StartFailed {
                model,
                reason: format!("it did not become ready within {after:?} last time"),
                log_tail,
                retry_after: Some(retry_after),
            },
            _ => AcquireError::StartFailed {
                model: self.cfg.id.clone(),
                reason: "backing off after failed starts".into(),
                log_tail: Vec::new(),
                retry_after: Some(retry_after),
            },
        }
    }

    /// Stopped/Failed → Starting: first admission (is there room under `max_loaded`,
    /// `memory_budget` and exclusive groups? if not, who must be evicted or waited for), then
    /// the real start in [`Self::launch`].
    fn begin_start(&mut self) {
        self.ttl_deadline = None;
        self.restart_at = None;
        self.cell.state.lock().unwrap().error = None;
        self.cell.stats.starts.fetch_add(1, Ordering::Relaxed);
        self.set_phase(Phase::Starting);
        self.awaiting_admission = Some(Instant::now());
        self.withdrawn_by_unload = false;
        let admission = self.ctx.admission.clone();
        let cell = self.cell.clone();
        let events = self.events_tx.clone();
        tokio::spawn(async move {
            let result = admission.admit(cell).await;
            let _ = events.send(Event::Admitted(result));
        });
    }

    fn on_admitted(&mut self, result: Result<(), AdmitError>) {
        let asked = self.awaiting_admission.take();
        if let Some(t) = asked {
            self.cell.stats.queue_wait.observe(t.elapsed());
        }
        match result {
            Ok(()) if self.retiring.is_none() => self.launch(),
            Ok(()) => self.after_stop(Phase::Stopped),
            Err(AdmitError::Closed) => {
                // Withdrawn: by an unload (answer the waiters), or to restart with new settings.
                if self.withdrawn_by_unload || self.retiring.is_some() {
                    self.fail_waiters("it was unloaded while waiting for room");
                }
                self.after_stop(Phase::Stopped);
            }
            Err(e) => {
                let retry_after = match &e {
                    AdmitError::Never(_) => None,
                    _ => Some(Duration::from_secs(1)),
                };
                let error = AcquireError::NoRoom {
                    model: self.cfg.id.clone(),
                    reason: e.to_string(),
                    retry_after,
                };
                tracing::warn!(model = %self.cfg.id, "not started: {error}");
                for w in std::mem::take(&mut self.waiters) {
                    let _ = w.send(Err(error.clone()));
                }
                self.sync_waiting();
                self.after_stop(Phase::Stopped);
            }
        }
    }

    /// Admitted: spawn the server (ports, spawn, readiness) in a task.
    fn launch(&mut self) {
        let (cancel_tx, cancel_rx) = oneshot::channel();
        self.cancel_start = Some(cancel_tx);
        let cfg = self.cfg.clone();
        let ctx = self.ctx.clone();
        let logs = self.cell.logs.clone();
        let events = self.events_tx.clone();
        tokio::spawn(async move {
            let result = start_server(&cfg, &ctx, logs, cancel_rx).await;
            let _ = events.send(Event::Started(result));
        });
    }

    /// Probes the ready server's health path every `health_interval`; after `health_failures`
    /// failures in a row (error, non-2xx, or no answer within the interval) it reports the
    /// server unhealthy. Ends when the server goes down.
    fn spawn_health_monitor(&self) {
        let (Some(interval), Some(running)) = (self.cfg.health.interval, &self.running) else {
            return;
        };
        let run = self.cell.state.lock().unwrap().run;
        let client = self.ctx.client.clone();
        let endpoint = running.endpoint.clone();
        let path = self.cfg.health_path.clone();
        let threshold = self.cfg.health.failures;
        let down = running.down_rx.clone();
        let events = self.events_tx.clone();
        let within = interval.clamp(Duration::from_millis(100), Duration::from_secs(10));
        tokio::spawn(async move {
            let mut failed = 0;
            loop {
                let mut gone = down.clone();
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    _ = gone.wait_for(|d| *d) => return,
                }
                if probe(&client, &endpoint, &path, within).await {
                    failed = 0;
                    continue;
                }
                failed += 1;
                if failed >= threshold {
                    let reason = format!("{failed} health checks of {path} failed in a row");
                    let _ = events.send(Event::Unhealthy { run, reason });
                    return;
                }
            }
        });
    }

    /// While our server runs: notes whether other instances hold remote leases on it, so it is
    /// neither idled out nor evicted while used elsewhere.
    fn spawn_remote_lease_watch(&self) {
        let Some(running) = &self.running else {
            return;
        };
        let (cell, store) = (self.cell.clone(), self.ctx.store.clone());
        let down = running.down_rx.clone();
        tokio::spawn(async move {
            loop {
                let held = store
                    .live_remote_leases(&cell.id)
                    .await
                    .map(|l| !l.is_empty())
                    .unwrap_or(false);
                cell.state.lock().unwrap().remote_held = held;
                let mut gone = down.clone();
                tokio::select! {
                    _ = tokio::time::sleep(REMOTE_LEASE_CHECK) => {}
                    _ = gone.wait_for(|d| *d) => break,
                }
            }
            cell.state.lock().unwrap().remote_held = false;
        });
    }

    fn sync_waiting(&self) {
        self.cell.state.lock().unwrap().waiting = self.waiters.len();
    }

    fn on_started(&mut self, result: Result<Running, StartFailure>) {
        self.cancel_start = None;
        match result {
            Ok(running) => {
                self.cell.stats.start_time.observe(running.ready_after);
                self.failures = 0;
                self.backoff_until = None;
                self.last_failure = None;
                let waiters = std::mem::take(&mut self.waiters);
                let measured = running.server.local().and_then(|p| measure_group(p.pid()));
                self.measured_at = Some(Instant::now());
                {
                    let mut st = self.cell.state.lock().unwrap();
                    st.waiting = 0;
                    st.memory = st.memory.with_measured(measured);
                    st.run += 1;
                    st.phase = Phase::Ready;
                    st.endpoint = Some(running.endpoint.clone());
                    st.down = Some(running.down_rx.clone());
                    st.pid = Some(running.server.pid());
                    st.remote = running.server.remote().cloned();
                    st.ready_ms = Some(running.ready_after.as_millis() as u64);
                    st.leases = 0;
                }
                tracing::info!(model = %self.cfg.id, pid = running.server.pid(), url = %running.endpoint.base_url(), ready_ms = running.ready_after.as_millis() as u64, "ready");
                let attached = running.server.remote().is_some();
                self.running = Some(running);
                if attached {
                    // Another instance runs it and counts it against its limits, not us.
                    self.cell.set_admitted(false);
                } else {
                    self.spawn_health_monitor();
                    self.spawn_remote_lease_watch();
                }
                self.notify();
                let mut granted = 0;
                for w in waiters {
                    let lease = {
                        let mut st = self.cell.state.lock().unwrap();
                        self.cell.grant(&mut st)
                    };
                    // A waiter that gave up drops its lease right here, which is fine.
                    if w.send(Ok(lease)).is_ok() {
                        granted += 1;
                    }
                }
                if self.draining || self.retiring.is_some() {
                    self.request_stop(self.retiring.is_some());
                } else if granted == 0 {
                    // Nobody holds it: the idle clock starts now.
                    self.arm_ttl();
                }
                // Its measured size may differ from the estimate; a queued start may now evict it.
                self.ctx.admission.send(AdmissionMsg::Changed);
            }
            Err(failure) => {
                let error = failure.into_error(&self.cfg.id);
                let cancelled = matches!(error, AcquireError::Unavailable { .. });
                {
                    let mut st = self.cell.state.lock().unwrap();
                    st.pid = None;
                    st.endpoint = None;
                    st.last_exit = failure_exit(&error).or(st.last_exit.take());
                    st.error = (!cancelled).then(|| error.to_string());
                }
                if !cancelled {
                    self.cell
                        .stats
                        .start_failures
                        .fetch_add(1, Ordering::Relaxed);
                    self.failures += 1;
                    let backoff = BACKOFF_BASE
                        .saturating_mul(1 << (self.failures - 1).min(16))
                        .min(BACKOFF_CAP);
                    self.backoff_until = Some(Instant::now() + backoff);
                    self.last_failure = Some(error.clone());
                    tracing::warn!(model = %self.cfg.id, "start failed: {error}; backing off {backoff:?}");
                }
                for w in std::mem::take(&mut self.waiters) {
                    let _ = w.send(Err(error.clone()));
                }
                self.after_stop(if cancelled {
                    Phase::Stopped
                } else {
                    Phase::Failed
                });
            }
        }
    }

    fn on_idle(&mut self, run: u64) {
        let (current, leases, phase) = {
            let st = self.cell.state.lock().unwrap();
            (st.run, st.leases, st.phase)
        };
        if current != run || leases != 0 {
            return; // stale, or someone took a lease since
        }
        if let Some(running) = &self.running {
            // The server's size after serving is a better figure than the one at ready; measuring
            // scans /proc, so at most once per interval, not on every idle moment.
            if self
                .measured_at
                .is_none_or(|t| t.elapsed() >= MEASURE_INTERVAL)
            {
                self.measured_at = Some(Instant::now());
                let measured = running.server.local().and_then(|p| measure_group(p.pid()));
                let mut st = self.cell.state.lock().unwrap();
                st.memory = st.memory.with_measured(measured);
            }
        }
        if self.draining && self.running.is_some() {
            self.begin_stop();
        } else if phase == Phase::Ready {
            self.arm_ttl();
            // Idle now: a start waiting for room may evict it.
            self.ctx.admission.send(AdmissionMsg::Changed);
        }
    }

    fn arm_ttl(&mut self) {
        // Pinned models stay loaded: neither evicted nor idled out.
        self.ttl_deadline = match self.cfg.pinned {
            true => None,
            false => self.cfg.ttl.map(|ttl| Instant::now() + ttl),
        };
    }

    fn on_ttl(&mut self) {
        self.ttl_deadline = None;
        let local = self
            .running
            .as_ref()
            .is_some_and(|r| r.server.local().is_some());
        if !local {
            self.stop_if_idle();
            return;
        }
        // Before stopping our server, ask the store whether another instance uses it now (the
        // cached flag can be a second old).
        let (cell, store, events) = (
            self.cell.clone(),
            self.ctx.store.clone(),
            self.events_tx.clone(),
        );
        tokio::spawn(async move {
            let held = store
                .live_remote_leases(&cell.id)
                .await
                .map(|l| !l.is_empty())
                .unwrap_or(false);
            let _ = events.send(Event::TtlChecked { held });
        });
    }

    fn on_ttl_checked(&mut self, held: bool) {
        self.cell.state.lock().unwrap().remote_held = held;
        if held {
            self.arm_ttl(); // used by another instance: not idle
        } else {
            self.stop_if_idle();
        }
    }

    fn stop_if_idle(&mut self) {
        let mut st = self.cell.state.lock().unwrap();
        if st.phase == Phase::Ready && st.leases == 0 {
            // Under the lock: no acquire can slip in between the check and the phase change.
            st.phase = Phase::Stopping;
            drop(st);
            tracing::info!(model = %self.cfg.id, "idle for {:?}; stopping", self.cfg.ttl.unwrap_or_default());
            self.notify();
            self.spawn_stop();
        }
    }

    /// Admission wants the room: stop now if idle, else drain (no new leases) and stop when the
    /// last lease ends — an answer in progress is never cut off.
    fn on_evict(&mut self) {
        if self.cell.phase() != Phase::Ready || self.cfg.pinned || self.cell.remote_held() {
            return;
        }
        tracing::info!(model = %self.cfg.id, "evicting to make room for another model");
        self.cell.stats.evictions.fetch_add(1, Ordering::Relaxed);
        self.evicting = true;
        self.request_stop(false);
    }

    /// Wants the server stopped: now if `force` or idle, else once its leases end.
    fn request_stop(&mut self, force: bool) {
        match self.cell.phase() {
            Phase::Stopped | Phase::Failed => {
                if self.retiring.is_some() {
                    self.after_stop(self.cell.phase());
                } else {
                    self.finish_unloads();
                }
            }
            Phase::Starting if self.awaiting_admission.is_some() => {
                // Not started yet: leave the admission queue (answered with `Closed`).
                self.withdrawn_by_unload = !self.unload_waiters.is_empty();
                self.ctx.admission.send(AdmissionMsg::Withdraw {
                    model: self.cell.id.clone(),
                });
            }
            Phase::Starting => {
                if force {
                    // Cancel the start; its task stops the child and reports back.
                    self.cancel_start = None;
                } else {
                    self.draining = true;
                }
            }
            Phase::Ready => {
                self.draining = true;
                let mut st = self.cell.state.lock().unwrap();
                let idle = st.leases == 0;
                if force || idle {
                    drop(st);
                    self.begin_stop();
                } else {
                    // Visible as "stopping" at once, so no new request takes a lease.
                    st.phase = Phase::Stopping;
                    drop(st);
                    self.notify();
                }
            }
            Phase::Stopping => {
                if force && self.running.is_some() && self.draining {
                    self.begin_stop();
                }
            }
        }
    }

    /// Ready/draining → the stop task. Existing leases learn their server is going.
    fn begin_stop(&mut self) {
        self.draining = false;
        self.ttl_deadline = None;
        self.set_phase(Phase::Stopping);
        self.spawn_stop();
    }

    fn spawn_stop(&mut self) {
        let Some(running) = self.running.as_ref() else {
            return;
        };
        self.cell.state.lock().unwrap().leases = 0;
        let events = self.events_tx.clone();
        match running.server.local() {
            Some(process) => {
                let process = process.clone();
                let grace = self.cfg.stop_timeout;
                tokio::spawn(async move {
                    let status = process.stop(grace).await;
                    let _ = events.send(Event::Stopped(Some(status)));
                });
            }
            // Another instance's server: we only let go of it (dropping it ends our lease).
            None => {
                let _ = events.send(Event::Stopped(None));
            }
        }
    }

    fn on_stopped(&mut self, status: Option<std::process::ExitStatus>) {
        let running = self.running.take();
        if let Some(r) = &running {
            let _ = r.down_tx.send(true);
            if let Some(p) = r.server.local() {
                self.ctx.forget_child(p.pid(), r.endpoint.port());
                self.ctx.release_claim(&self.cfg.id);
            }
        }
        match status {
            Some(status) => {
                self.cell.state.lock().unwrap().last_exit = Some(describe_exit(status));
                tracing::info!(model = %self.cfg.id, "stopped ({})", describe_exit(status));
            }
            None => {
                tracing::info!(model = %self.cfg.id, "no longer using another instance's server")
            }
        }
        match (self.unhealthy.take(), running) {
            (Some(reason), Some(r)) => self.after_failure(&r, format!("unhealthy: {reason}")),
            _ => self.after_stop(Phase::Stopped),
        }
    }

    fn on_crash(&mut self, status: Option<std::process::ExitStatus>) {
        let Some(running) = self.running.take() else {
            return;
        };
        let _ = running.down_tx.send(true);
        let (Some(status), Some(process)) = (status, running.server.local().cloned()) else {
            // An attached server went away with its owner (or its owner stopped it): not a
            // crash of ours. The next acquire claims the model and starts it here if need be.
            self.draining = false;
            self.after_stop(Phase::Stopped);
            return;
        };
        let how = describe_exit(status);
        tracing::warn!(model = %self.cfg.id, pid = process.pid(), "server exited unexpectedly ({how})");
        self.cell.state.lock().unwrap().last_exit = Some(how.clone());
        // Whatever it left in its group goes too; then its record and claims.
        let ctx = self.ctx.clone();
        let port = running.endpoint.port();
        tokio::spawn(async move {
            process.kill_group_and_wait().await;
            ctx.forget_child(process.pid(), port);
        });
        self.ctx.release_claim(&self.cfg.id);
        self.draining = false;
        self.after_failure(&running, format!("server exited unexpectedly ({how})"));
    }

    /// The health monitor gave up on the current server: stop it (its leases see it go), then
    /// the policy decides whether it comes back.
    fn on_unhealthy(&mut self, run: u64, reason: String) {
        let current = self.cell.state.lock().unwrap().run;
        if run != current || self.cell.phase() != Phase::Ready || self.running.is_none() {
            return;
        }
        tracing::warn!(model = %self.cfg.id, "server is unhealthy: {reason}; stopping it");
        self.cell.state.lock().unwrap().error = Some(format!("unhealthy: {reason}"));
        self.unhealthy = Some(reason);
        self.begin_stop();
    }

    /// After a crash or an unhealthy stop: count the streak, then restart after a backoff (policy
    /// `restart`), or mark the model failed for a cool-down when it keeps failing.
    fn after_failure(&mut self, running: &Running, reason: String) {
        if running.ready_at.elapsed() >= STABLE_RUN {
            self.crash_streak = 0;
        }
        self.crash_streak += 1;
        let tail = self.cell.logs.tail(ERROR_TAIL_LINES);
        if self.crash_streak >= CRASH_LOOP_LIMIT {
            let error = AcquireError::StartFailed {
                model: self.cfg.id.clone(),
                reason: format!(
                    "crash loop: {} failures in a row, the last: {reason}; cooling down for {}s",
                    self.crash_streak,
                    CRASH_LOOP_COOLDOWN.as_secs()
                ),
                log_tail: tail,
                retry_after: None,
            };
            tracing::error!(model = %self.cfg.id, "{error}");
            self.cell.state.lock().unwrap().error = Some(error.to_string());
            self.failures = self.crash_streak;
            self.backoff_until = Some(Instant::now() + CRASH_LOOP_COOLDOWN);
            self.last_failure = Some(error);
            self.crash_streak = 0;
            self.after_stop(Phase::Failed);
            return;
        }
        self.cell.state.lock().unwrap().error = Some(reason);
        self.after_stop(Phase::Stopped);
        if self.cfg.health.on_unhealthy == OnUnhealthy::Restart
            && self.retiring.is_none()
            && self.cell.phase() == Phase::Stopped
        {
            // The first failure restarts at once; repeated ones back off.
            let backoff = match self.crash_streak {
                1 => Duration::ZERO,
                n => BACKOFF_BASE
                    .saturating_mul(1 << (n - 2).min(16))
                    .min(BACKOFF_CAP),
            };
            tracing::info!(model = %self.cfg.id, "restarting in {backoff:?}");
            self.restart_at = Some(Instant::now() + backoff);
        }
    }

    /// The server is gone: settle the phase, answer unloads, and start again if anyone waits.
    fn after_stop(&mut self, phase: Phase) {
        let was_admitted = {
            let mut st = self.cell.state.lock().unwrap();
            st.phase = phase;
            st.pid = None;
            st.endpoint = None;
            st.down = None;
            st.remote = None;
            st.leases = 0;
            st.run += 1;
            std::mem::replace(&mut st.admitted, false)
        };
        if was_admitted {
            // Its process has exited: the room it held is free.
            self.ctx.admission.send(AdmissionMsg::Changed);
        }
        self.ttl_deadline = None;
        self.draining = false;
        self.evicting = false;
        self.notify();
        self.finish_unloads();
        if let Some(reply) = self.retiring.take() {
            self.fail_waiters("the model was removed or llmvisor is shutting down");
            let _ = reply.send(());
            self.exit = true;
            return;
        }
        if self.restart_after_stop || !self.waiters.is_empty() {
            self.restart_after_stop = false;
            self.begin_start();
        }
    }

    fn finish_unloads(&mut self) {
        for w in self.unload_waiters.drain(..) {
            let _ = w.send(());
        }
    }

    fn fail_waiters(&mut self, reason: &str) {
        for w in std::mem::take(&mut self.waiters) {
            let _ = w.send(Err(self.cell.unavailable(reason)));
        }
    }

    fn set_phase(&self, phase: Phase) {
        self.cell.state.lock().unwrap().phase = phase;
        self.notify();
    }

    fn notify(&self) {
        self.cell.changed.send_modify(|n| *n += 1);
    }
}

fn failure_exit(error: &AcquireError) -> Option<String> {
    match error {
        AcquireError::StartFailed { reason, .. } => reason
            .strip_prefix("the server exited during startup (")
            .and_then(|r| r.strip_suffix(')'))
            .map(str::to_owned),
        _ => None,
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
