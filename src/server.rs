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
use crate::api::Api;
use crate::broker::service::Broker;
use crate::config::Config;
use crate::db::{DbHandle, DbOptions};
use crate::ha::handle::{HaControl, Replication};
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
    Ha(crate::ha::node::HaStartError),
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
    let s = &cfg.vsmserver;
    let tcp = bind_tcp(
        &s.listen_address,
        s.listen_port,
        "the client/admin port (/vsmserver/listen_address, /vsmserver/listen_port)",
    )
    .await?;
    let peer = if cfg.ha.enabled {
        Some(bind_tcp(&cfg.ha.listen_address, cfg.ha.port, "the HA peer port (/HA/listen_address, /HA/port)").await?)
    } else {
        None
    };
    let http = if s.http_port == 0 {
        None
    } else {
        let what = "the HTTP endpoint (/vsmserver/http_address, /vsmserver/http_port)";
        Some(bind_tcp(&s.http_address, s.http_port, what).await?)
    };
    Ok(Listeners { unix, tcp, peer, http })
}

/// Binds `address`:`port`; `address` is an IP address (v4 or v6) or a host name.
pub async fn bind_tcp(address: &str, port: u16, what: &str) -> Result<TcpListener, ServerError> {
    let shown = match address.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V6(a)) => format!("[{a}]:{port}"),
        _ => format!("{address}:{port}"),
    };
    TcpListener::bind((address, port))
        .await
        .map_err(|source| ServerError::Bind { what: format!("{what} {shown}"), source })
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
    crate::db::create_private_dir(dir).map_err(|e| err(format!("cannot create it: {e}")))?;
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
            max_clock_offset: cfg.ha.max_clock_offset,
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

        // 5. Listeners.
        let tracker = TaskTracker::new();
        let tcp_addr = listeners.tcp.local_addr().map(|a| a.to_string()).unwrap_or_default();
        let api = Api::new(broker.clone(), ha.clone() as Arc<dyn HaControl>, metrics.clone());
        tracker.spawn(crate::api::unix::serve(listeners.unix, api.clone(), shutdown.clone(), tracker.clone()));
        if let Some(http) = listeners.http {
            tracker.spawn(crate::api::http::serve(http, api.clone(), shutdown.clone(), tracker.clone()));
        }
        tracker.spawn(crate::api::tcp::serve(listeners.tcp, api, secret, shutdown.clone(), tracker.clone()));
        tracing::info!(socket = %cfg.vsmserver.socket_path.display(), tcp = %tcp_addr, "listening");

        // 6. Background loops.
        if !ov.no_background_reconcile {
            background.spawn(reconcile_loop(
                broker.clone(),
                ha.clone(),
                cfg.vsmserver.reconcile_interval,
                bg_cancel.clone(),
            ));
        }
        background.spawn(probe_loop(broker.clone(), ha.clone(), !ov.no_background_reconcile, bg_cancel.clone()));
        background.spawn(housekeeping_loop(db.clone(), ha.clone(), bg_cancel.clone()));
        background.spawn(systemd_loop(db.clone(), ha.clone(), bg_cancel.clone()));
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
        tracing::info!(readiness = %ha.readiness(), "vsmserver started: {}", ha.readiness_reason());
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
    let mut readiness = ha.watch_readiness();
    loop {
        // Reconciliation writes; a node that is not ready writes nothing from its own
        // database, and reconciles once it becomes ready.
        if ha.serves_clients() && readiness.borrow_and_update().is_ready() {
            // Agent calls can take seconds; a node that stops being ready meanwhile (it lost
            // the active role while cut off) must not write what it found, so the pass is
            // dropped then, before its next write.
            let mut lost = ha.watch_readiness();
            tokio::select! {
                r = broker.reconcile_all() => match r {
                    Ok(s) => tracing::debug!(?s, "reconciled with agents"),
                    Err(e) => tracing::warn!(error = %e, "reconciliation with agents failed"),
                },
                _ = lost.wait_for(|r| !r.is_ready()) => {
                    tracing::info!("reconciliation stopped: this node is no longer ready");
                }
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
            _ = wake.changed() => {}
            r = readiness.changed() => if r.is_err() { return },
        }
    }
}

