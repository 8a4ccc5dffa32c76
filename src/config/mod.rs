//! Configuration: the key table, loading and validation, and the only writer of config files.
//!
//! Files are TOML in one directory; each top-level folder (`HA`, `subclusters`, `agents`,
//! `vsmserver`, `vsmagent`, `vsm`) lives in one file. Every key has a path such as `/HA/enabled`.
//!
//! Invariants:
//! - Every key the loader accepts is in the key table, and the key table drives validation,
//!   `tl-config` and `docs/configuration.md`.
//! - Loading either returns a fully validated [`Config`] or errors naming file, key, bad value
//!   and what was expected; a half-valid configuration is never returned.
//! - Nothing but the editor writes configuration files, and it writes atomically.
//! - Loading has no side effects: no name is resolved and no secret read, so a client such as
//!   `vsmclient` loads the same configuration as root does. The checks that need the machine
//!   (DNS, the HA secret) are [`preflight`], run by the daemons and `tl-config`.
//!
//! Layout: [`keys`] (the key table), [`value`] (value types), [`load`] (files → `Config`),
//! [`preflight`] (checks against this machine), [`edit`] (the only writer), [`hconf`]
//! (ThinLinc's Hiveconf files, for import), [`cli`] (`tl-config`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub mod cli;
pub mod edit;
pub mod hconf;
pub mod keys;
pub mod load;
pub mod preflight;
pub mod value;

pub use load::{load, ConfigError, ConfigErrors, Location};
pub use preflight::{preflight, PreflightError, PreflightErrors};
// The values of `/HA/sync` and `/vsmserver/db_synchronous` are domain types, so the database
// and the HA engine take them without knowing the configuration.
pub use crate::model::{DbSynchronous, SyncLevel};

/// The configuration directory used when neither flag nor environment names one.
pub const DEFAULT_CONFIG_DIR: &str = "/etc/vsm";
/// Environment variable naming the configuration directory.
pub const CONFIG_DIR_ENV: &str = "VSM_CONFIG_DIR";

/// The configuration directory: the `--config-dir` flag, else `$VSM_CONFIG_DIR` (if not
/// empty), else `/etc/vsm`.
pub fn config_dir_from(flag: Option<PathBuf>) -> PathBuf {
    if let Some(dir) = flag {
        return dir;
    }
    match std::env::var_os(CONFIG_DIR_ENV) {
        Some(v) if !v.is_empty() => PathBuf::from(v),
        _ => PathBuf::from(DEFAULT_CONFIG_DIR),
    }
}

/// Loads the configuration directory chosen by [`config_dir_from`].
pub fn load_from(flag: Option<PathBuf>) -> Result<(PathBuf, Config), ConfigErrors> {
    let dir = config_dir_from(flag);
    let config = load(&dir)?;
    Ok((dir, config))
}

impl Config {
    /// Whether a login's outcome can depend on the user's groups: `/vsmserver/allowed_groups`
    /// is set, or some subcluster takes users by group. When neither, the broker does not
    /// look them up (a lookup through NSS costs more than the rest of a login's work on
    /// the master, and may wait for a directory service).
    pub fn login_uses_groups(&self) -> bool {
        !self.vsmserver.allowed_groups.is_empty() || self.subclusters.values().any(|s| !s.groups.is_empty())
    }

    /// SHA-256 (hex) of a canonical rendering of the cluster settings (`/subclusters/*` and
    /// `/agents/*`). Two masters with the same subclusters, agents, draining list and weights
    /// get the same digest, whatever the order of list items or the file layout.
    pub fn digest_cluster(&self) -> String {
        use sha2::{Digest, Sha256};
        let sorted = |v: &[String]| {
            let mut v = v.to_vec();
            v.sort();
            v.dedup();
            v
        };
        let subclusters: Vec<serde_json::Value> = self
            .subclusters
            .values()
            .map(|s| {
                serde_json::json!({
                    "name": s.name,
                    "agents": sorted(&s.agents),
                    "users": sorted(&s.users),
                    "groups": sorted(&s.groups),
                    "max_users_per_agent": s.max_users_per_agent,
                })
            })
            .collect();
        let canonical = serde_json::json!({
            "subclusters": subclusters,
            "draining": sorted(&self.agents.draining),
            "weights": self.agents.weights,
        });
        let digest = Sha256::digest(canonical.to_string().as_bytes());
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Loads and validates a configuration directory (same as [`load`]).
    pub fn load(dir: &Path) -> Result<Config, ConfigErrors> {
        load(dir)
    }
}

/// The validated configuration of a node. Built by the loader or from [`Config::default`]
/// (the embedded defaults) in tests and the demo.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub ha: HaConfig,
    /// Subclusters by name.
    pub subclusters: BTreeMap<String, Subcluster>,
    pub agents: AgentsConfig,
    pub vsmserver: ServerConfig,
    pub vsmagent: AgentConfig,
    pub vsm: VsmConfig,
}

