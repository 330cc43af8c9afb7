//! The llama-server command of a discovered model, and the binary that runs it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{Found, Settings};
use crate::config::ModelConfig;

/// The context a discovered model gets when its trained context is larger (or unknown):
/// llama-server's KV cache grows with it, and few requests need more.
pub const DEFAULT_CONTEXT: u64 = 8192;

/// No llama-server anywhere discovery looks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "no llama-server to serve the {found} discovered models: not {configured}, not on PATH, and not \
     in {built} (fix: set llama_server = \"/path/to/llama-server\" in the config, put llama-server \
     on PATH, or build one with scripts/run.sh)"
)]
pub struct NoLlamaServer {
    pub found: usize,
    /// What `llama_server` says ("set by llama_server" when unset).
    pub configured: String,
    pub built: String,
}

/// Where scripts/run.sh builds llama-server: `~/.cache/llmvisor/llama.cpp-*/bin/llama-server`.
fn built_by_run_sh(env: &dyn Fn(&str) -> Option<String>) -> (String, Option<PathBuf>) {
    let Some(home) = env("HOME") else {
        return (
            "~/.cache/llmvisor/llama.cpp-*/bin/llama-server".into(),
            None,
        );
    };
    let cache = Path::new(&home).join(".cache/llmvisor");
    let pattern = cache
        .join("llama.cpp-*/bin/llama-server")
        .display()
        .to_string();
    let newest = std::fs::read_dir(&cache)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("llama.cpp-"))
        .map(|e| e.path().join("bin/llama-server"))
        .filter(|p| is_executable(p))
        .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok());
    (pattern, newest)
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// `name` looked up in `PATH` (a name with a `/` is a path as it is).
fn on_path(name: &str, env: &dyn Fn(&str) -> Option<String>) -> Option<PathBuf> {
    if name.contains('/') {
        let p = PathBuf::from(name);
        return is_executable(&p).then_some(p);
    }
    env("PATH")?
        .split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(name))
        .find(|p| is_executable(p))
}

/// The llama-server that serves discovered models: `llama_server`, else `llama-server` on
/// `PATH`, else the one scripts/run.sh built. `found` is only for the message.
pub fn llama_server(
    settings: &Settings,
    found: usize,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<PathBuf, NoLlamaServer> {
    let (built, newest) = built_by_run_sh(env);
    let configured = match &settings.llama_server {
        Some(name) => match on_path(name, env) {
            Some(p) => return Ok(p),
            None => format!("llama_server = {name:?} (not found or not executable)"),
        },
        None => "set by llama_server".into(),
    };
    on_path("llama-server", env)
        .or(newest)
        .ok_or(NoLlamaServer {
            found,
            configured,
            built,
        })
}

/// `flag` (or `flag=…`) among `args`.
fn has_flag(args: &[String], names: &[&str]) -> bool {
    args.iter().any(|a| {
        names
            .iter()
            .any(|n| a == n || a.strip_prefix(n).is_some_and(|r| r.starts_with('=')))
    })
}

/// The model served for a discovery: `server -m FILE --port ${PORT} -c N [--mmproj P]
/// [--embeddings] ARGS…`, with `-c` = min(trained, [`DEFAULT_CONTEXT`]) unless
/// `discovered_args` sets the context itself.
pub fn to_model(found: &Arc<Found>, settings: &Settings, server: &Path) -> ModelConfig {
    let mut cmd: Vec<String> = vec![
        server.display().to_string(),
        "-m".into(),
        found.file.display().to_string(),
        "--port".into(),
        "${PORT}".into(),
    ];
    let args = &settings.discovered_args;
    if !has_flag(args, &["-c", "--ctx-size"]) {
        let trained = found.facts.context_length.filter(|&c| c > 0);
        let ctx = trained.map_or(DEFAULT_CONTEXT, |c| c.min(DEFAULT_CONTEXT));
        cmd.extend(["-c".into(), ctx.to_string()]);
    }
    if let Some(p) = found
        .mmproj
        .as_ref()
        .filter(|_| !has_flag(args, &["--mmproj", "-mm"]))
    {
        cmd.extend(["--mmproj".into(), p.display().to_string()]);
    }
    if found.facts.embedding && !has_flag(args, &["--embedding", "--embeddings"]) {
        cmd.push("--embeddings".into());
    }
    cmd.extend(args.iter().cloned());
    let mut m = ModelConfig::new(found.id.clone(), cmd);
    m.found = Some(found.clone());
    m
}
