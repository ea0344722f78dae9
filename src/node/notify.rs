//! systemd's readiness protocol (sd_notify): datagrams of `KEY=value` lines
//! sent to the Unix socket named by `$NOTIFY_SOCKET` (a path, or `@name`
//! for the abstract namespace). A few lines over a datagram socket; no
//! library needed.

use std::ffi::OsString;
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// The service manager's notification socket.
pub struct Notifier {
    socket: UnixDatagram,
    addr: SocketAddr,
    name: OsString,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Notifier({:?})", self.name)
    }
}

impl Notifier {
    /// The socket `$NOTIFY_SOCKET` names; `None` when it is not set (not
    /// started by systemd as `Type=notify`).
    pub fn from_env() -> io::Result<Option<Notifier>> {
        match std::env::var_os("NOTIFY_SOCKET") {
            Some(name) if !name.is_empty() => Notifier::new(name).map(Some),
            _ => Ok(None),
        }
    }

    /// A notifier for the socket `name` (a path, or `@abstract`).
    pub fn new(name: OsString) -> io::Result<Notifier> {
        let bytes = name.as_bytes();
        let addr = match bytes.strip_prefix(b"@") {
            Some(abstract_name) => SocketAddr::from_abstract_name(abstract_name)?,
            None => SocketAddr::from_pathname(std::path::Path::new(&name))?,
        };
        Ok(Notifier { socket: UnixDatagram::unbound()?, addr, name })
    }

    /// Sends one state message, e.g. `READY=1\nSTATUS=…`.
    pub fn send(&self, state: &str) -> io::Result<()> {
        self.socket.send_to_addr(state.as_bytes(), &self.addr).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_to_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::new(path.clone().into_os_string()).unwrap();
        n.send("READY=1\nSTATUS=ok").unwrap();
        let mut buf = [0u8; 64];
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=ok");
    }
}
