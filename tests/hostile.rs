//! Damaged and crafted partitions, made here: each case replaces one image
//! (`k8s.io/bad.tar`, or its entry in `preseed.json`) of an otherwise good
//! tree. Whatever the case, every node-side command ends within seconds — no
//! hang, no panic, no exponential walk — with a message naming the image and
//! what is wrong; the good image is imported, placed or served; containerd
//! keeps nothing of the bad one (no record, no pin, no lease, no content).
//!
//! The cases are general on purpose (the fixes are bounds and checks, not
//! special cases): an index that lists itself, indexes that share
//! sub-indexes sixty levels deep, tar sizes that wrap 64-bit offsets (PAX and
//! base-256), a FIFO where a tarball should be, an empty extra name.
#![cfg(feature = "containerd")]

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use preseed::digest::Digest;
use preseed::oci;
use preseed::partition::index::PartitionIndex;
use support::containerd::Containerd;
use support::fixtures::{self, Entry, World};

/// How long any command may take on a crafted partition: seconds are
/// expected, this only tells a hang from slowness on a busy machine.
const HANG: Duration = Duration::from_secs(120);

const GOOD: &str = "preseed.local/good:1";
const BAD: &str = "preseed.local/bad:1";

/// A tree of two images, `good` and `bad`; `craft` then changes `bad`, and
/// `preseed.json` is updated to the size of whatever `bad.tar` became (so
/// the loader gets past its size check to the bytes themselves).
fn tree(w: &World, craft: impl FnOnce(&Path, &mut PartitionIndex)) -> PathBuf {
    let good = Entry::new("k8s.io", "good", GOOD, fixtures::single(&w.cache, "pause", 301, 0, 0));
    let bad = Entry::new("k8s.io", "bad", BAD, fixtures::single(&w.cache, "hello", 302, 1, 4096));
    let dir = w.root.join("tree");
    fixtures::bundle_tree(&w.cache, &[good, bad], &dir);
    let index_path = dir.join("preseed.json");
    let mut index = PartitionIndex::from_json(&std::fs::read(&index_path).unwrap()).unwrap();
    craft(&dir.join("k8s.io/bad.tar"), &mut index);
    if let Ok(m) = std::fs::symlink_metadata(dir.join("k8s.io/bad.tar")) {
        index.images[1].size = m.len();
    }
    std::fs::write(&index_path, index.to_json()).unwrap();
    dir
}

/// Runs a command to its end, failing the test if it does not end in [`HANG`].
fn finish(mut cmd: Command) -> Output {
    let child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output().unwrap()));
    match rx.recv_timeout(HANG) {
        Ok(out) => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!stderr.contains("panicked"), "{cmd:?} panicked:\n{stderr}");
            out
        }
        Err(_) => {
            // SAFETY: a signal to a process this test started; no memory is passed.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("{cmd:?} did not end within {HANG:?}");
        }
    }
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// `preseed load --dir tree`: fails naming the bad image and `why`; the good
/// one is in and pinned; nothing of the bad one is left.
fn load_fails_only_the_bad_image(c: &Containerd, tree: &Path, why: &str) {
    let mut cmd = support::cli::command();
    cmd.args(["load", "--json", "--timeout", "30", "--dir"]).arg(tree).arg("--address").arg(c.socket());
    let out = finish(cmd);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let images = report["images"].as_array().unwrap();
    let bad = images.iter().find(|i| i["tarball"] == "k8s.io/bad.tar").expect("the bad image is reported");
    assert_eq!(bad["outcome"], "failed", "{report:#}");
    let error = bad["error"].as_str().unwrap();
    assert!(error.contains(why), "expected {why:?} in: {error}");
    assert!(error.contains("bad"), "the message names the image or tarball: {error}");
    let good = images.iter().find(|i| i["tarball"] == "k8s.io/good.tar").unwrap();
    assert_eq!(good["outcome"], "imported", "{report:#}");

    let listed = c.ctr_ok(&["-n", "k8s.io", "images", "ls"]);
    assert!(listed.lines().any(|l| l.starts_with(GOOD) && l.contains("io.cri-containerd.pinned=pinned")), "{listed}");
    assert!(!listed.contains(BAD), "a record of the failed image is left:\n{listed}");
    assert_eq!(c.ctr_ok(&["-n", "k8s.io", "leases", "ls", "-q"]).trim(), "", "a lease is left");
    assert_eq!(c.ctr_ok(&["-n", "k8s.io", "content", "active"]).lines().count(), 1, "an ingest is left");
    c.assert_no_panic();
}

