//! The key table: every configuration key vsm knows, with its type, default, documentation,
//! restart flag and where it lands in [`Config`].
//!
//! Owns: key paths (canonical and alias forms), path lookup and "did you mean" suggestions,
//! which file a folder lives in, and the rendering of `docs/configuration.md`.
//! Never: touches the file system (except the docs test) or knows TOML syntax.
//!
//! Invariants:
//! - [`KEYS`] is the only list of keys; the loader, `tl-config` and the docs all read it.
//! - Every default parses with its key's type, and applying all defaults gives
//!   [`Config::default`] (unit-tested).
//! - Alias paths (`/vsmserver/HA/*`, `/vsmserver/subclusters/*`) never escape [`canonical`]:
//!   everything past it works on canonical paths only.

use super::value::{ItemKind, Value, ValueType};
use super::{Config, DbSynchronous, Subcluster, SyncLevel};

/// One known key. `path` may contain one wildcard segment: `<name>` (a subcluster name) or
/// `<host>` (a host name).
pub struct KeyDef {
    pub path: &'static str,
    pub ty: ValueType,
    /// The default in command-line syntax (parsed with `ty`).
    pub default: &'static str,
    pub doc: &'static str,
    /// The daemon reads this key only at start: a change needs a restart of the service.
    pub restart: bool,
    /// Stores a validated value into the configuration; the string is the wildcard segment.
    pub(crate) apply: fn(&mut Config, &str, &Value),
}

impl std::fmt::Debug for KeyDef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyDef").field("path", &self.path).finish()
    }
}

impl KeyDef {
    /// The wildcard of this key's path, if any.
    pub fn wildcard(&self) -> Option<Wildcard> {
        self.path.split('/').find_map(|s| match s {
            "<name>" => Some(Wildcard::Name),
            "<host>" => Some(Wildcard::Host),
            _ => None,
        })
    }

    /// The default value, parsed.
    pub fn default_value(&self) -> Value {
        // The defaults are constants checked by a unit test; falling back to an empty string
        // keeps this total.
        self.ty.parse_text(self.default).unwrap_or_else(|_| Value::Str(String::new()))
    }

    /// The folder this key lives in, e.g. `HA` for `/HA/enabled`.
    pub fn top_folder(&self) -> &'static str {
        self.path.split('/').nth(1).unwrap_or("")
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wildcard {
    Name,
    Host,
}

const PORT: ValueType = ValueType::Int { min: 1, max: 65535 };
const HOSTS: ValueType = ValueType::List(ItemKind::Host);
const WORDS: ValueType = ValueType::List(ItemKind::Word);
const fn dur(min_ms: u64, max_ms: u64) -> ValueType {
    ValueType::Duration { min_ms, max_ms }
}
const SEC: u64 = 1000;
const DAY: u64 = 86_400 * SEC;

fn sub<'a>(c: &'a mut Config, name: &str) -> &'a mut Subcluster {
    c.subclusters.entry(name.to_string()).or_insert_with(|| Subcluster {
        name: name.to_string(),
        agents: vec![],
        users: vec![],
        groups: vec![],
        max_users_per_agent: 0,
    })
}

