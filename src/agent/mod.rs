//! The master's side of agents: [`AgentClient`] (calls with deadlines, a small connection
//! pool, errors by what the broker does next) and [`AgentRegistry`] (what the master knows
//! about each agent between calls).
//!
//! The wire exchanges themselves live in `crate::proto`: the agent link's request loop of
//! stand-in agents in `agent_link` (`serve_agent_conn`), and both sides of the report link in
//! `report` (`send_report`, `serve_reports`). This module must never hold broker policy (placement,
//! session state): it reports outcomes, the broker decides.

pub mod client;
pub mod registry;

pub use client::{AgentCallError, AgentClient, AgentClientConfig};
pub use registry::{AgentRegistry, AgentState, Standing};
