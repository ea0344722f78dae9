//! Acceptance tests of the native erofs writer (issue 3) against the real
//! kernel driver (loop mounts, root) and erofs-utils' `fsck.erofs`.

mod support;

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use preseed::build::cache::BlobCache;
use preseed::build::layout::tree::{Node, PlannedFile, Segment, Tree};
use preseed::build::layout::{plan_tarball, TarballSpec};
use preseed::build::write::erofs;
use preseed::digest::Digest;
use preseed::oci::{self, Descriptor};
use sha2::{Digest as _, Sha256};

/// Deterministic, incompressible bytes.
fn prng_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn blob(dir: &Path, bytes: &[u8]) -> Segment {
    let digest = Digest::of(bytes);
    let path = dir.join(digest.hex());
    fs::write(&path, bytes).unwrap();
    Segment::Blob { digest, size: bytes.len() as u64, path }
}

fn file(segments: Vec<Segment>) -> PlannedFile {
    let mut f = PlannedFile::default();
    for s in segments {
        f.push(s);
    }
    f
}

fn inline(bytes: &[u8]) -> Segment {
    Segment::Inline(Arc::from(bytes))
}

/// A loop mount of an image, unmounted on drop.
struct Mount {
    dir: tempfile::TempDir,
}

impl Mount {
    fn new(image: &Path) -> Mount {
        let dir = tempfile::tempdir().unwrap();
        let status =
            Command::new("mount").args(["-t", "erofs", "-o", "loop,ro"]).arg(image).arg(dir.path()).status().unwrap();
        assert!(status.success(), "mount -t erofs {} failed", image.display());
        Mount { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

fn fsck(image: &Path) {
    let out = Command::new("fsck.erofs").arg(image).output().unwrap();
    assert!(
        out.status.success(),
        "fsck.erofs rejected {}:\n{}{}",
        image.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Compares two readers block by block without holding either in memory.
fn same_bytes(mut a: impl Read, mut b: impl Read, what: &str) {
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut offset = 0u64;
    loop {
        let na = read_full(&mut a, &mut ba);
        let nb = read_full(&mut b, &mut bb);
        assert_eq!(na, nb, "{what}: length differs near offset {offset}");
        if ba[..na] != bb[..nb] {
            let at = ba.iter().zip(&bb).position(|(x, y)| x != y).unwrap();
            panic!("{what}: content differs at offset {}", offset + at as u64);
        }
        if na == 0 {
            return;
        }
        offset += na as u64;
    }
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]).unwrap() {
            0 => break,
            k => n += k,
        }
    }
    n
}

/// Files larger than this are compared in windows (start, around the 4 GiB
/// boundary, end): reading gigabytes of holes back through the kernel is slow.
const SAMPLE_ABOVE: u64 = 256 << 20;

fn same_samples(path: &Path, f: &PlannedFile) {
    let len = f.len();
    let window = 8u64 << 20;
    let mounted = File::open(path).unwrap();
    for start in [0, (4u64 << 30).saturating_sub(window / 2), len.saturating_sub(window)] {
        let end = (start + window).min(len);
        let mut got = vec![0u8; (end - start) as usize];
        std::os::unix::fs::FileExt::read_exact_at(&mounted, &mut got, start).unwrap();
        assert!(got == planned_range(f, start, end), "{}: bytes {start}..{end} differ", path.display());
    }
}

/// The planned bytes `start..end` of a file, straight from its segments.
fn planned_range(f: &PlannedFile, start: u64, end: u64) -> Vec<u8> {
    let mut out = Vec::new();
    let mut seg_start = 0;
    for seg in &f.segments {
        let seg_end = seg_start + seg.len();
        let (from, to) = (start.max(seg_start), end.min(seg_end));
        if from < to {
            let (off, n) = (from - seg_start, (to - from) as usize);
            match seg {
                Segment::Inline(b) => out.extend_from_slice(&b[off as usize..off as usize + n]),
                Segment::Zeros(_) => out.resize(out.len() + n, 0),
                Segment::Blob { path, .. } => {
                    let mut buf = vec![0u8; n];
                    std::os::unix::fs::FileExt::read_exact_at(&File::open(path).unwrap(), &mut buf, off).unwrap();
                    out.extend_from_slice(&buf);
                }
            }
        }
        seg_start = seg_end;
    }
    out
}

/// Every directory lists exactly the tree's names; every file reads back as planned.
fn verify_tree(tree: &Tree, dir: &Path) {
    let listed: BTreeSet<String> =
        fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    let planned: BTreeSet<String> = tree.entries.keys().cloned().collect();
    assert_eq!(listed, planned, "listing of {}", dir.display());
    for (name, node) in &tree.entries {
        let path = dir.join(name);
        match node {
            Node::Dir(sub) => {
                assert!(path.is_dir(), "{} is a directory", path.display());
                verify_tree(sub, &path);
            }
            Node::File(f) => {
                let meta = fs::metadata(&path).unwrap();
                assert!(meta.is_file());
                assert_eq!(meta.len(), f.len(), "size of {}", path.display());
                if f.len() <= SAMPLE_ABOVE {
                    same_bytes(File::open(&path).unwrap(), f.reader(), &path.display().to_string());
                } else {
                    same_samples(&path, f);
                }
            }
        }
    }
}

/// Writes, fsck's, mounts and compares; returns the image's stats.
fn write_and_check(tree: &Tree, image: &Path) -> Option<erofs::Stats> {
    let stats = erofs::write(tree, image).unwrap();
    assert_eq!(stats.image_bytes, fs::metadata(image).unwrap().len());
    assert_eq!(stats.image_bytes % 4096, 0);
    support::require_tool("fsck.erofs")?;
    fsck(image);
    if !support::require_root() {
        return None;
    }
    let mount = Mount::new(image);
    verify_tree(tree, mount.path());
    Some(stats)
}

/// A tree touching every corner of the chunk layout: inline files, holes,
/// blobs at aligned and unaligned offsets, a blob ending a file, a blob twice
/// in one file, shared chunks.
fn edge_tree(blobs: &Path) -> Tree {
    let b1 = prng_bytes(1, 10_000);
    let b4k = prng_bytes(2, 4096);
    let mut tree = Tree::default();
    tree.insert_dir("empty");
    tree.insert_dir("deep/a/b/c/empty");
    tree.insert_file("zero-length", PlannedFile::default());
    tree.insert_file("one-byte", PlannedFile::from_bytes(&b"x"[..]));
    // Small enough to be inlined, read from a blob file.
    tree.insert_file("small-from-blob", file(vec![inline(b"<"), blob(blobs, &prng_bytes(8, 3000)), inline(b">")]));
    tree.insert_file("exactly-one-block", file(vec![blob(blobs, &b4k)]));
    tree.insert_file("block-inline", PlannedFile::from_bytes(prng_bytes(3, 4096)));
    tree.insert_file("almost-block", PlannedFile::from_bytes(prng_bytes(4, 4095)));
    tree.insert_file("block-and-one", PlannedFile::from_bytes(prng_bytes(5, 4097)));
    tree.insert_file("two-blocks", file(vec![inline(&[9; 100]), Segment::Zeros(8092)]));
    tree.insert_file("zeros-only", file(vec![Segment::Zeros(3 * 4096 + 17)]));
    tree.insert_file(
        "mixed",
        file(vec![inline(b"head"), Segment::Zeros(4092), blob(blobs, &b1), inline(b"tail"), Segment::Zeros(5)]),
    );
    // The same blob at a 4096-aligned offset in two files: shared chunks.
    tree.insert_file("shared-1", file(vec![inline(&[1; 4096]), blob(blobs, &b1)]));
    tree.insert_file("shared-2", file(vec![inline(&[2; 4096]), blob(blobs, &b1), inline(b"!")]));
    // Unaligned (first at 100, again right after itself), then twice aligned
    // in one file: only aligned copies share blocks.
    tree.insert_file("unaligned", file(vec![inline(&[7; 100]), blob(blobs, &b1), blob(blobs, &b1)]));
    tree.insert_file(
        "twice-aligned",
        file(vec![
            inline(&[3; 4096]),
            blob(blobs, &prng_bytes(6, 3 * 4096 + 5)),
            Segment::Zeros(4091),
            blob(blobs, &prng_bytes(6, 3 * 4096 + 5)),
            inline(b"end"),
        ]),
    );
    // Names sorting before "." and "..".
    tree.insert_file("+plus", PlannedFile::from_bytes(&b"+"[..]));
    tree.insert_file("-dash", PlannedFile::from_bytes(&b"-"[..]));
    tree.insert_file(&"n".repeat(255), PlannedFile::from_bytes(&b"long name"[..]));
    // A directory spanning several blocks.
    for i in 0..300 {
        tree.insert_file(
            &format!("many/image-{i:04}-with-a-longer-name.tar"),
            PlannedFile::from_bytes(format!("{i}").into_bytes()),
        );
    }
    // Many namespaces.
    for ns in 0..60 {
        tree.insert_file(&format!("ns-{ns:02}/app.tar"), file(vec![inline(b"hdr"), blob(blobs, &b1)]));
    }
    tree
}

/// Pinned: a change to this digest is a change of the on-disk output.
const EDGE_TREE_SHA256: &str = "8afc3dd1c9a2ecde8c4d1d4e469654cedb7dc78ac554bf7a4ca831e6889954d8";

#[test]
fn edge_tree_gives_pinned_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let image = tmp.path().join("edge.erofs");
    erofs::write(&edge_tree(tmp.path()), &image).unwrap();
    assert_eq!(sha256_file(&image), EDGE_TREE_SHA256);
}

#[test]
fn edge_cases_mount_and_read_back() {
    let tmp = tempfile::tempdir().unwrap();
    let blobs = tmp.path().join("blobs");
    fs::create_dir(&blobs).unwrap();
    let tree = edge_tree(&blobs);
    let image = tmp.path().join("out/preseed.erofs");
    fs::create_dir(tmp.path().join("out")).unwrap();
    let Some(stats) = write_and_check(&tree, &image) else { return };
    assert!(stats.chunks_deduplicated > 0, "{stats:?}");
    assert!(stats.hole_chunks > 0, "{stats:?}");
    // No temp file left next to the image.
    assert_eq!(fs::read_dir(tmp.path().join("out")).unwrap().count(), 1);
}

#[test]
fn empty_root() {
    let tmp = tempfile::tempdir().unwrap();
    let image = tmp.path().join("empty.erofs");
    write_and_check(&Tree::default(), &image);
}

#[test]
fn file_over_4_gib() {
    let tmp = tempfile::tempdir().unwrap();
    let blobs = tmp.path().join("blobs");
    fs::create_dir(&blobs).unwrap();
    let size = (4u64 << 30) + (100 << 20) + 123;
    let tail = prng_bytes(7, 9000);
    let mut tree = Tree::default();
    tree.insert_file(
        "k8s.io/huge.tar",
        file(vec![inline(&prng_bytes(6, 4096)), Segment::Zeros(size), blob(&blobs, &tail), inline(b"end")]),
    );
    tree.insert_file("preseed.json", PlannedFile::from_bytes(&b"{}"[..]));
    let image = tmp.path().join("huge.erofs");
    let stats = write_and_check(&tree, &image);
    let stats = stats.unwrap_or_else(|| erofs::write(&tree, &image).unwrap());
    // Zeros are holes: the image holds the block map, not 4 GiB.
    assert!(stats.image_bytes < 8 << 20, "{stats:?}");
}

struct Corpus {
    tree: Tree,
    unique_blob_bytes: u64,
    tar_overhead_bytes: u64,
}

/// `images` tarballs over shared base layers: image `i` carries base
/// `i % bases.len()` (every third image one more base), and a unique layer of
/// about `unique` bytes.
fn corpus(cache: &BlobCache, bases: &[usize], images: usize, unique: usize) -> Corpus {
    let bases: Vec<(Digest, u64)> = bases
        .iter()
        .enumerate()
        .map(|(n, &size)| (cache.put_bytes(&prng_bytes(1000 + n as u64, size)).unwrap(), size as u64))
        .collect();
    let mut unique_blob_bytes: u64 = bases.iter().map(|b| b.1).sum();
    let mut tar_overhead_bytes = 0;
    let mut tree = Tree::default();
    for i in 0..images {
        let layer = prng_bytes(2000 + i as u64, unique + 1234 * i);
        let layer_digest = cache.put_bytes(&layer).unwrap();
        let config = format!("{{\"image\":{i}}}").into_bytes();
        let config_digest = cache.put_bytes(&config).unwrap();
        let manifest = format!("{{\"manifest\":{i}}}").into_bytes();
        let manifest_digest = cache.put_bytes(&manifest).unwrap();
        let mut blobs = vec![
            Descriptor::new(oci::OCI_MANIFEST, manifest_digest.clone(), manifest.len() as u64),
            Descriptor::new(oci::OCI_CONFIG, config_digest, config.len() as u64),
        ];
        let mut shared = vec![i % bases.len()];
        if bases.len() > 1 && i % 3 == 0 {
            shared.push((i + 1) % bases.len());
        }
        for b in &shared {
            blobs.push(Descriptor::new(oci::OCI_LAYER_GZIP, bases[*b].0.clone(), bases[*b].1));
        }
        blobs.push(Descriptor::new(oci::OCI_LAYER_GZIP, layer_digest, layer.len() as u64));
        let blob_bytes: u64 = blobs.iter().map(|b| b.size).sum();
        let shared_bytes: u64 = shared.iter().map(|b| bases[*b].1).sum();
        unique_blob_bytes += blob_bytes - shared_bytes;
        let spec = TarballSpec {
            name: format!("registry.test/app{i}:1"),
            tag: Some("1".into()),
            extra_names: vec![],
            root: Descriptor::new(oci::OCI_MANIFEST, manifest_digest, manifest.len() as u64),
            blobs,
        };
        let tar = plan_tarball(&spec, cache);
        tar_overhead_bytes += tar.len() - blob_bytes;
        tree.insert_file(&format!("ns{}/app{i}.tar", i % 3), tar);
    }
    tree.insert_file("preseed.json", PlannedFile::from_bytes(&b"{\"version\":1}"[..]));
    Corpus { tree, unique_blob_bytes, tar_overhead_bytes }
}

#[test]
fn shared_layers_are_stored_once() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = BlobCache::open(tmp.path().join("cache")).unwrap();
    let c = corpus(&cache, &[20 << 20], 10, 300_000);
    let image = tmp.path().join("preseed.erofs");
    let stats = erofs::write(&c.tree, &image).unwrap();
    let budget = (c.unique_blob_bytes + c.tar_overhead_bytes) as f64 * 1.02;
    assert!(
        (stats.image_bytes as f64) <= budget,
        "image {} > 1.02 × (unique blobs {} + tar overhead {}): {stats:?}",
        stats.image_bytes,
        c.unique_blob_bytes,
        c.tar_overhead_bytes
    );
    let logical: u64 = c.tree.files().iter().map(|(_, f)| f.len()).sum();
    assert!(stats.image_bytes * 5 < logical, "{stats:?}, files total {logical}");
    // The base layer's 5120 chunks are written once, referenced ten times.
    assert!(stats.chunks_deduplicated >= 9 * 5120, "{stats:?}");

