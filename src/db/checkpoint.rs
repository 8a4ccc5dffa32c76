//! Keeping the write-ahead log short without making commits wait for it.
//!
//! A checkpoint copies the log's pages back into the database file and flushes that file;
//! only once the log is wholly copied can the next commit start writing it again from the
//! beginning (SQLite "restarts" the log then, at no cost). Two parts share the work:
//!
//! - A background thread (`vsm-db-checkpoint`, its own connection) runs a PASSIVE
//!   checkpoint whenever the owner pokes it, every [`POKE_COMMITS`] commits or
//!   [`POKE_ROWS`] rows. It never blocks the owner, but under a steady stream of commits it
//!   never catches up either: new frames arrive while it copies, so the log keeps growing.
//! - The owner finishes the job itself once the log holds [`RESTART_FRAMES`] frames: it
//!   asks for background passes until one is short (each copies what came during the one
//!   before, so they shorten quickly), and then, between two rounds of requests, runs a
//!   PASSIVE checkpoint on its own connection. That copies only the frames committed since
//!   the short pass began (a few commits' worth), so the flush the next writes wait for is
//!   small, and the next transaction restarts the log.
//!
//! SQLite's own automatic checkpoint, which runs inside a commit whenever the log passes
//! its mark, stays as a safety net at a higher mark (`schema::WAL_AUTOCHECKPOINT_PAGES`).
//! Its default of 1,000 pages was reached every few dozen commits under load, and every
//! time the writes of that group waited for a flush of all the database pages the log had
//! touched since the last background pass (5-10 ms on a virtual disk).

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use rusqlite::Connection;

/// The background thread is poked after this many commits or rows written, whichever
/// first. Each pass ends with a flush of the database file, which on a shared disk delays
/// the log flushes that commits wait for, and copies every page the log changed since the
/// pass before, however often it changed: rare passes copy a hot page (the last leaf of the
/// table, of its id index, of the change log) once for many commits. Every 32 commits or 512
/// rows made replicated writes from 16 writers 5-10 % slower, with a p99 10-20 % higher,
/// than these values on a disk whose flush takes 0.1 ms (`docs/benchmarks.md`).
const POKE_COMMITS: u32 = 4096;
const POKE_ROWS: u32 = 4096;

/// Log frames (pages) after which the owner completes a checkpoint itself so the log
/// restarts: 16,384 frames are 64 MiB of log with 4 KiB pages. Larger means fewer of the
/// owner's short waits and fewer copies of hot pages, a longer log for readers to search
/// and more disk kept by the log.
pub(super) const RESTART_FRAMES: u64 = 16_384;

/// A background pass this short (in microseconds) left only a few commits' frames behind
/// it, so the owner's own checkpoint after it is short too (a flush of a few dozen pages).
const SHORT_PASS_US: u64 = 2_000;

/// At most this many passes are chained before the owner checkpoints anyway (the log
/// keeps growing meanwhile; under a steady load passes shorten quickly).
const MAX_CHAINED_PASSES: u32 = 4;

/// What the background pass tells the owner.
#[derive(Default)]
struct Shared {
    /// A pass is running.
    busy: AtomicBool,
    /// Passes completed so far.
    passes: AtomicU64,
    /// Frames in the log when the last pass (by either side) ended.
    log_frames: AtomicU64,
    /// How long the last background pass took, in microseconds.
    last_pass_us: AtomicU64,
}

pub(super) struct Checkpointer {
    poke: SyncSender<()>,
    thread: Option<JoinHandle<()>>,
    shared: Arc<Shared>,
    commits: u32,
    rows: u32,
    /// Set when the log is long: the owner's own checkpoint waits for background passes.
    finish: Option<Finish>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
struct Finish {
    /// The pass (by its number) to wait for.
    after_pass: u64,
    /// Passes asked for so far beyond the first.
    chained: u32,
}

/// `PRAGMA wal_checkpoint` answers (busy, frames in the log, frames copied).
fn checkpoint(conn: &Connection) -> rusqlite::Result<(bool, u64, u64)> {
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
        Ok((r.get::<_, i64>(0)? != 0, r.get::<_, i64>(1)?.max(0) as u64, r.get::<_, i64>(2)?.max(0) as u64))
    })
}

