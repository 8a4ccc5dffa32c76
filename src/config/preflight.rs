//! Preflight: the checks of a loaded configuration that need the machine, run by the daemons
//! (`vsmserver`, `vsmagent`) before they start and by `tl-config` when it validates.
//!
//! Owns: resolving agent names over DNS (with HA on, an agent whose name means this machine is
//! a different machine on each master) and checking that the HA secret file can be read and is
//! long enough.
//! Never: parses configuration files (that is [`super::load`], which stays free of DNS and
//! secret reading so clients such as `vsmclient` can find their socket without either), or
//! keeps the secret it looked at (the daemons read their secrets themselves).
//!
//! Invariants:
//! - Every problem is reported, each naming its key path and, for files, the file.
//! - A name that does not resolve in time is not an error (agents may be down at start-up);
//!   only a name resolving to a loopback address is.
//! - Resolution is bounded: a dead DNS server delays preflight by a few seconds at most.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::load::{ConfigErrors, Settings};
use super::Config;

/// Resolves host names to addresses (the system resolver, or a fake in tests).
pub type Resolver<'a> = &'a dyn Fn(&[String]) -> HashMap<String, Vec<IpAddr>>;

/// The shortest HA secret accepted, in bytes.
pub const MIN_SECRET_LEN: u64 = 16;

/// How long all agent names together may take to resolve.
const RESOLVE_DEADLINE: Duration = Duration::from_secs(3);

/// One problem found by preflight.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PreflightError {
    /// With HA on, an agent name resolves to a loopback address on this machine.
    #[error("{path}: {}", loopback_reason(agent, address))]
    LoopbackAgent { path: String, agent: String, address: IpAddr },
    /// The HA secret file cannot be opened.
    #[error("/HA/secret_file: {}", secret_unreadable(file, reason))]
    SecretUnreadable { file: PathBuf, reason: String },
    /// The HA secret file is shorter than [`MIN_SECRET_LEN`].
    #[error("/HA/secret_file: {}", secret_short(file, *len))]
    SecretTooShort { file: PathBuf, len: u64 },
}

impl PreflightError {
    /// The key path the problem is about.
    pub fn path(&self) -> &str {
        match self {
            PreflightError::LoopbackAgent { path, .. } => path,
            PreflightError::SecretUnreadable { .. } | PreflightError::SecretTooShort { .. } => "/HA/secret_file",
        }
    }

    /// What is wrong, without the key path.
    pub fn reason(&self) -> String {
        match self {
            PreflightError::LoopbackAgent { agent, address, .. } => loopback_reason(agent, address),
            PreflightError::SecretUnreadable { file, reason } => secret_unreadable(file, reason),
            PreflightError::SecretTooShort { file, len } => secret_short(file, *len),
        }
    }
}

fn loopback_reason(agent: &str, address: &IpAddr) -> String {
    format!(
        "agent {agent} resolves to the loopback address {address} on this machine (if it is this machine's own name mapped to 127.0.1.1 in /etc/hosts, map it to the real address instead); {}",
        super::load::HA_LOOPBACK_HINT
    )
}

fn secret_hint(file: &std::path::Path) -> String {
    format!(
        "with /HA/enabled true both masters need the same secret: create it with `head -c 32 /dev/urandom > {0} && chmod 600 {0}` and copy it to the other master",
        file.display()
    )
}

fn secret_unreadable(file: &std::path::Path, reason: &str) -> String {
    format!("secret file {} cannot be read ({reason}); {}", file.display(), secret_hint(file))
}

fn secret_short(file: &std::path::Path, len: u64) -> String {
    format!(
        "secret file {} holds {len} bytes, expected at least {MIN_SECRET_LEN}; {}",
        file.display(),
        secret_hint(file)
    )
}

/// Every problem preflight found; displays one per line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PreflightErrors(pub Vec<PreflightError>);

impl fmt::Display for PreflightErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        super::load::write_lines(f, &self.0)
    }
}

impl std::error::Error for PreflightErrors {}

/// Checks `config` against this machine, resolving names with the system resolver.
pub fn preflight(config: &Config) -> Result<(), PreflightErrors> {
    preflight_with(config, &system_resolve)
}

/// [`preflight`] with an explicit resolver (name → addresses), for tests.
pub fn preflight_with(config: &Config, resolve: Resolver<'_>) -> Result<(), PreflightErrors> {
    let mut errors = Vec::new();
    if config.ha.enabled {
        check_agent_names(config, resolve, &mut errors);
        check_ha_secret(config, &mut errors);
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(PreflightErrors(errors))
    }
}

