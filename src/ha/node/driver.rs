//! The task that owns the HA engine: feeds it link events, local commits, ticks and role
//! changes, carries out the commands it returns against the database and the link, and
//! publishes the node's status and readiness after every step.
//!
//! Invariants: exactly one task owns the engine; database calls the engine asks for are made
//! here, in the order given, and fed back as events in order. Events that arrived together
//! are stepped as one batch, so the engine can merge their applies into one transaction.
//!
//! Applies are queued to the database without waiting for each to be done (on disk, with
//! FULL): while one is flushed the next is committed, and the peer's later messages are read
//! meanwhile. Their outcomes come back in the order queued and are fed to the engine as
//! `Applied`, in that order. The applies of one connection form one chain
//! ([`crate::db::ApplyChain`]): once one fails the database refuses the rest, so a position is
//! never stored past records that were not; the failure drops the link and the next
//! connection resyncs from the position stored.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

use super::*;
use crate::db::{ApplyChain, ApplyOutcome, PendingApply};
use crate::proto::peer::Chunker;

/// Peer messages taken from the link queue at once (stepped as one batch, their applies
/// merged by the engine).
pub(super) const LINK_DRAIN: usize = 64;

/// Records the database's snapshot reader hands over at once (it stays two such chunks
/// ahead of the link; the engine's chunker cuts the messages).
const SNAPSHOT_READ_CHUNK: usize = 2048;

/// Bytes of a snapshot file per `SnapshotPart` message (a third more as base64): small
/// enough that the peer stores one part while the next arrives.
const SNAPSHOT_PIECE_BYTES: usize = 1024 * 1024;

/// A snapshot read for the peer, held open until the engine sends it: records for a peer
/// that holds data, a file for one whose database is empty (see `Hello::empty`).
pub(super) enum OpenSnapshot {
    Records(crate::db::SnapshotStream),
    File(crate::db::SnapshotFile),
}

impl OpenSnapshot {
    fn header(&self) -> (Seq, u64) {
        match self {
            OpenSnapshot::Records(s) => (s.head, s.total),
            OpenSnapshot::File(f) => (f.head, f.total),
        }
    }
}

/// Most applies queued to the database and not yet done; the next waits for the oldest.
pub(super) const MAX_APPLYING: usize = 64;

/// An apply queued to the database, its outcome not yet fed to the engine.
pub(super) struct Applying {
    pending: PendingApply,
    what: Queued,
}

/// What the outcome of a queued apply is reported with.
pub(super) struct Queued {
    chain: ApplyChain,
    records: usize,
    peer_pos: Option<Seq>,
}

/// The oldest queued apply's outcome (outcomes come in the order queued).
fn next_applied(q: &mut VecDeque<Applying>) -> impl Future<Output = (Queued, Result<ApplyOutcome, DbError>)> + '_ {
    std::future::poll_fn(move |cx| {
        let Some(front) = q.front_mut() else { return Poll::Pending };
        let Poll::Ready(res) = Pin::new(&mut front.pending).poll(cx) else { return Poll::Pending };
        match q.pop_front() {
            Some(a) => Poll::Ready((a.what, res)),
            None => Poll::Pending,
        }
    })
}

/// The task that owns the engine.
pub(super) struct Driver {
    pub(super) engine: Engine,
    pub(super) db: DbHandle,
    pub(super) node: Arc<HaNode>,
    pub(super) writer: Option<mpsc::Sender<PeerMsg>>,
    pub(super) conn: Option<u64>,
    pub(super) waiters: std::collections::HashMap<engine::WaiterId, oneshot::Sender<()>>,
    pub(super) next_waiter: u64,
    /// A new connection met while draining the link queue: handled once every event before
    /// it is done, because it reads the position those events' applies store.
    pub(super) held: Option<Link>,
    pub(super) metrics: Metrics,
    /// The last resyncs counted in the metrics, one per direction.
    pub(super) seen_received: Option<engine::ResyncInfo>,
    pub(super) seen_sent: Option<engine::ResyncInfo>,
    /// Applies queued to the database, oldest first.
    pub(super) applying: VecDeque<Applying>,
    /// The chain of the current connection's applies (a new one for every connection).
    pub(super) chain: ApplyChain,
    /// The snapshot read for the peer, held open until the engine sends it.
    pub(super) snapshot: Option<OpenSnapshot>,
}

