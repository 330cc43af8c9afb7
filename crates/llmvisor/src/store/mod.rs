//! The state store: what every llmvisor process on a state dir knows about the others, in
//! SQLite at `<state_dir>/state.db`.
//!
//! * Every server process (model, pid + start time, group, port or socket, owning instance, boot)
//!   so that an orphan sweep can later prove what is ours.
//! * Every instance, claims (at most one owner per model across processes), ports (never handed
//!   out twice) and remote leases (a server used by a process other than its owner).
//!
//! All SQLite work of a [`Store`] runs on one dedicated thread: the async methods send a closure
//! there and await the reply, so no tokio worker ever blocks on the database (or on another
//! process's write lock: `busy_timeout` is 5 s). Every read-then-write runs in a
//! `BEGIN IMMEDIATE` transaction, so two processes never both decide from the same stale read.
//! Liveness of other instances comes from [`crate::owner`], never from pids.
//!
//! Startup order of an instance: [`crate::owner::OwnerLock::acquire`] first (from then on the
//! instance is alive to everyone), then [`Store::open`], [`Store::register_instance`], the
//! orphan sweep ([`crate::sweep::run`]), and only then spawning. A clean exit ends with
//! [`Store::remove_instance`] and dropping the lock.

mod schema;

use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OptionalExtension, Row, TransactionBehavior};
use tokio::sync::oneshot;

use crate::{owner, procfs};

pub use schema::SCHEMA_VERSION;

/// The database file inside the state dir.
pub const DB_FILE: &str = "state.db";
/// `PRAGMA application_id` of an llmvisor state database ("LMVS").
pub const APPLICATION_ID: i32 = 0x4c4d_5653;
/// How long a statement waits for another process's write lock.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the store could not be opened or used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot use state directory {}: {source} (fix: create it and make it writable, or pass --state-dir)", path.display())]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "state database {} is corrupt or not llmvisor's: {reason}. To recover, move it aside \
         (mv {} {}.bad) and start again; llmvisor will sweep what it can prove is its own",
        path.display(), path.display(), path.display()
    )]
    Corrupt { path: PathBuf, reason: String },
    #[error("state database {}: {source}", path.display())]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("the state store {} is closed", path.display())]
    Closed { path: PathBuf },
    #[error("cannot start the state store thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// One llmvisor instance (a process using the state dir).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceRecord {
    pub id: String,
    pub pid: u32,
    /// `/proc/PID/stat` field 22 of `pid`.
    pub start_time: u64,
    pub boot_id: String,
    pub started_at: SystemTime,
}

impl InstanceRecord {
    /// The record of this process as instance `id`.
    pub fn current(id: &str) -> Self {
        let pid = std::process::id();
        Self {
            id: id.to_owned(),
            pid,
            start_time: procfs::stat(pid).map_or(0, |s| s.start_time),
            boot_id: procfs::boot_id().unwrap_or_default(),
            started_at: now(),
        }
    }
}

/// One server process started by an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildRecord {
    /// The owning instance; the child carries it as `LLMVISOR_INSTANCE`.
    pub instance_id: String,
    pub model: String,
    pub pid: u32,
    /// `/proc/PID/stat` field 22: with `pid`, names this process for all time within a boot.
    pub start_time: u64,
    pub pgid: u32,
    pub port: Option<u16>,
    pub socket: Option<PathBuf>,
    pub boot_id: String,
    /// Free text chosen by the supervisor ("starting", "ready", "stopping", …).
    pub state: String,
    pub started_at: SystemTime,
    pub updated_at: SystemTime,
}

