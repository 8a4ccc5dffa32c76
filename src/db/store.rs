//! Rows and statements: how a [`Record`] maps to the `sessions` table and back.
//!
//! Owns: the column order, the encoding of each field, and the SQL text of every
//! statement the owner runs. Must never: start or end a transaction (the owner decides
//! where transactions begin and end).
//!
//! Encoding: `u64` values (times, clock) are stored as the same 64 bits in an INTEGER, so
//! no value is lost; SQL never orders by them except `tombstone_at_ms` in `gc`.
//! `command` and `client_params` are JSON text. Tombstones keep every body column NULL.

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension, Row, ToSql};

use super::{DbError, SessionFilter, SqlContext};
use crate::model::{Hlc, NodeId, Record, Seq, Session, SessionId, SessionStatus, Version};

/// Every column of `sessions`, in the order [`record_from_row`] reads them.
pub(super) const COLUMNS: &str = "id, user, subcluster, agent, agent_address, display, vnc_port, \
     status, created_ms, last_connect_ms, last_client_address, pid, command, geometry, \
     client_params, hlc_wall, hlc_logical, origin, tombstone, base_wall, base_logical, base_origin";

/// Previous state of a row, as far as a write needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Stored {
    pub version: Version,
    pub tombstone: bool,
    /// The indexed columns of a live session (`None` for a tombstone or an incomplete row).
    pub live: Option<LiveKeys>,
}

/// The columns of a live row that the secondary indexes hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct LiveKeys {
    /// With `user`: what the in-memory users-per-agent count must forget when the row changes.
    pub agent: String,
    pub user: String,
    pub subcluster: String,
    pub display: i64,
}

impl Stored {
    /// Whether writing `s` over this row leaves every secondary index as it is.
    fn same_index_keys(&self, s: &Session) -> bool {
        self.live.as_ref().is_some_and(|k| {
            k.agent == s.agent && k.user == s.user && k.subcluster == s.subcluster && k.display == s.display as i64
        })
    }
}

pub(super) fn stored(conn: &Connection, id: &SessionId) -> Result<Option<Stored>, DbError> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT hlc_wall, hlc_logical, origin, tombstone, agent, user, subcluster, display
             FROM sessions WHERE id = ?1",
        )
        .ctx("prepare a version lookup")?;
    stmt.query_row([&id.0], |r| {
        let tombstone = r.get::<_, i64>(3)? != 0;
        let keys = (r.get::<_, Option<String>>(4)?, r.get(5)?, r.get(6)?, r.get::<_, Option<i64>>(7)?);
        let live = match keys {
            (Some(agent), Some(user), Some(subcluster), Some(display)) if !tombstone => {
                Some(LiveKeys { agent, user, subcluster, display })
            }
            _ => None,
        };
        Ok(Stored { version: Version { hlc: hlc_at(r, 0)?, node: NodeId(r.get(2)?) }, tombstone, live })
    })
    .optional()
    .ctx("look up a version")
}

pub(super) fn load(conn: &Connection, path: &Path, id: &SessionId) -> Result<Option<Record>, DbError> {
    let mut stmt =
        conn.prepare_cached(&format!("SELECT {COLUMNS} FROM sessions WHERE id = ?1")).ctx("prepare a record lookup")?;
    let row = stmt.query_row([&id.0], raw_from_row).optional().ctx("read a record")?;
    row.map(|r| r.into_record(path)).transpose()
}

