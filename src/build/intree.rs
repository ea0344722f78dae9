//! In-tree images: a workspace package (`images/<name>`) compiled to a static
//! binary and packaged as a one-layer OCI image straight into the blob cache.
//!
//! The package's `[package.metadata.preseed]` table says how the image runs
//! (see [`ImageMetadata`]); the binary lands at `/<bin>` in the layer.
//!
//! Architecture invariant: the same source, toolchain and `Cargo.lock` give
//! the same image digest on any machine and from any checkout path. That is
//! why the compile pins its profile, statically links, and remaps the
//! workspace, cargo home and target paths out of the binary, and why the
//! layer tar, its gzip and the JSON blobs are written byte-for-byte the same
//! way every time: entries in a fixed order, mtime 0, uid/gid 0, fixed modes,
//! no gzip name or timestamp, no `created` or history in the config.
//! This module never talks to a registry.

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

use cargo_metadata::{Message, MetadataCommand, TargetKind};
use flate2::{Compression, GzBuilder};
use serde::{Deserialize, Serialize};

use crate::build::cache::{BlobCache, CacheError};
use crate::digest::{Digest, Hasher, HashingWriter};
use crate::oci::{self, Descriptor, Platform};

/// Where and how to build in-tree images.
#[derive(Clone, Debug)]
pub struct BuildOptions {
    /// The workspace's root `Cargo.toml`.
    pub workspace_manifest: PathBuf,
    /// Cargo target directory for image builds. Keep it apart from the normal
    /// one: the static/remap `RUSTFLAGS` would otherwise invalidate it.
    pub target_dir: PathBuf,
    /// Pass `--offline` to cargo.
    pub offline: bool,
}

impl BuildOptions {
    /// Options for the workspace at `workspace_manifest`, building into
    /// `<workspace>/target/preseed-images`, online.
    pub fn new(workspace_manifest: impl Into<PathBuf>) -> Self {
        let workspace_manifest = workspace_manifest.into();
        let root = workspace_manifest.parent().unwrap_or(Path::new(".")).to_path_buf();
        BuildOptions { workspace_manifest, target_dir: root.join("target/preseed-images"), offline: false }
    }
}

/// An image built from a workspace package, its blobs in the cache.
#[derive(Clone, Debug)]
pub struct BuiltImage {
    /// The image manifest (what a tarball's `index.json` points at).
    pub root: Descriptor,
    /// Every blob: manifest, config, layer, in that order.
    pub blobs: Vec<Descriptor>,
    /// The platform it was built for (the host's).
    pub platform: Platform,
}

/// Errors of building an in-tree image. Each names the package, which is
/// also the `build = "…"` entry of `bundles.toml`.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// `cargo metadata` failed on the workspace.
    #[error("cannot read the workspace {manifest} to build `{package}`: {source}")]
    Workspace {
        /// The package asked for.
        package: String,
        /// The workspace manifest.
        manifest: PathBuf,
        /// What cargo said.
        source: cargo_metadata::Error,
    },
    /// No workspace member has that name.
    #[error(
        "build entry `{package}`: no such package in the workspace {manifest} (members: {}); \
         add images/{package} to [workspace] members or fix the entry",
        members.join(", ")
    )]
    NoSuchPackage {
        /// The package asked for.
        package: String,
        /// The workspace manifest.
        manifest: PathBuf,
        /// The packages that do exist.
        members: Vec<String>,
    },
    /// The package builds no executable.
    #[error("build entry `{package}`: package has no binary target; an in-tree image needs a src/main.rs or [[bin]]")]
    NoBinary {
        /// The package.
        package: String,
    },
    /// The package has several binaries and none was chosen.
    #[error(
        "build entry `{package}`: package has several binaries ({}); choose one with \
         `bin = \"…\"` in [package.metadata.preseed]",
        bins.join(", ")
    )]
    AmbiguousBinary {
        /// The package.
        package: String,
        /// Its binary targets.
        bins: Vec<String>,
    },
    /// `[package.metadata.preseed]` is malformed, or names a missing binary.
    #[error("build entry `{package}`: bad [package.metadata.preseed] in {manifest}: {message}")]
    Metadata {
        /// The package.
        package: String,
        /// Its Cargo.toml.
        manifest: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The Rust toolchain could not be run or queried.
    #[error("build entry `{package}`: cannot run `{command}`: {message}; is a Rust toolchain on PATH?")]
    Toolchain {
        /// The package.
        package: String,
        /// The command that failed.
        command: String,
        /// What happened.
        message: String,
    },
    /// The host is not a Linux target; container images need one.
    #[error("build entry `{package}`: host target {triple} is not Linux; build in-tree images on a Linux machine")]
    UnsupportedHost {
        /// The package.
        package: String,
        /// The host triple.
        triple: String,
    },
    /// `cargo build` failed.
    #[error(
        "build entry `{package}`: `cargo build` failed ({status}); fix the compile errors below and retry:\n{stderr}"
    )]
    Cargo {
        /// The package.
        package: String,
        /// cargo's exit status.
        status: ExitStatus,
        /// The tail of cargo's stderr.
        stderr: String,
    },
    /// cargo succeeded but reported no executable for the binary.
    #[error("build entry `{package}`: cargo reported no executable for binary `{bin}`")]
    NoArtifact {
        /// The package.
        package: String,
        /// The binary target.
        bin: String,
    },
    /// Reading the built binary failed.
    #[error("build entry `{package}`: {path}: {source}")]
    Io {
        /// The package.
        package: String,
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// Storing a blob failed.
    #[error("build entry `{package}`: storing the image: {source}")]
    Cache {
        /// The package.
        package: String,
        /// The cache error.
        source: CacheError,
    },
}

