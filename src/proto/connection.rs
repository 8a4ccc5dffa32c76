//! Reading and writing frames on a stream, and the one message link of every connection.
//!
//! This module owns the read buffer of a link: bytes from the stream go into it and leave it
//! only as whole frames. [`Conn`] (and its halves [`Reader`] and [`Writer`]) carries one JSON
//! message at a time over a [`Transport`], which only turns a message's JSON into frames and
//! frames back into a message: [`Plain`] here, one message per frame, or `secure::Noise`,
//! encrypted transport messages. Sending, queueing, flushing, receiving, splitting and
//! shutting down are written once, here, for both.
//!
//! [`PlainConn`] carries one JSON message per frame and is meant for the Unix socket, where
//! the kernel's peer credentials authenticate the caller; it must never be used on a TCP port
//! (use `proto::secure` there, whose handshake is the only way to make a `SecureConn`).
//!
//! Invariants:
//! - `None` from a read means the peer closed cleanly between messages; a close inside a
//!   frame is [`ProtoError::Truncated`], and so is one inside a message its transport split.
//! - Reads are cancellation-safe (partial input stays in the connection's buffer), so `recv`
//!   may be used in `tokio::select!`; writes are not, and a cancelled send breaks the link.
//! - After an error other than a JSON decoding error, the connection reports
//!   [`ProtoError::Broken`] forever.

use super::frame::{self, Status, MAX_FRAME};
use super::ProtoError;
use bytes::{Bytes, BytesMut};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::fmt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};

/// Initial read buffer; it grows to the size of the largest frame seen.
const READ_BUF: usize = 8 * 1024;

/// A send buffer grown past this by a large message is given back once it is written.
const SEND_BUF_KEEP: usize = 256 * 1024;

/// After writing this much at once (every session in one listing), the memory the message
/// took is handed back to the system, not kept by the allocator for a next time that may
/// never come.
const TRIM_AFTER: usize = 4 * 1024 * 1024;

/// Messages this large are decoded off the receiving task's thread by
/// [`Reader::recv_off_thread`]: a batch of records from the peer during a resync, whose
/// decoding would otherwise take turns with the database work on the same thread. Smaller
/// ones (a single change, an ack) are decoded in place, where a hand-over would cost more
/// than the decoding.
pub const DECODE_OFF_THREAD_MIN: usize = 64 * 1024;

/// Read the next whole frame's payload from `r`, buffering in `buf`. `Ok(None)` when the peer
/// closed cleanly between frames. Cancellation-safe.
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    max: usize,
) -> Result<Option<Bytes>, ProtoError> {
    loop {
        let need = match frame::check(buf, max)? {
            Status::Complete { .. } => return frame::parse(buf, max),
            Status::Incomplete { need } => need,
        };
        buf.reserve(need.max(READ_BUF.min(max + frame::HEADER_LEN)));
        if r.read_buf(buf).await? == 0 {
            return if buf.is_empty() { Ok(None) } else { Err(ProtoError::Truncated { what: "a frame" }) };
        }
    }
}

/// Decode one JSON message, naming the expected type on failure.
pub(crate) fn decode_json<T: DeserializeOwned>(payload: &[u8]) -> Result<T, ProtoError> {
    serde_json::from_slice(payload)
        .map_err(|e| ProtoError::Malformed(format!("expected a {} as json: {e}", std::any::type_name::<T>())))
}

/// How a link's messages travel as frames: the only part in which a plain and a secure link
/// differ. Each direction keeps its own state, so the halves of a split link need no lock.
pub trait Transport {
    /// Receiving state of one direction.
    type Rx: fmt::Debug;
    /// Sending state of one direction.
    type Tx: fmt::Debug;
    /// What the link's types are called in `Debug` output: `Plain` gives `PlainConn`,
    /// `PlainReader` and `PlainWriter`.
    const NAME: &'static str;

    /// Largest frame to read on a link accepting messages of up to `max` bytes.
    fn frame_max(max: usize) -> usize;

