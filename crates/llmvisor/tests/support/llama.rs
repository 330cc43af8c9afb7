//! Fixtures for the end-to-end tests on a real `llama-server` (tests/e2e_llama.rs): where the
//! server, model and `openai` venv are, a `llmvisor serve` child configured for them, and a
//! `/proc` census of the llama-servers that belong to one test (and to no one else).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use llmvisor::procfs;
use rustix::process::{Pid, Signal};

use super::http::{request, Resp};
use super::Scratch;

const BIN: &str = env!("CARGO_BIN_EXE_llmvisor");

/// Environment variable every model of a test's config carries, valued with the test's scratch
/// dir: with `LLMVISOR_INSTANCE` it proves that a process is a server of *this* test.
pub const MARK: &str = "LLMVISOR_E2E_SCRATCH";
/// Environment variable valued `${MODEL_ID}`: which model a server process was started for.
pub const MARK_MODEL: &str = "LLMVISOR_E2E_MODEL";

/// What scripts/setup-llama.sh provides.
#[derive(Debug, Clone)]
pub struct LlamaEnv {
    pub server: PathBuf,
    pub model: PathBuf,
    pub venv: PathBuf,
}

impl LlamaEnv {
    /// The real llama-server, model and venv, or `None` (after saying so) when they are not
    /// configured. In CI (`CI` set) their absence is a failure: CI must run these tests.
    pub fn get() -> Option<LlamaEnv> {
        let vars = ["LLAMA_SERVER", "LLAMA_MODEL", "LLAMA_VENV"];
        let missing: Vec<&str> = vars
            .iter()
            .copied()
            .filter(|v| std::env::var_os(v).is_none_or(|s| s.is_empty()))
            .collect();
        if !missing.is_empty() {
            if std::env::var_os("CI").is_some() {
                panic!(
                    "{} not set, but CI is: the end-to-end tests on a real llama-server must run \
                     in CI (run them through scripts/test.sh, which sets LLAMA_SERVER, \
                     LLAMA_MODEL and LLAMA_VENV from scripts/setup-llama.sh)",
                    missing.join(", ")
                );
            }
            eprintln!("skipping: {} not set (run scripts/test.sh)", missing[0]);
            return None;
        }
        let get = |v: &str| PathBuf::from(std::env::var_os(v).unwrap());
        let env = LlamaEnv {
            server: get("LLAMA_SERVER"),
            model: get("LLAMA_MODEL"),
            venv: get("LLAMA_VENV"),
        };
        // Set but wrong is a broken setup, never a reason to skip.
        assert!(
            env.server.is_file(),
            "LLAMA_SERVER={} is not a file",
            env.server.display()
        );
        assert!(
            env.model.is_file(),
            "LLAMA_MODEL={} is not a file",
            env.model.display()
        );
        assert!(
            env.python().is_file(),
            "LLAMA_VENV={} has no bin/python",
            env.venv.display()
        );
        Some(env)
    }

    pub fn python(&self) -> PathBuf {
        self.venv.join("bin").join("python")
    }
}

/// How a model of the test config is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// `--host 127.0.0.1 --port ${PORT}`
    Tcp,
    /// `--host ${SOCKET}`: a unix socket, no port.
    Socket,
}

