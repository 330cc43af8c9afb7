//! The supervisor: one owner per model, leases, and the shutdown of everything it started.
//!
//! ```text
//! Supervisor ──id/alias──▶ ModelCell ◀──── Lease (Drop → release)
//!                               │ messages
//!                               ▼
//!                          model actor ──tasks──▶ start (ports, spawn, readiness) / stop
//! ```
//!
//! Each model has one actor task that alone changes its lifecycle; models never share a lock, so
//! different models start in parallel and a ready model is handed out without waiting on anyone.
//!
//! Shutdown protocol: [`Supervisor::shutdown`] retires every actor at once; each fails its
//! waiters, stops its server (SIGTERM to the group, `stop_timeout`, SIGKILL) and replies; the call
//! returns when all have. Dropping the last `Supervisor` clone without that SIGKILLs every
//! remaining group synchronously, and the end of the spawner thread makes the kernel kill any
//! child still alive (parent-death signal) — also when the whole process is SIGKILLed.

mod actor;
mod admission;
mod cell;
mod cmd_stop;
#[cfg(test)]
mod double;
mod error;
mod gpu_env;
pub mod kv;
mod lease;
mod lifecycle;
pub mod machine;
mod memory;
pub mod oom;
mod policy;
mod server;
mod start;
mod status;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use tokio::task::JoinHandle;

pub use cell::{Counters, ModelCell};
pub use error::AcquireError;
pub use lease::{KvCheck, Lease};
pub use status::{ModelStatus, Phase};

use crate::config::{Config, ModelConfig};
use crate::gpu::GpuProbe;
use crate::logs::LogSink;
use crate::owner::{OwnerError, OwnerLock};
use crate::ports::PortAllocator;
use crate::reaper::{self, Registry};
use crate::spawn::Spawner;
use crate::store::{InstanceRecord, Store, StoreError};
use crate::sweep;
use crate::sync::{LockExt, RwLockExt};
use crate::upstream::{self, UpstreamClient};
use admission::{Admission, Limits, Msg as AdmissionMsg};
pub use machine::Machine;
pub use memory::{measure_group, Measured, Memory, MemoryDetail};

#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("cannot use state directory {}: {source} (fix: create it and make it writable, or pass --state-dir)", path.display())]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the spawner thread: {0}")]
    Spawner(#[source] std::io::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Owner(#[from] OwnerError),
}

/// [dashboard hook] Phase changes buffered for slow `Supervisor::changes` receivers.
pub(crate) const CHANGES_CAPACITY: usize = 1024;

/// What every model's actor and tasks share.
pub(crate) struct Context {
    pub instance_id: Arc<str>,
    pub store: Store,
    pub admission: Admission,
    pub spawner: Spawner,
    pub ports: PortAllocator,
    pub client: UpstreamClient,
    pub registry: Registry,
    pub state_dir: PathBuf,
    /// How servers are started: real processes, or a test double in the actor's unit tests.
    pub launcher: start::Launcher,
    /// [dashboard hook] Every phase change's full status, for `/api/events` (`Supervisor::changes`).
    pub changes: tokio::sync::broadcast::Sender<ModelStatus>,
    /// `kv_saved` / `kv_restored` / … events, for `/api/events` (`Supervisor::kv_events`).
    pub kv_events: tokio::sync::broadcast::Sender<kv::KvEvent>,
    /// `kv_disk_budget`: bytes of saved KV state under `<state_dir>/kv`, all models together.
    pub kv_budget: std::sync::atomic::AtomicU64,
    /// The machine as it was when this supervisor started (`memory_budget = "auto"`).
    pub machine: Machine,
    /// The memory budget in force (bytes; resolved against `machine`).
    pub memory_budget: Mutex<Option<u64>>,
    /// The OOM-kill count of llmvisor's cgroup (`last_exit = "oom"`).
    pub oom: oom::OomCounter,
    /// What each server holds on the GPUs (NVML), measured with its RAM.
    pub gpu: Arc<dyn GpuProbe>,
    /// `gpu_budget` is set (and GPUs were found): models are placed on GPUs by admission.
    pub gpus_placed: std::sync::atomic::AtomicBool,
}

impl Context {
    /// Drops a child's record from the state store once it is gone (in the background: the
    /// store serialises its writes, and this one was issued after the record was written).
    pub fn forget_child(&self, pid: u32, port: Option<u16>) {
        let (store, instance) = (self.store.clone(), self.instance_id.clone());
        tokio::spawn(async move {
            if let Err(e) = store.remove_child(&instance, pid).await {
                tracing::warn!(
                    pid,
                    "cannot remove the child's record from the state store: {e}"
                );
            }
            if let Some(port) = port {
                let _ = store.release_port(port, &instance).await;
            }
        });
    }