    let Some(stats) = write_and_check(&c.tree, &image) else { return };
    // Far below squashfs of the same tree (squashfs cannot share chunks of
    // different files; the layers are incompressible).
    let Some(mksquashfs) = support::require_tool("mksquashfs") else { return };
    let mount = Mount::new(&image);
    let sqfs = tmp.path().join("preseed.squashfs");
    let status = Command::new(mksquashfs)
        .arg(mount.path())
        .arg(&sqfs)
        .args(["-noappend", "-no-progress", "-quiet", "-processors", "2"])
        .status()
        .unwrap();
    assert!(status.success());
    let sq = fs::metadata(&sqfs).unwrap().len();
    assert!(stats.image_bytes * 4 < sq, "erofs {} vs squashfs {sq}", stats.image_bytes);
}

/// A small tree touching every layout: inline, plain directory blocks, chunks,
/// holes, shared chunks.
fn fixed_tree(blob_dir: &Path) -> Tree {
    let shared = prng_bytes(42, 3 * 4096 + 100);
    let mut tree = Tree::default();
    tree.insert_file("preseed.json", PlannedFile::from_bytes(&b"{\"version\":1}"[..]));
    tree.insert_dir("k8s.io");
    tree.insert_dir("empty");
    for i in 0..3 {
        tree.insert_file(
            &format!("k8s.io/img{i}.tar"),
            file(vec![inline(&[i as u8 + 1; 4096]), blob(blob_dir, &shared), Segment::Zeros(4096 * 2 + i)]),
        );
    }
    for i in 0..200 {
        tree.insert_file(&format!("many/entry-{i:03}"), PlannedFile::from_bytes(format!("{i}").into_bytes()));
    }
    tree
}

