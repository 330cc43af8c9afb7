//! The model actor without processes: a launcher double stands in for "start a server", and
//! tokio's paused clock runs minutes of TTL, backoff and cool-down in microseconds. The
//! process-level tests in `tests/` are the outer layer.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;

use super::actor::spawn_model;
use super::admission::{Admission, Limits, Msg as AdmissionMsg};
use super::cell::{Command, ModelCell};
use super::double::{Launches, Outcome};
use super::start::Launcher;
use super::{AcquireError, Context, Phase};
use crate::config::ModelConfig;
use crate::ports::PortAllocator;
use crate::reaper::Registry;
use crate::spawn::Spawner;
use crate::store::Store;

const MIN: Duration = Duration::from_secs(60);
const GIB: u64 = 1 << 30;

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// Sleeps on the paused clock: simulated time, not test time.
async fn pass(d: Duration) {
    tokio::time::sleep(d).await;
}

struct Harness {
    ctx: Arc<Context>,
    /// The cgroup's OOM-kill count the actors read; negative: unreadable.
    oom_kills: Arc<std::sync::atomic::AtomicI64>,
    launches: Arc<Launches>,
    cells: Vec<Arc<ModelCell>>,
    _dir: tempfile::TempDir,
}

/// A context whose servers are doubles that take `load` to start. Call first in a test, before
/// any timer exists (the store opens on its own thread).
async fn harness(limits: Limits, load: Duration) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).await.unwrap();
    let launches = Launches::new(load);
    let oom_kills = Arc::new(std::sync::atomic::AtomicI64::new(0));
    let count = oom_kills.clone();
    let ctx = Arc::new(Context {
        instance_id: "lv-actor-test".into(),
        store,
        admission: Admission::start(limits),
        spawner: Spawner::start("lv-actor-test").unwrap(),
        ports: PortAllocator::new((10_500, 10_999)),
        client: crate::upstream::client(),
        registry: Registry::default(),
        state_dir: dir.path().to_owned(),
        launcher: Launcher::Double(launches.clone()),
        changes: tokio::sync::broadcast::channel(super::CHANGES_CAPACITY).0,
        kv_events: tokio::sync::broadcast::channel(super::kv::EVENTS_CAPACITY).0,
        kv_budget: crate::config::DEFAULT_KV_DISK_BUDGET.into(),
        machine: super::Machine::default(),
        memory_budget: std::sync::Mutex::new(None),
        gpu: Arc::new(crate::gpu::NoGpus),
        gpus_placed: false.into(),
        oom: super::oom::OomCounter::from_fn(move || {
            u64::try_from(count.load(Ordering::SeqCst)).ok()
        }),
    });
    Harness {
        ctx,
        oom_kills,
        launches,
        cells: Vec::new(),
        _dir: dir,
    }
}

/// A model config for the double: no health probing (that would be real I/O).
fn model(id: &str) -> ModelConfig {
    let mut cfg = ModelConfig::new(id, vec!["server-double".into(), id.into()]);
    cfg.health.interval = None;
    cfg.ttl = Some(10 * MIN);
    cfg
}

impl Harness {
    fn add(&mut self, cfg: ModelConfig, limits: Limits) -> Arc<ModelCell> {
        let (cell, _task) = spawn_model(Arc::new(cfg), self.ctx.clone());
        self.cells.push(cell.clone());
        self.ctx.admission.send(AdmissionMsg::Reset {
            cells: self.cells.clone(),
            limits,
        });
        cell
    }

    fn single(&mut self, cfg: ModelConfig) -> Arc<ModelCell> {
        self.add(cfg, Limits::default())
    }
}

async fn reconfigure(cell: &ModelCell, cfg: ModelConfig) {
    let (applied, done) = oneshot::channel();
    cell.send(Command::Reconfigure {
        cfg: Arc::new(cfg),
        applied,
    })
    .unwrap();
    done.await.unwrap();
}

async fn unload(cell: &ModelCell, force: bool) {
    let (reply, done) = oneshot::channel();
    cell.send(Command::Unload { force, reply }).unwrap();
    let _ = done.await;
}

