//! The node-side loader against a real containerd (and runc) started by the
//! test, with partitions made by the real mksquashfs / mkfs.erofs.
#![cfg(feature = "containerd")]

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use preseed::node::load::{self, LoadOptions, Outcome, Source};
use support::cli;
use support::containerd::Containerd;
use support::fixtures::{self, load_options, run_load, world, Entry, World};
use support::gate::{Gate, Hold};

/// Everything a partition test needs, or `None` (skipped) without it.
fn prerequisites(format: &str) -> Option<Containerd> {
    support::require_tool(if format == "erofs" { "mkfs.erofs" } else { "mksquashfs" })?;
    fixtures::require_static_binary()?;
    Containerd::start()
}

/// `preseed load --dir DIR --json` as a child process talking to the
/// containerd socket `address` (a [`Gate`] in front of it, for tests that
/// take containerd away, or kill the loader, at a point they choose).
fn spawn_load(dir: &Path, address: &Path) -> std::process::Child {
    cli::command()
        .args(["load", "--json", "--jobs", "1", "--dir"])
        .arg(dir)
        .arg("--address")
        .arg(address)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// The one lease in `ns`: id and labels.
fn the_lease(c: &Containerd, ns: &str) -> (String, std::collections::HashMap<String, String>) {
    use preseed::node::load::containerd::Client;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let client = Client::connect(c.socket(), Duration::from_secs(5)).await.unwrap();
        let mut leases = client.leases_list(ns).await.unwrap();
        assert_eq!(leases.len(), 1, "{leases:?}");
        leases.pop().unwrap()
    })
}

/// A tree with one image of 4 MiB layers: a load held halfway through
/// writing them (`Hold::AfterDataBytes`) is mid-layer.
fn layered_tree(w: &World, name: &str) -> (Entry, PathBuf) {
    let e = Entry::new("k8s.io", "big", name, fixtures::single(&w.cache, "hello", 80, 3, 4 << 20));
    let tree = w.root.join("big-tree");
    fixtures::bundle_tree(&w.cache, std::slice::from_ref(&e), &tree);
    (e, tree)
}

/// `ctr images ls` rows of a namespace: name → labels column.
fn images(c: &Containerd, ns: &str) -> Vec<(String, String)> {
    c.ctr_ok(&["-n", ns, "images", "ls"])
        .lines()
        .skip(1)
        .map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            (cols[0].to_string(), cols.last().unwrap().to_string())
        })
        .collect()
}

fn names(c: &Containerd, ns: &str) -> Vec<String> {
    // CRI adds its own `sha256:<config>` records in k8s.io; not ours.
    let mut n: Vec<String> = images(c, ns).into_iter().map(|(n, _)| n).filter(|n| !n.starts_with("sha256:")).collect();
    n.sort();
    n
}

fn labels_of(c: &Containerd, ns: &str, name: &str) -> String {
    images(c, ns).into_iter().find(|(n, _)| n == name).map(|(_, l)| l).unwrap_or_default()
}

/// Three images: hello (two-platform index, extra name), pause (sandbox) in
/// k8s.io, and a bigger one in `default`.
fn three(w: &World) -> Vec<Entry> {
    let mut hello = Entry::new("k8s.io", "hello", "preseed.local/hello:0.1", fixtures::multi(&w.cache, 1));
    hello.names = vec!["registry.local/hello:latest".into()];
    let mut pause =
        Entry::new("k8s.io", "pause", "preseed.local/pause:1", fixtures::single(&w.cache, "pause", 2, 0, 0));
    pause.sandbox = true;
    // Big enough that the cold load is dominated by content, as on a real node.
    let big =
        Entry::new("default", "big", "docker.io/library/big:1", fixtures::single(&w.cache, "hello", 3, 4, 8 << 20));
    vec![hello, pause, big]
}

fn make_partition(w: &World, entries: &[Entry], format: &str, name: &str) -> PathBuf {
    let tree = w.root.join(format!("tree-{name}"));
    fixtures::bundle_tree(&w.cache, entries, &tree);
    fixtures::partition(&tree, &w.root.join(format!("{name}.{format}")), format)
}

fn mountinfo() -> String {
    std::fs::read_to_string("/proc/self/mountinfo").unwrap()
}