fn sha256_file(path: &Path) -> String {
    let mut h = Sha256::new();
    let mut f = File::open(path).unwrap();
    std::io::copy(&mut f, &mut h).unwrap();
    hex::encode(h.finalize())
}

/// Pinned: a change to this digest is a change of the on-disk output.
const FIXED_TREE_SHA256: &str = "9cad959e5244655678932e75dc9ec746ef802ddc70b71fc8749e91d76e9f9328";

#[test]
fn same_tree_gives_identical_bytes() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let ia = a.path().join("x.erofs");
    let ib = b.path().join("x.erofs");
    erofs::write(&fixed_tree(a.path()), &ia).unwrap();
    erofs::write(&fixed_tree(b.path()), &ib).unwrap();
    assert_eq!(fs::read(&ia).unwrap(), fs::read(&ib).unwrap());
    assert_eq!(sha256_file(&ia), FIXED_TREE_SHA256);
}

#[test]
fn fixed_tree_passes_fsck_and_mounts() {
    let tmp = tempfile::tempdir().unwrap();
    let tree = fixed_tree(tmp.path());
    write_and_check(&tree, &tmp.path().join("fixed.erofs"));
}

#[test]
fn output_replaces_existing_file_atomically() {
    let tmp = tempfile::tempdir().unwrap();
    let image = tmp.path().join("p.erofs");
    File::create(&image).unwrap().write_all(b"old").unwrap();
    erofs::write(&fixed_tree(tmp.path()), &image).unwrap();
    let header = fs::read(&image).unwrap();
    assert_eq!(preseed::partition::Format::sniff(&header[..2048]), Some(preseed::partition::Format::Erofs));
    let leftovers: Vec<PathBuf> = fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(".preseed-erofs"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// Size and time against erofs-utils and squashfs-tools on a ~300 MB corpus:
/// `PRESEED_BENCH_DIR=/var/tmp/bench cargo test --release --test erofs bench -- --ignored --nocapture`.
#[test]
#[ignore = "benchmark: minutes of I/O, run by hand"]
fn bench_against_mkfs_erofs_and_mksquashfs() {
    use std::time::Instant;
    let root = PathBuf::from(std::env::var("PRESEED_BENCH_DIR").unwrap_or("/var/tmp/preseed-bench".into()));
    let _ = fs::remove_dir_all(&root);
    fs::create_dir_all(&root).unwrap();
    let cache = BlobCache::open(root.join("cache")).unwrap();
    let c = corpus(&cache, &[120_000_123, 80_000_321, 40_000_555], 8, 7_000_000);
    let logical: u64 = c.tree.files().iter().map(|(_, f)| f.len()).sum();
    println!(
        "corpus: {} tarballs, {} bytes of tarballs, unique blobs {} bytes, tar overhead {} bytes",
        c.tree.files().len() - 1,
        logical,
        c.unique_blob_bytes,
        c.tar_overhead_bytes
    );
    let extracted = root.join("tree");
    for (path, f) in c.tree.files() {
        let dest = extracted.join(&path);
        fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::io::copy(&mut f.reader(), &mut File::create(&dest).unwrap()).unwrap();
    }
    let run = |what: &str, out: &Path, f: &mut dyn FnMut()| {
        Command::new("sync").status().unwrap();
        let t = Instant::now();
        f();
        Command::new("sync").status().unwrap();
        let secs = t.elapsed().as_secs_f64();
        let size = fs::metadata(out).unwrap().len();
        println!(
            "{what:<40} {size:>12} bytes  {:>6.3} × unique  {secs:>7.2} s",
            size as f64 / c.unique_blob_bytes as f64
        );
    };
    let ours = root.join("ours.erofs");
    run("preseed erofs writer", &ours, &mut || {
        let stats = erofs::write(&c.tree, &ours).unwrap();
        println!("  {stats:?}");
    });
    fsck(&ours);
    let tool = |out: &Path, cmd: &mut Command| {
        let o = cmd.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let _ = out;
    };
    let mkfs = root.join("mkfs.erofs");
    run("mkfs.erofs --chunksize=4096", &mkfs, &mut || {
        tool(&mkfs, Command::new("mkfs.erofs").args(["--chunksize=4096", "-T0"]).arg(&mkfs).arg(&extracted))
    });
    let sq_plain = root.join("plain.squashfs");
    run("mksquashfs -noD -noF -noX", &sq_plain, &mut || {
        tool(
            &sq_plain,
            Command::new("mksquashfs").arg(&extracted).arg(&sq_plain).args([
                "-noD",
                "-noF",
                "-noX",
                "-noappend",
                "-no-progress",
            ]),
        )
    });
    let sq = root.join("default.squashfs");
    run("mksquashfs (default: gzip)", &sq, &mut || {
        tool(&sq, Command::new("mksquashfs").arg(&extracted).arg(&sq).args(["-noappend", "-no-progress"]))
    });
}

/// Every blob segment of a tree: digest and cache path.
fn blobs_of(tree: &Tree) -> Vec<(Digest, PathBuf)> {
    let mut out = Vec::new();
    for (_, f) in tree.files() {
        for s in &f.segments {
            if let Segment::Blob { digest, path, .. } = s {
                out.push((digest.clone(), path.clone()));
            }
        }
    }
    out
}

/// A staged write (blobs placed first, from a provisional tree whose
/// `preseed.json` differs) gives the very bytes of a one-pass write, also
/// when the provisional tree put blobs elsewhere or some were never placed.
#[test]
fn staged_write_matches_one_pass_write() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = BlobCache::open(tmp.path().join("cache")).unwrap();
    let mut c = corpus(&cache, &[3 << 20, 1 << 20], 7, 200_000);
    // A 3-block index that sorts before the tarballs, as a real one can.
    let index = |fill: u8| PlannedFile::from_bytes(vec![fill; 3 * 4096 + 10]);
    c.tree.insert_file("a-index.json", index(b'x'));
    let one_pass = tmp.path().join("one.erofs");
    erofs::write(&c.tree, &one_pass).unwrap();
    let expected = sha256_file(&one_pass);
    let blobs = blobs_of(&c.tree);

    // Same length, other bytes: every blob keeps its blocks.
    let mut provisional = c.tree.clone();
    provisional.insert_file("a-index.json", index(b'y'));
    // Longer: every blob after it moves, so the placed copies are not used.
    let mut longer = c.tree.clone();
    longer.insert_file("a-index.json", PlannedFile::from_bytes(vec![b'y'; 5 * 4096]));
    for (name, provisional, every) in
        [("same length", &provisional, 1), ("moved", &longer, 1), ("half", &provisional, 2)]
    {
        let out = tmp.path().join(format!("{name}.erofs"));
        let staged = erofs::Staged::new(provisional, &out).unwrap();
        for (digest, path) in blobs.iter().step_by(every) {
            staged.place(digest, path).unwrap();
        }
        staged.finish(&c.tree).unwrap();
        assert_eq!(sha256_file(&out), expected, "{name}");
    }
    // The staged copies are really used: a placed blob's blocks are not
    // written again (a placed copy with other bytes survives the finish).
    let out = tmp.path().join("witness.erofs");
    let staged = erofs::Staged::new(&provisional, &out).unwrap();
    let (digest, path) = blobs.iter().find(|(_, p)| fs::metadata(p).unwrap().len() >= 1 << 20).unwrap();
    let fake = tmp.path().join("fake");
    fs::write(&fake, vec![0xA5u8; fs::metadata(path).unwrap().len() as usize]).unwrap();
    staged.place(digest, &fake).unwrap();
    staged.finish(&c.tree).unwrap();
    assert_ne!(sha256_file(&out), expected);
}

#[test]
fn short_blob_is_an_error_and_leaves_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("blob");
    fs::write(&path, vec![5u8; 5000]).unwrap();
    let mut tree = Tree::default();
    // Planned as 9000 bytes; the file holds 5000.
    tree.insert_file("a.tar", file(vec![Segment::Blob { digest: Digest::of(b"x"), size: 9000, path }]));
    let out = tmp.path().join("out");
    fs::create_dir(&out).unwrap();
    let err = erofs::write(&tree, &out.join("p.erofs")).unwrap_err();
    assert!(matches!(err, erofs::Error::ShortBlob { .. }), "{err}");
    assert_eq!(fs::read_dir(&out).unwrap().count(), 0);
}

/// Issue 16: the writer's memory does not grow with the data. 3 GB of
/// synthetic blobs (5 GB of tarballs) written to /dev/null in a child
/// process. Before whole-blob chunk runs it grew about 30 MiB per GB
/// (42 MiB at 1 GB, 309 MiB at 10 GB).
#[test]
fn memory_stays_flat_at_gigabytes() {
    let small = support::synthetic::run_child("synthetic_child", 300_000_000);
    let large = support::synthetic::run_child("synthetic_child", 3_000_000_000);
    eprintln!("peak RSS: {} KiB at 0.3 GB, {} KiB at 3 GB", small.peak_rss_kib, large.peak_rss_kib);
    assert!(large.image_bytes > 3_000_000_000, "{large:?}");
    assert!(large.peak_rss_kib < 64 * 1024, "{large:?}");
    // Flat, not merely small: ten times the data, at most 4 MiB more.
    assert!(large.peak_rss_kib < small.peak_rss_kib + 4 * 1024, "{small:?} vs {large:?}");
}

/// The child process of the synthetic-corpus tests (see `support::synthetic`).
#[test]
#[ignore = "started by memory tests in a child process"]
fn synthetic_child() {
    support::synthetic::child_main();
}
