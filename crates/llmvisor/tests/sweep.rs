//! The state store, owner liveness and the orphan sweep, with real processes.
//!
//! Every process a test starts is killed (by pid, after checking its start time) and reaped when
//! the test ends, pass or fail: the test process is a child subreaper, so grandchildren whose
//! parent died are reparented to it and reaped here too.

mod support;

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use llmvisor::owner::{self, Liveness, OwnerLock};
use llmvisor::procfs;
use llmvisor::spawn::INSTANCE_ENV;
use llmvisor::store::{
    ChildRecord, ClaimOutcome, InstanceRecord, Store, StoreError, DB_FILE, SCHEMA_VERSION,
};
use llmvisor::sweep::{self, Finding, SweepOptions, SweepReport};
use support::Procs;

const HELPER_DIR: &str = "LLMVISOR_TEST_OWNER_DIR";
const HELPER_ID: &str = "LLMVISOR_TEST_OWNER_ID";

fn subreaper() {
    rustix::process::set_child_subreaper(Some(rustix::process::getpid())).unwrap();
}

fn new_id(tag: &str) -> String {
    format!("lv-test-{tag}-{}", llmvisor::ids::random_hex(6))
}

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("llmvisor-sweep")
        .tempdir()
        .unwrap()
}

/// A command in its own process group, with `marker` as LLMVISOR_INSTANCE (or none).
fn marked(program: &str, args: &[&str], marker: Option<&str>) -> Command {
    let mut cmd = Command::new(program);
    cmd.args(args).env_remove(INSTANCE_ENV).process_group(0);
    if let Some(m) = marker {
        cmd.env(INSTANCE_ENV, m);
    }
    cmd
}

/// Reads a pid a shell wrote to `path`.
fn read_pid_file(path: &Path) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(pid) = std::fs::read_to_string(path)
            .ok()
            .and_then(|t| t.trim().parse().ok())
        {
            return pid;
        }
        assert!(
            Instant::now() < deadline,
            "{} never written",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn options(own: Option<&str>, dry_run: bool) -> SweepOptions {
    SweepOptions {
        own_instance: own.map(str::to_owned),
        dry_run,
        grace: Duration::from_secs(3),
    }
}

fn alive(pid: u32) -> bool {
    procfs::is_alive(pid)
}

/// An instance that ran on `dir` and died: registered, then its lock released.
async fn dead_instance(dir: &Path, store: &Store, tag: &str) -> String {
    let id = new_id(tag);
    let lock = OwnerLock::acquire(dir, &id).unwrap();
    let mut rec = InstanceRecord::current(&id);
    rec.pid = 1; // it is gone; any pid would do
    store.register_instance(&rec).await.unwrap();
    drop(lock);
    id
}

/// What a dead owner left: a recorded server (`sleep`) and an unrecorded wrapper (`sh`) with a
/// grandchild, all carrying the owner's marker. Returns (recorded, wrapper, grandchild).
async fn dead_owners_servers(
    dir: &Path,
    store: &Store,
    dead: &str,
    procs: &mut Procs,
) -> (u32, u32, u32) {
    let recorded = procs.spawn(marked("sleep", &["1000"], Some(dead)));
    record(store, dead, "gemma", recorded).await;
    let gc_file = dir.join("gc.pid");
    let script = format!("sleep 1000 & echo $! > {}; wait", gc_file.display());
    let wrapper = procs.spawn(marked("sh", &["-c", &script], Some(dead)));
    let grandchild = read_pid_file(&gc_file);
    procs.adopt(grandchild);
    (recorded, wrapper, grandchild)
}

async fn record(store: &Store, owner: &str, model: &str, pid: u32) -> ChildRecord {
    let rec = ChildRecord::of_process(owner, model, pid, Some(10_500), None, "ready").unwrap();
    store.record_child(&rec).await.unwrap();
    rec
}

fn lines(report: &SweepReport) -> Vec<String> {
    report.to_string().lines().map(str::to_owned).collect()
}

// ---------------------------------------------------------------------------------------------
// store

#[tokio::test]
async fn the_store_keeps_rows_across_reopen_and_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempdir();
    let state = dir.path().join("state");
    let store = Store::open(&state).await.unwrap();
    assert_eq!(store.schema_version().await.unwrap(), SCHEMA_VERSION);
    assert_eq!(SCHEMA_VERSION, 2);
    let me = InstanceRecord::current("lv-test-reopen");
    store.register_instance(&me).await.unwrap();
    let child = ChildRecord::of_process(
        "lv-test-reopen",
        "gemma",
        std::process::id(),
        None,
        Some(state.join("sockets/gemma.sock")),
        "starting",
    )
    .unwrap();
    store.record_child(&child).await.unwrap();
    // SQLite gives the write-ahead log the database file's mode.
    let wal = state.join(format!("{DB_FILE}-wal"));
    assert!(wal.exists());
    assert_eq!(
        std::fs::metadata(&wal).unwrap().permissions().mode() & 0o777,
        0o600
    );
    store.close().await;

    let mode = |p: PathBuf| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(state.join(DB_FILE)), 0o600);
    assert_eq!(mode(state.clone()), 0o700);

    let store = Store::open(&state).await.unwrap();
    assert_eq!(store.instances().await.unwrap(), vec![me]);
    assert_eq!(store.children().await.unwrap(), vec![child]);
    assert_eq!(store.schema_version().await.unwrap(), SCHEMA_VERSION);
    // The application id is set: a plain SQLite connection sees it.
    let conn = rusqlite::Connection::open(state.join(DB_FILE)).unwrap();
    let app: i32 = conn
        .query_row("PRAGMA application_id", [], |r| r.get(0))
        .unwrap();
    assert_eq!(app, llmvisor::store::APPLICATION_ID);
    let journal: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(journal, "wal");
}

