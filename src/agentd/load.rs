//! Load figures of the agent host, read from `/proc`.
//!
//! Owns the parsing of `/proc/loadavg`, `/proc/meminfo` and `/proc/<pid>/status` into a
//! [`LoadReport`]. The parsers are pure functions over text so they are tested on samples;
//! [`read_load`] is the only function that touches the file system.
//!
//! It must never fail a whole report because one figure is unreadable: a missing file or
//! field yields 0 for that figure and a debug log line, since a master that cannot place
//! sessions because of a missing swap line would be worse than a slightly wrong figure.
//!
//! "Users" counts distinct real uids of running processes that belong to people: uids at
//! or above [`FIRST_HUMAN_UID`] except `nobody` (65534). Root and system daemons are left
//! out because they run on every host and would only add a constant.

use crate::proto::agent::LoadReport;
use std::collections::BTreeSet;
use std::path::Path;

/// Lowest uid counted as a person (the usual `UID_MIN` of Linux distributions).
pub const FIRST_HUMAN_UID: u32 = 1000;
/// The overflow uid of `nobody`, never counted as a person.
pub const NOBODY_UID: u32 = 65534;

/// `/proc/loadavg` → (load1, load5, load15).
pub fn parse_loadavg(text: &str) -> Option<(f64, f64, f64)> {
    let mut it = text.split_whitespace();
    let a = it.next()?.parse().ok()?;
    let b = it.next()?.parse().ok()?;
    let c = it.next()?.parse().ok()?;
    Some((a, b, c))
}

/// Memory figures in KiB, from `/proc/meminfo`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemInfo {
    pub mem_total_kib: u64,
    pub mem_available_kib: u64,
    pub swap_total_kib: u64,
    pub swap_free_kib: u64,
}

/// `/proc/meminfo` → [`MemInfo`]; fields that are missing stay 0.
pub fn parse_meminfo(text: &str) -> MemInfo {
    let mut m = MemInfo::default();
    for line in text.lines() {
        let Some((key, rest)) = line.split_once(':') else {
            continue;
        };
        let Some(value) = rest.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()) else {
            continue;
        };
        match key.trim() {
            "MemTotal" => m.mem_total_kib = value,
            "MemAvailable" => m.mem_available_kib = value,
            "SwapTotal" => m.swap_total_kib = value,
            "SwapFree" => m.swap_free_kib = value,
            _ => {}
        }
    }
    m
}

/// The real uid from the `Uid:` line of `/proc/<pid>/status`.
pub fn parse_status_uid(text: &str) -> Option<u32> {
    text.lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Number of distinct uids that count as people (see the module doc).
pub fn count_human_users(uids: impl IntoIterator<Item = u32>) -> u32 {
    let set: BTreeSet<u32> = uids.into_iter().filter(|&u| u >= FIRST_HUMAN_UID && u != NOBODY_UID).collect();
    set.len() as u32
}

/// Number of processors from `/proc/cpuinfo` (lines starting with `processor`).
pub fn parse_cpuinfo_count(text: &str) -> u32 {
    text.lines().filter(|l| l.split(':').next().map(str::trim) == Some("processor")).count() as u32
}

fn read_text(path: &Path) -> Option<String> {
    match std::fs::read_to_string(path) {
        Ok(t) => Some(t),
        Err(e) => {
            tracing::debug!(path = %path.display(), error = %e, "cannot read load source");
            None
        }
    }
}

fn cpu_count(proc_root: &Path) -> u32 {
    if let Ok(n) = std::thread::available_parallelism() {
        return n.get() as u32;
    }
    read_text(&proc_root.join("cpuinfo")).map(|t| parse_cpuinfo_count(&t)).unwrap_or(0).max(1)
}

fn process_uids(proc_root: &Path) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir(proc_root) else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit())))
        // A process may exit between listing and reading: that is not an error.
        .filter_map(|e| std::fs::read_to_string(e.path().join("status")).ok())
        .filter_map(|t| parse_status_uid(&t))
        .collect()
}

