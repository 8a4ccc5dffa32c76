//! Domain types shared by every layer: sessions, identities, positions and versions.
//!
//! This module owns the vocabulary of the product and nothing else.
//! It must never do I/O and must never depend on another module of the crate.
//!
//! Invariants:
//! - `Version` is totally ordered: first by hybrid logical clock, then by node id.
//!   Two different writes never carry the same version, so "last writer wins" by
//!   `Version` is deterministic on every node.
//! - A `Record` with `session == None` is a tombstone: the session was deleted at
//!   `version`, and the tombstone must outlive any older version of the same id.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Identity of a session, unique across both masters.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SessionId(pub String);

impl SessionId {
    /// A fresh random id (128 bits, hex), safe to create on either master without coordination.
    pub fn random() -> Self {
        use rand::RngCore;
        let mut b = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut b);
        SessionId(b.iter().map(|x| format!("{x:02x}")).collect())
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Name of a master node as written in `/HA/nodes` (or the standalone node's name).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NodeId(pub String);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Position in one node's change log. Starts at 1; `Seq(0)` means "nothing yet".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Seq(pub u64);

impl Seq {
    pub const ZERO: Seq = Seq(0);
    pub fn next(self) -> Seq {
        Seq(self.0 + 1)
    }
}

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Hybrid logical clock reading: wall-clock milliseconds plus a logical counter that
/// breaks ties and keeps the clock monotonic when the wall clock stalls or steps back.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Hlc {
    pub wall_ms: u64,
    pub logical: u32,
}

impl Hlc {
    /// The next local reading after `self`, given the current wall clock.
    pub fn tick(self, now_ms: u64) -> Hlc {
        if now_ms > self.wall_ms {
            Hlc { wall_ms: now_ms, logical: 0 }
        } else {
            Hlc { wall_ms: self.wall_ms, logical: self.logical.saturating_add(1) }
        }
    }

    /// Merge a remote reading into the local clock (on receive), then tick.
    pub fn observe(self, remote: Hlc, now_ms: u64) -> Hlc {
        let base = if remote > self { remote } else { self };
        base.tick(now_ms)
    }
}

impl fmt::Display for Hlc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.wall_ms, self.logical)
    }
}

/// Version of one record: clock reading plus the node that wrote it (the tie-break).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Version {
    pub hlc: Hlc,
    pub node: NodeId,
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.hlc, self.node)
    }
}

/// What the master believes about a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionStatus {
    /// Alive on its agent, and a client connected to it recently.
    Running,
    /// Alive on its agent, no client known to be connected.
    Disconnected,
    /// Its agent does not answer; kept until the agent is back or an admin abandons it.
    Unreachable,
}

impl SessionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            SessionStatus::Running => "running",
            SessionStatus::Disconnected => "disconnected",
            SessionStatus::Unreachable => "unreachable",
        }
    }
    pub fn parse(s: &str) -> Option<SessionStatus> {
        match s {
            "running" => Some(SessionStatus::Running),
            "disconnected" => Some(SessionStatus::Disconnected),
            "unreachable" => Some(SessionStatus::Unreachable),
            _ => None,
        }
    }
}

impl fmt::Display for SessionStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One desktop session as stored in the session database.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    pub id: SessionId,
    pub user: String,
    pub subcluster: String,
    /// The agent's name as the master reaches it (an entry of a subcluster's `agents`).
    pub agent: String,
    /// The agent's address as the client reaches it (reported by the agent).
    pub agent_address: String,
    pub display: u32,
    pub vnc_port: u16,
    pub status: SessionStatus,
    /// Unix time in milliseconds.
    pub created_ms: u64,
    /// Unix time in milliseconds of the last (re)connect through the broker.
    pub last_connect_ms: u64,
    pub last_client_address: String,
    /// Process id of the session's top process on the agent.
    pub pid: u32,
    pub command: Vec<String>,
    pub geometry: String,
    /// Free-form parameters the client sent (key, value).
    pub client_params: Vec<(String, String)>,
}

/// A session record with its replication metadata. `session == None` is a tombstone.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub id: SessionId,
    pub version: Version,
    pub session: Option<Session>,
}

impl Record {
    pub fn is_tombstone(&self) -> bool {
        self.session.is_none()
    }
}

/// One entry of a node's change log: the record as it was written at `seq`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub seq: Seq,
    pub record: Record,
}

/// Whether a node serves clients (holds the resource IP) or stands by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Active,
    Standby,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Active => "active",
            Role::Standby => "standby",
        })
    }
}

