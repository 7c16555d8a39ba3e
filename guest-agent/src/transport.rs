//! Where the agent listens: vsock in the guest, unix sockets for host-side testing.
//!
//! Everything above this module sees a [`Listener`] that yields [`Connection`]s, so the RPC and
//! stream code is identical in both modes and the integration tests exercise the real paths.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use vsock::{VsockListener, VsockStream, VMADDR_CID_ANY};

/// File name of the RPC socket in `--unix-dir` mode.
pub const UNIX_RPC_SOCKET: &str = "rpc.sock";
/// File name of the stdio stream socket in `--unix-dir` mode.
pub const UNIX_STREAM_SOCKET: &str = "stream.sock";
/// File name of the change-record socket (watchable mounts) in `--unix-dir` mode.
pub const UNIX_WATCH_SOCKET: &str = "watch.sock";

/// Errors setting up a listener.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The vsock port could not be bound (no vsock device, or the port is taken).
    #[error("cannot listen on vsock port {port}")]
    BindVsock {
        port: u32,
        #[source]
        source: io::Error,
    },
    /// The unix socket could not be created.
    #[error("cannot listen on {}", path.display())]
    BindUnix {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A bound, listening socket.
#[derive(Debug)]
pub enum Listener {
    Vsock(VsockListener),
    Unix(UnixListener),
}

impl Listener {
    /// Listen on `port` for any CID (the host reaches us through the vsock device).
    pub fn vsock(port: u32) -> Result<Self, TransportError> {
        VsockListener::bind_with_cid_port(VMADDR_CID_ANY, port)
            .map(Listener::Vsock)
            .map_err(|source| TransportError::BindVsock { port, source })
    }

    /// Listen on a unix socket at `path`, replacing a stale socket file from an earlier run.
    pub fn unix(path: &Path) -> Result<Self, TransportError> {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(TransportError::BindUnix { path: path.to_owned(), source }),
        }
        UnixListener::bind(path)
            .map(Listener::Unix)
            .map_err(|source| TransportError::BindUnix { path: path.to_owned(), source })
    }

    /// Block until a peer connects.
    pub fn accept(&self) -> io::Result<Connection> {
        match self {
            Listener::Vsock(l) => l.accept().map(|(s, _)| Connection::Vsock(s)),
            Listener::Unix(l) => l.accept().map(|(s, _)| Connection::Unix(s)),
        }
    }
}

/// One accepted stream connection. Both kinds are close-on-exec, so spawned processes never
/// inherit them (an inherited copy would keep the host from ever seeing EOF).
#[derive(Debug)]
pub enum Connection {
    Vsock(VsockStream),
    Unix(UnixStream),
}

impl Connection {
    /// Shut down one or both directions; used to deliver EOF to the host.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Connection::Vsock(s) => s.shutdown(how),
            Connection::Unix(s) => s.shutdown(how),
        }
    }

    /// A second handle to the same socket (e.g. so `CloseStdin` can end a stdin stream).
    pub fn try_clone(&self) -> io::Result<Connection> {
        match self {
            Connection::Vsock(s) => s.try_clone().map(Connection::Vsock),
            Connection::Unix(s) => s.try_clone().map(Connection::Unix),
        }
    }
}

impl Read for Connection {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Connection::Vsock(s) => s.read(buf),
            Connection::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Connection {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Connection::Vsock(s) => s.write(buf),
            Connection::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Connection::Vsock(s) => s.flush(),
            Connection::Unix(s) => s.flush(),
        }
    }
}
