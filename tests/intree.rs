//! In-tree images (issue 4): `images/pause` and `images/hello` built from
//! source into the blob cache, checked byte-wise, for reproducibility, for
//! clear errors, and end to end in a real containerd.

mod support;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use preseed::build::cache::BlobCache;
use preseed::build::intree::{build_image, BuildError, BuildOptions, BuiltImage};
use preseed::build::layout::{plan_tarball, TarballSpec};
use preseed::digest::Digest;
use preseed::oci::{self, Manifest};

const HELLO_LINE: &str = "Hello from preseed!";

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Kept across runs (under `target/tmp`) so reruns compile nothing.
fn scratch(name: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join(name)
}

struct Built {
    cache: BlobCache,
    pause: BuiltImage,
    hello: BuiltImage,
}

/// pause and hello from this workspace, built once per test binary.
fn built() -> &'static Built {
    static BUILT: OnceLock<Built> = OnceLock::new();
    BUILT.get_or_init(|| {
        let cache = BlobCache::open(scratch("intree-cache")).unwrap();
        let opts = BuildOptions {
            workspace_manifest: workspace().join("Cargo.toml"),
            target_dir: scratch("intree-target"),
            offline: true,
        };
        let pause = build_image("pause", &cache, &opts).unwrap_or_else(|e| panic!("{e}"));
        let hello = build_image("hello", &cache, &opts).unwrap_or_else(|e| panic!("{e}"));
        Built { cache, pause, hello }
    })
}

/// The image's config JSON and its single layer's (path, mode, data).
fn unpack(cache: &BlobCache, image: &BuiltImage) -> (serde_json::Value, Vec<(String, u32, Vec<u8>)>) {
    let manifest: Manifest = serde_json::from_slice(&cache.read_small(&image.root.digest).unwrap()).unwrap();
    assert_eq!(manifest.schema_version, 2);
    assert_eq!(manifest.media_type.as_deref(), Some(oci::OCI_MANIFEST));
    assert_eq!(image.blobs, [image.root.clone(), manifest.config.clone(), manifest.layers[0].clone()]);
    assert_eq!(manifest.layers.len(), 1);
    assert_eq!(manifest.layers[0].media_type, oci::OCI_LAYER_GZIP);
    for blob in &image.blobs {
        assert!(cache.contains(&blob.digest, blob.size), "{} missing from cache", blob.digest);
    }
    let config: serde_json::Value =
        serde_json::from_slice(&cache.read_small(&manifest.config.digest).unwrap()).unwrap();

    let mut tar_bytes = Vec::new();
    let layer = std::fs::File::open(cache.path(&manifest.layers[0].digest)).unwrap();
    flate2::read::GzDecoder::new(layer).read_to_end(&mut tar_bytes).unwrap();
    assert_eq!(config["rootfs"]["diff_ids"][0], Digest::of(&tar_bytes).to_string());
    let mut entries = Vec::new();
    for entry in tar::Archive::new(&tar_bytes[..]).entries().unwrap() {
        let mut entry = entry.unwrap();
        let h = entry.header();
        assert_eq!((h.mtime().unwrap(), h.uid().unwrap(), h.gid().unwrap()), (0, 0, 0));
        let path = entry.path().unwrap().display().to_string();
        let mode = h.mode().unwrap();
        let mut data = Vec::new();
        entry.read_to_end(&mut data).unwrap();
        entries.push((path, mode, data));
    }
    (config, entries)
}

/// A static ELF executable: ELF64 with no PT_INTERP (no dynamic loader).
fn assert_static_elf(bin: &[u8]) {
    assert_eq!(&bin[..5], b"\x7fELF\x02", "not an ELF64 file");
    let u16_at = |o: usize| u16::from_le_bytes(bin[o..o + 2].try_into().unwrap()) as usize;
    let phoff = u64::from_le_bytes(bin[0x20..0x28].try_into().unwrap()) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    assert!(phnum > 0);
    for i in 0..phnum {
        let p_type = u32::from_le_bytes(bin[phoff + i * phentsize..][..4].try_into().unwrap());
        assert_ne!(p_type, 3, "PT_INTERP present: binary is dynamically linked");
    }
}

fn write_exec(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, data).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

