//! The sessions running on this agent: display allocation, start, watch, terminate.
//!
//! [`SessionManager`] owns every session process the agent started. It allocates the lowest
//! free display in `[display_min, display_max]`, expands the `session_command` argv template
//! (`{display}`, `{port}`, `{geometry}`, `{user}` inside each argument), and runs it directly
//! (never through a shell) in a new Unix session (`setsid`), with a clean environment. When the
//! agent runs as root the command runs as the user: supplementary groups, then gid, then uid
//! are set in the child before `exec`. Output goes to `state_dir/sessions/<user>/<display>.log`.
//!
//! A display is free when no session of ours uses it, there is neither an X lock file
//! `<x_dir>/.X<n>-lock` nor a socket `<x_dir>/.X11-unix/X<n>`, and the VNC port
//! `vnc_port_base + n` can be bound. Displays are reserved under the table lock before the
//! process is spawned, so two concurrent starts never pick the same display.
//!
//! Sessions outlive the agent. Stopping or restarting `vsmagent` must not end users'
//! desktops, so [`SessionManager::shutdown`] detaches from the processes instead of killing
//! them (the systemd unit needs `KillMode=process` for the same reason). Every change to the
//! table is persisted to `state_dir/sessions.json` (atomic rename); on start
//! [`SessionManager::open`] re-adopts each persisted session whose pid is alive with the same
//! kernel start time (so a recycled pid is never mistaken for a session). Re-adopted
//! processes are no longer our children, so their exit is detected by polling `/proc` every
//! `adopted_poll`; their exit status is unknown (`None`). Persisted sessions that died while
//! the agent was down are reported as exited at start.
//!
//! A desktop whose process was spawned but whose session never reached `sessions.json` (the
//! agent was killed between the two) was never reported to any master, so no master will ever
//! end it. At start, after re-adopting, the agent ends such orphans: session leaders in its
//! own network namespace whose environment names a `VSM_SESSION_ID` the table does not hold and
//! a `VSM_SESSION_DIR` directly under its `vnc_socket_dir` (see [`find_orphans`]).
//!
//! When a session's process ends, for whatever reason (by itself, killed by someone else, or
//! terminated at the master's request), an [`AgentReport::SessionExited`] goes into the
//! bounded report channel *before* the session leaves the persisted table, so a crash in
//! between yields a duplicate report, never a lost one. The exit status is the exit code, or
//! 128 + signal number for a process killed by a signal.
//!
//! Invariants: never a shell; never a session process that inherits the agent's environment;
//! the table lock is a `std::sync::Mutex` never held across `.await`; `agent_address` of the
//! returned sessions is left empty here and filled in by the connection layer, because it
//! depends on which local address the master reached.

use super::viewers::{Tables, ViewerTracker};
use super::{write_json_atomic, AgentdError};
use crate::config::Config;
use crate::model::{now_ms, SessionId};
use crate::proto::agent::{vnc_socket_path, AgentReport, AgentSession};
use nix::sys::signal::Signal;
use nix::unistd::{Gid, Pid, Uid};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::task::AbortHandle;

/// PATH given to every session.
pub const SESSION_PATH: &str = "/usr/local/bin:/usr/bin:/bin";
/// How much of a failed session's log is quoted in the error.
const LOG_TAIL_BYTES: u64 = 2048;

/// Everything the session manager needs, taken from the configuration (or set by tests).
#[derive(Clone, Debug)]
pub struct SessionOptions {
    pub display_min: u32,
    pub display_max: u32,
    pub vnc_port_base: u16,
    /// argv template.
    pub session_command: Vec<String>,
    pub default_geometry: String,
    /// Holds `sessions.json` and `sessions/<user>/<display>.log`.
    pub state_dir: PathBuf,
    /// Holds one directory per session, `<display>/`, owned by the session's user with mode
    /// `0700`; a private desktop's socket is `<display>/vnc.sock` in it (`{socket}`).
    pub vnc_socket_dir: PathBuf,
    /// How often the viewers attached to each desktop are sampled.
    pub viewer_poll: Duration,
    /// PAM service of the sessions (`/vsmagent/pam_service`).
    pub pam_service: Option<String>,
    /// The program that opens the PAM session and then runs the session command as the user
    /// (`vsmagent` itself, see [`super::pam`]); `None` runs sessions without PAM. Set by the
    /// `vsmagent` binary, never by the configuration.
    pub pam_helper: Option<PathBuf>,
    /// Where X servers put `.X<n>-lock` and `.X11-unix/X<n>`: `/tmp` outside tests.
    pub x_dir: PathBuf,
    /// A session that exits within this window failed to start.
    pub start_check: Duration,
    /// Between SIGTERM and SIGKILL on terminate.
    pub terminate_grace: Duration,
    /// How often a re-adopted session's process is checked.
    pub adopted_poll: Duration,
    /// Run sessions as the agent's own user even when it is root (demo and tests only; not a
    /// configuration key).
    pub run_as_self: bool,
    /// End every session on [`SessionManager::shutdown`] instead of detaching. Never set in
    /// production (users' desktops must survive an agent restart); for test harnesses and
    /// demos that must not leave processes behind.
    pub terminate_on_shutdown: bool,
}

