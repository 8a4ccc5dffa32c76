//! The checker: judges a campaign's history against the final state read after the heal and
//! the convergence wait, and lists every anomaly with its evidence.
//!
//! What it checks (docs/reliability.md explains each):
//! - **lost**: a session a client was given, and that no operation could have ended (none told
//!   it ended, none with an unknown outcome targeted it or its user), is listed and running;
//! - **undone**: a session a client was told ended is neither listed nor running, and no client
//!   was given it again after that answer;
//! - **ghost**: every listed or running session was given to some client (a session of a user
//!   with a connect of unknown outcome is noted, not counted: its client may have been told,
//!   but it must still be both listed and running);
//! - **mismatch**: after reconciliation the masters list exactly the desktops the agents run,
//!   on the agents they run on;
//! - **limit**: no user has more than `max_sessions_per_user` sessions, listed or running;
//! - **divergence**: both masters answer, list the same sessions and report the same digest;
//! - **panic**: no daemon log holds a panic.
//!
//! Invariant: pure; the same history and final state always give the same verdict.

use crate::history::{FinalState, Listed, Op, OpKind, Outcome};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// One broken invariant, with what shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Anomaly {
    pub kind: &'static str,
    pub what: String,
    pub evidence: Vec<String>,
    /// The session it is about, if one (the campaign adds the daemons' log lines naming it).
    pub session: Option<String>,
}

impl fmt::Display for Anomaly {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "[{}] {}", self.kind, self.what)?;
        for e in &self.evidence {
            writeln!(f, "    {e}")?;
        }
        Ok(())
    }
}

/// The verdict: anomalies, and notes that are not anomalies but explain the figures.
#[derive(Clone, Debug, Default)]
pub struct Verdict {
    pub anomalies: Vec<Anomaly>,
    pub notes: Vec<String>,
}

fn describe(op: &Op) -> String {
    let kind = match &op.kind {
        OpKind::Connect { new: false } => "connect".to_string(),
        OpKind::Connect { new: true } => "connect --new".to_string(),
        OpKind::Terminate { session } => format!("terminate {session}"),
        OpKind::TerminateUser => "terminate --user".to_string(),
    };
    let outcome = match &op.outcome {
        Outcome::Given { session, agent, display, reconnected } => {
            format!("{} {session} on {agent}:{display}", if *reconnected { "reconnected" } else { "created" })
        }
        Outcome::Terminated { ended, pending, unknown, failed } => {
            format!("ended {ended:?} pending {pending:?} unknown {unknown:?} failed {failed:?}")
        }
        Outcome::Refused { kind, message } => format!("refused {kind}: {message}"),
        Outcome::Unknown { reason } => format!("unknown: {reason}"),
    };
    format!(
        "op {} client {} {} {kind} via {} at {}..{} ms: {outcome}",
        op.id, op.client, op.user, op.master, op.invoked, op.completed
    )
}

