//! Discovery: the GGUF models already on the machine, each served with a generated llama-server
//! command and no `[models]` entry.
//!
//! Sources (config keys `models_dirs`, `discover`): folders given by the user, Ollama's store,
//! the Hugging Face hub cache, llama.cpp's download cache and LM Studio's folders. Each source
//! names its models the way its own tool does (`gemma3:270m`, `unsloth/Qwen3-8B-GGUF:Q4_K_M`).
//! Anything unreadable — a truncated GGUF, a manifest naming a missing blob, a dangling
//! symlink, a folder without permission — is a [`Warning`] naming the file; the rest is found.

mod command;
mod folder;
mod huggingface;
mod ollama;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use command::{llama_server, to_model, NoLlamaServer, DEFAULT_CONTEXT};

/// A model store discovery reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Source {
    /// A folder of `models_dirs` or `--models-dir`.
    ModelsDir,
    Ollama,
    HuggingFace,
    LlamaCpp,
    LmStudio,
}

impl Source {
    /// The stores `discover` names (all of them by default).
    pub const STORES: [Source; 4] = [
        Source::Ollama,
        Source::HuggingFace,
        Source::LlamaCpp,
        Source::LmStudio,
    ];

    /// The name in `discover = [...]` and in `/api/models`' `source`.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::ModelsDir => "models_dir",
            Source::Ollama => "ollama",
            Source::HuggingFace => "huggingface",
            Source::LlamaCpp => "llama.cpp",
            Source::LmStudio => "lmstudio",
        }
    }

    /// The store `discover` names `name`.
    pub fn store(name: &str) -> Option<Source> {
        Self::STORES.into_iter().find(|s| s.as_str() == name)
    }
}

/// `models_dirs`, `discover`, `llama_server`, `discovered_args`.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Folders whose every GGUF is a model (`~` expanded).
    pub models_dirs: Vec<PathBuf>,
    /// The stores read besides the folders.
    pub stores: Vec<Source>,
    /// The binary that serves discovered models (`None`: PATH, else scripts/run.sh's build).
    pub llama_server: Option<String>,
    /// Appended to every discovered model's command.
    pub discovered_args: Vec<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            models_dirs: Vec::new(),
            stores: Source::STORES.to_vec(),
            llama_server: None,
            discovered_args: Vec::new(),
        }
    }
}

/// What a model's GGUF header says, in the few facts discovery and Ollama's API use.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Facts {
    pub architecture: Option<String>,
    /// The context it was trained for (`{arch}.context_length`).
    pub context_length: Option<u64>,
    /// An embedding model (it sets a pooling type, or is of an encoder family).
    pub embedding: bool,
    /// llama.cpp's file type (15 = Q4_K_M …).
    pub file_type: Option<u64>,
    pub size_label: Option<String>,
    /// Weights, counted from the tensor table.
    pub parameters: u64,
    /// The GGUF carries a chat template.
    pub chat_template: bool,
}

/// Families Ollama runs on its own engine, not on llama.cpp: a blob of theirs may not load on
/// stock llama-server (`general.architecture` values).
const OLLAMA_ENGINE_FAMILIES: &[&str] = &[
    "gemma3n",
    "gemma4",
    "gpt-oss",
    "gptoss",
    "qwen3vl",
    "qwen3vlmoe",
    "qwen3next",
    "llama4",
    "mistral3",
    "qwen25vl",
    "mllama",
    "deepseekocr",
];

/// Encoder families that only embed (their GGUFs may not set a pooling type).
const EMBEDDING_FAMILIES: &[&str] = &[
    "bert",
    "nomic-bert",
    "nomic-bert-moe",
    "jina-bert-v2",
    "modern-bert",
    "neo-bert",
    "t5encoder",
    "gemma-embedding",
];