/// Every known key, in documentation order.
pub static KEYS: &[KeyDef] = &[
    // ---- /HA ----
    KeyDef {
        path: "/HA/enabled",
        ty: ValueType::Bool,
        default: "false",
        doc: "Replicate sessions to the other master and take part in failover.",
        restart: true,
        apply: |c, _, v| c.ha.enabled = v.as_bool(),
    },
    KeyDef {
        path: "/HA/nodes",
        ty: HOSTS,
        default: "",
        doc: "Host names of both masters, the local one included, so the file can be identical on both nodes.",
        restart: true,
        apply: |c, _, v| c.ha.nodes = v.as_list(),
    },
    KeyDef {
        path: "/HA/secret_file",
        ty: ValueType::SecretPath,
        default: "ha.key",
        doc: "File holding the secret shared by the two masters (at least 16 bytes, same file on both nodes); relative to the configuration directory unless absolute.",
        restart: true,
        apply: |c, _, v| c.ha.secret_file = v.as_path(),
    },
    KeyDef {
        path: "/HA/port",
        ty: PORT,
        default: "9001",
        doc: "TCP port of the replication link between the masters.",
        restart: true,
        apply: |c, _, v| c.ha.port = v.as_u16(),
    },
    KeyDef {
        path: "/HA/listen_address",
        ty: ValueType::Host,
        default: "0.0.0.0",
        doc: "Address the replication link listens on (with `/HA/port`); `0.0.0.0` means every IPv4 address, `::` every address.",
        restart: true,
        apply: |c, _, v| c.ha.listen_address = v.as_str(),
    },
    KeyDef {
        path: "/HA/sync",
        ty: ValueType::Enum(&["async", "ack"]),
        default: "ack",
        doc: "When a client is answered: `ack` after the peer stored the change (or `sync_timeout` passed), `async` right after the local commit.",
        restart: true,
        apply: |c, _, v| {
            c.ha.sync = if v.as_str() == "async" { SyncLevel::Async } else { SyncLevel::Ack }
        },
    },
    KeyDef {
        path: "/HA/sync_timeout",
        ty: dur(1, 60 * SEC),
        default: "2s",
        doc: "How long a write waits for the peer's acknowledgement before the node continues alone and reports itself degraded.",
        restart: true,
        apply: |c, _, v| c.ha.sync_timeout = v.as_duration(),
    },
    KeyDef {
        path: "/HA/startup_grace",
        ty: dur(0, 3_600 * SEC),
        default: "30s",
        doc: "After start, how long an unreachable peer may delay readiness before the node decides alone.",
        restart: true,
        apply: |c, _, v| c.ha.startup_grace = v.as_duration(),
    },
    KeyDef {
        path: "/HA/ready_wait",
        ty: dur(0, 60 * SEC),
        default: "5s",
        doc: "How long a login, terminate or admin write waits for a master that is not ready (resynchronising with its peer) before it is refused as not ready; keep it well below the clients' patience.",
        restart: true,
        apply: |c, _, v| c.ha.ready_wait = v.as_duration(),
    },
    KeyDef {
        path: "/HA/heartbeat_interval",
        ty: dur(10, 60 * SEC),
        default: "500ms",
        doc: "How often the masters send each other a heartbeat.",
        restart: true,
        apply: |c, _, v| c.ha.heartbeat_interval = v.as_duration(),
    },
    KeyDef {
        path: "/HA/peer_timeout",
        ty: dur(20, 600 * SEC),
        default: "3s",
        doc: "Silence after which the peer link is declared dead; must be longer than `heartbeat_interval`.",
        restart: true,
        apply: |c, _, v| c.ha.peer_timeout = v.as_duration(),
    },
    KeyDef {
        path: "/HA/tombstone_retention",
        ty: dur(60 * SEC, 3_650 * DAY),
        default: "7d",
        doc: "How long deleted sessions are remembered so that a delete wins a later merge.",
        restart: true,
        apply: |c, _, v| c.ha.tombstone_retention = v.as_duration(),
    },
    KeyDef {
        path: "/HA/max_clock_offset",
        ty: dur(100, 3_600 * SEC),
        default: "5s",
        doc: "Largest clock difference tolerated between the masters (and between a master and its agents); beyond it status, metrics and logs raise an alarm and no clock reading further ahead is followed. Keep the clocks synchronised with NTP well within it.",
        restart: true,
        apply: |c, _, v| c.ha.max_clock_offset = v.as_duration(),
    },
    KeyDef {
        path: "/HA/changelog_retention",
        ty: ValueType::Int { min: 1, max: 1_000_000_000 },
        default: "100000",
        doc: "How many change-log entries are kept for incremental resynchronisation; a peer further behind gets a full snapshot.",
        restart: true,
        apply: |c, _, v| c.ha.changelog_retention = v.as_u64(),
    },
    KeyDef {
        path: "/HA/local_node",
        ty: ValueType::OptHost,
        default: "",
        doc: "Which entry of `/HA/nodes` is this machine; empty means detect it from `uname -n` and local addresses.",
        restart: true,
        apply: |c, _, v| c.ha.local_node = v.as_opt(),
    },
    // ---- /subclusters ----
    KeyDef {
        path: "/subclusters/<name>/agents",
        ty: HOSTS,
        default: "",
        doc: "Agents (as the master reaches them) on which new sessions of this subcluster's users are created; at least one.",
        restart: true,
        apply: |c, n, v| sub(c, n).agents = v.as_list(),
    },
    KeyDef {
        path: "/subclusters/<name>/users",
        ty: WORDS,
        default: "",
        doc: "Users belonging to this subcluster; a `users` match beats a `groups` match.",
        restart: true,
        apply: |c, n, v| sub(c, n).users = v.as_list(),
    },
    KeyDef {
        path: "/subclusters/<name>/groups",
        ty: WORDS,
        default: "",
        doc: "Groups whose members belong to this subcluster. A subcluster without users and groups is the default subcluster (at most one).",
        restart: true,
        apply: |c, n, v| sub(c, n).groups = v.as_list(),
    },
    KeyDef {
        path: "/subclusters/<name>/max_users_per_agent",
        ty: ValueType::Int { min: 0, max: 1_000_000 },
        default: "0",
        doc: "Most users with sessions on one agent of this subcluster; 0 means unlimited.",
        restart: true,
        apply: |c, n, v| sub(c, n).max_users_per_agent = v.as_u32(),
    },
    // ---- /agents ----
    KeyDef {
        path: "/agents/draining",
        ty: HOSTS,
        default: "",
        doc: "Agents that get no new sessions; existing sessions continue and can be reconnected.",
        restart: true,
        apply: |c, _, v| c.agents.draining = v.as_list(),
    },
    KeyDef {
        path: "/agents/weights/<host>",
        ty: ValueType::Int { min: 1, max: 1_000_000 },
        default: "100",
        doc: "Relative share of new sessions for this agent within its subcluster; the host must be in some subcluster's `agents`.",
        restart: true,
        apply: |c, h, v| {
            c.agents.weights.insert(h.to_string(), v.as_u32());
        },
    },
    // ---- /vsmserver ----
    KeyDef {
        path: "/vsmserver/listen_port",
        ty: PORT,
        default: "9000",
        doc: "TCP port the master listens on for clients; should equal `/vsm/vsm_server_port`.",
        restart: true,
        apply: |c, _, v| c.vsmserver.listen_port = v.as_u16(),
    },
    KeyDef {
        path: "/vsmserver/listen_address",
        ty: ValueType::Host,
        default: "0.0.0.0",
        doc: "Address the master listens on for clients and agents (with `/vsmserver/listen_port`); `0.0.0.0` means every IPv4 address, `::` every address.",
        restart: true,
        apply: |c, _, v| c.vsmserver.listen_address = v.as_str(),
    },
    KeyDef {
        path: "/vsmserver/allowed_clients",
        ty: HOSTS,
        default: "",
        doc: "Hosts allowed to perform privileged operations over TCP (such as terminating sessions); empty means only localhost.",
        restart: true,
        apply: |c, _, v| c.vsmserver.allowed_clients = v.as_list(),
    },
    KeyDef {
        path: "/vsmserver/allowed_groups",
        ty: WORDS,
        default: "",
        doc: "If not empty, only members of these groups may log in.",
        restart: true,
        apply: |c, _, v| c.vsmserver.allowed_groups = v.as_list(),
    },
    KeyDef {
        path: "/vsmserver/max_sessions_per_user",
        ty: ValueType::Int { min: 0, max: 1_000 },
        default: "1",
        doc: "Most sessions one user may have; 0 means unlimited.",
        restart: true,
        apply: |c, _, v| c.vsmserver.max_sessions_per_user = v.as_u32(),
    },
    KeyDef {
        path: "/vsmserver/admin_email",
        ty: ValueType::List(ItemKind::Email),
        default: "root@localhost",
        doc: "Where administrative warnings are mailed.",
        restart: true,
        apply: |c, _, v| c.vsmserver.admin_email = v.as_list(),
    },
    KeyDef {
        path: "/vsmserver/socket_path",
        ty: ValueType::Path,
        default: "/run/vsm/vsmserver.sock",
        doc: "Unix socket for `vsmclient` and `tlctl`.",
        restart: true,
        apply: |c, _, v| c.vsmserver.socket_path = v.as_path(),
    },
    KeyDef {
        path: "/vsmserver/data_dir",
        ty: ValueType::Path,
        default: "/var/lib/vsm",
        doc: "Directory of the session database.",
        restart: true,
        apply: |c, _, v| c.vsmserver.data_dir = v.as_path(),
    },
    KeyDef {
        path: "/vsmserver/http_port",
        ty: ValueType::Int { min: 0, max: 65535 },
        default: "9002",
        doc: "Port of the HTTP endpoint for health checks and Prometheus metrics (`/healthz`, `/readyz`, `/metrics`); 0 turns it off.",
        restart: true,
        apply: |c, _, v| c.vsmserver.http_port = v.as_u16(),
    },
    KeyDef {
        path: "/vsmserver/http_address",
        ty: ValueType::Host,
        default: "127.0.0.1",
        doc: "Address the HTTP endpoint listens on; use `0.0.0.0` to let a remote Prometheus scrape it.",
        restart: true,
        apply: |c, _, v| c.vsmserver.http_address = v.as_str(),
    },
    KeyDef {
        path: "/vsmserver/reconcile_interval",
        ty: dur(SEC, DAY),
        default: "40s",
        doc: "How often the master asks every agent for its sessions and load.",
        restart: true,
        apply: |c, _, v| c.vsmserver.reconcile_interval = v.as_duration(),
    },
    KeyDef {
        path: "/vsmserver/agent_timeout",
        ty: dur(100, 600 * SEC),
        default: "5s",
        doc: "How long one call to an agent may take before the agent counts as unreachable.",
        restart: true,
        apply: |c, _, v| c.vsmserver.agent_timeout = v.as_duration(),
    },
    KeyDef {
        path: "/vsmserver/session_startup_dir",
        ty: ValueType::Path,
        default: "/etc/vsm/sessionstartup.d",
        doc: "Executables in this directory run after a session is created.",
        restart: true,
        apply: |c, _, v| c.vsmserver.session_startup_dir = v.as_path(),
    },
    KeyDef {
        path: "/vsmserver/session_reconnect_dir",
        ty: ValueType::Path,
        default: "/etc/vsm/sessionreconnect.d",
        doc: "Executables in this directory run after a session is reconnected.",
        restart: true,
        apply: |c, _, v| c.vsmserver.session_reconnect_dir = v.as_path(),
    },
    KeyDef {
        path: "/vsmserver/db_synchronous",
        ty: ValueType::Enum(&["full", "normal"]),
        default: "full",
        doc: "SQLite durability: `full` syncs every commit to disk, `normal` may lose the last commits on power loss.",
        restart: true,
        apply: |c, _, v| {
            c.vsmserver.db_synchronous =
                if v.as_str() == "normal" { DbSynchronous::Normal } else { DbSynchronous::Full }
        },
    },
    KeyDef {
        path: "/vsmserver/admin_group",
        ty: ValueType::OptWord,
        default: "",
        doc: "Members of this group may use admin commands over the Unix socket (root always may); empty means root only.",
        restart: true,
        apply: |c, _, v| c.vsmserver.admin_group = v.as_opt(),
    },
    KeyDef {
        path: "/vsmserver/logging/defaultlevel",
        ty: ValueType::Enum(&["error", "warning", "info", "debug", "debug2"]),
        default: "info",
        doc: "Least severe messages `vsmserver` logs (case does not matter); `--log-level`, `-v` and `RUST_LOG` override it.",
        restart: true,
        apply: |c, _, v| c.vsmserver.logging.defaultlevel = v.as_str(),
    },
    KeyDef {
        path: "/vsmserver/logging/json",
        ty: ValueType::Bool,
        default: "false",
        doc: "Log one JSON object per line instead of text (as `--log-json` does).",
        restart: true,
        apply: |c, _, v| c.vsmserver.logging.json = v.as_bool(),
    },
    KeyDef {
        path: "/vsmserver/max_connections",
        ty: ValueType::Int { min: 1, max: 65536 },
        default: "1024",
        doc: "Connections each listener (Unix socket, TCP port, HTTP endpoint) serves at once; more are closed as soon as they are accepted.",
        restart: true,
        apply: |c, _, v| c.vsmserver.max_connections = v.as_u32() as usize,
    },
    KeyDef {
        path: "/vsmserver/max_connections_per_user",
        ty: ValueType::Int { min: 1, max: 65536 },
        default: "16",
        doc: "Unix-socket connections one user may have open at once (root and the admin group are not limited), so no user can take every connection.",
        restart: true,
        apply: |c, _, v| c.vsmserver.max_connections_per_user = v.as_u32() as usize,
    },
    KeyDef {
        path: "/vsmserver/idle_timeout",
        ty: dur(SEC, 3600 * SEC),
        default: "60s",
        doc: "A client connection that sends no complete request for this long is closed.",
        restart: true,
        apply: |c, _, v| c.vsmserver.idle_timeout = v.as_duration(),
    },
    // ---- /vsmagent ----
    KeyDef {
        path: "/vsmagent/master_hostname",
        ty: ValueType::Host,
        default: "localhost",
        doc: "The master the agent reports to; with HA, the DNS name of the virtual (resource) address. Always allowed to connect.",
        restart: true,
        apply: |c, _, v| c.vsmagent.master_hostname = v.as_str(),
    },
    KeyDef {
        path: "/vsmagent/allowed_clients",
        ty: HOSTS,
        default: "",
        doc: "Masters allowed to manage sessions on this agent; with HA, list both masters. Localhost and `master_hostname` are always allowed.",
        restart: true,
        apply: |c, _, v| c.vsmagent.allowed_clients = v.as_list(),
    },
    KeyDef {
        path: "/vsmagent/agent_hostname",
        ty: ValueType::OptHost,
        default: "",
        doc: "Address given to clients for this agent (for NAT or split DNS); empty means the agent's own address.",
        restart: true,
        apply: |c, _, v| c.vsmagent.agent_hostname = v.as_opt(),
    },
    KeyDef {
        path: "/vsmagent/listen_port",
        ty: PORT,
        default: "904",
        doc: "TCP port the agent listens on; should equal `/vsm/vsm_agent_port`.",
        restart: true,
        apply: |c, _, v| c.vsmagent.listen_port = v.as_u16(),
    },
    KeyDef {
        path: "/vsmagent/listen_address",
        ty: ValueType::Host,
        default: "0.0.0.0",
        doc: "Address the agent listens on (with `/vsmagent/listen_port`); `0.0.0.0` means every IPv4 address, `::` every address.",
        restart: true,
        apply: |c, _, v| c.vsmagent.listen_address = v.as_str(),
    },
    KeyDef {
        path: "/vsmagent/display_min",
        ty: ValueType::Int { min: 1, max: 65534 },
        default: "10",
        doc: "Lowest X display number used for sessions.",
        restart: true,
        apply: |c, _, v| c.vsmagent.display_min = v.as_u32(),
    },
    KeyDef {
        path: "/vsmagent/display_max",
        ty: ValueType::Int { min: 2, max: 65535 },
        default: "2000",
        doc: "Highest X display number used for sessions; greater than `display_min`, and `/vsm/vnc_port_base` + `display_max` must be a valid port.",
        restart: true,
        apply: |c, _, v| c.vsmagent.display_max = v.as_u32(),
    },
    KeyDef {
        path: "/vsmagent/session_command",
        ty: ValueType::Command,
        default: "/usr/libexec/vsm/vsm-session Xvnc :{display} -rfbunixpath {socket} -rfbunixmode 0600 -rfbport -1 -nolisten tcp -SecurityTypes None -geometry {geometry} -desktop {user}",
        doc: "Command started for a new session (no shell); placeholders `{display}`, `{port}`, `{geometry}`, `{user}`, `{socket}`. The default is a private desktop: Xvnc listens only on `{socket}`, a `0600` Unix socket in a directory of the user's own, reached through SSH (see docs/connecting.md); a command that uses `{socket}` and not `{port}` is reported with VNC port 0.",
        restart: true,
        apply: |c, _, v| c.vsmagent.session_command = v.as_list(),
    },
    KeyDef {
        path: "/vsmagent/pam_service",
        ty: ValueType::OptWord,
        default: "vsm",
        doc: "PAM service with which the agent (as root) opens each desktop's session for its user (`/etc/pam.d/vsm`, shipped with vsm); empty starts sessions without PAM.",
        restart: true,
        apply: |c, _, v| c.vsmagent.pam_service = v.as_opt(),
    },
    KeyDef {
        path: "/vsmagent/default_geometry",
        ty: ValueType::Geometry,
        default: "1024x768",
        doc: "Session size when the client asks for none.",
        restart: true,
        apply: |c, _, v| c.vsmagent.default_geometry = v.as_str(),
    },
    KeyDef {
        path: "/vsmagent/state_dir",
        ty: ValueType::Path,
        default: "/var/lib/vsmagent",
        doc: "Directory where the agent keeps per-session files.",
        restart: true,
        apply: |c, _, v| c.vsmagent.state_dir = v.as_path(),
    },
    KeyDef {
        path: "/vsmagent/logging/defaultlevel",
        ty: ValueType::Enum(&["error", "warning", "info", "debug", "debug2"]),
        default: "info",
        doc: "Least severe messages `vsmagent` logs (case does not matter); `--log-level`, `-v` and `RUST_LOG` override it.",
        restart: true,
        apply: |c, _, v| c.vsmagent.logging.defaultlevel = v.as_str(),
    },
    KeyDef {
        path: "/vsmagent/logging/json",
        ty: ValueType::Bool,
        default: "false",
        doc: "Log one JSON object per line instead of text (as `--log-json` does).",
        restart: true,
        apply: |c, _, v| c.vsmagent.logging.json = v.as_bool(),
    },
    KeyDef {
        path: "/vsmagent/max_connections",
        ty: ValueType::Int { min: 1, max: 65536 },
        default: "256",
        doc: "Master connections the agent serves at once; more are closed as soon as they are accepted.",
        restart: true,
        apply: |c, _, v| c.vsmagent.max_connections = v.as_u32() as usize,
    },
    KeyDef {
        path: "/vsmagent/idle_timeout",
        ty: dur(15 * SEC, 3600 * SEC),
        default: "120s",
        doc: "A master connection that sends no request for this long is closed (masters reuse a pooled connection for at most 10 s).",
        restart: true,
        apply: |c, _, v| c.vsmagent.idle_timeout = v.as_duration(),
    },
    // ---- /vsm ----
    KeyDef {
        path: "/vsm/vsm_server_port",
        ty: PORT,
        default: "9000",
        doc: "Port of the master, as agents and clients reach it.",
        restart: true,
        apply: |c, _, v| c.vsm.vsm_server_port = v.as_u16(),
    },
    KeyDef {
        path: "/vsm/vsm_agent_port",
        ty: PORT,
        default: "904",
        doc: "Port of the agents, as the master reaches them.",
        restart: true,
        apply: |c, _, v| c.vsm.vsm_agent_port = v.as_u16(),
    },
    KeyDef {
        path: "/vsm/vnc_port_base",
        ty: PORT,
        default: "5900",
        doc: "A session's VNC port is this plus its display number.",
        restart: true,
        apply: |c, _, v| c.vsm.vnc_port_base = v.as_u16(),
    },
    KeyDef {
        path: "/vsm/vnc_socket_dir",
        ty: ValueType::Path,
        default: "/run/vsmagent/sessions",
        doc: "Directory of the private desktops' sockets on the agents: a session on display N listens on `<dir>/N/vnc.sock`, in a directory only its user can enter; must be the same on masters and agents.",
        restart: true,
        apply: |c, _, v| c.vsm.vnc_socket_dir = v.as_path(),
    },
    KeyDef {
        path: "/vsm/secret_file",
        ty: ValueType::SecretPath,
        default: "cluster.key",
        doc: "File holding the secret shared by masters and agents; relative to the configuration directory unless absolute.",
        restart: true,
        apply: |c, _, v| c.vsm.secret_file = v.as_path(),
    },
];

