//! The authenticated, encrypted channel used on every TCP link (agent, report, peer, admin).
//!
//! Noise protocol `Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s` keyed by a pre-shared [`Secret`].
//! NNpsk0 is chosen over XXpsk3 because nodes have no static key pairs to manage: possession
//! of the cluster secret is the whole identity, the first handshake message already proves it
//! (the responder learns of a wrong secret before answering), and ephemeral keys give forward
//! secrecy. The link kind (the *prologue*, e.g. `b"vsm-agent/1"`) is bound into the handshake
//! so a conversation for one link can never be replayed to another.
//!
//! Wire format (every unit is a [`frame`](super::frame)):
//! 1. initiator → responder: *hello* = the prologue in clear (only used to give a precise
//!    error for a wrong link kind; the handshake binds it cryptographically anyway);
//! 2. initiator → responder: Noise message 1 (`psk, e`), sent right after the hello;
//! 3. responder → initiator: `0x01` + Noise message 2 (`e, ee`), or `0x00` + a short reason
//!    (`bad-secret`, `wrong-link <expected>`, `bad-hello`, `not-allowed <why>`) when the
//!    responder refuses. The
//!    reason is unauthenticated and used only to word the initiator's error;
//! 4. then each direction carries Noise transport messages, one per frame. The first
//!    plaintext byte of each says whether the application message continues in the next
//!    transport message (`0x00`) or ends here (`0x01`); the rest is a piece of the message's
//!    JSON. A message larger than one Noise message (65535 bytes) is thereby fragmented.
//!
//! Nonces are implicit per-direction counters (TCP is ordered), kept outside the shared
//! `StatelessTransportState`, which lets the two directions live in separate tasks after
//! the connection is split.
//!
//! The connection is the one of every link, [`Conn`] of `proto::connection`, which sends,
//! receives and splits; this module gives it the handshake and its [`Noise`] transport, which
//! seals each message into transport messages and opens them again. [`SecureConn`],
//! [`SecureReader`] and [`SecureWriter`] name it and its halves over that transport.
//!
//! Timeouts: [`connect`] and [`accept`] wait as long as the stream lets them; servers must
//! bound them, with [`accept_timeout`] / [`connect_timeout`] or their own `tokio::time::timeout`.
//!
//! This module must never return, log or act on data that failed authentication, and never
//! log key material. Invariants: see `proto` (a close between messages is a clean end, in
//! the middle of a fragmented message an error; reads are cancellation-safe, writes are not).

use super::connection::{read_frame, Conn, Reader, Transport, Writer};
use super::frame::{self, MAX_MESSAGE};
use super::ProtoError;
use bytes::{BufMut, Bytes, BytesMut};
use sha2::{Digest, Sha256};
use snow::StatelessTransportState;
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

/// The Noise protocol name of every secure link.
pub const NOISE_PATTERN: &str = "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s";

/// Prologue of the master → agent call link.
pub const PROLOGUE_AGENT: &[u8] = b"vsm-agent/1";
/// Prologue of the agent → master report link.
pub const PROLOGUE_REPORT: &[u8] = b"vsm-report/1";
/// Prologue of the master ↔ master peer link.
pub const PROLOGUE_PEER: &[u8] = b"vsm-peer/1";
/// Prologue of the privileged admin link over TCP.
pub const PROLOGUE_ADMIN: &[u8] = b"vsm-admin/1";

/// Largest Noise message (ciphertext including its tag).
pub const MAX_NOISE_MESSAGE: usize = 65535;
const TAG_LEN: usize = 16;
/// Largest piece of application JSON carried by one transport message.
pub const MAX_FRAGMENT: usize = MAX_NOISE_MESSAGE - TAG_LEN - 1;
/// Largest prologue accepted in a hello.
pub const MAX_PROLOGUE: usize = 255;

const FLAG_MORE: u8 = 0x00;
const FLAG_LAST: u8 = 0x01;
const REPLY_REJECT: u8 = 0x00;
const REPLY_ACCEPT: u8 = 0x01;
const REASON_BAD_SECRET: &str = "bad-secret";
const REASON_WRONG_LINK: &str = "wrong-link";
const REASON_BAD_HELLO: &str = "bad-hello";
const REASON_NOT_ALLOWED: &str = "not-allowed";

/// A 32-byte pre-shared key: the SHA-256 of a secret file's bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret([u8; 32]);

impl Secret {
    /// Read a secret file. The key is the SHA-256 of the file's exact bytes (a trailing
    /// newline counts), so any file content of any length works, as long as it is identical
    /// on every node and not empty. A file that group or others may access is refused, with
    /// the command that fixes it.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Secret, ProtoError> {
        use std::os::unix::fs::PermissionsExt;
        let path = path.as_ref();
        let err = |problem: String| ProtoError::Secret { path: path.to_path_buf(), problem };
        if let Ok(m) = std::fs::metadata(path) {
            let mode = m.permissions().mode() & 0o777;
            if m.is_file() && mode & 0o077 != 0 {
                return Err(err(format!(
                    "group or others may access it (mode {mode:04o}); it must be private to its owner: run `chmod 600 {}`",
                    path.display()
                )));
            }
        }
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(err("missing: create it with the same content on every node of the cluster".into()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                return Err(err("unreadable: permission denied".into()))
            }
            Err(e) => return Err(err(format!("unreadable: {e}"))),
        };
        if bytes.is_empty() {
            return Err(err("empty: it must hold the cluster's shared secret".into()));
        }
        Ok(Secret::from_bytes(&bytes))
    }

    /// A key from secret bytes (hashed with SHA-256).
    pub fn from_bytes(bytes: &[u8]) -> Secret {
        Secret(Sha256::digest(bytes).into())
    }

    /// The first 8 hex digits of the SHA-256 of the key: safe to log, lets an operator check
    /// that two nodes hold the same secret.
    pub fn fingerprint(&self) -> String {
        Sha256::digest(self.0).iter().take(4).map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret(fingerprint {})", self.fingerprint())
    }
}