/// What systemd hears besides `READY=1`: `STATUS=` with the readiness reason whenever it
/// changes, and, when the unit sets `WatchdogSec=`, `WATCHDOG=1` at half that period, but only
/// after a round trip to the database owner and to the HA engine task both succeeded, so a
/// hung database or engine gets the daemon restarted.
async fn systemd_loop(db: DbHandle, ha: Arc<HaNode>, cancel: CancellationToken) {
    let mut usec = 0u64;
    let watchdog = sd_notify::watchdog_enabled(false, &mut usec).then(|| Duration::from_micros(usec / 2));
    if let Some(every) = watchdog {
        tracing::info!(every_ms = every.as_millis() as u64, "systemd watchdog on");
    }
    // Without a watchdog the reason is still refreshed now and then: a clock warning can come
    // and go without a change of readiness.
    let period = watchdog.unwrap_or(Duration::from_secs(5)).max(Duration::from_millis(100));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut readiness = ha.watch_readiness();
    let mut shown = String::new();
    loop {
        let reason = ha.readiness_reason();
        if reason != shown {
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Status(&reason)]);
            shown = reason;
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            r = readiness.changed() => if r.is_err() { return },
            _ = tick.tick() => {
                if watchdog.is_none() {
                    continue;
                }
                let within = period;
                let db_alive = matches!(tokio::time::timeout(within, db.status()).await, Ok(Ok(_)));
                let engine_alive = ha.ping(within).await;
                if db_alive && engine_alive {
                    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
                } else {
                    tracing::error!(db_alive, engine_alive, "not feeding the systemd watchdog: a component does not answer");
                }
            }
        }
    }
}

/// How often agents counted as unreachable are asked whether they answer again, so that an
/// agent that was down or stalled is placeable again well within a second of its first answer.
const PROBE_EVERY: Duration = Duration::from_millis(250);

/// Probes unreachable agents (one call in flight per agent, so a stalled agent does not delay
/// the others); an agent that answers again is reconciled at once when this node serves
/// clients, is ready (reconciliation writes) and `reconcile` is set.
async fn probe_loop(broker: Broker, ha: Arc<HaNode>, reconcile: bool, cancel: CancellationToken) {
    let mut probes = tokio::task::JoinSet::new();
    let mut in_flight = std::collections::BTreeSet::new();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(PROBE_EVERY) => {
                for agent in broker.unreachable_agents() {
                    if in_flight.insert(agent.clone()) {
                        let b = broker.clone();
                        probes.spawn(async move {
                            let back = b.probe(&agent).await;
                            (agent, back)
                        });
                    }
                }
            }
            Some(done) = probes.join_next(), if !probes.is_empty() => {
                let Ok((agent, back)) = done else { continue };
                in_flight.remove(&agent);
                if back && reconcile && ha.serves_clients() && ha.readiness().is_ready() {
                    let mut lost = ha.watch_readiness();
                    tokio::select! {
                        r = broker.reconcile_agents([agent].into()) => if let Err(e) = r {
                            tracing::warn!(error = %e, "reconciliation with an agent that answers again failed");
                        },
                        _ = lost.wait_for(|r| !r.is_ready()) => {}
                    }
                }
            }
        }
    }
}

async fn housekeeping_loop(db: DbHandle, ha: Arc<HaNode>, cancel: CancellationToken) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(60)) => {}
        }
        // Tombstones age on a clock both masters agree on, so both forget the same ones. A
        // long change log is trimmed in bounded steps, each its own transaction, so logins
        // go on in between.
        loop {
            match db.gc(ha.tombstone_clock_ms(crate::model::now_ms())).await {
                Ok(stats) if stats.more && !cancel.is_cancelled() => tokio::task::yield_now().await,
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "database housekeeping failed");
                    break;
                }
            }
        }
    }
}
