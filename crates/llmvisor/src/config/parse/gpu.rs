//! `gpu_budget`, `gpu_reserve` and the per-model `gpus` key.

use super::super::tree::{Kind, Node};
use super::Parser;
use crate::config::GpuBudget;

impl Parser<'_> {
    /// `gpu_budget = "auto"` or a size (the same on every GPU).
    pub(super) fn gpu_budget(&mut self, n: &Node) -> Option<GpuBudget> {
        match &n.kind {
            Kind::Str(a) if a == "auto" => Some(GpuBudget::Auto),
            _ => self.size("gpu_budget", n).map(GpuBudget::Bytes),
        }
    }

    /// `gpus = [0, 1]`: GPU indices (as NVML and `CUDA_VISIBLE_DEVICES` count them), no
    /// repeats; `[]` = no GPU (CPU only).
    pub(super) fn gpu_list(&mut self, n: &Node) -> Option<Vec<u32>> {
        let Kind::Array(items) = &n.kind else {
            self.type_err("`gpus`", n, "an array of GPU indices, e.g. [0, 1]");
            return None;
        };
        let mut out = Vec::new();
        for item in items {
            match &item.kind {
                Kind::Int(i) => match u32::try_from(*i) {
                    Ok(g) if out.contains(&g) => self.err_help(
                        item.at(),
                        format!("GPU {g} is listed twice in `gpus`"),
                        "list each GPU once",
                    ),
                    Ok(g) => out.push(g),
                    Err(_) => self.err_help(
                        item.at(),
                        format!("`gpus` holds GPU indices (0, 1, …), found {i}"),
                        "GPUs are numbered from 0, as nvidia-smi lists them",
                    ),
                },
                _ => self.type_err("an entry of `gpus`", item, "a GPU index (an integer)"),
            }
        }
        Some(out)
    }
}
