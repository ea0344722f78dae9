//! `preseed diff` against real partitions: images pushed to a real registry
//! (Debian docker-registry), bundled twice by the `preseed` binary — NEW
//! changes one image (one new layer), adds one, removes one, retags one and
//! unpins one — and compared as bundle output directories, `preseed.json`
//! files, partition image files (loop-mounted: root) and old-style indexes
//! without blob lists. Expected bytes are computed from what was pushed.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use preseed::digest::Digest;
use preseed::node::diff::{self, Added, Changed, Diff, FlagChange, NamespaceDiff, Removed, Retagged, Totals};
use preseed::partition::index::PartitionIndex;
use support::cli::{ok, preseed_without_credentials};
use support::images::{self, LayerSpec, Media, PushedImage};
use support::registry::Registry;

fn d(s: &str) -> Digest {
    s.parse().unwrap()
}

/// What one pushed image carries in its tarball: manifest, config, layers.
fn carried(img: &PushedImage) -> BTreeMap<String, u64> {
    let mut b = img.blob_digests.clone();
    b.insert(img.manifest_digest.clone(), img.manifest_bytes.len() as u64);
    b
}

/// Sum and count of `blobs` not in `old`.
fn fresh(blobs: &BTreeMap<String, u64>, old: &BTreeSet<String>) -> (u64, usize) {
    let new: Vec<u64> = blobs.iter().filter(|(d, _)| !old.contains(*d)).map(|(_, s)| *s).collect();
    (new.iter().sum(), new.len())
}

struct World {
    _dir: tempfile::TempDir,
    /// Bundle output directories.
    old: PathBuf,
    new: PathBuf,
    /// The expected diff, with `old`/`new` to be set per input kind.
    expected: Diff,
    /// The layer NEW's app adds (and tool shares).
    new_layer: (String, u64),
}

