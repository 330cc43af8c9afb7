//! llama-swap's YAML config format, read as the equivalent llmvisor TOML.
//!
//! The YAML is translated into TOML text (what `llmvisor convert` prints), remembering for
//! every emitted line the YAML position it came from; that TOML then goes through the one TOML
//! parser, so both formats get exactly the same validation, and an error the TOML parser finds
//! is reported at the YAML line:col it came from. Problems only the YAML side can see (its own
//! syntax, types, macros) are reported here, with their YAML positions.
//!
//! Semantics kept from llama-swap:
//! - no groups: one model at a time. Models in no group form the implicit group `(default)`
//!   with `exclusive` (its `swap: true`) and `unload_others` (its `exclusive: true`);
//! - a group's `swap` → `exclusive`, `exclusive` → `unload_others`, `persistent` → `persistent`
//!   (defaults `swap: true`, `exclusive: true`, `persistent: false`, as in llama-swap);
//! - `globalTTL` (default 0 = never) and per-model `ttl` (-1 = the global one, 0 = never);
//! - macros are expanded here, in definition order (a macro may use earlier ones, a model's
//!   own macros override the global ones); `${PORT}`, `${MODEL_ID}` stay for llmvisor, `${PID}`
//!   stays for `cmd_stop`, `${env.X}` stays in commands and env values (llmvisor expands it per
//!   start) and is expanded now everywhere else.
//!
//! Keys llmvisor does not do are warnings that name each one and say what happens instead.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::Path;

use marked_yaml::types::{MarkedMappingNode, MarkedScalarNode};
use marked_yaml::{LoadError, Node};

use super::diagnostic::{closest, ConfigErrors, Diagnostic};
use super::Config;

/// The name llama-swap gives the implicit group of models listed in no group.
pub const DEFAULT_GROUP: &str = "(default)";

/// True when `path` names a llama-swap config (`.yaml` / `.yml`).
pub fn is_yaml_path(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("yaml") || e.eq_ignore_ascii_case("yml"))
}

/// True when `text` looks like llama-swap YAML rather than TOML (used when the file name does
/// not say): a top-level `models:` key line, which TOML cannot have.
pub fn looks_like_yaml(text: &str) -> bool {
    text.lines()
        .any(|l| l.starts_with("models:") || l.starts_with("\"models\":"))
}

/// A llama-swap config translated to llmvisor's TOML.
#[derive(Debug, Clone)]
pub struct Converted {
    /// The equivalent TOML text.
    pub toml: String,
    /// For each line of `toml` (0-based), the YAML line:col it came from (`(0, 0)` = none).
    line_origin: Vec<(usize, usize)>,
    /// Keys llmvisor does not do, and other things worth telling.
    pub warnings: Vec<Diagnostic>,
}

/// Reads a llama-swap YAML config into a [`Config`], with its warnings.
pub fn parse_yaml(
    text: &str,
    path: Option<&Path>,
    env_lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<(Config, Vec<Diagnostic>), ConfigErrors> {
    let converted = convert(text, path, env_lookup)?;
    match super::parse::parse_with_env(&converted.toml, path, env_lookup) {
        Ok(config) => Ok((config, converted.warnings)),
        Err(errors) => {
            let remapped: Vec<Diagnostic> = errors
                .into_diagnostics()
                .into_iter()
                .map(|mut d| {
                    if d.has_position() {
                        let origin = converted
                            .line_origin
                            .get(d.line - 1)
                            .copied()
                            .unwrap_or((0, 0));
                        (d.line, d.col) = origin;
                    }
                    d
                })
                .collect();
            Err(ConfigErrors::from_vec(remapped).expect("errors are never empty"))
        }
    }
}

/// Renders a warning like a diagnostic: `FILE:LINE:COL: warning: MESSAGE`.
pub fn render_warning(d: &Diagnostic) -> String {
    let mut s = if d.has_position() {
        format!("{}:{}:{}: warning: {}", d.file, d.line, d.col, d.message)
    } else {
        format!("{}: warning: {}", d.file, d.message)
    };
    if let Some(help) = &d.help {
        let _ = write!(s, "\n  help: {help}");
    }
    s
}

/// Top-level keys of llama-swap that llmvisor maps.
const TOP_KEYS: &[&str] = &[
    "healthCheckTimeout",
    "logLevel",
    "startPort",
    "globalTTL",
    "macros",
    "apiKeys",
    "includeAliasesInList",
    "sendLoadingState",
    "groups",
    "hooks",
    "models",
    "unloadTimeout",
];

/// Top-level keys of llama-swap that llmvisor does not do, with what happens instead.
const TOP_UNSUPPORTED: &[(&str, &str)] = &[
    (
        "logRequests",
        "requests are logged at the `debug` level (llmvisor serve --log-level debug)",
    ),
    ("logTimeFormat", "llmvisor's log lines carry RFC 3339 times"),
    (
        "logToStdout",
        "model output is kept per model: GET /logs/stream/MODEL or `llmvisor logs MODEL`",
    ),
    (
        "metricsMaxInMemory",
        "metrics are Prometheus counters at GET /metrics; nothing is kept per request",
    ),
    ("captureBuffer", "request/response capture is not done"),
    ("store", "nothing is stored beyond llmvisor's state dir"),
    ("ui", "llmvisor's dashboard is at /ui/"),
    ("performance", "system gauges are not sampled"),
    (
        "profiles",
        "profiles are not supported: request a model by its id or alias",
    ),
    (
        "selectors",
        "selectors are not supported: request a model by its id or alias",
    ),
    (
        "routing",
        "only top-level `groups` are read; llmvisor's admission scheduler decides the order",
    ),
    ("matrix", "matrix sets are not supported: use groups"),
    (
        "peers",
        "peers are not proxied: only the models of this file are served",
    ),
    (
        "upstream",
        "upstream path rules are not supported: /upstream/MODEL/PATH passes every path",
    ),
    (
        "scheduler",
        "llmvisor's admission scheduler is used (swap-aware FIFO)",
    ),
    ("router", "only top-level `groups` are read"),
];

/// Per-model keys that llmvisor maps.
const MODEL_KEYS: &[&str] = &[
    "cmd",
    "cmdStop",
    "proxy",
    "aliases",
    "env",
    "checkEndpoint",
    "ttl",
    "unloadTimeout",
    "unlisted",
    "useModelName",
    "name",
    "description",
    "concurrencyLimit",
    "filters",
    "macros",
    "metadata",
    "sendLoadingState",
    "healthCheckTimeout",
];

/// Per-model keys that llmvisor does not do.
const MODEL_UNSUPPORTED: &[(&str, &str)] = &[
    (
        "timeouts",
        "llmvisor's own timeouts apply (send_timeout, startup_timeout, stop_timeout)",
    ),
    ("compat", "websockets are not proxied"),
    (
        "capabilities",
        "capabilities are not reported in /v1/models",
    ),
];

type Pos = (usize, usize);

struct Conv<'a> {
    file: String,
    env: &'a dyn Fn(&str) -> Option<String>,
    errors: Vec<Diagnostic>,
    warnings: Vec<Diagnostic>,
    out: String,
    origin: Vec<Pos>,
}

