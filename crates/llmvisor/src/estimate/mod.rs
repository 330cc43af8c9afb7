//! What a llama-server will take, estimated before it starts from its GGUF's header and its
//! command's flags. docs/memory.md gives the formula and where each constant comes from (read
//! in llama.cpp's source, fitted to llama-server's own buffer lines on this project's test
//! models, and checked against the PSS of real servers).
//!
//! estimate = weights + KV cache + compute buffer + output buffer + the server's own memory,
//! per device: what runs on the CPU counts against RAM, each offloaded layer's share against
//! its GPU.

pub mod buffers;
mod flags;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

pub use flags::{FlashAttn, GpuLayers, LlamaArgs};

use crate::gguf::{types, Gguf};

const MIB: u64 = 1024 * 1024;
/// llama.cpp pads the context and the sliding-window cache to 256 cells (llama-context.cpp,
/// llama-kv-cache-iswa.cpp).
const CELL_PAD: u64 = 256;
/// llama-server's defaults: -b 2048, -ub 512, and with -np absent ("auto") 4 slots over one
/// unified KV cache (common/common.h, tools/server).
const DEFAULT_BATCH: u64 = 2048;
const DEFAULT_UBATCH: u64 = 512;
const AUTO_PARALLEL: u64 = 4;
/// The compute buffer per token of a micro-batch: 4 bytes × (3·n_ff + 5·n_embd), fitted to
/// llama-server's "compute buffer size" lines (within 0.2 % for both test models, -ub 128 to
/// 2048), plus 2 bytes (the f16 attention mask) per KV cell per token.
const COMPUTE_FF: u64 = 3;
const COMPUTE_EMBD: u64 = 5;
const MASK_BYTES: u64 = 2;
/// The server's own memory beside its buffers (code, heap, the tokenizer's tables): measured as
/// PSS minus the buffers it printed, on both test models: 14 MiB plus 128 bytes a vocabulary
/// token (SmolLM2, 49 152 tokens: 20 MiB; Gemma 3, 262 144 tokens: 46 MiB).
const SERVER_BASE: u64 = 14 * MIB;
const SERVER_PER_TOKEN: u64 = 128;

/// Estimated bytes, by part. `weights`, `kv_cache`, `compute` and `overhead` are the RAM parts;
/// `gpu` what goes to each GPU (all its parts together).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Estimate {
    pub weights: u64,
    pub kv_cache: u64,
    pub compute: u64,
    /// The output buffer and the server's own memory.
    pub overhead: u64,
    /// RAM in all: the parts above summed.
    pub total: u64,
    pub gpu: BTreeMap<u32, u64>,
    /// The context the estimate is for (after `-c 0` = trained, padding).
    pub ctx: u64,
    /// The memory-shaping flags, as remembered measurements are keyed.
    #[serde(skip)]
    pub shape: String,
    /// The model file (the first part of a split model).
    #[serde(skip)]
    pub file: PathBuf,
}

/// Why there is no estimate: the model's size cannot be known before it runs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Unknown(pub String);

/// The estimate for `cmd`, if it names a GGUF: `Ok(None)` for commands that name none (not a
/// llama-server, or a model given some other way), an error saying why for one whose size
/// cannot be known (`-hf`, an unreadable file). `gpus`: the GPUs the server will see.
pub fn for_command(
    cmd: &[String],
    cwd: Option<&Path>,
    gpus: &[u32],
) -> Result<Option<Estimate>, Unknown> {
    let args = LlamaArgs::parse(cmd).map_err(Unknown)?;
    let Some(model) = &args.model else {
        if args.hf_repo.is_some() {
            return Err(Unknown(
                "-hf: llama-server downloads the model itself, so its size is unknown until it \
                 runs (fix: download it and give -m FILE, or set memory)"
                    .into(),
            ));
        }
        return Ok(None);
    };
    if model.contains("${") || !model.ends_with(".gguf") {
        return Ok(None);
    }
    let path = resolve(model, cwd);
    let gguf = crate::gguf::open_shared(&path).map_err(|e| Unknown(e.to_string()))?;
    let mmproj = match &args.mmproj {
        Some(p) => {
            Some(crate::gguf::open_shared(&resolve(p, cwd)).map_err(|e| Unknown(e.to_string()))?)
        }
        None => None,
    };
    let mut est = estimate(&gguf, mmproj.as_deref(), &args, gpus)?;
    est.shape = args.shape_key();
    est.file = path;
    Ok(Some(est))
}

fn resolve(p: &str, cwd: Option<&Path>) -> PathBuf {
    match cwd {
        Some(dir) if !p.starts_with('/') => dir.join(p),
        _ => PathBuf::from(p),
    }
}

