//! Relays that the test controls, so that "containerd goes away mid-load"
//! or "the bundle is killed mid-download" happens at a point the test
//! chooses, not after a timer that a busy machine can outrun.
//!
//! [`Gate`] sits in front of containerd's socket:
//! the client (a `preseed load` child) connects to [`Gate::path`]; every
//! connection is relayed to containerd. The client's bytes are passed on one
//! HTTP/2 frame at a time, so the gate knows which gRPC call each frame
//! belongs to: a HEADERS frame on a stream id not seen before opens a call.
//! When the [`Hold`] point is reached, the gate forwards nothing more from the
//! client (answers still flow back); the test then kills containerd and
//! [`Gate::cut`]s: every connection is closed and new ones are refused, as
//! they are when containerd's process is gone and its socket file stays.
//!
//! [`TcpGate`] sits in front of a registry: it passes the first `n` bytes
//! of answers, then holds the rest until [`TcpGate::release`].

use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The client's first bytes on an HTTP/2 connection (RFC 9113 §3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_DATA: u8 = 0x0;
const FRAME_HEADERS: u8 = 0x1;

/// Where the gate stops passing the client's frames on.
#[derive(Clone, Copy, Debug)]
pub enum Hold {
    /// Never: a whole load, to count its calls.
    Never,
    /// Before the frame that opens the `n`th gRPC call (1-based).
    BeforeCall(usize),
    /// Before the DATA frame that would take the bytes sent past `n`
    /// (e.g. halfway through a layer being written).
    AfterDataBytes(u64),
}

struct State {
    hold: Hold,
    calls: AtomicUsize,
    data: AtomicU64,
    held: Mutex<bool>,
    changed: Condvar,
    cut: AtomicBool,
    streams: Mutex<Vec<UnixStream>>,
}

impl State {
    /// Whether `frame` (type, stream id, payload length) may pass; counts it.
    fn admit(&self, kind: u8, stream: u32, len: u64, max_stream: &mut u32) -> bool {
        if *self.held.lock().unwrap() {
            return false;
        }
        let pass = match kind {
            FRAME_HEADERS if stream > *max_stream => {
                *max_stream = stream;
                let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
                !matches!(self.hold, Hold::BeforeCall(k) if n >= k)
            }
            FRAME_DATA => {
                let sent = self.data.fetch_add(len, Ordering::SeqCst) + len;
                !matches!(self.hold, Hold::AfterDataBytes(limit) if sent > limit)
            }
            _ => true,
        };
        if !pass {
            *self.held.lock().unwrap() = true;
            self.changed.notify_all();
        }
        pass
    }
}

/// The relay; cut (and its threads ended) when dropped.
pub struct Gate {
    path: PathBuf,
    state: Arc<State>,
    acceptor: Option<JoinHandle<()>>,
}

impl Gate {
    /// Listens on `dir/gate.sock`, relaying to `upstream`.
    pub fn start(dir: &Path, upstream: &Path, hold: Hold) -> Gate {
        let path = dir.join("gate.sock");
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let state = Arc::new(State {
            hold,
            calls: AtomicUsize::new(0),
            data: AtomicU64::new(0),
            held: Mutex::new(false),
            changed: Condvar::new(),
            cut: AtomicBool::new(false),
            streams: Mutex::new(Vec::new()),
        });
        let (s, upstream) = (state.clone(), upstream.to_path_buf());
        let acceptor = std::thread::spawn(move || {
            for client in listener.incoming() {
                if s.cut.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = UnixStream::connect(&upstream) else { continue };
                {
                    let mut streams = s.streams.lock().unwrap();
                    streams.push(client.try_clone().unwrap());
                    streams.push(server.try_clone().unwrap());
                }
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let st = s.clone();
                std::thread::spawn(move || {
                    let _ = relay_frames(client, server, &st);
                });
                std::thread::spawn(move || {
                    let _ = io::copy(&mut { s2 }, &mut { c2 });
                });
            }
            // The listener goes here; its socket file stays, so a client
            // connecting again is refused, as by a dead containerd's socket.
        });
        Gate { path, state, acceptor: Some(acceptor) }
    }

    /// The socket the client is given.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// gRPC calls the client has opened so far (held ones included).
    pub fn calls(&self) -> usize {
        self.state.calls.load(Ordering::SeqCst)
    }