/// `[package.metadata.preseed]`: how the image runs. Every key is optional.
///
/// ```toml
/// [package.metadata.preseed]
/// bin = "pause"                  # which binary, if the package has several
/// entrypoint = ["/pause"]        # default: ["/<bin>"]
/// cmd = ["--flag"]
/// user = "65535:65535"           # numeric: the image has no /etc/passwd
/// env = { RUST_LOG = "info" }
/// workdir = "/"
/// labels = { "org.opencontainers.image.description" = "…" }
/// ```
///
/// Labels `org.opencontainers.image.title` and `.version` default to the
/// package's name and version.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ImageMetadata {
    /// The binary target to package.
    pub bin: Option<String>,
    /// `Entrypoint`.
    pub entrypoint: Option<Vec<String>>,
    /// `Cmd`.
    pub cmd: Option<Vec<String>>,
    /// `User`.
    pub user: Option<String>,
    /// `Env`, as a table (written sorted as `K=V`).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// `WorkingDir`.
    pub workdir: Option<String>,
    /// `Labels`.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// The image config as written: fields in alphabetical order, no `created`,
/// no `history`, so the same inputs give the same bytes.
#[derive(Serialize)]
struct ImageConfig<'a> {
    architecture: &'a str,
    config: RunConfig,
    os: &'a str,
    rootfs: RootFs,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct RunConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    cmd: Option<Vec<String>>,
    entrypoint: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    env: Vec<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    labels: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    working_dir: Option<String>,
}