/// The full write of a row: insert, or replace every column. Parameters: `?1` to `?23` in
/// the order of the column list.
const UPSERT: &str = "INSERT INTO sessions (id, user, subcluster, agent, agent_address, display, vnc_port,
         status, created_ms, last_connect_ms, last_client_address, pid, command, geometry,
         client_params, hlc_wall, hlc_logical, origin, tombstone, tombstone_at_ms,
         base_wall, base_logical, base_origin)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17,
         ?18, ?19, ?20, ?21, ?22, ?23)
     ON CONFLICT(id) DO UPDATE SET
         user = excluded.user, subcluster = excluded.subcluster, agent = excluded.agent,
         agent_address = excluded.agent_address, display = excluded.display,
         vnc_port = excluded.vnc_port, status = excluded.status,
         created_ms = excluded.created_ms, last_connect_ms = excluded.last_connect_ms,
         last_client_address = excluded.last_client_address, pid = excluded.pid,
         command = excluded.command, geometry = excluded.geometry,
         client_params = excluded.client_params, hlc_wall = excluded.hlc_wall,
         hlc_logical = excluded.hlc_logical, origin = excluded.origin,
         tombstone = excluded.tombstone, tombstone_at_ms = excluded.tombstone_at_ms,
         base_wall = excluded.base_wall, base_logical = excluded.base_logical,
         base_origin = excluded.base_origin";

/// The narrow write of a live row whose indexed columns (user, subcluster, agent, display,
/// tombstone and its time) stay as they are: the same parameters as [`UPSERT`], of which it
/// leaves those unused.
const UPDATE_IN_PLACE: &str = "UPDATE sessions SET agent_address = ?5, vnc_port = ?7, status = ?8,
         created_ms = ?9, last_connect_ms = ?10, last_client_address = ?11, pid = ?12,
         command = ?13, geometry = ?14, client_params = ?15, hlc_wall = ?16, hlc_logical = ?17,
         origin = ?18, base_wall = ?21, base_logical = ?22, base_origin = ?23
     WHERE id = ?1 AND ?2 IS user AND ?3 IS subcluster AND ?4 IS agent AND ?6 IS display
         AND ?19 = tombstone AND ?20 IS tombstone_at_ms";

/// The full insert of a row no other row has the id of: the same parameters as [`UPSERT`].
/// A row already there makes it fail (the unique id), never overwrite.
const INSERT: &str = "INSERT INTO sessions (id, user, subcluster, agent, agent_address, display, vnc_port,
         status, created_ms, last_connect_ms, last_client_address, pid, command, geometry,
         client_params, hlc_wall, hlc_logical, origin, tombstone, tombstone_at_ms,
         base_wall, base_logical, base_origin)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17,
         ?18, ?19, ?20, ?21, ?22, ?23)";

/// Inserts or replaces the row of `rec.id` with `rec`; `prior` is the row as [`stored`]
/// read it in this transaction.
///
/// A live session whose indexed columns (user, subcluster, agent, display, and being live)
/// stay as they are is written by an `UPDATE` of the other columns only, so SQLite leaves
/// the secondary indexes alone: most writes (a status change, a reconnect, a replicated
/// copy of one) then dirty only the row's own page instead of one page per index as well,
/// which is fewer pages in the write-ahead log to write, checksum and sync on each commit.
/// Anything else (a new row, a moved or ended session) takes the full upsert.
pub(super) fn put(conn: &Connection, rec: &Record, prior: Option<&Stored>) -> Result<(), DbError> {
    with_params(rec, |params| {
        if let (Some(s), Some(p)) = (&rec.session, prior) {
            if p.same_index_keys(s) {
                let mut stmt = conn.prepare_cached(UPDATE_IN_PLACE).ctx("prepare a session update")?;
                // The row was read in this transaction, so the update finds it; were it
                // ever not there (or not as read), the upsert writes it whole.
                if stmt.execute(params).ctx("update a session")? == 1 {
                    return Ok(());
                }
            }
        }
        let mut stmt = conn.prepare_cached(UPSERT).ctx("prepare a session upsert")?;
        stmt.execute(params).ctx("store a session")?;
        Ok(())
    })
}

/// Inserts `recs`, none of whose ids has a row: one statement prepared for all of them, and
/// no lookup before each (the caller knows the ids are new; were one not, the insert fails
/// and the caller's transaction with it).
pub(super) fn insert_new(conn: &Connection, recs: &[&Record]) -> Result<(), DbError> {
    let mut stmt = conn.prepare_cached(INSERT).ctx("prepare a session insert")?;
    for rec in recs {
        with_params(rec, |params| stmt.execute(params).map(drop).ctx("insert a session"))?;
    }
    Ok(())
}

