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

/// This run's root disk: the base (hard-linked, never modified) plus preseed,
/// the CRI client and the units, as an ext4 image.
fn root_disk(base: &Path, work: &Path, cri_smoke: &Path, overlay: bool) -> PathBuf {
    let name = if overlay { "root-overlay" } else { "root" };
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
    if overlay {
        fs::create_dir_all(units.join("containerd.service.d")).unwrap();
        fs::write(units.join("containerd.service.d/vm-overlay.conf"), OVERLAY_DROP_IN).unwrap();
        // The load reads place's (verified) mount instead.
        fs::remove_file(units.join("preseed-load.service.d/verity.conf")).unwrap();
        let drop_in = shipped_unit("preseed-load.service.d/overlay.conf");
        fs::write(units.join("preseed-load.service.d/overlay.conf"), drop_in).unwrap();
    }
    let disk = work.join(format!("{name}.ext4"));
    run("mkfs.ext4", Command::new("mkfs.ext4").args(["-q", "-F", "-L", "root", "-d"]).arg(&stage).arg(&disk).arg("4G"));
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
    let (preseed, root_hash) = preseed;
    let console_path = work.join(format!("{name}.console"));
    let console = fs::File::create(&console_path).unwrap();
    let started = Instant::now();
    let mut qemu = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-m", "1024", "-smp", "2", "-nographic", "-nic", "none", "-no-reboot"])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(format!(
            "console=ttyS0 root=/dev/vda rw panic=1 systemd.show_status=0 systemd.journald.forward_to_console=0 \
             preseed.roothash={root_hash}"
        ))
        .arg("-drive")
        .arg(format!("file={},if=virtio,format=raw", root.display()))
        .arg("-drive")
        .arg(format!("file={},if=virtio,format=raw", preseed.display()))
        .args(
            previous
                .map(|p| ["-drive".to_string(), format!("file={},if=virtio,format=raw,readonly=on", p.display())])
                .into_iter()
                .flatten(),
        )
        .stdin(Stdio::null())
        .stdout(console.try_clone().unwrap())
        .stderr(console)
        .spawn()
        .expect("start qemu-system-x86_64");
    let finished = loop {
        if let Some(status) = qemu.try_wait().unwrap() {
            eprintln!("vm: {name}: qemu exited ({status}) after {:.0}s", started.elapsed().as_secs_f64());
            break true;
        }
        if started.elapsed() > boot_timeout() {
            let _ = qemu.kill();
            let _ = qemu.wait();
            eprintln!("vm: {name}: no poweroff within {}s, qemu killed", boot_timeout().as_secs());
            break false;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    let wall = started.elapsed();
    let console = String::from_utf8_lossy(&fs::read(&console_path).unwrap()).into_owned();
    // A fact may share its console line with kernel output before it.
    let facts: Vec<String> = console
        .lines()
        .filter_map(|l| l.find(MARK).map(|i| l[i + MARK.len()..].trim_end_matches('\r').to_string()))
        .collect();
    let done = facts.iter().any(|f| f == "done");
    Boot { facts, console, wall, finished: finished && done }
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

#[test]
fn node_boots_from_the_preseed_partition_streamed_and_overlaid() {
    if !support::require_root() {
        return;
    }
    for tool in ["mmdebstrap", "qemu-system-x86_64", "sfdisk", "mkfs.ext4", "cp"] {
        if support::require_tool(tool).is_none() {
            return;
        }
    }
    let target = target_dir();
    let Some(pkg) = containerd_pkg(&target) else { return };
    let started = Instant::now();
    let base = base_root(&target, &pkg);
    let base_secs = started.elapsed().as_secs_f64();
    // The last run stays for a look after a failure (consoles, disks).
    let work = target.join("vm/last-run");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work).unwrap();
    let smoke = cri_smoke(&target);
    let Some([v1, v2, v3]) = partitions(&work) else { return };
    let root = root_disk(&base, &work, &smoke, false);
    let kernel = one_file(&base.join("boot"), "vmlinuz-");
    let initrd = one_file(&base.join("boot"), "initrd.img-");
    eprintln!("vm: base root {base_secs:.0}s, run prepared in {:.0}s", started.elapsed().as_secs_f64() - base_secs);

    // Then a fresh node whose containerd content is overlaid, on an A/B pair.
    let overlaid = root_disk(&base, &work, &smoke, true);
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
