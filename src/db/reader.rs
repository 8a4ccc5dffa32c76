//! Reads on connections of their own: whole-database reads (snapshots, digests), the
//! change log a peer catches up from, and the point reader.
//!
//! Owns: short-lived reader threads, each with a read-only connection and one read
//! transaction. WAL gives each of them one consistent state while the owner keeps
//! committing, so a 100,000-session snapshot neither stalls writes nor has to sit in
//! memory at once: chunks go out through a channel of two, at the pace of the consumer.
//! Also the point reader: one long-lived thread with one read-only connection that serves
//! short reads of committed rows, so that they never wait behind the owner's commit (with
//! FULL, its fsync).
//! Must never: write, read `meta` and `sessions` in different transactions, or let out what
//! it read before `Durable::settle` said it is on disk.

use std::io::Read as _;
use std::path::{Path, PathBuf};

use rusqlite::Connection;
use sha2::{Digest as _, Sha256};
use tokio::sync::{mpsc, oneshot};

use super::flush::Durable;
use super::store;
use super::{Change, DbError, LogRead, SqlContext};
use crate::model::{Record, Seq};

/// A short read of committed rows, run on the point reader's connection.
pub(super) type PointJob = Box<dyn FnOnce(&Connection, &Path) + Send>;

/// Thread body of the point reader: runs `jobs` one after another on `conn` until every
/// sender is gone. Each statement reads the state of the last commit (autocommit: one read
/// transaction per statement).
pub(super) fn serve_points(conn: Connection, path: PathBuf, mut jobs: mpsc::Receiver<PointJob>) {
    while let Some(job) = jobs.blocking_recv() {
        job(&conn, &path);
    }
}

/// Head, database id and record count of a snapshot, sent before its chunks.
pub(super) type Header = Result<(Seq, String, u64), DbError>;

/// Thread body of a snapshot stream.
pub(super) fn stream(
    path: PathBuf,
    chunk: usize,
    durable: &Durable,
    header: oneshot::Sender<Header>,
    out: mpsc::Sender<Result<Vec<Record>, DbError>>,
) {
    let mut header = Some(header);
    let res = (|| {
        let mut conn = super::schema::open_reader(&path)?;
        let tx = conn.transaction().ctx("begin a snapshot")?;
        let (head, db_id, total) = read_header(&tx)?;
        // The transaction's view is fixed by the read above; none of it leaves before it is
        // on disk (with FULL, commits are flushed after they become visible: `flush.rs`).
        durable.settle()?;
        let sent = header.take().map(|h| h.send(Ok((head, db_id, total))).is_ok());
        if sent != Some(true) {
            return Ok(());
        }
        let mut buf = Vec::with_capacity(chunk);
        let mut stopped = false;
        each_record(&tx, &path, Order::Storage, |r| {
            buf.push(r);
            if buf.len() >= chunk {
                let full = std::mem::replace(&mut buf, Vec::with_capacity(chunk));
                if out.blocking_send(Ok(full)).is_err() {
                    stopped = true;
                }
            }
            !stopped
        })?;
        if !buf.is_empty() && !stopped {
            let _ = out.blocking_send(Ok(buf));
        }
        Ok(())
    })();
    if let Err(e) = res {
        match header.take() {
            Some(h) => drop(h.send(Err(e))),
            None => drop(out.blocking_send(Err(e))),
        }
    }
}

/// SHA-256 (hex) over every record in id order, each field length-prefixed.
pub(super) fn digest(conn: &mut Connection, path: &Path) -> Result<String, DbError> {
    fn field(h: &mut Sha256, b: &[u8]) {
        h.update((b.len() as u64).to_le_bytes());
        h.update(b);
    }
    let tx = conn.transaction().ctx("begin a digest")?;
    let mut h = Sha256::new();
    let mut body = Vec::new();
    each_record(&tx, path, Order::Id, |r| {
        field(&mut h, r.id.0.as_bytes());
        h.update(r.version.hlc.wall_ms.to_le_bytes());
        h.update(r.version.hlc.logical.to_le_bytes());
        field(&mut h, r.version.node.0.as_bytes());
        match &r.session {
            None => h.update([1u8]),
            Some(s) => {
                h.update([0u8]);
                body.clear();
                // Writing plain data into a Vec cannot fail.
                let _ = serde_json::to_writer(&mut body, s);
                field(&mut h, &body);
            }
        }
        true
    })?;
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Up to `limit` changes with `seq > after`, or `Truncated` when the log no longer reaches
/// back to `after + 1` (or `after` is beyond the head): the head, the oldest change and the
/// changes read in one transaction.
pub(super) fn changes_since(conn: &mut Connection, path: &Path, after: Seq, limit: usize) -> Result<LogRead, DbError> {
    let tx = conn.transaction().ctx("begin a change-log read")?;
    let head = store::read_meta(&tx)?.head;
    let oldest = store::oldest_change(&tx, head)?;
    if after > head || after.0 + 1 < oldest.0 {
        return Ok(LogRead::Truncated { oldest });
    }
    let mut stmt = tx
        .prepare("SELECT seq, record FROM changelog WHERE seq > ?1 ORDER BY seq LIMIT ?2")
        .ctx("prepare a change-log read")?;
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let rows = stmt
        .query_map([after.0 as i64, limit], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))
        .ctx("read the change log")?;
    let mut out = Vec::new();
    for row in rows {
        let (seq, body) = row.ctx("read the change log")?;
        let record: Record = serde_json::from_str(&body).map_err(|e| DbError::Corrupt {
            path: path.to_path_buf(),
            detail: format!("change {seq} cannot be decoded: {e}"),
        })?;
        out.push(Change { seq: Seq(seq as u64), record });
    }
    Ok(LogRead::Changes(out))
}

