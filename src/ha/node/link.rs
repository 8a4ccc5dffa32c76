//! The peer link of the HA node: the accept and dial loops of the HA port, the secure
//! handshake, and one task pair per connection that turns frames into [`Link`] events for
//! the driver and writes what the driver sends, coalescing up to [`WRITE_COALESCE`] messages.
//!
//! Invariants: nothing reaches the driver from a connection before the handshake proved the
//! shared secret; every connection ends with exactly one `Link::Down` naming its reason.

use super::*;

/// Builds our Hello for a new connection.
#[derive(Clone)]
pub(super) struct HelloSource {
    pub(super) db: DbHandle,
    pub(super) local: NodeId,
    pub(super) digest: String,
    /// The peer's database id as last announced to us, so our hello can say how far we
    /// applied that log.
    pub(super) last_peer: Arc<Mutex<Option<String>>>,
}

impl HelloSource {
    /// Names the peer's log only with a position stored for it. A peer announced on an
    /// earlier connection whose snapshot never completed has none, and claiming position 0
    /// of its log would get an incremental resync from its first change: everything it holds
    /// outside its own log (the writes this node made before losing its database) would
    /// never come back.
    pub(super) async fn hello(&self) -> Result<Hello, String> {
        let st = self.db.status().await.map_err(|e| e.to_string())?;
        let last = self.last_peer.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let applied = match last {
            Some(id) => self.db.peer_position(&id).await.map_err(|e| e.to_string())?.map(|pos| (id, pos)),
            None => None,
        };
        let (your_db_id, your_position) = applied.map_or((None, Seq::ZERO), |(id, pos)| (Some(id), pos));
        Ok(Hello {
            protocol: PROTOCOL_VERSION,
            node: self.local.clone(),
            db_id: st.db_id,
            head: st.head,
            oldest: st.oldest,
            your_db_id,
            your_position,
            config_digest: self.digest.clone(),
            now_ms: now_ms(),
            empty: st.sessions == 0 && st.tombstones == 0,
        })
    }
}

#[derive(Clone, Default)]
pub(super) struct ConnCounter(Arc<std::sync::atomic::AtomicU64>);

impl ConnCounter {
    pub(super) fn next(&self) -> u64 {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1
    }
}

pub(super) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The dialer's pause after a failed attempt starts here and doubles up to
/// [`REDIAL_MAX`]; a connection resets it.
const REDIAL_FIRST: Duration = Duration::from_millis(100);
/// The longest pause between two dials. Only the node whose id sorts first dials, so a
/// restarted peer waits for this node's next attempt before it can resynchronise and
/// become ready: half of this on average, every time. An attempt that the peer's host
/// refuses costs one round trip; one that gets no answer already waits for
/// [`HANDSHAKE_TIMEOUT`] before the pause.
const REDIAL_MAX: Duration = Duration::from_millis(250);
/// Most peer messages encoded into one write.
pub(super) const WRITE_COALESCE: usize = 16;

/// Connections the HA port serves at once: one peer, plus room for a reconnect racing the
/// old link and a stray caller being refused.
pub(super) const PEER_MAX_CONNECTIONS: usize = 4;

/// What both the accept and the dial loop need to run a link.
#[derive(Clone)]
pub(super) struct LinkCtx {
    pub(super) secret: Secret,
    pub(super) hs: HelloSource,
    pub(super) tx: mpsc::Sender<Link>,
    pub(super) conns: ConnCounter,
    /// Where a failed secure handshake is noted for the status.
    pub(super) herr: HandshakeError,
    pub(super) cancel: CancellationToken,
}

impl LinkCtx {
    /// Runs one authenticated connection to its end (see [`run_conn`]).
    async fn run<S>(&self, conn: crate::proto::secure::SecureConn<S>, addr: String)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let conn = conn.with_limits(peer::MAX_MESSAGE, peer::MAX_MESSAGE);
        run_conn(conn, addr, self.hs.clone(), self.tx.clone(), self.conns.next(), self.cancel.clone()).await;
    }
}

pub(super) async fn accept_loop(l: TcpListener, ctx: LinkCtx) {
    // Before its hello a caller is bounded by the handshake timeout; afterwards the engine
    // drops a link that stays silent for the peer timeout.
    let limits = Limits { max_connections: PEER_MAX_CONNECTIONS, idle_timeout: HANDSHAKE_TIMEOUT };
    let tracker = TaskTracker::new();
    let c = ctx.cancel.clone();
    listen::serve("HA port", l, limits, c, tracker, move |stream, peer| {
        let ctx = ctx.clone();
        async move {
            let conn = match limits.idle(accept(stream, &ctx.secret, PEER_PROLOGUE)).await {
                Ok(c) => c,
                Err(e @ ProtoError::Idle { .. }) => {
                    tracing::warn!(%peer, error = %e, "peer handshake timed out");
                    return Ok(());
                }
                Err(e) => {
                    note_handshake_error(&ctx.herr, &peer.to_string(), &e);
                    tracing::warn!(%peer, error = %e, "rejected a peer connection: nothing it sent was applied");
                    return Ok(());
                }
            };
            ctx.run(conn, peer.to_string()).await;
            Ok::<(), ProtoError>(())
        }
    })
    .await
}

