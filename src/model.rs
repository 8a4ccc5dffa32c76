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
    /// A fresh id, safe to create on either master without coordination: 32 lowercase hex
    /// digits, the first 12 the creation time (milliseconds since the epoch, 48 bits), the
    /// other 20 random (80 bits).
    ///
    /// The time comes first so that ids made later sort later: a new session's entry then
    /// lands at the end of the database's id index, next to the entries of the sessions
    /// created just before it, instead of on a random page of it. A group commit of many
    /// creates dirties a few pages instead of one per session, which is less to write, to
    /// flush and to copy back at the next checkpoint. Uniqueness rests on the random part
    /// alone (80 bits within one millisecond); a clock set back only costs that locality.
    pub fn generate() -> Self {
        Self::at(now_ms())
    }

    /// The id [`SessionId::generate`] makes at clock reading `ms`.
    fn at(ms: u64) -> Self {
        let mut random = [0u8; 10];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut random);
        let mut s = String::with_capacity(32);
        push_hex(&mut s, &(ms & 0xffff_ffff_ffff).to_be_bytes()[2..]);
        push_hex(&mut s, &random);
        SessionId(s)
    }
}

/// 128 random bits as 32 lowercase hex digits (database ids).
pub fn random_hex_128() -> String {
    let mut b = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut b);
    let mut s = String::with_capacity(32);
    push_hex(&mut s, &b);
    s
}

fn push_hex(s: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for x in bytes {
        s.push(char::from(DIGITS[usize::from(x >> 4)]));
        s.push(char::from(DIGITS[usize::from(x & 0xf)]));
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

    /// This reading, or, when it lies more than `max_ahead_ms` ahead of the wall clock
    /// `now_ms`, the reading at exactly that bound: a clock that ran into the future and was
    /// set back (or a peer's) is followed no further than the bound.
    pub fn capped(self, now_ms: u64, max_ahead_ms: u64) -> Hlc {
        let limit = now_ms.saturating_add(max_ahead_ms);
        if self.wall_ms > limit {
            Hlc { wall_ms: limit, logical: 0 }
        } else {
            self
        }
    }

    /// How far this reading lies beyond `now_ms + max_ahead_ms`, if it does.
    pub fn beyond(self, now_ms: u64, max_ahead_ms: u64) -> Option<u64> {
        let limit = now_ms.saturating_add(max_ahead_ms);
        (self.wall_ms > limit).then(|| self.wall_ms - now_ms)
    }

    /// The next local reading with the clock bounded: never more than `max_ahead_ms` ahead
    /// of `now_ms`, except to pass `floor` (the stored version of the record being
    /// replaced, which a write must always exceed).
    pub fn tick_bounded(self, floor: Option<Hlc>, now_ms: u64, max_ahead_ms: u64) -> Hlc {
        let own = self.capped(now_ms, max_ahead_ms);
        let base = match floor {
            Some(f) if f > own => f,
            _ => own,
        };
        base.tick(now_ms)
    }

    /// [`Hlc::observe`] with the remote reading capped at `max_ahead_ms` ahead of `now_ms`,
    /// so a record from a clock in the future does not drag this clock along.
    pub fn observe_bounded(self, remote: Hlc, now_ms: u64, max_ahead_ms: u64) -> Hlc {
        self.capped(now_ms, max_ahead_ms).observe(remote.capped(now_ms, max_ahead_ms), now_ms)
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
    /// Alive on its agent with a viewer attached (or a client was just told where it is):
    /// shown as `connected`.
    Running,
    /// Alive on its agent, no viewer attached.
    Disconnected,
    /// Its agent does not answer; kept until the agent is back or an admin abandons it.
    Unreachable,
}

impl SessionStatus {
    /// Every state, in the order listings and metrics show them (keep in step with `as_str`).
    pub const ALL: [SessionStatus; 3] =
        [SessionStatus::Running, SessionStatus::Disconnected, SessionStatus::Unreachable];

    pub fn as_str(self) -> &'static str {
        match self {
            SessionStatus::Running => "running",
            SessionStatus::Disconnected => "disconnected",
            SessionStatus::Unreachable => "unreachable",
        }
    }
    /// How listings show the state to people: `connected` while a viewer is attached (or
    /// the client was just told where the session is), `disconnected`, `unreachable`.
    pub fn label(self) -> &'static str {
        match self {
            SessionStatus::Running => "connected",
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

/// Answer of a read of the change log after a position: the database gives it, the HA
/// engine takes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LogRead {
    /// The changes after the requested position, ascending and contiguous (empty when up to
    /// date).
    Changes(Vec<Change>),
    /// The log no longer holds the entry after the requested position: take a snapshot.
    Truncated { oldest: Seq },
}

/// Every record (sessions and tombstones) of a database, consistent at `head` of its change
/// log `db_id`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub head: Seq,
    pub db_id: String,
    /// In storage order (not sorted).
    pub records: Vec<Record>,
}

/// Whether a node serves clients (holds the resource IP) or stands by.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Active,
    /// The role a node with HA on starts in, until the HA manager says otherwise.
    #[default]
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

/// `/HA/sync`: when a client whose write must reach the peer is answered; `tlctl ha status`
/// shows it (as `async` or `ack`, the words of the configuration).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncLevel {
    /// Answer clients as soon as the local commit is done.
    Async,
    /// Answer clients after the peer stored the change (or `sync_timeout` passed). The
    /// default of `/HA/sync`.
    #[default]
    Ack,
}

