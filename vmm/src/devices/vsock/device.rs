//! The vsock [`VirtioDevice`]: config space, features, and activation, which hands the queues
//! and the muxer to a [`VsockHandler`] on the device event loop.

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;

use super::event_handler::VsockHandler;
use super::muxer::Muxer;
use super::VsockError;
use crate::devices::event_loop::{ActiveHandler, EventLoopHandle, SharedSubscriber};
use crate::devices::virtio::{read_config_space, ActivateError, ActivatedQueue, InterruptSignal, VirtioDevice};
use crate::memory::GuestMemory;
use crate::metrics::VmMetrics;

/// Queue size of rx, tx and event queues.
pub const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 3] = [QUEUE_SIZE; 3];
/// CIDs 0-2 are reserved (hypervisor, local, host); `u32::MAX` is VMADDR_CID_ANY.
const FIRST_GUEST_CID: u64 = 3;

/// A virtio-vsock device whose host side is a hybrid unix socket at `uds_path`.
pub struct Vsock {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: Arc<UnixListener>,
    events: EventLoopHandle,
    acked_features: u64,
    active: Option<ActiveHandler>,
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
            events,
            acked_features: 0,
            active: None,
            metrics: None,
        })
    }

    fn deactivate(&mut self) {
        if let Some(active) = self.active.take() {
            self.events.deactivate(active);
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_vsock_config { le64 guest_cid; }
        read_config_space(&self.guest_cid.to_le_bytes(), offset, data, "vsock");
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        tracing::debug!(offset, "guest write to the read-only vsock config space ignored");
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: Arc<dyn InterruptSignal>,
        queues: Vec<ActivatedQueue>,
    ) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::Other("vsock device is already active".into()));
        }
        let got = queues.len();
        let Ok([rx, tx, ev]) = <[ActivatedQueue; 3]>::try_from(queues) else {
            return Err(ActivateError::QueueCount { expected: 3, got });
        };
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
        let subscriber: SharedSubscriber = Arc::new(Mutex::new(handler));
        self.active = Some(self.events.activate(subscriber, stopped)?);
        tracing::debug!(guest_cid = self.guest_cid, "vsock device activated");
        Ok(())
    }

    fn reset(&mut self) -> bool {
        // Connections die with the handler (their host streams see EOF); the listener stays,
        // so host clients can connect again once the driver is back.
        self.deactivate();
        self.acked_features = 0;
        true
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        self.deactivate();
        if let Err(e) = std::fs::remove_file(&self.uds_path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = ?self.uds_path, error = %e, "cannot remove the vsock socket");
            }
        }
    }
}
