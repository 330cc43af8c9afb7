//! The actor of one model: the only place its lifecycle is decided (start, join a start, stop,
//! TTL, eviction, crashes, health, reconfiguration). Its state is one [`State`]; every message,
//! event and timer is one `match` on it. Slow work (admission, spawning, readiness, stopping)
//! runs in tasks that report back as [`Event`]s, so the actor keeps answering meanwhile.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::admission::{AdmitError, Msg as AdmissionMsg};
use super::cell::{Command, ModelCell};
use super::error::AcquireError;
use super::gpu_env::{gpu_env, CUDA_VISIBLE_DEVICES};
use super::lease::Lease;
use super::lifecycle::{State, Why};
use super::memory::{self, measure_group, Memory};
use super::oom;
use super::policy::{AfterCrash, RestartPolicy, CRASH_LOOP_COOLDOWN};
use super::start::{self, Running, StartFailure};
use super::Context;
use crate::config::{ModelConfig, OnUnhealthy};
use crate::readiness::probe;
use crate::spawn::describe_exit;
use crate::units;

/// How often the owner of a server looks for other instances' leases on it.
const REMOTE_LEASE_CHECK: Duration = Duration::from_secs(1);
/// How often an idle server's memory is measured again.
const MEASURE_INTERVAL: Duration = Duration::from_secs(10);
/// Requests that may wait for one model's start while it waits for room.
const MAX_WAITERS: usize = 4096;
/// Lines of server output attached to a start failure.
pub const ERROR_TAIL_LINES: usize = 20;

/// Creates a model's cell and its actor task.
pub(crate) fn spawn_model(
    cfg: Arc<ModelConfig>,
    ctx: Arc<Context>,
) -> (Arc<ModelCell>, tokio::task::JoinHandle<()>) {
    let (commands, rx) = mpsc::unbounded_channel();
    let log_path = ctx
        .state_dir
        .join("logs")
        .join(format!("{}.log", crate::ids::encode_segment(&cfg.id)));
    let kv = super::kv::KvCell::new(&cfg, ctx.kv_events.clone(), &ctx.state_dir);
    let cell = Arc::new(ModelCell::new(&cfg, log_path, commands, kv));
    let gpus = ctx.machine.gpu_indices();
    if !gpus.is_empty() {
        let placed = ctx.gpus_placed.load(Ordering::Relaxed);
        cell.lock().memory = Memory::for_machine(&cfg, &gpus, placed);
    }
    let (events_tx, events) = mpsc::unbounded_channel();
    let actor = Actor {
        cell: cell.clone(),
        cfg,
        ctx,
        commands: rx,
        events,
        events_tx,
        state: State::Stopped { restart_at: None },
        waiters: Vec::new(),
        stop_waiters: Vec::new(),
        policy: RestartPolicy::default(),
        measured_at: None,
        oom_kills_at_launch: None,
        save_kv: true,
    };
    actor.look_up_learned_memory();
    let task = tokio::spawn(actor.run());
    (cell, task)
}

/// Results of the slow work the actor hands to tasks.
enum Event {
    Admitted(Result<(), AdmitError>),
    Started(Result<Running, StartFailure>),
    /// A stop finished: our child's status, or `None` after letting go of another's server.
    Stopped(Option<std::process::ExitStatus>),
    /// The store said whether other instances hold leases on our idle server.
    TtlChecked {
        held: bool,
    },
    /// The state store's remembered figure for the model's file and flags (`learn_key`).
    Learned {
        key: (String, String),
        bytes: Option<u64>,
    },
    /// The health monitor of run `run` gave up on the server.
    Unhealthy {
        run: u64,
        reason: String,
    },
}

/// What woke the actor.
enum Next {
    Command(Command),
    Event(Event),
    /// The server ended by itself: our child's status, or `None` for an attached one.
    Ended(Option<std::process::ExitStatus>),
    /// The state's timer: TTL (ready), restart (stopped) or cool-down (failed).
    Timer,
}

struct Actor {
    cell: Arc<ModelCell>,
    cfg: Arc<ModelConfig>,
    ctx: Arc<Context>,
    commands: mpsc::UnboundedReceiver<Command>,
    events: mpsc::UnboundedReceiver<Event>,
    events_tx: mpsc::UnboundedSender<Event>,
    state: State,
    /// Acquirers waiting for the start in progress (or the one after the stop in progress).
    waiters: Vec<oneshot::Sender<Result<Lease, AcquireError>>>,
    /// Unloads and the retire, answered once the server is gone.
    stop_waiters: Vec<oneshot::Sender<()>>,
    policy: RestartPolicy,
    /// When the server's memory was last measured.
    measured_at: Option<Instant>,
    /// The OOM-kill count of llmvisor's cgroup when the current server was launched.
    oom_kills_at_launch: Option<u64>,
    /// Whether the stop under way saves the server's KV state (`kv_persist`): not for a forced
    /// unload, an unhealthy server, or a model removed from the config.
    save_kv: bool,
}

