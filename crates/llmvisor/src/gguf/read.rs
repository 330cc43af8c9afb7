//! Reading one GGUF file's header: metadata and tensor table, never the tensor data.
//!
//! Every count and length in the file is checked against the bytes left before anything is
//! allocated for it, so a truncated or hostile header is an error, never a panic or a huge
//! allocation.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek};
use std::path::Path;

use super::{GgufError, TensorInfo, Value};

const MAGIC: &[u8; 4] = b"GGUF";
/// Longest string value kept (a chat template is a few KiB; 1 MiB is generous). Longer strings
/// are an error: no real header has one.
const MAX_STRING: u64 = 1 << 20;
/// Arrays up to this many elements are kept (per-layer values: a few hundred at most); longer
/// ones (a vocabulary, merges, token scores) are skipped and only their length is kept.
const MAX_KEPT_ARRAY: u64 = 4096;
/// Arrays of arrays deeper than this are refused (llama.cpp writes none).
const MAX_ARRAY_DEPTH: u32 = 2;
/// ggml's GGML_MAX_DIMS.
const MAX_DIMS: u32 = 4;
/// general.alignment when the file does not say.
const DEFAULT_ALIGNMENT: u64 = 32;

/// One file's header.
#[derive(Debug, Clone)]
pub struct FileHeader {
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    /// Where the tensor data starts (offsets in `tensors` are relative to it).
    pub data_start: u64,
    pub file_len: u64,
}