/// `/HA/*`.
#[derive(Clone, Debug, PartialEq)]
pub struct HaConfig {
    /// `/HA/enabled`
    pub enabled: bool,
    /// `/HA/nodes`: both masters, identical on both nodes.
    pub nodes: Vec<String>,
    /// `/HA/secret_file`: shared secret of the two masters.
    pub secret_file: PathBuf,
    /// `/HA/port`: TCP port of the peer link.
    pub port: u16,
    /// `/HA/listen_address`: where the peer port is bound.
    pub listen_address: String,
    /// `/HA/sync`: when a client is answered.
    pub sync: SyncLevel,
    /// `/HA/sync_timeout`: how long a write waits for the peer before continuing alone.
    pub sync_timeout: Duration,
    /// `/HA/startup_grace`: after start, how long an unreachable peer delays readiness.
    pub startup_grace: Duration,
    /// `/HA/ready_wait`: how long a login or write waits for a node that is not ready.
    pub ready_wait: Duration,
    /// `/HA/heartbeat_interval`
    pub heartbeat_interval: Duration,
    /// `/HA/peer_timeout`: silence after which the peer link is declared dead.
    pub peer_timeout: Duration,
    /// `/HA/tombstone_retention`: how long deletes are remembered so they win a merge.
    pub tombstone_retention: Duration,
    /// `/HA/max_clock_offset`: largest tolerated clock difference between the masters.
    pub max_clock_offset: Duration,
    /// `/HA/changelog_retention`: how many change-log entries are kept for incremental resync.
    pub changelog_retention: u64,
    /// `/HA/local_node`: explicit name of the local node, bypassing detection.
    pub local_node: Option<String>,
}

/// `/subclusters/<name>/*`.
#[derive(Clone, Debug, PartialEq)]
pub struct Subcluster {
    pub name: String,
    pub agents: Vec<String>,
    pub users: Vec<String>,
    pub groups: Vec<String>,
    /// 0 means unlimited.
    pub max_users_per_agent: u32,
}

impl Subcluster {
    /// A subcluster with neither users nor groups is a default subcluster.
    pub fn is_default(&self) -> bool {
        self.users.is_empty() && self.groups.is_empty()
    }
}

/// `/agents/*`.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct AgentsConfig {
    /// `/agents/draining`
    pub draining: Vec<String>,
    /// `/agents/weights/<host>`; hosts not listed weigh 100.
    pub weights: BTreeMap<String, u32>,
}

/// `/vsmserver/*`.
#[derive(Clone, Debug, PartialEq)]
pub struct ServerConfig {
    pub listen_port: u16,
    /// `/vsmserver/listen_address`: where the client/agent port is bound.
    pub listen_address: String,
    pub allowed_clients: Vec<String>,
    pub allowed_groups: Vec<String>,
    /// 0 means unlimited.
    pub max_sessions_per_user: u32,
    pub admin_email: Vec<String>,
    pub socket_path: PathBuf,
    pub data_dir: PathBuf,
    /// `/vsmserver/http_port`: health and metrics endpoint; 0 = off.
    pub http_port: u16,
    /// `/vsmserver/http_address`
    pub http_address: String,
    /// `/vsmserver/reconcile_interval`: how often agents are polled.
    pub reconcile_interval: Duration,
    /// `/vsmserver/agent_timeout`: how long one call to an agent may take.
    pub agent_timeout: Duration,
    /// `/vsmserver/session_startup_dir`: scripts run after a session is created.
    pub session_startup_dir: PathBuf,
    /// `/vsmserver/session_reconnect_dir`: scripts run after a reconnect.
    pub session_reconnect_dir: PathBuf,
    /// `/vsmserver/db_synchronous`
    pub db_synchronous: DbSynchronous,
    /// `/vsmserver/admin_group`: members may act as admins over the Unix socket.
    pub admin_group: Option<String>,
    /// `/vsmserver/logging/*`
    pub logging: LoggingConfig,
    /// `/vsmserver/max_connections`: connections each listener serves at once.
    pub max_connections: usize,
    /// `/vsmserver/max_connections_per_user`: Unix-socket connections of one user at once.
    pub max_connections_per_user: usize,
    /// `/vsmserver/idle_timeout`: a connection that sends no request for this long is closed.
    pub idle_timeout: Duration,
}

