//! `cargo xtask dist [--check]`: the release `preseed` binary, stripped, and
//! a Debian package of it in `target/dist/`. The package holds the binary,
//! the systemd units of `dist/systemd/` (installed, not enabled), their
//! drop-ins as examples, man pages and shell completions rendered from the
//! CLI definition by `examples/manpages.rs`, and is built by `dpkg-deb` from
//! a staging tree whose modes and mtimes (`SOURCE_DATE_EPOCH`, else the last
//! commit's time) are fixed, so a rebuild gives the same bytes. [`check`]
//! (`--check`, and the end of `cargo xtask test`) installs it, tries what it
//! installed (`--version`, `man -w`, `systemd-analyze verify` of every unit
//! and drop-in) and removes it again.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use anyhow::{bail, ensure, Context, Result};

use crate::Counts;

/// Debian packages the build needs (package, a binary it ships): the
/// loader's gRPC bindings are generated with `protoc`.
const BUILD_PACKAGES: &[(&str, &str)] = &[("binutils", "strip"), ("dpkg", "dpkg-deb"), ("protobuf-compiler", "protoc")];

/// And the check: `containerd.service` is what `preseed-load.service` requires.
const CHECK_PACKAGES: &[(&str, &str)] =
    &[("man-db", "man"), ("systemd", "systemd-analyze"), ("containerd", "containerd")];

/// The units, installed under /usr/lib/systemd/system/.
const UNITS: &[&str] = &["preseed-load.service", "preseed-place.service", "preseed-serve.service"];

/// Drop-ins shipped as examples: the place drop-in is an alternative to the
/// place unit, the overlay ones to both (with the load reading place's
/// mount), the verity one needs a root hash.
const EXAMPLES: &[&str] = &[
    "containerd.service.d/10-preseed-place.conf",
    "containerd.service.d/10-preseed-overlay.conf",
    "preseed-load.service.d/verity.conf",
    "preseed-load.service.d/overlay.conf",
];

const DOC: &str = "usr/share/doc/preseed";

/// Files the package must hold besides the man pages.
const FILES: &[&str] = &[
    "/usr/bin/preseed",
    "/usr/lib/systemd/system/preseed-load.service",
    "/usr/lib/systemd/system/preseed-place.service",
    "/usr/lib/systemd/system/preseed-serve.service",
    "/usr/share/doc/preseed/copyright",
    "/usr/share/doc/preseed/examples/containerd.service.d/10-preseed-place.conf",
    "/usr/share/doc/preseed/examples/containerd.service.d/10-preseed-overlay.conf",
    "/usr/share/doc/preseed/examples/preseed-load.service.d/verity.conf",
    "/usr/share/doc/preseed/examples/preseed-load.service.d/overlay.conf",
    "/usr/share/bash-completion/completions/preseed",
    "/usr/share/zsh/vendor-completions/_preseed",
    "/usr/share/fish/vendor_completions.d/preseed.fish",
    "/usr/share/man/man1/preseed.1.gz",
];

const COPYRIGHT: &str = "\
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: preseed
Upstream-Contact: preseed developers

Files: *
Copyright: preseed developers
License: Apache-2.0

License: Apache-2.0
 On Debian systems, the full text of the Apache License, Version 2.0
 can be found in /usr/share/common-licenses/Apache-2.0.
";

const LONG_DESCRIPTION: &str = "\
preseed bundles pinned container images into a read-only erofs or squashfs
partition. On the node, `preseed load` imports them into containerd at boot
(preseed-load.service), `preseed place` copies their blobs into containerd's
content store before it starts (preseed-place.service), and `preseed serve`
serves them as a local registry mirror (preseed-serve.service).
.
The units are installed but not enabled. Drop-ins for placing from
containerd.service and for dm-verity are in /usr/share/doc/preseed/examples.";

/// `cargo xtask dist [--check]`.
pub fn run(args: &[String]) -> Result<()> {
    let check_too = match args {
        [] => false,
        [a] if a == "--check" => true,
        _ => bail!("usage: cargo xtask dist [--check]"),
    };
    let root = crate::workspace_root()?;
    let deb = build(&root)?;
    if check_too {
        let mut counts = Counts::default();
        check(&deb, &mut counts)?;
        println!("xtask: dist: {} passed, {} failed, {} skipped", counts.passed, counts.failed, counts.ignored);
        ensure!(counts.failed == 0, "the package check failed");
    }
    Ok(())
}

