//! Simulation of two masters: two engines, two in-memory stores merging like the database
//! (last writer wins, a delete written again over a concurrent newer change) with their
//! own change logs, and a network the test controls (deliver, partition, heal, restart a
//! node keeping or losing its store). The network behaves like TCP: a connection delivers
//! everything in order or breaks; a partition holds messages back (and usually ends in a
//! timeout on both sides), it never drops single messages of a live connection. A property test runs random operation sequences, heals
//! everything, runs to quiescence and checks the replication invariants:
//! - both stores hold identical records (same versions, same tombstones);
//! - each store has applied the other's whole log;
//! - every write whose waiter was released `Acked` is on both nodes (unless both copies were
//!   lost by wiping the two nodes one after the other, which is two failures);
//! - both nodes are ready and streaming.
//!
//! Each node also has its own wall clock, `now` plus an offset that operations change
//! (forward and back, within [`MAX_OFFSET_MS`] of the true time in one property test, far
//! beyond it in the examples); the engines run on the true monotonic time and learn the
//! wall clock from [`Event::WallClock`], as the peer-link task feeds them. The stores stamp
//! versions with the bounded hybrid clock of the real database and forget tombstones on the
//! shared clock, only while the two are in step ([`tombstone_clock_ms`]). The clock test also checks
//! that no tombstone is
//! forgotten before its retention (less twice the bound: each clock may be that far off),
//! that both stores forget the same tombstones, and that a write made after another write to
//! the same session was acknowledged always wins over it.

use super::*;
use crate::model::{Hlc, Session, SessionId, SessionStatus, Snapshot, Version};
use proptest::prelude::*;
use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

/// The simulated `/HA/max_clock_offset`.
const MAX_OFFSET_MS: u64 = 1_000;
/// The simulated `/HA/tombstone_retention`.
const RETENTION_MS: u64 = 10_000;
/// The true time the simulation starts at (any date: far enough from zero that no clock set
/// back, even by days, reads before it, which would make it stand still at zero).
const START_MS: u64 = 1_000 * DAY_MS as u64;
const DAY_MS: i64 = 86_400_000;

/// The test's database: records by id (merged like the real one), own change log, peer
/// positions.
#[derive(Clone, Debug)]
struct Store {
    node: NodeId,
    db_id: String,
    hlc: Hlc,
    records: BTreeMap<SessionId, Record>,
    log: VecDeque<Change>,
    head: Seq,
    positions: BTreeMap<String, Seq>,
    last_peer_db: Option<String>,
}

impl Store {
    fn new(node: &NodeId, db_id: String) -> Store {
        Store {
            node: node.clone(),
            db_id,
            hlc: Hlc::default(),
            records: BTreeMap::new(),
            log: VecDeque::new(),
            head: Seq::ZERO,
            positions: BTreeMap::new(),
            last_peer_db: None,
        }
    }

    fn oldest(&self) -> Seq {
        self.log.front().map(|c| c.seq).unwrap_or(self.head.next())
    }

    fn status(&self) -> DbStatus {
        DbStatus { db_id: self.db_id.clone(), head: self.head, oldest: self.oldest() }
    }

    /// A local write at wall clock `now`: new version, one log entry, in one step (one
    /// transaction); the clock is bounded as in the database.
    /// `None` for a live write over a tombstone, which the database refuses (an ended
    /// session is never live again).
    fn write(&mut self, id: SessionId, session: Option<Session>, now: u64) -> Option<Change> {
        if session.is_some() && self.records.get(&id).is_some_and(|r| r.is_tombstone()) {
            return None;
        }
        let own = self.hlc.capped(now, MAX_OFFSET_MS);
        let hlc = own.tick_bounded(self.records.get(&id).map(|r| r.version.hlc), now, MAX_OFFSET_MS);
        self.hlc = own.max(hlc.capped(now, MAX_OFFSET_MS));
        let base = self.records.get(&id).map(|r| r.version.clone());
        let record = Record { id: id.clone(), version: Version { hlc, node: self.node.clone() }, base, session };
        self.records.insert(id, record.clone());
        self.head = self.head.next();
        let change = Change { seq: self.head, record };
        self.log.push_back(change.clone());
        Some(change)
    }

    fn changes_since(&self, after: Seq, limit: usize) -> LogRead {
        if after.next() < self.oldest() && after < self.head {
            return LogRead::Truncated { oldest: self.oldest() };
        }
        LogRead::Changes(self.log.iter().filter(|c| c.seq > after).take(limit).cloned().collect())
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot { head: self.head, db_id: self.db_id.clone(), records: self.records.values().cloned().collect() }
    }

    /// Merges like the database; returns the deletes it wrote again (local changes).
    fn apply_remote(&mut self, peer_db: &str, records: Vec<Record>, peer_pos: Option<Seq>, now: u64) -> Vec<Change> {
        let mut kept = Vec::new();
        for r in records {
            self.hlc = self.hlc.observe_bounded(r.version.hlc, now, MAX_OFFSET_MS);
            let local = self.records.get(&r.id).cloned();
            let newer = local.as_ref().map_or(true, |old| r.version > old.version);
            let id = r.id.clone();
            if newer {
                self.records.insert(r.id.clone(), r.clone());
            }
            if local.is_some_and(|l| crate::db::merge::reasserts_delete(&l, &r)) {
                kept.extend(self.write(id, None, now));
            }
        }
        if let Some(pos) = peer_pos {
            self.positions.insert(peer_db.to_string(), pos);
            self.last_peer_db = Some(peer_db.to_string());
        }
        kept
    }

