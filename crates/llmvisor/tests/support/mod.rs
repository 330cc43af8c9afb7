//! Shared test fixtures: the fake server, configs built in code, and process bookkeeping so that
//! every test can prove it left no process and no zombie behind.
#![allow(dead_code)]

pub mod fleet;
pub mod http;
pub mod llama;
pub mod serve;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use llmvisor::config::{Config, ModelConfig};
use llmvisor::procfs;

/// The fake-llm binary, built by `cargo test --workspace` next to this test binary.
pub fn fake_llm() -> PathBuf {
    if let Ok(p) = std::env::var("FAKE_LLM_BIN") {
        return p.into();
    }
    // target/<profile>/deps/<test-binary> → target/<profile>/fake-llm
    let exe = std::env::current_exe().unwrap();
    let path = exe
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("fake-llm");
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo test --workspace` (or `cargo build -p fake-llm` first)",
        path.display()
    );
    path
}

/// One test's scratch space: a state dir and pid files the fake servers append to.
pub struct Scratch {
    root: PathBuf,
    _owned: Option<tempfile::TempDir>,
    pub ports: (u16, u16),
}

impl Scratch {
    pub fn new() -> Self {
        let tmp = tempfile::Builder::new()
            .prefix("llmvisor-test")
            .tempdir()
            .unwrap();
        Self {
            root: tmp.path().to_owned(),
            _owned: Some(tmp),
            ports: port_range(),
        }
    }

    /// A scratch in an existing directory (owned by another process of the test).
    pub fn at(root: PathBuf) -> Self {
        Self {
            root,
            _owned: None,
            ports: port_range(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    pub fn state_dir(&self) -> PathBuf {
        self.path("state")
    }

    /// Pids appended to the pid file `name` (one line each).
    pub fn pids(&self, name: &str) -> Vec<u32> {
        std::fs::read_to_string(self.path(name))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// Every pid in every `*.pids` file of this scratch dir.
    pub fn all_pids(&self) -> Vec<u32> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.root).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.ends_with(".pids") {
                out.extend(self.pids(&name));
            }
        }
        out
    }

    /// A fake-llm model config: `--pid-file <id>.pids` plus `extra` flags.
    pub fn model(&self, id: &str, extra: &[&str]) -> ModelConfig {
        let mut cmd = vec![
            fake_llm().display().to_string(),
            "--port".into(),
            "${PORT}".into(),
            "--pid-file".into(),
            // An id may hold `/` (`org/name`): one file per id all the same.
            self.path(&format!("{}.pids", llmvisor::ids::encode_segment(id)))
                .display()
                .to_string(),
        ];
        cmd.extend(extra.iter().map(|s| s.to_string()));
        let mut m = ModelConfig::new(id, cmd);
        m.ttl = Some(Duration::from_secs(600));
        m.startup_timeout = Duration::from_secs(20);
        m.stop_timeout = Duration::from_secs(2);
        m
    }

    pub fn config(&self, models: Vec<ModelConfig>) -> Config {
        Config {
            source: None,
            listen: "127.0.0.1:0".parse().unwrap(),
            state_dir: self.state_dir(),
            port_range: self.ports,
            api_keys: Vec::new(),
            admin_keys: Vec::new(),
            allow_insecure: false,
            max_loaded: None,
            memory_budget: None,
            budgets: Default::default(),
            kv_disk_budget: llmvisor::config::DEFAULT_KV_DISK_BUDGET,
            queue_timeout: Duration::from_secs(300),
            max_wait_for_swap: llmvisor::config::DEFAULT_MAX_WAIT_FOR_SWAP,
            preload: Vec::new(),
            body_limit: 32 * 1024 * 1024,
            shutdown_grace: Duration::from_secs(5),
            groups: BTreeMap::new(),
            models,
            http: Default::default(),
            cluster: None,
            // Tests see only the models they configure, not this machine's.
            discovery: llmvisor::discover::Settings {
                stores: Vec::new(),
                ..Default::default()
            },
        }
    }

    /// Writes `llmvisor.toml` with this scratch's state dir and ports and one fake-llm model per
    /// `(id, extra flags)` (each with `--pid-file <id>.pids`), plus `extra_toml` per model.
    pub fn write_config(&self, models: &[(&str, &str)], extra_toml: &str) -> PathBuf {
        let mut text = format!(
            "state_dir = {:?}\nport_range = [{}, {}]\n",
            self.state_dir().display().to_string(),
            self.ports.0,
            self.ports.1
        );
        for (id, extra) in models {
            let pids = self.path(&format!("{id}.pids")).display().to_string();
            text.push_str(&format!(
                "[models.{id}]\ncmd = \"{} --port ${{PORT}} --pid-file {pids} {extra}\"\n{extra_toml}\n",
                fake_llm().display()
            ));
        }
        let path = self.path("llmvisor.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Asserts that no process recorded in this scratch dir is alive, waiting up to `within`,
    /// and reaps any that are zombie children of this test process.
    pub async fn assert_all_gone(&self, within: Duration) {
        assert_gone(&self.all_pids(), within).await;
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // A failing test must still not leak: kill what it recorded, by pid, and reap those that
        // are (or, once their parent is gone, become) zombie children of ours.
        // A recorded pid is signalled only while it is still a process of this kind (a server
        // llmvisor started, or a process named with this scratch dir): a recycled pid is left.
        let root = self.root.as_os_str().as_encoded_bytes().to_vec();
        let ours = |pid: u32| {
            procfs::environ_var(pid, "LLMVISOR_INSTANCE").is_some()
                || std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| c.windows(root.len()).any(|w| w == root.as_slice()))
                || procfs::stat(pid).is_some_and(|s| s.is_zombie())
        };
        let mut procs = Procs::default();
        for pid in self.all_pids() {
            if ours(pid) {
                procs.adopt_if_present(pid);
            }
        }
        let left = procs.kill_and_reap();
        if !left.is_empty() {
            eprintln!("recorded processes did not go away after SIGKILL: {left:?}");
        }
    }
}

/// Processes a test started or learned of: killed (SIGKILL, by pid) and reaped when this drops,
/// so a test that fails half-way (a panicking assert or unwrap) leaves none of them behind.
///
/// `children` are held as [`Child`] and killed and waited for through it. Adopted pids (a
/// grandchild, a child the test keeps its own handle to, one handed over to code under test) are
/// killed only while they are still the process that had the pid when adopted (same start time),
/// and reaped once they are zombie children of ours — directly, or as the child subreaper after
/// their parent died. Everything is killed before anything is reaped, so a member whose parent is
/// also here gets reparented to us instead of being waited for in vain.
///
/// Group leaders (a held child running in a group of its own, or a pid given to
/// [`Self::adopt_group`]) bring their group: whatever is in it at drop time, known to the test or
/// not, is killed and reaped too — signalled and looked up only while the leader is still there
/// (unreaped), so the group id cannot have been recycled.
#[derive(Default)]
pub struct Procs {
    pub children: Vec<Child>,
    others: Vec<Adopted>,
}

#[derive(Clone, Copy)]
struct Adopted {
    pid: u32,
    start: u64,
    leads_group: bool,
}

impl Procs {
    /// Spawns `cmd` (stdio on /dev/null) as a held child and waits until it has exec'd: until
    /// then /proc shows the test's own name and environment, not the program's.
    pub fn spawn(&mut self, mut cmd: Command) -> u32 {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let own = procfs::comm(std::process::id());
        let child = cmd.spawn().unwrap();
        let pid = child.id();
        self.children.push(child);
        let deadline = Instant::now() + Duration::from_secs(5);
        while procfs::comm(pid) == own {
            assert!(Instant::now() < deadline, "pid {pid} never exec'd");
            std::thread::sleep(Duration::from_millis(1));
        }
        pid
    }

    /// Kills and reaps `pid` when this drops. Call it while `pid` surely names the process meant:
    /// an unreaped child of ours, or one just seen alive.
    pub fn adopt(&mut self, pid: u32) {
        assert!(
            self.adopt_if_present(pid),
            "adopted process {pid} is running"
        );
    }

    /// [`Self::adopt`] for the leader of a process group: its group goes with it.
    pub fn adopt_group(&mut self, leader: u32) {
        self.adopt(leader);
        self.others.last_mut().unwrap().leads_group = true;
    }

    /// [`Self::adopt`] if `pid` exists (alive or a zombie); false if it does not.
    pub fn adopt_if_present(&mut self, pid: u32) -> bool {
        let Some(s) = procfs::stat(pid) else {
            return false;
        };
        self.others.push(Adopted {
            pid,
            start: s.start_time,
            leads_group: false,
        });
        true
    }

    /// SIGKILL to everything (by pid, and to the groups of leaders as above), then waits
    /// (bounded) until each is reaped — by us when it is a zombie child of ours, else by its
    /// parent. Returns the pids still there after that.
    pub fn kill_and_reap(&mut self) -> Vec<u32> {
        self.kill_groups();
        for c in &mut self.children {
            let _ = c.kill(); // by pid: std's Child::kill signals exactly this unreaped child
        }
        for a in &self.others {
            if procfs::is_same_process(a.pid, a.start) {
                let _ = rustix::process::kill_process(
                    rustix::process::Pid::from_raw(a.pid as i32).unwrap(),
                    rustix::process::Signal::KILL,
                );
            }
        }
        for mut c in self.children.drain(..) {
            let _ = c.wait();
        }
        let me = std::process::id();
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut left = std::mem::take(&mut self.others);
        loop {
            left.retain(|a| match procfs::stat(a.pid) {
                None => false,
                Some(s) if s.start_time != a.start => false,
                Some(s) if s.is_zombie() && s.ppid == me => {
                    let _ = rustix::process::waitpid(
                        rustix::process::Pid::from_raw(a.pid as i32),
                        rustix::process::WaitOptions::NOHANG,
                    );
                    // Still there: a multi-threaded process may need another pass.
                    procfs::stat(a.pid).is_some_and(|s| s.start_time == a.start)
                }
                Some(_) => true,
            });
            if left.is_empty() || Instant::now() >= deadline {
                return left.into_iter().map(|a| a.pid).collect();
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// SIGKILL to the groups led by held children that are still running and by leaders adopted
    /// with [`Self::adopt_group`] that are still there (alive or unreaped), then adopts their
    /// members for reaping. While its leader is unreaped a group id cannot be recycled, and one
    /// group signal also reaches a member forked a moment ago.
    fn kill_groups(&mut self) {
        let mut leaders: Vec<u32> = self
            .children
            .iter_mut()
            .filter_map(|c| matches!(c.try_wait(), Ok(None)).then(|| c.id()))
            .collect();
        leaders.extend(
            self.others
                .iter()
                .filter(|a| {
                    a.leads_group && procfs::stat(a.pid).is_some_and(|s| s.start_time == a.start)
                })
                .map(|a| a.pid),
        );
        leaders.retain(|&pid| procfs::stat(pid).is_some_and(|s| s.pgrp == pid));
        if leaders.is_empty() {
            return;
        }
        for &pgid in &leaders {
            let _ = rustix::process::kill_process_group(
                rustix::process::Pid::from_raw(pgid as i32).unwrap(),
                rustix::process::Signal::KILL,
            );
        }
        for s in procfs::all_pids().into_iter().filter_map(procfs::stat) {
            if s.pid != s.pgrp
                && leaders.contains(&s.pgrp)
                && !self.others.iter().any(|a| a.pid == s.pid)
            {
                self.others.push(Adopted {
                    pid: s.pid,
                    start: s.start_time,
                    leads_group: false,
                });
            }
        }
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        let left = self.kill_and_reap();
        if left.is_empty() {
            return;
        }
        if std::thread::panicking() {
            eprintln!("processes did not go away after SIGKILL: {left:?}");
        } else {
            panic!("processes did not go away after SIGKILL: {left:?}");
        }
    }
}

/// Each scratch gets its own slice of ports (test binary by pid, test by counter), so tests that
/// count spawns are not disturbed by another test's server taking "their" port.
fn port_range() -> (u16, u16) {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let slot = NEXT.fetch_add(1, Ordering::Relaxed) % 40;
    let base = 20000 + (std::process::id() % 10) as u16 * 2000 + slot * 50;
    (base, base + 49)
}

/// Waits until none of `pids` is alive (zombies count as dead), failing after `within`.
pub async fn assert_gone(pids: &[u32], within: Duration) {
    let deadline = std::time::Instant::now() + within;
    loop {
        let alive: Vec<u32> = pids
            .iter()
            .copied()
            .filter(|p| procfs::is_alive(*p))
            .collect();
        if alive.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "processes still alive after {within:?}: {alive:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    reap_zombie_children(pids);
}

/// Reaps those of `pids` that are zombie children of this process (reparented to us as the
/// subreaper), so no `<defunct>` entry outlives the test.
pub fn reap_zombie_children(pids: &[u32]) {
    let me = std::process::id();
    for &pid in pids {
        if let Some(s) = procfs::stat(pid) {
            if s.is_zombie() && s.ppid == me {
                let _ = rustix::process::waitpid(
                    rustix::process::Pid::from_raw(pid as i32),
                    rustix::process::WaitOptions::NOHANG,
                );
            }
        }
    }
}

/// Asserts that no zombie child of this process is among `pids`.
pub fn assert_no_zombies(pids: &[u32]) {
    for &pid in pids {
        if let Some(s) = procfs::stat(pid) {
            assert!(!s.is_zombie(), "pid {pid} is a zombie (parent {})", s.ppid);
        }
    }
}
