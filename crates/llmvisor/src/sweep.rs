//! The orphan sweep: finds servers left behind by dead llmvisor instances of a state dir and
//! stops them — never anything it cannot prove is theirs.
//!
//! Run at the start of every llmvisor on a state dir and by `llmvisor gc [--dry-run]`, in two
//! steps: [`plan`] reads the store and `/proc` and decides what would be signalled and why, what
//! records and instances would be removed, and what is left alone and why (a dry run prints
//! this [`SweepPlan`]); [`execute`] carries it out (a real run).
//!
//! Candidates are processes of *dead* owners only (an owner is dead when its lock in
//! `<state_dir>/owners/` is not held, see [`crate::owner`]); the own instance and live owners are
//! never looked at. The proof of a process is what the *live process* carries, never what the
//! state dir says alone — a state file can be written by anyone who can write the dir, and a
//! pid with its start time is public in `/proc/PID/stat`:
//! * its environment carries `LLMVISOR_INSTANCE=<dead owner>` (the marker every server is started
//!   with), **and** its real and effective uid are ours. A `children` record only tells which
//!   model a proven process served; a recorded process without the marker is left alone. A record
//!   whose start time differs names a recycled pid: reported, never signalled; one from an earlier
//!   boot is dropped;
//! * an unmarked member of a proven leader's process group (a wrapper's child that cleared its
//!   environment), of our uid, while that leader still leads the group.
//!
//! Whatever the proof, pid ≤ 1, this process, its ancestors and its process group are never
//! signalled, nor a group ≤ 1. Before any signal the sweep opens a pidfd and checks the proof
//! *again*, so the pidfd surely names the proven process, and signals through it: a recycled pid
//! can never be hit. A proven leader's group is signalled through the leader's pidfd (the kernel's
//! group flag, Linux ≥ 6.9) when every live member is of our uid; otherwise each proven process is
//! signalled on its own. Stop = SIGTERM, up to `grace`, then SIGKILL ([`escalate`]).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::Duration;

use crate::escalate::{escalate, Targets};
use crate::owner::{self, Liveness};
use crate::pidfd;
use crate::procfs::{self, ProcStat};
use crate::spawn::INSTANCE_ENV;
use crate::store::{ChildRecord, Store};
use crate::units;
use rustix::io::Errno;
use rustix::process::Signal;

/// How long a process gets between SIGTERM and SIGKILL, unless told otherwise.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(5);

/// How a sweep runs.
#[derive(Debug, Clone)]
pub struct SweepOptions {
    /// The instance running the sweep (never touched); `None` for `llmvisor gc`.
    pub own_instance: Option<String>,
    /// Report what would be done; signal nothing and change nothing in the store.
    pub dry_run: bool,
    /// Time between SIGTERM and SIGKILL.
    pub grace: Duration,
}

impl Default for SweepOptions {
    fn default() -> Self {
        Self {
            own_instance: None,
            dry_run: false,
            grace: DEFAULT_GRACE,
        }
    }
}

/// How a process was proven to belong to a dead owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proof {
    /// A `children` record: pid and start time match.
    Record,
    /// Its environment carries the owner's `LLMVISOR_INSTANCE`.
    Marker,
    /// A member of the process group led by this proven pid.
    GroupOf(u32),
}

/// What a stopped (or to-be-stopped) process was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    /// The dead instance it belonged to.
    pub owner: String,
    /// The model, when a record tells.
    pub model: Option<String>,
    /// Its command name (`/proc/PID/comm`).
    pub comm: Option<String>,
    pub proof: Proof,
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<String> = Vec::new();
        if self.proof != Proof::Record {
            if let Some(comm) = &self.comm {
                parts.push(comm.clone());
            }
        }
        if let Some(model) = &self.model {
            parts.push(format!("model {model}"));
        }
        match self.proof {
            Proof::Record => parts.push(format!("owner {}, dead", self.owner)),
            Proof::Marker => parts.push(format!("{INSTANCE_ENV} of owner {}, dead", self.owner)),
            Proof::GroupOf(leader) => parts.push(format!(
                "in the group of pid {leader}, owner {}, dead",
                self.owner
            )),
        }
        f.write_str(&parts.join(", "))
    }
}