    /// Forgets tombstones older than the retention on `clock_ms`; returns them.
    fn gc(&mut self, clock_ms: Option<u64>) -> Vec<Record> {
        let Some(clock) = clock_ms else { return vec![] };
        let cutoff = clock.saturating_sub(RETENTION_MS);
        let old: Vec<SessionId> = self
            .records
            .values()
            .filter(|r| r.is_tombstone() && r.version.hlc.wall_ms < cutoff)
            .map(|r| r.id.clone())
            .collect();
        old.iter().filter_map(|id| self.records.remove(id)).collect()
    }

    fn truncate(&mut self, keep: usize) {
        while self.log.len() > keep {
            self.log.pop_front();
        }
    }

    /// Whether this store has `id` at `version` or newer.
    fn has(&self, id: &SessionId, version: &Version) -> bool {
        self.records.get(id).is_some_and(|r| r.version >= *version)
    }
}

#[derive(Debug)]
enum DbCmd {
    ReadLog { after: Seq, limit: usize },
    ReadSnapshot,
    Apply { peer_db_id: String, records: Vec<Record>, peer_pos: Option<Seq> },
}

struct Node {
    store: Store,
    engine: Engine,
    db_queue: VecDeque<DbCmd>,
    /// The connection this node believes it is on.
    link: Option<u64>,
    /// Outstanding waiters: the write each one waits for, and the peer's database then.
    waiters: BTreeMap<WaiterId, (SessionId, Version, String)>,
    /// The snapshot read last, held until the engine sends it (as the engine task holds
    /// the database's stream).
    snapshot: Option<Snapshot>,
}

fn names() -> [NodeId; 2] {
    [NodeId("a".into()), NodeId("b".into())]
}

fn engine_config(i: usize) -> EngineConfig {
    let n = names();
    EngineConfig {
        local: n[i].clone(),
        peer: n[1 - i].clone(),
        sync: SyncLevel::Ack,
        sync_timeout: Duration::from_millis(1000),
        startup_grace: Duration::from_millis(3000),
        heartbeat_interval: Duration::from_millis(100),
        peer_timeout: Duration::from_millis(500),
        config_digest: "same".into(),
        batch_limit: 3,
        batch_bytes: crate::proto::peer::BATCH_BYTES,
        max_inflight: 2,
        role: Role::Standby,
        max_clock_offset: Duration::from_millis(MAX_OFFSET_MS),
    }
}

fn session(id: &SessionId, n: u64) -> Session {
    Session {
        id: id.clone(),
        user: format!("user{n}"),
        subcluster: "default".into(),
        agent: "agent1".into(),
        agent_address: "10.0.0.5".into(),
        display: n as u32,
        vnc_port: 5900,
        status: SessionStatus::Running,
        created_ms: n,
        last_connect_ms: n,
        last_client_address: String::new(),
        pid: n as u32,
        command: vec![],
        geometry: "1024x768".into(),
        client_params: vec![],
    }
}

struct World {
    now: u64,
    nodes: [Node; 2],
    /// `wire[i]`: messages travelling towards node `i`, tagged with their connection.
    wire: [VecDeque<(u64, PeerMsg)>; 2],
    partitioned: bool,
    next_link: u64,
    next_db: u64,
    next_waiter: u64,
    writes: u64,
    /// Writes a client was told are on both nodes.
    acked: Vec<(SessionId, Version)>,
    /// Each node's wall clock minus the true time.
    clock: [i64; 2],
    /// When (true time) each tombstone was written.
    born: BTreeMap<(SessionId, Version), u64>,
    /// Clocks stay within the bound: the checks that need it are on.
    bounded: bool,
    /// Per session, the greatest version a client was told is on both nodes.
    acked_by_id: BTreeMap<SessionId, Version>,
    /// Per session, the newest tombstone a store forgot.
    forgotten: BTreeMap<SessionId, Version>,
}

impl World {
    fn new() -> World {
        let n = names();
        let node = |i: usize| {
            let store = Store::new(&n[i], format!("db{i}"));
            let mut engine = Engine::new(engine_config(i), store.status(), START_MS);
            engine.step(Event::Start { now: START_MS });
            Node { store, engine, db_queue: VecDeque::new(), link: None, waiters: BTreeMap::new(), snapshot: None }
        };
        World {
            now: START_MS,
            nodes: [node(0), node(1)],
            wire: [VecDeque::new(), VecDeque::new()],
            partitioned: false,
            next_link: 1,
            next_db: 2,
            next_waiter: 1,
            writes: 0,
            acked: vec![],
            clock: [0, 0],
            born: BTreeMap::new(),
            bounded: true,
            acked_by_id: BTreeMap::new(),
            forgotten: BTreeMap::new(),
        }
    }

    /// Node `i`'s wall clock.
    fn wall(&self, i: usize) -> u64 {
        (self.now as i64 + self.clock[i]).max(0) as u64
    }

    /// Sets node `i`'s wall clock to the true time plus `offset` (a jump either way).
    fn set_clock(&mut self, i: usize, offset: i64) {
        self.clock[i] = offset;
        // Two clocks each within half the bound of the true time are within the bound of
        // each other; beyond that the bounded checks no longer apply.
        if offset.unsigned_abs() > MAX_OFFSET_MS / 2 {
            self.bounded = false;
        }
        let (now, wall_ms) = (self.now, self.wall(i));
        self.feed(i, Event::WallClock { now, wall_ms });
    }

