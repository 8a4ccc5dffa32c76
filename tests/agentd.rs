//! Process-level tests of the agent daemon: real session processes, real signals, real
//! `/proc`, persisted state across a simulated agent restart.

use std::path::Path;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use vsm::agentd::sessions::{SessionManager, SessionOptions};
use vsm::agentd::{Agent, AgentdError};
use vsm::model::SessionId;
use vsm::proto::agent::{AgentErrorKind, AgentReply, AgentReport, AgentRequest};

struct TestAgent {
    _dir: tempfile::TempDir,
    opts: SessionOptions,
}

/// The first of four consecutive ports (displays 100 to 103) that are all free now, below
/// the kernel's ephemeral range so that other tests' connections do not take them while
/// this one runs. Each call searches from a run of its own, so that tests running at the
/// same time do not share ports.
fn free_port_run() -> u16 {
    static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    let first = 20_000 + (std::process::id() % 100) as u16 * 40;
    (0..1_500)
        .map(|_| first + NEXT.fetch_add(4, std::sync::atomic::Ordering::Relaxed) % 6_000)
        .find(|&p| (p..p + 4).all(|q| std::net::TcpListener::bind(("0.0.0.0", q)).is_ok()))
        .expect("four consecutive free ports between 20000 and 30000")
}

impl TestAgent {
    /// Four displays starting at 100, on VNC ports that were free a moment ago.
    fn new(command: &[&str]) -> TestAgent {
        let dir = tempfile::tempdir().unwrap();
        let x_dir = dir.path().join("x");
        std::fs::create_dir_all(x_dir.join(".X11-unix")).unwrap();
        let base = free_port_run() - 100;
        let opts = SessionOptions {
            display_min: 100,
            display_max: 103,
            vnc_port_base: base,
            session_command: command.iter().map(|s| s.to_string()).collect(),
            default_geometry: "1024x768".into(),
            state_dir: dir.path().join("state"),
            vnc_socket_dir: dir.path().join("run"),
            viewer_poll: Duration::from_millis(50),
            pam_service: None,
            pam_helper: None,
            x_dir,
            start_check: Duration::from_millis(100),
            terminate_grace: Duration::from_secs(3),
            adopted_poll: Duration::from_millis(50),
            terminate_on_shutdown: false,
            run_as_self: false,
        };
        TestAgent { _dir: dir, opts }
    }

    async fn open(&self) -> (SessionManager, mpsc::Receiver<AgentReport>) {
        let (tx, rx) = mpsc::channel(16);
        (SessionManager::open(self.opts.clone(), tx).await.unwrap(), rx)
    }
}

/// Nothing a test started may outlive it, even when an assertion failed half-way: every
/// session still in the state file is killed with its process group.
impl Drop for TestAgent {
    fn drop(&mut self) {
        let Ok(bytes) = std::fs::read(self.opts.state_dir.join("sessions.json")) else {
            return;
        };
        let Ok(list) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
            return;
        };
        for p in list.as_array().into_iter().flatten() {
            if let Some(pid) = p["session"]["pid"].as_i64() {
                let pid = nix::unistd::Pid::from_raw(pid as i32);
                let _ = nix::sys::signal::killpg(pid, nix::sys::signal::SIGKILL);
            }
        }
    }
}

fn sid(s: &str) -> SessionId {
    SessionId(s.to_string())
}

fn me() -> String {
    nix::unistd::User::from_uid(nix::unistd::geteuid()).unwrap().unwrap().name
}

async fn wait_until(what: &str, f: impl FnMut() -> bool) {
    assert!(vsm::testkit::wait_for(Duration::from_secs(15), f).await, "timed out waiting for {what}");
}

async fn next_report(rx: &mut mpsc::Receiver<AgentReport>) -> AgentReport {
    tokio::time::timeout(Duration::from_secs(15), rx.recv())
        .await
        .expect("an exit report within the deadline")
        .expect("report channel open")
}

