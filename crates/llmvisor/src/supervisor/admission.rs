//! Admission: whether a model may start now, given `max_loaded`, `memory_budget` and exclusive
//! groups — and if not, which idle models to evict first, or whom to wait for.
//!
//! One scheduler task decides, for all models, in arrival order (one FIFO across models, so a
//! hot model cannot starve another). A start that fits is admitted at once. One that does not
//! fit evicts idle models, least recently used first, never a pinned one; if only busy models
//! could make room, those are *drained* — marked stopping so they take no new lease, stopped when
//! their last lease ends (nothing is cut off) — and the start waits, up to `queue_timeout`.
//! A model counts against the limits from admission until its process has exited.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::cell::{Command, ModelCell};
use super::machine::Machine;
use super::Phase;
use crate::config::Config;
use crate::gpu::place::{self, GpuNeed, GpuRoom, NoFit};
use crate::units::format_size;

/// Why a start was not admitted.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AdmitError {
    /// It can never fit (bigger than the budget, or the pinned models leave no room).
    #[error("{0}")]
    Never(String),
    #[error("waited {} (queue_timeout) for room to start it; {why}", crate::units::format_elapsed(*waited))]
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
    /// Where `memory_budget` comes from when the machine gave it (`memory_budget = "auto"`).
    pub memory_budget_origin: Option<String>,
    /// What each GPU may hold (`gpu_budget`); empty: GPUs are not counted.
    pub gpu_budgets: BTreeMap<u32, u64>,
    pub queue_timeout: Duration,
    /// How long a start waits for a busy model to finish its work before draining it to make
    /// room (swap-aware admission; zero = drain at once).
    pub max_wait_for_swap: Duration,
    /// Groups of models and the rules they impose on each other.
    pub groups: Vec<GroupRule>,
}

/// One `[groups.NAME]`: what starting a member means for the other models.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupRule {
    pub members: Vec<String>,
    /// At most one member loaded at a time (llama-swap's `swap: true`).
    pub exclusive: bool,
    /// Starting a member unloads every model outside the group, except pinned models and
    /// members of persistent groups (llama-swap's `exclusive: true`).
    pub unload_others: bool,
    /// Its members are never unloaded to make room for a model outside the group.
    pub persistent: bool,
}

impl GroupRule {
    fn has(&self, model: &str) -> bool {
        self.members.iter().any(|m| m == model)
    }
}

impl Limits {
    /// True if `a` and `b` share an exclusive group.
    fn exclusive_with(&self, a: &str, b: &str) -> bool {
        self.groups
            .iter()
            .any(|g| g.exclusive && g.has(a) && g.has(b))
    }

    /// True if starting `starting` must unload `other` (a group of `starting` unloads the rest).
    fn unloads(&self, starting: &str, other: &str) -> bool {
        self.groups
            .iter()
            .any(|g| g.unload_others && g.has(starting) && !g.has(other))
    }

    /// True if `other` may not be unloaded to make room for `starting`: it is in a persistent
    /// group that `starting` is not in.
    fn protects(&self, starting: &str, other: &str) -> bool {
        self.groups
            .iter()
            .any(|g| g.persistent && g.has(other) && !g.has(starting))
    }

