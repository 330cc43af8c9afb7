//! Secrets a model's command line carries (`--api-key K`, `--hf-token=T`, `env = {HF_TOKEN = …}`)
//! are cut out of what a non-admin caller is told about a failed start: the message quotes the
//! server's last output, which often echoes its arguments.

use crate::config::{expand, MacroValues, ModelConfig};

const MARK: &str = "[redacted]";
/// Shorter values are not worth hiding and would shred unrelated text.
const MIN_SECRET_LEN: usize = 4;

/// True for a flag or variable name that names a secret.
fn secretish(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    [
        "key",
        "token",
        "secret",
        "password",
        "passwd",
        "credential",
        "auth",
    ]
    .iter()
    .any(|w| n.contains(w))
}

/// `text` with its macros expanded as a start of `model` would expand them.
fn expanded(model: &ModelConfig, text: &str) -> String {
    let values = MacroValues {
        model_id: &model.id,
        ..MacroValues::default()
    };
    let lookup = |n: &str| std::env::var(n).ok();
    expand(text, &values, &lookup).unwrap_or_else(|_| text.to_owned())
}

/// The key a llama-server command gives its server (`--api-key K` or `--api-key=K`; the first
/// of a comma-separated list).
pub fn server_api_key(model: &ModelConfig) -> Option<String> {
    let argv: Vec<String> = model.cmd.iter().map(|a| expanded(model, a)).collect();
    let value = argv.iter().enumerate().find_map(|(i, a)| {
        if a == "--api-key" {
            argv.get(i + 1).cloned()
        } else {
            a.strip_prefix("--api-key=").map(str::to_owned)
        }
    })?;
    value
        .split(',')
        .next()
        .map(str::to_owned)
        .filter(|k| !k.is_empty())
}

/// The secret values in `model`'s argv and environment, expanded as a start would expand them.
pub fn secrets(model: &ModelConfig) -> Vec<String> {
    let argv: Vec<String> = model.cmd.iter().map(|a| expanded(model, a)).collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < argv.len() {
        let arg = &argv[i];
        if let Some(flag) = arg.strip_prefix('-') {
            let flag = flag.trim_start_matches('-');
            match flag.split_once('=') {
                Some((name, value)) if secretish(name) => out.push(value.to_owned()),
                None if secretish(flag) => {
                    if let Some(v) = argv.get(i + 1) {
                        out.push(v.clone());
                        i += 1;
                    }
                }
                _ => {}
            }
        }
        i += 1;
    }
    for (name, value) in &model.env {
        if secretish(name) {
            out.push(expanded(model, value));
        }
    }
    out.retain(|s| s.len() >= MIN_SECRET_LEN);
    out
}

/// `text` with every one of `secrets` replaced by a mark.
pub fn redact(text: &str, secrets: &[String]) -> String {
    let mut out = text.to_owned();
    for s in secrets {
        if out.contains(s.as_str()) {
            out = out.replace(s.as_str(), MARK);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_and_env_are_found() {
        let mut m = ModelConfig::new(
            "m",
            [
                "llama-server",
                "--api-key",
                "sk-abcdef",
                "-hf-token=hf_12345",
                "--port",
                "8080",
                "--password",
                "xy",
            ]
            .map(String::from)
            .to_vec(),
        );
        m.env.insert("OPENAI_API_KEY".into(), "sk-envvalue".into());
        m.env.insert("THREADS".into(), "2222".into());
        let s = secrets(&m);
        assert_eq!(s, vec!["sk-abcdef", "hf_12345", "sk-envvalue"]);
        assert_eq!(
            redact("args: --api-key sk-abcdef -hf-token=hf_12345 2222", &s),
            "args: --api-key [redacted] -hf-token=[redacted] 2222"
        );
    }
}
