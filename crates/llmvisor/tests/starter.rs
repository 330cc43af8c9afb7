//! scripts/run.sh's starter config and snippets: valid, and a first answer is bounded.

use std::path::Path;

fn run_sh() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/run.sh");
    std::fs::read_to_string(path).unwrap()
}

/// The config run.sh writes, with the paths setup-llama.sh would print.
fn starter_config() -> String {
    let script = run_sh();
    let body = script
        .split_once("<<TOML\n")
        .and_then(|(_, rest)| rest.split_once("\nTOML\n"))
        .expect("run.sh writes its config with a <<TOML here-document")
        .0;
    body.replace("$LLAMA_SERVER", "/opt/llama-server")
        .replace("$LLAMA_MODEL_SMOL", "/opt/smollm2.gguf")
        .replace("$LLAMA_MODEL", "/opt/gemma.gguf")
        .replace("\\${", "${")
}

#[test]
fn starter_config_caps_generation_and_sets_the_gemma_template() {
    let cfg = llmvisor::config::parse(&starter_config(), None).unwrap();
    // The default is the instruction-tuned SmolLM2, Gemma (base) second.
    let default = cfg.model("default").expect("an alias `default`");
    assert_eq!(default.id, "smollm2-135m-instruct");
    assert!(default.cmd.iter().any(|a| a == "/opt/smollm2.gguf"));
    assert!(!cfg.models.is_empty());
    for m in &cfg.models {
        let has = |flag: &str, value: &str| m.cmd.windows(2).any(|w| w[0] == flag && w[1] == value);
        assert!(has("-n", "256"), "{}: {:?}", m.id, m.cmd);
        let gemma = m.cmd.iter().any(|a| a == "/opt/gemma.gguf");
        // Gemma's GGUF carries no template: llama.cpp's built-in one is named; SmolLM2's own
        // template is used as it is.
        assert_eq!(
            has("--chat-template", "gemma"),
            gemma,
            "{}: {:?}",
            m.id,
            m.cmd
        );
        assert_eq!(
            m.cmd.iter().any(|a| a == "--no-jinja"),
            gemma,
            "{}: {:?}",
            m.id,
            m.cmd
        );
    }
}

#[test]
fn printed_snippets_ask_for_few_tokens() {
    let script = run_sh();
    assert!(script.contains(r#""max_tokens": 64"#), "the curl snippet");
    assert!(script.contains("max_tokens=64"), "the Python snippet");
}
