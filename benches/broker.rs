//! Session-broker benchmarks (they print figures, they assert nothing about time).
//!
//! - `creates`: session creates through one master over its real Unix socket, agent in no-op
//!   mode, several concurrent clients (each its own connection, a new user per request, so
//!   every connect creates a session): throughput and p50/p99 latency.
//! - `ha_creates`: the same through the first of two in-process masters with `/HA/sync = ack`
//!   (each create is answered only after the peer stored it).
//! - `memory`: a real `vsmserver` process filled with 100,000 sessions on 1,000 agents through
//!   `ApiRequest::SessionPut`; its resident memory, the time to list one user's sessions, and
//!   the time to list all of them in one request (what `tlctl session list` sends).
//!
//! - `count` (only when named): `VSM_BENCH_COUNT` creates through one master, one client, one
//!   after another, no timing, for counting instructions with `scripts/bench-instructions.sh`.
//!
//! Run: `cargo bench --bench broker` (all), or name parts: `cargo bench --bench broker -- creates`.
//! `VSM_BENCH_RUNS` (default 3) runs each part that many times; medians are printed last.
//! `VSM_BENCH_CLIENTS` (default 16) sets the concurrent clients of the create benchmarks.

mod common;

use common::*;
use std::time::{Duration, Instant};
use vsm::config::SyncLevel;
use vsm::proto::api::{ApiReply, ApiRequest, Selector};

const WARMUP: usize = 1_000;
const CREATES: usize = 20_000;
const HA_CREATES: usize = 10_000;

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    machine_note();
    let runs = runs();
    let clients: usize =
        std::env::var("VSM_BENCH_CLIENTS").ok().and_then(|s| s.parse().ok()).filter(|&n| n > 0).unwrap_or(16);
    if named("count") {
        let n = count(2_000);
        rt.block_on(count_creates(n));
        println!("count: {n} creates done");
        return;
    }
    if selected("creates") {
        let mut figs = Vec::new();
        for run in 0..runs {
            let s = rt.block_on(creates(false, clients, CREATES, run));
            println!("creates, single master, {clients} clients, run {}: {}", run + 1, s.line());
            figs.push(s);
        }
        summary("creates, single master (target >= 10000/s, p99 <= 2 ms)", &figs);
    }
    if selected("ha_creates") {
        let mut figs = Vec::new();
        for run in 0..runs {
            let s = rt.block_on(creates(true, clients, HA_CREATES, run));
            println!("creates, two masters sync=ack, {clients} clients, run {}: {}", run + 1, s.line());
            figs.push(s);
        }
        summary("creates, two masters, sync=ack (target >= 8000/s)", &figs);
    }
    if selected("memory") {
        let mut rss = Vec::new();
        let mut hwm = Vec::new();
        let mut fill = Vec::new();
        let mut list_p50 = Vec::new();
        let mut list_p99 = Vec::new();
        let mut admin_p50 = Vec::new();
        let mut list_all = Vec::new();
        let mut listed_rss = Vec::new();
        let mut listed_hwm = Vec::new();
        for run in 0..runs {
            let m = rt.block_on(memory(100_000, clients));
            println!(
                "vsmserver with 100000 sessions on {MEMORY_AGENTS} agents, run {}: VmRSS {:.1} MiB (peak VmHWM {:.1} MiB); \
                 after listing all: VmRSS {:.1} MiB, peak {:.1} MiB; fill {}; MySessions p50 {} p99 {}; \
                 SessionList(user) p50 {}; SessionList(all) p50 {}",
                run + 1,
                m.rss_kib as f64 / 1024.0,
                m.hwm_kib as f64 / 1024.0,
                m.listed_rss_kib as f64 / 1024.0,
                m.listed_hwm_kib as f64 / 1024.0,
                m.fill.line(),
                us(m.mine.p50),
                us(m.mine.p99),
                us(m.admin.p50),
                us(m.all.p50),
            );
            list_all.push(m.all.p50.as_secs_f64());
            listed_rss.push(m.listed_rss_kib as f64 / 1024.0);
            listed_hwm.push(m.listed_hwm_kib as f64 / 1024.0);
            rss.push(m.rss_kib as f64 / 1024.0);
            hwm.push(m.hwm_kib as f64 / 1024.0);
            fill.push(m.fill.rate());
            list_p50.push(m.mine.p50.as_secs_f64() * 1e3);
            list_p99.push(m.mine.p99.as_secs_f64() * 1e3);
            admin_p50.push(m.admin.p50.as_secs_f64() * 1e3);
        }
        println!(
            "== vsmserver resident memory with 100000 sessions on 1000 agents (target <= 64 MiB): median VmRSS {:.1} MiB, peak {:.1} MiB",
            median(rss),
            median(hwm)
        );
        println!(
            "== list one user's sessions among 100000 (target < 1 ms): MySessions median p50 {:.3} ms, p99 {:.3} ms; \
             SessionList(user) p50 {:.3} ms",
            median(list_p50),
            median(list_p99),
            median(admin_p50)
        );
        println!(
            "== list all 100000 sessions in one request, as `tlctl session list` does (target <= 1 s): median {:.3} s; \
             afterwards VmRSS {:.1} MiB, peak {:.1} MiB",
            median(list_all),
            median(listed_rss),
            median(listed_hwm)
        );
        println!("== SessionPut fill rate (one process, FULL, {clients} clients): median {:.0}/s", median(fill));
    }
}