    /// Take the next frame: the JSON of a message once one is whole, `None` while the message
    /// continues in later frames. Messages over `max` bytes are refused. Nothing returned may
    /// come from a frame the transport could not authenticate.
    fn open<'a>(rx: &'a mut Self::Rx, frame: &'a [u8], max: usize) -> Result<Option<&'a [u8]>, ProtoError>;

    /// The peer closed the stream between frames: a clean end, unless inside a message.
    fn end(rx: &Self::Rx) -> Result<(), ProtoError>;

    /// Append the frames carrying `json` (at most the link's limit, `max`) to `out`.
    fn seal(tx: &mut Self::Tx, json: &[u8], max: usize, out: &mut BytesMut) -> Result<(), ProtoError>;
}

/// One JSON message per length-prefixed frame, without encryption.
#[derive(Debug)]
pub enum Plain {}

impl Transport for Plain {
    type Rx = ();
    type Tx = ();
    const NAME: &'static str = "Plain";

    fn frame_max(max: usize) -> usize {
        max
    }

    fn open<'a>(_: &'a mut (), frame: &'a [u8], _: usize) -> Result<Option<&'a [u8]>, ProtoError> {
        Ok(Some(frame))
    }

    fn end(_: &()) -> Result<(), ProtoError> {
        Ok(())
    }

    fn seal(_: &mut (), json: &[u8], max: usize, out: &mut BytesMut) -> Result<(), ProtoError> {
        frame::encode(json, max, out)
    }
}

/// Receiving half of a link's state (independent of the stream it reads).
pub(super) struct Rx<T: Transport> {
    buf: BytesMut,
    broken: bool,
    /// Largest message accepted from the peer.
    pub(super) max: usize,
    pub(super) state: T::Rx,
}

impl<T: Transport> Rx<T> {
    async fn recv<R: AsyncRead + Unpin, M: DeserializeOwned>(&mut self, r: &mut R) -> Result<Option<M>, ProtoError> {
        // A message that is not the expected JSON leaves the link usable.
        self.next_with(r, decode_json).await?.transpose()
    }

    /// As `recv`, but a message of [`DECODE_OFF_THREAD_MIN`] bytes or more is decoded on
    /// the runtime's blocking pool, so the task's thread serves others meanwhile.
    async fn recv_off_thread<R, M>(&mut self, r: &mut R) -> Result<Option<M>, ProtoError>
    where
        R: AsyncRead + Unpin,
        M: DeserializeOwned + Send + 'static,
    {
        /// A message decoded here, or the JSON of one to decode on the blocking pool.
        enum Next<M> {
            Decoded(Result<M, ProtoError>),
            Large(Vec<u8>),
        }
        let next = self
            .next_with(r, |json| {
                if json.len() >= DECODE_OFF_THREAD_MIN {
                    Next::Large(json.to_vec())
                } else {
                    Next::Decoded(decode_json(json))
                }
            })
            .await?;
        match next {
            None => Ok(None),
            Some(Next::Decoded(decoded)) => decoded.map(Some),
            Some(Next::Large(json)) => tokio::task::spawn_blocking(move || decode_json(&json))
                .await
                .map_err(|e| ProtoError::Malformed(format!("decoding a message failed: {e}")))?
                .map(Some),
        }
    }

    /// `f` of the JSON of the next whole message; `None` at a clean end between messages.
    async fn next_with<R: AsyncRead + Unpin, O>(
        &mut self,
        r: &mut R,
        f: impl FnOnce(&[u8]) -> O,
    ) -> Result<Option<O>, ProtoError> {
        if self.broken {
            return Err(ProtoError::Broken);
        }
        loop {
            let frame = match read_frame(r, &mut self.buf, T::frame_max(self.max)).await {
                Ok(Some(frame)) => frame,
                Ok(None) => return T::end(&self.state).map(|()| None).map_err(|e| self.fail(e)),
                Err(e) => return Err(self.fail(e)),
            };
            match T::open(&mut self.state, &frame, self.max) {
                Ok(Some(json)) => return Ok(Some(f(json))),
                Ok(None) => {}
                Err(e) => return Err(self.fail(e)),
            }
        }
    }

    fn fail(&mut self, e: ProtoError) -> ProtoError {
        self.broken = true;
        e
    }
}