#[test]
fn pause_and_hello_are_static_one_layer_images() {
    let b = built();
    let tmp = tempfile::tempdir().unwrap();

    let (config, entries) = unpack(&b.cache, &b.hello);
    assert_eq!((config["architecture"].as_str(), config["os"].as_str()), (Some("amd64"), Some("linux")));
    assert_eq!(config["config"]["Entrypoint"], serde_json::json!(["/hello"]));
    assert!(config.get("created").is_none() && config.get("history").is_none());
    assert_eq!(entries.iter().map(|e| (&e.0[..], e.1)).collect::<Vec<_>>(), [("hello", 0o755)]);
    assert_static_elf(&entries[0].2);
    let out = Command::new(write_exec(tmp.path(), "hello", &entries[0].2)).output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), format!("{HELLO_LINE}\n"));

    let (config, entries) = unpack(&b.cache, &b.pause);
    assert_eq!(config["config"]["Entrypoint"], serde_json::json!(["/pause"]));
    assert_eq!(config["config"]["User"], "65535:65535");
    assert_eq!(entries.iter().map(|e| (&e.0[..], e.1)).collect::<Vec<_>>(), [("pause", 0o755)]);
    assert_static_elf(&entries[0].2);
    // Outside a container too: waits until SIGTERM, then exits 0.
    let mut child = Command::new(write_exec(tmp.path(), "pause", &entries[0].2)).spawn().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(child.try_wait().unwrap().is_none(), "pause exited on its own");
    // SAFETY: a signal to a process this test started; no memory is passed.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(child.wait().unwrap().code(), Some(0));
}

/// A workspace holding only `images/hello`, at `root`.
fn copy_hello_workspace(root: &Path) -> PathBuf {
    let pkg = root.join("images/hello");
    std::fs::create_dir_all(pkg.join("src")).unwrap();
    for file in ["Cargo.toml", "src/main.rs"] {
        std::fs::copy(workspace().join("images/hello").join(file), pkg.join(file)).unwrap();
    }
    let manifest = root.join("Cargo.toml");
    std::fs::write(&manifest, "[workspace]\nmembers = [\"images/hello\"]\nresolver = \"2\"\n").unwrap();
    manifest
}

#[test]
fn same_source_gives_same_digest_from_any_checkout() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = BlobCache::open(tmp.path().join("cache")).unwrap();
    // Different checkout paths (of different lengths) and target dirs.
    let digests: Vec<Digest> = ["a", "checkout/somewhere/much/deeper"]
        .iter()
        .enumerate()
        .map(|(i, dir)| {
            let opts = BuildOptions {
                workspace_manifest: copy_hello_workspace(&tmp.path().join(dir)),
                target_dir: tmp.path().join(format!("target-{i}")),
                offline: true,
            };
            build_image("hello", &cache, &opts).unwrap_or_else(|e| panic!("{e}")).root.digest
        })
        .collect();
    assert_eq!(digests[0], digests[1]);
    // And the same as this checkout's own build of it.
    assert_eq!(digests[0], built().hello.root.digest);
}

