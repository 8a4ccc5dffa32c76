//! The owner thread: the only code that holds the SQLite connection.
//!
//! Owns: the connection, the in-memory copies of the clock, head, row counts and the
//! users-per-agent count, the request loop with group commit, and the publication of
//! committed local changes.
//! Must never: answer a write before its transaction committed, hold a transaction open
//! while serving a read, or block on anything but the request queue and SQLite.
//!
//! Invariants:
//! - `head`, `live`, `tombs`, `per_agent` and `user_counts` equal what the database holds
//!   whenever no transaction is open; a failed transaction restores them (`per_agent` and
//!   `user_counts` by a recount).
//! - Reads of one round run after the round's writes committed: a read sees every write
//!   queued before it (and maybe writes queued after it, which were concurrent with it), and
//!   never uncommitted data. Reads do not split a group commit.
//! - Committed local changes are published (in commit order) only after their commit, and
//!   with FULL only once it is on disk (`flush.rs`): replies, changes and head of a commit
//!   go out together, after its flush.
//! - `hlc` is never below any version stored in the database that lay within
//!   `max_clock_offset` of the wall clock when seen, and never more than that ahead of the
//!   wall clock after a write. It persists without a write of its own: every version it
//!   issued or followed is a stored row's version or below one, and `head` is the last
//!   change-log row. Only a transaction that deletes rows (`gc`) writes both to `meta`, in
//!   that transaction; `open` takes the highest of `meta`, the newest stored version (capped
//!   at the bound) and the last change-log row. (A commit that rewrote `meta` cost one more
//!   log page of seven for every write.)

use std::path::PathBuf;
use std::sync::Arc;

use rusqlite::{Connection, OptionalExtension};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use super::checkpoint::Checkpointer;
use super::flush::{Delivery, Durable, FlushFailed, Flusher};
use super::merge::{self, Action, Winner};
use super::store::{self, LiveKeys, Stored};
use super::{
    ApplyOutcome, Committed, Conflict, DbError, DbOptions, DbStatus, GcStats, SessionFilter, SqlContext, Write,
    GROUP_MAX,
};
use crate::model::{now_ms, Change, DbSynchronous, Hlc, NodeId, Record, Seq, Session, SessionId, Version};

type Reply<T> = oneshot::Sender<Result<T, DbError>>;

/// A read: runs on the owner thread with no transaction open, answers through its own reply.
pub(super) type ReadJob = Box<dyn FnOnce(&mut Owner) + Send>;

// Sessions travel by value: boxing them would add an allocation per write.
#[allow(clippy::large_enum_variant)]
pub(super) enum Request {
    Write(WriteReq),
    Read(ReadJob),
    Shutdown(Reply<()>),
}

/// A request that changes the database; these are grouped into one transaction.
pub(super) enum WriteReq {
    One {
        write: Write,
        reply: Reply<Committed>,
    },
    Batch {
        writes: Vec<Write>,
        reply: Reply<Vec<Committed>>,
    },
    Apply {
        peer: String,
        records: Vec<Record>,
        pos: super::PositionUpdate,
        chain: Option<super::ApplyChain>,
        reply: Reply<ApplyOutcome>,
    },
    Gc {
        clock_ms: Option<u64>,
        reply: Reply<GcStats>,
    },
    SetPeer {
        peer: String,
        pos: Seq,
        reply: Reply<()>,
    },
    /// The next bytes of a snapshot the peer sends as a file; `first` starts a new file.
    SnapshotPart {
        first: bool,
        data: Vec<u8>,
        chain: super::ApplyChain,
        reply: Reply<ApplyOutcome>,
    },
    /// The snapshot file received is complete: load it and store `pos` as the position in
    /// the peer's log, in one transaction.
    LoadSnapshot {
        peer: String,
        pos: Seq,
        chain: super::ApplyChain,
        reply: Reply<ApplyOutcome>,
    },
}

/// The result of a write request, held until its transaction commits.
#[allow(clippy::large_enum_variant)]
enum Done {
    One(Committed),
    Batch(Vec<Committed>),
    Apply(ApplyOutcome),
    Gc(GcStats),
    Unit,
}

impl WriteReq {
    /// How many records the request writes (at least one).
    fn records(&self) -> usize {
        match self {
            WriteReq::Batch { writes, .. } => writes.len().max(1),
            WriteReq::Apply { records, .. } => records.len().max(1),
            WriteReq::One { .. }
            | WriteReq::Gc { .. }
            | WriteReq::SetPeer { .. }
            | WriteReq::SnapshotPart { .. }
            | WriteReq::LoadSnapshot { .. } => 1,
        }
    }

    /// The chain of peer applies the request belongs to, if any.
    fn chain(&self) -> Option<super::ApplyChain> {
        match self {
            WriteReq::Apply { chain, .. } => *chain,
            WriteReq::SnapshotPart { chain, .. } | WriteReq::LoadSnapshot { chain, .. } => Some(*chain),
            _ => None,
        }
    }

    fn deliver(self, res: Result<Done, DbError>) {
        // A receiver that went away is not our problem: the write is committed regardless.
        match (self, res) {
            (WriteReq::One { reply, .. }, Ok(Done::One(c))) => drop(reply.send(Ok(c))),
            (WriteReq::Batch { reply, .. }, Ok(Done::Batch(c))) => drop(reply.send(Ok(c))),
            (WriteReq::Apply { reply, .. }, Ok(Done::Apply(o)))
            | (WriteReq::SnapshotPart { reply, .. }, Ok(Done::Apply(o)))
            | (WriteReq::LoadSnapshot { reply, .. }, Ok(Done::Apply(o))) => drop(reply.send(Ok(o))),
            (WriteReq::Gc { reply, .. }, Ok(Done::Gc(g))) => drop(reply.send(Ok(g))),
            (WriteReq::SetPeer { reply, .. }, Ok(Done::Unit)) => drop(reply.send(Ok(()))),
            (req, Err(e)) => req.fail(e),
            // `exec` answers each request in kind; a mismatch would drop the reply, which
            // the caller sees as `Closed` rather than a wrong answer.
            (_, Ok(_)) => debug_assert!(false, "write answered with the wrong kind"),
        }
    }

