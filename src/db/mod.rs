//! The session database: the single owner of SQLite.
//!
//! Owns: the sessions table (live sessions and tombstones with their versions), this
//! node's change log, the hybrid logical clock, the database identity and the positions
//! reached in each peer's change log. Everything else in the crate holds a [`DbHandle`].
//!
//! Must never: let a `rusqlite` type out of this module, append a remote record to the
//! local change log, or touch a file it refused to open.
//!
//! # Shape
//! One dedicated std thread (see `owner.rs`) owns the `rusqlite::Connection`. A
//! [`DbHandle`] is a cheap clone around a bounded channel; every call sends a request with
//! a oneshot reply. When the thread is gone every call returns [`DbError::Closed`].
//!
//! The owner drains up to [`GROUP_MAX`] queued requests at a time. Consecutive writes
//! (`write`, `write_batch`, `apply_remote`, `gc`) commit in ONE transaction (group commit)
//! and are answered only after that commit. Reads taken in the same round run after that
//! commit, in arrival order: a read sees every write queued before it (and possibly writes
//! queued after it, which were concurrent with it) and never uncommitted data, and reads
//! between writes do not split the group into one transaction (one fsync) each.
//! If anything in a group fails, the group is rolled back and its requests are redone one
//! transaction each, so one bad request cannot fail its neighbours.
//!
//! # Invariants
//! - Every local write and its change-log row commit in the same transaction; `seq` is
//!   dense (1, 2, 3, ...) and never reused, even after `gc` emptied the log (a `gc` that
//!   deletes rows writes the head and clock to `meta`; otherwise they are read back from
//!   the rows at open, so commits do not rewrite `meta`).
//! - A local write's version is `(hlc.tick(now), local node)`; the clock is persisted in
//!   the same transaction (as the row's version) and merged with every applied remote record, so local versions
//!   exceed every version this database has seen within the clock bound below, and always
//!   the stored version of the record they replace.
//! - Merging is last-writer-wins on [`Version`]; equal versions are skipped, so applying
//!   the same records twice has no effect. Tombstones are records like any other, and a
//!   delete concurrent with a newer live change is written again above it (deletes win;
//!   see `merge.rs`). A local live write over a tombstone is refused ([`DbError::Ended`]).
//!
//! # Decisions (details beyond the first design, kept here so they stay true)
//! - `Write::Delete` always writes a tombstone, even for an id this database never saw
//!   or already deleted: a delete can reach the new active master before the create it
//!   deletes (exit reported during a failover); the tombstone then wins the merge.
//!   [`Committed::was_live`] says whether a live session was actually removed.
//! - A tombstone's `tombstone_at_ms` is the wall time of its version, not of its arrival,
//!   and `gc` measures it against a clock reading the caller gives (the earlier of both
//!   masters' clocks), never this machine's own clock alone, so both nodes forget the same
//!   tombstones even when their clocks differ.
//! - Bounded clock: the hybrid clock never runs more than `max_clock_offset` ahead of this
//!   machine's wall clock. A remote record stamped further ahead is stored exactly as sent
//!   (both databases must hold the same versions) but the clock follows it only up to the
//!   bound, with a warning; a clock left in the future by a wall clock that was set back is
//!   pulled back to the bound at the next write. A write still always exceeds the stored
//!   version of the record it replaces, so updates of one session stay in order.
//! - [`DbHandle::changes_since`] also answers `Truncated` when `after > head`: the caller's
//!   position comes from a history this database does not have (restored from a backup);
//!   a snapshot is the only safe way on.
//! - A conflict is reported only when the two versions come from different nodes and carry
//!   different content; two versions from one node are always an ordinary update.
//! - A second process on the same file gets [`DbError::Locked`] (an advisory lock on
//!   `<file>.lock`) instead of interleaving sequence numbers.
//! - Snapshots and digests run on a reader thread with its own connection (see
//!   `reader.rs`): WAL gives it one consistent state while the owner keeps committing, and
//!   [`DbHandle::snapshot_stream`] hands the records out in chunks, so a resync of 100,000
//!   sessions neither stalls writes nor needs them all in memory at once.
//! - [`DbHandle::set_peer_position`] overwrites a position (`apply_remote` only moves it
//!   forward): after a full snapshot from a peer whose log went backwards (restored from a
//!   backup), the position must go back too.
//! - A background checkpointer thread (its own connection) copies the write-ahead log into
//!   the file, poked every 4,096 commits or rows, so commits do not pay for checkpoints;
//!   SQLite's automatic checkpoint remains as a safety net at 65,536 pages.
//! - With FULL, a commit is on disk before anything of it leaves the process (its reply,
//!   its changes for the peer, a read that saw it), but the flush happens on a thread of its
//!   own while the owner commits the next group (`flush.rs`); a flush that fails makes every
//!   later write fail until restart.
//! - `apply_remote` visits a request's records in id order (index locality); the result
//!   does not depend on order. Snapshots come in storage order, digests in id order.
//! - The owner knows an id at least as great as every stored one (read at open, raised by
//!   each write). A write or a record whose id is above it has no row: it is inserted
//!   without looking the row up first, with one statement for a run of such records in an
//!   apply. Session ids begin with their creation time, so this is most creates, and most
//!   of a snapshot (it comes in storage order) loading into an empty database.
//! - A snapshot loading into an empty database (chunks applied with
//!   [`PositionUpdate::Keep`] while no session is stored) is loaded without the secondary
//!   indexes on a user and on an agent and display, which the first other request (the
//!   snapshot's end) builds again: one sort per index instead of an insertion at a random
//!   place for every row (the other two, appended to in row order, stay). Reads stay right
//!   meanwhile, only slower; the drop rolls back with a failed chunk, and open builds
//!   indexes a stop left out.
//! - A peer whose database is empty gets the snapshot as a SQLite file of `sessions`
//!   ([`DbHandle::snapshot_file`]): rows and index entries are copied as stored, by SQLite's
//!   transfer between tables of one definition, into the file and out of it again
//!   ([`DbHandle::queue_snapshot_load`]), with no record decoded or encoded; the loading side
//!   checks every row as a read would decode it, on a thread of its own meanwhile, and the
//!   load commits only if that passes. 100,000 sessions: 0.1 s to build, 0.22 s to load,
//!   against 0.7 s through records.
//! - [`DbHandle::queue_apply`] lets the replication engine queue the next apply before the
//!   last is on disk; a chain of them stops at the first failure (see there).
//! - Dropping a `write` future does not cancel the write: once queued, it commits.