/// No loader mount is left behind. Tests in this file run in parallel and
/// mountinfo is shared by the whole mount namespace, so a mount seen once may
/// be another test's, still loading: only one that stays for 10 s is a leak.
fn assert_nothing_mounted_from(before: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let after = mountinfo();
        let new: Vec<String> =
            after.lines().filter(|l| !before.contains(*l) && l.contains("preseed-mnt-")).map(str::to_string).collect();
        if new.is_empty() {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "left mounted: {new:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn harness_starts_and_stops_containerd() {
    let Some(c) = Containerd::start() else { return };
    let out = c.ctr_ok(&["version"]);
    assert!(out.contains("Server:"), "{out}");
    let plugins = c.ctr_ok(&["plugins", "ls"]);
    assert!(plugins.lines().any(|l| l.contains("io.containerd.grpc.v1") && l.contains(" cri ") && l.contains(" ok")));
    let dir = c.dir().to_path_buf();
    drop(c);
    assert!(!dir.exists());
}

fn partition_imports_pins_runs_and_reloads(format: &str) {
    let Some(c) = prerequisites(format) else { return };
    let w = world();
    let entries = three(&w);
    let img = make_partition(&w, &entries, format, "p1");
    let before = mountinfo();
    let o = load_options(Source::Image(img.clone()), c.socket());

    let cold = run_load(&o);
    assert!(!cold.failed(), "{}", cold.to_json());
    assert_eq!(cold.count(Outcome::Imported), 3);
    assert!(cold.bytes_written > 6 << 20);
    assert_nothing_mounted_from(&before);

    assert_eq!(
        names(&c, "k8s.io"),
        ["preseed.local/hello:0.1", "preseed.local/pause:1", "registry.local/hello:latest"]
    );
    assert_eq!(names(&c, "default"), ["docker.io/library/big:1"]);
    for (ns, name) in [
        ("k8s.io", "preseed.local/hello:0.1"),
        ("k8s.io", "registry.local/hello:latest"),
        ("default", "docker.io/library/big:1"),
    ] {
        let labels = labels_of(&c, ns, name);
        assert!(labels.contains("io.cri-containerd.pinned=pinned"), "{name}: {labels}");
        assert!(labels.contains("dev.preseed.source="), "{name}: {labels}");
        let check = c.ctr_ok(&["-n", ns, "images", "check", &format!("name=={name}")]);
        assert!(check.contains("complete"), "{check}");
    }
    // No lease left behind.
    for ns in ["k8s.io", "default"] {
        assert_eq!(c.ctr_ok(&["-n", ns, "leases", "ls", "-q"]).trim(), "");
    }
    // GC labels like containerd's own import.
    let content = c.ctr_ok(&["-n", "k8s.io", "content", "ls"]);
    assert!(content.contains("containerd.io/gc.ref.content.m.0="), "{content}");
    assert!(content.contains("containerd.io/gc.ref.content.config="), "{content}");
    assert!(content.contains("containerd.io/gc.ref.content.l.0="), "{content}");

    // The image runs: its layer carries a static binary.
    let out = c.ctr_ok(&["-n", "k8s.io", "run", "--rm", "preseed.local/hello:0.1", &format!("hello-{format}")]);
    assert!(out.contains(fixtures::HELLO_LINE), "{out}");

    let warm = run_load(&o);
    assert!(!warm.failed());
    assert_eq!(warm.count(Outcome::AlreadyPresent), 3, "{}", warm.to_json());
    assert_eq!(warm.bytes_written, 0);
    assert!(labels_of(&c, "k8s.io", "preseed.local/pause:1").contains("io.cri-containerd.pinned=pinned"));
    assert_nothing_mounted_from(&before);
    eprintln!(
        "TIMING {format}: cold load {} ms ({} bytes), warm load {} ms ({:.1}% of cold)",
        cold.duration_ms,
        cold.bytes_written,
        warm.duration_ms,
        warm.duration_ms as f64 * 100.0 / cold.duration_ms.max(1) as f64
    );
}

#[test]
fn squashfs_partition_imports_pins_runs_and_reloads() {
    partition_imports_pins_runs_and_reloads("squashfs");
}

#[test]
fn erofs_partition_imports_pins_runs_and_reloads() {
    partition_imports_pins_runs_and_reloads("erofs");
}

fn corrupt_first_layer(tarball: &Path, e: &Entry) {
    let archive = preseed::node::read::archive::Archive::open(tarball).unwrap();
    let at = archive.blob(&e.image.layers[0].digest).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(tarball).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(b"CORRUPT", at.offset + at.size / 2).unwrap();
}

#[test]
fn corrupted_layer_fails_that_image_only_and_leaves_nothing() {
    let Some(c) = prerequisites("squashfs") else { return };
    let w = world();
    let good =
        Entry::new("k8s.io", "good", "preseed.local/good:1", fixtures::single(&w.cache, "hello", 10, 1, 1 << 20));
    let bad = Entry::new("k8s.io", "bad", "preseed.local/bad:1", fixtures::single(&w.cache, "hello", 11, 2, 1 << 20));
    let tree = w.root.join("tree");
    fixtures::bundle_tree(&w.cache, &[bad.clone(), good.clone()], &tree);
    // Corrupt the bad image's second layer (its own, not shared with good).
    let mut bad_second = bad.clone();
    bad_second.image.layers.remove(0);
    corrupt_first_layer(&tree.join("k8s.io/bad.tar"), &bad_second);
    let img = fixtures::partition(&tree, &w.root.join("p.squashfs"), "squashfs");

    let report = run_load(&load_options(Source::Image(img), c.socket()));
    assert!(report.failed());
    let bad_r = report.images.iter().find(|i| i.tarball == "k8s.io/bad.tar").unwrap();
    assert_eq!(bad_r.outcome, Outcome::Failed);
    let err = bad_r.error.clone().unwrap();
    assert!(err.contains("layer") && err.contains(&bad_second.image.layers[0].digest.to_string()), "{err}");
    let good_r = report.images.iter().find(|i| i.tarball == "k8s.io/good.tar").unwrap();
    assert_eq!(good_r.outcome, Outcome::Imported);
    assert_eq!(names(&c, "k8s.io"), ["preseed.local/good:1"]);
    assert_eq!(c.ctr_ok(&["-n", "k8s.io", "leases", "ls", "-q"]).trim(), "");
    // The lease was deleted with a synchronous GC: none of bad's own blobs remain.
    let content = c.ctr_ok(&["-n", "k8s.io", "content", "ls", "-q"]);
    let good_blobs: Vec<String> = good.image.blobs.iter().map(|d| d.digest.to_string()).collect();
    for d in &bad.image.blobs {
        let s = d.digest.to_string();
        if !good_blobs.contains(&s) {
            assert!(!content.contains(&s), "stray blob {s} of the failed image:\n{content}");
        }
    }
    for s in &good_blobs {
        assert!(content.contains(s.as_str()), "good blob {s} missing");
    }
    // No half-written ingest either.
    assert!(c.ctr_ok(&["-n", "k8s.io", "content", "active"]).lines().count() <= 1);
}

#[test]
fn containerd_not_running_is_a_clear_error_after_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = LoadOptions::new(Source::Dir(dir.path().to_path_buf()));
    o.address = dir.path().join("nope.sock");
    o.timeout = Duration::from_millis(800);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let start = std::time::Instant::now();
    let err = rt.block_on(load::load(&o)).expect_err("must fail");
    let waited = start.elapsed();
    assert!(waited >= Duration::from_millis(800) && waited < Duration::from_secs(30), "{waited:?}");
    let msg = err.to_string();
    assert!(msg.contains("containerd is not answering on") && msg.contains("nope.sock"), "{msg}");
}