impl Driver {
    pub(super) async fn run(
        mut self,
        mut reqs: mpsc::Receiver<Req>,
        mut links: mpsc::Receiver<Link>,
        cancel: CancellationToken,
    ) {
        let head = self.db.watch_head();
        let mut changes = self.db.subscribe_changes();
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut events = std::collections::VecDeque::new();
        events.push_back(Event::Start { now: engine_now() });
        // Commits between the engine's start and the subscription: the engine reads them.
        events.push_back(Event::LocalCommitted { seq: *head.borrow(), change: None, now: engine_now() });
        loop {
            loop {
                if !events.is_empty() {
                    for c in self.engine.step_batch(std::mem::take(&mut events)) {
                        self.execute(c, &mut events).await;
                    }
                } else if let Some(l) = self.held.take() {
                    self.on_link(l, &mut events).await;
                } else {
                    break;
                }
            }
            self.publish();
            tokio::select! {
                _ = cancel.cancelled() => break,
                (a, res) = next_applied(&mut self.applying), if !self.applying.is_empty() => {
                    self.on_applied(a, res, &mut events);
                }
                _ = tick.tick() => {
                    let now = engine_now();
                    events.push_back(Event::WallClock { now, wall_ms: now_ms() });
                    events.push_back(Event::Tick { now });
                }
                r = changes.recv() => match r {
                    Ok(batch) => {
                        let now = engine_now();
                        for c in batch.iter() {
                            events.push_back(Event::LocalCommitted { seq: c.seq, change: Some(c.clone()), now });
                        }
                    }
                    // Fell behind: the engine reads the log up to the head instead.
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        events.push_back(Event::LocalCommitted { seq: *head.borrow(), change: None, now: engine_now() });
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                },
                Some(r) = reqs.recv() => match r {
                    Req::AwaitAck { seq, done } => {
                        self.next_waiter += 1;
                        let w = engine::WaiterId(self.next_waiter);
                        self.waiters.insert(w, done);
                        events.push_back(Event::AwaitAck { waiter: w, seq, now: engine_now() });
                    }
                    Req::Role(role) => events.push_back(Event::RoleChanged { role, now: engine_now() }),
                    Req::Ping(done) => {
                        let _ = done.send(());
                    }
                },
                Some(l) = links.recv() => {
                    self.on_link(l, &mut events).await;
                    // Take what else arrived, so that consecutive changes apply together.
                    for _ in 1..LINK_DRAIN {
                        match links.try_recv() {
                            Ok(l @ Link::Up { .. }) => {
                                self.held = Some(l);
                                break;
                            }
                            Ok(l) => self.on_link(l, &mut events).await,
                            Err(_) => break,
                        }
                    }
                }
            }
        }
        // Release every waiting client: the node is going away.
        for (_, w) in self.waiters.drain() {
            let _ = w.send(());
        }
    }

    async fn on_link(&mut self, l: Link, events: &mut std::collections::VecDeque<Event>) {
        match l {
            Link::Up { conn, hello, addr, writer } => {
                if self.conn.is_some() {
                    self.node.note_drop("replaced by a new connection");
                    events.push_back(Event::PeerDisconnected {
                        now: engine_now(),
                        reason: "replaced by a new connection".into(),
                    });
                }
                tracing::info!(peer = %hello.node, addr = %addr, head = hello.head.0, "peer link up");
                self.chain = ApplyChain(self.chain.0 + 1);
                self.snapshot = None;
                *self.node.handshake_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
                let pos = self.db.peer_position(&hello.db_id).await.ok().flatten().unwrap_or(Seq::ZERO);
                self.writer = Some(writer);
                self.conn = Some(conn);
                let now = engine_now();
                events.push_back(Event::WallClock { now, wall_ms: now_ms() });
                events.push_back(Event::PeerConnected { hello, our_position_for_them: pos, now });
            }
            Link::Msg { conn, msg } if Some(conn) == self.conn => {
                events.push_back(Event::PeerMessage { msg, now: engine_now() });
            }
            Link::Msg { .. } => {}
            Link::Down { conn, reason } if Some(conn) == self.conn => {
                tracing::warn!(%reason, "peer link down");
                self.drop_link(&reason, events);
            }
            Link::Down { .. } => {}
        }
    }

