//! Wiring of the master daemon: start-up in order, the background tasks, and shutdown.
//!
//! Start-up order (one log line per step):
//! 1. configuration (validated by the caller) and the HA mode (node resolution);
//! 2. the session database (refused if newer or corrupt);
//! 3. the broker with its agent client and registry;
//! 4. the HA node (peer link and replication engine) when HA is on;
//! 5. the API listeners (already bound by the caller, so tests can use port 0);
//! 6. the reconciliation and housekeeping loops; then the daemon reports ready.
//!
//! Shutdown order (mirrors start-up, bounded by a deadline):
//! 1. stop accepting connections and cancel idle ones;
//! 2. wait for requests in flight (deadline);
//! 3. stop reconciliation and housekeeping, then the HA node (the peer sees a clean close);
//! 4. close the database after its queue drained.
//!
//! Invariant: nothing here decides anything about sessions; it only starts and stops the
//! components that do.

use crate::agent::AgentClient;
use crate::api::{Api, HaControl};
use crate::broker::service::{Broker, Replication};
use crate::config::Config;
use crate::db::{DbHandle, DbOptions};
use crate::ha::node::{HaNode, HaSetup};
use crate::metrics::Metrics;
use crate::proto::secure::Secret;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Why the daemon could not start; each is fatal and printed as one line.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("data directory {path}: {reason}")]
    DataDir { path: PathBuf, reason: String },
    #[error("cannot listen on {what}: {source}")]
    Bind { what: String, source: std::io::Error },
    #[error("{0}")]
    Db(#[from] crate::db::DbError),
    #[error("cluster secret: {0}")]
    Secret(String),
    #[error("high availability: {0}")]
    Ha(String),
}

/// Sockets the daemon serves, bound before [`Server::start`].
pub struct Listeners {
    pub unix: UnixListener,
    pub tcp: TcpListener,
    /// The HA peer port; `None` when HA is off.
    pub peer: Option<TcpListener>,
    /// The health and metrics endpoint; `None` when `/vsmserver/http_port` is 0.
    pub http: Option<TcpListener>,
}

/// Options that are not configuration keys (command-line and test overrides).
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// Port used to reach agents instead of `/vsm/vsm_agent_port` (tests: agents on port 0).
    pub agent_port: Option<u16>,
    /// Address of the peer's HA port instead of resolving `/HA/nodes` (tests, demo).
    pub peer_addr: Option<String>,
    /// Run the node without reconciliation loops (tests drive reconciliation themselves).
    pub no_background_reconcile: bool,
}

/// Binds the Unix socket, the TCP port and (with HA on) the peer port as configured.
pub async fn bind(cfg: &Config) -> Result<Listeners, ServerError> {
    let unix = bind_unix(&cfg.vsmserver.socket_path)?;
    let tcp = bind_tcp(cfg.vsmserver.listen_port, "the client/admin port (/vsmserver/listen_port)").await?;
    let peer = if cfg.ha.enabled { Some(bind_tcp(cfg.ha.port, "the HA peer port (/HA/port)").await?) } else { None };
    let http = if cfg.vsmserver.http_port == 0 {
        None
    } else {
        let addr = format!("{}:{}", cfg.vsmserver.http_address, cfg.vsmserver.http_port);
        let what = || format!("the HTTP endpoint (/vsmserver/http_address, /vsmserver/http_port) {addr}");
        Some(TcpListener::bind(&addr).await.map_err(|source| ServerError::Bind { what: what(), source })?)
    };
    Ok(Listeners { unix, tcp, peer, http })
}

async fn bind_tcp(port: u16, what: &str) -> Result<TcpListener, ServerError> {
    let addr = format!("0.0.0.0:{port}");
    TcpListener::bind(&addr).await.map_err(|source| ServerError::Bind { what: format!("{what} {addr}"), source })
}

/// Binds the Unix socket, replacing a stale socket file left by a crashed daemon but never a
/// socket another live daemon answers on.
pub fn bind_unix(path: &Path) -> Result<UnixListener, ServerError> {
    let what = || format!("the unix socket {}", path.display());
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| ServerError::Bind { what: what(), source })?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ServerError::Bind {
                what: what(),
                source: std::io::Error::new(std::io::ErrorKind::AddrInUse, "another vsmserver is answering on it"),
            });
        }
        let _ = std::fs::remove_file(path);
    }
    let l = UnixListener::bind(path).map_err(|source| ServerError::Bind { what: what(), source })?;
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666));
    Ok(l)
}

fn prepare_data_dir(dir: &Path) -> Result<PathBuf, ServerError> {
    let err = |reason: String| ServerError::DataDir { path: dir.to_path_buf(), reason };
    std::fs::create_dir_all(dir).map_err(|e| err(format!("cannot create it: {e}")))?;
    let probe = dir.join(".vsm-write-test");
    std::fs::write(&probe, b"").map_err(|e| err(format!("not writable: {e}")))?;
    let _ = std::fs::remove_file(&probe);
    Ok(dir.join("sessions.db"))
}

/// A running master.
pub struct Server {
    pub broker: Broker,
    pub db: DbHandle,
    pub ha: Arc<HaNode>,
    /// Every metric family; components update their own, the HTTP endpoint encodes them.
    pub metrics: Metrics,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    background: TaskTracker,
    bg_cancel: CancellationToken,
}

