//! `tl-config`: read and write configuration keys by path.
//!
//! Owns: the command-line interface (flags, output formats, exit status).
//! Never: writes files itself (it hands edits to `edit.rs`), or parses values itself (the key
//! table's types do).
//!
//! Invariants:
//! - The exit status is the number of errors, capped at 255; every error is printed on stderr.
//! - Edits of one call are applied all together or not at all, before any value is printed,
//!   so reads in the same call show the new values.
//! - Output of reads is stable: one value per line, lists space-separated.

use std::io::Write;
use std::path::PathBuf;

use clap::Parser;

use super::edit::{self, Edit};
use super::hconf::{self, Mapping};
use super::keys::{self, LookupError};
use super::load::{ConfigError, Settings};

const EXAMPLES: &str = "\
Examples:
  tl-config /HA/enabled                          print a value (the default if not set)
  tl-config /HA/enabled=1 '/HA/nodes=tlha-primary tlha-secondary'
                                                 set several keys at once (lists are space-separated)
  tl-config '/vsmagent/allowed_clients=tlha-primary tlha-secondary'
  tl-config -a /HA                               list a folder
  tl-config -Ra /                                list everything
  tl-config -e PORT=/vsmserver/listen_port       print PORT='9000' for eval in a shell
  eval \"$(tl-config -x -e MASTER=/vsmagent/master_hostname)\"
  tl-config -d /agents/weights/agent1.example.com
                                                 delete a key (back to its default)
  tl-config -d /subclusters/old                  delete a whole subcluster
  tl-config --check                              validate the configuration directory
  tl-config -i /opt/thinlinc/etc/conf.d/vsmserver.hconf
                                                 import a ThinLinc site's settings (Hiveconf)
  tl-config -p old.hconf                         remove from old.hconf what vsm now sets
  tl-config -E /vsmserver                        print VAR='value' for every key of a folder