fn noise_err(e: snow::Error) -> ProtoError {
    ProtoError::Noise(e.to_string())
}

fn builder<'a>(secret: &'a Secret, prologue: &'a [u8]) -> Result<snow::Builder<'a>, ProtoError> {
    let params: snow::params::NoiseParams = NOISE_PATTERN.parse().map_err(noise_err)?;
    Ok(snow::Builder::new(params).psk(0, &secret.0).prologue(prologue))
}

fn check_prologue(prologue: &[u8]) -> Result<(), ProtoError> {
    if prologue.is_empty() || prologue.len() > MAX_PROLOGUE {
        return Err(ProtoError::Handshake(format!(
            "prologue must be 1 to {MAX_PROLOGUE} bytes, got {}",
            prologue.len()
        )));
    }
    Ok(())
}

/// Run the handshake as initiator (the side that opened the connection).
pub async fn connect<S>(mut stream: S, secret: &Secret, prologue: &[u8]) -> Result<SecureConn<S>, ProtoError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    check_prologue(prologue)?;
    let mut hs = builder(secret, prologue)?.build_initiator().map_err(noise_err)?;
    let mut msg = vec![0u8; MAX_NOISE_MESSAGE];
    let n = hs.write_message(&[], &mut msg).map_err(noise_err)?;
    let mut out = BytesMut::new();
    frame::encode(prologue, MAX_PROLOGUE, &mut out)?;
    frame::encode(&msg[..n], MAX_NOISE_MESSAGE, &mut out)?;
    stream.write_all(&out).await?;
    stream.flush().await?;

    let mut rbuf = BytesMut::new();
    let reply = match read_frame(&mut stream, &mut rbuf, MAX_NOISE_MESSAGE + 1).await {
        Ok(Some(r)) => r,
        Ok(None) | Err(ProtoError::Truncated { .. }) => {
            return Err(ProtoError::Handshake(
                "the peer closed the link without answering (is it a vsm endpoint of this kind?)".into(),
            ))
        }
        Err(ProtoError::FrameTooLarge { .. }) => {
            return Err(ProtoError::Handshake("the peer's answer is not a vsm handshake".into()))
        }
        Err(e) => return Err(e),
    };
    match reply.first() {
        Some(&REPLY_ACCEPT) => {}
        Some(&REPLY_REJECT) => return Err(rejection(&reply[1..], prologue)),
        _ => return Err(ProtoError::Handshake("the peer's answer is not a vsm handshake".into())),
    }
    let mut payload = vec![0u8; MAX_NOISE_MESSAGE];
    match hs.read_message(&reply[1..], &mut payload) {
        Ok(_) => {}
        Err(snow::Error::Decrypt) => return Err(ProtoError::BadSecret),
        Err(e) => return Err(ProtoError::Handshake(format!("invalid answer from the peer: {e}"))),
    }
    let transport = hs.into_stateless_transport_mode().map_err(noise_err)?;
    Ok(SecureConn::established(stream, rbuf, transport))
}

fn rejection(reason: &[u8], ours: &[u8]) -> ProtoError {
    let reason = String::from_utf8_lossy(reason);
    let mut words = reason.splitn(2, ' ');
    match (words.next(), words.next()) {
        (Some(REASON_BAD_SECRET), _) => ProtoError::BadSecret,
        (Some(REASON_NOT_ALLOWED), why) => {
            ProtoError::NotAllowed(why.unwrap_or("no reason given").chars().take(200).collect())
        }
        (Some(REASON_WRONG_LINK), theirs) => ProtoError::WrongLink {
            expected: String::from_utf8_lossy(ours).into_owned(),
            got: theirs.unwrap_or("another link kind").chars().take(MAX_PROLOGUE).collect(),
        },
        _ => ProtoError::Handshake(format!(
            "the peer refused the link ({})",
            reason.chars().take(80).collect::<String>()
        )),
    }
}

async fn reject<S: AsyncWrite + Unpin>(stream: &mut S, reason: &str) {
    let mut payload = vec![REPLY_REJECT];
    payload.extend_from_slice(reason.as_bytes());
    let mut out = BytesMut::new();
    if frame::encode(&payload, MAX_NOISE_MESSAGE + 1, &mut out).is_ok() {
        // Best effort: the peer may already be gone, and our error is what matters here.
        let _ = stream.write_all(&out).await;
        let _ = stream.flush().await;
        let _ = stream.shutdown().await;
    }
}

/// Run the handshake as responder (the side that accepted the connection). On failure the
/// peer is told why in a few words, and nothing it sent is returned.
pub async fn accept<S>(stream: S, secret: &Secret, prologue: &[u8]) -> Result<SecureConn<S>, ProtoError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    accept_any(stream, secret, &[prologue]).await.map(|(conn, _)| conn)
}