    /// Node `i`'s housekeeping: forget tombstones on the clock both nodes share.
    fn gc(&mut self, i: usize) {
        let shared = tombstone_clock_ms(self.wall(i), &self.nodes[i].engine.status());
        let now = self.now;
        for r in self.nodes[i].store.gc(shared) {
            if let Some(born) = self.born.get(&(r.id.clone(), r.version.clone())) {
                // Each clock may be half the bound off the true time: the tombstone's stamp
                // and the shared clock together by at most the bound.
                let age = now - born;
                assert!(
                    !self.bounded || age + MAX_OFFSET_MS >= RETENTION_MS,
                    "node {i} forgot tombstone {} after {age} ms (clocks {:?})",
                    r.id,
                    self.clock
                );
            }
            let forgotten = self.forgotten.entry(r.id.clone()).or_insert_with(|| r.version.clone());
            if r.version > *forgotten {
                *forgotten = r.version;
            }
        }
    }

    fn feed(&mut self, i: usize, event: Event) {
        self.feed_batch(i, vec![event]);
    }

    /// Events that arrive together, stepped as one batch as the node's engine task does
    /// with peer messages read at once (their applies merge).
    fn feed_batch(&mut self, i: usize, events: Vec<Event>) {
        let cmds = self.nodes[i].engine.step_batch(events);
        for cmd in cmds {
            self.exec(i, cmd);
        }
    }

    fn exec(&mut self, i: usize, cmd: Command) {
        match cmd {
            Command::Send(msg) => {
                if let Some(link) = self.nodes[i].link {
                    self.wire[1 - i].push_back((link, msg));
                }
            }
            Command::ReadLog { after, limit } => self.nodes[i].db_queue.push_back(DbCmd::ReadLog { after, limit }),
            Command::ReadSnapshot { .. } => self.nodes[i].db_queue.push_back(DbCmd::ReadSnapshot),
            Command::SendSnapshot { head, total, limit, bytes } => {
                let snapshot = self.nodes[i].snapshot.take().expect("asked to send a snapshot never read");
                assert_eq!((snapshot.head, snapshot.records.len() as u64), (head, total), "another snapshot");
                for m in crate::proto::peer::snapshot_messages(head, snapshot.records, limit, bytes) {
                    self.exec(i, Command::Send(m));
                }
            }
            Command::Apply { peer_db_id, records, peer_pos } => {
                self.nodes[i].db_queue.push_back(DbCmd::Apply { peer_db_id, records, peer_pos })
            }
            // The simulated nodes announce no empty database, so no snapshot comes as a file
            // (its load is tested on real databases: `db::tests`, `tests/ha.rs`).
            c @ (Command::StoreSnapshotPart { .. } | Command::LoadSnapshot { .. }) => {
                panic!("the simulation sends snapshots as chunks only, yet was asked to {c:?}")
            }
            Command::ReleaseWaiters { waiters, outcome } => {
                for w in waiters {
                    let write = self.nodes[i].waiters.remove(&w).expect("released an unknown waiter");
                    if outcome == AckOutcome::Acked {
                        // Acked means the peer has stored it, unless the peer's database
                        // was wiped after it sent the acknowledgement.
                        let (id, v, peer_db) = write;
                        let peer = &self.nodes[1 - i].store;
                        assert!(peer.has(&id, &v) || peer.db_id != peer_db, "{id} at {v} acked but not on the peer");
                        let newest = self.acked_by_id.entry(id.clone()).or_insert_with(|| v.clone());
                        if v > *newest {
                            *newest = v.clone();
                        }
                        self.acked.push((id, v));
                    }
                }
            }
            Command::Disconnect { .. } => self.close(i),
            Command::ReconcileAgents => {}
        }
    }

    /// Node `i` closes its connection; the other side notices unless partitioned.
    fn close(&mut self, i: usize) {
        let Some(link) = self.nodes[i].link.take() else {
            return;
        };
        self.wire[i].clear();
        let j = 1 - i;
        if !self.partitioned && self.nodes[j].link == Some(link) {
            self.nodes[j].link = None;
            self.wire[j].clear();
            let now = self.now;
            self.feed(j, Event::PeerDisconnected { reason: "closed by peer".into(), now });
        }
    }

    fn write(&mut self, i: usize, key: u8, delete: bool, inline: bool) {
        let Some((change, waiter)) = self.commit(i, key, delete) else { return };
        let (seq, now) = (change.seq, self.now);
        let change = inline.then_some(change);
        self.feed(i, Event::LocalCommitted { seq, change, now });
        self.feed(i, Event::AwaitAck { waiter, seq, now });
    }

    /// Writes of one group commit: the engine task gets their changes together.
    fn write_group(&mut self, i: usize, keys: &[u8]) {
        let now = self.now;
        let (mut commits, mut awaits) = (Vec::new(), Vec::new());
        for &key in keys {
            if let Some((change, waiter)) = self.commit(i, key, false) {
                let seq = change.seq;
                commits.push(Event::LocalCommitted { seq, change: Some(change), now });
                awaits.push(Event::AwaitAck { waiter, seq, now });
            }
        }
        self.feed_batch(i, commits);
        self.feed_batch(i, awaits);
    }