impl ChildRecord {
    /// The record of the running process `pid` (start time and group read from `/proc` now),
    /// or `None` if it is already gone.
    pub fn of_process(
        instance_id: &str,
        model: &str,
        pid: u32,
        port: Option<u16>,
        socket: Option<PathBuf>,
        state: &str,
    ) -> Option<Self> {
        let stat = procfs::stat(pid).filter(|s| !s.is_zombie())?;
        let at = now();
        Some(Self {
            instance_id: instance_id.to_owned(),
            model: model.to_owned(),
            pid,
            start_time: stat.start_time,
            pgid: stat.pgrp,
            port,
            socket,
            boot_id: procfs::boot_id().unwrap_or_default(),
            state: state.to_owned(),
            started_at: at,
            updated_at: at,
        })
    }
}

/// The answer to [`Store::claim_model`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimOutcome {
    /// The model is ours now (or already was).
    Claimed,
    /// It was held by `from`, a dead instance; it is ours now.
    TakenOver { from: String },
    /// A live instance owns it.
    HeldBy(String),
}

impl ClaimOutcome {
    /// True if the caller holds the claim now.
    pub fn is_ours(&self) -> bool {
        !matches!(self, Self::HeldBy(_))
    }
}

/// A lease on a model held by an instance other than the model's owner, kept alive by renewal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteLease {
    pub id: String,
    pub model: String,
    /// The instance holding the lease.
    pub holder: String,
    pub expires_at: SystemTime,
}

/// Handle to the state store. Cheap to clone; the store thread ends when the last clone is
/// dropped (or at [`Store::close`]).
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    jobs: std_mpsc::Sender<Msg>,
    path: PathBuf,
    state_dir: PathBuf,
}

/// What the store thread owns.
pub(crate) struct Db {
    conn: Connection,
    path: PathBuf,
    state_dir: PathBuf,
}

type Job = Box<dyn FnOnce(&mut Db) + Send>;

enum Msg {
    Job(Job),
    Close(oneshot::Sender<()>),
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.inner.path)
            .finish()
    }
}

impl Store {
    /// Opens `<state_dir>/state.db`, creating the dir (0700) and the file (0600) if needed,
    /// checking that it is an intact llmvisor database, and migrating it to the current schema.
    pub async fn open(state_dir: &Path) -> Result<Store, StoreError> {
        let (tx, rx) = oneshot::channel();
        let store = Self::start(state_dir, move |r| {
            let _ = tx.send(r);
        })?;
        rx.await.map_err(|_| store.closed())??;
        Ok(store)
    }

    /// [`Store::open`] for synchronous callers: blocks the calling thread while the database is
    /// opened (up to the busy timeout if another process is migrating it). Do not call it on a
    /// tokio worker thread that must stay responsive.
    pub fn open_blocking(state_dir: &Path) -> Result<Store, StoreError> {
        let (tx, rx) = std_mpsc::channel();
        let store = Self::start(state_dir, move |r| {
            let _ = tx.send(r);
        })?;
        rx.recv().map_err(|_| store.closed())??;
        Ok(store)
    }

    /// Starts the store thread, which opens the database, tells `opened` how that went, and
    /// then serves jobs.
    fn start(
        state_dir: &Path,
        opened: impl FnOnce(Result<(), StoreError>) + Send + 'static,
    ) -> Result<Store, StoreError> {
        let (jobs, queue) = std_mpsc::channel::<Msg>();
        let dir = state_dir.to_owned();
        std::thread::Builder::new()
            .name("llmvisor-store".into())
            .spawn(move || match schema::open(&dir) {
                Ok(db) => {
                    opened(Ok(()));
                    serve(db, queue);
                }
                Err(e) => opened(Err(e)),
            })
            .map_err(StoreError::Thread)?;
        Ok(Store {
            inner: Arc::new(Inner {
                jobs,
                path: state_dir.join(DB_FILE),
                state_dir: state_dir.to_owned(),
            }),
        })
    }

