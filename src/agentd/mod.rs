//! The agent daemon (`vsmagent`): starts, verifies, lists and terminates desktop sessions
//! for the master, answers load queries, and reports session exits to `master_hostname`.
//!
//! Layout:
//! - [`sessions`]: the session processes (display allocation, spawn as the user, watch,
//!   terminate, persistence and re-adoption across agent restarts).
//! - [`load`]: load figures from `/proc`.
//! - [`pam`]: the root helper that opens a desktop's PAM session and runs it as the user.
//! - [`allow_list`]: which callers may connect (the shared check of `proto::access`).
//! - [`reporter`]: exit reports to the master, retried until acknowledged.
//! - [`viewers`]: which desktops have a VNC viewer attached, from the kernel's socket tables.
//! - `link` (private): the glue to the secure channel of `proto::secure`.
//! - this file: [`Agent`] (one request in, one reply out, no I/O of its own) and the
//!   connection loop [`run`].
//!
//! Invariants: a caller that is not allowed is dropped before the handshake; a request is
//! only ever read from an authenticated channel; every error a request can cause becomes an
//! [`AgentReply::Error`] with an [`AgentErrorKind`], never a dropped connection; stopping the
//! daemon never ends a session.
//! Fencing: a start or terminate is carried out only while the master that sent it still
//! waits ([`Fence`]: its connection is open and the time it said it waits has not run out);
//! a session whose start finished after the master stopped waiting is ended again at once.

mod link;
pub mod load;
pub mod pam;
pub mod reporter;
pub mod sessions;
pub mod viewers;

use crate::config::Config;
use crate::model::SessionId;
use crate::proto::access::{AllowList, Local, DEFAULT_CACHE_TTL};
use crate::proto::agent::{AgentErrorKind, AgentReply, AgentReport, AgentRequest, AgentSession};
use crate::proto::listen::{self, Limits, Peer};
use sessions::SessionManager;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

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
        AgentReply::Error { kind: self.kind(), message: self.to_string() }
    }
}

/// Write `value` as JSON to `path` atomically: a temporary file in the same directory,
/// flushed to disk, then renamed over the old file.
pub(crate) fn write_json_atomic<T: serde::Serialize + ?Sized>(path: &Path, value: &T) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    serde_json::to_writer_pretty(&mut tmp, value)?;
    tmp.write_all(b"\n")?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// Whether the master that sent a request still waits for the answer.
pub struct Fence<'a> {
    /// When the request was read, on this agent's monotonic clock.
    received: Instant,
    /// Whether the connection the request came on is still open.
    link_open: &'a (dyn Fn() -> bool + Send + Sync),
}

