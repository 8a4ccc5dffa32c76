//! The broker: logins, listings, terminations, exit reports and reconciliation with agents.
//!
//! It owns the agent registry (load, reachability, penalties) and talks to the database only
//! through its handle and to agents only through the agent client.
//!
//! Invariants:
//! - A client is answered about a created or reconnected session only after the session is
//!   committed locally and, with HA in `ack` mode, stored by the peer (or the ack timed out).
//! - One user's logins are serialised, so two concurrent `connect` calls never create two
//!   sessions where the limit allows one.
//! - Agents are the ground truth: reconciliation adds sessions the database lacks, removes
//!   sessions the agent no longer runs, and marks sessions of unreachable agents as
//!   unreachable without ever deleting them.

use crate::agent::registry::DEFAULT_PENALTY;
use crate::agent::{AgentCallError, AgentClient, AgentRegistry};
use crate::broker::hooks::{run_hooks, HookEvent};
use crate::broker::placement;
use crate::config::Config;
use crate::db::{DbError, DbHandle, SessionFilter, Write};
use crate::metrics::Metrics;
use crate::model::{now_ms, Seq, Session, SessionId, SessionStatus};
use crate::proto::agent::AgentSession;
use crate::proto::api::{AgentLoad, ConnectInfo, Selector, TerminateOutcome};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use std::time::Instant;

/// Why a broker request failed; the API layer maps each to a reply kind.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("{0}")]
    NotAllowed(String),
    #[error("you already have {have} session(s) and at most {max} per user are allowed{hint}")]
    LimitReached { have: usize, max: u32, hint: String },
    #[error("{0}")]
    NoAgentAvailable(String),
    #[error("could not start your session: {0}")]
    StartFailed(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("session database: {0}")]
    Db(#[from] DbError),
}

/// Waits until a committed change is safe to tell a client about (HA ack), or returns at once.
pub trait Replication: Send + Sync + 'static {
    fn replicated(&self, seq: Seq) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>>;
}

/// No peer: a local commit is all there is.
pub struct Standalone;

impl Replication for Standalone {
    fn replicated(&self, _seq: Seq) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>> {
        Box::pin(async {})
    }
}

/// What a login asks for, after the API layer established who the caller is.
#[derive(Clone, Debug, Default)]
pub struct ConnectRequest {
    pub user: String,
    pub groups: Vec<String>,
    pub new: bool,
    pub terminate_existing: bool,
    pub geometry: Option<String>,
    pub client_address: Option<String>,
}

#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: Arc<Config>,
    db: DbHandle,
    agents: AgentClient,
    registry: Mutex<AgentRegistry>,
    replication: Arc<dyn Replication>,
    user_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    hook_timeout: Duration,
    metrics: Metrics,
}

impl Broker {
    pub fn new(
        cfg: Arc<Config>,
        db: DbHandle,
        agents: AgentClient,
        replication: Arc<dyn Replication>,
        metrics: Metrics,
    ) -> Broker {
        Broker {
            inner: Arc::new(Inner {
                cfg,
                db,
                agents,
                registry: Mutex::new(AgentRegistry::new(DEFAULT_PENALTY)),
                replication,
                user_locks: Mutex::new(HashMap::new()),
                hook_timeout: Duration::from_secs(30),
                metrics,
            }),
        }
    }

    pub fn config(&self) -> &Config {
        &self.inner.cfg
    }

