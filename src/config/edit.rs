//! The only writer of configuration files.
//!
//! Owns: applying a batch of edits (set, delete) to the TOML documents of a configuration
//! directory, validating the result, and writing the changed files atomically.
//! Never: writes anything when one edit of the batch is invalid, or when the result has a
//! problem the directory did not have before.
//!
//! Invariants:
//! - All or nothing: every edit is checked first, then the whole resulting configuration is
//!   validated with the loader; only then is any file written.
//! - A write is a temporary file in the same directory, fsynced, renamed over the target,
//!   then the directory is fsynced: a crash leaves the old or the new file, never a mix.
//!   (Each file is atomic on its own; a batch touching several files is not.)
//! - Comments, ordering and formatting of lines the edit does not touch are preserved
//!   byte for byte (`toml_edit`); a replaced value keeps its trailing comment.
//! - Alias paths are written as canonical keys; an alias entry of the same key is removed.

use std::collections::BTreeSet;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use toml_edit::{DocumentMut, Item, Table, TableLike};

use super::keys::{self, LookupError};
use super::load::{self, ConfigError, Settings, Source};

/// One change requested by the caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Edit {
    /// Set a key (canonical or alias path) from command-line text.
    Set { path: String, value: String },
    /// Remove a key, or a whole subcluster (`/subclusters/<name>`), from every file.
    Delete { path: String },
}

/// Why a batch of edits was refused. Nothing was written.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EditError {
    #[error("{0}")]
    Lookup(LookupError),
    #[error("{path}: bad value {value:?}: expected {expected}")]
    BadValue { path: String, value: String, expected: String },
    #[error("{path} is a folder, not a key; only /subclusters/<name> folders can be deleted")]
    NotAKey { path: String },
    #[error("cannot edit {}: {reason}", file.display())]
    File { file: PathBuf, reason: String },
    /// The edits would make the configuration invalid.
    #[error("{0}")]
    Invalid(ConfigError),
}

/// What a successful batch did.
#[derive(Clone, Debug, Default)]
pub struct EditOutcome {
    /// Files written.
    pub written: Vec<PathBuf>,
    /// Things worth telling the admin (alias rewritten, key was not set, ...).
    pub notes: Vec<String>,
    /// Problems the directory already had before the edit and still has.
    pub remaining: Vec<ConfigError>,
}

struct FileDoc {
    path: PathBuf,
    original: Option<String>,
    doc: Result<DocumentMut, String>,
    changed: bool,
}

impl FileDoc {
    fn name(&self) -> String {
        self.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
    }
    fn text(&self) -> Option<String> {
        match (&self.doc, self.changed) {
            (Ok(doc), true) => Some(doc.to_string()),
            _ => self.original.clone(),
        }
    }
}