/// An acquire that waits in a task of its own (its lease, or error, from the handle).
fn spawn_acquire(
    cell: &Arc<ModelCell>,
) -> tokio::task::JoinHandle<Result<super::Lease, AcquireError>> {
    let cell = cell.clone();
    tokio::spawn(async move { cell.acquire(false).await })
}

/// A gentle unload that waits in a task of its own.
fn spawn_unload(cell: &Arc<ModelCell>) -> tokio::task::JoinHandle<()> {
    let cell = cell.clone();
    tokio::spawn(async move { unload(&cell, false).await })
}

async fn wait_phase(cell: &ModelCell, phase: Phase) {
    let waited = tokio::time::timeout(secs(3600), cell.wait_for_phase(|p| p == phase)).await;
    assert!(
        waited.is_ok(),
        "{} never became {phase}; it is {}",
        cell.id,
        cell.phase()
    );
}

#[tokio::test(start_paused = true)]
async fn concurrent_acquires_start_once() {
    let mut h = harness(Limits::default(), secs(2)).await;
    let cell = h.single(model("m"));
    let leases = futures_util::future::join_all((0..50).map(|_| cell.acquire(false))).await;
    assert!(leases.iter().all(Result::is_ok));
    assert_eq!(h.launches.begun(), 1);
    assert_eq!(cell.status().leases, 50);
    drop(leases);
    assert_eq!(cell.status().leases, 0);
}

#[tokio::test(start_paused = true)]
async fn the_ttl_stops_an_idle_model_after_exactly_its_ttl_and_a_lease_holds_it() {
    let mut h = harness(Limits::default(), secs(2)).await;
    let cell = h.single(model("m"));
    let lease = cell.acquire(false).await.unwrap();
    pass(30 * MIN).await;
    assert_eq!(cell.phase(), Phase::Ready, "a held lease keeps it up");
    drop(lease);
    pass(10 * MIN - secs(1)).await;
    assert_eq!(cell.phase(), Phase::Ready);
    // A lease taken and dropped in the last second starts the clock again.
    drop(cell.acquire(false).await.unwrap());
    pass(secs(2)).await;
    assert_eq!(
        cell.phase(),
        Phase::Ready,
        "the new acquire restarted the clock"
    );
    pass(10 * MIN).await;
    assert_eq!(cell.phase(), Phase::Stopped);
    assert_eq!(h.launches.server(0).stops.load(Ordering::SeqCst), 1);
    assert_eq!(h.launches.begun(), 1);
}

#[tokio::test(start_paused = true)]
async fn failed_starts_back_off_by_one_formula_and_an_explicit_load_skips_the_wait() {
    let mut h = harness(Limits::default(), secs(1)).await;
    h.launches.then(&[Outcome::Exits(3), Outcome::Exits(3)]);
    let cell = h.single(model("m"));

    let first = cell.acquire(false).await.unwrap_err();
    assert!(first.to_string().contains("exit code 3"), "{first}");
    assert_eq!(cell.phase(), Phase::Failed);
    assert_eq!(cell.status().last_exit.as_deref(), Some("exit code 3"));
    // Within the backoff: refused at once, no new start.
    let refused = cell.acquire(false).await.unwrap_err();
    assert!(
        matches!(&refused, AcquireError::StartFailed { retry_after: Some(d), .. } if *d <= secs(1)),
        "{refused:?}"
    );
    assert!(refused.to_string().contains("failed 1 times in a row"));
    assert_eq!(h.launches.begun(), 1);
    // The backoff passes by itself.
    wait_phase(&cell, Phase::Stopped).await;
    let second = cell.acquire(false).await.unwrap_err();
    assert!(second.to_string().contains("exit code 3"));
    let refused = cell.acquire(false).await.unwrap_err();
    assert!(
        matches!(&refused, AcquireError::StartFailed { retry_after: Some(d), .. } if *d > secs(1) && *d <= secs(2)),
        "the second failure backs off 2 s: {refused:?}"
    );
    // An operator's load does not wait.
    let lease = cell.acquire(true).await.unwrap();
    assert_eq!(h.launches.begun(), 3);
    assert_eq!(cell.status().error, None);
    drop(lease);
}

