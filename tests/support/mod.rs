//! Shared test support: prerequisites, the `preseed` binary and other
//! commands run (`cli`), real servers on loopback, test images and
//! partitions (`fixtures`), CRI calls. Each integration test file includes
//! it with `mod support;`.
#![allow(dead_code)]

pub mod cli;
pub mod containerd;
pub mod cosign;
#[cfg(feature = "containerd")]
pub mod cri;
pub mod fixtures;
pub mod gate;
pub mod images;
pub mod mount;
pub mod registry;
pub mod relay;
pub mod served;
pub mod synthetic;

use std::path::PathBuf;

/// Whether we run in CI, where a missing prerequisite is a failure.
pub fn in_ci() -> bool {
    std::env::var("CI").map(|v| v == "true" || v == "1").unwrap_or(false)
}

/// Finds an external tool on PATH (or in /usr/sbin, /sbin). In CI a missing
/// tool fails the test; elsewhere the test is skipped with a message.
pub fn require_tool(name: &str) -> Option<PathBuf> {
    let dirs = std::env::var("PATH").unwrap_or_default();
    let found = dirs
        .split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/bin"])
        .map(|d| PathBuf::from(d).join(name))
        .find(|p| p.is_file());
    if found.is_none() {
        missing(&format!("tool `{name}` not found (install it, or run `cargo xtask test`)"));
    }
    found
}

/// Requires root (loop mounts, containerd). Same CI rule as [`require_tool`].
pub fn require_root() -> bool {
    // SAFETY: geteuid takes nothing and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        missing("this test needs root (loop mounts, containerd)");
    }
    root
}

fn missing(what: &str) {
    if in_ci() {
        panic!("CI=true and a prerequisite is missing: {what}");
    }
    eprintln!("SKIPPED: {what}");
}

/// A free TCP port on 127.0.0.1 (bound then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}