/// Calls `f` with the 23 parameters of [`UPSERT`] for `rec`.
fn with_params<T>(rec: &Record, f: impl FnOnce(&[&dyn ToSql]) -> Result<T, DbError>) -> Result<T, DbError> {
    let v = &rec.version;
    let (wall, logical, origin) = (v.hlc.wall_ms as i64, v.hlc.logical as i64, &v.node.0);
    let b = rec.base.as_ref();
    let (base_wall, base_logical, base_origin) =
        (b.map(|b| b.hlc.wall_ms as i64), b.map(|b| b.hlc.logical as i64), b.map(|b| b.node.0.as_str()));
    let Some(s) = &rec.session else {
        // A tombstone: every body column (`?2` to `?15`) NULL.
        let null: Option<&str> = None;
        let mut tombstone: Vec<&dyn ToSql> = vec![&rec.id.0];
        tombstone.extend([&null as &dyn ToSql; 14]);
        tombstone.extend::<[&dyn ToSql; 8]>([
            &wall,
            &logical,
            origin,
            &1i64,
            &wall,
            &base_wall,
            &base_logical,
            &base_origin,
        ]);
        return f(&tombstone);
    };
    let command = json(&s.command)?;
    let client_params = json(&s.client_params)?;
    f(params![
        rec.id.0,
        s.user,
        s.subcluster,
        s.agent,
        s.agent_address,
        s.display as i64,
        s.vnc_port as i64,
        s.status.as_str(),
        s.created_ms as i64,
        s.last_connect_ms as i64,
        s.last_client_address,
        s.pid as i64,
        command,
        s.geometry,
        client_params,
        wall,
        logical,
        origin,
        0i64,
        None::<i64>,
        base_wall,
        base_logical,
        base_origin,
    ])
}

/// What the owner keeps in memory about `sessions`, read in one scan of the table.
pub(super) struct TableStats {
    pub live: u64,
    pub tombs: u64,
    /// The greatest id (byte-wise, as SQLite compares them).
    pub greatest: Option<SessionId>,
    /// The highest version stored.
    pub newest: Option<Hlc>,
    pub per_agent: UsersPerAgent,
}

/// Counts, greatest id, newest version and users per agent of `sessions` in one pass over
/// the table: after a snapshot file's rows were copied in, this took 35 ms for 100,000
/// sessions where the four separate queries took 120 (the users-per-agent one alone 85: it
/// walks an index and looks up every row).
pub(super) fn table_stats(conn: &Connection) -> Result<TableStats, DbError> {
    let mut stmt = conn
        .prepare_cached("SELECT id, tombstone, agent, user, hlc_wall, hlc_logical FROM sessions")
        .ctx("prepare a scan of the sessions")?;
    let mut rows = stmt.query([]).ctx("scan the sessions")?;
    let mut st = TableStats { live: 0, tombs: 0, greatest: None, newest: None, per_agent: UsersPerAgent::default() };
    let mut greatest: Option<String> = None;
    // Text columns read in place, without a copy.
    fn text<'r>(r: &'r Row<'_>, i: usize) -> Result<Option<&'r str>, DbError> {
        r.get_ref(i).ctx("scan the sessions")?.as_str_or_null().map_err(|e| {
            DbError::sqlite(
                "scan the sessions",
                rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, Box::new(e)),
            )
        })
    }
    while let Some(r) = rows.next().ctx("scan the sessions")? {
        let id = text(r, 0)?.unwrap_or_default();
        if greatest.as_deref().map_or(true, |g| id > g) {
            greatest = Some(id.to_string());
        }
        let hlc = hlc_at(r, 4).ctx("scan the sessions")?;
        if st.newest.map_or(true, |n| hlc > n) {
            st.newest = Some(hlc);
        }
        if r.get::<_, i64>(1).ctx("scan the sessions")? != 0 {
            st.tombs += 1;
            continue;
        }
        st.live += 1;
        if let (Some(agent), Some(user)) = (text(r, 2)?, text(r, 3)?) {
            let users = match st.per_agent.get_mut(agent) {
                Some(u) => u,
                None => st.per_agent.entry(agent.to_string()).or_default(),
            };
            match users.get_mut(user) {
                Some(n) => *n = n.saturating_add(1),
                None => {
                    users.insert(user.to_string(), 1);
                }
            }
        }
    }
    st.greatest = greatest.map(SessionId);
    Ok(st)
}

