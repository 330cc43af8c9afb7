//! How much memory a model takes: declared in the config, estimated from its GGUF and its
//! command (`crate::estimate`), learned from an earlier run of the same file and flags, or
//! measured from its running server.
//!
//! What the budget counts: a declared figure, or the larger of it and the measured one (a
//! declared number wins); otherwise the measured figure while the server runs, before that the
//! learned one, else the estimate.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;

use crate::config::ModelConfig;
use crate::estimate::buffers::{self, DeviceBuffers};
use crate::estimate::{self, Estimate};
use crate::gpu::place::GpuNeed;
use crate::procfs;

/// For commands that name a model file but no GGUF (not a llama-server): the file's size plus
/// this margin, the rule before GGUF estimates.
const ESTIMATE_MARGIN_BYTES: u64 = 128 * 1024 * 1024;
const ESTIMATE_MARGIN_PERCENT: u64 = 20;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Memory {
    /// What the budget counts, in bytes (None: unknown, counted as 0).
    pub bytes: Option<u64>,
    /// "declared", "estimated", "learned", "measured" or "unknown".
    pub source: &'static str,
    pub declared: Option<u64>,
    /// RAM the estimate counts (the sum of its parts, or the file-size rule).
    pub estimated: Option<u64>,
    /// The estimate's parts, for llama-server commands naming a GGUF.
    pub estimate: Option<Arc<Estimate>>,
    /// Why there is no estimate for a command that names a model (`-hf`, an unreadable file).
    pub unknown_reason: Option<String>,
    /// What an earlier run of the same file and memory-shaping flags measured (state store).
    pub learned: Option<u64>,
    /// The most this run's server measured (PSS of its process group).
    pub measured: Option<u64>,
    /// The most this run's server measured on each GPU.
    pub measured_gpu: BTreeMap<u32, u64>,
    /// The buffers this run's server reported as it loaded, per device (`estimate::buffers`).
    pub buffers: BTreeMap<String, DeviceBuffers>,
    /// Set when a server of this model was killed for lack of memory: the next starts count at
    /// least this (`after_oom`).
    pub oom_floor: Option<u64>,
    /// What it needs on the GPUs, from the estimate (`gpu::place`).
    pub gpu_need: GpuNeed,
}

/// A running server whose figure grows past the one it was admitted on by more than this (in
/// percent) is re-counted by admission.
pub const GROWTH_PERCENT: u64 = 10;

/// True if `now` is more than [`GROWTH_PERCENT`] above `counted` (an unknown figure, counted
/// as 0, grows by any known one).
pub fn grew_past(counted: Option<u64>, now: Option<u64>) -> bool {
    let (counted, Some(now)) = (counted.unwrap_or(0), now) else {
        return false;
    };
    now > counted.saturating_add(counted * GROWTH_PERCENT / 100)
}

/// After an OOM kill, the next start counts the largest figure known × this (in percent).
pub const OOM_MARGIN_PERCENT: u64 = 110;

/// `memory_detail` of `GET /api/models` (SPEC.md).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MemoryDetail {
    pub estimate: Option<Estimate>,
    pub measured: Option<Measured>,
    pub learned: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Measured {
    pub ram: u64,
    pub gpu: BTreeMap<u32, u64>,
    /// What the server said it allocated, per device ("CPU", "CUDA0", …); empty when its output
    /// has no buffer lines (llama-server prints them at `-lv 4`).
    pub buffers: BTreeMap<String, DeviceBuffers>,
}

impl Memory {
    /// The figure of a model on a machine without GPUs.
    pub fn for_config(cfg: &ModelConfig) -> Self {
        Self::for_machine(cfg, &[], false)
    }