fn pos_of(node: &Node) -> Pos {
    node.span()
        .start()
        .map_or((0, 0), |m| (m.line(), m.column()))
}

fn spos(node: &MarkedScalarNode) -> Pos {
    node.span()
        .start()
        .map_or((0, 0), |m| (m.line(), m.column()))
}

fn describe(node: &Node) -> &'static str {
    match node {
        Node::Scalar(_) => "a scalar",
        Node::Mapping(_) => "a mapping",
        Node::Sequence(_) => "a list",
    }
}

/// A TOML basic string.
fn q(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn q_list<S: AsRef<str>>(items: &[S]) -> String {
    let parts: Vec<String> = items.iter().map(|s| q(s.as_ref())).collect();
    format!("[{}]", parts.join(", "))
}

/// A scalar's value as JSON, typed as YAML 1.2's core schema types an unquoted scalar.
fn scalar_json(s: &MarkedScalarNode, text: String) -> serde_json::Value {
    if !s.may_coerce() {
        return serde_json::Value::String(text);
    }
    match text.as_str() {
        "true" | "True" | "TRUE" => return serde_json::Value::Bool(true),
        "false" | "False" | "FALSE" => return serde_json::Value::Bool(false),
        "null" | "Null" | "NULL" | "~" | "" => return serde_json::Value::Null,
        _ => {}
    }
    if let Ok(i) = text.parse::<i64>() {
        return serde_json::Value::from(i);
    }
    if let Ok(f) = text.parse::<f64>() {
        if f.is_finite() && text.chars().any(|c| c.is_ascii_digit()) {
            return serde_json::Value::from(f);
        }
    }
    serde_json::Value::String(text)
}

/// A JSON value as a TOML inline value; `None` for null (TOML has none).
fn toml_value(v: &serde_json::Value) -> Option<String> {
    Some(match v {
        serde_json::Value::Null => return None,
        serde_json::Value::Bool(b) => b.to_string(),
        serde_json::Value::Number(n) => {
            if n.is_f64() {
                let f = n.as_f64().unwrap_or(0.0);
                let s = f.to_string();
                if s.contains(['.', 'e', 'E']) {
                    s
                } else {
                    format!("{s}.0")
                }
            } else {
                n.to_string()
            }
        }
        serde_json::Value::String(s) => q(s),
        serde_json::Value::Array(a) => {
            let items: Vec<String> = a.iter().filter_map(toml_value).collect();
            format!("[{}]", items.join(", "))
        }
        serde_json::Value::Object(o) => {
            let items: Vec<String> = o
                .iter()
                .filter_map(|(k, v)| toml_value(v).map(|v| format!("{} = {v}", q(k))))
                .collect();
            if items.is_empty() {
                "{}".to_string()
            } else {
                format!("{{ {} }}", items.join(", "))
            }
        }
    })
}

/// Where `${env.X}` is left for llmvisor to expand per start.
#[derive(Clone, Copy, PartialEq, Eq)]
enum EnvMode {
    Keep,
    Expand,
}

/// Macros in scope: name → value, in definition order.
type Macros = Vec<(String, String)>;

/// One group as read.
struct Group {
    name: String,
    at: Pos,
    members: Vec<(String, Pos)>,
    swap: bool,
    exclusive: bool,
    persistent: bool,
}

/// The translated TOML of one model (lines with positions) and what groups need to know.
struct ModelOut {
    id: String,
    at: Pos,
    lines: Vec<(String, Pos)>,
}

impl Conv<'_> {
    fn err(&mut self, at: Pos, message: impl Into<String>, help: Option<String>) {
        self.errors.push(Diagnostic {
            file: self.file.clone(),
            line: at.0,
            col: at.1,
            message: message.into(),
            help,
        });
    }

    fn warn(&mut self, at: Pos, message: impl Into<String>, help: Option<String>) {
        self.warnings.push(Diagnostic {
            file: self.file.clone(),
            line: at.0,
            col: at.1,
            message: message.into(),
            help,
        });
    }

    fn line(&mut self, text: impl Into<String>, at: Pos) {
        let text = text.into();
        for l in text.split('\n') {
            self.out.push_str(l);
            self.out.push('\n');
            self.origin.push(at);
        }
    }

    fn scalar<'n>(&mut self, key: &str, node: &'n Node) -> Option<&'n MarkedScalarNode> {
        match node {
            Node::Scalar(s) => Some(s),
            other => {
                self.err(
                    pos_of(other),
                    format!("`{key}` must be a scalar, found {}", describe(other)),
                    None,
                );
                None
            }
        }
    }

    fn mapping<'n>(&mut self, key: &str, node: &'n Node) -> Option<&'n MarkedMappingNode> {
        match node {
            Node::Mapping(m) => Some(m),
            // `key:` with nothing after it is an empty scalar: treat as an empty mapping.
            Node::Scalar(s) if s.as_str().is_empty() => None,
            other => {
                self.err(
                    pos_of(other),
                    format!("`{key}` must be a mapping, found {}", describe(other)),
                    None,
                );
                None
            }
        }
    }

    fn int(&mut self, key: &str, node: &Node) -> Option<i64> {
        let s = self.scalar(key, node)?;
        match s.as_str().trim().parse::<i64>() {
            Ok(i) => Some(i),
            Err(_) => {
                self.err(
                    spos(s),
                    format!("`{key}` must be an integer, found {:?}", s.as_str()),
                    None,
                );
                None
            }
        }
    }

    fn boolean(&mut self, key: &str, node: &Node) -> Option<bool> {
        let s = self.scalar(key, node)?;
        match s.as_bool() {
            Some(b) => Some(b),
            None => {
                self.err(
                    spos(s),
                    format!("`{key}` must be true or false, found {:?}", s.as_str()),
                    None,
                );
                None
            }
        }
    }

    /// A list of strings (a single scalar counts as a list of one).
    fn strings(&mut self, key: &str, node: &Node) -> Vec<(String, Pos)> {
        match node {
            Node::Scalar(s) if s.as_str().is_empty() => Vec::new(),
            Node::Scalar(s) => vec![(s.as_str().to_string(), spos(s))],
            Node::Sequence(seq) => seq
                .iter()
                .filter_map(|n| {
                    self.scalar(key, n)
                        .map(|s| (s.as_str().to_string(), spos(s)))
                })
                .collect(),
            Node::Mapping(m) => {
                self.err(
                    pos_of(node),
                    format!("`{key}` must be a list of strings, found a mapping"),
                    None,
                );
                let _ = m;
                Vec::new()
            }
        }
    }

    /// Expands macros (and, with [`EnvMode::Expand`], `${env.X}`) in `s`. Unknown macros are
    /// errors at `at`.
    fn expand(&mut self, s: &str, macros: &Macros, env: EnvMode, at: Pos) -> String {
        let mut out = String::with_capacity(s.len());
        let mut rest = s;
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let Some(end) = after.find('}') else {
                out.push_str(&rest[start..]);
                rest = "";
                break;
            };
            let name = &after[..end];
            rest = &after[end + 1..];
            if let Some((_, v)) = macros.iter().rev().find(|(n, _)| n == name) {
                out.push_str(v);
            } else if matches!(name, "PORT" | "MODEL_ID" | "PID") {
                let _ = write!(out, "${{{name}}}");
            } else if let Some(var) = name.strip_prefix("env.") {
                match env {
                    EnvMode::Keep => {
                        let _ = write!(out, "${{{name}}}");
                    }
                    EnvMode::Expand => match (self.env)(var) {
                        Some(v) => out.push_str(&v),
                        None => self.err(
                            at,
                            format!(
                                "environment variable `{var}` is not set (used as ${{{name}}})"
                            ),
                            Some(format!("set {var} in llmvisor's environment")),
                        ),
                    },
                }
            } else {
                let known: Vec<&str> = macros.iter().map(|(n, _)| n.as_str()).collect();
                let help = closest(name, known.iter().copied())
                    .map(|c| format!("did you mean ${{{c}}}?"))
                    .or_else(|| {
                        Some("define it under `macros:` (top level or in the model)".into())
                    });
                self.err(at, format!("unknown macro `${{{name}}}`"), help);
            }
        }
        out.push_str(rest);
        out
    }

    /// Reads a `macros:` mapping onto `scope`, in order (each may use the ones before it).
    fn macros(&mut self, node: &Node, scope: &mut Macros) {
        let Some(map) = self.mapping("macros", node) else {
            return;
        };
        for (k, v) in map.iter() {
            let name = k.as_str();
            if matches!(name, "PORT" | "MODEL_ID" | "PID") || name.starts_with("env.") {
                self.err(
                    spos(k),
                    format!("macro name `{name}` is reserved"),
                    Some("choose another name".into()),
                );
                continue;
            }
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
            {
                self.err(
                    spos(k),
                    format!(
                        "macro name {name:?} may contain only letters, digits, `_`, `-` and `.`"
                    ),
                    None,
                );
                continue;
            }
            let Some(s) = self.scalar(&format!("macros.{name}"), v) else {
                continue;
            };
            let value = self.expand(s.as_str(), scope, EnvMode::Keep, spos(s));
            scope.retain(|(n, _)| n != name);
            scope.push((name.to_string(), value));
        }
    }

    /// A YAML value as JSON with macros and env expanded in its strings.
    fn json(&mut self, node: &Node, macros: &Macros) -> serde_json::Value {
        match node {
            Node::Scalar(s) => {
                let text = self.expand(s.as_str(), macros, EnvMode::Expand, spos(s));
                scalar_json(s, text)
            }
            Node::Sequence(seq) => {
                serde_json::Value::Array(seq.iter().map(|n| self.json(n, macros)).collect())
            }
            Node::Mapping(m) => serde_json::Value::Object(
                m.iter()
                    .map(|(k, v)| {
                        let key = self.expand(k.as_str(), macros, EnvMode::Expand, spos(k));
                        (key, self.json(v, macros))
                    })
                    .collect(),
            ),
        }
    }

    fn unknown_key(
        &mut self,
        key: &MarkedScalarNode,
        known: &[&str],
        unsupported: &[(&str, &str)],
        scope: &str,
    ) {
        let name = key.as_str();
        if let Some((_, instead)) = unsupported.iter().find(|(k, _)| *k == name) {
            self.warn(
                spos(key),
                format!("llmvisor does not do `{name}`{scope}; ignored"),
                Some((*instead).to_string()),
            );
            return;
        }
        let candidates = known.iter().chain(unsupported.iter().map(|(k, _)| k));
        let help = closest(name, candidates.copied()).map(|c| format!("did you mean `{c}`?"));
        self.warn(
            spos(key),
            format!("unknown key `{name}`{scope}; ignored"),
            help,
        );
    }

    fn run(&mut self, text: &str) {
        let root = match marked_yaml::parse_yaml(0, text) {
            Ok(root) => root,
            Err(e) => {
                let (at, message) = load_error(&e);
                self.err(at, message, yaml_help(&e));
                return;
            }
        };
        let Node::Mapping(top) = &root else {
            return;
        };

        // Global macros first: every other key may use them, wherever it is written.
        let mut globals: Macros = Vec::new();
        if let Some(m) = top.get_node("macros") {
            self.macros(m, &mut globals);
        }

        let file_name = self.file.clone();
        self.line(
            format!("# llmvisor config converted from llama-swap's {file_name}"),
            (0, 0),
        );
        let mut defaults: Vec<(String, Pos)> = vec![(
            "ttl = \"0\"                      # globalTTL (llama-swap: 0 = never unload)".into(),
            (0, 0),
        )];
        let mut groups: Vec<Group> = Vec::new();
        let mut models: Vec<ModelOut> = Vec::new();
        let mut preload: Vec<(String, Pos)> = Vec::new();
        for (k, v) in top.iter() {
            let at = spos(k);
            match k.as_str() {
                "macros" => {}
                "healthCheckTimeout" => {
                    if let Some(n) = self.int("healthCheckTimeout", v) {
                        match n {
                            n if n > 0 => defaults.push((
                                format!("startup_timeout = \"{n}s\"       # healthCheckTimeout"),
                                at,
                            )),
                            _ => self.err(
                                at,
                                "`healthCheckTimeout` must be more than 0 seconds",
                                None,
                            ),
                        }
                    }
                }
                "logLevel" => {
                    if let Some(s) = self.scalar("logLevel", v) {
                        self.warn(
                            at,
                            format!("`logLevel: {}` is not read from the config", s.as_str()),
                            Some("use `llmvisor serve --log-level LEVEL` (or RUST_LOG)".into()),
                        );
                    }
                }
                "startPort" => {
                    if let Some(n) = self.int("startPort", v) {
                        match u16::try_from(n) {
                            Ok(p) if p > 0 => {
                                let last = p.saturating_add(999);
                                self.line(
                                    format!("port_range = [{p}, {last}]        # startPort"),
                                    at,
                                );
                            }
                            _ => self.err(
                                at,
                                format!("`startPort` must be a port (1-65535), found {n}"),
                                None,
                            ),
                        }
                    }
                }
                "globalTTL" => {
                    if let Some(n) = self.int("globalTTL", v) {
                        defaults.retain(|(l, _)| !l.starts_with("ttl ="));
                        match n {
                            0 => defaults.push(("ttl = \"0\"                      # globalTTL: never".into(), at)),
                            n if n > 0 => defaults.push((format!("ttl = \"{n}s\"                    # globalTTL"), at)),
                            n => self.err(at, format!("`globalTTL` must be 0 (never) or a number of seconds, found {n}"), None),
                        }
                    }
                }
                "unloadTimeout" => {
                    if let Some(n) = self.int("unloadTimeout", v) {
                        if n > 0 {
                            defaults.push((
                                format!("drain_timeout = \"{n}s\"          # unloadTimeout"),
                                at,
                            ));
                        }
                    }
                }
                "apiKeys" => {
                    let keys: Vec<String> = self
                        .strings("apiKeys", v)
                        .into_iter()
                        .map(|(s, p)| self.expand(&s, &globals, EnvMode::Expand, p))
                        .filter(|s| !s.is_empty())
                        .collect();
                    self.line(format!("api_keys = {}", q_list(&keys)), at);
                }
                "includeAliasesInList" => {
                    if let Some(b) = self.boolean("includeAliasesInList", v) {
                        self.line(format!("include_aliases_in_list = {b}"), at);
                    }
                }
                "sendLoadingState" => {
                    if let Some(b) = self.boolean("sendLoadingState", v) {
                        defaults.push((format!("send_loading_state = {b}"), at));
                    }
                }
                "groups" => {
                    if let Some(map) = self.mapping("groups", v) {
                        for (name, g) in map.iter() {
                            groups.push(self.group(name, g));
                        }
                    }
                }
                "hooks" => {
                    if let Some(h) = self.mapping("hooks", v) {
                        for (hk, hv) in h.iter() {
                            if hk.as_str() != "on_startup" {
                                self.unknown_key(hk, &["on_startup"], &[], " in hooks");
                                continue;
                            }
                            let Some(os) = self.mapping("hooks.on_startup", hv) else {
                                continue;
                            };
                            for (ok, ov) in os.iter() {
                                if ok.as_str() == "preload" {
                                    preload.extend(self.strings("preload", ov));
                                } else {
                                    self.unknown_key(ok, &["preload"], &[], " in hooks.on_startup");
                                }
                            }
                        }
                    }
                }
                "models" => {
                    if let Some(map) = self.mapping("models", v) {
                        for (id, m) in map.iter() {
                            if let Some(out) = self.model(id, m, &globals) {
                                models.push(out);
                            }
                        }
                    }
                }
                _ => self.unknown_key(k, TOP_KEYS, TOP_UNSUPPORTED, ""),
            }
        }
        if !preload.is_empty() {
            let at = preload[0].1;
            let names: Vec<&str> = preload.iter().map(|(s, _)| s.as_str()).collect();
            self.line(
                format!(
                    "preload = {}          # hooks.on_startup.preload",
                    q_list(&names)
                ),
                at,
            );
        }
        if models.is_empty() {
            self.warn(
                (0, 0),
                "no models are defined (`models:` is missing or empty)",
                None,
            );
        }

        self.line("", (0, 0));
        self.line("[defaults]", (0, 0));
        for (l, at) in defaults {
            self.line(l, at);
        }

        // Groups, then the implicit `(default)` group of every model in none.
        let mut in_group: HashMap<String, String> = HashMap::new();
        for g in &groups {
            for (m, at) in &g.members {
                if let Some(other) = in_group.get(m) {
                    if *other != g.name {
                        let msg = format!(
                            "model `{m}` is in group `{other}` and in group `{}`",
                            g.name
                        );
                        self.err(*at, msg, Some("a model may be in one group only".into()));
                    }
                } else {
                    in_group.insert(m.clone(), g.name.clone());
                }
            }
        }
        let ungrouped: Vec<(String, Pos)> = models
            .iter()
            .filter(|m| !in_group.contains_key(&m.id))
            .map(|m| (m.id.clone(), m.at))
            .collect();
        if !ungrouped.is_empty() {
            groups.push(Group {
                name: DEFAULT_GROUP.to_string(),
                at: (0, 0),
                members: ungrouped,
                swap: true,
                exclusive: true,
                persistent: false,
            });
        }
        for g in &groups {
            self.line("", (0, 0));
            if g.name == DEFAULT_GROUP {
                self.line(
                    "# llama-swap's implicit group: every model in no group, one at a time",
                    (0, 0),
                );
            }
            self.line(format!("[groups.{}]", q(&g.name)), g.at);
            let names: Vec<&str> = g.members.iter().map(|(s, _)| s.as_str()).collect();
            let at = g.members.first().map_or(g.at, |m| m.1);
            self.line(format!("members = {}", q_list(&names)), at);
            self.line(
                format!("exclusive = {}                # swap", g.swap),
                g.at,
            );
            self.line(
                format!("unload_others = {}            # exclusive", g.exclusive),
                g.at,
            );
            self.line(format!("persistent = {}", g.persistent), g.at);
        }

        for m in models {
            self.line("", (0, 0));
            self.line(format!("[models.{}]", q(&m.id)), m.at);
            for (l, at) in m.lines {
                self.line(l, at);
            }
        }
    }

    fn group(&mut self, name: &MarkedScalarNode, node: &Node) -> Group {
        let mut g = Group {
            name: name.as_str().to_string(),
            at: spos(name),
            members: Vec::new(),
            swap: true,
            exclusive: true,
            persistent: false,
        };
        if g.name == DEFAULT_GROUP {
            self.err(
                g.at,
                format!("the group name `{DEFAULT_GROUP}` is reserved"),
                Some("choose another name".into()),
            );
        }
        let Some(map) = self.mapping("groups", node) else {
            return g;
        };
        for (k, v) in map.iter() {
            match k.as_str() {
                "swap" => g.swap = self.boolean("swap", v).unwrap_or(true),
                "exclusive" => g.exclusive = self.boolean("exclusive", v).unwrap_or(true),
                "persistent" => g.persistent = self.boolean("persistent", v).unwrap_or(false),
                "members" => g.members = self.strings("members", v),
                _ => self.unknown_key(
                    k,
                    &["swap", "exclusive", "persistent", "members"],
                    &[],
                    &format!(" in group `{}`", g.name),
                ),
            }
        }
        g
    }

    fn model(&mut self, id: &MarkedScalarNode, node: &Node, globals: &Macros) -> Option<ModelOut> {
        let id_str = id.as_str().to_string();
        let at = spos(id);
        let map = self.mapping(&format!("models.{id_str}"), node)?;
        let mut macros = globals.clone();
        macros.push(("MODEL_ID".to_string(), id_str.clone()));
        if let Some(m) = map.get_node("macros") {
            self.macros(m, &mut macros);
        }
        let mut lines: Vec<(String, Pos)> = Vec::new();
        let mut aliases: Vec<String> = Vec::new();
        let mut alias_at = at;
        let mut cmd_seen = false;
        let scope = format!(" in model `{id_str}`");
        for (k, v) in map.iter() {
            let kat = spos(k);
            match k.as_str() {
                "macros" => {}
                "cmd" => {
                    cmd_seen = true;
                    if let Some(s) = self.scalar("cmd", v) {
                        let text = self.expand(s.as_str(), &macros, EnvMode::Keep, spos(s));
                        match split_cmd(&text) {
                            Ok(argv) if !argv.is_empty() => {
                                lines.push((format!("cmd = {}", q_list(&argv)), spos(s)))
                            }
                            Ok(_) => self.err(
                                spos(s),
                                "`cmd` is empty",
                                Some("write the command that starts the server".into()),
                            ),
                            Err(e) => self.err(
                                spos(s),
                                format!("`cmd` cannot be split into words: {e}"),
                                None,
                            ),
                        }
                    }
                }
                "cmdStop" => {
                    if let Some(s) = self.scalar("cmdStop", v) {
                        let text = self.expand(s.as_str(), &macros, EnvMode::Keep, spos(s));
                        match split_cmd(&text) {
                            Ok(argv) if !argv.is_empty() => {
                                lines.push((format!("cmd_stop = {}", q_list(&argv)), spos(s)))
                            }
                            Ok(_) => {}
                            Err(e) => self.err(
                                spos(s),
                                format!("`cmdStop` cannot be split into words: {e}"),
                                None,
                            ),
                        }
                    }
                }
                "proxy" => {
                    if let Some(s) = self.scalar("proxy", v) {
                        let text = self.expand(s.as_str(), &macros, EnvMode::Expand, spos(s));
                        match proxy_port(&text) {
                            Ok(None) => {}
                            Ok(Some(port)) => lines.push((format!("port = {port}                    # proxy: {text}"), spos(s))),
                            Err(why) => self.err(
                                spos(s),
                                format!("`proxy: {text}` cannot be served: {why}"),
                                Some("llmvisor reaches a model's server on this machine: use http://127.0.0.1:${PORT} (the default) or http://127.0.0.1:FIXED_PORT".into()),
                            ),
                        }
                    }
                }
                "aliases" => {
                    alias_at = kat;
                    match v {
                        Node::Sequence(seq) => {
                            for a in seq.iter() {
                                match a {
                                    Node::Scalar(s) => aliases.push(self.expand(
                                        s.as_str(),
                                        &macros,
                                        EnvMode::Expand,
                                        spos(s),
                                    )),
                                    Node::Mapping(am) => {
                                        for (ak, av) in am.iter() {
                                            match ak.as_str() {
                                                "id" => {
                                                    if let Some(s) = self.scalar("aliases.id", av) {
                                                        aliases.push(self.expand(s.as_str(), &macros, EnvMode::Expand, spos(s)));
                                                    }
                                                }
                                                "name" | "unlisted" => self.warn(
                                                    spos(ak),
                                                    format!("an alias's own `{}` is not supported{scope}; ignored", ak.as_str()),
                                                    Some("aliases share their model's name and listing".into()),
                                                ),
                                                _ => self.unknown_key(ak, &["id", "name", "unlisted"], &[], &format!(" in an alias{scope}")),
                                            }
                                        }
                                    }
                                    other => self.err(
                                        pos_of(other),
                                        "an alias must be a string or {id, name, unlisted}",
                                        None,
                                    ),
                                }
                            }
                        }
                        other => {
                            for (s, p) in self.strings("aliases", other) {
                                aliases.push(self.expand(&s, &macros, EnvMode::Expand, p));
                            }
                        }
                    }
                }
                "env" => {
                    let mut table = Vec::new();
                    for (entry, p) in self.strings("env", v) {
                        let entry = self.expand(&entry, &macros, EnvMode::Keep, p);
                        match entry.split_once('=') {
                            Some((name, value)) if !name.is_empty() => {
                                table.push(format!("{} = {}", q(name), q(value)))
                            }
                            _ => self.err(
                                p,
                                format!("env entry {entry:?} is not NAME=VALUE"),
                                Some("e.g. - \"CUDA_VISIBLE_DEVICES=0\"".into()),
                            ),
                        }
                    }
                    if !table.is_empty() {
                        lines.push((format!("env = {{ {} }}", table.join(", ")), kat));
                    }
                }
                "checkEndpoint" => {
                    if let Some(s) = self.scalar("checkEndpoint", v) {
                        let text = self.expand(s.as_str(), &macros, EnvMode::Expand, spos(s));
                        if text == "none" || text.is_empty() {
                            lines.push(("health_path = \"none\"           # checkEndpoint: none (ready once the port accepts connections)".into(), spos(s)));
                        } else {
                            let path = if text.starts_with('/') {
                                text
                            } else {
                                format!("/{text}")
                            };
                            lines.push((format!("health_path = {}", q(&path)), spos(s)));
                        }
                    }
                }
                "ttl" => {
                    if let Some(n) = self.int("ttl", v) {
                        match n {
                            -1 => {}
                            0 => lines.push((
                                "ttl = \"0\"                      # never unloaded".into(),
                                kat,
                            )),
                            n if n > 0 => lines.push((format!("ttl = \"{n}s\""), kat)),
                            n => self.err(
                                kat,
                                format!(
                                    "`ttl` must be -1 (globalTTL), 0 (never) or seconds, found {n}"
                                ),
                                None,
                            ),
                        }
                    }
                }
                "unloadTimeout" => {
                    if let Some(n) = self.int("unloadTimeout", v) {
                        if n > 0 {
                            lines.push((
                                format!("drain_timeout = \"{n}s\"          # unloadTimeout"),
                                kat,
                            ));
                        }
                    }
                }
                "healthCheckTimeout" => {
                    if let Some(n) = self.int("healthCheckTimeout", v) {
                        if n > 0 {
                            lines.push((
                                format!("startup_timeout = \"{n}s\"        # healthCheckTimeout"),
                                kat,
                            ));
                        }
                    }
                }
                "unlisted" => {
                    if let Some(b) = self.boolean("unlisted", v) {
                        lines.push((format!("unlisted = {b}"), kat));
                    }
                }
                "sendLoadingState" => {
                    if let Some(b) = self.boolean("sendLoadingState", v) {
                        lines.push((format!("send_loading_state = {b}"), kat));
                    }
                }
                "useModelName" | "name" | "description" => {
                    let key = match k.as_str() {
                        "useModelName" => "use_model_name",
                        other => other,
                    };
                    if let Some(s) = self.scalar(k.as_str(), v) {
                        let text = self.expand(s.as_str(), &macros, EnvMode::Expand, spos(s));
                        if !text.is_empty() {
                            lines.push((format!("{key} = {}", q(&text)), spos(s)));
                        }
                    }
                }
                "concurrencyLimit" => {
                    if let Some(n) = self.int("concurrencyLimit", v) {
                        match n {
                            0 => {}
                            n if n > 0 => lines.push((format!("concurrency_limit = {n}"), kat)),
                            n => self.err(
                                kat,
                                format!(
                                    "`concurrencyLimit` must be 0 (no limit) or more, found {n}"
                                ),
                                None,
                            ),
                        }
                    }
                }
                "metadata" => {
                    let value = self.json(v, &macros);
                    match &value {
                        serde_json::Value::Object(_) => {
                            if let Some(t) = toml_value(&value) {
                                lines.push((format!("metadata = {t}"), kat));
                            }
                        }
                        serde_json::Value::Null => {}
                        _ => self.err(pos_of(v), "`metadata` must be a mapping", None),
                    }
                }
                "filters" => {
                    if let Some(f) = self.mapping("filters", v) {
                        let mut parts = Vec::new();
                        for (fk, fv) in f.iter() {
                            match fk.as_str() {
                                "stripParams" | "strip_params" => {
                                    if let Some(s) = self.scalar("stripParams", fv) {
                                        let text = self.expand(
                                            s.as_str(),
                                            &macros,
                                            EnvMode::Expand,
                                            spos(s),
                                        );
                                        let names: Vec<&str> = text
                                            .split(',')
                                            .map(str::trim)
                                            .filter(|s| !s.is_empty() && *s != "model")
                                            .collect();
                                        parts.push(format!("strip_params = {}", q_list(&names)));
                                    }
                                }
                                "setParams" => {
                                    let value = self.json(fv, &macros);
                                    match &value {
                                        serde_json::Value::Object(_) => parts.push(format!(
                                            "set_params = {}",
                                            toml_value(&value).unwrap_or_default()
                                        )),
                                        _ => self.err(
                                            pos_of(fv),
                                            "`setParams` must be a mapping",
                                            None,
                                        ),
                                    }
                                }
                                "setParamsByID" => {
                                    let value = self.json(fv, &macros);
                                    match &value {
                                        serde_json::Value::Object(o) => {
                                            for name in o.keys() {
                                                if *name != id_str && !aliases.contains(name) {
                                                    aliases.push(name.clone());
                                                }
                                            }
                                            parts.push(format!("set_params_by_id = {}", toml_value(&value).unwrap_or_default()));
                                        }
                                        _ => self.err(pos_of(fv), "`setParamsByID` must be a mapping of model id/alias → params", None),
                                    }
                                }
                                _ => self.unknown_key(
                                    fk,
                                    &["stripParams", "setParams", "setParamsByID"],
                                    &[],
                                    &format!(" in filters{scope}"),
                                ),
                            }
                        }
                        if !parts.is_empty() {
                            lines.push((format!("filters = {{ {} }}", parts.join(", ")), kat));
                        }
                    }
                }
                _ => self.unknown_key(k, MODEL_KEYS, MODEL_UNSUPPORTED, &scope),
            }
        }
        if !cmd_seen {
            self.err(at, format!("model `{id_str}` has no `cmd`"), Some("add the command that starts its server, e.g. cmd: llama-server --port ${PORT} -m model.gguf".into()));
        }
        aliases.retain(|a| *a != id_str);
        if !aliases.is_empty() {
            lines.push((format!("aliases = {}", q_list(&aliases)), alias_at));
        }
        Some(ModelOut {
            id: id_str,
            at,
            lines,
        })
    }
}