    /// Gives up this instance's claim on `model` (its server is gone), in the background.
    pub fn release_claim(&self, model: &str) {
        let store = self.store.clone();
        let (instance, model) = (self.instance_id.clone(), model.to_owned());
        tokio::spawn(async move {
            if let Err(e) = store.release_claim(&model, &instance).await {
                tracing::warn!(
                    model,
                    "cannot release the model's claim in the state store: {e}"
                );
            }
        });
    }

    pub fn socket_path(&self, model: &str) -> PathBuf {
        self.state_dir
            .join("sockets")
            .join(format!("{}.sock", crate::ids::encode_segment(model)))
    }
}

/// The handle apps and the daemon use. Cheap to clone.
#[derive(Clone)]
pub struct Supervisor {
    shared: Arc<Shared>,
}

struct Shared {
    ctx: Arc<Context>,
    models: RwLock<Models>,
    actors: Mutex<Vec<JoinHandle<()>>>,
    reaper: JoinHandle<()>,
    instance_id: String,
    /// Held for the life of this instance: how other processes know it is alive.
    _owner: OwnerLock,
}

#[derive(Default)]
struct Models {
    /// Ids and aliases → cell.
    by_name: HashMap<String, Arc<ModelCell>>,
    /// Configured models in id order.
    ordered: Vec<(Arc<ModelConfig>, Arc<ModelCell>)>,
}

impl Models {
    fn insert(&mut self, cfg: Arc<ModelConfig>, cell: Arc<ModelCell>) {
        self.by_name.insert(cfg.id.clone(), cell.clone());
        for alias in &cfg.aliases {
            self.by_name.insert(alias.clone(), cell.clone());
        }
        self.ordered.push((cfg, cell));
        self.ordered.sort_by(|a, b| a.0.id.cmp(&b.0.id));
    }

    fn ids(&self) -> Vec<String> {
        self.ordered.iter().map(|(c, _)| c.id.clone()).collect()
    }
}

impl Supervisor {
    /// Creates the supervisor for `config`: takes this instance's owner lock in the state dir,
    /// opens the state store, and sweeps what dead instances left behind (logged). Starts no
    /// server (preloading is the caller's choice). Must run inside a tokio runtime.
    pub async fn new(config: &Config) -> Result<Self, SupervisorError> {
        let probe: Arc<dyn GpuProbe> = Arc::from(crate::gpu::probe());
        Self::with_machine(config, Machine::read(&*probe), probe).await
    }

    /// [`Self::new`] against the given machine figures and GPU probe instead of this
    /// machine's (tests).
    pub async fn with_machine(
        config: &Config,
        machine: Machine,
        gpu: Arc<dyn GpuProbe>,
    ) -> Result<Self, SupervisorError> {
        let state_dir = config.state_dir.clone();
        for dir in [
            state_dir.clone(),
            state_dir.join("logs"),
            state_dir.join("sockets"),
        ] {
            crate::statedir::ensure(&dir).map_err(|e| SupervisorError::StateDir {
                source: e.into(),
                path: dir.clone(),
            })?;
        }
        let instance_id = new_instance_id();
        let owner = OwnerLock::acquire(&state_dir, &instance_id)?;
        let store = Store::open(&state_dir).await?;
        store
            .register_instance(&InstanceRecord::current(&instance_id))
            .await?;
        let report = sweep::run(&state_dir, &store, Some(&instance_id), false).await;
        if !report.stopped().is_empty() || report.has_errors() {
            tracing::warn!("orphan sweep of {}:\n{report}", state_dir.display());
        } else {
            tracing::debug!("orphan sweep of {}: {report}", state_dir.display());
        }
        let spawner = Spawner::start(&instance_id).map_err(SupervisorError::Spawner)?;
        let ports = PortAllocator::new(config.port_range);
        ports.set_reserved(config.models.iter().filter_map(|m| m.port));
        let registry = Registry::default();
        let reaper = reaper::start(registry.clone());
        let gpus_placed = !machine.gpu_budgets(config).is_empty();
        let ctx = Arc::new(Context {
            instance_id: instance_id.as_str().into(),
            store,
            admission: Admission::start(Limits::from_config(config, &machine)),
            spawner,
            ports,
            client: upstream::client(),
            registry,
            state_dir,
            launcher: start::Launcher::Process,
            changes: tokio::sync::broadcast::channel(CHANGES_CAPACITY).0,
            kv_events: tokio::sync::broadcast::channel(kv::EVENTS_CAPACITY).0,
            kv_budget: config.kv_disk_budget.into(),
            memory_budget: Mutex::new(machine.memory_budget(config).bytes),
            machine,
            oom: oom::OomCounter::own_cgroup(),
            gpu,
            gpus_placed: gpus_placed.into(),
        });
        clean_kv(&ctx.state_dir, config);
        let mut models = Models::default();
        let mut actors = Vec::new();
        for m in &config.models {
            let cfg = Arc::new(m.clone());
            let (cell, task) = actor::spawn_model(cfg.clone(), ctx.clone());
            models.insert(cfg, cell);
            actors.push(task);
        }
        ctx.admission.send(AdmissionMsg::Reset {
            cells: models.ordered.iter().map(|(_, c)| c.clone()).collect(),
            limits: Limits::from_config(config, &ctx.machine),
        });
        Ok(Self {
            shared: Arc::new(Shared {
                ctx,
                models: RwLock::new(models),
                actors: Mutex::new(actors),
                reaper,
                instance_id,
                _owner: owner,
            }),
        })
    }

