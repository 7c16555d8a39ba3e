//! Virtio devices and their MMIO transport.
//!
//! Layering (as in rust-vmm's vmm-reference): [`VirtioDevice`] is what a device implements;
//! [`mmio::MmioTransport`] owns the virtio-mmio register file and turns driver actions into
//! calls on the device; each device's queue processing runs on the VMM's event-loop thread.
//! tern's devices implement [`core::QueueDevice`] on a [`core::DeviceCore`], which gives them
//! [`VirtioDevice`]; the transport tests and the fuzzers implement it directly.

pub mod core;
pub mod mmio;
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) mod test_ring;

use std::sync::Arc;
use vmm_sys_util::eventfd::EventFd;

use crate::memory::GuestMemory;

/// Raises the device's interrupt line in the guest.
pub trait InterruptSignal: Send + Sync {
    /// Set the given bit(s) of the virtio-mmio InterruptStatus register and inject the interrupt.
    fn trigger(&self, status_bits: u32) -> std::io::Result<()>;
}

/// `VIRTIO_MMIO_INT_VRING`: a used buffer notification.
pub const INT_VRING: u32 = 0x1;
/// `VIRTIO_MMIO_INT_CONFIG`: a configuration change notification.
pub const INT_CONFIG: u32 = 0x2;

/// One queue handed to a device on activation, with the eventfd the guest kicks (ioeventfd).
pub struct ActivatedQueue {
    pub queue: virtio_queue::Queue,
    pub kick: EventFd,
}

/// Errors a device can report when the driver activates it.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("device expected {expected} queues, driver set up {got}")]
    QueueCount { expected: usize, got: usize },
    #[error("device could not start processing")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Other(String),
}

/// Copy `data.len()` bytes of a read-only config space starting at `offset` into `data`;
/// bytes past the end of the config space read as zero. Guest-controlled offsets never panic.
pub fn read_config_space(config: &[u8], offset: u64, data: &mut [u8], device: &str) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else { return };
    if start >= config.len() {
        tracing::debug!(offset, device, "guest read past the config space");
        return;
    }
    let n = data.len().min(config.len() - start);
    data[..n].copy_from_slice(&config[start..start + n]);
}

/// What a virtio device implements; the transport handles everything else.
pub trait VirtioDevice: Send {
    /// Virtio device type (e.g. `VIRTIO_ID_VSOCK`).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits offered to the driver (VIRTIO_F_VERSION_1 is required for virtio-mmio v2).
    fn avail_features(&self) -> u64;
    /// Feature bits the driver acknowledged (only ever a subset of `avail_features`).
    fn set_acked_features(&mut self, features: u64);
    /// Read from the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Write to the device-specific configuration space (ignored by read-only configs).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// DRIVER_OK: start processing. The device keeps the queues and kick eventfds.
    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: Arc<dyn InterruptSignal>,
        queues: Vec<ActivatedQueue>,
    ) -> Result<(), ActivateError>;
    /// Driver reset: stop processing and give back to a pristine state. Returns false if the
    /// device cannot be reset (the transport then keeps it in a failed state).
    fn reset(&mut self) -> bool;
}
