//! virtio-vsock with a hybrid unix-socket host side (`CONNECT <port>\n`, as Firecracker does).

mod device;

pub use device::Vsock;

/// Errors creating or running the vsock device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The host-side unix listener could not be created.
    #[error("cannot listen on the vsock unix socket")]
    Listen(#[source] std::io::Error),
    /// The event loop refused a subscriber.
    #[error("cannot register with the device event loop")]
    EventLoop(#[source] std::io::Error),
}
