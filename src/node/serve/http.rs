//! The OCI distribution API, read-only, over a [`Catalog`]: `/v2/`,
//! manifests and blobs (GET, HEAD, `Range` on blobs), `tags/list` and
//! `_catalog` (with `n`/`last` pagination), the referrers API (OCI 1.1, with
//! `artifactType` filtering), and the spec's error JSON for everything
//! else. Writes get 405 `UNSUPPORTED`.
//!
//! Blob bodies are read from the tarball in [`CHUNK`]-byte pieces, each
//! only when the connection has sent the previous one: a download holds at
//! most a chunk or two, whatever the layer's size, and a client that goes
//! away stops the reads.

use std::convert::Infallible;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full, StreamBody};
use hyper::body::Frame;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};

use super::catalog::{Catalog, Content, Data, Repository};
use crate::digest::Digest;

/// Bytes read from a tarball at a time for one response.
pub const CHUNK: usize = 64 << 10;

/// A response body: small JSON, or blob bytes streamed from a tarball.
pub type Body = BoxBody<Bytes, std::io::Error>;

const API_VERSION: &str = "registry/2.0";
const JSON: &str = "application/json";

/// Answers one request.
pub async fn handle<B>(catalog: Arc<Catalog>, req: Request<B>) -> Result<Response<Body>, Infallible> {
    let mut resp = route(&catalog, &req);
    resp.headers_mut().insert("docker-distribution-api-version", HeaderValue::from_static(API_VERSION));
    if req.method() == Method::HEAD {
        *resp.body_mut() = empty();
    }
    Ok(resp)
}

/// A distribution API error code with its HTTP status.
#[derive(Clone, Copy, Debug)]
enum Code {
    NameUnknown,
    NameInvalid,
    ManifestUnknown,
    BlobUnknown,
    DigestInvalid,
    PaginationNumberInvalid,
    Unsupported,
    NoSuchEndpoint,
    RangeInvalid,
}

impl Code {
    fn parts(self) -> (StatusCode, &'static str) {
        match self {
            Code::NameUnknown => (StatusCode::NOT_FOUND, "NAME_UNKNOWN"),
            Code::NameInvalid => (StatusCode::BAD_REQUEST, "NAME_INVALID"),
            Code::ManifestUnknown => (StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN"),
            Code::BlobUnknown => (StatusCode::NOT_FOUND, "BLOB_UNKNOWN"),
            Code::DigestInvalid => (StatusCode::BAD_REQUEST, "DIGEST_INVALID"),
            Code::PaginationNumberInvalid => (StatusCode::BAD_REQUEST, "PAGINATION_NUMBER_INVALID"),
            Code::Unsupported => (StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED"),
            Code::NoSuchEndpoint => (StatusCode::NOT_FOUND, "UNSUPPORTED"),
            Code::RangeInvalid => (StatusCode::RANGE_NOT_SATISFIABLE, "RANGE_INVALID"),
        }
    }
}

fn error(code: Code, message: &str) -> Response<Body> {
    let (status, name) = code.parts();
    let body = serde_json::json!({ "errors": [{ "code": name, "message": message, "detail": null }] });
    let mut resp = json_response(status, &body);
    if let Code::Unsupported = code {
        resp.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
    }
    resp
}

fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let bytes = Bytes::from(value.to_string());
    let mut resp = Response::new(full(bytes.clone()));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(JSON));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
    resp
}

fn full(bytes: Bytes) -> Body {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// The query parameters the API uses.
#[derive(Default)]
struct Query {
    ns: Option<String>,
    n: Option<String>,
    last: Option<String>,
    artifact_type: Option<String>,
}

fn query(q: Option<&str>) -> Query {
    let mut out = Query::default();
    for pair in q.unwrap_or("").split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_decode(v);
        match k {
            "ns" => out.ns = Some(v),
            "n" => out.n = Some(v),
            "last" => out.last = Some(v),
            "artifactType" => out.artifact_type = Some(v),
            _ => {}
        }
    }
    out
}

/// `%XX` escapes and `+` (Go's `url.Values.Encode` writes `:` as `%3A`).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = b
                    .get(i + 1..i + 3)
                    .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
                    .and_then(|h| std::str::from_utf8(h).ok());
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A repository name as the spec allows (with an optional registry host in
/// front, which may have a port): non-empty `/`-separated components of
/// `[a-z0-9._-]`, not `.` or `..`.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name.split('/').enumerate().all(|(i, c)| {
            !c.is_empty()
                && c != "."
                && c != ".."
                && c.bytes().all(|b| {
                    b.is_ascii_lowercase()
                        || b.is_ascii_digit()
                        || matches!(b, b'.' | b'_' | b'-')
                        || (i == 0 && b == b':')
                })
        })
}

