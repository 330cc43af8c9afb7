//! `llmvisor serve` as a child process of a test, for what only the real binary shows
//! (signals, exit status, the CLI against a live daemon).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_llmvisor");

/// A loopback port nothing listens on: bound, then closed.
pub fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A `llmvisor serve` child: killed by pid if the test ends without stopping it.
pub struct ServeProcess {
    pub child: Child,
    pub url: String,
    stderr_lines: mpsc::Receiver<String>,
}

impl ServeProcess {
    pub fn start(config: &Path) -> ServeProcess {
        // A port that was free a moment ago (ephemeral, so it does not meet the fake servers'
        // port ranges).
        let url = format!("http://127.0.0.1:{}", closed_port());
        Self::start_at(config, url)
    }

    /// `llmvisor serve` listening at `url` (`http://127.0.0.1:PORT`).
    pub fn start_at(config: &Path, url: String) -> ServeProcess {
        let mut child = spawn_serve(config, url.trim_start_matches("http://"));
        // Keep draining stderr so the daemon never blocks on a full pipe.
        let (tx, rx) = mpsc::channel();
        let pipe = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut d = ServeProcess {
            child,
            url,
            stderr_lines: rx,
        };
        d.wait_healthy();
        d
    }

    /// `llmvisor serve` that is expected to refuse to start: its exit status and stderr
    /// (killed by pid, failing, if it still runs after `within`).
    pub fn run_to_exit(config: &Path, within: Duration) -> (std::process::ExitStatus, String) {
        let url = format!("127.0.0.1:{}", closed_port());
        let mut child = spawn_serve(config, &url);
        let mut pipe = child.stderr.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        });
        let deadline = Instant::now() + within;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("llmvisor serve still ran after {within:?}; expected it to refuse to start");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        (status, reader.join().unwrap_or_default())
    }

    pub fn wait_healthy(&mut self) {
        let addr = self.url.trim_start_matches("http://").to_string();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "llmvisor serve exited with {status} before answering /healthz:\n{}",
                    self.stderr_so_far()
                );
            }
            if let Ok(mut s) = TcpStream::connect(&addr) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let req =
                    format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
                let mut answer = String::new();
                if s.write_all(req.as_bytes()).is_ok()
                    && s.read_to_string(&mut answer).is_ok()
                    && answer.starts_with("HTTP/1.1 200")
                {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "/healthz never answered 200");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM by pid, then the exit status (failing after `within`).
    pub fn terminate(&mut self, within: Duration) -> std::process::ExitStatus {
        let pid = rustix::process::Pid::from_raw(self.pid() as i32).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "llmvisor did not exit within {within:?} of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stderr_so_far(&self) -> String {
        self.stderr_lines.try_iter().collect::<Vec<_>>().join("\n")
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill(); // by pid: std's Child::kill signals exactly this child
            let _ = self.child.wait();
        }
    }
}

impl ServeProcess {
    /// Sends `signal` to the daemon by pid.
    pub fn signal(&self, signal: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(self.pid() as i32).unwrap();
        rustix::process::kill_process(pid, signal).unwrap();
    }

    /// Waits until a stderr line contains `needle` (failing after `within`), returning it.
    pub fn wait_for_log(&self, needle: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr_lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(_) => panic!("no log line containing {needle:?} within {within:?}"),
            }
        }
    }
}

/// `llmvisor serve --config CONFIG --listen ADDR`, its stderr piped for the caller to drain.
fn spawn_serve(config: &Path, listen: &str) -> std::process::Child {
    Command::new(BIN)
        .args([
            "serve",
            "--config",
            config.to_str().unwrap(),
            "--listen",
            listen,
        ])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start llmvisor serve")
}
