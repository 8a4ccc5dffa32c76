//! Tests of the session database through its public handle, on temporary files.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::*;
use crate::model::{now_ms, Hlc, NodeId, Record, Seq, Session, SessionId, SessionStatus, Version};

fn opts(path: &Path, node: &str) -> DbOptions {
    DbOptions {
        path: path.to_path_buf(),
        node: NodeId(node.into()),
        synchronous: DbSynchronous::Full,
        changelog_retention: 10_000,
        tombstone_retention: Duration::from_secs(3600),
        max_clock_offset: Duration::from_secs(60),
    }
}

/// A raw connection, opened as the crate's own are: after the page cache wrapper is
/// installed, so that it is in use in this process whichever test opens SQLite first.
fn raw_open(path: impl AsRef<Path>) -> rusqlite::Result<rusqlite::Connection> {
    super::pcache::install();
    rusqlite::Connection::open(path)
}

fn raw_open_with_flags(path: impl AsRef<Path>, flags: rusqlite::OpenFlags) -> rusqlite::Result<rusqlite::Connection> {
    super::pcache::install();
    rusqlite::Connection::open_with_flags(path, flags)
}

fn db_path(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("sessions.db")
}

fn open(dir: &tempfile::TempDir, node: &str) -> DbHandle {
    DbHandle::open(opts(&db_path(dir), node)).expect("open")
}

/// A database of node "a" that keeps `retention` change-log entries.
fn open_keeping_changes(dir: &tempfile::TempDir, retention: u64) -> DbHandle {
    let mut o = opts(&db_path(dir), "a");
    o.changelog_retention = retention;
    DbHandle::open(o).expect("open")
}

fn session(id: &str, user: &str, agent: &str, display: u32) -> Session {
    Session {
        id: SessionId(id.into()),
        user: user.into(),
        subcluster: "default".into(),
        agent: agent.into(),
        agent_address: format!("{agent}.example.org"),
        display,
        vnc_port: 5900 + display as u16,
        status: SessionStatus::Running,
        created_ms: 1_000 + display as u64,
        last_connect_ms: 2_000,
        last_client_address: "192.0.2.7".into(),
        pid: 4242,
        command: vec!["Xvnc".into(), format!(":{display}")],
        geometry: "1920x1080".into(),
        client_params: vec![("lang".into(), "sv_SE".into())],
    }
}

fn version(wall_ms: u64, node: &str) -> Version {
    Version { hlc: Hlc { wall_ms, logical: 0 }, node: NodeId(node.into()) }
}

fn id(s: &str) -> SessionId {
    SessionId(s.into())
}

#[tokio::test]
async fn fresh_file_is_migrated_and_keeps_its_identity() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(&dir, "a");
    let st = db.status().await.unwrap();
    assert_eq!(st.head, Seq::ZERO);
    assert_eq!(st.oldest, Seq(1));
    assert_eq!((st.sessions, st.tombstones), (0, 0));
    assert_eq!(st.db_id.len(), 32);
    assert!(st.db_id.chars().all(|c| c.is_ascii_hexdigit()));
    assert_eq!(db.db_id(), st.db_id);
    db.close().await.unwrap();

    let conn = raw_open(db_path(&dir)).unwrap();
    let v: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
    assert_eq!(v, schema::KNOWN_VERSION);
    let mode: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
    assert_eq!(mode, "wal");
    drop(conn);

    let db = open(&dir, "a");
    assert_eq!(db.db_id(), st.db_id, "the identity is made once, with the file");
    db.close().await.unwrap();
}

#[tokio::test]
async fn reopen_keeps_every_session_and_the_log_position() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(&dir, "a");
    let mut last = None;
    for i in 0..50 {
        last = Some(db.write(Write::Upsert(session(&format!("s{i:02}"), "u", "ag", i))).await.unwrap());
    }
    for i in 0..5 {
        db.write(Write::Delete(id(&format!("s{i:02}")))).await.unwrap();
    }
    let before = db.export_records().await.unwrap();
    let digest = db.digest().await.unwrap();
    db.close().await.unwrap();

    let db = open(&dir, "a");
    assert_eq!(db.export_records().await.unwrap(), before);
    assert_eq!(db.digest().await.unwrap(), digest);
    let st = db.status().await.unwrap();
    assert_eq!((st.head, st.sessions, st.tombstones), (Seq(55), 45, 5));
    let c = db.write(Write::Upsert(session("s49", "u", "ag", 49))).await.unwrap();
    assert_eq!(c.seq, Seq(56), "seq continues after a restart");
    assert!(c.version > last.unwrap().version, "the clock survives a restart");
    db.close().await.unwrap();
}

#[test]
fn newer_schema_is_refused_and_the_file_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    {
        let conn = raw_open(&path).unwrap();
        conn.execute_batch("PRAGMA journal_mode = WAL; CREATE TABLE future (x); PRAGMA user_version = 99;").unwrap();
    }
    let bytes = std::fs::read(&path).unwrap();
    let err = DbHandle::open(opts(&path, "a")).unwrap_err();
    match &err {
        DbError::NewerSchema { found: 99, known, .. } => assert_eq!(*known, schema::KNOWN_VERSION),
        other => panic!("expected NewerSchema, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(msg.contains("schema version 99") && msg.contains("refusing to touch it"), "{msg}");
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
}

#[test]
fn garbage_and_foreign_files_are_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let garbage: Vec<u8> = (0..8192u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    std::fs::write(&path, &garbage).unwrap();
    let err = DbHandle::open(opts(&path, "a")).unwrap_err();
    assert!(matches!(err, DbError::Corrupt { .. }), "{err:?}");
    assert!(err.to_string().contains("not an sqlite database"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), garbage);

    let other = dir.path().join("other.db");
    {
        let conn = raw_open(&other).unwrap();
        conn.execute_batch("CREATE TABLE accounts (name TEXT);").unwrap();
    }
    let bytes = std::fs::read(&other).unwrap();
    let err = DbHandle::open(opts(&other, "a")).unwrap_err();
    assert!(matches!(err, DbError::Corrupt { .. }), "{err:?}");
    assert_eq!(std::fs::read(&other).unwrap(), bytes);

    let err = DbHandle::open(opts(dir.path(), "a")).unwrap_err();
    assert!(matches!(err, DbError::Corrupt { .. }), "a directory is refused: {err:?}");
}

#[tokio::test]
async fn a_second_opener_of_the_same_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(&dir, "a");
    db.write(Write::Upsert(session("x", "u", "ag", 1))).await.unwrap();
    let err = DbHandle::open(opts(&db_path(&dir), "a")).unwrap_err();
    assert!(matches!(err, DbError::Locked { .. }), "{err:?}");
    // The first owner is unaffected.
    db.write(Write::Upsert(session("y", "u", "ag", 2))).await.unwrap();
    db.close().await.unwrap();
}

#[tokio::test]
async fn a_write_and_its_change_row_commit_together() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(&dir, "a");
    let s = session("x", "alice", "ag1", 10);
    let c1 = db.write(Write::Upsert(s.clone())).await.unwrap();
    assert_eq!(c1.seq, Seq(1));
    assert!(!c1.was_live);
    assert_eq!(c1.record.session.as_ref(), Some(&s));
    assert_eq!(c1.version.node, NodeId("a".into()));
    let c2 = db.write(Write::Delete(s.id.clone())).await.unwrap();
    assert_eq!(c2.seq, Seq(2));
    assert!(c2.was_live);
    assert!(c2.record.is_tombstone());
    assert!(c2.version > c1.version);
    let c3 = db.write(Write::Delete(id("never-seen"))).await.unwrap();
    assert!(!c3.was_live && c3.record.is_tombstone());

    match db.changes_since(Seq::ZERO, 100).await.unwrap() {
        LogRead::Changes(ch) => assert_eq!(ch, vec![c1.change(), c2.change(), c3.change()]),
        other => panic!("{other:?}"),
    }
    assert_eq!(db.record(&s.id).await.unwrap(), Some(c2.record.clone()));
    assert_eq!(db.get(&s.id).await.unwrap(), None);
    let st = db.status().await.unwrap();
    assert_eq!((st.head, st.oldest, st.sessions, st.tombstones), (Seq(3), Seq(1), 0, 2));
    assert_eq!(*db.watch_head().borrow(), Seq(3));

    let batch = db
        .write_batch(vec![Write::Upsert(session("p", "u", "a", 1)), Write::Upsert(session("q", "u", "a", 2))])
        .await
        .unwrap();
    assert_eq!(batch.iter().map(|c| c.seq).collect::<Vec<_>>(), vec![Seq(4), Seq(5)]);
    db.close().await.unwrap();
}

#[tokio::test]
async fn a_delete_beats_older_upserts_and_is_written_again_over_concurrent_newer_ones() {
    let dir_a = tempfile::tempdir().unwrap();
    let dir_b = tempfile::tempdir().unwrap();
    let a = open(&dir_a, "a");
    let b = open(&dir_b, "b");
    let created = a.write(Write::Upsert(session("x", "u", "ag", 1))).await.unwrap();
    let deleted = a.write(Write::Delete(id("x"))).await.unwrap();

    // Delivered out of order: the tombstone first, then the older create.
    b.apply_remote(a.db_id().into(), vec![deleted.record.clone()], Seq(2)).await.unwrap();
    let out = b.apply_remote(a.db_id().into(), vec![created.record.clone()], Seq(2)).await.unwrap();
    assert_eq!((out.applied, out.skipped), (0, 1));
    assert!(out.deletes_kept.is_empty(), "the create is older: nothing to write again");
    assert_eq!(b.record(&id("x")).await.unwrap(), Some(deleted.record.clone()));
    assert_eq!(b.get(&id("x")).await.unwrap(), None);
    assert_eq!(b.status().await.unwrap().head, Seq::ZERO, "remote records never enter the local change log");

    // A concurrent change with a newer version (a reconnect on a master whose clock ran two
    // minutes ahead, while the two were apart; based on the create, not on the delete): the
    // delete is written again above it, as a local change that streams back.
    let mut newer = created.record.clone();
    newer.version =
        Version { hlc: Hlc { wall_ms: deleted.version.hlc.wall_ms + 120_000, logical: 0 }, node: NodeId("c".into()) };
    newer.base = Some(created.version.clone());
    let out = b.apply_remote("peer-c".into(), vec![newer.clone()], Seq(1)).await.unwrap();
    assert_eq!(out.deletes_kept.len(), 1, "{out:?}");
    let kept = b.record(&id("x")).await.unwrap().unwrap();
    assert!(kept.session.is_none() && kept.version > newer.version, "{kept:?}");
    assert_eq!(out.deletes_kept[0], kept);
    assert_eq!(b.status().await.unwrap().head, Seq(1));
    let LogRead::Changes(ch) = b.changes_since(Seq::ZERO, 10).await.unwrap() else { panic!("truncated") };
    assert_eq!(ch.iter().map(|c| &c.record).collect::<Vec<_>>(), vec![&kept]);
    // Applying the same change again does nothing more.
    let out = b.apply_remote("peer-c".into(), vec![newer.clone()], Seq(1)).await.unwrap();
    assert_eq!((out.applied, out.deletes_kept.len()), (0, 0));

    // The other way round: the node holding the newer change takes the old delete, and
    // writes it again too.
    let dir_c = tempfile::tempdir().unwrap();
    let c = open(&dir_c, "c");
    c.apply_remote(a.db_id().into(), vec![created.record.clone()], Seq(1)).await.unwrap();
    c.apply_remote("peer-c".into(), vec![newer.clone()], Seq(1)).await.unwrap();
    let out = c.apply_remote(a.db_id().into(), vec![deleted.record.clone()], Seq(2)).await.unwrap();
    assert_eq!(out.deletes_kept.len(), 1, "{out:?}");
    assert_eq!(c.get(&id("x")).await.unwrap(), None);
    // A later delete that was based on the change is an ordinary update: nothing written again.
    let out = b.apply_remote("peer-c".into(), vec![created.record.clone()], Seq(1)).await.unwrap();
    assert!(out.deletes_kept.is_empty());

    // Locally, an ended session is never brought back: nothing is written.
    let err = b.write(Write::Upsert(session("x", "u", "ag", 1))).await.unwrap_err();
    assert!(matches!(err, DbError::Ended(ref e) if e == &id("x")), "{err:?}");
    assert_eq!(b.status().await.unwrap().head, Seq(1));
    a.close().await.unwrap();
    b.close().await.unwrap();
    c.close().await.unwrap();
}

