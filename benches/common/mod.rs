//! Shared pieces of the benchmarks: stand-in agents (a no-op one, and one that keeps its
//! desktops), master configurations, in-process masters (one, or two with HA), latency
//! statistics and machine notes.
//!
//! Benchmarks print figures; they never assert on timing.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, UnixStream};
use vsm::config::{Config, DbSynchronous, SyncLevel};
use vsm::model::{now_ms, LinkState, Session, SessionId, SessionStatus};
use vsm::proto::agent::{AgentReply, AgentRequest, AgentSession, LoadReport};
use vsm::proto::agent_link::serve_agent_conn;
use vsm::proto::api::{ApiReply, ApiRequest};
use vsm::proto::{PlainConn, Secret};
use vsm::server::Server;
use vsm::testkit::stand_in_desktop;

pub const CLUSTER_SECRET: &[u8] = b"cluster secret for benchmarks";
pub const HA_SECRET: &[u8] = b"ha secret for the benchmarks, 32b";

/// Words after `--` on the command line (cargo passes `--bench` itself, which is skipped).
pub fn selected(name: &str) -> bool {
    let words: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    words.is_empty() || words.iter().any(|w| w == name)
}

/// Whether `name` was given after `--` (for parts that never run by default).
pub fn named(name: &str) -> bool {
    std::env::args().skip(1).any(|a| a == name)
}

/// `VSM_BENCH_COUNT`: how many operations a counting part performs (default `default`).
pub fn count(default: usize) -> usize {
    std::env::var("VSM_BENCH_COUNT").ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

/// A directory with both secrets written.
pub fn bench_dir() -> tempfile::TempDir {
    let d = tempfile::Builder::new().prefix("vsm-bench-").tempdir().expect("temporary directory");
    vsm::testkit::write_secret(&d.path().join("cluster.key"), CLUSTER_SECRET).expect("write the cluster secret");
    vsm::testkit::write_secret(&d.path().join("ha.key"), HA_SECRET).expect("write the ha secret");
    d
}

/// An agent that does nothing: `Start` answers at once with a made-up session, `Verify` says
/// alive, `Terminate` says it was running, `List` is empty. Returns its `host:port` name.
pub async fn noop_agent() -> String {
    let display = AtomicU32::new(10);
    serve_agent(move |req| match req {
        AgentRequest::Start { session_id, user, geometry, .. } => AgentReply::Started {
            session: stand_in_desktop(session_id, user, geometry, display.fetch_add(1, Ordering::Relaxed), 0),
        },
        AgentRequest::Verify { .. } => AgentReply::Verified { alive: true },
        AgentRequest::Terminate { .. } => AgentReply::Terminated { was_running: true },
        AgentRequest::List => AgentReply::Sessions { sessions: vec![], load: LoadReport::default() },
        AgentRequest::Load => AgentReply::Load { load: LoadReport::default() },
    })
    .await
}

/// An agent that keeps the desktops it started (and those handed to it with
/// [`RecordingAgent::hold`]) until told to end them, and reports them in
/// `List` with its load, as a real agent does; nothing is spawned. Each desktop is reported
/// with one viewer attached, as after a login, so a reconciliation sweep finds it as the
/// master stored it and changes nothing.
#[derive(Clone)]
pub struct RecordingAgent {
    /// `127.0.0.1:port`, the name the master knows it by.
    pub name: String,
    desktops: Arc<Desktops>,
}

struct Desktops {
    next_display: AtomicU32,
    running: Mutex<HashMap<SessionId, AgentSession>>,
}

impl Desktops {
    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<SessionId, AgentSession>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn start(&self, session_id: SessionId, user: String, geometry: Option<String>) -> AgentSession {
        let d = self.next_display.fetch_add(1, Ordering::Relaxed);
        let mut running = self.running();
        running.entry(session_id.clone()).or_insert_with(|| stand_in_desktop(session_id, user, geometry, d, 1)).clone()
    }

    fn load(&self, sessions: usize) -> LoadReport {
        LoadReport {
            hostname: "bench-agent".into(),
            cpus: 8,
            mem_total_kib: 32 << 20,
            mem_available_kib: 16 << 20,
            sessions: sessions as u32,
            now_ms: now_ms(),
            ..LoadReport::default()
        }
    }

    fn answer(&self, req: AgentRequest) -> AgentReply {
        match req {
            AgentRequest::Start { session_id, user, geometry, .. } => {
                AgentReply::Started { session: self.start(session_id, user, geometry) }
            }
            AgentRequest::Verify { session_id, .. } => {
                AgentReply::Verified { alive: self.running().contains_key(&session_id) }
            }
            AgentRequest::Terminate { session_id, .. } => {
                AgentReply::Terminated { was_running: self.running().remove(&session_id).is_some() }
            }
            AgentRequest::List => {
                let sessions: Vec<AgentSession> = self.running().values().cloned().collect();
                let load = self.load(sessions.len());
                AgentReply::Sessions { sessions, load }
            }
            AgentRequest::Load => AgentReply::Load { load: self.load(self.running().len()) },
        }
    }
}

impl RecordingAgent {
    /// Listens on `127.0.0.1:0`; its tasks run on the runtime that calls this.
    pub async fn start() -> RecordingAgent {
        let desktops = Arc::new(Desktops { next_display: AtomicU32::new(10), running: Mutex::new(HashMap::new()) });
        let d = desktops.clone();
        let name = serve_agent(move |req| d.answer(req)).await;
        RecordingAgent { name, desktops }
    }

    /// A desktop of `user` started here without the master asking (for a fill through
    /// `ApiRequest::SessionPut`): the session to store for it.
    pub fn hold(&self, user: String) -> Session {
        let a = self.desktops.start(SessionId::generate(), user, None);
        Session {
            id: a.session_id,
            user: a.user,
            subcluster: "default".into(),
            agent: self.name.clone(),
            agent_address: a.agent_address,
            display: a.display,
            vnc_port: a.vnc_port,
            status: SessionStatus::Running,
            created_ms: a.started_ms,
            last_connect_ms: a.started_ms,
            last_client_address: "192.0.2.1".into(),
            pid: a.pid,
            command: a.command,
            geometry: a.geometry,
            client_params: vec![],
        }
    }

    /// Desktops running here now.
    pub fn running(&self) -> usize {
        self.desktops.running().len()
    }
}

/// Serves the agent protocol on `127.0.0.1:0`, one reply from `answer` per request, on the
/// runtime that calls this. Returns the agent's `host:port` name.
async fn serve_agent(answer: impl Fn(AgentRequest) -> AgentReply + Send + Sync + 'static) -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind a stand-in agent");
    let port = l.local_addr().expect("agent address").port();
    let secret = Secret::from_bytes(CLUSTER_SECRET);
    let answer = Arc::new(answer);
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = l.accept().await else { return };
            let _ = sock.set_nodelay(true);
            let secret = secret.clone();
            let answer = answer.clone();
            tokio::spawn(async move {
                let _ = serve_agent_conn(sock, &secret, |req| {
                    let reply = answer(req);
                    async move { reply }
                })
                .await;
            });
        }
    });
    format!("127.0.0.1:{port}")
}