#[test]
fn neither_erofs_nor_squashfs_is_refused_and_nothing_is_mounted() {
    if !support::require_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.img");
    std::fs::write(&junk, fixtures::noise(5, 1 << 20)).unwrap();
    let before = mountinfo();
    let loops_before = std::fs::read_dir("/sys/block")
        .unwrap()
        .filter(|e| {
            let p = e.as_ref().unwrap().path().join("loop/backing_file");
            std::fs::read_to_string(p).map(|s| s.contains("junk.img")).unwrap_or(false)
        })
        .count();
    let mut o = LoadOptions::new(Source::Image(junk.clone()));
    o.address = dir.path().join("unused.sock");
    o.timeout = Duration::from_millis(10);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let err = rt.block_on(load::load(&o)).expect_err("must fail");
    let msg = err.to_string();
    assert!(msg.contains("neither an erofs nor a squashfs") && msg.contains("junk.img"), "{msg}");
    assert_eq!(mountinfo(), before);
    assert_eq!(loops_before, 0);
    let attached = std::fs::read_dir("/sys/block").unwrap().any(|e| {
        let p = e.unwrap().path().join("loop/backing_file");
        std::fs::read_to_string(p).map(|s| s.contains("junk.img")).unwrap_or(false)
    });
    assert!(!attached, "a loop device was left attached to the junk file");
}

#[test]
fn newer_partition_without_an_image_unpins_it() {
    let Some(mut c) = prerequisites("erofs") else { return };
    let w = world();
    let a = Entry::new("k8s.io", "a", "preseed.local/a:1", fixtures::single(&w.cache, "hello", 20, 0, 0));
    let b = Entry::new("k8s.io", "b", "preseed.local/b:1", fixtures::single(&w.cache, "pause", 21, 0, 0));
    let p1 = make_partition(&w, &[a.clone(), b.clone()], "erofs", "v1");
    let p2 = make_partition(&w, std::slice::from_ref(&a), "erofs", "v2");
    // Same source path, newer contents: what a node sees after an update.
    let installed = w.root.join("installed.erofs");
    std::fs::copy(&p1, &installed).unwrap();
    let o = load_options(Source::Image(installed.clone()), c.socket());
    assert!(!run_load(&o).failed());
    assert!(labels_of(&c, "k8s.io", "preseed.local/b:1").contains("io.cri-containerd.pinned=pinned"));
    // Someone else's pinned image is left alone.
    c.ctr_ok(&["-n", "k8s.io", "images", "tag", "preseed.local/b:1", "other.local/b:1"]);
    // (`tag` copies labels: drop our source label from the copy.)
    c.ctr_ok(&[
        "-n",
        "k8s.io",
        "images",
        "label",
        "other.local/b:1",
        "io.cri-containerd.pinned=pinned",
        "dev.preseed.source=",
    ]);

    std::fs::copy(&p2, &installed).unwrap();
    let pid = c.pid();
    let r = run_load(&o);
    assert!(!r.failed(), "{}", r.to_json());
    assert!(r.warnings.is_empty() && r.errors.is_empty(), "{}", r.to_json());
    assert_eq!(c.pid(), pid);
    c.assert_running();
    c.assert_no_panic();
    assert_eq!(r.unpinned.len(), 1, "{}", r.to_json());
    assert_eq!(r.unpinned[0].name, "preseed.local/b:1");
    let b_labels = labels_of(&c, "k8s.io", "preseed.local/b:1");
    assert!(!b_labels.contains("io.cri-containerd.pinned"), "{b_labels}");
    assert!(labels_of(&c, "k8s.io", "preseed.local/a:1").contains("io.cri-containerd.pinned=pinned"));
    assert!(labels_of(&c, "k8s.io", "other.local/b:1").contains("io.cri-containerd.pinned=pinned"));
    // The unpinned image itself stays: only kubelet's GC may now remove it.
    assert!(names(&c, "k8s.io").contains(&"preseed.local/b:1".to_string()));
}