/// Why a record was removed.
pub const RECORD_GONE: &str = "the process is gone";
/// Why a record was removed.
pub const RECORD_EARLIER_BOOT: &str = "it is from an earlier boot";
/// Why a record was removed.
pub const RECORD_PID_REUSED: &str = "its pid now belongs to another process";
/// Why a record was removed.
pub const RECORD_UNPROVEN: &str = "the process it names cannot be proven its owner's";

/// One thing the sweep found, and what it did about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// Stopped, by SIGTERM or, after the grace, by SIGKILL.
    Stopped {
        pid: u32,
        subject: Subject,
        killed_after: Option<Duration>,
    },
    /// Dry run: would be stopped.
    WouldStop { pid: u32, subject: Subject },
    /// Proven, signalled, and still there.
    NotStopped {
        pid: u32,
        subject: Subject,
        reason: String,
    },
    /// Not proven to be a dead owner's: not signalled.
    LeftAlone { pid: u32, reason: String },
    /// A `children` record of a dead owner was (or, dry run, would be) removed.
    RecordRemoved {
        pid: u32,
        model: String,
        owner: String,
        reason: &'static str,
        dry_run: bool,
    },
    /// A dead instance was (or would be) removed from the store, with its claims, ports and
    /// leases, and its stale lock file.
    InstanceRemoved { id: String, dry_run: bool },
    /// Something the sweep could not do (reading the store, say).
    Error(String),
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Stopped {
                pid,
                subject,
                killed_after: None,
            } => write!(f, "stopped pid {pid} ({subject}) with SIGTERM"),
            Self::Stopped {
                pid,
                subject,
                killed_after: Some(grace),
            } => write!(
                f,
                "stopped pid {pid} ({subject}) with SIGKILL ({} after SIGTERM)",
                units::format_duration(*grace)
            ),
            Self::WouldStop { pid, subject } => write!(f, "would stop pid {pid} ({subject})"),
            Self::NotStopped {
                pid,
                subject,
                reason,
            } => write!(f, "could not stop pid {pid} ({subject}): {reason}"),
            Self::LeftAlone { pid, reason } => write!(f, "left pid {pid} alone: {reason}"),
            Self::RecordRemoved {
                pid,
                model,
                owner,
                reason,
                dry_run,
            } => write!(
                f,
                "{} the record of pid {pid} (model {model}, owner {owner}, dead): {reason}",
                if *dry_run { "would remove" } else { "removed" }
            ),
            Self::InstanceRemoved { id, dry_run } => write!(
                f,
                "{} dead instance {id} (its records, claims, ports and lock file)",
                if *dry_run { "would remove" } else { "removed" }
            ),
            Self::Error(e) => write!(f, "error: {e}"),
        }
    }
}

/// Everything one sweep found and did. `Display` prints one line per finding, or
/// `nothing to clean up`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SweepReport {
    pub dry_run: bool,
    pub findings: Vec<Finding>,
}

impl SweepReport {
    /// True when there was nothing to do.
    pub fn is_empty(&self) -> bool {
        self.findings.is_empty()
    }

    /// Pids that were stopped.
    pub fn stopped(&self) -> Vec<u32> {
        self.pids(|f| matches!(f, Finding::Stopped { .. }))
    }

    /// Pids that a dry run would stop.
    pub fn would_stop(&self) -> Vec<u32> {
        self.pids(|f| matches!(f, Finding::WouldStop { .. }))
    }

    /// Pids that were left alone because they could not be proven a dead owner's.
    pub fn left_alone(&self) -> Vec<u32> {
        self.pids(|f| matches!(f, Finding::LeftAlone { .. }))
    }

    /// True if something went wrong (a process survived, or the store failed).
    pub fn has_errors(&self) -> bool {
        self.findings
            .iter()
            .any(|f| matches!(f, Finding::NotStopped { .. } | Finding::Error(_)))
    }

    fn pids(&self, pick: impl Fn(&Finding) -> bool) -> Vec<u32> {
        self.findings
            .iter()
            .filter(|f| pick(f))
            .filter_map(|f| match f {
                Finding::Stopped { pid, .. }
                | Finding::WouldStop { pid, .. }
                | Finding::NotStopped { pid, .. }
                | Finding::LeftAlone { pid, .. }
                | Finding::RecordRemoved { pid, .. } => Some(*pid),
                _ => None,
            })
            .collect()
    }
}