fn status_field(pid: u32, field: &str) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines().find_map(|l| l.strip_prefix(field)).map(|v| v.trim().to_string())
}

/// Gone, or a zombie nobody reaped yet (the latter only for processes that are not ours).
fn gone(pid: u32) -> bool {
    match status_field(pid, "State:") {
        None => true,
        Some(s) => s.starts_with('Z'),
    }
}

fn environ(pid: u32) -> Vec<String> {
    let raw = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let mut v: Vec<String> =
        raw.split(|b| *b == 0).filter(|s| !s.is_empty()).map(|s| String::from_utf8_lossy(s).into_owned()).collect();
    v.sort();
    v
}

fn persisted_pids(state_dir: &Path) -> Vec<u32> {
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state_dir.join("sessions.json")).unwrap()).unwrap();
    v.as_array().unwrap().iter().map(|p| p["session"]["pid"].as_u64().unwrap() as u32).collect()
}

#[tokio::test]
async fn session_is_our_child_with_a_clean_environment_and_dies_on_terminate() {
    let t = TestAgent::new(&["sleep", "600"]);
    let (mgr, mut rx) = t.open().await;
    let s = mgr.start(sid("s1"), &me(), Some("800x600".into())).await.unwrap();
    assert_eq!(s.display, 100);
    assert_eq!(s.vnc_port, t.opts.vnc_port_base + 100);
    assert_eq!(s.command, vec!["sleep".to_string(), "600".to_string()]);
    assert_eq!(status_field(s.pid, "PPid:"), Some(std::process::id().to_string()));
    // Its own Unix session, so terminate reaches the whole tree.
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", s.pid)).unwrap();
    let sess = vsm::agentd::sessions::parse_stat(&stat).unwrap().session;
    assert_eq!(sess as u32, s.pid);
    let keys: Vec<String> = environ(s.pid).iter().map(|kv| kv.split('=').next().unwrap().to_string()).collect();
    assert_eq!(keys, ["DISPLAY", "HOME", "LOGNAME", "PATH", "SHELL", "USER", "VSM_SESSION_DIR", "VSM_SESSION_ID"]);
    // The session's private directory: fresh, 0700, the user's.
    let dir = t.opts.vnc_socket_dir.join("100");
    assert!(environ(s.pid).contains(&format!("VSM_SESSION_DIR={}", dir.display())));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
    assert!(environ(s.pid).contains(&"DISPLAY=:100".to_string()));
    assert!(environ(s.pid).contains(&"VSM_SESSION_ID=s1".to_string()));
    assert_eq!(persisted_pids(&t.opts.state_dir), vec![s.pid]);

    assert!(mgr.verify(&sid("s1"), 100));
    assert!(!mgr.verify(&sid("s1"), 101), "display must match too");
    assert!(!mgr.verify(&sid("other"), 100));
    assert_eq!(mgr.list(), vec![s.clone()]);

    assert!(mgr.terminate(&sid("s1"), 100).await);
    assert!(gone(s.pid));
    assert!(!mgr.verify(&sid("s1"), 100));
    assert!(mgr.list().is_empty());
    assert_eq!(
        next_report(&mut rx).await,
        AgentReport::SessionExited { session_id: sid("s1"), display: 100, exit_status: Some(143) }
    );
    assert!(!mgr.terminate(&sid("s1"), 100).await, "a second terminate finds nothing");
    let state = t.opts.state_dir.clone();
    wait_until("the session to leave sessions.json", || persisted_pids(&state).is_empty()).await;
}

