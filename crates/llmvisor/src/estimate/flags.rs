//! The llama-server flags that shape its memory, read from a model's `cmd` (names and defaults
//! as in llama.cpp's common/arg.cpp; `--flag value` and `--flag=value` both).

/// `-fa`: flash attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlashAttn {
    On,
    Off,
    Auto,
}

/// `-ngl`: how many layers go to the GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuLayers {
    /// `auto` (the default) or `all`: every layer that fits; the estimate counts all.
    All,
    Exactly(u64),
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct LlamaArgs {
    /// `-m`/`--model`.
    pub model: Option<String>,
    /// `-hf`/`--hf-repo`: a file llama-server downloads itself (its size is unknown here).
    pub hf_repo: Option<String>,
    /// `-mm`/`--mmproj`.
    pub mmproj: Option<String>,
    /// `-c`/`--ctx-size` (0 = the model's trained context).
    pub ctx_size: Option<u64>,
    /// `-np`/`--parallel` (absent: llama-server's "auto", 4 slots sharing one KV cache).
    pub parallel: Option<u64>,
    /// `-kvu`/`--kv-unified`: one KV cache shared by all slots.
    pub kv_unified: bool,
    /// `--swa-full`: sliding-window layers keep the whole context.
    pub swa_full: bool,
    pub cache_type_k: Option<String>,
    pub cache_type_v: Option<String>,
    pub flash_attn: Option<FlashAttn>,
    pub gpu_layers: Option<GpuLayers>,
    /// `-ts`/`--tensor-split`: the share of layers on each GPU.
    pub tensor_split: Option<Vec<f64>>,
    /// `-dev`/`--device`.
    pub devices: Option<Vec<String>>,
    pub no_mmap: bool,
    pub mlock: bool,
    /// `-b`/`--batch-size`.
    pub batch: Option<u64>,
    /// `-ub`/`--ubatch-size`.
    pub ubatch: Option<u64>,
}

impl LlamaArgs {
    /// Reads the flags of `cmd` (the program first). Flags it does not know are skipped; a flag
    /// given twice counts as llama-server counts it, the last one.
    pub fn parse(cmd: &[String]) -> Result<Self, String> {
        let mut a = LlamaArgs::default();
        let mut it = cmd.iter().skip(1);
        while let Some(arg) = it.next() {
            let (flag, inline) = match arg.split_once('=') {
                Some((f, v)) if f.starts_with("--") => (f, Some(v.to_owned())),
                _ => (arg.as_str(), None),
            };
            let mut value = |what: &str| -> Result<String, String> {
                inline
                    .clone()
                    .or_else(|| it.next().cloned())
                    .ok_or_else(|| format!("{what} needs a value"))
            };
            let number = |v: String, what: &str| -> Result<u64, String> {
                v.trim()
                    .parse::<u64>()
                    .map_err(|_| format!("{what} {v:?} is not a whole number"))
            };
            match flag {
                "-m" | "--model" => a.model = Some(value(flag)?),
                "-hf" | "-hfr" | "--hf-repo" => a.hf_repo = Some(value(flag)?),
                "-mm" | "--mmproj" => a.mmproj = Some(value(flag)?),
                "-c" | "--ctx-size" => a.ctx_size = Some(number(value(flag)?, flag)?),
                "-np" | "--parallel" => a.parallel = Some(number(value(flag)?, flag)?),
                "-kvu" | "--kv-unified" => a.kv_unified = true,
                "-no-kvu" | "--no-kv-unified" => a.kv_unified = false,
                "--swa-full" => a.swa_full = true,
                "-ctk" | "--cache-type-k" => a.cache_type_k = Some(value(flag)?),
                "-ctv" | "--cache-type-v" => a.cache_type_v = Some(value(flag)?),
                "-fa" | "--flash-attn" => {
                    a.flash_attn = Some(match value(flag)?.as_str() {
                        "on" | "1" | "true" | "enabled" => FlashAttn::On,
                        "off" | "0" | "false" | "disabled" => FlashAttn::Off,
                        "auto" => FlashAttn::Auto,
                        v => return Err(format!("{flag} {v:?}: expected on, off or auto")),
                    })
                }
                "-ngl" | "--gpu-layers" | "--n-gpu-layers" => {
                    a.gpu_layers = Some(match value(flag)?.as_str() {
                        "auto" | "all" => GpuLayers::All,
                        // llama.cpp: -1 is auto, -2 or less all.
                        v if v.starts_with('-') => GpuLayers::All,
                        v => GpuLayers::Exactly(number(v.to_owned(), flag)?),
                    })
                }
                "-ts" | "--tensor-split" => {
                    let v = value(flag)?;
                    let shares = v
                        .split([',', '/'])
                        .map(|s| {
                            s.trim()
                                .parse::<f64>()
                                .ok()
                                .filter(|x| x.is_finite() && *x >= 0.0)
                        })
                        .collect::<Option<Vec<f64>>>()
                        .ok_or_else(|| format!("{flag} {v:?}: expected numbers like 3,1"))?;
                    a.tensor_split = Some(shares);
                }
                "-dev" | "--device" => {
                    a.devices = Some(
                        value(flag)?
                            .split(',')
                            .map(|s| s.trim().to_owned())
                            .collect(),
                    )
                }
                "--no-mmap" => a.no_mmap = true,
                "--mlock" => a.mlock = true,
                "-b" | "--batch-size" => a.batch = Some(number(value(flag)?, flag)?),
                "-ub" | "--ubatch-size" => a.ubatch = Some(number(value(flag)?, flag)?),
                _ => {}
            }
        }
        Ok(a)
    }

