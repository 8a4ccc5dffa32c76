//! Loading: configuration files (raw TOML) → [`Settings`] (canonical path → typed value, with
//! where it came from) → validated [`Config`].
//!
//! Owns: reading the configuration directory, flattening TOML tables into key paths, the
//! "defined in two files" rule, and every rule that spans several keys.
//! Never: writes files (that is `edit.rs`), decides which HA node is local (the HA module
//! does that at start-up; an undecidable node is not a configuration error), resolves a name
//! or reads a secret (that is [`super::preflight`], which only the daemons and `tl-config`
//! run): loading is the same on every machine and for every user who can read the files.
//!
//! Invariants:
//! - [`Settings::build`] returns either a fully validated `Config` or every problem found;
//!   one bad key never hides another.
//! - Every error names the file (and line when known), the key path, the bad value and what
//!   was expected.
//! - Alias paths are rewritten to canonical ones while flattening; nothing downstream sees them.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use super::keys::{self, KeyMatch, LookupError, Wildcard, KEYS};
use super::value::Value;
use super::Config;

/// Where a setting was read: a file and, when known, a line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    pub file: PathBuf,
    pub line: Option<usize>,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{line}", self.file.display()),
            None => write!(f, "{}", self.file.display()),
        }
    }
}

/// One configuration problem.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration directory {} does not exist", dir.display())]
    MissingDir { dir: PathBuf },
    #[error("{}: cannot read: {reason}", file.display())]
    Io { file: PathBuf, reason: String },
    #[error("{}: not valid TOML: {reason}", file.display())]
    Syntax { file: PathBuf, reason: String },
    #[error("{at}: {}", lookup)]
    UnknownKey { at: Location, lookup: LookupError },
    #[error("{at}: {path}: bad value {value}: expected {expected}")]
    BadValue { at: Location, path: String, value: String, expected: String },
    #[error("{path} is defined twice: in {first} and in {second}; keep only one")]
    Duplicate { path: String, first: Location, second: Location },
    #[error("{}{path}: {message}", at.as_ref().map(|a| format!("{a}: ")).unwrap_or_default())]
    Rule { at: Option<Location>, path: String, message: String },
}

impl ConfigError {
    /// The canonical key path this error is about, if it is about one key.
    pub fn path(&self) -> Option<&str> {
        match self {
            ConfigError::UnknownKey { lookup: LookupError::Unknown { path, .. }, .. } => Some(path),
            ConfigError::BadValue { path, .. }
            | ConfigError::Duplicate { path, .. }
            | ConfigError::Rule { path, .. } => Some(path),
            _ => None,
        }
    }

    /// The message without line numbers: stays the same when unrelated lines move, so the
    /// editor can tell problems it introduced from problems that were already there.
    pub fn identity(&self) -> String {
        let mut e = self.clone();
        let strip = |l: &mut Location| l.line = None;
        match &mut e {
            ConfigError::UnknownKey { at, .. } | ConfigError::BadValue { at, .. } => strip(at),
            ConfigError::Duplicate { first, second, .. } => {
                strip(first);
                strip(second)
            }
            ConfigError::Rule { at: Some(at), .. } => strip(at),
            _ => {}
        }
        e.to_string()
    }
}

/// Every problem of a configuration; displays one problem per line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_lines(f, &self.0)
    }
}

/// Writes `items` one per line (no newline after the last): how every list of problems shows.
pub(crate) fn write_lines<T: fmt::Display>(f: &mut fmt::Formatter<'_>, items: &[T]) -> fmt::Result {
    for (i, e) in items.iter().enumerate() {
        if i > 0 {
            writeln!(f)?;
        }
        write!(f, "{e}")?;
    }
    Ok(())
}

impl std::error::Error for ConfigErrors {}

impl From<ConfigError> for ConfigErrors {
    fn from(e: ConfigError) -> Self {
        ConfigErrors(vec![e])
    }
}

/// The text of one configuration file.
#[derive(Clone, Debug)]
pub struct Source {
    pub file: PathBuf,
    pub text: String,
}