#[tokio::test]
async fn display_allocation_skips_lock_files_sockets_busy_ports_and_own_sessions() {
    let t = TestAgent::new(&["sleep", "600"]);
    std::fs::write(t.opts.x_dir.join(".X100-lock"), "  4242\n").unwrap();
    std::fs::write(t.opts.x_dir.join(".X11-unix/X101"), "").unwrap();
    let _busy = std::net::TcpListener::bind(("127.0.0.1", t.opts.vnc_port_base + 102)).unwrap();
    let (mgr, _rx) = t.open().await;
    let a = mgr.start(sid("a"), &me(), None).await.unwrap();
    assert_eq!((a.display, a.geometry.as_str()), (103, "1024x768"));
    let err = mgr.start(sid("b"), &me(), None).await.unwrap_err();
    assert!(matches!(err, AgentdError::NoFreeDisplay { min: 100, max: 103 }), "{err}");
    assert_eq!(err.kind(), AgentErrorKind::NoFreeDisplay);
    // Asking again for a running session id returns it instead of starting another.
    assert_eq!(mgr.start(sid("a"), &me(), None).await.unwrap(), a);
    std::fs::remove_file(t.opts.x_dir.join(".X100-lock")).unwrap();
    let b = mgr.start(sid("b"), &me(), None).await.unwrap();
    assert_eq!(b.display, 100);
    assert!(mgr.terminate(&sid("a"), 103).await);
    assert!(mgr.terminate(&sid("b"), 100).await);
}

#[tokio::test]
async fn a_command_that_exits_at_once_is_start_failed_with_its_log() {
    let mut t = TestAgent::new(&["ls", "/nonexistent-vsm-{user}"]);
    t.opts.start_check = Duration::from_secs(30);
    let (mgr, _rx) = t.open().await;
    let err = mgr.start(sid("x"), &me(), None).await.unwrap_err();
    assert_eq!(err.kind(), AgentErrorKind::StartFailed);
    let msg = err.to_string();
    assert!(msg.contains("exit status 2"), "{msg}");
    assert!(msg.contains(&format!("nonexistent-vsm-{}", me())), "the log tail is quoted: {msg}");
    assert!(mgr.list().is_empty());
    // The display was released: the same failure happens on the same display again.
    let again = mgr.start(sid("y"), &me(), None).await.unwrap_err().to_string();
    assert!(again.contains("100.log"), "{again}");
}

#[tokio::test]
async fn a_missing_program_is_start_failed() {
    let t = TestAgent::new(&["/nonexistent/vsm-session"]);
    let (mgr, _rx) = t.open().await;
    let err = mgr.start(sid("x"), &me(), None).await.unwrap_err();
    assert_eq!(err.kind(), AgentErrorKind::StartFailed);
    assert!(err.to_string().contains("cannot run"), "{err}");
}

#[tokio::test]
async fn bad_requests_are_refused_before_anything_runs() {
    let t = TestAgent::new(&["sleep", "600"]);
    let (mgr, _rx) = t.open().await;
    for (id, user, geom) in
        [("ok", "../etc", None), ("ok", "alice", Some("1024 768")), ("bad id/with slash", "alice", None)]
    {
        let e = mgr.start(sid(id), user, geom.map(String::from)).await.unwrap_err();
        assert_eq!(e.kind(), AgentErrorKind::BadRequest, "{e}");
    }
    assert!(mgr.list().is_empty());
}

#[tokio::test]
async fn an_exit_by_itself_is_reported_and_forgotten() {
    let t = TestAgent::new(&["sleep", "600"]);
    let (mgr, mut rx) = t.open().await;
    let s = mgr.start(sid("s1"), &me(), None).await.unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(s.pid as i32), nix::sys::signal::SIGKILL).unwrap();
    assert_eq!(
        next_report(&mut rx).await,
        AgentReport::SessionExited { session_id: sid("s1"), display: 100, exit_status: Some(137) }
    );
    let m = mgr.clone();
    wait_until("the session to leave the table", || m.list().is_empty()).await;
    assert!(!mgr.verify(&sid("s1"), 100));
    let state = t.opts.state_dir.clone();
    wait_until("the session to leave sessions.json", || persisted_pids(&state).is_empty()).await;
}

