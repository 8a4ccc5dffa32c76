//! Two masters with HA in this process: a real peer link (Noise over TCP through a cuttable
//! proxy), real databases in temporary directories, agents on 127.0.0.1:0.
//!
//! Every multi-node test ends with `assert_converged` (most through
//! `TestPair::converge_and_stop`). Nothing sleeps to synchronise: every wait polls with a
//! deadline, and no test asserts on timing.
// `i` names a node: it indexes both the pair and `NODES`.
#![allow(clippy::needless_range_loop)]

mod common;

use common::*;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use vsm::db::Write;
use vsm::model::{LinkState, Readiness};
use vsm::model::{Session, SessionId};
use vsm::proto::api::{ApiErrorKind, ApiReply, ApiRequest, VrrpState};

const T: Duration = Duration::from_secs(20);

/// An agent name nobody answers on: sessions "on" it are stored through the admin API and
/// forgotten on termination.
const GHOST: &str = "127.0.0.1:1";

/// Bulk local writes straight into a node's database (volume for resync tests).
async fn bulk(m: &TestMaster, user: &str, n: usize) -> Vec<SessionId> {
    let mut ids = vec![];
    for chunk in 0..n.div_ceil(500) {
        let mut ws = vec![];
        for i in 0..500.min(n - chunk * 500) {
            let mut s = template(&format!("{user}{}", chunk * 500 + i));
            s.id = SessionId::generate();
            ids.push(s.id.clone());
            ws.push(Write::Upsert(s));
        }
        m.server().db.write_batch(ws).await.unwrap();
    }
    ids
}

fn template(user: &str) -> Session {
    Session {
        id: SessionId::generate(),
        user: user.into(),
        subcluster: "default".into(),
        agent: GHOST.into(),
        agent_address: "127.0.0.1".into(),
        display: 10,
        vnc_port: 5910,
        status: vsm::model::SessionStatus::Disconnected,
        created_ms: 1,
        last_connect_ms: 1,
        last_client_address: String::new(),
        pid: 1,
        command: vec![],
        geometry: "1024x768".into(),
        client_params: vec![],
    }
}

