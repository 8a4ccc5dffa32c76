//! [`AgentClient`]: one request, one reply to an agent, with a deadline, a small connection
//! pool, and errors sorted by what the broker does next.
//!
//! Invariants:
//! - A call never takes longer than the client's timeout (resolve, connect, handshake and
//!   exchange together).
//! - A pooled connection is reused only while idle for less than [`POOL_IDLE`], shorter than
//!   the agent's idle timeout; a call on a reused connection that finds it closed before any
//!   reply is retried once on a fresh connection. A fresh connection is never retried.
//! - No `std::sync::Mutex` is held across an `.await`.
//! - Fencing: every `Start` and `Terminate` says how long the master still waits for it; a
//!   call given up after its request went out is [`AgentCallError::NoAnswer`] (the agent may
//!   or may not have acted), and its connection is reset rather than closed, so the kernel
//!   drops whatever it had not yet delivered instead of retransmitting it later.

use crate::config::Config;
use crate::metrics::Metrics;
use crate::model::SessionId;
use crate::proto::addr::{connect_tcp, Target};
use crate::proto::agent::{AgentErrorKind, AgentReply, AgentRequest, AgentSession, LoadReport};
use crate::proto::secure::{connect, SecureConn, PROLOGUE_AGENT};
use crate::proto::{ProtoError, Secret};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// How long an idle pooled connection may be reused.
pub const POOL_IDLE: Duration = Duration::from_secs(10);
/// Idle connections kept per agent: as many as concurrent calls to one agent a busy master
/// makes (logins arriving together), so that calls do not pay a handshake each; connections
/// beyond it are closed after their call.
pub const POOL_PER_AGENT: usize = 64;

/// What the broker needs to build an [`AgentClient`].
#[derive(Clone, Debug)]
pub struct AgentClientConfig {
    /// The cluster secret (`/vsm/secret_file`).
    pub secret: Secret,
    /// Port used for agents named without one (`/vsm/vsm_agent_port`).
    pub port: u16,
    /// Bound on one whole call (`/vsmserver/agent_timeout`).
    pub timeout: Duration,
}

/// A failed agent call, by what the caller does next.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum AgentCallError {
    /// Resolve failure, connection refused, no answer in time, or the link dropped:
    /// mark the agent unreachable.
    #[error("agent {agent} is unreachable: {reason}")]
    Unreachable { agent: String, reason: String },
    /// The request went out but no answer came in time, or the link dropped before one:
    /// the agent may or may not have acted on it. Counts as unreachable.
    #[error("agent {agent} did not answer in time: {reason}")]
    NoAnswer { agent: String, reason: String },
    /// The agent rejected us (wrong secret, not in its allowed clients, another link kind):
    /// a configuration problem to report loudly.
    #[error("agent {agent} refused the link: {reason}")]
    Refused { agent: String, reason: String },
    /// The agent answered something that is not a valid reply to our request.
    #[error("agent {agent} broke the protocol: {reason}")]
    Protocol { agent: String, reason: String },
    /// The agent answered with an error (`AgentReply::Error`).
    #[error("agent {agent} failed the request ({kind:?}): {message}")]
    AgentError { agent: String, kind: AgentErrorKind, message: String },
}

impl AgentCallError {
    /// The agent named in the error.
    pub fn agent(&self) -> &str {
        match self {
            AgentCallError::Unreachable { agent, .. }
            | AgentCallError::NoAnswer { agent, .. }
            | AgentCallError::Refused { agent, .. }
            | AgentCallError::Protocol { agent, .. }
            | AgentCallError::AgentError { agent, .. } => agent,
        }
    }

