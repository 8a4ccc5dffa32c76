//! `vsmagent`: flag parsing, configuration, logging and signals around [`crate::agentd`].

use clap::Parser;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

/// Start, verify, list and terminate desktop sessions for the vsm master, and report session
/// exits to it.
///
/// Settings come from the `vsmagent` and `vsm` files of the configuration directory
/// (`/vsmagent/*`, `/vsm/*`). Sessions keep running when the agent stops; a restarted agent
/// takes them over again from its state directory.
#[derive(Parser, Debug)]
#[command(
    name = "vsmagent",
    version,
    after_help = "Examples:\n  vsmagent                                  run the agent with /etc/vsm\n  vsmagent --config-dir ./conf -v           another configuration, debug logging\n  vsmagent --listen 127.0.0.1:9904          listen on loopback only, another port\n  vsmagent --log-level vsm::agentd=trace    one module in detail"
)]
pub struct Args {
    /// Configuration directory [default: $VSM_CONFIG_DIR, else /etc/vsm].
    #[arg(long, value_name = "DIR")]
    config_dir: Option<PathBuf>,
    /// Listen on this address instead of /vsmagent/listen_address:/vsmagent/listen_port.
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    #[command(flatten)]
    log: super::LogArgs,
}

pub fn main() -> ExitCode {
    // The PAM session helper (see agentd::pam) runs before any runtime or thread exists.
    let raw: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if raw.get(1).is_some_and(|a| a == crate::agentd::pam::HELPER_FLAG) {
        std::process::exit(crate::agentd::pam::helper_main(&raw[2..]));
    }
    let args = Args::parse();
    let dir = crate::config::config_dir_from(args.config_dir.clone());
    // Loading and the checks that need this machine (DNS, the HA secret), located at the
    // file and line that set each key.
    let config = match crate::config::preflight::load_checked(&dir) {
        Ok(c) => c,
        Err(e) => {
            crate::telemetry::fatal("vsmagent", format_args!("invalid configuration in {}:\n{e}", dir.display()));
            return ExitCode::from(1);
        }
    };
    let log = args.log.options(Some(&config.vsmagent.logging));
    if let Err(e) = crate::telemetry::init_with(&log) {
        crate::telemetry::fatal("vsmagent", format_args!("{e}"));
        return ExitCode::from(2);
    }
    tracing::info!(config_dir = %dir.display(), "configuration loaded");
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            crate::telemetry::fatal("vsmagent", format_args!("cannot start the runtime: {e}"));
            return ExitCode::from(1);
        }
    };
    match rt.block_on(daemon(config, args.listen)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            crate::telemetry::fatal("vsmagent", format_args!("{e}"));
            ExitCode::from(1)
        }
    }
}

async fn daemon(config: crate::config::Config, listen: Option<SocketAddr>) -> Result<(), String> {
    let shutdown = crate::signals::shutdown_signal().map_err(|e| format!("cannot handle SIGTERM and SIGINT: {e}"))?;
    let listener = match listen {
        Some(addr) => {
            tokio::net::TcpListener::bind(addr).await.map_err(|e| format!("cannot listen on {addr} (--listen): {e}"))?
        }
        None => crate::server::bind_tcp(
            &config.vsmagent.listen_address,
            config.vsmagent.listen_port,
            "the agent port (/vsmagent/listen_address, /vsmagent/listen_port)",
        )
        .await
        .map_err(|e| e.to_string())?,
    };
    let bound = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
    tracing::info!(listen = %bound, "bound agent port");
    // Not under systemd is fine: then there is nobody to tell.
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    let mut opts = crate::agentd::RunOptions::from_config(&config);
    // Sessions open their PAM session through this very binary.
    opts.sessions.pam_helper = std::env::current_exe().ok();
    let res = crate::agentd::run_with(config, opts, listener, shutdown).await;
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    res.map_err(|e| e.to_string())
}