    /// One local write on node `i`'s store, and the waiter its client gets.
    fn commit(&mut self, i: usize, key: u8, delete: bool) -> Option<(Change, WaiterId)> {
        self.writes += 1;
        let id = SessionId(format!("s{key}"));
        let session = (!delete).then(|| session(&id, self.writes));
        let now = self.now;
        let wall = self.wall(i);
        // A write made after another write to the same session was acknowledged must win
        // over it, whatever the clocks say. Both nodes held the acknowledged write then; only
        // a store wiped since lacks it (a lost store, not a clock problem).
        let prev = self.acked_by_id.get(&id).filter(|v| self.nodes[i].store.has(&id, v)).cloned();
        let change = self.nodes[i].store.write(id.clone(), session, wall)?;
        let version = change.record.version.clone();
        if let Some(prev) = prev {
            assert!(version > prev, "write {id} at {version} issued after {prev} was acknowledged loses to it");
        }
        if delete {
            self.born.insert((id.clone(), version.clone()), now);
        }
        let waiter = WaiterId(self.next_waiter);
        self.next_waiter += 1;
        let peer_db = self.nodes[1 - i].store.db_id.clone();
        self.nodes[i].waiters.insert(waiter, (id, version, peer_db));
        Some((change, waiter))
    }

    /// Runs up to `n` queued database commands of node `i`; returns how many ran.
    fn db_step(&mut self, i: usize, n: usize) -> usize {
        let mut ran = 0;
        while ran < n {
            let Some(cmd) = self.nodes[i].db_queue.pop_front() else {
                break;
            };
            ran += 1;
            let (now, wall) = (self.now, self.wall(i));
            let store = &mut self.nodes[i].store;
            let mut kept = Vec::new();
            let event = match cmd {
                DbCmd::ReadLog { after, limit } => {
                    Event::LogRead { after, result: store.changes_since(after, limit), now }
                }
                DbCmd::ReadSnapshot => {
                    let snapshot = store.snapshot();
                    let (head, total) = (snapshot.head, snapshot.records.len() as u64);
                    self.nodes[i].snapshot = Some(snapshot);
                    Event::SnapshotRead { head, total, now }
                }
                DbCmd::Apply { peer_db_id, records, peer_pos } => {
                    kept = store.apply_remote(&peer_db_id, records, peer_pos, wall);
                    Event::Applied { up_to: peer_pos, now }
                }
            };
            // Deletes written again while merging are local commits like any other.
            for c in kept {
                let (seq, version) = (c.seq, c.record.version.clone());
                self.born.insert((c.record.id.clone(), version), now);
                self.feed(i, Event::LocalCommitted { seq, change: Some(c), now });
            }
            self.feed(i, event);
        }
        ran
    }

    /// Delivers up to `n` messages towards node `i`; returns how many were taken off the wire.
    fn deliver(&mut self, i: usize, n: usize) -> usize {
        if self.partitioned {
            return 0;
        }
        let mut moved = 0;
        let mut batch = Vec::new();
        while moved < n {
            let Some((link, msg)) = self.wire[i].pop_front() else {
                break;
            };
            moved += 1;
            if self.nodes[i].link == Some(link) {
                batch.push(Event::PeerMessage { msg, now: self.now });
            }
        }
        if !batch.is_empty() {
            self.feed_batch(i, batch);
        }
        moved
    }

    /// A new connection (replacing any the nodes still believe in), as the peer-link task
    /// does it: finish earlier database work, exchange hellos, look up positions.
    fn connect(&mut self) {
        if self.partitioned {
            return;
        }
        for i in 0..2 {
            while self.db_step(i, usize::MAX) > 0 {}
        }
        let now = self.now;
        for i in 0..2 {
            let wall_ms = self.wall(i);
            self.feed(i, Event::WallClock { now, wall_ms });
        }
        let link = self.next_link;
        self.next_link += 1;
        let hellos: Vec<Hello> = (0..2)
            .map(|i| {
                // As the real link does: the peer's log is named only with a stored position.
                let s = &self.nodes[i].store;
                match s.last_peer_db.as_ref().and_then(|d| Some((d.clone(), *s.positions.get(d)?))) {
                    Some((d, pos)) => self.nodes[i].engine.hello(Some(d), pos, now),
                    None => self.nodes[i].engine.hello(None, Seq::ZERO, now),
                }
            })
            .collect();
        for i in 0..2 {
            self.nodes[i].link = Some(link);
            self.wire[i].clear();
            // The real link remembers the peer's database id from its hello, before anything
            // of it is applied.
            self.nodes[i].store.last_peer_db = Some(hellos[1 - i].db_id.clone());
        }
        for i in 0..2 {
            if self.nodes[i].link != Some(link) {
                continue; // the other side refused and closed it
            }
            let hello = hellos[1 - i].clone();
            let pos = self.nodes[i].store.positions.get(&hello.db_id).copied().unwrap_or_default();
            self.feed(i, Event::PeerConnected { hello, our_position_for_them: pos, now });
        }
    }

    fn advance(&mut self, ms: u64) {
        self.now += ms;
        let now = self.now;
        for i in 0..2 {
            let wall_ms = self.wall(i);
            self.feed(i, Event::WallClock { now, wall_ms });
            self.feed(i, Event::Tick { now });
        }
    }