/// A master's configuration under `base/name`; SQLite `synchronous` is FULL (the default of
/// the product) unless the caller changes it or `VSM_BENCH_SYNC=normal` is set (to tell the
/// cost of the disk's flushes from the rest).
pub fn master_config(base: &Path, name: &str, agents: &[String]) -> Config {
    let mut cfg = vsm::testkit::master_config(base, name, agents);
    cfg.vsmserver.agent_timeout = Duration::from_secs(5);
    cfg.vsmserver.max_sessions_per_user = 0;
    cfg.vsmserver.admin_group = None;
    cfg.vsmserver.db_synchronous = match std::env::var("VSM_BENCH_SYNC").as_deref() {
        Ok("normal") => DbSynchronous::Normal,
        Ok("full") | Err(_) => DbSynchronous::Full,
        Ok(other) => panic!("VSM_BENCH_SYNC={other}: expected full or normal"),
    };
    cfg
}

/// Turns `cfg` into one of two HA nodes `bench-a` / `bench-b`.
pub fn with_ha(cfg: Config, local: &str, sync: SyncLevel) -> Config {
    let mut cfg = vsm::testkit::with_ha(cfg, ["bench-a", "bench-b"], local);
    cfg.ha.sync = sync;
    cfg.ha.sync_timeout = Duration::from_secs(2);
    cfg.ha.startup_grace = Duration::from_secs(60);
    cfg.ha.heartbeat_interval = Duration::from_millis(200);
    cfg.ha.peer_timeout = Duration::from_secs(3);
    cfg
}

/// Starts a master in this process with already bound listeners.
pub async fn start_master(cfg: Config, peer: Option<TcpListener>, peer_addr: Option<String>) -> Server {
    let tcp = TcpListener::bind("127.0.0.1:0").await.expect("bind the tcp port");
    vsm::testkit::start_master(cfg, tcp, peer, peer_addr, false).await.expect("master starts")
}

/// Two HA masters `bench-a` and `bench-b`, both started, with their configurations.
pub struct Pair {
    pub a: Option<Server>,
    pub b: Option<Server>,
    pub cfg_a: Config,
    pub cfg_b: Config,
    pub port_a: u16,
    pub port_b: u16,
}

impl Pair {
    pub fn configs(base: &Path, agents: &[String], sync: SyncLevel) -> (Config, Config) {
        (
            with_ha(master_config(base, "a", agents), "bench-a", sync),
            with_ha(master_config(base, "b", agents), "bench-b", sync),
        )
    }

    /// Binds both peer ports, then starts `a` and (if `start_b`) `b`.
    pub async fn start(cfg_a: Config, cfg_b: Config, start_b: bool) -> Pair {
        let la = TcpListener::bind("127.0.0.1:0").await.expect("bind peer port a");
        let lb = TcpListener::bind("127.0.0.1:0").await.expect("bind peer port b");
        let (port_a, port_b) = (la.local_addr().unwrap().port(), lb.local_addr().unwrap().port());
        drop(lb);
        let a = start_master(cfg_a.clone(), Some(la), Some(format!("127.0.0.1:{port_b}"))).await;
        let mut p = Pair { a: Some(a), b: None, cfg_a, cfg_b, port_a, port_b };
        if start_b {
            p.start_b().await;
        }
        p
    }

