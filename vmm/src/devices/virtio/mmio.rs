//! The virtio-mmio (version 2) transport: the register file the guest driver programs.

use vmm_sys_util::eventfd::EventFd;

use super::{GuestMemory, VirtioDevice};
use crate::devices::bus::BusDevice;

/// A virtio device behind a virtio-mmio register window.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemory,
    irq: EventFd,
    queue_kicks: Vec<EventFd>,
}

impl MmioTransport {
    /// Wrap `device`; `irq` is injected on interrupts, `queue_kicks[i]` is queue i's notify eventfd.
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemory, irq: EventFd, queue_kicks: Vec<EventFd>) -> Self {
        MmioTransport { device, mem, irq, queue_kicks }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let _ = (offset, &self.device, &self.mem, &self.irq, &self.queue_kicks);
        data.fill(0);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        let _ = (offset, data);
    }
}
