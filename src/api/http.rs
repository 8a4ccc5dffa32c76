//! The HTTP endpoint for monitoring (`/vsmserver/http_port`): `/healthz` (the daemon answers),
//! `/readyz` (200 only when ready, the same rule and reason as `tlctl ha check`) and `/metrics`
//! (Prometheus text format: sessions, agents, replication positions, lag, resyncs, degraded).
//!
//! Invariants: read-only, no authentication and nothing secret in it (bind it to loopback or
//! a management network); a slow or broken client never blocks anything but its own
//! connection, which is closed after a few seconds; requests of more than 8 KiB are dropped;
//! requests other than `GET` of the three paths get 404 or 405.

use super::Api;
use crate::proto::listen;
use std::fmt::Write as _;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_REQUEST: usize = 8192;

pub async fn serve(listener: TcpListener, api: Api, shutdown: CancellationToken, tracker: TaskTracker) {
    let limits = api.limits();
    listen::serve("http port", listener, limits, shutdown, tracker, move |stream, _peer| {
        let api = api.clone();
        async move {
            // One request per connection, so the whole exchange is bounded.
            let timeout = REQUEST_TIMEOUT.min(limits.idle_timeout);
            match tokio::time::timeout(timeout, serve_conn(stream, api)).await {
                Ok(r) => r.map_err(|e| e.to_string()),
                Err(_) => Err(format!("no complete request within {timeout:?}")),
            }
        }
    })
    .await
}

async fn serve_conn(mut s: TcpStream, api: Api) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut chunk).await?;
        if n == 0 || buf.len() + n > MAX_REQUEST {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf);
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, ctype, body) = if method != "GET" {
        ("405 Method Not Allowed", "text/plain", "only GET is supported\n".to_string())
    } else {
        match path {
            "/healthz" => ("200 OK", "text/plain", "alive\n".to_string()),
            "/readyz" => {
                let ready = api.ha.readiness().borrow().is_ready();
                let reason = format!("{}\n", api.ha.readiness_reason());
                let st = if ready { Some(api.ha.status().await) } else { None };
                if let Some(st) = st.filter(|st| st.clock_offset_exceeded) {
                    let o = st.clock_offset_ms.unwrap_or_default();
                    let body = format!(
                        "{}; warning: clock offset to the peer {o:+} ms is beyond /HA/max_clock_offset ({} ms)\n",
                        reason.trim_end(),
                        st.max_clock_offset_ms
                    );
                    ("200 OK", "text/plain", body)
                } else if ready {
                    ("200 OK", "text/plain", reason)
                } else {
                    ("503 Service Unavailable", "text/plain", reason)
                }
            }
            "/metrics" => ("200 OK", "text/plain; version=0.0.4", metrics(&api).await),
            _ => ("404 Not Found", "text/plain", "try /healthz, /readyz or /metrics\n".to_string()),
        }
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(resp.as_bytes()).await?;
    s.shutdown().await
}