    fn closed(&self) -> StoreError {
        StoreError::Closed {
            path: self.inner.path.clone(),
        }
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The state dir this store lives in.
    pub fn state_dir(&self) -> &Path {
        &self.inner.state_dir
    }

    /// Stops the store thread (closing the database) and waits for it. Calls through other
    /// clones fail with [`StoreError::Closed`] afterwards.
    pub async fn close(self) {
        let (tx, rx) = oneshot::channel();
        if self.inner.jobs.send(Msg::Close(tx)).is_ok() {
            let _ = rx.await;
        }
    }

    /// The schema version of the open database (`PRAGMA user_version`).
    pub async fn schema_version(&self) -> Result<u32, StoreError> {
        self.call(|db| db.conn.query_row("PRAGMA user_version", [], |r| r.get(0)))
            .await
    }

    /// What `file` took when run with memory-shaping flags `shape` (see
    /// `Memory::learn_key`), as remembered by [`Self::remember_memory`].
    pub async fn learned_memory(&self, file: &str, shape: &str) -> Result<Option<u64>, StoreError> {
        let (file, shape) = (file.to_owned(), shape.to_owned());
        self.call(move |db| {
            db.conn
                .query_row(
                    "SELECT bytes FROM learned_memory WHERE file = ?1 AND shape = ?2",
                    params![file, shape],
                    |r| r.get::<_, i64>(0),
                )
                .optional()
                .map(|b| b.map(|b| b.max(0) as u64))
        })
        .await
    }

    /// Remembers what `file` at `shape` took: the larger of this and what was remembered.
    pub async fn remember_memory(
        &self,
        file: &str,
        shape: &str,
        bytes: u64,
    ) -> Result<(), StoreError> {
        let (file, shape) = (file.to_owned(), shape.to_owned());
        let bytes = i64::try_from(bytes).unwrap_or(i64::MAX);
        self.write(move |tx| {
            tx.execute(
                "INSERT INTO learned_memory (file, shape, bytes, updated_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (file, shape) DO UPDATE
                 SET bytes = max(bytes, excluded.bytes), updated_at = excluded.updated_at",
                params![file, shape, bytes, to_ms(now())],
            )?;
            Ok(())
        })
        .await
    }

    /// Records (or replaces) an instance.
    pub async fn register_instance(&self, rec: &InstanceRecord) -> Result<(), StoreError> {
        let rec = rec.clone();
        self.call(move |db| {
            db.conn.execute(
                "INSERT OR REPLACE INTO instances (id, pid, start_time, boot_id, started_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    rec.id,
                    rec.pid,
                    rec.start_time as i64,
                    rec.boot_id,
                    to_ms(rec.started_at)
                ],
            )?;
            Ok(())
        })
        .await
    }

