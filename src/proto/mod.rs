//! Wire formats and connections: frames, the secure channel, and the message types of each link.
//!
//! Invariants: bytes are only read and written here; a close in the middle of a frame is an
//! error, a close between frames is a clean end; nothing unauthenticated is ever returned as a
//! message.

pub mod agent;
pub mod api;
pub mod frame;
pub mod peer;
pub mod secure;
