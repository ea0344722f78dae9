//! The node side as it really runs: a Debian VM under qemu (TCG), systemd,
//! sid's containerd 2.x with bookworm's runc, the shipped
//! `dist/systemd/preseed-load.service` (what the .deb installs, used verbatim)
//! opening `/dev/disk/by-partlabel/preseed` on a second virtio disk, no
//! network device at all, and a stand-in for kubelet (`tests/vm/kubelet.service`
//! running `examples/cri_smoke.rs`, ordered after the load only by the
//! shipped unit's `Before=`/`RequiredBy=kubelet.service`) that starts the first
//! pod through the CRI and prints what it saw on the serial console as
//! `PRESEED-VM: …` lines. When the load fails, kubelet never starts; a
//! drop-in's `OnFailure=` starts `tests/vm/preseed-vm-report.service`, which
//! reports the same way.
//!
//! Both partitions are bundled with `--verity`, and each boot passes its
//! root hash on the kernel command line (`preseed.roothash=`): the shipped
//! verity drop-in (`dist/systemd/preseed-load.service.d/verity.conf`) makes the unit open the
//! partition through dm-verity (cryptsetup-bin's `veritysetup`, the cloud
//! kernel's dm-verity module).
//!
//! Four boots of one root disk (containerd's state carries over):
//! 1. partition v1 (pause, hello, tool): every image imported and pinned; the
//!    sandbox and hello start offline;
//! 2. the same partition again: metadata only (nothing imported or written);
//! 3. partition v2 (tool removed, tool2 added): tool2 imported and pinned,
//!    tool unpinned;
//! 4. partition v3 (tool3 added) with one byte of tool3's layer flipped after
//!    bundling: dm-verity fails tool3's reads, the load fails saying the
//!    partition is corrupt, tool3 gets no image record, the rest is there.
//!
//! Then two boots of a fresh root disk with containerd's content overlaid
//! (`preseed place --overlay` in containerd's `ExecStartPre=`, through
//! dm-verity, `tests/vm/containerd-overlay.conf`; the load reads place's
//! mount, `dist/systemd/preseed-load.service.d/overlay.conf`):
//! 5. partition v1: every image registered with nothing written, the pod
//!    starts from the partition's own blobs;
//! 6. partition v2 with v1 as the previous slot (`preseed-previous`): tool's
//!    blobs, only v1 has them, are copied from it; tool2 registered.
//!
//! Power cuts (`node_recovers_from_power_cuts_in_every_phase`): on fresh
//! root disks, with every disk `cache=directsync`, qemu is SIGKILLed a chosen
//! time after a phase's marker reaches the console — the first load, the
//! load of an update, a copying place, the first `place --overlay`, one
//! with `--previous`, a `settle` before an A/B swap — and the same disks
//! boot again with no step in between: every unit must succeed, the pod
//! start offline, every image be complete and pinned as the partition says,
//! and nothing of preseed's half-done work be left (leases, unfinished
//! writes, temp files, an overlay state that is not what is mounted). CI
//! runs one cut per phase; `cargo xtask vm-test --power-cuts N --seed S`
//! runs more, `--power-cut PHASE@FRACTION` replays one.
//!
//! The base root filesystem (mmdebstrap of bookworm + sid's containerd files
//! and config) is cached under `target/vm/root-<key>/`, keyed by a hash of
//! everything that goes into it; each run adds the freshly built `preseed`,
//! the CRI client and the units, and makes an ext4 image of it (`mkfs.ext4
//! -d`, no mount). `cargo xtask vm-test` installs the prerequisites and runs
//! this test alone.
#![cfg(feature = "containerd")]

mod support;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use support::cli::{self, ok, run};
use support::images::{self, LayerSpec, Media};
use support::registry::Registry;

const SANDBOX: &str = "preseed.local/pause:3.10";
const HELLO: &str = "preseed.local/hello:0.1";
const HELLO_LINE: &str = "Hello from preseed!";
const MARK: &str = "PRESEED-VM: ";
/// A boot that has not powered off by then has failed (TCG is slow: a boot
/// takes well under a minute on 2 cores).
/// `PRESEED_VM_BOOT_TIMEOUT` (seconds) overrides it.
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);

fn boot_timeout() -> Duration {
    std::env::var("PRESEED_VM_BOOT_TIMEOUT").ok().and_then(|s| s.parse().ok()).map_or(BOOT_TIMEOUT, Duration::from_secs)
}

/// Debian suite, variant and packages of the VM's base root filesystem.
const SUITE: &str = "bookworm";
const PACKAGES: &[&str] = &[
    "systemd",
    "systemd-sysv",
    "udev",
    "kmod",
    "runc",
    "linux-image-cloud-amd64",
    "initramfs-tools",
    "cryptsetup-bin",
];
/// Files in the base that have no use in a test VM (smaller, faster image).
const DPKG_EXCLUDES: &[&str] = &["/usr/share/man/*", "/usr/share/doc/*", "/usr/share/locale/*", "/usr/share/info/*"];

/// containerd 2.x (config version 3): the preseeded sandbox image, runc.
const CONTAINERD_CONFIG: &str = r#"version = 3

[plugins."io.containerd.cri.v1.images".pinned_images]
  sandbox = "preseed.local/pause:3.10"

[plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
"#;

/// Units that only slow a TCG boot down, or would wait on a console.
const MASKED: &[&str] = &[
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
    "getty@tty1.service",
    "serial-getty@ttyS0.service",
    "systemd-firstboot.service",
    "systemd-logind.service",
    "systemd-networkd-wait-online.service",
    "systemd-timesyncd.service",
];

/// Fixed files of the base root.
const FILES: &[(&str, &str)] = &[
    ("etc/fstab", "/dev/vda / ext4 rw,errors=remount-ro 0 1\n"),
    ("etc/hostname", "preseed-vm\n"),
    ("etc/hosts", "127.0.0.1 localhost\n127.0.1.1 preseed-vm\n"),
    // Set, so that this is not a "first boot" (no firstboot prompts).
    ("etc/machine-id", "5e5eed0000000000000000000000c0de\n"),
    // Journal on disk within a second: after a hung boot is killed, the test
    // reads it from the root disk.
    ("etc/systemd/journald.conf.d/vm-test.conf", "[Journal]\nStorage=persistent\nSyncIntervalSec=1s\n"),
];

/// Bumped when the base's build steps below change in a way the hashed
/// inputs do not show.
const BASE_RECIPE: &str = "1";

/// The stand-in kubelet, the reporter of a failed load, and the drop-in that
/// starts the reporter.
const KUBELET_UNIT: &str = include_str!("vm/kubelet.service");
const KUBELET_UNIT_NAME: &str = "kubelet.service";
const REPORT_UNIT: &str = include_str!("vm/preseed-vm-report.service");
const REPORT_UNIT_NAME: &str = "preseed-vm-report.service";
const LOAD_DROP_IN: &str = include_str!("vm/preseed-load-on-failure.conf");
/// containerd's drop-in for the overlay boots.
const OVERLAY_DROP_IN: &str = include_str!("vm/containerd-overlay.conf");
/// The power-cut test's phase markers and update agent.
const PHASE_LOAD: &str = include_str!("vm/phase-load.conf");
const PHASE_PLACE: &str = include_str!("vm/phase-place.conf");
const SETTLE_UNIT: &str = include_str!("vm/preseed-vm-settle.service");
const SETTLE_UNIT_NAME: &str = "preseed-vm-settle.service";

/// `target/`, from where cargo put the preseed binary (`target/debug/preseed`).
fn target_dir() -> PathBuf {
    cli::bin().parent().and_then(Path::parent).expect("binary under target/<profile>/").to_path_buf()
}

/// A unit or drop-in as shipped (`dist/systemd/`, what the .deb installs
/// and the node docs show), verbatim.
fn shipped_unit(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("dist/systemd").join(name);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Enables a unit the way `systemctl enable` does: a symlink per
/// `WantedBy=`/`RequiredBy=` of its `[Install]` section.
fn enable(root: &Path, name: &str, text: &str) {
    let mut in_install = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_install = line == "[Install]";
            continue;
        }
        let Some((key, value)) = line.split_once('=') else { continue };
        let suffix = match key.trim() {
            "WantedBy" if in_install => "wants",
            "RequiredBy" if in_install => "requires",
            _ => continue,
        };
        for target in value.split_whitespace() {
            let dir = root.join(format!("etc/systemd/system/{target}.{suffix}"));
            fs::create_dir_all(&dir).unwrap();
            let link = dir.join(name);
            let _ = fs::remove_file(&link);
            symlink(format!("/etc/systemd/system/{name}"), link).unwrap();
        }
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The containerd files and unit from sid's package.
struct ContainerdPkg {
    root: PathBuf,
    version: String,
}

fn containerd_pkg(target: &Path) -> Option<ContainerdPkg> {
    let root = target.join("debian/containerd-sid");
    match fs::read_to_string(root.join(".version")) {
        Ok(v) if root.join("usr/bin/containerd").is_file() => Some(ContainerdPkg { root, version: v.trim().into() }),
        _ => {
            let what = format!(
                "sid's containerd is not unpacked under {} (`cargo xtask vm-test` or `cargo xtask test` does it)",
                root.display()
            );
            assert!(!support::in_ci(), "CI=true and a prerequisite is missing: {what}");
            eprintln!("SKIPPED: {what}");
            None
        }
    }
}

/// The systemd unit the containerd package ships.
fn containerd_unit(pkg: &ContainerdPkg) -> PathBuf {
    ["lib/systemd/system/containerd.service", "usr/lib/systemd/system/containerd.service"]
        .iter()
        .map(|p| pkg.root.join(p))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("no containerd.service in {}", pkg.root.display()))
}

/// The Debian mirror mmdebstrap uses: `PRESEED_VM_MIRROR` (`cargo xtask
/// vm-test` sets the machine's own), else deb.debian.org.
fn mirror() -> String {
    std::env::var("PRESEED_VM_MIRROR").unwrap_or_else(|_| "http://deb.debian.org/debian".into())
}

/// The base root filesystem, built once per set of inputs.
fn base_root(target: &Path, pkg: &ContainerdPkg) -> PathBuf {
    let unit = fs::read(containerd_unit(pkg)).unwrap();
    // Not the mirror: any mirror of the suite gives the same base.
    let mut key = format!(
        "recipe {BASE_RECIPE}\nsuite {SUITE}\npackages {PACKAGES:?}\nexcludes {DPKG_EXCLUDES:?}\n\
         containerd {}\nconfig {CONTAINERD_CONFIG}\nmasked {MASKED:?}\nfiles {FILES:?}\n",
        pkg.version
    );
    key += &sha256_hex(&unit);
    let key = &sha256_hex(key.as_bytes())[..16];
    let vm = target.join("vm");
    let dir = vm.join(format!("root-{key}"));
    if dir.join(".complete").exists() {
        eprintln!("vm: base root {} (cached)", dir.display());
        return dir;
    }
    fs::create_dir_all(&vm).unwrap();
    let partial = vm.join(format!(".root-{key}.partial"));
    let _ = fs::remove_dir_all(&partial);
    let started = Instant::now();
    let mut cmd = Command::new("mmdebstrap");
    cmd.args(["--mode=root", "--variant=minbase", "--format=directory", "--quiet"])
        .arg(format!("--include={}", PACKAGES.join(",")));
    for x in DPKG_EXCLUDES {
        cmd.arg(format!("--dpkgopt=path-exclude={x}"));
    }
    cmd.arg(SUITE).arg(&partial).arg(mirror());
    run("mmdebstrap", &mut cmd);

    // sid's containerd: its binaries and unit, enabled, and our config.
    for entry in fs::read_dir(pkg.root.join("usr/bin")).unwrap() {
        let entry = entry.unwrap();
        fs::copy(entry.path(), partial.join("usr/bin").join(entry.file_name())).unwrap();
    }
    fs::write(partial.join("etc/systemd/system/containerd.service"), &unit).unwrap();
    enable(&partial, "containerd.service", &String::from_utf8_lossy(&unit));
    fs::create_dir_all(partial.join("etc/containerd")).unwrap();
    fs::write(partial.join("etc/containerd/config.toml"), CONTAINERD_CONFIG).unwrap();
    for unit in MASKED {
        let link = partial.join("etc/systemd/system").join(unit);
        let _ = fs::remove_file(&link);
        symlink("/dev/null", link).unwrap();
    }
    for (path, text) in FILES {
        let path = partial.join(path);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }
    fs::write(partial.join(".complete"), format!("{key}\n")).unwrap();
    fs::rename(&partial, &dir).unwrap();
    eprintln!("vm: built base root {} in {:.0}s", dir.display(), started.elapsed().as_secs_f64());
    // Bases built from other inputs are of no further use (300 MB each).
    for entry in fs::read_dir(&vm).unwrap().filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("root-") && entry.path() != dir {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
    dir
}

/// The one file matching `prefix*` in `dir` (the kernel, the initrd).
fn one_file(dir: &Path, prefix: &str) -> PathBuf {
    let mut found: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(prefix)))
        .collect();
    assert_eq!(found.len(), 1, "expected one {prefix}* in {}: {found:?}", dir.display());
    found.pop().unwrap()
}

/// How a node's containerd gets the partition's images.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Node {
    /// `preseed load` streams them (through dm-verity).
    Streamed,
    /// `preseed place` copies them into the store first (containerd's
    /// `ExecStartPre=`, the shipped drop-in), then the load registers them.
    Copying,
    /// `preseed place --overlay` mounts the partition under the store.
    Overlaid,
}

/// This run's root disk: the base (hard-linked, never modified) plus preseed,
/// the CRI client and the units. `markers` adds the power-cut test's phase
/// markers and its settle unit.
fn root_disk(base: &Path, work: &Path, cri_smoke: &Path, node: Node, name: &str, markers: bool) -> PathBuf {
    let stage = work.join(name);
    run("cp -al", Command::new("cp").arg("-al").arg(base).arg(&stage));
    let _ = fs::remove_file(stage.join(".complete"));
    // New files only (a hard-linked file written in place would change the cache).
    install_binary(cli::bin(), &stage.join("usr/bin/preseed"));
    install_binary(cri_smoke, &stage.join("usr/local/bin/cri_smoke"));
    let units = stage.join("etc/systemd/system");
    let load_unit = shipped_unit("preseed-load.service");
    fs::write(units.join("preseed-load.service"), &load_unit).unwrap();
    enable(&stage, "preseed-load.service", &load_unit);
    fs::write(units.join(KUBELET_UNIT_NAME), KUBELET_UNIT).unwrap();
    enable(&stage, KUBELET_UNIT_NAME, KUBELET_UNIT);
    fs::write(units.join(REPORT_UNIT_NAME), REPORT_UNIT).unwrap();
    fs::create_dir_all(units.join("preseed-load.service.d")).unwrap();
    fs::write(units.join("preseed-load.service.d/vm-test.conf"), LOAD_DROP_IN).unwrap();
    fs::write(units.join("preseed-load.service.d/verity.conf"), shipped_unit("preseed-load.service.d/verity.conf"))
        .unwrap();
    fs::create_dir_all(units.join("containerd.service.d")).unwrap();
    match node {
        Node::Streamed => {}
        Node::Copying => {
            let drop_in = shipped_unit("containerd.service.d/10-preseed-place.conf");
            fs::write(units.join("containerd.service.d/10-preseed-place.conf"), drop_in).unwrap();
        }
        Node::Overlaid => {
            fs::write(units.join("containerd.service.d/vm-overlay.conf"), OVERLAY_DROP_IN).unwrap();
            // The load reads place's (verified) mount instead.
            fs::remove_file(units.join("preseed-load.service.d/verity.conf")).unwrap();
            let drop_in = shipped_unit("preseed-load.service.d/overlay.conf");
            fs::write(units.join("preseed-load.service.d/overlay.conf"), drop_in).unwrap();
        }
    }
    if markers {
        fs::write(units.join("preseed-load.service.d/00-vm-phase.conf"), PHASE_LOAD).unwrap();
        fs::write(units.join("containerd.service.d/00-vm-phase.conf"), PHASE_PLACE).unwrap();
        fs::write(units.join(SETTLE_UNIT_NAME), SETTLE_UNIT).unwrap();
        enable(&stage, SETTLE_UNIT_NAME, SETTLE_UNIT);
    }
    let disk = work.join(format!("{name}.ext4"));
    run("mkfs.ext4", Command::new("mkfs.ext4").args(["-q", "-F", "-L", "root", "-d"]).arg(&stage).arg(&disk).arg("4G"));
    run("rm -r", Command::new("rm").arg("-rf").arg(&stage));
    disk
}

