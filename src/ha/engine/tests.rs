//! Decision tests: feed events, assert on commands. Time is plain milliseconds.

use super::*;
use crate::model::{Hlc, SessionId, Version};
use std::time::Duration;

const A_DB: &str = "db-a";
const B_DB: &str = "db-b";

fn config() -> EngineConfig {
    EngineConfig {
        local: NodeId("a".into()),
        peer: NodeId("b".into()),
        sync: SyncLevel::Ack,
        sync_timeout: Duration::from_millis(1000),
        startup_grace: Duration::from_millis(5000),
        heartbeat_interval: Duration::from_millis(100),
        peer_timeout: Duration::from_millis(500),
        config_digest: "digest".into(),
        batch_limit: 2,
        batch_bytes: crate::proto::peer::BATCH_BYTES,
        max_inflight: 2,
        role: Role::Standby,
        max_clock_offset: Duration::from_millis(2000),
    }
}

fn engine_with(cfg: EngineConfig, head: u64, oldest: u64) -> Engine {
    let mut e = Engine::new(cfg, DbStatus { db_id: A_DB.into(), head: Seq(head), oldest: Seq(oldest) }, 0);
    assert_eq!(e.step(Event::Start { now: 0 }), vec![]);
    e
}

fn engine(head: u64, oldest: u64) -> Engine {
    engine_with(config(), head, oldest)
}

fn record(id: &str, wall_ms: u64) -> Record {
    Record {
        id: SessionId(id.into()),
        version: Version { hlc: Hlc { wall_ms, logical: 0 }, node: NodeId("a".into()) },
        base: None,
        session: None,
    }
}

fn change(seq: u64) -> Change {
    Change { seq: Seq(seq), record: record(&format!("s{seq}"), seq) }
}

fn changes(range: std::ops::RangeInclusive<u64>) -> Vec<Change> {
    range.map(change).collect()
}

/// B's hello: B's log has `head`; B has applied A's log `your_db_id` up to `your_position`.
fn hello_b(your_db_id: Option<&str>, your_position: u64, head: u64) -> Hello {
    Hello {
        protocol: PROTOCOL_VERSION,
        node: NodeId("b".into()),
        db_id: B_DB.into(),
        head: Seq(head),
        oldest: Seq(1),
        your_db_id: your_db_id.map(str::to_string),
        your_position: Seq(your_position),
        config_digest: "digest".into(),
        now_ms: 0,
        empty: false,
    }
}

fn connect(e: &mut Engine, hello: Hello, our_pos: u64, now: u64) -> Vec<Command> {
    e.step(Event::PeerConnected { hello, our_position_for_them: Seq(our_pos), now })
}

fn msg(e: &mut Engine, msg: PeerMsg, now: u64) -> Vec<Command> {
    e.step(Event::PeerMessage { msg, now })
}

fn send(m: PeerMsg) -> Command {
    Command::Send(m)
}

fn ack(applied: u64) -> PeerMsg {
    PeerMsg::Ack { db_id: A_DB.into(), applied: Seq(applied) }
}

fn release(ids: &[u64], outcome: AckOutcome) -> Command {
    Command::ReleaseWaiters { waiters: ids.iter().map(|i| WaiterId(*i)).collect(), outcome }
}

fn is_disconnect(cmds: &[Command], needle: &str) -> bool {
    cmds.iter().any(|c| matches!(c, Command::Disconnect { reason } if reason.contains(needle)))
}

/// A connected to B, both logs in sync, both directions caught up: streaming.
fn streaming(head: u64) -> Engine {
    let mut e = engine(head, 1);
    let cmds = connect(&mut e, hello_b(Some(A_DB), head, 0), 0, 10);
    assert_eq!(cmds, vec![send(PeerMsg::CaughtUp { head: Seq(head) })]);
    assert_eq!(msg(&mut e, PeerMsg::CaughtUp { head: Seq(0) }, 10), vec![]);
    assert_eq!(msg(&mut e, ack(head), 10), vec![]);
    assert_eq!(e.status().link, LinkState::Streaming);
    assert!(e.is_ready());
    e
}

#[test]
fn incremental_catch_up_streams_the_missing_tail_in_batches() {
    let mut e = engine(5, 1);
    let cmds = connect(&mut e, hello_b(Some(A_DB), 2, 0), 0, 10);
    assert_eq!(cmds, vec![Command::ReadLog { after: Seq(2), limit: 2 }]);
    assert_eq!(e.status().link, LinkState::CatchingUp);
    assert_eq!(e.status().peer_acked, Seq(2));

    let cmds = e.step(Event::LogRead { after: Seq(2), result: LogRead::Changes(changes(3..=4)), now: 11 });
    assert_eq!(
        cmds,
        vec![send(PeerMsg::Changes { records: changes(3..=4) }), Command::ReadLog { after: Seq(4), limit: 2 },]
    );
    let cmds = e.step(Event::LogRead { after: Seq(4), result: LogRead::Changes(changes(5..=5)), now: 12 });
    assert_eq!(
        cmds,
        vec![send(PeerMsg::Changes { records: changes(5..=5) }), send(PeerMsg::CaughtUp { head: Seq(5) })]
    );
    // The peer acknowledges; our half of the resync is complete.
    assert_eq!(msg(&mut e, ack(4), 13), vec![]);
    assert_eq!(e.status().last_resync, None);
    assert_eq!(msg(&mut e, ack(5), 14), vec![]);
    let info = e.status().last_resync.unwrap();
    assert_eq!(
        info,
        ResyncInfo { kind: ResyncKind::Incremental, records: 3, duration_ms: 4, at_ms: 14, direction: Direction::Sent }
    );
    assert_eq!(e.status().last_resync_sent, Some(info));
    assert_eq!(e.status().last_resync_received, None);
    // B had nothing for us: not ready until B says so.
    assert!(!e.is_ready());
    msg(&mut e, PeerMsg::CaughtUp { head: Seq(0) }, 15);
    assert!(e.is_ready());
    assert_eq!(e.status().link, LinkState::Streaming);
}

#[test]
fn stale_log_reads_are_ignored() {
    let mut e = engine(5, 1);
    connect(&mut e, hello_b(Some(A_DB), 2, 0), 0, 10);
    let cmds = e.step(Event::LogRead { after: Seq(0), result: LogRead::Changes(changes(1..=2)), now: 11 });
    assert_eq!(cmds, vec![]);
}