#[test]
fn monogon_and_k3s_directories_import_with_the_right_names() {
    let Some(c) = prerequisites("squashfs") else { return };
    let w = world();
    // Monogon: <ns>/<name>.tar, plus strays that are warned about.
    let monogon = w.root.join("monogon");
    let m1 = Entry::new("default", "x", "docker.io/library/mono-x:1", fixtures::single(&w.cache, "hello", 30, 0, 0));
    let m2 = Entry::new("k8s.io", "y", "registry.local/mono-y:2", fixtures::multi(&w.cache, 31));
    fixtures::write_tarball(&w.cache, &m1, &monogon.join("default/x.tar"));
    fixtures::write_tarball(&w.cache, &m2, &monogon.join("k8s.io/y.tar"));
    std::fs::write(monogon.join("k8s.io/README"), "stray").unwrap();
    std::fs::create_dir_all(monogon.join("k8s.io/sub")).unwrap();
    let r = run_load(&load_options(Source::Dir(monogon), c.socket()));
    assert!(!r.failed(), "{}", r.to_json());
    assert_eq!(r.warnings.len(), 2, "{:?}", r.warnings);
    assert_eq!(names(&c, "default"), ["docker.io/library/mono-x:1"]);
    assert_eq!(names(&c, "k8s.io"), ["registry.local/mono-y:2"]);

    // k3s: flat dir, all into k8s.io; plain, gzip, zstd and docker save.
    let k3s = w.root.join("k3s");
    std::fs::create_dir_all(&k3s).unwrap();
    let plain =
        Entry::new("k8s.io", "p", "docker.io/library/k3s-plain:1", fixtures::single(&w.cache, "hello", 40, 0, 0));
    let gz =
        Entry::new("k8s.io", "g", "docker.io/rancher/k3s-gz:1", fixtures::single(&w.cache, "hello", 41, 1, 100_000));
    let zst = Entry::new("k8s.io", "z", "quay.io/k3s/zst:1", fixtures::multi(&w.cache, 42));
    fixtures::write_tarball(&w.cache, &plain, &k3s.join("plain.tar"));
    let tmp = w.root.join("t.tar");
    fixtures::write_tarball(&w.cache, &gz, &tmp);
    std::fs::write(k3s.join("gz.tar.gz"), fixtures::gzip(&std::fs::read(&tmp).unwrap())).unwrap();
    fixtures::write_tarball(&w.cache, &zst, &tmp);
    std::fs::write(k3s.join("z.tar.zst"), zstd::encode_all(&std::fs::read(&tmp).unwrap()[..], 3).unwrap()).unwrap();
    let legacy = fixtures::single(&w.cache, "hello", 43, 1, 50_000);
    fixtures::docker_save(&legacy, &["legacy:1", "example.com/team/legacy:1"], &k3s.join("legacy.tar"));
    std::fs::write(k3s.join("images.txt"), "not an archive").unwrap();
    let r = run_load(&load_options(Source::Dir(k3s), c.socket()));
    assert!(!r.failed(), "{}", r.to_json());
    assert_eq!(r.warnings.len(), 1, "{:?}", r.warnings);
    assert_eq!(
        names(&c, "k8s.io"),
        [
            "docker.io/library/k3s-plain:1",
            "docker.io/library/legacy:1",
            "docker.io/rancher/k3s-gz:1",
            "example.com/team/legacy:1",
            "quay.io/k3s/zst:1",
            "registry.local/mono-y:2",
        ]
    );
    for n in ["docker.io/library/legacy:1", "quay.io/k3s/zst:1", "docker.io/rancher/k3s-gz:1"] {
        let check = c.ctr_ok(&["-n", "k8s.io", "images", "check", &format!("name=={n}")]);
        assert!(check.contains("complete"), "{check}");
    }
    // The docker-save image (synthesized manifest) runs.
    let out = c.ctr_ok(&["-n", "k8s.io", "run", "--rm", "docker.io/library/legacy:1", "legacy"]);
    assert!(out.contains(fixtures::HELLO_LINE), "{out}");
}

#[test]
fn unpack_puts_layers_in_the_snapshotter() {
    let Some(c) = prerequisites("squashfs") else { return };
    let w = world();
    let e = Entry::new("k8s.io", "u", "preseed.local/unpacked:1", fixtures::multi(&w.cache, 50));
    let tree = w.root.join("tree");
    fixtures::bundle_tree(&w.cache, std::slice::from_ref(&e), &tree);
    let mut o = load_options(Source::Dir(tree), c.socket());
    o.unpack = true;
    let r = run_load(&o);
    assert!(!r.failed(), "{}", r.to_json());
    assert!(r.images[0].unpacked);
    let diff_ids: Vec<String> = e.image.layer_tars.iter().map(|t| preseed::digest::Digest::of(t).to_string()).collect();
    let snaps = c.ctr_ok(&["-n", "k8s.io", "snapshots", "--snapshotter", "overlayfs", "ls"]);
    assert!(snaps.contains(&diff_ids[0]), "{snaps}");
    assert_eq!(snaps.lines().filter(|l| l.contains("Committed")).count(), diff_ids.len(), "{snaps}");
    let content = c.ctr_ok(&["-n", "k8s.io", "content", "ls"]);
    assert!(content.contains("containerd.io/gc.ref.snapshot.overlayfs="), "{content}");
    assert!(content.contains(&format!("containerd.io/uncompressed={}", diff_ids[0])), "{content}");
    // Snapshots survive GC (held by the config's label) and a second load
    // has nothing to do.
    let r2 = run_load(&o);
    assert_eq!(r2.images[0].outcome, Outcome::AlreadyPresent, "{}", r2.to_json());
    let snaps2 = c.ctr_ok(&["-n", "k8s.io", "snapshots", "--snapshotter", "overlayfs", "ls"]);
    assert_eq!(snaps, snaps2);
    let out = c.ctr_ok(&["-n", "k8s.io", "run", "--rm", "preseed.local/unpacked:1", "unpacked"]);
    assert!(out.contains(fixtures::HELLO_LINE), "{out}");
}