    /// The figure of a model on a machine with GPUs `gpus` (their indices): estimated for the
    /// GPUs of its `gpus` key; else, when `placed` (`gpu_budget` is set), for one GPU (it is
    /// placed on one: `gpu::place`), or for all of them (llama.cpp splits its layers).
    pub fn for_machine(cfg: &ModelConfig, gpus: &[u32], placed: bool) -> Self {
        let mut m = Self {
            declared: cfg.memory,
            ..Self::default()
        };
        let visible: Vec<u32> = match (&cfg.gpus, gpus.first()) {
            (_, None) => Vec::new(),
            (Some(pinned), Some(_)) => pinned.clone(),
            (None, Some(&first)) if placed => vec![first],
            (None, Some(_)) => gpus.to_vec(),
        };
        if cfg.memory.is_none() {
            let cwd = cfg.cwd.as_deref().map(std::path::Path::new);
            match estimate::for_command(&cfg.cmd, cwd, &visible) {
                Ok(Some(e)) => {
                    m.estimated = Some(e.total);
                    m.gpu_need = match &cfg.gpus {
                        _ if e.gpu.is_empty() => GpuNeed::Nothing,
                        None if placed => GpuNeed::Anywhere(e.gpu.values().sum()),
                        _ => GpuNeed::Pinned(e.gpu.clone()),
                    };
                    m.estimate = Some(Arc::new(e));
                }
                Ok(None) => m.estimated = file_size_rule(cfg),
                Err(why) => m.unknown_reason = Some(why.0),
            }
        }
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

    /// The server ended: for a model with an estimate, what the run measured becomes the
    /// learned figure (the larger, as the store keeps it) and the next start counts that.
    pub fn ended_run(mut self) -> Self {
        if self.estimate.is_some() {
            if let Some(m) = self.measured.take() {
                self.learned = Some(self.learned.map_or(m, |l| l.max(m)));
                self.measured_gpu.clear();
                self.buffers.clear();
            }
        }
        self.settle();
        self
    }

    /// The buffers the server reported as it loaded (its output since this start): kept, and
    /// each GPU's share counted as measured on that GPU.
    /// `visible`: the GPUs the server was shown (`CUDA_VISIBLE_DEVICES`), in order: its
    /// `CUDA0` is the first of them; empty = it saw them all, `CUDAi` is GPU i.
    pub fn with_buffers(mut self, lines: &[String], visible: &[u32]) -> Self {
        self.buffers = buffers::reported(lines);
        for (device, b) in &self.buffers {
            if let Some(gpu) = buffers::gpu_index(device) {
                let gpu = usize::try_from(gpu)
                    .ok()
                    .and_then(|i| visible.get(i).copied())
                    .unwrap_or(gpu);
                let v = self.measured_gpu.entry(gpu).or_default();
                *v = (*v).max(b.total());
            }
        }
        self
    }

    /// The server was killed for lack of memory: from now on this model counts at least the
    /// largest figure known of it (declared, estimated, learned, measured, an earlier floor)
    /// × 1.1, so its next start makes more room, or waits for it.
    pub fn after_oom(mut self) -> Self {
        let known = [
            self.declared,
            self.estimated,
            self.learned,
            self.measured,
            self.oom_floor,
        ]
        .into_iter()
        .flatten()
        .max();
        if let Some(k) = known {
            self.oom_floor = Some(k.saturating_mul(OOM_MARGIN_PERCENT) / 100);
        }
        self.settle();
        self
    }

    /// What the server holds on each GPU now (NVML): the most of each run is kept.
    pub fn with_measured_gpu(mut self, per_gpu: &BTreeMap<u32, u64>) -> Self {
        for (gpu, b) in per_gpu {
            let v = self.measured_gpu.entry(*gpu).or_default();
            *v = (*v).max(*b);
        }
        self
    }

    pub fn with_learned(mut self, learned: Option<u64>) -> Self {
        self.learned = learned;
        self.settle();
        self
    }

    /// The file and flags a measurement of this model is remembered under (llama-server
    /// commands naming a GGUF only).
    pub fn learn_key(&self) -> Option<(String, String)> {
        let e = self.estimate.as_ref()?;
        Some((file_key(&e.file), e.shape.clone()))
    }

    pub fn detail(&self) -> MemoryDetail {
        MemoryDetail {
            estimate: self.estimate.as_deref().cloned(),
            measured: self.measured.map(|ram| Measured {
                ram,
                gpu: self.measured_gpu.clone(),
                buffers: self.buffers.clone(),
            }),
            learned: self.learned,
        }
    }

    /// One line saying what the budget counts and why, for `llmvisor check`; `None` when
    /// nothing is known (a command that names no model file).
    pub fn summary(&self) -> Option<String> {
        let size = crate::units::format_size;
        if let Some(why) = &self.unknown_reason {
            return Some(format!("memory unknown: {why}"));
        }
        let bytes = self.bytes?;
        let mut line = format!("memory {} ({})", size(bytes), self.source);
        if let Some(e) = &self.estimate {
            line.push_str(&format!(
                ": weights {} + KV cache {} + compute {} + server {} in RAM, context {}",
                size(e.weights),
                size(e.kv_cache),
                size(e.compute),
                size(e.overhead),
                e.ctx
            ));
            for (gpu, b) in &e.gpu {
                line.push_str(&format!("; GPU {gpu}: {}", size(*b)));
            }
        }
        Some(line)
    }

    fn settle(&mut self) {
        (self.bytes, self.source) = match (self.declared, self.measured) {
            (Some(d), Some(m)) if m > d => (Some(m), "measured"),
            (Some(d), _) => (Some(d), "declared"),
            (None, Some(m)) => (Some(m), "measured"),
            (None, None) => match (self.learned, self.estimated) {
                (Some(l), _) => (Some(l), "learned"),
                (None, Some(e)) => (Some(e), "estimated"),
                (None, None) => (None, "unknown"),
            },
        };
        if let Some(floor) = self.oom_floor {
            if self.bytes.is_none_or(|b| b < floor) {
                self.bytes = Some(floor);
            }
        }
    }
}

/// A model file as remembered measurements name it: its path and size (a file replaced by
/// another of a different size is another model).
fn file_key(path: &std::path::Path) -> String {
    let size = std::fs::metadata(path).map_or(0, |m| m.len());
    format!("{}:{size}", path.display())
}

/// The size of the model file named by `-m`/`--model` in `cmd`, plus a margin.
fn file_size_rule(cfg: &ModelConfig) -> Option<u64> {
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

/// Memory of every live process in group `pgid`, in bytes: the sum of their PSS, so pages two
/// servers share (the mapped weights of one file) are counted once between them.
pub fn measure_group(pgid: u32) -> Option<u64> {
    let total: u64 = procfs::live_group_members(pgid)
        .into_iter()
        .filter_map(pss_bytes)
        .sum();
    (total > 0).then_some(total)
}

/// `Pss:` of `/proc/PID/smaps_rollup` (Linux 4.14+), else `VmRSS:` of `/proc/PID/status`.
fn pss_bytes(pid: u32) -> Option<u64> {
    let field = |file: &str, name: &str| -> Option<u64> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/{file}")).ok()?;
        let line = text.lines().find(|l| l.starts_with(name))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    };
    field("smaps_rollup", "Pss:").or_else(|| field("status", "VmRSS:"))
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
    fn after_an_oom_kill_the_largest_figure_plus_a_tenth() {
        let mut cfg = ModelConfig::new("m", vec!["x".into()]);
        cfg.memory = Some(1000);
        let m = Memory::for_config(&cfg)
            .with_measured(Some(2000))
            .after_oom();
        assert_eq!(m.oom_floor, Some(2200));
        // The run ends: the floor outlives it, above the learned figure.
        let m = m.ended_run();
        assert_eq!(m.bytes, Some(2200));
        // A later, smaller measurement does not undo it; a second kill raises it again.
        let m = m.with_measured(Some(1500));
        assert_eq!(m.bytes, Some(2200));
        let m = m.after_oom();
        assert_eq!(m.bytes, Some(2420));
        // A model whose memory is unknown has nothing to grow.
        let unknown = Memory::for_config(&ModelConfig::new("u", vec!["x".into()])).after_oom();
        assert_eq!((unknown.bytes, unknown.oom_floor), (None, None));
    }

    #[test]
    fn growth_beyond_a_tenth_is_re_counted() {
        assert!(!grew_past(Some(1000), Some(1100)), "10 % is within");
        assert!(grew_past(Some(1000), Some(1101)));
        assert!(!grew_past(Some(1000), Some(900)));
        assert!(!grew_past(Some(1000), None));
        assert!(grew_past(None, Some(1)), "unknown counted as 0");
        assert!(!grew_past(None, None));
    }

    #[test]
    fn file_size_rule_for_other_commands() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("m.bin");
        std::fs::write(&file, vec![0u8; 1000]).unwrap();
        let cfg = ModelConfig::new(
            "m",
            vec!["srv".into(), "-m".into(), file.display().to_string()],
        );
        let m = Memory::for_config(&cfg);
        assert_eq!(m.source, "estimated");
        assert_eq!(m.bytes, Some(1000 + 200 + ESTIMATE_MARGIN_BYTES));
        assert!(m.estimate.is_none());
        let none = Memory::for_config(&ModelConfig::new("m", vec!["srv".into()]));
        assert_eq!((none.bytes, none.source), (None, "unknown"));
    }

