//! In-memory tests of the virtio-mmio register file (no KVM).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_VERSION_1,
};
use virtio_queue::QueueT;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::devices::virtio::{ActivateError, INT_CONFIG, INT_VRING};

#[derive(Default)]
struct Record {
    activations: AtomicUsize,
    resets: AtomicUsize,
    acked: AtomicU64,
    queue_sizes: Mutex<Vec<u16>>,
    interrupt: Mutex<Option<Arc<dyn InterruptSignal>>>,
}

struct DummyDevice {
    record: Arc<Record>,
    fail_activation: bool,
}

const DUMMY_TYPE: u32 = 42;
const DUMMY_FEATURES: u64 = (1 << VIRTIO_F_VERSION_1) | 0x5;

impl VirtioDevice for DummyDevice {
    fn device_type(&self) -> u32 {
        DUMMY_TYPE
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16, 32]
    }
    fn avail_features(&self) -> u64 {
        DUMMY_FEATURES
    }
    fn set_acked_features(&mut self, features: u64) {
        self.record.acked.store(features, Ordering::SeqCst);
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = [0xa0u8, 0xa1, 0xa2, 0xa3];
        for (i, b) in data.iter_mut().enumerate() {
            *b = config.get(offset as usize + i).copied().unwrap_or(0);
        }
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn activate(
        &mut self,
        _mem: GuestMemory,
        interrupt: Arc<dyn InterruptSignal>,
        queues: Vec<ActivatedQueue>,
    ) -> Result<(), ActivateError> {
        if self.fail_activation {
            return Err(ActivateError::Other("refused".into()));
        }
        self.record.activations.fetch_add(1, Ordering::SeqCst);
        *self.record.queue_sizes.lock().unwrap() = queues.iter().map(|q| q.queue.size()).collect();
        *self.record.interrupt.lock().unwrap() = Some(interrupt);
        Ok(())
    }
    fn reset(&mut self) -> bool {
        self.record.resets.fetch_add(1, Ordering::SeqCst);
        true
    }
}

struct Setup {
    transport: MmioTransport,
    record: Arc<Record>,
    irq: EventFd,
    kicks: Vec<EventFd>,
}

fn setup(fail_activation: bool) -> Setup {
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let record = Arc::new(Record::default());
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let kicks: Vec<EventFd> = (0..2).map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap()).collect();
    let transport = MmioTransport::new(
        Box::new(DummyDevice { record: record.clone(), fail_activation }),
        mem,
        irq.try_clone().unwrap(),
        kicks.iter().map(|k| k.try_clone().unwrap()).collect(),
    );
    Setup { transport, record, irq, kicks }
}

fn r(t: &mut MmioTransport, offset: u64) -> u32 {
    let mut data = [0u8; 4];
    t.read(offset, &mut data);
    u32::from_le_bytes(data)
}

fn w(t: &mut MmioTransport, offset: u64, value: u32) {
    t.write(offset, &value.to_le_bytes());
}

