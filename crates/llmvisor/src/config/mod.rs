//! Configuration: the TOML file of `../shared/SPEC.md`, parsed and validated up front.
//!
//! Everything downstream (supervisor, router, CLI) works on the validated [`Config`]; nothing
//! after [`load`]/[`parse`] has to re-check a value. Macro templates (`${PORT}` …) stay as written
//! in the config and are expanded per start by [`expand`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

mod diagnostic;
mod expand;
pub mod llama_swap;
mod parse;
mod tree;

#[cfg(test)]
mod llama_swap_tests;
#[cfg(test)]
mod tests;

pub use crate::units::{parse_duration, parse_size, DURATION_FORMS, MAX_DURATION, SIZE_FORMS};
pub use diagnostic::{ConfigErrors, Diagnostic};
pub use expand::{expand, process_env, ExpandError, ExpandedCommand, KNOWN_MACROS};
pub use parse::{
    load, load_with_warnings, parse, parse_with_env, DEFAULTS_KEYS, GROUP_KEYS, MODEL_KEYS,
    TOP_LEVEL_KEYS,
};

/// `kv_disk_budget` when the config does not set it: bytes of saved KV state on disk, all
/// models together (4 GiB).
pub const DEFAULT_KV_DISK_BUDGET: u64 = 4 << 30;
/// A model's `kv_save_timeout` when neither it nor `[defaults]` sets one.
pub const DEFAULT_KV_SAVE_TIMEOUT: Duration = Duration::from_secs(5);
/// `listen` when the config does not set it.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// `port_range` when the config does not set it.
pub const DEFAULT_PORT_RANGE: (u16, u16) = (10500, 10999);
/// `queue_timeout` when the config does not set it.
pub const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// Connections to a server that is not llama-server, when `max_connections` is not set.
pub const DEFAULT_MAX_CONNECTIONS: usize = 8;
/// llama-server's slots when `--parallel` is auto (tools/server/server.cpp).
const LLAMA_SERVER_AUTO_PARALLEL: i64 = 4;

/// `max_wait_for_swap` when the config does not set it: how long a start waits for a busy
/// model to finish its work before that model is drained to make room.
pub const DEFAULT_MAX_WAIT_FOR_SWAP: Duration = Duration::from_secs(30);
/// A model's `drain_timeout` when neither it nor `[defaults]` sets one: how long a stop
/// (unload, eviction, reload) waits for in-flight requests before it cuts them.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10 * 60);
/// `body_limit` when the config does not set it (32 MiB).
pub const DEFAULT_BODY_LIMIT: usize = 32 << 20;
/// `shutdown_grace` when the config does not set it.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// A model's `ttl` when neither it nor `[defaults]` sets one.
pub const DEFAULT_TTL: Duration = Duration::from_secs(10 * 60);
/// A model's `startup_timeout` when neither it nor `[defaults]` sets one.
pub const DEFAULT_STARTUP_TIMEOUT: Duration = Duration::from_secs(120);
/// A model's `stop_timeout` when neither it nor `[defaults]` sets one.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// `health_path = "none"`: ready (and healthy) once the server answers anything over HTTP.
pub const NO_HEALTH_CHECK: &str = "none";
/// A model's `health_path` when neither it nor `[defaults]` sets one.
pub const DEFAULT_HEALTH_PATH: &str = "/health";

