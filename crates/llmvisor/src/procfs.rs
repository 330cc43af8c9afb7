//! Reading process facts from `/proc`: state, parent, group, start time.
//!
//! A process that died but was not reaped is a zombie (`Z`): it still has a pid and a group but
//! runs nothing, so every "is it alive" question here treats it as dead.

use std::fs;

/// The fields of `/proc/PID/stat` llmvisor uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    pub pid: u32,
    /// One letter: R, S, D, Z, T, …
    pub state: char,
    pub ppid: u32,
    pub pgrp: u32,
    /// Start time in clock ticks after boot: with the pid, it names one process for all time
    /// (pids are recycled, start times of one pid are not).
    pub start_time: u64,
}

impl ProcStat {
    pub fn is_zombie(&self) -> bool {
        matches!(self.state, 'Z' | 'X')
    }
}

/// Reads `/proc/PID/stat`; `None` if there is no such process.
pub fn stat(pid: u32) -> Option<ProcStat> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

fn parse_stat(text: &str) -> Option<ProcStat> {
    // The command name (field 2) is in parentheses and may itself contain spaces or ')'.
    let (head, rest) = text.rsplit_once(')')?;
    let pid = head.split_whitespace().next()?.parse().ok()?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); start_time is field 22.
    Some(ProcStat {
        pid,
        state: fields.first()?.chars().next()?,
        ppid: fields.get(1)?.parse().ok()?,
        pgrp: fields.get(2)?.parse().ok()?,
        start_time: fields.get(19)?.parse().ok()?,
    })
}

/// True if `pid` exists and is not a zombie.
pub fn is_alive(pid: u32) -> bool {
    stat(pid).is_some_and(|s| !s.is_zombie())
}

/// True if `pid` runs (not a zombie) and is the process that started at `start_time`: the pair
/// names one process for all time within a boot.
pub fn is_same_process(pid: u32, start_time: u64) -> bool {
    stat(pid).is_some_and(|s| !s.is_zombie() && s.start_time == start_time)
}

/// Every pid currently in `/proc`.
pub fn all_pids() -> Vec<u32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// Live (non-zombie) members of process group `pgid`.
pub fn live_group_members(pgid: u32) -> Vec<u32> {
    all_pids()
        .into_iter()
        .filter_map(stat)
        .filter(|s| s.pgrp == pgid && !s.is_zombie())
        .map(|s| s.pid)
        .collect()
}

