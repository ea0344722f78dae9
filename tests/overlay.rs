//! `preseed place --overlay` on a real containerd: the partition (made by
//! preseed's own erofs writer, with its `.content` directory) mounted under
//! containerd's content store, `preseed load` registering every blob with
//! nothing copied, GC deletes as whiteouts, a partition update with and
//! without the previous partition or after `preseed settle`, a damaged
//! blob, and a squashfs partition.
#![cfg(feature = "containerd")]

mod support;

use std::collections::BTreeSet;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use preseed::build::layout::tree::{PlannedFile, Tree};
use preseed::build::write::erofs;
use preseed::digest::Digest;
use preseed::node::load::{LoadReport, Outcome, Source};
use preseed::node::place::settle::{SettleOptions, SettleReport};
use preseed::node::place::{self, overlay, PlaceError, PlaceOptions, PlaceReport};
use preseed::partition::index::INDEX_FILE;
use support::containerd::Containerd;
use support::fixtures::{self, Entry, World};

/// An erofs partition of `entries` as `preseed bundle` lays it out.
fn partition(w: &World, entries: &[Entry], name: &str) -> PathBuf {
    let dir = w.root.join(name);
    fixtures::bundle_tree(&w.cache, entries, &dir);
    let mut tree = Tree::default();
    tree.insert_file(INDEX_FILE, PlannedFile::from_bytes(std::fs::read(dir.join(INDEX_FILE)).unwrap()));
    for e in entries {
        tree.insert_file(&format!("{}/{}.tar", e.namespace, e.file), fixtures::plan(&w.cache, e));
    }
    tree.insert_content_store();
    let image = w.root.join(format!("{name}.erofs"));
    erofs::write(&tree, &image).unwrap();
    image
}

fn options(image: &Path, c: &Containerd) -> PlaceOptions {
    let mut o = PlaceOptions::new(Source::Image(image.to_path_buf()));
    o.config = c.dir().join("config.toml");
    o
}

fn overlay_on(image: &Path, previous: Option<&Path>, c: &Containerd) -> Result<PlaceReport, PlaceError> {
    let previous = previous.map(|p| Source::Image(p.to_path_buf()));
    let r = overlay::overlay(&options(image, c), previous.as_ref());
    if let Ok(r) = &r {
        let mut out = Vec::new();
        r.print_human(&mut out).unwrap();
        eprintln!("{}", String::from_utf8_lossy(&out));
    }
    r
}

fn settle(next: Option<&Path>, c: &Containerd) -> Result<SettleReport, PlaceError> {
    let opts = SettleOptions {
        root: None,
        config: c.dir().join("config.toml"),
        next: next.map(|p| Source::Image(p.to_path_buf())),
    };
    let r = place::settle::settle(&opts);
    if let Ok(r) = &r {
        let mut out = Vec::new();
        r.print_human(&mut out).unwrap();
        eprintln!("{}", String::from_utf8_lossy(&out));
    }
    r
}

fn load_from(image: &Path, c: &Containerd) -> LoadReport {
    fixtures::run_load(&fixtures::load_options(Source::Image(image.to_path_buf()), c.socket()))
}

/// What containerd sees.
fn store(c: &Containerd) -> PathBuf {
    c.root().join(place::CONTENT_DIR).join("blobs/sha256")
}

/// The overlay's writable layer.
fn upper(c: &Containerd) -> PathBuf {
    c.root().join(overlay::STATE_DIR).join("upper/blobs/sha256")
}

fn blobs_of(image: &Path, file: &str) -> BTreeSet<Digest> {
    let opened = preseed::node::read::open::open(&Source::Image(image.to_path_buf())).unwrap();
    let archive = preseed::node::read::archive::Archive::open(&opened.root().join(file)).unwrap();
    archive
        .entries()
        .filter_map(|(n, _)| n.strip_prefix("blobs/sha256/").map(|h| format!("sha256:{h}").parse().unwrap()))
        .collect()
}

