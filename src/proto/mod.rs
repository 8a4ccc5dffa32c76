//! Wire formats and connections: frames, the secure channel, and the message types of each link.
//!
//! Layers, bottom up: `frame` (byte layout, no I/O), `connection` (reading frames from a
//! stream; the one JSON message link, generic over its transport, plain for the Unix
//! socket), `secure` (Noise handshake with the cluster secret and the encrypted transport of
//! every TCP link), `addr` (targets and TCP
//! connect), `listen` (the one accept loop of every listener, with its connection cap and
//! idle timeout), `access` (who may use a TCP port: the one allowed-clients check of master
//! and agent), then one module of message types per link (`agent`, `api`, `peer`, each with
//! the size limits of what it carries), `report` (the report link, both sides) and
//! `agent_link` (the agent link's request loop, for stand-in agents).
//!
//! Invariants: bytes are only read and written here; every connection is given the size
//! limits of its link, so a peer cannot make the other side buffer more than that link
//! carries; a close in the middle of a frame is an
//! error, a close between frames is a clean end; nothing unauthenticated is ever returned as a
//! message.

pub mod access;
pub mod addr;
pub mod agent;
pub mod agent_link;
pub mod api;
pub mod connection;
pub mod error;
pub mod frame;
pub mod listen;
pub mod peer;
pub mod report;
pub mod secure;
pub mod tagged;

pub use connection::{PlainConn, PlainReader, PlainWriter};
pub use error::ProtoError;
pub use secure::{accept, accept_any, connect, refuse, Secret, SecureConn, SecureReader, SecureWriter};
