//! Logging set-up shared by every binary: `tracing` events to stderr, as text or JSON, in the
//! form the place stderr goes to expects.
//!
//! Owns: the one global subscriber, the choice of output form, and the level filter.
//! Never: decides what to log (modules do), or writes anywhere but stderr (journald and log
//! files collect stderr).
//!
//! Output form ([`Sink::detect`]):
//! - stderr is the journal (`JOURNAL_STREAM` names stderr's device and inode, as systemd sets it
//!   for a service): every line starts with its syslog priority (`<3>` error, `<4>` warning,
//!   `<6>` info, `<7>` debug and trace), which journald strips and stores, so
//!   `journalctl -p warning` finds warnings; no colour and no timestamp (the journal has its own);
//! - stderr is a terminal and `NO_COLOR` is unset: coloured text;
//! - anything else (a pipe, a log file): plain text without escape sequences.
//!
//! Level ([`LogOptions::filter`]): `--log-level` when given, else the verbosity flag when
//! given (`-v` → `debug`, `-vv` → `trace`), else `RUST_LOG` when set and valid (full
//! `EnvFilter` syntax, e.g. `vsm::ha=debug,info`), else the daemon's
//! `/<daemon>/logging/defaultlevel` key, else `info`.
//!
//! Stable field names (tests, log searches and dashboards rely on them; never rename):
//! - `session_id`: a session's id ([`crate::model::SessionId`] display form)
//! - `user`: the Unix user name a session or request is for
//! - `agent`: an agent's host name as the master reaches it
//! - `peer`: the other master's node name or address
//! - `seq`: a change-log sequence number ([`crate::model::Seq`])
//! - `role`: `active` or `standby`
//!
//! Invariant: [`init`] installs the subscriber at most once per process; later calls are
//! no-ops, so tests and binaries may both call it.

use std::fmt;
use std::sync::Once;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

static INIT: Once = Once::new();

/// Why a log filter was refused.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("bad log level {value:?}: expected a level (error, warn, info, debug, trace) or a filter such as vsm::ha=debug,info")]
    BadFilter { value: String },
}

/// The filter used for a verbosity flag when nothing else is given.
pub fn level_for(verbosity: u8) -> &'static str {
    match verbosity {
        0 => "info",
        1 => "debug",
        _ => "trace",
    }
}

/// The `tracing` filter for a `/…/logging/defaultlevel` value (ThinLinc's level names:
/// `warning` is `warn`, `debug2` is `trace`).
pub fn level_for_key(level: &str) -> &'static str {
    match level.to_ascii_lowercase().as_str() {
        "error" => "error",
        "warning" | "warn" => "warn",
        "debug" => "debug",
        "debug2" | "trace" => "trace",
        _ => "info",
    }
}

/// What a daemon's flags and configuration say about logging.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LogOptions {
    /// `--log-level`: a level or a full filter; wins over everything else.
    pub level: Option<String>,
    /// `-v` count; wins over `RUST_LOG` and the configuration when not zero.
    pub verbosity: u8,
    /// `--log-json` or `/…/logging/json`: one JSON object per line.
    pub json: bool,
    /// `/…/logging/defaultlevel`, already mapped by [`level_for_key`].
    pub config_level: Option<String>,
}

impl LogOptions {
    /// The filter in effect, following the order in the module documentation.
    pub fn filter(&self) -> Result<EnvFilter, TelemetryError> {
        self.filter_with_env(std::env::var("RUST_LOG").ok())
    }

    fn filter_with_env(&self, rust_log: Option<String>) -> Result<EnvFilter, TelemetryError> {
        let parse = |s: &str| EnvFilter::try_new(s).map_err(|_| TelemetryError::BadFilter { value: s.to_string() });
        if let Some(l) = &self.level {
            return parse(l);
        }
        if self.verbosity > 0 {
            return parse(level_for(self.verbosity));
        }
        if let Some(env) = rust_log.filter(|s| !s.trim().is_empty()) {
            // A broken RUST_LOG falls through to the configuration rather than stopping a daemon.
            if let Ok(f) = EnvFilter::try_new(&env) {
                return Ok(f);
            }
        }
        parse(self.config_level.as_deref().unwrap_or("info"))
    }
}

/// Where stderr goes, which decides the output form.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sink {
    /// systemd's journal: priority prefixes, no colour, no timestamp.
    Journal,
    /// A terminal: colour unless `NO_COLOR`.
    Terminal { colour: bool },
    /// A pipe or file: plain text.
    Plain,
}

impl Sink {
    /// Looks at this process's stderr and environment.
    pub fn detect() -> Sink {
        use std::io::IsTerminal;
        let journal = std::env::var("JOURNAL_STREAM").ok();
        let stderr_id = nix::sys::stat::fstat(libc::STDERR_FILENO).ok().map(|st| (st.st_dev, st.st_ino));
        let no_colour = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        Sink::decide(journal.as_deref(), stderr_id, std::io::stderr().is_terminal(), no_colour)
    }

    /// The decision itself, from the facts [`Sink::detect`] gathers.
    pub fn decide(
        journal_stream: Option<&str>,
        stderr_id: Option<(u64, u64)>,
        is_terminal: bool,
        no_colour: bool,
    ) -> Sink {
        // JOURNAL_STREAM is inherited by children whose stderr may go elsewhere: it counts only
        // when it names our own stderr.
        let named = journal_stream.and_then(|v| {
            let (dev, ino) = v.split_once(':')?;
            Some((dev.parse::<u64>().ok()?, ino.parse::<u64>().ok()?))
        });
        if named.is_some() && named == stderr_id {
            Sink::Journal
        } else if is_terminal {
            Sink::Terminal { colour: !no_colour }
        } else {
            Sink::Plain
        }
    }
}