/// The first row of `sessions` that a read would refuse ([`RawRow::into_record`]), or
/// whose tombstone is not as [`put`] writes one, with the reason: what a snapshot file from
/// the peer is checked with before its rows count. Each column is checked as a read decodes
/// it, so no row that passes can fail a read later (text that is not UTF-8, a list that is
/// not one, a number out of range), without decoding the row into a record (which cost
/// three times as much: 270 against 90 ms for 100,000 sessions).
pub(super) fn first_unreadable_row(conn: &Connection) -> rusqlite::Result<Option<(String, String)>> {
    use rusqlite::types::ValueRef;
    let mut stmt = conn.prepare(&format!("SELECT {COLUMNS}, tombstone_at_ms FROM sessions"))?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        if let Some(problem) = row_problem(r)? {
            let id = match r.get_ref(0)? {
                ValueRef::Text(t) => String::from_utf8_lossy(t).into_owned(),
                other => format!("{other:?}"),
            };
            return Ok(Some((id, problem.to_string())));
        }
    }
    Ok(None)
}

/// Why a read would refuse the row `r` (columns as [`COLUMNS`], then `tombstone_at_ms`).
fn row_problem(r: &Row<'_>) -> rusqlite::Result<Option<&'static str>> {
    use rusqlite::types::ValueRef;
    /// Text (valid UTF-8), or NULL when `null_ok`.
    fn text<'a>(v: ValueRef<'a>, null_ok: bool) -> Result<Option<&'a str>, ()> {
        match v {
            ValueRef::Text(t) => std::str::from_utf8(t).map(Some).map_err(drop),
            ValueRef::Null if null_ok => Ok(None),
            _ => Err(()),
        }
    }
    /// An integer within `lo..=hi`, or NULL when `null_ok`.
    fn int(v: ValueRef<'_>, lo: i64, hi: i64, null_ok: bool) -> Result<Option<i64>, ()> {
        match v {
            ValueRef::Integer(i) if (lo..=hi).contains(&i) => Ok(Some(i)),
            ValueRef::Null if null_ok => Ok(None),
            _ => Err(()),
        }
    }
    let c = |i: usize| r.get_ref(i);
    let u32_max = i64::from(u32::MAX);
    if text(c(0)?, false).is_err() || text(c(17)?, false).is_err() {
        return Ok(Some("its id or origin is not text"));
    }
    if int(c(15)?, 0, i64::MAX, false).is_err()
        || int(c(16)?, 0, u32_max, false).is_err()
        || int(c(19)?, 0, i64::MAX, true).is_err()
        || int(c(20)?, 0, u32_max, true).is_err()
        || text(c(21)?, true).is_err()
    {
        return Ok(Some("a version is not readable"));
    }
    let tombstone = match c(18)? {
        ValueRef::Integer(0) => false,
        ValueRef::Integer(1) => true,
        _ => return Ok(Some("tombstone is neither 0 nor 1")),
    };
    let at = c(22)?;
    if tombstone {
        if (1..=14).map(c).collect::<rusqlite::Result<Vec<_>>>()?.iter().any(|v| !matches!(v, ValueRef::Null)) {
            return Ok(Some("a tombstone with a session body"));
        }
        return Ok((!matches!(at, ValueRef::Integer(_))).then_some("a tombstone without its time"));
    }
    if !matches!(at, ValueRef::Null) {
        return Ok(Some("a live session with a tombstone time"));
    }
    // user, subcluster, agent, agent_address, last_client_address, geometry
    if [1, 2, 3, 4, 10, 13].into_iter().map(|i| c(i).map(|v| text(v, false).is_err())).any(|bad| bad.unwrap_or(true)) {
        return Ok(Some("a live session with a text field missing or not UTF-8"));
    }
    if int(c(5)?, 0, u32_max, false).is_err()
        || int(c(6)?, 0, i64::from(u16::MAX), false).is_err()
        || int(c(8)?, i64::MIN, i64::MAX, false).is_err()
        || int(c(9)?, i64::MIN, i64::MAX, false).is_err()
        || int(c(11)?, 0, u32_max, false).is_err()
    {
        return Ok(Some("a live session with a number missing or out of range"));
    }
    match text(c(7)?, false) {
        Ok(Some(status)) if SessionStatus::parse(status).is_some() => {}
        _ => return Ok(Some("unknown status")),
    }
    let json_ok = |i: usize, check: fn(&str) -> bool| -> rusqlite::Result<bool> {
        Ok(matches!(text(c(i)?, false), Ok(Some(t)) if check(t)))
    };
    if !json_ok(12, |t| serde_json::from_str::<json_check::Strings>(t).is_ok())? {
        return Ok(Some("command is not a json list of strings"));
    }
    if !json_ok(14, |t| serde_json::from_str::<json_check::Pairs>(t).is_ok())? {
        return Ok(Some("client_params is not a json list of pairs of strings"));
    }
    Ok(None)
}

