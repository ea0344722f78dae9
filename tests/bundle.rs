//! Build side end to end: a real registry (Debian docker-registry) on
//! loopback, generated images pushed to it, `preseed bundle` into a partition
//! that the kernel mounts, tarballs checked with skopeo and imported by a
//! real containerd.

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use preseed::build::cache::BlobCache;
use preseed::digest::Digest;
use preseed::partition::index::PartitionIndex;
use support::cli::{self, ok, preseed_with_env, preseed_without_credentials};
use support::containerd::Containerd;
use support::images::{self, Corpus, LayerSpec, Media};
use support::mount::Mounted;
use support::registry::Registry;

/// bundles.toml for the whole corpus; `multi` keeps both platforms.
fn corpus_manifest(corpus: &Corpus, format: &str) -> String {
    let host = &corpus.host;
    let mut text = format!(
        "# test corpus\n[partition]\nformat = \"{format}\"\nplatforms = [\"linux/amd64\"]\n\n[registries.\"{host}\"]\ninsecure = true\n"
    );
    for image in &corpus.images {
        text += &format!("\n[[image]]\nref = \"{}\"\nfile = \"{}\"\n", image.reference(host), image.name);
        if image.name == "multi" {
            text += "platforms = [\"linux/amd64\", \"linux/arm64\"]\n";
        }
        if image.name == "app-a" {
            text += "names = [\"registry.local/app-a:stable\"]\nnamespace = \"apps\"\n";
        }
    }
    text
}

struct Bundle {
    out: PathBuf,
    cache: PathBuf,
}

fn bundle(dir: &Path, manifest_text: &str, extra: &[&str]) -> (Bundle, Output) {
    let manifest = dir.join("bundles.toml");
    std::fs::write(&manifest, manifest_text).unwrap();
    let b = Bundle { out: dir.join("out"), cache: dir.join("cache") };
    let mut args = vec!["bundle", "--no-progress", "--manifest", manifest.to_str().unwrap()];
    args.extend(["--out", b.out.to_str().unwrap(), "--cache", b.cache.to_str().unwrap()]);
    args.extend(extra);
    let out = preseed_without_credentials(&args);
    (b, out)
}

fn sha256_file(path: &Path) -> Digest {
    let mut h = preseed::digest::Hasher::new();
    std::io::copy(&mut std::fs::File::open(path).unwrap(), &mut h).unwrap();
    h.finish()
}

