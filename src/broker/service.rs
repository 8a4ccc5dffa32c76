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
//! - What a user or admin is told is what happens: a start given up after its request went
//!   out is recorded as abandoned (a replicated tombstone) and its desktop ended; a
//!   terminate without an answer is reported as pending and carried out by reconciliation; a
//!   terminate that never reached the agent is reported as failed and has no effect.
//!   Reconciliation never adopts a desktop whose id has a tombstone: it ends it.
//! - Cut off from the peer (HA on, link not caught up), the broker makes no decision the
//!   peer could contradict unseen: no "pending" terminate (reported as unknown instead, the
//!   session still listed) and no
//!   adoption of unknown desktops (left for when the link is back). An ended session is
//!   never written live again (the database refuses it; see `Broker::update`).
//! - Every answer from an agent marks it reachable; every failure is counted.

use crate::agent::registry::DEFAULT_PENALTY;
use crate::agent::{AgentCallError, AgentClient, AgentRegistry};
use crate::broker::hooks::{run_hooks, HookEvent};
use crate::broker::placement;
use crate::config::Config;
use crate::db::{DbError, DbHandle, SessionFilter, Write};
use crate::ha::handle::{AdoptionGate, Replication};
use crate::metrics::Metrics;
use crate::model::{now_ms, Session, SessionId, SessionStatus};
use crate::proto::agent::AgentSession;
use crate::proto::api::{AgentLoad, ConnectInfo, Selector, TerminateOutcome};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
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
    #[error("could not end the session: {0}")]
    TerminateFailed(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("session database: {0}")]
    Db(#[from] DbError),
}

/// No peer: a local commit is all there is.
pub struct Standalone;

impl Replication for Standalone {}

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
    /// Sessions this master asked an agent to start and has not stored yet, with that agent:
    /// reconciliation leaves them alone, and placement counts them as users of their agent
    /// (so a burst of logins spreads instead of all picking the agent that was least loaded
    /// when it began). Entries leave when the start ends, however it ends.
    starting: Mutex<HashMap<SessionId, String>>,
    /// Agents whose clock offset is beyond `/HA/max_clock_offset` (logged once per crossing).
    clock_alarms: Mutex<HashSet<String>>,
    hook_timeout: Duration,
    metrics: Metrics,
    abandoned: Mutex<VecDeque<SessionId>>,
    /// Desktops found running but unknown to the database, with their agent and when first
    /// seen so; adopted once [`AdoptionGate`] allows. Entries leave when adopted or ended,
    /// or when their agent no longer runs them.
    unknown_seen: Mutex<HashMap<SessionId, (String, Instant)>>,
}

/// Removes a session from the broker's starts under way when the start ends, however it ends.
struct StartGuard<'a> {
    broker: &'a Broker,
    id: SessionId,
}