/// A TOML string (JSON's escapes are a subset of TOML's basic-string escapes).
fn toml_str(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

/// A config for `llmvisor serve` with one real llama-server model per `(id, transport)`, small
/// enough for a 2-core machine (1024 context, one thread, one slot).
pub fn config(s: &Scratch, env: &LlamaEnv, models: &[(&str, Transport)]) -> String {
    let mut out = format!(
        "listen = \"127.0.0.1:0\"\nstate_dir = {}\nport_range = [{}, {}]\n\n\
         [defaults]\nstartup_timeout = \"60s\"\nstop_timeout = \"5s\"\nttl = \"10m\"\n",
        toml_str(&s.state_dir().display().to_string()),
        s.ports.0,
        s.ports.1,
    );
    for (id, transport) in models {
        let mut cmd = vec![
            env.server.display().to_string(),
            "-m".into(),
            env.model.display().to_string(),
        ];
        match transport {
            Transport::Tcp => cmd.extend(
                ["--host", "127.0.0.1", "--port", "${PORT}"]
                    .iter()
                    .map(|s| s.to_string()),
            ),
            Transport::Socket => cmd.extend(["--host", "${SOCKET}"].iter().map(|s| s.to_string())),
        }
        cmd.extend(
            ["-c", "1024", "-t", "1", "-np", "1"]
                .iter()
                .map(|s| s.to_string()),
        );
        let cmd: Vec<String> = cmd.iter().map(|a| toml_str(a)).collect();
        out.push_str(&format!(
            "\n[models.{}]\ncmd = [{}]\nenv = {{ {MARK} = {}, {MARK_MODEL} = \"${{MODEL_ID}}\" }}\n",
            toml_str(id),
            cmd.join(", "),
            toml_str(&s.root().display().to_string()),
        ));
    }
    out
}

/// One llama-server process of a test, as `/proc` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    pub pid: u32,
    /// The model it was started for (its `LLMVISOR_E2E_MODEL`).
    pub model: String,
    pub cmdline: Vec<String>,
}

fn cmdline(pid: u32) -> Option<Vec<String>> {
    let bytes = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        bytes
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect(),
    )
}

/// Live (non-zombie) processes started by some llmvisor (`LLMVISOR_INSTANCE` in their
/// environment) for the test whose scratch dir is `root` (the [`MARK`] variable, or `root` on
/// the command line): another test's or another user's servers are never counted.
pub fn servers_of(root: &Path) -> Vec<Server> {
    let root_s = root.display().to_string();
    let mut out = Vec::new();
    for pid in procfs::all_pids() {
        if !procfs::is_alive(pid) || procfs::environ_var(pid, "LLMVISOR_INSTANCE").is_none() {
            continue;
        }
        let args = cmdline(pid).unwrap_or_default();
        let marked = procfs::environ_var(pid, MARK).as_deref() == Some(root_s.as_str());
        if !marked && !args.iter().any(|a| a.contains(&root_s)) {
            continue;
        }
        out.push(Server {
            pid,
            model: procfs::environ_var(pid, MARK_MODEL).unwrap_or_default(),
            cmdline: args,
        });
    }
    out.sort_by_key(|s| s.pid);
    out
}

/// SIGKILL by pid (errors ignored: it may be gone already).
pub fn kill_pid(pid: u32) {
    if let Some(p) = Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(p, Signal::KILL);
    }
}

/// `llmvisor serve --config FILE` as a child of the test, on an address it chose itself.
///
/// Dropping it without [`Serve::shutdown`] (a failing test) kills the daemon and then every
/// llama-server of this test, by pid, and prints the daemon's log.
pub struct Serve {
    child: Child,
    pub url: String,
    pub config: PathBuf,
    root: PathBuf,
    log: Arc<Mutex<Vec<String>>>,
    /// Every server pid the test saw (see [`Serve::servers`]): checked to be gone at the end.
    seen: Mutex<Vec<u32>>,
}

impl Serve {
    /// Writes `config_text` into the scratch dir and starts the daemon on it; returns once its
    /// `/healthz` answers 200.
    pub async fn start(s: &Scratch, config_text: &str) -> Serve {
        Self::start_with(s, config_text, &[]).await
    }