    /// [dashboard hook] The status of a model after each of its phase changes, in order (the event
    /// stream). A receiver that falls more than a few hundred changes behind gets `Lagged`.
    pub fn changes(&self) -> tokio::sync::broadcast::Receiver<ModelStatus> {
        self.shared.ctx.changes.subscribe()
    }

    /// [dashboard hook] `kv_persist` events (saves, restores, discarded files), in order.
    pub fn kv_events(&self) -> tokio::sync::broadcast::Receiver<kv::KvEvent> {
        self.shared.ctx.kv_events.subscribe()
    }

    /// The id of this llmvisor instance, carried by its children as `LLMVISOR_INSTANCE`.
    pub fn instance_id(&self) -> &str {
        &self.shared.instance_id
    }

    pub fn state_dir(&self) -> &Path {
        &self.shared.ctx.state_dir
    }

    /// The memory budget in force, in bytes: `memory_budget`, or what `"auto"` made of the RAM
    /// available when this supervisor started.
    pub fn memory_budget(&self) -> Option<u64> {
        *self.shared.ctx.memory_budget.locked()
    }

    /// The cell of a model by id or alias.
    pub fn model(&self, name: &str) -> Result<Arc<ModelCell>, AcquireError> {
        let models = self.shared.models.read_locked();
        models
            .by_name
            .get(name)
            .cloned()
            .ok_or_else(|| AcquireError::UnknownModel {
                name: name.to_owned(),
                known: models.ids(),
            })
    }

    /// The configured model ids, in order.
    pub fn model_ids(&self) -> Vec<String> {
        self.shared.models.read_locked().ids()
    }

    /// A lease on `name` (id or alias): at once if it is ready, else after starting it or joining
    /// the start already under way.
    pub async fn acquire(&self, name: &str) -> Result<Lease, AcquireError> {
        self.model(name)?.acquire(false).await
    }

    /// An operator's load: starts the model (skipping any backoff) and waits until it is ready.
    /// Holds no lease afterwards, so the model's TTL starts at once.
    pub async fn load(&self, name: &str) -> Result<ModelStatus, AcquireError> {
        let cell = self.model(name)?;
        let lease = cell.acquire(true).await?;
        drop(lease);
        Ok(cell.status())
    }

    /// Stops a model: once its leases have ended, or at once with `force` (leases then see
    /// their server go). Returns when it is stopped.
    pub async fn unload(&self, name: &str, force: bool) -> Result<ModelStatus, AcquireError> {
        let cell = self.model(name)?;
        let (reply, done) = tokio::sync::oneshot::channel();
        if cell.send(cell::Command::Unload { force, reply }).is_ok() {
            let _ = done.await;
        }
        Ok(cell.status())
    }

    /// Status of every model, in id order.
    pub fn status(&self) -> Vec<ModelStatus> {
        let models = self.shared.models.read_locked();
        models.ordered.iter().map(|(_, c)| c.status()).collect()
    }

    /// A model's server output.
    pub fn logs(&self, name: &str) -> Result<Arc<LogSink>, AcquireError> {
        Ok(self.model(name)?.logs.clone())
    }

