//! How much memory a model takes: declared in the config, estimated from its GGUF file, or
//! measured from its running server — the budget uses the larger of declared/estimated and
//! measured.

use serde::Serialize;

use crate::config::ModelConfig;
use crate::procfs;

/// Added to a GGUF file's size for the estimate: KV cache, compute buffers, the server itself.
const ESTIMATE_MARGIN_BYTES: u64 = 128 * 1024 * 1024;
const ESTIMATE_MARGIN_PERCENT: u64 = 20;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Memory {
    /// What the budget counts, in bytes (None: unknown, counted as 0).
    pub bytes: Option<u64>,
    /// "declared", "estimated", "measured" or "unknown".
    pub source: &'static str,
    pub declared: Option<u64>,
    pub estimated: Option<u64>,
    pub measured: Option<u64>,
}

impl Memory {
    pub fn for_config(cfg: &ModelConfig) -> Self {
        let mut m = Self {
            declared: cfg.memory,
            estimated: if cfg.memory.is_none() {
                estimate(cfg)
            } else {
                None
            },
            ..Self::default()
        };
        m.settle();
        m
    }

    pub fn with_measured(mut self, measured: Option<u64>) -> Self {
        if let Some(new) = measured {
            self.measured = Some(self.measured.map_or(new, |old| old.max(new)));
        }
        self.settle();
        self
    }

    fn settle(&mut self) {
        let base = self
            .declared
            .map(|b| (b, "declared"))
            .or(self.estimated.map(|b| (b, "estimated")));
        (self.bytes, self.source) = match (base, self.measured) {
            (Some((b, src)), Some(m)) if b >= m => (Some(b), src),
            (_, Some(m)) => (Some(m), "measured"),
            (Some((b, src)), None) => (Some(b), src),
            (None, None) => (None, "unknown"),
        };
    }
}

/// The size of the model file named by `-m`/`--model` in `cmd`, plus a margin.
fn estimate(cfg: &ModelConfig) -> Option<u64> {
    let mut args = cfg.cmd.iter();
    let mut path = None;
    while let Some(a) = args.next() {
        if a == "-m" || a == "--model" {
            path = args.next().cloned();
        } else if let Some(p) = a.strip_prefix("--model=") {
            path = Some(p.to_owned());
        }
    }
    let path = path.filter(|p| !p.contains("${"))?;
    let path = match &cfg.cwd {
        Some(cwd) if !path.starts_with('/') => std::path::Path::new(cwd).join(path),
        _ => path.into(),
    };
    let size = std::fs::metadata(path).ok()?.len();
    Some(size + size * ESTIMATE_MARGIN_PERCENT / 100 + ESTIMATE_MARGIN_BYTES)
}

/// Resident memory of every live process in group `pgid`, in bytes.
pub fn measure_group(pgid: u32) -> Option<u64> {
    let total: u64 = procfs::live_group_members(pgid)
        .into_iter()
        .filter_map(rss_bytes)
        .sum();
    (total > 0).then_some(total)
}

fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn larger_of_declared_and_measured() {
        let mut cfg = ModelConfig::new("m", vec!["x".into()]);
        cfg.memory = Some(1000);
        let m = Memory::for_config(&cfg);
        assert_eq!((m.bytes, m.source), (Some(1000), "declared"));
        let m = m.with_measured(Some(500));
        assert_eq!((m.bytes, m.source), (Some(1000), "declared"));
        let m = m.with_measured(Some(3000));
        assert_eq!((m.bytes, m.source), (Some(3000), "measured"));
        // A later, smaller measurement does not shrink it.
        let m = m.with_measured(Some(10));
        assert_eq!(m.bytes, Some(3000));
    }

    #[test]
    fn estimate_from_the_model_file() {
        let dir = tempfile::tempdir().unwrap();
        let gguf = dir.path().join("m.gguf");
        std::fs::write(&gguf, vec![0u8; 1000]).unwrap();
        let cfg = ModelConfig::new(
            "m",
            vec!["srv".into(), "-m".into(), gguf.display().to_string()],
        );
        let m = Memory::for_config(&cfg);
        assert_eq!(m.source, "estimated");
        assert_eq!(m.bytes, Some(1000 + 200 + ESTIMATE_MARGIN_BYTES));
        let none = Memory::for_config(&ModelConfig::new("m", vec!["srv".into()]));
        assert_eq!((none.bytes, none.source), (None, "unknown"));
    }

    #[test]
    fn measures_this_process() {
        let me = std::process::id();
        assert!(rss_bytes(me).unwrap() > 1024 * 1024);
    }
}