/// llama-swap's command text → argv: `#` comment lines dropped, `\` line continuations joined,
/// then split like a shell would split words (no shell runs it).
pub fn split_cmd(text: &str) -> Result<Vec<String>, shell_words::ParseError> {
    let mut joined = String::with_capacity(text.len());
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || trimmed.is_empty() {
            continue;
        }
        let line = trimmed.strip_suffix('\\').unwrap_or(trimmed);
        joined.push_str(line);
        joined.push(' ');
    }
    shell_words::split(&joined)
}

/// `proxy` → a fixed port (`Some`), the default `${PORT}` (`None`), or why it cannot be served.
fn proxy_port(url: &str) -> Result<Option<u16>, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| "only http:// URLs are supported".to_string())?;
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    if !path.is_empty() {
        return Err(format!(
            "a path (/{path}) after the address is not supported"
        ));
    }
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (h, p),
        None => (authority, "80"),
    };
    if !matches!(host, "127.0.0.1" | "localhost" | "[::1]" | "0.0.0.0") {
        return Err(format!("host `{host}` is not this machine"));
    }
    if port == "${PORT}" {
        return Ok(None);
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(Some(p)),
        _ => Err(format!("`{port}` is not a port")),
    }
}

fn load_error(e: &LoadError) -> (Pos, String) {
    let (m, what) = match e {
        LoadError::TopLevelMustBeMapping(m) => (
            m,
            "the top level must be a mapping (key: value)".to_string(),
        ),
        LoadError::TopLevelMustBeSequence(m) => (m, "the top level must be a list".to_string()),
        LoadError::UnexpectedAnchor(m) => (
            m,
            "YAML anchors and aliases (&x, *x) are not supported".to_string(),
        ),
        LoadError::MappingKeyMustBeScalar(m) => {
            (m, "a mapping key must be a plain value".to_string())
        }
        LoadError::UnexpectedTag(m) => (m, "YAML tags (!x) are not supported".to_string()),
        LoadError::ScanError(m, se) => (m, format!("invalid YAML: {}", se.info())),
        LoadError::DuplicateKey(inner) => {
            let key = &inner.key;
            let at = spos(key);
            return (
                at,
                format!("key `{}` appears twice in one mapping", key.as_str()),
            );
        }
    };
    ((m.line(), m.column()), what)
}

