//! `cargo xtask`: the project's build system.
//!
//! * `cargo xtask bundle [ARGS…]` = `preseed bundle --manifest <root>/bundles.toml --out target/preseed ARGS…`
//! * `cargo xtask test [ARGS…]`   installs what the tests need (as root, with apt-get) and runs every test,
//!   the node-side ones on containerd 1.6, 1.7 and 2.x
//! * `cargo xtask bench [--scale S]` benchmarks against the tools users would use instead
//! * `cargo xtask vm-test [--power-cuts N --seed S] [ARGS…]` installs what the VM boot test needs and runs it
//!   alone (with `--power-cuts`, N power cuts spread over a node's phases)
//! * `cargo xtask dist [--check]`  builds `target/dist/preseed` and a `.deb`; `--check` installs it, tries it,
//!   removes it
//! * `cargo xtask fuzz [--seconds N] [TARGET…]` fuzzes every parser of untrusted bytes (cargo fuzz, libFuzzer)

mod bench;
mod bundle;
mod debian;
mod dist;
mod fuzz;
mod test;
mod vm;

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let cmd = args.next().unwrap_or_default();
    let rest: Vec<String> = args.collect();
    match cmd.as_str() {
        "bundle" => bundle::run(&rest),
        "test" => test::run(&rest),
        "bench" => bench::run(&rest),
        "vm-test" => vm::run(&rest),
        "dist" => dist::run(&rest),
        "fuzz" => fuzz::run(&rest),
        _ => bail!("usage: cargo xtask <bundle|test|bench|vm-test|dist|fuzz> [ARGS…]\n  bundle  build target/preseed/preseed.erofs from bundles.toml\n  test    install test prerequisites and run every test\n  bench   compare against skopeo + mksquashfs and ctr import\n  vm-test boot a Debian VM under qemu with a preseed partition (--power-cuts N --seed S: cut its power N times)\n  dist    build target/dist/preseed and its .deb (--check: install, try, remove it)\n  fuzz    fuzz every parser of untrusted bytes (--seconds N per target, default 5)"),
    }
}

/// Tests passed, failed and skipped.
#[derive(Default)]
pub struct Counts {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
    /// Tests that did not run, with why (ignored, skipped).
    pub skipped: Vec<String>,
    /// Test binaries that did not finish (crashed, or never built).
    pub not_run: Vec<String>,
}

impl Counts {
    pub fn add(&mut self, o: &Counts) {
        self.passed += o.passed;
        self.failed += o.failed;
        self.ignored += o.ignored;
        self.skipped.extend(o.skipped.iter().cloned());
        self.not_run.extend(o.not_run.iter().cloned());
    }
}

/// The workspace root, from cargo metadata.
pub fn workspace_root() -> Result<PathBuf> {
    let meta = cargo_metadata::MetadataCommand::new().no_deps().exec().context("cargo metadata")?;
    Ok(meta.workspace_root.into_std_path_buf())
}

/// `cargo` as invoked us.
pub fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// Whether a binary is installed in one of the system's bin directories.
pub fn have(binary: &str) -> bool {
    ["/usr/bin", "/usr/sbin", "/bin", "/sbin", "/usr/local/bin"]
        .iter()
        .any(|d| std::path::Path::new(d).join(binary).exists())
}

/// Installs the Debian packages of `packages` (package, a binary it ships)
/// whose binary is missing: with apt-get as root, else an error that names
/// them. `what` says who needs them.
pub fn install_missing(packages: &[(&str, &str)], what: &str) -> Result<()> {
    let missing: Vec<&str> = packages.iter().filter(|(_, bin)| !have(bin)).map(|(pkg, _)| *pkg).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let root = Command::new("id").arg("-u").output().map(|o| o.stdout == b"0\n").unwrap_or(false);
    if !root {
        bail!(
            "{what} need these Debian packages: {}; install them (as root: apt-get install {})",
            missing.join(" "),
            missing.join(" ")
        );
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    run_status(Command::new("apt-get").args(["update", "-qq"]))?;
    run_status(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing),
    )
}

/// Runs a command, failing with its name if it fails.
pub fn run_status(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// `PROTOC` for crates whose build scripts need it, when set; else the
/// build scripts find `protoc` on PATH (Debian's protobuf-compiler, which
/// every command that builds the loader installs, as it does its other tools).
/// `cargo xtask bundle` builds preseed without the loader: no protoc at all.
pub fn protoc() -> Option<PathBuf> {
    std::env::var_os("PROTOC").map(PathBuf::from)
}