/// Checks that JSON text decodes as the lists a session holds, without keeping anything:
/// every string is looked at where it lies (or in the parser's scratch space).
mod json_check {
    use serde::de::{Deserialize, Deserializer, Error, SeqAccess, Visitor};
    use std::fmt;

    /// A string, discarded.
    pub(super) struct Str;
    impl<'de> Deserialize<'de> for Str {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Str;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("a string")
                }
                fn visit_str<E: Error>(self, _: &str) -> Result<Str, E> {
                    Ok(Str)
                }
            }
            d.deserialize_str(V)
        }
    }

    /// A list whose every element checks as `T`, kept nowhere.
    pub(super) struct ListOf<T>(std::marker::PhantomData<T>);
    impl<'de, T: Deserialize<'de>> Deserialize<'de> for ListOf<T> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V<T>(std::marker::PhantomData<T>);
            impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
                type Value = ListOf<T>;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("a list")
                }
                fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ListOf<T>, A::Error> {
                    while seq.next_element::<T>()?.is_some() {}
                    Ok(ListOf(std::marker::PhantomData))
                }
            }
            d.deserialize_seq(V(std::marker::PhantomData))
        }
    }

    /// A list of strings (as `Vec<String>` decodes).
    pub(super) type Strings = ListOf<Str>;

    /// A list of pairs of strings (as `Vec<(String, String)>` decodes).
    pub(super) type Pairs = ListOf<(Str, Str)>;

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn the_checks_accept_what_the_session_fields_decode_and_nothing_else() {
            for (json, strings, pairs) in [
                (r#"[]"#, true, true),
                (r#"["a", "b\u00e9\n"]"#, true, false),
                (r#"[["k", "v"], ["x", ""]]"#, false, true),
                (r#"[["k"]]"#, false, false),
                (r#"[["k", "v", "w"]]"#, false, false),
                (r#"[1]"#, false, false),
                (r#"{"a": "b"}"#, false, false),
                (r#"["a""#, false, false),
                (r#""a""#, false, false),
            ] {
                assert_eq!(serde_json::from_str::<Strings>(json).is_ok(), strings, "{json}");
                assert_eq!(serde_json::from_str::<Vec<String>>(json).is_ok(), strings, "{json}");
                assert_eq!(serde_json::from_str::<Pairs>(json).is_ok(), pairs, "{json}");
                assert_eq!(serde_json::from_str::<Vec<(String, String)>>(json).is_ok(), pairs, "{json}");
            }
        }
    }
}

/// The oldest change in the log; with none, the one after `head`.
pub(super) fn oldest_change(conn: &Connection, head: Seq) -> Result<Seq, DbError> {
    let min: Option<i64> = conn
        .prepare_cached("SELECT min(seq) FROM changelog")
        .and_then(|mut s| s.query_row([], |r| r.get(0)))
        .ctx("find the oldest change")?;
    Ok(min.map_or(head.next(), |m| Seq(m as u64)))
}

pub(super) fn append_change(conn: &Connection, seq: Seq, rec: &Record) -> Result<(), DbError> {
    let body = json(rec)?;
    let mut stmt = conn
        .prepare_cached("INSERT INTO changelog (seq, session_id, record) VALUES (?1, ?2, ?3)")
        .ctx("prepare a change-log append")?;
    stmt.execute(params![seq.0 as i64, rec.id.0, body]).ctx("append to the change log")?;
    Ok(())
}

/// Live sessions matching every set field of `f`, oldest first.
pub(super) fn list(conn: &Connection, path: &Path, f: &SessionFilter) -> Result<Vec<Session>, DbError> {
    let mut sql = format!("SELECT {} FROM sessions WHERE tombstone = 0", COLUMNS);
    let display = f.display.map(i64::from);
    let status = f.status.map(|s| s.as_str());
    let mut args: Vec<&dyn ToSql> = Vec::new();
    for (col, val) in [
        ("user", f.user.as_ref().map(|v| v as &dyn ToSql)),
        ("agent", f.agent.as_ref().map(|v| v as &dyn ToSql)),
        ("display", display.as_ref().map(|v| v as &dyn ToSql)),
        ("subcluster", f.subcluster.as_ref().map(|v| v as &dyn ToSql)),
        ("status", status.as_ref().map(|v| v as &dyn ToSql)),
    ] {
        if let Some(v) = val {
            sql.push_str(&format!(" AND {col} = ?"));
            args.push(v);
        }
    }
    if f.exclude_unreachable {
        sql.push_str(" AND status <> 'unreachable'");
    }
    sql.push_str(" ORDER BY created_ms, id");
    let mut stmt = conn.prepare_cached(&sql).ctx("prepare a session listing")?;
    let rows = stmt.query_map(args.as_slice(), raw_from_row).ctx("list sessions")?;
    let mut out = Vec::new();
    for raw in rows {
        if let Some(s) = raw.ctx("list sessions")?.into_record(path)?.session {
            out.push(s);
        }
    }
    Ok(out)
}

/// What the one-row `meta` table says, with the head made current. `meta` keeps the head
/// and clock only as of the last transaction that deleted rows (see `owner.rs`); the head
/// is then the newest change-log row, and the clock is completed by the newest version stored ([`table_stats`]).
pub(super) struct Meta {
    pub db_id: String,
    /// The last change-log sequence number.
    pub head: Seq,
    /// The clock as `meta` holds it.
    pub hlc: Hlc,
}

pub(super) fn read_meta(conn: &Connection) -> Result<Meta, DbError> {
    conn.query_row(
        "SELECT db_id, hlc_wall, hlc_logical, max(head_seq, coalesce((SELECT max(seq) FROM changelog), 0))
         FROM meta WHERE id = 1",
        [],
        |r| Ok(Meta { db_id: r.get(0)?, hlc: hlc_at(r, 1)?, head: Seq(r.get::<_, i64>(3)?.max(0) as u64) }),
    )
    .ctx("read the database metadata")
}

/// The clock reading in columns `i` (wall) and `i + 1` (logical) of a row.
fn hlc_at(r: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<Hlc> {
    Ok(Hlc { wall_ms: r.get::<_, i64>(i)? as u64, logical: r.get::<_, i64>(i + 1)? as u32 })
}

pub(super) fn save_meta(conn: &Connection, hlc: Hlc, head: Seq) -> Result<(), DbError> {
    let mut stmt = conn
        .prepare_cached("UPDATE meta SET hlc_wall = ?1, hlc_logical = ?2, head_seq = ?3 WHERE id = 1")
        .ctx("prepare a metadata update")?;
    stmt.execute(params![hlc.wall_ms as i64, hlc.logical as i64, head.0 as i64]).ctx("update the metadata")?;
    Ok(())
}

/// The id and agent of every live session.
pub(super) fn live_ids(conn: &Connection) -> Result<Vec<(SessionId, String)>, DbError> {
    let mut stmt = conn
        .prepare_cached("SELECT id, agent FROM sessions WHERE tombstone = 0")
        .ctx("prepare the live session ids")?;
    let rows = stmt
        .query_map([], |r| Ok((SessionId(r.get(0)?), r.get::<_, Option<String>>(1)?.unwrap_or_default())))
        .ctx("read the live session ids")?;
    rows.map(|r| r.ctx("read the live session ids")).collect()
}

/// Live sessions counted per agent and state.
pub(super) fn count_sessions(conn: &Connection) -> Result<Vec<super::SessionCount>, DbError> {
    let mut stmt = conn
        .prepare_cached("SELECT agent, status, count(*) FROM sessions WHERE tombstone = 0 GROUP BY agent, status")
        .ctx("prepare the session count")?;
    let rows = stmt
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, i64>(2)?)))
        .ctx("count sessions")?;
    let mut out = Vec::new();
    for row in rows {
        let (agent, status, n) = row.ctx("count sessions")?;
        // A state this build does not know (written by a newer peer) is not counted.
        if let Some(status) = SessionStatus::parse(&status) {
            out.push(super::SessionCount { agent, status, count: n as u64 });
        }
    }
    Ok(out)
}

/// Per agent, per user, how many live sessions: the source of the in-memory count the
/// owner keeps up to date (read once at open, and again after a failed transaction).
pub(super) fn users_per_agent(conn: &Connection) -> Result<UsersPerAgent, DbError> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT agent, user, count(*) FROM sessions
             WHERE tombstone = 0 AND agent IS NOT NULL AND user IS NOT NULL GROUP BY agent, user",
        )
        .ctx("prepare the users-per-agent count")?;
    let rows = stmt
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, i64>(2)?)))
        .ctx("count users per agent")?;
    let mut out = UsersPerAgent::default();
    for row in rows {
        let (agent, user, n) = row.ctx("count users per agent")?;
        out.entry(agent).or_default().insert(user, u32::try_from(n).unwrap_or(u32::MAX));
    }
    Ok(out)
}