/// Every id in `ids` is a live session on `m`.
async fn has_all(m: &TestMaster, ids: &BTreeSet<SessionId>) -> Result<(), Vec<SessionId>> {
    let have = m.session_ids().await;
    let missing: Vec<SessionId> = ids.difference(&have).cloned().collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(missing)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acked_session_is_on_the_peer_when_the_client_is_answered() {
    init_logging();
    let d = cluster_dir();
    let agent = TestAgent::start(d.path(), 0, 1, sleep_command()).await;
    let p = TestPair::start(d.path(), std::slice::from_ref(&agent.name), |_, _| {}).await;
    assert!(p.wait_streaming().await, "the pair comes up");

    // Through a: no waiting before looking at b.
    let alice = p.a().connect("alice", false).await.unwrap();
    let on_b = p.b().server().db.get(&alice.session_id).await.unwrap();
    let on_a = p.a().server().db.get(&alice.session_id).await.unwrap();
    assert!(on_b.is_some(), "b has alice's session as soon as a answered");
    assert_eq!(on_a, on_b);

    // Through b, and a reconnect through b is on a at once too.
    let bob = p.b().connect("bob", false).await.unwrap();
    assert!(p.a().server().db.get(&bob.session_id).await.unwrap().is_some(), "a has bob's session");
    let again = p.b().connect("alice", false).await.unwrap();
    assert!(again.reconnected);
    assert_eq!(again.session_id, alice.session_id);
    let ra = p.a().server().db.record(&alice.session_id).await.unwrap().unwrap();
    let rb = p.b().server().db.record(&alice.session_id).await.unwrap().unwrap();
    assert_eq!(ra, rb, "a has b's reconnect (same version) as soon as b answered");
    assert_eq!(ra.version.node.0, "b");

    // The admin put path, both ways.
    let s = p.a().put_session("carol", GHOST).await;
    assert_eq!(p.b().server().db.get(&s.id).await.unwrap().as_ref(), Some(&s));
    let s = p.b().put_session("dave", GHOST).await;
    assert_eq!(p.a().server().db.get(&s.id).await.unwrap().as_ref(), Some(&s));

    p.converge_and_stop().await;
    agent.stop().await;
}

/// Waits until `m` has a link again; with a large backlog it is then catching up.
async fn link_up(m: &TestMaster) -> bool {
    wait_until(T, || async { m.ha_status().await.link != LinkState::Down }).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_at_every_step_of_resync_lose_nothing_acked() {
    init_logging();
    let d = cluster_dir();
    let mut p = TestPair::start(d.path(), &[], |_, _| {}).await;
    assert!(p.wait_streaming().await);
    let mut acked = BTreeSet::new();
    for i in 0..4 {
        acked.insert(p.node(i % 2).put_session(&format!("acked{i}"), GHOST).await.id);
    }

    // Restart the receiver and the sender at each step of b's catch-up of a large backlog.
    // step 0: before the link is up; 1: while catching up; 2: after.
    for (round, victim) in [(0usize, 1usize), (1, 1), (2, 1), (0, 0), (1, 0), (2, 0)] {
        p.stop_node(1).await;
        bulk(p.a(), &format!("r{round}v{victim}u"), 2500).await;
        p.start_node(1).await;
        match round {
            0 => {}
            1 => {
                // Usually in the middle of the catch-up; if it was quicker, this is one more
                // restart right after it.
                assert!(link_up(p.b()).await, "b links up");
            }
            _ => assert!(p.wait_streaming().await, "caught up before the restart"),
        }
        p.restart(victim, false).await;
        assert!(p.wait_streaming().await, "resync completes after restarting {}", NODES[victim]);
        // Its own database survived, so it catches up from the peer's change log.
        let r = p.node(victim).ha_status().await.last_resync_received.expect("a resync was received");
        assert_eq!(r.kind, "incremental", "{} restarted with its data: {r:?}", NODES[victim]);
        // New acknowledged writes on both sides once streaming again.
        for i in 0..2 {
            let s = p.node(i).put_session(&format!("acked-{round}-{victim}-{i}"), GHOST).await;
            assert!(p.node(1 - i).server().db.get(&s.id).await.unwrap().is_some(), "acked write on the peer");
            acked.insert(s.id);
        }
        for i in 0..2 {
            if let Err(missing) = has_all(p.node(i), &acked).await {
                panic!("{} lost acknowledged sessions: {missing:?}", NODES[i]);
            }
        }
    }
    p.converge_and_stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_back_with_an_empty_database_is_ready_only_with_everything() {
    init_logging();
    let d = cluster_dir();
    let mut p = TestPair::start(d.path(), &[], |_, _| {}).await;
    assert!(p.wait_streaming().await);
    let mut acked = BTreeSet::new();
    for i in 0..6 {
        acked.insert(p.node(i % 2).put_session(&format!("u{i}"), GHOST).await.id);
    }
    // The primary dies; the secondary goes on alone with a large backlog.
    p.kill_node(0).await;
    acked.insert(p.b().put_session("while-away", GHOST).await.id);
    bulk(p.b(), "bulk", 6000).await;
    let on_b = p.b().session_ids().await;
    assert!(on_b.is_superset(&acked));

    // Reinstalled: empty database.
    p.wipe(0);
    p.start_node(0).await;
    let first = p.a().ha_check().await;
    assert!(matches!(first, Err((ApiErrorKind::NotReady, _))), "not ready right after start: {first:?}");
    let done = wait_until(CONVERGE, || async {
        let ready = p.a().ha_check().await.is_ok();
        if ready {
            let st = p.a().ha_status().await;
            let have = p.a().session_ids().await;
            let missing = on_b.difference(&have).count();
            assert_eq!(missing, 0, "a reports ready while {missing} of the peer's sessions are missing ({st:?})");
            st.link == LinkState::Streaming
        } else {
            false
        }
    })
    .await;
    assert!(done, "a became ready and streaming");
    let st = p.a().ha_status().await;
    let r = st.last_resync_received.expect("a resync was received");
    assert_eq!(r.kind, "snapshot_file", "an empty database gets a full snapshot as a file: {r:?}");
    p.converge_and_stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_secondary_gets_everything_a_lone_master_has() {
    init_logging();
    let d = cluster_dir();
    let mut p = TestPair::new(d.path(), &[], |_, c| c.ha.startup_grace = Duration::from_millis(300)).await;
    // First the primary runs without HA at all...
    let ha = p.cfg[0].ha.clone();
    p.cfg[0].ha.enabled = false;
    p.start_node(0).await;
    let mut before = BTreeSet::new();
    for i in 0..3 {
        before.insert(p.a().put_session(&format!("noha{i}"), GHOST).await.id);
    }
    p.stop_node(0).await;
    // ...then with HA, the peer not there: ready after the start-up grace.
    p.cfg[0].ha = ha;
    p.start_node(0).await;
    assert!(wait_until(T, || async { p.a().ha_check().await.is_ok() }).await, "ready by start-up grace");
    for i in 0..3 {
        before.insert(p.a().put_session(&format!("alone{i}"), GHOST).await.id);
    }
    bulk(p.a(), "bulk", 3000).await;
    let all = p.a().session_ids().await;
    assert!(all.is_superset(&before));

    // The secondary joins, fresh. Whenever it says ready, it has everything.
    p.start_node(1).await;
    let ok = wait_until(CONVERGE, || async {
        let st = p.b().ha_status().await;
        if st.ready && st.link != LinkState::Down {
            let missing = all.difference(&p.b().session_ids().await).count();
            assert_eq!(missing, 0, "b ready while missing {missing} sessions");
        }
        st.ready && st.link == LinkState::Streaming
    })
    .await;
    assert!(ok, "b caught up");
    assert!(has_all(p.b(), &all).await.is_ok());
    // Both halves of the resync are counted, each on its side, with a duration.
    let (a, b) = (p.a().scrape().await, p.b().scrape().await);
    assert!(b.sum("vsm_ha_resyncs_total", "direction=\"received\"") >= 1.0, "{:?}", b.samples);
    assert!(a.sum("vsm_ha_resyncs_total", "direction=\"sent\"") >= 1.0, "{:?}", a.samples);
    assert!(b.sum("vsm_ha_resync_duration_seconds_count", "direction=\"received\"") >= 1.0);
    assert_eq!(b.value("vsm_ha_link_up"), 1.0);
    assert_eq!(b.value("vsm_ha_enabled"), 1.0);
    assert_eq!(b.value("vsm_ha_applied_of_peer"), a.value("vsm_ha_local_head"));
    p.converge_and_stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_on_both_sides_of_a_partition_converge_to_one_winner() {
    init_logging();
    let d = cluster_dir();
    let agent = TestAgent::start(d.path(), 0, 1, sleep_command()).await;
    let p = TestPair::start(d.path(), std::slice::from_ref(&agent.name), |_, _| {}).await;
    assert!(p.wait_streaming().await);
    let mut first = BTreeMap::new();
    for u in ["alice", "bob", "carol", "dave", "helen"] {
        first.insert(u, p.a().connect(u, false).await.unwrap());
    }
    let ghost = p.a().put_session("ghost", GHOST).await;

    p.cut();
    for i in 0..2 {
        assert!(wait_until(T, || async { p.node(i).ha_status().await.link == LinkState::Down }).await);
    }
    // a: ends alice's session, reconnects bob, creates erin.
    let r = p
        .a()
        .call(ApiRequest::TerminateMine { user: Some("alice".into()), session_id: first["alice"].session_id.clone() })
        .await;
    assert!(matches!(r, ApiReply::Terminated { .. }), "{r:?}");
    assert!(p.a().connect("bob", false).await.unwrap().reconnected);
    let erin = p.a().connect("erin", false).await.unwrap();
    // b: reconnects bob too (same session changed on both sides), reconnects carol, creates
    // frank, forgets the ghost session; a changes the ghost session concurrently.
    assert!(p.b().connect("bob", false).await.unwrap().reconnected);
    assert!(p.b().connect("carol", false).await.unwrap().reconnected);
    let frank = p.b().connect("frank", false).await.unwrap();
    let mut g = ghost.clone();
    g.last_client_address = "10.0.0.1".into();
    let r = p.a().call(ApiRequest::SessionPut { session: g }).await;
    assert!(matches!(r, ApiReply::Ok { .. }), "{r:?}");
    assert!(matches!(p.b().terminate_user("ghost").await, ApiReply::Terminated { .. }));
    // dave: ended on b, reconnected on a before (the agent still ran it then).
    assert!(p.a().connect("dave", false).await.unwrap().reconnected);
    let r = p
        .b()
        .call(ApiRequest::TerminateMine { user: Some("dave".into()), session_id: first["dave"].session_id.clone() })
        .await;
    assert!(matches!(r, ApiReply::Terminated { .. }), "{r:?}");

    // helen: ended on a, then changed on b by an admin afterwards (a newer version): the
    // end holds whatever the versions say.
    let r = p
        .a()
        .call(ApiRequest::TerminateMine { user: Some("helen".into()), session_id: first["helen"].session_id.clone() })
        .await;
    assert!(matches!(r, ApiReply::Terminated { .. }), "{r:?}");
    let mut h =
        p.b().server().db.get(&first["helen"].session_id).await.unwrap().expect("b still lists helen's session");
    h.last_client_address = "10.0.0.2".into();
    let r = p.b().call(ApiRequest::SessionPut { session: h }).await;
    assert!(matches!(r, ApiReply::Ok { .. }), "{r:?}");

    // Expected: the higher version of each side's record, except where that is a live record
    // and the other side ended the session: then the end is written again above both.
    let mut expect = BTreeMap::new();
    for id in [
        &first["bob"].session_id,
        &ghost.id,
        &first["dave"].session_id,
        &first["alice"].session_id,
        &first["helen"].session_id,
    ] {
        let ra = p.a().server().db.record(id).await.unwrap().unwrap();
        let rb = p.b().server().db.record(id).await.unwrap().unwrap();
        assert_ne!(ra.version, rb.version, "both sides changed {id}");
        let (newer, older) = if ra.version > rb.version { (ra, rb) } else { (rb, ra) };
        let want = if newer.session.is_some() && older.session.is_none() { Err(newer.version) } else { Ok(newer) };
        expect.insert(id.clone(), want);
    }
    assert!(expect[&first["helen"].session_id].is_err(), "helen's end is older than b's change");

    p.heal();
    assert!(p.wait_streaming().await, "the link comes back");
    p.assert_converged().await;
    // Why the link dropped stays visible once it is back.
    for i in 0..2 {
        let drop = p.node(i).ha_status().await.last_link_drop.expect("the cut is shown as a link drop");
        assert!(drop.drops >= 1 && !drop.reason.is_empty(), "{drop:?}");
    }
    for (id, want) in &expect {
        for i in 0..2 {
            let got = p.node(i).server().db.record(id).await.unwrap().unwrap();
            match want {
                Ok(want) => assert_eq!(&got, want, "{} holds the winner for {id}", NODES[i]),
                Err(change) => assert!(
                    got.session.is_none() && &got.version > change,
                    "{} holds the end of {id} written again above {change}: {got:?}",
                    NODES[i]
                ),
            }
        }
    }
    let live = p.a().session_ids().await;
    assert!(live.contains(&erin.session_id) && live.contains(&frank.session_id));
    assert!(live.contains(&first["carol"].session_id));
    assert!(!live.contains(&first["alice"].session_id), "alice's session was only ended, never changed elsewhere");
    assert!(!live.contains(&first["helen"].session_id), "helen's session stays ended");
    p.stop().await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_with_the_wrong_secret_is_rejected_and_nothing_it_sent_is_applied() {
    init_logging();
    let d = cluster_dir();
    let other = d.path().join("other-ha.key");
    write_secret(&other, b"another secret");
    let mut p = TestPair::new(d.path(), &[], |i, c| {
        c.ha.startup_grace = Duration::from_millis(200);
        if i == 1 {
            c.ha.secret_file = other.clone();
        }
    })
    .await;
    p.start_node(1).await;
    assert!(wait_until(T, || async { p.b().ha_check().await.is_ok() }).await);
    let theirs = p.b().put_session("intruder", GHOST).await;
    p.start_node(0).await;
    let mine = p.a().put_session("local", GHOST).await;
    // a keeps dialing and is turned away each time; both stay apart meanwhile.
    let seen = p.proxy.accepted();
    let tried = wait_until(T, || async {
        for i in 0..2 {
            let st = p.node(i).ha_status().await;
            assert_eq!(st.link, LinkState::Down, "{} never gets a link: {st:?}", NODES[i]);
        }
        assert!(p.a().server().db.record(&theirs.id).await.unwrap().is_none(), "nothing of b reaches a");
        assert!(p.b().server().db.record(&mine.id).await.unwrap().is_none(), "nothing of a reaches b");
        p.proxy.accepted() >= seen + 3
    })
    .await;
    assert!(tried, "a tried to connect several times");
    for i in 0..2 {
        let st = p.node(i).ha_status().await;
        let why = st.link_error.clone().unwrap_or_default();
        assert!(why.contains("secret"), "{}'s status says why the link is down: {st:?}", NODES[i]);
    }
    // With the right secret they converge.
    p.stop_node(1).await;
    p.cfg[1].ha.secret_file = p.cfg[0].ha.secret_file.clone();
    p.start_node(1).await;
    assert!(p.wait_streaming().await);
    p.assert_converged().await;
    for i in 0..2 {
        assert!(p.node(i).ha_status().await.link_error.is_none(), "the error clears once linked");
    }
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_different_subcluster_configuration_is_flagged_on_both_nodes() {
    init_logging();
    let d = cluster_dir();
    let p = TestPair::start(d.path(), &[], |i, c| {
        if i == 1 {
            let mut extra = c.subclusters["default"].clone();
            extra.name = "extra".into();
            extra.users = vec!["someone".into()];
            c.subclusters.insert("extra".into(), extra);
        }
    })
    .await;
    let flagged = wait_until(T, || async {
        p.a().ha_status().await.config_digest_match == Some(false)
            && p.b().ha_status().await.config_digest_match == Some(false)
    })
    .await;
    assert!(flagged, "both nodes show the mismatch");
    // Replication itself goes on.
    p.a().put_session("x", GHOST).await;
    p.converge_and_stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_peer_down_ack_answers_degraded_until_the_peer_is_back() {
    init_logging();
    let d = cluster_dir();
    let mut p = TestPair::start(d.path(), &[], |_, _| {}).await;
    assert!(p.wait_streaming().await);
    let before = p.a().put_session("before", GHOST).await;
    assert!(!p.a().ha_status().await.degraded);
    p.stop_node(1).await;
    assert!(wait_until(T, || async { p.a().ha_status().await.link == LinkState::Down }).await);
    let during = p.a().put_session("during", GHOST).await;
    let st = p.a().ha_status().await;
    assert!(st.degraded, "answered without the peer: degraded ({st:?})");
    assert!(st.degraded_reason.is_some());
    p.start_node(1).await;
    let cleared = wait_until(CONVERGE, || async {
        let st = p.a().ha_status().await;
        !st.degraded && st.link == LinkState::Streaming
    })
    .await;
    assert!(cleared, "degraded clears once the peer caught up: {:?}", p.a().ha_status().await);
    assert!(has_all(p.b(), &[before.id, during.id].into_iter().collect()).await.is_ok());
    p.converge_and_stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_ha_nodes_start_the_server_without_ha() {
    init_logging();
    let d = cluster_dir();
    let mut cfg = ha_config(d.path(), 0, &[]);
    cfg.ha.nodes = vec!["a".into(), "b".into(), "c".into()];
    let mut m = TestMaster::standalone(cfg).await;
    let st = m.ha_status().await;
    assert!(st.configured);
    assert!(!st.enabled, "{st:?}");
    let why = st.ha_off_reason.clone().unwrap_or_default();
    assert!(why.contains("exactly two") && why.contains("'c'"), "reason explains: {why}");
    // Configured but off is its own state, not ready, and every tool says why.
    assert_eq!(st.readiness, Readiness::HaConfiguredOff);
    assert!(!st.ready);
    assert!(st.reason.contains("configured") && st.reason.contains(&why), "{}", st.reason);
    match m.ha_check().await {
        Err((ApiErrorKind::NotReady, msg)) => assert!(msg.contains(&why), "the check names the cause: {msg}"),
        other => panic!("ha check must fail with HA configured but off: {other:?}"),
    }
    // Nothing is written from its own database; waiting cannot help, so no waiting.
    let started = std::time::Instant::now();
    let r = m.call(ApiRequest::SessionPut { session: template("solo") }).await;
    match r {
        ApiReply::Error { kind: ApiErrorKind::NotReady, message } => assert!(message.contains(&why), "{message}"),
        other => panic!("a write on a node with HA configured but off: {other:?}"),
    }
    assert!(started.elapsed() < m.cfg.ha.ready_wait * 10, "refused at once");
    // Read-only views answer, marked as possibly stale.
    match m.call(ApiRequest::SessionList { selector: Default::default(), refresh: false }).await {
        ApiReply::Sessions { sessions, possibly_stale } => {
            assert!(sessions.is_empty());
            assert!(possibly_stale.is_some_and(|w| w.contains(&why)));
        }
        other => panic!("{other:?}"),
    }
    let scrape = m.scrape().await;
    assert_eq!(scrape.value("vsm_ha_configured"), 1.0);
    assert_eq!(scrape.value("vsm_ha_enabled"), 0.0);
    assert_eq!(scrape.value("vsm_ha_configured_but_off"), 1.0);
    assert_eq!(scrape.value("vsm_ready"), 0.0);
    m.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deliberate_single_master_is_ready() {
    init_logging();
    let d = cluster_dir();
    let mut cfg = ha_config(d.path(), 0, &[]);
    cfg.ha.enabled = false;
    let mut m = TestMaster::standalone(cfg).await;
    let st = m.ha_status().await;
    assert_eq!((st.readiness, st.ready), (Readiness::Standalone, true));
    assert_eq!(m.ha_check().await, Ok(()));
    let s = m.put_session("solo", GHOST).await;
    assert!(m.server().db.get(&s.id).await.unwrap().is_some());
    let scrape = m.scrape().await;
    assert_eq!(scrape.value("vsm_ha_configured"), 0.0);
    assert_eq!(scrape.value("vsm_ha_enabled"), 0.0);
    assert_eq!(scrape.value("vsm_ha_configured_but_off"), 0.0);
    assert_eq!(scrape.value("vsm_ready"), 1.0);
    m.stop().await;
}

/// The login of a user through a master that came back with an empty database while its peer
/// was unreachable (a reinstalled primary that got the resource IP at once, as with a
/// keepalived file without health check): refused, never a second desktop; once resynchronised
/// the user gets the desktop created on the peer meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_that_is_not_ready_refuses_logins_and_writes_then_serves_the_peers_session() {
    init_logging();
    let d = cluster_dir();
    let agent = TestAgent::start(d.path(), 0, 1, sleep_command()).await;
    let mut p = TestPair::start(d.path(), std::slice::from_ref(&agent.name), |_, _| {}).await;
    assert!(p.wait_streaming().await);
    // The primary goes away; alice gets her desktop from the secondary.
    p.kill_node(0).await;
    let alice = p.b().connect("alice", false).await.unwrap();
    assert!(!alice.reconnected);
    // Reinstalled, and back while the peer cannot be reached.
    p.wipe(0);
    p.cut();
    p.start_node(0).await;
    let st = p.a().ha_status().await;
    assert_eq!(st.readiness, Readiness::WaitingForPeer, "{st:?}");
    assert!(!st.reason.contains("resynchronising"), "the link is down: {}", st.reason);
    assert!(st.grace_left_ms.is_some());
    let api =
        vsm::api::Api::new(p.a().server().broker.clone(), p.a().server().ha.clone(), p.a().server().metrics.clone());
    let me = vsm::api::Caller::Local { uid: 0, user: "root".into(), admin: true };
    let (login, put, terminate) = tokio::join!(
        api.handle(
            &me,
            ApiRequest::Connect {
                user: Some("alice".into()),
                new: false,
                terminate_existing: false,
                geometry: None,
                client_address: None,
            }
        ),
        api.handle(&me, ApiRequest::SessionPut { session: template("bob") }),
        api.handle(&me, ApiRequest::TerminateMine { user: Some("alice".into()), session_id: alice.session_id.clone() }),
    );
    for (what, r) in [("login", login), ("put", put), ("terminate", terminate)] {
        match r {
            ApiReply::Error { kind: ApiErrorKind::NotReady, message } => {
                assert!(message.contains("try again"), "{what}: {message}")
            }
            other => panic!("{what} on a master that is not ready: {other:?}"),
        }
    }
    assert!(p.a().session_ids().await.is_empty(), "nothing written");
    assert_eq!(api.metrics.requests_refused_not_ready.get(), 3);
    let metrics = vsm::api::http::metrics(&api, vsm::metrics::Format::Prometheus).await;
    assert!(metrics.contains("vsm_requests_refused_not_ready_total 3"), "{metrics}");
    assert!(metrics.contains("vsm_readiness{state=\"waiting_for_peer\"} 1"), "{metrics}");
    // Reading still works, marked as possibly stale.
    match api.handle(&me, ApiRequest::MySessions { user: Some("alice".into()) }).await {
        ApiReply::Sessions { sessions, possibly_stale } => {
            assert!(sessions.is_empty());
            assert!(possibly_stale.is_some());
        }
        other => panic!("{other:?}"),
    }
    // The peer is back: the next login waits for the resync if needed and reconnects.
    p.heal();
    let again = p.a().connect("alice", false).await;
    let again = match again {
        Ok(i) => i,
        // The resync took longer than /HA/ready_wait on a loaded machine: still no desktop.
        Err((ApiErrorKind::NotReady, _)) => {
            assert!(wait_until(T, || async { p.a().ha_check().await.is_ok() }).await, "a catches up");
            p.a().connect("alice", false).await.unwrap()
        }
        Err(e) => panic!("login after the peer is back: {e:?}"),
    };
    assert!(again.reconnected, "{again:?}");
    assert_eq!(again.session_id, alice.session_id);
    assert!(p.wait_streaming().await);
    p.assert_converged().await;
    let only_alice = vsm::db::SessionFilter { user: Some("alice".into()), ..Default::default() };
    assert_eq!(p.a().server().db.list(&only_alice).await.unwrap().len(), 1, "one desktop for alice");
    p.stop().await;
    agent.stop().await;
}

mod random_operations {
    //! Random operations on real nodes: the model tracks which sessions must survive (the
    //! peer had them when the client was answered, or both nodes had them at a convergence
    //! point) and on which nodes they are durably stored, so a wiped node only loses what it
    //! alone held.
    use super::*;
    use proptest::prelude::*;

    #[derive(Clone, Debug)]
    enum Op {
        Create(usize),
        /// Change a session the node holds (a reconnect), picked by index (modulo the count).
        Update(usize, usize),
        Terminate(usize, usize),
        /// Many local writes at once (not acknowledged to anyone): longer catch-ups.
        Bulk(usize),
        Cut,
        Heal,
        Restart {
            node: usize,
            wipe: bool,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..2usize).prop_map(Op::Create),
            1 => (0..2usize, any::<usize>()).prop_map(|(n, i)| Op::Update(n, i)),
            2 => (0..2usize, any::<usize>()).prop_map(|(n, i)| Op::Terminate(n, i)),
            1 => (0..2usize).prop_map(Op::Bulk),
            1 => Just(Op::Cut),
            1 => Just(Op::Heal),
            1 => (0..2usize, any::<bool>()).prop_map(|(node, wipe)| Op::Restart { node, wipe }),
        ]
    }

    /// Sessions that must survive, with the nodes that durably hold them.
    type Required = BTreeMap<SessionId, BTreeSet<usize>>;

    /// A write refused because the node was not ready (restarted while cut off, or still
    /// catching up after `/HA/ready_wait`): nothing of it may be stored.
    async fn refused_not_ready(_m: &TestMaster, r: &ApiReply) -> bool {
        matches!(r, ApiReply::Error { kind: ApiErrorKind::NotReady, .. })
    }

    async fn converge_point(p: &TestPair, required: &mut Required) {
        p.heal();
        assert!(p.wait_streaming().await, "the link comes back after healing");
        p.assert_converged().await;
        for i in 0..2 {
            if let Err(missing) = has_all(p.node(i), &required.keys().cloned().collect()).await {
                panic!("{} lost sessions that had to survive: {missing:?}", NODES[i]);
            }
        }
        for holders in required.values_mut() {
            *holders = [0, 1].into();
        }
    }

    async fn run(ops: Vec<Op>) {
        let d = cluster_dir();
        let mut p = TestPair::start(d.path(), &[], |_, _| {}).await;
        assert!(p.wait_streaming().await);
        let mut required = Required::new();
        let mut n = 0;
        for op in ops {
            match op {
                Op::Create(i) => {
                    n += 1;
                    let s = template(&format!("user{n}"));
                    let r = p.node(i).call(ApiRequest::SessionPut { session: s.clone() }).await;
                    if refused_not_ready(p.node(i), &r).await {
                        assert!(p.node(i).server().db.get(&s.id).await.unwrap().is_none(), "refused but stored");
                        continue;
                    }
                    assert!(matches!(r, ApiReply::Ok { .. }), "{r:?}");
                    // Answered in `ack` mode: either the peer has it, or the node says it went
                    // on alone (degraded).
                    let degraded = p.node(i).ha_status().await.degraded;
                    let on_peer = p.node(1 - i).server().db.get(&s.id).await.unwrap().is_some();
                    assert!(on_peer || degraded, "answered without the peer's ack and not degraded");
                    if on_peer {
                        required.insert(s.id, [0, 1].into());
                    }
                }
                Op::Update(i, idx) => {
                    let live = p.node(i).server().db.list(&Default::default()).await.unwrap();
                    if live.is_empty() {
                        continue;
                    }
                    let mut s = live[idx % live.len()].clone();
                    s.last_connect_ms = vsm::model::now_ms();
                    s.last_client_address = format!("10.0.0.{i}");
                    let r = p.node(i).call(ApiRequest::SessionPut { session: s }).await;
                    assert!(matches!(r, ApiReply::Ok { .. }) || refused_not_ready(p.node(i), &r).await, "{r:?}");
                }
                Op::Terminate(i, idx) => {
                    let live = p.node(i).server().db.list(&Default::default()).await.unwrap();
                    if live.is_empty() {
                        continue;
                    }
                    let s = &live[idx % live.len()];
                    let r = p.node(i).terminate_user(&s.user).await;
                    if refused_not_ready(p.node(i), &r).await {
                        continue;
                    }
                    assert!(matches!(r, ApiReply::Terminated { .. }), "{r:?}");
                    required.remove(&s.id);
                }
                Op::Bulk(i) => {
                    n += 1;
                    bulk(p.node(i), &format!("bulk{n}-"), 500).await;
                }
                Op::Cut => p.cut(),
                Op::Heal => converge_point(&p, &mut required).await,
                Op::Restart { node, wipe } => {
                    p.restart(node, wipe).await;
                    if wipe {
                        // What only this node held is gone with it: two failures, not one.
                        required.retain(|_, holders| {
                            holders.remove(&node);
                            !holders.is_empty()
                        });
                    }
                }
            }
        }
        converge_point(&p, &mut required).await;
        p.stop().await;
    }

    /// A sequence that once left a session on b alone: a session acknowledged by b, a wiped
    /// restart of a (which resynchronises from b), terminations on a, many local writes, a
    /// cut and an update while cut off.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn terminate_after_a_wiped_restart_reaches_the_peer() {
        init_logging();
        for _ in 0..3 {
            run(vec![
                Op::Create(0),
                Op::Restart { node: 0, wipe: true },
                Op::Terminate(0, 0),
                Op::Terminate(0, 1),
                Op::Bulk(0),
                Op::Cut,
                Op::Update(0, 7),
            ])
            .await;
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 12,
            max_shrink_iters: 8,
            failure_persistence: None,
            ..ProptestConfig::default()
        })]
        #[test]
        fn random_operations_converge_and_keep_acknowledged_sessions(ops in prop::collection::vec(op(), 6..20)) {
            init_logging();
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            rt.block_on(run(ops));
        }
    }
}

/// Reads one reply frame from a raw Unix-socket connection; `None` when none comes within
/// `wait`.
async fn raw_reply(s: &mut tokio::net::UnixStream, wait: Duration) -> Option<ApiReply> {
    use tokio::io::AsyncReadExt;
    let read = async {
        let mut len = [0u8; 4];
        s.read_exact(&mut len).await.ok()?;
        let mut reply = vec![0u8; u32::from_be_bytes(len) as usize];
        s.read_exact(&mut reply).await.ok()?;
        serde_json::from_slice(&reply).ok()
    };
    tokio::time::timeout(wait, read).await.ok().flatten()
}

/// Does the server close `s` (within the test deadline)?
async fn closed_by_server(s: &mut tokio::net::UnixStream) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match tokio::time::timeout(T, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

fn connect_req(client_address: &str) -> ApiRequest {
    ApiRequest::Connect {
        user: Some("mallory".into()),
        new: false,
        terminate_existing: false,
        geometry: None,
        client_address: Some(client_address.into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_user_cannot_degrade_replication_grow_memory_or_hold_connections() {
    use tokio::io::AsyncWriteExt;
    init_logging();
    let d = cluster_dir();
    let agent = TestAgent::start(d.path(), 0, 1, sleep_command()).await;
    // a: a small connection cap; b: a short idle timeout.
    let p = TestPair::start(d.path(), std::slice::from_ref(&agent.name), |i, c| {
        if i == 0 {
            // Unless the tests run as root, the caller is an ordinary user on a.
            c.vsmserver.admin_group = None;
            c.vsmserver.max_connections = 8;
            c.vsmserver.max_connections_per_user = 4;
        } else {
            c.vsmserver.idle_timeout = Duration::from_millis(300);
        }
    })
    .await;
    assert!(p.wait_streaming().await);
    let sock = |i: usize| p.node(i).cfg.vsmserver.socket_path.clone();

    // Oversized and hostile client addresses are refused at the API with a clear error.
    for (addr, want) in [("x".repeat(300), "bad client address"), ("$(id)".to_string(), "bad client address")] {
        match p.a().call(connect_req(&addr)).await {
            ApiReply::Error { kind: ApiErrorKind::BadRequest, message } => {
                assert!(message.contains(want) && message.contains("host name"), "{message}")
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
    // A request frame of 16 MiB is refused from its header: the daemon reads none of it.
    let mut s = tokio::net::UnixStream::connect(sock(0)).await.unwrap();
    s.write_all(&(16u32 << 20).to_be_bytes()).await.unwrap();
    match raw_reply(&mut s, T).await {
        Some(ApiReply::Error { kind: ApiErrorKind::BadRequest, message }) => {
            assert!(message.contains("16777216 bytes is larger than the maximum of"), "{message}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(closed_by_server(&mut s).await);
    // The client library refuses to send what the daemon would refuse.
    let huge = connect_req(&"y".repeat(vsm::proto::api::MAX_REQUEST));
    let r = vsm::client::call(&p.a().target(), &huge, T).await;
    assert!(r.is_err_and(|e| e.to_string().contains("larger than the maximum")));

    // Connections over the cap are closed at once; the slots come back when clients leave.
    let mut idle = vec![];
    for _ in 0..8 {
        idle.push(tokio::net::UnixStream::connect(sock(0)).await.unwrap());
    }
    let mut extra = tokio::net::UnixStream::connect(sock(0)).await.unwrap();
    assert!(closed_by_server(&mut extra).await, "a ninth connection is closed");
    drop(idle);
    assert!(
        wait_until(T, || async { vsm::client::call(&p.a().target(), &ApiRequest::HaStatus, T).await.is_ok() }).await
    );

    // One user cannot take every slot (root is exempt, as an admin).
    if !nix::unistd::getuid().is_root() {
        let mut mine = vec![];
        for _ in 0..4 {
            let mut s = tokio::net::UnixStream::connect(sock(0)).await.unwrap();
            s.write_all(&[0]).await.unwrap(); // half a header: identified, then waiting
            mine.push(s);
        }
        assert!(
            wait_until(T, || async {
                let mut s = tokio::net::UnixStream::connect(sock(0)).await.unwrap();
                matches!(raw_reply(&mut s, Duration::from_millis(500)).await,
                Some(ApiReply::Error { kind: ApiErrorKind::NotAllowed, message })
                if message.contains("max_connections_per_user"))
            })
            .await
        );
        drop(mine);
    }

    // Idle connections, and a request that never completes, are closed by the idle timeout.
    let mut quiet = tokio::net::UnixStream::connect(sock(1)).await.unwrap();
    let mut dribble = tokio::net::UnixStream::connect(sock(1)).await.unwrap();
    dribble.write_all(&[0, 0, 0, 40, b'{']).await.unwrap();
    assert!(closed_by_server(&mut quiet).await, "an idle connection is closed");
    assert!(closed_by_server(&mut dribble).await, "an unfinished request is closed");

    // Replication never noticed: sessions flow both ways, the link never dropped.
    let s = p.b().put_session("after", GHOST).await;
    assert_eq!(p.a().server().db.get(&s.id).await.unwrap().as_ref(), Some(&s));
    p.b().connect("mallory", false).await.unwrap();
    for i in 0..2 {
        let st = p.node(i).ha_status().await;
        assert!(st.link == LinkState::Streaming && !st.degraded && st.last_link_drop.is_none(), "{st:?}");
    }
    p.converge_and_stop().await;
    agent.stop().await;
}

/// Clients of node `i` waiting for the peer's acknowledgement.
fn waiters(m: &TestMaster) -> usize {
    m.server().ha.replication_status().map(|s| s.waiters).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_made_active_stops_waiting_for_a_silent_peer() {
    init_logging();
    let d = cluster_dir();
    // Timeouts far beyond the test's deadline: only the notification can answer b's clients.
    let p = TestPair::start(d.path(), &[], |_, c| {
        c.ha.sync_timeout = Duration::from_secs(600);
        c.ha.peer_timeout = Duration::from_secs(600);
    })
    .await;
    assert!(p.wait_streaming().await);
    let before = p.b().put_session("before", GHOST).await;

    // a's cable is pulled: the link stays open but nothing gets through. b's write waits for
    // an acknowledgement that never comes, until the HA manager makes b active.
    p.stall();
    let during = async { p.b().put_session("during", GHOST).await };
    let promote = async {
        assert!(wait_until(T, || async { waiters(p.b()) == 1 }).await, "b's client waits for a");
        p.b().call(ApiRequest::HaNotify { state: VrrpState::Master }).await
    };
    let (during, r) = tokio::time::timeout(T, async { tokio::join!(during, promote) })
        .await
        .expect("b answers its waiting client once it is made active");
    assert!(matches!(r, ApiReply::Ok { .. }), "{r:?}");
    let st = p.b().ha_status().await;
    assert!(st.degraded, "answered without the peer: {st:?}");
    assert_eq!(st.link, LinkState::Streaming, "the silent link is not declared dead before its timeout: {st:?}");
    // Later writes are answered at once too.
    let after = tokio::time::timeout(T, p.b().put_session("after", GHOST)).await.expect("answered without waiting");
    assert_eq!(waiters(p.b()), 0);

    // The cable is back (the stalled connection is gone for good): a gets everything, b waits
    // for a again, and degraded clears.
    p.cut();
    p.heal();
    assert!(p.wait_streaming().await, "the link comes back");
    let ids: BTreeSet<SessionId> = [before.id, during.id, after.id].into_iter().collect();
    assert!(wait_until(CONVERGE, || async { has_all(p.a(), &ids).await.is_ok() }).await);
    let cleared = wait_until(CONVERGE, || async { !p.b().ha_status().await.degraded }).await;
    assert!(cleared, "degraded clears once a has everything: {:?}", p.b().ha_status().await);
    let acked = p.b().put_session("acked", GHOST).await;
    assert!(p.a().server().db.get(&acked.id).await.unwrap().is_some(), "b waits for a's acknowledgement again");
    p.converge_and_stop().await;
}

/// Makes `i` the active master and the other the standby, as the VRRP manager's notify
/// hook does.
async fn set_roles(p: &TestPair, active: usize) {
    for i in 0..2 {
        let state = if i == active { VrrpState::Master } else { VrrpState::Backup };
        let r = p.node(i).call(ApiRequest::HaNotify { state }).await;
        assert!(matches!(r, ApiReply::Ok { .. }), "{r:?}");
    }
}

async fn cut_and_wait(p: &TestPair) {
    p.cut();
    for i in 0..2 {
        assert!(wait_until(T, || async { p.node(i).ha_status().await.link == LinkState::Down }).await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_cut_off_from_the_active_master_decides_nothing_until_made_active() {
    init_logging();
    let d = cluster_dir();
    let agent = TestAgent::start(d.path(), 0, 1, sleep_command()).await;
    let p = TestPair::start(d.path(), std::slice::from_ref(&agent.name), |_, _| {}).await;
    assert!(p.wait_streaming().await);
    set_roles(&p, 0).await;
    let alice = p.a().connect("alice", false).await.unwrap();
    // Linked, the standby serves a client that reaches it directly.
    assert!(p.b().connect("alice", false).await.unwrap().reconnected);

    cut_and_wait(&p).await;
    // Apart, the active master may be deciding about the same sessions: the standby refuses
    // logins and terminations (after waiting /HA/ready_wait for the link or a new role) and
    // still answers what it knows.
    let (kind, msg) = p.b().connect("alice", false).await.unwrap_err();
    assert_eq!(kind, ApiErrorKind::NotReady, "{msg}");
    assert!(msg.contains("standby") && msg.contains("tlctl ha notify MASTER"), "{msg}");
    let r = p.b().terminate_user("alice").await;
    assert!(matches!(r, ApiReply::Error { kind: ApiErrorKind::NotReady, .. }), "{r:?}");
    assert!(p.b().server().db.get(&alice.session_id).await.unwrap().is_some(), "nothing was changed");
    assert!(p.b().ha_check().await.is_ok(), "it stays ready to take the resource IP");
    // The active master serves alone.
    assert!(p.a().connect("alice", false).await.unwrap().reconnected);

    // The manager moves the address: the new active master serves.
    let r = p.b().call(ApiRequest::HaNotify { state: VrrpState::Master }).await;
    assert!(matches!(r, ApiReply::Ok { .. }), "{r:?}");
    assert!(p.b().connect("alice", false).await.unwrap().reconnected);

    p.heal();
    assert!(p.wait_streaming().await);
    p.converge_and_stop().await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminate_without_an_answer_is_reported_unknown_not_pending_while_cut_off() {
    init_logging();
    let d = cluster_dir();
    let agent = TestAgent::start(d.path(), 0, 1, sleep_command()).await;
    let relay = Proxy::start(agent.port).await;
    let p = TestPair::start(d.path(), &[relay.addr()], |_, c| {
        c.vsmserver.agent_timeout = Duration::from_secs(1);
    })
    .await;
    assert!(p.wait_streaming().await);
    set_roles(&p, 0).await;
    let alice = p.a().connect("alice", false).await.unwrap();
    let bob = p.a().connect("bob", false).await.unwrap();

    // Linked, a terminate the agent does not answer is pending: the peer has the tombstone
    // before the client hears "pending".
    relay.stall();
    let r = p.a().terminate_user("alice").await;
    let ApiReply::Terminated { outcome } = r else { panic!("{r:?}") };
    assert_eq!(outcome.pending.len(), 1, "{outcome:?}");
    assert!(p.b().server().db.get(&alice.session_id).await.unwrap().is_none());

    // Cut off from the peer, the same terminate fails and changes nothing: the other master
    // could be reconnecting the session at this very moment.
    relay.cut();
    relay.heal();
    cut_and_wait(&p).await;
    // (A call that opens a connection to the agent, so that the terminate goes out on it.)
    assert!(p.a().connect("bob", false).await.unwrap().reconnected);
    relay.stall();
    let r =
        p.a().call(ApiRequest::TerminateMine { user: Some("bob".into()), session_id: bob.session_id.clone() }).await;
    let ApiReply::Terminated { outcome } = r else { panic!("{r:?}") };
    assert!(outcome.pending.is_empty() && outcome.terminated.is_empty(), "{outcome:?}");
    assert_eq!(outcome.unknown.len(), 1, "reported as not confirmed: {outcome:?}");
    assert!(outcome.unknown[0].1.contains("cannot reach the other master"), "{outcome:?}");
    assert!(p.a().server().db.get(&bob.session_id).await.unwrap().is_some(), "bob's session stays listed");

    relay.cut();
    relay.heal();
    p.heal();
    assert!(p.wait_streaming().await);
    p.converge_and_stop().await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_desktop_the_database_does_not_know_is_adopted_only_with_the_peer_linked() {
    init_logging();
    let d = cluster_dir();
    let (agent, p, client) = adoption_pair(d.path(), 0).await;
    // A desktop neither master knows of (in the campaign: a start the other master gave up on
    // while the two were apart, and recorded as abandoned).
    cut_and_wait(&p).await;
    let extra = client.start(&agent.name, SessionId::generate(), "bob", None).await.unwrap();
    let sum = p.a().server().broker.reconcile_all().await.unwrap();
    assert_eq!((sum.recovered, sum.deferred), (0, 1), "{sum:?}");
    assert!(p.a().server().db.get(&extra.session_id).await.unwrap().is_none(), "not adopted while apart");

    p.heal();
    assert!(p.wait_streaming().await);
    assert!(wait_until(T, || async { p.a().ha_status().await.readiness == Readiness::CaughtUp }).await);
    // Linked again, it still waits out the time a start of the peer's could take to be
    // stored or abandoned, then adopts.
    let sum = p.a().server().broker.reconcile_all().await.unwrap();
    assert_eq!((sum.recovered, sum.deferred), (0, 1), "adopted right after the link came back: {sum:?}");
    assert!(
        wait_until(T, || async {
            let sum = p.a().server().broker.reconcile_all().await.unwrap();
            sum.recovered == 1
        })
        .await
    );
    assert!(p.a().server().db.get(&extra.session_id).await.unwrap().is_some());
    p.converge_and_stop().await;
    agent.stop().await;
}

/// One agent and a streaming pair with node `active` active, whose agent calls take 1 s and
/// peer timeout is 2 s (a desktop the database does not know is adopted after about 4 s, see
/// `AdoptionGate`), and a client that starts desktops on the agent behind the masters' backs.
async fn adoption_pair(dir: &std::path::Path, active: usize) -> (TestAgent, TestPair, vsm::agent::AgentClient) {
    let agent = TestAgent::start(dir, 0, 1, sleep_command()).await;
    let p = TestPair::start(dir, std::slice::from_ref(&agent.name), |_, c| {
        c.vsmserver.agent_timeout = Duration::from_secs(1);
        c.ha.peer_timeout = Duration::from_secs(2);
    })
    .await;
    assert!(p.wait_streaming().await);
    set_roles(&p, active).await;
    let client = vsm::agent::AgentClient::new(vsm::agent::AgentClientConfig {
        secret: vsm::proto::secure::Secret::from_file(dir.join("cluster.key")).unwrap(),
        port: 904,
        timeout: Duration::from_secs(3),
    });
    (agent, p, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_desktop_the_peer_is_still_starting_is_not_adopted_and_ends_when_the_peer_abandons_it() {
    init_logging();
    let d = cluster_dir();
    let (agent, p, client) = adoption_pair(d.path(), 1).await;
    // `a` asked the agent to start a desktop and has not heard back (its answer is lost): the
    // desktop runs, and neither database knows it yet.
    let started = client.start(&agent.name, SessionId::generate(), "carol", None).await.unwrap();
    let id = started.session_id.clone();
    // `b`, linked and caught up, must not adopt it: `a`'s start may still be under way.
    let sum = p.b().server().broker.reconcile_all().await.unwrap();
    assert_eq!((sum.recovered, sum.deferred), (0, 1), "adopted a desktop the peer may still be starting: {sum:?}");
    // `a` gives up on the start and records it as abandoned (a tombstone) before the hold is out.
    p.a().server().db.write(Write::Delete(id.clone())).await.unwrap();
    assert!(wait_until(T, || async { p.b().server().db.record(&id).await.unwrap().is_some() }).await);
    let sum = p.b().server().broker.reconcile_all().await.unwrap();
    assert_eq!((sum.recovered, sum.ended), (0, 1), "{sum:?}");
    let running = client.list(&agent.name).await.unwrap().0;
    assert!(running.iter().all(|r| r.session_id != id), "the abandoned desktop still runs: {running:?}");
    assert!(p.b().server().db.get(&id).await.unwrap().is_none());
    p.converge_and_stop().await;
    agent.stop().await;
}

/// One request as the Unix socket carries it: a 4-byte big-endian length, then JSON.
fn frame(req: &ApiRequest) -> Vec<u8> {
    let body = serde_json::to_vec(req).unwrap();
    let mut f = (body.len() as u32).to_be_bytes().to_vec();
    f.extend(body);
    f
}

/// An admin's connection moves to the database thread at its first session write; from
/// then on its writes, and every other request it sends (handled on a worker), are answered
/// in order, pipelined ones too, each write acknowledged by the peer before its reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_connection_that_writes_keeps_answering_every_request_in_order() {
    use tokio::io::AsyncWriteExt;
    init_logging();
    let d = cluster_dir();
    let agent = TestAgent::start(d.path(), 0, 1, sleep_command()).await;
    // Root is an admin anyway; another user is one through its primary group.
    let group = nix::unistd::Group::from_gid(nix::unistd::getgid()).unwrap().map(|g| g.name);
    let p =
        TestPair::start(d.path(), std::slice::from_ref(&agent.name), |_, c| c.vsmserver.admin_group = group.clone())
            .await;
    assert!(p.wait_streaming().await);
    let mut s = tokio::net::UnixStream::connect(&p.a().cfg.vsmserver.socket_path).await.unwrap();
    let (first, second) = (template("importer-one"), template("importer-two"));

    s.write_all(&frame(&ApiRequest::SessionPut { session: first.clone() })).await.unwrap();
    assert!(matches!(raw_reply(&mut s, T).await, Some(ApiReply::Ok { .. })));
    assert!(p.b().server().db.get(&first.id).await.unwrap().is_some(), "answered before the peer had it");

    // A write and two reads in one write: the bytes after the write survive the move.
    let mut burst = frame(&ApiRequest::SessionPut { session: second.clone() });
    burst.extend(frame(&ApiRequest::SessionList { selector: Default::default(), refresh: false }));
    burst.extend(frame(&ApiRequest::MySessions { user: Some(first.user.clone()) }));
    s.write_all(&burst).await.unwrap();
    assert!(matches!(raw_reply(&mut s, T).await, Some(ApiReply::Ok { .. })));
    assert!(p.b().server().db.get(&second.id).await.unwrap().is_some(), "answered before the peer had it");
    match raw_reply(&mut s, T).await {
        Some(ApiReply::Sessions { sessions, .. }) => {
            let ids: BTreeSet<_> = sessions.into_iter().map(|s| s.id).collect();
            assert_eq!(ids, [first.id.clone(), second.id.clone()].into(), "the listing holds both writes");
        }
        other => panic!("expected the session list, got {other:?}"),
    }
    match raw_reply(&mut s, T).await {
        Some(ApiReply::Sessions { sessions, .. }) => {
            assert_eq!(sessions.iter().map(|s| &s.id).collect::<Vec<_>>(), [&first.id], "one user's sessions")
        }
        other => panic!("expected the user's sessions, got {other:?}"),
    }

    // A login on the same connection starts a desktop on the agent, as on any other.
    let login = ApiRequest::Connect {
        user: Some("importer-login".into()),
        new: false,
        terminate_existing: false,
        geometry: None,
        client_address: None,
    };
    s.write_all(&frame(&login)).await.unwrap();
    match raw_reply(&mut s, T).await {
        Some(ApiReply::Connected { info }) => assert_eq!(info.agent, agent.name),
        other => panic!("expected a login, got {other:?}"),
    }

    // Garbage after the move is refused with a clear error and ends the connection.
    s.write_all(&[0, 0, 0, 3, b'{', b'x', b'}']).await.unwrap();
    match raw_reply(&mut s, T).await {
        Some(ApiReply::Error { kind: ApiErrorKind::BadRequest, message }) => {
            assert!(message.contains("malformed request"), "{message}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(closed_by_server(&mut s).await);
    p.converge_and_stop().await;
}
