//! The exchanges of the agent links, without policy: serving master calls on an agent
//! (`vsm-agent/1`), and the report link by which an agent tells the master that a session
//! ended (`vsm-report/1`), both sides.
//!
//! The agent daemon (`agentd`) calls [`serve_agent_conn`] for each accepted connection and
//! [`send_report`] to report; the master calls [`accept_report`] (or [`serve_reports`] after
//! [`accept_any`](super::secure::accept_any) on a shared port). The master-side client of
//! agent calls, with timeouts, pooling and error classes, is `crate::agent::AgentClient`.
//!
//! This module must never decide who may connect (the caller checks `allowed_clients` first
//! and calls [`refuse`](super::secure::refuse)), and never act on a message before the
//! handshake has authenticated the peer.
//! Invariant: every request read gets exactly one reply, in order; a malformed request gets
//! an `AgentReply::Error { kind: BadRequest }` and the link stays up.

use super::addr::{connect_tcp, AddrError, Target};
use super::agent::{AgentErrorKind, AgentReply, AgentReport, AgentRequest, ReportAck};
use super::secure::{accept_timeout, connect, SecureConn, PROLOGUE_AGENT, PROLOGUE_REPORT};
use super::{ProtoError, Secret};
use std::future::Future;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};

/// How long an accepted connection may take to complete the handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a served connection may stay idle between requests before the server closes it.
/// Clients pooling connections must reuse them only for a shorter time.
pub const SERVER_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Serve master calls on one accepted agent connection: secure handshake (prologue
/// `vsm-agent/1`, bounded by [`HANDSHAKE_TIMEOUT`]), then for each [`AgentRequest`] one
/// [`AgentReply`] from `handler`, until the master closes the link or it idles for
/// [`SERVER_IDLE_TIMEOUT`]. `Ok(())` on a clean end.
pub async fn serve_agent_conn<S, F, Fut>(stream: S, secret: &Secret, handler: F) -> Result<(), ProtoError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: FnMut(AgentRequest) -> Fut,
    Fut: Future<Output = AgentReply>,
{
    let conn = accept_timeout(stream, secret, PROLOGUE_AGENT, HANDSHAKE_TIMEOUT).await?;
    serve_agent_requests(conn, handler).await
}

/// The request loop of [`serve_agent_conn`], for a connection already handshaken.
pub async fn serve_agent_requests<S, F, Fut>(mut conn: SecureConn<S>, mut handler: F) -> Result<(), ProtoError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: FnMut(AgentRequest) -> Fut,
    Fut: Future<Output = AgentReply>,
{
    loop {
        let req = match tokio::time::timeout(SERVER_IDLE_TIMEOUT, conn.recv::<AgentRequest>()).await {
            Err(_) | Ok(Ok(None)) => return Ok(()),
            Ok(Ok(Some(req))) => req,
            Ok(Err(ProtoError::Malformed(detail))) => {
                conn.send(&AgentReply::Error { kind: AgentErrorKind::BadRequest, message: detail }).await?;
                continue;
            }
            Ok(Err(e)) => return Err(e),
        };
        let reply = handler(req).await;
        conn.send(&reply).await?;
    }
}

/// Why a report did not reach the master or was not accepted. The agent keeps the report and
/// retries in every case.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The master could not be resolved, connected to, or did not answer in time.
    #[error("cannot reach the master at {target}: {reason}")]
    Unreachable { target: String, reason: String },
    /// The master rejected the link (wrong secret, not allowed, another link kind).
    #[error("the master at {target} refused the report link: {source}")]
    Refused { target: String, source: ProtoError },
    /// The master answered but did not accept the report now.
    #[error("the master at {target} did not accept the report: {reason}")]
    Declined { target: String, reason: String },
    /// The link broke or carried something unexpected.
    #[error("report link to {target} failed: {source}")]
    Link { target: String, source: ProtoError },
}

/// Send one report to the master at `addr` (host, address, optionally `:port`; else `port`)
/// over the report link, and wait for its [`ReportAck::Accepted`], all within `timeout`.
pub async fn send_report(
    addr: &str,
    port: u16,
    secret: &Secret,
    report: &AgentReport,
    timeout: Duration,
) -> Result<(), ReportError> {
    let target = match Target::parse(addr, port) {
        Ok(t) => t,
        Err(e) => return Err(ReportError::Unreachable { target: addr.into(), reason: e.to_string() }),
    };
    let shown = target.to_string();
    let exchange = async {
        let stream = connect_tcp(&target)
            .await
            .map_err(|e: AddrError| ReportError::Unreachable { target: shown.clone(), reason: e.to_string() })?;
        let link_err = |source: ProtoError| {
            if source.is_auth_failure() {
                ReportError::Refused { target: shown.clone(), source }
            } else {
                ReportError::Link { target: shown.clone(), source }
            }
        };
        let mut conn = connect(stream, secret, PROLOGUE_REPORT).await.map_err(link_err)?;
        conn.send(report).await.map_err(link_err)?;
        match conn.recv::<ReportAck>().await.map_err(link_err)? {
            Some(ReportAck::Accepted) => Ok(()),
            Some(ReportAck::Retry { reason }) => Err(ReportError::Declined { target: shown.clone(), reason }),
            None => Err(link_err(ProtoError::Truncated { what: "the report exchange" })),
        }
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(r) => r,
        Err(_) => Err(ReportError::Unreachable {
            target: target.to_string(),
            reason: format!("no acknowledgement within {timeout:?}"),
        }),
    }
}

