//! The network-namespace end-to-end tests (`tests/e2e/*.sh`, `tests/ocf/run.sh`) as part of
//! `cargo test`, against the binaries cargo built for this test run.
//!
//! Runs only as root with the tools of `scripts/install-test-deps.sh` installed. Built without
//! root (see `build.rs`), the test is marked ignored, so the run reports it as skipped; built as
//! root with a tool missing, it fails and names the tool. The scripts share namespace names and lab directories, so
//! they run one after another inside this one test, and an exclusive lock on
//! `/run/vsm-e2e.lock` keeps test runs of other checkouts on the same machine from running
//! theirs at the same time. Each script streams its output, must exit 0, and is stopped (TERM
//! to its process group, so its cleanup runs, then KILL) if it overruns its time limit.

use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

/// Tools the scripts need (see scripts/install-test-deps.sh).
const TOOLS: &[&str] = &[
    "ip",
    "unshare",
    "keepalived",
    "sshd",
    "ssh",
    "ssh-keygen",
    "Xvnc",
    "ocf-tester",
    "xmllint",
    "jq",
    "useradd",
    "Xvfb",
    "xtigervncviewer",
    "xwd",
    "xwininfo",
    "xdpyinfo",
    "xauth",
    "xsetroot",
];

/// Tools of the other HA managers, needed only by their steps.
const PACEMAKER_TOOLS: &[&str] = &["corosync", "corosync-keygen", "pacemakerd", "crm_mon", "pcs", "arping"];
const HEARTBEAT_TOOLS: &[&str] = &["/usr/libexec/heartbeat/heartbeat", "ifconfig", "cl_status"];

/// One script to run, with its arguments, extra environment, time limit and the tools it
/// needs beyond [`TOOLS`] (a step whose tools are missing fails, naming them).
struct Step {
    name: &'static str,
    script: PathBuf,
    args: Vec<String>,
    env: Vec<(&'static str, String)>,
    limit: Duration,
    needs: &'static [&'static str],
    /// A summary the script writes; when the step fails, its verdict lines go into the
    /// test's failure message (the part of a long run's output that a CI log keeps).
    report: Option<PathBuf>,
}

/// The verdict of a report: from its `anomalies:` line on, at most `max` lines.
fn verdict_lines(report: &Path, max: usize) -> String {
    let Ok(text) = std::fs::read_to_string(report) else {
        return format!("(no report at {})", report.display());
    };
    let mut out: Vec<&str> = text.lines().skip_while(|l| !l.starts_with("anomalies:")).take(max + 1).collect();
    if out.len() > max {
        out[max] = "...";
    }
    out.join("\n")
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The directory of the binaries cargo built for this run (target/release or target/debug).
fn bin_dir() -> PathBuf {
    let server = PathBuf::from(env!("CARGO_BIN_EXE_vsmserver"));
    server.parent().map(Path::to_path_buf).unwrap_or_else(|| repo().join("target/debug"))
}

fn on_path(tool: &str) -> bool {
    if tool.starts_with('/') {
        return Path::new(tool).is_file();
    }
    let sbin = ["/usr/sbin", "/sbin"].iter().map(PathBuf::from);
    let path = std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect::<Vec<_>>()).unwrap_or_default();
    path.into_iter().chain(sbin).any(|d| d.join(tool).is_file())
}

/// A line on our stderr that the test harness does not capture, so progress and skip notes
/// show without `--nocapture`, in order with the scripts' own output.
fn note(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// Runs one script to completion within `limit`; its output goes straight to ours.
fn run(name: &str, script: &Path, args: &[&str], env: &[(&str, String)], limit: Duration) -> Result<(), String> {
    note(&format!("e2e: ===== {name}: {} {}", script.display(), args.join(" ")));
    let started = Instant::now();
    let mut cmd = Command::new("bash");
    cmd.arg(script).args(args).current_dir(repo()).process_group(0);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().map_err(|e| format!("{name}: cannot start {}: {e}", script.display()))?;
    let pgid = Pid::from_raw(child.id() as i32);
    let status: ExitStatus = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) => {}
            Err(e) => return Err(format!("{name}: waiting for it failed: {e}")),
        }
        if started.elapsed() > limit {
            note(&format!("e2e: {name} overran {} s; stopping it", limit.as_secs()));
            let _ = killpg(pgid, Signal::SIGTERM);
            let grace = Instant::now();
            let s = loop {
                if let Ok(Some(s)) = child.try_wait() {
                    break Some(s);
                }
                if grace.elapsed() > Duration::from_secs(60) {
                    break None;
                }
                std::thread::sleep(Duration::from_millis(100));
            };
            if s.is_none() {
                let _ = killpg(pgid, Signal::SIGKILL);
                let _ = child.wait();
            }
            return Err(format!("{name}: timed out after {} s", limit.as_secs()));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    note(&format!("e2e: ===== {name}: {status} after {:.1} s", started.elapsed().as_secs_f64()));
    if status.success() {
        Ok(())
    } else {
        Err(format!("{name}: {status}"))
    }
}