fn assert_corrupt(err: StoreError, db: &Path, why: &str) {
    let text = err.to_string();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
    let shown = db.display().to_string();
    assert!(text.contains(&shown), "names the file: {text}");
    assert!(
        text.contains(&format!("move it aside (mv {shown} {shown}.bad)")),
        "says how to recover: {text}"
    );
    assert!(
        text.contains("llmvisor will sweep what it can prove is its own"),
        "{text}"
    );
    assert!(text.contains(why), "says why ({why}): {text}");
}

#[tokio::test]
async fn a_garbage_state_db_is_reported_with_the_way_out() {
    let dir = tempdir();
    let db = dir.path().join(DB_FILE);
    let garbage: Vec<u8> = (0..8192u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&db, &garbage).unwrap();
    let err = Store::open(dir.path()).await.unwrap_err();
    assert_corrupt(err, &db, "not a database");
    assert_eq!(std::fs::read(&db).unwrap(), garbage, "left untouched");

    // Moving it aside as told is enough to start again.
    std::fs::rename(&db, dir.path().join("state.db.bad")).unwrap();
    let store = Store::open(dir.path()).await.unwrap();
    assert!(store.children().await.unwrap().is_empty());
}

#[tokio::test]
async fn another_apps_database_is_refused() {
    let dir = tempdir();
    let db = dir.path().join(DB_FILE);
    {
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.execute_batch("CREATE TABLE foo (x INTEGER); INSERT INTO foo VALUES (1);")
            .unwrap();
    }
    let err = Store::open(dir.path()).await.unwrap_err();
    assert_corrupt(err, &db, "not an llmvisor state database");
    // Untouched: still the other app's.
    let conn = rusqlite::Connection::open(&db).unwrap();
    let n: i64 = conn
        .query_row("SELECT count(*) FROM foo", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 1);
    let journal: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(journal, "delete", "not switched to WAL");

    // Ours, but from a newer llmvisor, or with a table missing.
    let dir = tempdir();
    let db = dir.path().join(DB_FILE);
    Store::open(dir.path()).await.unwrap().close().await;
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute_batch("PRAGMA user_version = 99").unwrap();
    drop(conn);
    let err = Store::open(dir.path()).await.unwrap_err();
    assert_corrupt(err, &db, "newer");

    let dir = tempdir();
    let db = dir.path().join(DB_FILE);
    Store::open(dir.path()).await.unwrap().close().await;
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute_batch("DROP TABLE claims").unwrap();
    drop(conn);
    let err = Store::open(dir.path()).await.unwrap_err();
    assert_corrupt(err, &db, "table claims is missing");
}

#[tokio::test]
async fn an_unwritable_state_dir_is_named() {
    let dir = tempdir();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, "").unwrap();
    let state = file.join("state");
    let err = Store::open(&state).await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, StoreError::StateDir { .. }), "{err:?}");
    assert!(text.contains(&state.display().to_string()), "{text}");
}

