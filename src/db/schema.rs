//! Opening the database file safely, and the numbered schema migrations.
//!
//! Owns: the checks done before anything is written to a file (is it SQLite, is it ours,
//! is its schema one we know), the connection pragmas, and the list of migrations.
//! Must never: modify a file it refused, or run a migration outside a transaction.
//!
//! Invariants:
//! - `PRAGMA user_version` is the number of migrations applied; migration `n` (1-based)
//!   and the `user_version = n` update commit together, so a crash leaves either the old
//!   or the new schema, never half of one.
//! - A file whose `user_version` is above [`KNOWN_VERSION`] is refused before any write,
//!   so a downgraded binary cannot damage a database made by a newer one.
//! - `PRAGMA application_id` marks the file as a vsm session database; an SQLite file
//!   carrying another application's id, or tables but no version, is refused.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, Transaction};

use super::{DbError, SqlContext};
use crate::model::DbSynchronous;

/// `PRAGMA application_id` of a vsm session database ("vsm1").
pub(super) const APPLICATION_ID: i64 = 0x7673_6d31;

type Migration = fn(&Transaction<'_>) -> rusqlite::Result<()>;

/// Migration `i + 1` is `MIGRATIONS[i]`. Append only; never edit a released migration.
const MIGRATIONS: &[Migration] = &[v1_initial, v2_record_base, v3_meta_only_at_gc];

/// Log pages after which a commit checkpoints inline: SQLite's safety net, four times the
/// mark at which the owner restarts the log itself.
pub(super) const WAL_AUTOCHECKPOINT_PAGES: i64 = 4 * super::checkpoint::RESTART_FRAMES as i64;

/// The owner connection's page cache, in KiB (SQLite's negative `cache_size`).
const OWNER_CACHE_KIB: i64 = 16 * 1024;

/// The highest schema version this code knows.
pub(super) const KNOWN_VERSION: i64 = MIGRATIONS.len() as i64;

/// Version 1: sessions (incl. tombstones), change log, metadata, peer positions.
///
/// `sessions` is a rowid table: new rows append at the end, and so do their entries in the
/// id index, since session ids begin with their creation time (`SessionId::generate`; ids
/// made by older versions were wholly random and spread over that index).
fn v1_initial(tx: &Transaction<'_>) -> rusqlite::Result<()> {
    tx.execute_batch(
        "CREATE TABLE meta (
             id          INTEGER PRIMARY KEY CHECK (id = 1),
             db_id       TEXT    NOT NULL,
             created_ms  INTEGER NOT NULL,
             hlc_wall    INTEGER NOT NULL,
             hlc_logical INTEGER NOT NULL,
             head_seq    INTEGER NOT NULL
         );
         CREATE TABLE sessions (
             id                  TEXT    PRIMARY KEY NOT NULL,
             user                TEXT,
             subcluster          TEXT,
             agent               TEXT,
             agent_address       TEXT,
             display             INTEGER,
             vnc_port            INTEGER,
             status              TEXT,
             created_ms          INTEGER,
             last_connect_ms     INTEGER,
             last_client_address TEXT,
             pid                 INTEGER,
             command             TEXT,
             geometry            TEXT,
             client_params       TEXT,
             hlc_wall            INTEGER NOT NULL,
             hlc_logical         INTEGER NOT NULL,
             origin              TEXT    NOT NULL,
             tombstone           INTEGER NOT NULL,
             tombstone_at_ms     INTEGER
         );
         CREATE INDEX sessions_by_user ON sessions(user) WHERE tombstone = 0;
         CREATE INDEX sessions_by_agent_display ON sessions(agent, display) WHERE tombstone = 0;
         CREATE INDEX sessions_by_subcluster ON sessions(subcluster) WHERE tombstone = 0;
         CREATE INDEX sessions_tombstones_by_age ON sessions(tombstone_at_ms) WHERE tombstone = 1;
         CREATE TABLE changelog (
             seq        INTEGER PRIMARY KEY,
             session_id TEXT NOT NULL,
             record     TEXT NOT NULL
         );
         CREATE TABLE peer_positions (
             peer_db_id TEXT PRIMARY KEY NOT NULL,
             seq        INTEGER NOT NULL
         ) WITHOUT ROWID;",
    )?;
    tx.pragma_update(None, "application_id", APPLICATION_ID)?;
    tx.execute(
        "INSERT INTO meta (id, db_id, created_ms, hlc_wall, hlc_logical, head_seq)
         VALUES (1, ?1, ?2, 0, 0, 0)",
        rusqlite::params![new_db_id(), crate::model::now_ms() as i64],
    )?;
    Ok(())
}

