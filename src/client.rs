//! Client side of the master's API, shared by `vsmclient` and `tlctl`: connect over the Unix
//! socket (or, for admin hosts, over the authenticated TCP link), send one request, read one
//! reply, all under a deadline.
//!
//! Invariant: every failure to reach or understand the master becomes a [`ClientError`] whose
//! message says what to check; nothing here panics on what the master sends.

use crate::proto::api::{ApiReply, ApiRequest, ADMIN_PROLOGUE, MAX_REPLY, MAX_REQUEST};
use crate::proto::secure::Secret;
use crate::proto::PlainConn;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach vsmserver at {where_}: {reason} (is vsmserver running? check `systemctl status vsmserver`)")]
    Unreachable { where_: String, reason: String },
    #[error("vsmserver at {where_} did not answer within {ms} ms")]
    Timeout { where_: String, ms: u64 },
    #[error("talking to vsmserver at {where_}: {reason}")]
    Protocol { where_: String, reason: String },
    #[error("cannot tell where vsmserver's socket is: the configuration in {} does not load (give --socket or set VSM_SOCKET to skip it):\n{errors}", dir.display())]
    Config { dir: PathBuf, errors: crate::config::ConfigErrors },
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

/// The socket path to use: `--socket`, then `VSM_SOCKET`, then `/vsmserver/socket_path` of the
/// configuration directory, then, only when that directory does not exist, the built-in
/// default. A configuration that exists but does not load is an error, never a reason to guess.
/// Loading resolves no name and reads no secret, so this works for any user.
pub fn socket_path(flag: Option<PathBuf>, config_dir: Option<PathBuf>) -> Result<PathBuf, ClientError> {
    if let Some(p) = flag {
        return Ok(p);
    }
    if let Some(p) = std::env::var_os("VSM_SOCKET") {
        return Ok(PathBuf::from(p));
    }
    let dir = crate::config::config_dir_from(config_dir);
    match crate::config::load(&dir) {
        Ok(cfg) => Ok(cfg.vsmserver.socket_path),
        Err(errors) if matches!(&errors.0[..], [crate::config::ConfigError::MissingDir { .. }]) => {
            Ok(crate::config::Config::default().vsmserver.socket_path)
        }
        Err(errors) => Err(ClientError::Config { dir, errors }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_socket_path_needs_neither_dns_nor_secrets_and_never_guesses() {
        if std::env::var_os("VSM_SOCKET").is_some() {
            return; // the environment decides; nothing to test here
        }
        let dir = tempfile::tempdir().unwrap();
        // HA on, agents that do not resolve, and a secret file that does not exist.
        std::fs::write(
            dir.path().join("ha.toml"),
            "[HA]\nenabled = true\nnodes = [\"m1\", \"m2\"]\nsecret_file = \"/nonexistent/ha.key\"\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("cluster.toml"), "[subclusters.default]\nagents = [\"agent.invalid\"]\n")
            .unwrap();
        std::fs::write(dir.path().join("vsmserver.toml"), "[vsmserver]\nsocket_path = \"/run/test/vsm.sock\"\n")
            .unwrap();
        let path = socket_path(None, Some(dir.path().to_path_buf())).unwrap();
        assert_eq!(path, PathBuf::from("/run/test/vsm.sock"));
        // The flag wins without reading anything.
        assert_eq!(socket_path(Some("/x.sock".into()), Some("/nonexistent".into())).unwrap(), PathBuf::from("/x.sock"));
        // No configuration directory at all: the built-in default.
        let none = socket_path(None, Some(dir.path().join("missing"))).unwrap();
        assert_eq!(none, crate::config::Config::default().vsmserver.socket_path);
        // A configuration that does not load is an error naming it, not the default.
        std::fs::write(dir.path().join("vsmserver.toml"), "[vsmserver\n").unwrap();
        let e = socket_path(None, Some(dir.path().to_path_buf())).unwrap_err().to_string();
        assert!(e.contains(&dir.path().display().to_string()), "{e}");
        assert!(e.contains("vsmserver.toml: not valid TOML"), "{e}");
        assert!(e.contains("--socket"), "{e}");
    }
}
