//! `tlctl ha watch`: keeps a keepalived track file in step with the local `vsmserver`.
//!
//! keepalived's `vrrp_script` runs at most once a second, so on its own a crashed daemon is
//! noticed up to a second late. The watcher holds one connection to the daemon's Unix socket
//! and asks `ha check` every interval; between checks it waits on that connection, so the
//! moment the daemon dies (its socket closes) the track file says so, without waiting for
//! the next check. keepalived watches the file with inotify (`vrrp_track_file`), so the
//! address moves within milliseconds of the crash.
//!
//! Invariants:
//! - The file holds `0` only while the daemon answered its last check ready; it holds `1`
//!   while the daemon is not ready, hung (no answer within [`CHECK_TIMEOUT`]) or unreachable.
//! - The file is replaced atomically (write beside it, then rename) and only when the state
//!   changes, so keepalived never reads a half-written value.
//! - A connection that closes is not taken for a crash on its own: the watcher reconnects at
//!   once, and only a refused connection (nobody listens: the daemon is gone) or a failed
//!   check counts.

use crate::proto::api::{ApiReply, ApiRequest};
use crate::proto::PlainConn;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::net::UnixStream;

/// How long one check may take before the daemon counts as hung.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// What the watcher last saw of the daemon.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    Ready,
    NotReady,
    Hung,
    Unreachable,
}

impl Health {
    /// The track file's content: 0 healthy, 1 not (keepalived: `weight 0` means FAULT).
    pub fn track_value(self) -> &'static str {
        match self {
            Health::Ready => "0\n",
            _ => "1\n",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Health::Ready => "vsmserver is ready",
            Health::NotReady => "vsmserver answers but is not ready",
            Health::Hung => "vsmserver does not answer its health check",
            Health::Unreachable => "vsmserver is not running (its socket refuses connections)",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("cannot write the track file {path}: {source}")]
    TrackFile { path: PathBuf, source: std::io::Error },
}

/// Writes `health` to `file` atomically.
pub fn write_track(file: &Path, health: Health) -> Result<(), WatchError> {
    let err = |source| WatchError::TrackFile { path: file.to_path_buf(), source };
    let mut tmp = file.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, health.track_value()).map_err(err)?;
    std::fs::rename(&tmp, file).map_err(err)
}

/// The track file and the state it holds.
struct Tracker<'a> {
    file: &'a Path,
    last: Option<Health>,
}

impl Tracker<'_> {
    fn set(&mut self, h: Health) -> Result<(), WatchError> {
        if self.last != Some(h) {
            write_track(self.file, h)?;
            crate::errln!("tlctl ha watch: {}; {} holds {}", h.describe(), self.file.display(), h.track_value().trim());
            self.last = Some(h);
        }
        Ok(())
    }
}

/// One health check on `c`: `None` when the connection broke (closed or failed).
async fn check(c: &mut PlainConn<UnixStream>) -> Option<Health> {
    let asked = async {
        c.send(&ApiRequest::HaCheck).await.ok()?;
        c.recv::<ApiReply>().await.ok().flatten()
    };
    match tokio::time::timeout(CHECK_TIMEOUT, asked).await {
        Ok(Some(ApiReply::Ok { .. })) => Some(Health::Ready),
        Ok(Some(_)) => Some(Health::NotReady),
        Ok(None) => None,
        Err(_) => Some(Health::Hung),
    }
}

/// Watches the daemon at `socket` forever, keeping `file` up to date; returns only when the
/// file cannot be written.
pub async fn watch(socket: &Path, file: &Path, interval: Duration) -> Result<(), WatchError> {
    let mut t = Tracker { file, last: None };
    loop {
        let mut c = match UnixStream::connect(socket).await {
            Ok(s) => PlainConn::new(s),
            Err(_) => {
                t.set(Health::Unreachable)?;
                tokio::time::sleep(interval).await;
                continue;
            }
        };
        let mut answered = false;
        loop {
            match check(&mut c).await {
                Some(Health::Hung) => {
                    // A reply may still come on this connection; start afresh.
                    t.set(Health::Hung)?;
                    break;
                }
                Some(h) => t.set(h)?,
                // Closed under us: reconnect at once; a refused connect says it died.
                None => break,
            }
            answered = true;
            // The daemon sends nothing unasked: whatever wakes this read is the connection
            // closing, most likely because the daemon died.
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = c.recv::<ApiReply>() => break,
            }
        }
        if !answered {
            // Accepted but closed before answering: do not spin on such a daemon.
            tokio::time::sleep(interval).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_track_file_is_zero_only_when_ready() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("track");
        for (h, want) in
            [(Health::Ready, "0\n"), (Health::NotReady, "1\n"), (Health::Hung, "1\n"), (Health::Unreachable, "1\n")]
        {
            write_track(&f, h).unwrap();
            assert_eq!(std::fs::read_to_string(&f).unwrap(), want, "{h:?}");
        }
        assert!(!d.path().join("track.tmp").exists(), "nothing is left beside it");
    }

    #[test]
    fn an_unwritable_track_file_is_an_error_naming_it() {
        let e = write_track(Path::new("/nonexistent-dir/track"), Health::Ready).unwrap_err();
        assert!(e.to_string().contains("/nonexistent-dir/track"), "{e}");
    }
}
