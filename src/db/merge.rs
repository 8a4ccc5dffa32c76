//! The merge rule for replicated records, without I/O.
//!
//! Owns: the decision "store or skip" for a remote record against the stored one, and
//! what counts as a conflict worth logging.
//! Must never: look at anything but the two records (no clocks, no node roles), so both
//! nodes decide identically.
//!
//! Invariants: merging is last-writer-wins on [`Version`] (clock, then node id), which
//! makes it commutative, associative and idempotent; the surviving record of an id is the
//! one with the greatest version ever seen for it.

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

/// Whether two records of one id are a conflict worth reporting: different versions
/// written on different nodes with different content. Two versions from one node are an
/// ordinary sequence of updates (a node's clock only moves forward).
pub fn is_conflict(local: &Record, remote: &Record) -> bool {
    local.version != remote.version
        && local.version.node != remote.version.node
        && local.session != remote.session
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
        Version {
            hlc: Hlc {
                wall_ms: wall,
                logical,
            },
            node: NodeId(node.into()),
        }
    }

    fn tomb(id: &str, version: Version) -> Record {
        Record {
            id: SessionId(id.into()),
            version,
            session: None,
        }
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
    fn same_node_updates_are_not_conflicts() {
        let mut newer = tomb("x", v(2, 0, "a"));
        newer.session = None;
        let older = Record {
            session: None,
            ..tomb("x", v(1, 0, "a"))
        };
        assert!(!is_conflict(&older, &newer));
        // Different nodes, same content (both tombstones): nothing to report either.
        assert!(!is_conflict(
            &tomb("x", v(1, 0, "a")),
            &tomb("x", v(2, 0, "b"))
        ));
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