mod checkpoint;
mod flush;
mod owner;
mod pcache;
mod reader;
mod schema;
mod store;

pub mod merge;

#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::model::{
    Change, DbSynchronous, Hlc, LogRead, NodeId, Record, Seq, Session, SessionId, SessionStatus, Snapshot, Version,
};

pub use merge::Winner;
pub use schema::create_private_dir;

/// Most requests the owner takes from the queue for one round (and one group commit).
pub const GROUP_MAX: usize = 256;
/// Capacity of the request channel.
const QUEUE: usize = 1024;

/// How to open the session database.
#[derive(Clone, Debug)]
pub struct DbOptions {
    /// The SQLite file, e.g. `data_dir/sessions.db`. Created (with its directory) if absent.
    pub path: PathBuf,
    /// This node's id: the tie-break of every version written here.
    pub node: NodeId,
    pub synchronous: DbSynchronous,
    /// How many change-log rows `gc` keeps behind the head.
    pub changelog_retention: u64,
    /// How long `gc` keeps tombstones (measured from the tombstone's version).
    pub tombstone_retention: Duration,
    /// `/HA/max_clock_offset`: how far ahead of this machine's wall clock the hybrid clock
    /// may run (see "Bounded clock" in the module docs).
    pub max_clock_offset: Duration,
}

/// How [`DbHandle::apply_remote_with`] updates the stored position in the peer's log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PositionUpdate {
    /// Leave it as it is (a snapshot chunk).
    Keep,
    /// Move it forward to this seq, never back.
    Advance(Seq),
    /// Store exactly this seq (end of a snapshot, which may rewind a restored peer).
    Set(Seq),
}

/// Names a sequence of applies queued without waiting ([`DbHandle::queue_apply`]); one per
/// peer connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApplyChain(pub u64);

/// An apply queued with [`DbHandle::queue_apply`]: resolves once it is done (with FULL, on
/// disk) or failed.
#[derive(Debug)]
pub struct PendingApply(oneshot::Receiver<Result<ApplyOutcome, DbError>>);

impl std::future::Future for PendingApply {
    type Output = Result<ApplyOutcome, DbError>;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0).poll(cx).map(|r| r.unwrap_or(Err(DbError::Closed)))
    }
}

/// A local mutation.
// A session moves once, into the owner's queue; boxing it would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write {
    /// Create or replace the session with `session.id`.
    Upsert(Session),
    /// Delete the session (always writes a tombstone; see the module docs).
    Delete(SessionId),
}

impl Write {
    pub fn id(&self) -> &SessionId {
        match self {
            Write::Upsert(s) => &s.id,
            Write::Delete(id) => id,
        }
    }
}

/// A committed local write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Committed {
    /// Its position in this node's change log.
    pub seq: Seq,
    pub version: Version,
    /// The record as stored (and as the change log holds it).
    pub record: Record,
    /// Whether a live session with this id existed just before the write.
    pub was_live: bool,
}

impl Committed {
    /// The change-log entry this write appended.
    pub fn change(&self) -> Change {
        Change { seq: self.seq, record: self.record.clone() }
    }
}

