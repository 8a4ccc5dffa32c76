//! The agent link without policy: serving master calls on an agent (`vsm-agent/1`), for
//! stand-in agents in tests and benchmarks, and [`answer_each`], the one request loop of the
//! links an agent side serves (this one and the master's end of the report link). The report link, by which an agent tells the master
//! that a session ended, is [`super::report`]. The master-side client of agent calls, with
//! timeouts, pooling and error classes, is `crate::agent::AgentClient`.
//!
//! This module must never decide who may connect (the caller checks `allowed_clients` first
//! and calls [`refuse`](super::secure::refuse)), and never act on a message before the
//! handshake has authenticated the peer.
//! Invariant: every request read gets exactly one reply, in order; a malformed request gets
//! an `AgentReply::Error { kind: BadRequest }` and the link stays up.

use super::agent::{AgentErrorKind, AgentReply, AgentRequest};
use super::secure::{accept_timeout, SecureConn, PROLOGUE_AGENT};
use super::{ProtoError, Secret};
use serde::de::DeserializeOwned;
use serde::Serialize;
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
pub async fn serve_agent_requests<S, F, Fut>(mut conn: SecureConn<S>, handler: F) -> Result<(), ProtoError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: FnMut(AgentRequest) -> Fut,
    Fut: Future<Output = AgentReply>,
{
    let malformed = |detail| AgentReply::Error { kind: AgentErrorKind::BadRequest, message: detail };
    answer_each(&mut conn, SERVER_IDLE_TIMEOUT, malformed, handler).await
}

/// The request loop of the links an agent side serves (agent calls here, exit reports in
/// [`super::report`]): for each message one answer from `handler`, in order, until the peer
/// closes the link or sends nothing for `idle` (both a clean end). A message that does not
/// parse is answered with `malformed(detail)` and the link stays up.
pub async fn answer_each<S, Req, Rep, F, Fut>(
    conn: &mut SecureConn<S>,
    idle: Duration,
    malformed: impl Fn(String) -> Rep,
    mut handler: F,
) -> Result<(), ProtoError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    Req: DeserializeOwned,
    Rep: Serialize,
    F: FnMut(Req) -> Fut,
    Fut: Future<Output = Rep>,
{
    loop {
        let reply = match tokio::time::timeout(idle, conn.recv::<Req>()).await {
            Err(_) | Ok(Ok(None)) => return Ok(()),
            Ok(Ok(Some(req))) => handler(req).await,
            Ok(Err(ProtoError::Malformed(detail))) => malformed(detail),
            Ok(Err(e)) => return Err(e),
        };
        conn.send(&reply).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::SessionId;
    use crate::proto::secure::connect;
    use tokio::net::{TcpListener, TcpStream};

    fn secret() -> Secret {
        Secret::from_bytes(b"cluster")
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
