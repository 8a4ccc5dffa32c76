//! Messages of the master's client and admin API (`vsmclient`, `tlctl`), spoken over the
//! Unix socket (plain frames; the caller is identified by its peer credentials) and over TCP
//! from hosts in `/vsmserver/allowed_clients` (secure channel, prologue [`ADMIN_PROLOGUE`]).
//!
//! Invariant: one request, one reply; every failure is an [`ApiReply::Error`] with a kind the
//! client can act on and a message a person can read.

use crate::model::{LinkState, Readiness, Role, Session, SessionId, SyncLevel};
use crate::proto::agent::LoadReport;
use serde::{Deserialize, Serialize};

/// Prologue binding the secure channel to the admin API.
pub use crate::proto::secure::PROLOGUE_ADMIN as ADMIN_PROLOGUE;

/// Largest request the master reads (Unix socket and TCP): a request names a few fields,
/// the largest being one session record in `SessionPut` (see [`crate::model::MAX_RECORD`]).
pub const MAX_REQUEST: usize = 2 * crate::model::MAX_RECORD;
/// Largest reply a client reads: a listing of every session of a big cluster.
pub const MAX_REPLY: usize = 64 * 1024 * 1024;

/// Selects sessions; every field that is set must match (AND).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Selector {
    pub user: Option<String>,
    pub agent: Option<String>,
    pub display: Option<u32>,
    pub subcluster: Option<String>,
}

impl Selector {
    pub fn is_empty(&self) -> bool {
        self.user.is_none() && self.agent.is_none() && self.display.is_none() && self.subcluster.is_none()
    }
}

/// keepalived's view of this node, passed by its notify hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum VrrpState {
    Master,
    Backup,
    Fault,
}

crate::tagged_enum! {
    #[tagged(tag = "op", name = "ApiRequest")]
    #[derive(Clone, Debug, PartialEq)]
    pub enum ApiRequest {
        /// Log in: reconnect to the caller's live session or create one.
        Connect {
            /// Act for this user (root and admins only).
            user: Option<String>,
            /// Ask for an additional session within `max_sessions_per_user`.
            new: bool,
            /// End the caller's existing sessions first.
            terminate_existing: bool,
            geometry: Option<String>,
            /// Where the user connects from (from `SSH_CONNECTION`), for the record.
            client_address: Option<String>,
        },
        /// The caller's own sessions.
        MySessions { user: Option<String> },
        /// End one of the caller's own sessions.
        TerminateMine { user: Option<String>, session_id: SessionId },
        /// Admin: list sessions.
        SessionList { selector: Selector, refresh: bool },
        /// Admin: terminate sessions. With `dry_run` only the selection is returned.
        SessionTerminate { selector: Selector, all: bool, allow_abandon: bool, dry_run: bool },
        /// Admin: store a session record as given (import from another master, benchmarks).
        /// Answered once the record is committed and, in HA `ack` mode, stored by the peer.
        SessionPut { session: Session },
        /// Admin: load of every agent; with `refresh`, every agent is asked first.
        LoadList {
            /// Ask every agent for its sessions and load before answering (older callers omit it).
            #[serde(default)]
            refresh: bool,
        },
        /// Admin: load of one agent.
        LoadShow { agent: String },
        /// HA status of this node.
        HaStatus,
        /// Exit 0 only when alive and ready: the keepalived / Pacemaker health check.
        HaCheck,
        /// keepalived notify hook.
        HaNotify { state: VrrpState },
    }

}

/// Where a session lives, as the client needs it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectInfo {
    pub session_id: SessionId,
    pub user: String,
    pub agent: String,
    pub agent_address: String,
    pub display: u32,
    /// 0 for a private desktop, which has no TCP port: see `vnc_socket`.
    pub vnc_port: u16,
    /// A private desktop's Unix socket on the agent, to be forwarded over SSH by its owner.
    #[serde(default)]
    pub vnc_socket: Option<String>,
    /// True when an existing session was reconnected, false when a new one was created.
    pub reconnected: bool,
}

