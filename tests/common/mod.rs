//! Shared helpers for in-process clusters: agents and masters on 127.0.0.1:0 with temporary
//! directories, a `wait_until` poll, and `assert_converged`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use vsm::client::{call, Target};
use vsm::config::Config;
use vsm::proto::api::{ApiReply, ApiRequest, ConnectInfo};
use vsm::server::Server;

pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
}

#[allow(unused_imports)]
pub use vsm::testkit::{own_group, wait_until};

/// Writes a secret file, private to its owner as the daemons require.
pub fn write_secret(path: &Path, bytes: &[u8]) {
    vsm::testkit::write_secret(path, bytes).unwrap();
}

/// An agent running in this process.
pub struct TestAgent {
    pub name: String,
    pub port: u16,
    pub state_dir: PathBuf,
    agent: vsm::testkit::LoopbackAgent,
}

impl TestAgent {
    pub async fn start(base: &Path, idx: u32, master_port: u16, command: Vec<String>) -> TestAgent {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::start_on(base, idx, master_port, command, l).await
    }

    pub async fn start_on(base: &Path, idx: u32, master_port: u16, command: Vec<String>, l: TcpListener) -> TestAgent {
        Self::start_with(base, idx, master_port, command, l, false).await
    }

    /// `keep_sessions`: sessions survive `stop` (as in production) instead of being ended.
    pub async fn start_with(
        base: &Path,
        idx: u32,
        master_port: u16,
        command: Vec<String>,
        l: TcpListener,
        keep_sessions: bool,
    ) -> TestAgent {
        let cfg = vsm::testkit::agent_config(base, &format!("agent{idx}"), idx, master_port, command);
        let x_dir = base.join(format!("x{idx}"));
        let agent = vsm::testkit::LoopbackAgent::start(cfg, l, Some(x_dir), keep_sessions).await.unwrap();
        TestAgent { name: agent.name.clone(), port: agent.port, state_dir: agent.state_dir.clone(), agent }
    }

    pub async fn stop(self) {
        self.agent.stop().await.unwrap();
    }
}

/// A master running in this process, reached through its real Unix socket.
pub struct TestMaster {
    pub cfg: Config,
    pub server: Option<Server>,
    pub tcp_port: u16,
    pub peer_port: u16,
}

pub fn master_config(base: &Path, name: &str, agents: &[String]) -> Config {
    let mut cfg = vsm::testkit::master_config(base, name, agents);
    cfg.vsmserver.agent_timeout = Duration::from_secs(3);
    cfg
}

impl TestMaster {
    pub async fn start(
        cfg: Config,
        tcp: TcpListener,
        peer: Option<TcpListener>,
        peer_addr: Option<String>,
    ) -> TestMaster {
        let tcp_port = tcp.local_addr().unwrap().port();
        let peer_port = peer.as_ref().map(|p| p.local_addr().unwrap().port()).unwrap_or(0);
        let server = vsm::testkit::start_master(cfg.clone(), tcp, peer, peer_addr, false).await.unwrap();
        TestMaster { cfg, server: Some(server), tcp_port, peer_port }
    }

    pub async fn standalone(cfg: Config) -> TestMaster {
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::start(cfg, tcp, None, None).await
    }

    pub fn target(&self) -> Target {
        Target::Unix(self.cfg.vsmserver.socket_path.clone())
    }

    pub fn server(&self) -> &Server {
        self.server.as_ref().expect("master is running")
    }

    pub async fn call(&self, req: ApiRequest) -> ApiReply {
        call(&self.target(), &req, Duration::from_secs(20)).await.expect("master answers")
    }

    pub async fn connect(&self, user: &str, new: bool) -> Result<ConnectInfo, (vsm::proto::api::ApiErrorKind, String)> {
        match self
            .call(ApiRequest::Connect {
                user: Some(user.into()),
                new,
                terminate_existing: false,
                geometry: None,
                client_address: None,
            })
            .await
        {
            ApiReply::Connected { info } => Ok(info),
            ApiReply::Error { kind, message } => Err((kind, message)),
            other => panic!("unexpected reply {other:?}"),
        }
    }

    /// The node's metrics as a scrape of `/metrics` would show them.
    pub async fn scrape(&self) -> Scrape {
        let s = self.server();
        let api = vsm::api::Api::new(s.broker.clone(), s.ha.clone(), s.metrics.clone());
        Scrape::parse(&vsm::api::http::metrics(&api, vsm::metrics::Format::Prometheus).await)
    }

