//! The vsock [`VirtioDevice`]: config space, features, and activation, which hands the queues
//! and the muxer to a [`VsockHandler`] on the device event loop.

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;

use super::event_handler::VsockHandler;
use super::muxer::Muxer;
use super::VsockError;
use crate::devices::event_loop::EventLoopHandle;
use crate::devices::virtio::core::{DeviceCore, QueueDevice};
use crate::devices::virtio::{ActivateError, ActivatedQueue, InterruptSignal};
use crate::memory::GuestMemory;
use crate::metrics::VmMetrics;

/// Queue size of rx, tx and event queues.
pub const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 3] = [QUEUE_SIZE; 3];
/// CIDs 0-2 are reserved (hypervisor, local, host); `u32::MAX` is VMADDR_CID_ANY.
const FIRST_GUEST_CID: u64 = 3;

/// A virtio-vsock device whose host side is a hybrid unix socket at `uds_path`. A driver
/// reset ends the connections with the handler (their host streams see EOF); the listener
/// stays, so host clients can connect again once the driver is back.
pub struct Vsock {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: Arc<UnixListener>,
    core: DeviceCore,
    metrics: Option<Arc<VmMetrics>>,
}

impl Vsock {
    /// Count this device's queue notifications and payload bytes in `metrics`.
    pub fn set_metrics(&mut self, metrics: Arc<VmMetrics>) {
        self.metrics = Some(metrics);
    }

    /// Create the device and bind its host listener at `uds_path` (which must not exist).
    /// Host clients may connect at once; they are served once the guest driver is up.
    pub fn new(guest_cid: u64, uds_path: &Path, events: EventLoopHandle) -> Result<Vsock, VsockError> {
        if guest_cid < FIRST_GUEST_CID || guest_cid >= u64::from(u32::MAX) {
            return Err(VsockError::InvalidCid(guest_cid));
        }
        let listener = UnixListener::bind(uds_path).map_err(VsockError::Listen)?;
        listener.set_nonblocking(true).map_err(VsockError::Listen)?;
        Ok(Vsock {
            guest_cid,
            uds_path: uds_path.to_path_buf(),
            listener: Arc::new(listener),
            // struct virtio_vsock_config { le64 guest_cid; }
            core: DeviceCore::new("vsock", &guest_cid.to_le_bytes(), &QUEUE_SIZES, 1 << VIRTIO_F_VERSION_1, events),
            metrics: None,
        })
    }
}

impl QueueDevice for Vsock {
    const DEVICE_TYPE: u32 = VIRTIO_ID_VSOCK;

    fn core(&self) -> &DeviceCore {
        &self.core
    }

    fn core_mut(&mut self) -> &mut DeviceCore {
        &mut self.core
    }

    fn start(
        &mut self,
        mem: GuestMemory,
        interrupt: Arc<dyn InterruptSignal>,
        queues: Vec<ActivatedQueue>,
    ) -> Result<(), ActivateError> {
        let [rx, tx, ev] = self.core.queues::<3>(queues)?;
        let muxer = Muxer::new(self.guest_cid, self.uds_path.clone(), self.listener.clone())?;
        let stopped = Arc::new(AtomicBool::new(false));
        let handler = VsockHandler::new(
            mem,
            interrupt,
            [rx.queue, tx.queue, ev.queue],
            [rx.kick, tx.kick, ev.kick],
            muxer,
            stopped.clone(),
        )
        .with_metrics(self.metrics.clone());
        self.core.start(handler, stopped)?;
        tracing::debug!(guest_cid = self.guest_cid, "vsock device activated");
        Ok(())
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        // The handler stops before its socket's path goes.
        self.core.stop();
        if let Err(e) = std::fs::remove_file(&self.uds_path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = ?self.uds_path, error = %e, "cannot remove the vsock socket");
            }
        }
    }
}
