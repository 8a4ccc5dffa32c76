//! The Debian package, built and installed on this machine: every path the units, the OCF
//! agent, the alert agent and the keepalived files name exists once it is installed, the units
//! pass `systemd-analyze verify`, man pages and completions are there, binaries are stripped,
//! and the secrets are created once and never replaced.
//!
//! Needs root: built without root (see `build.rs`) the test is marked ignored. As root it needs
//! `cargo-deb`, `dpkg` and (for the package checks) `lintian`, which scripts/install-test-deps.sh
//! installs, and fails naming what is missing. It prints why it skips and passes when the
//! binaries are not a release build (`cargo test --release`) or `/etc/vsm` already holds a
//! configuration that is not the package's (`VSM_E2E_REQUIRE=1` turns a skip into a failure).
//! It installs the package system-wide and purges it afterwards unless it was installed before.

use nix::fcntl::{Flock, FlockArg};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn note(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

fn skip(why: &str) {
    if std::env::var("VSM_E2E_REQUIRE").as_deref() == Ok("1") {
        panic!("package: cannot run the package test ({why}) but VSM_E2E_REQUIRE=1");
    }
    note(&format!("package: SKIPPED the Debian package test: {why}"));
}

fn run(what: &str, cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{what} failed ({}):\n{text}", out.status);
    text
}

/// `dpkg` with its arguments, waiting up to two minutes for another package manager (an
/// unattended upgrade, say) to release dpkg's lock.
fn dpkg(what: &str, args: &[&std::ffi::OsStr]) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let out = Command::new("dpkg").args(args).output().unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        if out.status.success() {
            return text;
        }
        if !text.contains("lock") || std::time::Instant::now() > deadline {
            panic!("{what} failed ({}):\n{text}", out.status);
        }
        std::thread::sleep(std::time::Duration::from_secs(2));
    }
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

fn package_state() -> String {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", "vsm"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// Absolute paths a file names in the places that must exist on an installed system.
fn named_paths(file: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let mut paths = Vec::new();
    for line in text.lines().map(str::trim) {
        // Units: ExecStart=/usr/sbin/vsmserver ..., Documentation=file:/usr/share/doc/...
        if let Some(v) = line.strip_prefix("ExecStart=") {
            paths.extend(v.split_whitespace().next().map(str::to_string));
            // The configuration directory passed to the daemon.
            let mut words = v.split_whitespace();
            while let Some(w) = words.next() {
                if w == "--config-dir" {
                    paths.extend(words.next().map(str::to_string));
                }
            }
        }
        if let Some(v) = line.strip_prefix("Documentation=") {
            paths.extend(v.split_whitespace().filter_map(|d| d.strip_prefix("file:")).map(str::to_string));
        }
        // OCF agent: OCF_RESKEY_binary_default=/usr/sbin/vsmserver, tlctl, config_dir.
        if line.starts_with("OCF_RESKEY_") && !line.contains("logfile") && !line.contains("pidfile") {
            if let Some((_, v)) = line.split_once("_default=") {
                if v.starts_with('/') {
                    paths.push(v.trim_matches('"').to_string());
                }
            }
        }
        // Alert agent: tlctl=${tlctl:-/usr/bin/tlctl}
        if let Some(v) = line.strip_prefix("tlctl=${tlctl:-") {
            paths.push(v.trim_end_matches('}').to_string());
        }
        // keepalived: script "/usr/bin/tlctl ha check", notify_master "/usr/bin/tlctl ...".
        let keepalived = ["script ", "notify_master ", "notify_backup ", "notify_fault ", "notify_stop ", "notify "];
        if keepalived.iter().any(|k| line.starts_with(k)) {
            if let Some(q) = line.split('"').nth(1) {
                paths.extend(q.split_whitespace().next().filter(|p| p.starts_with('/')).map(str::to_string));
            }
        }
    }
    paths
}

/// Section names of a 64-bit little-endian ELF file (enough to tell whether it was stripped).
fn elf_sections(bytes: &[u8]) -> Vec<String> {
    let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]) as usize;
    let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap()) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap()) as usize;
    assert!(bytes.starts_with(b"\x7fELF\x02\x01"), "a 64-bit little-endian ELF file");
    let (shoff, shentsize, shnum, shstrndx) = (u64_at(0x28), u16_at(0x3a), u16_at(0x3c), u16_at(0x3e));
    let header = |i: usize| shoff + i * shentsize;
    let strtab = u64_at(header(shstrndx) + 0x18);
    (0..shnum)
        .map(|i| {
            let start = strtab + u32_at(header(i));
            let end = bytes[start..].iter().position(|b| *b == 0).map_or(bytes.len(), |n| start + n);
            String::from_utf8_lossy(&bytes[start..end]).into_owned()
        })
        .collect()
}

