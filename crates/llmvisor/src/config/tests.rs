use std::path::Path;
use std::time::Duration;

use super::*;

/// The example of SPEC.md's "Config file (TOML)" section, verbatim.
const SPEC_EXAMPLE: &str = r#"listen = "127.0.0.1:8080"        # default; a non-loopback address without api_keys is refused unless allow_insecure = true
state_dir = "/var/lib/llmvisor"  # default: $XDG_STATE_HOME/llmvisor, else ~/.local/state/llmvisor
port_range = [10500, 10999]      # ports handed to ${PORT}; default shown
api_keys = ["sk-local-1"]        # optional: required as "Authorization: Bearer KEY" on /v1/* and /upstream/*
admin_keys = ["adm-1"]           # optional: required on /api/*; when absent, api_keys apply there too
max_loaded = 2                   # optional: at most this many servers at once
memory_budget = "20GiB"          # optional: the sum of running models' memory stays under this
queue_timeout = "5m"             # how long a request may wait for room before a 503
preload = ["gemma-3-270m"]       # started when the daemon starts

[groups.big-gpu]                 # optional: members = [...]; exclusive = true -> one member at a time
members = ["gemma-3-270m"]
exclusive = true

[defaults]                       # optional; any per-model key below may be set here
ttl = "10m"                      # idle time after the last lease before the server is stopped; "0" = never
startup_timeout = "120s"
stop_timeout = "10s"             # SIGTERM to the whole process group, then SIGKILL after this
health_path = "/health"

[models."gemma-3-270m"]
cmd = ["llama-server", "-m", "/models/gemma.gguf", "--port", "${PORT}", "-c", "2048"]
# cmd may also be one string, split like a shell would split words (no shell runs it)
aliases = ["gemma"]
env = { LLAMA_ARG_THREADS = "2" }
cwd = "/models"                  # optional
port = 10507                     # optional: a fixed port instead of one from port_range
ttl = "5m"
memory = "400MiB"                # optional: what the model takes, for the memory budget
pinned = false                   # true: never evicted
"#;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn test_env(name: &str) -> Option<String> {
    match name {
        "HOME" => Some("/home/u".into()),
        _ => None,
    }
}

fn ok(text: &str) -> Config {
    parse_with_env(text, None, &test_env).unwrap_or_else(|e| panic!("unexpected errors:\n{e}"))
}

fn errs(text: &str) -> Vec<Diagnostic> {
    match parse_with_env(text, None, &test_env) {
        Ok(c) => panic!("expected errors, got {c:#?}"),
        Err(e) => e.into_diagnostics(),
    }
}

/// The only error of `text`, asserted to be at `line:col`.
#[track_caller]
fn one(text: &str, line: usize, col: usize) -> Diagnostic {
    let e = errs(text);
    assert_eq!(e.len(), 1, "expected one error, got {e:#?}");
    let d = e.into_iter().next().unwrap();
    assert_eq!((d.line, d.col), (line, col), "wrong position for {d}");
    d
}

#[track_caller]
fn help(d: &Diagnostic) -> &str {
    d.help
        .as_deref()
        .unwrap_or_else(|| panic!("no help in {d}"))
}

const M: &str = "[models.m]\ncmd = \"srv --port ${PORT}\"\n";

// ----- happy paths ------------------------------------------------------------------------------

#[test]
fn spec_example_parses() {
    let c = ok(SPEC_EXAMPLE);
    assert_eq!(c.source, None);
    assert_eq!(c.listen, "127.0.0.1:8080".parse().unwrap());
    assert_eq!(c.state_dir, Path::new("/var/lib/llmvisor"));
    assert_eq!(c.port_range, (10500, 10999));
    assert_eq!(c.api_keys, ["sk-local-1"]);
    assert_eq!(c.admin_keys, ["adm-1"]);
    assert!(!c.allow_insecure);
    assert_eq!(c.max_loaded, Some(2));
    assert_eq!(c.memory_budget, Some(20 * GIB));
    assert_eq!(c.queue_timeout, Duration::from_secs(300));
    assert_eq!(c.preload, ["gemma-3-270m"]);
    assert_eq!(c.body_limit, 32 << 20);
    assert_eq!(c.shutdown_grace, Duration::from_secs(10));
    let g = &c.groups["big-gpu"];
    assert_eq!(g.members, ["gemma-3-270m"]);
    assert!(g.exclusive);

    assert_eq!(c.models.len(), 1);
    let m = &c.models[0];
    assert_eq!(m.id, "gemma-3-270m");
    assert_eq!(m.aliases, ["gemma"]);
    assert_eq!(
        m.cmd,
        [
            "llama-server",
            "-m",
            "/models/gemma.gguf",
            "--port",
            "${PORT}",
            "-c",
            "2048"
        ]
    );
    assert_eq!(m.env["LLAMA_ARG_THREADS"], "2");
    assert_eq!(m.cwd.as_deref(), Some("/models"));
    assert_eq!(m.port, Some(10507));
    assert_eq!(m.ttl, Some(Duration::from_secs(300)));
    assert_eq!(m.startup_timeout, Duration::from_secs(120));
    assert_eq!(m.stop_timeout, Duration::from_secs(10));
    assert_eq!(m.health_path, "/health");
    assert_eq!(m.memory, Some(400 * MIB));
    assert!(!m.pinned);
    assert!(m.uses_port() && !m.uses_socket());

    assert_eq!(c.model("gemma").unwrap().id, "gemma-3-270m");
    assert_eq!(c.model("gemma-3-270m").unwrap().id, "gemma-3-270m");
    assert!(c.model("nope").is_none());
    assert_eq!(c.model_names(), ["gemma-3-270m"]);
}

#[test]
fn memory_budget_auto_and_its_reserve() {
    let c = ok(&format!(
        "memory_budget = \"auto\"\nmemory_reserve = \"2GiB\"\n{M}"
    ));
    assert!(c.budgets.memory_auto);
    assert_eq!(c.budgets.memory_reserve, 2 * GIB);
    // No number yet: the supervisor reads the RAM available when it starts.
    assert_eq!(c.memory_budget, None);
    let c = ok(&format!(
        "memory_budget = \"auto\"\n{M}memory = \"900GiB\"\n"
    ));
    assert_eq!(c.budgets.memory_reserve, GIB);
    let c = ok(&format!("memory_budget = \"8GiB\"\n{M}"));
    assert!(!c.budgets.memory_auto);
    assert_eq!(c.memory_budget, Some(8 * GIB));
}