    /// [`Serve::start`] with `env` set for the daemon (a test's own `HOME` for discovery).
    pub async fn start_with(s: &Scratch, config_text: &str, env: &[(&str, &Path)]) -> Serve {
        let config = s.path("llmvisor.toml");
        std::fs::write(&config, config_text).unwrap();
        let mut child = Command::new(BIN)
            .args(["serve", "--config", config.to_str().unwrap()])
            .envs(env.iter().map(|(k, v)| (*k, *v)))
            .env("RUST_LOG", "info")
            .env_remove("LLMVISOR_URL")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start llmvisor serve");
        // Keep draining stderr (so the daemon never blocks on a full pipe) and keep every line
        // for the failure report.
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let pipe = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
        });
        let mut serve = Serve {
            child,
            url: String::new(),
            config,
            root: s.root().to_owned(),
            log,
            seen: Mutex::new(Vec::new()),
        };
        // `listen = "127.0.0.1:0"`: the daemon logs the address it got.
        let deadline = Instant::now() + Duration::from_secs(15);
        serve.url = loop {
            if let Some(status) = serve.child.try_wait().unwrap() {
                panic!(
                    "llmvisor serve exited with {status} at startup:\n{}",
                    serve.log_text()
                );
            }
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(line) => {
                    if let Some((_, rest)) = line.split_once("listening on http://") {
                        let addr = rest.split_whitespace().next().unwrap();
                        break format!("http://{addr}");
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(_) => panic!("llmvisor serve closed its stderr:\n{}", serve.log_text()),
            }
            assert!(
                Instant::now() < deadline,
                "llmvisor serve never logged its address:\n{}",
                serve.log_text()
            );
        };
        loop {
            let r = tokio::time::timeout(
                Duration::from_secs(2),
                request("GET", &format!("{}/healthz", serve.url), &[], ""),
            )
            .await;
            if matches!(r, Ok(ref r) if r.status == 200) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "/healthz never answered 200:\n{}",
                serve.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        serve
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// `METHOD path` with a JSON body (or none), failing after `within`.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        within: Duration,
    ) -> Resp {
        let url = format!("{}{path}", self.url);
        let headers: &[(&str, &str)] = if body.is_some() {
            &[("content-type", "application/json")]
        } else {
            &[]
        };
        let body = body.unwrap_or("").to_owned();
        match tokio::time::timeout(within, request(method, &url, headers, body)).await {
            Ok(r) => r,
            Err(_) => panic!(
                "{method} {path} got no answer within {within:?}\ndaemon log:\n{}",
                self.log_text()
            ),
        }
    }

    pub async fn get(&self, path: &str) -> Resp {
        self.call("GET", path, None, Duration::from_secs(10)).await
    }

    pub async fn post(&self, path: &str, body: &str) -> Resp {
        self.call("POST", path, Some(body), Duration::from_secs(60))
            .await
    }

    /// `GET /api/models/{id}` as JSON.
    pub async fn model(&self, id: &str) -> serde_json::Value {
        let r = self.get(&format!("/api/models/{id}")).await;
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()
    }

    /// `POST /api/models/{id}/load`, asserting it answered 200 with a ready model with a pid.
    pub async fn load(&self, id: &str) -> serde_json::Value {
        let r = self.post(&format!("/api/models/{id}/load"), "").await;
        assert_eq!(
            r.status,
            200,
            "load {id}: {}\ndaemon log:\n{}",
            r.text(),
            self.log_text()
        );
        let m = r.json();
        assert_eq!(m["state"], "ready", "{m}");
        assert!(m["pid"].is_u64(), "a ready model has a pid: {m}");
        m
    }

    /// The llama-servers of this test now alive (remembered for the end-of-test check).
    pub fn servers(&self) -> Vec<Server> {
        let now = servers_of(&self.root);
        let mut seen = self.seen.lock().unwrap();
        for s in &now {
            if !seen.contains(&s.pid) {
                seen.push(s.pid);
            }
        }
        now
    }

    /// Every server pid [`Serve::servers`] has seen so far.
    pub fn seen(&self) -> Vec<u32> {
        self.seen.lock().unwrap().clone()
    }

    /// SIGKILL of the daemon (by pid); returns once it is reaped.
    pub fn kill9(&mut self) {
        kill_pid(self.pid());
        self.child.wait().unwrap();
    }

    /// The clean end of a test: SIGTERM, exit 0 within `stop_timeout` + grace, and then no
    /// llama-server of this test alive (nor any it saw earlier), and none a zombie of ours.
    pub async fn shutdown(mut self) {
        self.servers();
        let pid = Pid::from_raw(self.pid() as i32).unwrap();
        rustix::process::kill_process(pid, Signal::TERM).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "llmvisor did not exit within 20 s of SIGTERM:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(
            status.success(),
            "llmvisor exited with {status} on SIGTERM:\n{}",
            self.log_text()
        );
        // Its servers were stopped before it exited.
        let left = servers_of(&self.root);
        assert!(
            left.is_empty(),
            "servers left after a clean exit: {left:?}\n{}",
            self.log_text()
        );
        let seen = self.seen();
        super::assert_gone(&seen, Duration::from_millis(100)).await;
        super::assert_no_zombies(&seen);
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            kill_pid(self.pid());
            let _ = self.child.wait();
        }
        // Whatever of ours is still alive (a failing test): kill it by pid, reap our zombies.
        let mut pids = self.seen();
        pids.extend(servers_of(&self.root).into_iter().map(|s| s.pid));
        for &pid in &pids {
            if procfs::is_alive(pid)
                && procfs::environ_var(pid, MARK).as_deref()
                    == Some(self.root.display().to_string().as_str())
            {
                kill_pid(pid);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while !reap_pass(&pids).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if std::thread::panicking() {
            let log = self.log_text();
            let tail: Vec<&str> = log.lines().rev().take(80).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            eprintln!(
                "---- llmvisor serve log (last lines) ----\n{}",
                tail.join("\n")
            );
        }
    }
}