#[tokio::test]
async fn a_session_ignoring_sigterm_is_killed_after_the_grace() {
    let mut t = TestAgent::new(&["sh", "-c", "trap '' TERM; sleep 600"]);
    t.opts.terminate_grace = Duration::from_millis(200);
    let (mgr, mut rx) = t.open().await;
    let s = mgr.start(sid("stubborn"), &me(), None).await.unwrap();
    assert!(mgr.terminate(&sid("stubborn"), s.display).await);
    assert!(gone(s.pid));
    assert_eq!(
        next_report(&mut rx).await,
        AgentReport::SessionExited { session_id: sid("stubborn"), display: s.display, exit_status: Some(137) }
    );
}

#[tokio::test]
async fn sessions_survive_an_agent_restart_and_are_re_adopted() {
    let t = TestAgent::new(&["sleep", "600"]);
    let (first, _rx1) = t.open().await;
    let s = first.start(sid("keep"), &me(), None).await.unwrap();
    first.shutdown().await;
    assert!(!gone(s.pid), "stopping the agent must not end the session");

    let (second, mut rx2) = t.open().await;
    assert_eq!(second.list(), vec![s.clone()]);
    assert!(second.verify(&sid("keep"), s.display));
    // The display stays taken by the re-adopted session.
    let other = second.start(sid("new"), &me(), None).await.unwrap();
    assert_ne!(other.display, s.display);

    assert!(second.terminate(&sid("keep"), s.display).await);
    assert!(gone(s.pid));
    assert_eq!(
        next_report(&mut rx2).await,
        AgentReport::SessionExited { session_id: sid("keep"), display: s.display, exit_status: None }
    );
    assert!(second.terminate(&sid("new"), other.display).await);
}

#[tokio::test]
async fn a_session_that_ended_while_the_agent_was_down_is_reported_at_start() {
    let t = TestAgent::new(&["sleep", "600"]);
    let (first, _rx1) = t.open().await;
    let s = first.start(sid("lost"), &me(), None).await.unwrap();
    first.shutdown().await;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(s.pid as i32), nix::sys::signal::SIGKILL).unwrap();
    wait_until("the process to die", || gone(s.pid)).await;

    let (second, mut rx2) = t.open().await;
    assert!(second.list().is_empty());
    assert_eq!(
        next_report(&mut rx2).await,
        AgentReport::SessionExited { session_id: sid("lost"), display: s.display, exit_status: None }
    );
    assert!(persisted_pids(&t.opts.state_dir).is_empty());
}

#[tokio::test]
#[cfg_attr(not(vsm_root), ignore = "needs root to switch to user nobody")]
async fn as_root_the_session_runs_as_the_user() {
    let nobody = nix::unistd::User::from_name("nobody").unwrap().expect("the user nobody exists on Debian");
    let t = TestAgent::new(&["sleep", "600"]);
    let (mgr, _rx) = t.open().await;
    let s = mgr.start(sid("n1"), "nobody", None).await.unwrap();
    let uid = status_field(s.pid, "Uid:").unwrap();
    let gid = status_field(s.pid, "Gid:").unwrap();
    let want_uid = nobody.uid.to_string();
    let want_gid = nobody.gid.to_string();
    assert!(uid.split_whitespace().all(|u| u == want_uid), "uid line {uid:?}");
    assert!(gid.split_whitespace().all(|g| g == want_gid), "gid line {gid:?}");
    let groups = status_field(s.pid, "Groups:").unwrap_or_default();
    assert!(!groups.split_whitespace().any(|g| g == "0"), "root's groups leaked: {groups:?}");
    let env = environ(s.pid);
    assert!(env.contains(&"USER=nobody".to_string()), "{env:?}");
    assert!(env.contains(&format!("HOME={}", nobody.dir.display())), "{env:?}");

    let unknown = mgr.start(sid("u1"), "no-such-user-vsm", None).await.unwrap_err();
    assert_eq!(unknown.kind(), AgentErrorKind::UnknownUser);
    assert!(mgr.terminate(&sid("n1"), s.display).await);
}