/// Applies `edits` to the configuration directory `dir` (created if missing), validating the
/// whole result first. Returns every problem, and writes nothing, if anything is wrong.
pub fn apply(dir: &Path, edits: &[Edit]) -> Result<EditOutcome, Vec<EditError>> {
    let mut files = read_docs(dir).map_err(|e| vec![e])?;
    let before = validate(dir, &files);
    let mut outcome = EditOutcome::default();
    let mut errors = Vec::new();

    for edit in edits {
        let result = match edit {
            Edit::Set { path, value } => set(&mut files, dir, path, value, &mut outcome.notes),
            Edit::Delete { path } => delete(&mut files, path, &mut outcome.notes),
        };
        if let Err(e) = result {
            errors.push(e);
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }

    let after = validate(dir, &files);
    let known: BTreeSet<String> = before.iter().map(ConfigError::identity).collect();
    let (old, new): (Vec<_>, Vec<_>) = after.into_iter().partition(|e| known.contains(&e.identity()));
    if !new.is_empty() {
        return Err(new.into_iter().map(EditError::Invalid).collect());
    }
    outcome.remaining = old;

    if files.iter().any(|f| f.changed) {
        std::fs::create_dir_all(dir)
            .map_err(|e| vec![EditError::File { file: dir.to_path_buf(), reason: e.to_string() }])?;
    }
    for f in files.iter().filter(|f| f.changed) {
        let text = f.text().unwrap_or_default();
        if f.original.as_deref() == Some(text.as_str()) {
            continue;
        }
        write_atomic(&f.path, text.as_bytes())
            .map_err(|e| vec![EditError::File { file: f.path.clone(), reason: e.to_string() }])?;
        outcome.written.push(f.path.clone());
    }
    Ok(outcome)
}

fn read_docs(dir: &Path) -> Result<Vec<FileDoc>, EditError> {
    let paths = match load::config_files(dir) {
        Ok(p) => p,
        Err(ConfigError::MissingDir { .. }) => vec![],
        Err(e) => return Err(EditError::File { file: dir.to_path_buf(), reason: e.to_string() }),
    };
    let mut files = Vec::new();
    for path in paths {
        // An unreadable file might define the key being edited: refuse rather than guess.
        let text = std::fs::read_to_string(&path)
            .map_err(|e| EditError::File { file: path.clone(), reason: e.to_string() })?;
        let doc = text.parse::<DocumentMut>().map_err(|e| format!("not valid TOML: {}", e.message()));
        files.push(FileDoc { path, original: Some(text), doc, changed: false });
    }
    Ok(files)
}

fn validate(dir: &Path, files: &[FileDoc]) -> Vec<ConfigError> {
    let sources: Vec<Source> =
        files.iter().filter_map(|f| f.text().map(|text| Source { file: f.path.clone(), text })).collect();
    match super::preflight::build_checked(&Settings::from_sources(dir, &sources), &super::preflight::system_resolve) {
        Ok(_) => vec![],
        Err(e) => e.0,
    }
}

/// The alias form of a canonical path, if it has one.
fn alias_segments(canon: &[String]) -> Option<Vec<String>> {
    match canon.first().map(String::as_str) {
        Some("HA" | "subclusters") => {
            Some(std::iter::once("vsmserver".to_string()).chain(canon.iter().cloned()).collect())
        }
        _ => None,
    }
}

fn segs_of(canon: &str) -> Vec<String> {
    canon.trim_start_matches('/').split('/').map(str::to_string).collect()
}

fn set(files: &mut Vec<FileDoc>, dir: &Path, path: &str, text: &str, notes: &mut Vec<String>) -> Result<(), EditError> {
    let key = keys::lookup(path).map_err(EditError::Lookup)?;
    let value = key.def.ty.parse_text(text).map_err(|expected| EditError::BadValue {
        path: key.path.clone(),
        value: text.to_string(),
        expected,
    })?;
    let segs = segs_of(&key.path);
    if keys::canonical(path).is_ok_and(|(_, alias)| alias) {
        notes.push(format!("{} is an alias: writing {}", path.trim(), key.path));
    }
    if let Some(alias) = alias_segments(&segs) {
        for f in files.iter_mut() {
            if let Ok(doc) = &mut f.doc {
                if remove_in(doc.as_table_mut(), &alias) {
                    f.changed = true;
                    notes.push(format!("removed the alias entry /{} from {}", alias.join("/"), f.name()));
                }
            }
        }
    }
    let toml_value = value.to_toml();
    // Where it is already set; else a file that already has its table; else its home file.
    let parent = &segs[..segs.len() - 1];
    let target =
        files.iter().position(|f| f.doc.as_ref().is_ok_and(|d| get_in(d.as_table(), &segs).is_some())).or_else(|| {
            files.iter().position(|f| {
                f.doc.as_ref().is_ok_and(|d| get_in(d.as_table(), parent).is_some_and(|i| i.is_table_like()))
            })
        });
    let idx = match target {
        Some(i) => i,
        None => {
            let home = dir.join(keys::home_file(&key.path));
            match files.iter().position(|f| f.path == home) {
                Some(i) => i,
                None => {
                    files.push(FileDoc { path: home, original: None, doc: Ok(DocumentMut::new()), changed: false });
                    files.len() - 1
                }
            }
        }
    };
    let f = &mut files[idx];
    let doc = f.doc.as_mut().map_err(|reason| EditError::File { file: f.path.clone(), reason: reason.clone() })?;
    set_in(doc.as_table_mut(), &segs, toml_value).map_err(|reason| EditError::File { file: f.path.clone(), reason })?;
    f.changed = true;
    Ok(())
}

fn delete(files: &mut [FileDoc], path: &str, notes: &mut Vec<String>) -> Result<(), EditError> {
    let canon = match keys::lookup(path) {
        Ok(key) => key.path,
        Err(lookup) => {
            let (canon, _) = keys::canonical(path).map_err(|m| EditError::Lookup(LookupError::Invalid(m)))?;
            let segs = segs_of(&canon);
            let is_subcluster = segs.len() == 2 && segs[0] == "subclusters";
            if !is_subcluster {
                if keys::is_folder(&canon) {
                    return Err(EditError::NotAKey { path: canon });
                }
                return Err(EditError::Lookup(lookup));
            }
            canon
        }
    };
    let segs = segs_of(&canon);
    let mut removed = false;
    let forms: Vec<Vec<String>> = std::iter::once(segs.clone()).chain(alias_segments(&segs)).collect();
    for f in files.iter_mut() {
        let Ok(doc) = &mut f.doc else {
            return Err(EditError::File {
                file: f.path.clone(),
                reason: f.doc.as_ref().err().cloned().unwrap_or_default(),
            });
        };
        for form in &forms {
            if remove_in(doc.as_table_mut(), form) {
                f.changed = true;
                removed = true;
            }
        }
    }
    if !removed {
        notes.push(format!("{canon} was not set in any file; nothing to delete"));
    }
    Ok(())
}

fn get_in<'a>(table: &'a dyn TableLike, segs: &[String]) -> Option<&'a Item> {
    let (first, rest) = segs.split_first()?;
    let item = table.get(first)?;
    if rest.is_empty() {
        return Some(item);
    }
    get_in(item.as_table_like()?, rest)
}

