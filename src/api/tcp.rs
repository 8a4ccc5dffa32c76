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
use crate::proto::agent::{AgentReport, ReportAck, MAX_REPORT};
use crate::proto::api::{ApiErrorKind, ApiReply, MAX_REPLY, MAX_REQUEST};
use crate::proto::listen::{self, Peer};
use crate::proto::secure::{accept_any, Secret, PROLOGUE_ADMIN, PROLOGUE_REPORT};
use std::net::{IpAddr, ToSocketAddrs};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

pub async fn serve(listener: TcpListener, api: Api, secret: Secret, shutdown: CancellationToken, tracker: TaskTracker) {
    let limits = api.limits();
    let sd = shutdown.clone();
    listen::serve("tcp port", listener, limits, shutdown, tracker, move |stream, peer| {
        serve_conn(stream, peer, api.clone(), secret.clone(), sd.clone())
    })
    .await
}

/// Is `ip` loopback or one of the addresses `allowed` names resolve to?
pub fn allowed(ip: IpAddr, allowed: &[String]) -> bool {
    if ip.is_loopback() {
        return true;
    }
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    };
    allowed.iter().any(|h| {
        if let Ok(a) = h.parse::<IpAddr>() {
            return a == ip;
        }
        (h.as_str(), 0u16).to_socket_addrs().map(|mut it| it.any(|sa| sa.ip() == ip)).unwrap_or(false)
    })
}

async fn serve_conn(
    stream: TcpStream,
    peer: Peer,
    api: Api,
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
        if !allowed(addr.ip(), &api.broker.config().vsmserver.allowed_clients) {
            let msg = format!("admin calls from {} are refused: not in /vsmserver/allowed_clients", addr.ip());
            let _ = conn.send(&ApiReply::Error { kind: ApiErrorKind::NotAllowed, message: msg.clone() }).await;
            tracing::warn!(peer = %addr, "{msg}");
            return Err(msg);
        }
        let caller = Caller::RemoteAdmin { addr };
        return api.serve_requests(&mut conn, &caller, &limits, &shutdown).await.map_err(|e| e.to_string());
    }
    let mut conn = conn.with_limits(MAX_REPORT, MAX_REPORT);
    while let Some(report) = limits.idle(conn.recv::<AgentReport>()).await.map_err(|e| e.to_string())? {
        let ack = match report {
            AgentReport::SessionExited { session_id, display, exit_status } => {
                match api.broker.session_exited(&session_id, display, addr.ip(), exit_status).await {
                    Ok(()) => ReportAck::Accepted,
                    Err(e) => ReportAck::Retry { reason: e.to_string() },
                }
            }
        };
        conn.send(&ack).await.map_err(|e| e.to_string())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_always_allowed() {
        assert!(allowed("127.0.0.1".parse().unwrap(), &[]));
        assert!(allowed("::1".parse().unwrap(), &[]));
    }

    #[test]
    fn listed_addresses_and_names_are_allowed() {
        let list = vec!["10.1.2.3".to_string(), "localhost".to_string()];
        assert!(allowed("10.1.2.3".parse().unwrap(), &list));
        assert!(!allowed("10.1.2.4".parse().unwrap(), &list));
        assert!(allowed("::ffff:10.1.2.3".parse().unwrap(), &list));
    }
}
