//! Trust in the state dir, like OpenSSH's `StrictModes`: llmvisor acts on what its state dir
//! says (which processes are its own, which to stop), so the dir must be ours alone — owned by
//! the effective uid and not writable by group or others — and files in it are opened without
//! following symbolic links (a link planted there must not redirect a write or a lock).
//! Every directory above it must be safe too: owned by root or by us, and writable by nobody
//! else unless sticky (`/tmp`) — or whoever owns a parent could swap the state dir for their own.

use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags};

/// Why a state dir is not used.
#[derive(Debug, thiserror::Error)]
pub enum StateDirError {
    #[error(
        "state dir {} is owned by uid {owner}, not by this user (uid {euid}): its records could \
         be forged by someone else (fix: use a state dir of your own, or `chown {euid} {}`)",
        dir.display(), dir.display()
    )]
    NotOwned { dir: PathBuf, owner: u32, euid: u32 },
    #[error(
        "state dir {} is writable by {who} (mode {mode:03o}): anyone there could forge its \
         records (fix: `chmod 700 {}`)",
        dir.display(), dir.display()
    )]
    Writable {
        dir: PathBuf,
        who: &'static str,
        mode: u32,
    },
    #[error(
        "state dir {} is inside {}, which {why}: its owner or group could replace the state dir \
         with one of their own (fix: use a state dir under a directory only you and root can \
         write, e.g. ~/.local/state/llmvisor)",
        dir.display(), ancestor.display()
    )]
    UnsafeParent {
        dir: PathBuf,
        ancestor: PathBuf,
        why: String,
    },
    #[error("state dir {} is not a directory", dir.display())]
    NotADirectory { dir: PathBuf },
    #[error("state dir {}: {source}", dir.display())]
    Io {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl From<StateDirError> for io::Error {
    fn from(e: StateDirError) -> Self {
        match e {
            StateDirError::Io { source, .. } => source,
            other => io::Error::new(io::ErrorKind::PermissionDenied, other),
        }
    }
}

/// Checks that `dir` (an existing directory) is ours alone.
pub fn check(dir: &Path) -> Result<(), StateDirError> {
    let meta = std::fs::metadata(dir).map_err(|source| StateDirError::Io {
        dir: dir.to_owned(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(StateDirError::NotADirectory {
            dir: dir.to_owned(),
        });
    }
    let euid = rustix::process::geteuid().as_raw();
    if meta.uid() != euid {
        return Err(StateDirError::NotOwned {
            dir: dir.to_owned(),
            owner: meta.uid(),
            euid,
        });
    }
    check_parents(dir, euid)?;
    let mode = meta.mode() & 0o7777;
    let who = match (mode & 0o020 != 0, mode & 0o002 != 0) {
        (true, true) => Some("its group and others"),
        (true, false) => Some("its group"),
        (false, true) => Some("others"),
        (false, false) => None,
    };
    match who {
        Some(who) => Err(StateDirError::Writable {
            dir: dir.to_owned(),
            who,
            mode,
        }),
        None => Ok(()),
    }
}

/// Every directory above `dir` (symbolic links resolved) is owned by root or `euid` and not
/// writable by group or others, unless its sticky bit is set.
fn check_parents(dir: &Path, euid: u32) -> Result<(), StateDirError> {
    let real = std::fs::canonicalize(dir).map_err(|source| StateDirError::Io {
        dir: dir.to_owned(),
        source,
    })?;
    for ancestor in real.ancestors().skip(1) {
        let meta = std::fs::metadata(ancestor).map_err(|source| StateDirError::Io {
            dir: dir.to_owned(),
            source,
        })?;
        let mode = meta.mode();
        let why = if meta.uid() != 0 && meta.uid() != euid {
            Some(format!("is owned by uid {}", meta.uid()))
        } else if mode & 0o022 != 0 && mode & 0o1000 == 0 {
            Some(format!(
                "others can write to (mode {:03o}, not sticky)",
                mode & 0o7777
            ))
        } else {
            None
        };
        if let Some(why) = why {
            return Err(StateDirError::UnsafeParent {
                dir: dir.to_owned(),
                ancestor: ancestor.to_owned(),
                why,
            });
        }
    }
    Ok(())
}

/// Creates `dir` (0700, parents too) if needed, checks it, and proves that files can be
/// created in it (a probe created with `O_EXCL` relative to the dir, then removed).
pub fn ensure(dir: &Path) -> Result<(), StateDirError> {
    let io_err = |source| StateDirError::Io {
        dir: dir.to_owned(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err)?;
    check(dir)?;
    let fd = open_dir(dir).map_err(io_err)?;
    let probe = format!(
        ".probe-{}-{}",
        std::process::id(),
        crate::ids::random_hex(4)
    );
    rustix::fs::openat(
        &fd,
        probe.as_str(),
        OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )
    .map_err(|e| io_err(e.into()))?;
    rustix::fs::unlinkat(&fd, probe.as_str(), rustix::fs::AtFlags::empty())
        .map_err(|e| io_err(e.into()))
}

/// A descriptor on the directory `dir`.
pub fn open_dir(dir: &Path) -> io::Result<OwnedFd> {
    Ok(rustix::fs::open(
        dir,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// `OpenOptions` flags plus `O_NOFOLLOW`: the last component of a path in the state dir is
/// never followed if it is a symbolic link (the open fails with `ELOOP`).
pub fn nofollow(opts: &mut std::fs::OpenOptions) -> &mut std::fs::OpenOptions {
    use std::os::unix::fs::OpenOptionsExt;
    opts.custom_flags(libc::O_NOFOLLOW)
}

/// Opens an existing file for reading without following a symbolic link.
pub fn open_read(path: &Path) -> io::Result<File> {
    nofollow(std::fs::OpenOptions::new().read(true)).open(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn group_or_world_writable_dirs_are_refused_with_the_fix() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state");
        ensure(&dir).unwrap();
        assert_eq!(
            std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = ensure(&dir).unwrap_err().to_string();
        assert!(e.contains(&format!("chmod 700 {}", dir.display())), "{e}");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o750)).unwrap();
        ensure(&dir).unwrap();
    }

    /// Issue 19: a state dir of our own inside another user's directory, or inside one anyone
    /// may write (not sticky), is refused; /tmp (sticky) is fine.
    #[test]
    fn parents_owned_or_writable_by_others_are_refused() {
        let tmp = tempfile::tempdir().unwrap(); // under /tmp: root's, sticky
        let theirs = tmp.path().join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        let dir = theirs.join("state");
        ensure(&dir).unwrap();
        if rustix::process::geteuid().is_root() {
            std::os::unix::fs::chown(&theirs, Some(12345), None).unwrap();
            let e = ensure(&dir).unwrap_err().to_string();
            assert!(e.contains("is owned by uid 12345"), "{e}");
            assert!(e.contains(&theirs.display().to_string()), "{e}");
            std::os::unix::fs::chown(&theirs, Some(0), None).unwrap();
        }
        std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = ensure(&dir).unwrap_err().to_string();
        assert!(
            e.contains("others can write to (mode 777, not sticky)"),
            "{e}"
        );
        std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o1777)).unwrap();
        ensure(&dir).unwrap();
    }

    #[test]
    fn links_are_not_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("target");
        std::fs::write(&target, "x").unwrap();
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = open_read(&link).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ELOOP));
    }
}
