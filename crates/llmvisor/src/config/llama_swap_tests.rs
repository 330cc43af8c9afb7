//! llama-swap YAML → Config: every documented key, its semantics, warnings and positions.

use std::path::Path;
use std::time::Duration;

use super::llama_swap::{convert, parse_yaml, DEFAULT_GROUP};
use super::{Config, Diagnostic};

fn env(name: &str) -> Option<String> {
    match name {
        "HOME" => Some("/home/u".into()),
        "XDG_STATE_HOME" => Some("/tmp/state".into()),
        "KEY_FROM_ENV" => Some("sk-env".into()),
        _ => None,
    }
}

fn ok(text: &str) -> (Config, Vec<Diagnostic>) {
    match parse_yaml(text, Some(Path::new("x.yaml")), &env) {
        Ok(r) => r,
        Err(e) => panic!("expected a valid config, got:\n{e}"),
    }
}

fn errs(text: &str) -> Vec<Diagnostic> {
    match parse_yaml(text, Some(Path::new("x.yaml")), &env) {
        Ok(_) => panic!("expected errors"),
        Err(e) => e.into_diagnostics(),
    }
}

const FULL: &str = r#"
healthCheckTimeout: 60
logLevel: debug
startPort: 12000
globalTTL: 300
includeAliasesInList: true
sendLoadingState: true
macros:
  "server": /bin/fake-llm --port ${PORT}
  "ctx": 4096
  "flag": true
  "args": "--ctx ${ctx} --flag ${flag}"
apiKeys: ["sk-1", "${env.KEY_FROM_ENV}"]
models:
  "a":
    macros:
      "ctx": 8192
    cmd: |
      # a comment line
      ${server}
      --ctx ${ctx}
      --home ${env.HOME}
    name: "Model A"
    description: "the first"
    aliases: ["a1", {id: a2}]
    ttl: 0
    useModelName: "org/a"
    filters:
      stripParams: "temperature, top_p, model"
      setParams:
        top_k: 3
        nested: {x: "y"}
      setParamsByID:
        "${MODEL_ID}:high":
          reasoning: high
    metadata:
      note: "model ${MODEL_ID} ${ctx}"
      n: 3
      f: 1.5
      list: [1, "two", false]
    concurrencyLimit: 2
    sendLoadingState: false
  "b":
    cmd: >
      /bin/fake-llm
      --port 9123
    proxy: http://127.0.0.1:9123
    cmdStop: kill -TERM ${PID}
    checkEndpoint: none
    env: ["X=1", "Y=${env.HOME}"]
    unlisted: true
    ttl: -1
  "c":
    cmd: /bin/fake-llm --port ${PORT} ${args}
    checkEndpoint: /ready
    ttl: 20
    unloadTimeout: 7
groups:
  together:
    swap: false
    exclusive: false
    members: ["b"]
  forever:
    persistent: true
    members: ["c"]
hooks:
  on_startup:
    preload: ["a"]
"#;