/// A whole, validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file this was read from (for messages and reloads), if any.
    pub source: Option<PathBuf>,
    pub listen: SocketAddr,
    pub state_dir: PathBuf,
    /// Inclusive range of ports handed to `${PORT}`.
    pub port_range: (u16, u16),
    pub api_keys: Vec<String>,
    /// Keys for `/api/*`; when empty, `api_keys` apply there too.
    pub admin_keys: Vec<String>,
    pub allow_insecure: bool,
    pub max_loaded: Option<usize>,
    /// Bytes (`memory_budget = "auto"`: `None` here, `budgets.memory_auto` set).
    pub memory_budget: Option<u64>,
    /// The budgets read off the machine when the supervisor starts: `memory_budget = "auto"`,
    /// `memory_reserve`, `gpu_budget`, `gpu_reserve`.
    pub budgets: MachineBudgets,
    /// Bytes of saved KV state on disk, all models together; the oldest files go first.
    pub kv_disk_budget: u64,
    pub queue_timeout: Duration,
    pub max_wait_for_swap: Duration,
    pub preload: Vec<String>,
    /// Largest request body the router reads, in bytes (default 32 MiB).
    pub body_limit: usize,
    /// How long SIGTERM/SIGINT lets in-flight requests finish before servers are stopped.
    pub shutdown_grace: Duration,
    pub groups: BTreeMap<String, GroupConfig>,
    /// Sorted by id.
    pub models: Vec<ModelConfig>,
    /// Limits and browser rules of the HTTP front end.
    pub http: HttpSettings,
    /// `[cluster]`: fleet mode (`None`: one host).
    pub cluster: Option<ClusterConfig>,
    /// `models_dirs`, `discover`, `llama_server`, `discovered_args`: the models found on the
    /// machine (added to `models` by `discover::apply`).
    pub discovery: crate::discover::Settings,
}

/// The HTTP front end's limits and browser rules (top-level keys of the same names).
#[derive(Debug, Clone, PartialEq)]
pub struct HttpSettings {
    /// Browser origins allowed to call the API (`Origin` header values, e.g.
    /// `"http://localhost:3000"`); any other `Origin` is refused.
    pub cors_origins: Vec<String>,
    /// A response the client does not read for this long is cut (like nginx's `send_timeout`).
    pub send_timeout: Duration,
    /// Open client connections at most; more wait in the kernel's accept queue.
    pub max_clients: usize,
    /// Open connections from one client address at most; more are closed at once.
    pub max_clients_per_peer: usize,
    /// A streamed request body (`/upstream/*`, a form after its `model` field, llama-server's
    /// routes chosen by `?model=`) that sends nothing for this long is cut (408).
    pub body_idle_timeout: Duration,
    /// The most a streamed request body may carry (413 beyond).
    pub stream_body_limit: u64,
    /// Bytes of request bodies buffered at once, over all requests.
    pub body_budget: u64,
    /// HTTP leases (`POST /api/leases`) one caller may hold at once.
    pub leases_per_caller: usize,
    /// `GET /v1/models` lists aliases as entries of their own (llama-swap's
    /// `includeAliasesInList`).
    pub include_aliases_in_list: bool,
}

/// `memory_reserve` when the config does not set it: RAM left out of `memory_budget = "auto"`.
pub const DEFAULT_MEMORY_RESERVE: u64 = 1 << 30;
/// `gpu_reserve` when the config does not set it: memory of each GPU left out of
/// `gpu_budget = "auto"`.
pub const DEFAULT_GPU_RESERVE: u64 = 512 << 20;

/// Budgets whose figure comes from the machine, resolved once when the supervisor starts
/// (`supervisor::machine`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineBudgets {
    /// `memory_budget = "auto"`: the RAM available at start (`MemAvailable`) less
    /// `memory_reserve`.
    pub memory_auto: bool,
    /// Bytes.
    pub memory_reserve: u64,
    /// `gpu_budget`: `None` = GPUs are not budgeted.
    pub gpu: Option<GpuBudget>,
    /// Bytes.
    pub gpu_reserve: u64,
}

impl Default for MachineBudgets {
    fn default() -> Self {
        Self {
            memory_auto: false,
            memory_reserve: DEFAULT_MEMORY_RESERVE,
            gpu: None,
            gpu_reserve: DEFAULT_GPU_RESERVE,
        }
    }
}

