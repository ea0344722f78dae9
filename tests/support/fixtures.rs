//! Test images and partitions for the node side: a static `hello`/`pause`
//! binary compiled here with `gcc -static`, gzip layers, configs,
//! manifests, multi-platform indexes, preseed tarballs (via the real
//! layout planner), `preseed.json`, and partition images made with the
//! real `mksquashfs` / `mkfs.erofs`; and the library's load run on them
//! (`load_options`, `run_load`: the `containerd` feature).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use preseed::build::cache::BlobCache;
use preseed::build::layout::{plan_tarball, TarballSpec};
use preseed::digest::Digest;
use preseed::oci::{self, Descriptor, Platform};
use preseed::partition::index::{BuildInfo, IndexedImage, PartitionIndex, INDEX_FILE, INDEX_VERSION};

/// A temp dir with a blob cache for test images; removed when dropped.
pub struct World {
    _tmp: tempfile::TempDir,
    pub cache: BlobCache,
    pub root: PathBuf,
}

pub fn world() -> World {
    let tmp = tempfile::tempdir().unwrap();
    let cache = BlobCache::open(tmp.path().join("cache")).unwrap();
    let root = tmp.path().to_path_buf();
    World { _tmp: tmp, cache, root }
}

/// What `hello` prints.
pub const HELLO_LINE: &str = "hello from a preseeded image";

const PROGRAM: &str = r#"
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
static void done(int s) { (void)s; _exit(0); }
int main(int argc, char **argv) {
    (void)argc;
    if (strstr(argv[0], "pause")) {
        signal(SIGTERM, done);
        signal(SIGINT, done);
        for (;;) pause();
    }
    puts("hello from a preseeded image");
    return 0;
}
"#;

/// The static binary, or `None` (the test is skipped) without gcc or a
/// static libc; in CI that is a failure.
pub fn require_static_binary() -> Option<&'static [u8]> {
    super::require_tool("gcc")?;
    let bin = static_binary();
    if bin.is_none() {
        assert!(!super::in_ci(), "gcc -static failed (libc6-dev static libc missing?)");
        eprintln!("SKIPPED: gcc -static does not work here");
    }
    bin
}

/// A world whose test images run (the static binary built), or `None`
/// (skipped; a failure in CI).
pub fn runnable_world() -> Option<World> {
    require_static_binary()?;
    Some(world())
}

/// Options to load `source` into the containerd at `socket`, with a 10 s
/// timeout (a test containerd answers at once, or never).
#[cfg(feature = "containerd")]
pub fn load_options(source: preseed::node::load::Source, socket: &Path) -> preseed::node::load::LoadOptions {
    let mut o = preseed::node::load::LoadOptions::new(source);
    o.address = socket.to_path_buf();
    o.timeout = std::time::Duration::from_secs(10);
    o
}

/// The library's load with `opts` (panics if it returns an error), its
/// report printed for the test log.
#[cfg(feature = "containerd")]
pub fn run_load(opts: &preseed::node::load::LoadOptions) -> preseed::node::load::LoadReport {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let report = rt.block_on(preseed::node::load::load(opts)).expect("load");
    let mut out = Vec::new();
    report.print_human(&mut out).unwrap();
    eprintln!("{}", String::from_utf8_lossy(&out));
    report
}

/// The static binary (built once per test process), or `None` without gcc.
pub fn static_binary() -> Option<&'static [u8]> {
    static BIN: OnceLock<Option<Vec<u8>>> = OnceLock::new();
    BIN.get_or_init(|| {
        let dir = tempfile::tempdir().ok()?;
        let src = dir.path().join("hello.c");
        std::fs::write(&src, PROGRAM).ok()?;
        let out = dir.path().join("hello");
        let ok = Command::new("gcc").args(["-static", "-Os", "-s", "-o"]).arg(&out).arg(&src).status().ok()?.success();
        if !ok {
            return None;
        }
        std::fs::read(out).ok()
    })
    .as_deref()
}

/// Deterministic pseudo-random bytes (xorshift), incompressible enough.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// An uncompressed layer tar holding `files` (path, mode, bytes).
pub fn layer_tar(files: &[(&str, u32, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, mode, data) in files {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(*mode);
        h.set_mtime(0);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, path, *data).unwrap();
    }
    b.into_inner().unwrap()
}

pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::none());
    gz.write_all(bytes).unwrap();
    gz.finish().unwrap()
}

/// A built image: its root descriptor and every blob, all in `cache`.
#[derive(Clone, Debug)]
pub struct Built {
    pub root: Descriptor,
    pub blobs: Vec<Descriptor>,
    /// Layer descriptors (to corrupt one).
    pub layers: Vec<Descriptor>,
    /// Config of the host manifest: (descriptor, bytes).
    pub config: (Descriptor, Vec<u8>),
    /// Uncompressed layer tars of the host manifest.
    pub layer_tars: Vec<Vec<u8>>,
}

fn put(cache: &BlobCache, media_type: &str, bytes: &[u8]) -> Descriptor {
    let d = cache.put_bytes(bytes).unwrap();
    Descriptor::new(media_type, d, bytes.len() as u64)
}

/// One platform manifest with the given uncompressed layer tars.
fn manifest(cache: &BlobCache, arch: &str, entrypoint: &str, tars: &[Vec<u8>]) -> (Descriptor, Vec<Descriptor>, Built) {
    let mut layers = Vec::new();
    let mut diff_ids = Vec::new();
    for t in tars {
        diff_ids.push(Digest::of(t).to_string());
        layers.push(put(cache, oci::OCI_LAYER_GZIP, &gzip(t)));
    }
    let config = serde_json::json!({
        "architecture": arch,
        "os": "linux",
        "config": { "Entrypoint": [entrypoint], "Env": ["PATH=/"] },
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
    });
    let config_bytes = serde_json::to_vec(&config).unwrap();
    let config_desc = put(cache, oci::OCI_CONFIG, &config_bytes);
    let m = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": oci::OCI_MANIFEST,
        "config": config_desc,
        "layers": layers,
    });
    let md = put(cache, oci::OCI_MANIFEST, &serde_json::to_vec(&m).unwrap());
    let mut blobs = layers.clone();
    blobs.push(config_desc.clone());
    blobs.push(md.clone());
    let built = Built {
        root: md.clone(),
        blobs: blobs.clone(),
        layers: layers.clone(),
        config: (config_desc, config_bytes),
        layer_tars: tars.to_vec(),
    };
    (md, blobs, built)
}

/// A single-platform image for the host: the static binary as `/<name>`
/// plus `extra` random layers of `extra_size` bytes.
pub fn single(cache: &BlobCache, binary_name: &str, seed: u64, extra: usize, extra_size: usize) -> Built {
    let bin = static_binary().expect("gcc -static works");
    let mut tars = vec![layer_tar(&[(binary_name, 0o755, bin)])];
    for i in 0..extra {
        tars.push(layer_tar(&[(&format!("data/{seed}-{i}"), 0o644, &noise(seed * 100 + i as u64, extra_size))]));
    }
    let (_, _, built) = manifest(cache, &Platform::host().architecture, &format!("/{binary_name}"), &tars);
    built
}

/// A two-platform index: the host manifest runs `/hello`; an arm64 (or
/// amd64, on arm64 hosts) manifest with a random layer.
pub fn multi(cache: &BlobCache, seed: u64) -> Built {
    let host = single(cache, "hello", seed, 1, 64 << 10);
    let other_arch = if Platform::host().architecture == "arm64" { "amd64" } else { "arm64" };
    let (other, other_blobs, _) =
        manifest(cache, other_arch, "/hello", &[layer_tar(&[("x", 0o644, &noise(seed + 7, 4096))])]);
    let mut hm = host.root.clone();
    hm.platform = Some(Platform::host());
    let mut om = other.clone();
    om.platform = Some(Platform { os: "linux".into(), architecture: other_arch.into(), variant: None });
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": oci::OCI_INDEX,
        "manifests": [hm, om],
    });
    let root = put(cache, oci::OCI_INDEX, &serde_json::to_vec(&index).unwrap());
    let mut blobs = host.blobs.clone();
    blobs.extend(other_blobs);
    blobs.push(root.clone());
    Built { root, blobs, ..host }
}

/// One image to put in a partition.
#[derive(Clone, Debug)]
pub struct Entry {
    pub namespace: String,
    pub file: String,
    pub name: String,
    pub names: Vec<String>,
    pub pin: bool,
    pub sandbox: bool,
    pub boot: bool,
    pub image: Built,
}

