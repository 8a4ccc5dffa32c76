//! Placement: which subcluster a user belongs to, and which agent gets a new session.
//!
//! This module owns the two placement decisions and nothing else. It is pure: every fact it
//! needs (configuration, who runs where, which agents answer, which failed recently) is passed
//! in, so the same input always gives the same answer. It must never do I/O or look at clocks.
//!
//! Subcluster rules, in order:
//! 1. a subcluster whose `users` lists the user;
//! 2. a subcluster one of whose `groups` the user belongs to;
//! 3. a default subcluster (neither `users` nor `groups`).
//!
//! Configurations the rules leave open (the user in the `users` of two subclusters, the user's
//! groups matching two subclusters, two default subclusters) are resolved by taking the first
//! subcluster by name, and reported as an [`Ambiguity`] (and logged by [`resolve_subcluster`]).
//!
//! Agent rules ([`choose_agent`]):
//! - Only agents listed in the subcluster are candidates; duplicates count once.
//! - Draining agents, unreachable agents and full agents (`max_users_per_agent` reached, where
//!   an agent already hosting the user does not count the user twice) are skipped.
//! - Co-location: when the user already has a live session on an eligible, unpenalised agent
//!   of the subcluster, that agent is chosen (several: the first in the subcluster's list).
//!   Co-location is a preference, not a requirement: when that agent is draining, unreachable,
//!   penalised or no longer in the subcluster, the user gets a session elsewhere rather than
//!   none.
//! - Otherwise the agent minimising `(users after placement) / weight` wins, which spreads
//!   users in proportion to the weights. Weights default to 100; a weight of 0 counts as 100.
//! - Agents that recently failed to start a session (penalised) are used only when no
//!   unpenalised agent is eligible, the one penalised longest ago first.
//! - Ties go to the agent listed first in the subcluster, so the choice is deterministic.
//!
//! Invariant: a chosen agent is always eligible (in the subcluster, reachable, not draining,
//! not full); when none is, the error says for every agent why it was skipped.

use crate::config::Subcluster;
use rustc_hash::FxHashMap;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;

/// Weight of an agent with no (or a non-positive) configured weight.
pub const DEFAULT_WEIGHT: u32 = 100;

/// Why no placement was possible.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    #[error("user {user} matches no subcluster and there is no default subcluster")]
    NoSubcluster { user: String },
    #[error("{}", no_agent_message(subcluster, reasons))]
    NoAgentAvailable { subcluster: String, reasons: Vec<AgentSkip> },
}

fn no_agent_message(subcluster: &str, reasons: &[AgentSkip]) -> String {
    if reasons.is_empty() {
        return format!("no agent available in subcluster {subcluster}: it lists no agents");
    }
    let list: Vec<String> = reasons.iter().map(|r| r.to_string()).collect();
    format!("no agent available in subcluster {subcluster}: {}", list.join(", "))
}

/// One agent that could not take the session, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentSkip {
    pub agent: String,
    pub reason: SkipReason,
}

impl fmt::Display for AgentSkip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.agent, self.reason)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SkipReason {
    /// Listed in `/agents/draining`.
    Draining,
    /// Does not answer.
    Unreachable,
    /// Hosts `max_users_per_agent` distinct users already.
    Full { users: u32, max: u32 },
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SkipReason::Draining => f.write_str("draining"),
            SkipReason::Unreachable => f.write_str("unreachable"),
            SkipReason::Full { users, max } => write!(f, "full: {users} of {max} users"),
        }
    }
}

/// How a subcluster was selected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubclusterMatch {
    User,
    Group,
    Default,
}

/// A configuration the selection rules leave open; resolved by taking the first by name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ambiguity {
    /// The user is listed in `users` of several subclusters.
    UserInSeveral { user: String, chosen: String, others: Vec<String> },
    /// The user's groups match `groups` of several subclusters.
    GroupsInSeveral { user: String, chosen: String, others: Vec<String> },
    /// Several subclusters have neither users nor groups.
    SeveralDefaults { chosen: String, others: Vec<String> },
}

impl fmt::Display for Ambiguity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ambiguity::UserInSeveral { user, chosen, others } => write!(
                f,
                "user {user} is listed in the users of several subclusters ({chosen}, {}); using {chosen}",
                others.join(", ")
            ),
            Ambiguity::GroupsInSeveral { user, chosen, others } => write!(
                f,
                "the groups of user {user} match several subclusters ({chosen}, {}); using {chosen}",
                others.join(", ")
            ),
            Ambiguity::SeveralDefaults { chosen, others } => write!(
                f,
                "several default subclusters (no users, no groups): {chosen}, {}; using {chosen}",
                others.join(", ")
            ),
        }
    }
}