#[derive(Serialize)]
struct RootFs {
    diff_ids: Vec<Digest>,
    #[serde(rename = "type")]
    kind: &'static str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ImageManifest<'a> {
    schema_version: u32,
    media_type: &'static str,
    config: &'a Descriptor,
    layers: [&'a Descriptor; 1],
}

/// What [`resolve_package`] found in the workspace.
struct PackageInfo {
    name: String,
    version: String,
    bin: String,
    metadata: ImageMetadata,
    workspace_root: PathBuf,
}

/// Builds workspace package `package` as a static binary for the host and
/// stores it as a one-layer OCI image in `cache`.
pub fn build_image(package: &str, cache: &BlobCache, opts: &BuildOptions) -> Result<BuiltImage, BuildError> {
    let info = resolve_package(package, &opts.workspace_manifest)?;
    let triple = host_triple(package)?;
    let platform = platform_of(&triple)
        .ok_or_else(|| BuildError::UnsupportedHost { package: package.into(), triple: triple.clone() })?;
    let binary_path = compile(&info, &triple, opts)?;
    let io_err = |source| BuildError::Io { package: package.into(), path: binary_path.clone(), source };
    // Small (a static binary); held once so both layer passes see the same bytes.
    let binary = std::fs::read(&binary_path).map_err(io_err)?;
    package_image(&info, &binary, &platform, cache)
        .map_err(|source| BuildError::Cache { package: package.into(), source })
}

fn resolve_package(package: &str, manifest: &Path) -> Result<PackageInfo, BuildError> {
    let meta = MetadataCommand::new()
        .manifest_path(manifest)
        .no_deps()
        .exec()
        .map_err(|source| BuildError::Workspace { package: package.into(), manifest: manifest.into(), source })?;
    let members: Vec<_> = meta.workspace_packages();
    let Some(pkg) = members.iter().find(|p| p.name.as_str() == package) else {
        let mut names: Vec<String> = members.iter().map(|p| p.name.to_string()).collect();
        names.sort();
        return Err(BuildError::NoSuchPackage { package: package.into(), manifest: manifest.into(), members: names });
    };
    let bad_metadata = |message: String| BuildError::Metadata {
        package: package.into(),
        manifest: pkg.manifest_path.clone().into(),
        message,
    };
    let metadata: ImageMetadata = match pkg.metadata.get("preseed") {
        Some(v) => serde_json::from_value(v.clone()).map_err(|e| bad_metadata(e.to_string()))?,
        None => ImageMetadata::default(),
    };
    let bins: Vec<String> =
        pkg.targets.iter().filter(|t| t.kind.contains(&TargetKind::Bin)).map(|t| t.name.clone()).collect();
    let bin = match (&metadata.bin, bins.as_slice()) {
        (_, []) => return Err(BuildError::NoBinary { package: package.into() }),
        (Some(b), _) if bins.contains(b) => b.clone(),
        (Some(b), _) => return Err(bad_metadata(format!("bin `{b}` is not one of {}", bins.join(", ")))),
        (None, [only]) => only.clone(),
        (None, _) if bins.iter().any(|b| b == package) => package.to_string(),
        (None, _) => return Err(BuildError::AmbiguousBinary { package: package.into(), bins }),
    };
    Ok(PackageInfo {
        name: package.to_string(),
        version: pkg.version.to_string(),
        bin,
        metadata,
        workspace_root: meta.workspace_root.into(),
    })
}

/// The host's target triple, from `rustc -vV`.
fn host_triple(package: &str) -> Result<String, BuildError> {
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let toolchain_err = |message: String| BuildError::Toolchain {
        package: package.into(),
        command: format!("{} -vV", rustc.to_string_lossy()),
        message,
    };
    let out = Command::new(&rustc).arg("-vV").output().map_err(|e| toolchain_err(e.to_string()))?;
    if !out.status.success() {
        return Err(toolchain_err(String::from_utf8_lossy(&out.stderr).trim().to_string()));
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(|h| h.trim().to_string())
        .ok_or_else(|| toolchain_err("no `host:` line in its output".into()))
}

/// The OCI platform of a Linux target triple (GOARCH names).
fn platform_of(triple: &str) -> Option<Platform> {
    let mut parts = triple.split('-');
    let arch = parts.next()?;
    if !triple.contains("-linux") {
        return None;
    }
    let (architecture, variant) = match arch {
        "x86_64" => ("amd64", None),
        "aarch64" => ("arm64", None),
        "i686" | "i586" => ("386", None),
        "powerpc64le" => ("ppc64le", None),
        "riscv64gc" => ("riscv64", None),
        "armv7" => ("arm", Some("v7")),
        other => (other, None),
    };
    Some(Platform { os: "linux".into(), architecture: architecture.into(), variant: variant.map(Into::into) })
}

/// Runs `cargo build` and returns the path of the binary.
fn compile(info: &PackageInfo, triple: &str, opts: &BuildOptions) -> Result<PathBuf, BuildError> {
    let package = info.name.as_str();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| BuildError::Io { package: package.into(), path, source }
    };
    std::fs::create_dir_all(&opts.target_dir).map_err(io_err(&opts.target_dir))?;
    let target_dir = opts.target_dir.canonicalize().map_err(io_err(&opts.target_dir))?;
    let workspace = info.workspace_root.canonicalize().map_err(io_err(&info.workspace_root))?;

    let mut rustflags = vec!["-C".to_string(), "target-feature=+crt-static".to_string()];
    // Later remaps win, so the most specific path (target dir, often inside
    // the workspace) goes last.
    if let Some(home) = cargo_home() {
        rustflags.push(format!("--remap-path-prefix={}=/cargo", home.display()));
    }
    rustflags.push(format!("--remap-path-prefix={}=/src", workspace.display()));
    rustflags.push(format!("--remap-path-prefix={}=/target", target_dir.display()));

    let mut cmd = Command::new(&cargo);
    cmd.args(["build", "--release", "--message-format=json-render-diagnostics", "-p", package, "--bin", &info.bin])
        .arg("--target")
        .arg(triple)
        .arg("--manifest-path")
        .arg(&opts.workspace_manifest)
        .arg("--target-dir")
        .arg(&target_dir);
    if opts.offline {
        cmd.arg("--offline");
    }
    // Wins over RUSTFLAGS and every config-file rustflags; \x1f-separated so
    // paths with spaces survive.
    cmd.env("CARGO_ENCODED_RUSTFLAGS", rustflags.join("\x1f")).env_remove("RUSTFLAGS").env_remove("CARGO_TARGET_DIR");
    // The profile is pinned here, not taken from the workspace, so the image
    // does not change when someone tunes their release builds: no debug info
    // or symbols (they carry paths and bloat the image), one codegen unit
    // and LTO (stable, small output), abort on panic.
    for (key, value) in [
        ("DEBUG", "false"),
        ("STRIP", "symbols"),
        ("CODEGEN_UNITS", "1"),
        ("LTO", "true"),
        ("PANIC", "abort"),
        ("INCREMENTAL", "false"),
    ] {
        cmd.env(format!("CARGO_PROFILE_RELEASE_{key}"), value);
    }
    cmd.env("CARGO_INCREMENTAL", "0");
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());

    let cargo_name = cargo.to_string_lossy().into_owned();
    let toolchain_err =
        |message: String| BuildError::Toolchain { package: package.into(), command: cargo_name.clone(), message };
    let mut child = cmd.spawn().map_err(|e| toolchain_err(e.to_string()))?;
    // Drain stderr on its own thread so neither pipe can fill and block cargo.
    let stderr = child.stderr.take().expect("stderr is piped");
    let stderr_tail = std::thread::spawn(move || tail_lines(stderr, 40));
    let stdout = BufReader::new(child.stdout.take().expect("stdout is piped"));
    let mut executable = None;
    for message in Message::parse_stream(stdout) {
        let message = message.map_err(|e| toolchain_err(format!("reading its output: {e}")))?;
        if let Message::CompilerArtifact(artifact) = message {
            if artifact.target.name == info.bin && artifact.target.kind.contains(&TargetKind::Bin) {
                executable = artifact.executable.map(PathBuf::from);
            }
        }
    }
    let status = child.wait().map_err(|e| toolchain_err(e.to_string()))?;
    let stderr = stderr_tail.join().unwrap_or_default();
    if !status.success() {
        return Err(BuildError::Cargo { package: package.into(), status, stderr });
    }
    executable.ok_or_else(|| BuildError::NoArtifact { package: package.into(), bin: info.bin.clone() })
}

fn cargo_home() -> Option<PathBuf> {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))?;
    Some(home.canonicalize().unwrap_or(home))
}

