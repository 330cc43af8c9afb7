//! Admission: whether a model may start now, given `max_loaded`, `memory_budget` and exclusive
//! groups — and if not, which idle models to evict first, or whom to wait for.
//!
//! One scheduler task decides, for all models, in arrival order (one FIFO across models, so a
//! hot model cannot starve another). A start that fits is admitted at once. One that does not
//! fit evicts idle models, least recently used first, never a pinned one; if only busy models
//! could make room, those are *drained* — marked stopping so they take no new lease, stopped when
//! their last lease ends (nothing is cut off) — and the start waits, up to `queue_timeout`.
//! A model counts against the limits from admission until its process has exited.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::cell::{Command, ModelCell};
use super::Phase;
use crate::config::Config;

/// Why a start was not admitted.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AdmitError {
    /// It can never fit (bigger than the budget, or the pinned models leave no room).
    #[error("{0}")]
    Never(String),
    #[error("waited {waited:?} (queue_timeout) for room to start it; {why}")]
    TimedOut { waited: Duration, why: String },
    #[error("too many starts are already waiting for room ({0}); try again later")]
    QueueFull(usize),
    #[error("llmvisor is shutting down")]
    Closed,
}

/// The limits, from the config.
#[derive(Debug, Clone, Default)]
pub struct Limits {
    pub max_loaded: Option<usize>,
    pub memory_budget: Option<u64>,
    pub queue_timeout: Duration,
    /// Exclusive groups: at most one member admitted at a time.
    pub exclusive_groups: Vec<Vec<String>>,
}

impl Limits {
    pub fn from_config(cfg: &Config) -> Self {
        Self {
            max_loaded: cfg.max_loaded,
            memory_budget: cfg.memory_budget,
            queue_timeout: cfg.queue_timeout,
            exclusive_groups: cfg
                .groups
                .values()
                .filter(|g| g.exclusive)
                .map(|g| g.members.clone())
                .collect(),
        }
    }
}

/// Starts waiting for room, at most (requests wait inside their model's start, so this bounds
/// the number of *models* queued; each model bounds its own waiters).
pub const MAX_QUEUED_STARTS: usize = 256;

pub(crate) enum Msg {
    Request {
        cell: Arc<ModelCell>,
        reply: oneshot::Sender<Result<(), AdmitError>>,
    },
    /// The model no longer wants to start (unloaded or retired while queued).
    Withdraw { model: Arc<str> },
    /// A model became idle, stopped, or exited: room may have appeared.
    Changed,
    /// Config reload: the models and limits now in force.
    Reset {
        cells: Vec<Arc<ModelCell>>,
        limits: Limits,
    },
}

/// Handle to the scheduler task.
#[derive(Clone)]
pub(crate) struct Admission {
    tx: mpsc::UnboundedSender<Msg>,
}

impl Admission {
    pub fn start(limits: Limits) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let scheduler = Scheduler {
            rx,
            cells: Vec::new(),
            limits,
            queue: VecDeque::new(),
        };
        tokio::spawn(scheduler.run());
        Self { tx }
    }

    pub fn send(&self, msg: Msg) {
        let _ = self.tx.send(msg);
    }

    /// Asks to start `cell`; resolves when admitted (the caller then really starts it).
    pub async fn admit(&self, cell: Arc<ModelCell>) -> Result<(), AdmitError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Msg::Request { cell, reply })
            .map_err(|_| AdmitError::Closed)?;
        rx.await.unwrap_or(Err(AdmitError::Closed))
    }
}

struct Pending {
    cell: Arc<ModelCell>,
    reply: oneshot::Sender<Result<(), AdmitError>>,
    since: Instant,
    /// Models drained or evicted for this start, to release if it gives up.
    victims: Vec<Arc<ModelCell>>,
}

struct Scheduler {
    rx: mpsc::UnboundedReceiver<Msg>,
    cells: Vec<Arc<ModelCell>>,
    limits: Limits,
    queue: VecDeque<Pending>,
}