#[tokio::test]
async fn a_claim_has_one_owner_until_that_owner_dies() {
    let dir = tempdir();
    let store = Store::open(dir.path()).await.unwrap();
    let (a, b) = (new_id("a"), new_id("b"));
    let lock_a = OwnerLock::acquire(dir.path(), &a).unwrap();
    let _lock_b = OwnerLock::acquire(dir.path(), &b).unwrap();
    assert_eq!(
        store.claim_model("gemma", &a).await.unwrap(),
        ClaimOutcome::Claimed
    );
    assert_eq!(
        store.claim_model("gemma", &b).await.unwrap(),
        ClaimOutcome::HeldBy(a.clone())
    );
    assert!(store.claim_port(10_501, &a, "gemma").await.unwrap());
    assert!(!store.claim_port(10_501, &b, "qwen").await.unwrap());
    assert!(store.claim_port(10_502, &b, "qwen").await.unwrap());
    assert!(
        store.claim_port(10_501, &a, "gemma").await.unwrap(),
        "again"
    );

    drop(lock_a); // a dies
    assert_eq!(
        store.claim_model("gemma", &b).await.unwrap(),
        ClaimOutcome::TakenOver { from: a.clone() }
    );
    assert_eq!(store.claim_holder("gemma").await.unwrap(), Some(b.clone()));
    assert!(store.claim_port(10_501, &b, "gemma").await.unwrap());
}

#[tokio::test]
async fn concurrent_claims_from_two_connections_have_exactly_one_winner() {
    let dir = tempdir();
    let (a, b) = (new_id("ca"), new_id("cb"));
    let _la = OwnerLock::acquire(dir.path(), &a).unwrap();
    let _lb = OwnerLock::acquire(dir.path(), &b).unwrap();
    // Two stores: two connections on two threads, as two processes would have.
    let sa = Store::open(dir.path()).await.unwrap();
    let sb = Store::open(dir.path()).await.unwrap();
    let models: Vec<String> = (0..30).map(|i| format!("m{i}")).collect();
    let race = |store: Store, me: String| {
        let models = models.clone();
        tokio::spawn(async move {
            let mut won = Vec::new();
            for m in &models {
                if store.claim_model(m, &me).await.unwrap() == ClaimOutcome::Claimed {
                    won.push(m.clone());
                }
            }
            won
        })
    };
    let (wa, wb) = tokio::join!(race(sa.clone(), a.clone()), race(sb.clone(), b.clone()));
    let (wa, wb) = (wa.unwrap(), wb.unwrap());
    assert_eq!(wa.len() + wb.len(), models.len(), "{wa:?} {wb:?}");
    for m in &models {
        let holder = sa.claim_holder(m).await.unwrap().unwrap();
        assert_eq!(wa.contains(m), holder == a);
        assert_eq!(wb.contains(m), holder == b);
    }
}

// ---------------------------------------------------------------------------------------------
// owner

#[test]
fn an_owner_lock_is_seen_through_a_second_open_file_description() {
    let dir = tempdir();
    let id = new_id("ofd");
    let lock = OwnerLock::acquire(dir.path(), &id).unwrap();
    // flock locks belong to open file descriptions: a second open() in this very process
    // conflicts with ours, from any thread.
    let state = dir.path().to_owned();
    let id2 = id.clone();
    assert!(std::thread::spawn(move || owner::is_alive(&state, &id2))
        .join()
        .unwrap());
    assert!(owner::is_alive(dir.path(), &id));
    drop(lock);
    assert!(!owner::is_alive(dir.path(), &id));
    assert!(!owner::is_alive(dir.path(), "lv-never-existed"));
}

/// Runs this test binary's `owner_helper_process`: it takes the owner lock of `id` on `dir`,
/// starts a marked `sleep` that escapes (own group, no parent-death signal), and waits. Both are
/// adopted into `procs` as soon as their pids are known.
fn start_owner_helper(procs: &mut Procs, dir: &Path, id: &str) -> (Child, u32) {
    let mut helper = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "owner_helper_process",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HELPER_DIR, dir)
        .env(HELPER_ID, id)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Killed and reaped by pid should anything below (or the test) fail before it kills it.
    procs.adopt(helper.id());
    let mut lines = BufReader::new(helper.stdout.take().unwrap()).lines();
    let pid = loop {
        let line = lines.next().expect("helper ended early").unwrap();
        if let Some((_, rest)) = line.split_once("READY ") {
            break rest.trim().parse().unwrap();
        }
    };
    procs.adopt(pid);
    (helper, pid)
}

