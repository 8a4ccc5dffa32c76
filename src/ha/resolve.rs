//! Node resolution: which entry of `/HA/nodes` is this machine, and which is the peer.
//!
//! This module owns that one decision. It reads the host's name, name resolution and the
//! local interface addresses only through [`HostEnv`], so the rules are tested with a fake
//! host; [`SystemHostEnv`] is the real one. It must never open sockets to the peer.
//!
//! Rules (the administrator documentation's, exactly):
//! - HA off in the configuration → [`HaMode::Disabled`].
//! - `/HA/local_node` set → the entry equal to it is local ([`MatchedBy::Override`]); when it
//!   equals neither entry HA falls back.
//! - Otherwise an entry is local when it equals `uname -n` exactly, or when one of the
//!   addresses it resolves to is configured on a local interface.
//! - Exactly one entry must be local. When the decision is not safe (not exactly two entries,
//!   identical entries, no entry local, both local, an entry that neither equals `uname -n`
//!   nor resolves) the daemon runs without HA: [`HaMode::Fallback`] carries one sentence saying
//!   why and how to fix it, for the log and for `tlctl ha status`.
//!
//! Invariant: [`HaMode::Enabled`] is only returned when the local and the remote entry are
//! different and exactly one of them was recognised as this machine (or named by the
//! override).
//!
//! `uname -n` is read with `gethostname(2)`, which on Linux returns the same node name.

use crate::config::HaConfig;
use crate::model::NodeId;
use serde::Serialize;
use std::io;
use std::net::{IpAddr, ToSocketAddrs};

/// What node resolution needs to know about the host.
pub trait HostEnv {
    /// The node name, as `uname -n` prints it.
    fn hostname(&self) -> io::Result<String>;
    /// The addresses `name` resolves to (an empty list counts as not resolving).
    fn resolve(&self, name: &str) -> io::Result<Vec<IpAddr>>;
    /// Every address configured on a local interface.
    fn local_addresses(&self) -> io::Result<Vec<IpAddr>>;
}

/// The real host: `gethostname(2)`, the system resolver, `getifaddrs(3)`.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemHostEnv;

impl HostEnv for SystemHostEnv {
    fn hostname(&self) -> io::Result<String> {
        let name = nix::unistd::gethostname().map_err(io::Error::from)?;
        name.into_string()
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "host name is not UTF-8"))
    }

    fn resolve(&self, name: &str) -> io::Result<Vec<IpAddr>> {
        let mut out: Vec<IpAddr> = Vec::new();
        for addr in (name, 0u16).to_socket_addrs()? {
            let ip = addr.ip().to_canonical();
            if !out.contains(&ip) {
                out.push(ip);
            }
        }
        Ok(out)
    }

    fn local_addresses(&self) -> io::Result<Vec<IpAddr>> {
        let mut out: Vec<IpAddr> = Vec::new();
        for ifa in nix::ifaddrs::getifaddrs().map_err(io::Error::from)? {
            let Some(addr) = ifa.address else { continue };
            let ip = if let Some(v4) = addr.as_sockaddr_in() {
                IpAddr::V4(v4.ip())
            } else if let Some(v6) = addr.as_sockaddr_in6() {
                IpAddr::V6(v6.ip())
            } else {
                continue;
            };
            if !out.contains(&ip) {
                out.push(ip);
            }
        }
        Ok(out)
    }
}

/// The outcome of node resolution.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum HaMode {
    /// `/HA/enabled` is off.
    Disabled,
    /// HA runs: `local` is this machine, `remote` the peer, reached at `remote_host`.
    Enabled {
        local: NodeId,
        remote: NodeId,
        remote_host: String,
        via: MatchedBy,
    },
    /// HA is configured but the node cannot safely tell which entry it is; runs without HA.
    Fallback { reason: String },
}

/// How the local entry was recognised.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "by", content = "address", rename_all = "snake_case")]
pub enum MatchedBy {
    /// The entry equals `uname -n`.
    Hostname,
    /// The entry resolves to this address, configured on a local interface.
    Address(IpAddr),
    /// `/HA/local_node` names it.
    Override,
}

/// Decides which entry of `/HA/nodes` is local; see the module doc for the rules.
/// A fallback is logged here as a warning; the caller shows the same reason in status.
pub fn resolve_nodes(cfg: &HaConfig, env: &dyn HostEnv) -> HaMode {
    let mode = decide(cfg, env);
    match &mode {
        HaMode::Fallback { reason } => tracing::warn!("{reason}"),
        HaMode::Enabled {
            local, remote, via, ..
        } => {
            tracing::info!(%local, peer = %remote, ?via, "HA node resolution")
        }
        HaMode::Disabled => {}
    }
    mode
}

