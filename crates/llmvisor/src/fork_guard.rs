//! Owner locks are not inherited by a forked child.
//!
//! An owner lock is an `flock` on an open file description, and `fork()` shares that
//! description with the child: a child that outlives its parent (Python's `os.fork`, a
//! `multiprocessing` worker) would keep the dead parent "alive" and its leftovers unswept.
//! Close-on-exec does not help without an exec. So every owner lock's descriptor is registered
//! here, and a `pthread_atfork` child handler points each one at `/dev/null` in the child: the
//! child's copy of the lock is gone, the parent's is untouched, and the descriptor number stays
//! valid in the child (whatever closes it later closes `/dev/null`, never a file the child
//! opened since).

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Once;

/// Owner locks one process holds at once that are guarded (one per Supervisor, in practice).
const SLOTS: usize = 64;
const FREE: i32 = -1;

static FDS: [AtomicI32; SLOTS] = [const { AtomicI32::new(FREE) }; SLOTS];
static INSTALL: Once = Once::new();

/// A registered descriptor; unregistered on drop (before the descriptor is closed).
#[derive(Debug)]
pub struct Guarded(Option<usize>);

/// Registers `fd` to be pointed at `/dev/null` in forked children. With every slot taken the
/// descriptor is not guarded (logged): a child would then keep that lock.
pub fn guard(fd: RawFd) -> Guarded {
    INSTALL.call_once(|| {
        // SAFETY: registers a handler that runs in the child after fork; it makes only
        // async-signal-safe calls (open, dup2, close) on values read from atomics.
        let rc = unsafe { libc::pthread_atfork(None, None, Some(in_child)) };
        if rc != 0 {
            tracing::warn!("pthread_atfork failed ({rc}): forked children keep owner locks");
        }
    });
    for (i, slot) in FDS.iter().enumerate() {
        if slot
            .compare_exchange(FREE, fd, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            return Guarded(Some(i));
        }
    }
    tracing::warn!("more than {SLOTS} owner locks: a forked child would keep this one");
    Guarded(None)
}

impl Drop for Guarded {
    fn drop(&mut self) {
        if let Some(i) = self.0 {
            FDS[i].store(FREE, Ordering::Release);
        }
    }
}

/// In the forked child, before `fork()` returns there.
extern "C" fn in_child() {
    // SAFETY: open, dup2 and close are async-signal-safe; the path is a static C string.
    unsafe {
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
        if null < 0 {
            return;
        }
        for slot in &FDS {
            let fd = slot.load(Ordering::Acquire);
            if fd >= 0 {
                // Replaces the child's reference to the locked file; the lock stays the parent's.
                libc::dup3(null, fd, libc::O_CLOEXEC);
            }
        }
        libc::close(null);
    }
}