fn read_header(conn: &Connection) -> Result<(Seq, String, u64), DbError> {
    let meta = store::read_meta(conn)?;
    let total: i64 = conn.query_row("SELECT count(*) FROM sessions", [], |r| r.get(0)).ctx("count the snapshot")?;
    Ok((meta.head, meta.db_id, total as u64))
}

enum Order {
    /// Sorted by session id (for digests, which must not depend on storage).
    Id,
    /// As stored: a sequential scan, the fastest way through the table.
    Storage,
}

/// Calls `f` with every record until it returns false.
fn each_record(conn: &Connection, path: &Path, order: Order, mut f: impl FnMut(Record) -> bool) -> Result<(), DbError> {
    let order = match order {
        Order::Id => " ORDER BY id",
        Order::Storage => "",
    };
    let mut stmt =
        conn.prepare(&format!("SELECT {} FROM sessions{order}", store::COLUMNS)).ctx("prepare a full read")?;
    let rows = stmt.query_map([], store::raw_from_row).ctx("read every session")?;
    for raw in rows {
        if !f(raw.ctx("read every session")?.into_record(path)?) {
            break;
        }
    }
    Ok(())
}

/// Thread body of a snapshot sent as a file: copies `sessions` (rows and indexes, as
/// stored) into a new SQLite file next to the database, in the read transaction that also
/// reads the header, then hands the file out in pieces of `piece` bytes and removes it.
///
/// The copy is one `INSERT INTO … SELECT *` between tables of the same definition, which
/// SQLite carries out by copying each row's and each index entry's bytes as they are
/// (its transfer optimisation) rather than decoding and encoding every row: the receiver
/// loads the file the same way (`owner.rs`).
pub(super) fn stream_file(
    path: PathBuf,
    piece: usize,
    durable: &Durable,
    header: oneshot::Sender<Header>,
    out: mpsc::Sender<Result<Vec<u8>, DbError>>,
) {
    let file = super::schema::snapshot_out_path(&path);
    let mut header = Some(header);
    let res = (|| {
        let conn = super::schema::open_snapshot_builder(&path, &file)?;
        conn.execute_batch("BEGIN").ctx("begin a snapshot")?;
        let (head, db_id, total) = read_header(&conn)?;
        durable.settle()?;
        let sent = header.take().map(|h| h.send(Ok((head, db_id, total))).is_ok());
        if sent != Some(true) {
            return Ok(());
        }
        let copied =
            conn.execute("INSERT INTO snap.sessions SELECT * FROM main.sessions", []).ctx("copy the sessions")?;
        conn.execute_batch("COMMIT").ctx("end a snapshot")?;
        if copied as u64 != total {
            return Err(DbError::Corrupt {
                path: path.clone(),
                detail: format!("the snapshot copied {copied} sessions, its header counted {total}"),
            });
        }
        conn.execute_batch("DETACH snap").ctx("close the snapshot file")?;
        drop(conn);
        let mut f = std::fs::File::open(&file)
            .map_err(|source| DbError::Io { context: format!("open {}", file.display()), source })?;
        // Gone from the directory already; the open descriptor keeps it readable.
        let _ = std::fs::remove_file(&file);
        loop {
            let mut buf = Vec::with_capacity(piece);
            let n = std::io::Read::by_ref(&mut f)
                .take(piece as u64)
                .read_to_end(&mut buf)
                .map_err(|source| DbError::Io { context: format!("read {}", file.display()), source })?;
            if n == 0 || out.blocking_send(Ok(buf)).is_err() {
                return Ok(());
            }
        }
    })();
    let _ = std::fs::remove_file(&file);
    if let Err(e) = res {
        match header.take() {
            Some(h) => drop(h.send(Err(e))),
            None => drop(out.blocking_send(Err(e))),
        }
    }
}

/// SQLite's structural check of a snapshot file received from the peer, and the check of
/// its every row ([`store::first_unreadable_row`]), on a read-only connection of its own:
/// why the file must not be loaded, if it must not.
pub(super) fn check_snapshot_file(file: &Path) -> Result<(), String> {
    let conn = super::schema::open_read_only(file).map_err(|e| format!("cannot open it ({e})"))?;
    let check: Vec<String> = conn
        .prepare("PRAGMA quick_check(5)")
        .and_then(|mut st| st.query_map([], |r| r.get::<_, String>(0))?.collect())
        .map_err(|e| format!("sqlite cannot check it ({e})"))?;
    if check != ["ok"] {
        return Err(format!("sqlite's check of it failed: {}", check.join("; ")));
    }
    match store::first_unreadable_row(&conn) {
        Ok(None) => Ok(()),
        Ok(Some((id, reason))) => Err(format!("session {id}: {reason}")),
        Err(e) => Err(format!("its rows cannot be checked ({e})")),
    }
}
