//! Writes small GGUF files for tests: a header with the given metadata and tensors, and zeroed
//! tensor data of the right size.

use super::types::bytes_for;

pub enum Meta {
    U32(u32),
    Str(String),
    ArrU32(Vec<u32>),
    ArrBool(Vec<bool>),
    ArrStr(Vec<String>),
}

#[derive(Default)]
pub struct GgufWriter {
    pub meta: Vec<(String, Meta)>,
    /// name, dims, ggml type.
    pub tensors: Vec<(String, Vec<u64>, u32)>,
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

impl GgufWriter {
    pub fn meta(mut self, key: &str, value: Meta) -> Self {
        self.meta.push((key.to_owned(), value));
        self
    }

    pub fn tensor(mut self, name: &str, dims: &[u64], ty: u32) -> Self {
        self.tensors.push((name.to_owned(), dims.to_vec(), ty));
        self
    }

    /// The file's bytes (header, then data aligned to 32).
    pub fn bytes(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.meta.len() as u64).to_le_bytes());
        for (k, v) in &self.meta {
            put_str(&mut out, k);
            let (ty, body): (u32, Vec<u8>) = match v {
                Meta::U32(x) => (4, x.to_le_bytes().to_vec()),
                Meta::Str(s) => {
                    let mut b = Vec::new();
                    put_str(&mut b, s);
                    (8, b)
                }
                Meta::ArrU32(xs) => {
                    let mut b = 4u32.to_le_bytes().to_vec();
                    b.extend((xs.len() as u64).to_le_bytes());
                    xs.iter().for_each(|x| b.extend(x.to_le_bytes()));
                    (9, b)
                }
                Meta::ArrBool(xs) => {
                    let mut b = 7u32.to_le_bytes().to_vec();
                    b.extend((xs.len() as u64).to_le_bytes());
                    b.extend(xs.iter().map(|&x| u8::from(x)));
                    (9, b)
                }
                Meta::ArrStr(xs) => {
                    let mut b = 8u32.to_le_bytes().to_vec();
                    b.extend((xs.len() as u64).to_le_bytes());
                    xs.iter().for_each(|x| put_str(&mut b, x));
                    (9, b)
                }
            };
            out.extend(ty.to_le_bytes());
            out.extend(body);
        }
        let mut offset = 0u64;
        let mut sizes = Vec::new();
        for (name, dims, ty) in &self.tensors {
            put_str(&mut out, name);
            out.extend((dims.len() as u32).to_le_bytes());
            dims.iter().for_each(|d| out.extend(d.to_le_bytes()));
            out.extend(ty.to_le_bytes());
            out.extend(offset.to_le_bytes());
            let size = bytes_for(*ty, dims.iter().product()).expect("known type");
            sizes.push(size);
            offset += size.div_ceil(32) * 32;
        }
        out.resize(out.len().div_ceil(32) * 32, 0);
        out.resize(out.len() + offset as usize, 0);
        out
    }
}