/// Which live sessions to list. Set fields combine with AND; `Default` lists everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionFilter {
    pub user: Option<String>,
    pub agent: Option<String>,
    pub display: Option<u32>,
    pub subcluster: Option<String>,
    pub status: Option<SessionStatus>,
    /// Leave out sessions whose status is `unreachable`.
    pub exclude_unreachable: bool,
}

/// Replication state of this database.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DbStatus {
    pub db_id: String,
    /// Last seq written to the change log (`Seq::ZERO` when nothing was ever written).
    pub head: Seq,
    /// Oldest seq still in the change log; `head + 1` when the log is empty.
    pub oldest: Seq,
    /// Live sessions.
    pub sessions: u64,
    pub tombstones: u64,
    /// The clock's last reading.
    pub hlc: Hlc,
}

/// A snapshot handed out in chunks, read in one transaction on a thread of its own.
/// Dropping it ends the read.
#[derive(Debug)]
pub struct SnapshotStream {
    /// The change-log head the records are consistent with.
    pub head: Seq,
    pub db_id: String,
    /// How many records (sessions and tombstones) the chunks hold in total.
    pub total: u64,
    chunks: mpsc::Receiver<Result<Vec<Record>, DbError>>,
}

impl SnapshotStream {
    /// The next chunk (storage order, not sorted); `None` after the last one.
    pub async fn next_chunk(&mut self) -> Option<Result<Vec<Record>, DbError>> {
        self.chunks.recv().await
    }
}

/// A snapshot as a SQLite file holding the `sessions` table (rows and indexes as stored),
/// handed out in pieces; built on a thread of its own in one read transaction with the
/// header. Dropping it ends the read and removes the file.
#[derive(Debug)]
pub struct SnapshotFile {
    /// The change-log head the file is consistent with.
    pub head: Seq,
    pub db_id: String,
    /// How many records (sessions and tombstones) the file holds.
    pub total: u64,
    pieces: mpsc::Receiver<Result<Vec<u8>, DbError>>,
}

impl SnapshotFile {
    /// The next bytes of the file; `None` after the last.
    pub async fn next_piece(&mut self) -> Option<Result<Vec<u8>, DbError>> {
        self.pieces.recv().await
    }
}

/// Both sides of a concurrent change, after the merge decided it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    pub local: Record,
    pub remote: Record,
    pub winner: Winner,
}

/// Result of [`DbHandle::apply_remote`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyOutcome {
    /// Records stored (new, or newer than the stored version).
    pub applied: usize,
    /// Records equal to or older than the stored version.
    pub skipped: usize,
    pub conflicts: Vec<Conflict>,
    /// Deletes written again because the peer changed a session this node had ended, or
    /// ended one this node had changed, while the two were apart (see `merge::reasserts_delete`):
    /// the new local tombstones, which stream to the peer like any local change.
    pub deletes_kept: Vec<Record>,
}

/// Result of [`DbHandle::gc`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GcStats {
    pub tombstones: usize,
    pub changes: usize,
    /// More change-log rows are due than one call trims ([`GC_CHANGES_PER_CALL`]): call
    /// again (each call is its own transaction, so writes go on in between).
    pub more: bool,
}

/// Most change-log rows one [`DbHandle::gc`] call trims: a busy master writes a minute's
/// worth of changes between two housekeeping rounds, and trimming them all in one
/// transaction would hold every write for as long.
pub const GC_CHANGES_PER_CALL: u64 = 5_000;

/// Opaque SQLite error (keeps the source chain without exposing `rusqlite`).
#[derive(Debug)]
pub struct SqliteError(rusqlite::Error);

impl std::fmt::Display for SqliteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for SqliteError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

/// What went wrong, named for what the caller does next.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The owner thread is gone (shut down or died): stop using this handle.
    #[error("the session database is closed")]
    Closed,
    /// Refuse to start: the file was made by a newer vsmserver.
    #[error(
        "database {} has schema version {found}, this vsmserver knows up to {known}; refusing to touch it",
        path.display()
    )]
    NewerSchema { path: PathBuf, found: i64, known: i64 },
    /// Refuse to start: the file is not a readable vsm session database. It is left as is.
    #[error(
        "database {} is not a usable vsm session database ({detail}); refusing to touch it: move it away to start empty, or restore a backup",
        path.display()
    )]
    Corrupt { path: PathBuf, detail: String },
    /// Refuse to start: another process has the file open.
    #[error("database {} is in use by another process; is another vsmserver running with the same data directory?", path.display())]
    Locked { path: PathBuf },
    /// A file-system operation failed.
    #[error("cannot {context}: {source}")]
    Io { context: String, source: std::io::Error },
    /// The file system holding the database is full; nothing of the request was applied.
    #[error("no space left on device: cannot {context}; free space on the file system of the data directory")]
    DiskFull { context: String },
    /// SQLite failed; the request was not applied (its transaction rolled back).
    #[error("sqlite failed to {context}: {source}")]
    Sqlite { context: &'static str, source: SqliteError },
    /// A record that cannot be stored: a local write over the bounds of a record (refused
    /// before anything was written), or a peer's record that cannot be stored; nothing of
    /// that request was applied.
    #[error("invalid record {id}: {detail}")]
    InvalidRecord { id: SessionId, detail: String },
    /// A snapshot the peer sent as a file cannot be loaded; nothing of it was applied.
    #[error("the peer's snapshot cannot be loaded: {detail}; nothing of it was applied")]
    InvalidSnapshot { detail: String },
    /// A live write for a session that has ended (its record is a tombstone): an ended
    /// session is never live again, so nothing was written.
    #[error("session {0} has ended; an ended session is never brought back")]
    Ended(SessionId),
    /// An earlier apply of the same chain failed, so this one was refused unapplied (storing
    /// it would have left a gap below the position it carries).
    #[error("not applied: an earlier batch of the peer's changes on this link failed to apply")]
    ApplyChainBroken,
}