/// Version 2: the version each record replaced (`base_*`, NULL when unknown), so that a
/// merge can tell an update of what it replaced from a concurrent write.
fn v2_record_base(tx: &Transaction<'_>) -> rusqlite::Result<()> {
    tx.execute_batch(
        "ALTER TABLE sessions ADD COLUMN base_wall INTEGER;
         ALTER TABLE sessions ADD COLUMN base_logical INTEGER;
         ALTER TABLE sessions ADD COLUMN base_origin TEXT;",
    )
}

/// Version 3: no change to the tables. From this version on `meta` holds the clock and the
/// change log's head only as of the last `gc` that deleted rows; the current values are in
/// the rows (see `owner.rs`). The number changes so that an older `vsmserver`, which takes
/// the head from `meta` alone and would number new changes from a stale head, refuses the
/// file instead of opening it.
fn v3_meta_only_at_gc(_tx: &Transaction<'_>) -> rusqlite::Result<()> {
    Ok(())
}

/// The secondary indexes of `sessions`, each as [`v1_initial`] creates it, and whether a
/// snapshot load drops it. Those whose keys are scattered over the table (a user, an agent
/// and display) are dropped while a snapshot loads into an empty database and built once
/// after it (`owner.rs`): one sort each instead of an insertion at a random place for every
/// row. The others stay: their entries come in the order rows are stored (a handful of
/// subclusters, each in row order; few tombstones), so each row appends to them, which is
/// cheaper than the scan of the whole table and the sort that building them again takes.
/// `open` builds any that a stop in between left missing.
pub(super) const SECONDARY_INDEXES: [(&str, &str, bool); 4] = [
    ("sessions_by_user", "ON sessions(user) WHERE tombstone = 0", true),
    ("sessions_by_agent_display", "ON sessions(agent, display) WHERE tombstone = 0", true),
    ("sessions_by_subcluster", "ON sessions(subcluster) WHERE tombstone = 0", false),
    ("sessions_tombstones_by_age", "ON sessions(tombstone_at_ms) WHERE tombstone = 1", false),
];

/// Builds every secondary index that is missing.
pub(super) fn create_secondary_indexes(conn: &Connection) -> rusqlite::Result<()> {
    for (name, def, _) in SECONDARY_INDEXES {
        conn.execute_batch(&format!("CREATE INDEX IF NOT EXISTS {name} {def}"))?;
    }
    Ok(())
}

/// Drops the secondary indexes a snapshot load builds again after it (inside the caller's
/// transaction).
pub(super) fn drop_indexes_for_a_load(conn: &Connection) -> rusqlite::Result<()> {
    for (name, _, for_a_load) in SECONDARY_INDEXES {
        if for_a_load {
            conn.execute_batch(&format!("DROP INDEX IF EXISTS {name}"))?;
        }
    }
    Ok(())
}

/// A random 128-bit identity for a freshly created database, as hex.
fn new_db_id() -> String {
    crate::model::random_hex_128()
}

/// The open database plus the lock that keeps other processes away from it.
pub(super) struct Opened {
    pub conn: Connection,
    /// Held for as long as the owner lives; dropping it releases the lock.
    pub lock: nix::fcntl::Flock<std::fs::File>,
}

/// Takes the exclusive advisory lock on `<path>.lock`, so a second vsmserver on the same
/// data directory fails instead of interleaving sequence numbers. The lock lives in its
/// own file (SQLite's own locks stay untouched) and vanishes with the process.
/// Creates `path` empty with mode 0600 if it is absent, and takes group and other access
/// away from it (and from SQLite's files beside it) if it exists: these files are ours.
fn create_private(path: &Path) -> Result<(), DbError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let io = |what: &str, p: &Path, source| DbError::Io { context: format!("{what} {}", p.display()), source };
    match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io("create", path, e)),
    }
    for suffix in ["", "-wal", "-shm", ".lock"] {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        let p = Path::new(&p);
        match std::fs::metadata(p) {
            Ok(m) if m.permissions().mode() & 0o077 != 0 => {
                std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600))
                    .map_err(|e| io("make private", p, e))?
            }
            _ => {}
        }
    }
    Ok(())
}