/// Builds `target/dist/preseed` and `target/dist/preseed_<version>_<arch>.deb`; returns the latter.
pub fn build(root: &Path) -> Result<PathBuf> {
    crate::install_missing(BUILD_PACKAGES, "cargo xtask dist")?;
    let meta = cargo_metadata::MetadataCommand::new().current_dir(root).no_deps().exec().context("cargo metadata")?;
    let package = meta.packages.iter().find(|p| p.name.as_str() == "preseed").context("no preseed package")?;
    let version = package.version.to_string();
    let target = meta.target_directory.as_std_path();
    let release = target.join("release");
    let dist = target.join("dist");

    // The binary alone, so it is what `cargo build --release` gives (an
    // example would bring in the dev-dependencies' features). The pages come
    // from a dev build of the example: the same text, and `cargo test` has
    // built it already.
    let mut cmd = crate::cargo();
    cmd.current_dir(root).args(["build", "--release", "--package", "preseed", "--bin", "preseed"]);
    let mut example = crate::cargo();
    example.current_dir(root).args(["build", "--package", "preseed", "--example", "manpages"]);
    for cmd in [&mut cmd, &mut example] {
        if let Some(protoc) = crate::protoc() {
            cmd.env("PROTOC", protoc);
        }
        crate::run_status(cmd)?;
    }

    std::fs::create_dir_all(&dist)?;
    // The profile keeps line tables (for benches); the shipped copy drops them.
    let binary = dist.join("preseed");
    crate::run_status(Command::new("strip").arg("--strip-all").arg("-o").arg(&binary).arg(release.join("preseed")))?;

    let stage = dist.join("root");
    if stage.exists() {
        std::fs::remove_dir_all(&stage)?;
    }
    let generated = dist.join("generated");
    if generated.exists() {
        std::fs::remove_dir_all(&generated)?;
    }
    crate::run_status(Command::new(target.join("debug/examples/manpages")).arg(&generated))?;

    copy(&binary, &stage.join("usr/bin/preseed"))?;
    let systemd = root.join("dist/systemd");
    for unit in UNITS {
        copy(&systemd.join(unit), &stage.join("usr/lib/systemd/system").join(unit))?;
    }
    for example in EXAMPLES {
        copy(&systemd.join(example), &stage.join(DOC).join("examples").join(example))?;
    }
    let license = package.license.as_deref().unwrap_or_default();
    ensure!(license == "Apache-2.0", "Cargo.toml's license is {license:?}: say where Debian keeps its text");
    write(&stage.join(DOC).join("copyright"), COPYRIGHT)?;
    for page in std::fs::read_dir(generated.join("man"))? {
        let page = page?;
        copy(&page.path(), &stage.join("usr/share/man/man1").join(page.file_name()))?;
    }
    let completions = generated.join("completions");
    copy(&completions.join("preseed.bash"), &stage.join("usr/share/bash-completion/completions/preseed"))?;
    copy(&completions.join("_preseed"), &stage.join("usr/share/zsh/vendor-completions/_preseed"))?;
    copy(&completions.join("preseed.fish"), &stage.join("usr/share/fish/vendor_completions.d/preseed.fish"))?;
    md5sums(&stage)?;

    let arch = output(Command::new("dpkg").arg("--print-architecture"))?;
    let control = format!(
        "Package: preseed\nVersion: {version}\nArchitecture: {arch}\nMaintainer: preseed developers\n\
         Installed-Size: {}\nDepends: {}\nRecommends: containerd\nSuggests: cryptsetup-bin\n\
         Section: admin\nPriority: optional\nDescription: {}\n{}\n",
        installed_size(&stage)?,
        depends(&binary)?,
        package.description.as_deref().unwrap_or("preseed"),
        LONG_DESCRIPTION.lines().map(|l| format!(" {l}")).collect::<Vec<_>>().join("\n"),
    );
    write(&stage.join("DEBIAN/control"), &control)?;

    let epoch = source_date_epoch(root);
    normalize(&stage, SystemTime::UNIX_EPOCH + Duration::from_secs(epoch))?;
    let deb = dist.join(format!("preseed_{version}_{arch}.deb"));
    crate::run_status(
        Command::new("dpkg-deb")
            .env("SOURCE_DATE_EPOCH", epoch.to_string())
            .args(["--root-owner-group", "-Zxz", "--build"])
            .arg(&stage)
            .arg(&deb),
    )?;
    println!("xtask: {} ({} bytes), {} ({} bytes)", binary.display(), size(&binary)?, deb.display(), size(&deb)?);
    Ok(deb)
}

