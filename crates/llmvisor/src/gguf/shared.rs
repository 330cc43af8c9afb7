//! Headers already read, shared: discovery reads every model's header, and each model's memory
//! estimate needs the same header again a moment later (and at every reload). With a thousand
//! models that second pass doubled the daemon's start; here it is a lookup.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::{Gguf, GgufError};

/// Beyond this many headers the cache starts over (a header is a few KiB to a few hundred).
const CAPACITY: usize = 4096;

/// A file is the same file while its inode, size and modification time are.
#[derive(Clone, PartialEq, Eq, Hash)]
struct Key {
    path: PathBuf,
    ino: u64,
    len: u64,
    mtime_ns: i128,
}

fn key(path: &Path) -> Option<Key> {
    let m = std::fs::metadata(path).ok()?;
    Some(Key {
        path: path.to_owned(),
        ino: m.ino(),
        len: m.len(),
        mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
    })
}

static CACHE: Mutex<Option<HashMap<Key, Arc<Gguf>>>> = Mutex::new(None);

/// [`Gguf::open`], answered from the cache when the file has not changed since it was read.
/// Errors are not cached (a file being copied in is read again next time).
pub fn open_shared(path: &Path) -> Result<Arc<Gguf>, GgufError> {
    let Some(k) = key(path) else {
        return Gguf::open(path).map(Arc::new);
    };
    if let Some(hit) = lock().as_ref().and_then(|c| c.get(&k)).cloned() {
        return Ok(hit);
    }
    // Read outside the lock: other threads read other headers meanwhile.
    let g = Arc::new(Gguf::open(path)?);
    let mut guard = lock();
    let cache = guard.get_or_insert_with(HashMap::new);
    if cache.len() >= CAPACITY {
        cache.clear();
    }
    cache.insert(k, g.clone());
    Ok(g)
}

fn lock() -> std::sync::MutexGuard<'static, Option<HashMap<Key, Arc<Gguf>>>> {
    // A panic while holding it leaves a valid map: keep using it.
    CACHE.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_changed_file_is_read_again_and_an_unchanged_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        let write = |layers: u32| {
            use super::super::write::{GgufWriter, Meta};
            let w = GgufWriter::default()
                .meta("general.architecture", Meta::Str("llama".into()))
                .meta("llama.block_count", Meta::U32(layers));
            std::fs::write(&path, w.bytes()).unwrap();
        };
        write(4);
        let a = open_shared(&path).unwrap();
        let b = open_shared(&path).unwrap();
        assert!(Arc::ptr_eq(&a, &b), "an unchanged file is one read");
        // A new file in its place (another inode, size or time) is read again.
        std::fs::remove_file(&path).unwrap();
        write(12);
        let c = open_shared(&path).unwrap();
        assert!(!Arc::ptr_eq(&a, &c));
        assert_eq!(c.block_count(), Some(12));
    }
}