    pub fn db(&self) -> &DbHandle {
        &self.inner.db
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, AgentRegistry> {
        // A poisoned registry only means a panic elsewhere; its data is still usable.
        self.inner.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn lock_user(&self, user: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let m = {
            let mut locks = self.inner.user_locks.lock().unwrap_or_else(|p| p.into_inner());
            locks.entry(user.to_string()).or_default().clone()
        };
        m.lock_owned().await
    }

    /// Commits one write and waits for replication as configured.
    async fn commit(&self, w: Write) -> Result<(), BrokerError> {
        let c = self.inner.db.write(w).await?;
        self.inner.replication.replicated(c.seq).await;
        Ok(())
    }

    /// Checks `/vsmserver/allowed_groups`.
    pub fn check_allowed(&self, user: &str, groups: &[String]) -> Result<(), BrokerError> {
        let allowed = &self.inner.cfg.vsmserver.allowed_groups;
        if allowed.is_empty() || groups.iter().any(|g| allowed.contains(g)) {
            Ok(())
        } else {
            Err(BrokerError::NotAllowed(format!(
                "user {user} is not allowed to log in: not a member of any group in /vsmserver/allowed_groups ({})",
                allowed.join(" ")
            )))
        }
    }

    /// Log in: reconnect to the user's live session, or create one.
    pub async fn connect(&self, req: ConnectRequest) -> Result<ConnectInfo, BrokerError> {
        self.check_allowed(&req.user, &req.groups)?;
        let _guard = self.lock_user(&req.user).await;
        let mut sessions = self.user_sessions(&req.user).await?;
        // Existing sessions may be ended, removed or marked below: then read them again
        // before checking the limit. With none, the second read is skipped.
        let reread = !sessions.is_empty();
        sessions.sort_by(|a, b| b.last_connect_ms.cmp(&a.last_connect_ms));

        if req.terminate_existing {
            for s in std::mem::take(&mut sessions) {
                match self.end_session(&s, false).await {
                    Ok(_) => {}
                    Err(reason) => {
                        return Err(BrokerError::StartFailed(format!(
                            "could not end your existing session {} on {}: {reason}",
                            s.id, s.agent
                        )))
                    }
                }
            }
        }

        let mut unreachable = Vec::new();
        if !req.new {
            for s in &sessions {
                match self.inner.agents.verify(&s.agent, s.id.clone(), s.display).await {
                    Ok(true) => return self.reconnect(s.clone(), &req).await,
                    Ok(false) => {
                        tracing::info!(session_id = %s.id, user = %s.user, agent = %s.agent, "session no longer alive on its agent, removing it");
                        self.commit(Write::Delete(s.id.clone())).await?;
                    }
                    Err(e) => {
                        tracing::warn!(session_id = %s.id, agent = %s.agent, error = %e, "cannot verify session");
                        self.note_agent_failure(&s.agent, &e);
                        if s.status != SessionStatus::Unreachable {
                            let mut u = s.clone();
                            u.status = SessionStatus::Unreachable;
                            self.commit(Write::Upsert(u)).await?;
                        }
                        unreachable.push(s.clone());
                    }
                }
            }
        }

        let live = if reread { self.user_sessions(&req.user).await? } else { sessions };
        let max = self.inner.cfg.vsmserver.max_sessions_per_user;
        if max > 0 && live.len() >= max as usize {
            let hint = if unreachable.is_empty() {
                String::new()
            } else {
                format!(
                    "; your session on {} cannot be reached right now, try again later or ask an admin to abandon it",
                    unreachable.iter().map(|s| s.agent.as_str()).collect::<Vec<_>>().join(", ")
                )
            };
            return Err(BrokerError::LimitReached { have: live.len(), max, hint });
        }
        self.create(&req, &live).await
    }

    async fn reconnect(&self, mut s: Session, req: &ConnectRequest) -> Result<ConnectInfo, BrokerError> {
        s.status = SessionStatus::Running;
        s.last_connect_ms = now_ms();
        if let Some(a) = &req.client_address {
            s.last_client_address = a.clone();
        }
        self.commit(Write::Upsert(s.clone())).await?;
        tracing::info!(session_id = %s.id, user = %s.user, agent = %s.agent, display = s.display, "reconnected");
        run_hooks(&self.inner.cfg.vsmserver.session_reconnect_dir, HookEvent::Reconnect, &s, self.inner.hook_timeout)
            .await;
        Ok(info(&s, true))
    }

    async fn create(&self, req: &ConnectRequest, live: &[Session]) -> Result<ConnectInfo, BrokerError> {
        let cfg = &self.inner.cfg;
        let sub = placement::resolve_subcluster(&req.user, &req.groups, &cfg.subclusters)
            .map_err(|e| BrokerError::NoAgentAvailable(e.to_string()))?
            .clone();
        let user_agents: Vec<String> = live.iter().map(|s| s.agent.clone()).collect();
        let mut tried: BTreeSet<String> = BTreeSet::new();
        let mut last_error = None;
        for _ in 0..sub.agents.len().max(1) {
            let users_per_agent: BTreeMap<String, u32> =
                self.inner.db.count_users_per_agent().await?.into_iter().map(|(a, n)| (a, n as u32)).collect();
            let chosen = {
                let now = now_ms();
                let (unreachable, mut penalties) = {
                    let reg = self.registry();
                    let at = Instant::now();
                    let unreachable: BTreeSet<String> =
                        reg.iter().filter(|(_, s)| !s.reachable).map(|(a, _)| a.to_string()).collect();
                    // Ordered by when the penalty ends, which orders by when the agent failed.
                    let penalties: BTreeMap<String, u64> = reg
                        .iter()
                        .filter_map(|(a, s)| {
                            s.penalised_until.filter(|&t| t > at).map(|t| (a.to_string(), (t - at).as_millis() as u64))
                        })
                        .collect();
                    (unreachable, penalties)
                };
                // Agents that already failed during this login go to the very back.
                for t in &tried {
                    penalties.insert(t.clone(), u64::MAX);
                }
                let _ = now;
                let input = placement::PlacementInput {
                    subcluster: &sub,
                    user: &req.user,
                    user_agents: &user_agents,
                    draining: &cfg.agents.draining,
                    weights: &cfg.agents.weights,
                    users_per_agent: &users_per_agent,
                    unreachable: &unreachable,
                    penalties: &penalties,
                };
                placement::choose_agent(&input)
            };
            let agent = match chosen {
                Ok(a) => a,
                Err(e) => {
                    return Err(match last_error {
                        Some(le) => BrokerError::StartFailed(le),
                        None => BrokerError::NoAgentAvailable(e.to_string()),
                    })
                }
            };
            tried.insert(agent.clone());
            let id = SessionId::random();
            match self.inner.agents.start(&agent, id.clone(), &req.user, req.geometry.clone()).await {
                Ok(started) => {
                    self.registry().record_success(&agent, Instant::now());
                    let now = now_ms();
                    let s = session_from_agent(&started, &agent, &sub.name, now, req.client_address.as_deref());
                    self.commit(Write::Upsert(s.clone())).await?;
                    self.inner.metrics.session_creates.inc();
                    tracing::info!(session_id = %s.id, user = %s.user, agent = %agent, display = s.display, "session created");
                    run_hooks(&cfg.vsmserver.session_startup_dir, HookEvent::Startup, &s, self.inner.hook_timeout)
                        .await;
                    return Ok(info(&s, false));
                }
                Err(e) => {
                    tracing::warn!(user = %req.user, agent = %agent, error = %e, "agent failed to start a session; moving it to the back of the queue");
                    self.note_agent_failure(&agent, &e);
                    self.registry().penalise(&agent, Instant::now());
                    last_error = Some(format!("agent {agent}: {e}"));
                }
            }
        }
        Err(BrokerError::StartFailed(last_error.unwrap_or_else(|| "no agent could start it".into())))
    }

    fn note_agent_failure(&self, agent: &str, e: &AgentCallError) {
        self.registry().record_failure(agent, e, Instant::now());
    }

    async fn user_sessions(&self, user: &str) -> Result<Vec<Session>, BrokerError> {
        Ok(self.inner.db.list(&SessionFilter { user: Some(user.to_string()), ..Default::default() }).await?)
    }

    /// The caller's own sessions.
    pub async fn my_sessions(&self, user: &str) -> Result<Vec<Session>, BrokerError> {
        self.user_sessions(user).await
    }

    /// Ends one of `user`'s sessions. Another user's session is reported as not found, so
    /// nobody learns which ids exist.
    pub async fn terminate_mine(&self, user: &str, id: &SessionId) -> Result<Session, BrokerError> {
        let _guard = self.lock_user(user).await;
        let s = match self.inner.db.get(id).await? {
            Some(s) if s.user == user => s,
            _ => return Err(BrokerError::NotFound(format!("you have no session with id {id}"))),
        };
        self.end_session(&s, false).await.map_err(BrokerError::StartFailed)?;
        Ok(s)
    }

    /// Asks the agent to end a session and removes it. An unreachable agent fails the call
    /// unless `abandon` is set, in which case the master forgets the session.
    /// Returns `Ok(true)` if terminated, `Ok(false)` if abandoned.
    async fn end_session(&self, s: &Session, abandon: bool) -> Result<bool, String> {
        match self.inner.agents.terminate(&s.agent, s.id.clone(), s.display).await {
            Ok(_) => {
                self.commit(Write::Delete(s.id.clone())).await.map_err(|e| e.to_string())?;
                tracing::info!(session_id = %s.id, user = %s.user, agent = %s.agent, "session terminated");
                Ok(true)
            }
            Err(e) if abandon && matches!(e, AgentCallError::Unreachable { .. }) => {
                self.commit(Write::Delete(s.id.clone())).await.map_err(|e| e.to_string())?;
                tracing::warn!(session_id = %s.id, user = %s.user, agent = %s.agent, "unreachable session abandoned; processes may remain on the agent");
                Ok(false)
            }
            Err(e) => {
                self.note_agent_failure(&s.agent, &e);
                if matches!(e, AgentCallError::Unreachable { .. }) {
                    Err(format!("agent {} is unreachable ({e}); use --allow-abandon to forget the session", s.agent))
                } else {
                    Err(e.to_string())
                }
            }
        }
    }

    /// Stores a session record as given (admin import); answered after replication.
    pub async fn put(&self, s: Session) -> Result<(), BrokerError> {
        if s.id.0.is_empty() || s.user.is_empty() || s.agent.is_empty() {
            return Err(BrokerError::BadRequest("a session record needs an id, a user and an agent".into()));
        }
        self.commit(Write::Upsert(s)).await
    }

    /// Admin listing.
    pub async fn list(&self, sel: &Selector) -> Result<Vec<Session>, BrokerError> {
        Ok(self.inner.db.list(&filter(sel)).await?)
    }

    /// Admin termination; `dry_run` only returns the selection.
    pub async fn terminate(
        &self,
        sel: &Selector,
        all: bool,
        allow_abandon: bool,
        dry_run: bool,
    ) -> Result<TerminateOutcome, BrokerError> {
        if sel.is_empty() && !all {
            return Err(BrokerError::BadRequest(
                "terminate needs a selector (--user, --agent, --display, --subcluster) or --all".into(),
            ));
        }
        let selected = self.list(sel).await?;
        let mut out = TerminateOutcome::default();
        if dry_run {
            out.terminated = selected;
            return Ok(out);
        }
        for s in selected {
            let _guard = self.lock_user(&s.user).await;
            match self.end_session(&s, allow_abandon).await {
                Ok(true) => out.terminated.push(s),
                Ok(false) => out.abandoned.push(s),
                Err(reason) => out.failed.push((s, reason)),
            }
        }
        Ok(out)
    }

    /// An agent says a session's process ended.
    pub async fn session_exited(&self, id: &SessionId, exit_status: Option<i32>) -> Result<(), BrokerError> {
        if let Some(s) = self.inner.db.get(id).await? {
            let _guard = self.lock_user(&s.user).await;
            tracing::info!(session_id = %id, user = %s.user, agent = %s.agent, ?exit_status, "session ended on its agent");
            self.commit(Write::Delete(id.clone())).await?;
        }
        Ok(())
    }

    /// Every agent the broker knows: configured ones and those hosting known sessions.
    async fn known_agents(&self) -> Result<BTreeSet<String>, BrokerError> {
        let mut set: BTreeSet<String> =
            self.inner.cfg.subclusters.values().flat_map(|s| s.agents.iter().cloned()).collect();
        for s in self.inner.db.list(&SessionFilter::default()).await? {
            set.insert(s.agent);
        }
        Ok(set)
    }

    /// Polls every agent at once and brings the database in line with what they run.
    pub async fn reconcile_all(&self) -> Result<ReconcileSummary, BrokerError> {
        let agents = self.known_agents().await?;
        let mut set = tokio::task::JoinSet::new();
        for agent in agents {
            let client = self.inner.agents.clone();
            set.spawn(async move {
                let r = client.list(&agent).await;
                (agent, r)
            });
        }
        let mut summary = ReconcileSummary::default();
        while let Some(joined) = set.join_next().await {
            let Ok((agent, result)) = joined else { continue };
            match result {
                Ok((sessions, load)) => {
                    self.registry().record_load(&agent, load, Instant::now());
                    summary.reachable += 1;
                    self.reconcile_agent(&agent, &sessions, &mut summary).await?;
                }
                Err(e) => {
                    summary.unreachable += 1;
                    self.note_agent_failure(&agent, &e);
                    tracing::warn!(agent = %agent, error = %e, "agent did not answer the session poll");
                    if matches!(e, AgentCallError::Unreachable { .. }) {
                        for mut s in self
                            .inner
                            .db
                            .list(&SessionFilter { agent: Some(agent.clone()), ..Default::default() })
                            .await?
                        {
                            if s.status != SessionStatus::Unreachable {
                                s.status = SessionStatus::Unreachable;
                                self.commit(Write::Upsert(s)).await?;
                                summary.marked_unreachable += 1;
                            }
                        }
                    }
                }
            }
        }
        Ok(summary)
    }

    async fn reconcile_agent(
        &self,
        agent: &str,
        running: &[AgentSession],
        summary: &mut ReconcileSummary,
    ) -> Result<(), BrokerError> {
        let known = self.inner.db.list(&SessionFilter { agent: Some(agent.to_string()), ..Default::default() }).await?;
        let by_id: HashMap<&SessionId, &AgentSession> = running.iter().map(|a| (&a.session_id, a)).collect();
        for s in &known {
            match by_id.get(&s.id) {
                Some(_) if s.status == SessionStatus::Unreachable => {
                    let mut u = s.clone();
                    u.status = SessionStatus::Disconnected;
                    self.commit(Write::Upsert(u)).await?;
                    summary.back += 1;
                }
                Some(_) => {}
                None => {
                    // A session created after the agent answered is not in `running` yet but
                    // is also younger than this poll: leave it for the next round.
                    if now_ms().saturating_sub(s.created_ms) < 2_000 {
                        continue;
                    }
                    tracing::info!(session_id = %s.id, user = %s.user, agent = %agent, "session vanished from its agent, removing it");
                    self.commit(Write::Delete(s.id.clone())).await?;
                    summary.vanished += 1;
                }
            }
        }
        let known_ids: BTreeSet<&SessionId> = known.iter().map(|s| &s.id).collect();
        for a in running {
            if known_ids.contains(&a.session_id) {
                continue;
            }
            if self.inner.db.get(&a.session_id).await?.is_some() {
                continue; // known under another agent name; leave it
            }
            let groups = user_groups(&a.user);
            let sub = placement::resolve_subcluster(&a.user, &groups, &self.inner.cfg.subclusters)
                .map(|s| s.name.clone())
                .unwrap_or_default();
            let mut s = session_from_agent(a, agent, &sub, a.started_ms, None);
            s.status = SessionStatus::Disconnected;
            s.last_connect_ms = 0;
            tracing::info!(session_id = %s.id, user = %s.user, agent = %agent, display = s.display, "recovered a session the database did not know");
            self.commit(Write::Upsert(s)).await?;
            summary.recovered += 1;
        }
        Ok(())
    }

    /// Per known agent: reachability and live sessions by state, from one grouped count (no
    /// session rows read), for the metrics.
    pub async fn agent_overview(&self) -> Result<Vec<AgentOverview>, BrokerError> {
        let counts = self.inner.db.count_sessions().await?;
        let mut by_agent: BTreeMap<String, HashMap<SessionStatus, u64>> = self
            .inner
            .cfg
            .subclusters
            .values()
            .flat_map(|s| s.agents.iter().map(|a| (a.clone(), HashMap::new())))
            .collect();
        for c in counts {
            *by_agent.entry(c.agent).or_default().entry(c.status).or_default() += c.count;
        }
        let reg = self.registry();
        Ok(by_agent
            .into_iter()
            .map(|(agent, sessions)| AgentOverview {
                reachable: reg.get(&agent).map(|s| s.reachable).unwrap_or(false),
                agent,
                sessions,
            })
            .collect())
    }

    /// Rows of `tlctl load list`.
    pub async fn loads(&self) -> Result<Vec<AgentLoad>, BrokerError> {
        let cfg = &self.inner.cfg;
        let agents = self.known_agents().await?;
        let sessions = self.inner.db.list(&SessionFilter::default()).await?;
        let now = Instant::now();
        let reg = self.registry();
        Ok(agents
            .into_iter()
            .map(|agent| {
                let mine: Vec<&Session> = sessions.iter().filter(|s| s.agent == agent).collect();
                let users: BTreeSet<&str> = mine.iter().map(|s| s.user.as_str()).collect();
                let st = reg.get(&agent);
                AgentLoad {
                    subclusters: cfg
                        .subclusters
                        .values()
                        .filter(|s| s.agents.contains(&agent))
                        .map(|s| s.name.clone())
                        .collect(),
                    reachable: st.map(|s| s.reachable).unwrap_or(false),
                    draining: cfg.agents.draining.contains(&agent),
                    weight: cfg.agents.weights.get(&agent).copied().unwrap_or(100),
                    vsm_users: users.len() as u32,
                    sessions: mine.len() as u32,
                    updated_ms_ago: st
                        .and_then(|s| s.last_contact)
                        .map(|t| now.saturating_duration_since(t).as_millis() as u64),
                    load: st.and_then(|s| s.load.clone()),
                    penalised_ms: st
                        .and_then(|s| s.penalised_until)
                        .filter(|&t| t > now)
                        .map(|t| (t - now).as_millis() as u64),
                    agent,
                }
            })
            .collect())
    }
}

/// One agent as the metrics show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentOverview {
    pub agent: String,
    /// Answered its last call (an agent never called yet counts as unreachable, as in
    /// `tlctl load list`).
    pub reachable: bool,
    /// Live sessions by state; states without sessions are absent.
    pub sessions: HashMap<SessionStatus, u64>,
}

/// What one reconciliation round did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReconcileSummary {
    pub reachable: usize,
    pub unreachable: usize,
    pub recovered: usize,
    pub vanished: usize,
    pub marked_unreachable: usize,
    pub back: usize,
}

