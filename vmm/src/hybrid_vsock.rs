//! The host side of the vsock device's unix socket ("hybrid vsock", as Firecracker's): connect,
//! write `CONNECT <port>\n`, read `OK <host-port>\n`, and the socket is now a stream to that
//! guest port. When nothing listens on the port the device closes the socket instead of
//! answering. The one client of this handshake: the runtime's agent client and the fs watcher's
//! link both use it.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Longest line the device may send in answer to `CONNECT`.
const MAX_HANDSHAKE_LINE: usize = 64;

/// Why a stream to a guest port could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum HybridVsockError {
    /// The VM's socket is not there or refuses connections (no VM).
    #[error("cannot connect to the VM's vsock socket {path}")]
    Socket { path: PathBuf, source: std::io::Error },
    /// The guest has nothing listening on the port (yet).
    #[error("guest refused vsock port {0} (nothing listening)")]
    Refused(u32),
    /// The device answered something other than `OK <port>`.
    #[error("unexpected vsock handshake reply {0:?}")]
    Handshake(String),
    /// No answer to `CONNECT` within the timeout: the VMM's vsock device did not take the
    /// connection, or the guest did not answer its request.
    #[error("no answer to CONNECT {port} within {after:?}")]
    Timeout { port: u32, after: Duration },
    /// Sending `CONNECT` or reading the answer failed.
    #[error("vsock handshake failed")]
    Io(#[from] std::io::Error),
}

/// Open a stream to guest `port` through the VM's vsock socket at `uds_path`, waiting at most
/// `timeout` for each read and write of the handshake. The stream is returned blocking, with
/// no timeouts set.
pub fn connect(uds_path: &Path, port: u32, timeout: Duration) -> Result<UnixStream, HybridVsockError> {
    let mut sock = UnixStream::connect(uds_path)
        .map_err(|source| HybridVsockError::Socket { path: uds_path.to_owned(), source })?;
    sock.set_read_timeout(Some(timeout))?;
    sock.set_write_timeout(Some(timeout))?;
    let timed_out = |e: std::io::Error| match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => HybridVsockError::Timeout { port, after: timeout },
        _ => HybridVsockError::Io(e),
    };
    sock.write_all(format!("CONNECT {port}\n").as_bytes()).map_err(timed_out)?;
    // Byte by byte: whatever follows the newline belongs to the stream.
    let mut line = Vec::with_capacity(16);
    let mut byte = [0u8; 1];
    loop {
        match sock.read(&mut byte) {
            Ok(0) => return Err(HybridVsockError::Refused(port)),
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) if line.len() >= MAX_HANDSHAKE_LINE => {
                return Err(HybridVsockError::Handshake(String::from_utf8_lossy(&line).into_owned()))
            }
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return Err(HybridVsockError::Refused(port)),
            Err(e) => return Err(timed_out(e)),
        }
    }
    if !line.starts_with(b"OK ") {
        return Err(HybridVsockError::Handshake(String::from_utf8_lossy(&line).into_owned()));
    }
    sock.set_read_timeout(None)?;
    sock.set_write_timeout(None)?;
    Ok(sock)
}
