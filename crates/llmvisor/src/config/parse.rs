//! TOML text → validated [`Config`], collecting every problem with its position.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::diagnostic::{closest, line_col, ConfigErrors, Diagnostic};
use super::expand::{scan, Macro, Piece};
use super::tree::{self, Field, Kind, Node};
use super::{
    Config, GroupConfig, ModelConfig, OnUnhealthy, DEFAULT_BODY_LIMIT, DEFAULT_LISTEN,
    DEFAULT_MAX_WAIT_FOR_SWAP, DEFAULT_PORT_RANGE, DEFAULT_QUEUE_TIMEOUT, DEFAULT_SHUTDOWN_GRACE,
};
use crate::units::{self, DURATION_FORMS, SIZE_FORMS};

mod cluster;
mod gpu;

/// Keys allowed at the top level of the file.
pub const TOP_LEVEL_KEYS: &[&str] = &[
    "listen",
    "state_dir",
    "port_range",
    "api_keys",
    "admin_keys",
    "allow_insecure",
    "max_loaded",
    "memory_budget",
    "memory_reserve",
    "gpu_budget",
    "gpu_reserve",
    "queue_timeout",
    "max_wait_for_swap",
    "preload",
    "body_limit",
    "shutdown_grace",
    "groups",
    "defaults",
    "models",
    "cors_origins",
    "send_timeout",
    "max_clients",
    "max_clients_per_peer",
    "body_idle_timeout",
    "stream_body_limit",
    "body_budget",
    "leases_per_caller",
    "cluster",
    "include_aliases_in_list",
    "models_dirs",
    "discover",
    "llama_server",
    "discovered_args",
    "kv_disk_budget",
];

/// Keys allowed in a `[models."ID"]` table.
pub const MODEL_KEYS: &[&str] = &[
    "cmd",
    "aliases",
    "env",
    "cwd",
    "port",
    "ttl",
    "startup_timeout",
    "stop_timeout",
    "drain_timeout",
    "health_path",
    "memory",
    "pinned",
    "health_interval",
    "health_failures",
    "on_unhealthy",
    "max_connections",
    "replicas",
    "nodes",
    "gpus",
    "name",
    "description",
    "metadata",
    "unlisted",
    "use_model_name",
    "filters",
    "concurrency_limit",
    "send_loading_state",
    "cmd_stop",
    "kv_persist",
    "kv_save_timeout",
];

/// Per-model keys that differ for every model: not allowed in `[defaults]`.
const MODEL_ONLY_KEYS: &[&str] = &[
    "cmd",
    "aliases",
    "port",
    "name",
    "description",
    "metadata",
    "use_model_name",
    "filters",
    "cmd_stop",
];

/// Keys allowed in a model's `filters` table.
pub const FILTER_KEYS: &[&str] = &["strip_params", "set_params", "set_params_by_id"];

/// Keys allowed in `[defaults]`: every per-model key but [`MODEL_ONLY_KEYS`] (derived from
/// [`MODEL_KEYS`] at compile time, so the two lists cannot drift apart).
pub const DEFAULTS_KEYS: &[&str] =
    &without::<{ MODEL_KEYS.len() - MODEL_ONLY_KEYS.len() }>(MODEL_KEYS, MODEL_ONLY_KEYS);

/// `all` without the entries of `drop`, in order. `N` must be the number left (checked at
/// compile time).
const fn without<const N: usize>(all: &[&'static str], drop: &[&'static str]) -> [&'static str; N] {
    let mut out = [""; N];
    let (mut i, mut n) = (0, 0);
    while i < all.len() {
        let mut dropped = false;
        let mut j = 0;
        while j < drop.len() {
            dropped |= str_eq(all[i], drop[j]);
            j += 1;
        }
        if !dropped {
            out[n] = all[i];
            n += 1;
        }
        i += 1;
    }
    assert!(n == N, "wrong number of keys left");
    out
}

const fn str_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// Keys allowed in a `[groups.NAME]` table.
pub const GROUP_KEYS: &[&str] = &["members", "exclusive", "unload_others", "persistent"];

const CMD_EXAMPLE: &str =
    "e.g. cmd = [\"llama-server\", \"-m\", \"/models/model.gguf\", \"--port\", \"${PORT}\"]";

/// Reads and parses a config file. `Config::source` is `path`. A llama-swap YAML file
/// (`.yaml`/`.yml`, or content that is YAML and not TOML) is read as such; its warnings are
/// logged (see [`load_with_warnings`] to have them).
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let (config, warnings) = load_with_warnings(path)?;
    for w in &warnings {
        tracing::warn!("{}", super::llama_swap::render_warning(w));
    }
    Ok(config)
}

/// [`load`], returning the warnings (keys of a llama-swap config that llmvisor does not do)
/// instead of logging them. A TOML config has none.
pub fn load_with_warnings(path: &Path) -> Result<(Config, Vec<Diagnostic>), ConfigErrors> {
    let text = read_config(path)?;
    let yaml = super::llama_swap::is_yaml_path(path)
        || (toml_edit::ImDocument::parse(text.as_str()).is_err()
            && super::llama_swap::looks_like_yaml(&text));
    if yaml {
        return super::llama_swap::parse_yaml(&text, Some(path), &|name| std::env::var(name).ok());
    }
    parse(&text, Some(path)).map(|c| (c, Vec::new()))
}

fn read_config(path: &Path) -> Result<String, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        let help = match e.kind() {
            std::io::ErrorKind::NotFound => Some("check the path given to --config".to_string()),
            std::io::ErrorKind::InvalidData => Some("a config file must be UTF-8 text".to_string()),
            _ => None,
        };
        ConfigErrors::new(Diagnostic::without_position(
            path.display().to_string(),
            format!("cannot read config file {}: {e}", path.display()),
            help,
        ))
    })?;
    Ok(text)
}

/// Parses and validates config text. `path` names the file in diagnostics (`"<config>"` when
/// `None`) and becomes `Config::source`. Defaults that depend on the environment (`state_dir`)
/// come from llmvisor's environment.
pub fn parse(text: &str, path: Option<&Path>) -> Result<Config, ConfigErrors> {
    parse_with_env(text, path, &|name| std::env::var(name).ok())
}