/// Sending half of a link's state.
pub(super) struct Tx<T: Transport> {
    /// Largest message the peer accepts.
    pub(super) max: usize,
    json: Vec<u8>,
    /// Frames queued for the next flush.
    pub(super) out: BytesMut,
    /// A flush wrote more than [`TRIM_AFTER`] bytes since [`Conn::take_wrote_large`].
    wrote_large: bool,
    broken: bool,
    pub(super) state: T::Tx,
}

impl<T: Transport> Tx<T> {
    fn feed<M: Serialize + ?Sized>(&mut self, msg: &M) -> Result<(), ProtoError> {
        if self.broken {
            return Err(ProtoError::Broken);
        }
        self.json.clear();
        serde_json::to_writer(&mut self.json, msg).map_err(|e| ProtoError::Encode(e.to_string()))?;
        if self.json.len() > self.max {
            let len = self.json.len();
            self.json = Vec::new();
            return Err(ProtoError::MessageTooLarge { len, max: self.max });
        }
        let res = T::seal(&mut self.state, &self.json, self.max, &mut self.out);
        // A snapshot chunk's buffer (some 400 KiB) is kept for the next; a listing's is not.
        if self.json.capacity() > TRIM_AFTER {
            self.json = Vec::new();
        }
        if res.is_err() {
            self.broken = true;
        }
        res
    }

    pub(super) async fn flush<W: AsyncWrite + Unpin>(&mut self, w: &mut W) -> Result<(), ProtoError> {
        if self.broken {
            return Err(ProtoError::Broken);
        }
        // Broken until the write completes: a cancelled write leaves the peer out of step.
        self.broken = true;
        if !self.out.is_empty() {
            w.write_all(&self.out).await?;
            let large = self.out.len() > TRIM_AFTER;
            self.out.clear();
            if self.out.capacity() > SEND_BUF_KEEP {
                self.out = BytesMut::new();
            }
            self.wrote_large |= large;
        }
        w.flush().await?;
        self.broken = false;
        Ok(())
    }

    async fn send<W: AsyncWrite + Unpin, M: Serialize + ?Sized>(
        &mut self,
        w: &mut W,
        msg: &M,
    ) -> Result<(), ProtoError> {
        self.feed(msg)?;
        self.flush(w).await
    }
}

/// Returns the allocator's free memory to the system. glibc keeps what a large message
/// freed in its arenas, so a master that once listed 100,000 sessions would otherwise stay
/// some 100 MiB larger for the rest of its life. Call it once the message's source is
/// dropped too (see [`Conn::take_wrote_large`]).
pub fn give_back_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory the allocator holds; it takes no pointers.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// A link carrying one JSON message at a time over a [`Transport`]; made by
/// `PlainConn::new` or by the handshake of `proto::secure`.
pub struct Conn<T: Transport, S> {
    stream: S,
    pub(super) rx: Rx<T>,
    pub(super) tx: Tx<T>,
}

/// A link carrying one JSON message per length-prefixed frame, without encryption.
pub type PlainConn<S> = Conn<Plain, S>;
/// Receiving half of a [`PlainConn`].
pub type PlainReader<R> = Reader<Plain, R>;
/// Sending half of a [`PlainConn`].
pub type PlainWriter<W> = Writer<Plain, W>;

impl<T: Transport, S> fmt::Debug for Conn<T, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = format!("{}Conn", T::NAME);
        f.debug_struct(&name).field("rx", &self.rx.state).field("tx", &self.tx.state).finish()
    }
}

impl<T: Transport, S> Conn<T, S> {
    /// A link over `stream` whose input so far is `buf`, each direction with its limit and
    /// transport state.
    pub(super) fn from_parts(stream: S, buf: BytesMut, recv: (usize, T::Rx), send: (usize, T::Tx)) -> Self {
        Conn {
            stream,
            rx: Rx { buf, broken: false, max: recv.0, state: recv.1 },
            tx: Tx {
                max: send.0,
                json: Vec::new(),
                out: BytesMut::new(),
                wrote_large: false,
                broken: false,
                state: send.1,
            },
        }
    }

