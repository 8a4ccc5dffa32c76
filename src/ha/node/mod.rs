//! The HA node: the only HA code with sockets and the database. It owns the peer link (one
//! TCP connection, Noise PSK with `/HA/secret_file`), drives the sans-IO [`Engine`] with
//! events, and carries out the commands it returns. The peer link is in [`link`], the task
//! that owns the engine in [`driver`], the status view in [`status`]; this module starts the
//! link and the driver and answers for the node.
//!
//! Which side dials: the node whose id sorts first connects, the other accepts, so there is
//! never more than one link; a second connection replaces the first.
//!
//! Invariants:
//! - Nothing received from a connection is handed to the engine before the secure handshake
//!   proved the shared secret; a peer with the wrong secret is logged with its address and
//!   shown in the status (`link_error`) until a link comes up.
//! - The first hello after a start names the peer database applied furthest (from the
//!   database), so a restart resyncs incrementally instead of by full snapshot.
//! - Exactly one task owns the engine; database calls the engine asks for are made by that
//!   task and their results fed back as events, in order.
//! - With HA off (disabled or fallback) the node is always active, and a write is safe to
//!   report as soon as it is committed locally. Disabled is ready (`Standalone`); fallback,
//!   HA configured but unable to start, is its own state that is not ready
//!   (`HaConfiguredOff`), so the tools and the broker never pass it off as a single master.
//! - The readiness watch changes only in the engine task, right after the engine stepped, so
//!   whoever waits on it sees the engine's own decision.
//! - Commands run in the order the engine gives them, each database call fed back as its
//!   event. Peer messages that arrived together are stepped as one batch
//!   ([`Engine::step_batch`]), so the engine merges their applies into one transaction; its
//!   `Applied` follows only after that transaction committed.
//! - Local commits reach the engine with their change (published by the database after the
//!   commit), so the hot path does not read the change log back.
//! - The engine task and the peer link run on the database thread's runtime
//!   ([`DbHandle::runtime`]), and so does a commit that waits for the peer's acknowledgement:
//!   the database's answers, the peer's records and its acknowledgements reach them without a
//!   thread hand-over. None of them blocks.

use super::engine::{self, Command, Engine, EngineConfig, Event};
use super::handle::{commit_locally, AdoptionGate, CommitFuture, Digest, HaControl, Replication};
use super::resolve::{resolve_nodes, HaMode, MatchedBy, SystemHostEnv};
use crate::config::{Config, SyncLevel};
use crate::db::{DbError, DbHandle, Write};
use crate::metrics::Metrics;
use crate::model::{now_ms, NodeId, Readiness, Role, Seq};
use crate::proto::api::{HaStatusView, LinkDropView, VrrpState};
use crate::proto::listen::{self, Limits};
use crate::proto::peer;
use crate::proto::peer::{Hello, PeerMsg, PROTOCOL_VERSION};
use crate::proto::secure::{accept, connect, Secret};
use crate::proto::ProtoError;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::proto::secure::PROLOGUE_PEER as PEER_PROLOGUE;

mod driver;
mod link;
mod status;

use driver::Driver;
use link::{accept_loop, dial_loop, ConnCounter, HelloSource, LinkCtx};
// The driver counts resyncs in the metrics under the names the status view shows.
use status::{resync_direction, resync_kind};

/// The outcome of node resolution plus how to reach the peer.
#[derive(Clone, Debug)]
pub struct HaSetup {
    pub mode: HaMode,
    /// `host:port` of the peer's HA port.
    pub peer_addr: Option<String>,
}

impl HaSetup {
    /// Decides the HA mode from the configuration and this host; `peer_addr` overrides where
    /// the peer is reached (tests and the demo run both nodes on one host).
    pub fn resolve(cfg: &Config, peer_addr: Option<String>) -> HaSetup {
        let mode = resolve_nodes(&cfg.ha, &SystemHostEnv);
        let peer_addr = match (&mode, peer_addr) {
            (HaMode::Enabled { .. }, Some(a)) => Some(a),
            (HaMode::Enabled { remote_host, .. }, None) => Some(format!("{remote_host}:{}", cfg.ha.port)),
            _ => None,
        };
        HaSetup { mode, peer_addr }
    }

    pub fn describe(&self) -> String {
        match &self.mode {
            HaMode::Disabled => "off (/HA/enabled is false)".into(),
            HaMode::Fallback { reason } => format!("off: {reason}"),
            HaMode::Enabled { local, remote, via, .. } => {
                format!(
                    "on: this node is {local}, peer {remote} at {} (matched by {})",
                    self.peer_addr.as_deref().unwrap_or("?"),
                    matched_by(via)
                )
            }
        }
    }

