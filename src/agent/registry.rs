//! [`AgentRegistry`]: what the master knows about each agent between calls: last load,
//! last contact, reachability, consecutive failures, and the start-failure penalty.
//!
//! Pure data: no I/O, no clock reads (every method takes `now`), no locking. The broker owns
//! one and feeds it the outcome of every agent call.
//!
//! Invariants: an agent is unreachable exactly when its last call failed with
//! `AgentCallError::Unreachable` (or `Refused`) and no call succeeded since; a success resets
//! the failure count; a penalty only ever pushes an agent back in the order, never removes it.

use super::client::AgentCallError;
use crate::proto::agent::LoadReport;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Default time an agent that failed to start a session stays at the back of the queue.
pub const DEFAULT_PENALTY: Duration = Duration::from_secs(60);

/// What the registry knows about one agent.
#[derive(Clone, Debug, PartialEq)]
pub struct AgentState {
    /// Last load figures the agent reported.
    pub load: Option<LoadReport>,
    /// When a call last succeeded (an `AgentReply::Error` counts as contact).
    pub last_contact: Option<Instant>,
    /// False after a failed call until the next success. Agents never called count as reachable.
    pub reachable: bool,
    /// Failed calls since the last success.
    pub consecutive_failures: u32,
    /// Until then the agent goes to the back of the placement queue.
    pub penalised_until: Option<Instant>,
    /// The last failure, for operators.
    pub last_error: Option<String>,
    /// The agent's clock minus the master's, from its last load report that carried one.
    pub clock_offset_ms: Option<i64>,
}

impl Default for AgentState {
    /// A never-contacted agent: reachable until a call fails.
    fn default() -> Self {
        AgentState {
            load: None,
            last_contact: None,
            reachable: true,
            consecutive_failures: 0,
            penalised_until: None,
            last_error: None,
            clock_offset_ms: None,
        }
    }
}

impl AgentState {
    /// Is the agent penalised at `now`?
    pub fn is_penalised(&self, now: Instant) -> bool {
        self.penalised_until.is_some_and(|t| now < t)
    }
}

/// Where an agent stands for placement.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Standing {
    /// Reachable and not penalised.
    Ready,
    /// Reachable but failed to start a session recently: use only if no ready agent fits.
    Penalised,
    /// Skip it.
    Unreachable,
}

/// Per-agent state, keyed by the agent's name as configured in the subclusters.
#[derive(Clone, Debug)]
pub struct AgentRegistry {
    agents: BTreeMap<String, AgentState>,
    penalty: Duration,
}

impl Default for AgentRegistry {
    fn default() -> Self {
        AgentRegistry::new(DEFAULT_PENALTY)
    }
}

impl AgentRegistry {
    /// An empty registry whose start-failure penalty lasts `penalty`.
    pub fn new(penalty: Duration) -> AgentRegistry {
        AgentRegistry { agents: BTreeMap::new(), penalty }
    }

