//! The supply chain carried to the node, with real parts: the real `cosign`
//! signs and attests images in a real registry (Debian's docker-registry,
//! which has no referrers API: cosign falls back to the `sha256-<hex>` tag),
//! SBOMs are attached as OCI 1.1 referrers and under cosign's `.sbom` tag;
//! `preseed bundle` carries all of it; with the registry stopped, `cosign
//! verify`, `verify-attestation` and `download sbom` succeed against
//! `preseed serve`; and a node policy refuses images whose signature was
//! removed, altered or made by another key, importing the rest into
//! containerd (run on 1.6, 1.7 and 2.x by `cargo xtask test`).

mod support;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Output;

use preseed::partition::index::{PartitionIndex, ReferrerKind};
use serde_json::json;
use support::cli::{ok, preseed, preseed_without_credentials};
use support::containerd::Containerd;
use support::cosign::Cosign;
use support::images::{self, LayerSpec, Media, PushedImage};
use support::mount::Mounted;
use support::registry::Registry;
use support::served::Served;

const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const SPDX: &str = "application/spdx+json";
const SLSA1: &str = "https://slsa.dev/provenance/v1";

/// A small SPDX document naming `what`.
fn sbom(what: &str) -> Vec<u8> {
    serde_json::to_vec_pretty(&json!({
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": what,
        "documentNamespace": format!("https://preseed.test/spdx/{what}"),
        "creationInfo": { "created": "2026-01-01T00:00:00Z", "creators": ["Tool: preseed-test"] },
        "packages": [{ "name": what, "SPDXID": "SPDXRef-Package", "downloadLocation": "NOASSERTION" }],
    }))
    .unwrap()
}

/// `cosign attest` of a SLSA v1 provenance predicate (a sigstore bundle, as
/// cosign 3 writes it).
fn attest(cosign: &Cosign, keys: &Path, image: &str) {
    let predicate = cosign.dir.path().join("provenance.json");
    let body = json!({
        "buildDefinition": { "buildType": "https://preseed.test/build", "externalParameters": {} },
        "runDetails": { "builder": { "id": "https://preseed.test/builder" } },
    });
    std::fs::write(&predicate, serde_json::to_vec(&body).unwrap()).unwrap();
    let key = keys.join("cosign.key");
    cosign.run(
        cosign.dir.path(),
        &[
            "attest",
            "--yes",
            "--key",
            key.to_str().unwrap(),
            "--type",
            "slsaprovenance1",
            "--predicate",
            predicate.to_str().unwrap(),
            "--use-signing-config=false",
            "--tlog-upload=false",
            "--allow-insecure-registry",
            image,
        ],
    );
}

/// An SBOM attached as an OCI 1.1 referrer (what `oras attach` writes),
/// listed in the registry's referrers tag `sha256-<hex>` as clients do for a
/// registry without the referrers API.
fn attach_sbom_referrer(reg: &Registry, repo: &str, subject: (&str, u64, &str), bytes: &[u8]) {
    let blob = reg.push_blob(repo, bytes);
    let empty = reg.push_blob(repo, b"{}");
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": SPDX,
        "config": { "mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2 },
        "layers": [{ "mediaType": SPDX, "digest": blob, "size": bytes.len() }],
        "subject": { "mediaType": subject.2, "digest": subject.0, "size": subject.1 },
        "annotations": { "org.opencontainers.image.created": "2026-01-01T00:00:00Z" },
    }))
    .unwrap();
    let digest = reg.push_manifest(repo, &sha256_of(&manifest), OCI_MANIFEST, &manifest);
    let tag = subject.0.replace(':', "-");
    let listed = reg.call("GET", &format!("/v2/{repo}/manifests/{tag}"), &[("Accept", OCI_INDEX)], &[]);
    let mut index = if listed.status == 200 {
        serde_json::from_slice(&listed.body).unwrap()
    } else {
        json!({ "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [] })
    };
    index["manifests"].as_array_mut().unwrap().push(json!({
        "mediaType": OCI_MANIFEST, "digest": digest, "size": manifest.len(), "artifactType": SPDX,
    }));
    reg.push_manifest(repo, &tag, OCI_INDEX, &serde_json::to_vec(&index).unwrap());
}

/// An SBOM under cosign's `sha256-<hex>.sbom` tag, as `cosign attach sbom`
/// wrote it (the command is gone from cosign 3; `download sbom` remains).
fn attach_sbom_tag(reg: &Registry, repo: &str, subject: &str, bytes: &[u8]) {
    let blob = reg.push_blob(repo, bytes);
    let config = br#"{"architecture":"","os":"","config":{},"rootfs":{"type":"layers","diff_ids":[]}}"#;
    let config_digest = reg.push_blob(repo, config);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len() },
        "layers": [{ "mediaType": "text/spdx+json", "digest": blob, "size": bytes.len() }],
    }))
    .unwrap();
    reg.push_manifest(repo, &format!("{}.sbom", subject.replace(':', "-")), OCI_MANIFEST, &manifest);
}

