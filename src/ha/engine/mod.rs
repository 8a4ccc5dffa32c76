//! The replication engine: the sans-IO heart of HA.
//!
//! The engine owns every replication decision of one master and nothing else: what to send
//! the peer, what to read from or apply to the local database, when a waiting client may be
//! answered, whether this node is ready. It takes [`Event`]s (with the time as Unix
//! milliseconds) and returns [`Command`]s; the peer-link task carries them out. It must never
//! do I/O, read a clock, sleep or spawn; the same events always give the same commands.
//! It never sees the configuration either: the HA node fills its [`EngineConfig`] from it.
//!
//! # Data model
//! Each node's database has a `db_id` (random, fixed at creation) and a change log of its own
//! local writes with dense sequence numbers 1, 2, 3, ... Remote changes are merged by
//! last-writer-wins on [`Version`](crate::model::Version) and are not appended to the
//! receiver's log; instead the receiver stores, per peer `db_id`, the highest peer sequence
//! number it has applied (its *position*), in the same transaction as the merge.
//! The database layer offers what the commands need: a status, `changes_since(after, limit)`
//! (or "truncated"), a consistent snapshot, and `apply_remote(peer_db_id, records, peer_pos)`,
//! an idempotent merge that, when `peer_pos` is given, stores it **verbatim** (not the
//! maximum) in the same transaction.
//!
//! Why incremental resync is enough, and when it is not: a node's own writes never leave its
//! database, so what it lacks of the peer is exactly the peer's log after its position. That
//! fails for a node that lost its own writes (a new, empty database; a database restored from
//! a backup): the peer holds those writes merged, outside its log. Hence a new `db_id` gets a
//! full snapshot; snapshot chunks never move the position (so an interrupted snapshot is
//! redone in full, not "continued" from position 0); and a peer whose log ends before the
//! position we applied of it (restored backup) gets a full snapshot too.
//!
//! # Each direction of the link
//! Both directions are symmetric: each node streams its own log to the other.
//! - *Sending:* at connect, if the peer's `Hello` holds a position in my current log that my
//!   log still covers (`oldest - 1 <= pos <= head`), stream from there (incremental);
//!   otherwise send a snapshot. Batches of at most `batch_limit` records, at most
//!   `max_inflight` unacknowledged messages. When everything up to my head at connect is
//!   sent, send `CaughtUp`, then stream live changes. A `LocalCommitted` carrying its change
//!   goes straight out when nothing is queued before it (commits stepped together, one group
//!   commit, share one message of up to `batch_limit` records); otherwise the log is read. A log that
//!   turns out truncated switches to a snapshot.
//! - *Receiving:* `Changes` must continue exactly where my position is (duplicates are
//!   trimmed, a gap disconnects; the next connect resyncs from the stored position). Each batch
//!   becomes one `Apply` (batches stepped together, one `Apply`: [`Engine::step_batch`]);
//!   each `Applied` is acknowledged with one `Ack` of the last position. A snapshot is applied
//!   chunk by chunk without a position, and its end with position = its head.
//!
//! # Readiness
//! - Connected: ready only once this connection's catch-up is complete (the peer's
//!   `CaughtUp` received and every `Apply` issued before it durably done). So on every
//!   (re)connect a node becomes not ready until it has the peer's data (invariant 4 of the
//!   spec), and a reinstalled node with an empty database is not ready before the snapshot.
//! - Not connected: ready if it was ever ready since start (a standby that lost its peer must
//!   be able to take over; its data only grew), or once the peer has stayed unreachable for
//!   `startup_grace` (counted from start, and again from each disconnect).
//! - Except a *stale* node: one that lost the active role (`RoleChanged` to standby) while cut
//!   off from the peer, or heard nothing from the peer between losing it and the link going
//!   down (a pulled cable: the VRRP manager demotes the node at once, the link is declared
//!   dead only `peer_timeout` later), or for two heartbeat intervals after losing it (then
//!   the link is dropped at once: a cable plugged back in within the peer timeout must not
//!   find the node ready with old data). The peer may have taken over and written since, so such
//!   a node is not ready until its next catch-up completes; otherwise a returning primary
//!   would take the VIP back with old data before it has even reconnected. Only a restart
//!   (and then the start-up grace) lets it serve alone.
//!
//! # Acknowledged writes (`/HA/sync = ack`)
//! `AwaitAck { seq }` is released `Acked` once the peer has acknowledged `seq` of my log,
//! `TimedOut` after `sync_timeout`, and at once as `Degraded` when the link is down (there is
//! no point waiting). Timeouts and link losses with waiters mark the node *degraded*; that
//! clears when the link is streaming again and the peer has acknowledged everything up to
//! the last write answered without it. In `async` mode every waiter is released at once
//! `NotReplicated`.
//!
//! # Clocks
//! Both `Hello` and every `Heartbeat` carry the sender's wall clock; the engine keeps the
//! last measured offset (peer minus local) and raises an alarm (logged once, shown in
//! status) while it exceeds `max_clock_offset`. Heartbeats go out every
//! `heartbeat_interval` whatever else flows, so a clock that jumps while the link streams
//! is seen within one interval. The offset is kept while the link is down: it is what
//! [`shared_clock_ms`] needs to measure tombstone ages on a clock both masters agree on.
//! The engine only measures; it never reads a clock, and deciding with the offset is left
//! to its callers (tombstone purge) and to the database (the bounded hybrid clock).
//!
//! # Made active
//! When the HA manager makes this node active (`RoleChanged` to active) while the link still
//! looks up, the peer has just lost the resource address: it is cut off (a pulled cable is
//! noticed by the manager well before `peer_timeout`) or dead. The node then presumes the peer
//! gone: waiting clients are released `Degraded` at once, and new ones too, until a message
//! from the peer (or a new connection) shows it is still there. Writes answered meanwhile are
//! stored here only, streamed to the peer if it is alive, and counted by the degraded mark.
//!
//! # Refinements of the original plan
//! - `Hello::your_db_id` names the log `your_position` refers to, because both sides send
//!   `Hello` before reading the other's. It is set only with a stored position: the link
//!   remembers the peer's `db_id` from its hello, and after a snapshot interrupted on that
//!   connection, naming it with position 0 asked for an incremental resync from the peer's
//!   first change, so a wiped node never got back its own writes (found by the random
//!   operations test in `tests/ha.rs`; `sim.rs` now remembers the peer's id the same way).
//! - `Apply` carries `peer_db_id`, and `peer_pos` is an `Option` (`None` for snapshot chunks)
//!   rather than position 0: storing 0 made an interrupted snapshot look like a valid
//!   position, and a reinstalled node then never got back its own writes held by the peer
//!   (found by the simulation in `sim.rs`). `Applied::up_to` echoes it.
//! - A database restored from a backup *and written to* before reconnecting reuses sequence
//!   numbers the peer already applied; the engine cannot see that. Restoring a backup must
//!   therefore give the database a new `db_id` (the database layer's job).
//! - Every `Apply` is answered by exactly one `Applied`, in order (one database task). The
//!   engine matches them first-in first-out, so an `Applied` from an earlier connection is
//!   recognised and ignored. `our_position_for_them` must be read after earlier `Apply`s.
//! - `LocalCommitted` may carry the committed change, which saves a log read on the hot path.
//! - A peer announcing our own `db_id` (a database file copied between the masters) is
//!   rejected: positions would be meaningless.
//! - A snapshot is sent by one command ([`Command::SendSnapshot`]): the task that runs the
//!   engine streams it from the database as it is read, so it is never held whole, and
//!   sends nothing else meanwhile; only change batches are flow-controlled. A snapshot
//!   counts as one in-flight message until acknowledged.

use crate::model::{Change, LinkState, LogRead, NodeId, Readiness, Record, Role, Seq, SyncLevel};
use crate::proto::peer::{Hello, PeerMsg, PROTOCOL_VERSION};
use serde::Serialize;
use std::collections::VecDeque;
use std::time::Duration;