/// OLD (erofs): app:v1, gone (namespace apps), keep (extra name :old), same.
/// NEW (squashfs): app:v2 (app:v1's layers plus one new one), tool (added,
/// sharing that new layer), keep (extra name :new), same (pin = false).
fn world(reg: &Registry) -> World {
    let host = reg.host();
    let base = LayerSpec::new(1, 2, 64 << 10);
    let app_own = LayerSpec::new(10, 1, 32 << 10);
    let new_layer = LayerSpec::new(11, 3, 40 << 10);
    let app1 = images::push_image(reg, "diff/app", "v1", &[base, app_own], Media::Oci);
    let app2 = images::push_image(reg, "diff/app", "v2", &[base, app_own, new_layer], Media::Oci);
    let gone = images::push_image(reg, "diff/gone", "v1", &[base, LayerSpec::new(20, 1, 8 << 10)], Media::Oci);
    let keep = images::push_image(reg, "diff/keep", "v1", &[base, LayerSpec::new(30, 1, 8 << 10)], Media::Docker);
    let same = images::push_image(reg, "diff/same", "v1", &[LayerSpec::new(40, 1, 8 << 10)], Media::Oci);
    let tool = images::push_image(reg, "diff/tool", "v1", &[base, new_layer], Media::Oci);
    let built = images::build_layer(&new_layer);
    assert!(!app1.blob_digests.contains_key(&built.digest));

    let image = |img: &PushedImage, tag: &str, file: &str, extra: &str| {
        format!("\n[[image]]\nref = \"{host}/{}:{tag}@{}\"\nfile = \"{file}\"\n{extra}", img.repo, img.manifest_digest)
    };
    let head = |format: &str| {
        format!("[partition]\nformat = \"{format}\"\nplatforms = [\"linux/amd64\"]\n\n[registries.\"{host}\"]\ninsecure = true\n")
    };
    let old_text = head("erofs")
        + &image(&app1, "v1", "app", "")
        + &image(&gone, "v1", "gone", "namespace = \"apps\"\n")
        + &image(&keep, "v1", "keep", "names = [\"registry.local/keep:old\"]\n")
        + &image(&same, "v1", "same", "");
    let new_text = head("squashfs")
        + &image(&app2, "v2", "app", "")
        + &image(&tool, "v1", "tool", "")
        + &image(&keep, "v1", "keep", "names = [\"registry.local/keep:new\"]\n")
        + &image(&same, "v1", "same", "pin = false\n");

    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let bundle = |name: &str, text: &str| {
        let manifest = dir.path().join(format!("{name}.toml"));
        std::fs::write(&manifest, text).unwrap();
        let out = dir.path().join(name);
        ok(
            "preseed bundle",
            &preseed_without_credentials(&[
                "bundle",
                "--no-progress",
                "--manifest",
                manifest.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
                "--cache",
                cache.to_str().unwrap(),
            ]),
        );
        out
    };
    let (old, new) = (bundle("old", &old_text), bundle("new", &new_text));

    // The expectation, from what was pushed.
    let old_blobs: BTreeSet<String> =
        [&app1, &gone, &keep, &same].iter().flat_map(|i| carried(i).into_keys()).collect();
    let new_all: BTreeMap<String, u64> = [&app2, &tool, &keep, &same].iter().flat_map(|i| carried(i)).collect();
    let (new_bytes, new_blobs) = fresh(&new_all, &old_blobs);
    // The new layer, app:v2's and tool's configs and manifests: 5 blobs.
    assert_eq!(new_blobs, 5);
    let (app_bytes, app_blobs) = fresh(&carried(&app2), &old_blobs);
    let (tool_bytes, tool_blobs) = fresh(&carried(&tool), &old_blobs);
    assert_eq!(
        app_bytes,
        built.blob.len() as u64 + app2.blob_digests[&app2.config_digest] + app2.manifest_bytes.len() as u64
    );
    let name = |repo: &str, tag: &str| format!("{host}/diff/{repo}:{tag}");
    let expected = Diff {
        old: String::new(),
        new: String::new(),
        namespaces: vec![
            NamespaceDiff {
                namespace: "apps".into(),
                added: vec![],
                removed: vec![Removed {
                    file: "gone".into(),
                    name: name("gone", "v1"),
                    names: vec![],
                    digest: d(&gone.manifest_digest),
                }],
                changed: vec![],
                retagged: vec![],
                flags: vec![],
                resigned: vec![],
                unchanged: 0,
            },
            NamespaceDiff {
                namespace: "k8s.io".into(),
                added: vec![Added {
                    file: "tool".into(),
                    name: name("tool", "v1"),
                    names: vec![],
                    digest: d(&tool.manifest_digest),
                    new_bytes: tool_bytes,
                    new_blobs: tool_blobs,
                    carries: Default::default(),
                }],
                removed: vec![],
                changed: vec![Changed {
                    file: "app".into(),
                    name: name("app", "v2"),
                    old_digest: d(&app1.manifest_digest),
                    digest: d(&app2.manifest_digest),
                    names_added: vec![name("app", "v2")],
                    names_removed: vec![name("app", "v1")],
                    new_bytes: app_bytes,
                    new_blobs: app_blobs,
                    carries: Default::default(),
                }],
                retagged: vec![Retagged {
                    file: "keep".into(),
                    name: name("keep", "v1"),
                    old_name: name("keep", "v1"),
                    digest: d(&keep.manifest_digest),
                    names_added: vec!["registry.local/keep:new".into()],
                    names_removed: vec!["registry.local/keep:old".into()],
                }],
                flags: vec![FlagChange {
                    file: "same".into(),
                    name: name("same", "v1"),
                    flag: "pin",
                    old: true,
                    new: false,
                }],
                resigned: vec![],
                unchanged: 1,
            },
        ],
        totals: Totals {
            added: 1,
            removed: 1,
            changed: 1,
            retagged: 1,
            unchanged: 1,
            flag_changes: 1,
            new_blobs,
            new_bytes,
        },
    };
    // Counted once: the shared layer is in both images' own figures.
    assert_eq!(new_bytes, app_bytes + tool_bytes - built.blob.len() as u64);
    World { _dir: dir, old, new, expected, new_layer: (built.digest.clone(), built.blob.len() as u64) }
}

fn expect(w: &World, old: &Path, new: &Path) -> Diff {
    Diff { old: old.display().to_string(), new: new.display().to_string(), ..w.expected.clone() }
}

/// `preseed.json` with every image's `blobs` removed, as an older bundle wrote it.
fn strip_blobs(index: &Path) -> Vec<u8> {
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(index).unwrap()).unwrap();
    for image in v["images"].as_array_mut().unwrap() {
        assert!(image.as_object_mut().unwrap().remove("blobs").is_some(), "no blobs in {}", index.display());
    }
    serde_json::to_vec_pretty(&v).unwrap()
}

