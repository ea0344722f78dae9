//! `preseed place` into a real containerd's root while it is stopped, then
//! `preseed load` registering the placed blobs without their bytes; GC,
//! `ctr run`, CRI, a damaged partition, a running containerd and the
//! `isolated` policy.
#![cfg(feature = "containerd")]

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use preseed::digest::Digest;
use preseed::node::load::{LoadOptions, LoadReport, Outcome, Source};
use preseed::node::place::{self, PlaceError, PlaceOptions, PlaceReport};
use support::containerd::{Containerd, ContainerdOptions};
use support::fixtures::{self, Entry};

/// Place with the root learnt from the test containerd's own config file.
fn place_into(tree: &Path, c: &Containerd) -> Result<PlaceReport, PlaceError> {
    let mut o = PlaceOptions::new(Source::Dir(tree.to_path_buf()));
    o.config = c.dir().join("config.toml");
    let r = place::place(&o);
    if let Ok(r) = &r {
        let mut out = Vec::new();
        r.print_human(&mut out).unwrap();
        eprintln!("{}", String::from_utf8_lossy(&out));
    }
    r
}

fn load_from(tree: &Path, c: &Containerd) -> LoadReport {
    fixtures::run_load(&fixtures::load_options(Source::Dir(tree.to_path_buf()), c.socket()))
}

fn blobs_dir(c: &Containerd) -> PathBuf {
    c.root().join(place::CONTENT_DIR).join("blobs/sha256")
}

/// Digests of every `blobs/sha256/*` in the tree's tarballs.
fn blobs_of(tarball: &Path) -> Vec<Digest> {
    let archive = preseed::node::read::archive::Archive::open(tarball).unwrap();
    archive
        .entries()
        .filter_map(|(n, _)| n.strip_prefix("blobs/sha256/").map(|h| format!("sha256:{h}").parse().unwrap()))
        .collect()
}

