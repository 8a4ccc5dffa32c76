//! `vsmserver demo`: a self-contained, narrated run of the whole product on loopback, with no
//! root and no configuration: two agents, a primary and a secondary master with HA, a stand-in
//! for the resource IP, users logging in, the primary dying, failover, new work on the
//! secondary, the primary coming back with an empty database, its resync, and the final check
//! that both session databases are identical.
//!
//! Everything runs in this process except the desktop sessions, which are real child
//! processes of the agents (a tiny VNC stand-in that answers the RFB greeting).
//!
//! The cluster is built with [`crate::testkit`], as the integration tests build theirs.
//!
//! Invariant: every step checks what it claims; the demo exits non-zero when any check fails.

use crate::client::{call, Target};
use crate::config::{Config, SyncLevel};
use crate::model::SessionId;
use crate::proto::api::{ApiReply, ApiRequest, ConnectInfo, HaStatusView, Selector, VrrpState};
use crate::server::Server;
use crate::testkit::{self, bind_loopback, wait_until, LoopbackAgent};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// Keep everything running at the end and print how to try it by hand (Ctrl-C stops).
    #[arg(long)]
    pub keep_running: bool,
    /// Work directory (default: a fresh temporary directory, removed at the end).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Acknowledgement level of the replication: ack or async.
    #[arg(long, default_value = "ack")]
    pub sync: String,
}

/// The stand-in desktop: listen on the VNC port and greet every client as an RFB server would.
pub async fn fake_session(port: u16) -> ExitCode {
    let l = match TcpListener::bind(("127.0.0.1", port)).await {
        Ok(l) => l,
        Err(e) => {
            crate::errln!("demo session: cannot listen on 127.0.0.1:{port}: {e}");
            return ExitCode::from(1);
        }
    };
    loop {
        if let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(b"RFB 003.008\n").await;
                let mut buf = [0u8; 64];
                let _ = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
            });
        }
    }
}

struct Step {
    n: usize,
    total: usize,
    failed: usize,
    started: Instant,
}

impl Step {
    fn title(&mut self, t: &str) {
        self.n += 1;
        crate::outln!("\n[{}/{}] {t}", self.n, self.total);
    }
    fn say(&self, t: &str) {
        crate::outln!("      {t}");
    }
    fn check(&mut self, ok: bool, what: &str) -> bool {
        let ms = self.started.elapsed().as_millis();
        if ok {
            crate::outln!("      ok    {what}  (t={ms} ms)");
        } else {
            crate::outln!("      FAIL  {what}  (t={ms} ms)");
            self.failed += 1;
        }
        ok
    }
}

struct Master {
    name: &'static str,
    dir: PathBuf,
    socket: PathBuf,
    tcp_port: u16,
    peer_port: u16,
    server: Option<Server>,
}

impl Master {
    fn target(&self) -> Target {
        Target::Unix(self.socket.clone())
    }
}

fn demo_config(base: &Path, name: &str, agents: &[String], vip_port: u16, sync: SyncLevel) -> Config {
    let mut cfg =
        testkit::with_ha(testkit::master_config(base, name, agents), ["tlha-primary", "tlha-secondary"], name);
    cfg.ha.sync = sync;
    cfg.ha.sync_timeout = Duration::from_secs(2);
    cfg.ha.startup_grace = Duration::from_secs(3);
    cfg.ha.heartbeat_interval = Duration::from_millis(200);
    cfg.ha.peer_timeout = Duration::from_millis(1500);
    cfg.vsm.vsm_server_port = vip_port;
    cfg.vsmserver.db_synchronous = crate::config::DbSynchronous::Full;
    cfg.vsmserver.max_sessions_per_user = 2;
    cfg.vsmserver.reconcile_interval = Duration::from_secs(2);
    cfg.vsmserver.agent_timeout = Duration::from_secs(3);
    cfg
}

async fn start_master(m: &mut Master, cfg: Config, peer_port: u16) -> Result<(), String> {
    std::fs::create_dir_all(&m.dir).map_err(|e| e.to_string())?;
    let tcp = bind_loopback(m.tcp_port).await.map_err(|e| e.to_string())?;
    let peer = bind_loopback(m.peer_port).await.map_err(|e| e.to_string())?;
    m.tcp_port = tcp.local_addr().map_err(|e| e.to_string())?.port();
    m.peer_port = peer.local_addr().map_err(|e| e.to_string())?.port();
    let peer_addr = Some(format!("127.0.0.1:{peer_port}"));
    let server = testkit::start_master(cfg, tcp, Some(peer), peer_addr, true).await.map_err(|e| e.to_string())?;
    m.server = Some(server);
    Ok(())
}