/// [`parse`] with the environment given by `env_lookup` (used for `HOME` and `XDG_STATE_HOME`).
pub fn parse_with_env(
    text: &str,
    path: Option<&Path>,
    env_lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigErrors> {
    let file = path.map_or_else(|| "<config>".to_string(), |p| p.display().to_string());
    let mut p = Parser {
        src: text,
        file,
        env: env_lookup,
        diags: Vec::new(),
    };
    let doc = match toml_edit::ImDocument::parse(text) {
        Ok(doc) => doc,
        Err(e) => {
            let at = e.span().map_or(0, |s| s.start);
            let message = e
                .message()
                .trim()
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join("; ");
            p.err(at, format!("invalid TOML: {message}"));
            return Err(p.finish().unwrap_err());
        }
    };
    let root = tree::from_table(doc.as_table(), 0..0);
    let config = p.config(&root, path);
    p.finish()?;
    Ok(config)
}

/// How to make a real key, for a refused placeholder.
const PLACEHOLDER_HELP: &str =
    "generate a secret, e.g. with `openssl rand -hex 32`, and put it here (or in your Secret)";

/// A key copied from an example instead of generated (`change-me…`, `<output of …>`, `…`).
fn is_placeholder(key: &str) -> bool {
    let lower = key.to_ascii_lowercase();
    let folded: String = lower
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect();
    folded.contains("changeme")
        || folded.contains("replaceme")
        || (key.starts_with('<') && key.ends_with('>'))
        || key.contains('\u{2026}')
        || key.contains("...")
}

/// A value with the byte offset it came from.
#[derive(Debug, Clone)]
struct Sp<T> {
    v: T,
    at: usize,
}

/// A use of `${PORT}` or `${SOCKET}` in a template.
#[derive(Debug, Clone, Copy)]
struct Mark {
    socket: bool,
    at: usize,
    /// In the model's own table (not inherited from `[defaults]`).
    own: bool,
}

#[derive(Debug, Clone)]
struct EnvEntry {
    name: String,
    value: String,
    marks: Vec<Mark>,
}

/// The per-model keys of one table (`[defaults]` or a model), as written.
#[derive(Debug, Clone, Default)]
struct Settings {
    cmd: Option<(Sp<Vec<String>>, Vec<Mark>)>,
    cmd_seen: bool,
    aliases: Vec<Sp<String>>,
    env: Vec<EnvEntry>,
    cwd: Option<(String, Vec<Mark>)>,
    port: Option<Sp<u16>>,
    ttl: Option<Option<Duration>>,
    startup_timeout: Option<Duration>,
    stop_timeout: Option<Duration>,
    drain_timeout: Option<Duration>,
    health_path: Option<String>,
    /// `Some(None)`: `memory = "auto"` (estimated, then measured; also the default).
    memory: Option<Option<Sp<u64>>>,
    pinned: Option<bool>,
    health_interval: Option<Option<Duration>>,
    health_failures: Option<u32>,
    max_connections: Option<usize>,
    on_unhealthy: Option<OnUnhealthy>,
    replicas: Option<u32>,
    nodes: Option<Vec<String>>,
    gpus: Option<Vec<u32>>,
    /// `health_path = "none"`.
    no_health_check: Option<bool>,
    name: Option<String>,
    description: Option<String>,
    metadata: Option<serde_json::Map<String, serde_json::Value>>,
    unlisted: Option<bool>,
    use_model_name: Option<String>,
    filters: Option<super::Filters>,
    concurrency_limit: Option<Option<usize>>,
    send_loading_state: Option<bool>,
    cmd_stop: Option<Vec<String>>,
    kv_persist: Option<Sp<bool>>,
    kv_save_timeout: Option<Duration>,
    /// Some template of this table was malformed (its ${PORT}/${SOCKET} uses are unknown).
    template_error: bool,
}

impl Settings {
    /// Sets in `m` every plain value this table sets (`[defaults]` first, then the model's own
    /// table, onto [`ModelConfig::new`]'s defaults). Templates, aliases, the port and memory,
    /// which carry positions for later checks, are merged by [`Parser::model`].
    fn apply_to(&self, m: &mut ModelConfig) {
        if let Some(ttl) = self.ttl {
            m.ttl = ttl;
        }
        if let Some(t) = self.startup_timeout {
            m.startup_timeout = t;
        }
        if let Some(t) = self.stop_timeout {
            m.stop_timeout = t;
        }
        if let Some(t) = self.drain_timeout {
            m.drain_timeout = t;
        }
        if let Some(t) = self.kv_save_timeout {
            m.kv_save_timeout = t;
        }
        if let Some(path) = &self.health_path {
            m.health_path.clone_from(path);
        }
        if let Some(pinned) = self.pinned {
            m.pinned = pinned;
        }
        if let Some(interval) = self.health_interval {
            m.health.interval = interval;
        }
        if let Some(n) = self.health_failures {
            m.health.failures = n;
        }
        if let Some(action) = self.on_unhealthy {
            m.health.on_unhealthy = action;
        }
        if let Some(n) = self.max_connections {
            m.max_connections = Some(n);
        }
        if let Some(r) = self.replicas {
            m.replicas = r;
        }
        if let Some(nodes) = &self.nodes {
            m.nodes.clone_from(nodes);
        }
        if let Some(gpus) = &self.gpus {
            m.gpus = Some(gpus.clone());
        }
        if let Some(none) = self.no_health_check {
            m.api.no_health_check = none;
        }
        if let Some(v) = &self.name {
            m.api.name = Some(v.clone());
        }
        if let Some(v) = &self.description {
            m.api.description = Some(v.clone());
        }
        if let Some(v) = &self.metadata {
            m.api.metadata = Some(v.clone());
        }
        if let Some(v) = self.unlisted {
            m.api.unlisted = v;
        }
        if let Some(v) = &self.use_model_name {
            m.api.use_model_name = Some(v.clone());
        }
        if let Some(v) = &self.filters {
            m.api.filters = v.clone();
        }
        if let Some(v) = self.concurrency_limit {
            m.api.concurrency_limit = v;
        }
        if let Some(v) = self.send_loading_state {
            m.api.send_loading_state = v;
        }
        if let Some(v) = &self.cmd_stop {
            m.api.cmd_stop = Some(v.clone());
        }
    }
}

struct RawModel {
    id: String,
    id_at: usize,
    s: Settings,
}

struct RawGroup {
    name: String,
    name_at: usize,
    members: Vec<Sp<String>>,
    exclusive: bool,
    unload_others: bool,
    persistent: bool,
}

#[derive(Default)]
struct Top {
    listen: Option<Sp<SocketAddr>>,
    state_dir: Option<PathBuf>,
    state_dir_seen: bool,
    port_range: Option<(u16, u16)>,
    /// `None` when absent or malformed.
    api_keys: Option<Vec<String>>,
    api_keys_bad: bool,
    admin_keys: Option<Vec<String>>,
    allow_insecure: Option<bool>,
    max_loaded: Option<usize>,
    memory_budget: Option<Sp<u64>>,
    budgets: crate::config::MachineBudgets,
    kv_disk_budget: Option<u64>,
    queue_timeout: Option<Duration>,
    max_wait_for_swap: Option<Duration>,
    preload: Vec<Sp<String>>,
    body_limit: Option<usize>,
    shutdown_grace: Option<Duration>,
    groups: Vec<RawGroup>,
    defaults: Settings,
    models: Vec<RawModel>,
    http: crate::config::HttpSettings,
    /// `max_clients_per_peer` as written (its default follows `max_clients`).
    max_clients_per_peer: Option<usize>,
    cluster: Option<Node>,
    discovery: crate::discover::Settings,
}

#[derive(Clone, Copy)]
enum Scope<'a> {
    Top,
    Defaults,
    Model(&'a str),
    Group(&'a str),
}

impl Scope<'_> {
    fn valid_keys(&self) -> &'static [&'static str] {
        match self {
            Scope::Top => TOP_LEVEL_KEYS,
            Scope::Defaults => DEFAULTS_KEYS,
            Scope::Model(_) => MODEL_KEYS,
            Scope::Group(_) => GROUP_KEYS,
        }
    }

    fn place(&self) -> String {
        match self {
            Scope::Top => "at the top level".into(),
            Scope::Defaults => "in [defaults]".into(),
            Scope::Model(id) => format!("in model `{id}`"),
            Scope::Group(name) => format!("in group `{name}`"),
        }
    }
}

struct Parser<'a> {
    src: &'a str,
    file: String,
    env: &'a dyn Fn(&str) -> Option<String>,
    diags: Vec<Diagnostic>,
}

