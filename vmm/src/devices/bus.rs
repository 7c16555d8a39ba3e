//! The MMIO and port-I/O buses: map guest address ranges to devices. The vCPU loop sends
//! every `KVM_EXIT_MMIO` to the [`MmioBus`] and every `KVM_EXIT_IO` to the [`PioBus`]; a
//! device sees offsets relative to its own base.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use tern_sync::LockExt;

use crate::vstate::vcpu::GuestIoBus;

/// A device that answers bus accesses (offsets are relative to the device's base address).
pub trait BusDevice: Send {
    /// Guest read of `data.len()` bytes at `offset`; fill `data`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest write of `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A device shared between the bus (vCPU threads) and whoever else drives it.
pub type SharedBusDevice = Arc<Mutex<dyn BusDevice>>;

/// Errors building a bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The new range overlaps a device already on the bus.
    #[error("bus range {base:#x}+{len:#x} overlaps another device")]
    Overlap { base: u64, len: u64 },
    /// The range is empty or wraps around the address space.
    #[error("bus range {base:#x}+{len:#x} is empty or wraps around")]
    InvalidRange { base: u64, len: u64 },
}

struct BusRange {
    len: u64,
    device: SharedBusDevice,
}

/// An address space of devices. Built once before the vCPUs start, then shared read-only.
#[derive(Default)]
pub struct Bus {
    ranges: BTreeMap<u64, BusRange>,
}

/// The guest-physical MMIO address space (virtio-mmio windows).
pub type MmioBus = Bus;
/// The x86 port-I/O address space (serial, i8042).
pub type PioBus = Bus;

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Put `device` at `[base, base + len)`.
    pub fn insert(&mut self, base: u64, len: u64, device: SharedBusDevice) -> Result<(), BusError> {
        let end = base.checked_add(len).filter(|_| len > 0).ok_or(BusError::InvalidRange { base, len })?;
        let overlaps_previous =
            self.ranges.range(..=base).next_back().is_some_and(|(prev_base, prev)| prev_base + prev.len > base);
        let overlaps_next = self.ranges.range(base..end).next().is_some();
        if overlaps_previous || overlaps_next {
            return Err(BusError::Overlap { base, len });
        }
        self.ranges.insert(base, BusRange { len, device });
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &SharedBusDevice)> {
        let (base, range) = self.ranges.range(..=addr).next_back()?;
        (addr - base < range.len).then_some((addr - base, &range.device))
    }

    /// Dispatch a read; returns false (and leaves `data` alone) when no device claims `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((offset, device)) => {
                // A device that panicked while holding its lock is still the best answer we
                // have; the guest sees whatever state it left.
                let mut device = device.lock_unpoisoned();
                device.read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatch a write; returns false when no device claims `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((offset, device)) => {
                let mut device = device.lock_unpoisoned();
                device.write(offset, data);
                true
            }
            None => false,
        }
    }
}

impl GuestIoBus for Bus {
    fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        Bus::read(self, addr, data)
    }

    fn write(&self, addr: u64, data: &[u8]) -> bool {
        Bus::write(self, addr, data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        last_write: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_with_relative_offsets() {
        let mut bus = Bus::new();
        let recorder = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(0x3f8, 8, recorder.clone()).unwrap();
        let mut data = [0u8; 1];
        assert!(bus.read(0x3fa, &mut data));
        assert_eq!(data, [2]);
        assert!(bus.write(0x3ff, &[7]));
        assert_eq!(recorder.lock().unwrap().last_write, Some((7, vec![7])));
        assert!(!bus.read(0x400, &mut data));
        assert!(!bus.write(0x3f7, &[1]));
    }

    #[test]
    fn rejects_overlaps_and_empty_ranges() {
        let mut bus = Bus::new();
        let device = || Arc::new(Mutex::new(Recorder::default()));
        bus.insert(0x1000, 0x1000, device()).unwrap();
        assert!(matches!(bus.insert(0x1800, 0x10, device()), Err(BusError::Overlap { .. })));
        assert!(matches!(bus.insert(0x800, 0x801, device()), Err(BusError::Overlap { .. })));
        assert!(matches!(bus.insert(0x3000, 0, device()), Err(BusError::InvalidRange { .. })));
        assert!(matches!(bus.insert(u64::MAX, 2, device()), Err(BusError::InvalidRange { .. })));
        bus.insert(0x2000, 0x1000, device()).unwrap();
        bus.insert(0x800, 0x800, device()).unwrap();
    }
}
