//! Glue between the agent daemon and the secure channel of `proto::secure`.
//!
//! Owns nothing but the two calls the daemon needs: load the cluster secret, and serve one
//! master connection (handshake with prologue `PROLOGUE_AGENT`, then request → reply until
//! the master closes, stays idle too long, or the agent stops). Exit reports go through the
//! one report link, `crate::proto::report`.
//!
//! It must never hand the daemon a request that did not arrive over an authenticated
//! channel.

use super::{Agent, AgentdError};
use crate::proto::agent::{AgentErrorKind, AgentReply, AgentRequest, MAX_REPLY, MAX_REQUEST};
use crate::proto::listen::Limits;
pub use crate::proto::secure::Secret;
use crate::proto::secure::{accept, PROLOGUE_AGENT};
use crate::proto::ProtoError;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// A caller that does not finish the handshake within this time is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

pub fn load_secret(path: &Path) -> Result<Secret, AgentdError> {
    Secret::from_file(path).map_err(|e| AgentdError::Secret(e.to_string()))
}

/// Serve one master connection until it closes, idles out (masters pool connections and
/// open a new one when a pooled one was closed), or `stop` is cancelled. A request in
/// progress is always answered before `stop` is looked at again.
pub async fn serve(
    stream: TcpStream,
    secret: &Secret,
    agent: &Agent,
    local: SocketAddr,
    limits: Limits,
    stop: CancellationToken,
) -> Result<(), String> {
    let _ = stream.set_nodelay(true);
    let conn = tokio::time::timeout(HANDSHAKE_TIMEOUT, accept(stream, secret, PROLOGUE_AGENT))
        .await
        .map_err(|_| format!("no secure handshake within {HANDSHAKE_TIMEOUT:?}"))?
        .map_err(|e| e.to_string())?;
    let mut conn = conn.with_limits(MAX_REQUEST, MAX_REPLY);
    loop {
        let req = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            r = limits.idle(conn.recv::<AgentRequest>()) => match r {
                Err(ProtoError::Idle { .. }) => return Ok(()),
                r => r,
            },
        };
        let reply = match req {
            Ok(Some(req)) => {
                let received = std::time::Instant::now();
                let link_open = || conn.peer_open();
                agent.handle_fenced(req, local, &super::Fence::new(received, &link_open)).await
            }
            Ok(None) => return Ok(()),
            // Authenticated but not a request we know: answer, the link stays usable.
            Err(ProtoError::Malformed(m)) => {
                AgentReply::Error { kind: AgentErrorKind::BadRequest, message: format!("malformed request: {m}") }
            }
            Err(e) => return Err(e.to_string()),
        };
        conn.send(&reply).await.map_err(|e| e.to_string())?;
    }
}