impl Checkpointer {
    /// Starts the background thread on its own connection to `path`. Without it (its
    /// connection or thread could not be made) SQLite's automatic checkpoint takes over.
    pub(super) fn spawn(path: &Path) -> Checkpointer {
        let (poke, rx) = sync_channel::<()>(1);
        let shared = Arc::new(Shared::default());
        let theirs = Arc::clone(&shared);
        let path = path.to_path_buf();
        let started = std::thread::Builder::new().name("vsm-db-checkpoint".into()).spawn(move || {
            let conn = match super::schema::open_checkpointer(&path) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "no background checkpoints; commits will checkpoint inline");
                    return;
                }
            };
            while rx.recv().is_ok() {
                theirs.busy.store(true, Ordering::Release);
                let began = Instant::now();
                match checkpoint(&conn) {
                    Ok((_, log, _)) => theirs.log_frames.store(log, Ordering::Release),
                    Err(e) => tracing::debug!(error = %e, "background checkpoint failed"),
                }
                let took = u64::try_from(began.elapsed().as_micros()).unwrap_or(u64::MAX);
                theirs.last_pass_us.store(took, Ordering::Release);
                theirs.passes.fetch_add(1, Ordering::Release);
                theirs.busy.store(false, Ordering::Release);
            }
        });
        let thread = match started {
            Ok(thread) => Some(thread),
            Err(e) => {
                tracing::warn!(error = %e, "no background checkpoints; commits will checkpoint inline");
                None
            }
        };
        Checkpointer { poke, thread, shared, commits: 0, rows: 0, finish: None }
    }

    /// Counts rows written by the transaction under way.
    pub(super) fn wrote_row(&mut self) {
        self.rows = self.rows.saturating_add(1);
    }

    /// Counts `n` rows written by the transaction under way.
    pub(super) fn wrote_rows(&mut self, n: usize) {
        self.rows = self.rows.saturating_add(u32::try_from(n).unwrap_or(u32::MAX));
    }

    /// Called by the owner after each commit.
    pub(super) fn committed(&mut self) {
        self.commits += 1;
        if self.commits >= POKE_COMMITS || self.rows >= POKE_ROWS {
            self.commits = 0;
            self.rows = 0;
            // Full means a pass is already pending; gone means the thread stopped.
            let _ = self.poke.try_send(());
        }
    }

    /// Called by the owner between two rounds of requests (its last round's writers
    /// already answered), on its connection, outside any transaction: completes the
    /// checkpoint when the log is long and the background pass asked for has ended.
    pub(super) fn between_rounds(&mut self, conn: &Connection) {
        let seen = Seen {
            passes: self.shared.passes.load(Ordering::Acquire),
            busy: self.shared.busy.load(Ordering::Acquire),
            last_pass_us: self.shared.last_pass_us.load(Ordering::Acquire),
            log_frames: self.shared.log_frames.load(Ordering::Acquire),
        };
        match next_step(self.finish, &seen) {
            Step::Wait => {}
            Step::Pass(f) => {
                self.finish = Some(f);
                let _ = self.poke.try_send(());
            }
            Step::Finish => {
                self.finish = None;
                match checkpoint(conn) {
                    // Everything copied: the next transaction restarts the log.
                    Ok((false, log, copied)) if copied >= log => self.shared.log_frames.store(0, Ordering::Release),
                    // A reader still holds an older state: a later round tries again.
                    Ok((_, log, _)) => self.shared.log_frames.store(log, Ordering::Release),
                    Err(e) => tracing::debug!(error = %e, "checkpoint to restart the log failed"),
                }
            }
        }
    }

    /// Stops the background thread (before the owner's last checkpoint, which would
    /// otherwise find it busy).
    pub(super) fn stop(&mut self) {
        let (idle, _) = sync_channel(1);
        drop(std::mem::replace(&mut self.poke, idle));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What the owner read of the background thread's state.
struct Seen {
    passes: u64,
    busy: bool,
    last_pass_us: u64,
    log_frames: u64,
}

#[derive(Debug, PartialEq)]
enum Step {
    /// Nothing to do this round.
    Wait,
    /// Ask for a background pass and wait for it.
    Pass(Finish),
    /// Checkpoint on the owner's connection now.
    Finish,
}

/// The owner's decision between two rounds (see the module's documentation).
fn next_step(finish: Option<Finish>, seen: &Seen) -> Step {
    match finish {
        None if seen.log_frames >= RESTART_FRAMES => {
            // Passes first, so that ours has only the newest frames to copy.
            Step::Pass(Finish { after_pass: seen.passes + 1, chained: 0 })
        }
        Some(f) if seen.passes >= f.after_pass && !seen.busy => {
            // A pass copies what was in the log when it began; what came while it ran is
            // left. A short pass left little: finish now. Else another pass, shorter.
            if seen.last_pass_us <= SHORT_PASS_US || f.chained >= MAX_CHAINED_PASSES {
                Step::Finish
            } else {
                Step::Pass(Finish { after_pass: seen.passes + 1, chained: f.chained + 1 })
            }
        }
        _ => Step::Wait,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(passes: u64, busy: bool, last_pass_us: u64, log_frames: u64) -> Seen {
        Seen { passes, busy, last_pass_us, log_frames }
    }

    #[test]
    fn a_short_log_needs_nothing_from_the_owner() {
        assert_eq!(next_step(None, &seen(7, false, 50, RESTART_FRAMES - 1)), Step::Wait);
    }

    #[test]
    fn a_long_log_asks_for_a_pass_then_finishes_after_a_short_one() {
        let s = seen(7, true, 9_000, RESTART_FRAMES);
        let Step::Pass(f) = next_step(None, &s) else { panic!("a long log must ask for a pass") };
        assert_eq!(f, Finish { after_pass: 8, chained: 0 });
        // The pass under way is not the one asked for; nor is a finished one while busy.
        assert_eq!(next_step(Some(f), &seen(7, false, 100, RESTART_FRAMES)), Step::Wait);
        assert_eq!(next_step(Some(f), &seen(8, true, 100, RESTART_FRAMES)), Step::Wait);
        assert_eq!(next_step(Some(f), &seen(8, false, SHORT_PASS_US, RESTART_FRAMES)), Step::Finish);
    }

    #[test]
    fn long_passes_are_chained_a_bounded_number_of_times() {
        let mut f = Finish { after_pass: 1, chained: 0 };
        let mut passes = 1;
        for chained in 1..=MAX_CHAINED_PASSES {
            match next_step(Some(f), &seen(passes, false, SHORT_PASS_US + 1, RESTART_FRAMES)) {
                Step::Pass(next) => {
                    assert_eq!(next, Finish { after_pass: passes + 1, chained });
                    f = next;
                }
                other => panic!("a long pass must be followed by another, got {other:?}"),
            }
            passes += 1;
        }
        assert_eq!(next_step(Some(f), &seen(passes, false, 60_000, RESTART_FRAMES)), Step::Finish);
    }

    /// The owner's own checkpoint copies what the background left, so the next
    /// transaction starts the log again from its beginning.
    #[test]
    fn the_owners_checkpoint_lets_the_next_commit_restart_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let conn = super::super::schema::open(&path, crate::model::DbSynchronous::Normal).unwrap().conn;
        conn.execute_batch("PRAGMA wal_autocheckpoint = 0; CREATE TABLE t (x BLOB);").unwrap();
        let mut c = Checkpointer::spawn(&path);
        let wal = path.with_extension("db-wal");
        let frames_at = |rows: u32| {
            conn.execute(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?1)
                 INSERT INTO t SELECT randomblob(3000) FROM n",
                [rows],
            )
            .unwrap();
            std::fs::metadata(&wal).unwrap().len()
        };
        let long = frames_at(RESTART_FRAMES as u32 + 100);
        c.shared.log_frames.store(RESTART_FRAMES, Ordering::Release);
        let deadline = Instant::now() + std::time::Duration::from_secs(20);
        while c.shared.log_frames.load(Ordering::Acquire) != 0 {
            assert!(Instant::now() < deadline, "the owner never completed the checkpoint");
            c.between_rounds(&conn);
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        // The log restarted: the file keeps its size, and a small commit writes at its start.
        let header_before: Vec<u8> = std::fs::read(&wal).unwrap()[..32].to_vec();
        assert_eq!(frames_at(1), long);
        assert_ne!(std::fs::read(&wal).unwrap()[..32].to_vec(), header_before, "the log header (salts) must change");
        c.stop();
    }
}