impl Facts {
    pub fn from_gguf(g: &crate::gguf::Gguf) -> Self {
        let architecture = g.architecture().map(str::to_owned);
        let embedding = g.pooling_type().is_some_and(|p| p > 0)
            || architecture
                .as_deref()
                .is_some_and(|a| EMBEDDING_FAMILIES.contains(&a));
        Facts {
            context_length: g.context_length(),
            embedding,
            file_type: g.file_type(),
            size_label: g.size_label().map(str::to_owned),
            parameters: g
                .tensors
                .iter()
                .map(|t| t.dims.iter().product::<u64>())
                .sum(),
            chat_template: g.chat_template().is_some(),
            architecture,
        }
    }

    /// Ollama runs this family on its own engine (see [`OLLAMA_ENGINE_FAMILIES`]).
    pub fn ollama_engine_only(&self) -> bool {
        self.architecture
            .as_deref()
            .is_some_and(|a| OLLAMA_ENGINE_FAMILIES.contains(&a))
    }

    /// The quantisation as llama.cpp names its file types ("Q4_K_M").
    pub fn quantization(&self) -> Option<&'static str> {
        Some(match self.file_type? {
            0 => "F32",
            1 => "F16",
            2 => "Q4_0",
            3 => "Q4_1",
            7 => "Q8_0",
            8 => "Q5_0",
            9 => "Q5_1",
            10 => "Q2_K",
            11 => "Q3_K_S",
            12 => "Q3_K_M",
            13 => "Q3_K_L",
            14 => "Q4_K_S",
            15 => "Q4_K_M",
            16 => "Q5_K_S",
            17 => "Q5_K_M",
            18 => "Q6_K",
            19 => "IQ2_XXS",
            20 => "IQ2_XS",
            21 => "Q2_K_S",
            22 => "IQ3_XS",
            23 => "IQ3_XXS",
            24 => "IQ1_S",
            25 => "IQ4_NL",
            26 => "IQ3_S",
            27 => "IQ3_M",
            28 => "IQ2_S",
            29 => "IQ2_M",
            30 => "IQ4_XS",
            31 => "IQ1_M",
            32 => "BF16",
            36 => "TQ1_0",
            37 => "TQ2_0",
            38 => "MXFP4",
            _ => return None,
        })
    }

    /// The parameter count as Ollama shows it ("268.10M", "8.03B").
    pub fn parameter_size(&self) -> String {
        let p = self.parameters as f64;
        match self.parameters {
            0 => self.size_label.clone().unwrap_or_default(),
            n if n >= 1_000_000_000 => format!("{:.2}B", p / 1e9),
            n if n >= 1_000_000 => format!("{:.2}M", p / 1e6),
            _ => format!("{:.2}K", p / 1e3),
        }
    }
}

/// What Ollama's manifest adds to a model: its `params` layer and identity.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OllamaExtras {
    /// The model blob's digest (hex, without `sha256:`).
    pub digest: String,
    /// The `params` layer (stop words, sampling defaults), as Ollama's option names.
    pub params: serde_json::Map<String, serde_json::Value>,
}

/// One model found.
#[derive(Debug, Clone, PartialEq)]
pub struct Found {
    pub id: String,
    pub source: Source,
    /// The GGUF (the first part of a split model).
    pub file: PathBuf,
    /// A multimodal projector served with it (`--mmproj`).
    pub mmproj: Option<PathBuf>,
    /// Bytes of all its files.
    pub size: u64,
    /// Last change of its file (seconds since the epoch).
    pub modified: u64,
    pub facts: Facts,
    pub ollama: Option<OllamaExtras>,
}

/// Something discovery could not read, naming the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    pub path: PathBuf,
    pub message: String,
}

impl std::fmt::Display for Warning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.message)
    }
}

/// The outcome of one discovery pass.
#[derive(Debug, Clone, Default)]
pub struct Discovery {
    /// Sorted by id; ids are unique (a later source's duplicate is a warning).
    pub found: Vec<Arc<Found>>,
    pub warnings: Vec<Warning>,
    /// The folders that exist and were read: what a watcher watches.
    pub roots: Vec<PathBuf>,
}

