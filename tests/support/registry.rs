//! A real CNCF distribution registry (Debian's `docker-registry`) on a free
//! loopback port, plus a tiny pusher speaking the distribution HTTP API.
//!
//! The HTTP client is a few dozen lines over `std::net::TcpStream` on purpose:
//! plain HTTP to loopback needs no TLS stack, no async runtime, no extra crate.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use sha2::{Digest as _, Sha256};

/// A running registry; the process is killed and its storage deleted on drop.
pub struct Registry {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
    creds: Option<(String, String)>,
}

/// One HTTP response, fully read.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    /// Header names lower-cased.
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(&name.to_ascii_lowercase()).map(String::as_str)
    }
}

/// One line of the registry's access log (Apache combined format).
#[derive(Debug, Clone)]
pub struct AccessLogEntry {
    pub method: String,
    pub path: String,
    pub status: u16,
    pub user_agent: String,
}

/// `sha256:<hex>` of some bytes.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

impl Registry {
    /// An anonymous registry. `None` when `docker-registry` is missing outside CI.
    pub fn start() -> Option<Registry> {
        Self::spawn(None)
    }

    /// A registry that requires HTTP basic auth (htpasswd, bcrypt) for everything.
    pub fn start_with_basic_auth(user: &str, pass: &str) -> Option<Registry> {
        Self::spawn(Some((user.to_string(), pass.to_string())))
    }

    fn spawn(creds: Option<(String, String)>) -> Option<Registry> {
        let bin = super::require_tool("docker-registry")?;
        if creds.is_some() {
            super::require_tool("htpasswd")?;
        }
        let dir = tempfile::Builder::new().prefix("preseed-registry-").tempdir().unwrap();
        let port = super::free_port();
        let storage = dir.path().join("storage");
        std::fs::create_dir(&storage).unwrap();

        let mut auth = String::new();
        if let Some((user, pass)) = &creds {
            let out = Command::new("htpasswd").args(["-Bbn", user, pass]).output().unwrap();
            assert!(out.status.success(), "htpasswd failed: {}", String::from_utf8_lossy(&out.stderr));
            let htpasswd = dir.path().join("htpasswd");
            std::fs::write(&htpasswd, &out.stdout).unwrap();
            auth = format!("auth:\n  htpasswd:\n    realm: preseed-test\n    path: {}\n", htpasswd.display());
        }
        // Access log goes to stdout, application log to stderr (distribution 2.8).
        let config = format!(
            "version: 0.1\n\
             log:\n  level: info\n  accesslog:\n    disabled: false\n\
             storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n\
             \x20 maintenance:\n    uploadpurging:\n      enabled: false\n\
             http:\n  addr: 127.0.0.1:{port}\n  secret: preseed-test\n\
             {auth}",
            storage = storage.display(),
        );
        Some(Registry::run_serve(&bin, dir, port, &config, creds))
    }

    /// Another `docker-registry` process over the storage of a registry
    /// [`start`](Registry::start)ed earlier (its [`Registry::storage_dir`]), so that
    /// its memory is its own: configured as Debian's packaged one (in-memory
    /// blob descriptor cache, access log on), read-only, nothing purged at
    /// start. Killed on drop; the storage stays with the registry it belongs to.
    pub fn start_on_storage(storage: &Path) -> Option<Registry> {
        let bin = super::require_tool("docker-registry")?;
        let dir = tempfile::Builder::new().prefix("preseed-registry-").tempdir().unwrap();
        std::os::unix::fs::symlink(storage, dir.path().join("storage")).unwrap();
        let port = super::free_port();
        let config = format!(
            "version: 0.1\n\
             log:\n  level: info\n  accesslog:\n    disabled: false\n\
             storage:\n  cache:\n    blobdescriptor: inmemory\n  filesystem:\n    rootdirectory: {storage}\n\
             \x20 maintenance:\n    uploadpurging:\n      enabled: false\n    readonly:\n      enabled: true\n\
             http:\n  addr: 127.0.0.1:{port}\n  secret: preseed-test\n",
            storage = storage.display(),
        );
        Some(Registry::run_serve(&bin, dir, port, &config, None))
    }