    /// The kind of failure as a metrics label.
    pub fn kind_label(&self) -> &'static str {
        match self {
            AgentCallError::Unreachable { .. } => "unreachable",
            AgentCallError::NoAnswer { .. } => "no_answer",
            AgentCallError::Refused { .. } => "refused",
            AgentCallError::Protocol { .. } => "protocol",
            AgentCallError::AgentError { .. } => "agent_error",
        }
    }

    /// True for [`AgentCallError::Unreachable`] and [`AgentCallError::NoAnswer`].
    pub fn is_unreachable(&self) -> bool {
        matches!(self, AgentCallError::Unreachable { .. } | AgentCallError::NoAnswer { .. })
    }

    /// True when the request may have reached the agent although no answer came back.
    pub fn outcome_unknown(&self) -> bool {
        matches!(self, AgentCallError::NoAnswer { .. })
    }

    /// `sent`: the request had (at least partly) gone out when `e` happened.
    fn from_proto(agent: &str, e: ProtoError, sent: bool) -> AgentCallError {
        let agent = agent.to_string();
        let reason = e.to_string();
        if e.is_auth_failure() {
            return AgentCallError::Refused { agent, reason };
        }
        match e {
            ProtoError::Io(_)
            | ProtoError::Truncated { .. }
            | ProtoError::Handshake(_)
            | ProtoError::Timeout { .. } => {
                if sent {
                    AgentCallError::NoAnswer { agent, reason }
                } else {
                    AgentCallError::Unreachable { agent, reason }
                }
            }
            _ => AgentCallError::Protocol { agent, reason },
        }
    }
}

struct Idle {
    conn: SecureConn<TcpStream>,
    since: Instant,
}

struct Inner {
    cfg: AgentClientConfig,
    pool: Mutex<HashMap<String, Vec<Idle>>>,
}

/// Client of every agent; cheap to clone (the pool is shared).
#[derive(Clone)]
pub struct AgentClient {
    inner: Arc<Inner>,
    metrics: Metrics,
}

impl std::fmt::Debug for AgentClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentClient")
            .field("port", &self.inner.cfg.port)
            .field("timeout", &self.inner.cfg.timeout)
            .finish()
    }
}

/// Why the exchange on one connection failed.
enum ExchangeError {
    /// The connection was closed or failed before any reply: maybe a stale pooled one.
    Closed(ProtoError),
    Other(ProtoError),
}

/// One request and its reply; `sent` is set before the first byte may go out.
async fn exchange(
    conn: &mut SecureConn<TcpStream>,
    req: &mut AgentRequest,
    deadline: Instant,
    sent: &mut bool,
) -> Result<AgentReply, ExchangeError> {
    // What is left of the call's budget, less a tenth for the way there; the agent counts it
    // from when it reads the request.
    let left = deadline.saturating_duration_since(Instant::now());
    req.set_wait(left - left / 10);
    *sent = true;
    if let Err(e) = conn.send(req).await {
        return Err(match e {
            ProtoError::Io(_) => ExchangeError::Closed(e),
            e => ExchangeError::Other(e),
        });
    }
    match conn.recv::<AgentReply>().await {
        Ok(Some(reply)) => Ok(reply),
        Ok(None) => Err(ExchangeError::Closed(ProtoError::Truncated {
            what: "a call (the agent closed the link without replying)",
        })),
        Err(e @ ProtoError::Io(_)) => Err(ExchangeError::Closed(e)),
        Err(e) => Err(ExchangeError::Other(e)),
    }
}

impl AgentClient {
    pub fn new(cfg: AgentClientConfig) -> AgentClient {
        AgentClient { inner: Arc::new(Inner { cfg, pool: Mutex::new(HashMap::new()) }), metrics: Metrics::new() }
    }

    /// Counts calls, their duration and failures in `metrics` (the master's) instead of a
    /// private set.
    pub fn with_metrics(mut self, metrics: Metrics) -> AgentClient {
        self.metrics = metrics;
        self
    }

    /// From the validated configuration: reads `/vsm/secret_file`, uses `/vsm/vsm_agent_port`
    /// and `/vsmserver/agent_timeout`.
    pub fn from_config(config: &Config) -> Result<AgentClient, ProtoError> {
        Ok(AgentClient::new(AgentClientConfig {
            secret: Secret::from_file(&config.vsm.secret_file)?,
            port: config.vsm.vsm_agent_port,
            timeout: config.vsmserver.agent_timeout,
        }))
    }

    /// The bound on one whole call.
    pub fn timeout(&self) -> Duration {
        self.inner.cfg.timeout
    }

    /// The port used for agents named without one.
    pub fn port(&self) -> u16 {
        self.inner.cfg.port
    }