impl fmt::Display for SweepReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.findings.is_empty() {
            return f.write_str("nothing to clean up");
        }
        for (i, finding) in self.findings.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{finding}")?;
        }
        Ok(())
    }
}

/// Sweeps `state_dir` with the default grace. `own_instance` is the caller's instance id
/// (`None` for `llmvisor gc`). Never fails: problems are findings in the report.
pub async fn run(
    state_dir: &Path,
    store: &Store,
    own_instance: Option<&str>,
    dry_run: bool,
) -> SweepReport {
    let opts = SweepOptions {
        own_instance: own_instance.map(str::to_owned),
        dry_run,
        grace: DEFAULT_GRACE,
    };
    run_with(state_dir, store, &opts).await
}

/// What the sweep must never signal, whatever a proof says: pid ≤ 1, itself, its ancestors and
/// its own process group; and whose processes it may signal at all (its own uid's).
#[derive(Debug, Clone)]
struct Guard {
    /// This process and its ancestors.
    protected: HashSet<u32>,
    own_pgrp: Option<u32>,
    euid: u32,
}

impl Guard {
    fn new() -> Self {
        Self {
            protected: self_and_ancestors(),
            own_pgrp: procfs::stat(std::process::id()).map(|s| s.pgrp),
            euid: rustix::process::geteuid().as_raw(),
        }
    }

    /// Why `pid` may never be signalled, if it may not.
    fn forbids(&self, pid: u32) -> Option<&'static str> {
        if pid <= 1 {
            Some("pid 1 and below are never signalled")
        } else if self.protected.contains(&pid) {
            Some("it is this process or one of its ancestors")
        } else if self.own_pgrp == Some(pid) {
            Some("it leads this process's own process group")
        } else {
            None
        }
    }

    /// True if the group led by `pgid` may be signalled as a whole.
    fn allows_group(&self, pgid: u32) -> bool {
        self.forbids(pgid).is_none()
            && procfs::live_group_members(pgid)
                .iter()
                .all(|&m| self.forbids(m).is_none() && self.owns(m))
    }

    /// True if `pid` runs as our uid (real and effective).
    fn owns(&self, pid: u32) -> bool {
        procfs::uids(pid) == Some((self.euid, self.euid))
    }

    /// Why the live process `pid` (started at `start_time`) is not proven to carry `marker`
    /// under our uid, if it is not.
    fn unproven(&self, pid: u32, start_time: u64, marker: Option<&str>) -> Option<String> {
        if let Some(why) = self.forbids(pid) {
            return Some(why.to_owned());
        }
        match procfs::stat(pid) {
            Some(s) if !s.is_zombie() && s.start_time == start_time => {}
            _ => return Some("it is gone".to_owned()),
        }
        if let Some(m) = marker {
            if procfs::environ_var(pid, INSTANCE_ENV).as_deref() != Some(m) {
                return Some(format!(
                    "it does not carry {INSTANCE_ENV}={m} (a record alone proves nothing)"
                ));
            }
        }
        match procfs::uids(pid) {
            Some(ids) if ids == (self.euid, self.euid) => None,
            Some((real, eff)) => Some(format!(
                "it runs as uid {real} (effective {eff}), not as ours ({})",
                self.euid
            )),
            None => Some("it is gone".to_owned()),
        }
    }
}

/// A process believed to be a dead owner's, with the facts to prove it again.
#[derive(Debug, Clone)]
struct Candidate {
    pid: u32,
    start_time: u64,
    /// The marker value it must carry; `None` only for members of a proven leader's group.
    marker: Option<String>,
    /// For record candidates: the record's (instance, pid).
    record: Option<(String, u32)>,
    subject: Subject,
}

impl Candidate {
    /// The proof, checked now against `/proc`.
    fn holds(&self, guard: &Guard) -> bool {
        guard
            .unproven(self.pid, self.start_time, self.marker.as_deref())
            .is_none()
    }

    /// True once the proven process is gone (exited; a zombie counts as gone).
    fn gone(&self) -> bool {
        procfs::stat(self.pid).is_none_or(|s| s.is_zombie() || s.start_time != self.start_time)
    }

    /// True if it is alive and (still) leads its own process group.
    fn leads_group(&self) -> bool {
        procfs::stat(self.pid).is_some_and(|s| {
            !s.is_zombie() && s.start_time == self.start_time && s.pgrp == self.pid
        })
    }
}