    /// (Re)starts `b` on its peer port.
    pub async fn start_b(&mut self) {
        let lb = TcpListener::bind(("127.0.0.1", self.port_b)).await.expect("bind peer port b again");
        let b = start_master(self.cfg_b.clone(), Some(lb), Some(format!("127.0.0.1:{}", self.port_a))).await;
        self.b = Some(b);
    }

    pub fn a(&self) -> &Server {
        self.a.as_ref().expect("a runs")
    }

    pub fn b(&self) -> &Server {
        self.b.as_ref().expect("b runs")
    }

    pub async fn stop(mut self) {
        if let Some(b) = self.b.take() {
            b.stop().await;
        }
        if let Some(a) = self.a.take() {
            a.stop().await;
        }
    }
}

/// Is the node's replication streaming (both directions caught up)?
pub fn streaming(s: &Server) -> bool {
    s.ha.replication_status().is_some_and(|st| st.ready && st.link == LinkState::Streaming)
}

/// Polls `f` every `every` until it is true or `deadline` passed; returns whether it became true.
pub async fn wait_for(deadline: Duration, every: Duration, mut f: impl FnMut() -> bool) -> bool {
    vsm::testkit::wait_until_every(deadline, every, || {
        let done = f();
        async move { done }
    })
    .await
}

/// A session record as an admin import would store it.
pub fn session(n: u64, users: u64, agents: u64) -> Session {
    Session {
        id: SessionId::generate(),
        user: format!("user{}", n % users),
        subcluster: "default".into(),
        agent: format!("agent{}.example.com", n % agents),
        agent_address: format!("10.0.{}.{}", (n % agents) / 250, (n % agents) % 250 + 1),
        display: 10 + (n / agents) as u32 % 1000,
        vnc_port: 5910,
        status: SessionStatus::Running,
        created_ms: now_ms(),
        last_connect_ms: now_ms(),
        last_client_address: "192.0.2.7".into(),
        pid: 4242,
        command: vec!["Xvnc".into(), ":10".into(), "-rfbport".into(), "5910".into()],
        geometry: "1280x800".into(),
        client_params: vec![],
    }
}

/// One persistent API connection over the Unix socket.
pub struct ApiConn(PlainConn<UnixStream>);

impl ApiConn {
    pub async fn open(path: &Path) -> ApiConn {
        // The limits of the real client (`vsm::client`), so a long listing fits as it does there.
        let stream = UnixStream::connect(path).await.expect("connect to the unix socket");
        ApiConn(PlainConn::with_limits(stream, vsm::proto::api::MAX_REPLY, vsm::proto::api::MAX_REQUEST))
    }

    pub async fn call(&mut self, req: &ApiRequest) -> ApiReply {
        self.0.send(req).await.expect("send a request");
        self.0.recv::<ApiReply>().await.expect("read a reply").expect("a reply before close")
    }
}

/// Latency figures of one run.
pub struct Stats {
    pub count: usize,
    pub elapsed: Duration,
    pub p50: Duration,
    pub p90: Duration,
    pub p99: Duration,
    pub max: Duration,
}

impl Stats {
    pub fn new(mut lat: Vec<Duration>, elapsed: Duration) -> Stats {
        lat.sort();
        let pick = |q: f64| {
            if lat.is_empty() {
                Duration::ZERO
            } else {
                lat[((lat.len() as f64 * q).ceil() as usize).clamp(1, lat.len()) - 1]
            }
        };
        Stats { count: lat.len(), elapsed, p50: pick(0.50), p90: pick(0.90), p99: pick(0.99), max: pick(1.0) }
    }

    pub fn rate(&self) -> f64 {
        self.count as f64 / self.elapsed.as_secs_f64()
    }

    pub fn line(&self) -> String {
        format!(
            "{} ops in {:.3} s = {:.0}/s, p50 {}, p90 {}, p99 {}, max {}",
            self.count,
            self.elapsed.as_secs_f64(),
            self.rate(),
            us(self.p50),
            us(self.p90),
            us(self.p99),
            us(self.max)
        )
    }
}

pub fn us(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}

/// Median of a few runs' figures.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    if v.is_empty() {
        0.0
    } else {
        v[v.len() / 2]
    }
}

/// `uptime` and the core count, printed before the figures. Also turns on logging to
/// stderr when `RUST_LOG` is set (to see what the masters do during a run).
pub fn machine_note() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .try_init();
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    println!(
        "# machine: {cores} cores, load average {}",
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );
}

/// How many runs: `VSM_BENCH_RUNS`, default 3.
pub fn runs() -> usize {
    std::env::var("VSM_BENCH_RUNS").ok().and_then(|s| s.parse().ok()).filter(|&n| n > 0).unwrap_or(3)
}

/// Path of the release `vsmserver` built alongside the benchmark.
pub fn vsmserver_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_vsmserver"))
}
