//! Glue between the agent daemon and the secure channel of `proto::secure`.
//!
//! Owns nothing but the three calls the daemon needs: load the cluster secret, serve one
//! master connection (handshake, then request → reply until the master closes or the agent
//! stops), and deliver one exit report to the master.
//!
//! It must never hand the daemon a request that did not arrive over an authenticated
//! channel.
//!
//! TEMPORARY: the secure channel is not in this branch yet. Until it is, the secret file is
//! only read, every connection is refused after the access check, and every report fails
//! (so reports stay in the outbox). Replace the bodies with `proto::secure` calls.

use super::{Agent, AgentdError};
use crate::proto::agent::AgentReport;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// The cluster secret (placeholder until `proto::secure::Secret`).
#[derive(Clone)]
pub struct Secret(#[allow(dead_code)] Arc<Vec<u8>>);

pub fn load_secret(path: &Path) -> Result<Secret, AgentdError> {
    let bytes = std::fs::read(path).map_err(|e| {
        AgentdError::Secret(format!(
            "cannot read {}: {e}; expected the cluster key file",
            path.display()
        ))
    })?;
    if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(AgentdError::Secret(format!(
            "{} is empty; expected the cluster key",
            path.display()
        )));
    }
    Ok(Secret(Arc::new(bytes)))
}

pub async fn serve(
    _stream: TcpStream,
    _secret: &Secret,
    _agent: &Agent,
    _local: SocketAddr,
    _stop: CancellationToken,
) -> Result<(), String> {
    Err("secure channel not available in this build".into())
}

pub async fn send_report(
    _master: &(String, u16),
    _secret: &Secret,
    _report: &AgentReport,
) -> Result<(), String> {
    Err("secure channel not available in this build".into())
}
