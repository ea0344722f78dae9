//! A synthetic corpus of any size that costs no disk: every blob is a sparse
//! file in a real blob cache (so it reads as zeros), named by a seeded digest,
//! and the tarballs are planned by the real layout code. The partition writer
//! never looks at blob bytes to decide anything, so this exercises the same
//! work and memory as real layers of that size.
//!
//! Peak memory is measured in a child process (the test binary running one
//! ignored test again), so the parent's own allocations never count.

use std::fs::File;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use preseed::build::cache::BlobCache;
use preseed::build::layout::tree::{PlannedFile, Tree};
use preseed::build::layout::{plan_tarball, TarballSpec};
use preseed::build::write::erofs;
use preseed::digest::Digest;
use preseed::oci::{self, Descriptor};

/// Images in every synthetic corpus (the corpus has 11).
pub const IMAGES: usize = 12;
/// Base layers, each shared by `IMAGES / BASES` images.
pub const BASES: usize = 3;
/// Layers of an image's own.
pub const OWN_LAYERS: usize = 3;

/// The corpus' planned tree and its sizes.
pub struct Synthetic {
    pub tree: Tree,
    /// Bytes of distinct blobs.
    pub unique_bytes: u64,
    /// Bytes of all tarballs (shared layers counted once per tarball).
    pub file_bytes: u64,
}

/// A seeded digest (no bytes hash to it; nothing here checks).
fn digest(label: &str) -> Digest {
    Digest::of(label.as_bytes())
}

/// A blob of `size` bytes at its place in `cache`, as a sparse file.
fn sparse_blob(cache: &BlobCache, label: &str, size: u64) -> Descriptor {
    let d = digest(label);
    File::create(cache.path(&d)).unwrap().set_len(size).unwrap();
    Descriptor::new(oci::OCI_LAYER_GZIP, d, size)
}

/// About `unique` bytes of distinct blobs in `IMAGES` images: a quarter in
/// `BASES` shared base layers, the rest in each image's own layers, plus a
/// small config per image. Sizes are odd, so every blob ends mid-block.
pub fn corpus(cache: &BlobCache, unique: u64) -> Synthetic {
    let base_size = unique / 4 / BASES as u64 + 1001;
    let own_size = unique * 3 / 4 / (IMAGES * OWN_LAYERS) as u64 + 2003;
    let bases: Vec<Descriptor> = (0..BASES).map(|b| sparse_blob(cache, &format!("base-{b}"), base_size)).collect();
    let mut unique_bytes = base_size * BASES as u64;
    let mut tree = Tree::default();
    for i in 0..IMAGES {
        let config = format!("{{\"synthetic\":{i}}}").into_bytes();
        let config = Descriptor::new(oci::OCI_CONFIG, cache.put_bytes(&config).unwrap(), config.len() as u64);
        let manifest = format!("{{\"manifest\":{i}}}").into_bytes();
        let manifest = Descriptor::new(oci::OCI_MANIFEST, cache.put_bytes(&manifest).unwrap(), manifest.len() as u64);
        let mut blobs = vec![manifest.clone(), config, bases[i % BASES].clone()];
        for l in 0..OWN_LAYERS {
            blobs.push(sparse_blob(cache, &format!("image-{i}-layer-{l}"), own_size + l as u64));
        }
        unique_bytes += blobs.iter().skip(3).map(|b| b.size).sum::<u64>() + blobs[0].size + blobs[1].size;
        let spec = TarballSpec {
            name: format!("registry.test/synthetic{i}:1"),
            tag: Some("1".into()),
            extra_names: vec![],
            root: manifest,
            blobs,
        };
        tree.insert_file(&format!("k8s.io/synthetic{i}.tar"), plan_tarball(&spec, cache));
    }
    tree.insert_file("preseed.json", PlannedFile::from_bytes(&b"{\"version\":1}"[..]));
    let file_bytes = tree.files().iter().map(|(_, f)| f.len()).sum();
    Synthetic { tree, unique_bytes, file_bytes }
}

/// What a child run measured.
#[derive(Clone, Debug)]
pub struct ChildRun {
    /// Peak resident set of the child (`VmHWM`), in KiB.
    pub peak_rss_kib: u64,
    /// Seconds spent planning the corpus.
    pub plan_secs: f64,
    /// Seconds spent writing the partition.
    pub write_secs: f64,
    pub unique_bytes: u64,
    pub file_bytes: u64,
    pub image_bytes: u64,
}

const BYTES_VAR: &str = "PRESEED_SYNTHETIC_BYTES";

/// Runs the ignored test `child_test` of this test binary in a child process,
/// which plans a synthetic corpus of `unique` bytes and writes its erofs
/// partition to `/dev/null`; returns what it measured.
pub fn run_child(child_test: &str, unique: u64) -> ChildRun {
    let exe = std::env::current_exe().unwrap();
    let out = Command::new(exe)
        .args(["--exact", child_test, "--ignored", "--nocapture", "--test-threads", "1"])
        .env(BYTES_VAR, unique.to_string())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "child failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let line = stdout.lines().find_map(|l| Some(l.split_once("SYNTHETIC ")?.1)).unwrap_or_else(|| panic!("{stdout}"));
    let field = |name: &str| -> &str {
        line.split(' ').find_map(|kv| kv.strip_prefix(name)?.strip_prefix('=')).unwrap_or_else(|| panic!("{line}"))
    };
    ChildRun {
        peak_rss_kib: field("hwm_kib").parse().unwrap(),
        plan_secs: field("plan_secs").parse().unwrap(),
        write_secs: field("write_secs").parse().unwrap(),
        unique_bytes: field("unique").parse().unwrap(),
        file_bytes: field("files").parse().unwrap(),
        image_bytes: field("image").parse().unwrap(),
    }
}

/// The child's side of [`run_child`]: does nothing unless started by it.
pub fn child_main() {
    let Ok(unique) = std::env::var(BYTES_VAR) else { return };
    let unique: u64 = unique.parse().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let t = Instant::now();
    let cache = BlobCache::open(tmp.path().join("cache")).unwrap();
    let c = corpus(&cache, unique);
    let plan_secs = t.elapsed().as_secs_f64();
    let t = Instant::now();
    // To compare images by hand: PRESEED_SYNTHETIC_OUT=<file> writes one.
    let stats = match std::env::var_os("PRESEED_SYNTHETIC_OUT") {
        Some(out) => erofs::write(&c.tree, Path::new(&out)).unwrap(),
        None => {
            let sink = File::options().write(true).open("/dev/null").unwrap();
            erofs::write_to(&c.tree, &sink, Path::new("/dev/null")).unwrap()
        }
    };
    let write_secs = t.elapsed().as_secs_f64();
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let hwm = status.lines().find_map(|l| l.strip_prefix("VmHWM:")).unwrap();
    let hwm_kib: u64 = hwm.trim().trim_end_matches("kB").trim().parse().unwrap();
    println!(
        "SYNTHETIC hwm_kib={hwm_kib} plan_secs={plan_secs:.3} write_secs={write_secs:.3} unique={} files={} image={}",
        c.unique_bytes, c.file_bytes, stats.image_bytes
    );
}
