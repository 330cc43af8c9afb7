//! One start of one model's server: address, spawn, readiness — with retries on port races.

use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

use super::actor::ERROR_TAIL_LINES;
use super::cell::ModelCell;
use super::error::AcquireError;
use super::server::{RemoteServer, Server};
use super::Context;
use crate::child::ChildProcess;
use crate::config::{process_env, MacroValues, ModelConfig};
use crate::owner::{self, Liveness};
use crate::ports::{bind_probe, PortClaim};
use crate::readiness::{wait_ready, NotReady};
use crate::spawn::{describe_exit, SpawnSpec};
use crate::store::{ChildRecord, ClaimOutcome};
use crate::sweep;
use crate::upstream::Endpoint;

/// How long a failed start waits for the server's last output lines.
const OUTPUT_DRAIN: Duration = Duration::from_millis(500);
/// How often a start waiting for another instance's server checks on it.
const REMOTE_POLL: Duration = Duration::from_millis(50);
/// How long a server whose KV restore got no answer is given to show that it died.
const RESTORE_EXIT_WAIT: Duration = Duration::from_millis(500);
/// Tries per start when the child loses its port to another process between probe and bind.
const PORT_TRIES: usize = 3;

/// A server that became ready.
pub struct Running {
    pub server: Server,
    pub endpoint: Endpoint,
    pub ready_after: Duration,
    pub ready_at: Instant,
    /// Set to true when this server is gone; leases hold receivers.
    pub down_tx: watch::Sender<bool>,
    pub down_rx: watch::Receiver<bool>,
    /// Held for the life of the server: nobody else gets this port meanwhile.
    pub _port: Option<PortClaim>,
    /// `kv_persist`: where this server's slots are saved and how (None: not saved).
    pub kv: Option<Arc<super::kv::KvPlan>>,
}

#[derive(Debug)]
pub enum StartFailure {
    /// Could not even run it (bad config at runtime, exec failure, no port).
    Setup(String),
    Exited {
        status: ExitStatus,
        tail: Vec<String>,
    },
    TimedOut {
        after: Duration,
        tail: Vec<String>,
    },
    Cancelled,
}

impl StartFailure {
    /// How the server process ended, when the start failed because it exited.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        match self {
            StartFailure::Exited { status, .. } => Some(*status),
            _ => None,
        }
    }

    pub fn into_error(self, model: &str) -> AcquireError {
        let model = model.to_owned();
        match self {
            StartFailure::Setup(reason) => AcquireError::StartFailed {
                model,
                reason,
                log_tail: Vec::new(),
                retry_after: None,
            },
            StartFailure::Exited { status, tail } => AcquireError::StartFailed {
                model,
                reason: format!(
                    "the server exited during startup ({})",
                    describe_exit(status)
                ),
                log_tail: tail,
                retry_after: None,
            },
            StartFailure::TimedOut { after, tail } => AcquireError::StartTimeout {
                model,
                after,
                log_tail: tail,
            },
            StartFailure::Cancelled => AcquireError::Unavailable {
                model,
                reason: "its start was cancelled (unloaded or shutting down)".into(),
            },
        }
    }
}

/// Where this start's server will listen.
enum Address {
    Port(PortClaim),
    Socket(PathBuf),
}

/// How a model's server is started.
#[derive(Clone)]
pub(crate) enum Launcher {
    /// A real process: ports, spawn, readiness ([`start_server`]).
    Process,
    /// The actor's unit tests: a scripted stand-in, no process.
    #[cfg(test)]
    Double(Arc<super::double::Launches>),
}

/// Starts `cfg`'s server as `ctx.launcher` says; see [`start_server`].
pub(crate) async fn launch(
    cfg: Arc<ModelConfig>,
    ctx: Arc<Context>,
    cell: Arc<ModelCell>,
    cancel: oneshot::Receiver<()>,
) -> Result<Running, StartFailure> {
    match &ctx.launcher {
        Launcher::Process => start_server(&cfg, &ctx, &cell, cancel).await,
        #[cfg(test)]
        Launcher::Double(launches) => launches.start(&cfg, cancel).await,
    }
}