    #[test]
    fn a_gguf_is_estimated_then_learned_then_measured() {
        let dir = tempfile::tempdir().unwrap();
        let gguf = dir.path().join("m.gguf");
        let w = crate::gguf::write::GgufWriter::default()
            .meta(
                "general.architecture",
                crate::gguf::write::Meta::Str("llama".into()),
            )
            .meta("llama.block_count", crate::gguf::write::Meta::U32(1))
            .meta("llama.context_length", crate::gguf::write::Meta::U32(256))
            .meta("llama.embedding_length", crate::gguf::write::Meta::U32(32))
            .meta(
                "llama.attention.head_count",
                crate::gguf::write::Meta::U32(2),
            )
            .tensor("blk.0.w", &[32, 32], 0);
        std::fs::write(&gguf, w.bytes()).unwrap();
        let cmd = |c: &str| -> Vec<String> {
            format!("llama-server -m {} {c}", gguf.display())
                .split_whitespace()
                .map(String::from)
                .collect()
        };
        let m = Memory::for_config(&ModelConfig::new("m", cmd("-c 256")));
        assert_eq!(m.source, "estimated");
        let e = m.estimate.clone().unwrap();
        assert_eq!(m.bytes, Some(e.total));
        assert_eq!(e.weights, 32 * 32 * 4);
        let (file, shape) = m.learn_key().unwrap();
        assert!(file.ends_with(&format!(
            "m.gguf:{}",
            std::fs::metadata(&gguf).unwrap().len()
        )));
        assert_ne!(
            Memory::for_config(&ModelConfig::new("m", cmd("-c 512")))
                .learn_key()
                .unwrap()
                .1,
            shape
        );
        let m = m.with_learned(Some(5_000_000));
        assert_eq!((m.bytes, m.source), (Some(5_000_000), "learned"));
        // While it runs, what it really takes counts, below the learned figure too.
        let m = m.with_measured(Some(4_000_000));
        assert_eq!((m.bytes, m.source), (Some(4_000_000), "measured"));
        assert_eq!(m.detail().measured.unwrap().ram, 4_000_000);
        // -hf: no estimate, and why.
        let hf = Memory::for_config(&ModelConfig::new(
            "m",
            vec!["llama-server".into(), "-hf".into(), "a/b".into()],
        ));
        assert_eq!(hf.source, "unknown");
        assert!(hf.unknown_reason.unwrap().contains("-hf"));
    }

