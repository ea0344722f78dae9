//! The VM test's stand-in for kubelet (`tests/vm.rs`): run inside the VM by a
//! unit ordered after `preseed-load.service`, it does through containerd's CRI
//! API what kubelet's first pod start does — list images, run a host-network
//! pod sandbox, create and start a container, wait for it to exit, read its
//! log — and prints what it saw as `PRESEED-VM: …` lines on stdout (the
//! serial console), for the test on the host to judge.
//!
//! Lines (one fact each):
//! * `PRESEED-VM: boot <boot_id>`
//! * `PRESEED-VM: as <unit>`  the unit it runs as (kubelet's stand-in, or the failure reporter)
//! * `PRESEED-VM: net <interface>`  every network interface (the VM has none but `lo`)
//! * `PRESEED-VM: load-at-start <SubState>`  preseed-load.service when kubelet's stand-in
//!   started: `running` while it still imports background images after READY
//!   (`Type=notify`), `exited` once done
//! * `PRESEED-VM: unit <name> <ActiveState> <Result>`
//! * `PRESEED-VM: load-log <line>`  every journal line of `preseed-load.service` this boot
//! * `PRESEED-VM: image <name> pinned=<true|false>`  every name CRI lists
//! * `PRESEED-VM: sandbox ready` / `PRESEED-VM: container exit=<code>` / `PRESEED-VM: container-log <line>`
//! * `PRESEED-VM: error <what>`
//! * `PRESEED-VM: check <name> <status>`  `ctr images check` of every image in `k8s.io`
//! * `PRESEED-VM: lease <namespace> <id>` / `PRESEED-VM: ingest <namespace> <ref>`  every
//!   lease and unfinished content write containerd holds
//! * `PRESEED-VM: temp <path>`  a temp file or directory of preseed's under containerd's root
//! * `PRESEED-VM: overlay consistent` / `overlay inconsistent <why>` / `overlay none`  whether
//!   `place --overlay`'s state names the partition mounted as the lower layer
//! * `PRESEED-VM: journal <line>`  the preseed-load, containerd and settle journal of this boot
//! * `PRESEED-VM: done`  last line
//!
//! Usage: `cri_smoke [--socket PATH] [--image REF] [--as UNIT]`.
//!
//! The CRI client is the tests' own, `tests/support/cri.rs`; what is here is
//! the VM's side: its arguments, the facts of the boot, the console.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

#[allow(dead_code)] // the tests' panicking helpers
#[path = "../tests/support/cri.rs"]
mod cri;

const MARK: &str = "PRESEED-VM:";

/// One fact per line, flushed at once: the console is shared with the kernel
/// and systemd, so each line goes out in a single write.
fn say(what: impl std::fmt::Display) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(format!("{MARK} {what}\n").as_bytes());
    let _ = out.flush();
}

fn output(cmd: &mut Command) -> String {
    match cmd.output() {
        Ok(o) => String::from_utf8_lossy(&o.stdout).into_owned(),
        Err(e) => format!("(could not run {cmd:?}: {e})"),
    }
}

fn main() {
    let mut socket = PathBuf::from("/run/containerd/containerd.sock");
    let mut image = "preseed.local/hello:0.1".to_string();
    let mut unit = String::from("?");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match (a.as_str(), args.next()) {
            ("--socket", Some(v)) => socket = v.into(),
            ("--image", Some(v)) => image = v,
            ("--as", Some(v)) => unit = v,
            _ => {
                eprintln!("usage: cri_smoke [--socket PATH] [--image REF] [--as UNIT]");
                std::process::exit(2);
            }
        }
    }
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let boot_id = boot_id.trim().to_string();
    say(format!("boot {boot_id}"));
    say(format!("as {unit}"));
    let mut interfaces: Vec<String> = std::fs::read_dir("/sys/class/net")
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned())).collect())
        .unwrap_or_default();
    interfaces.sort();
    for i in interfaces {
        say(format!("net {i}"));
    }
    let load_state = || {
        let props = output(Command::new("systemctl").args(["show", "-p", "SubState", "preseed-load.service"]));
        props.trim().strip_prefix("SubState=").unwrap_or("?").to_string()
    };
    say(format!("load-at-start {}", load_state()));
    // What kubelet does first: the pod, while the loader may still import
    // background images.
    if let Err(e) = pod(&socket, &image, &boot_id) {
        say(format!("error {e:#}"));
    }
    // Then wait for the whole load, to report it.
    let deadline = Instant::now() + Duration::from_secs(600);
    while load_state() == "running" && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    for unit in ["containerd.service", "preseed-load.service", "preseed-vm-settle.service"] {
        let props = output(Command::new("systemctl").args(["show", "-p", "ActiveState", "-p", "Result", unit]));
        let get = |k: &str| {
            props.lines().find_map(|l| l.strip_prefix(k).and_then(|v| v.strip_prefix('='))).unwrap_or("?").to_string()
        };
        say(format!("unit {unit} {} {}", get("ActiveState"), get("Result")));
    }
    for line in
        output(Command::new("journalctl").args(["-b", "-u", "preseed-load.service", "-o", "cat", "--no-pager"])).lines()
    {
        say(format!("load-log {line}"));
    }
    match cri::list_images(&socket) {
        Ok(images) => {
            for i in images {
                for tag in &i.repo_tags {
                    say(format!("image {tag} pinned={}", i.pinned));
                }
            }
        }
        Err(e) => say(format!("error listing images: {e:#}")),
    }
    containerd_state();
    let journal = output(Command::new("journalctl").args([
        "-b",
        "-u",
        "preseed-load.service",
        "-u",
        "containerd.service",
        "-u",
        "preseed-vm-settle.service",
        "-o",
        "short-monotonic",
        "--no-pager",
    ]));
    for line in journal.lines() {
        say(format!("journal {line}"));
    }
    say("done");
}