/// A candidate whose proof held after its pidfd was opened.
struct Proven {
    cand: Candidate,
    fd: OwnedFd,
}

/// Sweeps `state_dir` as `opts` say: [`plan`], then, unless a dry run, [`execute`]. See the
/// module docs for what is proven and how.
pub async fn run_with(state_dir: &Path, store: &Store, opts: &SweepOptions) -> SweepReport {
    let plan = plan(state_dir, store, opts.own_instance.as_deref()).await;
    if opts.dry_run {
        plan.report()
    } else {
        execute(plan, state_dir, store, opts.grace).await
    }
}

/// What a sweep would do, decided from the store and `/proc` alone: nothing is signalled and
/// nothing in the store is changed to make it. `Display` prints it as a dry run reports it.
#[derive(Debug)]
pub struct SweepPlan {
    /// What needs no signal: processes left alone (and why), records to remove (and why),
    /// problems met while planning. In the order found.
    findings: Vec<Finding>,
    /// Proven processes of dead owners, to be stopped.
    stop: Vec<Candidate>,
    /// Candidates whose proof no longer held at the end of planning (most likely: they
    /// exited). Not reported by a dry run; a real run drops their records.
    vanished: Vec<Candidate>,
    /// Live members of a proven leader's group, of our uid, found while planning. A real run
    /// finds them again after opening the leaders' pidfds (and again before SIGKILL).
    members: Vec<(u32, Subject)>,
    /// Records to remove: (instance, pid).
    drop_rows: Vec<(String, u32)>,
    /// Dead instances, to remove from the store once nothing of theirs is left.
    dead: BTreeSet<String>,
    guard: Guard,
}

impl SweepPlan {
    /// The processes that would be stopped, with what proves them a dead owner's: proven ones
    /// first, then members of their groups.
    pub fn would_stop(&self) -> Vec<(u32, &Subject)> {
        self.stop
            .iter()
            .map(|c| (c.pid, &c.subject))
            .chain(self.members.iter().map(|(pid, s)| (*pid, s)))
            .collect()
    }

    /// What needs no signal: processes left alone, records to remove, problems met.
    pub fn findings(&self) -> &[Finding] {
        &self.findings
    }

    /// The dead instances that would be removed.
    pub fn dead_instances(&self) -> impl Iterator<Item = &str> {
        self.dead.iter().map(String::as_str)
    }

    /// The plan as a dry run reports it.
    pub fn report(&self) -> SweepReport {
        let mut findings = self.findings.clone();
        findings.extend(
            self.would_stop()
                .into_iter()
                .map(|(pid, subject)| Finding::WouldStop {
                    pid,
                    subject: subject.clone(),
                }),
        );
        findings.extend(self.dead.iter().map(|id| Finding::InstanceRemoved {
            id: id.clone(),
            dry_run: true,
        }));
        SweepReport {
            dry_run: true,
            findings,
        }
    }
}

impl fmt::Display for SweepPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.report().fmt(f)
    }
}

