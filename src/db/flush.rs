//! Making commits durable without holding the owner thread for the flush (`synchronous` FULL).
//!
//! With FULL, nothing of a commit may leave the process before the commit is on disk: not its
//! reply, not its changes (streamed to the peer), not a read that saw it. SQLite's own FULL
//! flushes the write-ahead log inside `COMMIT`, which kept the owner thread (and the HA tasks
//! sharing its runtime) waiting for the disk on every group commit: under load the next group
//! could neither gather nor commit while the disk worked, and half the time went there.
//!
//! So the owner's connection runs with SQLite's NORMAL, which still flushes the log before
//! every checkpoint and after every restart of the log (the files stay consistent across a
//! power loss) but not at each commit, and this module adds the commit flush back, off the
//! owner's path:
//! - [`Flusher::begin`] numbers a group commit before its transaction starts, and
//!   [`Flusher::committed`] hands over, once `COMMIT` returned, what the commit lets out (its
//!   [`Delivery`]: replies, changes, head).
//! - A thread (`vsm-db-flush`) flushes the log (`fdatasync`) and then runs the deliveries of
//!   every commit the flush covers, in commit order. While it flushes, the owner commits the
//!   next group, so one flush usually covers several commits.
//! - When nothing else is queued and the thread is idle (a lone writer), the owner flushes
//!   and delivers itself: that saves two thread hand-overs and costs no concurrency, since
//!   nobody waits to be served meanwhile. The thread and the readers are woken only when they
//!   wait (a condition variable's notify is a system call even then), so a lone writer's
//!   commit wakes nobody.
//! - Readers on other connections (the point reader, snapshots, digests) may see a commit as
//!   soon as `COMMIT` returned, before its flush. [`Durable::settle`] makes them wait, after
//!   their read, until every commit begun before it ended is flushed, so what they read is on
//!   disk before it leaves the process. Reads served by the owner wait the same way. A read
//!   of one user's sessions (a login's) waits only for the commits that wrote a record of
//!   that user ([`Durable::settle_user`]; the owner notes them with [`Flusher::touch`]), so
//!   concurrent logins of different users do not wait for each other's flushes.
//!
//! Must never: deliver a commit before a flush that began after its `COMMIT` returned; deliver
//! out of commit order; answer a write as done after a failed flush. A flush that fails makes
//! the database refuse every later write (with the error) until `vsmserver` restarts: after a
//! failed `fdatasync` the kernel may have dropped the unwritten pages, so only the file as it
//! is on disk, read again at the next start, can be trusted.

use std::collections::VecDeque;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use super::DbError;

/// What a commit lets out once it is on disk: called with `Ok` after the flush, or with the
/// failure, in which case it must answer every request of the commit with that error.
pub(super) type Delivery = Box<dyn FnOnce(Result<(), &FlushFailed>) + Send>;

/// A failed flush of the log, kept to answer every later write with it.
#[derive(Clone, Debug)]
pub(super) struct FlushFailed {
    wal: PathBuf,
    errno: Option<i32>,
    kind: std::io::ErrorKind,
    message: String,
}

impl FlushFailed {
    fn new(wal: &Path, e: &std::io::Error) -> FlushFailed {
        FlushFailed { wal: wal.to_path_buf(), errno: e.raw_os_error(), kind: e.kind(), message: e.to_string() }
    }

    /// The error a request gets (a fresh value each time: `io::Error` is not `Clone`).
    pub(super) fn error(&self) -> DbError {
        let source = match self.errno {
            Some(errno) => std::io::Error::from_raw_os_error(errno),
            None => std::io::Error::new(self.kind, self.message.clone()),
        };
        let context = format!(
            "flush the session database's write-ahead log {} (every write is refused until vsmserver restarts)",
            self.wal.display()
        );
        DbError::Io { context, source }.or_disk_full(&self.wal)
    }
}

#[derive(Default)]
struct State {
    /// Number of the last group commit begun (readers may see it from when it commits).
    begun: u64,
    /// Number of the last group commit whose `COMMIT` returned.
    committed: u64,
    /// Every commit up to this number is flushed and delivered.
    settled: u64,
    /// Deliveries of committed groups not yet flushed, oldest first.
    queue: VecDeque<Delivery>,
    /// A flush and its deliveries are under way (on the thread, or inline on the owner).
    busy: bool,
    failed: Option<FlushFailed>,
    stop: bool,
    /// The thread waits on `work` (so a delivery queued must wake it).
    thread_waiting: bool,
    /// Readers waiting on `settled`.
    readers_waiting: usize,
    /// How often the thread woke up (for tests: a lone writer's flushes must not wake it).
    thread_wakeups: u64,
}

/// Above this many users remembered, those whose last commit is settled are forgotten.
const TOUCHED_PRUNE_AT: usize = 4096;