#[tokio::test(start_paused = true)]
async fn a_crash_loop_fails_for_the_cool_down_then_recovers_by_itself() {
    let mut h = harness(Limits::default(), secs(1)).await;
    let cell = h.single(model("m"));
    drop(cell.acquire(false).await.unwrap());

    // First crash: restarted at once, by itself.
    h.launches.server(0).crash(1);
    wait_phase(&cell, Phase::Starting).await;
    wait_phase(&cell, Phase::Ready).await;
    assert_eq!(h.launches.begun(), 2);
    // Second: restarted after a 1 s backoff.
    h.launches.server(1).crash(1);
    wait_phase(&cell, Phase::Stopped).await;
    pass(Duration::from_millis(900)).await;
    assert_eq!(cell.phase(), Phase::Stopped, "restarted before the backoff");
    wait_phase(&cell, Phase::Ready).await;
    assert_eq!(h.launches.begun(), 3);
    // Third in a row: a crash loop, failed for the cool-down.
    h.launches.server(2).crash(1);
    wait_phase(&cell, Phase::Failed).await;
    let refused = cell.acquire(false).await.unwrap_err();
    assert!(refused.to_string().contains("crash loop"), "{refused}");
    pass(59 * MIN / 60).await;
    assert_eq!(cell.phase(), Phase::Failed);
    assert_eq!(
        h.launches.begun(),
        3,
        "nothing restarts during the cool-down"
    );
    // After 60 s it is stopped again, and the next request starts it.
    pass(secs(2)).await;
    assert_eq!(cell.phase(), Phase::Stopped);
    let lease = cell.acquire(false).await.unwrap();
    assert_eq!(h.launches.begun(), 4);
    assert_eq!(cell.status().restarts, 3);
    drop(lease);
}

#[tokio::test(start_paused = true)]
async fn policy_stop_leaves_a_crashed_server_stopped() {
    let mut h = harness(Limits::default(), secs(1)).await;
    let mut cfg = model("m");
    cfg.health.on_unhealthy = crate::config::OnUnhealthy::Stop;
    let cell = h.single(cfg);
    drop(cell.acquire(false).await.unwrap());
    h.launches.server(0).crash(1);
    wait_phase(&cell, Phase::Stopped).await;
    pass(10 * MIN).await;
    assert_eq!(h.launches.begun(), 1);
    assert!(cell
        .status()
        .error
        .is_some_and(|e| e.contains("exited unexpectedly (exit code 1)")));
}

#[tokio::test(start_paused = true)]
async fn an_unload_drains_the_leases_first_and_a_forced_one_does_not() {
    let mut h = harness(Limits::default(), secs(1)).await;
    let cell = h.single(model("m"));
    let lease = cell.acquire(false).await.unwrap();
    let unloading = spawn_unload(&cell);
    wait_phase(&cell, Phase::Stopping).await;
    pass(MIN).await;
    let server = h.launches.server(0);
    assert!(server.is_running(), "stopped under a lease");
    assert!(!unloading.is_finished());
    // No new lease while draining: an acquire waits for the restart after the stop.
    assert!(cell.try_acquire_ready().is_none());
    drop(lease);
    unloading.await.unwrap();
    assert_eq!(cell.phase(), Phase::Stopped);
    assert!(!server.is_running());

    let lease = cell.acquire(false).await.unwrap();
    unload(&cell, true).await;
    assert_eq!(cell.phase(), Phase::Stopped);
    assert!(
        !lease.is_up(),
        "a forced unload tells the lease its server is gone"
    );
    assert!(!h.launches.server(1).is_running());
}

#[tokio::test(start_paused = true)]
async fn a_forced_unload_cancels_a_start_and_answers_its_waiters() {
    let mut h = harness(Limits::default(), secs(30)).await;
    let cell = h.single(model("m"));
    let waiter = spawn_acquire(&cell);
    pass(secs(1)).await;
    assert_eq!(cell.phase(), Phase::Starting);
    unload(&cell, true).await;
    let err = waiter.await.unwrap().unwrap_err();
    assert!(matches!(err, AcquireError::Unavailable { .. }), "{err:?}");
    assert_eq!(h.launches.cancelled.load(Ordering::SeqCst), 1);
    assert_eq!(h.launches.ready_count(), 0);
    assert_eq!(cell.phase(), Phase::Stopped);
    assert_eq!(cell.status().error, None, "a cancel is not a failure");
}

