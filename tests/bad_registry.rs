//! Registries that misbehave: a tiny axum "bad registry" on loopback serving
//! wrong digests, truncated bodies, 503/429 and unsupported manifests, plus
//! mirrors in front of (and behind) the real docker-registry. Every failure
//! must be a clear error naming the image, and nothing wrong may be cached.

mod support;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::Response;
use axum::routing::any;
use preseed::build::cache::BlobCache;
use serde_json::json;
use support::cli::preseed_without_credentials;
use support::images::{self, LayerSpec, Media};
use support::registry::{sha256_digest, Registry};

const REPO: &str = "bad/app";
const TAG: &str = "v1";
const SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";
const FOREIGN_LAYER: &str = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip";
/// What Docker Hub sends with a 429.
const TOO_MANY_REQUESTS: &str =
    r#"{"errors":[{"code":"TOOMANYREQUESTS","message":"You have reached your pull rate limit."}]}"#;

/// One image as the bad registry serves it.
#[derive(Clone)]
struct Image {
    /// The digest bundles.toml pins (normally the manifest's own).
    pinned: String,
    manifest: Vec<u8>,
    media_type: String,
    /// Config and layers: digest → bytes.
    blobs: BTreeMap<String, Vec<u8>>,
    layer: String,
}

impl Image {
    /// A valid one-layer OCI image (real gzip'd tar layer, matching config).
    fn oci(seed: u64) -> Image {
        let layer = images::build_layer(&LayerSpec::new(seed, 2, 48 << 10));
        let config = serde_json::to_vec(&json!({
            "architecture": "amd64",
            "os": "linux",
            "rootfs": { "type": "layers", "diff_ids": [layer.diff_id] },
        }))
        .unwrap();
        let config_digest = sha256_digest(&config);
        let manifest = serde_json::to_vec_pretty(&json!({
            "schemaVersion": 2,
            "mediaType": images::OCI_MANIFEST,
            "config": { "mediaType": images::OCI_CONFIG, "digest": config_digest, "size": config.len() },
            "layers": [{ "mediaType": images::OCI_LAYER_GZIP, "digest": layer.digest, "size": layer.blob.len() }],
        }))
        .unwrap();
        let blobs = BTreeMap::from([(config_digest, config), (layer.digest.clone(), layer.blob.clone())]);
        Image::with_manifest(images::OCI_MANIFEST, manifest, blobs, layer.digest.clone())
    }

    /// An image with these exact manifest bytes, pinned to their digest.
    fn with_manifest(media_type: &str, manifest: Vec<u8>, blobs: BTreeMap<String, Vec<u8>>, layer: String) -> Image {
        Image { pinned: sha256_digest(&manifest), manifest, media_type: media_type.into(), blobs, layer }
    }
}

