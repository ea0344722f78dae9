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
//! * `PRESEED-VM: journal <line>`  the preseed-load and containerd journal of this boot
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
    for unit in ["containerd.service", "preseed-load.service"] {
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
    let journal = output(Command::new("journalctl").args([
        "-b",
        "-u",
        "preseed-load.service",
        "-u",
        "containerd.service",
        "-o",
        "short-monotonic",
        "--no-pager",
    ]));
    for line in journal.lines() {
        say(format!("journal {line}"));
    }
    say("done");
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
