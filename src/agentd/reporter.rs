//! Delivery of session-exit reports to the master at `master_hostname`.
//!
//! Owns the outbox: reports waiting for the master's acknowledgement, in the order the
//! sessions ended, persisted to `state_dir/outbox.json` so an agent restart does not lose
//! them. One task ([`run_reporter`]) drains a bounded channel into the outbox and sends the
//! oldest report until the master acknowledges it, then the next.
//!
//! Invariants:
//! - A report leaves the outbox only after the sink returned `Ok` (the master acknowledged).
//! - Reports are delivered in order; a report is never skipped because a later one could go.
//! - A master outage (a failover moving `master_hostname` to the other node) only delays
//!   delivery: retries back off exponentially up to a ceiling and never give up.
//! - Delivery is at least once: the master must treat a repeated or unknown exit as done.
//!
//! The transport is behind [`ReportSink`] so the retry logic is tested with a fake master;
//! the daemon plugs in the secure channel.

use crate::proto::agent::AgentReport;
use std::collections::VecDeque;
use std::fmt::Display;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::mpsc;

/// Something that delivers one report to the master and returns once it is acknowledged.
pub trait ReportSink: Send + Sync + 'static {
    type Error: Display + Send;
    fn send(&self, report: &AgentReport) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

/// Any `Fn(AgentReport) -> impl Future<Output = Result<(), E>>` is a sink.
impl<F, Fut, E> ReportSink for F
where
    F: Fn(AgentReport) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send,
    E: Display + Send,
{
    type Error = E;
    fn send(&self, report: &AgentReport) -> impl Future<Output = Result<(), E>> + Send {
        self(report.clone())
    }
}

/// Tuning of the reporter.
#[derive(Clone, Debug)]
pub struct ReporterConfig {
    /// First wait after a failed send.
    pub backoff_initial: Duration,
    /// Longest wait between two sends.
    pub backoff_max: Duration,
    /// How long one send may take before it counts as failed.
    pub send_timeout: Duration,
    /// Where the outbox is persisted; `None` keeps it in memory only.
    pub outbox_path: Option<PathBuf>,
}

impl Default for ReporterConfig {
    fn default() -> Self {
        ReporterConfig {
            backoff_initial: Duration::from_millis(250),
            backoff_max: Duration::from_secs(10),
            send_timeout: Duration::from_secs(5),
            outbox_path: None,
        }
    }
}

/// Reports not yet acknowledged, oldest first.
#[derive(Debug, Default)]
struct Outbox {
    path: Option<PathBuf>,
    queue: VecDeque<AgentReport>,
}

impl Outbox {
    fn load(path: Option<PathBuf>) -> Outbox {
        let mut queue = VecDeque::new();
        if let Some(p) = &path {
            match std::fs::read(p) {
                Ok(bytes) => match serde_json::from_slice::<Vec<AgentReport>>(&bytes) {
                    Ok(v) => queue.extend(v),
                    Err(e) => tracing::error!(
                        path = %p.display(), error = %e,
                        "outbox file is not a json list of reports; starting with an empty outbox"
                    ),
                },
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::error!(path = %p.display(), error = %e, "cannot read outbox"),
            }
        }
        if !queue.is_empty() {
            tracing::info!(pending = queue.len(), "exit reports from before the restart are pending");
        }
        Outbox { path, queue }
    }

    fn persist(&self) {
        let Some(p) = &self.path else { return };
        let list: Vec<&AgentReport> = self.queue.iter().collect();
        if let Err(e) = super::write_json_atomic(p, &list) {
            tracing::error!(path = %p.display(), error = %e, "cannot persist outbox; reports pending now are lost on restart");
        }
    }
}

/// Deliver reports from `rx` through `sink` until `shutdown` resolves, or until `rx` is
/// closed and everything is delivered.
pub async fn run_reporter<S: ReportSink>(
    sink: S,
    mut rx: mpsc::Receiver<AgentReport>,
    cfg: ReporterConfig,
    shutdown: impl Future,
) {
    let mut outbox = Outbox::load(cfg.outbox_path.clone());
    let mut delay = cfg.backoff_initial;
    let mut failing = false;
    let mut closed = false;
    tokio::pin!(shutdown);
    loop {
        let mut added = false;
        loop {
            match rx.try_recv() {
                Ok(r) => {
                    outbox.queue.push_back(r);
                    added = true;
                }
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    closed = true;
                    break;
                }
            }
        }
        if added {
            outbox.persist();
        }
        let Some(front) = outbox.queue.front().cloned() else {
            if closed {
                return;
            }
            tokio::select! {
                r = rx.recv() => match r {
                    Some(r) => {
                        outbox.queue.push_back(r);
                        outbox.persist();
                    }
                    None => return,
                },
                _ = &mut shutdown => return,
            }
            continue;
        };
        let result = tokio::select! {
            r = tokio::time::timeout(cfg.send_timeout, sink.send(&front)) => r,
            _ = &mut shutdown => return,
        };
        match result {
            Ok(Ok(())) => {
                outbox.queue.pop_front();
                outbox.persist();
                delay = cfg.backoff_initial;
                if failing {
                    tracing::info!(pending = outbox.queue.len(), "master acknowledges exit reports again");
                    failing = false;
                }
                log_delivered(&front);
            }
            other => {
                let why = match other {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("no acknowledgement within {:?}", cfg.send_timeout),
                };
                if !failing {
                    tracing::warn!(error = %why, pending = outbox.queue.len(), "cannot deliver exit report to the master; retrying until it answers");
                    failing = true;
                } else {
                    tracing::debug!(error = %why, retry_in = ?delay, "exit report still not delivered");
                }
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = &mut shutdown => return,
                }
                delay = (delay * 2).min(cfg.backoff_max);
            }
        }
    }
}