impl SessionOptions {
    pub fn from_config(config: &Config) -> Self {
        let a = &config.vsmagent;
        SessionOptions {
            display_min: a.display_min,
            display_max: a.display_max,
            vnc_port_base: config.vsm.vnc_port_base,
            session_command: a.session_command.clone(),
            default_geometry: a.default_geometry.clone(),
            state_dir: a.state_dir.clone(),
            vnc_socket_dir: config.vsm.vnc_socket_dir.clone(),
            viewer_poll: Duration::from_secs(1),
            pam_service: a.pam_service.clone(),
            pam_helper: None,
            x_dir: PathBuf::from("/tmp"),
            start_check: Duration::from_millis(200),
            terminate_grace: Duration::from_secs(3),
            adopted_poll: Duration::from_secs(1),
            run_as_self: false,
            terminate_on_shutdown: false,
        }
    }
}

/// Values substituted into the argv template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placeholders {
    pub display: u32,
    pub port: u16,
    pub geometry: String,
    pub user: String,
    /// The private desktop's Unix socket.
    pub socket: String,
}

/// Expand `{display}`, `{port}`, `{geometry}`, `{user}` and `{socket}` inside each argument of
/// `template`. Other text, including unknown `{…}`, is kept as is; one argument stays one
/// argument whatever the values contain.
pub fn expand_command(template: &[String], p: &Placeholders) -> Vec<String> {
    let display = p.display.to_string();
    let port = p.port.to_string();
    template
        .iter()
        .map(|arg| {
            // One pass, so a value that itself looks like a placeholder is not expanded again.
            let mut out = String::with_capacity(arg.len());
            let mut rest = arg.as_str();
            while let Some(i) = rest.find('{') {
                out.push_str(&rest[..i]);
                let tail = &rest[i..];
                let (value, len) = [
                    ("{display}", display.as_str()),
                    ("{port}", port.as_str()),
                    ("{geometry}", p.geometry.as_str()),
                    ("{user}", p.user.as_str()),
                    ("{socket}", p.socket.as_str()),
                ]
                .iter()
                .find(|(k, _)| tail.starts_with(k))
                .map(|(k, v)| (*v, k.len()))
                .unwrap_or(("{", 1));
                out.push_str(value);
                rest = &tail[len..];
            }
            out.push_str(rest);
            out
        })
        .collect()
}

/// `WIDTHxHEIGHT`, each 1 to 5 digits.
pub fn valid_geometry(g: &str) -> bool {
    let Some((w, h)) = g.split_once('x') else {
        return false;
    };
    let ok = |s: &str| (1..=5).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit());
    ok(w) && ok(h)
}

/// A user name safe to use in a path and an argument: letters, digits, `._-@$`, not starting
/// with `.` or `-`, at most 64 bytes.
pub fn valid_user_name(u: &str) -> bool {
    !u.is_empty()
        && u.len() <= 64
        && !u.starts_with(['.', '-'])
        && u.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-@$".contains(&b))
}

fn valid_session_id(id: &SessionId) -> bool {
    let s = &id.0;
    !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// Does the command template reach its desktop only through `{socket}` (no `{port}`)? Such a
/// session is reported with VNC port 0: it has no TCP port.
pub fn socket_only(template: &[String]) -> bool {
    template.iter().any(|a| a.contains("{socket}")) && !template.iter().any(|a| a.contains("{port}"))
}

/// Is display `n` free of X servers (lock file, socket) in `x_dir`, with `port` bindable?
pub fn display_is_free(x_dir: &Path, n: u32, port: u16) -> bool {
    let lock = x_dir.join(format!(".X{n}-lock"));
    let socket = x_dir.join(".X11-unix").join(format!("X{n}"));
    if lock.symlink_metadata().is_ok() || socket.symlink_metadata().is_ok() {
        return false;
    }
    std::net::TcpListener::bind(("0.0.0.0", port)).is_ok()
}

/// The fields of `/proc/<pid>/stat` the agent uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcStat {
    pub state: char,
    pub ppid: i32,
    pub session: i32,
    /// Clock ticks after boot at which the process started.
    pub start_time: u64,
}

/// Parse `/proc/<pid>/stat`. The command name may contain spaces and parentheses, so
/// fields are counted from the last `)`.
pub fn parse_stat(text: &str) -> Option<ProcStat> {
    let after = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // f[0] is field 3 (state); field k is f[k - 3].
    Some(ProcStat {
        state: f.first()?.chars().next()?,
        ppid: f.get(1)?.parse().ok()?,
        session: f.get(3)?.parse().ok()?,
        start_time: f.get(19)?.parse().ok()?,
    })
}