#[test]
fn every_documented_key_maps() {
    let (c, warnings) = ok(FULL);
    assert_eq!(c.port_range, (12000, 12999));
    assert_eq!(c.api_keys, ["sk-1", "sk-env"]);
    assert!(c.http.include_aliases_in_list);
    assert_eq!(c.preload, ["a"]);

    let a = c.model("a").unwrap();
    assert_eq!(
        a.cmd,
        [
            "/bin/fake-llm",
            "--port",
            "${PORT}",
            "--ctx",
            "8192",
            "--home",
            "${env.HOME}"
        ]
    );
    assert_eq!(a.api.name.as_deref(), Some("Model A"));
    assert_eq!(a.api.description.as_deref(), Some("the first"));
    assert_eq!(a.aliases, ["a1", "a2", "a:high"]);
    assert_eq!(a.ttl, None, "ttl: 0 = never");
    assert_eq!(a.startup_timeout, Duration::from_secs(60));
    assert_eq!(a.api.use_model_name.as_deref(), Some("org/a"));
    assert_eq!(a.api.filters.strip_params, ["temperature", "top_p"]);
    assert_eq!(a.api.filters.set_params["top_k"], 3);
    assert_eq!(a.api.filters.set_params["nested"]["x"], "y");
    assert_eq!(
        a.api.filters.set_params_by_id["a:high"]["reasoning"],
        "high"
    );
    let meta = a.api.metadata.as_ref().unwrap();
    assert_eq!(meta["note"], "model a 8192");
    assert_eq!(meta["n"], 3);
    assert_eq!(meta["f"], 1.5);
    assert_eq!(meta["list"], serde_json::json!([1, "two", false]));
    assert_eq!(a.api.concurrency_limit, Some(2));
    assert!(!a.api.send_loading_state, "the model's own key wins");

    let b = c.model("b").unwrap();
    assert_eq!(b.cmd, ["/bin/fake-llm", "--port", "9123"]);
    assert_eq!(b.port, Some(9123));
    assert_eq!(
        b.api.cmd_stop.as_deref(),
        Some(&["kill".to_string(), "-TERM".into(), "${PID}".into()][..])
    );
    assert!(b.api.no_health_check);
    assert_eq!(b.env["X"], "1");
    assert_eq!(b.env["Y"], "${env.HOME}");
    assert!(b.api.unlisted);
    assert_eq!(b.ttl, Some(Duration::from_secs(300)), "ttl -1 = globalTTL");
    assert!(b.api.send_loading_state, "global sendLoadingState");

    let cm = c.model("c").unwrap();
    assert_eq!(cm.cmd[3..], ["--ctx", "4096", "--flag", "true"]);
    assert_eq!(cm.health_path, "/ready");
    assert_eq!(cm.ttl, Some(Duration::from_secs(20)));
    assert_eq!(cm.drain_timeout, Duration::from_secs(7));

    let together = &c.groups["together"];
    assert!(!together.exclusive && !together.unload_others && !together.persistent);
    let forever = &c.groups["forever"];
    assert!(forever.exclusive && forever.unload_others && forever.persistent);
    let default = &c.groups[DEFAULT_GROUP];
    assert_eq!(default.members, ["a"]);
    assert!(default.exclusive && default.unload_others && !default.persistent);

    let names: Vec<&str> = warnings.iter().map(|w| w.message.as_str()).collect();
    assert_eq!(warnings.len(), 1, "{names:?}");
    assert!(names[0].contains("logLevel"));
    assert_eq!((warnings[0].line, warnings[0].col), (3, 1));
}

#[test]
fn no_groups_means_one_model_at_a_time_and_no_ttl() {
    let (c, _) = ok("models:\n  x:\n    cmd: s --port ${PORT}\n  y:\n    cmd: s --port ${PORT}\n");
    assert_eq!(c.groups.len(), 1);
    let g = &c.groups[DEFAULT_GROUP];
    assert_eq!(g.members, ["x", "y"]);
    assert!(g.exclusive && g.unload_others);
    assert!(
        c.models.iter().all(|m| m.ttl.is_none()),
        "globalTTL defaults to 0 = never"
    );
}

