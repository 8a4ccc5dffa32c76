//! The merge rule for replicated records, without I/O.
//!
//! Owns: the decision "store or skip" for a remote record against the stored one, and
//! what counts as a conflict worth logging: only concurrent writes, neither made with
//! knowledge of the other (each record names the version it replaced, its `base`).
//! Must never: look at anything but the two records (no clocks, no node roles), so both
//! nodes decide identically.
//!
//! Invariants: merging is last-writer-wins on [`Version`] (clock, then node id), which
//! makes it commutative, associative and idempotent; the surviving record of an id is the
//! one with the greatest version ever seen for it.
//!
//! Deletes win over concurrent changes: when last-writer-wins would keep a live record over
//! a tombstone that it was not based on (a reconnect on one master while the other ended the
//! session, the two apart, and the reconnecting master's clock ahead), the merging node
//! writes the delete again with a version above both ([`reasserts_delete`]). The rule stays
//! a pure maximum; the new tombstone is an ordinary local write that wins everywhere, so a
//! terminate a client was told about is never undone, whatever the clocks said.

use crate::model::{Record, Version};

/// Which side's record survived a conflict.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Winner {
    Local,
    Remote,
}

/// What to do with an incoming record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Store it (nothing stored yet, or the incoming version is greater).
    Store,
    /// Keep the stored record (equal version: already applied; or newer).
    Skip,
}

/// Last-writer-wins between the stored version (if any) and an incoming one.
pub fn decide(stored: Option<&Version>, incoming: &Version) -> Action {
    match stored {
        Some(s) if s >= incoming => Action::Skip,
        _ => Action::Store,
    }
}

/// Whether two records of one id are a conflict worth reporting: concurrent writes with
/// different content. Not concurrent: equal versions; two versions from one node (an
/// ordinary sequence of updates, a node's clock only moves forward); and a write whose
/// `base` is the other version (an update of exactly what the other node had written, as
/// when a session created on one master is reconnected on the other). Changes stream in
/// order, so each write meets its base; only a snapshot, which skips intermediate versions,
/// can make a longer chain look concurrent.
pub fn is_conflict(local: &Record, remote: &Record) -> bool {
    local.version != remote.version
        && local.version.node != remote.version.node
        && remote.base.as_ref() != Some(&local.version)
        && local.base.as_ref() != Some(&remote.version)
        && local.session != remote.session
}

/// Whether merging `remote` into a node storing `local` must be followed by a new local
/// delete of the id: the two are concurrent (neither names the other as its base), one is a
/// tombstone, and last-writer-wins keeps the live one. Decided from the two records alone,
/// so both nodes reach the same answer (both may write a delete; the greater wins).
pub fn reasserts_delete(local: &Record, remote: &Record) -> bool {
    let concurrent = local.version != remote.version
        && remote.base.as_ref() != Some(&local.version)
        && local.base.as_ref() != Some(&remote.version);
    let (live, dead) = match (&local.session, &remote.session) {
        (Some(_), None) => (local, remote),
        (None, Some(_)) => (remote, local),
        _ => return false,
    };
    concurrent && live.version > dead.version
}