    fn fail(self, e: DbError) {
        match self {
            WriteReq::One { reply, .. } => drop(reply.send(Err(e))),
            WriteReq::Batch { reply, .. } => drop(reply.send(Err(e))),
            WriteReq::Apply { reply, .. }
            | WriteReq::SnapshotPart { reply, .. }
            | WriteReq::LoadSnapshot { reply, .. } => drop(reply.send(Err(e))),
            WriteReq::Gc { reply, .. } => drop(reply.send(Err(e))),
            WriteReq::SetPeer { reply, .. } => drop(reply.send(Err(e))),
        }
    }
}

/// Committed local changes of one transaction, in seq order.
pub(super) type ChangeBatch = Arc<Vec<Change>>;

/// After this many rounds in a row of at most one record each, a round of one record with
/// nothing queued behind it is flushed by the owner itself (see `flush.rs`): at 16 writers
/// on a 2-core machine a third of the rounds carry one record, but eight in a row almost
/// never come, while a lone writer's rounds are all of one.
const LONE_WRITER_ROUNDS: u32 = 8;

/// Transactions' change batches buffered for a slow subscriber before it is told it lagged.
const CHANGE_BUFFER: usize = 1024;

/// A snapshot chunk this large, arriving in an empty database, is loaded without the
/// secondary indexes (built once after the snapshot): smaller snapshots gain nothing.
const BULK_LOAD_MIN_RECORDS: usize = 256;

/// What the caller of `open` gets back from the thread.
pub(super) struct Opened {
    pub(super) db_id: String,
    pub(super) head: watch::Receiver<Seq>,
    pub(super) changes: broadcast::Sender<ChangeBatch>,
    /// The thread's own runtime (see [`run`]).
    pub(super) runtime: tokio::runtime::Handle,
    pub(super) user_counts: super::AgentUserCounts,
    /// What readers on other connections wait on before their reads leave the process.
    pub(super) durable: Durable,
}

pub(super) type Ready = Result<Opened, DbError>;

/// Thread body: open, report readiness, serve until shut down or every handle is gone.
///
/// The thread runs a single-threaded tokio runtime whose first task is the owner. Tasks that
/// mostly wait on the database (the HA node's engine task and peer link) are spawned onto
/// it ([`super::DbHandle::runtime`]): their calls and the owner's answers then pass within one
/// thread, without waking another one per call. The owner blocks this thread while it
/// commits, as before; those tasks run whenever it waits for requests.
pub(super) fn run(opts: DbOptions, rx: mpsc::Receiver<Request>, ready: std::sync::mpsc::SyncSender<Ready>) {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(source) => {
            let _ = ready.send(Err(DbError::Io { context: "start the database thread's runtime".into(), source }));
            return;
        }
    };
    let owner = match Owner::open(&opts) {
        Ok(o) => o,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let _ = ready.send(Ok(Opened {
        db_id: owner.db_id.clone(),
        head: owner.out.head.subscribe(),
        changes: owner.out.changes.clone(),
        runtime: rt.handle().clone(),
        user_counts: owner.user_counts.clone(),
        durable: owner.flush.as_ref().map(Flusher::durable).unwrap_or_default(),
    }));
    rt.block_on(owner.serve(rx));
    // Tasks still on this runtime (none after an orderly stop: the HA node ends first)
    // are dropped with it.
}

pub(super) struct Owner {
    conn: Connection,
    /// Keeps other processes off the file for as long as this owner lives.
    _lock: nix::fcntl::Flock<std::fs::File>,
    path: PathBuf,
    node: NodeId,
    db_id: String,
    hlc: Hlc,
    head: Seq,
    live: u64,
    tombs: u64,
    changelog_retention: u64,
    tombstone_retention_ms: u64,
    max_clock_offset_ms: u64,
    /// When a clock reading beyond the bound was last logged (at most one warning a minute).
    clock_warned: Option<std::time::Instant>,
    /// The number of the group commit under way (with FULL), under which writes note the
    /// users whose records they change (see [`Flusher::touch`]).
    ticket: Option<u64>,
    /// The last chain of applies one of which failed: the rest of it is refused.
    broken_chain: Option<super::ApplyChain>,
    /// A snapshot is loading into what was an empty database: the secondary indexes are
    /// dropped until the first request that is not a snapshot chunk.
    bulk_load: bool,
    /// No row of `sessions` has an id above this one (`None`: the table holds no row). It
    /// is the greatest id at open, raised by every row stored since, so a write of an id
    /// above it is known to be new without looking it up: as most creates are, since a
    /// session id begins with its creation time (`SessionId::generate`).
    greatest: Option<SessionId>,
    /// The snapshot file the peer is sending, open for appending, and its length so far.
    snapshot_in: Option<(std::fs::File, u64)>,
    /// The received snapshot file is attached as `snap` (for the round that loads it).
    snapshot_attached: Result<(), String>,
    /// Where committed heads and changes go out.
    out: Arc<Outlets>,
    /// Changes of the open transaction, kept only while someone subscribes.
    pending_changes: Vec<Change>,
    /// What the transactions of the current round publish once it is delivered.
    unpublished: Published,
    /// Agent → user → live sessions; answers placement without scanning the table.
    per_agent: store::UsersPerAgent,
    /// Distinct users per agent from `per_agent`, shared with every handle.
    user_counts: super::AgentUserCounts,
    /// Keeps the write-ahead log short (see `checkpoint.rs`).
    checkpoints: Checkpointer,
    /// With FULL: makes each group commit durable before it is delivered (see `flush.rs`).
    flush: Option<Flusher>,
    /// Rounds in a row that wrote at most one record.
    single_rounds: u32,
}

/// The owner's outlets for committed state, shared with the flush thread, which delivers.
struct Outlets {
    head: watch::Sender<Seq>,
    /// Committed local changes, one message per transaction that wrote any.
    changes: broadcast::Sender<ChangeBatch>,
}

/// What one round's transactions publish once they are durable.
#[derive(Default)]
struct Published {
    head: Option<Seq>,
    changes: Vec<ChangeBatch>,
}