#[test]
fn gpu_budget_reserve_and_gpus() {
    use crate::config::GpuBudget;
    let c = ok(M);
    assert_eq!((c.budgets.gpu, c.budgets.gpu_reserve), (None, 512 << 20));
    assert_eq!(c.models[0].gpus, None);
    let c = ok(&format!(
        "gpu_budget = \"auto\"\ngpu_reserve = \"1GiB\"\n[defaults]\ngpus = [1]\n{M}gpus = [0, 1]\n[models.n]\ncmd = \"srv --port ${{PORT}}\"\n"
    ));
    assert_eq!(
        (c.budgets.gpu, c.budgets.gpu_reserve),
        (Some(GpuBudget::Auto), GIB)
    );
    assert_eq!(c.model("m").unwrap().gpus, Some(vec![0, 1]));
    assert_eq!(c.model("n").unwrap().gpus, Some(vec![1]), "from [defaults]");
    let c = ok(&format!("gpu_budget = \"20GiB\"\n{M}gpus = []\n"));
    assert_eq!(c.budgets.gpu, Some(GpuBudget::Bytes(20 * GIB)));
    assert_eq!(c.models[0].gpus, Some(vec![]));
    let d = one(&format!("{M}gpus = [0, -1]\n"), 3, 12);
    assert_eq!(d.message, "`gpus` holds GPU indices (0, 1, …), found -1");
    let d = one(&format!("{M}gpus = [1, 1]\n"), 3, 12);
    assert_eq!(d.message, "GPU 1 is listed twice in `gpus`");
    let d = one(&format!("{M}gpus = 0\n"), 3, 8);
    assert!(d.message.starts_with("`gpus` must be"), "{d}");
    let d = one(&format!("gpu_budget = \"lots\"\n{M}"), 1, 14);
    assert!(
        d.message
            .starts_with("invalid size \"lots\" for `gpu_budget`"),
        "{d}"
    );
    let d = one(&format!("gpu_reserve = true\n{M}"), 1, 15);
    assert_eq!(d.message, "`gpu_reserve` must be a size, found a boolean");
}

#[test]
fn defaults_applied() {
    let c = ok(M);
    assert_eq!(c.listen, "127.0.0.1:8080".parse().unwrap());
    assert_eq!(c.state_dir, Path::new("/home/u/.local/state/llmvisor"));
    assert_eq!(c.port_range, (10500, 10999));
    assert!(c.api_keys.is_empty() && c.admin_keys.is_empty());
    assert!(!c.allow_insecure);
    assert_eq!(c.max_loaded, None);
    assert_eq!(c.memory_budget, None);
    assert_eq!(c.budgets, crate::config::MachineBudgets::default());
    assert_eq!(c.budgets.memory_reserve, GIB);
    assert!(!c.budgets.memory_auto);
    assert_eq!(c.queue_timeout, Duration::from_secs(300));
    assert!(c.preload.is_empty() && c.groups.is_empty());
    assert_eq!(c.body_limit, 32 * 1024 * 1024);
    assert_eq!(c.shutdown_grace, Duration::from_secs(10));
    let m = &c.models[0];
    assert_eq!(m.ttl, Some(Duration::from_secs(600)));
    assert_eq!(m.startup_timeout, Duration::from_secs(120));
    assert_eq!(m.stop_timeout, Duration::from_secs(10));
    assert_eq!(m.health_path, "/health");
    assert_eq!((m.port, m.memory, m.pinned), (None, None, false));
    assert!(m.env.is_empty() && m.cwd.is_none() && m.aliases.is_empty());
    assert_eq!(*m, {
        let mut n = ModelConfig::new("m", m.cmd.clone());
        n.id = "m".into();
        n
    });
}

#[test]
fn state_dir_defaults_and_tilde() {
    let xdg = |n: &str| match n {
        "XDG_STATE_HOME" => Some("/xdg/state".to_string()),
        "HOME" => Some("/home/u".to_string()),
        _ => None,
    };
    let c = parse_with_env(M, None, &xdg).unwrap();
    assert_eq!(c.state_dir, Path::new("/xdg/state/llmvisor"));
    // A relative XDG_STATE_HOME is ignored, as the XDG spec says.
    let rel = |n: &str| match n {
        "XDG_STATE_HOME" => Some("rel".to_string()),
        "HOME" => Some("/home/u".to_string()),
        _ => None,
    };
    let c = parse_with_env(M, None, &rel).unwrap();
    assert_eq!(c.state_dir, Path::new("/home/u/.local/state/llmvisor"));

    let c = ok(&format!("state_dir = \"~/st\"\n{M}"));
    assert_eq!(c.state_dir, Path::new("/home/u/st"));
    let c = ok(&format!("state_dir = \"~\"\n{M}"));
    assert_eq!(c.state_dir, Path::new("/home/u"));
    let c = ok(&format!("state_dir = \"rel/dir\"\n{M}"));
    assert_eq!(c.state_dir, Path::new("rel/dir"));

    let none = |_: &str| None;
    let e = parse_with_env(M, None, &none).unwrap_err();
    assert_eq!(e.len(), 1);
    assert!(!e.first().has_position());
    assert!(
        e.to_string().starts_with("<config>: error: no state_dir"),
        "{e}"
    );
    let e = parse_with_env(&format!("state_dir = \"~/x\"\n{M}"), None, &none).unwrap_err();
    assert_eq!((e.first().line, e.first().col), (1, 13));
    assert!(parse_with_env(&format!("state_dir = \"/s\"\n{M}"), None, &none).is_ok());
}