/// The stand-in for the resource IP: forwards TCP connections to whichever master is active.
async fn vip(listener: TcpListener, active: tokio::sync::watch::Receiver<u16>, cancel: CancellationToken) {
    loop {
        let (mut inbound, _) = tokio::select! {
            _ = cancel.cancelled() => return,
            r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
        };
        let port = *active.borrow();
        tokio::spawn(async move {
            if let Ok(mut out) = TcpStream::connect(("127.0.0.1", port)).await {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
            }
        });
    }
}

async fn connect_as(m: &Master, user: &str, new: bool) -> Result<ConnectInfo, String> {
    let req = ApiRequest::Connect {
        user: Some(user.into()),
        new,
        terminate_existing: false,
        geometry: None,
        client_address: Some("127.0.0.1".into()),
    };
    match call(&m.target(), &req, Duration::from_secs(20)).await {
        Ok(ApiReply::Connected { info }) => Ok(info),
        Ok(ApiReply::Error { message, .. }) => Err(message),
        Ok(other) => Err(format!("unexpected reply {other:?}")),
        Err(e) => Err(e.to_string()),
    }
}

async fn ha_status(m: &Master) -> Option<HaStatusView> {
    match call(&m.target(), &ApiRequest::HaStatus, Duration::from_secs(5)).await {
        Ok(ApiReply::HaStatus { status }) => Some(*status),
        _ => None,
    }
}

async fn notify(m: &Master, state: VrrpState) {
    let _ = call(&m.target(), &ApiRequest::HaNotify { state }, Duration::from_secs(5)).await;
}

async fn rfb_answers(port: u16) -> bool {
    let Ok(Ok(mut s)) = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(("127.0.0.1", port))).await
    else {
        return false;
    };
    let mut buf = [0u8; 12];
    matches!(tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut buf)).await, Ok(Ok(_)))
        && &buf[..4] == b"RFB "
}

async fn session_ids(m: &Master) -> Vec<SessionId> {
    match call(
        &m.target(),
        &ApiRequest::SessionList { selector: Selector::default(), refresh: false },
        Duration::from_secs(5),
    )
    .await
    {
        Ok(ApiReply::Sessions { sessions, .. }) => {
            let mut v: Vec<SessionId> = sessions.into_iter().map(|s| s.id).collect();
            v.sort();
            v
        }
        _ => vec![],
    }
}

async fn digest(m: &Master) -> Option<String> {
    ha_status(m).await.and_then(|s| s.db_digest)
}

pub async fn run(args: DemoArgs) -> ExitCode {
    match run_inner(args).await {
        Ok(0) => {
            crate::outln!("\nDemo finished: every check passed.");
            ExitCode::SUCCESS
        }
        Ok(n) => {
            crate::outln!("\nDemo finished: {n} check(s) FAILED.");
            ExitCode::from(1)
        }
        Err(e) => {
            crate::errln!("\ndemo: {e}");
            ExitCode::from(2)
        }
    }
}

