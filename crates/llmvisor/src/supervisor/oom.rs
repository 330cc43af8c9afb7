//! Telling a server the kernel's OOM killer ended from one killed otherwise.
//!
//! The OOM killer sends SIGKILL. A server that dies of SIGKILL while no stop of ours runs (our
//! stops are SIGTERM, then SIGKILL only from the stop task, which owns that exit) was killed by
//! someone else. Whether that someone was the OOM killer, cgroup v2 says: `oom_kill` in
//! `memory.events` of llmvisor's own cgroup (`/proc/self/cgroup` → `/sys/fs/cgroup/<path>/`)
//! counts the processes of that cgroup and below killed by any OOM killer, the system-wide one
//! included. The count is read when a server starts and again when it dies: a rise means OOM.
//! Under cgroup v1 the memory controller's `memory.oom_control` has the same `oom_kill` line
//! (Linux 4.13+), read when there is no v2 file. Where neither can be read (no memory
//! controller, a container without the files), a SIGKILL we did not send keeps its usual
//! `last_exit` with a hint.

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::Arc;

/// `last_exit` of a server the OOM killer ended.
pub const OOM_EXIT: &str = "oom";

/// Added to why a server died of a SIGKILL we did not send, when the OOM count is unreadable.
pub const OOM_HINT: &str = "SIGKILL by the kernel? (out of memory)";

const SIGKILL: i32 = 9;

/// Where the OOM-kill count comes from.
#[derive(Clone)]
pub struct OomCounter {
    read: Arc<dyn Fn() -> Option<u64> + Send + Sync>,
}

impl std::fmt::Debug for OomCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OomCounter")
    }
}

impl OomCounter {
    /// `oom_kill` of this process's cgroup (v2 `memory.events`, else v1 `memory.oom_control`);
    /// unreadable → `None` each time.
    pub fn own_cgroup() -> Self {
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let file = counter_files(&own, std::path::Path::new("/sys/fs/cgroup"))
            .into_iter()
            .find(|f| std::fs::read_to_string(f).is_ok_and(|t| oom_kills(&t).is_some()));
        if file.is_none() {
            tracing::debug!(
                "no readable oom_kill count of our cgroup: OOM kills are guessed, not counted"
            );
        }
        Self::from_fn(move || {
            let text = std::fs::read_to_string(file.as_ref()?).ok()?;
            oom_kills(&text)
        })
    }

    /// A count read by `read` (tests).
    pub fn from_fn(read: impl Fn() -> Option<u64> + Send + Sync + 'static) -> Self {
        Self {
            read: Arc::new(read),
        }
    }

    /// The count now; `None` when unreadable.
    pub fn read(&self) -> Option<u64> {
        (self.read)()
    }
}

/// How a server that ended by itself was ended, as far as OOM goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// SIGKILL and the cgroup's OOM-kill count rose while it ran.
    Oom,
    /// SIGKILL we did not send, and no count to ask.
    MaybeOom,
    /// Anything else: another signal or exit code, or a SIGKILL the OOM count does not explain.
    NotOom,
}

/// Judges an exit not caused by us: `before` and `after` are the OOM-kill counts at the start
/// and at the death.
pub fn judge(status: ExitStatus, before: Option<u64>, after: Option<u64>) -> Verdict {
    if status.signal() != Some(SIGKILL) {
        return Verdict::NotOom;
    }
    match (before, after) {
        (Some(b), Some(a)) if a > b => Verdict::Oom,
        (Some(_), Some(_)) => Verdict::NotOom,
        _ => Verdict::MaybeOom,
    }
}

/// The files that may count OOM kills of the cgroup a `/proc/PID/cgroup` text names, under
/// the cgroup mount `root`, in order of preference: v2's `memory.events`, v1's
/// `memory/…/memory.oom_control`.
pub fn counter_files(own_cgroup: &str, root: &std::path::Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    if let Some(p) = cgroup_v2_path(own_cgroup) {
        files.push(root.join(p.trim_start_matches('/')).join("memory.events"));
    }
    let v1 = own_cgroup.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        controllers
            .split(',')
            .any(|c| c == "memory")
            .then_some(path)
    });
    if let Some(p) = v1 {
        files.push(
            root.join("memory")
                .join(p.trim_start_matches('/'))
                .join("memory.oom_control"),
        );
    }
    files
}

/// The cgroup v2 path of a `/proc/PID/cgroup` text (its `0::/path` line).
pub fn cgroup_v2_path(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim().to_owned())
}

/// `oom_kill N` of a `memory.events` text.
pub fn oom_kills(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|n| n.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signal(sig: i32) -> ExitStatus {
        ExitStatus::from_raw(sig)
    }

    fn code(c: i32) -> ExitStatus {
        ExitStatus::from_raw(c << 8)
    }

    #[test]
    fn a_sigkill_is_oom_when_the_count_rose() {
        assert_eq!(judge(signal(9), Some(2), Some(3)), Verdict::Oom);
        assert_eq!(judge(signal(9), Some(2), Some(2)), Verdict::NotOom);
        assert_eq!(judge(signal(9), None, Some(2)), Verdict::MaybeOom);
        assert_eq!(judge(signal(9), None, None), Verdict::MaybeOom);
        // Not a SIGKILL: never OOM, whatever the count did.
        assert_eq!(judge(signal(11), Some(0), Some(1)), Verdict::NotOom);
        assert_eq!(judge(code(137), Some(0), Some(1)), Verdict::NotOom);
        assert_eq!(judge(code(0), None, None), Verdict::NotOom);
    }

    #[test]
    fn reads_the_cgroup_files() {
        let own = "12:cpu:/legacy\n0::/user.slice/user-1000.slice/session-3.scope\n";
        assert_eq!(
            cgroup_v2_path(own).as_deref(),
            Some("/user.slice/user-1000.slice/session-3.scope")
        );
        assert_eq!(cgroup_v2_path("4:memory:/docker/abc\n"), None);
        assert_eq!(cgroup_v2_path("0::/\n").as_deref(), Some("/"));
        let v1 = "4:memory:/process_api/abc\n1:cpu:/\n0::/\n";
        let root = std::path::Path::new("/sys/fs/cgroup");
        assert_eq!(
            counter_files(v1, root),
            [
                PathBuf::from("/sys/fs/cgroup/memory.events"),
                PathBuf::from("/sys/fs/cgroup/memory/process_api/abc/memory.oom_control"),
            ]
        );
        assert_eq!(
            counter_files("0::/a.slice\n", root),
            [PathBuf::from("/sys/fs/cgroup/a.slice/memory.events")]
        );
        assert!(counter_files("", root).is_empty());
        let oom_control = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        assert_eq!(oom_kills(oom_control), Some(3));
        let events = "low 0\nhigh 0\nmax 4\noom 2\noom_kill 1\noom_group_kill 0\n";
        assert_eq!(oom_kills(events), Some(1));
        assert_eq!(oom_kills("low 0\noom 2\n"), None);
        assert_eq!(oom_kills("oom_kill x\n"), None);
        // This machine's own: a number or unreadable, never a panic.
        let _ = OomCounter::own_cgroup().read();
        let fixed = OomCounter::from_fn(|| Some(7));
        assert_eq!(fixed.read(), Some(7));
    }
}