#[tokio::test]
async fn requests_map_to_replies_with_the_agent_address() {
    let t = TestAgent::new(&["sleep", "600"]);
    let (mgr, _rx) = t.open().await;
    let local: std::net::SocketAddr = "192.0.2.10:904".parse().unwrap();
    let agent = Agent::new(mgr.clone(), None);
    let req = AgentRequest::Start { session_id: sid("r1"), user: me(), geometry: None, wait_ms: None };
    let AgentReply::Started { session } = agent.handle(req, local).await else { panic!("expected Started") };
    assert_eq!(session.agent_address, "192.0.2.10");
    let named = Agent::new(mgr.clone(), Some("agent1.example.org".into()));
    let AgentReply::Sessions { sessions, load } = named.handle(AgentRequest::List, local).await else {
        panic!("expected Sessions")
    };
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions[0].agent_address, "agent1.example.org");
    assert_eq!(load.sessions, 1);
    assert!(load.cpus >= 1 && load.mem_total_kib > 0);

    let bad = AgentRequest::Start { session_id: sid("r2"), user: me(), geometry: Some("big".into()), wait_ms: None };
    assert!(matches!(agent.handle(bad, local).await, AgentReply::Error { kind: AgentErrorKind::BadRequest, .. }));
    let v = AgentRequest::Verify { session_id: sid("r1"), display: session.display };
    assert_eq!(agent.handle(v, local).await, AgentReply::Verified { alive: true });
    let term = AgentRequest::Terminate { session_id: sid("r1"), display: session.display, wait_ms: None };
    assert_eq!(agent.handle(term, local).await, AgentReply::Terminated { was_running: true });
    let v = AgentRequest::Verify { session_id: sid("r1"), display: session.display };
    assert_eq!(agent.handle(v, local).await, AgentReply::Verified { alive: false });
}

#[tokio::test]
async fn requests_the_master_no_longer_waits_for_are_not_carried_out() {
    let t = TestAgent::new(&["sleep", "600"]);
    let (mgr, _rx) = t.open().await;
    let local: std::net::SocketAddr = "192.0.2.10:904".parse().unwrap();
    let agent = Agent::new(mgr.clone(), None);
    let abandoned = |r: &AgentReply| matches!(r, AgentReply::Error { kind: AgentErrorKind::Abandoned, .. });

    // The master's connection is gone: nothing is started.
    let gone = || false;
    let fence = vsm::agentd::Fence::new(Instant::now(), &gone);
    let req = AgentRequest::Start { session_id: sid("f1"), user: me(), geometry: None, wait_ms: Some(60_000) };
    assert!(abandoned(&agent.handle_fenced(req, local, &fence).await));
    assert!(mgr.list().is_empty());

    // The master stops waiting while the session starts (start_check is 100 ms): it is ended.
    let req = AgentRequest::Start { session_id: sid("f2"), user: me(), geometry: None, wait_ms: Some(20) };
    assert!(abandoned(&agent.handle(req, local).await));
    assert!(mgr.list().is_empty(), "the late session was ended again");

    // A terminate on a connection that is gone leaves the session running.
    let req = AgentRequest::Start { session_id: sid("f3"), user: me(), geometry: None, wait_ms: Some(60_000) };
    let AgentReply::Started { session } = agent.handle(req, local).await else { panic!("expected Started") };
    let term = AgentRequest::Terminate { session_id: sid("f3"), display: session.display, wait_ms: Some(60_000) };
    assert!(abandoned(&agent.handle_fenced(term.clone(), local, &fence).await));
    assert!(mgr.verify(&sid("f3"), session.display));
    // With no time left it is not carried out either; in time, it is.
    let late = AgentRequest::Terminate { session_id: sid("f3"), display: session.display, wait_ms: Some(0) };
    assert!(abandoned(&agent.handle(late, local).await));
    assert!(mgr.verify(&sid("f3"), session.display));
    assert_eq!(agent.handle(term, local).await, AgentReply::Terminated { was_running: true });
}