fn sha256_of(bytes: &[u8]) -> String {
    preseed::digest::Digest::of(bytes).to_string()
}

/// `preseed bundle` of `text` in `dir` (out in `dir/out`); returns the
/// partition image.
fn bundle(dir: &Path, text: &str) -> PathBuf {
    std::fs::write(dir.join("bundles.toml"), text).unwrap();
    let d = |p: &str| dir.join(p).display().to_string();
    let args =
        ["bundle", "--no-progress", "--manifest", &d("bundles.toml"), "--out", &d("out"), "--cache", &d("cache")];
    eprintln!("{}", ok("preseed bundle", &preseed_without_credentials(&args)));
    dir.join("out/preseed.erofs")
}

/// The partition's files copied out of its image into `dir/tree`, to tamper with.
fn tree(partition: &Path, dir: &Path) -> PathBuf {
    let m = Mounted::new(partition, "erofs");
    let tree = dir.join("tree");
    support::cli::run("cp", std::process::Command::new("cp").arg("-a").arg(m.path()).arg(&tree));
    tree
}

fn index_of(out: &Path) -> PartitionIndex {
    serde_json::from_slice(&std::fs::read(out.join("preseed.json")).unwrap()).unwrap()
}

/// cosign against the mirror at `addr`, as a user would: the key, no
/// transparency log (none in reach), plain HTTP on loopback.
fn cosign_at(cosign: &Cosign, args: &[&str]) -> Output {
    let mut all = args.to_vec();
    all.extend(["--allow-http-registry", "--allow-insecure-registry"]);
    std::process::Command::new(&cosign.bin)
        .args(&all)
        .env("HOME", cosign.dir.path())
        .env("DOCKER_CONFIG", cosign.dir.path().join("docker"))
        .env("TUF_ROOT", cosign.dir.path().join("tuf"))
        .output()
        .unwrap()
}