    /// Runs `docker-registry serve` with `config` written into `dir` (its
    /// access log and application log beside it) and waits until it answers.
    fn run_serve(
        bin: &Path,
        dir: tempfile::TempDir,
        port: u16,
        config: &str,
        creds: Option<(String, String)>,
    ) -> Registry {
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).unwrap();
        let child = Command::new(bin)
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.path().join("access.log")).unwrap())
            .stderr(std::fs::File::create(dir.path().join("registry.log")).unwrap())
            .spawn()
            .unwrap();
        let mut reg = Registry { child, port, dir, creds };
        reg.wait_ready();
        reg
    }

    /// Where the registry keeps its blobs and repositories.
    pub fn storage_dir(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// The registry's process id (for `/proc/<pid>/status`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("docker-registry exited with {status} before answering:\n{}", self.app_log());
            }
            // 401 counts as up: the auth middleware answers only once serving.
            if let Ok(r) = self.request("GET", "/v2/", &[], &[], false) {
                if r.status == 200 || r.status == 401 {
                    return;
                }
            }
            if Instant::now() > deadline {
                panic!("docker-registry did not answer GET /v2/ within 15s:\n{}", self.app_log());
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// `127.0.0.1:PORT`, the registry host as written in image references.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Credentials the registry was started with (used by every harness request).
    pub fn creds(&self) -> Option<(&str, &str)> {
        self.creds.as_ref().map(|(u, p)| (u.as_str(), p.as_str()))
    }

    /// The temp dir holding config, storage and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn access_log_path(&self) -> PathBuf {
        self.dir.path().join("access.log")
    }

    /// The registry's own (logrus) log, for failure messages.
    pub fn app_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// Every request the registry has served so far, in order.
    pub fn access_log(&self) -> Vec<AccessLogEntry> {
        let text = std::fs::read_to_string(self.access_log_path()).unwrap_or_default();
        text.lines().filter_map(parse_access_line).collect()
    }

    /// Number of requests served so far (including the harness's own). To
    /// assert "no network traffic", compare the count before and after.
    pub fn request_count(&self) -> usize {
        self.access_log().len()
    }

    /// Requests served after the first `since` ones (see [`Registry::request_count`]).
    pub fn requests_since(&self, since: usize) -> Vec<AccessLogEntry> {
        self.access_log().into_iter().skip(since).collect()
    }

    /// Whether any access-log line contains `needle`, e.g. `"GET /v2/"`.
    pub fn log_contains(&self, needle: &str) -> bool {
        std::fs::read_to_string(self.access_log_path()).unwrap_or_default().contains(needle)
    }

    /// A GET with explicit credentials (`None` = anonymous), for auth tests.
    pub fn get_as(&self, path: &str, creds: Option<(&str, &str)>) -> Response {
        let auth = creds.map(basic_auth);
        let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
        self.request("GET", path, &headers, &[], false).unwrap()
    }

    /// Uploads a blob (POST + monolithic PUT) and returns its digest. Blobs
    /// already in the repository are not uploaded again.
    pub fn push_blob(&self, repo: &str, bytes: &[u8]) -> String {
        let digest = sha256_digest(bytes);
        let head = self.call("HEAD", &format!("/v2/{repo}/blobs/{digest}"), &[], &[]);
        if head.status == 200 {
            return digest;
        }
        let start = self.call("POST", &format!("/v2/{repo}/blobs/uploads/"), &[], &[]);
        assert_eq!(start.status, 202, "POST blob upload to {repo}: {}", describe(&start));
        let location = start.header("location").expect("upload Location header");
        // Location is absolute in distribution 2.8 (built from the Host header).
        let path = match location.find("/v2/") {
            Some(i) => &location[i..],
            None => location,
        };
        let sep = if path.contains('?') { '&' } else { '?' };
        let put = self.call(
            "PUT",
            &format!("{path}{sep}digest={digest}"),
            &[("Content-Type", "application/octet-stream")],
            bytes,
        );
        assert_eq!(put.status, 201, "PUT blob {digest} to {repo}: {}", describe(&put));
        digest
    }

    /// Puts a manifest (or index) under a tag or digest; returns its digest.
    pub fn push_manifest(&self, repo: &str, reference: &str, media_type: &str, bytes: &[u8]) -> String {
        let digest = sha256_digest(bytes);
        let put =
            self.call("PUT", &format!("/v2/{repo}/manifests/{reference}"), &[("Content-Type", media_type)], bytes);
        assert_eq!(put.status, 201, "PUT manifest {repo}:{reference}: {}", describe(&put));
        if let Some(d) = put.header("docker-content-digest") {
            assert_eq!(d, digest, "registry computed another digest for {repo}:{reference}");
        }
        digest
    }

    /// Deletes a blob from a repository (delete is enabled), e.g. to make a
    /// later fetch fail half-way through an image.
    pub fn delete_blob(&self, repo: &str, digest: &str) {
        let r = self.call("DELETE", &format!("/v2/{repo}/blobs/{digest}"), &[], &[]);
        assert_eq!(r.status, 202, "DELETE blob {digest}: {}", describe(&r));
    }

    /// A request with the registry's own credentials, if any.
    pub fn call(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Response {
        let auth = self.creds().map(basic_auth);
        let mut all: Vec<(&str, &str)> = headers.to_vec();
        if let Some(a) = &auth {
            all.push(("Authorization", a));
        }
        self.request(method, path, &all, body, true)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}\n{}", self.app_log()))
    }

    fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        send_length: bool,
    ) -> std::io::Result<Response> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port))?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        s.set_nodelay(true)?;
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: preseed-test-harness\r\nConnection: close\r\n",
            self.host()
        );
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        if send_length || !body.is_empty() {
            head.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        head.push_str("\r\n");
        // One write: head and body in separate segments hit Nagle + delayed ACK (40 ms).
        let mut msg = head.into_bytes();
        msg.extend_from_slice(body);
        s.write_all(&msg)?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw)?;
        parse_response(&raw, method == "HEAD")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn basic_auth((user, pass): (&str, &str)) -> String {
    let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
    format!("Basic {token}")
}