fn summary(what: &str, figs: &[Stats]) {
    let rate = median(figs.iter().map(|s| s.rate()).collect());
    let p50 = median(figs.iter().map(|s| s.p50.as_secs_f64() * 1e3).collect());
    let p99 = median(figs.iter().map(|s| s.p99.as_secs_f64() * 1e3).collect());
    println!("== {what}: median {rate:.0}/s, p50 {p50:.3} ms, p99 {p99:.3} ms");
}

/// `total` creates from `clients` connections, after a warm-up; returns the measured part.
async fn creates(ha: bool, clients: usize, total: usize, run: usize) -> Stats {
    let dir = bench_dir();
    let agent = noop_agent().await;
    let agents = vec![agent];
    let (pair, single, socket) = if ha {
        let (ca, cb) = Pair::configs(dir.path(), &agents, SyncLevel::Ack);
        let socket = ca.vsmserver.socket_path.clone();
        let pair = Pair::start(ca, cb, true).await;
        let ok =
            wait_for(Duration::from_secs(30), Duration::from_millis(10), || streaming(pair.a()) && streaming(pair.b()))
                .await;
        assert!(ok, "the two masters did not start streaming within 30 s");
        (Some(pair), None, socket)
    } else {
        let cfg = master_config(dir.path(), "a", &agents);
        let socket = cfg.vsmserver.socket_path.clone();
        (None, Some(start_master(cfg, None, None).await), socket)
    };

    // Warm-up: connections to the agent, statement caches, allocator.
    drive(&socket, clients, WARMUP, &format!("w{run}")).await;
    let start = Instant::now();
    let lat = drive(&socket, clients, total, &format!("r{run}")).await;
    let stats = Stats::new(lat, start.elapsed());

    if let Some(p) = pair {
        p.stop().await;
    }
    if let Some(s) = single {
        s.stop().await;
    }
    stats
}

/// `n` creates through one master, one after another, after a fixed warm-up.
async fn count_creates(n: usize) {
    let dir = bench_dir();
    let agents = vec![noop_agent().await];
    let cfg = master_config(dir.path(), "a", &agents);
    let socket = cfg.vsmserver.socket_path.clone();
    let server = start_master(cfg, None, None).await;
    drive(&socket, 1, 200, "w").await;
    if n > 0 {
        drive(&socket, 1, n, "c").await;
    }
    server.stop().await;
}