#[tokio::test]
async fn applying_the_same_records_twice_equals_once() {
    let dir_a = tempfile::tempdir().unwrap();
    let dir_b = tempfile::tempdir().unwrap();
    let a = open(&dir_a, "a");
    let b = open(&dir_b, "b");
    for i in 0..20 {
        a.write(Write::Upsert(session(&format!("s{i}"), "u", "ag", i))).await.unwrap();
    }
    a.write(Write::Delete(id("s3"))).await.unwrap();
    let snap = a.snapshot().await.unwrap();
    let first = b.apply_remote(snap.db_id.clone(), snap.records.clone(), snap.head).await.unwrap();
    assert_eq!((first.applied, first.skipped), (20, 0));
    let digest = b.digest().await.unwrap();
    let again = b.apply_remote(snap.db_id.clone(), snap.records.clone(), snap.head).await.unwrap();
    assert_eq!((again.applied, again.skipped), (0, 20));
    assert!(again.conflicts.is_empty());
    assert_eq!(b.digest().await.unwrap(), digest);
    assert_eq!(digest, a.digest().await.unwrap());

    // Positions only move forward.
    assert_eq!(b.peer_position(a.db_id()).await.unwrap(), Some(Seq(21)));
    b.apply_remote(a.db_id().into(), vec![], Seq(5)).await.unwrap();
    assert_eq!(b.peer_position(a.db_id()).await.unwrap(), Some(Seq(21)));
    assert_eq!(b.peer_position("unknown").await.unwrap(), None);
    a.close().await.unwrap();
    b.close().await.unwrap();
}

/// A live session from node "b" whose clock is half a minute ahead of ours (within the
/// tests' bound of one minute).
fn half_a_minute_ahead(sid: &str) -> Record {
    Record {
        id: id(sid),
        version: version(now_ms() + 30_000, "b"),
        base: None,
        session: Some(session(sid, "u", "ag", 2)),
    }
}

#[tokio::test]
async fn remote_clocks_ahead_of_ours_within_the_bound_push_local_versions_past_them() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(&dir, "a");
    let ahead = half_a_minute_ahead("x");
    db.apply_remote("peer".into(), vec![ahead.clone()], Seq(1)).await.unwrap();
    let c = db.write(Write::Upsert(session("y", "u", "ag", 1))).await.unwrap();
    assert!(c.version.hlc > ahead.version.hlc);
    let c = db.write(Write::Upsert(session("x", "u", "ag", 1))).await.unwrap();
    assert!(c.version > ahead.version, "a local write always wins locally");
    assert_eq!(db.get(&id("x")).await.unwrap(), c.record.session);
    db.close().await.unwrap();
}

/// `meta` as a second connection reads it: (hlc_wall, head_seq).
fn meta_row(dir: &tempfile::TempDir) -> (i64, i64) {
    let conn = raw_open(db_path(dir)).unwrap();
    conn.query_row("SELECT hlc_wall, head_seq FROM meta WHERE id = 1", [], |r| Ok((r.get(0)?, r.get(1)?))).unwrap()
}

#[tokio::test]
async fn commits_leave_meta_alone_and_a_reopen_finds_clock_and_head_in_the_rows() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(&dir, "a");
    // Only the stored row remembers the peer's clock.
    let ahead = half_a_minute_ahead("x");
    db.apply_remote("peer".into(), vec![ahead.clone()], Seq(1)).await.unwrap();
    for i in 0..3 {
        db.write(Write::Upsert(session(&format!("s{i}"), "u", "ag", i))).await.unwrap();
    }
    db.close().await.unwrap();
    assert_eq!(meta_row(&dir), (0, 0), "no commit rewrites meta");

    let db = open(&dir, "a");
    let st = db.status().await.unwrap();
    assert_eq!(st.head, Seq(3));
    assert!(st.hlc > ahead.version.hlc, "the clock is recovered from the rows: {}", st.hlc);
    let c = db.write(Write::Upsert(session("y", "u", "ag", 9))).await.unwrap();
    assert_eq!(c.seq, Seq(4));
    assert!(c.version.hlc > ahead.version.hlc);
    db.close().await.unwrap();
}

#[tokio::test]
async fn a_gc_that_forgets_the_newest_version_keeps_the_clock_in_meta() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(&dir, "a");
    let t = now_ms() + 30_000;
    let tomb = Record { id: id("x"), version: version(t, "b"), base: None, session: None };
    db.apply_remote("peer".into(), vec![tomb.clone()], Seq(1)).await.unwrap();
    // The tombstone is past its retention for this clock reading: forgotten.
    assert_eq!(db.gc(Some(now_ms() + 2 * 3_600_000)).await.unwrap().tombstones, 1);
    db.close().await.unwrap();
    assert!(meta_row(&dir).0 >= t as i64, "gc wrote the clock to meta: {:?}", meta_row(&dir));

    let db = open(&dir, "a");
    let c = db.write(Write::Upsert(session("y", "u", "ag", 1))).await.unwrap();
    assert!(c.version.hlc > tomb.version.hlc, "{} must follow {}", c.version, tomb.version);
    db.close().await.unwrap();
}

#[tokio::test]
async fn a_record_from_a_clock_beyond_the_bound_is_stored_as_sent_but_not_followed() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(&dir, "a");
    let future = now_ms() + 10 * 86_400_000;
    let ahead =
        Record { id: id("x"), version: version(future, "b"), base: None, session: Some(session("x", "u", "ag", 2)) };
    db.apply_remote("peer".into(), vec![ahead.clone()], Seq(1)).await.unwrap();
    assert_eq!(db.record(&id("x")).await.unwrap(), Some(ahead.clone()), "stored exactly as sent");
    // Other sessions are stamped by this machine's clock, at most the bound ahead of it.
    let c = db.write(Write::Upsert(session("y", "u", "ag", 1))).await.unwrap();
    assert!(c.version.hlc.wall_ms <= now_ms() + 60_000, "{}", c.version);
    // The session the future record names is still updated in order: a write follows what
    // it replaces.
    let c = db.write(Write::Upsert(session("x", "u", "ag", 1))).await.unwrap();
    assert!(c.version > ahead.version);
    // The clock survives a restart within the bound.
    db.close().await.unwrap();
    let db = open(&dir, "a");
    let c = db.write(Write::Upsert(session("z", "u", "ag", 1))).await.unwrap();
    assert!(c.version.hlc.wall_ms <= now_ms() + 60_000, "{}", c.version);
    db.close().await.unwrap();
}

#[tokio::test]
async fn gc_without_a_shared_clock_keeps_every_tombstone() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(&dir, "a");
    db.write(Write::Delete(id("x"))).await.unwrap();
    assert_eq!(db.gc(None).await.unwrap().tombstones, 0);
    assert_eq!(db.status().await.unwrap().tombstones, 1);
    assert_eq!(db.gc(Some(now_ms() + 7_200_000)).await.unwrap().tombstones, 1);
    db.close().await.unwrap();
}

#[tokio::test]
async fn conflicts_are_reported_with_both_sides_and_the_winner() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(&dir, "b");
    let local = db.write(Write::Upsert(session("x", "u", "ag1", 1))).await.unwrap().record;

    let older =
        Record { id: id("x"), version: version(1, "a"), base: None, session: Some(session("x", "u", "ag2", 2)) };
    let out = db.apply_remote("pa".into(), vec![older.clone()], Seq(1)).await.unwrap();
    assert_eq!(out.conflicts, vec![Conflict { local: local.clone(), remote: older, winner: Winner::Local }]);

    let newer = Record {
        id: id("x"),
        version: version(local.version.hlc.wall_ms + 10, "a"),
        base: None,
        session: Some(session("x", "u", "ag3", 3)),
    };
    let out = db.apply_remote("pa".into(), vec![newer.clone()], Seq(2)).await.unwrap();
    assert_eq!(out.applied, 1);
    assert_eq!(out.conflicts, vec![Conflict { local, remote: newer.clone(), winner: Winner::Remote }]);

    // A later version from the same node is an ordinary update.
    let update = Record { version: version(newer.version.hlc.wall_ms + 1, "a"), session: None, ..newer };
    let out = db.apply_remote("pa".into(), vec![update], Seq(3)).await.unwrap();
    assert_eq!((out.applied, out.conflicts.len()), (1, 0));
    db.close().await.unwrap();
}