/// `--unpack=boot`: the boot images (the sandbox among them) are unpacked
/// before READY, the others left to containerd; `--unpack` alone is every
/// image.
#[test]
fn unpack_boot_unpacks_only_the_boot_images() {
    let Some(c) = prerequisites("squashfs") else { return };
    let w = world();
    let mut sandbox =
        Entry::new("k8s.io", "pause", "preseed.local/pause:1", fixtures::single(&w.cache, "pause", 61, 0, 0));
    sandbox.sandbox = true;
    let mut boot =
        Entry::new("k8s.io", "hello", "preseed.local/hello:1", fixtures::single(&w.cache, "hello", 62, 1, 4096));
    boot.boot = true;
    let later =
        Entry::new("k8s.io", "later", "preseed.local/later:1", fixtures::single(&w.cache, "hello", 63, 1, 4096));
    let tree = w.root.join("tree");
    fixtures::bundle_tree(&w.cache, &[sandbox, boot, later], &tree);
    let mut o = load_options(Source::Dir(tree), c.socket());
    o.unpack_boot = true;
    let r = run_load(&o);
    assert!(!r.failed(), "{}", r.to_json());
    let unpacked = |name: &str| r.images.iter().find(|i| i.names.iter().any(|n| n == name)).unwrap().unpacked;
    assert!(unpacked("preseed.local/pause:1") && unpacked("preseed.local/hello:1"), "{}", r.to_json());
    assert!(!unpacked("preseed.local/later:1"), "{}", r.to_json());
    let out = c.ctr_ok(&["-n", "k8s.io", "run", "--rm", "preseed.local/hello:1", "unpack-boot"]);
    assert!(out.contains(fixtures::HELLO_LINE), "{out}");
}

