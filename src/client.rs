//! Client side of the master's API, shared by `vsmclient` and `tlctl`: connect over the Unix
//! socket (or, for admin hosts, over the authenticated TCP link), send one request, read one
//! reply, all under a deadline.
//!
//! Invariant: every failure to reach or understand the master becomes a [`ClientError`] whose
//! message says what to check; nothing here panics on what the master sends.

use crate::proto::api::{ApiReply, ApiRequest, ADMIN_PROLOGUE, MAX_REPLY, MAX_REQUEST};
use crate::proto::secure::Secret;
use crate::proto::PlainConn;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach vsmserver at {where_}: {reason} (is vsmserver running? check `systemctl status vsmserver`)")]
    Unreachable { where_: String, reason: String },
    #[error("vsmserver at {where_} did not answer within {ms} ms")]
    Timeout { where_: String, ms: u64 },
    #[error("talking to vsmserver at {where_}: {reason}")]
    Protocol { where_: String, reason: String },
}

/// Where the master is.
#[derive(Clone, Debug)]
pub enum Target {
    Unix(PathBuf),
    /// `host:port` with the cluster secret.
    Tcp {
        addr: String,
        secret: Secret,
    },
}

impl Target {
    fn describe(&self) -> String {
        match self {
            Target::Unix(p) => p.display().to_string(),
            Target::Tcp { addr, .. } => addr.clone(),
        }
    }
}

/// Sends `req` and returns the reply, or an error within `timeout`.
pub async fn call(target: &Target, req: &ApiRequest, timeout: Duration) -> Result<ApiReply, ClientError> {
    let where_ = target.describe();
    match tokio::time::timeout(timeout, call_inner(target, req, &where_)).await {
        Ok(r) => r,
        Err(_) => Err(ClientError::Timeout { where_, ms: timeout.as_millis() as u64 }),
    }
}

async fn call_inner(target: &Target, req: &ApiRequest, where_: &str) -> Result<ApiReply, ClientError> {
    let unreachable =
        |e: std::io::Error| ClientError::Unreachable { where_: where_.to_string(), reason: e.to_string() };
    let protocol =
        |e: crate::proto::ProtoError| ClientError::Protocol { where_: where_.to_string(), reason: e.to_string() };
    let reply = match target {
        Target::Unix(path) => {
            let s = tokio::net::UnixStream::connect(path).await.map_err(unreachable)?;
            let mut c = PlainConn::with_limits(s, MAX_REPLY, MAX_REQUEST);
            c.send(req).await.map_err(protocol)?;
            c.recv::<ApiReply>().await.map_err(protocol)?
        }
        Target::Tcp { addr, secret } => {
            let s = tokio::net::TcpStream::connect(addr.as_str()).await.map_err(unreachable)?;
            let _ = s.set_nodelay(true);
            let c = crate::proto::secure::connect(s, secret, ADMIN_PROLOGUE).await.map_err(protocol)?;
            let mut c = c.with_limits(MAX_REPLY, MAX_REQUEST);
            c.send(req).await.map_err(protocol)?;
            c.recv::<ApiReply>().await.map_err(protocol)?
        }
    };
    reply.ok_or_else(|| ClientError::Protocol {
        where_: where_.to_string(),
        reason: "the connection closed before a reply".into(),
    })
}

/// The socket path to use: `--socket`, then `VSM_SOCKET`, then the configuration (if it
/// loads), then the built-in default.
pub fn socket_path(flag: Option<PathBuf>, config_dir: Option<PathBuf>) -> PathBuf {
    if let Some(p) = flag {
        return p;
    }
    if let Some(p) = std::env::var_os("VSM_SOCKET") {
        return PathBuf::from(p);
    }
    let dir = crate::config::config_dir_from(config_dir);
    if Path::new(&dir).is_dir() {
        if let Ok(cfg) = crate::config::load(&dir) {
            return cfg.vsmserver.socket_path;
        }
    }
    crate::config::Config::default().vsmserver.socket_path
}