    /// Every recorded instance, in id order.
    pub async fn instances(&self) -> Result<Vec<InstanceRecord>, StoreError> {
        self.call(|db| {
            let mut stmt = db.conn.prepare(
                "SELECT id, pid, start_time, boot_id, started_at FROM instances ORDER BY id",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok(InstanceRecord {
                    id: r.get(0)?,
                    pid: r.get(1)?,
                    start_time: r.get::<_, i64>(2)? as u64,
                    boot_id: r.get(3)?,
                    started_at: from_ms(r.get(4)?),
                })
            })?;
            rows.collect()
        })
        .await
    }

    /// Forgets instance `id` with its children, claims, ports and remote leases (it ended, or a
    /// sweep found it dead).
    pub async fn remove_instance(&self, id: &str) -> Result<(), StoreError> {
        let id = id.to_owned();
        self.write(move |tx| {
            tx.execute("DELETE FROM children WHERE instance_id = ?1", [&id])?;
            tx.execute("DELETE FROM claims WHERE instance_id = ?1", [&id])?;
            tx.execute("DELETE FROM ports WHERE instance_id = ?1", [&id])?;
            tx.execute("DELETE FROM remote_leases WHERE holder = ?1", [&id])?;
            tx.execute("DELETE FROM instances WHERE id = ?1", [&id])?;
            Ok(())
        })
        .await
    }

    /// Records (or replaces) a server process.
    pub async fn record_child(&self, rec: &ChildRecord) -> Result<(), StoreError> {
        let rec = rec.clone();
        self.call(move |db| {
            db.conn.execute(
                "INSERT OR REPLACE INTO children (instance_id, pid, start_time, pgid, model, port,
                     socket, boot_id, state, started_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                params![
                    rec.instance_id,
                    rec.pid,
                    rec.start_time as i64,
                    rec.pgid,
                    rec.model,
                    rec.port,
                    rec.socket
                        .as_ref()
                        .map(|p| p.to_string_lossy().into_owned()),
                    rec.boot_id,
                    rec.state,
                    to_ms(rec.started_at),
                    to_ms(rec.updated_at)
                ],
            )?;
            Ok(())
        })
        .await
    }

    /// Sets the state of a recorded server. Returns false if there is no such record.
    pub async fn set_child_state(
        &self,
        instance_id: &str,
        pid: u32,
        state: &str,
    ) -> Result<bool, StoreError> {
        let (id, state) = (instance_id.to_owned(), state.to_owned());
        self.call(move |db| {
            let n = db.conn.execute(
                "UPDATE children SET state = ?1, updated_at = ?2
                 WHERE instance_id = ?3 AND pid = ?4",
                params![state, to_ms(now()), id, pid],
            )?;
            Ok(n > 0)
        })
        .await
    }

    /// Forgets a server process (it exited and was reaped).
    pub async fn remove_child(&self, instance_id: &str, pid: u32) -> Result<(), StoreError> {
        let id = instance_id.to_owned();
        self.call(move |db| {
            db.conn.execute(
                "DELETE FROM children WHERE instance_id = ?1 AND pid = ?2",
                params![id, pid],
            )?;
            Ok(())
        })
        .await
    }

    /// Every recorded server process, by instance then pid.
    pub async fn children(&self) -> Result<Vec<ChildRecord>, StoreError> {
        self.call(|db| {
            let mut stmt = db.conn.prepare(
                "SELECT instance_id, pid, start_time, pgid, model, port, socket, boot_id, state,
                        started_at, updated_at
                 FROM children ORDER BY instance_id, pid",
            )?;
            let rows = stmt.query_map([], child_from_row)?;
            rows.collect()
        })
        .await
    }

    /// Makes `instance_id` the one owner of `model` across processes, unless a live instance
    /// holds it. A claim of a dead instance (see [`owner::is_alive`]) is taken over in the same
    /// transaction. Claiming again what one holds is `Claimed`.
    pub async fn claim_model(
        &self,
        model: &str,
        instance_id: &str,
    ) -> Result<ClaimOutcome, StoreError> {
        let (model, me) = (model.to_owned(), instance_id.to_owned());
        self.write_db(move |tx, state_dir| {
            let holder: Option<String> = tx
                .query_row(
                    "SELECT instance_id FROM claims WHERE model = ?1",
                    [&model],
                    |r| r.get(0),
                )
                .optional()?;
            let outcome = match holder {
                Some(h) if h == me => return Ok(ClaimOutcome::Claimed),
                Some(h) if owner::is_alive(state_dir, &h) => return Ok(ClaimOutcome::HeldBy(h)),
                Some(h) => ClaimOutcome::TakenOver { from: h },
                None => ClaimOutcome::Claimed,
            };
            tx.execute(
                "INSERT OR REPLACE INTO claims (model, instance_id, claimed_at)
                 VALUES (?1, ?2, ?3)",
                params![model, me, to_ms(now())],
            )?;
            Ok(outcome)
        })
        .await
    }

    /// Gives up `instance_id`'s claim on `model`. Returns false if it did not hold it.
    pub async fn release_claim(&self, model: &str, instance_id: &str) -> Result<bool, StoreError> {
        let (model, me) = (model.to_owned(), instance_id.to_owned());
        self.call(move |db| {
            let n = db.conn.execute(
                "DELETE FROM claims WHERE model = ?1 AND instance_id = ?2",
                params![model, me],
            )?;
            Ok(n > 0)
        })
        .await
    }

    /// The instance holding the claim on `model`, if any (alive or not).
    pub async fn claim_holder(&self, model: &str) -> Result<Option<String>, StoreError> {
        let model = model.to_owned();
        self.call(move |db| {
            db.conn
                .query_row(
                    "SELECT instance_id FROM claims WHERE model = ?1",
                    [&model],
                    |r| r.get(0),
                )
                .optional()
        })
        .await
    }

    /// Reserves `port` for `instance_id`'s `model`. True if it is ours now (also when we held it
    /// already, or its holder is dead); false if a live instance holds it.
    pub async fn claim_port(
        &self,
        port: u16,
        instance_id: &str,
        model: &str,
    ) -> Result<bool, StoreError> {
        let (me, model) = (instance_id.to_owned(), model.to_owned());
        self.write_db(move |tx, state_dir| {
            let holder: Option<String> = tx
                .query_row(
                    "SELECT instance_id FROM ports WHERE port = ?1",
                    [port],
                    |r| r.get(0),
                )
                .optional()?;
            if let Some(h) = holder {
                if h != me && owner::is_alive(state_dir, &h) {
                    return Ok(false);
                }
            }
            tx.execute(
                "INSERT OR REPLACE INTO ports (port, instance_id, model, claimed_at)
                 VALUES (?1, ?2, ?3, ?4)",
                params![port, me, model, to_ms(now())],
            )?;
            Ok(true)
        })
        .await
    }

    /// Gives a port back. Only its holder can.
    pub async fn release_port(&self, port: u16, instance_id: &str) -> Result<(), StoreError> {
        let me = instance_id.to_owned();
        self.call(move |db| {
            db.conn.execute(
                "DELETE FROM ports WHERE port = ?1 AND instance_id = ?2",
                params![port, me],
            )?;
            Ok(())
        })
        .await
    }

    /// Records (or replaces) a remote lease.
    pub async fn put_remote_lease(&self, lease: &RemoteLease) -> Result<(), StoreError> {
        let lease = lease.clone();
        self.call(move |db| {
            db.conn.execute(
                "INSERT OR REPLACE INTO remote_leases (id, model, holder, expires_at)
                 VALUES (?1, ?2, ?3, ?4)",
                params![lease.id, lease.model, lease.holder, to_ms(lease.expires_at)],
            )?;
            Ok(())
        })
        .await
    }

    /// Moves a remote lease's expiry (the heartbeat). Returns false if the lease is gone.
    pub async fn renew_remote_lease(
        &self,
        id: &str,
        expires_at: SystemTime,
    ) -> Result<bool, StoreError> {
        let id = id.to_owned();
        self.call(move |db| {
            let n = db.conn.execute(
                "UPDATE remote_leases SET expires_at = ?1 WHERE id = ?2",
                params![to_ms(expires_at), id],
            )?;
            Ok(n > 0)
        })
        .await
    }

    /// Ends a remote lease.
    pub async fn remove_remote_lease(&self, id: &str) -> Result<(), StoreError> {
        let id = id.to_owned();
        self.call(move |db| {
            db.conn
                .execute("DELETE FROM remote_leases WHERE id = ?1", [&id])?;
            Ok(())
        })
        .await
    }

    /// The unexpired leases on `model` whose holder is alive. Expired leases and those of dead
    /// holders are deleted on the way.
    pub async fn live_remote_leases(&self, model: &str) -> Result<Vec<RemoteLease>, StoreError> {
        let model = model.to_owned();
        self.write_db(move |tx, state_dir| {
            tx.execute(
                "DELETE FROM remote_leases WHERE expires_at <= ?1",
                [to_ms(now())],
            )?;
            let leases: Vec<RemoteLease> = {
                let mut stmt = tx.prepare(
                    "SELECT id, model, holder, expires_at FROM remote_leases
                     WHERE model = ?1 ORDER BY id",
                )?;
                let rows = stmt.query_map([&model], |r| {
                    Ok(RemoteLease {
                        id: r.get(0)?,
                        model: r.get(1)?,
                        holder: r.get(2)?,
                        expires_at: from_ms(r.get(3)?),
                    })
                })?;
                rows.collect::<rusqlite::Result<_>>()?
            };
            let mut live = Vec::with_capacity(leases.len());
            let mut verdicts: Vec<(String, bool)> = Vec::new();
            for lease in leases {
                let alive = match verdicts.iter().find(|(h, _)| *h == lease.holder) {
                    Some((_, a)) => *a,
                    None => {
                        let a = owner::is_alive(state_dir, &lease.holder);
                        verdicts.push((lease.holder.clone(), a));
                        a
                    }
                };
                if alive {
                    live.push(lease);
                } else {
                    tx.execute("DELETE FROM remote_leases WHERE id = ?1", [&lease.id])?;
                }
            }
            Ok(live)
        })
        .await
    }

    /// Runs `f` on the store thread.
    async fn call<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Db) -> rusqlite::Result<T> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |db: &mut Db| {
            let result = f(db).map_err(|e| schema::classify(&db.path, e));
            let _ = tx.send(result);
        });
        self.inner
            .jobs
            .send(Msg::Job(job))
            .map_err(|_| self.closed())?;
        rx.await.map_err(|_| self.closed())?
    }

    /// Runs `f` in a `BEGIN IMMEDIATE` transaction on the store thread; commits if it succeeds.
    async fn write<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&rusqlite::Transaction<'_>) -> rusqlite::Result<T> + Send + 'static,
    {
        self.write_db(move |tx, _| f(tx)).await
    }

    /// [`Store::write`], with the state dir at hand (for owner liveness checks).
    async fn write_db<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&rusqlite::Transaction<'_>, &Path) -> rusqlite::Result<T> + Send + 'static,
    {
        self.call(move |db| {
            let tx = db
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)?;
            let out = f(&tx, &db.state_dir)?;
            tx.commit()?;
            Ok(out)
        })
        .await
    }
}