/// Top-level folders, in documentation order, with the file each one lives in by default.
pub const FOLDERS: &[(&str, &str)] = &[
    ("HA", "ha.toml"),
    ("subclusters", "cluster.toml"),
    ("agents", "cluster.toml"),
    ("vsmserver", "vsmserver.toml"),
    ("vsmagent", "vsmagent.toml"),
    ("vsm", "vsm.toml"),
];

/// The file a canonical path is written to when no file defines it or its folder yet.
pub fn home_file(canonical_path: &str) -> &'static str {
    let top = canonical_path.split('/').nth(1).unwrap_or("");
    FOLDERS.iter().find(|(f, _)| *f == top).map(|(_, file)| *file).unwrap_or("vsm.toml")
}

/// Splits a path into segments, checking its shape: it starts with `/`, has no empty
/// segment (a trailing `/` is allowed) and no whitespace.
pub fn segments(path: &str) -> Result<Vec<&str>, String> {
    let p = path.trim();
    let Some(rest) = p.strip_prefix('/') else {
        return Err(format!("key path {p:?} must start with '/'"));
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.is_empty() {
        return Ok(vec![]);
    }
    let segs: Vec<&str> = rest.split('/').collect();
    if segs.iter().any(|s| s.is_empty() || s.chars().any(char::is_whitespace)) {
        return Err(format!("key path {p:?} has an empty segment or whitespace"));
    }
    Ok(segs)
}

/// Rewrites alias forms to canonical ones: `/vsmserver/HA/...` → `/HA/...`,
/// `/vsmserver/subclusters/...` → `/subclusters/...`. Returns the canonical path and whether
/// an alias was used. Works for folders as well as keys.
///
/// Folder and key names are case-insensitive, as in ThinLinc: they take the key table's
/// spelling (`/ha/ENABLED` → `/HA/enabled`). Wildcard segments (subcluster names, hosts)
/// are kept as written.
pub fn canonical(path: &str) -> Result<(String, bool), String> {
    let segs = segments(path)?;
    let alias = segs.len() >= 2
        && segs[0].eq_ignore_ascii_case("vsmserver")
        && (segs[1].eq_ignore_ascii_case("HA") || segs[1].eq_ignore_ascii_case("subclusters"));
    let segs = if alias { &segs[1..] } else { &segs[..] };
    let mut out: Vec<&str> = Vec::with_capacity(segs.len());
    for (i, seg) in segs.iter().enumerate() {
        let spelled = KEYS.iter().find_map(|def| {
            let pat: Vec<&'static str> = def.path[1..].split('/').collect();
            let fixed = *pat.get(i)?;
            let same_folder = pat[..i].iter().zip(&out).all(|(p, o)| p.starts_with('<') || p == o);
            (same_folder && !fixed.starts_with('<') && fixed.eq_ignore_ascii_case(seg)).then_some(fixed)
        });
        out.push(spelled.unwrap_or(seg));
    }
    Ok((format!("/{}", out.join("/")), alias))
}

/// A path resolved to a key of the table.
#[derive(Debug, Clone)]
pub struct KeyMatch {
    pub def: &'static KeyDef,
    /// The canonical path (wildcard filled in).
    pub path: String,
    /// The wildcard segment, or empty.
    pub wildcard: String,
}

/// Why a path is not a known key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LookupError {
    /// The path is malformed, or its wildcard segment is invalid.
    Invalid(String),
    /// Not a key of the table; with the closest known key when one is close enough.
    Unknown { path: String, suggestion: Option<String> },
}

