//! In-process clusters on loopback, shared by `vsmserver demo`, the integration tests
//! (`tests/common`) and the benchmarks (`benches/common`): configurations of masters and
//! agents under one temporary directory, secrets written as the daemons require, masters and
//! agents started on already bound listeners, HA pairs, and the one polling helper,
//! [`wait_until`] (with [`wait_for`] for conditions that need no `.await`).
//!
//! Owns nothing the daemons run on: it only wires the library's own pieces (`server`,
//! `agentd`) the way `vsmserver` and `vsmagent` do, with listeners on `127.0.0.1`.
//! Never: sleeps to synchronise (callers poll with [`wait_until`] under a deadline), binds
//! anything but loopback, or reads configuration files.
//!
//! Invariants: every secret it writes is `0600`; an agent started here runs its sessions as
//! the calling user; a master started here has no HTTP endpoint.

use crate::config::{Config, DbSynchronous, Subcluster};
use crate::server::{Listeners, Overrides, Server, ServerError};
use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// How often [`wait_until`] looks again.
pub const POLL: Duration = Duration::from_millis(20);

/// Why an in-process node could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TestkitError {
    #[error("cannot {what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("master did not start: {0}")]
    Master(#[from] ServerError),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> TestkitError {
    let what = what.into();
    move |source| TestkitError::Io { what, source }
}

/// Polls `f` every [`POLL`] until it returns true or `deadline` passes; whether it did.
pub async fn wait_until<F, Fut>(deadline: Duration, f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    wait_until_every(deadline, POLL, f).await
}

/// [`wait_until`] for a condition that needs no `.await` (a file, a process, a counter).
pub async fn wait_for(deadline: Duration, mut f: impl FnMut() -> bool) -> bool {
    wait_until(deadline, || {
        let done = f();
        async move { done }
    })
    .await
}

/// [`wait_until`] polling every `every` (benchmarks timing a failover look more often).
pub async fn wait_until_every<F, Fut>(deadline: Duration, every: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let end = Instant::now() + deadline;
    loop {
        if f().await {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(every).await;
    }
}

/// The calling user's primary group: made the admin group, so the process may act for users.
pub fn own_group() -> Option<String> {
    nix::unistd::Group::from_gid(nix::unistd::getgid()).ok().flatten().map(|g| g.name)
}

/// Writes a secret file, private to its owner as the daemons require.
pub fn write_secret(path: &Path, bytes: &[u8]) -> Result<(), TestkitError> {
    let what = || format!("write the secret {}", path.display());
    std::fs::write(path, bytes).map_err(io(what()))?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).map_err(io(what()))
}

/// Binds `127.0.0.1:port` (0: any free port).
pub async fn bind_loopback(port: u16) -> Result<TcpListener, TestkitError> {
    TcpListener::bind(("127.0.0.1", port)).await.map_err(io(format!("bind 127.0.0.1:{port}")))
}

/// What a stand-in agent (in tests and benchmarks, nothing spawned) reports for a desktop
/// of `user` on display `d` with `viewers` attached, started now.
pub fn stand_in_desktop(
    session_id: crate::model::SessionId,
    user: String,
    geometry: Option<String>,
    d: u32,
    viewers: u32,
) -> crate::proto::agent::AgentSession {
    crate::proto::agent::AgentSession {
        session_id,
        user,
        display: d,
        vnc_port: 5900u16.wrapping_add(d as u16),
        pid: 1000 + d,
        command: vec!["Xvnc".into(), format!(":{d}")],
        geometry: geometry.unwrap_or_else(|| "1024x768".into()),
        started_ms: crate::model::now_ms(),
        agent_address: "127.0.0.1".into(),
        vnc_socket: String::new(),
        viewers,
        last_viewer_ms: 0,
        viewer_address: String::new(),
    }
}

/// A master under `base/name` (socket, data and script directories) with the secrets
/// `base/cluster.key` and `base/ha.key`, one default subcluster of `agents`, reconciliation
/// only when asked (every hour), the calling user's group as admins and HA off.
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
    cfg.vsmserver.admin_group = own_group();
    cfg.vsmserver.db_synchronous = DbSynchronous::Normal;
    let subcluster = Subcluster {
        name: "default".into(),
        agents: agents.to_vec(),
        users: vec![],
        groups: vec![],
        max_users_per_agent: 0,
    };
    cfg.subclusters = BTreeMap::from([("default".to_string(), subcluster)]);
    cfg
}

/// Turns `cfg` into the HA node `local` of the pair `nodes`.
pub fn with_ha(mut cfg: Config, nodes: [&str; 2], local: &str) -> Config {
    cfg.ha.enabled = true;
    cfg.ha.nodes = nodes.iter().map(|s| s.to_string()).collect();
    cfg.ha.local_node = Some(local.into());
    cfg
}

