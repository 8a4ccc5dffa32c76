//! `vsmconnect`: the user's seat. Run on the user's own machine, it logs in to the master
//! with the user's own OpenSSH client, runs `vsmclient connect --json` there, forwards the
//! desktop over SSH and starts a TigerVNC viewer on the forwarded end.
//!
//! Owns: the command line, the argv of every program it runs (`ssh`, the viewer), reading
//! the master's answer, and the exit status of each class of failure ([`SeatError::exit_code`]).
//! Never: runs anything through a local shell, weakens SSH host-key checking, or handles a
//! secret (SSH does the authentication; the desktop is protected by the agent's socket
//! permissions, so nothing secret crosses this program).
//!
//! Invariants:
//! - every value from outside (the target, the master's answer) is checked before it becomes
//!   an argument: a user name or host that could be read as an option or holds shell
//!   metacharacters, an endpoint that is not the shape the agent hands out, is refused with
//!   one line saying what was wrong, before anything starts;
//! - the local end of the tunnel is a Unix socket in a fresh directory only the user can
//!   enter (or, on request, a loopback TCP port), removed on exit together with the tunnel.

use crate::proto::api::ConnectInfo;
use clap::Parser;
use serde::Serialize;
use std::ffi::OsString;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

/// One failure, one line, one exit status per class.
#[derive(Debug, thiserror::Error)]
pub enum SeatError {
    #[error("{0}")]
    Usage(String),
    #[error("ssh to {host} was refused: {detail}")]
    SshRefused { host: String, detail: String },
    #[error("the host key of {host} does not match the one you trust, or is unknown: {detail} (check with your administrator before changing ~/.ssh/known_hosts)")]
    HostKey { host: String, detail: String },
    #[error("cannot reach {host} with ssh: {detail}")]
    SshUnreachable { host: String, detail: String },
    #[error("no agent can take a session now: {0}")]
    NoAgent(String),
    #[error("session limit reached: {0}")]
    Limit(String),
    #[error("{0}")]
    ViewerMissing(String),
    #[error(
        "the local tunnel port {0} is busy: choose another with --local-port, or leave it out to use a private socket"
    )]
    PortBusy(u16),
    #[error("the master is not ready yet (it is catching up with its peer): {0}; try again in a moment")]
    NotReady(String),
    #[error("the SSH tunnel to the desktop failed: {0}")]
    Tunnel(String),
    #[error("the viewer failed: {0}")]
    Viewer(String),
    #[error("the master's answer is not what vsmconnect expects: {0}")]
    BadAnswer(String),
    #[error("the master refused: {0}")]
    Master(String),
}

impl SeatError {
    /// The exit status of each class (documented in `--help` and docs/connecting.md).
    pub fn exit_code(&self) -> u8 {
        match self {
            SeatError::Usage(_) => 2,
            SeatError::SshRefused { .. } => 3,
            SeatError::HostKey { .. } => 4,
            SeatError::SshUnreachable { .. } => 5,
            SeatError::NoAgent(_) => 6,
            SeatError::Limit(_) => 7,
            SeatError::ViewerMissing(_) => 8,
            SeatError::PortBusy(_) => 9,
            SeatError::NotReady(_) => 10,
            SeatError::Tunnel(_) => 11,
            SeatError::Viewer(_) => 12,
            SeatError::BadAnswer(_) => 13,
            SeatError::Master(_) => 14,
        }
    }

    fn class(&self) -> &'static str {
        match self {
            SeatError::Usage(_) => "usage",
            SeatError::SshRefused { .. } => "ssh_refused",
            SeatError::HostKey { .. } => "host_key",
            SeatError::SshUnreachable { .. } => "ssh_unreachable",
            SeatError::NoAgent(_) => "no_agent_available",
            SeatError::Limit(_) => "limit_reached",
            SeatError::ViewerMissing(_) => "viewer_missing",
            SeatError::PortBusy(_) => "tunnel_port_busy",
            SeatError::NotReady(_) => "master_not_ready",
            SeatError::Tunnel(_) => "tunnel_failed",
            SeatError::Viewer(_) => "viewer_failed",
            SeatError::BadAnswer(_) => "bad_answer",
            SeatError::Master(_) => "master_error",
        }
    }
}