impl std::fmt::Display for LookupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LookupError::Invalid(msg) => f.write_str(msg),
            LookupError::Unknown { path, suggestion: Some(s) } => {
                write!(f, "unknown key {path} (did you mean {s}?)")
            }
            LookupError::Unknown { path, suggestion: None } => write!(f, "unknown key {path}"),
        }
    }
}

/// Resolves a (canonical or alias) path to its key.
pub fn lookup(path: &str) -> Result<KeyMatch, LookupError> {
    let (canon, _) = canonical(path).map_err(LookupError::Invalid)?;
    let segs: Vec<&str> = canon[1..].split('/').collect();
    for def in KEYS {
        let pat: Vec<&str> = def.path[1..].split('/').collect();
        if pat.len() != segs.len() {
            continue;
        }
        let mut wildcard = "";
        let matched = pat.iter().zip(&segs).all(|(p, s)| {
            if p.starts_with('<') {
                wildcard = s;
                true
            } else {
                p == s
            }
        });
        if !matched {
            continue;
        }
        match def.wildcard() {
            Some(Wildcard::Host) => {
                super::value::check_host(wildcard).map_err(|why| {
                    LookupError::Invalid(format!("{canon}: {wildcard:?} is not a valid host name ({why})"))
                })?;
            }
            Some(Wildcard::Name) if !wildcard.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b)) => {
                return Err(LookupError::Invalid(format!(
                    "{canon}: subcluster name {wildcard:?} may contain only letters, digits, '_', '-' and '.'"
                )));
            }
            Some(Wildcard::Name) => {}
            None => {}
        }
        let wildcard = wildcard.to_string();
        return Ok(KeyMatch { def, path: canon, wildcard });
    }
    let suggestion = suggest(&canon);
    Err(LookupError::Unknown { suggestion, path: canon })
}