/// Loads the configuration directory `dir` and runs preflight on it with the system resolver,
/// every problem located at the file and line that set its key: what `vsmserver` and
/// `vsmagent` run before they start and `tl-config --check` runs. Clients use
/// [`super::load`] instead, which resolves no name and reads no secret.
pub fn load_checked(dir: &Path) -> Result<Config, ConfigErrors> {
    build_checked(&Settings::read_dir(dir)?, &system_resolve)
}

/// Builds `settings` and runs preflight on the result, with every problem of both kinds
/// located at the file and line that set its key: what [`load_checked`] and `tl-config`
/// (before it writes) check.
pub fn build_checked(settings: &Settings, resolve: Resolver<'_>) -> Result<Config, ConfigErrors> {
    let (config, mut errors) = settings.build_all();
    if let Err(PreflightErrors(found)) = preflight_with(&config, resolve) {
        errors.extend(found.iter().map(|e| settings.rule(e.path(), e.reason())));
    }
    if errors.is_empty() {
        Ok(config)
    } else {
        Err(ConfigErrors(errors))
    }
}

fn check_agent_names(c: &Config, resolve: Resolver<'_>, errors: &mut Vec<PreflightError>) {
    let mut names: Vec<String> = Vec::new();
    for agent in c.subclusters.values().flat_map(|s| &s.agents) {
        // Literal addresses and loopback names are the loader's business (no lookup needed).
        if agent.parse::<IpAddr>().is_err() && !super::load::is_loopback_name(agent) && !names.contains(agent) {
            names.push(agent.clone());
        }
    }
    if names.is_empty() {
        return;
    }
    let resolved = resolve(&names);
    for (name, s) in &c.subclusters {
        for agent in &s.agents {
            if let Some(ip) = resolved.get(agent).and_then(|ips| ips.iter().find(|ip| super::load::is_loopback(**ip))) {
                errors.push(PreflightError::LoopbackAgent {
                    path: format!("/subclusters/{name}/agents"),
                    agent: agent.clone(),
                    address: *ip,
                });
            }
        }
    }
}

fn check_ha_secret(c: &Config, errors: &mut Vec<PreflightError>) {
    let file = c.ha.secret_file.clone();
    let unreadable = |e: std::io::Error| PreflightError::SecretUnreadable { file: file.clone(), reason: e.to_string() };
    match std::fs::metadata(&file).and_then(|_| std::fs::File::open(&file)).and_then(|f| f.metadata()) {
        Err(e) => errors.push(unreadable(e)),
        Ok(m) if m.len() < MIN_SECRET_LEN => {
            errors.push(PreflightError::SecretTooShort { file: file.clone(), len: m.len() })
        }
        Ok(_) => {}
    }
}