fn set_in(table: &mut dyn TableLike, segs: &[String], value: toml_edit::Value) -> Result<(), String> {
    let Some((first, rest)) = segs.split_first() else {
        return Err("empty key path".into());
    };
    if rest.is_empty() {
        match table.get_mut(first) {
            Some(Item::Value(old)) => {
                let decor = old.decor().clone();
                *old = value;
                *old.decor_mut() = decor;
            }
            Some(_) => return Err(format!("{first} is a table, expected a value")),
            None => {
                table.insert(first, Item::Value(value));
            }
        }
        return Ok(());
    }
    if table.get(first).is_none() {
        let mut t = Table::new();
        t.set_implicit(true);
        table.insert(first, Item::Table(t));
    }
    match table.get_mut(first).and_then(Item::as_table_like_mut) {
        Some(child) => set_in(child, rest, value),
        None => Err(format!("{first} is a value, expected a table")),
    }
}

/// Removes a key (or table) at `segs`; parent tables are left in place so their comments
/// survive.
fn remove_in(table: &mut dyn TableLike, segs: &[String]) -> bool {
    let Some((first, rest)) = segs.split_first() else {
        return false;
    };
    if rest.is_empty() {
        return table.remove(first).is_some();
    }
    match table.get_mut(first).and_then(Item::as_table_like_mut) {
        Some(child) => remove_in(child, rest),
        None => false,
    }
}

