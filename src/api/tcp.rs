//! The master's TCP port (`/vsmserver/listen_port`): admin calls from hosts in
//! `/vsmserver/allowed_clients`, and session-exit reports from agents.
//!
//! Each connection starts with a four-byte link tag in clear (`VSMA` admin, `VSMR` report),
//! then the secure handshake with the cluster secret and a prologue bound to that link, so a
//! handshake made for one link is useless on the other.
//!
//! Invariants: nothing is read from a connection before the handshake proves the cluster
//! secret except the tag; admin calls from a host not in `allowed_clients` (loopback is always
//! allowed) are refused and logged with the caller's address before any handshake.

use super::{Api, Caller};
use crate::proto::agent::{AgentReport, ReportAck};
use crate::proto::api::{ApiErrorKind, ApiReply, ApiRequest};
use crate::proto::secure::{accept, Secret, PROLOGUE_ADMIN as ADMIN_PROLOGUE, PROLOGUE_REPORT as REPORT_PROLOGUE};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Which link a TCP connection to the master carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkTag {
    Admin,
    Report,
}

impl LinkTag {
    pub const fn bytes(self) -> &'static [u8; 4] {
        match self {
            LinkTag::Admin => b"VSMA",
            LinkTag::Report => b"VSMR",
        }
    }
    fn parse(b: &[u8; 4]) -> Option<LinkTag> {
        match b {
            b"VSMA" => Some(LinkTag::Admin),
            b"VSMR" => Some(LinkTag::Report),
            _ => None,
        }
    }
}

/// Writes the link tag a connection to the master starts with.
pub async fn write_link_tag<S: AsyncWrite + Unpin>(s: &mut S, tag: LinkTag) -> std::io::Result<()> {
    s.write_all(tag.bytes()).await
}

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

pub async fn serve(listener: TcpListener, api: Api, secret: Secret, shutdown: CancellationToken, tracker: TaskTracker) {
    loop {
        let (stream, addr) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept on the tcp port failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let api = api.clone();
        let secret = secret.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            if let Err(e) = serve_conn(stream, addr, api, secret, shutdown).await {
                tracing::warn!(peer = %addr, error = %e, "tcp connection refused or failed");
            }
        });
    }
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

async fn serve_conn(mut stream: TcpStream, addr: SocketAddr, api: Api, secret: Secret, shutdown: CancellationToken) -> Result<(), String> {
    let mut tag = [0u8; 4];
    tokio::time::timeout(HANDSHAKE_TIMEOUT, stream.read_exact(&mut tag))
        .await
        .map_err(|_| "no link tag within 5 s".to_string())?
        .map_err(|e| format!("reading link tag: {e}"))?;
    let tag = LinkTag::parse(&tag).ok_or_else(|| format!("unknown link tag {tag:?}; expected VSMA or VSMR"))?;
    match tag {
        LinkTag::Admin => {
            if !allowed(addr.ip(), &api.broker.config().vsmserver.allowed_clients) {
                return Err(format!("admin call from {} refused: not in /vsmserver/allowed_clients", addr.ip()));
            }
            let mut conn = tokio::time::timeout(HANDSHAKE_TIMEOUT, accept(stream, &secret, ADMIN_PROLOGUE))
                .await
                .map_err(|_| "handshake timed out".to_string())?
                .map_err(|e| e.to_string())?;
            let caller = Caller::RemoteAdmin { addr };
            loop {
                let req = tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    r = conn.recv::<ApiRequest>() => r,
                };
                let reply = match req {
                    Ok(Some(req)) => api.handle(&caller, req).await,
                    Ok(None) => return Ok(()),
                    Err(e) => {
                        let r = ApiReply::Error { kind: ApiErrorKind::BadRequest, message: format!("malformed request: {e}") };
                        let _ = conn.send(&r).await;
                        return Err(e.to_string());
                    }
                };
                conn.send(&reply).await.map_err(|e| e.to_string())?;
            }
        }
        LinkTag::Report => {
            let mut conn = tokio::time::timeout(HANDSHAKE_TIMEOUT, accept(stream, &secret, REPORT_PROLOGUE))
                .await
                .map_err(|_| "handshake timed out".to_string())?
                .map_err(|e| e.to_string())?;
            while let Some(report) = conn.recv::<AgentReport>().await.map_err(|e| e.to_string())? {
                match report {
                    AgentReport::SessionExited { session_id, exit_status, .. } => {
                        api.broker.session_exited(&session_id, exit_status).await.map_err(|e| e.to_string())?;
                    }
                }
                conn.send(&ReportAck { ok: true }).await.map_err(|e| e.to_string())?;
            }
            Ok(())
        }
    }
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