/// `/vsmserver/logging/*` and `/vsmagent/logging/*`.
#[derive(Clone, Debug, PartialEq)]
pub struct LoggingConfig {
    /// `…/logging/defaultlevel`: `error`, `warning`, `info`, `debug` or `debug2`.
    pub defaultlevel: String,
    /// `…/logging/json`: one JSON object per line.
    pub json: bool,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        LoggingConfig { defaultlevel: "info".into(), json: false }
    }
}

/// `/vsmagent/*`.
#[derive(Clone, Debug, PartialEq)]
pub struct AgentConfig {
    pub master_hostname: String,
    pub allowed_clients: Vec<String>,
    /// Address given to clients; when unset the agent reports its own address.
    pub agent_hostname: Option<String>,
    pub listen_port: u16,
    /// `/vsmagent/listen_address`: where the agent port is bound.
    pub listen_address: String,
    pub display_min: u32,
    pub display_max: u32,
    /// argv template; placeholders `{display}`, `{port}`, `{geometry}`, `{user}`, `{socket}`.
    pub session_command: Vec<String>,
    pub default_geometry: String,
    /// PAM service of desktop sessions; `None` runs them without PAM.
    pub pam_service: Option<String>,
    /// `/vsmagent/state_dir`: where the agent keeps per-session files.
    pub state_dir: PathBuf,
    /// `/vsmagent/logging/*`
    pub logging: LoggingConfig,
    /// `/vsmagent/max_connections`: master connections served at once.
    pub max_connections: usize,
    /// `/vsmagent/idle_timeout`: a master connection with no request for this long is closed.
    pub idle_timeout: Duration,
}

/// `/vsm/*`.
#[derive(Clone, Debug, PartialEq)]
pub struct VsmConfig {
    pub vsm_server_port: u16,
    pub vsm_agent_port: u16,
    pub vnc_port_base: u16,
    /// `<dir>/<display>/vnc.sock` is a private desktop's socket on its agent.
    pub vnc_socket_dir: PathBuf,
    /// Cluster secret shared by masters and agents.
    pub secret_file: PathBuf,
}

