//! A reader of GGUF headers (versions 2 and 3): metadata and the tensor table, never the weights.
//!
//! What llmvisor needs of a model file: its architecture and shape (for the memory estimate and
//! discovery) and each tensor's size and layer (weights per device). The file is untrusted: every
//! length is checked against what is left of the file before anything is read or allocated, long
//! arrays (a vocabulary of 150,000 tokens) are skipped, not kept, and a truncated or hostile
//! header is an error, never a panic or a huge allocation.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 4] = b"GGUF";
/// Strings kept (keys, names, a chat template) are at most this long; longer ones are errors.
const MAX_KEPT_STRING: u64 = 1 << 20;
/// Arrays longer than this are skipped (only their type and length are kept).
const MAX_KEPT_ARRAY: u64 = 4096;
/// ggml's `GGML_MAX_DIMS`.
const MAX_DIMS: u32 = 4;

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: not a GGUF file (it does not start with \"GGUF\")", path.display())]
    NotGguf { path: PathBuf },
    #[error("{}: GGUF version {version} is not supported (2 and 3 are)", path.display())]
    Version { path: PathBuf, version: u32 },
    #[error("{}: malformed GGUF header at byte {at}: {what}", path.display())]
    Malformed {
        path: PathBuf,
        at: u64,
        what: String,
    },
    #[error("{}: split part {part} of {count} is missing ({})", path.display(), missing.display())]
    MissingPart {
        path: PathBuf,
        part: u32,
        count: u32,
        missing: PathBuf,
    },
}

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Uint(u64),
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
    /// An array too long to keep (a vocabulary): its element type and length.
    Skipped {
        elem_type: u32,
        len: u64,
    },
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::Uint(v) => Some(v),
            Value::Int(v) => u64::try_from(v).ok(),
            Value::Bool(b) => Some(u64::from(b)),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::Float(v) => Some(v),
            Value::Uint(v) => Some(v as f64),
            Value::Int(v) => Some(v as f64),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// One tensor of the table.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub name: String,
    pub dims: Vec<u64>,
    /// ggml's type number (`GGML_TYPE_*`).
    pub ggml_type: u32,
    /// Its bytes in the file; `None` for a type this reader does not know.
    pub bytes: Option<u64>,
    /// `blk.N.…` → N: the layer it belongs to (`None`: embeddings, output, norms).
    pub layer: Option<u32>,
}

/// A GGUF file's header (all parts of a split model together).
#[derive(Debug, Clone, Default)]
pub struct Gguf {
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<Tensor>,
    /// The files read: one, or every part of a split model in order.
    pub files: Vec<PathBuf>,
    /// Their total size on disk.
    pub file_bytes: u64,
}

impl Gguf {
    /// Reads `path`'s header; for the first part of a split model (`…-00001-of-00003.gguf`),
    /// every part's (metadata from the first, tensors from all).
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let mut first = read_file(path)?;
        let count = first
            .metadata
            .get("split.count")
            .and_then(Value::as_u64)
            .unwrap_or(1);
        if count > 1 {
            if let Some(parts) = split_parts(path, count as u32) {
                for (i, part) in parts.iter().enumerate().skip(1) {
                    if !part.exists() {
                        return Err(GgufError::MissingPart {
                            path: path.to_owned(),
                            part: i as u32 + 1,
                            count: count as u32,
                            missing: part.clone(),
                        });
                    }
                    let more = read_file(part)?;
                    first.tensors.extend(more.tensors);
                    first.files.extend(more.files);
                    first.file_bytes += more.file_bytes;
                }
            }
        }
        Ok(first)
    }

    /// `general.architecture` (`llama`, `gemma3`, …).
    pub fn architecture(&self) -> Option<&str> {
        self.metadata
            .get("general.architecture")
            .and_then(Value::as_str)
    }

    /// `<architecture>.<key>`, e.g. `arch("block_count")`.
    pub fn arch(&self, key: &str) -> Option<&Value> {
        let a = self.architecture()?;
        self.metadata.get(&format!("{a}.{key}"))
    }

    pub fn arch_u64(&self, key: &str) -> Option<u64> {
        self.arch(key).and_then(Value::as_u64)
    }

    /// A per-layer value (`head_count_kv` may be one number or one per layer): layer `l`'s.
    pub fn per_layer(&self, key: &str, l: usize) -> Option<u64> {
        match self.arch(key)? {
            Value::Array(v) => v.get(l).and_then(Value::as_u64),
            v => v.as_u64(),
        }
    }

    /// Bytes of every tensor (`None` if one is of an unknown type).
    pub fn tensor_bytes(&self) -> Option<u64> {
        self.tensors.iter().map(|t| t.bytes).sum()
    }
}

