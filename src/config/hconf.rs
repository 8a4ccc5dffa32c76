//! ThinLinc's Hiveconf files (`.hconf`): reading them and mapping their parameters to vsm keys,
//! for `tl-config -i` (import) and `tl-config -p` (purge).
//!
//! Owns: the Hiveconf syntax (`[/folder]` sections, `name = value` lines, `#` and `;`
//! comments, `\` continuation lines, `%mount` of other files), and the table of ThinLinc
//! parameters vsm has no use for, each with the reason.
//! Never: writes vsm's configuration (the editor does, from the edits this module returns), or
//! drops a parameter silently: every parameter is either mapped to a vsm key or reported as
//! skipped with a reason.
//!
//! Invariants:
//! - Paths are case-insensitive and both ThinLinc layouts map to the same keys: 4.18
//!   (`/vsmserver/HA/*`, `/vsmserver/subclusters/*`) and 4.19+ (`/HA/*`, `/subclusters/*`,
//!   `/agents/*`).
//! - `%mount` follows at most [`MAX_MOUNT_DEPTH`] levels and never the same file twice, so a
//!   mount loop cannot hang the import.

use std::path::{Path, PathBuf};

use super::keys;

/// How deep `%mount` directives are followed.
pub const MAX_MOUNT_DEPTH: usize = 8;

/// One parameter of a Hiveconf file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Param {
    /// The full path, e.g. `/vsmserver/HA/enabled`, as written (case kept).
    pub path: String,
    /// The value, trimmed, continuation lines joined.
    pub value: String,
    pub file: PathBuf,
    /// First and last line (1-based) of the parameter in `file`.
    pub lines: (usize, usize),
}

impl Param {
    /// `file:line` for messages.
    pub fn at(&self) -> String {
        format!("{}:{}", self.file.display(), self.lines.0)
    }
}

/// A file that cannot be read as Hiveconf. Nothing is imported from a call that met one.
#[derive(Debug, thiserror::Error)]
pub enum HconfError {
    #[error("cannot read {}: {source}", file.display())]
    Io { file: PathBuf, source: std::io::Error },
    #[error("{}:{line}: {what}", file.display())]
    Syntax { file: PathBuf, line: usize, what: String },
}

/// What a file holds: its parameters (mounted files included) and what was passed over.
#[derive(Clone, Debug, Default)]
pub struct Hive {
    pub params: Vec<Param>,
    /// `%mount` directives not followed, with the reason.
    pub notes: Vec<String>,
}

/// Reads `file` and every file it mounts.
pub fn read(file: &Path) -> Result<Hive, HconfError> {
    let mut hive = Hive::default();
    let mut seen = Vec::new();
    read_into(file, "", 0, &mut seen, &mut hive)?;
    Ok(hive)
}

fn read_into(
    file: &Path,
    mount_point: &str,
    depth: usize,
    seen: &mut Vec<PathBuf>,
    hive: &mut Hive,
) -> Result<(), HconfError> {
    let real = std::fs::canonicalize(file).map_err(|source| HconfError::Io { file: file.to_path_buf(), source })?;
    if seen.contains(&real) {
        hive.notes.push(format!("{} is mounted more than once; read once", file.display()));
        return Ok(());
    }
    seen.push(real);
    let text = std::fs::read_to_string(file).map_err(|source| HconfError::Io { file: file.to_path_buf(), source })?;
    let syntax = |line: usize, what: String| HconfError::Syntax { file: file.to_path_buf(), line, what };
    let mut folder = mount_point.to_string();
    let mut lines = text.lines().enumerate().map(|(i, l)| (i + 1, l));
    while let Some((no, raw)) = lines.next() {
        // Join continuation lines: a line ending in `\` goes on with the next one.
        let mut line = raw.to_string();
        let mut last = no;
        while line.ends_with('\\') {
            line.pop();
            match lines.next() {
                Some((n, more)) => {
                    line.push_str(more);
                    last = n;
                }
                None => break,
            }
        }
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') || t.starts_with(';') {
            continue;
        }
        if let Some(section) = t.strip_prefix('[') {
            let Some(name) = section.strip_suffix(']') else {
                return Err(syntax(no, format!("section header {t:?} has no closing ']'")));
            };
            let name = name.trim().trim_matches('/');
            folder = join(mount_point, name);
            continue;
        }
        if let Some(directive) = t.strip_prefix('%') {
            let mut words = directive.split_whitespace();
            if !words.next().is_some_and(|w| w.eq_ignore_ascii_case("mount")) {
                return Err(syntax(no, format!("unknown directive {t:?}: only %mount is known")));
            }
            let (mut format, mut pattern) = ("hive", None);
            while let Some(w) = words.next() {
                match w {
                    "-t" => format = words.next().unwrap_or(""),
                    "-o" => {
                        words.next();
                    }
                    other => pattern = Some(other),
                }
            }
            let Some(pattern) = pattern else {
                return Err(syntax(no, "%mount without a file".into()));
            };
            if format != "hive" {
                hive.notes.push(format!(
                    "{}:{no}: %mount -t {format} {pattern} not followed: only hive files can be imported",
                    file.display()
                ));
                continue;
            }
            if depth + 1 > MAX_MOUNT_DEPTH {
                return Err(syntax(no, format!("%mount nested deeper than {MAX_MOUNT_DEPTH} levels")));
            }
            let base = file.parent().unwrap_or(Path::new("."));
            for mounted in expand(&base.join(pattern)) {
                read_into(&mounted, &folder, depth + 1, seen, hive)?;
            }
            continue;
        }
        let Some((name, value)) = t.split_once('=') else {
            return Err(syntax(no, format!("expected name = value, a [/folder] header or a comment, found {t:?}")));
        };
        let name = name.trim();
        if name.is_empty() || name.contains(char::is_whitespace) {
            return Err(syntax(no, format!("bad parameter name {name:?}")));
        }
        hive.params.push(Param {
            path: join(&folder, name.trim_matches('/')),
            value: value.trim().to_string(),
            file: file.to_path_buf(),
            lines: (no, last),
        });
    }
    Ok(())
}

