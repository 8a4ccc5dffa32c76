//! The programs as a user or a service manager sees them: exit status, standard output and
//! standard error of the real binaries. Broken pipes, `--json` without `-y`, one error style
//! across programs, and log lines in the form journald expects.
mod common;

use common::*;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const TLCTL: &str = env!("CARGO_BIN_EXE_tlctl");
const VSMCLIENT: &str = env!("CARGO_BIN_EXE_vsmclient");
const VSMAGENT: &str = env!("CARGO_BIN_EXE_vsmagent");
const VSMSERVER: &str = env!("CARGO_BIN_EXE_vsmserver");
const TL_CONFIG: &str = env!("CARGO_BIN_EXE_tl-config");

/// A pipe whose reader is already gone: the first write fails with EPIPE.
fn closed_pipe() -> Stdio {
    let (reader, writer) = nix::unistd::pipe().unwrap();
    drop(reader);
    Stdio::from(writer)
}

/// Runs a program the way a service manager or script would: no terminal, no inherited log
/// settings, standard input closed.
fn command(program: &str) -> Command {
    let mut c = Command::new(program);
    c.env_remove("RUST_LOG").env_remove("JOURNAL_STREAM").env_remove("NO_COLOR").env_remove("VSM_CONFIG_DIR");
    c.stdin(Stdio::null());
    c
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

async fn output(mut c: Command) -> Output {
    tokio::task::spawn_blocking(move || c.output().unwrap()).await.unwrap()
}

fn assert_no_panic(what: &str, out: &Output) {
    let err = text(&out.stderr);
    assert!(!err.contains("panicked"), "{what} panicked: {err}");
    assert_ne!(out.status.code(), Some(101), "{what} exited like a panic: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_goes_away_ends_the_tools_quietly() {
    init_logging();
    let dir = cluster_dir();
    let mut m = TestMaster::standalone(master_config(dir.path(), "master", &[])).await;
    let socket = m.cfg.vsmserver.socket_path.clone();

    for (name, program, args) in [
        ("tlctl session list", TLCTL, vec!["session", "list"]),
        ("tlctl load list", TLCTL, vec!["load", "list"]),
        ("tlctl ha status", TLCTL, vec!["ha", "status"]),
        ("vsmclient list", VSMCLIENT, vec!["list"]),
    ] {
        let mut c = command(program);
        c.arg("--socket").arg(&socket).args(&args).stdout(closed_pipe());
        let out = output(c).await;
        assert_no_panic(name, &out);
        assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{name}: {:?} {}", out.status, text(&out.stderr));
        assert!(out.stderr.is_empty(), "{name} says nothing about it: {}", text(&out.stderr));
    }

    // tl-config reads files only: it must not panic either.
    let cfg_dir = dir.path().join("etc");
    std::fs::create_dir_all(&cfg_dir).unwrap();
    let mut c = command(TL_CONFIG);
    c.arg("--config-dir").arg(&cfg_dir).args(["-Ra", "/"]).stdout(closed_pipe());
    assert_no_panic("tl-config -Ra /", &output(c).await);
    let mut c = command(TLCTL);
    c.arg("--help").stdout(closed_pipe());
    assert_no_panic("tlctl --help", &output(c).await);
    m.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_terminate_never_prompts() {
    init_logging();
    let dir = cluster_dir();
    let mut m = TestMaster::standalone(master_config(dir.path(), "master", &[])).await;
    let socket = m.cfg.vsmserver.socket_path.clone();

    // Without -y: refused before anything is asked of the master, nothing on stdout.
    let mut c = command(TLCTL);
    c.arg("--socket").arg(&socket).args(["session", "terminate", "--user", "alice", "--json"]);
    let out = output(c).await;
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.starts_with("tlctl: --json cannot ask for confirmation: add -y"), "{err}");
    assert!(out.stdout.is_empty(), "no table, no prompt: {}", text(&out.stdout));

    // With -y: exactly one JSON document.
    let mut c = command(TLCTL);
    c.arg("--socket").arg(&socket).args(["session", "terminate", "--user", "alice", "--json", "-y"]);
    let out = output(c).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stdout is one JSON document");
    assert!(v.get("terminated").is_some(), "{v}");
    m.stop().await;
}

/// A configuration directory for a daemon that fails to bind `port` on loopback after it has
/// loaded its configuration and set up logging.
fn daemon_dir(base: &Path, daemon: &str, port: u16, extra: &str) -> PathBuf {
    let dir = base.join(daemon);
    std::fs::create_dir_all(&dir).unwrap();
    let body = match daemon {
        "vsmagent" => format!("[vsmagent]\nlisten_address = \"127.0.0.1\"\nlisten_port = {port}\n{extra}"),
        _ => format!(
            "[vsmserver]\nlisten_address = \"127.0.0.1\"\nlisten_port = {port}\nhttp_port = 0\n\
             socket_path = \"{}\"\ndata_dir = \"{}\"\n{extra}",
            dir.join("vsmserver.sock").display(),
            dir.join("data").display()
        ),
    };
    std::fs::write(dir.join(format!("{daemon}.toml")), body).unwrap();
    dir
}

/// Runs a daemon with stderr in a file, optionally announced as the journal the way systemd
/// does (`JOURNAL_STREAM=<device>:<inode>` of stderr); returns the exit code and stderr.
fn run_daemon(program: &str, dir: &Path, args: &[&str], journal: bool) -> (Option<i32>, String) {
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut c = command(program);
    c.arg("--config-dir").arg(dir).args(args).stdout(Stdio::null()).stderr(log.reopen().unwrap());
    if journal {
        let st = nix::sys::stat::fstat(std::os::fd::AsRawFd::as_raw_fd(log.as_file())).unwrap();
        c.env("JOURNAL_STREAM", format!("{}:{}", st.st_dev, st.st_ino));
    }
    let status = c.status().unwrap();
    (status.code(), std::fs::read_to_string(log.path()).unwrap())
}

#[test]
fn daemons_speak_the_journal_when_stderr_is_the_journal() {
    let base = tempfile::tempdir().unwrap();
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    for daemon in ["vsmagent", "vsmserver"] {
        let program = if daemon == "vsmagent" { VSMAGENT } else { VSMSERVER };
        let dir = daemon_dir(base.path(), daemon, port, "");

        let (code, err) = run_daemon(program, &dir, &[], true);
        assert_eq!(code, Some(1), "{daemon}: {err}");
        assert!(!err.contains('\x1b'), "{daemon}: no colour in the journal: {err:?}");
        assert!(
            err.lines().any(|l| l.starts_with("<6>") && l.contains("configuration loaded")),
            "{daemon}: info lines carry priority 6: {err}"
        );
        let fatal = err.lines().last().unwrap_or_default();
        assert!(fatal.starts_with(&format!("<3>{daemon}: cannot listen on ")), "{daemon}: {err}");
        assert!(fatal.contains(&format!("127.0.0.1:{port}")), "{daemon} names the configured address: {fatal}");

        // The same to a file: plain text, no priorities, no colour.
        let (code, err) = run_daemon(program, &dir, &[], false);
        assert_eq!(code, Some(1), "{daemon}: {err}");
        assert!(!err.contains('\x1b') && !err.contains("<6>") && !err.contains("<3>"), "{daemon}: {err:?}");
        assert!(err.contains("configuration loaded"), "{daemon}: {err}");
        assert!(err.lines().last().unwrap_or_default().starts_with(&format!("{daemon}: cannot listen on ")), "{err}");

        // JSON in the journal: the priority, then one JSON object.
        let (_, err) = run_daemon(program, &dir, &["--log-json"], true);
        let line = err.lines().find(|l| l.contains("configuration loaded")).unwrap_or_else(|| panic!("{err}"));
        let json = line.strip_prefix("<6>").unwrap_or_else(|| panic!("{daemon}: {line}"));
        let v: serde_json::Value = serde_json::from_str(json).unwrap_or_else(|e| panic!("{daemon}: {e}: {json}"));
        assert_eq!(v["level"], "INFO", "{v}");
    }
    drop(busy);
}

#[test]
fn logging_keys_and_flags_are_the_same_on_both_daemons() {
    let base = tempfile::tempdir().unwrap();
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    for daemon in ["vsmagent", "vsmserver"] {
        let program = if daemon == "vsmagent" { VSMAGENT } else { VSMSERVER };
        // /<daemon>/logging/defaultlevel = warning hides info lines; the fatal error still shows.
        let extra = format!("[{daemon}.logging]\ndefaultlevel = \"WARNING\"\n");
        let quiet = daemon_dir(&base.path().join("quiet"), daemon, port, &extra);
        let (code, err) = run_daemon(program, &quiet, &[], false);
        assert_eq!(code, Some(1), "{daemon}: {err}");
        assert!(!err.contains("configuration loaded"), "{daemon}: defaultlevel=warning: {err}");
        assert!(err.contains(&format!("{daemon}: cannot listen on")), "{err}");
        // --log-level wins over the key; -v too.
        let (_, err) = run_daemon(program, &quiet, &["--log-level", "info"], false);
        assert!(err.contains("configuration loaded"), "{daemon}: --log-level info: {err}");
        let (_, err) = run_daemon(program, &quiet, &["-v"], false);
        assert!(err.contains("configuration loaded"), "{daemon}: -v: {err}");

        // /<daemon>/logging/json = true: JSON lines without the flag.
        let json = daemon_dir(&base.path().join("json"), daemon, port, &format!("[{daemon}.logging]\njson = true\n"));
        let (_, err) = run_daemon(program, &json, &[], false);
        let line = err.lines().find(|l| l.contains("configuration loaded")).unwrap_or_else(|| panic!("{err}"));
        serde_json::from_str::<serde_json::Value>(line).unwrap_or_else(|e| panic!("{daemon}: {e}: {line}"));

        // A bad --log-level is refused with the value, in the program's own error style.
        let (code, err) = run_daemon(program, &quiet, &["--log-level", "vsm=loud"], false);
        assert_eq!(code, Some(2), "{daemon}: {err}");
        assert!(err.starts_with(&format!("{daemon}: bad log level \"vsm=loud\"")), "{err}");
    }
    drop(busy);
}

#[test]
fn daemons_report_errors_in_one_style() {
    for daemon in ["vsmagent", "vsmserver"] {
        let program = if daemon == "vsmagent" { VSMAGENT } else { VSMSERVER };
        let (code, err) = run_daemon(program, Path::new("/nonexistent/vsm-config"), &[], false);
        assert_eq!(code, Some(1), "{daemon}: {err}");
        assert!(err.starts_with(&format!("{daemon}: invalid configuration in /nonexistent/vsm-config")), "{err}");
        assert!(!err.contains("Error:") && !err.contains("Caused by"), "{daemon}: {err}");
    }
}

/// A configuration directory with HA on whose secret file cannot be read, and the socket path
/// moved away from the default.
fn ha_dir_without_secret(base: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let dir = base.join("etc");
    std::fs::create_dir_all(&dir).unwrap();
    let secret = base.join("missing/ha.key");
    let socket = base.join("elsewhere.sock");
    std::fs::write(
        dir.join("ha.toml"),
        format!(
            "[HA]\nenabled = true\nnodes = [\"tlha-primary\", \"tlha-secondary\"]\nsecret_file = \"{}\"\n",
            secret.display()
        ),
    )
    .unwrap();
    std::fs::write(dir.join("cluster.toml"), "[subclusters.default]\nagents = [\"192.0.2.10\"]\n").unwrap();
    std::fs::write(dir.join("vsmserver.toml"), format!("[vsmserver]\nsocket_path = \"{}\"\n", socket.display()))
        .unwrap();
    (dir, secret, socket)
}

#[test]
fn daemons_refuse_an_unreadable_secret_that_clients_never_read() {
    let base = tempfile::tempdir().unwrap();
    let (dir, secret, socket) = ha_dir_without_secret(base.path());
    for daemon in ["vsmagent", "vsmserver"] {
        let program = if daemon == "vsmagent" { VSMAGENT } else { VSMSERVER };
        let (code, err) = run_daemon(program, &dir, &[], false);
        assert_eq!(code, Some(1), "{daemon}: {err}");
        assert!(err.starts_with(&format!("{daemon}: invalid configuration in {}:\n", dir.display())), "{err}");
        let located = format!(
            "{}:4: /HA/secret_file: secret file {} cannot be read",
            dir.join("ha.toml").display(),
            secret.display()
        );
        assert!(err.contains(&located), "{daemon}: {err}");
    }
    // tl-config --check is the daemons' check, with the same line.
    let mut c = command(TL_CONFIG);
    c.arg("--config-dir").arg(&dir).arg("--check");
    let out = c.output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("/HA/secret_file: secret file"), "{}", text(&out.stderr));
    // Clients only load: they find the configured socket and say nothing of the secret.
    for (name, program, args) in
        [("vsmclient list", VSMCLIENT, vec!["list"]), ("tlctl session list", TLCTL, vec!["session", "list"])]
    {
        let mut c = command(program);
        c.env("VSM_CONFIG_DIR", &dir).env_remove("VSM_SOCKET").args(&args);
        let out = c.output().unwrap();
        let err = text(&out.stderr);
        assert_no_panic(name, &out);
        assert!(err.contains(&format!("cannot reach vsmserver at {}", socket.display())), "{name}: {err}");
        assert!(!err.contains("secret"), "{name}: {err}");
    }
}