#[tokio::test]
async fn an_update_of_the_peers_version_is_not_a_conflict() {
    // Created on one master, reconnected on the other while the link streams: a sequence.
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = (open(&dir_a, "a"), open(&dir_b, "b"));
    let created = a.write(Write::Upsert(session("x", "u", "ag", 1))).await.unwrap().record;
    assert_eq!(created.base, None);
    assert!(b.apply_remote(a.db_id().into(), vec![created.clone()], Seq(1)).await.unwrap().conflicts.is_empty());
    let mut s = session("x", "u", "ag", 1);
    s.last_client_address = "198.51.100.7".into();
    let reconnected = b.write(Write::Upsert(s)).await.unwrap().record;
    assert_eq!(reconnected.base, Some(created.version.clone()), "a write names the version it replaced");
    let out = a.apply_remote(b.db_id().into(), vec![reconnected.clone()], Seq(1)).await.unwrap();
    assert_eq!((out.applied, out.conflicts.len()), (1, 0), "{:?}", out.conflicts);
    // The base survives storage, snapshots and the change log.
    assert_eq!(a.record(&id("x")).await.unwrap(), Some(reconnected.clone()));
    assert!(a.snapshot().await.unwrap().records.contains(&reconnected));

    // Both change it apart: concurrent, reported with both versions.
    let mine = a.write(Write::Delete(id("x"))).await.unwrap().record;
    let mut s = session("x", "u", "ag", 1);
    s.status = SessionStatus::Disconnected;
    let theirs = b.write(Write::Upsert(s)).await.unwrap().record;
    let out = a.apply_remote(b.db_id().into(), vec![theirs.clone()], Seq(2)).await.unwrap();
    assert_eq!(out.conflicts.len(), 1);
    assert_eq!((&out.conflicts[0].local, &out.conflicts[0].remote), (&mine, &theirs));
    a.close().await.unwrap();
    b.close().await.unwrap();
}

#[tokio::test]
async fn an_invalid_record_fails_its_request_only() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(&dir, "a");
    let good = Record { id: id("g"), version: version(5, "b"), base: None, session: Some(session("g", "u", "ag", 1)) };
    let bad =
        Record { id: id("x"), version: version(6, "b"), base: None, session: Some(session("not-x", "u", "ag", 1)) };
    let mut tasks = Vec::new();
    for i in 0..32 {
        let db = db.clone();
        tasks.push(tokio::spawn(async move { db.write(Write::Upsert(session(&format!("w{i}"), "u", "ag", i))).await }));
    }
    let err = db.apply_remote("pb".into(), vec![good, bad], Seq(9)).await.unwrap_err();
    assert!(matches!(err, DbError::InvalidRecord { .. }), "{err:?}");
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(db.get(&id("g")).await.unwrap(), None, "the whole request was rolled back");
    assert_eq!(db.peer_position("pb").await.unwrap(), None);
    let st = db.status().await.unwrap();
    assert_eq!((st.head, st.sessions), (Seq(32), 32));
    db.close().await.unwrap();
}

#[tokio::test]
async fn after_a_failed_queued_apply_the_rest_of_its_chain_stores_nothing() {
    use crate::db::{ApplyChain, PositionUpdate};
    let dir = tempfile::tempdir().unwrap();
    let db = open(&dir, "a");
    let rec = |sid: &str, wall: u64| Record {
        id: id(sid),
        version: version(wall, "b"),
        base: None,
        session: Some(session(sid, "u", "ag", wall as u32)),
    };
    let bad = Record { session: Some(session("not-x", "u", "ag", 1)), ..rec("x", 2) };
    let chain = ApplyChain(7);
    // Queued back to back, as the replication engine does: the first is stored, the second
    // fails, and the third (valid, with a later position) must not store its records or
    // its position past the lost ones.
    let first = db.queue_apply(chain, "pb".into(), vec![rec("a", 1)], PositionUpdate::Set(Seq(1))).await.unwrap();
    let second = db.queue_apply(chain, "pb".into(), vec![bad], PositionUpdate::Set(Seq(2))).await.unwrap();
    let third = db.queue_apply(chain, "pb".into(), vec![rec("c", 3)], PositionUpdate::Set(Seq(3))).await.unwrap();
    assert_eq!(first.await.unwrap().applied, 1);
    assert!(matches!(second.await, Err(DbError::InvalidRecord { .. })));
    let err = third.await.unwrap_err();
    assert!(matches!(err, DbError::ApplyChainBroken), "{err:?}");
    assert!(err.to_string().contains("earlier batch"), "{err}");
    assert_eq!(db.peer_position("pb").await.unwrap(), Some(Seq(1)));
    assert_eq!(db.get(&id("c")).await.unwrap(), None);
    // The next connection's chain applies again, from the stored position.
    let next =
        db.queue_apply(ApplyChain(8), "pb".into(), vec![rec("c", 3)], PositionUpdate::Set(Seq(3))).await.unwrap();
    assert_eq!(next.await.unwrap().applied, 1);
    assert_eq!(db.peer_position("pb").await.unwrap(), Some(Seq(3)));
    db.close().await.unwrap();
}

/// The secondary indexes as `sqlite_master` holds them, by name.
fn index_sql(path: &Path) -> Vec<(String, String)> {
    let c = raw_open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    let mut st = c
        .prepare("SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL ORDER BY name")
        .unwrap();
    let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
    rows.collect::<Result<_, _>>().unwrap()
}

/// The indexes a snapshot load keeps, out of `all`: those whose entries it appends.
fn during_a_load(all: &[(String, String)]) -> Vec<(String, String)> {
    let kept = ["sessions_by_subcluster", "sessions_tombstones_by_age"];
    all.iter().filter(|(name, _)| kept.contains(&name.as_str())).cloned().collect()
}

fn live_records(from: u32, n: u32) -> Vec<Record> {
    (from..from + n)
        .map(|i| {
            let sid = format!("s{i:05}");
            Record {
                id: id(&sid),
                version: version(1 + i as u64, "b"),
                base: None,
                session: Some(session(&sid, "u", "ag", i)),
            }
        })
        .collect()
}

#[tokio::test]
async fn a_snapshot_into_an_empty_database_loads_without_indexes_and_builds_them_at_its_end() {
    let (fresh, dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    open(&fresh, "a").close().await.unwrap();
    let expected = index_sql(&db_path(&fresh));
    assert_eq!(expected.len(), 4, "{expected:?}");
    let db = open(&dir, "a");
    db.apply_remote_with("pb".into(), live_records(0, 500), PositionUpdate::Keep).await.unwrap();
    assert_eq!(
        index_sql(&db_path(&dir)),
        during_a_load(&expected),
        "indexes dropped while loading into an empty database"
    );
    db.apply_remote_with("pb".into(), live_records(500, 500), PositionUpdate::Keep).await.unwrap();
    // Reads are right without them, only slower.
    assert_eq!(db.list(&SessionFilter { user: Some("u".into()), ..Default::default() }).await.unwrap().len(), 1000);
    db.apply_remote_with("pb".into(), vec![], PositionUpdate::Set(Seq(1000))).await.unwrap();
    assert_eq!(index_sql(&db_path(&dir)), expected, "the snapshot's end builds the same indexes");
    assert_eq!(db.status().await.unwrap().sessions, 1000);
    // A snapshot into a database that holds sessions keeps its indexes.
    db.apply_remote_with("pb".into(), live_records(1000, 500), PositionUpdate::Keep).await.unwrap();
    assert_eq!(index_sql(&db_path(&dir)), expected);
    db.close().await.unwrap();
}

/// Writes of ids above the greatest stored one skip the lookup of their row; the bound is
/// read again at open, so after a restart a write of a stored id still finds its row.
#[tokio::test]
async fn writes_find_their_rows_after_a_restart_whatever_their_ids() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(&dir, "a");
    db.write(Write::Upsert(session("s5", "u", "ag1", 5))).await.unwrap();
    db.write(Write::Delete(id("s7"))).await.unwrap();
    db.close().await.unwrap();
    let db = open(&dir, "a");
    let mut moved = session("s5", "w", "ag2", 5);
    moved.status = SessionStatus::Disconnected;
    let c = db.write(Write::Upsert(moved)).await.unwrap();
    assert!(c.was_live && c.record.base.is_some(), "an update of the stored row: {c:?}");
    assert!(matches!(db.write(Write::Upsert(session("s7", "u", "ag1", 7))).await, Err(DbError::Ended(_))));
    // Below the greatest id but new, and above it.
    db.write(Write::Upsert(session("s6", "u", "ag1", 6))).await.unwrap();
    db.write(Write::Upsert(session("s8", "u", "ag1", 8))).await.unwrap();
    let st = db.status().await.unwrap();
    assert_eq!((st.sessions, st.tombstones), (3, 1));
    let counts = db.count_users_per_agent().await.unwrap();
    assert_eq!(counts, [("ag1".to_string(), 1), ("ag2".to_string(), 1)].into_iter().collect());
    db.close().await.unwrap();
}

/// While a snapshot loads into an empty database, ids above every one stored since are
/// inserted without a lookup; everything else (a snapshot started again over a cut one, a
/// chunk out of order, one id twice in a chunk, a chunk that fails) takes the merge, and
/// the result is the same as in a database that loads with lookups all along.
#[tokio::test]
async fn a_load_that_starts_again_or_comes_out_of_order_merges_like_any_apply() {
    let (dir, other) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let newer = |from: u32, n: u32| -> Vec<Record> {
        let mut recs = live_records(from, n);
        for r in &mut recs {
            r.version.hlc.wall_ms += 10_000;
            if let Some(s) = &mut r.session {
                s.status = SessionStatus::Disconnected;
                s.user = format!("v{}", s.display % 7);
            }
        }
        recs
    };
    let mut twice = newer(500, 300);
    let mut again = twice[0].clone();
    again.version.hlc.wall_ms += 1;
    again.session.as_mut().unwrap().display = 9_999;
    twice.push(again.clone());
    let mut broken = live_records(800, 300);
    broken[299].session = Some(session("not-the-id", "u", "ag", 1));
    let chunks = [
        live_records(0, 300),
        // The snapshot again, after a cut: the first 200 are stored already, now newer.
        newer(100, 300),
        // Out of order, and older than what is stored: skipped.
        live_records(0, 300),
        twice,
        broken,
        live_records(800, 300),
    ];
    let db = open(&dir, "a");
    let mut applied = Vec::new();
    for c in &chunks {
        let out = db.apply_remote_with("pb".into(), c.clone(), PositionUpdate::Keep).await;
        applied.push(out.map(|o| (o.applied, o.skipped)).ok());
    }
    let none = Some((0, 300));
    assert_eq!(applied, [Some((300, 0)), Some((300, 0)), none, Some((301, 0)), None, Some((300, 0))]);
    assert_eq!(index_sql(&db_path(&dir)).len(), 2, "still loading");
    db.apply_remote_with("pb".into(), vec![], PositionUpdate::Set(Seq(1))).await.unwrap();
    // A database that holds a session loads every chunk through the merge.
    let reference = open(&other, "a");
    reference.apply_remote_with("pb".into(), live_records(5_000, 1), PositionUpdate::Keep).await.unwrap();
    for c in &chunks {
        let _ = reference.apply_remote_with("pb".into(), c.clone(), PositionUpdate::Keep).await;
    }
    reference.write(Write::Delete(id("s05000"))).await.unwrap();
    reference.gc(Some(u64::MAX / 4)).await.unwrap();
    assert_eq!(db.digest().await.unwrap(), reference.digest().await.unwrap());
    assert_eq!(db.status().await.unwrap().sessions, 1000);
    assert_eq!(db.get(&id("s00500")).await.unwrap().map(|s| s.display), Some(9_999), "the later of one id twice");
    let by_user = |u: &str| SessionFilter { user: Some(u.into()), ..Default::default() };
    assert_eq!(db.list(&by_user("u")).await.unwrap().len(), 100 + 300);
    assert_eq!(db.count_users_per_agent().await.unwrap(), reference.count_users_per_agent().await.unwrap());
    db.close().await.unwrap();
    reference.close().await.unwrap();
}