fn describe(r: &Response) -> String {
    format!("HTTP {} {}", r.status, String::from_utf8_lossy(&r.body))
}

fn parse_response(raw: &[u8], head_only: bool) -> std::io::Result<Response> {
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(|| bad("no end of HTTP headers"))?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| bad("non-UTF-8 headers"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line.split(' ').nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| bad("bad status line"))?;
    let headers: BTreeMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = if head_only { Vec::new() } else { raw[end + 4..].to_vec() };
    if !head_only && headers.get("transfer-encoding").is_some_and(|t| t.contains("chunked")) {
        body = dechunk(&body).ok_or_else(|| bad("bad chunked body"))?;
    }
    Ok(Response { status, headers, body })
}

fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = data.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&data[..eol]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        data = &data[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
    }
}

/// `127.0.0.1 - user [date] "GET /v2/ HTTP/1.1" 200 2 "referer" "agent"`
fn parse_access_line(line: &str) -> Option<AccessLogEntry> {
    let mut quoted = line.split('"');
    let _prefix = quoted.next()?;
    let request = quoted.next()?;
    let status_part = quoted.next()?;
    let _referer = quoted.next();
    let _ = quoted.next();
    let user_agent = quoted.next().unwrap_or_default().to_string();
    let mut req = request.split(' ');
    let method = req.next()?.to_string();
    let path = req.next()?.to_string();
    let status = status_part.split_whitespace().next()?.parse().ok()?;
    Some(AccessLogEntry { method, path, status, user_agent })
}
