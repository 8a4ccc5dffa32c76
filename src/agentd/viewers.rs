//! Which desktops have a VNC viewer attached, read from the kernel's socket tables.
//!
//! A private desktop listens on a Unix socket: every connection Xvnc accepted shows up in
//! `/proc/net/unix` as a connected (`St` 03) entry carrying the listening socket's path, so
//! counting those entries counts the viewers, without asking Xvnc and whatever the viewer
//! is. A desktop on a TCP port is matched in `/proc/net/tcp` and `/proc/net/tcp6` by local
//! port in the `ESTABLISHED` state, which also gives the viewer's address.
//!
//! Owns: parsing those tables (pure functions, unit-tested) and [`ViewerTracker`], which
//! turns successive samples of one desktop into "attached now", "last attached at" and
//! "from where". Never: opens a connection to a desktop, or keeps more than the connections
//! open right now.
//!
//! The tables are those of the reader's network namespace, which is the desktop's: the agent
//! and the sessions it starts share it.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

/// One accepted connection: the kernel's inode of the socket (stable while it lives) and,
/// for TCP, the viewer's address.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Conn {
    pub inode: u64,
    pub peer: Option<String>,
}

/// Connected entries of `/proc/net/unix` (text) whose path is `path`.
pub fn unix_connections(table: &str, path: &Path) -> Vec<Conn> {
    let want = path.as_os_str().as_encoded_bytes();
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            // Num RefCount Protocol Flags Type St Inode Path
            let f: Vec<&str> = line.split_whitespace().collect();
            let (st, inode, p) = (f.get(5)?, f.get(6)?, f.get(7)?);
            if *st != "03" || p.as_bytes() != want {
                return None;
            }
            Some(Conn { inode: inode.parse().ok()?, peer: None })
        })
        .collect()
}

/// Established entries of `/proc/net/tcp` or `/proc/net/tcp6` (text) with local port `port`.
pub fn tcp_connections(table: &str, port: u16) -> Vec<Conn> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            // sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode
            let f: Vec<&str> = line.split_whitespace().collect();
            let (local, remote, st, inode) = (f.get(1)?, f.get(2)?, f.get(3)?, f.get(9)?);
            let (_, lport) = parse_hex_addr(local)?;
            if lport != port || *st != "01" {
                return None;
            }
            let (ip, _) = parse_hex_addr(remote)?;
            Some(Conn { inode: inode.parse().ok()?, peer: Some(canonical(ip).to_string()) })
        })
        .collect()
}

/// `0100007F:170C` or the 32-digit IPv6 form: the kernel prints each 32-bit word in host
/// order.
fn parse_hex_addr(s: &str) -> Option<(IpAddr, u16)> {
    let (a, p) = s.split_once(':')?;
    let port = u16::from_str_radix(p, 16).ok()?;
    let word = |h: &str| u32::from_str_radix(h, 16).ok().map(|w| w.to_ne_bytes());
    let ip = match a.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(a)?)),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(&a[i * 8..i * 8 + 8])?);
            }
            IpAddr::V6(Ipv6Addr::from(b))
        }
        _ => return None,
    };
    Some((ip, port))
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// The kernel's socket tables, read once per sampling round.
#[derive(Clone, Debug, Default)]
pub struct Tables {
    pub unix: String,
    pub tcp: String,
    pub tcp6: String,
}

impl Tables {
    /// Read the tables under `proc_net` (`/proc/net`); a missing table reads as empty.
    pub fn read(proc_net: &Path) -> Tables {
        let read = |name: &str| std::fs::read_to_string(proc_net.join(name)).unwrap_or_default();
        Tables { unix: read("unix"), tcp: read("tcp"), tcp6: read("tcp6") }
    }

    /// The open connections of one desktop: on its Unix socket when it has one, else on its
    /// TCP port.
    pub fn connections(&self, socket: Option<&Path>, port: u16) -> Vec<Conn> {
        match socket {
            Some(path) => unix_connections(&self.unix, path),
            None if port != 0 => {
                let mut v = tcp_connections(&self.tcp, port);
                v.extend(tcp_connections(&self.tcp6, port));
                v
            }
            None => Vec::new(),
        }
    }
}

/// What is known of one desktop's viewers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ViewerState {
    /// Viewers attached at the last sample.
    pub viewers: u32,
    /// Unix time in milliseconds at which the most recent viewer was first seen (0: never).
    pub last_attach_ms: u64,
    /// Address of that viewer when the desktop tells it (TCP); empty for a Unix socket,
    /// whose peer is the SSH daemon forwarding it.
    pub last_address: String,
}

/// Turns samples of one desktop's connections into a [`ViewerState`].
#[derive(Clone, Debug, Default)]
pub struct ViewerTracker {
    seen: BTreeSet<u64>,
    state: ViewerState,
}

impl ViewerTracker {
    pub fn state(&self) -> &ViewerState {
        &self.state
    }

