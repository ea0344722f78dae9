//! `preseed push` and `preseed pull` end to end: images pushed to a real
//! registry (Debian docker-registry), bundled by the `preseed` binary into
//! release v1 (images A, B, C) and v2 (A unchanged, B with one new layer, C
//! removed, D added, sharing a layer with A), pushed as OCI artifacts and
//! pulled back into image files through a relay that counts every byte the
//! registry sends (`support::relay`) and can flip a byte, hold or drop a
//! connection. Every pulled image must equal the bundled one byte for byte;
//! the bytes crossing the relay must be what the release's blobs, `preseed
//! diff` and the pull's own report say. Pulls `--from` an older image
//! loop-mount it (root).

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use serde_json::Value;
use support::cli::{self, ok, preseed_without_credentials};
use support::images::{self, LayerSpec, Media, PushedImage, OCI_MANIFEST};
use support::registry::{sha256_digest, Registry};
use support::relay::Relay;

/// The repository releases are pushed to.
const REPO: &str = "releases";
const ARTIFACT_TYPE: &str = "application/vnd.preseed.release.v1";
const PLAN_MEDIA_TYPE: &str = "application/vnd.preseed.release.plan.v1+json";
const REST_MEDIA_TYPE: &str = "application/vnd.preseed.release.rest.v1+zstd";
const BLOB_MEDIA_TYPE: &str = "application/octet-stream";

// Layers of random (incompressible) files: sizes mean what they say.
const A: &[LayerSpec] = &[LayerSpec::new(7101, 2, 256 << 10), LayerSpec::new(7102, 1, 128 << 10)];
const B1: &[LayerSpec] =
    &[LayerSpec::new(7111, 2, 256 << 10), LayerSpec::new(7112, 1, 192 << 10), LayerSpec::new(7113, 1, 64 << 10)];
/// B1's layers and one new one.
const B2: &[LayerSpec] = &[
    LayerSpec::new(7111, 2, 256 << 10),
    LayerSpec::new(7112, 1, 192 << 10),
    LayerSpec::new(7113, 1, 64 << 10),
    LayerSpec::new(7114, 2, 160 << 10),
];
const C: &[LayerSpec] = &[LayerSpec::new(7121, 3, 128 << 10), LayerSpec::new(7122, 1, 64 << 10)];
/// A's first layer and one of its own.
const D: &[LayerSpec] = &[LayerSpec::new(7101, 2, 256 << 10), LayerSpec::new(7131, 2, 192 << 10)];

/// A registry, a relay in front of it, a temp dir; the images pushed.
struct World {
    dir: tempfile::TempDir,
    reg: Registry,
    relay: Relay,
    a: PushedImage,
    b1: PushedImage,
    b2: PushedImage,
    c: PushedImage,
    d: PushedImage,
}

impl World {
    /// `None` (skipped) without docker-registry outside CI.
    fn start() -> Option<World> {
        let reg = Registry::start()?;
        let relay = Relay::start(&reg.host());
        let a = images::push_image(&reg, "rel/a", "v1", A, Media::Oci);
        let b1 = images::push_image(&reg, "rel/b", "v1", B1, Media::Oci);
        let b2 = images::push_image(&reg, "rel/b", "v2", B2, Media::Oci);
        let c = images::push_image(&reg, "rel/c", "v1", C, Media::Oci);
        let d = images::push_image(&reg, "rel/d", "v1", D, Media::Docker);
        let dir = tempfile::Builder::new().prefix("preseed-release-").tempdir().unwrap();
        Some(World { dir, reg, relay, a, b1, b2, c, d })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `relay/releases:tag` (or `@digest`).
    fn reference(&self, tag_or_digest: &str) -> String {
        let sep = if tag_or_digest.starts_with("sha256:") { '@' } else { ':' };
        format!("{}/{REPO}{sep}{tag_or_digest}", self.relay.host())
    }

    /// Bundles `images` (image, tag, file) into `<dir>/<name>/`.
    fn bundle(&self, name: &str, images: &[(&PushedImage, &str, &str)], extra: &[&str]) -> Release {
        let host = self.reg.host();
        let mut text =
            format!("[partition]\nplatforms = [\"linux/amd64\"]\n\n[registries.\"{host}\"]\ninsecure = true\n");
        for (img, tag, file) in images {
            text += &format!(
                "\n[[image]]\nref = \"{host}/{}:{tag}@{}\"\nfile = \"{file}\"\n",
                img.repo, img.manifest_digest
            );
        }
        let manifest = self.path(&format!("{name}.toml"));
        std::fs::write(&manifest, text).unwrap();
        let out = self.path(name);
        let cache = self.path("cache");
        let mut args = vec!["bundle", "--no-progress", "--manifest", manifest.to_str().unwrap()];
        args.extend(["--out", out.to_str().unwrap(), "--cache", cache.to_str().unwrap()]);
        args.extend(extra);
        ok(&format!("preseed bundle {name}"), &preseed_without_credentials(&args));
        Release { out }
    }

    /// v1: A, B, C.
    fn v1(&self, extra: &[&str]) -> Release {
        self.bundle("v1", &[(&self.a, "v1", "a"), (&self.b1, "v1", "b"), (&self.c, "v1", "c")], extra)
    }

    /// v2: A unchanged, B with one new layer, C gone, D added.
    fn v2(&self) -> Release {
        self.bundle("v2", &[(&self.a, "v1", "a"), (&self.b2, "v2", "b"), (&self.d, "v1", "d")], &[])
    }

    /// `preseed push OUT relay/releases:tag --insecure --json`, asserted to
    /// succeed; the manifest as the registry then serves it.
    fn push(&self, release: &Release, tag: &str) -> Pushed {
        let out = preseed_without_credentials(&[
            "push",
            release.out.to_str().unwrap(),
            &self.reference(tag),
            "--insecure",
            "--json",
        ]);
        let report = json_report(&format!("preseed push {tag}"), &out);
        eprintln!("push {tag}: {report}");
        let got = self.reg.call("GET", &format!("/v2/{REPO}/manifests/{tag}"), &[("Accept", OCI_MANIFEST)], &[]);
        assert_eq!(got.status, 200, "GET manifest {tag}: {}", String::from_utf8_lossy(&got.body));
        let digest = sha256_digest(&got.body);
        assert_eq!(report["digest"], digest, "the pushed manifest's digest: {report}");
        assert_eq!(got.header("docker-content-digest"), Some(digest.as_str()));
        let manifest: Value = serde_json::from_slice(&got.body).unwrap();
        Pushed { report, digest, manifest, manifest_bytes: got.body }
    }

    /// `preseed pull REF --to TARGET --insecure --json EXTRA…`.
    fn pull(&self, reference: &str, target: &Path, extra: &[&str]) -> Output {
        let mut args = vec!["pull", reference, "--to", target.to_str().unwrap(), "--insecure", "--json"];
        args.extend(extra);
        preseed_without_credentials(&args)
    }
}

/// A `preseed bundle` output directory.
struct Release {
    out: PathBuf,
}

impl Release {
    fn image(&self) -> PathBuf {
        self.out.join("preseed.erofs")
    }

