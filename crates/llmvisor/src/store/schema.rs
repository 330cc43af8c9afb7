//! Opening the database file: identity checks, migrations, schema verification.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags, TransactionBehavior};

use super::{Db, StoreError, APPLICATION_ID, BUSY_TIMEOUT, DB_FILE};

/// The migrations, in order: `MIGRATIONS[i]` takes the schema from version `i` to `i + 1`.
/// Never edit one that has shipped; append a new one.
pub(super) const MIGRATIONS: &[&str] = &[
    // v1
    "CREATE TABLE instances (
        id          TEXT PRIMARY KEY,
        pid         INTEGER NOT NULL,
        start_time  INTEGER NOT NULL,
        boot_id     TEXT NOT NULL,
        started_at  INTEGER NOT NULL
    );
    CREATE TABLE children (
        instance_id TEXT NOT NULL,
        pid         INTEGER NOT NULL,
        start_time  INTEGER NOT NULL,
        pgid        INTEGER NOT NULL,
        model       TEXT NOT NULL,
        port        INTEGER,
        socket      TEXT,
        boot_id     TEXT NOT NULL,
        state       TEXT NOT NULL,
        started_at  INTEGER NOT NULL,
        updated_at  INTEGER NOT NULL,
        PRIMARY KEY (instance_id, pid)
    );
    CREATE INDEX children_by_model ON children (model);
    CREATE TABLE claims (
        model       TEXT PRIMARY KEY,
        instance_id TEXT NOT NULL,
        claimed_at  INTEGER NOT NULL
    );
    CREATE TABLE ports (
        port        INTEGER PRIMARY KEY,
        instance_id TEXT NOT NULL,
        model       TEXT NOT NULL,
        claimed_at  INTEGER NOT NULL
    );
    CREATE TABLE remote_leases (
        id          TEXT PRIMARY KEY,
        model       TEXT NOT NULL,
        holder      TEXT NOT NULL,
        expires_at  INTEGER NOT NULL
    );
    CREATE INDEX remote_leases_by_model ON remote_leases (model);",
    // v2: what a model file took at a shape of memory-shaping flags, measured (issue 20).
    "CREATE TABLE learned_memory (
        file        TEXT NOT NULL,
        shape       TEXT NOT NULL,
        bytes       INTEGER NOT NULL,
        updated_at  INTEGER NOT NULL,
        PRIMARY KEY (file, shape)
    );",
];

/// The schema version this build writes and understands.
pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

/// The tables and columns the code relies on; checked at every open.
const EXPECTED: &[(&str, &[&str])] = &[
    (
        "instances",
        &["id", "pid", "start_time", "boot_id", "started_at"],
    ),
    (
        "children",
        &[
            "instance_id",
            "pid",
            "start_time",
            "pgid",
            "model",
            "port",
            "socket",
            "boot_id",
            "state",
            "started_at",
            "updated_at",
        ],
    ),
    ("claims", &["model", "instance_id", "claimed_at"]),
    ("ports", &["port", "instance_id", "model", "claimed_at"]),
    ("remote_leases", &["id", "model", "holder", "expires_at"]),
    ("learned_memory", &["file", "shape", "bytes", "updated_at"]),
];

/// Opens (creating if needed) `<state_dir>/state.db`, checks that it is ours and intact, and
/// brings its schema up to date.
pub(super) fn open(state_dir: &Path) -> Result<Db, StoreError> {
    let dir_err = |source: io::Error| StoreError::StateDir {
        path: state_dir.to_owned(),
        source,
    };
    prepare_dir(state_dir).map_err(dir_err)?;
    let path = state_dir.join(DB_FILE);
    // Serialize first-time creation and migrations between processes opening at once.
    let _init = init_lock(state_dir).map_err(dir_err)?;
    create_db_file(&path).map_err(dir_err)?;

    let corrupt = |reason: String| StoreError::Corrupt {
        path: path.clone(),
        reason,
    };
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(&path, flags).map_err(|e| classify(&path, e))?;
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(|e| classify(&path, e))?;
    let sql_err = |e| classify(&path, e);

    // Identity first, before writing anything to a file that may not be ours.
    let app_id: i32 = conn
        .query_row("PRAGMA application_id", [], |r| r.get(0))
        .map_err(sql_err)?;
    let version: u32 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(sql_err)?;
    let tables = table_names(&conn).map_err(sql_err)?;
    if app_id != APPLICATION_ID {
        let fresh = app_id == 0 && version == 0 && tables.is_empty();
        if !fresh {
            return Err(corrupt(format!(
                "it is not an llmvisor state database (application_id {app_id:#x}, tables: {})",
                if tables.is_empty() {
                    "none".to_owned()
                } else {
                    tables.join(", ")
                }
            )));
        }
    }
    if version > SCHEMA_VERSION {
        return Err(corrupt(format!(
            "its schema version {version} is newer than this llmvisor knows ({SCHEMA_VERSION}); \
             it was written by a newer llmvisor"
        )));
    }
    let check: String = conn
        .query_row("PRAGMA quick_check(1)", [], |r| r.get(0))
        .map_err(sql_err)?;
    if check != "ok" {
        return Err(corrupt(format!("SQLite integrity check: {check}")));
    }
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .map_err(sql_err)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::StateDir {
            path: state_dir.to_owned(),
            source: io::Error::other(format!(
                "SQLite cannot use write-ahead logging here (journal mode stays {mode})"
            )),
        });
    }
    // WAL with NORMAL is durable across process crashes (what we guard against); only power
    // loss may drop the last transactions, and then every process is gone anyway.
    conn.execute_batch("PRAGMA synchronous = NORMAL")
        .map_err(sql_err)?;

    let mut db = Db {
        conn,
        path: path.clone(),
        state_dir: state_dir.to_owned(),
    };
    migrate(&mut db.conn).map_err(sql_err)?;
    verify(&db.conn).map_err(|e| match e {
        Verify::Sql(e) => classify(&path, e),
        Verify::Mismatch(reason) => corrupt(reason),
    })?;
    Ok(db)
}