/// Agent → user → live sessions of that user on that agent (never a zero entry).
pub(super) type UsersPerAgent = std::collections::HashMap<String, std::collections::HashMap<String, u32>>;

pub(super) fn json<T: serde::Serialize + ?Sized>(v: &T) -> Result<String, DbError> {
    // Serialising plain data to a string cannot fail; keep the error path anyway.
    serde_json::to_string(v).map_err(|e| DbError::InvalidRecord {
        id: SessionId(String::new()),
        detail: format!("cannot encode as json: {e}"),
    })
}

/// A `sessions` row as read, before validation (so decoding errors are ours, not sqlite's).
pub(super) struct RawRow {
    id: String,
    user: Option<String>,
    subcluster: Option<String>,
    agent: Option<String>,
    agent_address: Option<String>,
    display: Option<i64>,
    vnc_port: Option<i64>,
    status: Option<String>,
    created_ms: Option<i64>,
    last_connect_ms: Option<i64>,
    last_client_address: Option<String>,
    pid: Option<i64>,
    command: Option<String>,
    geometry: Option<String>,
    client_params: Option<String>,
    hlc_wall: i64,
    hlc_logical: i64,
    origin: String,
    tombstone: bool,
    base_wall: Option<i64>,
    base_logical: Option<i64>,
    base_origin: Option<String>,
}

