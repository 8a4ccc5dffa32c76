//! Every source file opens with a `//!` doc saying what it owns and what must hold, and every
//! module of the library appears in `docs/architecture.md`.

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn every_source_file_has_a_module_doc() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    rust_files(&root.join("tests/chaos"), &mut files);
    assert!(files.len() > 20, "found only {} files", files.len());
    let missing: Vec<_> = files
        .iter()
        .filter(|f| !std::fs::read_to_string(f).unwrap().trim_start().starts_with("//!"))
        .map(|f| f.strip_prefix(root).unwrap().display().to_string())
        .collect();
    assert!(missing.is_empty(), "files without a //! module doc: {missing:?}");
}

#[test]
fn every_top_level_module_is_in_the_architecture_doc() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let arch = std::fs::read_to_string(root.join("docs/architecture.md")).unwrap();
    let lib = std::fs::read_to_string(root.join("src/lib.rs")).unwrap();
    let mut missing = Vec::new();
    for line in lib.lines() {
        if let Some(m) = line.trim().strip_prefix("pub mod ").and_then(|r| r.strip_suffix(';')) {
            let dir = format!("`src/{m}/`");
            let file = format!("`src/{m}.rs`");
            if !arch.contains(&dir) && !arch.contains(&file) {
                missing.push(m.to_string());
            }
        }
    }
    assert!(missing.is_empty(), "modules missing from docs/architecture.md: {missing:?}");
}

/// Backticked words of a line: `like this`.
fn backticked(line: &str) -> Vec<&str> {
    line.split('`').skip(1).step_by(2).collect()
}

/// The `src/` directories and files a code-map heading names (`### \`src/ha/\`, \`src/x.rs\``).
fn heading_paths(heading: &str) -> Vec<String> {
    backticked(heading).into_iter().filter(|w| w.starts_with("src/")).map(str::to_string).collect()
}

/// Every `.rs` file of a heading's paths.
fn section_files(root: &Path, paths: &[String]) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for p in paths {
        let full = root.join(p);
        if full.is_dir() {
            rust_files(&full, &mut files);
        } else if full.is_file() {
            files.push(full);
        }
    }
    files
}

/// Is `name` defined (as a function, constant, static, type or module) in `text`?
fn defines(text: &str, name: &str) -> bool {
    ["fn ", "const ", "static ", "struct ", "enum ", "type ", "trait ", "mod ", "macro_rules! "].iter().any(|kw| {
        text.match_indices(&format!("{kw}{name}")).any(|(i, m)| {
            let after = text[i + m.len()..].chars().next();
            !after.is_some_and(|c| c.is_alphanumeric() || c == '_')
        })
    })
}

/// The file of a module path (`ha::engine`, or `listen` inside `src/proto/`), if there is one.
fn module_file(base: &Path, segments: &[&str]) -> Option<PathBuf> {
    if segments.is_empty() {
        return None;
    }
    let rel: PathBuf = segments.iter().collect();
    [base.join(&rel).with_extension("rs"), base.join(&rel).join("mod.rs")].into_iter().find(|p| p.is_file())
}