#[cfg(test)]
mod sim;
#[cfg(test)]
mod tests;

/// Default number of records per `Changes` or `SnapshotChunk` message.
pub const DEFAULT_BATCH_LIMIT: usize = 1000;
/// Default number of unacknowledged messages on the link.
pub const DEFAULT_MAX_INFLIGHT: usize = 8;
/// Commit times tracked for the lag figure; beyond this, entries are coalesced.
const COMMIT_TIMES_CAP: usize = 4096;
/// Degraded reason while the peer is presumed gone after this node was made active.
const PRESUMED_GONE: &str = "made active by the HA manager while the peer link looked up: the peer lost the \
     resource address, so it is cut off or dead; answering without its acknowledgement until it is heard from again";

/// Identity of a client waiting for its write to reach the peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct WaiterId(pub u64);

/// The local database as the engine starts with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DbStatus {
    pub db_id: String,
    /// Last sequence number of the local change log.
    pub head: Seq,
    /// Oldest retained sequence number (`head + 1` when the log is empty).
    pub oldest: Seq,
}

/// Engine settings. The engine never sees the configuration: the HA node fills these from it.
#[derive(Clone, Debug, PartialEq)]
pub struct EngineConfig {
    pub local: NodeId,
    pub peer: NodeId,
    pub sync: SyncLevel,
    pub sync_timeout: Duration,
    pub startup_grace: Duration,
    pub heartbeat_interval: Duration,
    pub peer_timeout: Duration,
    /// Digest of this node's cluster configuration (`Config::digest_cluster`), compared with
    /// the peer's in the hello.
    pub config_digest: String,
    /// Records per message.
    pub batch_limit: usize,
    /// Bytes of records per message (by [`Record::json_len_bound`]); a message always
    /// carries at least one record.
    pub batch_bytes: usize,
    /// Unacknowledged messages allowed on the link.
    pub max_inflight: usize,
    /// Role at start (usually standby until the VIP manager says otherwise).
    pub role: Role,
    /// `/HA/max_clock_offset`: the clock difference to the peer beyond which the alarm is up.
    pub max_clock_offset: Duration,
}

/// How many of the leading `records` fit in one message of at most `budget` bytes of
/// records (at least one, so a record alone always goes out).
fn fitting<'a>(records: impl Iterator<Item = &'a Record>, budget: usize) -> usize {
    let mut bytes = 0usize;
    let mut n = 0;
    for r in records {
        bytes = bytes.saturating_add(r.json_len_bound());
        if n > 0 && bytes > budget {
            break;
        }
        n += 1;
    }
    n
}

/// The clock reading both masters agree to measure tombstone ages against: the earlier of
/// this node's clock `now` and the peer's, estimated from the last measured offset
/// ([`EngineStatus::clock_offset_ms`]). Both nodes compute the same value (up to the
/// measurement's few milliseconds), so both forget the same tombstones whichever clock is
/// wrong, and neither forgets one the other still needs. `None` while the peer's clock was
/// never measured since start: tombstones are then kept.
pub fn shared_clock_ms(now: u64, peer_offset_ms: Option<i64>) -> Option<u64> {
    let offset = peer_offset_ms?;
    Some(if offset < 0 { now.saturating_sub(offset.unsigned_abs()) } else { now })
}

/// The clock to forget tombstones against now ([`shared_clock_ms`]), or `None` (keep every
/// tombstone): only while the two databases are in step both ways, this node caught up with
/// the peer and the peer holding every local change. A peer record older than a tombstone
/// may still be on its way only while the link is behind or down, and a tombstone the peer
/// has not yet received may be the only thing that ends a session there (a node restarted
/// with an empty database ends a session the peer still holds live); forgetting it in either
/// case would leave the session live on one node alone.
pub fn tombstone_clock_ms(now: u64, st: &EngineStatus) -> Option<u64> {
    if st.readiness != Readiness::CaughtUp || st.peer_acked < st.local_head {
        return None;
    }
    shared_clock_ms(now, st.clock_offset_ms)
}

/// Most records in one merged [`Command::Apply`] (one transaction). Small enough that the
/// task running the engine, which waits for the apply, still answers heartbeats well within
/// the peer timeout on a loaded machine (a snapshot comes in chunks of 1,000).
pub const MERGE_RECORDS: usize = 4_000;

/// Something that happened; fed to [`Engine::step`]. `now` is milliseconds of a monotonic
/// clock (the caller anchors it at the wall clock at start, so it reads like Unix ms); it
/// drives every timer, so a wall clock set back or forward never stalls or fires them.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// This machine's wall clock read `wall_ms` at monotonic `now`: heartbeats carry it and
    /// the peer's clock is compared with it. Fed before each tick; without it the wall
    /// clock is taken to equal `now`.
    WallClock { now: u64, wall_ms: u64 },
    /// The daemon started (after [`Engine::new`]).
    Start { now: u64 },
    /// Periodic timer; drives heartbeats, timeouts and the start-up grace.
    Tick { now: u64 },
    /// A connection attempt to the peer is under way (secure handshake, `Hello` exchange).
    PeerConnecting { now: u64 },
    /// The link is up: the peer's `Hello`, and how far we have applied the peer's log of
    /// `hello.db_id` (read from the database after every earlier `Apply` completed).
    PeerConnected { hello: Hello, our_position_for_them: Seq, now: u64 },
    /// The link is gone (closed, failed, or a connection attempt failed).
    PeerDisconnected { reason: String, now: u64 },
    /// A message from the peer, after the `Hello`.
    PeerMessage { msg: PeerMsg, now: u64 },
    /// A local write committed at `seq` of the local log; `change` is that entry when the
    /// caller has it at hand.
    LocalCommitted { seq: Seq, change: Option<Change>, now: u64 },
    /// A client wants an answer once the peer has stored `seq` of the local log.
    AwaitAck { waiter: WaiterId, seq: Seq, now: u64 },
    /// Answer to [`Command::ReadLog`] with the same `after`.
    LogRead { after: Seq, result: LogRead, now: u64 },
    /// Answer to [`Command::ReadSnapshot`]: a snapshot of `total` records at `head` is open
    /// (the caller holds it until [`Command::SendSnapshot`], or drops it at the next
    /// connection or snapshot).
    SnapshotRead { head: Seq, total: u64, now: u64 },
    /// The oldest outstanding [`Command::Apply`] is durably done; `up_to` is its `peer_pos`.
    Applied { up_to: Option<Seq>, now: u64 },
    /// The VIP manager changed this node's role.
    RoleChanged { role: Role, now: u64 },
}

/// Something the peer-link task must do, in order.
#[derive(Clone, Debug, PartialEq)]
pub enum Command {
    /// Send this message to the peer.
    Send(PeerMsg),
    /// Read local change-log entries after `after`, at most `limit`; answer with
    /// [`Event::LogRead`].
    ReadLog { after: Seq, limit: usize },
    /// Take a consistent snapshot of the local database, as a file when `as_file` (the peer
    /// announced an empty database: [`Hello::empty`]) and then sent as `SnapshotPart`s by
    /// [`Command::SendSnapshot`]; answer with [`Event::SnapshotRead`].
    ReadSnapshot { as_file: bool },
    /// Send the snapshot opened for [`Event::SnapshotRead`] (the one at `head`):
    /// `SnapshotBegin { head, total }`, its records cut by a [`crate::proto::peer::Chunker`] of `limit` records and
    /// `bytes` into `SnapshotChunk`s, then `SnapshotEnd { head }`; all before any later
    /// command. If the snapshot cannot be read to its end (or holds other than `total`
    /// records), drop the link instead: the peer then never sees its end.
    SendSnapshot { head: Seq, total: u64, limit: usize, bytes: usize },
    /// Merge these peer records and, when `peer_pos` is set, store it as the position in the
    /// peer's log `peer_db_id` (verbatim, not the maximum), in one transaction. Snapshot chunks
    /// carry `None`: they merge records but must not move the position. Answer with one
    /// [`Event::Applied`]. Several peer messages stepped in one batch
    /// ([`Engine::step_batch`]) come as one `Apply` (see [`MERGE_RECORDS`]).
    Apply { peer_db_id: String, records: Vec<Record>, peer_pos: Option<Seq> },
    /// Store the next bytes of the snapshot file the peer sends (`first`: the start of a new
    /// file); answer with one [`Event::Applied`] (`up_to: None`). Nothing of the file counts
    /// before [`Command::LoadSnapshot`].
    StoreSnapshotPart { first: bool, data: Vec<u8> },
    /// Load the snapshot file stored and store `head` as the position in the peer's log
    /// `peer_db_id`, in one transaction; answer with one [`Event::Applied`] (`up_to:
    /// Some(head)`).
    LoadSnapshot { peer_db_id: String, head: Seq },
    /// Answer these waiting clients.
    ReleaseWaiters { waiters: Vec<WaiterId>, outcome: AckOutcome },
    /// Close the peer link; `reason` is logged. The engine already counts the link as down.
    Disconnect { reason: String },
    /// Reconcile the database with every agent (this node just became active).
    ReconcileAgents,
}

