//! `preseed serve` with real clients: a partition bundled from real
//! registries (Debian docker-registry), the registries stopped, the
//! partition served by the `preseed` binary, then `skopeo inspect`/`copy`
//! and `ctr images pull --hosts-dir` (a `hosts.toml` mirroring the original
//! registry host) of every image by tag and by digest. Two registries hold
//! a repository of the same name: containerd's `?ns=` tells them apart.
//! And the load test: 100 concurrent downloads of a large layer keep the
//! server's peak RSS under 64 MiB; clients that go away mid-blob cost
//! nothing; malformed requests get a 4xx.

mod support;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};
use support::cli::{self, ok, preseed_without_credentials};
use support::containerd::Containerd;
use support::images::{self, LayerSpec, Media};
use support::registry::Registry;
use support::served::Served;

/// `preseed bundle` of `manifest` into `dir/out`; returns the partition image.
fn bundle(dir: &Path, manifest: &str) -> PathBuf {
    std::fs::write(dir.join("bundles.toml"), manifest).unwrap();
    let d = |p: &str| dir.join(p).display().to_string();
    let out = preseed_without_credentials(&[
        "bundle",
        "--no-progress",
        "--manifest",
        &d("bundles.toml"),
        "--out",
        &d("out"),
        "--cache",
        &d("cache"),
    ]);
    eprintln!("{}", ok("preseed bundle", &out));
    dir.join("out/preseed.erofs")
}

/// One HTTP/1.1 exchange over a fresh connection: (status, headers, body).
fn http(addr: &str, raw: &[u8]) -> (u16, BTreeMap<String, String>, Vec<u8>) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(raw).unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or_else(|| {
        panic!("no HTTP response to {:?}: {:?}", String::from_utf8_lossy(raw), String::from_utf8_lossy(&buf))
    });
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers, buf[end + 4..].to_vec())
}

