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
    /// The version this write replaced on the node that made it (`None` for the first write
    /// of an id, or from a node that does not say): what makes two writes of one id a
    /// sequence rather than concurrent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<Version>,
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