fn join(folder: &str, name: &str) -> String {
    let folder = folder.trim_end_matches('/');
    if name.is_empty() {
        return folder.to_string();
    }
    format!("{folder}/{name}")
}

/// The files a `%mount` pattern names: `*` and `?` in the last component, sorted; a pattern
/// without wildcards names itself (and must exist).
fn expand(pattern: &Path) -> Vec<PathBuf> {
    let name = pattern.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if !name.contains(['*', '?']) {
        return vec![pattern.to_path_buf()];
    }
    let dir = pattern.parent().unwrap_or(Path::new("."));
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter(|e| glob_match(&name, &e.file_name().to_string_lossy()))
                .map(|e| e.path())
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

fn glob_match(pattern: &str, name: &str) -> bool {
    fn go(p: &[u8], n: &[u8]) -> bool {
        match (p.first(), n.first()) {
            (None, None) => true,
            (Some(b'*'), _) => go(&p[1..], n) || (!n.is_empty() && go(p, &n[1..])),
            (Some(b'?'), Some(_)) => go(&p[1..], &n[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &n[1..]),
            _ => false,
        }
    }
    // Hidden files (editor backups) are not matched by a wildcard, as in a shell.
    !(name.starts_with('.') && !pattern.starts_with('.')) && go(pattern.as_bytes(), name.as_bytes())
}

/// What becomes of one ThinLinc parameter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mapping {
    /// Set this vsm key (canonical path) to this value (tl-config syntax).
    Set { key: String, value: String },
    /// Not imported, and why.
    Skip { reason: String },
}

/// ThinLinc parameters with no vsm equivalent: (path pattern, reason). A pattern ending in
/// `/*` covers a whole folder. Matched case-insensitively against the path with the 4.18
/// prefixes removed.
const NO_EQUIVALENT: &[(&str, &str)] = &[
    ("/vsmserver/unbind_ports_at_login", "vsm forwards no ports of its own: a session's tunnels belong to the client's SSH connection and end with it"),
    ("/vsmserver/bogomips_per_user", "a tuning value of the load balancer ThinLinc replaced in 4.19; vsm shares sessions out by /agents/weights"),
    ("/vsmserver/ram_per_user", "a tuning value of the load balancer ThinLinc replaced in 4.19; vsm shares sessions out by /agents/weights"),
    ("/vsmserver/existing_users_weight", "a tuning value of the load balancer ThinLinc replaced in 4.19; vsm shares sessions out by /agents/weights"),
    ("/vsmserver/terminalservers", "the agent list of ThinLinc versions without subclusters: list the agents in /subclusters/<name>/agents"),
    ("/vsmserver/explicit_agentselection", "vsm pins no user to an agent by itself: a subcluster whose users are that user and whose only agent is that agent does the same"),
    ("/vsmserver/logging/*", "ThinLinc's log files, syslog settings and per-logger levels do not carry over: vsm logs to the journal (see docs/operations.md); only defaultlevel is imported"),
    ("/vsmagent/logging/*", "ThinLinc's log files, syslog settings and per-logger levels do not carry over: vsm logs to the journal (see docs/operations.md); only defaultlevel is imported"),
    ("/vsmagent/xserver_args", "vsm starts sessions with /vsmagent/session_command: put Xvnc's options there"),
    ("/vsmagent/xvnc_start_timeout", "vsm waits for a session as long as /vsmserver/agent_timeout allows"),
    ("/vsmagent/lowest_user_port", "vsm reserves no port range for users: a session's VNC port is /vsm/vnc_port_base plus its display"),
    ("/vsmagent/max_session_port", "vsm allocates no tunnel ports: a session's VNC port is /vsm/vnc_port_base plus its display"),
    ("/vsmagent/make_homedir", "home directories are made by the PAM session (pam_mkhomedir), not by vsm"),
    ("/vsmagent/make_homedir_mode", "home directories are made by the PAM session (pam_mkhomedir), not by vsm"),
    ("/vsmagent/single_signon", "vsm never stores users' passwords"),
    ("/vsmagent/xauthority_location", "the session script decides where the X authority file lives"),
    ("/vsmagent/default_environment/*", "the session environment comes from the PAM session and the user's ~/.vsm/xstartup"),
    ("/vsm/tunnel_bind_base", "vsm allocates no tunnel ports: the client's SSH connection carries every tunnel"),
    ("/vsm/tunnelslots_per_session", "vsm allocates no tunnel ports: the client's SSH connection carries every tunnel"),
    ("/vsm/tunnelservices/*", "vsm allocates no tunnel ports: the client's SSH connection carries every tunnel"),
];

/// ThinLinc parameters that are vsm keys under another name: (ThinLinc path, vsm key).
const RENAMED: &[(&str, &str)] = &[("/vsmserver/load_update_cycle", "/vsmserver/reconcile_interval")];

/// The reason a ThinLinc parameter has no vsm equivalent, if it is a known one.
pub fn no_equivalent(path: &str) -> Option<&'static str> {
    let (canon, _) = keys::canonical(path).ok()?;
    let lower = canon.to_ascii_lowercase();
    NO_EQUIVALENT.iter().find_map(|(pat, why)| {
        let hit = match pat.strip_suffix("/*") {
            Some(folder) => lower.starts_with(&format!("{folder}/")),
            None => lower == *pat,
        };
        hit.then_some(*why)
    })
}