pub(super) fn raw_from_row(r: &Row<'_>) -> rusqlite::Result<RawRow> {
    Ok(RawRow {
        id: r.get(0)?,
        user: r.get(1)?,
        subcluster: r.get(2)?,
        agent: r.get(3)?,
        agent_address: r.get(4)?,
        display: r.get(5)?,
        vnc_port: r.get(6)?,
        status: r.get(7)?,
        created_ms: r.get(8)?,
        last_connect_ms: r.get(9)?,
        last_client_address: r.get(10)?,
        pid: r.get(11)?,
        command: r.get(12)?,
        geometry: r.get(13)?,
        client_params: r.get(14)?,
        hlc_wall: r.get(15)?,
        hlc_logical: r.get(16)?,
        origin: r.get(17)?,
        tombstone: r.get::<_, i64>(18)? != 0,
        base_wall: r.get(19)?,
        base_logical: r.get(20)?,
        base_origin: r.get(21)?,
    })
}

impl RawRow {
    pub(super) fn into_record(mut self, path: &Path) -> Result<Record, DbError> {
        let id = SessionId(self.id.clone());
        let logical = u32::try_from(self.hlc_logical).map_err(|_| bad(path, &id, "hlc_logical out of range"))?;
        let version =
            Version { hlc: Hlc { wall_ms: self.hlc_wall as u64, logical }, node: NodeId(self.origin.clone()) };
        let base = match (self.base_wall, self.base_logical, self.base_origin.take()) {
            (Some(wall), Some(logical), Some(origin)) => {
                let logical = u32::try_from(logical).map_err(|_| bad(path, &id, "base_logical out of range"))?;
                Some(Version { hlc: Hlc { wall_ms: wall as u64, logical }, node: NodeId(origin) })
            }
            _ => None,
        };
        let session = if self.tombstone { None } else { Some(self.into_session(path, &id)?) };
        Ok(Record { id, version, base, session })
    }

