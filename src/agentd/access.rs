//! Which callers may talk to the agent.
//!
//! Owns the allow list of the agent port: the addresses of `/vsmagent/allowed_clients`,
//! `/vsmagent/master_hostname`, and the agent itself (every loopback address and every
//! address configured on a local interface).
//!
//! Names are resolved when a caller is checked, with a short cache, so an address change
//! in DNS (or `/etc/hosts`) is picked up without a restart. A name that does not resolve is
//! logged once (until it resolves again) and otherwise ignored: one bad entry must not lock
//! every master out.
//!
//! It must never accept a caller because a lookup failed or timed out; failing closed is the
//! only safe direction. This check is on top of the authenticated channel, never instead.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a resolved allow list is reused.
pub const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(10);
/// How long one name may take to resolve.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(2);

/// An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) is the IPv4 address it carries.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

/// Is `peer` a loopback address or one of `allowed`? Pure; both sides are compared canonically.
pub fn is_allowed(peer: IpAddr, allowed: &[IpAddr]) -> bool {
    let peer = canonical(peer);
    peer.is_loopback() || allowed.iter().any(|a| canonical(*a) == peer)
}

/// Addresses configured on the host's interfaces (empty when they cannot be listed).
pub fn local_addresses() -> Vec<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    addrs
        .filter_map(|ifa| ifa.address)
        .filter_map(|sa| {
            if let Some(v4) = sa.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                sa.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .collect()
}

/// Resolve one name (or literal address) to its addresses; empty when it does not resolve.
pub async fn resolve(name: &str) -> Vec<IpAddr> {
    if let Ok(ip) = name.parse::<IpAddr>() {
        return vec![ip];
    }
    match tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((name, 0))).await {
        Ok(Ok(it)) => it.map(|sa| sa.ip()).collect(),
        _ => Vec::new(),
    }
}

/// The allow list of the agent port, resolved lazily and cached.
#[derive(Debug)]
pub struct AccessList {
    names: Vec<String>,
    ttl: Duration,
    cache: Mutex<Option<(Instant, Vec<IpAddr>)>>,
    /// Names already logged as unresolvable, so each is logged once per outage.
    warned: Mutex<HashSet<String>>,
}

impl AccessList {
    /// `names` are the configured clients (`allowed_clients` plus `master_hostname`).
    pub fn new(names: Vec<String>, ttl: Duration) -> Self {
        AccessList {
            names,
            ttl,
            cache: Mutex::new(None),
            warned: Mutex::new(HashSet::new()),
        }
    }

    /// The allow list of an agent configuration.
    pub fn from_config(agent: &crate::config::AgentConfig) -> Self {
        let mut names = agent.allowed_clients.clone();
        names.push(agent.master_hostname.clone());
        names.retain(|n| !n.trim().is_empty());
        names.dedup();
        AccessList::new(names, DEFAULT_CACHE_TTL)
    }

    /// The configured names (for logs).
    pub fn names(&self) -> &[String] {
        &self.names
    }

    async fn resolve_all(&self) -> Vec<IpAddr> {
        let mut out = local_addresses();
        for name in &self.names {
            let addrs = resolve(name).await;
            let mut warned = self.warned.lock().unwrap_or_else(|p| p.into_inner());
            if addrs.is_empty() {
                if warned.insert(name.clone()) {
                    tracing::warn!(
                        name = %name,
                        "allowed client name does not resolve; callers from it are refused until it does"
                    );
                }
            } else {
                warned.remove(name);
            }
            out.extend(addrs);
        }
        out
    }

    /// The current allow list, re-resolved when the cache is older than the TTL or `fresh`.
    async fn allowed(&self, fresh: bool) -> Vec<IpAddr> {
        if !fresh {
            let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((at, list)) = cache.as_ref() {
                if at.elapsed() < self.ttl {
                    return list.clone();
                }
            }
        }
        let list = self.resolve_all().await;
        *self.cache.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((Instant::now(), list.clone()));
        list
    }

    /// May `peer` call the agent? A refusal is logged with the caller's address.
    pub async fn check(&self, peer: IpAddr) -> bool {
        if is_allowed(peer, &self.allowed(false).await) {
            return true;
        }
        // A refused caller may be a master whose address just changed: look once more.
        if is_allowed(peer, &self.allowed(true).await) {
            return true;
        }
        tracing::warn!(peer = %peer, "refused connection from a caller not in allowed_clients, master_hostname or this host");
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn loopback_is_always_allowed() {
        assert!(is_allowed(ip("127.0.0.1"), &[]));
        assert!(is_allowed(ip("127.5.6.7"), &[]));
        assert!(is_allowed(ip("::1"), &[]));
        assert!(is_allowed(ip("::ffff:127.0.0.1"), &[]));
    }

    #[test]
    fn listed_addresses_are_allowed_others_not() {
        let allowed = [ip("10.0.0.5"), ip("fd00::5")];
        assert!(is_allowed(ip("10.0.0.5"), &allowed));
        assert!(is_allowed(ip("fd00::5"), &allowed));
        assert!(!is_allowed(ip("10.0.0.6"), &allowed));
        assert!(!is_allowed(ip("fd00::6"), &allowed));
    }

    #[test]
    fn mapped_ipv4_matches_plain_ipv4_both_ways() {
        assert!(is_allowed(ip("::ffff:10.0.0.5"), &[ip("10.0.0.5")]));
        assert!(is_allowed(ip("10.0.0.5"), &[ip("::ffff:10.0.0.5")]));
    }

    #[tokio::test]
    async fn literal_names_resolve_to_themselves() {
        assert_eq!(resolve("192.0.2.7").await, vec![ip("192.0.2.7")]);
    }

    #[tokio::test]
    async fn check_uses_configured_names_and_refuses_strangers() {
        let list = AccessList::new(
            vec!["192.0.2.7".into(), "no-such-host.invalid".into()],
            DEFAULT_CACHE_TTL,
        );
        assert!(list.check(ip("192.0.2.7")).await);
        assert!(list.check(ip("127.0.0.1")).await);
        assert!(!list.check(ip("192.0.2.8")).await);
        assert!(list.warned.lock().unwrap().contains("no-such-host.invalid"));
    }

    #[tokio::test]
    async fn the_hosts_own_addresses_are_allowed() {
        let list = AccessList::new(vec![], DEFAULT_CACHE_TTL);
        for a in local_addresses() {
            assert!(list.check(a).await, "{a} is local and must be allowed");
        }
    }
}
