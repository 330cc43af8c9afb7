//! Signals sent through pidfds. A pidfd names one process for as long as it is held, so a signal
//! sent through it never reaches a process that took over a recycled pid — unlike `kill(pid)`.

use std::os::fd::{AsRawFd, OwnedFd};

use rustix::io::Errno;
use rustix::process::{Pid, PidfdFlags, Signal};

/// `PIDFD_SIGNAL_PROCESS_GROUP` (linux/pidfd.h, Linux 6.9): deliver to the target's whole process
/// group. Not in the `libc` crate's constants everywhere yet.
const PIDFD_SIGNAL_PROCESS_GROUP: libc::c_uint = 1 << 2;

/// Opens a pidfd for `pid`. `Err(SRCH)` when there is no such process.
pub fn open(pid: u32) -> Result<OwnedFd, Errno> {
    let pid = i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .ok_or(Errno::SRCH)?;
    rustix::process::pidfd_open(pid, PidfdFlags::empty())
}

/// Sends `sig` to the process `fd` names.
pub fn signal(fd: &OwnedFd, sig: Signal) -> Result<(), Errno> {
    rustix::process::pidfd_send_signal(fd, sig)
}

/// Sends `sig` to the process group of the process `fd` names — decided by the kernel from the
/// live process, never from a group number that may have been recycled. `Err(INVAL)` on kernels
/// older than 6.9, which lack the flag.
pub fn signal_group(fd: &OwnedFd, sig: Signal) -> Result<(), Errno> {
    // SAFETY: pidfd_send_signal takes an fd we own for the duration of the call, a signal number,
    // a null siginfo (the kernel then fills in one as for kill(2)) and flags; no memory is shared.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            sig.as_raw(),
            std::ptr::null::<libc::siginfo_t>(),
            PIDFD_SIGNAL_PROCESS_GROUP,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(Errno::from_raw_os_error(
            std::io::Error::last_os_error().raw_os_error().unwrap_or(0),
        ))
    }
}