/// Writes `bytes` to `path` atomically: temporary file in the same directory, fsync, rename,
/// fsync of the directory. Keeps the mode of an existing file; new files get 0644.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let mode = std::fs::metadata(path).map(|m| m.permissions().mode() & 0o7777).unwrap_or(0o644);
    let mut tmp = tempfile::Builder::new().prefix(&format!(".{name}.")).suffix(".tmp").tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().set_permissions(std::fs::Permissions::from_mode(mode))?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set_edit(path: &str, value: &str) -> Edit {
        Edit::Set { path: path.into(), value: value.into() }
    }

    fn read(dir: &Path, file: &str) -> String {
        std::fs::read_to_string(dir.join(file)).unwrap_or_default()
    }

    #[test]
    fn set_creates_dir_and_home_files() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("etc");
        let out = apply(
            &dir,
            &[
                set_edit("/HA/port", "9100"),
                set_edit("/subclusters/default/agents", "a1 a2"),
                set_edit("/vsmagent/master_hostname", "tlha"),
            ],
        )
        .unwrap();
        assert_eq!(out.written.len(), 3);
        assert_eq!(read(&dir, "ha.toml"), "[HA]\nport = 9100\n");
        assert_eq!(read(&dir, "cluster.toml"), "[subclusters.default]\nagents = [\"a1\", \"a2\"]\n");
        let c = load::load(&dir).unwrap();
        assert_eq!(c.ha.port, 9100);
        assert_eq!(c.vsmagent.master_hostname, "tlha");
        let mode = std::fs::metadata(dir.join("ha.toml")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        // No temporary files left behind.
        let names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 3, "{names:?}");
    }

    #[test]
    fn replace_keeps_comments_and_trailing_comment() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(
            tmp.path().join("ha.toml"),
            "# top comment\n[HA]\n# about port\nport = 9001   # the peer port\nsync = \"ack\"\n",
        )
        .unwrap();
        apply(tmp.path(), &[set_edit("/HA/port", "9200")]).unwrap();
        assert_eq!(
            read(tmp.path(), "ha.toml"),
            "# top comment\n[HA]\n# about port\nport = 9200   # the peer port\nsync = \"ack\"\n"
        );
    }

    #[test]
    fn alias_write_goes_to_canonical_and_removes_alias_entry() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(
            tmp.path().join("vsmserver.toml"),
            "[vsmserver]\nlisten_port = 9000\n\n[vsmserver.HA]\nenabled = false\n",
        )
        .unwrap();
        let out = apply(tmp.path(), &[set_edit("/vsmserver/HA/port", "9300"), set_edit("/HA/enabled", "no")]).unwrap();
        assert!(out.notes.iter().any(|n| n.contains("alias")), "{:?}", out.notes);
        assert_eq!(read(tmp.path(), "vsmserver.toml"), "[vsmserver]\nlisten_port = 9000\n\n[vsmserver.HA]\n");
        assert_eq!(read(tmp.path(), "ha.toml"), "[HA]\nport = 9300\nenabled = false\n");
    }

    #[test]
    fn writes_into_file_that_already_holds_the_folder() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("site.toml"), "[HA]\nport = 9001\n").unwrap();
        apply(tmp.path(), &[set_edit("/HA/sync", "async")]).unwrap();
        assert_eq!(read(tmp.path(), "site.toml"), "[HA]\nport = 9001\nsync = \"async\"\n");
        assert!(!tmp.path().join("ha.toml").exists());
    }

    #[test]
    fn all_or_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("ha.toml"), "[HA]\nport = 9001\n").unwrap();
        let errs = apply(
            tmp.path(),
            &[set_edit("/HA/port", "9100"), set_edit("/HA/sync", "never"), set_edit("/HA/nope", "1")],
        )
        .unwrap_err();
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert_eq!(read(tmp.path(), "ha.toml"), "[HA]\nport = 9001\n");
        // A cross-key problem introduced by the batch also refuses it.
        let errs =
            apply(tmp.path(), &[set_edit("/HA/port", "9100"), set_edit("/vsmagent/display_min", "5000")]).unwrap_err();
        assert!(errs[0].to_string().contains("must be less than"), "{errs:?}");
        assert_eq!(read(tmp.path(), "ha.toml"), "[HA]\nport = 9001\n");
    }

    #[test]
    fn existing_problems_do_not_block_unrelated_edits() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("ha.toml"), "[HA]\nport = 0\nsync = \"x\"\n").unwrap();
        let out = apply(tmp.path(), &[set_edit("/HA/port", "9100")]).unwrap();
        assert_eq!(out.remaining.len(), 1, "{:?}", out.remaining);
        assert_eq!(read(tmp.path(), "ha.toml"), "[HA]\nport = 9100\nsync = \"x\"\n");
    }

    #[test]
    fn ha_enable_without_secret_is_refused_with_a_hint() {
        let tmp = tempfile::tempdir().unwrap();
        let errs = apply(
            tmp.path(),
            &[set_edit("/HA/enabled", "1"), set_edit("/subclusters/default/agents", "agent1.example.com")],
        )
        .unwrap_err();
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(errs[0].to_string().contains("head -c 32 /dev/urandom >"), "{errs:?}");
        assert!(!tmp.path().join("ha.toml").exists());
    }

    #[test]
    fn delete_keys_and_subclusters() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(
            tmp.path().join("cluster.toml"),
            "# cluster\n[subclusters.a]\nagents = [\"h1\"]\n\n[subclusters.b]\nagents = [\"h2\"]\nusers = [\"u\"]\n",
        )
        .unwrap();
        apply(tmp.path(), &[Edit::Delete { path: "/subclusters/b".into() }]).unwrap();
        assert_eq!(read(tmp.path(), "cluster.toml"), "# cluster\n[subclusters.a]\nagents = [\"h1\"]\n");
        std::fs::write(tmp.path().join("ha.toml"), "[HA]\nport = 9100 # x\nsync = \"async\"\n").unwrap();
        apply(tmp.path(), &[Edit::Delete { path: "/vsmserver/HA/port".into() }]).unwrap();
        assert_eq!(read(tmp.path(), "ha.toml"), "[HA]\nsync = \"async\"\n");
        let out = apply(tmp.path(), &[Edit::Delete { path: "/HA/port".into() }]).unwrap();
        assert!(out.notes[0].contains("not set"));
        assert!(matches!(
            apply(tmp.path(), &[Edit::Delete { path: "/HA".into() }]).unwrap_err()[0],
            EditError::NotAKey { .. }
        ));
    }

    #[test]
    fn refuses_to_edit_a_broken_target_file() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("ha.toml"), "[HA\n").unwrap();
        let errs = apply(tmp.path(), &[set_edit("/HA/port", "9100")]).unwrap_err();
        assert!(errs[0].to_string().contains("not valid TOML"), "{errs:?}");
        assert_eq!(read(tmp.path(), "ha.toml"), "[HA\n");
    }

    #[test]
    fn weights_hosts_are_quoted_keys() {
        let tmp = tempfile::tempdir().unwrap();
        apply(
            tmp.path(),
            &[
                set_edit("/subclusters/default/agents", "agent1.example.com"),
                set_edit("/agents/weights/agent1.example.com", "200"),
            ],
        )
        .unwrap();
        assert_eq!(
            read(tmp.path(), "cluster.toml"),
            "[subclusters.default]\nagents = [\"agent1.example.com\"]\n\n[agents.weights]\n\"agent1.example.com\" = 200\n"
        );
        assert_eq!(load::load(tmp.path()).unwrap().agents.weights["agent1.example.com"], 200);
    }
}