#[tokio::test(start_paused = true)]
async fn a_gentle_unload_during_a_start_lets_the_waiters_finish_then_stops() {
    let mut h = harness(Limits::default(), secs(30)).await;
    let cell = h.single(model("m"));
    let waiter = spawn_acquire(&cell);
    pass(secs(1)).await;
    let unloading = spawn_unload(&cell);
    let lease = waiter.await.unwrap().expect("the waiter is served");
    assert_eq!(cell.phase(), Phase::Stopping, "draining, not ready");
    assert!(!unloading.is_finished());
    drop(lease);
    unloading.await.unwrap();
    assert_eq!(cell.phase(), Phase::Stopped);
}

#[tokio::test(start_paused = true)]
async fn reloading_pinned_applies_at_once_without_a_restart() {
    let mut h = harness(Limits::default(), secs(1)).await;
    let mut cfg = model("m");
    cfg.ttl = Some(MIN);
    let cell = h.single(cfg.clone());
    drop(cell.acquire(false).await.unwrap());
    cfg.pinned = true;
    reconfigure(&cell, cfg.clone()).await;
    assert!(cell.pinned());
    pass(10 * MIN).await;
    assert_eq!(
        cell.phase(),
        Phase::Ready,
        "a pinned model does not idle out"
    );
    cfg.pinned = false;
    reconfigure(&cell, cfg).await;
    assert!(!cell.pinned());
    pass(MIN + secs(1)).await;
    assert_eq!(cell.phase(), Phase::Stopped, "unpinned, its ttl runs again");
    assert_eq!(h.launches.begun(), 1, "no restart for pinned");
}

#[tokio::test(start_paused = true)]
async fn reloading_memory_and_ttl_applies_at_once_without_a_restart() {
    let mut h = harness(Limits::default(), secs(1)).await;
    let mut cfg = model("m");
    let cell = h.single(cfg.clone());
    drop(cell.acquire(false).await.unwrap());
    cfg.memory = Some(2 * GIB);
    cfg.ttl = Some(MIN);
    reconfigure(&cell, cfg).await;
    assert_eq!(cell.memory().bytes, Some(2 * GIB));
    assert_eq!(cell.status().memory_source, "declared");
    pass(MIN + secs(1)).await;
    assert_eq!(
        cell.phase(),
        Phase::Stopped,
        "the new 1 min ttl, not the old 10 min"
    );
    assert_eq!(h.launches.begun(), 1);
}

#[tokio::test(start_paused = true)]
async fn reloading_cmd_restarts_once_the_leases_end() {
    let mut h = harness(Limits::default(), secs(1)).await;
    let mut cfg = model("m");
    let cell = h.single(cfg.clone());
    let lease = cell.acquire(false).await.unwrap();
    cfg.cmd = vec!["server-double".into(), "--new".into()];
    reconfigure(&cell, cfg.clone()).await;
    assert_eq!(cell.phase(), Phase::Stopping);
    pass(MIN).await;
    assert!(h.launches.server(0).is_running(), "restarted under a lease");
    drop(lease);
    wait_phase(&cell, Phase::Ready).await;
    assert_eq!(h.launches.begun(), 2);
    assert!(!h.launches.server(0).is_running());
    assert_eq!(h.launches.cmds.lock().unwrap()[1], cfg.cmd);
    // A reload while stopped just takes the settings; the next start uses them.
    unload(&cell, false).await;
    cfg.cmd = vec!["server-double".into(), "--newer".into()];
    reconfigure(&cell, cfg.clone()).await;
    assert_eq!(cell.phase(), Phase::Stopped);
    assert_eq!(h.launches.begun(), 2);
    drop(cell.acquire(false).await.unwrap());
    assert_eq!(h.launches.cmds.lock().unwrap()[2], cfg.cmd);
}

