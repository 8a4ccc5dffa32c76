//! `tlctl`: the administrator's view of the cluster: sessions, agent load and HA state.
//! It talks to the local `vsmserver` over its Unix socket as root (or a member of the admin
//! group), or to a remote master over the authenticated TCP link from an allowed host.

use crate::client::{call, Target};
use crate::model::{now_ms, Session};
use crate::proto::api::{AgentLoad, ApiReply, ApiRequest, HaStatusView, Selector, TerminateOutcome, VrrpState};
use crate::proto::secure::Secret;
use clap::{Args as ClapArgs, Parser, Subcommand, ValueEnum};
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "tlctl",
    version,
    about = "Administer the vsm cluster: sessions, agent load and high availability",
    after_help = "Examples:\n  tlctl session list                       every session\n  tlctl session list --user alice --json   alice's sessions as JSON\n  tlctl session terminate --agent agent1   end all sessions on agent1 (asks first)\n  tlctl session terminate --user bob -y --allow-abandon\n  tlctl load list                          load of every agent\n  tlctl ha status                          HA state of this master\n  tlctl ha check                           exit 0 only if this master is alive and ready\n  tlctl ha watch --track-file /run/vsm-watch/vsmserver.track   keepalived track file, crash noticed at once\n  tlctl --host tlha-primary session list   ask a remote master (needs /vsm/secret_file)\n\nExit status: 0 done; 1 refused or failed; 2 vsmserver did not answer; 75 this master is not ready\n(resynchronising with its peer, or HA configured but off): a change was refused, try again."
)]
pub struct Args {
    #[command(flatten)]
    local: super::SocketArgs,
    /// Ask the master on this host over TCP instead of the local socket.
    #[arg(long, global = true)]
    host: Option<String>,
    /// TCP port of the remote master (default /vsmserver/listen_port).
    #[arg(long, global = true)]
    port: Option<u16>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// Give up after this many seconds.
    #[arg(long, global = true, default_value_t = 30)]
    timeout: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// List or terminate sessions.
    #[command(
        subcommand,
        after_help = "Examples:\n  tlctl session list --agent agent1\n  tlctl session terminate --user alice -y"
    )]
    Session(SessionCmd),
    /// Show agent load.
    #[command(subcommand, after_help = "Examples:\n  tlctl load list --sort cpu\n  tlctl load show agent1")]
    Load(LoadCmd),
    /// High availability: status, health check, keepalived notify hook.
    #[command(subcommand, after_help = "Examples:\n  tlctl ha status\n  tlctl ha check --quiet")]
    Ha(HaCmd),
}

#[derive(ClapArgs, Debug, Default, Clone)]
struct Filters {
    /// Only sessions of this user.
    #[arg(long)]
    user: Option<String>,
    /// Only sessions on this agent.
    #[arg(long)]
    agent: Option<String>,
    /// Only sessions on this display number.
    #[arg(long)]
    display: Option<u32>,
    /// Only sessions in this subcluster.
    #[arg(long)]
    subcluster: Option<String>,
}

impl Filters {
    fn selector(&self) -> Selector {
        Selector {
            user: self.user.clone(),
            agent: self.agent.clone(),
            display: self.display,
            subcluster: self.subcluster.clone(),
        }
    }
}

#[derive(Subcommand, Debug)]
enum SessionCmd {
    /// List sessions; filters combine with AND.
    #[command(
        after_help = "Examples:\n  tlctl session list                              every session\n  tlctl session list --user alice --agent agent1  alice's sessions on agent1\n  tlctl session list --refresh --json             ask the agents first; JSON for scripts"
    )]
    List {
        #[command(flatten)]
        filters: Filters,
        /// Ask every agent first instead of showing the last known state.
        #[arg(long)]
        refresh: bool,
    },
    /// Terminate the selected sessions (asks for confirmation unless -y; --json needs -y).
    #[command(
        after_help = "Examples:\n  tlctl session terminate --user alice           list alice's sessions, ask, end them\n  tlctl session terminate --agent agent1 -y      end every session on agent1 without asking\n  tlctl session terminate --all -y --json        end everything; the outcome as JSON\n  tlctl session terminate --agent dead1 -y --allow-abandon\n                                                 forget sessions of an unreachable agent"
    )]
    Terminate {
        #[command(flatten)]
        filters: Filters,
        /// Select every session.
        #[arg(long)]
        all: bool,
        /// Forget sessions whose agent cannot be reached (their processes may remain).
        #[arg(long)]
        allow_abandon: bool,
        /// Do not ask for confirmation.
        #[arg(short = 'y', long = "assume-yes")]
        yes: bool,
    },
}

