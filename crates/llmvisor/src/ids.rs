//! Identifiers: random ones (instance ids, HTTP lease ids) from the kernel's generator, and
//! model ids made safe for places where `/` or `:` would mean something (URL path segments,
//! file names, etcd key segments).

use std::io::Read;

/// Percent-encodes one path segment (a model id or alias): everything but RFC 3986's
/// unreserved characters is escaped, so `/`, `:`, `?`, `#` and spaces in a name stay inside it.
/// Also the file name and key-segment form of an id: `Qwen/Qwen3-8B` is `Qwen%2FQwen3-8B`, one
/// file in the logs folder and one segment of a key, and no two ids share a form.
pub fn encode_segment(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `n` random bytes as lowercase hex.
pub fn random_hex(n: usize) -> String {
    let mut buf = vec![0u8; n];
    let filled = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut buf));
    if filled.is_err() {
        // No /dev/urandom (a very odd sandbox): fall back to std's randomly seeded hasher.
        use std::hash::{BuildHasher, Hasher};
        for chunk in buf.chunks_mut(8) {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u64(0);
            let v = h.finish().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
    to_hex(&buf)
}

/// `bytes` as lowercase hex.
pub fn to_hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// The bytes of lowercase or uppercase hex `s` (`None` when it is not hex).
pub fn from_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Reverses percent-encoding (`%2F` → `/`); a `%` not followed by two hex digits stays as
/// written, and bytes that are not UTF-8 become U+FFFD.
pub fn decode_segment(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = (b[i] == b'%')
            .then(|| b.get(i + 1..i + 3))
            .flatten()
            .filter(|h| h.iter().all(u8::is_ascii_hexdigit)) // from_str_radix takes "+1"
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match hex {
            Some(v) => {
                out.push(v);
                i += 3;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    #[test]
    fn segments_keep_slashes_and_colons_inside() {
        use super::encode_segment;
        assert_eq!(encode_segment("gemma-3-270m"), "gemma-3-270m");
        assert_eq!(encode_segment("org/model q8"), "org%2Fmodel%20q8");
        assert_eq!(encode_segment("llama3.2:3b"), "llama3.2%3A3b");
        assert_eq!(encode_segment("a?b#c"), "a%3Fb%23c");
        assert_eq!(encode_segment("%2F"), "%252F");
        assert_eq!(encode_segment("é"), "%C3%A9");
        for id in [
            "Qwen/Qwen3-8B",
            "llama3.2:3b",
            "unsloth/Qwen3-8B-GGUF:Q4_K_M",
            "a%b",
            "é",
        ] {
            assert_eq!(super::decode_segment(&encode_segment(id)), id);
        }
        assert_eq!(super::decode_segment("a%2"), "a%2");
        assert_eq!(super::decode_segment("a%zz+b%+1"), "a%zz+b%+1");
        assert_eq!(super::decode_segment("%FF"), "\u{FFFD}");
    }

    #[test]
    fn hex_of_the_right_length_and_different_each_time() {
        let a = super::random_hex(16);
        let b = super::random_hex(16);
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