/// The last `n` lines of a stream, for error messages.
fn tail_lines(r: impl Read, n: usize) -> String {
    let mut lines = std::collections::VecDeque::with_capacity(n);
    for line in BufReader::new(r).lines().map_while(Result::ok) {
        if lines.len() == n {
            lines.pop_front();
        }
        lines.push_back(line);
    }
    Vec::from(lines).join("\n")
}

/// Writes layer, config and manifest into the cache.
fn package_image(
    info: &PackageInfo,
    binary: &[u8],
    platform: &Platform,
    cache: &BlobCache,
) -> Result<BuiltImage, CacheError> {
    let io_err = |source| CacheError::Io { path: cache.root().to_path_buf(), source };
    // Pass 1 learns the layer's digests; pass 2 streams it into the cache,
    // where the writer checks it came out the same (it must: it is deterministic).
    let mut hasher = Hasher::new();
    let diff_id = write_layer(&info.bin, binary, &mut hasher).map_err(io_err)?;
    let (size, digest) = (hasher.len(), hasher.finish());
    if !cache.contains(&digest, size) {
        let mut w = cache.writer(&digest, Some(size), &format!("layer of in-tree image {}", info.name))?;
        write_layer(&info.bin, binary, &mut w).map_err(io_err)?;
        w.commit()?;
    }
    let layer = Descriptor::new(oci::OCI_LAYER_GZIP, digest, size);

    let config_bytes = config_json(info, platform, diff_id);
    let config = Descriptor::new(oci::OCI_CONFIG, cache.put_bytes(&config_bytes)?, config_bytes.len() as u64);

    let manifest =
        ImageManifest { schema_version: 2, media_type: oci::OCI_MANIFEST, config: &config, layers: [&layer] };
    let manifest_bytes = serde_json::to_vec(&manifest).expect("manifest serializes");
    let root = Descriptor::new(oci::OCI_MANIFEST, cache.put_bytes(&manifest_bytes)?, manifest_bytes.len() as u64);
    Ok(BuiltImage { blobs: vec![root.clone(), config, layer], root, platform: platform.clone() })
}

