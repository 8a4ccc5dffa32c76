//! High availability: which node am I ([`resolve`]), the sans-IO replication engine
//! ([`engine`]), the node that owns the peer link and feeds the engine ([`node`]), and what
//! the broker and the API may ask of it ([`handle`]).
//!
//! The engine takes no configuration. The node implements the traits of [`handle`] and
//! imports neither the broker nor the API; `server` hands it to both.

pub mod engine;
pub mod handle;
pub mod node;
pub mod resolve;