    fn plan(&self) -> Value {
        let path = self.out.join("preseed.plan.json");
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        serde_json::from_slice(&bytes).unwrap()
    }

    /// The plan's blobs: digest → size.
    fn plan_blobs(&self) -> BTreeMap<String, u64> {
        let plan = self.plan();
        plan["blobs"]
            .as_array()
            .unwrap_or_else(|| panic!("no blobs in the plan: {plan}"))
            .iter()
            .map(|b| (b["digest"].as_str().unwrap().to_string(), b["size"].as_u64().unwrap()))
            .collect()
    }

    /// Every blob `preseed.json` lists, over all images: digest → size.
    fn index_blobs(&self) -> BTreeMap<String, u64> {
        let index: Value = serde_json::from_slice(&std::fs::read(self.out.join("preseed.json")).unwrap()).unwrap();
        index["images"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|i| i["blobs"].as_array().unwrap().iter())
            .map(|b| (b["digest"].as_str().unwrap().to_string(), b["size"].as_u64().unwrap()))
            .collect()
    }
}

/// A release as pushed.
struct Pushed {
    report: Value,
    digest: String,
    manifest: Value,
    manifest_bytes: Vec<u8>,
}

impl Pushed {
    fn layers(&self) -> &Vec<Value> {
        self.manifest["layers"].as_array().unwrap()
    }

    /// The blob layers (all but the rest): digest → size.
    fn blobs(&self) -> BTreeMap<String, u64> {
        self.layers()[1..]
            .iter()
            .map(|l| (l["digest"].as_str().unwrap().to_string(), l["size"].as_u64().unwrap()))
            .collect()
    }

    fn blob_bytes(&self) -> u64 {
        self.blobs().values().sum()
    }

    /// (digest, size) of the rest layer.
    fn rest(&self) -> (String, u64) {
        let l = &self.layers()[0];
        (l["digest"].as_str().unwrap().to_string(), l["size"].as_u64().unwrap())
    }

    /// (digest, size) of the plan (the config).
    fn config(&self) -> (String, u64) {
        let c = &self.manifest["config"];
        (c["digest"].as_str().unwrap().to_string(), c["size"].as_u64().unwrap())
    }

    /// Manifest, plan and rest: what `bytes.plan` counts for a pull that had
    /// none of them.
    fn plan_bytes(&self) -> u64 {
        self.manifest_bytes.len() as u64 + self.config().1 + self.rest().1
    }
}

/// Asserts success, parses stdout as JSON.
fn json_report(what: &str, out: &Output) -> Value {
    let stdout = ok(what, out);
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!("{what}: stdout is not JSON ({e}):\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr))
    })
}