/// `gpu_budget`: what each GPU may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuBudget {
    /// Each GPU's total memory less `gpu_reserve`.
    Auto,
    /// The same number of bytes on every GPU.
    Bytes(u64),
}

/// `send_timeout` when the config does not set it.
pub const DEFAULT_SEND_TIMEOUT: Duration = Duration::from_secs(60);
/// `max_clients` when the config does not set it.
pub const DEFAULT_MAX_CLIENTS: usize = 1024;
/// `body_idle_timeout` when the config does not set it.
pub const DEFAULT_BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// `stream_body_limit` when the config does not set it (8 GiB).
pub const DEFAULT_STREAM_BODY_LIMIT: u64 = 8 << 30;
/// `max_clients_per_peer` when the config does not set it: a quarter of `max_clients`.
pub fn default_max_clients_per_peer(max_clients: usize) -> usize {
    (max_clients / 4).max(1)
}
/// `body_budget` when the config does not set it (256 MiB).
pub const DEFAULT_BODY_BUDGET: u64 = 256 << 20;
/// `leases_per_caller` when the config does not set it.
pub const DEFAULT_LEASES_PER_CALLER: usize = 64;

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            cors_origins: Vec::new(),
            send_timeout: DEFAULT_SEND_TIMEOUT,
            max_clients: DEFAULT_MAX_CLIENTS,
            max_clients_per_peer: default_max_clients_per_peer(DEFAULT_MAX_CLIENTS),
            body_idle_timeout: DEFAULT_BODY_IDLE_TIMEOUT,
            stream_body_limit: DEFAULT_STREAM_BODY_LIMIT,
            body_budget: DEFAULT_BODY_BUDGET,
            leases_per_caller: DEFAULT_LEASES_PER_CALLER,
            include_aliases_in_list: false,
        }
    }
}

/// `[cluster]`: this node's part in a fleet coordinated by etcd (docs/fleet.md).
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterConfig {
    /// etcd v3 endpoints (`http://host:port`); never empty.
    pub etcd: Vec<String>,
    /// Key prefix: several fleets may share one etcd.
    pub name: String,
    /// This node's id, unique in the fleet (default: the host name).
    pub node: String,
    /// Base URL at which the other nodes reach this node's daemon (default: `http://` + `listen`).
    pub advertise: String,
    /// A node silent this long loses its placements (whole seconds, at least 2).
    pub lease_ttl: Duration,
    /// Shared secret that signs node-to-node hops (required unless `advertise` is loopback).
    pub cluster_key: Option<String>,
    /// TLS to etcd (`https://` endpoints).
    pub etcd_tls: Option<EtcdTls>,
    /// etcd user and password (etcd's `auth enable`).
    pub etcd_auth: Option<EtcdAuth>,
}

/// `[cluster] etcd_ca`, `etcd_cert`, `etcd_key`: files read when the node connects.
#[derive(Debug, Clone, PartialEq)]
pub struct EtcdTls {
    /// PEM: the CA that signed the etcd members' certificates.
    pub ca: PathBuf,
    /// PEM client certificate and its key (etcd's `--client-cert-auth`), both or neither.
    pub client: Option<(PathBuf, PathBuf)>,
}

/// `[cluster] etcd_user` with `etcd_password` or `etcd_password_file`.
#[derive(Clone, PartialEq)]
pub struct EtcdAuth {
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for EtcdAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdAuth")
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// `[cluster]` keys.
pub const CLUSTER_KEYS: &[&str] = &[
    "etcd",
    "name",
    "node",
    "advertise",
    "lease_ttl",
    "cluster_key",
    "etcd_ca",
    "etcd_cert",
    "etcd_key",
    "etcd_user",
    "etcd_password",
    "etcd_password_file",
];
/// `[cluster] etcd` when not set.
pub const DEFAULT_ETCD: &str = "http://127.0.0.1:2379";
/// `[cluster] name` when not set.
pub const DEFAULT_CLUSTER_NAME: &str = "llmvisor";
/// `[cluster] lease_ttl` when not set.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(5);

impl Config {
    /// The model with this id or alias.
    pub fn model(&self, name: &str) -> Option<&ModelConfig> {
        self.model_index(name).map(|i| &self.models[i])
    }