fn get(addr: &str, method: &str, path: &str, extra: &str) -> (u16, BTreeMap<String, String>, Vec<u8>) {
    http(addr, format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{extra}\r\n").as_bytes())
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

fn skopeo(args: &[&str]) -> String {
    cli::run(&format!("skopeo {args:?}"), Command::new("skopeo").args(args))
}

/// `hosts_dir/<host>/hosts.toml`: `host` (plain HTTP, now gone) mirrored by
/// the server, as a node would configure containerd (`config_path`).
fn write_hosts_toml(hosts_dir: &Path, host: &str, mirror: &str) {
    let dir = hosts_dir.join(host);
    std::fs::create_dir_all(&dir).unwrap();
    let text =
        format!("server = \"http://{host}\"\n\n[host.\"http://{mirror}\"]\n  capabilities = [\"pull\", \"resolve\"]\n");
    std::fs::write(dir.join("hosts.toml"), text).unwrap();
}

#[test]
fn skopeo_and_containerd_pull_every_image_from_a_served_partition() {
    if !support::require_root() || support::require_tool("skopeo").is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (corpus, other, other_host, partition);
    {
        let Some(reg) = Registry::start() else { return };
        let Some(reg2) = Registry::start() else { return };
        corpus = images::push_test_corpus(&reg);
        // Another registry with a repository of the same name, other content.
        other = images::push_image(&reg2, "corpus/app-a", "v1", &[LayerSpec::new(777, 2, 16 << 10)], Media::Docker);
        other_host = reg2.host();
        let mut text = format!(
            "[partition]\nplatforms = [\"linux/amd64\"]\n\n[registries.\"{0}\"]\ninsecure = true\n\n[registries.\"{other_host}\"]\ninsecure = true\n",
            corpus.host
        );
        for image in &corpus.images {
            text += &format!("\n[[image]]\nref = \"{}\"\nfile = \"{}\"\n", image.reference(&corpus.host), image.name);
            if image.name == "multi" {
                text += "platforms = [\"linux/amd64\", \"linux/arm64\"]\n";
            }
            if image.name == "app-b" {
                text += "names = [\"registry.local/team/app-b:stable\"]\nnamespace = \"apps\"\n";
            }
        }
        text += &format!(
            "\n[[image]]\nref = \"{other_host}/corpus/app-a:v1@{}\"\nfile = \"other-app-a\"\n",
            other.manifest_digest
        );
        partition = bundle(dir.path(), &text);
        // Both registries stop here.
    }
    let mut served = Served::image(&partition);
    let addr = served.addr.clone();

    // The API itself: catalog, tags, errors, ns and host prefixes.
    let (status, _, body) = get(&addr, "GET", "/v2/_catalog", "");
    assert_eq!(status, 200);
    let repos: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let mut expected: Vec<String> = corpus.images.iter().map(|i| i.repo.clone()).collect();
    expected.push("team/app-b".into());
    expected.sort();
    assert_eq!(repos["repositories"], serde_json::json!(expected));
    let (status, headers, body) = get(&addr, "GET", "/v2/_catalog?n=2", "");
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&body).unwrap()["repositories"].as_array().unwrap().len(),
        2
    );
    assert!(headers["link"].contains("rel=\"next\""), "{headers:?}");
    let (status, _, body) = get(&addr, "GET", "/v2/corpus/many/tags/list", "");
    assert_eq!(
        (status, serde_json::from_slice::<serde_json::Value>(&body).unwrap()["tags"].clone()),
        (200, serde_json::json!(["v1"]))
    );
    // Same repository, two registries: the ns parameter or a host prefix picks one.
    let a = corpus.image("app-a");
    let ns = |h: &str| h.replace(':', "%3A");
    for (query, digest) in
        [(format!("?ns={}", ns(&corpus.host)), &a.digest), (format!("?ns={}", ns(&other_host)), &other.manifest_digest)]
    {
        let (status, headers, body) = get(&addr, "GET", &format!("/v2/corpus/app-a/manifests/v1{query}"), "");
        assert_eq!(status, 200, "{query}: {}", String::from_utf8_lossy(&body));
        assert_eq!(&headers["docker-content-digest"], digest);
        assert_eq!(&sha256(&body), digest);
    }
    let (status, headers, _) = get(&addr, "HEAD", &format!("/v2/{}/corpus/app-a/manifests/v1", other_host), "");
    assert_eq!((status, headers["docker-content-digest"].as_str()), (200, other.manifest_digest.as_str()));
    assert_eq!(headers["content-type"], images::DOCKER_MANIFEST);
    // Without either, tags are those of the host that sorts first (neither
    // is docker.io); a digest is found under any host.
    let first = if other_host < corpus.host { &other.manifest_digest } else { &a.digest };
    let (_, headers, _) = get(&addr, "HEAD", "/v2/corpus/app-a/manifests/v1", "");
    assert_eq!(&headers["docker-content-digest"], first);
    for digest in [&a.digest, &other.manifest_digest] {
        let (status, _, body) = get(&addr, "GET", &format!("/v2/corpus/app-a/manifests/{digest}"), "");
        assert_eq!((status, &sha256(&body)), (200, digest));
    }
    let (status, _, body) = get(&addr, "GET", "/v2/corpus/app-a/manifests/v1?ns=quay.io", "");
    assert_eq!(status, 404);
    assert!(String::from_utf8_lossy(&body).contains("NAME_UNKNOWN"));
    let (status, _, body) = get(&addr, "GET", "/v2/corpus/app-a/manifests/v9", "");
    assert_eq!(status, 404);
    assert!(String::from_utf8_lossy(&body).contains("MANIFEST_UNKNOWN"));
    let (status, _, body) = get(&addr, "PUT", "/v2/corpus/app-a/manifests/v1", "Content-Length: 0\r\n");
    assert_eq!(status, 405);
    assert!(String::from_utf8_lossy(&body).contains("UNSUPPORTED"));
    let (status, _, _) = get(&addr, "POST", "/v2/corpus/app-a/blobs/uploads/", "Content-Length: 0\r\n");
    assert_eq!(status, 405);
    let (status, _, _) = get(&addr, "DELETE", &format!("/v2/corpus/app-a/manifests/{}", a.digest), "");
    assert_eq!(status, 405);
    // A blob of one repository is not served under another.
    let (status, _, _) = get(&addr, "HEAD", &format!("/v2/corpus/many/blobs/{}", corpus.base_layer), "");
    assert_eq!(status, 404);
    // Blobs: HEAD, GET, Range.
    let base_size = a.blobs[&corpus.base_layer];
    let path = format!("/v2/corpus/app-a/blobs/{}?ns={}", corpus.base_layer, ns(&corpus.host));
    let (status, headers, body) = get(&addr, "HEAD", &path, "");
    assert_eq!((status, headers["content-length"].parse::<u64>().unwrap(), body.len()), (200, base_size, 0));
    let (status, _, body) = get(&addr, "GET", &path, "");
    assert_eq!((status, sha256(&body)), (200, corpus.base_layer.clone()));
    let (status, headers, part) = get(&addr, "GET", &path, "Range: bytes=1000-1999\r\n");
    assert_eq!((status, &part[..]), (206, &body[1000..2000]));
    assert_eq!(headers["content-range"], format!("bytes 1000-1999/{base_size}"));
    let (status, _, part) = get(&addr, "GET", &path, "Range: bytes=-10\r\n");
    assert_eq!((status, &part[..]), (206, &body[body.len() - 10..]));
    let (status, _, _) = get(&addr, "GET", &path, &format!("Range: bytes={base_size}-\r\n"));
    assert_eq!(status, 416);

    // skopeo, by tag and by digest: the pinned bytes, every blob verified by copy.
    let tls = "--tls-verify=false";
    for image in &corpus.images {
        for reference in [format!("{}:{}", image.repo, image.tag), format!("{}@{}", image.repo, image.digest)] {
            let src = format!("docker://{addr}/{reference}");
            // skopeo cannot send ns: app-a's tag is the first host's.
            let expected = if image.name == "app-a" && !reference.contains('@') { first } else { &image.digest };
            let raw = skopeo(&["inspect", tls, "--raw", &src]);
            assert_eq!(&sha256(raw.as_bytes()), expected, "skopeo inspect --raw {src}");
            let inspected: serde_json::Value = serde_json::from_str(&skopeo(&["inspect", tls, &src])).unwrap();
            if !image.is_index() {
                assert_eq!(&inspected["Digest"], expected, "skopeo inspect {src}");
            }
            let dest = dir.path().join(format!("copy-{}-{}", image.name, reference.contains('@')));
            // `dir:` keeps the manifest as served (`oci:` would convert Docker media types).
            skopeo(&["copy", "--all", "--src-tls-verify=false", &src, &format!("dir:{}", dest.display())]);
            let copied = std::fs::read(dest.join("manifest.json")).unwrap();
            assert_eq!(&sha256(&copied), expected, "skopeo copy {src}");
        }
    }
    let extra = format!("docker://{addr}/team/app-b:stable");
    assert_eq!(sha256(skopeo(&["inspect", tls, "--raw", &extra]).as_bytes()), corpus.image("app-b").digest);

    // CRI-O and podman read mirrors from registries.conf (containers/image,
    // as skopeo does): the original host's name, answered by the server.
    let conf = dir.path().join("registries.conf");
    std::fs::write(
        &conf,
        format!(
            "[[registry]]\nprefix = \"{0}\"\nlocation = \"{0}\"\ninsecure = true\n\n[[registry.mirror]]\nlocation = \"{addr}\"\ninsecure = true\n",
            corpus.host
        ),
    )
    .unwrap();
    for image in &corpus.images {
        for reference in [format!("{}:{}", image.repo, image.tag), format!("{}@{}", image.repo, image.digest)] {
            let src = format!("docker://{}/{reference}", corpus.host);
            let out = Command::new("skopeo")
                .arg("--registries-conf")
                .arg(&conf)
                .args(["inspect", "--raw", &src])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "skopeo inspect {src} via registries.conf: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            // No ns here either: app-a's tag is the first host's.
            let expected = if image.name == "app-a" && !reference.contains('@') { first } else { &image.digest };
            assert_eq!(&sha256(&out.stdout), expected, "{src} via registries.conf");
        }
    }

    // containerd, configured as a node would be: hosts.toml mirrors each
    // (stopped) registry host to the server, which tells them apart by ns.
    let Some(ctrd) = Containerd::start() else { return };
    let hosts = dir.path().join("certs.d");
    write_hosts_toml(&hosts, &corpus.host, &addr);
    write_hosts_toml(&hosts, &other_host, &addr);
    let hosts_arg = hosts.display().to_string();
    let mut pulls: Vec<(String, String)> = Vec::new();
    for image in &corpus.images {
        let name = format!("{}/{}", corpus.host, image.repo);
        pulls.push((format!("{name}:{}", image.tag), image.digest.clone()));
        pulls.push((format!("{name}@{}", image.digest), image.digest.clone()));
    }
    pulls.push((format!("{other_host}/corpus/app-a:v1"), other.manifest_digest.clone()));
    for (reference, digest) in &pulls {
        let start = Instant::now();
        ctrd.ctr_ok(&["-n", "k8s.io", "images", "pull", "--all-platforms", "--hosts-dir", &hosts_arg, reference]);
        eprintln!("ctr images pull {reference}: {:.2}s", start.elapsed().as_secs_f64());
        let listed = ctrd.ctr_ok(&["-n", "k8s.io", "images", "ls"]);
        let row = listed
            .lines()
            .find(|l| l.split_whitespace().next() == Some(reference.as_str()))
            .unwrap_or_else(|| panic!("{reference} not in\n{listed}"));
        assert!(row.contains(digest.as_str()), "{reference} is not {digest}: {row}");
    }
    // Every blob made it: containerd can check the content it was given.
    let check = ctrd.ctr_ok(&["-n", "k8s.io", "images", "check"]);
    assert!(!check.contains("incomplete") && !check.contains("missing"), "{check}");
    served.assert_running();
    served.stop();
}