/// One key set in a file.
#[derive(Clone, Debug)]
pub struct Entry {
    pub key: KeyMatch,
    pub value: Value,
    pub at: Location,
    /// Not from a file: the built-in default subcluster.
    pub builtin: bool,
}

/// The file name shown for built-in settings.
pub const BUILTIN: &str = "(built-in default)";

/// The raw settings of a configuration directory: canonical path → value, before the rules
/// between keys are checked.
#[derive(Clone, Debug)]
pub struct Settings {
    dir: PathBuf,
    entries: BTreeMap<String, Entry>,
    /// Problems found while reading (syntax, unknown keys, bad values, duplicates).
    errors: Vec<ConfigError>,
}

/// Lists the configuration files of `dir`: regular `*.toml` files not starting with `.`,
/// sorted by name. A missing directory is an error.
pub fn config_files(dir: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ConfigError::MissingDir { dir: dir.to_path_buf() })
        }
        Err(e) => return Err(ConfigError::Io { file: dir.to_path_buf(), reason: e.to_string() }),
    };
    let mut files = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| ConfigError::Io { file: dir.to_path_buf(), reason: e.to_string() })?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') || !name.ends_with(".toml") {
            continue;
        }
        let path = entry.path();
        if path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Reads the sources of `dir`; unreadable files become errors.
pub fn read_sources(dir: &Path) -> Result<(Vec<Source>, Vec<ConfigError>), ConfigError> {
    let mut sources = Vec::new();
    let mut errors = Vec::new();
    for file in config_files(dir)? {
        match std::fs::read_to_string(&file) {
            Ok(text) => sources.push(Source { file, text }),
            Err(e) => errors.push(ConfigError::Io { file, reason: e.to_string() }),
        }
    }
    Ok((sources, errors))
}

/// Loads and validates the configuration directory `dir`. A missing directory is an error
/// (daemons must not start on defaults because of a typo in `--config-dir`); an empty one
/// means all defaults.
pub fn load(dir: &Path) -> Result<Config, ConfigErrors> {
    Settings::read_dir(dir)?.build()
}

fn line_of(text: &str, span: Option<std::ops::Range<usize>>) -> Option<usize> {
    let start = span?.start;
    Some(text.get(..start)?.matches('\n').count() + 1)
}

impl Settings {
    /// Reads every configuration file of `dir`.
    pub fn read_dir(dir: &Path) -> Result<Settings, ConfigError> {
        let (sources, errors) = read_sources(dir)?;
        let mut s = Settings::from_sources(dir, &sources);
        s.errors.splice(0..0, errors);
        Ok(s)
    }

    /// Builds settings from file texts; `dir` resolves relative secret-file paths.
    pub fn from_sources(dir: &Path, sources: &[Source]) -> Settings {
        let mut s = Settings { dir: dir.to_path_buf(), entries: BTreeMap::new(), errors: Vec::new() };
        let mut saw_subcluster = false;
        for src in sources {
            let doc = match toml_edit::ImDocument::parse(src.text.as_str()) {
                Ok(doc) => doc,
                Err(e) => {
                    let reason = match line_of(&src.text, e.span()) {
                        Some(l) => format!("line {l}: {}", e.message()),
                        None => e.message().to_string(),
                    };
                    s.errors.push(ConfigError::Syntax { file: src.file.clone(), reason });
                    // A broken file may define subclusters; don't invent the built-in one.
                    saw_subcluster = true;
                    continue;
                }
            };
            s.flatten(src, doc.as_table(), &mut Vec::new(), &mut saw_subcluster);
        }
        if !saw_subcluster {
            if let Ok(key) = keys::lookup("/subclusters/default/agents") {
                s.entries.insert(
                    key.path.clone(),
                    Entry {
                        key,
                        value: Value::List(vec!["127.0.0.1".into()]),
                        at: Location { file: BUILTIN.into(), line: None },
                        builtin: true,
                    },
                );
            }
        }
        s
    }