fn proc_stat(pid: i32) -> Option<ProcStat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Is `pid` alive (not a zombie) and the same process that started at `start_time`?
fn same_process_alive(pid: i32, start_time: u64) -> bool {
    matches!(proc_stat(pid), Some(s) if s.start_time == start_time && s.state != 'Z' && s.state != 'X')
}

/// Send `sig` to the session's process group and to every other process still in its Unix
/// session (members that made their own process group).
fn signal_session(leader: i32, sig: Signal) {
    let _ = nix::sys::signal::killpg(Pid::from_raw(leader), sig);
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return;
    };
    for e in dir.filter_map(|e| e.ok()) {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        if matches!(proc_stat(pid), Some(s) if s.session == leader) {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), sig);
        }
    }
}

/// A desktop process found by [`find_orphans`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Orphan {
    pub pid: i32,
    pub start_time: u64,
    pub session_id: String,
    /// The display, from the name of its session directory.
    pub display: Option<u32>,
}

/// Session leaders in this process's network namespace whose environment has a
/// `VSM_SESSION_ID` not in `known` and a `VSM_SESSION_DIR` directly under `socket_dir`: the
/// desktops an agent with that directory started. Processes whose environment or namespace
/// cannot be read are left alone.
pub fn find_orphans(socket_dir: &Path, known: &std::collections::HashSet<String>) -> Vec<Orphan> {
    let Ok(own_ns) = std::fs::read_link("/proc/self/ns/net") else {
        return Vec::new();
    };
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for e in dir.filter_map(|e| e.ok()) {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        let Some(stat) = proc_stat(pid) else { continue };
        if stat.session != pid || stat.state == 'Z' || stat.state == 'X' {
            continue;
        }
        if std::fs::read_link(format!("/proc/{pid}/ns/net")).ok().as_ref() != Some(&own_ns) {
            continue;
        }
        let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else { continue };
        let var = |name: &str| {
            environ.split(|b| *b == 0).find_map(|kv| {
                let kv = std::str::from_utf8(kv).ok()?;
                kv.strip_prefix(name)?.strip_prefix('=').map(str::to_string)
            })
        };
        let (Some(session_id), Some(session_dir)) = (var("VSM_SESSION_ID"), var("VSM_SESSION_DIR")) else {
            continue;
        };
        let session_dir = PathBuf::from(session_dir);
        if session_dir.parent() != Some(socket_dir) || known.contains(&session_id) {
            continue;
        }
        let display = session_dir.file_name().and_then(|n| n.to_str()).and_then(|n| n.parse().ok());
        found.push(Orphan { pid, start_time: stat.start_time, session_id, display });
    }
    found
}

fn exit_code(status: std::process::ExitStatus) -> Option<i32> {
    use std::os::unix::process::ExitStatusExt;
    status.code().or_else(|| status.signal().map(|s| 128 + s))
}

fn log_tail(path: &Path) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL_BYTES)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).trim().to_string()
}

/// One session as persisted in `sessions.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Persisted {
    session: AgentSession,
    /// Kernel start time of `session.pid`, to recognise the same process after a restart.
    start_time: u64,
}

/// `None` while the process runs; `Some(exit status)` once it is gone.
type ExitState = Option<Option<i32>>;

struct Entry {
    session: AgentSession,
    viewers: ViewerTracker,
    start_time: u64,
    exited: watch::Receiver<ExitState>,
    watcher: AbortHandle,
}

enum Slot {
    /// Picked by a start of this session id in progress.
    Reserved(SessionId),
    Running(Entry),
}

struct Inner {
    opts: SessionOptions,
    table: Mutex<BTreeMap<u32, Slot>>,
    reports: mpsc::Sender<AgentReport>,
    /// Serialises writers of `sessions.json` so an older snapshot never overwrites a newer.
    persist_lock: tokio::sync::Mutex<()>,
    closed: AtomicBool,
}

enum Reserved {
    /// A start of a session id that runs: the request is answered with the running session.
    Existing(AgentSession),
    Display(u32),
}

/// Owner of the running sessions. Cheap to clone; every clone is the same manager.
#[derive(Clone)]
pub struct SessionManager {
    inner: Arc<Inner>,
}

/// Who a session runs as.
struct Identity {
    name: String,
    home: PathBuf,
    shell: PathBuf,
    /// `Some` when the agent is root and switches to the user.
    switch: Option<(Uid, Gid, Vec<Gid>)>,
}

