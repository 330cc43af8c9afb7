//! What the machine offers, read once when the supervisor starts: the RAM available, for
//! `memory_budget = "auto"`, and its GPUs, for `gpu_budget`.
//!
//! Read once, not at each reload: later, the running models' own memory is no longer
//! "available", and an auto budget read then would shrink by what they take.

use std::collections::BTreeMap;

use crate::config::{Config, GpuBudget};
use crate::gpu::GpuInfo;
use crate::procfs;
use crate::units::format_size;

/// The machine's figures the budgets are resolved against; tests make their own.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Machine {
    /// `MemAvailable` of `/proc/meminfo` when the supervisor started; `None`: unreadable.
    pub mem_available: Option<u64>,
    /// The GPUs found (NVML), in index order.
    pub gpus: Vec<GpuInfo>,
}

/// A budget in bytes and, for one read off the machine, where its figure comes from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Budget {
    pub bytes: Option<u64>,
    /// E.g. `auto: 7.78 GiB available at start less memory_reserve 1 GiB`.
    pub origin: Option<String>,
}

impl Machine {
    /// This machine, now, its GPUs as `probe` lists them.
    pub fn read(probe: &dyn crate::gpu::GpuProbe) -> Self {
        Self {
            mem_available: procfs::mem_available(),
            gpus: probe.gpus(),
        }
    }

    pub fn gpu_indices(&self) -> Vec<u32> {
        self.gpus.iter().map(|g| g.index).collect()
    }

    /// What each GPU may hold under `gpu_budget`: its memory less `gpu_reserve` ("auto"), or
    /// the bytes given (at most its memory); empty without `gpu_budget` (GPUs not counted).
    pub fn gpu_budgets(&self, cfg: &Config) -> BTreeMap<u32, u64> {
        let Some(budget) = cfg.budgets.gpu else {
            return BTreeMap::new();
        };
        self.gpus
            .iter()
            .map(|g| {
                let b = match budget {
                    GpuBudget::Auto => g.total.saturating_sub(cfg.budgets.gpu_reserve),
                    GpuBudget::Bytes(b) => b.min(g.total),
                };
                (g.index, b)
            })
            .collect()
    }

    /// The memory budget `cfg` asks for here: its bytes, or with `memory_budget = "auto"` the
    /// RAM available at start less `memory_reserve` (at least 0). Unreadable `MemAvailable`
    /// with "auto": no budget (a warning says so).
    pub fn memory_budget(&self, cfg: &Config) -> Budget {
        if !cfg.budgets.memory_auto {
            return Budget {
                bytes: cfg.memory_budget,
                origin: None,
            };
        }
        let reserve = cfg.budgets.memory_reserve;
        match self.mem_available {
            Some(avail) => Budget {
                bytes: Some(avail.saturating_sub(reserve)),
                origin: Some(format!(
                    "auto: {} available at start less memory_reserve {}",
                    format_size(avail),
                    format_size(reserve)
                )),
            },
            None => {
                tracing::warn!(
                    "memory_budget = \"auto\": MemAvailable of /proc/meminfo is unreadable, so no memory budget applies"
                );
                Budget::default()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn config(text: &str) -> Config {
        let text = format!("state_dir = \"/tmp/lv-machine-test\"\n{text}");
        crate::config::parse_with_env(&text, None, &|_| None).unwrap()
    }

    #[test]
    fn auto_is_the_available_ram_less_the_reserve() {
        let m = Machine {
            mem_available: Some(10 * GIB),
            ..Machine::default()
        };
        let auto = m.memory_budget(&config("memory_budget = \"auto\"\n"));
        assert_eq!(auto.bytes, Some(9 * GIB));
        assert_eq!(
            auto.origin.as_deref(),
            Some("auto: 10 GiB available at start less memory_reserve 1 GiB")
        );
        let reserved = config("memory_budget = \"auto\"\nmemory_reserve = \"2560MiB\"\n");
        assert_eq!(m.memory_budget(&reserved).bytes, Some(7 * GIB + GIB / 2));
        // A reserve above what is available leaves nothing, not an underflow.
        let tight = Machine {
            mem_available: Some(GIB / 2),
            ..Machine::default()
        };
        assert_eq!(
            tight
                .memory_budget(&config("memory_budget = \"auto\"\n"))
                .bytes,
            Some(0)
        );
        // Unreadable: no budget.
        let blind = Machine::default();
        assert_eq!(
            blind.memory_budget(&config("memory_budget = \"auto\"\n")),
            Budget::default()
        );
        // Bytes: the machine does not matter.
        let fixed = m.memory_budget(&config("memory_budget = \"3GiB\"\n"));
        assert_eq!((fixed.bytes, fixed.origin), (Some(3 * GIB), None));
        assert_eq!(m.memory_budget(&config("")).bytes, None);
    }

    #[test]
    fn gpu_budgets_per_gpu() {
        let double = crate::gpu::double::GpuDouble::with_sizes(&[24 * GIB, 8 * GIB]);
        let m = Machine {
            mem_available: None,
            gpus: crate::gpu::GpuProbe::gpus(&double),
        };
        assert!(
            m.gpu_budgets(&config("")).is_empty(),
            "no gpu_budget: not counted"
        );
        assert_eq!(
            m.gpu_budgets(&config("gpu_budget = \"auto\"\n")),
            BTreeMap::from([(0, 24 * GIB - (512 << 20)), (1, 8 * GIB - (512 << 20))])
        );
        assert_eq!(
            m.gpu_budgets(&config("gpu_budget = \"auto\"\ngpu_reserve = \"2GiB\"\n")),
            BTreeMap::from([(0, 22 * GIB), (1, 6 * GIB)])
        );
        assert_eq!(
            m.gpu_budgets(&config("gpu_budget = \"10GiB\"\n")),
            BTreeMap::from([(0, 10 * GIB), (1, 8 * GIB)])
        );
        assert!(Machine::default()
            .gpu_budgets(&config("gpu_budget = \"auto\"\n"))
            .is_empty());
    }
}