/// The paths of every part of the split model whose first part is `path`.
pub fn split_parts(path: &Path, count: u32) -> Option<Vec<PathBuf>> {
    let name = path.file_name()?.to_str()?;
    let stem = name.strip_suffix(".gguf")?;
    let (base, tail) = stem.rsplit_once("-of-")?;
    let (base, _first) = base.rsplit_once('-')?;
    let width = tail.len();
    Some(
        (1..=count)
            .map(|i| path.with_file_name(format!("{base}-{i:0width$}-of-{tail}.gguf")))
            .collect(),
    )
}

/// If `name` is a split part (`x-00002-of-00003.gguf`): (its number, the count).
pub fn split_part_of(name: &str) -> Option<(u32, u32)> {
    let stem = name.strip_suffix(".gguf")?;
    let (base, count) = stem.rsplit_once("-of-")?;
    let (_, part) = base.rsplit_once('-')?;
    if part.len() != count.len() || !part.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((part.parse().ok()?, count.parse().ok()?))
}

fn read_file(path: &Path) -> Result<Gguf, GgufError> {
    let io_err = |source| GgufError::Io {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(io_err)?;
    let size = file.metadata().map_err(io_err)?.len();
    let mut r = Reader {
        inner: BufReader::with_capacity(64 * 1024, file),
        at: 0,
        size,
        path,
    };
    let mut g = r.header()?;
    g.files = vec![path.to_owned()];
    g.file_bytes = size;
    Ok(g)
}

/// Parses a GGUF header from `bytes` (tests, fuzzing).
pub fn parse_bytes(bytes: &[u8]) -> Result<Gguf, GgufError> {
    let mut r = Reader {
        inner: io::Cursor::new(bytes),
        at: 0,
        size: bytes.len() as u64,
        path: Path::new("<bytes>"),
    };
    r.header()
}

struct Reader<'p, R> {
    inner: R,
    at: u64,
    size: u64,
    path: &'p Path,
}