/// Installs `deb`, checks what it installed, and removes it, adding each
/// check to `counts`. A missing prerequisite fails under `CI=true` and is
/// skipped (one skipped check) elsewhere.
pub fn check(deb: &Path, counts: &mut Counts) -> Result<()> {
    if let Err(e) = check_prerequisites() {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            counts.failed += 1;
            return Err(e.context("the package check's prerequisites (CI=true: not skipped)"));
        }
        println!("xtask: dist: SKIPPED the package check: {e:#}");
        counts.ignored += 1;
        return Ok(());
    }
    let version = output(Command::new("dpkg-deb").args(["--field"]).arg(deb).arg("Version"))?;
    let mut outcome = |name: &str, result: Result<()>| match result {
        Ok(()) => {
            println!("xtask: dist: ok {name}");
            counts.passed += 1;
        }
        Err(e) => {
            println!("xtask: dist: FAILED {name}: {e:#}");
            counts.failed += 1;
        }
    };
    let installed = dpkg(&["-i"], Some(deb));
    let is_installed = installed.is_ok();
    outcome("dpkg -i", installed);
    if is_installed {
        outcome("preseed --version", expect_version(&version));
        outcome("man pages", man_pages());
        for unit in UNITS {
            let path = Path::new("/usr/lib/systemd/system").join(unit);
            outcome(&format!("systemd-analyze verify {unit}"), verify(&path.to_string_lossy(), None));
        }
        for example in EXAMPLES {
            outcome(&format!("systemd-analyze verify with {example}"), verify_drop_in(example));
        }
        outcome("bash completion", bash_completion());
        outcome("dpkg -L", listed());
    }
    outcome("dpkg --purge", dpkg(&["--purge", "preseed"], None).and_then(|()| gone()));
    Ok(())
}

fn check_prerequisites() -> Result<()> {
    let root = output(Command::new("id").arg("-u")).is_ok_and(|uid| uid == "0");
    ensure!(root, "not root (it installs the package with dpkg -i)");
    crate::install_missing(CHECK_PACKAGES, "the package check")?;
    ensure!(crate::have("dpkg-deb") && crate::have("dpkg"), "no dpkg");
    let containerd = ["/usr/lib/systemd/system", "/lib/systemd/system"]
        .iter()
        .any(|d| Path::new(d).join("containerd.service").exists());
    ensure!(containerd, "no containerd.service (from Debian's containerd), which preseed-load.service requires");
    // Left by an earlier check that did not finish? Then it is ours to remove.
    if let Ok(maintainer) = output(Command::new("dpkg-query").args(["-W", "-f", "${Maintainer}", "preseed"])) {
        ensure!(maintainer == "preseed developers", "a preseed package by {maintainer:?} is installed");
        println!("xtask: dist: removing a preseed package left installed by an earlier check");
        dpkg(&["--purge", "preseed"], None)?;
    }
    Ok(())
}

fn dpkg(args: &[&str], deb: Option<&Path>) -> Result<()> {
    let mut cmd = Command::new("dpkg");
    cmd.env("DEBIAN_FRONTEND", "noninteractive").args(args).args(deb);
    output(&mut cmd).map(drop)
}

fn expect_version(version: &str) -> Result<()> {
    let printed = output(Command::new("/usr/bin/preseed").arg("--version"))?;
    ensure!(printed == format!("preseed {version}"), "printed {printed:?}, not \"preseed {version}\"");
    Ok(())
}