/// The answer to one request (any method, any path a client sends): a 4xx
/// for anything malformed or unknown, never a panic.
pub fn route<B>(catalog: &Catalog, req: &Request<B>) -> Response<Body> {
    let path = req.uri().path();
    let Some(rest) = path.strip_prefix("/v2").filter(|r| r.is_empty() || r.starts_with('/')) else {
        return error(Code::NoSuchEndpoint, "not a registry API path (they start with /v2/)");
    };
    let reading = matches!(*req.method(), Method::GET | Method::HEAD);
    if rest.contains("/blobs/uploads") || !reading {
        return error(Code::Unsupported, "this registry is read-only (a preseed partition)");
    }
    let q = query(req.uri().query());
    if rest.is_empty() || rest == "/" {
        return json_response(StatusCode::OK, &serde_json::json!({}));
    }
    let rest = &rest[1..];
    if rest == "_catalog" {
        let names: Vec<&str> = catalog.repository_names().collect();
        return paginated(&names, &q, "/v2/_catalog", |page| serde_json::json!({ "repositories": page }));
    }
    if let Some(name) = rest.strip_suffix("/tags/list") {
        let Some(repo) = repository(catalog, name, &q) else { return unknown_name(name, &q) };
        let tags: Vec<&str> = repo[0].tags.keys().map(String::as_str).collect();
        return paginated(
            &tags,
            &q,
            &format!("/v2/{name}/tags/list"),
            |page| serde_json::json!({ "name": name, "tags": page }),
        );
    }
    if let Some((name, subject)) = rest.rsplit_once("/referrers/") {
        let Some(repo) = repository(catalog, name, &q) else { return unknown_name(name, &q) };
        return referrers(catalog, &repo, subject, q.artifact_type.as_deref());
    }
    if let Some((name, reference)) = rest.rsplit_once("/manifests/") {
        let Some(repo) = repository(catalog, name, &q) else { return unknown_name(name, &q) };
        return manifest(catalog, &repo, name, reference);
    }
    if let Some((name, digest)) = rest.rsplit_once("/blobs/") {
        let Some(repo) = repository(catalog, name, &q) else { return unknown_name(name, &q) };
        return blob(catalog, &repo, digest, req.headers().get(header::RANGE));
    }
    error(Code::NoSuchEndpoint, &format!("{path}: not an endpoint of this read-only registry"))
}

/// The repositories `name` may mean, the one whose tags count first; `None`
/// if there is none.
fn repository<'a>(catalog: &'a Catalog, name: &str, q: &Query) -> Option<Vec<&'a Repository>> {
    if !valid_name(name) {
        return None;
    }
    Some(catalog.repositories(name, q.ns.as_deref())).filter(|r| !r.is_empty())
}

fn unknown_name(name: &str, q: &Query) -> Response<Body> {
    if !valid_name(name) {
        return error(Code::NameInvalid, &format!("{name:?} is not a repository name"));
    }
    match &q.ns {
        Some(ns) => error(Code::NameUnknown, &format!("repository {name} of {ns} is not in this partition")),
        None => error(Code::NameUnknown, &format!("repository {name} is not in this partition")),
    }
}

/// `n`/`last` pagination over a sorted list, with a `Link` to the next page.
fn paginated(all: &[&str], q: &Query, path: &str, body: impl FnOnce(&[&str]) -> serde_json::Value) -> Response<Body> {
    let start = match &q.last {
        Some(last) => all.partition_point(|x| *x <= last.as_str()),
        None => 0,
    };
    let n = match q.n.as_deref().map(str::parse::<usize>) {
        None => all.len(),
        Some(Ok(n)) => n,
        Some(Err(_)) => return error(Code::PaginationNumberInvalid, "n must be a non-negative number"),
    };
    let end = start.saturating_add(n).min(all.len());
    let page = &all[start..end];
    let mut resp = json_response(StatusCode::OK, &body(page));
    if end < all.len() && n > 0 {
        if let Some(last) = page.last() {
            let link = format!("<{path}?last={last}&n={n}>; rel=\"next\"");
            if let Ok(v) = HeaderValue::from_str(&link) {
                resp.headers_mut().insert(header::LINK, v);
            }
        }
    }
    resp
}