impl Server {
    /// Starts every component in the written order and returns once the node serves requests.
    pub async fn start(cfg: Config, listeners: Listeners, ov: Overrides) -> Result<Server, ServerError> {
        let cfg = Arc::new(cfg);
        let metrics = Metrics::new();
        // 1. HA mode.
        let setup = HaSetup::resolve(&cfg, ov.peer_addr.clone());
        tracing::info!(mode = %setup.describe(), "high availability mode decided");

        // 2. Database.
        let db_path = prepare_data_dir(&cfg.vsmserver.data_dir)?;
        let db = DbHandle::open(DbOptions {
            path: db_path.clone(),
            node: setup.local_node_id(),
            synchronous: cfg.vsmserver.db_synchronous,
            changelog_retention: cfg.ha.changelog_retention,
            tombstone_retention: cfg.ha.tombstone_retention,
        })?;
        let st = db.status().await?;
        tracing::info!(path = %db_path.display(), sessions = st.sessions, head = st.head.0, "session database open");

        // 3. Broker.
        let secret = Secret::from_file(&cfg.vsm.secret_file).map_err(|e| ServerError::Secret(e.to_string()))?;
        let agents = AgentClient::new(crate::agent::AgentClientConfig {
            secret: secret.clone(),
            port: ov.agent_port.unwrap_or(cfg.vsm.vsm_agent_port),
            timeout: cfg.vsmserver.agent_timeout,
        })
        .with_metrics(metrics.clone());

        // 4. HA node.
        let shutdown = CancellationToken::new();
        let bg_cancel = CancellationToken::new();
        let background = TaskTracker::new();
        let ha = HaNode::start(
            setup,
            cfg.clone(),
            db.clone(),
            listeners.peer,
            bg_cancel.clone(),
            &background,
            metrics.clone(),
        )
        .await
        .map_err(ServerError::Ha)?;
        let replication: Arc<dyn Replication> = ha.clone();
        let broker = Broker::new(cfg.clone(), db.clone(), agents, replication, metrics.clone());
        ha.set_broker(broker.clone());

        // 5. Listeners.
        let tracker = TaskTracker::new();
        let api = Api { broker: broker.clone(), ha: ha.clone() as Arc<dyn HaControl>, metrics: metrics.clone() };
        tracker.spawn(crate::api::unix::serve(listeners.unix, api.clone(), shutdown.clone(), tracker.clone()));
        if let Some(http) = listeners.http {
            tracker.spawn(crate::api::http::serve(http, api.clone(), shutdown.clone(), tracker.clone()));
        }
        tracker.spawn(crate::api::tcp::serve(listeners.tcp, api, secret, shutdown.clone(), tracker.clone()));
        tracing::info!(socket = %cfg.vsmserver.socket_path.display(), port = cfg.vsmserver.listen_port, "listening");

        // 6. Background loops.
        if !ov.no_background_reconcile {
            background.spawn(reconcile_loop(
                broker.clone(),
                ha.clone(),
                cfg.vsmserver.reconcile_interval,
                bg_cancel.clone(),
            ));
        }
        background.spawn(housekeeping_loop(db.clone(), bg_cancel.clone()));
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
        tracing::info!("vsmserver ready");
        Ok(Server { broker, db, ha, metrics, shutdown, tracker, background, bg_cancel })
    }

    /// Stops in the written shutdown order.
    pub async fn stop(self) {
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
        tracing::info!("shutting down: closing listeners");
        self.shutdown.cancel();
        self.tracker.close();
        if tokio::time::timeout(Duration::from_secs(10), self.tracker.wait()).await.is_err() {
            tracing::warn!("requests still running after 10 s; abandoning them");
        }
        tracing::info!("shutting down: stopping reconciliation and the peer link");
        self.bg_cancel.cancel();
        self.background.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.background.wait()).await;
        self.ha.stopped().await;
        tracing::info!("shutting down: closing the session database");
        if let Err(e) = self.db.close().await {
            tracing::warn!(error = %e, "closing the session database failed");
        }
        tracing::info!("stopped");
    }
}

impl Server {
    /// Stops abruptly, as a crash would: listeners and links are dropped at once and
    /// nothing waits for requests in flight. (The database still closes: an in-process stand-in
    /// for `kill -9`, used by the demo.)
    pub async fn kill(self) {
        self.shutdown.cancel();
        self.bg_cancel.cancel();
        self.tracker.close();
        self.background.close();
        let _ = tokio::time::timeout(Duration::from_millis(500), self.tracker.wait()).await;
        let _ = tokio::time::timeout(Duration::from_millis(500), self.background.wait()).await;
        self.ha.stopped().await;
        let _ = self.db.close().await;
        tracing::warn!("killed");
    }
}

/// Runs a master until `shutdown` resolves.
pub async fn run(
    cfg: Config,
    listeners: Listeners,
    ov: Overrides,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    let server = Server::start(cfg, listeners, ov).await?;
    shutdown.await;
    server.stop().await;
    Ok(())
}

async fn reconcile_loop(broker: Broker, ha: Arc<HaNode>, every: Duration, cancel: CancellationToken) {
    let mut wake = ha.reconcile_requests();
    loop {
        if ha.serves_clients() {
            match broker.reconcile_all().await {
                Ok(s) => tracing::debug!(?s, "reconciled with agents"),
                Err(e) => tracing::warn!(error = %e, "reconciliation with agents failed"),
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
            _ = wake.changed() => {}
        }
    }
}

async fn housekeeping_loop(db: DbHandle, cancel: CancellationToken) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(60)) => {}
        }
        if let Err(e) = db.gc(crate::model::now_ms()).await {
            tracing::warn!(error = %e, "database housekeeping failed");
        }
    }
}