impl Command {
    /// Whether the command is a database apply answered by exactly one [`Event::Applied`],
    /// in the order given.
    pub fn answered_by_applied(&self) -> bool {
        matches!(self, Command::Apply { .. } | Command::StoreSnapshotPart { .. } | Command::LoadSnapshot { .. })
    }
}

/// The most bytes a snapshot file of `total` records may have: a row and its index entries
/// take at most a few times the largest record, and pages are at least half full. A peer
/// that sends more is cut off rather than filling the disk.
pub fn snapshot_file_limit(total: u64) -> u64 {
    const BASE: u64 = 16 << 20;
    BASE.saturating_add(total.saturating_mul(8 * crate::model::MAX_RECORD as u64))
}

/// How a waiting client's write ended up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AckOutcome {
    /// The peer has stored it.
    Acked,
    /// The peer did not confirm within `sync_timeout`; the node continues alone.
    TimedOut,
    /// The peer link is down; not waited for.
    Degraded,
    /// Replication is asynchronous; not waited for.
    NotReplicated,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ResyncKind {
    Incremental,
    Snapshot,
    /// A snapshot sent as a SQLite file, to a peer with an empty database.
    SnapshotFile,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// This node caught up with the peer's data.
    Received,
    /// The peer caught up with this node's data.
    Sent,
}

/// A completed resync in one direction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ResyncInfo {
    pub kind: ResyncKind,
    pub records: u64,
    pub duration_ms: u64,
    /// When it completed (Unix ms).
    pub at_ms: u64,
    pub direction: Direction,
}

/// Everything `tlctl ha status` and the metrics show about replication.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EngineStatus {
    pub local: NodeId,
    pub peer: NodeId,
    pub role: Role,
    pub ready: bool,
    /// Why the node is (not) ready.
    pub readiness: Readiness,
    /// While waiting for the peer at start: how much of the start-up grace is left.
    pub grace_left_ms: Option<u64>,
    pub link: LinkState,
    /// `ack` or `async`.
    pub sync: &'static str,
    pub db_id: String,
    pub peer_db_id: Option<String>,
    /// Last sequence number of the local log.
    pub local_head: Seq,
    /// How far the peer has acknowledged the local log.
    pub peer_acked: Seq,
    /// Last sequence number of the peer's log, as last heard.
    pub peer_head: Seq,
    /// How far this node has durably applied the peer's log.
    pub applied_of_peer: Seq,
    /// Local changes the peer has not acknowledged.
    pub lag_changes: u64,
    /// Age of the oldest local change the peer has not acknowledged.
    pub lag_ms: u64,
    /// The most recent completed resync, either direction.
    pub last_resync: Option<ResyncInfo>,
    /// The most recent resync through which this node caught up with the peer.
    pub last_resync_received: Option<ResyncInfo>,
    /// The most recent resync through which the peer caught up with this node.
    pub last_resync_sent: Option<ResyncInfo>,
    /// Completed resyncs since start, both directions.
    pub resyncs: u64,
    /// `Some(false)`: the peer's subcluster/agent configuration differs (loud warning).
    pub config_digest_match: Option<bool>,
    /// The peer's clock minus this node's, as last measured (from the `Hello` and every
    /// `Heartbeat`; the one-way network delay makes it a few milliseconds low). Kept while
    /// the link is down; `None` until the peer was heard once since start.
    pub clock_offset_ms: Option<i64>,
    /// When `clock_offset_ms` was measured (the engine's monotonic clock).
    pub clock_offset_at_ms: Option<u64>,
    /// `/HA/max_clock_offset` in milliseconds.
    pub max_clock_offset_ms: u64,
    /// The last measured offset is beyond `max_clock_offset`: the alarm is up.
    pub clock_offset_exceeded: bool,
    pub degraded: bool,
    pub degraded_reason: Option<String>,
    /// Why the link last went down or was refused.
    pub last_link_error: Option<String>,
    /// Clients waiting for the peer's acknowledgement.
    pub waiters: usize,
    pub connected_since_ms: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reading {
    Idle,
    Log { after: Seq },
    Snapshot,
}

/// My log towards the peer, for one connection.
#[derive(Debug)]
struct Outbound {
    kind: ResyncKind,
    /// My head at connect: `CaughtUp` is sent once everything up to here is sent.
    target: Seq,
    /// Last seq of my log the peer will have once it applies everything sent.
    sent: Seq,
    /// A snapshot must be sent before anything else.
    need_snapshot: bool,
    /// The peer announced an empty database: snapshots go to it as a file.
    peer_empty: bool,
    reading: Reading,
    /// The last log read returned nothing new; wait for a commit before reading again.
    stalled: bool,
    /// Last seq of each unacknowledged message.
    inflight: VecDeque<Seq>,
    caught_up_sent: bool,
    /// `CaughtUp` sent and acknowledged up to `target`.
    done: bool,
    records: u64,
}

impl Outbound {
    fn snapshot_kind(&self) -> ResyncKind {
        if self.peer_empty {
            ResyncKind::SnapshotFile
        } else {
            ResyncKind::Snapshot
        }
    }
}

/// The peer's log towards me, for one connection.
#[derive(Debug)]
struct Inbound {
    kind: ResyncKind,
    /// Highest peer seq handed to `Apply` in this connection.
    recv_pos: Seq,
    /// Head of the snapshot being received.
    snapshot: Option<Seq>,
    /// How the snapshot being received comes: its record count, and the bytes of its file
    /// so far (`None` while it comes, if at all, as chunks).
    snapshot_total: u64,
    file_bytes: Option<u64>,
    chunks_seen: bool,
    /// `CaughtUp` received: done once the apply numbered `barrier` has completed.
    caught_up_barrier: Option<u64>,
    done: bool,
    records: u64,
}

#[derive(Debug)]
struct Link {
    gen: u64,
    peer_db_id: String,
    connected_at: u64,
    last_heard: u64,
    last_heartbeat: u64,
    out: Outbound,
    inb: Inbound,
}

/// Consecutive applies being merged into one [`Command::Apply`] ([`Engine::step_batch`]).
struct MergedApply {
    peer_db_id: String,
    records: Vec<Record>,
    peer_pos: Option<Seq>,
    /// How many applies it holds: answered together by one `Applied`.
    applies: usize,
}

impl MergedApply {
    /// Gives out the merged command, if any, and records how many applies it covers.
    fn close(merged: Option<MergedApply>, out: &mut Vec<Command>, groups: &mut VecDeque<usize>) {
        if let Some(m) = merged {
            groups.push_back(m.applies);
            out.push(Command::Apply { peer_db_id: m.peer_db_id, records: m.records, peer_pos: m.peer_pos });
        }
    }
}