/// Read the initiator's hello and first handshake message.
async fn read_opening<S>(stream: &mut S, rbuf: &mut BytesMut) -> Result<(Bytes, Bytes), ProtoError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let hello = match read_frame(stream, rbuf, MAX_PROLOGUE).await {
        Ok(Some(h)) => h,
        Ok(None) | Err(ProtoError::Truncated { .. }) => {
            return Err(ProtoError::Handshake("the peer closed the link before its hello".into()))
        }
        Err(ProtoError::FrameTooLarge { .. }) => {
            reject(stream, REASON_BAD_HELLO).await;
            return Err(ProtoError::Handshake("the peer does not speak a vsm link (bad hello)".into()));
        }
        Err(e) => return Err(e),
    };
    let msg1 = match read_frame(stream, rbuf, MAX_NOISE_MESSAGE).await {
        Ok(Some(m)) => m,
        Ok(None) | Err(ProtoError::Truncated { .. }) => {
            return Err(ProtoError::Handshake("the peer closed the link during the handshake".into()))
        }
        Err(ProtoError::FrameTooLarge { .. }) => {
            reject(stream, REASON_BAD_HELLO).await;
            return Err(ProtoError::Handshake("the peer's handshake message is too large".into()));
        }
        Err(e) => return Err(e),
    };
    Ok((hello, msg1))
}

/// Like [`accept`], for a port that serves several link kinds: the initiator's prologue must
/// be one of `prologues`; its index is returned with the connection.
pub async fn accept_any<S>(
    mut stream: S,
    secret: &Secret,
    prologues: &[&[u8]],
) -> Result<(SecureConn<S>, usize), ProtoError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    for p in prologues {
        check_prologue(p)?;
    }
    let Some(first) = prologues.first() else {
        return Err(ProtoError::Handshake("no link kind to accept".into()));
    };
    let mut rbuf = BytesMut::new();
    let (hello, msg1) = read_opening(&mut stream, &mut rbuf).await?;
    let Some(index) = prologues.iter().position(|p| hello[..] == **p) else {
        let ours = String::from_utf8_lossy(first).into_owned();
        reject(&mut stream, &format!("{REASON_WRONG_LINK} {ours}")).await;
        let expected =
            prologues.iter().map(|p| String::from_utf8_lossy(p).into_owned()).collect::<Vec<_>>().join(" or ");
        return Err(ProtoError::WrongLink { expected, got: String::from_utf8_lossy(&hello).into_owned() });
    };
    let prologue = prologues[index];
    let mut hs = builder(secret, prologue)?.build_responder().map_err(noise_err)?;
    let mut payload = vec![0u8; MAX_NOISE_MESSAGE];
    match hs.read_message(&msg1, &mut payload) {
        Ok(_) => {}
        Err(snow::Error::Decrypt) => {
            reject(&mut stream, REASON_BAD_SECRET).await;
            return Err(ProtoError::BadSecret);
        }
        Err(e) => {
            reject(&mut stream, REASON_BAD_HELLO).await;
            return Err(ProtoError::Handshake(format!("invalid handshake message from the peer: {e}")));
        }
    }
    let mut msg2 = vec![0u8; MAX_NOISE_MESSAGE];
    msg2[0] = REPLY_ACCEPT;
    let n = hs.write_message(&[], &mut msg2[1..]).map_err(noise_err)?;
    let mut out = BytesMut::new();
    frame::encode(&msg2[..1 + n], MAX_NOISE_MESSAGE + 1, &mut out)?;
    stream.write_all(&out).await?;
    stream.flush().await?;
    let transport = hs.into_stateless_transport_mode().map_err(noise_err)?;
    Ok((SecureConn::established(stream, rbuf, transport), index))
}

/// Turn an initiator away before any handshake, telling it why (e.g. its address is not in
/// `allowed_clients`). Its [`connect`] fails with [`ProtoError::NotAllowed`]. Best effort,
/// bounded by a few seconds; the stream is closed afterwards.
pub async fn refuse<S>(mut stream: S, reason: &str)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut rbuf = BytesMut::new();
    // Reading the opening first lets the reason arrive instead of a connection reset.
    let _ = tokio::time::timeout(Duration::from_secs(2), read_opening(&mut stream, &mut rbuf)).await;
    let reason: String = reason.chars().take(200).collect();
    reject(&mut stream, &format!("{REASON_NOT_ALLOWED} {reason}")).await;
}

/// [`connect`] bounded by `timeout` ([`ProtoError::Timeout`] when it passes).
pub async fn connect_timeout<S>(
    stream: S,
    secret: &Secret,
    prologue: &[u8],
    timeout: Duration,
) -> Result<SecureConn<S>, ProtoError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    handshake_within(timeout, connect(stream, secret, prologue)).await
}

/// [`accept`] bounded by `timeout` ([`ProtoError::Timeout`] when it passes).
pub async fn accept_timeout<S>(
    stream: S,
    secret: &Secret,
    prologue: &[u8],
    timeout: Duration,
) -> Result<SecureConn<S>, ProtoError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    handshake_within(timeout, accept(stream, secret, prologue)).await
}

/// A handshake of either side bounded by `timeout` ([`ProtoError::Timeout`] when it passes).
async fn handshake_within<S>(
    timeout: Duration,
    handshake: impl std::future::Future<Output = Result<SecureConn<S>, ProtoError>>,
) -> Result<SecureConn<S>, ProtoError> {
    tokio::time::timeout(timeout, handshake)
        .await
        .map_err(|_| ProtoError::Timeout { what: "secure handshake", after: timeout })?
}

/// Noise transport messages, one per frame, each starting with its fragment flag (see the
/// wire format above). Made only by the handshake of [`connect`] and [`accept`].
#[derive(Debug)]
pub enum Noise {}

/// An authenticated, encrypted, message-oriented link over a stream.
pub type SecureConn<S> = Conn<Noise, S>;
/// Receiving half of a [`SecureConn`].
pub type SecureReader<R> = Reader<Noise, R>;
/// Sending half of a [`SecureConn`].
pub type SecureWriter<W> = Writer<Noise, W>;

/// Receiving state of one direction: nonce and reassembly.
pub struct NoiseRx {
    transport: Arc<StatelessTransportState>,
    nonce: u64,
    plain: Vec<u8>,
    assembling: Vec<u8>,
    mid_message: bool,
}

