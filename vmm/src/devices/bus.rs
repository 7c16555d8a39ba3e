//! The MMIO bus: maps guest-physical address ranges to devices. The vCPU loop sends every
//! `KVM_EXIT_MMIO` here; a device sees offsets relative to its own base.

use std::sync::{Arc, Mutex};

/// A device that answers MMIO accesses (offsets are relative to the device's base address).
pub trait BusDevice: Send {
    /// Guest read of `data.len()` bytes at `offset`; fill `data`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest write of `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A device shared between the bus (vCPU threads) and whoever else drives it.
pub type SharedBusDevice = Arc<Mutex<dyn BusDevice>>;