/// Decides what a sweep of `state_dir` would do (see [`SweepPlan`]). `own_instance` is the
/// caller's instance id (`None` for `llmvisor gc`): never looked at. Never fails: problems are
/// findings of the plan.
pub async fn plan(state_dir: &Path, store: &Store, own_instance: Option<&str>) -> SweepPlan {
    let mut plan = SweepPlan {
        findings: Vec::new(),
        stop: Vec::new(),
        vanished: Vec::new(),
        members: Vec::new(),
        drop_rows: Vec::new(),
        dead: BTreeSet::new(),
        guard: Guard::new(),
    };
    let rows = store.children().await.unwrap_or_else(|e| {
        plan.findings.push(Finding::Error(format!(
            "cannot read the recorded servers: {e}"
        )));
        Vec::new()
    });
    let instances = store.instances().await.unwrap_or_else(|e| {
        plan.findings
            .push(Finding::Error(format!("cannot read the instances: {e}")));
        Vec::new()
    });

    // Every instance this state dir knows of, and which of them are dead.
    let mut known: BTreeSet<String> = instances
        .iter()
        .map(|i| i.id.clone())
        .chain(rows.iter().map(|r| r.instance_id.clone()))
        .chain(owner::lock_files(state_dir))
        .collect();
    if let Some(own) = own_instance {
        known.remove(own);
    }
    plan.dead = known
        .iter()
        .filter(|id| owner::probe(state_dir, id) != Liveness::Alive)
        .cloned()
        .collect();

    let boot = procfs::boot_id();
    for row in &rows {
        if plan.dead.contains(&row.instance_id) {
            plan.judge_record(row, boot.as_deref());
        }
    }

    // Processes carrying a dead owner's marker.
    let hits = {
        let skip = plan.guard.protected.clone();
        match tokio::task::spawn_blocking(move || scan_markers(&skip)).await {
            Ok(hits) => hits,
            Err(e) => {
                plan.findings.push(Finding::Error(format!(
                    "cannot scan processes for {INSTANCE_ENV}: {e}"
                )));
                Vec::new()
            }
        }
    };
    for (pid, stat, id) in hits {
        if Some(id.as_str()) == own_instance || plan.stop.iter().any(|c| c.pid == pid) {
            continue;
        }
        if !plan.dead.contains(&id) {
            // A live owner's, or an instance this state dir does not know (another state dir's):
            // not ours to judge. A lock file that appeared since the listing may still tell.
            if known.contains(&id) || owner::probe(state_dir, &id) != Liveness::Dead {
                continue;
            }
            known.insert(id.clone());
            plan.dead.insert(id.clone());
        }
        plan.judge_marked(pid, stat, id, &rows);
    }

    // The proofs, checked once more now that the list is complete; then the groups.
    let guard = &plan.guard;
    let (stop, vanished) = std::mem::take(&mut plan.stop)
        .into_iter()
        .partition(|c| c.holds(guard));
    (plan.stop, plan.vanished) = (stop, vanished);
    let mut listed: HashSet<u32> = plan.stop.iter().map(|c| c.pid).collect();
    for c in &plan.stop {
        if !(c.leads_group() && guard.forbids(c.pid).is_none()) {
            continue;
        }
        for m in procfs::live_group_members(c.pid) {
            let ours = guard.forbids(m).is_none() && guard.owns(m);
            if ours && listed.insert(m) {
                plan.members.push((m, member_subject(c, m)));
            }
        }
    }
    plan
}

impl SweepPlan {
    /// A `children` record of a dead owner: a candidate if the live process proves it, else
    /// left alone; a record naming nothing (any more) is dropped.
    fn judge_record(&mut self, row: &ChildRecord, boot: Option<&str>) {
        let removed = |reason| Finding::RecordRemoved {
            pid: row.pid,
            model: row.model.clone(),
            owner: row.instance_id.clone(),
            reason,
            dry_run: true,
        };
        let key = (row.instance_id.clone(), row.pid);
        let earlier_boot = boot.is_some_and(|b| !row.boot_id.is_empty() && row.boot_id != b);
        let reason = if earlier_boot {
            RECORD_EARLIER_BOOT
        } else {
            match procfs::stat(row.pid).filter(|s| !s.is_zombie()) {
                Some(s) if s.start_time == row.start_time => {
                    match self
                        .guard
                        .unproven(row.pid, row.start_time, Some(&row.instance_id))
                    {
                        None => {
                            self.stop.push(record_candidate(row));
                            return;
                        }
                        Some(why) => {
                            self.findings.push(Finding::LeftAlone {
                                pid: row.pid,
                                reason: format!(
                                    "recorded as model {} of owner {}, but {why}",
                                    row.model, row.instance_id
                                ),
                            });
                            RECORD_UNPROVEN
                        }
                    }
                }
                // Someone else's pid now — unless it carries this dead owner's marker itself, in
                // which case the marker scan proves it.
                Some(_)
                    if procfs::environ_var(row.pid, INSTANCE_ENV).as_ref()
                        == Some(&row.instance_id) =>
                {
                    RECORD_PID_REUSED
                }
                Some(_) => {
                    self.findings.push(Finding::LeftAlone {
                        pid: row.pid,
                        reason: format!(
                            "start time differs from the record (pid reused; the record was \
                             model {} of owner {})",
                            row.model, row.instance_id
                        ),
                    });
                    RECORD_PID_REUSED
                }
                None => RECORD_GONE,
            }
        };
        self.findings.push(removed(reason));
        self.drop_rows.push(key);
    }

