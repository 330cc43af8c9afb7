//! Benchmarks of the supervisor core against the fake server (`fake-llm`).
//!
//! ```text
//! cargo build --release -p fake-llm && cargo bench -p llmvisor --bench acquire
//! ```
//!
//! `ready::*` — a lease on a model that is already ready, then its drop (ns per call):
//!
//! - `fast_path`: `ModelCell::try_acquire_ready()` + drop. The cell's mutex and nothing else.
//! - `acquire_polled_once`: `Supervisor::acquire("warm")` polled once (it never awaits on a ready
//!   model) + drop: adds the name lookup (read lock, hash map, `Arc` clone).
//! - `acquire_block_on`: `rt.block_on(sup.acquire("warm"))` + drop: what a synchronous caller
//!   pays, tokio's `block_on` included.
//!
//! Each runs with 1 and 2 threads, and with `other_lease_held` false or true: when no other lease
//! is held, every drop is the model's last lease, so it also sends an `Idle` message to the
//! model's actor (which wakes up to arm the idle TTL); with another lease held it does not.
//!
//! `cold::concurrent_acquires`: `n` tasks call `acquire` on a stopped model at once; one sample is
//! the time from the first call to the last lease obtained. Between samples the model is unloaded
//! (not timed). The fake server starts with no delay, so this is llmvisor's own cold-start cost
//! (spawn, port, readiness polling, waking the waiters) plus the fake server's start-up. Every
//! sample must spawn exactly one server: checked against the pid file the fake server appends to.
//!
//! divan has no teardown hook: the supervisor lives in a static, and `main` shuts it down after
//! `divan::main()` returns and checks that no fake server is left running.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use divan::Bencher;
use futures_util::FutureExt;
use llmvisor::config::ModelConfig;
use llmvisor::{Lease, Phase, Supervisor};

/// Model for the `ready` benchmarks: started once, stays ready.
const WARM: &str = "warm";
/// Model for the `cold` benchmark: unloaded before every sample.
const COLD: &str = "cold";

fn main() {
    divan::main();
    if let Some(env) = ENV.get() {
        env.finish();
    }
}

/// Everything the benchmarks share, built on first use.
struct Env {
    rt: tokio::runtime::Runtime,
    sup: Supervisor,
    scratch: PathBuf,
    /// Cold samples whose leases were all obtained.
    cold_samples: AtomicUsize,
    /// The supervisor's own `ready_ms` (spawn request → ready) of each cold start.
    cold_ready_ms: Mutex<Vec<u64>>,
}

static ENV: OnceLock<Env> = OnceLock::new();

fn env() -> &'static Env {
    ENV.get_or_init(Env::new)
}

impl Env {
    fn new() -> Self {
        let fake = fake_llm();
        let scratch = std::env::temp_dir().join(format!("llmvisor-bench-{}", std::process::id()));
        std::fs::create_dir_all(&scratch).expect("create the scratch directory");
        let model = |id: &str| {
            let pid_file = scratch.join(format!("{id}.pids"));
            let mut m = ModelConfig::new(
                id,
                vec![
                    fake.display().to_string(),
                    "--port".into(),
                    "${PORT}".into(),
                    "--startup-delay".into(),
                    "0".into(),
                    "--pid-file".into(),
                    pid_file.display().to_string(),
                ],
            );
            m.ttl = None; // never idled out during a run
            m.startup_timeout = Duration::from_secs(20);
            m.stop_timeout = Duration::from_secs(2);
            m
        };
        // Ports away from the default range, so a daemon or tests running meanwhile are not
        // disturbed. The models are added in code.
        let state_dir = toml::Value::String(scratch.join("state").display().to_string());
        let text = format!("state_dir = {state_dir}\nport_range = [31500, 31599]\n");
        let mut config = llmvisor::config::parse(&text, None).expect("bench config");
        config.models = vec![model(COLD), model(WARM)];

        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let sup = rt.block_on(Supervisor::new(&config)).expect("supervisor");
        // Start the warm model once, before anything is measured.
        drop(
            rt.block_on(sup.acquire(WARM))
                .expect("start the warm model"),
        );
        Env {
            rt,
            sup,
            scratch,
            cold_samples: AtomicUsize::new(0),
            cold_ready_ms: Mutex::new(Vec::new()),
        }
    }

    fn spawns(&self, model: &str) -> usize {
        pids(&self.scratch.join(format!("{model}.pids"))).len()
    }

    /// Notes how long the cold model's last start took, if it is running.
    fn record_cold_ready_ms(&self) {
        let cell = self.sup.model(COLD).unwrap();
        if let (Phase::Ready, Some(ms)) = (cell.phase(), cell.status().ready_ms) {
            self.cold_ready_ms.lock().unwrap().push(ms);
        }
    }

