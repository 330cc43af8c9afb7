//! `llmvisor models [--config FILE] [--models-dir DIR]… [--json]`: the models a config and
//! discovery give — id, where found, file, size, memory estimate — without starting anything.

use std::path::PathBuf;

use serde_json::json;

use crate::config::{Config, ModelConfig};
use crate::discover::Discovery;
use crate::supervisor::Memory;
use crate::units::format_size;

/// One row of `llmvisor models`.
fn row(m: &ModelConfig) -> serde_json::Value {
    let found = m.found.as_deref();
    json!({
        "id": m.id,
        "source": m.source(),
        "file": found.map(|f| f.file.display().to_string()),
        "size": found.map(|f| f.size),
        "memory": Memory::for_config(m).bytes,
        "mmproj": found.and_then(|f| f.mmproj.as_ref()).map(|p| p.display().to_string()),
        "cmd": m.cmd,
    })
}

/// The JSON of `llmvisor models --json`: `{"models": [...], "warnings": ["FILE: what"]}`.
pub fn json(config: &Config, found: &Discovery) -> serde_json::Value {
    json!({
        "models": config.models.iter().map(row).collect::<Vec<_>>(),
        "warnings": found.warnings.iter().map(ToString::to_string).collect::<Vec<_>>(),
    })
}

/// The table of `llmvisor models`, then discovery's warnings.
pub fn table(config: &Config, found: &Discovery) -> String {
    let mut rows = vec![["ID", "SOURCE", "SIZE", "MEMORY", "FILE"]
        .map(String::from)
        .to_vec()];
    for m in &config.models {
        let f = m.found.as_deref();
        rows.push(vec![
            m.id.clone(),
            m.source().to_string(),
            f.map_or_else(|| "-".into(), |f| format_size(f.size)),
            Memory::for_config(m)
                .bytes
                .map_or_else(|| "-".into(), format_size),
            f.map_or_else(|| "-".into(), |f| f.file.display().to_string()),
        ]);
    }
    let mut out = super::table::align(&rows);
    for w in &found.warnings {
        out.push_str(&format!("warning: {w}\n"));
    }
    out
}

/// What `llmvisor check` adds after its summary: the discovered models, by store.
pub fn check_summary(found: &Discovery) -> String {
    let mut out = String::new();
    if found.found.is_empty() {
        out.push_str("discovery adds no models\n");
    } else {
        out.push_str(&format!("discovery adds {} models:\n", found.found.len()));
        for f in &found.found {
            out.push_str(&format!(
                "  {} ({}, {}): {}\n",
                f.id,
                f.source.as_str(),
                format_size(f.size),
                f.file.display()
            ));
        }
    }
    for w in &found.warnings {
        out.push_str(&format!("warning: {w}\n"));
    }
    out
}

/// `--models-dir` given to a command that reads discovery.
pub fn add_dirs(config: &mut Config, dirs: &[PathBuf]) {
    config.discovery.models_dirs.extend(dirs.iter().cloned());
}