fn yaml_help(e: &LoadError) -> Option<String> {
    match e {
        LoadError::UnexpectedAnchor(_) => Some("use `macros:` for shared values".into()),
        LoadError::ScanError(..) => {
            Some("check the indentation and quoting around this place".into())
        }
        _ => None,
    }
}

/// Translates llama-swap YAML to llmvisor TOML (what `llmvisor convert` prints).
pub fn convert(
    text: &str,
    path: Option<&Path>,
    env_lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<Converted, ConfigErrors> {
    let file = path.map_or_else(|| "<config>".to_string(), |p| p.display().to_string());
    let mut conv = Conv {
        file,
        env: env_lookup,
        errors: Vec::new(),
        warnings: Vec::new(),
        out: String::new(),
        origin: Vec::new(),
    };
    conv.run(text);
    if let Some(errors) = ConfigErrors::from_vec(std::mem::take(&mut conv.errors)) {
        return Err(errors);
    }
    Ok(Converted {
        toml: conv.out,
        line_origin: conv.origin,
        warnings: conv.warnings,
    })
}

/// One line per model: how a llama-swap model maps (for `llmvisor check`).
pub fn mapping_summary(config: &Config) -> String {
    let mut out = String::new();
    let group_of: BTreeMap<&str, (&str, &super::GroupConfig)> = config
        .groups
        .iter()
        .flat_map(|(name, g)| {
            g.members
                .iter()
                .map(move |m| (m.as_str(), (name.as_str(), g)))
        })
        .collect();
    for m in &config.models {
        let address = match m.port {
            Some(p) => format!("127.0.0.1:{p} (fixed)"),
            None if m.uses_socket() => "unix socket".to_string(),
            None => format!(
                "127.0.0.1:${{PORT}} from {}-{}",
                config.port_range.0, config.port_range.1
            ),
        };
        let ttl = match m.ttl {
            None => "never".to_string(),
            Some(d) => crate::units::format_duration(d),
        };
        let group = match group_of.get(m.id.as_str()) {
            None => "no group".to_string(),
            Some((name, g)) => {
                let mut rules = Vec::new();
                if g.exclusive {
                    rules.push("one member at a time");
                } else {
                    rules.push("members run together");
                }
                if g.unload_others {
                    rules.push("unloads other groups");
                }
                if g.persistent {
                    rules.push("never unloaded by others");
                }
                format!("group {name}: {}", rules.join(", "))
            }
        };
        let _ = writeln!(
            out,
            "  {}: cmd {} | address {address} | ttl {ttl} | {group}",
            m.id,
            shell_words::join(&m.cmd)
        );
    }
    out
}
