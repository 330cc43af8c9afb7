//! Trust in the state dir, like OpenSSH's `StrictModes`: llmvisor acts on what its state dir
//! says (which processes are its own, which to stop), so the dir must be ours alone — owned by
//! the effective uid and not writable by group or others — and files in it are opened without
//! following symbolic links (a link planted there must not redirect a write or a lock).

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