    /// Delivers messages and runs database work until nothing moves (no time passes).
    fn pump(&mut self) {
        loop {
            let moved = self.db_step(0, usize::MAX)
                + self.db_step(1, usize::MAX)
                + self.deliver(0, usize::MAX)
                + self.deliver(1, usize::MAX);
            if moved == 0 {
                break;
            }
        }
    }

    fn restart(&mut self, i: usize, wipe: bool) {
        self.close(i);
        self.wire[i].clear();
        self.nodes[i].db_queue.clear();
        self.nodes[i].waiters.clear();
        self.nodes[i].snapshot = None;
        self.now += 1;
        if wipe {
            // Losing this store is a failure; an acked write whose only other copy is gone
            // already was lost to two failures and is not checked.
            let other = &self.nodes[1 - i].store;
            self.acked.retain(|(id, v)| other.has(id, v));
            let db = format!("db{}", self.next_db);
            self.next_db += 1;
            self.nodes[i].store = Store::new(&names()[i], db);
        }
        let store = &self.nodes[i].store;
        self.nodes[i].engine = Engine::new(engine_config(i), store.status(), self.now);
        let (now, wall_ms) = (self.now, self.wall(i));
        self.feed(i, Event::WallClock { now, wall_ms });
        self.feed(i, Event::Start { now });
    }

    fn quiet(&self) -> bool {
        self.wire.iter().all(|w| w.is_empty()) && self.nodes.iter().all(|n| n.db_queue.is_empty())
    }

    fn converged(&self) -> bool {
        self.quiet()
            && self.nodes.iter().all(|n| {
                let st = n.engine.status();
                st.ready && st.link == LinkState::Streaming && st.peer_acked == st.local_head
            })
    }

    /// Heals the network and runs until both nodes are streaming with nothing in flight.
    fn settle(&mut self) {
        self.partitioned = false;
        for _round in 0..500 {
            self.pump();
            if self.converged() {
                return;
            }
            if self.nodes[0].link.is_none() && self.nodes[1].link.is_none() {
                self.connect();
            } else {
                self.advance(100);
            }
        }
        panic!("no convergence:\n{}", self.summary());
    }

    fn summary(&self) -> String {
        let mut out = format!("now={} partitioned={}\n", self.now, self.partitioned);
        for (i, n) in self.nodes.iter().enumerate() {
            let st = n.engine.status();
            out += &format!(
                "node {i}: link={:?} wire_in={} dbq={} | ready={} ({}) link={:?} head={} acked={} \
                 peer_head={} applied_of_peer={} degraded={} err={:?} | store db={} head={} oldest={} \
                 positions={:?} last_peer={:?} records={}\n",
                n.link,
                self.wire[i].len(),
                n.db_queue.len(),
                st.ready,
                st.readiness,
                st.link,
                st.local_head,
                st.peer_acked,
                st.peer_head,
                st.applied_of_peer,
                st.degraded,
                st.last_link_error,
                n.store.db_id,
                n.store.head,
                n.store.oldest(),
                n.store.positions,
                n.store.last_peer_db,
                n.store.records.len()
            );
        }
        out
    }

    /// Lets both clocks run past every shared clock used so far, then both nodes run their
    /// housekeeping at the same moment: afterwards they must hold the same tombstones.
    fn final_gc(&mut self) {
        self.advance(2 * MAX_OFFSET_MS);
        self.settle();
        self.gc(0);
        self.gc(1);
    }

    fn check(&self) {
        let (a, b) = (&self.nodes[0].store, &self.nodes[1].store);
        assert_eq!(a.records, b.records, "stores differ after convergence");
        assert_eq!(a.positions.get(&b.db_id).copied().unwrap_or_default(), b.head);
        assert_eq!(b.positions.get(&a.db_id).copied().unwrap_or_default(), a.head);
        // An acknowledged write is there, or superseded, or superseded by a tombstone that
        // has since been forgotten.
        let kept = |s: &Store, id: &SessionId, v: &Version| {
            s.has(id, v) || (!s.records.contains_key(id) && self.forgotten.get(id).is_some_and(|f| f >= v))
        };
        for (id, v) in &self.acked {
            assert!(kept(a, id, v) && kept(b, id, v), "acknowledged write {id} at {v} lost");
        }
    }
}

#[derive(Clone, Debug)]
enum Op {
    Write {
        node: usize,
        key: u8,
        delete: bool,
        inline: bool,
    },
    Deliver {
        to: usize,
        n: usize,
    },
    Db {
        node: usize,
        n: usize,
    },
    Advance {
        ms: u64,
    },
    Pump,
    Partition,
    Heal,
    Connect,
    Disconnect {
        node: usize,
    },
    Restart {
        node: usize,
        wipe: bool,
    },
    Truncate {
        node: usize,
        keep: usize,
    },
    /// Set the node's wall clock to the true time plus `offset` (a jump either way).
    Clock {
        node: usize,
        offset: i64,
    },
    /// The node's housekeeping forgets old tombstones.
    Gc {
        node: usize,
    },
    /// Several writes in one group commit.
    Group {
        node: usize,
        keys: Vec<u8>,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        10 => (0..2usize, 0..6u8, prop::bool::weighted(0.2), any::<bool>())
            .prop_map(|(node, key, delete, inline)| Op::Write { node, key, delete, inline }),
        8 => (0..2usize, 1..6usize).prop_map(|(to, n)| Op::Deliver { to, n }),
        6 => (0..2usize, 1..4usize).prop_map(|(node, n)| Op::Db { node, n }),
        3 => (1..700u64).prop_map(|ms| Op::Advance { ms }),
        4 => Just(Op::Pump),
        1 => Just(Op::Partition),
        2 => Just(Op::Heal),
        3 => Just(Op::Connect),
        1 => (0..2usize).prop_map(|node| Op::Disconnect { node }),
        1 => (0..2usize, prop::bool::weighted(0.4)).prop_map(|(node, wipe)| Op::Restart { node, wipe }),
        1 => (0..2usize, 0..3usize).prop_map(|(node, keep)| Op::Truncate { node, keep }),
        2 => (0..2usize, prop::collection::vec(0..6u8, 2..6)).prop_map(|(node, keys)| Op::Group { node, keys }),
    ]
}

