//! Reading and writing frames on a stream, and the plain (unencrypted) JSON-message link.
//!
//! This module owns the read buffer of a link: bytes from the stream go into it and leave it
//! only as whole frames. [`PlainConn`] carries one JSON message per frame and is meant for the
//! Unix socket, where the kernel's peer credentials authenticate the caller; it must never be
//! used on a TCP port (use `proto::secure` there).
//!
//! Invariants:
//! - `None` from a read means the peer closed cleanly between frames; a close inside a frame
//!   is [`ProtoError::Truncated`].
//! - Reads are cancellation-safe (partial input stays in the connection's buffer), so `recv`
//!   may be used in `tokio::select!`; writes are not, and a cancelled send breaks the link.
//! - After an error other than a JSON decoding error, the connection reports
//!   [`ProtoError::Broken`] forever.

use super::frame::{self, Status, MAX_FRAME};
use super::ProtoError;
use bytes::{Bytes, BytesMut};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};

/// Initial read buffer; it grows to the size of the largest frame seen.
const READ_BUF: usize = 8 * 1024;

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

/// Receiving half of a plain link's state (independent of the stream it reads).
#[derive(Debug)]
struct PlainRx {
    buf: BytesMut,
    broken: bool,
    /// Largest message accepted from the peer.
    max: usize,
}

impl PlainRx {
    async fn recv<R: AsyncRead + Unpin, T: DeserializeOwned>(&mut self, r: &mut R) -> Result<Option<T>, ProtoError> {
        if self.broken {
            return Err(ProtoError::Broken);
        }
        match read_frame(r, &mut self.buf, self.max).await {
            Ok(None) => Ok(None),
            Ok(Some(payload)) => decode_json(&payload).map(Some),
            Err(e) => {
                self.broken = true;
                Err(e)
            }
        }
    }
}

/// Sending half of a plain link's state.
#[derive(Debug)]
struct PlainTx {
    buf: BytesMut,
    broken: bool,
    /// Largest message the peer accepts.
    max: usize,
}

impl PlainTx {
    fn feed<T: Serialize + ?Sized>(&mut self, msg: &T) -> Result<(), ProtoError> {
        if self.broken {
            return Err(ProtoError::Broken);
        }
        let json = serde_json::to_vec(msg).map_err(|e| ProtoError::Encode(e.to_string()))?;
        if json.len() > self.max {
            return Err(ProtoError::MessageTooLarge { len: json.len(), max: self.max });
        }
        frame::encode(&json, self.max, &mut self.buf)
    }

    async fn flush<W: AsyncWrite + Unpin>(&mut self, w: &mut W) -> Result<(), ProtoError> {
        if self.broken {
            return Err(ProtoError::Broken);
        }
        // Mark broken first: if this future is dropped mid-write the peer is out of step.
        self.broken = true;
        if !self.buf.is_empty() {
            w.write_all(&self.buf).await?;
            self.buf.clear();
        }
        w.flush().await?;
        self.broken = false;
        Ok(())
    }
}

/// A link carrying one JSON message per length-prefixed frame, without encryption.
#[derive(Debug)]
pub struct PlainConn<S> {
    stream: S,
    rx: PlainRx,
    tx: PlainTx,
}

impl<S: AsyncRead + AsyncWrite + Unpin> PlainConn<S> {
    /// A link accepting messages of up to [`frame::MAX_MESSAGE`] bytes each way.
    pub fn new(stream: S) -> Self {
        Self::with_limits(stream, frame::MAX_MESSAGE, frame::MAX_MESSAGE)
    }

    /// A link that refuses to receive messages over `recv_max` bytes (the header alone is
    /// enough to refuse them, nothing is buffered) and to send messages over `send_max`.
    pub fn with_limits(stream: S, recv_max: usize, send_max: usize) -> Self {
        let recv_max = recv_max.min(MAX_FRAME);
        let send_max = send_max.min(MAX_FRAME);
        PlainConn {
            stream,
            rx: PlainRx { buf: BytesMut::new(), broken: false, max: recv_max },
            tx: PlainTx { buf: BytesMut::new(), broken: false, max: send_max },
        }
    }

    /// Send one message and flush it.
    pub async fn send<T: Serialize + ?Sized>(&mut self, msg: &T) -> Result<(), ProtoError> {
        self.tx.feed(msg)?;
        self.tx.flush(&mut self.stream).await
    }

    /// Queue one message without writing it; [`PlainConn::flush`] writes everything queued.
    pub fn feed<T: Serialize + ?Sized>(&mut self, msg: &T) -> Result<(), ProtoError> {
        self.tx.feed(msg)
    }

    /// Write every queued message.
    pub async fn flush(&mut self) -> Result<(), ProtoError> {
        self.tx.flush(&mut self.stream).await
    }

    /// The next message; `None` when the peer closed cleanly between messages.
    pub async fn recv<T: DeserializeOwned>(&mut self) -> Result<Option<T>, ProtoError> {
        self.rx.recv(&mut self.stream).await
    }

    /// The underlying stream (for example to read peer credentials).
    pub fn get_ref(&self) -> &S {
        &self.stream
    }

    /// Split into independently usable halves (full duplex).
    pub fn into_split(self) -> (PlainReader<ReadHalf<S>>, PlainWriter<WriteHalf<S>>) {
        self.split_with(tokio::io::split)
    }

    /// Split with a stream-specific splitter, e.g. `UnixStream::into_split`, keeping buffered input.
    pub fn split_with<R, W>(self, split: impl FnOnce(S) -> (R, W)) -> (PlainReader<R>, PlainWriter<W>) {
        let (r, w) = split(self.stream);
        (PlainReader { r, rx: self.rx }, PlainWriter { w, tx: self.tx })
    }
}

/// Receiving half of a [`PlainConn`].
#[derive(Debug)]
pub struct PlainReader<R> {
    r: R,
    rx: PlainRx,
}

impl<R: AsyncRead + Unpin> PlainReader<R> {
    /// The next message; `None` when the peer closed cleanly between messages.
    pub async fn recv<T: DeserializeOwned>(&mut self) -> Result<Option<T>, ProtoError> {
        self.rx.recv(&mut self.r).await
    }
}

/// Sending half of a [`PlainConn`].
#[derive(Debug)]
pub struct PlainWriter<W> {
    w: W,
    tx: PlainTx,
}

impl<W: AsyncWrite + Unpin> PlainWriter<W> {
    /// Send one message and flush it.
    pub async fn send<T: Serialize + ?Sized>(&mut self, msg: &T) -> Result<(), ProtoError> {
        self.tx.feed(msg)?;
        self.tx.flush(&mut self.w).await
    }

    /// Queue one message without writing it.
    pub fn feed<T: Serialize + ?Sized>(&mut self, msg: &T) -> Result<(), ProtoError> {
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