#[tokio::test(start_paused = true)]
async fn eviction_drains_a_busy_model_and_a_cancelled_eviction_keeps_it() {
    let limits = Limits {
        max_loaded: Some(1),
        queue_timeout: MIN,
        ..Limits::default()
    };
    let mut h = harness(limits.clone(), secs(1)).await;
    let a = h.add(model("a"), limits.clone());
    let b = h.add(model("b"), limits);
    let held = a.acquire(false).await.unwrap();
    let wants_b = spawn_acquire(&b);
    wait_phase(&a, Phase::Stopping).await;
    assert!(
        h.launches.server(0).is_running(),
        "a busy model is drained, not cut"
    );
    // b gives up after queue_timeout: a is no longer evicted and serves on.
    let err = wants_b.await.unwrap().unwrap_err();
    assert!(matches!(err, AcquireError::NoRoom { .. }), "{err:?}");
    wait_phase(&a, Phase::Ready).await;
    assert!(held.is_up());
    assert_eq!(a.stats.evictions.load(Ordering::SeqCst), 1);
    // Idle now: the next start of b evicts it at once.
    drop(held);
    let lease_b = b.acquire(false).await.unwrap();
    assert_eq!(a.phase(), Phase::Stopped);
    drop(lease_b);
}

#[tokio::test(start_paused = true)]
async fn retiring_ends_the_actor_from_every_state() {
    let mut h = harness(Limits::default(), secs(30)).await;
    let stopped = h.single(model("stopped"));
    let starting = h.single(model("starting"));
    let ready = h.single(model("ready"));
    let lease = ready.acquire(false).await.unwrap();
    let waiter = spawn_acquire(&starting);
    pass(secs(1)).await;
    assert_eq!(starting.phase(), Phase::Starting);
    for cell in [&stopped, &starting, &ready] {
        let (reply, done) = oneshot::channel();
        cell.send(Command::Retire {
            reply,
            keep_kv: true,
        })
        .unwrap();
        done.await.unwrap();
        assert_eq!(cell.phase(), Phase::Stopped, "{}", cell.id);
    }
    assert!(waiter.await.unwrap().is_err());
    assert!(!lease.is_up());
    assert!(
        starting.acquire(false).await.is_err(),
        "a retired model takes no acquire"
    );
}

fn one_at_a_time(max_wait_for_swap: Duration) -> Limits {
    Limits {
        max_loaded: Some(1),
        queue_timeout: 5 * MIN,
        max_wait_for_swap,
        ..Limits::default()
    }
}

#[tokio::test(start_paused = true)]
async fn a_busy_model_serves_on_until_the_swap_bound_then_drains() {
    let limits = one_at_a_time(secs(30));
    let mut h = harness(limits.clone(), secs(1)).await;
    let a = h.add(model("a"), limits.clone());
    let b = h.add(model("b"), limits);
    let held = a.acquire(false).await.unwrap();
    let wants_b = spawn_acquire(&b);
    pass(secs(10)).await;
    // Still ready: a's own new requests are served rather than queued behind a swap.
    assert_eq!(a.phase(), Phase::Ready);
    let status = b.status();
    assert_eq!(status.queued, 1);
    let reason = status.wait_reason.expect("b says why it waits");
    assert!(
        reason.contains("max_wait_for_swap") && reason.contains("a (1 leases)"),
        "{reason}"
    );
    let more = a
        .try_acquire_ready()
        .expect("a takes new leases while b waits");
    // At the bound, a is drained (no new lease) and b starts when a's work is done.
    pass(secs(21)).await;
    assert_eq!(a.phase(), Phase::Stopping);
    assert!(a.try_acquire_ready().is_none());
    drop((held, more));
    let lease_b = wants_b.await.unwrap().unwrap();
    assert_eq!(a.phase(), Phase::Stopped);
    assert_eq!(b.stats.swaps.load(Ordering::SeqCst), 1);
    assert_eq!(b.status().wait_reason, None);
    drop(lease_b);
}

