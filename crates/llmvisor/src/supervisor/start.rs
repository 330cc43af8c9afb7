//! One start of one model's server: address, spawn, readiness — with retries on port races.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

use super::error::AcquireError;
use super::model::ERROR_TAIL_LINES;
use super::Context;
use crate::child::ChildProcess;
use crate::config::{process_env, MacroValues, ModelConfig};
use crate::logs::LogSink;
use crate::ports::{bind_probe, PortClaim};
use crate::readiness::{wait_ready, NotReady};
use crate::spawn::{describe_exit, SpawnSpec};
use crate::store::ChildRecord;
use crate::upstream::Endpoint;

/// Tries per start when the child loses its port to another process between probe and bind.
const PORT_TRIES: usize = 3;

/// A server that became ready.
pub struct Running {
    pub process: Arc<ChildProcess>,
    pub endpoint: Endpoint,
    pub ready_after: Duration,
    pub ready_at: Instant,
    /// Set to true when this server is gone; leases hold receivers.
    pub down_tx: watch::Sender<bool>,
    pub down_rx: watch::Receiver<bool>,
    /// Held for the life of the server: nobody else gets this port meanwhile.
    pub _port: Option<PortClaim>,
}

#[derive(Debug)]
pub enum StartFailure {
    /// Could not even run it (bad config at runtime, exec failure, no port).
    Setup(String),
    Exited {
        how: String,
        tail: Vec<String>,
    },
    TimedOut {
        after: Duration,
        tail: Vec<String>,
    },
    Cancelled,
}

impl StartFailure {
    pub fn into_error(self, model: &str) -> AcquireError {
        let model = model.to_owned();
        match self {
            StartFailure::Setup(reason) => AcquireError::StartFailed {
                model,
                reason,
                log_tail: Vec::new(),
                retry_after: None,
            },
            StartFailure::Exited { how, tail } => AcquireError::StartFailed {
                model,
                reason: format!("the server exited during startup ({how})"),
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

/// Starts `cfg`'s server and waits until it is ready, the start fails, or `cancel` fires (a
/// message or the sender being dropped). Never leaves a process behind on failure.
pub async fn start_server(
    cfg: &ModelConfig,
    ctx: &Context,
    logs: Arc<LogSink>,
    mut cancel: oneshot::Receiver<()>,
) -> Result<Running, StartFailure> {
    let began = Instant::now();
    let deadline = began + cfg.startup_timeout;
    let mut avoid: Vec<u16> = Vec::new();
    for attempt in 1..=PORT_TRIES {
        let address = claim_address(cfg, ctx, &avoid)?;
        let (port, socket) = match &address {
            Address::Port(c) => (Some(c.port()), None),
            Address::Socket(p) => (None, Some(p.as_path())),
        };
        let spec = expand_spec(cfg, port, socket)?;
        logs.push(format!(
            "llmvisor: starting {} (attempt {attempt}): {} {}",
            cfg.id,
            spec.program,
            spec.args.join(" ")
        ));
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
            r = wait_ready(&ctx.client, &endpoint, &cfg.health_path, deadline, process.exited()) => r,
            _ = &mut cancel => {
                process.stop(cfg.stop_timeout).await;
                ctx.forget_child(process.pid());
                return Err(StartFailure::Cancelled);
            }
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
            ctx.forget_child(process.pid());
        }
        match ready {
            Ok(()) => {
                let (down_tx, down_rx) = watch::channel(false);
                return Ok(Running {
                    process,
                    endpoint,
                    ready_after: began.elapsed(),
                    ready_at: Instant::now(),
                    down_tx,
                    down_rx,
                    _port: match address {
                        Address::Port(c) => Some(c),
                        Address::Socket(_) => None,
                    },
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
                // Lost a race for the port? Someone else holds it now; try another one.
                let port_taken = cfg.port.is_none() && port.is_some_and(|p| !bind_probe(p));
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
                    how: describe_exit(status),
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

fn claim_address(cfg: &ModelConfig, ctx: &Context, avoid: &[u16]) -> Result<Address, StartFailure> {
    if cfg.uses_socket() {
        let path = ctx.socket_path(&cfg.id);
        // A stale socket from an earlier run would make the server's bind fail.
        let _ = std::fs::remove_file(&path);
        return Ok(Address::Socket(path));
    }
    let claim = match cfg.port {
        Some(p) => ctx.ports.claim_fixed(p),
        None => ctx.ports.claim(avoid),
    };
    claim
        .map(Address::Port)
        .map_err(|e| StartFailure::Setup(e.to_string()))
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