#[derive(Parser, Debug, Clone)]
#[command(
    name = "vsmconnect",
    version,
    about = "Open your remote desktop from your own machine",
    long_about = "Logs in to the vsm master with your own OpenSSH client (your keys, agent and \
~/.ssh/config apply, host keys are checked as usual), gets your desktop session (reconnecting to the \
one you have), forwards it over SSH and opens it in a TigerVNC viewer. Closing the viewer leaves the \
session running; run vsmconnect again to get back to it, also after the master failed over.",
    after_help = concat!(
        "Examples:\n",
        "  vsmconnect tlha                        your desktop, as your local user name\n",
        "  vsmconnect alice@tlha                  as alice\n",
        "  vsmconnect --new alice@tlha            an additional session (if allowed)\n",
        "  vsmconnect --terminate-existing tlha   end your session and start a fresh one\n",
        "  vsmconnect --geometry 1280x800 tlha    size of a new session\n",
        "  vsmconnect --via-master tlha           reach the agent through the master (ssh -J)\n",
        "  vsmconnect --print --json tlha         only print the endpoint and the commands\n",
        "  vsmconnect --viewer /opt/tigervnc/bin/vncviewer tlha\n\n",
        "Exit status:\n",
        "  0   the viewer ran and was closed (with --print: the endpoint was printed)\n",
        "  2   bad command line          3  ssh refused the login      4  host key verification failed\n",
        "  5   ssh cannot reach the host 6  no agent available         7  per-user session limit\n",
        "  8   no VNC viewer found       9  tunnel port busy           10 master not ready yet\n",
        "  11  tunnel failed             12 viewer exited at once      13 unexpected answer\n",
        "  14  the master refused for another reason"
    )
)]
pub struct Args {
    /// The master (the resource address of an HA pair), optionally with a user name.
    #[arg(value_name = "[USER@]MASTER")]
    target: String,
    /// Ask for an additional session (within the per-user limit).
    #[arg(long)]
    new: bool,
    /// End your existing session(s) first, then start a new one.
    #[arg(long)]
    terminate_existing: bool,
    /// Size of a new session, WIDTHxHEIGHT [default: this screen's size].
    #[arg(long, value_name = "WxH")]
    geometry: Option<String>,
    /// The VNC viewer to run [default: vncviewer, else xtigervncviewer, on PATH].
    #[arg(long, value_name = "PROGRAM")]
    viewer: Option<PathBuf>,
    /// Reach the agent through the master (ssh -J) instead of directly.
    #[arg(long)]
    via_master: bool,
    /// Forward the desktop to this loopback TCP port instead of a private local socket.
    #[arg(long, value_name = "PORT")]
    local_port: Option<u16>,
    /// The ssh program [default: ssh].
    #[arg(long, value_name = "PROGRAM", default_value = "ssh")]
    ssh: PathBuf,
    /// An extra ssh option (as for ssh -o), for every ssh run; may be repeated.
    #[arg(short = 'o', long = "ssh-option", value_name = "OPTION")]
    ssh_options: Vec<String>,
    /// Only print the endpoint and the tunnel and viewer commands; start nothing locally.
    #[arg(long)]
    print: bool,
    /// Print JSON (the endpoint with --print; errors as {"error", "message", "exit_status"}).
    #[arg(long)]
    json: bool,
    /// Say what is run.
    #[arg(short, long)]
    verbose: bool,
    /// How long to wait for the tunnel, in seconds.
    #[arg(long, default_value_t = 30, value_name = "SECONDS")]
    tunnel_timeout: u64,
}

/// `[user@]host`, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub user: Option<String>,
    pub host: String,
}

/// A user name as vsm accepts it: letters, digits, `._-`, not starting with `.` or `-`.
fn valid_user(u: &str) -> bool {
    !u.is_empty()
        && u.len() <= 64
        && !u.starts_with(['.', '-'])
        && u.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// A host name or IP address: letters, digits, `.-:_`, not starting with `-`, or `[v6]`.
fn valid_host(h: &str) -> bool {
    let h = h.strip_prefix('[').and_then(|x| x.strip_suffix(']')).unwrap_or(h);
    !h.is_empty()
        && h.len() <= 253
        && !h.starts_with(['-', '.'])
        && h.bytes().all(|b| b.is_ascii_alphanumeric() || b".-:_".contains(&b))
}

pub fn parse_target(s: &str) -> Result<Target, SeatError> {
    let (user, host) = match s.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, s),
    };
    if let Some(u) = user {
        if !valid_user(u) {
            return Err(SeatError::Usage(format!(
                "user name {u:?} is not valid: expected letters, digits, '.', '_' or '-', not starting with '.' or '-'"
            )));
        }
    }
    if !valid_host(host) {
        return Err(SeatError::Usage(format!(
            "host {host:?} is not valid: expected a host name or IP address (letters, digits, '.', '-', ':')"
        )));
    }
    Ok(Target { user: user.map(str::to_string), host: host.to_string() })
}

