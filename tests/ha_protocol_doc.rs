//! `docs/ha-protocol.md` stays true: every ```json block decodes as a peer message, and every
//! message kind has an example.

use std::collections::BTreeSet;
use vsm::proto::peer::{PeerMsg, PROTOCOL_VERSION};

const DOC: &str = include_str!("../docs/ha-protocol.md");

/// Every kind of peer message. The match is exhaustive, so a new kind fails to compile here
/// until it is added, and then fails the test until the doc shows it.
fn kind(m: &PeerMsg) -> &'static str {
    match m {
        PeerMsg::Hello(_) => "hello",
        PeerMsg::Changes { .. } => "changes",
        PeerMsg::SnapshotBegin { .. } => "snapshot_begin",
        PeerMsg::SnapshotChunk { .. } => "snapshot_chunk",
        PeerMsg::SnapshotPart { .. } => "snapshot_part",
        PeerMsg::SnapshotEnd { .. } => "snapshot_end",
        PeerMsg::CaughtUp { .. } => "caught_up",
        PeerMsg::Ack { .. } => "ack",
        PeerMsg::Heartbeat { .. } => "heartbeat",
        PeerMsg::Reject { .. } => "reject",
    }
}

const KINDS: [&str; 10] = [
    "hello",
    "changes",
    "snapshot_begin",
    "snapshot_chunk",
    "snapshot_part",
    "snapshot_end",
    "caught_up",
    "ack",
    "heartbeat",
    "reject",
];

/// The bodies of the fenced ```json blocks, with the line each starts on.
fn json_blocks(doc: &str) -> Vec<(usize, String)> {
    let mut out = vec![];
    let mut current: Option<(usize, String)> = None;
    for (n, line) in doc.lines().enumerate() {
        let fence = line.trim_start();
        match &mut current {
            None if fence.starts_with("```json") => current = Some((n + 2, String::new())),
            Some(_) if fence.starts_with("```") => out.extend(current.take()),
            Some((_, body)) => {
                body.push_str(line);
                body.push('\n');
            }
            None => {}
        }
    }
    assert!(current.is_none(), "a ```json block is not closed");
    out
}

#[test]
fn every_json_example_is_a_peer_message_and_every_kind_has_one() {
    let blocks = json_blocks(DOC);
    assert!(
        blocks.len() >= KINDS.len(),
        "the doc has {} json examples, fewer than the {} message kinds",
        blocks.len(),
        KINDS.len()
    );
    let mut seen = BTreeSet::new();
    for (line, body) in &blocks {
        let msg: PeerMsg = serde_json::from_str(body)
            .unwrap_or_else(|e| panic!("docs/ha-protocol.md line {line}: not a peer message: {e}\n{body}"));
        // The example says exactly what the code would send (no unknown fields ignored).
        let back: serde_json::Value = serde_json::to_value(&msg).unwrap();
        let orig: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(back, orig, "docs/ha-protocol.md line {line}: the example does not round-trip");
        seen.insert(kind(&msg));
    }
    let missing: Vec<&str> = KINDS.iter().copied().filter(|k| !seen.contains(k)).collect();
    assert!(missing.is_empty(), "message kinds without an example in docs/ha-protocol.md: {missing:?}");
}

#[test]
fn the_doc_names_the_protocol_version_of_the_code() {
    let want = format!("**Protocol version {PROTOCOL_VERSION}.**");
    assert!(DOC.contains(&want), "docs/ha-protocol.md must state {want}");
}

#[test]
fn the_extractor_finds_blocks_and_ignores_other_code() {
    let doc = "text\n```json\n{\"a\": 1}\n```\n```\nnot json\n```\n  ```json\n{}\n  ```\n";
    let b = json_blocks(doc);
    assert_eq!(b.len(), 2);
    assert_eq!(b[0], (3, "{\"a\": 1}\n".to_string()));
}
