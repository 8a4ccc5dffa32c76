//! Wire formats and connections: frames, the secure channel, and the message types of each link.
//!
//! Layers, bottom up: `frame` (byte layout, no I/O), `connection` (reading frames from a
//! stream; the plain JSON link for the Unix socket), `secure` (Noise handshake with the
//! cluster secret, encrypted JSON messages for every TCP link), then one module of message
//! types per link (`agent`, `api`, `peer`).
//!
//! Invariants: bytes are only read and written here; a close in the middle of a frame is an
//! error, a close between frames is a clean end; nothing unauthenticated is ever returned as a
//! message.

pub mod agent;
pub mod api;
pub mod connection;
pub mod error;
pub mod frame;
pub mod peer;
pub mod secure;

pub use connection::{PlainConn, PlainReader, PlainWriter};
pub use error::ProtoError;
pub use secure::{accept, connect, Secret, SecureConn, SecureReader, SecureWriter};