/// What is left in containerd and its root after this boot's preseed runs:
/// images and whether they are complete, leases, unfinished writes, preseed's
/// temp files, and whether the overlay's state matches its mount (for the
/// power-cut test, which requires that a recovery boot leaves none of them).
fn containerd_state() {
    let ctr = |args: &[&str]| output(Command::new("ctr").args(args));
    for line in ctr(&["-n", "k8s.io", "images", "check"]).lines().skip(1) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() >= 4 {
            say(format!("check {} {}", cols[0], cols[3]));
        }
    }
    for ns in ctr(&["namespaces", "ls", "-q"]).lines() {
        for id in ctr(&["-n", ns, "leases", "ls", "-q"]).lines() {
            say(format!("lease {ns} {id}"));
        }
        for line in ctr(&["-n", ns, "content", "active"]).lines().skip(1) {
            if let Some(r) = line.split_whitespace().next() {
                say(format!("ingest {ns} {r}"));
            }
        }
    }
    let root = Path::new("/var/lib/containerd");
    let content = root.join("io.containerd.content.v1.content");
    let state = root.join("preseed-overlay");
    let mut candidates: Vec<PathBuf> =
        ["preseed-place.tmp", "preseed-settle.tmp"].iter().map(|n| content.join(n)).collect();
    candidates.extend(["preseed-place.tmp", "preseed-settle.tmp"].iter().map(|n| state.join("upper").join(n)));
    candidates.push(state.join("tmp"));
    if let Ok(entries) = std::fs::read_dir(&state) {
        candidates.extend(
            entries.flatten().filter(|e| e.file_name().to_string_lossy().starts_with(".tmp")).map(|e| e.path()),
        );
    }
    for c in candidates.iter().filter(|c| c.exists()) {
        say(format!("temp {}", c.display()));
    }
    let Ok(recorded) = std::fs::read(state.join("lower.json")) else {
        say("overlay none");
        return;
    };
    let recorded: serde_json::Value = serde_json::from_slice(&recorded).unwrap_or_default();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mounted_as = |dir: &Path| {
        mounts.lines().rev().find_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let dash = f.iter().position(|x| *x == "-")?;
            (Path::new(f.get(4)?) == dir).then(|| f.get(dash + 1).map(|s| s.to_string()).unwrap_or_default())
        })
    };
    let index = std::fs::read(state.join("lower/preseed.json")).map(|b| preseed::digest::Digest::of(&b).to_string());
    let want = recorded["index"].as_str().unwrap_or("?");
    match (mounted_as(&content).as_deref(), index) {
        (Some("overlay"), Ok(found)) if found == want => say("overlay consistent"),
        (Some("overlay"), Ok(found)) => {
            say(format!("overlay inconsistent lower.json names {want}, the lower is {found}"))
        }
        (fs, _) => say(format!("overlay inconsistent content directory mounted as {fs:?}, lower.json exists")),
    }
}

/// Kubelet's first pod, offline: the sandbox, then a container of `image`
/// (its entrypoint), named and logged where kubelet would put them.
fn pod(socket: &Path, image: &str, boot_id: &str) -> anyhow::Result<()> {
    let uid = format!("preseed-vm-{boot_id}");
    let log_directory = PathBuf::from(format!("/var/log/pods/default_preseed-vm_{uid}"));
    let pod = cri::Pod {
        name: "preseed-vm",
        uid: &uid,
        log_directory: Some(&log_directory),
        container: Some(cri::Container { name: "hello", image, command: &[] }),
    };
    cri::run_pod(socket, &pod, |seen| match seen {
        cri::Seen::SandboxReady(t) => say(format!("sandbox ready ({:.2}s)", t.as_secs_f64())),
        cri::Seen::Exited(code, t) => say(format!("container exit={code} ({:.2}s)", t.as_secs_f64())),
        cri::Seen::Log(line) => say(format!("container-log {line}")),
    })
}