#[test]
fn position_outside_the_log_or_for_another_database_means_snapshot() {
    // Truncated: the peer is at 2, the log starts at 4.
    let mut e = engine(5, 4);
    assert_eq!(connect(&mut e, hello_b(Some(A_DB), 2, 0), 0, 10), vec![Command::ReadSnapshot { as_file: false }]);
    // Exactly at the edge (oldest - 1) is still incremental.
    let mut e = engine(5, 4);
    assert_eq!(connect(&mut e, hello_b(Some(A_DB), 3, 0), 0, 10), vec![Command::ReadLog { after: Seq(3), limit: 2 }]);
    // Ahead of my head (my database went back in time).
    let mut e = engine(5, 1);
    assert_eq!(connect(&mut e, hello_b(Some(A_DB), 9, 0), 0, 10), vec![Command::ReadSnapshot { as_file: false }]);
    // A position in another database of mine, or none at all.
    let mut e = engine(5, 1);
    assert_eq!(connect(&mut e, hello_b(Some("db-old"), 2, 0), 0, 10), vec![Command::ReadSnapshot { as_file: false }]);
    let mut e = engine(5, 1);
    assert_eq!(connect(&mut e, hello_b(None, 0, 0), 0, 10), vec![Command::ReadSnapshot { as_file: false }]);
}

#[test]
fn truncated_log_read_switches_to_a_snapshot() {
    let mut e = engine(5, 1);
    connect(&mut e, hello_b(Some(A_DB), 2, 0), 0, 10);
    let cmds = e.step(Event::LogRead { after: Seq(2), result: LogRead::Truncated { oldest: Seq(4) }, now: 11 });
    assert_eq!(cmds, vec![Command::ReadSnapshot { as_file: false }]);
    let records = vec![record("x", 1), record("y", 2), record("z", 3)];
    let cmds = e.step(Event::SnapshotRead { head: Seq(5), total: 3, now: 12 });
    let cmds = send_snapshot(cmds, &records);
    assert_eq!(
        cmds,
        vec![
            send(PeerMsg::SnapshotBegin { head: Seq(5), total: 3 }),
            send(PeerMsg::SnapshotChunk { records: records[..2].to_vec() }),
            send(PeerMsg::SnapshotChunk { records: records[2..].to_vec() }),
            send(PeerMsg::SnapshotEnd { head: Seq(5) }),
            send(PeerMsg::CaughtUp { head: Seq(5) }),
        ]
    );
    // What the peer acknowledged before stays true.
    assert_eq!(e.status().peer_acked, Seq(2));
    msg(&mut e, ack(5), 13);
    let info = e.status().last_resync.unwrap();
    assert_eq!((info.kind, info.records, info.direction), (ResyncKind::Snapshot, 3, Direction::Sent));
}

/// `cmds` with each `SendSnapshot` carried out as the engine task does, sending `records`
/// (the snapshot it read) cut by the command's chunker.
fn send_snapshot(cmds: Vec<Command>, records: &[Record]) -> Vec<Command> {
    let mut out = Vec::new();
    for c in cmds {
        let Command::SendSnapshot { head, total, limit, bytes } = c else {
            out.push(c);
            continue;
        };
        assert_eq!(total, records.len() as u64);
        let msgs = crate::proto::peer::snapshot_messages(head, records.to_vec(), limit, bytes);
        out.extend(msgs.into_iter().map(send));
    }
    out
}

/// A change whose record's size bound is about `kib` KiB.
fn big_change(seq: u64, kib: usize) -> Change {
    let mut c = change(seq);
    c.record.version.node = NodeId("n".repeat(kib * 1024));
    c
}

#[test]
fn batches_and_snapshot_chunks_are_bounded_by_bytes_not_only_by_count() {
    let cfg = EngineConfig { batch_limit: 100, batch_bytes: 10 * 1024, ..config() };
    let mut e = engine_with(cfg.clone(), 5, 1);
    connect(&mut e, hello_b(Some(A_DB), 0, 0), 0, 10);
    // Four records of ~4 KiB: two fit in 10 KiB; the rest is read again for the next batch.
    let read: Vec<Change> = (1..=4).map(|n| big_change(n, 4)).collect();
    let cmds = e.step(Event::LogRead { after: Seq(0), result: LogRead::Changes(read.clone()), now: 11 });
    assert_eq!(
        cmds,
        vec![send(PeerMsg::Changes { records: read[..2].to_vec() }), Command::ReadLog { after: Seq(2), limit: 100 }]
    );
    // A record larger than the budget still goes out, alone.
    let read = vec![big_change(3, 12), big_change(4, 1)];
    let cmds = e.step(Event::LogRead { after: Seq(2), result: LogRead::Changes(read.clone()), now: 12 });
    assert_eq!(cmds[0], send(PeerMsg::Changes { records: read[..1].to_vec() }));

    let mut e = engine_with(cfg, 5, 4);
    assert_eq!(connect(&mut e, hello_b(Some(A_DB), 2, 0), 0, 10), vec![Command::ReadSnapshot { as_file: false }]);
    let records: Vec<Record> = (1..=5).map(|n| big_change(n, 2).record).collect();
    let cmds = e.step(Event::SnapshotRead { head: Seq(5), total: 5, now: 12 });
    let cmds = send_snapshot(cmds, &records);
    assert_eq!(
        cmds,
        vec![
            send(PeerMsg::SnapshotBegin { head: Seq(5), total: 5 }),
            send(PeerMsg::SnapshotChunk { records: records[..3].to_vec() }),
            send(PeerMsg::SnapshotChunk { records: records[3..].to_vec() }),
            send(PeerMsg::SnapshotEnd { head: Seq(5) }),
            send(PeerMsg::CaughtUp { head: Seq(5) }),
        ]
    );
    for c in cmds {
        if let Command::Send(m) = c {
            assert!(serde_json::to_vec(&m).unwrap().len() <= 10 * 1024 + 1024, "{m:?}");
        }
    }
}

#[test]
fn snapshot_older_than_the_connect_head_is_followed_by_the_log() {
    let mut e = engine(5, 1);
    connect(&mut e, hello_b(None, 0, 0), 0, 10);
    let cmds = e.step(Event::SnapshotRead { head: Seq(3), total: 0, now: 11 });
    let cmds = send_snapshot(cmds, &[]);
    assert_eq!(
        cmds,
        vec![
            send(PeerMsg::SnapshotBegin { head: Seq(3), total: 0 }),
            send(PeerMsg::SnapshotEnd { head: Seq(3) }),
            Command::ReadLog { after: Seq(3), limit: 2 },
        ]
    );
}