    pub async fn stop(&mut self) {
        if let Some(s) = self.server.take() {
            s.stop().await;
        }
    }
}

/// A scrape in the Prometheus text format: metric types by family and sample values by
/// series (`name{labels}`), every value checked to be a finite number.
pub struct Scrape {
    /// Family name → `counter`, `gauge`, `histogram`...
    pub types: std::collections::BTreeMap<String, String>,
    pub samples: std::collections::BTreeMap<String, f64>,
}

impl Scrape {
    pub fn parse(text: &str) -> Scrape {
        let mut types = std::collections::BTreeMap::new();
        let mut samples = std::collections::BTreeMap::new();
        for line in text.lines() {
            if let Some(t) = line.strip_prefix("# TYPE ") {
                let (name, ty) = t.split_once(' ').unwrap_or_else(|| panic!("bad TYPE line {line:?}"));
                assert!(types.insert(name.to_string(), ty.to_string()).is_none(), "{name} typed twice");
            } else if line.starts_with('#') || line.is_empty() {
                continue;
            } else {
                // The value follows the last space; label values may hold spaces.
                let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("bad sample {line:?}"));
                let v: f64 = value.parse().unwrap_or_else(|_| panic!("bad value in {line:?}"));
                assert!(v.is_finite(), "not a finite number: {line:?}");
                assert!(samples.insert(series.to_string(), v).is_none(), "{series} twice");
            }
        }
        Scrape { types, samples }
    }

    pub fn value(&self, series: &str) -> f64 {
        *self.samples.get(series).unwrap_or_else(|| panic!("no series {series} in {:?}", self.samples.keys()))
    }

    /// The sum of every series of `name` whose labels include `label` (e.g. `direction="sent"`).
    pub fn sum(&self, name: &str, label: &str) -> f64 {
        self.samples
            .iter()
            .filter(|(k, _)| k.starts_with(&format!("{name}{{")) && k.contains(label))
            .map(|(_, v)| v)
            .sum()
    }

    pub fn ty(&self, name: &str) -> &str {
        self.types.get(name).unwrap_or_else(|| panic!("no family {name}"))
    }
}

/// A temporary cluster directory with both secrets written.
pub fn cluster_dir() -> tempfile::TempDir {
    let d = tempfile::Builder::new().prefix("vsm-test-").tempdir().unwrap();
    write_secret(&d.path().join("cluster.key"), b"cluster secret for tests");
    write_secret(&d.path().join("ha.key"), b"ha secret for tests");
    d
}

pub fn sleep_command() -> Vec<String> {
    vec!["sleep".into(), "600".into()]
}

/// Is `pid` alive (and not a zombie)?
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'),
        Err(_) => false,
    }
}

// ----- HA: two masters, a cuttable link between them, convergence checks -----

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use vsm::model::{Session, SessionId, SessionStatus};
use vsm::proto::api::{ApiErrorKind, HaStatusView, Selector};

/// How long two masters may take to converge once nothing keeps them apart.
pub const CONVERGE: Duration = Duration::from_secs(30);

struct ProxyState {
    target: u16,
    cut: bool,
    /// While set, relayed bytes are dropped and connections stay open (a pulled cable).
    stalled: Arc<AtomicBool>,
    /// Cancelled on `cut`: ends every connection proxied so far.
    conns: CancellationToken,
}

