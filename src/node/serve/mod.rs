//! `preseed serve`: the partition as a read-only OCI distribution registry,
//! for nodes that pull instead of importing (CRI-O, podman, containerd
//! configured with a mirror): images are fetched only when something needs
//! them, from the same partition `load` imports, with no second format.
//!
//! Pipeline: [`crate::node::read::open`] the source → [`catalog`] lists
//! every image under its names' repositories and where each blob lies in
//! its tarball → [`http`] answers the distribution API, streaming blob bytes
//! from the tarballs by offset.
//!
//! Invariants: never talks to a registry and never writes; memory does not
//! grow with blob size or with how long a download takes (each response
//! holds at most a couple of [`http::CHUNK`]s, and hyper's write buffer is
//! capped at [`MAX_BUF`]); a malformed request gets a 4xx, never a panic.
//! Independent of containerd.

pub mod catalog;
pub mod http;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;

pub use catalog::Catalog;

use crate::node::policy::Policy;
use crate::node::read::open::{self, Opened, Source};

/// Default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:5050";
/// Per-connection cap on hyper's read and write buffers: request heads
/// larger than this get 431; a response body is pulled from the tarball
/// only when what was buffered has been written.
pub const MAX_BUF: usize = 64 << 10;
/// How long a request head may take to arrive (slow clients hold nothing
/// for longer).
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// On shutdown, how long running downloads get to finish.
const GRACE: Duration = Duration::from_secs(10);

/// Why the registry could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The partition could not be opened.
    #[error(transparent)]
    Open(#[from] open::OpenError),
    /// Its images could not be listed.
    #[error(transparent)]
    Catalog(#[from] catalog::CatalogError),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source} (is another server using it? pick another with --listen)")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// A registry bound to its address, ready to [`run`](Server::run).
pub struct Server {
    listener: tokio::net::TcpListener,
    catalog: Arc<Catalog>,
    opened: Opened,
}

impl Server {
    /// Opens `source` (mounting a partition read-only), reads its images
    /// and binds `listen` (port 0 picks a free one: see [`Server::local_addr`]).
    /// Images `policy` refuses are not served (a start-up warning).
    pub async fn bind(source: &Source, listen: SocketAddr, policy: Option<Arc<Policy>>) -> Result<Server, ServeError> {
        let opened = open::open(source)?;
        let root = opened.root().to_path_buf();
        let catalog = tokio::task::spawn_blocking(move || Catalog::build(&root, policy.as_deref()))
            .await
            .expect("reading the catalog does not panic")?;
        let listener =
            tokio::net::TcpListener::bind(listen).await.map_err(|source| ServeError::Bind { addr: listen, source })?;
        Ok(Server { listener, catalog: Arc::new(catalog), opened })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("a bound listener has an address")
    }

    /// What is served.
    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// The source's stable name (see [`Opened::id`]).
    pub fn source_id(&self) -> &str {
        self.opened.id()
    }

    /// Serves until `shutdown` completes, then lets running downloads
    /// finish for a few seconds; the partition is unmounted on return.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let graceful = GracefulShutdown::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                accepted = self.listener.accept() => {
                    let stream = match accepted {
                        Ok((stream, _)) => stream,
                        Err(e) => {
                            // Out of file descriptors and the like: wait, do not spin.
                            eprintln!("preseed serve: accept: {e}");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    };
                    let _ = stream.set_nodelay(true);
                    let catalog = self.catalog.clone();
                    let service = hyper::service::service_fn(move |req| http::handle(catalog.clone(), req));
                    let conn = http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(HEADER_TIMEOUT)
                        .max_buf_size(MAX_BUF)
                        .serve_connection(TokioIo::new(stream), service);
                    let conn = graceful.watch(conn);
                    tokio::spawn(async move {
                        // A client going away mid-response is its business.
                        let _ = conn.await;
                    });
                }
                () = &mut shutdown => break,
            }
        }
        drop(self.listener);
        tokio::select! {
            () = graceful.shutdown() => {}
            () = tokio::time::sleep(GRACE) => {}
        }
        drop(self.opened);
    }
}

/// A future that completes on SIGTERM or SIGINT (Ctrl-C). The handlers are
/// installed when this is called, not when the future is first polled: a
/// SIGTERM that arrives between "serving" and the first poll would otherwise
/// kill the process with the default action instead of stopping it cleanly.
pub fn shutdown_signal() -> impl Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            // No signal driver (not on a Unix runtime): stop only on Ctrl-C.
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}