/// `preseed place --dir tree` into a fresh root: ends, exit 1, names the bad
/// tarball; the good image's blobs are placed.
fn place_refuses_the_bad_tarball(w: &World, tree: &Path, why: &str) {
    let root = w.root.join("place-root");
    let mut cmd = support::cli::command();
    cmd.args(["place", "--json", "--config", "/nonexistent/config.toml", "--dir"]).arg(tree).arg("--root").arg(&root);
    let out = finish(cmd);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let said = strings(&report);
    let named = said.iter().any(|s| s.contains("bad.tar"));
    assert!(named && said.iter().any(|s| s.contains(why)), "expected {why:?} about bad.tar: {report:#}");
    assert!(report["placed"].as_u64().unwrap() >= 3, "the good image's blobs: {report:#}");
}

/// Every string in a JSON value.
fn strings(v: &serde_json::Value) -> Vec<String> {
    match v {
        serde_json::Value::String(s) => vec![s.clone()],
        serde_json::Value::Array(a) => a.iter().flat_map(strings).collect(),
        serde_json::Value::Object(o) => o.values().flat_map(strings).collect(),
        _ => vec![],
    }
}

/// `preseed serve --dir tree`: starts, warns about the bad image, serves the
/// good one and not the bad one, stops on SIGTERM.
fn serve_serves_the_good_image(tree: &Path, why: &str) {
    let mut child: Child = support::cli::command()
        .args(["serve", "--listen", "127.0.0.1:0", "--dir"])
        .arg(tree)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (stdout, stderr) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = match rx.recv_timeout(HANG) {
        Ok(l) => l,
        Err(_) => {
            let _ = child.kill();
            panic!("preseed serve did not start within {HANG:?}");
        }
    };
    let addr = line.rsplit("http://").next().unwrap().trim().to_string();
    assert!(line.contains("serving 1 image(s)"), "{line}");
    let get = |path: &str| {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(HANG)).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nAccept: */*\r\nConnection: close\r\n\r\n").unwrap();
        let mut buf = String::new();
        let _ = s.read_to_string(&mut buf);
        buf.split(' ').nth(1).unwrap_or_default().to_string()
    };
    assert_eq!(get("/v2/good/manifests/1?ns=preseed.local"), "200");
    assert_eq!(get("/v2/bad/manifests/1?ns=preseed.local"), "404");
    // SAFETY: a signal to a process this test started; no memory is passed.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(start.elapsed() < HANG, "preseed serve did not stop");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut warnings = String::new();
    BufReader::new(stderr).read_to_string(&mut warnings).unwrap();
    assert!(status.success(), "preseed serve ended with {status} on SIGTERM:\n{warnings}");
    assert!(warnings.contains("bad") && warnings.contains(why), "expected a warning with {why:?}: {warnings}");
}

/// `preseed inspect tree`: ends; `refused` says whether it must fail (with
/// the load's message) or show the index (whose entries are fine: the damage
/// is inside the tarball, which inspect does not read).
fn inspect_ends(tree: &Path, refused: Option<&str>) {
    let mut cmd = support::cli::command();
    cmd.arg("inspect").arg(tree);
    let out = finish(cmd);
    match refused {
        Some(why) => {
            assert_eq!(out.status.code(), Some(1), "{}", text(&out));
            assert!(text(&out).contains(why), "{}", text(&out));
        }
        None => assert!(out.status.success(), "{}", text(&out)),
    }
}

/// A tar of `files`, GNU headers, as the `tar` crate writes them.
fn tar_of(files: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, name, &data[..]).unwrap();
    }
    b.into_inner().unwrap()
}

/// The bad image's own blobs (config, layers, manifest), read back from its
/// tarball, as (name, bytes).
fn blobs_of(tarball: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut a = tar::Archive::new(std::fs::File::open(tarball).unwrap());
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        let name = e.path().unwrap().display().to_string();
        if name.starts_with("blobs/sha256/") && e.header().entry_type().is_file() {
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            out.push((name, data));
        }
    }
    out
}

fn json(v: serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(&v).unwrap()
}

fn index_entry(digest: &Digest, size: usize) -> serde_json::Value {
    serde_json::json!({ "mediaType": oci::OCI_INDEX, "digest": digest.to_string(), "size": size })
}

fn prerequisites() -> Option<(World, Containerd)> {
    let w = fixtures::runnable_world()?;
    let c = Containerd::start()?;
    Some((w, c))
}

#[test]
fn an_index_that_lists_itself() {
    let Some((w, c)) = prerequisites() else { return };
    let tree = tree(&w, |bad, index| {
        // Named by a digest its bytes cannot have: the index under that
        // name lists that same name.
        let d = index.images[1].digest.clone();
        let selfish = json(serde_json::json!({
            "schemaVersion": 2, "mediaType": oci::OCI_INDEX,
            "manifests": [index_entry(&d, 200)],
        }));
        let mut padded = selfish.clone();
        padded.resize(200, b' ');
        let top = json(serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{ "mediaType": oci::OCI_INDEX, "digest": d.to_string(), "size": 200,
                            "annotations": { "io.containerd.image.name": BAD } }],
        }));
        std::fs::write(bad, tar_of(&[("index.json".into(), top), (d.layout_path(), padded)])).unwrap();
    });
    let why = "does not match its digest";
    load_fails_only_the_bad_image(&c, &tree, why);
    place_refuses_the_bad_tarball(&w, &tree, "bytes that hash to");
    serve_serves_the_good_image(&tree, why);
    inspect_ends(&tree, None);
}

#[test]
fn indexes_sharing_sub_indexes_sixty_levels_deep() {
    let Some((w, c)) = prerequisites() else { return };
    let tree = tree(&w, |bad, index| {
        // Real digests all the way: each level lists the next twice (2^60
        // paths to the manifest), so only a walk that visits each digest
        // once, and stops at an absurd depth, ends.
        let mut files = blobs_of(bad);
        let manifest = index.images[1].digest.clone();
        let mut below = serde_json::json!({
            "mediaType": oci::OCI_MANIFEST, "digest": manifest.to_string(),
            "size": files.iter().find(|(n, _)| *n == manifest.layout_path()).unwrap().1.len(),
        });
        for _ in 0..60 {
            let level = json(serde_json::json!({
                "schemaVersion": 2, "mediaType": oci::OCI_INDEX, "manifests": [below.clone(), below.clone()],
            }));
            let d = Digest::of(&level);
            below = index_entry(&d, level.len());
            files.push((d.layout_path(), level));
        }
        below["annotations"] = serde_json::json!({ "io.containerd.image.name": BAD });
        files.insert(
            0,
            ("index.json".into(), json(serde_json::json!({ "schemaVersion": 2, "manifests": [below.clone()] }))),
        );
        index.images[1].digest = below["digest"].as_str().unwrap().parse().unwrap();
        std::fs::write(bad, tar_of(&files)).unwrap();
    });
    let why = "nested more than 16 deep";
    load_fails_only_the_bad_image(&c, &tree, why);
    serve_serves_the_good_image(&tree, why);
    inspect_ends(&tree, None);
}

/// A PAX `size` record near 2^64 before the first blob.
fn pax_wrap(bad: &Path) {
    let mut out = Vec::new();
    let rec = b"29 size=18446744073709551000\n";
    let mut h = tar::Header::new_ustar();
    h.set_path("PaxHeaders/x").unwrap();
    h.set_entry_type(tar::EntryType::XHeader);
    h.set_size(rec.len() as u64);
    h.set_cksum();
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(rec);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out.extend(std::fs::read(bad).unwrap());
    std::fs::write(bad, out).unwrap();
}

/// A GNU base-256 size field of 2^63 in the first header.
fn base256_wrap(bad: &Path) {
    let mut bytes = std::fs::read(bad).unwrap();
    let field = &mut bytes[124..136];
    field.fill(0);
    field[0] = 0x80;
    field[4] = 0x80;
    let sum: u64 =
        bytes[..512].iter().enumerate().map(|(i, &b)| if (148..156).contains(&i) { 32 } else { b as u64 }).sum();
    bytes[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    std::fs::write(bad, bytes).unwrap();
}

#[test]
fn tar_sizes_that_wrap_the_offsets() {
    let Some((w, _)) = prerequisites() else { return };
    for (name, craft) in [("pax", pax_wrap as fn(&Path)), ("base-256", base256_wrap)] {
        eprintln!("case: {name}");
        let c = Containerd::start().unwrap();
        let tree = tree(&w, |bad, _| craft(bad));
        let why = "truncated";
        load_fails_only_the_bad_image(&c, &tree, why);
        place_refuses_the_bad_tarball(&w, &tree, why);
        serve_serves_the_good_image(&tree, why);
        inspect_ends(&tree, None);
        std::fs::remove_dir_all(&tree).unwrap();
        let _ = std::fs::remove_dir_all(w.root.join("place-root"));
    }
}

#[test]
fn a_fifo_where_a_tarball_should_be() {
    let Some((w, c)) = prerequisites() else { return };
    let tree = tree(&w, |bad, _| {
        std::fs::remove_file(bad).unwrap();
        let p = std::ffi::CString::new(bad.to_str().unwrap()).unwrap();
        // SAFETY: a NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(p.as_ptr(), 0o644) }, 0);
    });
    let why = "a FIFO, not a regular file";
    load_fails_only_the_bad_image(&c, &tree, why);
    place_refuses_the_bad_tarball(&w, &tree, why);
    serve_serves_the_good_image(&tree, why);
    inspect_ends(&tree, None);
}

#[test]
fn an_empty_extra_name() {
    let Some((w, c)) = prerequisites() else { return };
    let tree = tree(&w, |_, index| index.images[1].names = vec![String::new()]);
    let why = "name \"\" is not an image reference";
    load_fails_only_the_bad_image(&c, &tree, why);
    place_refuses_the_bad_tarball(&w, &tree, why);
    serve_serves_the_good_image(&tree, why);
    inspect_ends(&tree, Some(why));
}