/// Operations with clock jumps (within half the bound of the true time, so any two clocks
/// are within the bound) and housekeeping, and longer pauses so tombstones grow old.
fn op_with_clocks() -> impl Strategy<Value = Op> {
    let half = (MAX_OFFSET_MS / 2) as i64;
    prop_oneof![
        12 => op(),
        2 => (0..2usize, -half..=half).prop_map(|(node, offset)| Op::Clock { node, offset }),
        2 => (0..2usize).prop_map(|node| Op::Gc { node }),
        1 => (1_000..4_000u64).prop_map(|ms| Op::Advance { ms }),
    ]
}

fn run(ops: &[Op]) -> World {
    let mut w = World::new();
    for op in ops {
        match *op {
            Op::Write { node, key, delete, inline } => w.write(node, key, delete, inline),
            Op::Deliver { to, n } => {
                w.deliver(to, n);
            }
            Op::Db { node, n } => {
                w.db_step(node, n);
            }
            Op::Advance { ms } => {
                w.advance(ms);
                // The peer-link task reconnects on its own once the network allows.
                if w.nodes.iter().all(|n| n.link.is_none()) {
                    w.connect();
                }
            }
            Op::Pump => w.pump(),
            Op::Partition => w.partitioned = true,
            Op::Heal => w.partitioned = false,
            Op::Connect => w.connect(),
            Op::Disconnect { node } => {
                let now = w.now;
                w.feed(node, Event::PeerDisconnected { reason: "test".into(), now });
                w.close(node);
            }
            Op::Restart { node, wipe } => w.restart(node, wipe),
            Op::Truncate { node, keep } => w.nodes[node].store.truncate(keep),
            Op::Clock { node, offset } => w.set_clock(node, offset),
            Op::Gc { node } => w.gc(node),
            Op::Group { node, ref keys } => w.write_group(node, keys),
        }
    }
    w.settle();
    w.final_gc();
    w.check();
    if std::env::var("SIM_STATS").is_ok() {
        let st: Vec<_> = w.nodes.iter().map(|n| n.engine.status()).collect();
        eprintln!(
            "ops={} links={} writes={} acked={} resyncs={}/{} last={:?}/{:?} records={}",
            ops.len(),
            w.next_link - 1,
            w.writes,
            w.acked.len(),
            st[0].resyncs,
            st[1].resyncs,
            st[0].last_resync_received.as_ref().map(|r| r.kind),
            st[1].last_resync_received.as_ref().map(|r| r.kind),
            w.nodes[0].store.records.len()
        );
    }
    w
}

proptest! {
    // 64 cases by default; PROPTEST_CASES=5000 for a deeper search.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64),
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_histories_converge_and_keep_acknowledged_writes(
        ops in prop::collection::vec(op(), 1..120)
    ) {
        run(&ops);
    }

    #[test]
    fn skewed_and_jumping_clocks_within_the_bound_converge_and_forget_the_same_tombstones(
        ops in prop::collection::vec(op_with_clocks(), 1..150)
    ) {
        run(&ops);
    }
}

#[test]
fn writes_on_both_sides_of_a_partition_converge() {
    use Op::*;
    let w = run(&[
        Connect,
        Write { node: 0, key: 1, delete: false, inline: true },
        Partition,
        Write { node: 0, key: 2, delete: false, inline: true },
        Advance { ms: 10 },
        Write { node: 1, key: 2, delete: false, inline: false },
        Write { node: 1, key: 1, delete: true, inline: true },
        Advance { ms: 600 },
    ]);
    // The later writes (b's) win everywhere.
    let rec = &w.nodes[0].store.records[&SessionId("s2".into())];
    assert_eq!(rec.version.node, NodeId("b".into()));
    assert!(w.nodes[0].store.records[&SessionId("s1".into())].is_tombstone());
}

#[test]
fn acknowledged_write_survives_a_wiped_primary() {
    let mut w = World::new();
    w.connect();
    w.settle();
    w.write(0, 1, false, true);
    // Replicate and acknowledge.
    w.settle();
    assert_eq!(w.acked.len(), 1);
    // Primary reinstalled with an empty database; it must fetch everything back.
    w.restart(0, true);
    assert!(w.nodes[0].store.records.is_empty());
    w.settle();
    w.check();
    assert_eq!(w.nodes[0].store.records.len(), 1);
    let info = w.nodes[0].engine.status().last_resync_received.unwrap();
    assert_eq!(info.kind, ResyncKind::Snapshot);
}