/// The model's shape, from its header.
struct Dims {
    layers: usize,
    embd: u64,
    ff: u64,
    vocab: u64,
    heads: u64,
    /// Per layer: KV heads and whether it is a sliding-window layer.
    kv_heads: Vec<u64>,
    swa: Vec<bool>,
    window: u64,
    k_len: u64,
    v_len: u64,
    trained_ctx: u64,
}

impl Dims {
    fn read(g: &Gguf) -> Result<Self, Unknown> {
        let need = |v: Option<u64>, what: &str| {
            v.ok_or_else(|| {
                Unknown(format!(
                    "{}: no {what} in its header (architecture {:?})",
                    g.files[0].display(),
                    g.architecture().unwrap_or("unknown")
                ))
            })
        };
        let layers = need(g.block_count(), "block_count")?.min(1 << 16) as usize;
        let kv = g.head_count_kv();
        let heads = g.head_count();
        Ok(Dims {
            layers,
            embd: need(g.embedding_length(), "embedding_length")?,
            ff: g.feed_forward_length().unwrap_or(0),
            vocab: g.vocab_size().unwrap_or(0),
            heads: heads.as_ref().map_or(0, |h| h.max()),
            kv_heads: (0..layers)
                .map(|il| kv.as_ref().map_or(0, |k| k.at(il)))
                .collect(),
            swa: g.swa_layers(),
            window: g.sliding_window().unwrap_or(0),
            k_len: need(g.key_length(), "attention.key_length")?,
            v_len: need(g.value_length(), "attention.value_length")?,
            trained_ctx: need(g.context_length(), "context_length")?,
        })
    }
}

fn pad(n: u64) -> u64 {
    n.div_ceil(CELL_PAD) * CELL_PAD
}

fn cache_type(name: Option<&str>, flag: &str) -> Result<u32, Unknown> {
    match name {
        None => Ok(1), // f16
        Some(n) => types::type_by_name(n).ok_or_else(|| {
            Unknown(format!(
                "{flag} {n:?} is not a ggml type llama-server knows"
            ))
        }),
    }
}

/// The KV cache as llama.cpp sizes it (llama-context.cpp, llama-kv-cache.cpp,
/// llama-kv-cache-iswa.cpp): `n_ctx` cells for full-attention layers, split in one stream per
/// slot unless unified; sliding-window layers keep min(cells, window × slots sharing + ubatch).
struct Cache {
    /// Cells per stream, full and sliding-window layers, and the number of streams.
    full_cells: u64,
    swa_cells: u64,
    streams: u64,
}

fn cache_cells(d: &Dims, a: &LlamaArgs, ubatch: u64) -> Cache {
    let ctx = pad(match a.ctx_size {
        None | Some(0) => d.trained_ctx,
        Some(c) => c,
    });
    let slots = a.parallel.unwrap_or(AUTO_PARALLEL).max(1);
    let unified = a.parallel.is_none() || a.kv_unified;
    let (streams, full_cells) = if unified {
        (1, ctx)
    } else {
        (slots, pad(ctx / slots))
    };
    let sharing = if unified { slots } else { 1 };
    let swa_cells = if a.swa_full {
        full_cells
    } else {
        pad(full_cells.min(d.window * sharing + ubatch))
    };
    Cache {
        full_cells,
        swa_cells,
        streams,
    }
}

/// Which layers run on which GPU: llama.cpp offloads the last `-ngl` layers (the output layer
/// counts as one more), split between the visible GPUs by `-ts` (default: evenly).
fn layer_devices(layers: usize, a: &LlamaArgs, gpus: &[u32]) -> (Vec<Option<u32>>, Option<u32>) {
    if gpus.is_empty() {
        return (vec![None; layers], None);
    }
    let n = match a.gpu_layers.unwrap_or(GpuLayers::All) {
        GpuLayers::All => layers + 1,
        GpuLayers::Exactly(n) => (n as usize).min(layers + 1),
    };
    let shares: Vec<f64> = match &a.tensor_split {
        Some(ts) if ts.iter().sum::<f64>() > 0.0 => (0..gpus.len())
            .map(|i| ts.get(i).copied().unwrap_or(0.0))
            .collect(),
        _ => vec![1.0; gpus.len()],
    };
    let total: f64 = shares.iter().sum();
    let first = layers + 1 - n;
    let device_of = |k: usize| {
        // Layer k of the n offloaded goes to the GPU whose cumulative share covers it.
        let at = (k as f64 + 0.5) / n as f64 * total;
        let mut acc = 0.0;
        for (i, s) in shares.iter().enumerate() {
            acc += s;
            if at < acc {
                return gpus[i];
            }
        }
        gpus[gpus.len() - 1]
    };
    let per_layer = (0..layers)
        .map(|il| (il >= first).then(|| device_of(il - first)))
        .collect();
    let output = (n > 0).then(|| device_of(n - 1));
    (per_layer, output)
}

