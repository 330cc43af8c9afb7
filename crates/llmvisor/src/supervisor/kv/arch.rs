//! `general.architecture` from a GGUF file's header: all the KV check needs to say which kind
//! of model reused nothing (a tiny read of the first metadata entries, not a GGUF reader).

use std::io::Read;
use std::path::Path;

/// Bytes of the header read at most: the architecture is among the first entries.
const HEAD: u64 = 64 * 1024;

/// The model's architecture (`llama`, `gemma3` …), if the file is a readable GGUF that says.
pub fn architecture(file: &Path) -> Option<String> {
    let mut head = Vec::new();
    crate::statedir::open_read(file)
        .ok()?
        .take(HEAD)
        .read_to_end(&mut head)
        .ok()?;
    from_header(&head)
}

fn from_header(b: &[u8]) -> Option<String> {
    let mut r = Reader { b, at: 0 };
    if r.bytes(4)? != b"GGUF" {
        return None;
    }
    let version = r.u32()?;
    if version < 2 {
        return None; // v1 had 32-bit counts; nothing this old is served today
    }
    let _tensors = r.u64()?;
    let entries = r.u64()?;
    for _ in 0..entries.min(64) {
        let key = r.string()?;
        let kind = r.u32()?;
        if key == b"general.architecture" && kind == STRING {
            return String::from_utf8(r.string()?.to_vec()).ok();
        }
        r.skip_value(kind)?;
    }
    None
}

const STRING: u32 = 8;
const ARRAY: u32 = 9;

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.b.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(s)
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.bytes(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.bytes(8)?.try_into().ok()?))
    }
    fn string(&mut self) -> Option<&'a [u8]> {
        let n = usize::try_from(self.u64()?).ok()?;
        self.bytes(n)
    }
    fn skip_value(&mut self, kind: u32) -> Option<()> {
        let fixed = match kind {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            10..=12 => 8,
            STRING => return self.string().map(drop),
            ARRAY => {
                let inner = self.u32()?;
                let n = self.u64()?;
                for _ in 0..n {
                    self.skip_value(inner)?;
                }
                return Some(());
            }
            _ => return None,
        };
        self.bytes(fixed).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(entries: &[(&str, u32, Vec<u8>)]) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        b.extend((entries.len() as u64).to_le_bytes());
        for (k, kind, v) in entries {
            b.extend((k.len() as u64).to_le_bytes());
            b.extend(k.as_bytes());
            b.extend(kind.to_le_bytes());
            b.extend(v);
        }
        b
    }

    fn string(s: &str) -> Vec<u8> {
        let mut v = (s.len() as u64).to_le_bytes().to_vec();
        v.extend(s.as_bytes());
        v
    }

    #[test]
    fn the_architecture_is_found_after_other_entries() {
        let mut array = 8u32.to_le_bytes().to_vec();
        array.extend(2u64.to_le_bytes());
        array.extend(string("a"));
        array.extend(string("bc"));
        let b = header(&[
            ("general.alignment", 4, 32u32.to_le_bytes().to_vec()),
            ("tokens", ARRAY, array),
            ("general.architecture", STRING, string("gemma3")),
        ]);
        assert_eq!(from_header(&b).as_deref(), Some("gemma3"));
        assert_eq!(from_header(&b[..b.len() - 3]), None, "truncated");
        assert_eq!(from_header(b"GGML...."), None);
    }

    #[test]
    fn the_installed_models_say_what_they_are() {
        // Real files when the test machine has them (scripts/setup-llama.sh).
        for (var, arch) in [("LLAMA_MODEL", "gemma3"), ("LLAMA_MODEL_SMOL", "llama")] {
            if let Ok(path) = std::env::var(var) {
                assert_eq!(
                    architecture(Path::new(&path)).as_deref(),
                    Some(arch),
                    "{path}"
                );
            }
        }
    }
}
