//! Files generated from the command-line definitions for the Debian package: man pages and
//! shell completions (`cargo xtask assets`).
//!
//! Owns: the list of programs and their manual sections ([`programs`]), and the layout of the
//! generated tree, which `[package.metadata.deb]` in Cargo.toml installs.
//! Never: writes outside the directory it is given.
//!
//! Invariant: every installed program is in [`programs`], so each has a man page and
//! completions; a program added to the package is added here too.

use clap::CommandFactory;
use std::path::{Path, PathBuf};

/// Why generating the files failed.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
}

/// One installed program: its command-line definition and manual section (8 for daemons, 1 for
/// programs users and admins run).
pub struct Program {
    pub command: clap::Command,
    pub section: &'static str,
}

/// Every program the package installs.
pub fn programs() -> Vec<Program> {
    vec![
        Program { command: super::vsmserver::Args::command(), section: "8" },
        Program { command: super::vsmagent::Args::command(), section: "8" },
        Program { command: super::vsmclient::Args::command(), section: "1" },
        Program { command: super::tlctl::Args::command(), section: "1" },
        Program { command: crate::config::cli::Args::command(), section: "1" },
        Program { command: super::vsmconnect::Args::command(), section: "1" },
    ]
}

/// The visible subcommands of `cmd`, with their full names (`tlctl-session-list`), depth first.
pub fn subcommands(cmd: &clap::Command) -> Vec<(String, clap::Command)> {
    fn walk(prefix: &str, cmd: &clap::Command, out: &mut Vec<(String, clap::Command)>) {
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set() && s.get_name() != "help") {
            let name = format!("{prefix}-{}", sub.get_name());
            out.push((name.clone(), sub.clone()));
            walk(&name, sub, out);
        }
    }
    let mut out = Vec::new();
    walk(cmd.get_name(), cmd, &mut out);
    out
}

fn write(path: PathBuf, bytes: &[u8], written: &mut Vec<PathBuf>) -> Result<(), DistError> {
    let fail = |source| DistError::Write { path: path.clone(), source };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(fail)?;
    }
    std::fs::write(&path, bytes).map_err(fail)?;
    written.push(path);
    Ok(())
}

fn man_page(cmd: clap::Command, section: &'static str) -> Vec<u8> {
    let mut buf = Vec::new();
    // Rendering into memory cannot fail.
    let _ = clap_mangen::Man::new(cmd).section(section).manual("vsm").source("vsm").render(&mut buf);
    buf
}

/// Writes `man/man<section>/<program>[-<subcommand>...].<section>` and
/// `completions/{bash,zsh,fish}/...` under `dir`; returns the files written.
pub fn write_assets(dir: &Path) -> Result<Vec<PathBuf>, DistError> {
    use clap_complete::Shell;
    let mut written = Vec::new();
    for p in programs() {
        let name = p.command.get_name().to_string();
        let mandir = dir.join(format!("man/man{}", p.section));
        for (full, sub) in subcommands(&p.command) {
            let page = man_page(sub.name(full.clone()), p.section);
            write(mandir.join(format!("{full}.{}", p.section)), &page, &mut written)?;
        }
        write(mandir.join(format!("{name}.{}", p.section)), &man_page(p.command.clone(), p.section), &mut written)?;
        for (shell, file) in [
            (Shell::Bash, format!("bash/{name}")),
            (Shell::Zsh, format!("zsh/_{name}")),
            (Shell::Fish, format!("fish/{name}.fish")),
        ] {
            let mut buf = Vec::new();
            let mut cmd = p.command.clone();
            clap_complete::generate(shell, &mut cmd, name.clone(), &mut buf);
            write(dir.join("completions").join(file), &buf, &mut written)?;
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn has_examples(cmd: &clap::Command) -> bool {
        cmd.get_after_help().is_some_and(|h| h.to_string().contains("Examples:"))
            || cmd.get_after_long_help().is_some_and(|h| h.to_string().contains("Examples:"))
    }

    #[test]
    fn every_program_and_subcommand_has_examples() {
        for p in programs() {
            let mut missing = Vec::new();
            if !has_examples(&p.command) {
                missing.push(p.command.get_name().to_string());
            }
            for (name, sub) in subcommands(&p.command) {
                if !has_examples(&sub) {
                    missing.push(name);
                }
            }
            assert!(missing.is_empty(), "no \"Examples:\" in the help of {missing:?}");
        }
    }

    #[test]
    fn command_definitions_are_consistent() {
        for p in programs() {
            p.command.debug_assert();
        }
    }

    #[test]
    fn assets_cover_every_program() {
        let dir = tempfile::tempdir().unwrap();
        let files = write_assets(dir.path()).unwrap();
        for (name, section) in [("vsmserver", 8), ("vsmagent", 8), ("tlctl", 1), ("vsmclient", 1), ("tl-config", 1)] {
            let page = std::fs::read_to_string(dir.path().join(format!("man/man{section}/{name}.{section}"))).unwrap();
            assert!(page.contains(".TH"), "{name}: not a man page");
            assert!(dir.path().join(format!("completions/bash/{name}")).is_file(), "{name}: bash");
            assert!(dir.path().join(format!("completions/zsh/_{name}")).is_file(), "{name}: zsh");
            assert!(dir.path().join(format!("completions/fish/{name}.fish")).is_file(), "{name}: fish");
        }
        let list = std::fs::read_to_string(dir.path().join("man/man1/tlctl-session-list.1")).unwrap();
        assert!(list.contains("refresh"), "subcommand pages document their flags");
        assert!(files.iter().all(|f| f.starts_with(dir.path())));
    }
}
