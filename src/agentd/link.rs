//! Glue between the agent daemon and the secure channel of `proto::secure`.
//!
//! Owns nothing but the three calls the daemon needs: load the cluster secret, serve one
//! master connection (handshake, then request → reply until the master closes or the agent
//! stops), and deliver one exit report to the master.
//!
//! It must never hand the daemon a request that did not arrive over an authenticated
//! channel.

use super::{Agent, AgentdError};
use crate::proto::agent::{AgentReply, AgentReport, AgentRequest, AgentErrorKind, ReportAck};
use crate::proto::secure::{accept, connect, PROLOGUE_AGENT, PROLOGUE_REPORT};
pub use crate::proto::secure::Secret;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// A master connection with no request for this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
const REPORT_TIMEOUT: Duration = Duration::from_secs(5);

pub fn load_secret(path: &Path) -> Result<Secret, AgentdError> {
    Secret::from_file(path).map_err(|e| AgentdError::Secret(e.to_string()))
}

pub async fn serve(stream: TcpStream, secret: &Secret, agent: &Agent, local: SocketAddr, stop: CancellationToken) -> Result<(), String> {
    let _ = stream.set_nodelay(true);
    let mut conn = tokio::time::timeout(HANDSHAKE_TIMEOUT, accept(stream, secret, PROLOGUE_AGENT))
        .await
        .map_err(|_| "handshake timed out".to_string())?
        .map_err(|e| e.to_string())?;
    loop {
        let req = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            r = tokio::time::timeout(IDLE_TIMEOUT, conn.recv::<AgentRequest>()) => match r {
                Err(_) => return Ok(()),
                Ok(r) => r,
            },
        };
        let reply = match req {
            Ok(Some(req)) => agent.handle(req, local).await,
            Ok(None) => return Ok(()),
            Err(crate::proto::ProtoError::Malformed(m)) => {
                let reply = AgentReply::Error { kind: AgentErrorKind::BadRequest, message: format!("malformed request: {m}") };
                let _ = conn.send(&reply).await;
                return Err(format!("malformed request: {m}"));
            }
            Err(e) => return Err(e.to_string()),
        };
        conn.send(&reply).await.map_err(|e| e.to_string())?;
    }
}

/// Delivers one report to the master and waits for its acknowledgement.
pub async fn send_report(master: &(String, u16), secret: &Secret, report: &AgentReport) -> Result<(), String> {
    let attempt = async {
        let addr = crate::agent::address(&master.0, master.1);
        let mut s = TcpStream::connect(&addr).await.map_err(|e| format!("{addr}: {e}"))?;
        let _ = s.set_nodelay(true);
        crate::api::tcp::write_link_tag(&mut s, crate::api::tcp::LinkTag::Report).await.map_err(|e| e.to_string())?;
        let mut c = connect(s, secret, PROLOGUE_REPORT).await.map_err(|e| e.to_string())?;
        c.send(report).await.map_err(|e| e.to_string())?;
        match c.recv::<ReportAck>().await.map_err(|e| e.to_string())? {
            Some(_) => Ok(()),
            None => Err("the master closed the link without acknowledging".to_string()),
        }
    };
    tokio::time::timeout(REPORT_TIMEOUT, attempt).await.map_err(|_| "no acknowledgement within 5 s".to_string())?
}