#[derive(Debug)]
struct PendingApply {
    no: u64,
    gen: u64,
    /// The position stored with it; acknowledged once durable. `None` for snapshot chunks.
    up_to: Option<Seq>,
}

#[derive(Debug)]
struct Waiter {
    id: WaiterId,
    seq: Seq,
    since: u64,
}

/// The replication engine of one master; see the module doc.
#[derive(Debug)]
pub struct Engine {
    cfg: EngineConfig,
    db_id: String,
    local_head: Seq,
    oldest: Seq,
    now: u64,
    started_at: u64,
    role: Role,

    connecting: bool,
    link: Option<Link>,
    gen: u64,
    /// When the link last went down (or start): the grace counts from here.
    down_since: u64,
    ever_ready: bool,
    ready_by_grace: bool,
    /// When this node last went from active to standby.
    demoted_at: Option<u64>,
    /// Lost the active role while cut off from the peer; see the module doc.
    stale: bool,
    last_link_error: Option<String>,
    config_digest_match: Option<bool>,
    /// (peer clock minus ours, when measured), last measurement.
    clock_offset: Option<(i64, u64)>,
    clock_offset_exceeded: bool,
    /// Wall clock minus the monotonic `now`, from the last [`Event::WallClock`].
    wall_minus_now: i64,
    peer_db_id: Option<String>,
    peer_head: Seq,

    peer_acked: Seq,
    /// (last seq of a run of commits, time of its first commit), ascending.
    commit_times: VecDeque<(Seq, u64)>,
    waiters: Vec<Waiter>,
    degraded: bool,
    degraded_reason: Option<String>,
    /// Highest local seq answered without the peer: degraded clears once the peer has it.
    degraded_mark: Seq,
    /// Made active by the HA manager while the link was up; see the module doc.
    peer_presumed_gone: bool,

    applied_of_peer: Seq,
    pending_applies: VecDeque<PendingApply>,
    /// How many of `pending_applies` each `Apply` command given out covers, oldest first.
    apply_groups: VecDeque<usize>,
    applies_issued: u64,
    applies_completed: u64,

    last_resync: Option<ResyncInfo>,
    last_resync_received: Option<ResyncInfo>,
    last_resync_sent: Option<ResyncInfo>,
    resyncs: u64,
}

impl Engine {
    pub fn new(cfg: EngineConfig, db: DbStatus, now: u64) -> Engine {
        Engine {
            role: cfg.role,
            cfg,
            db_id: db.db_id,
            local_head: db.head,
            oldest: db.oldest,
            now,
            started_at: now,
            connecting: false,
            link: None,
            gen: 0,
            down_since: now,
            ever_ready: false,
            ready_by_grace: false,
            demoted_at: None,
            stale: false,
            last_link_error: None,
            config_digest_match: None,
            clock_offset: None,
            clock_offset_exceeded: false,
            wall_minus_now: 0,
            peer_db_id: None,
            peer_head: Seq::ZERO,
            peer_acked: Seq::ZERO,
            commit_times: VecDeque::new(),
            waiters: Vec::new(),
            degraded: false,
            degraded_reason: None,
            degraded_mark: Seq::ZERO,
            peer_presumed_gone: false,
            applied_of_peer: Seq::ZERO,
            pending_applies: VecDeque::new(),
            apply_groups: VecDeque::new(),
            applies_issued: 0,
            applies_completed: 0,
            last_resync: None,
            last_resync_received: None,
            last_resync_sent: None,
            resyncs: 0,
        }
    }

    /// The `Hello` this node sends on a new connection. `your_db_id` and `your_position`:
    /// the peer database this node last applied from, and its stored position in it.
    pub fn hello(&self, your_db_id: Option<String>, your_position: Seq, now: u64) -> Hello {
        Hello {
            protocol: PROTOCOL_VERSION,
            node: self.cfg.local.clone(),
            db_id: self.db_id.clone(),
            head: self.local_head,
            oldest: self.oldest,
            your_db_id,
            your_position,
            config_digest: self.cfg.config_digest.clone(),
            now_ms: self.wall(now),
            // The engine does not know the database's contents; the link fills this in.
            empty: false,
        }
    }

    /// Whether this node may serve as the active master; see the module doc.
    pub fn is_ready(&self) -> bool {
        self.readiness().is_ready()
    }

    /// Why this node is (not) ready; see the module doc.
    pub fn readiness(&self) -> Readiness {
        match &self.link {
            Some(link) if link.inb.done => Readiness::CaughtUp,
            Some(link) if link.inb.snapshot.is_some() => Readiness::ReceivingSnapshot,
            Some(_) => Readiness::CatchingUp,
            None if self.stale => Readiness::Stale,
            None if self.ready_by_grace && self.last_resync_received.is_none() => Readiness::AloneAfterGrace,
            None if self.ever_ready => Readiness::PeerUnreachable,
            None => Readiness::WaitingForPeer,
        }
    }

    pub fn role(&self) -> Role {
        self.role
    }

    /// Feeds one event; returns what must be done, in order.
    pub fn step(&mut self, event: Event) -> Vec<Command> {
        self.step_batch([event])
    }

    /// Feeds events that arrived together (several peer messages read at once); returns what
    /// must be done, in order. Consecutive applies of the batch are merged into one `Apply`
    /// (one transaction) of at most [`MERGE_RECORDS`] records, which is answered by one
    /// `Applied`: a merged apply comes before any other command except `Send` and
    /// `ReleaseWaiters`, which never depend on it and are given first.
    pub fn step_batch(&mut self, events: impl IntoIterator<Item = Event>) -> Vec<Command> {
        let mut out = Vec::new();
        for event in events {
            self.step_one(event, &mut out);
        }
        self.merge_applies(out)
    }

    /// Merges consecutive `Apply` commands (see [`Engine::step_batch`]) and records how many
    /// applies each command given out covers.
    fn merge_applies(&mut self, cmds: Vec<Command>) -> Vec<Command> {
        // Nothing to merge (the usual case): the commands stay as they are.
        match cmds.iter().filter(|c| c.answered_by_applied()).count() {
            0 => return cmds,
            1 => {
                self.apply_groups.push_back(1);
                return cmds;
            }
            _ => {}
        }
        let mut out = Vec::with_capacity(cmds.len());
        let mut merged: Option<MergedApply> = None;
        for c in cmds {
            match c {
                Command::Apply { peer_db_id, records, peer_pos } => match &mut merged {
                    Some(m) if m.peer_db_id == peer_db_id && m.records.len() + records.len() <= MERGE_RECORDS => {
                        m.records.extend(records);
                        // Storing the last position is what applying them one by one would
                        // leave behind; snapshot chunks (`None`) keep it.
                        if peer_pos.is_some() {
                            m.peer_pos = peer_pos;
                        }
                        m.applies += 1;
                    }
                    _ => {
                        MergedApply::close(merged.take(), &mut out, &mut self.apply_groups);
                        merged = Some(MergedApply { peer_db_id, records, peer_pos, applies: 1 });
                    }
                },
                c @ (Command::Send(_) | Command::ReleaseWaiters { .. }) => out.push(c),
                c => {
                    MergedApply::close(merged.take(), &mut out, &mut self.apply_groups);
                    if c.answered_by_applied() {
                        self.apply_groups.push_back(1);
                    }
                    out.push(c);
                }
            }
        }
        MergedApply::close(merged, &mut out, &mut self.apply_groups);
        out
    }

