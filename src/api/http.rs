//! The HTTP endpoint for monitoring (`/vsmserver/http_port`): `/healthz` (the daemon answers),
//! `/readyz` (200 only when ready, the same rule and reason as `tlctl ha check`) and `/metrics`
//! (Prometheus text format, or OpenMetrics when the scraper asks for it; the families are
//! listed in [`crate::metrics`]).
//!
//! Invariants: read-only, no authentication and nothing secret in it (bind it to loopback or
//! a management network); a slow or broken client never blocks anything but its own
//! connection, which is closed after a few seconds; requests of more than 8 KiB are dropped;
//! `GET` and `HEAD` of the three paths are answered (`HEAD` with the headers `GET` would
//! send), other paths get 404 and other methods 405.

use super::Api;
use crate::ha::handle::Digest;
use crate::metrics::{flag, AgentLabel, Format, PeerLabel, StateLabel};
use crate::model::SessionStatus;
use crate::proto::listen;
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

/// The request line and the one header the endpoint looks at.
struct Request<'a> {
    method: &'a str,
    path: &'a str,
    accept: Option<&'a str>,
}

fn parse_request(head: &str) -> Request<'_> {
    let mut lines = head.split("\r\n");
    let mut parts = lines.next().unwrap_or("").split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let accept = lines.take_while(|l| !l.is_empty()).find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.trim().eq_ignore_ascii_case("accept").then(|| value.trim())
    });
    Request { method, path, accept }
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
    let req = parse_request(&head);
    let text = "text/plain; charset=utf-8";
    let (status, ctype, body) = if req.method != "GET" && req.method != "HEAD" {
        ("405 Method Not Allowed", text, "only GET and HEAD are supported\n".to_string())
    } else {
        match req.path {
            "/healthz" => ("200 OK", text, "alive\n".to_string()),
            "/readyz" => {
                // The reason carries the clock warning, if any, as everywhere else.
                let ready = api.ha.readiness().borrow().is_ready();
                let reason = format!("{}\n", api.ha.readiness_reason());
                if ready {
                    ("200 OK", text, reason)
                } else {
                    ("503 Service Unavailable", text, reason)
                }
            }
            "/metrics" => {
                let format = Format::from_accept(req.accept);
                ("200 OK", format.content_type(), metrics(&api, format).await)
            }
            _ => ("404 Not Found", text, "try /healthz, /readyz or /metrics\n".to_string()),
        }
    };
    let allow = if status.starts_with("405") { "Allow: GET, HEAD\r\n" } else { "" };
    let mut resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n{allow}Connection: close\r\n\r\n",
        body.len()
    );
    if req.method != "HEAD" {
        resp.push_str(&body);
    }
    s.write_all(resp.as_bytes()).await?;
    s.shutdown().await
}

/// Sets the state gauges from the node's status, then encodes every family.
pub async fn metrics(api: &Api, format: Format) -> String {
    let m = &api.metrics;
    let _one_scrape_at_a_time = m.scrape_lock().await;
    // Nothing here shows the database digest: not worth hashing every record per scrape.
    let st = api.ha_status(Digest::Omit).await;
    m.ready.set(flag(st.ready));
    for r in crate::model::Readiness::ALL {
        m.readiness.get_or_create(&StateLabel { state: r.as_str() }).set(flag(r == st.readiness));
    }
    m.role_active.set(flag(st.role == crate::model::Role::Active));
    m.ha_configured.set(flag(st.configured));
    m.ha_enabled.set(flag(st.enabled));
    m.ha_configured_but_off.set(flag(st.configured && !st.enabled));
    m.ha_link_up.set(flag(st.link == crate::model::LinkState::Streaming));
    m.ha_degraded.set(flag(st.degraded));
    m.ha_config_mismatch.set(flag(st.config_digest_match == Some(false)));
    let pos = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    m.ha_local_head.set(pos(st.local_head));
    m.ha_peer_acked.set(pos(st.peer_acked));
    m.ha_peer_head.set(pos(st.peer_head));
    m.ha_applied_of_peer.set(pos(st.applied_of_peer));
    m.ha_lag_changes.set(pos(st.lag_changes));
    m.ha_lag.set(st.lag_ms as f64 / 1000.0);
    m.ha_clock_offset.clear();
    if let (Some(o), Some(peer)) = (st.clock_offset_ms, &st.remote_node) {
        m.ha_clock_offset.get_or_create(&PeerLabel { peer: peer.clone() }).set(o as f64 / 1000.0);
    }
    m.ha_clock_offset_exceeded.set(flag(st.clock_offset_exceeded));
    m.ha_max_clock_offset.set(st.max_clock_offset_ms as f64 / 1000.0);
    m.agent_clock_offset.clear();
    for a in &st.agent_clock_offsets {
        m.agent_clock_offset.get_or_create(&AgentLabel { agent: a.agent.clone() }).set(a.offset_ms as f64 / 1000.0);
    }
    match api.broker.agent_overview().await {
        Ok(agents) => {
            m.agent_reachable.clear();
            m.agent_sessions.clear();
            let mut by_state = [0u64; SessionStatus::ALL.len()];
            for a in &agents {
                let label = AgentLabel { agent: a.agent.clone() };
                m.agent_reachable.get_or_create(&label).set(flag(a.reachable));
                m.agent_sessions.get_or_create(&label).set(pos(a.sessions.values().sum()));
                for (i, state) in SessionStatus::ALL.iter().enumerate() {
                    by_state[i] += a.sessions.get(state).copied().unwrap_or(0);
                }
            }
            for (state, n) in SessionStatus::ALL.iter().zip(by_state) {
                m.sessions.get_or_create(&StateLabel { state: state.as_str() }).set(pos(n));
            }
            m.agents.set(pos(agents.len() as u64));
            m.agents_reachable.set(pos(agents.iter().filter(|a| a.reachable).count() as u64));
        }
        // The previous figures stay: better slightly old than a false drop to zero.
        Err(e) => tracing::warn!(error = %e, "reading session counts for the metrics failed"),
    }
    m.encode(format)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_line_and_accept_header() {
        let r = parse_request("HEAD /metrics HTTP/1.1\r\nHost: x\r\nACCEPT: application/openmetrics-text\r\n\r\n");
        assert_eq!((r.method, r.path, r.accept), ("HEAD", "/metrics", Some("application/openmetrics-text")));
        let r = parse_request("GET /healthz HTTP/1.0\r\n\r\nAccept: ignored-after-the-head\r\n");
        assert_eq!((r.method, r.path, r.accept), ("GET", "/healthz", None));
        let r = parse_request("");
        assert_eq!((r.method, r.path), ("", ""));
    }
}