#[test]
fn memory_auto_overrides_a_default() {
    let c = ok(r#"
[defaults]
memory = "1GB"

[models.one]
cmd = ["srv", "--port", "${PORT}"]
memory = "auto"

[models.two]
cmd = ["srv", "--port", "${PORT}"]
"#);
    assert_eq!(c.model("one").unwrap().memory, None);
    assert_eq!(c.model("two").unwrap().memory, Some(1_000_000_000));
    let e = parse_with_env(
        "[models.x]\ncmd = [\"srv\", \"--port\", \"${PORT}\"]\nmemory = \"lots\"\n",
        None,
        &|_: &str| None,
    )
    .unwrap_err();
    assert!(e.to_string().contains("invalid size"), "{e}");
}

#[test]
fn defaults_inherited_and_overridden() {
    let c = ok(r#"
[defaults]
ttl = "0"
startup_timeout = 30
stop_timeout = 2.5
health_path = "/v1/models"
memory = "1GB"
pinned = true
cwd = "/work"
env = { A = "from-defaults", B = "b" }

[models.one]
cmd = ["srv", "--port", "${PORT}"]

[models.two]
cmd = ["srv", "--port", "${PORT}"]
ttl = "90s"
startup_timeout = "1m"
stop_timeout = "250ms"
health_path = "/ready"
memory = 1024
pinned = false
cwd = "/other"
env = { A = "mine", C = "c" }
"#);
    let one = c.model("one").unwrap();
    assert_eq!(one.ttl, None);
    assert_eq!(one.startup_timeout, Duration::from_secs(30));
    assert_eq!(one.stop_timeout, Duration::from_millis(2500));
    assert_eq!(one.health_path, "/v1/models");
    assert_eq!(one.memory, Some(1_000_000_000));
    assert!(one.pinned);
    assert_eq!(one.cwd.as_deref(), Some("/work"));
    assert_eq!(
        one.env.iter().collect::<Vec<_>>(),
        [
            (&"A".to_string(), &"from-defaults".to_string()),
            (&"B".into(), &"b".into())
        ]
    );
    let two = c.model("two").unwrap();
    assert_eq!(two.ttl, Some(Duration::from_secs(90)));
    assert_eq!(two.startup_timeout, Duration::from_secs(60));
    assert_eq!(two.stop_timeout, Duration::from_millis(250));
    assert_eq!(two.health_path, "/ready");
    assert_eq!(two.memory, Some(1024));
    assert!(!two.pinned);
    assert_eq!(two.cwd.as_deref(), Some("/other"));
    // env is merged per variable; the model's value wins.
    assert_eq!(two.env["A"], "mine");
    assert_eq!(two.env["B"], "b");
    assert_eq!(two.env["C"], "c");
}

#[test]
fn cmd_string_is_split_like_a_shell() {
    let c = ok(r#"
[models.m]
cmd = "llama-server -m '/models/my model.gguf' --port ${PORT} --alias \"a b\" x\\ y"
"#);
    assert_eq!(
        c.models[0].cmd,
        [
            "llama-server",
            "-m",
            "/models/my model.gguf",
            "--port",
            "${PORT}",
            "--alias",
            "a b",
            "x y"
        ]
    );
}

#[test]
fn models_sorted_and_lookup() {
    let c = ok(r#"
[models.zeta]
cmd = "z --port ${PORT}"
aliases = ["z", "last"]
[models.alpha]
cmd = "a --port ${PORT}"
[models."qwen2.5:7b"]
cmd = "q --port ${PORT}"
"#);
    assert_eq!(c.model_names(), ["alpha", "qwen2.5:7b", "zeta"]);
    assert_eq!(c.model("last").unwrap().id, "zeta");
    assert_eq!(c.model_index("z"), Some(2));
    assert_eq!(c.model_index("qwen2.5:7b"), Some(1));
    assert!(c.model("Alpha").is_none());
}

#[test]
fn socket_models_fixed_ports_and_port_macro_with_fixed_port() {
    let c = ok(r#"
[models.sock]
cmd = ["srv", "--unix", "${SOCKET}"]
[models.fixed]
cmd = ["srv"]
port = 9000
[models.both]
cmd = ["srv", "--port", "${PORT}"]
port = 10600
[models.envport]
cmd = ["srv"]
env = { PORT = "${PORT}", HOME_DIR = "${env.HOME}", ID = "${MODEL_ID}" }
"#);
    let sock = c.model("sock").unwrap();
    assert!(sock.uses_socket() && !sock.uses_port());
    assert_eq!(c.model("fixed").unwrap().port, Some(9000));
    assert_eq!(c.model("both").unwrap().port, Some(10600));
    assert!(c.model("envport").unwrap().uses_port());
}

#[test]
fn top_level_extras() {
    let c = ok(&format!(
        "listen = \"0.0.0.0:9999\"\nallow_insecure = true\nbody_limit = \"1 MiB\"\n\
         shutdown_grace = 0\nqueue_timeout = 1.5\nmax_loaded = 1\n{M}"
    ));
    assert_eq!(c.listen, "0.0.0.0:9999".parse().unwrap());
    assert!(c.allow_insecure);
    assert_eq!(c.body_limit, 1 << 20);
    assert_eq!(c.shutdown_grace, Duration::ZERO);
    assert_eq!(c.queue_timeout, Duration::from_millis(1500));
    assert_eq!(c.max_loaded, Some(1));
    // Non-loopback with keys is fine, and so is IPv6 loopback without.
    ok(&format!(
        "listen = \"0.0.0.0:9999\"\napi_keys = [\"k\"]\n{M}"
    ));
    ok(&format!("listen = \"[::1]:9999\"\n{M}"));
}

#[test]
fn preload_and_groups_resolve_aliases() {
    let c = ok(r#"
preload = ["a", "m", "a"]
[groups.g]
members = ["a", "m"]
[models.m]
cmd = "srv --port ${PORT}"
aliases = ["a"]
[models.n]
cmd = "srv --port ${PORT}"
"#);
    assert_eq!(c.preload, ["m"]);
    assert_eq!(c.groups["g"].members, ["m"]);
    assert!(!c.groups["g"].exclusive);
}

#[test]
fn dotted_keys_and_inline_tables() {
    let c = ok(r#"
models.m.cmd = "srv --port ${PORT}"
models.m.env.X = "1"
[models.n]
cmd = "srv --port ${PORT}"
env.Y = "2"
"#);
    assert_eq!(c.model("m").unwrap().env["X"], "1");
    assert_eq!(c.model("n").unwrap().env["Y"], "2");
}

// ----- errors, with positions -------------------------------------------------------------------

#[test]
fn toml_syntax_error() {
    let d = one("listen = \"127.0.0.1:8080\"\nport_range = [1, 2\n", 3, 1);
    assert!(d.message.starts_with("invalid TOML"), "{d}");
    let d = one("a = 1\na = 2\n", 2, 1);
    assert!(d.message.contains("duplicate key"), "{d}");
}

#[test]
fn unknown_keys_point_at_the_key() {
    let d = one(&format!("{M}tll = \"5m\"\n"), 3, 1);
    assert_eq!(d.message, "unknown key `tll` in model `m`");
    assert!(help(&d).starts_with("did you mean `ttl`?"), "{d}");
    assert!(help(&d).contains("valid keys: cmd, aliases, env"), "{d}");

    let d = one(&format!("listn = \"127.0.0.1:1\"\n{M}"), 1, 1);
    assert_eq!(d.message, "unknown key `listn` at the top level");
    assert!(help(&d).starts_with("did you mean `listen`?"), "{d}");

    let d = one(&format!("[defaults]\n  wibble = 1\n{M}"), 2, 3);
    assert_eq!(d.message, "unknown key `wibble` in [defaults]");
    assert!(!help(&d).contains("did you mean"), "{d}");
    assert!(help(&d).contains("valid keys: env, cwd, ttl"), "{d}");

    // A top-level key written after a table header.
    let d = one(&format!("{M}max_loaded = 2\n"), 3, 1);
    assert!(help(&d).contains("is a top-level key"), "{d}");

    // A per-model key at the top level.
    let d = one(&format!("pinned = true\n{M}"), 1, 1);
    assert!(help(&d).contains("per-model key"), "{d}");

    // In a group, and in an inline table.
    let d = one(
        &format!("groups.g = {{ members = [], exclusiv = true }}\n{M}"),
        1,
        28,
    );
    assert!(help(&d).starts_with("did you mean `exclusive`?"), "{d}");

    // An unquoted dotted model id.
    let e = errs("[models.qwen2.5]\ncmd = \"q --port ${PORT}\"\n");
    assert_eq!(e.len(), 2, "{e:#?}");
    assert_eq!((e[0].line, e[0].col), (1, 9));
    assert_eq!(e[0].message, "model `qwen2` has no `cmd`");
    assert_eq!((e[1].line, e[1].col), (1, 15));
    assert!(help(&e[1]).contains("[models.\"qwen2.5\"]"), "{}", e[1]);
}

#[test]
fn macro_errors_point_into_the_string() {
    let d = one(
        "[models.m]\ncmd = [\"srv\", \"--port\", \"${PROT}\"]\n",
        2,
        26,
    );
    assert_eq!(d.message, "unknown macro `${PROT}` in cmd");
    assert!(
        help(&d).contains("${PORT}, ${SOCKET}, ${MODEL_ID}, ${env.NAME}"),
        "{d}"
    );

    let d = one(
        "[models.m]\ncmd = \"srv --port ${PORT} --x ${port}\"\n",
        2,
        31,
    );
    assert!(help(&d).starts_with("did you mean `${PORT}`?"), "{d}");
    let d = one("[models.m]\ncmd = \"srv --port ${PROT}\"\n", 2, 19);
    assert!(help(&d).starts_with("did you mean `${PORT}`?"), "{d}");

    let d = one(
        "[models.m]\ncmd = \"srv --port ${PORT} --home ${HOME\"\n",
        2,
        34,
    );
    assert_eq!(d.message, "unterminated macro `${` in cmd");

    let d = one(&format!("{M}env = {{ A = 'x${{HOME}}' }}\n"), 3, 15);
    assert_eq!(d.message, "unknown macro `${HOME}` in env `A`");
    assert!(help(&d).contains("${env.HOME}"), "{d}");

    let d = one(&format!("{M}cwd = \"/m/${{env.1X}}\"\n"), 3, 11);
    assert_eq!(d.message, "invalid macro `${env.1X}` in cwd");

    // With an escape before the macro the position falls back to the string's start.
    let d = one(
        "[models.m]\ncmd = \"srv \\t --port ${PORT} ${NOPE}\"\n",
        2,
        7,
    );
    assert!(d.message.contains("${NOPE}"), "{d}");

    // `$` alone and `$$` are literal.
    let c = ok("[models.m]\ncmd = [\"sh\", \"-c\", \"echo $HOME $$ $ $${PORT}\"]\n");
    assert_eq!(c.models[0].cmd[2], "echo $HOME $$ $ $${PORT}");
}

#[test]
fn port_and_socket_rules() {
    let d = one(
        "[models.m]\ncmd = [\"srv\", \"--port\", \"${PORT}\", \"--unix\", \"${SOCKET}\"]\n",
        2,
        47,
    );
    assert_eq!(d.message, "model `m` uses both ${PORT} and ${SOCKET}");

    let d = one("[models.m]\ncmd = [\"srv\", \"-v\"]\n", 2, 7);
    assert!(d.message.contains("neither ${PORT} nor ${SOCKET}"), "{d}");
    assert_eq!(help(&d), "add `--port ${PORT}` to cmd, or set `port`");

    let d = one(
        "[models.m]\ncmd = [\"srv\", \"${SOCKET}\"]\nport = 9000\n",
        3,
        8,
    );
    assert!(d.message.contains("fixed `port`"), "{d}");

    // ${PORT} from [defaults] plus ${SOCKET} in the model: points at the model's use.
    let d = one(
        "[defaults]\nenv = { P = \"${PORT}\" }\n[models.m]\ncmd = \"srv ${SOCKET}\"\n",
        4,
        12,
    );
    assert!(d.message.contains("both"), "{d}");
}

#[test]
fn duplicate_fixed_ports() {
    let d = one(
        "[models.a]\ncmd = \"a\"\nport = 9000\n[models.b]\ncmd = \"b\"\nport = 9000\n",
        6,
        8,
    );
    assert_eq!(
        d.message,
        "port 9000 of model `b` is already the port of model `a`"
    );
    let d = one(
        "listen = \"127.0.0.1:9000\"\n[models.a]\ncmd = \"a\"\nport = 9000\n",
        4,
        8,
    );
    assert!(d.message.contains("own `listen` port"), "{d}");
}

#[test]
fn names_and_duplicates() {
    let d = one("[models.\"a//b\"]\ncmd = \"a --port ${PORT}\"\n", 1, 9);
    assert_eq!(d.message, "model id \"a//b\" has an empty part between `/`");
    let d = one("[models.\"/a\"]\ncmd = \"a --port ${PORT}\"\n", 1, 9);
    assert!(d.message.ends_with("has an empty part between `/`"), "{d}");
    // Hugging Face's and Ollama's ids are fine.
    let ok = crate::config::parse(
        "[models.\"unsloth/Qwen3-8B-GGUF:Q4_K_M\"]\ncmd = \"a --port ${PORT}\"\naliases = [\"llama3.2:3b\"]\n",
        None,
    )
    .unwrap();
    assert_eq!(ok.models[0].id, "unsloth/Qwen3-8B-GGUF:Q4_K_M");
    let d = one("[models.\"a b\"]\ncmd = \"a --port ${PORT}\"\n", 1, 9);
    assert!(d.message.ends_with("contains whitespace"), "{d}");
    let d = one("[models.\"\"]\ncmd = \"a --port ${PORT}\"\n", 1, 9);
    assert!(d.message.ends_with("is empty"), "{d}");

    let text = r#"[models.a]
cmd = "a --port ${PORT}"
aliases = ["x"]
[models.b]
cmd = "b --port ${PORT}"
aliases = ["y", "a", "x", "y"]
"#;
    let e = errs(text);
    assert_eq!(e.len(), 3, "{e:#?}");
    assert_eq!((e[0].line, e[0].col), (6, 17));
    assert_eq!(
        e[0].message,
        "alias `a` of model `b` is already the id of model `a`"
    );
    assert_eq!((e[1].line, e[1].col), (6, 22));
    assert_eq!(
        e[1].message,
        "alias `x` of model `b` is already an alias of model `a`"
    );
    assert_eq!((e[2].line, e[2].col), (6, 27));
    assert_eq!(e[2].message, "alias `y` is listed twice");

    let e = errs("[models.a]\ncmd = \"a --port ${PORT}\"\naliases = [\"a\", \"c/d/\"]\n");
    assert_eq!(e.len(), 2, "{e:#?}");
    assert_eq!((e[0].line, e[0].col), (3, 12));
    assert!(e[0].message.contains("same as its model's id"), "{}", e[0]);
    assert_eq!((e[1].line, e[1].col), (3, 17));
    assert_eq!(e[1].message, "alias \"c/d/\" has an empty part between `/`");
}

#[test]
fn insecure_listen() {
    let d = one(&format!("listen = \"0.0.0.0:8080\"\n{M}"), 1, 10);
    assert!(d.message.contains("no api_keys"), "{d}");
    assert!(help(&d).contains("allow_insecure = true"), "{d}");
    let d = one(
        &format!("listen = \"0.0.0.0:8080\"\napi_keys = []\n{M}"),
        1,
        10,
    );
    assert!(d.message.contains("no api_keys"), "{d}");
    // admin_keys alone do not protect /v1.
    one(
        &format!("listen = \"[::]:8080\"\nadmin_keys = [\"k\"]\n{M}"),
        1,
        10,
    );
    let d = one(&format!("listen = \"localhost:8080\"\n{M}"), 1, 10);
    assert!(help(&d).contains("127.0.0.1:8080"), "{d}");
}

#[test]
fn bad_values() {
    let d = one(&format!("{M}ttl = \"10x\"\n"), 3, 7);
    assert_eq!(
        d.message,
        "invalid duration \"10x\" for `ttl`: unknown unit `x`"
    );
    assert!(
        help(&d).contains("\"250ms\", \"30s\", \"10m\", \"1h\""),
        "{d}"
    );
    let d = one(&format!("{M}stop_timeout = -1\n"), 3, 16);
    assert!(d.message.contains("negative"), "{d}");
    let d = one(&format!("{M}ttl = true\n"), 3, 7);
    assert_eq!(d.message, "`ttl` must be a duration, found a boolean");
    let d = one(&format!("{M}startup_timeout = 0\n"), 3, 19);
    assert!(d.message.contains("more than 0"), "{d}");
    let d = one(&format!("{M}memory = \"4GB!\"\n"), 3, 10);
    assert_eq!(
        d.message,
        "invalid size \"4GB!\" for `memory`: unknown unit `GB!`"
    );
    assert!(help(&d).contains("KiB"), "{d}");
    let d = one(&format!("{M}memory = \"4g\"\n"), 3, 10);
    assert!(
        d.message.contains("write GB (powers of 1000) or GiB"),
        "{d}"
    );
    let d = one(&format!("memory_budget = 1.5\n{M}"), 1, 17);
    assert_eq!(d.message, "`memory_budget` must be a size, found a float");
    let d = one(&format!("memory_budget = \"automatic\"\n{M}"), 1, 17);
    assert!(d.message.contains("`memory_budget`"), "{d}");
    let d = one(
        &format!("memory_budget = \"auto\"\nmemory_reserve = \"1 potato\"\n{M}"),
        2,
        18,
    );
    assert!(
        d.message
            .starts_with("invalid size \"1 potato\" for `memory_reserve`"),
        "{d}"
    );
    let d = one(&format!("memory_reserve = -5\n{M}"), 1, 18);
    assert!(d.message.contains("negative"), "{d}");
    let d = one(&format!("{M}port = 70000\n"), 3, 8);
    assert!(d.message.contains("between 1 and 65535"), "{d}");
    let d = one(&format!("{M}health_path = \"health\"\n"), 3, 15);
    assert!(d.message.contains("starting with `/`"), "{d}");
    let d = one(&format!("{M}pinned = \"yes\"\n"), 3, 10);
    assert_eq!(
        d.message,
        "`pinned` must be a boolean (true or false), found a string"
    );
    let d = one(&format!("{M}env = {{ N = 2 }}\n"), 3, 13);
    assert_eq!(help(&d), "quote it: N = \"2\"");
    let d = one(&format!("{M}env = {{ LLMVISOR_INSTANCE = \"x\" }}\n"), 3, 9);
    assert!(d.message.contains("LLMVISOR_INSTANCE"), "{d}");
    let d = one(&format!("{M}aliases = \"g\"\n"), 3, 11);
    assert_eq!(help(&d), "write aliases = [\"g\"]");
    let d = one(&format!("max_loaded = 0\n{M}"), 1, 14);
    assert!(d.message.contains("at least 1"), "{d}");
    let d = one(&format!("listen = 8080\n{M}"), 1, 10);
    assert_eq!(d.message, "`listen` must be a string, found an integer");
    let d = one(&format!("api_keys = [\"\"]\n{M}"), 1, 13);
    assert_eq!(d.message, "empty key in `api_keys`");
    let d = one(&format!("body_limit = 0\n{M}"), 1, 14);
    assert!(d.message.contains("body_limit"), "{d}");
    let d = one("[[models]]\ncmd = \"x\"\n", 1, 1);
    assert!(help(&d).contains("[models.\"ID\"]"), "{d}");
    let d = one("models = 3\n", 1, 10);
    assert!(d.message.contains("`models` must be a table"), "{d}");
    let d = one("[models]\nm = \"srv\"\n", 2, 1);
    assert!(d.message.contains("model `m` must be a table"), "{d}");
}

#[test]
fn port_range_errors() {
    let d = one(&format!("port_range = [2000, 1000]\n{M}"), 1, 14);
    assert!(d.message.contains("is empty"), "{d}");
    let d = one(&format!("port_range = [0, 1000]\n{M}"), 1, 15);
    assert!(d.message.contains("between 1 and 65535"), "{d}");
    let d = one(&format!("port_range = [1000, 65536]\n{M}"), 1, 21);
    assert!(d.message.contains("65536"), "{d}");
    let d = one(&format!("port_range = [1000]\n{M}"), 1, 14);
    assert!(d.message.contains("exactly two"), "{d}");
    let c = ok(&format!("port_range = [2000, 2000]\n{M}"));
    assert_eq!(c.port_range, (2000, 2000));
}

#[test]
fn cmd_errors() {
    let d = one("[models.m]\ncmd = []\n", 2, 7);
    assert_eq!(d.message, "cmd is empty");
    let d = one("[models.m]\ncmd = \"  \"\n", 2, 7);
    assert_eq!(d.message, "cmd is empty");
    let d = one("[models.m]\ncmd = [\"\", \"--port\", \"${PORT}\"]\n", 2, 8);
    assert!(d.message.starts_with("cmd is empty"), "{d}");
    let d = one("[models.m]\ncmd = \"srv 'unclosed --port ${PORT}\"\n", 2, 7);
    assert!(d.message.contains("cannot be split"), "{d}");
    let d = one("[models.m]\ncmd = [\"srv\", 2048, \"${PORT}\"]\n", 2, 15);
    assert_eq!(help(&d), "quote it: \"2048\"");
    let d = one("[models.m]\ncmd = 1\n", 2, 7);
    assert!(d.message.contains("array of strings or a string"), "{d}");
    let d = one("[models.m]\nttl = 5\n", 1, 9);
    assert_eq!(d.message, "model `m` has no `cmd`");
    assert!(help(&d).contains("${PORT}"), "{d}");
}

#[test]
fn defaults_restrictions() {
    let e = errs(&format!(
        "[defaults]\ncmd = \"x\"\naliases = []\nport = 1\n{M}"
    ));
    assert_eq!(e.len(), 3, "{e:#?}");
    assert_eq!((e[0].line, e[0].col), (2, 1));
    assert_eq!(e[0].message, "`cmd` cannot be set in [defaults]");
    assert!(help(&e[0]).contains("[models.\"ID\"]"));
    assert_eq!((e[1].line, e[1].col), (3, 1));
    assert_eq!((e[2].line, e[2].col), (4, 1));
}

#[test]
fn references_must_exist() {
    let d = one(&format!("preload = [\"mm\"]\n{M}"), 1, 12);
    assert_eq!(d.message, "unknown model `mm` in preload");
    assert_eq!(help(&d), "did you mean `m`? known models: m");
    let d = one(
        &format!("[groups.g]\nmembers = [\"m\", \"zzz\"]\n{M}"),
        2,
        17,
    );
    assert_eq!(d.message, "unknown model `zzz` in group `g`");
    let d = one(&format!("[groups.g]\nexclusive = true\n{M}"), 1, 9);
    assert_eq!(d.message, "group `g` has no `members`");
    let d = one("preload = [\"x\"]\n", 1, 12);
    assert!(help(&d).contains("no models are configured"), "{d}");
}

#[test]
fn memory_over_budget() {
    let d = one(
        &format!("memory_budget = \"1GiB\"\n{M}memory = \"1.5GiB\"\n"),
        4,
        10,
    );
    assert_eq!(
        d.message,
        "model `m` needs 1.5 GiB of memory, more than memory_budget (1 GiB)"
    );
}

#[test]
fn all_errors_are_collected_in_file_order() {
    let text = r#"listen = "nope"
port_range = [5, 1]
queue_timeout = "forever"

[models.a]
cmd = ["srv"]
tll = "5m"

[models.b]
cmd = "srv --port ${PORT}"
memory = "lots"
aliases = ["a"]
"#;
    let e = parse_with_env(text, Some(Path::new("/etc/llmvisor.toml")), &test_env).unwrap_err();
    let pos: Vec<_> = e.iter().map(|d| (d.line, d.col)).collect();
    assert_eq!(
        pos,
        [
            (1, 10),
            (2, 14),
            (3, 17),
            (6, 7),
            (7, 1),
            (11, 10),
            (12, 12)
        ],
        "{e}"
    );
    assert!(e.iter().all(|d| d.file == "/etc/llmvisor.toml"));
    let shown = e.to_string();
    assert!(
        shown.starts_with(
            "/etc/llmvisor.toml:1:10: error: `listen` is not an IP address and port: \"nope\"\n  help: "
        ),
        "{shown}"
    );
    assert_eq!(shown.lines().filter(|l| l.contains(": error: ")).count(), 7);
    assert_eq!(
        shown.lines().filter(|l| l.starts_with("  help: ")).count(),
        7
    );
}

#[test]
fn display_format() {
    let d = Diagnostic {
        file: "c.toml".into(),
        line: 3,
        col: 7,
        message: "boom".into(),
        help: Some("fix it".into()),
    };
    assert_eq!(d.to_string(), "c.toml:3:7: error: boom\n  help: fix it");
    let mut e = ConfigErrors::new(d);
    e.push(Diagnostic {
        file: "c.toml".into(),
        line: 4,
        col: 1,
        message: "bang".into(),
        help: None,
    });
    assert_eq!(
        e.to_string(),
        "c.toml:3:7: error: boom\n  help: fix it\nc.toml:4:1: error: bang"
    );
    assert!(ConfigErrors::from_vec(Vec::new()).is_none());
}

#[test]
fn load_reads_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("llmvisor.toml");
    let missing = load(&path).unwrap_err();
    assert_eq!(missing.len(), 1);
    let shown = missing.to_string();
    assert!(
        shown.starts_with(&format!(
            "{}: error: cannot read config file {}",
            path.display(),
            path.display()
        )),
        "{shown}"
    );

    std::fs::write(&path, format!("state_dir = \"/s\"\n{M}")).unwrap();
    let c = load(&path).unwrap();
    assert_eq!(c.source.as_deref(), Some(path.as_path()));
    assert_eq!(c.state_dir, Path::new("/s"));

    std::fs::write(&path, "bogus = 1\n").unwrap();
    let e = load(&path).unwrap_err();
    assert_eq!(e.first().file, path.display().to_string());
    assert_eq!((e.first().line, e.first().col), (1, 1));
}

// ----- expand -----------------------------------------------------------------------------------

#[test]
fn expand_macros() {
    let env = |n: &str| (n == "HOME").then(|| "/home/u".to_string());
    let sock = Path::new("/run/s.sock");
    let v = MacroValues {
        port: Some(10500),
        socket: Some(sock),
        model_id: "gemma",
    };
    assert_eq!(
        expand(
            "--port=${PORT} ${SOCKET} ${MODEL_ID} ${env.HOME}/x",
            &v,
            &env
        )
        .unwrap(),
        "--port=10500 /run/s.sock gemma /home/u/x"
    );
    assert_eq!(
        expand("$$ $x ${PORT}${PORT}", &v, &env).unwrap(),
        "$$ $x 1050010500"
    );
    assert_eq!(expand("", &v, &env).unwrap(), "");

    let none = MacroValues {
        model_id: "m",
        ..MacroValues::default()
    };
    assert_eq!(expand("${PORT}", &none, &env), Err(ExpandError::NoPort));
    assert_eq!(expand("${SOCKET}", &none, &env), Err(ExpandError::NoSocket));
    let e = expand("${env.NOPE}", &none, &env).unwrap_err();
    assert_eq!(e, ExpandError::EnvNotSet("NOPE".into()));
    assert_eq!(
        e.to_string(),
        "${env.NOPE} cannot be expanded: environment variable NOPE is not set in llmvisor's environment"
    );
    assert!(e
        .to_string()
        .contains("environment variable NOPE is not set in llmvisor's environment"));
    assert!(matches!(
        expand("${FOO}", &none, &env),
        Err(ExpandError::Invalid { .. })
    ));
    assert!(matches!(
        expand("x ${PORT", &none, &env),
        Err(ExpandError::Invalid { .. })
    ));
    // Expanded values are not expanded again.
    let tricky = |_: &str| Some("${PORT}".to_string());
    assert_eq!(expand("${env.X}", &v, &tricky).unwrap(), "${PORT}");
}

#[test]
fn expand_model() {
    let c = ok(r#"
[models.m]
cmd = "srv --port ${PORT} --alias ${MODEL_ID}"
env = { A = "${env.HOME}" }
cwd = "/w/${MODEL_ID}"
"#);
    let v = MacroValues {
        port: Some(7),
        socket: None,
        model_id: "m",
    };
    let x = c.models[0].expand(&v, &test_env).unwrap();
    assert_eq!(x.argv, ["srv", "--port", "7", "--alias", "m"]);
    assert_eq!(x.env["A"], "/home/u");
    assert_eq!(x.cwd.as_deref(), Some("/w/m"));
    let none = |_: &str| None;
    assert_eq!(
        c.models[0].expand(&v, &none),
        Err(ExpandError::EnvNotSet("HOME".into()))
    );
}

// ----- units ------------------------------------------------------------------------------------

#[test]
fn durations() {
    let d = |s: &str| parse_duration(s).unwrap();
    assert_eq!(d("250ms"), Duration::from_millis(250));
    assert_eq!(d("30s"), Duration::from_secs(30));
    assert_eq!(d("10m"), Duration::from_secs(600));
    assert_eq!(d("1h"), Duration::from_secs(3600));
    assert_eq!(d("45"), Duration::from_secs(45));
    assert_eq!(d("1.5"), Duration::from_millis(1500));
    assert_eq!(d("0.1"), Duration::from_millis(100));
    assert_eq!(d("1.5h"), Duration::from_secs(5400));
    assert_eq!(d(" 2 s "), Duration::from_secs(2));
    assert_eq!(d("0"), Duration::ZERO);
    assert_eq!(d("0.0000000001"), Duration::ZERO);
    for bad in [
        "10x",
        "",
        "s",
        "-1s",
        "1.s",
        ".5",
        "1e3",
        "1h30m",
        "10M",
        "1..2",
        "99999999999999999999999h",
    ] {
        let e = parse_duration(bad).unwrap_err();
        assert!(
            e.contains("invalid duration") && e.contains("\"250ms\""),
            "{bad}: {e}"
        );
    }
    assert!(parse_duration("10x")
        .unwrap_err()
        .contains("unknown unit `x`"));

    // In a config: "0" and 0 mean never; 1.5 is seconds.
    let ttl = |v: &str| ok(&format!("{M}ttl = {v}\n")).models[0].ttl;
    assert_eq!(ttl("\"0\""), None);
    assert_eq!(ttl("0"), None);
    assert_eq!(ttl("\"0s\""), None);
    assert_eq!(ttl("1.5"), Some(Duration::from_millis(1500)));
    assert_eq!(ttl("\"1.5\""), Some(Duration::from_millis(1500)));
    assert_eq!(ttl("30"), Some(Duration::from_secs(30)));
    assert_eq!(ttl("0.25"), Some(Duration::from_millis(250)));
}

#[test]
fn sizes() {
    let s = |x: &str| parse_size(x).unwrap();
    assert_eq!(s("0"), 0);
    assert_eq!(s("1024"), 1024);
    assert_eq!(s("12B"), 12);
    assert_eq!(s("1KB"), 1000);
    assert_eq!(s("1kb"), 1000);
    assert_eq!(s("2 MB"), 2_000_000);
    assert_eq!(s("3GB"), 3_000_000_000);
    assert_eq!(s("1TB"), 1_000_000_000_000);
    assert_eq!(s("1KiB"), 1024);
    assert_eq!(s("400MiB"), 400 * MIB);
    assert_eq!(s("400 mib"), 400 * MIB);
    assert_eq!(s("1.5GiB"), 3 * GIB / 2);
    assert_eq!(s("2TiB"), 2 << 40);
    assert_eq!(s("1.0"), 1);
    for bad in [
        "",
        "GiB",
        "-1GiB",
        "1.5",
        "1.5B",
        "4G",
        "1 GiBs",
        "1e9",
        "20000000TiB",
    ] {
        let e = parse_size(bad).unwrap_err();
        assert!(
            e.contains("invalid size") && e.contains("KiB"),
            "{bad}: {e}"
        );
    }
    // A bare TOML integer is bytes.
    let c = ok(&format!("{M}memory = 123456\n"));
    assert_eq!(c.models[0].memory, Some(123456));
}

#[test]
fn health_keys_inherit_and_validate() {
    let cfg = ok(r#"
[defaults]
health_failures = 5

[models.a]
cmd = "srv --port ${PORT}"
health_interval = "0"
on_unhealthy = "stop"

[models.b]
cmd = "srv --port ${PORT}"
"#);
    let a = cfg.model("a").unwrap();
    assert_eq!(a.health.interval, None, "0 disables probing");
    assert_eq!(a.health.failures, 5);
    assert_eq!(a.health.on_unhealthy, super::OnUnhealthy::Stop);
    let b = cfg.model("b").unwrap();
    assert_eq!(b.health.interval, Some(super::DEFAULT_HEALTH_INTERVAL));
    assert_eq!(b.health.on_unhealthy, super::OnUnhealthy::Restart);

    let d = one(
        "[models.a]\ncmd = \"srv --port ${PORT}\"\non_unhealthy = \"reboot\"\n",
        3,
        16,
    );
    assert!(
        d.message.contains("\"restart\" or \"stop\""),
        "{}",
        d.message
    );
    let d = one(
        "[models.a]\ncmd = \"srv --port ${PORT}\"\nhealth_failures = 0\n",
        3,
        19,
    );
    assert!(d.message.contains("between 1 and 1000"), "{}", d.message);
}

#[test]
fn durations_are_capped_at_a_year() {
    // `ttl = i64::MAX` once passed `check` and then panicked the model's actor at its first idle
    // moment (`Instant::now() + ttl` overflowed). Every form of a duration is capped.
    for (value, col) in [
        ("9223372036854775807", 7),
        ("\"9223372036854775807\"", 7),
        ("\"8761h\"", 7),
        ("31536000.5", 7),
        ("1e300", 7),
    ] {
        let d = one(&format!("{M}ttl = {value}\n"), 3, col);
        assert!(
            d.message.contains("invalid duration")
                && d.message.contains("for `ttl`")
                && d.message
                    .contains("the longest duration allowed is 8760h (365 days)"),
            "{value}: {d}"
        );
        assert!(help(&d).contains("\"250ms\""), "{d}");
    }
    for key in ["startup_timeout", "stop_timeout", "health_interval"] {
        let d = one(&format!("{M}{key} = 99999999999\n"), 3, key.len() + 4);
        assert!(d.message.contains("8760h"), "{d}");
    }
    for key in ["queue_timeout", "shutdown_grace"] {
        let d = one(&format!("{key} = \"100000h\"\n"), 1, key.len() + 4);
        assert!(d.message.contains("8760h"), "{d}");
    }
    // The maximum itself is fine, and so is the deadline it gives.
    let ttl = ok(&format!("{M}ttl = \"8760h\"\n")).models[0].ttl;
    assert_eq!(ttl, Some(MAX_DURATION));
    assert!(std::time::Instant::now()
        .checked_add(MAX_DURATION)
        .is_some());
    assert!(parse_duration("8761h").unwrap_err().contains("8760h"));
}

#[test]
fn every_listed_key_is_read_and_the_lists_agree() {
    let unknown = |text: &str| match parse_with_env(text, None, &test_env) {
        Ok(_) => false,
        Err(e) => e
            .into_diagnostics()
            .iter()
            .any(|d| d.message.starts_with("unknown key")),
    };
    for key in MODEL_KEYS {
        assert!(!unknown(&format!("{M}{key} = 1\n")), "model key {key}");
    }
    for key in DEFAULTS_KEYS {
        assert!(MODEL_KEYS.contains(key), "{key}");
        assert!(
            !unknown(&format!("[defaults]\n{key} = 1\n{M}")),
            "defaults key {key}"
        );
    }
    assert_eq!(
        DEFAULTS_KEYS,
        &[
            "env",
            "cwd",
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
            "unlisted",
            "concurrency_limit",
            "send_loading_state",
            "kv_persist",
            "kv_save_timeout",
        ]
    );
    for key in TOP_LEVEL_KEYS {
        assert!(!unknown(&format!("{key} = 1\n{M}")), "top-level key {key}");
    }
    assert!(unknown(&format!("{M}colour = 1\n")));
}

#[test]
fn swap_drain_and_group_rule_keys() {
    let c = ok(&format!(
        "max_wait_for_swap = \"45s\"\n[defaults]\ndrain_timeout = \"2m\"\n\
         [groups.big]\nmembers = [\"m\"]\nunload_others = true\npersistent = true\n{M}"
    ));
    assert_eq!(c.max_wait_for_swap, Duration::from_secs(45));
    assert_eq!(c.models[0].drain_timeout, Duration::from_secs(120));
    let g = &c.groups["big"];
    assert!(g.unload_others && g.persistent && !g.exclusive);
    let plain = ok(M);
    assert_eq!(
        plain.max_wait_for_swap,
        crate::config::DEFAULT_MAX_WAIT_FOR_SWAP
    );
    assert_eq!(
        plain.models[0].drain_timeout,
        crate::config::DEFAULT_DRAIN_TIMEOUT
    );
    let d = one("[groups.g]\nmembers = []\npersistent = \"yes\"\n", 3, 14);
    assert!(d.message.contains("persistent"), "{d}");
}

#[test]
fn connection_limits_follow_the_servers_own_slots() {
    let limit = |cmd: &str, env: &[(&str, &str)], set: Option<usize>| {
        let mut m =
            crate::config::ModelConfig::new("m", cmd.split(' ').map(String::from).collect());
        m.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        m.max_connections = set;
        m.connection_limit()
    };
    assert_eq!(
        limit("/opt/bin/llama-server -m x.gguf", &[], None),
        4,
        "auto slots"
    );
    assert_eq!(limit("llama-server -np 2 --port ${PORT}", &[], None), 2);
    assert_eq!(limit("llama-server --parallel=6", &[], None), 6);
    assert_eq!(limit("llama-server -np 8 --threads-http 4", &[], None), 3);
    assert_eq!(
        limit("llama-server", &[("LLAMA_ARG_N_PARALLEL", "3")], None),
        3
    );
    assert_eq!(
        limit("vllm serve x", &[], None),
        crate::config::DEFAULT_MAX_CONNECTIONS
    );
    assert_eq!(
        limit("llama-server -np 2", &[], Some(9)),
        9,
        "the config wins"
    );
    let c = ok(&format!("[defaults]\nmax_connections = 3\n{M}"));
    assert_eq!(c.models[0].connection_limit(), 3);
    let d = one(&format!("{M}max_connections = 0\n"), 3, 19);
    assert!(d.message.contains("between 1 and 4096"), "{d}");
}

#[test]
fn slow_client_limits_parse_with_defaults_that_follow_max_clients() {
    let c = ok(M);
    assert_eq!(c.http.body_idle_timeout, DEFAULT_BODY_IDLE_TIMEOUT);
    assert_eq!(c.http.stream_body_limit, DEFAULT_STREAM_BODY_LIMIT);
    assert_eq!(c.http.max_clients_per_peer, DEFAULT_MAX_CLIENTS / 4);
    let c = ok(&format!("max_clients = 40\n{M}"));
    assert_eq!(c.http.max_clients_per_peer, 10);
    let c = ok(&format!(
        "body_idle_timeout = \"2s\"\nstream_body_limit = \"1GiB\"\nmax_clients_per_peer = 3\n{M}"
    ));
    assert_eq!(c.http.body_idle_timeout, Duration::from_secs(2));
    assert_eq!(c.http.stream_body_limit, GIB);
    assert_eq!(c.http.max_clients_per_peer, 3);
    let d = one(&format!("body_idle_timeout = \"0\"\n{M}"), 1, 21);
    assert!(d.message.contains("must be more than 0"), "{}", d.message);
    let d = one(&format!("max_clients_per_peer = 0\n{M}"), 1, 24);
    assert!(d.message.contains("at least 1"), "{}", d.message);
}

#[test]
fn kv_persist_is_for_llama_server_and_defaults_turn_it_on_for_those_only() {
    let text = r#"kv_disk_budget = "1GiB"
[defaults]
kv_persist = true
kv_save_timeout = "2s"
[models.llama]
cmd = "/opt/bin/llama-server -m x.gguf --port ${PORT}"
[models.other]
cmd = "srv --port ${PORT}"
"#;
    let c = ok(text);
    assert_eq!(c.kv_disk_budget, GIB);
    let llama = c.model("llama").unwrap();
    assert!(llama.kv_persist);
    assert_eq!(llama.kv_save_timeout, Duration::from_secs(2));
    assert!(!c.model("other").unwrap().kv_persist);
    let plain = ok(M);
    assert_eq!(plain.kv_disk_budget, DEFAULT_KV_DISK_BUDGET);
    assert!(!plain.models[0].kv_persist);
    assert_eq!(plain.models[0].kv_save_timeout, DEFAULT_KV_SAVE_TIMEOUT);

    let d = one(&format!("{M}kv_persist = true\n"), 3, 14);
    assert_eq!(
        d.message,
        "model `m` has kv_persist = true, but its cmd does not run llama-server"
    );
    assert!(help(&d).contains("file name is `llama-server`"), "{d}");
    let d = one(&format!("{M}kv_save_timeout = \"0s\"\n"), 3, 19);
    assert_eq!(d.message, "`kv_save_timeout` must be more than 0");
}