impl Actor {
    async fn run(mut self) {
        while !matches!(self.state, State::Retired) {
            let timer = self.timer();
            // While a stop task runs, it owns the exit: not a crash.
            let server = match &self.state {
                State::Ready { running, .. } | State::Draining { running, .. } => {
                    Some(running.server.clone())
                }
                _ => None,
            };
            let watch_end = server.is_some();
            let ended = async move {
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
                status = ended, if watch_end => Next::Ended(status),
                _ = sleep_until_opt(timer), if timer.is_some() => Next::Timer,
            };
            match next {
                Next::Command(cmd) => self.on_command(cmd),
                Next::Event(event) => self.on_event(event),
                Next::Ended(status) => self.on_ended(status),
                Next::Timer => self.on_timer(),
            }
        }
    }

    /// The deadline of the current state's timer, if it has one.
    fn timer(&self) -> Option<Instant> {
        match &self.state {
            State::Ready { ttl, .. } => *ttl,
            State::Stopped { restart_at } => *restart_at,
            State::Draining { until, .. } => Some(*until),
            State::Failed { until } => Some(*until),
            _ => None,
        }
    }

    // -----------------------------------------------------------------------------------------
    // Transitions

    /// Takes the state out to move it; every caller puts a new one back with [`Self::enter`].
    fn take(&mut self) -> State {
        std::mem::replace(&mut self.state, State::Retired)
    }

    /// Enters `next`: the cell's phase follows, and waiters on the phase are told.
    fn enter(&mut self, next: State) {
        let cell = self.cell.clone();
        let mut st = cell.lock();
        st.phase = next.phase();
        tracing::debug!(model = %self.cfg.id, "{} -> {}", self.state.name(), next.name());
        self.state = next;
        drop(st);
        self.notify();
    }

    fn notify(&self) {
        self.cell.changed.send_modify(|n| *n += 1);
        // [dashboard hook] the event stream's `model` events.
        if self.ctx.changes.receiver_count() > 0 {
            let _ = self.ctx.changes.send(self.cell.status());
        }
    }

    /// Stopped/Failed → Admitting: ask the scheduler for room under `max_loaded`,
    /// `memory_budget` and exclusive groups; the real start follows in [`Self::launch`].
    fn begin_start(&mut self) {
        self.cell.lock().error = None;
        self.cell.stats.starts.fetch_add(1, Ordering::Relaxed);
        self.enter(State::Admitting {
            since: Instant::now(),
            withdrawn: None,
        });
        let (admission, cell, events) = (
            self.ctx.admission.clone(),
            self.cell.clone(),
            self.events_tx.clone(),
        );
        tokio::spawn(async move {
            let result = admission.admit(cell).await;
            let _ = events.send(Event::Admitted(result));
        });
    }

    /// Admitting → Starting: spawn the server (ports, spawn, readiness) in a task.
    fn launch(&mut self) {
        let (cancel, cancel_rx) = oneshot::channel();
        self.enter(State::Starting {
            cancel: Some(cancel),
            then: None,
        });
        self.save_kv = true;
        self.oom_kills_at_launch = self.ctx.oom.read();
        let cfg = if self.cfg.kv_persist && self.cell.kv.is_off() {
            // A restore was seen to reuse nothing: not worth the disk and the time.
            Arc::new(ModelConfig {
                kv_persist: false,
                ..(*self.cfg).clone()
            })
        } else {
            self.cfg.clone()
        };
        let cfg = match gpu_env(&cfg, &self.cell.placed()) {
            Some(visible) => {
                let mut c = (*cfg).clone();
                c.env.insert(CUDA_VISIBLE_DEVICES.to_owned(), visible);
                Arc::new(c)
            }
            None => cfg,
        };
        let (ctx, events, cell) = (self.ctx.clone(), self.events_tx.clone(), self.cell.clone());
        tokio::spawn(async move {
            let result = start::launch(cfg, ctx, cell, cancel_rx).await;
            let _ = events.send(Event::Started(result));
        });
    }

    /// Ready/Draining → Stopping: the stop task stops the server and reports `Stopped`.
    /// The leases of this run are written off (they see their server go).
    fn begin_stop(&mut self, running: Running, why: Why) {
        self.cell.lock().leases = 0;
        let (server, grace, events) = (
            running.server.clone(),
            self.cfg.stop_timeout,
            self.events_tx.clone(),
        );
        let cmd_stop = self.cfg.api.cmd_stop.as_ref().map(|argv| {
            let argv =
                super::cmd_stop::expand(argv, server.pid(), running.endpoint.port(), &self.cfg.id);
            (argv, self.cfg.id.clone())
        });
        // Saved in the model's own stop task: bounded by kv_save_timeout, and no other model
        // waits for it.
        let save = running
            .kv
            .clone()
            .filter(|_| self.save_kv && !matches!(why, Why::Unhealthy(_)))
            .map(|plan| {
                (
                    plan,
                    self.cell.clone(),
                    self.ctx.clone(),
                    running.endpoint.clone(),
                )
            });
        tokio::spawn(async move {
            if let Some((plan, cell, ctx, endpoint)) = save {
                let budget = ctx.kv_budget.load(Ordering::Relaxed);
                super::kv::save(
                    &plan,
                    &cell.kv,
                    &ctx.client,
                    &endpoint,
                    &ctx.state_dir,
                    budget,
                )
                .await;
            }
            if let (Some((argv, id)), Some(child)) = (cmd_stop, server.local()) {
                super::cmd_stop::run(&argv, child, grace, &id).await;
            }
            let status = server.stop(grace).await;
            let _ = events.send(Event::Stopped(status));
        });
        self.enter(State::Stopping { running, why });
    }

