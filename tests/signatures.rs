//! The `[verify]` policy against signatures the real `cosign` (Debian sid's
//! package, fetched by `cargo xtask test` and named by `PRESEED_COSIGN_BIN`)
//! pushes to a real registry: both formats it writes with key-based signing
//! and no transparency log are accepted; unsigned, foreign-key, wrong-digest
//! and altered signatures stop the bundle before anything is written.

mod support;

use std::path::{Path, PathBuf};
use std::process::Output;

use preseed::partition::index::PartitionIndex;
use support::cli::{ok, preseed, preseed_without_credentials};
use support::cosign::Cosign;
use support::images::{self, LayerSpec, Media, PushedImage};
use support::registry::Registry;

const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// Five small single-platform images in one repository, each its own layer.
fn push_images(reg: &Registry) -> Vec<PushedImage> {
    (0..5u64)
        .map(|i| images::push_image(reg, "signed", &format!("v{i}"), &[LayerSpec::new(900 + i, 1, 512)], Media::Oci))
        .collect()
}

fn pinned(reg: &Registry, image: &PushedImage, tag: &str) -> String {
    format!("{}/{}:{tag}@{}", reg.host(), image.repo, image.manifest_digest)
}

/// A bundles.toml (written in `dir`, next to `keys/`) for `images`: (ref, file, extra lines).
fn manifest(reg: &Registry, images: &[(String, &str, &str)]) -> String {
    let mut text = format!(
        "[partition]\nplatforms = [\"linux/amd64\"]\n\n[registries.\"{}\"]\ninsecure = true\n\n[verify]\nkeys = [\"keys/release.pub\"]\n",
        reg.host()
    );
    for (reference, file, extra) in images {
        text += &format!("\n[[image]]\nref = \"{reference}\"\nfile = \"{file}\"\n{extra}");
    }
    text
}

struct Workspace {
    dir: tempfile::TempDir,
}

impl Workspace {
    /// A dir with `keys/release.pub` (and `keys/other.pub`) copied from key pairs.
    fn new(release: &Path, other: &Path) -> Workspace {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("keys")).unwrap();
        std::fs::copy(release.join("cosign.pub"), dir.path().join("keys/release.pub")).unwrap();
        std::fs::copy(other.join("cosign.pub"), dir.path().join("keys/other.pub")).unwrap();
        Workspace { dir }
    }

    fn out(&self) -> PathBuf {
        self.dir.path().join("out")
    }

    fn bundle(&self, text: &str, extra: &[&str]) -> Output {
        let manifest = self.dir.path().join("bundles.toml");
        std::fs::write(&manifest, text).unwrap();
        let (out, cache) = (self.out(), self.dir.path().join("cache"));
        let mut args = vec!["bundle", "--no-progress", "--manifest", manifest.to_str().unwrap()];
        args.extend(["--out", out.to_str().unwrap(), "--cache", cache.to_str().unwrap()]);
        args.extend(extra);
        preseed_without_credentials(&args)
    }

    /// Bundles `text`, expecting failure with every `expected` in the message,
    /// and checks nothing was written and no layer was downloaded.
    fn refused(&self, reg: &Registry, text: &str, image: &PushedImage, expected: &[&str]) -> String {
        let before = reg.request_count();
        let out = self.bundle(text, &[]);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "bundle should fail:\n{text}");
        for e in expected {
            assert!(stderr.contains(e), "stderr should contain {e:?}, got:\n{stderr}");
        }
        assert!(!self.out().exists(), "nothing may be written, found {}", self.out().display());
        let layer = &image.layer_digests[0];
        let fetched: Vec<_> = reg.requests_since(before).into_iter().filter(|r| r.path.contains(layer)).collect();
        assert!(fetched.is_empty(), "the layer was fetched although the signature is not valid: {fetched:?}");
        stderr
    }
}

fn get(reg: &Registry, path: &str, accept: &str) -> Vec<u8> {
    let r = reg.call("GET", path, &[("Accept", accept)], &[]);
    assert_eq!(r.status, 200, "GET {path}");
    r.body
}

fn sig_tag(digest: &str) -> String {
    digest.replace(':', "-")
}

