//! Guest RAM: anonymous mmaps (vm-memory `GuestMemoryMmap`) laid out around the 32-bit MMIO
//! gap. RAM fills `[0, min(size, MMIO_GAP_START))` and whatever is left continues at 4 GiB.
//! Registering the regions with KVM is `vstate::vm::Vm::register_memory`'s job. This module
//! and [`crate::layout`] are the bottom of the crate: every other layer uses [`GuestMemory`].

use vm_memory::{GuestAddress, GuestMemory as _, GuestMemoryMmap, GuestMemoryRegion as _};

use crate::layout::{FIRST_ADDR_PAST_32BITS, MIN_MEMORY_MIB, MMIO_GAP_START};

/// Guest RAM, as the VM, the boot loader and the devices see it.
pub type GuestMemory = GuestMemoryMmap<()>;

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The requested size cannot hold a guest.
    #[error("guest memory of {requested_mib} MiB is too small: at least {MIN_MEMORY_MIB} MiB is needed")]
    TooSmall { requested_mib: u32 },
    /// The host refused the mapping.
    #[error("cannot map {mib} MiB of guest memory")]
    Mmap {
        mib: u32,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
}

/// The guest-physical ranges (start, length in bytes) that hold `memory_mib` of RAM.
pub fn ram_ranges(memory_mib: u32) -> Vec<(GuestAddress, usize)> {
    let total = u64::from(memory_mib) << 20;
    let below_gap = total.min(MMIO_GAP_START);
    let mut ranges = vec![(GuestAddress(0), below_gap as usize)];
    if total > below_gap {
        ranges.push((GuestAddress(FIRST_ADDR_PAST_32BITS), (total - below_gap) as usize));
    }
    ranges
}

/// Map `memory_mib` MiB of guest RAM.
pub fn create_guest_memory(memory_mib: u32) -> Result<GuestMemory, MemoryError> {
    if memory_mib < MIN_MEMORY_MIB {
        return Err(MemoryError::TooSmall { requested_mib: memory_mib });
    }
    GuestMemory::from_ranges(&ram_ranges(memory_mib)).map_err(|source| MemoryError::Mmap { mib: memory_mib, source })
}

/// End (exclusive) of the RAM below the MMIO gap: the ceiling for the initramfs.
pub fn ram_end_below_gap(mem: &GuestMemory) -> u64 {
    mem.iter()
        .filter(|region| region.start_addr().0 < MMIO_GAP_START)
        .map(|region| region.start_addr().0 + region.len())
        .max()
        .unwrap_or(0)
}

/// RAM regions as (guest start, length), in address order.
pub fn ram_regions(mem: &GuestMemory) -> Vec<(u64, u64)> {
    mem.iter().map(|region| (region.start_addr().0, region.len())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_memory_stays_below_the_gap() {
        assert_eq!(ram_ranges(128), vec![(GuestAddress(0), 128 << 20)]);
    }

    #[test]
    fn large_memory_skips_the_mmio_gap() {
        let ranges = ram_ranges(4096);
        assert_eq!(ranges.len(), 2);
        assert_eq!(ranges[0], (GuestAddress(0), MMIO_GAP_START as usize));
        assert_eq!(ranges[1].0, GuestAddress(FIRST_ADDR_PAST_32BITS));
        assert_eq!(ranges[0].1 + ranges[1].1, 4096 << 20);
    }

    #[test]
    fn memory_exactly_filling_the_low_range_has_no_high_part() {
        let mib = (MMIO_GAP_START >> 20) as u32;
        assert_eq!(ram_ranges(mib), vec![(GuestAddress(0), MMIO_GAP_START as usize)]);
    }

    #[test]
    fn rejects_too_small_memory() {
        assert!(matches!(create_guest_memory(16), Err(MemoryError::TooSmall { requested_mib: 16 })));
    }

    #[test]
    fn reports_the_low_ram_end() {
        let mem = create_guest_memory(64).unwrap();
        assert_eq!(ram_end_below_gap(&mem), 64 << 20);
        assert_eq!(ram_regions(&mem), vec![(0, 64 << 20)]);
    }
}