    /// Make the registry track exactly `agents` (e.g. every subcluster's agents after a
    /// configuration load): new ones start reachable, missing ones are forgotten.
    pub fn set_agents<'a>(&mut self, agents: impl IntoIterator<Item = &'a str>) {
        let wanted: BTreeMap<String, ()> = agents.into_iter().map(|a| (a.to_string(), ())).collect();
        self.agents.retain(|name, _| wanted.contains_key(name));
        for name in wanted.into_keys() {
            self.agents.entry(name).or_default();
        }
    }

    /// The state of `agent`, if tracked.
    pub fn get(&self, agent: &str) -> Option<&AgentState> {
        self.agents.get(agent)
    }

    /// Every tracked agent, by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &AgentState)> {
        self.agents.iter().map(|(k, v)| (k.as_str(), v))
    }

    fn entry(&mut self, agent: &str) -> &mut AgentState {
        self.agents.entry(agent.to_string()).or_default()
    }

    /// A call to `agent` got a reply.
    pub fn record_success(&mut self, agent: &str, now: Instant) {
        let s = self.entry(agent);
        s.last_contact = Some(now);
        s.reachable = true;
        s.consecutive_failures = 0;
    }

    /// A call returned load figures (`load` or `list`), received when this master's wall
    /// clock read `received_ms`; counts as a success. Returns the agent's clock offset (its
    /// clock minus ours) when the report carried its clock.
    pub fn record_load(&mut self, agent: &str, load: LoadReport, now: Instant, received_ms: u64) -> Option<i64> {
        self.record_success(agent, now);
        let e = self.entry(agent);
        if load.now_ms > 0 {
            e.clock_offset_ms =
                Some((load.now_ms as i128 - received_ms as i128).clamp(i64::MIN.into(), i64::MAX.into()) as i64);
        }
        e.load = Some(load);
        e.clock_offset_ms
    }

    /// A call to `agent` failed with `err`. Unreachable and refused agents become
    /// unreachable; a protocol error counts as a failure of a reachable agent; an error the
    /// agent answered with is contact, not a failure.
    pub fn record_failure(&mut self, agent: &str, err: &AgentCallError, now: Instant) {
        let s = self.entry(agent);
        match err {
            AgentCallError::AgentError { .. } => {
                s.last_contact = Some(now);
                s.reachable = true;
                s.consecutive_failures = 0;
            }
            AgentCallError::Unreachable { .. } | AgentCallError::Refused { .. } => {
                s.reachable = false;
                s.consecutive_failures = s.consecutive_failures.saturating_add(1);
            }
            AgentCallError::Protocol { .. } => {
                s.consecutive_failures = s.consecutive_failures.saturating_add(1);
            }
        }
        s.last_error = Some(err.to_string());
    }

    /// `agent` failed to start a session: push it to the back of the queue for the penalty.
    pub fn penalise(&mut self, agent: &str, now: Instant) {
        let until = now + self.penalty;
        self.entry(agent).penalised_until = Some(until);
    }

    /// Where `agent` stands at `now`. Untracked agents are [`Standing::Ready`] (never tried).
    pub fn standing(&self, agent: &str, now: Instant) -> Standing {
        match self.agents.get(agent) {
            None => Standing::Ready,
            Some(s) if !s.reachable => Standing::Unreachable,
            Some(s) if s.is_penalised(now) => Standing::Penalised,
            Some(_) => Standing::Ready,
        }
    }

    /// `candidates` without unreachable agents, ready ones first, each group in the given
    /// order (the broker's weighted order), penalised ones after.
    pub fn placement_order<'a>(&self, candidates: &[&'a str], now: Instant) -> Vec<&'a str> {
        let mut ranked: Vec<(Standing, usize, &'a str)> = candidates
            .iter()
            .enumerate()
            .map(|(i, a)| (self.standing(a, now), i, *a))
            .filter(|(st, _, _)| *st != Standing::Unreachable)
            .collect();
        ranked.sort();
        ranked.into_iter().map(|(_, _, a)| a).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::agent::AgentErrorKind;

    fn unreachable(a: &str) -> AgentCallError {
        AgentCallError::Unreachable { agent: a.into(), reason: "connection refused".into() }
    }

    #[test]
    fn new_agents_are_ready_and_set_agents_forgets_removed_ones() {
        let now = Instant::now();
        let mut r = AgentRegistry::default();
        r.set_agents(["a", "b"]);
        assert_eq!(r.standing("a", now), Standing::Ready);
        r.record_failure("a", &unreachable("a"), now);
        r.set_agents(["a", "c"]);
        assert!(r.get("b").is_none());
        assert_eq!(r.standing("a", now), Standing::Unreachable, "kept agents keep their state");
        assert_eq!(r.iter().map(|(n, _)| n).collect::<Vec<_>>(), vec!["a", "c"]);
    }

    #[test]
    fn failures_count_until_a_success() {
        let now = Instant::now();
        let mut r = AgentRegistry::default();
        r.record_failure("a", &unreachable("a"), now);
        r.record_failure("a", &unreachable("a"), now);
        let s = r.get("a").unwrap();
        assert!(!s.reachable);
        assert_eq!(s.consecutive_failures, 2);
        assert!(s.last_error.as_deref().unwrap().contains("connection refused"));
        r.record_load("a", LoadReport { cpus: 4, ..LoadReport::default() }, now, 0);
        let s = r.get("a").unwrap();
        assert!(s.reachable);
        assert_eq!(s.consecutive_failures, 0);
        assert_eq!(s.load.as_ref().unwrap().cpus, 4);
        assert_eq!(s.last_contact, Some(now));
        assert_eq!(s.clock_offset_ms, None, "a report without a clock says nothing about it");
        // An agent one hour behind, then five seconds ahead.
        let behind = LoadReport { now_ms: 10_000_000 - 3_600_000, ..LoadReport::default() };
        assert_eq!(r.record_load("a", behind, now, 10_000_000), Some(-3_600_000));
        let ahead = LoadReport { now_ms: 10_005_000, ..LoadReport::default() };
        assert_eq!(r.record_load("a", ahead, now, 10_000_000), Some(5_000));
        assert_eq!(r.record_load("a", LoadReport::default(), now, 10_000_000), Some(5_000), "kept");
    }

    #[test]
    fn agent_errors_are_contact_and_protocol_errors_keep_reachability() {
        let now = Instant::now();
        let mut r = AgentRegistry::default();
        let e = AgentCallError::AgentError {
            agent: "a".into(),
            kind: AgentErrorKind::NoFreeDisplay,
            message: "full".into(),
        };
        r.record_failure("a", &e, now);
        assert_eq!(r.standing("a", now), Standing::Ready);
        let p = AgentCallError::Protocol { agent: "a".into(), reason: "junk".into() };
        r.record_failure("a", &p, now);
        assert_eq!(r.standing("a", now), Standing::Ready);
        assert_eq!(r.get("a").unwrap().consecutive_failures, 1);
        let refused = AgentCallError::Refused { agent: "a".into(), reason: "bad secret".into() };
        r.record_failure("a", &refused, now);
        assert_eq!(r.standing("a", now), Standing::Unreachable);
    }

    #[test]
    fn penalty_moves_to_the_back_until_it_expires() {
        let t0 = Instant::now();
        let mut r = AgentRegistry::new(Duration::from_secs(30));
        r.set_agents(["a", "b", "c"]);
        r.penalise("a", t0);
        r.record_failure("c", &unreachable("c"), t0);
        assert_eq!(r.placement_order(&["a", "b", "c"], t0), vec!["b", "a"]);
        assert_eq!(r.standing("a", t0 + Duration::from_secs(29)), Standing::Penalised);
        let later = t0 + Duration::from_secs(30);
        assert_eq!(r.standing("a", later), Standing::Ready);
        assert_eq!(r.placement_order(&["a", "b", "c"], later), vec!["a", "b"]);
    }
}