    /// The index in `models` of the model with this id or alias.
    pub fn model_index(&self, name: &str) -> Option<usize> {
        self.models.iter().position(|m| m.id == name).or_else(|| {
            self.models
                .iter()
                .position(|m| m.aliases.iter().any(|a| a == name))
        })
    }

    /// The model ids, sorted (for "unknown model; known: ..." messages).
    pub fn model_names(&self) -> Vec<&str> {
        self.models.iter().map(|m| m.id.as_str()).collect()
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct GroupConfig {
    pub members: Vec<String>,
    /// At most one member loaded at a time.
    pub exclusive: bool,
    /// Starting a member unloads every model outside the group (but pinned ones and members of
    /// persistent groups).
    pub unload_others: bool,
    /// Members are never unloaded to make room for models outside the group.
    pub persistent: bool,
}

/// One model's settings, with `[defaults]` already applied.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub id: String,
    pub aliases: Vec<String>,
    /// argv templates, macros unexpanded; never empty.
    pub cmd: Vec<String>,
    /// Value templates, macros unexpanded.
    pub env: BTreeMap<String, String>,
    pub cwd: Option<String>,
    /// A fixed port instead of one from `port_range`.
    pub port: Option<u16>,
    /// Idle time after the last lease before the server is stopped; `None` = never.
    pub ttl: Option<Duration>,
    pub startup_timeout: Duration,
    pub stop_timeout: Duration,
    /// How long a stop waits for in-flight requests (draining) before it cuts them.
    pub drain_timeout: Duration,
    /// Connections to the server at once (more requests queue in llmvisor); `None` = derived
    /// from its command (see `ModelConfig::connection_limit`).
    pub max_connections: Option<usize>,
    pub health_path: String,
    /// Bytes, as declared.
    pub memory: Option<u64>,
    pub pinned: bool,
    /// Background health probing while ready.
    pub health: HealthCheck,
    /// Fleet mode: at most this many instances cluster-wide (at least 1).
    pub replicas: u32,
    /// Fleet mode: the nodes it may run on (empty: any).
    pub nodes: Vec<String>,
    /// `gpus = [...]`: the GPUs it may use (`None`: placed where it fits; `Some([])`: none).
    pub gpus: Option<Vec<u32>>,
    /// How the router presents and rewrites requests for this model (llama-swap's per-model
    /// API keys), and its stop command.
    pub api: ModelApi,
    /// Where discovery found it (`None`: a `[models]` entry).
    pub found: Option<std::sync::Arc<crate::discover::Found>>,
    /// llama-server: its slots' KV state is saved before a stop llmvisor decides and restored
    /// at the next start (docs/kv-persist.md).
    pub kv_persist: bool,
    /// Bounds the save before a stop, and the restore after a start.
    pub kv_save_timeout: Duration,
}

/// Per-model router settings: listing, request rewriting, concurrency, stop command.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelApi {
    /// Display name in `/v1/models`.
    pub name: Option<String>,
    pub description: Option<String>,
    /// Free-form JSON object shown as `meta` in `/v1/models`.
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
    /// Left out of `/v1/models` (still served).
    pub unlisted: bool,
    /// The `model` the upstream server is sent instead of the requested name.
    pub use_model_name: Option<String>,
    pub filters: Filters,
    /// Requests in flight at most; more get 429 with `Retry-After`.
    pub concurrency_limit: Option<usize>,
    /// A streamed request that waits for a load gets SSE progress chunks.
    pub send_loading_state: bool,
    /// argv run to stop the server (`${PID}`, `${PORT}`, `${MODEL_ID}` expanded); the process
    /// group is still stopped and reaped afterwards.
    pub cmd_stop: Option<Vec<String>>,
    /// Ready once the port accepts a connection (no health path is probed).
    pub no_health_check: bool,
}

/// Rewrites of a JSON request body before it is forwarded.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Filters {
    /// Top-level keys removed (never `model`).
    pub strip_params: Vec<String>,
    /// Top-level keys set (overriding the client's).
    pub set_params: serde_json::Map<String, serde_json::Value>,
    /// Keys set when the request named this id or alias.
    pub set_params_by_id: BTreeMap<String, serde_json::Map<String, serde_json::Value>>,
}