/// bytes read by a process so far (`rchar`: every pread of a tarball).
fn rchar(pid: u32) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap();
    io.lines().find_map(|l| l.strip_prefix("rchar:")).unwrap().trim().parse().unwrap()
}

fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
}

#[test]
fn a_hundred_downloads_of_a_large_layer_stay_under_64_mib() {
    if !support::require_root() {
        return;
    }
    const CLIENTS: usize = 100;
    // 3 × 32 MiB of random bytes: a ~96 MiB layer, more than the whole
    // memory budget, so buffering one blob whole would already fail.
    let big = LayerSpec::new(9001, 3, 32 << 20);
    let dir = tempfile::tempdir().unwrap();
    let (pushed, host, partition);
    {
        let Some(reg) = Registry::start() else { return };
        pushed = images::push_image(&reg, "load/big", "1", &[big], Media::Oci);
        host = reg.host();
        let text = format!(
            "[registries.\"{host}\"]\ninsecure = true\n\n[[image]]\nref = \"{host}/load/big:1@{}\"\n",
            pushed.manifest_digest
        );
        partition = bundle(dir.path(), &text);
    }
    let layer = pushed.layer_digests[0].clone();
    let size = pushed.blob_digests[&layer];
    let mut served = Served::image(&partition);
    let (addr, pid) = (served.addr.clone(), served.pid());
    let path = format!("/v2/load/big/blobs/{layer}");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let rss_start = status_kib(pid, "VmRSS:");
    let fds_start = open_fds(pid);

    // 100 concurrent whole downloads; two of them hash what they get.
    let start = Instant::now();
    let got: Vec<(u64, Option<String>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..CLIENTS)
            .map(|i| {
                let (addr, request) = (&addr, &request);
                s.spawn(move || {
                    let mut c = TcpStream::connect(addr).unwrap();
                    c.write_all(request.as_bytes()).unwrap();
                    let mut hasher = (i % 50 == 0).then(Sha256::new);
                    let mut buf = vec![0u8; 256 << 10];
                    let mut head = Vec::new();
                    let mut body = 0u64;
                    loop {
                        let n = c.read(&mut buf).unwrap();
                        if n == 0 {
                            break;
                        }
                        let mut data = &buf[..n];
                        if head.is_empty() || !head.ends_with(b"\r\n\r\n") {
                            // Still in the response head: split it off.
                            let mut k = 0;
                            while k < data.len() && !head.ends_with(b"\r\n\r\n") {
                                head.push(data[k]);
                                k += 1;
                            }
                            data = &data[k..];
                        }
                        body += data.len() as u64;
                        if let Some(h) = hasher.as_mut() {
                            h.update(data);
                        }
                    }
                    assert!(head.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&head));
                    (body, hasher.map(|h| format!("sha256:{}", hex::encode(h.finalize()))))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let secs = start.elapsed().as_secs_f64();
    let total: u64 = got.iter().map(|(n, _)| n).sum();
    for (n, digest) in &got {
        assert_eq!(*n, size, "a download got {n} of {size} bytes");
        if let Some(d) = digest {
            assert_eq!(*d, layer);
        }
    }
    let hwm = status_kib(pid, "VmHWM:");
    eprintln!(
        "{CLIENTS} × {} MiB layer: {:.1} s, {:.0} MiB/s; server RSS {} MiB at start, peak {} MiB",
        size >> 20,
        secs,
        total as f64 / secs / (1 << 20) as f64,
        rss_start >> 10,
        hwm >> 10
    );
    assert!(hwm < 64 << 10, "peak RSS {hwm} KiB under {CLIENTS} downloads: over 64 MiB");

    // Clients that go away mid-blob: the reads for them stop, their
    // connections and descriptors are gone, and nothing stays in memory.
    let read_before = rchar(pid);
    for _ in 0..CLIENTS / 2 {
        let mut c = TcpStream::connect(&addr).unwrap();
        c.write_all(request.as_bytes()).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        c.read_exact(&mut buf).unwrap();
        drop(c);
    }
    let settle = Instant::now() + Duration::from_secs(30);
    while open_fds(pid) > fds_start && Instant::now() < settle {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(open_fds(pid), fds_start, "descriptors left behind by clients that went away");
    // A chunk read already handed to the blocking pool when its client
    // went away still completes (those reads cannot be cancelled), so the
    // count may move by up to one chunk per client; after that it must stop.
    let fds_gone = rchar(pid);
    let (mut read_after_disconnect, settle) = (fds_gone, Instant::now() + Duration::from_secs(30));
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let now = rchar(pid);
        if now == read_after_disconnect {
            break;
        }
        assert!(Instant::now() < settle, "still reading blobs 30 s after their clients went away");
        read_after_disconnect = now;
    }
    let late = read_after_disconnect - fds_gone;
    assert!(
        late <= (CLIENTS as u64 / 2) * preseed::node::serve::http::CHUNK as u64,
        "read {late} bytes after the clients' connections were closed: more than one chunk each"
    );
    let wasted = read_after_disconnect - read_before;
    eprintln!(
        "{} clients left after 1 MiB each: {} MiB read for them (of {} MiB had they stayed)",
        CLIENTS / 2,
        wasted >> 20,
        (CLIENTS as u64 / 2 * size) >> 20
    );
    assert!(wasted < CLIENTS as u64 / 2 * size / 4, "read {wasted} bytes for clients that left early");
    assert!(status_kib(pid, "VmHWM:") < 64 << 10);

    // Malformed requests: a 4xx each, and the server carries on.
    let long_header = format!("GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Long: {}\r\n\r\n", "a".repeat(200 << 10));
    let cases: Vec<Vec<u8>> = vec![
        b"GARBAGE\r\n\r\n".to_vec(),
        b"GET /v2/ HTTP/9.9\r\nHost: x\r\n\r\n".to_vec(),
        b"GET \xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        long_header.into_bytes(),
        b"GET /v2/load/big/blobs/sha256:zz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(),
        b"GET /v2/load/big/blobs/md5 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(),
        b"GET /v2/Load//big/manifests/1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(),
        b"GET /v2/../../etc/passwd HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(),
        b"GET /v2/load/big/manifests/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(),
        b"GET /v2/load/big/tags/list?n=-1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(),
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nRange: bytes=9-1\r\nConnection: close\r\n\r\n").into_bytes(),
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nRange: bytes=a-b\r\nConnection: close\r\n\r\n").into_bytes(),
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\n".to_vec(),
        b"PATCH /v2/load/big/blobs/uploads/x HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc"
            .to_vec(),
        b"GET /v2/_catalog?last=%ff%fe HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(),
    ];
    for raw in &cases {
        let (status, _, body) = http(&addr, raw);
        let shown = String::from_utf8_lossy(&raw[..raw.len().min(80)]).into_owned();
        // `last` past every name is an empty page, not an error.
        if shown.contains("_catalog") {
            assert_eq!(status, 200, "{shown:?}");
            continue;
        }
        assert!((400..500).contains(&status), "{shown:?} got {status}: {}", String::from_utf8_lossy(&body));
        served.assert_running();
    }
    let (status, _, _) = get(&addr, "GET", "/v2/", "");
    assert_eq!(status, 200);
    served.stop();
}

/// As kubelet really pulls: CRI `PullImage` with containerd's registry
/// `config_path` naming a directory of `hosts.toml` (the documented node
/// setup), the original registry gone, on every containerd version: by tag
/// and by digest, through `preseed serve` alone.
#[test]
fn cri_pulls_through_a_served_mirror_with_config_path() {
    if !support::require_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (pushed, host, partition);
    {
        let Some(reg) = Registry::start() else { return };
        pushed = images::push_image(&reg, "team/cri", "v1", &[LayerSpec::new(881, 2, 16 << 10)], Media::Oci);
        host = reg.host();
        let text = format!(
            "[partition]\nplatforms = [\"linux/amd64\"]\n[registries.\"{host}\"]\ninsecure = true\n\n[[image]]\nref = \"{host}/team/cri:v1@{}\"\n",
            pushed.manifest_digest
        );
        partition = bundle(dir.path(), &text);
        // The registry stops here.
    }
    let served = Served::image(&partition);
    let hosts = dir.path().join("certs.d");
    write_hosts_toml(&hosts, &host, &served.addr);
    let opts = support::containerd::ContainerdOptions { registry_config_path: Some(hosts), ..Default::default() };
    let Some(c) = Containerd::start_with(opts) else { return };
    for reference in [format!("{host}/team/cri:v1"), format!("{host}/team/cri@{}", pushed.manifest_digest)] {
        let image_ref = support::cri::pull_image(c.socket(), &reference)
            .unwrap_or_else(|e| panic!("{reference}: {e:#}\ncontainerd log:\n{}", c.log()));
        assert!(image_ref.starts_with("sha256:"), "{reference}: {image_ref}");
    }
    let listed = c.ctr_ok(&["-n", "k8s.io", "images", "ls", "-q"]);
    assert!(listed.lines().any(|l| l == format!("{host}/team/cri:v1")), "{listed}");
    c.assert_no_panic();
}

/// What docs/node.md says of a colon-separated `config_path` (two
/// directories, as node templates often write it): containerd 1.6 and 1.7
/// read both; from 2.1 CRI pulls (the transfer service) find no
/// `hosts.toml` at all and go to the original registry — here stopped, so
/// the pull fails. If a containerd changes this, this test says so.
#[test]
fn a_two_directory_config_path_is_ignored_from_containerd_2_1() {
    if !support::require_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (pushed, host, partition);
    {
        let Some(reg) = Registry::start() else { return };
        pushed = images::push_image(&reg, "team/cri", "v1", &[LayerSpec::new(882, 1, 8 << 10)], Media::Oci);
        host = reg.host();
        let text = format!(
            "[partition]\nplatforms = [\"linux/amd64\"]\n[registries.\"{host}\"]\ninsecure = true\n\n[[image]]\nref = \"{host}/team/cri:v1@{}\"\n",
            pushed.manifest_digest
        );
        partition = bundle(dir.path(), &text);
    }
    let served = Served::image(&partition);
    let hosts = dir.path().join("certs.d");
    write_hosts_toml(&hosts, &host, &served.addr);
    let two = PathBuf::from(format!("{}:{}", hosts.display(), dir.path().join("docker-certs.d").display()));
    let opts = support::containerd::ContainerdOptions { registry_config_path: Some(two), ..Default::default() };
    let Some(c) = Containerd::start_with(opts) else { return };
    let v = c.version().clone();
    let pulled = support::cri::pull_image(c.socket(), &format!("{host}/team/cri:v1"));
    if v.major > 2 || (v.major == 2 && v.minor >= 1) {
        assert!(pulled.is_err(), "containerd {} now reads a two-directory config_path: update docs/node.md", v.text);
    } else {
        pulled.unwrap_or_else(|e| panic!("containerd {}: {e:#}\n{}", v.text, c.log()));
    }
}

/// systemd stops `preseed serve` with SIGTERM, perhaps the moment it has
/// started. The handlers are installed before "serving" is printed, so even
/// a stop sent as soon as that line is read, with a client already waiting
/// to be accepted, exits 0. (They used to come with the first poll of the
/// shutdown future, which a waiting client could delay past the signal:
/// tests/hostile.rs saw serve killed by its SIGTERM once in CI.)
#[test]
fn a_stop_sent_as_soon_as_it_says_serving_is_clean() {
    use support::fixtures::{self, Entry};
    let w = fixtures::world();
    let image = Entry::new("k8s.io", "pause", "preseed.local/pause:1", fixtures::single(&w.cache, "pause", 7, 0, 0));
    let dir = w.root.join("tree");
    fixtures::bundle_tree(&w.cache, &[image], &dir);
    // The old race lost about 2 stops in 100 (measured with its binary).
    for _ in 0..100 {
        let served = Served::start(&[std::ffi::OsStr::new("--dir"), dir.as_os_str()]);
        let _waiting = TcpStream::connect(&served.addr).unwrap();
        served.stop();
    }
}
