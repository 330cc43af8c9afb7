//! Owner liveness without pids: an instance is alive exactly while it holds its lock file.
//!
//! Every llmvisor instance takes an exclusive `flock` on `<state_dir>/owners/<instance_id>.lock`
//! for its whole life. The kernel drops the lock when the last descriptor of that open file
//! description closes — at exit, on SIGKILL, on a crash — so anyone can tell a live owner from a
//! dead one by trying to take the lock, with no pid (which may be recycled) involved.
//!
//! * Probers take a *shared* non-blocking lock: it conflicts with the owner's exclusive lock
//!   (`EWOULDBLOCK` → alive) but not with other probers, so two probers never mistake each other
//!   for a live owner.
//! * The owner creates its lock file under a temporary name, locks it, and only then links it to
//!   its final name, so a lock file at its final path is always either locked by its live owner or
//!   stale: no prober can catch a starting owner between `open` and `flock`.
//! * The file is opened close-on-exec: servers forked by the owner never inherit the lock (a
//!   server outliving its owner must not make the owner look alive); and a child forked without
//!   an exec (Python's `os.fork`) loses its copy of it at once (`fork_guard.rs`).
//!
//! An instance takes its lock before it writes anything naming its id (store rows, children's
//! `LLMVISOR_INSTANCE`), so an id that is referenced anywhere but has no held lock is dead.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rustix::fs::{flock, FlockOperation};
use rustix::io::Errno;

/// The directory, inside the state dir, holding one lock file per instance.
pub const OWNERS_DIR: &str = "owners";

/// How long [`OwnerLock::acquire`] retries while a prober briefly holds a shared lock.
const ACQUIRE_PATIENCE: Duration = Duration::from_secs(1);

/// Why an owner lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum OwnerError {
    #[error("invalid llmvisor instance id {0:?} (use letters, digits, '-', '_' and '.'; not starting with '.')")]
    InvalidId(String),
    #[error("cannot create the owner lock {}: {source} (fix: make the state directory writable)", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the owner lock {} is held by another live process: instance id {id} is already in use", path.display())]
    InUse { path: PathBuf, id: String },
}

/// What a lock file says about its instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// The lock is held (or its state cannot be read: assumed alive, so nothing of it is touched).
    Alive,
    /// The lock file exists and nobody holds it: the owner is gone.
    Dead,
    /// There is no lock file: the owner ended and was cleaned up after, or never ran on this
    /// state dir. Treated as dead.
    NoLockFile,
}

/// The exclusive lock that makes an instance "alive". Released (and its file removed) on drop;
/// the kernel releases it if the process dies.
#[derive(Debug)]
pub struct OwnerLock {
    /// Declared first, so dropped before `file` closes: no fork may see a reused descriptor.
    _not_inherited: crate::fork_guard::Guarded,
    file: File,
    path: PathBuf,
    instance_id: String,
}