#[tokio::test]
async fn indexes_dropped_by_a_load_cut_off_by_a_stop_are_back_after_close_or_open() {
    let (fresh, dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    open(&fresh, "a").close().await.unwrap();
    let expected = index_sql(&db_path(&fresh));
    let db = open(&dir, "a");
    db.apply_remote_with("pb".into(), live_records(0, 300), PositionUpdate::Keep).await.unwrap();
    assert_eq!(index_sql(&db_path(&dir)), during_a_load(&expected));
    db.close().await.unwrap();
    assert_eq!(index_sql(&db_path(&dir)), expected, "close builds them");
    // A crash in the middle leaves them dropped; the next open builds them.
    let raw = raw_open(db_path(&dir)).unwrap();
    raw.execute_batch("DROP INDEX sessions_by_user; DROP INDEX sessions_tombstones_by_age;").unwrap();
    drop(raw);
    let db = open(&dir, "a");
    assert_eq!(index_sql(&db_path(&dir)), expected, "open builds them");
    assert_eq!(db.status().await.unwrap().sessions, 300);
    db.close().await.unwrap();
}

#[tokio::test]
async fn a_failed_first_chunk_of_a_load_leaves_the_indexes_in_place() {
    let (fresh, dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    open(&fresh, "a").close().await.unwrap();
    let expected = index_sql(&db_path(&fresh));
    let db = open(&dir, "a");
    let mut chunk = live_records(0, 300);
    chunk[299].session = Some(session("not-the-id", "u", "ag", 1));
    db.apply_remote_with("pb".into(), chunk, PositionUpdate::Keep).await.unwrap_err();
    assert_eq!(index_sql(&db_path(&dir)), expected, "the drop was rolled back with the chunk");
    // And the owner knows: a local write keeps them too.
    db.write(Write::Upsert(session("w", "u", "ag", 1))).await.unwrap();
    assert_eq!(index_sql(&db_path(&dir)), expected);
    db.close().await.unwrap();
}

#[tokio::test]
async fn gc_trims_a_long_log_in_bounded_steps() {
    let dir = tempfile::tempdir().unwrap();
    let db = open_keeping_changes(&dir, 100);
    let n = GC_CHANGES_PER_CALL as u32 + 1_100;
    let ids: Vec<u32> = (0..n).collect();
    for chunk in ids.chunks(1_000) {
        let ws = chunk.iter().map(|&i| Write::Upsert(session(&format!("s{i}"), "u", "ag", i))).collect();
        db.write_batch(ws).await.unwrap();
    }
    // n - 100 rows are due: one full step, then the rest.
    let first = db.gc(None).await.unwrap();
    assert_eq!(first, GcStats { tombstones: 0, changes: GC_CHANGES_PER_CALL as usize, more: true });
    let second = db.gc(None).await.unwrap();
    assert_eq!(second, GcStats { tombstones: 0, changes: 1_000, more: false });
    assert_eq!(db.gc(None).await.unwrap(), GcStats::default());
    let st = db.status().await.unwrap();
    assert_eq!((st.head.0, st.oldest.0), (u64::from(n), u64::from(n) - 99));
}

#[tokio::test]
async fn gc_trims_the_log_so_old_positions_need_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let db = open_keeping_changes(&dir, 10);
    for i in 0..30 {
        db.write(Write::Upsert(session(&format!("s{i}"), "u", "ag", i))).await.unwrap();
    }
    let g = db.gc(Some(now_ms())).await.unwrap();
    assert_eq!(g, GcStats { tombstones: 0, changes: 20, more: false });
    let st = db.status().await.unwrap();
    assert_eq!((st.head, st.oldest), (Seq(30), Seq(21)));
    assert_eq!(db.changes_since(Seq(5), 100).await.unwrap(), LogRead::Truncated { oldest: Seq(21) });
    assert_eq!(db.changes_since(Seq(19), 100).await.unwrap(), LogRead::Truncated { oldest: Seq(21) });
    match db.changes_since(Seq(20), 4).await.unwrap() {
        LogRead::Changes(ch) => {
            assert_eq!(ch.iter().map(|c| c.seq.0).collect::<Vec<_>>(), vec![21, 22, 23, 24])
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(db.changes_since(Seq(30), 4).await.unwrap(), LogRead::Changes(vec![]));
    assert_eq!(db.changes_since(Seq(31), 4).await.unwrap(), LogRead::Truncated { oldest: Seq(21) });
    db.close().await.unwrap();

    // The head survives even a log trimmed to nothing.
    let mut o = opts(&db_path(&dir), "a");
    o.changelog_retention = 0;
    let db = DbHandle::open(o.clone()).unwrap();
    db.gc(Some(now_ms())).await.unwrap();
    assert_eq!(db.status().await.unwrap().oldest, Seq(31));
    db.close().await.unwrap();
    let db = DbHandle::open(o).unwrap();
    assert_eq!(db.write(Write::Delete(id("s0"))).await.unwrap().seq, Seq(31));
    db.close().await.unwrap();
}

#[tokio::test]
async fn gc_forgets_tombstones_only_after_the_retention() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(&dir, "a");
    db.write(Write::Upsert(session("x", "u", "ag", 1))).await.unwrap();
    let del = db.write(Write::Delete(id("x"))).await.unwrap();
    let t = del.version.hlc.wall_ms;
    assert_eq!(db.gc(Some(t + 3_599_000)).await.unwrap().tombstones, 0);
    assert_eq!(db.gc(Some(t + 3_601_000)).await.unwrap().tombstones, 1);
    assert_eq!(db.record(&id("x")).await.unwrap(), None);
    assert_eq!(db.status().await.unwrap().tombstones, 0);
    db.close().await.unwrap();
}

/// Replays a change log up to `head`: the state a consistent snapshot at `head` must show.
fn replay(changes: &[Change], head: Seq) -> Vec<Record> {
    let mut m = BTreeMap::new();
    for c in changes.iter().filter(|c| c.seq <= head) {
        m.insert(c.record.id.clone(), c.record.clone());
    }
    m.into_values().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_match_their_head_while_writes_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(&dir, "a");
    let writer = {
        let db = db.clone();
        tokio::spawn(async move {
            // A new id after each delete of one: an ended session stays ended.
            let mut generation = [0u32; 37];
            for i in 0..600u32 {
                let k = (i % 37) as usize;
                let sid = format!("s{k}-{}", generation[k]);
                let w = if i % 5 == 4 {
                    generation[k] += 1;
                    Write::Delete(id(&sid))
                } else {
                    Write::Upsert(session(&sid, "u", "ag", i))
                };
                db.write(w).await.unwrap();
            }
        })
    };
    let mut snaps = Vec::new();
    while !writer.is_finished() {
        snaps.push(db.snapshot().await.unwrap());
    }
    writer.await.unwrap();
    snaps.push(db.snapshot().await.unwrap());
    let LogRead::Changes(all) = db.changes_since(Seq::ZERO, 10_000).await.unwrap() else { panic!("truncated") };
    assert_eq!(all.len(), 600);
    for s in &mut snaps {
        s.records.sort_by(|x, y| x.id.cmp(&y.id));
        assert_eq!(s.records, replay(&all, s.head), "snapshot at {} is inconsistent", s.head);
    }
    db.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_get_distinct_dense_seqs() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(&dir, "a");
    let mut tasks = Vec::new();
    for t in 0..16u32 {
        let db = db.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for i in 0..200u32 {
                let c = db.write(Write::Upsert(session(&format!("t{t}-{i}"), "u", "ag", i))).await.unwrap();
                out.push(c);
            }
            out
        }));
    }
    let mut seqs = Vec::new();
    let mut versions = BTreeSet::new();
    for t in tasks {
        for c in t.await.unwrap() {
            seqs.push(c.seq.0);
            versions.insert(c.version);
        }
    }
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=3200).collect::<Vec<_>>());
    assert_eq!(versions.len(), 3200);
    let st = db.status().await.unwrap();
    assert_eq!((st.head, st.sessions), (Seq(3200), 3200));
    db.close().await.unwrap();
}

#[tokio::test]
async fn list_filters_combine_with_and() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(&dir, "a");
    let mut s = vec![
        session("1", "alice", "ag1", 10),
        session("2", "alice", "ag2", 11),
        session("3", "bob", "ag1", 12),
        session("4", "bob", "ag1", 10),
        session("5", "carol", "ag2", 10),
    ];
    s[3].subcluster = "lab".into();
    s[4].status = SessionStatus::Unreachable;
    for x in &s {
        db.write(Write::Upsert(x.clone())).await.unwrap();
    }
    db.write(Write::Upsert(session("6", "alice", "ag1", 13))).await.unwrap();
    db.write(Write::Delete(id("6"))).await.unwrap();

    let all = db.list(&SessionFilter::default()).await.unwrap();
    let order: Vec<_> = all.iter().map(|s| (s.created_ms, s.id.0.as_str())).collect();
    assert_eq!(order, vec![(1010, "1"), (1010, "4"), (1010, "5"), (1011, "2"), (1012, "3")], "oldest first");
    let ids = |v: Vec<Session>| {
        let mut ids = v.into_iter().map(|s| s.id.0).collect::<Vec<_>>();
        ids.sort();
        ids
    };
    let f = SessionFilter { user: Some("alice".into()), ..Default::default() };
    assert_eq!(ids(db.list(&f).await.unwrap()), vec!["1", "2"]);
    let f = SessionFilter { user: Some("alice".into()), agent: Some("ag1".into()), ..Default::default() };
    assert_eq!(ids(db.list(&f).await.unwrap()), vec!["1"]);
    let f = SessionFilter { agent: Some("ag1".into()), display: Some(10), ..Default::default() };
    assert_eq!(ids(db.list(&f).await.unwrap()), vec!["1", "4"]);
    let f = SessionFilter { subcluster: Some("lab".into()), user: Some("bob".into()), ..Default::default() };
    assert_eq!(ids(db.list(&f).await.unwrap()), vec!["4"]);
    let f = SessionFilter { subcluster: Some("lab".into()), user: Some("alice".into()), ..Default::default() };
    assert!(db.list(&f).await.unwrap().is_empty());
    let f = SessionFilter { display: Some(10), exclude_unreachable: true, ..Default::default() };
    assert_eq!(ids(db.list(&f).await.unwrap()), vec!["1", "4"]);
    let f = SessionFilter { status: Some(SessionStatus::Unreachable), ..Default::default() };
    assert_eq!(db.list(&f).await.unwrap(), vec![s[4].clone()]);
    db.close().await.unwrap();
}