fn config_json(info: &PackageInfo, platform: &Platform, diff_id: Digest) -> Vec<u8> {
    let meta = &info.metadata;
    let mut labels = BTreeMap::from([
        ("org.opencontainers.image.title".to_string(), info.name.clone()),
        ("org.opencontainers.image.version".to_string(), info.version.clone()),
    ]);
    labels.extend(meta.labels.clone());
    let config = ImageConfig {
        architecture: &platform.architecture,
        config: RunConfig {
            cmd: meta.cmd.clone(),
            entrypoint: meta.entrypoint.clone().unwrap_or_else(|| vec![format!("/{}", info.bin)]),
            env: meta.env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
            labels,
            user: meta.user.clone(),
            working_dir: meta.workdir.clone(),
        },
        os: &platform.os,
        rootfs: RootFs { diff_ids: vec![diff_id], kind: "layers" },
    };
    serde_json::to_vec(&config).expect("config serializes")
}

/// Writes the gzip-compressed layer (the binary at `/<bin>`, mode 0755,
/// owned by root, mtime 0) to `out`; returns the diff ID (digest of the tar).
fn write_layer(bin: &str, binary: &[u8], out: impl Write) -> io::Result<Digest> {
    // No name, mtime 0, fixed OS byte and level: the gzip header and stream
    // depend on nothing but the tar bytes (and the flate2 backend's version).
    let gz = GzBuilder::new().mtime(0).operating_system(3).write(out, Compression::best());
    let mut tar = tar::Builder::new(HashingWriter::new(gz));
    let mut header = tar::Header::new_ustar();
    header.set_path(bin)?;
    header.set_entry_type(tar::EntryType::Regular);
    header.set_size(binary.len() as u64);
    header.set_mode(0o755);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_cksum();
    tar.append(&header, binary)?;
    let HashingWriter { inner: gz, hasher } = tar.into_inner()?;
    gz.finish()?.flush()?;
    Ok(hasher.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> PackageInfo {
        PackageInfo {
            name: "hello".into(),
            version: "0.1.0".into(),
            bin: "hello".into(),
            metadata: ImageMetadata { user: Some("65535:65535".into()), ..Default::default() },
            workspace_root: PathBuf::from("/nowhere"),
        }
    }

    #[test]
    fn layer_is_deterministic_and_reads_back() {
        let mut a = Vec::new();
        let mut b = Vec::new();
        let diff_a = write_layer("hello", b"\x7fELF fake", &mut a).unwrap();
        let diff_b = write_layer("hello", b"\x7fELF fake", &mut b).unwrap();
        assert_eq!((a.clone(), diff_a.clone()), (b, diff_b));
        assert_eq!(&a[..10], &[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 2, 3]);
        let mut tar_bytes = Vec::new();
        flate2::read::GzDecoder::new(&a[..]).read_to_end(&mut tar_bytes).unwrap();
        assert_eq!(Digest::of(&tar_bytes), diff_a);
        let mut archive = tar::Archive::new(&tar_bytes[..]);
        let entries: Vec<_> = archive
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let h = e.header();
                (e.path().unwrap().display().to_string(), h.mode().unwrap(), h.mtime().unwrap(), h.uid().unwrap())
            })
            .collect();
        assert_eq!(entries, [("hello".to_string(), 0o755, 0, 0)]);
    }

    #[test]
    fn config_has_no_timestamps_and_sorted_keys() {
        let platform = platform_of("x86_64-unknown-linux-gnu").unwrap();
        let json = config_json(&info(), &platform, Digest::of(b""));
        let text = String::from_utf8(json).unwrap();
        assert!(!text.contains("created") && !text.contains("history"), "{text}");
        assert!(text.starts_with(r#"{"architecture":"amd64","config":{"Entrypoint":["/hello"],"#), "{text}");
        assert!(text.contains(r#""User":"65535:65535""#), "{text}");
        assert!(text.contains(r#""rootfs":{"diff_ids":["sha256:e3b0"#), "{text}");
    }

    #[test]
    fn platforms_from_triples() {
        assert_eq!(platform_of("aarch64-unknown-linux-gnu").unwrap().to_string(), "linux/arm64");
        assert_eq!(platform_of("armv7-unknown-linux-gnueabihf").unwrap().to_string(), "linux/arm/v7");
        assert!(platform_of("x86_64-apple-darwin").is_none());
    }
}