    /// Take one sample taken at `now_ms`. Returns whether the state changed.
    pub fn observe(&mut self, conns: &[Conn], now_ms: u64) -> bool {
        let before = self.state.clone();
        let current: BTreeSet<u64> = conns.iter().map(|c| c.inode).collect();
        if let Some(new) = conns.iter().find(|c| !self.seen.contains(&c.inode)) {
            self.state.last_attach_ms = now_ms;
            self.state.last_address = new.peer.clone().unwrap_or_default();
        }
        self.state.viewers = current.len() as u32;
        // Only the connections open now are remembered, so this never grows.
        self.seen = current;
        self.state != before
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UNIX: &str = "Num       RefCount Protocol Flags    Type St Inode Path
0000000041afa051: 00000002 00000000 00010000 0001 01 23151 /run/vsmagent/sessions/10/vnc.sock
00000000316a70e6: 00000003 00000000 00000000 0001 03 23877 /run/vsmagent/sessions/10/vnc.sock
00000000316a70e7: 00000003 00000000 00000000 0001 03 23878 /run/vsmagent/sessions/11/vnc.sock
00000000316a70e8: 00000003 00000000 00000000 0001 03 23879
00000000316a70e9: 00000002 00000000 00000000 0001 01 23880 /run/vsmagent/sessions/10/vnc.sock.old
";

    #[test]
    fn unix_counts_only_accepted_connections_of_the_path() {
        let c = unix_connections(UNIX, Path::new("/run/vsmagent/sessions/10/vnc.sock"));
        assert_eq!(c, vec![Conn { inode: 23877, peer: None }]);
        assert!(unix_connections(UNIX, Path::new("/run/vsmagent/sessions/12/vnc.sock")).is_empty());
        assert!(unix_connections("garbage\nmore garbage", Path::new("/x")).is_empty());
    }

    // 127.0.0.1:5910 listening; 10.213.0.20:40000 -> 10.213.0.11:5910 established; the
    // client side of a local connection to 5910 (local port 40001) must not count.
    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1716 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 111 1 0 100 0 0 10 0
   1: 0B00D50A:1716 1400D50A:9C40 01 00000000:00000000 00:00000000 00000000  1000        0 222 1 0 20 4 30 10 -1
   2: 0100007F:9C41 0100007F:1716 01 00000000:00000000 00:00000000 00000000  1000        0 333 1 0 20 4 30 10 -1
";

    #[test]
    fn tcp_counts_established_connections_to_the_port_with_their_peer() {
        let c = tcp_connections(TCP, 5910);
        assert_eq!(c, vec![Conn { inode: 222, peer: Some("10.213.0.20".into()) }]);
        assert!(tcp_connections(TCP, 5911).is_empty());
        let t = Tables { unix: String::new(), tcp: TCP.into(), tcp6: TCP.into() };
        assert_eq!(t.connections(None, 5910).len(), 2);
        assert!(t.connections(None, 0).is_empty());
    }

    #[test]
    fn ipv6_and_mapped_addresses_parse() {
        // ::ffff:10.213.0.20 as the kernel prints it on little-endian hosts.
        if cfg!(target_endian = "little") {
            let (ip, port) = parse_hex_addr("0000000000000000FFFF00001400D50A:1716").unwrap();
            assert_eq!((canonical(ip).to_string(), port), ("10.213.0.20".to_string(), 5910));
        }
        assert!(parse_hex_addr("zz:1").is_none());
        assert!(parse_hex_addr("0100007F").is_none());
    }

    #[test]
    fn tracker_records_attach_time_and_forgets_closed_connections() {
        let mut t = ViewerTracker::default();
        assert!(!t.observe(&[], 1));
        let a = Conn { inode: 1, peer: Some("10.0.0.1".into()) };
        assert!(t.observe(std::slice::from_ref(&a), 100));
        assert_eq!(t.state(), &ViewerState { viewers: 1, last_attach_ms: 100, last_address: "10.0.0.1".into() });
        // The same connection later is no new attach.
        assert!(!t.observe(std::slice::from_ref(&a), 200));
        assert!(t.observe(&[], 300));
        assert_eq!(t.state().viewers, 0);
        assert_eq!(t.state().last_attach_ms, 100);
        let b = Conn { inode: 2, peer: None };
        assert!(t.observe(&[b], 400));
        assert_eq!(t.state(), &ViewerState { viewers: 1, last_attach_ms: 400, last_address: String::new() });
    }

    #[test]
    fn a_real_unix_socket_connection_is_seen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vnc.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let tables = Tables::read(Path::new("/proc/net"));
        assert!(tables.connections(Some(&path), 0).is_empty());
        let _client = std::os::unix::net::UnixStream::connect(&path).unwrap();
        let (_server, _) = listener.accept().unwrap();
        let tables = Tables::read(Path::new("/proc/net"));
        assert_eq!(tables.connections(Some(&path), 0).len(), 1);
    }
}
