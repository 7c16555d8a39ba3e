//! The virtio-mmio (version 2) transport: the register file the guest driver programs, its
//! status state machine, and the interrupt status shared with the device's queue processing.
//!
//! Everything the guest writes here is untrusted: bad offsets, sizes, queue selectors and
//! out-of-order status transitions are logged and ignored, never a panic.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{ActivatedQueue, InterruptSignal, VirtioDevice};
use crate::devices::bus::BusDevice;
use crate::memory::GuestMemory;

/// "virt" in little endian.
const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// The modern (non-legacy) virtio-mmio layout.
const MMIO_VERSION: u32 = 2;
/// Vendor ID reported to the guest ("tern" would do, but 0 is what most VMMs report).
const VENDOR_ID: u32 = 0;
/// Device-specific configuration space starts here.
const CONFIG_SPACE_OFFSET: u64 = 0x100;
/// Size of the register window the guest is told about (`virtio_mmio.device=<size>@…`).
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;

// Register offsets (virtio 1.2, 4.2.2).
const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const REG_SHM_SEL: u64 = 0x0ac;
const REG_SHM_LEN_LOW: u64 = 0x0b0;
const REG_SHM_LEN_HIGH: u64 = 0x0b4;
const REG_SHM_BASE_LOW: u64 = 0x0b8;
const REG_SHM_BASE_HIGH: u64 = 0x0bc;
const REG_CONFIG_GENERATION: u64 = 0x0fc;

/// The interrupt of one virtio-mmio device: InterruptStatus bits plus the irqfd to inject.
struct MmioInterrupt {
    status: Arc<AtomicU32>,
    irq: EventFd,
}

impl InterruptSignal for MmioInterrupt {
    fn trigger(&self, status_bits: u32) -> std::io::Result<()> {
        self.status.fetch_or(status_bits, Ordering::SeqCst);
        self.irq.write(1)
    }
}

/// A virtio device behind a virtio-mmio version 2 register window.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemory,
    interrupt: Arc<MmioInterrupt>,
    interrupt_status: Arc<AtomicU32>,
    queue_kicks: Vec<EventFd>,
    queues: Vec<Queue>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    status: u32,
    config_generation: u32,
    activated: bool,
}