/// The known key closest to `path` (canonical), if one in the same folder is close enough to
/// be a plausible typo of its name.
pub fn suggest(path: &str) -> Option<String> {
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (name, folder) = segs.split_last()?;
    let mut best: Option<(f64, String)> = None;
    for def in KEYS {
        let pat: Vec<&str> = def.path[1..].split('/').collect();
        let Some((key_name, key_folder)) = pat.split_last() else { continue };
        // Only keys of the same folder (a wildcard stands for the user's segment), so that
        // `/subclusters/eng/agent` suggests `/subclusters/eng/agents` and nothing suggests a
        // key of another folder.
        let same_folder = key_folder.len() == folder.len()
            && key_folder.iter().zip(folder).all(|(p, s)| p.starts_with('<') || p.eq_ignore_ascii_case(s));
        if !same_folder || key_name.starts_with('<') {
            continue;
        }
        let score = strsim::normalized_levenshtein(&name.to_ascii_lowercase(), &key_name.to_ascii_lowercase());
        if best.as_ref().map_or(true, |(b, _)| score > *b) {
            let filled: Vec<&str> =
                key_folder.iter().zip(folder).map(|(p, s)| if p.starts_with('<') { *s } else { *p }).collect();
            best = Some((score, format!("/{}/{key_name}", filled.join("/")).replace("//", "/")));
        }
    }
    best.filter(|(score, _)| *score >= 0.6).map(|(_, c)| c)
}