#[test]
fn signed_images_bundle_and_record_their_key() {
    let Some(cosign) = Cosign::new() else { return };
    let Some(reg) = Registry::start() else { return };
    let imgs = push_images(&reg);
    let (release, other) = (cosign.generate("release"), cosign.generate("other"));
    let repo = |i: &PushedImage| format!("{}/{}@{}", reg.host(), i.repo, i.manifest_digest);
    cosign.sign(&release, &repo(&imgs[0]), false);
    cosign.sign(&release, &repo(&imgs[1]), true);
    // Signed by another key only, and listed with that key.
    cosign.sign(&other, &repo(&imgs[2]), false);
    let ws = Workspace::new(&release, &other);
    let text = manifest(
        &reg,
        &[
            (pinned(&reg, &imgs[0], "v0"), "bundle-format", ""),
            (pinned(&reg, &imgs[1], "v1"), "sig-tag", ""),
            (pinned(&reg, &imgs[2], "v2"), "other-key", "verify = [\"keys/other.pub\"]\n"),
            // Unsigned, and exempt.
            (pinned(&reg, &imgs[3], "v3"), "exempt", "verify = false\n"),
        ],
    );
    ok("preseed bundle", &ws.bundle(&text, &[]));

    let index: PartitionIndex = serde_json::from_slice(&std::fs::read(ws.out().join("preseed.json")).unwrap()).unwrap();
    let signed: Vec<_> = index
        .images
        .iter()
        .map(|i| (i.file.as_str(), i.signed_by.as_ref().map(|s| (s.key.as_str(), s.format.as_str()))))
        .collect();
    assert_eq!(
        signed,
        [
            ("bundle-format", Some(("keys/release.pub", "sigstore-bundle"))),
            ("sig-tag", Some(("keys/release.pub", "simple-signing"))),
            ("other-key", Some(("keys/other.pub", "sigstore-bundle"))),
            ("exempt", None),
        ]
    );
    let key_sha256 = &index.images[0].signed_by.as_ref().unwrap().key_sha256;
    let der = {
        use base64::Engine as _;
        let pem = std::fs::read_to_string(release.join("cosign.pub")).unwrap();
        let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        base64::engine::general_purpose::STANDARD.decode(b64).unwrap()
    };
    assert_eq!(key_sha256, &preseed::digest::Digest::of(&der), "key_sha256 is the sha256 of the key's DER");

    let inspect = ok("preseed inspect", &preseed(&["inspect", ws.out().to_str().unwrap()]));
    assert!(inspect.contains(&format!("signed by keys/release.pub ({key_sha256}, sigstore-bundle)")), "{inspect}");
    assert!(inspect.contains("signed by keys/other.pub"), "{inspect}");

    // --offline checks the signatures kept in the cache again, without a registry.
    std::fs::remove_dir_all(ws.out()).unwrap();
    let before = reg.request_count();
    ok("preseed bundle", &ws.bundle(&text, &["--offline"]));
    assert_eq!(reg.request_count(), before, "--offline talked to the registry");
    let again: PartitionIndex = serde_json::from_slice(&std::fs::read(ws.out().join("preseed.json")).unwrap()).unwrap();
    assert_eq!(again, index);
    // …and refuses them for a key they were not made with.
    std::fs::remove_dir_all(ws.out()).unwrap();
    let text = text.replace("verify = [\"keys/other.pub\"]", "verify = [\"keys/release.pub\"]");
    let out = ws.bundle(&text, &["--offline"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("does not verify with keys/release.pub"), "{stderr}");
    assert!(!ws.out().exists());
}

#[test]
fn unsigned_or_wrongly_signed_images_stop_the_bundle() {
    let Some(cosign) = Cosign::new() else { return };
    let Some(reg) = Registry::start() else { return };
    let imgs = push_images(&reg);
    let (release, other) = (cosign.generate("release"), cosign.generate("other"));
    let repo = |i: &PushedImage| format!("{}/{}@{}", reg.host(), i.repo, i.manifest_digest);
    let ws = Workspace::new(&release, &other);
    let one = |i: usize| manifest(&reg, &[(pinned(&reg, &imgs[i], &format!("v{i}")), "app", "")]);
    let digest = |i: usize| imgs[i].manifest_digest.clone();
    let label = |i: usize| format!("k8s.io/app ({}/signed:v{i})", reg.host());

    // Unsigned.
    ws.refused(
        &reg,
        &one(0),
        &imgs[0],
        &[&label(0), &digest(0), "is not signed by keys/release.pub", "no signature found", "verify = false"],
    );

    // Signed, but by another key (both formats).
    cosign.sign(&other, &repo(&imgs[1]), false);
    cosign.sign(&other, &repo(&imgs[1]), true);
    let stderr = ws.refused(&reg, &one(1), &imgs[1], &[&label(1), "found 2 signature(s), none valid"]);
    assert!(stderr.contains("sigstore-bundle: signature does not verify with keys/release.pub"), "{stderr}");
    assert!(stderr.contains("simple-signing: signature does not verify with keys/release.pub"), "{stderr}");

    // A valid signature of another digest, copied under this digest's tags.
    cosign.sign(&release, &repo(&imgs[2]), false);
    cosign.sign(&release, &repo(&imgs[2]), true);
    let referrers = get(&reg, &format!("/v2/signed/manifests/{}", sig_tag(&digest(2))), OCI_INDEX);
    reg.push_manifest("signed", &sig_tag(&digest(3)), OCI_INDEX, &referrers);
    let legacy = get(&reg, &format!("/v2/signed/manifests/{}.sig", sig_tag(&digest(2))), OCI_MANIFEST);
    reg.push_manifest("signed", &format!("{}.sig", sig_tag(&digest(3))), OCI_MANIFEST, &legacy);
    let stderr = ws.refused(&reg, &one(3), &imgs[3], &[&label(3), &digest(3)]);
    let wrong = format!("validly signed by keys/release.pub, but for {}, not this digest", digest(2));
    assert!(stderr.contains(&format!("sigstore-bundle: {wrong}")), "{stderr}");
    assert!(stderr.contains(&format!("simple-signing: {wrong}")), "{stderr}");

    // A signature altered after signing: one byte of the DSSE signature.
    cosign.sign(&release, &repo(&imgs[4]), false);
    let tag = sig_tag(&digest(4));
    let index = images::json_of(&get(&reg, &format!("/v2/signed/manifests/{tag}"), OCI_INDEX));
    let manifest_digest = index["manifests"][0]["digest"].as_str().unwrap().to_string();
    let mut sig_manifest =
        images::json_of(&get(&reg, &format!("/v2/signed/manifests/{manifest_digest}"), OCI_MANIFEST));
    let bundle_digest = sig_manifest["layers"][0]["digest"].as_str().unwrap().to_string();
    let mut bundle = images::json_of(&get(&reg, &format!("/v2/signed/blobs/{bundle_digest}"), "*/*"));
    let sig = bundle["dsseEnvelope"]["signatures"][0]["sig"].as_str().unwrap().to_string();
    // Flip bits in the middle of the DER signature (base64 stays valid).
    let mut bytes = sig.into_bytes();
    let at = bytes.len() / 2;
    bytes[at] = if bytes[at] == b'A' { b'B' } else { b'A' };
    bundle["dsseEnvelope"]["signatures"][0]["sig"] = String::from_utf8(bytes).unwrap().into();
    let bundle_bytes = serde_json::to_vec(&bundle).unwrap();
    let new_bundle = reg.push_blob("signed", &bundle_bytes);
    sig_manifest["layers"][0]["digest"] = new_bundle.into();
    sig_manifest["layers"][0]["size"] = bundle_bytes.len().into();
    let manifest_bytes = serde_json::to_vec(&sig_manifest).unwrap();
    let new_manifest = support::registry::sha256_digest(&manifest_bytes);
    reg.push_manifest("signed", &new_manifest, OCI_MANIFEST, &manifest_bytes);
    let mut index = index;
    index["manifests"][0]["digest"] = new_manifest.into();
    index["manifests"][0]["size"] = manifest_bytes.len().into();
    reg.push_manifest("signed", &tag, OCI_INDEX, &serde_json::to_vec(&index).unwrap());
    ws.refused(
        &reg,
        &one(4),
        &imgs[4],
        &[
            &label(4),
            "sigstore-bundle: signature does not verify with keys/release.pub (signed by another key, or altered)",
        ],
    );

    // The same image bundles once it is exempt.
    let exempt = manifest(&reg, &[(pinned(&reg, &imgs[4], "v4"), "app", "verify = false\n")]);
    ok("preseed bundle", &ws.bundle(&exempt, &[]));
}
