//! The Unix-socket listener: users (through `vsmclient`) and local admins (through `tlctl`).
//!
//! Invariants: the caller's identity is the socket's peer credentials; a connection whose
//! credentials cannot be read, or whose uid has no user name, is closed without serving it.
//! The socket is open to every local user, so what one may cost is bounded: requests of at
//! most [`MAX_REQUEST`] bytes (refused from the frame header alone), the listener's
//! connection cap and idle timeout, and at most `/vsmserver/max_connections_per_user`
//! connections per user (root and admins excepted), so one user cannot take every slot.
//! An admin's connection moves to the database thread's runtime at its first session write
//! (`SessionPut`), where its writes are answered without a thread hand-over; any other
//! request on it is still handled on a worker. At most [`DB_THREAD_CONNECTIONS`] connections
//! are served there at once; the others stay on the workers.

use super::{Api, Caller, RequestConn, Served};
use crate::proto::api::{ApiErrorKind, ApiReply, ApiRequest, MAX_REPLY, MAX_REQUEST};
use crate::proto::listen::{self, Limits, Peer};
use crate::proto::{PlainConn, ProtoError};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Accepts connections until `shutdown` is cancelled; each connection runs in `tracker`.
pub async fn serve(listener: UnixListener, api: Api, shutdown: CancellationToken, tracker: TaskTracker) {
    let limits = api.limits();
    let per_user = PerUser::default();
    let db_seats = Arc::new(Semaphore::new(DB_THREAD_CONNECTIONS));
    let sd = shutdown.clone();
    listen::serve("unix socket", listener, limits, shutdown, tracker, move |stream, _peer: Peer| {
        serve_conn(stream, api.clone(), per_user.clone(), db_seats.clone(), sd.clone())
    })
    .await
}

/// Open connections per uid.
#[derive(Clone, Default)]
struct PerUser(Arc<Mutex<HashMap<u32, usize>>>);

/// One connection counted for a uid; uncounted when dropped.
struct UserSlot {
    map: PerUser,
    uid: u32,
}

impl PerUser {
    fn take(&self, uid: u32, max: usize) -> Option<UserSlot> {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(uid).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(UserSlot { map: self.clone(), uid })
    }
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        let mut m = self.map.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.uid);
            }
        }
    }
}

/// How many connections the database thread serves at once (its seats, a semaphore's
/// permits). One or two writers gain most from being served there (no hand-over per write);
/// with many, the database thread is the bottleneck and the requests it would decode and
/// answer are better left to the workers.
const DB_THREAD_CONNECTIONS: usize = 2;

fn identify(stream: &UnixStream, admin_group: Option<&str>) -> Result<Caller, String> {
    let cred = stream.peer_cred().map_err(|e| format!("cannot read peer credentials: {e}"))?;
    let uid = cred.uid();
    let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .ok_or_else(|| format!("uid {uid} has no user name"))?;
    let admin =
        uid == 0 || admin_group.is_some_and(|g| crate::broker::service::user_groups(&user.name).iter().any(|x| x == g));
    Ok(Caller::Local { uid, user: user.name, admin })
}

async fn serve_conn(
    stream: UnixStream,
    api: Api,
    per_user: PerUser,
    db_seats: Arc<Semaphore>,
    shutdown: CancellationToken,
) -> Result<(), ProtoError> {
    let cfg = &api.broker.config().vsmserver;
    let caller = identify(&stream, cfg.admin_group.as_deref());
    let mut conn = PlainConn::with_limits(stream, MAX_REQUEST, MAX_REPLY);
    let refuse = |why: String| ApiReply::Error { kind: ApiErrorKind::NotAllowed, message: why };
    let caller = match caller {
        Ok(c) => c,
        Err(why) => {
            tracing::warn!(reason = %why, "refusing a unix-socket caller");
            conn.send(&refuse(why)).await?;
            return Ok(());
        }
    };
    let _user_slot = match &caller {
        Caller::Local { admin: true, .. } => None,
        Caller::Local { uid, user, .. } => match per_user.take(*uid, cfg.max_connections_per_user) {
            Some(s) => Some(s),
            None => {
                let why = format!(
                    "user {user} already has {} connections open (/vsmserver/max_connections_per_user)",
                    cfg.max_connections_per_user
                );
                tracing::warn!(%user, "{why}; refusing one more");
                conn.send(&refuse(why)).await?;
                return Ok(());
            }
        },
        Caller::RemoteAdmin { .. } => None,
    };
    let limits = api.limits();
    let admin = caller.is_admin();
    let seat = OnceLock::new();
    let hand_over = |r: &ApiRequest| {
        admin
            && matches!(r, ApiRequest::SessionPut { .. })
            && db_seats.clone().try_acquire_owned().is_ok_and(|s| seat.set(s).is_ok())
    };
    let first = match api.serve_requests_until(&mut conn, &caller, &limits, &shutdown, hand_over).await? {
        Served::Closed => return Ok(()),
        Served::HandOver(req) => *req,
    };
    // An admin storing session records (an import, a migration, a tool writing records
    // one after another): each write is a commit and, in `ack` mode, the peer's
    // acknowledgement, both on the database thread. Served there, a write is read,
    // committed, acknowledged and answered without waking a worker thread twice.
    let conn = conn.map_stream(UnixStream::into_std)?;
    let worker = tokio::runtime::Handle::current();
    let db_runtime = api.broker.db().runtime().clone();
    let served = db_runtime.spawn(async move {
        let _seat = seat;
        let conn = conn.map_stream(UnixStream::from_std)?;
        serve_writes(&api, conn, &caller, first, &worker, &limits, &shutdown).await
    });
    // The task ends with the connection, or is dropped with the database thread at shutdown.
    served.await.unwrap_or(Ok(()))
}

/// Serves a handed-over connection on the database thread's runtime, starting with `first`.
/// Only session writes are answered there; anything else the caller sends is handled on a
/// worker (`worker`), since it may look up users and groups or read at length, and the
/// database thread must never block.
async fn serve_writes(
    api: &Api,
    mut conn: PlainConn<UnixStream>,
    caller: &Caller,
    first: ApiRequest,
    worker: &tokio::runtime::Handle,
    limits: &Limits,
    shutdown: &CancellationToken,
) -> Result<(), ProtoError> {
    let mut req = first;
    loop {
        let reply = if matches!(req, ApiRequest::SessionPut { .. }) {
            api.handle(caller, req).await
        } else {
            let (api, caller) = (api.clone(), caller.clone());
            match worker.spawn(async move { api.handle(&caller, req).await }).await {
                Ok(reply) => reply,
                // The worker runtime is shutting down.
                Err(_) => return Ok(()),
            }
        };
        conn.answer(reply).await?;
        req = match api.next_request(&mut conn, limits, shutdown).await? {
            Some(r) => r,
            None => return Ok(()),
        };
    }
}