/// Runs `program args` with extra environment, failing if it does not end within `within`
/// (it is then killed by pid). Returns (exit status, stdout, stderr).
pub fn run_with_timeout(
    cmd: &mut Command,
    within: Duration,
) -> (std::process::ExitStatus, String, String) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let read = |pipe: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let mut pipe = pipe;
            let _ = std::io::Read::read_to_string(&mut pipe, &mut s);
            s
        })
    };
    let out = read(Box::new(child.stdout.take().unwrap()));
    let err = read(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + within;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill(); // by pid
            let _ = child.wait();
            panic!(
                "{:?} did not end within {within:?}; stderr:\n{}",
                cmd.get_program(),
                err.join().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (status, out.join().unwrap(), err.join().unwrap())
}

/// Inodes of the sockets `pid` holds open (`/proc/PID/fd/* -> socket:[N]`).
pub fn socket_inodes(pid: u32) -> Vec<u64> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return out;
    };
    for e in dir.flatten() {
        if let Ok(target) = std::fs::read_link(e.path()) {
            let t = target.to_string_lossy();
            if let Some(n) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
                if let Ok(n) = n.parse() {
                    out.push(n);
                }
            }
        }
    }
    out
}

/// `(local address, inode)` of every listening TCP socket (IPv4 and IPv6) of this net namespace.
pub fn tcp_listeners() -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode
            if f.len() > 9 && f[3] == "0A" {
                if let Ok(inode) = f[9].parse() {
                    out.push((f[1].to_owned(), inode));
                }
            }
        }
    }
    out
}

/// `(path, inode)` of every bound unix socket with a path (`/proc/net/unix`).
pub fn unix_sockets() -> Vec<(String, u64)> {
    let Ok(text) = std::fs::read_to_string("/proc/net/unix") else {
        return Vec::new();
    };
    text.lines()
        .skip(1)
        .filter_map(|line| {
            // Num RefCount Protocol Flags Type St Inode Path
            let f: Vec<&str> = line.split_whitespace().collect();
            let inode = f.get(6)?.parse().ok()?;
            Some((f.get(7)?.to_string(), inode))
        })
        .collect()
}

/// One `WNOHANG` pass over those of `pids` that are zombie children of this process; returns
/// the ones still zombies of ours.
///
/// A multi-threaded process such as llama-server shows `Z` in /proc as soon as its main thread
/// has exited, but `waitpid` can only collect it once its other threads are gone too, so one
/// pass (as in support::reap_zombie_children) may come too early: callers retry.
fn reap_pass(pids: &[u32]) -> Vec<u32> {
    let me = std::process::id();
    let ours = |pid: u32| procfs::stat(pid).is_some_and(|s| s.is_zombie() && s.ppid == me);
    let mut left = Vec::new();
    for &pid in pids {
        if ours(pid) {
            let _ = rustix::process::waitpid(
                Pid::from_raw(pid as i32),
                rustix::process::WaitOptions::NOHANG,
            );
            if ours(pid) {
                left.push(pid);
            }
        }
    }
    left
}

/// Reaps those of `pids` that are zombie children of this process, retrying for up to
/// `within`, and fails if some stay unreapable.
pub async fn reap_children(pids: &[u32], within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let left = reap_pass(pids);
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "zombie children not reapable after {within:?}: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
