//! Configuration: the TOML file of `../shared/SPEC.md`, parsed and validated up front.
//!
//! Everything downstream (supervisor, router, CLI) works on the validated [`Config`]; nothing
//! after [`load`]/[`parse`] has to re-check a value. Macro templates (`${PORT}` …) stay as written
//! in the config and are expanded per start by [`expand`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

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
    /// Bytes.
    pub memory_budget: Option<u64>,
    pub queue_timeout: Duration,
    pub preload: Vec<String>,
    /// Largest request body the router reads, in bytes (default 32 MiB).
    pub body_limit: usize,
    /// How long SIGTERM/SIGINT lets in-flight requests finish before servers are stopped.
    pub shutdown_grace: Duration,
    pub groups: BTreeMap<String, GroupConfig>,
    /// Sorted by id.
    pub models: Vec<ModelConfig>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GroupConfig {
    pub members: Vec<String>,
    pub exclusive: bool,
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
    pub health_path: String,
    /// Bytes, as declared.
    pub memory: Option<u64>,
    pub pinned: bool,
}

impl ModelConfig {
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

/// The values macros expand to for one start of one model.
#[derive(Debug, Clone, Default)]
pub struct MacroValues<'a> {
    pub port: Option<u16>,
    pub socket: Option<&'a std::path::Path>,
    pub model_id: &'a str,
}