/// What kubelet sees, on each containerd version: CRI lists the loaded
/// images as pinned (and containerd's CRI has marked them managed), a pod
/// sandbox and a container start offline from them, and an image that
/// leaves the partition is no longer pinned in CRI either.
#[test]
fn cri_sees_pinned_images_and_runs_a_pod_offline() {
    if support::require_tool("gcc").is_none() || fixtures::static_binary().is_none() {
        return;
    }
    let sandbox = "preseed.local/pause:1";
    let app = "preseed.local/app:1";
    let opts_c = support::containerd::ContainerdOptions { sandbox_image: sandbox.into(), ..Default::default() };
    let Some(mut c) = Containerd::start_with(opts_c) else { return };
    let w = world();
    let mut pause = Entry::new("k8s.io", "pause", sandbox, fixtures::single(&w.cache, "pause", 60, 0, 0));
    pause.sandbox = true;
    let hello = Entry::new("k8s.io", "app", app, fixtures::single(&w.cache, "hello", 61, 0, 0));
    let tree = w.root.join("tree");
    fixtures::bundle_tree(&w.cache, &[pause.clone(), hello], &tree);
    let o = load_options(Source::Dir(tree.clone()), c.socket());
    let report = run_load(&o);
    assert!(!report.failed(), "{}", report.to_json());
    let version = c.version().clone();
    assert!(
        report.containerd_version.starts_with(&format!("{}.{}.", version.major, version.minor)),
        "report says containerd {:?}, the harness runs {version}",
        report.containerd_version
    );

    // containerd 1.6's CRI predates pinned images (1.7 added them): it
    // reports nothing as pinned, whatever the label says, and kubelet's GC
    // may remove preseeded images there.
    let pins = version.major > 1 || version.minor >= 7;
    for name in [sandbox, app] {
        support::cri::wait_for_image(c.socket(), name, pins);
        // containerd's CRI adds this label itself on the image event; the
        // loader must not (and need not) set it.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !labels_of(&c, "k8s.io", name).contains("io.cri-containerd.image=managed") {
            assert!(std::time::Instant::now() < deadline, "{name}: {}", labels_of(&c, "k8s.io", name));
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    support::cri::run_host_network_pod_sandbox(c.socket(), || c.log());
    let (code, log) = support::cri::run_pod_with_container(c.socket(), app, &["/hello"], || c.log());
    assert_eq!(code, 0, "{log}");
    assert!(log.contains(fixtures::HELLO_LINE), "container log: {log:?}");

    // The app leaves the partition: CRI no longer reports it pinned.
    std::fs::remove_file(tree.join("k8s.io/app.tar")).unwrap();
    let mut index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tree.join("preseed.json")).unwrap()).unwrap();
    index["images"].as_array_mut().unwrap().retain(|i| i["file"] != "app");
    std::fs::write(tree.join("preseed.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    let pid = c.pid();
    let r = run_load(&o);
    assert!(!r.failed() && r.warnings.is_empty(), "{}", r.to_json());
    assert_eq!(r.unpinned.len(), 1, "{}", r.to_json());
    support::cri::wait_for_image(c.socket(), app, false);
    support::cri::wait_for_image(c.socket(), sandbox, pins);
    assert!(!labels_of(&c, "k8s.io", app).contains("io.cri-containerd.pinned"));
    assert_eq!(c.pid(), pid);
    c.assert_running();
    c.assert_no_panic();
}

#[test]
fn device_source_mounts_the_block_device() {
    use preseed::node::sys::{Linux, Sys};
    let Some(c) = prerequisites("erofs") else { return };
    let w = world();
    let e = Entry::new("k8s.io", "dev", "preseed.local/dev:1", fixtures::single(&w.cache, "hello", 70, 0, 0));
    let img = make_partition(&w, std::slice::from_ref(&e), "erofs", "dev");
    // A loop device stands in for the node's partition; the handle keeps it
    // attached (it detaches itself when the handle and mounts are gone).
    let dev = Linux.attach_loop(&img).unwrap();
    let before = mountinfo();
    let r = run_load(&load_options(Source::Device(dev.device.clone()), c.socket()));
    assert!(!r.failed(), "{}", r.to_json());
    assert_eq!(r.source, dev.device.display().to_string());
    assert_eq!(names(&c, "k8s.io"), ["preseed.local/dev:1"]);
    assert_nothing_mounted_from(&before);
}

#[test]
fn content_writes_are_verified_and_not_repeated() {
    use preseed::node::load::containerd::{BlobBytes, Client, WriteError, Wrote};
    use preseed::oci::{Descriptor, OCI_LAYER_GZIP};
    use std::collections::BTreeMap;
    use std::sync::Arc;
    let Some(c) = Containerd::start() else { return };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let client = Client::connect(c.socket(), Duration::from_secs(5)).await.unwrap();
        client.lease_create("t", "l", Duration::from_secs(600), &BTreeMap::new()).await.unwrap();
        let data: Arc<[u8]> = fixtures::noise(90, 3 << 20).into();
        let d = Descriptor::new(OCI_LAYER_GZIP, preseed::digest::Digest::of(&data), data.len() as u64);
        let write_in = |ns: &'static str, r: &str, d: Descriptor, b: Arc<[u8]>| {
            let client = client.clone();
            let r = r.to_string();
            let labels = BTreeMap::from([("x".to_string(), ns.to_string())]);
            async move { client.write_blob(ns, "l", r, &d, Some(BlobBytes::Memory(b)), &labels).await }
        };
        let write = |r: &str, d: Descriptor, b: Arc<[u8]>| write_in("t", r, d, b);
        assert_eq!(write("a", d.clone(), data.clone()).await.unwrap(), Wrote::Streamed, "first write writes");
        assert_eq!(write("b", d.clone(), data.clone()).await.unwrap(), Wrote::Present, "second write finds it");
        // Another namespace: the file is in the local store (as after
        // `preseed place`), so only the commit is sent; labels still land.
        client.lease_create("t2", "l", Duration::from_secs(600), &BTreeMap::new()).await.unwrap();
        let nothing: Arc<[u8]> = Vec::new().into();
        assert_eq!(write_in("t2", "a", d.clone(), nothing).await.unwrap(), Wrote::Adopted, "adopted, no bytes read");
        let labels = client.content_labels("t2", &d.digest).await.unwrap().expect("registered in t2");
        assert_eq!(labels.get("x").map(String::as_str), Some("t2"));
        // Register-only, of a blob whose file the store lacks: nothing
        // written, no record, no ingest left behind.
        let d4 = Descriptor::new(OCI_LAYER_GZIP, preseed::digest::Digest::of(b"not in the store"), 16);
        let r = client.write_blob("t2", "l", "e".into(), &d4, None, &BTreeMap::new()).await.unwrap();
        assert_eq!(r, Wrote::NotPlaced);
        assert!(client.content_labels("t2", &d4.digest).await.unwrap().is_none());
        assert!(client.ingests("t2").await.unwrap().is_empty(), "the register-only session left its ingest");
        // Same size, wrong bytes: containerd refuses the commit.
        let mut wrong = data.to_vec();
        wrong[12345] ^= 1;
        let d2 = Descriptor::new(OCI_LAYER_GZIP, preseed::digest::Digest::of(&[1, 2, 3]), wrong.len() as u64);
        let err = write("c", d2, wrong.into()).await.unwrap_err();
        assert!(matches!(&err, WriteError::Grpc(_)) && err.to_string().contains("unexpected commit digest"), "{err}");
        // Empty blob.
        let empty: Arc<[u8]> = Vec::new().into();
        let d3 = Descriptor::new(OCI_LAYER_GZIP, preseed::digest::Digest::of(&[]), 0);
        assert_eq!(write("d", d3, empty).await.unwrap(), Wrote::Streamed);
        client.lease_delete("t", "l", true).await.unwrap();
        client.lease_delete("t2", "l", true).await.unwrap();
    });
    assert!(!c.ctr_ok(&["-n", "t", "content", "ls", "-q"]).contains("sha256"), "lease gone, GC removed all");
}