    pub fn from_config(cfg: &Config, machine: &Machine) -> Self {
        let budget = machine.memory_budget(cfg);
        Self {
            max_loaded: cfg.max_loaded,
            memory_budget: budget.bytes,
            memory_budget_origin: budget.origin,
            gpu_budgets: machine.gpu_budgets(cfg),
            queue_timeout: cfg.queue_timeout,
            max_wait_for_swap: cfg.max_wait_for_swap,
            groups: cfg
                .groups
                .values()
                .map(|g| GroupRule {
                    members: g.members.clone(),
                    exclusive: g.exclusive,
                    unload_others: g.unload_others,
                    persistent: g.persistent,
                })
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
    /// A running model grew past the figure it was admitted on (by more than 10 %): re-counted,
    /// idle others are evicted if the budget no longer holds (never a busy one).
    Grew { cell: Arc<ModelCell> },
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
    /// Models that must stop for this start (named when it times out).
    victims: Vec<Arc<ModelCell>>,
    /// Those of them asked to stop, to call off if it gives up.
    asked: Vec<Arc<ModelCell>>,
}

impl Pending {
    /// When busy victims are drained even though they still have work: `max_wait_for_swap`
    /// after this start began to wait.
    fn swap_due(&self, limits: &Limits) -> Instant {
        self.since + limits.max_wait_for_swap
    }
}

struct Scheduler {
    rx: mpsc::UnboundedReceiver<Msg>,
    cells: Vec<Arc<ModelCell>>,
    limits: Limits,
    queue: VecDeque<Pending>,
}

/// What the scheduler knows of one other model when it plans: a snapshot, so that planning is
/// a pure function of its inputs.
#[derive(Debug, Clone)]
pub(crate) struct Snapshot {
    pub id: Arc<str>,
    /// Counted against the limits (admitted, until its process has exited).
    pub admitted: bool,
    pub pinned: bool,
    /// Bytes the budget counts for it.
    pub memory: u64,
    pub phase: Phase,
    pub leases: usize,
    pub last_used: Instant,
    /// Another llmvisor instance uses its server: never a victim.
    pub remote_held: bool,
    /// Bytes per GPU it was admitted on.
    pub gpu: BTreeMap<u32, u64>,
}

impl Snapshot {
    fn of(cell: &ModelCell) -> Self {
        let st = cell.status();
        Self {
            id: cell.id.clone(),
            admitted: cell.admitted(),
            pinned: st.pinned,
            memory: st.memory.unwrap_or(0),
            phase: st.state,
            leases: st.leases,
            last_used: cell.last_used(),
            remote_held: cell.remote_held(),
            gpu: cell.placed(),
        }
    }
}

/// The decision for one start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Plan {
    Admit,
    /// Wait for these models to stop (they are asked to: idle ones stop at once, busy ones
    /// drain). Empty: wait for models still starting, re-planned on every change.
    Wait(Vec<Arc<str>>),
    /// It can never fit; the reason says why and how to fix it.
    Never(String),
}

/// Decides whether model `id`, needing `need` bytes, may start now next to `others` (every other
/// configured model) under `limits` — and if not, which models must stop first: its exclusive
/// group's partners, then models already on their way out, then idle ones least recently used
/// first, then busy ones likewise. Never a pinned model, nor one another instance uses.
#[cfg(test)]
pub(crate) fn plan(id: &str, need: u64, others: &[Snapshot], limits: &Limits) -> Plan {
    plan_with_gpus(id, need, &GpuNeed::Nothing, others, limits)
}

/// The GPUs as admission sees them once the models `gone` have stopped.
fn gpu_rooms(limits: &Limits, loaded: &[&Snapshot], gone: &[&Snapshot]) -> Vec<GpuRoom> {
    limits
        .gpu_budgets
        .iter()
        .map(|(&index, &budget)| GpuRoom {
            index,
            budget,
            held: loaded
                .iter()
                .filter(|o| !gone.iter().any(|g| g.id == o.id))
                .filter_map(|o| o.gpu.get(&index))
                .sum(),
        })
        .collect()
}

/// Where model `id` goes on the GPUs now, next to `others` (the bytes per GPU it is admitted
/// on); empty when GPUs are not counted or it needs none.
pub(crate) fn placement(
    id: &str,
    gpu_need: &GpuNeed,
    others: &[Snapshot],
    limits: &Limits,
) -> BTreeMap<u32, u64> {
    if limits.gpu_budgets.is_empty() {
        return BTreeMap::new();
    }
    let loaded: Vec<&Snapshot> = others.iter().filter(|o| o.admitted).collect();
    place::place(id, gpu_need, &gpu_rooms(limits, &loaded, &[])).unwrap_or_default()
}

/// [`plan`] for a model that also needs `gpu_need` on the GPUs: it fits only if its part on
/// each GPU fits that GPU's budget next to what the others hold there (`gpu::place`); idle
/// models holding GPU memory are the victims when a GPU is short.
pub(crate) fn plan_with_gpus(
    id: &str,
    need: u64,
    gpu_need: &GpuNeed,
    others: &[Snapshot],
    limits: &Limits,
) -> Plan {
    let gpus_counted = !limits.gpu_budgets.is_empty() && *gpu_need != GpuNeed::Nothing;
    if gpus_counted {
        if let Err(NoFit::Never(why)) = place::place(id, gpu_need, &gpu_rooms(limits, &[], &[])) {
            return Plan::Never(why);
        }
    }
    let loaded: Vec<&Snapshot> = others.iter().filter(|o| o.admitted).collect();
    let pinned: Vec<&Snapshot> = loaded.iter().copied().filter(|o| o.pinned).collect();
    let pinned_mem: u64 = pinned.iter().map(|o| o.memory).sum();
    if let Some(budget) = limits.memory_budget {
        if need > budget {
            let origin = limits
                .memory_budget_origin
                .as_ref()
                .map(|o| format!(" ({o})"))
                .unwrap_or_default();
            return Plan::Never(format!(
                "model `{id}` needs {} but memory_budget is {}{origin}: it can never fit (fix: raise memory_budget, or lower the model's `memory`)",
                format_size(need),
                format_size(budget)
            ));
        }
        if need + pinned_mem > budget {
            return Plan::Never(format!(
                "model `{id}` needs {} and pinned models hold {} of the {} budget",
                format_size(need),
                format_size(pinned_mem),
                format_size(budget)
            ));
        }
    }
    if let Some(max) = limits.max_loaded {
        if pinned.len() >= max {
            return Plan::Never(format!(
                "max_loaded is {max} and {} pinned models are loaded",
                pinned.len()
            ));
        }
    }
    // Exclusive group partners must go, whatever else; so must the models a group of this one
    // unloads (but never pinned ones nor a persistent group's).
    let partners: Vec<&Snapshot> = loaded
        .iter()
        .copied()
        .filter(|o| {
            limits.exclusive_with(id, &o.id)
                || (limits.unloads(id, &o.id) && !o.pinned && !limits.protects(id, &o.id))
        })
        .collect();
    if let Some(p) = partners.iter().find(|o| o.pinned) {
        return Plan::Never(format!(
            "model `{id}` shares an exclusive group with pinned model `{}`",
            p.id
        ));
    }
    let ram_fits = |gone: &[&Snapshot]| {
        let remaining = loaded.iter().filter(|o| !gone.iter().any(|g| g.id == o.id));
        let (count, mem) = remaining.fold((0usize, 0u64), |(n, m), o| (n + 1, m + o.memory));
        limits.max_loaded.is_none_or(|max| count < max)
            && limits.memory_budget.is_none_or(|b| mem + need <= b)
    };
    let gpu_fits = |gone: &[&Snapshot]| {
        !gpus_counted || place::place(id, gpu_need, &gpu_rooms(limits, &loaded, gone)).is_ok()
    };
    let fits = |gone: &[&Snapshot]| ram_fits(gone) && gpu_fits(gone);
    if partners.is_empty() && fits(&[]) {
        return Plan::Admit;
    }
    let mut candidates: Vec<&Snapshot> = loaded
        .iter()
        .copied()
        .filter(|o| !o.pinned && !o.remote_held && !limits.protects(id, &o.id))
        .filter(|o| !partners.iter().any(|p| p.id == o.id))
        .filter(|o| matches!(o.phase, Phase::Ready | Phase::Stopping))
        .collect();
    candidates.sort_by_key(|o| (o.phase != Phase::Stopping, o.leases > 0, o.last_used));
    let mut victims = partners;
    let partners_len = victims.len();
    let mut candidates = candidates.into_iter();
    while !fits(&victims) {
        match candidates.next() {
            // Short of GPU memory only: a model holding none would not help.
            Some(c) if ram_fits(&victims) && c.gpu.is_empty() => {}
            Some(c) => victims.push(c),
            None => break,
        }
    }
    if gpus_counted && fits(&victims) {
        // A GPU is one piece: an idle model taken first on the wrong GPU may not be needed once
        // a later victim freed the right one. Keep only the victims the start needs.
        let mut i = partners_len;
        while i < victims.len() {
            let mut without = victims.clone();
            without.remove(i);
            if fits(&without) {
                victims = without;
            } else {
                i += 1;
            }
        }
    }
    if !fits(&victims) {
        // Models still starting hold room we cannot take back: wait for them to be ready
        // (and idle) — re-planned on every change, bounded by queue_timeout.
        return Plan::Wait(Vec::new());
    }
    Plan::Wait(victims.into_iter().map(|v| v.id.clone()).collect())
}

/// What a running model's growth asks of the others.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Growth {
    /// Idle models to stop, least recently used first.
    pub victims: Vec<Arc<str>>,
    /// Bytes the running models still take beyond the budget once they are gone (busy,
    /// pinned or starting models hold it).
    pub over_by: Option<u64>,
    /// Likewise per GPU over its budget.
    pub gpu_over_by: BTreeMap<u32, u64>,
}