    /// This node's id: its `/HA/nodes` entry, or the host name when HA is off.
    pub fn local_node_id(&self) -> NodeId {
        match &self.mode {
            HaMode::Enabled { local, .. } => local.clone(),
            _ => NodeId(
                nix::unistd::gethostname()
                    .ok()
                    .and_then(|h| h.into_string().ok())
                    .unwrap_or_else(|| "standalone".into()),
            ),
        }
    }
}

fn matched_by(m: &MatchedBy) -> String {
    match m {
        MatchedBy::Hostname => "host name".into(),
        MatchedBy::Address(a) => format!("address {a}"),
        MatchedBy::Override => "/HA/local_node".into(),
    }
}

/// The engine's clock: monotonic milliseconds, anchored at the wall clock when first read
/// (so it reads like Unix ms). Its timers never stall or fire early when the wall clock is
/// set back or forward; the wall clock reaches the engine separately ([`Event::WallClock`]).
fn engine_now() -> u64 {
    static ANCHOR: OnceLock<(std::time::Instant, u64)> = OnceLock::new();
    let (at, wall) = ANCHOR.get_or_init(|| (std::time::Instant::now(), now_ms()));
    wall.saturating_add(u64::try_from(at.elapsed().as_millis()).unwrap_or(u64::MAX))
}

/// Requests from handles to the engine task.
enum Req {
    AwaitAck {
        seq: Seq,
        done: oneshot::Sender<()>,
    },
    Role(Role),
    /// Answered by the engine task between two events: it is alive and not stuck.
    Ping(oneshot::Sender<()>),
}

/// Messages from connection tasks to the engine task.
enum Link {
    Up { conn: u64, hello: Hello, addr: String, writer: mpsc::Sender<PeerMsg> },
    Msg { conn: u64, msg: PeerMsg },
    Down { conn: u64, reason: String },
}