#[test]
fn unreadable_compat_tarball_unpins_nothing() {
    let Some(mut c) = prerequisites("squashfs") else { return };
    let w = world();
    let dir = w.root.join("k3s");
    let a = Entry::new("k8s.io", "a", "docker.io/library/a:1", fixtures::single(&w.cache, "hello", 95, 0, 0));
    let b = Entry::new("k8s.io", "b", "docker.io/library/b:1", fixtures::single(&w.cache, "pause", 96, 0, 0));
    fixtures::write_tarball(&w.cache, &a, &dir.join("a.tar"));
    fixtures::write_tarball(&w.cache, &b, &dir.join("b.tar"));
    let o = load_options(Source::Dir(dir.clone()), c.socket());
    assert!(!run_load(&o).failed());
    // b.tar is damaged: its names are unknown, so no pin may be removed.
    std::fs::write(dir.join("b.tar"), fixtures::noise(97, 10_000)).unwrap();
    let r = run_load(&o);
    assert!(r.failed());
    assert!(r.unpinned.is_empty());
    assert!(r.warnings.iter().any(|w| w.contains("not unpinning")), "{:?}", r.warnings);
    assert!(labels_of(&c, "k8s.io", "docker.io/library/b:1").contains("io.cri-containerd.pinned=pinned"));
    // Gone for good: now it is unpinned.
    std::fs::remove_file(dir.join("b.tar")).unwrap();
    let r = run_load(&o);
    assert!(!r.failed() && r.warnings.is_empty(), "{}", r.to_json());
    assert_eq!(r.unpinned.len(), 1);
    c.assert_running();
    c.assert_no_panic();
    assert!(!labels_of(&c, "k8s.io", "docker.io/library/b:1").contains("io.cri-containerd.pinned"));
}

/// What a load said when containerd went away under it, judged: it must say
/// so (an image failed, or an error or warning names the lost connection),
/// and an image it calls imported must really be in. Returns the report.
fn judge_lost_connection(out: std::process::Output, c: &Containerd, step: &str) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    const LOST: &str = "lost the connection to containerd";
    let Ok(report) = serde_json::from_str::<serde_json::Value>(&stdout) else {
        // Gone before the first answer: no report, a clear error instead.
        assert!(!out.status.success(), "{step}: exit 0 without a report:\n{stderr}");
        assert!(stderr.contains("containerd"), "{step}: {stderr}");
        return serde_json::Value::Null;
    };
    let said = |key: &str| report[key].as_array().is_some_and(|v| v.iter().any(|e| e.as_str().unwrap().contains(LOST)));
    let image_lost = report["images"]
        .as_array()
        .unwrap()
        .iter()
        .any(|i| i["outcome"] == "failed" && i["error"].as_str().is_some_and(|e| e.contains(LOST)));
    if out.status.success() {
        // Only the last cleanup (the lease) may go missing: every image is in.
        assert!(said("warnings"), "{step}: exit 0, and nothing says containerd went away: {report}");
        assert!(report["images"].as_array().unwrap().iter().all(|i| i["outcome"] != "failed"), "{step}: {report}");
    } else {
        assert!(image_lost || said("errors"), "{step}: failed without naming the lost connection: {report}");
    }
    eprintln!(
        "{step}: exit {:?}, images {}, errors {}, warnings {}",
        out.status.code(),
        report["images"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["outcome"].as_str().unwrap())
            .collect::<Vec<_>>()
            .join(","),
        report["errors"],
        report["warnings"]
    );
    for m in report["errors"].as_array().unwrap().iter().chain(report["warnings"].as_array().unwrap()) {
        assert!(!m.as_str().unwrap().ends_with("operation was canceled"), "{step}: unclear: {m}");
    }
    // What the report calls imported survived containerd's crash.
    for i in report["images"].as_array().unwrap().iter().filter(|i| i["outcome"] == "imported") {
        let name = i["names"][0].as_str().unwrap();
        let check = c.ctr_ok(&["-n", "k8s.io", "images", "check", &format!("name=={name}")]);
        assert!(check.contains("complete"), "{step}: {name} reported imported: {check}");
    }
    report
}

/// Cuts containerd away mid-layer, at a point the test controls (a gate
/// holds the loader's bytes halfway through the layers, then containerd is
/// killed): the load fails naming the lost connection; the next run
/// completes and removes the dead run's lease.
#[test]
fn containerd_going_away_mid_load_fails_it_clearly_and_the_next_run_completes() {
    let Some(mut c) = prerequisites("erofs") else { return };
    let w = world();
    let (_, tree) = layered_tree(&w, "preseed.local/big:1");
    let mut gate = Gate::start(&w.root, c.socket(), Hold::AfterDataBytes(6 << 20));
    let mut child = spawn_load(&tree, gate.path());
    assert!(gate.wait_held(&mut child), "the load ended before writing 6 MiB");
    c.kill();
    gate.cut();
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "the load must fail when containerd goes away mid-layer");
    let report = judge_lost_connection(out, &c, "mid-layer");
    let error = report["images"][0]["error"].as_str().unwrap_or_default();
    assert!(error.contains("lost the connection to containerd"), "{report}");
    assert!(report["errors"].as_array().is_some_and(|e| !e.is_empty()), "unpinning could not run: {report}");

    c.restart();
    let r = run_load(&load_options(Source::Dir(tree), c.socket()));
    assert!(!r.failed(), "{}", r.to_json());
    assert_eq!(r.images[0].outcome, Outcome::Imported);
    // The dead run's lease (its loader exited) is gone too.
    assert_eq!(r.stale_leases.len(), 1, "{}", r.to_json());
    assert_eq!(c.ctr_ok(&["-n", "k8s.io", "leases", "ls", "-q"]).trim(), "");
    let check = c.ctr_ok(&["-n", "k8s.io", "images", "check", "name==preseed.local/big:1"]);
    assert!(check.contains("complete"), "{check}");
}