    /// The underlying stream (for example to read peer credentials or the peer's address).
    pub fn get_ref(&self) -> &S {
        &self.stream
    }

    /// The same link over `f(stream)`, keeping any input already buffered and the state of
    /// both directions: how a connection moves to another runtime (`into_std` here,
    /// `from_std` there).
    pub fn map_stream<S2, E>(self, f: impl FnOnce(S) -> Result<S2, E>) -> Result<Conn<T, S2>, E> {
        let Conn { stream, rx, tx } = self;
        Ok(Conn { stream: f(stream)?, rx, tx })
    }

    /// Split with a stream-specific splitter (e.g. `UnixStream::into_split`), keeping any
    /// input already buffered.
    pub fn split_with<R, W>(self, split: impl FnOnce(S) -> (R, W)) -> (Reader<T, R>, Writer<T, W>) {
        let (r, w) = split(self.stream);
        (Reader { r, rx: self.rx }, Writer { w, tx: self.tx })
    }
}

impl<T: Transport, S: AsyncRead + AsyncWrite + Unpin> Conn<T, S> {
    /// Send one message and flush it.
    pub async fn send<M: Serialize + ?Sized>(&mut self, msg: &M) -> Result<(), ProtoError> {
        self.tx.send(&mut self.stream, msg).await
    }

    /// Queue one message without writing it; [`Conn::flush`] writes everything queued.
    pub fn feed<M: Serialize + ?Sized>(&mut self, msg: &M) -> Result<(), ProtoError> {
        self.tx.feed(msg)
    }

    /// Write every queued message.
    pub async fn flush(&mut self) -> Result<(), ProtoError> {
        self.tx.flush(&mut self.stream).await
    }

    /// Whether a message of more than [`TRIM_AFTER`] bytes was written since the last call:
    /// then, once the value it was made from is dropped as well, [`give_back_freed_memory`]
    /// returns what both took.
    pub fn take_wrote_large(&mut self) -> bool {
        std::mem::take(&mut self.tx.wrote_large)
    }

    /// The next message; `None` when the peer closed cleanly between messages.
    /// Cancellation-safe.
    pub async fn recv<M: DeserializeOwned>(&mut self) -> Result<Option<M>, ProtoError> {
        self.rx.recv(&mut self.stream).await
    }

    /// Split into halves usable from different tasks (full duplex), over `tokio::io::split`.
    pub fn into_split(self) -> (Reader<T, ReadHalf<S>>, Writer<T, WriteHalf<S>>) {
        self.split_with(tokio::io::split)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> PlainConn<S> {
    /// A link accepting messages of up to [`frame::MAX_MESSAGE`] bytes each way.
    pub fn new(stream: S) -> Self {
        Self::with_limits(stream, frame::MAX_MESSAGE, frame::MAX_MESSAGE)
    }

    /// A link that refuses to receive messages over `recv_max` bytes (the header alone is
    /// enough to refuse them, nothing is buffered) and to send messages over `send_max`.
    pub fn with_limits(stream: S, recv_max: usize, send_max: usize) -> Self {
        Self::from_parts(stream, BytesMut::new(), (recv_max.min(MAX_FRAME), ()), (send_max.min(MAX_FRAME), ()))
    }
}

/// Receiving half of a [`Conn`].
pub struct Reader<T: Transport, R> {
    r: R,
    rx: Rx<T>,
}

impl<T: Transport, R> fmt::Debug for Reader<T, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = format!("{}Reader", T::NAME);
        f.debug_struct(&name).field("rx", &self.rx.state).finish()
    }
}

impl<T: Transport, R: AsyncRead + Unpin> Reader<T, R> {
    /// The next message; `None` when the peer closed cleanly between messages.
    /// Cancellation-safe.
    pub async fn recv<M: DeserializeOwned>(&mut self) -> Result<Option<M>, ProtoError> {
        self.rx.recv(&mut self.r).await
    }