impl Parser<'_> {
    fn finish(&mut self) -> Result<(), ConfigErrors> {
        let mut diags = std::mem::take(&mut self.diags);
        diags.sort_by_key(|d| (d.line, d.col));
        match ConfigErrors::from_vec(diags) {
            Some(errors) => Err(errors),
            None => Ok(()),
        }
    }

    fn push(&mut self, at: Option<usize>, message: String, help: Option<String>) {
        let (line, col) = at.map_or((0, 0), |at| line_col(self.src, at));
        self.diags.push(Diagnostic {
            file: self.file.clone(),
            line,
            col,
            message,
            help,
        });
    }

    fn err(&mut self, at: usize, message: impl Into<String>) {
        self.push(Some(at), message.into(), None);
    }

    fn err_help(&mut self, at: usize, message: impl Into<String>, help: impl Into<String>) {
        self.push(Some(at), message.into(), Some(help.into()));
    }

    /// The source text of a node, as written.
    fn raw(&self, n: &Node) -> &str {
        self.src.get(n.span.clone()).unwrap_or("")
    }

    fn type_err(&mut self, what: &str, n: &Node, expected: &str) {
        self.err(
            n.at(),
            format!("{what} must be {expected}, found {}", n.describe()),
        );
    }

    /// Byte offset in the file of `range` of the decoded string `n`, when the string is written
    /// without escapes up to there; else the start of the string.
    fn pos_in_str(&self, n: &Node, decoded: &str, range: Range<usize>) -> usize {
        let raw = self.raw(n);
        let (delim, multiline) = if raw.starts_with("\"\"\"") || raw.starts_with("'''") {
            (3, true)
        } else if raw.starts_with('"') || raw.starts_with('\'') {
            (1, false)
        } else {
            return n.at();
        };
        let mut body_start = delim;
        if multiline {
            if raw[delim..].starts_with("\r\n") {
                body_start += 2;
            } else if raw[delim..].starts_with('\n') {
                body_start += 1;
            }
        }
        let body = &raw[body_start..];
        if body.get(..range.end).is_some() && body.get(..range.end) == decoded.get(..range.end) {
            n.at() + body_start + range.start
        } else {
            n.at()
        }
    }

    // ----- scalar helpers ---------------------------------------------------------------------

    fn string<'n>(&mut self, key: &str, n: &'n Node) -> Option<&'n str> {
        match &n.kind {
            Kind::Str(s) => Some(s),
            _ => {
                self.type_err(&format!("`{key}`"), n, "a string");
                None
            }
        }
    }

    fn boolean(&mut self, key: &str, n: &Node) -> Option<bool> {
        match &n.kind {
            Kind::Bool(b) => Some(*b),
            Kind::Str(s) if s == "true" || s == "false" => {
                self.err_help(
                    n.at(),
                    format!("`{key}` must be a boolean, found a string"),
                    format!("write {key} = {s} (without quotes)"),
                );
                None
            }
            _ => {
                self.type_err(&format!("`{key}`"), n, "a boolean (true or false)");
                None
            }
        }
    }

    fn duration(&mut self, key: &str, n: &Node) -> Option<Duration> {
        let parsed = match &n.kind {
            Kind::Int(i) => Some(units::duration_from_secs(*i)),
            Kind::Float(x) => Some(units::duration_from_f64(*x)),
            Kind::Str(s) => Some(units::duration(s)),
            _ => None,
        };
        self.quantity(key, n, "duration", DURATION_FORMS, parsed)
    }

    fn size(&mut self, key: &str, n: &Node) -> Option<u64> {
        let parsed = match &n.kind {
            Kind::Int(i) if *i < 0 => Some(Err("a size cannot be negative".to_string())),
            Kind::Int(i) => Some(Ok(*i as u64)),
            Kind::Str(s) => Some(units::size(s)),
            _ => None,
        };
        self.quantity(key, n, "size", SIZE_FORMS, parsed)
    }

    /// Reports a duration or size: `None` = a value of the wrong type, `Some(Err)` = unparsable.
    fn quantity<T>(
        &mut self,
        key: &str,
        n: &Node,
        what: &str,
        forms: &str,
        parsed: Option<Result<T, String>>,
    ) -> Option<T> {
        let message = match parsed {
            Some(Ok(v)) => return Some(v),
            Some(Err(reason)) => format!("invalid {what} {} for `{key}`: {reason}", self.raw(n)),
            None => format!("`{key}` must be a {what}, found {}", n.describe()),
        };
        self.err_help(n.at(), message, forms);
        None
    }

    fn port(&mut self, what: &str, n: &Node) -> Option<u16> {
        match &n.kind {
            Kind::Int(i) => match u16::try_from(*i) {
                Ok(p) if p > 0 => Some(p),
                _ => {
                    self.err(
                        n.at(),
                        format!("{what} must be a port between 1 and 65535, found {i}"),
                    );
                    None
                }
            },
            _ => {
                self.type_err(what, n, "a port number (an integer between 1 and 65535)");
                None
            }
        }
    }

    /// An array of strings; elements of another type are reported and skipped.
    /// `None` (after an error) when `n` is not an array.
    fn string_list(&mut self, key: &str, n: &Node) -> Option<Vec<Sp<String>>> {
        let Kind::Array(items) = &n.kind else {
            if let Kind::Str(s) = &n.kind {
                self.err_help(
                    n.at(),
                    format!("`{key}` must be an array of strings, found a string"),
                    format!("write {key} = [{s:?}]"),
                );
            } else {
                self.type_err(&format!("`{key}`"), n, "an array of strings");
            }
            return None;
        };
        let mut out = Vec::new();
        for item in items {
            match &item.kind {
                Kind::Str(s) => out.push(Sp {
                    v: s.clone(),
                    at: item.at(),
                }),
                _ => self.type_err(&format!("entries of `{key}`"), item, "strings"),
            }
        }
        Some(out)
    }

    /// Checks the macros of a template. Returns its uses of `${PORT}`/`${SOCKET}`, or `None`
    /// after reporting a malformed macro.
    fn template(&mut self, what: &str, n: &Node, s: &str) -> Option<Vec<Mark>> {
        if s.contains('\0') {
            self.err(n.at(), format!("{what} contains a NUL character"));
            return None;
        }
        match scan(s) {
            Ok(pieces) => Some(
                pieces
                    .iter()
                    .filter_map(|p| match p {
                        Piece::Macro { name, range } => {
                            let socket = match name {
                                Macro::Port => false,
                                Macro::Socket => true,
                                _ => return None,
                            };
                            Some(Mark {
                                socket,
                                at: self.pos_in_str(n, s, range.clone()),
                                own: true,
                            })
                        }
                        Piece::Text(_) => None,
                    })
                    .collect(),
            ),
            Err(e) => {
                let at = self.pos_in_str(n, s, e.offset..e.offset + 2);
                self.err_help(at, format!("{} in {what}", e.message), e.help);
                None
            }
        }
    }

    fn unknown_key(&mut self, f: &Field, scope: Scope<'_>) {
        let valid = scope.valid_keys();
        let key = f.key.as_str();
        let lead = if let Some(s) = closest(key, valid.iter().copied()) {
            format!("did you mean `{s}`? ")
        } else {
            match scope {
                Scope::Top if MODEL_KEYS.contains(&key) => format!(
                    "`{key}` is a per-model key: set it under [defaults] or [models.\"ID\"]. "
                ),
                Scope::Defaults | Scope::Model(_) | Scope::Group(_)
                    if TOP_LEVEL_KEYS.contains(&key) =>
                {
                    format!(
                        "`{key}` is a top-level key: move it above the first [table] header \
                         (keys after a header belong to that table). "
                    )
                }
                Scope::Model(id) if matches!(f.value.kind, Kind::Table(_)) => {
                    format!("if `{id}.{key}` is one model id, quote it: [models.\"{id}.{key}\"]. ")
                }
                _ => String::new(),
            }
        };
        self.err_help(
            f.key_at(),
            format!("unknown key `{key}` {}", scope.place()),
            format!("{lead}valid keys: {}", valid.join(", ")),
        );
    }

    // ----- the document -----------------------------------------------------------------------

    fn config(&mut self, root: &Node, path: Option<&Path>) -> Config {
        let mut top = Top::default();
        if let Kind::Table(fields) = &root.kind {
            for f in fields {
                self.top_key(f, &mut top);
            }
        }
        self.build(top, path)
    }

    fn top_key(&mut self, f: &Field, top: &mut Top) {
        let n = &f.value;
        match f.key.as_str() {
            "listen" => top.listen = self.listen(n),
            "state_dir" => {
                top.state_dir_seen = true;
                top.state_dir = self.state_dir(n);
            }
            "port_range" => top.port_range = self.port_range(n),
            "api_keys" => {
                top.api_keys = self.keys("api_keys", n);
                top.api_keys_bad = top.api_keys.is_none();
            }
            "admin_keys" => top.admin_keys = self.keys("admin_keys", n),
            "allow_insecure" => top.allow_insecure = self.boolean("allow_insecure", n),
            "max_loaded" => match &n.kind {
                Kind::Int(i) if *i >= 1 => top.max_loaded = usize::try_from(*i).ok(),
                Kind::Int(i) => self.err_help(
                    n.at(),
                    format!("`max_loaded` must be at least 1, found {i}"),
                    "remove max_loaded to allow any number of servers at once",
                ),
                _ => self.type_err("`max_loaded`", n, "an integer"),
            },
            "memory_budget" => match &n.kind {
                Kind::Str(a) if a == "auto" => top.budgets.memory_auto = true,
                _ => {
                    top.memory_budget = self.size("memory_budget", n).map(|v| Sp { v, at: n.at() })
                }
            },
            "gpu_budget" => top.budgets.gpu = self.gpu_budget(n),
            "gpu_reserve" => {
                if let Some(r) = self.size("gpu_reserve", n) {
                    top.budgets.gpu_reserve = r;
                }
            }
            "memory_reserve" => {
                if let Some(r) = self.size("memory_reserve", n) {
                    top.budgets.memory_reserve = r;
                }
            }
            "kv_disk_budget" => top.kv_disk_budget = self.size("kv_disk_budget", n),
            "queue_timeout" => top.queue_timeout = self.duration("queue_timeout", n),
            "max_wait_for_swap" => top.max_wait_for_swap = self.duration("max_wait_for_swap", n),
            "preload" => top.preload = self.string_list("preload", n).unwrap_or_default(),
            "body_limit" => {
                if let Some(b) = self.size("body_limit", n) {
                    match usize::try_from(b) {
                        Ok(b) if b > 0 => top.body_limit = Some(b),
                        _ => self.err(n.at(), "`body_limit` must be more than 0 bytes"),
                    }
                }
            }
            "shutdown_grace" => top.shutdown_grace = self.duration("shutdown_grace", n),
            "groups" => top.groups = self.groups(n),
            "defaults" => {
                if matches!(n.kind, Kind::Table(_)) {
                    top.defaults = self.settings(n, Scope::Defaults);
                } else {
                    self.type_err("`defaults`", n, "a table");
                }
            }
            "models" => top.models = self.models(n),
            "cors_origins" => {
                let list = self.string_list("cors_origins", n).unwrap_or_default();
                top.http.cors_origins = list.into_iter().map(|o| o.v).collect();
            }
            "include_aliases_in_list" => {
                if let Some(b) = self.boolean("include_aliases_in_list", n) {
                    top.http.include_aliases_in_list = b;
                }
            }
            "send_timeout" => match self.duration("send_timeout", n) {
                Some(d) if !d.is_zero() => top.http.send_timeout = d,
                Some(_) => self.err(n.at(), "`send_timeout` must be more than 0"),
                None => {}
            },
            "body_idle_timeout" => match self.duration("body_idle_timeout", n) {
                Some(d) if !d.is_zero() => top.http.body_idle_timeout = d,
                Some(_) => self.err(n.at(), "`body_idle_timeout` must be more than 0"),
                None => {}
            },
            "stream_body_limit" => match self.size("stream_body_limit", n) {
                Some(b) if b > 0 => top.http.stream_body_limit = b,
                Some(_) => self.err(n.at(), "`stream_body_limit` must be more than 0 bytes"),
                None => {}
            },
            "max_clients" | "leases_per_caller" | "max_clients_per_peer" => match &n.kind {
                Kind::Int(i) if *i >= 1 => {
                    let v = usize::try_from(*i).unwrap_or(usize::MAX);
                    match f.key.as_str() {
                        "max_clients" => top.http.max_clients = v,
                        "max_clients_per_peer" => top.max_clients_per_peer = Some(v),
                        _ => top.http.leases_per_caller = v,
                    }
                }
                _ => self.type_err(&format!("`{}`", f.key), n, "an integer of at least 1"),
            },
            "body_budget" => match self.size("body_budget", n) {
                Some(b) if b > 0 => top.http.body_budget = b,
                Some(_) => self.err(n.at(), "`body_budget` must be more than 0 bytes"),
                None => {}
            },
            "cluster" => top.cluster = Some(n.clone()),
            "models_dirs" => {
                let dirs = self.string_list("models_dirs", n).unwrap_or_default();
                top.discovery.models_dirs = dirs
                    .into_iter()
                    .map(|d| crate::discover::expand_home(&d.v, self.env))
                    .collect();
            }
            "discover" => {
                let names = self.string_list("discover", n).unwrap_or_default();
                top.discovery.stores = Vec::new();
                for name in names {
                    match crate::discover::Source::store(&name.v) {
                        Some(s) if !top.discovery.stores.contains(&s) => top.discovery.stores.push(s),
                        Some(_) => {}
                        None => self.err_help(
                            name.at,
                            format!("unknown model store `{}` in discover", name.v),
                            "the stores are \"ollama\", \"huggingface\", \"llama.cpp\" and \"lmstudio\" \
                             (discover = [] reads none)",
                        ),
                    }
                }
            }
            "llama_server" => {
                if let Some(v) = self.string("llama_server", n) {
                    top.discovery.llama_server = Some(
                        crate::discover::expand_home(v, self.env)
                            .display()
                            .to_string(),
                    );
                }
            }
            "discovered_args" => {
                let args = self.string_list("discovered_args", n).unwrap_or_default();
                top.discovery.discovered_args = args.into_iter().map(|a| a.v).collect();
            }
            _ => self.unknown_key(f, Scope::Top),
        }
    }

    fn listen(&mut self, n: &Node) -> Option<Sp<SocketAddr>> {
        let s = self.string("listen", n)?;
        match s.parse::<SocketAddr>() {
            Ok(addr) => Some(Sp {
                v: addr,
                at: n.at(),
            }),
            Err(_) => {
                let help = match s.strip_prefix("localhost:") {
                    Some(port) => format!("write an IP address: \"127.0.0.1:{port}\""),
                    None => "write an IP address and a port, e.g. \"127.0.0.1:8080\", \
                             \"0.0.0.0:8080\" or \"[::1]:8080\""
                        .into(),
                };
                self.err_help(
                    n.at(),
                    format!("`listen` is not an IP address and port: {s:?}"),
                    help,
                );
                None
            }
        }
    }

    fn state_dir(&mut self, n: &Node) -> Option<PathBuf> {
        let s = self.string("state_dir", n)?;
        if s.is_empty() {
            self.err(n.at(), "`state_dir` is empty");
            return None;
        }
        if s == "~" || s.starts_with("~/") {
            let Some(home) = (self.env)("HOME").filter(|h| !h.is_empty()) else {
                self.err_help(
                    n.at(),
                    "cannot expand `~` in `state_dir`: HOME is not set",
                    "write the full path",
                );
                return None;
            };
            let rest = s[1..].trim_start_matches('/');
            let home = PathBuf::from(home);
            return Some(if rest.is_empty() {
                home
            } else {
                home.join(rest)
            });
        }
        if s.starts_with('~') {
            self.err_help(
                n.at(),
                format!("`state_dir` {s:?}: only a leading `~/` is expanded"),
                "write the full path",
            );
            return None;
        }
        Some(PathBuf::from(s))
    }

    fn default_state_dir(&self) -> Option<PathBuf> {
        let xdg =
            (self.env)("XDG_STATE_HOME").filter(|x| !x.is_empty() && Path::new(x).is_absolute());
        if let Some(x) = xdg {
            return Some(PathBuf::from(x).join("llmvisor"));
        }
        (self.env)("HOME")
            .filter(|h| !h.is_empty())
            .map(|h| PathBuf::from(h).join(".local/state/llmvisor"))
    }

    fn port_range(&mut self, n: &Node) -> Option<(u16, u16)> {
        let Kind::Array(items) = &n.kind else {
            self.type_err("`port_range`", n, "an array [low, high]");
            return None;
        };
        if items.len() != 2 {
            self.err_help(
                n.at(),
                format!(
                    "`port_range` must have exactly two ports, found {}",
                    items.len()
                ),
                "write port_range = [low, high], e.g. [10500, 10999]",
            );
            return None;
        }
        let lo = self.port("`port_range` low end", &items[0]);
        let hi = self.port("`port_range` high end", &items[1]);
        let (lo, hi) = (lo?, hi?);
        if lo > hi {
            self.err_help(
                n.at(),
                format!("`port_range` is empty: {lo} is above {hi}"),
                "write port_range = [low, high] with low <= high",
            );
            return None;
        }
        Some((lo, hi))
    }

    /// `api_keys`/`admin_keys`: `None` when malformed.
    fn keys(&mut self, key: &str, n: &Node) -> Option<Vec<String>> {
        let errors = self.diags.len();
        let list = self.string_list(key, n)?;
        let mut out = Vec::new();
        for k in list {
            if k.v.is_empty() {
                self.err(k.at, format!("empty key in `{key}`"));
            } else if k.v.chars().any(|c| c.is_whitespace() || c.is_control()) {
                self.err_help(
                    k.at,
                    format!("a key in `{key}` contains whitespace"),
                    "keys are sent as \"Authorization: Bearer KEY\" and cannot contain spaces",
                );
            } else if is_placeholder(&k.v) {
                self.err_help(
                    k.at,
                    format!("the key {:?} in `{key}` is a placeholder", k.v),
                    PLACEHOLDER_HELP,
                );
            } else {
                out.push(k.v);
            }
        }
        (self.diags.len() == errors).then_some(out)
    }

    fn groups(&mut self, n: &Node) -> Vec<RawGroup> {
        let Kind::Table(fields) = &n.kind else {
            self.err_help(
                n.at(),
                format!("`groups` must be a table of groups, found {}", n.describe()),
                "write one [groups.NAME] header per group, with members = [...] below it",
            );
            return Vec::new();
        };
        let mut out = Vec::new();
        for g in fields {
            let Kind::Table(keys) = &g.value.kind else {
                self.type_err(&format!("group `{}`", g.key), &g.value, "a table");
                continue;
            };
            if g.key.trim().is_empty() {
                self.err(g.key_at(), "a group name cannot be empty");
            }
            let mut group = RawGroup {
                name: g.key.clone(),
                name_at: g.key_at(),
                members: Vec::new(),
                exclusive: false,
                unload_others: false,
                persistent: false,
            };
            let mut has_members = false;
            for f in keys {
                match f.key.as_str() {
                    "members" => {
                        has_members = true;
                        group.members = self.string_list("members", &f.value).unwrap_or_default();
                    }
                    "exclusive" => {
                        group.exclusive = self.boolean("exclusive", &f.value).unwrap_or(false)
                    }
                    "unload_others" => {
                        group.unload_others =
                            self.boolean("unload_others", &f.value).unwrap_or(false)
                    }
                    "persistent" => {
                        group.persistent = self.boolean("persistent", &f.value).unwrap_or(false)
                    }
                    _ => self.unknown_key(f, Scope::Group(&g.key)),
                }
            }
            if !has_members {
                self.err_help(
                    g.key_at(),
                    format!("group `{}` has no `members`", g.key),
                    "add members = [\"model-id\", ...]",
                );
            }
            out.push(group);
        }
        out
    }

    fn models(&mut self, n: &Node) -> Vec<RawModel> {
        let fields = match &n.kind {
            Kind::Table(fields) => fields,
            Kind::TableArray => {
                self.err_help(
                    n.at(),
                    "`models` must be a table of models keyed by id, found an array of tables",
                    "write one [models.\"ID\"] header per model instead of [[models]]",
                );
                return Vec::new();
            }
            _ => {
                self.err_help(
                    n.at(),
                    format!("`models` must be a table, found {}", n.describe()),
                    "write one [models.\"ID\"] header per model",
                );
                return Vec::new();
            }
        };
        let mut out = Vec::new();
        for m in fields {
            let s = if matches!(m.value.kind, Kind::Table(_)) {
                self.settings(&m.value, Scope::Model(&m.key))
            } else {
                self.err_help(
                    m.key_at(),
                    format!(
                        "model `{}` must be a table, found {}",
                        m.key,
                        m.value.describe()
                    ),
                    format!("write [models.\"{}\"] and its keys below it", m.key),
                );
                Settings {
                    cmd_seen: true, // do not also report a missing cmd
                    ..Settings::default()
                }
            };
            out.push(RawModel {
                id: m.key.clone(),
                id_at: m.key_at(),
                s,
            });
        }
        out
    }

    /// The per-model keys of `[defaults]` or of one model.
    fn settings(&mut self, n: &Node, scope: Scope<'_>) -> Settings {
        let mut s = Settings::default();
        let Kind::Table(fields) = &n.kind else {
            return s;
        };
        let defaults = matches!(scope, Scope::Defaults);
        for f in fields {
            let v = &f.value;
            match f.key.as_str() {
                key if defaults && MODEL_ONLY_KEYS.contains(&key) => self.err_help(
                    f.key_at(),
                    format!("`{key}` cannot be set in [defaults]"),
                    format!("`{key}` is different for every model: set it under [models.\"ID\"]"),
                ),
                "cmd" => {
                    s.cmd_seen = true;
                    s.cmd = self.cmd(v);
                    if s.cmd.is_none() {
                        s.template_error = true;
                    }
                }
                "aliases" => s.aliases = self.string_list("aliases", v).unwrap_or_default(),
                "env" => s.env = self.env(v, &mut s.template_error),
                "cwd" => {
                    if let Some(cwd) = self.string("cwd", v) {
                        if cwd.is_empty() {
                            self.err_help(
                                v.at(),
                                "`cwd` is empty",
                                "remove it to run the server in llmvisor's working directory",
                            );
                        } else if let Some(marks) = self.template("cwd", v, cwd) {
                            s.cwd = Some((cwd.to_string(), marks));
                        } else {
                            s.template_error = true;
                        }
                    }
                }
                "port" => s.port = self.port("`port`", v).map(|p| Sp { v: p, at: v.at() }),
                "ttl" => s.ttl = self.duration("ttl", v).map(|d| (!d.is_zero()).then_some(d)),
                "startup_timeout" => {
                    s.startup_timeout = self.duration("startup_timeout", v).filter(|d| {
                        if d.is_zero() {
                            self.err(v.at(), "`startup_timeout` must be more than 0");
                        }
                        !d.is_zero()
                    })
                }
                "stop_timeout" => s.stop_timeout = self.duration("stop_timeout", v),
                "drain_timeout" => s.drain_timeout = self.duration("drain_timeout", v),
                "health_path" => {
                    if let Some(h) = self.string("health_path", v) {
                        if h == super::NO_HEALTH_CHECK {
                            s.no_health_check = Some(true);
                            s.health_path = Some(h.to_string());
                        } else if h.starts_with('/') && !h.chars().any(char::is_whitespace) {
                            s.health_path = Some(h.to_string());
                        } else {
                            self.err_help(
                                v.at(),
                                format!(
                                    "`health_path` must be a path starting with `/`, found {h:?}"
                                ),
                                "e.g. health_path = \"/health\", or \"none\": ready once the port accepts connections",
                            );
                        }
                    }
                }
                "memory" => {
                    s.memory = match &v.kind {
                        Kind::Str(a) if a == "auto" => Some(None),
                        _ => self.size("memory", v).map(|b| Some(Sp { v: b, at: v.at() })),
                    }
                }
                "pinned" => s.pinned = self.boolean("pinned", v),
                "kv_persist" => {
                    s.kv_persist = self.boolean("kv_persist", v).map(|b| Sp { v: b, at: v.at() })
                }
                "kv_save_timeout" => {
                    s.kv_save_timeout = self.duration("kv_save_timeout", v).filter(|d| {
                        if d.is_zero() {
                            self.err_help(
                                v.at(),
                                "`kv_save_timeout` must be more than 0",
                                "set kv_persist = false to save nothing",
                            );
                        }
                        !d.is_zero()
                    })
                }
                "name" | "description" | "use_model_name" => {
                    if let Some(text) = self.string(&f.key, v) {
                        if text.is_empty() {
                            self.err(v.at(), format!("`{}` is empty", f.key));
                        } else {
                            let text = Some(text.to_string());
                            match f.key.as_str() {
                                "name" => s.name = text,
                                "description" => s.description = text,
                                _ => s.use_model_name = text,
                            }
                        }
                    }
                }
                "metadata" => match json_of(v) {
                    serde_json::Value::Object(map) => s.metadata = Some(map),
                    _ => self.type_err("`metadata`", v, "a table"),
                },
                "unlisted" => s.unlisted = self.boolean("unlisted", v),
                "send_loading_state" => {
                    s.send_loading_state = self.boolean("send_loading_state", v)
                }
                "concurrency_limit" => match &v.kind {
                    Kind::Int(0) => s.concurrency_limit = Some(None),
                    Kind::Int(i) if *i > 0 => {
                        s.concurrency_limit = Some(Some(usize::try_from(*i).unwrap_or(usize::MAX)))
                    }
                    _ => self.type_err("`concurrency_limit`", v, "an integer of 0 (no limit) or more"),
                },
                "filters" => s.filters = self.filters(v),
                "cmd_stop" => s.cmd_stop = self.cmd_stop(v),
                "health_interval" => {
                    s.health_interval = self
                        .duration("health_interval", v)
                        .map(|d| (!d.is_zero()).then_some(d))
                }
                "health_failures" => match &v.kind {
                    Kind::Int(i) if (1..=1000).contains(i) => s.health_failures = Some(*i as u32),
                    Kind::Int(i) => self.err_help(
                        v.at(),
                        format!("`health_failures` must be between 1 and 1000, found {i}"),
                        "e.g. health_failures = 3",
                    ),
                    _ => self.type_err("`health_failures`", v, "an integer"),
                },
                "max_connections" => match &v.kind {
                    Kind::Int(i) if (1..=4096).contains(i) => {
                        s.max_connections = Some(*i as usize)
                    }
                    Kind::Int(i) => self.err_help(
                        v.at(),
                        format!("`max_connections` must be between 1 and 4096, found {i}"),
                        "e.g. max_connections = 4 (llama-server: its --parallel slots)",
                    ),
                    _ => self.type_err("`max_connections`", v, "an integer"),
                },
                "on_unhealthy" => match self.string("on_unhealthy", v) {
                    Some("restart") => s.on_unhealthy = Some(OnUnhealthy::Restart),
                    Some("stop") => s.on_unhealthy = Some(OnUnhealthy::Stop),
                    Some(other) => self.err_help(
                        v.at(),
                        format!("`on_unhealthy` must be \"restart\" or \"stop\", found {other:?}"),
                        "restart: stop the server and start it again; stop: stop it until the next request",
                    ),
                    None => {}
                },
                "replicas" => s.replicas = self.replicas(v),
                "nodes" => s.nodes = self.nodes(v),
                "gpus" => s.gpus = self.gpu_list(v),
                _ => self.unknown_key(f, scope),
            }
        }
        s
    }

    /// `cmd_stop`: a string split like a shell would, or an array; `${PID}`, `${PORT}` and
    /// `${MODEL_ID}` are expanded when it runs.
    fn cmd_stop(&mut self, n: &Node) -> Option<Vec<String>> {
        let argv = match &n.kind {
            Kind::Str(s) => match shell_words::split(s) {
                Ok(argv) => argv,
                Err(e) => {
                    self.err_help(
                        n.at(),
                        format!("cmd_stop cannot be split into words: {e}"),
                        "check the quotes, or write cmd_stop as an array of strings",
                    );
                    return None;
                }
            },
            Kind::Array(_) => self
                .string_list("cmd_stop", n)?
                .into_iter()
                .map(|s| s.v)
                .collect(),
            _ => {
                self.type_err("`cmd_stop`", n, "a string or an array of strings");
                return None;
            }
        };
        if argv.first().is_none_or(|a| a.is_empty()) {
            self.err_help(
                n.at(),
                "cmd_stop is empty",
                "e.g. cmd_stop = [\"docker\", \"stop\", \"${MODEL_ID}\"]; remove it to stop the process group",
            );
            return None;
        }
        Some(argv)
    }

    /// `filters = { strip_params = [...], set_params = {...}, set_params_by_id = {...} }`.
    fn filters(&mut self, n: &Node) -> Option<super::Filters> {
        let Kind::Table(fields) = &n.kind else {
            self.type_err("`filters`", n, "a table");
            return None;
        };
        let mut out = super::Filters::default();
        for f in fields {
            let v = &f.value;
            match f.key.as_str() {
                "strip_params" => {
                    for p in self.string_list("strip_params", v).unwrap_or_default() {
                        if p.v == "model" {
                            self.err_help(
                                p.at,
                                "`model` cannot be stripped",
                                "use use_model_name to change what the server is sent",
                            );
                        } else {
                            out.strip_params.push(p.v);
                        }
                    }
                }
                "set_params" => match json_of(v) {
                    serde_json::Value::Object(map) => out.set_params = map,
                    _ => self.type_err("`set_params`", v, "a table"),
                },
                "set_params_by_id" => {
                    let Kind::Table(ids) = &v.kind else {
                        self.type_err("`set_params_by_id`", v, "a table of tables");
                        continue;
                    };
                    for id in ids {
                        match json_of(&id.value) {
                            serde_json::Value::Object(map) => {
                                out.set_params_by_id.insert(id.key.clone(), map);
                            }
                            _ => self.type_err(
                                &format!("`set_params_by_id.{}`", id.key),
                                &id.value,
                                "a table",
                            ),
                        }
                    }
                }
                other => {
                    let help = closest(other, FILTER_KEYS.iter().copied())
                        .map(|c| format!("did you mean `{c}`?"))
                        .unwrap_or_else(|| {
                            format!("the keys of filters are {}", FILTER_KEYS.join(", "))
                        });
                    self.err_help(
                        f.key_at(),
                        format!("unknown key `{other}` in filters"),
                        help,
                    );
                }
            }
        }
        Some(out)
    }

    fn cmd(&mut self, n: &Node) -> Option<(Sp<Vec<String>>, Vec<Mark>)> {
        let empty_help = format!("write the command that starts the server, {CMD_EXAMPLE}");
        match &n.kind {
            Kind::Str(s) => {
                let marks = self.template("cmd", n, s)?;
                let argv = match shell_words::split(s) {
                    Ok(argv) => argv,
                    Err(e) => {
                        self.err_help(
                            n.at(),
                            format!("cmd cannot be split into words: {e}"),
                            "check the quotes in cmd, or write cmd as an array of strings",
                        );
                        return None;
                    }
                };
                if argv.first().is_none_or(|a| a.is_empty()) {
                    self.err_help(n.at(), "cmd is empty", empty_help);
                    return None;
                }
                // Quotes can cut a macro in two: check the words as well.
                for word in &argv {
                    if let Err(e) = scan(word) {
                        self.err_help(n.at(), format!("{} in cmd", e.message), e.help);
                        return None;
                    }
                }
                Some((
                    Sp {
                        v: argv,
                        at: n.at(),
                    },
                    marks,
                ))
            }
            Kind::Array(items) => {
                if items.is_empty() {
                    self.err_help(n.at(), "cmd is empty", empty_help);
                    return None;
                }
                let mut ok = true;
                let mut argv = Vec::new();
                let mut marks = Vec::new();
                for item in items {
                    match &item.kind {
                        Kind::Str(s) => {
                            match self.template("cmd", item, s) {
                                Some(m) => marks.extend(m),
                                None => ok = false,
                            }
                            argv.push(s.clone());
                        }
                        Kind::Int(_) | Kind::Float(_) | Kind::Bool(_) => {
                            let raw = self.raw(item).to_string();
                            self.err_help(
                                item.at(),
                                format!("cmd items must be strings, found {}", item.describe()),
                                format!("quote it: \"{raw}\""),
                            );
                            ok = false;
                        }
                        _ => {
                            self.type_err("cmd items", item, "strings");
                            ok = false;
                        }
                    }
                }
                if ok && argv[0].is_empty() {
                    self.err_help(
                        items[0].at(),
                        "cmd is empty: its first element, the program to run, is an empty string",
                        empty_help,
                    );
                    return None;
                }
                ok.then_some((
                    Sp {
                        v: argv,
                        at: n.at(),
                    },
                    marks,
                ))
            }
            _ => {
                self.err_help(
                    n.at(),
                    format!(
                        "`cmd` must be an array of strings or a string, found {}",
                        n.describe()
                    ),
                    CMD_EXAMPLE,
                );
                None
            }
        }
    }

    fn env(&mut self, n: &Node, template_error: &mut bool) -> Vec<EnvEntry> {
        let Kind::Table(fields) = &n.kind else {
            self.err_help(
                n.at(),
                format!("`env` must be a table of strings, found {}", n.describe()),
                "e.g. env = { LLAMA_ARG_THREADS = \"4\" }",
            );
            return Vec::new();
        };
        let mut out = Vec::new();
        for f in fields {
            let name = f.key.as_str();
            if name.is_empty() || name.contains(['=', '\0']) {
                self.err_help(
                    f.key_at(),
                    format!("invalid environment variable name {name:?} in `env`"),
                    "a name cannot be empty or contain `=`",
                );
                continue;
            }
            if name == "LLMVISOR_INSTANCE" {
                self.err_help(
                    f.key_at(),
                    "`LLMVISOR_INSTANCE` cannot be set in `env`",
                    "llmvisor sets it on every server to prove which llmvisor started it",
                );
                continue;
            }
            let v = &f.value;
            match &v.kind {
                Kind::Str(s) => match self.template(&format!("env `{name}`"), v, s) {
                    Some(marks) => out.push(EnvEntry {
                        name: name.to_string(),
                        value: s.clone(),
                        marks,
                    }),
                    None => *template_error = true,
                },
                Kind::Int(_) | Kind::Float(_) | Kind::Bool(_) => {
                    let raw = self.raw(v).to_string();
                    self.err_help(
                        v.at(),
                        format!("env `{name}` must be a string, found {}", v.describe()),
                        format!("quote it: {name} = \"{raw}\""),
                    );
                }
                _ => self.type_err(&format!("env `{name}`"), v, "a string"),
            }
        }
        out
    }

    // ----- cross checks -----------------------------------------------------------------------

    fn build(&mut self, top: Top, path: Option<&Path>) -> Config {
        let listen = top.listen.clone();
        let defaults = &top.defaults;
        let mut raw_models = top.models;
        raw_models.sort_by_key(|m| m.id_at);

        // Names: every id first (ids are authoritative), then aliases in file order.
        let mut names: HashMap<String, (String, bool)> = HashMap::new();
        for m in &raw_models {
            self.check_name("model id", &m.id, m.id_at);
            names.insert(m.id.clone(), (m.id.clone(), false));
        }
        for m in &raw_models {
            for a in &m.s.aliases {
                if !self.check_name("alias", &a.v, a.at) {
                    continue;
                }
                match names.get(&a.v) {
                    Some((owner, false)) if *owner == m.id => self.err_help(
                        a.at,
                        format!("alias `{}` is the same as its model's id", a.v),
                        "remove it: a model is always reachable by its id",
                    ),
                    Some((owner, false)) => self.err_help(
                        a.at,
                        format!(
                            "alias `{}` of model `{}` is already the id of model `{owner}`",
                            a.v, m.id
                        ),
                        "ids and aliases must be unique across all models",
                    ),
                    Some((owner, true)) if *owner == m.id => {
                        self.err(a.at, format!("alias `{}` is listed twice", a.v))
                    }
                    Some((owner, true)) => self.err_help(
                        a.at,
                        format!(
                            "alias `{}` of model `{}` is already an alias of model `{owner}`",
                            a.v, m.id
                        ),
                        "ids and aliases must be unique across all models",
                    ),
                    None => {
                        names.insert(a.v.clone(), (m.id.clone(), true));
                    }
                }
            }
        }

        let mut models = Vec::new();
        let mut fixed_ports: HashMap<u16, String> = HashMap::new();
        for m in raw_models {
            let model = self.model(m, defaults, listen.as_ref(), top.memory_budget.as_ref());
            if let Some((port, at)) = model.1 {
                match fixed_ports.get(&port) {
                    Some(other) => self.err_help(
                        at,
                        format!("port {port} of model `{}` is already the port of model `{other}`", model.0.id),
                        "two servers cannot listen on the same port: change one, or remove `port` to get one from port_range",
                    ),
                    None => {
                        fixed_ports.insert(port, model.0.id.clone());
                    }
                }
            }
            models.push(model.0);
        }
        models.sort_by(|a, b| a.id.cmp(&b.id));

        let preload = self.resolve_list("preload", &top.preload, &names);
        let mut groups = BTreeMap::new();
        for g in top.groups {
            let what = format!("group `{}`", g.name);
            let members = self.resolve_list(&what, &g.members, &names);
            if groups.contains_key(&g.name) {
                self.err(g.name_at, format!("group `{}` is defined twice", g.name));
            }
            groups.insert(
                g.name,
                GroupConfig {
                    members,
                    exclusive: g.exclusive,
                    unload_others: g.unload_others,
                    persistent: g.persistent,
                },
            );
        }

        if let Some(l) = &listen {
            let keys = top.api_keys.as_ref().is_some_and(|k| !k.is_empty());
            if !is_loopback(l.v.ip())
                && !keys
                && !top.api_keys_bad
                && top.allow_insecure != Some(true)
            {
                self.err_help(
                    l.at,
                    format!(
                        "`listen` = \"{}\" can be reached from other machines, but no api_keys are set",
                        l.v
                    ),
                    "set api_keys = [\"...\"] so that clients must authenticate, \
                     or allow_insecure = true if you really mean to serve without keys",
                );
            }
        }

        let state_dir = match top.state_dir {
            Some(dir) => dir,
            None => match self.default_state_dir() {
                Some(dir) => dir,
                None => {
                    if !top.state_dir_seen {
                        self.push(
                            None,
                            "no state_dir is set, and neither XDG_STATE_HOME nor HOME is set to \
                             derive the default"
                                .into(),
                            Some("set state_dir = \"/path/to/dir\"".into()),
                        );
                    }
                    PathBuf::new()
                }
            },
        };

        let cluster = top.cluster.as_ref().and_then(|n| {
            self.cluster(
                n,
                path.and_then(Path::parent),
                listen.as_ref(),
                top.api_keys.as_ref().is_some_and(|k| !k.is_empty()),
            )
        });
        Config {
            source: path.map(Path::to_path_buf),
            listen: listen
                .map(|l| l.v)
                .unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("valid default")),
            state_dir,
            port_range: top.port_range.unwrap_or(DEFAULT_PORT_RANGE),
            api_keys: top.api_keys.unwrap_or_default(),
            admin_keys: top.admin_keys.unwrap_or_default(),
            allow_insecure: top.allow_insecure.unwrap_or(false),
            max_loaded: top.max_loaded,
            memory_budget: top.memory_budget.map(|b| b.v),
            budgets: top.budgets,
            kv_disk_budget: top.kv_disk_budget.unwrap_or(super::DEFAULT_KV_DISK_BUDGET),
            queue_timeout: top.queue_timeout.unwrap_or(DEFAULT_QUEUE_TIMEOUT),
            max_wait_for_swap: top.max_wait_for_swap.unwrap_or(DEFAULT_MAX_WAIT_FOR_SWAP),
            preload,
            body_limit: top.body_limit.unwrap_or(DEFAULT_BODY_LIMIT),
            shutdown_grace: top.shutdown_grace.unwrap_or(DEFAULT_SHUTDOWN_GRACE),
            groups,
            models,
            http: crate::config::HttpSettings {
                max_clients_per_peer: top.max_clients_per_peer.unwrap_or(
                    crate::config::default_max_clients_per_peer(top.http.max_clients),
                ),
                ..top.http
            },
            cluster,
            discovery: top.discovery,
        }
    }

    /// Reports a malformed id or alias; true when `name` is fine.
    fn check_name(&mut self, what: &str, name: &str, at: usize) -> bool {
        let problem = if name.is_empty() {
            Some("is empty".to_string())
        } else if name.starts_with('/') || name.ends_with('/') || name.contains("//") {
            // `org/name` is fine (Hugging Face's ids); an empty part between slashes would make
            // the raw id in a path (`/v1/models/{id}`) ambiguous.
            Some("has an empty part between `/`".to_string())
        } else if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
            Some("contains whitespace".to_string())
        } else {
            None
        };
        match problem {
            Some(problem) => {
                self.err_help(
                    at,
                    format!("{what} {name:?} {problem}"),
                    "ids and aliases appear in URL paths (/upstream/{model}/...): they must be \
                     non-empty, without whitespace, and `/` only between two parts (`org/name`)",
                );
                false
            }
            None => true,
        }
    }

    /// A model with `[defaults]` applied, and its fixed port with the port's position.
    fn model(
        &mut self,
        m: RawModel,
        d: &Settings,
        listen: Option<&Sp<SocketAddr>>,
        budget: Option<&Sp<u64>>,
    ) -> (ModelConfig, Option<(u16, usize)>) {
        let inherited = |marks: &[Mark]| {
            marks
                .iter()
                .map(|mk| Mark { own: false, ..*mk })
                .collect::<Vec<_>>()
        };
        let s = m.s;
        let mut config = ModelConfig::new(m.id.clone(), Vec::new());
        d.apply_to(&mut config);
        s.apply_to(&mut config);
        let mut marks: Vec<Mark> = Vec::new();
        let (cmd, cmd_at) = match s.cmd {
            Some((argv, cmd_marks)) => {
                marks.extend(cmd_marks);
                (argv.v, Some(argv.at))
            }
            None => (Vec::new(), None),
        };
        let mut env: BTreeMap<String, (String, Vec<Mark>)> = BTreeMap::new();
        for e in &d.env {
            env.insert(e.name.clone(), (e.value.clone(), inherited(&e.marks)));
        }
        for e in s.env {
            env.insert(e.name, (e.value, e.marks));
        }
        for (_, env_marks) in env.values() {
            marks.extend(env_marks.iter().copied());
        }
        let cwd = match s.cwd {
            Some((cwd, cwd_marks)) => {
                marks.extend(cwd_marks);
                Some(cwd)
            }
            None => d.cwd.as_ref().map(|(cwd, cwd_marks)| {
                marks.extend(inherited(cwd_marks));
                cwd.clone()
            }),
        };
        let memory = s.memory.or_else(|| d.memory.clone()).flatten();

        if !s.cmd_seen {
            self.err_help(
                m.id_at,
                format!("model `{}` has no `cmd`", m.id),
                format!("add the command that starts its server, {CMD_EXAMPLE}"),
            );
        }
        let checkable = cmd_at.is_some() && !s.template_error && !d.template_error;
        if let (true, Some(cmd_at)) = (checkable, cmd_at) {
            let uses_port = marks.iter().any(|mk| !mk.socket);
            let first_socket = marks.iter().find(|mk| mk.socket);
            if let (true, Some(sock)) = (uses_port, first_socket) {
                let at = marks
                    .iter()
                    .find(|mk| mk.socket && mk.own)
                    .or_else(|| marks.iter().find(|mk| mk.own))
                    .map_or(sock.at, |mk| mk.at);
                self.err_help(
                    at,
                    format!("model `{}` uses both ${{PORT}} and ${{SOCKET}}", m.id),
                    "a server listens either on a TCP port (${PORT}) or on a unix socket \
                     (${SOCKET}): use only one of them",
                );
            } else if let (Some(_), Some(port)) = (first_socket, &s.port) {
                self.err_help(
                    port.at,
                    format!(
                        "model `{}` has a fixed `port`, but its cmd uses ${{SOCKET}}",
                        m.id
                    ),
                    "a model reached over a unix socket is given no port: remove `port`, \
                     or use ${PORT} instead of ${SOCKET}",
                );
            } else if !uses_port && first_socket.is_none() && s.port.is_none() {
                self.err_help(
                    cmd_at,
                    format!(
                        "model `{}` is never told where to listen: its cmd uses neither ${{PORT}} \
                         nor ${{SOCKET}}, and it has no fixed `port`",
                        m.id
                    ),
                    "add `--port ${PORT}` to cmd, or set `port`",
                );
            }
        }
        if let (Some(mem), Some(budget)) = (&memory, budget) {
            if mem.v > budget.v {
                self.err_help(
                    mem.at,
                    format!(
                        "model `{}` needs {} of memory, more than memory_budget ({})",
                        m.id,
                        units::format_size(mem.v),
                        units::format_size(budget.v)
                    ),
                    "it could never be started: raise memory_budget or lower memory",
                );
            }
        }
        if let (Some(port), Some(l)) = (&s.port, listen) {
            if port.v == l.v.port() {
                self.err_help(
                    port.at,
                    format!(
                        "port {} of model `{}` is llmvisor's own `listen` port",
                        port.v, m.id
                    ),
                    "choose another port for the model",
                );
            }
        }

        let fixed = s.port.as_ref().map(|p| (p.v, p.at));
        config.cmd = cmd;
        config.aliases = s.aliases.into_iter().map(|a| a.v).collect();
        config.env = env.into_iter().map(|(k, (v, _))| (k, v)).collect();
        config.cwd = cwd;
        config.port = s.port.map(|p| p.v);
        config.memory = memory.map(|b| b.v);
        config.kv_persist = self.kv_persist(&config, s.kv_persist.as_ref(), d.kv_persist.as_ref());
        (config, fixed)
    }

    /// Whether `m` saves its slots' KV state: its own `kv_persist`, else `[defaults]`'. An own
    /// `kv_persist = true` on a command that is not llama-server is an error; `[defaults]`
    /// turning it on applies to the llama-server models only.
    fn kv_persist(
        &mut self,
        m: &ModelConfig,
        own: Option<&Sp<bool>>,
        d: Option<&Sp<bool>>,
    ) -> bool {
        let llama = m.cmd.is_empty() || m.is_llama_server();
        match (own, d) {
            (Some(own), _) if own.v && !llama => {
                self.err_help(
                    own.at,
                    format!("model `{}` has kv_persist = true, but its cmd does not run llama-server", m.id),
                    "kv_persist uses llama-server's slot save/restore routes: remove it, or run llama-server \
                     (a cmd is taken as llama-server when one of its words is a path whose file name is `llama-server`)",
                );
                false
            }
            (Some(own), _) => own.v,
            (None, Some(d)) => d.v && llama && !m.cmd.is_empty(),
            (None, None) => false,
        }
    }

    /// Model references (ids or aliases) → ids, without duplicates; unknown ones are reported.
    fn resolve_list(
        &mut self,
        what: &str,
        list: &[Sp<String>],
        names: &HashMap<String, (String, bool)>,
    ) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for r in list {
            match names.get(&r.v) {
                Some((id, _)) => {
                    if !out.contains(id) {
                        out.push(id.clone());
                    }
                }
                None => {
                    let mut ids: Vec<&str> = names
                        .iter()
                        .filter(|(_, (_, alias))| !alias)
                        .map(|(k, _)| k.as_str())
                        .collect();
                    ids.sort_unstable();
                    let known = if ids.is_empty() {
                        "no models are configured".to_string()
                    } else {
                        format!("known models: {}", ids.join(", "))
                    };
                    let help = match closest(&r.v, names.keys().map(String::as_str)) {
                        Some(s) => format!("did you mean `{s}`? {known}"),
                        None => known,
                    };
                    self.err_help(r.at, format!("unknown model `{}` in {what}", r.v), help);
                }
            }
        }
        out
    }
}

/// A TOML value as JSON (date-times as their text; arrays of tables are not kept).
fn json_of(n: &Node) -> serde_json::Value {
    match &n.kind {
        Kind::Str(s) => serde_json::Value::String(s.clone()),
        Kind::Int(i) => serde_json::Value::from(*i),
        Kind::Float(f) => serde_json::Value::from(*f),
        Kind::Bool(b) => serde_json::Value::Bool(*b),
        Kind::Datetime | Kind::TableArray => serde_json::Value::Null,
        Kind::Array(items) => serde_json::Value::Array(items.iter().map(json_of).collect()),
        Kind::Table(fields) => serde_json::Value::Object(
            fields
                .iter()
                .map(|f| (f.key.clone(), json_of(&f.value)))
                .collect(),
        ),
    }
}

fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}