/// Re-counts model `id`, which runs and now takes `grown` bytes, against `others` under the
/// memory budget: the idle ones to stop, least recently used first, until the budget holds —
/// never a busy, pinned, starting, persistent-group or remotely used one, and never `id` itself.
#[cfg(test)]
pub(crate) fn plan_growth(id: &str, grown: u64, others: &[Snapshot], limits: &Limits) -> Growth {
    plan_growth_with_gpus(id, grown, &BTreeMap::new(), others, limits)
}

/// [`plan_growth`] for a model that also holds `grown_gpu` on the GPUs: an idle model is
/// taken while RAM is over budget, or while a GPU it holds memory on is.
pub(crate) fn plan_growth_with_gpus(
    id: &str,
    grown: u64,
    grown_gpu: &BTreeMap<u32, u64>,
    others: &[Snapshot],
    limits: &Limits,
) -> Growth {
    let loaded: Vec<&Snapshot> = others.iter().filter(|o| o.admitted).collect();
    let budget = limits.memory_budget.unwrap_or(u64::MAX);
    let mut total = grown + loaded.iter().map(|o| o.memory).sum::<u64>();
    let mut gpu_held: BTreeMap<u32, u64> = limits
        .gpu_budgets
        .keys()
        .map(|&g| {
            let others: u64 = loaded.iter().filter_map(|o| o.gpu.get(&g)).sum();
            (g, grown_gpu.get(&g).copied().unwrap_or(0) + others)
        })
        .collect();
    let gpu_over = |held: &BTreeMap<u32, u64>, g: &u32| {
        held.get(g)
            .zip(limits.gpu_budgets.get(g))
            .is_some_and(|(h, b)| h > b)
    };
    let mut idle: Vec<&Snapshot> = loaded
        .iter()
        .copied()
        .filter(|o| o.phase == Phase::Ready && o.leases == 0)
        .filter(|o| !o.pinned && !o.remote_held && !limits.protects(id, &o.id))
        .collect();
    idle.sort_by_key(|o| o.last_used);
    let mut growth = Growth::default();
    for o in idle {
        let ram_over = total > budget;
        let helps_gpu = o.gpu.keys().any(|g| gpu_over(&gpu_held, g));
        if !(helps_gpu || ram_over && o.memory > 0) {
            continue;
        }
        total -= o.memory;
        for (g, b) in &o.gpu {
            if let Some(h) = gpu_held.get_mut(g) {
                *h = h.saturating_sub(*b);
            }
        }
        growth.victims.push(o.id.clone());
    }
    growth.over_by = (total > budget).then(|| total - budget);
    growth.gpu_over_by = gpu_held
        .iter()
        .filter_map(|(g, h)| {
            let b = limits.gpu_budgets.get(g)?;
            (h > b).then(|| (*g, h - b))
        })
        .collect();
    growth
}

