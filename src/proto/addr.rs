//! Targets as written in configuration (`host`, `host:port`, `192.0.2.7`, `192.0.2.7:904`,
//! `::1`, `[::1]:904`) and opening TCP connections to them.
//!
//! This module owns name resolution and TCP connect for outgoing links; it must never decide
//! what a failure means for the caller (that is the caller's policy). Invariant: every stream
//! it returns has `TCP_NODELAY` set, since every link is request/reply or latency-bound.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use tokio::net::TcpStream;

/// Why a target could not be parsed, resolved or connected to.
#[derive(Debug, thiserror::Error)]
pub enum AddrError {
    #[error("bad address {0:?}: expected host, host:port, an ip address or [ipv6]:port")]
    BadTarget(String),
    #[error("cannot resolve {target}: {source}")]
    Resolve { target: String, source: std::io::Error },
    #[error("{target} resolves to no address")]
    NoAddress { target: String },
    #[error("cannot connect to {target}: {source}")]
    Connect { target: String, source: std::io::Error },
}

/// A host (name or address) and a port.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Target {
    pub host: String,
    pub port: u16,
}

impl Target {
    /// Parse `s`, using `default_port` when it names no port.
    pub fn parse(s: &str, default_port: u16) -> Result<Target, AddrError> {
        let bad = || AddrError::BadTarget(s.to_string());
        let s = s.trim();
        if s.is_empty() || s.chars().any(char::is_whitespace) {
            return Err(bad());
        }
        if let Ok(sa) = s.parse::<SocketAddr>() {
            return Ok(Target { host: sa.ip().to_string(), port: sa.port() });
        }
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(Target { host: ip.to_string(), port: default_port });
        }
        if let Some(inner) = s.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
            let ip = inner.parse::<IpAddr>().map_err(|_| bad())?;
            return Ok(Target { host: ip.to_string(), port: default_port });
        }
        match s.split_once(':') {
            None => Ok(Target { host: s.to_string(), port: default_port }),
            Some((host, port)) if !host.is_empty() && !port.contains(':') => {
                let port = port.parse::<u16>().map_err(|_| bad())?;
                if port == 0 {
                    return Err(bad());
                }
                Ok(Target { host: host.to_string(), port })
            }
            Some(_) => Err(bad()),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Resolve `target` and connect to the first address that answers, with `TCP_NODELAY`.
/// Not bounded in time: wrap it in the caller's timeout.
pub async fn connect_tcp(target: &Target) -> Result<TcpStream, AddrError> {
    let shown = target.to_string();
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((target.host.as_str(), target.port))
        .await
        .map_err(|source| AddrError::Resolve { target: shown.clone(), source })?
        .collect();
    let mut last = None;
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(stream) => {
                stream.set_nodelay(true).map_err(|source| AddrError::Connect { target: shown.clone(), source })?;
                return Ok(stream);
            }
            Err(e) => last = Some(e),
        }
    }
    match last {
        Some(source) => Err(AddrError::Connect { target: shown, source }),
        None => Err(AddrError::NoAddress { target: shown }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(host: &str, port: u16) -> Target {
        Target { host: host.into(), port }
    }

    #[test]
    fn parses_every_configured_form() {
        assert_eq!(Target::parse("agent1", 904).unwrap(), t("agent1", 904));
        assert_eq!(Target::parse("agent1.example.com:9904", 904).unwrap(), t("agent1.example.com", 9904));
        assert_eq!(Target::parse("192.0.2.7", 904).unwrap(), t("192.0.2.7", 904));
        assert_eq!(Target::parse("192.0.2.7:5", 904).unwrap(), t("192.0.2.7", 5));
        assert_eq!(Target::parse("::1", 904).unwrap(), t("::1", 904));
        assert_eq!(Target::parse("[::1]", 904).unwrap(), t("::1", 904));
        assert_eq!(Target::parse("[fe80::1]:77", 904).unwrap(), t("fe80::1", 77));
        assert_eq!(Target::parse(" agent2 ", 904).unwrap(), t("agent2", 904));
    }

    #[test]
    fn rejects_nonsense() {
        for bad in ["", "host:", "host:x", "host:0", ":904", "a:b:c", "[nothost]", "a b", "h:70000"] {
            assert!(matches!(Target::parse(bad, 904), Err(AddrError::BadTarget(_))), "{bad:?} was accepted");
        }
    }

    #[test]
    fn displays_ipv6_in_brackets() {
        assert_eq!(t("::1", 904).to_string(), "[::1]:904");
        assert_eq!(t("agent", 904).to_string(), "agent:904");
    }

    #[tokio::test]
    async fn connect_refused_and_resolve_failures_are_errors() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        let r = connect_tcp(&t("127.0.0.1", port)).await;
        assert!(matches!(r, Err(AddrError::Connect { .. })), "{r:?}");
        let r = connect_tcp(&t("no-such-host.invalid", 904)).await;
        assert!(matches!(r, Err(AddrError::Resolve { .. }) | Err(AddrError::NoAddress { .. })), "{r:?}");
    }

    #[tokio::test]
    async fn connected_streams_have_nodelay() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let s = connect_tcp(&t("127.0.0.1", port)).await.unwrap();
        assert!(s.nodelay().unwrap());
    }
}
