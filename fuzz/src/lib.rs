//! The fuzz harnesses: one function per parser that takes bytes from a
//! partition, a registry client or a person, each run by the libFuzzer target
//! of the same name (`fuzz_targets/`). A harness must never panic, hang or
//! grow without bound on any input; errors are the expected answer.
//!
//! * [`tar`]: a tarball as the node reads it (plain, gzip, zstd), then its
//!   images walked;
//! * [`image`]: the image walk over an OCI layout or docker-save archive
//!   whose documents the fuzzer writes, digests filled in (see [`layout`]);
//! * [`index`]: `preseed.json`, and a `--dir` source holding it;
//! * [`serve`]: the registry's request path (routing, names, queries, `Range`);
//! * [`verity`]: the verity superblock, a root hash (file or kernel command
//!   line), and finding the tree after a filesystem;
//! * [`manifest`]: `bundles.toml` and image references;
//! * [`containerd_config`]: containerd's config as `place` reads it;
//! * [`trust`]: what a partition carries as signatures, attestations and
//!   SBOMs — a signature manifest's layers, a sigstore bundle or
//!   simple-signing payload checked against a key, a referrer classified.

use std::cell::RefCell;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use preseed::build::cache::BlobCache;
use preseed::build::layout::{plan_tarball, TarballSpec};
use preseed::digest::Digest;
use preseed::node::read::archive::Archive;
use preseed::node::read::image;
use preseed::oci::{self, Descriptor};

thread_local! {
    /// One scratch directory per fuzzing thread, reused for every input.
    static SCRATCH: RefCell<Option<tempfile::TempDir>> = const { RefCell::new(None) };
}

fn scratch() -> PathBuf {
    SCRATCH
        .with(|s| s.borrow_mut().get_or_insert_with(|| tempfile::tempdir().expect("a temp dir")).path().to_path_buf())
}

/// `bytes` as the file `name` in the scratch directory.
fn file_with(name: &str, bytes: &[u8]) -> PathBuf {
    let path = scratch().join(name);
    std::fs::write(&path, bytes).expect("scratch file written");
    path
}

/// Reads `archive` as the loader, `place` and `serve` do.
fn read_archive(path: &Path) {
    let Ok(archive) = Archive::open(path) else { return };
    let entries: Vec<_> = archive.entries().map(|(n, e)| (n.to_string(), e)).collect();
    for (name, entry) in entries.iter().take(64) {
        if entry.size <= 4096 {
            let _ = archive.read(name, 4096);
        }
    }
    if let Ok(images) = image::images(&archive) {
        for img in images {
            assert!(img.blobs.len() <= image::MAX_VISITS * 2 + 1, "the walk outgrew its bound");
        }
    }
}

/// A tarball (or a gzip or zstd compressed one).
pub fn tar(data: &[u8]) {
    read_archive(&file_with("t.tar", data));
}

/// The documents of a fuzzed archive: NUL-separated; document 0 is
/// `index.json` (or `manifest.json` of a docker save, if it is a JSON array),
/// the others are blobs. In a document, `@N` stands for document N's digest
/// and `#N` for its size (N > the document's own number: children after
/// parents), so that the fuzzer can write descriptors that match. Each blob
/// is stored as `blobs/sha256/<hex>` and as `fN`.
pub fn layout(data: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut docs: Vec<Vec<u8>> = data.split(|&b| b == 0).take(32).map(<[u8]>::to_vec).collect();
    let mut digests: Vec<Option<(Digest, usize)>> = vec![None; docs.len()];
    for i in (0..docs.len()).rev() {
        let mut doc = std::mem::take(&mut docs[i]);
        for (j, d) in digests.iter().enumerate().skip(i + 1).rev() {
            let Some((digest, size)) = d else { continue };
            doc = replace(&doc, format!("@{j}").as_bytes(), digest.to_string().as_bytes());
            doc = replace(&doc, format!("#{j}").as_bytes(), size.to_string().as_bytes());
        }
        digests[i] = Some((Digest::of(&doc), doc.len()));
        docs[i] = doc;
    }
    let mut files = Vec::new();
    let docker_save = docs.first().is_some_and(|d| d.trim_ascii_start().starts_with(b"["));
    for (i, doc) in docs.into_iter().enumerate() {
        if i == 0 {
            let name = if docker_save { "manifest.json" } else { "index.json" };
            files.push((name.to_string(), doc));
            continue;
        }
        files.push((Digest::of(&doc).layout_path(), doc.clone()));
        files.push((format!("f{i}"), doc));
    }
    files
}