/// The selected subcluster, how it matched, and what was ambiguous on the way.
#[derive(Clone, Debug, PartialEq)]
pub struct SubclusterChoice<'a> {
    pub subcluster: &'a Subcluster,
    pub matched_by: SubclusterMatch,
    pub warnings: Vec<Ambiguity>,
}

/// Selects the subcluster of a new session for `user`, logging any ambiguity as a warning.
pub fn resolve_subcluster<'a>(
    user: &str,
    user_groups: &[String],
    subclusters: &'a BTreeMap<String, Subcluster>,
) -> Result<&'a Subcluster, PlacementError> {
    let choice = select_subcluster(user, user_groups, subclusters)?;
    for w in &choice.warnings {
        tracing::warn!(user, subcluster = %choice.subcluster.name, "ambiguous subcluster configuration: {w}");
    }
    Ok(choice.subcluster)
}

/// Like [`resolve_subcluster`], but returns the ambiguities instead of logging them.
pub fn select_subcluster<'a>(
    user: &str,
    user_groups: &[String],
    subclusters: &'a BTreeMap<String, Subcluster>,
) -> Result<SubclusterChoice<'a>, PlacementError> {
    // BTreeMap iteration is by name, which makes "first" deterministic.
    let by_user: Vec<&Subcluster> = subclusters.values().filter(|s| s.users.iter().any(|u| u == user)).collect();
    if let Some(choice) = pick(by_user, SubclusterMatch::User, |chosen, others| Ambiguity::UserInSeveral {
        user: user.to_string(),
        chosen,
        others,
    }) {
        return Ok(choice);
    }
    let by_group: Vec<&Subcluster> =
        subclusters.values().filter(|s| s.groups.iter().any(|g| user_groups.contains(g))).collect();
    if let Some(choice) = pick(by_group, SubclusterMatch::Group, |chosen, others| Ambiguity::GroupsInSeveral {
        user: user.to_string(),
        chosen,
        others,
    }) {
        return Ok(choice);
    }
    let defaults: Vec<&Subcluster> = subclusters.values().filter(|s| s.is_default()).collect();
    pick(defaults, SubclusterMatch::Default, |chosen, others| Ambiguity::SeveralDefaults { chosen, others })
        .ok_or_else(|| PlacementError::NoSubcluster { user: user.to_string() })
}

fn pick<'a>(
    matches: Vec<&'a Subcluster>,
    matched_by: SubclusterMatch,
    ambiguity: impl FnOnce(String, Vec<String>) -> Ambiguity,
) -> Option<SubclusterChoice<'a>> {
    let (first, rest) = matches.split_first()?;
    let warnings = if rest.is_empty() {
        vec![]
    } else {
        vec![ambiguity(first.name.clone(), rest.iter().map(|s| s.name.clone()).collect())]
    };
    Some(SubclusterChoice { subcluster: first, matched_by, warnings })
}

/// Everything [`choose_agent`] needs to know. Agents are named as in the subcluster's list.
#[derive(Clone, Copy, Debug)]
pub struct PlacementInput<'a> {
    pub subcluster: &'a Subcluster,
    pub user: &'a str,
    /// Agents on which the user has live sessions (in any subcluster).
    pub user_agents: &'a [String],
    /// `/agents/draining`.
    pub draining: &'a [String],
    /// `/agents/weights/<host>`; missing or 0 means [`DEFAULT_WEIGHT`].
    pub weights: &'a BTreeMap<String, u32>,
    /// Distinct users with live sessions per agent; missing means 0. A hash map: it is
    /// looked up once per agent of the subcluster, on every login.
    pub users_per_agent: &'a FxHashMap<String, u32>,
    /// Starts under way per agent (chosen, not yet recorded), counted as users on top of
    /// `users_per_agent`; missing means 0.
    pub starting: &'a FxHashMap<&'a str, u32>,
    /// Agents that currently do not answer; every other agent counts as reachable.
    pub unreachable: &'a BTreeSet<String>,
    /// Agents that recently failed to start a session, with the time of that failure (ms).
    /// The caller decides how long a penalty lasts and removes expired entries.
    pub penalties: &'a BTreeMap<String, u64>,
}