/// Waits (up to 30 s) until containerd's GC has removed `blobs` from `dir`.
fn wait_gone(dir: &Path, blobs: &BTreeSet<Digest>) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while blobs.iter().any(|d| dir.join(d.hex()).exists()) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A reboot: containerd stops and every mount under its directory goes.
fn reboot(c: &mut Containerd) {
    c.stop();
    c.unmount_all();
}

#[test]
fn overlaid_blobs_are_registered_with_nothing_copied_and_gc_deletes_them_as_whiteouts() {
    let Some(w) = fixtures::runnable_world() else { return };
    let Some(mut c) = Containerd::start() else { return };
    // Not k8s.io: CRI would add records of its own holding b's content.
    let a = Entry::new("apps", "a", "preseed.local/a:1", fixtures::single(&w.cache, "hello", 401, 2, 3 << 20));
    let b = Entry::new("apps", "b", "preseed.local/b:1", fixtures::single(&w.cache, "hello", 402, 1, 1 << 20));
    let image = partition(&w, &[a, b], "p1");
    let (blobs_a, blobs_b) = (blobs_of(&image, "apps/a.tar"), blobs_of(&image, "apps/b.tar"));
    let unique: BTreeSet<_> = blobs_a.union(&blobs_b).cloned().collect();

    let err = overlay_on(&image, None, &c).unwrap_err();
    assert!(matches!(err, PlaceError::Running { .. }), "{err}");
    c.stop();
    let r = overlay_on(&image, None, &c).unwrap();
    assert_eq!((r.overlaid, r.damaged.len(), r.lost.len()), (unique.len(), 0, 0), "{r:?}");
    assert!(!r.failed());
    let again = overlay_on(&image, None, &c).unwrap();
    assert!(again.warnings.iter().any(|w| w.contains("already overlaid")), "{again:?}");
    assert_eq!(again.warnings.len(), 1, "the same partition: {again:?}");
    let other = w.root.join("other.erofs");
    std::fs::copy(&image, &other).unwrap();
    let elsewhere = overlay_on(&other, None, &c).unwrap();
    assert!(elsewhere.warnings.iter().any(|w| w.contains("the partition changes at the next boot")), "{elsewhere:?}");

    c.restart();
    let report = load_from(&image, &c);
    assert!(!report.failed(), "{}", report.to_json());
    assert!(report.images.iter().all(|i| i.outcome == Outcome::Imported), "{}", report.to_json());
    assert_eq!(report.bytes_written, 0, "every blob was in the store: nothing streamed");
    let check = c.ctr_ok(&["-n", "apps", "images", "check"]);
    assert_eq!(check.matches(" complete ").count(), 2, "{check}");
    let out = c.ctr_ok(&["-n", "apps", "run", "--rm", "preseed.local/a:1", "overlaid-a"]);
    assert!(out.contains(fixtures::HELLO_LINE), "{out}");
    for d in &unique {
        assert!(std::fs::symlink_metadata(upper(&c).join(d.hex())).is_err(), "{d} was copied to the upper layer");
    }

    // GC of b's content: its own blobs vanish from the store, as whiteouts.
    c.ctr_ok(&["-n", "apps", "images", "rm", "--sync", "preseed.local/b:1"]);
    let only_b: BTreeSet<_> = blobs_b.difference(&blobs_a).cloned().collect();
    assert!(!only_b.is_empty());
    wait_gone(&store(&c), &only_b);
    for d in &only_b {
        assert!(!store(&c).join(d.hex()).exists(), "{d} of b only: removed");
        let m = std::fs::symlink_metadata(upper(&c).join(d.hex())).unwrap();
        assert!(m.file_type().is_char_device() && m.len() == 0, "{d}: a whiteout, no bytes on the disk");
    }
    for d in &blobs_a {
        assert!(store(&c).join(d.hex()).exists(), "{d} of a kept");
    }
    assert!(c.ctr_ok(&["-n", "apps", "images", "check"]).contains(" complete "));
    c.assert_no_panic();
}