    fn step_one(&mut self, event: Event, out: &mut Vec<Command>) {
        let was_ready = self.is_ready();
        match event {
            Event::Start { now } => {
                self.observe(now);
                if self.role == Role::Active {
                    out.push(Command::ReconcileAgents);
                }
            }
            Event::Tick { now } => self.on_tick(now, out),
            Event::WallClock { now, wall_ms } => {
                self.observe(now);
                self.wall_minus_now = (wall_ms as i128 - now as i128).clamp(i64::MIN.into(), i64::MAX.into()) as i64;
            }
            Event::PeerConnecting { now } => {
                self.observe(now);
                if self.link.is_none() {
                    self.connecting = true;
                }
            }
            Event::PeerConnected { hello, our_position_for_them, now } => {
                self.on_connected(hello, our_position_for_them, now, out)
            }
            Event::PeerDisconnected { reason, now } => {
                self.observe(now);
                self.connecting = false;
                if self.link.is_some() {
                    self.link_down(reason, out);
                }
            }
            Event::PeerMessage { msg, now } => self.on_message(msg, now, out),
            Event::LocalCommitted { seq, change, now } => self.on_local_commit(seq, change, now, out),
            Event::AwaitAck { waiter, seq, now } => self.on_await(waiter, seq, now, out),
            Event::LogRead { after, result, now } => self.on_log_read(after, result, now, out),
            Event::SnapshotRead { head, total, now } => self.on_snapshot_read(head, total, now, out),
            Event::Applied { up_to, now } => self.on_applied(up_to, now, out),
            Event::RoleChanged { role, now } => {
                self.observe(now);
                if role != self.role {
                    tracing::info!(role = %role, "role changed");
                    if self.role == Role::Active && role == Role::Standby {
                        self.demoted_at = Some(now);
                        if self.link.is_none() {
                            self.mark_stale("lost the active role while the peer link is down");
                        }
                    }
                    self.role = role;
                    if role == Role::Active {
                        out.push(Command::ReconcileAgents);
                        if self.link.is_some() {
                            self.presume_peer_gone(out);
                        }
                    }
                }
            }
        }
        let ready = self.is_ready();
        if ready != was_ready {
            tracing::info!(peer = %self.cfg.peer, ready, readiness = %self.readiness(), "{}", self.readiness().describe());
        }
    }

    fn observe(&mut self, now: u64) {
        self.now = self.now.max(now);
    }

    /// While waiting for the peer at start: what is left of the start-up grace.
    fn grace_left_ms(&self) -> Option<u64> {
        (self.readiness() == Readiness::WaitingForPeer)
            .then(|| self.grace_ms().saturating_sub(self.now.saturating_sub(self.down_since)))
    }

    fn grace_ms(&self) -> u64 {
        self.cfg.startup_grace.as_millis() as u64
    }

    /// Current status, as of the latest time seen in an event.
    pub fn status(&self) -> EngineStatus {
        let lag_changes = self.local_head.0.saturating_sub(self.peer_acked.0);
        let lag_ms = if lag_changes == 0 {
            0
        } else {
            let since = self
                .commit_times
                .iter()
                .find(|(seq, _)| *seq > self.peer_acked)
                .map(|(_, t)| *t)
                .unwrap_or(self.started_at);
            self.now.saturating_sub(since)
        };
        let link = match &self.link {
            None if self.connecting => LinkState::Handshaking,
            None => LinkState::Down,
            Some(l) if l.inb.done && l.out.done => LinkState::Streaming,
            Some(_) => LinkState::CatchingUp,
        };
        EngineStatus {
            local: self.cfg.local.clone(),
            peer: self.cfg.peer.clone(),
            role: self.role,
            ready: self.is_ready(),
            readiness: self.readiness(),
            grace_left_ms: self.grace_left_ms(),
            link,
            sync: match self.cfg.sync {
                SyncLevel::Ack => "ack",
                SyncLevel::Async => "async",
            },
            db_id: self.db_id.clone(),
            peer_db_id: self.peer_db_id.clone(),
            local_head: self.local_head,
            peer_acked: self.peer_acked,
            peer_head: self.peer_head,
            applied_of_peer: self.applied_of_peer,
            lag_changes,
            lag_ms,
            last_resync: self.last_resync.clone(),
            last_resync_received: self.last_resync_received.clone(),
            last_resync_sent: self.last_resync_sent.clone(),
            resyncs: self.resyncs,
            config_digest_match: self.config_digest_match,
            clock_offset_ms: self.clock_offset.map(|(o, _)| o),
            clock_offset_at_ms: self.clock_offset.map(|(_, at)| at),
            max_clock_offset_ms: self.max_clock_offset_ms(),
            clock_offset_exceeded: self.clock_offset_exceeded,
            degraded: self.degraded,
            degraded_reason: self.degraded_reason.clone(),
            last_link_error: self.last_link_error.clone(),
            waiters: self.waiters.len(),
            connected_since_ms: self.link.as_ref().map(|l| l.connected_at),
        }
    }

    // ----- link lifecycle -------------------------------------------------------------

    fn refuse(&mut self, reason: String, out: &mut Vec<Command>) {
        tracing::error!(peer = %self.cfg.peer, "refusing peer: {reason}");
        self.last_link_error = Some(reason.clone());
        out.push(Command::Send(PeerMsg::Reject { reason: reason.clone() }));
        out.push(Command::Disconnect { reason });
    }

    fn on_connected(&mut self, hello: Hello, our_pos: Seq, now: u64, out: &mut Vec<Command>) {
        self.observe(now);
        self.connecting = false;
        if self.link.is_some() {
            // The old connection is gone already; no Disconnect for it.
            self.link_down("replaced by a new connection".into(), out);
        }
        if hello.protocol != PROTOCOL_VERSION {
            return self.refuse(
                format!(
                    "protocol version mismatch: peer speaks {}, this node speaks {}; \
                     run the same vsm version on both masters",
                    hello.protocol, PROTOCOL_VERSION
                ),
                out,
            );
        }
        if hello.node != self.cfg.peer {
            return self.refuse(
                format!(
                    "peer announced itself as '{}' but '{}' was expected; check /HA/nodes on both masters",
                    hello.node, self.cfg.peer
                ),
                out,
            );
        }
        if hello.db_id == self.db_id {
            return self.refuse(
                format!(
                    "peer has the same database id {} as this node (a database file copied \
                     between the masters?); remove the database on the node that should \
                     receive a full copy and restart it",
                    self.db_id
                ),
                out,
            );
        }
        let digest_match = hello.config_digest == self.cfg.config_digest;
        if !digest_match {
            tracing::warn!(
                peer = %self.cfg.peer,
                "the peer's subcluster and agent configuration differs from this node's; \
                 both masters must have the same configuration"
            );
        }
        self.config_digest_match = Some(digest_match);
        self.measure_clock(hello.now_ms, now);
        self.gen += 1;
        self.peer_db_id = Some(hello.db_id.clone());
        self.peer_head = hello.head;
        self.applied_of_peer = our_pos;

        let mine = hello.your_db_id.as_deref() == Some(self.db_id.as_str());
        let pos = hello.your_position;
        // The peer's log ends before what we applied of it: its database went back in time
        // (restored from a backup) and lost its own later writes, which only a full copy of
        // ours gives back.
        let peer_rewound = hello.head < our_pos;
        if peer_rewound {
            tracing::warn!(peer = %self.cfg.peer, peer_head = %hello.head, applied = %our_pos,
                "the peer's database is older than what this node applied of it; sending a snapshot");
        }
        let incremental = mine && !peer_rewound && pos.0 + 1 >= self.oldest.0 && pos <= self.local_head;
        let snapshot_kind = if hello.empty { ResyncKind::SnapshotFile } else { ResyncKind::Snapshot };
        let kind = if incremental { ResyncKind::Incremental } else { snapshot_kind };
        self.peer_acked = if incremental { pos } else { Seq::ZERO };
        tracing::info!(
            peer = %self.cfg.peer, peer_db = %hello.db_id, ?kind, from = %pos,
            head = %self.local_head, "peer connected; resync starts"
        );
        self.link = Some(Link {
            gen: self.gen,
            peer_db_id: hello.db_id,
            connected_at: now,
            last_heard: now,
            last_heartbeat: now,
            out: Outbound {
                kind,
                target: self.local_head,
                sent: if incremental { pos } else { Seq::ZERO },
                need_snapshot: !incremental,
                peer_empty: hello.empty,
                reading: Reading::Idle,
                stalled: false,
                inflight: VecDeque::new(),
                caught_up_sent: false,
                done: false,
                records: 0,
            },
            inb: Inbound {
                kind: ResyncKind::Incremental,
                recv_pos: our_pos,
                snapshot: None,
                snapshot_total: 0,
                file_bytes: None,
                chunks_seen: false,
                caught_up_barrier: None,
                done: false,
                records: 0,
            },
        });
        self.pump(out);
    }