#[test]
fn empty_database_gets_a_snapshot_and_is_ready_only_once_it_is_applied() {
    // A was reinstalled: empty database with a new id. B has 10 changes and remembers
    // A's old database.
    let mut e = Engine::new(config(), DbStatus { db_id: "db-new".into(), head: Seq(0), oldest: Seq(1) }, 0);
    e.step(Event::Start { now: 0 });
    let cmds = connect(&mut e, hello_b(Some("db-old"), 7, 10), 0, 10);
    assert_eq!(cmds, vec![Command::ReadSnapshot { as_file: false }]);
    assert!(!e.is_ready());

    let recs = [record("x", 1), record("y", 2), record("z", 3)];
    assert_eq!(msg(&mut e, PeerMsg::SnapshotBegin { head: Seq(10), total: 3 }, 11), vec![]);
    let apply = |records: Vec<Record>, pos: Option<u64>| Command::Apply {
        peer_db_id: B_DB.into(),
        records,
        peer_pos: pos.map(Seq),
    };
    assert_eq!(
        msg(&mut e, PeerMsg::SnapshotChunk { records: recs[..2].to_vec() }, 12),
        vec![apply(recs[..2].to_vec(), None)]
    );
    assert_eq!(
        msg(&mut e, PeerMsg::SnapshotChunk { records: recs[2..].to_vec() }, 12),
        vec![apply(recs[2..].to_vec(), None)]
    );
    assert_eq!(msg(&mut e, PeerMsg::SnapshotEnd { head: Seq(10) }, 13), vec![apply(vec![], Some(10))]);
    assert_eq!(msg(&mut e, PeerMsg::CaughtUp { head: Seq(10) }, 13), vec![]);
    // Not ready while the snapshot is not durable, even past the start-up grace.
    msg(&mut e, PeerMsg::Heartbeat { head: Seq(10), now_ms: 6000 }, 6000);
    e.step(Event::Tick { now: 6000 });
    assert!(!e.is_ready());
    assert_eq!(e.step(Event::Applied { up_to: None, now: 6001 }), vec![]);
    assert_eq!(e.step(Event::Applied { up_to: None, now: 6002 }), vec![]);
    assert!(!e.is_ready());
    assert_eq!(
        e.step(Event::Applied { up_to: Some(Seq(10)), now: 6003 }),
        vec![send(PeerMsg::Ack { db_id: B_DB.into(), applied: Seq(10) })]
    );
    assert!(e.is_ready());
    let st = e.status();
    assert_eq!(st.applied_of_peer, Seq(10));
    let info = st.last_resync_received.unwrap();
    assert_eq!((info.kind, info.records, info.direction), (ResyncKind::Snapshot, 3, Direction::Received));
}

#[test]
fn a_snapshot_sent_as_a_file_is_stored_part_by_part_and_loaded_at_its_end() {
    let mut e = Engine::new(config(), DbStatus { db_id: "db-new".into(), head: Seq(0), oldest: Seq(1) }, 0);
    e.step(Event::Start { now: 0 });
    assert_eq!(connect(&mut e, hello_b(Some("db-old"), 7, 10), 0, 10), vec![Command::ReadSnapshot { as_file: false }]);
    assert_eq!(msg(&mut e, PeerMsg::SnapshotBegin { head: Seq(10), total: 3 }, 11), vec![]);
    let part = |b: &[u8]| PeerMsg::SnapshotPart { data: crate::proto::peer::Base64Bytes(b.to_vec()) };
    let store = |first: bool, b: &[u8]| Command::StoreSnapshotPart { first, data: b.to_vec() };
    // Parts that arrive together are not merged: each is one apply answered by one `Applied`.
    let cmds = e.step_batch([
        Event::PeerMessage { msg: part(b"one"), now: 12 },
        Event::PeerMessage { msg: part(b"two"), now: 12 },
    ]);
    assert_eq!(cmds, vec![store(true, b"one"), store(false, b"two")]);
    assert_eq!(e.readiness(), Readiness::ReceivingSnapshot);
    let load = Command::LoadSnapshot { peer_db_id: B_DB.into(), head: Seq(10) };
    assert_eq!(msg(&mut e, PeerMsg::SnapshotEnd { head: Seq(10) }, 13), vec![load]);
    assert_eq!(msg(&mut e, PeerMsg::CaughtUp { head: Seq(10) }, 13), vec![]);
    assert_eq!(e.step(Event::Applied { up_to: None, now: 14 }), vec![]);
    assert_eq!(e.step(Event::Applied { up_to: None, now: 14 }), vec![]);
    assert!(!e.is_ready(), "not ready before the file is loaded");
    assert_eq!(
        e.step(Event::Applied { up_to: Some(Seq(10)), now: 15 }),
        vec![send(PeerMsg::Ack { db_id: B_DB.into(), applied: Seq(10) })]
    );
    assert!(e.is_ready());
    let info = e.status().last_resync_received.unwrap();
    assert_eq!((info.kind, info.records), (ResyncKind::SnapshotFile, 3));
}

#[test]
fn a_peer_that_announces_an_empty_database_gets_its_snapshot_as_a_file() {
    let mut e = engine(5, 1);
    let mut hello = hello_b(None, 0, 0);
    hello.empty = true;
    assert_eq!(connect(&mut e, hello, 0, 10), vec![Command::ReadSnapshot { as_file: true }]);
    let cmds = e.step(Event::SnapshotRead { head: Seq(5), total: 4, now: 11 });
    assert!(matches!(cmds[0], Command::SendSnapshot { head: Seq(5), total: 4, .. }), "{cmds:?}");
    e.step(Event::PeerMessage { msg: PeerMsg::Ack { db_id: A_DB.into(), applied: Seq(5) }, now: 12 });
    let info = e.status().last_resync_sent.expect("the resync sent is over");
    assert_eq!((info.kind, info.records), (ResyncKind::SnapshotFile, 4));
}

#[test]
fn snapshot_file_parts_out_of_place_or_too_many_disconnect() {
    let part = |n: usize| PeerMsg::SnapshotPart { data: crate::proto::peer::Base64Bytes(vec![7; n]) };
    let begun = |total: u64| {
        let mut e = engine(0, 1);
        connect(&mut e, hello_b(None, 0, 0), 0, 10);
        msg(&mut e, PeerMsg::SnapshotBegin { head: Seq(3), total }, 11);
        e
    };
    let mut e = engine(0, 1);
    connect(&mut e, hello_b(None, 0, 0), 0, 10);
    assert!(is_disconnect(&msg(&mut e, part(1), 11), "file part outside a snapshot"));
    let mut e = begun(2);
    msg(&mut e, PeerMsg::SnapshotChunk { records: vec![record("x", 1)] }, 12);
    assert!(is_disconnect(&msg(&mut e, part(1), 12), "part in a snapshot sent as chunks"));
    let mut e = begun(2);
    msg(&mut e, part(1), 12);
    assert!(is_disconnect(
        &msg(&mut e, PeerMsg::SnapshotChunk { records: vec![record("x", 1)] }, 12),
        "chunk in a snapshot sent as a file"
    ));
    // An empty snapshot's file may take the base allowance, not a byte more.
    let limit = crate::ha::engine::snapshot_file_limit(0) as usize;
    let mut e = begun(0);
    assert_eq!(msg(&mut e, part(limit), 12).len(), 1);
    assert!(is_disconnect(&msg(&mut e, part(1), 12), "the most such a file can take"));
}