fn valid_geometry(g: &str) -> bool {
    crate::agentd::sessions::valid_geometry(g)
}

fn valid_ssh_option(o: &str) -> bool {
    // `Key=value` or `Key value`; never something ssh would read as another flag.
    !o.is_empty() && !o.starts_with('-') && o.len() <= 1024 && !o.contains('\n')
}

/// Base argv of every ssh run: the user's own client and configuration, plus our options.
fn ssh_base(args: &Args) -> Vec<OsString> {
    let mut v: Vec<OsString> = vec![args.ssh.clone().into_os_string()];
    for o in &args.ssh_options {
        v.push("-o".into());
        v.push(o.into());
    }
    v
}

/// The remote command: fixed words and a checked geometry, so the master's login shell
/// has nothing to interpret.
pub fn remote_command(new: bool, terminate_existing: bool, geometry: Option<&str>) -> Vec<String> {
    let mut c = vec!["vsmclient".to_string(), "connect".to_string(), "--json".to_string()];
    if new {
        c.push("--new".into());
    }
    if terminate_existing {
        c.push("--terminate-existing".into());
    }
    if let Some(g) = geometry {
        c.push("--geometry".into());
        c.push(g.into());
    }
    c
}

/// `ssh [opts] -T [-l user] -- host vsmclient connect --json ...`
pub fn login_argv(args: &Args, target: &Target, geometry: Option<&str>) -> Vec<OsString> {
    let mut v = ssh_base(args);
    v.push("-T".into());
    if let Some(u) = &target.user {
        v.push("-l".into());
        v.push(u.into());
    }
    v.push("--".into());
    v.push(target.host.clone().into());
    v.extend(remote_command(args.new, args.terminate_existing, geometry).into_iter().map(OsString::from));
    v
}

/// Where the desktop is, checked against what an agent hands out.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum Remote {
    /// A private desktop's socket on the agent.
    Socket(String),
    /// A TCP port on the agent (desktops configured without a private socket).
    Port(u16),
}

/// Check the master's answer: the agent address must be a plain host, the socket the shape
/// the agent creates (`<dir>/<display>/vnc.sock`, absolute, no `..`), the port non-zero.
pub fn check_endpoint(info: &ConnectInfo) -> Result<Remote, SeatError> {
    if !valid_host(&info.agent_address) {
        return Err(SeatError::BadAnswer(format!(
            "agent address {:?} is not a host name or IP address",
            info.agent_address
        )));
    }
    match &info.vnc_socket {
        Some(path) => {
            let suffix = format!("/{}/vnc.sock", info.display);
            let ok = path.starts_with('/')
                && path.len() <= 100
                && path.ends_with(&suffix)
                && !path.split('/').any(|c| c == ".." || c == ".")
                && !path.contains("//")
                && path.bytes().all(|b| b.is_ascii_alphanumeric() || b"/._-".contains(&b));
            if !ok {
                return Err(SeatError::BadAnswer(format!(
                    "desktop socket {path:?} is not of the form /DIR/{}/vnc.sock that agents hand out",
                    info.display
                )));
            }
            Ok(Remote::Socket(path.clone()))
        }
        None if info.vnc_port > 0 => Ok(Remote::Port(info.vnc_port)),
        None => Err(SeatError::BadAnswer("the session has neither a desktop socket nor a VNC port".into())),
    }
}

/// Read `vsmclient connect --json` output (or its JSON error).
pub fn parse_answer(stdout: &str) -> Result<ConnectInfo, SeatError> {
    let text = stdout.trim();
    if text.len() > 64 * 1024 {
        return Err(SeatError::BadAnswer("the answer is larger than 64 KiB".into()));
    }
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| {
        SeatError::BadAnswer(format!("expected the JSON of `vsmclient connect --json`, got {:?} ({e})", short(text)))
    })?;
    if let Some(kind) = value.get("error").and_then(|k| k.as_str()) {
        let message = value.get("message").and_then(|m| m.as_str()).unwrap_or(kind).to_string();
        return Err(match kind {
            "limit_reached" => SeatError::Limit(message),
            "no_agent_available" => SeatError::NoAgent(message),
            k if k.contains("not_ready") => SeatError::NotReady(message),
            _ => SeatError::Master(message),
        });
    }
    serde_json::from_value(value)
        .map_err(|e| SeatError::BadAnswer(format!("the session description is incomplete: {e}")))
}