/// Rewrites that keep a session's indexed columns take the narrow update; new rows, moves
/// and ends take the full upsert. Either way every index-backed filter finds the row where
/// it now is, and nowhere else.
#[tokio::test]
async fn rewrites_in_place_and_moves_keep_every_filter_true() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(&dir, "a");
    let ids = |v: Vec<Session>| v.into_iter().map(|s| s.id.0).collect::<Vec<_>>();
    let by = |user: &str, agent: &str, display: u32, subcluster: &str| SessionFilter {
        user: Some(user.into()),
        agent: Some(agent.into()),
        display: Some(display),
        subcluster: Some(subcluster.into()),
        ..Default::default()
    };
    let mut s = session("1", "alice", "ag1", 10);
    db.write(Write::Upsert(s.clone())).await.unwrap();
    // Same indexed columns, other fields changed: written in place.
    s.status = SessionStatus::Disconnected;
    s.last_client_address = "10.0.0.9".into();
    db.write(Write::Upsert(s.clone())).await.unwrap();
    assert_eq!(db.list(&by("alice", "ag1", 10, "default")).await.unwrap(), vec![s.clone()]);
    // Moved to another user, agent, display and subcluster: every index follows.
    s.user = "bob".into();
    s.agent = "ag2".into();
    s.display = 11;
    s.subcluster = "lab".into();
    db.write(Write::Upsert(s.clone())).await.unwrap();
    assert!(db.list(&by("alice", "ag1", 10, "default")).await.unwrap().is_empty());
    for f in [
        SessionFilter { user: Some("alice".into()), ..Default::default() },
        SessionFilter { agent: Some("ag1".into()), ..Default::default() },
        SessionFilter { subcluster: Some("default".into()), ..Default::default() },
    ] {
        assert!(db.list(&f).await.unwrap().is_empty(), "{f:?} still finds the moved session");
    }
    assert_eq!(db.list(&by("bob", "ag2", 11, "lab")).await.unwrap(), vec![s.clone()]);
    // Ended: a tombstone, which no filter finds and no in-place update matches.
    db.write(Write::Delete(id("1"))).await.unwrap();
    assert!(db.list(&SessionFilter { user: Some("bob".into()), ..Default::default() }).await.unwrap().is_empty());
    assert!(matches!(db.write(Write::Upsert(s.clone())).await, Err(DbError::Ended(_))));
    let mut t = s.clone();
    t.id = id("2");
    db.write(Write::Upsert(t.clone())).await.unwrap();
    t.status = SessionStatus::Disconnected;
    db.write(Write::Upsert(t.clone())).await.unwrap();
    assert_eq!(ids(db.list(&by("bob", "ag2", 11, "lab")).await.unwrap()), vec!["2"]);
    assert_eq!(db.count_users_per_agent().await.unwrap().get("ag2"), Some(&1));
    db.close().await.unwrap();
    let conn = raw_open(db_path(&dir)).unwrap();
    let check: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
    assert_eq!(check, "ok");
}

#[tokio::test]
async fn users_per_agent_counts_distinct_users_of_live_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(&dir, "a");
    for x in [
        session("1", "u1", "ag1", 1),
        session("2", "u1", "ag1", 2),
        session("3", "u2", "ag1", 3),
        session("4", "u3", "ag2", 1),
        session("5", "u4", "ag3", 1),
    ] {
        db.write(Write::Upsert(x)).await.unwrap();
    }
    db.write(Write::Delete(id("5"))).await.unwrap();
    let m = db.count_users_per_agent().await.unwrap();
    assert_eq!(m, BTreeMap::from([("ag1".to_string(), 2), ("ag2".to_string(), 1)]));
    db.close().await.unwrap();
}

#[tokio::test]
async fn the_point_reader_sees_every_answered_write_and_the_handle_reads_user_counts_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(&dir, "a");
    let mine = SessionFilter { user: Some("u1".into()), ..Default::default() };
    assert!(db.list_committed(&mine).await.unwrap().is_empty());
    db.write(Write::Upsert(session("1", "u1", "ag1", 1))).await.unwrap();
    db.write(Write::Upsert(session("2", "u2", "ag1", 2))).await.unwrap();
    db.write(Write::Upsert(session("3", "u1", "ag2", 1))).await.unwrap();
    let ids = |v: Vec<Session>| v.into_iter().map(|s| s.id.0).collect::<Vec<_>>();
    assert_eq!(ids(db.list_committed(&mine).await.unwrap()), ["1", "3"]);
    assert_eq!(db.list_committed(&mine).await.unwrap(), db.list(&mine).await.unwrap());
    assert_eq!(db.users_per_agent().read(|m| (m.get("ag1").copied(), m.get("ag2").copied())), (Some(2), Some(1)));
    db.write(Write::Delete(id("3"))).await.unwrap();
    assert_eq!(ids(db.list_committed(&mine).await.unwrap()), ["1"]);
    assert_eq!(db.users_per_agent().read(|m| m.get("ag2").copied()), None);
    let other = db.clone();
    db.close().await.unwrap();
    assert!(matches!(other.list_committed(&mine).await, Err(DbError::Closed)));
}

#[tokio::test]
async fn sessions_counted_per_agent_and_state_without_tombstones() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(&dir, "a");
    let mut off = session("2", "u1", "ag1", 2);
    off.status = SessionStatus::Disconnected;
    for x in [session("1", "u1", "ag1", 1), off, session("3", "u2", "ag1", 3), session("4", "u3", "ag2", 1)] {
        db.write(Write::Upsert(x)).await.unwrap();
    }
    db.write(Write::Delete(id("4"))).await.unwrap();
    let mut got = db.count_sessions().await.unwrap();
    got.sort_by(|a, b| (&a.agent, a.status.as_str()).cmp(&(&b.agent, b.status.as_str())));
    let c = |agent: &str, status, count| SessionCount { agent: agent.into(), status, count };
    assert_eq!(got, vec![c("ag1", SessionStatus::Disconnected, 1), c("ag1", SessionStatus::Running, 2)]);
    db.close().await.unwrap();
}

/// The ids a reconciliation sweep reads before it polls the agents, on a connection of its
/// own: every live session written before, with its agent, and no tombstone.
#[tokio::test]
async fn live_ids_are_every_live_session_written_before_with_its_agent() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(&dir, "a");
    for x in [session("1", "u1", "ag1", 1), session("2", "u1", "ag2", 2), session("3", "u2", "ag1", 3)] {
        db.write(Write::Upsert(x)).await.unwrap();
    }
    db.write(Write::Delete(id("2"))).await.unwrap();
    db.write(Write::Delete(id("never-seen"))).await.unwrap();
    let mut got = db.live_ids().await.unwrap();
    got.sort();
    assert_eq!(got, vec![(id("1"), "ag1".to_string()), (id("3"), "ag1".to_string())]);
    db.close().await.unwrap();
    assert!(matches!(db_closed_live_ids(&dir).await, Err(DbError::Closed)));
}

/// A handle whose database is closed answers `Closed` instead of opening the file again.
async fn db_closed_live_ids(dir: &tempfile::TempDir) -> Result<Vec<(SessionId, String)>, DbError> {
    let db = open(dir, "a");
    let other = db.clone();
    db.close().await.unwrap();
    other.live_ids().await
}

#[tokio::test]
async fn users_per_agent_in_memory_matches_the_table_after_moves_applies_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(&dir, "a");
    let sql = |db: &DbHandle| {
        let db = db.clone();
        async move { db.read(|o| o.count_users_per_agent_sql()).await.unwrap() }
    };
    for i in 0..30u32 {
        let s = session(&format!("s{i}"), &format!("u{}", i % 7), &format!("ag{}", i % 4), i);
        db.write(Write::Upsert(s)).await.unwrap();
    }
    // Move sessions to other agents and users, delete some, write tombstones for unknown ids.
    for i in (0..30u32).step_by(3) {
        let s = session(&format!("s{i}"), &format!("u{}", i % 5), &format!("ag{}", (i + 1) % 4), i);
        db.write(Write::Upsert(s)).await.unwrap();
    }
    for i in (1..30u32).step_by(4) {
        db.write(Write::Delete(id(&format!("s{i}")))).await.unwrap();
    }
    db.write(Write::Delete(id("never-seen"))).await.unwrap();
    // Remote records: a newer version moves a session, an older one is skipped, a tombstone
    // removes one, a new one adds an agent.
    let mut moved = session("s2", "u9", "ag9", 2);
    moved.agent = "ag9".into();
    let far = now_ms() + 60_000;
    let records = vec![
        Record { id: id("s2"), version: version(far, "b"), base: None, session: Some(moved) },
        Record { id: id("s3"), version: version(1, "b"), base: None, session: Some(session("s3", "old", "old", 3)) },
        Record { id: id("s4"), version: version(far, "b"), base: None, session: None },
        Record { id: id("r1"), version: version(far, "b"), base: None, session: Some(session("r1", "u1", "ag7", 1)) },
    ];
    db.apply_remote("peer".into(), records, Seq(4)).await.unwrap();
    let mem = db.count_users_per_agent().await.unwrap();
    assert_eq!(mem, sql(&db).await);
    assert!(mem.contains_key("ag9") && mem.contains_key("ag7") && !mem.contains_key("old"));
    // A group where one request fails is rolled back and redone one by one: still exact.
    let bad =
        Record { id: id("x"), version: version(far, "b"), base: None, session: Some(session("y", "u", "agx", 1)) };
    let (r1, r2) = tokio::join!(
        db.apply_remote("peer".into(), vec![bad], Seq(5)),
        db.write(Write::Upsert(session("s40", "u40", "ag40", 40)))
    );
    assert!(r1.is_err() && r2.is_ok());
    assert_eq!(db.count_users_per_agent().await.unwrap(), sql(&db).await);
    db.close().await.unwrap();
    let db = open(&dir, "a");
    assert_eq!(db.count_users_per_agent().await.unwrap(), mem_with(&mem, "ag40", 1));
    db.close().await.unwrap();
}