impl fmt::Debug for NoiseRx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NoiseRx").field("received", &self.nonce).finish()
    }
}

/// Sending state of one direction.
pub struct NoiseTx {
    transport: Arc<StatelessTransportState>,
    nonce: u64,
    plain: Vec<u8>,
}

impl fmt::Debug for NoiseTx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NoiseTx").field("sent", &self.nonce).finish()
    }
}

impl NoiseTx {
    /// Encrypt `plain` (its first byte the fragment flag) as the next transport message and
    /// append its frame to `out`.
    fn seal_one(&mut self, plain: &[u8], out: &mut BytesMut) -> Result<(), ProtoError> {
        let ct_len = plain.len() + TAG_LEN;
        out.put_slice(&frame::header(ct_len, MAX_NOISE_MESSAGE)?);
        let start = out.len();
        out.resize(start + ct_len, 0);
        let n = self.transport.write_message(self.nonce, plain, &mut out[start..]).map_err(noise_err)?;
        debug_assert_eq!(n, ct_len);
        self.nonce += 1;
        Ok(())
    }
}

impl Transport for Noise {
    type Rx = NoiseRx;
    type Tx = NoiseTx;
    const NAME: &'static str = "Secure";

    fn frame_max(_: usize) -> usize {
        MAX_NOISE_MESSAGE
    }

    fn open<'a>(rx: &'a mut NoiseRx, ct: &'a [u8], max: usize) -> Result<Option<&'a [u8]>, ProtoError> {
        if !rx.mid_message {
            // The last message was decoded by now.
            rx.assembling.clear();
        }
        if ct.len() < TAG_LEN + 1 {
            return Err(ProtoError::Decrypt);
        }
        let len = match rx.transport.read_message(rx.nonce, ct, &mut rx.plain) {
            Ok(n) => n,
            Err(snow::Error::Decrypt) => return Err(ProtoError::Decrypt),
            Err(e) => return Err(noise_err(e)),
        };
        rx.nonce += 1;
        if len == 0 {
            return Err(ProtoError::Violation("empty transport message".into()));
        }
        let flag = rx.plain[0];
        let data = &rx.plain[1..len];
        if flag != FLAG_MORE && flag != FLAG_LAST {
            return Err(ProtoError::Violation(format!("unknown fragment flag {flag:#04x}")));
        }
        let total = rx.assembling.len() + data.len();
        if total > max {
            return Err(ProtoError::MessageTooLarge { len: total, max });
        }
        if !rx.mid_message && flag == FLAG_LAST {
            return Ok(Some(data));
        }
        rx.assembling.extend_from_slice(data);
        rx.mid_message = flag == FLAG_MORE;
        Ok(if rx.mid_message { None } else { Some(&rx.assembling) })
    }

    fn end(rx: &NoiseRx) -> Result<(), ProtoError> {
        if rx.mid_message {
            Err(ProtoError::Truncated { what: "a fragmented message" })
        } else {
            Ok(())
        }
    }

    fn seal(tx: &mut NoiseTx, json: &[u8], _: usize, out: &mut BytesMut) -> Result<(), ProtoError> {
        let count = json.len().div_ceil(MAX_FRAGMENT).max(1);
        let mut chunks = json.chunks(MAX_FRAGMENT);
        // Taken out while sealing; a failed seal breaks the link, the buffer with it.
        let mut plain = std::mem::take(&mut tx.plain);
        for i in 0..count {
            let chunk = chunks.next().unwrap_or(&[]);
            plain.clear();
            plain.push(if i + 1 == count { FLAG_LAST } else { FLAG_MORE });
            plain.extend_from_slice(chunk);
            tx.seal_one(&plain, out)?;
        }
        tx.plain = plain;
        Ok(())
    }
}

impl<S> SecureConn<S> {
    fn established(stream: S, buf: BytesMut, transport: StatelessTransportState) -> Self {
        let transport = Arc::new(transport);
        let rx = NoiseRx {
            transport: transport.clone(),
            nonce: 0,
            plain: vec![0u8; MAX_NOISE_MESSAGE],
            assembling: Vec::new(),
            mid_message: false,
        };
        let tx = NoiseTx { transport, nonce: 0, plain: Vec::new() };
        Conn::from_parts(stream, buf, (MAX_MESSAGE, rx), (MAX_MESSAGE, tx))
    }

    /// Refuse to receive messages over `recv_max` bytes (counted while reassembling, so a
    /// peer cannot make this side buffer more) and to send messages over `send_max`; both
    /// are [`MAX_MESSAGE`] until set. Each link sets what it carries.
    pub fn with_limits(mut self, recv_max: usize, send_max: usize) -> Self {
        self.rx.max = recv_max;
        self.tx.max = send_max;
        self
    }
}

impl SecureConn<TcpStream> {
    /// Whether the peer has neither closed nor reset the connection, looked at without
    /// reading: nothing pending or more data means open; end of stream or an error means the
    /// peer is gone (a master that gave up on a call closes or resets its connection).
    pub fn peer_open(&self) -> bool {
        use nix::errno::Errno;
        use nix::sys::socket::{recv, MsgFlags};
        use std::os::fd::AsRawFd;
        let mut probe = [0u8; 1];
        match recv(self.get_ref().as_raw_fd(), &mut probe, MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT) {
            Ok(0) => false,
            Ok(_) => true,
            Err(Errno::EAGAIN | Errno::EINTR) => true,
            Err(_) => false,
        }
    }

    /// Split a TCP link into owned halves (no lock between the directions).
    pub fn into_tcp_split(self) -> (SecureReader<OwnedReadHalf>, SecureWriter<OwnedWriteHalf>) {
        self.split_with(TcpStream::into_split)
    }
}