/// A number at `path` in a report.
fn num(report: &Value, path: &[&str]) -> u64 {
    let mut v = report;
    for p in path {
        v = &v[*p];
    }
    v.as_u64().unwrap_or_else(|| panic!("no number at {} in {report}", path.join(".")))
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn sha256_file(path: &Path) -> String {
    sha256_digest(&std::fs::read(path).unwrap())
}

/// Byte for byte, naming the first difference.
fn assert_same_file(got: &Path, want: &Path) {
    let (g, w) = (std::fs::read(got).unwrap(), std::fs::read(want).unwrap());
    if g != w {
        let first = g.iter().zip(&w).position(|(a, b)| a != b);
        panic!(
            "{} ({} bytes) differs from {} ({} bytes); first differing byte at {first:?}",
            got.display(),
            g.len(),
            want.display(),
            w.len()
        );
    }
}

/// The manifest's shape: artifact type, plan, rest, then each blob once.
fn assert_release_manifest(p: &Pushed, release: &Release) {
    let m = &p.manifest;
    assert_eq!(m["schemaVersion"], 2, "{m}");
    assert_eq!(m["artifactType"], ARTIFACT_TYPE, "{m}");
    assert_eq!(m["config"]["mediaType"], PLAN_MEDIA_TYPE, "{m}");
    assert_eq!(p.layers()[0]["mediaType"], REST_MEDIA_TYPE, "{m}");
    assert!(p.layers()[1..].iter().all(|l| l["mediaType"] == BLOB_MEDIA_TYPE), "{m}");
    let digests: BTreeSet<&str> = p.layers().iter().map(|l| l["digest"].as_str().unwrap()).collect();
    assert_eq!(digests.len(), p.layers().len(), "a layer listed twice: {m}");
    // The blobs are the plan's: every blob of the partition that fills
    // blocks of its own (a small one shares a block and travels in the rest).
    assert_eq!(p.blobs(), release.plan_blobs(), "the manifest's blobs are not the plan's");
    let index = release.index_blobs();
    for (d, size) in release.plan_blobs() {
        assert_eq!(index.get(&d), Some(&size), "{d} ({size} bytes) is in the plan, not in preseed.json");
    }
    for (d, size) in &index {
        assert!(*size < 4096 || p.blobs().contains_key(d), "{d} ({size} bytes) does not travel as a blob");
    }
    assert!(p.blobs().len() >= 7, "{m}");
}

/// What a pull reports about the image it wrote: sha256 and size of the
/// file, the release's root hash.
fn assert_proof(report: &Value, target: &Path, root_hash: Option<&str>) {
    assert_eq!(report["proof"]["sha256"], sha256_file(target), "{report}");
    assert_eq!(num(report, &["proof", "size"]), std::fs::metadata(target).unwrap().len(), "{report}");
    match root_hash {
        Some(h) => assert_eq!(report["proof"]["root_hash"], h, "{report}"),
        None => assert!(report["proof"]["root_hash"].is_null(), "{report}"),
    }
}

/// Body bytes the relay sent for `blobs`, blob by blob.
fn relayed(relay: &Relay, blobs: &BTreeMap<String, u64>) -> u64 {
    blobs.keys().map(|d| relay.bytes_for(d)).sum()
}

/// Names and sizes of a work directory's files, for the log.
fn listing(dir: &Path) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let meta = e.metadata().unwrap();
            if meta.is_dir() {
                stack.push(e.path());
            } else {
                out.push((e.path().strip_prefix(dir).unwrap().display().to_string(), meta.len()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn v1_pushed_and_pulled_into_a_fresh_file_is_byte_identical() {
    let Some(w) = World::start() else { return };
    let v1 = w.v1(&[]);
    let pushed = w.push(&v1, "v1");
    assert_release_manifest(&pushed, &v1);
    let blobs = pushed.blobs();
    let total = pushed.blob_bytes();
    assert!(blobs.len() >= 7 && total > 1 << 20, "{} blobs, {total} bytes: {}", blobs.len(), pushed.manifest);

    // Into an empty repository everything is uploaded.
    let r = &pushed.report;
    assert_eq!(r["reference"], w.reference("v1"), "{r}");
    assert_eq!((num(r, &["blobs", "present"]), num(r, &["bytes", "present"])), (0, 0), "{r}");
    assert!(num(r, &["blobs", "uploaded"]) >= blobs.len() as u64, "{r}");
    assert!(num(r, &["bytes", "uploaded"]) >= total + pushed.rest().1, "{r}");
    assert!(w.relay.upload_bytes() >= total + pushed.rest().1 + pushed.config().1, "{}", w.relay.upload_bytes());

    // Pushing again uploads no blob.
    w.relay.reset();
    let again = w.push(&v1, "v1");
    assert_eq!(again.digest, pushed.digest, "the same release, another manifest");
    assert_eq!(num(&again.report, &["bytes", "present"]), num(r, &["bytes", "uploaded"]), "{}", again.report);
    assert_eq!(num(&again.report, &["bytes", "uploaded"]), 0, "{}", again.report);
    assert!(
        w.relay.upload_bytes() <= pushed.manifest_bytes.len() as u64,
        "a second push uploaded {} bytes: {:?}",
        w.relay.upload_bytes(),
        w.relay.requests()
    );

    // Pulled by tag into a fresh file: the same image.
    w.relay.reset();
    let target = w.path("fresh.img");
    let report = json_report("preseed pull", &w.pull(&w.reference("v1"), &target, &[]));
    eprintln!("pull: {report}");
    assert_same_file(&target, &v1.image());
    assert_eq!(report["digest"], pushed.digest, "{report}");
    assert_eq!(report["reference"], w.reference("v1"), "{report}");
    assert!(report["target"].as_str().is_some_and(|t| t.ends_with("fresh.img")), "{report}");
    assert_proof(&report, &target, None);
    assert_eq!(report["proof"]["sha256"], sha256_file(&v1.image()), "{report}");
    assert_eq!(num(&report, &["bytes", "fetched"]) + num(&report, &["bytes", "reused"]), total, "{report}");
    assert_eq!(num(&report, &["bytes", "reused"]), 0, "{report}");
    assert_eq!(num(&report, &["bytes", "skipped"]), 0, "{report}");
    assert_eq!(num(&report, &["bytes", "plan"]), pushed.plan_bytes(), "{report}");
    assert_eq!(num(&report, &["blobs", "fetched"]), blobs.len() as u64, "{report}");
    assert_eq!(num(&report, &["blobs", "reused"]), 0, "{report}");
    assert_eq!(num(&report, &["blobs", "refetched"]), 0, "{report}");
    // The relay saw each blob once, and nothing uploaded.
    for (d, size) in &blobs {
        assert_eq!(w.relay.bytes_for(d), *size, "{d}: {:?}", w.relay.requests());
    }
    assert_eq!(relayed(&w.relay, &blobs), num(&report, &["bytes", "fetched"]));
    assert_eq!(
        w.relay.blob_bytes() + w.relay.manifest_bytes(),
        total + pushed.plan_bytes(),
        "{:?}",
        w.relay.requests()
    );
    assert_eq!(w.relay.upload_bytes(), 0);
    assert!(w.relay.requests().iter().all(|(m, ..)| m == "GET" || m == "HEAD"), "{:?}", w.relay.requests());

    // By digest, into another file: the same.
    let by_digest = w.path("by-digest.img");
    let report = json_report("preseed pull @digest", &w.pull(&w.reference(&pushed.digest), &by_digest, &[]));
    assert_same_file(&by_digest, &v1.image());
    assert_eq!(report["digest"], pushed.digest, "{report}");
}

#[test]
fn v2_from_v1_fetches_only_what_diff_says() {
    if !support::require_root() {
        return;
    }
    let Some(w) = World::start() else { return };
    let (v1, v2) = (w.v1(&[]), w.v2());
    let p1 = w.push(&v1, "v1");
    w.relay.reset();
    let p2 = w.push(&v2, "v2");
    assert_release_manifest(&p2, &v2);

    // v2's push: the blobs v1 brought are present, only the others go up.
    let (b1, b2) = (p1.blobs(), p2.blobs());
    let shared: BTreeMap<String, u64> =
        b2.iter().filter(|(d, _)| b1.contains_key(*d)).map(|(d, s)| (d.clone(), *s)).collect();
    let shared_bytes: u64 = shared.values().sum();
    assert!(shared.len() >= 5 && shared_bytes > 512 << 10, "{shared:?}");
    let r = &p2.report;
    assert!(num(r, &["bytes", "uploaded"]) < p2.blob_bytes(), "{r}");
    assert!(num(r, &["bytes", "present"]) >= shared_bytes, "{r}");
    assert_eq!(num(r, &["blobs", "present"]), shared.len() as u64, "{r}");
    let all = p2.blob_bytes() + p2.rest().1 + p2.config().1 + p2.manifest_bytes.len() as u64;
    assert!(w.relay.upload_bytes() <= all - shared_bytes, "{} > {}", w.relay.upload_bytes(), all - shared_bytes);
    for (method, target, ..) in w.relay.requests() {
        let finishes_shared = shared.keys().any(|d| target.contains(&format!("digest={d}")));
        assert!(!(method == "PUT" && finishes_shared), "v2's push uploaded a blob v1 had: {method} {target}");
    }

    // v1 into F1, then v2 from F1.
    let f1 = w.path("f1.img");
    json_report("preseed pull v1", &w.pull(&w.reference("v1"), &f1, &[]));
    assert_same_file(&f1, &v1.image());

    let diff = json_report(
        "preseed diff",
        &preseed_without_credentials(&["diff", "--json", v1.out.to_str().unwrap(), v2.out.to_str().unwrap()]),
    );
    let new_bytes = num(&diff, &["totals", "new_bytes"]);
    let (i1, i2) = (v1.index_blobs(), v2.index_blobs());
    let fresh: u64 = i2.iter().filter(|(d, _)| !i1.contains_key(*d)).map(|(_, s)| s).sum();
    assert_eq!(new_bytes, fresh, "diff's new bytes are not the blobs v1 lacks: {diff}");
    // Of them, what travels as blobs (the small ones are in the rest).
    let fresh_blobs: u64 = b2.iter().filter(|(d, _)| !b1.contains_key(*d)).map(|(_, s)| s).sum();
    assert!(fresh_blobs <= new_bytes && fresh_blobs > 256 << 10, "{fresh_blobs} of {new_bytes}");

    w.relay.reset();
    let f2 = w.path("f2.img");
    let work = w.path("f2.work");
    let report = json_report(
        "preseed pull v2 --from f1",
        &w.pull(&w.reference("v2"), &f2, &["--from", f1.to_str().unwrap(), "--work", work.to_str().unwrap()]),
    );
    eprintln!("pull v2 from v1: {report}; diff says {new_bytes} new bytes; relay: {:?}", w.relay.requests());
    assert_same_file(&f2, &v2.image());
    assert_proof(&report, &f2, None);
    let plan = num(&report, &["bytes", "plan"]);
    assert_eq!(plan, p2.plan_bytes(), "{report}");
    assert!(
        w.relay.blob_bytes() <= new_bytes + plan,
        "the relay passed {} blob bytes, diff says {new_bytes} new, plan {plan}",
        w.relay.blob_bytes()
    );
    assert_eq!(num(&report, &["bytes", "fetched"]), fresh_blobs, "{report}");
    assert!(num(&report, &["bytes", "fetched"]) <= new_bytes, "{report}");
    assert_eq!(num(&report, &["bytes", "reused"]), shared_bytes, "{report}");
    assert_eq!(num(&report, &["bytes", "skipped"]), 0, "{report}");
    assert_eq!(num(&report, &["blobs", "reused"]), shared.len() as u64, "{report}");
    assert_eq!(num(&report, &["blobs", "fetched"]), (b2.len() - shared.len()) as u64, "{report}");
    for d in shared.keys() {
        assert_eq!(w.relay.bytes_for(d), 0, "{d} is in F1 but was fetched");
    }
}

#[test]
fn verity_release_root_hash_matches() {
    let Some(w) = World::start() else { return };
    let v1 = w.v1(&["--verity"]);
    let root_hash = std::fs::read_to_string(v1.out.join("preseed.roothash")).unwrap().trim().to_string();
    assert_eq!(root_hash.len(), 64, "{root_hash:?}");
    assert_eq!(v1.plan()["verity"]["root_hash"], root_hash, "{}", v1.plan());
    let pushed = w.push(&v1, "v1");
    assert_release_manifest(&pushed, &v1);

    let target = w.path("verity.img");
    let report = json_report("preseed pull", &w.pull(&w.reference("v1"), &target, &[]));
    eprintln!("pull: {report}");
    assert_same_file(&target, &v1.image());
    assert_proof(&report, &target, Some(&root_hash));
    // The verity tree is not shipped: what crossed is the blobs and the plan.
    assert_eq!(
        w.relay.blob_bytes() + w.relay.manifest_bytes(),
        pushed.blob_bytes() + pushed.plan_bytes(),
        "{:?}",
        w.relay.requests()
    );
}

#[test]
fn killed_mid_pull_resumes_fetching_only_what_is_missing() {
    let Some(w) = World::start() else { return };
    let v2 = w.v2();
    let pushed = w.push(&v2, "v2");
    let blobs = pushed.blobs();
    let total = pushed.blob_bytes();
    // Everything under /blobs/: plan, rest and blobs.
    let all = total + pushed.rest().1 + pushed.config().1;

    let target = w.path("t.img");
    let work = w.path("t.work");
    let stderr_path = w.path("first.stderr");
    w.relay.reset();
    w.relay.hold_after(all / 2);
    let mut child = cli::command()
        .args(["pull", &w.reference("v2"), "--to", target.to_str().unwrap(), "--insecure", "--json"])
        .args(["--work", work.to_str().unwrap()])
        .env_remove("DOCKER_CONFIG")
        .env("HOME", "/nonexistent")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap();
    let held = w.relay.wait_held(&mut child, Duration::from_secs(60));
    // Let whatever was passed reach the disk, then kill.
    std::thread::sleep(Duration::from_millis(300));
    let _ = child.kill();
    let status = child.wait().unwrap();
    assert!(
        held,
        "the pull did not reach {} blob bytes ({status}):\n{}",
        all / 2,
        std::fs::read_to_string(&stderr_path).unwrap_or_default()
    );
    let first_blob_bytes = relayed(&w.relay, &blobs);
    eprintln!(
        "killed after {} bytes under /blobs/ ({first_blob_bytes} of blobs); work dir: {:?}",
        w.relay.blob_bytes(),
        listing(&work)
    );
    assert!(first_blob_bytes > 0 && first_blob_bytes < total, "{first_blob_bytes} of {total}");
    assert!(!target.exists(), "the target is there after a killed pull");

    w.relay.release();
    w.relay.reset();
    let report =
        json_report("preseed pull (again)", &w.pull(&w.reference("v2"), &target, &["--work", work.to_str().unwrap()]));
    eprintln!("second pull: {report}; ranges: {:?}", w.relay.ranged_requests());
    assert_same_file(&target, &v2.image());
    assert_proof(&report, &target, None);
    let (fetched, skipped) = (num(&report, &["bytes", "fetched"]), num(&report, &["bytes", "skipped"]));
    let second_blob_bytes = relayed(&w.relay, &blobs);
    assert!(skipped > 0, "nothing kept from the killed pull: {report}");
    assert!(skipped <= first_blob_bytes, "skipped {skipped}, but only {first_blob_bytes} were sent: {report}");
    assert_eq!(fetched + skipped, total, "{report}");
    assert_eq!(num(&report, &["bytes", "reused"]), 0, "{report}");
    assert_eq!(second_blob_bytes, fetched, "the relay and the report disagree: {:?}", w.relay.requests());
    assert!(second_blob_bytes < total, "the second pull fetched every blob again ({second_blob_bytes} of {total})");
    assert!(
        first_blob_bytes + second_blob_bytes >= total,
        "{first_blob_bytes} + {second_blob_bytes} bytes sent, {total} needed"
    );
}

#[test]
fn dropped_connection_mid_blob_leaves_no_target_or_is_retried() {
    let Some(w) = World::start() else { return };
    let v1 = w.v1(&[]);
    let pushed = w.push(&v1, "v1");
    let total = pushed.blob_bytes() + pushed.rest().1 + pushed.config().1;

    let target = w.path("t.img");
    let work = w.path("t.work");
    w.relay.reset();
    w.relay.cut_after(total / 3);
    let out = w.pull(&w.reference("v1"), &target, &["--work", work.to_str().unwrap()]);
    assert_eq!(w.relay.cuts(), 1, "no connection was cut: {:?}", w.relay.requests());
    eprintln!("pull with a dropped connection: {}\n{}", out.status, stderr(&out));
    if out.status.success() {
        // Retried within the run.
        assert_same_file(&target, &v1.image());
        let report: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_proof(&report, &target, None);
    } else {
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        assert!(!target.exists(), "a failed pull left its target");
        w.relay.reset();
        let report = json_report(
            "preseed pull (again)",
            &w.pull(&w.reference("v1"), &target, &["--work", work.to_str().unwrap()]),
        );
        assert_same_file(&target, &v1.image());
        assert!(num(&report, &["bytes", "fetched"]) < pushed.blob_bytes(), "{report}");
    }
}

#[test]
fn flipped_byte_is_caught_and_refetched() {
    let Some(w) = World::start() else { return };
    let v1 = w.v1(&[]);
    let pushed = w.push(&v1, "v1");
    let (digest, size) = pushed.blobs().into_iter().max_by_key(|(_, s)| *s).unwrap();
    w.relay.reset();
    w.relay.flip_once(&digest);

    let target = w.path("t.img");
    let out = w.pull(&w.reference("v1"), &target, &[]);
    assert!(!w.relay.flip_pending(), "the blob was never fetched: {:?}", w.relay.requests());
    let report = json_report("preseed pull", &out);
    eprintln!("pull with {digest} flipped once: {report}\n{}", stderr(&out));
    assert_same_file(&target, &v1.image());
    assert_proof(&report, &target, None);
    assert!(num(&report, &["blobs", "refetched"]) >= 1, "{report}");
    assert!(w.relay.bytes_for(&digest) > size, "{digest} was sent only {} bytes", w.relay.bytes_for(&digest));
    assert!(w.relay.gets_for(&digest) >= 2, "{:?}", w.relay.requests());
}

#[test]
fn registry_gone_with_everything_local_needs_no_network() {
    if !support::require_root() {
        return;
    }
    let Some(w) = World::start() else { return };
    let (v1, v2) = (w.v1(&[]), w.v2());
    w.push(&v1, "v1");
    let p2 = w.push(&v2, "v2");
    let f1 = w.path("f1.img");
    json_report("preseed pull v1", &w.pull(&w.reference("v1"), &f1, &[]));
    let pinned = w.reference(&p2.digest);
    let (f2, f3, work) = (w.path("f2.img"), w.path("f3.img"), w.path("v2.work"));
    let from_f1 = ["--from", f1.to_str().unwrap(), "--work", work.to_str().unwrap()];
    json_report("preseed pull v2 @digest", &w.pull(&pinned, &f2, &from_f1));
    assert_same_file(&f2, &v2.image());
    eprintln!("work dir after the pull: {:?}", listing(&work));

    // No relay, no registry: the port refuses.
    let World { relay, reg, dir, .. } = w;
    let host = relay.host();
    drop(relay);
    drop(reg);
    assert!(std::net::TcpStream::connect(&host).is_err(), "{host} still answers");

    let out = preseed_without_credentials(&[
        "pull",
        &pinned,
        "--to",
        f3.to_str().unwrap(),
        "--from",
        f2.to_str().unwrap(),
        "--work",
        work.to_str().unwrap(),
        "--insecure",
        "--json",
    ]);
    let report = json_report("preseed pull with no registry", &out);
    eprintln!("offline pull: {report}");
    assert_same_file(&f3, &f2);
    assert_proof(&report, &f3, None);
    assert_eq!(num(&report, &["bytes", "fetched"]), 0, "{report}");
    assert_eq!(num(&report, &["bytes", "plan"]), 0, "{report}");
    assert_eq!(num(&report, &["blobs", "fetched"]), 0, "{report}");
    assert_eq!(num(&report, &["bytes", "reused"]) + num(&report, &["bytes", "skipped"]), p2.blob_bytes(), "{report}");

    // A tag needs the registry: a clear failure, no target.
    let f4 = dir.path().join("f4.img");
    let by_tag = pinned.split('@').next().unwrap().to_string() + ":v2";
    let out = preseed_without_credentials(&[
        "pull",
        &by_tag,
        "--to",
        f4.to_str().unwrap(),
        "--from",
        f2.to_str().unwrap(),
        "--work",
        work.to_str().unwrap(),
        "--insecure",
    ]);
    eprintln!("{by_tag} with no registry: {}\n{}", out.status, stderr(&out));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains(&host), "{}", stderr(&out));
    assert!(!f4.exists(), "a failed pull left its target");
    drop(dir);
}

#[test]
fn a_damaged_blob_in_from_is_fetched_instead() {
    if !support::require_root() {
        return;
    }
    let Some(w) = World::start() else { return };
    let (v1, v2) = (w.v1(&[]), w.v2());
    let p1 = w.push(&v1, "v1");
    let p2 = w.push(&v2, "v2");
    let (b1, b2) = (p1.blobs(), p2.blobs());

    // F1: v1 with one byte flipped in the largest blob v2 shares with it.
    let (digest, size) = b2.iter().filter(|(d, _)| b1.contains_key(*d)).max_by_key(|(_, s)| **s).unwrap();
    let plan = v1.plan();
    let number = plan["blobs"].as_array().unwrap().iter().position(|b| b["digest"] == *digest).unwrap();
    let piece = plan["pieces"].as_array().unwrap().iter().find(|p| p["blob"] == number).unwrap();
    let at = num(piece, &["at"]) + num(piece, &["len"]) / 2;
    let mut bytes = std::fs::read(v1.image()).unwrap();
    bytes[at as usize] ^= 0x01;
    let f1 = w.path("f1-damaged.img");
    std::fs::write(&f1, bytes).unwrap();

    w.relay.reset();
    let f2 = w.path("f2.img");
    let report = json_report(
        "preseed pull v2 --from damaged",
        &w.pull(&w.reference("v2"), &f2, &["--from", f1.to_str().unwrap()]),
    );
    eprintln!("pull v2 from a damaged v1 ({digest} flipped at {at}): {report}");
    assert_same_file(&f2, &v2.image());
    assert_proof(&report, &f2, None);
    assert_eq!(w.relay.bytes_for(digest), *size, "the damaged blob was not fetched: {:?}", w.relay.requests());
    let fresh: u64 = b2.iter().filter(|(d, _)| !b1.contains_key(*d)).map(|(_, s)| s).sum();
    assert_eq!(num(&report, &["bytes", "fetched"]), fresh + size, "{report}");
    assert_eq!(num(&report, &["bytes", "reused"]) + fresh + size, p2.blob_bytes(), "{report}");
}

#[test]
fn a_release_of_another_version_is_refused() {
    let Some(w) = World::start() else { return };
    let v1 = w.v1(&[]);
    let pushed = w.push(&v1, "v1");

    // The same release, its plan saying version 999.
    let (config, _) = pushed.config();
    let got = w.reg.call("GET", &format!("/v2/{REPO}/blobs/{config}"), &[], &[]);
    assert_eq!(got.status, 200);
    let mut plan: Value = serde_json::from_slice(&got.body).unwrap();
    assert_eq!(plan["version"], 1, "{plan}");
    plan["version"] = 999.into();
    let plan_bytes = serde_json::to_vec(&plan).unwrap();
    let plan_digest = w.reg.push_blob(REPO, &plan_bytes);
    let mut manifest = pushed.manifest.clone();
    manifest["config"]["digest"] = plan_digest.into();
    manifest["config"]["size"] = plan_bytes.len().into();
    let media_type = manifest["mediaType"].as_str().unwrap_or(OCI_MANIFEST).to_string();
    let bytes = serde_json::to_vec_pretty(&manifest).unwrap();
    let digest = w.reg.push_manifest(REPO, "v999", &media_type, &bytes);

    for reference in [w.reference("v999"), w.reference(&digest)] {
        let target = w.path("t.img");
        let out = w.pull(&reference, &target, &[]);
        eprintln!("{reference}: {}\n{}", out.status, stderr(&out));
        assert_eq!(out.status.code(), Some(1), "{reference}: {}", stderr(&out));
        assert!(stderr(&out).contains("version"), "{}", stderr(&out));
        assert!(stderr(&out).contains("999"), "{}", stderr(&out));
        assert!(!target.exists(), "a refused release left {}", target.display());
    }

    // A digest the registry does not have.
    let missing = w.reference(&format!("sha256:{}", "0".repeat(64)));
    let target = w.path("missing.img");
    let out = w.pull(&missing, &target, &[]);
    eprintln!("{missing}: {}\n{}", out.status, stderr(&out));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(!target.exists(), "a failed pull left {}", target.display());
}

#[test]
fn push_refuses_squashfs() {
    let Some(w) = World::start() else { return };
    let release = w.bundle("sq", &[(&w.a, "v1", "a")], &["--format", "squashfs"]);
    assert!(release.out.join("preseed.squashfs").is_file());
    w.relay.reset();
    let out = preseed_without_credentials(&["push", release.out.to_str().unwrap(), &w.reference("v1"), "--insecure"]);
    eprintln!("{}\n{}", out.status, stderr(&out));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("erofs"), "{}", stderr(&out));
    assert!(
        !w.relay.requests().iter().any(|(m, t, ..)| m == "PUT" && t.contains("/manifests/")),
        "a manifest was pushed: {:?}",
        w.relay.requests()
    );
    let tag = w.reg.call("GET", &format!("/v2/{REPO}/manifests/v1"), &[("Accept", OCI_MANIFEST)], &[]);
    assert_ne!(tag.status, 200, "the squashfs release was pushed");
}

/// A release is an OCI manifest like any other: cosign signs it and
/// verifies the signature (key-based, no transparency log: offline), and a
/// pull by the signed digest still rebuilds the image.
#[test]
fn a_release_is_signed_and_verified_with_cosign() {
    let Some(w) = World::start() else { return };
    let Some(cosign) = support::cosign::Cosign::new() else { return };
    let v1 = w.v1(&[]);
    let pushed = w.push(&v1, "v1");
    let signed = format!("{}/{REPO}@{}", w.reg.host(), pushed.digest);
    let keys = cosign.generate("release");
    cosign.sign(&keys, &signed, false);
    let public = keys.join("cosign.pub");
    let verify = ["verify", "--key", public.to_str().unwrap(), "--insecure-ignore-tlog=true"];
    cosign.run(cosign.dir.path(), &[&verify[..], &["--allow-insecure-registry", &signed]].concat());
    // Another key does not verify it.
    let other = cosign.generate("other");
    let out = std::process::Command::new(&cosign.bin)
        .args(["verify", "--key", other.join("cosign.pub").to_str().unwrap(), "--insecure-ignore-tlog=true"])
        .args(["--allow-insecure-registry", &signed])
        .env("HOME", cosign.dir.path())
        .env("DOCKER_CONFIG", cosign.dir.path().join("docker"))
        .env("TUF_ROOT", cosign.dir.path().join("tuf"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "a foreign key verified the release");

    let target = w.path("signed.img");
    let report = json_report("preseed pull @signed digest", &w.pull(&w.reference(&pushed.digest), &target, &[]));
    assert_same_file(&target, &v1.image());
    assert_eq!(report["digest"], pushed.digest, "{report}");
}

/// The inactive slot is a block device: the image is written into it (the
/// first block last), equal to the bundled one; a slot too small is refused
/// before anything is written to it.
#[test]
fn a_release_pulls_into_a_block_device() {
    if !support::require_root() || support::require_tool("losetup").is_none() {
        return;
    }
    let Some(w) = World::start() else { return };
    let v1 = w.v1(&[]);
    w.push(&v1, "v1");
    let size = std::fs::metadata(v1.image()).unwrap().len();
    let attach = |backing: &Path, bytes: u64| -> String {
        // Old content in the slot: not zeros, so a written block 0 shows.
        std::fs::write(backing, vec![0x5a; bytes as usize]).unwrap();
        let out = std::process::Command::new("losetup").args(["-f", "--show"]).arg(backing).output().unwrap();
        assert!(out.status.success(), "losetup: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let detach = |dev: &str| {
        let _ = std::process::Command::new("losetup").args(["-d", dev]).status();
    };

    let small = attach(&w.path("small.slot"), 1 << 20);
    let work = w.path("dev.work");
    let out = w.pull(&w.reference("v1"), Path::new(&small), &["--work", work.to_str().unwrap()]);
    let small_content = std::fs::read(w.path("small.slot")).unwrap();
    detach(&small);
    assert_eq!(out.status.code(), Some(1), "a 1 MiB slot took a {size}-byte image: {}", stderr(&out));
    assert!(stderr(&out).contains("needs"), "{}", stderr(&out));
    assert!(small_content.iter().all(|&b| b == 0x5a), "the too-small slot was written to");

    let slot = attach(&w.path("b.slot"), size + (1 << 20));
    let out = w.pull(&w.reference("v1"), Path::new(&slot), &["--work", work.to_str().unwrap()]);
    let content = std::fs::read(w.path("b.slot")).unwrap();
    detach(&slot);
    let report = json_report("preseed pull into a device", &out);
    let image = std::fs::read(v1.image()).unwrap();
    assert!(content[..size as usize] == image[..], "the slot does not hold the image: {report}");
    assert!(content[size as usize..].iter().all(|&b| b == 0x5a), "bytes past the image were written");
    assert_eq!(report["proof"]["size"], size, "{report}");
}
