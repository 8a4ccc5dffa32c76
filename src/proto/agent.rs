//! Messages of the master↔agent link (both directions). Serialized as JSON inside
//! authenticated, encrypted frames (see `proto::secure`).
//!
//! Invariant: these types are the whole agent protocol; nothing else crosses that link.

use crate::model::SessionId;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The socket of a private desktop on display `display`, under `/vsm/vnc_socket_dir`: the
/// agent creates it there and the master tells the client, so both derive it the same way.
pub fn vnc_socket_path(vnc_socket_dir: &Path, display: u32) -> PathBuf {
    vnc_socket_dir.join(display.to_string()).join("vnc.sock")
}

/// Largest call an agent reads from a master (a few short fields).
pub const MAX_REQUEST: usize = 64 * 1024;
/// Largest answer a master reads from an agent: the list of every session it runs.
pub const MAX_REPLY: usize = 16 * 1024 * 1024;
/// Largest report (or acknowledgement) on the report link.
pub const MAX_REPORT: usize = 64 * 1024;

crate::tagged_enum! {
    #[tagged(tag = "op", name = "AgentRequest")]
    /// A call from a master to an agent.
    ///
    /// Fencing: `Start` and `Terminate` are carried out only while the master still waits for the
    /// answer. `wait_ms` is how much longer the master waits, counted by the agent from the moment
    /// it reads the request (its own monotonic clock, so the two clocks never meet); and a master
    /// that gave up closes the connection, which the agent checks before acting (see
    /// `docs/architecture.md`, "Fenced agent actions"). The session id names the request.
    #[derive(Clone, Debug, PartialEq)]
    pub enum AgentRequest {
        /// Start a session for `user` on a free display.
        Start {
            session_id: SessionId,
            user: String,
            /// `WIDTHxHEIGHT`; the agent's `default_geometry` when absent.
            geometry: Option<String>,
            /// Milliseconds the master still waits; `None` from masters that do not say.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            wait_ms: Option<u64>,
        },
        /// Is this session still alive?
        Verify { session_id: SessionId, display: u32 },
        /// End this session (SIGTERM, then SIGKILL after a grace period).
        Terminate {
            session_id: SessionId,
            display: u32,
            /// Milliseconds the master still waits; `None` from masters that do not say.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            wait_ms: Option<u64>,
        },
        /// Every session the agent runs.
        List,
        /// Current load figures.
        Load,
    }

}

impl AgentRequest {
    /// Sets how much longer the master waits, on the requests that are fenced.
    pub fn set_wait(&mut self, wait: std::time::Duration) {
        let ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
        match self {
            AgentRequest::Start { wait_ms, .. } | AgentRequest::Terminate { wait_ms, .. } => *wait_ms = Some(ms),
            AgentRequest::Verify { .. } | AgentRequest::List | AgentRequest::Load => {}
        }
    }
}

crate::tagged_enum! {
    #[tagged(tag = "reply", name = "AgentReply")]
    /// The agent's answer to one [`AgentRequest`].
    #[derive(Clone, Debug, PartialEq)]
    pub enum AgentReply {
        Started { session: AgentSession },
        Verified { alive: bool },
        Terminated { was_running: bool },
        Sessions { sessions: Vec<AgentSession>, load: LoadReport },
        Load { load: LoadReport },
        Error { kind: AgentErrorKind, message: String },
    }

}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentErrorKind {
    /// No free display in `[display_min, display_max]`.
    NoFreeDisplay,
    /// The user does not exist on the agent.
    UnknownUser,
    /// The session command could not be started or died at once.
    StartFailed,
    /// The request was malformed.
    BadRequest,
    /// The master no longer waited for the answer, so the request was not carried out (or
    /// what it started was undone).
    Abandoned,
}

/// A session as the agent sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentSession {
    pub session_id: SessionId,
    pub user: String,
    pub display: u32,
    pub vnc_port: u16,
    pub pid: u32,
    pub command: Vec<String>,
    pub geometry: String,
    pub started_ms: u64,
    /// The address clients should use to reach this agent.
    pub agent_address: String,
    /// The private desktop's Unix socket on the agent; empty when it listens on `vnc_port`.
    #[serde(default)]
    pub vnc_socket: String,
    /// VNC viewers attached right now.
    #[serde(default)]
    pub viewers: u32,
    /// Unix time in milliseconds at which the latest viewer attached (0: none seen).
    #[serde(default)]
    pub last_viewer_ms: u64,
    /// That viewer's address when the desktop knows it (TCP); empty otherwise.
    #[serde(default)]
    pub viewer_address: String,
}

/// Load figures reported by an agent.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LoadReport {
    pub hostname: String,
    pub cpus: u32,
    pub load1: f64,
    pub load5: f64,
    pub load15: f64,
    pub mem_total_kib: u64,
    pub mem_available_kib: u64,
    pub swap_total_kib: u64,
    pub swap_free_kib: u64,
    /// Distinct users with processes on the host (not only vsm sessions).
    pub users: u32,
    pub sessions: u32,
    /// The agent's wall clock when it answered (Unix ms); 0 from an agent that does not say.
    /// The master derives the agent's clock offset from it.
    #[serde(default)]
    pub now_ms: u64,
}

crate::tagged_enum! {
    #[tagged(tag = "op", name = "AgentReport")]
    /// A report from an agent to the master at `master_hostname`.
    #[derive(Clone, Debug, PartialEq)]
    pub enum AgentReport {
        /// The session's process ended; retried by the agent until acknowledged.
        SessionExited { session_id: SessionId, display: u32, exit_status: Option<i32> },
    }

}

crate::tagged_enum! {
    #[tagged(tag = "ack", name = "ReportAck")]
    /// The master's answer to one [`AgentReport`] on the report link.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub enum ReportAck {
        /// The master recorded the report; the agent may forget it.
        Accepted,
        /// The master cannot record it now (for example it is the standby); the agent retries.
        Retry { reason: String },
    }

}