    fn link_down(&mut self, reason: String, out: &mut Vec<Command>) {
        self.peer_presumed_gone = false;
        if let Some(link) = self.link.take() {
            tracing::warn!(peer = %self.cfg.peer, "peer link down: {reason}");
            // Demoted, and the peer was not heard from since: the link was most likely dead
            // already when the role was lost (cut off), so the peer may be writing without us.
            if self.role == Role::Standby && self.demoted_at.is_some_and(|d| d >= link.last_heard) {
                self.mark_stale("the peer link died around the time this node lost the active role");
            }
        }
        self.down_since = self.now;
        self.last_link_error = Some(reason.clone());
        if !self.waiters.is_empty() {
            let ids = self.waiters.drain(..).map(|w| w.id).collect();
            out.push(Command::ReleaseWaiters { waiters: ids, outcome: AckOutcome::Degraded });
            self.set_degraded(format!("peer link down ({reason}); continuing alone"));
        }
    }

    /// The HA manager made this node active while the link still looks up: the peer has just
    /// lost the resource address, so it is cut off or dead. Release waiting clients now and
    /// answer new ones without the peer until it is heard from again.
    fn presume_peer_gone(&mut self, out: &mut Vec<Command>) {
        tracing::info!(peer = %self.cfg.peer, "made active while the peer link looks up: not waiting for the peer's acknowledgements until it is heard from again");
        self.peer_presumed_gone = true;
        if !self.waiters.is_empty() {
            let ids = self.waiters.drain(..).map(|w| w.id).collect();
            out.push(Command::ReleaseWaiters { waiters: ids, outcome: AckOutcome::Degraded });
            self.set_degraded(PRESUMED_GONE.into());
        }
    }

    fn mark_stale(&mut self, why: &str) {
        if !self.stale {
            tracing::warn!(peer = %self.cfg.peer, "{why}: the peer may have taken over; not ready until resynchronised");
        }
        self.stale = true;
    }

    /// The link must close: tell the io layer and count it as down now.
    fn disconnect(&mut self, reason: String, out: &mut Vec<Command>) {
        out.push(Command::Disconnect { reason: reason.clone() });
        self.link_down(reason, out);
    }

    fn on_tick(&mut self, now: u64, out: &mut Vec<Command>) {
        self.observe(now);
        if self.link.is_none() && !self.ever_ready && now.saturating_sub(self.down_since) >= self.grace_ms() {
            tracing::warn!(
                peer = %self.cfg.peer,
                "peer unreachable for the start-up grace period; ready without it"
            );
            self.ever_ready = true;
            self.ready_by_grace = true;
        }
        let timeout = self.cfg.peer_timeout.as_millis() as u64;
        let heartbeat = self.cfg.heartbeat_interval.as_millis() as u64;
        let wall = self.wall(now);
        // Demoted, and not even a heartbeat from the peer since (two intervals): a pulled
        // cable, and the peer may be active and writing. Waiting for the peer timeout would
        // let a cable plugged back in before it lets this node look ready with old data, and
        // the HA manager make it active again.
        let demoted_unheard = self.link.as_ref().zip(self.demoted_at).and_then(|(link, d)| {
            (self.role == Role::Standby && d >= link.last_heard && now.saturating_sub(d) >= 2 * heartbeat)
                .then(|| now.saturating_sub(d))
        });
        if let Some(ago) = demoted_unheard {
            self.mark_stale("nothing heard from the peer since this node lost the active role");
            self.disconnect(format!("peer silent since this node lost the active role {ago} ms ago"), out);
        }
        if let Some(link) = &mut self.link {
            let silent = now.saturating_sub(link.last_heard);
            if silent >= timeout {
                self.disconnect(format!("peer silent for {silent} ms"), out);
            } else if now.saturating_sub(link.last_heartbeat) >= heartbeat {
                // Sent whatever else is flowing: the peer measures the clock offset from it.
                link.last_heartbeat = now;
                let msg = PeerMsg::Heartbeat { head: self.local_head, now_ms: wall };
                out.push(Command::Send(msg));
            }
        }
        let sync_timeout = self.cfg.sync_timeout.as_millis() as u64;
        let (expired, kept): (Vec<Waiter>, Vec<Waiter>) =
            std::mem::take(&mut self.waiters).into_iter().partition(|w| now.saturating_sub(w.since) >= sync_timeout);
        self.waiters = kept;
        if !expired.is_empty() {
            let max_seq = expired.iter().map(|w| w.seq).max().unwrap_or_default();
            out.push(Command::ReleaseWaiters {
                waiters: expired.into_iter().map(|w| w.id).collect(),
                outcome: AckOutcome::TimedOut,
            });
            self.set_degraded(format!(
                "peer did not acknowledge seq {max_seq} within {sync_timeout} ms; continuing alone"
            ));
        }
        self.pump(out);
    }

    fn max_clock_offset_ms(&self) -> u64 {
        u64::try_from(self.cfg.max_clock_offset.as_millis()).unwrap_or(u64::MAX)
    }

    /// This machine's wall clock at monotonic `now`.
    fn wall(&self, now: u64) -> u64 {
        (now as i128 + self.wall_minus_now as i128).clamp(0, u64::MAX as i128) as u64
    }

    /// Records the peer's clock reading `peer_ms` received at `now`; raises or clears the
    /// alarm when the offset crosses `max_clock_offset`.
    fn measure_clock(&mut self, peer_ms: u64, now: u64) {
        let offset = (peer_ms as i128 - self.wall(now) as i128).clamp(i64::MIN as i128, i64::MAX as i128) as i64;
        self.clock_offset = Some((offset, now));
        let bound = self.max_clock_offset_ms();
        let exceeded = offset.unsigned_abs() > bound;
        if exceeded && !self.clock_offset_exceeded {
            tracing::error!(
                peer = %self.cfg.peer, offset_ms = offset, max_clock_offset_ms = bound,
                "the clocks of the masters differ by more than /HA/max_clock_offset; \
                 last-writer-wins between them is unreliable until NTP brings them together"
            );
        } else if !exceeded && self.clock_offset_exceeded {
            tracing::info!(peer = %self.cfg.peer, offset_ms = offset, "the clocks of the masters agree again");
        }
        self.clock_offset_exceeded = exceeded;
    }

    fn set_degraded(&mut self, reason: String) {
        if !self.degraded {
            tracing::warn!(peer = %self.cfg.peer, "replication degraded: {reason}");
        }
        self.degraded = true;
        self.degraded_reason = Some(reason);
        self.degraded_mark = self.degraded_mark.max(self.local_head);
    }

    fn maybe_clear_degraded(&mut self) {
        let streaming = self.link.as_ref().is_some_and(|l| l.out.done);
        if self.degraded && streaming && self.peer_acked >= self.degraded_mark {
            tracing::info!(peer = %self.cfg.peer, "replication no longer degraded");
            self.degraded = false;
            self.degraded_reason = None;
        }
    }

    // ----- sending my log -------------------------------------------------------------