/// Copies a binary without its debug info (a debug build of preseed is
/// 200 MB, stripped 20).
fn install_binary(from: &Path, to: &Path) {
    let stripped = Command::new("strip").arg("--strip-debug").arg("-o").arg(to).arg(from).status();
    if !stripped.is_ok_and(|s| s.success()) {
        fs::copy(from, to).unwrap();
    }
}

/// A raw disk with a GPT whose one partition, labelled `preseed`, holds the
/// partition image.
fn preseed_disk(image: &Path, disk: &Path, label: &str) {
    const SECTOR: u64 = 512;
    const START: u64 = 2048;
    let len = fs::metadata(image).unwrap().len();
    let sectors = len.div_ceil(SECTOR).div_ceil(2048) * 2048;
    // Room for the backup GPT at the end.
    let total = (START + sectors + 2048) * SECTOR;
    fs::File::create(disk).unwrap().set_len(total).unwrap();
    let script = format!(
        "label: gpt\nstart={START}, size={sectors}, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=\"{label}\"\n"
    );
    let mut sfdisk = Command::new("sfdisk")
        .args(["--quiet", "--no-reread", "--no-tell-kernel"])
        .arg(disk)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    sfdisk.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
    ok("sfdisk", &sfdisk.wait_with_output().unwrap());
    let mut out = fs::OpenOptions::new().write(true).open(disk).unwrap();
    out.seek(SeekFrom::Start(START * SECTOR)).unwrap();
    std::io::copy(&mut fs::File::open(image).unwrap(), &mut out).unwrap();
}

/// What one boot printed.
struct Boot {
    /// Every `PRESEED-VM:` line, without the mark.
    facts: Vec<String>,
    /// The whole serial console.
    console: String,
    wall: Duration,
    /// The VM powered off after the stand-in's `done`.
    finished: bool,
}

impl Boot {
    fn lines<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.facts.iter().filter_map(move |f| f.strip_prefix(kind).and_then(|r| r.strip_prefix(' ')))
    }

    fn has(&self, fact: &str) -> bool {
        self.facts.iter().any(|f| f == fact || f.starts_with(&format!("{fact} ")))
    }

    /// CRI image names → pinned.
    fn images(&self) -> BTreeMap<String, bool> {
        self.lines("image")
            .filter_map(|l| l.rsplit_once(" pinned=").map(|(name, p)| (name.to_string(), p.trim() == "true")))
            .collect()
    }

    /// The loader's summary line from its journal.
    fn load_summary(&self) -> Option<&str> {
        self.lines("load-log").find(|l| l.starts_with("preseed load: "))
    }

    /// The loader's own time (`written in X.XXs`).
    fn load_secs(&self) -> Option<f64> {
        let s = self.load_summary()?;
        let rest = &s[s.find(" written in ")? + " written in ".len()..];
        rest[..rest.find('s')?].parse().ok()
    }

    /// The preseed-load and containerd journal, and the console's tail.
    fn diagnostics(&self) -> String {
        let mut out = String::new();
        let journal: Vec<&str> = self.lines("journal").collect();
        if journal.is_empty() {
            out += "(no journal lines from the VM)\n";
        } else {
            out += "--- journal of preseed-load.service and containerd.service in the VM ---\n";
            for l in journal {
                let _ = writeln!(out, "{l}");
            }
        }
        out += "--- serial console (last 150 lines) ---\n";
        let lines: Vec<&str> = self.console.lines().filter(|l| !l.contains("PRESEED-VM: journal ")).collect();
        for l in &lines[lines.len().saturating_sub(150)..] {
            let _ = writeln!(out, "{l}");
        }
        out
    }
}

/// How one boot's VM is put together.
struct Machine<'a> {
    root: &'a Path,
    /// The partition disk (labelled `preseed`) and its root hash.
    preseed: &'a (PathBuf, String),
    /// More partition disks, read-only (`preseed-previous`, `preseed-next`).
    extra: Vec<&'a Path>,
    /// qemu's cache mode for every disk.
    cache: &'static str,
    /// More kernel command line.
    cmdline: &'a str,
    /// Cut the power (SIGKILL qemu) this long after `PRESEED-VM: phase
    /// <marker>` reaches the console.
    cut: Option<(&'a str, Duration)>,
}

/// Where a power cut landed.
struct Cut {
    /// The phase marker was seen (else the VM ran to its end).
    seen: bool,
    /// Time from the marker to the kill.
    after: Duration,
}

/// Boots the VM once and collects what the stand-in printed.
/// `previous`: a second partition disk (the A/B pair's previous slot).
fn boot(
    work: &Path,
    name: &str,
    kernel: &Path,
    initrd: &Path,
    root: &Path,
    preseed: &(PathBuf, String),
    previous: Option<&Path>,
) -> Boot {
    let m =
        Machine { root, preseed, extra: previous.into_iter().collect(), cache: "writeback", cmdline: "", cut: None };
    boot_with(work, name, kernel, initrd, &m).0
}