impl Filters {
    pub fn is_empty(&self) -> bool {
        self.strip_params.is_empty()
            && self.set_params.is_empty()
            && self.set_params_by_id.is_empty()
    }
}

/// How a ready server is watched: `health_interval`, `health_failures`, `on_unhealthy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthCheck {
    /// Time between probes of `health_path`; `None` = not probed.
    pub interval: Option<Duration>,
    /// Consecutive failed probes (errors, non-2xx, or no answer within the interval) that make
    /// the server unhealthy.
    pub failures: u32,
    pub on_unhealthy: OnUnhealthy,
}

/// What happens to a server found unhealthy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnUnhealthy {
    /// Stop it and start it again (with backoff when it keeps failing).
    Restart,
    /// Stop it; the next request starts it again.
    Stop,
}

/// Probe interval when neither the model nor `[defaults]` sets one.
pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(5);
pub const DEFAULT_HEALTH_FAILURES: u32 = 3;

impl Default for HealthCheck {
    fn default() -> Self {
        Self {
            interval: Some(DEFAULT_HEALTH_INTERVAL),
            failures: DEFAULT_HEALTH_FAILURES,
            on_unhealthy: OnUnhealthy::Restart,
        }
    }
}

impl ModelConfig {
    /// A model with every optional setting at its default (for tests and programmatic configs).
    pub fn new(id: impl Into<String>, cmd: Vec<String>) -> Self {
        ModelConfig {
            id: id.into(),
            aliases: Vec::new(),
            cmd,
            env: BTreeMap::new(),
            cwd: None,
            port: None,
            ttl: Some(DEFAULT_TTL),
            startup_timeout: DEFAULT_STARTUP_TIMEOUT,
            stop_timeout: DEFAULT_STOP_TIMEOUT,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            max_connections: None,
            health_path: DEFAULT_HEALTH_PATH.to_string(),
            memory: None,
            pinned: false,
            health: HealthCheck::default(),
            replicas: 1,
            nodes: Vec::new(),
            gpus: None,
            api: ModelApi::default(),
            found: None,
            kv_persist: false,
            kv_save_timeout: DEFAULT_KV_SAVE_TIMEOUT,
        }
    }

    /// True when the command runs llama-server: one of its words is a path whose file name is
    /// `llama-server` (so `env X=1 /opt/llama-server ...` and `nice llama-server ...` count).
    pub fn is_llama_server(&self) -> bool {
        self.cmd.iter().any(|arg| {
            std::path::Path::new(arg)
                .file_name()
                .is_some_and(|f| f == "llama-server")
        })
    }

    /// The value of a llama-server option in this model's command or environment
    /// ([`llama_arg`]).
    pub fn llama_arg(&self, names: &[&str], env: &str) -> Option<&str> {
        llama_arg(&self.cmd, &self.env, names, env)
    }