impl DbError {
    fn sqlite(context: &'static str, e: rusqlite::Error) -> DbError {
        if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull) {
            return DbError::DiskFull { context: context.to_string() };
        }
        DbError::Sqlite { context, source: SqliteError(e) }
    }

    /// An I/O or SQLite failure on a file system with no space left is named as such:
    /// SQLite reports some of them as a plain "disk I/O error".
    fn or_disk_full(self, path: &Path) -> DbError {
        let (context, enospc) = match &self {
            DbError::Sqlite { context, .. } => (context.to_string(), false),
            DbError::Io { context, source } => (context.clone(), source.raw_os_error() == Some(libc::ENOSPC)),
            _ => return self,
        };
        if enospc || no_space_left(path) {
            DbError::DiskFull { context: format!("{context} ({})", path.display()) }
        } else {
            self
        }
    }
}

/// Is the file system holding `path` (or its directory) out of space?
fn no_space_left(path: &Path) -> bool {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    match nix::sys::statvfs::statvfs(dir) {
        // A few blocks may remain for root while SQLite cannot grow its files.
        Ok(st) => (st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64) < 64 * 1024,
        Err(_) => false,
    }
}

/// `rusqlite::Result` → `DbError` with a short "what we were doing".
trait SqlContext<T> {
    fn ctx(self, context: &'static str) -> Result<T, DbError>;
}

impl<T> SqlContext<T> for rusqlite::Result<T> {
    fn ctx(self, context: &'static str) -> Result<T, DbError> {
        self.map_err(|e| DbError::sqlite(context, e))
    }
}

/// How many live sessions one agent has in one state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionCount {
    pub agent: String,
    pub status: SessionStatus,
    pub count: u64,
}

/// Cloneable handle to the session database's owner thread.
#[derive(Clone, Debug)]
pub struct DbHandle {
    tx: mpsc::Sender<owner::Request>,
    db_id: Arc<str>,
    node: NodeId,
    path: Arc<Path>,
    head: watch::Receiver<Seq>,
    changes: broadcast::Sender<owner::ChangeBatch>,
    runtime: tokio::runtime::Handle,
    user_counts: AgentUserCounts,
    /// The point reader's queue (see [`DbHandle::list_committed`]).
    points: mpsc::Sender<reader::PointJob>,
    /// What reads on other connections wait on before they answer (see `flush.rs`).
    durable: flush::Durable,
}

/// Distinct users with live sessions per agent, kept by the owner thread as it writes and
/// readable from any thread without a round trip to it: placement reads it on every login.
/// The owner updates it while a transaction runs, so for a moment it may count a write that
/// then fails (it is recounted after a rollback); placement only balances load with it.
#[derive(Clone, Debug, Default)]
pub struct AgentUserCounts(Arc<std::sync::RwLock<rustc_hash::FxHashMap<String, u32>>>);