impl Scheduler {
    async fn run(mut self) {
        loop {
            // The head's queue timeout, or earlier its swap deadline while a busy victim serves.
            let deadline = self.queue.front().map(|p| {
                let timeout = p.since + self.limits.queue_timeout;
                let swap = p.swap_due(&self.limits);
                let unasked = p.victims.len() > p.asked.len();
                if unasked && swap > Instant::now() {
                    timeout.min(swap)
                } else {
                    timeout
                }
            });
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
                            asked: Vec::new(),
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
                Some(Msg::Grew { cell }) => self.recount(&cell),
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
        for v in &p.asked {
            let _ = v.send(Command::CancelEvict);
        }
        p.cell.set_wait_reason(None);
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
                    let gpu_need = p.cell.memory().gpu_need;
                    let placed =
                        placement(&p.cell.id, &gpu_need, &self.others(&p.cell), &self.limits);
                    p.cell.set_placed(placed);
                    p.cell.set_queued(false);
                    p.cell.set_wait_reason(None);
                    if !p.victims.is_empty() {
                        p.cell
                            .stats
                            .swaps
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    p.cell.set_admitted(true);
                    let _ = p.reply.send(Ok(()));
                }
                Plan::Never(why) => {
                    let p = self.queue.pop_front().expect("front exists");
                    self.give_up(p, Err(AdmitError::Never(why)));
                }
                Plan::Wait(victims) => {
                    let victims: Vec<Arc<ModelCell>> = victims
                        .iter()
                        .filter_map(|id| self.cells.iter().find(|c| c.id == *id).cloned())
                        .collect();
                    let head = self.queue.front_mut().expect("front exists");
                    let swap_due = Instant::now() >= head.swap_due(&self.limits);
                    let mut serving = Vec::new();
                    for v in victims {
                        if !head.victims.iter().any(|h| Arc::ptr_eq(h, &v)) {
                            head.victims.push(v.clone());
                        }
                        if head.asked.iter().any(|h| Arc::ptr_eq(h, &v)) {
                            continue;
                        }
                        // Swap-aware: a busy model serves on (its queued requests included)
                        // until it is idle or this start has waited max_wait_for_swap; only
                        // then is it drained. Idle ones stop at once.
                        let st = v.status();
                        if swap_due || st.leases == 0 || st.state != Phase::Ready {
                            let _ = v.send(Command::Evict);
                            head.asked.push(v);
                        } else {
                            serving.push(format!("{} ({} leases)", v.id, st.leases));
                        }
                    }
                    let reason = if serving.is_empty() {
                        "waiting for room: models are stopping to make it".to_owned()
                    } else {
                        format!(
                            "waiting up to {} (max_wait_for_swap) for {} to finish before swapping",
                            crate::units::format_duration(self.limits.max_wait_for_swap),
                            serving.join(", ")
                        )
                    };
                    head.cell.set_wait_reason(Some(reason));
                    return;
                }
            }
        }
    }

    /// `cell` runs and grew: evicts the idle models that must go for the budget to hold.
    fn recount(&self, cell: &Arc<ModelCell>) {
        let grown = cell.memory().bytes.unwrap_or(0);
        let growth = plan_growth_with_gpus(
            &cell.id,
            grown,
            &cell.placed(),
            &self.others(cell),
            &self.limits,
        );
        for id in &growth.victims {
            if let Some(v) = self.cells.iter().find(|c| c.id == *id) {
                tracing::info!(model = %cell.id, "grew to {}: evicting idle model `{id}`", format_size(grown));
                let _ = v.send(Command::EvictIdle);
            }
        }
        if let (Some(over), Some(budget)) = (growth.over_by, self.limits.memory_budget) {
            tracing::warn!(
                model = %cell.id,
                "grew to {}: the running models take {} more than memory_budget ({}), and none of the others is idle",
                format_size(grown),
                format_size(over),
                format_size(budget)
            );
        }
        for (gpu, over) in &growth.gpu_over_by {
            tracing::warn!(
                model = %cell.id,
                "grew: the running models take {} more than the gpu_budget of GPU {gpu}, and none of the others holding it is idle",
                format_size(*over)
            );
        }
    }

    fn plan(&self, cell: &Arc<ModelCell>) -> Plan {
        let memory = cell.memory();
        let need = memory.bytes.unwrap_or(0);
        plan_with_gpus(
            &cell.id,
            need,
            &memory.gpu_need,
            &self.others(cell),
            &self.limits,
        )
    }

    /// Every model but `cell`, as planning sees them.
    fn others(&self, cell: &Arc<ModelCell>) -> Vec<Snapshot> {
        self.cells
            .iter()
            .filter(|c| !Arc::ptr_eq(c, cell))
            .map(|c| Snapshot::of(c))
            .collect()
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    /// A loaded model: `age` seconds since last use (larger = less recently used).
    fn loaded(id: &str, memory_gib: u64, leases: usize, age: u64) -> Snapshot {
        Snapshot {
            id: id.into(),
            admitted: true,
            pinned: false,
            memory: memory_gib * GIB,
            phase: Phase::Ready,
            leases,
            last_used: Instant::now() - Duration::from_secs(age),
            remote_held: false,
            gpu: BTreeMap::new(),
        }
    }

    fn pinned(s: Snapshot) -> Snapshot {
        Snapshot { pinned: true, ..s }
    }

    fn phase(s: Snapshot, phase: Phase) -> Snapshot {
        Snapshot { phase, ..s }
    }

    fn wait(ids: &[&str]) -> Plan {
        Plan::Wait(ids.iter().map(|&i| Arc::from(i)).collect())
    }

    fn limits(max_loaded: Option<usize>, budget_gib: Option<u64>, groups: &[&[&str]]) -> Limits {
        Limits {
            max_loaded,
            memory_budget: budget_gib.map(|g| g * GIB),
            memory_budget_origin: None,
            gpu_budgets: BTreeMap::new(),
            queue_timeout: Duration::from_secs(60),
            max_wait_for_swap: Duration::ZERO,
            groups: groups
                .iter()
                .map(|g| GroupRule {
                    members: g.iter().map(|m| m.to_string()).collect(),
                    exclusive: true,
                    ..GroupRule::default()
                })
                .collect(),
        }
    }

    #[test]
    fn plans_for_every_situation() {
        let cases: Vec<(&str, u64, Vec<Snapshot>, Limits, Plan)> = vec![
            ("nothing loaded: admit", 1, vec![], limits(Some(1), Some(4), &[]), Plan::Admit),
            (
                "fits next to the others",
                1,
                vec![loaded("a", 1, 0, 5)],
                limits(Some(2), Some(4), &[]),
                Plan::Admit,
            ),
            (
                "unadmitted models hold no room",
                1,
                vec![Snapshot { admitted: false, ..loaded("a", 4, 0, 5) }],
                limits(Some(1), Some(4), &[]),
                Plan::Admit,
            ),
            (
                "max_loaded: the least recently used idle model goes",
                1,
                vec![loaded("new", 1, 0, 1), loaded("old", 1, 0, 50)],
                limits(Some(2), None, &[]),
                wait(&["old"]),
            ),
            (
                "idle before busy, whatever the age",
                1,
                vec![loaded("busy", 1, 3, 500), loaded("idle", 1, 0, 1)],
                limits(Some(2), None, &[]),
                wait(&["idle"]),
            ),
            (
                "a busy model is drained when nothing else frees room",
                1,
                vec![loaded("busy", 1, 3, 5)],
                limits(Some(1), None, &[]),
                wait(&["busy"]),
            ),
            (
                "one on its way out is counted first",
                1,
                vec![loaded("idle", 1, 0, 500), phase(loaded("leaving", 1, 1, 1), Phase::Stopping)],
                limits(Some(2), None, &[]),
                wait(&["leaving"]),
            ),
            (
                "budget: as many LRU victims as the bytes need",
                3,
                vec![loaded("a", 2, 0, 30), loaded("b", 2, 0, 20), loaded("c", 2, 0, 10)],
                limits(None, Some(6), &[]),
                wait(&["a", "b"]),
            ),
            (
                "pinned is never a victim",
                1,
                vec![pinned(loaded("p", 1, 0, 999)), loaded("q", 1, 0, 1)],
                limits(Some(2), None, &[]),
                wait(&["q"]),
            ),
            (
                "pinned models fill max_loaded: never",
                1,
                vec![pinned(loaded("p", 1, 0, 9))],
                limits(Some(1), None, &[]),
                Plan::Never("max_loaded is 1 and 1 pinned models are loaded".into()),
            ),
            (
                "bigger than the budget: never, with the fix",
                5,
                vec![],
                limits(None, Some(4), &[]),
                Plan::Never("model `x` needs 5 GiB but memory_budget is 4 GiB: it can never fit (fix: raise memory_budget, or lower the model's `memory`)".into()),
            ),
            (
                "pinned bytes leave no room: never",
                3,
                vec![pinned(loaded("p", 2, 0, 9))],
                limits(None, Some(4), &[]),
                Plan::Never("model `x` needs 3 GiB and pinned models hold 2 GiB of the 4 GiB budget".into()),
            ),
            (
                "exclusive partner goes even when everything fits",
                1,
                vec![loaded("partner", 1, 0, 1), loaded("other", 1, 0, 99)],
                limits(None, None, &[&["x", "partner"]]),
                wait(&["partner"]),
            ),
            (
                "busy exclusive partner is drained",
                1,
                vec![loaded("partner", 1, 2, 1)],
                limits(None, None, &[&["x", "partner"]]),
                wait(&["partner"]),
            ),
            (
                "pinned exclusive partner: never",
                1,
                vec![pinned(loaded("partner", 1, 0, 1))],
                limits(None, None, &[&["x", "partner"]]),
                Plan::Never("model `x` shares an exclusive group with pinned model `partner`".into()),
            ),
            (
                "only a starting model holds the room: wait for it",
                1,
                vec![phase(loaded("loading", 1, 0, 1), Phase::Starting)],
                limits(Some(1), None, &[]),
                Plan::Wait(vec![]),
            ),
            (
                "used by another instance: not a victim",
                1,
                vec![Snapshot { remote_held: true, ..loaded("shared", 1, 0, 99) }, loaded("mine", 1, 0, 1)],
                limits(Some(2), None, &[]),
                wait(&["mine"]),
            ),
        ];
        for (name, need_gib, others, limits, expected) in cases {
            assert_eq!(
                plan("x", need_gib * GIB, &others, &limits),
                expected,
                "{name}"
            );
        }
    }

    #[test]
    fn growth_evicts_idle_models_only() {
        let g = |victims: &[&str], over_gib: Option<u64>| Growth {
            victims: victims.iter().map(|&v| Arc::from(v)).collect(),
            over_by: over_gib.map(|o| o * GIB),
            gpu_over_by: BTreeMap::new(),
        };
        type Case = (&'static str, u64, Vec<Snapshot>, Option<u64>, Growth);
        let cases: Vec<Case> = vec![
            (
                "no budget: nothing to do",
                50,
                vec![loaded("a", 4, 0, 9)],
                None,
                g(&[], None),
            ),
            (
                "still within the budget",
                5,
                vec![loaded("a", 4, 0, 9)],
                Some(10),
                g(&[], None),
            ),
            (
                "the least recently used idle one goes, only as many as needed",
                4,
                vec![
                    loaded("new", 3, 0, 1),
                    loaded("old", 3, 0, 50),
                    loaded("older", 3, 0, 90),
                ],
                Some(10),
                g(&["older"], None),
            ),
            (
                "a busy one never, even when the budget stays over",
                8,
                vec![loaded("busy", 4, 2, 99), loaded("idle", 1, 0, 1)],
                Some(10),
                g(&["idle"], Some(2)),
            ),
            (
                "pinned, starting and unadmitted ones are not victims",
                8,
                vec![
                    pinned(loaded("p", 2, 0, 99)),
                    phase(loaded("s", 2, 0, 99), Phase::Starting),
                    Snapshot {
                        admitted: false,
                        ..loaded("gone", 9, 0, 99)
                    },
                ],
                Some(10),
                g(&[], Some(2)),
            ),
        ];
        for (name, grown_gib, others, budget_gib, expected) in cases {
            let limits = limits(None, budget_gib, &[]);
            assert_eq!(
                plan_growth("x", grown_gib * GIB, &others, &limits),
                expected,
                "{name}"
            );
        }
    }

    #[test]
    fn growth_on_a_gpu_evicts_idle_models_on_that_gpu() {
        let on = |s: Snapshot, gpu: u32, gib: u64| Snapshot {
            gpu: [(gpu, gib * GIB)].into(),
            memory: 0,
            ..s
        };
        let limits = Limits {
            gpu_budgets: [(0, 24 * GIB), (1, 24 * GIB)].into(),
            ..limits(None, None, &[])
        };
        let others = vec![
            on(loaded("old-on-1", 0, 0, 99), 1, 8),
            on(loaded("on-0", 0, 0, 50), 0, 8),
            on(loaded("busy-on-0", 0, 1, 90), 0, 4),
            on(loaded("newer-on-0", 0, 0, 10), 0, 4),
        ];
        // x grew to 14 GiB on GPU 0: 14 + 8 + 4 + 4 = 30 > 24. The idle ones on GPU 0 go, least
        // recently used first, until it holds; the one on GPU 1 stays, the busy one too.
        let grown: BTreeMap<u32, u64> = [(0, 14 * GIB)].into();
        let growth = plan_growth_with_gpus("x", 0, &grown, &others, &limits);
        assert_eq!(growth.victims, [Arc::<str>::from("on-0")]);
        assert!(growth.gpu_over_by.is_empty() && growth.over_by.is_none());
        // 22 GiB: even without every idle one, the busy 4 GiB leave it 2 GiB over.
        let grown: BTreeMap<u32, u64> = [(0, 22 * GIB)].into();
        let growth = plan_growth_with_gpus("x", 0, &grown, &others, &limits);
        assert_eq!(
            growth.victims,
            [Arc::<str>::from("on-0"), Arc::<str>::from("newer-on-0")]
        );
        assert_eq!(growth.gpu_over_by, BTreeMap::from([(0, 2 * GIB)]));
    }

    /// llama-swap's group semantics: `unload_others` (its `exclusive`) and `persistent`.
    #[test]
    fn groups_that_unload_others_and_persistent_groups() {
        let rule = |members: &[&str], unload_others: bool, persistent: bool| GroupRule {
            members: members.iter().map(|m| m.to_string()).collect(),
            exclusive: false,
            unload_others,
            persistent,
        };
        let with = |max_loaded: Option<usize>, groups: Vec<GroupRule>| Limits {
            groups,
            ..limits(max_loaded, None, &[])
        };
        let others = vec![
            loaded("mate", 1, 0, 1),
            loaded("stranger", 1, 0, 1),
            loaded("keeper", 1, 0, 1),
            pinned(loaded("pinned", 1, 0, 1)),
        ];
        let cases: Vec<(&str, Limits, Plan)> = vec![
            (
                "a group that unloads others keeps its own members, pinned and persistent ones",
                with(
                    None,
                    vec![
                        rule(&["x", "mate"], true, false),
                        rule(&["keeper"], false, true),
                    ],
                ),
                wait(&["stranger"]),
            ),
            (
                "without unload_others, everything fits",
                with(None, vec![rule(&["x", "mate"], false, false)]),
                Plan::Admit,
            ),
            (
                "persistent members are never LRU victims for outsiders: wait (queue_timeout)",
                with(
                    Some(4),
                    vec![rule(&["keeper", "stranger", "mate"], false, true)],
                ),
                Plan::Wait(vec![]),
            ),
            (
                "a member of the persistent group may take its partner's room",
                with(Some(4), vec![rule(&["x", "keeper"], false, true)]),
                wait(&["mate"]),
            ),
        ];
        for (name, limits, expected) in cases {
            assert_eq!(plan("x", GIB, &others, &limits), expected, "{name}");
        }
    }
}