fn mem_with(m: &BTreeMap<String, usize>, agent: &str, n: usize) -> BTreeMap<String, usize> {
    let mut m = m.clone();
    m.insert(agent.into(), n);
    m
}

#[tokio::test]
async fn committed_changes_are_published_in_order_after_commit() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(&dir, "a");
    let mut rx = db.subscribe_changes();
    let one = db.write(Write::Upsert(session("s1", "u", "ag", 1))).await.unwrap();
    let batch =
        db.write_batch(vec![Write::Upsert(session("s2", "u", "ag", 2)), Write::Delete(id("s1"))]).await.unwrap();
    // Remote records are not local changes: nothing is published for them.
    let far = now_ms() + 60_000;
    let rec = Record { id: id("r"), version: version(far, "b"), base: None, session: Some(session("r", "u", "ag", 3)) };
    db.apply_remote("peer".into(), vec![rec], Seq(1)).await.unwrap();
    let last = db.write(Write::Delete(id("s2"))).await.unwrap();
    let mut got = Vec::new();
    while got.len() < 4 {
        let b = rx.recv().await.unwrap();
        got.extend(b.iter().cloned());
    }
    let want: Vec<Change> =
        std::iter::once(&one).chain(batch.iter()).chain(std::iter::once(&last)).map(|c| c.change()).collect();
    assert_eq!(got, want);
    assert!(rx.try_recv().is_err(), "nothing else was published");
    // Every published change is what the log holds.
    match db.changes_since(Seq::ZERO, 10).await.unwrap() {
        LogRead::Changes(log) => assert_eq!(log, want),
        other => panic!("unexpected {other:?}"),
    }
    db.close().await.unwrap();
}

#[tokio::test]
async fn snapshot_streams_come_in_chunks_and_positions_can_be_reset() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(&dir, "a");
    for i in 0..10 {
        db.write(Write::Upsert(session(&format!("s{i}"), "u", "ag", i))).await.unwrap();
    }
    let mut stream = db.snapshot_stream(4).await.unwrap();
    // Writes after the stream began are not in it.
    db.write(Write::Upsert(session("late", "u", "ag", 99))).await.unwrap();
    let mut sizes = Vec::new();
    let mut ids = Vec::new();
    while let Some(chunk) = stream.next_chunk().await {
        let chunk = chunk.unwrap();
        sizes.push(chunk.len());
        ids.extend(chunk.into_iter().map(|r| r.id.0));
    }
    assert_eq!((stream.head, stream.total), (Seq(10), 10));
    assert_eq!(sizes, vec![4, 4, 2]);
    ids.sort();
    assert_eq!(ids, (0..10).map(|i| format!("s{i}")).collect::<Vec<_>>());

    db.apply_remote("p".into(), vec![], Seq(50)).await.unwrap();
    db.set_peer_position("p", Seq(7)).await.unwrap();
    assert_eq!(db.peer_position("p").await.unwrap(), Some(Seq(7)));
    db.close().await.unwrap();
}

#[tokio::test]
async fn a_closed_database_answers_closed() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(&dir, "a");
    let other = db.clone();
    db.close().await.unwrap();
    assert!(matches!(other.status().await, Err(DbError::Closed)));
    assert!(matches!(other.write(Write::Delete(id("x"))).await, Err(DbError::Closed)));
    // The file was checkpointed and can be opened again.
    let db = open(&dir, "a");
    db.close().await.unwrap();
}

// ---- property test: two nodes, random writes, random exchanges ----------------------

#[derive(Clone, Debug)]
enum Op {
    /// A local write on node A (`true`) or B.
    Write { on_a: bool, id: u8, delete: bool, display: u8 },
    /// Replicate from one node to the other in chunks of `chunk` records.
    Sync { a_to_b: bool, chunk: usize },
    /// Trim the change log of one node to its last few entries.
    Gc { on_a: bool },
}

fn arb_op() -> impl proptest::strategy::Strategy<Value = Op> {
    use proptest::prelude::*;
    prop_oneof![
        6 => (any::<bool>(), 0u8..5, proptest::bool::weighted(0.3), 0u8..4)
            .prop_map(|(on_a, id, delete, display)| Op::Write { on_a, id, delete, display }),
        2 => (any::<bool>(), 1usize..5).prop_map(|(a_to_b, chunk)| Op::Sync { a_to_b, chunk }),
        1 => any::<bool>().prop_map(|on_a| Op::Gc { on_a }),
    ]
}

/// Brings `to` up to date with `from` like the replication engine would: from the change
/// log where it reaches back, else from a snapshot.
async fn sync(from: &DbHandle, to: &DbHandle, chunk: usize) {
    let peer = from.db_id().to_string();
    loop {
        let pos = to.peer_position(&peer).await.unwrap().unwrap_or(Seq::ZERO);
        match from.changes_since(pos, chunk).await.unwrap() {
            LogRead::Changes(ch) if ch.is_empty() => return,
            LogRead::Changes(ch) => {
                let last = ch.last().map(|c| c.seq).unwrap_or(pos);
                to.apply_remote(peer.clone(), ch.into_iter().map(|c| c.record).collect(), last).await.unwrap();
            }
            LogRead::Truncated { .. } => {
                let mut snap = from.snapshot_stream(chunk).await.unwrap();
                let mut seen = 0;
                while let Some(part) = snap.next_chunk().await {
                    let part = part.unwrap();
                    seen += part.len() as u64;
                    // Positions are recorded once the whole snapshot is in.
                    to.apply_remote(peer.clone(), part, pos).await.unwrap();
                }
                assert_eq!(seen, snap.total);
                to.set_peer_position(&peer, snap.head).await.unwrap();
            }
        }
    }
}

async fn run_two_nodes(ops: Vec<Op>, final_a_first: bool) -> Result<(), String> {
    let (da, db_) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut oa = opts(&db_path(&da), "a");
    let mut ob = opts(&db_path(&db_), "b");
    oa.changelog_retention = 3;
    ob.changelog_retention = 3;
    let a = DbHandle::open(oa).unwrap();
    let b = DbHandle::open(ob).unwrap();
    // Every version ever written per id, with what it wrote.
    let mut written: BTreeMap<SessionId, Vec<Record>> = BTreeMap::new();
    for op in ops {
        match op {
            Op::Write { on_a, id: n, delete, display } => {
                let node = if on_a { &a } else { &b };
                let sid = format!("s{n}");
                let w = if delete {
                    Write::Delete(id(&sid))
                } else {
                    Write::Upsert(session(&sid, "u", if on_a { "ag-a" } else { "ag-b" }, display.into()))
                };
                match node.write(w).await {
                    Ok(c) => written.entry(c.record.id.clone()).or_default().push(c.record),
                    // An ended session is never live again on the node that knows it ended.
                    Err(DbError::Ended(_)) => {}
                    Err(e) => return Err(e.to_string()),
                }
            }
            Op::Sync { a_to_b: true, chunk } => sync(&a, &b, chunk).await,
            Op::Sync { a_to_b: false, chunk } => sync(&b, &a, chunk).await,
            Op::Gc { on_a } => {
                (if on_a { &a } else { &b }).gc(Some(now_ms())).await.unwrap();
            }
        }
    }
    // Until neither node writes anything more (a delete written again streams back).
    for round in 0.. {
        let heads = (a.status().await.unwrap().head, b.status().await.unwrap().head);
        if final_a_first {
            sync(&a, &b, 2).await;
            sync(&b, &a, 3).await;
        } else {
            sync(&b, &a, 3).await;
            sync(&a, &b, 2).await;
        }
        if round >= 1 && heads == (a.status().await.unwrap().head, b.status().await.unwrap().head) {
            break;
        }
        if round > 10 {
            return Err("the nodes keep writing after every sync".into());
        }
    }
    let (mut ra, mut rb) = (a.export_records().await.unwrap(), b.export_records().await.unwrap());
    ra.sort_by(|x, y| x.id.cmp(&y.id));
    rb.sort_by(|x, y| x.id.cmp(&y.id));
    if a.digest().await.unwrap() != b.digest().await.unwrap() {
        return Err(format!("digests differ:\nA {ra:?}\nB {rb:?}"));
    }
    // The survivor of every id: a tombstone if any was written (maybe one written again
    // above a concurrent change), else the newest version written.
    let expected: Vec<(SessionId, Option<Record>)> = written
        .into_iter()
        .map(|(id, v)| {
            let newest = v.iter().max_by(|x, y| x.version.cmp(&y.version)).cloned().unwrap();
            (id, (!v.iter().any(|r| r.session.is_none())).then_some(newest))
        })
        .collect();
    let got: Vec<(SessionId, Option<Record>)> =
        ra.iter().map(|r| (r.id.clone(), r.session.is_some().then(|| r.clone()))).collect();
    if got != expected {
        return Err(format!("surviving records are not the ones written:\n got {ra:?}\nwant {expected:?}"));
    }
    a.close().await.unwrap();
    b.close().await.unwrap();
    Ok(())
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
    #[test]
    fn two_nodes_converge_and_keep_every_delete(
        ops in proptest::collection::vec(arb_op(), 1..40),
        final_a_first in proptest::prelude::any::<bool>(),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let res = rt.block_on(run_two_nodes(ops, final_a_first));
        proptest::prop_assert!(res.is_ok(), "{}", res.unwrap_err());
    }
}

/// CPU time (user + system) of this process so far: steadier than wall time on a busy machine.
fn cpu_time() -> Duration {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct it is given; RUSAGE_SELF is always valid.
    let ru = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr());
        ru.assume_init()
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// 100,000 sessions of 700 users on 20 agents, written in batches of 1,000 (the measurements'
/// database).
async fn fill_100k(a: &DbHandle) {
    for chunk in 0..100 {
        let ws = (0..1000)
            .map(|i| {
                let user = format!("user{}", i % 700);
                Write::Upsert(session(&SessionId::generate().0, &user, &format!("ag{}", chunk % 20), i))
            })
            .collect();
        a.write_batch(ws).await.unwrap();
    }
}