    fn flatten(
        &mut self,
        src: &Source,
        table: &dyn toml_edit::TableLike,
        prefix: &mut Vec<String>,
        saw_subcluster: &mut bool,
    ) {
        for (name, item) in table.iter() {
            let span = table.get_key_value(name).and_then(|(k, _)| k.span()).or_else(|| item.span());
            let at = Location { file: src.file.clone(), line: line_of(&src.text, span) };
            prefix.push(name.to_string());
            let raw_path = format!("/{}", prefix.join("/"));
            let canon = keys::canonical(&raw_path).map(|(c, _)| c).unwrap_or(raw_path.clone());
            if canon.starts_with("/subclusters/") || canon == "/subclusters" {
                *saw_subcluster = true;
            }
            if name.contains('/') || name.is_empty() || name.chars().any(char::is_whitespace) {
                self.errors.push(ConfigError::BadValue {
                    at,
                    path: raw_path.clone(),
                    value: format!("{name:?}"),
                    expected: "a key name without '/' or whitespace".into(),
                });
            } else if let Some(sub) = item.as_table_like() {
                match keys::lookup(&canon) {
                    Ok(key) => self.errors.push(ConfigError::BadValue {
                        at,
                        path: key.path,
                        value: "a table".into(),
                        expected: key.def.ty.expected(),
                    }),
                    Err(_) => self.flatten(src, sub, prefix, saw_subcluster),
                }
            } else if let Some(value) = item.as_value() {
                self.leaf(&canon, value, at);
            } else {
                self.errors.push(ConfigError::BadValue {
                    at,
                    path: canon,
                    value: "an array of tables".into(),
                    expected: "a key or a table".into(),
                });
            }
            prefix.pop();
        }
    }

    fn leaf(&mut self, canon: &str, value: &toml_edit::Value, at: Location) {
        let shown = value.clone().decorated("", "").to_string();
        let key = match keys::lookup(canon) {
            Ok(key) => key,
            Err(lookup) => {
                if keys::is_folder(canon) {
                    self.errors.push(ConfigError::BadValue {
                        at,
                        path: canon.to_string(),
                        value: shown,
                        expected: "a table (this is a folder)".into(),
                    });
                } else {
                    self.errors.push(ConfigError::UnknownKey { at, lookup });
                }
                return;
            }
        };
        if let Some(prev) = self.entries.get(&key.path) {
            self.errors.push(ConfigError::Duplicate { path: key.path.clone(), first: prev.at.clone(), second: at });
            return;
        }
        match key.def.ty.parse_toml(value) {
            Ok(v) => {
                self.entries.insert(key.path.clone(), Entry { key, value: v, at, builtin: false });
            }
            Err(expected) => self.errors.push(ConfigError::BadValue { at, path: key.path, value: shown, expected }),
        }
    }

    /// The configuration directory these settings were read from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Problems found while reading (before the rules between keys).
    pub fn read_errors(&self) -> &[ConfigError] {
        &self.errors
    }

    /// The entry set in a file (or built in) for a canonical path.
    pub fn entry(&self, canonical_path: &str) -> Option<&Entry> {
        self.entries.get(canonical_path)
    }