/// Direct children of this process (of all its threads).
pub fn own_children() -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(tasks) = fs::read_dir("/proc/self/task") else {
        return out;
    };
    for task in tasks.flatten() {
        if let Ok(text) = fs::read_to_string(task.path().join("children")) {
            out.extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// The value of environment variable `name` in the environment `pid` was started with
/// (`/proc/PID/environ`). `None` if there is no such process, it is a zombie or a kernel thread
/// (empty environment), we may not read it, or the variable is not set.
pub fn environ_var(pid: u32, name: &str) -> Option<String> {
    let bytes = fs::read(format!("/proc/{pid}/environ")).ok()?;
    find_env_var(&bytes, name)
}

fn find_env_var(environ: &[u8], name: &str) -> Option<String> {
    environ.split(|b| *b == 0).find_map(|entry| {
        let value = entry.strip_prefix(name.as_bytes())?.strip_prefix(b"=")?;
        String::from_utf8(value.to_vec()).ok()
    })
}

/// The real and effective user ids of `pid` (the `Uid:` line of `/proc/PID/status`); `None` if
/// there is no such process.
pub fn uids(pid: u32) -> Option<(u32, u32)> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_uids(&text)
}

fn parse_uids(status: &str) -> Option<(u32, u32)> {
    let line = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
    let mut ids = line.split_whitespace().map(|f| f.parse::<u32>().ok());
    Some((ids.next()??, ids.next()??))
}

/// The command name of `pid` (`/proc/PID/comm`), e.g. `llama-server`.
pub fn comm(pid: u32) -> Option<String> {
    let text = fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    Some(text.trim_end_matches('\n').to_owned())
}

/// The id of the running boot (`/proc/sys/kernel/random/boot_id`): pids and start times are
/// only comparable within one boot.
pub fn boot_id() -> Option<String> {
    let text = fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let id = text.trim();
    (!id.is_empty()).then(|| id.to_owned())
}

/// `MemAvailable:` of `/proc/meminfo` in bytes: the RAM the kernel can give without swapping.
pub fn mem_available() -> Option<u64> {
    parse_mem_available(&fs::read_to_string("/proc/meminfo").ok()?)
}

/// `MemAvailable:` of a `/proc/meminfo` text, in bytes (the file counts kB, i.e. KiB).
pub fn parse_mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let mut words = line.split_whitespace().skip(1);
    let kb: u64 = words.next()?.parse().ok()?;
    (words.next() == Some("kB")).then(|| kb.saturating_mul(1024))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_mem_available_in_bytes() {
        let text = "MemTotal:       16318480 kB\nMemFree:          512000 kB\nMemAvailable:    8159240 kB\nBuffers:  1 kB\n";
        assert_eq!(parse_mem_available(text), Some(8_159_240 * 1024));
        assert_eq!(parse_mem_available("MemTotal: 1 kB\n"), None);
        assert_eq!(parse_mem_available("MemAvailable: lots kB\n"), None);
        assert_eq!(parse_mem_available("MemAvailable: 5 pages\n"), None);
        assert!(mem_available().is_some_and(|b| b > 0));
    }

    #[test]
    fn parses_a_name_with_spaces_and_parens() {
        let line = "4242 (my (odd) name) S 1 4242 4242 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 987654 1000 10 18446744073709551615";
        let s = parse_stat(line).unwrap();
        assert_eq!(s.pid, 4242);
        assert_eq!(s.state, 'S');
        assert_eq!(s.ppid, 1);
        assert_eq!(s.pgrp, 4242);
        assert_eq!(s.start_time, 987654);
    }

    #[test]
    fn parses_the_uid_line() {
        let status = "Name:\tsleep\nUmask:\t0022\nUid:\t1000\t1001\t1000\t1000\nGid:\t5\t5\t5\t5\n";
        assert_eq!(parse_uids(status), Some((1000, 1001)));
        assert_eq!(parse_uids("Name:\tx\n"), None);
        let me = rustix::process::geteuid().as_raw();
        assert_eq!(uids(std::process::id()).map(|u| u.1), Some(me));
    }

    #[test]
    fn own_process_is_alive_and_has_a_start_time() {
        let me = std::process::id();
        let s = stat(me).unwrap();
        assert!(is_alive(me));
        assert!(s.start_time > 0);
        assert!(stat(u32::MAX - 1).is_none());
    }

    #[test]
    fn finds_a_variable_in_an_environ_block() {
        let env = b"A=1\0LLMVISOR_INSTANCE=lv-1-ab\0LLMVISOR_INSTANCEX=no\0B=\0";
        assert_eq!(
            find_env_var(env, "LLMVISOR_INSTANCE").as_deref(),
            Some("lv-1-ab")
        );
        assert_eq!(find_env_var(env, "B").as_deref(), Some(""));
        assert_eq!(find_env_var(env, "LLMVISOR_INSTANC"), None);
        assert_eq!(find_env_var(b"", "A"), None);
    }

    #[test]
    fn reads_own_environment_comm_and_boot_id() {
        let me = std::process::id();
        // PATH is set for every test run; our environ is the one we were started with.
        if let Ok(path) = std::env::var("PATH") {
            assert_eq!(environ_var(me, "PATH"), Some(path));
        }
        assert!(comm(me).is_some_and(|c| !c.is_empty() && !c.ends_with('\n')));
        let boot = boot_id().unwrap();
        assert_eq!(boot.len(), 36, "{boot}");
        assert_eq!(boot_id().unwrap(), boot);
    }
}