fn fallback(reason: String) -> HaMode {
    HaMode::Fallback { reason }
}

fn enabled(local: &str, remote: &str, via: MatchedBy) -> HaMode {
    HaMode::Enabled {
        local: NodeId(local.to_string()),
        remote: NodeId(remote.to_string()),
        remote_host: remote.to_string(),
        via,
    }
}

fn list_addrs(addrs: &[IpAddr]) -> String {
    if addrs.is_empty() {
        return "none".to_string();
    }
    addrs
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// What was found out about one entry of `/HA/nodes`.
struct Probe<'a> {
    entry: &'a str,
    by_name: bool,
    resolved: Result<Vec<IpAddr>, String>,
    local_addr: Option<IpAddr>,
}

impl Probe<'_> {
    fn is_local(&self) -> bool {
        self.by_name || self.local_addr.is_some()
    }
    fn via(&self) -> MatchedBy {
        match self.local_addr {
            Some(ip) if !self.by_name => MatchedBy::Address(ip),
            _ => MatchedBy::Hostname,
        }
    }
    /// How this entry matched, for messages.
    fn how_local(&self) -> String {
        match (self.by_name, self.local_addr) {
            (true, _) => format!("'{}' equals uname -n", self.entry),
            (false, Some(ip)) => format!("'{}' resolves to local address {ip}", self.entry),
            (false, None) => format!("'{}' does not match", self.entry),
        }
    }
    fn what_resolved(&self) -> String {
        match &self.resolved {
            Ok(addrs) => format!("'{}' resolves to {}", self.entry, list_addrs(addrs)),
            Err(e) => format!("'{}' does not resolve ({e})", self.entry),
        }
    }
}