/// A TCP relay between the two masters' peer ports: `cut` closes every relayed connection and
/// turns new ones away until `heal`, without touching either node.
pub struct Proxy {
    pub port: u16,
    state: Arc<Mutex<ProxyState>>,
    accepted: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(target: u16) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(ProxyState {
            target,
            cut: false,
            stalled: Arc::new(AtomicBool::new(false)),
            conns: CancellationToken::new(),
        }));
        let accepted = Arc::new(AtomicU64::new(0));
        let (st, acc) = (state.clone(), accepted.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = l.accept().await else { continue };
                acc.fetch_add(1, Ordering::SeqCst);
                let (cut, target, token, stalled) = {
                    let s = st.lock().unwrap();
                    (s.cut, s.target, s.conns.clone(), s.stalled.clone())
                };
                if cut {
                    drop(inbound);
                    continue;
                }
                tokio::spawn(async move {
                    let Ok(out) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else { return };
                    let (ir, iw) = inbound.into_split();
                    let (or, ow) = out.into_split();
                    tokio::select! {
                        _ = token.cancelled() => {}
                        _ = relay(ir, ow, stalled.clone()) => {}
                        _ = relay(or, iw, stalled) => {}
                    }
                });
            }
        });
        Proxy { port, state, accepted, task }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn set_target(&self, port: u16) {
        self.state.lock().unwrap().target = port;
    }

    /// Closes every relayed connection and refuses new ones until [`Proxy::heal`].
    pub fn cut(&self) {
        let mut s = self.state.lock().unwrap();
        s.cut = true;
        s.conns.cancel();
        s.conns = CancellationToken::new();
    }

    pub fn heal(&self) {
        let mut s = self.state.lock().unwrap();
        s.cut = false;
        s.stalled.store(false, Ordering::SeqCst);
    }

    /// Drops every relayed byte from now on while keeping the connections open, like a pulled
    /// cable: neither node notices until its peer timeout. A stalled stream is broken for good;
    /// follow with [`Proxy::cut`] and [`Proxy::heal`].
    pub fn stall(&self) {
        self.state.lock().unwrap().stalled.store(true, Ordering::SeqCst);
    }

    pub fn is_cut(&self) -> bool {
        self.state.lock().unwrap().cut
    }

    /// Connections accepted so far, relayed or turned away.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// Copies `r` to `w` until either side closes; drops the bytes while `stalled`.
async fn relay(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    stalled: Arc<AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if !stalled.load(Ordering::SeqCst) && w.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.state.lock().unwrap().conns.cancel();
    }
}

/// Node ids of a pair; the first sorts lower, so it dials (through the proxy).
pub const NODES: [&str; 2] = ["a", "b"];

/// HA settings shared by the pair tests: `ack`, generous timeouts so a loaded machine does not
/// turn an acknowledged write into a timed-out one.
pub fn ha_config(base: &Path, node: usize, agents: &[String]) -> Config {
    let mut cfg = vsm::testkit::with_ha(master_config(base, NODES[node], agents), NODES, NODES[node]);
    cfg.ha.sync = vsm::config::SyncLevel::Ack;
    cfg.ha.sync_timeout = Duration::from_secs(15);
    cfg.ha.startup_grace = Duration::from_secs(60);
    cfg.ha.heartbeat_interval = Duration::from_millis(100);
    cfg.ha.peer_timeout = Duration::from_secs(5);
    cfg.ha.ready_wait = Duration::from_secs(1);
    cfg
}

/// Two masters `a` and `b` with HA on, `a` dialing `b` through a [`Proxy`].
pub struct TestPair {
    pub cfg: [Config; 2],
    nodes: [Option<TestMaster>; 2],
    pub proxy: Proxy,
}

impl TestPair {
    /// Configures both nodes (`tweak` may change each config) without starting them.
    pub async fn new(base: &Path, agents: &[String], tweak: impl Fn(usize, &mut Config)) -> TestPair {
        let cfg = [0, 1].map(|i| {
            let mut c = ha_config(base, i, agents);
            tweak(i, &mut c);
            c
        });
        TestPair { cfg, nodes: [None, None], proxy: Proxy::start(1).await }
    }

    /// Configures and starts both nodes.
    pub async fn start(base: &Path, agents: &[String], tweak: impl Fn(usize, &mut Config)) -> TestPair {
        let mut p = TestPair::new(base, agents, tweak).await;
        p.start_node(1).await;
        p.start_node(0).await;
        p
    }

    pub fn node(&self, i: usize) -> &TestMaster {
        self.nodes[i].as_ref().unwrap_or_else(|| panic!("node {} is running", NODES[i]))
    }

    pub fn a(&self) -> &TestMaster {
        self.node(0)
    }

    pub fn b(&self) -> &TestMaster {
        self.node(1)
    }

    pub fn is_running(&self, i: usize) -> bool {
        self.nodes[i].is_some()
    }

    pub async fn start_node(&mut self, i: usize) {
        assert!(self.nodes[i].is_none(), "node {} already runs", NODES[i]);
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer_addr = if i == 0 {
            self.proxy.addr()
        } else {
            self.proxy.set_target(peer.local_addr().unwrap().port());
            // b never dials (its id sorts after a's).
            "127.0.0.1:9".to_string()
        };
        self.nodes[i] = Some(TestMaster::start(self.cfg[i].clone(), tcp, Some(peer), Some(peer_addr)).await);
    }

    /// Stops a node in the orderly way.
    pub async fn stop_node(&mut self, i: usize) {
        if let Some(mut m) = self.nodes[i].take() {
            m.stop().await;
        }
    }

