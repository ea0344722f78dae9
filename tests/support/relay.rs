//! An HTTP/1.1 reverse proxy on loopback in front of a [`Registry`](super::registry::Registry),
//! that counts what it passes and misbehaves when told to.
//!
//! The client (a `preseed push` or `preseed pull` child) is given
//! [`Relay::host`] as the registry; every connection is relayed to the
//! registry over a connection of its own, one request and its answer at a
//! time (keep-alive kept, `Range` and `206` passed through untouched). The
//! relay parses just enough HTTP to know where each body ends
//! (`Content-Length`, chunked, or the end of the connection), so it can:
//!
//! * count, per request, the response body bytes sent to the client
//!   ([`Relay::blob_bytes`], [`Relay::bytes_for`], [`Relay::requests`]) and the
//!   request body bytes received ([`Relay::upload_bytes`]);
//! * flip one byte of the next answer for a blob ([`Relay::flip_once`]);
//! * close the connection after some more blob bytes ([`Relay::cut_after`]),
//!   as a dropped connection does mid-blob;
//! * stop passing blob bytes after some more ([`Relay::hold_after`]), the
//!   connections kept open, until [`Relay::release`]: the test then kills
//!   the client at a point it chose, knowing exactly what it was sent.
//!
//! Blob bytes are the bodies of `GET …/blobs/sha256:…` answers (uploads are
//! `…/blobs/uploads/…` and never count as such).

use std::collections::BTreeSet;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// One request the relay passed on.
#[derive(Debug)]
struct Record {
    method: String,
    /// The request target as sent (path and query).
    target: String,
    /// The `Range` header, if any.
    range: Option<String>,
    /// 0 until the answer's head arrived.
    status: AtomicU16,
    /// Response body bytes written to the client.
    body: AtomicU64,
    /// Request body bytes passed to the registry.
    sent: AtomicU64,
}

impl Record {
    /// The target without its query.
    fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or_default()
    }

    fn is_blob_get(&self) -> bool {
        self.method == "GET" && is_blob_path(self.path())
    }
}

/// `…/blobs/sha256:<hex>` (not an upload).
fn is_blob_path(path: &str) -> bool {
    path.contains("/blobs/sha256:") && !path.contains("/blobs/uploads/")
}

/// What limits blob bytes: the total ever sent (never reset) and the
/// totals at which to hold or cut.
#[derive(Default)]
struct Budget {
    sent: u64,
    hold_at: Option<u64>,
    cut_at: Option<u64>,
}

enum Verdict {
    /// Pass this many bytes (all of them).
    Pass,
    /// Pass this many, then hold until released.
    Hold(usize),
    /// Pass this many, then close the connection.
    Cut(usize),
}

struct State {
    upstream: String,
    records: Mutex<Vec<Arc<Record>>>,
    flips: Mutex<BTreeSet<String>>,
    budget: Mutex<Budget>,
    held: AtomicBool,
    stopped: AtomicBool,
    cuts: AtomicU64,
    /// Every socket, to close them all when stopped.
    sockets: Mutex<Vec<TcpStream>>,
}

impl State {
    /// Reserves `n` blob bytes from the budget.
    fn admit(&self, n: usize) -> Verdict {
        let mut b = self.budget.lock().unwrap();
        let room = |at: Option<u64>| at.map(|at| at.saturating_sub(b.sent));
        if let Some(room) = room(b.cut_at) {
            if room < n as u64 {
                b.sent += room;
                b.cut_at = None;
                return Verdict::Cut(room as usize);
            }
        }
        if let Some(room) = room(b.hold_at) {
            if room < n as u64 {
                b.sent += room;
                return Verdict::Hold(room as usize);
            }
        }
        b.sent += n as u64;
        Verdict::Pass
    }

    fn hold_released(&self) -> bool {
        self.budget.lock().unwrap().hold_at.is_none() || self.stopped.load(Ordering::SeqCst)
    }
}

/// The relay; stopped (every connection closed) when dropped.
pub struct Relay {
    addr: SocketAddr,
    state: Arc<State>,
    acceptor: Option<JoinHandle<()>>,
}