/// How the bad registry answers one request.
#[derive(Clone, Debug)]
enum Reply {
    /// The right content.
    Ok,
    /// An error status with a body.
    Status(u16, &'static str),
    /// The right length and `Docker-Content-Digest`, one byte flipped.
    Corrupt,
    /// `Content-Length` of the whole blob, half of it sent, connection closed.
    Truncated,
}

/// Replies for one path: `first` in order, then `then` forever.
#[derive(Clone, Debug)]
struct Script {
    first: VecDeque<Reply>,
    then: Reply,
}

impl Script {
    fn always(reply: Reply) -> Script {
        Script { first: VecDeque::new(), then: reply }
    }
    fn first(replies: &[Reply]) -> Script {
        Script { first: replies.iter().cloned().collect(), then: Reply::Ok }
    }
}

#[derive(Default)]
struct Shared {
    image: Option<Image>,
    /// By blob digest or manifest reference.
    scripts: BTreeMap<String, Script>,
    /// `"GET /v2/… 200"` per request, in order.
    log: Vec<String>,
}

/// The bad registry: serves one image under [`REPO`], misbehaving as scripted.
struct BadRegistry {
    host: String,
    shared: Arc<Mutex<Shared>>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl BadRegistry {
    fn start(image: Image) -> BadRegistry {
        let shared = Arc::new(Mutex::new(Shared { image: Some(image), ..Default::default() }));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let host = listener.local_addr().unwrap().to_string();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let app =
            axum::Router::new().route("/v2/", any(serve)).route("/v2/{*rest}", any(serve)).with_state(shared.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                axum::serve(listener, app)
                    .with_graceful_shutdown(async {
                        let _ = rx.await;
                    })
                    .await
                    .unwrap();
            });
        });
        BadRegistry { host, shared, shutdown: Some(tx), thread: Some(thread) }
    }

    /// Scripts the replies for a blob digest or manifest reference.
    fn script(&self, key: &str, script: Script) {
        self.shared.lock().unwrap().scripts.insert(key.to_string(), script);
    }

    /// Requests whose path ends with `suffix`, as `"GET /v2/… 200"`.
    fn requests(&self, suffix: &str) -> Vec<String> {
        let log = &self.shared.lock().unwrap().log;
        log.iter().filter(|l| l.split(' ').nth(1).is_some_and(|p| p.ends_with(suffix))).cloned().collect()
    }
}

impl Drop for BadRegistry {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn serve(State(shared): State<Arc<Mutex<Shared>>>, req: Request) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let mut shared = shared.lock().unwrap();
    let response = answer(&mut shared, &method, &path);
    shared.log.push(format!("{method} {path} {}", response.status().as_u16()));
    response
}

fn answer(shared: &mut Shared, method: &Method, path: &str) -> Response {
    if path == "/v2/" {
        return respond(StatusCode::OK, &[], Body::from("{}"));
    }
    let image = shared.image.clone().expect("image");
    let not_found = || status(404, r#"{"errors":[{"code":"NOT_FOUND","message":"not here"}]}"#);
    let (content_type, bytes, key) = if let Some(reference) = path.strip_prefix(&format!("/v2/{REPO}/manifests/")) {
        if reference != image.pinned && reference != TAG {
            return not_found();
        }
        (image.media_type.clone(), image.manifest.clone(), reference.to_string())
    } else if let Some(digest) = path.strip_prefix(&format!("/v2/{REPO}/blobs/")) {
        match image.blobs.get(digest) {
            Some(b) => ("application/octet-stream".to_string(), b.clone(), digest.to_string()),
            None => return not_found(),
        }
    } else {
        return not_found();
    };
    let reply = match shared.scripts.get_mut(&key) {
        Some(s) => s.first.pop_front().unwrap_or_else(|| s.then.clone()),
        None => Reply::Ok,
    };
    let headers =
        [(header::CONTENT_TYPE, content_type), (header::HeaderName::from_static("docker-content-digest"), key.clone())];
    let full = |bytes: Vec<u8>| {
        let len = bytes.len().to_string();
        let body = if method == Method::HEAD { Body::empty() } else { Body::from(bytes) };
        let mut r = respond(StatusCode::OK, &headers, body);
        r.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from_str(&len).unwrap());
        r
    };
    match reply {
        Reply::Ok => full(bytes),
        Reply::Status(code, body) => status(code, body),
        Reply::Corrupt => {
            let mut bytes = bytes;
            let mid = bytes.len() / 2;
            bytes[mid] ^= 0xff;
            full(bytes)
        }
        Reply::Truncated => {
            let len = bytes.len();
            let half = Bytes::from(bytes[..len / 2].to_vec());
            // A body that fails half-way makes hyper drop the connection.
            let chunks: Vec<Result<Bytes, std::io::Error>> =
                vec![Ok(half), Err(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "bad registry hangs up"))];
            let mut r = respond(StatusCode::OK, &headers, Body::from_stream(futures_util::stream::iter(chunks)));
            r.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from_str(&len.to_string()).unwrap());
            r
        }
    }
}