fn short(s: &str) -> String {
    let mut t: String = s.chars().take(120).collect();
    if s.chars().count() > 120 {
        t.push('…');
    }
    t
}

/// The last meaningful line of ssh's stderr.
fn last_line(stderr: &str) -> String {
    stderr.lines().map(str::trim).filter(|l| !l.is_empty()).last().map(short).unwrap_or_default()
}

/// What an ssh failure (exit status 255) means, from its stderr.
pub fn classify_ssh(host: &str, stderr: &str) -> SeatError {
    let host = host.to_string();
    let detail = last_line(stderr);
    if stderr.contains("REMOTE HOST IDENTIFICATION HAS CHANGED")
        || stderr.contains("Host key verification failed")
        || stderr.contains("No matching host key")
    {
        SeatError::HostKey { host, detail }
    } else if stderr.contains("Permission denied") || stderr.contains("Too many authentication failures") {
        SeatError::SshRefused { host, detail }
    } else if stderr.contains("bind") && stderr.contains("in use") {
        SeatError::Tunnel(detail)
    } else {
        SeatError::SshUnreachable { host, detail }
    }
}

/// The local screen size, from `xdpyinfo` when there is an X display.
fn local_screen_size() -> Option<String> {
    std::env::var_os("DISPLAY")?;
    let out = Command::new("xdpyinfo").stdin(Stdio::null()).stderr(Stdio::null()).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.trim_start().starts_with("dimensions:"))?;
    let g = line.split_whitespace().nth(1)?.to_string();
    valid_geometry(&g).then_some(g)
}

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata().map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

/// `--viewer`, else `vncviewer`, else `xtigervncviewer` on PATH.
pub fn find_viewer(flag: Option<&Path>) -> Result<PathBuf, SeatError> {
    match flag {
        Some(p) if p.components().count() > 1 => {
            if is_executable(p) {
                Ok(p.to_path_buf())
            } else {
                Err(SeatError::ViewerMissing(format!("the viewer {} is not an executable file", p.display())))
            }
        }
        Some(p) => on_path(&p.to_string_lossy()).ok_or_else(|| {
            SeatError::ViewerMissing(format!("the viewer {} is not on PATH", p.display()))
        }),
        None => on_path("vncviewer").or_else(|| on_path("xtigervncviewer")).ok_or_else(|| {
            SeatError::ViewerMissing(
                "no VNC viewer found: install TigerVNC's viewer (Debian/Ubuntu: tigervnc-viewer) or name one with --viewer"
                    .into(),
            )
        }),
    }
}

/// The local end of the tunnel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum Local {
    Socket(PathBuf),
    Port(u16),
}

impl Local {
    fn forward_spec(&self) -> String {
        match self {
            Local::Socket(p) => p.display().to_string(),
            Local::Port(port) => format!("127.0.0.1:{port}"),
        }
    }

    /// The viewer's argument: a socket path, or `host::port` (TigerVNC's form of a port).
    pub fn viewer_target(&self) -> String {
        match self {
            Local::Socket(p) => p.display().to_string(),
            Local::Port(port) => format!("127.0.0.1::{port}"),
        }
    }
}

/// `ssh [opts] -N -T -o ExitOnForwardFailure=yes -L LOCAL:REMOTE [-J master] [-l user] -- agent`
pub fn tunnel_argv(args: &Args, target: &Target, agent: &str, remote: &Remote, local: &Local) -> Vec<OsString> {
    let mut v = ssh_base(args);
    for o in ["ExitOnForwardFailure=yes", "StreamLocalBindUnlink=yes", "StreamLocalBindMask=0177"] {
        v.push("-o".into());
        v.push(o.into());
    }
    v.push("-N".into());
    v.push("-T".into());
    let remote_spec = match remote {
        Remote::Socket(p) => p.clone(),
        Remote::Port(port) => format!("localhost:{port}"),
    };
    v.push("-L".into());
    v.push(format!("{}:{remote_spec}", local.forward_spec()).into());
    if args.via_master {
        v.push("-J".into());
        v.push(
            match &target.user {
                Some(u) => format!("{u}@{}", target.host),
                None => target.host.clone(),
            }
            .into(),
        );
    }
    if let Some(u) = &target.user {
        v.push("-l".into());
        v.push(u.into());
    }
    v.push("--".into());
    v.push(agent.into());
    v
}

