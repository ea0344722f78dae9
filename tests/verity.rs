//! The node side through dm-verity (`--verity-root-hash`), against a real
//! containerd, real `mkfs.erofs`/`mksquashfs` partitions with preseed's
//! verity tree appended, real loop devices, `veritysetup` and the kernel's
//! dm-verity: the right root hash imports everything and leaves no device
//! behind; a wrong one imports nothing; one flipped byte in a layer fails
//! that image alone, as a corrupt partition, with nothing of it left in
//! containerd.
//!
//! The wrong-root-hash tests need no device-mapper (the hash is refused
//! before anything is attached), nor does the clean refusal on a kernel
//! without it. The others need a kernel with dm-verity: they are ignored
//! (counted as skipped) unless run with `--ignored`, which `cargo xtask
//! test` does where the kernel has it ([`device_mapper`]).
#![cfg(feature = "containerd")]

mod support;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use preseed::node::load::{Outcome, RootHash, Source};
use support::cli::preseed;
use support::containerd::Containerd;
use support::fixtures::{self, world, Entry, World};

/// Tests that create dm devices run one at a time, so "no device left"
/// is about the test's own.
static DM: Mutex<()> = Mutex::new(());

fn prerequisites(format: &str) -> Option<Containerd> {
    support::require_tool("veritysetup")?;
    support::require_tool("losetup")?;
    support::require_tool(if format == "erofs" { "mkfs.erofs" } else { "mksquashfs" })?;
    fixtures::require_static_binary()?;
    Containerd::start()
}

/// Whether this kernel has device-mapper (dm-verity is then loaded on
/// demand or built in).
///
/// The tests that need it are `#[ignore]`d: on a kernel without it (the
/// workplace's own machines: CONFIG_MD unset, no modules) they are counted
/// as skipped, never as passed; `cargo xtask test` runs them with
/// `--ignored` where the kernel has it, and `tests/vm.rs` covers the same
/// paths with the real dm-verity of Debian's kernel in a VM.
fn device_mapper() -> bool {
    let has = || {
        let misc = std::fs::read_to_string("/proc/misc").unwrap_or_default();
        misc.lines().any(|l| l.trim_end().ends_with("device-mapper"))
    };
    if !has() {
        let _ = Command::new("modprobe").arg("dm_mod").output();
    }
    has()
}

/// For the tests that need device-mapper, run with `--ignored`.
fn require_device_mapper() {
    assert!(
        device_mapper(),
        "this kernel has no device-mapper (CONFIG_BLK_DEV_DM, CONFIG_DM_VERITY): the --ignored dm-verity tests \
         need one (cargo xtask test runs them only where there is)"
    );
}

/// hello and pause in k8s.io; `big` (its own random layers) in `default`.
fn three(w: &World) -> Vec<Entry> {
    let hello =
        Entry::new("k8s.io", "hello", "preseed.local/hello:0.1", fixtures::single(&w.cache, "hello", 1, 1, 64 << 10));
    let mut pause =
        Entry::new("k8s.io", "pause", "preseed.local/pause:1", fixtures::single(&w.cache, "pause", 2, 0, 0));
    pause.sandbox = true;
    let big =
        Entry::new("default", "big", "docker.io/library/big:1", fixtures::single(&w.cache, "hello", 3, 2, 1 << 20));
    vec![hello, pause, big]
}

/// A partition of `entries` with preseed's verity tree appended, and its root hash.
fn verity_partition(w: &World, entries: &[Entry], format: &str) -> (PathBuf, RootHash) {
    let tree = w.root.join(format!("tree-{format}"));
    fixtures::bundle_tree(&w.cache, entries, &tree);
    let img = fixtures::partition(&tree, &w.root.join(format!("p.{format}")), format);
    let info = preseed::partition::hashtree::append(&img, &[7; 32], &[8; 16]).unwrap();
    (img, info.root_hash.parse().unwrap())
}

fn wrong(root: &RootHash) -> RootHash {
    let mut hex = root.hex().into_bytes();
    hex[0] = if hex[0] == b'0' { b'1' } else { b'0' };
    String::from_utf8(hex).unwrap().parse().unwrap()
}

fn load_cli(img: &Path, c: &Containerd, extra: &[&str]) -> Output {
    let mut args = vec!["load", "--json", "--image", img.to_str().unwrap(), "--address", c.socket().to_str().unwrap()];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--timeout", "10"]);
    preseed(&args)
}

fn rows(c: &Containerd, ns: &str, what: &[&str]) -> Vec<String> {
    let mut args = vec!["-n", ns];
    args.extend_from_slice(what);
    c.ctr_ok(&args).lines().skip(1).filter_map(|l| l.split_whitespace().next().map(str::to_string)).collect()
}

/// Image names, without the `sha256:` records CRI adds in k8s.io.
fn names(c: &Containerd, ns: &str) -> Vec<String> {
    let mut n: Vec<String> = rows(c, ns, &["images", "ls"]).into_iter().filter(|n| !n.starts_with("sha256:")).collect();
    n.sort();
    n
}