#[tokio::test(start_paused = true)]
async fn a_model_that_goes_idle_is_swapped_out_at_once() {
    let limits = one_at_a_time(secs(30));
    let mut h = harness(limits.clone(), secs(1)).await;
    let a = h.add(model("a"), limits.clone());
    let b = h.add(model("b"), limits);
    let held = a.acquire(false).await.unwrap();
    let wants_b = spawn_acquire(&b);
    pass(secs(3)).await;
    let asked = tokio::time::Instant::now();
    drop(held);
    let lease_b = wants_b.await.unwrap().unwrap();
    // One load of b (1 s) after a stopped; not the 30 s bound.
    assert!(asked.elapsed() < secs(2), "{:?}", asked.elapsed());
    drop(lease_b);
}

/// The thrash scenario: `max_loaded = 1`, two models (0.5 s load), three agents per
/// model each sending four requests one after another (0.3 s each). Returns (starts, wall).
async fn thrash(max_wait_for_swap: Duration) -> (usize, Duration) {
    let limits = one_at_a_time(max_wait_for_swap);
    let mut h = harness(limits.clone(), Duration::from_millis(500)).await;
    let cells = [h.add(model("a"), limits.clone()), h.add(model("b"), limits)];
    let began = tokio::time::Instant::now();
    let mut agents = Vec::new();
    for agent in 0..6 {
        let cell = cells[agent % 2].clone();
        agents.push(tokio::spawn(async move {
            for _ in 0..4 {
                let lease = cell.acquire(false).await.unwrap();
                pass(Duration::from_millis(300)).await;
                drop(lease);
            }
        }));
    }
    for a in agents {
        a.await.unwrap();
    }
    (h.launches.begun(), began.elapsed())
}