/// ggml's CPU backend repacks these weight types for faster matrix products on x86-64 with AVX2
/// (ggml-cpu/repack.cpp): a second copy, beside the mapped file, in a "CPU_REPACK" buffer.
fn is_repacked_on_cpu(t: &crate::gguf::TensorInfo) -> bool {
    const REPACKED: [u32; 4] = [2, 12, 20, 39]; // q4_0, q4_K, iq4_nl, mxfp4
    cfg!(target_arch = "x86_64")
        && t.layer.is_some()
        && t.dims.len() == 2
        && t.dims[1] % 8 == 0
        && REPACKED.contains(&t.ggml_type)
}

fn estimate(
    g: &Gguf,
    mmproj: Option<&Gguf>,
    a: &LlamaArgs,
    gpus: &[u32],
) -> Result<Estimate, Unknown> {
    let d = Dims::read(g)?;
    let ubatch = a
        .ubatch
        .unwrap_or(DEFAULT_UBATCH)
        .min(a.batch.unwrap_or(DEFAULT_BATCH))
        .max(1);
    let cache = cache_cells(&d, a, ubatch);
    let ubatch = ubatch.min(cache.full_cells * cache.streams);
    let (on_gpu, output_gpu) = layer_devices(d.layers, a, gpus);
    let mut est = Estimate {
        ctx: cache.full_cells * cache.streams,
        ..Estimate::default()
    };
    let mut add = |dev: Option<u32>, bytes: u64, part: fn(&mut Estimate) -> &mut u64| match dev {
        Some(gpu) => *est.gpu.entry(gpu).or_default() += bytes,
        None => *part(&mut est) += bytes,
    };

    // Weights: each tensor where its layer runs; input embeddings stay on the CPU.
    for t in &g.tensors {
        let dev = match t.layer {
            Some(l) => on_gpu.get(l as usize).copied().flatten(),
            None if t.name.starts_with("output") => output_gpu,
            None => None,
        };
        let bytes = t.bytes
            + if dev.is_none() && is_repacked_on_cpu(t) {
                t.bytes
            } else {
                0
            };
        add(dev, bytes, |e| &mut e.weights);
    }
    if let Some(p) = mmproj {
        add(gpus.first().copied(), p.tensor_bytes(), |e| &mut e.weights);
    }

    // KV cache: per layer, its cells × its KV heads × head sizes × the cache types' bytes.
    let (tk, tv) = (
        cache_type(a.cache_type_k.as_deref(), "--cache-type-k")?,
        cache_type(a.cache_type_v.as_deref(), "--cache-type-v")?,
    );
    for (il, (&heads, &dev)) in d.kv_heads.iter().zip(&on_gpu).enumerate() {
        let per_cell = types::bytes_for(tk, heads * d.k_len).unwrap_or(0)
            + types::bytes_for(tv, heads * d.v_len).unwrap_or(0);
        let cells = if d.swa.get(il) == Some(&true) {
            cache.swa_cells
        } else {
            cache.full_cells
        };
        add(dev, per_cell * cells * cache.streams, |e| &mut e.kv_cache);
    }
    // The attention mask covers every cache's cells of one stream.
    let mut kv_cells_per_stream = cache.full_cells;
    if d.swa.iter().any(|&s| s) {
        kv_cells_per_stream += cache.swa_cells;
    }

    // Compute buffer: where the layers run (the biggest share, if split).
    let mut compute = ubatch * (4 * (COMPUTE_FF * d.ff + COMPUTE_EMBD * d.embd));
    compute += ubatch * MASK_BYTES * kv_cells_per_stream;
    if a.flash_attn == Some(FlashAttn::Off) {
        // Without flash attention the f32 attention scores of one layer are materialised.
        compute += ubatch * 4 * d.heads * cache.full_cells;
    }
    add(on_gpu.last().copied().flatten(), compute, |e| {
        &mut e.compute
    });

    // Logits of one token per slot, and the server itself.
    let slots = a.parallel.unwrap_or(AUTO_PARALLEL).max(1);
    est.overhead += d.vocab * 4 * slots + SERVER_BASE + SERVER_PER_TOKEN * d.vocab;
    est.total = est.weights + est.kv_cache + est.compute + est.overhead;
    Ok(est)
}