impl OwnerLock {
    /// Creates `<state_dir>/owners/<instance_id>.lock` (mode 0600) and holds an exclusive lock on
    /// it until dropped. Fails if another live process holds the lock of this id.
    pub fn acquire(state_dir: &Path, instance_id: &str) -> Result<Self, OwnerError> {
        let path = lock_path(state_dir, instance_id)
            .ok_or_else(|| OwnerError::InvalidId(instance_id.to_owned()))?;
        let io_err = |path: &Path| {
            let path = path.to_owned();
            move |source| OwnerError::Io { path, source }
        };
        let dir = state_dir.join(OWNERS_DIR);
        create_private_dir(&dir).map_err(io_err(&dir))?;
        static NEXT_TMP: AtomicU64 = AtomicU64::new(0);
        let tmp = dir.join(format!(
            ".{instance_id}.{}-{}.tmp",
            std::process::id(),
            NEXT_TMP.fetch_add(1, Ordering::Relaxed)
        ));
        let deadline = Instant::now() + ACQUIRE_PATIENCE;
        loop {
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io_err(&tmp))?;
            flock(&file, FlockOperation::NonBlockingLockExclusive)
                .map_err(|e| io_err(&tmp)(e.into()))?;
            // For people looking at the directory; liveness never depends on it.
            let _ = writeln!(file, "{}", std::process::id());
            let linked = fs::hard_link(&tmp, &path);
            let _ = fs::remove_file(&tmp);
            match linked {
                Ok(()) => {
                    use std::os::fd::AsRawFd;
                    return Ok(Self {
                        _not_inherited: crate::fork_guard::guard(file.as_raw_fd()),
                        file,
                        path,
                        instance_id: instance_id.to_owned(),
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    drop(file);
                    // A stale file of this id (its owner ended without cleaning up): removed
                    // by the check, and we try again. Or a live owner: give up after a while.
                    let alive = check(state_dir, instance_id, true) == Liveness::Alive;
                    if Instant::now() >= deadline {
                        return Err(if alive {
                            OwnerError::InUse {
                                path,
                                id: instance_id.to_owned(),
                            }
                        } else {
                            OwnerError::Io {
                                path,
                                source: io::Error::other("cannot remove its stale lock file"),
                            }
                        });
                    }
                    if alive {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
                Err(e) => return Err(io_err(&path)(e)),
            }
        }
    }

    /// The instance this lock makes alive.
    pub fn instance_id(&self) -> &str {
        &self.instance_id
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for OwnerLock {
    fn drop(&mut self) {
        // Remove the file while still holding the lock (only if it is still ours), then let the
        // close release the lock. A prober that opened it before the unlink sees it unlocked
        // afterwards and says "dead": right, we are ending.
        if is_same_file(&self.file, &self.path) {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// True while the instance `instance_id` of `state_dir` holds its lock. A stale lock file (the
/// owner died) is removed; a missing one means dead. An id that is not a valid instance id is
/// never alive.
pub fn is_alive(state_dir: &Path, instance_id: &str) -> bool {
    check(state_dir, instance_id, true) == Liveness::Alive
}

/// Like [`is_alive`], but tells a stale lock file from a missing one and changes nothing.
pub fn probe(state_dir: &Path, instance_id: &str) -> Liveness {
    check(state_dir, instance_id, false)
}

/// Removes the lock file of `instance_id` if its owner is dead. Returns whether it did.
pub fn remove_if_stale(state_dir: &Path, instance_id: &str) -> bool {
    let existed = lock_path(state_dir, instance_id).is_some_and(|p| p.exists());
    existed && check(state_dir, instance_id, true) == Liveness::Dead
}

/// The instance ids that have a lock file in `state_dir` (live or stale).
pub fn lock_files(state_dir: &Path) -> Vec<String> {
    let Ok(dir) = fs::read_dir(state_dir.join(OWNERS_DIR)) else {
        return Vec::new();
    };
    let mut ids: Vec<String> = dir
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            let id = name.strip_suffix(".lock")?;
            valid_id(id).then(|| id.to_owned())
        })
        .collect();
    ids.sort();
    ids
}

/// Whether `id` may be used as an instance id (it becomes a file name).
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn lock_path(state_dir: &Path, instance_id: &str) -> Option<PathBuf> {
    valid_id(instance_id).then(|| {
        state_dir
            .join(OWNERS_DIR)
            .join(format!("{instance_id}.lock"))
    })
}

fn check(state_dir: &Path, instance_id: &str, remove_stale: bool) -> Liveness {
    let Some(path) = lock_path(state_dir, instance_id) else {
        return Liveness::NoLockFile;
    };
    let file = match crate::statedir::open_read(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Liveness::NoLockFile,
        // Cannot tell: never declare someone dead on a guess.
        Err(_) => return Liveness::Alive,
    };
    loop {
        match flock(&file, FlockOperation::NonBlockingLockShared) {
            Ok(()) => break,
            Err(Errno::INTR) => continue,
            Err(_) => return Liveness::Alive,
        }
    }
    if remove_stale && is_same_file(&file, &path) {
        let _ = fs::remove_file(&path);
    }
    Liveness::Dead
}

/// Whether `path` still names the file `file` is open on.
fn is_same_file(file: &File, path: &Path) -> bool {
    match (file.metadata(), fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

fn create_private_dir(dir: &Path) -> io::Result<()> {
    crate::statedir::ensure(dir).map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_that_are_not_plain_file_names_are_refused() {
        assert!(valid_id("lv-123-abcdef"));
        assert!(valid_id("a.b_c"));
        for bad in ["", ".", "..", "../x", "a/b", ".hidden", "a b", "a\0b"] {
            assert!(!valid_id(bad), "{bad:?}");
        }
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            OwnerLock::acquire(dir.path(), "../escape"),
            Err(OwnerError::InvalidId(_))
        ));
        assert!(!is_alive(dir.path(), "../escape"));
    }

    #[test]
    fn a_held_lock_is_alive_to_a_second_open_and_dead_after_drop() {
        let dir = tempfile::tempdir().unwrap();
        let lock = OwnerLock::acquire(dir.path(), "lv-1-aa").unwrap();
        assert_eq!(lock_files(dir.path()), vec!["lv-1-aa".to_owned()]);
        // Same process, separate open file description: the flock conflict is visible.
        assert!(is_alive(dir.path(), "lv-1-aa"));
        assert_eq!(probe(dir.path(), "lv-1-aa"), Liveness::Alive);
        let path = lock.path().to_owned();
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // A second owner of the same id is refused.
        assert!(matches!(
            OwnerLock::acquire(dir.path(), "lv-1-aa"),
            Err(OwnerError::InUse { .. })
        ));
        drop(lock);
        assert!(!path.exists());
        assert!(!is_alive(dir.path(), "lv-1-aa"));
        assert_eq!(probe(dir.path(), "lv-1-aa"), Liveness::NoLockFile);
    }

    /// Issue 19: a child forked without exec (Python's `os.fork`) must not keep its parent
    /// "alive" once the parent's own descriptor is gone.
    #[test]
    fn a_forked_child_does_not_keep_the_lock() {
        use std::os::fd::AsRawFd;
        let dir = tempfile::tempdir().unwrap();
        let lock = OwnerLock::acquire(dir.path(), "lv-1-ff").unwrap();
        // The child says when fork() has returned there (the fork handlers have run).
        let mut pipe = [0; 2];
        // SAFETY: a pipe into a two-int array.
        assert_eq!(unsafe { libc::pipe(pipe.as_mut_ptr()) }, 0);
        // SAFETY: the child only calls write and pause (async-signal-safe) until it is killed.
        let child = unsafe { libc::fork() };
        assert!(child >= 0, "fork failed");
        if child == 0 {
            unsafe { libc::write(pipe[1], b"x".as_ptr().cast(), 1) };
            loop {
                unsafe { libc::pause() };
            }
        }
        let mut byte = 0u8;
        // SAFETY: reads one byte from the pipe made above, then closes both ends.
        unsafe {
            assert_eq!(libc::read(pipe[0], (&mut byte as *mut u8).cast(), 1), 1);
            libc::close(pipe[0]);
            libc::close(pipe[1]);
        }
        assert!(is_alive(dir.path(), "lv-1-ff"), "the parent still holds it");
        // The parent "dies": its reference to the locked file goes (its descriptor now names
        // /dev/null, so the drop below closes that and leaves the lock file behind).
        let null = File::open("/dev/null").unwrap();
        // SAFETY: both descriptors are ours and open.
        unsafe { libc::dup2(null.as_raw_fd(), lock.file.as_raw_fd()) };
        drop(lock);
        let dead = probe(dir.path(), "lv-1-ff");
        // SAFETY: kills and reaps the child forked above.
        unsafe {
            libc::kill(child, libc::SIGKILL);
            libc::waitpid(child, std::ptr::null_mut(), 0);
        }
        assert_eq!(
            dead,
            Liveness::Dead,
            "the living child kept the dead parent's lock"
        );
    }

    #[test]
    fn a_stale_lock_file_is_dead_and_removed_by_is_alive_only() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join(OWNERS_DIR)).unwrap();
        let path = dir.path().join(OWNERS_DIR).join("lv-2-bb.lock");
        fs::write(&path, "123\n").unwrap();
        assert_eq!(probe(dir.path(), "lv-2-bb"), Liveness::Dead);
        assert!(path.exists(), "probe changes nothing");
        assert!(!is_alive(dir.path(), "lv-2-bb"));
        assert!(!path.exists(), "is_alive removes a stale file");
        // A stale file of the same id does not stop a new owner.
        fs::write(&path, "123\n").unwrap();
        let lock = OwnerLock::acquire(dir.path(), "lv-2-bb").unwrap();
        assert!(is_alive(dir.path(), "lv-2-bb"));
        assert!(!remove_if_stale(dir.path(), "lv-2-bb"));
        drop(lock);
    }

    #[test]
    fn probing_from_another_thread_sees_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let lock = OwnerLock::acquire(dir.path(), "lv-3-cc").unwrap();
        let state = dir.path().to_owned();
        let seen = std::thread::spawn(move || {
            // Many concurrent probers never see each other as the owner.
            let probers: Vec<_> = (0..4)
                .map(|_| {
                    let s = state.clone();
                    std::thread::spawn(move || (0..50).all(|_| is_alive(&s, "lv-3-cc")))
                })
                .collect();
            probers.into_iter().all(|p| p.join().unwrap())
        })
        .join()
        .unwrap();
        assert!(seen);
        drop(lock);
        let state = dir.path().to_owned();
        assert!(!std::thread::spawn(move || is_alive(&state, "lv-3-cc"))
            .join()
            .unwrap());
    }
}