/// The Prometheus exposition of this node's state.
pub async fn metrics(api: &Api) -> String {
    let st = api.ha.status().await;
    let loads = api.broker.loads().await.unwrap_or_default();
    let mut m = String::new();
    let mut gauge = |name: &str, help: &str, value: String| {
        let _ = writeln!(m, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}");
    };
    let b = |x: bool| if x { "1".to_string() } else { "0".to_string() };
    gauge("vsm_sessions", "Live sessions in the session database.", st.sessions.to_string());
    gauge("vsm_ready", "1 when the node is ready to serve (tlctl ha check).", b(st.ready));
    gauge("vsm_ha_enabled", "1 when HA replication runs.", b(st.enabled));
    gauge("vsm_role_active", "1 when this node serves clients.", b(st.role == "active"));
    gauge("vsm_ha_link_up", "1 when the peer link is streaming.", b(st.link == "streaming"));
    gauge("vsm_ha_degraded", "1 when writes were answered without the peer's acknowledgement.", b(st.degraded));
    gauge("vsm_ha_local_head", "Last position of this node's change log.", st.local_head.to_string());
    gauge("vsm_ha_peer_acked", "Position of this node's log the peer has stored.", st.peer_acked.to_string());
    gauge(
        "vsm_ha_applied_of_peer",
        "Position of the peer's log this node has applied.",
        st.applied_of_peer.to_string(),
    );
    gauge("vsm_ha_lag_changes", "Local changes the peer has not acknowledged.", st.lag_changes.to_string());
    gauge(
        "vsm_ha_lag_seconds",
        "Age of the oldest change the peer has not acknowledged.",
        format!("{:.3}", st.lag_ms as f64 / 1000.0),
    );
    gauge(
        "vsm_ha_config_digest_match",
        "1 when both masters have the same cluster configuration (absent until compared).",
        st.config_digest_match.map(b).unwrap_or_else(|| "NaN".into()),
    );
    gauge(
        "vsm_ha_clock_offset_seconds",
        "The peer's clock minus this node's, as last measured (absent until measured).",
        st.clock_offset_ms.map(|o| format!("{:.3}", o as f64 / 1000.0)).unwrap_or_else(|| "NaN".into()),
    );
    gauge(
        "vsm_ha_clock_offset_exceeded",
        "1 when the clock offset to the peer is beyond /HA/max_clock_offset.",
        b(st.clock_offset_exceeded),
    );
    gauge(
        "vsm_ha_max_clock_offset_seconds",
        "/HA/max_clock_offset.",
        format!("{:.3}", st.max_clock_offset_ms as f64 / 1000.0),
    );
    let sessions = api.broker.list(&crate::proto::api::Selector::default()).await.unwrap_or_default();
    let count = |st: crate::model::SessionStatus| sessions.iter().filter(|s| s.status == st).count().to_string();
    gauge(
        "vsm_sessions_connected",
        "Sessions with a viewer attached (as last reported by their agents).",
        count(crate::model::SessionStatus::Running),
    );
    gauge(
        "vsm_sessions_disconnected",
        "Sessions running with no viewer attached.",
        count(crate::model::SessionStatus::Disconnected),
    );
    gauge(
        "vsm_sessions_unreachable",
        "Sessions whose agent does not answer.",
        count(crate::model::SessionStatus::Unreachable),
    );
    let reachable = loads.iter().filter(|a| a.reachable).count();
    gauge("vsm_agents", "Agents known to this master.", loads.len().to_string());
    gauge("vsm_agents_reachable", "Agents that answered the last call.", reachable.to_string());
    let _ = writeln!(
        m,
        "# HELP vsm_readiness Why the node is (not) ready: 1 for the current state.\n# TYPE vsm_readiness gauge"
    );
    for r in crate::model::Readiness::ALL {
        let _ = writeln!(m, "vsm_readiness{{state=\"{r}\"}} {}", u8::from(r == st.readiness));
    }
    let _ = writeln!(
        m,
        "# HELP vsm_requests_refused_not_ready_total Logins, terminations and admin writes refused because the node was not ready.\n# TYPE vsm_requests_refused_not_ready_total counter\nvsm_requests_refused_not_ready_total {}",
        api.stats().refused_not_ready()
    );
    let _ = writeln!(m, "# HELP vsm_agent_sessions Sessions per agent.\n# TYPE vsm_agent_sessions gauge");
    for a in &loads {
        let _ = writeln!(m, "vsm_agent_sessions{{agent=\"{}\"}} {}", a.agent.replace('"', "'"), a.sessions);
    }
    let _ = writeln!(
        m,
        "# HELP vsm_agent_clock_offset_seconds Each agent's clock minus this master's, from its last load report.\n\
         # TYPE vsm_agent_clock_offset_seconds gauge"
    );
    for a in &st.agent_clock_offsets {
        let _ = writeln!(
            m,
            "vsm_agent_clock_offset_seconds{{agent=\"{}\"}} {:.3}",
            a.agent.replace('"', "'"),
            a.offset_ms as f64 / 1000.0
        );
    }
    m
}
