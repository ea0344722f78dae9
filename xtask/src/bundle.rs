//! `cargo xtask bundle`: the default bundle of this workspace.

use anyhow::Result;

/// Runs `preseed bundle` (built without the containerd loader, so no
/// `protoc` is needed) on `<root>/bundles.toml` into `target/preseed`.
pub fn run(args: &[String]) -> Result<()> {
    let root = crate::workspace_root()?;
    let mut cmd = crate::cargo();
    cmd.current_dir(&root)
        .args([
            "run",
            "--quiet",
            "--release",
            "--package",
            "preseed",
            "--no-default-features",
            "--bin",
            "preseed",
            "--",
        ])
        .arg("bundle")
        .arg("--manifest")
        .arg(root.join("bundles.toml"))
        .arg("--out")
        .arg(root.join("target/preseed"))
        .args(args);
    crate::run_status(&mut cmd)
}