fn boot_with(work: &Path, name: &str, kernel: &Path, initrd: &Path, m: &Machine) -> (Boot, Option<Cut>) {
    let (preseed, root_hash) = m.preseed;
    let console_path = work.join(format!("{name}.console"));
    let console = fs::File::create(&console_path).unwrap();
    let started = Instant::now();
    let drive =
        |path: &Path, extra: &str| format!("file={},if=virtio,format=raw,cache={}{extra}", path.display(), m.cache);
    let mut qemu = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-m", "1024", "-smp", "2", "-nographic", "-nic", "none", "-no-reboot"])
        // Entropy from the start: qemu's default CPU has no RDRAND, and the
        // guest's getrandom() then waits on jitter entropy, which under TCG
        // on a busy host stalled udev for minutes (a soft lockup, seen once
        // in the long power-cut run). `max` has RDRAND, which the kernel
        // trusts (RANDOM_TRUST_CPU); virtio-rng feeds it after that.
        .args(["-cpu", "max", "-device", "virtio-rng-pci"])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(format!(
            "console=ttyS0 root=/dev/vda rw panic=1 systemd.show_status=0 systemd.journald.forward_to_console=0 \
             preseed.roothash={root_hash} {}",
            m.cmdline
        ))
        .arg("-drive")
        .arg(drive(m.root, ""))
        .arg("-drive")
        .arg(drive(preseed, ""))
        .args(m.extra.iter().flat_map(|p| ["-drive".to_string(), drive(p, ",readonly=on")]))
        .stdin(Stdio::null())
        .stdout(console.try_clone().unwrap())
        .stderr(console)
        .spawn()
        .expect("start qemu-system-x86_64");
    let marker = m.cut.map(|(phase, _)| format!("{MARK}phase {phase}"));
    let mut seen_at = None;
    let mut cut = None;
    let finished = loop {
        if let Some(status) = qemu.try_wait().unwrap() {
            eprintln!("vm: {name}: qemu exited ({status}) after {:.0}s", started.elapsed().as_secs_f64());
            break true;
        }
        if let (Some(marker), Some((_, delay))) = (&marker, m.cut) {
            if seen_at.is_none() && fs::read_to_string(&console_path).is_ok_and(|c| c.contains(marker.as_str())) {
                seen_at = Some(Instant::now());
            }
            if let Some(at) = seen_at.filter(|at| at.elapsed() >= delay) {
                // The power cut: no shutdown, whatever the guest had not
                // written to its disks is gone.
                let _ = qemu.kill();
                let _ = qemu.wait();
                cut = Some(Cut { seen: true, after: at.elapsed() });
                eprintln!("vm: {name}: power cut {:.2}s after `{marker}`", at.elapsed().as_secs_f64());
                break false;
            }
        }
        if started.elapsed() > boot_timeout() {
            let _ = qemu.kill();
            let _ = qemu.wait();
            eprintln!("vm: {name}: no poweroff within {}s, qemu killed", boot_timeout().as_secs());
            break false;
        }
        std::thread::sleep(Duration::from_millis(if marker.is_some() { 20 } else { 250 }));
    };
    if m.cut.is_some() && cut.is_none() {
        cut = Some(Cut { seen: false, after: Duration::ZERO });
    }
    let wall = started.elapsed();
    let console = String::from_utf8_lossy(&fs::read(&console_path).unwrap()).into_owned();
    // A fact may share its console line with kernel output before it.
    let facts: Vec<String> = console
        .lines()
        .filter_map(|l| l.find(MARK).map(|i| l[i + MARK.len()..].trim_end_matches('\r').to_string()))
        .collect();
    let done = facts.iter().any(|f| f == "done");
    (Boot { facts, console, wall, finished: finished && done }, cut)
}

/// The journal of the last boot read from the root disk on the host (when
/// the VM never got to print it): replay the ext4 journal of the killed VM's
/// disk (what its next mount would do), `debugfs rdump` of
/// `/var/log/journal`, then `journalctl -D`.
fn host_journal(root: &Path, dir: &Path) -> String {
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir).unwrap();
    let _ = Command::new("e2fsck").args(["-E", "journal_only", "-y"]).arg(root).stdin(Stdio::null()).output();
    let dumped = Command::new("debugfs")
        .arg("-R")
        .arg(format!("rdump /var/log/journal {}", dir.display()))
        .arg(root)
        .stdin(Stdio::null())
        .output();
    if !dumped.is_ok_and(|o| o.status.success()) {
        return "(could not read the journal from the root disk with debugfs)\n".into();
    }
    let out = Command::new("journalctl")
        .arg("-D")
        .arg(dir.join("journal"))
        .args(["-b", "-u", "preseed-load.service", "-u", "containerd.service", "-u", KUBELET_UNIT_NAME])
        .args(["-u", REPORT_UNIT_NAME])
        .args(["-o", "short-monotonic", "--no-pager"])
        .stdin(Stdio::null())
        .output();
    match out {
        Ok(o) if o.status.success() => {
            format!("--- journal of the last boot, read from the root disk ---\n{}", String::from_utf8_lossy(&o.stdout))
        }
        Ok(o) => format!("(journalctl -D failed: {})\n", String::from_utf8_lossy(&o.stderr).trim()),
        Err(e) => format!("(no journalctl on the host: {e})\n"),
    }
}

/// The partition disks: v1 (pause, hello, tool) and v2 (pause, hello,
/// tool2), bundled with `--verity`, each with its root hash.
/// v3 (pause, hello, tool3) has one byte of tool3's layer flipped after
/// the tree was computed.
fn partitions(work: &Path) -> Option<[(PathBuf, String); 3]> {
    let workspace = env!("CARGO_MANIFEST_DIR");
    let reg = Registry::start()?;
    // tool is a background image (not `boot`), big enough that boot1's
    // loader is still importing it when kubelet's stand-in starts.
    let tool = images::push_image(&reg, "team/tool", "1.0", &[LayerSpec::new(1101, 4, 8 << 20)], Media::Oci);
    let tool2 = images::push_image(&reg, "team/tool2", "1.0", &[LayerSpec::new(1102, 3, 64 << 10)], Media::Oci);
    let tool3 = images::push_image(&reg, "team/tool3", "1.0", &[LayerSpec::new(1103, 3, 64 << 10)], Media::Oci);
    let host = reg.host();
    let base = fs::read_to_string(Path::new(workspace).join("bundles.toml")).unwrap();
    let mut out = Vec::new();
    for (version, (repo, pushed, name)) in [
        ("v1", ("team/tool", &tool, "registry.local/tool:1.0")),
        ("v2", ("team/tool2", &tool2, "registry.local/tool2:1.0")),
        ("v3", ("team/tool3", &tool3, "registry.local/tool3:1.0")),
    ] {
        let manifest = format!(
            "{base}\n[registries.\"{host}\"]\ninsecure = true\n\n[[image]]\nref = \"{host}/{repo}:1.0@{}\"\nnames = [\"{name}\"]\n",
            pushed.manifest_digest
        );
        let dir = work.join(version);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("bundles.toml"), manifest).unwrap();
        run(
            &format!("preseed bundle ({version})"),
            cli::command()
                .args(["bundle", "--no-progress", "--verity", "--manifest"])
                .arg(dir.join("bundles.toml"))
                .args(["--workspace", workspace, "--out"])
                .arg(dir.join("out"))
                .arg("--cache")
                .arg(work.join("cache")),
        );
        let image = dir.join("out/preseed.erofs");
        if version == "v3" {
            let layer = &pushed.layer_digests[0];
            let hex = layer.strip_prefix("sha256:").unwrap_or(layer);
            corrupt(&image, &fs::read(work.join("cache/blobs/sha256").join(hex)).unwrap());
        }
        let disk = work.join(format!("preseed-{version}.img"));
        preseed_disk(&image, &disk, "preseed");
        let root_hash = fs::read_to_string(dir.join("out/preseed.roothash")).unwrap().trim().to_string();
        out.push((disk, root_hash));
    }
    out.try_into().ok()
}

/// Flips one byte of `blob` where it is stored in `image`.
fn corrupt(image: &Path, blob: &[u8]) {
    let bytes = fs::read(image).unwrap();
    let needle = &blob[blob.len() / 2..blob.len() / 2 + 64];
    let at = bytes.windows(needle.len()).position(|w| w == needle).expect("the layer's bytes are in the image") + 7;
    let mut changed = bytes;
    changed[at] ^= 0x20;
    fs::write(image, changed).unwrap();
}

/// Builds the stand-in kubelet's CRI client (`examples/cri_smoke.rs`) with
/// the profile the test runs in.
fn cri_smoke(target: &Path) -> PathBuf {
    let profile_dir = cli::bin().parent().unwrap().to_path_buf();
    let release = profile_dir.file_name().is_some_and(|n| n == "release");
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["build", "--quiet", "--example", "cri_smoke", "--target-dir"])
        .arg(target);
    if release {
        cmd.arg("--release");
    }
    run("cargo build --example cri_smoke", &mut cmd);
    profile_dir.join("examples/cri_smoke")
}

/// One boot's verdict: a short outcome for the summary line, or what broke.
type Verdict = Result<String, String>;
/// Judges one boot's facts.
type Judge = fn(&Boot) -> Verdict;