fn log_delivered(r: &AgentReport) {
    match r {
        AgentReport::SessionExited { session_id, display: dpy, .. } => {
            tracing::info!(session_id = %session_id, display = *dpy, "master acknowledged session exit")
        }
    }
}

/// Where the daemon keeps its outbox inside `state_dir`.
pub fn outbox_path(state_dir: &Path) -> PathBuf {
    state_dir.join("outbox.json")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::SessionId;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::{Arc, Mutex};

    fn exited(n: u32) -> AgentReport {
        AgentReport::SessionExited { session_id: SessionId(format!("s{n}")), display: n, exit_status: Some(0) }
    }

    fn fast() -> ReporterConfig {
        ReporterConfig {
            backoff_initial: Duration::from_millis(1),
            backoff_max: Duration::from_millis(5),
            send_timeout: Duration::from_secs(5),
            outbox_path: None,
        }
    }

    /// A fake master that refuses the first `fail` sends, then acknowledges.
    #[derive(Clone, Default)]
    struct FakeMaster {
        fail: Arc<AtomicU32>,
        attempts: Arc<AtomicU32>,
        acked: Arc<Mutex<Vec<AgentReport>>>,
    }

    impl ReportSink for FakeMaster {
        type Error = String;
        async fn send(&self, report: &AgentReport) -> Result<(), String> {
            self.attempts.fetch_add(1, Ordering::SeqCst);
            if self.fail.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
                return Err("connection refused".into());
            }
            self.acked.lock().unwrap().push(report.clone());
            Ok(())
        }
    }

    async fn wait_until(what: &str, f: impl FnMut() -> bool) {
        assert!(crate::testkit::wait_for(Duration::from_secs(10), f).await, "timed out waiting for {what}");
    }

    #[tokio::test]
    async fn retries_until_acknowledged_and_keeps_order() {
        let master = FakeMaster::default();
        master.fail.store(4, Ordering::SeqCst);
        let (tx, rx) = mpsc::channel(8);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(run_reporter(master.clone(), rx, fast(), stop_rx));
        for n in 1..=3 {
            tx.send(exited(n)).await.unwrap();
        }
        let acked = master.acked.clone();
        wait_until("three acknowledged reports", || acked.lock().unwrap().len() == 3).await;
        assert_eq!(*master.acked.lock().unwrap(), vec![exited(1), exited(2), exited(3)]);
        assert_eq!(master.attempts.load(Ordering::SeqCst), 7);
        stop_tx.send(()).unwrap();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn closure_sinks_work_and_reporter_ends_when_channel_closes_and_empty() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = seen.clone();
        let sink = move |r: AgentReport| {
            let s2 = s2.clone();
            async move {
                s2.lock().unwrap().push(r);
                Ok::<(), String>(())
            }
        };
        let (tx, rx) = mpsc::channel(8);
        tx.send(exited(1)).await.unwrap();
        drop(tx);
        run_reporter(sink, rx, fast(), std::future::pending::<()>()).await;
        assert_eq!(*seen.lock().unwrap(), vec![exited(1)]);
    }

    #[tokio::test]
    async fn pending_reports_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = ReporterConfig { outbox_path: Some(outbox_path(dir.path())), ..fast() };
        // First life: the master never answers, then the agent stops.
        let down = FakeMaster::default();
        down.fail.store(u32::MAX, Ordering::SeqCst);
        let (tx, rx) = mpsc::channel(8);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(run_reporter(down.clone(), rx, cfg.clone(), stop_rx));
        tx.send(exited(1)).await.unwrap();
        tx.send(exited(2)).await.unwrap();
        let attempts = down.attempts.clone();
        wait_until("a few attempts", || attempts.load(Ordering::SeqCst) >= 3).await;
        stop_tx.send(()).unwrap();
        task.await.unwrap();
        // Second life: the master is back; both reports arrive, in order.
        let up = FakeMaster::default();
        let (tx2, rx2) = mpsc::channel(8);
        drop(tx2);
        run_reporter(up.clone(), rx2, cfg.clone(), std::future::pending::<()>()).await;
        assert_eq!(*up.acked.lock().unwrap(), vec![exited(1), exited(2)]);
        let left: Vec<AgentReport> = serde_json::from_slice(&std::fs::read(cfg.outbox_path.unwrap()).unwrap()).unwrap();
        assert!(left.is_empty());
    }
}
