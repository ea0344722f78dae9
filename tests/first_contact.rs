//! What a new user meets in the first hour, as they meet it: a build without
//! the loader says which command builds one; an output directory never
//! describes one image with another's index; errors say their cause once
//! and the fitting next step.

mod support;

use std::path::Path;

use support::cli::{ok, preseed, preseed_without_credentials};
use support::images::{self, LayerSpec, Media};
use support::registry::Registry;

/// `cargo xtask bundle` builds preseed without the loader: `load` there is
/// not "unrecognized" but names the command that builds the full binary.
#[test]
fn a_loader_less_build_names_the_command_that_builds_the_loader() {
    let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/no-loader");
    let status = std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["build", "--quiet", "--no-default-features", "--bin", "preseed", "--target-dir"])
        .arg(&target)
        .status()
        .unwrap();
    assert!(status.success());
    let out = std::process::Command::new(target.join("debug/preseed"))
        .args(["load", "--dir", "/nonexistent"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("built without the loader") && stderr.contains("cargo xtask dist"), "{stderr}");
    assert!(!stderr.contains("unrecognized"), "{stderr}");
}

/// Bundling squashfs into a directory that held an erofs image removes it:
/// the one `preseed.json` describes the one image there.
#[test]
fn one_output_directory_holds_one_image() {
    let Some(reg) = Registry::start() else { return };
    let pushed = images::push_image(&reg, "first/app", "1", &[LayerSpec::new(701, 1, 4096)], Media::Oci);
    let host = reg.host();
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("bundles.toml");
    std::fs::write(
        &manifest,
        format!(
            "[registries.\"{host}\"]\ninsecure = true\n[[image]]\nref = \"{host}/first/app:1@{}\"\n",
            pushed.manifest_digest
        ),
    )
    .unwrap();
    let out = dir.path().join("out");
    let bundle = |format: &str| {
        let args = ["bundle", "--no-progress", "--format", format, "--manifest", manifest.to_str().unwrap()];
        let o = preseed_without_credentials(&[&args[..], &["--out", out.to_str().unwrap()]].concat());
        ok("preseed bundle", &o);
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    bundle("erofs");
    assert!(out.join("preseed.erofs").is_file());
    let said = bundle("squashfs");
    assert!(out.join("preseed.squashfs").is_file());
    assert!(!out.join("preseed.erofs").exists(), "the erofs image stayed beside the squashfs one");
    assert!(said.contains("removed") && said.contains("preseed.erofs"), "{said}");
    let inspect = ok("preseed inspect", &preseed(&["inspect", out.to_str().unwrap()]));
    assert!(inspect.contains("(squashfs)"), "{inspect}");
}

/// With no containerd: the socket and the wait, rounded, and the cause once.
#[test]
fn containerd_not_answering_says_its_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("containerd.sock");
    let out = preseed(&[
        "load",
        "--dir",
        dir.path().to_str().unwrap(),
        "--address",
        sock.to_str().unwrap(),
        "--timeout",
        "1",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("(waited 1s)"), "{stderr}");
    assert_eq!(stderr.matches("No such file or directory").count(), 1, "{stderr}");
    assert!(stderr.contains("is containerd running"), "{stderr}");
}

/// A registry whose name does not resolve, and one that refuses: each gets
/// the next step that fits, not the plain-HTTP hint.
#[test]
fn registry_errors_fit_their_cause() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("bundles.toml");
    let digest = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    let run = |host: &str| {
        std::fs::write(&manifest, format!("[[image]]\nref = \"{host}/x:1@{digest}\"\n")).unwrap();
        let out = dir.path().join("out");
        let o = preseed_without_credentials(&[
            "bundle",
            "--no-progress",
            "--manifest",
            manifest.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(!o.status.success());
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let dns = run("no-such-host.invalid");
    assert!(dns.contains("cannot resolve the host name") && !dns.contains("insecure = true"), "{dns}");
    let port = support::free_port();
    let refused = run(&format!("127.0.0.1:{port}"));
    assert!(refused.contains("connection refused") && !refused.contains("insecure = true"), "{refused}");
}