    /// The flags that change what the server takes, as one stable string: with the model file,
    /// the key a measured figure is remembered under.
    pub fn shape_key(&self) -> String {
        let opt = |v: &Option<u64>| v.map_or("-".to_owned(), |n| n.to_string());
        let s = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
        format!(
            "c={} np={} kvu={} swafull={} ctk={} ctv={} fa={:?} ngl={:?} ts={:?} dev={:?} mmap={} mlock={} b={} ub={} mmproj={}",
            opt(&self.ctx_size),
            opt(&self.parallel),
            self.kv_unified,
            self.swa_full,
            s(&self.cache_type_k),
            s(&self.cache_type_v),
            self.flash_attn,
            self.gpu_layers,
            self.tensor_split,
            self.devices,
            !self.no_mmap,
            self.mlock,
            opt(&self.batch),
            opt(&self.ubatch),
            s(&self.mmproj),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<LlamaArgs, String> {
        LlamaArgs::parse(&shell_words::split(s).unwrap())
    }

    #[test]
    fn reads_the_memory_flags() {
        let a = parse(
            "llama-server -m m.gguf --ctx-size=8192 -np 4 -ctk q8_0 --cache-type-v q8_0 -fa on \
             -ngl 20 -ts 3,1 --device CUDA0,CUDA1 --no-mmap --mlock -b 1024 -ub 256 --mmproj p.gguf \
             --port 8080 -t 2",
        )
        .unwrap();
        assert_eq!(a.model.as_deref(), Some("m.gguf"));
        assert_eq!((a.ctx_size, a.parallel), (Some(8192), Some(4)));
        assert_eq!(
            (a.cache_type_k.as_deref(), a.cache_type_v.as_deref()),
            (Some("q8_0"), Some("q8_0"))
        );
        assert_eq!(a.flash_attn, Some(FlashAttn::On));
        assert_eq!(a.gpu_layers, Some(GpuLayers::Exactly(20)));
        assert_eq!(a.tensor_split, Some(vec![3.0, 1.0]));
        assert_eq!(a.devices, Some(vec!["CUDA0".into(), "CUDA1".into()]));
        assert!(a.no_mmap && a.mlock);
        assert_eq!((a.batch, a.ubatch), (Some(1024), Some(256)));
        assert_eq!(a.mmproj.as_deref(), Some("p.gguf"));
        assert_eq!(
            parse("x -ngl all").unwrap().gpu_layers,
            Some(GpuLayers::All)
        );
        assert_eq!(parse("x -ngl -1").unwrap().gpu_layers, Some(GpuLayers::All));
        assert_eq!(
            parse("x -hf org/repo:Q4").unwrap().hf_repo.as_deref(),
            Some("org/repo:Q4")
        );
    }

    #[test]
    fn bad_values_are_errors_not_guesses() {
        assert!(parse("x -c lots")
            .unwrap_err()
            .contains("-c \"lots\" is not a whole number"));
        assert!(parse("x -c").unwrap_err().contains("-c needs a value"));
        assert!(parse("x -fa maybe")
            .unwrap_err()
            .contains("expected on, off or auto"));
        assert!(parse("x -ts a,b").is_err());
    }

    #[test]
    fn the_shape_key_changes_with_the_shape_only() {
        let k = |s: &str| parse(s).unwrap().shape_key();
        assert_eq!(
            k("x -m a -c 2048 --port 1"),
            k("x -c 2048 -m a --port 2 -t 4")
        );
        assert_ne!(k("x -c 2048"), k("x -c 4096"));
        assert_ne!(k("x -c 2048"), k("x -c 2048 -ctk q8_0"));
    }
}
