//! The virtio-mmio transport under arbitrary register sequences: reads and writes of any
//! offset and size, plus a well-behaved driver's negotiation as a building block, so the
//! fuzzer reaches activation and reset. The device behind it checks what the transport
//! promises it: only offered features acked, activation only with valid queues inside guest
//! memory, never twice without a reset in between.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::QueueT;
use vmm_sys_util::eventfd::EventFd;

use super::{zeroed_memory, Input};
use crate::devices::bus::BusDevice;
use crate::devices::virtio::mmio::{MmioTransport, MMIO_WINDOW_SIZE};
use crate::devices::virtio::{read_config_space, ActivateError, ActivatedQueue, InterruptSignal, VirtioDevice};
use crate::memory::GuestMemory;

const MEM_SIZE: usize = 0x1_0000;
const QUEUE_MAX: [u16; 2] = [16, 256];
const FEATURES: u64 = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX) | 0x5;
const CONFIG: [u8; 12] = *b"tern-fuzzcfg";

/// A device that asserts the transport's promises.
struct CheckingDevice {
    active: Arc<AtomicBool>,
    acked: u64,
}

impl VirtioDevice for CheckingDevice {
    fn device_type(&self) -> u32 {
        42
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_MAX
    }
    fn avail_features(&self) -> u64 {
        FEATURES
    }
    fn set_acked_features(&mut self, features: u64) {
        assert_eq!(features & !FEATURES, 0, "transport acked features the device never offered");
        assert!(!self.active.load(Ordering::SeqCst), "features changed on an active device");
        self.acked = features;
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_space(&CONFIG, offset, data, "fuzz");
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn activate(
        &mut self,
        mem: GuestMemory,
        _interrupt: Arc<dyn InterruptSignal>,
        queues: Vec<ActivatedQueue>,
    ) -> Result<(), ActivateError> {
        assert!(!self.active.swap(true, Ordering::SeqCst), "activated twice without a reset");
        assert_eq!(queues.len(), QUEUE_MAX.len(), "activated with the wrong queue count");
        for (q, max) in queues.iter().zip(QUEUE_MAX) {
            assert!(q.queue.is_valid(&mem), "activated with an invalid queue");
            assert!(q.queue.size() <= max && q.queue.size().is_power_of_two(), "queue size {}", q.queue.size());
            assert_eq!(q.queue.event_idx_enabled(), self.acked & (1 << VIRTIO_RING_F_EVENT_IDX) != 0);
        }
        Ok(())
    }
    fn reset(&mut self) -> bool {
        self.active.store(false, Ordering::SeqCst);
        self.acked = 0;
        true
    }
}

fn write32(t: &mut MmioTransport, offset: u64, value: u32) {
    t.write(offset, &value.to_le_bytes());
}

/// Play `data` as register accesses on a fresh transport.
pub fn run(data: &[u8]) {
    static MEM: OnceLock<&'static GuestMemory> = OnceLock::new();
    let mem = zeroed_memory(&MEM, MEM_SIZE);
    let active = Arc::new(AtomicBool::new(false));
    let device = CheckingDevice { active: active.clone(), acked: 0 };
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let kicks = (0..QUEUE_MAX.len()).map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap()).collect();
    let mut t = MmioTransport::new(Box::new(device), mem.clone(), irq, kicks);
    let mut input = Input::new(data);
    let mut ops = 0;
    while !input.is_empty() && ops < 4096 {
        ops += 1;
        match input.u8() % 6 {
            // An aligned 32-bit register write.
            0 => {
                let offset = u64::from(input.u8()) * 4;
                let value = input.u32();
                write32(&mut t, offset, value);
            }
            // An aligned 32-bit register read.
            1 => {
                let offset = u64::from(input.u8()) * 4;
                let mut out = [0u8; 4];
                t.read(offset, &mut out);
            }
            // Any offset in (and past) the window, any size up to 8.
            2 => {
                let offset = u64::from(input.u16()) % (2 * MMIO_WINDOW_SIZE);
                let len = usize::from(input.u8() % 9);
                let bytes = input.bytes(len).to_vec();
                if input.u8() & 1 == 0 {
                    t.write(offset, &bytes);
                } else {
                    let mut out = vec![0xa5u8; len];
                    t.read(offset, &mut out);
                    if offset >= MMIO_WINDOW_SIZE {
                        assert!(out.iter().all(|&b| b == 0), "read past the window gave data");
                    }
                }
            }
            // A driver's negotiation up to FEATURES_OK, with fuzzed feature words.
            3 => {
                let features = input.u64();
                write32(&mut t, 0x70, VIRTIO_CONFIG_S_ACKNOWLEDGE);
                write32(&mut t, 0x70, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER);
                write32(&mut t, 0x24, 0);
                write32(&mut t, 0x20, features as u32);
                write32(&mut t, 0x24, 1);
                write32(&mut t, 0x20, (features >> 32) as u32);
                write32(
                    &mut t,
                    0x70,
                    VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK,
                );
            }
            // One queue set up with fuzzed size and addresses (low words in guest memory or not).
            4 => {
                let (sel, size) = (u32::from(input.u8() % 3), u32::from(input.u16()));
                write32(&mut t, 0x30, sel);
                write32(&mut t, 0x38, size);
                for reg in [0x80, 0x90, 0xa0] {
                    write32(&mut t, reg, u32::from(input.u16()));
                    write32(&mut t, reg + 4, u32::from(input.u8() == 0xff));
                }
                write32(&mut t, 0x44, 1);
            }
            // DRIVER_OK on top of the current status, or a reset.
            _ => {
                let mut status = [0u8; 4];
                t.read(0x70, &mut status);
                let status = u32::from_le_bytes(status);
                let next = if input.u8() & 1 == 0 { status | VIRTIO_CONFIG_S_DRIVER_OK } else { 0 };
                write32(&mut t, 0x70, next);
                if next == 0 {
                    assert!(!active.load(Ordering::SeqCst), "device still active after a reset");
                }
            }
        }
        let mut status = [0u8; 4];
        t.read(0x70, &mut status);
        let status = u32::from_le_bytes(status);
        if active.load(Ordering::SeqCst) {
            assert_ne!(status & VIRTIO_CONFIG_S_DRIVER_OK, 0, "device active without DRIVER_OK");
        }
    }
}
