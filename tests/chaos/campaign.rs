//! `vsm-chaos`: the seeded fault campaign against the namespace lab (docs/reliability.md).
//!
//! Runs against a lab that is already up in daemon mode (`scripts/chaos.sh` brings one up,
//! runs this, and takes it down): concurrent clients ([`workload`]) while the nemesis injects
//! and heals faults ([`nemesis`]); then everything is healed, the cluster is given time to
//! converge, the final state is read ([`lab`]) and the history is judged ([`checker`]).
//! Prints a summary (faults by kind, operations by outcome, anomalies with evidence), writes
//! the history as JSON, and exits 1 on any anomaly (2 when the campaign itself could not run).
//!
//! Invariant: the seed is printed before anything happens, and a run is repeated (the same
//! fault schedule and the same client choices; timing still varies) with `--seed`.

mod checker;
mod history;
mod lab;
mod nemesis;
mod workload;

use anyhow::{Context, Result};
use clap::Parser;
use history::{FinalState, Listed, MasterState, Op, Outcome};
use lab::{Lab, MASTERS};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use vsm::proto::api::{ApiReply, ApiRequest, Selector};

#[derive(Parser, Debug)]
#[command(
    name = "vsm-chaos",
    about = "Seeded fault campaign against the vsm namespace lab (run through scripts/chaos.sh)",
    after_help = "Examples:\n  scripts/chaos.sh --faults 50\n  scripts/chaos.sh --faults 1000 --seed 42"
)]
struct Args {
    /// The lab directory (VSM_LAB_DIR of the lab that is up).
    #[arg(long, env = "VSM_LAB_DIR", default_value = "/run/vsm-lab")]
    lab_dir: PathBuf,
    /// scripts/ha-lab.sh.
    #[arg(long)]
    lab_script: PathBuf,
    /// The lab's namespace prefix (VSM_LAB_PREFIX).
    #[arg(long, env = "VSM_LAB_PREFIX", default_value = "vsmlab-")]
    lab_prefix: String,
    /// The lab's /24 (VSM_LAB_NET).
    #[arg(long, env = "VSM_LAB_NET", default_value = "10.213.0")]
    lab_net: String,
    /// Seed of every random choice (default: from the clock; printed either way).
    #[arg(long)]
    seed: Option<u64>,
    /// Faults to inject.
    #[arg(long, default_value_t = 50)]
    faults: u32,
    /// Users of the workload (space- or comma-separated); they must exist on the host.
    #[arg(long, value_delimiter = ',')]
    users: Vec<String>,
    /// Concurrent clients.
    #[arg(long, default_value_t = 4)]
    clients: u32,
    /// /vsmserver/max_sessions_per_user as the lab's masters have it.
    #[arg(long, default_value_t = 1)]
    max_sessions: u32,
    /// At most this many faults at once.
    #[arg(long, default_value_t = 3)]
    max_active: usize,
    /// Seconds allowed for convergence after the heal.
    #[arg(long, default_value_t = 180)]
    converge_secs: u64,
    /// Directory for history.json and summary.txt.
    #[arg(long)]
    out: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("vsm-chaos: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(run(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("vsm-chaos: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

async fn run(args: Args) -> Result<bool> {
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64 % 1_000_000_000)
            .unwrap_or(1)
    });
    eprintln!(
        "chaos: seed {seed} (repeat with --seed {seed}), {} faults, {} clients, users {}",
        args.faults,
        args.clients,
        args.users.join(" ")
    );
    anyhow::ensure!(!args.users.is_empty(), "no users given (--users)");
    let lab = Arc::new(Lab {
        dir: args.lab_dir.clone(),
        script: args.lab_script.clone(),
        prefix: args.lab_prefix.clone(),
        net: args.lab_net.clone(),
    });
    let load_start = loadavg();
    let epoch = Instant::now();

    let stop = CancellationToken::new();
    let shared = Arc::new(workload::Shared::default());
    let (vip_tx, vip_rx) = tokio::sync::watch::channel(lab.vip_holders().await);
    let sampler = tokio::spawn(workload::sample_vip(lab.clone(), vip_tx, stop.clone()));
    let wp = workload::Params {
        users: args.users.clone(),
        clients: args.clients,
        seed,
        timeout: Duration::from_secs(30),
        think_ms: (50, 400),
    };
    let mut clients = Vec::new();
    for n in 0..wp.clients {
        clients.push(tokio::spawn(workload::client(
            n,
            lab.clone(),
            wp.clone(),
            shared.clone(),
            vip_rx.clone(),
            epoch,
            stop.clone(),
        )));
    }

    let mut nem = nemesis::Nemesis::new(
        lab.clone(),
        nemesis::Params {
            seed,
            faults: args.faults,
            max_active: args.max_active,
            gap_ms: (300, 3000),
            duration_ms: (500, 9000),
        },
        epoch,
    );
    nem.run().await;
    eprintln!("chaos: {:>8.1} s  healing everything", epoch.elapsed().as_secs_f64());
    nem.heal_all().await;
    // A little traffic after the heal, then the clients stop (in-flight calls finish or time out).
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.cancel();
    for c in clients {
        let _ = c.await;
    }
    let _ = sampler.await;
    let workload_end = epoch.elapsed();

    eprintln!(
        "chaos: {:>8.1} s  waiting for convergence (up to {} s)",
        epoch.elapsed().as_secs_f64(),
        args.converge_secs
    );
    let converged = converge(&lab, Duration::from_secs(args.converge_secs)).await;
    let mut fin = final_state(&lab).await?;
    fin.converged = converged;
    fin.max_sessions_per_user = args.max_sessions;
    let history: Vec<Op> = shared.history.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let mut verdict = checker::check(&history, &fin);
    for a in &mut verdict.anomalies {
        if let Some(id) = &a.session {
            a.evidence.extend(lab.log_lines(id, 16));
        }
    }
    let duration = epoch.elapsed();

    let summary = summarize(seed, &args, &history, &nem.records, &fin, &verdict, duration, workload_end, &load_start);
    eprint!("{summary}");
    if let Some(out) = &args.out {
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        let doc = serde_json::json!({ "seed": seed, "faults": nem.records, "operations": history, "final": fin });
        std::fs::write(out.join("history.json"), serde_json::to_vec_pretty(&doc)?)?;
        std::fs::write(out.join("summary.txt"), &summary)?;
        eprintln!("chaos: history and summary in {}", out.display());
    }
    Ok(verdict.anomalies.is_empty())
}