#[test]
fn bundle_directories_and_preseed_json_diff_from_the_index() {
    let Some(reg) = Registry::start() else { return };
    let w = world(&reg);

    // Bundle output directories: the blob lists in preseed.json, no mount.
    let got = diff::diff_paths(&w.old, &w.new).unwrap();
    assert_eq!(got, expect(&w, &w.old, &w.new));
    // The preseed.json files alone say the same.
    let (oj, nj) = (w.old.join("preseed.json"), w.new.join("preseed.json"));
    assert_eq!(diff::diff_paths(&oj, &nj).unwrap(), expect(&w, &oj, &nj));

    // The binary: human report.
    let human =
        ok("preseed diff", &preseed_without_credentials(&["diff", w.old.to_str().unwrap(), w.new.to_str().unwrap()]));
    eprintln!("{human}");
    let host = reg.host();
    let t = &w.expected.totals;
    let lines: Vec<&str> = human.lines().collect();
    assert_eq!(lines[0], "apps: 0 added, 1 removed, 0 changed, 0 retagged, 0 unchanged");
    assert!(lines[1].starts_with("  - apps/gone  ") && lines[1].contains(&format!("{host}/diff/gone:v1")), "{human}");
    assert_eq!(lines[2], "k8s.io: 1 added, 0 removed, 1 changed, 1 retagged, 1 unchanged");
    assert!(lines[3].starts_with("  + k8s.io/tool  ") && lines[3].ends_with(" new"), "{human}");
    assert!(lines[4].starts_with("  ~ k8s.io/app   ") && lines[4].contains(" → "), "{human}");
    assert!(lines[5].contains("+registry.local/keep:new -registry.local/keep:old"), "{human}");
    assert!(lines[6].starts_with("  ! k8s.io/same  ") && lines[6].ends_with(": pin true → false"), "{human}");
    assert_eq!(
        lines[7],
        format!(
            "1 added, 1 removed, 1 changed, 1 retagged, 1 unchanged, 1 flag changes; a node must newly import {} ({} blobs)",
            preseed::human::human_bytes(t.new_bytes),
            t.new_blobs
        )
    );
    assert_eq!(lines.len(), 8, "{human}");

    // --json: the documented shape, exact figures.
    let json = ok(
        "preseed diff",
        &preseed_without_credentials(&["diff", "--json", oj.to_str().unwrap(), nj.to_str().unwrap()]),
    );
    eprintln!("{json}");
    assert_eq!(json, expect(&w, &oj, &nj).to_json());
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["totals"]["new_bytes"], t.new_bytes);
    assert_eq!(v["totals"]["new_blobs"], 5);
    assert_eq!(
        v["namespaces"][1]["changed"][0]["old_digest"],
        w.expected.namespaces[1].changed[0].old_digest.to_string()
    );

    // The index lists the new layer with its size; a partition against
    // itself differs in nothing, and that is success too.
    let index: PartitionIndex = serde_json::from_slice(&std::fs::read(&nj).unwrap()).unwrap();
    let app = index.images.iter().find(|i| i.file == "app").unwrap();
    assert!(app.blobs.iter().any(|b| b.digest.to_string() == w.new_layer.0 && b.size == w.new_layer.1));
    let same =
        ok("preseed diff", &preseed_without_credentials(&["diff", w.new.to_str().unwrap(), nj.to_str().unwrap()]));
    assert_eq!(same, "k8s.io: 0 added, 0 removed, 0 changed, 0 retagged, 4 unchanged\n0 added, 0 removed, 0 changed, 0 retagged, 4 unchanged; a node must newly import 0 B (0 blobs)\n");
}