#[test]
#[cfg_attr(
    not(vsm_root),
    ignore = "needs root: network namespaces, bridges and mounts (run `cargo test --release` as root)"
)]
fn namespace_end_to_end_tests() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "e2e: built as root but running as another user; rebuild as the user who runs the tests (touch build.rs)"
    );
    let missing: Vec<&str> = TOOLS.iter().copied().filter(|t| !on_path(t)).collect();
    assert!(missing.is_empty(), "e2e: missing {} (run scripts/install-test-deps.sh as root)", missing.join(", "));
    let bins = bin_dir();
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open("/run/vsm-e2e.lock")
        .expect("open /run/vsm-e2e.lock");
    note("e2e: waiting for /run/vsm-e2e.lock (one namespace test run per machine)");
    let _lock = Flock::lock(lock, FlockArg::LockExclusive).map_err(|(_, e)| e).expect("lock /run/vsm-e2e.lock");

    let e2e = repo().join("tests/e2e");
    let bin = ("VSM_BIN_DIR", bins.display().to_string());
    let min = |m: u64| Duration::from_secs(60 * m);
    let step = |name, script: PathBuf, args: Vec<String>, env: Vec<(&'static str, String)>, limit| Step {
        name,
        script,
        args,
        env,
        limit,
        needs: &[],
        report: None,
    };
    let manager = |name, manager: &str, needs, limit| Step {
        needs,
        ..step(
            name,
            e2e.join("failover.sh"),
            vec![],
            vec![bin.clone(), ("VSM_LAB_MANAGER", manager.to_string())],
            limit,
        )
    };
    let chaos_out = repo().join("target/e2e-artifacts/chaos");
    // A summary left by an earlier run must not stand in for this run's.
    let _ = std::fs::remove_file(chaos_out.join("summary.txt"));
    let steps = vec![
        step("keepalived-configs", e2e.join("keepalived-configs.sh"), vec![], vec![], min(1)),
        step("ocf", repo().join("tests/ocf/run.sh"), vec![bins.display().to_string()], vec![], min(3)),
        step("lab-smoke", e2e.join("lab-smoke.sh"), vec![], vec![], min(3)),
        step("lab-daemons", e2e.join("lab-daemons.sh"), vec![], vec![], min(2)),
        step(
            "failover (fast profile)",
            e2e.join("failover.sh"),
            vec![],
            vec![bin.clone(), ("VSM_LAB_PROFILE", "fast".into())],
            min(4),
        ),
        step(
            "seat (vsmconnect, private desktop, failover)",
            e2e.join("seat.sh"),
            vec![],
            vec![bin.clone(), ("VSM_E2E_ARTIFACTS", repo().join("target/e2e-artifacts/seat").display().to_string())],
            min(4),
        ),
        step(
            "failover (guide profile)",
            e2e.join("failover.sh"),
            vec![],
            vec![bin.clone(), ("VSM_LAB_PROFILE", "guide".into())],
            min(4),
        ),
        step(
            "keepalived as the guide publishes it",
            e2e.join("guide-as-published.sh"),
            vec![],
            vec![bin.clone()],
            min(4),
        ),
        Step {
            needs: PACEMAKER_TOOLS,
            ..step("cluster-configs", e2e.join("cluster-configs.sh"), vec![], vec![], min(1))
        },
        manager("failover (Pacemaker/Corosync)", "pacemaker", PACEMAKER_TOOLS, min(6)),
        manager("failover (Heartbeat)", "heartbeat", HEARTBEAT_TOOLS, min(6)),
        // Last, so that a failure's summary ends the log.
        Step {
            report: Some(chaos_out.join("summary.txt")),
            ..step(
                "chaos (seeded fault campaign, 50 faults)",
                repo().join("scripts/chaos.sh"),
                vec![
                    "--faults".into(),
                    "50".into(),
                    // A fixed schedule, so that the suite's verdict does not depend on the clock;
                    // VSM_CHAOS_SEED chooses another, `scripts/chaos.sh` alone draws one.
                    "--seed".into(),
                    std::env::var("VSM_CHAOS_SEED").unwrap_or_else(|_| "11".into()),
                    "--keep-logs".into(),
                    chaos_out.display().to_string(),
                ],
                vec![bin.clone(), ("VSM_E2E_LOCK_HELD", "1".into())],
                min(8),
            )
        },
    ];
    let started = Instant::now();
    let mut failures = Vec::new();
    for st in &steps {
        let missing: Vec<&str> = st.needs.iter().copied().filter(|t| !on_path(t)).collect();
        if !missing.is_empty() {
            let why = format!("{}: missing {} (run scripts/install-test-deps.sh as root)", st.name, missing.join(", "));
            note(&format!("e2e: FAILED {why}"));
            failures.push(why);
            continue;
        }
        let args: Vec<&str> = st.args.iter().map(String::as_str).collect();
        if let Err(mut e) = run(st.name, &st.script, &args, &st.env, st.limit) {
            note(&format!("e2e: FAILED {e}"));
            if let Some(report) = &st.report {
                e = format!("{e}\n{}", verdict_lines(report, 14));
            }
            failures.push(e);
        }
    }
    note(&format!(
        "e2e: {} script(s) in {:.0} s, {} failed",
        steps.len(),
        started.elapsed().as_secs_f64(),
        failures.len()
    ));
    assert!(failures.is_empty(), "e2e scripts failed: {}", failures.join("; "));
}
