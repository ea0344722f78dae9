//! Bad manifests fail before any network traffic, naming the line.

mod support;

use std::net::TcpListener;

use support::cli::preseed;

const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// Runs `preseed bundle` on `text` with every registry pointed at a listener
/// that counts connections; returns (exit ok, stderr, connections).
fn bundle(text: &str) -> (bool, String, usize) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let host = listener.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("bundles.toml");
    std::fs::write(&manifest, text.replace("HOST", &host)).unwrap();
    let out_dir = dir.path().join("out");
    let out = preseed(&[
        "bundle",
        "--no-progress",
        "--manifest",
        manifest.to_str().unwrap(),
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    let mut connections = 0;
    while listener.accept().is_ok() {
        connections += 1;
    }
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned(), connections)
}

fn assert_fails(text: &str, expected: &str) {
    let (ok, stderr, connections) = bundle(text);
    assert!(!ok, "bundle should fail for:\n{text}");
    assert!(stderr.contains(expected), "stderr should contain {expected:?}, got:\n{stderr}");
    assert_eq!(connections, 0, "no network traffic before validation");
}

#[test]
fn unknown_key_names_its_line() {
    let text =
        format!("[registries.\"HOST\"]\ninsecure = true\n\n[[image]]\nref = \"HOST/a:1@{D}\"\ncolour = \"red\"\n");
    assert_fails(&text, "bundles.toml:6: unknown field `colour`");
}

#[test]
fn bad_reference_names_its_line() {
    let text = format!("[[image]]\nref = \"HOST/a:1@{D}\"\n\n[[image]]\nref = \"HOST/UPPER:1@{D}\"\n");
    assert_fails(&text, "bundles.toml:5: image ref");
}

#[test]
fn duplicate_namespace_file_names_both_lines() {
    let text = format!("[[image]]\nref = \"HOST/a/app:1@{D}\"\n[[image]]\nref = \"HOST/b/app:2@{D}\"\n");
    assert_fails(&text, "bundles.toml:4: k8s.io/app.tar is also written by the image on line 2");
}

#[test]
fn two_sandbox_images_in_one_namespace() {
    let text = format!(
        "[[image]]\nref = \"HOST/p1:1@{D}\"\nsandbox = true\n[[image]]\nref = \"HOST/p2:1@{D}\"\nsandbox = true\n"
    );
    assert_fails(&text, "bundles.toml:5: namespace \"k8s.io\" already has a sandbox image (line 2)");
}

#[test]
fn unpinned_remote_image_needs_a_flag() {
    assert_fails("[[image]]\nref = \"HOST/a:1\"\n", "/a:1\" is not pinned by digest: run `preseed pin`");
}

#[test]
fn every_problem_is_reported_at_once() {
    let text = format!("[[image]]\nref = \"HOST/a:1\"\n[[image]]\nref = \"HOST/a:2@{D}\"\nnamespace = \"bad ns\"\n");
    let (ok, stderr, _) = bundle(&text);
    assert!(!ok);
    assert!(stderr.contains("bundles.toml:2:") && stderr.contains("bundles.toml:5:"), "{stderr}");
}

#[test]
fn missing_or_bad_verify_keys_name_their_line() {
    // The temp dir holds only bundles.toml: keys/*.pub do not exist.
    let text = format!(
        "[verify]\nkeys = [\"keys/release.pub\"]\n\n[registries.\"HOST\"]\ninsecure = true\n\n[[image]]\nref = \"HOST/a:1@{D}\"\n"
    );
    assert_fails(&text, "bundles.toml:2: public key keys/release.pub (");
    let text = format!("[[image]]\nref = \"HOST/a:1@{D}\"\nverify = [\"keys/x.pub\"]\n");
    assert_fails(&text, "bundles.toml:3: public key keys/x.pub (");
    // A key file that is not a PEM public key (bundles.toml itself).
    let text = format!("[[image]]\nref = \"HOST/a:1@{D}\"\nverify = [\"bundles.toml\"]\n");
    assert_fails(&text, "/bundles.toml): no \"-----BEGIN PUBLIC KEY-----\" line");
    let text = format!("[[image]]\nref = \"HOST/a:1@{D}\"\nverify = \"yes\"\n");
    assert_fails(&text, "bundles.toml:3: verify: expected false (exempt this image), true or a list");
    let text = format!("[[image]]\nref = \"HOST/a:1@{D}\"\nverify = true\n");
    assert_fails(&text, "bundles.toml:3: verify = true but [verify] keys lists no key");
    let text = "[[image]]\nbuild = \"hello\"\nref = \"preseed.local/hello:0.1\"\nverify = [\"bundles.toml\"]\n";
    assert_fails(text, "bundles.toml:4: image \"preseed.local/hello:0.1\" is built from this workspace");
    let text = "[verify]\nkeys = []\nsigners = []\n";
    assert_fails(text, "bundles.toml:3: unknown field `signers`");
}

#[test]
fn an_empty_manifest_is_refused() {
    assert_fails("# nothing yet\n", "bundles.toml:2: no [[image]] entries: nothing to bundle");
    assert_fails("[partition]\nformat = \"erofs\"\n", "no [[image]] entries");
}

#[test]
fn misspelled_platforms_name_their_line() {
    let text = format!("[partition]\nplatforms = [\"linx/amd64\"]\n\n[[image]]\nref = \"HOST/a:1@{D}\"\n");
    assert_fails(&text, "bundles.toml:2: platform \"linx/amd64\": unknown os \"linx\"");
    let text = format!("[[image]]\nref = \"HOST/a:1@{D}\"\nplatforms = [\"linux/amd64\",\n  \"linux/arm65/v8\"]\n");
    assert_fails(&text, "bundles.toml:4: platform \"linux/arm65/v8\": unknown architecture \"arm65\"");
    let text = format!("[[image]]\nref = \"HOST/a:1@{D}\"\nplatforms = [\"linux/arm64/v7\"]\n");
    assert_fails(&text, "unknown variant \"v7\"");
}

#[test]
fn an_in_tree_build_for_another_platform_is_refused() {
    let host = preseed::oci::Platform::host();
    let other = if host.architecture == "arm64" { "linux/amd64" } else { "linux/arm64" };
    let text = format!("[[image]]\nbuild = \"hello\"\nref = \"preseed.local/hello:0.1\"\nplatforms = [\"{other}\"]\n");
    assert_fails(&text, &format!("bundles.toml:4: image \"preseed.local/hello:0.1\": build = \"hello\" is compiled for this machine's platform ({host}) only, not {other}"));
    let text = format!(
        "[partition]\nplatforms = [\"{other}\"]\n[[image]]\nbuild = \"hello\"\nref = \"preseed.local/hello:0.1\"\n"
    );
    assert_fails(&text, "which [partition] platforms leaves out");
}