/// What a first load that was cut short (power lost, containerd restarted)
/// leaves behind: the lease of a loader that is gone, holding the one placed
/// blob it had registered.
fn interrupted_load_holding(c: &Containerd, ns: &str, blob: &Digest, size: u64) {
    use preseed::node::load::containerd::{Client, Wrote};
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let client = Client::connect(c.socket(), Duration::from_secs(5)).await.unwrap();
        let lease = "preseed-load-1-1";
        let owner = "00000000-0000-0000-0000-000000000000/1/1".to_string();
        let labels = [(preseed::node::load::lease::LABEL_OWNER.to_string(), owner)].into();
        client.lease_create(ns, lease, Duration::from_secs(3600), &labels).await.unwrap();
        let desc = preseed::oci::Descriptor::new("application/octet-stream", blob.clone(), size);
        let wrote = client.write_blob(ns, lease, format!("{lease}-0"), &desc, None, &Default::default()).await;
        assert_eq!(wrote.unwrap(), Wrote::Adopted);
    });
}

#[test]
fn a_load_after_an_interrupted_one_streams_nothing() {
    let Some(w) = fixtures::runnable_world() else { return };
    let Some(mut c) = Containerd::start() else { return };
    let a = Entry::new("apps", "a", "preseed.local/a:1", fixtures::single(&w.cache, "hello", 421, 2, 1 << 20));
    let b = Entry::new("apps", "b", "preseed.local/b:1", fixtures::single(&w.cache, "hello", 422, 2, 1 << 20));
    let image = partition(&w, &[a, b], "p1");
    let unique: BTreeSet<_> = blobs_of(&image, "apps/a.tar").union(&blobs_of(&image, "apps/b.tar")).cloned().collect();
    c.stop();
    overlay_on(&image, None, &c).unwrap();
    c.restart();
    let first = unique.iter().next().unwrap();
    interrupted_load_holding(&c, "apps", first, std::fs::metadata(store(&c).join(first.hex())).unwrap().len());

    // Removing that lease lets containerd's GC walk the store, deleting
    // every file no record names: the load must have registered the
    // placed blobs before, or it streams them all again.
    let report = load_from(&image, &c);
    assert!(!report.failed(), "{}", report.to_json());
    assert_eq!(report.stale_leases.len(), 1, "{}", report.to_json());
    assert_eq!(report.bytes_written, 0, "placed blobs were deleted and streamed again: {}", report.to_json());
    assert_eq!(report.images.iter().map(|i| i.blobs_placed).sum::<usize>(), unique.len() - 1, "{}", report.to_json());
    for d in &unique {
        assert!(std::fs::symlink_metadata(upper(&c).join(d.hex())).is_err(), "{d}: copied or whited out");
    }
    let check = c.ctr_ok(&["-n", "apps", "images", "check"]);
    assert_eq!(check.matches(" complete ").count(), 2, "{check}");
    c.assert_no_panic();
}

#[test]
fn an_update_whose_load_runs_a_gc_midway_streams_nothing() {
    let Some(w) = fixtures::runnable_world() else { return };
    let Some(mut c) = Containerd::start() else { return };
    let x_old = Entry::new("apps", "x", "preseed.local/x:1", fixtures::single(&w.cache, "hello", 431, 1, 4096));
    let x_new = Entry::new("apps", "x", "preseed.local/x:1", fixtures::single(&w.cache, "hello", 432, 1, 4096));
    // 100 layers: the load makes over 200 metadata changes after x changes
    // target, and containerd (gc mutation_threshold 100) collects midway,
    // taking x's old blobs and, with them, every store file no record names.
    let many = Entry::new("apps", "many", "preseed.local/many:1", fixtures::single(&w.cache, "hello", 433, 100, 4096));
    let old = partition(&w, &[x_old], "old");
    let new = partition(&w, &[x_new, many], "new");
    c.stop();
    overlay_on(&old, None, &c).unwrap();
    c.restart();
    assert!(!load_from(&old, &c).failed());
    reboot(&mut c);
    overlay_on(&new, Some(&old), &c).unwrap();
    c.restart();
    let report = load_from(&new, &c);
    assert!(!report.failed(), "{}", report.to_json());
    assert_eq!(report.bytes_written, 0, "placed blobs were deleted and streamed again: {}", report.to_json());
    let check = c.ctr_ok(&["-n", "apps", "images", "check"]);
    assert_eq!(check.matches(" complete ").count(), 2, "{check}");
    c.assert_no_panic();
}

