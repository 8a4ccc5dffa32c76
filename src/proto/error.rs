//! The one error type of the wire layer: what went wrong on a link, named for what the caller
//! does next (drop the link, fix the secret, fix the configuration).
//!
//! It must never carry secret material (keys, plaintext of a failed decryption).

use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong while framing, securing or decoding a link.
///
/// After any error except [`ProtoError::Malformed`] the connection that produced it is broken
/// and must be dropped; further calls on it return [`ProtoError::Broken`].
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// The underlying stream failed.
    #[error("i/o error on the link: {0}")]
    Io(#[from] std::io::Error),

    /// The peer closed the link in the middle of a frame or of a fragmented message.
    #[error("the peer closed the link in the middle of {what}")]
    Truncated { what: &'static str },

    /// A frame header announced more bytes than this link accepts.
    #[error("frame of {len} bytes is larger than the maximum of {max} bytes")]
    FrameTooLarge { len: usize, max: usize },

    /// An application message is larger than the link accepts (see each link's limits).
    #[error("message of {len} bytes is larger than the maximum of {max} bytes")]
    MessageTooLarge { len: usize, max: usize },

    /// A message arrived intact but is not the JSON the link expects.
    #[error("malformed message: {0}")]
    Malformed(String),

    /// An authenticated peer broke the rules of the link (e.g. an unknown fragment flag);
    /// the link is dropped.
    #[error("the peer broke the link protocol: {0}")]
    Violation(String),

    /// A message could not be encoded as JSON (a bug in the caller's type).
    #[error("cannot encode message as json: {0}")]
    Encode(String),

    /// The peer proved it does not hold our pre-shared key (or we do not hold its key).
    #[error("handshake failed: the peer does not share our secret")]
    BadSecret,

    /// The peer speaks another kind of link or another protocol version.
    #[error("handshake failed: the peer speaks link {got:?}, expected {expected:?}")]
    WrongLink { expected: String, got: String },

    /// The peer turned us away before the handshake (e.g. we are not in its `allowed_clients`).
    #[error("the peer does not accept links from us: {0}")]
    NotAllowed(String),

    /// Any other handshake failure (garbage, the peer hung up, a protocol violation).
    #[error("handshake failed: {0}")]
    Handshake(String),

    /// A message failed authentication: it was altered in transit or the link is out of step.
    #[error("message authentication failed: the data was altered in transit or the link is out of step")]
    Decrypt,

    /// An operation did not finish in time.
    #[error("{what} timed out after {after:?}")]
    Timeout { what: &'static str, after: Duration },

    /// The peer sent nothing for the link's idle timeout; the link is closed.
    #[error("nothing received for {after:?}: closing the idle link")]
    Idle { after: Duration },

    /// The secret file cannot be used.
    #[error("secret file {path}: {problem}")]
    Secret { path: PathBuf, problem: String },

    /// The connection already failed earlier and can no longer be used.
    #[error("the link is broken by an earlier error and must be dropped")]
    Broken,

    /// The Noise library refused an operation (a bug: sizes and states are checked first).
    #[error("noise protocol error: {0}")]
    Noise(String),
}

impl ProtoError {
    /// True when the error says the peer refused our credentials or we refused its:
    /// a wrong secret, another link kind, or an address it does not accept. Retrying will not
    /// help until configuration changes.
    pub fn is_auth_failure(&self) -> bool {
        matches!(self, ProtoError::BadSecret | ProtoError::WrongLink { .. } | ProtoError::NotAllowed(_))
    }
}