#[test]
fn truncated_log_resyncs_by_snapshot() {
    let mut w = World::new();
    w.connect();
    w.settle();
    w.partitioned = true;
    w.advance(600);
    for k in 0..5 {
        w.write(1, k, false, true);
    }
    w.nodes[1].store.truncate(1);
    w.settle();
    w.check();
    let info = w.nodes[0].engine.status().last_resync_received.unwrap();
    assert_eq!((info.kind, info.records), (ResyncKind::Snapshot, 5));
}

#[test]
fn a_node_is_not_ready_while_its_peer_has_newer_data() {
    let mut w = World::new();
    w.connect();
    w.settle();
    w.partitioned = true;
    w.advance(600); // both notice the silence
    w.write(1, 3, false, true);
    w.partitioned = false;
    w.connect();
    // Connected, the peer has a change this node lacks: not ready until it is applied.
    assert!(!w.nodes[0].engine.is_ready());
    let mut steps = 0;
    while !w.quiet() {
        let moved = w.deliver(0, 1) + w.deliver(1, 1) + w.db_step(0, 1) + w.db_step(1, 1);
        steps += moved;
        if w.nodes[0].engine.is_ready() {
            assert!(w.nodes[0].store.records.contains_key(&SessionId("s3".into())));
        }
    }
    assert!(steps > 0);
    assert!(w.nodes[0].engine.is_ready());
}

#[test]
fn snapshot_interrupted_by_a_restart_is_redone() {
    let mut w = World::new();
    for k in 0..7 {
        w.write(0, k, false, true);
    }
    w.connect();
    // a reads its snapshot and sends it; b applies only the first chunk, then restarts.
    // One message at a time, so that each chunk is an apply of its own.
    w.db_step(0, 1);
    while w.deliver(1, 1) > 0 {}
    assert!(w.nodes[1].db_queue.len() > 3, "expected several chunk applies");
    // b's own snapshot read, then the first chunk.
    w.db_step(1, 2);
    assert_eq!(w.nodes[1].store.records.len(), 3);
    w.restart(1, false);
    w.settle();
    w.check();
    assert_eq!(w.nodes[1].store.records.len(), 7);
}

#[test]
fn wiped_node_whose_snapshot_is_interrupted_gets_a_full_snapshot_again() {
    let mut w = World::new();
    for k in 0..7 {
        w.write(0, k, false, true);
    }
    w.connect();
    w.settle();
    // a is reinstalled; its own old writes now live only on b, outside b's change log.
    w.restart(0, true);
    w.connect();
    w.db_step(1, usize::MAX); // b reads its snapshot for a
    while w.deliver(0, 1) > 0 {} // one chunk per apply
    w.db_step(0, 2); // a's own snapshot read, then b's first chunk
    assert_eq!(w.nodes[0].store.records.len(), 3);
    // a restarts (keeping its store): the rest of the snapshot is lost.
    w.restart(0, false);
    w.settle();
    w.check();
    assert_eq!(w.nodes[0].store.records.len(), 7);
}

#[test]
fn a_master_days_ahead_does_not_poison_the_peer_or_outlive_its_fix() {
    let mut w = World::new();
    w.connect();
    w.settle();
    w.set_clock(0, 10 * DAY_MS);
    w.advance(100);
    w.settle();
    let st = w.nodes[1].engine.status();
    assert!(st.clock_offset_exceeded, "{st:?}");
    assert!(st.clock_offset_ms.unwrap() > 9 * DAY_MS);
    assert!(w.nodes[0].engine.status().clock_offset_exceeded);
    // Writes on both sides while a's clock is ten days ahead.
    w.write(0, 1, false, true);
    w.write(1, 2, false, true);
    w.settle();
    w.write(1, 2, true, true); // b deletes its session: a fresh tombstone
    w.write(0, 3, false, true);
    w.settle();
    // b's clock did not follow a's records beyond the bound.
    let b_wall = w.wall(1);
    assert!(w.nodes[1].store.hlc.wall_ms <= b_wall + MAX_OFFSET_MS, "b's clock was dragged along");
    let b_tomb = w.nodes[1].store.records[&SessionId("s2".into())].clone();
    assert!(b_tomb.is_tombstone() && b_tomb.version.hlc.wall_ms <= b_wall + MAX_OFFSET_MS);
    // a's housekeeping, ten days ahead, keeps b's fresh tombstone: ages are measured on the
    // earlier of the two clocks.
    w.gc(0);
    w.gc(1);
    assert!(w.nodes[0].store.records.contains_key(&SessionId("s2".into())), "fresh tombstone forgotten");
    // a's clock is set right: its next writes are stamped by it again (at most the bound
    // ahead), not ten days in the future, and the alarm clears.
    w.set_clock(0, 0);
    w.advance(100);
    w.settle();
    assert!(!w.nodes[1].engine.status().clock_offset_exceeded);
    w.write(0, 4, false, true);
    let v = w.nodes[0].store.records[&SessionId("s4".into())].version.clone();
    assert!(v.hlc.wall_ms <= w.wall(0) + MAX_OFFSET_MS, "{v}");
    // A session a wrote while ahead is still updated in order by either node.
    w.write(1, 1, false, true);
    let r = &w.nodes[1].store.records[&SessionId("s1".into())];
    assert_eq!(r.version.node, NodeId("b".into()));
    w.settle();
    w.final_gc();
    w.check();
}