fn cosign_ok(cosign: &Cosign, args: &[&str]) -> String {
    let out = cosign_at(cosign, args);
    assert!(
        out.status.success(),
        "cosign {} failed against preseed serve:\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn signatures_attestations_and_sboms_travel_and_cosign_checks_them_at_the_mirror() {
    let Some(cosign) = Cosign::new() else { return };
    let Some(reg) = Registry::start() else { return };
    let multi =
        images::push_index(&reg, "sc/multi", "v1", &[("linux", "amd64"), ("linux", "arm64")], 40, (1, 256), Media::Oci);
    let single = images::push_image(&reg, "sc/single", "v1", &[LayerSpec::new(41, 1, 256)], Media::Oci);
    let (release, other) = (cosign.generate("release"), cosign.generate("other"));
    let at_registry = |repo: &str, digest: &str| format!("{}/{repo}@{digest}", reg.host());
    let multi_ref = at_registry("sc/multi", &multi.index_digest);
    let single_ref = at_registry("sc/single", &single.manifest_digest);
    cosign.sign(&release, &multi_ref, false);
    cosign.sign(&release, &single_ref, false);
    cosign.sign(&release, &single_ref, true);
    attest(&cosign, &release, &multi_ref);
    attest(&cosign, &release, &single_ref);
    let (multi_sbom, single_sbom) = (sbom("multi"), sbom("single"));
    attach_sbom_referrer(
        &reg,
        "sc/multi",
        (&multi.index_digest, multi.index_bytes.len() as u64, OCI_INDEX),
        &multi_sbom,
    );
    attach_sbom_tag(&reg, "sc/single", &single.manifest_digest, &single_sbom);

    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[partition]\nplatforms = [\"linux/amd64\", \"linux/arm64\"]\nreferrers = [\"signatures\", \"attestations\", \"sboms\"]\n\n\
         [registries.\"{host}\"]\ninsecure = true\n\n\
         [[image]]\nref = \"{host}/sc/multi:v1@{}\"\n\n[[image]]\nref = \"{host}/sc/single:v1@{}\"\n",
        multi.index_digest,
        single.manifest_digest,
        host = reg.host()
    );
    let partition = bundle(dir.path(), &text);
    let out = dir.path().join("out");
    let index = index_of(&out);
    let kinds = |file: &str| -> Vec<(ReferrerKind, bool, Vec<String>)> {
        let img = index.images.iter().find(|i| i.file == file).unwrap();
        let mut k: Vec<_> =
            img.referrers.iter().map(|r| (r.kind, r.subject == img.digest, r.predicates.clone())).collect();
        k.sort();
        k
    };
    assert_eq!(
        kinds("multi"),
        [
            (ReferrerKind::Signature, true, vec![]),
            (ReferrerKind::Attestation, true, vec![SLSA1.to_string()]),
            (ReferrerKind::Sbom, true, vec![SPDX.to_string()]),
        ]
    );
    assert_eq!(
        kinds("single"),
        [
            (ReferrerKind::Signature, true, vec![]),
            (ReferrerKind::Signature, true, vec![]),
            (ReferrerKind::Attestation, true, vec![SLSA1.to_string()]),
            (ReferrerKind::Sbom, true, vec!["text/spdx+json".to_string()]),
        ]
    );
    let inspect = ok("preseed inspect", &preseed(&["inspect", partition.to_str().unwrap()]));
    assert!(inspect.contains("carries 1 signature (key sha256:"), "{inspect}");
    assert!(inspect.contains(&format!("1 attestation ({SLSA1})")), "{inspect}");
    assert!(inspect.contains("2 signatures (") && inspect.contains("simple-signing"), "{inspect}");

    // The registry goes away; the partition's mirror answers cosign.
    drop(reg);
    let served = Served::image(&partition);
    let at_mirror = |repo: &str, digest: &str| format!("{}/{repo}@{digest}", served.addr);
    let key = release.join("cosign.pub");
    let key = key.to_str().unwrap();
    for image in [at_mirror("sc/multi", &multi.index_digest), at_mirror("sc/single", &single.manifest_digest)] {
        cosign_ok(&cosign, &["verify", "--key", key, "--insecure-ignore-tlog", &image]);
        let statements = cosign_ok(
            &cosign,
            &["verify-attestation", "--key", key, "--insecure-ignore-tlog", "--type", "slsaprovenance1", &image],
        );
        assert!(statements.contains("payload"), "verify-attestation printed no statement: {statements}");
        // Another key verifies nothing: the test can fail.
        let other_key = other.join("cosign.pub");
        let wrong =
            cosign_at(&cosign, &["verify", "--key", other_key.to_str().unwrap(), "--insecure-ignore-tlog", &image]);
        assert!(!wrong.status.success(), "cosign verify with another key succeeded against {image}");
    }
    let downloaded = cosign_ok(&cosign, &["download", "sbom", &at_mirror("sc/single", &single.manifest_digest)]);
    assert_eq!(downloaded.trim_end().as_bytes(), String::from_utf8_lossy(&single_sbom).trim_end().as_bytes());

    // The referrers API itself, filtered.
    let url = format!("/v2/sc/multi/referrers/{}?artifactType={}", multi.index_digest, SPDX.replace('+', "%2B"));
    let (status, headers, body) = http_get(&served.addr, &url);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(headers.get("oci-filters-applied").map(String::as_str), Some("artifactType"));
    let listed: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let listed = listed["manifests"].as_array().unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    let (status, _, blob) =
        http_get(&served.addr, &format!("/v2/sc/multi/manifests/{}", listed[0]["digest"].as_str().unwrap()));
    assert_eq!(status, 200);
    let layer = serde_json::from_slice::<serde_json::Value>(&blob).unwrap()["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let (status, _, bytes) = http_get(&served.addr, &format!("/v2/sc/multi/blobs/{layer}"));
    assert_eq!((status, bytes), (200, multi_sbom));
    served.stop();
}

/// One GET over HTTP/1.1: (status, lower-case headers, body).
fn http_get(addr: &str, path: &str) -> (u16, std::collections::BTreeMap<String, String>, Vec<u8>) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes()).unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n").expect("an HTTP response");
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers, buf[end + 4..].to_vec())
}

