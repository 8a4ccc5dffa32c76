//! Session hook scripts: every executable file in the startup (or reconnect) directory runs,
//! in name order, on the master, synchronously before the client is answered.
//!
//! Invariants: a hook never blocks a login for longer than its timeout; a failing hook is
//! logged and never fails the login (the session already exists on the agent); hooks get the
//! session's facts in `VSM_*` environment variables and no shell is involved in running them;
//! `VSM_CLIENT_ADDRESS` is an IP address, a host name, or empty, never anything else.

use crate::model::Session;
use std::path::Path;
use std::time::Duration;
use tokio::process::Command;

/// Which event the hooks run for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HookEvent {
    Startup,
    Reconnect,
}

impl HookEvent {
    fn as_str(self) -> &'static str {
        match self {
            HookEvent::Startup => "startup",
            HookEvent::Reconnect => "reconnect",
        }
    }
}

/// Runs every executable regular file in `dir` (sorted by name); returns how many ran
/// successfully. A missing directory means no hooks.
pub async fn run_hooks(dir: &Path, event: HookEvent, session: &Session, timeout: Duration) -> usize {
    let mut entries = match std::fs::read_dir(dir) {
        Ok(rd) => rd.filter_map(|e| e.ok()).map(|e| e.path()).collect::<Vec<_>>(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return 0,
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot read hook directory");
            return 0;
        }
    };
    entries.sort();
    let mut ok = 0;
    for path in entries {
        if !is_executable_file(&path) {
            continue;
        }
        let mut cmd = Command::new(&path);
        cmd.env("VSM_HOOK", event.as_str())
            .env("VSM_SESSION_ID", &session.id.0)
            .env("VSM_USER", &session.user)
            .env("VSM_AGENT", &session.agent)
            .env("VSM_AGENT_ADDRESS", &session.agent_address)
            .env("VSM_DISPLAY", session.display.to_string())
            .env("VSM_VNC_PORT", session.vnc_port.to_string())
            .env("VSM_SUBCLUSTER", &session.subcluster)
            .env("VSM_CLIENT_ADDRESS", hook_client_address(&session.last_client_address))
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        match tokio::time::timeout(timeout, cmd.output()).await {
            Ok(Ok(out)) if out.status.success() => ok += 1,
            Ok(Ok(out)) => tracing::warn!(
                hook = %path.display(), status = %out.status, session_id = %session.id,
                stderr = %String::from_utf8_lossy(&out.stderr).trim(),
                "session hook failed"
            ),
            Ok(Err(e)) => tracing::warn!(hook = %path.display(), error = %e, "cannot run session hook"),
            Err(_) => tracing::warn!(
                hook = %path.display(), timeout_ms = timeout.as_millis() as u64,
                "session hook timed out and was killed"
            ),
        }
    }
    ok
}

/// The client address as hooks see it: an IP address or a host name, else empty. The API
/// refuses anything else, but a record may come from an older peer or an import.
fn hook_client_address(a: &str) -> &str {
    if crate::model::valid_client_address(a) {
        a
    } else {
        ""
    }
}

fn is_executable_file(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::metadata(path) {
        Ok(m) => m.is_file() && m.permissions().mode() & 0o111 != 0,
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{SessionId, SessionStatus};
    use std::os::unix::fs::PermissionsExt;

    fn session() -> Session {
        Session {
            id: SessionId("s1".into()),
            user: "alice".into(),
            subcluster: "default".into(),
            agent: "a1".into(),
            agent_address: "10.0.0.1".into(),
            display: 10,
            vnc_port: 5910,
            status: SessionStatus::Running,
            created_ms: 0,
            last_connect_ms: 0,
            last_client_address: "".into(),
            pid: 1,
            command: vec![],
            geometry: "1024x768".into(),
            client_params: vec![],
        }
    }

    fn script(dir: &Path, name: &str, body: &str) {
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[tokio::test]
    async fn hooks_run_in_order_with_session_environment() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        script(dir.path(), "10-first", &format!("echo \"1 $VSM_USER $VSM_DISPLAY $VSM_HOOK\" >> {}", out.display()));
        script(dir.path(), "20-second", &format!("echo 2 >> {}", out.display()));
        std::fs::write(dir.path().join("30-not-executable"), "exit 1").unwrap();
        let n = run_hooks(dir.path(), HookEvent::Startup, &session(), Duration::from_secs(5)).await;
        assert_eq!(n, 2);
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "1 alice 10 startup\n2\n");
    }

    #[tokio::test]
    async fn hooks_see_only_a_valid_client_address() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        script(dir.path(), "10-addr", &format!("printf '%s\\n' \"[$VSM_CLIENT_ADDRESS]\" >> {}", out.display()));
        for a in ["192.0.2.7", "$(id)", "ws1.example.com"] {
            let s = Session { last_client_address: a.into(), ..session() };
            assert_eq!(run_hooks(dir.path(), HookEvent::Reconnect, &s, Duration::from_secs(5)).await, 1);
        }
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "[192.0.2.7]\n[]\n[ws1.example.com]\n");
    }

    #[tokio::test]
    async fn failing_and_hanging_hooks_do_not_block() {
        let dir = tempfile::tempdir().unwrap();
        script(dir.path(), "a", "exit 3");
        script(dir.path(), "b", "sleep 30");
        let n = run_hooks(dir.path(), HookEvent::Reconnect, &session(), Duration::from_millis(300)).await;
        assert_eq!(n, 0);
    }

    #[tokio::test]
    async fn missing_directory_means_no_hooks() {
        let n = run_hooks(Path::new("/nonexistent/vsm-hooks"), HookEvent::Startup, &session(), Duration::from_secs(1))
            .await;
        assert_eq!(n, 0);
    }
}