/// Maps one ThinLinc parameter to a vsm key, converting the value where the syntax differs.
pub fn map(param: &Param) -> Mapping {
    let skip = |reason: String| Mapping::Skip { reason };
    let (canon, _) = match keys::canonical(&param.path) {
        Ok(c) => c,
        Err(e) => return skip(e),
    };
    let lower = canon.to_ascii_lowercase();
    let target = RENAMED.iter().find(|(from, _)| lower == *from).map(|(_, to)| to.to_string()).unwrap_or(canon);
    let e = match keys::lookup(&target) {
        Ok(key) => {
            let value = match key.def.ty {
                // ThinLinc writes a geometry as `WIDTH HEIGHT`.
                super::value::ValueType::Geometry => {
                    let parts: Vec<&str> = param.value.split_whitespace().collect();
                    match parts.as_slice() {
                        [w, h] => format!("{w}x{h}"),
                        _ => param.value.clone(),
                    }
                }
                _ => param.value.clone(),
            };
            return Mapping::Set { key: key.path, value };
        }
        Err(e) => e,
    };
    if let Some(why) = no_equivalent(&target) {
        return skip(why.to_string());
    }
    match e {
        keys::LookupError::Invalid(why) => skip(why),
        keys::LookupError::Unknown { suggestion, .. } => {
            let top = target.split('/').nth(1).unwrap_or("");
            if !keys::FOLDERS.iter().any(|(f, _)| f.eq_ignore_ascii_case(top)) {
                return skip(format!("vsm has no /{top} folder: it configures only the session broker and its agents"));
            }
            match suggestion {
                Some(s) => {
                    skip(format!("vsm has no such key (the closest is {s}; set it by hand if that is what is meant)"))
                }
                None => skip("vsm has no such key".into()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn paths(h: &Hive) -> Vec<(String, String)> {
        h.params.iter().map(|p| (p.path.clone(), p.value.clone())).collect()
    }

    #[test]
    fn sections_comments_continuations_and_values() {
        let tmp = tempfile::tempdir().unwrap();
        let f = write(
            tmp.path(),
            "a.hconf",
            "# a comment\n; another\n\n[/vsmserver]\nlisten_port = 9000\nallowed_groups=staff  wheel \n\
             admin_email = a@example.org \\\n  b@example.org\n[/vsmserver/HA]\nenabled=yes\nnote = a=b\n",
        );
        let h = read(&f).unwrap();
        assert_eq!(
            paths(&h),
            vec![
                ("/vsmserver/listen_port".into(), "9000".into()),
                ("/vsmserver/allowed_groups".into(), "staff  wheel".into()),
                ("/vsmserver/admin_email".into(), "a@example.org   b@example.org".into()),
                ("/vsmserver/HA/enabled".into(), "yes".into()),
                ("/vsmserver/HA/note".into(), "a=b".into()),
            ]
        );
        assert_eq!(h.params[2].lines, (7, 8));
    }

    #[test]
    fn syntax_errors_name_file_and_line() {
        let tmp = tempfile::tempdir().unwrap();
        for (text, want) in [
            ("[/vsmserver\n", ":1: section header"),
            ("[/x]\njust words\n", ":2: expected name = value"),
            ("%include other\n", ":1: unknown directive"),
            ("%mount\n", ":1: %mount without a file"),
        ] {
            let f = write(tmp.path(), "bad.hconf", text);
            let e = read(&f).unwrap_err().to_string();
            assert!(e.contains("bad.hconf") && e.contains(want), "{text:?}: {e}");
        }
        assert!(matches!(read(&tmp.path().join("missing.hconf")), Err(HconfError::Io { .. })));
    }

    #[test]
    fn mounts_graft_files_at_the_current_folder_and_loops_end() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("conf.d")).unwrap();
        write(tmp.path(), "conf.d/b.hconf", "[/vsmagent]\nlisten_port=904\n");
        write(tmp.path(), "conf.d/a.hconf", "[/vsm]\nvsm_server_port=9000\n%mount ../root.hconf\n");
        write(tmp.path(), "conf.d/.hidden.hconf", "[/x]\ny=1\n");
        write(tmp.path(), "conf.d/notes.txt", "[/x]\ny=1\n");
        let root = write(tmp.path(), "root.hconf", "%mount -t hive -o rw conf.d/*.hconf\n%mount -t parameter x\n");
        let h = read(&root).unwrap();
        assert_eq!(
            paths(&h),
            vec![("/vsm/vsm_server_port".into(), "9000".into()), ("/vsmagent/listen_port".into(), "904".into())]
        );
        assert!(h.notes.iter().any(|n| n.contains("more than once")), "{:?}", h.notes);
        assert!(h.notes.iter().any(|n| n.contains("-t parameter")), "{:?}", h.notes);
        let sub = write(tmp.path(), "sub.hconf", "[/vsmserver]\n%mount inner.hconf\n");
        write(tmp.path(), "inner.hconf", "listen_port=1\n[HA]\nenabled=1\n");
        assert_eq!(
            paths(&read(&sub).unwrap()),
            vec![("/vsmserver/listen_port".into(), "1".into()), ("/vsmserver/HA/enabled".into(), "1".into())]
        );
    }

    fn param(path: &str, value: &str) -> Param {
        Param { path: path.into(), value: value.into(), file: "x.hconf".into(), lines: (1, 1) }
    }

    fn set(key: &str, value: &str) -> Mapping {
        Mapping::Set { key: key.into(), value: value.into() }
    }

    #[test]
    fn both_layouts_map_to_the_same_keys() {
        assert_eq!(map(&param("/vsmserver/HA/enabled", "yes")), set("/HA/enabled", "yes"));
        assert_eq!(map(&param("/HA/Enabled", "1")), set("/HA/enabled", "1"));
        assert_eq!(
            map(&param("/vsmserver/subclusters/Default/agents", "a b")),
            set("/subclusters/Default/agents", "a b")
        );
        assert_eq!(map(&param("/SubClusters/eng/Users", "u")), set("/subclusters/eng/users", "u"));
        assert_eq!(map(&param("/agents/weights/host1", "200")), set("/agents/weights/host1", "200"));
        assert_eq!(
            map(&param("/vsmagent/default_geometry", "1280 800")),
            set("/vsmagent/default_geometry", "1280x800")
        );
        assert_eq!(map(&param("/vsmserver/load_update_cycle", "40")), set("/vsmserver/reconcile_interval", "40"));
    }

    #[test]
    fn parameters_without_equivalent_are_skipped_with_a_reason() {
        for path in [
            "/vsmserver/unbind_ports_at_login",
            "/VSMSERVER/Logging/logfile",
            "/vsmagent/logging/levels/session",
            "/vsmagent/default_environment/PATH",
            "/vsm/tunnelservices/pulseaudio",
            "/profiles/default/name",
            "/vsmserver/no_such_thing",
        ] {
            match map(&param(path, "1")) {
                Mapping::Skip { reason } => assert!(!reason.is_empty(), "{path}"),
                other => panic!("{path}: {other:?}"),
            }
        }
        // The one logging parameter both have, with the same level names.
        assert_eq!(
            map(&param("/VSMSERVER/Logging/defaultlevel", "DEBUG")),
            set("/vsmserver/logging/defaultlevel", "DEBUG")
        );
        assert!(no_equivalent("/vsmserver/unbind_ports_at_login").unwrap().contains("ports"));
        assert_eq!(no_equivalent("/vsmserver/listen_port"), None);
    }
}