/// The pause after `prev` when the next attempt fails as well.
fn next_pause(prev: Duration) -> Duration {
    (prev * 2).min(REDIAL_MAX)
}

pub(super) async fn dial_loop(addr: String, ctx: LinkCtx) {
    let mut backoff = REDIAL_FIRST;
    loop {
        if ctx.cancel.is_cancelled() {
            return;
        }
        let attempt = async {
            let s = TcpStream::connect(&addr).await.map_err(|e| e.to_string())?;
            let _ = s.set_nodelay(true);
            connect(s, &ctx.secret, PEER_PROLOGUE).await.map_err(|e| {
                if e.is_auth_failure() {
                    note_handshake_error(&ctx.herr, &addr, &e);
                    tracing::warn!(peer = %addr, error = %e, "the peer refused this node's secure handshake");
                }
                e.to_string()
            })
        };
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, attempt).await {
            Ok(Ok(conn)) => {
                backoff = REDIAL_FIRST;
                ctx.run(conn, addr.clone()).await;
            }
            Ok(Err(e)) => tracing::debug!(peer = %addr, error = %e, "cannot reach the peer"),
            Err(_) => tracing::debug!(peer = %addr, "connecting to the peer timed out"),
        }
        tokio::select! {
            _ = ctx.cancel.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = next_pause(backoff);
    }
}

/// Runs one authenticated connection: exchange Hellos, then pump messages both ways until
/// it breaks or the engine drops the writer.
pub(super) async fn run_conn<S>(
    conn: crate::proto::secure::SecureConn<S>,
    addr: String,
    hs: HelloSource,
    tx: mpsc::Sender<Link>,
    id: u64,
    cancel: CancellationToken,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut reader, mut writer) = conn.into_split();
    let ours = match hs.hello().await {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!(error = %e, "cannot build the HA hello");
            return;
        }
    };
    if let Err(e) = writer.send(&PeerMsg::Hello(ours)).await {
        tracing::debug!(peer = %addr, error = %e, "peer link broke during hello");
        return;
    }
    let theirs = match tokio::time::timeout(HANDSHAKE_TIMEOUT, reader.recv::<PeerMsg>()).await {
        Ok(Ok(Some(PeerMsg::Hello(h)))) => h,
        Ok(Ok(Some(other))) => {
            tracing::warn!(peer = %addr, "peer sent {other:?} before its hello; closing");
            return;
        }
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            tracing::warn!(peer = %addr, error = %e, "peer link broke during hello");
            return;
        }
        Err(_) => {
            tracing::warn!(peer = %addr, "no hello from the peer within 5 s");
            return;
        }
    };
    *hs.last_peer.lock().unwrap_or_else(|p| p.into_inner()) = Some(theirs.db_id.clone());
    let (wtx, mut wrx) = mpsc::channel::<PeerMsg>(1024);
    if tx.send(Link::Up { conn: id, hello: theirs, addr: addr.clone(), writer: wtx }).await.is_err() {
        return;
    }
    let mut write_task = tokio::spawn(async move {
        while let Some(m) = wrx.recv().await {
            if let Err(e) = writer.feed(&m) {
                return format!("cannot send to the peer: {e}");
            }
            // Coalesce what else is queued into one flush, but not a whole snapshot: the
            // peer starts on the first chunks while later ones are still being encoded.
            for _ in 1..WRITE_COALESCE {
                let Ok(m) = wrx.try_recv() else { break };
                if let Err(e) = writer.feed(&m) {
                    return format!("cannot send to the peer: {e}");
                }
            }
            if let Err(e) = writer.flush().await {
                return format!("sending to the peer failed: {e}");
            }
        }
        let _ = writer.shutdown().await;
        "closed by this node".to_string()
    });
    let reason = loop {
        tokio::select! {
            _ = cancel.cancelled() => break "shutting down".to_string(),
            w = &mut write_task => break w.unwrap_or_else(|e| format!("the peer link writer failed: {e}")),
            // Batches of a resync are decoded off this thread (the database's), which then
            // applies the previous batch meanwhile. Cancelling drops the link anyway.
            r = reader.recv_off_thread::<PeerMsg>() => match r {
                Ok(Some(msg)) => {
                    if tx.send(Link::Msg { conn: id, msg }).await.is_err() {
                        break "engine stopped".into();
                    }
                }
                Ok(None) => break "the peer closed the link".into(),
                Err(e) => break format!("peer link error: {e}"),
            },
        }
    };
    write_task.abort();
    let _ = tx.send(Link::Down { conn: id, reason }).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A restarted peer waits for this node's next dial: the pauses between failed attempts
    /// grow from the first to the cap and stay there.
    #[test]
    fn redial_pauses_double_up_to_the_cap_and_stay_there() {
        let mut pauses = vec![REDIAL_FIRST];
        for _ in 0..10 {
            pauses.push(next_pause(*pauses.last().unwrap()));
        }
        let ms: Vec<u128> = pauses.iter().map(Duration::as_millis).collect();
        assert_eq!(ms[..4], [100, 200, 250, 250]);
        assert!(pauses.iter().all(|p| *p <= REDIAL_MAX));
        assert_eq!(*pauses.last().unwrap(), REDIAL_MAX);
    }
}