#[derive(Subcommand, Debug)]
enum LoadCmd {
    /// Load of every agent.
    #[command(
        after_help = "Examples:\n  tlctl load list                    the last reported load of every agent\n  tlctl load list --refresh          ask every agent now (a new agent shows at once)\n  tlctl load list --sort mem --json"
    )]
    List {
        /// Sort by this column.
        #[arg(long, value_enum, default_value_t = SortBy::Agent)]
        sort: SortBy,
        /// Ask every agent for its load now instead of showing the last known figures.
        #[arg(long)]
        refresh: bool,
    },
    /// Everything known about one agent.
    #[command(
        after_help = "Examples:\n  tlctl load show agent1.example.com\n  tlctl load show agent1.example.com --json"
    )]
    Show {
        /// The agent's name as listed by `tlctl load list`.
        agent: String,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum SortBy {
    Agent,
    Users,
    Sessions,
    Mem,
    Cpu,
}

#[derive(Subcommand, Debug)]
enum HaCmd {
    /// HA state of this master.
    #[command(
        after_help = "Examples:\n  tlctl ha status\n  tlctl ha status --json\n  tlctl --host tlha-secondary ha status   the other master, over TCP"
    )]
    Status,
    /// Exit 0 only when this master answers and is ready (keepalived vrrp_script, Pacemaker monitor).
    #[command(
        after_help = "Examples:\n  tlctl ha check            prints ready, or why not, and sets the exit status\n  tlctl ha check --quiet    exit status only (1 not ready, 2 no answer)"
    )]
    Check {
        /// Print nothing.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Keep FILE at 0 while this master answers and is ready, 1 otherwise, noticing a crash
    /// at once (keepalived vrrp_track_file); runs until killed.
    #[command(
        after_help = "Examples:\n  tlctl ha watch --track-file /run/vsm-watch/vsmserver.track\n  tlctl ha watch --track-file /run/vsm-watch/vsmserver.track --interval-ms 100\n\nIn keepalived.conf: vrrp_track_file vsm { file /run/vsm-watch/vsmserver.track }, and a\nsystemd unit (vsm-watch.service) that runs this command."
    )]
    Watch {
        /// The file keepalived tracks.
        #[arg(long, value_name = "FILE")]
        track_file: PathBuf,
        /// Milliseconds between health checks.
        #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(10..=60_000))]
        interval_ms: u64,
    },
    /// keepalived notify hook: tell vsmserver its VRRP state.
    #[command(
        after_help = "Examples:\n  tlctl ha notify MASTER    this node now holds the resource IP\n  tlctl ha notify BACKUP\n\nIn keepalived.conf: notify_master \"/usr/bin/tlctl ha notify MASTER\""
    )]
    Notify {
        #[arg(value_enum, ignore_case = true)]
        state: NotifyState,
        /// Extra arguments keepalived's generic notify passes (ignored).
        #[arg(hide = true, trailing_var_arg = true, allow_hyphen_values = true)]
        rest: Vec<String>,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum NotifyState {
    Master,
    Backup,
    Fault,
    Stop,
}

pub fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(msg) = args.refusal() {
        crate::errln!("tlctl: {msg}");
        return ExitCode::from(2);
    }
    super::block_on("tlctl", run(args))
}

impl Args {
    /// Flag combinations refused before anything is asked of the master.
    fn refusal(&self) -> Option<&'static str> {
        match &self.command {
            Command::Session(SessionCmd::Terminate { yes: false, .. }) if self.json => Some(
                "--json cannot ask for confirmation: add -y (--assume-yes) to terminate without asking, \
                 or leave out --json to review the sessions first",
            ),
            _ => None,
        }
    }
}

fn target(args: &Args) -> Result<Target, String> {
    match &args.host {
        None => args.local.path().map(Target::Unix).map_err(|e| e.to_string()),
        Some(host) => {
            let dir = crate::config::config_dir_from(args.local.config_dir.clone());
            let cfg = crate::config::load(&dir)
                .map_err(|e| format!("cannot load configuration from {}: {e}", dir.display()))?;
            let secret = Secret::from_file(&cfg.vsm.secret_file).map_err(|e| e.to_string())?;
            let port = args.port.unwrap_or(cfg.vsmserver.listen_port);
            Ok(Target::Tcp { addr: format!("{host}:{port}"), secret })
        }
    }
}