    /// The server is gone (or never came): enter `next`, free its room, answer unloads, and
    /// start again if `restart` or anyone waits.
    fn server_gone(&mut self, next: State, restart: bool) {
        let was_admitted = {
            let cell = self.cell.clone();
            let mut st = cell.lock();
            st.phase = next.phase();
            st.pid = None;
            st.endpoint = None;
            st.down = None;
            st.remote = None;
            st.leases = 0;
            st.run += 1;
            // The next start is admitted on what this run took (`memory_source = "learned"`).
            st.memory = st.memory.clone().ended_run();
            st.placed.clear();
            std::mem::replace(&mut st.admitted, false)
        };
        self.state = next;
        if was_admitted {
            // Its process has exited: the room it held is free.
            self.ctx.admission.send(AdmissionMsg::Changed);
        }
        self.notify();
        if matches!(self.state, State::Retired) {
            self.fail_waiters("the model was removed or llmvisor is shutting down");
        }
        for w in self.stop_waiters.drain(..) {
            let _ = w.send(());
        }
        let startable = matches!(self.state, State::Stopped { .. } | State::Failed { .. });
        if startable && (restart || !self.waiters.is_empty()) {
            self.begin_start();
        }
    }

    /// Wants the server stopped for `why`: at once if `force` or idle, else once its leases end.
    fn request_stop(&mut self, why: Why, force: bool) {
        let next = match self.take() {
            state @ (State::Stopped { .. } | State::Failed { .. }) => {
                if why == Why::Retire {
                    self.state = state;
                    self.server_gone(State::Retired, false);
                } else {
                    self.state = state;
                    for w in self.stop_waiters.drain(..) {
                        let _ = w.send(());
                    }
                }
                return;
            }
            State::Admitting { since, withdrawn } => {
                if why != Why::Reconfigure {
                    // Not started yet: leave the queue (the scheduler answers `Closed`).
                    self.ctx.admission.send(AdmissionMsg::Withdraw {
                        model: self.cell.id.clone(),
                    });
                }
                // A reconfigured model still queued simply starts with its new settings.
                let withdrawn = match why {
                    Why::Reconfigure => withdrawn,
                    why => Some(Why::merge_opt(withdrawn, why)),
                };
                State::Admitting { since, withdrawn }
            }
            State::Starting { cancel, then } => State::Starting {
                // Dropping the sender cancels the start; its task stops the child.
                cancel: if force { None } else { cancel },
                then: Some(Why::merge_opt(then, why)),
            },
            State::Ready { running, .. } => {
                let idle = self.close_to_new_leases(true);
                if force || idle {
                    return self.begin_stop(running, why);
                }
                State::Draining {
                    running,
                    why,
                    until: units::deadline(Instant::now(), self.cfg.drain_timeout),
                }
            }
            State::Draining {
                running,
                why: old,
                until,
            } => {
                let why = old.merge(why);
                if force {
                    return self.begin_stop(running, why);
                }
                State::Draining {
                    running,
                    why,
                    until,
                }
            }
            State::Stopping { running, why: old } => State::Stopping {
                running,
                why: old.merge(why),
            },
            State::Retired => State::Retired,
        };
        self.enter(next);
    }