fn show(argv: &[OsString]) -> String {
    argv.iter().map(|a| a.to_string_lossy().into_owned()).collect::<Vec<_>>().join(" ")
}

/// What `--print --json` prints.
#[derive(Serialize)]
struct Printed<'a> {
    session: &'a ConnectInfo,
    remote: &'a Remote,
    local: &'a Local,
    tunnel: Vec<String>,
    viewer: Vec<String>,
}

/// A fresh directory only this user can enter, for the local socket; removed on drop.
fn private_dir() -> Result<tempfile::TempDir, SeatError> {
    let base = std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from).filter(|p| p.is_dir());
    let mut b = tempfile::Builder::new();
    b.prefix("vsmconnect-");
    let dir = match base {
        Some(d) => b.tempdir_in(d),
        None => b.tempdir(),
    }
    .map_err(|e| SeatError::Tunnel(format!("cannot create a private directory for the local socket: {e}")))?;
    // tempfile creates it 0700 whatever the umask; say so explicitly all the same.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))
        .map_err(|e| SeatError::Tunnel(format!("cannot protect {}: {e}", dir.path().display())))?;
    Ok(dir)
}

/// Ends a child we started (TERM, then KILL) when dropped.
struct Guard(Option<Child>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(2);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn read_all(r: Option<impl Read>) -> String {
    let mut s = String::new();
    if let Some(r) = r {
        let _ = r.take(256 * 1024).read_to_string(&mut s);
    }
    s
}

/// Set by SIGTERM, SIGINT or SIGHUP: stop the viewer and the tunnel, then exit.
static STOP: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

extern "C" fn on_stop_signal(sig: std::ffi::c_int) {
    STOP.store(sig, std::sync::atomic::Ordering::SeqCst);
}

fn stop_requested() -> Option<i32> {
    match STOP.load(std::sync::atomic::Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// Is the tunnel's local end accepting?
fn local_ready(local: &Local) -> bool {
    match local {
        Local::Socket(p) => std::os::unix::net::UnixStream::connect(p).is_ok(),
        Local::Port(port) => std::net::TcpStream::connect(("127.0.0.1", *port)).is_ok(),
    }
}

fn run(args: &Args) -> Result<(), SeatError> {
    let target = parse_target(&args.target)?;
    if let Some(bad) = args.ssh_options.iter().find(|o| !valid_ssh_option(o)) {
        return Err(SeatError::Usage(format!("ssh option {bad:?} is not of the form Key=value")));
    }
    if let Some(g) = &args.geometry {
        if !valid_geometry(g) {
            return Err(SeatError::Usage(format!("geometry {g:?} is not WIDTHxHEIGHT, e.g. 1280x800")));
        }
    }
    if args.local_port == Some(0) {
        return Err(SeatError::Usage("--local-port must be 1 to 65535".into()));
    }
    // Before anything happens on the master: a missing viewer is found out first.
    let viewer = if args.print { None } else { Some(find_viewer(args.viewer.as_deref())?) };
    if let Some(port) = args.local_port {
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
            return Err(SeatError::PortBusy(port));
        }
    }
    let geometry = args.geometry.clone().or_else(local_screen_size);

    // 1. Log in and get the session.
    let login = login_argv(args, &target, geometry.as_deref());
    if args.verbose {
        crate::errln!("vsmconnect: running {}", show(&login));
    }
    let out = Command::new(&login[0])
        .args(&login[1..])
        .stdin(Stdio::inherit())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| SeatError::SshUnreachable {
            host: target.host.clone(),
            detail: format!("cannot run {}: {e}", args.ssh.display()),
        })?
        .wait_with_output()
        .map_err(|e| SeatError::SshUnreachable { host: target.host.clone(), detail: e.to_string() })?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if args.verbose && !stderr.trim().is_empty() {
        crate::errln!("vsmconnect: ssh said: {}", stderr.trim());
    }
    let info = match out.status.code() {
        Some(255) => return Err(classify_ssh(&target.host, &stderr)),
        Some(127) => {
            return Err(SeatError::Master(format!(
                "vsmclient is not installed on {} ({})",
                target.host,
                last_line(&stderr)
            )))
        }
        Some(0) | Some(1) => parse_answer(&stdout)?,
        _ if stdout.trim().starts_with('{') => parse_answer(&stdout)?,
        code => {
            return Err(SeatError::Master(format!(
                "vsmclient on {} failed ({}): {}",
                target.host,
                code.map(|c| format!("exit status {c}")).unwrap_or_else(|| "killed".into()),
                last_line(&stderr)
            )))
        }
    };
    let remote = check_endpoint(&info)?;
    if args.verbose || !args.json {
        crate::errln!(
            "vsmconnect: {} session {} on {} (display :{})",
            if info.reconnected { "reconnecting to" } else { "created" },
            info.session_id,
            info.agent_address,
            info.display
        );
    }

    // 2. The tunnel.
    let dir = match args.local_port {
        Some(_) => None,
        None => Some(private_dir()?),
    };
    let local = match (args.local_port, &dir) {
        (Some(port), _) => Local::Port(port),
        (None, Some(d)) => Local::Socket(d.path().join("vnc.sock")),
        (None, None) => unreachable!("a private directory exists when no port is given"),
    };
    let tunnel = tunnel_argv(args, &target, &info.agent_address, &remote, &local);
    let viewer_name = viewer.clone().unwrap_or_else(|| PathBuf::from("vncviewer"));
    let viewer_argv: Vec<OsString> = vec![viewer_name.into_os_string(), local.viewer_target().into()];
    if args.print {
        if args.json {
            let p = Printed {
                session: &info,
                remote: &remote,
                local: &local,
                tunnel: tunnel.iter().map(|a| a.to_string_lossy().into_owned()).collect(),
                viewer: viewer_argv.iter().map(|a| a.to_string_lossy().into_owned()).collect(),
            };
            crate::outln!("{}", serde_json::to_string_pretty(&p).unwrap_or_default());
        } else {
            crate::outln!("session:  {} (display :{}) on {}", info.session_id, info.display, info.agent_address);
            match &remote {
                Remote::Socket(p) => crate::outln!("desktop:  {}:{p}", info.agent_address),
                Remote::Port(port) => crate::outln!("desktop:  {}:{port}", info.agent_address),
            }
            crate::outln!("tunnel:   {}", show(&tunnel));
            crate::outln!("viewer:   {}", show(&viewer_argv));
        }
        // Nothing was started: the private directory goes with `dir`.
        return Ok(());
    }
    if args.verbose {
        crate::errln!("vsmconnect: running {}", show(&tunnel));
    }
    let child = Command::new(&tunnel[0])
        .args(&tunnel[1..])
        .stdin(Stdio::inherit())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| SeatError::Tunnel(format!("cannot run {}: {e}", args.ssh.display())))?;
    let mut tunnel_guard = Guard(Some(child));
    let deadline = Instant::now() + Duration::from_secs(args.tunnel_timeout.max(1));
    loop {
        let c = tunnel_guard.0.as_mut().expect("the tunnel child is held until the end");
        if let Ok(Some(status)) = c.try_wait() {
            let stderr = read_all(c.stderr.take());
            tunnel_guard.0 = None;
            if stderr.contains("in use") {
                if let Local::Port(p) = local {
                    return Err(SeatError::PortBusy(p));
                }
            }
            return Err(match status.code() {
                Some(255) if !stderr.contains("forward") => classify_ssh(&info.agent_address, &stderr),
                _ => {
                    SeatError::Tunnel(format!("ssh to {} ended ({status}): {}", info.agent_address, last_line(&stderr)))
                }
            });
        }
        if local_ready(&local) {
            break;
        }
        if let Some(sig) = stop_requested() {
            return Err(SeatError::Tunnel(format!("stopped by signal {sig} before the tunnel was up")));
        }
        if Instant::now() > deadline {
            return Err(SeatError::Tunnel(format!(
                "the forwarded desktop did not answer within {} s",
                args.tunnel_timeout
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    // 3. The viewer, until it is closed.
    if args.verbose {
        crate::errln!("vsmconnect: running {}", show(&viewer_argv));
    }
    let started = Instant::now();
    let v = Command::new(&viewer_argv[0])
        .args(&viewer_argv[1..])
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| SeatError::Viewer(format!("cannot run {}: {e}", viewer_argv[0].to_string_lossy())))?;
    let mut viewer_guard = Guard(Some(v));
    let status = loop {
        let v = viewer_guard.0.as_mut().expect("the viewer child is held until it ends");
        match v.try_wait() {
            Ok(Some(status)) => {
                viewer_guard.0 = None;
                break status;
            }
            Ok(None) => {}
            Err(e) => return Err(SeatError::Viewer(e.to_string())),
        }
        if stop_requested().is_some() {
            // The guards end the viewer and the tunnel; the session keeps running.
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    if !status.success() && started.elapsed() < Duration::from_secs(3) {
        return Err(SeatError::Viewer(format!(
            "{} exited at once ({status}); the session keeps running",
            viewer_argv[0].to_string_lossy()
        )));
    }
    drop(tunnel_guard);
    drop(dir);
    Ok(())
}

pub fn main() -> ExitCode {
    let args = Args::parse();
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: the handler only stores into an atomic.
        unsafe { libc::signal(sig, on_stop_signal as *const () as libc::sighandler_t) };
    }
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if args.json {
                crate::outln!(
                    "{}",
                    serde_json::json!({ "error": e.class(), "message": e.to_string(), "exit_status": e.exit_code() })
                );
            }
            crate::errln!("vsmconnect: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Args {
        let mut v = vec!["vsmconnect"];
        v.extend_from_slice(extra);
        Args::try_parse_from(v).unwrap()
    }

    fn strs(v: &[OsString]) -> Vec<String> {
        v.iter().map(|a| a.to_string_lossy().into_owned()).collect()
    }

    fn info(socket: Option<&str>, port: u16) -> ConnectInfo {
        ConnectInfo {
            session_id: crate::model::SessionId("abc".into()),
            user: "alice".into(),
            agent: "agent1".into(),
            agent_address: "10.0.0.11".into(),
            display: 10,
            vnc_port: port,
            vnc_socket: socket.map(str::to_string),
            reconnected: true,
        }
    }

    #[test]
    fn targets_are_checked() {
        assert_eq!(parse_target("tlha").unwrap(), Target { user: None, host: "tlha".into() });
        assert_eq!(parse_target("alice@tlha").unwrap(), Target { user: Some("alice".into()), host: "tlha".into() });
        assert!(parse_target("alice@10.0.0.4").is_ok());
        assert!(parse_target("[fe80::1]").is_ok());
        for bad in ["", "a;b@tlha", "$(id)@tlha", "alice@-oProxyCommand=x", "-l@tlha", "alice@tl ha", "a`b`@h", "@tlha"]
        {
            let e = parse_target(bad).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{bad}: {e}");
        }
    }

    #[test]
    fn the_login_is_plain_argv_with_fixed_words() {
        let a = args(&["--new", "alice@tlha"]);
        let t = parse_target(&a.target).unwrap();
        assert_eq!(
            strs(&login_argv(&a, &t, Some("800x600"))),
            [
                "ssh",
                "-T",
                "-l",
                "alice",
                "--",
                "tlha",
                "vsmclient",
                "connect",
                "--json",
                "--new",
                "--geometry",
                "800x600"
            ]
        );
        let a = args(&["-o", "ConnectTimeout=3", "--terminate-existing", "tlha"]);
        let t = parse_target(&a.target).unwrap();
        assert_eq!(
            strs(&login_argv(&a, &t, None)),
            [
                "ssh",
                "-o",
                "ConnectTimeout=3",
                "-T",
                "--",
                "tlha",
                "vsmclient",
                "connect",
                "--json",
                "--terminate-existing"
            ]
        );
    }

    #[test]
    fn tunnels_forward_to_the_agent_directly_or_through_the_master() {
        let a = args(&["alice@tlha"]);
        let t = parse_target(&a.target).unwrap();
        let remote = Remote::Socket("/run/vsmagent/sessions/10/vnc.sock".into());
        let local = Local::Socket(PathBuf::from("/run/user/1000/vsmconnect-x/vnc.sock"));
        let v = strs(&tunnel_argv(&a, &t, "agent1", &remote, &local));
        assert!(v.contains(&"ExitOnForwardFailure=yes".to_string()));
        assert!(
            v.windows(2)
                .any(|w| w[0] == "-L"
                    && w[1] == "/run/user/1000/vsmconnect-x/vnc.sock:/run/vsmagent/sessions/10/vnc.sock")
        );
        assert_eq!(&v[v.len() - 4..], ["-l", "alice", "--", "agent1"]);
        assert!(!v.contains(&"-J".to_string()));
        assert!(!v.iter().any(|x| x.contains("StrictHostKeyChecking")));

        let a = args(&["--via-master", "--local-port", "15910", "alice@tlha"]);
        let v = strs(&tunnel_argv(&a, &t, "10.0.0.11", &Remote::Port(5910), &Local::Port(15910)));
        assert!(v.windows(2).any(|w| w[0] == "-L" && w[1] == "127.0.0.1:15910:localhost:5910"));
        assert!(v.windows(2).any(|w| w[0] == "-J" && w[1] == "alice@tlha"));
        assert_eq!(Local::Port(15910).viewer_target(), "127.0.0.1::15910");
    }

    #[test]
    fn answers_are_parsed_and_errors_classified() {
        let ok = serde_json::to_string(&info(Some("/run/vsmagent/sessions/10/vnc.sock"), 0)).unwrap();
        assert_eq!(parse_answer(&ok).unwrap().display, 10);
        let e = |s: &str| parse_answer(s).unwrap_err().exit_code();
        assert_eq!(e(r#"{"error":"limit_reached","message":"you already have 1 session(s)"}"#), 7);
        assert_eq!(e(r#"{"error":"no_agent_available","message":"none"}"#), 6);
        assert_eq!(e(r#"{"error":"not_ready","message":"resync in progress"}"#), 10);
        assert_eq!(e(r#"{"error":"master_not_ready","message":"x"}"#), 10);
        assert_eq!(e(r#"{"error":"not_allowed","message":"x"}"#), 14);
        assert_eq!(e("Welcome to tlha!\n{"), 13);
        assert_eq!(e(""), 13);
        assert_eq!(e(r#"{"session_id":"x"}"#), 13);
    }

    #[test]
    fn endpoints_outside_what_agents_hand_out_are_refused() {
        assert_eq!(
            check_endpoint(&info(Some("/run/vsmagent/sessions/10/vnc.sock"), 0)).unwrap(),
            Remote::Socket("/run/vsmagent/sessions/10/vnc.sock".into())
        );
        assert_eq!(check_endpoint(&info(None, 5910)).unwrap(), Remote::Port(5910));
        for bad in [
            "/run/vsmagent/sessions/11/vnc.sock",
            "run/vsmagent/sessions/10/vnc.sock",
            "/run/../etc/10/vnc.sock",
            "/tmp/x;rm -rf ~/10/vnc.sock",
            "/home/bob/.ssh/agent",
            "/a//10/vnc.sock",
        ] {
            assert_eq!(check_endpoint(&info(Some(bad), 0)).unwrap_err().exit_code(), 13, "{bad}");
        }
        assert_eq!(check_endpoint(&info(None, 0)).unwrap_err().exit_code(), 13);
        let mut i = info(None, 5910);
        i.agent_address = "-oProxyCommand=touch /tmp/x".into();
        assert_eq!(check_endpoint(&i).unwrap_err().exit_code(), 13);
    }

    #[test]
    fn ssh_failures_are_classified() {
        let c = |s: &str| classify_ssh("tlha", s).exit_code();
        assert_eq!(c("user@tlha: Permission denied (publickey).\n"), 3);
        assert_eq!(c("@@@@\n@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @\n...\nHost key verification failed.\n"), 4);
        assert_eq!(c("Host key verification failed.\n"), 4);
        assert_eq!(c("ssh: connect to host tlha port 22: Connection refused\n"), 5);
        assert_eq!(c("ssh: Could not resolve hostname tlha: Name or service not known\n"), 5);
    }

    #[test]
    fn viewers_are_found_or_reported_missing() {
        assert_eq!(find_viewer(Some(Path::new("/nonexistent/vncviewer"))).unwrap_err().exit_code(), 8);
        assert_eq!(find_viewer(Some(Path::new("no-such-viewer-here"))).unwrap_err().exit_code(), 8);
        assert_eq!(find_viewer(Some(Path::new("/bin/sh"))).unwrap(), PathBuf::from("/bin/sh"));
    }

    #[test]
    fn exit_statuses_are_distinct() {
        let all = [
            SeatError::Usage(String::new()),
            SeatError::SshRefused { host: String::new(), detail: String::new() },
            SeatError::HostKey { host: String::new(), detail: String::new() },
            SeatError::SshUnreachable { host: String::new(), detail: String::new() },
            SeatError::NoAgent(String::new()),
            SeatError::Limit(String::new()),
            SeatError::ViewerMissing(String::new()),
            SeatError::PortBusy(1),
            SeatError::NotReady(String::new()),
            SeatError::Tunnel(String::new()),
            SeatError::Viewer(String::new()),
            SeatError::BadAnswer(String::new()),
            SeatError::Master(String::new()),
        ];
        let codes: std::collections::BTreeSet<u8> = all.iter().map(|e| e.exit_code()).collect();
        assert_eq!(codes.len(), all.len());
        assert!(!codes.contains(&0) && !codes.contains(&1));
    }
}
