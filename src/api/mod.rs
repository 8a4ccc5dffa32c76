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
//! - A node that is not ready (see [`Readiness`]) serves no login, terminate or admin write
//!   from its own database: such a request waits up to `/HA/ready_wait` for readiness and is
//!   then refused with `NotReady`. Read-only views still answer, marked as possibly stale.
//!   Readiness is checked when the request is admitted. The same holds for a ready standby
//!   cut off from its peer (`HaControl::decision_refusal`): two masters apart never both
//!   decide about sessions.

pub mod http;
pub mod tcp;
pub mod unix;

use crate::broker::service::{login_groups, Broker, BrokerError, ConnectRequest};
use crate::ha::handle::{Digest, HaControl};
use crate::metrics::{Metrics, OutcomeLabel, ReasonLabel};
use crate::model;
use crate::proto::api::{ApiErrorKind, ApiReply, ApiRequest, HaStatusView};
use crate::proto::connection::{Conn, Transport};
use crate::proto::listen::Limits;
use crate::proto::ProtoError;
use std::future::Future;
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

/// Everything a handler needs.
#[derive(Clone)]
pub struct Api {
    pub broker: Broker,
    pub ha: Arc<dyn HaControl>,
    pub metrics: Metrics,
}

impl Api {
    /// The connection cap and idle timeout of the master's listeners
    /// (`/vsmserver/max_connections`, `/vsmserver/idle_timeout`).
    pub fn limits(&self) -> Limits {
        let c = &self.broker.config().vsmserver;
        Limits { max_connections: c.max_connections, idle_timeout: c.idle_timeout }
    }
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
        BrokerError::TerminateFailed(_) => ApiErrorKind::TerminateFailed,
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
    pub fn new(broker: Broker, ha: Arc<dyn HaControl>, metrics: Metrics) -> Api {
        Api { broker, ha, metrics }
    }

    /// The HA node's status with what only the broker knows: the agents' clock offsets.
    pub async fn ha_status(&self, digest: Digest) -> HaStatusView {
        let mut st = self.ha.status(digest).await;
        st.agent_clock_offsets = self.broker.agent_clock_offsets();
        st
    }

    /// Lets a login or write through once the node is ready and may decide about sessions,
    /// waiting up to `/HA/ready_wait` for both; refuses it with `NotReady` otherwise (at
    /// once when waiting cannot help).
    async fn when_ready(&self, what: &str) -> Result<(), ApiReply> {
        let mut ready_rx = self.ha.readiness();
        let mut role_rx = self.ha.role();
        let deadline = tokio::time::Instant::now() + self.broker.config().ha.ready_wait;
        let mut waited_out = false;
        let (state, message) = loop {
            let state = *ready_rx.borrow_and_update();
            role_rx.borrow_and_update();
            let why = if state.is_ready() {
                match self.ha.decision_refusal() {
                    None => return Ok(()),
                    Some(why) => why.to_string(),
                }
            } else if state.is_permanent() {
                break (state, format!("{} ({})", state.refusal(), self.ha.readiness_reason()));
            } else {
                state.refusal().to_string()
            };
            if waited_out {
                break (state, why);
            }
            let change = async {
                tokio::select! {
                    r = ready_rx.changed() => r.is_ok(),
                    r = role_rx.changed() => r.is_ok(),
                }
            };
            match tokio::time::timeout_at(deadline, change).await {
                Ok(true) => {}
                // The node is shutting down, or the wait is over: one last look, then refuse.
                Ok(false) | Err(_) => waited_out = true,
            }
        };
        self.metrics.requests_refused_not_ready.inc();
        tracing::info!(readiness = %state, request = what, reason = %message, "refused: this node may not serve it now");
        Err(err(ApiErrorKind::NotReady, message))
    }