#[test]
#[ignore = "run by a_killed_owner_is_dead_and_its_escaped_server_is_swept"]
fn owner_helper_process() {
    let (Ok(dir), Ok(id)) = (std::env::var(HELPER_DIR), std::env::var(HELPER_ID)) else {
        return;
    };
    let lock = OwnerLock::acquire(Path::new(&dir), &id).unwrap();
    // Never waited for on purpose: it must outlive us (the test reaps it as our subreaper).
    #[allow(clippy::zombie_processes)]
    let child = marked("sleep", &["1000"], Some(&id))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    println!("READY {}", child.id());
    // Bounded: the test kills us long before.
    std::thread::sleep(Duration::from_secs(60));
    drop(lock);
}

#[tokio::test]
async fn a_killed_owner_is_dead_and_its_escaped_server_is_swept() {
    subreaper();
    let dir = tempdir();
    let id = new_id("k9");
    let mut procs = Procs::default();
    let (mut helper, sleep_pid) = start_owner_helper(&mut procs, dir.path(), &id);
    assert!(owner::is_alive(dir.path(), &id), "held by another process");

    // The store has never heard of it: only the lock file tells that it ran here.
    let store = Store::open(dir.path()).await.unwrap();
    let report = sweep::run_with(dir.path(), &store, &options(None, false)).await;
    assert!(
        report.is_empty(),
        "a live owner's server is not touched: {report}"
    );
    assert!(alive(sleep_pid));

    helper.kill().unwrap(); // SIGKILL
    helper.wait().unwrap();
    assert_eq!(owner::probe(dir.path(), &id), Liveness::Dead);
    assert!(alive(sleep_pid), "escaped the owner's death");

    let report = sweep::run_with(dir.path(), &store, &options(None, false)).await;
    assert_eq!(report.stopped(), vec![sleep_pid], "{report}");
    let text = lines(&report);
    assert_eq!(
        text[0],
        format!(
            "stopped pid {sleep_pid} (sleep, LLMVISOR_INSTANCE of owner {id}, dead) with SIGTERM"
        )
    );
    assert!(!alive(sleep_pid));
    assert_eq!(
        owner::probe(dir.path(), &id),
        Liveness::NoLockFile,
        "the stale lock file is cleaned up"
    );
    drop(procs);
    let again = sweep::run_with(dir.path(), &store, &options(None, false)).await;
    assert_eq!(again.to_string(), "nothing to clean up");
}

// ---------------------------------------------------------------------------------------------
// sweep

#[tokio::test]
async fn a_recorded_server_of_a_dead_owner_is_stopped_and_forgotten() {
    subreaper();
    let dir = tempdir();
    let store = Store::open(dir.path()).await.unwrap();
    let dead = dead_instance(dir.path(), &store, "dead").await;
    let mut procs = Procs::default();
    let pid = procs.spawn(marked("sleep", &["1000"], Some(&dead)));
    record(&store, &dead, "gemma", pid).await;
    store.claim_model("gemma", &dead).await.unwrap();
    store.claim_port(10_500, &dead, "gemma").await.unwrap();

    let report = sweep::run_with(dir.path(), &store, &options(None, false)).await;
    assert_eq!(report.stopped(), vec![pid], "{report}");
    assert!(!alive(pid));
    assert_eq!(
        lines(&report),
        vec![
            format!("stopped pid {pid} (model gemma, owner {dead}, dead) with SIGTERM"),
            format!("removed dead instance {dead} (its records, claims, ports and lock file)"),
        ]
    );
    assert!(store.children().await.unwrap().is_empty());
    assert!(store.instances().await.unwrap().is_empty());
    assert_eq!(store.claim_holder("gemma").await.unwrap(), None);
}