/// One round's answers and publications, let out together (see `flush.rs`).
struct Round {
    out: Arc<Outlets>,
    published: Published,
    answers: Vec<(WriteReq, Result<Done, DbError>)>,
}

impl Round {
    fn release(self, flushed: Result<(), &FlushFailed>) {
        match flushed {
            Ok(()) => {
                if let Some(head) = self.published.head {
                    self.out.head.send_replace(head);
                }
                for batch in self.published.changes {
                    // No subscriber is fine: nobody waits for these.
                    let _ = self.out.changes.send(batch);
                }
                for (w, res) in self.answers {
                    w.deliver(res);
                }
            }
            // Not durable: nothing of it goes out, and nobody is told it was done.
            Err(f) => {
                for (w, _) in self.answers {
                    w.fail(f.error());
                }
            }
        }
    }
}

/// The in-memory state a failed transaction must put back.
struct Saved {
    head: Seq,
    live: u64,
    tombs: u64,
    bulk_load: bool,
    greatest: Option<SessionId>,
}

impl Owner {
    fn open(opts: &DbOptions) -> Result<Owner, DbError> {
        let super::schema::Opened { conn, lock } =
            super::schema::open(&opts.path, opts.synchronous).map_err(|e| e.or_disk_full(&opts.path))?;
        let store::Meta { db_id, head, hlc: stored } = store::read_meta(&conn)?;
        // `meta` holds the clock only as of the last transaction that deleted rows; since
        // then it lives in the rows themselves (see the module docs).
        let store::TableStats { live, tombs, greatest, newest, per_agent } = store::table_stats(&conn)?;
        let user_counts = super::AgentUserCounts::default();
        user_counts.reset(&per_agent);
        let max_ahead = u64::try_from(opts.max_clock_offset.as_millis()).unwrap_or(u64::MAX);
        // A row's version is followed only up to the clock bound, as when it was written.
        let hlc = newest.map_or(stored, |row| stored.max(row.capped(now_ms(), max_ahead)));
        if let Some(ahead) = newest.map_or(stored, |row| stored.max(row)).beyond(now_ms(), max_ahead) {
            tracing::warn!(
                ahead_ms = ahead,
                max_clock_offset_ms = max_ahead,
                "the stored clock or the newest stored version is ahead of this machine's wall clock by more \
                 than /HA/max_clock_offset (the wall clock was set back?); new versions are stamped at most \
                 the bound ahead"
            );
        }
        tracing::info!(
            path = %opts.path.display(), db_id = %db_id, seq = head.0, sessions = live,
            tombstones = tombs, "session database open"
        );
        super::schema::remove_stale_snapshot_files(&opts.path);
        let checkpoints = Checkpointer::spawn(&opts.path);
        let flush = match opts.synchronous {
            // The log exists: the reads above opened it.
            DbSynchronous::Full => {
                let flusher = Flusher::start(&opts.path)?;
                // Commits are flushed by `flush.rs` from now on; SQLite still flushes the log
                // before each checkpoint and after each restart of the log.
                conn.pragma_update(None, "synchronous", "NORMAL").ctx("set synchronous")?;
                Some(flusher)
            }
            DbSynchronous::Normal => None,
        };
        Ok(Owner {
            conn,
            _lock: lock,
            path: opts.path.clone(),
            node: opts.node.clone(),
            db_id,
            hlc,
            head,
            live,
            tombs,
            changelog_retention: opts.changelog_retention,
            tombstone_retention_ms: u64::try_from(opts.tombstone_retention.as_millis()).unwrap_or(u64::MAX),
            max_clock_offset_ms: u64::try_from(opts.max_clock_offset.as_millis()).unwrap_or(u64::MAX),
            clock_warned: None,
            broken_chain: None,
            ticket: None,
            bulk_load: false,
            greatest,
            snapshot_in: None,
            snapshot_attached: Err("no snapshot file was received".into()),
            out: Arc::new(Outlets { head: watch::channel(head).0, changes: broadcast::channel(CHANGE_BUFFER).0 }),
            pending_changes: Vec::new(),
            unpublished: Published::default(),
            per_agent,
            user_counts,
            checkpoints,
            flush,
            single_rounds: 0,
        })
    }