    /// Send `req` to `agent` (a subcluster `agents` entry: host name or address, optionally
    /// with `:port`) and return its reply. `AgentReply::Error` becomes
    /// [`AgentCallError::AgentError`].
    pub async fn call(&self, agent: &str, mut req: AgentRequest) -> Result<AgentReply, AgentCallError> {
        let timeout = self.inner.cfg.timeout;
        let started = Instant::now();
        let deadline = started + timeout;
        let mut sent = false;
        // The connection of the exchange in progress lives here, outside the timed future,
        // so that a call given up can reset it.
        let mut slot = None;
        let r = match tokio::time::timeout(timeout, self.call_inner(agent, &mut req, deadline, &mut sent, &mut slot))
            .await
        {
            Ok(r) => r,
            Err(_) => {
                if let Some(conn) = slot.take() {
                    reset(conn);
                }
                let agent = agent.to_string();
                let reason = format!("no answer within {timeout:?}");
                Err(if sent {
                    AgentCallError::NoAnswer { agent, reason }
                } else {
                    AgentCallError::Unreachable { agent, reason }
                })
            }
        };
        let error = r.as_ref().err().map(AgentCallError::kind_label);
        self.metrics.agent_call(call_label(&req), started.elapsed().as_secs_f64(), error);
        r
    }

    async fn call_inner(
        &self,
        agent: &str,
        req: &mut AgentRequest,
        deadline: Instant,
        sent: &mut bool,
        slot: &mut Option<SecureConn<TcpStream>>,
    ) -> Result<AgentReply, AgentCallError> {
        if let Some(conn) = self.take_idle(agent) {
            let conn = slot.insert(conn);
            match exchange(conn, req, deadline, sent).await {
                Ok(reply) => {
                    if let Some(conn) = slot.take() {
                        self.put_idle(agent, conn);
                    }
                    return classify(agent, reply);
                }
                // Most likely the agent restarted since, closing every pooled connection:
                // forget them and try once on a fresh connection.
                Err(ExchangeError::Closed(_)) => {
                    *slot = None;
                    self.drop_idle(agent)
                }
                Err(ExchangeError::Other(e)) => {
                    *slot = None;
                    return Err(AgentCallError::from_proto(agent, e, *sent));
                }
            }
        }
        let conn = self.open(agent).await.map_err(|e| match e {
            // A stale pooled connection took the request: it may have been read.
            AgentCallError::Unreachable { agent, reason } if *sent => AgentCallError::NoAnswer { agent, reason },
            e => e,
        })?;
        let conn = slot.insert(conn);
        match exchange(conn, req, deadline, sent).await {
            Ok(reply) => {
                if let Some(conn) = slot.take() {
                    self.put_idle(agent, conn);
                }
                classify(agent, reply)
            }
            Err(ExchangeError::Closed(e) | ExchangeError::Other(e)) => {
                *slot = None;
                Err(AgentCallError::from_proto(agent, e, *sent))
            }
        }
    }

    async fn open(&self, agent: &str) -> Result<SecureConn<TcpStream>, AgentCallError> {
        let unreachable = |reason: String| AgentCallError::Unreachable { agent: agent.to_string(), reason };
        let target = Target::parse(agent, self.inner.cfg.port).map_err(|e| unreachable(e.to_string()))?;
        let stream = connect_tcp(&target).await.map_err(|e| unreachable(e.to_string()))?;
        connect(stream, &self.inner.cfg.secret, PROLOGUE_AGENT)
            .await
            .map(|c| c.with_limits(crate::proto::agent::MAX_REPLY, crate::proto::agent::MAX_REQUEST))
            .map_err(|e| AgentCallError::from_proto(agent, e, false))
    }

    fn take_idle(&self, agent: &str) -> Option<SecureConn<TcpStream>> {
        let mut pool = self.inner.pool.lock().unwrap_or_else(|p| p.into_inner());
        let idle = pool.get_mut(agent)?;
        let now = Instant::now();
        while let Some(c) = idle.pop() {
            // One the agent closed meanwhile (it restarted) is dropped before it could take
            // a request, so that a request is only ever sent where it can be answered.
            if now.duration_since(c.since) < POOL_IDLE && c.conn.peer_open() {
                return Some(c.conn);
            }
        }
        None
    }

    fn put_idle(&self, agent: &str, conn: SecureConn<TcpStream>) {
        let mut pool = self.inner.pool.lock().unwrap_or_else(|p| p.into_inner());
        let idle = pool.entry(agent.to_string()).or_default();
        let now = Instant::now();
        idle.retain(|c| now.duration_since(c.since) < POOL_IDLE);
        if idle.len() < POOL_PER_AGENT {
            idle.push(Idle { conn, since: now });
        }
    }