    async fn execute(&mut self, c: Command, events: &mut std::collections::VecDeque<Event>) {
        match c {
            Command::Send(m) => self.send(m).await,
            Command::ReadLog { after, limit } => match self.db.changes_since(after, limit).await {
                Ok(result) => events.push_back(Event::LogRead { after, result, now: engine_now() }),
                Err(e) => tracing::error!(error = %e, "reading the change log for the peer failed"),
            },
            Command::ReadSnapshot { as_file } => {
                let opened = if as_file {
                    self.db.snapshot_file(SNAPSHOT_PIECE_BYTES).await.map(OpenSnapshot::File)
                } else {
                    self.db.snapshot_stream(SNAPSHOT_READ_CHUNK).await.map(OpenSnapshot::Records)
                };
                match opened {
                    Ok(snapshot) => {
                        let (head, total) = snapshot.header();
                        events.push_back(Event::SnapshotRead { head, total, now: engine_now() });
                        self.snapshot = Some(snapshot);
                    }
                    Err(e) => tracing::error!(error = %e, "reading a snapshot for the peer failed"),
                }
            }
            Command::SendSnapshot { head, total, limit, bytes } => {
                if let Err(reason) = self.send_snapshot(head, total, limit, bytes).await {
                    tracing::error!(%reason, "sending a snapshot to the peer failed; dropping the link");
                    self.drop_link(&reason, events);
                }
            }
            Command::Apply { peer_db_id, records, peer_pos } => self.apply(peer_db_id, records, peer_pos, events).await,
            Command::StoreSnapshotPart { first, data } => {
                self.make_room(events).await;
                let what = Queued { chain: self.chain, records: 0, peer_pos: None };
                let queued = self.db.queue_snapshot_part(self.chain, first, data).await;
                self.queued(what, queued, events);
            }
            Command::LoadSnapshot { peer_db_id, head } => {
                self.make_room(events).await;
                let what = Queued { chain: self.chain, records: 0, peer_pos: Some(head) };
                let queued = self.db.queue_snapshot_load(self.chain, peer_db_id, head).await;
                self.queued(what, queued, events);
            }
            Command::ReleaseWaiters { waiters, outcome } => {
                for w in waiters {
                    if let Some(tx) = self.waiters.remove(&w) {
                        let _ = tx.send(());
                    }
                }
                match outcome {
                    engine::AckOutcome::TimedOut => {
                        tracing::warn!("the peer did not acknowledge in time; continuing alone (degraded)")
                    }
                    engine::AckOutcome::Degraded => {
                        tracing::debug!("peer link down; answering without its acknowledgement (degraded)")
                    }
                    _ => {}
                }
            }
            Command::Disconnect { reason } => {
                tracing::warn!(%reason, "dropping the peer link");
                if self.conn.is_some() {
                    self.node.note_drop(&reason);
                }
                self.writer = None;
                self.conn = None;
                self.snapshot = None;
            }
            Command::ReconcileAgents => self.node.request_reconcile(),
        }
    }

    async fn send(&mut self, m: PeerMsg) {
        if let Some(w) = &self.writer {
            if w.send(m).await.is_err() {
                self.writer = None;
            }
        }
    }

    /// Streams the snapshot opened for the engine to the peer, cut into messages as it is
    /// read. An error means the peer must not see the snapshot's end.
    async fn send_snapshot(&mut self, head: Seq, total: u64, limit: usize, bytes: usize) -> Result<(), String> {
        let stream = match self.snapshot.take() {
            Some(s) if s.header() == (head, total) => s,
            Some(s) => {
                let (h, t) = s.header();
                return Err(format!("the snapshot open is at {h} ({t} records), not {head} ({total})"));
            }
            None => return Err("no snapshot open".into()),
        };
        self.send(PeerMsg::SnapshotBegin { head, total }).await;
        let mut stream = match stream {
            OpenSnapshot::Records(s) => s,
            OpenSnapshot::File(mut file) => {
                let mut sent = 0u64;
                while let Some(piece) = file.next_piece().await {
                    let data = piece.map_err(|e| format!("reading the snapshot file: {e}"))?;
                    sent += data.len() as u64;
                    self.send(PeerMsg::SnapshotPart { data: crate::proto::peer::Base64Bytes(data) }).await;
                    if self.writer.is_none() {
                        return Ok(());
                    }
                }
                tracing::debug!(bytes = sent, records = total, "snapshot sent as a file");
                self.send(PeerMsg::SnapshotEnd { head }).await;
                return Ok(());
            }
        };
        let mut chunker = Chunker::new(limit, bytes);
        let mut sent = 0u64;
        while let Some(part) = stream.next_chunk().await {
            for r in part.map_err(|e| format!("reading the snapshot: {e}"))? {
                sent += 1;
                if let Some(records) = chunker.push(r) {
                    self.send(PeerMsg::SnapshotChunk { records }).await;
                }
            }
            if self.writer.is_none() {
                return Ok(());
            }
        }
        if let Some(records) = chunker.finish() {
            self.send(PeerMsg::SnapshotChunk { records }).await;
        }
        if sent != total {
            return Err(format!("the snapshot held {sent} records, its header said {total}"));
        }
        self.send(PeerMsg::SnapshotEnd { head }).await;
        Ok(())
    }