    async fn serve(mut self, mut rx: mpsc::Receiver<Request>) {
        let mut batch: Vec<Request> = Vec::with_capacity(GROUP_MAX);
        let mut writes: Vec<WriteReq> = Vec::with_capacity(GROUP_MAX);
        let mut reads: Vec<ReadJob> = Vec::new();
        let mut shutdowns: Vec<Reply<()>> = Vec::new();
        while let Some(first) = rx.recv().await {
            batch.push(first);
            while batch.len() < GROUP_MAX {
                match rx.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            for req in batch.drain(..) {
                match req {
                    // A part of a snapshot file is stored at once: it is neither a
                    // transaction nor anything that must be on disk (the load that follows
                    // is both). Only after a load queued before it in this round would it
                    // overwrite that load's file: then it waits its turn.
                    Request::Write(w @ WriteReq::SnapshotPart { .. })
                        if !writes.iter().any(|w| matches!(w, WriteReq::LoadSnapshot { .. })) =>
                    {
                        let res = self.exec(&w);
                        if res.is_err() {
                            self.note_failure(&w);
                        }
                        w.deliver(res);
                    }
                    Request::Write(w) => writes.push(w),
                    // After the group commit below: a read sees every write queued before it,
                    // and reads no longer split the group into one transaction each.
                    Request::Read(job) => reads.push(job),
                    Request::Shutdown(reply) => {
                        // Refuse new requests; those already queued are still served.
                        rx.close();
                        shutdowns.push(reply);
                    }
                }
            }
            // A lone writer: a flush inline costs no one anything and saves two thread
            // hand-overs (see `flush.rs`). Under load, rounds of one record come too (writers
            // answered one at a time come back one at a time), but between rounds of several.
            let records: usize = writes.iter().map(WriteReq::records).sum();
            self.single_rounds = if records <= 1 { self.single_rounds.saturating_add(1) } else { 0 };
            let alone = rx.is_empty() && self.single_rounds > LONE_WRITER_ROUNDS;
            // A snapshot file is loaded in a transaction of its own, after the writes queued
            // before it (its last parts among them), and attached outside any transaction, as
            // SQLite requires.
            while let Some(i) = writes.iter().position(|w| matches!(w, WriteReq::LoadSnapshot { .. })) {
                let mut before: Vec<WriteReq> = writes.drain(..i).collect();
                self.commit_group(&mut before, false);
                let mut load = vec![writes.remove(0)];
                self.attach_snapshot();
                self.commit_group(&mut load, false);
                self.detach_snapshot();
            }
            self.commit_group(&mut writes, alone);
            if !reads.is_empty() {
                if let Some(f) = &self.flush {
                    // A read must not let out a commit that is not on disk yet. A failed
                    // flush fails every write from now on; reads still answer.
                    let _ = f.durable().settle();
                }
            }
            for job in reads.drain(..) {
                job(&mut self);
            }
            self.checkpoints.between_rounds(&self.conn);
            // Let the tasks sharing this thread run before the next round (the HA node
            // sends what just committed to the peer while the next group gathers) even when
            // requests keep the queue full. With the queue empty, waiting for the next
            // request lets them run anyway.
            if !rx.is_empty() {
                tokio::task::yield_now().await;
            }
        }
        let res = self.finish();
        if let Err(e) = &res {
            tracing::error!(error = %e, "closing the session database failed");
        }
        for reply in shutdowns {
            let _ = reply.send(res.as_ref().map(|_| ()).map_err(|_| DbError::Closed));
        }
    }

    fn finish(mut self) -> Result<(), DbError> {
        // Everything committed goes out before the database closes.
        if let Some(f) = &mut self.flush {
            f.stop();
        }
        // A snapshot cut off by the stop: the indexes are built now (or at the next open).
        if self.bulk_load {
            if let Err(e) = self.transact(Owner::end_bulk_load) {
                tracing::warn!(error = %e, "cannot build the session indexes at close; the next start builds them");
            }
        }
        // Stop the checkpointer first: two checkpoints at once would make ours fail busy.
        self.checkpoints.stop();
        // A snapshot reader still running keeps part of the log; the checkpoint then
        // reports "busy" in its result row, which is fine: the next open replays it.
        self.conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())).ctx("checkpoint the write-ahead log")?;
        self.conn.close().map_err(|(_, e)| DbError::sqlite("close the database", e))?;
        tracing::info!("session database closed");
        Ok(())
    }

    // ---- transactions ------------------------------------------------------------------

    fn saved(&self) -> Saved {
        Saved {
            head: self.head,
            live: self.live,
            tombs: self.tombs,
            bulk_load: self.bulk_load,
            greatest: self.greatest.clone(),
        }
    }

    fn restore(&mut self, s: Saved) {
        self.head = s.head;
        self.live = s.live;
        self.tombs = s.tombs;
        self.bulk_load = s.bulk_load;
        self.greatest = s.greatest;
    }

    /// Runs `f` in one IMMEDIATE transaction that also persists the clock and head.
    /// On error everything is rolled back, in the database and in memory.
    fn transact<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T, DbError>) -> Result<T, DbError> {
        let saved = self.saved();
        let res = (|| {
            self.conn.prepare_cached("BEGIN IMMEDIATE").and_then(|mut s| s.execute([])).ctx("begin a transaction")?;
            let out = f(self)?;
            self.conn.prepare_cached("COMMIT").and_then(|mut s| s.execute([])).ctx("commit")?;
            Ok(out)
        })();
        if res.is_err() {
            // Fails harmlessly when SQLite already rolled back on its own.
            let _ = self.conn.execute_batch("ROLLBACK");
            self.restore(saved);
            self.pending_changes.clear();
            match store::users_per_agent(&self.conn) {
                Ok(m) => {
                    self.user_counts.reset(&m);
                    self.per_agent = m;
                }
                Err(e) => tracing::error!(error = %e, "cannot recount users per agent after a rollback"),
            }
        } else {
            if self.head != saved.head {
                self.unpublished.head = Some(self.head);
            }
            if !self.pending_changes.is_empty() {
                self.unpublished.changes.push(Arc::new(std::mem::take(&mut self.pending_changes)));
            }
            self.checkpoints.committed();
        }
        res
    }

    /// Commits the queued writes in one transaction and answers them; if that fails,
    /// redoes them one transaction each so only the failing request sees an error.
    /// With FULL the answers (and the changes published) wait for the flush of the log;
    /// `alone` says no other request waits, so the owner may flush itself.
    fn commit_group(&mut self, writes: &mut Vec<WriteReq>, alone: bool) {
        if writes.is_empty() {
            return;
        }
        if let Some(failed) = self.flush.as_ref().and_then(Flusher::failed) {
            for w in writes.drain(..) {
                w.fail(failed.error());
            }
            return;
        }
        let ticket = self.flush.as_ref().map(Flusher::begin);
        self.ticket = ticket;
        let mut answers = Vec::with_capacity(writes.len());
        let res = self.transact(|o| writes.iter().map(|w| o.exec(w)).collect::<Result<Vec<_>, _>>());
        match res {
            Ok(done) => answers.extend(writes.drain(..).zip(done.into_iter().map(Ok))),
            Err(e) if writes.len() == 1 => {
                if let Some(w) = writes.pop() {
                    self.note_failure(&w);
                    answers.push((w, Err(e)));
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, requests = writes.len(), "group commit failed; retrying one by one");
                for w in writes.drain(..) {
                    let res = self.transact(|o| o.exec(&w));
                    if res.is_err() {
                        self.note_failure(&w);
                    }
                    answers.push((w, res));
                }
            }
        }
        self.ticket = None;
        let round = Round { out: Arc::clone(&self.out), published: std::mem::take(&mut self.unpublished), answers };
        match (&self.flush, ticket) {
            (Some(f), Some(n)) => {
                let delivery: Delivery = Box::new(move |flushed| round.release(flushed));
                f.committed(n, delivery, alone);
            }
            _ => round.release(Ok(())),
        }
    }

    /// A request failed for good (nothing of it stored): an apply's chain is broken from here
    /// on, so no later apply of it stores records or a position past the ones lost.
    fn note_failure(&mut self, w: &WriteReq) {
        if let Some(c) = w.chain() {
            self.broken_chain = Some(c);
        }
    }

    fn exec(&mut self, w: &WriteReq) -> Result<Done, DbError> {
        if let Some(c) = w.chain() {
            if self.broken_chain == Some(c) {
                return Err(DbError::ApplyChainBroken);
            }
        }
        if self.bulk_load
            && !matches!(w, WriteReq::Apply { pos: super::PositionUpdate::Keep, .. } | WriteReq::SnapshotPart { .. })
        {
            self.end_bulk_load()?;
        }
        match w {
            WriteReq::One { write, .. } => self.local_write(write).map(Done::One),
            WriteReq::Batch { writes, .. } => {
                writes.iter().map(|w| self.local_write(w)).collect::<Result<_, _>>().map(Done::Batch)
            }
            WriteReq::Apply { peer, records, pos, .. } => self.apply(peer, records, *pos).map(Done::Apply),
            WriteReq::Gc { clock_ms, .. } => self.gc(*clock_ms).map(Done::Gc),
            WriteReq::SetPeer { peer, pos, .. } => self.set_peer(peer, *pos, false).map(|()| Done::Unit),
            WriteReq::SnapshotPart { first, data, .. } => self.snapshot_part(*first, data).map(Done::Apply),
            WriteReq::LoadSnapshot { peer, pos, .. } => self.load_snapshot(peer, *pos).map(Done::Apply),
        }
    }

    /// Counts a stored write (live and tombstone totals, users per agent) and notes its
    /// users for readers of one user's sessions.
    fn count(&mut self, before: Option<&Stored>, after: Option<&Session>) {
        if let (Some(f), Some(n)) = (&self.flush, self.ticket) {
            let was = before.and_then(|s| s.live.as_ref()).map(|k| k.user.as_str());
            f.touch(n, was.into_iter().chain(after.map(|s| s.user.as_str())));
        }
        match before {
            Some(s) if s.tombstone => self.tombs = self.tombs.saturating_sub(1),
            Some(_) => self.live = self.live.saturating_sub(1),
            None => {}
        }
        if let Some(LiveKeys { agent, user, .. }) = before.and_then(|s| s.live.as_ref()) {
            if let Some(users) = self.per_agent.get_mut(agent) {
                if let Some(n) = users.get_mut(user) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        users.remove(user);
                        self.user_counts.set(agent, users.len());
                    }
                }
                if users.is_empty() {
                    self.per_agent.remove(agent);
                }
            }
        }
        match after {
            None => self.tombs += 1,
            Some(s) => {
                self.live += 1;
                let users = match self.per_agent.get_mut(&s.agent) {
                    Some(u) => u,
                    None => self.per_agent.entry(s.agent.clone()).or_default(),
                };
                match users.get_mut(&s.user) {
                    Some(n) => *n += 1,
                    None => {
                        users.insert(s.user.clone(), 1);
                        self.user_counts.set(&s.agent, users.len());
                    }
                }
            }
        }
    }

    // ---- writes (inside a transaction) -------------------------------------------------

    fn local_write(&mut self, w: &Write) -> Result<Committed, DbError> {
        let id = w.id();
        let known_new = self.is_new(id);
        let prior = if known_new { None } else { store::stored(&self.conn, id)? };
        // An ended session stays ended: a live write over its tombstone would bring it back
        // (and the peer, holding the same tombstone, would treat it as an ordinary update).
        if matches!(w, Write::Upsert(_)) && prior.as_ref().is_some_and(|p| p.tombstone) {
            return Err(DbError::Ended(id.clone()));
        }
        // The write must exceed the version it replaces, whatever the clock bound says; the
        // rest of the clock is followed only up to the bound (see the module docs).
        let now = now_ms();
        if let Some(ahead) = self.hlc.beyond(now, self.max_clock_offset_ms) {
            self.warn_clock(ahead, "this node's clock reading (its wall clock was set back?)");
        }
        let max = self.max_clock_offset_ms;
        let own = self.hlc.capped(now, max);
        let hlc = own.tick_bounded(prior.as_ref().map(|p| p.version.hlc), now, max);
        // Passing a future version of this one record does not move the clock past the bound.
        self.hlc = own.max(hlc.capped(now, max));
        let version = Version { hlc, node: self.node.clone() };
        let session = match w {
            Write::Upsert(s) => Some(s.clone()),
            Write::Delete(_) => None,
        };
        let base = prior.as_ref().map(|p| p.version.clone());
        let record = Record { id: id.clone(), version: version.clone(), base, session };
        if known_new {
            // An insert, which would fail rather than overwrite were the id not new.
            store::insert_new(&self.conn, &[&record])?;
        } else {
            store::put(&self.conn, &record, prior.as_ref())?;
        }
        self.note_stored(id);
        let seq = self.head.next();
        store::append_change(&self.conn, seq, &record)?;
        self.head = seq;
        self.checkpoints.wrote_row();
        self.count(prior.as_ref(), record.session.as_ref());
        if self.out.changes.receiver_count() > 0 {
            self.pending_changes.push(Change { seq, record: record.clone() });
        }
        let was_live = matches!(prior, Some(Stored { tombstone: false, .. }));
        Ok(Committed { seq, version, record, was_live })
    }

    /// Drops the scattered secondary indexes when a snapshot starts loading into an empty
    /// database (see [`super::schema::SECONDARY_INDEXES`]); in the current transaction.
    fn begin_bulk_load(&mut self) -> Result<(), DbError> {
        super::schema::drop_indexes_for_a_load(&self.conn).ctx("drop the session indexes for a snapshot load")?;
        self.bulk_load = true;
        tracing::debug!("loading a snapshot into an empty database: indexes dropped until its end");
        Ok(())
    }

    /// Builds the secondary indexes again after a snapshot load; in the current transaction.
    fn end_bulk_load(&mut self) -> Result<(), DbError> {
        let started = std::time::Instant::now();
        super::schema::create_secondary_indexes(&self.conn).ctx("build the session indexes after a snapshot load")?;
        self.bulk_load = false;
        tracing::debug!(sessions = self.live, ms = started.elapsed().as_millis() as u64, "session indexes built");
        Ok(())
    }

    fn apply(&mut self, peer: &str, records: &[Record], pos: super::PositionUpdate) -> Result<ApplyOutcome, DbError> {
        if pos == super::PositionUpdate::Keep
            && !self.bulk_load
            && self.live == 0
            && self.tombs == 0
            && records.len() >= BULK_LOAD_MIN_RECORDS
        {
            self.begin_bulk_load()?;
        }
        let mut out = ApplyOutcome::default();
        let mut newest: Option<Hlc> = None;
        for rec in records {
            validate(rec)?;
            if newest.map_or(true, |h| rec.version.hlc > h) {
                newest = Some(rec.version.hlc);
            }
        }
        // Visiting ids in order keeps index lookups and inserts local (a batch from the
        // peer mixes ids of both masters, and of sessions both new and old).
        // The merge does not depend on order; the stable sort keeps duplicates in turn.
        let mut order: Vec<&Record> = records.iter().collect();
        order.sort_by(|a, b| a.id.cmp(&b.id));
        let mut rest = order.as_slice();
        while let Some((&rec, tail)) = rest.split_first() {
            let new = self.new_ids(rest);
            if new > 0 {
                self.insert_new(&rest[..new])?;
                out.applied += new;
                rest = &rest[new..];
                continue;
            }
            rest = tail;
            let prior = store::stored(&self.conn, &rec.id)?;
            let action = merge::decide(prior.as_ref().map(|p| &p.version), &rec.version);
            // Only versions from another node can be concurrent; load the body just then.
            let concurrent =
                prior.as_ref().is_some_and(|p| p.version != rec.version && p.version.node != rec.version.node);
            let mut reassert = false;
            if concurrent {
                if let Some(local) = store::load(&self.conn, &self.path, &rec.id)? {
                    if merge::is_conflict(&local, rec) {
                        let winner = if action == Action::Store { Winner::Remote } else { Winner::Local };
                        debug_assert_eq!(Some(winner), merge::winner(&local, rec));
                        out.conflicts.push(Conflict { local: local.clone(), remote: rec.clone(), winner });
                    }
                    reassert = merge::reasserts_delete(&local, rec);
                }
            }
            match action {
                Action::Store => {
                    store::put(&self.conn, rec, prior.as_ref())?;
                    self.checkpoints.wrote_row();
                    self.count(prior.as_ref(), rec.session.as_ref());
                    self.note_stored(&rec.id);
                    out.applied += 1;
                }
                Action::Skip => out.skipped += 1,
            }
            if reassert {
                // The session ended on one node while the other changed it: the end holds.
                // A new local delete, above both versions, streamed to the peer like any.
                let c = self.local_write(&Write::Delete(rec.id.clone()))?;
                out.deletes_kept.push(c.record);
            }
        }
        self.observe_peer(newest);
        match pos {
            super::PositionUpdate::Keep => {}
            super::PositionUpdate::Advance(p) => self.set_peer(peer, p, true)?,
            super::PositionUpdate::Set(p) => self.set_peer(peer, p, false)?,
        }
        Ok(out)
    }

    /// Follows the newest version of records from the peer, up to the clock bound.
    fn observe_peer(&mut self, newest: Option<Hlc>) {
        if let Some(h) = newest {
            let now = now_ms();
            if let Some(ahead) = h.beyond(now, self.max_clock_offset_ms) {
                self.warn_clock(ahead, "a record from the peer (stored as sent)");
            }
            self.hlc = self.hlc.observe_bounded(h, now, self.max_clock_offset_ms);
        }
    }

    // ---- a snapshot received as a file -------------------------------------------------

    /// Appends the next bytes of a snapshot file from the peer (`first`: a new file). The
    /// file is private to this process and read once, so it is never flushed.
    fn snapshot_part(&mut self, first: bool, data: &[u8]) -> Result<ApplyOutcome, DbError> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt;
        let path = super::schema::snapshot_in_path(&self.path);
        let io = |what: &str, source: std::io::Error| {
            if source.raw_os_error() == Some(nix::libc::ENOSPC) {
                DbError::DiskFull { context: format!("{what} {}", path.display()) }
            } else {
                DbError::Io { context: format!("{what} {}", path.display()), source }
            }
        };
        if first {
            self.snapshot_in = None;
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&path)
                .map_err(|e| io("create the snapshot file", e))?;
            self.snapshot_in = Some((file, 0));
        }
        let Some((file, len)) = &mut self.snapshot_in else {
            return Err(DbError::InvalidSnapshot { detail: "a part of a snapshot file came without its start".into() });
        };
        file.write_all(data).map_err(|e| io("write the snapshot file", e))?;
        *len += data.len() as u64;
        Ok(ApplyOutcome::default())
    }

    /// Attaches the snapshot file received as `snap` for this round's load (outside any
    /// transaction, as SQLite requires); a failure is kept for the load to report.
    fn attach_snapshot(&mut self) {
        self.snapshot_attached = match self.snapshot_in.take() {
            None => Err("no snapshot file was received".into()),
            Some((file, len)) => {
                drop(file);
                let path = super::schema::snapshot_in_path(&self.path);
                tracing::debug!(bytes = len, "loading a snapshot file from the peer");
                // The file comes from elsewhere: SQLite checks each page it loads, and runs no
                // function a schema in it might name.
                self.conn
                    .execute_batch("PRAGMA cell_size_check = ON; PRAGMA trusted_schema = OFF;")
                    .and_then(|()| self.conn.execute("ATTACH ?1 AS snap", [path.to_string_lossy()]))
                    .map(drop)
                    .map_err(|e| format!("cannot open the file received ({e})"))
            }
        };
    }

    /// Detaches and removes the snapshot file after the round that loaded it.
    fn detach_snapshot(&mut self) {
        if self.snapshot_attached.is_ok() {
            if let Err(e) = self.conn.execute_batch("DETACH snap") {
                tracing::warn!(error = %e, "cannot close the snapshot file received");
            }
        }
        if let Err(e) = self.conn.execute_batch("PRAGMA cell_size_check = OFF; PRAGMA trusted_schema = ON;") {
            tracing::warn!(error = %e, "cannot restore the connection's settings after a snapshot load");
        }
        self.snapshot_attached = Err("no snapshot file was received".into());
        let _ = std::fs::remove_file(super::schema::snapshot_in_path(&self.path));
    }

    /// Loads the snapshot file attached as `snap` and stores `pos` as the position in the
    /// peer's log. Into a database that holds no session its rows and index entries are
    /// copied as they are (SQLite's transfer of rows between tables of one definition);
    /// otherwise each record is merged like any other from the peer. Either way the file is
    /// checked: the same columns as ours, SQLite's structural check, and every row one this
    /// build can read (`reader::check_snapshot_file`); a file that fails changes nothing.
    fn load_snapshot(&mut self, peer: &str, pos: Seq) -> Result<ApplyOutcome, DbError> {
        let invalid = |detail: String| DbError::InvalidSnapshot { detail };
        if let Err(why) = &self.snapshot_attached {
            return Err(invalid(why.clone()));
        }
        let kind: Option<String> = self
            .conn
            .query_row("SELECT type FROM snap.sqlite_schema WHERE name = 'sessions'", [], |r| r.get(0))
            .optional()
            .map_err(|e| invalid(format!("its schema cannot be read ({e})")))?;
        if kind.as_deref() != Some("table") {
            return Err(invalid(format!("it holds no sessions table (found {kind:?})")));
        }
        let theirs = super::schema::sessions_columns(&self.conn, "snap")
            .map_err(|e| invalid(format!("it holds no readable sessions table ({e})")))?;
        if theirs != super::schema::sessions_columns(&self.conn, "main")? {
            return Err(invalid(format!("its sessions table has other columns than ours: {}", theirs.join(", "))));
        }
        // The file is checked on a thread and connection of its own while its rows are
        // copied (or merged); this transaction commits only if both went well.
        let file = super::schema::snapshot_in_path(&self.path);
        let check = std::thread::Builder::new()
            .name("vsm-db-check".into())
            .spawn(move || super::reader::check_snapshot_file(&file))
            .map_err(|source| DbError::Io { context: "start the check of a snapshot file".into(), source })?;
        let out = if self.live == 0 && self.tombs == 0 { self.copy_snapshot() } else { self.merge_snapshot(peer) };
        let verdict = check.join().unwrap_or_else(|_| Err("its check stopped unexpectedly".into()));
        verdict.map_err(invalid)?;
        let out = out?;
        self.set_peer(peer, pos, false)?;
        Ok(out)
    }

    /// Copies every row of `snap` into the empty `sessions` table and counts them.
    fn copy_snapshot(&mut self) -> Result<ApplyOutcome, DbError> {
        let n = self
            .conn
            .execute("INSERT INTO main.sessions SELECT * FROM snap.sessions", [])
            .ctx("copy the sessions of a snapshot file")?;
        let store::TableStats { live, tombs, greatest, newest, per_agent } = store::table_stats(&self.conn)?;
        (self.live, self.tombs, self.greatest) = (live, tombs, greatest);
        self.user_counts.reset(&per_agent);
        if let (Some(f), Some(t)) = (&self.flush, self.ticket) {
            f.touch(t, per_agent.values().flat_map(|users| users.keys().map(String::as_str)));
        }
        self.per_agent = per_agent;
        self.checkpoints.wrote_rows(n);
        self.observe_peer(newest);
        Ok(ApplyOutcome { applied: n, ..ApplyOutcome::default() })
    }

    /// Merges the records of `snap` into a database that holds sessions, a batch at a time.
    fn merge_snapshot(&mut self, peer: &str) -> Result<ApplyOutcome, DbError> {
        const BATCH: i64 = 2048;
        let mut out = ApplyOutcome::default();
        let mut after = i64::MIN;
        loop {
            let mut stmt = self
                .conn
                .prepare_cached(&format!(
                    "SELECT {}, rowid FROM snap.sessions WHERE rowid > ?1 ORDER BY rowid LIMIT ?2",
                    store::COLUMNS
                ))
                .ctx("prepare a snapshot file read")?;
            let rows = stmt
                .query_map([after, BATCH], |r| Ok((store::raw_from_row(r)?, r.get::<_, i64>(22)?)))
                .ctx("read a snapshot file")?;
            let mut records = Vec::new();
            for row in rows {
                let (raw, rowid) = row.ctx("read a snapshot file")?;
                after = rowid;
                let rec =
                    raw.into_record(&self.path).map_err(|e| DbError::InvalidSnapshot { detail: e.to_string() })?;
                records.push(rec);
            }
            drop(stmt);
            if records.is_empty() {
                return Ok(out);
            }
            let o = self.apply(peer, &records, super::PositionUpdate::Keep)?;
            out.applied += o.applied;
            out.skipped += o.skipped;
            out.conflicts.extend(o.conflicts);
            out.deletes_kept.extend(o.deletes_kept);
        }
    }

    /// Whether `id` is known to have no row (see [`Owner::greatest`]).
    fn is_new(&self, id: &SessionId) -> bool {
        self.greatest.as_ref().map_or(true, |g| id > g)
    }

    /// How many of `sorted` (ids in order) from its start are known to have no row: ids
    /// above every id stored (see [`Owner::greatest`]), each above the one before.
    fn new_ids(&self, sorted: &[&Record]) -> usize {
        let mut above = self.greatest.as_ref();
        sorted
            .iter()
            .take_while(|r| {
                let new = above.map_or(true, |g| r.id > *g);
                above = Some(&r.id);
                new
            })
            .count()
    }

    /// Stores records whose ids have no row (see [`Owner::new_ids`]), without looking each
    /// up first.
    fn insert_new(&mut self, recs: &[&Record]) -> Result<(), DbError> {
        store::insert_new(&self.conn, recs)?;
        for rec in recs {
            self.checkpoints.wrote_row();
            self.count(None, rec.session.as_ref());
        }
        if let Some(last) = recs.last() {
            self.note_stored(&last.id);
        }
        Ok(())
    }

    /// Keeps [`Owner::greatest`] above a row just stored.
    fn note_stored(&mut self, id: &SessionId) {
        if self.is_new(id) {
            self.greatest = Some(id.clone());
        }
    }

    fn set_peer(&mut self, peer: &str, pos: Seq, forward_only: bool) -> Result<(), DbError> {
        let sql = if forward_only {
            "INSERT INTO peer_positions (peer_db_id, seq) VALUES (?1, ?2)
             ON CONFLICT(peer_db_id) DO UPDATE SET seq = max(seq, excluded.seq)"
        } else {
            "INSERT INTO peer_positions (peer_db_id, seq) VALUES (?1, ?2)
             ON CONFLICT(peer_db_id) DO UPDATE SET seq = excluded.seq"
        };
        let mut stmt = self.conn.prepare_cached(sql).ctx("prepare a peer position update")?;
        stmt.execute(rusqlite::params![peer, pos.0 as i64]).ctx("store a peer position")?;
        Ok(())
    }

    /// Logs a clock reading beyond the bound, at most once a minute.
    fn warn_clock(&mut self, ahead_ms: u64, what: &str) {
        let now = std::time::Instant::now();
        if self.clock_warned.is_some_and(|t| now.duration_since(t) < std::time::Duration::from_secs(60)) {
            return;
        }
        self.clock_warned = Some(now);
        tracing::warn!(
            ahead_ms,
            max_clock_offset_ms = self.max_clock_offset_ms,
            "{what} is ahead of this machine's wall clock by more than /HA/max_clock_offset; \
             the hybrid clock follows it only up to the bound: check NTP on both masters"
        );
    }

    fn gc(&mut self, clock_ms: Option<u64>) -> Result<GcStats, DbError> {
        let tombstones = match clock_ms {
            Some(clock_ms) => {
                let cutoff = clock_ms.saturating_sub(self.tombstone_retention_ms);
                self.conn
                    .execute(
                        "DELETE FROM sessions WHERE tombstone = 1 AND tombstone_at_ms < ?1",
                        [i64::try_from(cutoff).unwrap_or(i64::MAX)],
                    )
                    .ctx("forget old tombstones")?
            }
            None => 0,
        };
        self.tombs = self.tombs.saturating_sub(tombstones as u64);
        let (mut changes, mut more) = (0, false);
        if let Some(keep_after) = self.head.0.checked_sub(self.changelog_retention).filter(|k| *k > 0) {
            // An empty log reads as `head + 1`, past anything due.
            let oldest = self.oldest()?.0;
            if oldest <= keep_after {
                let upto = keep_after.min(oldest + super::GC_CHANGES_PER_CALL - 1);
                more = upto < keep_after;
                changes = self
                    .conn
                    .execute("DELETE FROM changelog WHERE seq <= ?1", [upto as i64])
                    .ctx("trim the change log")?;
            }
        }
        if tombstones > 0 || changes > 0 {
            // The rows gone may have held the newest version or the head: keep both.
            store::save_meta(&self.conn, self.hlc, self.head)?;
            tracing::debug!(tombstones, changes, more, "session database gc");
        }
        Ok(GcStats { tombstones, changes, more })
    }

    // ---- reads (no transaction open unless stated) -------------------------------------

    pub(super) fn get(&mut self, id: &SessionId) -> Result<Option<Session>, DbError> {
        Ok(self.record(id)?.and_then(|r| r.session))
    }

    pub(super) fn record(&mut self, id: &SessionId) -> Result<Option<Record>, DbError> {
        store::load(&self.conn, &self.path, id)
    }

    pub(super) fn list(&mut self, f: &SessionFilter) -> Result<Vec<Session>, DbError> {
        store::list(&self.conn, &self.path, f)
    }

    /// The same figure computed by SQL, to check the in-memory count against.
    #[cfg(test)]
    pub(super) fn count_users_per_agent_sql(&mut self) -> Result<std::collections::BTreeMap<String, usize>, DbError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT agent, count(DISTINCT user) FROM sessions WHERE tombstone = 0 GROUP BY agent")
            .ctx("prepare the users-per-agent count")?;
        let rows =
            stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))).ctx("count users per agent")?;
        let mut out = std::collections::BTreeMap::new();
        for row in rows {
            let (agent, n) = row.ctx("count users per agent")?;
            out.insert(agent, n as usize);
        }
        Ok(out)
    }

    fn oldest(&self) -> Result<Seq, DbError> {
        store::oldest_change(&self.conn, self.head)
    }

    pub(super) fn status(&mut self) -> Result<DbStatus, DbError> {
        Ok(DbStatus {
            db_id: self.db_id.clone(),
            head: self.head,
            oldest: self.oldest()?,
            sessions: self.live,
            tombstones: self.tombs,
            hlc: self.hlc,
        })
    }

    pub(super) fn last_peer_db_id(&mut self) -> Result<Option<String>, DbError> {
        self.conn
            .prepare_cached("SELECT peer_db_id FROM peer_positions ORDER BY seq DESC, peer_db_id LIMIT 1")
            .and_then(|mut s| s.query_row([], |r| r.get(0)).optional())
            .ctx("read the last peer position")
    }

    pub(super) fn peer_position(&mut self, peer: &str) -> Result<Option<Seq>, DbError> {
        let seq: Option<i64> = self
            .conn
            .prepare_cached("SELECT seq FROM peer_positions WHERE peer_db_id = ?1")
            .and_then(|mut s| s.query_row([peer], |r| r.get(0)).optional())
            .ctx("read a peer position")?;
        Ok(seq.map(|s| Seq(s as u64)))
    }
}

/// Rejects records a peer must never send: a body under another id, or a clock reading
/// that does not fit the database's signed 64-bit integers.
fn validate(rec: &Record) -> Result<(), DbError> {
    if let Some(s) = &rec.session {
        if s.id != rec.id {
            return Err(DbError::InvalidRecord {
                id: rec.id.clone(),
                detail: format!("its session carries another id ({})", s.id),
            });
        }
    }
    if rec.version.hlc.wall_ms > i64::MAX as u64 {
        return Err(DbError::InvalidRecord {
            id: rec.id.clone(),
            detail: format!("clock reading {} is out of range", rec.version.hlc),
        });
    }
    Ok(())
}
