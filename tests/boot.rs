//! Boot images first: `preseed load` with `$NOTIFY_SOCKET` (as systemd sets
//! it for `Type=notify`) sends READY once every boot image is complete in a
//! real containerd, before the background images are in, and goes on
//! importing them; a failed boot image means no READY and a failed exit.
#![cfg(feature = "containerd")]

mod support;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use support::cli;
use support::containerd::Containerd;
use support::fixtures::{self, Entry, World};

/// A sandbox image and a `boot = true` app (small), and two background
/// images, one big enough (160 MiB) to take a while.
fn tree(w: &World) -> PathBuf {
    let mut pause =
        Entry::new("k8s.io", "pause", "preseed.local/pause:1", fixtures::single(&w.cache, "pause", 401, 0, 0));
    pause.sandbox = true;
    let mut cni =
        Entry::new("k8s.io", "cni", "preseed.local/cni:1", fixtures::single(&w.cache, "hello", 402, 1, 1 << 20));
    cni.boot = true;
    let big = Entry::new("k8s.io", "big", "preseed.local/big:1", fixtures::single(&w.cache, "hello", 403, 5, 32 << 20));
    let small = Entry::new("k8s.io", "small", "preseed.local/small:1", fixtures::single(&w.cache, "hello", 404, 0, 0));
    let dir = w.root.join("tree");
    fixtures::bundle_tree(&w.cache, &[pause, big, cni, small], &dir);
    dir
}

const BOOT: [&str; 2] = ["preseed.local/pause:1", "preseed.local/cni:1"];

/// What containerd had at the moment READY arrived.
struct AtReady {
    listed: String,
    check: String,
}

/// Runs `preseed load --json` with `$NOTIFY_SOCKET` set to a socket of ours;
/// on READY, stops the loader (SIGSTOP) while it looks at containerd, so
/// that what it sees is the state at READY however slow `ctr` is to start. Returns the messages, the state at
/// READY, the exit status and the JSON report.
fn load_notified(tree: &Path, c: &Containerd) -> (Vec<String>, Option<AtReady>, bool, serde_json::Value) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    let socket = UnixDatagram::bind(&path).unwrap();
    socket.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let child = cli::command()
        .args(["load", "--json", "--dir"])
        .arg(tree)
        .arg("--address")
        .arg(c.socket())
        .env("NOTIFY_SOCKET", &path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let (tx, rx) = mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let out = child.wait_with_output().unwrap();
        tx.send(()).unwrap();
        out
    });
    let mut messages = Vec::new();
    let mut at_ready = None;
    let mut buf = vec![0u8; 4096];
    loop {
        match socket.recv(&mut buf) {
            Ok(n) => {
                let m = String::from_utf8_lossy(&buf[..n]).into_owned();
                if m.lines().any(|l| l == "READY=1") {
                    // SAFETY: signals to our own child, which has not been waited for.
                    unsafe { libc::kill(pid, libc::SIGSTOP) };
                    at_ready = Some(AtReady {
                        listed: c.ctr_ok(&["-n", "k8s.io", "images", "ls", "-q"]),
                        check: c.ctr_ok(&["-n", "k8s.io", "images", "check"]),
                    });
                    // SAFETY: a signal to a process this test started; no memory is passed.
                    unsafe { libc::kill(pid, libc::SIGCONT) };
                }
                messages.push(m);
            }
            Err(_) if rx.try_recv().is_ok() => break,
            Err(_) => {}
        }
    }
    // Whatever was sent just before exit.
    socket.set_nonblocking(true).unwrap();
    while let Ok(n) = socket.recv(&mut buf) {
        messages.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    let out = waiter.join().unwrap();
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("{e}: {}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    });
    (messages, at_ready, out.status.success(), report)
}

#[test]
fn ready_comes_after_the_boot_images_and_before_the_background_ones() {
    let Some(w) = fixtures::runnable_world() else { return };
    let Some(c) = Containerd::start() else { return };
    let tree = tree(&w);
    let (messages, at_ready, ok, report) = load_notified(&tree, &c);
    assert!(ok, "{report:#}");
    let at = at_ready.unwrap_or_else(|| panic!("no READY=1 among {messages:?}"));
    for name in BOOT {
        assert!(at.listed.lines().any(|l| l == name), "{name} not in containerd at READY:\n{}", at.listed);
        let row = at.check.lines().find(|l| l.starts_with(name)).unwrap_or_default();
        assert!(row.contains(" complete "), "{name} not complete at READY: {row:?}");
    }
    assert!(
        !at.listed.lines().any(|l| l == "preseed.local/big:1"),
        "the big background image was already in at READY:\n{}",
        at.listed
    );
    assert!(
        messages.iter().any(|m| m.contains("STATUS=boot images ready; background images 2/2 done")),
        "{messages:?}"
    );
    assert!(messages.last().unwrap().starts_with("STATUS=finished: 4 images, 0 failed"), "{messages:?}");
    // Then everything is there.
    let listed = c.ctr_ok(&["-n", "k8s.io", "images", "ls", "-q"]);
    for name in BOOT.iter().chain(&["preseed.local/big:1", "preseed.local/small:1"]) {
        assert!(listed.lines().any(|l| l == *name), "{name} missing after the load:\n{listed}");
    }
    assert_eq!(report["boot_images"], 2);
    let (ready, total) = (report["ready_ms"].as_u64().unwrap(), report["duration_ms"].as_u64().unwrap());
    assert!(ready < total, "ready after {ready} ms of {total} ms");
    c.assert_no_panic();
}

/// Replaces a tarball with junk of another size (preseed.json no longer
/// matches it).
fn break_tarball(tree: &Path, file: &str) {
    std::fs::write(tree.join(format!("k8s.io/{file}.tar")), b"not a tarball").unwrap();
}

#[test]
fn a_failed_boot_image_means_no_ready_and_a_failed_exit() {
    let Some(w) = fixtures::runnable_world() else { return };
    let Some(c) = Containerd::start() else { return };
    let tree = tree(&w);
    break_tarball(&tree, "cni");
    let (messages, at_ready, ok, report) = load_notified(&tree, &c);
    assert!(at_ready.is_none(), "READY sent though a boot image failed: {messages:?}");
    assert!(!ok, "exit status must say so: {report:#}");
    assert!(messages.iter().any(|m| m.starts_with("STATUS=boot images failed: preseed.local/cni:1")), "{messages:?}");
    let errors = report["errors"].to_string();
    assert!(
        errors.contains("boot image(s) failed") && errors.contains("2 background image(s) not imported"),
        "{errors}"
    );
    let listed = c.ctr_ok(&["-n", "k8s.io", "images", "ls", "-q"]);
    assert!(!listed.contains("preseed.local/big:1"), "background imported after a boot failure:\n{listed}");
    c.assert_no_panic();
}

#[test]
fn a_failed_background_image_keeps_ready_and_is_in_the_final_status() {
    let Some(w) = fixtures::runnable_world() else { return };
    let Some(c) = Containerd::start() else { return };
    let tree = tree(&w);
    break_tarball(&tree, "small");
    let (messages, at_ready, ok, report) = load_notified(&tree, &c);
    assert!(at_ready.is_some(), "no READY: {messages:?}");
    assert!(!ok, "the failed background image fails the exit status: {report:#}");
    assert!(messages.last().unwrap().starts_with("STATUS=finished: 4 images, 1 failed"), "{messages:?}");
    let listed = c.ctr_ok(&["-n", "k8s.io", "images", "ls", "-q"]);
    assert!(listed.lines().any(|l| l == "preseed.local/big:1"), "{listed}");
    c.assert_no_panic();
}