/// One boot of the plan: its root disk, its preseed partition (image and
/// root hash), the previous partition it may be given, and its judge.
struct Step<'a> {
    name: &'a str,
    root: &'a Path,
    disk: &'a (PathBuf, String),
    previous: Option<&'a Path>,
    judge: Judge,
}

/// The checks every boot makes; false when the stand-in never finished (then
/// nothing else is worth checking).
fn judge_common(b: &Boot, problems: &mut Vec<String>) -> bool {
    if !b.finished {
        problems.push("the stand-in kubelet never reported (no `done` before poweroff)".into());
        return false;
    }
    if !b.has("as kubelet.service") {
        problems.push(format!("kubelet.service did not run; {:?} reported instead", b.lines("as").collect::<Vec<_>>()));
    }
    let net: Vec<&str> = b.lines("net").collect();
    if net != ["lo"] {
        problems.push(format!("the VM should have no network interface but lo: {net:?}"));
    }
    if !b.has("unit preseed-load.service active success") {
        problems.push(format!(
            "preseed-load.service did not succeed: {:?}",
            b.lines("unit").find(|l| l.starts_with("preseed-load.service"))
        ));
    }
    if !b.has("sandbox ready") {
        problems.push("the pod sandbox did not start".into());
    }
    if !b.has("container exit=0") {
        problems.push(format!("hello did not exit 0: {:?}", b.lines("container").collect::<Vec<_>>()));
    }
    if !b.lines("container-log").any(|l| l.contains(HELLO_LINE)) {
        problems.push(format!("hello's log lacks {HELLO_LINE:?}"));
    }
    for e in b.lines("error") {
        problems.push(format!("stand-in kubelet: {e}"));
    }
    true
}

fn expect_pinned(b: &Boot, names: &[&str], pinned: bool, problems: &mut Vec<String>) {
    let images = b.images();
    for n in names {
        match images.get(*n) {
            Some(p) if *p == pinned => {}
            Some(p) => problems.push(format!("{n} is pinned={p}, expected pinned={pinned}")),
            None => problems.push(format!("{n} not in CRI's image list {images:?}")),
        }
    }
}

fn verdict(b: &Boot, problems: Vec<String>, ok: String) -> Verdict {
    if problems.is_empty() {
        Ok(ok)
    } else {
        Err(format!("{}\n{}", problems.join("\n"), b.diagnostics()))
    }
}

const V1: &[&str] = &[SANDBOX, HELLO, "registry.local/tool:1.0"];

fn judge_boot1(b: &Boot) -> Verdict {
    let mut problems = Vec::new();
    if !judge_common(b, &mut problems) {
        return verdict(b, problems, String::new());
    }
    let summary = b.load_summary().unwrap_or("(none)");
    if !summary.contains("3 images: 3 imported, 0 updated, 0 already present, 0 failed") {
        problems.push(format!("cold load summary: {summary}"));
    }
    expect_pinned(b, V1, true, &mut problems);
    // Type=notify: kubelet is released at READY (pause and hello in), while
    // the loader still imports tool.
    if !b.has("load-at-start running") {
        problems.push(format!(
            "kubelet's stand-in should start while the load still imports background images: {:?}",
            b.lines("load-at-start").collect::<Vec<_>>()
        ));
    }
    let secs = b.load_secs().unwrap_or(f64::NAN);
    verdict(
        b,
        problems,
        format!(
            "boot1 ok in {:.0}s (cold load {secs:.2}s, 3 imported; kubelet started before it ended)",
            b.wall.as_secs_f64()
        ),
    )
}

fn judge_boot2(b: &Boot) -> Verdict {
    let mut problems = Vec::new();
    if !judge_common(b, &mut problems) {
        return verdict(b, problems, String::new());
    }
    let summary = b.load_summary().unwrap_or("(none)");
    if !summary.contains("3 images: 0 imported, 0 updated, 3 already present, 0 failed; 0 B written") {
        problems.push(format!("warm load did more than check metadata: {summary}"));
    }
    expect_pinned(b, V1, true, &mut problems);
    let secs = b.load_secs().unwrap_or(f64::NAN);
    verdict(b, problems, format!("boot2 ok in {:.0}s (warm load {secs:.2}s, metadata only)", b.wall.as_secs_f64()))
}

fn judge_boot3(b: &Boot) -> Verdict {
    let mut problems = Vec::new();
    if !judge_common(b, &mut problems) {
        return verdict(b, problems, String::new());
    }
    let summary = b.load_summary().unwrap_or("(none)");
    if !summary.contains("3 images: 1 imported, 0 updated, 2 already present, 0 failed") {
        problems.push(format!("load of the newer partition: {summary}"));
    }
    expect_pinned(b, &[SANDBOX, HELLO, "registry.local/tool2:1.0"], true, &mut problems);
    // Still there (nothing deletes it), no longer pinned: image GC may take it.
    expect_pinned(b, &["registry.local/tool:1.0"], false, &mut problems);
    // The loader reports each name it unpinned: tool's two, nothing else.
    let unpinned: Vec<&str> = b.lines("load-log").filter(|l| l.starts_with("unpinned ")).collect();
    if unpinned.len() != 2 || !unpinned.iter().all(|l| l.contains("/tool:1.0 ")) {
        problems.push(format!("the loader should have unpinned tool's two names, and only them: {unpinned:?}"));
    }
    let secs = b.load_secs().unwrap_or(f64::NAN);
    verdict(b, problems, format!("boot3 ok in {:.0}s (load {secs:.2}s, 1 added, 1 unpinned)", b.wall.as_secs_f64()))
}

fn judge_boot4(b: &Boot) -> Verdict {
    let mut problems = Vec::new();
    if !b.finished {
        problems.push("the failure reporter never reported (no `done` before poweroff)".into());
        return verdict(b, problems, String::new());
    }
    if !b.has("unit preseed-load.service failed") {
        problems.push(format!(
            "preseed-load.service should have failed: {:?}",
            b.lines("unit").find(|l| l.starts_with("preseed-load.service"))
        ));
    }
    let summary = b.load_summary().unwrap_or("(none)");
    if !summary.contains("3 images: 0 imported, 0 updated, 2 already present, 1 failed") {
        problems.push(format!("load of the corrupted partition: {summary}"));
    }
    if !b.lines("load-log").any(|l| l.contains("tool3") && l.contains("partition is corrupt")) {
        problems.push("no load-log line says tool3's partition blocks are corrupt".into());
    }
    if b.images().contains_key("registry.local/tool3:1.0") {
        problems.push("the corrupt tool3 has an image record".into());
    }
    expect_pinned(b, &[SANDBOX, HELLO], true, &mut problems);
    verdict(b, problems, format!("boot4 ok in {:.0}s (corrupt tool3 refused, others present)", b.wall.as_secs_f64()))
}

/// `preseed place`'s summary line (in containerd's journal: it runs as its
/// `ExecStartPre=`).
fn place_summary(b: &Boot) -> Option<&str> {
    b.lines("journal").find_map(|l| l.find("preseed place: ").map(|i| &l[i..]))
}

fn judge_overlay_boot1(b: &Boot) -> Verdict {
    let mut problems = Vec::new();
    if !judge_common(b, &mut problems) {
        return verdict(b, problems, String::new());
    }
    let place = place_summary(b).unwrap_or("(none)");
    if !(place.contains(" overlaid on /var/lib/containerd ")
        && place.contains("none copied; 0 kept")
        && place.contains(" 0 damaged"))
    {
        problems.push(format!("place --overlay: {place}"));
    }
    let summary = b.load_summary().unwrap_or("(none)");
    if !summary.contains("3 images: 3 imported, 0 updated, 0 already present, 0 failed; 0 B written") {
        problems.push(format!("the load should only register the overlaid blobs: {summary}"));
    }
    expect_pinned(b, V1, true, &mut problems);
    verdict(b, problems, format!("overlay boot1 ok in {:.0}s (nothing copied, nothing written)", b.wall.as_secs_f64()))
}