/// A configuration directory for the `vsmagent` binary.
fn agent_config_dir(dir: &Path, extra_agent: &str) -> std::path::PathBuf {
    let cfg = dir.join("etc");
    std::fs::create_dir_all(&cfg).unwrap();
    std::fs::write(cfg.join("cluster.key"), "0123456789abcdef0123456789abcdef\n").unwrap();
    std::fs::set_permissions(cfg.join("cluster.key"), std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    std::fs::write(
        cfg.join("vsmagent.toml"),
        format!(
            "[vsmagent]\nstate_dir = {:?}\nsession_command = [\"sleep\", \"600\"]\n{extra_agent}",
            dir.join("state").display().to_string()
        ),
    )
    .unwrap();
    cfg
}

#[test]
fn the_binary_starts_and_stops_cleanly_on_sigterm() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let cfg = agent_config_dir(dir.path(), "");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_vsmagent"))
        .arg("--config-dir")
        .arg(&cfg)
        .args(["--listen", "127.0.0.1:0"])
        .env_remove("NOTIFY_SOCKET")
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    loop {
        let line = lines.next().expect("vsmagent ended before accepting").unwrap();
        let ready = line.contains("accepting master connections");
        seen.push(line);
        if ready {
            break;
        }
    }
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::SIGTERM).unwrap();
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let status = child.wait().unwrap();
    assert!(status.success(), "exit {status:?}; log: {seen:?} {rest:?}");
    assert!(rest.iter().any(|l| l.contains("sessions keep running")), "{rest:?}");
    assert!(dir.path().join("state/sessions.json").exists());
}