impl<R: BufRead + Seek> Reader<'_, R> {
    fn malformed(&self, what: impl Into<String>) -> GgufError {
        GgufError::Malformed {
            path: self.path.to_owned(),
            at: self.at,
            what: what.into(),
        }
    }

    fn left(&self) -> u64 {
        self.size.saturating_sub(self.at)
    }

    fn bytes<const N: usize>(&mut self) -> Result<[u8; N], GgufError> {
        if self.left() < N as u64 {
            return Err(self.malformed("the file ends inside the header"));
        }
        let mut b = [0u8; N];
        // From the buffer when it holds them (the common case; a header is many tiny reads).
        if let Ok(buf) = self.inner.fill_buf() {
            if buf.len() >= N {
                b.copy_from_slice(&buf[..N]);
                self.inner.consume(N);
                self.at += N as u64;
                return Ok(b);
            }
        }
        self.inner
            .read_exact(&mut b)
            .map_err(|source| GgufError::Io {
                path: self.path.to_owned(),
                source,
            })?;
        self.at += N as u64;
        Ok(b)
    }

    fn u32(&mut self) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.bytes()?))
    }

    fn u64(&mut self) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.bytes()?))
    }

    fn skip(&mut self, n: u64) -> Result<(), GgufError> {
        if self.left() < n {
            return Err(self.malformed(format!(
                "a value of {n} bytes runs past the end of the file"
            )));
        }
        let io_err = |source| GgufError::Io {
            path: self.path.to_owned(),
            source,
        };
        if n <= 64 * 1024 {
            // Short skips (a vocabulary's strings) move through the buffer: a seek would throw
            // the buffer away each time (262,144 of them in Gemma 3's header).
            let mut left = n as usize;
            while left > 0 {
                let have = self.inner.fill_buf().map_err(io_err)?.len();
                if have == 0 {
                    return Err(self.malformed("the file ends inside the header"));
                }
                let k = have.min(left);
                self.inner.consume(k);
                left -= k;
            }
        } else {
            let n_i64 = i64::try_from(n).map_err(|_| self.malformed("a length too large"))?;
            self.inner.seek(SeekFrom::Current(n_i64)).map_err(io_err)?;
        }
        self.at += n;
        Ok(())
    }

    fn string(&mut self) -> Result<String, GgufError> {
        let len = self.u64()?;
        if len > MAX_KEPT_STRING || len > self.left() {
            return Err(self.malformed(format!("a string of {len} bytes")));
        }
        let mut buf = vec![0u8; len as usize];
        self.inner
            .read_exact(&mut buf)
            .map_err(|source| GgufError::Io {
                path: self.path.to_owned(),
                source,
            })?;
        self.at += len;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }

    fn header(&mut self) -> Result<Gguf, GgufError> {
        if &self.bytes::<4>()? != MAGIC {
            return Err(GgufError::NotGguf {
                path: self.path.to_owned(),
            });
        }
        let version = self.u32()?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::Version {
                path: self.path.to_owned(),
                version,
            });
        }
        let n_tensors = self.u64()?;
        let n_kv = self.u64()?;
        // Each key-value pair takes at least 12 bytes, each tensor entry at least 24.
        if n_kv > self.left() / 12 || n_tensors > self.left() / 24 {
            return Err(self.malformed(format!(
                "{n_kv} metadata entries and {n_tensors} tensors cannot fit in the file"
            )));
        }
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = self.string()?;
            let ty = self.u32()?;
            let value = self.value(ty, 0)?;
            metadata.insert(key, value);
        }
        let mut tensors = Vec::with_capacity(n_tensors.min(65_536) as usize);
        for _ in 0..n_tensors {
            tensors.push(self.tensor()?);
        }
        Ok(Gguf {
            version,
            metadata,
            tensors,
            files: Vec::new(),
            file_bytes: self.size,
        })
    }

    fn value(&mut self, ty: u32, depth: u32) -> Result<Value, GgufError> {
        Ok(match ty {
            0 => Value::Uint(u64::from(self.bytes::<1>()?[0])),
            1 => Value::Int(i64::from(self.bytes::<1>()?[0] as i8)),
            2 => Value::Uint(u64::from(u16::from_le_bytes(self.bytes()?))),
            3 => Value::Int(i64::from(i16::from_le_bytes(self.bytes()?))),
            4 => Value::Uint(u64::from(self.u32()?)),
            5 => Value::Int(i64::from(i32::from_le_bytes(self.bytes()?))),
            6 => Value::Float(f64::from(f32::from_le_bytes(self.bytes()?))),
            7 => Value::Bool(self.bytes::<1>()?[0] != 0),
            8 => Value::Str(self.string()?),
            9 => {
                if depth > 0 {
                    return Err(self.malformed("an array of arrays"));
                }
                let elem = self.u32()?;
                let len = self.u64()?;
                if len > MAX_KEPT_ARRAY {
                    self.skip_array(elem, len)?;
                    Value::Skipped {
                        elem_type: elem,
                        len,
                    }
                } else {
                    let mut v = Vec::with_capacity(len as usize);
                    for _ in 0..len {
                        v.push(self.value(elem, depth + 1)?);
                    }
                    Value::Array(v)
                }
            }
            10 => Value::Uint(self.u64()?),
            11 => Value::Int(i64::from_le_bytes(self.bytes()?)),
            12 => Value::Float(f64::from_le_bytes(self.bytes()?)),
            other => return Err(self.malformed(format!("unknown value type {other}"))),
        })
    }

    /// Passes over an array without keeping it: fixed-size elements in one seek, strings one
    /// length at a time.
    fn skip_array(&mut self, elem: u32, len: u64) -> Result<(), GgufError> {
        let width = match elem {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            10..=12 => 8,
            8 => {
                for _ in 0..len {
                    let n = self.u64()?;
                    self.skip(n)?;
                }
                return Ok(());
            }
            other => return Err(self.malformed(format!("an array of value type {other}"))),
        };
        let total = len
            .checked_mul(width)
            .ok_or_else(|| self.malformed("an array too large"))?;
        self.skip(total)
    }

    fn tensor(&mut self) -> Result<Tensor, GgufError> {
        let name = self.string()?;
        let n_dims = self.u32()?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(self.malformed(format!("tensor {name:?} has {n_dims} dimensions")));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(self.u64()?);
        }
        let ggml_type = self.u32()?;
        let _offset = self.u64()?;
        let elements = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| self.malformed(format!("tensor {name:?} is too large")))?;
        let bytes = type_size(ggml_type)
            .and_then(|(block, size)| (elements % block == 0).then(|| elements / block * size));
        let layer = name
            .strip_prefix("blk.")
            .and_then(|rest| rest.split('.').next())
            .and_then(|n| n.parse().ok());
        Ok(Tensor {
            name,
            dims,
            ggml_type,
            bytes,
            layer,
        })
    }
}