#[test]
fn protocol_mismatch_is_rejected() {
    let mut e = engine(0, 1);
    let mut hello = hello_b(None, 0, 0);
    hello.protocol = PROTOCOL_VERSION + 1;
    let cmds = connect(&mut e, hello, 0, 10);
    assert_eq!(cmds.len(), 2);
    assert!(
        matches!(&cmds[0], Command::Send(PeerMsg::Reject { reason }) if reason.contains("protocol version mismatch"))
    );
    assert!(is_disconnect(&cmds, "protocol version mismatch"));
    let st = e.status();
    assert_eq!(st.link, LinkState::Down);
    assert!(st.last_link_error.unwrap().contains("protocol"));
    // Nothing it sends afterwards is applied.
    assert_eq!(msg(&mut e, PeerMsg::Changes { records: changes(1..=1) }, 11), vec![]);
}

#[test]
fn wrong_node_or_same_database_is_rejected() {
    let mut e = engine(0, 1);
    let mut hello = hello_b(None, 0, 0);
    hello.node = NodeId("c".into());
    assert!(is_disconnect(&connect(&mut e, hello, 0, 10), "'c' but 'b' was expected"));
    let mut e = engine(0, 1);
    let mut hello = hello_b(None, 0, 0);
    hello.db_id = A_DB.into();
    assert!(is_disconnect(&connect(&mut e, hello, 0, 10), "same database id"));
}

#[test]
fn config_digest_mismatch_is_flagged_not_fatal() {
    let mut e = engine(0, 1);
    assert_eq!(e.status().config_digest_match, None);
    let mut hello = hello_b(Some(A_DB), 0, 0);
    hello.config_digest = "other".into();
    hello.now_ms = 3010;
    let cmds = connect(&mut e, hello, 0, 10);
    assert!(!is_disconnect(&cmds, ""));
    let st = e.status();
    assert_eq!(st.config_digest_match, Some(false));
    assert_eq!(st.clock_offset_ms, Some(3000));
    assert!(st.clock_offset_exceeded);
    assert_eq!(st.link, LinkState::CatchingUp);
    let mut e = engine(0, 1);
    connect(&mut e, hello_b(Some(A_DB), 0, 0), 0, 10);
    assert_eq!(e.status().config_digest_match, Some(true));
}

#[test]
fn gap_in_changes_disconnects_and_duplicates_are_trimmed() {
    let mut e = engine(0, 1);
    connect(&mut e, hello_b(Some(A_DB), 0, 9), 2, 10);
    let apply = |from: u64, to: u64| Command::Apply {
        peer_db_id: B_DB.into(),
        records: changes(from..=to).into_iter().map(|c| c.record).collect(),
        peer_pos: Some(Seq(to)),
    };
    // 1..=2 were applied before; 3 is new.
    assert_eq!(msg(&mut e, PeerMsg::Changes { records: changes(1..=3) }, 11), vec![apply(3, 3)]);
    // All duplicates: an empty apply, acknowledged once durable.
    assert_eq!(msg(&mut e, PeerMsg::Changes { records: changes(2..=3) }, 11), vec![apply(4, 3)]);
    // Internally non-contiguous.
    let mut bad = changes(4..=4);
    bad.push(change(6));
    let mut e2 = engine(0, 1);
    connect(&mut e2, hello_b(Some(A_DB), 0, 9), 3, 10);
    assert!(is_disconnect(&msg(&mut e2, PeerMsg::Changes { records: bad }, 12), "not contiguous"));
    // A gap after what was applied.
    let cmds = msg(&mut e, PeerMsg::Changes { records: changes(5..=6) }, 12);
    assert_eq!(cmds.len(), 1);
    assert!(is_disconnect(&cmds, "gap in the peer's changes: expected seq 4, got 5"));
    assert_eq!(e.status().link, LinkState::Down);
}

#[test]
fn applied_batches_are_acknowledged_and_stale_ones_ignored() {
    let mut e = engine(0, 1);
    connect(&mut e, hello_b(Some(A_DB), 0, 9), 0, 10);
    msg(&mut e, PeerMsg::Changes { records: changes(1..=2) }, 11);
    assert_eq!(
        e.step(Event::Applied { up_to: Some(Seq(2)), now: 12 }),
        vec![send(PeerMsg::Ack { db_id: B_DB.into(), applied: Seq(2) })]
    );
    msg(&mut e, PeerMsg::Changes { records: changes(3..=3) }, 13);
    // The link drops and comes back before that apply is done.
    e.step(Event::PeerDisconnected { reason: "reset".into(), now: 14 });
    connect(&mut e, hello_b(Some(A_DB), 0, 9), 3, 15);
    assert_eq!(e.step(Event::Applied { up_to: Some(Seq(3)), now: 16 }), vec![]);
    assert_eq!(e.status().applied_of_peer, Seq(3));
    // A CaughtUp only counts once the applies issued before it are done.
    msg(&mut e, PeerMsg::Changes { records: changes(4..=4) }, 17);
    msg(&mut e, PeerMsg::CaughtUp { head: Seq(4) }, 17);
    assert!(!e.is_ready());
    e.step(Event::Applied { up_to: Some(Seq(4)), now: 18 });
    assert!(e.is_ready());
}

#[test]
fn applies_stepped_together_are_one_transaction_and_one_ack() {
    let mut e = engine(0, 1);
    connect(&mut e, hello_b(Some(A_DB), 0, 9), 0, 10);
    let m = |records| Event::PeerMessage { msg: PeerMsg::Changes { records }, now: 11 };
    // Three messages read at once, a heartbeat among them: one apply with every record and
    // the last position; the heartbeat's answer does not wait for it.
    let cmds = e.step_batch([
        m(changes(1..=2)),
        m(changes(3..=3)),
        Event::PeerMessage { msg: PeerMsg::Heartbeat { head: Seq(5), now_ms: 11 }, now: 11 },
        m(changes(4..=5)),
    ]);
    let applies: Vec<_> = cmds.iter().filter(|c| matches!(c, Command::Apply { .. })).collect();
    let all = Command::Apply {
        peer_db_id: B_DB.into(),
        records: changes(1..=5).into_iter().map(|c| c.record).collect(),
        peer_pos: Some(Seq(5)),
    };
    assert_eq!(applies, vec![&all], "{cmds:?}");
    // One `Applied` completes all three: one acknowledgement of the last position.
    assert_eq!(
        e.step(Event::Applied { up_to: Some(Seq(5)), now: 12 }),
        vec![send(PeerMsg::Ack { db_id: B_DB.into(), applied: Seq(5) })]
    );
    assert_eq!(e.status().applied_of_peer, Seq(5));
    // A database read between two applies ends the merge, and runs after the first one.
    let cmds = e.step_batch([
        m(changes(6..=6)),
        Event::LocalCommitted { seq: Seq(1), change: None, now: 13 },
        m(changes(7..=7)),
    ]);
    let kinds: Vec<&str> = cmds
        .iter()
        .map(|c| match c {
            Command::Apply { .. } => "apply",
            Command::ReadLog { .. } => "read",
            _ => "other",
        })
        .collect();
    assert_eq!(kinds, ["apply", "read", "apply"], "{cmds:?}");
}