fn assert_nothing_imported(c: &Containerd) {
    for ns in ["k8s.io", "default"] {
        assert_eq!(names(c, ns), Vec::<String>::new(), "{ns}: images");
        assert_eq!(rows(c, ns, &["content", "ls"]), Vec::<String>::new(), "{ns}: content");
        assert_eq!(rows(c, ns, &["leases", "ls"]), Vec::<String>::new(), "{ns}: leases");
    }
}

/// Loop devices backed by `img` (autoclear may take a moment: poll).
fn assert_no_loop_on(img: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = Command::new("losetup").arg("-j").arg(img).output().unwrap();
        let left = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if left.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "loop device left on {}: {left}", img.display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// preseed's dm devices (`dmsetup ls`), empty without device-mapper.
fn preseed_dm_devices() -> Vec<String> {
    let out = Command::new("dmsetup").arg("ls").output();
    let text = out.map(|o| String::from_utf8_lossy(&o.stdout).to_string()).unwrap_or_default();
    text.lines().filter(|l| l.starts_with("preseed-verity-")).map(str::to_string).collect()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

fn wrong_root_hash_imports_nothing(format: &str) {
    let Some(c) = prerequisites(format) else { return };
    let _dm = DM.lock().unwrap_or_else(|e| e.into_inner());
    let w = world();
    let (img, root) = verity_partition(&w, &three(&w), format);
    let dm_before = preseed_dm_devices();

    let out = load_cli(&img, &c, &["--verity-root-hash", &wrong(&root).hex()]);
    assert!(!out.status.success());
    let err = stderr(&out);
    eprintln!("{err}");
    assert!(err.contains("does not match this partition"), "{err}");
    assert!(err.contains(img.to_str().unwrap()), "names the partition: {err}");
    assert_nothing_imported(&c);
    assert_no_loop_on(&img);
    assert_eq!(preseed_dm_devices(), dm_before);

    // From a kernel command line without the parameter: refused, not unverified.
    let cmdline = w.root.join("cmdline");
    std::fs::write(&cmdline, "BOOT_IMAGE=/vmlinuz root=/dev/vda1 ro quiet\n").unwrap();
    let out = load_cli(&img, &c, &["--verity-root-hash-file", cmdline.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("preseed.roothash=HEX"), "{}", stderr(&out));
    // With it, but wrong: refused the same way.
    std::fs::write(&cmdline, format!("ro preseed.roothash={} quiet\n", wrong(&root).hex())).unwrap();
    let out = load_cli(&img, &c, &["--verity-root-hash-file", cmdline.to_str().unwrap()]);
    assert!(stderr(&out).contains("does not match this partition"), "{}", stderr(&out));

    // inspect refuses it too.
    let out = preseed(&["inspect", img.to_str().unwrap(), "--verity-root-hash", &wrong(&root).hex()]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("does not match this partition"), "{}", stderr(&out));

    // A partition without a tree is not silently loaded unverified.
    let plain = fixtures::partition(&w.root.join(format!("tree-{format}")), &w.root.join("plain.img"), format);
    let out = load_cli(&plain, &c, &["--verity-root-hash", &root.hex()]);
    assert!(stderr(&out).contains("bundled without --verity"), "{}", stderr(&out));
    assert_nothing_imported(&c);
    assert_no_loop_on(&img);
    assert_no_loop_on(&plain);
    c.assert_no_panic();
}

#[test]
fn wrong_root_hash_imports_nothing_erofs() {
    wrong_root_hash_imports_nothing("erofs");
}

#[test]
fn wrong_root_hash_imports_nothing_squashfs() {
    wrong_root_hash_imports_nothing("squashfs");
}

/// The right root hash on whatever kernel runs the test: with
/// device-mapper everything is imported; without it, what a node without
/// dm-verity sees: a clear refusal, nothing imported, no loop device left.
#[test]
fn the_right_root_hash_imports_or_is_refused_cleanly() {
    let Some(c) = prerequisites("erofs") else { return };
    let _dm = DM.lock().unwrap_or_else(|e| e.into_inner());
    let w = world();
    let (img, root) = verity_partition(&w, &three(&w), "erofs");
    let out = load_cli(&img, &c, &["--verity-root-hash", &root.hex()]);
    eprintln!("{}", stderr(&out));
    if device_mapper() {
        assert!(out.status.success(), "{}", stderr(&out));
        assert_eq!(names(&c, "default"), ["docker.io/library/big:1"]);
    } else {
        assert!(!out.status.success());
        assert!(stderr(&out).contains("dm-verity"), "{}", stderr(&out));
        assert_nothing_imported(&c);
    }
    assert_no_loop_on(&img);
}

fn right_root_hash_imports_everything(format: &str) {
    require_device_mapper();
    let Some(c) = prerequisites(format) else { return };
    let _dm = DM.lock().unwrap_or_else(|e| e.into_inner());
    let w = world();
    let (img, root) = verity_partition(&w, &three(&w), format);
    let dm_before = preseed_dm_devices();
    let mut o = fixtures::load_options(Source::Image(img.clone()), c.socket());
    o.verity_root_hash = Some(root);
    let report = fixtures::run_load(&o);
    assert!(!report.failed(), "{}", report.to_json());
    assert_eq!(report.count(Outcome::Imported), 3);
    assert_eq!(names(&c, "k8s.io"), ["preseed.local/hello:0.1", "preseed.local/pause:1"]);
    assert_eq!(names(&c, "default"), ["docker.io/library/big:1"]);
    assert_no_loop_on(&img);
    assert_eq!(preseed_dm_devices(), dm_before);

    // inspect through dm-verity, by file too.
    let file = w.root.join("preseed.roothash");
    std::fs::write(&file, format!("{root}\n")).unwrap();
    let out = preseed(&["inspect", img.to_str().unwrap(), "--json", "--verity-root-hash-file", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let index: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(index["images"].as_array().unwrap().len(), 3, "{index}");
    assert_no_loop_on(&img);
    assert_eq!(preseed_dm_devices(), dm_before);
    c.assert_no_panic();
}

#[test]
#[ignore = "needs a kernel with device-mapper (dm-verity): cargo xtask test runs it where there is one; tests/vm.rs covers it in a VM"]
fn right_root_hash_imports_everything_erofs() {
    right_root_hash_imports_everything("erofs");
}

#[test]
#[ignore = "needs a kernel with device-mapper (dm-verity): cargo xtask test runs it where there is one; tests/vm.rs covers it in a VM"]
fn right_root_hash_imports_everything_squashfs() {
    right_root_hash_imports_everything("squashfs");
}

/// Byte offset of `needle` in `hay`.
fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    let first = needle[0];
    (0..=hay.len() - needle.len()).find(|&i| hay[i] == first && &hay[i..i + needle.len()] == needle)
}

fn flipped_byte_fails_only_its_image(format: &str) {
    require_device_mapper();
    let Some(c) = prerequisites(format) else { return };
    let _dm = DM.lock().unwrap_or_else(|e| e.into_inner());
    let w = world();
    let entries = three(&w);
    let big = entries[2].image.clone();
    let (img, root) = verity_partition(&w, &entries, format);
    // A byte inside one of big's own layers (random data: found once).
    let layer = &big.layers[1];
    let bytes = std::fs::read(w.cache.path(&layer.digest)).unwrap();
    let needle = &bytes[bytes.len() / 2..bytes.len() / 2 + 64];
    let at = find(&std::fs::read(&img).unwrap(), needle).expect("layer bytes in the image") as u64 + 10;
    let f = std::fs::OpenOptions::new().read(true).write(true).open(&img).unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x20], at).unwrap();
    drop(f);
    let dm_before = preseed_dm_devices();

    let mut o = fixtures::load_options(Source::Image(img.clone()), c.socket());
    o.verity_root_hash = Some(root);
    let report = fixtures::run_load(&o);
    assert!(report.failed());
    let failed: Vec<_> = report.images.iter().filter(|i| i.outcome == Outcome::Failed).collect();
    assert_eq!(failed.len(), 1, "{}", report.to_json());
    assert_eq!(failed[0].tarball, "default/big.tar");
    let msg = failed[0].error.clone().unwrap_or_default();
    assert!(msg.contains("partition is corrupt") && msg.contains("dm-verity"), "{msg}");
    assert_eq!(report.count(Outcome::Imported), 2, "{}", report.to_json());
    assert_eq!(names(&c, "k8s.io"), ["preseed.local/hello:0.1", "preseed.local/pause:1"]);
    // Nothing of big: no record, none of its blobs, no lease.
    assert_eq!(names(&c, "default"), Vec::<String>::new());
    let content = rows(&c, "default", &["content", "ls"]);
    for d in &big.blobs {
        assert!(!content.contains(&d.digest.to_string()), "{} left in containerd: {content:?}", d.digest);
    }
    assert_eq!(rows(&c, "default", &["leases", "ls"]), Vec::<String>::new());
    assert_no_loop_on(&img);
    assert_eq!(preseed_dm_devices(), dm_before);

    // The CLI says so and exits non-zero.
    let out = load_cli(&img, &c, &["--verity-root-hash", &root.hex()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("partition is corrupt"));
    c.assert_no_panic();
}

#[test]
#[ignore = "needs a kernel with device-mapper (dm-verity): cargo xtask test runs it where there is one; tests/vm.rs covers it in a VM"]
fn flipped_byte_fails_only_its_image_erofs() {
    flipped_byte_fails_only_its_image("erofs");
}

#[test]
#[ignore = "needs a kernel with device-mapper (dm-verity): cargo xtask test runs it where there is one; tests/vm.rs covers it in a VM"]
fn flipped_byte_fails_only_its_image_squashfs() {
    flipped_byte_fails_only_its_image("squashfs");
}