/// Starts `cfg`'s server and waits until it is ready, the start fails, or `cancel` fires (a
/// message or the sender being dropped). Never leaves a process behind on failure.
pub async fn start_server(
    cfg: &ModelConfig,
    ctx: &Arc<Context>,
    cell: &ModelCell,
    mut cancel: oneshot::Receiver<()>,
) -> Result<Running, StartFailure> {
    let began = Instant::now();
    let deadline = began + cfg.startup_timeout;
    // One server per model across every llmvisor process on this state dir.
    loop {
        match ctx.store.claim_model(&cfg.id, &ctx.instance_id).await {
            Ok(ClaimOutcome::HeldBy(owner)) => {
                match attach_remote(cfg, ctx, &owner, began, deadline, &mut cancel).await? {
                    Some(running) => return Ok(running),
                    None => continue, // its owner is gone: claim again
                }
            }
            Ok(ClaimOutcome::TakenOver { from }) => {
                // Its dead owner's escaped processes could hold the port or the GPU: sweep first.
                tracing::info!(model = %cfg.id, dead_owner = %from, "taking over the model from a dead instance");
                let report =
                    sweep::run(&ctx.state_dir, &ctx.store, Some(&ctx.instance_id), false).await;
                if !report.stopped().is_empty() {
                    tracing::warn!("orphan sweep before taking over `{}`:\n{report}", cfg.id);
                }
                break;
            }
            Ok(ClaimOutcome::Claimed) => break,
            Err(e) => {
                tracing::warn!(model = %cfg.id, "cannot claim the model in the state store ({e}); starting it anyway");
                break;
            }
        }
    }
    let started = start_local(cfg, ctx, cell, &mut cancel, began, deadline).await;
    if started.is_err() {
        ctx.release_claim(&cfg.id);
    }
    started
}