#[test]
fn the_binary_refuses_an_invalid_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = agent_config_dir(dir.path(), "display_min = \"many\"\n");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vsmagent"))
        .arg("--config-dir")
        .arg(&cfg)
        .args(["--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("display_min"), "{err}");
}

#[tokio::test]
async fn concurrent_starts_get_distinct_displays_and_one_session_per_id() {
    let t = TestAgent::new(&["sleep", "600"]);
    let (mgr, _rx) = t.open().await;
    let user = me();
    let (a, b, c) = tokio::join!(
        mgr.start(sid("a"), &user, None),
        mgr.start(sid("b"), &user, None),
        mgr.start(sid("a"), &user, None),
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_ne!(a.display, b.display);
    match c {
        Ok(c) => assert_eq!(c, a),
        Err(e) => assert_eq!(e.kind(), AgentErrorKind::BadRequest, "{e}"),
    }
    assert_eq!(mgr.list().len(), 2);
    for s in mgr.list() {
        assert!(mgr.terminate(&s.session_id, s.display).await);
    }
}

// ---- the daemon over the secure channel ----

use vsm::agentd::reporter::ReporterConfig;
use vsm::agentd::RunOptions;
use vsm::proto::secure::{Secret, PROLOGUE_AGENT, PROLOGUE_REPORT};

/// A running `agentd::run_with` on 127.0.0.1:0, with a fake master for exit reports.
struct TestDaemon {
    t: TestAgent,
    addr: std::net::SocketAddr,
    secret: Secret,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), AgentdError>>,
}

impl TestDaemon {
    async fn start(master_port: u16) -> TestDaemon {
        TestDaemon::start_with(master_port, true).await
    }

    async fn start_with(master_port: u16, terminate_on_shutdown: bool) -> TestDaemon {
        let mut t = TestAgent::new(&["sleep", "600"]);
        t.opts.terminate_on_shutdown = terminate_on_shutdown;
        let key = t._dir.path().join("cluster.key");
        std::fs::write(&key, "test cluster secret\n").unwrap();
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        let mut config = vsm::config::Config::default();
        config.vsm.secret_file = key.clone();
        config.vsm.vsm_server_port = master_port;
        config.vsmagent.master_hostname = "127.0.0.1".into();
        config.vsmagent.state_dir = t.opts.state_dir.clone();
        let opts = RunOptions {
            sessions: t.opts.clone(),
            reporter: ReporterConfig {
                backoff_initial: Duration::from_millis(5),
                backoff_max: Duration::from_millis(20),
                send_timeout: Duration::from_secs(5),
                outbox_path: Some(t.opts.state_dir.join("outbox.json")),
            },
            max_connections: 16,
            idle_timeout: Duration::from_secs(120),
            shutdown_deadline: Duration::from_secs(10),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(vsm::agentd::run_with(config, opts, listener, stopped));
        TestDaemon { t, addr, secret: Secret::from_file(&key).unwrap(), stop: Some(stop), task }
    }

    async fn call(&self, req: AgentRequest) -> AgentReply {
        let s = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        let mut c = vsm::proto::secure::connect(s, &self.secret, PROLOGUE_AGENT).await.unwrap();
        c.send(&req).await.unwrap();
        c.recv::<AgentReply>().await.unwrap().expect("a reply")
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn masters_start_list_and_terminate_over_the_secure_channel() {
    let d = TestDaemon::start(1).await;
    let AgentReply::Started { session } =
        d.call(AgentRequest::Start { session_id: sid("net1"), user: me(), geometry: None, wait_ms: None }).await
    else {
        panic!("expected Started")
    };
    assert_eq!(session.agent_address, "127.0.0.1");
    assert_eq!(session.display, 100);

    // Several requests on one connection, as a pooled master connection does.
    let s = tokio::net::TcpStream::connect(d.addr).await.unwrap();
    let mut c = vsm::proto::secure::connect(s, &d.secret, PROLOGUE_AGENT).await.unwrap();
    c.send(&AgentRequest::List).await.unwrap();
    let Some(AgentReply::Sessions { sessions, load }) = c.recv().await.unwrap() else { panic!("expected Sessions") };
    assert_eq!(sessions, vec![session.clone()]);
    assert_eq!(load.sessions, 1);
    c.send(&AgentRequest::Terminate { session_id: sid("net1"), display: 100, wait_ms: None }).await.unwrap();
    assert_eq!(c.recv().await.unwrap(), Some(AgentReply::Terminated { was_running: true }));
    assert!(gone(session.pid));
    d.stop().await;
}

#[tokio::test]
async fn a_caller_without_the_cluster_secret_is_refused() {
    let d = TestDaemon::start(1).await;
    let s = tokio::net::TcpStream::connect(d.addr).await.unwrap();
    let wrong = Secret::from_bytes(b"not the cluster secret");
    let err = vsm::proto::secure::connect(s, &wrong, PROLOGUE_AGENT).await.unwrap_err();
    assert!(err.is_auth_failure(), "{err}");
    // The daemon is unharmed and still serves the right secret.
    assert!(matches!(d.call(AgentRequest::Load).await, AgentReply::Load { .. }));
    d.stop().await;
}

#[tokio::test]
async fn exit_reports_reach_the_master_after_it_comes_back() {
    // A fake master that drops the first two report links without acknowledging.
    let master = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = master.local_addr().unwrap().port();
    let d = TestDaemon::start(port).await;
    let secret = d.secret.clone();
    let (got_tx, mut got_rx) = mpsc::channel::<(u32, AgentReport)>(8);
    tokio::spawn(async move {
        let mut attempt = 0u32;
        loop {
            let (s, _) = master.accept().await.unwrap();
            attempt += 1;
            let mut c = vsm::proto::secure::accept(s, &secret, PROLOGUE_REPORT).await.unwrap();
            let report: AgentReport = c.recv().await.unwrap().unwrap();
            if attempt <= 2 {
                continue; // dropped: no acknowledgement
            }
            c.send(&vsm::proto::agent::ReportAck::Accepted).await.unwrap();
            got_tx.send((attempt, report)).await.unwrap();
        }
    });

    let AgentReply::Started { session } =
        d.call(AgentRequest::Start { session_id: sid("rep1"), user: me(), geometry: None, wait_ms: None }).await
    else {
        panic!("expected Started")
    };
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(session.pid as i32), nix::sys::signal::SIGKILL).unwrap();
    let (attempt, report) = tokio::time::timeout(Duration::from_secs(15), got_rx.recv()).await.unwrap().unwrap();
    assert_eq!(attempt, 3);
    assert_eq!(report, AgentReport::SessionExited { session_id: sid("rep1"), display: 100, exit_status: Some(137) });
    let outbox = d.t.opts.state_dir.join("outbox.json");
    wait_until("the outbox to empty", || {
        std::fs::read(&outbox)
            .map(|b| serde_json::from_slice::<Vec<AgentReport>>(&b).unwrap().is_empty())
            .unwrap_or(false)
    })
    .await;
    d.stop().await;
}

#[tokio::test]
async fn stopping_the_daemon_leaves_sessions_running_for_the_next_one() {
    let d = TestDaemon::start_with(1, false).await;
    let AgentReply::Started { session } =
        d.call(AgentRequest::Start { session_id: sid("stay"), user: me(), geometry: None, wait_ms: None }).await
    else {
        panic!("expected Started")
    };
    let opts = d.t.opts.clone();
    let TestDaemon { t, addr: _, secret: _, stop, task } = d;
    let _ = stop.unwrap().send(());
    task.await.unwrap().unwrap();
    assert!(!gone(session.pid), "the session must survive the agent");

    let (again, _rx) = {
        let (tx, rx) = mpsc::channel(16);
        (SessionManager::open(opts, tx).await.unwrap(), rx)
    };
    let listed = again.list();
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0].pid, &listed[0].session_id), (session.pid, &session.session_id));
    assert!(again.terminate(&sid("stay"), session.display).await);
    drop(t);
}