/// Master side of the report link on one accepted connection: handshake (prologue
/// `vsm-report/1`, bounded by [`HANDSHAKE_TIMEOUT`]), then one [`ReportAck`] from `handler`
/// per [`AgentReport`] until the agent closes the link. The handler must answer
/// [`ReportAck::Accepted`] only once the report is durably recorded.
pub async fn accept_report<S, F, Fut>(stream: S, secret: &Secret, handler: F) -> Result<(), ProtoError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: FnMut(AgentReport) -> Fut,
    Fut: Future<Output = ReportAck>,
{
    let conn = accept_timeout(stream, secret, PROLOGUE_REPORT, HANDSHAKE_TIMEOUT).await?;
    serve_reports(conn, handler).await
}

/// The loop of [`accept_report`], for a connection already handshaken.
pub async fn serve_reports<S, F, Fut>(mut conn: SecureConn<S>, mut handler: F) -> Result<(), ProtoError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: FnMut(AgentReport) -> Fut,
    Fut: Future<Output = ReportAck>,
{
    loop {
        let report = match tokio::time::timeout(SERVER_IDLE_TIMEOUT, conn.recv::<AgentReport>()).await {
            Err(_) | Ok(Ok(None)) => return Ok(()),
            Ok(Ok(Some(r))) => r,
            Ok(Err(ProtoError::Malformed(detail))) => {
                conn.send(&ReportAck::Retry { reason: format!("malformed report: {detail}") }).await?;
                continue;
            }
            Ok(Err(e)) => return Err(e),
        };
        let ack = handler(report).await;
        conn.send(&ack).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::SessionId;
    use std::sync::{Arc, Mutex};
    use tokio::net::{TcpListener, TcpStream};

    fn secret() -> Secret {
        Secret::from_bytes(b"cluster")
    }

    fn report(n: u32) -> AgentReport {
        AgentReport::SessionExited { session_id: SessionId(format!("s{n}")), display: n, exit_status: Some(0) }
    }

    async fn master(ack: ReportAck) -> (u16, Arc<Mutex<Vec<AgentReport>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else { return };
                let seen = seen2.clone();
                let ack = ack.clone();
                tokio::spawn(async move {
                    let _ = accept_report(sock, &secret(), |r| {
                        seen.lock().unwrap().push(r);
                        let ack = ack.clone();
                        async move { ack }
                    })
                    .await;
                });
            }
        });
        (port, seen)
    }

    #[tokio::test]
    async fn report_is_acknowledged() {
        let (port, seen) = master(ReportAck::Accepted).await;
        send_report("127.0.0.1", port, &secret(), &report(1), Duration::from_secs(10)).await.unwrap();
        send_report(&format!("127.0.0.1:{port}"), 1, &secret(), &report(2), Duration::from_secs(10)).await.unwrap();
        assert_eq!(*seen.lock().unwrap(), vec![report(1), report(2)]);
    }

    #[tokio::test]
    async fn declined_report_is_an_error() {
        let (port, _) = master(ReportAck::Retry { reason: "standby".into() }).await;
        let r = send_report("127.0.0.1", port, &secret(), &report(1), Duration::from_secs(10)).await;
        assert!(matches!(r, Err(ReportError::Declined { ref reason, .. }) if reason == "standby"), "{r:?}");
    }

    #[tokio::test]
    async fn report_with_wrong_secret_is_refused_and_not_recorded() {
        let (port, seen) = master(ReportAck::Accepted).await;
        let other = Secret::from_bytes(b"other");
        let r = send_report("127.0.0.1", port, &other, &report(1), Duration::from_secs(10)).await;
        assert!(matches!(r, Err(ReportError::Refused { .. })), "{r:?}");
        assert!(seen.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn report_to_nobody_is_unreachable() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        let r = send_report("127.0.0.1", port, &secret(), &report(1), Duration::from_secs(10)).await;
        assert!(matches!(r, Err(ReportError::Unreachable { .. })), "{r:?}");
    }

    #[tokio::test]
    async fn agent_link_answers_each_request_and_malformed_ones() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (sock, _) = listener.accept().await.unwrap();
            serve_agent_conn(sock, &secret(), |req| async move {
                match req {
                    AgentRequest::Verify { display, .. } => AgentReply::Verified { alive: display == 1 },
                    _ => AgentReply::Terminated { was_running: false },
                }
            })
            .await
        });
        let sock = TcpStream::connect(addr).await.unwrap();
        let mut c = connect(sock, &secret(), PROLOGUE_AGENT).await.unwrap();
        c.send(&AgentRequest::Verify { session_id: SessionId("a".into()), display: 1 }).await.unwrap();
        assert_eq!(c.recv::<AgentReply>().await.unwrap(), Some(AgentReply::Verified { alive: true }));
        c.send(&serde_json::json!({"op": "launch_missiles"})).await.unwrap();
        match c.recv::<AgentReply>().await.unwrap() {
            Some(AgentReply::Error { kind: AgentErrorKind::BadRequest, .. }) => {}
            other => panic!("expected BadRequest, got {other:?}"),
        }
        c.send(&AgentRequest::Verify { session_id: SessionId("a".into()), display: 2 }).await.unwrap();
        assert_eq!(c.recv::<AgentReply>().await.unwrap(), Some(AgentReply::Verified { alive: false }));
    }
}