    /// Applies a new configuration: unchanged models are left alone, changed ones restart once
    /// their leases end (or just take the new settings if stopped), removed ones stop, new ones
    /// appear. Returns (added, changed, removed) ids.
    pub async fn reconfigure(&self, config: &Config) -> ReloadSummary {
        let mut summary = ReloadSummary::default();
        let mut retired = Vec::new();
        let placed = !self.shared.ctx.machine.gpu_budgets(config).is_empty();
        self.shared
            .ctx
            .gpus_placed
            .store(placed, std::sync::atomic::Ordering::Relaxed);
        let mut applying = Vec::new();
        {
            let mut models = self.shared.models.write_locked();
            let mut next = Models::default();
            let old: HashMap<String, (Arc<ModelConfig>, Arc<ModelCell>)> = models
                .ordered
                .drain(..)
                .map(|(c, cell)| (c.id.clone(), (c, cell)))
                .collect();
            let mut old = old;
            let mut actors = self.shared.actors.locked();
            for m in &config.models {
                let cfg = Arc::new(m.clone());
                match old.remove(&m.id) {
                    Some((prev, cell)) => {
                        if *prev != *cfg {
                            summary.changed.push(m.id.clone());
                            let (applied, done) = tokio::sync::oneshot::channel();
                            let cmd = cell::Command::Reconfigure {
                                cfg: cfg.clone(),
                                applied,
                            };
                            if cell.send(cmd).is_ok() {
                                applying.push(done);
                            }
                        }
                        next.insert(cfg, cell);
                    }
                    None => {
                        summary.added.push(m.id.clone());
                        let (cell, task) = actor::spawn_model(cfg.clone(), self.shared.ctx.clone());
                        actors.push(task);
                        next.insert(cfg, cell);
                    }
                }
            }
            for (id, (_, cell)) in old {
                summary.removed.push(id);
                retired.push(cell);
            }
            self.shared
                .ctx
                .ports
                .set_reserved(config.models.iter().filter_map(|m| m.port));
            let limits = Limits::from_config(config, &self.shared.ctx.machine);
            *self.shared.ctx.memory_budget.locked() = limits.memory_budget;
            self.shared.ctx.admission.send(AdmissionMsg::Reset {
                cells: next.ordered.iter().map(|(_, c)| c.clone()).collect(),
                limits,
            });
            *models = next;
        }
        summary.removed.sort();
        // Every changed model has its new settings before this returns (and the admission
        // scheduler sees them: they live in the cells).
        futures_util::future::join_all(applying).await;
        futures_util::future::join_all(retired.iter().map(|c| retire(c, false))).await;
        self.shared
            .ctx
            .kv_budget
            .store(config.kv_disk_budget, std::sync::atomic::Ordering::Relaxed);
        clean_kv(&self.shared.ctx.state_dir, config);
        summary
    }

    /// Stops every server, all in parallel, and waits for them. Acquires fail afterwards.
    pub async fn shutdown(&self) {
        let cells: Vec<Arc<ModelCell>> = {
            let models = self.shared.models.read_locked();
            models.ordered.iter().map(|(_, c)| c.clone()).collect()
        };
        futures_util::future::join_all(cells.iter().map(|c| retire(c, true))).await;
        // Everything is stopped: nothing of this instance is left to sweep.
        if let Err(e) = self
            .shared
            .ctx
            .store
            .remove_instance(&self.shared.instance_id)
            .await
        {
            tracing::warn!("cannot remove this instance from the state store: {e}");
        }
    }
}

/// Removes the saved KV state of models that are gone from `config` or no longer persist it,
/// and saves cut short by a crash.
fn clean_kv(state_dir: &Path, config: &Config) {
    let keep: Vec<String> = config
        .models
        .iter()
        .filter(|m| m.kv_persist)
        .map(|m| m.id.clone())
        .collect();
    for gone in kv::dir::clean(state_dir, Some(&keep)) {
        tracing::info!("removed saved KV state {}", gone.display());
    }
}

async fn retire(cell: &ModelCell, keep_kv: bool) {
    let (reply, done) = tokio::sync::oneshot::channel();
    if cell.send(cell::Command::Retire { reply, keep_kv }).is_ok() {
        let _ = done.await;
    }
}

/// What a reconfiguration did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReloadSummary {
    pub added: Vec<String>,
    pub changed: Vec<String>,
    pub removed: Vec<String>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Synchronous last resort: whatever was not stopped by `shutdown` dies now.
        self.ctx.registry.kill_all();
        for task in self.actors.locked().drain(..) {
            task.abort();
        }
        self.reaper.abort();
    }
}

/// A unique id for this llmvisor instance: pid plus randomness (pids are recycled).
fn new_instance_id() -> String {
    format!("lv-{}-{}", std::process::id(), crate::ids::random_hex(8))
}