pub struct HaNode {
    setup: HaSetup,
    cfg: Arc<Config>,
    db: DbHandle,
    role: watch::Sender<Role>,
    /// Whether an HA manager ever told this node its role (`tlctl ha notify`). Until one
    /// does, the node cannot tell a standby from an active master without the hook.
    role_told: std::sync::atomic::AtomicBool,
    reconcile: watch::Sender<u64>,
    /// `None` with HA off.
    engine_tx: Option<mpsc::Sender<Req>>,
    status: Arc<Mutex<Option<engine::EngineStatus>>>,
    /// Why the node is (not) ready, published by the engine task after every step.
    readiness: watch::Sender<Readiness>,
    /// Since when the node is caught up with its peer without a break (`None` while not).
    caught_up_since: Mutex<Option<std::time::Instant>>,
    /// The last failed secure handshake with the peer (wrong secret, wrong link kind); such a
    /// connection never reaches the engine, so status shows it from here. Cleared on link up.
    handshake_error: HandshakeError,
    /// The last drop of an established link (see [`LinkDropView`]).
    last_drop: Mutex<Option<LinkDropView>>,
    done: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

type HandshakeError = Arc<Mutex<Option<String>>>;

/// Why HA could not start: the daemon stops (the configuration checks passed, so this is the
/// machine's state: a secret file, the database).
#[derive(Debug, thiserror::Error)]
pub enum HaStartError {
    #[error("/HA/secret_file: {0}")]
    Secret(ProtoError),
    #[error("HA is on but no listener for /HA/port was bound")]
    NoPeerListener,
    #[error("/HA/port: {0}")]
    Listener(String),
    #[error("{0}")]
    Db(#[from] crate::db::DbError),
}

/// The engine's settings from the configuration; the engine itself never sees `Config`.
fn engine_config(local: NodeId, peer: NodeId, cfg: &Config) -> EngineConfig {
    let ha = &cfg.ha;
    EngineConfig {
        local,
        peer,
        sync: ha.sync,
        sync_timeout: ha.sync_timeout,
        startup_grace: ha.startup_grace,
        heartbeat_interval: ha.heartbeat_interval,
        peer_timeout: ha.peer_timeout,
        config_digest: cfg.digest_cluster(),
        batch_limit: engine::DEFAULT_BATCH_LIMIT,
        batch_bytes: peer::BATCH_BYTES,
        max_inflight: engine::DEFAULT_MAX_INFLIGHT,
        role: Role::Standby,
        max_clock_offset: ha.max_clock_offset,
    }
}

fn note_handshake_error(slot: &HandshakeError, peer: &str, e: &crate::proto::ProtoError) {
    *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(format!("peer {peer}: {e}"));
}

impl HaNode {
    /// Starts the HA side of the node: with HA on, the engine task and the peer link tasks.
    pub async fn start(
        setup: HaSetup,
        cfg: Arc<Config>,
        db: DbHandle,
        peer_listener: Option<TcpListener>,
        cancel: CancellationToken,
        tracker: &TaskTracker,
        metrics: Metrics,
    ) -> Result<Arc<HaNode>, HaStartError> {
        let standalone = !matches!(setup.mode, HaMode::Enabled { .. });
        let role = watch::channel(if standalone { Role::Active } else { Role::Standby }).0;
        let reconcile = watch::channel(0u64).0;
        let status = Arc::new(Mutex::new(None));
        let readiness = watch::channel(match setup.mode {
            HaMode::Disabled => Readiness::Standalone,
            HaMode::Fallback { .. } => Readiness::HaConfiguredOff,
            HaMode::Enabled { .. } => Readiness::Starting,
        })
        .0;
        if standalone {
            return Ok(Arc::new(HaNode {
                setup,
                cfg,
                db,
                role,
                role_told: Default::default(),
                reconcile,
                engine_tx: None,
                status,
                readiness,
                caught_up_since: Mutex::new(None),
                handshake_error: Default::default(),
                last_drop: Mutex::new(None),
                done: Mutex::new(None),
            }));
        }
        let HaMode::Enabled { local, remote, .. } = setup.mode.clone() else { unreachable!("checked above") };
        let secret = Secret::from_file(&cfg.ha.secret_file).map_err(HaStartError::Secret)?;
        let peer_listener = peer_listener.ok_or(HaStartError::NoPeerListener)?;
        let st = db.status().await?;
        let ecfg = engine_config(local.clone(), remote.clone(), &cfg);
        let engine = Engine::new(
            ecfg,
            engine::DbStatus { db_id: st.db_id.clone(), head: st.head, oldest: st.oldest },
            engine_now(),
        );
        let (req_tx, req_rx) = mpsc::channel(4096);
        let (link_tx, link_rx) = mpsc::channel(4096);
        let node = Arc::new(HaNode {
            setup: setup.clone(),
            cfg: cfg.clone(),
            db: db.clone(),
            role,
            role_told: Default::default(),
            reconcile,
            engine_tx: Some(req_tx),
            status: status.clone(),
            readiness,
            caught_up_since: Mutex::new(None),
            handshake_error: Default::default(),
            last_drop: Mutex::new(None),
            done: Mutex::new(None),
        });
        let hello_src = HelloSource {
            db: db.clone(),
            local: local.clone(),
            digest: cfg.digest_cluster(),
            // After a restart, the peer log we applied last is only known from the database;
            // without it our first hello would ask for a full snapshot on every restart.
            last_peer: Arc::new(Mutex::new(db.last_peer_db_id().await?)),
        };
        let ctx = LinkCtx {
            secret,
            hs: hello_src,
            tx: link_tx,
            conns: ConnCounter::default(),
            herr: node.handshake_error.clone(),
            cancel: cancel.clone(),
        };
        // The link and the engine task run on the database thread's runtime: a peer record
        // is then read, applied and acknowledged (and a local commit sent) without a thread
        // hand-over. The listener moves to that runtime's reactor with them.
        let rt = db.runtime().clone();
        if local < remote {
            let addr = setup.peer_addr.clone().unwrap_or_default();
            tracker.spawn_on(dial_loop(addr, ctx.clone()), &rt);
        }
        let peer_listener = peer_listener
            .into_std()
            .map_err(|e| HaStartError::Listener(format!("move the HA port's listener: {e}")))?;
        tracker.spawn_on(
            async move {
                match TcpListener::from_std(peer_listener) {
                    Ok(l) => accept_loop(l, ctx).await,
                    Err(e) => tracing::error!(error = %e, "cannot listen on the HA port; the peer must dial"),
                }
            },
            &rt,
        );
        let driver = Driver {
            engine,
            db,
            node: node.clone(),
            writer: None,
            conn: None,
            waiters: Default::default(),
            next_waiter: 0,
            held: None,
            metrics,
            seen_received: None,
            seen_sent: None,
            applying: Default::default(),
            chain: crate::db::ApplyChain(0),
            snapshot: None,
        };
        let h = rt.spawn(driver.run(req_rx, link_rx, cancel));
        *node.done.lock().unwrap_or_else(|p| p.into_inner()) = Some(h);
        Ok(node)
    }

