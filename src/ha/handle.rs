//! The boundary between HA and the layers that use it: what the broker ([`Replication`],
//! [`AdoptionGate`]) and the API ([`HaControl`]) need from the HA side of the node.
//!
//! `ha::node::HaNode` implements both traits; `server` hands the one node to the broker and to
//! the API as these trait objects, so `ha` depends on neither of them and both depend on this
//! module only. The broker's `Standalone` is the implementation without a peer.
//!
//! Invariants: nothing here holds state; every method answers from the node's own watches and
//! never waits on the broker or the API.

use crate::db::{Committed, DbError, DbHandle, Write};
use crate::model::{Readiness, Role};
use crate::proto::api::{HaStatusView, VrrpState};
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;
use tokio::sync::watch;

/// A committed change, answered once it is safe to tell a client about.
pub type CommitFuture = Pin<Box<dyn Future<Output = Result<Committed, DbError>> + Send + 'static>>;

/// The local commit alone: what [`Replication::commit`] is with no peer to wait for.
pub fn commit_locally(db: &DbHandle, w: Write) -> CommitFuture {
    let db = db.clone();
    Box::pin(async move { db.write(w).await })
}

/// Commits a change and waits until it is safe to tell a client about (HA ack), or not at all.
pub trait Replication: Send + Sync + 'static {
    /// Commits `w` and, with HA acknowledgements on, waits for the peer to have it too (or
    /// for the engine to release the wait: timed out, link down). With no peer, only the
    /// local commit.
    fn commit(&self, db: &DbHandle, w: Write) -> CommitFuture {
        commit_locally(db, w)
    }

    /// HA is on and the peer link is not up and caught up (see `HaNode::cut_off`).
    fn cut_off(&self) -> bool {
        false
    }

    /// Whether a desktop the database does not know may be adopted now (see
    /// [`AdoptionGate`]).
    fn adoption_gate(&self) -> AdoptionGate {
        AdoptionGate::Now
    }
}

/// When reconciliation may adopt a desktop that runs on an agent but is not in the database.
///
/// With a peer, such a desktop may be the other master's start still under way: that master
/// either stores it or records it as abandoned once its agent call ends, and the record takes
/// up to `lag` to arrive here. Adopting before would race that record (and an abandoned
/// start's tombstone wins the merge, ending a session this master may have handed out), so
/// the desktop must have been seen unknown, and the link up, for longer than a start can take
/// plus `lag`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdoptionGate {
    /// No peer: adopt at once.
    Now,
    /// Linked and caught up with the peer for `linked_for`.
    Linked { linked_for: Duration, lag: Duration },
    /// Cut off from the peer: never now.
    CutOff,
}

/// Whether a status includes the database digest, which reads and hashes every record (a
/// few hundred milliseconds of CPU with 100,000 sessions): `tlctl ha status` shows it, a
/// metrics scrape does not need it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Digest {
    Include,
    Omit,
}

/// What the API needs from the HA side of the node.
pub trait HaControl: Send + Sync + 'static {
    /// The node's HA status; `agent_clock_offsets` is left empty (see [`crate::api::Api::ha_status`]).
    fn status(&self, digest: Digest) -> Pin<Box<dyn Future<Output = HaStatusView> + Send + '_>>;
    fn notify(&self, state: VrrpState) -> Pin<Box<dyn Future<Output = String> + Send + '_>>;
    /// Why the node is (not) ready now, and every change of it.
    fn readiness(&self) -> watch::Receiver<Readiness>;
    /// The current readiness as a sentence with this node's details.
    fn readiness_reason(&self) -> String;
    /// The role, and every change of it.
    fn role(&self) -> watch::Receiver<Role>;
    /// Why the node must not decide about sessions now although it is ready (a standby cut
    /// off from the active master), if so.
    fn decision_refusal(&self) -> Option<&'static str>;
}