    fn drop_idle(&self, agent: &str) {
        self.inner.pool.lock().unwrap_or_else(|p| p.into_inner()).remove(agent);
    }

    /// Close every pooled connection (e.g. after the secret or the agent list changed).
    pub fn clear_pool(&self) {
        self.inner.pool.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// Start a session for `user`; the agent picks the display.
    pub async fn start(
        &self,
        agent: &str,
        session_id: SessionId,
        user: &str,
        geometry: Option<String>,
    ) -> Result<AgentSession, AgentCallError> {
        let req = AgentRequest::Start { session_id, user: user.to_string(), geometry, wait_ms: None };
        match self.call(agent, req).await? {
            AgentReply::Started { session } => Ok(session),
            other => Err(unexpected(agent, "started", &other)),
        }
    }

    /// Is this session still alive on its agent?
    pub async fn verify(&self, agent: &str, session_id: SessionId, display: u32) -> Result<bool, AgentCallError> {
        match self.call(agent, AgentRequest::Verify { session_id, display }).await? {
            AgentReply::Verified { alive } => Ok(alive),
            other => Err(unexpected(agent, "verified", &other)),
        }
    }

    /// End a session; `Ok(was_running)`.
    pub async fn terminate(&self, agent: &str, session_id: SessionId, display: u32) -> Result<bool, AgentCallError> {
        match self.call(agent, AgentRequest::Terminate { session_id, display, wait_ms: None }).await? {
            AgentReply::Terminated { was_running } => Ok(was_running),
            other => Err(unexpected(agent, "terminated", &other)),
        }
    }

    /// Every session the agent runs, with its current load.
    pub async fn list(&self, agent: &str) -> Result<(Vec<AgentSession>, LoadReport), AgentCallError> {
        match self.call(agent, AgentRequest::List).await? {
            AgentReply::Sessions { sessions, load } => Ok((sessions, load)),
            other => Err(unexpected(agent, "sessions", &other)),
        }
    }

    /// The agent's current load.
    pub async fn load(&self, agent: &str) -> Result<LoadReport, AgentCallError> {
        match self.call(agent, AgentRequest::Load).await? {
            AgentReply::Load { load } => Ok(load),
            other => Err(unexpected(agent, "load", &other)),
        }
    }
}

/// Closes a connection whose call was given up with a reset: the kernel then drops the
/// request if it has not yet been delivered (an agent behind a pulled cable) instead of
/// retransmitting it when the path heals, and an agent that reads it late finds the link gone.
fn reset(conn: SecureConn<TcpStream>) {
    let _ = socket2::SockRef::from(conn.get_ref()).set_linger(Some(Duration::ZERO));
    drop(conn);
}

/// The call as a metrics label.
fn call_label(req: &AgentRequest) -> &'static str {
    match req {
        AgentRequest::Start { .. } => "start",
        AgentRequest::Verify { .. } => "verify",
        AgentRequest::Terminate { .. } => "terminate",
        AgentRequest::List => "list",
        AgentRequest::Load => "load",
    }
}

fn classify(agent: &str, reply: AgentReply) -> Result<AgentReply, AgentCallError> {
    match reply {
        AgentReply::Error { kind, message } => {
            Err(AgentCallError::AgentError { agent: agent.to_string(), kind, message })
        }
        reply => Ok(reply),
    }
}

