//! The single-master cluster, in process: masters and agents on 127.0.0.1:0.
mod common;

use common::*;
use std::time::Duration;
use vsm::api::{Api, Caller};
use vsm::model::SessionStatus;
use vsm::proto::api::{ApiErrorKind, ApiReply, ApiRequest, Selector};

const T: Duration = Duration::from_secs(10);

async fn one_agent_cluster() -> (tempfile::TempDir, TestAgent, TestMaster) {
    init_logging();
    let dir = cluster_dir();
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let master_port = tcp.local_addr().unwrap().port();
    let agent = TestAgent::start(dir.path(), 0, master_port, sleep_command()).await;
    let cfg = master_config(dir.path(), "master", &[agent.name.clone()]);
    let master = TestMaster::start(cfg, tcp, None, None).await;
    (dir, agent, master)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_creates_then_reconnects_to_the_same_session() {
    let (_d, agent, mut m) = one_agent_cluster().await;
    let a = m.connect("alice", false).await.unwrap();
    assert!(!a.reconnected);
    assert_eq!(a.agent, agent.name);
    assert_eq!(a.agent_address, "127.0.0.1");
    assert!(a.display >= 10 && a.display <= 99);
    let b = m.connect("alice", false).await.unwrap();
    assert!(b.reconnected);
    assert_eq!(a.session_id, b.session_id);
    assert_eq!(a.display, b.display);
    m.stop().await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_session_is_replaced_by_a_new_one() {
    let (_d, agent, mut m) = one_agent_cluster().await;
    let a = m.connect("alice", false).await.unwrap();
    let s = m.server().db.get(&a.session_id).await.unwrap().unwrap();
    // Kill the session behind the master's back; the exit report may or may not arrive first.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(s.pid as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    assert!(wait_until(T, || async { !alive(s.pid) }).await);
    let b = m.connect("alice", false).await.unwrap();
    assert!(!b.reconnected);
    assert_ne!(a.session_id, b.session_id);
    assert!(m.server().db.get(&a.session_id).await.unwrap().is_none());
    m.stop().await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_runs_as_child_of_the_agent_and_dies_on_terminate() {
    let (_d, agent, mut m) = one_agent_cluster().await;
    let a = m.connect("alice", false).await.unwrap();
    let s = m.server().db.get(&a.session_id).await.unwrap().unwrap();
    assert!(alive(s.pid));
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", s.pid)).unwrap();
    let ppid: u32 = stat.rsplit(')').next().unwrap().split_whitespace().nth(1).unwrap().parse().unwrap();
    assert_eq!(ppid, std::process::id(), "the session's parent is the agent (this test process)");
    let r = m.call(ApiRequest::TerminateMine { user: Some("alice".into()), session_id: a.session_id.clone() }).await;
    assert!(matches!(r, ApiReply::Terminated { .. }), "{r:?}");
    assert!(wait_until(T, || async { !alive(s.pid) }).await, "session process ended");
    assert!(m.server().db.get(&a.session_id).await.unwrap().is_none());
    m.stop().await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_report_reaches_the_master() {
    let (_d, agent, mut m) = one_agent_cluster().await;
    let a = m.connect("alice", false).await.unwrap();
    let s = m.server().db.get(&a.session_id).await.unwrap().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(s.pid as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    let db = m.server().db.clone();
    let id = a.session_id.clone();
    assert!(
        wait_until(T, || {
            let db = db.clone();
            let id = id.clone();
            async move { db.get(&id).await.unwrap().is_none() }
        })
        .await
    );
    m.stop().await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_and_groups() {
    init_logging();
    let dir = cluster_dir();
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let agent = TestAgent::start(dir.path(), 0, tcp.local_addr().unwrap().port(), sleep_command()).await;
    let mut cfg = master_config(dir.path(), "master", &[agent.name.clone()]);
    cfg.vsmserver.max_sessions_per_user = 2;
    let mut m = TestMaster::start(cfg, tcp, None, None).await;
    let a = m.connect("alice", false).await.unwrap();
    let b = m.connect("alice", true).await.unwrap();
    assert_ne!(a.session_id, b.session_id);
    assert_eq!(a.agent, b.agent, "a user's sessions stay on one agent");
    let (kind, msg) = m.connect("alice", true).await.unwrap_err();
    assert_eq!(kind, ApiErrorKind::LimitReached);
    assert!(msg.contains("at most 2"), "{msg}");
    m.stop().await;

    // allowed_groups: a user in none of them is refused.
    let mut cfg = master_config(dir.path(), "master2", &[agent.name.clone()]);
    cfg.vsmserver.allowed_groups = vec!["no-such-group-vsm-test".into()];
    let mut m = TestMaster::standalone(cfg).await;
    let (kind, msg) = m.connect("alice", false).await.unwrap_err();
    assert_eq!(kind, ApiErrorKind::NotAllowed);
    assert!(msg.contains("allowed_groups"), "{msg}");
    m.stop().await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_spread_over_agents_and_a_draining_agent_gets_none() {
    init_logging();
    let dir = cluster_dir();
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = tcp.local_addr().unwrap().port();
    let a1 = TestAgent::start(dir.path(), 0, port, sleep_command()).await;
    let a2 = TestAgent::start(dir.path(), 1, port, sleep_command()).await;
    let mut cfg = master_config(dir.path(), "master", &[a1.name.clone(), a2.name.clone()]);
    let mut m = TestMaster::start(cfg.clone(), tcp, None, None).await;
    let mut per_agent = std::collections::BTreeMap::<String, usize>::new();
    for u in ["u1", "u2", "u3", "u4"] {
        *per_agent.entry(m.connect(u, false).await.unwrap().agent).or_default() += 1;
    }
    assert_eq!(per_agent.get(&a1.name), Some(&2));
    assert_eq!(per_agent.get(&a2.name), Some(&2));
    m.stop().await;

    cfg.agents.draining = vec![a1.name.clone()];
    let mut m = TestMaster::standalone(cfg).await;
    for u in ["u5", "u6"] {
        assert_eq!(m.connect(u, false).await.unwrap().agent, a2.name);
    }
    // Existing sessions on the draining agent can still be reconnected.
    let r = m
        .call(ApiRequest::SessionList {
            selector: Selector { agent: Some(a1.name.clone()), ..Default::default() },
            refresh: false,
        })
        .await;
    let ApiReply::Sessions { sessions, .. } = r else { panic!("{r:?}") };
    let u = sessions[0].user.clone();
    let again = m.connect(&u, false).await.unwrap();
    assert!(again.reconnected);
    assert_eq!(again.agent, a1.name);
    m.stop().await;
    a1.stop().await;
    a2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_cannot_start_sessions_is_skipped() {
    init_logging();
    let dir = cluster_dir();
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = tcp.local_addr().unwrap().port();
    let broken = TestAgent::start(dir.path(), 0, port, vec!["/nonexistent/vsm-session".into()]).await;
    let good = TestAgent::start(dir.path(), 1, port, sleep_command()).await;
    let cfg = master_config(dir.path(), "master", &[broken.name.clone(), good.name.clone()]);
    let mut m = TestMaster::start(cfg, tcp, None, None).await;
    for u in ["u1", "u2", "u3"] {
        assert_eq!(m.connect(u, false).await.unwrap().agent, good.name, "{u} lands on the working agent");
    }
    let r = m.call(ApiRequest::LoadList { refresh: false }).await;
    let ApiReply::Loads { agents, .. } = r else { panic!("{r:?}") };
    let b = agents.iter().find(|a| a.agent == broken.name).unwrap();
    assert!(b.penalised_ms.is_some(), "the failing agent is penalised: {b:?}");
    m.stop().await;
    broken.stop().await;
    good.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_agent_available_is_a_clear_refusal() {
    init_logging();
    let dir = cluster_dir();
    // An agent name nobody listens on.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("127.0.0.1:{}", l.local_addr().unwrap().port())
    };
    let cfg = master_config(dir.path(), "master", &[dead]);
    let mut m = TestMaster::standalone(cfg).await;
    let (kind, msg) = m.connect("alice", false).await.unwrap_err();
    assert!(matches!(kind, ApiErrorKind::StartFailed | ApiErrorKind::NoAgentAvailable), "{kind:?}");
    assert!(!msg.is_empty());
    assert!(m.server().db.list(&Default::default()).await.unwrap().is_empty(), "nothing half-created");
    m.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciliation_recovers_and_marks_sessions() {
    init_logging();
    let d = cluster_dir();
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let master_port = tcp.local_addr().unwrap().port();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    // Sessions must outlive the agent's restart here, as they do in production.
    let agent = TestAgent::start_with(d.path(), 0, master_port, sleep_command(), l, true).await;
    let mut m = TestMaster::start(master_config(d.path(), "master", &[agent.name.clone()]), tcp, None, None).await;
    let a = m.connect("alice", false).await.unwrap();
    // A session the master never heard of: started on the agent directly.
    let client = vsm::agent::AgentClient::new(vsm::agent::AgentClientConfig {
        secret: vsm::proto::secure::Secret::from_file(d.path().join("cluster.key")).unwrap(),
        port: 904,
        timeout: Duration::from_secs(3),
    });
    let extra = client.start(&agent.name, vsm::model::SessionId::generate(), "bob", None).await.unwrap();
    let sum = m.server().broker.reconcile_all().await.unwrap();
    assert_eq!(sum.recovered, 1, "{sum:?}");
    let got = m.server().db.get(&extra.session_id).await.unwrap().expect("recovered session stored");
    assert_eq!(got.user, "bob");

    // The agent goes away: its sessions become unreachable but are kept.
    let port = agent.port;
    agent.stop().await;
    let sum = m.server().broker.reconcile_all().await.unwrap();
    assert_eq!(sum.unreachable, 1, "{sum:?}");
    let s = m.server().db.get(&a.session_id).await.unwrap().unwrap();
    assert_eq!(s.status, SessionStatus::Unreachable);

    // It comes back (same port) and still runs the sessions: they are no longer unreachable.
    let l = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    let agent = TestAgent::start_on(d.path(), 0, m.tcp_port, sleep_command(), l).await;
    // (This agent ends its sessions when the test stops it.)
    let sum = m.server().broker.reconcile_all().await.unwrap();
    assert_eq!(sum.back, 2, "{sum:?}");
    assert_eq!(m.server().db.get(&a.session_id).await.unwrap().unwrap().status, SessionStatus::Disconnected);

    // A session that vanished from the agent is removed.
    let r = client.terminate(&agent.name, extra.session_id.clone(), extra.display).await;
    assert!(r.is_ok(), "{r:?}");
    let db = m.server().db.clone();
    let id = extra.session_id.clone();
    let gone = wait_until(T, || {
        let (db, id, b) = (db.clone(), id.clone(), m.server().broker.clone());
        async move {
            let _ = b.reconcile_all().await;
            db.get(&id).await.unwrap().is_none()
        }
    })
    .await;
    assert!(gone);
    m.stop().await;
    agent.stop().await;
}

/// "Just created" is decided by order on the master, never by the clock that stamped the
/// record: sessions stamped an hour ahead, an hour behind or just now, none of them running
/// on the agent, all leave the list in one reconciliation; the live one stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciliation_removes_vanished_sessions_whatever_clock_stamped_them() {
    let (_d, agent, mut m) = one_agent_cluster().await;
    let live = m.connect("alice", false).await.unwrap();
    let now = vsm::model::now_ms();
    let mut gone = Vec::new();
    for created_ms in [now + 3_600_000, now - 3_600_000, now] {
        let s = m.put_session("bob", &agent.name).await;
        let mut s = m.server().db.get(&s.id).await.unwrap().unwrap();
        s.created_ms = created_ms;
        s.last_connect_ms = created_ms;
        m.server().broker.put(s.clone()).await.unwrap();
        gone.push(s.id);
    }
    let sum = m.server().broker.reconcile_all().await.unwrap();
    assert_eq!(sum.vanished, 3, "{sum:?}");
    for id in &gone {
        assert!(m.server().db.get(id).await.unwrap().is_none(), "{id} still listed");
    }
    assert!(m.server().db.get(&live.session_id).await.unwrap().is_some());
    m.stop().await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_cannot_see_or_end_another_users_session() {
    let (_d, agent, mut m) = one_agent_cluster().await;
    let a = m.connect("alice", false).await.unwrap();
    let api = Api::new(m.server().broker.clone(), m.server().ha.clone(), m.server().metrics.clone());
    let bob = Caller::Local { uid: 4242, user: "bob".into(), admin: false };
    match api.handle(&bob, ApiRequest::MySessions { user: None }).await {
        ApiReply::Sessions { sessions, .. } => assert!(sessions.is_empty()),
        other => panic!("{other:?}"),
    }
    match api.handle(&bob, ApiRequest::TerminateMine { user: None, session_id: a.session_id.clone() }).await {
        ApiReply::Error { kind, .. } => assert_eq!(kind, ApiErrorKind::NotFound),
        other => panic!("{other:?}"),
    }
    match api.handle(&bob, ApiRequest::MySessions { user: Some("alice".into()) }).await {
        ApiReply::Error { kind, .. } => assert_eq!(kind, ApiErrorKind::NotAllowed),
        other => panic!("{other:?}"),
    }
    match api.handle(&bob, ApiRequest::SessionList { selector: Selector::default(), refresh: false }).await {
        ApiReply::Error { kind, .. } => assert_eq!(kind, ApiErrorKind::NotAllowed),
        other => panic!("{other:?}"),
    }
    assert!(m.server().db.get(&a.session_id).await.unwrap().is_some(), "alice's session untouched");
    m.stop().await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_of_the_master_keeps_every_session() {
    let (_d, agent, mut m) = one_agent_cluster().await;
    let mut ids = vec![];
    for u in ["alice", "bob", "carol"] {
        ids.push(m.connect(u, false).await.unwrap().session_id);
    }
    let cfg = m.cfg.clone();
    m.stop().await;
    let mut m = TestMaster::standalone(cfg).await;
    for (u, id) in ["alice", "bob", "carol"].iter().zip(&ids) {
        let i = m.connect(u, false).await.unwrap();
        assert!(i.reconnected);
        assert_eq!(&i.session_id, id);
    }
    m.stop().await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_terminate_needs_a_selector_and_abandons_only_when_asked() {
    let (_d, agent, mut m) = one_agent_cluster().await;
    m.connect("alice", false).await.unwrap();
    m.connect("bob", false).await.unwrap();
    let r = m
        .call(ApiRequest::SessionTerminate {
            selector: Selector::default(),
            all: false,
            allow_abandon: false,
            dry_run: false,
        })
        .await;
    assert!(matches!(r, ApiReply::Error { kind: ApiErrorKind::BadRequest, .. }), "{r:?}");
    agent.stop().await;
    let sel = Selector { user: Some("alice".into()), ..Default::default() };
    let r = m
        .call(ApiRequest::SessionTerminate { selector: sel.clone(), all: false, allow_abandon: false, dry_run: false })
        .await;
    let ApiReply::Terminated { outcome } = r else { panic!("{r:?}") };
    assert_eq!(outcome.failed.len(), 1);
    assert!(outcome.failed[0].1.contains("--allow-abandon"), "{:?}", outcome.failed);
    let r =
        m.call(ApiRequest::SessionTerminate { selector: sel, all: false, allow_abandon: true, dry_run: false }).await;
    let ApiReply::Terminated { outcome } = r else { panic!("{r:?}") };
    assert_eq!(outcome.abandoned.len(), 1);
    let left = m.server().db.list(&Default::default()).await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].user, "bob");
    m.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input_on_the_socket_changes_nothing() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_d, agent, mut m) = one_agent_cluster().await;
    m.connect("alice", false).await.unwrap();
    let before = m.server().db.digest().await.unwrap();
    // A frame whose body is not a request.
    let mut s = tokio::net::UnixStream::connect(&m.cfg.vsmserver.socket_path).await.unwrap();
    let body = b"{\"op\":\"connect\",\"new\":";
    s.write_all(&(body.len() as u32).to_be_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    let mut len = [0u8; 4];
    s.read_exact(&mut len).await.unwrap();
    let mut reply = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut reply).await.unwrap();
    let reply: ApiReply = serde_json::from_slice(&reply).unwrap();
    assert!(matches!(reply, ApiReply::Error { kind: ApiErrorKind::BadRequest, .. }), "{reply:?}");
    // A truncated frame, then close.
    let mut s = tokio::net::UnixStream::connect(&m.cfg.vsmserver.socket_path).await.unwrap();
    s.write_all(&100u32.to_be_bytes()).await.unwrap();
    s.write_all(b"{\"op\"").await.unwrap();
    drop(s);
    // An absurd length.
    let mut s = tokio::net::UnixStream::connect(&m.cfg.vsmserver.socket_path).await.unwrap();
    s.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    let _ = s.read(&mut [0u8; 16]).await;
    assert_eq!(m.server().db.digest().await.unwrap(), before);
    // The master still serves.
    assert!(m.connect("alice", false).await.unwrap().reconnected);
    m.stop().await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_with_the_wrong_secret_is_refused_on_tcp() {
    let (_d, agent, mut m) = one_agent_cluster().await;
    let target = vsm::client::Target::Tcp {
        addr: format!("127.0.0.1:{}", m.tcp_port),
        secret: vsm::proto::secure::Secret::from_bytes(b"not the cluster secret"),
    };
    let r =
        vsm::client::call(&target, &ApiRequest::SessionList { selector: Selector::default(), refresh: false }, T).await;
    assert!(r.is_err(), "{r:?}");
    let good = vsm::client::Target::Tcp {
        addr: format!("127.0.0.1:{}", m.tcp_port),
        secret: vsm::proto::secure::Secret::from_file(&m.cfg.vsm.secret_file).unwrap(),
    };
    let r = vsm::client::call(&good, &ApiRequest::SessionList { selector: Selector::default(), refresh: false }, T)
        .await
        .unwrap();
    assert!(matches!(r, ApiReply::Sessions { .. }), "{r:?}");
    m.stop().await;
    agent.stop().await;
}

/// `tlctl ha status` shows the database digest (every record read and hashed); the status a
/// metrics scrape reads does not compute it, since no metric shows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ha_status_has_the_database_digest_and_the_metrics_status_does_not() {
    use vsm::ha::handle::Digest;
    let (_d, agent, mut m) = one_agent_cluster().await;
    m.connect("alice", false).await.unwrap();
    let api = Api::new(m.server().broker.clone(), m.server().ha.clone(), m.server().metrics.clone());
    let full = api.ha_status(Digest::Include).await;
    let digest = full.db_digest.clone().expect("a digest");
    assert_eq!(digest.len(), 64, "sha-256 in hex: {digest}");
    assert_eq!(m.ha_status().await.db_digest.as_deref(), Some(digest.as_str()), "the API request includes it");
    let light = api.ha_status(Digest::Omit).await;
    assert_eq!(light.db_digest, None);
    assert_eq!((light.sessions, light.local_head, light.ready), (full.sessions, full.local_head, full.ready));
    m.stop().await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_metrics_over_http() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    init_logging();
    let dir = cluster_dir();
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let agent = TestAgent::start(dir.path(), 0, tcp.local_addr().unwrap().port(), sleep_command()).await;
    let cfg = master_config(dir.path(), "master", &[agent.name.clone()]);
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http_port = http.local_addr().unwrap().port();
    let unix = vsm::server::bind_unix(&cfg.vsmserver.socket_path).unwrap();
    let server = vsm::server::Server::start(
        cfg.clone(),
        vsm::server::Listeners { unix, tcp, peer: None, http: Some(http) },
        vsm::server::Overrides { no_background_reconcile: true, ..Default::default() },
    )
    .await
    .unwrap();
    let m = TestMaster { cfg, server: Some(server), tcp_port: 0, peer_port: 0 };
    async fn get(port: u16, req: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }
    fn body(r: &str) -> &str {
        r.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("")
    }
    let scrape = || async { Scrape::parse(body(&get(http_port, "GET /metrics HTTP/1.1\r\n\r\n").await)) };

    let before = scrape().await;
    // Families without a series yet (no login so far) are absent; these always have one.
    for (name, ty) in [
        ("vsm_session_creates_total", "counter"),
        ("vsm_sessions", "gauge"),
        ("vsm_ha_lag_seconds", "gauge"),
        ("vsm_ha_configured_but_off", "gauge"),
        ("vsm_agent_reachable", "gauge"),
        ("vsm_build_info", "gauge"),
        ("process_resident_memory_bytes", "gauge"),
        ("process_cpu_seconds_total", "counter"),
        ("process_open_fds", "gauge"),
        ("process_start_time_seconds", "gauge"),
    ] {
        assert_eq!(before.ty(name), ty, "type of {name}");
    }
    assert_eq!(before.value("vsm_session_creates_total"), 0.0);
    assert_eq!(before.value("vsm_sessions{state=\"running\"}"), 0.0);
    assert_eq!(before.value("vsm_ha_configured_but_off"), 0.0);
    assert!(before.value("process_resident_memory_bytes") > 0.0);

    m.connect("alice", false).await.unwrap();
    m.connect("alice", false).await.unwrap();
    let e = m.connect("alice", true).await.unwrap_err();
    assert_eq!(e.0, vsm::proto::api::ApiErrorKind::LimitReached, "{e:?}");
    let after = scrape().await;
    for (name, ty) in [
        ("vsm_logins_total", "counter"),
        ("vsm_login_failures_total", "counter"),
        ("vsm_agent_calls_total", "counter"),
        ("vsm_agent_call_duration_seconds", "histogram"),
    ] {
        assert_eq!(after.ty(name), ty, "type of {name}");
    }
    assert_eq!(after.value("vsm_logins_total{outcome=\"created\"}"), 1.0);
    assert_eq!(after.value("vsm_logins_total{outcome=\"reconnected\"}"), 1.0);
    assert_eq!(after.value("vsm_login_failures_total{reason=\"limit_reached\"}"), 1.0);
    assert_eq!(after.value("vsm_session_creates_total"), 1.0);
    assert_eq!(after.value("vsm_sessions{state=\"running\"}"), 1.0);
    assert_eq!(after.value("vsm_sessions{state=\"unreachable\"}"), 0.0);
    assert_eq!(after.value(&format!("vsm_agent_sessions{{agent=\"{}\"}}", agent.name)), 1.0);
    assert_eq!(after.value(&format!("vsm_agent_reachable{{agent=\"{}\"}}", agent.name)), 1.0);
    assert!(after.value("vsm_agent_call_duration_seconds_count{call=\"start\"}") >= 1.0);
    assert_eq!(after.value("vsm_ready"), 1.0);
    assert!(after.value("process_cpu_seconds_total") >= before.value("process_cpu_seconds_total"));

    let r = get(http_port, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let r = get(http_port, "GET /readyz HTTP/1.1\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    for path in ["/healthz", "/readyz", "/metrics"] {
        let r = get(http_port, &format!("HEAD {path} HTTP/1.1\r\n\r\n")).await;
        assert!(r.starts_with("HTTP/1.1 200"), "HEAD {path}: {r}");
        assert!(r.contains("Content-Length: "), "HEAD {path}: {r}");
        assert_eq!(body(&r), "", "HEAD {path} sends no body");
    }
    let r =
        get(http_port, "GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text; version=1.0.0\r\n\r\n").await;
    assert!(r.contains("Content-Type: application/openmetrics-text"), "{r}");
    assert!(r.ends_with("# EOF\n"), "{r}");
    let r = get(http_port, "GET /nope HTTP/1.1\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.1 404"), "{r}");
    let r = get(http_port, "POST /metrics HTTP/1.1\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.1 405"), "{r}");
    assert!(r.contains("Allow: GET, HEAD"), "{r}");
    let mut m = m;
    m.stop().await;
    agent.stop().await;
}

// ----- Agents that stall or answer late: fenced actions and reachability -----

/// A master whose only agent sits behind a [`Relay`], with a short agent timeout.
async fn relayed_cluster(
    tweak: impl Fn(&mut vsm::config::Config),
) -> (tempfile::TempDir, TestAgent, Relay, TestMaster) {
    init_logging();
    let dir = cluster_dir();
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let agent = TestAgent::start(dir.path(), 0, tcp.local_addr().unwrap().port(), sleep_command()).await;
    let relay = Relay::start(agent.port).await;
    let mut cfg = master_config(dir.path(), "master", &[relay.name()]);
    cfg.vsmserver.agent_timeout = Duration::from_secs(1);
    tweak(&mut cfg);
    let m = TestMaster::start(cfg, tcp, None, None).await;
    (dir, agent, relay, m)
}

fn sessions_of(list: &[vsm::proto::agent::AgentSession], user: &str) -> usize {
    list.iter().filter(|s| s.user == user).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_the_master_gave_up_on_is_never_carried_out() {
    let (d, agent, relay, mut m) = relayed_cluster(|c| c.vsmserver.max_sessions_per_user = 1).await;
    m.connect("warm", false).await.unwrap();
    // The agent stops reading (as under SIGSTOP): the request waits in the network.
    let held = relay.open_connections();
    relay.hold_requests();
    let (kind, msg) = m.connect("alice", false).await.unwrap_err();
    assert_eq!(kind, ApiErrorKind::StartFailed, "{msg}");
    // It resumes and reads the request the master gave up on.
    relay.release();
    assert!(wait_until(T, || async { relay.closed(&held) }).await, "the held request was delivered");
    assert_eq!(sessions_of(&agent_sessions(d.path(), agent.port).await, "alice"), 0, "no ghost desktop");
    let sum = m.server().broker.reconcile_all().await.unwrap();
    assert_eq!(sum.recovered, 0, "{sum:?}");
    // The user gets exactly one session afterwards.
    m.connect("alice", false).await.unwrap();
    assert_eq!(sessions_of(&agent_sessions(d.path(), agent.port).await, "alice"), 1);
    m.stop().await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_answered_too_late_is_ended_and_never_adopted() {
    let (d, agent, relay, mut m) = relayed_cluster(|c| c.vsmserver.max_sessions_per_user = 1).await;
    m.connect("warm", false).await.unwrap();
    // The agent acts at once but its answer arrives after the master gave up.
    relay.hold_answers();
    let (kind, msg) = m.connect("alice", false).await.unwrap_err();
    assert_eq!(kind, ApiErrorKind::StartFailed, "{msg}");
    relay.release();
    let (db, broker) = (m.server().db.clone(), m.server().broker.clone());
    let base = d.path().to_path_buf();
    let ended = wait_until(T, || {
        let (broker, base) = (broker.clone(), base.clone());
        async move {
            let sum = broker.reconcile_all().await.unwrap();
            assert_eq!(sum.recovered, 0, "a desktop nobody was told about is never adopted: {sum:?}");
            sessions_of(&agent_sessions(&base, agent.port).await, "alice") == 0
        }
    })
    .await;
    assert!(ended, "the late desktop is ended");
    let alice = vsm::db::SessionFilter { user: Some("alice".into()), ..Default::default() };
    assert!(db.list(&alice).await.unwrap().is_empty());
    m.connect("alice", false).await.unwrap();
    assert_eq!(sessions_of(&agent_sessions(d.path(), agent.port).await, "alice"), 1, "the limit holds");
    m.stop().await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminate_without_answer_is_pending_and_carried_out() {
    let (d, agent, relay, mut m) = relayed_cluster(|_| {}).await;
    let a = m.connect("alice", false).await.unwrap();
    let held = relay.open_connections();
    relay.hold_requests();
    let r = m.call(ApiRequest::TerminateMine { user: Some("alice".into()), session_id: a.session_id.clone() }).await;
    let ApiReply::Terminated { outcome } = r else { panic!("{r:?}") };
    assert!(outcome.terminated.is_empty() && outcome.failed.is_empty(), "{outcome:?}");
    let (s, why) = &outcome.pending[0];
    assert_eq!(s.id, a.session_id);
    assert!(why.contains("pending") && !why.contains("could not start"), "{why}");
    assert!(m.server().db.get(&a.session_id).await.unwrap().is_none(), "no longer listed");
    relay.release();
    assert!(wait_until(T, || async { relay.closed(&held) }).await, "the held request was delivered");
    // Whether or not the agent saw the master's close before the late request (the relay
    // cannot deliver both at once as a stopped agent's kernel would; `tests/agentd.rs` checks
    // the agent's side), the master carries the termination out once the agent answers.
    let sum = m.server().broker.reconcile_all().await.unwrap();
    assert_eq!(sum.recovered, 0, "{sum:?}");
    let base = d.path().to_path_buf();
    assert!(wait_until(T, || async { sessions_of(&agent_sessions(&base, agent.port).await, "alice") == 0 }).await);
    m.stop().await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminate_that_cannot_reach_the_agent_fails_with_the_right_words() {
    let (_d, agent, mut m) = one_agent_cluster().await;
    let a = m.connect("alice", false).await.unwrap();
    agent.stop().await;
    let r = m.call(ApiRequest::TerminateMine { user: Some("alice".into()), session_id: a.session_id.clone() }).await;
    let ApiReply::Error { kind, message } = r else { panic!("{r:?}") };
    assert_eq!(kind, ApiErrorKind::TerminateFailed);
    assert!(message.contains("could not end") && !message.contains("could not start"), "{message}");
    assert!(m.server().db.get(&a.session_id).await.unwrap().is_some(), "still listed");
    m.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_answers_again_is_placeable_at_once() {
    let (_d, agent, relay, mut m) = relayed_cluster(|_| {}).await;
    m.connect("alice", false).await.unwrap();
    relay.hold_requests();
    m.connect("bob", false).await.unwrap_err();
    relay.release();
    // One successful call is enough: alice's verify marks the agent reachable again.
    assert!(m.connect("alice", false).await.unwrap().reconnected);
    let c = m.connect("carol", false).await;
    assert!(c.is_ok(), "{c:?}");
    m.stop().await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newly_started_agent_becomes_placeable_without_a_reconciliation() {
    init_logging();
    let dir = cluster_dir();
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let master_port = tcp.local_addr().unwrap().port();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let name = format!("127.0.0.1:{}", l.local_addr().unwrap().port());
    let mut m = TestMaster::start(master_config(dir.path(), "master", &[name.clone()]), tcp, None, None).await;
    // Not started yet: the first login fails and the agent counts as unreachable.
    m.connect("alice", false).await.unwrap_err();
    let reachable = |refresh: bool| {
        let target = m.target();
        async move {
            match vsm::client::call(&target, &ApiRequest::LoadList { refresh }, T).await.unwrap() {
                ApiReply::Loads { agents, .. } => agents.iter().all(|a| a.reachable && a.load.is_some()),
                other => panic!("{other:?}"),
            }
        }
    };
    assert!(!reachable(false).await);
    let agent = TestAgent::start_on(dir.path(), 0, master_port, sleep_command(), l).await;
    // Reconciliation runs hourly here: only the probe of unreachable agents can see it.
    assert!(wait_until(T, || reachable(false)).await, "the new agent is seen without a reconciliation");
    m.connect("alice", false).await.unwrap();
    // `tlctl load list --refresh` asks every agent now.
    assert!(reachable(true).await);
    m.stop().await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_reports_only_end_sessions_of_the_reporting_agent() {
    use vsm::proto::agent::{AgentReport, ReportAck};
    let (d, agent, mut m) = one_agent_cluster().await;
    let a = m.connect("alice", false).await.unwrap();
    let secret = vsm::proto::secure::Secret::from_file(d.path().join("cluster.key")).unwrap();
    let report = |from: &'static str, display: u32| {
        let (secret, id, port) = (secret.clone(), a.session_id.clone(), m.tcp_port);
        async move {
            let sock = tokio::net::TcpSocket::new_v4().unwrap();
            sock.bind(format!("{from}:0").parse().unwrap()).unwrap();
            let s = sock.connect(([127, 0, 0, 1], port).into()).await.unwrap();
            let mut c = vsm::proto::secure::connect(s, &secret, vsm::proto::secure::PROLOGUE_REPORT).await.unwrap();
            c.send(&AgentReport::SessionExited { session_id: id, display, exit_status: Some(0) }).await.unwrap();
            c.recv::<ReportAck>().await.unwrap()
        }
    };
    // Another host holding the cluster key, and the right host naming another display.
    assert_eq!(report("127.0.0.2", a.display).await, Some(ReportAck::Accepted));
    assert_eq!(report("127.0.0.1", a.display + 1).await, Some(ReportAck::Accepted));
    assert!(m.server().db.get(&a.session_id).await.unwrap().is_some(), "forged reports change nothing");
    assert_eq!(report("127.0.0.1", a.display).await, Some(ReportAck::Accepted));
    assert!(m.server().db.get(&a.session_id).await.unwrap().is_none());
    m.stop().await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_list_refresh_asks_the_agents_first() {
    // The master polls no agent on its own here, so only the refresh can bring the load.
    let (_d, agent, mut m) = one_agent_cluster().await;
    let loads = |r: ApiReply| match r {
        ApiReply::Loads { agents, .. } => agents,
        other => panic!("{other:?}"),
    };
    let before = loads(m.call(ApiRequest::LoadList { refresh: false }).await);
    let a = before.iter().find(|a| a.agent == agent.name).unwrap();
    assert!(a.load.is_none() && a.updated_ms_ago.is_none(), "not polled yet: {a:?}");
    let after = loads(m.call(ApiRequest::LoadList { refresh: true }).await);
    let a = after.iter().find(|a| a.agent == agent.name).unwrap();
    assert!(a.reachable, "{a:?}");
    assert!(a.load.as_ref().is_some_and(|l| l.cpus >= 1), "the agent's load after a refresh: {a:?}");
    assert!(a.updated_ms_ago.is_some(), "{a:?}");
    m.stop().await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_bind_the_configured_addresses() {
    init_logging();
    let dir = cluster_dir();
    let mut cfg = master_config(dir.path(), "master", &[]);
    // Port 0 is refused by the key table; the struct takes it, so the test needs no free port.
    cfg.vsmserver.listen_address = "127.0.0.1".into();
    cfg.vsmserver.listen_port = 0;
    cfg.ha.enabled = true;
    cfg.ha.listen_address = "127.0.0.1".into();
    cfg.ha.port = 0;
    cfg.vsmserver.http_address = "127.0.0.1".into();
    cfg.vsmserver.http_port = 0;
    let l = vsm::server::bind(&cfg).await.unwrap();
    assert_eq!(l.tcp.local_addr().unwrap().ip().to_string(), "127.0.0.1");
    assert_eq!(l.peer.as_ref().unwrap().local_addr().unwrap().ip().to_string(), "127.0.0.1");
    assert!(l.http.is_none(), "http_port 0 turns the endpoint off");

    // An IPv6 address works too where the machine has IPv6 loopback.
    let mut v6 = master_config(dir.path(), "v6", &[]);
    v6.vsmserver.listen_address = "::1".into();
    v6.vsmserver.listen_port = 0;
    v6.vsmserver.http_port = 0;
    match vsm::server::bind(&v6).await {
        Ok(l) => assert_eq!(l.tcp.local_addr().unwrap().ip().to_string(), "::1"),
        Err(e) => {
            let e = e.to_string();
            assert!(e.contains("[::1]:0"), "the error shows the address as configured: {e}");
            eprintln!("no IPv6 loopback here: {e}");
        }
    }

    // A busy port names the keys to change.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut clash = master_config(dir.path(), "clash", &[]);
    clash.vsmserver.listen_address = "127.0.0.1".into();
    clash.vsmserver.listen_port = busy.local_addr().unwrap().port();
    clash.vsmserver.http_port = 0;
    let e = vsm::server::bind(&clash).await.err().expect("the port is taken").to_string();
    assert!(e.contains("/vsmserver/listen_address, /vsmserver/listen_port"), "{e}");
}

/// Found by the fault campaign (docs/reliability.md, seed 2): with the master's disk full, a
/// terminate ended the desktop on its agent and then, failing to remove the record, told the
/// user it had failed. The desktop is gone either way: the user is told it ended, and
/// reconciliation removes the record once the disk has room again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(vsm_root), ignore = "needs root to mount a small tmpfs for the data directory")]
async fn a_terminate_carried_out_on_a_full_disk_is_reported_as_done() {
    struct Mounted(std::path::PathBuf);
    impl Drop for Mounted {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    init_logging();
    let dir = cluster_dir();
    let small = dir.path().join("small");
    std::fs::create_dir(&small).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "vsm-test-full"])
        .arg(&small)
        .status()
        .is_ok_and(|s| s.success());
    assert!(mounted, "cannot mount a tmpfs on {}", small.display());
    let _mounted = Mounted(small.clone());
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let master_port = tcp.local_addr().unwrap().port();
    let agent = TestAgent::start(dir.path(), 0, master_port, sleep_command()).await;
    let mut cfg = master_config(dir.path(), "master", std::slice::from_ref(&agent.name));
    cfg.vsmserver.data_dir = small.join("data");
    let mut m = TestMaster::start(cfg, tcp, None, None).await;
    let a = m.connect("alice", false).await.unwrap();
    let pid = m.server().db.get(&a.session_id).await.unwrap().expect("stored").pid;
    assert!(alive(pid));

    // Fill the data directory's file system.
    {
        use std::io::Write as _;
        let mut f = std::fs::File::create(small.join("filler")).unwrap();
        while f.write_all(&[0u8; 4096]).is_ok() {}
        let _ = f.sync_all();
    }
    let r = m.call(ApiRequest::TerminateMine { user: Some("alice".into()), session_id: a.session_id.clone() }).await;
    let ApiReply::Terminated { outcome } = r else { panic!("a terminate that ended the desktop must say so: {r:?}") };
    assert_eq!(outcome.terminated.iter().map(|s| &s.id).collect::<Vec<_>>(), vec![&a.session_id], "{outcome:?}");
    assert!(outcome.failed.is_empty() && outcome.pending.is_empty(), "{outcome:?}");
    assert!(wait_until(Duration::from_secs(10), || async { !alive(pid) }).await, "the desktop still runs");

    // With room again, reconciliation removes the record of the ended session.
    std::fs::remove_file(small.join("filler")).unwrap();
    let gone = wait_until(Duration::from_secs(20), || async {
        let r = m.call(ApiRequest::SessionList { selector: Selector::default(), refresh: true }).await;
        matches!(r, ApiReply::Sessions { ref sessions, .. } if sessions.is_empty())
    })
    .await;
    assert!(gone, "the record of the ended session stays listed");
    m.stop().await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ha_status_shows_the_agents_clock_offsets_the_broker_measured() {
    let (_d, agent, mut m) = one_agent_cluster().await;
    assert!(m.server().broker.probe(&agent.name).await);
    let ApiReply::HaStatus { status } = m.call(ApiRequest::HaStatus).await else { panic!("no HA status") };
    let offsets = &status.agent_clock_offsets;
    assert_eq!(offsets.len(), 1, "{offsets:?}");
    assert_eq!(offsets[0].agent, agent.name);
    assert!(!offsets[0].exceeded, "one machine's clock differs from itself: {offsets:?}");
    m.stop().await;
    agent.stop().await;
}

/// An agent that takes `delay` to start each desktop and answers everything else at once; its
/// `host:port` name.
async fn slow_agent(dir: &std::path::Path, delay: Duration) -> String {
    use vsm::proto::agent::{AgentReply, AgentRequest, LoadReport};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let name = format!("127.0.0.1:{}", l.local_addr().unwrap().port());
    let secret = vsm::proto::secure::Secret::from_file(dir.join("cluster.key")).unwrap();
    let displays = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(10));
    tokio::spawn(async move {
        while let Ok((sock, _)) = l.accept().await {
            let (secret, displays) = (secret.clone(), displays.clone());
            tokio::spawn(async move {
                let _ = vsm::proto::agent_link::serve_agent_conn(sock, &secret, |req| {
                    let displays = displays.clone();
                    async move {
                        match req {
                            AgentRequest::Start { session_id, user, .. } => {
                                tokio::time::sleep(delay).await;
                                let display = displays.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                                AgentReply::Started {
                                    session: vsm::testkit::stand_in_desktop(session_id, user, None, display, 0),
                                }
                            }
                            AgentRequest::Verify { .. } => AgentReply::Verified { alive: true },
                            AgentRequest::Terminate { .. } => AgentReply::Terminated { was_running: true },
                            AgentRequest::List => {
                                AgentReply::Sessions { sessions: vec![], load: LoadReport::default() }
                            }
                            AgentRequest::Load => AgentReply::Load { load: LoadReport::default() },
                        }
                    }
                })
                .await;
            });
        }
    });
    name
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_logins_spreads_over_the_agents_while_their_starts_are_under_way() {
    init_logging();
    let dir = cluster_dir();
    // Every start takes long enough that all logins choose their agent before any is stored:
    // only the starts under way can tell the later choices where the earlier ones went.
    let mut agents = Vec::new();
    for _ in 0..4 {
        agents.push(slow_agent(dir.path(), Duration::from_millis(400)).await);
    }
    let cfg = master_config(dir.path(), "master", &agents);
    let mut m = TestMaster::standalone(cfg).await;
    let mut logins = tokio::task::JoinSet::new();
    for i in 0..8 {
        let target = m.target();
        logins.spawn(async move {
            let req = ApiRequest::Connect {
                user: Some(format!("burst{i}")),
                new: false,
                terminate_existing: false,
                geometry: None,
                client_address: None,
            };
            match vsm::client::call(&target, &req, T).await {
                Ok(ApiReply::Connected { info }) => info.agent,
                other => panic!("login {i}: {other:?}"),
            }
        });
    }
    let mut per_agent = std::collections::BTreeMap::<String, usize>::new();
    while let Some(agent) = logins.join_next().await {
        *per_agent.entry(agent.unwrap()).or_default() += 1;
    }
    for a in &agents {
        assert_eq!(per_agent.get(a), Some(&2), "8 logins at once on 4 agents: two each, got {per_agent:?}");
    }
    m.stop().await;
}