struct Shared {
    /// The log file, opened on its own: `fdatasync` on any descriptor flushes the file.
    wal: File,
    /// Per user, the last group commit that wrote a record of theirs (as the session's user,
    /// before or after the write): what a read of one user's sessions must wait for.
    touched: Mutex<std::collections::HashMap<String, u64>>,
    wal_path: PathBuf,
    state: Mutex<State>,
    /// The thread waits here for deliveries.
    work: Condvar,
    /// Readers wait here for `settled` to move.
    settled: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Deliveries run outside the lock, so a panic while it is held leaves the counters
        // consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Flushes (unless an earlier flush failed) and delivers `items`, then marks every
    /// commit up to `upto` settled. Called with `busy` set, without the lock.
    fn flush_and_deliver(&self, upto: u64, failed: Option<FlushFailed>, items: impl IntoIterator<Item = Delivery>) {
        let res = match failed {
            Some(f) => Err(f),
            None => self.wal.sync_data().map_err(|e| {
                let f = FlushFailed::new(&self.wal_path, &e);
                tracing::error!(error = %f.error(), "the session database cannot make its commits durable");
                f
            }),
        };
        for d in items {
            d(res.as_ref().map(|_| ()));
        }
        let mut st = self.lock();
        st.busy = false;
        if let Err(f) = res {
            st.failed.get_or_insert(f);
        }
        st.settled = st.settled.max(upto);
        let settled = st.settled;
        // A notify is a system call even when nobody waits: wake only who does (a lone
        // writer's inline flush then costs no wake-up of the thread or of anyone).
        let wake_readers = st.readers_waiting > 0;
        let wake_thread = st.thread_waiting && !st.queue.is_empty();
        drop(st);
        if wake_readers {
            self.settled.notify_all();
        }
        if wake_thread {
            self.work.notify_one();
        }
        let mut touched = self.touched.lock().unwrap_or_else(|e| e.into_inner());
        if touched.len() > TOUCHED_PRUNE_AT {
            touched.retain(|_, n| *n > settled);
        }
    }

    fn wait_for_work<'a>(&'a self, mut st: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        st.thread_waiting = true;
        let mut st = self.work.wait(st).unwrap_or_else(|e| e.into_inner());
        st.thread_waiting = false;
        st.thread_wakeups += 1;
        st
    }

    fn run(&self) {
        let mut st = self.lock();
        loop {
            while (st.queue.is_empty() || st.busy) && !st.stop {
                st = self.wait_for_work(st);
            }
            if st.queue.is_empty() {
                return;
            }
            if st.busy {
                // Stopping while the owner flushes inline cannot happen (the owner stops
                // us), but never run two flushes' deliveries at once.
                st = self.wait_for_work(st);
                continue;
            }
            st.busy = true;
            let upto = st.committed;
            let items = std::mem::take(&mut st.queue);
            let failed = st.failed.clone();
            drop(st);
            self.flush_and_deliver(upto, failed, items);
            st = self.lock();
        }
    }
}

/// The owner's side: numbers commits and hands their deliveries to the flush thread.
pub(super) struct Flusher {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Flusher {
    /// Opens the log of the database at `db` (it exists once the owner's connection has read
    /// the database in WAL mode) and starts the flush thread.
    pub(super) fn start(db: &Path) -> Result<Flusher, DbError> {
        let mut wal_path = db.as_os_str().to_owned();
        wal_path.push("-wal");
        let wal_path = PathBuf::from(wal_path);
        let wal = File::open(&wal_path).map_err(|source| DbError::Io {
            context: format!("open the write-ahead log {} to flush it", wal_path.display()),
            source,
        })?;
        let shared = Arc::new(Shared {
            wal,
            wal_path,
            touched: Mutex::new(Default::default()),
            state: Mutex::new(State::default()),
            work: Condvar::new(),
            settled: Condvar::new(),
        });
        let theirs = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("vsm-db-flush".into())
            .spawn(move || theirs.run())
            .map_err(|source| DbError::Io { context: "start the database flush thread".into(), source })?;
        Ok(Flusher { shared, thread: Some(thread) })
    }

    /// What readers on other connections wait on.
    pub(super) fn durable(&self) -> Durable {
        Durable(Some(Arc::clone(&self.shared)))
    }

    /// The failed flush every later write is refused with ([`FlushFailed::error`]).
    pub(super) fn failed(&self) -> Option<FlushFailed> {
        self.shared.lock().failed.clone()
    }

    /// Numbers the group commit about to start. Every number begun must be passed to
    /// [`Flusher::committed`], whatever the transaction's outcome: readers wait for it.
    pub(super) fn begin(&self) -> u64 {
        let mut st = self.shared.lock();
        st.begun += 1;
        st.begun
    }

