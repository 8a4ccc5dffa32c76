//! The agent daemon (`vsmagent`): starts, verifies, lists and terminates desktop sessions
//! for the master, answers load queries, and reports session exits to `master_hostname`.
//!
//! Layout:
//! - [`sessions`]: the session processes (display allocation, spawn as the user, watch,
//!   terminate, persistence and re-adoption across agent restarts).
//! - [`load`]: load figures from `/proc`.
//! - [`access`]: which callers may connect.
//! - [`reporter`]: exit reports to the master, retried until acknowledged.
//! - this file: [`Agent`] (one request in, one reply out, no I/O of its own) and the
//!   connection loop [`run`].
//!
//! Invariants: a caller that is not allowed is dropped before the handshake; a request is
//! only ever read from an authenticated channel; every error a request can cause becomes an
//! [`AgentReply::Error`] with an [`AgentErrorKind`], never a dropped connection; stopping the
//! daemon never ends a session.

pub mod access;
pub mod load;
pub mod reporter;
pub mod sessions;

use crate::proto::agent::{AgentErrorKind, AgentReply, AgentRequest, AgentSession};
use sessions::SessionManager;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Errors of the agent daemon. The first four are failures of one request
/// (see [`AgentdError::kind`]); the others stop the daemon at start-up.
#[derive(Debug, thiserror::Error)]
pub enum AgentdError {
    #[error("no free display in [{min}, {max}]: each is used by a session, an X lock file or socket, or its VNC port is taken")]
    NoFreeDisplay { min: u32, max: u32 },
    #[error("unknown user {0:?}: expected a user that exists on this agent")]
    UnknownUser(String),
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("session did not start: {0}")]
    StartFailed(String),
    #[error("cannot {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("state file {path} is unusable: {message}")]
    State { path: PathBuf, message: String },
    #[error("cluster secret: {0}")]
    Secret(String),
}

impl AgentdError {
    /// The protocol error kind sent to the master for a failed request.
    pub fn kind(&self) -> AgentErrorKind {
        match self {
            AgentdError::NoFreeDisplay { .. } => AgentErrorKind::NoFreeDisplay,
            AgentdError::UnknownUser(_) => AgentErrorKind::UnknownUser,
            AgentdError::BadRequest(_) => AgentErrorKind::BadRequest,
            _ => AgentErrorKind::StartFailed,
        }
    }

    fn to_reply(&self) -> AgentReply {
        AgentReply::Error {
            kind: self.kind(),
            message: self.to_string(),
        }
    }
}

/// Write `value` as JSON to `path` atomically: a temporary file in the same directory,
/// flushed to disk, then renamed over the old file.
pub(crate) fn write_json_atomic<T: serde::Serialize + ?Sized>(
    path: &Path,
    value: &T,
) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    serde_json::to_writer_pretty(&mut tmp, value)?;
    tmp.write_all(b"\n")?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// What the agent does with one request: cheap to clone, no sockets.
#[derive(Clone)]
pub struct Agent {
    sessions: SessionManager,
    /// `/vsmagent/agent_hostname`.
    agent_hostname: Option<String>,
    hostname: String,
    proc_root: PathBuf,
}

impl Agent {
    pub fn new(sessions: SessionManager, agent_hostname: Option<String>) -> Agent {
        Agent {
            sessions,
            agent_hostname: agent_hostname.filter(|h| !h.trim().is_empty()),
            hostname: load::hostname(),
            proc_root: PathBuf::from("/proc"),
        }
    }

    pub fn sessions(&self) -> &SessionManager {
        &self.sessions
    }

    /// The address clients use to reach this agent: `agent_hostname` when configured, else
    /// the local address on which the master reached us.
    pub fn agent_address(&self, local: SocketAddr) -> String {
        match &self.agent_hostname {
            Some(h) => h.clone(),
            None => access::canonical(local.ip()).to_string(),
        }
    }

    fn addressed(&self, mut s: AgentSession, local: SocketAddr) -> AgentSession {
        s.agent_address = self.agent_address(local);
        s
    }

    /// Current load of the host.
    pub fn load(&self) -> crate::proto::agent::LoadReport {
        load::read_load(&self.proc_root, &self.hostname, self.sessions.count())
    }

    /// Apply one request; `local` is the local address of the connection it came on.
    pub async fn handle(&self, req: AgentRequest, local: SocketAddr) -> AgentReply {
        match req {
            AgentRequest::Start {
                session_id,
                user,
                geometry,
            } => match self.sessions.start(session_id, &user, geometry).await {
                Ok(s) => AgentReply::Started {
                    session: self.addressed(s, local),
                },
                Err(e) => e.to_reply(),
            },
            AgentRequest::Verify {
                session_id,
                display,
            } => AgentReply::Verified {
                alive: self.sessions.verify(&session_id, display),
            },
            AgentRequest::Terminate {
                session_id,
                display,
            } => AgentReply::Terminated {
                was_running: self.sessions.terminate(&session_id, display).await,
            },
            AgentRequest::List => {
                let sessions = self
                    .sessions
                    .list()
                    .into_iter()
                    .map(|s| self.addressed(s, local))
                    .collect();
                AgentReply::Sessions {
                    sessions,
                    load: self.load(),
                }
            }
            AgentRequest::Load => AgentReply::Load { load: self.load() },
        }
    }
}

/// Used by tests and the binary to name sessions in logs.
pub fn session_log_path(state_dir: &Path, user: &str, display: u32) -> PathBuf {
    state_dir
        .join("sessions")
        .join(user)
        .join(format!("{display}.log"))
}
