//! Debian packages from newer suites (trixie, sid) fetched and unpacked under
//! `target/debian/`, never installed: the machine's own apt state and dpkg
//! database are not touched.
//!
//! apt runs with a private sources list (the machine's own Debian mirror,
//! other suites), its own `Dir::State::Lists` and `Dir::Cache`; `apt-get
//! download` fetches the `.deb` and `dpkg-deb -x` unpacks it. An unpacked
//! package is reused as long as its directory exists, so a rerun (or an
//! offline one) does not touch the network.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The suites the private sources list names.
const SUITES: &[&str] = &["trixie", "sid"];
const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";
const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// An unpacked package: `root` holds its files (`root/usr/bin/…`).
#[derive(Clone, Debug)]
pub struct Unpacked {
    /// Debian version, e.g. `2.1.9+ds1-5`.
    pub version: String,
    /// Where its files are.
    pub root: PathBuf,
}

/// Fetches `package` from `suite` (unless already unpacked) into
/// `target/debian/<package>-<suite>/`.
pub fn unpacked(target: &Path, package: &str, suite: &str) -> Result<Unpacked> {
    let base = target.join("debian");
    let dest = base.join(format!("{package}-{suite}"));
    let stamp = dest.join(".version");
    if let Ok(version) = std::fs::read_to_string(&stamp) {
        return Ok(Unpacked { version: version.trim().into(), root: dest });
    }
    let apt = Apt::new(&base.join("apt"))?;
    apt.update()?;
    let deb = apt.download(package, suite)?;
    let version = deb_field(&deb, "Version")?;
    let staging = base.join(format!(".{package}-{suite}.partial"));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging)?;
    crate::run_status(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&staging))?;
    std::fs::write(staging.join(".version"), format!("{version}\n"))?;
    let _ = std::fs::remove_dir_all(&dest);
    std::fs::rename(&staging, &dest).with_context(|| format!("moving {} into place", dest.display()))?;
    eprintln!("xtask: unpacked {package} {version} ({suite}) into {}", dest.display());
    Ok(Unpacked { version, root: dest })
}

/// apt with private state.
struct Apt {
    dir: PathBuf,
}

impl Apt {
    fn new(dir: &Path) -> Result<Apt> {
        for d in ["lists/partial", "cache/archives/partial", "etc/sources.list.d", "etc/preferences.d", "debs"] {
            std::fs::create_dir_all(dir.join(d))?;
        }
        let mirror = system_mirror();
        let keyring = if Path::new(KEYRING).exists() { format!("[signed-by={KEYRING}] ") } else { String::new() };
        let list: String = SUITES.iter().map(|s| format!("deb {keyring}{mirror} {s} main\n")).collect();
        std::fs::write(dir.join("etc/sources.list"), list)?;
        Ok(Apt { dir: dir.to_path_buf() })
    }

    fn command(&self, program: &str) -> Command {
        let d = |p: &str| self.dir.join(p).display().to_string();
        let mut cmd = Command::new(program);
        for (k, v) in [
            ("Dir::Etc::SourceList", d("etc/sources.list")),
            ("Dir::Etc::SourceParts", d("etc/sources.list.d")),
            ("Dir::Etc::Preferences", d("etc/preferences")),
            ("Dir::Etc::PreferencesParts", d("etc/preferences.d")),
            ("Dir::State::Lists", d("lists")),
            ("Dir::Cache", d("cache")),
            // Only package lists: no translations, contents or AppStream data.
            ("Acquire::IndexTargets::deb::DEP-11::DefaultEnabled", "false".into()),
            ("Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled", "false".into()),
            ("Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled", "false".into()),
            ("Acquire::IndexTargets::deb::Contents-deb::DefaultEnabled", "false".into()),
            ("Acquire::Languages", "none".into()),
            // Our own state dirs: no need for the system's lock.
            ("Debug::NoLocking", "1".into()),
            // Downloads land in a root-owned dir: let apt write as root.
            ("APT::Sandbox::User", "root".into()),
        ] {
            cmd.arg("-o").arg(format!("{k}={v}"));
        }
        cmd
    }

    /// Refreshes the package lists once per xtask run (cheap when current).
    fn update(&self) -> Result<()> {
        static DONE: std::sync::OnceLock<()> = std::sync::OnceLock::new();
        if DONE.get().is_some() {
            return Ok(());
        }
        let out = self.command("apt-get").args(["update", "-qq"]).output().context("running apt-get update")?;
        if !out.status.success() {
            bail!(
                "apt-get update of the private {} lists failed: {}\n(needs network access to the Debian mirror \
                 {}; run `cargo xtask test` once online, later runs reuse target/debian/)",
                SUITES.join("/"),
                String::from_utf8_lossy(&out.stderr).trim(),
                system_mirror()
            );
        }
        let _ = DONE.set(());
        Ok(())
    }

    /// Downloads `package` from `suite`, returning the `.deb`.
    fn download(&self, package: &str, suite: &str) -> Result<PathBuf> {
        let debs = self.dir.join("debs");
        let out = self
            .command("apt-get")
            .current_dir(&debs)
            .args(["download", "-qq", &format!("{package}/{suite}")])
            .output()
            .context("running apt-get download")?;
        if !out.status.success() {
            bail!("apt-get download {package}/{suite} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        // The newest file for this package (older downloads may linger).
        let prefix = format!("{package}_");
        let mut found: Vec<PathBuf> = std::fs::read_dir(&debs)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&prefix)))
            .collect();
        found.sort_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
        found.pop().with_context(|| format!("apt-get download {package}/{suite} wrote no .deb"))
    }
}

/// A control field of a `.deb`.
fn deb_field(deb: &Path, field: &str) -> Result<String> {
    let out = Command::new("dpkg-deb").args(["--field"]).arg(deb).arg(field).output().context("running dpkg-deb")?;
    if !out.status.success() {
        bail!("dpkg-deb --field {} {field}: {}", deb.display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The Debian mirror the machine's apt already uses (first `URIs:` of a
/// deb822 source, or first `deb` line), so the private lists come from the
/// same place.
pub fn system_mirror() -> String {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(rd) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
        more.sort();
        files.extend(more);
    }
    for f in files {
        let Ok(text) = std::fs::read_to_string(&f) else { continue };
        let name = f.to_string_lossy();
        for line in text.lines().map(str::trim) {
            let uri = if name.ends_with(".sources") {
                line.strip_prefix("URIs:").and_then(|r| r.split_whitespace().next())
            } else if name.ends_with(".list") {
                line.strip_prefix("deb ").and_then(|r| r.split_whitespace().find(|w| w.contains("://")))
            } else {
                None
            };
            // The main archive, not security or third-party repositories.
            if let Some(uri) = uri.filter(|u| u.trim_end_matches('/').ends_with("/debian")) {
                return uri.trim_end_matches('/').to_string();
            }
        }
    }
    DEFAULT_MIRROR.to_string()
}