/// (elements per block, bytes per block) of a ggml tensor type (ggml's `type_traits`).
pub fn type_size(ggml_type: u32) -> Option<(u64, u64)> {
    Some(match ggml_type {
        0 => (1, 4),     // F32
        1 => (1, 2),     // F16
        2 => (32, 18),   // Q4_0
        3 => (32, 20),   // Q4_1
        6 => (32, 22),   // Q5_0
        7 => (32, 24),   // Q5_1
        8 => (32, 34),   // Q8_0
        9 => (32, 36),   // Q8_1
        10 => (256, 84), // Q2_K
        11 => (256, 110),
        12 => (256, 144), // Q4_K
        13 => (256, 176), // Q5_K
        14 => (256, 210), // Q6_K
        15 => (256, 292), // Q8_K
        16 => (256, 66),  // IQ2_XXS
        17 => (256, 74),  // IQ2_XS
        18 => (256, 98),  // IQ3_XXS
        19 => (256, 50),  // IQ1_S
        20 => (32, 18),   // IQ4_NL
        21 => (256, 110), // IQ3_S
        22 => (256, 82),  // IQ2_S
        23 => (256, 136), // IQ4_XS
        24 => (1, 1),     // I8
        25 => (1, 2),     // I16
        26 => (1, 4),     // I32
        27 => (1, 8),     // I64
        28 => (1, 8),     // F64
        29 => (256, 56),  // IQ1_M
        30 => (1, 2),     // BF16
        34 => (256, 54),  // TQ1_0
        35 => (256, 66),  // TQ2_0
        39 => (32, 17),   // MXFP4
        _ => return None,
    })
}

