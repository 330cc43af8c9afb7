//! Which GPUs a server is shown: `CUDA_VISIBLE_DEVICES` from where admission placed it.

use std::collections::BTreeMap;

use crate::config::ModelConfig;

/// The environment variable that tells CUDA (and llama-server's CUDA backend) which GPUs it sees.
pub const CUDA_VISIBLE_DEVICES: &str = "CUDA_VISIBLE_DEVICES";

/// `CUDA_VISIBLE_DEVICES` for a server admitted on the GPUs `placed`: those GPUs only; none
/// (`""`) for a model with `gpus = []` — unless its config chooses itself (the variable in
/// `env`, or `--device`/`-dev` in `cmd`). `None`: leave the environment alone.
pub fn gpu_env(cfg: &ModelConfig, placed: &BTreeMap<u32, u64>) -> Option<String> {
    let chooses = cfg.env.contains_key(CUDA_VISIBLE_DEVICES)
        || cfg
            .cmd
            .iter()
            .any(|a| a == "--device" || a == "-dev" || a.starts_with("--device="));
    if chooses {
        return None;
    }
    if cfg.gpus.as_ref().is_some_and(Vec::is_empty) {
        return Some(String::new());
    }
    if placed.is_empty() {
        return None;
    }
    let list: Vec<String> = placed.keys().map(u32::to_string).collect();
    Some(list.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(cmd: &str) -> ModelConfig {
        ModelConfig::new("m", cmd.split_whitespace().map(String::from).collect())
    }

    #[test]
    fn the_placed_gpus_unless_the_config_chooses() {
        let one: BTreeMap<u32, u64> = [(1, 5)].into();
        let two: BTreeMap<u32, u64> = [(0, 5), (1, 5)].into();
        assert_eq!(gpu_env(&cfg("llama-server"), &one).as_deref(), Some("1"));
        assert_eq!(gpu_env(&cfg("llama-server"), &two).as_deref(), Some("0,1"));
        assert_eq!(gpu_env(&cfg("llama-server"), &BTreeMap::new()), None);
        assert_eq!(gpu_env(&cfg("llama-server --device CUDA1"), &one), None);
        assert_eq!(gpu_env(&cfg("llama-server -dev CUDA1"), &one), None);
        assert_eq!(gpu_env(&cfg("llama-server --device=CUDA1"), &one), None);
        let mut own = cfg("llama-server");
        own.env.insert(CUDA_VISIBLE_DEVICES.into(), "2".into());
        assert_eq!(gpu_env(&own, &one), None);
        // gpus = []: CPU only, so it is shown no GPU.
        let mut cpu = cfg("llama-server");
        cpu.gpus = Some(Vec::new());
        assert_eq!(gpu_env(&cpu, &BTreeMap::new()).as_deref(), Some(""));
    }
}