fn is_ident(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// What `docs/architecture.md` names in backticks must exist:
/// - a `src/...` path: the file or directory;
/// - a bare file or directory name (`load.rs`, `engine/`, `tests.rs`) in a code-map section:
///   a file or directory of that name under the section's directories (or the section's own
///   directory);
/// - `name()`: a function `name` in the files of the section it appears in;
/// - `module::item` (`ha::engine::shared_clock_ms`, or `listen::serve` inside the `src/proto/`
///   section): `item` defined in that module's file; `Type::item` with a snake-case item: a
///   function `item` in the section's files. Paths into other crates (`std::...`) and enum
///   variants are not checked.
#[test]
fn what_the_architecture_doc_names_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let src = root.join("src");
    let arch = std::fs::read_to_string(root.join("docs/architecture.md")).unwrap();
    let mut problems = Vec::new();
    let mut section: Vec<String> = Vec::new();
    for (n, line) in arch.lines().enumerate() {
        let at = format!("docs/architecture.md:{}", n + 1);
        if line.starts_with("## ") || line.starts_with("### ") {
            section = heading_paths(line);
        }
        let dirs: Vec<PathBuf> = section.iter().map(|p| root.join(p)).filter(|p| p.is_dir()).collect();
        let files = section_files(root, &section);
        let texts: Vec<String> = files.iter().map(|f| std::fs::read_to_string(f).unwrap()).collect();
        for word in backticked(line) {
            if let Some(rel) = word.strip_prefix("src/") {
                if !src.join(rel).exists() {
                    problems.push(format!("{at}: {word} does not exist"));
                }
            } else if (word.ends_with(".rs") || word.ends_with('/'))
                && is_ident(word.trim_end_matches(".rs").trim_end_matches('/'))
            {
                let name = word.trim_end_matches('/');
                let named = |p: &PathBuf| p.file_name().is_some_and(|n| n == name);
                let found = dirs.iter().any(|d| named(d) || d.join(word).exists())
                    || files.iter().any(|f| {
                        named(f) || f.ancestors().any(|a| a.starts_with(root.join("src")) && named(&a.to_path_buf()))
                    });
                if !dirs.is_empty() && !found {
                    problems.push(format!("{at}: {word} is not in {}", section.join(", ")));
                }
            } else if let Some(name) = word.strip_suffix("()") {
                if is_ident(name) && !section.is_empty() && !texts.iter().any(|t| defines(t, name)) {
                    problems.push(format!("{at}: no function {name} in {}", section.join(", ")));
                }
            } else if word.contains("::") {
                let segments: Vec<&str> = word.split("::").collect();
                if !segments.iter().all(|s| is_ident(s)) {
                    continue;
                }
                let (item, path) = segments.split_last().unwrap();
                if path[0].starts_with(char::is_uppercase) {
                    let snake = item.starts_with(char::is_lowercase);
                    if snake && path.len() == 1 && !section.is_empty() && !texts.iter().any(|t| defines(t, item)) {
                        problems.push(format!("{at}: no function {item} in {}", section.join(", ")));
                    }
                    continue;
                }
                if item.starts_with(char::is_uppercase) && item.chars().any(char::is_lowercase) {
                    // An enum variant or a type: not checked.
                    continue;
                }
                let file = module_file(&src, path).or_else(|| dirs.iter().find_map(|d| module_file(d, path)));
                match file {
                    Some(f) if defines(&std::fs::read_to_string(&f).unwrap(), item) => {}
                    Some(f) => {
                        problems.push(format!("{at}: {word}: no {item} in {}", f.strip_prefix(root).unwrap().display()))
                    }
                    None if module_file(&src, &path[..1]).is_some() || src.join(path[0]).is_dir() => {
                        problems.push(format!("{at}: {word}: no module file for {}", path.join("::")))
                    }
                    // Another crate's path (`std::sync::Mutex`).
                    None => {}
                }
            }
        }
    }
    assert!(problems.is_empty(), "docs/architecture.md names what does not exist:\n{}", problems.join("\n"));
}

#[test]
fn the_architecture_check_sees_what_is_missing() {
    let text = "pub fn serve() {}\nconst BATCH_BYTES: usize = 1;\nfn served() {}\n";
    assert!(defines(text, "serve"));
    assert!(defines(text, "BATCH_BYTES"));
    assert!(!defines(text, "serv"));
    assert!(!defines(text, "nothing"));
    assert_eq!(backticked("a `b` c `d()` e"), ["b", "d()"]);
    assert_eq!(heading_paths("### `src/client.rs`, `src/cli/`"), ["src/client.rs", "src/cli/"]);
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    assert!(module_file(&src, &["ha", "engine"]).is_some());
    assert!(module_file(&src, &["telemetry"]).is_some());
    assert!(module_file(&src, &["no_such_module"]).is_none());
}

/// The layers of docs/architecture.md, as imports: a module below another never names it
/// (doc links aside), so every arrow of the structure drawing points down.
#[test]
fn lower_layers_import_nothing_from_higher_ones() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // (directory, what no file below it may import)
    let rules: &[(&str, &[&str])] = &[
        ("src/db", &["crate::config", "crate::ha", "crate::broker", "crate::api", "crate::server", "crate::cli"]),
        ("src/ha", &["crate::broker", "crate::api", "crate::server", "crate::cli"]),
        // (Its simulation, a test, runs the database's own merge rule: `db` is allowed.)
        ("src/ha/engine", &["crate::config"]),
        ("src/proto", &["crate::ha", "crate::broker", "crate::api", "crate::server", "crate::cli"]),
        ("src/broker", &["crate::api", "crate::server", "crate::cli"]),
        ("src/api", &["crate::server", "crate::cli"]),
    ];
    let mut found = Vec::new();
    for (dir, banned) in rules {
        let mut files = Vec::new();
        rust_files(&root.join(dir), &mut files);
        assert!(!files.is_empty(), "{dir} holds no source file");
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap();
            for (n, line) in text.lines().enumerate() {
                let code = line.trim_start();
                if code.starts_with("//") {
                    continue;
                }
                for b in banned.iter() {
                    if code.contains(&format!("{b}::")) || code.contains(&format!("{b};")) {
                        found.push(format!("{}:{}: {b}", f.strip_prefix(root).unwrap().display(), n + 1));
                    }
                }
            }
        }
    }
    assert!(found.is_empty(), "imports against the layers: {found:#?}");
}