#[test]
fn a_master_an_hour_behind_keeps_tombstones_as_long_as_its_peer() {
    let mut w = World::new();
    w.connect();
    w.settle();
    w.set_clock(1, -3_600_000);
    w.advance(100);
    w.settle();
    for k in 0..4 {
        w.write(k as usize % 2, k, false, true);
    }
    w.settle();
    for k in 0..4 {
        w.write(k as usize % 2, k, true, true);
    }
    w.settle();
    let tombs = |w: &World, i: usize| w.nodes[i].store.records.values().filter(|r| r.is_tombstone()).count();
    // Before the retention: both keep all four, whichever clock is wrong.
    w.advance(RETENTION_MS / 2);
    w.settle();
    w.gc(0);
    w.gc(1);
    assert_eq!((tombs(&w, 0), tombs(&w, 1)), (4, 4));
    // After it, measured on the clock behind plus the hour: both forget the same ones.
    w.advance(RETENTION_MS + 3_600_000);
    w.settle();
    w.gc(0);
    w.gc(1);
    assert_eq!((tombs(&w, 0), tombs(&w, 1)), (0, 0));
    w.check();
}

#[test]
fn clocks_jumping_back_and_forth_beyond_the_bound_still_converge() {
    let mut w = World::new();
    w.connect();
    w.settle();
    for (k, offset) in [(0u8, 3_600_000i64), (1, -3_600_000), (2, 0), (3, -DAY_MS), (4, 5 * DAY_MS)] {
        w.set_clock((k % 2) as usize, offset);
        w.advance(150);
        w.write(0, k, false, true);
        w.write(1, k, k % 2 == 0, true);
        w.partitioned = k % 2 == 1;
        w.advance(700);
        w.write(0, k + 1, true, false);
        w.settle();
    }
    w.set_clock(0, 0);
    w.set_clock(1, 0);
    w.settle();
    w.final_gc();
    w.check();
}

/// The shrunk cases the property tests found (their seeds are in
/// `proptest-regressions/ha/engine/sim.txt`, but a seed replays another case once the
/// operation strategy changes, so the cases themselves are kept here).
#[test]
fn cases_the_property_tests_found_stay_fixed() {
    use Op::*;
    let cases: Vec<(&str, Vec<Op>)> = vec![
        ("567f537d", vec![Connect, Partition, Db { node: 0, n: 1 }]),
        ("f7c84975", vec![Advance { ms: 1 }, Write { node: 1, key: 0, delete: false, inline: false }, Pump]),
        (
            "13e69358",
            vec![
                Write { node: 1, key: 3, delete: false, inline: false },
                Write { node: 1, key: 1, delete: false, inline: false },
                Write { node: 1, key: 0, delete: false, inline: false },
                Write { node: 1, key: 2, delete: false, inline: false },
                Connect,
                Db { node: 1, n: 1 },
                Deliver { to: 0, n: 2 },
                Connect,
            ],
        ),
        (
            "b2ebf2aa",
            vec![
                Advance { ms: 1 },
                Pump,
                Write { node: 0, key: 0, delete: false, inline: true },
                Deliver { to: 1, n: 1 },
                Partition,
                Pump,
                Restart { node: 1, wipe: true },
            ],
        ),
        (
            "7be6f0fc",
            vec![
                Write { node: 0, key: 0, delete: false, inline: false },
                Write { node: 0, key: 1, delete: false, inline: false },
                Advance { ms: 1 },
                Pump,
                Write { node: 0, key: 3, delete: false, inline: true },
                Deliver { to: 1, n: 1 },
                Write { node: 1, key: 2, delete: false, inline: false },
                Restart { node: 0, wipe: true },
                Connect,
                Db { node: 1, n: 1 },
                Deliver { to: 0, n: 2 },
                Advance { ms: 500 },
            ],
        ),
        (
            "c167b302",
            vec![
                Connect,
                Write { node: 1, key: 5, delete: false, inline: false },
                Db { node: 0, n: 1 },
                Write { node: 0, key: 0, delete: false, inline: false },
                Write { node: 0, key: 5, delete: true, inline: false },
                Deliver { to: 1, n: 2 },
                Advance { ms: 2347 },
                Advance { ms: 3681 },
                Partition,
                Advance { ms: 3973 },
                Gc { node: 0 },
            ],
        ),
        (
            "f5be3f98",
            vec![
                Write { node: 0, key: 4, delete: false, inline: false },
                Advance { ms: 1000 },
                Pump,
                Write { node: 0, key: 0, delete: false, inline: false },
                Restart { node: 0, wipe: true },
                Write { node: 0, key: 4, delete: true, inline: false },
                Heal,
                Advance { ms: 3175 },
                Db { node: 1, n: 1 },
                Deliver { to: 0, n: 3 },
                Advance { ms: 3071 },
                Advance { ms: 2537 },
                Advance { ms: 1218 },
                Deliver { to: 0, n: 1 },
                Gc { node: 0 },
            ],
        ),
        (
            "00eb6c7e",
            vec![
                Write { node: 1, key: 0, delete: false, inline: false },
                Clock { node: 1, offset: -26 },
                Write { node: 1, key: 4, delete: false, inline: false },
                Advance { ms: 1 },
                Pump,
                Restart { node: 1, wipe: true },
                Write { node: 1, key: 0, delete: false, inline: false },
                Write { node: 0, key: 1, delete: false, inline: false },
            ],
        ),
    ];
    for (seed, ops) in cases {
        let outcome = std::panic::catch_unwind(|| run(&ops));
        assert!(outcome.is_ok(), "the case of seed {seed} fails again");
    }
}
