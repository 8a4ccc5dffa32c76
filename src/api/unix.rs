//! The Unix-socket listener: users (through `vsmclient`) and local admins (through `tlctl`).
//!
//! Invariants: the caller's identity is the socket's peer credentials; a connection whose
//! credentials cannot be read, or whose uid has no user name, is closed without serving it.
//! The socket is open to every local user, so what one may cost is bounded: requests of at
//! most [`MAX_REQUEST`] bytes (refused from the frame header alone), the listener's
//! connection cap and idle timeout, and at most `/vsmserver/max_connections_per_user`
//! connections per user (root and admins excepted), so one user cannot take every slot.

use super::{Api, Caller};
use crate::proto::api::{ApiErrorKind, ApiReply, MAX_REPLY, MAX_REQUEST};
use crate::proto::listen::{self, Peer};
use crate::proto::{PlainConn, ProtoError};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Accepts connections until `shutdown` is cancelled; each connection runs in `tracker`.
pub async fn serve(listener: UnixListener, api: Api, shutdown: CancellationToken, tracker: TaskTracker) {
    let limits = api.limits();
    let per_user = PerUser::default();
    let sd = shutdown.clone();
    listen::serve("unix socket", listener, limits, shutdown, tracker, move |stream, _peer: Peer| {
        serve_conn(stream, api.clone(), per_user.clone(), sd.clone())
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
    api.serve_requests(&mut conn, &caller, &api.limits(), &shutdown).await
}
