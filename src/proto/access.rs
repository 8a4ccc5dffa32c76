//! Which callers may use a TCP port: the one allowed-clients check of the master's admin calls
//! (`/vsmserver/allowed_clients`) and of the agent port (`/vsmagent/allowed_clients`,
//! `/vsmagent/master_hostname`).
//!
//! Owns an [`AllowList`]: configured names and addresses, plus loopback always and, where the
//! owner asks for it ([`Local::Interfaces`], the agent), every address configured on a local
//! interface.
//!
//! Names are resolved asynchronously when a caller is checked, with a short cache, so an
//! address change in DNS (or `/etc/hosts`) is picked up without a restart and no connection
//! blocks the runtime on a lookup. A caller not on the cached list gets one fresh lookup
//! before it is refused (its address may just have changed). A name that does not resolve is
//! logged once (until it resolves again) and otherwise ignored: one bad entry must not lock
//! every other client out.
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

/// Which of this host's own addresses are allowed besides the configured ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Local {
    /// Loopback addresses only (the master's admin calls).
    Loopback,
    /// Loopback and every address on a local interface (the agent: its master may run here).
    Interfaces,
}

/// An allow list, resolved lazily and cached.
#[derive(Debug)]
pub struct AllowList {
    names: Vec<String>,
    local: Local,
    ttl: Duration,
    cache: Mutex<Option<(Instant, Vec<IpAddr>)>>,
    /// Names already logged as unresolvable, so each is logged once per outage.
    warned: Mutex<HashSet<String>>,
}

impl AllowList {
    /// `names` are the configured clients (host names or addresses); blank ones and repeats
    /// are dropped.
    pub fn new(mut names: Vec<String>, local: Local, ttl: Duration) -> Self {
        names.retain(|n| !n.trim().is_empty());
        let mut seen = HashSet::new();
        names.retain(|n| seen.insert(n.clone()));
        AllowList { names, local, ttl, cache: Mutex::new(None), warned: Mutex::new(HashSet::new()) }
    }

    /// The configured names (for logs).
    pub fn names(&self) -> &[String] {
        &self.names
    }

    async fn resolve_all(&self) -> Vec<IpAddr> {
        let mut out = match self.local {
            Local::Interfaces => local_addresses(),
            Local::Loopback => Vec::new(),
        };
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
        *self.cache.lock().unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), list.clone()));
        list
    }

    /// May `peer` connect? The caller logs and answers a refusal as its link requires.
    pub async fn check(&self, peer: IpAddr) -> bool {
        if is_allowed(peer, &self.allowed(false).await) {
            return true;
        }
        // A refused caller may be a client whose address just changed: look once more.
        is_allowed(peer, &self.allowed(true).await)
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
        let list = AllowList::new(
            vec!["192.0.2.7".into(), "no-such-host.invalid".into()],
            Local::Interfaces,
            DEFAULT_CACHE_TTL,
        );
        assert!(list.check(ip("192.0.2.7")).await);
        assert!(list.check(ip("127.0.0.1")).await);
        assert!(!list.check(ip("192.0.2.8")).await);
        assert!(list.warned.lock().unwrap().contains("no-such-host.invalid"));
    }

    #[tokio::test]
    async fn the_hosts_own_addresses_are_allowed_where_asked_for() {
        let agent = AllowList::new(vec![], Local::Interfaces, DEFAULT_CACHE_TTL);
        let master = AllowList::new(vec![], Local::Loopback, DEFAULT_CACHE_TTL);
        for a in local_addresses() {
            assert!(agent.check(a).await, "{a} is local and must be allowed");
            assert_eq!(master.check(a).await, canonical(a).is_loopback(), "{a}: only loopback without Interfaces");
        }
    }

    #[tokio::test]
    async fn names_resolve_and_repeats_and_blanks_are_dropped() {
        let list = AllowList::new(
            vec!["localhost".into(), " ".into(), "192.0.2.9".into(), "192.0.2.9".into()],
            Local::Loopback,
            DEFAULT_CACHE_TTL,
        );
        assert_eq!(list.names(), ["localhost", "192.0.2.9"]);
        assert!(list.check(ip("192.0.2.9")).await);
        assert!(list.check(ip("::ffff:192.0.2.9")).await);
        assert!(!list.check(ip("192.0.2.10")).await);
    }

    #[tokio::test]
    async fn a_stale_cache_is_looked_at_again_before_a_refusal() {
        // A zero TTL is never fresh; a long one would serve the empty list forever but for
        // the second look a refusal takes.
        let list = AllowList::new(vec!["192.0.2.7".into()], Local::Loopback, Duration::from_secs(3600));
        *list.cache.lock().unwrap() = Some((Instant::now(), vec![]));
        assert!(list.check(ip("192.0.2.7")).await);
    }
}