    /// Group commit `n` (begun, not yet committed) writes records of `users`.
    pub(super) fn touch<'a>(&self, n: u64, users: impl IntoIterator<Item = &'a str>) {
        let mut touched = self.shared.touched.lock().unwrap_or_else(|e| e.into_inner());
        for user in users {
            match touched.get_mut(user) {
                Some(t) => *t = (*t).max(n),
                None => {
                    touched.insert(user.to_string(), n);
                }
            }
        }
    }

    /// Commit `n` returned (or failed: then `delivery` only answers errors, but still in
    /// order). `alone`: no other request waits for the owner, so it may flush and deliver
    /// itself when the thread has nothing pending either.
    pub(super) fn committed(&self, n: u64, delivery: Delivery, alone: bool) {
        let mut st = self.shared.lock();
        st.committed = n;
        if alone && st.queue.is_empty() && !st.busy {
            st.busy = true;
            let failed = st.failed.clone();
            drop(st);
            self.shared.flush_and_deliver(n, failed, [delivery]);
        } else {
            st.queue.push_back(delivery);
            // A busy thread looks at the queue again after its flush.
            let wake = st.thread_waiting;
            drop(st);
            if wake {
                self.shared.work.notify_one();
            }
        }
    }

    /// Flushes and delivers everything committed so far, then stops the thread.
    pub(super) fn stop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.work.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // Readers still waiting (a commit begun but never committed: the owner failed)
        // are let go.
        self.shared.settled.notify_all();
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Held by readers: waits until what they read is on disk. Empty (never waits) when the
/// database flushes inside `COMMIT` or not at all.
#[derive(Clone, Default)]
pub(super) struct Durable(Option<Arc<Shared>>);

impl std::fmt::Debug for Durable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "Durable(flush thread)" } else { "Durable(in commit)" })
    }
}

impl Durable {
    /// Call after a read: returns once every commit begun before now is flushed, so nothing
    /// the read saw can be lost by a power failure. Waits at most for one commit and one
    /// flush; returns at once when nothing is pending.
    pub(super) fn settle(&self) -> Result<(), DbError> {
        self.settle_to(u64::MAX)
    }

    /// Call after a read of `user`'s sessions only: returns once every commit that wrote a
    /// record of theirs before now is flushed. Commits of other users' records, which the read
    /// did not see, are not waited for (a login does not wait for the other logins' flushes).
    pub(super) fn settle_user(&self, user: &str) -> Result<(), DbError> {
        let Some(shared) = &self.0 else { return Ok(()) };
        // None: never written, or forgotten once settled (a failed flush still refuses).
        let last = shared.touched.lock().unwrap_or_else(|e| e.into_inner()).get(user).copied();
        self.settle_to(last.unwrap_or(0))
    }