impl SyncLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            SyncLevel::Async => "async",
            SyncLevel::Ack => "ack",
        }
    }
}

impl fmt::Display for SyncLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `/vsmserver/db_synchronous`: how hard the session database flushes a commit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DbSynchronous {
    Full,
    Normal,
}

/// State of the peer link: the HA engine decides it; `tlctl ha status` and the metrics show
/// it (as `down`, `handshaking`, `catching_up`, `streaming`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkState {
    #[default]
    Down,
    Handshaking,
    CatchingUp,
    Streaming,
}

impl LinkState {
    pub fn as_str(self) -> &'static str {
        match self {
            LinkState::Down => "down",
            LinkState::Handshaking => "handshaking",
            LinkState::CatchingUp => "catching_up",
            LinkState::Streaming => "streaming",
        }
    }
}

impl fmt::Display for LinkState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// ---- Bounds of what may be stored ----
//
// Every field that comes from outside (a user's request, an agent's report, an admin's
// import) is bounded where it enters, and a record is bounded as a whole before it is
// written, so a record that could never travel to the peer is refused at its origin.

/// Longest user name.
pub const MAX_USER: usize = 256;
/// Longest host name or address (client address, agent name and address).
pub const MAX_HOST: usize = 253;
/// Longest session id.
pub const MAX_SESSION_ID: usize = 128;
/// Longest subcluster name.
pub const MAX_NAME: usize = 256;
/// Longest geometry (`16384x16384`).
pub const MAX_GEOMETRY: usize = 11;
/// Most bytes of a session command (all arguments together).
pub const MAX_COMMAND: usize = 8 * 1024;
/// Most bytes of a session's client parameters (keys and values together).
pub const MAX_CLIENT_PARAMS: usize = 8 * 1024;
/// Upper bound of one record's JSON encoding, given the field bounds above; checked with
/// [`Record::json_len_bound`] before a record is written.
pub const MAX_RECORD: usize = 32 * 1024;