/// Read the current load from `proc_root` (normally `/proc`).
pub fn read_load(proc_root: &Path, hostname: &str, sessions: u32) -> LoadReport {
    let (load1, load5, load15) =
        read_text(&proc_root.join("loadavg")).and_then(|t| parse_loadavg(&t)).unwrap_or((0.0, 0.0, 0.0));
    let mem = read_text(&proc_root.join("meminfo")).map(|t| parse_meminfo(&t)).unwrap_or_default();
    LoadReport {
        hostname: hostname.to_string(),
        cpus: cpu_count(proc_root),
        load1,
        load5,
        load15,
        mem_total_kib: mem.mem_total_kib,
        mem_available_kib: mem.mem_available_kib,
        swap_total_kib: mem.swap_total_kib,
        swap_free_kib: mem.swap_free_kib,
        users: count_human_users(process_uids(proc_root)),
        sessions,
        now_ms: 0,
    }
}

/// The host name, or an empty string when it cannot be read.
pub fn hostname() -> String {
    nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEMINFO: &str = "MemTotal:        8040360 kB\nMemFree:          512000 kB\n\
MemAvailable:    4020180 kB\nBuffers:          100000 kB\nSwapCached:            0 kB\n\
SwapTotal:       2097148 kB\nSwapFree:        2000000 kB\nHugePages_Total:       0\n";

    #[test]
    fn loadavg_parses_three_figures() {
        assert_eq!(parse_loadavg("0.52 1.03 2.50 2/512 12345\n"), Some((0.52, 1.03, 2.5)));
        assert_eq!(parse_loadavg("0.52 x"), None);
        assert_eq!(parse_loadavg(""), None);
    }

    #[test]
    fn meminfo_picks_the_four_fields() {
        let m = parse_meminfo(MEMINFO);
        assert_eq!(
            m,
            MemInfo {
                mem_total_kib: 8040360,
                mem_available_kib: 4020180,
                swap_total_kib: 2097148,
                swap_free_kib: 2000000
            }
        );
    }

    #[test]
    fn meminfo_missing_fields_are_zero() {
        let m = parse_meminfo("MemTotal: 100 kB\ngarbage line\nSwapFree: notanumber kB\n");
        assert_eq!(m.mem_total_kib, 100);
        assert_eq!(m.swap_free_kib, 0);
        assert_eq!(m.mem_available_kib, 0);
    }

    #[test]
    fn status_uid_is_the_real_uid() {
        let s = "Name:\tbash\nState:\tS (sleeping)\nUid:\t1001\t0\t1001\t1001\nGid:\t100\n";
        assert_eq!(parse_status_uid(s), Some(1001));
        assert_eq!(parse_status_uid("Name:\tx\n"), None);
    }

    #[test]
    fn human_users_exclude_system_and_nobody_and_repeat() {
        assert_eq!(count_human_users([0, 1, 999, 1000, 1000, 1001, 65534, 70000]), 3);
        assert_eq!(count_human_users([]), 0);
    }

    #[test]
    fn cpuinfo_counts_processor_lines() {
        let t = "processor\t: 0\nmodel name\t: x\n\nprocessor\t: 1\nmodel name\t: x\n";
        assert_eq!(parse_cpuinfo_count(t), 2);
    }

    #[test]
    fn read_load_on_a_fake_proc_tree() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("loadavg"), "1.00 2.00 3.00 1/1 1\n").unwrap();
        std::fs::write(dir.path().join("meminfo"), MEMINFO).unwrap();
        for (pid, uid) in [("10", 1000), ("11", 1000), ("12", 0), ("13", 1002)] {
            std::fs::create_dir(dir.path().join(pid)).unwrap();
            std::fs::write(dir.path().join(pid).join("status"), format!("Uid:\t{uid}\t{uid}\n")).unwrap();
        }
        let r = read_load(dir.path(), "agent1", 4);
        assert_eq!((r.load1, r.load5, r.load15), (1.0, 2.0, 3.0));
        assert_eq!(r.mem_total_kib, 8040360);
        assert_eq!(r.users, 2);
        assert_eq!(r.sessions, 4);
        assert_eq!(r.hostname, "agent1");
        assert!(r.cpus >= 1);
    }
}
