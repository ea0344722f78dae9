//! `cargo xtask vm-test`: install what the VM boot test (`tests/vm.rs`) needs,
//! then run it alone.
//!
//! The test builds a Debian root filesystem with `mmdebstrap`, boots it under
//! `qemu-system-x86_64` (TCG) six times and reads the results from the
//! serial console; then cuts the power in each phase of a node's life and
//! judges the boot that follows (`--power-cuts N --seed S` for more cuts,
//! `--power-cut PHASE@FRACTION,…` to replay some). Its containerd is sid's 2.x, unpacked under
//! `target/debian/containerd-sid/` by [`crate::debian`]; the test finds it
//! there. [`prerequisites`] is also what `cargo xtask test` calls before the
//! workspace test run.

use std::path::Path;

use anyhow::{Context, Result};

/// Debian packages (bookworm) the VM test uses, and a binary that tells each
/// is there.
pub const PACKAGES: &[(&str, &str)] = &[
    ("mmdebstrap", "mmdebstrap"),
    ("qemu-system-x86", "qemu-system-x86_64"),
    ("fdisk", "sfdisk"),
    ("e2fsprogs", "mkfs.ext4"),
    ("docker-registry", "docker-registry"),
    ("protobuf-compiler", "protoc"),
];

/// Installs the missing [`PACKAGES`] (as root, with apt-get) and unpacks
/// sid's containerd under `<target>/debian/` (the VM's containerd 2.x).
pub fn prerequisites(target: &Path) -> Result<()> {
    crate::install_missing(PACKAGES, "the VM test")?;
    let containerd = crate::debian::unpacked(target, "containerd", "sid")?;
    eprintln!("xtask: VM containerd {} from {}", containerd.version, containerd.root.display());
    Ok(())
}

/// `cargo xtask vm-test [--power-cuts N [--seed S] | --power-cut SPEC,…] [ARGS…]`:
/// [`prerequisites`], then `cargo test --test vm ARGS… -- --nocapture`; with
/// power-cut options, only the power-cut test, with those cuts.
pub fn run(args: &[String]) -> Result<()> {
    let root = crate::workspace_root()?;
    prerequisites(&root.join("target"))?;
    let mut env = Vec::new();
    let mut rest = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().cloned().with_context(|| format!("{name} needs a value"));
        match a.as_str() {
            "--power-cuts" => env.push(("PRESEED_VM_POWER_CUTS", value(a)?)),
            "--seed" => env.push(("PRESEED_VM_SEED", value(a)?)),
            "--power-cut" => env.push(("PRESEED_VM_POWER_CUT", value(a)?)),
            _ => rest.push(a.clone()),
        }
    }
    let mut cmd = crate::cargo();
    cmd.current_dir(&root).args(["test", "--test", "vm"]).args(&rest);
    if !env.is_empty() {
        cmd.arg("node_recovers_from_power_cuts");
    }
    cmd.args(["--", "--nocapture"]).envs(env);
    // mmdebstrap fetches from the mirror the machine's apt already uses.
    cmd.env("PRESEED_VM_MIRROR", crate::debian::system_mirror());
    if let Some(protoc) = crate::protoc() {
        cmd.env("PROTOC", protoc);
    }
    crate::run_status(&mut cmd)
}
