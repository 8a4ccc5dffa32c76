//! The Unix-socket listener: users (through `vsmclient`) and local admins (through `tlctl`).
//!
//! Invariant: the caller's identity is the socket's peer credentials; a connection whose
//! credentials cannot be read, or whose uid has no user name, is closed without serving it.

use super::{Api, Caller};
use crate::proto::api::{ApiErrorKind, ApiReply};
use crate::proto::PlainConn;
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Accepts connections until `shutdown` is cancelled; each connection runs in `tracker`.
pub async fn serve(listener: UnixListener, api: Api, shutdown: CancellationToken, tracker: TaskTracker) {
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "accept on the unix socket failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let api = api.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            if let Err(e) = serve_conn(stream, api, shutdown).await {
                tracing::debug!(error = %e, "unix connection ended with an error");
            }
        });
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

async fn serve_conn(stream: UnixStream, api: Api, shutdown: CancellationToken) -> Result<(), crate::proto::ProtoError> {
    let caller = identify(&stream, api.broker.config().vsmserver.admin_group.as_deref());
    let mut conn = PlainConn::new(stream);
    let caller = match caller {
        Ok(c) => c,
        Err(why) => {
            tracing::warn!(reason = %why, "refusing a unix-socket caller");
            conn.send(&ApiReply::Error { kind: ApiErrorKind::NotAllowed, message: why }).await?;
            return Ok(());
        }
    };
    api.serve_requests(&mut conn, &caller, &shutdown).await
}