impl<W: AsyncWrite + Unpin> SecureWriter<W> {
    /// Fuzzing: encrypt `plain` as one transport message as it is (its first byte is taken
    /// as the fragment flag) and send it.
    pub(crate) async fn send_transport_message(&mut self, plain: &[u8]) -> Result<(), ProtoError> {
        self.tx.state.seal_one(plain, &mut self.tx.out)?;
        self.tx.flush(&mut self.w).await
    }

    /// Fuzzing: send `bytes` as one frame, unencrypted (a forgery).
    pub(crate) async fn send_raw_frame(&mut self, bytes: &[u8]) -> Result<(), ProtoError> {
        frame::encode(bytes, MAX_NOISE_MESSAGE, &mut self.tx.out)?;
        self.tx.flush(&mut self.w).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::{Deserialize, Serialize};
    use tokio::io::{AsyncReadExt, DuplexStream};
    use tokio::net::TcpListener;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Msg {
        n: u32,
        text: String,
    }

    fn msg(n: u32) -> Msg {
        Msg { n, text: format!("message {n}") }
    }

    fn secret() -> Secret {
        Secret::from_bytes(b"cluster secret")
    }

    async fn pair() -> (SecureConn<DuplexStream>, SecureConn<DuplexStream>) {
        let (a, b) = tokio::io::duplex(4096);
        let s = secret();
        let server = tokio::spawn(async move { accept(b, &s, PROLOGUE_AGENT).await });
        let client = connect(a, &secret(), PROLOGUE_AGENT).await.unwrap();
        (client, server.await.unwrap().unwrap())
    }

    #[tokio::test]
    async fn handshake_and_messages_both_ways_over_duplex() {
        let (mut c, mut s) = pair().await;
        c.send(&msg(1)).await.unwrap();
        c.send(&msg(2)).await.unwrap();
        assert_eq!(s.recv::<Msg>().await.unwrap(), Some(msg(1)));
        assert_eq!(s.recv::<Msg>().await.unwrap(), Some(msg(2)));
        s.send(&msg(3)).await.unwrap();
        assert_eq!(c.recv::<Msg>().await.unwrap(), Some(msg(3)));
        drop(c);
        assert_eq!(s.recv::<Msg>().await.unwrap(), None);
    }

    #[tokio::test]
    async fn responder_may_speak_right_after_the_handshake() {
        let (a, b) = tokio::io::duplex(4096);
        let server = tokio::spawn(async move {
            let mut s = accept(b, &secret(), PROLOGUE_PEER).await.unwrap();
            s.feed(&msg(7)).unwrap();
            s.feed(&msg(8)).unwrap();
            s.flush().await.unwrap();
            s
        });
        let mut c = connect(a, &secret(), PROLOGUE_PEER).await.unwrap();
        assert_eq!(c.recv::<Msg>().await.unwrap(), Some(msg(7)));
        assert_eq!(c.recv::<Msg>().await.unwrap(), Some(msg(8)));
        drop(server.await.unwrap());
        assert_eq!(c.recv::<Msg>().await.unwrap(), None);
    }

    #[tokio::test]
    async fn handshake_and_messages_over_tcp() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (sock, _) = listener.accept().await.unwrap();
            let mut s = accept_timeout(sock, &secret(), PROLOGUE_ADMIN, Duration::from_secs(10)).await.unwrap();
            while let Some(m) = s.recv::<Msg>().await.unwrap() {
                s.send(&Msg { n: m.n * 2, text: m.text }).await.unwrap();
            }
        });
        let sock = TcpStream::connect(addr).await.unwrap();
        let mut c = connect_timeout(sock, &secret(), PROLOGUE_ADMIN, Duration::from_secs(10)).await.unwrap();
        for n in 0..50 {
            c.send(&msg(n)).await.unwrap();
            assert_eq!(c.recv::<Msg>().await.unwrap().unwrap().n, n * 2);
        }
        drop(c);
        server.await.unwrap();
    }

    #[tokio::test]
    async fn wrong_secret_fails_on_both_sides_and_delivers_nothing() {
        let (a, b) = tokio::io::duplex(4096);
        let server = tokio::spawn(async move { accept(b, &secret(), PROLOGUE_AGENT).await });
        let other = Secret::from_bytes(b"another secret");
        let client = connect(a, &other, PROLOGUE_AGENT).await;
        assert!(matches!(client, Err(ProtoError::BadSecret)), "{client:?}");
        let server = server.await.unwrap();
        assert!(matches!(server, Err(ProtoError::BadSecret)), "{server:?}");
        assert!(server.unwrap_err().to_string().contains("does not share our secret"));
    }

    #[tokio::test]
    async fn attacker_without_secret_gets_nothing_accepted() {
        // Hello, a forged first message, then something shaped like a transport message.
        let (mut a, b) = tokio::io::duplex(4096);
        let server = tokio::spawn(async move { accept(b, &secret(), PROLOGUE_AGENT).await });
        let mut out = BytesMut::new();
        frame::encode(PROLOGUE_AGENT, MAX_PROLOGUE, &mut out).unwrap();
        frame::encode(&[0x42; 48], MAX_NOISE_MESSAGE, &mut out).unwrap();
        frame::encode(&[0x43; 64], MAX_NOISE_MESSAGE, &mut out).unwrap();
        a.write_all(&out).await.unwrap();
        assert!(matches!(server.await.unwrap(), Err(ProtoError::BadSecret)));
        let mut answer = Vec::new();
        a.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer[4], REPLY_REJECT);
    }

    #[tokio::test]
    async fn wrong_link_kind_is_named_on_both_sides() {
        let (a, b) = tokio::io::duplex(4096);
        let server = tokio::spawn(async move { accept(b, &secret(), PROLOGUE_PEER).await });
        let client = connect(a, &secret(), PROLOGUE_AGENT).await;
        match client {
            Err(ProtoError::WrongLink { expected, got }) => {
                assert_eq!(expected, "vsm-agent/1");
                assert_eq!(got, "vsm-peer/1");
            }
            other => panic!("expected WrongLink, got {other:?}"),
        }
        match server.await.unwrap() {
            Err(ProtoError::WrongLink { expected, got }) => {
                assert_eq!(expected, "vsm-peer/1");
                assert_eq!(got, "vsm-agent/1");
            }
            other => panic!("expected WrongLink, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn accept_any_dispatches_on_the_link_kind() {
        for (prologue, want) in [(PROLOGUE_REPORT, 0usize), (PROLOGUE_ADMIN, 1)] {
            let (a, b) = tokio::io::duplex(4096);
            let server =
                tokio::spawn(async move { accept_any(b, &secret(), &[PROLOGUE_REPORT, PROLOGUE_ADMIN]).await });
            let mut c = connect(a, &secret(), prologue).await.unwrap();
            let (mut s, index) = server.await.unwrap().unwrap();
            assert_eq!(index, want);
            c.send(&msg(1)).await.unwrap();
            assert_eq!(s.recv::<Msg>().await.unwrap(), Some(msg(1)));
        }
        let (a, b) = tokio::io::duplex(4096);
        let server = tokio::spawn(async move { accept_any(b, &secret(), &[PROLOGUE_REPORT, PROLOGUE_ADMIN]).await });
        assert!(matches!(connect(a, &secret(), PROLOGUE_PEER).await, Err(ProtoError::WrongLink { .. })));
        match server.await.unwrap() {
            Err(ProtoError::WrongLink { expected, .. }) => {
                assert_eq!(expected, "vsm-report/1 or vsm-admin/1")
            }
            other => panic!("expected WrongLink, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn refused_initiator_learns_why() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (sock, _) = listener.accept().await.unwrap();
            refuse(sock, "127.0.0.1 is not in allowed_clients").await;
        });
        let sock = TcpStream::connect(addr).await.unwrap();
        match connect(sock, &secret(), PROLOGUE_AGENT).await {
            Err(e @ ProtoError::NotAllowed(_)) => {
                assert!(e.is_auth_failure());
                assert!(e.to_string().contains("allowed_clients"), "{e}");
            }
            other => panic!("expected NotAllowed, got {other:?}"),
        }
        server.await.unwrap();
    }

    #[tokio::test]
    async fn non_vsm_peers_fail_the_handshake() {
        // A client speaking another protocol.
        let (mut a, b) = tokio::io::duplex(4096);
        let server = tokio::spawn(async move { accept(b, &secret(), PROLOGUE_AGENT).await });
        a.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        assert!(matches!(server.await.unwrap(), Err(ProtoError::Handshake(_))));
        // A server that hangs up at once.
        let (a, b) = tokio::io::duplex(4096);
        drop(b);
        let r = connect(a, &secret(), PROLOGUE_AGENT).await;
        assert!(matches!(r, Err(ProtoError::Handshake(_)) | Err(ProtoError::Io(_))), "{r:?}");
        // A server that answers garbage.
        let (a, mut b) = tokio::io::duplex(4096);
        let junk = tokio::spawn(async move {
            let mut buf = [0u8; 256];
            let _ = b.read(&mut buf).await;
            b.write_all(b"SSH-2.0-OpenSSH_9.6\r\n").await.unwrap();
            b
        });
        let r = connect(a, &secret(), PROLOGUE_AGENT).await;
        assert!(matches!(r, Err(ProtoError::Handshake(_))), "{r:?}");
        drop(junk.await.unwrap());
    }

    #[tokio::test]
    async fn handshake_timeout_when_the_peer_is_silent() {
        let (_a, b) = tokio::io::duplex(4096);
        let r = accept_timeout(b, &secret(), PROLOGUE_AGENT, Duration::from_millis(20)).await;
        assert!(matches!(r, Err(ProtoError::Timeout { .. })), "{r:?}");
        let (a, _b) = tokio::io::duplex(4096);
        let r = connect_timeout(a, &secret(), PROLOGUE_AGENT, Duration::from_millis(20)).await;
        assert!(matches!(r, Err(ProtoError::Timeout { .. })), "{r:?}");
    }

    #[tokio::test]
    async fn undecodable_json_is_malformed_and_the_link_survives() {
        let (mut c, mut s) = pair().await;
        c.send("just a string").await.unwrap();
        c.send(&msg(5)).await.unwrap();
        match s.recv::<Msg>().await {
            Err(ProtoError::Malformed(detail)) => assert!(detail.contains("Msg"), "{detail}"),
            other => panic!("expected Malformed, got {other:?}"),
        }
        assert_eq!(s.recv::<Msg>().await.unwrap(), Some(msg(5)));
    }

    #[tokio::test]
    async fn large_message_fragments_and_reassembles() {
        let (mut c, mut s) = pair().await;
        let big = Msg { n: 1, text: "z".repeat(1024 * 1024) };
        let sender = tokio::spawn(async move {
            c.send(&big).await.unwrap();
            c.send(&msg(2)).await.unwrap();
            c
        });
        let got: Msg = s.recv().await.unwrap().unwrap();
        assert_eq!(got.text.len(), 1024 * 1024);
        assert!(got.text.bytes().all(|b| b == b'z'));
        assert_eq!(s.recv::<Msg>().await.unwrap(), Some(msg(2)));
        let c = sender.await.unwrap();
        assert!(c.tx.state.nonce > 16, "a 1 MiB message must take several transport messages");
        // And back the other way.
        let back = tokio::spawn(async move { s.send(&got).await });
        let mut c = c;
        assert_eq!(c.recv::<Msg>().await.unwrap().unwrap().text.len(), 1024 * 1024);
        back.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn message_over_the_maximum_is_refused_before_sending() {
        let (mut c, mut s) = pair().await;
        let huge = "y".repeat(MAX_MESSAGE + 1);
        assert!(matches!(c.send(&huge).await, Err(ProtoError::MessageTooLarge { .. })));
        c.send(&msg(1)).await.unwrap();
        assert_eq!(s.recv::<Msg>().await.unwrap(), Some(msg(1)));
    }

    #[tokio::test]
    async fn split_halves_work_concurrently_over_duplex() {
        let (c, s) = pair().await;
        let (mut cr, mut cw) = c.into_split();
        let (mut sr, mut sw) = s.into_split();
        let t1 = tokio::spawn(async move {
            for n in 0..300 {
                cw.send(&msg(n)).await.unwrap();
            }
        });
        let t2 = tokio::spawn(async move {
            for n in 0..300 {
                sw.send(&msg(n + 10_000)).await.unwrap();
            }
        });
        let t3 = tokio::spawn(async move {
            for n in 0..300 {
                assert_eq!(sr.recv::<Msg>().await.unwrap(), Some(msg(n)));
            }
        });
        for n in 0..300 {
            assert_eq!(cr.recv::<Msg>().await.unwrap(), Some(msg(n + 10_000)));
        }
        t1.await.unwrap();
        t2.await.unwrap();
        t3.await.unwrap();
    }

    #[tokio::test]
    async fn tcp_split_halves_work_concurrently() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (sock, _) = listener.accept().await.unwrap();
            let (mut r, mut w) = accept(sock, &secret(), PROLOGUE_PEER).await.unwrap().into_tcp_split();
            // Echo from a separate task per direction through a bounded channel.
            let (tx, mut rx) = tokio::sync::mpsc::channel::<Msg>(8);
            let reader = tokio::spawn(async move {
                while let Some(m) = r.recv::<Msg>().await.unwrap() {
                    tx.send(m).await.unwrap();
                }
            });
            while let Some(m) = rx.recv().await {
                w.send(&m).await.unwrap();
            }
            reader.await.unwrap();
        });
        let sock = TcpStream::connect(addr).await.unwrap();
        let (mut r, mut w) = connect(sock, &secret(), PROLOGUE_PEER).await.unwrap().into_tcp_split();
        let writer = tokio::spawn(async move {
            for n in 0..500 {
                w.send(&msg(n)).await.unwrap();
            }
            w.shutdown().await.unwrap();
        });
        for n in 0..500 {
            assert_eq!(r.recv::<Msg>().await.unwrap(), Some(msg(n)));
        }
        writer.await.unwrap();
        assert_eq!(r.recv::<Msg>().await.unwrap(), None);
        server.await.unwrap();
    }

    /// What a man in the middle does to the client → server frames after the handshake.
    #[derive(Clone, Copy)]
    enum Mitm {
        FlipByte { frame: usize },
        CutFrame { frame: usize },
        DropFrame { frame: usize },
        Oversize { frame: usize },
        ShortFrame { frame: usize },
        CloseAfter { frames: usize },
    }

    /// A client and server whose client → server bytes pass through `mode`.
    async fn pair_through(mode: Mitm) -> (SecureConn<DuplexStream>, SecureConn<DuplexStream>) {
        let (c_end, p1) = tokio::io::duplex(1 << 20);
        let (p2, s_end) = tokio::io::duplex(1 << 20);
        let (mut p1r, mut p1w) = tokio::io::split(p1);
        let (mut p2r, mut p2w) = tokio::io::split(p2);
        tokio::spawn(async move {
            let _ = tokio::io::copy(&mut p2r, &mut p1w).await;
        });
        tokio::spawn(async move {
            let mut buf = BytesMut::new();
            let mut index = 0usize;
            while let Ok(Some(payload)) = read_frame(&mut p1r, &mut buf, 1 << 24).await {
                let data_frame = index.checked_sub(2);
                index += 1;
                let mut payload: Vec<u8> = payload.to_vec();
                let mut out = BytesMut::new();
                match (mode, data_frame) {
                    (Mitm::FlipByte { frame }, Some(i)) if i == frame => {
                        let mid = payload.len() / 2;
                        payload[mid] ^= 0x01;
                    }
                    (Mitm::CutFrame { frame }, Some(i)) if i == frame => {
                        out.put_slice(&(payload.len() as u32).to_be_bytes());
                        out.put_slice(&payload[..payload.len() / 2]);
                        let _ = p2w.write_all(&out).await;
                        let _ = p2w.shutdown().await;
                        return;
                    }
                    (Mitm::DropFrame { frame }, Some(i)) if i == frame => continue,
                    (Mitm::Oversize { frame }, Some(i)) if i == frame => {
                        let _ = p2w.write_all(&u32::MAX.to_be_bytes()).await;
                        let _ = p2w.write_all(&payload).await;
                        continue;
                    }
                    (Mitm::ShortFrame { frame }, Some(i)) if i == frame => payload.truncate(3),
                    (Mitm::CloseAfter { frames }, Some(i)) if i == frames => {
                        let _ = p2w.shutdown().await;
                        return;
                    }
                    _ => {}
                }
                frame::encode(&payload, usize::MAX, &mut out).unwrap();
                if p2w.write_all(&out).await.is_err() {
                    return;
                }
            }
        });
        let s = tokio::spawn(async move { accept(s_end, &secret(), PROLOGUE_AGENT).await });
        let c = connect(c_end, &secret(), PROLOGUE_AGENT).await.unwrap();
        (c, s.await.unwrap().unwrap())
    }

    #[tokio::test]
    async fn tampered_ciphertext_is_rejected() {
        let (mut c, mut s) = pair_through(Mitm::FlipByte { frame: 1 }).await;
        c.send(&msg(1)).await.unwrap();
        c.send(&msg(2)).await.unwrap();
        assert_eq!(s.recv::<Msg>().await.unwrap(), Some(msg(1)));
        assert!(matches!(s.recv::<Msg>().await, Err(ProtoError::Decrypt)));
        assert!(matches!(s.recv::<Msg>().await, Err(ProtoError::Broken)));
    }

    #[tokio::test]
    async fn dropped_frame_puts_the_link_out_of_step() {
        let (mut c, mut s) = pair_through(Mitm::DropFrame { frame: 0 }).await;
        c.send(&msg(1)).await.unwrap();
        c.send(&msg(2)).await.unwrap();
        assert!(matches!(s.recv::<Msg>().await, Err(ProtoError::Decrypt)));
    }

    #[tokio::test]
    async fn stream_cut_mid_frame_is_truncated() {
        let (mut c, mut s) = pair_through(Mitm::CutFrame { frame: 0 }).await;
        c.send(&msg(1)).await.unwrap();
        let r = s.recv::<Msg>().await;
        assert!(matches!(r, Err(ProtoError::Truncated { what: "a frame" })), "{r:?}");
    }

    #[tokio::test]
    async fn stream_cut_mid_fragmented_message_is_truncated() {
        let (mut c, mut s) = pair_through(Mitm::CloseAfter { frames: 3 }).await;
        let big = Msg { n: 1, text: "q".repeat(1024 * 1024) };
        let sender = tokio::spawn(async move { c.send(&big).await });
        let r = s.recv::<Msg>().await;
        assert!(matches!(r, Err(ProtoError::Truncated { what: "a fragmented message" })), "{r:?}");
        sender.abort();
    }

    #[tokio::test]
    async fn oversize_frame_is_rejected() {
        let (mut c, mut s) = pair_through(Mitm::Oversize { frame: 0 }).await;
        c.send(&msg(1)).await.unwrap();
        let r = s.recv::<Msg>().await;
        assert!(matches!(r, Err(ProtoError::FrameTooLarge { .. })), "{r:?}");
    }

    #[tokio::test]
    async fn frame_shorter_than_a_tag_is_rejected() {
        let (mut c, mut s) = pair_through(Mitm::ShortFrame { frame: 0 }).await;
        c.send(&msg(1)).await.unwrap();
        assert!(matches!(s.recv::<Msg>().await, Err(ProtoError::Decrypt)));
    }

    #[tokio::test]
    async fn random_garbage_after_handshake_never_panics() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..50 {
            let (mut c_end, p) = tokio::io::duplex(1 << 16);
            let server = tokio::spawn(async move {
                let mut s = accept(p, &secret(), PROLOGUE_AGENT).await?;
                loop {
                    if s.recv::<Msg>().await?.is_none() {
                        return Ok::<(), ProtoError>(());
                    }
                }
            });
            // A genuine handshake done by hand, then random bytes.
            let mut hs = builder(&secret(), PROLOGUE_AGENT).unwrap().build_initiator().unwrap();
            let mut m = vec![0u8; 1024];
            let n = hs.write_message(&[], &mut m).unwrap();
            let mut out = BytesMut::new();
            frame::encode(PROLOGUE_AGENT, MAX_PROLOGUE, &mut out).unwrap();
            frame::encode(&m[..n], MAX_NOISE_MESSAGE, &mut out).unwrap();
            let len: usize = rng.gen_range(0..200);
            let garbage: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            out.put_slice(&garbage);
            c_end.write_all(&out).await.unwrap();
            drop(c_end);
            let r = server.await.unwrap();
            assert!(len == 0 || r.is_err(), "garbage was accepted: {r:?}");
        }
    }

    #[test]
    fn secret_from_file_errors_name_the_path_and_problem() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.key");
        let e = Secret::from_file(&missing).unwrap_err().to_string();
        assert!(e.contains("nope.key") && e.contains("missing"), "{e}");

        let empty = dir.path().join("empty.key");
        std::fs::write(&empty, b"").unwrap();
        std::fs::set_permissions(&empty, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        let e = Secret::from_file(&empty).unwrap_err().to_string();
        assert!(e.contains("empty.key") && e.contains("empty"), "{e}");

        let e = Secret::from_file(dir.path()).unwrap_err().to_string();
        assert!(e.contains("unreadable"), "{e}");

        let good = dir.path().join("good.key");
        std::fs::write(&good, b"s3cret\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        for mode in [0o644, 0o640, 0o604, 0o620] {
            std::fs::set_permissions(&good, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = Secret::from_file(&good).unwrap_err().to_string();
            assert!(e.contains(&format!("run `chmod 600 {}`", good.display())), "{e}");
            assert!(e.contains(&format!("mode {mode:04o}")), "{e}");
        }
        std::fs::set_permissions(&good, std::fs::Permissions::from_mode(0o600)).unwrap();
        let s = Secret::from_file(&good).unwrap();
        assert_eq!(s, Secret::from_bytes(b"s3cret\n"));
        assert_ne!(s, Secret::from_bytes(b"s3cret"));
    }

    #[test]
    fn secret_debug_does_not_show_the_key() {
        let s = Secret::from_bytes(b"x");
        let shown = format!("{s:?}");
        let raw: String = s.0.iter().map(|b| format!("{b:02x}")).collect();
        assert!(!shown.contains(&raw[..8]), "{shown}");
        assert_eq!(s.fingerprint().len(), 8);
    }
}