/// `man -w` finds `preseed` and a page for every subcommand `preseed --help` lists.
fn man_pages() -> Result<()> {
    let help = output(Command::new("/usr/bin/preseed").arg("--help"))?;
    let subcommands: Vec<&str> = help
        .lines()
        .skip_while(|l| *l != "Commands:")
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|s| *s != "help")
        .collect();
    ensure!(subcommands.contains(&"load"), "`preseed --help` lists no load subcommand: {help}");
    let pages = std::iter::once("preseed".to_string()).chain(subcommands.iter().map(|s| format!("preseed-{s}")));
    for page in pages {
        let path = output(Command::new("man").args(["-w", &page]))?;
        ensure!(path == format!("/usr/share/man/man1/{page}.1.gz"), "man -w {page} found {path:?}");
    }
    Ok(())
}

/// `systemd-analyze verify`, which exits 0 on unknown keys and values it
/// cannot parse (it ignores them, with a warning): any line naming one of
/// ours fails the check too. Lines about other units are the machine's.
fn verify(unit: &str, unit_path: Option<&Path>) -> Result<()> {
    let mut cmd = Command::new("systemd-analyze");
    cmd.args(["verify", unit]);
    if let Some(dir) = unit_path {
        // The trailing colon keeps the default search path after it.
        cmd.env("SYSTEMD_UNIT_PATH", format!("{}:", dir.display()));
    }
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let ours: Vec<&str> = text.lines().filter(|l| l.contains("preseed")).collect();
    ensure!(out.status.success() && ours.is_empty(), "{cmd:?}: {}\n{}", out.status, text.trim_end());
    Ok(())
}

/// The installed example drop-in, put where systemd reads drop-ins, on the
/// unit it extends (`containerd.service.d/…` on containerd's own unit).
fn verify_drop_in(example: &str) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("preseed-verify-{}", std::process::id()));
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    copy(&Path::new("/").join(DOC).join("examples").join(example), &dir.join(example))?;
    let unit = example.split_once(".d/").context("drop-in path")?.0;
    let result = verify(unit, Some(&dir));
    std::fs::remove_dir_all(&dir)?;
    result
}

fn bash_completion() -> Result<()> {
    let script = "source /usr/share/bash-completion/completions/preseed && complete -p preseed";
    let out = output(Command::new("bash").args(["-c", script]))?;
    ensure!(out.contains("preseed"), "complete -p printed {out:?}");
    Ok(())
}

/// `dpkg -L preseed` lists [`FILES`] and a man page per subcommand, and every path it lists exists.
fn listed() -> Result<()> {
    let list = output(Command::new("dpkg").args(["-L", "preseed"]))?;
    let listed: BTreeSet<&str> = list.lines().collect();
    let missing: Vec<&&str> = FILES.iter().filter(|f| !listed.contains(**f)).collect();
    ensure!(missing.is_empty(), "dpkg -L preseed lacks {missing:?}:\n{list}");
    let absent: Vec<&&str> = listed.iter().filter(|p| !Path::new(p).exists()).collect();
    ensure!(absent.is_empty(), "listed but not on disk: {absent:?}");
    let pages = listed.iter().filter(|p| p.starts_with("/usr/share/man/man1/preseed")).count();
    ensure!(pages > 1, "only {pages} man page(s) listed");
    println!("xtask: dist: dpkg -L preseed: {} paths, {} man pages", listed.len(), pages);
    Ok(())
}

fn gone() -> Result<()> {
    ensure!(!Path::new("/usr/bin/preseed").exists(), "/usr/bin/preseed is still there");
    let status = output(Command::new("dpkg-query").args(["-W", "-f", "${db:Status-Status}", "preseed"]));
    ensure!(!matches!(status.as_deref(), Ok(s) if s != "not-installed"), "dpkg-query: preseed is {status:?}");
    Ok(())
}