fn decide<'a>(cfg: &'a HaConfig, env: &dyn HostEnv) -> HaMode {
    if !cfg.enabled {
        return HaMode::Disabled;
    }
    let (a, b) = match cfg.nodes.as_slice() {
        [a, b] => (a.as_str(), b.as_str()),
        nodes => {
            let listed = if nodes.is_empty() {
                "it is empty".to_string()
            } else {
                format!(
                    "it lists {} ({})",
                    nodes.len(),
                    nodes
                        .iter()
                        .map(|n| format!("'{n}'"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            };
            return fallback(format!(
                "HA disabled: /HA/nodes must list exactly two masters but {listed}; \
                 set it to this master's and its peer's names, identical on both nodes"
            ));
        }
    };
    if a == b {
        return fallback(format!(
            "HA disabled: both entries of /HA/nodes are '{a}', so both match this machine; \
             list this master and its peer, one entry each"
        ));
    }

    if let Some(local) = cfg.local_node.as_deref() {
        return if local == a {
            tracing::info!(
                local_node = local,
                "using /HA/local_node instead of detection"
            );
            enabled(a, b, MatchedBy::Override)
        } else if local == b {
            tracing::info!(
                local_node = local,
                "using /HA/local_node instead of detection"
            );
            enabled(b, a, MatchedBy::Override)
        } else {
            fallback(format!(
                "HA disabled: /HA/local_node is '{local}', which is not an entry of /HA/nodes \
                 ('{a}', '{b}'); set it to one of them or remove it"
            ))
        };
    }

    let hostname = env.hostname();
    let local_addrs: Vec<IpAddr> = match env.local_addresses() {
        Ok(v) => v.into_iter().map(|ip| ip.to_canonical()).collect(),
        Err(e) => {
            tracing::warn!("cannot list local interface addresses: {e}");
            vec![]
        }
    };
    let probe_entry = |entry: &'a str| -> Probe<'a> {
        let by_name = matches!(&hostname, Ok(h) if h == entry);
        let resolved = if by_name {
            Ok(vec![])
        } else {
            match env.resolve(entry) {
                Ok(v) if v.is_empty() => Err("no addresses".to_string()),
                Ok(v) => Ok(v.into_iter().map(|ip| ip.to_canonical()).collect()),
                Err(e) => Err(e.to_string()),
            }
        };
        let local_addr = match &resolved {
            Ok(addrs) => addrs.iter().find(|ip| local_addrs.contains(ip)).copied(),
            Err(_) => None,
        };
        Probe {
            entry,
            by_name,
            resolved,
            local_addr,
        }
    };
    let pa = probe_entry(a);
    let pb = probe_entry(b);
    let uname = match &hostname {
        Ok(h) => format!("uname -n is '{h}'"),
        Err(e) => format!("uname -n failed: {e}"),
    };

    for p in [&pa, &pb] {
        if !p.by_name {
            if let Err(e) = &p.resolved {
                return fallback(format!(
                    "HA disabled: '{}' in /HA/nodes does not resolve ({e}) and is not this \
                     machine's name ({uname}); make both entries resolvable (DNS or /etc/hosts) \
                     on both nodes",
                    p.entry
                ));
            }
        }
    }
    match (pa.is_local(), pb.is_local()) {
        (true, false) => enabled(a, b, pa.via()),
        (false, true) => enabled(b, a, pb.via()),
        (true, true) => fallback(format!(
            "HA disabled: both '{a}' and '{b}' in /HA/nodes match this machine ({}, {}); \
             each entry must name a different master, check /etc/hosts and DNS",
            pa.how_local(),
            pb.how_local()
        )),
        (false, false) => fallback(format!(
            "HA disabled: neither '{a}' nor '{b}' in /HA/nodes is this machine ({uname}; {}; {}; \
             local addresses {}); make one entry equal `uname -n` or resolve to a local address",
            pa.what_resolved(),
            pb.what_resolved(),
            list_addrs(&local_addrs)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::collections::BTreeMap;

    struct FakeHost {
        hostname: Result<String, String>,
        dns: BTreeMap<String, Vec<IpAddr>>,
        local: Vec<IpAddr>,
    }

    impl HostEnv for FakeHost {
        fn hostname(&self) -> io::Result<String> {
            self.hostname.clone().map_err(io::Error::other)
        }
        fn resolve(&self, name: &str) -> io::Result<Vec<IpAddr>> {
            self.dns
                .get(name)
                .cloned()
                .ok_or_else(|| io::Error::other("name or service not known"))
        }
        fn local_addresses(&self) -> io::Result<Vec<IpAddr>> {
            Ok(self.local.clone())
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// Host "primary" with 10.0.0.2; DNS knows primary.example.com (10.0.0.2),
    /// secondary.example.com (10.0.0.3) and other.example.com (10.0.0.9).
    fn host() -> FakeHost {
        let mut dns = BTreeMap::new();
        dns.insert("primary.example.com".to_string(), vec![ip("10.0.0.2")]);
        dns.insert("secondary.example.com".to_string(), vec![ip("10.0.0.3")]);
        dns.insert("other.example.com".to_string(), vec![ip("10.0.0.9")]);
        dns.insert("secondary".to_string(), vec![ip("10.0.0.3")]);
        dns.insert("loopy".to_string(), vec![ip("::ffff:127.0.0.1")]);
        FakeHost {
            hostname: Ok("primary".into()),
            dns,
            local: vec![ip("127.0.0.1"), ip("10.0.0.2"), ip("::1")],
        }
    }

    fn cfg(nodes: &[&str], local_node: Option<&str>) -> HaConfig {
        let mut c = Config::default().ha;
        c.enabled = true;
        c.nodes = nodes.iter().map(|s| s.to_string()).collect();
        c.local_node = local_node.map(str::to_string);
        c
    }

    fn reason(mode: HaMode) -> String {
        match mode {
            HaMode::Fallback { reason } => reason,
            other => panic!("expected a fallback, got {other:?}"),
        }
    }

    #[test]
    fn table() {
        struct Case {
            name: &'static str,
            nodes: &'static [&'static str],
            local_node: Option<&'static str>,
            want: Result<(&'static str, &'static str, MatchedBy), &'static [&'static str]>,
        }
        let cases = [
            Case {
                name: "by hostname",
                nodes: &["primary", "secondary"],
                local_node: None,
                want: Ok(("primary", "secondary", MatchedBy::Hostname)),
            },
            Case {
                name: "by hostname, second entry",
                nodes: &["secondary", "primary"],
                local_node: None,
                want: Ok(("primary", "secondary", MatchedBy::Hostname)),
            },
            Case {
                name: "by address",
                nodes: &["secondary.example.com", "primary.example.com"],
                local_node: None,
                want: Ok((
                    "primary.example.com",
                    "secondary.example.com",
                    MatchedBy::Address(ip("10.0.0.2")),
                )),
            },
            Case {
                name: "none matches",
                nodes: &["secondary.example.com", "other.example.com"],
                local_node: None,
                want: Err(&[
                    "neither 'secondary.example.com' nor 'other.example.com'",
                    "uname -n is 'primary'",
                    "'secondary.example.com' resolves to 10.0.0.3",
                    "local addresses 127.0.0.1, 10.0.0.2, ::1",
                    "make one entry equal `uname -n`",
                ]),
            },
            Case {
                name: "both match",
                nodes: &["primary", "primary.example.com"],
                local_node: None,
                want: Err(&[
                    "both 'primary' and 'primary.example.com'",
                    "'primary' equals uname -n",
                    "'primary.example.com' resolves to local address 10.0.0.2",
                ]),
            },
            Case {
                name: "both match through loopback",
                nodes: &["primary.example.com", "loopy"],
                local_node: None,
                want: Err(&["both", "'loopy' resolves to local address 127.0.0.1"]),
            },
            Case {
                name: "identical entries",
                nodes: &["primary", "primary"],
                local_node: None,
                want: Err(&["both entries of /HA/nodes are 'primary'"]),
            },
            Case {
                name: "three entries",
                nodes: &["primary", "secondary", "other.example.com"],
                local_node: None,
                want: Err(&[
                    "exactly two",
                    "it lists 3 ('primary', 'secondary', 'other.example.com')",
                ]),
            },
            Case {
                name: "one entry",
                nodes: &["primary"],
                local_node: None,
                want: Err(&["exactly two", "it lists 1 ('primary')"]),
            },
            Case {
                name: "no entries",
                nodes: &[],
                local_node: None,
                want: Err(&["exactly two", "it is empty"]),
            },
            Case {
                name: "remote does not resolve",
                nodes: &["primary", "ghost.example.com"],
                local_node: None,
                want: Err(&[
                    "'ghost.example.com' in /HA/nodes does not resolve (name or service not known)",
                    "resolvable",
                ]),
            },
            Case {
                name: "unresolvable, nothing matches",
                nodes: &["ghost", "secondary"],
                local_node: None,
                want: Err(&[
                    "'ghost' in /HA/nodes does not resolve",
                    "uname -n is 'primary'",
                ]),
            },
            Case {
                name: "override",
                nodes: &["ghost", "other.example.com"],
                local_node: Some("other.example.com"),
                want: Ok(("other.example.com", "ghost", MatchedBy::Override)),
            },
            Case {
                name: "override beats detection",
                nodes: &["primary", "secondary"],
                local_node: Some("secondary"),
                want: Ok(("secondary", "primary", MatchedBy::Override)),
            },
            Case {
                name: "override not in the list",
                nodes: &["primary", "secondary"],
                local_node: Some("tertiary"),
                want: Err(&[
                    "/HA/local_node is 'tertiary'",
                    "not an entry of /HA/nodes ('primary', 'secondary')",
                ]),
            },
        ];
        for case in cases {
            let got = resolve_nodes(&cfg(case.nodes, case.local_node), &host());
            match case.want {
                Ok((local, remote, via)) => assert_eq!(
                    got,
                    HaMode::Enabled {
                        local: NodeId(local.into()),
                        remote: NodeId(remote.into()),
                        remote_host: remote.into(),
                        via,
                    },
                    "case {}",
                    case.name
                ),
                Err(parts) => {
                    let r = reason(got);
                    assert!(r.starts_with("HA disabled: "), "case {}: {r}", case.name);
                    for p in parts {
                        assert!(r.contains(p), "case {}: {r:?} lacks {p:?}", case.name);
                    }
                }
            }
        }
    }

    #[test]
    fn disabled_when_ha_is_off() {
        let mut c = cfg(&["primary", "secondary"], None);
        c.enabled = false;
        assert_eq!(resolve_nodes(&c, &host()), HaMode::Disabled);
    }

    #[test]
    fn hostname_failure_still_allows_address_match() {
        let mut h = host();
        h.hostname = Err("no uts namespace".into());
        let got = resolve_nodes(&cfg(&["primary.example.com", "secondary"], None), &h);
        assert!(
            matches!(
                got,
                HaMode::Enabled {
                    via: MatchedBy::Address(_),
                    ..
                }
            ),
            "{got:?}"
        );
        let r = reason(resolve_nodes(&cfg(&["primary", "secondary"], None), &h));
        assert!(r.contains("'primary' in /HA/nodes does not resolve"), "{r}");
        assert!(r.contains("uname -n failed: no uts namespace"), "{r}");
    }

    #[test]
    fn name_match_is_exact() {
        let r = reason(resolve_nodes(
            &cfg(&["Primary", "secondary"], None),
            &host(),
        ));
        assert!(r.contains("'Primary' in /HA/nodes does not resolve"), "{r}");
    }

    #[test]
    fn system_host_env_answers() {
        let env = SystemHostEnv;
        assert!(!env.hostname().unwrap().is_empty());
        assert!(env
            .local_addresses()
            .unwrap()
            .iter()
            .any(|a| a.is_loopback()));
        assert!(env.resolve("127.0.0.1").unwrap().contains(&ip("127.0.0.1")));
    }

    #[test]
    fn mode_serializes_for_status() {
        let m = enabled("a", "b", MatchedBy::Address(ip("10.0.0.2")));
        let v = serde_json::to_value(&m).unwrap();
        assert_eq!(v["mode"], "enabled");
        assert_eq!(v["via"]["by"], "address");
        assert_eq!(v["via"]["address"], "10.0.0.2");
    }
}
