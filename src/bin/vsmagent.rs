//! `vsmagent`: the agent daemon. Parses flags, loads the configuration, binds the agent port,
//! tells systemd it is ready, and runs `vsm::agentd::run` until SIGTERM or SIGINT.
use anyhow::Context;
use clap::Parser;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Start, verify, list and terminate desktop sessions for the vsm master, and report session
/// exits to it.
///
/// Settings come from the `vsmagent` and `vsm` files of the configuration directory
/// (`/vsmagent/*`, `/vsm/*`). Sessions keep running when the agent stops; a restarted agent
/// takes them over again from its state directory.
#[derive(Parser, Debug)]
#[command(name = "vsmagent", version)]
struct Args {
    /// Configuration directory [default: $VSM_CONFIG_DIR, else /etc/vsm].
    #[arg(long, value_name = "DIR")]
    config_dir: Option<PathBuf>,
    /// Listen on this address instead of 0.0.0.0:/vsmagent/listen_port.
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// More log output (-v debug, -vv trace); ignored when --log-level is given.
    #[arg(short, long, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Log filter, e.g. `info` or `vsm=debug` [default: $RUST_LOG, else info].
    #[arg(long, value_name = "FILTER")]
    log_level: Option<String>,
}

fn init_logging(args: &Args) {
    use tracing_subscriber::EnvFilter;
    let filter = match (&args.log_level, args.verbose) {
        (Some(l), _) => EnvFilter::new(l),
        (None, 0) => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        (None, 1) => EnvFilter::new("debug"),
        (None, _) => EnvFilter::new("trace"),
    };
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

/// Installs the handlers at once (a signal arriving before the first poll must not kill the
/// process the default way), and resolves on the first SIGTERM or SIGINT.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    })
}

fn main() -> anyhow::Result<()> {
    // The PAM session helper (see vsm::agentd::pam) runs before any runtime or thread exists.
    let raw: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if raw.get(1).is_some_and(|a| a == vsm::agentd::pam::HELPER_FLAG) {
        std::process::exit(vsm::agentd::pam::helper_main(&raw[2..]));
    }
    tokio::runtime::Runtime::new().context("cannot start the async runtime")?.block_on(agent_main())
}

async fn agent_main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_logging(&args);
    let dir = vsm::config::config_dir_from(args.config_dir.clone());
    let config = vsm::config::load(&dir)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("invalid configuration in {}", dir.display()))?;
    tracing::info!(config_dir = %dir.display(), "configuration loaded");
    let addr = args.listen.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], config.vsmagent.listen_port)));
    let shutdown = shutdown_signal()?;
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))?;
    let bound = listener.local_addr().unwrap_or(addr);
    tracing::info!(listen = %bound, "bound agent port");
    // Not under systemd is fine: then there is nobody to tell.
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    let mut opts = vsm::agentd::RunOptions::from_config(&config);
    // Sessions open their PAM session through this very binary.
    opts.sessions.pam_helper = std::env::current_exe().ok();
    vsm::agentd::run_with(config, opts, listener, shutdown).await?;
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    Ok(())
}