The configuration directory is --config-dir, else $VSM_CONFIG_DIR, else /etc/vsm.
/vsmserver/HA/* and /vsmserver/subclusters/* are aliases of /HA/* and /subclusters/*;
writing an alias writes the canonical key. Paths are case-insensitive.
-i reads ThinLinc's Hiveconf files (both the 4.18 and the 4.19+ layout, %mount included);
parameters vsm has no use for are listed as skipped, with the reason.
Nothing is written unless every assignment is valid and the resulting configuration
has no new problem. The exit status is the number of errors.";

/// Read and write vsm configuration keys by path.
#[derive(Parser, Debug, Default)]
#[command(name = "tl-config", version, after_help = EXAMPLES)]
pub struct Args {
    /// List the parameters and sub-folders of the given folders (default /).
    #[arg(short = 'a', long = "all-entries")]
    pub all: bool,
    /// With -a, list sub-folders recursively.
    #[arg(short = 'R', long)]
    pub recursive: bool,
    /// Print VAR='value' for the key, for shell eval. Repeatable.
    #[arg(short = 'e', long = "eval", value_name = "VAR=/path")]
    pub eval: Vec<String>,
    /// As -e, for every key of a folder (the variables are named after the keys). Repeatable.
    #[arg(short = 'E', value_name = "/folder")]
    pub eval_folder: Vec<String>,
    /// Import every parameter of a ThinLinc Hiveconf file (.hconf). Repeatable.
    #[arg(short = 'i', long = "import", value_name = "FILE")]
    pub import: Vec<PathBuf>,
    /// Remove from a Hiveconf file the parameters vsm's configuration sets. Repeatable.
    #[arg(short = 'p', long = "purge", value_name = "FILE")]
    pub purge: Vec<PathBuf>,
    /// With -e, prefix the lines with `export `.
    #[arg(short = 'x', long)]
    pub export: bool,
    /// Delete a key (or a /subclusters/<name> folder) from the files. Repeatable.
    #[arg(short = 'd', long = "delete", value_name = "/path")]
    pub delete: Vec<String>,
    /// Validate the whole configuration directory and list every problem.
    #[arg(long)]
    pub check: bool,
    /// Configuration directory (default: $VSM_CONFIG_DIR, else /etc/vsm).
    #[arg(long, value_name = "DIR")]
    pub config_dir: Option<PathBuf>,
    /// Keys to print (/path), assignments (/path=value), or folders with -a.
    #[arg(value_name = "PARAM[=VALUE]")]
    pub params: Vec<String>,
}

/// Runs `tl-config`; returns the exit status (number of errors, at most 255).
pub fn run(args: &Args, out: &mut dyn Write, err: &mut dyn Write) -> u8 {
    let mut errors = 0usize;
    macro_rules! fail {
        ($err:expr, $msg:expr) => {{
            let _ = writeln!($err, "tl-config: {}", $msg);
            errors += 1;
        }};
    }
    let dir = super::config_dir_from(args.config_dir.clone());
    if !args.check
        && !args.all
        && args.params.is_empty()
        && args.eval.is_empty()
        && args.eval_folder.is_empty()
        && args.delete.is_empty()
        && args.import.is_empty()
        && args.purge.is_empty()
    {
        let _ = writeln!(
            err,
            "tl-config: nothing to do: give a key, an assignment, -a, -e, -E, -d, -i, -p or --check (see --help)"
        );
        return 1;
    }

    if args.check {
        // Everything a daemon would check before it starts, secrets and DNS included.
        match super::preflight::load_checked(&dir) {
            Ok(_) => {
                let _ = writeln!(out, "{}: configuration is valid", dir.display());
            }
            Err(problems) => {
                for p in &problems.0 {
                    fail!(err, p);
                }
            }
        }
    }

    // Assignments and deletes, all in one batch.
    let mut edits: Vec<Edit> = Vec::new();
    let mut reads: Vec<&str> = Vec::new();
    for p in &args.params {
        match p.split_once('=') {
            Some((path, value)) if !args.all => {
                edits.push(Edit::Set { path: path.to_string(), value: value.to_string() })
            }
            _ => reads.push(p),
        }
    }
    edits.extend(args.delete.iter().map(|p| Edit::Delete { path: p.clone() }));
    let mut imported: Vec<String> = Vec::new();
    let mut import_failed = false;
    for file in &args.import {
        match import(file, &mut edits, &mut imported, out, err) {
            Ok(()) => {}
            Err(problems) => {
                for p in &problems {
                    fail!(err, p);
                }
                import_failed = true;
            }
        }
    }
    let mut written = true;
    if import_failed {
        let _ = writeln!(err, "tl-config: nothing was written");
        written = false;
    } else if !edits.is_empty() {
        match edit::apply(&dir, &edits) {
            Ok(outcome) => {
                for line in &imported {
                    let _ = writeln!(out, "{line}");
                }
                for n in &outcome.notes {
                    let _ = writeln!(err, "tl-config: note: {n}");
                }
                for p in &outcome.remaining {
                    let _ = writeln!(err, "tl-config: warning: existing problem: {p}");
                }
            }
            Err(problems) => {
                for p in &problems {
                    match p {
                        edit::EditError::Lookup(LookupError::Unknown { path, .. }) => {
                            fail!(err, &format!("{p}{}", thinlinc_note(path)))
                        }
                        p => fail!(err, p),
                    }
                }
                let _ = writeln!(err, "tl-config: nothing was written");
                written = false;
            }
        }
    }
    if written {
        for file in &args.purge {
            match purge(&dir, file) {
                Ok(n) => {
                    let _ = writeln!(out, "purged {n} parameter(s) from {}", file.display());
                }
                Err(msg) => fail!(err, &msg),
            }
        }
    }

    let needs_read =
        !reads.is_empty() || !args.eval.is_empty() || !args.eval_folder.is_empty() || (args.all && reads.is_empty());
    if !needs_read {
        return errors.min(255) as u8;
    }
    let settings = match Settings::read_dir(&dir) {
        Ok(s) => s,
        Err(e) => {
            fail!(err, &e);
            return errors.min(255) as u8;
        }
    };
    // Whole-file problems may hide any key: report them once.
    for e in settings.read_errors() {
        if matches!(e, ConfigError::Io { .. } | ConfigError::Syntax { .. }) {
            fail!(err, e);
        }
    }

    if args.all {
        let folders = if reads.is_empty() { vec!["/"] } else { reads.clone() };
        for folder in folders {
            if let Err(msg) = list(&settings, folder, args.recursive, out) {
                fail!(err, &msg);
            }
        }
    } else {
        for path in &reads {
            match get(&settings, path) {
                Ok(v) => {
                    let _ = writeln!(out, "{v}");
                }
                Err(msgs) => {
                    for m in msgs {
                        fail!(err, &m);
                    }
                }
            }
        }
    }

    for spec in &args.eval {
        let Some((var, path)) = spec.split_once('=') else {
            fail!(err, &format!("-e {spec:?}: expected VAR=/path"));
            continue;
        };
        if !is_shell_name(var) {
            fail!(err, &format!("-e {spec:?}: {var:?} is not a valid shell variable name"));
            continue;
        }
        match get(&settings, path) {
            Ok(v) => {
                let export = if args.export { "export " } else { "" };
                let _ = writeln!(out, "{export}{var}={}", shell_quote(&v));
            }
            Err(msgs) => {
                for m in msgs {
                    fail!(err, &m);
                }
            }
        }
    }
    for folder in &args.eval_folder {
        match folder_keys(&settings, folder) {
            Ok(keys) => {
                for (name, path) in keys {
                    if !is_shell_name(&name) {
                        fail!(
                            err,
                            &format!("-E {folder}: {name:?} is not a valid shell variable name; use -e VAR={path}")
                        );
                        continue;
                    }
                    match get(&settings, &path) {
                        Ok(v) => {
                            let export = if args.export { "export " } else { "" };
                            let _ = writeln!(out, "{export}{name}={}", shell_quote(&v));
                        }
                        Err(msgs) => {
                            for m in msgs {
                                fail!(err, &m);
                            }
                        }
                    }
                }
            }
            Err(msg) => fail!(err, &msg),
        }
    }
    errors.min(255) as u8
}

/// Reads a Hiveconf file and adds an edit for every parameter that maps to a vsm key; prints
/// what is skipped. `imported` gets one line per imported key, printed once written.
fn import(
    file: &std::path::Path,
    edits: &mut Vec<Edit>,
    imported: &mut Vec<String>,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<(), Vec<String>> {
    let hive = hconf::read(file).map_err(|e| vec![e.to_string()])?;
    for n in &hive.notes {
        let _ = writeln!(err, "tl-config: note: {n}");
    }
    let mut problems = Vec::new();
    let mut set_at: std::collections::BTreeMap<String, String> = Default::default();
    for p in &hive.params {
        match hconf::map(p) {
            Mapping::Set { key, value } => {
                // Checked here so that a bad value names its line in the file.
                if let Ok(k) = keys::lookup(&key) {
                    if let Err(expected) = k.def.ty.parse_text(&value) {
                        problems.push(format!("{}: {}: bad value {value:?}: expected {expected}", p.at(), p.path));
                        continue;
                    }
                }
                if let Some(before) = set_at.insert(key.clone(), p.at()) {
                    let _ =
                        writeln!(err, "tl-config: note: {key} is set at {before} and at {}: the last one wins", p.at());
                }
                let from = if key == p.path { String::new() } else { format!(" (from {})", p.path) };
                imported.push(format!("imported {key} = {value}{from}"));
                edits.push(Edit::Set { path: key, value });
            }
            Mapping::Skip { reason } => {
                let _ = writeln!(out, "skipped {} ({}): {reason}", p.path, p.at());
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

/// Removes from the Hiveconf file `file` (not from the files it mounts) every parameter whose
/// vsm key is set in the configuration directory; returns how many were removed.
fn purge(dir: &std::path::Path, file: &std::path::Path) -> Result<usize, String> {
    let settings = Settings::read_dir(dir).map_err(|e| e.to_string())?;
    let hive = hconf::read(file).map_err(|e| e.to_string())?;
    let own = std::fs::canonicalize(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let mut drop: Vec<(usize, usize)> = Vec::new();
    for p in &hive.params {
        if std::fs::canonicalize(&p.file).ok().as_ref() != Some(&own) {
            continue;
        }
        if let Mapping::Set { key, .. } = hconf::map(p) {
            if settings.entry(&key).is_some_and(|e| !e.builtin) {
                drop.push(p.lines);
            }
        }
    }
    if drop.is_empty() {
        return Ok(0);
    }
    let text = std::fs::read_to_string(file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    let mut kept = String::with_capacity(text.len());
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let no = i + 1;
        if !drop.iter().any(|(a, b)| (*a..=*b).contains(&no)) {
            kept.push_str(line);
        }
    }
    edit::write_atomic(file, kept.as_bytes()).map_err(|e| format!("cannot write {}: {e}", file.display()))?;
    Ok(drop.len())
}

/// The keys directly in a folder, as (name, canonical path), in key-table order.
fn folder_keys(settings: &Settings, folder: &str) -> Result<Vec<(String, String)>, String> {
    let (canon, _) = keys::canonical(folder)?;
    let canon = canon.trim_end_matches('/').to_string();
    if !keys::is_folder(if canon.is_empty() { "/" } else { &canon }) {
        if keys::lookup(&canon).is_ok() {
            return Err(format!("-E {canon}: a key, not a folder; use -e VAR={canon}"));
        }
        return Err(format!("-E {canon}: folder not found"));
    }
    Ok(settings
        .effective_all()
        .into_iter()
        .filter_map(|(_, path, _, _)| {
            let (parent, name) = path.rsplit_once('/')?;
            (parent == canon).then(|| (name.to_string(), path.clone()))
        })
        .collect())
}

/// For a ThinLinc parameter vsm has no use for, why; appended to "unknown key".
fn thinlinc_note(path: &str) -> String {
    match hconf::no_equivalent(path) {
        Some(why) => format!(": a ThinLinc parameter with no vsm equivalent ({why})"),
        None => String::new(),
    }
}

/// The value in effect for a key, or the problems that make it unknowable.
fn get(settings: &Settings, path: &str) -> Result<String, Vec<String>> {
    let (key, value) = settings.effective(path).map_err(|e| {
        let (canon, _) = keys::canonical(path).unwrap_or((path.to_string(), false));
        if keys::is_folder(&canon) {
            vec![format!("{canon} is a folder; use -a to list it")]
        } else {
            vec![format!("{e}{}", thinlinc_note(path))]
        }
    })?;
    settings.exists(&key).map_err(|why| vec![format!("{}: no such parameter: {why}", key.path)])?;
    let problems: Vec<String> = settings
        .read_errors()
        .iter()
        .filter(|e| e.path() == Some(key.path.as_str()))
        .map(ToString::to_string)
        .collect();
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(value.display())
}

/// A folder tree node: keys with values and sub-folders, in key-table order.
#[derive(Default)]
struct Node {
    /// (name, value for a key or `None` for a folder, sub-tree of a folder).
    children: Vec<(String, Option<String>, Node)>,
}

impl Node {
    fn folder(&mut self, name: &str) -> &mut Node {
        let pos = match self.children.iter().position(|(n, v, _)| n == name && v.is_none()) {
            Some(p) => p,
            None => {
                self.children.push((name.to_string(), None, Node::default()));
                self.children.len() - 1
            }
        };
        &mut self.children[pos].2
    }

    fn print(&self, depth: usize, recursive: bool, out: &mut dyn Write) {
        let indent = "    ".repeat(depth);
        for (name, value, sub) in &self.children {
            match value {
                Some(v) => {
                    let _ = writeln!(out, "{}", format!("{indent}{name} = {v}").trim_end());
                }
                None => {
                    let _ = writeln!(out, "{indent}{name}/");
                    if recursive {
                        sub.print(depth + 1, true, out);
                    }
                }
            }
        }
    }
}

fn list(settings: &Settings, folder: &str, recursive: bool, out: &mut dyn Write) -> Result<(), String> {
    let (canon, _) = keys::canonical(folder)?;
    let prefix: Vec<&str> = canon.trim_start_matches('/').split('/').filter(|s| !s.is_empty()).collect();
    let mut root = Node::default();
    let all = settings.effective_all();
    for def in keys::KEYS {
        // Folders exist even when empty (those just above a wildcard: /agents/weights).
        let segs: Vec<&str> = def.path[1..].split('/').collect();
        let mut node = &mut root;
        for s in segs.iter().take(segs.len() - 1).take_while(|s| !s.starts_with('<')) {
            node = node.folder(s);
        }
        for (_, path, value, _) in all.iter().filter(|(d, ..)| std::ptr::eq(*d, def)) {
            let segs: Vec<&str> = path[1..].split('/').collect();
            let (last, parents) = segs.split_last().unwrap_or((&"", &[]));
            let mut node = &mut root;
            for s in parents {
                node = node.folder(s);
            }
            node.children.push((last.to_string(), Some(value.display()), Node::default()));
        }
    }
    let mut node = &root;
    for s in &prefix {
        let found = node.children.iter().find(|(n, v, _)| n == s && v.is_none()).map(|(_, _, sub)| sub);
        node = match found {
            Some(sub) => sub,
            None if keys::lookup(&canon).is_ok() => return Err(format!("{canon} is a key, not a folder")),
            None => return Err(format!("folder {canon} not found")),
        };
    }
    node.print(0, recursive, out);
    Ok(())
}

fn is_shell_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Single-quotes a value for a POSIX shell: `'` becomes `'\''`.
pub fn shell_quote(v: &str) -> String {
    format!("'{}'", v.replace('\'', "'\\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_in(dir: &std::path::Path, argv: &[&str]) -> (u8, String, String) {
        let mut full = vec!["tl-config", "--config-dir", dir.to_str().unwrap()];
        full.extend_from_slice(argv);
        let args = Args::try_parse_from(full).unwrap();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let code = run(&args, &mut out, &mut err);
        (code, String::from_utf8(out).unwrap(), String::from_utf8(err).unwrap())
    }

    #[test]
    fn no_arguments_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let (code, _, err) = run_in(tmp.path(), &[]);
        assert_eq!(code, 1);
        assert!(err.contains("nothing to do"), "{err}");
    }

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        assert_eq!(shell_quote(""), "''");
        assert!(is_shell_name("_A1"));
        assert!(!is_shell_name("1A") && !is_shell_name("A-B") && !is_shell_name(""));
    }

    #[test]
    fn list_shows_defaults_builtin_subcluster_and_empty_folders() {
        let tmp = tempfile::tempdir().unwrap();
        let (code, out, err) = run_in(tmp.path(), &["-Ra", "/"]);
        assert_eq!(code, 0, "{err}");
        assert!(out.starts_with("HA/\n    enabled = false\n"), "{out}");
        assert!(out.contains("subclusters/\n    default/\n        agents = 127.0.0.1\n"), "{out}");
        assert!(out.contains("agents/\n    draining =\n    weights/\nvsmserver/\n"), "{out}");
        let (_, out, _) = run_in(tmp.path(), &["-a", "/"]);
        assert_eq!(out, "HA/\nsubclusters/\nagents/\nvsmserver/\nvsmagent/\nvsm/\n");
        let (code, _, err) = run_in(tmp.path(), &["-a", "/HA/enabled", "/nope"]);
        assert_eq!(code, 2);
        assert!(err.contains("/HA/enabled is a key, not a folder"), "{err}");
        assert!(err.contains("folder /nope not found"), "{err}");
    }

    #[test]
    fn get_of_folder_suggests_list() {
        let tmp = tempfile::tempdir().unwrap();
        let (code, _, err) = run_in(tmp.path(), &["/HA"]);
        assert_eq!(code, 1);
        assert!(err.contains("/HA is a folder; use -a"), "{err}");
    }

    #[test]
    fn eval_rejects_bad_specs() {
        let tmp = tempfile::tempdir().unwrap();
        let (code, out, _) = run_in(tmp.path(), &["-e", "1X=/HA/port", "-e", "nope", "-e", "P=/HA/port"]);
        assert_eq!(code, 2);
        assert_eq!(out, "P='9001'\n");
    }
}