/// Whether a master may serve from its own session database, and why. One value, shown the
/// same way by `tlctl ha status`, `tlctl ha check`, `/readyz`, the metrics and systemd's
/// `STATUS=`; the broker refuses logins and writes in every state that is not ready.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Readiness {
    /// `/HA/enabled` is false: a single master by choice.
    Standalone,
    /// `/HA/enabled` is true but HA could not start (e.g. `/HA/nodes` did not resolve).
    HaConfiguredOff,
    /// HA is on and the replication engine has not reported yet.
    #[default]
    Starting,
    /// Started and the peer not reached yet; the start-up grace runs.
    WaitingForPeer,
    /// Linked to the peer and receiving the changes it has and this node lacks.
    CatchingUp,
    /// Linked to the peer and receiving a full copy of its database.
    ReceivingSnapshot,
    /// Lost the active role while cut off from the peer: the peer may have newer data.
    Stale,
    /// Linked to the peer and caught up with it.
    CaughtUp,
    /// The peer stayed unreachable for the whole start-up grace: serving alone.
    AloneAfterGrace,
    /// The peer link went down after a resync: serving with the data of that resync.
    PeerUnreachable,
}

impl Readiness {
    /// Whether the node may serve logins and writes from its own database.
    pub fn is_ready(self) -> bool {
        matches!(
            self,
            Readiness::Standalone | Readiness::CaughtUp | Readiness::AloneAfterGrace | Readiness::PeerUnreachable
        )
    }

    /// A state that waiting cannot end (only a configuration change and a restart).
    pub fn is_permanent(self) -> bool {
        self == Readiness::HaConfiguredOff
    }

    /// The stable name (JSON, metric label).
    pub fn as_str(self) -> &'static str {
        match self {
            Readiness::Standalone => "standalone",
            Readiness::HaConfiguredOff => "ha_configured_off",
            Readiness::Starting => "starting",
            Readiness::WaitingForPeer => "waiting_for_peer",
            Readiness::CatchingUp => "catching_up",
            Readiness::ReceivingSnapshot => "receiving_snapshot",
            Readiness::Stale => "stale",
            Readiness::CaughtUp => "caught_up",
            Readiness::AloneAfterGrace => "alone_after_grace",
            Readiness::PeerUnreachable => "peer_unreachable",
        }
    }

    /// Every state, for tests and for metrics that list each one.
    pub const ALL: [Readiness; 10] = [
        Readiness::Standalone,
        Readiness::HaConfiguredOff,
        Readiness::Starting,
        Readiness::WaitingForPeer,
        Readiness::CatchingUp,
        Readiness::ReceivingSnapshot,
        Readiness::Stale,
        Readiness::CaughtUp,
        Readiness::AloneAfterGrace,
        Readiness::PeerUnreachable,
    ];

    /// What the state means, for a person.
    pub fn describe(self) -> &'static str {
        match self {
            Readiness::Standalone => "ready: HA is off (/HA/enabled is false), a single master",
            Readiness::HaConfiguredOff => "not ready: HA is configured (/HA/enabled) but could not start",
            Readiness::Starting => "not ready: starting",
            Readiness::WaitingForPeer => "not ready: waiting for the peer (start-up grace)",
            Readiness::CatchingUp => "not ready: resynchronising with the peer",
            Readiness::ReceivingSnapshot => "not ready: receiving a full copy of the peer's sessions",
            Readiness::Stale => {
                "not ready: lost the active role while cut off from the peer; \
                 waits for the peer link and a resync"
            }
            Readiness::CaughtUp => "ready: caught up with the peer",
            Readiness::AloneAfterGrace => {
                "ready alone: the peer stayed unreachable for the whole start-up grace period"
            }
            Readiness::PeerUnreachable => "ready: peer unreachable, serving with the sessions of the last resync",
        }
    }

    /// Why a login or write is refused in this (not ready) state, and what to do.
    pub fn refusal(self) -> &'static str {
        match self {
            Readiness::HaConfiguredOff => {
                "this master cannot serve: HA is configured but could not start \
                 (see `tlctl ha status`); fix the configuration and restart vsmserver"
            }
            Readiness::WaitingForPeer => {
                "this master has just started and is waiting for its peer to resynchronise; \
                 try again in a few seconds"
            }
            Readiness::Stale => {
                "this master lost the active role while cut off from its peer and must \
                 resynchronise before it serves again; try again in a few seconds"
            }
            Readiness::Starting => "this master is starting; try again in a few seconds",
            _ => "this master is resynchronising with its peer; try again in a few seconds",
        }
    }
}

impl fmt::Display for Readiness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Milliseconds since the Unix epoch, from the system clock.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hlc_is_monotonic_when_wall_clock_steps_back() {
        let a = Hlc { wall_ms: 100, logical: 0 };
        let b = a.tick(50);
        assert!(b > a);
        let c = b.tick(200);
        assert_eq!(c, Hlc { wall_ms: 200, logical: 0 });
    }

    #[test]
    fn hlc_observe_moves_past_remote() {
        let local = Hlc { wall_ms: 100, logical: 3 };
        let remote = Hlc { wall_ms: 150, logical: 7 };
        let r = local.observe(remote, 120);
        assert!(r > remote);
    }

    #[test]
    fn version_ties_break_on_node() {
        let h = Hlc { wall_ms: 1, logical: 0 };
        let a = Version { hlc: h, node: NodeId("a".into()) };
        let b = Version { hlc: h, node: NodeId("b".into()) };
        assert!(a < b);
    }

    #[test]
    fn random_session_ids_differ() {
        assert_ne!(SessionId::random(), SessionId::random());
    }
}
