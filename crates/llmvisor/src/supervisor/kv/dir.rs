//! The saved-slot files on disk: `<state_dir>/kv/<model>/`, owner-only, each level opened
//! relative to the one above without following links (a link planted in the state dir must not
//! send llama-server's writes elsewhere), and the disk budget over all models' files.

use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use rustix::fs::{AtFlags, Mode, OFlags};

/// What a save in progress is called until it is complete (then renamed to its final name):
/// one left behind was cut short by a crash and is removed, never loaded.
pub const PARTIAL: &str = ".partial";
/// A `.partial` file older than this is no save in progress (another instance on the state dir
/// could be saving right now): it was cut short.
pub const PARTIAL_STALE: std::time::Duration = std::time::Duration::from_secs(3600);
/// Every file llmvisor names starts so; no other file in a save dir is touched.
pub const FILE_PREFIX: &str = "lv-";

/// `<state_dir>/kv`.
pub fn root(state_dir: &Path) -> PathBuf {
    state_dir.join("kv")
}

/// The directory name of `model` under [`root`]: its id's file-name form (`org/name` is
/// `org%2Fname`), with a leading `.` written `%2E` so `.` and `..` stay ids, never directories.
pub fn model_dir_name(model: &str) -> String {
    let name = crate::ids::encode_segment(model);
    match name.strip_prefix('.') {
        Some(rest) => format!("%2E{rest}"),
        None => name,
    }
}

/// Opens (creating, 0700) each component of `rel` under the directory `base`, never following a
/// link; returns the last one's descriptor.
fn open_dirs(base: &Path, rel: &[&str]) -> io::Result<OwnedFd> {
    let mut fd = crate::statedir::open_dir(base)?;
    for name in rel {
        match rustix::fs::mkdirat(&fd, *name, Mode::from_raw_mode(0o700)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(e.into()),
        }
        fd = rustix::fs::openat(
            &fd,
            *name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
    }
    Ok(fd)
}

/// Creates `<state_dir>/kv/<model>/` (0700, no link followed) and returns its path.
pub fn ensure_model_dir(state_dir: &Path, model: &str) -> io::Result<PathBuf> {
    let name = model_dir_name(model);
    let fd = open_dirs(state_dir, &["kv", &name])?;
    // Created by an older run with another mode, or by hand: ours alone, like the state dir.
    rustix::fs::fchmod(&fd, Mode::from_raw_mode(0o700))?;
    Ok(root(state_dir).join(name))
}

/// One file of ours in a save dir.
#[derive(Debug, Clone)]
pub struct SavedFile {
    pub name: String,
    pub path: PathBuf,
    pub bytes: u64,
    pub modified: SystemTime,
}

/// llmvisor's files in `dir` (none if it does not exist). Links are not ours: skipped.
pub fn list(dir: &Path) -> Vec<SavedFile> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let meta = e.metadata().ok()?; // of the entry itself: a link is not a file
            (name.starts_with(FILE_PREFIX) && meta.is_file()).then(|| SavedFile {
                path: e.path(),
                bytes: meta.len(),
                modified: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                name,
            })
        })
        .collect()
}

/// Bytes of llmvisor's files in `dir`.
pub fn bytes(dir: &Path) -> u64 {
    list(dir).iter().map(|f| f.bytes).sum()
}