/// Why an agent was chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlacementReason {
    /// The user already has a session there.
    Colocated,
    /// Least loaded relative to its weight among unpenalised agents.
    Balanced,
    /// Every eligible agent is penalised; this one was penalised longest ago.
    Penalised,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    pub agent: String,
    pub reason: PlacementReason,
}

/// Picks the agent for a new session; see the module doc for the rules.
pub fn choose_agent(input: &PlacementInput) -> Result<String, PlacementError> {
    place(input).map(|p| p.agent)
}

/// Like [`choose_agent`], also saying why the agent was chosen.
///
/// One pass over the subcluster's list with no allocation until an agent is chosen: it runs
/// for every login, over up to thousands of agents. A duplicate in the list is looked at
/// again but never wins (it ties with its first occurrence, which is listed before it).
pub fn place(input: &PlacementInput) -> Result<Placement, PlacementError> {
    #[derive(Clone, Copy)]
    struct Candidate<'b> {
        agent: &'b str,
        position: usize,
        users_after: u64,
        weight: u64,
    }
    // (users_after / weight) compared exactly by cross-multiplication; ties by list order.
    let lighter = |a: &Candidate, b: &Candidate| {
        (a.users_after * b.weight).cmp(&(b.users_after * a.weight)).then(a.position.cmp(&b.position)).is_lt()
    };

    let sub = input.subcluster;
    let mut colocated: Option<&str> = None;
    let mut balanced: Option<Candidate> = None;
    // The penalised candidate with the oldest failure, then the lightest.
    let mut penalised: Option<(u64, Candidate)> = None;
    for (position, agent) in sub.agents.iter().enumerate() {
        let hosts_user = input.user_agents.iter().any(|a| a == agent);
        let users = users_of(input, agent);
        if skip_reason(input, agent, users, hosts_user).is_some() {
            continue;
        }
        let penalty = if input.penalties.is_empty() { None } else { input.penalties.get(agent.as_str()).copied() };
        if hosts_user && penalty.is_none() {
            if colocated.is_none() {
                colocated = Some(agent);
            }
            continue;
        }
        let weight = if input.weights.is_empty() { None } else { input.weights.get(agent.as_str()).copied() };
        let c = Candidate {
            agent,
            position,
            users_after: u64::from(users) + u64::from(!hosts_user),
            weight: u64::from(weight.filter(|w| *w > 0).unwrap_or(DEFAULT_WEIGHT)),
        };
        match penalty {
            None if balanced.as_ref().map_or(true, |b| lighter(&c, b)) => balanced = Some(c),
            Some(p) if penalised.as_ref().map_or(true, |(bp, b)| p < *bp || (p == *bp && lighter(&c, b))) => {
                penalised = Some((p, c))
            }
            _ => {}
        }
    }

    if let Some(agent) = colocated {
        return Ok(Placement { agent: agent.to_string(), reason: PlacementReason::Colocated });
    }
    if let Some(c) = balanced {
        return Ok(Placement { agent: c.agent.to_string(), reason: PlacementReason::Balanced });
    }
    if let Some((_, c)) = penalised {
        return Ok(Placement { agent: c.agent.to_string(), reason: PlacementReason::Penalised });
    }
    // None is eligible: say why, for every agent once.
    let mut seen = HashSet::new();
    let reasons = sub
        .agents
        .iter()
        .filter(|a| seen.insert(a.as_str()))
        .filter_map(|agent| {
            let hosts_user = input.user_agents.iter().any(|a| a == agent);
            skip_reason(input, agent, users_of(input, agent), hosts_user)
                .map(|reason| AgentSkip { agent: agent.clone(), reason })
        })
        .collect();
    Err(PlacementError::NoAgentAvailable { subcluster: sub.name.clone(), reasons })
}

/// Distinct users on `agent`, counting its starts under way.
fn users_of(input: &PlacementInput, agent: &str) -> u32 {
    let starting = if input.starting.is_empty() { 0 } else { input.starting.get(agent).copied().unwrap_or(0) };
    input.users_per_agent.get(agent).copied().unwrap_or(0).saturating_add(starting)
}