fn judge_overlay_boot2(b: &Boot) -> Verdict {
    let mut problems = Vec::new();
    if !judge_common(b, &mut problems) {
        return verdict(b, problems, String::new());
    }
    let place = place_summary(b).unwrap_or("(none)");
    let kept = place
        .split("none copied; ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or(0);
    // tool's manifest, config and layer are only in v1.
    if kept < 3 || !place.contains(" 0 lost, 0 damaged") {
        problems.push(format!("place --overlay should keep tool's blobs from the previous slot: {place}"));
    }
    let summary = b.load_summary().unwrap_or("(none)");
    if !summary.contains("3 images: 1 imported, 0 updated, 2 already present, 0 failed; 0 B written") {
        problems.push(format!("load of the newer partition: {summary}"));
    }
    expect_pinned(b, &[SANDBOX, HELLO, "registry.local/tool2:1.0"], true, &mut problems);
    expect_pinned(b, &["registry.local/tool:1.0"], false, &mut problems);
    verdict(
        b,
        problems,
        format!("overlay boot2 ok in {:.0}s ({kept} blobs kept from the previous slot)", b.wall.as_secs_f64()),
    )
}

/// What every VM test needs first: root, its tools, sid's containerd — and
/// the machine to itself (one VM at a time).
fn vm_setup() -> Option<(std::sync::MutexGuard<'static, ()>, PathBuf, ContainerdPkg)> {
    if !support::require_root() {
        return None;
    }
    for tool in ["mmdebstrap", "qemu-system-x86_64", "sfdisk", "mkfs.ext4", "cp"] {
        support::require_tool(tool)?;
    }
    let one = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    let target = target_dir();
    let pkg = containerd_pkg(&target)?;
    Some((one, target, pkg))
}

#[test]
fn node_boots_from_the_preseed_partition_streamed_and_overlaid() {
    let Some((_one, target, pkg)) = vm_setup() else { return };
    let started = Instant::now();
    let base = base_root(&target, &pkg);
    let base_secs = started.elapsed().as_secs_f64();
    // The last run stays for a look after a failure (consoles, disks).
    let work = target.join("vm/last-run");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work).unwrap();
    let smoke = cri_smoke(&target);
    let Some([v1, v2, v3]) = partitions(&work) else { return };
    let root = root_disk(&base, &work, &smoke, Node::Streamed, "root", false);
    let kernel = one_file(&base.join("boot"), "vmlinuz-");
    let initrd = one_file(&base.join("boot"), "initrd.img-");
    eprintln!("vm: base root {base_secs:.0}s, run prepared in {:.0}s", started.elapsed().as_secs_f64() - base_secs);

    // Then a fresh node whose containerd content is overlaid, on an A/B pair.
    let overlaid = root_disk(&base, &work, &smoke, Node::Overlaid, "root-overlay", false);
    let previous = work.join("preseed-previous-v1.img");
    preseed_disk(&work.join("v1/out/preseed.erofs"), &previous, "preseed-previous");
    let step = |name, root, disk, previous, judge| Step { name, root, disk, previous, judge };
    let plan = [
        step("boot1", &root, &v1, None, judge_boot1),
        step("boot2", &root, &v1, None, judge_boot2),
        step("boot3", &root, &v2, None, judge_boot3),
        step("boot4", &root, &v3, None, judge_boot4),
        step("overlay-boot1", &overlaid, &v1, None, judge_overlay_boot1),
        step("overlay-boot2", &overlaid, &v2, Some(&previous), judge_overlay_boot2),
    ];
    let mut outcomes = Vec::new();
    let mut failure = None;
    for Step { name, root, disk, previous, judge } in plan {
        if failure.is_some() {
            outcomes.push(format!("{name} not run"));
            continue;
        }
        let b = boot(&work, name, &kernel, &initrd, root, disk, previous);
        match judge(&b) {
            Ok(outcome) => outcomes.push(outcome),
            Err(mut why) => {
                if b.lines("journal").next().is_none() {
                    why += &host_journal(root, &work.join(format!("{name}.journal")));
                }
                let _ = write!(why, "(consoles and disks of this run: {})", work.display());
                outcomes.push(format!("{name} FAILED"));
                failure = Some(format!("{name}: {why}"));
            }
        }
    }
    println!("vm: {} (total {:.0}s)", outcomes.join(" · "), started.elapsed().as_secs_f64());
    if let Some(f) = failure {
        panic!("{f}");
    }
}

/// One VM at a time: two TCG guests on two cores would each time out.
static ONE_VM: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A phase of a node's life a power cut can land in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// The first load of a partition (streamed, mid-import of the big layer).
    LoadCold,
    /// The load of an updated partition (new image, pins, unpinning).
    LoadUpdate,
    /// A copying `preseed place` before containerd starts.
    Place,
    /// `place --overlay` on a root that never had one (hashing, moving
    /// containerd's content to the upper layer, the mount, the state).
    OverlayFirst,
    /// `place --overlay` with a new partition and `--previous` (copies, whiteouts, state).
    OverlayUpdate,
    /// `preseed settle` before an A/B swap, then the swap.
    Settle,
}

const PHASES: [Phase; 6] =
    [Phase::LoadCold, Phase::LoadUpdate, Phase::Place, Phase::OverlayFirst, Phase::OverlayUpdate, Phase::Settle];

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::LoadCold => "load-cold",
            Phase::LoadUpdate => "load-update",
            Phase::Place => "place",
            Phase::OverlayFirst => "overlay-first",
            Phase::OverlayUpdate => "overlay-update",
            Phase::Settle => "settle",
        }
    }

    /// The console marker its cut counts from.
    fn marker(self) -> &'static str {
        match self {
            Phase::LoadCold | Phase::LoadUpdate => "load",
            Phase::Place | Phase::OverlayFirst | Phase::OverlayUpdate => "place",
            Phase::Settle => "settle",
        }
    }

    /// About how long the phase takes under TCG on two cores (measured
    /// from the boot test's journals): a cut lands at a fraction of it.
    fn span(self) -> Duration {
        Duration::from_millis(match self {
            Phase::LoadCold => 6500,
            Phase::LoadUpdate => 3000,
            Phase::Place => 4000,
            Phase::OverlayFirst => 2000,
            Phase::OverlayUpdate => 3000,
            Phase::Settle => 2000,
        })
    }
}

/// One power cut: a phase, and how far into it (`0.0..1.0` of its span).
/// Written `phase@fraction`, e.g. `load-cold@0.437`.
#[derive(Clone, Copy, Debug)]
struct CutSpec {
    phase: Phase,
    fraction: f64,
}

impl std::fmt::Display for CutSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{:.3}", self.phase.name(), self.fraction)
    }
}

impl std::str::FromStr for CutSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, fraction) = s.split_once('@').ok_or_else(|| format!("{s:?}: expected phase@fraction"))?;
        let phase = PHASES.into_iter().find(|p| p.name() == name).ok_or_else(|| format!("{s:?}: unknown phase"))?;
        let fraction: f64 = fraction.parse().map_err(|_| format!("{s:?}: bad fraction"))?;
        Ok(CutSpec { phase, fraction: fraction.clamp(0.0, 1.0) })
    }
}