/// The winner of two records of one id, `None` when they are the same version.
pub fn winner(local: &Record, remote: &Record) -> Option<Winner> {
    use std::cmp::Ordering;
    match local.version.cmp(&remote.version) {
        Ordering::Less => Some(Winner::Remote),
        Ordering::Greater => Some(Winner::Local),
        Ordering::Equal => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Hlc, NodeId, SessionId};
    use proptest::prelude::*;

    fn v(wall: u64, logical: u32, node: &str) -> Version {
        Version { hlc: Hlc { wall_ms: wall, logical }, node: NodeId(node.into()) }
    }

    fn tomb(id: &str, version: Version) -> Record {
        Record { id: SessionId(id.into()), version, base: None, session: None }
    }

    #[test]
    fn newer_is_stored_older_and_equal_skipped() {
        assert_eq!(decide(None, &v(1, 0, "a")), Action::Store);
        assert_eq!(decide(Some(&v(1, 0, "a")), &v(2, 0, "a")), Action::Store);
        assert_eq!(decide(Some(&v(2, 0, "a")), &v(1, 5, "b")), Action::Skip);
        assert_eq!(decide(Some(&v(2, 0, "a")), &v(2, 0, "a")), Action::Skip);
        assert_eq!(decide(Some(&v(2, 0, "a")), &v(2, 0, "b")), Action::Store);
    }

    #[test]
    fn a_concurrent_newer_update_of_an_ended_session_makes_the_delete_written_again() {
        let created = live_rec(v(1, 0, "a"), None);
        // a ends the session; b, apart and with its clock two minutes ahead, reconnects it.
        let ended = Record { base: Some(created.version.clone()), ..tomb("x", v(2, 0, "a")) };
        let reconnected = live_rec(v(120_000, 0, "b"), Some(created.version.clone()));
        assert!(reasserts_delete(&ended, &reconnected), "a keeps its delete");
        assert!(reasserts_delete(&reconnected, &ended), "b takes the delete too");
        // Not concurrent: an update the delete was based on, or a delete newer anyway.
        let later_end = Record { base: Some(reconnected.version.clone()), ..tomb("x", v(120_001, 0, "a")) };
        assert!(!reasserts_delete(&reconnected, &later_end));
        assert!(!reasserts_delete(&later_end, &reconnected));
        let old_update = live_rec(v(1, 5, "b"), Some(created.version.clone()));
        assert!(!reasserts_delete(&ended, &old_update), "last-writer-wins already keeps the delete");
        assert!(!reasserts_delete(&created, &reconnected), "two live records");
    }

    fn live_rec(version: Version, base: Option<Version>) -> Record {
        Record { id: SessionId("x".into()), version, base, session: Some(live_x(0)) }
    }

    #[test]
    fn same_node_updates_are_not_conflicts() {
        let mut newer = tomb("x", v(2, 0, "a"));
        newer.session = None;
        let older = Record { session: None, ..tomb("x", v(1, 0, "a")) };
        assert!(!is_conflict(&older, &newer));
        // Different nodes, same content (both tombstones): nothing to report either.
        assert!(!is_conflict(&tomb("x", v(1, 0, "a")), &tomb("x", v(2, 0, "b"))));
    }

    /// Merging a multiset of versions in any order, with duplicates, ends at the maximum.
    fn merge_all(order: &[Version]) -> Option<Version> {
        let mut stored: Option<Version> = None;
        for inc in order {
            if decide(stored.as_ref(), inc) == Action::Store {
                stored = Some(inc.clone());
            }
        }
        stored
    }

    fn arb_version() -> impl Strategy<Value = Version> {
        (0u64..4, 0u32..3, prop_oneof![Just("a"), Just("b")]).prop_map(|(w, l, n)| v(w, l, n))
    }

    fn versions_and_shuffled_duplicates() -> impl Strategy<Value = (Vec<Version>, Vec<Version>)> {
        proptest::collection::vec(arb_version(), 1..12).prop_flat_map(|v| {
            let doubled: Vec<Version> = v.iter().chain(v.iter()).cloned().collect();
            (Just(v), Just(doubled).prop_shuffle())
        })
    }

    /// Session `x` of user `u`, last connected at `last_connect_ms` (what distinguishes
    /// two writes' content).
    fn live_x(last_connect_ms: u64) -> crate::model::Session {
        crate::model::Session {
            id: SessionId("x".into()),
            user: "u".into(),
            subcluster: String::new(),
            agent: "ag".into(),
            agent_address: String::new(),
            display: 1,
            vnc_port: 5901,
            status: crate::model::SessionStatus::Running,
            created_ms: 1,
            last_connect_ms,
            last_client_address: String::new(),
            pid: 1,
            command: vec![],
            geometry: String::new(),
            client_params: vec![],
        }
    }

    /// Two nodes writing one id, each write based on what its node stores (never a live write
    /// over a tombstone), changes streamed in order, a delete written again where
    /// [`reasserts_delete`] says: a conflict is reported exactly for concurrent writes with
    /// different content, and once every change is delivered both nodes store the same
    /// record, a tombstone if either node ever wrote one.
    fn check_streamed_history(ops: &[(bool, bool)]) -> Result<(), TestCaseError> {
        use std::collections::{BTreeMap, BTreeSet, VecDeque};
        let mut stored: [Option<Record>; 2] = [None, None];
        let mut inbox: [VecDeque<Record>; 2] = [VecDeque::new(), VecDeque::new()];
        let mut ancestors: BTreeMap<Version, BTreeSet<Version>> = BTreeMap::new();
        let mut clock = 0u64;
        let mut wrote_tombstone = false;
        type Stores = [Option<Record>; 2];
        type Inboxes = [VecDeque<Record>; 2];
        type Ancestors = BTreeMap<Version, BTreeSet<Version>>;
        // A local write on node `n`: based on what it stores, its clock past everything it
        // stores (as the HLC does).
        fn write(
            n: usize,
            session: Option<crate::model::Session>,
            clock: &mut u64,
            stored: &mut Stores,
            inbox: &mut Inboxes,
            ancestors: &mut Ancestors,
        ) {
            *clock = (*clock).max(stored[n].as_ref().map_or(0, |r| r.version.hlc.wall_ms)) + 1;
            let version = v(*clock, 0, ["a", "b"][n]);
            let base = stored[n].as_ref().map(|r| r.version.clone());
            let mut anc: BTreeSet<Version> = BTreeSet::new();
            if let Some(b) = &base {
                anc.insert(b.clone());
                anc.extend(ancestors[b].iter().cloned());
            }
            ancestors.insert(version.clone(), anc);
            let rec = Record { id: SessionId("x".into()), version, base, session };
            stored[n] = Some(rec.clone());
            inbox[1 - n].push_back(rec);
        }
        fn receive(
            n: usize,
            rec: Record,
            clock: &mut u64,
            stored: &mut Stores,
            inbox: &mut Inboxes,
            ancestors: &mut Ancestors,
        ) -> Result<(), TestCaseError> {
            let local = stored[n].clone();
            if let Some(local) = &local {
                let concurrent = local.version != rec.version
                    && !ancestors[&local.version].contains(&rec.version)
                    && !ancestors[&rec.version].contains(&local.version);
                prop_assert_eq!(
                    is_conflict(local, &rec),
                    concurrent && local.session != rec.session,
                    "local {:?} remote {:?}",
                    local,
                    rec
                );
            }
            if decide(stored[n].as_ref().map(|r| &r.version), &rec.version) == Action::Store {
                stored[n] = Some(rec.clone());
            }
            if local.is_some_and(|l| reasserts_delete(&l, &rec)) {
                write(n, None, clock, stored, inbox, ancestors);
            }
            Ok(())
        }
        for (i, &(on_b, deliver)) in ops.iter().enumerate() {
            let n = usize::from(on_b);
            if deliver {
                let Some(rec) = inbox[n].pop_front() else { continue };
                receive(n, rec, &mut clock, &mut stored, &mut inbox, &mut ancestors)?;
            } else {
                let session = (i % 3 != 0).then(|| live_x(i as u64));
                if session.is_some() && stored[n].as_ref().is_some_and(|r| r.session.is_none()) {
                    continue; // an ended session is never live again
                }
                wrote_tombstone |= session.is_none();
                write(n, session, &mut clock, &mut stored, &mut inbox, &mut ancestors);
            }
        }
        // Deliver everything, including the deletes written again on the way.
        while !inbox[0].is_empty() || !inbox[1].is_empty() {
            for n in 0..2 {
                if let Some(rec) = inbox[n].pop_front() {
                    receive(n, rec, &mut clock, &mut stored, &mut inbox, &mut ancestors)?;
                }
            }
        }
        prop_assert_eq!(&stored[0], &stored[1], "both nodes converge");
        prop_assert_eq!(stored[0].as_ref().is_some_and(|r| r.session.is_none()), wrote_tombstone, "deletes win");
        Ok(())
    }

    #[test]
    fn an_update_based_on_the_peers_version_is_no_conflict() {
        let created = Record { id: SessionId("x".into()), version: v(1, 0, "a"), base: None, session: None };
        let mut updated = created.clone();
        updated.version = v(2, 0, "b");
        updated.base = Some(created.version.clone());
        updated.session = Some(live_x(2));
        assert!(!is_conflict(&created, &updated));
        assert!(!is_conflict(&updated, &created));
        let mut apart = updated.clone();
        apart.base = None;
        assert!(is_conflict(&created, &apart), "without the base the two writes are concurrent");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn conflicts_are_exactly_the_concurrent_writes(
            ops in proptest::collection::vec((any::<bool>(), any::<bool>()), 0..40),
        ) {
            check_streamed_history(&ops)?;
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn merge_is_order_insensitive_and_idempotent(
            (versions, shuffled) in versions_and_shuffled_duplicates(),
        ) {
            let max = versions.iter().max().cloned();
            prop_assert_eq!(merge_all(&versions), max.clone());
            prop_assert_eq!(merge_all(&shuffled), max);
        }
    }
}
