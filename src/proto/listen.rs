//! The one accept loop of every listener (Unix socket, admin TCP port, HTTP endpoint, HA peer
//! port, agent port): accept, cap the connections served at once, hand each connection to
//! its link's handler in a tracked task, and log why a connection was refused or ended.
//!
//! What a connection carries is the handler's business; this module only owns the sockets'
//! lifecycle and the limits that hold for every link: at most [`Limits::max_connections`]
//! connections at once (one more is closed at once, before anything is read from it), and
//! [`Limits::idle_timeout`], which handlers apply to each wait for the peer through
//! [`Limits::idle`].
//!
//! Invariants: a listener never serves more than its cap; a failing `accept` (out of file
//! descriptors) backs off instead of spinning; refusals are logged at most once per
//! [`REFUSAL_LOG_EVERY`] with how many were refused; nothing here reads a byte.

use super::ProtoError;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How often refused connections are logged (with a count) at most.
pub const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);
/// Pause after a failed `accept` (e.g. out of file descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Limits of one listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once; one more is closed as soon as it is accepted.
    pub max_connections: usize,
    /// Longest wait for the peer's next message (or handshake) before the link is dropped.
    pub idle_timeout: Duration,
}

impl Limits {
    /// Waits for `fut` (a receive) at most the idle timeout; [`ProtoError::Idle`] when it passes.
    pub async fn idle<T>(&self, fut: impl Future<Output = Result<T, ProtoError>>) -> Result<T, ProtoError> {
        match tokio::time::timeout(self.idle_timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(ProtoError::Idle { after: self.idle_timeout }),
        }
    }
}

/// Who is on the other end of an accepted connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    Tcp(SocketAddr),
    /// A Unix-socket caller (its credentials are read by the handler).
    Local,
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Tcp(a) => a.fmt(f),
            Peer::Local => f.write_str("local"),
        }
    }
}

/// A bound listener whose connections [`serve`] accepts.
pub trait Listener: Send + 'static {
    type Stream: Send + 'static;
    fn accept_one(&self) -> impl Future<Output = std::io::Result<(Self::Stream, Peer)>> + Send;
}

impl Listener for TcpListener {
    type Stream = TcpStream;
    async fn accept_one(&self) -> std::io::Result<(TcpStream, Peer)> {
        let (s, addr) = self.accept().await?;
        // Every link is request/reply or latency-bound.
        let _ = s.set_nodelay(true);
        Ok((s, Peer::Tcp(addr)))
    }
}

impl Listener for UnixListener {
    type Stream = UnixStream;
    async fn accept_one(&self) -> std::io::Result<(UnixStream, Peer)> {
        let (s, _) = self.accept().await?;
        Ok((s, Peer::Local))
    }
}

/// Counts refusals and logs them at most once per [`REFUSAL_LOG_EVERY`].
struct Refusals {
    what: &'static str,
    max: usize,
    count: u64,
    since: Option<Instant>,
}

impl Refusals {
    fn note(&mut self, peer: Peer) {
        self.count += 1;
        let due = self.since.map_or(true, |t| t.elapsed() >= REFUSAL_LOG_EVERY);
        if due {
            tracing::warn!(
                listener = self.what,
                %peer,
                refused = self.count,
                max_connections = self.max,
                "too many connections at once; closing new ones until some end"
            );
            self.count = 0;
            self.since = Some(Instant::now());
        }
    }
}

/// Counters of one listener, for tests and status.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    refused: Arc<AtomicU64>,
}

impl Stats {
    /// Connections closed because the listener was at its cap.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

/// Accepts connections on `listener` until `shutdown` is cancelled and runs `handler` for
/// each in `tracker`, at most `limits.max_connections` at once. `what` names the listener in
/// logs. A handler's error is logged with the peer as the reason the connection ended.
pub async fn serve<L, H, Fut, E>(
    what: &'static str,
    listener: L,
    limits: Limits,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    handler: H,
) where
    L: Listener,
    H: Fn(L::Stream, Peer) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: fmt::Display,
{
    serve_with_stats(what, listener, limits, shutdown, tracker, Stats::default(), handler).await
}

/// [`serve`], counting into `stats`.
pub async fn serve_with_stats<L, H, Fut, E>(
    what: &'static str,
    listener: L,
    limits: Limits,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    stats: Stats,
    handler: H,
) where
    L: Listener,
    H: Fn(L::Stream, Peer) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: fmt::Display,
{
    let max = limits.max_connections.max(1);
    let slots = Arc::new(Semaphore::new(max));
    let mut refusals = Refusals { what, max, count: 0, since: None };
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept_one() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(listener = what, error = %e, "accept failed");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                    }
                    continue;
                }
            },
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            refusals.note(peer);
            drop(stream);
            continue;
        };
        let fut = handler(stream, peer);
        tracker.spawn(async move {
            // The connection keeps its place under the cap until its handler is done.
            let _permit: OwnedSemaphorePermit = permit;
            if let Err(e) = fut.await {
                tracing::info!(listener = what, %peer, reason = %e, "connection dropped");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn echo_server(limits: Limits) -> (SocketAddr, CancellationToken, Stats) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let cancel = CancellationToken::new();
        let stats = Stats::default();
        let tracker = TaskTracker::new();
        tokio::spawn(serve_with_stats(
            "test",
            l,
            limits,
            cancel.clone(),
            tracker,
            stats.clone(),
            move |mut s: TcpStream, _peer| async move {
                loop {
                    let mut b = [0u8; 1];
                    let read = async {
                        match s.read(&mut b).await {
                            Ok(0) => Ok(None),
                            Ok(_) => Ok(Some(b[0])),
                            Err(e) => Err(ProtoError::Io(e)),
                        }
                    };
                    match limits.idle(read).await? {
                        None => return Ok::<(), ProtoError>(()),
                        Some(x) => s.write_all(&[x]).await?,
                    }
                }
            },
        ));
        (addr, cancel, stats)
    }

    async fn closed(s: &mut TcpStream) -> bool {
        let mut b = [0u8; 1];
        matches!(tokio::time::timeout(Duration::from_secs(10), s.read(&mut b)).await, Ok(Ok(0)) | Ok(Err(_)))
    }

    #[tokio::test]
    async fn connections_over_the_cap_are_closed_and_slots_come_back() {
        let limits = Limits { max_connections: 3, idle_timeout: Duration::from_secs(30) };
        let (addr, cancel, stats) = echo_server(limits).await;
        let mut held = Vec::new();
        for _ in 0..3 {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(b"x").await.unwrap();
            let mut b = [0u8; 1];
            s.read_exact(&mut b).await.unwrap();
            held.push(s);
        }
        let mut extra = TcpStream::connect(addr).await.unwrap();
        assert!(closed(&mut extra).await, "a fourth connection must be closed");
        assert_eq!(stats.refused(), 1);
        drop(held.pop());
        // The freed slot serves a new connection (the server may see the close a bit later).
        let mut served = false;
        for _ in 0..200 {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(b"y").await.unwrap();
            let mut b = [0u8; 1];
            if let Ok(Ok(1)) = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await {
                served = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(served, "a slot freed by a closed connection must be reused");
        cancel.cancel();
    }

    #[tokio::test]
    async fn idle_connections_are_closed() {
        let limits = Limits { max_connections: 10, idle_timeout: Duration::from_millis(100) };
        let (addr, cancel, _) = echo_server(limits).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"z").await.unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        assert!(closed(&mut s).await, "an idle connection must be closed");
        cancel.cancel();
    }
}