fn status(code: u16, body: &'static str) -> Response {
    let mut r = respond(StatusCode::from_u16(code).unwrap(), &[], Body::from(body));
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if code == 429 || code == 503 {
        r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    r
}

fn respond(code: StatusCode, headers: &[(header::HeaderName, String)], body: Body) -> Response {
    let mut r = Response::new(body);
    *r.status_mut() = code;
    for (k, v) in headers {
        r.headers_mut().insert(k.clone(), HeaderValue::from_str(v).unwrap());
    }
    r
}

/// One `preseed bundle` run in its own temp dir.
struct Run {
    ok: bool,
    stderr: String,
    cache: PathBuf,
    out: PathBuf,
    seconds: f64,
    _dir: tempfile::TempDir,
}

impl Run {
    fn assert_ok(&self) {
        assert!(self.ok, "preseed bundle failed:\n{}", self.stderr);
        assert!(self.out.join("preseed.squashfs").is_file(), "no partition written");
    }

    fn assert_failed(&self, needles: &[&str]) {
        assert!(!self.ok, "preseed bundle should have failed:\n{}", self.stderr);
        eprintln!("{}", self.stderr);
        for n in needles {
            assert!(self.stderr.contains(n), "stderr should contain {n:?}:\n{}", self.stderr);
        }
    }

    /// Nothing is named in the cache unless its bytes hash to the name, no
    /// temp file survives the next open, and `digest` is not there.
    fn assert_not_cached(&self, digest: &str) {
        let cache = BlobCache::open(&self.cache).unwrap();
        assert!(cache.verify_all().unwrap().is_empty(), "a cached blob does not match its name");
        let names = cache_names(&self.cache);
        assert!(!names.contains(digest.trim_start_matches("sha256:")), "{digest} is in the cache");
        assert!(!names.iter().any(|n| n.starts_with(".tmp")), "temp files left: {names:?}");
    }
}

fn cache_names(cache: &Path) -> BTreeSet<String> {
    match std::fs::read_dir(cache.join("blobs/sha256")) {
        Ok(d) => d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect(),
        Err(_) => BTreeSet::new(),
    }
}

fn bundle(manifest_text: &str) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("bundles.toml");
    std::fs::write(&manifest, manifest_text).unwrap();
    let (cache, out) = (dir.path().join("cache"), dir.path().join("out"));
    let start = Instant::now();
    let mut args = vec!["bundle", "--no-progress", "--format", "squashfs", "--manifest", manifest.to_str().unwrap()];
    args.extend(["--out", out.to_str().unwrap(), "--cache", cache.to_str().unwrap()]);
    let output = preseed_without_credentials(&args);
    Run {
        ok: output.status.success(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        cache,
        out,
        seconds: start.elapsed().as_secs_f64(),
        _dir: dir,
    }
}

/// bundles.toml: `host` insecure, one image `host/REPO:TAG@digest`.
fn manifest_for(host: &str, digest: &str) -> String {
    format!("[registries.\"{host}\"]\ninsecure = true\n\n[[image]]\nref = \"{host}/{REPO}:{TAG}@{digest}\"\n")
}

/// The image's name as error messages give it.
fn name(host: &str) -> String {
    format!("{host}/{REPO}:{TAG}")
}

/// A loopback port nothing listens on.
fn closed_host() -> String {
    format!("127.0.0.1:{}", support::free_port())
}

#[test]
fn blob_with_wrong_digest_is_refused_and_not_cached() {
    let image = Image::oci(1001);
    let layer = image.layer.clone();
    let reg = BadRegistry::start(image.clone());
    reg.script(&layer, Script::always(Reply::Corrupt));
    let run = bundle(&manifest_for(&reg.host, &image.pinned));
    let mut corrupt = image.blobs[&layer].clone();
    let mid = corrupt.len() / 2;
    corrupt[mid] ^= 0xff;
    let found = sha256_digest(&corrupt);
    run.assert_failed(&[&name(&reg.host), "digest mismatch", &format!("expected {layer}"), &found]);
    run.assert_not_cached(&layer);
    // Wrong content is not a dropped connection: no retry against the same host.
    assert_eq!(reg.requests(&layer).len(), 1, "{:?}", reg.requests(&layer));
    // The intact blobs (manifest, config) were kept; the run can be resumed.
    assert!(cache_names(&run.cache).contains(image.pinned.trim_start_matches("sha256:")));
}

#[test]
fn truncated_blob_is_a_clear_error_and_not_cached() {
    let image = Image::oci(1002);
    let layer = image.layer.clone();
    let reg = BadRegistry::start(image.clone());
    reg.script(&layer, Script::always(Reply::Truncated));
    let run = bundle(&manifest_for(&reg.host, &image.pinned));
    run.assert_failed(&[&name(&reg.host), &format!("registry {}", reg.host)]);
    let stderr = run.stderr.to_lowercase();
    assert!(stderr.contains("body") || stderr.contains("connection") || stderr.contains("closed"), "{}", run.stderr);
    run.assert_not_cached(&layer);
    // A dropped connection is transient: it was retried before giving up.
    let gets = reg.requests(&layer).len();
    assert!(gets > 1, "truncated blob fetched {gets} times, not retried");
}

#[test]
fn truncated_blob_once_then_complete_succeeds() {
    let image = Image::oci(1003);
    let layer = image.layer.clone();
    let reg = BadRegistry::start(image.clone());
    reg.script(&layer, Script::first(&[Reply::Truncated]));
    let run = bundle(&manifest_for(&reg.host, &image.pinned));
    run.assert_ok();
    assert_eq!(reg.requests(&layer).len(), 2, "{:?}", reg.requests(&layer));
    assert!(BlobCache::open(&run.cache).unwrap().verify_all().unwrap().is_empty());
}

#[test]
fn retries_503_and_429_with_backoff_then_succeeds() {
    let image = Image::oci(1004);
    let layer = image.layer.clone();
    let reg = BadRegistry::start(image.clone());
    reg.script(&layer, Script::first(&[Reply::Status(503, "upstream down"), Reply::Status(429, TOO_MANY_REQUESTS)]));
    // The manifest too, with a bare 503.
    reg.script(&image.pinned, Script::first(&[Reply::Status(503, "")]));
    let run = bundle(&manifest_for(&reg.host, &image.pinned));
    run.assert_ok();
    let gets = reg.requests(&layer);
    assert_eq!(gets.len(), 3, "{gets:?}");
    assert!(gets[0].ends_with(" 503") && gets[1].ends_with(" 429") && gets[2].ends_with(" 200"), "{gets:?}");
    let manifest_gets: Vec<_> = reg.requests(&image.pinned).into_iter().filter(|r| r.contains("/manifests/")).collect();
    assert!(manifest_gets.len() == 2 && manifest_gets[1].ends_with(" 200"), "{manifest_gets:?}");
    // Backoff: 200 ms + 400 ms for the blob, 200 ms for the manifest, at least.
    assert!(run.seconds >= 0.8, "retried without backing off ({:.2}s)", run.seconds);
}

#[test]
fn manifest_not_matching_the_pinned_digest_is_refused() {
    let mut image = Image::oci(1005);
    // Served: the pinned manifest plus a newline. Same JSON, other bytes.
    let pinned = image.pinned.clone();
    image.manifest.push(b'\n');
    let found = sha256_digest(&image.manifest);
    let reg = BadRegistry::start(image.clone());
    let run = bundle(&manifest_for(&reg.host, &pinned));
    run.assert_failed(&[&name(&reg.host), "digest mismatch", &format!("expected {pinned}"), &found]);
    run.assert_not_cached(&pinned);
    assert!(reg.requests(&image.layer).is_empty(), "fetched layers of an unverified manifest");
}

#[test]
fn schema1_manifest_is_unsupported() {
    let manifest = serde_json::to_vec_pretty(&json!({
        "schemaVersion": 1,
        "name": REPO,
        "tag": TAG,
        "architecture": "amd64",
        "fsLayers": [{ "blobSum": "sha256:a3ed95caeb02ffe68cdd9fd84406680ae93d633cb16422d00e8a7c22955b46d4" }],
        "history": [{ "v1Compatibility": "{\"id\":\"e45a5af57b00862e5ef5782a9925979a02ba2b12dff832fd0991335f4a11e5c5\"}" }],
        "signatures": [{ "header": { "alg": "ES256" }, "signature": "c2lnbmF0dXJl", "protected": "e30" }],
    }))
    .unwrap();
    let image = Image::with_manifest(SCHEMA1, manifest, BTreeMap::new(), String::new());
    let reg = BadRegistry::start(image.clone());
    let run = bundle(&manifest_for(&reg.host, &image.pinned));
    run.assert_failed(&[&name(&reg.host), "schema1"]);
    assert!(run.stderr.contains("unsupported"), "{}", run.stderr);
}

#[test]
fn foreign_layer_is_refused() {
    let base = Image::oci(1006);
    let config = base.blobs.iter().find(|(d, _)| **d != base.layer).unwrap();
    let foreign = "sha256:8d2ba5fa2fb4b2b4a1bd4d1d3e7e4b4e3c2b8a0e4d6f4d9c1a6e0e1f4d2c3b4a";
    let manifest = serde_json::to_vec_pretty(&json!({
        "schemaVersion": 2,
        "mediaType": images::DOCKER_MANIFEST,
        "config": { "mediaType": images::DOCKER_CONFIG, "digest": config.0, "size": config.1.len() },
        "layers": [
            { "mediaType": FOREIGN_LAYER, "digest": foreign, "size": 1_000_000,
              "urls": ["https://mcr.microsoft.com/v2/windows/servercore/blobs/" ] },
            { "mediaType": images::DOCKER_LAYER_GZIP, "digest": base.layer, "size": base.blobs[&base.layer].len() },
        ],
    }))
    .unwrap();
    let image = Image::with_manifest(images::DOCKER_MANIFEST, manifest, base.blobs.clone(), base.layer.clone());
    let reg = BadRegistry::start(image.clone());
    let run = bundle(&manifest_for(&reg.host, &image.pinned));
    run.assert_failed(&[&name(&reg.host), "foreign layer", foreign]);
    assert!(reg.requests(&image.layer).is_empty(), "fetched layers of a refused image");
}

/// The image ref names a host that is down; its mirror (the real registry) serves it.
#[test]
fn mirror_serves_when_the_registry_is_down() {
    let Some(reg) = Registry::start() else { return };
    let pushed = images::push_image(&reg, REPO, TAG, &[LayerSpec::new(1010, 2, 16 << 10)], Media::Oci);
    let (real, down) = (reg.host(), closed_host());
    let text = format!(
        "[registries.\"{down}\"]\ninsecure = true\nmirrors = [\"{real}\"]\n\n[registries.\"{real}\"]\ninsecure = true\n\n\
         [[image]]\nref = \"{down}/{REPO}:{TAG}@{}\"\n",
        pushed.manifest_digest
    );
    let before = reg.request_count();
    let run = bundle(&text);
    run.assert_ok();
    let served = reg.requests_since(before);
    for d in pushed.blob_digests.keys().chain([&pushed.manifest_digest]) {
        assert!(
            served.iter().any(|r| r.method == "GET" && r.path.ends_with(d.as_str()) && matches!(r.status, 200 | 206)),
            "{d} not from the mirror"
        );
    }
    let names = cache_names(&run.cache);
    for d in pushed.blob_digests.keys() {
        assert!(names.contains(d.trim_start_matches("sha256:")), "{d} not cached");
    }
}

/// A mirror that is down is skipped; the registry itself serves.
#[test]
fn registry_serves_when_the_mirror_is_down() {
    let Some(reg) = Registry::start() else { return };
    let pushed = images::push_image(&reg, REPO, TAG, &[LayerSpec::new(1011, 2, 16 << 10)], Media::Oci);
    let (real, down) = (reg.host(), closed_host());
    let text = format!(
        "[registries.\"{real}\"]\ninsecure = true\nmirrors = [\"{down}\"]\n\n[registries.\"{down}\"]\ninsecure = true\n\n\
         [[image]]\nref = \"{real}/{REPO}:{TAG}@{}\"\n",
        pushed.manifest_digest
    );
    let run = bundle(&text);
    run.assert_ok();
}

/// A mirror serving a corrupt layer: the layer comes from the registry
/// instead, and the corrupt bytes are never cached.
#[test]
fn corrupt_mirror_falls_back_to_the_registry() {
    let Some(reg) = Registry::start() else { return };
    let pushed = images::push_image(&reg, REPO, TAG, &[LayerSpec::new(1012, 2, 48 << 10)], Media::Oci);
    // The mirror holds the same image, byte for byte.
    let blobs = pushed
        .blob_digests
        .keys()
        .map(|d| (d.clone(), reg.call("GET", &format!("/v2/{REPO}/blobs/{d}"), &[], &[]).body))
        .collect();
    let layer = pushed.layer_digests[0].clone();
    let mirror = BadRegistry::start(Image::with_manifest(
        images::OCI_MANIFEST,
        pushed.manifest_bytes.clone(),
        blobs,
        layer.clone(),
    ));
    mirror.script(&layer, Script::always(Reply::Corrupt));
    let (real, bad) = (reg.host(), mirror.host.clone());
    let text = format!(
        "[registries.\"{real}\"]\ninsecure = true\nmirrors = [\"{bad}\"]\n\n[registries.\"{bad}\"]\ninsecure = true\n\n\
         [[image]]\nref = \"{real}/{REPO}:{TAG}@{}\"\n",
        pushed.manifest_digest
    );
    let run = bundle(&text);
    run.assert_ok();
    assert_eq!(mirror.requests(&layer).len(), 1, "the mirror's corrupt layer: {:?}", mirror.requests(&layer));
    assert!(mirror.requests(&pushed.config_digest).iter().all(|r| r.ends_with(" 200")), "config from the mirror");
    assert!(reg.log_contains(&format!("GET /v2/{REPO}/blobs/{layer}")), "the layer did not come from the registry");
    assert!(BlobCache::open(&run.cache).unwrap().verify_all().unwrap().is_empty());
}

/// A refused connection on an explicit port means nothing listens there:
/// `insecure = true` would not help, so it is not suggested.
#[test]
fn unreachable_registry_says_nothing_answers() {
    let down = closed_host();
    let digest = sha256_digest(b"nothing");
    let text = format!("[[image]]\nref = \"{down}/{REPO}:{TAG}@{digest}\"\n");
    let run = bundle(&text);
    run.assert_failed(&[&name(&down), "connection refused", "is the registry running"]);
    assert!(!run.stderr.contains("insecure = true"), "{}", run.stderr);
}

/// The common mistake: a plain-HTTP registry without `insecure = true`.
#[test]
fn plain_http_registry_not_marked_insecure_suggests_insecure() {
    let image = Image::oci(1007);
    let reg = BadRegistry::start(image.clone());
    let host = &reg.host;
    let text = format!("[[image]]\nref = \"{host}/{REPO}:{TAG}@{}\"\n", image.pinned);
    let run = bundle(&text);
    run.assert_failed(&[&name(host), &format!("[registries.\"{host}\"] insecure = true")]);
    assert!(reg.requests("").is_empty(), "plain HTTP was used for a host not marked insecure");
}