fn lock(path: &Path) -> Result<nix::fcntl::Flock<std::fs::File>, DbError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut lock_path = path.as_os_str().to_owned();
    lock_path.push(".lock");
    let file =
        std::fs::OpenOptions::new().create(true).truncate(false).write(true).mode(0o600).open(&lock_path).map_err(
            |source| DbError::Io { context: format!("open the lock file {}", Path::new(&lock_path).display()), source },
        )?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| match errno {
        nix::errno::Errno::EWOULDBLOCK => DbError::Locked { path: path.to_path_buf() },
        e => DbError::Io {
            context: format!("lock {}", Path::new(&lock_path).display()),
            source: std::io::Error::from(e),
        },
    })
}

/// Creates `dir` (and missing parents) if absent; a directory created here gets mode 0700
/// whatever the umask. An existing directory is left as it is (it may be shared).
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Opens (creating if absent) and migrates the database at `path`.
///
/// Checks happen in an order that never writes to a file that is then refused:
/// read the header pragmas, refuse newer or foreign files, run `quick_check` on existing
/// files, and only then switch to WAL and migrate.
pub(super) fn open(path: &Path, synchronous: DbSynchronous) -> Result<Opened, DbError> {
    if path.is_dir() {
        return Err(corrupt(path, "it is a directory, expected an sqlite file"));
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_private_dir(parent).map_err(|source| DbError::Io {
            context: format!("create the database directory {}", parent.display()),
            source,
        })?;
    }
    let lock = lock(path)?;
    let existed = std::fs::metadata(path).map(|m| m.len() > 0).unwrap_or(false);
    // Made by us, so private whatever the umask; SQLite gives its -wal and -shm files the
    // mode of the database file.
    create_private(path)?;

    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    configure_sqlite();
    let mut conn = Connection::open_with_flags(path, flags).map_err(|e| classify(path, e, "open"))?;
    conn.busy_timeout(Duration::from_secs(2)).ctx("set the busy timeout")?;

    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(|e| classify(path, e, "read the schema version"))?;
    if version > KNOWN_VERSION {
        return Err(DbError::NewerSchema { path: path.to_path_buf(), found: version, known: KNOWN_VERSION });
    }
    if existed {
        let app_id: i64 = conn
            .query_row("PRAGMA application_id", [], |r| r.get(0))
            .map_err(|e| classify(path, e, "read the application id"))?;
        if app_id != 0 && app_id != APPLICATION_ID {
            return Err(corrupt(
                path,
                &format!("it is an sqlite database of another application (application_id {app_id:#x})"),
            ));
        }
        if version == 0 {
            let objects: i64 = conn
                .query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))
                .map_err(|e| classify(path, e, "list the schema"))?;
            if objects > 0 {
                return Err(corrupt(path, "it is an sqlite database with tables but no vsm schema version"));
            }
        }
        quick_check(&conn, path)?;
    }

    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .map_err(|e| classify(path, e, "switch to WAL mode"))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(corrupt(path, &format!("cannot use WAL mode (journal mode stays {mode})")));
    }
    let sync = match synchronous {
        DbSynchronous::Full => "FULL",
        DbSynchronous::Normal => "NORMAL",
    };
    conn.pragma_update(None, "synchronous", sync).ctx("set synchronous")?;
    conn.pragma_update(None, "temp_store", "MEMORY").ctx("set temp_store")?;
    // The checkpointer (checkpoint.rs) keeps the log short; SQLite's own checkpoint,
    // which runs inside a commit and makes every write of its group wait for the database
    // file's flush, is only the safety net for when that thread falls behind.
    conn.pragma_update(None, "wal_autocheckpoint", WAL_AUTOCHECKPOINT_PAGES).ctx("set wal_autocheckpoint")?;
    // SQLite's default page cache (2 MiB) holds a fraction of a 100,000-session database's
    // pages: a large transaction (a snapshot chunk) spilled dirty pages to the log before its
    // commit and read others back from the file. Pages are allocated only as they are used.
    conn.pragma_update(None, "cache_size", -OWNER_CACHE_KIB).ctx("set cache_size")?;
    conn.set_prepared_statement_cache_capacity(64);

    migrate(&mut conn, path, version)?;
    // A stop while a snapshot was loading leaves the indexes dropped.
    create_secondary_indexes(&conn).map_err(|e| classify(path, e, "build the session indexes"))?;
    Ok(Opened { conn, lock })
}

