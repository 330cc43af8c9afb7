//! Property tests: no input panics the config parser, macro expansion, or the daemon's reading
//! of a request body's `model`.

use std::path::Path;

use llmvisor::config::{self, MacroValues, DEFAULTS_KEYS, MODEL_KEYS, TOP_LEVEL_KEYS};
use proptest::prelude::*;

/// A TOML value of some kind, often of a wrong or extreme kind.
fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|i| i.to_string()),
        any::<f64>().prop_map(|f| format!("{f:?}")),
        Just("9223372036854775807".to_string()),
        Just("-1".to_string()),
        Just("nan".to_string()),
        Just("inf".to_string()),
        any::<bool>().prop_map(|b| b.to_string()),
        "[0-9]{0,20}(ms|s|m|h|d|KiB|MiB|GiB|TB|x)?".prop_map(|s| format!("{s:?}")),
        ".{0,40}".prop_map(|s| format!("{s:?}")),
        "\\$\\{[a-zA-Z_.]{0,12}\\}?".prop_map(|s| format!("{s:?}")),
        prop::collection::vec(".{0,10}".prop_map(|s| format!("{s:?}")), 0..4)
            .prop_map(|v| format!("[{}]", v.join(", "))),
        prop::collection::vec(any::<i32>(), 0..3).prop_map(|v| format!("{v:?}")),
        "[a-z]{1,8}".prop_map(|k| format!("{{ {k} = 1 }}")),
    ]
}

fn key(keys: &'static [&'static str]) -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(keys).prop_map(str::to_owned),
        1 => "[a-z_]{1,10}",
    ]
}

/// A config file made of known keys with arbitrary values, in the file's usual sections.
fn config_text() -> impl Strategy<Value = String> {
    (
        prop::collection::vec((key(TOP_LEVEL_KEYS), value()), 0..6),
        prop::collection::vec((key(DEFAULTS_KEYS), value()), 0..4),
        prop::collection::vec(
            (
                "[a-z.\"-]{1,8}",
                prop::collection::vec((key(MODEL_KEYS), value()), 0..6),
            ),
            0..3,
        ),
    )
        .prop_map(|(top, defaults, models)| {
            let mut t = String::new();
            for (k, v) in top {
                t.push_str(&format!("{k} = {v}\n"));
            }
            t.push_str("[defaults]\n");
            for (k, v) in defaults {
                t.push_str(&format!("{k} = {v}\n"));
            }
            for (id, keys) in models {
                t.push_str(&format!("[models.{id}]\ncmd = [\"x\", \"${{PORT}}\"]\n"));
                for (k, v) in keys {
                    t.push_str(&format!("{k} = {v}\n"));
                }
            }
            t
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn config_parser_never_panics_on_any_text(text in "(?s).{0,200}") {
        let _ = config::parse(&text, None);
        let _ = config::parse(&text, Some(Path::new("x.toml")));
    }

    #[test]
    fn config_parser_never_panics_on_config_shaped_text(text in config_text()) {
        let _ = config::parse(&text, Some(Path::new("llmvisor.toml")));
    }

    #[test]
    fn llama_swap_yaml_never_panics_on_any_text(text in "(?s).{0,200}") {
        let _ = config::llama_swap::parse_yaml(&text, Some(Path::new("x.yaml")), &|_: &str| None);
    }

    #[test]
    fn llama_swap_yaml_never_panics_on_config_shaped_text(
        lines in prop::collection::vec(
            (
                0usize..4,
                prop::sample::select(vec!["models", "macros", "groups", "cmd", "ttl", "aliases", "env", "filters", "proxy", "members", "swap", "x", "apiKeys", "checkEndpoint", "useModelName", "setParams", "stripParams", "hooks", "on_startup", "preload", "metadata", "cmdStop", "concurrencyLimit"]),
                prop::sample::select(vec![" ", "[a, b]", "-1", "0", "1", "true", "x --port ${PORT}", "${m}", "${env.X}", "http://127.0.0.1:99", "none", "{a: 1}", "|", ">", "\"${MODEL_ID}\""]),
            ),
            0..16,
        ),
    ) {
        let mut text = String::new();
        for (depth, key, value) in lines {
            text.push_str(&format!("{}{key}: {value}\n", "  ".repeat(depth)));
        }
        let _ = config::llama_swap::parse_yaml(&text, Some(Path::new("x.yaml")), &|_: &str| Some("v".into()));
    }

    #[test]
    fn macro_expansion_never_panics(
        template in "(\\$|\\{|\\}|[A-Za-z_.]|\\$\\{(PORT|SOCKET|MODEL_ID|env\\.[A-Z]{0,3})\\}|.){0,40}",
        port in proptest::option::of(any::<u16>()),
        id in ".{0,10}",
        env_value in proptest::option::of(".{0,10}"),
    ) {
        let socket = Path::new("/tmp/s.sock");
        let values = MacroValues { port, socket: Some(socket), model_id: &id };
        let lookup = |_: &str| env_value.clone();
        let _ = config::expand(&template, &values, &lookup);
        let none = MacroValues { port: None, socket: None, model_id: &id };
        let _ = config::expand(&template, &none, &|_: &str| None);
    }

    #[test]
    fn body_model_extraction_never_panics_on_bytes(body in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = llmvisor::daemon::routed_model(&body);
    }

    #[test]
    fn body_model_extraction_never_panics_on_json_shaped_bodies(
        model in value(),
        extra in prop::collection::vec(("[a-z\"\\\\]{0,6}", value()), 0..4),
        nest in 0usize..200,
    ) {
        let mut body = format!("{{\"model\": {model}");
        for (k, v) in extra {
            body.push_str(&format!(", \"{k}\": {v}"));
        }
        body.push_str(&format!(", \"deep\": {}{}", "[".repeat(nest), "]".repeat(nest)));
        body.push('}');
        if let Ok(m) = llmvisor::daemon::routed_model(body.as_bytes()) {
            prop_assert!(!m.is_empty());
        }
    }
}