#[test]
fn bad_build_entries_name_the_package() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = BlobCache::open(tmp.path().join("cache")).unwrap();
    let root = tmp.path().join("ws");
    for (name, file, code, extra) in [
        ("nobin", "src/lib.rs", "", ""),
        ("badmeta", "src/main.rs", "fn main() {}", "[package.metadata.preseed]\nentrypiont = [\"/x\"]\n"),
        ("broken", "src/main.rs", "fn main() { undefined_thing() }", ""),
    ] {
        let pkg = root.join(name);
        std::fs::create_dir_all(pkg.join("src")).unwrap();
        std::fs::write(pkg.join(file), code).unwrap();
        std::fs::write(
            pkg.join("Cargo.toml"),
            format!("[package]\nname = \"{name}\"\nversion = \"0.1.0\"\nedition = \"2021\"\n{extra}"),
        )
        .unwrap();
    }
    std::fs::write(
        root.join("Cargo.toml"),
        "[workspace]\nmembers = [\"nobin\", \"badmeta\", \"broken\"]\nresolver = \"2\"\n",
    )
    .unwrap();
    let opts = BuildOptions {
        workspace_manifest: root.join("Cargo.toml"),
        target_dir: tmp.path().join("target"),
        offline: true,
    };

    let err = build_image("nobin", &cache, &opts).unwrap_err();
    assert!(matches!(err, BuildError::NoBinary { .. }), "{err:?}");
    assert!(err.to_string().contains("`nobin`") && err.to_string().contains("no binary"), "{err}");

    let err = build_image("no-such-image", &cache, &opts).unwrap_err();
    assert!(matches!(err, BuildError::NoSuchPackage { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("`no-such-image`") && msg.contains("badmeta, broken, nobin"), "{msg}");

    let err = build_image("badmeta", &cache, &opts).unwrap_err();
    assert!(matches!(err, BuildError::Metadata { .. }), "{err:?}");
    assert!(err.to_string().contains("`badmeta`") && err.to_string().contains("entrypiont"), "{err}");

    // A compile error: the message names the package and carries rustc's words.
    let err = build_image("broken", &cache, &opts).unwrap_err();
    assert!(matches!(err, BuildError::Cargo { .. }), "{err:?}");
    assert!(err.to_string().contains("`broken`") && err.to_string().contains("undefined_thing"), "{err}");
}

/// The children of `pid`, from procfs.
fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap()
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect()
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !ok() {
        assert!(start.elapsed() < std::time::Duration::from_secs(20), "timed out waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn pause_reaps_orphans_as_pid_1() {
    if !support::require_root() {
        return;
    }
    let (Some(unshare), Some(nsenter)) = (support::require_tool("unshare"), support::require_tool("nsenter")) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (_, entries) = unpack(&built().cache, &built().pause);
    let pause = write_exec(tmp.path(), "pause", &entries[0].2);
    // pause as PID 1 of a new PID namespace, as in a pod.
    let mut ns = Command::new(unshare).args(["--pid", "--fork"]).arg(&pause).spawn().unwrap();
    wait_for("pause to start", || children(ns.id()).len() == 1);
    let pid1 = children(ns.id())[0];
    wait_for("pause to exec", || std::fs::read_link(format!("/proc/{pid1}/exe")).is_ok_and(|e| e == pause));
    // A process in the namespace whose parent exits is re-parented to pause
    // (it sleeps until the test ends it: no timer races the check)…
    let status = Command::new(nsenter)
        .args(["-t", &pid1.to_string(), "-p", "--", "sh", "-c", "sleep 600 & exit 0"])
        .status()
        .unwrap();
    assert!(status.success());
    let orphans = children(pid1);
    assert_eq!(orphans.len(), 1, "the orphan was not re-parented to pause");
    // …and reaped by it when it exits, leaving no zombie.
    // SAFETY: a signal to a process this test started; no memory is passed.
    unsafe { libc::kill(orphans[0] as i32, libc::SIGTERM) };
    wait_for("pause to reap the orphan", || children(pid1).is_empty());
    // SAFETY: a signal to a process this test started; no memory is passed.
    unsafe { libc::kill(pid1 as i32, libc::SIGTERM) };
    assert_eq!(ns.wait().unwrap().code(), Some(0));
}

#[test]
fn images_import_and_run_in_containerd() {
    let Some(containerd) = support::containerd::Containerd::start() else { return };
    let b = built();
    let tmp = tempfile::tempdir().unwrap();
    for (image, name) in [(&b.pause, "preseed.local/pause:0.1"), (&b.hello, "preseed.local/hello:0.1")] {
        let spec = TarballSpec {
            name: name.into(),
            tag: Some("0.1".into()),
            extra_names: vec![],
            root: image.root.clone(),
            blobs: image.blobs.clone(),
        };
        let path = tmp.path().join(format!("{}.tar", image.root.digest.hex()));
        let mut file = std::fs::File::create(&path).unwrap();
        std::io::copy(&mut plan_tarball(&spec, &b.cache).reader(), &mut file).unwrap();
        if let Some(skopeo) = support::require_tool("skopeo") {
            let out = Command::new(skopeo)
                .args(["inspect", "--config", &format!("oci-archive:{}", path.display())])
                .output()
                .unwrap();
            assert!(out.status.success(), "skopeo: {}", String::from_utf8_lossy(&out.stderr));
            let config: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(config["architecture"], "amd64");
        }
        containerd.ctr_ok(&["-n", "k8s.io", "images", "import", path.to_str().unwrap()]);
        let listed = containerd.ctr_ok(&["-n", "k8s.io", "images", "ls"]);
        let line = listed.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("{name} not in\n{listed}"));
        assert!(line.contains(&image.root.digest.to_string()), "{line}");
    }

    let out = containerd.ctr_ok(&["-n", "k8s.io", "run", "--rm", "preseed.local/hello:0.1", "hello-1"]);
    assert_eq!(out.trim_end(), HELLO_LINE);

    // pause: runs (as 65535:65535) until SIGTERM, then exits 0; `ctr run`
    // exits with the task's status.
    let mut run = Command::new(support::require_tool("ctr").unwrap())
        .arg("--address")
        .arg(containerd.socket())
        .args(["-n", "k8s.io", "run", "--rm", "preseed.local/pause:0.1", "pause-1"])
        .stdin(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let task_pid = || -> Option<u32> {
        let tasks = containerd.ctr_ok(&["-n", "k8s.io", "tasks", "ls"]);
        let line = tasks.lines().find(|l| l.starts_with("pause-1 ") && l.contains("RUNNING"))?;
        line.split_whitespace().nth(1)?.parse().ok()
    };
    wait_for("the pause task to run", || task_pid().is_some());
    let pid = task_pid().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(status.lines().any(|l| l.starts_with("Uid:\t65535\t65535")), "{status}");
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(run.try_wait().unwrap().is_none(), "pause exited on its own");
    containerd.ctr_ok(&["-n", "k8s.io", "tasks", "kill", "-s", "SIGTERM", "pause-1"]);
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(status) = run.try_wait().unwrap() {
            break status;
        }
        assert!(start.elapsed() < std::time::Duration::from_secs(20), "pause ignored SIGTERM");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(0));
}