    /// A live process carrying dead owner `id`'s marker: a candidate if it is ours to signal.
    fn judge_marked(&mut self, pid: u32, stat: ProcStat, id: String, rows: &[ChildRecord]) {
        if let Some(why) = self.guard.unproven(pid, stat.start_time, Some(&id)) {
            self.findings.push(Finding::LeftAlone {
                pid,
                reason: format!("it carries {INSTANCE_ENV} of dead owner {id}, but {why}"),
            });
            return;
        }
        let model = rows
            .iter()
            .find(|r| r.instance_id == id && r.pgid == stat.pgrp)
            .map(|r| r.model.clone());
        self.stop.push(Candidate {
            pid,
            start_time: stat.start_time,
            marker: Some(id.clone()),
            record: None,
            subject: Subject {
                owner: id,
                model,
                comm: procfs::comm(pid),
                proof: Proof::Marker,
            },
        });
    }
}

/// Carries out `plan`: proves every process again through a pidfd, stops what is proven
/// ([`escalate`]: SIGTERM, up to `grace`, SIGKILL), then forgets in the store what is gone.
pub async fn execute(
    plan: SweepPlan,
    state_dir: &Path,
    store: &Store,
    grace: Duration,
) -> SweepReport {
    let SweepPlan {
        findings,
        stop,
        vanished,
        members: _,
        mut drop_rows,
        dead,
        guard,
    } = plan;
    let removed = |pid, subject: &Subject, reason| Finding::RecordRemoved {
        pid,
        model: subject.model.clone().unwrap_or_default(),
        owner: subject.owner.clone(),
        reason,
        dry_run: false,
    };
    let mut report = SweepReport {
        dry_run: false,
        findings: findings
            .into_iter()
            .map(|mut f| {
                if let Finding::RecordRemoved { dry_run, .. } = &mut f {
                    *dry_run = false;
                }
                f
            })
            .collect(),
    };

    // Prove again through a pidfd; collect the groups of proven leaders.
    let mut targets = Sweeping {
        proven: Vec::new(),
        guard: &guard,
        termed: None,
        grace,
    };
    let mut keep_instance: HashSet<String> = HashSet::new();
    let vanished = vanished.into_iter().map(|c| (c, Err(None)));
    let opened = stop.into_iter().map(|c| {
        let fd = open_proven(&c, &guard);
        (c, fd)
    });
    for (c, fd) in vanished.chain(opened) {
        match fd {
            Ok(fd) => targets.proven.push(Proven { cand: c, fd }),
            Err(None) => {
                if let Some(key) = c.record.clone() {
                    report
                        .findings
                        .push(removed(c.pid, &c.subject, RECORD_GONE));
                    drop_rows.push(key);
                }
            }
            Err(Some(e)) => {
                keep_instance.insert(c.subject.owner.clone());
                report.findings.push(Finding::LeftAlone {
                    pid: c.pid,
                    reason: format!(
                        "cannot open a pidfd for it ({e}), so it cannot be signalled safely"
                    ),
                });
            }
        }
    }
    add_group_members(&mut targets.proven, &guard);

    escalate(&mut targets, grace).await;

    for p in &targets.proven {
        let c = &p.cand;
        if c.gone() {
            let termed = targets.termed.as_ref().is_none_or(|t| t.contains(&c.pid));
            report.findings.push(Finding::Stopped {
                pid: c.pid,
                subject: c.subject.clone(),
                killed_after: (!termed).then_some(grace),
            });
            if let Some(key) = c.record.clone() {
                drop_rows.push(key);
            }
        } else {
            keep_instance.insert(c.subject.owner.clone());
            report.findings.push(Finding::NotStopped {
                pid: c.pid,
                subject: c.subject.clone(),
                reason: "still running after SIGKILL".into(),
            });
        }
    }

    // The store: forget what is gone.
    for (instance, pid) in &drop_rows {
        if let Err(e) = store.remove_child(instance, *pid).await {
            report.findings.push(Finding::Error(format!(
                "cannot remove the record of pid {pid}: {e}"
            )));
        }
    }
    for id in dead.iter().filter(|id| !keep_instance.contains(*id)) {
        match store.remove_instance(id).await {
            Ok(()) => {
                owner::remove_if_stale(state_dir, id);
                report.findings.push(Finding::InstanceRemoved {
                    id: id.clone(),
                    dry_run: false,
                });
            }
            Err(e) => report.findings.push(Finding::Error(format!(
                "cannot remove dead instance {id}: {e}"
            ))),
        }
    }
    report
}