    /// Shuts the supervisor down, checks the bookkeeping, removes the scratch directory.
    fn finish(&self) {
        let cold_samples = self.cold_samples.load(Ordering::SeqCst);
        let (cold_spawns, warm_spawns) = (self.spawns(COLD), self.spawns(WARM));
        self.record_cold_ready_ms();
        self.rt.block_on(self.sup.shutdown());
        let all: Vec<u32> = [COLD, WARM]
            .iter()
            .flat_map(|m| pids(&self.scratch.join(format!("{m}.pids"))))
            .collect();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while all.iter().any(|&p| llmvisor::procfs::is_alive(p)) {
            assert!(
                std::time::Instant::now() < deadline,
                "fake servers still alive after shutdown: {all:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = std::fs::remove_dir_all(&self.scratch);
        let mut ready_ms = self.cold_ready_ms.lock().unwrap().clone();
        if !ready_ms.is_empty() {
            ready_ms.sort_unstable();
            eprintln!(
                "cold starts: the supervisor's ready_ms (spawn → ready), sorted: {ready_ms:?} \
                 (median {} ms)",
                ready_ms[ready_ms.len() / 2]
            );
        }
        eprintln!(
            "spawns: {warm_spawns} for `{WARM}` (expected 1); {cold_spawns} for `{COLD}` over \
             {cold_samples} cold samples (expected one per sample); all servers stopped"
        );
        assert_eq!(warm_spawns, 1, "the warm model must have been started once");
        assert_eq!(cold_spawns, cold_samples, "one spawn per cold sample");
    }
}

/// The fake server: `$FAKE_LLM_BIN`, else next to this bench's profile directory
/// (`target/release` under `cargo bench`), else `target/debug`.
fn fake_llm() -> PathBuf {
    let candidates = match std::env::var_os("FAKE_LLM_BIN") {
        Some(p) => vec![PathBuf::from(p)],
        None => {
            // target/<profile>/deps/acquire-<hash> → target/<profile>
            let exe = std::env::current_exe().expect("current_exe");
            let profile_dir = exe.parent().and_then(Path::parent).expect("target dir");
            let target = profile_dir.parent().unwrap_or(profile_dir);
            vec![
                profile_dir.join("fake-llm"),
                target.join("release").join("fake-llm"),
                target.join("debug").join("fake-llm"),
            ]
        }
    };
    candidates
        .iter()
        .find(|p| p.exists())
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "fake-llm not found (looked at {candidates:?}): \
                 run `cargo build --release -p fake-llm` first, or set FAKE_LLM_BIN"
            )
        })
}

/// Pids appended to a pid file, one a line.
fn pids(path: &Path) -> Vec<u32> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

mod ready {
    use super::*;

    /// A lease held for the whole benchmark, so the measured drops are never the last one.
    fn hold_other(env: &Env, other_lease_held: bool) -> Option<Lease> {
        other_lease_held.then(|| env.sup.model(WARM).unwrap().try_acquire_ready().unwrap())
    }

    /// `ModelCell::try_acquire_ready()` + drop: the lock-and-count fast path alone.
    #[divan::bench(threads = [1, 2], args = [false, true])]
    fn fast_path(bencher: Bencher, other_lease_held: bool) {
        let env = env();
        let cell = env.sup.model(WARM).unwrap();
        let _other = hold_other(env, other_lease_held);
        bencher.bench(|| drop(divan::black_box(cell.try_acquire_ready().unwrap())));
    }

    /// `sup.acquire("warm")` polled once (a ready model never makes it wait) + drop.
    #[divan::bench(threads = [1, 2], args = [false, true])]
    fn acquire_polled_once(bencher: Bencher, other_lease_held: bool) {
        let env = env();
        let _other = hold_other(env, other_lease_held);
        bencher.bench(|| {
            let lease = env.sup.acquire(WARM).now_or_never().unwrap().unwrap();
            drop(divan::black_box(lease));
        });
    }

    /// `rt.block_on(sup.acquire("warm"))` + drop.
    #[divan::bench(threads = [1, 2], args = [false, true])]
    fn acquire_block_on(bencher: Bencher, other_lease_held: bool) {
        let env = env();
        let _other = hold_other(env, other_lease_held);
        bencher.bench(|| {
            let lease = env.rt.block_on(env.sup.acquire(WARM)).unwrap();
            drop(divan::black_box(lease));
        });
    }
}

mod cold {
    use super::*;

    /// `n` concurrent acquires on a stopped model: time until the last lease is obtained.
    #[divan::bench(args = [1, 1000], sample_count = 25, sample_size = 1)]
    fn concurrent_acquires(bencher: Bencher, n: usize) {
        let env = env();
        bencher
            .with_inputs(|| {
                // Untimed: every earlier sample spawned exactly one server; stop it.
                assert_eq!(
                    env.spawns(COLD),
                    env.cold_samples.load(Ordering::SeqCst),
                    "a cold sample spawned more (or less) than one server"
                );
                env.record_cold_ready_ms();
                env.rt.block_on(env.sup.unload(COLD, true)).unwrap();
            })
            .bench_local_values(|()| {
                let leases: Vec<Lease> = env.rt.block_on(async {
                    let tasks: Vec<_> = (0..n)
                        .map(|_| {
                            let sup = env.sup.clone();
                            tokio::spawn(async move { sup.acquire(COLD).await })
                        })
                        .collect();
                    let mut leases = Vec::with_capacity(n);
                    for t in tasks {
                        leases.push(t.await.unwrap().unwrap());
                    }
                    leases
                });
                env.cold_samples.fetch_add(1, Ordering::SeqCst);
                leases // dropped by divan after the sample is timed
            });
    }
}