#[test]
fn an_update_keeps_the_blobs_only_the_previous_partition_had() {
    let Some(w) = fixtures::runnable_world() else { return };
    let a = Entry::new("apps", "a", "preseed.local/a:1", fixtures::single(&w.cache, "hello", 411, 1, 1 << 20));
    let b = Entry::new("apps", "b", "preseed.local/b:1", fixtures::single(&w.cache, "hello", 412, 1, 2 << 20));
    let c2 = Entry::new("apps", "c", "preseed.local/c:1", fixtures::single(&w.cache, "hello", 413, 1, 1 << 20));
    let old = partition(&w, &[a.clone(), b], "old");
    let new = partition(&w, &[a, c2], "new");
    let only_old: BTreeSet<_> =
        blobs_of(&old, "apps/b.tar").difference(&blobs_of(&new, "apps/a.tar")).cloned().collect();
    let only_a: BTreeSet<_> = blobs_of(&old, "apps/a.tar").difference(&blobs_of(&old, "apps/b.tar")).cloned().collect();
    assert!(!only_a.is_empty());
    let old_blobs: BTreeSet<_> = blobs_of(&old, "apps/a.tar").union(&blobs_of(&old, "apps/b.tar")).cloned().collect();
    let new_blobs: BTreeSet<_> = blobs_of(&new, "apps/a.tar").union(&blobs_of(&new, "apps/c.tar")).cloned().collect();

    // Not a partition at all: as good as none.
    let bogus = w.root.join("bogus.img");
    std::fs::write(&bogus, vec![0u8; 8192]).unwrap();
    // The last: no --previous, but `preseed settle --next new` ran before the swap.
    for (previous, settled) in
        [(Some(old.as_path()), false), (None, false), (Some(bogus.as_path()), false), (None, true)]
    {
        let with_previous = previous == Some(old.as_path());
        let Some(mut c) = Containerd::start() else { return };
        c.stop();
        overlay_on(&old, None, &c).unwrap();
        c.restart();
        assert!(!load_from(&old, &c).failed());
        // a goes, and GC deletes its own blobs (whiteouts over the old partition's).
        c.ctr_ok(&["-n", "apps", "images", "rm", "--sync", "preseed.local/a:1"]);
        wait_gone(&store(&c), &only_a);
        if settled {
            let r = settle(Some(&new), &c).unwrap();
            // a's blobs are the new partition's too: left where they are.
            let in_both = old_blobs.intersection(&new_blobs).count();
            assert_eq!((r.settled, r.in_next, r.damaged.len()), (only_old.len(), in_both, 0), "{r:?}");
            for d in &only_old {
                assert!(upper(&c).join(d.hex()).is_file(), "{d} copied to the upper layer");
            }
            assert!(c.ctr_ok(&["-n", "apps", "images", "check"]).contains("complete"));
            let again = settle(Some(&new), &c).unwrap();
            assert_eq!((again.settled, again.already), (0, only_old.len()), "{again:?}");
        }
        reboot(&mut c);

        // The content now lives in the overlay: a copying place would hide it.
        let err = place::place(&options(&new, &c)).unwrap_err();
        assert!(matches!(err, PlaceError::Overlaid { .. }), "{err}");
        assert!(
            err.to_string().contains("which is not mounted: run preseed place --overlay, not a copying place"),
            "{err}"
        );

        let r = overlay_on(&new, previous, &c).unwrap();
        if previous == Some(bogus.as_path()) {
            assert!(r.warnings.iter().any(|w| w.contains("previous partition cannot be opened")), "{r:?}");
        }
        c.restart();
        let loaded = load_from(&new, &c);
        assert!(!loaded.failed());
        assert_eq!(loaded.bytes_written, 0, "a's blobs, deleted over the old partition, are the new one's again");
        // Exits non-zero when an image lacks a blob: the table is printed all the same.
        let check = String::from_utf8_lossy(&c.ctr(&["-n", "apps", "images", "check"]).stdout).into_owned();
        let line = |name: &str| check.lines().find(|l| l.starts_with(name)).unwrap_or_default().to_string();
        assert!(line("preseed.local/c:1").contains(" complete "), "{check}");
        if settled {
            assert_eq!((r.kept_from_previous, r.lost.len()), (0, 0), "{r:?}");
            assert!(line("preseed.local/b:1").contains(" complete "), "b, settled, still whole: {check}");
        } else if with_previous {
            assert_eq!((r.kept_from_previous, r.lost.len()), (only_old.len(), 0), "{r:?}");
            assert!(line("preseed.local/b:1").contains(" complete "), "b, no longer shipped, still whole: {check}");
            for d in &only_old {
                assert!(upper(&c).join(d.hex()).is_file(), "{d} copied to the upper layer");
            }
        } else {
            let lost: BTreeSet<String> = only_old.iter().map(|d| d.to_string()).collect();
            assert_eq!(r.lost.iter().cloned().collect::<BTreeSet<_>>(), lost, "{r:?}");
            let mut out = Vec::new();
            r.print_human(&mut out).unwrap();
            assert!(String::from_utf8_lossy(&out).contains("--previous"));
            assert!(!line("preseed.local/b:1").contains(" complete "), "b lost its only-old blobs: {check}");
        }
        c.assert_no_panic();
    }
}