/// Judges `history` against `fin`.
pub fn check(history: &[Op], fin: &FinalState) -> Verdict {
    let mut v = Verdict::default();
    let anomaly = |v: &mut Verdict, kind, what: String, evidence: Vec<String>| {
        // Session ids are the only long hexadecimal words in the messages.
        let session = what
            .split_whitespace()
            .find(|w| w.len() >= 16 && w.chars().all(|c| c.is_ascii_hexdigit()))
            .map(str::to_string);
        v.anomalies.push(Anomaly { kind, what, evidence, session });
    };

    // What the masters list: the first master that answered is the reference; the others
    // must agree with it.
    let answered: Vec<_> = fin.masters.iter().filter(|m| m.sessions.is_some()).collect();
    for m in &fin.masters {
        if m.sessions.is_none() {
            anomaly(&mut v, "divergence", format!("{} did not list its sessions after the heal", m.name), vec![]);
        }
    }
    let listed: BTreeMap<String, Listed> = answered
        .first()
        .and_then(|m| m.sessions.as_ref())
        .map(|s| s.iter().map(|l| (l.session.clone(), l.clone())).collect())
        .unwrap_or_default();
    if let Some((first, rest)) = answered.split_first() {
        for m in rest {
            let a: BTreeSet<&Listed> = first.sessions.iter().flatten().collect();
            let b: BTreeSet<&Listed> = m.sessions.iter().flatten().collect();
            if a != b {
                let only_a: Vec<String> = a.difference(&b).map(|l| format!("only on {}: {l:?}", first.name)).collect();
                let only_b: Vec<String> = b.difference(&a).map(|l| format!("only on {}: {l:?}", m.name)).collect();
                anomaly(
                    &mut v,
                    "divergence",
                    format!("{} and {} list different sessions", first.name, m.name),
                    only_a.into_iter().chain(only_b).collect(),
                );
            }
            if first.digest.is_none() || first.digest != m.digest {
                anomaly(
                    &mut v,
                    "divergence",
                    format!(
                        "database digests differ after the heal: {} {:?}, {} {:?}",
                        first.name, first.digest, m.name, m.digest
                    ),
                    vec![],
                );
            }
        }
    }
    if !fin.converged {
        anomaly(&mut v, "divergence", "the cluster did not converge within the wait after the heal".into(), vec![]);
    }

    let running: BTreeMap<String, &crate::history::Running> =
        fin.running.iter().map(|r| (r.session.clone(), r)).collect();

    // Sessions given to clients, with the first and last operations that gave them.
    let mut given: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
    for op in history {
        if let Outcome::Given { session, .. } = &op.outcome {
            given.entry(session.as_str()).or_default().push(op);
        }
    }
    let user_of: BTreeMap<&str, &str> = given.iter().map(|(s, ops)| (*s, ops[0].user.as_str())).collect();

    for (&id, ops) in &given {
        let user = user_of[id];
        let first = ops.iter().map(|o| o.invoked).min().unwrap_or(0);
        let told_ended: Vec<&Op> = history.iter().filter(|o| o.told_ended(id)).collect();
        let may_end: Vec<&Op> = history.iter().filter(|o| o.completed >= first && o.may_have_ended(id, user)).collect();
        let present = listed.contains_key(id) || running.contains_key(id);
        if may_end.is_empty() && !(listed.contains_key(id) && running.contains_key(id)) {
            let what = match (listed.contains_key(id), running.contains_key(id)) {
                (false, false) => "neither listed nor running",
                (true, false) => "listed but its desktop is not running",
                _ => "running but no longer listed",
            };
            anomaly(
                &mut v,
                "lost",
                format!("session {id} of {user} was given to a client and never ended by any request, but is {what}"),
                ops.iter().map(|o| describe(o)).collect(),
            );
        }
        if let Some(t) = told_ended.iter().min_by_key(|o| o.completed) {
            let again: Vec<&&Op> = ops.iter().filter(|o| o.invoked > t.completed).collect();
            if !again.is_empty() {
                let mut ev = vec![describe(t)];
                ev.extend(again.iter().map(|o| describe(o)));
                anomaly(
                    &mut v,
                    "undone",
                    format!("session {id} of {user} was given again after a client was told it ended"),
                    ev,
                );
            } else if present {
                let mut ev = vec![describe(t)];
                if let Some(l) = listed.get(id) {
                    ev.push(format!("still listed: {l:?}"));
                }
                if let Some(r) = running.get(id) {
                    ev.push(format!("still running: {r:?}"));
                }
                anomaly(&mut v, "undone", format!("session {id} of {user} was reported ended but is still there"), ev);
            }
        }
    }

    // Everything listed or running was given to someone.
    let mut present: BTreeMap<&str, &str> = BTreeMap::new();
    for (id, l) in &listed {
        present.insert(id, &l.user);
    }
    for (id, r) in &running {
        present.insert(id, &r.user);
    }
    for (&id, &user) in &present {
        if given.contains_key(id) {
            continue;
        }
        let unknown: Vec<&Op> = history
            .iter()
            .filter(|o| {
                o.user == user
                    && matches!(o.kind, OpKind::Connect { .. })
                    && matches!(o.outcome, Outcome::Unknown { .. })
            })
            .collect();
        let mut ev = Vec::new();
        if let Some(l) = listed.get(id) {
            ev.push(format!("listed: {l:?}"));
        }
        if let Some(r) = running.get(id) {
            ev.push(format!("running: {r:?}"));
        }
        if unknown.is_empty() {
            anomaly(&mut v, "ghost", format!("session {id} of {user} was never given to any client"), ev);
        } else if listed.contains_key(id) != running.contains_key(id) {
            // Its client may have been told, but after reconciliation the masters must list
            // exactly what runs.
            let what =
                if running.contains_key(id) { "runs but no master lists it" } else { "is listed but does not run" };
            anomaly(
                &mut v,
                "mismatch",
                format!("session {id} of {user}, from a connect of unknown outcome, {what}"),
                ev,
            );
        } else {
            v.notes.push(format!(
                "session {id} of {user} was never acknowledged; {} connect(s) of {user} had an unknown outcome",
                unknown.len()
            ));
        }
    }

    // The masters list exactly what runs, where it runs.
    for (id, l) in &listed {
        match running.get(id) {
            None => {
                if !given.contains_key(id.as_str()) {
                    continue; // reported as a ghost (or noted) above
                }
                if v.anomalies.iter().any(|a| a.kind == "lost" && a.what.contains(id.as_str())) {
                    continue;
                }
                anomaly(
                    &mut v,
                    "mismatch",
                    format!("session {id} is listed but no desktop runs for it"),
                    vec![format!("{l:?}")],
                );
            }
            Some(r) if r.agent != l.agent => anomaly(
                &mut v,
                "mismatch",
                format!("session {id} is listed on {} but runs on {}", l.agent, r.agent),
                vec![format!("{l:?}"), format!("{r:?}")],
            ),
            Some(_) => {}
        }
    }
    for (id, r) in &running {
        if !listed.contains_key(id) && given.contains_key(id.as_str()) {
            let explained =
                v.anomalies.iter().any(|a| (a.kind == "lost" || a.kind == "undone") && a.what.contains(id.as_str()));
            if !explained {
                anomaly(
                    &mut v,
                    "mismatch",
                    format!("a desktop of session {id} runs but no master lists it"),
                    vec![format!("{r:?}")],
                );
            }
        }
    }

    // The per-user limit.
    if fin.max_sessions_per_user > 0 {
        let max = fin.max_sessions_per_user as usize;
        let mut by_user: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for l in listed.values() {
            by_user.entry(&l.user).or_default().push(&l.session);
        }
        for (u, ids) in by_user {
            if ids.len() > max {
                anomaly(
                    &mut v,
                    "limit",
                    format!("{u} has {} listed sessions (max {max})", ids.len()),
                    vec![format!("{ids:?}")],
                );
            }
        }
        let mut by_user: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for r in running.values() {
            by_user.entry(&r.user).or_default().push(&r.session);
        }
        for (u, ids) in by_user {
            if ids.len() > max {
                anomaly(
                    &mut v,
                    "limit",
                    format!("{u} has {} running desktops (max {max})", ids.len()),
                    vec![format!("{ids:?}")],
                );
            }
        }
    }

    for (file, lines) in &fin.panics {
        anomaly(
            &mut v,
            "panic",
            format!("{file} holds {} panic line(s)", lines.len()),
            lines.iter().take(5).cloned().collect(),
        );
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{MasterState, Running};

    fn op(id: u64, user: &str, kind: OpKind, outcome: Outcome, invoked: u64, completed: u64) -> Op {
        Op { id, client: 0, user: user.into(), master: "m1".into(), invoked, completed, kind, outcome }
    }
    fn given(id: u64, user: &str, s: &str, at: u64) -> Op {
        op(
            id,
            user,
            OpKind::Connect { new: false },
            Outcome::Given { session: s.into(), agent: "a1".into(), display: 10, reconnected: false },
            at,
            at + 1,
        )
    }
    fn listed(s: &str, user: &str) -> Listed {
        Listed { session: s.into(), user: user.into(), agent: "a1".into(), display: 10 }
    }
    fn running(s: &str, user: &str) -> Running {
        Running { session: s.into(), agent: "a1".into(), user: user.into(), pids: vec![1] }
    }
    fn state(list: Vec<Listed>, run: Vec<Running>) -> FinalState {
        let m = |n: &str| MasterState {
            name: n.into(),
            sessions: Some(list.clone()),
            digest: Some("d".into()),
            ready: Some(true),
            link: Some("streaming".into()),
        };
        FinalState {
            masters: vec![m("m1"), m("m2")],
            running: run,
            panics: BTreeMap::new(),
            converged: true,
            max_sessions_per_user: 1,
        }
    }
    fn kinds(v: &Verdict) -> Vec<&'static str> {
        v.anomalies.iter().map(|a| a.kind).collect()
    }

    #[test]
    fn a_kept_session_is_clean() {
        let h = vec![given(1, "u", "s1", 0), given(2, "u", "s1", 10)];
        let v = check(&h, &state(vec![listed("s1", "u")], vec![running("s1", "u")]));
        assert!(v.anomalies.is_empty(), "{:?}", v.anomalies);
    }

    #[test]
    fn a_given_session_that_vanished_is_lost() {
        let h = vec![given(1, "u", "s1", 0)];
        assert_eq!(kinds(&check(&h, &state(vec![], vec![]))), vec!["lost"]);
        assert_eq!(kinds(&check(&h, &state(vec![listed("s1", "u")], vec![]))), vec!["lost"]);
    }

    #[test]
    fn a_terminate_of_unknown_outcome_excuses_a_missing_session() {
        let t =
            op(2, "u", OpKind::Terminate { session: "s1".into() }, Outcome::Unknown { reason: "timeout".into() }, 5, 9);
        let v = check(&[given(1, "u", "s1", 0), t], &state(vec![], vec![]));
        assert!(v.anomalies.is_empty(), "{:?}", v.anomalies);
    }

    #[test]
    fn a_terminate_reported_unknown_excuses_a_missing_session_but_is_no_end() {
        let unknown =
            Outcome::Terminated { ended: vec![], pending: vec![], unknown: vec!["s1".into()], failed: vec![] };
        let t = op(2, "u", OpKind::Terminate { session: "s1".into() }, unknown, 5, 9);
        let v = check(&[given(1, "u", "s1", 0), t.clone()], &state(vec![], vec![]));
        assert!(v.anomalies.is_empty(), "{:?}", v.anomalies);
        // Not told ended: the session may stay, and may be given again.
        let v = check(
            &[given(1, "u", "s1", 0), t, given(3, "u", "s1", 20)],
            &state(vec![listed("s1", "u")], vec![running("s1", "u")]),
        );
        assert!(v.anomalies.is_empty(), "{:?}", v.anomalies);
    }

    #[test]
    fn a_refused_terminate_excuses_nothing() {
        let t =
            op(2, "u", OpKind::TerminateUser, Outcome::Refused { kind: "not_ready".into(), message: "x".into() }, 5, 9);
        assert_eq!(kinds(&check(&[given(1, "u", "s1", 0), t], &state(vec![], vec![]))), vec!["lost"]);
    }

    #[test]
    fn a_reported_terminate_must_hold() {
        let t = op(
            2,
            "u",
            OpKind::Terminate { session: "s1".into() },
            Outcome::Terminated { ended: vec![], pending: vec!["s1".into()], unknown: vec![], failed: vec![] },
            5,
            9,
        );
        let h = vec![given(1, "u", "s1", 0), t.clone()];
        assert!(check(&h, &state(vec![], vec![])).anomalies.is_empty());
        assert_eq!(kinds(&check(&h, &state(vec![], vec![running("s1", "u")]))), vec!["undone"]);
        let h = vec![given(1, "u", "s1", 0), t, given(3, "u", "s1", 20)];
        assert!(kinds(&check(&h, &state(vec![listed("s1", "u")], vec![running("s1", "u")]))).contains(&"undone"));
    }

    #[test]
    fn a_desktop_nobody_was_given_is_a_ghost_unless_a_connect_had_no_answer() {
        let v = check(
            &[given(1, "u", "s1", 0)],
            &state(vec![listed("s1", "u")], vec![running("s1", "u"), running("s9", "u")]),
        );
        assert!(kinds(&v).contains(&"ghost"), "{:?}", v.anomalies);
        assert!(kinds(&v).contains(&"limit"), "{:?}", v.anomalies);
        let unknown = op(2, "v", OpKind::Connect { new: false }, Outcome::Unknown { reason: "timeout".into() }, 0, 30);
        let v = check(&[unknown.clone()], &state(vec![listed("s9", "v")], vec![running("s9", "v")]));
        assert!(v.anomalies.is_empty(), "{:?}", v.anomalies);
        assert_eq!(v.notes.len(), 1);
        // Not listed though it runs: a mismatch whatever the client was told.
        let v = check(&[unknown], &state(vec![], vec![running("s9", "v")]));
        assert_eq!(kinds(&v), vec!["mismatch"]);
    }

    #[test]
    fn masters_that_disagree_diverge() {
        let mut fin = state(vec![listed("s1", "u")], vec![running("s1", "u")]);
        fin.masters[1].sessions = Some(vec![]);
        fin.masters[1].digest = Some("e".into());
        let v = check(&[given(1, "u", "s1", 0)], &fin);
        assert_eq!(kinds(&v), vec!["divergence", "divergence"]);
    }

    #[test]
    fn a_desktop_on_another_agent_and_a_panic_are_reported() {
        let mut fin = state(vec![listed("s1", "u")], vec![Running { agent: "a2".into(), ..running("s1", "u") }]);
        fin.panics.insert("vsmserver.log".into(), vec!["thread 'x' panicked at".into()]);
        let v = check(&[given(1, "u", "s1", 0)], &fin);
        assert_eq!(kinds(&v), vec!["mismatch", "panic"]);
    }
}