/// The store thread: runs jobs in order until every handle is gone or it is told to close.
fn serve(mut db: Db, queue: std_mpsc::Receiver<Msg>) {
    while let Ok(msg) = queue.recv() {
        match msg {
            Msg::Job(job) => job(&mut db),
            Msg::Close(done) => {
                drop(db);
                let _ = done.send(());
                return;
            }
        }
    }
}

fn child_from_row(r: &Row<'_>) -> rusqlite::Result<ChildRecord> {
    Ok(ChildRecord {
        instance_id: r.get(0)?,
        pid: r.get(1)?,
        start_time: r.get::<_, i64>(2)? as u64,
        pgid: r.get(3)?,
        model: r.get(4)?,
        port: r.get(5)?,
        socket: r.get::<_, Option<String>>(6)?.map(PathBuf::from),
        boot_id: r.get(7)?,
        state: r.get(8)?,
        started_at: from_ms(r.get(9)?),
        updated_at: from_ms(r.get(10)?),
    })
}

/// Now, to the millisecond (what the store keeps), so records compare equal after a round trip.
pub fn now() -> SystemTime {
    from_ms(to_ms(SystemTime::now()))
}

fn to_ms(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_millis().min(i64::MAX as u128) as i64,
        Err(e) => -(e.duration().as_millis().min(i64::MAX as u128) as i64),
    }
}

fn from_ms(ms: i64) -> SystemTime {
    if ms >= 0 {
        UNIX_EPOCH + Duration::from_millis(ms as u64)
    } else {
        UNIX_EPOCH - Duration::from_millis(ms.unsigned_abs())
    }
}

#[cfg(test)]
mod tests;