/// One agent's row in `tlctl load list`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AgentLoad {
    pub agent: String,
    pub subclusters: Vec<String>,
    pub reachable: bool,
    pub draining: bool,
    pub weight: u32,
    /// Distinct users with sessions from this master.
    pub vsm_users: u32,
    pub sessions: u32,
    /// Milliseconds since the last answer, if any.
    pub updated_ms_ago: Option<u64>,
    /// The agent's clock minus this master's, from its last load report.
    #[serde(default)]
    pub clock_offset_ms: Option<i64>,
    pub load: Option<LoadReport>,
    /// Penalised after a failed start until this many milliseconds from now.
    pub penalised_ms: Option<u64>,
}

/// Outcome of a terminate request.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TerminateOutcome {
    pub terminated: Vec<Session>,
    /// Forgotten with `--allow-abandon`: no longer listed; ended if their agent answers again.
    pub abandoned: Vec<Session>,
    /// The agent did not answer in time: no longer listed, and ended as soon as the agent
    /// answers again, with the reason.
    #[serde(default)]
    pub pending: Vec<(Session, String)>,
    /// Sessions that could not be ended, with the reason.
    pub failed: Vec<(Session, String)>,
    /// The request reached the agent but no answer came, and the master could not record a
    /// pending end (it was cut off from its peer): the session may or may not have ended. It
    /// stays listed until its agent says (reconciliation removes it if its desktop is gone).
    #[serde(default)]
    pub unknown: Vec<(Session, String)>,
}

crate::tagged_enum! {
    #[tagged(tag = "reply", name = "ApiReply")]
    #[derive(Clone, Debug, PartialEq)]
    pub enum ApiReply {
        Connected {
            info: ConnectInfo,
        },
        Sessions {
            sessions: Vec<Session>,
            /// Set when the node is not ready: the list may lack changes the peer has.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            possibly_stale: Option<String>,
        },
        Terminated {
            outcome: TerminateOutcome,
        },
        Loads {
            agents: Vec<AgentLoad>,
            /// Set when the node is not ready: session counts may lack changes the peer has.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            possibly_stale: Option<String>,
        },
        HaStatus {
            status: Box<HaStatusView>,
        },
        Ok {
            message: String,
        },
        Error {
            kind: ApiErrorKind,
            message: String,
        },
    }

}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApiErrorKind {
    /// The caller may not do this.
    NotAllowed,
    /// `max_sessions_per_user` reached.
    LimitReached,
    /// No agent can take a session now.
    NoAgentAvailable,
    /// An agent failed to start the session.
    StartFailed,
    /// A session could not be ended (and will not be).
    TerminateFailed,
    /// The named session, agent or user does not exist.
    NotFound,
    /// The request was malformed or incomplete.
    BadRequest,
    /// The node is not ready (see `HaStatusView::readiness`): not resynchronised with its
    /// peer, or HA configured but off. Retry later or through the other master.
    NotReady,
    /// Something broke on the master; details in its log.
    Internal,
}

impl ApiErrorKind {
    /// The name on the wire (and in metrics labels).
    pub fn as_str(self) -> &'static str {
        match self {
            ApiErrorKind::NotAllowed => "not_allowed",
            ApiErrorKind::LimitReached => "limit_reached",
            ApiErrorKind::NoAgentAvailable => "no_agent_available",
            ApiErrorKind::StartFailed => "start_failed",
            ApiErrorKind::TerminateFailed => "terminate_failed",
            ApiErrorKind::NotFound => "not_found",
            ApiErrorKind::BadRequest => "bad_request",
            ApiErrorKind::NotReady => "not_ready",
            ApiErrorKind::Internal => "internal",
        }
    }
}

