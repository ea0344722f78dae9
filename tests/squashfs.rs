//! The squashfs writer against the real readers: the kernel driver (loop
//! mount, root only) and squashfs-tools' `unsquashfs`.

mod support;

use std::collections::BTreeSet;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use preseed::build::layout::tree::{Node, PlannedFile, Segment, Tree};
use preseed::build::write::squashfs::{self, Compression, Error, Options};
use preseed::digest::Digest;

/// squashfs data block size backhand writes with (its default, 128 KiB).
const BLOCK: usize = 128 * 1024;

/// Deterministic incompressible bytes (xorshift64*).
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A blob segment over a file written into `dir`.
fn blob(dir: &Path, name: &str, bytes: &[u8]) -> Segment {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    Segment::Blob { digest: Digest::of(bytes), size: bytes.len() as u64, path }
}

/// A bundle-shaped tree: index, tarball-like files mixing inline bytes, zeros
/// and blobs, nested and empty directories, an empty file, a ~20 MiB file.
fn sample_tree(blobs: &Path) -> Tree {
    let mut tree = Tree::default();
    tree.insert_file("preseed.json", PlannedFile::from_bytes(&br#"{"version":1}"#[..]));

    let mut pause = PlannedFile::from_bytes(vec![b'h'; 512]);
    pause.push(blob(blobs, "config", br#"{"architecture":"amd64"}"#));
    pause.push(Segment::Zeros(4096 - 24));
    pause.push(blob(blobs, "layer", &noise(1, 300_000)));
    pause.push(Segment::Zeros(1024));
    tree.insert_file("k8s.io/pause.tar", pause);

    let mut big = PlannedFile::from_bytes(vec![b'H'; 1536]);
    big.push(blob(blobs, "big", &noise(2, 20 * 1024 * 1024 + 12_345)));
    // A whole block of zeros: backhand stores it as a hole.
    big.push(Segment::Zeros(3 * BLOCK as u64));
    big.push(Segment::Inline(Arc::from(&b"end"[..])));
    tree.insert_file("k8s.io/big.tar", big);

    tree.insert_file("k8s.io/empty.tar", PlannedFile::default());
    tree.insert_file("default/nested/deeper/small.tar", PlannedFile::from_bytes(&b"small"[..]));
    tree.insert_file("default/one-block.tar", PlannedFile::from_bytes(noise(3, BLOCK)));
    tree.insert_dir("moby/empty");
    tree
}

/// Two files whose first block is identical and whose later blocks differ,
/// plus an exact copy of one: a writer that deduplicates by first block (as
/// older backhand did) would read one back as the other.
fn first_block_trap() -> Tree {
    let head = noise(10, BLOCK);
    let mut a = head.clone();
    a.extend(noise(11, 2 * BLOCK + 777));
    let mut b = head;
    b.extend(noise(12, 2 * BLOCK + 777));
    let mut tree = Tree::default();
    tree.insert_file("ns/a.tar", PlannedFile::from_bytes(a.clone()));
    tree.insert_file("ns/b.tar", PlannedFile::from_bytes(b));
    tree.insert_file("ns/copy-of-a.tar", PlannedFile::from_bytes(a));
    tree
}

fn planned(file: &PlannedFile) -> Vec<u8> {
    let mut out = Vec::new();
    file.reader().read_to_end(&mut out).unwrap();
    out
}

/// Every directory path of `tree`, `/`-separated.
fn dirs(tree: &Tree, prefix: &str, out: &mut BTreeSet<String>) {
    for (name, node) in &tree.entries {
        if let Node::Dir(sub) = node {
            let path = if prefix.is_empty() { name.clone() } else { format!("{prefix}/{name}") };
            out.insert(path.clone());
            dirs(sub, &path, out);
        }
    }
}

/// Checks that the directory `root` holds exactly `tree`, byte for byte, with
/// the fixed metadata. `check_owner`: extraction by unsquashfs as non-root
/// cannot keep uid 0, and does not restore directory mtimes reliably.
fn assert_holds(root: &Path, tree: &Tree, check_meta: bool) {
    let mut expected_dirs = BTreeSet::new();
    dirs(tree, "", &mut expected_dirs);
    let files = tree.files();
    let mut found_files = BTreeSet::new();
    let mut found_dirs = BTreeSet::new();
    walk(root, root, &mut found_files, &mut found_dirs);
    let expected_files: BTreeSet<String> = files.iter().map(|(p, _)| p.clone()).collect();
    assert_eq!(found_files, expected_files);
    assert_eq!(found_dirs, expected_dirs);

    for (path, file) in &files {
        let got = std::fs::read(root.join(path)).unwrap();
        let want = planned(file);
        assert!(got == want, "{path}: content differs ({} bytes read, {} planned)", got.len(), want.len());
        if check_meta {
            let md = std::fs::metadata(root.join(path)).unwrap();
            assert_eq!(md.permissions().mode() & 0o7777, 0o644, "{path}");
            assert_eq!((md.uid(), md.gid(), md.mtime()), (0, 0, 0), "{path}");
        }
    }
    if check_meta {
        for dir in expected_dirs.iter().map(String::as_str).chain([""]) {
            let md = std::fs::metadata(root.join(dir)).unwrap();
            assert_eq!(md.permissions().mode() & 0o7777, 0o755, "{dir:?}");
            assert_eq!((md.uid(), md.gid(), md.mtime()), (0, 0, 0), "{dir:?}");
        }
    }
}

fn walk(root: &Path, dir: &Path, files: &mut BTreeSet<String>, dirs: &mut BTreeSet<String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let rel = entry.path().strip_prefix(root).unwrap().to_str().unwrap().to_string();
        if entry.file_type().unwrap().is_dir() {
            dirs.insert(rel);
            walk(root, &entry.path(), files, dirs);
        } else {
            files.insert(rel);
        }
    }
}

/// A read-only loop mount of a squashfs image, unmounted on drop.
struct Mount {
    dir: PathBuf,
}

impl Mount {
    fn new(image: &Path, dir: &Path) -> Mount {
        std::fs::create_dir_all(dir).unwrap();
        let status =
            Command::new("mount").args(["-t", "squashfs", "-o", "loop,ro"]).arg(image).arg(dir).status().unwrap();
        assert!(status.success(), "the kernel refused to mount {}", image.display());
        Mount { dir: dir.to_path_buf() }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
    }
}

fn mount_and_check(image: &Path, tree: &Tree, scratch: &Path) {
    if !support::require_root() || support::require_tool("mount").is_none() {
        return;
    }
    let mount = Mount::new(image, &scratch.join("mnt"));
    assert_holds(&mount.dir, tree, true);
}

fn unsquashfs_extract_and_check(image: &Path, tree: &Tree, scratch: &Path) {
    let Some(unsquashfs) = support::require_tool("unsquashfs") else { return };
    let dest = scratch.join("extracted");
    let out = Command::new(unsquashfs).arg("-no-progress").arg("-d").arg(&dest).arg(image).output().unwrap();
    assert!(out.status.success(), "unsquashfs: {}", String::from_utf8_lossy(&out.stderr));
    assert_holds(&dest, tree, false);
}

#[test]
fn kernel_mounts_and_reads_back_every_file() {
    let tmp = tempfile::tempdir().unwrap();
    let tree = sample_tree(tmp.path());
    let image = tmp.path().join("preseed.squashfs");
    let stats = squashfs::write(&tree, &image).unwrap();
    assert_eq!(stats.image_bytes, std::fs::metadata(&image).unwrap().len());
    assert_eq!(stats.image_bytes % 4096, 0);
    let mut magic = [0u8; 4];
    std::fs::File::open(&image).unwrap().read_exact(&mut magic).unwrap();
    assert_eq!(&magic, b"hsqs");
    mount_and_check(&image, &tree, tmp.path());
}

#[test]
fn unsquashfs_lists_and_extracts_the_tree() {
    let Some(unsquashfs) = support::require_tool("unsquashfs") else { return };
    let tmp = tempfile::tempdir().unwrap();
    let tree = sample_tree(tmp.path());
    let image = tmp.path().join("preseed.squashfs");
    squashfs::write(&tree, &image).unwrap();

    // `-lln`: long listing with numeric owners and times.
    let out = Command::new(&unsquashfs).args(["-lln", "-d", "root"]).arg(&image).output().unwrap();
    assert!(out.status.success(), "unsquashfs -lln: {}", String::from_utf8_lossy(&out.stderr));
    let listing = String::from_utf8(out.stdout).unwrap();
    let mut listed = BTreeSet::new();
    for line in listing.lines().filter(|l| l.contains(" root")) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (mode, owner, date, time, path) = (fields[0], fields[1], fields[3], fields[4], fields[5]);
        let expected_mode = if mode.starts_with('d') { "drwxr-xr-x" } else { "-rw-r--r--" };
        assert_eq!((mode, owner, date, time), (expected_mode, "0/0", "1970-01-01", "00:00"), "{line}");
        listed.insert(path.trim_start_matches("root").trim_start_matches('/').to_string());
    }
    let mut expected: BTreeSet<String> = tree.files().into_iter().map(|(p, _)| p).collect();
    dirs(&tree, "", &mut expected);
    expected.insert(String::new());
    assert_eq!(listed, expected);

    // The superblock says what the image holds: no compressed block, no dedup.
    let out = Command::new(&unsquashfs).arg("-s").arg(&image).output().unwrap();
    let sb = String::from_utf8(out.stdout).unwrap();
    assert!(sb.contains("Data is uncompressed"), "{sb}");
    assert!(sb.contains("Inodes are uncompressed"), "{sb}");

    unsquashfs_extract_and_check(&image, &tree, tmp.path());
}

#[test]
fn same_tree_gives_identical_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let tree = sample_tree(tmp.path());
    let first = tmp.path().join("one.squashfs");
    let second = tmp.path().join("two.squashfs");
    squashfs::write(&tree, &first).unwrap();
    squashfs::write(&tree, &second).unwrap();
    let (a, b) = (std::fs::read(&first).unwrap(), std::fs::read(&second).unwrap());
    assert!(a == b, "two writes of the same tree differ");
}

#[test]
fn image_digest_is_pinned() {
    // Pins the on-disk format: a change here (backhand upgrade, option change)
    // changes every partition built from the same bundles.toml.
    let mut tree = Tree::default();
    tree.insert_file("preseed.json", PlannedFile::from_bytes(&br#"{"version":1}"#[..]));
    tree.insert_file("k8s.io/pause.tar", PlannedFile::from_bytes(noise(7, 2 * BLOCK + 100)));
    tree.insert_file("k8s.io/empty.tar", PlannedFile::default());
    tree.insert_dir("moby");
    let tmp = tempfile::tempdir().unwrap();
    let image = tmp.path().join("p.squashfs");
    squashfs::write(&tree, &image).unwrap();
    let digest = Digest::of(&std::fs::read(&image).unwrap());
    assert_eq!(digest.to_string(), "sha256:fe399c15a3a9317c25e13b6b2b43086e20170bf6a8dda66b0401d7b491b6981b");
}

#[test]
fn files_sharing_their_first_block_stay_distinct() {
    let tmp = tempfile::tempdir().unwrap();
    let tree = first_block_trap();
    let image = tmp.path().join("trap.squashfs");
    let stats = squashfs::write(&tree, &image).unwrap();
    // Duplicate detection is off: even the exact copy is stored again.
    let file_len = (3 * BLOCK + 777) as u64;
    assert!(stats.image_bytes >= 3 * file_len, "{} bytes: some file was deduplicated", stats.image_bytes);
    unsquashfs_extract_and_check(&image, &tree, tmp.path());
    mount_and_check(&image, &tree, tmp.path());
}

#[test]
fn gzip_option_writes_a_readable_compressed_image() {
    let tmp = tempfile::tempdir().unwrap();
    let mut tree = sample_tree(tmp.path());
    tree.insert_file("text.json", PlannedFile::from_bytes(b"{\"a\":1}\n".repeat(50_000)));
    let image = tmp.path().join("gz.squashfs");
    let options = Options { compression: Compression::Gzip { level: 1 } };
    let stats = squashfs::write_with(&tree, &image, &options).unwrap();
    let stored = squashfs::write(&tree, &tmp.path().join("stored.squashfs")).unwrap();
    assert!(stats.image_bytes < stored.image_bytes);
    unsquashfs_extract_and_check(&image, &tree, tmp.path());
    mount_and_check(&image, &tree, tmp.path());

    let bad = Options { compression: Compression::Gzip { level: 0 } };
    assert!(matches!(squashfs::write_with(&tree, &image, &bad), Err(Error::Options(_))));
}

#[test]
fn missing_blob_names_the_file_and_leaves_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let mut tree = Tree::default();
    tree.insert_file("k8s.io/ok.tar", PlannedFile::from_bytes(&b"fine"[..]));
    let mut bad = PlannedFile::from_bytes(vec![0u8; 512]);
    bad.push(Segment::Blob { digest: Digest::of(b"gone"), size: 4, path: tmp.path().join("no-such-blob") });
    tree.insert_file("k8s.io/bad.tar", bad);

    let image = out_dir.join("preseed.squashfs");
    match squashfs::write(&tree, &image) {
        Err(Error::Read { file, source }) => {
            assert_eq!(file, "k8s.io/bad.tar");
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("expected a read error, got {other:?}"),
    }
    let left: Vec<_> = std::fs::read_dir(&out_dir).unwrap().collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn invalid_names_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["..", ".", "a/b", "nul\0", &"x".repeat(257)] {
        let mut sub = Tree::default();
        sub.entries.insert(name.to_string(), Node::File(PlannedFile::from_bytes(&b"x"[..])));
        let mut tree = Tree::default();
        tree.entries.insert("ns".into(), Node::Dir(sub));
        match squashfs::write(&tree, &tmp.path().join("x.squashfs")) {
            Err(Error::InvalidName { path }) => assert_eq!(path, format!("ns/{name}")),
            other => panic!("{name:?}: expected InvalidName, got {other:?}"),
        }
    }
}

/// Throughput on incompressible data; run with
/// `PRESEED_BENCH_MB=200 cargo test --release --test squashfs -- --ignored --nocapture bench`.
#[test]
#[ignore]
fn bench_write_throughput() {
    let mb: usize = std::env::var("PRESEED_BENCH_MB").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    let base = std::env::var_os("PRESEED_BENCH_DIR").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    let tmp = tempfile::tempdir_in(base).unwrap();
    let mut tree = Tree::default();
    // Tarball-sized files: 20 blobs of mb/20 MiB each.
    for i in 0..20u64 {
        let bytes = noise(100 + i, mb * 1024 * 1024 / 20);
        let mut f = PlannedFile::from_bytes(vec![0u8; 1536]);
        f.push(blob(tmp.path(), &format!("blob{i}"), &bytes));
        tree.insert_file(&format!("k8s.io/img{i}.tar"), f);
    }
    for (label, options) in
        [("store", Options::default()), ("gzip-1", Options { compression: Compression::Gzip { level: 1 } })]
    {
        let image = tmp.path().join(format!("{label}.squashfs"));
        let start = std::time::Instant::now();
        let stats = squashfs::write_with(&tree, &image, &options).unwrap();
        let secs = start.elapsed().as_secs_f64();
        println!(
            "{label}: {} MiB image in {secs:.2}s = {:.0} MiB/s",
            stats.image_bytes >> 20,
            stats.image_bytes as f64 / 1048576.0 / secs
        );
    }
}
