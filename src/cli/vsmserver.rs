//! `vsmserver`: flag parsing, configuration, logging and signals around [`crate::server`],
//! plus the `demo` subcommand.

use crate::server::{self, Overrides};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(
    name = "vsmserver",
    version,
    about = "The vsm master: session broker with high availability",
    long_about = "Runs the vsm master daemon: the session database, the API for vsmclient and tlctl, \
agent polling and, with /HA/enabled, replication to the other master. Configuration is read from \
the configuration directory (see tl-config). `vsmserver demo` runs a self-contained demonstration \
with two masters and two agents on loopback, with no root and no configuration.",
    after_help = "Examples:\n  vsmserver                          run the daemon with /etc/vsm\n  vsmserver --config-dir ./conf -v   another configuration, more logging\n  vsmserver --log-level vsm::ha=debug,info --log-json\n  vsmserver demo                     the two-master failover demonstration"
)]
pub struct Args {
    /// Configuration directory (default /etc/vsm).
    #[arg(long, env = "VSM_CONFIG_DIR")]
    config_dir: Option<PathBuf>,
    #[command(flatten)]
    log: super::LogArgs,
    /// Reach the HA peer at HOST:PORT instead of its /HA/nodes entry and /HA/port (for two
    /// masters on one host, such as tests and the lab; combine with /HA/local_node).
    #[arg(long, value_name = "HOST:PORT")]
    peer_addr: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Two masters and two agents on loopback: sessions, failover, resync, narrated.
    #[command(
        after_help = "Examples:\n  vsmserver demo                                   run it and exit\n  vsmserver demo --keep-running --dir /tmp/vsm-demo   leave it up to try vsmclient and tlctl by hand"
    )]
    Demo(super::demo::DemoArgs),
    /// The demo's stand-in desktop: answers the RFB greeting on a port.
    #[command(hide = true)]
    DemoSession {
        #[arg(long)]
        port: u16,
    },
}

pub fn main() -> ExitCode {
    let args = Args::parse();
    let demo = matches!(args.command, Some(Command::Demo(_)));
    let mut log = args.log.options(None);
    if demo && log.level.is_none() && log.verbosity == 0 && std::env::var_os("RUST_LOG").is_none() {
        // The demo narrates on stdout; only problems are logged unless asked for more.
        log.level = Some("warn,vsm::ha::node=error,vsm::ha::engine=error".into());
    }
    let config = match args.command {
        Some(_) => None,
        None => {
            let dir = crate::config::config_dir_from(args.config_dir.clone());
            // Loading and the checks that need this machine (DNS, the HA secret), located at
            // the file and line that set each key.
            match crate::config::preflight::load_checked(&dir) {
                Ok(c) => {
                    log = args.log.options(Some(&c.vsmserver.logging));
                    Some((dir, c))
                }
                Err(e) => {
                    crate::telemetry::fatal(
                        "vsmserver",
                        format_args!("invalid configuration in {}:\n{e}", dir.display()),
                    );
                    return ExitCode::from(1);
                }
            }
        }
    };
    if let Err(e) = crate::telemetry::init_with(&log) {
        crate::telemetry::fatal("vsmserver", format_args!("{e}"));
        return ExitCode::from(2);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            crate::telemetry::fatal("vsmserver", format_args!("cannot start the runtime: {e}"));
            return ExitCode::from(1);
        }
    };
    match (args.command, config) {
        (Some(Command::Demo(d)), _) => rt.block_on(super::demo::run(d)),
        (Some(Command::DemoSession { port }), _) => rt.block_on(super::demo::fake_session(port)),
        (None, Some((dir, cfg))) => rt.block_on(daemon(dir, cfg, args.peer_addr)),
        (None, None) => ExitCode::from(1),
    }
}

async fn daemon(dir: PathBuf, cfg: crate::config::Config, peer_addr: Option<String>) -> ExitCode {
    tracing::info!(config_dir = %dir.display(), "configuration loaded");
    let listeners = match server::bind(&cfg).await {
        Ok(l) => l,
        Err(e) => {
            crate::telemetry::fatal("vsmserver", format_args!("{e}"));
            return ExitCode::from(1);
        }
    };
    let shutdown = match crate::signals::shutdown_signal() {
        Ok(s) => s,
        Err(e) => {
            crate::telemetry::fatal("vsmserver", format_args!("cannot handle SIGTERM and SIGINT: {e}"));
            return ExitCode::from(1);
        }
    };
    let ov = Overrides { peer_addr, ..Overrides::default() };
    match server::run(cfg, listeners, ov, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            crate::telemetry::fatal("vsmserver", format_args!("{e}"));
            ExitCode::from(1)
        }
    }
}