#[test]
fn snapshot_protocol_violations_disconnect() {
    let mut e = engine(0, 1);
    connect(&mut e, hello_b(None, 0, 0), 0, 10);
    assert!(is_disconnect(&msg(&mut e, PeerMsg::SnapshotChunk { records: vec![] }, 11), "outside a snapshot"));
    let mut e = engine(0, 1);
    connect(&mut e, hello_b(None, 0, 0), 0, 10);
    msg(&mut e, PeerMsg::SnapshotBegin { head: Seq(3), total: 0 }, 11);
    assert!(is_disconnect(&msg(&mut e, PeerMsg::Changes { records: changes(1..=1) }, 12), "inside a snapshot"));
    let mut e = engine(0, 1);
    connect(&mut e, hello_b(None, 0, 0), 0, 10);
    msg(&mut e, PeerMsg::SnapshotBegin { head: Seq(3), total: 0 }, 11);
    assert!(is_disconnect(&msg(&mut e, PeerMsg::SnapshotEnd { head: Seq(4) }, 12), "snapshot end"));
    let mut e = engine(0, 1);
    connect(&mut e, hello_b(None, 0, 0), 0, 10);
    assert!(is_disconnect(&msg(&mut e, PeerMsg::CaughtUp { head: Seq(2) }, 12), "sent only up to 0"));
}

#[test]
fn ack_releases_waiters_and_local_commits_stream_live() {
    let mut e = streaming(5);
    let cmds = e.step(Event::LocalCommitted { seq: Seq(6), change: Some(change(6)), now: 20 });
    assert_eq!(cmds, vec![send(PeerMsg::Changes { records: changes(6..=6) })]);
    assert_eq!(e.step(Event::AwaitAck { waiter: WaiterId(1), seq: Seq(6), now: 20 }), vec![]);
    assert_eq!(e.status().waiters, 1);
    assert_eq!(msg(&mut e, ack(6), 21), vec![release(&[1], AckOutcome::Acked)]);
    // Already acknowledged: released at once.
    assert_eq!(
        e.step(Event::AwaitAck { waiter: WaiterId(2), seq: Seq(6), now: 22 }),
        vec![release(&[2], AckOutcome::Acked)]
    );
    // Without the change at hand, the engine reads the log.
    let cmds = e.step(Event::LocalCommitted { seq: Seq(7), change: None, now: 23 });
    assert_eq!(cmds, vec![Command::ReadLog { after: Seq(6), limit: 2 }]);
}

#[test]
fn flow_control_bounds_unacknowledged_messages() {
    let mut e = streaming(0);
    for s in 1..=2 {
        let cmds = e.step(Event::LocalCommitted { seq: Seq(s), change: Some(change(s)), now: 20 });
        assert_eq!(cmds, vec![send(PeerMsg::Changes { records: changes(s..=s) })]);
    }
    // Window of 2 full: commits 3 and 4 wait.
    assert_eq!(e.step(Event::LocalCommitted { seq: Seq(3), change: Some(change(3)), now: 21 }), vec![]);
    assert_eq!(e.step(Event::LocalCommitted { seq: Seq(4), change: Some(change(4)), now: 21 }), vec![]);
    // One ack opens the window: read the backlog in one batch.
    assert_eq!(msg(&mut e, ack(1), 22), vec![Command::ReadLog { after: Seq(2), limit: 2 }]);
    // While the read is outstanding, a new commit is not sent out of order.
    assert_eq!(e.step(Event::LocalCommitted { seq: Seq(5), change: Some(change(5)), now: 23 }), vec![]);
    let cmds = e.step(Event::LogRead { after: Seq(2), result: LogRead::Changes(changes(3..=4)), now: 24 });
    assert_eq!(cmds, vec![send(PeerMsg::Changes { records: changes(3..=4) })]);
    let cmds = msg(&mut e, ack(4), 25);
    assert_eq!(cmds, vec![Command::ReadLog { after: Seq(4), limit: 2 }]);
}

#[test]
fn commits_stepped_together_share_one_message() {
    let mut e = streaming(0);
    let lc = |s: u64| Event::LocalCommitted { seq: Seq(s), change: Some(change(s)), now: 20 };
    // One group commit of three: messages of at most `batch_limit` (2) records.
    let cmds = e.step_batch([lc(1), lc(2), lc(3)]);
    assert_eq!(
        cmds,
        vec![send(PeerMsg::Changes { records: changes(1..=2) }), send(PeerMsg::Changes { records: changes(3..=3) })]
    );
    // Those two messages fill the window: the next group waits and is read from the log.
    assert_eq!(e.step_batch([lc(4), lc(5)]), vec![]);
    assert_eq!(msg(&mut e, ack(3), 21), vec![Command::ReadLog { after: Seq(3), limit: 2 }]);
}

#[test]
fn ack_timeout_degrades_until_the_peer_catches_up() {
    let mut e = streaming(5);
    e.step(Event::LocalCommitted { seq: Seq(6), change: Some(change(6)), now: 100 });
    e.step(Event::AwaitAck { waiter: WaiterId(1), seq: Seq(6), now: 100 });
    e.step(Event::LocalCommitted { seq: Seq(7), change: Some(change(7)), now: 500 });
    e.step(Event::AwaitAck { waiter: WaiterId(2), seq: Seq(7), now: 500 });
    msg(&mut e, PeerMsg::Heartbeat { head: Seq(0), now_ms: 1099 }, 1099);
    let cmds = e.step(Event::Tick { now: 1099 });
    assert!(!cmds.iter().any(|c| matches!(c, Command::ReleaseWaiters { .. })));
    let cmds = e.step(Event::Tick { now: 1100 });
    assert!(cmds.contains(&release(&[1], AckOutcome::TimedOut)), "{cmds:?}");
    let st = e.status();
    assert!(st.degraded);
    assert!(st.degraded_reason.unwrap().contains("did not acknowledge seq 6 within 1000 ms"));
    assert_eq!(st.waiters, 1);
    // The late ack of 6 releases the other waiter only when it covers it.
    msg(&mut e, PeerMsg::Heartbeat { head: Seq(0), now_ms: 1150 }, 1150);
    assert_eq!(msg(&mut e, ack(6), 1150), vec![]);
    assert!(e.status().degraded);
    assert_eq!(msg(&mut e, ack(7), 1160), vec![release(&[2], AckOutcome::Acked)]);
    assert!(!e.status().degraded);
}