    /// Does this node serve clients (and so reconcile with agents)?
    pub fn serves_clients(&self) -> bool {
        *self.role.borrow() == Role::Active
    }

    /// HA is on and the peer link is not up and caught up: the peer may hold decisions this
    /// node has not seen (a terminate, an abandoned start), and this node's own decisions
    /// reach the peer only later.
    pub fn cut_off(&self) -> bool {
        self.engine_tx.is_some() && self.readiness() != Readiness::CaughtUp
    }

    /// The role watch (changes on every `tlctl ha notify` that changes the role).
    pub fn watch_role(&self) -> watch::Receiver<Role> {
        self.role.subscribe()
    }

    /// Why this node must not decide about sessions now, if it must not: it was told it is
    /// the standby and it is cut off from its peer. The active master may be deciding at the
    /// same moment, and two masters deciding apart about one session would undo what one of
    /// them told a client. Until an HA manager has told the node a role, it decides as
    /// before (the keepalived file as published has no notify hook).
    pub fn decision_refusal(&self) -> Option<&'static str> {
        let standby = *self.role.borrow() == Role::Standby;
        (self.role_told.load(std::sync::atomic::Ordering::Relaxed) && standby && self.cut_off()).then_some(
            "this master is the standby and cannot reach the active master; log in through the \
             cluster address (the resource IP), or, if the other master is down for good, make \
             this one active (`tlctl ha notify MASTER`)",
        )
    }

    /// Changes whenever the node wants an immediate reconciliation with every agent.
    pub fn reconcile_requests(&self) -> watch::Receiver<u64> {
        self.reconcile.subscribe()
    }

    fn request_reconcile(&self) {
        self.reconcile.send_modify(|n| *n += 1);
    }

    fn set_role(&self, role: Role) {
        let old = *self.role.borrow();
        if old == role {
            return;
        }
        self.role.send_replace(role);
        tracing::info!(%role, "role changed");
        if let Some(tx) = &self.engine_tx {
            let _ = tx.try_send(Req::Role(role));
        }
        if role == Role::Active {
            self.request_reconcile();
        }
    }

    /// Why the node is (not) ready right now.
    pub fn readiness(&self) -> Readiness {
        *self.readiness.borrow()
    }

    /// The readiness now and every change of it.
    pub fn watch_readiness(&self) -> watch::Receiver<Readiness> {
        self.readiness.subscribe()
    }

    /// The current readiness as a sentence, with what only this node knows (the HA
    /// resolution message, the start-up grace left), and a warning while the peer's clock is
    /// beyond `/HA/max_clock_offset` (the node stays ready: the warning is for the admin).
    pub fn readiness_reason(&self) -> String {
        let status = self.replication_status();
        let mut reason = self.readiness_sentence(status.as_ref());
        if let Some(st) = status.filter(|st| st.clock_offset_exceeded) {
            reason.push_str(&format!(
                "; warning: the peer's clock differs from this node's by {:+} ms, beyond /HA/max_clock_offset \
                 ({} ms): check NTP on both masters",
                st.clock_offset_ms.unwrap_or_default(),
                st.max_clock_offset_ms
            ));
        }
        reason
    }

    fn readiness_sentence(&self, status: Option<&engine::EngineStatus>) -> String {
        let r = self.readiness();
        match (r, &self.setup.mode) {
            (Readiness::HaConfiguredOff, HaMode::Fallback { reason }) => format!("{}: {reason}", r.describe()),
            (Readiness::WaitingForPeer, _) => {
                let left = status.and_then(|s| s.grace_left_ms).unwrap_or(0);
                format!("{}, {} s left before serving alone", r.describe(), left.div_ceil(1000))
            }
            (Readiness::AloneAfterGrace, _) => {
                format!("{} ({} s)", r.describe(), self.cfg.ha.startup_grace.as_secs())
            }
            _ => r.describe().to_string(),
        }
    }

    /// One round trip to the engine task (with HA off there is none: answered at once).
    /// `false` when the task is gone or did not answer within `within`.
    pub async fn ping(&self, within: Duration) -> bool {
        let Some(tx) = &self.engine_tx else { return true };
        let (done, rx) = oneshot::channel();
        let round_trip = async { tx.send(Req::Ping(done)).await.is_ok() && rx.await.is_ok() };
        tokio::time::timeout(within, round_trip).await.unwrap_or(false)
    }