    /// As [`Reader::recv`], but a message of [`DECODE_OFF_THREAD_MIN`] bytes or more is
    /// decoded on the runtime's blocking pool while this task's thread runs other tasks.
    /// Not cancellation-safe: a large message whose decoding was under way is lost, so use it
    /// only where cancelling the call ends the link.
    pub async fn recv_off_thread<M: DeserializeOwned + Send + 'static>(&mut self) -> Result<Option<M>, ProtoError> {
        self.rx.recv_off_thread(&mut self.r).await
    }
}

/// Sending half of a [`Conn`].
pub struct Writer<T: Transport, W> {
    pub(super) w: W,
    pub(super) tx: Tx<T>,
}

impl<T: Transport, W> fmt::Debug for Writer<T, W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = format!("{}Writer", T::NAME);
        f.debug_struct(&name).field("tx", &self.tx.state).finish()
    }
}

impl<T: Transport, W: AsyncWrite + Unpin> Writer<T, W> {
    /// Send one message and flush it.
    pub async fn send<M: Serialize + ?Sized>(&mut self, msg: &M) -> Result<(), ProtoError> {
        self.tx.send(&mut self.w, msg).await
    }

    /// Queue one message without writing it; [`Writer::flush`] writes everything queued.
    pub fn feed<M: Serialize + ?Sized>(&mut self, msg: &M) -> Result<(), ProtoError> {
        self.tx.feed(msg)
    }

    /// Write every queued message.
    pub async fn flush(&mut self) -> Result<(), ProtoError> {
        self.tx.flush(&mut self.w).await
    }

