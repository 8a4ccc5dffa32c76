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
//! - `scale`: one in-process master (HA off, FULL) with 1,000 stand-in agents that keep the
//!   desktops they start and report them when polled (run in a child process of this
//!   benchmark, so their connections and CPU time are their own), filled with 100,000
//!   sessions (the last 10,000 by real logins, the others desktops the agents hold, stored
//!   with `ApiRequest::SessionPut`: logins with 1,000 agents are too slow to make them all);
//!   then login latency (10,000 more logins of new users) and one
//!   reconciliation sweep over every agent (`Broker::reconcile_all`, the background loop being
//!   off): its wall time and the CPU time of the master's process and of the agents' process.
//!   The sweep must end no session. `VSM_BENCH_SCALE_AGENTS` and `VSM_BENCH_SCALE_SESSIONS`
//!   (defaults 1000 and 100000) shrink it for a quick check.
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
    if named(AGENT_HOST) {
        agent_host();
        return;
    }
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
                 0.5 s after listing all: VmRSS {:.1} MiB, peak {:.1} MiB; fill {}; MySessions p50 {} p99 {}; \
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
             0.5 s afterwards VmRSS {:.1} MiB, peak {:.1} MiB",
            median(list_all),
            median(listed_rss),
            median(listed_hwm)
        );
        println!("== SessionPut fill rate (one process, FULL, {clients} clients): median {:.0}/s", median(fill));
    }
    if selected("scale") {
        let agents = scale_env("VSM_BENCH_SCALE_AGENTS", 1_000);
        let sessions = scale_env("VSM_BENCH_SCALE_SESSIONS", 100_000);
        let logins = SCALE_LOGINS.min(sessions);
        let (mut timed, mut fill, mut wall, mut master, mut stand_ins) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for run in 0..runs {
            let s = rt.block_on(scale(agents, sessions, logins, clients, run));
            println!(
                "scale, {agents} agents, run {}: fill of {sessions} sessions: stored {}; then by logins {}; \
                 logins with {sessions} to {} sessions: {}; one reconciliation sweep over {} sessions: wall {}, \
                 CPU of the master's process {}, of the agents' process {}; {} change-log rows written",
                run + 1,
                s.put.line(),
                s.fill.line(),
                sessions + logins,
                s.logins.line(),
                s.swept,
                us(s.sweep_wall),
                us(s.master_cpu),
                us(s.agents_cpu),
                s.writes,
            );
            fill.push(s.fill.rate());
            wall.push(s.sweep_wall.as_secs_f64() * 1e3);
            master.push(s.master_cpu.as_secs_f64() * 1e3);
            stand_ins.push(s.agents_cpu.as_secs_f64() * 1e3);
            timed.push(s.logins);
        }
        summary(&format!("login p99 with {agents} agents and {sessions} sessions (target <= 5 ms)"), &timed);
        println!(
            "== one reconciliation sweep over {agents} agents and {} sessions: wall median {:.1} ms, \
             CPU median {:.1} ms in the master's process (user + system; its clients idle), \
             {:.1} ms in the agents' process",
            sessions + logins,
            median(wall),
            median(master),
            median(stand_ins),
        );
        println!("== fill by logins, {agents} agents, {clients} clients: median {:.0}/s", median(fill));
    }
}

fn scale_env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|s| s.parse().ok()).filter(|&n| n > 0).unwrap_or(default)
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