impl Default for Config {
    fn default() -> Self {
        let mut subclusters = BTreeMap::new();
        subclusters.insert(
            "default".to_string(),
            Subcluster {
                name: "default".into(),
                agents: vec!["127.0.0.1".into()],
                users: vec![],
                groups: vec![],
                max_users_per_agent: 0,
            },
        );
        Config {
            ha: HaConfig {
                enabled: false,
                nodes: vec![],
                secret_file: PathBuf::from("/etc/vsm/ha.key"),
                port: 9001,
                listen_address: "0.0.0.0".into(),
                sync: SyncLevel::Ack,
                sync_timeout: Duration::from_secs(2),
                startup_grace: Duration::from_secs(30),
                ready_wait: Duration::from_secs(5),
                heartbeat_interval: Duration::from_millis(500),
                peer_timeout: Duration::from_secs(3),
                tombstone_retention: Duration::from_secs(7 * 24 * 3600),
                max_clock_offset: Duration::from_secs(5),
                changelog_retention: 100_000,
                local_node: None,
            },
            subclusters,
            agents: AgentsConfig::default(),
            vsmserver: ServerConfig {
                listen_port: 9000,
                listen_address: "0.0.0.0".into(),
                allowed_clients: vec![],
                allowed_groups: vec![],
                max_sessions_per_user: 1,
                admin_email: vec!["root@localhost".into()],
                socket_path: PathBuf::from("/run/vsm/vsmserver.sock"),
                data_dir: PathBuf::from("/var/lib/vsm"),
                http_port: 9002,
                http_address: "127.0.0.1".into(),
                reconcile_interval: Duration::from_secs(40),
                agent_timeout: Duration::from_secs(5),
                session_startup_dir: PathBuf::from("/etc/vsm/sessionstartup.d"),
                session_reconnect_dir: PathBuf::from("/etc/vsm/sessionreconnect.d"),
                db_synchronous: DbSynchronous::Full,
                admin_group: None,
                logging: LoggingConfig::default(),
                max_connections: 1024,
                max_connections_per_user: 16,
                idle_timeout: Duration::from_secs(60),
            },
            vsmagent: AgentConfig {
                master_hostname: "localhost".into(),
                allowed_clients: vec![],
                agent_hostname: None,
                listen_port: 904,
                listen_address: "0.0.0.0".into(),
                display_min: 10,
                display_max: 2000,
                session_command: [
                    "/usr/libexec/vsm/vsm-session",
                    "Xvnc",
                    ":{display}",
                    "-rfbunixpath",
                    "{socket}",
                    "-rfbunixmode",
                    "0600",
                    "-rfbport",
                    "-1",
                    "-nolisten",
                    "tcp",
                    "-SecurityTypes",
                    "None",
                    "-geometry",
                    "{geometry}",
                    "-desktop",
                    "{user}",
                ]
                .iter()
                .map(|s| s.to_string())
                .collect(),
                default_geometry: "1024x768".into(),
                pam_service: Some("vsm".into()),
                state_dir: PathBuf::from("/var/lib/vsmagent"),
                logging: LoggingConfig::default(),
                max_connections: 256,
                idle_timeout: Duration::from_secs(120),
            },
            vsm: VsmConfig {
                vsm_server_port: 9000,
                vsm_agent_port: 904,
                vnc_port_base: 5900,
                vnc_socket_dir: PathBuf::from("/run/vsmagent/sessions"),
                secret_file: PathBuf::from("/etc/vsm/cluster.key"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_dir_flag_wins_over_env_and_default() {
        // Only the flag case is deterministic regardless of the test environment.
        assert_eq!(config_dir_from(Some("/x".into())), PathBuf::from("/x"));
        if std::env::var_os(CONFIG_DIR_ENV).is_none() {
            assert_eq!(config_dir_from(None), PathBuf::from(DEFAULT_CONFIG_DIR));
        }
    }

    #[test]
    fn groups_matter_to_a_login_only_when_a_setting_names_some() {
        let mut c = Config::default();
        assert!(!c.login_uses_groups(), "the default cluster has no group setting");
        c.vsmserver.allowed_groups = vec!["staff".into()];
        assert!(c.login_uses_groups());
        c.vsmserver.allowed_groups.clear();
        let eng = Subcluster {
            name: "eng".into(),
            agents: vec!["agent1".into()],
            users: vec![],
            groups: vec!["eng".into()],
            max_users_per_agent: 0,
        };
        c.subclusters.insert("eng".into(), eng);
        assert!(c.login_uses_groups(), "a subcluster takes users by group");
        c.subclusters.get_mut("eng").unwrap().groups.clear();
        c.subclusters.get_mut("eng").unwrap().users = vec!["alice".into()];
        assert!(!c.login_uses_groups(), "users by name need no groups");
    }

    #[test]
    fn digest_ignores_order_and_non_cluster_settings() {
        let a = Config::default();
        let mut b = Config::default();
        b.vsmserver.listen_port = 1234;
        b.ha.enabled = true;
        assert_eq!(a.digest_cluster(), b.digest_cluster());
        assert_eq!(a.digest_cluster().len(), 64);
        let mut c = Config::default();
        c.subclusters.get_mut("default").unwrap().agents = vec!["b".into(), "a".into()];
        let mut d = c.clone();
        d.subclusters.get_mut("default").unwrap().agents = vec!["a".into(), "b".into()];
        assert_eq!(c.digest_cluster(), d.digest_cluster());
        d.agents.weights.insert("a".into(), 200);
        assert_ne!(c.digest_cluster(), d.digest_cluster());
        let mut e = c.clone();
        e.subclusters.get_mut("default").unwrap().max_users_per_agent = 3;
        assert_ne!(c.digest_cluster(), e.digest_cluster());
        let mut f = c.clone();
        f.agents.draining.push("a".into());
        assert_ne!(c.digest_cluster(), f.digest_cluster());
    }
}