    fn on_local_commit(&mut self, seq: Seq, change: Option<Change>, now: u64, out: &mut Vec<Command>) {
        self.observe(now);
        if seq <= self.local_head {
            return;
        }
        self.local_head = seq;
        let full = self.commit_times.len() >= COMMIT_TIMES_CAP;
        match self.commit_times.back_mut() {
            Some(back) if back.1 == now || full => back.0 = seq,
            _ => self.commit_times.push_back((seq, now)),
        }
        let (max_inflight, limit) = (self.cfg.max_inflight, self.cfg.batch_limit.max(1));
        if let Some(link) = &mut self.link {
            let o = &mut link.out;
            o.stalled = false;
            let in_order = !o.need_snapshot && o.reading == Reading::Idle && o.sent.next() == seq;
            if let Some(change) = change.filter(|c| c.seq == seq && in_order) {
                // Commits stepped together (one group commit) share the message given out
                // just before, while it is the newest one in flight and has room.
                let room = match out.last_mut() {
                    Some(Command::Send(PeerMsg::Changes { records }))
                        if o.inflight.back() == Some(&o.sent)
                            && records.last().is_some_and(|r| r.seq == o.sent)
                            && records.len() < limit =>
                    {
                        Some(records)
                    }
                    _ => None,
                };
                if let Some(records) = room {
                    records.push(change);
                    o.sent = seq;
                    *o.inflight.back_mut().expect("checked above") = seq;
                    o.records += 1;
                } else if o.inflight.len() < max_inflight {
                    o.sent = seq;
                    o.inflight.push_back(seq);
                    o.records += 1;
                    out.push(Command::Send(PeerMsg::Changes { records: vec![change] }));
                }
            }
        }
        self.pump(out);
    }

    /// Issues the next read or `CaughtUp` for the outbound direction, if any is due.
    fn pump(&mut self, out: &mut Vec<Command>) {
        let (limit, max_inflight, head) = (self.cfg.batch_limit.max(1), self.cfg.max_inflight.max(1), self.local_head);
        let Some(link) = &mut self.link else { return };
        let o = &mut link.out;
        if o.reading != Reading::Idle {
            return;
        }
        if o.need_snapshot {
            o.reading = Reading::Snapshot;
            out.push(Command::ReadSnapshot { as_file: o.peer_empty });
            return;
        }
        if !o.caught_up_sent && (o.sent >= o.target || o.stalled) {
            o.caught_up_sent = true;
            let msg = PeerMsg::CaughtUp { head: o.target.min(o.sent) };
            out.push(Command::Send(msg));
        }
        let o = &mut link.out;
        if head > o.sent && !o.stalled && o.inflight.len() < max_inflight {
            o.reading = Reading::Log { after: o.sent };
            out.push(Command::ReadLog { after: o.sent, limit });
        }
        // Nothing to send may also mean nothing will be acknowledged.
        self.check_outbound_done();
    }

    fn on_log_read(&mut self, after: Seq, result: LogRead, now: u64, out: &mut Vec<Command>) {
        self.observe(now);
        let Some(link) = &mut self.link else { return };
        if link.out.reading != (Reading::Log { after }) || link.out.sent != after {
            return; // an answer for an earlier connection
        }
        link.out.reading = Reading::Idle;
        match result {
            LogRead::Truncated { oldest } => {
                tracing::info!(peer = %self.cfg.peer, %after, %oldest, "change log truncated; sending a snapshot");
                self.oldest = oldest;
                link.out.need_snapshot = true;
                link.out.kind = link.out.snapshot_kind();
            }
            LogRead::Changes(mut changes) => {
                // What does not fit in one message is read again for the next one.
                changes.truncate(fitting(changes.iter().map(|c| &c.record), self.cfg.batch_bytes));
                let contiguous = changes.first().map_or(true, |c| c.seq == after.next())
                    && changes.windows(2).all(|w| w[1].seq == w[0].seq.next());
                if !contiguous {
                    tracing::error!(peer = %self.cfg.peer, %after, "change log read is not contiguous; sending a snapshot");
                    link.out.need_snapshot = true;
                    link.out.kind = link.out.snapshot_kind();
                } else if let Some(last) = changes.last().map(|c| c.seq) {
                    link.out.sent = last;
                    link.out.inflight.push_back(last);
                    link.out.records += changes.len() as u64;
                    if last > self.local_head {
                        self.local_head = last;
                    }
                    out.push(Command::Send(PeerMsg::Changes { records: changes }));
                } else {
                    link.out.stalled = true;
                }
            }
        }
        self.pump(out);
    }

    fn on_snapshot_read(&mut self, head: Seq, total: u64, now: u64, out: &mut Vec<Command>) {
        self.observe(now);
        let (limit, bytes) = (self.cfg.batch_limit.max(1), self.cfg.batch_bytes);
        let Some(link) = &mut self.link else { return };
        if link.out.reading != Reading::Snapshot {
            return;
        }
        link.out.reading = Reading::Idle;
        link.out.need_snapshot = false;
        out.push(Command::SendSnapshot { head, total, limit, bytes });
        link.out.sent = head;
        link.out.inflight.push_back(head);
        link.out.records += total;
        link.out.stalled = false;
        if head > self.local_head {
            self.local_head = head;
        }
        self.pump(out);
    }

    fn on_ack(&mut self, db_id: String, applied: Seq, out: &mut Vec<Command>) {
        if db_id != self.db_id {
            return;
        }
        self.peer_acked = applied;
        while self.commit_times.front().is_some_and(|(seq, _)| *seq <= applied) {
            self.commit_times.pop_front();
        }
        let (acked, kept): (Vec<Waiter>, Vec<Waiter>) =
            std::mem::take(&mut self.waiters).into_iter().partition(|w| w.seq <= applied);
        self.waiters = kept;
        if !acked.is_empty() {
            out.push(Command::ReleaseWaiters {
                waiters: acked.into_iter().map(|w| w.id).collect(),
                outcome: AckOutcome::Acked,
            });
        }
        if let Some(link) = &mut self.link {
            let o = &mut link.out;
            while o.inflight.front().is_some_and(|s| *s <= applied) {
                o.inflight.pop_front();
            }
        }
        self.check_outbound_done();
        self.maybe_clear_degraded();
        self.pump(out);
    }

    /// The peer has everything up to my head at connect: record the completed resync.
    fn check_outbound_done(&mut self) {
        let now = self.now;
        let Some(link) = &mut self.link else { return };
        let o = &mut link.out;
        if o.done || !o.caught_up_sent || self.peer_acked < o.target {
            return;
        }
        o.done = true;
        let info = ResyncInfo {
            kind: o.kind,
            records: o.records,
            duration_ms: now.saturating_sub(link.connected_at),
            at_ms: now,
            direction: Direction::Sent,
        };
        tracing::info!(peer = %self.cfg.peer, kind = ?info.kind, records = info.records,
            duration_ms = info.duration_ms, "peer caught up with this node");
        self.last_resync = Some(info.clone());
        self.last_resync_sent = Some(info);
        self.resyncs += 1;
        self.maybe_clear_degraded();
    }

    fn on_await(&mut self, waiter: WaiterId, seq: Seq, now: u64, out: &mut Vec<Command>) {
        self.observe(now);
        let release = |outcome| Command::ReleaseWaiters { waiters: vec![waiter], outcome };
        if self.cfg.sync == SyncLevel::Async {
            out.push(release(AckOutcome::NotReplicated));
        } else if self.peer_acked >= seq {
            out.push(release(AckOutcome::Acked));
        } else if self.link.is_none() {
            out.push(release(AckOutcome::Degraded));
            self.set_degraded("peer link down; continuing alone".into());
        } else if self.peer_presumed_gone {
            out.push(release(AckOutcome::Degraded));
            self.set_degraded(PRESUMED_GONE.into());
        } else {
            self.waiters.push(Waiter { id: waiter, seq, since: now });
        }
    }

    // ----- receiving the peer's log ---------------------------------------------------

