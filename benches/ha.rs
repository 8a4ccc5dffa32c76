//! Replication benchmarks (they print figures, they assert nothing about time). Two masters
//! run in this process, as in the demo, with `/HA/sync = ack` and SQLite `synchronous = FULL`.
//!
//! - `lag`: 1,000 changes/s for 5 s. Two figures:
//!   * commit → acknowledged: the write is committed on A (`DbHandle::write` returned), then
//!     the time until A's engine has the peer's `Ack` for it (`HaNode::replicated`).
//!     B acknowledges only after the change is durably applied, so this is an upper bound of
//!     "committed on A → applied on B" (it adds the Ack's trip back and A's engine hop).
//!   * writer round trip: `ApiRequest::SessionPut` over A's Unix socket, from the request to
//!     the answer, which comes only after B stored the change.
//! - `full_resync`: A holds 100,000 sessions, B starts with an empty database; the time from
//!   starting B until B is ready (snapshot applied, streaming) with all records, and the
//!   resync time B's engine reports (from link up to caught up).
//! - `incremental_resync`: B stops, A commits 10,000 changes, B restarts; the same two times.
//!
//! - `count` (only when named): `VSM_BENCH_COUNT` replicated writes (`SessionPut` over A's
//!   socket, one after another, no timing), for counting instructions with
//!   `scripts/bench-instructions.sh`.
//!
//! Run: `cargo bench --bench ha` (all), or name parts: `cargo bench --bench ha -- lag`.
//! `VSM_BENCH_RUNS` (default 3) runs each part that many times; medians are printed last.

mod common;

use common::*;
use std::time::{Duration, Instant};
use vsm::config::SyncLevel;
use vsm::db::Write;
use vsm::ha::engine::ResyncKind;
use vsm::proto::api::{ApiReply, ApiRequest};

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    machine_note();
    let runs = runs();
    if selected("lag") {
        let (mut p50, mut p99, mut w50, mut w99) = (vec![], vec![], vec![], vec![]);
        for run in 0..runs {
            let (ack, writer) = rt.block_on(lag(1_000, Duration::from_secs(5)));
            println!(
                "lag at 1000 changes/s, run {}: commit->ack {}; writer SessionPut {}",
                run + 1,
                ack.line(),
                writer.line()
            );
            p50.push(ack.p50.as_secs_f64() * 1e3);
            p99.push(ack.p99.as_secs_f64() * 1e3);
            w50.push(writer.p50.as_secs_f64() * 1e3);
            w99.push(writer.p99.as_secs_f64() * 1e3);
        }
        println!(
            "== replication lag at 1000 changes/s (target p99 <= 0.15 ms): commit->ack p50 {:.3} ms, p99 {:.3} ms; \
             writer round trip p50 {:.3} ms, p99 {:.3} ms (medians)",
            median(p50),
            median(p99),
            median(w50),
            median(w99)
        );
    }
    if named("count") {
        let n = count(2_000);
        rt.block_on(count_writes(n));
        println!("count: {n} replicated writes done");
        return;
    }
    if selected("full_resync") || selected("incremental_resync") {
        let (mut full, mut full_eng, mut inc, mut inc_eng) = (vec![], vec![], vec![], vec![]);
        for run in 0..runs {
            let r = rt.block_on(resyncs(100_000, 10_000));
            println!(
                "run {}: full resync of 100000: B ready after {:.3} s (B's engine: {} ms, {} records, {:?}); \
                 incremental after 10000 changes: B ready after {:.3} s (B's engine: {} ms, {} records, {:?}); \
                 A filled at {:.0} sessions/s",
                run + 1,
                r.full.as_secs_f64(),
                r.full_engine_ms,
                r.full_records,
                r.full_kind,
                r.inc.as_secs_f64(),
                r.inc_engine_ms,
                r.inc_records,
                r.inc_kind,
                r.fill_rate,
            );
            full.push(r.full.as_secs_f64());
            full_eng.push(r.full_engine_ms as f64);
            inc.push(r.inc.as_secs_f64());
            inc_eng.push(r.inc_engine_ms as f64);
        }
        println!(
            "== full resync of 100000 sessions (targets: <= 1 s start to ready, <= 0.5 s link-up to caught-up): median {:.3} s from B's start to ready, \
             {:.0} ms link-up to caught-up",
            median(full),
            median(full_eng)
        );
        println!(
            "== incremental resync after 10000 missed changes (target <= 0.1 s link-up to caught-up): median {:.3} s from B's restart to ready, \
             {:.0} ms link-up to caught-up",
            median(inc),
            median(inc_eng)
        );
    }
}

async fn pair(dir: &std::path::Path, start_b: bool) -> Pair {
    // The agent is never called here; it only has to exist in the configuration.
    let agents = vec!["agent1.example.com".to_string()];
    let (ca, cb) = Pair::configs(dir, &agents, SyncLevel::Ack);
    let p = Pair::start(ca, cb, start_b).await;
    if start_b {
        let ok =
            wait_for(Duration::from_secs(30), Duration::from_millis(5), || streaming(p.a()) && streaming(p.b())).await;
        assert!(ok, "the masters did not start streaming within 30 s");
    }
    p
}