    /// Shut the write direction down (the peer's `recv` then returns `None`).
    pub async fn shutdown(&mut self) -> Result<(), ProtoError> {
        self.w.shutdown().await.map_err(ProtoError::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Msg {
        n: u32,
        s: String,
    }

    #[tokio::test]
    async fn plain_round_trip_both_ways_then_clean_close() {
        let (a, b) = tokio::io::duplex(64);
        let mut a = PlainConn::new(a);
        let mut b = PlainConn::new(b);
        let writer = tokio::spawn(async move {
            for n in 0..10 {
                a.send(&Msg { n, s: "x".repeat(n as usize * 10) }).await.unwrap();
            }
            let back: Msg = a.recv().await.unwrap().unwrap();
            assert_eq!(back.n, 99);
        });
        for n in 0..10 {
            let m: Msg = b.recv().await.unwrap().unwrap();
            assert_eq!(m.n, n);
        }
        b.send(&Msg { n: 99, s: String::new() }).await.unwrap();
        writer.await.unwrap();
        assert!(b.recv::<Msg>().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn close_mid_frame_is_truncated() {
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(&[0, 0, 0, 10, b'{']).await.unwrap();
        drop(a);
        let mut b = PlainConn::new(b);
        assert!(matches!(b.recv::<Msg>().await, Err(ProtoError::Truncated { .. })));
        assert!(matches!(b.recv::<Msg>().await, Err(ProtoError::Broken)));
    }

    #[tokio::test]
    async fn close_mid_header_is_truncated() {
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(&[0, 0]).await.unwrap();
        drop(a);
        let mut b = PlainConn::new(b);
        assert!(matches!(b.recv::<Msg>().await, Err(ProtoError::Truncated { .. })));
    }

    #[tokio::test]
    async fn malformed_json_is_reported_and_link_stays_usable() {
        let (mut a, b) = tokio::io::duplex(256);
        let mut out = BytesMut::new();
        frame::encode(b"{not json", MAX_FRAME, &mut out).unwrap();
        frame::encode(br#"{"n":1,"s":"ok"}"#, MAX_FRAME, &mut out).unwrap();
        a.write_all(&out).await.unwrap();
        let mut b = PlainConn::new(b);
        match b.recv::<Msg>().await {
            Err(ProtoError::Malformed(detail)) => assert!(detail.contains("Msg"), "{detail}"),
            other => panic!("expected Malformed, got {other:?}"),
        }
        assert_eq!(b.recv::<Msg>().await.unwrap().unwrap(), Msg { n: 1, s: "ok".into() });
    }

    #[tokio::test]
    async fn large_messages_decoded_off_thread_arrive_whole_and_in_order() {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let big = |n: u32| Msg { n, s: "y".repeat(DECODE_OFF_THREAD_MIN + n as usize) };
        let writer = tokio::spawn(async move {
            let mut a = PlainConn::new(a);
            a.send(&Msg { n: 0, s: "small".into() }).await.unwrap();
            a.send(&big(1)).await.unwrap();
            // A large message that is not a `Msg`: an error, and the link stays usable.
            let mut out = BytesMut::new();
            let junk = format!("{{\"n\":2,\"s\":{}}}", "7".repeat(DECODE_OFF_THREAD_MIN));
            frame::encode(junk.as_bytes(), MAX_FRAME, &mut out).unwrap();
            a.stream.write_all(&out).await.unwrap();
            a.send(&big(3)).await.unwrap();
            a.send(&Msg { n: 4, s: "small".into() }).await.unwrap();
        });
        let (mut reader, _writer) = PlainConn::new(b).into_split();
        assert_eq!(reader.recv_off_thread::<Msg>().await.unwrap().unwrap(), Msg { n: 0, s: "small".into() });
        assert_eq!(reader.recv_off_thread::<Msg>().await.unwrap().unwrap(), big(1));
        match reader.recv_off_thread::<Msg>().await {
            Err(ProtoError::Malformed(detail)) => assert!(detail.contains("Msg"), "{detail}"),
            other => panic!("expected Malformed, got {other:?}"),
        }
        assert_eq!(reader.recv_off_thread::<Msg>().await.unwrap().unwrap(), big(3));
        assert_eq!(reader.recv_off_thread::<Msg>().await.unwrap().unwrap(), Msg { n: 4, s: "small".into() });
        writer.await.unwrap();
        assert!(reader.recv_off_thread::<Msg>().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_large_message_is_reported_once_and_its_buffers_are_not_kept() {
        let (a, b) = tokio::io::duplex(1024 * 1024);
        let mut a = PlainConn::new(a);
        let reader = tokio::spawn(async move {
            let mut b = PlainConn::new(b);
            let mut lens = Vec::new();
            while let Some(m) = b.recv::<Msg>().await.unwrap() {
                lens.push(m.s.len());
            }
            lens
        });
        a.send(&Msg { n: 0, s: "small".into() }).await.unwrap();
        assert!(!a.take_wrote_large(), "a small message is not large");
        let big = "z".repeat(TRIM_AFTER + 1);
        a.send(&Msg { n: 1, s: big }).await.unwrap();
        assert!(a.take_wrote_large(), "a message over TRIM_AFTER is reported");
        assert!(!a.take_wrote_large(), "and only once");
        assert!(a.tx.json.capacity() <= TRIM_AFTER && a.tx.out.capacity() <= SEND_BUF_KEEP, "buffers kept");
        give_back_freed_memory();
        a.send(&Msg { n: 2, s: "after".into() }).await.unwrap();
        assert!(!a.take_wrote_large());
        drop(a);
        assert_eq!(reader.await.unwrap(), [5, TRIM_AFTER + 1, 5]);
    }

    #[tokio::test]
    async fn oversize_frame_header_is_rejected() {
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        let mut b = PlainConn::new(b);
        assert!(matches!(b.recv::<Msg>().await, Err(ProtoError::FrameTooLarge { .. })));
    }

    #[tokio::test]
    async fn split_halves_work_concurrently() {
        let (a, b) = tokio::io::duplex(64);
        let (mut ar, mut aw) = PlainConn::new(a).into_split();
        let (mut br, mut bw) = PlainConn::new(b).into_split();
        let t1 = tokio::spawn(async move {
            for n in 0..200u32 {
                aw.send(&n).await.unwrap();
            }
        });
        let t2 = tokio::spawn(async move {
            for n in 0..200u32 {
                bw.send(&(n + 1000)).await.unwrap();
            }
        });
        for n in 0..200u32 {
            assert_eq!(br.recv::<u32>().await.unwrap(), Some(n));
            assert_eq!(ar.recv::<u32>().await.unwrap(), Some(n + 1000));
        }
        t1.await.unwrap();
        t2.await.unwrap();
    }
}