/// splitmix64: a seed to a well spread number, so that a run's cuts are
/// reproducible from its seed alone.
fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The cuts to make: `PRESEED_VM_POWER_CUT` (specs, comma-separated, to
/// replay), else `PRESEED_VM_POWER_CUTS` cuts spread over the phases from
/// `PRESEED_VM_SEED`, else CI's fixed set (one cut per phase).
fn cut_specs() -> Vec<CutSpec> {
    if let Ok(list) = std::env::var("PRESEED_VM_POWER_CUT") {
        return list
            .split(',')
            .map(|s| s.trim().parse().unwrap_or_else(|e| panic!("PRESEED_VM_POWER_CUT: {e}")))
            .collect();
    }
    match std::env::var("PRESEED_VM_POWER_CUTS").ok().and_then(|n| n.parse::<usize>().ok()) {
        Some(n) => {
            let seed: u64 = std::env::var("PRESEED_VM_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
            (0..n)
                .map(|k| {
                    let r = splitmix(seed.wrapping_mul(1000).wrapping_add(k as u64));
                    CutSpec { phase: PHASES[k % PHASES.len()], fraction: (r >> 11) as f64 / (1u64 << 53) as f64 }
                })
                .collect()
        }
        None => [0.4, 0.7, 0.5, 0.5, 0.6, 0.5]
            .into_iter()
            .zip(PHASES)
            .map(|(fraction, phase)| CutSpec { phase, fraction })
            .collect(),
    }
}

/// What a node must show after it came back: the images (pinned, unpinned,
/// complete), and which of preseed's parts it runs.
struct Expect<'a> {
    pinned: &'a [&'a str],
    unpinned: &'a [&'a str],
    /// Complete in containerd (`ctr images check`): the pinned ones and
    /// those the partition dropped but nothing deleted.
    complete: &'a [&'a str],
    overlay: bool,
    settle: bool,
}

const V2: &[&str] = &[SANDBOX, HELLO, "registry.local/tool2:1.0"];
const TOOL: &str = "registry.local/tool:1.0";
const TOOL2: &str = "registry.local/tool2:1.0";

/// A boot after a power cut, judged: every unit succeeded with no human
/// step, the first pod started offline, every image is there, complete and
/// pinned as the partition says, and nothing of preseed's half-done work is
/// left (no lease, no unfinished write, no temp file, an overlay state that
/// names what is mounted).
fn judge_recovered(b: &Boot, e: &Expect) -> Verdict {
    let mut problems = Vec::new();
    if !judge_common(b, &mut problems) {
        return verdict(b, problems, String::new());
    }
    expect_pinned(b, e.pinned, true, &mut problems);
    expect_pinned(b, e.unpinned, false, &mut problems);
    let checks: BTreeMap<&str, &str> = b.lines("check").filter_map(|l| l.split_once(' ')).collect();
    for name in e.complete.iter().chain(e.pinned) {
        match checks.get(name) {
            Some(&"complete") => {}
            other => problems.push(format!("{name} is not complete in containerd: {other:?}")),
        }
    }
    for l in b.lines("lease").filter(|l| l.contains(" preseed")) {
        problems.push(format!("a lease of preseed's is left: {l}"));
    }
    for l in b.lines("ingest").filter(|l| l.contains(" preseed")) {
        problems.push(format!("an unfinished write of preseed's is left: {l}"));
    }
    for l in b.lines("temp") {
        problems.push(format!("a temp file of preseed's is left: {l}"));
    }
    let overlay: Vec<&str> = b.lines("overlay").collect();
    let want = if e.overlay { "consistent" } else { "none" };
    if overlay != [want] {
        problems.push(format!("overlay state: {overlay:?}, expected {want:?}"));
    }
    if e.settle && !b.has("unit preseed-vm-settle.service active success") {
        problems.push(format!(
            "preseed settle did not succeed: {:?}",
            b.lines("unit").find(|l| l.starts_with("preseed-vm-settle.service"))
        ));
    }
    verdict(b, problems, format!("recovered in {:.0}s", b.wall.as_secs_f64()))
}

/// The VM pieces every power cut uses.
struct Lab<'a> {
    work: &'a Path,
    base: &'a Path,
    smoke: &'a Path,
    kernel: PathBuf,
    initrd: PathBuf,
    v1: &'a (PathBuf, String),
    v2: &'a (PathBuf, String),
    previous_v1: &'a Path,
    next_v1: &'a Path,
}

/// One step of a chain: boot with `m`, cutting the power per `spec` if
/// given (then booting again, uncut, to judge the recovery); `expect` is
/// what the uncut boot must show.
fn step(
    lab: &Lab,
    name: &str,
    m: Machine,
    spec: Option<CutSpec>,
    expect: &Expect,
    out: &mut Vec<(String, Verdict)>,
) -> bool {
    let cut_result = spec.map(|spec| {
        let cut_m =
            Machine { cut: Some((spec.phase.marker(), spec.phase.span().mul_f64(spec.fraction))), ..m.clone_shallow() };
        let (b, cut) = boot_with(lab.work, &format!("{name}-cut"), &lab.kernel, &lab.initrd, &cut_m);
        (spec, b, cut)
    });
    let (b, _) = boot_with(lab.work, name, &lab.kernel, &lab.initrd, &m);
    let mut verdict = judge_recovered(&b, expect);
    if let Some((spec, cut_boot, cut)) = cut_result {
        match cut {
            Some(Cut { seen: true, after }) => {
                verdict = verdict
                    .map(|ok| format!("{spec}: cut {:.2}s into `{}`, {ok}", after.as_secs_f64(), spec.phase.marker()));
            }
            _ => {
                verdict = Err(format!(
                    "{spec}: the phase marker `{}` never reached the console, no cut\\n{}",
                    spec.phase.marker(),
                    cut_boot.diagnostics()
                ))
            }
        }
        if let Err(why) = &mut verdict {
            if b.lines("journal").next().is_none() {
                *why += &host_journal(m.root, &lab.work.join(format!("{name}.journal")));
            }
        }
        out.push((spec.to_string(), verdict.clone()));
    } else if let Err(why) = &verdict {
        out.push((format!("{name} (setup)"), Err(why.clone())));
    }
    verdict.is_ok()
}

impl Machine<'_> {
    fn clone_shallow(&self) -> Self {
        Machine {
            root: self.root,
            preseed: self.preseed,
            extra: self.extra.clone(),
            cache: self.cache,
            cmdline: self.cmdline,
            cut: self.cut,
        }
    }
}

/// A power-cut boot's machine: every disk `cache=directsync`.
fn machine<'a>(root: &'a Path, preseed: &'a (PathBuf, String), extra: Vec<&'a Path>, cmdline: &'a str) -> Machine<'a> {
    Machine { root, preseed, extra, cache: "directsync", cmdline, cut: None }
}