impl Relay {
    /// Listens on a free loopback port, relaying to `upstream` (`host:port`).
    pub fn start(upstream: &str) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            upstream: upstream.to_string(),
            records: Mutex::new(Vec::new()),
            flips: Mutex::new(BTreeSet::new()),
            budget: Mutex::new(Budget::default()),
            held: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            cuts: AtomicU64::new(0),
            sockets: Mutex::new(Vec::new()),
        });
        let s = state.clone();
        let acceptor = std::thread::spawn(move || {
            for client in listener.incoming() {
                if s.stopped.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                let st = s.clone();
                std::thread::spawn(move || {
                    let _ = serve_connection(client, &st);
                });
            }
        });
        Relay { addr, state, acceptor: Some(acceptor) }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `127.0.0.1:<port>`, the registry host a client is given.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// Every request so far: (method, target, status, response body bytes
    /// sent). Status 0: no answer (yet).
    pub fn requests(&self) -> Vec<(String, String, u16, u64)> {
        self.records()
            .iter()
            .map(|r| {
                (r.method.clone(), r.target.clone(), r.status.load(Ordering::SeqCst), r.body.load(Ordering::SeqCst))
            })
            .collect()
    }

    /// Requests that carried a `Range` header: (target, range, status).
    pub fn ranged_requests(&self) -> Vec<(String, String, u16)> {
        self.records()
            .iter()
            .filter_map(|r| r.range.clone().map(|g| (r.target.clone(), g, r.status.load(Ordering::SeqCst))))
            .collect()
    }

    /// Body bytes sent for every `GET …/blobs/sha256:…` so far.
    pub fn blob_bytes(&self) -> u64 {
        self.records().iter().filter(|r| r.is_blob_get()).map(|r| r.body.load(Ordering::SeqCst)).sum()
    }

    /// Body bytes sent for every `GET …/manifests/…` so far.
    pub fn manifest_bytes(&self) -> u64 {
        self.records()
            .iter()
            .filter(|r| r.method == "GET" && r.path().contains("/manifests/"))
            .map(|r| r.body.load(Ordering::SeqCst))
            .sum()
    }

    /// Body bytes sent for `GET …/blobs/<digest>` (every repository) so far.
    pub fn bytes_for(&self, digest: &str) -> u64 {
        let suffix = format!("/blobs/{digest}");
        self.records()
            .iter()
            .filter(|r| r.method == "GET" && r.path().ends_with(&suffix))
            .map(|r| r.body.load(Ordering::SeqCst))
            .sum()
    }

    /// `GET …/blobs/<digest>` requests so far.
    pub fn gets_for(&self, digest: &str) -> usize {
        let suffix = format!("/blobs/{digest}");
        self.records().iter().filter(|r| r.method == "GET" && r.path().ends_with(&suffix)).count()
    }

    /// Request body bytes passed on (uploads: POST, PATCH, PUT).
    pub fn upload_bytes(&self) -> u64 {
        self.records().iter().map(|r| r.sent.load(Ordering::SeqCst)).sum()
    }

    /// Forgets every request counted so far (in-flight answers go on
    /// counting into records no longer listed).
    pub fn reset(&self) {
        self.state.records.lock().unwrap().clear();
    }

    /// Flips one byte (in the middle) of the body of the next `200`/`206`
    /// answer for `GET …/blobs/<digest>`; once.
    pub fn flip_once(&self, digest: &str) {
        self.state.flips.lock().unwrap().insert(digest.to_string());
    }

    /// Whether a [`Relay::flip_once`] is still waiting for its answer.
    pub fn flip_pending(&self) -> bool {
        !self.state.flips.lock().unwrap().is_empty()
    }

    /// After `n` more blob body bytes (all connections together), closes the
    /// connection that would pass more, mid-body; once.
    pub fn cut_after(&self, n: u64) {
        let mut b = self.state.budget.lock().unwrap();
        b.cut_at = Some(b.sent + n);
    }

    /// Connections closed by [`Relay::cut_after`] so far.
    pub fn cuts(&self) -> u64 {
        self.state.cuts.load(Ordering::SeqCst)
    }

    /// After `n` more blob body bytes (all connections together), passes no
    /// more blob bytes, connections kept open, until [`Relay::release`].
    pub fn hold_after(&self, n: u64) {
        let mut b = self.state.budget.lock().unwrap();
        b.hold_at = Some(b.sent + n);
        self.state.held.store(false, Ordering::SeqCst);
    }

    /// Whether a [`Relay::hold_after`] point has been reached.
    pub fn held(&self) -> bool {
        self.state.held.load(Ordering::SeqCst)
    }

    /// Waits until the hold point is reached; `false` if `client` exited
    /// first or `timeout` passed.
    pub fn wait_held(&self, client: &mut std::process::Child, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while !self.held() {
            if Instant::now() > deadline || client.try_wait().unwrap().is_some() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    /// Ends a [`Relay::hold_after`]: blob bytes pass again.
    pub fn release(&self) {
        self.state.budget.lock().unwrap().hold_at = None;
    }

    /// Waits until [`Relay::blob_bytes`] reaches `n`; `false` after `timeout`.
    pub fn wait_blob_bytes(&self, n: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.blob_bytes() < n {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    /// Closes every connection and stops listening: the port refuses from
    /// now on.
    pub fn stop(&mut self) {
        self.state.stopped.store(true, Ordering::SeqCst);
        for s in self.state.sockets.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
        if let Some(a) = self.acceptor.take() {
            // Wakes the acceptor, which sees `stopped` and drops the listener.
            let _ = TcpStream::connect(self.addr);
            let _ = a.join();
        }
    }

    fn records(&self) -> Vec<Arc<Record>> {
        self.state.records.lock().unwrap().clone()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A request or response head: the first line and the header lines.
struct Head {
    first: String,
    headers: Vec<(String, String)>,
}

impl Head {
    fn get(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    fn has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .any(|(_, v)| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    }

    fn content_length(&self) -> io::Result<Option<u64>> {
        match self.get("content-length") {
            None => Ok(None),
            Some(v) => v.trim().parse().map(Some).map_err(|_| bad(&format!("bad Content-Length {v:?}"))),
        }
    }

    fn chunked(&self) -> bool {
        self.has_token("transfer-encoding", "chunked")
    }

    /// The head as sent, without the headers named in `drop`.
    fn bytes(&self, drop: &[&str]) -> Vec<u8> {
        let mut out = format!("{}\r\n", self.first);
        for (k, v) in &self.headers {
            if !drop.iter().any(|d| k.eq_ignore_ascii_case(d)) {
                out.push_str(&format!("{k}: {v}\r\n"));
            }
        }
        out.push_str("\r\n");
        out.into_bytes()
    }
}

fn bad(m: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, m.to_string())
}

/// Reads a head; `None` at a clean end of the stream before it.
fn read_head(r: &mut impl BufRead) -> io::Result<Option<Head>> {
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return if lines.is_empty() { Ok(None) } else { Err(bad("connection closed mid-head")) };
        }
        let line = line.trim_end_matches(['\r', '\n']).to_string();
        if line.is_empty() {
            if lines.is_empty() {
                continue; // a stray CRLF between messages
            }
            break;
        }
        lines.push(line);
    }
    let first = lines.remove(0);
    let headers = lines
        .into_iter()
        .filter_map(|l| l.split_once(':').map(|(k, v)| (k.trim().to_string(), v.trim().to_string())))
        .collect();
    Ok(Some(Head { first, headers }))
}

/// One client connection: requests relayed one at a time over one
/// registry connection, until either side closes.
fn serve_connection(client: TcpStream, st: &State) -> io::Result<()> {
    client.set_nodelay(true)?;
    st.sockets.lock().unwrap().push(client.try_clone()?);
    let (mut from_server, mut to_server) = connect_upstream(st)?;
    if st.stopped.load(Ordering::SeqCst) {
        return Ok(());
    }
    let mut from_client = BufReader::with_capacity(64 << 10, client.try_clone()?);
    let mut to_client = client;
    loop {
        let Some(req) = read_head(&mut from_client)? else { return Ok(()) };
        // The registry may have closed an idle connection: open another.
        if upstream_closed(&to_server) {
            (from_server, to_server) = connect_upstream(st)?;
        }
        let mut parts = req.first.split(' ');
        let method = parts.next().unwrap_or_default().to_string();
        let target = parts.next().unwrap_or_default().to_string();
        let record = Arc::new(Record {
            method: method.clone(),
            target,
            range: req.get("range").map(str::to_string),
            status: AtomicU16::new(0),
            body: AtomicU64::new(0),
            sent: AtomicU64::new(0),
        });
        st.records.lock().unwrap().push(record.clone());
        let close = req.has_token("connection", "close");

        // The relay answers `Expect: 100-continue` itself: the body is read
        // right after the head, and the registry never sends a 100.
        let expect = req.has_token("expect", "100-continue");
        to_server.write_all(&req.bytes(&["expect"]))?;
        if expect {
            to_client.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        }
        if req.chunked() {
            copy_chunked(&mut from_client, &mut to_server, |w, data| {
                record.sent.fetch_add(data.len() as u64, Ordering::SeqCst);
                w.write_all(data).map(|_| true)
            })?;
        } else if let Some(n) = req.content_length()? {
            copy_exact(&mut from_client, n, |data| {
                to_server.write_all(data)?;
                record.sent.fetch_add(data.len() as u64, Ordering::SeqCst);
                Ok(true)
            })?;
        }
        to_server.flush()?;

        // The answer; informational ones passed on first.
        let resp = loop {
            let Some(resp) = read_head(&mut from_server)? else {
                return Err(bad("registry closed the connection before answering"));
            };
            let status: u16 = resp.first.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
            if (100..200).contains(&status) && status != 101 {
                to_client.write_all(&resp.bytes(&[]))?;
                continue;
            }
            break resp;
        };
        let status: u16 = resp.first.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        record.status.store(status, Ordering::SeqCst);
        to_client.write_all(&resp.bytes(&[]))?;

        let no_body = method == "HEAD" || status == 204 || status == 304;
        let length = resp.content_length()?;
        let mut body = Body { st, record: &record, blob: record.is_blob_get(), offset: 0, flip_at: None };
        if body.blob && (status == 200 || status == 206) && !no_body {
            let digest = record.path().rsplit('/').next().unwrap_or_default().to_string();
            if st.flips.lock().unwrap().remove(&digest) {
                body.flip_at = Some(length.map(|l| l / 2).unwrap_or(0));
            }
        }
        let mut until_close = false;
        if no_body {
        } else if resp.chunked() {
            let ok = copy_chunked(&mut from_server, &mut to_client, |w, data| body.pass(w, data))?;
            if !ok {
                return cut(&to_client, &to_server, st);
            }
        } else if let Some(n) = length {
            let ok = copy_exact(&mut from_server, n, |data| body.pass(&mut to_client, data))?;
            if !ok {
                return cut(&to_client, &to_server, st);
            }
        } else {
            until_close = true;
            let mut buf = vec![0u8; 64 << 10];
            loop {
                let n = from_server.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                if !body.pass(&mut to_client, &mut buf[..n])? {
                    return cut(&to_client, &to_server, st);
                }
            }
        }
        to_client.flush()?;
        if close || until_close || resp.has_token("connection", "close") {
            let _ = to_client.shutdown(Shutdown::Both);
            let _ = to_server.shutdown(Shutdown::Both);
            return Ok(());
        }
    }
}

/// A connection to the registry: its reader and its writer.
fn connect_upstream(st: &State) -> io::Result<(BufReader<TcpStream>, TcpStream)> {
    let server = TcpStream::connect(&st.upstream)?;
    server.set_nodelay(true)?;
    server.set_read_timeout(Some(Duration::from_secs(120)))?;
    st.sockets.lock().unwrap().push(server.try_clone()?);
    Ok((BufReader::with_capacity(64 << 10, server.try_clone()?), server))
}

/// Whether the registry has closed this (idle) connection.
fn upstream_closed(server: &TcpStream) -> bool {
    if server.set_nonblocking(true).is_err() {
        return true;
    }
    let mut byte = [0u8; 1];
    let closed = match server.peek(&mut byte) {
        Ok(0) => true,
        Ok(_) => false, // bytes nobody asked for: leave them to fail the next read
        Err(e) => e.kind() != io::ErrorKind::WouldBlock,
    };
    closed || server.set_nonblocking(false).is_err()
}

/// Closes both sides mid-body (a dropped connection).
fn cut(client: &TcpStream, server: &TcpStream, st: &State) -> io::Result<()> {
    st.cuts.fetch_add(1, Ordering::SeqCst);
    let _ = client.shutdown(Shutdown::Both);
    let _ = server.shutdown(Shutdown::Both);
    Ok(())
}

/// A response body on its way to the client: counted, maybe flipped, held or cut.
struct Body<'a> {
    st: &'a State,
    record: &'a Record,
    blob: bool,
    offset: u64,
    flip_at: Option<u64>,
}

impl Body<'_> {
    /// Writes `data` (payload bytes only); `false` when the connection is to be cut.
    fn pass(&mut self, w: &mut impl Write, data: &mut [u8]) -> io::Result<bool> {
        if let Some(at) = self.flip_at {
            if at >= self.offset && at < self.offset + data.len() as u64 {
                data[(at - self.offset) as usize] ^= 0xff;
                self.flip_at = None;
            }
        }
        self.offset += data.len() as u64;
        if !self.blob {
            w.write_all(data)?;
            self.record.body.fetch_add(data.len() as u64, Ordering::SeqCst);
            return Ok(true);
        }
        let mut data = &data[..];
        loop {
            match self.st.admit(data.len()) {
                Verdict::Pass => {
                    w.write_all(data)?;
                    self.record.body.fetch_add(data.len() as u64, Ordering::SeqCst);
                    return Ok(true);
                }
                Verdict::Cut(n) => {
                    w.write_all(&data[..n])?;
                    w.flush()?;
                    self.record.body.fetch_add(n as u64, Ordering::SeqCst);
                    return Ok(false);
                }
                Verdict::Hold(n) => {
                    w.write_all(&data[..n])?;
                    w.flush()?;
                    self.record.body.fetch_add(n as u64, Ordering::SeqCst);
                    data = &data[n..];
                    self.st.held.store(true, Ordering::SeqCst);
                    while !self.st.hold_released() {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    if self.st.stopped.load(Ordering::SeqCst) {
                        return Ok(false);
                    }
                }
            }
        }
    }
}

/// Copies exactly `n` bytes through `pass`; stops early (returning
/// `false`) when `pass` does.
fn copy_exact(r: &mut impl Read, mut n: u64, mut pass: impl FnMut(&mut [u8]) -> io::Result<bool>) -> io::Result<bool> {
    let mut buf = vec![0u8; 64 << 10];
    while n > 0 {
        let want = buf.len().min(n as usize);
        let got = r.read(&mut buf[..want])?;
        if got == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "body ended early"));
        }
        n -= got as u64;
        if !pass(&mut buf[..got])? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Copies a chunked body: the framing as is, the payload through `pass`.
fn copy_chunked<W: Write>(
    r: &mut impl BufRead,
    w: &mut W,
    mut pass: impl FnMut(&mut W, &mut [u8]) -> io::Result<bool>,
) -> io::Result<bool> {
    loop {
        let mut size_line = String::new();
        if r.read_line(&mut size_line)? == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "chunked body ended early"));
        }
        let size_text = size_line.trim_end_matches(['\r', '\n']);
        let size = u64::from_str_radix(size_text.split(';').next().unwrap_or_default().trim(), 16)
            .map_err(|_| bad(&format!("bad chunk size {size_text:?}")))?;
        w.write_all(size_line.as_bytes())?;
        if size == 0 {
            // Trailers, then the empty line.
            loop {
                let mut line = String::new();
                if r.read_line(&mut line)? == 0 {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "chunked trailer ended early"));
                }
                w.write_all(line.as_bytes())?;
                if line == "\r\n" || line == "\n" {
                    return Ok(true);
                }
            }
        }
        let mut buf = vec![0u8; 64 << 10];
        let mut left = size;
        while left > 0 {
            let want = buf.len().min(left as usize);
            let got = r.read(&mut buf[..want])?;
            if got == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "chunk ended early"));
            }
            left -= got as u64;
            if !pass(w, &mut buf[..got])? {
                return Ok(false);
            }
        }
        let mut crlf = [0u8; 2];
        r.read_exact(&mut crlf)?;
        w.write_all(&crlf)?;
    }
}