/// Where each store lives, from the environment (`HOME`, `OLLAMA_MODELS`, `HF_HUB_CACHE`,
/// `HF_HOME`, `LLAMA_CACHE`).
pub fn store_roots(source: Source, env: &dyn Fn(&str) -> Option<String>) -> Vec<PathBuf> {
    let var = |name: &str| env(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    let home = var("HOME");
    let under_home = |rel: &str| home.as_ref().map(|h| h.join(rel));
    match source {
        Source::ModelsDir => Vec::new(),
        Source::Ollama => var("OLLAMA_MODELS")
            .or_else(|| under_home(".ollama/models"))
            .into_iter()
            .collect(),
        Source::HuggingFace => var("HF_HUB_CACHE")
            .or_else(|| var("HF_HOME").map(|h| h.join("hub")))
            .or_else(|| under_home(".cache/huggingface/hub"))
            .into_iter()
            .collect(),
        Source::LlamaCpp => var("LLAMA_CACHE")
            .or_else(|| under_home(".cache/llama.cpp"))
            .into_iter()
            .collect(),
        Source::LmStudio => [".lmstudio/models", ".cache/lm-studio/models"]
            .into_iter()
            .filter_map(under_home)
            .collect(),
    }
}

/// `~/x` → `$HOME/x`.
pub fn expand_home(path: &str, env: &dyn Fn(&str) -> Option<String>) -> PathBuf {
    match (path.strip_prefix("~/"), env("HOME")) {
        (Some(rest), Some(home)) => Path::new(&home).join(rest),
        _ if path == "~" => env("HOME").map_or_else(|| PathBuf::from(path), PathBuf::from),
        _ => PathBuf::from(path),
    }
}

/// Finds every model of `settings`' folders and stores.
pub fn discover(settings: &Settings, env: &dyn Fn(&str) -> Option<String>) -> Discovery {
    let mut out = Discovery::default();
    let mut found: Vec<Found> = Vec::new();
    let read = |source: Source, root: &Path, out: &mut Discovery, found: &mut Vec<Found>| {
        if !root.exists() && !root.is_symlink() {
            if source == Source::ModelsDir {
                out.warnings.push(Warning {
                    path: root.to_owned(),
                    message: "no such folder (models_dirs / --models-dir)".into(),
                });
            }
            return;
        }
        out.roots.push(root.to_owned());
        match source {
            Source::Ollama => ollama::find(root, found, &mut out.warnings),
            Source::HuggingFace => huggingface::find(root, found, &mut out.warnings),
            // llama.cpp's newer builds keep Hugging Face's layout in their cache.
            Source::LlamaCpp if huggingface::has_repos(root) => {
                huggingface::find_as(root, Source::LlamaCpp, found, &mut out.warnings)
            }
            Source::LmStudio => {
                folder::find(root, source, folder::Naming::Repo, found, &mut out.warnings)
            }
            Source::ModelsDir | Source::LlamaCpp => {
                folder::find(root, source, folder::Naming::Path, found, &mut out.warnings)
            }
        }
    };
    for dir in &settings.models_dirs {
        read(Source::ModelsDir, dir, &mut out, &mut found);
    }
    for &source in &settings.stores {
        for root in store_roots(source, env) {
            read(source, &root, &mut out, &mut found);
        }
    }
    let mut by_id: BTreeMap<String, Found> = BTreeMap::new();
    for f in read_headers(found, &mut out.warnings) {
        if let Some(first) = by_id.get(&f.id) {
            out.warnings.push(Warning {
                path: f.file.clone(),
                message: format!(
                    "not served: the id `{}` is already that of {} ({})",
                    f.id,
                    first.file.display(),
                    first.source.as_str()
                ),
            });
            continue;
        }
        if f.facts.ollama_engine_only() {
            out.warnings.push(Warning {
                path: f.file.clone(),
                message: format!(
                    "`{}` is of family {}, which Ollama runs on its own engine: llama-server may \
                     not load this file (its start then fails with llama-server's reason)",
                    f.id,
                    f.facts.architecture.as_deref().unwrap_or("?")
                ),
            });
        }
        by_id.insert(f.id.clone(), f);
    }
    out.found = by_id.into_values().map(Arc::new).collect();
    out
}

/// Adds what discovery finds to `config`'s models (a configured model with the same id, or an
/// alias of that name, wins: the discovery is left out). Errors when models were found but no
/// llama-server is there to serve them.
pub fn apply(
    config: &mut crate::config::Config,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Discovery, NoLlamaServer> {
    let mut discovery = discover(&config.discovery, env);
    discovery
        .found
        .retain(|f| config.model_index(&f.id).is_none());
    if discovery.found.is_empty() {
        return Ok(discovery);
    }
    let server = llama_server(&config.discovery, discovery.found.len(), env)?;
    let models = discovery
        .found
        .iter()
        .map(|f| to_model(f, &config.discovery, &server));
    config.models.extend(models);
    config.models.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(discovery)
}

/// Reads every model's header (facts and size), on a few threads: a header is megabytes of
/// vocabulary to step over, and a machine may hold hundreds of models. A file that cannot be
/// read is a warning; a projector found by its header is dropped.
fn read_headers(found: Vec<Found>, warnings: &mut Vec<Warning>) -> Vec<Found> {
    let threads = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .clamp(1, 8)
        .min(found.len().max(1));
    let per = found.len().div_ceil(threads).max(1);
    let mut chunks: Vec<Vec<Found>> = Vec::new();
    let mut rest = found.into_iter().peekable();
    while rest.peek().is_some() {
        chunks.push(rest.by_ref().take(per).collect());
    }
    let results: Vec<(Vec<Found>, Vec<Warning>)> = std::thread::scope(|s| {
        let handles: Vec<_> = chunks
            .into_iter()
            .map(|chunk| s.spawn(move || read_chunk(chunk)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    });
    let mut out = Vec::new();
    for (ok, warned) in results {
        out.extend(ok);
        warnings.extend(warned);
    }
    out
}

fn read_chunk(chunk: Vec<Found>) -> (Vec<Found>, Vec<Warning>) {
    let mut warnings = Vec::new();
    let mut out = Vec::new();
    for mut f in chunk {
        match crate::gguf::open_shared(&f.file) {
            Ok(g) if g.is_mmproj() => {}
            Ok(g) => {
                f.facts = Facts::from_gguf(&g);
                f.size = g.file_bytes;
                out.push(f);
            }
            Err(e) => warnings.push(Warning {
                path: f.file.clone(),
                message: format!("not served: {e}"),
            }),
        }
    }
    (out, warnings)
}

/// The entries of `dir`, sorted by path; a folder that cannot be read is a warning naming it.
pub(crate) fn sorted_entries(dir: &Path, warnings: &mut Vec<Warning>) -> Option<Vec<PathBuf>> {
    match std::fs::read_dir(dir) {
        Ok(entries) => {
            let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
            paths.sort();
            Some(paths)
        }
        Err(e) => {
            warnings.push(Warning {
                path: dir.to_owned(),
                message: format!("cannot read this folder: {e}"),
            });
            None
        }
    }
}

/// Seconds since the epoch of a file's last change (0 if unknown).
fn modified_secs(path: &Path) -> u64 {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs())
}

/// The quantisation named in a file name (`Qwen3-8B-Q4_K_M.gguf` → `Q4_K_M`), upper-cased: the
/// last `-`/`.`-separated part that reads like one of llama.cpp's types.
pub fn quant_of_file_name(name: &str) -> Option<String> {
    let stem = name.strip_suffix(".gguf").unwrap_or(name);
    folder::without_split_suffix(stem)
        .rsplit(['-', '.'])
        .map(str::to_ascii_uppercase)
        .find(|part| {
            let numbered = part
                .strip_prefix("IQ")
                .or_else(|| part.strip_prefix('Q'))
                .or_else(|| part.strip_prefix("TQ"))
                .is_some_and(|r| r.starts_with(|c: char| c.is_ascii_digit()));
            numbered || matches!(part.as_str(), "F16" | "BF16" | "F32" | "MXFP4")
        })
}

#[cfg(test)]
mod tests;