/// Process-wide SQLite settings, which must be made before SQLite initialises: every
/// connection this crate opens calls this first. Our page cache (`pcache.rs`), and no
/// memory statistics: SQLite keeps them under one process-wide mutex taken around each of
/// its allocations, and nothing here reads them.
fn configure_sqlite() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: MEMSTATUS takes one int; SQLite refuses it (SQLITE_MISUSE, nothing
        // changed) once it is initialised, which leaves the statistics on: harmless.
        let rc = unsafe { rusqlite::ffi::sqlite3_config(rusqlite::ffi::SQLITE_CONFIG_MEMSTATUS, 0 as std::ffi::c_int) };
        if rc != rusqlite::ffi::SQLITE_OK {
            tracing::debug!(rc, "sqlite memory statistics: left on (sqlite already initialised)");
        }
        super::pcache::install();
    });
}

/// The background checkpointer's connection: it never touches a row.
pub(super) fn open_checkpointer(path: &Path) -> Result<Connection, DbError> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    configure_sqlite();
    let conn = Connection::open_with_flags(path, flags).map_err(|e| classify(path, e, "open the checkpointer"))?;
    conn.busy_timeout(Duration::from_secs(2)).ctx("set the busy timeout")?;
    Ok(conn)
}

/// A second, read-only connection to a database the owner already opened and migrated;
/// WAL lets it read one consistent state while the owner keeps committing.
pub(super) fn open_reader(path: &Path) -> Result<Connection, DbError> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    configure_sqlite();
    let conn = Connection::open_with_flags(path, flags).map_err(|e| classify(path, e, "open a reader"))?;
    conn.busy_timeout(Duration::from_secs(2)).ctx("set the busy timeout")?;
    conn.pragma_update(None, "query_only", true).ctx("make a reader read-only")?;
    Ok(conn)
}

/// Where a snapshot received as a file is written until it is loaded (`owner.rs`).
pub(super) fn snapshot_in_path(path: &Path) -> PathBuf {
    with_suffix(path, ".snapshot-in")
}

/// A new name for a snapshot file built for the peer (`reader.rs`): several may be built at
/// once (a reconnect while the last is still sent).
pub(super) fn snapshot_out_path(path: &Path) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    with_suffix(path, &format!("{SNAPSHOT_OUT_INFIX}{}-{n}", std::process::id()))
}

const SNAPSHOT_OUT_INFIX: &str = ".snapshot-out-";

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(suffix);
    PathBuf::from(p)
}

/// Removes snapshot files a stop left behind beside the database at `path`.
pub(super) fn remove_stale_snapshot_files(path: &Path) {
    let _ = std::fs::remove_file(snapshot_in_path(path));
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else { return };
    let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
    let mut prefix = name.to_owned();
    prefix.push(SNAPSHOT_OUT_INFIX);
    let prefix = prefix.to_string_lossy().into_owned();
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().starts_with(&prefix) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Creates `file` empty with mode 0600 (it must not exist), so SQLite opens it private
/// whatever the umask.
pub(super) fn create_snapshot_file(file: &Path) -> Result<(), DbError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(file)
        .map(drop)
        .map_err(|source| DbError::Io { context: format!("create {}", file.display()), source })
}

/// A connection to a database the owner already opened, with the new file `file` attached
/// as `snap` and holding empty copies of the `sessions` table and its indexes, made from
/// their definitions in this database (so the two match exactly, as SQLite's row transfer
/// needs). The file needs no journal or flush: it is read once and removed. The connection
/// writes nothing but `snap`.
pub(super) fn open_snapshot_builder(path: &Path, file: &Path) -> Result<Connection, DbError> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    configure_sqlite();
    let conn = Connection::open_with_flags(path, flags).map_err(|e| classify(path, e, "open a snapshot reader"))?;
    conn.busy_timeout(Duration::from_secs(2)).ctx("set the busy timeout")?;
    create_snapshot_file(file)?;
    conn.execute("ATTACH ?1 AS snap", [file.to_string_lossy()]).ctx("attach a snapshot file")?;
    // Large pages: fewer of them to fill and split while the rows are copied in (92 against
    // 110 ms for 100,000 sessions); the receiver reads any page size.
    conn.execute_batch("PRAGMA snap.page_size = 65536; PRAGMA snap.journal_mode = OFF; PRAGMA snap.synchronous = OFF;")
        .ctx("set up a snapshot file")?;
    for sql in sessions_definitions(&conn, "main")? {
        let sql = sql
            .strip_prefix("CREATE TABLE ")
            .map(|rest| format!("CREATE TABLE snap.{rest}"))
            .or_else(|| sql.strip_prefix("CREATE INDEX ").map(|rest| format!("CREATE INDEX snap.{rest}")))
            .ok_or_else(|| corrupt(path, &format!("unexpected definition in the schema: {sql}")))?;
        conn.execute_batch(&sql).ctx("create the tables of a snapshot file")?;
    }
    Ok(conn)
}

