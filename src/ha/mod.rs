//! High availability: which node am I ([`resolve`]), the sans-IO replication engine
//! ([`engine`]), and the node that owns the peer link and feeds the engine ([`node`]).
//!
//! The engine takes no configuration. The node implements the broker's `Replication` and
//! `AdoptionGate` and the API's `HaControl` but holds no handle of either; `server` wires them.

pub mod engine;
pub mod node;
pub mod resolve;
