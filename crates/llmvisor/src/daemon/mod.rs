//! `llmvisor serve`: the OpenAI-compatible router over the supervisor.
//!
//! [`run`] serves a listener until a shutdown future resolves and is what tests use with a
//! `127.0.0.1:0` listener; [`serve_forever`] is the binary's entry: config, signals, preload.
//!
//! Shutdown protocol (SIGINT/SIGTERM, or the `shutdown` future of [`run`]):
//! 1. stop accepting connections;
//! 2. let in-flight requests finish, up to `shutdown_grace`; then drop the rest;
//! 3. end HTTP leases and stop every server (`Supervisor::shutdown`: in parallel, each with
//!    SIGTERM to its group, `stop_timeout`, SIGKILL);
//! 4. return (the binary exits 0).

mod api;
mod auth;
mod body_guard;
mod browser;
mod conn;
mod dashboard;
pub mod discovery;
mod error;
mod extract;
pub mod fleet;
mod leases;
mod llama_swap;
mod memory_metrics;
mod multipart;
mod ollama;
mod proxy;
mod redact;
mod state;
mod subscribers;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, delete, get, post};
use axum::Router;
use http::Request;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};

pub use error::ApiError;
pub use ollama::tags_json;
pub use proxy::routed_model;
pub use state::AppState;

use crate::config::{self, Config, ConfigErrors};
use crate::supervisor::{Supervisor, SupervisorError};

/// The client's address, in every request's extensions.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