/// What `tlctl ha status` shows.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HaStatusView {
    /// `/HA/enabled` in the configuration.
    pub configured: bool,
    /// HA actually running (configured and node resolution succeeded).
    pub enabled: bool,
    /// Why HA is off although configured, and how to fix it.
    #[serde(default)]
    pub ha_off_reason: Option<String>,
    /// Why the node is (not) ready: the state `tlctl ha check`, `/readyz`, the metrics and
    /// systemd's `STATUS=` show.
    #[serde(default)]
    pub readiness: Readiness,
    /// The same as a sentence, with details (the HA resolution message, the grace left).
    #[serde(default)]
    pub reason: String,
    /// While waiting for the peer after start: milliseconds of start-up grace left.
    #[serde(default)]
    pub grace_left_ms: Option<u64>,
    pub local_node: Option<String>,
    pub remote_node: Option<String>,
    /// How the local node was recognised (hostname, address, override).
    pub matched_by: Option<String>,
    /// `active` or `standby`.
    pub role: Role,
    /// `readiness.is_ready()`: the node serves logins and writes.
    pub ready: bool,
    /// `down`, `handshaking`, `catching_up`, `streaming`.
    pub link: LinkState,
    /// `/HA/sync`: `async` or `ack`.
    pub sync: SyncLevel,
    pub local_head: u64,
    pub peer_acked: u64,
    pub peer_head: u64,
    pub applied_of_peer: u64,
    pub lag_changes: u64,
    pub lag_ms: u64,
    pub last_resync: Option<ResyncView>,
    /// The most recent resync through which this node caught up with the peer.
    #[serde(default)]
    pub last_resync_received: Option<ResyncView>,
    pub config_digest_match: Option<bool>,
    pub degraded: bool,
    pub degraded_reason: Option<String>,
    /// While the link is not up: why it last failed or was refused (e.g. a wrong secret).
    #[serde(default)]
    pub link_error: Option<String>,
    pub sessions: u64,
    pub db_digest: Option<String>,
    /// The last time an established peer link was dropped, and why (shown even after the
    /// link came back, so a link that keeps dropping says why).
    #[serde(default)]
    pub last_link_drop: Option<LinkDropView>,
    /// The peer's clock minus this node's, as last measured from its heartbeats.
    #[serde(default)]
    pub clock_offset_ms: Option<i64>,
    /// How long ago that measurement was taken.
    #[serde(default)]
    pub clock_offset_age_ms: Option<u64>,
    /// `/HA/max_clock_offset` in milliseconds.
    #[serde(default)]
    pub max_clock_offset_ms: u64,
    /// The offset to the peer is beyond `/HA/max_clock_offset`.
    #[serde(default)]
    pub clock_offset_exceeded: bool,
    /// Each agent's clock minus this node's, from its last load report.
    #[serde(default)]
    pub agent_clock_offsets: Vec<AgentClockOffset>,
}

/// Why and when the peer link last dropped.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LinkDropView {
    pub reason: String,
    pub at_ms: u64,
    /// Established links dropped since the daemon started.
    pub drops: u64,
}

/// One agent's clock as `tlctl ha status` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentClockOffset {
    pub agent: String,
    /// The agent's clock minus this node's (the network delay makes it a few ms low).
    pub offset_ms: i64,
    /// Beyond `/HA/max_clock_offset`.
    pub exceeded: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ResyncView {
    /// `incremental`, `snapshot` (records) or `snapshot_file` (a SQLite file, to a peer
    /// whose database was empty).
    pub kind: String,
    /// `received` (we caught up from the peer) or `sent`.
    pub direction: String,
    pub records: u64,
    pub duration_ms: u64,
    pub at_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_kind_names_are_the_wire_names() {
        use ApiErrorKind::*;
        for k in [NotAllowed, LimitReached, NoAgentAvailable, StartFailed, NotFound, BadRequest, NotReady, Internal] {
            assert_eq!(serde_json::to_string(&k).unwrap(), format!("\"{}\"", k.as_str()));
        }
    }

    #[test]
    fn ha_status_role_link_and_sync_are_the_wire_words() {
        use crate::model::{LinkState::*, Role::*, SyncLevel::*};
        for (role, word) in [(Active, "active"), (Standby, "standby")] {
            let v = serde_json::to_value(HaStatusView { role, ..Default::default() }).unwrap();
            assert_eq!(v["role"], word);
            assert_eq!(role.to_string(), word);
        }
        for (link, word) in
            [(Down, "down"), (Handshaking, "handshaking"), (CatchingUp, "catching_up"), (Streaming, "streaming")]
        {
            let v = serde_json::to_value(HaStatusView { link, ..Default::default() }).unwrap();
            assert_eq!(v["link"], word);
            assert_eq!(link.to_string(), word);
            assert_eq!(serde_json::from_value::<HaStatusView>(v).unwrap().link, link);
        }
        for (sync, word) in [(Async, "async"), (Ack, "ack")] {
            let v = serde_json::to_value(HaStatusView { sync, ..Default::default() }).unwrap();
            assert_eq!(v["sync"], word);
            assert_eq!(sync.to_string(), word);
            assert_eq!(serde_json::from_value::<HaStatusView>(v).unwrap().sync, sync);
        }
    }
}
