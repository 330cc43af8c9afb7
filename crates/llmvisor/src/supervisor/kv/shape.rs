//! Which server a slot file belongs to: the model file (path, size, mtime) and the options
//! that shape a slot's KV cache (`-c`, `-np`, cache types, the SWA and unified-KV switches).
//! A file saved under another shape is never loaded: llama-server would refuse it at best and
//! read a wrong cache at worst.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::config::llama_arg;

/// llama-server options (with their environment variables) that change a slot's state.
const SHAPING: &[(&[&str], &str)] = &[
    (&["-c", "--ctx-size"], "LLAMA_ARG_CTX_SIZE"),
    (&["-np", "--parallel"], "LLAMA_ARG_N_PARALLEL"),
    (&["-ctk", "--cache-type-k"], "LLAMA_ARG_CACHE_TYPE_K"),
    (&["-ctv", "--cache-type-v"], "LLAMA_ARG_CACHE_TYPE_V"),
    (&["-b", "--batch-size"], "LLAMA_ARG_BATCH"),
    (&["-ub", "--ubatch-size"], "LLAMA_ARG_UBATCH"),
];
/// Switches (no value) that change a slot's state.
const SWITCHES: &[&str] = &["--swa-full", "-kvu", "--kv-unified", "--no-kv-unified"];

/// The model file a command loads (`-m`/`--model`/`LLAMA_ARG_MODEL`), relative to `cwd`.
pub fn model_file(
    argv: &[String],
    env: &BTreeMap<String, String>,
    cwd: Option<&Path>,
) -> Option<PathBuf> {
    let file = PathBuf::from(llama_arg(argv, env, &["-m", "--model"], "LLAMA_ARG_MODEL")?);
    Some(match cwd {
        Some(dir) if file.is_relative() => dir.join(file),
        _ => file,
    })
}

/// The shape key of a server started with `argv` and `env`: 16 hex digits.
pub fn key(argv: &[String], env: &BTreeMap<String, String>, model: Option<&Path>) -> String {
    let mut text = String::new();
    if let Some(path) = model {
        text.push_str(&path.to_string_lossy());
        if let Ok(meta) = std::fs::metadata(path) {
            text.push_str(&format!(
                "|{}|{}.{}",
                meta.size(),
                meta.mtime(),
                meta.mtime_nsec()
            ));
        }
    }
    for (names, var) in SHAPING {
        text.push_str(&format!(
            "|{}={}",
            names[0],
            llama_arg(argv, env, names, var).unwrap_or("")
        ));
    }
    for switch in SWITCHES {
        if argv.iter().any(|a| a == switch) {
            text.push_str(&format!("|{switch}"));
        }
    }
    format!("{:016x}", fnv1a(text.as_bytes()))
}

/// FNV-1a, 64 bits: stable across builds and Rust versions (a key outlives the daemon).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn the_shaping_options_change_the_key_and_others_do_not() {
        let env = BTreeMap::new();
        let base = key(&argv("llama-server -m a.gguf -c 4096 --port 1"), &env, None);
        assert_eq!(
            base,
            key(
                &argv("llama-server -m a.gguf -c 4096 --port 2 -t 3"),
                &env,
                None
            )
        );
        assert_ne!(
            base,
            key(&argv("llama-server -m a.gguf -c 2048 --port 1"), &env, None)
        );
        assert_ne!(
            base,
            key(&argv("llama-server -m a.gguf -c 4096 -np 2"), &env, None)
        );
        assert_ne!(
            base,
            key(
                &argv("llama-server -m a.gguf -c 4096 -ctk q8_0"),
                &env,
                None
            )
        );
        assert_ne!(
            base,
            key(
                &argv("llama-server -m a.gguf -c 4096 --swa-full"),
                &env,
                None
            )
        );
        let from_env = BTreeMap::from([("LLAMA_ARG_CTX_SIZE".to_string(), "2048".to_string())]);
        assert_eq!(
            key(&argv("llama-server -m a.gguf"), &from_env, None),
            key(&argv("llama-server -m a.gguf --ctx-size=2048"), &env, None)
        );
    }

    #[test]
    fn the_model_file_is_part_of_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("m.gguf");
        std::fs::write(&file, "one").unwrap();
        let args = argv("llama-server -m m.gguf");
        let env = BTreeMap::new();
        let found = model_file(&args, &env, Some(dir.path())).unwrap();
        assert_eq!(found, file);
        let before = key(&args, &env, Some(&found));
        std::fs::write(&file, "other size").unwrap();
        assert_ne!(
            before,
            key(&args, &env, Some(&found)),
            "a changed file is another model"
        );
    }
}