/// Starts a master in this process on already bound listeners (its Unix socket is bound here),
/// reaching its HA peer at `peer_addr`. `background_reconcile` off leaves reconciliation to
/// the caller, as the tests want.
pub async fn start_master(
    cfg: Config,
    tcp: TcpListener,
    peer: Option<TcpListener>,
    peer_addr: Option<String>,
    background_reconcile: bool,
) -> Result<Server, TestkitError> {
    let unix = crate::server::bind_unix(&cfg.vsmserver.socket_path)?;
    let ov = Overrides { agent_port: None, peer_addr, no_background_reconcile: !background_reconcile };
    Ok(Server::start(cfg, Listeners { unix, tcp, peer, http: None }, ov).await?)
}

/// Agent number `idx` under `base/<name>` reporting to the master port `master_port` on
/// loopback: displays `10 + 100 idx` to `99 + 100 idx` (so agents of one test never share
/// one), desktops run by `command`.
pub fn agent_config(base: &Path, name: &str, idx: u32, master_port: u16, command: Vec<String>) -> Config {
    let mut cfg = Config::default();
    cfg.vsm.secret_file = base.join("cluster.key");
    cfg.vsm.vsm_server_port = master_port;
    cfg.vsmagent.master_hostname = "127.0.0.1".into();
    cfg.vsmagent.state_dir = base.join(name);
    cfg.vsmagent.display_min = 10 + 100 * idx;
    cfg.vsmagent.display_max = 99 + 100 * idx;
    cfg.vsm.vnc_port_base = 21000;
    cfg.vsm.vnc_socket_dir = base.join(format!("{name}-run"));
    cfg.vsmagent.session_command = command;
    cfg
}

/// An agent running in this process until [`LoopbackAgent::stop`].
pub struct LoopbackAgent {
    /// `127.0.0.1:port`, the name masters know it by.
    pub name: String,
    pub port: u16,
    pub state_dir: PathBuf,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), crate::agentd::AgentdError>>,
}

impl LoopbackAgent {
    /// Starts the agent of `cfg` on `listener`, running sessions as the calling user, with its
    /// X files under `x_dir` (if given). `keep_sessions`: sessions survive [`Self::stop`], as
    /// in production, instead of being ended.
    pub async fn start(
        cfg: Config,
        listener: TcpListener,
        x_dir: Option<PathBuf>,
        keep_sessions: bool,
    ) -> Result<LoopbackAgent, TestkitError> {
        let port = listener.local_addr().map_err(io("read the agent's address"))?.port();
        let mut opts = crate::agentd::RunOptions::from_config(&cfg);
        opts.sessions.run_as_self = true;
        opts.sessions.terminate_on_shutdown = !keep_sessions;
        if let Some(x) = x_dir {
            std::fs::create_dir_all(&x).map_err(io(format!("create {}", x.display())))?;
            opts.sessions.x_dir = x;
        }
        let state_dir = cfg.vsmagent.state_dir.clone();
        let cancel = CancellationToken::new();
        let stop = cancel.clone().cancelled_owned();
        let task = tokio::spawn(crate::agentd::run_with(cfg, opts, listener, stop));
        Ok(LoopbackAgent { name: format!("127.0.0.1:{port}"), port, state_dir, cancel, task })
    }

    /// Stops the agent and returns how its run ended.
    pub async fn stop(self) -> Result<(), String> {
        self.cancel.cancel();
        match self.task.await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(e) => Err(format!("the agent task failed: {e}")),
        }
    }

    /// Whether the agent's run has ended (it stops on its own only on an error).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn wait_until_reports_success_and_gives_up_at_the_deadline() {
        let mut n = 0;
        assert!(
            wait_until(Duration::from_secs(5), || {
                n += 1;
                let done = n >= 3;
                async move { done }
            })
            .await
        );
        assert!(!wait_until(Duration::from_millis(50), || async { false }).await);
        let mut m = 0;
        assert!(
            wait_for(Duration::from_secs(5), || {
                m += 1;
                m >= 2
            })
            .await
        );
        assert!(!wait_for(Duration::from_millis(50), || false).await);
    }

    #[test]
    fn secrets_are_private_and_configs_point_into_base() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("cluster.key");
        write_secret(&key, b"k").unwrap();
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o600);
        let m = with_ha(master_config(dir.path(), "a", &["x".into()]), ["a", "b"], "a");
        assert!(m.vsmserver.socket_path.starts_with(dir.path().join("a")));
        assert_eq!((m.ha.enabled, m.ha.local_node.as_deref()), (true, Some("a")));
        let a = agent_config(dir.path(), "agent1", 1, 9000, vec!["true".into()]);
        assert_eq!((a.vsmagent.display_min, a.vsmagent.display_max), (110, 199));
        assert_eq!(a.vsm.secret_file, key);
    }
}