/// A field or record over its bound.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BoundsError {
    #[error("{field} is {len} bytes long, expected at most {max}")]
    TooLong { field: &'static str, len: usize, max: usize },
    #[error("{field} contains control characters, expected printable text")]
    Control { field: &'static str },
}

/// `value` is at most `max` bytes and has no control characters.
pub fn check_field(field: &'static str, value: &str, max: usize) -> Result<(), BoundsError> {
    if value.len() > max {
        return Err(BoundsError::TooLong { field, len: value.len(), max });
    }
    if value.chars().any(char::is_control) {
        return Err(BoundsError::Control { field });
    }
    Ok(())
}

/// Is `s` an IP address (IPv6 with an optional `%zone`) or a host name (RFC 1123 labels of
/// letters, digits and inner hyphens, dot-separated, at most [`MAX_HOST`] bytes)? Nothing
/// else may be recorded as a client address: it reaches hook scripts.
pub fn valid_client_address(s: &str) -> bool {
    if s.is_empty() || s.len() > MAX_HOST {
        return false;
    }
    if s.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    if let Some((ip, zone)) = s.split_once('%') {
        return ip.parse::<std::net::Ipv6Addr>().is_ok()
            && !zone.is_empty()
            && zone.len() <= 15
            && zone.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    }
    let name = s.strip_suffix('.').unwrap_or(s);
    !name.is_empty()
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

impl Session {
    /// Checks every field against its bound; the error names the first field over it.
    pub fn check_bounds(&self) -> Result<(), BoundsError> {
        check_field("session id", &self.id.0, MAX_SESSION_ID)?;
        check_field("user", &self.user, MAX_USER)?;
        check_field("subcluster", &self.subcluster, MAX_NAME)?;
        check_field("agent", &self.agent, MAX_HOST)?;
        check_field("agent address", &self.agent_address, MAX_HOST)?;
        check_field("client address", &self.last_client_address, MAX_HOST)?;
        check_field("geometry", &self.geometry, MAX_GEOMETRY)?;
        let command: usize = self.command.iter().map(|a| a.len() + 1).sum();
        if command > MAX_COMMAND {
            return Err(BoundsError::TooLong { field: "command", len: command, max: MAX_COMMAND });
        }
        let params: usize = self.client_params.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
        if params > MAX_CLIENT_PARAMS {
            return Err(BoundsError::TooLong { field: "client parameters", len: params, max: MAX_CLIENT_PARAMS });
        }
        Ok(())
    }
}

/// Bytes of `s` once escaped as a JSON string, quotes included.
fn json_str_len(s: &str) -> usize {
    2 + s
        .bytes()
        .map(|b| match b {
            b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 2,
            0..=0x1f => 6,
            _ => 1,
        })
        .sum::<usize>()
}

/// Room for field names, numbers and punctuation of one record, strings aside.
const RECORD_FIXED_JSON: usize = 640;

impl Session {
    /// Bytes of this session's strings once JSON-escaped (the variable part of its encoding).
    fn json_strings_len(&self) -> usize {
        [
            &self.id.0,
            &self.user,
            &self.subcluster,
            &self.agent,
            &self.agent_address,
            &self.last_client_address,
            &self.geometry,
        ]
        .iter()
        .map(|f| json_str_len(f))
        .sum::<usize>()
            + self.command.iter().map(|a| json_str_len(a) + 1).sum::<usize>()
            + self.client_params.iter().map(|(k, v)| json_str_len(k) + json_str_len(v) + 3).sum::<usize>()
    }
}

/// An upper bound of the JSON encoding of a record with these parts (see
/// [`Record::json_len_bound`]); `base_len` is the room its `base` takes.
pub fn record_json_len_bound(id: &SessionId, node: &NodeId, base_len: usize, session: Option<&Session>) -> usize {
    RECORD_FIXED_JSON
        + base_len
        + json_str_len(&id.0)
        + json_str_len(&node.0)
        + session.map_or(0, Session::json_strings_len)
}

/// Room for a record's `base` (the version it replaced) besides its node id: field names and
/// the clock.
const BASE_JSON_FIXED: usize = 96;

/// Room for any `base`: a node id of at most [`MAX_HOST`] bytes, every byte escaped. A record
/// is checked with it before its base is known, so it still fits afterwards.
const BASE_JSON_MAX: usize = BASE_JSON_FIXED + 2 + 2 * MAX_HOST;

/// Checks what a node may write as a record: every field within bounds, and the whole
/// within [`MAX_RECORD`].
pub fn check_record(id: &SessionId, node: &NodeId, session: Option<&Session>) -> Result<(), BoundsError> {
    check_field("session id", &id.0, MAX_SESSION_ID)?;
    check_field("node id", &node.0, MAX_HOST)?;
    if let Some(s) = session {
        s.check_bounds()?;
    }
    let len = record_json_len_bound(id, node, BASE_JSON_MAX, session);
    if len > MAX_RECORD {
        return Err(BoundsError::TooLong { field: "record", len, max: MAX_RECORD });
    }
    Ok(())
}

impl Record {
    /// An upper bound of the length of this record's JSON encoding, computed without
    /// encoding it (cheap enough to size every batch sent to the peer).
    pub fn json_len_bound(&self) -> usize {
        let base = self.base.as_ref().map_or(0, |b| BASE_JSON_FIXED + json_str_len(&b.node.0));
        record_json_len_bound(&self.id, &self.version.node, base, self.session.as_ref())
    }

    /// See [`check_record`]; the base's node id is bounded like the version's.
    pub fn check_bounds(&self) -> Result<(), BoundsError> {
        if let Some(base) = &self.base {
            check_field("base node id", &base.node.0, MAX_HOST)?;
        }
        check_record(&self.id, &self.version.node, self.session.as_ref())
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
    fn a_bounded_clock_never_runs_further_ahead_than_the_bound() {
        // Written while the wall clock was ten days ahead, then the clock was set right.
        let future = Hlc { wall_ms: 10 * 86_400_000, logical: 4 };
        let now = 1_000;
        let next = future.tick_bounded(None, now, 500);
        assert_eq!(next, Hlc { wall_ms: 1_500, logical: 1 });
        // The record being replaced still wins over the bound: a write follows what it replaces.
        let next = future.tick_bounded(Some(future), now, 500);
        assert!(next > future);
        // Within the bound nothing changes.
        let near = Hlc { wall_ms: 1_200, logical: 0 };
        assert_eq!(near.tick_bounded(None, now, 500), near.tick(now));
        // A remote reading beyond the bound is followed only up to it.
        let seen = Hlc { wall_ms: 900, logical: 0 }.observe_bounded(future, now, 500);
        assert_eq!(seen, Hlc { wall_ms: 1_500, logical: 1 });
        assert_eq!(future.beyond(now, 500), Some(future.wall_ms - now));
        assert_eq!(near.beyond(now, 500), None);
    }

    #[test]
    fn version_ties_break_on_node() {
        let h = Hlc { wall_ms: 1, logical: 0 };
        let a = Version { hlc: h, node: NodeId("a".into()) };
        let b = Version { hlc: h, node: NodeId("b".into()) };
        assert!(a < b);
    }

    fn session(address: &str) -> Session {
        Session {
            id: SessionId::generate(),
            user: "anna".into(),
            subcluster: "default".into(),
            agent: "agent1".into(),
            agent_address: "agent1.example.com".into(),
            display: 10,
            vnc_port: 5910,
            status: SessionStatus::Running,
            created_ms: u64::MAX,
            last_connect_ms: u64::MAX,
            last_client_address: address.into(),
            pid: u32::MAX,
            command: vec!["/usr/bin/Xvnc".into(), ":10".into(), "\"quoted\"\u{1}".into()],
            geometry: "16384x16384".into(),
            client_params: vec![("k\n".into(), "v\\".into())],
        }
    }

    #[test]
    fn json_len_bound_is_an_upper_bound() {
        let node = NodeId("n".repeat(MAX_HOST));
        let version = Version { hlc: Hlc { wall_ms: u64::MAX, logical: u32::MAX }, node };
        let mut s = session("192.0.2.1");
        s.command.push("\u{7}".repeat(1000));
        s.client_params.push(("\"".repeat(100), "é".repeat(100)));
        let live = Record { id: s.id.clone(), version: version.clone(), base: Some(version.clone()), session: Some(s) };
        let dead = Record { id: SessionId("x".into()), version, base: None, session: None };
        for r in [live, dead] {
            let real = serde_json::to_vec(&r).unwrap().len();
            assert!(real <= r.json_len_bound(), "{real} > {}", r.json_len_bound());
        }
    }

    #[test]
    fn bounds_name_the_field_over_its_limit() {
        assert!(session("192.0.2.1").check_bounds().is_ok());
        let e = session(&"a".repeat(MAX_HOST + 1)).check_bounds().unwrap_err();
        assert_eq!(e, BoundsError::TooLong { field: "client address", len: MAX_HOST + 1, max: MAX_HOST });
        assert!(e.to_string().contains("client address is 254 bytes long, expected at most 253"), "{e}");
        let mut s = session("h");
        s.command = vec!["x".repeat(MAX_COMMAND)];
        assert!(matches!(s.check_bounds(), Err(BoundsError::TooLong { field: "command", .. })));
        let mut s = session("h");
        s.user = "a\nb".into();
        assert_eq!(s.check_bounds(), Err(BoundsError::Control { field: "user" }));
        // Every field at its bound still makes a record that fits...
        let mut s = session(&"c".repeat(MAX_HOST));
        s.user = "u".repeat(MAX_USER);
        s.subcluster = "s".repeat(MAX_NAME);
        s.agent = "a".repeat(MAX_HOST);
        s.agent_address = "b".repeat(MAX_HOST);
        s.command = vec!["x".repeat(MAX_COMMAND - 1)];
        s.client_params = vec![("k".repeat(MAX_CLIENT_PARAMS - 2), String::new())];
        assert!(s.check_bounds().is_ok());
        let version = Version { hlc: Hlc::default(), node: NodeId("n".repeat(MAX_HOST)) };
        let mut r = Record { id: s.id.clone(), version: version.clone(), base: Some(version), session: Some(s) };
        assert!(r.check_bounds().is_ok(), "{:?}", r.check_bounds());
        // ...but control characters in a command are escaped six-fold in JSON.
        r.session.as_mut().unwrap().command = vec!["\u{1}".repeat(MAX_COMMAND - 1)];
        assert!(matches!(r.check_bounds(), Err(BoundsError::TooLong { field: "record", .. })));
    }

    #[test]
    fn client_addresses_are_addresses_or_host_names() {
        for ok in ["192.0.2.7", "::1", "fe80::1%eth0", "2001:db8::2", "ws-12.example.com", "localhost", "h."] {
            assert!(valid_client_address(ok), "{ok}");
        }
        for bad in ["", "$(id)", "a b", "-x", "x-", "a..b", "a;b", "fe80::1%", "1.2.3.4%eth0", "x\n"] {
            assert!(!valid_client_address(bad), "{bad:?}");
        }
        assert!(!valid_client_address(&"a".repeat(64)));
        assert!(!valid_client_address(&format!("{}.b", "a.".repeat(127))));
    }

    #[test]
    fn new_session_ids_differ_and_are_32_lowercase_hex_digits() {
        assert_ne!(SessionId::generate(), SessionId::generate());
        for _ in 0..100 {
            let id = SessionId::generate().0;
            assert_eq!(id.len(), 32, "{id}");
            assert!(id.bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)), "{id}");
        }
        let db_id = random_hex_128();
        assert_eq!(db_id.len(), 32, "{db_id}");
        assert!(db_id.bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)), "{db_id}");
    }

    #[test]
    fn session_ids_begin_with_their_creation_time_so_later_ones_sort_later() {
        let id = SessionId::at(0x0123_4567_89ab);
        assert!(id.0.starts_with("0123456789ab"), "{id}");
        // Only the low 48 bits of the clock are kept.
        assert!(SessionId::at(0xffff_0000_0000_0001).0.starts_with("000000000001"));
        // Whatever their random parts, an id of a later millisecond sorts after.
        for _ in 0..100 {
            let (earlier, later) = (SessionId::at(1_700_000_000_000), SessionId::at(1_700_000_000_001));
            assert!(earlier < later, "{earlier} sorts before {later}");
        }
        let (a, b) = (SessionId::at(5), SessionId::at(5));
        assert_ne!(a, b, "ids of the same millisecond differ in their random part");
        assert_eq!(a.0[..12], b.0[..12]);
    }
}