/// Builds GGUF headers for tests (a real layout, with no weights after the table).
#[cfg(test)]
pub(crate) mod build {
    pub struct Builder {
        kv: Vec<u8>,
        n_kv: u64,
        tensors: Vec<u8>,
        n_tensors: u64,
    }

    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }

    impl Builder {
        pub fn new() -> Self {
            Self {
                kv: Vec::new(),
                n_kv: 0,
                tensors: Vec::new(),
                n_tensors: 0,
            }
        }

        pub fn u32(mut self, key: &str, v: u32) -> Self {
            string(&mut self.kv, key);
            self.kv.extend_from_slice(&4u32.to_le_bytes());
            self.kv.extend_from_slice(&v.to_le_bytes());
            self.n_kv += 1;
            self
        }

        pub fn str(mut self, key: &str, v: &str) -> Self {
            string(&mut self.kv, key);
            self.kv.extend_from_slice(&8u32.to_le_bytes());
            string(&mut self.kv, v);
            self.n_kv += 1;
            self
        }

        pub fn u32_array(mut self, key: &str, v: &[u32]) -> Self {
            string(&mut self.kv, key);
            self.kv.extend_from_slice(&9u32.to_le_bytes());
            self.kv.extend_from_slice(&4u32.to_le_bytes());
            self.kv.extend_from_slice(&(v.len() as u64).to_le_bytes());
            for x in v {
                self.kv.extend_from_slice(&x.to_le_bytes());
            }
            self.n_kv += 1;
            self
        }

        pub fn str_array(mut self, key: &str, n: usize) -> Self {
            string(&mut self.kv, key);
            self.kv.extend_from_slice(&9u32.to_le_bytes());
            self.kv.extend_from_slice(&8u32.to_le_bytes());
            self.kv.extend_from_slice(&(n as u64).to_le_bytes());
            for i in 0..n {
                string(&mut self.kv, &format!("tok{i}"));
            }
            self.n_kv += 1;
            self
        }

        pub fn tensor(mut self, name: &str, dims: &[u64], ggml_type: u32) -> Self {
            string(&mut self.tensors, name);
            self.tensors
                .extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                self.tensors.extend_from_slice(&d.to_le_bytes());
            }
            self.tensors.extend_from_slice(&ggml_type.to_le_bytes());
            self.tensors.extend_from_slice(&0u64.to_le_bytes());
            self.n_tensors += 1;
            self
        }

        pub fn bytes(&self) -> Vec<u8> {
            let mut out = b"GGUF".to_vec();
            out.extend_from_slice(&3u32.to_le_bytes());
            out.extend_from_slice(&self.n_tensors.to_le_bytes());
            out.extend_from_slice(&self.n_kv.to_le_bytes());
            out.extend_from_slice(&self.kv);
            out.extend_from_slice(&self.tensors);
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::build::Builder;
    use super::*;

    fn sample() -> Builder {
        sample_with_vocab(5000)
    }

    fn sample_with_vocab(tokens: usize) -> Builder {
        Builder::new()
            .str("general.architecture", "llama")
            .u32("llama.block_count", 2)
            .u32("llama.context_length", 8192)
            .u32_array("llama.attention.head_count_kv", &[3, 1])
            .str_array("tokenizer.ggml.tokens", tokens)
            .tensor("token_embd.weight", &[576, 49152], 12)
            .tensor("blk.0.attn_q.weight", &[576, 576], 8)
            .tensor("blk.1.ffn_up.weight", &[576, 1536], 0)
    }

    #[test]
    fn reads_metadata_skips_long_arrays_and_sizes_tensors() {
        let g = parse_bytes(&sample().bytes()).unwrap();
        assert_eq!(g.architecture(), Some("llama"));
        assert_eq!(g.arch_u64("block_count"), Some(2));
        assert_eq!(g.per_layer("attention.head_count_kv", 0), Some(3));
        assert_eq!(g.per_layer("attention.head_count_kv", 1), Some(1));
        assert_eq!(
            g.metadata["tokenizer.ggml.tokens"],
            Value::Skipped {
                elem_type: 8,
                len: 5000
            }
        );
        assert_eq!(g.tensors.len(), 3);
        assert_eq!(g.tensors[0].bytes, Some(576 * 49152 / 256 * 144));
        assert_eq!(g.tensors[0].layer, None);
        assert_eq!(g.tensors[1].bytes, Some(576 * 576 / 32 * 34));
        assert_eq!(g.tensors[2].layer, Some(1));
        assert_eq!(g.tensors[2].bytes, Some(576 * 1536 * 4));
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let full = sample_with_vocab(100).bytes();
        for cut in 0..full.len() {
            assert!(parse_bytes(&full[..cut]).is_err(), "cut at {cut}");
        }
        assert!(matches!(
            parse_bytes(b"GGML0000"),
            Err(GgufError::NotGguf { .. })
        ));
    }

    #[test]
    fn hostile_counts_allocate_nothing() {
        // 2^60 tensors, 2^60 entries: refused before any allocation.
        let mut b = b"GGUF".to_vec();
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&(1u64 << 60).to_le_bytes());
        b.extend_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(parse_bytes(&b).is_err());
        // A string claiming 2^62 bytes, an array of 2^61 u64s.
        let mut s = b"GGUF".to_vec();
        s.extend_from_slice(&3u32.to_le_bytes());
        s.extend_from_slice(&0u64.to_le_bytes());
        s.extend_from_slice(&1u64.to_le_bytes());
        let mut key = s.clone();
        key.extend_from_slice(&(1u64 << 62).to_le_bytes());
        assert!(parse_bytes(&key).is_err());
        let mut arr = s;
        arr.extend_from_slice(&1u64.to_le_bytes());
        arr.push(b'k');
        arr.extend_from_slice(&9u32.to_le_bytes());
        arr.extend_from_slice(&10u32.to_le_bytes());
        arr.extend_from_slice(&(1u64 << 61).to_le_bytes());
        assert!(parse_bytes(&arr).is_err());
    }

    /// The real model files the tests use (`LLAMA_MODEL`, `LLAMA_MODEL_SMOL`); how fast, is
    /// `benches/gguf.rs`'s to say.
    #[test]
    fn real_files_are_read() {
        for var in ["LLAMA_MODEL", "LLAMA_MODEL_SMOL"] {
            let Some(path) = std::env::var_os(var) else {
                continue;
            };
            let path = PathBuf::from(path);
            let g = Gguf::open(&path).unwrap();
            assert!(g.architecture().is_some(), "{var}");
            assert!(g.arch_u64("block_count").is_some_and(|n| n > 0));
            let bytes = g.tensor_bytes().unwrap();
            // The tensors are nearly all of the file.
            assert!(
                bytes <= g.file_bytes && bytes > g.file_bytes / 10 * 9,
                "{bytes} of {}",
                g.file_bytes
            );
            assert!(
                g.arch_u64("context_length").is_some_and(|n| n >= 2048),
                "{var}"
            );
        }
    }

    #[test]
    fn split_names() {
        assert_eq!(split_part_of("m-00002-of-00003.gguf"), Some((2, 3)));
        assert_eq!(split_part_of("m.gguf"), None);
        assert_eq!(split_part_of("m-2-of-00003.gguf"), None);
        let parts = split_parts(Path::new("/x/m-00001-of-00003.gguf"), 3).unwrap();
        assert_eq!(parts[2], Path::new("/x/m-00003-of-00003.gguf"));
    }

    proptest::proptest! {
        /// Random damage to a real header: an error or a header, never a panic.
        #[test]
        fn damaged_headers_never_panic(
            flips in proptest::collection::vec((0usize..2000, proptest::num::u8::ANY), 1..8),
        ) {
            let mut b = sample_with_vocab(100).bytes();
            for (at, byte) in flips {
                let i = at % b.len();
                b[i] = byte;
            }
            let _ = parse_bytes(&b);
        }
    }
}