impl SessionManager {
    /// Create the state directory, load `sessions.json`, re-adopt the sessions still alive
    /// and queue exit reports for the others. Exits are reported into `reports`.
    pub async fn open(opts: SessionOptions, reports: mpsc::Sender<AgentReport>) -> Result<SessionManager, AgentdError> {
        std::fs::create_dir_all(opts.state_dir.join("sessions")).map_err(|e| AgentdError::Io {
            what: format!("create state directory {}", opts.state_dir.display()),
            source: e,
        })?;
        let mgr = SessionManager {
            inner: Arc::new(Inner {
                opts,
                table: Mutex::new(BTreeMap::new()),
                reports,
                persist_lock: tokio::sync::Mutex::new(()),
                closed: AtomicBool::new(false),
            }),
        };
        let path = mgr.state_file();
        let persisted: Vec<Persisted> = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| AgentdError::State {
                path: path.clone(),
                message: format!("expected a json list of sessions: {e}"),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(AgentdError::Io { what: format!("read {}", path.display()), source: e }),
        };
        let mut dead = Vec::new();
        for p in persisted {
            let pid = p.session.pid as i32;
            if same_process_alive(pid, p.start_time) {
                tracing::info!(
                    session_id = %p.session.session_id, user = %p.session.user,
                    display = p.session.display, pid, "re-adopted running session"
                );
                mgr.adopt(p);
            } else {
                tracing::info!(
                    session_id = %p.session.session_id, display = p.session.display,
                    "session ended while the agent was down"
                );
                dead.push(AgentReport::SessionExited {
                    session_id: p.session.session_id,
                    display: p.session.display,
                    exit_status: None,
                });
            }
        }
        // Hand the reports over before the dead sessions leave sessions.json, so a crash in
        // between repeats them instead of losing them. The channel is bounded and the reporter
        // may not drain it yet: what does not fit is sent by a task.
        let mut dead = dead.into_iter();
        for r in dead.by_ref() {
            match mgr.inner.reports.try_send(r) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(r)) => {
                    let tx = mgr.inner.reports.clone();
                    let rest: Vec<AgentReport> = std::iter::once(r).chain(dead.by_ref()).collect();
                    tokio::spawn(async move {
                        for r in rest {
                            if tx.send(r).await.is_err() {
                                break;
                            }
                        }
                    });
                    break;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => break,
            }
        }
        mgr.persist().await;
        mgr.end_orphans().await;
        mgr.start_viewer_sampler();
        Ok(mgr)
    }

    /// Ends the desktops this agent spawned but never recorded (see the module doc): `TERM`
    /// to their Unix session, `KILL` after `terminate_grace`, and their session directory
    /// removed. Bounded by `terminate_grace`; nothing to do in the usual case.
    async fn end_orphans(&self) {
        let known: std::collections::HashSet<String> = self.list().into_iter().map(|s| s.session_id.0).collect();
        let orphans = find_orphans(&self.inner.opts.vnc_socket_dir, &known);
        if orphans.is_empty() {
            return;
        }
        for o in &orphans {
            tracing::warn!(
                session_id = %o.session_id, pid = o.pid, display = ?o.display,
                "ending a desktop this agent started but never recorded (it stopped while starting it, \
                 so no master was told of it)"
            );
            signal_session(o.pid, Signal::SIGTERM);
        }
        let deadline = std::time::Instant::now() + self.inner.opts.terminate_grace;
        while std::time::Instant::now() < deadline && orphans.iter().any(|o| same_process_alive(o.pid, o.start_time)) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for o in &orphans {
            if same_process_alive(o.pid, o.start_time) {
                signal_session(o.pid, Signal::SIGKILL);
            }
            if let Some(dpy) = o.display {
                if !self.table().contains_key(&dpy) {
                    self.remove_session_dir(dpy);
                }
            }
        }
    }

    fn state_file(&self) -> PathBuf {
        self.inner.opts.state_dir.join("sessions.json")
    }

    /// The options in force.
    pub fn options(&self) -> &SessionOptions {
        &self.inner.opts
    }

    fn table(&self) -> std::sync::MutexGuard<'_, BTreeMap<u32, Slot>> {
        self.inner.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn adopt(&self, p: Persisted) {
        let (tx, rx) = watch::channel(None);
        let pid = p.session.pid as i32;
        let start_time = p.start_time;
        let display = p.session.display;
        let session_id = p.session.session_id.clone();
        let poll = self.inner.opts.adopted_poll;
        let mgr = self.clone();
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(poll).await;
                if !same_process_alive(pid, start_time) {
                    break;
                }
            }
            let _ = tx.send(Some(None));
            mgr.on_exit(session_id, display, pid, None).await;
        });
        self.table().insert(
            display,
            Slot::Running(Entry {
                session: p.session,
                viewers: ViewerTracker::default(),
                start_time,
                exited: rx,
                watcher: task.abort_handle(),
            }),
        );
    }

    /// Under one lock: the running session with this id, or else the lowest free display,
    /// reserved for this id. Two concurrent starts never share a display or an id.
    fn reserve_display(&self, session_id: &SessionId, user: &str) -> Result<Reserved, AgentdError> {
        let o = &self.inner.opts;
        let mut table = self.table();
        for slot in table.values() {
            match slot {
                Slot::Reserved(id) if id == session_id => {
                    return Err(AgentdError::BadRequest(format!(
                        "session {session_id} is being started by another request"
                    )))
                }
                Slot::Running(e) if &e.session.session_id == session_id && e.exited.borrow().is_none() => {
                    if e.session.user == user {
                        return Ok(Reserved::Existing(e.session.clone()));
                    }
                    return Err(AgentdError::BadRequest(format!(
                        "session id {session_id} is already used by another user"
                    )));
                }
                _ => {}
            }
        }
        for n in o.display_min..=o.display_max {
            if table.contains_key(&n) {
                continue;
            }
            let Some(port) = vnc_port(o.vnc_port_base, n) else {
                break;
            };
            if display_is_free(&o.x_dir, n, port) {
                table.insert(n, Slot::Reserved(session_id.clone()));
                return Ok(Reserved::Display(n));
            }
        }
        Err(AgentdError::NoFreeDisplay { min: o.display_min, max: o.display_max })
    }

    fn release(&self, display: u32) {
        let mut table = self.table();
        if matches!(table.get(&display), Some(Slot::Reserved(_))) {
            table.remove(&display);
        }
    }

    fn identity(&self, user: &str) -> Result<Identity, AgentdError> {
        use nix::unistd::User;
        if nix::unistd::geteuid().is_root() && !self.options().run_as_self {
            let u = match User::from_name(user) {
                Ok(Some(u)) => u,
                Ok(None) => return Err(AgentdError::UnknownUser(user.to_string())),
                Err(e) => return Err(AgentdError::StartFailed(format!("cannot look up user {user:?}: {e}"))),
            };
            let cname = CString::new(u.name.as_bytes()).map_err(|_| AgentdError::UnknownUser(user.to_string()))?;
            let groups = nix::unistd::getgrouplist(&cname, u.gid)
                .map_err(|e| AgentdError::StartFailed(format!("cannot list the groups of {user:?}: {e}")))?;
            Ok(Identity { name: u.name, home: u.dir, shell: u.shell, switch: Some((u.uid, u.gid, groups)) })
        } else {
            // Not root: the session runs as the agent's own user, whoever asked.
            let me = User::from_uid(nix::unistd::geteuid()).ok().flatten();
            Ok(Identity {
                name: me.as_ref().map(|u| u.name.clone()).unwrap_or_else(|| user.to_string()),
                home: me.as_ref().map(|u| u.dir.clone()).unwrap_or_else(|| PathBuf::from("/")),
                shell: me.map(|u| u.shell).unwrap_or_else(|| PathBuf::from("/bin/sh")),
                switch: None,
            })
        }
    }

    /// Start a session for `user` on the lowest free display. A repeated start of a session
    /// id that is running returns the running session.
    pub async fn start(
        &self,
        session_id: SessionId,
        user: &str,
        geometry: Option<String>,
    ) -> Result<AgentSession, AgentdError> {
        if !valid_session_id(&session_id) {
            return Err(AgentdError::BadRequest(format!(
                "session id {session_id:?} is not 1 to 128 letters, digits, '.', '_' or '-'"
            )));
        }
        if !valid_user_name(user) {
            return Err(AgentdError::BadRequest(format!("user name {user:?} is not a valid user name")));
        }
        let geometry = geometry.unwrap_or_else(|| self.inner.opts.default_geometry.clone());
        if !valid_geometry(&geometry) {
            return Err(AgentdError::BadRequest(format!("geometry {geometry:?} is not WIDTHxHEIGHT")));
        }
        if self.inner.opts.session_command.is_empty() {
            return Err(AgentdError::StartFailed("session_command is empty".into()));
        }
        let ident = self.identity(user)?;
        let dpy = match self.reserve_display(&session_id, user)? {
            Reserved::Existing(s) => return Ok(s),
            Reserved::Display(n) => n,
        };
        match self.spawn(&session_id, user, &geometry, dpy, ident).await {
            Ok(s) => Ok(s),
            Err(e) => {
                self.release(dpy);
                tracing::warn!(session_id = %session_id, user = user, display = dpy, error = %e, "session start failed");
                Err(e)
            }
        }
    }

    async fn spawn(
        &self,
        session_id: &SessionId,
        user: &str,
        geometry: &str,
        dpy: u32,
        ident: Identity,
    ) -> Result<AgentSession, AgentdError> {
        let o = &self.inner.opts;
        let port = vnc_port(o.vnc_port_base, dpy)
            .ok_or(AgentdError::NoFreeDisplay { min: o.display_min, max: o.display_max })?;
        let socket = vnc_socket_path(&o.vnc_socket_dir, dpy);
        let session_dir = self.prepare_session_dir(dpy, ident.switch.as_ref().map(|(u, g, _)| (*u, *g)))?;
        let argv = expand_command(
            &o.session_command,
            &Placeholders {
                display: dpy,
                port,
                geometry: geometry.to_string(),
                user: user.to_string(),
                socket: socket.display().to_string(),
            },
        );
        let private = socket_only(&o.session_command);
        let log_dir = o.state_dir.join("sessions").join(user);
        let log_path = log_dir.join(format!("{dpy}.log"));
        let io = |what: String| move |e| AgentdError::Io { what, source: e };
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&log_dir)
                .map_err(io(format!("create {}", log_dir.display())))?;
        }
        let log = std::fs::File::create(&log_path).map_err(io(format!("create session log {}", log_path.display())))?;
        let log2 = log.try_clone().map_err(io("duplicate the log file handle".into()))?;

        // As root with PAM, the helper opens the PAM session and drops to the user itself.
        let pam = match (&ident.switch, &o.pam_helper, &o.pam_service) {
            (Some(_), Some(helper), Some(service)) => Some(super::pam::helper_argv(helper, service, user, &argv)),
            _ => None,
        };
        let exec = pam.as_ref().unwrap_or(&argv);
        let mut cmd = tokio::process::Command::new(&exec[0]);
        cmd.args(&exec[1..])
            .env_clear()
            .env("HOME", &ident.home)
            .env("USER", &ident.name)
            .env("LOGNAME", &ident.name)
            .env("SHELL", &ident.shell)
            .env("PATH", SESSION_PATH)
            .env("DISPLAY", format!(":{dpy}"))
            .env("VSM_SESSION_ID", &session_id.0)
            .env("VSM_SESSION_DIR", &session_dir)
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .kill_on_drop(false);
        let home_c = CString::new(ident.home.as_os_str().as_encoded_bytes()).unwrap_or_else(|_| CString::from(c"/"));
        let switch = if pam.is_some() { None } else { ident.switch };
        // SAFETY: the closure runs between fork and exec and only makes async-signal-safe
        // system calls on data prepared before the fork; it allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                nix::unistd::setsid()?;
                if let Some((uid, gid, groups)) = &switch {
                    nix::unistd::setgroups(groups)?;
                    nix::unistd::setgid(*gid)?;
                    nix::unistd::setuid(*uid)?;
                }
                // As the user, so a home the agent cannot enter (root-squashed NFS) still works;
                // a missing home leaves the session in "/".
                libc::chdir(home_c.as_ptr());
                Ok(())
            });
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                self.remove_session_dir(dpy);
                return Err(AgentdError::StartFailed(format!("cannot run {:?}: {e}", argv[0])));
            }
        };
        let Some(pid) = child.id() else {
            self.remove_session_dir(dpy);
            return Err(AgentdError::StartFailed("the session process vanished at once".into()));
        };
        let start_time = proc_stat(pid as i32).map(|s| s.start_time).unwrap_or(0);

        if let Ok(status) = tokio::time::timeout(o.start_check, child.wait()).await {
            let status = status.map(|s| match exit_code(s) {
                Some(c) => format!("exit status {c}"),
                None => "unknown status".into(),
            });
            let status = status.unwrap_or_else(|e| format!("unknown status ({e})"));
            let tail = log_tail(&log_path);
            self.remove_session_dir(dpy);
            return Err(AgentdError::StartFailed(format!(
                "{:?} exited at once with {status}; log {}: {}",
                argv[0],
                log_path.display(),
                if tail.is_empty() { "(empty)" } else { &tail }
            )));
        }

        let session = AgentSession {
            session_id: session_id.clone(),
            user: user.to_string(),
            display: dpy,
            vnc_port: if private { 0 } else { port },
            pid,
            command: argv,
            geometry: geometry.to_string(),
            started_ms: now_ms(),
            agent_address: String::new(),
            vnc_socket: if private { socket.display().to_string() } else { String::new() },
            viewers: 0,
            last_viewer_ms: 0,
            viewer_address: String::new(),
        };
        let (tx, rx) = watch::channel(None);
        let mgr = self.clone();
        let sid = session_id.clone();
        let task = tokio::spawn(async move {
            let code = child.wait().await.ok().and_then(exit_code);
            let _ = tx.send(Some(code));
            mgr.on_exit(sid, dpy, pid as i32, code).await;
        });
        self.table().insert(
            dpy,
            Slot::Running(Entry {
                session: session.clone(),
                viewers: ViewerTracker::default(),
                start_time,
                exited: rx,
                watcher: task.abort_handle(),
            }),
        );
        self.persist().await;
        tracing::info!(session_id = %session_id, user = user, display = dpy, pid, "session started");
        Ok(session)
    }

    /// A session's process ended: report it, then forget it.
    async fn on_exit(&self, session_id: SessionId, dpy: u32, pid: i32, code: Option<i32>) {
        if self.inner.closed.load(Ordering::SeqCst) {
            return;
        }
        tracing::info!(session_id = %session_id, display = dpy, pid, exit_status = ?code, "session ended");
        let report = AgentReport::SessionExited { session_id: session_id.clone(), display: dpy, exit_status: code };
        if self.inner.reports.send(report).await.is_err() {
            tracing::warn!(session_id = %session_id, "exit report dropped: the reporter is gone");
        }
        {
            let mut table = self.table();
            if matches!(table.get(&dpy), Some(Slot::Running(e)) if e.session.session_id == session_id && e.session.pid as i32 == pid)
            {
                table.remove(&dpy);
                // The display is free again: its private directory (and socket) goes too.
                drop(table);
                self.remove_session_dir(dpy);
            }
        }
        self.persist().await;
    }

    fn session_dir(&self, dpy: u32) -> PathBuf {
        self.inner.opts.vnc_socket_dir.join(dpy.to_string())
    }

    /// A fresh `<vnc_socket_dir>/<display>/`, mode `0700`, owned by `owner` (the session's
    /// user) when the agent switches users. The parent stays the agent's (`0755`), so a user
    /// can neither rename their directory nor reach another's.
    fn prepare_session_dir(&self, dpy: u32, owner: Option<(Uid, Gid)>) -> Result<PathBuf, AgentdError> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        let parent = &self.inner.opts.vnc_socket_dir;
        let io = |what: String| move |e| AgentdError::Io { what, source: e };
        std::fs::create_dir_all(parent).map_err(io(format!("create {}", parent.display())))?;
        std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o755))
            .map_err(io(format!("set the mode of {}", parent.display())))?;
        let dir = self.session_dir(dpy);
        // Whatever an earlier session on this display left is not trusted.
        self.remove_session_dir(dpy);
        std::fs::DirBuilder::new().mode(0o700).create(&dir).map_err(io(format!("create {}", dir.display())))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io(format!("set the mode of {}", dir.display())))?;
        if let Some((uid, gid)) = owner {
            nix::unistd::chown(&dir, Some(uid), Some(gid)).map_err(|e| AgentdError::Io {
                what: format!("give {} to the session's user", dir.display()),
                source: e.into(),
            })?;
        }
        Ok(dir)
    }

    fn remove_session_dir(&self, dpy: u32) {
        let dir = self.session_dir(dpy);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(path = %dir.display(), error = %e, "cannot remove a session directory"),
        }
    }

    /// Sample the viewers of every desktop once.
    pub fn sample_viewers(&self) {
        let tables = Tables::read(Path::new("/proc/net"));
        let now = now_ms();
        for slot in self.table().values_mut() {
            if let Slot::Running(e) = slot {
                let socket = (!e.session.vnc_socket.is_empty()).then(|| PathBuf::from(&e.session.vnc_socket));
                let conns = tables.connections(socket.as_deref(), e.session.vnc_port);
                if e.viewers.observe(&conns, now) {
                    let st = e.viewers.state();
                    tracing::info!(
                        session_id = %e.session.session_id, user = %e.session.user, display = e.session.display,
                        viewers = st.viewers, "viewers changed"
                    );
                }
            }
        }
    }

    /// Sample viewers every `viewer_poll` until the manager shuts down.
    fn start_viewer_sampler(&self) {
        let weak = Arc::downgrade(&self.inner);
        let every = self.inner.opts.viewer_poll;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(inner) = weak.upgrade() else { break };
                if inner.closed.load(Ordering::SeqCst) {
                    break;
                }
                SessionManager { inner }.sample_viewers();
            }
        });
    }

    async fn persist(&self) {
        let _guard = self.inner.persist_lock.lock().await;
        if self.inner.closed.load(Ordering::SeqCst) {
            return;
        }
        let list: Vec<Persisted> = self
            .table()
            .values()
            .filter_map(|s| match s {
                Slot::Running(e) => Some(Persisted { session: e.session.clone(), start_time: e.start_time }),
                Slot::Reserved(_) => None,
            })
            .collect();
        let path = self.state_file();
        if let Err(e) = write_json_atomic(&path, &list) {
            tracing::error!(path = %path.display(), error = %e, "cannot persist sessions; they will not be re-adopted after a restart");
        }
    }

    fn lookup(&self, session_id: &SessionId, dpy: u32) -> Option<(i32, watch::Receiver<ExitState>)> {
        match self.table().get(&dpy) {
            Some(Slot::Running(e)) if &e.session.session_id == session_id && e.exited.borrow().is_none() => {
                Some((e.session.pid as i32, e.exited.clone()))
            }
            _ => None,
        }
    }

    /// Is this session (id and display must both match) still running?
    pub fn verify(&self, session_id: &SessionId, dpy: u32) -> bool {
        self.lookup(session_id, dpy).is_some()
    }

    /// End a session: SIGTERM to its whole process tree, SIGKILL after the grace period.
    /// Returns whether it was running. The exit is reported like any other.
    pub async fn terminate(&self, session_id: &SessionId, dpy: u32) -> bool {
        let Some((pid, mut exited)) = self.lookup(session_id, dpy) else {
            return false;
        };
        tracing::info!(session_id = %session_id, display = dpy, pid, "terminating session");
        signal_session(pid, Signal::SIGTERM);
        let grace = self.inner.opts.terminate_grace;
        if tokio::time::timeout(grace, exited.wait_for(|s| s.is_some())).await.is_err() {
            tracing::warn!(session_id = %session_id, display = dpy, pid, "session ignored SIGTERM; sending SIGKILL");
            signal_session(pid, Signal::SIGKILL);
            let poll = self.inner.opts.adopted_poll;
            if tokio::time::timeout(grace + poll * 2, exited.wait_for(|s| s.is_some())).await.is_err() {
                tracing::error!(session_id = %session_id, display = dpy, pid, "session still there after SIGKILL");
            }
        } else {
            // The leader is gone; whatever it left behind in its session goes too.
            signal_session(pid, Signal::SIGKILL);
        }
        true
    }

    /// Every running session.
    pub fn list(&self) -> Vec<AgentSession> {
        self.table()
            .values()
            .filter_map(|s| match s {
                Slot::Running(e) if e.exited.borrow().is_none() => {
                    let mut s = e.session.clone();
                    let v = e.viewers.state();
                    s.viewers = v.viewers;
                    s.last_viewer_ms = v.last_attach_ms;
                    s.viewer_address = v.last_address.clone();
                    Some(s)
                }
                _ => None,
            })
            .collect()
    }

    /// Number of running sessions.
    pub fn count(&self) -> u32 {
        self.list().len() as u32
    }

    /// Detach from every session without ending it: watchers stop, the table stays as
    /// persisted, and the next [`SessionManager::open`] re-adopts the sessions. With
    /// `terminate_on_shutdown` the sessions are ended first instead.
    pub async fn shutdown(&self) {
        if self.inner.opts.terminate_on_shutdown {
            for s in self.list() {
                self.terminate(&s.session_id, s.display).await;
            }
        }
        self.persist().await;
        self.inner.closed.store(true, Ordering::SeqCst);
        for slot in self.table().values() {
            if let Slot::Running(e) = slot {
                e.watcher.abort();
            }
        }
        tracing::info!("detached from running sessions; they keep running");
    }
}