/// The syslog priority of a level: `err`, `warning`, `info`, `debug`.
pub fn syslog_priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        _ => 7,
    }
}

/// Puts `<N>` (the syslog priority) in front of every line another formatter writes.
struct PriorityPrefix<F>(F);

impl<S, N, F> FormatEvent<S, N> for PriorityPrefix<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let prio = syslog_priority(event.metadata().level());
        // journald splits a stream on newlines: a multi-line message keeps its priority only
        // when every line carries it.
        let mut line = String::new();
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        for l in line.lines() {
            writeln!(writer, "<{prio}>{l}")?;
        }
        Ok(())
    }
}

/// Installs the global subscriber: stderr, in the form [`Sink::detect`] chooses, with the
/// filter of `opts`. Safe to call more than once (only the first call counts). A filter that
/// cannot be parsed is an error, and nothing is installed.
pub fn init_with(opts: &LogOptions) -> Result<(), TelemetryError> {
    let filter = opts.filter()?;
    let sink = Sink::detect();
    let json = opts.json;
    INIT.call_once(|| {
        use tracing_subscriber::fmt::format;
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_target(true)
            .with_ansi(matches!(sink, Sink::Terminal { colour: true }));
        // Another subscriber (e.g. a test harness) may already be installed: keep it.
        let _ = match (sink, json) {
            (Sink::Journal, true) => builder
                .event_format(PriorityPrefix(format().json().flatten_event(true).without_time()))
                .fmt_fields(format::JsonFields::new())
                .try_init(),
            (Sink::Journal, false) => builder.event_format(PriorityPrefix(format().without_time())).try_init(),
            (_, true) => builder.json().flatten_event(true).try_init(),
            (_, false) => builder.try_init(),
        };
    });
    Ok(())
}

/// Prints a daemon's fatal error on stderr as `program: message`; when stderr is the journal,
/// every line carries the `err` priority, so `journalctl -p err` shows why a daemon stopped.
pub fn fatal(program: &str, msg: impl fmt::Display) {
    let prefix = if Sink::detect() == Sink::Journal { "<3>" } else { "" };
    let text = format!("{program}: {msg}");
    for line in text.lines() {
        crate::errln!("{prefix}{line}");
    }
}

/// [`init_with`] for a verbosity flag and JSON switch only (tools and tests).
pub fn init(verbosity: u8, json: bool) {
    let _ = init_with(&LogOptions { verbosity, json, ..LogOptions::default() });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verbosity_levels() {
        assert_eq!(level_for(0), "info");
        assert_eq!(level_for(1), "debug");
        assert_eq!(level_for(7), "trace");
    }

    #[test]
    fn thinlinc_level_names() {
        assert_eq!(level_for_key("WARNING"), "warn");
        assert_eq!(level_for_key("debug2"), "trace");
        assert_eq!(level_for_key("error"), "error");
        assert_eq!(level_for_key("info"), "info");
    }

    #[test]
    fn filter_order() {
        let show = |o: &LogOptions, env: Option<&str>| o.filter_with_env(env.map(str::to_string)).unwrap().to_string();
        let cfg = LogOptions { config_level: Some("warn".into()), ..LogOptions::default() };
        assert_eq!(show(&cfg, None), "warn");
        assert_eq!(show(&cfg, Some("debug")), "debug");
        assert_eq!(show(&cfg, Some("not a [filter")), "warn");
        let v = LogOptions { verbosity: 1, ..cfg.clone() };
        assert_eq!(show(&v, Some("error")), "debug");
        let l = LogOptions { level: Some("vsm::ha=trace".into()), ..v };
        assert_eq!(show(&l, Some("error")), "vsm::ha=trace");
        assert_eq!(show(&LogOptions::default(), None), "info");
    }

    #[test]
    fn bad_level_is_refused_with_the_value() {
        let o = LogOptions { level: Some("vsm=loud".into()), ..LogOptions::default() };
        let e = o.filter_with_env(None).unwrap_err().to_string();
        assert!(e.contains("\"vsm=loud\""), "{e}");
    }

    #[test]
    fn sink_decision() {
        let id = Some((8, 1234));
        assert_eq!(Sink::decide(Some("8:1234"), id, false, false), Sink::Journal);
        assert_eq!(Sink::decide(Some("8:1234"), id, true, false), Sink::Journal);
        // Inherited from a parent whose stderr was the journal, ours is not.
        assert_eq!(Sink::decide(Some("8:999"), id, false, false), Sink::Plain);
        assert_eq!(Sink::decide(Some("garbage"), id, true, false), Sink::Terminal { colour: true });
        assert_eq!(Sink::decide(None, id, true, true), Sink::Terminal { colour: false });
        assert_eq!(Sink::decide(None, None, false, false), Sink::Plain);
    }

    #[test]
    fn priorities() {
        assert_eq!(syslog_priority(&Level::ERROR), 3);
        assert_eq!(syslog_priority(&Level::WARN), 4);
        assert_eq!(syslog_priority(&Level::INFO), 6);
        assert_eq!(syslog_priority(&Level::DEBUG), 7);
        assert_eq!(syslog_priority(&Level::TRACE), 7);
    }
}
