//! `cargo xtask bundle`: the default bundle of this workspace.

use anyhow::Result;

/// Runs `preseed bundle` (built without the containerd loader, so no
/// `protoc` is needed) on `<root>/bundles.toml` into `target/preseed`.
/// cargo's own progress shows: the first run downloads and compiles preseed's
/// crates, which takes minutes.
pub fn run(args: &[String]) -> Result<()> {
    let root = crate::workspace_root()?;
    if !root.join("target/release/preseed").exists() {
        eprintln!(
            "xtask: building preseed (release, without the loader) — the first time, cargo downloads and compiles its \
             crates: a few minutes"
        );
    }
    let mut cmd = crate::cargo();
    cmd.current_dir(&root)
        .args(["run", "--release", "--package", "preseed", "--no-default-features", "--bin", "preseed", "--"])
        .arg("bundle")
        .arg("--manifest")
        .arg(root.join("bundles.toml"))
        .arg("--out")
        .arg(root.join("target/preseed"))
        .args(args);
    crate::run_status(&mut cmd)
}