/// Reads the header of the GGUF file at `path`.
pub fn read_file(path: &Path) -> Result<FileHeader, GgufError> {
    let io = |source| GgufError::Io {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    let file_len = file.metadata().map_err(io)?.len();
    let mut r = Bounded::new(file, file_len);
    read_header(&mut r).map_err(|e| match e {
        Fault::Io(source) => io(source),
        Fault::Format { offset, reason } => GgufError::Format {
            path: path.to_owned(),
            offset,
            reason,
        },
    })
}

/// Reads a header from any byte source of `len` bytes (a file, or a buffer in tests).
pub fn read_header_from<R: Read + Seek>(inner: R, len: u64) -> Result<FileHeader, String> {
    let mut r = Bounded::new(inner, len);
    read_header(&mut r).map_err(|e| match e {
        Fault::Io(e) => e.to_string(),
        Fault::Format { offset, reason } => format!("at byte {offset}: {reason}"),
    })
}

enum Fault {
    Io(std::io::Error),
    Format { offset: u64, reason: String },
}

/// A reader that knows how many bytes are left, so lengths read from the file can be checked.
struct Bounded<R> {
    inner: BufReader<R>,
    pos: u64,
    len: u64,
}

impl<R: Read + Seek> Bounded<R> {
    fn new(inner: R, len: u64) -> Self {
        Self {
            inner: BufReader::with_capacity(64 * 1024, inner),
            pos: 0,
            len,
        }
    }

    fn fail<T>(&self, reason: impl Into<String>) -> Result<T, Fault> {
        Err(Fault::Format {
            offset: self.pos,
            reason: reason.into(),
        })
    }

    fn left(&self) -> u64 {
        self.len.saturating_sub(self.pos)
    }

    /// Fails unless `n` more bytes exist.
    fn need(&self, n: u64, what: &str) -> Result<(), Fault> {
        if n > self.left() {
            return self.fail(format!(
                "{what} needs {n} bytes but the file has {} left (truncated or not a GGUF file)",
                self.left()
            ));
        }
        Ok(())
    }

    fn bytes<const N: usize>(&mut self, what: &str) -> Result<[u8; N], Fault> {
        self.need(N as u64, what)?;
        let mut buf = [0u8; N];
        self.inner.read_exact(&mut buf).map_err(Fault::Io)?;
        self.pos += N as u64;
        Ok(buf)
    }

    fn u32(&mut self, what: &str) -> Result<u32, Fault> {
        self.bytes::<4>(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64, Fault> {
        self.bytes::<8>(what).map(u64::from_le_bytes)
    }

    fn skip(&mut self, n: u64, what: &str) -> Result<(), Fault> {
        self.need(n, what)?;
        let n_i64 =
            i64::try_from(n).map_err(|_| Fault::Io(std::io::ErrorKind::InvalidData.into()))?;
        self.inner.seek_relative(n_i64).map_err(Fault::Io)?;
        self.pos += n;
        Ok(())
    }

    fn string(&mut self, what: &str) -> Result<String, Fault> {
        let n = self.u64(what)?;
        if n > MAX_STRING {
            return self.fail(format!("{what} is {n} bytes long (more than {MAX_STRING})"));
        }
        self.need(n, what)?;
        let mut buf = vec![0u8; n as usize];
        self.inner.read_exact(&mut buf).map_err(Fault::Io)?;
        self.pos += n;
        String::from_utf8(buf).or_else(|_| self.fail(format!("{what} is not UTF-8")))
    }

    fn skip_string(&mut self, what: &str) -> Result<(), Fault> {
        let n = self.u64(what)?;
        self.skip(n, what)
    }

    /// Skips `count` strings (a vocabulary of 262 144 tokens, merges): straight through the
    /// buffer, which is most of the time a header takes to read.
    fn skip_strings(&mut self, mut count: u64, what: &str) -> Result<(), Fault> {
        while count > 0 {
            let buf = self.inner.fill_buf().map_err(Fault::Io)?;
            let mut used = 0usize;
            while count > 0 && buf.len() - used >= 8 {
                let n = u64::from_le_bytes(buf[used..used + 8].try_into().unwrap_or_default());
                match usize::try_from(n) {
                    Ok(n) if n <= buf.len() - used - 8 => {
                        used += 8 + n;
                        count -= 1;
                    }
                    _ => break,
                }
            }
            if used == 0 {
                // A string crossing the buffer's end (or a bad length): one at a time.
                self.skip_string(what)?;
                count -= 1;
                continue;
            }
            self.need(used as u64, what)?;
            self.inner.consume(used);
            self.pos += used as u64;
        }
        Ok(())
    }
}

fn read_header<R: Read + Seek>(r: &mut Bounded<R>) -> Result<FileHeader, Fault> {
    let magic = r.bytes::<4>("the magic number")?;
    if &magic != MAGIC {
        return r.fail("not a GGUF file (no GGUF magic number)");
    }
    let version = r.u32("the version")?;
    match version {
        2 | 3 => {}
        // A big-endian file reads as a byte-swapped small number.
        v if v.swap_bytes() <= 3 => return r.fail("big-endian GGUF files are not supported"),
        v => return r.fail(format!("GGUF version {v} is not supported (2 and 3 are)")),
    }
    let tensor_count = r.u64("the tensor count")?;
    let kv_count = r.u64("the metadata count")?;
    // The smallest metadata entry is an empty key (8), a type (4) and a u8 (1); the smallest
    // tensor entry an empty name (8), n_dims (4), a type (4) and an offset (8).
    r.need(kv_count.saturating_mul(13), "the metadata")?;
    r.need(tensor_count.saturating_mul(24), "the tensor table")?;

    let mut metadata = BTreeMap::new();
    for _ in 0..kv_count {
        let key = r.string("a metadata key")?;
        let ty = r.u32("a metadata type")?;
        let value = read_value(r, ty, 0, &key)?;
        metadata.insert(key, value);
    }

    let mut tensors = Vec::with_capacity(tensor_count as usize);
    for _ in 0..tensor_count {
        tensors.push(read_tensor_info(r)?);
    }

    let alignment = match metadata.get("general.alignment").and_then(Value::as_u64) {
        None => DEFAULT_ALIGNMENT,
        Some(a) if a.is_power_of_two() && a <= 1 << 20 => a,
        Some(a) => return r.fail(format!("general.alignment {a} is not a power of two")),
    };
    let data_start = r.pos.div_ceil(alignment) * alignment;
    let data_len = r.len.saturating_sub(data_start);
    for t in &tensors {
        if t.offset
            .checked_add(t.bytes)
            .is_none_or(|end| end > data_len)
        {
            return r.fail(format!(
                "tensor {} ({} bytes at data offset {}) lies past the end of the file (truncated?)",
                t.name, t.bytes, t.offset
            ));
        }
    }
    Ok(FileHeader {
        version,
        metadata,
        tensors,
        data_start,
        file_len: r.len,
    })
}

fn read_value<R: Read + Seek>(
    r: &mut Bounded<R>,
    ty: u32,
    depth: u32,
    key: &str,
) -> Result<Value, Fault> {
    Ok(match ty {
        0 => Value::U64(r.bytes::<1>(key)?[0].into()),
        1 => Value::I64((r.bytes::<1>(key)?[0] as i8).into()),
        2 => Value::U64(u16::from_le_bytes(r.bytes::<2>(key)?).into()),
        3 => Value::I64(i16::from_le_bytes(r.bytes::<2>(key)?).into()),
        4 => Value::U64(r.u32(key)?.into()),
        5 => Value::I64(i32::from_le_bytes(r.bytes::<4>(key)?).into()),
        6 => Value::F64(f32::from_le_bytes(r.bytes::<4>(key)?).into()),
        7 => Value::Bool(r.bytes::<1>(key)?[0] != 0),
        8 => Value::Str(r.string(key)?),
        9 => {
            if depth >= MAX_ARRAY_DEPTH {
                return r.fail(format!("{key}: arrays nested too deep"));
            }
            let elem = r.u32(key)?;
            let len = r.u64(key)?;
            let Some(min) = min_size(elem) else {
                return r.fail(format!("{key}: unknown array element type {elem}"));
            };
            r.need(len.saturating_mul(min), key)?;
            if len > MAX_KEPT_ARRAY {
                skip_array(r, elem, len, depth, key)?;
                Value::Skipped { len }
            } else {
                let mut items = Vec::with_capacity(len as usize);
                for _ in 0..len {
                    items.push(read_value(r, elem, depth + 1, key)?);
                }
                Value::Array(items)
            }
        }
        10 => Value::U64(r.u64(key)?),
        11 => Value::I64(r.u64(key)? as i64),
        12 => Value::F64(f64::from_le_bytes(r.bytes::<8>(key)?)),
        t => return r.fail(format!("{key}: unknown metadata type {t}")),
    })
}

/// The smallest encoding of one value of type `ty` (strings and arrays: their length prefix).
fn min_size(ty: u32) -> Option<u64> {
    Some(match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 | 10..=12 => 8,
        9 => 12,
        _ => return None,
    })
}

fn skip_array<R: Read + Seek>(
    r: &mut Bounded<R>,
    elem: u32,
    len: u64,
    depth: u32,
    key: &str,
) -> Result<(), Fault> {
    match elem {
        8 => r.skip_strings(len, key),
        9 => (0..len).try_for_each(|_| read_value(r, 9, depth + 1, key).map(drop)),
        // Fixed-size elements; `need` above already checked they fit.
        _ => r.skip(len * min_size(elem).unwrap_or(1), key),
    }
}

fn read_tensor_info<R: Read + Seek>(r: &mut Bounded<R>) -> Result<TensorInfo, Fault> {
    let name = r.string("a tensor name")?;
    let n_dims = r.u32(&name)?;
    if n_dims == 0 || n_dims > MAX_DIMS {
        return r.fail(format!(
            "tensor {name} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)"
        ));
    }
    let mut dims = Vec::with_capacity(n_dims as usize);
    for _ in 0..n_dims {
        dims.push(r.u64(&name)?);
    }
    let ty = r.u32(&name)?;
    let offset = r.u64(&name)?;
    let elements = dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
    let Some(bytes) = elements.and_then(|n| super::types::bytes_for(ty, n)) else {
        return r.fail(format!(
            "tensor {name}: type {} with dimensions {dims:?} has no known size",
            super::types::type_name(ty)
        ));
    };
    Ok(TensorInfo::new(name, dims, ty, offset, bytes))
}