    /// All entries, by canonical path.
    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.values()
    }

    /// The value in effect for a path (canonical or alias): the configured one or the default.
    pub fn effective(&self, path: &str) -> Result<(KeyMatch, Value), LookupError> {
        let key = keys::lookup(path)?;
        let value = match self.entries.get(&key.path) {
            Some(e) => e.value.clone(),
            None => key.def.default_value(),
        };
        Ok((key, value))
    }

    /// Whether a wildcard key names something that exists: its subcluster, or for a weight, a
    /// host that is an agent of some subcluster (or has a weight set). `Err` says what is
    /// missing; keys without a wildcard always exist.
    pub fn exists(&self, key: &KeyMatch) -> Result<(), String> {
        match key.def.wildcard() {
            None => Ok(()),
            Some(Wildcard::Name) => {
                let names = self.subcluster_names();
                if names.contains(&key.wildcard) {
                    return Ok(());
                }
                let list: Vec<&str> = names.iter().map(String::as_str).collect();
                Err(format!("there is no subcluster {} (subclusters: {})", key.wildcard, list.join(" ")))
            }
            Some(Wildcard::Host) => {
                let is_agent = self.entries.values().any(|e| {
                    e.key.def.path == "/subclusters/<name>/agents"
                        && e.value.as_list().iter().any(|a| a.eq_ignore_ascii_case(&key.wildcard))
                });
                if is_agent || self.entries.contains_key(&key.path) {
                    Ok(())
                } else {
                    Err(format!("{} is not an agent of any subcluster", key.wildcard))
                }
            }
        }
    }

    /// Names of the subclusters in effect.
    pub fn subcluster_names(&self) -> BTreeSet<String> {
        self.instances(Wildcard::Name)
    }

    fn instances(&self, w: Wildcard) -> BTreeSet<String> {
        self.entries.values().filter(|e| e.key.def.wildcard() == Some(w)).map(|e| e.key.wildcard.clone()).collect()
    }

    /// Every key in effect as (canonical path, value, set in a file?), in key-table order:
    /// fixed keys, then for each subcluster all its keys, then every weight.
    pub fn effective_all(&self) -> Vec<(&'static keys::KeyDef, String, Value, Option<&Entry>)> {
        let mut out = Vec::new();
        for def in KEYS {
            let names: Vec<String> = match def.wildcard() {
                None => vec![String::new()],
                Some(Wildcard::Name) => self.subcluster_names().into_iter().collect(),
                Some(Wildcard::Host) => self.instances(Wildcard::Host).into_iter().collect(),
            };
            for n in names {
                let path = def.path.replace("<name>", &n).replace("<host>", &n);
                let entry = self.entries.get(&path);
                let value = entry.map(|e| e.value.clone()).unwrap_or_else(|| def.default_value());
                out.push((def, path, value, entry));
            }
        }
        out
    }

    fn at(&self, path: &str) -> Option<Location> {
        self.entries.get(path).map(|e| e.at.clone())
    }

    /// Validates everything and returns the `Config`. Pure: no name is resolved and no secret
    /// read (see [`super::preflight`]).
    pub fn build(&self) -> Result<Config, ConfigErrors> {
        let (c, errors) = self.build_all();
        if errors.is_empty() {
            Ok(c)
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// The `Config` as far as it could be built, with every problem found (none: it is valid).
    pub(crate) fn build_all(&self) -> (Config, Vec<ConfigError>) {
        let mut errors = self.errors.clone();
        let mut c = Config::default();
        c.subclusters.clear();
        c.agents.weights.clear();
        for def in KEYS.iter().filter(|d| d.wildcard().is_none()) {
            (def.apply)(&mut c, "", &def.default_value());
        }
        for e in self.entries.values() {
            (e.key.def.apply)(&mut c, &e.key.wildcard, &e.value);
        }
        for p in [&mut c.ha.secret_file, &mut c.vsm.secret_file] {
            if p.is_relative() {
                *p = self.dir.join(&*p);
            }
        }
        self.check_rules(&c, &mut errors);
        (c, errors)
    }

    /// A rule error about `path`, located where `path` is set.
    pub(crate) fn rule(&self, path: &str, message: String) -> ConfigError {
        ConfigError::Rule { at: self.at(path), path: path.to_string(), message }
    }

    fn check_rules(&self, c: &Config, errors: &mut Vec<ConfigError>) {
        let a = &c.vsmagent;
        if a.display_min >= a.display_max {
            errors.push(self.rule(
                "/vsmagent/display_min",
                format!("display_min {} must be less than /vsmagent/display_max {}", a.display_min, a.display_max),
            ));
        }
        let top = u32::from(c.vsm.vnc_port_base) + a.display_max;
        if top > 65535 {
            let path =
                if self.at("/vsmagent/display_max").is_some() { "/vsmagent/display_max" } else { "/vsm/vnc_port_base" };
            errors.push(self.rule(
                path,
                format!(
                    "/vsm/vnc_port_base {} + /vsmagent/display_max {} = {top}, above the highest port 65535; expected a sum of at most 65535",
                    c.vsm.vnc_port_base, a.display_max
                ),
            ));
        }
        if c.ha.peer_timeout <= c.ha.heartbeat_interval {
            errors.push(self.rule(
                "/HA/peer_timeout",
                format!(
                    "peer_timeout {} must be longer than /HA/heartbeat_interval {}",
                    super::value::format_duration(c.ha.peer_timeout),
                    super::value::format_duration(c.ha.heartbeat_interval)
                ),
            ));
        }

        let mut defaults = Vec::new();
        let mut user_home: BTreeMap<&str, &str> = BTreeMap::new();
        for (name, s) in &c.subclusters {
            let agents_path = format!("/subclusters/{name}/agents");
            if s.agents.is_empty() {
                errors.push(self.rule(
                    &agents_path,
                    format!("subcluster {name} has no agents; expected at least one agent host in {agents_path}"),
                ));
            }
            if s.is_default() {
                defaults.push(name.as_str());
            }
            for u in &s.users {
                if let Some(other) = user_home.insert(u, name) {
                    errors.push(self.rule(
                        &format!("/subclusters/{name}/users"),
                        format!("user {u} is listed in subclusters {other} and {name}; expected at most one"),
                    ));
                }
            }
        }
        if defaults.len() > 1 {
            errors.push(ConfigError::Rule {
                at: None,
                path: "/subclusters".into(),
                message: format!(
                    "subclusters {} have neither users nor groups; expected at most one default subcluster",
                    defaults.join(", ")
                ),
            });
        }
        let all_agents: BTreeSet<&str> =
            c.subclusters.values().flat_map(|s| s.agents.iter().map(String::as_str)).collect();
        for host in c.agents.weights.keys() {
            if !all_agents.contains(host.as_str()) {
                errors.push(self.rule(
                    &format!("/agents/weights/{host}"),
                    format!("agent {host} is not in any subcluster's agents; expected a host listed in /subclusters/<name>/agents"),
                ));
            }
        }

        if c.ha.enabled {
            self.check_loopback(c, errors);
        }
    }

    /// Agents given as loopback addresses or names; names that need a lookup are checked by
    /// preflight.
    fn check_loopback(&self, c: &Config, errors: &mut Vec<ConfigError>) {
        for (name, s) in &c.subclusters {
            for agent in &s.agents {
                let why = match agent.parse::<IpAddr>() {
                    Ok(ip) if is_loopback(ip) => "is a loopback address",
                    Ok(_) => continue,
                    Err(_) if is_loopback_name(agent) => "is a loopback name",
                    Err(_) => continue,
                };
                errors.push(
                    self.rule(
                        &format!("/subclusters/{name}/agents"),
                        format!("agent {agent} {why}; {HA_LOOPBACK_HINT}"),
                    ),
                );
            }
        }
    }
}

/// Why a loopback agent is refused with HA on.
pub(crate) const HA_LOOPBACK_HINT: &str = "with /HA/enabled true a loopback agent means a different machine depending on which master is active: use the agent's unique host name or address";

/// `localhost` and names below `.localhost` always mean this machine.
pub(crate) fn is_loopback_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower == "localhost" || lower.ends_with(".localhost")
}