    // -----------------------------------------------------------------------------------------
    // Commands

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Acquire { explicit, reply } => self.on_acquire(explicit, reply),
            Command::Idle { run } => self.on_idle(run),
            Command::Unload { force, reply } => {
                self.stop_waiters.push(reply);
                if force {
                    self.save_kv = false; // a forced stop is never delayed
                }
                self.request_stop(Why::Unload, force);
            }
            Command::Reconfigure { cfg, applied } => {
                self.on_reconfigure(cfg);
                let _ = applied.send(());
            }
            Command::Evict => {
                let evictable = matches!(self.state, State::Ready { .. })
                    && !self.cfg.pinned
                    && !self.cell.remote_held();
                if evictable {
                    tracing::info!(model = %self.cfg.id, "evicting to make room for another model");
                    self.cell.stats.evictions.fetch_add(1, Ordering::Relaxed);
                    self.request_stop(Why::Evict, false);
                }
            }
            Command::EvictIdle => {
                let idle = matches!(self.state, State::Ready { .. })
                    && !self.cfg.pinned
                    && !self.cell.remote_held()
                    && self.cell.lock().leases == 0;
                if idle {
                    tracing::info!(model = %self.cfg.id, "evicting: a running model grew past its memory figure");
                    self.cell.stats.evictions.fetch_add(1, Ordering::Relaxed);
                    self.request_stop(Why::Evict, false);
                }
            }
            Command::CancelEvict => match self.take() {
                // The start that wanted the room gave up: keep serving.
                State::Draining {
                    running,
                    why: Why::Evict,
                    ..
                } => {
                    self.enter(State::Ready { running, ttl: None });
                    if self.cell.lock().leases == 0 {
                        self.arm_ttl();
                    }
                }
                other => self.state = other,
            },
            Command::Retire { reply, keep_kv } => {
                self.stop_waiters.push(reply);
                self.save_kv &= keep_kv;
                self.fail_waiters("the model was removed or llmvisor is shutting down");
                self.request_stop(Why::Retire, true);
            }
        }
    }

    fn on_acquire(&mut self, explicit: bool, reply: oneshot::Sender<Result<Lease, AcquireError>>) {
        if self.state.retiring() {
            let _ = reply.send(Err(self.cell.unavailable("llmvisor is shutting down")));
            return;
        }
        let remote_gone = matches!(self.state, State::Ready { .. }) && {
            let st = self.cell.lock();
            st.remote.as_ref().is_some_and(|r| !r.usable())
        };
        if remote_gone {
            // The instance whose server we used died a moment ago: start over (claim it).
            self.on_ended(None);
        }
        match &self.state {
            State::Ready { .. } => {
                let lease = {
                    let mut st = self.cell.lock();
                    self.cell.grant(&mut st)
                };
                if let State::Ready { ttl, .. } = &mut self.state {
                    *ttl = None;
                }
                let _ = reply.send(Ok(lease));
            }
            State::Admitting { .. } if self.waiters.len() >= MAX_WAITERS => {
                let _ = reply.send(Err(AcquireError::NoRoom {
                    model: self.cfg.id.clone(),
                    reason: format!(
                        "{MAX_WAITERS} requests already wait for this model to get room"
                    ),
                    retry_after: Some(Duration::from_secs(1)),
                }));
            }
            State::Admitting { .. }
            | State::Starting { .. }
            | State::Draining { .. }
            | State::Stopping { .. } => {
                self.waiters.push(reply);
                self.sync_waiting();
            }
            State::Failed { until } if !explicit && Instant::now() < *until => {
                let refusal = self.policy.refusal(&self.cfg.id, *until - Instant::now());
                let _ = reply.send(Err(refusal));
            }
            State::Stopped { .. } | State::Failed { .. } => {
                self.waiters.push(reply);
                self.sync_waiting();
                self.begin_start();
            }
            State::Retired => {
                let _ = reply.send(Err(self.cell.unavailable("llmvisor is shutting down")));
            }
        }
    }

    /// The lease count of run `run` dropped to zero.
    fn on_idle(&mut self, run: u64) {
        let (current, leases) = {
            let st = self.cell.lock();
            (st.run, st.leases)
        };
        if current != run || leases != 0 {
            return; // stale, or someone took a lease since
        }
        self.measure_when_due();
        match self.take() {
            State::Draining { running, why, .. } => self.begin_stop(running, why),
            state @ State::Ready { .. } => {
                self.state = state;
                self.arm_ttl();
                // Idle now: a start waiting for room may evict it.
                self.ctx.admission.send(AdmissionMsg::Changed);
            }
            other => self.state = other,
        }
    }

    /// The server's size after serving is a better figure than the one at ready; measuring
    /// scans /proc, so at most once per interval, not on every idle moment.
    fn measure_when_due(&mut self) {
        let Some(running) = self.state.running() else {
            return;
        };
        if self
            .measured_at
            .is_some_and(|t| t.elapsed() < MEASURE_INTERVAL)
        {
            return;
        }
        self.measured_at = Some(Instant::now());
        let measured = self.measure(running);
        self.record_measured(measured);
    }

    /// The PSS of a local server's process group; besides, what the group holds on each GPU
    /// (NVML, only on a machine where GPUs were found) goes into its measured GPU figures.
    fn measure(&self, running: &Running) -> Option<u64> {
        let pgid = running.server.local()?.pid();
        if !self.ctx.machine.gpus.is_empty() {
            let per_gpu = self
                .ctx
                .gpu
                .used_by(&crate::procfs::live_group_members(pgid));
            let mut st = self.cell.lock();
            st.memory = st.memory.clone().with_measured_gpu(&per_gpu);
        }
        measure_group(pgid)
    }

    /// A new measurement of the running server: counted at once, and remembered in the state
    /// store under the model's file and flags when it is the largest so far.
    /// A server that grew past the figure it was admitted on by more than 10 % is re-counted
    /// (`Msg::Grew`): idle models may be evicted to keep the budget.
    fn record_measured(&self, measured: Option<u64>) {
        let mut st = self.cell.lock();
        let before = st.memory.measured;
        st.memory = st.memory.clone().with_measured(measured);
        let mut gpu_grew = false;
        if st.admitted {
            for (gpu, now) in st.memory.measured_gpu.clone() {
                if memory::grew_past(st.placed.get(&gpu).copied(), Some(now)) {
                    tracing::info!(model = %self.cfg.id, "grew to {} on GPU {gpu}: re-counted", units::format_size(now));
                    st.placed.insert(gpu, now);
                    gpu_grew = true;
                }
            }
        }
        let ram_grew = st.admitted && memory::grew_past(st.admitted_bytes, st.memory.bytes);
        if ram_grew {
            tracing::info!(model = %self.cfg.id, "grew from {} to {}: re-counted", st.admitted_bytes.map_or_else(|| "unknown".to_owned(), units::format_size), st.memory.bytes.map_or_else(String::new, units::format_size));
            st.admitted_bytes = st.memory.bytes;
        }
        if ram_grew || gpu_grew {
            self.ctx.admission.send(AdmissionMsg::Grew {
                cell: self.cell.clone(),
            });
        }
        let grew = st.memory.measured > before;
        let (Some(bytes), Some((file, shape)), true) =
            (st.memory.measured, st.memory.learn_key(), grew)
        else {
            return;
        };
        drop(st);
        let store = self.ctx.store.clone();
        tokio::spawn(async move {
            if let Err(e) = store.remember_memory(&file, &shape, bytes).await {
                tracing::warn!("cannot remember the model's memory in the state store: {e}");
            }
        });
    }

    /// Asks the state store what the model's file and flags took before (`Event::Learned`).
    fn look_up_learned_memory(&self) {
        let Some(key) = self.cell.lock().memory.learn_key() else {
            return;
        };
        let (store, events) = (self.ctx.store.clone(), self.events_tx.clone());
        tokio::spawn(async move {
            let bytes = store.learned_memory(&key.0, &key.1).await.ok().flatten();
            let _ = events.send(Event::Learned { key, bytes });
        });
    }

    /// New settings. Keys that shape the server (`cmd`, `env`, `cwd`, `port`, health) restart
    /// it once its leases end; the others (`ttl`, `pinned`, `memory`, `aliases`,
    /// `stop_timeout`, `startup_timeout`) apply at once, to a running server too.
    fn on_reconfigure(&mut self, cfg: Arc<ModelConfig>) {
        if *cfg == *self.cfg {
            return;
        }
        let restart = shapes_the_server_differently(&self.cfg, &cfg);
        {
            let mut st = self.cell.lock();
            st.aliases = cfg.aliases.clone();
            st.pinned = cfg.pinned;
            st.source = cfg.source();
            st.file = super::cell::found_file(&cfg);
            let measured = if restart { None } else { st.memory.measured };
            st.memory = Memory::for_machine(
                &cfg,
                &self.ctx.machine.gpu_indices(),
                self.ctx.gpus_placed.load(Ordering::Relaxed),
            )
            .with_measured(measured);
        }
        self.look_up_learned_memory();
        self.cell.connections.resize(cfg.connection_limit());
        self.cell.kv.configure(&cfg, &self.ctx.state_dir);
        self.cfg = cfg;
        // Pinned or memory may have changed what fits.
        self.ctx.admission.send(AdmissionMsg::Changed);
        match &self.state {
            State::Ready { .. } | State::Starting { .. } if restart => {
                self.request_stop(Why::Reconfigure, false);
            }
            // An idle model's clock restarts under the new ttl (or stops, if now pinned).
            State::Ready { .. } if self.cell.lock().leases == 0 => self.arm_ttl(),
            _ => {}
        }
        self.notify();
    }

    // -----------------------------------------------------------------------------------------
    // Events

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Admitted(result) => self.on_admitted(result),
            Event::Started(result) => self.on_started(result),
            Event::Stopped(status) => self.on_stopped(status),
            Event::Learned { key, bytes } => {
                let mut st = self.cell.lock();
                // Only if the settings are still those it was looked up for.
                if st.memory.learn_key().as_ref() == Some(&key) && bytes.is_some() {
                    st.memory = st.memory.clone().with_learned(bytes);
                    drop(st);
                    self.ctx.admission.send(AdmissionMsg::Changed);
                    self.notify();
                }
            }
            Event::TtlChecked { held } => {
                self.cell.lock().remote_held = held;
                if held {
                    self.arm_ttl(); // used by another instance: not idle
                } else {
                    self.stop_if_idle();
                }
            }
            Event::Unhealthy { run, reason } => {
                if run != self.cell.lock().run {
                    return;
                }
                match self.take() {
                    State::Ready { running, .. } => {
                        tracing::warn!(model = %self.cfg.id, "server is unhealthy: {reason}; stopping it");
                        self.cell.lock().error = Some(format!("unhealthy: {reason}"));
                        self.begin_stop(running, Why::Unhealthy(reason));
                    }
                    other => self.state = other,
                }
            }
        }
    }

    fn on_admitted(&mut self, result: Result<(), AdmitError>) {
        let (since, withdrawn) = match self.take() {
            State::Admitting { since, withdrawn } => (since, withdrawn),
            other => {
                // Not waiting for admission (cannot happen): keep the state.
                self.state = other;
                return;
            }
        };
        self.cell.stats.queue_wait.observe(since.elapsed());
        let stopped = State::Stopped { restart_at: None };
        match (result, withdrawn) {
            (_, Some(Why::Retire)) => self.server_gone(State::Retired, false),
            (Ok(()), Some(Why::Unload)) | (Err(AdmitError::Closed), Some(Why::Unload)) => {
                self.fail_waiters("it was unloaded while waiting for room");
                self.server_gone(stopped, false);
            }
            (Ok(()), _) => self.launch(),
            (Err(AdmitError::Closed), _) => {
                self.fail_waiters("llmvisor is shutting down");
                self.server_gone(stopped, false);
            }
            (Err(e), _) => {
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
                self.server_gone(stopped, false);
            }
        }
    }

    fn on_started(&mut self, result: Result<Running, StartFailure>) {
        let then = match self.take() {
            State::Starting { then, .. } => then,
            other => {
                self.state = other;
                return;
            }
        };
        match result {
            Ok(running) => self.on_ready(running, then),
            Err(failure) => {
                let status = failure.exit_status();
                let mut error = failure.into_error(&self.cfg.id);
                let cancelled = matches!(error, AcquireError::Unavailable { .. });
                let exit = status.map(|s| self.judge_exit(s));
                if let (Some((_, Some(note))), AcquireError::StartFailed { reason, .. }) =
                    (&exit, &mut error)
                {
                    reason.push_str(&format!("; {note}"));
                }
                {
                    let mut st = self.cell.lock();
                    if let Some((how, _)) = exit {
                        st.last_exit = Some(how);
                    }
                    st.error = (!cancelled).then(|| error.to_string());
                }
                for w in std::mem::take(&mut self.waiters) {
                    let _ = w.send(Err(error.clone()));
                }
                let next = if cancelled {
                    State::Stopped { restart_at: None }
                } else {
                    self.cell
                        .stats
                        .start_failures
                        .fetch_add(1, Ordering::Relaxed);
                    let backoff = self.policy.start_failed(error.clone());
                    tracing::warn!(model = %self.cfg.id, "start failed: {error}; backing off {}", units::format_duration(backoff));
                    State::Failed {
                        until: units::deadline(Instant::now(), backoff),
                    }
                };
                match then {
                    Some(Why::Retire) => self.server_gone(State::Retired, false),
                    // Cancelled for new settings: start again with them.
                    Some(Why::Reconfigure) if cancelled => self.server_gone(next, true),
                    _ => self.server_gone(next, false),
                }
            }
        }
    }

    /// Starting → Ready: the waiters get their leases; a stop wanted meanwhile follows.
    fn on_ready(&mut self, running: Running, then: Option<Why>) {
        self.cell.stats.start_time.observe(running.ready_after);
        self.policy.started();
        let measured = self.measure(&running);
        self.measured_at = Some(Instant::now());
        self.record_measured(measured);
        {
            let lines = self.cell.logs.tail(crate::logs::RING_LINES);
            let mut st = self.cell.lock();
            let visible: Vec<u32> = match gpu_env(&self.cfg, &st.placed) {
                Some(_) => st.placed.keys().copied().collect(),
                None => Vec::new(),
            };
            st.memory = st.memory.clone().with_buffers(&lines, &visible);
            st.waiting = 0;
            st.run += 1;
            st.endpoint = Some(running.endpoint.clone());
            st.down = Some(running.down_rx.clone());
            st.pid = Some(running.server.pid());
            st.remote = running.server.remote().cloned();
            st.ready_ms = Some(running.ready_after.as_millis() as u64);
            st.leases = 0;
        }
        tracing::info!(model = %self.cfg.id, pid = running.server.pid(), url = %running.endpoint.base_url(), ready_ms = running.ready_after.as_millis() as u64, "ready");
        if running.server.remote().is_some() {
            // Another instance runs it and counts it against its limits, not us.
            self.cell.set_admitted(false);
        } else {
            self.spawn_health_monitor(&running);
            if running.server.local().is_some() {
                self.spawn_remote_lease_watch(&running);
            }
        }
        self.enter(State::Ready { running, ttl: None });
        let mut granted = 0;
        for w in std::mem::take(&mut self.waiters) {
            let lease = {
                let mut st = self.cell.lock();
                self.cell.grant(&mut st)
            };
            // A waiter that gave up drops its lease right here, which is fine.
            if w.send(Ok(lease)).is_ok() {
                granted += 1;
            }
        }
        match then {
            Some(why) => {
                let force = why == Why::Retire;
                self.request_stop(why, force);
            }
            // Nobody holds it: the idle clock starts now.
            None if granted == 0 => self.arm_ttl(),
            None => {}
        }
        // Its measured size may differ from the estimate; a queued start may now evict it.
        self.ctx.admission.send(AdmissionMsg::Changed);
    }

    fn on_stopped(&mut self, status: Option<std::process::ExitStatus>) {
        let (running, why) = match self.take() {
            State::Stopping { running, why } => (running, why),
            other => {
                self.state = other;
                return;
            }
        };
        let _ = running.down_tx.send(true);
        self.forget(&running);
        match status {
            Some(status) => {
                self.cell.lock().last_exit = Some(describe_exit(status));
                tracing::info!(model = %self.cfg.id, "stopped ({}; {why})", describe_exit(status));
            }
            None => {
                tracing::info!(model = %self.cfg.id, "no longer using another instance's server")
            }
        }
        let stopped = State::Stopped { restart_at: None };
        match why {
            Why::Retire => self.server_gone(State::Retired, false),
            Why::Unhealthy(reason) => {
                self.after_failure(running.ready_at.elapsed(), format!("unhealthy: {reason}"))
            }
            Why::Reconfigure => self.server_gone(stopped, true),
            Why::Idle | Why::Evict | Why::Unload => self.server_gone(stopped, false),
        }
    }

    /// The server ended by itself (not through a stop of ours).
    fn on_ended(&mut self, status: Option<std::process::ExitStatus>) {
        let (running, why) = match self.take() {
            State::Ready { running, .. } => (running, None),
            State::Draining { running, why, .. } => (running, Some(why)),
            other => {
                self.state = other;
                return;
            }
        };
        let _ = running.down_tx.send(true);
        let stopped = State::Stopped { restart_at: None };
        let Some(status) = status else {
            // An attached server went away with its owner (or its owner stopped it): not a
            // crash of ours. The next acquire claims the model and starts it here if need be.
            let next = if why == Some(Why::Retire) {
                State::Retired
            } else {
                stopped
            };
            return self.server_gone(next, why == Some(Why::Reconfigure));
        };
        let (last_exit, note) = self.judge_exit(status);
        let how = match note {
            Some(note) => format!("{}; {note}", describe_exit(status)),
            None => describe_exit(status),
        };
        tracing::warn!(model = %self.cfg.id, pid = running.server.pid(), "server exited unexpectedly ({how})");
        self.cell.lock().last_exit = Some(last_exit);
        // Whatever it left in its group goes too; then its record and claims.
        let server = running.server.clone();
        let (ctx, port, pid) = (
            self.ctx.clone(),
            running.endpoint.port(),
            running.server.pid(),
        );
        let local = running.server.local().is_some();
        tokio::spawn(async move {
            server.clear_group().await;
            if local {
                ctx.forget_child(pid, port);
            }
        });
        if local {
            self.ctx.release_claim(&self.cfg.id);
        }
        match why {
            Some(Why::Retire) => self.server_gone(State::Retired, false),
            Some(Why::Unload) => self.server_gone(stopped, false),
            _ => self.after_failure(
                running.ready_at.elapsed(),
                format!("server exited unexpectedly ({how})"),
            ),
        }
    }

    /// After a crash or an unhealthy stop: the restart policy decides — restart (at once, or
    /// after a backoff) if `on_unhealthy = "restart"`, or fail for a cool-down in a crash loop.
    /// `last_exit` of a server that ended by itself, and a note on an OOM kill: a SIGKILL
    /// while the cgroup's OOM-kill count rose is `"oom"`, and the model counts more from now on
    /// (`Memory::after_oom`); a SIGKILL with no count to ask gets a hint.
    fn judge_exit(&self, status: std::process::ExitStatus) -> (String, Option<String>) {
        let verdict = oom::judge(status, self.oom_kills_at_launch, self.ctx.oom.read());
        match verdict {
            oom::Verdict::NotOom => (describe_exit(status), None),
            oom::Verdict::MaybeOom => (describe_exit(status), Some(oom::OOM_HINT.to_owned())),
            oom::Verdict::Oom => {
                let mut st = self.cell.lock();
                st.memory = st.memory.clone().after_oom();
                let note = match st.memory.oom_floor {
                    Some(b) => format!(
                        "killed by the kernel's OOM killer; its next start counts {}",
                        units::format_size(b)
                    ),
                    None => "killed by the kernel's OOM killer".to_owned(),
                };
                (oom::OOM_EXIT.to_owned(), Some(note))
            }
        }
    }

    fn after_failure(&mut self, ran_for: Duration, reason: String) {
        match self.policy.crashed(ran_for) {
            AfterCrash::CrashLoop { failures } => {
                let error = AcquireError::StartFailed {
                    model: self.cfg.id.clone(),
                    reason: format!(
                        "crash loop: {failures} failures in a row, the last: {reason}; cooling down for {}s",
                        CRASH_LOOP_COOLDOWN.as_secs()
                    ),
                    log_tail: self.cell.logs.tail(ERROR_TAIL_LINES),
                    retry_after: None,
                };
                tracing::error!(model = %self.cfg.id, "{error}");
                self.cell.lock().error = Some(error.to_string());
                self.policy.crash_loop_error(error);
                let until = units::deadline(Instant::now(), CRASH_LOOP_COOLDOWN);
                self.server_gone(State::Failed { until }, false);
            }
            AfterCrash::RestartIn(wait) => {
                self.cell.lock().error = Some(reason);
                let restart_at = (self.cfg.health.on_unhealthy == OnUnhealthy::Restart)
                    .then(|| units::deadline(Instant::now(), wait));
                if restart_at.is_some() {
                    tracing::info!(model = %self.cfg.id, "restarting in {}", units::format_duration(wait));
                }
                self.server_gone(State::Stopped { restart_at }, false);
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // Timers

    fn on_timer(&mut self) {
        match self.take() {
            State::Stopped {
                restart_at: Some(_),
            } => {
                tracing::info!(model = %self.cfg.id, "restarting");
                self.state = State::Stopped { restart_at: None };
                self.begin_start();
            }
            State::Failed { .. } => {
                tracing::info!(model = %self.cfg.id, "cool-down over; the next request starts it again");
                self.enter(State::Stopped { restart_at: None });
            }
            State::Draining { running, why, .. } => {
                // In-flight requests had drain_timeout to finish: the stop goes ahead, and the
                // streams still open are cut (their leases see the server go).
                let leases = self.cell.lock().leases;
                tracing::warn!(
                    model = %self.cfg.id,
                    "stopping ({why}) with {leases} requests still in flight: they did not finish within drain_timeout ({})",
                    units::format_duration(self.cfg.drain_timeout)
                );
                self.begin_stop(running, why);
            }
            State::Ready { running, .. } => {
                let local = running.server.local().is_some();
                self.state = State::Ready { running, ttl: None };
                if local {
                    self.check_remote_leases_then_stop();
                } else {
                    self.stop_if_idle();
                }
            }
            other => self.state = other,
        }
    }

    /// Before stopping our idle server, asks the store whether another instance uses it now
    /// (the cached flag can be a second old); the answer comes back as `TtlChecked`.
    fn check_remote_leases_then_stop(&self) {
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

    /// Ready and no lease → Stopping (the TTL passed).
    fn stop_if_idle(&mut self) {
        let (running, ttl) = match self.take() {
            State::Ready { running, ttl } => (running, ttl),
            other => {
                // Stopped or draining meanwhile: nothing to do.
                self.state = other;
                return;
            }
        };
        let idle = self.close_to_new_leases(false);
        if idle {
            tracing::info!(model = %self.cfg.id, "idle for {}; stopping", units::format_duration(self.cfg.ttl.unwrap_or_default()));
            self.begin_stop(running, Why::Idle);
        } else {
            self.state = State::Ready { running, ttl };
        }
    }

    /// Shows the model as stopping — so the fast path grants no new lease — always, or with
    /// `even_if_busy = false` only when no lease is held; returns whether none is. One lock for
    /// the check and the change: no acquire slips in between.
    fn close_to_new_leases(&self, even_if_busy: bool) -> bool {
        let mut st = self.cell.lock();
        let idle = st.leases == 0;
        if idle || even_if_busy {
            st.phase = super::Phase::Stopping;
        }
        idle
    }

    /// Ready and idle: the TTL starts (never for a pinned model, nor without a ttl).
    fn arm_ttl(&mut self) {
        let keep_alive = self.cell.lock().keep_alive;
        let deadline = match (self.cfg.pinned, keep_alive.unwrap_or(self.cfg.ttl)) {
            (false, Some(ttl)) => Some(units::deadline(Instant::now(), ttl)),
            _ => None,
        };
        if let State::Ready { ttl, .. } = &mut self.state {
            *ttl = deadline;
        }
    }

    // -----------------------------------------------------------------------------------------
    // Helpers

    /// Drops a stopped local server's record, port and claim from the state store.
    fn forget(&self, running: &Running) {
        if let Some(p) = running.server.local() {
            self.ctx.forget_child(p.pid(), running.endpoint.port());
            self.ctx.release_claim(&self.cfg.id);
        }
    }

    /// Probes the ready server's health path every `health_interval`; after `health_failures`
    /// failures in a row (error, non-2xx, or no answer within the interval) it reports the
    /// server unhealthy. Ends when the server goes down.
    fn spawn_health_monitor(&self, running: &Running) {
        let Some(interval) = self.cfg.health.interval else {
            return;
        };
        let run = self.cell.lock().run;
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
    fn spawn_remote_lease_watch(&self, running: &Running) {
        let (cell, store) = (self.cell.clone(), self.ctx.store.clone());
        let down = running.down_rx.clone();
        tokio::spawn(async move {
            loop {
                let held = store
                    .live_remote_leases(&cell.id)
                    .await
                    .map(|l| !l.is_empty())
                    .unwrap_or(false);
                cell.lock().remote_held = held;
                let mut gone = down.clone();
                tokio::select! {
                    _ = tokio::time::sleep(REMOTE_LEASE_CHECK) => {}
                    _ = gone.wait_for(|d| *d) => break,
                }
            }
            cell.lock().remote_held = false;
        });
    }

    fn sync_waiting(&self) {
        self.cell.lock().waiting = self.waiters.len();
    }

    fn fail_waiters(&mut self, reason: &str) {
        for w in std::mem::take(&mut self.waiters) {
            let _ = w.send(Err(self.cell.unavailable(reason)));
        }
        self.sync_waiting();
    }
}

/// True if `new` would start a different server than `old`: the keys that reach the process
/// or how it is checked. Everything else applies to a running server as it is.
fn shapes_the_server_differently(old: &ModelConfig, new: &ModelConfig) -> bool {
    old.cmd != new.cmd
        || old.env != new.env
        || old.cwd != new.cwd
        || old.port != new.port
        || old.health_path != new.health_path
        || old.health != new.health
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