/// Why `agent`, which hosts `users` distinct users, cannot take the session, if it cannot.
fn skip_reason(input: &PlacementInput, agent: &str, users: u32, hosts_user: bool) -> Option<SkipReason> {
    let max = input.subcluster.max_users_per_agent;
    if input.draining.iter().any(|d| d == agent) {
        Some(SkipReason::Draining)
    } else if !input.unreachable.is_empty() && input.unreachable.contains(agent) {
        Some(SkipReason::Unreachable)
    } else if max > 0 && !hosts_user && users >= max {
        Some(SkipReason::Full { users, max })
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sc(name: &str, agents: &[&str], users: &[&str], groups: &[&str]) -> Subcluster {
        Subcluster {
            name: name.into(),
            agents: agents.iter().map(|s| s.to_string()).collect(),
            users: users.iter().map(|s| s.to_string()).collect(),
            groups: groups.iter().map(|s| s.to_string()).collect(),
            max_users_per_agent: 0,
        }
    }

    fn map(list: Vec<Subcluster>) -> BTreeMap<String, Subcluster> {
        list.into_iter().map(|s| (s.name.clone(), s)).collect()
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn users_beat_groups_beat_default() {
        let subs = map(vec![
            sc("a-default", &["x"], &[], &[]),
            sc("b-groups", &["y"], &[], &["staff"]),
            sc("c-users", &["z"], &["alice"], &[]),
        ]);
        let staff = strings(&["staff"]);
        let r = select_subcluster("alice", &staff, &subs).unwrap();
        assert_eq!((r.subcluster.name.as_str(), r.matched_by), ("c-users", SubclusterMatch::User));
        assert!(r.warnings.is_empty());
        let r = select_subcluster("bob", &staff, &subs).unwrap();
        assert_eq!((r.subcluster.name.as_str(), r.matched_by), ("b-groups", SubclusterMatch::Group));
        let r = select_subcluster("carol", &strings(&["other"]), &subs).unwrap();
        assert_eq!((r.subcluster.name.as_str(), r.matched_by), ("a-default", SubclusterMatch::Default));
        assert_eq!(resolve_subcluster("carol", &[], &subs).unwrap().name, "a-default");
    }

    #[test]
    fn no_match_and_no_default_is_an_error() {
        let subs = map(vec![sc("only", &["x"], &["alice"], &["staff"])]);
        let err = resolve_subcluster("bob", &strings(&["users"]), &subs).unwrap_err();
        assert_eq!(err, PlacementError::NoSubcluster { user: "bob".into() });
        assert_eq!(err.to_string(), "user bob matches no subcluster and there is no default subcluster");
        let empty = BTreeMap::new();
        assert!(resolve_subcluster("bob", &[], &empty).is_err());
    }

    #[test]
    fn two_defaults_pick_first_by_name_and_warn() {
        let subs = map(vec![sc("zeta", &["z"], &[], &[]), sc("alpha", &["a"], &[], &[])]);
        let r = select_subcluster("bob", &[], &subs).unwrap();
        assert_eq!(r.subcluster.name, "alpha");
        assert_eq!(
            r.warnings,
            vec![Ambiguity::SeveralDefaults { chosen: "alpha".into(), others: vec!["zeta".into()] }]
        );
        assert!(r.warnings[0].to_string().contains("using alpha"));
    }

    #[test]
    fn user_in_two_subclusters_picks_first_and_warns() {
        let subs = map(vec![
            sc("s2", &["b"], &["alice"], &[]),
            sc("s1", &["a"], &["alice", "bob"], &[]),
            sc("s3", &["c"], &["bob"], &[]),
        ]);
        let r = select_subcluster("alice", &[], &subs).unwrap();
        assert_eq!(r.subcluster.name, "s1");
        assert!(matches!(&r.warnings[..], [Ambiguity::UserInSeveral { chosen, others, .. }]
            if chosen == "s1" && others == &vec!["s2".to_string()]));
    }

    #[test]
    fn groups_in_two_subclusters_pick_first_and_warn() {
        let subs =
            map(vec![sc("g2", &["b"], &[], &["dev"]), sc("g1", &["a"], &[], &["staff"]), sc("d", &["c"], &[], &[])]);
        let r = select_subcluster("alice", &strings(&["dev", "staff"]), &subs).unwrap();
        assert_eq!(r.subcluster.name, "g1");
        assert_eq!(r.matched_by, SubclusterMatch::Group);
        assert!(matches!(&r.warnings[..], [Ambiguity::GroupsInSeveral { .. }]));
        // A single group match is not ambiguous, and the extra default is not reported.
        let r = select_subcluster("alice", &strings(&["dev"]), &subs).unwrap();
        assert_eq!(r.subcluster.name, "g2");
        assert!(r.warnings.is_empty());
    }

    /// Owned inputs for [`PlacementInput`], with builders for the tests.
    struct World {
        sub: Subcluster,
        user_agents: Vec<String>,
        draining: Vec<String>,
        weights: BTreeMap<String, u32>,
        users: FxHashMap<String, u32>,
        starting: FxHashMap<&'static str, u32>,
        unreachable: BTreeSet<String>,
        penalties: BTreeMap<String, u64>,
    }

    impl World {
        fn new(agents: &[&str]) -> World {
            World {
                sub: sc("sc", agents, &[], &[]),
                user_agents: vec![],
                draining: vec![],
                weights: BTreeMap::new(),
                users: FxHashMap::default(),
                starting: FxHashMap::default(),
                unreachable: BTreeSet::new(),
                penalties: BTreeMap::new(),
            }
        }
        fn users(mut self, counts: &[(&str, u32)]) -> World {
            for (a, n) in counts {
                self.users.insert(a.to_string(), *n);
            }
            self
        }
        fn input(&self) -> PlacementInput<'_> {
            PlacementInput {
                subcluster: &self.sub,
                user: "alice",
                user_agents: &self.user_agents,
                draining: &self.draining,
                weights: &self.weights,
                users_per_agent: &self.users,
                starting: &self.starting,
                unreachable: &self.unreachable,
                penalties: &self.penalties,
            }
        }
        fn choose(&self) -> Result<String, PlacementError> {
            choose_agent(&self.input())
        }
        fn place(&self) -> Placement {
            place(&self.input()).unwrap()
        }
    }

    #[test]
    fn picks_least_loaded_and_breaks_ties_by_list_order() {
        let w = World::new(&["a", "b", "c"]).users(&[("a", 3), ("b", 1), ("c", 1)]);
        assert_eq!(w.place(), Placement { agent: "b".into(), reason: PlacementReason::Balanced });
        let w = World::new(&["c", "b", "a"]);
        assert_eq!(w.choose().unwrap(), "c");
    }

    #[test]
    fn starts_under_way_count_as_users() {
        let mut w = World::new(&["a", "b"]).users(&[("a", 1)]);
        w.starting.insert("b", 2);
        assert_eq!(w.choose().unwrap(), "a");
        w.sub.max_users_per_agent = 2;
        w.starting.insert("a", 1);
        let err = w.choose().unwrap_err().to_string();
        assert!(err.contains("2 of 2"), "{err}");
    }

    #[test]
    fn duplicate_agents_count_once() {
        let w = World::new(&["a", "a", "b"]).users(&[("a", 1)]);
        assert_eq!(w.choose().unwrap(), "b");
    }

    #[test]
    fn colocates_with_the_users_existing_session() {
        let mut w = World::new(&["a", "b", "c"]).users(&[("a", 0), ("b", 9), ("c", 9)]);
        w.user_agents = strings(&["c"]);
        assert_eq!(w.place(), Placement { agent: "c".into(), reason: PlacementReason::Colocated });
        // Several: the first in the subcluster's list.
        w.user_agents = strings(&["c", "b"]);
        assert_eq!(w.choose().unwrap(), "b");
    }

    #[test]
    fn colocation_yields_when_the_agent_is_not_eligible() {
        let mut w = World::new(&["a", "b"]).users(&[("a", 5), ("b", 1)]);
        w.user_agents = strings(&["a"]);
        w.draining = strings(&["a"]);
        assert_eq!(w.place().reason, PlacementReason::Balanced);
        assert_eq!(w.choose().unwrap(), "b");
        w.draining.clear();
        w.unreachable.insert("a".into());
        assert_eq!(w.choose().unwrap(), "b");
        w.unreachable.clear();
        w.penalties.insert("a".into(), 10);
        assert_eq!(w.choose().unwrap(), "b");
        // An agent outside the subcluster is never chosen, even for co-location.
        w.penalties.clear();
        w.user_agents = strings(&["elsewhere"]);
        assert_eq!(w.choose().unwrap(), "b");
    }

    #[test]
    fn full_agents_are_skipped_but_a_user_is_not_counted_twice() {
        let mut w = World::new(&["a", "b"]).users(&[("a", 2), ("b", 2)]);
        w.sub.max_users_per_agent = 2;
        let err = w.choose().unwrap_err();
        assert_eq!(
            err.to_string(),
            "no agent available in subcluster sc: a (full: 2 of 2 users), b (full: 2 of 2 users)"
        );
        w.user_agents = strings(&["b"]);
        assert_eq!(w.place(), Placement { agent: "b".into(), reason: PlacementReason::Colocated });
        // Unlimited when 0.
        w.sub.max_users_per_agent = 0;
        w.user_agents.clear();
        assert_eq!(w.choose().unwrap(), "a");
    }

    #[test]
    fn user_already_on_an_agent_does_not_add_to_its_load() {
        // The user runs on penalised "a", so co-location is off, but "a" still does not
        // count the user twice: with equal counts it scores lower than "b".
        let mut w = World::new(&["b", "a"]).users(&[("a", 3), ("b", 3)]);
        w.user_agents = strings(&["a"]);
        w.penalties.insert("a".into(), 1);
        w.unreachable.insert("b".into());
        assert_eq!(w.place(), Placement { agent: "a".into(), reason: PlacementReason::Penalised });
    }

    #[test]
    fn draining_and_unreachable_agents_are_skipped() {
        let mut w = World::new(&["a", "b", "c"]).users(&[("c", 50)]);
        w.draining = strings(&["a"]);
        w.unreachable.insert("b".into());
        assert_eq!(w.choose().unwrap(), "c");
        w.draining.push("c".into());
        let err = w.choose().unwrap_err();
        match &err {
            PlacementError::NoAgentAvailable { subcluster, reasons } => {
                assert_eq!(subcluster, "sc");
                let r: Vec<(&str, SkipReason)> = reasons.iter().map(|r| (r.agent.as_str(), r.reason)).collect();
                assert_eq!(
                    r,
                    vec![("a", SkipReason::Draining), ("b", SkipReason::Unreachable), ("c", SkipReason::Draining)]
                );
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(err.to_string(), "no agent available in subcluster sc: a (draining), b (unreachable), c (draining)");
    }

    #[test]
    fn empty_subcluster_says_so() {
        let w = World::new(&[]);
        assert_eq!(w.choose().unwrap_err().to_string(), "no agent available in subcluster sc: it lists no agents");
    }

    #[test]
    fn zero_weight_counts_as_default() {
        let mut w = World::new(&["a", "b"]).users(&[("a", 1), ("b", 1)]);
        w.weights.insert("a".into(), 0);
        w.weights.insert("b".into(), 100);
        // Both weigh 100: tie, first listed.
        assert_eq!(w.choose().unwrap(), "a");
        w.weights.insert("b".into(), 300);
        assert_eq!(w.choose().unwrap(), "b");
    }

    #[test]
    fn penalised_agents_go_to_the_back_of_the_queue() {
        let mut w = World::new(&["a", "b", "c"]).users(&[("a", 0), ("b", 10), ("c", 20)]);
        w.penalties.insert("a".into(), 500);
        assert_eq!(w.place(), Placement { agent: "b".into(), reason: PlacementReason::Balanced });
        w.penalties.insert("b".into(), 100);
        assert_eq!(w.choose().unwrap(), "c");
        w.penalties.insert("c".into(), 300);
        // All penalised: the one penalised longest ago.
        assert_eq!(w.place(), Placement { agent: "b".into(), reason: PlacementReason::Penalised });
        // Same penalty time: by load.
        w.penalties.insert("a".into(), 100);
        assert_eq!(w.choose().unwrap(), "a");
        // A penalised agent that is draining stays out.
        w.draining = strings(&["a", "b"]);
        assert_eq!(w.choose().unwrap(), "c");
    }

    #[test]
    fn weighted_distribution_of_280_users() {
        let mut w = World::new(&["big", "mid", "small"]);
        w.weights.insert("big".into(), 200);
        w.weights.insert("mid".into(), 100);
        w.weights.insert("small".into(), 50);
        for _ in 0..280 {
            let agent = w.choose().unwrap();
            *w.users.entry(agent).or_insert(0) += 1;
        }
        let got = |a: &str| i64::from(w.users.get(a).copied().unwrap_or(0));
        for (agent, want) in [("big", 160), ("mid", 80), ("small", 40)] {
            assert!((got(agent) - want).abs() <= 2, "{agent}: {} users, want about {want}", got(agent));
        }
    }

    #[test]
    fn even_distribution_without_weights() {
        let mut w = World::new(&["a", "b", "c", "d"]);
        for _ in 0..100 {
            let agent = w.choose().unwrap();
            *w.users.entry(agent).or_insert(0) += 1;
        }
        assert!(w.users.values().all(|n| *n == 25), "{:?}", w.users);
    }
}