    /// Stops a node abruptly (see `Server::kill`).
    pub async fn kill_node(&mut self, i: usize) {
        if let Some(mut m) = self.nodes[i].take() {
            m.kill().await;
        }
    }

    /// Removes a stopped node's data directory (a reinstalled machine).
    pub fn wipe(&self, i: usize) {
        assert!(self.nodes[i].is_none(), "wipe only a stopped node");
        let _ = std::fs::remove_dir_all(&self.cfg[i].vsmserver.data_dir);
    }

    /// Kills and starts a node again, with an empty database when `wipe` is set.
    pub async fn restart(&mut self, i: usize, wipe: bool) {
        self.kill_node(i).await;
        if wipe {
            self.wipe(i);
        }
        self.start_node(i).await;
    }

    pub fn cut(&self) {
        self.proxy.cut();
    }

    pub fn heal(&self) {
        self.proxy.heal();
    }

    /// The link between the nodes goes silent without closing (see [`Proxy::stall`]).
    pub fn stall(&self) {
        self.proxy.stall();
    }

    /// Waits until both nodes are ready and the link streams both ways.
    pub async fn wait_streaming(&self) -> bool {
        wait_until(CONVERGE, || async {
            let (a, b) = (self.a().ha_status().await, self.b().ha_status().await);
            a.ready && b.ready && [a.link, b.link] == [vsm::model::LinkState::Streaming; 2]
        })
        .await
    }

    pub async fn assert_converged(&self) {
        assert_converged(self.a(), self.b()).await;
    }

    pub async fn stop(mut self) {
        self.stop_node(0).await;
        self.stop_node(1).await;
    }

    /// How a multi-node test ends: both nodes converge (see [`assert_converged`]), then stop.
    pub async fn converge_and_stop(self) {
        self.assert_converged().await;
        self.stop().await;
    }
}

/// Waits (bounded by [`CONVERGE`]) until both databases have the same digest, then checks that
/// the live session sets are identical. Panics with the differences otherwise.
pub async fn assert_converged(a: &TestMaster, b: &TestMaster) {
    let (da, db) = (a.server().db.clone(), b.server().db.clone());
    let same = wait_until(CONVERGE, || {
        let (da, db) = (da.clone(), db.clone());
        async move {
            match (da.digest().await, db.digest().await) {
                (Ok(x), Ok(y)) => x == y,
                _ => false,
            }
        }
    })
    .await;
    let la = da.list(&Default::default()).await.unwrap();
    let lb = db.list(&Default::default()).await.unwrap();
    if !same {
        let ids = |l: &[Session]| l.iter().map(|s| s.id.clone()).collect::<std::collections::BTreeSet<_>>();
        let (ia, ib) = (ids(&la), ids(&lb));
        panic!(
            "the masters did not converge within {CONVERGE:?}:\n a: {} live, status {:?}\n b: {} live, status {:?}\n only on a: {:?}\n only on b: {:?}",
            la.len(),
            a.ha_status().await,
            lb.len(),
            b.ha_status().await,
            ia.difference(&ib).collect::<Vec<_>>(),
            ib.difference(&ia).collect::<Vec<_>>(),
        );
    }
    let sort = |mut l: Vec<Session>| {
        l.sort_by(|x, y| x.id.cmp(&y.id));
        l
    };
    assert_eq!(sort(la), sort(lb), "same digest but different live sessions");
}

impl TestMaster {
    /// Stops abruptly, as a crash would.
    pub async fn kill(&mut self) {
        if let Some(s) = self.server.take() {
            s.kill().await;
        }
    }

    pub async fn ha_status(&self) -> HaStatusView {
        match self.call(ApiRequest::HaStatus).await {
            ApiReply::HaStatus { status } => *status,
            other => panic!("unexpected reply to ha status: {other:?}"),
        }
    }

    /// `tlctl ha check`: `Ok` when ready.
    pub async fn ha_check(&self) -> Result<(), (ApiErrorKind, String)> {
        match self.call(ApiRequest::HaCheck).await {
            ApiReply::Ok { .. } => Ok(()),
            ApiReply::Error { kind, message } => Err((kind, message)),
            other => panic!("unexpected reply to ha check: {other:?}"),
        }
    }