#[tokio::test(start_paused = true)]
async fn swap_aware_admission_serves_each_models_queue_before_swapping() {
    let (fifo_starts, fifo_wall) = thrash(Duration::ZERO).await;
    let (starts, wall) = thrash(secs(30)).await;
    assert!(starts <= 3, "swap-aware: {starts} starts in {wall:?}");
    assert!(
        fifo_starts > starts && wall < fifo_wall,
        "FIFO {fifo_starts} starts in {fifo_wall:?}, swap-aware {starts} in {wall:?}"
    );
    eprintln!(
        "thrash: FIFO {fifo_starts} starts {fifo_wall:?}; swap-aware {starts} starts {wall:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_drain_that_outlasts_drain_timeout_is_cut() {
    let mut h = harness(Limits::default(), secs(1)).await;
    let mut cfg = model("m");
    cfg.drain_timeout = 2 * MIN;
    let cell = h.single(cfg);
    let stuck = cell.acquire(false).await.unwrap();
    let unloading = spawn_unload(&cell);
    wait_phase(&cell, Phase::Stopping).await;
    pass(2 * MIN - secs(1)).await;
    assert!(stuck.is_up(), "cut before drain_timeout");
    assert!(!unloading.is_finished());
    pass(secs(2)).await;
    unloading.await.unwrap();
    assert_eq!(cell.phase(), Phase::Stopped);
    assert!(!stuck.is_up(), "the stuck request's server is gone");
    assert!(!h.launches.server(0).is_running());
}

/// The first status with an error the model's changes carry (what `/api/events` sends).
async fn first_error(
    changes: &mut tokio::sync::broadcast::Receiver<super::ModelStatus>,
) -> super::ModelStatus {
    loop {
        let st = changes.recv().await.unwrap();
        if st.error.is_some() {
            return st;
        }
    }
}

#[tokio::test(start_paused = true)]
async fn an_oom_kill_is_last_exit_oom_and_the_restart_makes_more_room() {
    let limits = Limits {
        memory_budget: Some(10 * GIB),
        queue_timeout: MIN,
        ..Limits::default()
    };
    let mut h = harness(limits.clone(), secs(1)).await;
    let mut a = model("a");
    a.memory = Some(4 * GIB);
    let mut b = model("b");
    b.memory = Some(6 * GIB);
    let a = h.add(a, limits.clone());
    let b = h.add(b, limits);
    drop(a.acquire(false).await.unwrap());
    drop(b.acquire(false).await.unwrap());
    assert_eq!(b.phase(), Phase::Ready, "4 + 6 GiB fit the 10 GiB budget");
    // The kernel's OOM killer: SIGKILL, and the cgroup's count rises.
    let mut changes = h.ctx.changes.subscribe();
    h.oom_kills.store(1, Ordering::SeqCst);
    h.launches.server(0).killed(9);
    let st = first_error(&mut changes).await;
    assert_eq!(st.last_exit.as_deref(), Some("oom"));
    let error = st.error.unwrap_or_default();
    assert!(
        error.contains("killed by the kernel's OOM killer"),
        "{error}"
    );
    assert!(error.contains("4.4 GiB"), "{error}");
    // Its restart counts 4.4 GiB: idle b goes to make room.
    assert_eq!(a.memory().bytes, Some(4 * GIB * 11 / 10));
    wait_phase(&a, Phase::Ready).await;
    assert_eq!(b.phase(), Phase::Stopped);
    assert_eq!(h.launches.begun(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_sigkill_not_ours_without_an_oom_count_gets_the_hint() {
    let mut h = harness(Limits::default(), secs(1)).await;
    let cell = h.single(model("m"));
    drop(cell.acquire(false).await.unwrap());
    // No count to ask: the usual last_exit, with the hint.
    let mut changes = h.ctx.changes.subscribe();
    h.oom_kills.store(-1, Ordering::SeqCst);
    h.launches.server(0).killed(9);
    let st = first_error(&mut changes).await;
    assert_eq!(st.last_exit.as_deref(), Some("signal 9 (SIGKILL)"));
    let error = st.error.unwrap_or_default();
    assert!(error.contains(super::oom::OOM_HINT), "{error}");
    wait_phase(&cell, Phase::Ready).await;
    // Counted, and unchanged: someone else's SIGKILL, no hint.
    h.oom_kills.store(3, Ordering::SeqCst);
    drop(cell.acquire(false).await.unwrap());
    pass(secs(5)).await;
    h.launches.server(1).killed(9);
    wait_phase(&cell, Phase::Stopped).await;
    let st = cell.status();
    assert_eq!(st.last_exit.as_deref(), Some("signal 9 (SIGKILL)"));
    assert!(!st.error.unwrap_or_default().contains("OOM"));
    assert_eq!(cell.memory().oom_floor, None);
}

#[tokio::test(start_paused = true)]
async fn an_oom_kill_during_the_start_is_oom_too() {
    let mut h = harness(Limits::default(), secs(1)).await;
    let mut cfg = model("m");
    cfg.memory = Some(GIB);
    h.launches.then(&[Outcome::Killed(9)]);
    let cell = h.single(cfg);
    h.oom_kills.store(0, Ordering::SeqCst);
    let count = h.oom_kills.clone();
    // The count rises while it loads (the double "dies" at the end of its load time).
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        count.store(1, Ordering::SeqCst);
    });
    let err = cell.acquire(false).await.unwrap_err();
    assert!(err.to_string().contains("OOM killer"), "{err}");
    assert_eq!(cell.status().last_exit.as_deref(), Some("oom"));
    assert_eq!(cell.memory().bytes, Some(GIB * 11 / 10));
}

#[tokio::test(start_paused = true)]
async fn a_model_that_grew_is_re_counted_and_only_idle_others_make_room() {
    let limits = Limits {
        memory_budget: Some(10 * GIB),
        queue_timeout: MIN,
        ..Limits::default()
    };
    let mut h = harness(limits.clone(), secs(1)).await;
    let mut cells = Vec::new();
    for id in ["a", "busy", "idle"] {
        let mut cfg = model(id);
        cfg.memory = Some(3 * GIB);
        cells.push(h.add(cfg, limits.clone()));
    }
    let (a, busy, idle) = (&cells[0], &cells[1], &cells[2]);
    drop(idle.acquire(false).await.unwrap());
    pass(secs(5)).await;
    let held = busy.acquire(false).await.unwrap();
    drop(a.acquire(false).await.unwrap());
    // `a` now measures 6 GiB: 6 + 3 + 3 is over the 10 GiB budget.
    {
        let mut st = a.lock();
        st.memory = st.memory.clone().with_measured(Some(6 * GIB));
    }
    h.ctx.admission.send(AdmissionMsg::Grew { cell: a.clone() });
    // At once, not by its 10 min ttl.
    pass(secs(1)).await;
    assert_eq!(idle.phase(), Phase::Stopped);
    assert_eq!(
        busy.phase(),
        Phase::Ready,
        "a busy model is never evicted for growth"
    );
    assert!(held.is_up());
    assert_eq!(a.phase(), Phase::Ready);
    assert_eq!(idle.stats.evictions.load(Ordering::SeqCst), 1);
}

/// A model needing `gib` GiB on the GPUs (`pinned`: on these, else on any one).
fn gpu_model(
    h: &mut Harness,
    id: &str,
    gib: u64,
    pinned: Option<u32>,
    limits: &Limits,
) -> Arc<ModelCell> {
    let cell = h.add(model(id), limits.clone());
    cell.lock().memory.gpu_need = match pinned {
        Some(g) => crate::gpu::place::GpuNeed::Pinned([(g, gib * GIB)].into()),
        None => crate::gpu::place::GpuNeed::Anywhere(gib * GIB),
    };
    cell
}

#[tokio::test(start_paused = true)]
async fn two_24_gib_gpus_place_14_8_and_20_gib_models_pinned_ones_and_refuse_what_fits_neither() {
    let limits = Limits {
        gpu_budgets: [(0, 24 * GIB), (1, 24 * GIB)].into(),
        queue_timeout: MIN,
        ..Limits::default()
    };
    let mut h = harness(limits.clone(), secs(1)).await;
    let a = gpu_model(&mut h, "a", 14, None, &limits);
    let b = gpu_model(&mut h, "b", 8, None, &limits);
    let c = gpu_model(&mut h, "c", 20, None, &limits);
    let p = gpu_model(&mut h, "p", 8, Some(1), &limits);
    let huge = gpu_model(&mut h, "huge", 30, None, &limits);
    let lease_a = a.acquire(false).await.unwrap();
    pass(secs(1)).await;
    let lease_b = b.acquire(false).await.unwrap();
    assert_eq!(a.status().gpus, [0], "14 GiB: the tie goes to GPU 0");
    assert_eq!(b.status().gpus, [1], "8 GiB: GPU 1 keeps the most left");
    let envs = h.launches.envs.lock().unwrap().clone();
    assert_eq!(
        envs[0].get("CUDA_VISIBLE_DEVICES").map(String::as_str),
        Some("0")
    );
    assert_eq!(
        envs[1].get("CUDA_VISIBLE_DEVICES").map(String::as_str),
        Some("1")
    );
    // Pinned to GPU 1: 16 GiB free there.
    drop(p.acquire(false).await.unwrap());
    assert_eq!(p.status().gpus, [1]);
    // 20 GiB: 10 and 8 GiB free, it fits neither now. a (busy) drains to make room on GPU 0;
    // idle p stays: without it GPU 1 would still have only 16 GiB, so stopping it helps no one.
    let wants_c = spawn_acquire(&c);
    pass(secs(1)).await;
    assert_eq!(c.phase(), Phase::Starting);
    assert!(c.status().wait_reason.is_some());
    assert_eq!(a.phase(), Phase::Stopping, "a drains for c");
    assert_eq!(p.phase(), Phase::Ready);
    drop(lease_a);
    let lease_c = wants_c.await.unwrap().unwrap();
    assert_eq!(c.status().gpus, [0]);
    assert_eq!(p.phase(), Phase::Ready, "p was not needed");
    assert_eq!(b.phase(), Phase::Ready);
    // More than any GPU's budget: never, with the fix.
    let err = huge.acquire(false).await.unwrap_err();
    assert!(
        matches!(
            &err,
            AcquireError::NoRoom {
                retry_after: None,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("more than the gpu_budget of any"),
        "{err}"
    );
    drop((lease_b, lease_c));
}
