//! `cargo xtask test`: install what the tests need, then run them all.
//!
//! Node-side suites (every test that starts a containerd) run once per
//! containerd version users run: 1.6 (bookworm's package, installed), 1.7
//! (trixie) and 2.x (sid), the newer two fetched and unpacked under
//! `target/debian/` by [`crate::debian`]. The test harness takes the binaries
//! from `PRESEED_CONTAINERD_BIN` (a directory holding `containerd`, `ctr` and
//! the runc shim). The workspace run includes the VM boot test, whose
//! prerequisites [`crate::vm::prerequisites`] provides. The signature tests
//! sign with sid's `cosign` (not in bookworm), fetched the same way and
//! named by `PRESEED_COSIGN_BIN`. Last, unless given test arguments, it
//! builds the Debian package and checks it installed ([`crate::dist`]), and
//! runs every fuzz target for a few seconds ([`crate::fuzz::smoke`]).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::Counts;

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
    ("cryptsetup-bin", "veritysetup"),
];

/// The tests that start a containerd: (test target, name filters).
const CONTAINERD_SUITES: &[(&str, &[&str])] = &[
    ("load", &[]),
    ("hostile", &[]),
    ("place", &[]),
    ("overlay", &[]),
    ("boot", &[]),
    ("verity", &[]),
    ("e2e", &[]),
    ("intree", &["images_import_and_run_in_containerd"]),
    ("bundle", &["corpus_bundles_mounts_and_imports"]),
    (
        "serve",
        &["skopeo_and_containerd_pull_every_image", "cri_pulls_through_a_served_mirror", "a_two_directory_config_path"],
    ),
    ("supply_chain", &["a_node_policy"]),
];

/// A containerd to run the node-side suites against.
pub struct Containerd {
    /// e.g. `2.1.9+ds1-5 (sid)`.
    pub label: String,
    /// Holds `containerd`, `ctr`, `containerd-shim-runc-v2`.
    pub bin: PathBuf,
}