    /// Forgets the current peer link, gone or dropped for `reason` (the engine is told it
    /// went down). An open snapshot goes too: it keeps a read transaction, and the log
    /// behind it.
    fn drop_link(&mut self, reason: &str, events: &mut VecDeque<Event>) {
        if self.conn.is_none() {
            return;
        }
        self.node.note_drop(reason);
        events.push_back(Event::PeerDisconnected { now: engine_now(), reason: reason.to_string() });
        self.writer = None;
        self.conn = None;
        self.snapshot = None;
    }

    /// Queues one (merged) apply, one transaction; its `Applied` follows once it is done.
    async fn apply(
        &mut self,
        peer_db_id: String,
        records: Vec<crate::model::Record>,
        peer_pos: Option<Seq>,
        events: &mut VecDeque<Event>,
    ) {
        self.make_room(events).await;
        let n = records.len();
        let pos = match peer_pos {
            Some(p) => crate::db::PositionUpdate::Set(p),
            None => crate::db::PositionUpdate::Keep,
        };
        let what = Queued { chain: self.chain, records: n, peer_pos };
        let queued = self.db.queue_apply(self.chain, peer_db_id, records, pos).await;
        self.queued(what, queued, events);
    }

    /// Waits until fewer than [`MAX_APPLYING`] applies are queued.
    async fn make_room(&mut self, events: &mut VecDeque<Event>) {
        while self.applying.len() >= MAX_APPLYING {
            let (a, res) = next_applied(&mut self.applying).await;
            self.on_applied(a, res, events);
        }
    }

    /// Keeps an apply just queued (or reports it failed) for its outcome.
    fn queued(&mut self, what: Queued, queued: Result<PendingApply, DbError>, events: &mut VecDeque<Event>) {
        match queued {
            Ok(pending) => self.applying.push_back(Applying { pending, what }),
            Err(e) => self.on_applied(what, Err(e), events),
        }
    }

    /// Feeds a queued apply's outcome to the engine: `Applied`, after dropping the link if it
    /// failed on the current connection.
    fn on_applied(&mut self, a: Queued, res: Result<ApplyOutcome, DbError>, events: &mut VecDeque<Event>) {
        let (n, peer_pos) = (a.records, a.peer_pos);
        match res {
            Ok(out) => {
                for c in &out.conflicts {
                    tracing::warn!(
                        session_id = %c.local.id, local = %c.local.version, remote = %c.remote.version,
                        local_base = ?c.local.base.as_ref().map(|v| v.to_string()),
                        remote_base = ?c.remote.base.as_ref().map(|v| v.to_string()), winner = ?c.winner,
                        "concurrent changes to one session (neither was based on the other); an end wins, else the newer version"
                    );
                }
                for r in &out.deletes_kept {
                    tracing::warn!(
                        session_id = %r.id, version = %r.version,
                        "the session was ended on one master and changed on the other while they were apart; it stays ended"
                    );
                }
                tracing::trace!(records = n, ?peer_pos, "applied peer changes");
                events.push_back(Event::Applied { up_to: peer_pos, now: engine_now() });
            }
            Err(e) => {
                let now = engine_now();
                if a.chain == self.chain && self.conn.is_some() {
                    tracing::error!(error = %e, "applying the peer's changes failed; dropping the link to resync");
                    self.drop_link(&format!("apply failed: {e}"), events);
                } else {
                    tracing::debug!(error = %e, records = n, "an apply of a dropped link was not done");
                }
                // Nothing of it was stored. The engine counts the link as down first, so this
                // only keeps its apply queue in step; no position is acknowledged.
                events.push_back(Event::Applied { up_to: peer_pos, now });
            }
        }
    }

    fn publish(&mut self) {
        let st = self.engine.status();
        let readiness = st.readiness;
        // Each direction completes at most once per connection, and status is published
        // after every batch of events, so comparing with the last one seen misses none.
        for (now, seen) in
            [(&st.last_resync_received, &mut self.seen_received), (&st.last_resync_sent, &mut self.seen_sent)]
        {
            if let Some(r) = now.as_ref().filter(|r| Some(*r) != seen.as_ref()) {
                self.metrics.resync(resync_kind(r), resync_direction(r), r.duration_ms as f64 / 1000.0);
                *seen = Some(r.clone());
            }
        }
        *self.node.status.lock().unwrap_or_else(|p| p.into_inner()) = Some(st);
        if self.node.readiness.send_if_modified(|r| std::mem::replace(r, readiness) != readiness) {
            *self.node.caught_up_since.lock().unwrap_or_else(|p| p.into_inner()) =
                (readiness == Readiness::CaughtUp).then(std::time::Instant::now);
        }
    }
}
