//! What every tern virtio device shares: [`DeviceCore`] (name, read-only config space, queue
//! sizes, features, and the queue handler its activation registered on the device's event
//! loop) and [`QueueDevice`], which makes a [`VirtioDevice`] of a device built on one. The
//! devices (`fs`, `vsock`, `net`) differ in their queues and handlers, not in this bookkeeping.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use event_manager::MutEventSubscriber;

use super::{read_config_space, ActivateError, ActivatedQueue, InterruptSignal, VirtioDevice};
use crate::devices::event_loop::{ActiveHandler, EventLoopHandle, SharedSubscriber};
use crate::memory::GuestMemory;

/// A virtio device built on a [`DeviceCore`]; it is a [`VirtioDevice`] through the impl below.
pub trait QueueDevice: Send {
    /// Virtio device type (e.g. `VIRTIO_ID_VSOCK`).
    const DEVICE_TYPE: u32;
    fn core(&self) -> &DeviceCore;
    fn core_mut(&mut self) -> &mut DeviceCore;
    /// DRIVER_OK: take the queues (see [`DeviceCore::queues`]) and start a handler on them
    /// (see [`DeviceCore::start`]).
    fn start(
        &mut self,
        mem: GuestMemory,
        interrupt: Arc<dyn InterruptSignal>,
        queues: Vec<ActivatedQueue>,
    ) -> Result<(), ActivateError>;
    /// What a driver reset undoes beyond the handler and the acked features, which are gone
    /// already when it is called.
    fn on_reset(&mut self) {}
}

impl<D: QueueDevice> VirtioDevice for D {
    fn device_type(&self) -> u32 {
        D::DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        self.core().queue_sizes
    }

    fn avail_features(&self) -> u64 {
        self.core().avail_features()
    }

    fn set_acked_features(&mut self, features: u64) {
        self.core_mut().ack_features(features);
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_space(&self.core().config, offset, data, &self.core().device);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        tracing::debug!(device = %self.core().device, offset, "guest write to the read-only config space ignored");
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: Arc<dyn InterruptSignal>,
        queues: Vec<ActivatedQueue>,
    ) -> Result<(), ActivateError> {
        self.start(mem, interrupt, queues)
    }

    fn reset(&mut self) -> bool {
        self.core_mut().reset();
        self.on_reset();
        true
    }
}

/// What every tern virtio device has: a name, a read-only config space, its queues' sizes,
/// the features offered and acked, and the handler its activation started. Dropping it stops
/// a running handler.
pub struct DeviceCore {
    /// `virtio-fs`, `vsock`, `virtio-net <tap>`: names the device in errors and logs.
    device: String,
    /// The device-specific configuration space; the guest may only read it.
    config: Box<[u8]>,
    /// Maximum size of each queue; the length is the number of queues.
    queue_sizes: &'static [u16],
    events: EventLoopHandle,
    avail_features: u64,
    acked_features: u64,
    active: Option<ActiveHandler>,
}

impl DeviceCore {
    /// A device called `device` with `config`, queues of `queue_sizes`, that offers
    /// `avail_features` and runs its queues on `events`.
    pub fn new(
        device: impl Into<String>,
        config: &[u8],
        queue_sizes: &'static [u16],
        avail_features: u64,
        events: EventLoopHandle,
    ) -> DeviceCore {
        DeviceCore {
            device: device.into(),
            config: config.into(),
            queue_sizes,
            events,
            avail_features,
            acked_features: 0,
            active: None,
        }
    }

    pub fn avail_features(&self) -> u64 {
        self.avail_features
    }

    /// What the driver acked, never more than was offered.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    pub fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    /// The loop the device's handler runs on.
    pub fn events(&self) -> &EventLoopHandle {
        &self.events
    }

    /// The first step of an activation: the device must not run yet and the driver must have
    /// set up exactly `N` queues.
    pub fn queues<const N: usize>(&self, queues: Vec<ActivatedQueue>) -> Result<[ActivatedQueue; N], ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::Other(format!("{} device is already active", self.device)));
        }
        let got = queues.len();
        <[ActivatedQueue; N]>::try_from(queues).map_err(|_| ActivateError::QueueCount { expected: N, got })
    }

    /// The last step of an activation: register `handler`, which checks `stopped` before it
    /// touches guest memory.
    pub fn start(
        &mut self,
        handler: impl MutEventSubscriber + Send + 'static,
        stopped: Arc<AtomicBool>,
    ) -> Result<(), ActivateError> {
        let subscriber: SharedSubscriber = Arc::new(Mutex::new(handler));
        self.active = Some(self.events.activate(subscriber, stopped)?);
        Ok(())
    }

    /// A driver reset: stop the handler and forget the acked features.
    pub fn reset(&mut self) {
        self.stop();
        self.acked_features = 0;
    }

    /// Stop the handler at once and unregister it (see [`EventLoopHandle::deactivate`]).
    pub fn stop(&mut self) {
        if let Some(active) = self.active.take() {
            self.events.deactivate(active);
        }
    }
}

impl Drop for DeviceCore {
    fn drop(&mut self) {
        self.stop();
    }
}
