//! `xtask`: builds what the Debian package needs besides the programs, and the package.
//!
//! - `cargo xtask assets [DIR]`: man pages (from the clap definitions) and bash, zsh and fish
//!   completions into DIR (default `target/assets` of this checkout), where the
//!   `[package.metadata.deb]` assets in Cargo.toml expect them;
//! - `cargo xtask deb [ARGS...]`: `assets`, then `cargo deb --strip ARGS...`.
//!
//! Not installed by the package; all logic lives in `vsm::cli::dist`.
use std::path::PathBuf;
use std::process::{Command, ExitCode};

const USAGE: &str = "usage: xtask assets [DIR] | xtask deb [cargo-deb arguments...]";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let default_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/assets");
    match args.first().map(String::as_str) {
        Some("assets") => {
            let dir = args.get(1).map(PathBuf::from).unwrap_or(default_dir);
            match vsm::cli::dist::write_assets(&dir) {
                Ok(files) => {
                    vsm::outln!("xtask: wrote {} file(s) under {}", files.len(), dir.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    vsm::errln!("xtask: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Some("deb") => {
            if let Err(e) = vsm::cli::dist::write_assets(&default_dir) {
                vsm::errln!("xtask: {e}");
                return ExitCode::from(1);
            }
            let status = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
                .args(["deb", "--strip"])
                .args(&args[1..])
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .status();
            match status {
                Ok(s) if s.success() => ExitCode::SUCCESS,
                Ok(s) => {
                    vsm::errln!(
                        "xtask: cargo deb failed ({s}); is cargo-deb installed (cargo install cargo-deb --locked)?"
                    );
                    ExitCode::from(1)
                }
                Err(e) => {
                    vsm::errln!("xtask: cannot run cargo deb: {e}");
                    ExitCode::from(1)
                }
            }
        }
        _ => {
            vsm::errln!("{USAGE}");
            ExitCode::from(2)
        }
    }
}
