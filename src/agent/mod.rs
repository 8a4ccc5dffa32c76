//! The master's side of the agent link: a client that calls agents over the secure channel,
//! and the registry of what the master knows about each agent (load, reachability,
//! penalties).
//!
//! Invariants:
//! - Every call has a deadline; an agent that does not answer in time is reported as
//!   unreachable, never waited for forever.
//! - A pooled connection is reused only for one request at a time; a request that fails on
//!   a pooled connection before any reply is retried once on a fresh one.
//! - The registry is plain data owned by the broker; it does no I/O.

use crate::model::SessionId;
use crate::proto::agent::{AgentErrorKind, AgentReply, AgentRequest, AgentSession, LoadReport};
use crate::proto::secure::{connect, Secret, SecureConn, PROLOGUE_AGENT};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpStream;

/// How long an agent that failed to start a session stays at the back of the queue.
pub const PENALTY: Duration = Duration::from_secs(60);
/// Idle connections kept per agent.
const POOL_PER_AGENT: usize = 32;

/// Why a call to an agent failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AgentCallError {
    /// Nothing answered (resolve, connect, or timeout): the agent counts as down.
    #[error("agent {agent} is unreachable: {reason}")]
    Unreachable { agent: String, reason: String },
    /// The agent answered but refused us (wrong secret, not in its allowed clients).
    #[error("agent {agent} refused the master: {reason}")]
    Refused { agent: String, reason: String },
    /// The agent sent something that is not a valid reply.
    #[error("agent {agent} sent an invalid reply: {reason}")]
    Protocol { agent: String, reason: String },
    /// The agent could not do what was asked.
    #[error("agent {agent}: {message}")]
    Agent { agent: String, kind: AgentErrorKind, message: String },
}

type Conn = SecureConn<TcpStream>;

/// Calls agents. Cheap to clone; clones share the connection pool.
#[derive(Clone)]
pub struct AgentClient {
    secret: Secret,
    port: u16,
    timeout: Duration,
    pool: Arc<Mutex<HashMap<String, Vec<Conn>>>>,
}

/// `host` or `host:port` (IPv6 literals in brackets) → address to connect to.
pub fn address(agent: &str, default_port: u16) -> String {
    if let Ok(sa) = agent.parse::<std::net::SocketAddr>() {
        return sa.to_string();
    }
    if let Some((host, port)) = agent.rsplit_once(':') {
        if !host.contains(':') && port.parse::<u16>().is_ok() {
            return agent.to_string();
        }
    }
    if agent.contains(':') {
        format!("[{agent}]:{default_port}")
    } else {
        format!("{agent}:{default_port}")
    }
}

impl AgentClient {
    pub fn new(secret: Secret, port: u16, timeout: Duration) -> AgentClient {
        AgentClient { secret, port, timeout, pool: Arc::new(Mutex::new(HashMap::new())) }
    }

    fn take(&self, agent: &str) -> Option<Conn> {
        self.pool.lock().unwrap_or_else(|p| p.into_inner()).get_mut(agent).and_then(|v| v.pop())
    }

    fn give_back(&self, agent: &str, c: Conn) {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        let v = pool.entry(agent.to_string()).or_default();
        if v.len() < POOL_PER_AGENT {
            v.push(c);
        }
    }

    async fn open(&self, agent: &str) -> Result<Conn, AgentCallError> {
        let addr = address(agent, self.port);
        let unreachable = |reason: String| AgentCallError::Unreachable { agent: agent.to_string(), reason };
        let s = TcpStream::connect(&addr).await.map_err(|e| unreachable(format!("{addr}: {e}")))?;
        let _ = s.set_nodelay(true);
        connect(s, &self.secret, PROLOGUE_AGENT).await.map_err(|e| {
            if e.is_auth_failure() {
                AgentCallError::Refused { agent: agent.to_string(), reason: e.to_string() }
            } else {
                unreachable(e.to_string())
            }
        })
    }

    /// `Ok(None)`: the agent closed the connection without answering.
    async fn exchange(c: &mut Conn, req: &AgentRequest) -> Result<Option<AgentReply>, crate::proto::ProtoError> {
        c.send(req).await?;
        c.recv::<AgentReply>().await
    }

    /// One request, one reply, within the client's timeout.
    pub async fn call(&self, agent: &str, req: AgentRequest) -> Result<AgentReply, AgentCallError> {
        match tokio::time::timeout(self.timeout, self.call_inner(agent, &req)).await {
            Ok(r) => r,
            Err(_) => {
                Err(AgentCallError::Unreachable { agent: agent.to_string(), reason: format!("no answer within {} ms", self.timeout.as_millis()) })
            }
        }
    }

    async fn call_inner(&self, agent: &str, req: &AgentRequest) -> Result<AgentReply, AgentCallError> {
        if let Some(mut c) = self.take(agent) {
            if let Ok(Some(r)) = Self::exchange(&mut c, req).await {
                self.give_back(agent, c);
                return check(agent, r);
            }
            // A pooled connection the agent already closed: retry once on a fresh one.
        }
        let mut c = self.open(agent).await?;
        match Self::exchange(&mut c, req).await {
            Ok(Some(r)) => {
                self.give_back(agent, c);
                check(agent, r)
            }
            Ok(None) => Err(AgentCallError::Refused {
                agent: agent.to_string(),
                reason: "it closed the connection without answering (is this master in its /vsmagent/allowed_clients?)".into(),
            }),
            Err(e) if e.is_auth_failure() => Err(AgentCallError::Refused { agent: agent.to_string(), reason: e.to_string() }),
            Err(e @ crate::proto::ProtoError::Malformed(_)) => Err(AgentCallError::Protocol { agent: agent.to_string(), reason: e.to_string() }),
            Err(e) => Err(AgentCallError::Unreachable { agent: agent.to_string(), reason: e.to_string() }),
        }
    }