#[test]
fn link_down_releases_waiters_at_once_as_degraded() {
    let mut e = streaming(5);
    e.step(Event::LocalCommitted { seq: Seq(6), change: Some(change(6)), now: 100 });
    e.step(Event::AwaitAck { waiter: WaiterId(1), seq: Seq(6), now: 100 });
    let cmds = e.step(Event::PeerDisconnected { reason: "connection reset".into(), now: 150 });
    assert_eq!(cmds, vec![release(&[1], AckOutcome::Degraded)]);
    assert!(e.status().degraded);
    e.step(Event::LocalCommitted { seq: Seq(7), change: Some(change(7)), now: 160 });
    assert_eq!(
        e.step(Event::AwaitAck { waiter: WaiterId(2), seq: Seq(7), now: 160 }),
        vec![release(&[2], AckOutcome::Degraded)]
    );
    // Reconnect: B had 5; it catches up to 7 and degraded clears.
    let cmds = connect(&mut e, hello_b(Some(A_DB), 5, 0), 0, 200);
    assert_eq!(cmds, vec![Command::ReadLog { after: Seq(5), limit: 2 }]);
    e.step(Event::LogRead { after: Seq(5), result: LogRead::Changes(changes(6..=7)), now: 201 });
    msg(&mut e, PeerMsg::CaughtUp { head: Seq(0) }, 202);
    assert!(e.status().degraded);
    msg(&mut e, ack(7), 203);
    let st = e.status();
    assert!(!st.degraded, "{st:?}");
    assert_eq!(st.link, LinkState::Streaming);
}

#[test]
fn async_mode_releases_at_once() {
    let mut cfg = config();
    cfg.sync = SyncLevel::Async;
    let mut e = engine_with(cfg, 0, 1);
    assert_eq!(
        e.step(Event::AwaitAck { waiter: WaiterId(9), seq: Seq(1), now: 1 }),
        vec![release(&[9], AckOutcome::NotReplicated)]
    );
    assert!(!e.status().degraded);
    assert_eq!(e.status().sync, "async");
}

#[test]
fn heartbeats_and_peer_timeout() {
    let mut e = streaming(0);
    // Last send at 10.
    assert_eq!(e.step(Event::Tick { now: 109 }), vec![]);
    assert_eq!(e.step(Event::Tick { now: 110 }), vec![send(PeerMsg::Heartbeat { head: Seq(0), now_ms: 110 })]);
    assert_eq!(e.step(Event::Tick { now: 150 }), vec![]);
    // The peer spoke last at 10; silence of 500 ms ends the link.
    msg(&mut e, PeerMsg::Heartbeat { head: Seq(3), now_ms: 400 }, 400);
    assert_eq!(e.status().peer_head, Seq(3));
    let cmds = e.step(Event::Tick { now: 899 });
    assert!(!is_disconnect(&cmds, ""));
    let cmds = e.step(Event::Tick { now: 900 });
    assert_eq!(cmds, vec![Command::Disconnect { reason: "peer silent for 500 ms".into() }]);
    assert_eq!(e.status().link, LinkState::Down);
    // Nothing more is sent on a dead link.
    assert_eq!(e.step(Event::Tick { now: 2000 }), vec![]);
}

#[test]
fn ready_after_the_startup_grace_without_a_peer() {
    let mut e = engine(0, 1);
    e.step(Event::PeerConnecting { now: 10 });
    assert_eq!(e.status().link, LinkState::Handshaking);
    e.step(Event::PeerDisconnected { reason: "connection refused".into(), now: 20 });
    e.step(Event::Tick { now: 4999 });
    assert!(!e.is_ready());
    assert_eq!(e.status().readiness, Readiness::WaitingForPeer);
    assert_eq!(e.status().grace_left_ms, Some(1));
    e.step(Event::Tick { now: 5000 });
    assert!(e.is_ready());
    assert_eq!(e.status().readiness, Readiness::AloneAfterGrace);
    assert_eq!(e.status().grace_left_ms, None);
    // It connects later: not ready until caught up.
    connect(&mut e, hello_b(Some(A_DB), 0, 0), 0, 6000);
    assert!(!e.is_ready());
    msg(&mut e, PeerMsg::CaughtUp { head: Seq(0) }, 6001);
    assert!(e.is_ready());
}

#[test]
fn grace_counts_again_from_a_disconnect_during_catch_up() {
    let mut e = engine(0, 1);
    connect(&mut e, hello_b(Some(A_DB), 0, 3), 0, 1000);
    e.step(Event::PeerDisconnected { reason: "reset".into(), now: 2000 });
    e.step(Event::Tick { now: 6999 });
    assert!(!e.is_ready());
    e.step(Event::Tick { now: 7000 });
    assert!(e.is_ready());
}

#[test]
fn not_ready_on_reconnect_until_caught_up_but_ready_while_apart() {
    let mut e = streaming(0);
    e.step(Event::PeerDisconnected { reason: "cable".into(), now: 100 });
    assert!(e.is_ready(), "a standby that lost its peer must stay able to take over");
    connect(&mut e, hello_b(Some(A_DB), 0, 4), 0, 200);
    assert!(!e.is_ready());
    assert_eq!(e.status().readiness, Readiness::CatchingUp);
    // Lost again mid-catch-up: back to the data it had.
    e.step(Event::PeerDisconnected { reason: "cable".into(), now: 250 });
    assert!(e.is_ready());
    assert_eq!(e.status().readiness, Readiness::PeerUnreachable);
    connect(&mut e, hello_b(Some(A_DB), 0, 4), 0, 300);
    msg(&mut e, PeerMsg::Changes { records: changes(1..=4) }, 301);
    msg(&mut e, PeerMsg::CaughtUp { head: Seq(4) }, 301);
    assert!(!e.is_ready());
    e.step(Event::Applied { up_to: Some(Seq(4)), now: 302 });
    assert!(e.is_ready());
    // Both directions of three connections, the last one complete.
    assert_eq!(e.status().resyncs, 5);
}

/// Active from 50, last heard from the peer at 100, demoted at 120: the VRRP manager's
/// answer to a pulled cable, while the link still counts as up.
fn demoted_after_a_pulled_cable() -> Engine {
    let mut e = streaming(0);
    e.step(Event::RoleChanged { role: Role::Active, now: 50 });
    msg(&mut e, PeerMsg::Heartbeat { head: Seq(0), now_ms: 100 }, 100);
    e.step(Event::RoleChanged { role: Role::Standby, now: 120 });
    e
}