/// A reference that looks like a digest (`algorithm:encoded`).
fn is_digest_like(s: &str) -> bool {
    s.split_once(':').is_some_and(|(alg, enc)| {
        !alg.is_empty()
            && !enc.is_empty()
            && alg
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'+' | b'.' | b'_' | b'-'))
            && enc.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'=' | b'_' | b'-'))
    })
}

fn manifest(catalog: &Catalog, repo: &[&Repository], name: &str, reference: &str) -> Response<Body> {
    let digest = if reference.contains(':') {
        match reference.parse::<Digest>() {
            Ok(d) => d,
            Err(_) if is_digest_like(reference) => {
                return error(Code::ManifestUnknown, &format!("{name}@{reference}: not in this partition"))
            }
            Err(e) => return error(Code::DigestInvalid, &e.to_string()),
        }
    } else {
        match repo[0].tags.get(reference) {
            Some(d) => d.clone(),
            None => return error(Code::ManifestUnknown, &format!("{name}:{reference}: no such tag in this partition")),
        }
    };
    match catalog.content(repo, &digest) {
        Some(c) if c.is_manifest() => content_response(c, &digest, &c.media_type, None),
        _ => error(Code::ManifestUnknown, &format!("{name}@{digest}: no such manifest in this partition")),
    }
}

/// What refers to `subject`: always an index (empty for a subject with no
/// referrers, or one not here, as the spec asks), filtered by
/// `artifact_type` if given, which the `OCI-Filters-Applied` header says.
fn referrers(catalog: &Catalog, repo: &[&Repository], subject: &str, artifact_type: Option<&str>) -> Response<Body> {
    let subject = match subject.parse::<Digest>() {
        Ok(d) => d,
        Err(e) => return error(Code::DigestInvalid, &e.to_string()),
    };
    let body = super::catalog::referrers_index(catalog.referrers(repo, &subject, artifact_type));
    let mut resp = Response::new(full(Bytes::from(body.clone())));
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(crate::oci::OCI_INDEX));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    if artifact_type.is_some() {
        h.insert("oci-filters-applied", HeaderValue::from_static("artifactType"));
    }
    resp
}

fn blob(catalog: &Catalog, repo: &[&Repository], digest: &str, range: Option<&HeaderValue>) -> Response<Body> {
    let digest = match digest.parse::<Digest>() {
        Ok(d) => d,
        Err(_) if is_digest_like(digest) => {
            return error(Code::BlobUnknown, &format!("{digest}: not in this partition"))
        }
        Err(e) => return error(Code::DigestInvalid, &e.to_string()),
    };
    let Some(c) = catalog.content(repo, &digest) else {
        return error(Code::BlobUnknown, &format!("{digest}: not in this repository"));
    };
    match parse_range(range, c.size) {
        Range::Full => content_response(c, &digest, "application/octet-stream", None),
        Range::Part(start, len) => content_response(c, &digest, "application/octet-stream", Some((start, len))),
        Range::Unsatisfiable => {
            let mut resp = error(Code::RangeInvalid, &format!("the blob is {} bytes", c.size));
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{}", c.size)) {
                resp.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            resp
        }
    }
}

/// A blob's bytes (or a part), with the headers clients check.
fn content_response(c: &Content, digest: &Digest, content_type: &str, part: Option<(u64, u64)>) -> Response<Body> {
    let (start, len) = part.unwrap_or((0, c.size));
    let mut resp = Response::new(body(c, start, len));
    let h = resp.headers_mut();
    if let Some((start, len)) = part {
        if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{}/{}", start + len - 1, c.size)) {
            h.insert(header::CONTENT_RANGE, v);
        }
    }
    if let Ok(v) = HeaderValue::from_str(content_type) {
        h.insert(header::CONTENT_TYPE, v);
    }
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Ok(v) = HeaderValue::from_str(&digest.to_string()) {
        h.insert("docker-content-digest", v.clone());
        if let Ok(etag) = HeaderValue::from_str(&format!("\"{digest}\"")) {
            h.insert(header::ETAG, etag);
        }
    }
    if part.is_some() {
        *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
    }
    resp
}