/// The proven processes of a real run, as [`escalate`] stops them.
struct Sweeping<'a> {
    proven: Vec<Proven>,
    guard: &'a Guard,
    /// Once the grace is over: the pids SIGTERM stopped. `None`: SIGTERM stopped them all.
    termed: Option<HashSet<u32>>,
    grace: Duration,
}

impl Targets for Sweeping<'_> {
    fn signal(&mut self, sig: Signal) {
        signal_all(&self.proven, sig, self.guard);
    }

    fn all_gone(&self) -> bool {
        self.proven.iter().all(|p| p.cand.gone())
    }

    fn grace_over(&mut self) {
        self.termed = Some(
            self.proven
                .iter()
                .filter(|p| p.cand.gone())
                .map(|p| p.cand.pid)
                .collect(),
        );
        // Members that joined a proven group since SIGTERM get SIGKILL too.
        add_group_members(&mut self.proven, self.guard);
        let left: Vec<u32> = self
            .proven
            .iter()
            .filter(|p| !p.cand.gone())
            .map(|p| p.cand.pid)
            .collect();
        tracing::info!(
            pids = ?left,
            "still running {} after SIGTERM; sending SIGKILL",
            units::format_duration(self.grace)
        );
    }
}

fn record_candidate(row: &ChildRecord) -> Candidate {
    Candidate {
        pid: row.pid,
        start_time: row.start_time,
        marker: Some(row.instance_id.clone()),
        record: Some((row.instance_id.clone(), row.pid)),
        subject: Subject {
            owner: row.instance_id.clone(),
            model: Some(row.model.clone()),
            comm: procfs::comm(row.pid),
            proof: Proof::Record,
        },
    }
}

fn member_subject(leader: &Candidate, pid: u32) -> Subject {
    Subject {
        owner: leader.subject.owner.clone(),
        model: leader.subject.model.clone(),
        comm: procfs::comm(pid),
        proof: Proof::GroupOf(leader.pid),
    }
}

/// Opens a pidfd for `c` and proves it again, so the pidfd surely refers to the proven process.
/// `Err(None)`: it is gone (or no longer proven); `Err(Some(e))`: no pidfd could be had.
fn open_proven(c: &Candidate, guard: &Guard) -> Result<OwnedFd, Option<Errno>> {
    let fd = match pidfd::open(c.pid) {
        Ok(fd) => fd,
        Err(Errno::SRCH) => return Err(None),
        Err(e) => return Err(Some(e)),
    };
    if c.holds(guard) {
        Ok(fd)
    } else {
        Err(None)
    }
}

/// Adds the live members of every proven leader's group (proven as such: they are of our uid and
/// in the group while its proven leader still leads it).
fn add_group_members(proven: &mut Vec<Proven>, guard: &Guard) {
    let mut added = Vec::new();
    for leader in proven.iter() {
        let l = &leader.cand;
        if guard.forbids(l.pid).is_some() || !l.leads_group() {
            continue;
        }
        for m in procfs::live_group_members(l.pid) {
            if proven.iter().any(|p| p.cand.pid == m)
                || added.iter().any(|p: &Proven| p.cand.pid == m)
            {
                continue;
            }
            let Some(before) = procfs::stat(m).filter(|s| !s.is_zombie()) else {
                continue;
            };
            let cand = Candidate {
                pid: m,
                start_time: before.start_time,
                marker: None,
                record: None,
                subject: member_subject(l, m),
            };
            let Ok(fd) = open_proven(&cand, guard) else {
                continue;
            };
            let still_member = procfs::stat(m).is_some_and(|s| s.pgrp == l.pid);
            if still_member && l.leads_group() {
                added.push(Proven { cand, fd });
            }
        }
    }
    proven.extend(added);
}