impl Entry {
    pub fn new(namespace: &str, file: &str, name: &str, image: Built) -> Self {
        Entry {
            namespace: namespace.into(),
            file: file.into(),
            name: name.into(),
            names: vec![],
            pin: true,
            sandbox: false,
            boot: false,
            image,
        }
    }
}

/// The planned preseed tarball for `e`.
pub fn plan(cache: &BlobCache, e: &Entry) -> preseed::build::layout::tree::PlannedFile {
    let tag = e.name.rsplit_once(':').map(|(_, t)| t.to_string()).filter(|t| !t.contains('/'));
    let spec = TarballSpec {
        name: e.name.clone(),
        tag,
        extra_names: e.names.clone(),
        root: e.image.root.clone(),
        blobs: e.image.blobs.clone(),
    };
    plan_tarball(&spec, cache)
}

/// Writes one preseed tarball for `e` to `path`.
pub fn write_tarball(cache: &BlobCache, e: &Entry, path: &Path) -> u64 {
    let plan = plan(cache, e);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut f = std::fs::File::create(path).unwrap();
    std::io::copy(&mut plan.reader(), &mut f).unwrap();
    plan.len()
}

/// Writes the bundle tree (`preseed.json`, `<ns>/<file>.tar`) under `dir`.
pub fn bundle_tree(cache: &BlobCache, entries: &[Entry], dir: &Path) {
    let mut images = Vec::new();
    for e in entries {
        let rel = format!("{}/{}.tar", e.namespace, e.file);
        let path = dir.join(&rel);
        let size = write_tarball(cache, e, &path);
        let mut bytes = Vec::new();
        std::fs::File::open(&path).unwrap().read_to_end(&mut bytes).unwrap();
        images.push(IndexedImage {
            namespace: e.namespace.clone(),
            file: e.file.clone(),
            path: rel,
            name: e.name.clone(),
            names: e.names.clone(),
            digest: e.image.root.digest.clone(),
            media_type: e.image.root.media_type.clone(),
            platforms: vec![Platform::host().to_string()],
            pin: e.pin,
            sandbox: e.sandbox,
            boot: e.boot,
            size,
            sha256: Digest::of(&bytes),
            signed_by: None,
            blobs: Vec::new(),
            referrers: Vec::new(),
        });
    }
    let index = PartitionIndex {
        version: INDEX_VERSION,
        images,
        build: BuildInfo { tool: "preseed test".into(), format: "test".into() },
        verity: None,
    };
    std::fs::write(dir.join(INDEX_FILE), index.to_json()).unwrap();
}

/// Partition image of `dir` made by the real tools.
pub fn partition(dir: &Path, out: &Path, format: &str) -> PathBuf {
    let status = match format {
        "squashfs" => {
            Command::new("mksquashfs").arg(dir).arg(out).args(["-noappend", "-quiet", "-no-progress"]).output()
        }
        // Chunked, like preseed's own writer: shared 4 KiB-aligned chunks stored once.
        "erofs" => Command::new("mkfs.erofs").arg("--chunksize=4096").arg(out).arg(dir).output(),
        _ => unreachable!(),
    }
    .unwrap();
    assert!(status.status.success(), "{format}: {}", String::from_utf8_lossy(&status.stderr));
    out.to_path_buf()
}

/// A legacy `docker save` archive (manifest.json + <id>/layer.tar).
pub fn docker_save(built: &Built, repo_tags: &[&str], out: &Path) {
    let mut b = tar::Builder::new(std::fs::File::create(out).unwrap());
    let mut add = |path: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, path, data).unwrap();
    };
    let config_name = format!("{}.json", built.config.0.digest.hex());
    add(&config_name, &built.config.1);
    let mut layers = Vec::new();
    for (i, t) in built.layer_tars.iter().enumerate() {
        let p = format!("{:064x}/layer.tar", i + 1);
        add(&p, t);
        layers.push(p);
    }
    let manifest = serde_json::json!([{ "Config": config_name, "RepoTags": repo_tags, "Layers": layers }]);
    add("manifest.json", &serde_json::to_vec(&manifest).unwrap());
    add("repositories", b"{}");
    b.into_inner().unwrap().flush().unwrap();
}