    fn on_message(&mut self, msg: PeerMsg, now: u64, out: &mut Vec<Command>) {
        self.observe(now);
        if self.link.is_none() {
            return;
        }
        if self.peer_presumed_gone {
            tracing::info!(peer = %self.cfg.peer, "heard from the peer again; waiting for its acknowledgements again");
            self.peer_presumed_gone = false;
        }
        let Some(link) = &mut self.link else { return };
        link.last_heard = now;
        let violation = |what: String| format!("protocol violation by peer: {what}");
        match msg {
            PeerMsg::Hello(_) => self.disconnect(violation("second hello".into()), out),
            PeerMsg::Reject { reason } => {
                let reason = format!("peer refused the connection: {reason}");
                tracing::error!(peer = %self.cfg.peer, "{reason}");
                self.disconnect(reason, out);
            }
            PeerMsg::Heartbeat { head, now_ms } => {
                self.peer_head = self.peer_head.max(head);
                self.measure_clock(now_ms, now);
            }
            PeerMsg::Ack { db_id, applied } => self.on_ack(db_id, applied, out),
            PeerMsg::Changes { records } => {
                if link.inb.snapshot.is_some() {
                    return self.disconnect(violation("changes inside a snapshot".into()), out);
                }
                if !records.windows(2).all(|w| w[1].seq == w[0].seq.next()) {
                    return self.disconnect(violation("changes not contiguous".into()), out);
                }
                let pos = link.inb.recv_pos;
                let fresh: Vec<Change> = records.into_iter().filter(|c| c.seq > pos).collect();
                let Some(first) = fresh.first().map(|c| c.seq) else {
                    // Everything was applied already; still acknowledge, once durable, so
                    // the sender's window and catch-up move on.
                    return self.apply(vec![], Some(pos), out);
                };
                if first != pos.next() {
                    let reason = format!("gap in the peer's changes: expected seq {}, got {first}", pos.next());
                    return self.disconnect(reason, out);
                }
                let last = fresh.last().map(|c| c.seq).unwrap_or(first);
                link.inb.recv_pos = last;
                link.inb.records += fresh.len() as u64;
                self.peer_head = self.peer_head.max(last);
                let records = fresh.into_iter().map(|c| c.record).collect();
                self.apply(records, Some(last), out);
            }
            PeerMsg::SnapshotBegin { head, total } => {
                if link.inb.snapshot.is_some() {
                    return self.disconnect(violation("snapshot inside a snapshot".into()), out);
                }
                tracing::info!(peer = %self.cfg.peer, %head, total, "receiving a snapshot");
                link.inb.snapshot = Some(head);
                link.inb.snapshot_total = total;
                link.inb.file_bytes = None;
                link.inb.chunks_seen = false;
                link.inb.recv_pos = Seq::ZERO;
                if !link.inb.done {
                    link.inb.kind = ResyncKind::Snapshot;
                }
            }
            PeerMsg::SnapshotChunk { records } => {
                if link.inb.snapshot.is_none() {
                    return self.disconnect(violation("snapshot chunk outside a snapshot".into()), out);
                }
                if link.inb.file_bytes.is_some() {
                    return self.disconnect(violation("snapshot chunk in a snapshot sent as a file".into()), out);
                }
                link.inb.chunks_seen = true;
                link.inb.records += records.len() as u64;
                self.apply(records, None, out);
            }
            PeerMsg::SnapshotPart { data } => {
                if link.inb.snapshot.is_none() {
                    return self.disconnect(violation("snapshot file part outside a snapshot".into()), out);
                }
                if link.inb.chunks_seen {
                    return self.disconnect(violation("snapshot file part in a snapshot sent as chunks".into()), out);
                }
                let before = link.inb.file_bytes.unwrap_or(0);
                let after = before.saturating_add(data.0.len() as u64);
                let limit = snapshot_file_limit(link.inb.snapshot_total);
                if after > limit {
                    let what = format!(
                        "a snapshot file of {} records over {limit} bytes, the most such a file can take",
                        link.inb.snapshot_total
                    );
                    return self.disconnect(violation(what), out);
                }
                link.inb.file_bytes = Some(after);
                if !link.inb.done {
                    link.inb.kind = ResyncKind::SnapshotFile;
                }
                self.queue_apply(Command::StoreSnapshotPart { first: before == 0, data: data.0 }, None, out);
            }
            PeerMsg::SnapshotEnd { head } => {
                if link.inb.snapshot != Some(head) {
                    return self.disconnect(violation(format!("unexpected snapshot end at {head}")), out);
                }
                link.inb.snapshot = None;
                link.inb.recv_pos = head;
                self.peer_head = self.peer_head.max(head);
                if link.inb.file_bytes.take().is_some() {
                    link.inb.records += link.inb.snapshot_total;
                    let load = Command::LoadSnapshot { peer_db_id: link.peer_db_id.clone(), head };
                    self.queue_apply(load, Some(head), out);
                } else {
                    self.apply(vec![], Some(head), out);
                }
            }
            PeerMsg::CaughtUp { head } => {
                if link.inb.snapshot.is_some() || link.inb.caught_up_barrier.is_some() {
                    return self.disconnect(violation("unexpected caught-up".into()), out);
                }
                if link.inb.recv_pos < head {
                    let what = format!("caught up at {head} but sent only up to {}", link.inb.recv_pos);
                    return self.disconnect(violation(what), out);
                }
                link.inb.caught_up_barrier = Some(self.applies_issued);
                self.check_inbound_done();
            }
        }
    }

    fn apply(&mut self, records: Vec<Record>, peer_pos: Option<Seq>, out: &mut Vec<Command>) {
        let Some(link) = &self.link else { return };
        let cmd = Command::Apply { peer_db_id: link.peer_db_id.clone(), records, peer_pos };
        self.queue_apply(cmd, peer_pos, out);
    }

    /// Gives out `cmd`, one answered by an `Applied` (see [`Command::answered_by_applied`]),
    /// which stores `peer_pos` when it is set.
    fn queue_apply(&mut self, cmd: Command, peer_pos: Option<Seq>, out: &mut Vec<Command>) {
        let Some(link) = &self.link else { return };
        self.applies_issued += 1;
        self.pending_applies.push_back(PendingApply { no: self.applies_issued, gen: link.gen, up_to: peer_pos });
        out.push(cmd);
    }

    /// One `Apply` command is durably done: every apply it merged, in order; the peer gets
    /// one `Ack` for the last position among them.
    fn on_applied(&mut self, up_to: Option<Seq>, now: u64, out: &mut Vec<Command>) {
        self.observe(now);
        let Some(n) = self.apply_groups.pop_front() else {
            tracing::error!(?up_to, "applied reported with no apply outstanding; ignored");
            return;
        };
        let mut ack = None;
        let mut last = None;
        for _ in 0..n {
            let Some(done) = self.pending_applies.pop_front() else { break };
            self.applies_completed = done.no;
            let Some(link) = &self.link else { continue };
            if link.gen != done.gen {
                continue;
            }
            if let Some(pos) = done.up_to {
                self.applied_of_peer = pos;
                ack = Some(PeerMsg::Ack { db_id: link.peer_db_id.clone(), applied: pos });
                last = Some(pos);
            }
        }
        if up_to.is_some() && last.is_some() && last != up_to {
            tracing::error!(expected = ?last, got = ?up_to, "applied reported out of order");
        }
        if let Some(msg) = ack {
            out.push(Command::Send(msg));
        }
        self.check_inbound_done();
    }

    fn check_inbound_done(&mut self) {
        let now = self.now;
        let completed = self.applies_completed;
        let Some(link) = &mut self.link else { return };
        let inb = &mut link.inb;
        if inb.done || inb.caught_up_barrier.map_or(true, |b| completed < b) {
            return;
        }
        inb.done = true;
        self.ever_ready = true;
        self.stale = false;
        let info = ResyncInfo {
            kind: inb.kind,
            records: inb.records,
            duration_ms: now.saturating_sub(link.connected_at),
            at_ms: now,
            direction: Direction::Received,
        };
        tracing::info!(peer = %self.cfg.peer, kind = ?info.kind, records = info.records,
            duration_ms = info.duration_ms, "caught up with the peer");
        self.last_resync = Some(info.clone());
        self.last_resync_received = Some(info);
        self.resyncs += 1;
        self.maybe_clear_degraded();
    }
}
