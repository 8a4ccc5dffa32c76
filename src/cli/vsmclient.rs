//! `vsmclient`: what a user runs on the master (usually as `ssh user@master vsmclient connect`)
//! to get a desktop session: it asks `vsmserver` over its Unix socket and prints where the
//! session lives.

use crate::client::{call, Target};
use crate::model::SessionId;
use crate::proto::api::{ApiReply, ApiRequest, ConnectInfo};
use clap::{Parser, Subcommand};
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "vsmclient",
    version,
    about = "Get a remote-desktop session from the vsm master",
    long_about = "Asks vsmserver on this machine for a desktop session and prints where it lives \
(agent address, display, VNC port). Your identity is the Unix user running this command, \
normally the user you logged in as with ssh.",
    after_help = "Examples:\n  ssh alice@tlha vsmclient connect            reconnect to your session or start one\n  ssh alice@tlha vsmclient connect --json     the same, as JSON for scripts\n  vsmclient connect --new                     an additional session (if allowed)\n  vsmclient connect --terminate-existing      end your session and start a fresh one\n  vsmclient list                              your sessions\n  vsmclient terminate 3f2a9c...               end one of them\n\nExit status: 0 done; 1 refused or failed (the message says why); 2 vsmserver did not answer;\n75 this master is not ready (it is resynchronising with its peer): try again in a few seconds.\nWith --json an error prints {\"error\": KIND, \"message\": ..., \"exit_status\": N}; KIND is not_ready for 75."
)]
pub struct Args {
    #[command(flatten)]
    local: super::SocketArgs,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// Act for this user (root only).
    #[arg(long, global = true)]
    user: Option<String>,
    /// Give up after this many seconds.
    #[arg(long, global = true, default_value_t = 60)]
    timeout: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Reconnect to your running session, or create one.
    #[command(
        after_help = "Examples:\n  vsmclient connect                         your running session, or a new one\n  vsmclient connect --geometry 1920x1080    size of a new session\n  vsmclient connect --new --json            an additional session, as JSON"
    )]
    Connect {
        /// Ask for an additional session (within /vsmserver/max_sessions_per_user).
        #[arg(long)]
        new: bool,
        /// End your existing session(s) first, then create a new one.
        #[arg(long)]
        terminate_existing: bool,
        /// Screen size WIDTHxHEIGHT for a new session.
        #[arg(long)]
        geometry: Option<String>,
    },
    /// List your sessions.
    #[command(after_help = "Examples:\n  vsmclient list\n  vsmclient list --json")]
    List,
    /// End one of your sessions.
    #[command(
        after_help = "Examples:\n  vsmclient list                  find the session id\n  vsmclient terminate 3f2a9c...    end that session"
    )]
    Terminate {
        /// The session id (see `vsmclient list`).
        id: String,
    },
}

pub fn main() -> ExitCode {
    let args = Args::parse();
    super::block_on("vsmclient", run(args))
}

fn client_address() -> Option<String> {
    std::env::var("SSH_CONNECTION").ok().and_then(|v| v.split_whitespace().next().map(str::to_string))
}

pub fn describe(info: &ConnectInfo) -> String {
    format!(
        "{} session {} of user {}\n  agent:    {} (address {})\n  display:  :{}\n  VNC port: {}\n",
        if info.reconnected { "Reconnected to" } else { "Created" },
        info.session_id,
        info.user,
        info.agent,
        info.agent_address,
        info.display,
        info.vnc_port
    )
}

async fn run(args: Args) -> ExitCode {
    let target = match args.local.path() {
        Ok(path) => Target::Unix(path),
        Err(e) => {
            crate::errln!("vsmclient: {e}");
            return ExitCode::from(2);
        }
    };
    let req = match &args.command {
        Command::Connect { new, terminate_existing, geometry } => ApiRequest::Connect {
            user: args.user.clone(),
            new: *new,
            terminate_existing: *terminate_existing,
            geometry: geometry.clone(),
            client_address: client_address(),
        },
        Command::List => ApiRequest::MySessions { user: args.user.clone() },
        Command::Terminate { id } => {
            ApiRequest::TerminateMine { user: args.user.clone(), session_id: SessionId(id.clone()) }
        }
    };
    let reply = match call(&target, &req, Duration::from_secs(args.timeout)).await {
        Ok(r) => r,
        Err(e) => {
            crate::errln!("vsmclient: {e}");
            return ExitCode::from(2);
        }
    };
    match reply {
        ApiReply::Connected { info } => {
            if args.json {
                crate::outln!("{}", serde_json::to_string_pretty(&info).unwrap_or_default());
            } else {
                crate::out!("{}", describe(&info));
            }
            ExitCode::SUCCESS
        }
        ApiReply::Sessions { sessions, possibly_stale } => {
            super::warn_possibly_stale("vsmclient", possibly_stale.as_deref());
            if args.json {
                crate::outln!("{}", serde_json::to_string_pretty(&sessions).unwrap_or_default());
            } else if sessions.is_empty() {
                crate::outln!("You have no sessions.");
            } else {
                let now = crate::model::now_ms();
                let rows: Vec<Vec<String>> = sessions
                    .iter()
                    .map(|s| {
                        vec![
                            s.id.0.clone(),
                            s.agent_address.clone(),
                            format!(":{}", s.display),
                            s.vnc_port.to_string(),
                            s.status.label().to_string(),
                            super::age(now.saturating_sub(s.created_ms)),
                            super::tlctl::last_connect(s, now),
                        ]
                    })
                    .collect();
                crate::out!(
                    "{}",
                    super::table(&["ID", "AGENT", "DISPLAY", "VNC", "STATUS", "AGE", "LAST CONNECT"], &rows)
                );
            }
            ExitCode::SUCCESS
        }
        ApiReply::Terminated { outcome } => {
            if args.json {
                crate::outln!("{}", serde_json::to_string_pretty(&outcome).unwrap_or_default());
            } else {
                for s in &outcome.terminated {
                    crate::outln!("Terminated session {} on {} (display :{}).", s.id, s.agent, s.display);
                }
                for (s, why) in &outcome.pending {
                    crate::outln!("Session {} on {} (display :{}): {why}.", s.id, s.agent, s.display);
                }
                for (s, why) in &outcome.unknown {
                    crate::errln!("vsmclient: session {} on {} (display :{}): {why}.", s.id, s.agent, s.display);
                }
            }
            // Not confirmed: the caller should look again (exit status 1).
            if outcome.unknown.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        ApiReply::Error { kind, message } => {
            let code = super::error_exit(kind);
            if args.json {
                crate::outln!("{}", serde_json::json!({ "error": kind, "message": message, "exit_status": code }));
            }
            crate::errln!("vsmclient: {message}");
            ExitCode::from(code)
        }
        other => {
            crate::errln!("vsmclient: unexpected reply from vsmserver: {other:?}");
            ExitCode::from(2)
        }
    }
}