/// `Depends:` from the binary's `NEEDED` libraries and the highest symbol
/// version it uses from each (what dpkg-shlibdeps would compute from the
/// symbols files, without a debian/ directory).
fn depends(binary: &Path) -> Result<String> {
    let headers = output(Command::new("objdump").arg("-p").arg(binary))?;
    let symbols = output(Command::new("objdump").arg("-T").arg(binary))?;
    let max_version = |prefix: &str| {
        symbols
            .split_whitespace()
            .filter_map(|w| w.trim_start_matches('(').trim_end_matches(')').strip_prefix(prefix))
            .map(|v| v.split('.').filter_map(|n| n.parse::<u32>().ok()).collect::<Vec<_>>())
            .max()
            .map(|v| v.iter().map(u32::to_string).collect::<Vec<_>>().join("."))
    };
    let mut depends = BTreeSet::new();
    for lib in headers.lines().filter_map(|l| l.trim().strip_prefix("NEEDED")).map(str::trim) {
        let (package, prefix) = match lib {
            "libc.so.6" | "libm.so.6" | "libpthread.so.0" | "libdl.so.2" | "librt.so.1" | "ld-linux-x86-64.so.2" => {
                ("libc6", "GLIBC_")
            }
            "libgcc_s.so.1" => ("libgcc-s1", "GCC_"),
            other => bail!("{} needs {other}: say in xtask/src/dist.rs which Debian package has it", binary.display()),
        };
        depends.insert(match max_version(prefix) {
            Some(v) => format!("{package} (>= {v})"),
            None => package.to_string(),
        });
    }
    Ok(depends.into_iter().collect::<Vec<_>>().join(", "))
}

/// `DEBIAN/md5sums`, for `dpkg --verify`.
fn md5sums(stage: &Path) -> Result<()> {
    let files: Vec<PathBuf> = walk(stage)?.into_iter().filter(|p| p.is_file()).collect();
    let relative: Vec<&Path> = files.iter().map(|f| f.strip_prefix(stage).expect("under stage")).collect();
    let sums = output(Command::new("md5sum").current_dir(stage).args(&relative))?;
    write(&stage.join("DEBIAN/md5sums"), &format!("{sums}\n"))
}

/// dpkg's way: each file's size in KiB rounded up, plus one per directory
/// (outside `DEBIAN/`).
fn installed_size(stage: &Path) -> Result<u64> {
    let mut kib = 0;
    for path in walk(stage)?.into_iter().filter(|p| !p.starts_with(stage.join("DEBIAN"))) {
        let meta = std::fs::symlink_metadata(&path)?;
        kib += if meta.is_file() { meta.len().div_ceil(1024) } else { 1 };
    }
    Ok(kib)
}

/// Modes 0755 for directories and the binary, 0644 for the rest; every mtime `time`.
fn normalize(stage: &Path, time: SystemTime) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut paths = walk(stage)?;
    paths.push(stage.to_path_buf());
    for path in paths {
        let executable = path.is_dir() || path.ends_with("usr/bin/preseed");
        let mode = if executable { 0o755 } else { 0o644 };
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
        let file = std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        file.set_modified(time).with_context(|| format!("setting the mtime of {}", path.display()))?;
    }
    Ok(())
}

/// `SOURCE_DATE_EPOCH`, else the last commit's time, else 0.
fn source_date_epoch(root: &Path) -> u64 {
    std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .or_else(|| output(Command::new("git").current_dir(root).args(["log", "-1", "--format=%ct"])).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Every path under `dir` (not `dir` itself), sorted.
fn walk(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut entries: Vec<PathBuf> =
        std::fs::read_dir(dir)?.map(|e| e.map(|e| e.path())).collect::<std::io::Result<_>>()?;
    entries.sort();
    for path in entries {
        if path.is_dir() && !path.is_symlink() {
            out.push(path.clone());
            out.extend(walk(&path)?);
        } else {
            out.push(path);
        }
    }
    Ok(out)
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to.parent().context("no parent")?)?;
    std::fs::copy(from, to).with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    Ok(())
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::create_dir_all(path.parent().context("no parent")?)?;
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

fn size(path: &Path) -> Result<u64> {
    Ok(std::fs::metadata(path)?.len())
}

/// A command's stdout, trimmed; its stderr in the error if it fails.
fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr).trim_end());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}