impl AgentUserCounts {
    /// Runs `f` on the current counts (agent → users; an agent without users is absent).
    pub fn read<T>(&self, f: impl FnOnce(&rustc_hash::FxHashMap<String, u32>) -> T) -> T {
        // A panic while the owner held the lock leaves counts that are at worst stale.
        f(&self.0.read().unwrap_or_else(|e| e.into_inner()))
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, rustc_hash::FxHashMap<String, u32>> {
        self.0.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets the figure of `agent` (0 removes it).
    pub(super) fn set(&self, agent: &str, users: usize) {
        let mut m = self.write();
        match (users, m.get_mut(agent)) {
            (0, _) => {
                m.remove(agent);
            }
            (n, Some(v)) => *v = u32::try_from(n).unwrap_or(u32::MAX),
            (n, None) => {
                m.insert(agent.to_string(), u32::try_from(n).unwrap_or(u32::MAX));
            }
        }
    }

    /// Replaces every figure by those of `per_agent`.
    pub(super) fn reset(&self, per_agent: &store::UsersPerAgent) {
        let fresh = per_agent.iter().map(|(a, users)| (a.clone(), u32::try_from(users.len()).unwrap_or(u32::MAX)));
        *self.write() = fresh.collect();
    }
}

/// Committed local changes of one transaction, in seq order; see [`DbHandle::subscribe_changes`].
pub type ChangeBatch = Arc<Vec<Change>>;

impl DbHandle {
    /// Opens (creating, checking and migrating) the database and starts its owner thread.
    ///
    /// Blocks while the file is opened and checked (`quick_check` reads the whole file);
    /// call it at start-up or from `spawn_blocking`.
    pub fn open(opts: DbOptions) -> Result<DbHandle, DbError> {
        let path: Arc<Path> = Arc::from(opts.path.as_path());
        let node = opts.node.clone();
        let (tx, rx) = mpsc::channel(QUEUE);
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("vsm-db".into())
            .spawn(move || owner::run(opts, rx, ready_tx))
            .map_err(|source| DbError::Io { context: "start the database thread".into(), source })?;
        let owner::Opened { db_id, head, changes, runtime, user_counts, durable } =
            ready_rx.recv().map_err(|_| DbError::Closed)??;
        // Opened after the owner checked and migrated the file.
        let conn = schema::open_reader(&path)?;
        let (points, jobs) = mpsc::channel(QUEUE);
        let reader_path = path.to_path_buf();
        std::thread::Builder::new()
            .name("vsm-db-reader".into())
            .spawn(move || reader::serve_points(conn, reader_path, jobs))
            .map_err(|source| DbError::Io { context: "start the point reader thread".into(), source })?;
        Ok(DbHandle {
            tx,
            db_id: Arc::from(db_id.as_str()),
            node,
            path,
            head,
            changes,
            runtime,
            user_counts,
            points,
            durable,
        })
    }

    /// The owner thread's own single-threaded runtime. A task that talks to the database
    /// far more than to anything else (the HA node's engine task and peer link) runs there:
    /// each of its calls is then answered within the thread instead of waking two others.
    /// Such a task must never block: while it runs, the database waits.
    pub fn runtime(&self) -> &tokio::runtime::Handle {
        &self.runtime
    }

    /// This database's identity (random, made once when the file was created).
    pub fn db_id(&self) -> &str {
        &self.db_id
    }

    /// The local node id versions are written with.
    pub fn node(&self) -> &NodeId {
        &self.node
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The change-log head, updated after every commit that appended to it.
    /// Replication waits on this instead of polling.
    pub fn watch_head(&self) -> watch::Receiver<Seq> {
        self.head.clone()
    }

    /// The local changes of every transaction committed from now on, one message per
    /// transaction, after its commit and in commit order; replication sends them without
    /// reading the change log back. A receiver that falls more than 1024 transactions behind
    /// gets `Lagged` and must read the log instead ([`DbHandle::changes_since`]).
    pub fn subscribe_changes(&self) -> broadcast::Receiver<ChangeBatch> {
        self.changes.subscribe()
    }

    /// A record that could never be replicated (a field or the whole over its bound, see
    /// [`crate::model::check_record`]) is refused here, where it originates.
    fn check_write(&self, w: &Write) -> Result<(), DbError> {
        let session = match w {
            Write::Upsert(s) => Some(s),
            Write::Delete(_) => None,
        };
        crate::model::check_record(w.id(), &self.node, session)
            .map_err(|e| DbError::InvalidRecord { id: w.id().clone(), detail: e.to_string() })
    }

    /// One local write in its own change-log row, committed (group commit) before answering.
    /// A write over the bounds of a record is refused ([`DbError::InvalidRecord`]).
    pub async fn write(&self, w: Write) -> Result<Committed, DbError> {
        self.check_write(&w)?;
        self.call(|reply| owner::Request::Write(owner::WriteReq::One { write: w, reply })).await
    }

    /// Several local writes committed in one transaction, one change-log row each.
    pub async fn write_batch(&self, ws: Vec<Write>) -> Result<Vec<Committed>, DbError> {
        for w in &ws {
            self.check_write(w)?;
        }
        self.call(|reply| owner::Request::Write(owner::WriteReq::Batch { writes: ws, reply })).await
    }

    /// Merges records from the peer whose database is `peer_db_id` (last writer wins; a delete concurrent with a newer change is written again),
    /// records `peer_pos` as the position reached in its change log (only forward), and
    /// merges its clock into ours, all in one transaction. Nothing goes to our change log.
    pub async fn apply_remote(
        &self,
        peer_db_id: String,
        records: Vec<Record>,
        peer_pos: Seq,
    ) -> Result<ApplyOutcome, DbError> {
        self.apply_remote_with(peer_db_id, records, PositionUpdate::Advance(peer_pos)).await
    }

    /// [`DbHandle::apply_remote`] with an explicit rule for the stored position: the
    /// replication engine keeps it while a snapshot is being applied and sets it exactly at
    /// the snapshot's end.
    pub async fn apply_remote_with(
        &self,
        peer_db_id: String,
        records: Vec<Record>,
        pos: PositionUpdate,
    ) -> Result<ApplyOutcome, DbError> {
        self.call(|reply| {
            owner::Request::Write(owner::WriteReq::Apply { peer: peer_db_id, records, pos, chain: None, reply })
        })
        .await
    }

    /// Hands an apply to the database and returns once it is queued, not done: the caller
    /// may queue the next before this one is on disk (the replication engine does, so the
    /// standby commits the next changes while the last are flushed). The applies of one
    /// `chain` are done in the order queued, and once one of them fails every later one of
    /// that chain fails with [`DbError::ApplyChainBroken`] without storing anything, so no
    /// position is ever stored past records that were not.
    pub async fn queue_apply(
        &self,
        chain: ApplyChain,
        peer_db_id: String,
        records: Vec<Record>,
        pos: PositionUpdate,
    ) -> Result<PendingApply, DbError> {
        let (reply, rx) = oneshot::channel();
        let req = owner::WriteReq::Apply { peer: peer_db_id, records, pos, chain: Some(chain), reply };
        self.tx.send(owner::Request::Write(req)).await.map_err(|_| DbError::Closed)?;
        Ok(PendingApply(rx))
    }

    /// Forgets change-log rows more than the change-log retention behind the head (at most
    /// [`GC_CHANGES_PER_CALL`] of them; [`GcStats::more`] says whether more are due) and, when
    /// `clock_ms` is given, tombstones whose version is older than `clock_ms` minus the
    /// tombstone retention. `clock_ms` must be a reading both masters agree on (the earlier
    /// of their two clocks, see [`crate::ha::engine::shared_clock_ms`]), so that both forget
    /// the same tombstones; `None` keeps every tombstone.
    pub async fn gc(&self, clock_ms: Option<u64>) -> Result<GcStats, DbError> {
        self.call(|reply| owner::Request::Write(owner::WriteReq::Gc { clock_ms, reply })).await
    }

    /// A live session.
    pub async fn get(&self, id: &SessionId) -> Result<Option<Session>, DbError> {
        let id = id.clone();
        self.read(move |o| o.get(&id)).await
    }

    /// The stored record of `id`, tombstones included.
    pub async fn record(&self, id: &SessionId) -> Result<Option<Record>, DbError> {
        let id = id.clone();
        self.read(move |o| o.record(&id)).await
    }

    /// Live sessions matching every set field of `filter`, oldest first.
    pub async fn list(&self, filter: &SessionFilter) -> Result<Vec<Session>, DbError> {
        let filter = filter.clone();
        self.read(move |o| o.list(&filter)).await
    }

    /// Like [`DbHandle::list`], but read by the point reader on a connection of its own, so
    /// it never waits behind a commit in progress, as a read through the owner does. With
    /// FULL it waits after its read for the flush of the commits it may have seen (for a read
    /// of one user's sessions, only those that wrote a record of that user). It sees every
    /// write that was answered before it was asked; a write still queued or committing may or
    /// may not be seen.
    pub async fn list_committed(&self, filter: &SessionFilter) -> Result<Vec<Session>, DbError> {
        if self.tx.is_closed() {
            return Err(DbError::Closed);
        }
        let filter = filter.clone();
        let (reply, rx) = oneshot::channel();
        let durable = self.durable.clone();
        let job: reader::PointJob = Box::new(move |conn, path| {
            let res = store::list(conn, path, &filter);
            // What was read leaves only once it is on disk (with FULL; see `flush.rs`): for
            // one user's sessions, once that user's commits are.
            let settled = match &filter.user {
                Some(user) => durable.settle_user(user),
                None => durable.settle(),
            };
            drop(reply.send(settled.and(res)))
        });
        self.points.send(job).await.map_err(|_| DbError::Closed)?;
        rx.await.map_err(|_| DbError::Closed)?
    }

    /// Per agent, how many distinct users have live sessions on it, copied out of
    /// [`DbHandle::users_per_agent`] (what the tests compare with a count by SQL).
    #[cfg(test)]
    pub(crate) async fn count_users_per_agent(&self) -> Result<std::collections::BTreeMap<String, usize>, DbError> {
        Ok(self.user_counts.read(|m| m.iter().map(|(a, n)| (a.clone(), *n as usize)).collect()))
    }

    /// The live count of distinct users per agent, read in place (no copy, no round trip).
    pub fn users_per_agent(&self) -> &AgentUserCounts {
        &self.user_counts
    }

    /// The id and agent of every live session, read on a thread and connection of its own
    /// (commits go on meanwhile). It holds every write answered before it was asked; with
    /// FULL it answers once what it read is flushed.
    pub async fn live_ids(&self) -> Result<Vec<(SessionId, String)>, DbError> {
        self.on_reader_thread("vsm-db-ids", |conn, _| store::live_ids(conn)).await
    }

    /// Live sessions counted per agent and state, without reading the rows out. Counted on
    /// a thread and connection of its own (a scan of every live session: 0.2 s with
    /// 100,000), so commits go on meanwhile; with FULL it answers once what it may have
    /// counted is flushed.
    pub async fn count_sessions(&self) -> Result<Vec<SessionCount>, DbError> {
        self.on_reader_thread("vsm-db-count", |conn, _| store::count_sessions(conn)).await
    }

    pub async fn status(&self) -> Result<DbStatus, DbError> {
        self.read(|o| o.status()).await
    }

    /// Up to `limit` changes with `seq > after`, or `Truncated` when the log no longer
    /// reaches back to `after + 1` (or `after` is beyond the head).
    ///
    /// Read on a thread and connection of its own, not the owner's: a peer catching up
    /// reads batch after batch, and the owner's thread meanwhile seals and sends the batch
    /// before (the HA node runs on its runtime) and goes on committing. Answers once what
    /// it read is on disk.
    pub async fn changes_since(&self, after: Seq, limit: usize) -> Result<LogRead, DbError> {
        self.on_reader_thread("vsm-db-log", move |conn, path| reader::changes_since(conn, path, after, limit)).await
    }

    /// Every record, read in one transaction together with the head.
    /// Holds everything in memory; prefer [`DbHandle::snapshot_stream`] for big databases.
    pub async fn snapshot(&self) -> Result<Snapshot, DbError> {
        let mut stream = self.snapshot_stream(4096).await?;
        let mut records = Vec::with_capacity(usize::try_from(stream.total).unwrap_or(0));
        while let Some(chunk) = stream.next_chunk().await {
            records.extend(chunk?);
        }
        if records.len() as u64 != stream.total {
            return Err(DbError::Closed);
        }
        Ok(Snapshot { head: stream.head, db_id: stream.db_id, records })
    }

    /// Every record in storage order, in chunks of `chunk_records`, read in one transaction on a
    /// reader thread while writes go on. The reader stays at most two chunks ahead.
    pub async fn snapshot_stream(&self, chunk_records: usize) -> Result<SnapshotStream, DbError> {
        let chunk = chunk_records.max(1);
        let (head, db_id, total, chunks) = self
            .start_snapshot_reader(move |path, durable, header, out| reader::stream(path, chunk, durable, header, out))
            .await?;
        Ok(SnapshotStream { head, db_id, total, chunks })
    }

    /// The same snapshot as [`DbHandle::snapshot_stream`], as a SQLite file of the
    /// `sessions` table in pieces of at most `piece_bytes` (see [`SnapshotFile`]): for a peer
    /// whose database is empty, which loads it without decoding a row
    /// ([`DbHandle::queue_snapshot_load`]). The file is written next to the database, mode
    /// 0600, and removed once read.
    pub async fn snapshot_file(&self, piece_bytes: usize) -> Result<SnapshotFile, DbError> {
        let piece = piece_bytes.max(1);
        let (head, db_id, total, pieces) = self
            .start_snapshot_reader(move |path, durable, header, out| {
                reader::stream_file(path, piece, durable, header, out)
            })
            .await?;
        Ok(SnapshotFile { head, db_id, total, pieces })
    }

    /// Starts a snapshot reader thread (`body`, one of `reader`'s) and waits for its header:
    /// head, database id, record count, and what it then sends, at most two items ahead.
    async fn start_snapshot_reader<T: Send + 'static>(
        &self,
        body: impl FnOnce(PathBuf, &flush::Durable, oneshot::Sender<reader::Header>, mpsc::Sender<Result<T, DbError>>)
            + Send
            + 'static,
    ) -> Result<(Seq, String, u64, mpsc::Receiver<Result<T, DbError>>), DbError> {
        if self.tx.is_closed() {
            return Err(DbError::Closed);
        }
        let (header_tx, header_rx) = oneshot::channel();
        let (tx, rx) = mpsc::channel(2);
        let path = self.path.to_path_buf();
        let durable = self.durable.clone();
        std::thread::Builder::new()
            .name("vsm-db-snapshot".into())
            .spawn(move || body(path, &durable, header_tx, tx))
            .map_err(|source| DbError::Io { context: "start a snapshot reader".into(), source })?;
        let (head, db_id, total) = header_rx.await.map_err(|_| DbError::Closed)??;
        Ok((head, db_id, total, rx))
    }

    /// Queues the next bytes of a snapshot file from the peer (`first`: the start of a new
    /// one, which replaces any earlier file not loaded); in `chain`, like
    /// [`DbHandle::queue_apply`]. Nothing of the file counts until
    /// [`DbHandle::queue_snapshot_load`].
    pub async fn queue_snapshot_part(
        &self,
        chain: ApplyChain,
        first: bool,
        data: Vec<u8>,
    ) -> Result<PendingApply, DbError> {
        let (reply, rx) = oneshot::channel();
        let req = owner::WriteReq::SnapshotPart { first, data, chain, reply };
        self.tx.send(owner::Request::Write(req)).await.map_err(|_| DbError::Closed)?;
        Ok(PendingApply(rx))
    }

    /// Queues the load of the snapshot file received (see [`DbHandle::snapshot_file`]) and
    /// the position `pos` in the log `peer_db_id`, in one transaction; in `chain`. Into an
    /// empty database the rows are copied as stored; otherwise they are merged like any
    /// peer records. A file that is not a readable snapshot ([`DbError::InvalidSnapshot`])
    /// changes nothing. The file is removed either way.
    pub async fn queue_snapshot_load(
        &self,
        chain: ApplyChain,
        peer_db_id: String,
        pos: Seq,
    ) -> Result<PendingApply, DbError> {
        let (reply, rx) = oneshot::channel();
        let req = owner::WriteReq::LoadSnapshot { peer: peer_db_id, pos, chain, reply };
        self.tx.send(owner::Request::Write(req)).await.map_err(|_| DbError::Closed)?;
        Ok(PendingApply(rx))
    }

    /// Same records as [`DbHandle::snapshot`].
    pub async fn export_records(&self) -> Result<Vec<Record>, DbError> {
        Ok(self.snapshot().await?.records)
    }

    /// Position reached in the change log of `peer_db_id`; `None` when none was ever stored
    /// (nothing of that log applied, or only part of a snapshot), which is not position 0:
    /// only a stored position says this database holds everything the peer had up to it.
    pub async fn peer_position(&self, peer_db_id: &str) -> Result<Option<Seq>, DbError> {
        let peer = peer_db_id.to_string();
        self.read(move |o| o.peer_position(&peer)).await
    }

    /// The peer database whose change log this node has applied furthest: the best guess of
    /// the current peer's `db_id` after a restart (`None` when nothing was ever applied).
    /// A wrong guess only costs a full snapshot instead of an incremental resync.
    pub async fn last_peer_db_id(&self) -> Result<Option<String>, DbError> {
        self.read(|o| o.last_peer_db_id()).await
    }

    /// Overwrites the position reached in the change log of `peer_db_id`. Use it after
    /// applying a full snapshot: unlike `apply_remote`, it may move the position back.
    pub async fn set_peer_position(&self, peer_db_id: &str, pos: Seq) -> Result<(), DbError> {
        let peer = peer_db_id.to_string();
        self.call(|reply| owner::Request::Write(owner::WriteReq::SetPeer { peer, pos, reply })).await
    }

    /// SHA-256 (hex) over every record in id order: equal on two nodes iff they hold the
    /// same sessions, versions and tombstones. Read on a reader thread.
    pub async fn digest(&self) -> Result<String, DbError> {
        self.on_reader_thread("vsm-db-digest", reader::digest).await
    }

    /// Runs `read` on a new thread named `name`, on a read-only connection of its own, and
    /// answers once what it may have seen is flushed.
    async fn on_reader_thread<T: Send + 'static>(
        &self,
        name: &str,
        read: impl FnOnce(&mut rusqlite::Connection, &Path) -> Result<T, DbError> + Send + 'static,
    ) -> Result<T, DbError> {
        if self.tx.is_closed() {
            return Err(DbError::Closed);
        }
        let (reply, rx) = oneshot::channel();
        let path = self.path.to_path_buf();
        let durable = self.durable.clone();
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let value = schema::open_reader(&path).and_then(|mut conn| read(&mut conn, &path));
                drop(reply.send(value.and_then(|v| durable.settle().map(|()| v))))
            })
            .map_err(|source| DbError::Io { context: format!("start a reader thread ({name})"), source })?;
        rx.await.map_err(|_| DbError::Closed)?
    }

    /// Finishes every request queued so far, checkpoints the WAL into the main file and
    /// stops the owner thread. Other clones get [`DbError::Closed`] afterwards.
    pub async fn close(self) -> Result<(), DbError> {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(owner::Request::Shutdown(reply)).await.is_err() {
            return Ok(());
        }
        rx.await.unwrap_or(Ok(()))
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, DbError>>) -> owner::Request,
    ) -> Result<T, DbError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).await.map_err(|_| DbError::Closed)?;
        rx.await.map_err(|_| DbError::Closed)?
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut owner::Owner) -> Result<T, DbError> + Send + 'static,
    ) -> Result<T, DbError> {
        self.call(|reply| {
            owner::Request::Read(Box::new(move |o: &mut owner::Owner| {
                let _ = reply.send(f(o));
            }))
        })
        .await
    }
}