/// The link comes back at `now` and the peer's two changes arrive: not ready until they are
/// applied, ready after.
fn reconnect_and_catch_up(e: &mut Engine, now: u64) {
    connect(e, hello_b(Some(A_DB), 0, 2), 0, now);
    assert!(!e.is_ready());
    msg(e, PeerMsg::Changes { records: changes(1..=2) }, now + 1);
    msg(e, PeerMsg::CaughtUp { head: Seq(2) }, now + 1);
    e.step(Event::Applied { up_to: Some(Seq(2)), now: now + 2 });
    assert!(e.is_ready());
}

#[test]
fn a_node_demoted_while_cut_off_is_not_ready_until_it_resyncs() {
    // A pulled cable on the active node: the VRRP manager demotes it at once, the link is
    // declared dead only after the peer timeout.
    let mut e = demoted_after_a_pulled_cable();
    assert!(e.is_ready(), "the link still counts as up");
    e.step(Event::Tick { now: 620 });
    assert!(e.status().link == LinkState::Down);
    assert!(!e.is_ready(), "the peer may have taken over: not ready with old data");
    assert_eq!(e.status().readiness, Readiness::Stale);
    assert!(!e.status().readiness.describe().contains("resynchronising"), "the link is down");
    // Not even after the start-up grace.
    e.step(Event::Tick { now: 10_000 });
    assert!(!e.is_ready());
    // Back: ready only once caught up.
    reconnect_and_catch_up(&mut e, 11_000);
    // And a later loss of the peer leaves it ready (it is a caught-up standby).
    e.step(Event::PeerDisconnected { reason: "cable".into(), now: 12_000 });
    assert!(e.is_ready());
}

#[test]
fn a_cable_plugged_back_within_the_peer_timeout_finds_the_demoted_node_stale() {
    // Demoted at 120 (cable pulled), nothing heard since: two heartbeat intervals (100 ms)
    // later the node is stale and drops the link, long before the peer timeout (500 ms).
    let mut e = demoted_after_a_pulled_cable();
    assert!(!is_disconnect(&e.step(Event::Tick { now: 300 }), ""), "one interval and a bit: not yet");
    assert!(e.is_ready());
    let cmds = e.step(Event::Tick { now: 320 });
    assert!(is_disconnect(&cmds, "since this node lost the active role"), "{cmds:?}");
    assert_eq!(e.status().readiness, Readiness::Stale);
    // The cable is back and the HA manager makes it active again: still not ready, so the
    // health check keeps the address with the peer until the resync is done.
    e.step(Event::RoleChanged { role: Role::Active, now: 400 });
    assert!(!e.is_ready());
    reconnect_and_catch_up(&mut e, 450);
    // A demotion the peer is heard after (a planned switch-over) leaves the link alone.
    let mut e = streaming(0);
    e.step(Event::RoleChanged { role: Role::Active, now: 50 });
    e.step(Event::RoleChanged { role: Role::Standby, now: 120 });
    msg(&mut e, PeerMsg::Heartbeat { head: Seq(0), now_ms: 200 }, 200);
    assert!(!is_disconnect(&e.step(Event::Tick { now: 400 }), ""));
    assert!(e.is_ready());
}

#[test]
fn demoted_with_the_link_down_is_stale_but_a_demotion_the_peer_outlived_is_not() {
    let mut e = streaming(0);
    e.step(Event::RoleChanged { role: Role::Active, now: 10 });
    e.step(Event::PeerDisconnected { reason: "cable".into(), now: 20 });
    assert!(e.is_ready(), "the active node keeps serving alone");
    e.step(Event::RoleChanged { role: Role::Standby, now: 30 });
    assert!(!e.is_ready());

    // Demoted while the peer is alive (a normal failback), the peer dies later: a standby
    // with every change of the peer; it must be able to take over.
    let mut e = streaming(0);
    e.step(Event::RoleChanged { role: Role::Active, now: 10 });
    e.step(Event::RoleChanged { role: Role::Standby, now: 20 });
    msg(&mut e, PeerMsg::Heartbeat { head: Seq(0), now_ms: 30 }, 30);
    e.step(Event::PeerDisconnected { reason: "peer died".into(), now: 40 });
    assert!(e.is_ready());
}

#[test]
fn becoming_active_reconciles_agents() {
    let mut e = engine(0, 1);
    assert_eq!(e.step(Event::RoleChanged { role: Role::Active, now: 1 }), vec![Command::ReconcileAgents]);
    assert_eq!(e.step(Event::RoleChanged { role: Role::Active, now: 2 }), vec![]);
    assert_eq!(e.step(Event::RoleChanged { role: Role::Standby, now: 3 }), vec![]);
    assert_eq!(e.status().role, Role::Standby);
    assert_eq!(e.step(Event::RoleChanged { role: Role::Active, now: 4 }), vec![Command::ReconcileAgents]);
    let mut cfg = config();
    cfg.role = Role::Active;
    let mut e = Engine::new(cfg, DbStatus { db_id: A_DB.into(), head: Seq(0), oldest: Seq(1) }, 0);
    assert_eq!(e.step(Event::Start { now: 0 }), vec![Command::ReconcileAgents]);
}

#[test]
fn lag_counts_unacknowledged_changes_and_their_age() {
    let mut e = streaming(5);
    e.step(Event::LocalCommitted { seq: Seq(6), change: None, now: 100 });
    e.step(Event::LocalCommitted { seq: Seq(7), change: None, now: 150 });
    e.step(Event::LocalCommitted { seq: Seq(8), change: None, now: 150 });
    e.step(Event::Tick { now: 400 });
    let st = e.status();
    assert_eq!((st.lag_changes, st.lag_ms), (3, 300));
    msg(&mut e, ack(6), 400);
    let st = e.status();
    assert_eq!((st.lag_changes, st.lag_ms), (2, 250));
    msg(&mut e, ack(8), 400);
    let st = e.status();
    assert_eq!((st.lag_changes, st.lag_ms), (0, 0));
}

#[test]
fn hello_describes_this_node() {
    let mut e = engine(5, 2);
    e.step(Event::LocalCommitted { seq: Seq(6), change: None, now: 1 });
    let h = e.hello(Some(B_DB.into()), Seq(4), 7);
    assert_eq!(
        h,
        Hello {
            protocol: PROTOCOL_VERSION,
            node: NodeId("a".into()),
            db_id: A_DB.into(),
            head: Seq(6),
            oldest: Seq(2),
            your_db_id: Some(B_DB.into()),
            your_position: Seq(4),
            config_digest: "digest".into(),
            now_ms: 7,
            empty: false,
        }
    );
}

#[test]
fn status_serializes() {
    let e = streaming(3);
    let v = serde_json::to_value(e.status()).unwrap();
    assert_eq!(v["link"], "streaming");
    assert_eq!(v["role"], "standby");
    assert_eq!(v["local_head"], 3);
    assert_eq!(v["last_resync_received"]["direction"], "received");
}