fn replace(haystack: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(haystack.len());
    let mut i = 0;
    while i < haystack.len() {
        if haystack[i..].starts_with(from) {
            out.extend_from_slice(to);
            i += from.len();
        } else {
            out.push(haystack[i]);
            i += 1;
        }
    }
    out
}

/// A tar stream of `files`.
pub fn tar_of(files: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        let _ = b.append_data(&mut h, name, &data[..]);
    }
    b.into_inner().unwrap_or_default()
}

/// The image walk over an archive the fuzzer describes ([`layout`]).
pub fn image(data: &[u8]) {
    read_archive(&file_with("i.tar", &tar_of(&layout(data))));
}

/// `preseed.json`: parsed, each entry checked, and read as `--dir` does.
pub fn index(data: &[u8]) {
    if let Ok(index) = preseed::partition::index::PartitionIndex::from_json(data) {
        for img in &index.images {
            let _ = img.problem();
        }
    }
    let dir = scratch().join("dir");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join("preseed.json"), data);
    let _ = preseed::node::read::source::list(&dir);
}

/// A release plan (`preseed pull` reads it from a registry): parsed and
/// checked; what a pull computes from a plan that passes must not overflow.
pub fn release(data: &[u8]) {
    if let Ok(plan) = preseed::partition::release::Plan::parse(data) {
        assert!(plan.rest_bytes() <= plan.data_bytes);
        assert!(plan.image_bytes() >= plan.data_bytes);
        for piece in &plan.pieces {
            assert!(piece.from + piece.len <= plan.blob(piece).size);
        }
    }
}

/// The registry a [`serve`] request goes to: one real preseed tarball (an
/// index over two platforms) under two names.
fn catalog() -> &'static preseed::node::serve::Catalog {
    static CATALOG: OnceLock<(tempfile::TempDir, preseed::node::serve::Catalog)> = OnceLock::new();
    &CATALOG
        .get_or_init(|| {
            let dir = tempfile::tempdir().expect("a temp dir");
            let tarball = sample_tarball(&dir.path().join("cache"));
            std::fs::create_dir_all(dir.path().join("k8s.io")).expect("namespace dir");
            std::fs::write(dir.path().join("k8s.io/app.tar"), tarball).expect("tarball written");
            let catalog = preseed::node::serve::Catalog::build(dir.path(), None).expect("the sample catalog builds");
            (dir, catalog)
        })
        .1
}

/// One request: method, target (path and query) and `Range` header, one a
/// line.
pub fn serve(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.splitn(3, '\n');
    let (method, target, range) = (lines.next().unwrap_or(""), lines.next().unwrap_or(""), lines.next());
    let mut req = hyper::Request::builder().method(method).uri(target);
    if let Some(r) = range {
        req = req.header("range", r);
    }
    let Ok(req) = req.body(()) else { return };
    let response = preseed::node::serve::http::route(catalog(), &req);
    assert!(response.status().as_u16() < 500, "a server error for {method} {target}");
}

/// A cosign key (P-256), for [`trust`].
const COSIGN_PUB: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE8LOsuqTwF+qvKP0E+oBGoLQyLcgf
HaMj7JofjGymMU+ePrYY1k6pm+6RoG8IG7MdH58MZnAGmeriyYQ4YAOAHg==
-----END PUBLIC KEY-----
";