/// Waits for `owner`'s server of this model to be ready and attaches to it. `None` if the
/// owner died or gave up the claim meanwhile (the caller claims again).
async fn attach_remote(
    cfg: &ModelConfig,
    ctx: &Arc<Context>,
    owner: &str,
    began: Instant,
    deadline: Instant,
    cancel: &mut oneshot::Receiver<()>,
) -> Result<Option<Running>, StartFailure> {
    loop {
        if owner::probe(&ctx.state_dir, owner) != Liveness::Alive {
            return Ok(None);
        }
        if let Ok(holder) = ctx.store.claim_holder(&cfg.id).await {
            if holder.as_deref() != Some(owner) {
                return Ok(None);
            }
        }
        let children = ctx.store.children().await.unwrap_or_default();
        // Its record says ready, and its process is there: an owner killed a moment ago still
        // holds its lock for a few milliseconds after its server died.
        let ready = children.iter().find(|c| {
            c.instance_id == owner
                && c.model == cfg.id
                && c.state == "ready"
                && RemoteServer::process_alive(c.pid, c.start_time)
        });
        if let Some(rec) = ready {
            let endpoint = match (&rec.socket, rec.port) {
                (Some(path), _) => Some(Endpoint::Unix(path.as_path().into())),
                (None, Some(port)) => Some(Endpoint::Tcp(([127, 0, 0, 1], port).into())),
                (None, None) => None,
            };
            if let Some(endpoint) = endpoint {
                let remote =
                    RemoteServer::attach(ctx, &cfg.id, owner, rec.pid, rec.start_time).await;
                tracing::info!(model = %cfg.id, owner, pid = rec.pid, url = %endpoint.base_url(), "using the server of another llmvisor instance");
                let (down_tx, down_rx) = watch::channel(false);
                return Ok(Some(Running {
                    server: Server::Remote(remote),
                    endpoint,
                    ready_after: began.elapsed(),
                    ready_at: Instant::now(),
                    down_tx,
                    down_rx,
                    _port: None,
                    kv: None, // another instance's server: its owner saves it
                }));
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(REMOTE_POLL) => {}
            _ = tokio::time::sleep_until(deadline) => {
                return Err(StartFailure::TimedOut { after: cfg.startup_timeout, tail: Vec::new() });
            }
            _ = &mut *cancel => return Err(StartFailure::Cancelled),
        }
    }
}

/// Starts our own server for the model.
async fn start_local(
    cfg: &ModelConfig,
    ctx: &Arc<Context>,
    cell: &ModelCell,
    cancel: &mut oneshot::Receiver<()>,
    began: Instant,
    deadline: Instant,
) -> Result<Running, StartFailure> {
    let logs = cell.logs.clone();
    let mut avoid: Vec<u16> = Vec::new();
    for attempt in 1..=PORT_TRIES {
        let address = claim_address(cfg, ctx, &mut avoid).await?;
        let (port, socket) = match &address {
            Address::Port(c) => (Some(c.port()), None),
            Address::Socket(p) => (None, Some(p.as_path())),
        };
        let mut spec = expand_spec(cfg, port, socket)?;
        let kv = if cfg.kv_persist {
            match super::kv::prepare(&ctx.state_dir, cfg, &mut spec) {
                Ok(plan) => Some(Arc::new(plan)),
                Err(e) => {
                    tracing::warn!(model = %cfg.id, "kv_persist: {e}; started without it");
                    None
                }
            }
        } else {
            None
        };
        logs.push(format!(
            "llmvisor: starting {} (attempt {attempt}): {} {}",
            cfg.id,
            spec.program,
            spec.args.join(" ")
        ));
        let (_, output) = logs.follow();
        let child = ctx
            .spawner
            .spawn(spec)
            .await
            .map_err(|e| StartFailure::Setup(e.to_string()))?;
        let process = Arc::new(ChildProcess::launch(
            child,
            logs.clone(),
            ctx.registry.clone(),
        ));
        // Every server is in the store before it can be used, so a later llmvisor on this state
        // dir can prove it ours and stop it if this one dies.
        record_child(ctx, cfg, process.pid(), port, socket, "starting").await;
        let endpoint = match &address {
            Address::Port(c) => Endpoint::Tcp(([127, 0, 0, 1], c.port()).into()),
            Address::Socket(p) => Endpoint::Unix(p.as_path().into()),
        };
        let ready = tokio::select! {
            r = wait_ready(&ctx.client, &endpoint, &cfg.health_path, deadline, process.exited(), output) => r,
            _ = &mut *cancel => {
                process.stop(cfg.stop_timeout).await;
                ctx.forget_child(process.pid(), port);
                return Err(StartFailure::Cancelled);
            }
        };
        // A step of Starting (kv_persist): the saved conversations are back before anyone is
        // served. A server that dies loading a file (then discarded) is started again.
        let mut died_restoring = false;
        let ready = match (ready, &kv) {
            (Ok(()), Some(plan)) => {
                let answered = super::kv::restore(plan, &cell.kv, &ctx.client, &endpoint).await;
                let exited = tokio::time::timeout(RESTORE_EXIT_WAIT, process.exited());
                match if answered { None } else { exited.await.ok() } {
                    Some(status) => {
                        tracing::warn!(model = %cfg.id, "the server died loading saved KV state ({}); the file is discarded, starting it again", describe_exit(status));
                        died_restoring = true;
                        Err(NotReady::Exited(status))
                    }
                    None => Ok(()),
                }
            }
            (ready, _) => ready,
        };
        if ready.is_ok() {
            let marked = ctx
                .store
                .set_child_state(&ctx.instance_id, process.pid(), "ready")
                .await;
            if let Err(e) = marked {
                tracing::warn!(model = %cfg.id, "cannot update the state store: {e}");
            }
        } else {
            // Whatever happens below, this process is (about to be) gone.
            ctx.forget_child(process.pid(), port);
        }
        match ready {
            Ok(()) => {
                let (down_tx, down_rx) = watch::channel(false);
                return Ok(Running {
                    server: Server::Local(process),
                    endpoint,
                    ready_after: began.elapsed(),
                    ready_at: Instant::now(),
                    down_tx,
                    down_rx,
                    _port: match address {
                        Address::Port(c) => Some(c),
                        Address::Socket(_) => None,
                    },
                    kv,
                });
            }
            Err(NotReady::TimedOut) => {
                process.stop(cfg.stop_timeout).await;
                return Err(StartFailure::TimedOut {
                    after: cfg.startup_timeout,
                    tail: logs.tail(ERROR_TAIL_LINES),
                });
            }
            Err(NotReady::Exited(status)) => {
                process.kill_group_and_wait().await;
                process.output_drained(OUTPUT_DRAIN).await;
                // Lost a race for the port? Someone else holds it now; try another one.
                let port_taken = cfg.port.is_none() && port.is_some_and(|p| !bind_probe(p));
                if died_restoring && attempt < PORT_TRIES {
                    logs.push("llmvisor: the server died loading saved KV state; starting it again without it".into());
                    continue;
                }
                if port_taken && attempt < PORT_TRIES {
                    let p = port.expect("checked above");
                    tracing::info!(model = %cfg.id, port = p, "port was taken during startup; retrying on another");
                    logs.push(format!(
                        "llmvisor: port {p} was taken by another process; retrying on another port"
                    ));
                    avoid.push(p);
                    continue;
                }
                return Err(StartFailure::Exited {
                    status,
                    tail: logs.tail(ERROR_TAIL_LINES),
                });
            }
        }
    }
    unreachable!("the last attempt returns")
}

async fn record_child(
    ctx: &Context,
    cfg: &ModelConfig,
    pid: u32,
    port: Option<u16>,
    socket: Option<&std::path::Path>,
    state: &str,
) {
    let Some(rec) = ChildRecord::of_process(
        &ctx.instance_id,
        &cfg.id,
        pid,
        port,
        socket.map(PathBuf::from),
        state,
    ) else {
        return; // already gone; the start fails on its own
    };
    if let Err(e) = ctx.store.record_child(&rec).await {
        tracing::warn!(model = %cfg.id, pid, "cannot record the server in the state store: {e}");
    }
}

async fn claim_address(
    cfg: &ModelConfig,
    ctx: &Context,
    avoid: &mut Vec<u16>,
) -> Result<Address, StartFailure> {
    if cfg.uses_socket() {
        let path = ctx.socket_path(&cfg.id);
        // A stale socket from an earlier run would make the server's bind fail.
        let _ = std::fs::remove_file(&path);
        return Ok(Address::Socket(path));
    }
    loop {
        let claim = match cfg.port {
            Some(p) => ctx.ports.claim_fixed(p),
            None => ctx.ports.claim(avoid),
        }
        .map_err(|e| StartFailure::Setup(e.to_string()))?;
        // Other llmvisor processes on this state dir hand out ports too: the store decides.
        let port = claim.port();
        match ctx.store.claim_port(port, &ctx.instance_id, &cfg.id).await {
            Ok(true) => return Ok(Address::Port(claim)),
            Ok(false) if cfg.port.is_some() => {
                return Err(StartFailure::Setup(format!(
                    "port {port} is held by another llmvisor instance on this state dir"
                )))
            }
            Ok(false) => avoid.push(port),
            Err(e) => {
                tracing::warn!(
                    port,
                    "cannot claim the port in the state store ({e}); using it anyway"
                );
                return Ok(Address::Port(claim));
            }
        }
    }
}

fn expand_spec(
    cfg: &ModelConfig,
    port: Option<u16>,
    socket: Option<&std::path::Path>,
) -> Result<SpawnSpec, StartFailure> {
    let values = MacroValues {
        port,
        socket,
        model_id: &cfg.id,
    };
    let expanded = cfg
        .expand(&values, &process_env)
        .map_err(|e| StartFailure::Setup(e.to_string()))?;
    let mut argv = expanded.argv.into_iter();
    let program = argv
        .next()
        .ok_or_else(|| StartFailure::Setup("cmd is empty".into()))?;
    Ok(SpawnSpec {
        program,
        args: argv.collect(),
        env: expanded.env,
        cwd: expanded.cwd.map(PathBuf::from),
    })
}
