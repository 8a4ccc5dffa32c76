//! Command-line front ends of `vsmclient`, `tlctl` and `vsmconnect`: flag parsing, calling the
//! master (`vsmconnect` through the user's ssh), and turning replies into tables or JSON.
//!
//! Invariant: output for people goes to stdout, problems to stderr with a non-zero exit; the
//! `--json` forms print exactly one JSON document on stdout so scripts can parse them.

pub mod demo;
pub mod dist;
pub mod hawatch;
pub mod tlctl;
pub mod vsmagent;
pub mod vsmclient;
pub mod vsmconnect;
pub mod vsmserver;

use std::path::PathBuf;

/// The logging flags of the daemons (`vsmserver`, `vsmagent`), flattened into their `Args`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct LogArgs {
    /// More logging (-v debug, -vv trace); wins over RUST_LOG and the daemon's logging/defaultlevel key.
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Log filter, e.g. `info` or `vsm::ha=debug,info`; wins over everything else.
    #[arg(long, value_name = "FILTER")]
    pub log_level: Option<String>,
    /// Log one JSON object per line (also the daemon's logging/json key).
    #[arg(long)]
    pub log_json: bool,
}

impl LogArgs {
    /// The logging options of these flags over the daemon's `logging` keys (if loaded).
    pub fn options(&self, config: Option<&crate::config::LoggingConfig>) -> crate::telemetry::LogOptions {
        crate::telemetry::LogOptions {
            level: self.log_level.clone(),
            verbosity: self.verbose,
            json: self.log_json || config.is_some_and(|c| c.json),
            config_level: config.map(|c| crate::telemetry::level_for_key(&c.defaultlevel).to_string()),
        }
    }
}

/// How the clients (`vsmclient`, `tlctl`) find the master's Unix socket, flattened into their
/// `Args`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct SocketArgs {
    /// The master's Unix socket (default: /vsmserver/socket_path, or $VSM_SOCKET).
    #[arg(long, global = true)]
    pub socket: Option<PathBuf>,
    /// Configuration directory, read for the socket path (and by tlctl --host for the port and
    /// the secret file); nothing else of it is read, and no secret for the local socket.
    #[arg(long, global = true, env = "VSM_CONFIG_DIR")]
    pub config_dir: Option<PathBuf>,
}

impl SocketArgs {
    /// The socket to call (see [`crate::client::socket_path`]).
    pub fn path(&self) -> Result<PathBuf, crate::client::ClientError> {
        crate::client::socket_path(self.socket.clone(), self.config_dir.clone())
    }
}

/// Prints to standard output like `print!`, but a reader that went away (`tlctl session list |
/// head -1`) ends the program as SIGPIPE ends a C program: silently, killed by the signal.
#[macro_export]
macro_rules! out {
    ($($t:tt)*) => {
        $crate::cli::write_stdout(format_args!($($t)*))
    };
}

/// `println!` with the broken-pipe behaviour of [`out!`](crate::out).
#[macro_export]
macro_rules! outln {
    () => {
        $crate::cli::write_stdout(format_args!("\n"))
    };
    ($($t:tt)*) => {
        $crate::cli::write_stdout(format_args!("{}\n", format_args!($($t)*)))
    };
}

/// `eprintln!` that never panics: a closed standard error loses the message, nothing else.
#[macro_export]
macro_rules! errln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($t)*);
    }};
}

/// The body of [`out!`]: writes, and on a broken pipe dies of SIGPIPE (exit status 141 in a
/// shell) without a message; any other write error is reported once and ends with status 1.
pub fn write_stdout(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    // Flushing at once (as line-buffered stdout does at each newline anyway) makes a vanished
    // reader show here, and shows a prompt before input is read.
    let res = out.write_fmt(args).and_then(|()| out.flush());
    if let Err(e) = res {
        drop(out);
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            die_of_sigpipe();
        }
        crate::errln!("cannot write to standard output: {e}");
        std::process::exit(1);
    }
}

/// Ends the process the way an unhandled SIGPIPE does, so shells and `set -o pipefail` see
/// what they see for any other program whose reader went away.
pub fn die_of_sigpipe() -> ! {
    // SAFETY: restoring the default action of SIGPIPE and raising it in a single-purpose
    // final step; no Rust state is touched.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        libc::raise(libc::SIGPIPE);
    }
    std::process::exit(141)
}

/// Exit status of `vsmclient` and `tlctl` when the master refused because it is not ready
/// (resynchronising with its peer, or HA configured but off): try again in a few seconds.
/// 75 is `EX_TEMPFAIL` of sysexits.h, "temporary failure; the user is invited to retry".
pub const EXIT_NOT_READY: u8 = 75;

/// Exit status for an error reply of kind `kind`: [`EXIT_NOT_READY`] or 1.
pub fn error_exit(kind: crate::proto::api::ApiErrorKind) -> u8 {
    match kind {
        crate::proto::api::ApiErrorKind::NotReady => EXIT_NOT_READY,
        _ => 1,
    }
}

/// Warns on stderr that a listing came from a master that is not ready.
pub fn warn_possibly_stale(program: &str, why: Option<&str>) {
    if let Some(why) = why {
        crate::errln!("{program}: warning: this master is not ready ({why}); the list may be out of date");
    }
}

/// Runs a client's main future on a single-threaded runtime; exit status 2 if none can start.
pub fn block_on(program: &str, f: impl std::future::Future<Output = std::process::ExitCode>) -> std::process::ExitCode {
    match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt.block_on(f),
        Err(e) => {
            crate::errln!("{program}: cannot start: {e}");
            std::process::ExitCode::from(2)
        }
    }
}

/// Renders rows as left-aligned columns separated by two spaces.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{:<w$}  ", c, w = widths[i]));
            }
        }
        s.trim_end().to_string()
    };
    let mut out = line(headers.to_vec());
    out.push('\n');
    for r in rows {
        out.push_str(&line(r.iter().map(|s| s.as_str()).collect()));
        out.push('\n');
    }
    out
}

/// Age as people read it: `42 s`, `5 min`, `3 h`, `11 day(s)`.
pub fn age(ms: u64) -> String {
    let s = ms / 1000;
    if s < 60 {
        format!("{s} s")
    } else if s < 3600 {
        format!("{} min", s / 60)
    } else if s < 86400 {
        format!("{} h", s / 3600)
    } else {
        format!("{} day(s)", s / 86400)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let t = table(&["USER", "DISPLAY"], &[vec!["alice".into(), "10".into()], vec!["bo".into(), "11".into()]]);
        assert_eq!(t, "USER   DISPLAY\nalice  10\nbo     11\n");
    }

    #[test]
    fn ages() {
        assert_eq!(age(5_000), "5 s");
        assert_eq!(age(300_000), "5 min");
        assert_eq!(age(7_200_000), "2 h");
        assert_eq!(age(11 * 86_400_000), "11 day(s)");
    }
}