/// Resolves names with the system resolver, in parallel, giving up after a few seconds so a
/// dead DNS server cannot hang start-up. Names that do not resolve in time are left out.
pub fn system_resolve(names: &[String]) -> HashMap<String, Vec<IpAddr>> {
    let (tx, rx) = mpsc::channel();
    for name in names {
        let tx = tx.clone();
        let name = name.clone();
        std::thread::spawn(move || {
            let ips: Vec<IpAddr> =
                (name.as_str(), 0u16).to_socket_addrs().map(|it| it.map(|sa| sa.ip()).collect()).unwrap_or_default();
            let _ = tx.send((name, ips));
        });
    }
    drop(tx);
    let deadline = Instant::now() + RESOLVE_DEADLINE;
    let mut out = HashMap::new();
    while out.len() < names.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((name, ips)) => {
                out.insert(name, ips);
            }
            Err(_) => break,
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load::{load, Source};
    use std::path::Path;

    fn no_dns(_: &[String]) -> HashMap<String, Vec<IpAddr>> {
        HashMap::new()
    }

    fn to_loopback(names: &[String]) -> HashMap<String, Vec<IpAddr>> {
        names.iter().map(|n| (n.clone(), vec!["127.0.1.1".parse().unwrap()])).collect()
    }

    /// A configuration directory with HA on, the agent `agents`, and the secret at `secret`.
    fn ha_dir(agents: &str, secret: &Path) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("ha.toml"),
            format!(
                "[HA]\nenabled = true\nnodes = [\"tlha-primary\", \"tlha-secondary\"]\nsecret_file = {:?}\n",
                secret.display().to_string()
            ),
        )
        .unwrap();
        std::fs::write(dir.path().join("cluster.toml"), format!("[subclusters.default]\nagents = {agents}\n")).unwrap();
        std::fs::write(dir.path().join("vsmserver.toml"), "[vsmserver]\nsocket_path = \"/run/elsewhere.sock\"\n")
            .unwrap();
        dir
    }

    #[test]
    fn loading_needs_neither_dns_nor_the_secret_but_preflight_does() {
        let keys = tempfile::tempdir().unwrap();
        let missing = keys.path().join("ha.key");
        let dir = ha_dir("[\"no-such-agent.invalid\"]", &missing);
        // A client only loads: no lookup, no secret, and the configured socket path.
        let c = load(dir.path()).unwrap();
        assert_eq!(c.vsmserver.socket_path, PathBuf::from("/run/elsewhere.sock"));
        let resolver_called = std::cell::Cell::new(false);
        let spy = |names: &[String]| {
            resolver_called.set(true);
            no_dns(names)
        };
        let e = preflight_with(&c, &spy).unwrap_err();
        assert!(resolver_called.get(), "preflight resolves agent names");
        assert_eq!(e.0.len(), 1, "{e}");
        let msg = e.to_string();
        assert!(msg.starts_with("/HA/secret_file: secret file "), "{msg}");
        assert!(msg.contains(&missing.display().to_string()), "{msg}");
        assert!(msg.contains("cannot be read"), "{msg}");
        assert!(msg.contains(&format!("head -c 32 /dev/urandom > {}", missing.display())), "{msg}");
        // The same with the secret in place passes.
        std::fs::write(&missing, [7u8; 32]).unwrap();
        preflight_with(&c, &no_dns).unwrap();
    }

    #[test]
    fn clients_load_what_daemons_refuse_at_the_line_of_the_key() {
        let keys = tempfile::tempdir().unwrap();
        let missing = keys.path().join("ha.key");
        // A literal address: no lookup is needed, so none is made.
        let dir = ha_dir("[\"192.0.2.10\"]", &missing);
        assert!(load(dir.path()).is_ok(), "a client loads without the secret");
        let e = load_checked(dir.path()).unwrap_err().0;
        assert_eq!(e.len(), 1, "{e:?}");
        let want =
            format!("{}:4: /HA/secret_file: secret file {}", dir.path().join("ha.toml").display(), missing.display());
        assert!(e[0].to_string().starts_with(&want), "{}", e[0]);
    }

    #[test]
    fn an_unreadable_secret_is_named_with_its_key() {
        let keys = tempfile::tempdir().unwrap();
        let file = keys.path().join("ha.key");
        std::fs::write(&file, [7u8; 32]).unwrap();
        std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o000)).unwrap();
        let dir = ha_dir("[\"agent1\"]", &file);
        let c = load(dir.path()).unwrap();
        if std::fs::File::open(&file).is_ok() {
            // Root reads any file: only the missing-file case above applies.
            return;
        }
        let e = preflight_with(&c, &no_dns).unwrap_err();
        assert!(matches!(&e.0[..], [PreflightError::SecretUnreadable { file: f, .. }] if *f == file), "{e}");
        assert_eq!(e.0[0].path(), "/HA/secret_file");
    }

    #[test]
    fn short_secrets_and_loopback_names_are_refused() {
        let keys = tempfile::tempdir().unwrap();
        let file = keys.path().join("ha.key");
        std::fs::write(&file, b"short").unwrap();
        let dir = ha_dir("[\"myself\", \"agent2\"]", &file);
        let c = load(dir.path()).unwrap();
        let e = preflight_with(&c, &|names: &[String]| {
            to_loopback(&names.iter().filter(|n| *n == "myself").cloned().collect::<Vec<_>>())
        })
        .unwrap_err();
        let lines: Vec<String> = e.0.iter().map(|e| e.to_string()).collect();
        assert_eq!(lines.len(), 2, "{lines:#?}");
        assert!(
            lines[0]
                .starts_with("/subclusters/default/agents: agent myself resolves to the loopback address 127.0.1.1"),
            "{lines:#?}"
        );
        assert!(lines[0].contains("use the agent's unique host name or address"), "{lines:#?}");
        assert!(lines[1].contains("holds 5 bytes, expected at least 16"), "{lines:#?}");
    }

    #[test]
    fn without_ha_nothing_is_resolved_or_read() {
        let c = Config::default();
        preflight_with(&c, &|_: &[String]| panic!("no lookup without HA")).unwrap();
    }

    #[test]
    fn located_errors_name_the_file_that_set_the_key() {
        let keys = tempfile::tempdir().unwrap();
        let file = keys.path().join("ha.key");
        let sources = [Source {
            file: "/cfg/ha.toml".into(),
            text: format!("[HA]\nenabled = true\nsecret_file = {:?}\n", file.display().to_string()),
        }];
        let settings = Settings::from_sources(Path::new("/cfg"), &sources);
        let e = build_checked(&settings, &no_dns).unwrap_err().0;
        // The built-in default subcluster is 127.0.0.1: the loader's error comes first.
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(e[0].to_string().contains("agent 127.0.0.1 is a loopback address"), "{}", e[0]);
        assert!(e[1].to_string().starts_with("/cfg/ha.toml:3: /HA/secret_file: secret file"), "{}", e[1]);
    }
}