fn filter(sel: &Selector) -> SessionFilter {
    SessionFilter {
        user: sel.user.clone(),
        agent: sel.agent.clone(),
        display: sel.display,
        subcluster: sel.subcluster.clone(),
        ..Default::default()
    }
}

fn info(s: &Session, reconnected: bool) -> ConnectInfo {
    ConnectInfo {
        session_id: s.id.clone(),
        user: s.user.clone(),
        agent: s.agent.clone(),
        agent_address: s.agent_address.clone(),
        display: s.display,
        vnc_port: s.vnc_port,
        reconnected,
    }
}

fn session_from_agent(a: &AgentSession, agent: &str, subcluster: &str, now: u64, client: Option<&str>) -> Session {
    Session {
        id: a.session_id.clone(),
        user: a.user.clone(),
        subcluster: subcluster.to_string(),
        agent: agent.to_string(),
        agent_address: a.agent_address.clone(),
        display: a.display,
        vnc_port: a.vnc_port,
        status: SessionStatus::Running,
        created_ms: if a.started_ms > 0 { a.started_ms } else { now },
        last_connect_ms: now,
        last_client_address: client.unwrap_or_default().to_string(),
        pid: a.pid,
        command: a.command.clone(),
        geometry: a.geometry.clone(),
        client_params: vec![],
    }
}

/// Names of the groups `user` belongs to on this machine (primary and supplementary).
pub fn user_groups(user: &str) -> Vec<String> {
    use nix::unistd::{getgrouplist, Group, User};
    let Ok(Some(u)) = User::from_name(user) else { return vec![] };
    let Ok(cname) = std::ffi::CString::new(user) else { return vec![] };
    let gids = getgrouplist(&cname, u.gid).unwrap_or_else(|_| vec![u.gid]);
    gids.into_iter().filter_map(|g| Group::from_gid(g).ok().flatten().map(|g| g.name)).collect()
}
