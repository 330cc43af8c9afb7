//! The GPUs of this machine, behind [`GpuProbe`]: NVML on a real machine ([`nvml::Nvml`]), a
//! double in tests ([`double::GpuDouble`]). No NVIDIA library or no GPU = no GPUs, never an
//! error: llmvisor then counts RAM only.

pub mod double;
pub mod nvml;
pub mod place;

use std::collections::BTreeMap;

/// One GPU as the probe sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuInfo {
    /// NVML's index (as `CUDA_VISIBLE_DEVICES` and llama-server's `CUDAi` count them, with the
    /// default `CUDA_DEVICE_ORDER`… see docs/memory.md).
    pub index: u32,
    pub name: String,
    /// Bytes of memory in all.
    pub total: u64,
    /// Bytes in use now, by anyone.
    pub used: u64,
}

/// What llmvisor asks of the machine's GPUs.
pub trait GpuProbe: Send + Sync {
    /// Every GPU; empty when there is none or no way to ask.
    fn gpus(&self) -> Vec<GpuInfo>;
    /// Bytes each GPU holds for the processes `pids` (a server's process group), by GPU index;
    /// GPUs where they hold nothing are left out.
    fn used_by(&self, pids: &[u32]) -> BTreeMap<u32, u64>;
}

/// The probe of this machine: NVML when its library loads, else one that finds no GPU.
pub fn probe() -> Box<dyn GpuProbe> {
    match nvml::Nvml::open() {
        Some(n) => Box::new(n),
        None => Box::new(NoGpus),
    }
}

/// No GPU.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoGpus;

impl GpuProbe for NoGpus {
    fn gpus(&self) -> Vec<GpuInfo> {
        Vec::new()
    }

    fn used_by(&self, _pids: &[u32]) -> BTreeMap<u32, u64> {
        BTreeMap::new()
    }
}