/// Runs the pending migrations in one immediate transaction.
fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let version: u32 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version < SCHEMA_VERSION {
        for sql in &MIGRATIONS[version as usize..] {
            tx.execute_batch(sql)?;
        }
        tx.execute_batch(&format!(
            "PRAGMA application_id = {APPLICATION_ID}; PRAGMA user_version = {SCHEMA_VERSION};"
        ))?;
    }
    tx.commit()
}

enum Verify {
    Sql(rusqlite::Error),
    Mismatch(String),
}

/// Checks that every table and column the code uses exists.
fn verify(conn: &Connection) -> Result<(), Verify> {
    for (table, columns) in EXPECTED {
        let mut stmt = conn
            .prepare("SELECT name FROM pragma_table_info(?1)")
            .map_err(Verify::Sql)?;
        let have: Vec<String> = stmt
            .query_map([table], |r| r.get(0))
            .and_then(|rows| rows.collect())
            .map_err(Verify::Sql)?;
        if have.is_empty() {
            return Err(Verify::Mismatch(format!(
                "its schema does not match: table {table} is missing"
            )));
        }
        if let Some(col) = columns.iter().find(|c| !have.iter().any(|h| h == *c)) {
            return Err(Verify::Mismatch(format!(
                "its schema does not match: table {table} has no column {col}"
            )));
        }
    }
    Ok(())
}

fn table_names(conn: &Connection) -> rusqlite::Result<Vec<String>> {
    let mut stmt = conn.prepare(
        "SELECT name FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE 'sqlite_%' \
         ORDER BY name",
    )?;
    let names = stmt.query_map([], |r| r.get(0))?.collect();
    names
}

/// SQLite's "this is not a database" and "corrupt" become [`StoreError::Corrupt`].
pub(super) fn classify(path: &Path, e: rusqlite::Error) -> StoreError {
    use rusqlite::ErrorCode;
    match e.sqlite_error_code() {
        Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt) => StoreError::Corrupt {
            path: path.to_owned(),
            reason: e.to_string(),
        },
        _ => StoreError::Sqlite {
            path: path.to_owned(),
            source: e,
        },
    }
}

/// Creates the state dir (0700) if needed, refuses one that is not ours alone, and proves we
/// can create files in it (see [`crate::statedir`]).
fn prepare_dir(dir: &Path) -> io::Result<()> {
    crate::statedir::ensure(dir).map_err(io::Error::from)
}

/// Opens `path` for reading and writing, creating it 0600, never following a link there.
fn open_private(path: &Path) -> io::Result<File> {
    crate::statedir::nofollow(
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600),
    )
    .open(path)
}

/// An exclusive lock on `<state_dir>/state.db.init`, held while opening.
fn init_lock(state_dir: &Path) -> io::Result<File> {
    let file = open_private(&state_dir.join(format!("{DB_FILE}.init")))?;
    rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)?;
    Ok(file)
}

/// Makes sure `path` exists with mode 0600 (SQLite gives its -wal and -shm files the same mode).
/// A new database must not pick up a -wal or -shm left behind by one that was moved aside: SQLite
/// would replay that log into it.
fn create_db_file(path: &Path) -> io::Result<()> {
    // SQLite opens these by name and follows links: a link planted in their place is refused.
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let mut p = PathBuf::from(path).into_os_string();
        p.push(suffix);
        if fs::symlink_metadata(&p).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "{} is a symbolic link; llmvisor does not follow links in its state dir \
                     (fix: remove it)",
                    PathBuf::from(p).display()
                ),
            ));
        }
    }
    if !path.exists() {
        for suffix in ["-wal", "-shm"] {
            let mut side = PathBuf::from(path).into_os_string();
            side.push(suffix);
            match fs::remove_file(&side) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    let file = open_private(path)?;
    let mode = file.metadata()?.permissions().mode();
    if mode & 0o077 != 0 {
        file.set_permissions(fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}
