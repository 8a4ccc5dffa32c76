//! High availability: which node am I ([`resolve`]), the sans-IO replication engine
//! ([`engine`]), and (elsewhere) the peer link that feeds it.

pub mod engine;
pub mod resolve;
pub mod node;
