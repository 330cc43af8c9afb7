//! A GGUF model file's header: its metadata (architecture, layers, heads, context, sliding
//! window, experts, chat template…) and its tensor table (name, type, dimensions, bytes, layer),
//! read without touching the weights. A split model (`name-00001-of-00003.gguf`) opens as one.
//!
//! Our own reader, not a crate: the maintained ones (`ggus`) parse a byte slice of the whole file
//! (a memory map of the weights), while here only the header is read, through a buffered reader,
//! with every length checked against the file's size (see `read.rs`).

mod facts;
mod read;
mod shared;
mod split;
#[cfg(test)]
mod tests;
pub mod types;
/// Small GGUF files for tests (this crate's and the integration tests').
#[doc(hidden)]
pub mod write;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub use facts::PerLayer;
pub use read::read_header_from;
pub use shared::open_shared;

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is not a readable GGUF file: at byte {offset}: {reason}", path.display())]
    Format {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error("{}: {reason}", path.display())]
    Split { path: PathBuf, reason: String },
}

/// A metadata value. Integers of every width are widened; arrays too long to be worth keeping
/// (a vocabulary) keep only their length.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U64(u64),
    I64(i64),
    F64(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
    Skipped { len: u64 },
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U64(v) => Some(v),
            Value::I64(v) => u64::try_from(v).ok(),
            Value::Bool(b) => Some(b.into()),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// Elements of an array (`None` for a scalar or a skipped array).
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(v) => Some(v),
            _ => None,
        }
    }
}

/// One tensor of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dims: Vec<u64>,
    /// ggml type id (`types::type_name` names it).
    pub ggml_type: u32,
    /// Offset in its file's data section.
    pub offset: u64,
    pub bytes: u64,
    /// The transformer block it belongs to (`blk.N.…`), `None` for embeddings, output, norms.
    pub layer: Option<u32>,
    /// Which file of a split model holds it (0 for a single file).
    pub file: u16,
}

impl TensorInfo {
    pub fn new(name: String, dims: Vec<u64>, ggml_type: u32, offset: u64, bytes: u64) -> Self {
        let layer = name
            .strip_prefix("blk.")
            .and_then(|r| r.split('.').next())
            .and_then(|n| n.parse().ok());
        Self {
            name,
            dims,
            ggml_type,
            offset,
            bytes,
            layer,
            file: 0,
        }
    }
}

/// A model's header: one file, or every file of a split model.
#[derive(Debug, Clone)]
pub struct Gguf {
    /// The files read, in order (one unless split).
    pub files: Vec<PathBuf>,
    /// The GGUF version of the first file.
    pub version: u32,
    /// The first file's metadata (the others repeat or extend it; their keys are merged in).
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    /// Sum of the files' sizes.
    pub file_bytes: u64,
}

impl Gguf {
    /// Reads the header of the model at `path`. A file named `…-0000K-of-0000N.gguf` is read
    /// with all N parts (naming any part opens the whole model; a missing part is an error).
    pub fn open(path: &Path) -> Result<Gguf, GgufError> {
        let files = split::parts(path)?;
        let mut model: Option<Gguf> = None;
        for (i, file) in files.iter().enumerate() {
            let h = read::read_file(file)?;
            let file_no = u16::try_from(i).unwrap_or(u16::MAX);
            let tensors = h
                .tensors
                .into_iter()
                .map(|t| TensorInfo { file: file_no, ..t });
            match &mut model {
                None => {
                    model = Some(Gguf {
                        files: files.clone(),
                        version: h.version,
                        metadata: h.metadata,
                        tensors: tensors.collect(),
                        file_bytes: h.file_len,
                    })
                }
                Some(m) => {
                    for (k, v) in h.metadata {
                        m.metadata.entry(k).or_insert(v);
                    }
                    m.tensors.extend(tensors);
                    m.file_bytes += h.file_len;
                }
            }
        }
        let model = model.ok_or_else(|| GgufError::Split {
            path: path.to_owned(),
            reason: "no files".into(),
        })?;
        split::check_complete(path, &model)?;
        Ok(model)
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key)?.as_str()
    }

    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key)?.as_u64()
    }

    /// Bytes of every tensor (the weights as the file stores them).
    pub fn tensor_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.bytes).sum()
    }
}