#[test]
fn settle_copies_the_lower_blobs_containerd_kept_and_needs_the_overlay_mounted() {
    let Some(w) = fixtures::runnable_world() else { return };
    let a = Entry::new("apps", "a", "preseed.local/a:1", fixtures::single(&w.cache, "hello", 421, 1, 1 << 20));
    let b = Entry::new("apps", "b", "preseed.local/b:1", fixtures::single(&w.cache, "hello", 422, 1, 1 << 20));
    let image = partition(&w, &[a, b], "p");
    let only_a: BTreeSet<_> =
        blobs_of(&image, "apps/a.tar").difference(&blobs_of(&image, "apps/b.tar")).cloned().collect();
    let Some(mut c) = Containerd::start() else { return };

    let r = settle(None, &c).unwrap();
    assert!(r.warnings.iter().any(|w| w.contains("is not in preseed's overlay")) && r.settled == 0, "{r:?}");

    c.stop();
    overlay_on(&image, None, &c).unwrap();
    c.restart();
    assert!(!load_from(&image, &c).failed());
    c.ctr_ok(&["-n", "apps", "images", "rm", "--sync", "preseed.local/a:1"]);
    wait_gone(&store(&c), &only_a);
    // Every blob b uses, none of what GC deleted.
    let r = settle(None, &c).unwrap();
    let b_blobs = blobs_of(&image, "apps/b.tar");
    assert_eq!((r.settled, r.deleted, r.in_next), (b_blobs.len(), only_a.len(), 0), "{r:?}");
    for d in &b_blobs {
        assert!(upper(&c).join(d.hex()).is_file(), "{d} copied to the upper layer");
    }
    assert!(!c.root().join(place::CONTENT_DIR).join("preseed-settle.tmp").exists(), "temp directory left behind");
    c.ctr_ok(&["-n", "apps", "images", "check"]);

    reboot(&mut c);
    let err = settle(None, &c).unwrap_err();
    assert!(matches!(err, PlaceError::NotMounted { .. }), "{err}");
    assert!(err.to_string().ends_with("settle runs on a node booted with preseed place --overlay"), "{err}");
    c.assert_no_panic();
}