    /// Stores a made-up session for `user` through the admin API (answered after replication
    /// in `ack` mode); its agent is `agent`.
    pub async fn put_session(&self, user: &str, agent: &str) -> Session {
        let now = vsm::model::now_ms();
        let s = Session {
            id: SessionId::generate(),
            user: user.into(),
            subcluster: "default".into(),
            agent: agent.into(),
            agent_address: "127.0.0.1".into(),
            display: 10,
            vnc_port: 5910,
            status: SessionStatus::Disconnected,
            created_ms: now,
            last_connect_ms: now,
            last_client_address: String::new(),
            pid: 1,
            command: vec!["true".into()],
            geometry: "1024x768".into(),
            client_params: vec![],
        };
        let r = self.call(ApiRequest::SessionPut { session: s.clone() }).await;
        assert!(matches!(r, ApiReply::Ok { .. }), "session put: {r:?}");
        s
    }

    /// Ends every session of `user` through the admin API, forgetting those whose agent
    /// cannot be reached.
    pub async fn terminate_user(&self, user: &str) -> ApiReply {
        self.call(ApiRequest::SessionTerminate {
            selector: Selector { user: Some(user.into()), ..Default::default() },
            all: false,
            allow_abandon: true,
            dry_run: false,
        })
        .await
    }

    pub async fn session_ids(&self) -> std::collections::BTreeSet<SessionId> {
        self.server().db.list(&Default::default()).await.unwrap().into_iter().map(|s| s.id).collect()
    }
}

// ----- Agents that stall or answer late -----

/// A TCP relay in front of an agent that can hold back what either side sends, as a stopped
/// (SIGSTOP) or cut-off agent would: held bytes and closes are delivered, in order, on release.
pub struct Relay {
    pub port: u16,
    to_agent: tokio::sync::watch::Sender<bool>,
    to_master: tokio::sync::watch::Sender<bool>,
    open: Arc<Mutex<std::collections::BTreeSet<u64>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    pub async fn start(agent_port: u16) -> Relay {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let (to_agent, held_in) = tokio::sync::watch::channel(false);
        let (to_master, held_out) = tokio::sync::watch::channel(false);
        let open = Arc::new(Mutex::new(std::collections::BTreeSet::new()));
        let open2 = open.clone();
        let task = tokio::spawn(async move {
            for id in 0u64.. {
                let Ok((inbound, _)) = l.accept().await else { continue };
                let Ok(outbound) = tokio::net::TcpStream::connect(("127.0.0.1", agent_port)).await else { continue };
                let (mr, mw) = inbound.into_split();
                let (ar, aw) = outbound.into_split();
                let (held_in, held_out, open) = (held_in.clone(), held_out.clone(), open2.clone());
                open.lock().unwrap().insert(id);
                tokio::spawn(async move {
                    tokio::join!(pump(mr, aw, held_in), pump(ar, mw, held_out));
                    open.lock().unwrap().remove(&id);
                });
            }
        });
        Relay { port, to_agent, to_master, open, task }
    }

    /// The agent name masters use to reach the agent through the relay.
    pub fn name(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Hold what masters send (requests and closes) until [`Relay::release`].
    pub fn hold_requests(&self) {
        self.to_agent.send_replace(true);
    }

    /// Hold what the agent sends (answers) until [`Relay::release`].
    pub fn hold_answers(&self) {
        self.to_master.send_replace(true);
    }

    pub fn release(&self) {
        self.to_agent.send_replace(false);
        self.to_master.send_replace(false);
    }

    /// Ids of the relayed connections not yet closed on both sides.
    pub fn open_connections(&self) -> std::collections::BTreeSet<u64> {
        self.open.lock().unwrap().clone()
    }

    /// Are all of `ids` closed on both sides (everything held on them delivered)?
    pub fn closed(&self, ids: &std::collections::BTreeSet<u64>) -> bool {
        self.open.lock().unwrap().is_disjoint(ids)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies `from` to `to`, waiting while `held`; an end or error of `from` becomes a close of
/// `to` after everything read before it.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut held: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = from.read(&mut buf).await;
        let _ = held.wait_for(|h| !*h).await;
        match n {
            Ok(n) if n > 0 => {
                if to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
            _ => {
                let _ = to.shutdown().await;
                return;
            }
        }
    }
}

/// Sessions an agent runs, asked directly (not through any relay).
pub async fn agent_sessions(base: &Path, agent_port: u16) -> Vec<vsm::proto::agent::AgentSession> {
    let secret = vsm::proto::secure::Secret::from_file(base.join("cluster.key")).unwrap();
    let c = vsm::agent::AgentClient::new(vsm::agent::AgentClientConfig {
        secret,
        port: agent_port,
        timeout: Duration::from_secs(10),
    });
    c.list("127.0.0.1").await.expect("the agent answers").0
}
