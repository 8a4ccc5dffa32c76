//! The master's TCP port (`/vsmserver/listen_port`): admin calls from hosts in
//! `/vsmserver/allowed_clients`, and session-exit reports from agents.
//!
//! Both links share the port; the secure handshake's prologue says which one a connection
//! carries, so a handshake made for one link is useless on the other.
//!
//! Invariants: nothing is read from a connection before the handshake proved the cluster
//! secret; admin calls from a host not in `allowed_clients` (loopback is always allowed) are
//! refused and logged with the caller's address, and nothing they sent is acted on; an exit
//! report only ends a session hosted by the agent at the reporting address.

use super::{Api, Caller};
use crate::proto::access::{AllowList, Local, DEFAULT_CACHE_TTL};
use crate::proto::agent::{AgentReport, ReportAck};
use crate::proto::api::{ApiErrorKind, ApiReply, MAX_REPLY, MAX_REQUEST};
use crate::proto::listen::{self, Peer};
use crate::proto::report;
use crate::proto::secure::{accept_any, Secret, PROLOGUE_ADMIN, PROLOGUE_REPORT};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

pub async fn serve(listener: TcpListener, api: Api, secret: Secret, shutdown: CancellationToken, tracker: TaskTracker) {
    let limits = api.limits();
    let sd = shutdown.clone();
    let admins = Arc::new(allow_list(&api.broker.config().vsmserver));
    listen::serve("tcp port", listener, limits, shutdown, tracker, move |stream, peer| {
        serve_conn(stream, peer, api.clone(), admins.clone(), secret.clone(), sd.clone())
    })
    .await
}

/// Who may make admin calls: `/vsmserver/allowed_clients` and loopback.
pub fn allow_list(server: &crate::config::ServerConfig) -> AllowList {
    AllowList::new(server.allowed_clients.clone(), Local::Loopback, DEFAULT_CACHE_TTL)
}

async fn serve_conn(
    stream: TcpStream,
    peer: Peer,
    api: Api,
    admins: Arc<AllowList>,
    secret: Secret,
    shutdown: CancellationToken,
) -> Result<(), String> {
    let Peer::Tcp(addr) = peer else { return Err("not a tcp connection".into()) };
    let limits = api.limits();
    let (conn, link) =
        tokio::time::timeout(HANDSHAKE_TIMEOUT, accept_any(stream, &secret, &[PROLOGUE_ADMIN, PROLOGUE_REPORT]))
            .await
            .map_err(|_| "handshake timed out".to_string())?
            .map_err(|e| {
                tracing::warn!(peer = %addr, error = %e, "refused a tcp connection: nothing it sent was acted on");
                e.to_string()
            })?;
    if link == 0 {
        let mut conn = conn.with_limits(MAX_REQUEST, MAX_REPLY);
        if !admins.check(addr.ip()).await {
            let msg = format!("admin calls from {} are refused: not in /vsmserver/allowed_clients", addr.ip());
            let _ = conn.send(&ApiReply::Error { kind: ApiErrorKind::NotAllowed, message: msg.clone() }).await;
            tracing::warn!(peer = %addr, "{msg}");
            return Err(msg);
        }
        let caller = Caller::RemoteAdmin { addr };
        return api.serve_requests(&mut conn, &caller, &limits, &shutdown).await.map_err(|e| e.to_string());
    }
    report::serve_reports(conn, limits.idle_timeout, |report| {
        let broker = api.broker.clone();
        async move {
            match report {
                AgentReport::SessionExited { session_id, display, exit_status } => {
                    match broker.session_exited(&session_id, display, addr.ip(), exit_status).await {
                        Ok(()) => ReportAck::Accepted,
                        Err(e) => ReportAck::Retry { reason: e.to_string() },
                    }
                }
            }
        }
    })
    .await
    .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn admin_calls_come_from_loopback_and_allowed_clients_only() {
        let mut cfg = crate::config::Config::default().vsmserver;
        cfg.allowed_clients = vec!["10.1.2.3".into(), "localhost".into()];
        let list = allow_list(&cfg);
        assert!(list.check("127.0.0.1".parse().unwrap()).await);
        assert!(list.check("::1".parse().unwrap()).await);
        assert!(list.check("10.1.2.3".parse().unwrap()).await);
        assert!(list.check("::ffff:10.1.2.3".parse().unwrap()).await);
        assert!(!list.check("10.1.2.4".parse().unwrap()).await);
        // The master's own non-loopback addresses are not admins unless listed.
        for a in crate::proto::access::local_addresses() {
            let a = crate::proto::access::canonical(a);
            if !a.is_loopback() {
                assert!(!list.check(a).await, "{a}");
            }
        }
    }
}