#[test]
fn a_damaged_blob_in_the_partition_is_hidden_and_its_image_fails_alone() {
    let Some(w) = fixtures::runnable_world() else { return };
    let Some(mut c) = Containerd::start() else { return };
    let good =
        Entry::new("k8s.io", "good", "preseed.local/good:1", fixtures::single(&w.cache, "hello", 420, 1, 1 << 20));
    let bad_image = fixtures::single(&w.cache, "hello", 421, 1, 1 << 20);
    let victim = bad_image.blobs.iter().max_by_key(|b| b.size).unwrap().digest.clone();
    let bad = Entry::new("k8s.io", "bad", "preseed.local/bad:1", bad_image);
    let image = partition(&w, &[good, bad], "p");
    // Flip one byte in the middle of bad's biggest blob (one block, shared
    // by its tarball and its .content file).
    let blob = std::fs::read(w.cache.path(&victim)).unwrap();
    let needle = &blob[blob.len() / 2..blob.len() / 2 + 64];
    let mut bytes = std::fs::read(&image).unwrap();
    let at = bytes.windows(64).position(|win| win == needle).expect("blob bytes in the image");
    bytes[at] ^= 0x40;
    std::fs::write(&image, bytes).unwrap();

    c.stop();
    let r = overlay_on(&image, None, &c).unwrap();
    assert_eq!(r.damaged.len(), 1, "{r:?}");
    assert_eq!(r.damaged[0].digest, victim.to_string());
    assert!(!r.failed(), "the overlay is mounted all the same: containerd must start");
    assert!(!store(&c).join(victim.hex()).exists(), "hidden from containerd");

    c.restart();
    let report = load_from(&image, &c);
    let outcome = |n: &str| report.images.iter().find(|i| i.names[0] == n).unwrap().outcome;
    assert_eq!(outcome("preseed.local/good:1"), Outcome::Imported);
    assert_eq!(outcome("preseed.local/bad:1"), Outcome::Failed, "containerd refuses the damaged bytes");
    c.assert_no_panic();
}

#[test]
fn a_partition_without_a_content_directory_is_copied_instead() {
    let Some(w) = fixtures::runnable_world() else { return };
    if support::require_tool("mksquashfs").is_none() {
        return;
    }
    let Some(mut c) = Containerd::start() else { return };
    let e = Entry::new("k8s.io", "a", "preseed.local/a:1", fixtures::single(&w.cache, "hello", 430, 0, 0));
    let dir = w.root.join("tree");
    fixtures::bundle_tree(&w.cache, &[e], &dir);
    let image = fixtures::partition(&dir, &w.root.join("p.squashfs"), "squashfs");
    c.stop();
    let r = overlay_on(&image, None, &c).unwrap();
    assert!(!r.overlay && r.placed > 0, "{r:?}");
    assert!(r.warnings[0].contains("copied instead"), "{r:?}");
    assert!(!overlay::is_overlaid(&c.root()));
    c.restart();
    let report = load_from(&image, &c);
    assert!(!report.failed() && report.bytes_written == 0, "{}", report.to_json());
}

#[test]
fn a_node_whose_containerd_never_ran_gets_its_root_made() {
    let Some(w) = fixtures::runnable_world() else { return };
    let Some(c) = Containerd::start() else { return };
    let e = Entry::new("k8s.io", "a", "preseed.local/a:1", fixtures::single(&w.cache, "hello", 440, 0, 0));
    let image = partition(&w, &[e], "p");
    let root = w.root.join("fresh/containerd");
    let mut o = options(&image, &c);
    o.root = Some(root.clone());
    let r = overlay::overlay(&o, None).unwrap();
    let content = root.join(place::CONTENT_DIR);
    let mounted = overlay::is_mounted(&root);
    let visible = std::fs::read_dir(content.join("blobs/sha256")).map(|d| d.count()).unwrap_or(0);
    for m in [content, root.join(overlay::STATE_DIR).join("lower")] {
        let path = std::ffi::CString::new(m.into_os_string().into_encoded_bytes()).unwrap();
        // SAFETY: a NUL-terminated path that outlives the call.
        unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
    }
    assert!(mounted, "{r:?}");
    assert_eq!((r.overlaid, visible), (3, 3), "{r:?}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&root).unwrap().permissions().mode() & 0o777, 0o711, "as containerd makes it");
}