/// Removes `name` from `dir` (not following links; gone already is fine).
pub fn remove(dir: &Path, name: &str) -> io::Result<()> {
    let fd = crate::statedir::open_dir(dir)?;
    match rustix::fs::unlinkat(&fd, name, AtFlags::empty()) {
        Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Renames `from` to `to` within `dir` (a finished save gets its final name at once).
pub fn rename(dir: &Path, from: &str, to: &str) -> io::Result<()> {
    let fd = crate::statedir::open_dir(dir)?;
    Ok(rustix::fs::renameat(&fd, from, &fd, to)?)
}

/// Drops the oldest files under `<state_dir>/kv` (every model's) until they fit `budget`
/// bytes; returns the paths removed. Files in a command's own `--slot-save-path` are not
/// counted: llmvisor does not own that dir.
pub fn enforce_budget(state_dir: &Path, budget: u64) -> Vec<PathBuf> {
    let Ok(models) = std::fs::read_dir(root(state_dir)) else {
        return Vec::new();
    };
    let mut files: Vec<SavedFile> = models
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .flat_map(|e| list(&e.path()))
        .collect();
    let mut total: u64 = files.iter().map(|f| f.bytes).sum();
    files.sort_by_key(|f| f.modified);
    let mut removed = Vec::new();
    for f in files {
        if total <= budget {
            break;
        }
        if std::fs::remove_file(&f.path).is_ok() {
            total -= f.bytes;
            removed.push(f.path);
        }
    }
    removed
}

/// Removes the save dirs under `<state_dir>/kv` of models not in `keep` (removed from the
/// config; `None`: keep every model's), and the saves cut short by a crash ([`PARTIAL`], older
/// than [`PARTIAL_STALE`]); returns what was removed.
pub fn clean(state_dir: &Path, keep: Option<&[String]>) -> Vec<PathBuf> {
    let Ok(models) = std::fs::read_dir(root(state_dir)) else {
        return Vec::new();
    };
    let kept: Option<Vec<String>> = keep.map(|ids| ids.iter().map(|m| model_dir_name(m)).collect());
    let mut removed = Vec::new();
    for e in models.flatten() {
        if !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let name = e.file_name().to_string_lossy().into_owned();
        if kept.as_ref().is_some_and(|k| !k.contains(&name)) {
            if std::fs::remove_dir_all(e.path()).is_ok() {
                removed.push(e.path());
            }
            continue;
        }
        for f in list(&e.path()) {
            let stale = f.modified.elapsed().is_ok_and(|age| age > PARTIAL_STALE);
            if f.name.ends_with(PARTIAL) && stale && remove(&e.path(), &f.name).is_ok() {
                removed.push(f.path);
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_model_dir_is_owner_only_and_a_planted_link_is_not_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path();
        let dir = ensure_model_dir(state, "a").unwrap();
        assert_eq!(
            std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        assert_eq!(
            ensure_model_dir(state, "..").unwrap(),
            root(state).join("%2E.")
        );
        let elsewhere = tmp.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, root(state).join("b")).unwrap();
        let e = ensure_model_dir(state, "b").unwrap_err();
        assert!(
            matches!(e.raw_os_error(), Some(libc::ELOOP) | Some(libc::ENOTDIR)),
            "{e}"
        );
    }

    #[test]
    fn the_budget_drops_the_oldest_files_first_and_clean_removes_removed_models() {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path();
        let a = ensure_model_dir(state, "a").unwrap();
        let b = ensure_model_dir(state, "b").unwrap();
        let old = SystemTime::now() - std::time::Duration::from_secs(60);
        for (dir, name) in [(&a, "lv-old.bin"), (&b, "lv-new.bin"), (&a, "lv-newer.bin")] {
            std::fs::write(dir.join(name), [0u8; 100]).unwrap();
        }
        std::fs::File::options()
            .write(true)
            .open(a.join("lv-old.bin"))
            .unwrap()
            .set_modified(old)
            .unwrap();
        std::fs::write(a.join("not-ours.bin"), [0u8; 1000]).unwrap();
        let removed = enforce_budget(state, 250);
        assert_eq!(removed, vec![a.join("lv-old.bin")]);
        assert_eq!(bytes(&a) + bytes(&b), 200);
        std::fs::write(a.join("lv-x.bin.partial"), "cut").unwrap();
        std::fs::write(a.join("lv-now.bin.partial"), "a save under way").unwrap();
        let long_ago = SystemTime::now() - PARTIAL_STALE * 2;
        std::fs::File::options()
            .write(true)
            .open(a.join("lv-x.bin.partial"))
            .unwrap()
            .set_modified(long_ago)
            .unwrap();
        let removed = clean(state, Some(&["a".to_string()]));
        assert!(
            removed.contains(&b) && removed.contains(&a.join("lv-x.bin.partial")),
            "{removed:?}"
        );
        assert!(a.join("lv-newer.bin").exists() && a.join("not-ours.bin").exists());
        assert!(
            a.join("lv-now.bin.partial").exists(),
            "a recent partial may be a save under way"
        );
    }
}