/// Whether a canonical path names a folder (a prefix of some key path, wildcards filled).
pub fn is_folder(canonical_path: &str) -> bool {
    let segs: Vec<&str> = canonical_path.trim_matches('/').split('/').filter(|s| !s.is_empty()).collect();
    KEYS.iter().any(|def| {
        let pat: Vec<&str> = def.path[1..].split('/').collect();
        pat.len() > segs.len() && pat.iter().zip(&segs).all(|(p, s)| p.starts_with('<') || p == s)
    })
}

const DOC_INTRO: &str = r#"# Configuration reference

<!-- Generated from the key table in src/config/keys.rs by config::keys::render_markdown().
     Do not edit by hand: run `VSM_UPDATE_DOCS=1 cargo test --lib config::keys` to regenerate. -->

vsm reads every `*.toml` file in its configuration directory.
The directory is `/etc/vsm` unless the `--config-dir` flag or the `VSM_CONFIG_DIR` environment variable names another one (the flag wins).
Daemons refuse to start when the directory does not exist; an existing empty directory means all defaults.
Files whose name starts with `.` are ignored (the editor's temporary files are named that way).

Every key is addressed by a path: `/HA/enabled` is the key `enabled` in the table `[HA]`, and `/subclusters/default/agents` is `agents` in `[subclusters.default]`.
By convention each top-level folder lives in one file: `/HA` in `ha.toml`, `/subclusters` and `/agents` in `cluster.toml`, `/vsmserver` in `vsmserver.toml`, `/vsmagent` in `vsmagent.toml`, `/vsm` in `vsm.toml`.
Any file may define any folder, but a key defined in two files is an error that names both files.
Unknown keys are errors (with a suggestion of the closest known key), so a typo never silently falls back to a default.

The older paths `/vsmserver/HA/*` and `/vsmserver/subclusters/*` are accepted as aliases of `/HA/*` and `/subclusters/*`, in files (`[vsmserver.HA]`) and in `tl-config`.
Reading an alias returns the canonical key's value; writing an alias with `tl-config` writes the canonical key (and removes the alias entry).

## Value syntax

- Booleans: `true`/`false`, `yes`/`no` or `1`/`0` in any case; `tl-config` writes `true`/`false`.
- Lists: space-separated on the `tl-config` command line, TOML arrays in files (a TOML string is read as a space-separated list); `tl-config` writes arrays.
- Durations: `250ms`, `5s`, `2m`, `1h`, `7d`, or several of these, largest unit first, such as `1m30s`; a bare number means seconds.
- Hosts: an IP address, or a name made of letters, digits, `-` and `.`.
- Paths must be absolute, except secret files, which may be relative to the configuration directory.
- In files, any value may also be written as a TOML string in `tl-config` syntax (`enabled = "yes"`).

## tl-config

`tl-config` reads and writes keys by path; `tl-config --help` shows examples.

- `tl-config /HA/enabled` prints a value (the default when the key is not set; lists space-separated).
- `tl-config /HA/enabled=1 '/HA/nodes=tlha-primary tlha-secondary'` sets several keys at once.
- `tl-config -a /HA` lists a folder (`name = value` lines, sub-folders as `name/`); `tl-config -Ra /` lists everything.
- `tl-config -e PORT=/vsmserver/listen_port` prints `PORT='9000'` for `eval` in a shell; `-x` adds `export`.
- `tl-config -d /agents/weights/agent1.example.com` deletes a key (it returns to its default); `-d /subclusters/<name>` deletes a subcluster.
- `tl-config --check` validates the whole directory and lists every problem.
- `tl-config -E /vsmserver` prints `NAME='value'` for every key of a folder, named after the keys.
- `tl-config -i /opt/thinlinc/etc/conf.d/vsmserver.hconf` imports a ThinLinc site's settings (see below); `-p FILE` removes from a Hiveconf file the parameters vsm's configuration now sets, so that what is left is what did not carry over.

Paths are case-insensitive, as in ThinLinc (`/ha/ENABLED` is `/HA/enabled`); subcluster names and hosts keep the case they are written in.
Reading a key of a subcluster that does not exist (or the weight of a host that is no subcluster's agent) is an error, "no such parameter", not an empty value.
An unknown key is refused with the closest key of the same folder, when one is close.

### Importing ThinLinc's configuration

`tl-config -i FILE` reads ThinLinc's Hiveconf syntax: `[/folder]` headers, `name = value` lines (lists space-separated, booleans as above), `#` and `;` comments, lines continued with a trailing `\`, and `%mount` of other files (globs allowed, relative to the file), so `tl-config -i /opt/thinlinc/etc/thinlinc.hconf` reads a whole site.
Both layouts are understood: 4.18 and earlier (`/vsmserver/HA/*`, `/vsmserver/subclusters/*`) and 4.19 and later (`/HA/*`, `/subclusters/*`, `/agents/*`); either is written to vsm's files under the current names.
A geometry written `1280 800` becomes `1280x800`, and `/vsmserver/load_update_cycle` becomes `/vsmserver/reconcile_interval`.
Parameters vsm has no use for (such as `/vsmserver/unbind_ports_at_login`, the load balancer tunables of ThinLinc before 4.19, tunnel ports, logging and other ThinLinc programs' folders) are listed as `skipped PATH (FILE:LINE): why`, never dropped silently.
The import is one edit like any other: every value is checked (a bad one is reported with its file and line), the whole resulting configuration is validated, and nothing is written unless all of it is valid.

Before writing, `tl-config` checks every assignment and validates the whole resulting configuration with the same rules as the daemons.
If anything is wrong nothing is written; problems the directory already had are reported as warnings and do not block unrelated changes.
A new key goes into the file that already holds its folder, else into the folder's file above (created if needed).
Files are replaced atomically (temporary file, fsync, rename), and comments and layout of untouched lines are kept.
The exit status is the number of errors (at most 255).

## Rules between keys

- `/vsmagent/display_min` must be less than `/vsmagent/display_max`, and `/vsm/vnc_port_base` + `display_max` at most 65535.
- `/HA/peer_timeout` must be longer than `/HA/heartbeat_interval`.
- Every subcluster needs at least one agent; at most one subcluster may have neither `users` nor `groups` (the default subcluster); a user may be listed in only one subcluster.
- Every host in `/agents/weights` must appear in some subcluster's `agents`.
- If no file defines any subcluster, vsm behaves as if `[subclusters.default]` with `agents = ["127.0.0.1"]` were configured; once any subcluster is configured, only the configured ones exist.
- With `/HA/enabled` true:
  - no subcluster may list a loopback agent (`127.0.0.0/8`, `::1`, `localhost`, or a name resolving to a loopback address), because loopback means a different machine depending on which master is active: use the agent's unique host name or address;
  - `/HA/secret_file` must exist, be readable and hold at least 16 bytes: create it once with `head -c 32 /dev/urandom > /etc/vsm/ha.key && chmod 600 /etc/vsm/ha.key` and copy it to the other master. The daemons refuse secret files that group or others may access, naming the `chmod` that fixes it.
  - these two need the machine (a name lookup, the secret file), so `vsmserver` and `vsmagent` check them when they start and `tl-config` when it writes and with `--check`; `vsmclient` and `tlctl` only read the files: they look up no agent name and never open `/HA/secret_file`.
- Which entry of `/HA/nodes` is the local machine is decided when `vsmserver` starts, not by the configuration check: if it cannot be decided, the server runs without HA and logs why.

All daemons read their configuration only when they start: after a change, restart the service that reads the folder (`vsmserver.service` for `/HA`, `/subclusters`, `/agents` and `/vsmserver`; `vsmagent.service` for `/vsmagent`; both for `/vsm`).

## Keys
"#;

/// Renders `docs/configuration.md` from [`KEYS`].
pub fn render_markdown() -> String {
    let mut out = String::from(DOC_INTRO);
    for (folder, file) in FOLDERS {
        out.push_str(&format!("\n### /{folder} (`{file}`)\n\n"));
        out.push_str("| key | type | default | restart | meaning |\n");
        out.push_str("| --- | --- | --- | --- | --- |\n");
        for def in KEYS.iter().filter(|d| d.top_folder() == *folder) {
            let default = if def.default.is_empty() { "(empty)".to_string() } else { format!("`{}`", def.default) };
            out.push_str(&format!(
                "| `{}` | {} | {} | {} | {} |\n",
                def.path,
                def.ty.short_name(),
                default,
                if def.restart { "yes" } else { "no" },
                def.doc.replace('|', "\\|"),
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_default_parses_and_all_defaults_give_config_default() {
        let mut c = Config::default();
        // Start from a config that differs everywhere we can, then apply every default.
        c.ha.enabled = true;
        c.ha.port = 1;
        c.vsmagent.session_command.clear();
        c.vsmserver.admin_email.clear();
        for def in KEYS {
            let v = def.ty.parse_text(def.default).unwrap_or_else(|e| panic!("{}: {e}", def.path));
            if def.wildcard().is_none() {
                (def.apply)(&mut c, "", &v);
            }
        }
        let mut want = Config::default();
        // Secret files default to paths relative to the configuration directory; the loader
        // resolves them (Config::default() shows them resolved against /etc/vsm).
        want.ha.secret_file = "ha.key".into();
        want.vsm.secret_file = "cluster.key".into();
        assert_eq!(c, want);
    }

    #[test]
    fn paths_are_unique_and_well_formed() {
        let mut seen = std::collections::BTreeSet::new();
        for def in KEYS {
            assert!(seen.insert(def.path), "duplicate {}", def.path);
            assert!(segments(def.path).is_ok(), "{}", def.path);
            assert!(FOLDERS.iter().any(|(f, _)| *f == def.top_folder()), "{}", def.path);
            assert!(!def.doc.is_empty());
        }
    }

    #[test]
    fn lookup_canonical_alias_and_wildcards() {
        assert_eq!(lookup("/HA/enabled").unwrap().path, "/HA/enabled");
        assert_eq!(lookup("/vsmserver/HA/enabled").unwrap().path, "/HA/enabled");
        let m = lookup("/vsmserver/subclusters/eng/agents").unwrap();
        assert_eq!((m.path.as_str(), m.wildcard.as_str()), ("/subclusters/eng/agents", "eng"));
        let m = lookup("/agents/weights/agent1.example.com").unwrap();
        assert_eq!(m.wildcard, "agent1.example.com");
        assert!(matches!(lookup("/agents/weights/bad_host"), Err(LookupError::Invalid(_))));
        assert!(matches!(lookup("/subclusters/a b/agents"), Err(LookupError::Invalid(_))));
        assert!(matches!(lookup("HA/enabled"), Err(LookupError::Invalid(_))));
        assert!(matches!(lookup("/HA//enabled"), Err(LookupError::Invalid(_))));
    }

    #[test]
    fn paths_are_case_insensitive_but_names_keep_their_case() {
        assert_eq!(lookup("/ha/ENABLED").unwrap().path, "/HA/enabled");
        assert_eq!(lookup("/VSMSERVER/ha/Nodes").unwrap().path, "/HA/nodes");
        let m = lookup("/VsmServer/SubClusters/Eng/Agents").unwrap();
        assert_eq!((m.path.as_str(), m.wildcard.as_str()), ("/subclusters/Eng/agents", "Eng"));
        assert_eq!(lookup("/Agents/Weights/Host1").unwrap().path, "/agents/weights/Host1");
        assert_eq!(canonical("/vsmserver/ha").unwrap(), ("/HA".to_string(), true));
        assert_eq!(canonical("/Nope/x").unwrap(), ("/Nope/x".to_string(), false));
    }

    #[test]
    fn unknown_keys_get_suggestions() {
        let cases = [
            ("/HA/enable", Some("/HA/enabled")),
            ("/ha/enable", Some("/HA/enabled")),
            ("/subclusters/eng/agent", Some("/subclusters/eng/agents")),
            ("/vsmagent/display_mx", Some("/vsmagent/display_max")),
            ("/vsmserver/HA/node", Some("/HA/nodes")),
            ("/completely/unrelated/thing/here", None),
            // Never a key of another folder, even when a wildcard could take the name.
            ("/vsmserver/unbind_ports_at_login", None),
            ("/vsmserver/listen_prot", Some("/vsmserver/listen_port")),
            ("/agents/weight", None),
        ];
        for (path, want) in cases {
            match lookup(path) {
                Err(LookupError::Unknown { suggestion, .. }) => {
                    assert_eq!(suggestion.as_deref(), want, "{path}")
                }
                other => panic!("{path}: {other:?}"),
            }
        }
        let msg = lookup("/HA/enable").unwrap_err().to_string();
        assert_eq!(msg, "unknown key /HA/enable (did you mean /HA/enabled?)");
    }

    #[test]
    fn folders_and_home_files() {
        for f in ["/", "/HA", "/subclusters", "/subclusters/x", "/agents/weights", "/vsm"] {
            assert!(is_folder(f), "{f}");
        }
        for f in ["/HA/enabled", "/nope", "/agents/draining"] {
            assert!(!is_folder(f), "{f}");
        }
        assert_eq!(home_file("/HA/enabled"), "ha.toml");
        assert_eq!(home_file("/agents/weights/x"), "cluster.toml");
        assert_eq!(home_file("/subclusters/a/agents"), "cluster.toml");
        assert_eq!(home_file("/vsmagent/listen_port"), "vsmagent.toml");
        assert_eq!(canonical("/vsmserver/HA").unwrap(), ("/HA".to_string(), true));
    }

    /// Fails when docs/configuration.md differs from the rendering of the key table.
    /// `VSM_UPDATE_DOCS=1 cargo test --lib config::keys` rewrites it.
    #[test]
    fn docs_match_key_table() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/configuration.md");
        let want = render_markdown();
        if std::env::var_os("VSM_UPDATE_DOCS").is_some() {
            std::fs::write(&path, &want).unwrap();
        }
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            have == want,
            "docs/configuration.md is out of date: run `VSM_UPDATE_DOCS=1 cargo test --lib config::keys`"
        );
    }
}