/// Stores `sessions` through `ApiRequest::SessionPut` from `clients` connections.
async fn put_all(socket: &std::path::Path, clients: usize, sessions: Vec<vsm::model::Session>) -> Stats {
    let start = Instant::now();
    let mut queues: Vec<Vec<vsm::model::Session>> = (0..clients).map(|_| Vec::new()).collect();
    for (i, s) in sessions.into_iter().enumerate() {
        queues[i % clients].push(s);
    }
    let mut tasks = Vec::new();
    for queue in queues {
        let socket = socket.to_path_buf();
        tasks.push(tokio::spawn(async move {
            let mut conn = ApiConn::open(&socket).await;
            let mut lat = Vec::with_capacity(queue.len());
            for session in queue {
                let t = Instant::now();
                match conn.call(&ApiRequest::SessionPut { session }).await {
                    ApiReply::Ok { .. } => {}
                    other => panic!("session put failed: {other:?}"),
                }
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.expect("fill task"));
    }
    Stats::new(lat, start.elapsed())
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
    let fill = put_all(&socket, clients, (0..n).map(|i| session(i, users, MEMORY_AGENTS)).collect()).await;

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

    // The master gives the memory of a large reply back after writing it, while the client
    // reads it: the resident size it keeps is the one a moment later.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let listed_rss_kib = proc_status_kib(pid, "VmRSS:");
    let listed_hwm_kib = proc_status_kib(pid, "VmHWM:");
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGTERM);
    let _ = tokio::time::timeout(Duration::from_secs(20), child.wait()).await;
    Memory { rss_kib, hwm_kib, listed_rss_kib, listed_hwm_kib, fill, mine, admin, all }
}

/// Logins timed by the `scale` part, after its fill.
const SCALE_LOGINS: usize = 10_000;

/// Sessions of the `scale` part's fill created by logins (the rest is stored directly).
const SCALE_FILL_LOGINS: usize = 10_000;

/// The word that makes this benchmark binary the agents' process of the `scale` part.
const AGENT_HOST: &str = "scale-agent-host";

/// Figures of one `scale` run.
struct Scale {
    /// The part of the fill stored with `SessionPut`, then the part filled by logins.
    put: Stats,
    fill: Stats,
    logins: Stats,
    /// Sessions stored when the sweep began.
    swept: u64,
    sweep_wall: Duration,
    /// CPU time during the sweep of this process (the master; its clients are idle then) and
    /// of the agents' process.
    master_cpu: Duration,
    agents_cpu: Duration,
    /// Change-log rows the sweep wrote (none when agents and database agree).
    writes: u64,
}

/// One master with `agents` recording agents, filled with `sessions` sessions by logins of
/// new users from `clients` connections; then timed logins and one reconciliation sweep.
async fn scale(agents: usize, sessions: usize, logins: usize, clients: usize, run: usize) -> Scale {
    let mut host = AgentHost::spawn(agents).await;
    let dir = bench_dir();
    let cfg = master_config(dir.path(), "a", &host.names);
    let socket = cfg.vsmserver.socket_path.clone();
    // No background reconciliation: the one sweep measured is the one run below.
    let server = start_master(cfg, None, None).await;

    // Logins with 1,000 agents run at a few hundred per second on the build machine, so most
    // of the fill is stored directly: desktops the agents hold, put through the socket.
    let by_login = SCALE_FILL_LOGINS.min(sessions);
    let put = put_all(&socket, clients, host.hold(sessions - by_login).await).await;
    let start = Instant::now();
    let lat = drive(&socket, clients, by_login, &format!("f{run}")).await;
    let fill = Stats::new(lat, start.elapsed());
    let start = Instant::now();
    let lat = drive(&socket, clients, logins, &format!("l{run}")).await;
    let logins = Stats::new(lat, start.elapsed());

    let before = server.db.status().await.expect("database status");
    assert_eq!(host.running().await, before.sessions, "the agents run every stored session");
    let cpu = (process_cpu(), host.cpu());
    let start = Instant::now();
    let summary = server.broker.reconcile_all().await.expect("a reconciliation sweep");
    let sweep_wall = start.elapsed();
    let (master_cpu, agents_cpu) = (process_cpu().saturating_sub(cpu.0), host.cpu().saturating_sub(cpu.1));
    let after = server.db.status().await.expect("database status");
    assert_eq!(summary.reachable, agents, "every agent answered the sweep: {summary:?}");
    assert_eq!(
        (summary.vanished, summary.ended, summary.marked_unreachable, summary.recovered),
        (0, 0, 0, 0),
        "the sweep found agents and database in agreement: {summary:?}"
    );
    assert_eq!(after.sessions, before.sessions, "the sweep ended no session");
    assert_eq!(host.running().await, after.sessions, "the sweep ended no desktop");
    server.stop().await;
    Scale {
        put,
        fill,
        logins,
        swept: before.sessions,
        sweep_wall,
        master_cpu,
        agents_cpu,
        writes: after.head.0 - before.head.0,
    }
}

/// CPU time (user and system) of this process so far, threads that ended included.
fn process_cpu() -> Duration {
    let s = vsm::metrics::ProcessFigures::read().cpu_seconds.expect("CPU time from /proc/self/stat");
    Duration::from_secs_f64(s)
}

/// The `scale` part's agents, in a process of their own (this binary, run with
/// [`AGENT_HOST`]): its open connections count against its own descriptor limit, not the
/// master's, and its CPU time is apart. It prints the agents' names, then answers each line
/// `running` with the number of desktops its agents run, and ends when its input closes.
struct AgentHost {
    child: tokio::process::Child,
    input: tokio::process::ChildStdin,
    output: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    names: Vec<String>,
}

impl AgentHost {
    async fn spawn(agents: usize) -> AgentHost {
        use std::process::Stdio;
        let mut child = tokio::process::Command::new(std::env::current_exe().expect("path of this benchmark"))
            .arg(AGENT_HOST)
            .arg(agents.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start the agents' process");
        let input = child.stdin.take().expect("agents' stdin");
        let output =
            tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(child.stdout.take().expect("agents' stdout")));
        let mut host = AgentHost { child, input, output, names: Vec::with_capacity(agents) };
        for _ in 0..agents {
            let name = host.line().await;
            host.names.push(name);
        }
        host
    }

    async fn line(&mut self) -> String {
        self.output.next_line().await.expect("read from the agents' process").expect("the agents' process runs")
    }

    /// `n` desktops started on the agents in turn, without the master asking: the sessions
    /// to store for them.
    async fn hold(&mut self, n: usize) -> Vec<vsm::model::Session> {
        let ask = format!("hold {n}\n");
        tokio::io::AsyncWriteExt::write_all(&mut self.input, ask.as_bytes()).await.expect("ask the agents' process");
        let mut sessions = Vec::with_capacity(n);
        for _ in 0..n {
            sessions.push(serde_json::from_str(&self.line().await).expect("a session from the agents' process"));
        }
        sessions
    }

    /// Desktops the agents run now.
    async fn running(&mut self) -> u64 {
        tokio::io::AsyncWriteExt::write_all(&mut self.input, b"running\n").await.expect("ask the agents' process");
        self.line().await.parse().expect("a count of desktops")
    }

    /// CPU time of the agents' process so far, from its threads' `schedstat` (nanoseconds).
    fn cpu(&self) -> Duration {
        let pid = self.child.id().expect("the agents' process runs");
        let mut ns = 0;
        for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("the agents' threads").flatten() {
            let stat = std::fs::read_to_string(task.path().join("schedstat")).unwrap_or_default();
            ns += stat.split_whitespace().next().and_then(|n| n.parse::<u64>().ok()).unwrap_or(0);
        }
        Duration::from_nanos(ns)
    }
}

/// The body of the agents' process (see [`AgentHost`]).
fn agent_host() {
    let agents: usize =
        std::env::args().skip_while(|a| a != AGENT_HOST).nth(1).and_then(|n| n.parse().ok()).unwrap_or(0);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    rt.block_on(async {
        use tokio::io::AsyncBufReadExt;
        let mut started = Vec::with_capacity(agents);
        for _ in 0..agents {
            let a = RecordingAgent::start().await;
            println!("{}", a.name);
            started.push(a);
        }
        let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if line == "running" {
                println!("{}", started.iter().map(RecordingAgent::running).sum::<usize>());
            } else if let Some(n) = line.strip_prefix("hold ").and_then(|n| n.parse::<usize>().ok()) {
                use std::io::Write;
                let mut out = std::io::BufWriter::new(std::io::stdout().lock());
                for (i, agent) in started.iter().cycle().take(n).enumerate() {
                    let session = agent.hold(format!("held{i}"));
                    writeln!(out, "{}", serde_json::to_string(&session).expect("a session as JSON")).expect("stdout");
                }
                out.flush().expect("stdout");
            }
        }
    });
}
