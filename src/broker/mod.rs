//! The session broker: login, placement and reconciliation with agents.
//!
//! Invariant: broker logic decides, it does not do I/O itself; agents and the database are
//! reached through handles.

pub mod placement;
pub mod hooks;
pub mod service;