/// A slow client gets this long to send its request headers (a connection that never finishes
/// them holds a client slot no longer than this).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{0}")]
    Config(#[from] ConfigErrors),
    #[error("refusing to listen on {0} without api_keys: anyone on the network could use your models (fix: set api_keys in the config, or allow_insecure = true if you really mean it)")]
    Insecure(SocketAddr),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Supervisor(#[from] SupervisorError),
    #[error("cannot install signal handlers: {0}")]
    Signals(#[source] std::io::Error),
    #[error("{0}")]
    Fleet(String),
    #[error(transparent)]
    Discovery(#[from] crate::discover::NoLlamaServer),
}

/// The router with every route of SPEC.md.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/healthz", get(api::healthz))
        .route("/metrics", get(llama_swap::metrics))
        .route("/v1/models", get(api::v1_models))
        .route("/v1/{*rest}", post(proxy::v1))
        // Ids may hold `/` (`Qwen/Qwen3-8B`), raw or percent-encoded: one catch-all each, split
        // by the handler (see proxy::upstream and api::model_get).
        .route("/upstream/{*rest}", any(proxy::upstream))
        .route("/api/models", get(api::models))
        .route(
            "/api/models/{*rest}",
            get(api::model_get).post(api::model_post),
        )
        .route("/api/leases", post(api::create_lease))
        .route("/api/leases/{id}/renew", post(api::renew_lease))
        .route("/api/leases/{id}", delete(api::release_lease))
        .route("/api/cluster", get(fleet::cluster))
        // llama-swap's endpoints and llama-server's own routes.
        .merge(llama_swap::routes())
        .merge(ollama::routes())
        .merge(dashboard::routes())
        .fallback(|| async {
            ApiError::not_found("no such route (see GET /v1/models and /api/models)")
        })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state)
}

/// Every request: browser rules (`Host`, `Origin`, CORS preflight), then API keys; counts its
/// status.
async fn guard(
    State(st): State<Arc<AppState>>,
    req: axum::extract::Request,
    next: Next,
) -> Response {
    let cfg = st.config();
    let scope = auth::scope_of(req.uri().path());
    let keyless = auth::allowed(
        scope,
        &http::HeaderMap::new(),
        &cfg.api_keys,
        &cfg.admin_keys,
    );
    // The dashboard's assets and /healthz hold no secret: with keys set they answer any Host.
    let has_keys = !(cfg.api_keys.is_empty() && cfg.admin_keys.is_empty());
    let host_rule = keyless && !(scope == auth::Scope::Open && has_keys);
    let browser_guard = browser::Guard {
        host: host_rule,
        ambient: host_rule || (scope != auth::Scope::Open && auth::is_basic(req.headers())),
    };
    let origin = req.headers().get(http::header::ORIGIN).cloned();
    let mut resp = if let Err(e) = browser::check(
        req.method(),
        req.uri(),
        req.headers(),
        browser_guard,
        &cfg.http.cors_origins,
    ) {
        e.into_response()
    } else if origin.is_some() && browser::is_preflight(req.method(), req.headers()) {
        let mut r = http::StatusCode::NO_CONTENT.into_response();
        browser::preflight_headers(r.headers_mut());
        r
    } else {
        // A node-to-node hop is verified first, before any header is stripped or read.
        let pass = match fleet::admit_hop(&st, req).await {
            fleet::HopAdmission::Hop(req) => Ok(req),
            fleet::HopAdmission::Refused(resp) => Err(resp),
            fleet::HopAdmission::NotAHop(req)
                if auth::allowed(scope, req.headers(), &cfg.api_keys, &cfg.admin_keys) =>
            {
                Ok(req)
            }
            fleet::HopAdmission::NotAHop(_) => Err(ApiError::unauthorized().into_response()),
        };
        drop(cfg);
        match pass {
            Ok(req) => next.run(req).await,
            Err(resp) => resp,
        }
    };
    if let Some(o) = origin.filter(|_| resp.status() != http::StatusCode::FORBIDDEN) {
        browser::cors_headers(resp.headers_mut(), &o);
    }
    st.metrics.count_status(resp.status().as_u16());
    resp
}

/// Serves `listener` until `shutdown` resolves, then drains and stops every server (see the
/// module doc).
pub async fn run(listener: TcpListener, state: Arc<AppState>, shutdown: impl Future<Output = ()>) {
    if let Ok(addr) = listener.local_addr() {
        state.set_bound(addr);
    }
    let app = router(state.clone());
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    let cfg = state.config();
    // Open client connections; past the cap, new ones wait in the kernel's accept queue.
    let slots = Arc::new(tokio::sync::Semaphore::new(cfg.http.max_clients));
    let peers = conn::PeerCounts::default();
    loop {
        let slot = tokio::select! {
            s = slots.clone().acquire_owned() => match s {
                Ok(s) => s,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Over its address's share the connection is closed at once, its slot given back.
        let Some(peer_slot) = peers.enter(peer.ip(), state.config().http.max_clients_per_peer)
        else {
            tracing::debug!(%peer, "closing a connection over max_clients_per_peer");
            continue;
        };
        conn::tune(&stream);
        let io = conn::SendTimeout::new(stream, state.config().http.send_timeout);
        let app = app.clone();
        let service = hyper::service::service_fn(move |mut req: Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(Peer(peer));
            tower_service::Service::call(&mut app.clone(), req)
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .serve_connection(TokioIo::new(io), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("connection ended: {e}");
            }
            drop(slot);
            drop(peer_slot);
        });
    }
    drop(cfg);
    drop(listener);
    let grace = state.config().shutdown_grace;
    tracing::info!(
        "shutting down: waiting up to {} for in-flight requests",
        crate::units::format_duration(grace)
    );
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            "in-flight requests did not finish within {}; stopping anyway",
            crate::units::format_duration(grace)
        );
    }
    state.leases.clear();
    // Servers first, then the lease: no other node places a model while it still runs here.
    state.sup.shutdown().await;
    fleet::leave(&state).await;
    tracing::info!("all servers stopped");
}

/// Loads `config_path`, applies the command-line overrides and checks the listen address.
pub fn load_config(
    config_path: &Path,
    listen: Option<SocketAddr>,
    state_dir: Option<PathBuf>,
) -> Result<Config, DaemonError> {
    with_overrides(config::load(config_path)?, listen, state_dir)
}

/// Applies the command-line overrides to a loaded config and checks the listen address.
pub fn with_overrides(
    mut cfg: Config,
    listen: Option<SocketAddr>,
    state_dir: Option<PathBuf>,
) -> Result<Config, DaemonError> {
    if let Some(addr) = listen {
        // A `[cluster] advertise` derived from the config's `listen` follows the override.
        let derived = format!("http://{}", cfg.listen);
        if let Some(c) = cfg.cluster.as_mut().filter(|c| c.advertise == derived) {
            c.advertise = format!("http://{addr}");
        }
        cfg.listen = addr;
    }
    if let Some(dir) = state_dir {
        cfg.state_dir = dir;
    }
    if !cfg.listen.ip().is_loopback() && cfg.api_keys.is_empty() && !cfg.allow_insecure {
        return Err(DaemonError::Insecure(cfg.listen));
    }
    Ok(cfg)
}