/// What a node policy and `serve` read of a carried referrer: `data` as a
/// signature manifest, as a sigstore bundle and a simple-signing payload
/// checked against a key, and as a referrer to classify.
pub fn trust(data: &[u8]) {
    use preseed::trust::{cosign, referrer};
    static KEY: OnceLock<std::sync::Arc<preseed::trust::PublicKey>> = OnceLock::new();
    let key = KEY.get_or_init(|| {
        let key = preseed::trust::PublicKey::from_pem("k.pub", Path::new("k.pub"), COSIGN_PUB);
        std::sync::Arc::new(key.expect("the fuzz key parses"))
    });
    for layer in cosign::signature_layers(data) {
        let _ = layer.blob();
        let _ = layer.attach(data.to_vec());
    }
    let text = String::from_utf8_lossy(data).into_owned();
    let attached = [
        cosign::Attached::SigstoreBundle { bundle: text.clone() },
        cosign::Attached::SimpleSigning { payload: text.clone(), signature: text.clone() },
    ];
    let _ = cosign::check(&Digest::of(b"subject"), &attached, std::slice::from_ref(key));
    let _ = referrer::key_hint(data);
    let _ = referrer::classify(Some(&text), &[text.as_str()], || referrer::predicate_type(data));
}

/// The verity superblock, a root hash as given to a node, and the tree's
/// location behind a filesystem image.
pub fn verity(data: &[u8]) {
    let _ = preseed::partition::verity::Superblock::parse(data);
    let _ = preseed::partition::verity::RootHash::from_text(&String::from_utf8_lossy(data), Path::new("cmdline"));
    let _ = preseed::node::read::verity::locate(&file_with("v.img", data));
}

/// `bundles.toml`, and each line as an image reference.
pub fn manifest(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let strict = preseed::build::manifest::Strictness::default();
    let _ = preseed::build::manifest::BundleManifest::parse(Path::new("/nonexistent/bundles.toml"), &text, strict);
    for line in text.lines().take(16) {
        let _ = line.parse::<preseed::build::manifest::Reference>();
    }
}

/// containerd's configuration, as `preseed place` reads it.
pub fn containerd_config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = preseed::node::place::config::parse_content(Path::new("/etc/containerd/config.toml"), &text);
}

/// A real preseed tarball, planned by the bundler's own layout code: an
/// index over two platforms, each manifest with a config and a layer.
pub fn sample_tarball(cache_dir: &Path) -> Vec<u8> {
    let cache = BlobCache::open(cache_dir).expect("a blob cache");
    let put = |bytes: &[u8], media_type: &str| {
        let d = cache.put_bytes(bytes).expect("blob stored");
        Descriptor::new(media_type, d, bytes.len() as u64)
    };
    let mut blobs = Vec::new();
    let mut manifests = Vec::new();
    for (arch, seed) in [("amd64", 1u8), ("arm64", 2u8)] {
        let layer = put(&gzip(&[seed; 300]), oci::OCI_LAYER_GZIP);
        let config = put(
            format!(r#"{{"architecture":"{arch}","os":"linux","rootfs":{{"type":"layers","diff_ids":[]}}}}"#)
                .as_bytes(),
            oci::OCI_CONFIG,
        );
        let manifest = serde_json::json!({
            "schemaVersion": 2, "mediaType": oci::OCI_MANIFEST, "config": config, "layers": [layer],
        });
        let mut m = put(manifest.to_string().as_bytes(), oci::OCI_MANIFEST);
        blobs.extend([layer, config, m.clone()]);
        m.platform = Some(format!("linux/{arch}").parse().expect("a platform"));
        manifests.push(m);
    }
    let index = serde_json::json!({ "schemaVersion": 2, "mediaType": oci::OCI_INDEX, "manifests": manifests });
    let root = put(index.to_string().as_bytes(), oci::OCI_INDEX);
    blobs.push(root.clone());
    let spec = TarballSpec {
        name: "registry.example/app:1".into(),
        tag: Some("1".into()),
        extra_names: vec!["docker.io/library/app:latest".into()],
        root,
        blobs,
    };
    let mut out = Vec::new();
    std::io::copy(&mut plan_tarball(&spec, &cache).reader(), &mut out).expect("tarball read");
    out
}

/// gzip of `bytes`.
pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes).expect("in memory");
    e.finish().expect("in memory")
}