    /// Waits until the hold point is reached; `false` if `client` exited
    /// first (it made fewer calls than the hold point) or 60 s passed.
    pub fn wait_held(&self, client: &mut std::process::Child) -> bool {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut held = self.state.held.lock().unwrap();
        while !*held {
            if Instant::now() > deadline || client.try_wait().unwrap().is_some() {
                return false;
            }
            held = self.state.changed.wait_timeout(held, Duration::from_millis(20)).unwrap().0;
        }
        true
    }

    /// Closes every relayed connection and stops accepting new ones.
    pub fn cut(&mut self) {
        self.state.cut.store(true, Ordering::SeqCst);
        for s in self.state.streams.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        *self.state.held.lock().unwrap() = true;
        self.state.changed.notify_all();
        if let Some(a) = self.acceptor.take() {
            // Wakes the acceptor, which sees `cut` and drops the listener.
            let _ = UnixStream::connect(&self.path);
            a.join().unwrap();
        }
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.cut();
    }
}

/// Client → containerd, frame by frame, stopping (not closing) at the hold
/// point until the gate is cut.
fn relay_frames(mut client: UnixStream, mut server: UnixStream, state: &State) -> io::Result<()> {
    let mut preface = [0u8; 24];
    client.read_exact(&mut preface)?;
    assert_eq!(&preface, PREFACE, "not an HTTP/2 client");
    server.write_all(&preface)?;
    let mut max_stream = 0u32;
    let mut header = [0u8; 9];
    let mut payload = Vec::new();
    loop {
        client.read_exact(&mut header)?;
        let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
        let stream = u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff;
        payload.resize(len, 0);
        client.read_exact(&mut payload)?;
        if !state.admit(header[3], stream, len as u64, &mut max_stream) {
            // Held: keep the connection open, pass nothing, until cut.
            while !state.cut.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(10));
            }
            return Ok(());
        }
        server.write_all(&header)?;
        server.write_all(&payload)?;
    }
}

/// A TCP relay in front of a registry that holds its answers after a
/// number of bytes, until released.
pub struct TcpGate {
    addr: std::net::SocketAddr,
    state: Arc<TcpState>,
}

struct TcpState {
    hold_after: u64,
    sent: AtomicU64,
    held: AtomicBool,
    released: AtomicBool,
}

impl TcpGate {
    /// Listens on a free loopback port, relaying to `upstream` (`host:port`);
    /// holds answers once `hold_after` bytes of them have passed.
    pub fn start(upstream: &str, hold_after: u64) -> TcpGate {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(TcpState {
            hold_after,
            sent: AtomicU64::new(0),
            held: AtomicBool::new(false),
            released: AtomicBool::new(false),
        });
        let (s, upstream) = (state.clone(), upstream.to_string());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let Ok(server) = std::net::TcpStream::connect(&upstream) else { continue };
                let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = io::copy(&mut { client }, &mut { server });
                });
                let st = s.clone();
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 << 10];
                    while let Ok(n) = s2.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        let mut pass = n;
                        if !st.released.load(Ordering::SeqCst) {
                            let before = st.sent.fetch_add(n as u64, Ordering::SeqCst);
                            pass = st.hold_after.saturating_sub(before).min(n as u64) as usize;
                        }
                        if c2.write_all(&buf[..pass]).is_err() {
                            break;
                        }
                        if pass < n {
                            st.held.store(true, Ordering::SeqCst);
                            while !st.released.load(Ordering::SeqCst) {
                                std::thread::sleep(Duration::from_millis(10));
                            }
                            if c2.write_all(&buf[pass..n]).is_err() {
                                break;
                            }
                        }
                    }
                    let _ = c2.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        TcpGate { addr, state }
    }

    /// `127.0.0.1:<port>`, to use as the registry's host.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// Waits until answers are held; `false` if `client` exited first or
    /// 60 s passed.
    pub fn wait_held(&self, client: &mut std::process::Child) -> bool {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.state.held.load(Ordering::SeqCst) {
            if Instant::now() > deadline || client.try_wait().unwrap().is_some() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    /// Passes everything from now on.
    pub fn release(&self) {
        self.state.released.store(true, Ordering::SeqCst);
    }
}

impl Drop for TcpGate {
    fn drop(&mut self) {
        self.release();
    }
}
