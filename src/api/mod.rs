//! The master's request handlers: who is calling, what they may do, and the one place where
//! broker errors become replies.
//!
//! Invariants:
//! - A caller's identity comes from the transport, never from the request: peer credentials
//!   on the Unix socket, an authenticated secure channel from an allowed host on TCP.
//! - Ordinary users see and end only their own sessions; admin requests need root, the admin
//!   group, or an allowed TCP client.
//! - Every request gets exactly one reply; failures are `ApiReply::Error` with a kind and a
//!   message meant for a person.

pub mod http;
pub mod tcp;
pub mod unix;

use crate::broker::service::{user_groups, Broker, BrokerError, ConnectRequest};
use crate::metrics::{Metrics, OutcomeLabel, ReasonLabel};
use crate::proto::api::{ApiErrorKind, ApiReply, ApiRequest, HaStatusView, VrrpState};
use crate::proto::ProtoError;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

/// Who is calling.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// A local user on the Unix socket.
    Local { uid: u32, user: String, admin: bool },
    /// A host from `/vsmserver/allowed_clients` over the authenticated TCP link.
    RemoteAdmin { addr: std::net::SocketAddr },
}

impl Caller {
    fn is_admin(&self) -> bool {
        match self {
            Caller::Local { admin, .. } => *admin,
            Caller::RemoteAdmin { .. } => true,
        }
    }
}

/// What the API needs from the HA side of the node.
pub trait HaControl: Send + Sync + 'static {
    fn status(&self) -> Pin<Box<dyn Future<Output = HaStatusView> + Send + '_>>;
    fn notify(&self, state: VrrpState) -> Pin<Box<dyn Future<Output = String> + Send + '_>>;
}

/// Everything a handler needs.
#[derive(Clone)]
pub struct Api {
    pub broker: Broker,
    pub ha: Arc<dyn HaControl>,
    pub metrics: Metrics,
}

fn err(kind: ApiErrorKind, message: impl Into<String>) -> ApiReply {
    ApiReply::Error { kind, message: message.into() }
}

fn broker_err(e: BrokerError) -> ApiReply {
    let kind = match &e {
        BrokerError::NotAllowed(_) => ApiErrorKind::NotAllowed,
        BrokerError::LimitReached { .. } => ApiErrorKind::LimitReached,
        BrokerError::NoAgentAvailable(_) => ApiErrorKind::NoAgentAvailable,
        BrokerError::StartFailed(_) => ApiErrorKind::StartFailed,
        BrokerError::NotFound(_) => ApiErrorKind::NotFound,
        BrokerError::BadRequest(_) => ApiErrorKind::BadRequest,
        BrokerError::Db(e) => {
            tracing::error!(error = %e, "database error while serving a request");
            ApiErrorKind::Internal
        }
    };
    err(kind, e.to_string())
}

impl Api {
    /// Resolves the user a request acts for: the caller, or `requested` if the caller may act
    /// for others.
    fn acting_user(&self, caller: &Caller, requested: Option<String>) -> Result<String, ApiReply> {
        match (caller, requested) {
            (Caller::Local { user, .. }, None) => Ok(user.clone()),
            (Caller::Local { user, .. }, Some(r)) if &r == user => Ok(r),
            (c, Some(r)) if c.is_admin() => Ok(r),
            (Caller::RemoteAdmin { .. }, Some(r)) => Ok(r),
            (Caller::Local { user, .. }, Some(r)) => Err(err(
                ApiErrorKind::NotAllowed,
                format!("user {user} may not act for user {r}: only root and admins may use --user"),
            )),
            (Caller::RemoteAdmin { .. }, None) => {
                Err(err(ApiErrorKind::BadRequest, "a remote caller must name the user (--user)"))
            }
        }
    }

    fn need_admin(&self, caller: &Caller, what: &str) -> Result<(), ApiReply> {
        if caller.is_admin() {
            Ok(())
        } else {
            Err(err(ApiErrorKind::NotAllowed, format!("{what} needs root or membership of /vsmserver/admin_group")))
        }
    }

    /// Serves one request.
    pub async fn handle(&self, caller: &Caller, req: ApiRequest) -> ApiReply {
        let login = matches!(req, ApiRequest::Connect { .. });
        let reply = match self.dispatch(caller, req).await {
            Ok(r) | Err(r) => r,
        };
        if login {
            self.count_login(&reply);
        }
        reply
    }

    fn count_login(&self, reply: &ApiReply) {
        match reply {
            ApiReply::Connected { info } => {
                let outcome = if info.reconnected { "reconnected" } else { "created" };
                self.metrics.logins.get_or_create(&OutcomeLabel { outcome }).inc();
            }
            ApiReply::Error { kind, .. } => {
                self.metrics.login_failures.get_or_create(&ReasonLabel { reason: kind.as_str() }).inc();
            }
            _ => {}
        }
    }

