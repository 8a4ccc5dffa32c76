//! Logging set-up shared by every binary: `tracing` events to stderr, as text or JSON.
//!
//! Owns: the one global subscriber. Never: decides what to log (modules do), or writes
//! anywhere but stderr (journald and log files collect stderr).
//!
//! Level: `RUST_LOG` when set and valid (full `EnvFilter` syntax, e.g.
//! `vsm::ha=debug,info`), otherwise the verbosity flag: 0 → `info`, 1 → `debug`,
//! 2 or more → `trace`.
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

use std::sync::Once;

use tracing_subscriber::EnvFilter;

static INIT: Once = Once::new();

/// The filter used for a verbosity flag when `RUST_LOG` is not set.
pub fn level_for(verbosity: u8) -> &'static str {
    match verbosity {
        0 => "info",
        1 => "debug",
        _ => "trace",
    }
}

/// Installs the global subscriber: stderr, text (or JSON lines with `json`), level from
/// `RUST_LOG` or else from `verbosity`. Safe to call more than once.
pub fn init(verbosity: u8, json: bool) {
    INIT.call_once(|| {
        let filter = EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| EnvFilter::new(level_for(verbosity)));
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_target(true);
        // Another subscriber (e.g. a test harness) may already be installed: keep it.
        let _ = if json {
            builder.json().flatten_event(true).try_init()
        } else {
            builder.try_init()
        };
    });
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
    fn init_twice_is_harmless() {
        init(0, false);
        init(2, true);
        tracing::info!(session_id = "s1", user = "alice", "telemetry test event");
    }
}
