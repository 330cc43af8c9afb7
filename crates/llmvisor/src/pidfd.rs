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

/// A process group named through its leader's pidfd. The pidfd is taken while the leader is an
/// unreaped child of ours, so it surely names the process that made the group.
///
/// Why a group signal through it is never misdirected: with `PIDFD_SIGNAL_PROCESS_GROUP` the
/// kernel signals the processes whose group is the leader's own `struct pid`, which the pidfd
/// holds. That stays true after the leader exits and is reaped: the remaining members still
/// link to that `struct pid`, while a process that is later handed the same *number* gets a new
/// one. So the group is reached for as long as it has members, and a recycled group number is
/// never hit (checked in `tests/sweep.rs`: members are reached after the leader was reaped).
///
/// Without the flag (kernels before 6.9) or without a pidfd, the group is signalled by number
/// only while its leader is still our unreaped child (alive or a zombie): until it is reaped,
/// its pid — the group's id — cannot be handed to anyone else. Once it is reaped, nothing is
/// signalled by number. (The one window left on such kernels: the leader reaped between that
/// check and the `kill`, and its pid recycled within those microseconds.)
#[derive(Debug, Clone)]
pub struct LeaderGroup {
    pgid: u32,
    leader: Option<std::sync::Arc<OwnedFd>>,
}

impl LeaderGroup {
    /// The group led by our child `pid`. Call it before that child can have been reaped.
    pub fn of_child(pid: u32) -> Self {
        let leader = match open(pid) {
            Ok(fd) => Some(std::sync::Arc::new(fd)),
            Err(e) => {
                tracing::warn!(pid, "cannot open a pidfd for a child: {e}");
                None
            }
        };
        Self { pgid: pid, leader }
    }

    /// The group's id (its leader's pid).
    pub fn pgid(&self) -> u32 {
        self.pgid
    }

    /// Sends `sig` to every process of the group. A group that is gone is not an error.
    pub fn signal(&self, sig: Signal) {
        if let Some(fd) = &self.leader {
            match signal_group(fd, sig) {
                Ok(()) | Err(Errno::SRCH) => return,
                // No group flag: by number below, if that is still safe.
                Err(Errno::INVAL) => {}
                Err(e) => {
                    tracing::warn!(pgid = self.pgid, ?sig, "cannot signal process group: {e}");
                    return;
                }
            }
        }
        if !self.leader_unreaped() {
            return;
        }
        if let Some(pgid) = i32::try_from(self.pgid).ok().and_then(Pid::from_raw) {
            match rustix::process::kill_process_group(pgid, sig) {
                Ok(()) | Err(Errno::SRCH) => {}
                Err(e) => {
                    tracing::warn!(pgid = self.pgid, ?sig, "cannot signal process group: {e}")
                }
            }
        }
    }

    /// True while the leader is our child, not yet reaped, and still leads its group.
    fn leader_unreaped(&self) -> bool {
        crate::procfs::stat(self.pgid)
            .is_some_and(|s| s.ppid == std::process::id() && s.pgrp == self.pgid)
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader};
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};
    use std::time::Duration;

    use rustix::event::{poll, PollFd, PollFlags, Timespec};

    use super::*;

    /// True once the process `fd` names has exited (a pidfd turns readable then); waits at most
    /// `within`.
    fn exits_within(fd: &OwnedFd, within: Duration) -> bool {
        let mut fds = [PollFd::new(fd, PollFlags::IN)];
        let timeout = Timespec::try_from(within).expect("a short timeout");
        poll(&mut fds, Some(&timeout)).is_ok_and(|n| n == 1)
    }

    #[test]
    fn a_group_is_reached_through_its_leaders_pidfd_after_the_leader_was_reaped() {
        // The leader starts a member in its group, prints its pid and exits.
        let mut leader = Command::new("sh")
            .args(["-c", "sleep 300 & echo $!"])
            .process_group(0)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let group = LeaderGroup::of_child(leader.id());
        let mut line = String::new();
        BufReader::new(leader.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let member: u32 = line.trim().parse().unwrap();
        let member_fd = open(member).unwrap();
        assert_eq!(
            crate::procfs::stat(member).map(|s| s.pgrp),
            Some(group.pgid())
        );
        // Reaped: its pid no longer names anything of ours, and is never signalled by number.
        assert!(leader.wait().unwrap().success());
        assert!(!group.leader_unreaped());

        group.signal(Signal::KILL);
        let gone = exits_within(&member_fd, Duration::from_secs(10));
        if !gone {
            let _ = signal(&member_fd, Signal::KILL);
        }
        assert!(
            gone,
            "the member was not reached through the leader's pidfd"
        );
        // The member was reparented (to init or a subreaper), which reaps it.
    }
}