    /// For read-only answers: why they may be out of date, when the node is not ready.
    fn possibly_stale(&self) -> Option<String> {
        let r = *self.ha.readiness().borrow();
        (!r.is_ready()).then(|| self.ha.readiness_reason())
    }

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
        check_request(&req)?;
        let b = &self.broker;
        Ok(match req {
            ApiRequest::Connect { user, new, terminate_existing, geometry, client_address } => {
                let client_address = client_address.filter(|a| !a.is_empty());
                let user = self.acting_user(caller, user)?;
                self.when_ready("login").await?;
                let groups = login_groups(b.config(), &user);
                let r = ConnectRequest { user, groups, new, terminate_existing, geometry, client_address };
                match b.connect(r).await {
                    Ok(info) => ApiReply::Connected { info },
                    Err(e) => return Err(broker_err(e)),
                }
            }
            ApiRequest::MySessions { user } => {
                let user = self.acting_user(caller, user)?;
                ApiReply::Sessions {
                    sessions: b.my_sessions(&user).await.map_err(broker_err)?,
                    possibly_stale: self.possibly_stale(),
                }
            }
            ApiRequest::TerminateMine { user, session_id } => {
                let user = self.acting_user(caller, user)?;
                self.when_ready("terminate").await?;
                ApiReply::Terminated { outcome: b.terminate_mine(&user, &session_id).await.map_err(broker_err)? }
            }
            ApiRequest::SessionList { selector, refresh } => {
                self.need_admin(caller, "listing all sessions")?;
                let possibly_stale = self.possibly_stale();
                // Reconciliation writes: not from a node that is not ready.
                if refresh && possibly_stale.is_none() {
                    if let Err(e) = b.reconcile_all().await {
                        tracing::warn!(error = %e, "refresh before listing failed");
                    }
                }
                ApiReply::Sessions { sessions: b.list(&selector).await.map_err(broker_err)?, possibly_stale }
            }
            ApiRequest::SessionTerminate { selector, all, allow_abandon, dry_run } => {
                self.need_admin(caller, "terminating sessions")?;
                if !dry_run {
                    self.when_ready("terminate").await?;
                }
                ApiReply::Terminated {
                    outcome: b.terminate(&selector, all, allow_abandon, dry_run).await.map_err(broker_err)?,
                }
            }
            ApiRequest::SessionPut { session } => {
                self.need_admin(caller, "storing session records")?;
                self.when_ready("session put").await?;
                b.put(session).await.map_err(broker_err)?;
                ApiReply::Ok { message: "stored".into() }
            }
            ApiRequest::LoadList { refresh } => {
                self.need_admin(caller, "showing agent load")?;
                if refresh {
                    b.refresh_loads().await.map_err(broker_err)?;
                }
                ApiReply::Loads { agents: b.loads().await.map_err(broker_err)?, possibly_stale: self.possibly_stale() }
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
                ApiReply::Loads { agents: one, possibly_stale: self.possibly_stale() }
            }
            ApiRequest::HaStatus => ApiReply::HaStatus { status: Box::new(self.ha_status(Digest::Include).await) },
            ApiRequest::HaCheck => {
                // A round trip to the database owner: a node whose database hangs is not ready.
                if let Err(e) = b.db().status().await {
                    return Err(err(
                        ApiErrorKind::NotReady,
                        format!("not ready: the session database does not answer: {e}"),
                    ));
                }
                let ready = self.ha.readiness().borrow().is_ready();
                let reason = self.ha.readiness_reason();
                if ready {
                    ApiReply::Ok { message: reason }
                } else {
                    return Err(err(ApiErrorKind::NotReady, reason));
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
    /// See [`Conn::take_wrote_large`].
    fn take_wrote_large(&mut self) -> bool;

    /// Sends `reply` and drops it; after a large one (every session of a big cluster), the
    /// memory it took is handed back to the system.
    fn answer(&mut self, reply: ApiReply) -> impl Future<Output = Result<(), ProtoError>> + Send {
        async move {
            self.send_reply(&reply).await?;
            drop(reply);
            if self.take_wrote_large() {
                crate::proto::connection::give_back_freed_memory();
            }
            Ok(())
        }
    }
}

/// Both of the master's request links: `PlainConn` on the Unix socket, `SecureConn` on TCP.
impl<T, S> RequestConn for Conn<T, S>
where
    T: Transport + Send,
    T::Rx: Send,
    T::Tx: Send,
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send,
{
    fn recv_request(&mut self) -> impl Future<Output = Result<Option<ApiRequest>, ProtoError>> + Send {
        self.recv::<ApiRequest>()
    }
    fn send_reply<'a>(&'a mut self, r: &'a ApiReply) -> impl Future<Output = Result<(), ProtoError>> + Send + 'a {
        self.send(r)
    }
    fn take_wrote_large(&mut self) -> bool {
        Conn::take_wrote_large(self)
    }
}

/// How [`Api::serve_requests_until`] ended.
pub(crate) enum Served {
    /// The caller closed the connection, or the server shuts down.
    Closed,
    /// This request asked for the connection to be handed over; it is not answered yet.
    HandOver(Box<ApiRequest>),
}

impl Api {
    /// Answers requests on `conn` until the caller closes it, sends nothing for the idle
    /// timeout, or the server shuts down. A malformed or oversized request gets a
    /// `BadRequest` reply and ends the connection.
    pub(crate) async fn serve_requests<C: RequestConn>(
        &self,
        conn: &mut C,
        caller: &Caller,
        limits: &Limits,
        shutdown: &tokio_util::sync::CancellationToken,
    ) -> Result<(), ProtoError> {
        self.serve_requests_until(conn, caller, limits, shutdown, |_| false).await.map(|_| ())
    }

    /// [`Api::serve_requests`] until a request for which `hand_over` is true: that one is
    /// returned unanswered, and the connection is left where its next request begins.
    pub(crate) async fn serve_requests_until<C: RequestConn>(
        &self,
        conn: &mut C,
        caller: &Caller,
        limits: &Limits,
        shutdown: &tokio_util::sync::CancellationToken,
        hand_over: impl Fn(&ApiRequest) -> bool,
    ) -> Result<Served, ProtoError> {
        loop {
            let Some(req) = self.next_request(conn, limits, shutdown).await? else { return Ok(Served::Closed) };
            if hand_over(&req) {
                return Ok(Served::HandOver(Box::new(req)));
            }
            let reply = self.handle(caller, req).await;
            conn.answer(reply).await?;
        }
    }

    /// The next request on `conn`; `None` once the caller closed it or the server shuts
    /// down. A malformed request is answered `BadRequest` and returned as the error.
    pub(crate) async fn next_request<C: RequestConn>(
        &self,
        conn: &mut C,
        limits: &Limits,
        shutdown: &tokio_util::sync::CancellationToken,
    ) -> Result<Option<ApiRequest>, ProtoError> {
        let req = tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            r = limits.idle(conn.recv_request()) => r,
        };
        match req {
            Ok(r) => Ok(r),
            Err(e @ ProtoError::Idle { .. }) => Err(e),
            Err(e) => {
                let r = ApiReply::Error { kind: ApiErrorKind::BadRequest, message: format!("malformed request: {e}") };
                let _ = conn.send_reply(&r).await;
                Err(e)
            }
        }
    }
}

/// Checks every field of a request against its bound before anything acts on it: a
/// `BadRequest` naming the field and what was expected.
pub fn check_request(req: &ApiRequest) -> Result<(), ApiReply> {
    match req {
        ApiRequest::Connect { user, geometry, client_address, .. } => {
            if let Some(u) = user {
                check_field("user", u, model::MAX_USER)?;
            }
            if let Some(g) = geometry {
                if !valid_geometry(g) {
                    return Err(err(
                        ApiErrorKind::BadRequest,
                        format!("bad geometry {:?}: expected WIDTHxHEIGHT such as 1280x800", shorten(g)),
                    ));
                }
            }
            if let Some(a) = client_address.as_deref().filter(|a| !a.is_empty()) {
                if !model::valid_client_address(a) {
                    return Err(err(
                        ApiErrorKind::BadRequest,
                        format!(
                            "bad client address {:?}: expected an IP address or a host name of at most {} bytes",
                            shorten(a),
                            model::MAX_HOST
                        ),
                    ));
                }
            }
        }
        ApiRequest::MySessions { user: Some(u) } => check_field("user", u, model::MAX_USER)?,
        ApiRequest::TerminateMine { user, session_id } => {
            if let Some(u) = user {
                check_field("user", u, model::MAX_USER)?;
            }
            check_field("session id", &session_id.0, model::MAX_SESSION_ID)?;
        }
        ApiRequest::SessionPut { session } => {
            session.check_bounds().map_err(|e| err(ApiErrorKind::BadRequest, format!("bad session record: {e}")))?
        }
        _ => {}
    }
    Ok(())
}

/// A request field over its bound is a `BadRequest` naming the field.
fn check_field(field: &'static str, value: &str, max: usize) -> Result<(), ApiReply> {
    model::check_field(field, value, max).map_err(|e| err(ApiErrorKind::BadRequest, format!("bad request: {e}")))
}

/// At most 64 characters of `s`, for quoting a bad value back to the caller.
fn shorten(s: &str) -> String {
    match s.char_indices().nth(64) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

/// `WIDTHxHEIGHT`, each 1..=16384.
pub fn valid_geometry(g: &str) -> bool {
    if g.len() > model::MAX_GEOMETRY {
        return false;
    }
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
        assert!(!valid_geometry(&format!("{}1x1", "0".repeat(1 << 20))));
    }
}