    /// Waits until every commit up to `upto` (at most those begun so far) is flushed.
    fn settle_to(&self, upto: u64) -> Result<(), DbError> {
        let Some(shared) = &self.0 else { return Ok(()) };
        let mut st = shared.lock();
        let target = upto.min(st.begun);
        while st.settled < target && st.failed.is_none() && !st.stop {
            st.readers_waiting += 1;
            st = shared.settled.wait(st).unwrap_or_else(|e| e.into_inner());
            st.readers_waiting -= 1;
        }
        if let Some(f) = &st.failed {
            return Err(f.error());
        }
        if st.settled < target {
            return Err(DbError::Closed);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    fn flusher(dir: &tempfile::TempDir) -> Flusher {
        let db = dir.path().join("x.db");
        std::fs::write(dir.path().join("x.db-wal"), b"").unwrap();
        Flusher::start(&db).unwrap()
    }

    /// A delivery that records its turn (and whether the flush succeeded) in `log`.
    fn note(log: &Arc<Mutex<Vec<(u64, bool)>>>, n: u64) -> Delivery {
        let log = Arc::clone(log);
        Box::new(move |res| log.lock().unwrap().push((n, res.is_ok())))
    }

    #[test]
    fn deliveries_run_in_commit_order_whether_inline_or_on_the_thread() {
        let dir = tempfile::tempdir().unwrap();
        let f = flusher(&dir);
        let log = Arc::new(Mutex::new(Vec::new()));
        for n in 1..=200u64 {
            let t = f.begin();
            assert_eq!(t, n);
            // Every third commit finds nobody else waiting.
            f.committed(t, note(&log, n), n % 3 == 0);
        }
        f.durable().settle().unwrap();
        let got = log.lock().unwrap().clone();
        assert_eq!(got, (1..=200).map(|n| (n, true)).collect::<Vec<_>>());
    }

    #[test]
    fn a_lone_commit_is_delivered_before_committed_returns() {
        let dir = tempfile::tempdir().unwrap();
        let f = flusher(&dir);
        let log = Arc::new(Mutex::new(Vec::new()));
        let n = f.begin();
        f.committed(n, note(&log, n), true);
        assert_eq!(*log.lock().unwrap(), vec![(1, true)]);
    }

    #[test]
    fn a_lone_writers_flushes_wake_neither_the_thread_nor_anyone() {
        let dir = tempfile::tempdir().unwrap();
        let f = flusher(&dir);
        while !f.shared.lock().thread_waiting {
            std::thread::sleep(Duration::from_millis(1));
        }
        let before = f.shared.lock().thread_wakeups;
        let log = Arc::new(Mutex::new(Vec::new()));
        for _ in 0..100 {
            let n = f.begin();
            f.committed(n, note(&log, n), true);
        }
        assert_eq!(log.lock().unwrap().len(), 100);
        assert_eq!(f.shared.lock().thread_wakeups, before, "an inline flush woke the flush thread");
        // A queued delivery does wake it.
        let n = f.begin();
        f.committed(n, note(&log, n), false);
        f.durable().settle().unwrap();
        assert_eq!(log.lock().unwrap().len(), 101);
        assert!(f.shared.lock().thread_wakeups > before);
    }

    #[test]
    fn settle_waits_for_a_commit_begun_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let f = flusher(&dir);
        let n = f.begin();
        let durable = f.durable();
        waits_for_commit(
            &f,
            n,
            move || durable.settle().unwrap(),
            &format!("settle returned while commit {n} was still open"),
        );
    }

    /// Runs `wait` on a thread of its own, checks that it still waits 50 ms later (else
    /// fails with `early`), then commits `n` and checks that the wait ended only after the
    /// commit's delivery ran.
    fn waits_for_commit(f: &Flusher, n: u64, wait: impl FnOnce() + Send + 'static, early: &str) {
        let done = Arc::new(AtomicU64::new(0));
        let theirs = Arc::clone(&done);
        let reader = std::thread::spawn(move || {
            wait();
            theirs.load(Ordering::SeqCst)
        });
        std::thread::sleep(Duration::from_millis(50));
        assert!(!reader.is_finished(), "{early}");
        let mark = Arc::clone(&done);
        f.committed(n, Box::new(move |_| mark.store(1, Ordering::SeqCst)), false);
        // The reader is released only after the delivery ran.
        assert_eq!(reader.join().unwrap(), 1);
    }

    #[test]
    fn a_read_of_one_users_sessions_waits_only_for_that_users_commits() {
        let dir = tempfile::tempdir().unwrap();
        let f = flusher(&dir);
        let n = f.begin();
        f.touch(n, ["anna"]);
        let durable = f.durable();
        // Another user's read does not wait for anna's commit, still open.
        durable.settle_user("bert").unwrap();
        let theirs = f.durable();
        waits_for_commit(
            &f,
            n,
            move || theirs.settle_user("anna").unwrap(),
            "anna's read returned before her commit was flushed",
        );
        // Settled entries are forgotten once there are many; a read of them returns at once.
        for i in 0..(TOUCHED_PRUNE_AT as u64 + 10) {
            let n = f.begin();
            f.touch(n, [format!("user{i}").as_str()]);
            f.committed(n, Box::new(|_| ()), true);
        }
        assert!(f.shared.touched.lock().unwrap().len() <= TOUCHED_PRUNE_AT + 1);
        durable.settle_user("user3").unwrap();
    }

    #[test]
    fn a_failed_flush_fails_its_commit_and_every_later_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = flusher(&dir);
        // Pretend the disk failed: what a failed fdatasync leaves behind.
        f.shared.lock().failed =
            Some(FlushFailed::new(&dir.path().join("x.db-wal"), &std::io::Error::from_raw_os_error(libc::EIO)));
        let log = Arc::new(Mutex::new(Vec::new()));
        let n = f.begin();
        f.committed(n, note(&log, n), false);
        let err = f.durable().settle().unwrap_err().to_string();
        assert!(err.contains("write-ahead log") && err.contains("restarts"), "{err}");
        f.stop();
        assert_eq!(*log.lock().unwrap(), vec![(1, false)]);
        assert!(f.failed().is_some());
    }

    #[test]
    fn stopping_delivers_what_is_queued() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = flusher(&dir);
        let log = Arc::new(Mutex::new(Vec::new()));
        for _ in 0..5 {
            let n = f.begin();
            f.committed(n, note(&log, n), false);
        }
        f.stop();
        assert_eq!(log.lock().unwrap().len(), 5);
    }

    #[test]
    fn a_missing_log_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let err = Flusher::start(&dir.path().join("none.db")).err().unwrap().to_string();
        assert!(err.contains("none.db-wal"), "{err}");
    }
}