    fn unexpected(agent: &str, r: AgentReply) -> AgentCallError {
        AgentCallError::Protocol { agent: agent.to_string(), reason: format!("unexpected reply {r:?}") }
    }

    pub async fn start(&self, agent: &str, session_id: SessionId, user: String, geometry: Option<String>) -> Result<AgentSession, AgentCallError> {
        match self.call(agent, AgentRequest::Start { session_id, user, geometry }).await? {
            AgentReply::Started { session } => Ok(session),
            r => Err(Self::unexpected(agent, r)),
        }
    }

    pub async fn verify(&self, agent: &str, session_id: SessionId, display: u32) -> Result<bool, AgentCallError> {
        match self.call(agent, AgentRequest::Verify { session_id, display }).await? {
            AgentReply::Verified { alive } => Ok(alive),
            r => Err(Self::unexpected(agent, r)),
        }
    }

    pub async fn terminate(&self, agent: &str, session_id: SessionId, display: u32) -> Result<bool, AgentCallError> {
        match self.call(agent, AgentRequest::Terminate { session_id, display }).await? {
            AgentReply::Terminated { was_running } => Ok(was_running),
            r => Err(Self::unexpected(agent, r)),
        }
    }

    pub async fn list(&self, agent: &str) -> Result<(Vec<AgentSession>, LoadReport), AgentCallError> {
        match self.call(agent, AgentRequest::List).await? {
            AgentReply::Sessions { sessions, load } => Ok((sessions, load)),
            r => Err(Self::unexpected(agent, r)),
        }
    }

    pub async fn load(&self, agent: &str) -> Result<LoadReport, AgentCallError> {
        match self.call(agent, AgentRequest::Load).await? {
            AgentReply::Load { load } => Ok(load),
            r => Err(Self::unexpected(agent, r)),
        }
    }
}

fn check(agent: &str, r: AgentReply) -> Result<AgentReply, AgentCallError> {
    match r {
        AgentReply::Error { kind, message } => Err(AgentCallError::Agent { agent: agent.to_string(), kind, message }),
        r => Ok(r),
    }
}

/// What the master knows about one agent.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AgentState {
    pub reachable: bool,
    pub last_contact_ms: Option<u64>,
    pub load: Option<LoadReport>,
    /// Consecutive failed calls.
    pub failures: u32,
    /// When it last failed to start a session.
    pub penalised_at_ms: Option<u64>,
    pub penalised_until_ms: Option<u64>,
}

/// Load, reachability and penalties of every agent the master has talked to.
#[derive(Clone, Debug, Default)]
pub struct AgentRegistry {
    agents: BTreeMap<String, AgentState>,
}

impl AgentRegistry {
    pub fn get(&self, agent: &str) -> Option<&AgentState> {
        self.agents.get(agent)
    }

    fn entry(&mut self, agent: &str) -> &mut AgentState {
        self.agents.entry(agent.to_string()).or_default()
    }

    /// A successful call.
    pub fn record_success(&mut self, agent: &str, now: u64) {
        let e = self.entry(agent);
        e.reachable = true;
        e.failures = 0;
        e.last_contact_ms = Some(now);
    }

    /// A successful poll with fresh load figures.
    pub fn record_load(&mut self, agent: &str, load: LoadReport, now: u64) {
        self.record_success(agent, now);
        self.entry(agent).load = Some(load);
    }

    /// The agent did not answer.
    pub fn mark_unreachable(&mut self, agent: &str, _now: u64) {
        let e = self.entry(agent);
        e.reachable = false;
        e.failures = e.failures.saturating_add(1);
    }

    /// The agent failed to start a session: back of the queue for [`PENALTY`].
    pub fn penalise(&mut self, agent: &str, now: u64) {
        let e = self.entry(agent);
        e.penalised_at_ms = Some(now);
        e.penalised_until_ms = Some(now + PENALTY.as_millis() as u64);
    }

    /// Agents known not to answer.
    pub fn unreachable_agents(&self) -> BTreeSet<String> {
        self.agents.iter().filter(|(_, s)| !s.reachable && s.failures > 0).map(|(a, _)| a.clone()).collect()
    }

    /// Agents still penalised at `now`, with the time of their failure.
    pub fn penalties(&self, now: u64) -> BTreeMap<String, u64> {
        self.agents
            .iter()
            .filter_map(|(a, s)| match (s.penalised_at_ms, s.penalised_until_ms) {
                (Some(at), Some(until)) if until > now => Some((a.clone(), at)),
                _ => None,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(address("agent1", 904), "agent1:904");
        assert_eq!(address("agent1:5000", 904), "agent1:5000");
        assert_eq!(address("127.0.0.1:7", 904), "127.0.0.1:7");
        assert_eq!(address("10.0.0.5", 904), "10.0.0.5:904");
        assert_eq!(address("::1", 904), "[::1]:904");
        assert_eq!(address("[::1]:99", 904), "[::1]:99");
    }

    #[test]
    fn penalties_expire_and_unreachable_agents_are_listed() {
        let mut r = AgentRegistry::default();
        r.penalise("a", 1000);
        assert_eq!(r.penalties(1001).get("a"), Some(&1000));
        assert!(r.penalties(1000 + PENALTY.as_millis() as u64).is_empty());
        r.mark_unreachable("b", 5);
        assert!(r.unreachable_agents().contains("b"));
        r.record_success("b", 6);
        assert!(r.unreachable_agents().is_empty());
    }
}
