//! The real `cosign` (Debian sid's package, fetched by `cargo xtask test`
//! and named by `PRESEED_COSIGN_BIN`), with a home of its own.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The cosign binary: `PRESEED_COSIGN_BIN`, else `cosign` on PATH, else what
/// `cargo xtask test` unpacked. Missing: fails in CI, skips elsewhere.
pub fn cosign_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("PRESEED_COSIGN_BIN") {
        return Some(PathBuf::from(p));
    }
    let unpacked = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/debian/cosign-sid/usr/bin/cosign");
    let on_path = std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .map(|d| PathBuf::from(d).join("cosign"))
        .find(|p| p.is_file());
    let found = on_path.or_else(|| unpacked.is_file().then_some(unpacked));
    if found.is_none() {
        let what = "cosign not found: set PRESEED_COSIGN_BIN, or run `cargo xtask test` (it fetches sid's cosign)";
        if super::in_ci() {
            panic!("CI=true and a prerequisite is missing: {what}");
        }
        eprintln!("SKIPPED: {what}");
    }
    found
}

/// cosign with its own home (no docker config, no TUF cache of the user's).
pub struct Cosign {
    pub bin: PathBuf,
    pub dir: tempfile::TempDir,
}

impl Cosign {
    pub fn new() -> Option<Cosign> {
        Some(Cosign { bin: cosign_bin()?, dir: tempfile::tempdir().unwrap() })
    }

    pub fn run(&self, cwd: &Path, args: &[&str]) -> Output {
        let out = Command::new(&self.bin)
            .current_dir(cwd)
            .args(args)
            .env("COSIGN_PASSWORD", "")
            .env("HOME", self.dir.path())
            .env("DOCKER_CONFIG", self.dir.path().join("docker"))
            .env("TUF_ROOT", self.dir.path().join("tuf"))
            .output()
            .unwrap();
        assert!(out.status.success(), "cosign {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
        out
    }

    /// A new key pair in `<dir>/<name>/cosign.{key,pub}`.
    pub fn generate(&self, name: &str) -> PathBuf {
        let dir = self.dir.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        self.run(&dir, &["generate-key-pair"]);
        dir
    }

    /// Signs `repo@digest` with the key pair in `keys`: cosign 3's default
    /// (a sigstore bundle) or, `legacy`, the `.sig` tag format.
    pub fn sign(&self, keys: &Path, image: &str, legacy: bool) {
        let key = keys.join("cosign.key");
        let mut args = vec!["sign", "--yes", "--key", key.to_str().unwrap()];
        args.extend(["--use-signing-config=false", "--tlog-upload=false", "--allow-insecure-registry"]);
        if legacy {
            args.push("--new-bundle-format=false");
        }
        args.push(image);
        self.run(self.dir.path(), &args);
    }
}