#[test]
fn placed_blobs_are_registered_without_their_bytes_and_gc_keeps_only_what_images_use() {
    let Some(w) = fixtures::runnable_world() else { return };
    let Some(mut c) = Containerd::start() else { return };
    // Not k8s.io: CRI would add records of its own holding b's content.
    let a = Entry::new("apps", "a", "preseed.local/a:1", fixtures::single(&w.cache, "hello", 301, 2, 3 << 20));
    let b = Entry::new("apps", "b", "preseed.local/b:1", fixtures::single(&w.cache, "hello", 302, 1, 1 << 20));
    let tree = w.root.join("tree");
    fixtures::bundle_tree(&w.cache, &[a, b], &tree);
    let (blobs_a, blobs_b) = (blobs_of(&tree.join("apps/a.tar")), blobs_of(&tree.join("apps/b.tar")));

    // Refused while containerd runs on that root.
    let err = place_into(&tree, &c).unwrap_err();
    assert!(matches!(err, PlaceError::Running { .. }), "{err}");
    assert!(err.to_string().contains("before containerd starts"), "{err}");

    c.stop();
    // A blob placed once that no image will reference (as a failed image leaves).
    let stray = b"placed, never registered";
    std::fs::create_dir_all(blobs_dir(&c)).unwrap();
    let stray_path = blobs_dir(&c).join(Digest::of(stray).hex());
    std::fs::write(&stray_path, stray).unwrap();

    let r = place_into(&tree, &c).unwrap();
    assert_eq!(r.root, c.root().display().to_string(), "root learnt from the config");
    let unique: std::collections::BTreeSet<_> = blobs_a.iter().chain(&blobs_b).collect();
    assert_eq!((r.placed, r.present, r.damaged.len()), (unique.len(), 0, 0), "{r:?}");
    for d in &unique {
        let meta = std::fs::metadata(blobs_dir(&c).join(d.hex())).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o444, "read-only, as containerd leaves its blobs");
    }
    assert!(!c.root().join(place::CONTENT_DIR).join("preseed-place.tmp").exists(), "temp dir removed");
    let again = place_into(&tree, &c).unwrap();
    assert_eq!((again.placed, again.present), (0, unique.len()), "a second place copies nothing");

    c.restart();
    let report = load_from(&tree, &c);
    assert!(!report.failed(), "{}", report.to_json());
    assert!(report.images.iter().all(|i| i.outcome == Outcome::Imported), "{}", report.to_json());
    assert_eq!(report.bytes_written, 0, "every blob was placed: nothing streamed");
    assert!(report.bytes_placed > 4 << 20, "{}", report.to_json());
    let check = c.ctr_ok(&["-n", "apps", "images", "check"]);
    assert_eq!(check.matches(" complete ").count(), 2, "{check}");
    let out = c.ctr_ok(&["-n", "apps", "run", "--rm", "preseed.local/a:1", "placed-a"]);
    assert!(out.contains(fixtures::HELLO_LINE), "{out}");

    // Remove b: the collection that drops b's content also sweeps the local
    // store, keeping a's placed blobs and removing b's and the stray.
    c.ctr_ok(&["-n", "apps", "images", "rm", "--sync", "preseed.local/b:1"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while stray_path.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    for d in &blobs_a {
        assert!(blobs_dir(&c).join(d.hex()).exists(), "{d} of a kept");
    }
    for d in blobs_b.iter().filter(|d| !blobs_a.contains(d)) {
        assert!(!blobs_dir(&c).join(d.hex()).exists(), "{d} of b only: removed");
    }
    assert!(!stray_path.exists(), "a placed blob nothing references is removed");
    assert!(c.ctr_ok(&["-n", "apps", "images", "check"]).contains(" complete "));
    c.assert_no_panic();
}

#[test]
fn a_cri_container_starts_from_placed_content_unpacked_by_load() {
    let Some(w) = fixtures::runnable_world() else { return };
    let sandbox = "preseed.local/pause:1";
    let app = "preseed.local/app:1";
    let opts_c = ContainerdOptions { sandbox_image: sandbox.into(), ..Default::default() };
    let Some(mut c) = Containerd::start_with(opts_c) else { return };
    let mut pause = Entry::new("k8s.io", "pause", sandbox, fixtures::single(&w.cache, "pause", 310, 0, 0));
    pause.sandbox = true;
    let hello = Entry::new("k8s.io", "app", app, fixtures::single(&w.cache, "hello", 311, 1, 2 << 20));
    let tree = w.root.join("tree");
    fixtures::bundle_tree(&w.cache, &[pause, hello], &tree);
    c.stop();
    let r = place_into(&tree, &c).unwrap();
    assert!(r.placed > 0 && r.damaged.is_empty(), "{r:?}");
    c.restart();
    let mut o = LoadOptions::new(Source::Dir(tree.clone()));
    o.address = c.socket().to_path_buf();
    o.unpack = true;
    let report = fixtures::run_load(&o);
    assert!(!report.failed(), "{}", report.to_json());
    assert!(report.images.iter().all(|i| i.unpacked), "{}", report.to_json());
    assert_eq!(report.bytes_written, 0, "{}", report.to_json());
    support::cri::wait_for_image(c.socket(), app, c.version().major > 1 || c.version().minor >= 7);
    support::cri::run_host_network_pod_sandbox(c.socket(), || c.log());
    let (code, log) = support::cri::run_pod_with_container(c.socket(), app, &["/hello"], || c.log());
    assert_eq!(code, 0, "{log}");
    assert!(log.contains(fixtures::HELLO_LINE), "container log: {log:?}");
    c.assert_no_panic();
}

#[test]
fn a_damaged_blob_is_never_placed_and_its_image_fails_alone() {
    let Some(w) = fixtures::runnable_world() else { return };
    let Some(mut c) = Containerd::start() else { return };
    let good =
        Entry::new("k8s.io", "good", "preseed.local/good:1", fixtures::single(&w.cache, "hello", 320, 1, 1 << 20));
    let bad = Entry::new("k8s.io", "bad", "preseed.local/bad:1", fixtures::single(&w.cache, "hello", 321, 1, 1 << 20));
    let tree = w.root.join("tree");
    fixtures::bundle_tree(&w.cache, &[good, bad], &tree);
    // Flip one byte in the middle of bad's biggest blob.
    let tar = tree.join("k8s.io/bad.tar");
    let archive = preseed::node::read::archive::Archive::open(&tar).unwrap();
    let (name, entry) = archive.entries().filter(|(n, _)| n.starts_with("blobs/")).max_by_key(|(_, e)| e.size).unwrap();
    let victim: Digest = format!("sha256:{}", name.trim_start_matches("blobs/sha256/")).parse().unwrap();
    let mut bytes = std::fs::read(&tar).unwrap();
    bytes[(entry.offset + entry.size / 2) as usize] ^= 0x40;
    std::fs::write(&tar, bytes).unwrap();

    c.stop();
    let r = place_into(&tree, &c).unwrap();
    assert!(r.failed());
    assert_eq!(r.damaged.len(), 1, "{r:?}");
    assert_eq!(r.damaged[0].digest, victim.to_string());
    assert_eq!(r.damaged[0].tarballs, ["k8s.io/bad.tar"]);
    assert!(!blobs_dir(&c).join(victim.hex()).exists(), "never placed");
    let mut out = Vec::new();
    r.print_human(&mut out).unwrap();
    assert!(String::from_utf8_lossy(&out).contains("the partition is corrupt"));

    c.restart();
    let report = load_from(&tree, &c);
    let outcome = |n: &str| report.images.iter().find(|i| i.names[0] == n).unwrap().outcome;
    assert_eq!(outcome("preseed.local/good:1"), Outcome::Imported);
    assert_eq!(outcome("preseed.local/bad:1"), Outcome::Failed, "containerd refuses the damaged bytes");
    let names = c.ctr_ok(&["-n", "k8s.io", "images", "ls", "-q"]);
    assert!(!names.contains("preseed.local/bad:1"), "{names}");
    c.assert_no_panic();
}

#[test]
fn isolated_content_policy_places_nothing_and_load_streams() {
    let Some(w) = fixtures::runnable_world() else { return };
    let Some(c) = Containerd::start() else { return };
    let e = Entry::new("k8s.io", "a", "preseed.local/a:1", fixtures::single(&w.cache, "hello", 330, 0, 0));
    let tree = w.root.join("tree");
    fixtures::bundle_tree(&w.cache, &[e], &tree);
    let config = w.root.join("config.toml");
    let root = w.root.join("ctrd-root");
    std::fs::write(
        &config,
        format!(
            "version = 2\nroot = {:?}\n[plugins.\"io.containerd.metadata.v1.bolt\"]\ncontent_sharing_policy = \
             \"isolated\"\n",
            root.display().to_string()
        ),
    )
    .unwrap();
    let mut o = PlaceOptions::new(Source::Dir(tree.clone()));
    o.config = config;
    let r = place::place(&o).unwrap();
    assert!(r.not_placed.as_deref().unwrap_or("").contains("isolated"), "{r:?}");
    assert!(!root.exists(), "nothing created");
    let report = load_from(&tree, &c);
    assert!(!report.failed() && report.bytes_written > 0, "{}", report.to_json());
}