/// The same at every gRPC call of a load, one after the other: containerd
/// is killed just before the loader's `n`th call reaches it. Whatever step
/// that is (version, lease, probe, write, commit, image record, pin,
/// unpin, lease cleanup), the load says so and the next run completes.
#[test]
fn containerd_going_away_at_any_call_is_reported_and_the_next_run_completes() {
    let Some(c) = prerequisites("erofs") else { return };
    let w = world();
    let mut pause =
        Entry::new("k8s.io", "pause", "preseed.local/pause:1", fixtures::single(&w.cache, "pause", 81, 1, 1 << 16));
    pause.names = vec!["registry.local/pause:1".into()];
    let tree = w.root.join("tree");
    fixtures::bundle_tree(&w.cache, std::slice::from_ref(&pause), &tree);
    // Count the calls of a whole load.
    let calls = {
        let gate = Gate::start(&w.root, c.socket(), Hold::Never);
        let out = spawn_load(&tree, gate.path()).wait_with_output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
        gate.calls()
    };
    drop(c);
    assert!(calls >= 8, "a load of one image made only {calls} calls");
    eprintln!("a load of one image: {calls} gRPC calls");
    for n in 1..=calls {
        let step = format!("containerd killed before call {n} of {calls}");
        let mut c = Containerd::start().unwrap();
        let mut gate = Gate::start(&w.root, c.socket(), Hold::BeforeCall(n));
        let mut child = spawn_load(&tree, gate.path());
        assert!(gate.wait_held(&mut child), "{step}: the load made fewer calls this time");
        c.kill();
        gate.cut();
        let out = child.wait_with_output().unwrap();
        c.restart();
        judge_lost_connection(out, &c, &step);
        let r = run_load(&load_options(Source::Dir(tree.clone()), c.socket()));
        assert!(!r.failed() && r.warnings.is_empty(), "{step}: the next run: {}", r.to_json());
        assert_eq!(c.ctr_ok(&["-n", "k8s.io", "leases", "ls", "-q"]).trim(), "", "{step}: a lease is left");
        for name in &["preseed.local/pause:1", "registry.local/pause:1"] {
            assert!(labels_of(&c, "k8s.io", name).contains("io.cri-containerd.pinned=pinned"), "{step}: {name}");
        }
        c.assert_no_panic();
    }
}

/// The loader killed while its lease holds half-written content (held by
/// the gate mid-layer, so it cannot have finished): the next load removes
/// that lease and completes the import.
#[test]
fn a_killed_loaders_lease_is_removed_by_the_next_load() {
    let Some(c) = prerequisites("erofs") else { return };
    let w = world();
    let (e, tree) = layered_tree(&w, "preseed.local/killed:1");
    let mut gate = Gate::start(&w.root, c.socket(), Hold::AfterDataBytes(6 << 20));
    let mut child = spawn_load(&tree, gate.path());
    assert!(gate.wait_held(&mut child), "the load ended before writing 6 MiB");
    child.kill().unwrap();
    child.wait().unwrap();
    gate.cut();
    let (id, labels) = the_lease(&c, "k8s.io");
    // The lease outlives its loader (it would hold content for an hour)…
    assert!(labels.contains_key(preseed::node::load::lease::LABEL_OWNER), "{labels:?}");
    assert!(labels.contains_key("containerd.io/gc.expire"), "{labels:?}");

    // …until the next load, which removes it and completes the import.
    let r = run_load(&load_options(Source::Dir(tree), c.socket()));
    assert!(!r.failed(), "{}", r.to_json());
    assert_eq!(r.stale_leases, [preseed::node::load::StaleLease { namespace: "k8s.io".into(), id: id.clone() }]);
    assert_eq!(c.ctr_ok(&["-n", "k8s.io", "leases", "ls", "-q"]).trim(), "");
    let content = c.ctr_ok(&["-n", "k8s.io", "content", "ls", "-q"]);
    for d in &e.image.blobs {
        assert!(content.contains(&d.digest.to_string()), "{} missing", d.digest);
    }
    let active = c.ctr_ok(&["-n", "k8s.io", "content", "active"]);
    assert!(!active.contains(&id), "the killed loader's ingests are left:\n{active}");
}

#[test]
fn a_missing_device_is_named_and_its_cause_said_once() {
    let out = cli::preseed(&["load", "--device", "/dev/preseed-test-no-such-device", "--timeout", "1"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/dev/preseed-test-no-such-device"), "{stderr}");
    assert_eq!(stderr.matches("No such file or directory").count(), 1, "{stderr}");
}