/// One round: at most one cut per phase, each on the chain of boots that
/// brings a node to that phase (a streamed node updated v1 → v2, a copying
/// node, an overlaid node updated v1 → v2 with its previous slot, settled,
/// swapped back to v1). Fresh root disks per round.
fn round(lab: &Lab, r: usize, cuts: &[CutSpec], out: &mut Vec<(String, Verdict)>) {
    let cut = |p: Phase| cuts.iter().copied().find(|c| c.phase == p);
    let has = |ps: &[Phase]| ps.iter().any(|p| cut(*p).is_some());
    let v1_expect = Expect { pinned: V1, unpinned: &[], complete: &[], overlay: false, settle: false };
    let v2_expect = Expect { pinned: V2, unpinned: &[TOOL], complete: &[TOOL], overlay: false, settle: false };
    if has(&[Phase::LoadCold, Phase::LoadUpdate]) {
        let root = root_disk(lab.base, lab.work, lab.smoke, Node::Streamed, &format!("r{r}-streamed"), true);
        let ok = step(
            lab,
            &format!("r{r}-streamed-v1"),
            machine(&root, lab.v1, vec![], ""),
            cut(Phase::LoadCold),
            &v1_expect,
            out,
        );
        if ok && cut(Phase::LoadUpdate).is_some() {
            step(
                lab,
                &format!("r{r}-streamed-v2"),
                machine(&root, lab.v2, vec![], ""),
                cut(Phase::LoadUpdate),
                &v2_expect,
                out,
            );
        }
        let _ = fs::remove_file(&root);
    }
    if has(&[Phase::Place]) {
        let root = root_disk(lab.base, lab.work, lab.smoke, Node::Copying, &format!("r{r}-copying"), true);
        step(lab, &format!("r{r}-copying-v1"), machine(&root, lab.v1, vec![], ""), cut(Phase::Place), &v1_expect, out);
        let _ = fs::remove_file(&root);
    }
    if has(&[Phase::OverlayFirst, Phase::OverlayUpdate, Phase::Settle]) {
        let root = root_disk(lab.base, lab.work, lab.smoke, Node::Overlaid, &format!("r{r}-overlaid"), true);
        let ov1 = Expect { overlay: true, ..v1_expect };
        let ov2 = Expect { overlay: true, ..v2_expect };
        let previous = lab.previous_v1;
        let mut ok = step(
            lab,
            &format!("r{r}-overlaid-v1"),
            machine(&root, lab.v1, vec![], ""),
            cut(Phase::OverlayFirst),
            &ov1,
            out,
        );
        if ok && has(&[Phase::OverlayUpdate, Phase::Settle]) {
            let m = Machine { extra: vec![previous], ..machine(&root, lab.v2, vec![], "") };
            ok = step(lab, &format!("r{r}-overlaid-v2"), m, cut(Phase::OverlayUpdate), &ov2, out);
        }
        if ok && cut(Phase::Settle).is_some() {
            // Settle (v1 is next), cut, settled again on the next boot; then
            // the swap to v1 without --previous loses nothing: tool2's blobs
            // were settled into the store.
            let m = Machine {
                extra: vec![previous, lab.next_v1],
                ..machine(&root, lab.v2, vec![], "preseed.vmtest.settle")
            };
            let settled = Expect { settle: true, ..ov2 };
            if step(lab, &format!("r{r}-overlaid-settle"), m, cut(Phase::Settle), &settled, out) {
                let swapped =
                    Expect { pinned: V1, unpinned: &[TOOL2], complete: &[TOOL2], overlay: true, settle: false };
                let (b, _) = boot_with(
                    lab.work,
                    &format!("r{r}-overlaid-swap"),
                    &lab.kernel,
                    &lab.initrd,
                    &machine(&root, lab.v1, vec![], ""),
                );
                let mut v = judge_recovered(&b, &swapped);
                if let Some(place) = place_summary(&b) {
                    if !place.contains(" 0 lost") {
                        v = Err(format!("the swap after settle lost blobs: {place}"));
                    }
                }
                if let Err(why) = v {
                    out.push((format!("r{r}-overlaid-swap (after {})", cut(Phase::Settle).unwrap()), Err(why)));
                }
            }
        }
        let _ = fs::remove_file(&root);
    }
}

/// Power cut at any moment: the node comes back with every image, with no
/// human step. Each cut SIGKILLs qemu (disks with `cache=directsync`: what
/// the guest had not written is lost, what it wrote stays) a chosen time
/// after a phase's marker on the console, then the same disks boot again
/// and are judged ([`judge_recovered`]). `cargo xtask vm-test --power-cuts N
/// --seed S` runs N cuts; CI runs one per phase.
#[test]
fn node_recovers_from_power_cuts_in_every_phase() {
    let Some((_one, target, pkg)) = vm_setup() else { return };
    let started = Instant::now();
    let base = base_root(&target, &pkg);
    let work = target.join("vm/power-cuts");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work).unwrap();
    let smoke = cri_smoke(&target);
    let Some([v1, v2, _]) = partitions(&work) else { return };
    let previous_v1 = work.join("preseed-previous-v1.img");
    preseed_disk(&work.join("v1/out/preseed.erofs"), &previous_v1, "preseed-previous");
    let next_v1 = work.join("preseed-next-v1.img");
    preseed_disk(&work.join("v1/out/preseed.erofs"), &next_v1, "preseed-next");
    let lab = Lab {
        work: &work,
        base: &base,
        smoke: &smoke,
        kernel: one_file(&base.join("boot"), "vmlinuz-"),
        initrd: one_file(&base.join("boot"), "initrd.img-"),
        v1: &v1,
        v2: &v2,
        previous_v1: &previous_v1,
        next_v1: &next_v1,
    };
    // Rounds of at most one cut per phase, in order.
    let specs = cut_specs();
    let mut rounds: Vec<Vec<CutSpec>> = Vec::new();
    for s in &specs {
        match rounds.iter_mut().find(|r| r.iter().all(|c| c.phase != s.phase)) {
            Some(r) => r.push(*s),
            None => rounds.push(vec![*s]),
        }
    }
    let mut out = Vec::new();
    for (r, cuts) in rounds.iter().enumerate() {
        round(&lab, r, cuts, &mut out);
        for (what, v) in &out[out.len().saturating_sub(cuts.len() + 2)..] {
            if let Ok(ok) = v {
                eprintln!("vm: {ok}");
            } else {
                eprintln!("vm: {what} FAILED");
            }
        }
    }
    let failed: Vec<&(String, Verdict)> = out.iter().filter(|(_, v)| v.is_err()).collect();
    let recovered = out.iter().filter(|(w, v)| v.is_ok() && !w.ends_with("(setup)")).count();
    let replay: Vec<&str> = failed.iter().map(|(w, _)| w.as_str()).collect();
    println!(
        "power cuts: {}, recovered {recovered}, failed {}{} ({:.0}s)",
        specs.len(),
        failed.len(),
        if replay.is_empty() { String::new() } else { format!(" (replay: --power-cut {})", replay.join(",")) },
        started.elapsed().as_secs_f64()
    );
    if let Some((what, Err(why))) = failed.first() {
        panic!("{what}: {why}\n(consoles of this run: {})", work.display());
    }
}

/// The recovery judge fails a boot that left any of preseed's half-done
/// work behind (so the power-cut test can fail): checked on made-up facts.
#[test]
fn the_recovery_judge_sees_what_a_cut_left() {
    let facts = |extra: &[&str]| {
        let mut f: Vec<String> = [
            "as kubelet.service",
            "net lo",
            "unit preseed-load.service active success",
            "sandbox ready (0.10s)",
            "container exit=0 (0.20s)",
            &format!("container-log {HELLO_LINE}"),
            "overlay none",
            "done",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for n in V1 {
            f.push(format!("image {n} pinned=true"));
            f.push(format!("check {n} complete"));
        }
        f.extend(extra.iter().map(|s| s.to_string()));
        Boot { facts: f, console: String::new(), wall: Duration::ZERO, finished: true }
    };
    let e = Expect { pinned: V1, unpinned: &[], complete: &[], overlay: false, settle: false };
    assert!(judge_recovered(&facts(&[]), &e).is_ok());
    for left in [
        "temp /var/lib/containerd/io.containerd.content.v1.content/preseed-place.tmp",
        "lease k8s.io preseed-load-1-2",
        "ingest k8s.io preseed-load-1-2-3-abcdef",
        &format!("check {HELLO} incomplete"),
    ] {
        let b = facts(&[left]);
        let mut b = b;
        if left.starts_with("check") {
            b.facts.retain(|f| f != &format!("check {HELLO} complete"));
        }
        assert!(judge_recovered(&b, &e).is_err(), "{left} went unnoticed");
    }
    let overlaid = Expect { overlay: true, ..e };
    assert!(judge_recovered(&facts(&[]), &overlaid).is_err(), "an overlay node without its overlay");
}