fn negotiate(t: &mut MmioTransport, features: u64) {
    w(t, REG_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
    w(t, REG_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER);
    w(t, REG_DRIVER_FEATURES_SEL, 0);
    w(t, REG_DRIVER_FEATURES, features as u32);
    w(t, REG_DRIVER_FEATURES_SEL, 1);
    w(t, REG_DRIVER_FEATURES, (features >> 32) as u32);
    w(t, REG_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK);
}

fn setup_queue(t: &mut MmioTransport, index: u32, size: u32, base: u64) {
    w(t, REG_QUEUE_SEL, index);
    w(t, REG_QUEUE_NUM, size);
    w(t, REG_QUEUE_DESC_LOW, base as u32);
    w(t, REG_QUEUE_DESC_HIGH, (base >> 32) as u32);
    w(t, REG_QUEUE_DRIVER_LOW, (base + 0x1000) as u32);
    w(t, REG_QUEUE_DRIVER_HIGH, 0);
    w(t, REG_QUEUE_DEVICE_LOW, (base + 0x2000) as u32);
    w(t, REG_QUEUE_DEVICE_HIGH, 0);
    w(t, REG_QUEUE_READY, 1);
}

const UP: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK;

#[test]
fn identification_registers() {
    let mut s = setup(false);
    let t = &mut s.transport;
    assert_eq!(r(t, REG_MAGIC), 0x7472_6976);
    assert_eq!(r(t, REG_VERSION), 2);
    assert_eq!(r(t, REG_DEVICE_ID), DUMMY_TYPE);
    assert_eq!(r(t, REG_VENDOR_ID), 0);
    w(t, REG_DEVICE_FEATURES_SEL, 0);
    assert_eq!(r(t, REG_DEVICE_FEATURES), DUMMY_FEATURES as u32);
    w(t, REG_DEVICE_FEATURES_SEL, 1);
    assert_eq!(r(t, REG_DEVICE_FEATURES), (DUMMY_FEATURES >> 32) as u32);
    w(t, REG_DEVICE_FEATURES_SEL, 7);
    assert_eq!(r(t, REG_DEVICE_FEATURES), 0);
    w(t, REG_QUEUE_SEL, 1);
    assert_eq!(r(t, REG_QUEUE_NUM_MAX), 32);
    w(t, REG_QUEUE_SEL, 9);
    assert_eq!(r(t, REG_QUEUE_NUM_MAX), 0);
    assert_eq!(r(t, REG_SHM_LEN_LOW), u32::MAX);
    assert_eq!(r(t, REG_CONFIG_GENERATION), 0);
    let mut cfg = [0u8; 2];
    t.read(0x101, &mut cfg);
    assert_eq!(cfg, [0xa1, 0xa2]);
}

#[test]
fn driver_ok_activates_with_configured_queues() {
    let mut s = setup(false);
    let t = &mut s.transport;
    // Bit 40 was never offered and must not be acked.
    negotiate(t, DUMMY_FEATURES | (1 << 40));
    assert_eq!(r(t, REG_STATUS), UP);
    assert_eq!(s.record.acked.load(Ordering::SeqCst), DUMMY_FEATURES);
    setup_queue(t, 0, 8, 0x1_0000);
    setup_queue(t, 1, 32, 0x2_0000);
    w(t, REG_QUEUE_SEL, 0);
    assert_eq!(r(t, REG_QUEUE_READY), 1);
    w(t, REG_STATUS, UP | VIRTIO_CONFIG_S_DRIVER_OK);
    assert_eq!(r(t, REG_STATUS), UP | VIRTIO_CONFIG_S_DRIVER_OK);
    assert_eq!(s.record.activations.load(Ordering::SeqCst), 1);
    assert_eq!(*s.record.queue_sizes.lock().unwrap(), vec![8, 32]);

    // Queue config is frozen after DRIVER_OK.
    w(t, REG_QUEUE_SEL, 0);
    w(t, REG_QUEUE_READY, 0);
    assert_eq!(r(t, REG_QUEUE_READY), 1);

    // The device's interrupt sets InterruptStatus and fires the irqfd; ACK clears.
    let interrupt = s.record.interrupt.lock().unwrap().clone().unwrap();
    interrupt.trigger(INT_VRING).unwrap();
    assert_eq!(r(t, REG_INTERRUPT_STATUS), INT_VRING);
    assert_eq!(s.irq.read().unwrap(), 1);
    w(t, REG_INTERRUPT_ACK, INT_VRING);
    assert_eq!(r(t, REG_INTERRUPT_STATUS), 0);

    // A QueueNotify write reaches the queue's kick eventfd; a bad index is ignored.
    w(t, REG_QUEUE_NOTIFY, 1);
    w(t, REG_QUEUE_NOTIFY, 77);
    assert_eq!(s.kicks[1].read().unwrap(), 1);
    assert!(s.kicks[0].read().is_err());

    // Writing 0 resets the device and the registers.
    w(t, REG_STATUS, 0);
    assert_eq!(s.record.resets.load(Ordering::SeqCst), 1);
    assert_eq!(r(t, REG_STATUS), 0);
    w(t, REG_QUEUE_SEL, 0);
    assert_eq!(r(t, REG_QUEUE_READY), 0);

    // And it can come up again.
    negotiate(t, DUMMY_FEATURES);
    setup_queue(t, 0, 16, 0x1_0000);
    setup_queue(t, 1, 16, 0x2_0000);
    w(t, REG_STATUS, UP | VIRTIO_CONFIG_S_DRIVER_OK);
    assert_eq!(s.record.activations.load(Ordering::SeqCst), 2);
}

#[test]
fn queue_outside_memory_needs_reset() {
    let mut s = setup(false);
    let t = &mut s.transport;
    negotiate(t, DUMMY_FEATURES);
    setup_queue(t, 0, 16, 0x1_0000);
    // The used ring of queue 1 lies past the end of guest memory.
    setup_queue(t, 1, 16, 0xff_f000);
    w(t, REG_STATUS, UP | VIRTIO_CONFIG_S_DRIVER_OK);
    assert_eq!(s.record.activations.load(Ordering::SeqCst), 0);
    assert_ne!(r(t, REG_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    assert_ne!(r(t, REG_INTERRUPT_STATUS) & INT_CONFIG, 0);
}

#[test]
fn queue_not_ready_needs_reset() {
    let mut s = setup(false);
    let t = &mut s.transport;
    negotiate(t, DUMMY_FEATURES);
    setup_queue(t, 0, 16, 0x1_0000);
    w(t, REG_STATUS, UP | VIRTIO_CONFIG_S_DRIVER_OK);
    assert_eq!(s.record.activations.load(Ordering::SeqCst), 0);
    assert_ne!(r(t, REG_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
}

#[test]
fn activation_failure_needs_reset() {
    let mut s = setup(true);
    let t = &mut s.transport;
    negotiate(t, DUMMY_FEATURES);
    setup_queue(t, 0, 16, 0x1_0000);
    setup_queue(t, 1, 16, 0x2_0000);
    w(t, REG_STATUS, UP | VIRTIO_CONFIG_S_DRIVER_OK);
    assert_ne!(r(t, REG_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    // A reset clears the failure.
    w(t, REG_STATUS, 0);
    assert_eq!(r(t, REG_STATUS), 0);
}

#[test]
fn features_without_version_1_are_refused() {
    let mut s = setup(false);
    let t = &mut s.transport;
    negotiate(t, 0x5);
    assert_eq!(r(t, REG_STATUS) & VIRTIO_CONFIG_S_FEATURES_OK, 0);
    w(t, REG_STATUS, UP | VIRTIO_CONFIG_S_DRIVER_OK);
    assert_eq!(r(t, REG_STATUS) & VIRTIO_CONFIG_S_DRIVER_OK, 0);
    assert_eq!(s.record.activations.load(Ordering::SeqCst), 0);
}

#[test]
fn out_of_order_status_and_bad_accesses_are_ignored() {
    let mut s = setup(false);
    let t = &mut s.transport;
    // DRIVER_OK straight away: nothing happens.
    w(t, REG_STATUS, VIRTIO_CONFIG_S_DRIVER_OK);
    assert_eq!(s.record.activations.load(Ordering::SeqCst), 0);
    // Queue writes before FEATURES_OK are ignored.
    w(t, REG_QUEUE_SEL, 0);
    w(t, REG_QUEUE_READY, 1);
    assert_eq!(r(t, REG_QUEUE_READY), 0);
    // Odd sizes, misaligned and out-of-window accesses.
    let mut byte = [0xffu8; 1];
    t.read(REG_MAGIC, &mut byte);
    assert_eq!(byte, [0]);
    t.write(REG_STATUS, &[1]);
    t.write(REG_STATUS + 1, &1u32.to_le_bytes());
    t.write(0x2000, &1u32.to_le_bytes());
    let mut word = [0xffu8; 4];
    t.read(0x2000, &mut word);
    assert_eq!(word, [0; 4]);
    t.write(0x0f0, &1u32.to_le_bytes());
    assert_eq!(r(t, 0x0f0), 0);
    t.read(REG_STATUS + 2, &mut word);
    assert_eq!(r(t, REG_STATUS), 0);
    // Clearing bits without a reset is refused.
    w(t, REG_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER);
    w(t, REG_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
    assert_eq!(r(t, REG_STATUS), VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER);
    // An invalid queue size leaves the queue unusable, and activation then fails cleanly.
    negotiate_from_driver(t);
    setup_queue(t, 0, 3, 0x1_0000);
    setup_queue(t, 1, 16, 0x2_0000);
    w(t, REG_STATUS, UP | VIRTIO_CONFIG_S_DRIVER_OK);
    w(t, REG_QUEUE_SEL, 0);
    assert_eq!(s.record.activations.load(Ordering::SeqCst), 1, "size 3 ignored, default max size kept");
}

fn negotiate_from_driver(t: &mut MmioTransport) {
    w(t, REG_DRIVER_FEATURES_SEL, 0);
    w(t, REG_DRIVER_FEATURES, DUMMY_FEATURES as u32);
    w(t, REG_DRIVER_FEATURES_SEL, 1);
    w(t, REG_DRIVER_FEATURES, (DUMMY_FEATURES >> 32) as u32);
    w(t, REG_STATUS, UP);
    assert_eq!(r(t, REG_STATUS), UP);
}
