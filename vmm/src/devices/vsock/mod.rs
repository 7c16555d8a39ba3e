//! virtio-vsock with a hybrid unix-socket host side, as Firecracker and Dragonball do it.
//!
//! - Host → guest: a client connects to the device's unix socket and writes `CONNECT <port>\n`;
//!   once the guest accepts, it reads `OK <hostport>\n` and the stream is relayed both ways. If
//!   nothing listens on that guest port, the client sees EOF without `OK` (and retries).
//! - Guest → host: a guest connection to CID 2, port P is relayed to `<uds_path>_<P>`.
//!
//! Layout: [`device`] (the `VirtioDevice`), [`event_handler`] (queues on the event loop),
//! [`muxer`] (routing, host sockets), [`connection`] (one stream's state machine and credit),
//! [`packet`] (wire constants and header helpers).

pub mod connection;
mod device;
pub mod event_handler;
pub mod muxer;
pub mod packet;

pub use device::Vsock;

/// Errors creating the vsock device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The guest CID is reserved or out of range.
    #[error("guest CID {0} is reserved or out of range")]
    InvalidCid(u64),
    /// The host-side unix listener could not be created.
    #[error("cannot listen on the vsock unix socket")]
    Listen(#[source] std::io::Error),
}

#[cfg(test)]
mod test_utils;
#[cfg(test)]
mod tests;