impl<'a> Fence<'a> {
    /// A request read at `received` on a connection that `link_open` looks at.
    pub fn new(received: Instant, link_open: &'a (dyn Fn() -> bool + Send + Sync)) -> Fence<'a> {
        Fence { received, link_open }
    }

    /// Does the master still wait, given the `wait_ms` it sent?
    fn waits(&self, wait_ms: Option<u64>) -> bool {
        let in_time = wait_ms.map_or(true, |ms| self.received.elapsed() < Duration::from_millis(ms));
        in_time && (self.link_open)()
    }
}

fn abandoned(session_id: &SessionId, what: &str) -> AgentReply {
    tracing::warn!(session_id = %session_id, "the master no longer waits for this {what}; not carried out");
    AgentReply::Error {
        kind: AgentErrorKind::Abandoned,
        message: format!("the master stopped waiting for the {what} of session {session_id}; nothing was done"),
    }
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
            None => crate::proto::access::canonical(local.ip()).to_string(),
        }
    }

    fn addressed(&self, mut s: AgentSession, local: SocketAddr) -> AgentSession {
        s.agent_address = self.agent_address(local);
        s
    }

    /// Current load of the host, stamped with this machine's clock (the master measures
    /// the clock offset from it).
    pub fn load(&self) -> crate::proto::agent::LoadReport {
        let mut report = load::read_load(&self.proc_root, &self.hostname, self.sessions.count());
        report.now_ms = crate::model::now_ms();
        report
    }

    /// Apply one request; `local` is the local address of the connection it came on. No
    /// fencing beyond the request's own `wait_ms`, counted from now.
    pub async fn handle(&self, req: AgentRequest, local: SocketAddr) -> AgentReply {
        self.handle_fenced(req, local, &Fence::new(Instant::now(), &|| true)).await
    }

    /// Apply one request as long as `fence` says the master still waits for it.
    pub async fn handle_fenced(&self, req: AgentRequest, local: SocketAddr, fence: &Fence<'_>) -> AgentReply {
        match req {
            AgentRequest::Start { session_id, user, geometry, wait_ms } => {
                if !fence.waits(wait_ms) {
                    return abandoned(&session_id, "start");
                }
                match self.sessions.start(session_id.clone(), &user, geometry).await {
                    Ok(s) if !fence.waits(wait_ms) => {
                        // Nobody will be told about this desktop: end it rather than leave it.
                        tracing::warn!(session_id = %session_id, display = s.display, "the master stopped waiting while the session started; ending it");
                        self.sessions.terminate(&session_id, s.display).await;
                        abandoned(&session_id, "start")
                    }
                    Ok(s) => AgentReply::Started { session: self.addressed(s, local) },
                    Err(e) => e.to_reply(),
                }
            }
            AgentRequest::Verify { session_id, display } => {
                AgentReply::Verified { alive: self.sessions.verify(&session_id, display) }
            }
            AgentRequest::Terminate { session_id, display, wait_ms } => {
                if !fence.waits(wait_ms) {
                    return abandoned(&session_id, "termination");
                }
                AgentReply::Terminated { was_running: self.sessions.terminate(&session_id, display).await }
            }
            AgentRequest::List => {
                let sessions = self.sessions.list().into_iter().map(|s| self.addressed(s, local)).collect();
                AgentReply::Sessions { sessions, load: self.load() }
            }
            AgentRequest::Load => AgentReply::Load { load: self.load() },
        }
    }
}

/// Tuning of [`run_with`] that tests may change; [`run`] uses [`RunOptions::from_config`].
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub sessions: sessions::SessionOptions,
    pub reporter: reporter::ReporterConfig,
    /// At most this many master connections at once (`/vsmagent/max_connections`).
    pub max_connections: usize,
    /// A master connection with no request for this long is closed (`/vsmagent/idle_timeout`).
    pub idle_timeout: std::time::Duration,
    /// How long shutdown waits for requests in progress.
    pub shutdown_deadline: std::time::Duration,
}

impl RunOptions {
    pub fn from_config(config: &Config) -> RunOptions {
        RunOptions {
            sessions: sessions::SessionOptions::from_config(config),
            reporter: reporter::ReporterConfig {
                outbox_path: Some(reporter::outbox_path(&config.vsmagent.state_dir)),
                ..Default::default()
            },
            max_connections: config.vsmagent.max_connections,
            idle_timeout: config.vsmagent.idle_timeout,
            shutdown_deadline: std::time::Duration::from_secs(10),
        }
    }
}

/// Serve masters on `listener` until `shutdown` resolves.
///
/// Start-up, one log line per step: load the cluster secret, start the exit reporter (so
/// re-adoption can queue reports), open the session table (re-adopting sessions that
/// survived a restart), then accept.
///
/// Shutdown order: stop accepting; let requests in progress finish (a start interrupted
/// between spawn and bookkeeping would leave an untracked desktop) up to a deadline; stop the
/// reporter (its outbox is on disk); detach from the sessions, which keep running.
pub async fn run(config: Config, listener: TcpListener, shutdown: impl Future) -> Result<(), AgentdError> {
    let opts = RunOptions::from_config(&config);
    run_with(config, opts, listener, shutdown).await
}