    fn into_session(self, path: &Path, id: &SessionId) -> Result<Session, DbError> {
        let need = |col: &str| bad(path, id, &format!("live session without {col}"));
        fn int<T: TryFrom<i64>>(v: Option<i64>, path: &Path, id: &SessionId, col: &str) -> Result<T, DbError> {
            let v = v.ok_or_else(|| bad(path, id, &format!("live session without {col}")))?;
            T::try_from(v).map_err(|_| bad(path, id, &format!("{col} out of range")))
        }
        let status = self.status.ok_or_else(|| need("status"))?;
        let command = self.command.ok_or_else(|| need("command"))?;
        let params = self.client_params.ok_or_else(|| need("client_params"))?;
        Ok(Session {
            id: id.clone(),
            user: self.user.ok_or_else(|| need("user"))?,
            subcluster: self.subcluster.ok_or_else(|| need("subcluster"))?,
            agent: self.agent.ok_or_else(|| need("agent"))?,
            agent_address: self.agent_address.ok_or_else(|| need("agent_address"))?,
            display: int(self.display, path, id, "display")?,
            vnc_port: int(self.vnc_port, path, id, "vnc_port")?,
            status: SessionStatus::parse(&status)
                .ok_or_else(|| bad(path, id, &format!("unknown status {status:?}")))?,
            created_ms: self.created_ms.ok_or_else(|| need("created_ms"))? as u64,
            last_connect_ms: self.last_connect_ms.ok_or_else(|| need("last_connect_ms"))? as u64,
            last_client_address: self.last_client_address.ok_or_else(|| need("last_client_address"))?,
            pid: int(self.pid, path, id, "pid")?,
            command: serde_json::from_str(&command)
                .map_err(|e| bad(path, id, &format!("command is not a json list of strings: {e}")))?,
            geometry: self.geometry.ok_or_else(|| need("geometry"))?,
            client_params: serde_json::from_str(&params)
                .map_err(|e| bad(path, id, &format!("client_params is not a json list of pairs: {e}")))?,
        })
    }
}

/// A stored row that cannot be decoded.
fn bad(path: &Path, id: &SessionId, detail: &str) -> DbError {
    DbError::Corrupt { path: path.to_path_buf(), detail: format!("session {id}: {detail}") }
}