/// Full resync of 100,000 sessions: snapshot on one node, apply on an empty one.
/// Run with `cargo test --release --lib db::tests::resync_of_100k -- --ignored --nocapture`.
#[tokio::test]
#[ignore = "measurement; run explicitly, preferably in release"]
async fn resync_of_100k_sessions() {
    let (da, dbb) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = open(&da, "a");
    let b = open(&dbb, "b");
    let mut t = (std::time::Instant::now(), cpu_time());
    let mut lap = |what: &str| {
        let now = (std::time::Instant::now(), cpu_time());
        println!("{what}: wall {:?}, cpu {:?}", now.0 - t.0, now.1 - t.1);
        t = now;
    };
    fill_100k(&a).await;
    lap("write 100k in batches of 1000");
    let mut stream = a.snapshot_stream(5000).await.unwrap();
    let mut parts = Vec::new();
    while let Some(part) = stream.next_chunk().await {
        parts.push(part.unwrap());
    }
    lap("snapshot of 100k (chunks of 5000)");
    // As the replication engine applies a snapshot: chunks without a position, then its end.
    for part in &parts {
        b.apply_remote_with(stream.db_id.clone(), part.clone(), PositionUpdate::Keep).await.unwrap();
    }
    lap("apply on an empty node");
    b.apply_remote_with(stream.db_id.clone(), vec![], PositionUpdate::Set(stream.head)).await.unwrap();
    lap("end of the snapshot (indexes built)");
    let mut skipped = 0;
    for part in parts {
        skipped += b.apply_remote(stream.db_id.clone(), part, stream.head).await.unwrap().skipped;
    }
    assert_eq!(skipped, 100_000);
    lap("apply again (all skipped)");
    assert_eq!(a.digest().await.unwrap(), b.digest().await.unwrap());
    lap("two digests");
    a.close().await.unwrap();
    b.close().await.unwrap();
}

#[tokio::test]
async fn a_record_over_its_bounds_is_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(&dir, "a");
    let mut s = session("big", "anna", "agent1", 10);
    s.last_client_address = "x".repeat(8 * 1024 * 1024);
    match db.write(Write::Upsert(s.clone())).await {
        Err(e @ DbError::InvalidRecord { .. }) => {
            assert!(e.to_string().contains("client address is 8388608 bytes long, expected at most 253"), "{e}")
        }
        other => panic!("expected InvalidRecord, got {other:?}"),
    }
    s.last_client_address = "192.0.2.9".into();
    s.command = vec!["\u{1}".repeat(crate::model::MAX_COMMAND - 1)];
    let ok = session("ok", "anna", "agent1", 11);
    let r = db.write_batch(vec![Write::Upsert(ok), Write::Upsert(s)]).await;
    assert!(matches!(r, Err(DbError::InvalidRecord { .. })), "{r:?}");
    // Nothing of either request reached the table or the change log.
    let st = db.status().await.unwrap();
    assert_eq!((st.sessions, st.head), (0, Seq::ZERO));
    db.close().await.unwrap();
}

#[test]
fn files_are_private_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    const CHILD: &str = "VSM_TEST_UMASK_CHILD";
    // The umask belongs to the whole process: check in a child of this test binary, so no
    // other test runs under a permissive umask.
    if std::env::var_os(CHILD).is_none() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "db::tests::files_are_private_whatever_the_umask", "--test-threads=1"])
            .env(CHILD, "1")
            .output()
            .unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success() && text.contains("1 passed"), "{text}");
        return;
    }
    nix::sys::stat::umask(nix::sys::stat::Mode::empty());
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("var/lib/vsm");
    create_private_dir(&data).unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700);
    let path = data.join("sessions.db");
    let db = DbHandle::open(opts(&path, "a")).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        db.write(Write::Upsert(session("s1", "anna", "agent1", 10))).await.unwrap();
    });
    let files = ["sessions.db", "sessions.db-wal", "sessions.db-shm", "sessions.db.lock"];
    for f in files {
        assert_eq!(mode(&data.join(f)), 0o600, "{f}");
    }
    rt.block_on(db.close()).unwrap();
    // Files left readable by an older version are made private on the next start.
    for f in files {
        if data.join(f).exists() {
            std::fs::set_permissions(data.join(f), std::fs::Permissions::from_mode(0o644)).unwrap();
        }
    }
    let db = DbHandle::open(opts(&path, "a")).unwrap();
    for f in files {
        if data.join(f).exists() {
            assert_eq!(mode(&data.join(f)), 0o600, "{f}");
        }
    }
    rt.block_on(db.close()).unwrap();
}

#[test]
fn a_full_disk_is_named_as_such() {
    let full = rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL), None);
    let e = DbError::sqlite("commit", full).to_string();
    assert!(e.starts_with("no space left on device: cannot commit"), "{e}");
}

#[test]
#[cfg_attr(not(vsm_root), ignore = "needs root to mount a small tmpfs")]
fn starting_on_a_full_file_system_says_no_space_left() {
    struct Mounted(PathBuf);
    impl Drop for Mounted {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("small");
    std::fs::create_dir(&mnt).unwrap();
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256k", "vsm-test-full"])
        .arg(&mnt)
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("skipped the full file system part: cannot mount a tmpfs here");
        return;
    }
    let _mounted = Mounted(mnt.clone());
    // Fill it up.
    {
        use std::io::Write as _;
        let mut f = std::fs::File::create(mnt.join("filler")).unwrap();
        while f.write_all(&[0u8; 4096]).is_ok() {}
    }
    let e = DbHandle::open(opts(&mnt.join("data/sessions.db"), "a")).unwrap_err();
    assert!(matches!(e, DbError::DiskFull { .. }), "{e:?}");
    assert!(e.to_string().contains("no space left on device"), "{e}");
}

/// Latency of one durable commit at a time (FULL), and the size of the write-ahead log as it
/// goes: shows whether commits overwrite the log (cheap fsync) or append to it.
/// Run with `cargo test --release --lib db::tests::single_commit_latency -- --ignored --nocapture`.
#[tokio::test]
#[ignore = "measurement; run explicitly, preferably in release"]
async fn single_commit_latency() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(&db_path(&dir), "a");
    o.synchronous = DbSynchronous::Full;
    let db = DbHandle::open(o).unwrap();
    let wal = dir.path().join("sessions.db-wal");
    let mut lat = Vec::new();
    for round in 0..6 {
        let mut ts = Vec::new();
        for i in 0..1000 {
            let s = session(&SessionId::generate().0, &format!("u{i}"), "ag1", i);
            let t = std::time::Instant::now();
            db.write(Write::Upsert(s)).await.unwrap();
            ts.push(t.elapsed().as_micros() as u64);
        }
        ts.sort_unstable();
        println!(
            "round {round}: p50 {} us, p99 {} us, wal {} KiB",
            ts[ts.len() / 2],
            ts[ts.len() * 99 / 100],
            std::fs::metadata(&wal).map(|m| m.len() / 1024).unwrap_or(0)
        );
        lat.extend(ts);
    }
    lat.sort_unstable();
    println!("all: p50 {} us, p99 {} us", lat[lat.len() / 2], lat[lat.len() * 99 / 100]);
}

/// B-tree page splits and merges that swap sibling numbers (through the spare page) and
/// rolled-back growth, under the page cache wrapper: every commit's truncation it answers
/// itself must have had nothing to drop, so the rows read back are exactly those written.
#[test]
fn page_cache_wrapper_keeps_every_row_through_sibling_swaps_and_rollbacks() {
    assert!(super::pcache::install(), "the wrapper is installed before SQLite initialises");
    let before = super::pcache::counts();
    let dir = tempfile::tempdir().unwrap();
    let mut conn = raw_open(db_path(&dir)).unwrap();
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = OFF; PRAGMA cache_size = -16384;
         CREATE TABLE t (k TEXT PRIMARY KEY, v BLOB NOT NULL);",
    )
    .unwrap();
    let mut model = BTreeMap::new();
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for round in 0..600u64 {
        let tx = conn.transaction().unwrap();
        let mut changed = Vec::new();
        for _ in 0..20 {
            let r = next();
            let key = format!("{:016x}", r % 4_000);
            if r % 3 == 0 {
                tx.execute("DELETE FROM t WHERE k = ?1", [&key]).unwrap();
                changed.push((key, None));
            } else {
                let len = 100 + (r >> 32) as usize % 700;
                let v = vec![(r >> 8) as u8; len];
                tx.execute("INSERT OR REPLACE INTO t (k, v) VALUES (?1, ?2)", rusqlite::params![key, v]).unwrap();
                changed.push((key, Some(v)));
            }
        }
        if round % 10 == 9 {
            // Growth rolled back: the pages past the old end must leave the cache.
            tx.execute(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 200)
                 INSERT INTO t SELECT 'tmp' || i, randomblob(2000) FROM n",
                [],
            )
            .unwrap();
            tx.rollback().unwrap();
            continue;
        }
        tx.commit().unwrap();
        for (k, v) in changed {
            match v {
                Some(v) => model.insert(k, v),
                None => model.remove(&k),
            };
        }
    }
    let mut stmt = conn.prepare("SELECT k, v FROM t ORDER BY k").unwrap();
    let rows: BTreeMap<String, Vec<u8>> =
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap().map(Result::unwrap).collect();
    assert_eq!(rows.len(), model.len());
    assert!(rows == model, "the rows read back differ from those written");
    let check: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
    assert_eq!(check, "ok");
    let after = super::pcache::counts();
    assert!(after.parked > before.parked, "the workload swapped siblings through the spare page");
    assert!(after.skipped > before.skipped, "commits with nothing past the end skipped the scan");
    assert!(after.passed > before.passed, "the rollbacks' truncations went through");
}

// ---- snapshots sent as a file ------------------------------------------------------------

/// The pieces of a snapshot file of `db` (small pieces, so that several are sent).
async fn snapshot_file_of(db: &DbHandle) -> (Seq, String, u64, Vec<Vec<u8>>) {
    let mut f = db.snapshot_file(64 * 1024).await.unwrap();
    let mut pieces = Vec::new();
    while let Some(p) = f.next_piece().await {
        pieces.push(p.unwrap());
    }
    (f.head, f.db_id.clone(), f.total, pieces)
}

