//! Shared test fixtures: the fake server, configs built in code, and process bookkeeping so that
//! every test can prove it left no process and no zombie behind.
#![allow(dead_code)]

pub mod fleet;
pub mod http;
pub mod llama;
pub mod serve;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

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
            self.path(&format!("{id}.pids")).display().to_string(),
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
            queue_timeout: Duration::from_secs(300),
            max_wait_for_swap: llmvisor::config::DEFAULT_MAX_WAIT_FOR_SWAP,
            preload: Vec::new(),
            body_limit: 32 * 1024 * 1024,
            shutdown_grace: Duration::from_secs(5),
            groups: BTreeMap::new(),
            models,
            http: Default::default(),
            cluster: None,
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
        // A failing test must still not leak: kill what it recorded, by pid.
        for pid in self.all_pids() {
            if procfs::is_alive(pid) {
                let _ = rustix::process::kill_process(
                    rustix::process::Pid::from_raw(pid as i32).unwrap(),
                    rustix::process::Signal::KILL,
                );
            }
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