/// The daemon: runs the config `loader` gives (its file, if any, and the discovered models)
/// until SIGINT/SIGTERM; SIGHUP and changes in the model folders load it again.
pub async fn serve_forever(loader: discovery::Loader) -> Result<(), DaemonError> {
    let (cfg, found) = loader.load()?;
    raise_open_files_limit();
    let mut term = signal(SignalKind::terminate()).map_err(DaemonError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(DaemonError::Signals)?;
    let mut hup = signal(SignalKind::hangup()).map_err(DaemonError::Signals)?;
    let listener = TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| DaemonError::Listen {
            addr: cfg.listen,
            source,
        })?;
    let addr = listener.local_addr().unwrap_or(cfg.listen);
    let sup = Supervisor::new(&cfg).await?;
    tracing::info!(
        instance = sup.instance_id(),
        state_dir = %cfg.state_dir.display(),
        models = cfg.models.len(),
        discovered = found.found.len(),
        "llmvisor listening on http://{addr}"
    );
    let state = AppState::new(sup, cfg);
    if let Err(e) = fleet::start(&state).await {
        state.sup.shutdown().await;
        return Err(DaemonError::Fleet(e));
    }
    preload(&state);
    // SIGHUP and the folders' changes reload while serving; SIGINT/SIGTERM end `run`.
    let (hup_tx, hup_rx) = tokio::sync::mpsc::unbounded_channel();
    let reloader = tokio::spawn(discovery::reloader(
        state.clone(),
        loader,
        found.roots,
        hup_rx,
    ));
    let hups = tokio::spawn(async move {
        while hup.recv().await.is_some() {
            if hup_tx.send(()).is_err() {
                return;
            }
        }
    });
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    };
    run(listener, state, shutdown).await;
    hups.abort();
    reloader.abort();
    Ok(())
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit: every client connection, upstream
/// connection and child pipe is a descriptor, and the usual soft 1024 is below `max_clients`'
/// default plus what the models need.
pub fn raise_open_files_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut lim = getrlimit(Resource::Nofile);
    if lim.current < lim.maximum {
        let from = lim.current;
        lim.current = lim.maximum;
        match setrlimit(Resource::Nofile, lim) {
            Ok(()) => tracing::debug!("open files limit raised from {from:?} to {:?}", lim.current),
            Err(e) => tracing::warn!("cannot raise the open files limit: {e}"),
        }
    }
}

/// Starts the config's `preload` models in the background (failures are logged).
pub fn preload(state: &AppState) {
    if fleet::preload(state) {
        return;
    }
    for id in state.config().preload.clone() {
        let sup = state.sup.clone();
        tokio::spawn(async move {
            match sup.load(&id).await {
                Ok(_) => tracing::info!(model = %id, "preloaded"),
                Err(e) => tracing::warn!(model = %id, "preload failed: {e}"),
            }
        });
    }
}

/// Applies the config file again (with the discovered models). A file that fails validation
/// changes nothing.
pub async fn reload(
    state: &AppState,
    path: &Path,
    listen: Option<SocketAddr>,
    state_dir: Option<PathBuf>,
) {
    let loader = discovery::Loader {
        path: Some(path.to_owned()),
        listen,
        state_dir,
        models_dirs: Vec::new(),
    };
    loader.reload(state).await;
}

/// Puts a newly loaded config in force: models added, changed and removed (after their leases).
async fn apply(state: &AppState, new: Config) {
    // The listener keeps its address across a reload: the new keys must fit that address, not
    // the one the file names now.
    if let Some(bound) = state.bound() {
        if !bound.ip().is_loopback() && new.api_keys.is_empty() && !new.allow_insecure {
            tracing::error!(
                "config reload rejected; keeping the running config:\n{}",
                DaemonError::Insecure(bound)
            );
            return;
        }
    }
    let old = state.config();
    for (what, changed) in [
        ("listen", old.listen != new.listen),
        ("state_dir", old.state_dir != new.state_dir),
        ("port_range", old.port_range != new.port_range),
        ("max_clients", old.http.max_clients != new.http.max_clients),
        ("body_budget", old.http.body_budget != new.http.body_budget),
    ] {
        if changed {
            tracing::warn!("{what} changed; it takes effect only after a restart of llmvisor");
        }
    }
    if *old == new {
        return; // a folder event that changed no model
    }
    let summary = state.sup.reconfigure(&new).await;
    tracing::info!(
        added = ?summary.added,
        changed = ?summary.changed,
        removed = ?summary.removed,
        "config reloaded"
    );
    state.set_config(new);
}