/// Sends `sig` to every proven process still there: a whole group at once, through its proven
/// leader's pidfd, where that leader still leads it and every member is ours; each remaining one
/// through its own pidfd.
fn signal_all(proven: &[Proven], sig: Signal, guard: &Guard) {
    let mut groups: HashSet<u32> = HashSet::new();
    for p in proven {
        let c = &p.cand;
        if !(c.holds(guard) && c.leads_group() && guard.allows_group(c.pid)) {
            continue;
        }
        match pidfd::signal_group(&p.fd, sig) {
            Ok(()) => {
                groups.insert(c.pid);
            }
            Err(Errno::SRCH) => {}
            // A kernel before 6.9: no group flag. Each proven process gets its own signal below.
            Err(Errno::INVAL) => {}
            Err(e) => tracing::warn!(pgid = c.pid, ?sig, "cannot signal group: {e}"),
        }
    }
    // Where a group signal reached a process, do not signal it twice (a second SIGTERM makes
    // some servers skip their graceful shutdown).
    let in_signalled_group: HashMap<u32, bool> = proven
        .iter()
        .map(|p| {
            let pgrp = procfs::stat(p.cand.pid).map(|s| s.pgrp);
            (p.cand.pid, pgrp.is_some_and(|g| groups.contains(&g)))
        })
        .collect();
    for p in proven {
        if in_signalled_group[&p.cand.pid] || p.cand.gone() || guard.forbids(p.cand.pid).is_some() {
            continue;
        }
        match pidfd::signal(&p.fd, sig) {
            Ok(()) | Err(Errno::SRCH) => {}
            Err(e) => tracing::warn!(pid = p.cand.pid, ?sig, "cannot signal through pidfd: {e}"),
        }
    }
}

/// Every live process whose environment carries `LLMVISOR_INSTANCE`, with its stat and the
/// marker's value. The stat is read before and after the environment, so both belong to one
/// process.
fn scan_markers(skip: &HashSet<u32>) -> Vec<(u32, ProcStat, String)> {
    let mut hits = Vec::new();
    for pid in procfs::all_pids() {
        if skip.contains(&pid) {
            continue;
        }
        let Some(before) = procfs::stat(pid).filter(|s| !s.is_zombie()) else {
            continue;
        };
        let Some(id) = procfs::environ_var(pid, INSTANCE_ENV) else {
            continue;
        };
        if procfs::is_same_process(pid, before.start_time) {
            hits.push((pid, before, id));
        }
    }
    hits
}

/// This process and its ancestors: never candidates, whatever their environment says.
fn self_and_ancestors() -> HashSet<u32> {
    let mut out = HashSet::new();
    let mut pid = std::process::id();
    while pid > 1 && out.insert(pid) {
        match procfs::stat(pid) {
            Some(s) => pid = s.ppid,
            None => break,
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subject(proof: Proof) -> Subject {
        Subject {
            owner: "lv-99-ab12".into(),
            model: Some("gemma".into()),
            comm: Some("sleep".into()),
            proof,
        }
    }

    #[test]
    fn report_lines_read_well() {
        let empty = SweepReport::default();
        assert_eq!(empty.to_string(), "nothing to clean up");
        let report = SweepReport {
            dry_run: false,
            findings: vec![
                Finding::Stopped {
                    pid: 1234,
                    subject: subject(Proof::Record),
                    killed_after: None,
                },
                Finding::Stopped {
                    pid: 1235,
                    subject: subject(Proof::GroupOf(1234)),
                    killed_after: Some(Duration::from_secs(5)),
                },
                Finding::LeftAlone {
                    pid: 77,
                    reason: "start time differs from the record (pid reused)".into(),
                },
            ],
        };
        let text = report.to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "stopped pid 1234 (model gemma, owner lv-99-ab12, dead) with SIGTERM"
        );
        assert_eq!(
            lines[1],
            "stopped pid 1235 (sleep, model gemma, in the group of pid 1234, owner lv-99-ab12, \
             dead) with SIGKILL (5s after SIGTERM)"
        );
        assert_eq!(
            lines[2],
            "left pid 77 alone: start time differs from the record (pid reused)"
        );
        assert_eq!(report.stopped(), vec![1234, 1235]);
        assert_eq!(report.left_alone(), vec![77]);
        let marker = Finding::WouldStop {
            pid: 9,
            subject: Subject {
                model: None,
                ..subject(Proof::Marker)
            },
        };
        assert_eq!(
            marker.to_string(),
            "would stop pid 9 (sleep, LLMVISOR_INSTANCE of owner lv-99-ab12, dead)"
        );
    }

    #[test]
    fn the_sweeping_process_and_its_ancestors_are_never_candidates() {
        let skip = self_and_ancestors();
        assert!(skip.contains(&std::process::id()));
        let parent = procfs::stat(std::process::id()).unwrap().ppid;
        if parent > 1 {
            assert!(skip.contains(&parent));
        }
        assert!(!skip.contains(&1));
    }
}