fn skopeo_inspect(tarball: &Path) -> serde_json::Value {
    let out = Command::new("skopeo").arg("inspect").arg(format!("oci-archive:{}", tarball.display())).output().unwrap();
    assert!(out.status.success(), "skopeo inspect {}: {}", tarball.display(), String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The main acceptance path for one format.
fn corpus_end_to_end(format: &str) {
    if !support::require_root() || support::require_tool("skopeo").is_none() {
        return;
    }
    let Some(reg) = Registry::start() else { return };
    let corpus = images::push_test_corpus(&reg);
    let dir = tempfile::tempdir().unwrap();
    let (b, out) = bundle(dir.path(), &corpus_manifest(&corpus, format), &[]);
    let summary = ok("preseed bundle", &out);
    eprintln!("{summary}");
    let partition = b.out.join(format!("preseed.{format}"));
    let index: PartitionIndex = serde_json::from_slice(&std::fs::read(b.out.join("preseed.json")).unwrap()).unwrap();
    assert_eq!(index.images.len(), corpus.images.len());

    let mounted = Mounted::new(&partition, format);
    let root = mounted.path();
    assert_eq!(std::fs::read(root.join("preseed.json")).unwrap(), std::fs::read(b.out.join("preseed.json")).unwrap());

    let Some(ctrd) = Containerd::start() else { return };
    let mut tar_bytes = 0;
    for entry in &index.images {
        let tarball = root.join(&entry.path);
        let meta = std::fs::metadata(&tarball).unwrap();
        assert_eq!(meta.len(), entry.size, "{}", entry.path);
        tar_bytes += meta.len();
        assert_eq!(sha256_file(&tarball), entry.sha256, "{}: sha256 in preseed.json", entry.path);
        let image = corpus.image(&entry.file);
        assert_eq!(entry.digest.to_string(), image.digest);
        assert_eq!(entry.name, format!("{}/{}:{}", corpus.host, image.repo, image.tag));

        let inspected = skopeo_inspect(&tarball);
        if !image.is_index() {
            assert_eq!(inspected["Digest"], image.digest, "skopeo sees the pinned manifest of {}", entry.path);
        }

        let imported =
            ctrd.ctr_ok(&["-n", &entry.namespace, "images", "import", "--all-platforms", tarball.to_str().unwrap()]);
        eprintln!("{imported}");
        let listed = ctrd.ctr_ok(&["-n", &entry.namespace, "images", "ls", "-q"]);
        assert!(listed.lines().any(|l| l == entry.name), "{} not in {listed}", entry.name);
        let check = ctrd.ctr_ok(&["-n", &entry.namespace, "images", "check", &format!("name=={}", entry.name)]);
        assert!(check.contains("complete"), "{check}");
    }
    // Extra names and namespaces made it into the index.
    let app_a = index.images.iter().find(|i| i.file == "app-a").unwrap();
    assert_eq!(
        (app_a.namespace.as_str(), app_a.names.as_slice()),
        ("apps", &["registry.local/app-a:stable".to_string()][..])
    );
    let multi = index.images.iter().find(|i| i.file == "multi").unwrap();
    assert_eq!(multi.platforms, ["linux/amd64", "linux/arm64"]);

    // The figures for the note: partition vs unique blobs.
    let unique: u64 = corpus.unique_blob_bytes()
        + corpus.images.iter().map(|i| i.manifest_bytes.len() as u64).sum::<u64>()
        + corpus
            .images
            .iter()
            .flat_map(|i| i.platforms.iter().map(|(_, p)| p.manifest_bytes.len() as u64))
            .sum::<u64>();
    let part = std::fs::metadata(&partition).unwrap().len();
    eprintln!(
        "{format}: partition {part} bytes, tarballs {tar_bytes} bytes, unique blobs {unique} bytes, ratio {:.3}",
        part as f64 / unique as f64
    );
}

#[test]
fn corpus_bundles_mounts_and_imports_squashfs() {
    corpus_end_to_end("squashfs");
}

#[test]
fn corpus_bundles_mounts_and_imports_erofs() {
    corpus_end_to_end("erofs");
}

/// Same manifest, different caches, blobs created in another order:
/// byte-identical partitions.
#[test]
fn bundles_are_byte_identical_across_caches() {
    let Some(reg) = Registry::start() else { return };
    let corpus = images::push_test_corpus(&reg);
    for format in ["erofs", "squashfs"] {
        let text = corpus_manifest(&corpus, format);
        let one = tempfile::tempdir().unwrap();
        let (a, out) = bundle(one.path(), &text, &["--jobs", "8"]);
        ok("preseed bundle", &out);
        // Second cache: the same blobs, written in reverse order, then offline.
        let two = tempfile::tempdir().unwrap();
        let cache_b = BlobCache::open(two.path().join("cache")).unwrap();
        let mut blobs: Vec<_> =
            std::fs::read_dir(a.cache.join("blobs/sha256")).unwrap().map(|e| e.unwrap().path()).collect();
        blobs.sort();
        blobs.reverse();
        for p in blobs {
            cache_b.put_bytes(&std::fs::read(p).unwrap()).unwrap();
        }
        copy_listings(&a.cache, &two.path().join("cache"));
        let (b, out) = bundle(two.path(), &text, &["--offline", "--jobs", "1"]);
        ok("preseed bundle", &out);
        let name = format!("preseed.{format}");
        assert_eq!(sha256_file(&a.out.join(&name)), sha256_file(&b.out.join(&name)), "{format} partitions differ");
        assert_eq!(
            std::fs::read(a.out.join("preseed.json")).unwrap(),
            std::fs::read(b.out.join("preseed.json")).unwrap()
        );
    }
}

/// Besides its blobs, a cache keeps what each image's signatures and
/// referrers were when last fetched (`signatures/`, `referrers/`), which an
/// `--offline` run needs as well: copies those into the cache `to`.
fn copy_listings(from: &Path, to: &Path) {
    for kind in ["signatures", "referrers"] {
        let Ok(entries) = std::fs::read_dir(from.join(kind)) else { continue };
        std::fs::create_dir_all(to.join(kind)).unwrap();
        for e in entries {
            let e = e.unwrap();
            std::fs::copy(e.path(), to.join(kind).join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn offline_uses_the_cache_or_names_the_missing_blob() {
    let Some(reg) = Registry::start() else { return };
    let corpus = images::push_test_corpus(&reg);
    let text = corpus_manifest(&corpus, "squashfs");
    let dir = tempfile::tempdir().unwrap();
    let (_, out) = bundle(dir.path(), &text, &["--offline"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--offline but blob sha256:") && stderr.contains("is not in the cache"), "{stderr}");
    // Warm the cache, then offline works without a single request.
    let (_, out) = bundle(dir.path(), &text, &[]);
    ok("preseed bundle", &out);
    let before = reg.request_count();
    let (b, out) = bundle(dir.path(), &text, &["--offline"]);
    ok("preseed bundle", &out);
    assert!(reg.requests_since(before).is_empty(), "offline bundle made requests");
    // Nothing changed: the partition is not rewritten. Touched by hand: it is.
    assert!(String::from_utf8_lossy(&out.stderr).contains("is up to date"), "{}", String::from_utf8_lossy(&out.stderr));
    let partition = b.out.join("preseed.squashfs");
    let good = sha256_file(&partition);
    std::fs::OpenOptions::new()
        .append(true)
        .open(&partition)
        .map(|mut f| std::io::Write::write_all(&mut f, b"x"))
        .unwrap()
        .unwrap();
    let (_, out) = bundle(dir.path(), &text, &["--offline"]);
    assert!(!String::from_utf8_lossy(&out.stderr).contains("is up to date"));
    assert_eq!(sha256_file(&partition), good);
}

#[test]
fn basic_auth_from_docker_config() {
    let Some(reg) = Registry::start_with_basic_auth("builder", "s3cret") else { return };
    let pushed = images::push_image(&reg, "private/app", "v1", &[LayerSpec::new(77, 2, 4096)], Media::Oci);
    let host = reg.host();
    let text = format!(
        "[registries.\"{host}\"]\ninsecure = true\n\n[[image]]\nref = \"{host}/private/app:v1@{}\"\n",
        pushed.manifest_digest
    );
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("bundles.toml");
    std::fs::write(&manifest, &text).unwrap();
    let args = |out: &str| {
        vec![
            "bundle".to_string(),
            "--no-progress".into(),
            "--format".into(),
            "squashfs".into(),
            "--manifest".into(),
            manifest.display().to_string(),
            "--out".into(),
            dir.path().join(out).display().to_string(),
            "--cache".into(),
            dir.path().join(format!("cache-{out}")).display().to_string(),
        ]
    };
    // Without credentials: a clear failure naming the registry and what to do.
    let no_creds = preseed_without_credentials(&args("a").iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!no_creds.status.success());
    let stderr = String::from_utf8_lossy(&no_creds.stderr);
    assert!(stderr.contains(&format!("registry {host}")) && stderr.contains("docker login"), "{stderr}");
    // With a docker config holding them: works.
    let docker = tempfile::tempdir().unwrap();
    let auth = base64_encode(b"builder:s3cret");
    std::fs::write(docker.path().join("config.json"), format!(r#"{{"auths":{{"{host}":{{"auth":"{auth}"}}}}}}"#))
        .unwrap();
    let config = [("DOCKER_CONFIG", docker.path().as_os_str())];
    let with = preseed_with_env(&args("b").iter().map(String::as_str).collect::<Vec<_>>(), &config);
    ok("preseed bundle", &with);
}

fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Killing a bundle mid-download leaves no wrong blob, and a rerun completes.
/// The registry is reached through a gate that holds its answers 12 MiB in
/// (inside the first layer), so the kill lands mid-blob however busy the
/// machine is.
#[test]
fn killed_bundle_resumes_and_cache_stays_valid() {
    let Some(reg) = Registry::start() else { return };
    let pushed = images::push_image(
        &reg,
        "big/app",
        "v1",
        &[LayerSpec::new(901, 12, 8 << 20), LayerSpec::new(902, 12, 8 << 20)],
        Media::Oci,
    );
    let gate = support::gate::TcpGate::start(&reg.host(), 12 << 20);
    let host = gate.host();
    let text = format!(
        "[partition]\nformat = \"squashfs\"\n[registries.\"{host}\"]\ninsecure = true\n\n[[image]]\nref = \"{host}/big/app:v1@{}\"\n",
        pushed.manifest_digest
    );
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("bundles.toml");
    std::fs::write(&manifest, &text).unwrap();
    let cache = dir.path().join("cache");
    let run = || {
        cli::command()
            .args(["bundle", "--no-progress", "--jobs", "1", "--manifest"])
            .arg(&manifest)
            .arg("--out")
            .arg(dir.path().join("out"))
            .arg("--cache")
            .arg(&cache)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut child = run();
    assert!(gate.wait_held(&mut child), "the bundle ended before 12 MiB were downloaded");
    // The bytes passed so far reach a temp file (the cache writes as it hashes).
    let blobs = cache.join("blobs/sha256");
    let partial = || {
        std::fs::read_dir(&blobs).into_iter().flatten().flatten().any(|e| {
            e.file_name().to_string_lossy().starts_with(".tmp") && e.metadata().map(|m| m.len() > 0).unwrap_or(false)
        })
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !partial() {
        assert!(std::time::Instant::now() < deadline, "no partly written blob in {}", blobs.display());
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    child.kill().unwrap();
    let _ = child.wait();
    gate.release();
    // Whatever is named in the cache is right.
    let c = BlobCache::open(&cache).unwrap();
    assert!(c.verify_all().unwrap().is_empty(), "a blob's content does not match its name");
    let status = run().wait().unwrap();
    assert!(status.success());
    let names: BTreeSet<String> =
        std::fs::read_dir(&blobs).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    for d in pushed.blob_digests.keys() {
        assert!(names.contains(d.trim_start_matches("sha256:")), "{d} missing after resume");
    }
    assert!(c.verify_all().unwrap().is_empty());
}

/// `preseed pin` writes digests in place and keeps comments.
#[test]
fn pin_writes_digests_keeping_comments() {
    let Some(reg) = Registry::start() else { return };
    let pushed = images::push_image(&reg, "pin/app", "v2", &[LayerSpec::new(55, 1, 1024)], Media::Docker);
    let host = reg.host();
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("bundles.toml");
    let text = format!(
        "# release 42\n[registries.\"{host}\"]\ninsecure = true # local\n\n[[image]]\n# the app\nref = \"{host}/pin/app:v2\"   # tag only\npin = false\n"
    );
    std::fs::write(&manifest, &text).unwrap();
    ok("preseed pin", &preseed_without_credentials(&["pin", "--manifest", manifest.to_str().unwrap()]));
    let after = std::fs::read_to_string(&manifest).unwrap();
    let expected =
        text.replace(&format!("{host}/pin/app:v2\""), &format!("{host}/pin/app:v2@{}\"", pushed.manifest_digest));
    assert_eq!(after, expected);
    // Pinned now: bundling needs no --allow-unpinned.
    let out = preseed_without_credentials(&[
        "bundle",
        "--no-progress",
        "--format",
        "squashfs",
        "--manifest",
        manifest.to_str().unwrap(),
        "--out",
        dir.path().join("out").to_str().unwrap(),
    ]);
    ok("preseed bundle", &out);
}

/// A TLS registry whose certificate only the manifest's `ca` makes trusted.
/// It serves the storage of a plain registry the test pushed to.
struct TlsRegistry {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl TlsRegistry {
    fn start(storage: &Path, cert: &Path, key: &Path) -> TlsRegistry {
        let dir = tempfile::tempdir().unwrap();
        let port = support::free_port();
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n  secret: preseed-test\n  tls:\n    certificate: {}\n    key: {}\n",
                storage.display(),
                cert.display(),
                key.display()
            ),
        )
        .unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "TLS registry did not start");
            std::thread::sleep(std::time::Duration::from_millis(25));
        }
        TlsRegistry { child, port, _dir: dir }
    }
}

impl Drop for TlsRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn https_registry_trusted_through_the_manifests_ca() {
    if support::require_tool("openssl").is_none() {
        return;
    }
    let Some(reg) = Registry::start() else { return };
    let pushed = images::push_image(&reg, "tls/app", "v1", &[LayerSpec::new(31, 1, 4096)], Media::Oci);
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("ca.pem"), dir.path().join("key.pem"));
    let out = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1", "-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(out.status.success(), "openssl: {}", String::from_utf8_lossy(&out.stderr));
    let tls = TlsRegistry::start(&reg.dir().join("storage"), &cert, &key);
    let host = format!("127.0.0.1:{}", tls.port);
    let image = format!("[[image]]\nref = \"{host}/tls/app:v1@{}\"\n", pushed.manifest_digest);

    // Without the CA: HTTPS fails (plain HTTP is never implied), saying what to add.
    let (_, out) = bundle(dir.path(), &format!("[partition]\nformat = \"squashfs\"\n{image}"), &[]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("registry {host}: its TLS certificate is not trusted: add the CA")), "{stderr}");

    // With `ca` (relative to bundles.toml): trusted, bundled.
    let text = format!("[partition]\nformat = \"squashfs\"\n[registries.\"{host}\"]\nca = \"ca.pem\"\n\n{image}");
    let (_, out) = bundle(dir.path(), &text, &[]);
    ok("preseed bundle", &out);
}

/// A byte flipped in a cached blob (disk error, hand edit) never reaches a
/// partition: offline the bundle fails naming the blob and its image, and
/// leaves no partition; online it fetches the blob again and writes the
/// same partition as before.
#[test]
fn damaged_cache_blob_fails_offline_and_heals_online() {
    let Some(reg) = Registry::start() else { return };
    let corpus = images::push_test_corpus(&reg);
    let text = corpus_manifest(&corpus, "erofs");
    let dir = tempfile::tempdir().unwrap();
    let (b, out) = bundle(dir.path(), &text, &[]);
    ok("preseed bundle", &out);
    let partition = b.out.join("preseed.erofs");
    let good = sha256_file(&partition);
    // The biggest blob: a layer.
    let blobs = b.cache.join("blobs/sha256");
    let victim = std::fs::read_dir(&blobs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    let hex = victim.file_name().unwrap().to_string_lossy().into_owned();
    let flip = |p: &Path| {
        let mut bytes = std::fs::read(p).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x20;
        std::fs::write(p, bytes).unwrap();
    };
    flip(&victim);
    std::fs::remove_dir_all(&b.out).unwrap();

    let (_, out) = bundle(dir.path(), &text, &["--offline"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a damaged blob must fail an offline bundle");
    assert!(stderr.contains(&format!("sha256:{hex}")) && stderr.contains("damaged"), "{stderr}");
    assert!(stderr.contains("used by") && stderr.contains("without --offline"), "{stderr}");
    assert!(!partition.exists(), "a failed run left a partition");
    assert!(!victim.exists(), "the damaged blob stays in the cache");

    // Online: fetched again, the same partition as before.
    let (_, out) = bundle(dir.path(), &text, &[]);
    ok("preseed bundle", &out);
    assert_eq!(sha256_file(&partition), good, "the healed partition differs from the original");

    // Damaged while the partition is current: the next run that writes a
    // partition (output removed) finds it, online, and heals.
    flip(&victim);
    std::fs::remove_file(&partition).unwrap();
    let (_, out) = bundle(dir.path(), &text, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    ok("preseed bundle", &out);
    assert!(stderr.contains(&format!("cache blob sha256:{hex} was damaged")), "{stderr}");
    assert_eq!(sha256_file(&partition), good);
}

/// `--verity` appends a dm-verity tree that `veritysetup` accepts with the
/// root hash written beside the image; the same inputs give the same bytes;
/// a flipped data byte fails verification.
#[test]
fn verity_tree_verifies_and_is_deterministic() {
    let Some(veritysetup) = support::require_tool("veritysetup") else { return };
    let Some(reg) = Registry::start() else { return };
    let corpus = images::push_test_corpus(&reg);
    for format in ["erofs", "squashfs"] {
        let text = corpus_manifest(&corpus, format);
        let one = tempfile::tempdir().unwrap();
        let (a, out) = bundle(one.path(), &text, &["--verity"]);
        ok("preseed bundle", &out);
        let image = a.out.join(format!("preseed.{format}"));
        let root = std::fs::read_to_string(a.out.join("preseed.roothash")).unwrap().trim().to_string();
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(a.out.join("preseed.json")).unwrap()).unwrap();
        let v = &index["verity"];
        assert_eq!(v["root_hash"], root.as_str(), "{index}");
        assert_eq!(v["hash_algorithm"], "sha256");
        let offset = v["hash_offset"].as_u64().unwrap();
        assert_eq!(offset, v["data_blocks"].as_u64().unwrap() * 4096);
        let verify = |root: &str| {
            Command::new(&veritysetup)
                .arg("verify")
                .arg(format!("--hash-offset={offset}"))
                .arg(&image)
                .arg(&image)
                .arg(root)
                .output()
                .unwrap()
        };
        let out = verify(&root);
        assert!(out.status.success(), "{format}: veritysetup verify: {}", String::from_utf8_lossy(&out.stderr));
        // The partition itself still mounts and holds the index (without
        // the verity record, which only the copy beside the image has).
        {
            let mounted = Mounted::new(&image, format);
            let inside: serde_json::Value =
                serde_json::from_slice(&std::fs::read(mounted.path().join("preseed.json")).unwrap()).unwrap();
            assert!(inside.get("verity").is_none(), "{inside}");
        }
        // The node finds the tree from the partition alone: a wrong root
        // hash is refused as such (not as "no tree"), before any device.
        let mut wrong = root.clone().into_bytes();
        wrong[0] = if wrong[0] == b'0' { b'1' } else { b'0' };
        let wrong = String::from_utf8(wrong).unwrap();
        let out = cli::preseed(&["inspect", image.to_str().unwrap(), "--verity-root-hash", &wrong]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("does not match this partition"), "{format}: {err}");
        let at = preseed::node::read::verity::locate(&image).unwrap();
        assert_eq!(at.hash_offset, offset, "{format}");
        preseed::node::read::verity::check_root(&image, &at, &root.parse().unwrap()).unwrap();
        // Another cache and directory, offline from a copy of the cache: same bytes.
        let two = tempfile::tempdir().unwrap();
        let cache_b = BlobCache::open(two.path().join("cache")).unwrap();
        for e in std::fs::read_dir(a.cache.join("blobs/sha256")).unwrap() {
            cache_b.put_bytes(&std::fs::read(e.unwrap().path()).unwrap()).unwrap();
        }
        copy_listings(&a.cache, &two.path().join("cache"));
        let (b, out) = bundle(two.path(), &text, &["--verity", "--offline"]);
        ok("preseed bundle", &out);
        assert_eq!(sha256_file(&image), sha256_file(&b.out.join(format!("preseed.{format}"))), "{format}");
        // A warm run keeps the image and still reports the tree.
        let (_, out) = bundle(one.path(), &text, &["--verity"]);
        assert!(String::from_utf8_lossy(&out.stderr).contains("is up to date"));
        assert_eq!(std::fs::read_to_string(a.out.join("preseed.roothash")).unwrap().trim(), root);
        // One flipped byte in the data: verification fails.
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&image).unwrap();
        use std::os::unix::fs::FileExt;
        let mut byte = [0u8; 1];
        f.read_exact_at(&mut byte, offset / 2).unwrap();
        f.write_all_at(&[byte[0] ^ 1], offset / 2).unwrap();
        let out = verify(&root);
        assert!(!out.status.success(), "{format}: a damaged image verified");
    }
}

/// `preseed bundle` killed at points spread over its run, with the previous
/// release's partition in `--out`: what is left under `preseed.erofs` is
/// always the previous partition or the new one, byte for byte, never a
/// torn file; `preseed.json` beside it is whole; and the next run leaves no
/// temp file of the killed one.
#[test]
fn a_bundle_killed_anywhere_leaves_the_old_partition_or_the_new_one() {
    let Some(reg) = Registry::start() else { return };
    let host = reg.host();
    let a = images::push_image(&reg, "kill/a", "1", &[LayerSpec::new(911, 4, 2 << 20)], Media::Oci);
    let b = images::push_image(&reg, "kill/b", "1", &[LayerSpec::new(912, 4, 2 << 20)], Media::Oci);
    let head = format!("[registries.\"{host}\"]\ninsecure = true\n");
    let image = |name: &str, digest: &str| format!("\n[[image]]\nref = \"{host}/kill/{name}:1@{digest}\"\n");
    let v1 = format!("{head}{}", image("a", &a.manifest_digest));
    let v2 = format!("{v1}{}", image("b", &b.manifest_digest));
    let dir = tempfile::tempdir().unwrap();
    // The reference bytes of each release, from clean runs.
    let reference = |text: &str, name: &str| {
        std::fs::create_dir_all(dir.path().join(name)).unwrap();
        let (bundled, out) = bundle(&dir.path().join(name), text, &[]);
        ok("preseed bundle", &out);
        std::fs::read(bundled.out.join("preseed.erofs")).unwrap()
    };
    let (r1, r2) = (reference(&v1, "ref1"), reference(&v2, "ref2"));
    let work = dir.path().join("work");
    let cache = dir.path().join("ref2/cache");
    let run = |text: &str| {
        let manifest = work.join("bundles.toml");
        std::fs::create_dir_all(&work).unwrap();
        std::fs::write(&manifest, text).unwrap();
        cli::command()
            .args(["bundle", "--no-progress", "--manifest"])
            .arg(&manifest)
            .arg("--out")
            .arg(work.join("out"))
            .arg("--cache")
            .arg(&cache)
            .env("HOME", "/nonexistent")
            .env_remove("DOCKER_CONFIG")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let out = work.join("out");
    // How long a warm run takes: the cuts are spread over it.
    let started = std::time::Instant::now();
    assert!(run(&v2).wait().unwrap().success());
    let clean = started.elapsed();
    let mut kept = [0, 0];
    for i in 0..8u32 {
        // The previous release in place (warm cache: nothing to fetch), then v2 killed.
        assert!(run(&v1).wait().unwrap().success());
        assert_eq!(std::fs::read(out.join("preseed.erofs")).unwrap(), r1, "v1 is in place before cut {i}");
        let mut child = run(&v2);
        std::thread::sleep(clean.mul_f64(f64::from(i) / 5.0));
        let _ = child.kill();
        child.wait().unwrap();
        let left = std::fs::read(out.join("preseed.erofs")).unwrap();
        assert!(left == r1 || left == r2, "cut {i}: preseed.erofs is neither release ({} bytes)", left.len());
        kept[usize::from(left == r2)] += 1;
        let index = std::fs::read(out.join("preseed.json")).unwrap();
        PartitionIndex::from_json(&index).unwrap_or_else(|e| panic!("cut {i}: preseed.json is torn: {e}"));
        // The next run completes, and nothing of the killed one is left.
        assert!(run(&v2).wait().unwrap().success());
        assert_eq!(std::fs::read(out.join("preseed.erofs")).unwrap(), r2, "cut {i}: the rerun");
        let stray: Vec<String> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".partial") || n.ends_with(".tmp") || n.starts_with(".preseed-erofs-"))
            .collect();
        assert!(stray.is_empty(), "cut {i}: left behind: {stray:?}");
    }
    eprintln!("8 cuts over {clean:?}: {} left the previous partition, {} the new one", kept[0], kept[1]);
}