impl Drop for StartGuard<'_> {
    fn drop(&mut self) {
        self.broker.starting().remove(&self.id);
    }
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
                starting: Mutex::new(HashMap::new()),
                clock_alarms: Mutex::new(HashSet::new()),
                hook_timeout: Duration::from_secs(30),
                abandoned: Mutex::new(VecDeque::new()),
                unknown_seen: Mutex::new(HashMap::new()),
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

    fn starting(&self) -> std::sync::MutexGuard<'_, HashMap<SessionId, String>> {
        self.inner.starting.lock().unwrap_or_else(|p| p.into_inner())
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
        self.inner.replication.commit(&self.inner.db, w).await?;
        Ok(())
    }

    /// Stores a changed session; `false` when it ended meanwhile (a terminate, an exit report
    /// or the peer's delete got there first), in which case nothing was written: an ended
    /// session is never brought back.
    async fn update(&self, s: Session) -> Result<bool, BrokerError> {
        match self.commit(Write::Upsert(s)).await {
            Ok(()) => Ok(true),
            Err(BrokerError::Db(DbError::Ended(id))) => {
                tracing::info!(session_id = %id, "session ended while it was being updated; left ended");
                Ok(false)
            }
            Err(e) => Err(e),
        }
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
                    // A pending end is no longer listed and is carried out when the agent
                    // answers again, so it no longer counts against the limit.
                    Ok(_) => {}
                    Err(reason) => {
                        return Err(BrokerError::TerminateFailed(format!(
                            "your existing session {} on {}: {reason}",
                            s.id, s.agent
                        )))
                    }
                }
            }
        }

        let mut unreachable = Vec::new();
        if !req.new {
            for s in &sessions {
                let verified = self.inner.agents.verify(&s.agent, s.id.clone(), s.display).await;
                self.note_outcome(&s.agent, &verified);
                match verified {
                    Ok(true) => return self.reconnect(s.clone(), &req).await,
                    Ok(false) => {
                        tracing::info!(session_id = %s.id, user = %s.user, agent = %s.agent, "session no longer alive on its agent, removing it");
                        self.commit(Write::Delete(s.id.clone())).await?;
                    }
                    Err(e) => {
                        tracing::warn!(session_id = %s.id, agent = %s.agent, error = %e, "cannot verify session");
                        if s.status != SessionStatus::Unreachable {
                            let mut u = s.clone();
                            u.status = SessionStatus::Unreachable;
                            if !self.update(u).await? {
                                continue;
                            }
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
        if !self.update(s.clone()).await? {
            return Err(BrokerError::NotFound(format!(
                "your session {} ended while you were reconnecting to it (terminated, or its desktop exited); connect again for a new one",
                s.id
            )));
        }
        tracing::info!(session_id = %s.id, user = %s.user, agent = %s.agent, display = s.display, "reconnected");
        run_hooks(&self.inner.cfg.vsmserver.session_reconnect_dir, HookEvent::Reconnect, &s, self.inner.hook_timeout)
            .await;
        Ok(info(&s, true, &self.inner.cfg))
    }

    async fn create(&self, req: &ConnectRequest, live: &[Session]) -> Result<ConnectInfo, BrokerError> {
        let cfg = &self.inner.cfg;
        let sub = placement::resolve_subcluster(&req.user, &req.groups, &cfg.subclusters)
            .map_err(|e| BrokerError::NoAgentAvailable(e.to_string()))?;
        let user_agents: Vec<String> = live.iter().map(|s| s.agent.clone()).collect();
        let mut tried: BTreeSet<String> = BTreeSet::new();
        let mut last_error = None;
        for _ in 0..sub.agents.len().max(1) {
            let id = SessionId::generate();
            let agent = match self.place(sub, &req.user, &user_agents, &tried, &id) {
                Ok(a) => a,
                Err(e) => {
                    return Err(match last_error {
                        Some(le) => BrokerError::StartFailed(le),
                        None => BrokerError::NoAgentAvailable(e.to_string()),
                    })
                }
            };
            tried.insert(agent.clone());
            // The creation time is this master's clock when it asked, not the agent's.
            let asked = now_ms();
            let _start = StartGuard { broker: self, id: id.clone() };
            match self.inner.agents.start(&agent, id.clone(), &req.user, req.geometry.clone()).await {
                Ok(started) => {
                    self.registry().record_success(&agent, Instant::now());
                    let s = session_from_agent(&started, &agent, &sub.name, asked, req.client_address.as_deref());
                    if let Err(e) = self.commit(Write::Upsert(s.clone())).await {
                        // The desktop runs but the user is told it failed: end it at once.
                        tracing::warn!(session_id = %id, user = %req.user, agent = %agent, error = %e, "could not record a started session; ending it");
                        self.abandon_start(&agent, &id, Some(started.display)).await;
                        return Err(e);
                    }
                    self.inner.metrics.session_creates.inc();
                    tracing::info!(session_id = %s.id, user = %s.user, agent = %agent, display = s.display, "session created");
                    run_hooks(&cfg.vsmserver.session_startup_dir, HookEvent::Startup, &s, self.inner.hook_timeout)
                        .await;
                    return Ok(info(&s, false, cfg));
                }
                Err(e) => {
                    tracing::warn!(user = %req.user, agent = %agent, error = %e, "agent failed to start a session; moving it to the back of the queue");
                    self.note_agent_failure(&agent, &e);
                    self.registry().penalise(&agent, Instant::now());
                    if e.outcome_unknown() {
                        self.abandon_start(&agent, &id, None).await;
                    }
                    last_error = Some(format!("agent {agent}: {e}"));
                }
            }
        }
        Err(BrokerError::StartFailed(last_error.unwrap_or_else(|| "no agent could start it".into())))
    }

    /// Chooses the agent for a new session `id` of `user` and enters it among the starts
    /// under way, in one step: every choice counts the starts chosen before it (as users of
    /// their agents, on top of the database's count of users per agent), so a burst of logins
    /// spreads over the agents instead of all taking the one least loaded when it began.
    /// Agents in `tried` (they failed during this login) go to the very back.
    fn place(
        &self,
        sub: &crate::config::Subcluster,
        user: &str,
        user_agents: &[String],
        tried: &BTreeSet<String>,
        id: &SessionId,
    ) -> Result<String, placement::PlacementError> {
        let cfg = &self.inner.cfg;
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
        for t in tried {
            penalties.insert(t.clone(), u64::MAX);
        }
        let mut starting = self.starting();
        let mut starting_per_agent: rustc_hash::FxHashMap<&str, u32> = Default::default();
        for agent in starting.values() {
            *starting_per_agent.entry(agent.as_str()).or_default() += 1;
        }
        let agent = self.inner.db.users_per_agent().read(|users_per_agent| {
            placement::choose_agent(&placement::PlacementInput {
                subcluster: sub,
                user,
                user_agents,
                draining: &cfg.agents.draining,
                weights: &cfg.agents.weights,
                users_per_agent,
                starting: &starting_per_agent,
                unreachable: &unreachable,
                penalties: &penalties,
            })
        })?;
        starting.insert(id.clone(), agent.clone());
        Ok(agent)
    }

    /// A start the user is told failed, although the agent may have carried it out: record
    /// the session id as abandoned (a tombstone, replicated like any delete, so neither master
    /// ever adopts the desktop) and end the desktop now if its display is known, else by
    /// reconciling with the agent in the background (which ends desktops with tombstones).
    async fn abandon_start(&self, agent: &str, id: &SessionId, display: Option<u32>) {
        self.note_abandoned(id);
        if let Err(e) = self.commit(Write::Delete(id.clone())).await {
            tracing::warn!(session_id = %id, agent = %agent, error = %e, "could not record an abandoned start; only this master knows it");
        }
        match display {
            Some(d) => {
                let ended = self.inner.agents.terminate(agent, id.clone(), d).await;
                self.note_outcome(agent, &ended);
                if let Err(e) = ended {
                    tracing::warn!(session_id = %id, agent = %agent, error = %e, "could not end the desktop of an abandoned start now; reconciliation will");
                }
            }
            None => {
                let b = self.clone();
                let agent = agent.to_string();
                tokio::spawn(async move {
                    if let Err(e) = b.reconcile_agents([agent].into()).await {
                        tracing::warn!(error = %e, "reconciliation after an abandoned start failed");
                    }
                });
            }
        }
    }

    /// Remembers an abandoned start in memory too, for when even the tombstone cannot be
    /// written; bounded, the oldest forgotten first.
    fn note_abandoned(&self, id: &SessionId) {
        let mut a = self.inner.abandoned.lock().unwrap_or_else(|p| p.into_inner());
        if a.len() >= ABANDONED_KEPT {
            a.pop_front();
        }
        a.push_back(id.clone());
    }

    fn is_abandoned(&self, id: &SessionId) -> bool {
        self.inner.abandoned.lock().unwrap_or_else(|p| p.into_inner()).contains(id)
    }

    fn note_agent_failure(&self, agent: &str, e: &AgentCallError) {
        self.registry().record_failure(agent, e, Instant::now());
    }

    /// Feeds the outcome of any agent call to the registry: every answer marks the agent
    /// reachable, every failure counts against it.
    fn note_outcome<T>(&self, agent: &str, r: &Result<T, AgentCallError>) {
        match r {
            Ok(_) => self.registry().record_success(agent, Instant::now()),
            Err(e) => self.note_agent_failure(agent, e),
        }
    }

    /// The user's live sessions as committed, read without waiting for a commit in progress:
    /// it includes every write answered before it was asked (the caller's own, under the
    /// user's lock, among them).
    async fn user_sessions(&self, user: &str) -> Result<Vec<Session>, BrokerError> {
        let filter = SessionFilter { user: Some(user.to_string()), ..Default::default() };
        Ok(self.inner.db.list_committed(&filter).await?)
    }

    /// The caller's own sessions.
    pub async fn my_sessions(&self, user: &str) -> Result<Vec<Session>, BrokerError> {
        self.user_sessions(user).await
    }

    /// Ends one of `user`'s sessions. Another user's session is reported as not found, so
    /// nobody learns which ids exist.
    pub async fn terminate_mine(&self, user: &str, id: &SessionId) -> Result<TerminateOutcome, BrokerError> {
        let _guard = self.lock_user(user).await;
        let s = match self.inner.db.get(id).await? {
            Some(s) if s.user == user => s,
            _ => return Err(BrokerError::NotFound(format!("you have no session with id {id}"))),
        };
        let mut out = TerminateOutcome::default();
        match self.end_session(&s, false).await.map_err(BrokerError::TerminateFailed)? {
            Ended::Terminated => out.terminated.push(s),
            Ended::Abandoned => out.abandoned.push(s),
            Ended::Pending(why) => out.pending.push((s, why)),
            Ended::Unknown(why) => out.unknown.push((s, why)),
        }
        Ok(out)
    }

    /// Asks the agent to end a session and removes it.
    /// - The agent answered: terminated.
    /// - The request went out but no answer came: the agent may have ended it or may not;
    ///   the session is removed and its desktop ended by reconciliation as soon as the agent
    ///   answers again (pending), so what the caller is told always happens.
    /// - The agent could not be reached at all: nothing was done and nothing will be
    ///   (failed), unless `abandon` is set, in which case the master forgets the session and
    ///   reconciliation ends its desktop if the agent ever answers again.
    async fn end_session(&self, s: &Session, abandon: bool) -> Result<Ended, String> {
        let ended = self.inner.agents.terminate(&s.agent, s.id.clone(), s.display).await;
        self.note_outcome(&s.agent, &ended);
        match ended {
            Ok(_) => {
                // The desktop is gone whatever the database says next, so the caller is told
                // it ended; a record that cannot be removed now (a full disk) is removed by
                // reconciliation, which finds the session gone from its agent.
                match self.commit(Write::Delete(s.id.clone())).await {
                    Ok(()) => {
                        tracing::info!(session_id = %s.id, user = %s.user, agent = %s.agent, "session terminated")
                    }
                    Err(e) => {
                        tracing::warn!(session_id = %s.id, user = %s.user, agent = %s.agent, error = %e, "session terminated on its agent, but its record could not be removed now; reconciliation removes it")
                    }
                }
                Ok(Ended::Terminated)
            }
            // A pending end is a decision the peer must hear of before anyone can reconnect
            // the session through it; cut off from the peer, report what is known instead.
            Err(e) if e.outcome_unknown() && self.inner.replication.cut_off() => {
                tracing::warn!(session_id = %s.id, user = %s.user, agent = %s.agent, error = %e, "termination not confirmed: the agent did not answer and the peer cannot be told of a pending end; the session stays listed until its agent says");
                Ok(Ended::Unknown(format!(
                    "{e}; the agent may or may not have ended it, and this master cannot reach the \
                     other master to record a pending termination, so the session stays listed until \
                     its agent answers again"
                )))
            }
            Err(e) if e.outcome_unknown() => {
                self.commit(Write::Delete(s.id.clone())).await.map_err(|e| e.to_string())?;
                tracing::warn!(session_id = %s.id, user = %s.user, agent = %s.agent, error = %e, "termination pending: the session is removed and its desktop ended when the agent answers again");
                Ok(Ended::Pending(format!(
                    "termination pending: {e}; the session is no longer listed and will be ended as soon as agent {} answers again",
                    s.agent
                )))
            }
            Err(e) if abandon && e.is_unreachable() => {
                self.commit(Write::Delete(s.id.clone())).await.map_err(|e| e.to_string())?;
                tracing::warn!(session_id = %s.id, user = %s.user, agent = %s.agent, "unreachable session abandoned; its desktop is ended if the agent answers again");
                Ok(Ended::Abandoned)
            }
            Err(e) if e.is_unreachable() => Err(format!(
                "{e}; the session was not ended and stays listed (an admin can forget it with --allow-abandon)"
            )),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Stores a session record as given (admin import); answered after replication.
    pub async fn put(&self, s: Session) -> Result<(), BrokerError> {
        if s.id.0.is_empty() || s.user.is_empty() || s.agent.is_empty() {
            return Err(BrokerError::BadRequest("a session record needs an id, a user and an agent".into()));
        }
        match self.commit(Write::Upsert(s)).await {
            Err(BrokerError::Db(e @ DbError::Ended(_))) => Err(BrokerError::BadRequest(e.to_string())),
            r => r,
        }
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
                Ok(Ended::Terminated) => out.terminated.push(s),
                Ok(Ended::Abandoned) => out.abandoned.push(s),
                Ok(Ended::Pending(why)) => out.pending.push((s, why)),
                Ok(Ended::Unknown(why)) => out.unknown.push((s, why)),
                Err(reason) => out.failed.push((s, reason)),
            }
        }
        Ok(out)
    }

    /// An agent at `from` says a session's process ended. Only the agent hosting the session
    /// (its name resolves to `from`, or it reported `from` as its address) on the session's
    /// display may end it; any other report is logged and ignored, so that a holder of the
    /// cluster key cannot delete other agents' sessions.
    pub async fn session_exited(
        &self,
        id: &SessionId,
        display: u32,
        from: std::net::IpAddr,
        exit_status: Option<i32>,
    ) -> Result<(), BrokerError> {
        let Some(s) = self.inner.db.get(id).await? else { return Ok(()) };
        if s.display != display || !reported_by_host(&s, from, self.inner.agents.port()).await {
            let reported = display;
            tracing::warn!(session_id = %id, agent = %s.agent, display = reported, from = %from, "ignoring an exit report that does not come from the session's agent and display");
            return Ok(());
        }
        let _guard = self.lock_user(&s.user).await;
        tracing::info!(session_id = %id, user = %s.user, agent = %s.agent, ?exit_status, "session ended on its agent");
        self.commit(Write::Delete(id.clone())).await?;
        Ok(())
    }

    /// Every agent the broker knows: configured ones and those hosting known sessions.
    async fn known_agents(&self) -> Result<BTreeSet<String>, BrokerError> {
        Ok(self.known_before_poll().await?.0)
    }

    /// The agents to poll and the ids of every session stored now, read before any poll
    /// is sent: a session stored by then was running on its agent before the poll left,
    /// so an answer without it means the desktop is gone.
    async fn known_before_poll(&self) -> Result<(BTreeSet<String>, HashSet<SessionId>), BrokerError> {
        let mut set: BTreeSet<String> =
            self.inner.cfg.subclusters.values().flat_map(|s| s.agents.iter().cloned()).collect();
        let mut ids = HashSet::new();
        // Read off the database thread: a full listing there would hold up every commit
        // for its length (half a second with 100,000 sessions).
        for (id, agent) in self.inner.db.live_ids().await? {
            set.insert(agent);
            ids.insert(id);
        }
        Ok((set, ids))
    }

    /// Agents the registry counts as unreachable: the ones to probe until they answer again.
    pub fn unreachable_agents(&self) -> Vec<String> {
        self.registry().iter().filter(|(_, s)| !s.reachable).map(|(a, _)| a.to_string()).collect()
    }

    /// Asks `agent` for its load and records the outcome; true when it answered.
    pub async fn probe(&self, agent: &str) -> bool {
        match self.inner.agents.load(agent).await {
            Ok(load) => {
                if self.registry().get(agent).is_some_and(|s| !s.reachable) {
                    tracing::info!(agent = %agent, "agent answers again");
                }
                let offset = self.registry().record_load(agent, load, Instant::now(), now_ms());
                self.check_agent_clock(agent, offset);
                true
            }
            Err(e) => {
                self.note_agent_failure(agent, &e);
                false
            }
        }
    }

    /// Asks every known agent for its load at once (`tlctl load list --refresh`).
    pub async fn refresh_loads(&self) -> Result<(), BrokerError> {
        let mut set = tokio::task::JoinSet::new();
        for agent in self.known_agents().await? {
            let b = self.clone();
            set.spawn(async move { b.probe(&agent).await });
        }
        while set.join_next().await.is_some() {}
        Ok(())
    }

    /// Polls every agent at once and brings the database in line with what they run.
    ///
    /// Whether a session missing from an agent's answer is gone or merely younger than the
    /// poll is decided by order on this master alone, never by comparing clocks of two
    /// machines: only sessions this database held before the poll was sent, and whose start
    /// this master is not still waiting for, are removed.
    pub async fn reconcile_all(&self) -> Result<ReconcileSummary, BrokerError> {
        let (agents, before) = self.known_before_poll().await?;
        self.reconcile_with(agents, &before).await
    }

    /// Polls `agents` at once and brings the database in line with what they run.
    pub async fn reconcile_agents(&self, agents: BTreeSet<String>) -> Result<ReconcileSummary, BrokerError> {
        let before = self.known_before_poll().await?.1;
        self.reconcile_with(agents, &before).await
    }

    /// Polls `agents` at once; `before` holds the ids of the sessions stored before any poll left.
    async fn reconcile_with(
        &self,
        agents: BTreeSet<String>,
        before: &HashSet<SessionId>,
    ) -> Result<ReconcileSummary, BrokerError> {
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
                    let offset = self.registry().record_load(&agent, load, Instant::now(), now_ms());
                    self.check_agent_clock(&agent, offset);
                    summary.reachable += 1;
                    self.reconcile_agent(&agent, &sessions, before, &mut summary).await?;
                }
                Err(e) => {
                    summary.unreachable += 1;
                    self.note_agent_failure(&agent, &e);
                    tracing::warn!(agent = %agent, error = %e, "agent did not answer the session poll");
                    if e.is_unreachable() {
                        for mut s in self
                            .inner
                            .db
                            .list(&SessionFilter { agent: Some(agent.clone()), ..Default::default() })
                            .await?
                        {
                            if s.status != SessionStatus::Unreachable {
                                s.status = SessionStatus::Unreachable;
                                if self.update(s).await? {
                                    summary.marked_unreachable += 1;
                                }
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
        before: &HashSet<SessionId>,
        summary: &mut ReconcileSummary,
    ) -> Result<(), BrokerError> {
        let known = self.inner.db.list(&SessionFilter { agent: Some(agent.to_string()), ..Default::default() }).await?;
        let by_id: HashMap<&SessionId, &AgentSession> = running.iter().map(|a| (&a.session_id, a)).collect();
        for s in &known {
            match by_id.get(&s.id) {
                Some(a) => {
                    let u = with_viewer_state(s, a);
                    if s.status == SessionStatus::Unreachable {
                        summary.back += 1;
                    }
                    if &u != s {
                        self.update(u).await?;
                    }
                }
                None => {
                    // A session stored after the poll was sent (created here or by the peer)
                    // may be missing from an answer given before it existed, and a start still
                    // under way is not finished: both wait for the next round.
                    if !before.contains(&s.id) || self.starting().contains_key(&s.id) {
                        continue;
                    }
                    tracing::info!(session_id = %s.id, user = %s.user, agent = %agent, "session vanished from its agent, removing it");
                    self.commit(Write::Delete(s.id.clone())).await?;
                    summary.vanished += 1;
                }
            }
        }
        let known_ids: BTreeSet<&SessionId> = known.iter().map(|s| &s.id).collect();
        self.forget_unknown_gone(agent, running, &known_ids);
        for a in running {
            // A start of this master still under way is stored or abandoned when it ends.
            if known_ids.contains(&a.session_id) || self.starting().contains_key(&a.session_id) {
                continue;
            }
            match self.inner.db.record(&a.session_id).await? {
                Some(r) if r.session.is_some() => continue, // known under another agent name; leave it
                // Ended, pending termination, or a start nobody was told about: never adopt.
                Some(_) => {
                    self.end_unlisted(agent, a, "the database records it as ended").await;
                    summary.ended += 1;
                    continue;
                }
                None if self.is_abandoned(&a.session_id) => {
                    self.end_unlisted(agent, a, "its start was abandoned").await;
                    summary.ended += 1;
                    continue;
                }
                None => {}
            }
            // The other master may have recorded this desktop's start as abandoned or the
            // session as ended while the two were apart, or may still be starting it: adopt
            // only once it would have said so.
            if let Some(why) = self.adoption_wait(agent, &a.session_id) {
                tracing::info!(session_id = %a.session_id, user = %a.user, agent = %agent, "a desktop the database does not know runs on this agent; {why}");
                summary.deferred += 1;
                continue;
            }
            let groups = login_groups(&self.inner.cfg, &a.user);
            let sub = placement::resolve_subcluster(&a.user, &groups, &self.inner.cfg.subclusters)
                .map(|s| s.name.clone())
                .unwrap_or_default();
            // The agent stamped the start with its own clock: move it onto ours.
            let offset = self.registry().get(agent).and_then(|s| s.clock_offset_ms);
            let created = match offset {
                Some(o) if a.started_ms > 0 => (a.started_ms as i128 - o as i128).clamp(0, u64::MAX as i128) as u64,
                _ => now_ms(),
            };
            let mut s = session_from_agent(a, agent, &sub, created, None);
            s.status = SessionStatus::Disconnected;
            s.last_connect_ms = 0;
            if !self.update(s.clone()).await? {
                // Ended here or by the peer since the record was read: end its desktop.
                self.end_unlisted(agent, a, "the database records it as ended").await;
                summary.ended += 1;
                continue;
            }
            self.unknown().remove(&s.id);
            tracing::info!(session_id = %s.id, user = %s.user, agent = %agent, display = s.display, "recovered a session the database did not know");
            summary.recovered += 1;
        }
        Ok(())
    }

    fn unknown(&self) -> std::sync::MutexGuard<'_, HashMap<SessionId, (String, Instant)>> {
        self.inner.unknown_seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Forgets the unknown desktops of `agent` that it no longer runs or that the database
    /// now knows (the peer stored them).
    fn forget_unknown_gone(&self, agent: &str, running: &[AgentSession], known: &BTreeSet<&SessionId>) {
        let ids: HashSet<&SessionId> = running.iter().map(|a| &a.session_id).collect();
        self.unknown().retain(|id, (ag, _)| ag != agent || (ids.contains(id) && !known.contains(id)));
    }

    /// Why a desktop the database does not know must not be adopted yet, if it must not;
    /// notes when it was first seen.
    fn adoption_wait(&self, agent: &str, id: &SessionId) -> Option<String> {
        let now = Instant::now();
        let first = {
            let mut seen = self.unknown();
            if seen.len() >= UNKNOWN_KEPT && !seen.contains_key(id) {
                return Some(format!("{UNKNOWN_KEPT} such desktops are already waiting; it is looked at again later"));
            }
            seen.entry(id.clone()).or_insert_with(|| (agent.to_string(), now)).1
        };
        match self.inner.replication.adoption_gate() {
            AdoptionGate::Now => None,
            AdoptionGate::CutOff => Some("it is looked at again once the peer link is back".into()),
            AdoptionGate::Linked { linked_for, lag } => {
                // The longest the other master can take to store or abandon a start, and to
                // tell this one.
                let hold = self.inner.agents.timeout() + lag;
                let seen_for = now.duration_since(first);
                (seen_for < hold || linked_for < hold).then(|| {
                    format!(
                        "the other master may still be starting it; adopted if it still runs unknown {} s after it was first seen with the peer linked",
                        hold.as_secs()
                    )
                })
            }
        }
    }

    /// Logs when an agent's clock offset crosses `/HA/max_clock_offset` (either way).
    fn check_agent_clock(&self, agent: &str, offset: Option<i64>) {
        let Some(offset) = offset else { return };
        let bound = self.max_clock_offset_ms();
        let exceeded = offset.unsigned_abs() > bound;
        let was = {
            let mut set = self.inner.clock_alarms.lock().unwrap_or_else(|p| p.into_inner());
            if exceeded {
                !set.insert(agent.to_string())
            } else {
                set.remove(agent)
            }
        };
        if exceeded && !was {
            tracing::warn!(
                agent = %agent, offset_ms = offset, max_clock_offset_ms = bound,
                "the agent's clock differs from this master's by more than /HA/max_clock_offset; \
                 session times it reports are corrected by the measured offset: check NTP on the agent"
            );
        } else if !exceeded && was {
            tracing::info!(agent = %agent, offset_ms = offset, "the agent's clock agrees with this master's again");
        }
    }

    fn max_clock_offset_ms(&self) -> u64 {
        u64::try_from(self.inner.cfg.ha.max_clock_offset.as_millis()).unwrap_or(u64::MAX)
    }

    /// Each agent's clock offset as last measured, for `tlctl ha status`.
    pub fn agent_clock_offsets(&self) -> Vec<crate::proto::api::AgentClockOffset> {
        let bound = self.max_clock_offset_ms();
        self.registry()
            .iter()
            .filter_map(|(a, s)| {
                s.clock_offset_ms.map(|offset_ms| crate::proto::api::AgentClockOffset {
                    agent: a.to_string(),
                    offset_ms,
                    exceeded: offset_ms.unsigned_abs() > bound,
                })
            })
            .collect()
    }

    /// Ends a desktop an agent runs that must not run: no client holds it.
    async fn end_unlisted(&self, agent: &str, a: &AgentSession, why: &str) {
        tracing::info!(session_id = %a.session_id, user = %a.user, agent = %agent, display = a.display, "ending a desktop nobody holds: {why}");
        let ended = self.inner.agents.terminate(agent, a.session_id.clone(), a.display).await;
        self.note_outcome(agent, &ended);
        if let Err(e) = ended {
            tracing::warn!(session_id = %a.session_id, agent = %agent, error = %e, "could not end the desktop; the next reconciliation tries again");
        }
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
                    clock_offset_ms: st.and_then(|s| s.clock_offset_ms),
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
    /// Desktops ended because no client holds them (ended, pending or abandoned sessions).
    pub ended: usize,
    /// Desktops the database does not know, left alone while the node is cut off from its
    /// peer (which may know them as ended).
    pub deferred: usize,
}

/// How [`Broker::end_session`] ended a session.
enum Ended {
    Terminated,
    Abandoned,
    /// With what the caller is told.
    Pending(String),
    /// Not confirmed and not recorded (cut off from the peer): still listed; with why.
    Unknown(String),
}

/// Abandoned start ids kept in memory (for when the tombstone cannot be written).
const ABANDONED_KEPT: usize = 4096;

/// Unknown desktops waiting for adoption that are tracked at once.
const UNKNOWN_KEPT: usize = 65_536;

fn filter(sel: &Selector) -> SessionFilter {
    SessionFilter {
        user: sel.user.clone(),
        agent: sel.agent.clone(),
        display: sel.display,
        subcluster: sel.subcluster.clone(),
        ..Default::default()
    }
}

fn info(s: &Session, reconnected: bool, cfg: &Config) -> ConnectInfo {
    ConnectInfo {
        // A private desktop has no port; its socket follows from the display (the agents and
        // masters share `/vsm/vnc_socket_dir`).
        vnc_socket: (s.vnc_port == 0)
            .then(|| crate::proto::agent::vnc_socket_path(&cfg.vsm.vnc_socket_dir, s.display).display().to_string()),
        session_id: s.id.clone(),
        user: s.user.clone(),
        agent: s.agent.clone(),
        agent_address: s.agent_address.clone(),
        display: s.display,
        vnc_port: s.vnc_port,
        reconnected,
    }
}

/// `s` as its agent reports it now: connected while a viewer is attached, else disconnected;
/// the latest attach time and address when the agent saw a viewer the master did not.
fn with_viewer_state(s: &Session, a: &AgentSession) -> Session {
    let mut u = s.clone();
    u.status = if a.viewers > 0 { SessionStatus::Running } else { SessionStatus::Disconnected };
    if a.last_viewer_ms > u.last_connect_ms {
        u.last_connect_ms = a.last_viewer_ms;
        if !a.viewer_address.is_empty() {
            u.last_client_address = a.viewer_address.clone();
        }
    }
    u
}

/// The session an agent reports, created at `now` on this master's clock (never the agent's
/// `started_ms`, which its own clock stamped).
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
        created_ms: now,
        last_connect_ms: now,
        last_client_address: client.unwrap_or_default().to_string(),
        pid: a.pid,
        command: a.command.clone(),
        geometry: a.geometry.clone(),
        client_params: vec![],
    }
}

/// Does `from` belong to the agent hosting `s`: the address the agent reported for clients,
/// or an address its name (as the master reaches it) resolves to?
async fn reported_by_host(s: &Session, from: std::net::IpAddr, port: u16) -> bool {
    let canon = |ip: std::net::IpAddr| match ip {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map(std::net::IpAddr::V4).unwrap_or(std::net::IpAddr::V6(v6)),
        v4 => v4,
    };
    let from = canon(from);
    if s.agent_address.parse::<std::net::IpAddr>().is_ok_and(|a| canon(a) == from) {
        return true;
    }
    let Ok(target) = crate::proto::addr::Target::parse(&s.agent, port) else { return false };
    let found = match tokio::net::lookup_host((target.host.as_str(), target.port)).await {
        Ok(mut addrs) => addrs.any(|a| canon(a.ip()) == from),
        Err(_) => false,
    };
    found
}

/// The groups a login of `user` is decided by: looked up only when a setting uses them
/// ([`Config::login_uses_groups`]), none otherwise.
pub fn login_groups(cfg: &Config, user: &str) -> Vec<String> {
    if cfg.login_uses_groups() {
        user_groups(user)
    } else {
        Vec::new()
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