/// `len` bytes of `c` from `start`, read a chunk at a time as the
/// connection asks for them.
fn body(c: &Content, start: u64, len: u64) -> Body {
    match &c.data {
        Data::Inline(bytes) => {
            let (s, e) = (start as usize, (start + len) as usize);
            full(Bytes::copy_from_slice(bytes.get(s..e).unwrap_or_default()))
        }
        Data::File { file, path, offset } => {
            let state = (file.clone(), path.clone(), offset + start, len);
            let chunks = futures_util::stream::unfold(state, |(file, path, pos, left)| async move {
                if left == 0 {
                    return None;
                }
                let n = left.min(CHUNK as u64) as usize;
                let f = file.clone();
                let read = tokio::task::spawn_blocking(move || {
                    let mut buf = vec![0u8; n];
                    f.read_exact_at(&mut buf, pos).map(|()| buf)
                })
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e)));
                match read {
                    Ok(buf) => Some((Ok(Frame::data(Bytes::from(buf))), (file, path, pos + n as u64, left - n as u64))),
                    Err(e) => {
                        // The length was promised: the connection is cut, and
                        // the client sees a short body, never wrong bytes.
                        eprintln!("preseed serve: reading {} at offset {pos}: {e}", path.display());
                        Some((Err(e), (file, path, pos, 0)))
                    }
                }
            });
            StreamBody::new(chunks).boxed()
        }
    }
}

/// What a `Range` header asks for.
#[derive(Debug, PartialEq, Eq)]
enum Range {
    /// No (usable) range: the whole blob.
    Full,
    /// `(start, len)`.
    Part(u64, u64),
    /// A `bytes=` range outside the blob, or malformed: 416.
    Unsatisfiable,
}

/// One `bytes=` range; several ranges or another unit are ignored (the
/// whole blob is sent), as RFC 9110 allows.
fn parse_range(h: Option<&HeaderValue>, size: u64) -> Range {
    let Some(h) = h else { return Range::Full };
    let Some(spec) = h.to_str().ok().and_then(|s| s.trim().strip_prefix("bytes=")) else { return Range::Full };
    if spec.contains(',') {
        return Range::Full;
    }
    let Some((a, b)) = spec.trim().split_once('-') else { return Range::Unsatisfiable };
    let num = |s: &str| -> Option<u64> {
        let s = s.trim();
        if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
            None
        } else {
            s.parse().ok()
        }
    };
    match (a.trim().is_empty(), num(a), num(b)) {
        // bytes=-N: the last N bytes.
        (true, _, Some(n)) if n > 0 && size > 0 => {
            let n = n.min(size);
            Range::Part(size - n, n)
        }
        (false, Some(first), None) if b.trim().is_empty() && first < size => Range::Part(first, size - first),
        (false, Some(first), Some(last)) if first <= last && first < size => {
            Range::Part(first, last.min(size - 1) - first + 1)
        }
        _ => Range::Unsatisfiable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str, size: u64) -> Range {
        parse_range(Some(&HeaderValue::from_str(s).unwrap()), size)
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_range(None, 10), Range::Full);
        assert_eq!(r("bytes=0-0", 10), Range::Part(0, 1));
        assert_eq!(r("bytes=2-", 10), Range::Part(2, 8));
        assert_eq!(r("bytes=2-100", 10), Range::Part(2, 8));
        assert_eq!(r("bytes=-3", 10), Range::Part(7, 3));
        assert_eq!(r("bytes=-30", 10), Range::Part(0, 10));
        assert_eq!(r("bytes=10-", 10), Range::Unsatisfiable);
        assert_eq!(r("bytes=5-4", 10), Range::Unsatisfiable);
        assert_eq!(r("bytes=-0", 10), Range::Unsatisfiable);
        assert_eq!(r("bytes=x-1", 10), Range::Unsatisfiable);
        assert_eq!(r("bytes=1", 10), Range::Unsatisfiable);
        assert_eq!(r("bytes=0-1,3-4", 10), Range::Full);
        assert_eq!(r("items=0-1", 10), Range::Full);
    }

    #[test]
    fn queries_and_names() {
        let q = query(Some("ns=127.0.0.1%3A5000&n=2&last=a%2Fb&x"));
        assert_eq!(q.ns.as_deref(), Some("127.0.0.1:5000"));
        assert_eq!(q.n.as_deref(), Some("2"));
        assert_eq!(q.last.as_deref(), Some("a/b"));
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
        assert!(valid_name("library/busybox"));
        assert!(valid_name("127.0.0.1:5000/a/b"));
        assert!(!valid_name("a//b"));
        assert!(!valid_name("a/../b"));
        assert!(!valid_name("A/b"));
        assert!(!valid_name("a/b:c"));
        assert!(is_digest_like("sha512:abcd"));
        assert!(!is_digest_like("sha256:"));
    }
}