    async fn dispatch(&self, caller: &Caller, req: ApiRequest) -> Result<ApiReply, ApiReply> {
        let b = &self.broker;
        Ok(match req {
            ApiRequest::Connect { user, new, terminate_existing, geometry, client_address } => {
                let user = self.acting_user(caller, user)?;
                if let Some(g) = &geometry {
                    if !valid_geometry(g) {
                        return Err(err(
                            ApiErrorKind::BadRequest,
                            format!("bad geometry {g:?}: expected WIDTHxHEIGHT such as 1280x800"),
                        ));
                    }
                }
                let groups = user_groups(&user);
                let r = ConnectRequest { user, groups, new, terminate_existing, geometry, client_address };
                match b.connect(r).await {
                    Ok(info) => ApiReply::Connected { info },
                    Err(e) => return Err(broker_err(e)),
                }
            }
            ApiRequest::MySessions { user } => {
                let user = self.acting_user(caller, user)?;
                ApiReply::Sessions { sessions: b.my_sessions(&user).await.map_err(broker_err)? }
            }
            ApiRequest::TerminateMine { user, session_id } => {
                let user = self.acting_user(caller, user)?;
                let s = b.terminate_mine(&user, &session_id).await.map_err(broker_err)?;
                ApiReply::Terminated {
                    outcome: crate::proto::api::TerminateOutcome { terminated: vec![s], ..Default::default() },
                }
            }
            ApiRequest::SessionList { selector, refresh } => {
                self.need_admin(caller, "listing all sessions")?;
                if refresh {
                    if let Err(e) = b.reconcile_all().await {
                        tracing::warn!(error = %e, "refresh before listing failed");
                    }
                }
                ApiReply::Sessions { sessions: b.list(&selector).await.map_err(broker_err)? }
            }
            ApiRequest::SessionTerminate { selector, all, allow_abandon, dry_run } => {
                self.need_admin(caller, "terminating sessions")?;
                ApiReply::Terminated {
                    outcome: b.terminate(&selector, all, allow_abandon, dry_run).await.map_err(broker_err)?,
                }
            }
            ApiRequest::SessionPut { session } => {
                self.need_admin(caller, "storing session records")?;
                b.put(session).await.map_err(broker_err)?;
                ApiReply::Ok { message: "stored".into() }
            }
            ApiRequest::LoadList => {
                self.need_admin(caller, "showing agent load")?;
                ApiReply::Loads { agents: b.loads().await.map_err(broker_err)? }
            }
            ApiRequest::LoadShow { agent } => {
                self.need_admin(caller, "showing agent load")?;
                let all = b.loads().await.map_err(broker_err)?;
                let one: Vec<_> = all.into_iter().filter(|a| a.agent == agent).collect();
                if one.is_empty() {
                    return Err(err(
                        ApiErrorKind::NotFound,
                        format!("no agent named {agent} in any subcluster or session"),
                    ));
                }
                ApiReply::Loads { agents: one }
            }
            ApiRequest::HaStatus => ApiReply::HaStatus { status: self.ha.status().await },
            ApiRequest::HaCheck => {
                let st = self.ha.status().await;
                if st.ready {
                    ApiReply::Ok { message: "ready".into() }
                } else {
                    return Err(err(ApiErrorKind::NotReady, "not ready: resynchronising with the peer"));
                }
            }
            ApiRequest::HaNotify { state } => {
                self.need_admin(caller, "ha notify")?;
                ApiReply::Ok { message: self.ha.notify(state).await }
            }
        })
    }
}

/// A connection carrying API requests and replies: plain frames on the Unix socket, the
/// secure channel on TCP.
pub(crate) trait RequestConn: Send {
    fn recv_request(&mut self) -> impl Future<Output = Result<Option<ApiRequest>, ProtoError>> + Send;
    fn send_reply<'a>(&'a mut self, r: &'a ApiReply) -> impl Future<Output = Result<(), ProtoError>> + Send + 'a;
}

impl RequestConn for crate::proto::PlainConn<tokio::net::UnixStream> {
    fn recv_request(&mut self) -> impl Future<Output = Result<Option<ApiRequest>, ProtoError>> + Send {
        self.recv::<ApiRequest>()
    }
    fn send_reply<'a>(&'a mut self, r: &'a ApiReply) -> impl Future<Output = Result<(), ProtoError>> + Send + 'a {
        self.send(r)
    }
}

impl RequestConn for crate::proto::SecureConn<tokio::net::TcpStream> {
    fn recv_request(&mut self) -> impl Future<Output = Result<Option<ApiRequest>, ProtoError>> + Send {
        self.recv::<ApiRequest>()
    }
    fn send_reply<'a>(&'a mut self, r: &'a ApiReply) -> impl Future<Output = Result<(), ProtoError>> + Send + 'a {
        self.send(r)
    }
}

impl Api {
    /// Answers requests on `conn` until the caller closes it or the server shuts down. A
    /// malformed request gets a `BadRequest` reply and ends the connection.
    pub(crate) async fn serve_requests<C: RequestConn>(
        &self,
        conn: &mut C,
        caller: &Caller,
        shutdown: &tokio_util::sync::CancellationToken,
    ) -> Result<(), ProtoError> {
        loop {
            let req = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                r = conn.recv_request() => r,
            };
            let reply = match req {
                Ok(Some(req)) => self.handle(caller, req).await,
                Ok(None) => return Ok(()),
                Err(e) => {
                    let r =
                        ApiReply::Error { kind: ApiErrorKind::BadRequest, message: format!("malformed request: {e}") };
                    let _ = conn.send_reply(&r).await;
                    return Err(e);
                }
            };
            conn.send_reply(&reply).await?;
        }
    }
}

/// `WIDTHxHEIGHT`, each 1..=16384.
pub fn valid_geometry(g: &str) -> bool {
    let Some((w, h)) = g.split_once('x') else { return false };
    let ok = |s: &str| s.parse::<u32>().map(|v| (1..=16384).contains(&v)).unwrap_or(false);
    ok(w) && ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_validation() {
        assert!(valid_geometry("1024x768"));
        assert!(!valid_geometry("1024"));
        assert!(!valid_geometry("0x768"));
        assert!(!valid_geometry("axb"));
        assert!(!valid_geometry("99999x1"));
    }
}