    /// Connections llmvisor keeps to this server at once (more requests wait in llmvisor):
    /// `max_connections` if set; for llama-server, its slots (`-np`/`--parallel`, or
    /// `LLAMA_ARG_N_PARALLEL`; "auto" is 4) but fewer than its HTTP threads (`--threads-http`),
    /// since a connection beyond its slots only queues inside the server, holding a thread;
    /// for any other server [`DEFAULT_MAX_CONNECTIONS`].
    pub fn connection_limit(&self) -> usize {
        if let Some(n) = self.max_connections {
            return n;
        }
        if !self.is_llama_server() {
            return DEFAULT_MAX_CONNECTIONS;
        }
        let flag =
            |names: &[&str], env: &str| -> Option<i64> { self.llama_arg(names, env)?.parse().ok() };
        let slots = flag(&["-np", "--parallel"], "LLAMA_ARG_N_PARALLEL")
            .filter(|n| *n > 0)
            .unwrap_or(LLAMA_SERVER_AUTO_PARALLEL);
        let limit = match flag(&["--threads-http"], "LLAMA_ARG_THREADS_HTTP").filter(|t| *t > 1) {
            Some(threads) => slots.min(threads - 1),
            None => slots,
        };
        usize::try_from(limit.clamp(1, 4096)).unwrap_or(1)
    }

    /// The value of the first of `names` in the command line (`-c 4096` or `--ctx-size=4096`).
    pub fn arg_value(&self, names: &[&str]) -> Option<&str> {
        self.cmd.iter().enumerate().find_map(|(i, arg)| {
            names.iter().find_map(|name| {
                if arg == name {
                    self.cmd.get(i + 1).map(String::as_str)
                } else {
                    arg.strip_prefix(name)?.strip_prefix('=')
                }
            })
        })
    }

    /// The GGUF it serves: the discovered file, else the command's `-m`/`--model` (relative to
    /// `cwd`; `None` when it holds a macro).
    pub fn model_file(&self) -> Option<std::path::PathBuf> {
        if let Some(f) = &self.found {
            return Some(f.file.clone());
        }
        let path = self
            .arg_value(&["-m", "--model"])
            .filter(|p| !p.contains("${"))?;
        Some(match &self.cwd {
            Some(cwd) if !path.starts_with('/') => std::path::Path::new(cwd).join(path),
            _ => path.into(),
        })
    }

    /// Where it comes from, as `/api/models`' `source` says: `"config"` or the discovery's store.
    pub fn source(&self) -> &'static str {
        self.found.as_ref().map_or("config", |f| f.source.as_str())
    }

    /// True when `name` is this model's id or one of its aliases.
    pub fn answers_to(&self, name: &str) -> bool {
        self.id == name || self.aliases.iter().any(|a| a == name)
    }

    /// True when any template uses `${SOCKET}`: the server is then reached over a unix socket
    /// and given no port.
    pub fn uses_socket(&self) -> bool {
        self.templates().any(|t| t.contains("${SOCKET}"))
    }

    /// True when any template uses `${PORT}`.
    pub fn uses_port(&self) -> bool {
        self.templates().any(|t| t.contains("${PORT}"))
    }

    fn templates(&self) -> impl Iterator<Item = &String> {
        self.cmd
            .iter()
            .chain(self.env.values())
            .chain(self.cwd.iter())
    }
}

/// The value of a llama-server option, from `argv` (`NAME VALUE` or `NAME=VALUE`, any of
/// `names`) or else from its environment variable `var` in `env`.
pub fn llama_arg<'a>(
    argv: &'a [String],
    env: &'a BTreeMap<String, String>,
    names: &[&str],
    var: &str,
) -> Option<&'a str> {
    let from_argv = argv.iter().enumerate().find_map(|(i, arg)| {
        names.iter().find_map(|name| {
            if arg == name {
                argv.get(i + 1).map(String::as_str)
            } else {
                arg.strip_prefix(name)?.strip_prefix('=')
            }
        })
    });
    from_argv.or_else(|| env.get(var).map(String::as_str))
}

/// The values macros expand to for one start of one model.
#[derive(Debug, Clone, Default)]
pub struct MacroValues<'a> {
    pub port: Option<u16>,
    pub socket: Option<&'a std::path::Path>,
    pub model_id: &'a str,
}
