//! [`GpuProbe`] through NVML (`nvml-wrapper`, which loads `libnvidia-ml.so` at run time).

use std::collections::BTreeMap;

use nvml_wrapper::enums::device::UsedGpuMemory;

use super::{GpuInfo, GpuProbe};

pub struct Nvml {
    nvml: nvml_wrapper::Nvml,
}

impl Nvml {
    /// NVML, if its library loads and initialises; else `None` and one debug line (a machine
    /// without NVIDIA's driver is normal, not a warning).
    pub fn open() -> Option<Self> {
        match nvml_wrapper::Nvml::init() {
            Ok(nvml) => Some(Self { nvml }),
            Err(e) => {
                tracing::debug!("no NVML ({e}): GPUs are not counted");
                None
            }
        }
    }
}

impl GpuProbe for Nvml {
    fn gpus(&self) -> Vec<GpuInfo> {
        let count = self.nvml.device_count().unwrap_or(0);
        (0..count)
            .filter_map(|index| {
                let d = self.nvml.device_by_index(index).ok()?;
                let mem = d.memory_info().ok()?;
                Some(GpuInfo {
                    index,
                    name: d.name().unwrap_or_default(),
                    total: mem.total,
                    used: mem.used,
                })
            })
            .collect()
    }

    fn used_by(&self, pids: &[u32]) -> BTreeMap<u32, u64> {
        let mut used = BTreeMap::new();
        let count = self.nvml.device_count().unwrap_or(0);
        for index in 0..count {
            let Ok(d) = self.nvml.device_by_index(index) else {
                continue;
            };
            let procs = d.running_compute_processes().unwrap_or_default();
            let bytes: u64 = procs
                .iter()
                .filter(|p| pids.contains(&p.pid))
                .map(|p| match p.used_gpu_memory {
                    UsedGpuMemory::Used(b) => b,
                    UsedGpuMemory::Unavailable => 0,
                })
                .sum();
            if bytes > 0 {
                used.insert(index, bytes);
            }
        }
        used
    }
}