/// Sends `pieces` to `db` as the replication engine does, then loads them at `head`.
async fn load_file(db: &DbHandle, peer: &str, head: Seq, pieces: Vec<Vec<u8>>) -> Result<ApplyOutcome, DbError> {
    static CHAIN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1000);
    let chain = ApplyChain(CHAIN.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    let mut pending = Vec::new();
    for (i, p) in pieces.into_iter().enumerate() {
        pending.push(db.queue_snapshot_part(chain, i == 0, p).await.unwrap());
    }
    let load = db.queue_snapshot_load(chain, peer.into(), head).await.unwrap();
    for p in pending {
        p.await?;
    }
    load.await
}

/// Names of the files in `dir`.
fn files_in(dir: &tempfile::TempDir) -> BTreeSet<String> {
    std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect()
}

/// A database of node "a" with 3,000 live sessions, some updated, and 100 ended.
async fn a_with_history(dir: &tempfile::TempDir) -> DbHandle {
    let a = open(dir, "a");
    for chunk in 0..3 {
        let ws = (0..1000)
            .map(|i| Write::Upsert(session(&format!("s{chunk}-{i:04}"), &format!("u{}", i % 70), "ag1", i)))
            .collect();
        a.write_batch(ws).await.unwrap();
    }
    let mut s = session("s1-0007", "u7", "ag1", 7);
    s.status = SessionStatus::Disconnected;
    s.client_params = vec![("lang".into(), "sv".into())];
    a.write(Write::Upsert(s)).await.unwrap();
    a.write_batch((0..100).map(|i| Write::Delete(SessionId(format!("s2-{i:04}")))).collect()).await.unwrap();
    a
}

#[tokio::test]
async fn a_snapshot_file_loads_into_an_empty_database_as_stored() {
    let (da, dbb) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = a_with_history(&da).await;
    let b = open(&dbb, "b");
    let (head, db_id, total, pieces) = snapshot_file_of(&a).await;
    assert_eq!(total, 3000);
    assert!(pieces.len() > 1, "cut into pieces: {}", pieces.len());
    assert_eq!(files_in(&da), files_in(&da).into_iter().filter(|f| !f.contains("snapshot")).collect());
    let out = load_file(&b, &db_id, head, pieces).await.unwrap();
    assert_eq!(out.applied, 3000);
    assert_eq!(a.digest().await.unwrap(), b.digest().await.unwrap());
    assert_eq!(b.peer_position(&db_id).await.unwrap(), Some(head));
    let st = b.status().await.unwrap();
    assert_eq!((st.sessions, st.tombstones), (2900, 100));
    assert_eq!(st.head, Seq::ZERO, "nothing of the peer's goes into this node's own log");
    // The indexes came with the rows: lookups by user and by agent find them.
    let by_user = b.list(&SessionFilter { user: Some("u7".into()), ..Default::default() }).await.unwrap();
    assert_eq!(
        by_user.len(),
        a.list(&SessionFilter { user: Some("u7".into()), ..Default::default() }).await.unwrap().len()
    );
    assert!(by_user.iter().any(|s| s.client_params == vec![("lang".to_string(), "sv".to_string())]));
    // The clock follows the peer's, and new writes go on from there.
    let c = b.write(Write::Upsert(session("zz-new", "u1", "ag1", 900))).await.unwrap();
    assert!(c.version.hlc > a.status().await.unwrap().hlc);
    assert!(
        !files_in(&dbb).iter().any(|f| f.contains("snapshot")),
        "the file received is removed: {:?}",
        files_in(&dbb)
    );
    // A database opened again holds the same.
    let digest = b.digest().await.unwrap();
    b.close().await.unwrap();
    let b = open(&dbb, "b");
    assert_eq!(b.digest().await.unwrap(), digest);
}

#[tokio::test]
async fn a_snapshot_file_merges_into_a_database_that_holds_sessions() {
    let (da, dbb) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = a_with_history(&da).await;
    let b = open(&dbb, "b");
    // B's own session, and a newer version of one of A's.
    b.write(Write::Upsert(session("b-own", "u1", "ag2", 3))).await.unwrap();
    let (head, db_id, _, pieces) = snapshot_file_of(&a).await;
    let theirs = a.record(&SessionId("s0-0001".into())).await.unwrap().unwrap();
    b.apply_remote_with(db_id.clone(), vec![theirs], PositionUpdate::Keep).await.unwrap();
    let mut newer = session("s0-0001", "u1", "ag1", 1);
    newer.status = SessionStatus::Unreachable;
    b.write(Write::Upsert(newer.clone())).await.unwrap();
    let out = load_file(&b, &db_id, head, pieces).await.unwrap();
    assert_eq!((out.applied, out.skipped), (2999, 1));
    assert_eq!(b.get(&SessionId("s0-0001".into())).await.unwrap(), Some(newer));
    assert!(b.get(&SessionId("b-own".into())).await.unwrap().is_some());
    let st = b.status().await.unwrap();
    assert_eq!((st.sessions, st.tombstones), (2901, 100));
    assert_eq!(b.peer_position(&db_id).await.unwrap(), Some(head));
}

#[tokio::test]
async fn a_snapshot_file_that_cannot_be_loaded_changes_nothing() {
    let (da, dbb) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = a_with_history(&da).await;
    let b = open(&dbb, "b");
    let (head, db_id, _, pieces) = snapshot_file_of(&a).await;
    let whole: Vec<u8> = pieces.concat();
    let expect_invalid = |r: Result<ApplyOutcome, DbError>, what: &str| match r {
        Err(e @ DbError::InvalidSnapshot { .. }) => assert!(e.to_string().contains(what), "{e}"),
        other => panic!("expected an invalid snapshot ({what}), got {other:?}"),
    };
    // Not an SQLite file at all.
    expect_invalid(load_file(&b, &db_id, head, vec![b"not a database".repeat(400)]).await, "");
    // Cut short: the end of the file missing.
    expect_invalid(load_file(&b, &db_id, head, vec![whole[..whole.len() / 2].to_vec()]).await, "");
    // A row this build cannot read, and one of another layout.
    let edited = |sql: &str| {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.db");
        std::fs::write(&p, &whole).unwrap();
        raw_open(&p).unwrap().execute_batch(sql).unwrap();
        std::fs::read(&p).unwrap()
    };
    let bad_status = edited("UPDATE sessions SET status = 'sleeping' WHERE id = 's1-0500'");
    expect_invalid(load_file(&b, &db_id, head, vec![bad_status]).await, "session s1-0500: ");
    let bad_command = edited("UPDATE sessions SET command = '{\"a\": 1}' WHERE id = 's0-0003'");
    expect_invalid(load_file(&b, &db_id, head, vec![bad_command]).await, "command is not a json list");
    let body_on_tomb = edited("UPDATE sessions SET user = 'x' WHERE id = 's2-0001'");
    expect_invalid(load_file(&b, &db_id, head, vec![body_on_tomb]).await, "a tombstone with a session body");
    let other_layout = edited("ALTER TABLE sessions ADD COLUMN extra TEXT");
    expect_invalid(load_file(&b, &db_id, head, vec![other_layout]).await, "other columns");
    // A part that does not start a file.
    let r = b.queue_snapshot_part(ApplyChain(9), false, vec![1, 2, 3]).await.unwrap().await;
    expect_invalid(r, "without its start");
    // Nothing of any of them was applied.
    let st = b.status().await.unwrap();
    assert_eq!((st.sessions, st.tombstones), (0, 0));
    assert_eq!(b.peer_position(&db_id).await.unwrap(), None);
    assert!(!files_in(&dbb).iter().any(|f| f.contains("snapshot")), "{:?}", files_in(&dbb));
    // The same file whole loads afterwards.
    load_file(&b, &db_id, head, pieces).await.unwrap();
    assert_eq!(a.digest().await.unwrap(), b.digest().await.unwrap());
}

#[tokio::test]
async fn damaged_snapshot_files_are_refused_or_loaded_whole_never_half() {
    use rand::{Rng, SeedableRng};
    let da = tempfile::tempdir().unwrap();
    let a = a_with_history(&da).await;
    let (head, db_id, _, pieces) = snapshot_file_of(&a).await;
    let whole: Vec<u8> = pieces.concat();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(20261205);
    let (mut refused, mut loaded) = (0, 0);
    for round in 0..40 {
        let mut file = whole.clone();
        // A few bytes changed anywhere, or a run of them zeroed, or the tail cut.
        match round % 3 {
            0 => {
                for _ in 0..rng.gen_range(1..8) {
                    let i = rng.gen_range(0..file.len());
                    file[i] = rng.gen();
                }
            }
            1 => {
                let i = rng.gen_range(0..file.len() - 4096);
                file[i..i + 4096].fill(0);
            }
            _ => file.truncate(rng.gen_range(0..file.len())),
        }
        let dbb = tempfile::tempdir().unwrap();
        let b = open(&dbb, "b");
        match load_file(&b, &db_id, head, vec![file]).await {
            Ok(_) => {
                loaded += 1;
                // Loaded whole: what the node counts is what its table holds.
                let st = b.status().await.unwrap();
                let all = b.export_records().await.unwrap();
                assert_eq!(st.sessions + st.tombstones, all.len() as u64);
                assert_eq!(b.peer_position(&db_id).await.unwrap(), Some(head));
            }
            Err(DbError::InvalidSnapshot { .. }) | Err(DbError::Sqlite { .. }) | Err(DbError::Corrupt { .. }) => {
                refused += 1;
                let st = b.status().await.unwrap();
                assert_eq!((st.sessions, st.tombstones), (0, 0), "round {round}: refused, yet rows stayed");
                assert_eq!(b.peer_position(&db_id).await.unwrap(), None);
            }
            Err(e) => panic!("round {round}: unexpected error {e}"),
        }
        b.close().await.unwrap();
    }
    assert!(refused > 0, "some damage is noticed ({loaded} loaded)");
}

/// A full resync of 100,000 sessions sent as a file (see `resync_of_100k_sessions`).
/// Run with `cargo test --release --lib db::tests::resync_file_of_100k -- --ignored --nocapture`.
#[tokio::test]
#[ignore = "measurement; run explicitly, preferably in release"]
async fn resync_file_of_100k_sessions() {
    let (da, dbb) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = open(&da, "a");
    let b = open(&dbb, "b");
    fill_100k(&a).await;
    let t = std::time::Instant::now();
    let (head, db_id, _, pieces) = snapshot_file_of(&a).await;
    let bytes: usize = pieces.iter().map(Vec::len).sum();
    println!("snapshot file of 100k: {bytes} bytes, {:?}", t.elapsed());
    let t = std::time::Instant::now();
    load_file(&b, &db_id, head, pieces).await.unwrap();
    println!("load into an empty node: {:?}", t.elapsed());
    assert_eq!(a.digest().await.unwrap(), b.digest().await.unwrap());
}
