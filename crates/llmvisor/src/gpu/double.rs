//! A [`GpuProbe`] that answers what a test set: GPUs of given sizes, and what processes hold.

use std::collections::BTreeMap;
use std::sync::Mutex;

use super::{GpuInfo, GpuProbe};

#[derive(Debug, Default)]
pub struct GpuDouble {
    pub gpus: Vec<GpuInfo>,
    /// (pid, GPU index) → bytes.
    pub held: Mutex<BTreeMap<(u32, u32), u64>>,
}

impl GpuDouble {
    /// GPUs 0, 1, … of these sizes, nothing used.
    pub fn with_sizes(sizes: &[u64]) -> Self {
        let gpus = sizes
            .iter()
            .enumerate()
            .map(|(i, &total)| GpuInfo {
                index: i as u32,
                name: format!("Double GPU {i}"),
                total,
                used: 0,
            })
            .collect();
        Self {
            gpus,
            held: Mutex::default(),
        }
    }

    /// Process `pid` now holds `bytes` on GPU `gpu`.
    pub fn hold(&self, pid: u32, gpu: u32, bytes: u64) {
        self.held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((pid, gpu), bytes);
    }
}

impl GpuProbe for GpuDouble {
    fn gpus(&self) -> Vec<GpuInfo> {
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        self.gpus
            .iter()
            .map(|g| GpuInfo {
                used: g.used
                    + held
                        .iter()
                        .filter(|((_, gpu), _)| *gpu == g.index)
                        .map(|(_, b)| *b)
                        .sum::<u64>(),
                ..g.clone()
            })
            .collect()
    }

    fn used_by(&self, pids: &[u32]) -> BTreeMap<u32, u64> {
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let mut used = BTreeMap::new();
        for ((pid, gpu), b) in held.iter() {
            if pids.contains(pid) {
                *used.entry(*gpu).or_default() += *b;
            }
        }
        used
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn answers_what_the_test_set() {
        let d = GpuDouble::with_sizes(&[24 * GIB, 24 * GIB]);
        d.hold(7, 1, 3 * GIB);
        d.hold(8, 1, GIB);
        let gpus = d.gpus();
        assert_eq!(gpus.len(), 2);
        assert_eq!((gpus[0].used, gpus[1].used), (0, 4 * GIB));
        assert_eq!(d.used_by(&[7]), BTreeMap::from([(1, 3 * GIB)]));
        assert!(d.used_by(&[9]).is_empty());
    }

    #[test]
    fn this_machine_without_nvidia_finds_no_gpu_and_no_error() {
        // Where NVML loads, a list; where it does not, empty. Never a panic.
        let gpus = crate::gpu::probe().gpus();
        assert!(gpus.iter().all(|g| g.total > 0));
    }
}
