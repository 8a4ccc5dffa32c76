//! Shared helpers for in-process clusters: agents and masters on 127.0.0.1:0 with temporary
//! directories, a `wait_until` poll, and `assert_converged`.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use vsm::client::{call, Target};
use vsm::config::{Config, Subcluster};
use vsm::proto::api::{ApiReply, ApiRequest, ConnectInfo};
use vsm::server::{Listeners, Overrides, Server};

pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
}

/// Polls `f` every 20 ms until it returns true or `deadline` passes.
pub async fn wait_until<F, Fut>(deadline: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = Instant::now() + deadline;
    loop {
        if f().await {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn own_group() -> Option<String> {
    nix::unistd::Group::from_gid(nix::unistd::getgid()).ok().flatten().map(|g| g.name)
}

pub fn write_secret(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap();
}

/// An agent running in this process.
pub struct TestAgent {
    pub name: String,
    pub port: u16,
    pub state_dir: PathBuf,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl TestAgent {
    pub async fn start(base: &Path, idx: u32, master_port: u16, command: Vec<String>) -> TestAgent {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::start_on(base, idx, master_port, command, l).await
    }

    pub async fn start_on(base: &Path, idx: u32, master_port: u16, command: Vec<String>, l: TcpListener) -> TestAgent {
        let port = l.local_addr().unwrap().port();
        let mut cfg = Config::default();
        cfg.vsm.secret_file = base.join("cluster.key");
        cfg.vsm.vsm_server_port = master_port;
        cfg.vsmagent.master_hostname = "127.0.0.1".into();
        let state_dir = base.join(format!("agent{idx}"));
        cfg.vsmagent.state_dir = state_dir.clone();
        cfg.vsmagent.display_min = 10 + 100 * idx;
        cfg.vsmagent.display_max = 99 + 100 * idx;
        cfg.vsm.vnc_port_base = 21000;
        cfg.vsmagent.session_command = command;
        let mut opts = vsm::agentd::RunOptions::from_config(&cfg);
        opts.sessions.run_as_self = true;
        opts.sessions.x_dir = base.join(format!("x{idx}"));
        std::fs::create_dir_all(&opts.sessions.x_dir).unwrap();
        let cancel = CancellationToken::new();
        let c = cancel.clone();
        let task = tokio::spawn(async move {
            vsm::agentd::run_with(cfg, opts, l, c.cancelled_owned()).await.unwrap();
        });
        TestAgent { name: format!("127.0.0.1:{port}"), port, state_dir, cancel, task }
    }

    pub async fn stop(self) {
        self.cancel.cancel();
        let _ = self.task.await;
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
    let dir = base.join(name);
    let mut cfg = Config::default();
    cfg.vsm.secret_file = base.join("cluster.key");
    cfg.ha.secret_file = base.join("ha.key");
    cfg.vsmserver.socket_path = dir.join("vsmserver.sock");
    cfg.vsmserver.data_dir = dir.join("data");
    cfg.vsmserver.session_startup_dir = dir.join("startup.d");
    cfg.vsmserver.session_reconnect_dir = dir.join("reconnect.d");
    cfg.vsmserver.reconcile_interval = Duration::from_secs(3600);
    cfg.vsmserver.agent_timeout = Duration::from_secs(3);
    cfg.vsmserver.admin_group = own_group();
    cfg.vsmserver.db_synchronous = vsm::config::DbSynchronous::Normal;
    let mut subs = BTreeMap::new();
    subs.insert(
        "default".to_string(),
        Subcluster { name: "default".into(), agents: agents.to_vec(), users: vec![], groups: vec![], max_users_per_agent: 0 },
    );
    cfg.subclusters = subs;
    cfg
}

impl TestMaster {
    pub async fn start(cfg: Config, tcp: TcpListener, peer: Option<TcpListener>, peer_addr: Option<String>) -> TestMaster {
        let tcp_port = tcp.local_addr().unwrap().port();
        let peer_port = peer.as_ref().map(|p| p.local_addr().unwrap().port()).unwrap_or(0);
        let unix = vsm::server::bind_unix(&cfg.vsmserver.socket_path).unwrap();
        let ov = Overrides { agent_port: None, peer_addr, no_background_reconcile: true };
        let server = Server::start(cfg.clone(), Listeners { unix, tcp, peer }, ov).await.unwrap();
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
        match self.call(ApiRequest::Connect { user: Some(user.into()), new, terminate_existing: false, geometry: None, client_address: None }).await {
            ApiReply::Connected { info } => Ok(info),
            ApiReply::Error { kind, message } => Err((kind, message)),
            other => panic!("unexpected reply {other:?}"),
        }
    }

    pub async fn stop(&mut self) {
        if let Some(s) = self.server.take() {
            s.stop().await;
        }
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