/// The SQL that created `sessions` and its explicit indexes in `schema`, table first.
fn sessions_definitions(conn: &Connection, schema: &str) -> Result<Vec<String>, DbError> {
    let mut stmt = conn
        .prepare(&format!(
            "SELECT sql FROM {schema}.sqlite_schema WHERE tbl_name = 'sessions' AND sql IS NOT NULL
             ORDER BY type = 'table' DESC, name"
        ))
        .ctx("read the schema")?;
    let rows = stmt.query_map([], |r| r.get::<_, String>(0)).ctx("read the schema")?;
    rows.map(|r| r.ctx("read the schema")).collect()
}

/// A read-only connection to a file this process wrote (a snapshot file received).
pub(super) fn open_read_only(file: &Path) -> Result<Connection, DbError> {
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    configure_sqlite();
    let conn = Connection::open_with_flags(file, flags).map_err(|e| classify(file, e, "open a snapshot file"))?;
    conn.execute_batch("PRAGMA cell_size_check = ON; PRAGMA trusted_schema = OFF;")
        .ctx("set up a snapshot file check")?;
    Ok(conn)
}

/// Name, declared type, NOT NULL, default and key position of each column of `sessions` in
/// `schema`, in order.
pub(super) fn sessions_columns(conn: &Connection, schema: &str) -> Result<Vec<String>, DbError> {
    let mut stmt = conn.prepare(&format!("PRAGMA {schema}.table_info(sessions)")).ctx("read the table's columns")?;
    let rows = stmt
        .query_map([], |r| {
            Ok(format!(
                "{} {} {} {:?} {}",
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, Option<String>>(4)?,
                r.get::<_, i64>(5)?
            ))
        })
        .ctx("read the table's columns")?;
    rows.map(|r| r.ctx("read the table's columns")).collect()
}

fn migrate(conn: &mut Connection, path: &Path, from: i64) -> Result<(), DbError> {
    for (i, step) in MIGRATIONS.iter().enumerate().skip(from.max(0) as usize) {
        let to = i as i64 + 1;
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(|e| classify(path, e, "begin a migration"))?;
        step(&tx).map_err(|e| classify(path, e, "migrate the schema"))?;
        tx.pragma_update(None, "user_version", to).ctx("record the schema version")?;
        tx.commit().map_err(|e| classify(path, e, "commit a migration"))?;
        tracing::info!(path = %path.display(), version = to, "session database schema migrated");
    }
    Ok(())
}

fn quick_check(conn: &Connection, path: &Path) -> Result<(), DbError> {
    let mut stmt = conn.prepare("PRAGMA quick_check(5)").map_err(|e| classify(path, e, "check the database"))?;
    let lines: Vec<String> = stmt
        .query_map([], |r| r.get::<_, String>(0))
        .and_then(|rows| rows.collect())
        .map_err(|e| classify(path, e, "check the database"))?;
    if lines.len() == 1 && lines[0] == "ok" {
        Ok(())
    } else {
        Err(corrupt(path, &format!("integrity check failed: {}", lines.join("; "))))
    }
}

fn corrupt(path: &Path, detail: &str) -> DbError {
    DbError::Corrupt { path: path.to_path_buf(), detail: detail.to_string() }
}

/// Maps an error met while opening to what the caller must do about it.
fn classify(path: &Path, e: rusqlite::Error, doing: &'static str) -> DbError {
    use rusqlite::ErrorCode;
    match e.sqlite_error_code() {
        Some(ErrorCode::NotADatabase) => corrupt(path, "it is not an sqlite database"),
        Some(ErrorCode::DatabaseCorrupt) => corrupt(path, &format!("sqlite reports corruption: {e}")),
        Some(ErrorCode::DatabaseBusy) | Some(ErrorCode::DatabaseLocked) => DbError::Locked { path: path.to_path_buf() },
        _ => DbError::sqlite(doing, e),
    }
}
