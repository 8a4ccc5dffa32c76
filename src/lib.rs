//! vsm: an HA-aware session-broker master for Linux remote-desktop clusters.
//!
//! Table of contents, from the bottom layer up (see `docs/architecture.md`):

/// Master-side client of agents.
pub mod agent;
/// The agent daemon's library code.
pub mod agentd;
/// Unix-socket and TCP request handlers of the master.
pub mod api;
/// Login, placement and reconciliation with agents.
pub mod broker;
/// Command-line front ends of every program, and the `vsmserver demo` application.
pub mod cli;
/// Client side of the master's API (`vsmclient`, `tlctl`).
pub mod client;
/// Key table, loading, validation and atomic editing of the configuration.
pub mod config;
/// The session database: one task owns SQLite, everyone else holds a handle.
pub mod db;
/// Fuzz targets for every decoder of outside input (driven by `cargo fuzz` and proptest).
pub mod fuzz;
/// High availability: which node am I, the sans-IO replication engine, the peer link.
pub mod ha;
/// Prometheus metric families of the master and their exposition.
pub mod metrics;
/// Domain types: sessions, identities, positions, versions. No I/O.
pub mod model;
/// Frames, the secure channel, and the messages of every link.
pub mod proto;
/// Wiring of the master daemon: start-up, background loops, shutdown.
pub mod server;
/// The shutdown signal (SIGTERM, SIGINT) shared by the daemons and the demo.
pub mod signals;
/// Logging set-up shared by every binary.
pub mod telemetry;
/// In-process clusters on loopback for the demo, the tests and the benchmarks.
pub mod testkit;