async fn run(args: Args) -> ExitCode {
    let target = match target(&args) {
        Ok(t) => t,
        Err(e) => {
            crate::errln!("tlctl: {e}");
            return ExitCode::from(2);
        }
    };
    let timeout = Duration::from_secs(args.timeout);
    let json = args.json;
    let result = match &args.command {
        Command::Session(SessionCmd::List { filters, refresh }) => {
            request(&target, ApiRequest::SessionList { selector: filters.selector(), refresh: *refresh }, timeout)
                .await
                .and_then(|r| match r {
                    ApiReply::Sessions { sessions, possibly_stale } => {
                        super::warn_possibly_stale("tlctl", possibly_stale.as_deref());
                        print_sessions(&sessions, json);
                        Ok(ExitCode::SUCCESS)
                    }
                    other => unexpected(other),
                })
        }
        Command::Session(SessionCmd::Terminate { filters, all, allow_abandon, yes }) => {
            terminate(&target, filters.selector(), *all, *allow_abandon, *yes, json, timeout).await
        }
        Command::Load(LoadCmd::List { sort, refresh }) => {
            request(&target, ApiRequest::LoadList { refresh: *refresh }, timeout).await.and_then(|r| match r {
                ApiReply::Loads { mut agents, possibly_stale } => {
                    super::warn_possibly_stale("tlctl", possibly_stale.as_deref());
                    sort_loads(&mut agents, *sort);
                    print_loads(&agents, json);
                    Ok(ExitCode::SUCCESS)
                }
                other => unexpected(other),
            })
        }
        Command::Load(LoadCmd::Show { agent }) => {
            request(&target, ApiRequest::LoadShow { agent: agent.clone() }, timeout).await.and_then(|r| match r {
                ApiReply::Loads { agents, possibly_stale } => {
                    super::warn_possibly_stale("tlctl", possibly_stale.as_deref());
                    for a in &agents {
                        if json {
                            crate::outln!("{}", serde_json::to_string_pretty(a).unwrap_or_default());
                        } else {
                            crate::out!("{}", show_load(a));
                        }
                    }
                    Ok(ExitCode::SUCCESS)
                }
                other => unexpected(other),
            })
        }
        Command::Ha(HaCmd::Status) => request(&target, ApiRequest::HaStatus, timeout).await.and_then(|r| match r {
            ApiReply::HaStatus { status } => {
                if json {
                    crate::outln!("{}", serde_json::to_string_pretty(&status).unwrap_or_default());
                } else {
                    crate::out!("{}", show_ha(&status));
                }
                Ok(ExitCode::SUCCESS)
            }
            other => unexpected(other),
        }),
        Command::Ha(HaCmd::Check { quiet }) => {
            // A hung daemon must fail the check quickly, whatever --timeout says.
            let t = timeout.min(Duration::from_secs(3));
            match call(&target, &ApiRequest::HaCheck, t).await {
                Ok(ApiReply::Ok { message }) => {
                    if !quiet {
                        crate::outln!("{message}");
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Ok(ApiReply::Error { message, .. }) => {
                    if !quiet {
                        crate::errln!("tlctl: {message}");
                    }
                    Ok(ExitCode::from(1))
                }
                Ok(other) => unexpected(other),
                Err(e) => {
                    if !quiet {
                        crate::errln!("tlctl: {e}");
                    }
                    Ok(ExitCode::from(2))
                }
            }
        }
        Command::Ha(HaCmd::Watch { track_file, interval_ms }) => match &target {
            Target::Unix(socket) => {
                match super::hawatch::watch(socket, track_file, Duration::from_millis(*interval_ms)).await {
                    Ok(()) => Ok(ExitCode::SUCCESS),
                    Err(e) => Err((2, e.to_string())),
                }
            }
            Target::Tcp { .. } => Err((2, "ha watch watches the local vsmserver only; drop --host".into())),
        },
        Command::Ha(HaCmd::Notify { state, .. }) => {
            let state = match state {
                NotifyState::Master => VrrpState::Master,
                NotifyState::Backup => VrrpState::Backup,
                NotifyState::Fault | NotifyState::Stop => VrrpState::Fault,
            };
            request(&target, ApiRequest::HaNotify { state }, timeout).await.and_then(|r| match r {
                ApiReply::Ok { message } => {
                    crate::outln!("{message}");
                    Ok(ExitCode::SUCCESS)
                }
                other => unexpected(other),
            })
        }
    };
    match result {
        Ok(code) => code,
        Err((code, msg)) => {
            crate::errln!("tlctl: {msg}");
            ExitCode::from(code)
        }
    }
}

type Outcome = Result<ExitCode, (u8, String)>;

async fn request(target: &Target, req: ApiRequest, timeout: Duration) -> Result<ApiReply, (u8, String)> {
    match call(target, &req, timeout).await {
        Ok(ApiReply::Error { kind, message }) => Err((super::error_exit(kind), message)),
        Ok(r) => Ok(r),
        Err(e) => Err((2, e.to_string())),
    }
}

fn unexpected(r: ApiReply) -> Outcome {
    Err((2, format!("unexpected reply from vsmserver: {r:?}")))
}

async fn terminate(
    target: &Target,
    sel: Selector,
    all: bool,
    allow_abandon: bool,
    yes: bool,
    json: bool,
    timeout: Duration,
) -> Outcome {
    if sel.is_empty() && !all {
        return Err((1, "terminate needs a selector: --user, --agent, --display, --subcluster, or --all".into()));
    }
    if !json {
        crate::outln!("Refreshing session information...");
    }
    let preview = request(
        target,
        ApiRequest::SessionTerminate { selector: sel.clone(), all, allow_abandon, dry_run: true },
        timeout,
    )
    .await?;
    let selected = match preview {
        ApiReply::Terminated { outcome } => outcome.terminated,
        other => return unexpected(other),
    };
    if selected.is_empty() {
        if json {
            crate::outln!("{}", serde_json::to_string_pretty(&TerminateOutcome::default()).unwrap_or_default());
        } else {
            crate::outln!("No sessions match.");
        }
        return Ok(ExitCode::SUCCESS);
    }
    // A JSON caller cannot answer a prompt (refused earlier, checked again here).
    if !yes && !json {
        print_sessions(&selected, false);
        crate::out!("Terminate {} session(s)? [y/N] ", selected.len());
        let _ = std::io::stdout().flush();
        let mut line = String::new();
        let _ = std::io::stdin().lock().read_line(&mut line);
        if !matches!(line.trim(), "y" | "Y" | "yes" | "YES") {
            crate::outln!("Nothing terminated.");
            return Ok(ExitCode::from(1));
        }
    }
    let done =
        request(target, ApiRequest::SessionTerminate { selector: sel, all, allow_abandon, dry_run: false }, timeout)
            .await?;
    let outcome = match done {
        ApiReply::Terminated { outcome } => outcome,
        other => return unexpected(other),
    };
    if json {
        crate::outln!("{}", serde_json::to_string_pretty(&outcome).unwrap_or_default());
    } else {
        crate::outln!(
            "Terminated {} session(s), pending {}, abandoned {}, unknown {}, failed {}.",
            outcome.terminated.len(),
            outcome.pending.len(),
            outcome.abandoned.len(),
            outcome.unknown.len(),
            outcome.failed.len()
        );
        for (s, why) in &outcome.pending {
            crate::outln!("  {} on {} display :{}: {why}", s.user, s.agent, s.display);
        }
        for (s, why) in &outcome.unknown {
            crate::errln!("  {} on {} display :{}: {why}", s.user, s.agent, s.display);
        }
        for (s, why) in &outcome.failed {
            crate::errln!("  {} on {} display :{}: {why}", s.user, s.agent, s.display);
        }
    }
    Ok(if outcome.failed.is_empty() && outcome.unknown.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

pub fn session_rows(sessions: &[Session], now: u64) -> Vec<Vec<String>> {
    sessions
        .iter()
        .map(|s| {
            vec![
                s.user.clone(),
                s.display.to_string(),
                s.agent.clone(),
                s.status.label().to_string(),
                super::age(now.saturating_sub(s.created_ms)),
                last_connect(s, now),
            ]
        })
        .collect()
}

/// "5m ago from 10.0.0.7", or "never".
pub fn last_connect(s: &Session, now: u64) -> String {
    if s.last_connect_ms == 0 {
        return "never".into();
    }
    let ago = super::age(now.saturating_sub(s.last_connect_ms));
    if s.last_client_address.is_empty() {
        format!("{ago} ago")
    } else {
        format!("{ago} ago from {}", s.last_client_address)
    }
}

fn print_sessions(sessions: &[Session], json: bool) {
    if json {
        crate::outln!("{}", serde_json::to_string_pretty(sessions).unwrap_or_default());
        return;
    }
    crate::out!(
        "{}",
        super::table(&["USER", "DISPLAY", "AGENT", "STATUS", "AGE", "LAST CONNECT"], &session_rows(sessions, now_ms()))
    );
    crate::outln!("Listed {} session(s).", sessions.len());
}

fn mem_used_pct(a: &AgentLoad) -> Option<f64> {
    let l = a.load.as_ref()?;
    let total = l.mem_total_kib + l.swap_total_kib;
    if total == 0 {
        return None;
    }
    let used = l.mem_total_kib.saturating_sub(l.mem_available_kib) + l.swap_total_kib.saturating_sub(l.swap_free_kib);
    Some(used as f64 * 100.0 / total as f64)
}

fn cpu_pct(a: &AgentLoad) -> Option<f64> {
    let l = a.load.as_ref()?;
    Some(l.load1 * 100.0 / l.cpus.max(1) as f64)
}

fn sort_loads(agents: &mut [AgentLoad], by: SortBy) {
    let key = |a: &AgentLoad| -> f64 {
        match by {
            SortBy::Agent => 0.0,
            SortBy::Users => -(a.load.as_ref().map(|l| l.users).unwrap_or(0) as f64),
            SortBy::Sessions => -(a.sessions as f64),
            SortBy::Mem => -mem_used_pct(a).unwrap_or(0.0),
            SortBy::Cpu => -cpu_pct(a).unwrap_or(0.0),
        }
    };
    agents.sort_by(|a, b| key(a).partial_cmp(&key(b)).unwrap_or(std::cmp::Ordering::Equal).then(a.agent.cmp(&b.agent)));
}

fn state(a: &AgentLoad) -> String {
    if !a.reachable {
        "unreachable".into()
    } else if a.draining {
        "draining".into()
    } else if a.penalised_ms.is_some() {
        "penalised".into()
    } else {
        "ok".into()
    }
}

fn print_loads(agents: &[AgentLoad], json: bool) {
    if json {
        crate::outln!("{}", serde_json::to_string_pretty(agents).unwrap_or_default());
        return;
    }
    let pct = |v: Option<f64>| v.map(|v| format!("{v:.0} %")).unwrap_or_else(|| "-".into());
    let rows: Vec<Vec<String>> = agents
        .iter()
        .map(|a| {
            vec![
                a.agent.clone(),
                a.load.as_ref().map(|l| l.users.to_string()).unwrap_or_else(|| "-".into()),
                a.sessions.to_string(),
                pct(mem_used_pct(a)),
                pct(cpu_pct(a)),
                a.weight.to_string(),
                state(a),
            ]
        })
        .collect();
    crate::out!("{}", super::table(&["AGENT", "USERS", "SESSIONS", "MEM", "CPU", "WEIGHT", "STATE"], &rows));
    crate::outln!("Listed {} agent(s).", agents.len());
}

fn show_load(a: &AgentLoad) -> String {
    let mut s = String::new();
    let mib = |k: u64| format!("{} MiB", k / 1024);
    s += &format!("Agent:            {}\n", a.agent);
    s += &format!(
        "Subclusters:      {}\n",
        if a.subclusters.is_empty() { "-".into() } else { a.subclusters.join(", ") }
    );
    s += &format!("State:            {}\n", state(a));
    s += &format!("Weight:           {}\n", a.weight);
    s += &format!("vsm users:        {}\n", a.vsm_users);
    s += &format!("vsm sessions:     {}\n", a.sessions);
    if let Some(l) = &a.load {
        s += &format!("Total users:      {}\n", l.users);
        s += &format!(
            "Memory (RAM+swap) used: {}\n",
            mem_used_pct(a).map(|v| format!("{v:.0} %")).unwrap_or_else(|| "-".into())
        );
        s += &format!(
            "RAM:              {} used of {}\n",
            mib(l.mem_total_kib.saturating_sub(l.mem_available_kib)),
            mib(l.mem_total_kib)
        );
        s += &format!(
            "Swap:             {} used of {}\n",
            mib(l.swap_total_kib.saturating_sub(l.swap_free_kib)),
            mib(l.swap_total_kib)
        );
        s += &format!("Load (1/5/15 min): {:.2} {:.2} {:.2}\n", l.load1, l.load5, l.load15);
        s += &format!("CPUs:             {}\n", l.cpus);
    }
    if let Some(p) = a.penalised_ms {
        s += &format!("Penalised for:    {} more (failed to start a session)\n", super::age(p));
    }
    s += &format!(
        "Last updated:     {}\n",
        a.updated_ms_ago.map(|m| format!("{} ago", super::age(m))).unwrap_or_else(|| "never".into())
    );
    s
}

pub fn show_ha(st: &HaStatusView) -> String {
    let mut s = String::new();
    let yn = |b: bool| if b { "yes" } else { "no" };
    if !st.enabled {
        s += &format!(
            "HA:               off{}\n",
            if st.configured { " (configured but not running)" } else { " (/HA/enabled is false)" }
        );
        if let Some(r) = &st.ha_off_reason {
            s += &format!("Why off:          {r}\n");
        }
        s += &format!("Ready:            {} ({})\n", yn(st.ready), st.readiness);
        s += &format!("Reason:           {}\n", st.reason);
        s += &format!("Role:             {}\n", st.role);
        s += &format!("Sessions:         {}\n", st.sessions);
        return s;
    }
    s += "HA:               on\n";
    s += &format!(
        "Local node:       {}{}\n",
        st.local_node.as_deref().unwrap_or("-"),
        st.matched_by.as_deref().map(|m| format!(" (matched by {m})")).unwrap_or_default()
    );
    s += &format!("Remote node:      {}\n", st.remote_node.as_deref().unwrap_or("-"));
    s += &format!("Role:             {}\n", st.role);
    s += &format!("Ready:            {} ({})\n", yn(st.ready), st.readiness);
    s += &format!("Reason:           {}\n", st.reason);
    s += &format!("Peer link:        {}\n", st.link);
    if let Some(e) = &st.link_error {
        s += &format!("Link error:       {e}\n");
    }
    if let Some(d) = &st.last_link_drop {
        s += &format!(
            "Last link drop:   {}, {} ago ({} since start)\n",
            d.reason,
            super::age(now_ms().saturating_sub(d.at_ms)),
            d.drops
        );
    }
    s += &format!("Sync mode:        {}\n", st.sync);
    s += &format!(
        "Positions:        local head {}, peer acknowledged {}, peer head {}, applied of peer {}\n",
        st.local_head, st.peer_acked, st.peer_head, st.applied_of_peer
    );
    s += &format!("Lag:              {} change(s), {} ms\n", st.lag_changes, st.lag_ms);
    match &st.last_resync {
        Some(r) => {
            s += &format!(
                "Last resync:      {} ({}), {} record(s) in {} ms, {} ago\n",
                r.kind,
                r.direction,
                r.records,
                r.duration_ms,
                super::age(now_ms().saturating_sub(r.at_ms))
            )
        }
        None => s += "Last resync:      none yet\n",
    }
    s += &format!(
        "Cluster config:   {}\n",
        match st.config_digest_match {
            Some(true) => "identical on both nodes",
            Some(false) => "DIFFERS from the peer's: both nodes must have the same subclusters and agents",
            None => "not compared yet",
        }
    );
    s += &format!(
        "Degraded:         {}{}\n",
        yn(st.degraded),
        st.degraded_reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default()
    );
    s += &format!("Clock offset:     {}\n", clock_line(st));
    for a in &st.agent_clock_offsets {
        s += &format!(
            "  agent {}: {:+} ms{}\n",
            a.agent,
            a.offset_ms,
            if a.exceeded { " BEYOND THE BOUND: check NTP on the agent" } else { "" }
        );
    }
    s += &format!("Sessions:         {}\n", st.sessions);
    s
}

/// The peer's clock offset, its bound, and the alarm when it is beyond.
fn clock_line(st: &HaStatusView) -> String {
    let bound = st.max_clock_offset_ms;
    match st.clock_offset_ms {
        None => format!("peer not measured yet (max {bound} ms)"),
        Some(o) => format!(
            "peer {o:+} ms{} (max {bound} ms){}",
            st.clock_offset_age_ms.map(|a| format!(", measured {} ago", super::age(a))).unwrap_or_default(),
            if st.clock_offset_exceeded {
                "; BEYOND THE BOUND: last-writer-wins between the masters is unreliable, check NTP on both"
            } else {
                ""
            }
        ),
    }
}