/// `total` creates spread over `clients` concurrent connections; every latency.
async fn drive(socket: &std::path::Path, clients: usize, total: usize, tag: &str) -> Vec<Duration> {
    let mut tasks = Vec::new();
    for c in 0..clients {
        let n = total / clients + usize::from(c < total % clients);
        let socket = socket.to_path_buf();
        let tag = tag.to_string();
        tasks.push(tokio::spawn(async move {
            let mut conn = ApiConn::open(&socket).await;
            let mut lat = Vec::with_capacity(n);
            for i in 0..n {
                let req = ApiRequest::Connect {
                    user: Some(format!("{tag}c{c}u{i}")),
                    new: false,
                    terminate_existing: false,
                    geometry: None,
                    client_address: Some("192.0.2.1".into()),
                };
                let t = Instant::now();
                match conn.call(&req).await {
                    ApiReply::Connected { info } if !info.reconnected => {}
                    other => panic!("expected a created session, got {other:?}"),
                }
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut all = Vec::with_capacity(total);
    for t in tasks {
        all.extend(t.await.expect("client task"));
    }
    all
}

struct Memory {
    /// Before the listings of every session.
    rss_kib: u64,
    hwm_kib: u64,
    /// After them: the reply to such a listing is tens of MiB, built in memory.
    listed_rss_kib: u64,
    listed_hwm_kib: u64,
    fill: Stats,
    mine: Stats,
    admin: Stats,
    /// Listing every session (`SessionList` with no selector, what `tlctl session list`
    /// sends), one round trip each.
    all: Stats,
}

/// Agents the sessions of the `memory` part are spread over (the scale target's figure).
const MEMORY_AGENTS: u64 = 1_000;

fn proc_status_kib(pid: u32, key: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A real `vsmserver` process (HA off, FULL), filled with `n` sessions of `n / 10` users.
async fn memory(n: u64, clients: usize) -> Memory {
    let dir = bench_dir();
    let conf = dir.path().join("conf");
    std::fs::create_dir_all(&conf).expect("config dir");
    let socket = dir.path().join("vsmserver.sock");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
        l.local_addr().expect("port").port()
    };
    std::fs::write(
        conf.join("vsm.toml"),
        format!("[vsm]\nsecret_file = \"{}\"\n", dir.path().join("cluster.key").display()),
    )
    .expect("vsm.toml");
    std::fs::write(
        conf.join("vsmserver.toml"),
        format!(
            "[vsmserver]\nsocket_path = \"{}\"\ndata_dir = \"{}\"\nlisten_port = {port}\nhttp_port = 0\nreconcile_interval = \"1h\"\n\
             session_startup_dir = \"{}\"\nsession_reconnect_dir = \"{}\"\n",
            socket.display(),
            dir.path().join("data").display(),
            dir.path().join("startup.d").display(),
            dir.path().join("reconnect.d").display(),
        ),
    )
    .expect("vsmserver.toml");
    let mut child = tokio::process::Command::new(vsmserver_bin())
        .arg("--config-dir")
        .arg(&conf)
        .env("RUST_LOG", "error")
        .kill_on_drop(true)
        .spawn()
        .expect("spawn vsmserver");
    let pid = child.id().expect("vsmserver pid");
    let up = wait_for(Duration::from_secs(20), Duration::from_millis(20), || {
        std::os::unix::net::UnixStream::connect(&socket).is_ok()
    })
    .await;
    assert!(up, "vsmserver did not open its socket within 20 s");

    // Fill.
    let users = (n / 10).max(1);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients as u64 {
        let socket = socket.clone();
        tasks.push(tokio::spawn(async move {
            let mut conn = ApiConn::open(&socket).await;
            let mut lat = Vec::new();
            let mut i = c;
            while i < n {
                let req = ApiRequest::SessionPut { session: session(i, users, MEMORY_AGENTS) };
                let t = Instant::now();
                match conn.call(&req).await {
                    ApiReply::Ok { .. } => {}
                    other => panic!("session put failed: {other:?}"),
                }
                lat.push(t.elapsed());
                i += clients as u64;
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.expect("fill task"));
    }
    let fill = Stats::new(lat, start.elapsed());

    // Listing one user's sessions (10 of 100,000), many users in turn.
    let mut conn = ApiConn::open(&socket).await;
    let mut mine = Vec::new();
    let mut admin = Vec::new();
    for k in 0..2_000u64 {
        let user = format!("user{}", (k * 7919) % users);
        let t = Instant::now();
        let r = conn.call(&ApiRequest::MySessions { user: Some(user.clone()) }).await;
        mine.push(t.elapsed());
        match r {
            ApiReply::Sessions { sessions, .. } if sessions.len() == 10 => {}
            other => panic!("expected 10 sessions of {user}, got {other:?}"),
        }
        let t = Instant::now();
        let req =
            ApiRequest::SessionList { selector: Selector { user: Some(user), ..Default::default() }, refresh: false };
        let r = conn.call(&req).await;
        admin.push(t.elapsed());
        assert!(matches!(r, ApiReply::Sessions { .. }));
    }
    let mine = Stats::new(mine, Duration::from_secs(1));
    let admin = Stats::new(admin, Duration::from_secs(1));

    let rss_kib = proc_status_kib(pid, "VmRSS:");
    let hwm_kib = proc_status_kib(pid, "VmHWM:");

    // Every session at once, as `tlctl session list` asks for them.
    let mut all = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let r = conn.call(&ApiRequest::SessionList { selector: Selector::default(), refresh: false }).await;
        all.push(t.elapsed());
        match r {
            ApiReply::Sessions { sessions, .. } if sessions.len() as u64 == n => {}
            ApiReply::Sessions { sessions, .. } => panic!("listed {} sessions, expected {n}", sessions.len()),
            other => panic!("listing every session failed: {other:?}"),
        }
    }
    let all = Stats::new(all, Duration::from_secs(1));

    let listed_rss_kib = proc_status_kib(pid, "VmRSS:");
    let listed_hwm_kib = proc_status_kib(pid, "VmHWM:");
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGTERM);
    let _ = tokio::time::timeout(Duration::from_secs(20), child.wait()).await;
    Memory { rss_kib, hwm_kib, listed_rss_kib, listed_hwm_kib, fill, mine, admin, all }
}
