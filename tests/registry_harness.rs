//! Smoke test of the test harness itself: a real registry on loopback, the
//! generated corpus pushed to it and read back by skopeo, basic auth enforced.

mod support;

use std::process::Command;
use std::time::Instant;

use support::images::{self, json_of, Media};
use support::registry::{sha256_digest, Registry};

fn skopeo(args: &[&str]) -> Vec<u8> {
    let out = Command::new("skopeo").args(args).output().expect("run skopeo");
    assert!(out.status.success(), "skopeo {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

#[test]
fn corpus_round_trips_through_registry() {
    if support::require_tool("skopeo").is_none() {
        return;
    }
    let t = Instant::now();
    let Some(reg) = Registry::start() else { return };
    let started = t.elapsed();
    let corpus = images::push_test_corpus(&reg);
    eprintln!(
        "registry up in {started:?}, corpus pushed in {:?}: {} images, {} unique blobs, {} unique blob bytes",
        t.elapsed() - started,
        corpus.images.len(),
        corpus.unique_blobs().len(),
        corpus.unique_blob_bytes()
    );

    // The base layer is shared, not counted three times.
    for name in ["app-a", "app-b", "app-c"] {
        assert!(corpus.image(name).blobs.contains_key(&corpus.base_layer));
    }
    assert!(corpus.unique_blob_bytes() > 2 << 20);
    assert!(corpus.unique_blob_bytes() < 3 << 20);
    assert_eq!(corpus.image("many").blobs.len(), 41);

    for img in &corpus.images {
        let url = format!("docker://{}/{}:{}", corpus.host, img.repo, img.tag);
        let raw = skopeo(&["inspect", "--tls-verify=false", "--raw", &url]);
        assert_eq!(raw, img.manifest_bytes, "{}: raw manifest differs", img.name);
        assert_eq!(sha256_digest(&raw), img.digest, "{}", img.name);
        assert_eq!(json_of(&raw)["mediaType"], img.media_type, "{}", img.name);

        // Pinned by digest too; skopeo picks the amd64 entry of an index.
        let pinned = format!("docker://{}/{}@{}", corpus.host, img.repo, img.digest);
        let info = json_of(&skopeo(&["inspect", "--tls-verify=false", &pinned]));
        assert_eq!(info["Architecture"], "amd64", "{}", img.name);
        assert_eq!(info["Os"], "linux", "{}", img.name);
        let expected_layers = if img.is_index() {
            let amd64 = img.platforms.iter().find(|((_, a), _)| a == "amd64").unwrap();
            amd64.1.layer_digests.clone()
        } else {
            json_of(&img.manifest_bytes)["layers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|l| l["digest"].as_str().unwrap().to_string())
                .collect()
        };
        assert_eq!(info["Layers"], serde_json::json!(expected_layers), "{}", img.name);
    }

    // The index's per-platform manifests are reachable by digest.
    let multi = corpus.image("multi");
    assert_eq!(multi.platforms.len(), 2);
    for ((_, arch), m) in &multi.platforms {
        let url = format!("docker://{}/{}@{}", corpus.host, multi.repo, m.manifest_digest);
        let info = json_of(&skopeo(&["inspect", "--tls-verify=false", &url]));
        assert_eq!(&info["Architecture"], arch.as_str());
    }

    // skopeo copy verifies every blob against its digest; diff_ids are checked
    // by unpacking consumers (containerd), so check them here directly.
    let dir = tempfile::tempdir().unwrap();
    let dest = format!("oci:{}:x", dir.path().join("layout").display());
    let src = format!("docker://{}/corpus/docker:v1", corpus.host);
    skopeo(&["copy", "--src-tls-verify=false", "--preserve-digests", &src, &dest]);
    let docker = corpus.image("docker");
    let config_digest = &json_of(&docker.manifest_bytes)["config"]["digest"];
    let config = reg.call("GET", &format!("/v2/corpus/docker/blobs/{}", config_digest.as_str().unwrap()), &[], &[]);
    assert_eq!(config.status, 200);
    let diff_ids = json_of(&config.body)["rootfs"]["diff_ids"].clone();
    let mut expected = Vec::new();
    for l in json_of(&docker.manifest_bytes)["layers"].as_array().unwrap() {
        assert_eq!(l["mediaType"], images::DOCKER_LAYER_GZIP);
        let blob = reg.call("GET", &format!("/v2/corpus/docker/blobs/{}", l["digest"].as_str().unwrap()), &[], &[]);
        let mut tar = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(blob.body.as_slice()), &mut tar).unwrap();
        expected.push(sha256_digest(&tar));
    }
    assert_eq!(diff_ids, serde_json::json!(expected));

    // Access log: every request is seen, and nothing happens when nobody asks.
    let before = reg.request_count();
    assert!(before > 0);
    assert!(reg.log_contains("PUT /v2/corpus/many/manifests/v1"));
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(reg.request_count(), before);
    assert_eq!(reg.get_as("/v2/", None).status, 200);
    let after = reg.requests_since(before);
    assert_eq!(after.len(), 1);
    assert_eq!((after[0].method.as_str(), after[0].path.as_str(), after[0].status), ("GET", "/v2/", 200));
}

#[test]
fn same_seeds_give_same_digests() {
    let spec = images::LayerSpec::new(42, 3, 10_000);
    let (a, b) = (images::build_layer(&spec), images::build_layer(&spec));
    assert_eq!(a.digest, b.digest);
    assert_eq!(a.diff_id, b.diff_id);
    assert_ne!(a.digest, images::build_layer(&images::LayerSpec::new(43, 3, 10_000)).digest);
    // Incompressible: gzip adds only framing.
    assert!(a.blob.len() > 30_000);
}

#[test]
fn basic_auth_is_enforced() {
    if support::require_tool("skopeo").is_none() {
        return;
    }
    let Some(reg) = Registry::start_with_basic_auth("alice", "s3cret") else {
        return;
    };
    assert_eq!(reg.get_as("/v2/", None).status, 401);
    let challenge = reg.get_as("/v2/", None);
    assert!(challenge.header("www-authenticate").unwrap_or_default().starts_with("Basic"));
    assert_eq!(reg.get_as("/v2/", Some(("alice", "wrong"))).status, 401);
    assert_eq!(reg.get_as("/v2/", Some(("alice", "s3cret"))).status, 200);

    // The pusher authenticates with the registry's credentials.
    let img = images::push_image(&reg, "private/app", "v1", &[images::LayerSpec::new(7, 1, 4096)], Media::Oci);
    let url = format!("docker://{}/private/app:v1", reg.host());
    let raw = skopeo(&["inspect", "--tls-verify=false", "--creds", "alice:s3cret", "--raw", &url]);
    assert_eq!(sha256_digest(&raw), img.manifest_digest);
    let out =
        Command::new("skopeo").args(["inspect", "--tls-verify=false", "--no-creds", "--raw", &url]).output().unwrap();
    assert!(!out.status.success(), "anonymous pull must fail");
    assert!(reg.access_log().iter().any(|e| e.status == 401 && e.path.starts_with("/v2/private/app/manifests/")));
}

/// Pins the content negotiation of distribution 2.8, which a registry client
/// must get right: OCI types are served only to an exact Accept, and a tag
/// pull of Docker types without the right Accept is silently rewritten.
#[test]
fn registry_needs_explicit_accept_headers() {
    let Some(reg) = Registry::start() else { return };
    let spec = |seed| [images::LayerSpec::new(seed, 1, 100)];
    let oci = images::push_image(&reg, "q/oci", "v1", &spec(9), Media::Oci);
    let docker = images::push_image(&reg, "q/docker", "v1", &spec(10), Media::Docker);
    let plats = [("linux", "arm64"), ("linux", "amd64")];
    let list = images::push_index(&reg, "q/list", "v1", &plats, 60, (1, 100), Media::Docker);
    let get = |path: &str, accept: Option<&str>| {
        let h: Vec<(&str, &str)> = accept.iter().map(|a| ("Accept", *a)).collect();
        reg.call("GET", path, &h, &[])
    };

    // OCI manifest: 404 MANIFEST_UNKNOWN even for `*/*`, by tag and by digest.
    for r in ["v1", oci.manifest_digest.as_str()] {
        let path = format!("/v2/q/oci/manifests/{r}");
        for accept in [None, Some("*/*"), Some(images::DOCKER_MANIFEST)] {
            assert_eq!(get(&path, accept).status, 404);
        }
        assert_eq!(get(&path, Some(images::OCI_MANIFEST)).body, oci.manifest_bytes);
    }

    // Docker schema2 by tag without its Accept: converted to signed schema1.
    let resp = get("/v2/q/docker/manifests/v1", None);
    assert_eq!(resp.header("content-type"), Some("application/vnd.docker.distribution.manifest.v1+prettyjws"));
    assert_ne!(resp.header("docker-content-digest"), Some(docker.manifest_digest.as_str()));
    // By digest it is served as stored, whatever the Accept.
    assert_eq!(get(&format!("/v2/q/docker/manifests/{}", docker.manifest_digest), None).body, docker.manifest_bytes);

    // Docker manifest list by tag with only the schema2 Accept: the registry
    // picks linux/amd64 and serves that manifest instead of the list.
    let resp = get("/v2/q/list/manifests/v1", Some(images::DOCKER_MANIFEST));
    assert_eq!(resp.body, list.platform("linux", "amd64").unwrap().manifest_bytes);
    let all = [images::DOCKER_LIST, images::DOCKER_MANIFEST, images::OCI_INDEX, images::OCI_MANIFEST].join(", ");
    assert_eq!(get("/v2/q/list/manifests/v1", Some(&all)).body, list.index_bytes);
}
