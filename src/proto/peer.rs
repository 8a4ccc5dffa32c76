//! Messages of the master↔master peer link (both directions).
//!
//! These types are the whole replication protocol; they travel inside the authenticated,
//! encrypted frames of `proto::secure`, which already rejected peers without the shared
//! secret. This module defines what is said, never how bytes move, and never decides
//! anything: the replication engine (`ha::engine`) does.
//!
//! A connection starts with both sides sending [`Hello`] at once (neither waits for the
//! other), then each side streams its own change log to the other: history first (change-log
//! batches, or a snapshot when the log no longer reaches back far enough), then
//! [`PeerMsg::CaughtUp`], then live changes. The receiver answers every applied batch with
//! [`PeerMsg::Ack`].
//!
//! Invariants: [`PROTOCOL_VERSION`] changes whenever a message or field changes meaning;
//! `Changes::records` are in ascending, contiguous `seq` order.

use crate::model::{Change, NodeId, Record, Seq};
use serde::{Deserialize, Serialize};

/// Largest message on the peer link. Change batches and snapshot chunks are cut to at most
/// [`BATCH_BYTES`] by the sender and a single record is at most
/// [`crate::model::MAX_RECORD`], so this leaves room for a peer whose estimate is off.
pub const MAX_MESSAGE: usize = 32 * 1024 * 1024;
/// Most bytes of records the sender puts in one `Changes` or `SnapshotChunk` message.
pub const BATCH_BYTES: usize = 4 * 1024 * 1024;

/// Version of this protocol; peers with another version are rejected.
pub const PROTOCOL_VERSION: u32 = 1;

/// The first message on a connection, sent by both sides without waiting for the other's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// [`PROTOCOL_VERSION`] of the sender.
    pub protocol: u32,
    /// The sender's entry in `/HA/nodes`.
    pub node: NodeId,
    /// Identity of the sender's database, random and fixed when it was created. A new
    /// database (reinstall, deleted file) has a new id, so positions in the old log are void.
    pub db_id: String,
    /// Last sequence number of the sender's own change log.
    pub head: Seq,
    /// Oldest sequence number the sender's change log still holds (`head + 1` when empty).
    pub oldest: Seq,
    /// The receiver's `db_id` that `your_position` refers to: the one the receiver last
    /// announced to the sender. `None` when the sender never applied anything of the receiver.
    pub your_db_id: Option<String>,
    /// How far the sender has applied the receiver's change log (of `your_db_id`).
    pub your_position: Seq,
    /// Digest of the cluster configuration (subclusters, agents); a mismatch is warned about.
    pub config_digest: String,
    /// The sender's wall clock in Unix milliseconds, to detect clock skew.
    pub now_ms: u64,
}

crate::tagged_enum! {
    #[tagged(tag = "type", name = "PeerMsg")]
    /// One message of the peer link.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub enum PeerMsg {
        /// Handshake; see [`Hello`].
        Hello(Hello),
        /// Entries of the sender's change log, ascending and contiguous; the first one follows
        /// directly what the receiver already has.
        Changes { records: Vec<Change> },
        /// A full copy of the sender's database follows, consistent at `head` of its log;
        /// `total` records in the chunks.
        SnapshotBegin { head: Seq, total: u64 },
        /// Part of a snapshot.
        SnapshotChunk { records: Vec<Record> },
        /// End of a snapshot; `head` repeats the one of `SnapshotBegin`.
        SnapshotEnd { head: Seq },
        /// The receiver now has everything the sender had at handshake time (up to `head` of the
        /// sender's log); live changes follow.
        CaughtUp { head: Seq },
        /// The sender of this message has durably applied the receiver's log (of `db_id`) up to
        /// `applied`.
        Ack { db_id: String, applied: Seq },
        /// Liveness while nothing else is sent; `head` is the sender's last sequence number.
        Heartbeat { head: Seq, now_ms: u64 },
        /// The sender refuses this connection and will close it; `reason` says why.
        Reject { reason: String },
    }

}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Hlc, SessionId, Version};

    #[test]
    fn messages_round_trip_with_a_type_tag() {
        let record = Record {
            id: SessionId("s1".into()),
            version: Version { hlc: Hlc { wall_ms: 5, logical: 1 }, node: NodeId("a".into()) },
            base: Some(Version { hlc: Hlc { wall_ms: 4, logical: 0 }, node: NodeId("b".into()) }),
            session: None,
        };
        let msgs = vec![
            PeerMsg::Hello(Hello {
                protocol: PROTOCOL_VERSION,
                node: NodeId("a".into()),
                db_id: "d1".into(),
                head: Seq(3),
                oldest: Seq(1),
                your_db_id: Some("d2".into()),
                your_position: Seq(2),
                config_digest: "abc".into(),
                now_ms: 9,
            }),
            PeerMsg::Changes { records: vec![Change { seq: Seq(1), record: record.clone() }] },
            PeerMsg::SnapshotBegin { head: Seq(4), total: 1 },
            PeerMsg::SnapshotChunk { records: vec![record] },
            PeerMsg::SnapshotEnd { head: Seq(4) },
            PeerMsg::CaughtUp { head: Seq(4) },
            PeerMsg::Ack { db_id: "d1".into(), applied: Seq(4) },
            PeerMsg::Heartbeat { head: Seq(4), now_ms: 10 },
            PeerMsg::Reject { reason: "no".into() },
        ];
        for m in msgs {
            let json = serde_json::to_string(&m).unwrap();
            assert!(json.starts_with("{\"type\":"), "{json}");
            let back: PeerMsg = serde_json::from_str(&json).unwrap();
            assert_eq!(back, m);
        }
        let v = serde_json::to_value(PeerMsg::CaughtUp { head: Seq(7) }).unwrap();
        assert_eq!(v, serde_json::json!({"type": "caught_up", "head": 7}));
    }

    #[test]
    fn unknown_types_are_errors() {
        assert!(serde_json::from_str::<PeerMsg>(r#"{"type":"bogus"}"#).is_err());
        assert!(serde_json::from_str::<PeerMsg>(r#"{"type":"ack","applied":1}"#).is_err());
    }
}