fn unexpected(agent: &str, expected: &str, got: &AgentReply) -> AgentCallError {
    let got = match got {
        AgentReply::Started { .. } => "started",
        AgentReply::Verified { .. } => "verified",
        AgentReply::Terminated { .. } => "terminated",
        AgentReply::Sessions { .. } => "sessions",
        AgentReply::Load { .. } => "load",
        AgentReply::Error { .. } => "error",
    };
    AgentCallError::Protocol { agent: agent.to_string(), reason: format!("expected a {expected:?} reply, got {got:?}") }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::agent_link::serve_agent_conn;
    use crate::proto::secure::refuse;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::net::TcpListener;

    fn secret() -> Secret {
        Secret::from_bytes(b"cluster secret")
    }

    fn client(port: u16, timeout: Duration) -> AgentClient {
        AgentClient::new(AgentClientConfig { secret: secret(), port, timeout })
    }

    fn session(id: &SessionId, user: &str) -> AgentSession {
        AgentSession {
            session_id: id.clone(),
            user: user.into(),
            display: 10,
            vnc_port: 5910,
            pid: 1234,
            command: vec!["true".into()],
            geometry: "1024x768".into(),
            started_ms: 1,
            agent_address: "127.0.0.1".into(),
            vnc_socket: String::new(),
            viewers: 0,
            last_viewer_ms: 0,
            viewer_address: String::new(),
        }
    }

    async fn fake_agent_reply(req: AgentRequest) -> AgentReply {
        match req {
            AgentRequest::Start { session_id, user, .. } if user == "nobody" => {
                let _ = session_id;
                AgentReply::Error { kind: AgentErrorKind::UnknownUser, message: "no such user".into() }
            }
            AgentRequest::Start { session_id, user, .. } => {
                AgentReply::Started { session: session(&session_id, &user) }
            }
            AgentRequest::Verify { display, .. } => AgentReply::Verified { alive: display == 10 },
            AgentRequest::Terminate { .. } => AgentReply::Terminated { was_running: true },
            AgentRequest::List => AgentReply::Sessions {
                sessions: vec![session(&SessionId("x".into()), "u")],
                load: LoadReport { cpus: 2, sessions: 1, ..LoadReport::default() },
            },
            AgentRequest::Load => AgentReply::Load { load: LoadReport { cpus: 2, ..LoadReport::default() } },
        }
    }

    /// A fake agent; with `one_shot` it closes each connection after one request.
    async fn fake_agent(one_shot: bool) -> (u16, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let conns = Arc::new(AtomicUsize::new(0));
        let conns2 = conns.clone();
        tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else { return };
                conns2.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    if one_shot {
                        let mut c = crate::proto::secure::accept(sock, &secret(), PROLOGUE_AGENT).await.unwrap();
                        if let Ok(Some(req)) = c.recv::<AgentRequest>().await {
                            let _ = c.send(&fake_agent_reply(req).await).await;
                        }
                    } else {
                        let _ = serve_agent_conn(sock, &secret(), fake_agent_reply).await;
                    }
                });
            }
        });
        (port, conns)
    }

    fn free_port() -> u16 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    }

    #[tokio::test]
    async fn wrappers_round_trip_and_reuse_one_connection() {
        let (port, conns) = fake_agent(false).await;
        let c = client(port, Duration::from_secs(10));
        let id = SessionId("s1".into());
        let s = c.start("127.0.0.1", id.clone(), "alice", None).await.unwrap();
        assert_eq!(s.session_id, id);
        assert!(c.verify("127.0.0.1", id.clone(), 10).await.unwrap());
        assert!(!c.verify("127.0.0.1", id.clone(), 11).await.unwrap());
        assert!(c.terminate("127.0.0.1", id.clone(), 10).await.unwrap());
        let (sessions, load) = c.list("127.0.0.1").await.unwrap();
        assert_eq!((sessions.len(), load.sessions), (1, 1));
        assert_eq!(c.load("127.0.0.1").await.unwrap().cpus, 2);
        assert_eq!(conns.load(Ordering::SeqCst), 1, "sequential calls share one connection");
        // An explicit port in the agent name wins over the default one.
        let other = client(free_port(), Duration::from_secs(10));
        assert_eq!(other.load(&format!("127.0.0.1:{port}")).await.unwrap().cpus, 2);
    }

    #[tokio::test]
    async fn calls_are_counted_in_the_given_metrics() {
        let (port, _) = fake_agent(false).await;
        let m = Metrics::new();
        let c = client(port, Duration::from_secs(10)).with_metrics(m.clone());
        c.load("127.0.0.1").await.unwrap();
        let _ = c.start("127.0.0.1", SessionId("s".into()), "nobody", None).await;
        let _ = client(free_port(), Duration::from_secs(10)).with_metrics(m.clone()).load("127.0.0.1").await;
        let text = m.encode(crate::metrics::Format::Prometheus);
        for want in [
            "vsm_agent_calls_total{call=\"load\"} 2\n",
            "vsm_agent_call_duration_seconds_count{call=\"start\"} 1\n",
            "vsm_agent_call_errors_total{call=\"start\",kind=\"agent_error\"} 1\n",
            "vsm_agent_call_errors_total{call=\"load\",kind=\"unreachable\"} 1\n",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
    }

    #[tokio::test]
    async fn agent_error_reply_is_agent_error() {
        let (port, _) = fake_agent(false).await;
        let c = client(port, Duration::from_secs(10));
        let r = c.start("127.0.0.1", SessionId("s".into()), "nobody", None).await;
        match r {
            Err(AgentCallError::AgentError { kind: AgentErrorKind::UnknownUser, agent, .. }) => {
                assert_eq!(agent, "127.0.0.1")
            }
            other => panic!("expected AgentError, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn stale_pooled_connection_is_replaced() {
        let (port, conns) = fake_agent(true).await;
        let c = client(port, Duration::from_secs(10));
        for _ in 0..3 {
            assert_eq!(c.load("127.0.0.1").await.unwrap().cpus, 2);
        }
        assert_eq!(conns.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn concurrent_calls_through_clones() {
        let (port, _) = fake_agent(false).await;
        let c = client(port, Duration::from_secs(10));
        let mut tasks = Vec::new();
        for i in 0..20u32 {
            let c = c.clone();
            tasks.push(tokio::spawn(async move { c.verify("127.0.0.1", SessionId(i.to_string()), 10).await }));
        }
        for t in tasks {
            assert!(t.await.unwrap().unwrap());
        }
    }

    #[tokio::test]
    async fn closed_port_is_unreachable() {
        let c = client(free_port(), Duration::from_secs(30));
        let r = c.load("127.0.0.1").await;
        assert!(matches!(r, Err(AgentCallError::Unreachable { .. })), "{r:?}");
        assert!(r.unwrap_err().is_unreachable());
        let r = c.load("no-such-agent.invalid").await;
        assert!(matches!(r, Err(AgentCallError::Unreachable { .. })), "{r:?}");
        let r = c.load("bad:name:here").await;
        assert!(matches!(r, Err(AgentCallError::Unreachable { .. })), "{r:?}");
    }

    #[tokio::test]
    async fn silent_agent_times_out_as_unreachable() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let c = client(port, Duration::from_millis(200));
        let r = c.load("127.0.0.1").await;
        match r {
            Err(AgentCallError::Unreachable { reason, .. }) => {
                assert!(reason.contains("no answer"), "{reason}")
            }
            other => panic!("expected Unreachable, got {other:?}"),
        }
        drop(listener);
    }

    #[tokio::test]
    async fn wrong_secret_is_refused() {
        let (port, _) = fake_agent(false).await;
        let c = AgentClient::new(AgentClientConfig {
            secret: Secret::from_bytes(b"not the cluster secret"),
            port,
            timeout: Duration::from_secs(10),
        });
        let r = c.load("127.0.0.1").await;
        match r {
            Err(AgentCallError::Refused { reason, .. }) => {
                assert!(reason.contains("secret"), "{reason}")
            }
            other => panic!("expected Refused, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn agent_that_does_not_allow_us_is_refused() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (sock, _) = listener.accept().await.unwrap();
            refuse(sock, "127.0.0.1 is not in allowed_clients").await;
        });
        let c = client(port, Duration::from_secs(10));
        let r = c.load("127.0.0.1").await;
        match r {
            Err(AgentCallError::Refused { reason, .. }) => {
                assert!(reason.contains("allowed_clients"), "{reason}")
            }
            other => panic!("expected Refused, got {other:?}"),
        }
    }

    #[test]
    fn from_config_reads_the_secret_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = Config::default();
        cfg.vsm.secret_file = dir.path().join("missing.key");
        let e = AgentClient::from_config(&cfg).unwrap_err().to_string();
        assert!(e.contains("missing.key"), "{e}");
        std::fs::write(&cfg.vsm.secret_file, b"k").unwrap();
        std::fs::set_permissions(&cfg.vsm.secret_file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        let c = AgentClient::from_config(&cfg).unwrap();
        assert_eq!(c.port(), cfg.vsm.vsm_agent_port);
        assert_eq!(c.timeout(), cfg.vsmserver.agent_timeout);
    }
}