/// Image files (mounted read-only), mounted partitions, and indexes without
/// blob lists (read from the tarballs, mounting the image beside if need be)
/// all give the same diff; the index's lists are the tarballs' blobs.
#[test]
fn partition_images_and_old_indexes_read_the_tarballs() {
    if !support::require_root() {
        return;
    }
    let Some(reg) = Registry::start() else { return };
    let w = world(&reg);
    let (oi, ni) = (w.old.join("preseed.erofs"), w.new.join("preseed.squashfs"));
    assert_eq!(diff::diff_paths(&oi, &ni).unwrap(), expect(&w, &oi, &ni));
    let by_dir =
        ok("preseed diff", &preseed_without_credentials(&["diff", w.old.to_str().unwrap(), w.new.to_str().unwrap()]));
    let by_image =
        ok("preseed diff", &preseed_without_credentials(&["diff", oi.to_str().unwrap(), ni.to_str().unwrap()]));
    assert_eq!(by_image, by_dir);

    let tmp = tempfile::tempdir().unwrap();
    let (om, nm) = (support::mount::Mounted::new(&oi, "erofs"), support::mount::Mounted::new(&ni, "squashfs"));
    assert_eq!(diff::diff_paths(&om.path(), &nm.path()).unwrap(), expect(&w, &om.path(), &nm.path()));
    for m in [&om, &nm] {
        // Each image's list is its tarball's blobs/sha256/ in tarball order.
        let index: PartitionIndex =
            serde_json::from_slice(&std::fs::read(m.path().join("preseed.json")).unwrap()).unwrap();
        for image in &index.images {
            let mut ar = tar::Archive::new(std::fs::File::open(m.path().join(&image.path)).unwrap());
            let listed: Vec<(String, u64)> = ar
                .entries()
                .unwrap()
                .map(|e| e.unwrap())
                .filter(|e| e.header().entry_type().is_file())
                .filter_map(|e| {
                    let p = e.path().unwrap().display().to_string();
                    p.strip_prefix("blobs/sha256/").map(|h| (format!("sha256:{h}"), e.size()))
                })
                .collect();
            let indexed: Vec<(String, u64)> = image.blobs.iter().map(|b| (b.digest.to_string(), b.size)).collect();
            assert_eq!(indexed, listed, "{}", image.path);
        }
    }

    // Old-style indexes: a copy of each mounted partition with its
    // preseed.json stripped of blob lists, and a bundle output directory
    // whose preseed.json is stripped (its partition image is mounted).
    let copy = |m: &support::mount::Mounted, name: &str| {
        let dst = tmp.path().join(name);
        let st = Command::new("cp").arg("-a").arg(m.path()).arg(&dst).status().unwrap();
        assert!(st.success());
        std::fs::write(dst.join("preseed.json"), strip_blobs(&m.path().join("preseed.json"))).unwrap();
        dst
    };
    let (od, nd) = (copy(&om, "old-root"), copy(&nm, "new-root"));
    assert_eq!(diff::diff_paths(&od, &nd).unwrap(), expect(&w, &od, &nd));
    let out_dir = tmp.path().join("old-out");
    std::fs::create_dir(&out_dir).unwrap();
    std::fs::copy(&oi, out_dir.join("preseed.erofs")).unwrap();
    std::fs::write(out_dir.join("preseed.json"), strip_blobs(&w.old.join("preseed.json"))).unwrap();
    assert_eq!(diff::diff_paths(&out_dir, &w.new).unwrap(), expect(&w, &out_dir, &w.new));
    drop((om, nm));
}

/// Errors name the input: a path that does not exist, a directory that is
/// no partition, and an old-style preseed.json with no tarballs beside it.
#[test]
fn errors_name_the_input() {
    let tmp = tempfile::tempdir().unwrap();
    let fails = |args: &[&str]| {
        let out = preseed_without_credentials(args);
        assert!(!out.status.success(), "diff {args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let missing = tmp.path().join("nope.erofs");
    let err = fails(&["diff", missing.to_str().unwrap(), tmp.path().to_str().unwrap()]);
    assert!(err.contains(&format!("{}: no such file or directory", missing.display())), "{err}");

    let err = fails(&["diff", tmp.path().to_str().unwrap(), tmp.path().to_str().unwrap()]);
    assert!(err.contains(&format!("{}: no preseed.json in this directory", tmp.path().display())), "{err}");

    // A bare preseed.json as bundles wrote it before blob lists.
    let bare = tmp.path().join("old").join("preseed.json");
    std::fs::create_dir(bare.parent().unwrap()).unwrap();
    let zero = format!("sha256:{}", "0".repeat(64));
    let index = serde_json::json!({
        "version": 1,
        "images": [{
            "namespace": "k8s.io", "file": "x", "path": "k8s.io/x.tar", "name": "docker.io/library/x:1",
            "names": [], "digest": zero, "media_type": "application/vnd.oci.image.manifest.v1+json",
            "platforms": ["linux/amd64"], "pin": true, "sandbox": false, "size": 1, "sha256": zero
        }],
        "build": { "tool": "preseed 0.1.0", "format": "erofs" }
    });
    std::fs::write(&bare, serde_json::to_vec_pretty(&index).unwrap()).unwrap();
    let err = fails(&["diff", bare.to_str().unwrap(), bare.to_str().unwrap()]);
    assert!(
        err.contains(&format!("{}: this preseed.json lists no blobs", bare.display()))
            && err.contains("pass the partition image"),
        "{err}"
    );
    // It parses: only the blob lists are missing.
    let parsed: PartitionIndex = serde_json::from_slice(&std::fs::read(&bare).unwrap()).unwrap();
    assert!(parsed.images[0].blobs.is_empty());
}