/// [`run`] with explicit options.
pub async fn run_with(
    config: Config,
    opts: RunOptions,
    listener: TcpListener,
    shutdown: impl Future,
) -> Result<(), AgentdError> {
    let secret = link::load_secret(&config.vsm.secret_file)?;
    tracing::info!(path = %config.vsm.secret_file.display(), "loaded cluster secret");

    let master = (config.vsmagent.master_hostname.clone(), config.vsm.vsm_server_port);
    let (report_tx, report_rx) = mpsc::channel(REPORT_QUEUE);
    let stop_reporter = CancellationToken::new();
    let sink = {
        let secret = secret.clone();
        let master = master.clone();
        let timeout = opts.reporter.send_timeout;
        move |report: AgentReport| {
            let secret = secret.clone();
            let master = master.clone();
            async move { crate::proto::report::send_report(&master.0, master.1, &secret, &report, timeout).await }
        }
    };
    let reporter_task = tokio::spawn(reporter::run_reporter(
        sink,
        report_rx,
        opts.reporter.clone(),
        stop_reporter.clone().cancelled_owned(),
    ));
    tracing::info!(master = %format!("{}:{}", master.0, master.1), "exit reports go to the master");

    let sessions = SessionManager::open(opts.sessions.clone(), report_tx).await?;
    tracing::info!(sessions = sessions.count(), state_dir = %opts.sessions.state_dir.display(), "session table open");

    let agent = Agent::new(sessions.clone(), config.vsmagent.agent_hostname.clone());
    let access = Arc::new(allow_list(&config.vsmagent));
    let limits = Limits { max_connections: opts.max_connections, idle_timeout: opts.idle_timeout };
    let stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(listen = %addr, allowed = ?access.names(), "accepting master connections");
    }

    let accepting = {
        let stop = stop.clone();
        listen::serve("agent port", listener, limits, stop.clone(), tracker.clone(), move |stream, peer| {
            let (agent, access, secret, stop) = (agent.clone(), access.clone(), secret.clone(), stop.clone());
            async move {
                let Peer::Tcp(addr) = peer else { return Ok(()) };
                if !access.check(addr.ip()).await {
                    tracing::warn!(peer = %addr.ip(), "refused connection from a caller not in allowed_clients, master_hostname or this host");
                    return Ok(());
                }
                let local = stream.local_addr().map_err(|e| format!("cannot read the local address: {e}"))?;
                link::serve(stream, &secret, &agent, local, limits, stop).await
            }
        })
    };
    tokio::pin!(shutdown);
    // Dropping the accept loop closes the listener.
    tokio::select! {
        _ = accepting => {}
        _ = &mut shutdown => {}
    }

    tracing::info!("shutting down: no longer accepting");
    stop.cancel();
    tracker.close();
    if tokio::time::timeout(opts.shutdown_deadline, tracker.wait()).await.is_err() {
        tracing::warn!("requests still in progress at the shutdown deadline");
    }
    stop_reporter.cancel();
    let _ = reporter_task.await;
    sessions.shutdown().await;
    tracing::info!("agent stopped; sessions keep running");
    Ok(())
}

/// Who may call the agent: `/vsmagent/allowed_clients`, `/vsmagent/master_hostname` and this
/// host itself (a master may run beside its agent).
pub fn allow_list(agent: &crate::config::AgentConfig) -> AllowList {
    let mut names = agent.allowed_clients.clone();
    names.push(agent.master_hostname.clone());
    AllowList::new(names, Local::Interfaces, DEFAULT_CACHE_TTL)
}

/// Capacity of the channel between session watchers and the reporter.
const REPORT_QUEUE: usize = 256;

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_agent_allows_its_master_its_clients_and_this_host() {
        let mut cfg = Config::default().vsmagent;
        cfg.master_hostname = "192.0.2.1".into();
        cfg.allowed_clients = vec!["192.0.2.2".into(), "192.0.2.1".into()];
        let list = allow_list(&cfg);
        assert_eq!(list.names(), ["192.0.2.2", "192.0.2.1"]);
        for ok in ["192.0.2.1", "192.0.2.2", "::ffff:192.0.2.2", "127.0.0.1"] {
            assert!(list.check(ok.parse().unwrap()).await, "{ok}");
        }
        assert!(!list.check("192.0.2.3".parse().unwrap()).await);
        for a in crate::proto::access::local_addresses() {
            assert!(list.check(a).await, "{a} is this host");
        }
    }
}