async fn run_inner(args: DemoArgs) -> Result<usize, String> {
    let sync = match args.sync.as_str() {
        "ack" => SyncLevel::Ack,
        "async" => SyncLevel::Async,
        other => return Err(format!("--sync {other:?}: expected ack or async")),
    };
    let tmp;
    let base = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
            d.clone()
        }
        None => {
            tmp = tempfile::Builder::new().prefix("vsm-demo-").tempdir().map_err(|e| e.to_string())?;
            tmp.path().to_path_buf()
        }
    };
    let mut st = Step { n: 0, total: 9, failed: 0, started: Instant::now() };
    crate::outln!("vsm demo: two masters, two agents, one resource address, all on 127.0.0.1.");
    crate::outln!("Work directory: {}", base.display());

    for f in ["ha.key", "cluster.key"] {
        let mut key = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut key);
        testkit::write_secret(&base.join(f), &key).map_err(|e| e.to_string())?;
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot find my own executable: {e}"))?;
    let cancel = CancellationToken::new();

    // 1. Agents.
    st.title("Starting two agents (agent1, agent2); their desktops are a small VNC stand-in");
    let vip_listener = TcpListener::bind("127.0.0.1:0").await.map_err(|e| e.to_string())?;
    let vip_port = vip_listener.local_addr().map_err(|e| e.to_string())?.port();
    let mut agents = Vec::new();
    let mut running = Vec::new();
    for (i, name) in ["agent1", "agent2"].iter().enumerate() {
        let command = vec![exe.display().to_string(), "demo-session".into(), "--port".into(), "{port}".into()];
        let mut cfg = testkit::agent_config(&base, name, i as u32, vip_port, command);
        cfg.vsm.vnc_port_base = 24000;
        let l = bind_loopback(0).await.map_err(|e| e.to_string())?;
        let agent = LoopbackAgent::start(cfg, l, None, false).await.map_err(|e| e.to_string())?;
        let port = agent.port;
        running.push(agent);
        agents.push(format!("127.0.0.1:{port}"));
        st.say(&format!("{name} listens on 127.0.0.1:{port}"));
    }

    // 2. Masters.
    st.title(
        "Starting tlha-primary and tlha-secondary with HA (sync mode: {sync})".replace("{sync}", &args.sync).as_str(),
    );
    let mut prim = Master {
        name: "tlha-primary",
        dir: base.join("tlha-primary"),
        socket: base.join("tlha-primary/vsmserver.sock"),
        tcp_port: 0,
        peer_port: 0,
        server: None,
    };
    let mut sec = Master {
        name: "tlha-secondary",
        dir: base.join("tlha-secondary"),
        socket: base.join("tlha-secondary/vsmserver.sock"),
        tcp_port: 0,
        peer_port: 0,
        server: None,
    };
    // The secondary accepts the link, so it starts first and the primary learns its port.
    let c = demo_config(&base, sec.name, &agents, vip_port, sync);
    start_master(&mut sec, c, 1).await?;
    let c = demo_config(&base, prim.name, &agents, vip_port, sync);
    start_master(&mut prim, c, sec.peer_port).await?;
    let (active_tx, active_rx) = tokio::sync::watch::channel(prim.tcp_port);
    tokio::spawn(vip(vip_listener, active_rx, cancel.clone()));
    let ready = wait_until(Duration::from_secs(15), || async {
        let a = ha_status(&prim).await;
        let b = ha_status(&sec).await;
        matches!((a, b), (Some(a), Some(b)) if a.ready && b.ready && [a.link, b.link] == [crate::model::LinkState::Streaming; 2])
    })
    .await;
    st.check(ready, "both masters are ready and the peer link is streaming");
    notify(&prim, VrrpState::Master).await;
    notify(&sec, VrrpState::Backup).await;
    st.say("the resource address now leads to tlha-primary (keepalived would announce MASTER there)");

    // 3. Logins through the primary.
    st.title("alice, bob and carol log in through tlha-primary");
    let mut first = BTreeMap::new();
    for u in ["alice", "bob", "carol"] {
        match connect_as(&prim, u, false).await {
            Ok(i) => {
                st.say(&format!(
                    "{u}: new session {} on {} display :{} VNC port {}",
                    i.session_id, i.agent, i.display, i.vnc_port
                ));
                let ok = wait_until(Duration::from_secs(5), || rfb_answers(i.vnc_port)).await;
                st.check(ok, &format!("{u}'s desktop answers with an RFB greeting on port {}", i.vnc_port));
                first.insert(u, i);
            }
            Err(e) => {
                st.check(false, &format!("{u} logs in: {e}"));
            }
        }
    }

    // 4. Replicated.
    st.title("The secondary already holds every session");
    let p_ids = session_ids(&prim).await;
    let s_ids = session_ids(&sec).await;
    st.check(p_ids.len() == 3 && p_ids == s_ids, &format!("both masters list the same {} session(s)", p_ids.len()));

    // 5. Primary dies.
    st.title("tlha-primary dies; the resource address moves to tlha-secondary");
    if let Some(s) = prim.server.take() {
        s.kill().await;
    }
    active_tx.send_replace(sec.tcp_port);
    notify(&sec, VrrpState::Master).await;
    let down = wait_until(Duration::from_secs(5), || async {
        ha_status(&sec).await.map(|s| s.link == crate::model::LinkState::Down).unwrap_or(false)
    })
    .await;
    st.check(down, "tlha-secondary sees the peer link down and keeps serving");

    // 6. Reconnect through the secondary.
    st.title("alice and bob log in again, now through tlha-secondary");
    for u in ["alice", "bob"] {
        match connect_as(&sec, u, false).await {
            Ok(i) => {
                let before = &first[u];
                st.check(
                    i.reconnected
                        && i.session_id == before.session_id
                        && i.agent == before.agent
                        && i.display == before.display,
                    &format!("{u} is back in the same session {} ({} display :{})", i.session_id, i.agent, i.display),
                );
            }
            Err(e) => {
                st.check(false, &format!("{u} reconnects: {e}"));
            }
        }
    }

    // 7. New work while the primary is away.
    st.title("While tlha-primary is away: dave starts a session, carol's session is ended");
    match connect_as(&sec, "dave", false).await {
        Ok(i) => {
            st.check(
                !i.reconnected,
                &format!("dave: new session {} on {} display :{}", i.session_id, i.agent, i.display),
            );
        }
        Err(e) => {
            st.check(false, &format!("dave logs in: {e}"));
        }
    }
    let carol = first.get("carol").map(|i| i.session_id.clone());
    if let Some(id) = carol {
        let r = call(
            &sec.target(),
            &ApiRequest::TerminateMine { user: Some("carol".into()), session_id: id.clone() },
            Duration::from_secs(10),
        )
        .await;
        st.check(matches!(r, Ok(ApiReply::Terminated { .. })), &format!("carol's session {id} terminated"));
    }

    // 8. Primary returns empty.
    st.title("tlha-primary is reinstalled: it comes back with an EMPTY database and resynchronises");
    let _ = std::fs::remove_dir_all(prim.dir.join("data"));
    let t0 = Instant::now();
    let sec_peer = sec.peer_port;
    let c = demo_config(&base, prim.name, &agents, vip_port, sync);
    start_master(&mut prim, c, sec_peer).await?;
    let synced = wait_until(Duration::from_secs(15), || async {
        ha_status(&prim).await.map(|s| s.ready && s.link == crate::model::LinkState::Streaming).unwrap_or(false)
    })
    .await;
    st.check(synced, &format!("tlha-primary is ready after resync ({} ms)", t0.elapsed().as_millis()));
    if let Some(s) = ha_status(&prim).await {
        if let Some(r) = s.last_resync {
            st.say(&format!(
                "last resync: {} ({}), {} record(s) in {} ms",
                r.kind, r.direction, r.records, r.duration_ms
            ));
        }
    }
    notify(&sec, VrrpState::Backup).await;
    active_tx.send_replace(prim.tcp_port);
    notify(&prim, VrrpState::Master).await;
    st.say("the resource address moves back to tlha-primary");
    match connect_as(&prim, "alice", false).await {
        Ok(i) => {
            st.check(
                i.reconnected && i.session_id == first["alice"].session_id,
                "alice reconnects to her same session through tlha-primary",
            );
        }
        Err(e) => {
            st.check(false, &format!("alice reconnects: {e}"));
        }
    }

    // 9. Identical.
    st.title("Final check: both session databases are identical");
    let same = wait_until(Duration::from_secs(10), || async {
        let (a, b) = (digest(&prim).await, digest(&sec).await);
        a.is_some() && a == b
    })
    .await;
    let p_ids = session_ids(&prim).await;
    st.check(
        same,
        &format!("same content and versions on both masters ({} live session(s): alice, bob, dave)", p_ids.len()),
    );
    st.check(p_ids.len() == 3, "exactly three live sessions remain");

    if args.keep_running {
        crate::outln!("\nEverything keeps running. Try, in another terminal:");
        crate::outln!("  VSM_SOCKET={} cargo run --bin vsmclient -- connect", prim.socket.display());
        crate::outln!("  VSM_SOCKET={} cargo run --bin tlctl -- session list", prim.socket.display());
        crate::outln!("  VSM_SOCKET={} cargo run --bin tlctl -- ha status", sec.socket.display());
        crate::outln!("Press Ctrl-C to stop.");
        match crate::signals::shutdown_signal() {
            Ok(stop) => stop.await,
            Err(e) => crate::errln!("demo: cannot handle SIGTERM and SIGINT, stopping now: {e}"),
        }
    }
    // End every desktop the demo started, then stop the masters.
    let all =
        ApiRequest::SessionTerminate { selector: Selector::default(), all: true, allow_abandon: true, dry_run: false };
    if let Err(e) = call(&prim.target(), &all, Duration::from_secs(20)).await {
        crate::errln!("demo: could not end the demo sessions: {e}");
    }
    for m in [&mut prim, &mut sec] {
        if let Some(s) = m.server.take() {
            s.stop().await;
        }
    }
    cancel.cancel();
    for agent in running {
        if let Err(e) = agent.stop().await {
            crate::errln!("demo: agent stopped: {e}");
        }
    }
    Ok(st.failed)
}