/// Lists each master's sessions, reduced to what both must agree on.
async fn listing(lab: &Lab, m: &str) -> Option<Vec<Listed>> {
    let req = ApiRequest::SessionList { selector: Selector::default(), refresh: false };
    match lab.call(m, &req, Duration::from_secs(10)).await {
        Ok(ApiReply::Sessions { sessions, .. }) => {
            let mut v: Vec<Listed> = sessions
                .into_iter()
                .map(|s| Listed { session: s.id.0, user: s.user, agent: s.agent, display: s.display })
                .collect();
            v.sort_by(|a, b| a.session.cmp(&b.session));
            Some(v)
        }
        _ => None,
    }
}

async fn master_state(lab: &Lab, m: &str) -> MasterState {
    let mut st = MasterState { name: m.to_string(), sessions: listing(lab, m).await, ..Default::default() };
    if let Ok(ApiReply::HaStatus { status }) = lab.call(m, &ApiRequest::HaStatus, Duration::from_secs(5)).await {
        st.digest = status.db_digest.clone();
        st.ready = Some(status.ready);
        st.link = Some(status.link.to_string());
    }
    st
}

/// Waits until both masters are ready and streaming with equal digests and lists, and list
/// exactly the desktops the agents run; false if that does not happen in time.
async fn converge(lab: &Lab, limit: Duration) -> bool {
    let until = Instant::now() + limit;
    let mut last = String::new();
    loop {
        let a = master_state(lab, MASTERS[0]).await;
        let b = master_state(lab, MASTERS[1]).await;
        let running: BTreeSet<(String, String)> =
            lab.running_desktops().map(|r| r.into_iter().map(|r| (r.session, r.agent)).collect()).unwrap_or_default();
        let listed: Option<BTreeSet<(String, String)>> =
            a.sessions.as_ref().map(|s| s.iter().map(|l| (l.session.clone(), l.agent.clone())).collect());
        let why = if a.ready != Some(true) || b.ready != Some(true) {
            format!("ready: {:?} {:?}", a.ready, b.ready)
        } else if a.link.as_deref() != Some("streaming") || b.link.as_deref() != Some("streaming") {
            format!("link: {:?} {:?}", a.link, b.link)
        } else if a.digest.is_none() || a.digest != b.digest || a.sessions != b.sessions {
            "digests or lists differ".to_string()
        } else if listed.as_ref() != Some(&running) {
            format!("{} listed, {} running", listed.map(|l| l.len()).unwrap_or(0), running.len())
        } else {
            return true;
        };
        if why != last {
            eprintln!("chaos: not converged yet: {why}");
            last = why;
        }
        if Instant::now() >= until {
            return false;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn final_state(lab: &Lab) -> Result<FinalState> {
    let mut masters = Vec::new();
    for m in MASTERS {
        masters.push(master_state(lab, m).await);
    }
    Ok(FinalState {
        masters,
        running: lab.running_desktops()?,
        panics: lab.panics(),
        converged: false,
        max_sessions_per_user: 0,
    })
}

fn outcome_label(o: &Outcome) -> String {
    match o {
        Outcome::Given { reconnected: false, .. } => "created".into(),
        Outcome::Given { reconnected: true, .. } => "reconnected".into(),
        Outcome::Terminated { failed, pending, .. } if !failed.is_empty() => {
            format!("terminated-with-failures{}", if pending.is_empty() { "" } else { "+pending" })
        }
        Outcome::Terminated { pending, .. } if !pending.is_empty() => "terminated-pending".into(),
        Outcome::Terminated { unknown, .. } if !unknown.is_empty() => "terminated-unknown".into(),
        Outcome::Terminated { .. } => "terminated".into(),
        Outcome::Refused { kind, .. } => format!("refused:{kind}"),
        Outcome::Unknown { .. } => "unknown".into(),
    }
}

#[allow(clippy::too_many_arguments)]
fn summarize(
    seed: u64,
    args: &Args,
    history: &[Op],
    faults: &[history::FaultRecord],
    fin: &FinalState,
    verdict: &checker::Verdict,
    duration: Duration,
    workload_end: Duration,
    load_start: &str,
) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(s, "==== chaos summary: seed {seed}");
    let applied: Vec<_> = faults.iter().filter(|f| f.skipped.is_none()).collect();
    let mut by_kind: BTreeMap<&str, (u32, u32)> = BTreeMap::new();
    for f in faults {
        let e = by_kind.entry(&f.kind).or_default();
        if f.skipped.is_none() {
            e.0 += 1;
        } else {
            e.1 += 1;
        }
    }
    let _ = writeln!(s, "faults: {} applied ({} could not be applied)", applied.len(), faults.len() - applied.len());
    for (k, (a, sk)) in &by_kind {
        let _ =
            writeln!(s, "  {k:<16} {a:>5}{}", if *sk > 0 { format!("  ({sk} not applied)") } else { String::new() });
    }
    let mut ops: BTreeMap<String, u32> = BTreeMap::new();
    for o in history {
        *ops.entry(outcome_label(&o.outcome)).or_default() += 1;
    }
    let sessions: BTreeSet<&str> = history
        .iter()
        .filter_map(|o| match &o.outcome {
            Outcome::Given { session, .. } => Some(session.as_str()),
            _ => None,
        })
        .collect();
    let _ = writeln!(
        s,
        "operations: {} by {} clients for {} users; {} distinct sessions given",
        history.len(),
        args.clients,
        args.users.len(),
        sessions.len()
    );
    for (k, n) in &ops {
        let _ = writeln!(s, "  {k:<28} {n:>6}");
    }
    let listed = fin.masters.first().and_then(|m| m.sessions.as_ref()).map(|v| v.len()).unwrap_or(0);
    let _ = writeln!(
        s,
        "final: {listed} sessions listed, {} desktops running, converged: {}",
        fin.running.len(),
        fin.converged
    );
    let _ = writeln!(
        s,
        "duration: {:.0} s (workload and faults {:.0} s); load average {} at the start, {} at the end",
        duration.as_secs_f64(),
        workload_end.as_secs_f64(),
        load_start,
        loadavg()
    );
    for n in verdict.notes.iter().take(20) {
        let _ = writeln!(s, "note: {n}");
    }
    let _ = writeln!(s, "anomalies: {}", verdict.anomalies.len());
    for a in &verdict.anomalies {
        let _ = write!(s, "{a}");
    }
    let _ = writeln!(s, "==== {} (seed {seed})", if verdict.anomalies.is_empty() { "PASS" } else { "FAIL" });
    s
}