impl MmioTransport {
    /// Wrap `device`; `irq` is written to inject the device's interrupt, `queue_kicks[i]` is
    /// queue i's notification eventfd (registered as an ioeventfd at QueueNotify, datamatch i).
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemory, irq: EventFd, queue_kicks: Vec<EventFd>) -> Self {
        let mut queues = Vec::new();
        for (index, &max) in device.queue_max_sizes().iter().enumerate() {
            match Queue::new(max) {
                Ok(q) => queues.push(q),
                Err(e) => {
                    // A device bug, not a guest one; the device will refuse activation.
                    tracing::error!(index, max, error = %e, "virtio device declares an invalid queue size");
                    break;
                }
            }
        }
        if queue_kicks.len() != queues.len() {
            tracing::error!(
                kicks = queue_kicks.len(),
                queues = queues.len(),
                "virtio-mmio transport got a kick eventfd count that differs from the queue count"
            );
        }
        let interrupt_status = Arc::new(AtomicU32::new(0));
        let interrupt = Arc::new(MmioInterrupt { status: interrupt_status.clone(), irq });
        MmioTransport {
            device,
            mem,
            interrupt,
            interrupt_status,
            queue_kicks,
            queues,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            status: 0,
            config_generation: 0,
            activated: false,
        }
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        let sel = self.queue_sel as usize;
        let q = self.queues.get_mut(sel);
        if q.is_none() {
            tracing::debug!(sel, "virtio-mmio access to a nonexistent queue");
        }
        q
    }

    /// Queue configuration is only writable between FEATURES_OK and DRIVER_OK.
    fn queue_config_writable(&self) -> bool {
        self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0
            && self.status & VIRTIO_CONFIG_S_DRIVER_OK == 0
            && self.status & VIRTIO_CONFIG_S_FAILED == 0
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        match offset {
            REG_MAGIC => MMIO_MAGIC_VALUE,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => {
                let features = self.device.avail_features();
                match self.device_features_sel {
                    0 => features as u32,
                    1 => (features >> 32) as u32,
                    _ => 0,
                }
            }
            REG_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            REG_QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            REG_INTERRUPT_STATUS => self.interrupt_status.load(Ordering::SeqCst),
            REG_STATUS => self.status,
            // No shared memory regions: a length of all ones means "absent".
            REG_SHM_LEN_LOW | REG_SHM_LEN_HIGH | REG_SHM_BASE_LOW | REG_SHM_BASE_HIGH => u32::MAX,
            REG_CONFIG_GENERATION => self.config_generation,
            _ => {
                tracing::debug!(offset, "guest read of a write-only or unknown virtio-mmio register");
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            REG_DRIVER_FEATURES => self.write_driver_features(value),
            REG_QUEUE_SEL => self.queue_sel = value,
            REG_QUEUE_NUM => self.write_queue(|q| q.set_size(value as u16), value <= 0xffff),
            REG_QUEUE_READY => self.write_queue(|q| q.set_ready(value == 1), true),
            REG_QUEUE_DESC_LOW => self.write_queue(|q| q.set_desc_table_address(Some(value), None), true),
            REG_QUEUE_DESC_HIGH => self.write_queue(|q| q.set_desc_table_address(None, Some(value)), true),
            REG_QUEUE_DRIVER_LOW => self.write_queue(|q| q.set_avail_ring_address(Some(value), None), true),
            REG_QUEUE_DRIVER_HIGH => self.write_queue(|q| q.set_avail_ring_address(None, Some(value)), true),
            REG_QUEUE_DEVICE_LOW => self.write_queue(|q| q.set_used_ring_address(Some(value), None), true),
            REG_QUEUE_DEVICE_HIGH => self.write_queue(|q| q.set_used_ring_address(None, Some(value)), true),
            REG_QUEUE_NOTIFY => self.notify(value),
            REG_INTERRUPT_ACK => {
                self.interrupt_status.fetch_and(!value, Ordering::SeqCst);
            }
            REG_STATUS => self.write_status(value),
            REG_SHM_SEL => {}
            _ => tracing::debug!(offset, value, "guest write to a read-only or unknown virtio-mmio register"),
        }
    }

    fn write_queue(&mut self, f: impl FnOnce(&mut Queue), valid: bool) {
        if !valid {
            tracing::warn!("guest wrote an out-of-range queue value");
            return;
        }
        if !self.queue_config_writable() {
            tracing::warn!(status = self.status, "guest configured a queue outside FEATURES_OK..DRIVER_OK");
            return;
        }
        if let Some(q) = self.selected_queue() {
            f(q);
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        if self.status & VIRTIO_CONFIG_S_DRIVER == 0 || self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            tracing::warn!(status = self.status, "guest acked features outside the DRIVER state");
            return;
        }
        let shifted = match self.driver_features_sel {
            0 => u64::from(value),
            1 => u64::from(value) << 32,
            sel => {
                tracing::debug!(sel, "guest acked features in a nonexistent feature word");
                return;
            }
        };
        let offered = self.device.avail_features();
        if shifted & !offered != 0 {
            tracing::warn!(unoffered = shifted & !offered, "guest acked features the device did not offer");
        }
        // Replace this 32-bit word of the acked set, keeping only what was offered.
        let word_mask: u64 = if self.driver_features_sel == 0 { 0xffff_ffff } else { 0xffff_ffff << 32 };
        self.acked_features = (self.acked_features & !word_mask) | (shifted & offered);
    }

    fn notify(&mut self, value: u32) {
        match self.queue_kicks.get(value as usize) {
            Some(kick) => {
                if let Err(e) = kick.write(1) {
                    tracing::warn!(queue = value, error = %e, "cannot forward a queue notification");
                }
            }
            None => tracing::debug!(queue = value, "guest notified a nonexistent queue"),
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // The driver only ever adds bits (virtio 1.2, 3.1.1); anything else is a driver bug.
        if value & self.status != self.status {
            tracing::warn!(old = self.status, new = value, "guest cleared device status bits without a reset");
            return;
        }
        let added = value & !self.status;
        if added & VIRTIO_CONFIG_S_FAILED != 0 {
            tracing::warn!("guest driver marked the virtio device FAILED");
            self.status |= VIRTIO_CONFIG_S_FAILED;
            return;
        }
        let mut next = self.status | (added & (VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER));
        if added & VIRTIO_CONFIG_S_DRIVER != 0 && next & VIRTIO_CONFIG_S_ACKNOWLEDGE == 0 {
            tracing::warn!("guest set DRIVER before ACKNOWLEDGE");
            return;
        }
        if added & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            if next & VIRTIO_CONFIG_S_DRIVER == 0 {
                tracing::warn!("guest set FEATURES_OK before DRIVER");
                return;
            }
            if self.acked_features & (1 << VIRTIO_F_VERSION_1) == 0 {
                // Leave FEATURES_OK clear: the driver reads it back and gives up (spec 3.1.1).
                tracing::warn!("guest did not accept VIRTIO_F_VERSION_1; refusing FEATURES_OK");
                self.status = next;
                return;
            }
            self.device.set_acked_features(self.acked_features);
            next |= VIRTIO_CONFIG_S_FEATURES_OK;
        }
        if added & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            if next & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
                tracing::warn!("guest set DRIVER_OK before FEATURES_OK");
                self.status = next;
                return;
            }
            self.status = next | VIRTIO_CONFIG_S_DRIVER_OK;
            self.activate();
            return;
        }
        self.status = next;
    }

    fn activate(&mut self) {
        if self.activated {
            return;
        }
        if let Err(reason) = self.try_activate() {
            tracing::error!(device_type = self.device.device_type(), %reason, "virtio device activation failed");
            self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
            // Tell the driver its config (status) changed, so it notices the failure.
            if let Err(e) = self.interrupt.trigger(super::INT_CONFIG) {
                tracing::warn!(error = %e, "cannot signal a config change");
            }
        }
    }

    fn try_activate(&mut self) -> Result<(), String> {
        if self.queue_kicks.len() != self.queues.len() {
            return Err(format!("{} kick eventfds for {} queues", self.queue_kicks.len(), self.queues.len()));
        }
        let event_idx = self.acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut activated = Vec::with_capacity(self.queues.len());
        for (index, (queue, kick)) in self.queues.iter_mut().zip(&self.queue_kicks).enumerate() {
            if !queue.is_valid(&self.mem) {
                return Err(format!("queue {index} is not ready or lies outside guest memory"));
            }
            queue.set_event_idx(event_idx);
            let kick = kick.try_clone().map_err(|e| format!("cannot clone the kick eventfd: {e}"))?;
            // The device gets its own copy of the queue state; ours keeps the configuration
            // for the register reads and is reset with the device.
            let queue = Queue::try_from(queue.state()).map_err(|e| format!("cannot copy queue {index}: {e}"))?;
            activated.push(ActivatedQueue { queue, kick });
        }
        let interrupt: Arc<dyn InterruptSignal> = self.interrupt.clone();
        self.device.activate(self.mem.clone(), interrupt, activated).map_err(|e| e.to_string())?;
        self.activated = true;
        Ok(())
    }

    fn reset(&mut self) {
        tracing::debug!(device_type = self.device.device_type(), "virtio device reset");
        if self.activated && !self.device.reset() {
            tracing::error!("virtio device cannot be reset; it stays failed");
            self.status = VIRTIO_CONFIG_S_FAILED | VIRTIO_CONFIG_S_NEEDS_RESET;
            return;
        }
        self.activated = false;
        for q in &mut self.queues {
            q.reset();
        }
        self.queue_sel = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.status = 0;
        self.interrupt_status.store(0, Ordering::SeqCst);
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            if offset >= MMIO_WINDOW_SIZE {
                data.fill(0);
                return;
            }
            self.device.read_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        if data.len() != 4 || offset & 3 != 0 {
            tracing::debug!(offset, len = data.len(), "guest read a virtio-mmio register with a bad size or alignment");
            data.fill(0);
            return;
        }
        let value = self.read_register(offset);
        data.copy_from_slice(&value.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            if offset < MMIO_WINDOW_SIZE {
                self.device.write_config(offset - CONFIG_SPACE_OFFSET, data);
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            tracing::debug!(offset, len = data.len(), "guest wrote a virtio-mmio register with a bad size");
            return;
        };
        if offset & 3 != 0 {
            tracing::debug!(offset, "guest wrote a misaligned virtio-mmio register");
            return;
        }
        self.write_register(offset, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
#[path = "mmio_tests.rs"]
mod tests;