#[test]
#[cfg_attr(
    not(vsm_root),
    ignore = "needs root: installs the Debian package system-wide (run `cargo test --release` as root)"
)]
fn debian_package_installs_what_it_names() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "package: built as root but running as another user; rebuild as the user who runs the tests (touch build.rs)"
    );
    let server = PathBuf::from(env!("CARGO_BIN_EXE_vsmserver"));
    if server.parent().and_then(Path::file_name).map_or(true, |d| d != "release") {
        return skip("the binaries are not a release build: run cargo test --release");
    }
    assert!(
        cargo().args(["deb", "--version"]).output().is_ok_and(|o| o.status.success()),
        "package: cargo-deb is not installed (scripts/install-test-deps.sh, or cargo install cargo-deb --locked)"
    );
    assert!(Command::new("dpkg").arg("--version").output().is_ok(), "package: dpkg is not installed");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open("/run/vsm-package.lock")
        .expect("open /run/vsm-package.lock");
    note("package: waiting for /run/vsm-package.lock (one package test per machine)");
    let _lock = Flock::lock(lock, FlockArg::LockExclusive).map_err(|(_, e)| e).expect("lock /run/vsm-package.lock");
    let was_installed = package_state().contains("ok installed");
    let etc_in_use = std::fs::read_dir("/etc/vsm").is_ok_and(|mut d| d.next().is_some());
    if !was_installed && etc_in_use {
        return skip("/etc/vsm holds files that are not the package's: this machine's configuration is left alone");
    }

    // Build: generated files, then the package from the binaries of this test run.
    let out = tempfile::tempdir().unwrap();
    run("xtask assets", Command::new(env!("CARGO_BIN_EXE_xtask")).arg("assets").arg(repo().join("target/assets")));
    run(
        "cargo deb",
        cargo().args(["deb", "--no-build", "--strip", "--fast", "--output"]).arg(out.path()).current_dir(repo()),
    );
    let deb = std::fs::read_dir(out.path())
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .expect("cargo deb wrote a .deb");
    note(&format!("package: built {}", deb.display()));

    lintian(&deb);
    dpkg("dpkg -i", &["-i".as_ref(), deb.as_os_str()]);
    let result = std::panic::catch_unwind(|| check_installed(&deb));
    if !was_installed {
        dpkg("dpkg --purge", &["--purge".as_ref(), "vsm".as_ref()]);
        assert!(!Path::new("/etc/vsm/cluster.key").exists(), "purge removes the secrets it created");
    }
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

/// No lintian error or warning beyond the overrides in packaging/deb/lintian-overrides (each
/// explained there).
fn lintian(deb: &Path) {
    assert!(
        Command::new("lintian").arg("--version").output().is_ok(),
        "package: lintian is not installed (scripts/install-test-deps.sh)"
    );
    let out = Command::new("lintian").arg(deb).output().expect("run lintian");
    let text = String::from_utf8_lossy(&out.stdout);
    let tags: Vec<&str> = text.lines().filter(|l| l.starts_with("E:") || l.starts_with("W:")).collect();
    assert!(tags.is_empty(), "lintian:\n{}", tags.join("\n"));
    note("package: lintian clean");
}