enum Plan {
    Admit,
    /// Wait for these (already asked to stop, or now asked).
    Wait(Vec<Arc<ModelCell>>),
    Never(String),
}

impl Scheduler {
    async fn run(mut self) {
        loop {
            let deadline = self
                .queue
                .front()
                .map(|p| p.since + self.limits.queue_timeout);
            let msg = tokio::select! {
                m = self.rx.recv() => match m {
                    Some(m) => Some(m),
                    None => break,
                },
                _ = sleep_until_opt(deadline), if deadline.is_some() => None,
            };
            match msg {
                Some(Msg::Request { cell, reply }) => {
                    if self.queue.len() >= MAX_QUEUED_STARTS {
                        let _ = reply.send(Err(AdmitError::QueueFull(self.queue.len())));
                    } else {
                        cell.set_queued(true);
                        self.queue.push_back(Pending {
                            cell,
                            reply,
                            since: Instant::now(),
                            victims: Vec::new(),
                        });
                    }
                }
                Some(Msg::Withdraw { model }) => {
                    if let Some(i) = self.queue.iter().position(|p| p.cell.id == model) {
                        let p = self.queue.remove(i).expect("index from position");
                        self.give_up(p, Err(AdmitError::Closed));
                    }
                }
                Some(Msg::Changed) => {}
                Some(Msg::Reset { cells, limits }) => {
                    self.cells = cells;
                    self.limits = limits;
                }
                None => self.expire(),
            }
            self.schedule();
        }
    }

    /// Fails the starts that waited longer than `queue_timeout`.
    fn expire(&mut self) {
        let now = Instant::now();
        while let Some(p) = self.queue.front() {
            if now < p.since + self.limits.queue_timeout {
                break;
            }
            let p = self.queue.pop_front().expect("front exists");
            let busy: Vec<String> = p
                .victims
                .iter()
                .map(|v| format!("{} ({} leases)", v.id, v.status().leases))
                .collect();
            let why = if busy.is_empty() {
                "no model could be stopped to make room".to_owned()
            } else {
                format!("still in use: {}", busy.join(", "))
            };
            let waited = now - p.since;
            self.give_up(p, Err(AdmitError::TimedOut { waited, why }));
        }
    }

    fn give_up(&self, p: Pending, result: Result<(), AdmitError>) {
        p.cell.set_queued(false);
        // Drains started for this start, and not needed by the next one, are called off.
        for v in &p.victims {
            let _ = v.send(Command::CancelEvict);
        }
        let _ = p.reply.send(result);
    }

    /// Admits from the head of the queue while it fits; asks victims to stop for the head.
    fn schedule(&mut self) {
        while let Some(head) = self.queue.front_mut() {
            if head.reply.is_closed() {
                let p = self.queue.pop_front().expect("front exists");
                p.cell.set_queued(false);
                continue;
            }
            let cell = head.cell.clone();
            match self.plan(&cell) {
                Plan::Admit => {
                    let p = self.queue.pop_front().expect("front exists");
                    p.cell.set_queued(false);
                    p.cell.set_admitted(true);
                    let _ = p.reply.send(Ok(()));
                }
                Plan::Never(why) => {
                    let p = self.queue.pop_front().expect("front exists");
                    self.give_up(p, Err(AdmitError::Never(why)));
                }
                Plan::Wait(victims) => {
                    let head = self.queue.front_mut().expect("front exists");
                    for v in victims {
                        if !head.victims.iter().any(|h| Arc::ptr_eq(h, &v)) {
                            let _ = v.send(Command::Evict);
                            head.victims.push(v);
                        }
                    }
                    return;
                }
            }
        }
    }