/// The tarball `tar` with entry `name`'s bytes replaced (same length, so
/// only its digest tells).
fn alter_entry(tar: &Path, name: &str) {
    let mut archive = tar::Archive::new(std::fs::File::open(tar).unwrap());
    let mut out = tar::Builder::new(Vec::new());
    let mut found = false;
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let mut header = entry.header().clone();
        let path = entry.path().unwrap().into_owned();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut entry, &mut data).unwrap();
        if path == Path::new(name) {
            // Flip a character of the base64 signature: still JSON.
            let text = String::from_utf8(data).unwrap();
            let at = text.find("\"sig\":\"").or_else(|| text.find("\"sig\": \"")).expect("a signature in the bundle");
            let i =
                text[at..].find(|c: char| c.is_ascii_alphanumeric() && c != 's' && c != 'i' && c != 'g').unwrap() + at;
            let mut bytes = text.into_bytes();
            bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
            data = bytes;
            found = true;
        }
        out.append_data(&mut header, &path, data.as_slice()).unwrap();
    }
    assert!(found, "{name} not in {}", tar.display());
    std::fs::write(tar, out.into_inner().unwrap()).unwrap();
}

#[test]
fn a_node_policy_refuses_removed_altered_or_foreign_signatures_and_imports_the_rest() {
    let Some(cosign) = Cosign::new() else { return };
    let Some(reg) = Registry::start() else { return };
    let (release, other) = (cosign.generate("release"), cosign.generate("other"));
    let names = ["good", "stripped", "altered", "foreign", "unsigned", "free"];
    let pushed: Vec<PushedImage> = names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let repo = if *n == "free" { "other/free".to_string() } else { format!("sc/{n}") };
            images::push_image(&reg, &repo, "v1", &[LayerSpec::new(60 + i as u64, 1, 256)], Media::Oci)
        })
        .collect();
    for (n, img) in names.iter().zip(&pushed) {
        let r = format!("{}/{}@{}", reg.host(), img.repo, img.manifest_digest);
        match *n {
            "unsigned" | "free" => {}
            "foreign" => cosign.sign(&other, &r, false),
            _ => cosign.sign(&release, &r, false),
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let mut text =
        format!("[partition]\nplatforms = [\"linux/amd64\"]\n\n[registries.\"{}\"]\ninsecure = true\n", reg.host());
    for (n, img) in names.iter().zip(&pushed) {
        text +=
            &format!("\n[[image]]\nref = \"{}/{}:v1@{}\"\nfile = \"{n}\"\n", reg.host(), img.repo, img.manifest_digest);
    }
    let Some(_) = support::require_tool("cp") else { return };
    let out = tree(&bundle(dir.path(), &text), dir.path());
    drop(reg);

    // Removed: preseed.json no longer lists the signature. Altered: the
    // bundle's bytes in the tarball changed.
    let mut index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("preseed.json")).unwrap()).unwrap();
    let entry = |index: &serde_json::Value, file: &str| {
        index["images"].as_array().unwrap().iter().position(|i| i["file"] == file).unwrap()
    };
    let s = entry(&index, "stripped");
    index["images"][s].as_object_mut().unwrap().remove("referrers");
    let a = entry(&index, "altered");
    let sig = &index["images"][a]["referrers"][0];
    assert_eq!(sig["kind"], "signature");
    let bundle_blob = sig["blobs"].as_array().unwrap().last().unwrap()["digest"].as_str().unwrap().to_string();
    std::fs::write(out.join("preseed.json"), serde_json::to_vec_pretty(&index).unwrap()).unwrap();
    alter_entry(
        &out.join("k8s.io/altered.tar"),
        &format!("blobs/sha256/{}", bundle_blob.trim_start_matches("sha256:")),
    );

    let policy = dir.path().join("policy.toml");
    std::fs::copy(release.join("cosign.pub"), dir.path().join("release.pub")).unwrap();
    std::fs::write(&policy, "[[require]]\nimages = [\"*/sc/*\"]\nkeys = [\"release.pub\"]\n").unwrap();

    let Some(containerd) = Containerd::start() else { return };
    let sock = containerd.socket().to_str().unwrap().to_string();
    let load = preseed(&[
        "load",
        "--dir",
        out.to_str().unwrap(),
        "--address",
        &sock,
        "--policy",
        policy.to_str().unwrap(),
        "--json",
    ]);
    let stdout = String::from_utf8_lossy(&load.stdout);
    assert_eq!(load.status.code(), Some(1), "a refused image fails the load:\n{stdout}");
    let report: serde_json::Value = serde_json::from_slice(&load.stdout).unwrap();
    let outcome = |file: &str| {
        let i =
            report["images"].as_array().unwrap().iter().find(|i| i["tarball"] == format!("k8s.io/{file}.tar")).unwrap();
        (i["outcome"].as_str().unwrap().to_string(), i["error"].as_str().unwrap_or("").to_string(), i.clone())
    };
    let (o, _, good) = outcome("good");
    assert_eq!(o, "imported");
    assert_eq!(good["signed_by"][0]["key"], "release.pub", "{good}");
    assert_eq!(outcome("free").0, "imported");
    for (file, why) in [
        ("stripped", "the partition carries no signature"),
        ("altered", "does not match its digest (altered)"),
        ("foreign", "does not verify with release.pub"),
        ("unsigned", "the partition carries no signature"),
    ] {
        let (o, e, _) = outcome(file);
        assert_eq!(o, "failed", "{file}: {stdout}");
        assert!(e.contains("policy") && e.contains(why) && e.contains(&format!("k8s.io/{file}.tar")), "{file}: {e}");
    }
    let listed = containerd.ctr_ok(&["-n", "k8s.io", "images", "ls", "-q"]);
    let mut listed: Vec<&str> = listed.lines().filter(|l| !l.starts_with("sha256:")).collect();
    listed.sort();
    assert_eq!(listed.len(), 2, "only good and free are imported: {listed:?}");
    assert!(listed.iter().any(|l| l.ends_with("/sc/good:v1")) && listed.iter().any(|l| l.ends_with("/other/free:v1")));

    // A tarball with its signature inside stays importable by ctr
    // (containerd#11344: what index.json does not name, ctr never sees).
    let imported =
        containerd.ctr_ok(&["-n", "ctr-import", "images", "import", out.join("k8s.io/good.tar").to_str().unwrap()]);
    assert!(
        imported.contains("sc/good:v1")
            || containerd.ctr_ok(&["-n", "ctr-import", "images", "ls", "-q"]).contains("sc/good:v1")
    );

    // serve, with the same policy, serves only what passes.
    let served = Served::start(&[OsStr::new("--dir"), out.as_os_str(), OsStr::new("--policy"), policy.as_os_str()]);
    assert_eq!(http_get(&served.addr, "/v2/sc/good/manifests/v1").0, 200);
    assert_eq!(http_get(&served.addr, "/v2/other/free/manifests/v1").0, 200);
    for file in ["stripped", "altered", "foreign", "unsigned"] {
        assert_eq!(http_get(&served.addr, &format!("/v2/sc/{file}/manifests/v1")).0, 404, "{file} is served");
    }
    served.stop();

    // place (copying) leaves the refused images' blobs out.
    let root = dir.path().join("containerd-root");
    let place = preseed(&[
        "place",
        "--dir",
        out.to_str().unwrap(),
        "--root",
        root.to_str().unwrap(),
        "--policy",
        policy.to_str().unwrap(),
    ]);
    assert_eq!(place.status.code(), Some(1), "{}", String::from_utf8_lossy(&place.stdout));
    let blobs = root.join("io.containerd.content.v1.content/blobs/sha256");
    for (n, img) in names.iter().zip(&pushed) {
        let placed = blobs.join(img.layer_digests[0].trim_start_matches("sha256:")).exists();
        assert_eq!(placed, matches!(*n, "good" | "free"), "{n}'s layer placed: {placed}");
    }
}
