//! The vsock `VirtioDevice`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::VsockError;
use crate::devices::event_loop::EventLoopHandle;
use crate::devices::virtio::{ActivateError, ActivatedQueue, GuestMemory, InterruptSignal, VirtioDevice};

/// A virtio-vsock device whose host side is a unix socket.
pub struct Vsock {
    guest_cid: u64,
    uds_path: PathBuf,
    events: EventLoopHandle,
}

impl Vsock {
    /// Create the device and its host listener at `uds_path`.
    pub fn new(guest_cid: u64, uds_path: &Path, events: EventLoopHandle) -> Result<Vsock, VsockError> {
        Ok(Vsock { guest_cid, uds_path: uds_path.to_path_buf(), events })
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[256, 256, 256]
    }
    fn avail_features(&self) -> u64 {
        1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1
    }
    fn set_acked_features(&mut self, _features: u64) {}
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        let _ = (&self.guest_cid, &self.uds_path, &self.events);
        data.fill(0);
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn activate(&mut self, _mem: GuestMemory, _interrupt: Arc<dyn InterruptSignal>, _queues: Vec<ActivatedQueue>) -> Result<(), ActivateError> {
        Err(ActivateError::Other("not implemented".into()))
    }
    fn reset(&mut self) -> bool {
        false
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.uds_path);
    }
}