fn check_installed(deb: &Path) {
    let listed = run("dpkg -L vsm", Command::new("dpkg").args(["-L", "vsm"]));
    for f in [
        "/usr/sbin/vsmserver",
        "/usr/sbin/vsmagent",
        "/usr/bin/vsmclient",
        "/usr/bin/tlctl",
        "/usr/bin/tl-config",
        "/etc/vsm/vsmserver.toml",
        "/etc/logrotate.d/vsm",
        "/usr/lib/ocf/resource.d/vsm/vsmserver",
        "/usr/lib/vsm/vsm-alert",
        "/usr/share/man/man8/vsmserver.8.gz",
        "/usr/share/man/man8/vsmagent.8.gz",
        "/usr/share/man/man1/tlctl.1.gz",
        "/usr/share/man/man1/tlctl-session-terminate.1.gz",
        "/usr/share/man/man1/vsmclient.1.gz",
        "/usr/share/man/man1/tl-config.1.gz",
        "/usr/share/bash-completion/completions/tlctl",
        "/usr/share/zsh/vendor-completions/_tlctl",
        "/usr/share/fish/vendor_completions.d/tlctl.fish",
        "/usr/share/doc/vsm/README.md",
        "/usr/share/doc/vsm/operations.md",
        "/usr/share/doc/vsm/ha-setup.md",
        "/usr/share/doc/vsm/copyright",
    ] {
        assert!(Path::new(f).exists(), "{f} is installed");
        assert!(listed.lines().any(|l| l == f), "{f} belongs to the package");
    }

    // Every path the integration files name exists.
    let units = ["/lib/systemd/system/vsmserver.service", "/lib/systemd/system/vsmagent.service"];
    let mut files: Vec<PathBuf> = units.iter().map(PathBuf::from).collect();
    files.push("/usr/lib/ocf/resource.d/vsm/vsmserver".into());
    files.push("/usr/lib/vsm/vsm-alert".into());
    for profile in ["guide", "fast"] {
        for node in ["primary", "secondary"] {
            files.push(format!("/usr/share/doc/vsm/examples/keepalived/{profile}/keepalived-{node}.conf").into());
        }
    }
    let mut checked = 0;
    for f in &files {
        let named = named_paths(f);
        assert!(!named.is_empty(), "{} names no path: the parser no longer matches it", f.display());
        for p in named {
            assert!(Path::new(&p).exists(), "{} names {p}, which the package does not install", f.display());
            checked += 1;
        }
    }
    note(&format!("package: {checked} path(s) named by the units, OCF and alert agents and keepalived files exist"));
    use std::os::unix::fs::PermissionsExt;
    for bin in
        ["/usr/sbin/vsmserver", "/usr/bin/tlctl", "/usr/lib/ocf/resource.d/vsm/vsmserver", "/usr/lib/vsm/vsm-alert"]
    {
        let mode = std::fs::metadata(bin).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755, "{bin} is executable by root only to write: {mode:o}");
    }

    // Stripped: no DWARF left in the programs.
    for bin in ["/usr/sbin/vsmserver", "/usr/sbin/vsmagent", "/usr/bin/tlctl"] {
        let sections = elf_sections(&std::fs::read(bin).unwrap());
        assert!(sections.iter().any(|s| s == ".text"), "{bin}: sections read: {sections:?}");
        // (.debug_gdb_scripts is loaded data, not debug information.)
        let debug = [".symtab", ".debug_info", ".debug_line", ".debug_str"];
        assert!(!sections.iter().any(|s| debug.contains(&s.as_str())), "{bin} is stripped: {sections:?}");
    }
    run("tlctl --version", Command::new("/usr/bin/tlctl").arg("--version"));

    // The units are valid where systemd-analyze can check them.
    if Command::new("systemd-analyze").arg("--version").output().is_ok_and(|o| o.status.success()) {
        let out = Command::new("systemd-analyze").arg("verify").args(units).output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(
            !text.contains("is not executable") && !text.contains("No such file"),
            "systemd-analyze verify:\n{text}"
        );
        assert!(out.status.success(), "systemd-analyze verify failed:\n{text}");
        note("package: systemd-analyze verify passed");
    } else {
        note("package: systemd-analyze not available: unit verification skipped");
    }

    // Secrets: created at install, private, and never replaced by a reinstall.
    for key in ["/etc/vsm/cluster.key", "/etc/vsm/ha.key"] {
        let meta = std::fs::metadata(key).unwrap_or_else(|e| panic!("{key}: {e}"));
        assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{key} is private");
        assert!(meta.len() >= 16, "{key} holds a secret");
    }
    let before = std::fs::read("/etc/vsm/cluster.key").unwrap();
    let again = dpkg("dpkg -i (again)", &["-i".as_ref(), deb.as_os_str()]);
    assert_eq!(std::fs::read("/etc/vsm/cluster.key").unwrap(), before, "a reinstall keeps the secrets");
    assert!(!again.contains("created new random secrets"), "nothing to create the second time:\n{again}");

    // The installed configuration is valid as shipped.
    run("tl-config --check", Command::new("/usr/bin/tl-config").args(["--check"]));
}
