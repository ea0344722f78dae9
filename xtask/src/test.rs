//! `cargo xtask test`: install what the tests need, then run them all.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

/// Debian packages the tests use, and a binary that tells each is there.
const PACKAGES: &[(&str, &str)] = &[
    ("docker-registry", "docker-registry"),
    ("containerd", "containerd"),
    ("runc", "runc"),
    ("skopeo", "skopeo"),
    ("squashfs-tools", "mksquashfs"),
    ("erofs-utils", "mkfs.erofs"),
    ("apache2-utils", "htpasswd"),
    ("protobuf-compiler", "protoc"),
    ("openssl", "openssl"),
];

fn have(binary: &str) -> bool {
    ["/usr/bin", "/usr/sbin", "/bin", "/sbin", "/usr/local/bin"]
        .iter()
        .any(|d| std::path::Path::new(d).join(binary).exists())
}

/// Installs missing packages (root only), then `cargo test --workspace`.
pub fn run(args: &[String]) -> Result<()> {
    let missing: Vec<&str> = PACKAGES.iter().filter(|(_, bin)| !have(bin)).map(|(pkg, _)| *pkg).collect();
    if !missing.is_empty() {
        let root = Command::new("id").arg("-u").output().map(|o| o.stdout == b"0\n").unwrap_or(false);
        if !root {
            bail!(
                "tests need these Debian packages: {}; install them (as root: apt-get install {})",
                missing.join(" "),
                missing.join(" ")
            );
        }
        eprintln!("xtask: installing {}", missing.join(" "));
        crate::run_status(Command::new("apt-get").args(["update", "-qq"]))?;
        crate::run_status(
            Command::new("apt-get")
                .env("DEBIAN_FRONTEND", "noninteractive")
                .args(["install", "-y", "-qq", "--no-install-recommends"])
                .args(&missing),
        )?;
    }
    let root = crate::workspace_root()?;
    let mut cmd = crate::cargo();
    cmd.current_dir(&root).args(["test", "--workspace"]).args(args);
    if let Some(protoc) = crate::protoc() {
        cmd.env("PROTOC", protoc);
    }
    // Pass cargo's output through, adding up its per-binary results so the
    // run ends on one line that counts every test.
    cmd.stdout(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("running {cmd:?}"))?;
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        println!("{line}");
        if let Some(counts) = line.strip_prefix("test result: ") {
            for part in counts.split(['.', ';']) {
                let mut words = part.split_whitespace();
                if let (Some(n), Some(what)) = (words.next().and_then(|n| n.parse::<u64>().ok()), words.next()) {
                    match what {
                        "passed" => passed += n,
                        "failed" => failed += n,
                        "ignored" => ignored += n,
                        _ => {}
                    }
                }
            }
        }
    }
    let status = child.wait()?;
    println!("xtask: {passed} passed, {failed} failed, {ignored} skipped");
    if !status.success() {
        bail!("cargo test failed: {status}");
    }
    Ok(())
}