/// Paced writes at `rate`/s for `time`, first in process (commit → ack), then over the socket.
async fn lag(rate: u64, time: Duration) -> (Stats, Stats) {
    let dir = bench_dir();
    let p = pair(dir.path(), true).await;
    let every = Duration::from_nanos(1_000_000_000 / rate);
    let n = (time.as_secs_f64() * rate as f64) as u64;

    // Warm-up.
    for i in 0..500 {
        let c = p.a().db.write(Write::Upsert(session(i, 100, 10))).await.expect("write");
        p.a().ha.replicated(c.seq).await;
    }

    // Commit on A -> A holds B's ack. Open loop: one task per change, started on schedule.
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = Vec::with_capacity(n as usize);
    let start = Instant::now();
    for i in 0..n {
        tick.tick().await;
        let db = p.a().db.clone();
        let ha = p.a().ha.clone();
        tasks.push(tokio::spawn(async move {
            let c = db.write(Write::Upsert(session(i, 100, 10))).await.expect("write");
            let committed = Instant::now();
            ha.replicated(c.seq).await;
            committed.elapsed()
        }));
    }
    let mut lat = Vec::with_capacity(tasks.len());
    for t in tasks {
        lat.push(t.await.expect("writer task"));
    }
    let ack = Stats::new(lat, start.elapsed());

    // The writer's view: SessionPut over the socket, paced, one connection.
    let mut conn = ApiConn::open(&p.cfg_a.vsmserver.socket_path).await;
    let mut lat = Vec::with_capacity(n as usize);
    let start = Instant::now();
    for i in 0..n {
        tick.tick().await;
        let t = Instant::now();
        match conn.call(&ApiRequest::SessionPut { session: session(i, 100, 10) }).await {
            ApiReply::Ok { .. } => {}
            other => panic!("session put failed: {other:?}"),
        }
        lat.push(t.elapsed());
    }
    let writer = Stats::new(lat, start.elapsed());
    let degraded = p.a().ha.replication_status().is_some_and(|s| s.degraded);
    assert!(!degraded, "replication degraded during the measurement: figures are not replicated writes");
    p.stop().await;
    (ack, writer)
}

/// `n` replicated writes, one after another, after a fixed warm-up.
async fn count_writes(n: usize) {
    let dir = bench_dir();
    let p = pair(dir.path(), true).await;
    let mut conn = ApiConn::open(&p.cfg_a.vsmserver.socket_path).await;
    for i in 0..(200 + n) as u64 {
        match conn.call(&ApiRequest::SessionPut { session: session(i, 100, 10) }).await {
            ApiReply::Ok { .. } => {}
            other => panic!("session put failed: {other:?}"),
        }
    }
    p.stop().await;
}

struct Resyncs {
    fill_rate: f64,
    full: Duration,
    full_engine_ms: u64,
    full_records: u64,
    full_kind: ResyncKind,
    inc: Duration,
    inc_engine_ms: u64,
    inc_records: u64,
    inc_kind: ResyncKind,
}

/// Starts B (again) and waits until it is ready with `sessions` live sessions.
async fn start_b_until_ready(p: &mut Pair, sessions: u64) -> (Duration, u64, u64, ResyncKind) {
    let t = Instant::now();
    p.start_b().await;
    let resyncs_before = 0;
    let ok = wait_for(Duration::from_secs(120), Duration::from_millis(2), || {
        p.b()
            .ha
            .replication_status()
            .is_some_and(|s| s.ready && s.resyncs > resyncs_before && s.last_resync_received.is_some())
    })
    .await;
    let elapsed = t.elapsed();
    assert!(ok, "B did not become ready within 120 s");
    let st = p.b().ha.replication_status().expect("status");
    let r = st.last_resync_received.expect("a received resync");
    let have = p.b().db.status().await.expect("status").sessions;
    assert_eq!(have, sessions, "B is ready but does not hold every session");
    (elapsed, r.duration_ms, r.records, r.kind)
}

async fn resyncs(total: u64, missed: u64) -> Resyncs {
    let dir = bench_dir();
    let mut p = pair(dir.path(), false).await;
    let t = Instant::now();
    for chunk in 0..total / 1000 {
        let ws = (0..1000).map(|i| Write::Upsert(session(chunk * 1000 + i, total / 10, 50))).collect();
        p.a().db.write_batch(ws).await.expect("fill A");
    }
    let fill_rate = total as f64 / t.elapsed().as_secs_f64();

    let (full, full_engine_ms, full_records, full_kind) = start_b_until_ready(&mut p, total).await;
    let ok = wait_for(Duration::from_secs(30), Duration::from_millis(5), || streaming(p.a()) && streaming(p.b())).await;
    assert!(ok, "not streaming after the full resync");
    assert_eq!(p.a().db.digest().await.ok(), p.b().db.digest().await.ok(), "databases differ after the full resync");

    // B away; A changes `missed` sessions (new ones, so B's count shows them all).
    if let Some(b) = p.b.take() {
        b.stop().await;
    }
    for chunk in 0..missed / 100 {
        let ws = (0..100).map(|i| Write::Upsert(session(total + chunk * 100 + i, total / 10, 50))).collect();
        p.a().db.write_batch(ws).await.expect("write while B is away");
    }
    let (inc, inc_engine_ms, inc_records, inc_kind) = start_b_until_ready(&mut p, total + missed).await;
    assert_eq!(
        p.a().db.digest().await.ok(),
        p.b().db.digest().await.ok(),
        "databases differ after the incremental resync"
    );
    p.stop().await;
    Resyncs { fill_rate, full, full_engine_ms, full_records, full_kind, inc, inc_engine_ms, inc_records, inc_kind }
}