/// bookworm's installed 1.6, then trixie's 1.7 and sid's 2.x.
pub fn containerds(target: &Path) -> Result<Vec<Containerd>> {
    let installed = Command::new("dpkg-query")
        .args(["-W", "-f", "${Version}", "containerd"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let mut out = vec![Containerd { label: format!("{installed} (installed)"), bin: PathBuf::from("/usr/bin") }];
    for suite in ["trixie", "sid"] {
        let pkg = crate::debian::unpacked(target, "containerd", suite)?;
        out.push(Containerd { label: format!("{} ({suite})", pkg.version), bin: pkg.root.join("usr/bin") });
    }
    Ok(out)
}

/// Installs missing packages (root only), then `cargo test --workspace`,
/// then the node-side suites again on each newer containerd, then the
/// package check.
///
/// `--containerd-only` runs just the node-side suites, on every version.
pub fn run(args: &[String]) -> Result<()> {
    let containerd_only = args.iter().any(|a| a == "--containerd-only");
    let args: Vec<String> = args.iter().filter(|a| *a != "--containerd-only").cloned().collect();
    crate::install_missing(PACKAGES, "tests")?;
    let root = crate::workspace_root()?;
    let versions = containerds(&root.join("target"))?;
    let cosign = crate::debian::unpacked(&root.join("target"), "cosign", "sid")?.root.join("usr/bin/cosign");
    if !containerd_only {
        crate::vm::prerequisites(&root.join("target"))?;
    }
    let mut total = Counts::default();
    let mut failures = Vec::new();
    for (i, v) in versions.iter().enumerate() {
        let mut runs: Vec<Vec<String>> = Vec::new();
        if i == 0 && !containerd_only {
            runs.push(vec!["--workspace".into()]);
        } else {
            for (target, filter) in CONTAINERD_SUITES {
                let mut r = vec!["--test".to_string(), target.to_string()];
                r.extend(args.iter().cloned());
                if !filter.is_empty() {
                    r.push("--".to_string());
                    r.extend(filter.iter().map(|f| f.to_string()));
                }
                runs.push(r);
            }
        }
        // The dm-verity tests (ignored: they need device-mapper), where this
        // kernel has it; elsewhere they stay counted as skipped.
        if device_mapper() {
            runs.push(["--test", "verity", "--", "--ignored"].map(String::from).to_vec());
        }
        println!("xtask: containerd {} from {}", v.label, v.bin.display());
        let mut counts = Counts::default();
        for r in runs {
            let extra: &[String] = if r[0] == "--workspace" { &args } else { &[] };
            let mut cmd = crate::cargo();
            cmd.current_dir(&root).args(["test", "--no-fail-fast"]).args(&r).args(extra);
            cmd.env("PRESEED_CONTAINERD_BIN", &v.bin);
            cmd.env("PRESEED_COSIGN_BIN", &cosign);
            // The VM test's mmdebstrap fetches from the machine's own mirror.
            cmd.env("PRESEED_VM_MIRROR", crate::debian::system_mirror());
            if let Err(e) = cargo_test(cmd, &mut counts) {
                failures.push(format!("containerd {}: {e}", v.label));
            }
        }
        println!(
            "xtask: containerd {}: {} passed, {} failed, {} skipped",
            v.label, counts.passed, counts.failed, counts.ignored
        );
        total.add(&counts);
    }
    // The package check builds in release: not for a filtered run.
    if !containerd_only && args.is_empty() {
        let mut counts = Counts::default();
        match crate::dist::build(&root).and_then(|deb| crate::dist::check(&deb, &mut counts)) {
            Err(e) => {
                counts.failed = counts.failed.max(1);
                failures.push(format!("dist: {e:#}"));
            }
            Ok(()) if counts.failed > 0 => failures.push("dist: the package check failed".into()),
            Ok(()) => {}
        }
        println!("xtask: dist: {} passed, {} failed, {} skipped", counts.passed, counts.failed, counts.ignored);
        total.add(&counts);
        // Every fuzz target a few seconds, and every saved crash input again.
        let mut counts = Counts::default();
        if let Err(e) = crate::fuzz::smoke(&mut counts) {
            counts.failed = counts.failed.max(1);
            failures.push(format!("fuzz: {e:#}"));
        } else if counts.failed > 0 {
            failures.push("fuzz: a target crashed (see above)".into());
        }
        println!("xtask: fuzz: {} passed, {} failed", counts.passed, counts.failed);
        total.add(&counts);
    }
    for s in &total.skipped {
        println!("xtask: skipped: {s}");
    }
    for n in &total.not_run {
        println!("xtask: NOT RUN: {n}");
    }
    println!(
        "xtask: {} passed, {} failed, {} skipped{}",
        total.passed,
        total.failed,
        total.ignored,
        if total.not_run.is_empty() {
            String::new()
        } else {
            format!(", {} test binaries did not finish", total.not_run.len())
        }
    );
    if !failures.is_empty() {
        bail!("{}", failures.join("\n"));
    }
    Ok(())
}

/// Whether this kernel has device-mapper (the dm-verity tests need it).
fn device_mapper() -> bool {
    let has =
        || std::fs::read_to_string("/proc/misc").unwrap_or_default().lines().any(|l| l.ends_with("device-mapper"));
    if !has() {
        let _ = Command::new("modprobe").arg("dm_mod").output();
    }
    has()
}

/// Runs one `cargo test --no-fail-fast`, passing its output through and
/// adding up its per-binary results: what passed, failed and was skipped
/// (by name), and which test binaries never reported (crashed, or the
/// build failed) — so that a failure early on hides nothing that did not run.
fn cargo_test(mut cmd: Command, counts: &mut Counts) -> Result<()> {
    if let Some(protoc) = crate::protoc() {
        cmd.env("PROTOC", protoc);
    }
    // cargo's "Running <binary>" (stderr) and the binaries' results (stdout)
    // through one pipe, in the order they happen.
    let (reader, writer) = std::io::pipe()?;
    cmd.stdout(writer.try_clone()?).stderr(writer);
    let mut child = cmd.spawn().with_context(|| format!("running {cmd:?}"))?;
    drop(cmd);
    let (passed, failed, ignored) = (&mut counts.passed, &mut counts.failed, &mut counts.ignored);
    let mut current: Option<(String, bool)> = None;
    let mut ran_any = false;
    for line in BufReader::new(reader).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("     Running ").filter(|_| line.ends_with(')')) {
            if let Some((binary, false)) = current.take() {
                counts.not_run.push(format!("{binary}: ended without a result (crashed?)"));
            }
            current = Some((rest.split(" (").next().unwrap_or(rest).to_string(), false));
            ran_any = true;
        }
        if let Some(rest) = line.strip_prefix("test ").and_then(|r| r.split_once(" ... ignored")) {
            let why = rest.1.trim_start_matches(", ");
            let binary = current.as_ref().map_or("?", |(b, _)| b.as_str());
            counts.skipped.push(format!(
                "{binary}: {}{}",
                rest.0,
                if why.is_empty() { String::new() } else { format!(" ({why})") }
            ));
        }
        if let Some(counts) = line.strip_prefix("test result: ") {
            if let Some((_, got)) = current.as_mut() {
                *got = true;
            }
            for part in counts.split(['.', ';']) {
                let mut words = part.split_whitespace();
                if let (Some(n), Some(what)) = (words.next().and_then(|n| n.parse::<u64>().ok()), words.next()) {
                    match what {
                        "passed" => *passed += n,
                        "failed" => *failed += n,
                        "ignored" => *ignored += n,
                        _ => {}
                    }
                }
            }
        }
    }
    if let Some((binary, false)) = current.take() {
        counts.not_run.push(format!("{binary}: ended without a result (crashed?)"));
    }
    let status = child.wait()?;
    if !status.success() {
        if !ran_any {
            counts.not_run.push("the test build failed: no test ran".into());
        }
        bail!("cargo test failed: {status}");
    }
    Ok(())
}
