//! The buffers llama-server reports as it loads, one line each (llama.cpp's load_tensors,
//! llama_kv_cache, llama_context and sched_reserve log lines; at `-lv 4` in recent builds):
//!
//! ```text
//! load_tensors:   CPU_Mapped model buffer size =    92.10 MiB
//! llama_kv_cache:      CUDA0 KV buffer size =    45.00 MiB
//! sched_reserve:        CPU compute buffer size =    16.64 MiB
//! ```
//!
//! The truest per-device figure on every backend: what the server itself allocated.

use std::collections::BTreeMap;

use serde::Serialize;

/// What one device holds, by kind of buffer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DeviceBuffers {
    pub weights: u64,
    pub kv_cache: u64,
    pub compute: u64,
    /// Output, recurrent state, LoRA and other buffers.
    pub other: u64,
}

impl DeviceBuffers {
    pub fn total(&self) -> u64 {
        self.weights + self.kv_cache + self.compute + self.other
    }
}

/// `(device, kind, bytes)` of one buffer line. The device is as llama.cpp names its buffer type
/// with host variants folded into "CPU" (`CPU_Mapped`, `CPU_REPACK`, `CUDA_Host`: RAM).
pub fn parse_line(line: &str) -> Option<(String, &'static str, u64)> {
    let (head, size) = line.split_once(" buffer size = ")?;
    let mut words = head.split_whitespace().rev();
    let kind = match words.next()? {
        "model" => "weights",
        "KV" => "kv_cache",
        "compute" => "compute",
        _ => "other",
    };
    let device = words.next()?;
    let mut size = size.split_whitespace();
    let value: f64 = size.next()?.parse().ok()?;
    let unit = match size.next()? {
        "B" => 1.0,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    let host = device.starts_with("CPU") || device.ends_with("_Host");
    let device = if host { "CPU" } else { device };
    Some((device.to_owned(), kind, (value * unit).round() as u64))
}

/// The buffers of the last start in `lines` (a model's output, oldest first): those after the
/// last "llmvisor: starting" line llmvisor writes before each start.
pub fn reported(lines: &[String]) -> BTreeMap<String, DeviceBuffers> {
    let start = lines
        .iter()
        .rposition(|l| l.starts_with("llmvisor: starting "))
        .map_or(0, |i| i + 1);
    let mut out: BTreeMap<String, DeviceBuffers> = BTreeMap::new();
    for (device, kind, bytes) in lines[start..].iter().filter_map(|l| parse_line(l)) {
        let d = out.entry(device).or_default();
        match kind {
            "weights" => d.weights += bytes,
            "kv_cache" => d.kv_cache += bytes,
            "compute" => d.compute += bytes,
            _ => d.other += bytes,
        }
    }
    out
}

/// The GPU index of a device name (`CUDA0`, `ROCm1`, `Vulkan0`); `None` for the CPU and for
/// Metal (unified memory: RAM).
pub fn gpu_index(device: &str) -> Option<u32> {
    let digits = device.trim_start_matches(|c: char| !c.is_ascii_digit());
    let name = &device[..device.len() - digits.len()];
    matches!(name, "CUDA" | "ROCm" | "Vulkan" | "SYCL" | "MUSA" | "CANN")
        .then(|| digits.parse().ok())
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    #[test]
    fn reads_llama_servers_lines() {
        let lines: Vec<String> = [
            "llmvisor: starting m (attempt 1): llama-server -m old.gguf",
            "0.00.1 I load_tensors:   CPU_Mapped model buffer size =   999.00 MiB",
            "llmvisor: starting m (attempt 2): llama-server -m m.gguf",
            "0.00.147.901 I load_tensors:   CPU_Mapped model buffer size =    92.10 MiB",
            "0.00.147.902 I load_tensors:   CPU_REPACK model buffer size =    12.66 MiB",
            "load_tensors:        CUDA0 model buffer size =  1024.00 MiB",
            "0.00.149.048 I llama_context:        CPU  output buffer size =     0.75 MiB",
            "0.00.149.115 I llama_kv_cache:        CPU KV buffer size =    45.00 MiB",
            "llama_kv_cache:      CUDA0 KV buffer size =    64.00 MiB",
            "sched_reserve:      CUDA0 compute buffer size =   300.00 MiB",
            "sched_reserve:  CUDA_Host compute buffer size =     8.00 MiB",
            "srv  load_model: initializing, n_slots = 4",
            "llama_kv_cache: size = 45.00 MiB (  2048 cells,  30 layers,  4/1 seqs)",
        ]
        .map(String::from)
        .to_vec();
        let b = reported(&lines);
        assert_eq!(b.len(), 2);
        let cpu = b["CPU"];
        assert_eq!(cpu.weights, ((92.10 + 12.66) * MIB as f64).round() as u64);
        assert_eq!((cpu.kv_cache, cpu.compute), (45 * MIB, 8 * MIB));
        assert_eq!(cpu.other, 3 * MIB / 4);
        assert_eq!(b["CUDA0"].total(), (1024 + 64 + 300) * MIB);
        assert!(reported(&[]).is_empty());
        assert_eq!(parse_line("x buffer size = lots MiB"), None);
    }

    #[test]
    fn gpu_indices() {
        assert_eq!(gpu_index("CUDA0"), Some(0));
        assert_eq!(gpu_index("ROCm12"), Some(12));
        assert_eq!(gpu_index("Vulkan1"), Some(1));
        assert_eq!(gpu_index("CPU"), None);
        assert_eq!(gpu_index("Metal"), None);
    }
}
