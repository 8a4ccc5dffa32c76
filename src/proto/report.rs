//! The report link, both sides: an agent tells the master that a session ended
//! (`vsm-report/1`), and the master acknowledges once it recorded the exit.
//!
//! One implementation for everyone: the agent daemon's reporter sends through
//! [`send_report`], the master's TCP port serves the link with [`serve_reports`], and tests
//! stand in for a master with [`accept_report`].
//!
//! Invariants: a report counts as delivered only when the master answered
//! [`ReportAck::Accepted`]; every failure is a [`ReportError`] after which the agent keeps the
//! report and retries; nothing is acted on before the handshake authenticated the peer; both
//! sides hold the link to the size limit of a report ([`MAX_REPORT`]).

use super::addr::{connect_tcp, AddrError, Target};
use super::agent::{AgentReport, ReportAck, MAX_REPORT};
use super::secure::{accept_timeout, connect, SecureConn, PROLOGUE_REPORT};
use super::{ProtoError, Secret};
use std::future::Future;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};

/// How long an accepted connection may take to complete the handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

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
        let conn = connect(stream, secret, PROLOGUE_REPORT).await.map_err(link_err)?;
        let mut conn = conn.with_limits(MAX_REPORT, MAX_REPORT);
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
/// `vsm-report/1`, bounded by [`HANDSHAKE_TIMEOUT`]), then [`serve_reports`].
pub async fn accept_report<S, F, Fut>(stream: S, secret: &Secret, idle: Duration, handler: F) -> Result<(), ProtoError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: FnMut(AgentReport) -> Fut,
    Fut: Future<Output = ReportAck>,
{
    let conn = accept_timeout(stream, secret, PROLOGUE_REPORT, HANDSHAKE_TIMEOUT).await?;
    serve_reports(conn, idle, handler).await
}

/// The master's loop on a report link already handshaken (the master's TCP port tells the
/// link kinds apart with [`accept_any`](super::secure::accept_any)): one [`ReportAck`] from
/// `handler` per [`AgentReport`], until the agent closes the link or sends nothing for `idle`
/// (both a clean end). A malformed report is answered with `Retry` and the link stays up. The
/// handler must answer [`ReportAck::Accepted`] only once the report is durably recorded.
pub async fn serve_reports<S, F, Fut>(conn: SecureConn<S>, idle: Duration, handler: F) -> Result<(), ProtoError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: FnMut(AgentReport) -> Fut,
    Fut: Future<Output = ReportAck>,
{
    let mut conn = conn.with_limits(MAX_REPORT, MAX_REPORT);
    let malformed = |detail| ReportAck::Retry { reason: format!("malformed report: {detail}") };
    super::agent_link::answer_each(&mut conn, idle, malformed, handler).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::SessionId;
    use std::sync::{Arc, Mutex};
    use tokio::net::TcpListener;

    const IDLE: Duration = Duration::from_secs(60);

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
                    let _ = accept_report(sock, &secret(), IDLE, |r| {
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
    async fn a_malformed_report_is_answered_with_retry_and_the_link_stays_up() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (sock, _) = listener.accept().await.unwrap();
            accept_report(sock, &secret(), IDLE, |_| async { ReportAck::Accepted }).await
        });
        let sock = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut c = connect(sock, &secret(), PROLOGUE_REPORT).await.unwrap();
        c.send(&serde_json::json!({"kind": "nonsense"})).await.unwrap();
        assert!(matches!(c.recv::<ReportAck>().await.unwrap(), Some(ReportAck::Retry { .. })));
        c.send(&report(1)).await.unwrap();
        assert_eq!(c.recv::<ReportAck>().await.unwrap(), Some(ReportAck::Accepted));
    }
}