/// A desktop process as a `vsmagent` killed between spawning it and recording it leaves
/// behind: its own Unix session, the session environment, no entry in `sessions.json`.
fn spawn_unrecorded(session_id: &str, session_dir: &Path) -> std::process::Child {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new("sleep");
    cmd.arg("60")
        .env("VSM_SESSION_ID", session_id)
        .env("VSM_SESSION_DIR", session_dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: setsid is async-signal-safe and touches no Rust state.
    unsafe {
        cmd.pre_exec(|| nix::unistd::setsid().map(|_| ()).map_err(std::io::Error::from));
    }
    cmd.spawn().unwrap()
}

#[tokio::test]
async fn a_desktop_started_but_never_recorded_is_ended_when_the_agent_starts_again() {
    let t = TestAgent::new(&["sleep", "60"]);
    let socket_dir = t.opts.vnc_socket_dir.clone();
    // A recorded session survives the restart as always.
    let (m, _rx) = t.open().await;
    let kept = m.start(sid("recorded"), &me(), None).await.unwrap();
    m.shutdown().await;
    drop(m);
    // While the agent is down: the desktop it was starting when it died...
    std::fs::create_dir_all(socket_dir.join("101")).unwrap();
    let mut orphan = spawn_unrecorded("never-recorded", &socket_dir.join("101"));
    // ...and another agent's desktop (another socket directory), which is not this agent's to end.
    let elsewhere = tempfile::tempdir().unwrap();
    let mut foreign = spawn_unrecorded("someone-elses", &elsewhere.path().join("101"));

    let (m, _rx) = t.open().await;
    wait_until("the unrecorded desktop to end", || orphan.try_wait().unwrap().is_some()).await;
    assert!(!socket_dir.join("101").exists(), "its session directory is removed");
    assert!(foreign.try_wait().unwrap().is_none(), "a desktop of another agent is left alone");
    assert!(m.verify(&sid("recorded"), kept.display), "the recorded session is re-adopted");
    assert_eq!(m.list().len(), 1);
    let _ = foreign.kill();
    let _ = foreign.wait();
    assert!(m.terminate(&sid("recorded"), kept.display).await);
}