#[test]
fn every_unsupported_key_is_a_warning_naming_it() {
    let text = "logRequests: true\nlogTimeFormat: x\nlogToStdout: proxy\nmetricsMaxInMemory: 5\n\
captureBuffer: 5\nstore: {}\nui: {}\nperformance: {}\nprofiles: {}\nselectors: {}\nrouting: {}\n\
matrix: {}\npeers: {}\nupstream: {}\nscheduler: {}\nrouter: {}\nmystery: 1\n\
models:\n  x:\n    cmd: s --port ${PORT}\n    timeouts: {}\n    compat: {}\n    capabilities: {}\n    colour: red\n";
    let (_, warnings) = ok(text);
    for key in [
        "logRequests",
        "logTimeFormat",
        "logToStdout",
        "metricsMaxInMemory",
        "captureBuffer",
        "store",
        "ui",
        "performance",
        "profiles",
        "selectors",
        "routing",
        "matrix",
        "peers",
        "upstream",
        "scheduler",
        "router",
        "mystery",
        "timeouts",
        "compat",
        "capabilities",
        "colour",
    ] {
        let w = warnings
            .iter()
            .find(|w| w.message.contains(&format!("`{key}`")))
            .unwrap_or_else(|| panic!("no warning names `{key}`: {warnings:?}"));
        assert!(w.has_position(), "{w:?}");
    }
    assert_eq!(warnings.len(), 21);
}

#[test]
fn yaml_errors_have_line_and_col() {
    let d = errs("models:\n  x:\n    cmd: [unclosed\n");
    assert!(d[0].has_position(), "{d:?}");
    assert!(d[0].message.contains("invalid YAML"), "{d:?}");

    let d = errs("models:\n  x:\n    cmd: s --port ${PORT}\n    ttl: soon\n");
    assert_eq!((d[0].line, d[0].col), (4, 10), "{d:?}");

    let d = errs("models:\n  x:\n    cmd: s --port ${PORT} ${nope}\n");
    assert!(d[0].message.contains("unknown macro `${nope}`"), "{d:?}");
    assert_eq!(d[0].line, 3);
}

#[test]
fn errors_found_by_the_toml_parser_point_into_the_yaml() {
    // An unknown group member is caught by the shared parser, reported at the YAML line.
    let d =
        errs("models:\n  x:\n    cmd: s --port ${PORT}\ngroups:\n  g:\n    members: [x, ghost]\n");
    assert!(d[0].message.contains("ghost"), "{d:?}");
    assert_eq!(d[0].line, 6, "{d:?}");
    // A model without a port macro or fixed port.
    let d = errs("models:\n  x:\n    cmd: s\n");
    assert_eq!(d[0].line, 3, "{d:?}");
}

#[test]
fn proxy_elsewhere_is_an_error_and_a_model_in_two_groups_too() {
    let d = errs("models:\n  x:\n    cmd: s --port ${PORT}\n    proxy: http://10.0.0.1:80\n");
    assert!(d[0].message.contains("not this machine"), "{d:?}");
    let d = errs(
        "models:\n  x:\n    cmd: s --port ${PORT}\ngroups:\n  g:\n    members: [x]\n  h:\n    members: [x]\n",
    );
    assert!(
        d[0].message.contains("in group `g` and in group `h`"),
        "{d:?}"
    );
}

#[test]
fn convert_prints_toml_that_parses_to_the_same_config() {
    let converted = convert(FULL, Some(Path::new("x.yaml")), &env).unwrap();
    let from_toml = super::parse_with_env(&converted.toml, Some(Path::new("x.yaml")), &env)
        .unwrap_or_else(|e| panic!("{e}\n{}", converted.toml));
    let (from_yaml, _) = ok(FULL);
    assert_eq!(from_toml, from_yaml);
}

#[test]
fn garbage_never_panics() {
    for text in [
        "",
        "[]",
        "- a",
        "models: 3",
        "models:\n  x: 3",
        "models:\n  x:\n    cmd: [1]",
        "macros: [1]",
        "groups: x",
        "groups:\n  g: 1",
        "hooks: 1",
        "models:\n  x:\n    env: {a: 1}",
        "models:\n  x:\n    cmd: \"'\"",
        "apiKeys: {a: 1}",
        "a: &x 1\nb: *x",
        "models:\n  x:\n    filters: 1",
        "macros:\n  PORT: 1",
        "startPort: 70000",
        "globalTTL: -5",
        "\u{0}",
    ] {
        let _ = parse_yaml(text, None, &env);
    }
}
