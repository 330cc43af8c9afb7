//! A stand-in for "start a server" in the actor's unit tests (like watchexec's `TestChild`):
//! starts take a scripted time and end as scripted, servers exit when stopped or when a test
//! crashes them. No process, no socket, no store access — so the tests run under tokio's paused
//! clock, where minutes of TTL and backoff take microseconds.

use std::collections::VecDeque;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

use super::server::Server;
use super::start::{Running, StartFailure};
use crate::config::ModelConfig;
use crate::upstream::Endpoint;

/// How one start ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ready,
    /// The server exits with this code before it is ready.
    Exits(i32),
    /// The server is killed by this signal before it is ready.
    Killed(i32),
}

/// The launcher double: every start it was asked for, and the servers it made.
#[derive(Default)]
pub struct Launches {
    /// How long a start takes.
    pub load_time: Mutex<Duration>,
    /// Outcomes of the next starts, in order; `Ready` when empty.
    pub script: Mutex<VecDeque<Outcome>>,
    /// Starts begun.
    pub begun: AtomicUsize,
    /// Starts cancelled before they ended.
    pub cancelled: AtomicUsize,
    /// Every server that became ready, in order.
    pub servers: Mutex<Vec<Arc<ServerDouble>>>,
    /// The `cmd` of every start, in order.
    pub cmds: Mutex<Vec<Vec<String>>>,
    /// The `env` of every start, in order.
    pub envs: Mutex<Vec<std::collections::BTreeMap<String, String>>>,
    next_pid: AtomicU32,
}

impl Launches {
    pub fn new(load_time: Duration) -> Arc<Self> {
        Arc::new(Self {
            load_time: Mutex::new(load_time),
            next_pid: AtomicU32::new(40_000),
            ..Self::default()
        })
    }

    pub fn then(&self, outcomes: &[Outcome]) {
        self.script.lock().unwrap().extend(outcomes);
    }

    pub fn begun(&self) -> usize {
        self.begun.load(Ordering::SeqCst)
    }

    /// The server of the `n`th successful start (0-based).
    pub fn server(&self, n: usize) -> Arc<ServerDouble> {
        self.servers.lock().unwrap()[n].clone()
    }

    pub fn ready_count(&self) -> usize {
        self.servers.lock().unwrap().len()
    }

    pub async fn start(
        &self,
        cfg: &ModelConfig,
        mut cancel: oneshot::Receiver<()>,
    ) -> Result<Running, StartFailure> {
        self.begun.fetch_add(1, Ordering::SeqCst);
        self.cmds.lock().unwrap().push(cfg.cmd.clone());
        self.envs.lock().unwrap().push(cfg.env.clone());
        let outcome = self
            .script
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or(Outcome::Ready);
        let began = Instant::now();
        let load_time = *self.load_time.lock().unwrap();
        tokio::select! {
            _ = tokio::time::sleep(load_time) => {}
            // A message or the sender dropped: either cancels.
            _ = &mut cancel => {
                self.cancelled.fetch_add(1, Ordering::SeqCst);
                return Err(StartFailure::Cancelled);
            }
        }
        match outcome {
            Outcome::Exits(code) => Err(StartFailure::Exited {
                status: ExitStatus::from_raw(code << 8),
                tail: vec![format!("double: exit {code}")],
            }),
            Outcome::Killed(signal) => Err(StartFailure::Exited {
                status: ExitStatus::from_raw(signal),
                tail: vec![format!("double: signal {signal}")],
            }),
            Outcome::Ready => {
                let pid = self.next_pid.fetch_add(1, Ordering::SeqCst);
                let server = Arc::new(ServerDouble::new(pid));
                self.servers.lock().unwrap().push(server.clone());
                let (down_tx, down_rx) = watch::channel(false);
                Ok(Running {
                    server: Server::Double(server),
                    endpoint: Endpoint::Tcp(
                        ([127, 0, 0, 1], (pid % 50_000) as u16 + 10_000).into(),
                    ),
                    ready_after: began.elapsed(),
                    ready_at: Instant::now(),
                    down_tx,
                    down_rx,
                    _port: None,
                    kv: None,
                })
            }
        }
    }
}

/// A running server double.
pub struct ServerDouble {
    pub pid: u32,
    exit_tx: watch::Sender<Option<ExitStatus>>,
    /// Times it was asked to stop.
    pub stops: AtomicUsize,
}

impl ServerDouble {
    fn new(pid: u32) -> Self {
        Self {
            pid,
            exit_tx: watch::channel(None).0,
            stops: AtomicUsize::new(0),
        }
    }

    /// It exits by itself with `code`.
    pub fn crash(&self, code: i32) {
        self.exit_tx
            .send_replace(Some(ExitStatus::from_raw(code << 8)));
    }

    /// Someone else (the kernel's OOM killer, say) kills it with `signal`.
    pub fn killed(&self, signal: i32) {
        self.exit_tx
            .send_replace(Some(ExitStatus::from_raw(signal)));
    }

    pub fn is_running(&self) -> bool {
        self.exit_tx.borrow().is_none()
    }

    pub async fn exited(&self) -> ExitStatus {
        let mut rx = self.exit_tx.subscribe();
        let status = rx.wait_for(Option::is_some).await;
        status
            .map(|s| s.expect("waited for Some"))
            .unwrap_or_else(|_| ExitStatus::from_raw(9))
    }

    /// Stops at once (SIGTERM obeyed).
    pub async fn stop(&self, _grace: Duration) -> ExitStatus {
        self.stops.fetch_add(1, Ordering::SeqCst);
        self.exit_tx.send_if_modified(|s| {
            if s.is_none() {
                *s = Some(ExitStatus::from_raw(15));
                true
            } else {
                false
            }
        });
        self.exited().await
    }
}