    fn plan(&self, cell: &Arc<ModelCell>) -> Plan {
        let need = cell.memory().bytes.unwrap_or(0);
        let others: Vec<&Arc<ModelCell>> = self
            .cells
            .iter()
            .filter(|c| !Arc::ptr_eq(c, cell) && c.admitted())
            .collect();
        let pinned_mem: u64 = others
            .iter()
            .filter(|c| c.pinned())
            .map(|c| c.memory().bytes.unwrap_or(0))
            .sum();
        let pinned_count = others.iter().filter(|c| c.pinned()).count();
        if let Some(budget) = self.limits.memory_budget {
            if need > budget {
                return Plan::Never(format!(
                    "model `{}` needs {} but memory_budget is {}: it can never fit (fix: raise memory_budget, or lower the model's `memory`)",
                    cell.id,
                    human_bytes(need),
                    human_bytes(budget)
                ));
            }
            if need + pinned_mem > budget {
                return Plan::Never(format!(
                    "model `{}` needs {} and pinned models hold {} of the {} budget",
                    cell.id,
                    human_bytes(need),
                    human_bytes(pinned_mem),
                    human_bytes(budget)
                ));
            }
        }
        if let Some(max) = self.limits.max_loaded {
            if pinned_count >= max {
                return Plan::Never(format!(
                    "max_loaded is {max} and {pinned_count} pinned models are loaded"
                ));
            }
        }
        // Exclusive group partners must go, whatever else.
        let partners: Vec<&Arc<ModelCell>> = others
            .iter()
            .copied()
            .filter(|c| self.exclusive_with(&cell.id, &c.id))
            .collect();
        if let Some(pinned) = partners.iter().find(|c| c.pinned()) {
            return Plan::Never(format!(
                "model `{}` shares an exclusive group with pinned model `{}`",
                cell.id, pinned.id
            ));
        }
        let fits = |gone: &[&Arc<ModelCell>]| {
            let remaining: Vec<&&Arc<ModelCell>> = others
                .iter()
                .filter(|c| !gone.iter().any(|g| Arc::ptr_eq(g, c)))
                .collect();
            let count_ok = self
                .limits
                .max_loaded
                .is_none_or(|max| remaining.len() < max);
            let mem: u64 = remaining
                .iter()
                .map(|c| c.memory().bytes.unwrap_or(0))
                .sum();
            let mem_ok = self.limits.memory_budget.is_none_or(|b| mem + need <= b);
            count_ok && mem_ok
        };
        if partners.is_empty() && fits(&[]) {
            return Plan::Admit;
        }
        // Victims: partners first, then models already on their way out (they free room without
        // a new decision), then idle ones by least recent use, then busy ones likewise.
        let mut candidates: Vec<&Arc<ModelCell>> = others
            .iter()
            .copied()
            .filter(|c| !c.pinned() && !c.remote_held())
            .filter(|c| !partners.iter().any(|p| Arc::ptr_eq(p, c)))
            .filter(|c| matches!(c.phase(), Phase::Ready | Phase::Stopping))
            .collect();
        candidates.sort_by_key(|c| {
            let st = c.status();
            let leaving = st.state == Phase::Stopping;
            (!leaving, st.leases > 0, c.last_used())
        });
        let mut victims: Vec<&Arc<ModelCell>> = partners.clone();
        let mut candidates = candidates.into_iter();
        while !fits(&victims) {
            match candidates.next() {
                Some(c) => victims.push(c),
                None => break,
            }
        }
        if !fits(&victims) {
            // Models still starting hold room we cannot take back: wait for them to be ready
            // (and idle) — re-planned on every change, bounded by queue_timeout.
            return Plan::Wait(Vec::new());
        }
        Plan::Wait(victims.into_iter().cloned().collect())
    }

    fn exclusive_with(&self, a: &str, b: &str) -> bool {
        self.limits
            .exclusive_groups
            .iter()
            .any(|g| g.iter().any(|m| m == a) && g.iter().any(|m| m == b))
    }
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