#[test]
fn peer_database_older_than_what_we_applied_gets_a_snapshot() {
    // B restored an old backup: its log ends at 3, but we applied 5 of it.
    let mut e = engine(5, 1);
    let cmds = connect(&mut e, hello_b(Some(A_DB), 2, 3), 5, 10);
    assert_eq!(cmds, vec![Command::ReadSnapshot { as_file: false }]);
}

/// A wall clock far from zero, so offsets either way stay positive readings.
const W: u64 = 10_000_000;

#[test]
fn the_clock_offset_is_tracked_from_every_heartbeat_and_the_alarm_follows_it() {
    let mut e = streaming(0);
    // B's hello said 0 at 10.
    assert_eq!(e.status().clock_offset_ms, Some(-10));
    assert_eq!(e.status().max_clock_offset_ms, 2000);
    e.step(Event::WallClock { now: 20, wall_ms: W + 20 });
    // The peer's clock is an hour ahead, seen while the link streams: the next heartbeat shows it.
    msg(&mut e, PeerMsg::Heartbeat { head: Seq(0), now_ms: W + 100 + 3_600_000 }, 100);
    let st = e.status();
    assert_eq!((st.clock_offset_ms, st.clock_offset_at_ms), (Some(3_600_000), Some(100)));
    assert!(st.clock_offset_exceeded);
    // Within the bound again (behind, this time): the alarm clears.
    msg(&mut e, PeerMsg::Heartbeat { head: Seq(0), now_ms: W + 200 - 1_500 }, 200);
    let st = e.status();
    assert_eq!(st.clock_offset_ms, Some(-1_500));
    assert!(!st.clock_offset_exceeded);
    // Kept while the link is down: tombstone ages need it.
    e.step(Event::PeerDisconnected { reason: "test".into(), now: 300 });
    assert_eq!(e.status().clock_offset_ms, Some(-1_500));
}

#[test]
fn heartbeats_carry_the_wall_clock_and_timers_run_on_the_monotonic_one() {
    let mut e = streaming(0);
    // This machine's wall clock is set back an hour.
    e.step(Event::WallClock { now: 50, wall_ms: W + 50 - 3_600_000 });
    let cmds = e.step(Event::Tick { now: 110 });
    assert_eq!(cmds, vec![send(PeerMsg::Heartbeat { head: Seq(0), now_ms: W + 110 - 3_600_000 })]);
    // The offset to a peer whose clock was right is now an hour.
    msg(&mut e, PeerMsg::Heartbeat { head: Seq(0), now_ms: W + 120 }, 120);
    assert_eq!(e.status().clock_offset_ms, Some(3_600_000));
    // Timers do not stall: the peer stays silent, the link ends on time.
    let cmds = e.step(Event::Tick { now: 620 });
    assert_eq!(cmds, vec![Command::Disconnect { reason: "peer silent for 500 ms".into() }]);
}

#[test]
fn heartbeats_go_out_while_changes_stream() {
    let mut e = streaming(0);
    // A change every 50 ms: the heartbeat still goes out every interval.
    let mut beats = 0;
    for k in 1..=8u64 {
        let now = 10 + 50 * k;
        e.step(Event::LocalCommitted { seq: Seq(k), change: None, now });
        let cmds = e.step(Event::Tick { now });
        beats += cmds.iter().filter(|c| matches!(c, Command::Send(PeerMsg::Heartbeat { .. }))).count();
    }
    assert_eq!(beats, 4);
}

#[test]
fn the_shared_clock_is_the_earlier_of_the_two() {
    assert_eq!(shared_clock_ms(1_000, None), None, "never measured: keep every tombstone");
    assert_eq!(shared_clock_ms(1_000, Some(300)), Some(1_000), "the peer is ahead: ours");
    assert_eq!(shared_clock_ms(1_000, Some(-300)), Some(700), "the peer is behind: theirs");
    assert_eq!(shared_clock_ms(100, Some(-300)), Some(0));
}

#[test]
fn made_active_with_the_link_up_stops_waiting_for_the_peer_until_it_is_heard_from() {
    let mut e = streaming(5);
    e.step(Event::LocalCommitted { seq: Seq(6), change: Some(change(6)), now: 100 });
    assert_eq!(e.step(Event::AwaitAck { waiter: WaiterId(1), seq: Seq(6), now: 100 }), vec![]);
    // The peer's cable is pulled; the manager makes this node active before peer_timeout.
    let cmds = e.step(Event::RoleChanged { role: Role::Active, now: 150 });
    assert_eq!(cmds, vec![Command::ReconcileAgents, release(&[1], AckOutcome::Degraded)]);
    let st = e.status();
    assert!(st.degraded);
    assert!(st.degraded_reason.unwrap().contains("made active by the HA manager"));
    assert_eq!(st.link, LinkState::Streaming, "the link itself is left alone");
    // New writes are answered at once, without waiting for sync_timeout.
    e.step(Event::LocalCommitted { seq: Seq(7), change: Some(change(7)), now: 160 });
    assert_eq!(
        e.step(Event::AwaitAck { waiter: WaiterId(2), seq: Seq(7), now: 160 }),
        vec![release(&[2], AckOutcome::Degraded)]
    );
    // The peer turns out to be alive: from its next message on, writes wait for it again.
    msg(&mut e, PeerMsg::Heartbeat { head: Seq(0), now_ms: 170 }, 170);
    assert_eq!(msg(&mut e, ack(7), 175), vec![]);
    let cmds = e.step(Event::LocalCommitted { seq: Seq(8), change: Some(change(8)), now: 180 });
    assert_eq!(cmds, vec![send(PeerMsg::Changes { records: changes(8..=8) })]);
    assert_eq!(e.step(Event::AwaitAck { waiter: WaiterId(3), seq: Seq(8), now: 180 }), vec![]);
    assert_eq!(msg(&mut e, ack(8), 190), vec![release(&[3], AckOutcome::Acked)]);
    assert!(!e.status().degraded, "the peer has everything answered without it");
}

#[test]
fn made_active_with_the_link_down_changes_nothing_and_a_new_link_waits_again() {
    let mut e = streaming(5);
    e.step(Event::PeerDisconnected { reason: "peer silent".into(), now: 100 });
    assert_eq!(e.step(Event::RoleChanged { role: Role::Active, now: 110 }), vec![Command::ReconcileAgents]);
    // Already active: a repeated notification does not presume anything.
    connect(&mut e, hello_b(Some(A_DB), 5, 0), 0, 200);
    msg(&mut e, PeerMsg::CaughtUp { head: Seq(0) }, 201);
    assert_eq!(e.step(Event::RoleChanged { role: Role::Active, now: 210 }), vec![]);
    e.step(Event::LocalCommitted { seq: Seq(6), change: Some(change(6)), now: 220 });
    assert_eq!(e.step(Event::AwaitAck { waiter: WaiterId(1), seq: Seq(6), now: 220 }), vec![]);
}