fn vnc_port(base: u16, display: u32) -> Option<u16> {
    u16::try_from(u32::from(base).checked_add(display)?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ph() -> Placeholders {
        Placeholders {
            display: 12,
            port: 5912,
            geometry: "800x600".into(),
            user: "alice".into(),
            socket: "/run/s/12/vnc.sock".into(),
        }
    }

    fn strs(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn placeholders_expand_inside_arguments() {
        let t = strs(&[
            "Xvnc",
            ":{display}",
            "-rfbport",
            "{port}",
            "-geometry",
            "{geometry}",
            "-desktop",
            "{user}@host:{display}",
            "{unknown}",
            "{",
            "a{b",
        ]);
        assert_eq!(
            expand_command(&t, &ph()),
            strs(&[
                "Xvnc",
                ":12",
                "-rfbport",
                "5912",
                "-geometry",
                "800x600",
                "-desktop",
                "alice@host:12",
                "{unknown}",
                "{",
                "a{b",
            ])
        );
    }

    #[test]
    fn values_are_not_expanded_twice_and_stay_one_argument() {
        let p = Placeholders { user: "{display} x; rm -rf /".into(), ..ph() };
        assert_eq!(expand_command(&strs(&["-u", "{user}"]), &p), strs(&["-u", "{display} x; rm -rf /"]));
    }

    #[test]
    fn geometry_and_user_validation() {
        assert!(valid_geometry("1024x768"));
        assert!(!valid_geometry("1024 768"));
        assert!(!valid_geometry("x768"));
        assert!(!valid_geometry("1024x768x1"));
        assert!(!valid_geometry("123456x1"));
        assert!(valid_user_name("alice"));
        assert!(valid_user_name("a.b-c_d@ex$"));
        assert!(!valid_user_name("../etc"));
        assert!(!valid_user_name("a/b"));
        assert!(!valid_user_name("-rf"));
        assert!(!valid_user_name(""));
    }

    #[test]
    fn stat_parses_names_with_parentheses_and_spaces() {
        let t = "1234 (my (odd) name) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 100 18446744073709551615";
        assert_eq!(parse_stat(t), Some(ProcStat { state: 'S', ppid: 1, session: 1234, start_time: 987654 }));
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (x) S 1"), None);
    }

    #[test]
    fn own_stat_is_readable() {
        let s = proc_stat(std::process::id() as i32).unwrap();
        assert!(s.start_time > 0);
        assert!(same_process_alive(std::process::id() as i32, s.start_time));
        assert!(!same_process_alive(std::process::id() as i32, s.start_time + 1));
    }

    #[test]
    fn lock_files_and_sockets_make_a_display_busy() {
        let dir = tempfile::tempdir().unwrap();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let busy_port = l.local_addr().unwrap().port();
        let free_port = {
            let t = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
            t.local_addr().unwrap().port()
        };
        assert!(display_is_free(dir.path(), 7, free_port));
        std::fs::write(dir.path().join(".X7-lock"), "  123\n").unwrap();
        assert!(!display_is_free(dir.path(), 7, free_port));
        std::fs::create_dir(dir.path().join(".X11-unix")).unwrap();
        std::fs::write(dir.path().join(".X11-unix/X8"), "").unwrap();
        assert!(!display_is_free(dir.path(), 8, free_port));
        assert!(!display_is_free(dir.path(), 9, busy_port));
    }

    #[test]
    fn vnc_port_overflow_is_none() {
        assert_eq!(vnc_port(5900, 10), Some(5910));
        assert_eq!(vnc_port(65000, 1000), None);
    }
}
