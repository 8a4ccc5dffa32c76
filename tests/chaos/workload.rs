//! The workload: concurrent clients connecting, reconnecting and terminating sessions of many
//! users through the masters' Unix sockets (as root acting for the user, like `vsmclient
//! --user`), each recording every operation in the shared history.
//!
//! Clients mostly use the master that holds the VIP (as users do through `ssh tlha`) and
//! sometimes the other one directly (which must stay correct when contacted). Every choice comes
//! from the client's own generator, seeded from the campaign's seed.
//!
//! Invariant: an operation is recorded exactly once, with the outcome the client saw; the
//! history lock is never held across an `.await`.

use crate::history::{Op, OpKind, Outcome};
use crate::lab::{Lab, MASTERS};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use vsm::client::ClientError;
use vsm::model::SessionId;
use vsm::proto::api::{ApiReply, ApiRequest, Selector};

/// Shared between the clients and the campaign.
#[derive(Default)]
pub struct Shared {
    pub history: Mutex<Vec<Op>>,
    /// Sessions each user was last told about, to pick terminate targets from.
    known: Mutex<BTreeMap<String, BTreeSet<String>>>,
    next_id: Mutex<u64>,
}

impl Shared {
    fn record(&self, mut op: Op) {
        {
            let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
            let mine = known.entry(op.user.clone()).or_default();
            match &op.outcome {
                crate::history::Outcome::Given { session, .. } => {
                    mine.insert(session.clone());
                }
                crate::history::Outcome::Terminated { ended, pending, .. } => {
                    for s in ended.iter().chain(pending) {
                        mine.remove(s);
                    }
                }
                _ => {}
            }
        }
        let mut h = self.history.lock().unwrap_or_else(|p| p.into_inner());
        op.id = h.len() as u64;
        h.push(op);
    }

    fn known_session(&self, user: &str, rng: &mut ChaCha8Rng) -> Option<String> {
        let known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        let s: Vec<&String> = known.get(user)?.iter().collect();
        (!s.is_empty()).then(|| s[rng.gen_range(0..s.len())].clone())
    }

    fn client_seq(&self) -> u64 {
        let mut n = self.next_id.lock().unwrap_or_else(|p| p.into_inner());
        *n += 1;
        *n
    }
}

/// Workload parameters.
#[derive(Clone, Debug)]
pub struct Params {
    pub users: Vec<String>,
    pub clients: u32,
    pub seed: u64,
    pub timeout: Duration,
    /// Pause between two operations of one client, drawn uniformly from this range (ms).
    pub think_ms: (u64, u64),
}

/// Keeps `tx` updated with the VIP holders, about four times a second.
pub async fn sample_vip(lab: Arc<Lab>, tx: watch::Sender<Vec<String>>, stop: CancellationToken) {
    while !stop.is_cancelled() {
        let h = lab.vip_holders().await;
        let _ = tx.send(h);
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
}

/// One client: operations until `stop`.
pub async fn client(
    n: u32,
    lab: Arc<Lab>,
    p: Params,
    shared: Arc<Shared>,
    vip: watch::Receiver<Vec<String>>,
    epoch: Instant,
    stop: CancellationToken,
) {
    let mut rng = ChaCha8Rng::seed_from_u64(p.seed ^ (0x9e37_79b9_7f4a_7c15u64.wrapping_mul(u64::from(n) + 1)));
    while !stop.is_cancelled() {
        let user = p.users[rng.gen_range(0..p.users.len())].clone();
        let roll = rng.gen_range(0..100);
        let kind = if roll < 55 {
            OpKind::Connect { new: false }
        } else if roll < 65 {
            OpKind::Connect { new: true }
        } else if roll < 90 {
            match shared.known_session(&user, &mut rng) {
                Some(session) => OpKind::Terminate { session },
                None => OpKind::Connect { new: false },
            }
        } else {
            OpKind::TerminateUser
        };
        let holders = vip.borrow().clone();
        let master = if rng.gen_range(0..100) < 85 && !holders.is_empty() {
            holders[rng.gen_range(0..holders.len())].clone()
        } else {
            MASTERS[rng.gen_range(0..MASTERS.len())].to_string()
        };
        let req = match &kind {
            OpKind::Connect { new } => ApiRequest::Connect {
                user: Some(user.clone()),
                new: *new,
                terminate_existing: false,
                geometry: None,
                client_address: Some(format!("{}.20", lab.net)),
            },
            OpKind::Terminate { session } => {
                ApiRequest::TerminateMine { user: Some(user.clone()), session_id: SessionId(session.clone()) }
            }
            OpKind::TerminateUser => ApiRequest::SessionTerminate {
                selector: Selector { user: Some(user.clone()), ..Default::default() },
                all: false,
                allow_abandon: false,
                dry_run: false,
            },
        };
        let _ = shared.client_seq();
        let invoked = epoch.elapsed().as_millis() as u64;
        let reply = lab.call(&master, &req, p.timeout).await;
        let completed = epoch.elapsed().as_millis() as u64;
        let outcome = outcome_of(reply);
        shared.record(Op { id: 0, client: n, user, master, invoked, completed, kind, outcome });
        let think = rng.gen_range(p.think_ms.0..=p.think_ms.1);
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(Duration::from_millis(think)) => {}
        }
    }
}

/// What the client was told, from the reply or the failure to get one.
pub fn outcome_of(reply: Result<ApiReply, ClientError>) -> Outcome {
    let ids = |v: &[vsm::model::Session]| v.iter().map(|s| s.id.0.clone()).collect::<Vec<_>>();
    match reply {
        Ok(ApiReply::Connected { info }) => Outcome::Given {
            session: info.session_id.0,
            agent: info.agent,
            display: info.display,
            reconnected: info.reconnected,
        },
        Ok(ApiReply::Terminated { outcome }) => Outcome::Terminated {
            ended: ids(&outcome.terminated).into_iter().chain(ids(&outcome.abandoned)).collect(),
            pending: outcome.pending.iter().map(|(s, _)| s.id.0.clone()).collect(),
            unknown: outcome.unknown.iter().map(|(s, _)| s.id.0.clone()).collect(),
            failed: outcome.failed.iter().map(|(s, _)| s.id.0.clone()).collect(),
        },
        Ok(ApiReply::Error { kind, message }) => Outcome::Refused { kind: kind.as_str().to_string(), message },
        Ok(other) => Outcome::Unknown { reason: format!("unexpected reply {other:?}") },
        // Nothing was sent: no effect possible.
        Err(ClientError::Unreachable { reason, .. }) => {
            Outcome::Refused { kind: "unreachable".into(), message: reason }
        }
        // The socket path could not be found: nothing was sent either.
        Err(e @ ClientError::Config { .. }) => Outcome::Refused { kind: "unreachable".into(), message: e.to_string() },
        Err(e @ ClientError::Timeout { .. }) | Err(e @ ClientError::Protocol { .. }) => {
            Outcome::Unknown { reason: e.to_string() }
        }
    }
}
