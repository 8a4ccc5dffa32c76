//! Build-time facts for the test suite.
//!
//! Tests that need root (network namespaces, bridges, mounts) are marked
//! `#[cfg_attr(not(vsm_root), ignore = "...")]`, so a run without root reports them as
//! ignored instead of passing them silently. Whether the build runs as root is read from the
//! owner of `/proc/self`, which is the effective user id of this build script.

use std::os::unix::fs::MetadataExt;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(vsm_root)");
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=USER");
    println!("cargo::rerun-if-env-changed=SUDO_USER");
    if std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false) {
        println!("cargo::rustc-cfg=vsm_root");
    }
}