    /// The replication engine's latest status, cheap to read (no database call); `None` with
    /// HA off or before the engine ran once.
    pub fn replication_status(&self) -> Option<engine::EngineStatus> {
        self.status.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The clock reading tombstone ages are measured against (see
    /// [`engine::tombstone_clock_ms`]): this machine's clock with HA off; with HA on the
    /// earlier of both masters' clocks while the two databases are in step, else `None` (keep
    /// every tombstone: not caught up, a local change not yet on the peer, or the peer's
    /// clock not measured since start).
    pub fn tombstone_clock_ms(&self, now: u64) -> Option<u64> {
        if self.engine_tx.is_none() {
            return Some(now);
        }
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .and_then(|st| engine::tombstone_clock_ms(now, st))
    }

    /// Waits until the engine releases a wait for `seq` of the local log: the peer
    /// acknowledged it, the wait timed out, or the link is down. Returns at once with HA off
    /// or `/HA/sync = async`. (The broker commits through [`Replication::commit`], which
    /// waits the same way from the database thread.)
    pub fn replicated(&self, seq: Seq) -> impl Future<Output = ()> + Send + 'static {
        let tx = self.ack_requests();
        async move {
            if let Some(tx) = tx {
                await_ack(&tx, seq).await;
            }
        }
    }

    /// Where waits for the peer's acknowledgement go, when writes wait for it at all.
    fn ack_requests(&self) -> Option<mpsc::Sender<Req>> {
        self.engine_tx.clone().filter(|_| self.cfg.ha.sync != SyncLevel::Async)
    }

    /// Waits for the engine task to end (after the cancel token fired).
    pub async fn stopped(&self) {
        let h = self.done.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = h {
            let _ = tokio::time::timeout(Duration::from_secs(5), h).await;
        }
    }
}

/// Registers a wait for `seq` with the engine task and waits until it is released (or the
/// task is gone).
async fn await_ack(tx: &mpsc::Sender<Req>, seq: Seq) {
    let (done, rx) = oneshot::channel();
    if tx.send(Req::AwaitAck { seq, done }).await.is_ok() {
        let _ = rx.await;
    }
}

impl Replication for HaNode {
    fn cut_off(&self) -> bool {
        HaNode::cut_off(self)
    }

    fn adoption_gate(&self) -> AdoptionGate {
        if self.engine_tx.is_none() {
            return AdoptionGate::Now;
        }
        match *self.caught_up_since.lock().unwrap_or_else(|p| p.into_inner()) {
            // Linked, a record of the peer's arrives within its silence timeout (else the
            // link is declared dead and this node is cut off); a second for the rest.
            Some(since) if !self.cut_off() => AdoptionGate::Linked {
                linked_for: since.elapsed(),
                lag: self.cfg.ha.peer_timeout + std::time::Duration::from_secs(1),
            },
            _ => AdoptionGate::CutOff,
        }
    }

    /// The write and the wait for its acknowledgement run as one task on the database
    /// thread's runtime, where the engine task also runs: the commit's answer, the wait's
    /// registration with the engine and the peer's acknowledgement all pass within that
    /// thread, and the caller is woken once, with the result.
    fn commit(&self, db: &DbHandle, w: Write) -> CommitFuture {
        let Some(tx) = self.ack_requests() else { return commit_locally(db, w) };
        let db = db.clone();
        let task = db.runtime().clone().spawn(async move {
            let c = db.write(w).await?;
            await_ack(&tx, c.seq).await;
            Ok(c)
        });
        // The task ends on its own whether or not anyone still waits for it; it fails to
        // run only when the database thread is gone.
        Box::pin(async move { task.await.unwrap_or(Err(DbError::Closed)) })
    }
}

impl HaControl for HaNode {
    fn status(&self, digest: Digest) -> Pin<Box<dyn Future<Output = HaStatusView> + Send + '_>> {
        Box::pin(self.status_view(digest))
    }

    fn readiness(&self) -> watch::Receiver<Readiness> {
        self.watch_readiness()
    }

    fn readiness_reason(&self) -> String {
        HaNode::readiness_reason(self)
    }

    fn role(&self) -> watch::Receiver<Role> {
        self.watch_role()
    }

    fn decision_refusal(&self) -> Option<&'static str> {
        HaNode::decision_refusal(self)
    }

    fn notify(&self, state: VrrpState) -> Pin<Box<dyn Future<Output = String> + Send + '_>> {
        Box::pin(async move {
            let role = match state {
                VrrpState::Master => Role::Active,
                VrrpState::Backup | VrrpState::Fault => Role::Standby,
            };
            tracing::info!(?state, %role, "notified by the VRRP manager");
            self.role_told.store(true, std::sync::atomic::Ordering::Relaxed);
            self.set_role(role);
            format!("role is now {role}")
        })
    }
}
