//! Logging set-up is global to a process, so it is tested in a process of its own.

#[test]
fn init_twice_is_harmless() {
    vsm::telemetry::init(0, false);
    vsm::telemetry::init(2, true);
    tracing::info!(session_id = "s1", user = "alice", "telemetry test event");
}
