//! vsm backend: `ApiRequest::SessionPut` over the master's Unix socket, answered `Ok` once the
//! record is committed locally and (HA `ack` mode) stored by the peer.
//!
//! Two modes: `conn` keeps one connection per writer (the Unix-socket server serves many requests
//! per connection, one at a time), `call` goes through `vsm::client::call`, which connects for
//! every request. Each writer drives its connection from its own single-threaded runtime, so the
//! driver is the same thread-per-writer loop as for the other systems.
//! Must be run as root (or a member of the admin group): `SessionPut` is an admin request.

use super::{Backend, Writer};
use anyhow::{anyhow, bail, Context, Result};
use std::path::PathBuf;
use std::time::Duration;
use vsm::client::Target;
use vsm::model::{Session, SyncLevel};
use vsm::proto::api::{ApiReply, ApiRequest};
use vsm::proto::PlainConn;

#[derive(Clone, Copy)]
enum Mode {
    Conn,
    Call,
}

pub struct Vsm {
    path: PathBuf,
    mode: Mode,
    timeout: Duration,
    allow_async: bool,
}

impl Vsm {
    pub fn new(addr: &str, mode: &str, timeout: Duration, allow_async: bool) -> Result<Vsm> {
        let mode = match mode {
            "conn" => Mode::Conn,
            "call" => Mode::Call,
            other => bail!("--vsm-mode must be conn or call, got {other:?}"),
        };
        Ok(Vsm { path: PathBuf::from(addr), mode, timeout, allow_async })
    }

    fn runtime() -> Result<tokio::runtime::Runtime> {
        tokio::runtime::Builder::new_current_thread().enable_all().build().context("building a runtime")
    }
}

impl Backend for Vsm {
    fn check(&self) -> Result<String> {
        let rt = Self::runtime()?;
        let target = Target::Unix(self.path.clone());
        // The peer link may still be handshaking or catching up right after start: poll.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let status = loop {
            let reply = rt
                .block_on(vsm::client::call(&target, &ApiRequest::HaStatus, self.timeout))
                .map_err(|e| anyhow!("{e}"))?;
            let status = match reply {
                ApiReply::HaStatus { status } => *status,
                other => bail!("HaStatus answered {other:?}"),
            };
            if !status.enabled {
                // Refuse to measure a master that does not replicate: the figure would not compare.
                bail!("HA is not running on this master: {}", status.reason);
            }
            if status.link == vsm::model::LinkState::Streaming && status.ready && !status.degraded {
                break status;
            }
            if std::time::Instant::now() >= deadline {
                bail!(
                    "the peer link is {} (ready={}, degraded={}) after 30 s, expected streaming",
                    status.link,
                    status.ready,
                    status.degraded
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        if status.sync != SyncLevel::Ack && !(self.allow_async && status.sync == SyncLevel::Async) {
            bail!("/HA/sync is {}, expected ack (answer after the peer stored the change)", status.sync);
        }
        let mode = match self.mode {
            Mode::Conn => "one connection per writer",
            Mode::Call => "client::call per write",
        };
        Ok(format!(
            "vsm SessionPut, {mode}, HA {} -> {}, sync={}, link={}",
            status.local_node.as_deref().unwrap_or("?"),
            status.remote_node.as_deref().unwrap_or("?"),
            status.sync,
            status.link
        ))
    }

    fn connect(&self) -> Result<Box<dyn Writer>> {
        let rt = Self::runtime()?;
        let target = Target::Unix(self.path.clone());
        let conn = match self.mode {
            Mode::Call => None,
            Mode::Conn => {
                let s = rt
                    .block_on(tokio::net::UnixStream::connect(&self.path))
                    .with_context(|| format!("connecting to {}", self.path.display()))?;
                Some(PlainConn::new(s))
            }
        };
        Ok(Box::new(VsmWriter { rt, target, conn, timeout: self.timeout }))
    }
}

struct VsmWriter {
    rt: tokio::runtime::Runtime,
    target: Target,
    conn: Option<PlainConn<tokio::net::UnixStream>>,
    timeout: Duration,
}

impl Writer for VsmWriter {
    fn write(&mut self, s: &Session) -> Result<()> {
        let req = ApiRequest::SessionPut { session: s.clone() };
        let timeout = self.timeout;
        let reply = match self.conn.as_mut() {
            None => self.rt.block_on(vsm::client::call(&self.target, &req, timeout)).map_err(|e| anyhow!("{e}"))?,
            Some(c) => self
                .rt
                .block_on(async {
                    tokio::time::timeout(timeout, async {
                        c.send(&req).await.map_err(|e| anyhow!("sending: {e}"))?;
                        c.recv::<ApiReply>().await.map_err(|e| anyhow!("receiving: {e}"))
                    })
                    .await
                    .map_err(|_| anyhow!("no reply within {timeout:?}"))?
                })?
                .ok_or_else(|| anyhow!("the master closed the connection"))?,
        };
        match reply {
            ApiReply::Ok { .. } => Ok(()),
            other => bail!("SessionPut answered {other:?}"),
        }
    }
}
