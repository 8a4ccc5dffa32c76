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

/// Cuts records, in the order given, into the record lists of `SnapshotChunk` messages: at
/// most `limit` records each and at most `bytes` of records by [`Record::json_len_bound`]
/// (a single larger record goes alone). Fed one record at a time, so a snapshot streamed
/// from the database is never held whole.
#[derive(Debug)]
pub struct Chunker {
    limit: usize,
    bytes: usize,
    chunk: Vec<Record>,
    size: usize,
}

impl Chunker {
    pub fn new(limit: usize, bytes: usize) -> Chunker {
        Chunker { limit: limit.max(1), bytes, chunk: Vec::new(), size: 0 }
    }

    /// Adds `r`; returns the chunk it closed, if it did not fit in the current one.
    pub fn push(&mut self, r: Record) -> Option<Vec<Record>> {
        let len = r.json_len_bound();
        let full = !self.chunk.is_empty() && (self.chunk.len() >= self.limit || self.size + len > self.bytes);
        let closed = full.then(|| self.take());
        self.size += len;
        self.chunk.push(r);
        closed
    }

    /// The last chunk, if any record is left.
    pub fn finish(&mut self) -> Option<Vec<Record>> {
        (!self.chunk.is_empty()).then(|| self.take())
    }

    fn take(&mut self) -> Vec<Record> {
        self.size = 0;
        std::mem::take(&mut self.chunk)
    }
}

/// Every message that sends a snapshot of `records` at `head` held whole, as a [`Chunker`]
/// cuts it (the engine task streams it from the database instead; this is for tests and the
/// replication simulation).
pub fn snapshot_messages(head: Seq, records: Vec<Record>, limit: usize, bytes: usize) -> Vec<PeerMsg> {
    let total = records.len() as u64;
    let mut chunker = Chunker::new(limit, bytes);
    let mut msgs = vec![PeerMsg::SnapshotBegin { head, total }];
    for r in records {
        msgs.extend(chunker.push(r).map(|records| PeerMsg::SnapshotChunk { records }));
    }
    msgs.extend(chunker.finish().map(|records| PeerMsg::SnapshotChunk { records }));
    msgs.push(PeerMsg::SnapshotEnd { head });
    msgs
}

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
    /// The sender's database holds no session and no tombstone, and the sender loads a
    /// snapshot sent as a file ([`PeerMsg::SnapshotPart`]). Absent (false) from a sender
    /// that does not: it only ever gets `SnapshotChunk`s.
    #[serde(default)]
    pub empty: bool,
}

/// Bytes that travel in a JSON message as one base64 string (standard alphabet, padded).
#[derive(Clone, PartialEq, Eq)]
pub struct Base64Bytes(pub Vec<u8>);

impl std::fmt::Debug for Base64Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "<{} bytes>", self.0.len())
    }
}

impl Serialize for Base64Bytes {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use base64::Engine as _;
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for Base64Bytes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use base64::Engine as _;
        let text = std::borrow::Cow::<'de, str>::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(text.as_bytes())
            .map(Base64Bytes)
            .map_err(|e| serde::de::Error::custom(format!("not base64: {e}")))
    }
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
        /// The next bytes of a snapshot sent as a file, instead of chunks, to a receiver that
        /// announced an empty database ([`Hello::empty`]): a SQLite database holding the
        /// `sessions` table of the sender's schema, rows and indexes as the sender stores them.
        SnapshotPart { data: Base64Bytes },
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
                empty: true,
            }),
            PeerMsg::Changes { records: vec![Change { seq: Seq(1), record: record.clone() }] },
            PeerMsg::SnapshotBegin { head: Seq(4), total: 1 },
            PeerMsg::SnapshotChunk { records: vec![record] },
            PeerMsg::SnapshotPart { data: Base64Bytes(vec![0, 1, 2, 250, 251, 252, 253]) },
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

    fn tomb(i: usize, node_len: usize) -> Record {
        Record {
            id: SessionId(format!("s{i}")),
            version: Version { hlc: Hlc { wall_ms: 5, logical: 1 }, node: NodeId("n".repeat(node_len)) },
            base: None,
            session: None,
        }
    }

    #[test]
    fn the_chunker_cuts_by_count_and_by_bytes_and_keeps_order() {
        // By count: 7 records, 3 a chunk.
        let mut c = Chunker::new(3, usize::MAX);
        let mut chunks: Vec<Vec<Record>> = (0..7).filter_map(|i| c.push(tomb(i, 1))).collect();
        chunks.extend(c.finish());
        assert_eq!(chunks.iter().map(Vec::len).collect::<Vec<_>>(), vec![3, 3, 1]);
        let ids: Vec<String> = chunks.concat().into_iter().map(|r| r.id.0).collect();
        assert_eq!(ids, (0..7).map(|i| format!("s{i}")).collect::<Vec<_>>());
        assert_eq!(c.finish(), None, "nothing left after the last chunk");
        // By bytes: each record about 1 KiB, at most 2.5 KiB a chunk; a record over the
        // limit goes alone.
        let one = tomb(0, 1000).json_len_bound();
        let mut c = Chunker::new(100, one * 5 / 2);
        let mut sizes = Vec::new();
        for i in 0..5 {
            sizes.extend(c.push(tomb(i, 1000)).map(|ch| ch.len()));
        }
        sizes.extend(c.push(tomb(9, 10_000)).map(|ch| ch.len()));
        sizes.extend(c.push(tomb(10, 1000)).map(|ch| ch.len()));
        sizes.extend(c.finish().map(|ch| ch.len()));
        assert_eq!(sizes, vec![2, 2, 1, 1, 1]);
    }

    #[test]
    fn a_snapshot_held_whole_is_begin_chunks_end() {
        let msgs = snapshot_messages(Seq(9), (0..5).map(|i| tomb(i, 1)).collect(), 2, BATCH_BYTES);
        let kinds: Vec<String> = msgs
            .iter()
            .map(|m| match m {
                PeerMsg::SnapshotBegin { head, total } => format!("begin {} {total}", head.0),
                PeerMsg::SnapshotChunk { records } => format!("chunk {}", records.len()),
                PeerMsg::SnapshotEnd { head } => format!("end {}", head.0),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(kinds, ["begin 9 5", "chunk 2", "chunk 2", "chunk 1", "end 9"]);
        assert_eq!(snapshot_messages(Seq(3), vec![], 2, BATCH_BYTES).len(), 2, "an empty snapshot: begin and end");
    }

    #[test]
    fn file_parts_are_base64_and_an_older_hello_is_not_empty() {
        let v = serde_json::to_value(PeerMsg::SnapshotPart { data: Base64Bytes(b"SQLite".to_vec()) }).unwrap();
        assert_eq!(v, serde_json::json!({"type": "snapshot_part", "data": "U1FMaXRl"}));
        let bad = serde_json::from_str::<PeerMsg>(r#"{"type":"snapshot_part","data":"not base64!"}"#);
        assert!(bad.unwrap_err().to_string().contains("not base64"));
        let old = r#"{"type":"hello","protocol":1,"node":"a","db_id":"d","head":0,"oldest":1,
            "your_db_id":null,"your_position":0,"config_digest":"x","now_ms":1}"#;
        match serde_json::from_str::<PeerMsg>(old).unwrap() {
            PeerMsg::Hello(h) => assert!(!h.empty),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unknown_types_are_errors() {
        assert!(serde_json::from_str::<PeerMsg>(r#"{"type":"bogus"}"#).is_err());
        assert!(serde_json::from_str::<PeerMsg>(r#"{"type":"ack","applied":1}"#).is_err());
    }
}