pub(crate) fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DbSynchronous, SyncLevel};
    use std::time::Duration;

    fn src(file: &str, text: &str) -> Source {
        Source { file: PathBuf::from(format!("/cfg/{file}")), text: text.to_string() }
    }

    fn build(sources: &[Source]) -> Result<Config, ConfigErrors> {
        Settings::from_sources(Path::new("/cfg"), sources).build()
    }

    fn errors(sources: &[Source]) -> Vec<String> {
        match build(sources) {
            Ok(_) => vec![],
            Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
        }
    }

    fn one_error(sources: &[Source]) -> String {
        let errs = errors(sources);
        assert_eq!(errs.len(), 1, "{errs:#?}");
        errs[0].clone()
    }

    #[test]
    fn no_files_give_the_defaults() {
        let c = build(&[]).unwrap();
        let mut want = Config::default();
        want.ha.secret_file = "/cfg/ha.key".into();
        want.vsm.secret_file = "/cfg/cluster.key".into();
        assert_eq!(c, want);
    }

    #[test]
    fn every_folder_and_type_loads() {
        let c = build(&[
            src(
                "ha.toml",
                r#"
[HA]
enabled = false
nodes = ["tlha-primary", "tlha-secondary"]
secret_file = "/etc/vsm/other.key"
port = 9100
sync = "async"
sync_timeout = "250ms"
heartbeat_interval = 1
peer_timeout = "5s"
tombstone_retention = "2d"
local_node = "tlha-primary"
"#,
            ),
            src(
                "cluster.toml",
                r#"
[subclusters.default]
agents = "agent1.example.com agent2.example.com"
max_users_per_agent = 20
[subclusters.eng]
agents = ["agent3.example.com"]
groups = ["eng"]
[agents]
draining = ["agent2.example.com"]
[agents.weights]
"agent1.example.com" = 200
"#,
            ),
            src("vsmserver.toml", "[vsmserver]\ndb_synchronous = \"normal\"\nadmin_group = \"vsmadmin\"\n"),
            src("vsmagent.toml", "[vsmagent]\ndisplay_max = 100\ndefault_geometry = \"800x600\"\n"),
        ])
        .unwrap();
        assert_eq!(c.ha.nodes, ["tlha-primary", "tlha-secondary"]);
        assert_eq!(c.ha.secret_file, PathBuf::from("/etc/vsm/other.key"));
        assert_eq!(c.ha.port, 9100);
        assert_eq!(c.ha.sync, SyncLevel::Async);
        assert_eq!(c.ha.sync_timeout, Duration::from_millis(250));
        assert_eq!(c.ha.heartbeat_interval, Duration::from_secs(1));
        assert_eq!(c.ha.tombstone_retention, Duration::from_secs(2 * 86400));
        assert_eq!(c.ha.local_node.as_deref(), Some("tlha-primary"));
        assert_eq!(c.subclusters.len(), 2);
        assert_eq!(c.subclusters["default"].agents, ["agent1.example.com", "agent2.example.com"]);
        assert_eq!(c.subclusters["default"].max_users_per_agent, 20);
        assert_eq!(c.subclusters["eng"].groups, ["eng"]);
        assert_eq!(c.agents.draining, ["agent2.example.com"]);
        assert_eq!(c.agents.weights["agent1.example.com"], 200);
        assert_eq!(c.vsmserver.db_synchronous, DbSynchronous::Normal);
        assert_eq!(c.vsmserver.admin_group.as_deref(), Some("vsmadmin"));
        assert_eq!(c.vsmagent.display_max, 100);
        assert_eq!(c.vsmagent.default_geometry, "800x600");
    }

    #[test]
    fn aliases_load_as_canonical() {
        let c = build(&[src(
            "vsmserver.toml",
            "[vsmserver.HA]\nport = 9200\n[vsmserver.subclusters.x]\nagents = [\"a1\"]\n",
        )])
        .unwrap();
        assert_eq!(c.ha.port, 9200);
        assert_eq!(c.subclusters["x"].agents, ["a1"]);
        let e =
            one_error(&[src("ha.toml", "[HA]\nport = 9200\n"), src("vsmserver.toml", "[vsmserver.HA]\nport = 9300\n")]);
        assert_eq!(e, "/HA/port is defined twice: in /cfg/ha.toml:2 and in /cfg/vsmserver.toml:2; keep only one");
    }

    #[test]
    fn bad_value_names_file_line_key_value_and_expectation() {
        let e = one_error(&[src("ha.toml", "[HA]\n\nport = 70000\n")]);
        assert_eq!(e, "/cfg/ha.toml:3: /HA/port: bad value 70000: expected an integer from 1 to 65535");
        let e = one_error(&[src("ha.toml", "[HA]\nenabled = \"maybe\"\n")]);
        assert!(e.contains("/HA/enabled: bad value \"maybe\": expected a boolean"), "{e}");
        let e = one_error(&[src("ha.toml", "[HA]\nsync = \"sometimes\"\n")]);
        assert!(e.ends_with("expected one of: async, ack"), "{e}");
        let e = one_error(&[src("a.toml", "[vsmagent]\nsession_command = [\"Xvnc\", \"{home}\"]\n")]);
        assert!(e.contains("unknown placeholder {home}"), "{e}");
    }

    #[test]
    fn all_errors_are_reported_together() {
        let errs = errors(&[
            src("ha.toml", "[HA]\nport = 0\nsync = \"x\"\nenabel = true\n"),
            src("vsm.toml", "[vsm]\nvnc_port_base = \"abc\"\n"),
        ]);
        assert_eq!(errs.len(), 4, "{errs:#?}");
        assert!(errs.iter().any(|e| e.contains("unknown key /HA/enabel (did you mean /HA/enabled?)")));
        let joined =
            ConfigErrors(build(&[src("ha.toml", "[HA]\nport = 0\nsync = \"x\"\n")]).unwrap_err().0).to_string();
        assert_eq!(joined.lines().count(), 2);
    }

    #[test]
    fn unknown_keys_and_structural_errors() {
        let e = one_error(&[src("x.toml", "[vsmagent]\nlisten_prot = 904\n")]);
        assert_eq!(e, "/cfg/x.toml:2: unknown key /vsmagent/listen_prot (did you mean /vsmagent/listen_port?)");
        let e = one_error(&[src("x.toml", "HA = 5\n")]);
        assert!(e.contains("/HA: bad value 5: expected a table"), "{e}");
        let e = one_error(&[src("x.toml", "[HA.enabled]\nx = 1\n")]);
        assert!(e.contains("/HA/enabled: bad value a table"), "{e}");
        let e = one_error(&[src("x.toml", "[[HA]]\nenabled = true\n")]);
        assert!(e.contains("array of tables"), "{e}");
        let e = one_error(&[src("x.toml", "[HA\nenabled = true\n")]);
        assert!(e.starts_with("/cfg/x.toml: not valid TOML: line 1"), "{e}");
        let e = one_error(&[src("x.toml", "[agents.weights]\n\"bad_host\" = 5\n")]);
        assert!(e.contains("not a valid host name"), "{e}");
        let e = one_error(&[src("x.toml", "[agents.weights]\n\"a/b\" = 5\n")]);
        assert!(e.contains("without '/'"), "{e}");
    }

    #[test]
    fn display_range_rules() {
        let e = one_error(&[src("a.toml", "[vsmagent]\ndisplay_min = 50\ndisplay_max = 50\n")]);
        assert_eq!(
            e,
            "/cfg/a.toml:2: /vsmagent/display_min: display_min 50 must be less than /vsmagent/display_max 50"
        );
        let e = one_error(&[src("a.toml", "[vsmagent]\ndisplay_max = 60000\n")]);
        assert!(e.contains("5900 + /vsmagent/display_max 60000 = 65900"), "{e}");
        assert!(build(&[src("a.toml", "[vsmagent]\ndisplay_max = 59635\n")]).is_ok());
    }

    #[test]
    fn heartbeat_rule() {
        let e = one_error(&[src("ha.toml", "[HA]\nheartbeat_interval = \"5s\"\n")]);
        assert!(e.contains("peer_timeout 3s must be longer than /HA/heartbeat_interval 5s"), "{e}");
    }

    #[test]
    fn subcluster_rules() {
        let e = one_error(&[src("c.toml", "[subclusters.a]\nusers = [\"u\"]\n")]);
        assert!(e.contains("subcluster a has no agents"), "{e}");
        let e = one_error(&[src("c.toml", "[subclusters.a]\nagents = [\"h1\"]\n[subclusters.b]\nagents = [\"h2\"]\n")]);
        assert!(e.contains("subclusters a, b have neither users nor groups"), "{e}");
        let e = one_error(&[src(
            "c.toml",
            "[subclusters.a]\nagents = [\"h1\"]\nusers = [\"u\"]\n[subclusters.b]\nagents = [\"h2\"]\nusers = [\"u\"]\n",
        )]);
        assert!(e.contains("user u is listed in subclusters a and b"), "{e}");
        let e = one_error(&[src("c.toml", "[subclusters.a]\nagents = [\"h1\"]\n[agents.weights]\nh2 = 50\n")]);
        assert!(e.contains("/agents/weights/h2: agent h2 is not in any subcluster's agents"), "{e}");
        let e = one_error(&[src("c.toml", "[subclusters.a]\nagents = [\"h1\"]\n[agents.weights]\nh1 = 0\n")]);
        assert!(e.contains("bad value 0: expected an integer from 1"), "{e}");
    }

    #[test]
    fn builtin_default_subcluster_only_when_none_configured() {
        let s = Settings::from_sources(Path::new("/cfg"), &[]);
        assert!(s.entry("/subclusters/default/agents").unwrap().builtin);
        let c = build(&[src("c.toml", "[subclusters.eng]\nagents = [\"h1\"]\n")]).unwrap();
        assert_eq!(c.subclusters.keys().collect::<Vec<_>>(), ["eng"]);
    }

    fn ha_sources(agents: &str, secret: &Path) -> Vec<Source> {
        vec![
            src(
                "ha.toml",
                &format!(
                    "[HA]\nenabled = true\nnodes = [\"tlha-primary\", \"tlha-secondary\"]\nsecret_file = {:?}\n",
                    secret.display().to_string()
                ),
            ),
            src("cluster.toml", &format!("[subclusters.default]\nagents = {agents}\n")),
        ]
    }

    #[test]
    fn ha_rejects_loopback_agents() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("ha.key");
        std::fs::write(&key, [7u8; 32]).unwrap();
        assert!(build(&ha_sources("[\"agent1\"]", &key)).is_ok());
        for agent in ["127.0.0.1", "127.1.2.3", "::1", "localhost", "LOCALHOST", "x.localhost"] {
            let e = one_error(&ha_sources(&format!("[\"{agent}\"]"), &key));
            assert!(e.contains(&format!("agent {agent} is a loopback")), "{e}");
            assert!(e.contains("use the agent's unique host name or address"), "{e}");
        }
        // Names are left to preflight: loading never resolves them.
        assert!(build(&ha_sources("[\"myself\"]", &key)).is_ok());
        // Without HA, loopback agents are fine (the single-master setup).
        let mut s = ha_sources("[\"127.0.0.1\"]", &key);
        s[0].text = s[0].text.replace("enabled = true", "enabled = false");
        assert!(build(&s).is_ok());
        // The built-in default subcluster is 127.0.0.1 too.
        let e = one_error(&ha_sources("[\"agent1\"]", &key)[..1]);
        assert!(e.contains("agent 127.0.0.1 is a loopback address"), "{e}");
    }

    #[test]
    fn loading_does_not_read_the_secret() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("ha.key");
        assert!(build(&ha_sources("[\"agent1\"]", &key)).is_ok(), "a missing secret is preflight's business");
    }

    #[test]
    fn relative_secret_paths_resolve_against_the_config_dir() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ha.toml"), "[HA]\nsecret_file = \"keys/ha.key\"\n").unwrap();
        let c = load(dir.path()).unwrap();
        assert_eq!(c.ha.secret_file, dir.path().join("keys/ha.key"));
        assert_eq!(c.vsm.secret_file, dir.path().join("cluster.key"));
    }

    #[test]
    fn load_reads_only_visible_toml_files_and_requires_the_dir() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ha.toml"), "[HA]\nport = 9100\n").unwrap();
        std::fs::write(dir.path().join("extra.toml"), "[vsm]\nvnc_port_base = 6000\n").unwrap();
        std::fs::write(dir.path().join(".ha.toml.tmp"), "garbage [").unwrap();
        std::fs::write(dir.path().join("notes.txt"), "garbage [").unwrap();
        let c = load(dir.path()).unwrap();
        assert_eq!((c.ha.port, c.vsm.vnc_port_base), (9100, 6000));
        let missing = dir.path().join("nope");
        let e = load(&missing).unwrap_err().to_string();
        assert_eq!(e, format!("configuration directory {} does not exist", missing.display()));
    }

    #[test]
    fn identity_ignores_lines() {
        let a = ConfigError::BadValue {
            at: Location { file: "/f".into(), line: Some(3) },
            path: "/HA/port".into(),
            value: "0".into(),
            expected: "x".into(),
        };
        let mut b = a.clone();
        if let ConfigError::BadValue { at, .. } = &mut b {
            at.line = Some(9);
        }
        assert_ne!(a.to_string(), b.to_string());
        assert_eq!(a.identity(), b.identity());
    }
}