#[tokio::test]
async fn a_server_that_ignores_sigterm_gets_sigkill_after_the_grace() {
    subreaper();
    let dir = tempdir();
    let store = Store::open(dir.path()).await.unwrap();
    let dead = dead_instance(dir.path(), &store, "stubborn").await;
    let mut procs = Procs::default();
    let pid = procs.spawn(marked(
        "sh",
        &["-c", "trap '' TERM; exec sleep 1000"],
        Some(&dead),
    ));
    // Until the trap is set, SIGTERM would just kill it.
    let deadline = Instant::now() + Duration::from_secs(5);
    while procfs::comm(pid).as_deref() != Some("sleep") {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(10));
    }
    record(&store, &dead, "stubborn", pid).await;
    let opts = SweepOptions {
        grace: Duration::from_millis(300),
        ..options(None, false)
    };
    let started = Instant::now();
    let report = sweep::run_with(dir.path(), &store, &opts).await;
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(report.stopped(), vec![pid], "{report}");
    assert_eq!(
        lines(&report)[0],
        format!(
            "stopped pid {pid} (model stubborn, owner {dead}, dead) with SIGKILL (300ms after SIGTERM)"
        )
    );
    assert!(!alive(pid));
}

#[tokio::test]
async fn what_cannot_be_proven_is_reported_and_never_signalled() {
    subreaper();
    let dir = tempdir();
    let store = Store::open(dir.path()).await.unwrap();
    let dead = dead_instance(dir.path(), &store, "dead").await;
    let mut procs = Procs::default();

    // (2) A record whose pid is now someone else: same pid, different start time.
    let reused = procs.spawn(marked("sleep", &["1000"], None));
    let mut rec = record(&store, &dead, "gemma", reused).await;
    rec.start_time -= 1;
    store.record_child(&rec).await.unwrap();
    // (3) A process with no marker and no record, and one with an instance id this state dir
    // does not know (another state dir's llmvisor, say).
    let unmarked = procs.spawn(marked("sleep", &["1000"], None));
    let foreign = procs.spawn(marked("sleep", &["1000"], Some(&new_id("elsewhere"))));
    // A record from an earlier boot pointing at a live pid with the right start time.
    let old_boot = procs.spawn(marked("sleep", &["1000"], None));
    let mut rec = record(&store, &dead, "qwen", old_boot).await;
    rec.boot_id = "00000000-0000-0000-0000-000000000000".into();
    store.record_child(&rec).await.unwrap();

    let report = sweep::run_with(dir.path(), &store, &options(None, false)).await;
    for pid in [reused, unmarked, foreign, old_boot] {
        assert!(alive(pid), "pid {pid} was signalled: {report}");
    }
    assert!(report.stopped().is_empty(), "{report}");
    assert_eq!(report.left_alone(), vec![reused]);
    let text = report.to_string();
    assert!(
        text.contains(&format!(
            "left pid {reused} alone: start time differs from the record (pid reused"
        )),
        "{text}"
    );
    assert!(text.contains(&format!(
        "removed the record of pid {reused} (model gemma, owner {dead}, dead): its pid now belongs to another process"
    )));
    assert!(text.contains(&format!(
        "removed the record of pid {old_boot} (model qwen, owner {dead}, dead): it is from an earlier boot"
    )));
    assert!(!text.contains(&unmarked.to_string()), "{text}");
    assert!(!text.contains(&foreign.to_string()), "{text}");
    assert!(store.children().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_wrapper_and_its_grandchildren_are_stopped_whatever_group_they_are_in() {
    subreaper();
    let dir = tempdir();
    let store = Store::open(dir.path()).await.unwrap();
    let dead = dead_instance(dir.path(), &store, "wrap").await;
    let mut procs = Procs::default();
    let files = |n: &str| dir.path().join(n);
    let (plain, unmarked, escaped) = (
        files("plain.pid"),
        files("unmarked.pid"),
        files("escaped.pid"),
    );
    // sh leads its group and carries the marker; three grandchildren: one plain, one that drops
    // the marker (found through the group), one in a session of its own (found by the marker).
    let script = format!(
        "sleep 1000 & echo $! > {plain}; \
         env -u {INSTANCE_ENV} sh -c 'echo $$ > {unmarked}; exec sleep 1000' & \
         setsid sh -c 'echo $$ > {escaped}; exec sleep 1000' & \
         wait",
        plain = plain.display(),
        unmarked = unmarked.display(),
        escaped = escaped.display(),
    );
    let sh = procs.spawn(marked("sh", &["-c", &script], Some(&dead)));
    // Each adopted as soon as it is known (`procs` kills `sh`'s group, but the escaped one has
    // left it).
    let mut grandchildren = Vec::new();
    for f in [&plain, &unmarked, &escaped] {
        let g = read_pid_file(f);
        procs.adopt(g);
        grandchildren.push(g);
    }
    let escaped_pid = grandchildren[2];
    assert_ne!(
        procfs::stat(escaped_pid).unwrap().pgrp,
        sh,
        "setsid left the group"
    );
    // The wrapper itself is recorded, as the supervisor would.
    record(&store, &dead, "wrapped", sh).await;

    let report = sweep::run_with(dir.path(), &store, &options(None, false)).await;
    assert!(!alive(sh), "{report}");
    for &g in &grandchildren {
        assert!(!alive(g), "grandchild {g} survived: {report}");
    }
    let mut stopped = report.stopped();
    stopped.sort_unstable();
    let mut expected = vec![sh];
    expected.extend(&grandchildren);
    expected.sort_unstable();
    assert_eq!(stopped, expected, "{report}");
    let text = report.to_string();
    assert!(
        text.contains(&format!(
            "stopped pid {sh} (model wrapped, owner {dead}, dead) with SIGTERM"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "stopped pid {} (sleep, model wrapped, in the group of pid {sh}, owner {dead}, dead)",
            grandchildren[1]
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "stopped pid {escaped_pid} (sleep, LLMVISOR_INSTANCE of owner {dead}, dead)"
        )),
        "{text}"
    );
}

#[tokio::test]
async fn a_dry_run_signals_nothing_and_changes_nothing() {
    subreaper();
    let dir = tempdir();
    let store = Store::open(dir.path()).await.unwrap();
    let dead = dead_instance(dir.path(), &store, "dry").await;
    let mut procs = Procs::default();
    let (recorded, wrapper, grandchild) =
        dead_owners_servers(dir.path(), &store, &dead, &mut procs).await;
    // A stale record, too: a dry run does not remove it.
    let gone = procs.spawn(marked("true", &[], None));
    procs.children.last_mut().unwrap().wait().unwrap();
    let stale = ChildRecord {
        pid: gone,
        ..ChildRecord::of_process(&dead, "old", recorded, None, None, "ready").unwrap()
    };
    store.record_child(&stale).await.unwrap();
    let rows_before = store.children().await.unwrap();

    let report = sweep::run_with(dir.path(), &store, &options(None, true)).await;
    let mut would = report.would_stop();
    would.sort_unstable();
    let mut expected = vec![recorded, wrapper, grandchild];
    expected.sort_unstable();
    assert_eq!(would, expected, "{report}");
    assert!(report.stopped().is_empty());
    for pid in [recorded, wrapper, grandchild] {
        assert!(alive(pid), "dry run signalled {pid}");
    }
    let text = report.to_string();
    assert!(
        text.contains(&format!(
            "would stop pid {recorded} (model gemma, owner {dead}, dead)"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!("would remove the record of pid {gone}")),
        "{text}"
    );
    assert!(
        text.contains(&format!("would remove dead instance {dead}")),
        "{text}"
    );
    assert_eq!(store.children().await.unwrap(), rows_before);
    assert_eq!(store.instances().await.unwrap().len(), 1);

    // The real thing afterwards.
    let report = sweep::run_with(dir.path(), &store, &options(None, false)).await;
    for pid in [recorded, wrapper, grandchild] {
        assert!(!alive(pid), "{pid} survived: {report}");
    }
    assert!(store.children().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_live_owners_and_the_own_instances_processes_are_not_touched() {
    subreaper();
    let dir = tempdir();
    let store = Store::open(dir.path()).await.unwrap();
    let mut procs = Procs::default();
    // (6) A live owner (its lock held) with a recorded, marked server.
    let live = new_id("live");
    let _lock = OwnerLock::acquire(dir.path(), &live).unwrap();
    store
        .register_instance(&InstanceRecord::current(&live))
        .await
        .unwrap();
    let live_child = procs.spawn(marked("sleep", &["1000"], Some(&live)));
    record(&store, &live, "gemma", live_child).await;
    // The sweeping instance's own server: never touched, even with no lock held.
    let me = new_id("me");
    store
        .register_instance(&InstanceRecord::current(&me))
        .await
        .unwrap();
    let own_child = procs.spawn(marked("sleep", &["1000"], Some(&me)));
    record(&store, &me, "qwen", own_child).await;

    for dry_run in [true, false] {
        let report = sweep::run_with(dir.path(), &store, &options(Some(&me), dry_run)).await;
        assert_eq!(
            report.to_string(),
            "nothing to clean up",
            "dry_run={dry_run}"
        );
    }
    assert!(alive(live_child));
    assert!(alive(own_child));
    assert_eq!(store.children().await.unwrap().len(), 2);
    assert_eq!(store.instances().await.unwrap().len(), 2);
    assert!(owner::is_alive(dir.path(), &live));
}

#[tokio::test]
async fn records_of_servers_that_already_died_are_dropped() {
    subreaper();
    let dir = tempdir();
    let store = Store::open(dir.path()).await.unwrap();
    let dead = dead_instance(dir.path(), &store, "vanished").await;
    let mut procs = Procs::default();
    let pid = procs.spawn(marked("sleep", &["1000"], Some(&dead)));
    record(&store, &dead, "gemma", pid).await;
    procs.children[0].kill().unwrap();
    procs.children[0].wait().unwrap();
    let report = sweep::run(dir.path(), &store, None, false).await;
    assert_eq!(
        lines(&report),
        vec![
            format!("removed the record of pid {pid} (model gemma, owner {dead}, dead): the process is gone"),
            format!("removed dead instance {dead} (its records, claims, ports and lock file)"),
        ]
    );
    assert!(matches!(report.findings[0], Finding::RecordRemoved { .. }));
    assert!(store.children().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_stale_record_on_a_pid_that_carries_the_dead_owners_marker_is_stopped_by_the_marker() {
    subreaper();
    let dir = tempdir();
    let store = Store::open(dir.path()).await.unwrap();
    let dead = dead_instance(dir.path(), &store, "remarked").await;
    let mut procs = Procs::default();
    let pid = procs.spawn(marked("sleep", &["1000"], Some(&dead)));
    let mut rec = record(&store, &dead, "gemma", pid).await;
    rec.start_time += 1;
    store.record_child(&rec).await.unwrap();
    let report = sweep::run_with(dir.path(), &store, &options(None, false)).await;
    assert!(report.left_alone().is_empty(), "{report}");
    assert_eq!(report.stopped(), vec![pid], "{report}");
    assert!(!alive(pid));
    assert!(store.children().await.unwrap().is_empty());
}

// ---------------------------------------------------------------------------------------------
// a tampered state dir (issue 10, item 1): the record is never the proof

/// A `children` row naming `pid` as the given owner's, with `pid`'s real start time: all of it
/// world-readable in /proc, so anyone able to write the state dir can forge it.
async fn forge(store: &Store, owner: &str, pid: u32) {
    record(store, owner, "forged", pid).await;
}

#[tokio::test]
async fn a_forged_record_of_a_strangers_process_proves_nothing() {
    subreaper();
    let dir = tempdir();
    let store = Store::open(dir.path()).await.unwrap();
    let dead = dead_instance(dir.path(), &store, "forger").await;
    let mut procs = Procs::default();
    // The decoy from the report: a process of its own session, never started by llmvisor.
    let mut decoy = Command::new("setsid");
    decoy.args(["sleep", "1000"]).env_remove(INSTANCE_ENV);
    let stranger = procs.spawn(decoy);
    forge(&store, &dead, stranger).await;

    let dry = sweep::run_with(dir.path(), &store, &options(None, true)).await;
    assert!(dry.would_stop().is_empty(), "{dry}");
    assert_eq!(dry.left_alone(), vec![stranger], "{dry}");
    assert!(
        dry.to_string().contains(&format!(
            "left pid {stranger} alone: recorded as model forged of owner {dead}, but it does \
             not carry {INSTANCE_ENV}={dead} (a record alone proves nothing)"
        )),
        "{dry}"
    );

    let report = sweep::run_with(dir.path(), &store, &options(None, false)).await;
    assert!(alive(stranger), "the stranger was signalled: {report}");
    assert!(report.stopped().is_empty(), "{report}");
    assert!(
        report.to_string().contains(&format!(
            "removed the record of pid {stranger} (model forged, owner {dead}, dead): {}",
            sweep::RECORD_UNPROVEN
        )),
        "{report}"
    );
    assert!(store.children().await.unwrap().is_empty());
}

#[tokio::test]
async fn pid_1_the_sweeper_and_its_ancestors_are_never_targets_whatever_the_record_says() {
    let dir = tempdir();
    let store = Store::open(dir.path()).await.unwrap();
    let dead = dead_instance(dir.path(), &store, "forger").await;
    let me = std::process::id();
    let parent = procfs::stat(me).unwrap().ppid;
    let mut targets = vec![1, me];
    if parent > 1 {
        targets.push(parent);
    }
    for &pid in &targets {
        forge(&store, &dead, pid).await;
    }
    // A dry run only: before the fix, the real run would have signalled the group of pid 1
    // (kill(-1): every process the test may signal) and the test itself.
    let dry = sweep::run_with(dir.path(), &store, &options(None, true)).await;
    assert!(dry.would_stop().is_empty(), "{dry}");
    let mut left = dry.left_alone();
    left.sort_unstable();
    targets.sort_unstable();
    assert_eq!(left, targets, "{dry}");
    let text = dry.to_string();
    assert!(
        text.contains("left pid 1 alone: recorded as model forged of owner")
            && text.contains("pid 1 and below are never signalled"),
        "{text}"
    );
    assert!(
        text.contains(&format!("left pid {me} alone: recorded as model forged"))
            && text.contains("it is this process or one of its ancestors"),
        "{text}"
    );
}

#[tokio::test]
async fn a_marked_process_of_another_uid_is_left_alone() {
    // Only root can start a process as another uid; elsewhere the kernel already keeps us from
    // signalling one.
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: needs root to start a process as another uid");
        return;
    }
    subreaper();
    let dir = tempdir();
    let store = Store::open(dir.path()).await.unwrap();
    let dead = dead_instance(dir.path(), &store, "uid").await;
    let mut procs = Procs::default();
    let mut cmd = marked("sleep", &["1000"], Some(&dead));
    cmd.uid(65534).gid(65534);
    let nobody = procs.spawn(cmd);
    forge(&store, &dead, nobody).await;

    let report = sweep::run_with(dir.path(), &store, &options(None, false)).await;
    assert!(
        alive(nobody),
        "another uid's process was signalled: {report}"
    );
    assert!(report.stopped().is_empty(), "{report}");
    assert!(
        report
            .to_string()
            .contains(&format!("left pid {nobody} alone: recorded as model forged of owner {dead}, but it runs as uid 65534")),
        "{report}"
    );
}

#[tokio::test]
async fn the_plan_is_what_a_dry_run_prints_and_what_a_real_run_executes() {
    subreaper();
    let dir = tempdir();
    let store = Store::open(dir.path()).await.unwrap();
    let dead = dead_instance(dir.path(), &store, "plan").await;
    let mut procs = Procs::default();
    let (recorded, wrapper, grandchild) =
        dead_owners_servers(dir.path(), &store, &dead, &mut procs).await;
    let mut decoy = Command::new("setsid");
    decoy.args(["sleep", "1000"]).env_remove(INSTANCE_ENV);
    let stranger = procs.spawn(decoy);
    forge(&store, &dead, stranger).await;

    // Planning reads the store and /proc: nothing is signalled, nothing removed.
    let plan = sweep::plan(dir.path(), &store, None).await;
    let mut would: Vec<u32> = plan.would_stop().iter().map(|(pid, _)| *pid).collect();
    would.sort_unstable();
    let mut expected = vec![recorded, wrapper, grandchild];
    expected.sort_unstable();
    assert_eq!(would, expected, "{plan}");
    assert!(
        plan.findings()
            .iter()
            .any(|f| matches!(f, Finding::LeftAlone { pid, .. } if *pid == stranger)),
        "{plan}"
    );
    assert_eq!(
        plan.dead_instances().collect::<Vec<_>>(),
        vec![dead.as_str()]
    );
    for pid in [recorded, wrapper, grandchild, stranger] {
        assert!(alive(pid), "planning signalled {pid}");
    }
    assert_eq!(store.children().await.unwrap().len(), 2);
    // A dry run prints the plan, line for line.
    let dry = sweep::run_with(dir.path(), &store, &options(None, true)).await;
    assert_eq!(lines(&dry), plan.to_string().lines().collect::<Vec<_>>());

    // Executing it stops what it lists, and only that.
    let report = sweep::execute(plan, dir.path(), &store, Duration::from_secs(3)).await;
    let mut stopped = report.stopped();
    stopped.sort_unstable();
    assert_eq!(stopped, expected, "{report}");
    assert!(alive(stranger), "the stranger was signalled: {report}");
    assert!(store.children().await.unwrap().is_empty(), "{report}");
    assert!(
        report
            .to_string()
            .contains(&format!("removed dead instance {dead}")),
        "{report}"
    );
}