    #[test]
    fn on_a_machine_with_gpus_the_gpu_part_is_placed_or_pinned() {
        use crate::gguf::write::{GgufWriter, Meta};
        let dir = tempfile::tempdir().unwrap();
        let gguf = dir.path().join("g.gguf");
        let w = GgufWriter::default()
            .meta("general.architecture", Meta::Str("llama".into()))
            .meta("llama.block_count", Meta::U32(2))
            .meta("llama.context_length", Meta::U32(256))
            .meta("llama.embedding_length", Meta::U32(32))
            .meta("llama.attention.head_count", Meta::U32(2))
            .tensor("blk.0.w", &[32, 32], 0)
            .tensor("blk.1.w", &[32, 32], 0);
        std::fs::write(&gguf, w.bytes()).unwrap();
        let cmd: Vec<String> = format!("llama-server -m {} -c 256 -ngl 99", gguf.display())
            .split_whitespace()
            .map(String::from)
            .collect();
        let mut cfg = ModelConfig::new("g", cmd);
        // No GPU: nothing on one.
        assert_eq!(
            Memory::for_machine(&cfg, &[], true).gpu_need,
            GpuNeed::Nothing
        );
        // Two GPUs, not pinned: estimated for one GPU, placed on either.
        let any = Memory::for_machine(&cfg, &[0, 1], true);
        let e = any.estimate.clone().unwrap();
        assert_eq!(e.gpu.keys().copied().collect::<Vec<_>>(), [0]);
        assert_eq!(any.gpu_need, GpuNeed::Anywhere(e.gpu[&0]));
        assert!(
            e.gpu[&0] >= 2 * 32 * 32 * 4,
            "both layers' weights on the GPU"
        );
        // Not placed (no gpu_budget): split over both, as llama.cpp does.
        let split = Memory::for_machine(&cfg, &[0, 1], false);
        let parts = split.estimate.clone().unwrap().gpu.clone();
        assert_eq!(parts.keys().copied().collect::<Vec<_>>(), [0, 1]);
        assert_eq!(split.gpu_need, GpuNeed::Pinned(parts));
        // Pinned to GPU 1: its part there.
        cfg.gpus = Some(vec![1]);
        let pinned = Memory::for_machine(&cfg, &[0, 1], true);
        assert_eq!(pinned.gpu_need, GpuNeed::Pinned([(1, e.gpu[&0])].into()));
        // A declared figure has no GPU part to count.
        cfg.memory = Some(1000);
        assert_eq!(
            Memory::for_machine(&cfg, &[0, 1], true).gpu_need,
            GpuNeed::Nothing
        );
    }

    #[test]
    fn gpu_figures_from_nvml_and_buffer_lines_name_the_real_gpu() {
        let m = Memory::default()
            .with_measured_gpu(&[(1, 500)].into())
            .with_measured_gpu(&[(1, 300), (0, 7)].into());
        assert_eq!(
            m.measured_gpu,
            BTreeMap::from([(0, 7), (1, 500)]),
            "the most of the run"
        );
        let lines = vec!["llama_kv_cache:      CUDA0 KV buffer size =    1.00 MiB".to_owned()];
        // Shown GPU 1 only (CUDA_VISIBLE_DEVICES=1), the server calls it CUDA0.
        let shown = Memory::default().with_buffers(&lines, &[1]);
        assert_eq!(shown.measured_gpu, BTreeMap::from([(1, 1 << 20)]));
        let all = Memory::default().with_buffers(&lines, &[]);
        assert_eq!(all.measured_gpu, BTreeMap::from([(0, 1 << 20)]));
    }

    #[test]
    fn measures_this_process() {
        let me = std::process::id();
        assert!(pss_bytes(me).unwrap() > 1024 * 1024);
    }
}
