//! The Intel MultiProcessor Specification 1.4 table: how a guest with ACPI off learns its
//! CPUs, the ISA bus, the IOAPIC and how ISA interrupts reach it. Linux scans the last KiB
//! of conventional memory for the `_MP_` floating pointer, so the whole table goes at
//! [`EBDA_START`](super::layout::EBDA_START). Written by hand: it is a few fixed records.

use vm_memory::{Bytes, GuestAddress};

use crate::layout::{APIC_ADDR, EBDA_END, EBDA_START, IOAPIC_ADDR, MAX_IRQ, MAX_VCPUS};
use crate::memory::GuestMemory;

const FLOATING_POINTER_LEN: usize = 16;
const CONFIG_HEADER_LEN: usize = 44;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;

const SPEC_REVISION: u8 = 4;
const LAPIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;
const IOAPIC_ENABLED: u8 = 1;
/// Family 6 signature, and the FPU + APIC feature bits.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = 0x201;

const INTERRUPT_INT: u8 = 0;
const INTERRUPT_NMI: u8 = 1;
const INTERRUPT_EXTINT: u8 = 3;
/// Polarity and trigger mode "conforms to the bus" (ISA: active high, edge).
const INTERRUPT_CONFORMING: u16 = 0;
const ISA_BUS_ID: u8 = 0;
const ALL_LAPICS: u8 = 0xff;

/// Errors building the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    /// The vCPU count is zero or more than the table can describe.
    #[error("{0} vCPUs requested; the MP table supports 1 to {MAX_VCPUS}")]
    VcpuCount(u8),
    /// Writing the table into guest memory failed.
    #[error("cannot write the MP table into guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    let sum = bytes.iter().fold(0u8, |sum, byte| sum.wrapping_add(*byte));
    0u8.wrapping_sub(sum)
}

/// The MP table bytes for `num_cpus` vCPUs (APIC ids 0..num_cpus, vCPU 0 the bootstrap
/// processor), to be placed at guest address `base`.
pub fn build_mptable(num_cpus: u8, base: u64) -> Result<Vec<u8>, MpTableError> {
    if num_cpus == 0 || num_cpus > MAX_VCPUS {
        return Err(MpTableError::VcpuCount(num_cpus));
    }
    let ioapic_id = num_cpus;
    let mut entries = Vec::new();
    let mut entry_count: u16 = 0;

    for apic_id in 0..num_cpus {
        let flags = if apic_id == 0 { CPU_ENABLED | CPU_BOOTSTRAP } else { CPU_ENABLED };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, apic_id, LAPIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        entry_count += 1;
    }

    entries.extend_from_slice(&[ENTRY_BUS, ISA_BUS_ID]);
    entries.extend_from_slice(b"ISA   ");
    entry_count += 1;

    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, IOAPIC_ENABLED]);
    entries.extend_from_slice(&(IOAPIC_ADDR as u32).to_le_bytes());
    entry_count += 1;

    // ISA IRQ n is IOAPIC pin n, as KVM's default GSI routing wires them.
    for irq in 0..=MAX_IRQ as u8 {
        entries.extend_from_slice(&[ENTRY_IO_INTERRUPT, INTERRUPT_INT]);
        entries.extend_from_slice(&INTERRUPT_CONFORMING.to_le_bytes());
        entries.extend_from_slice(&[ISA_BUS_ID, irq, ioapic_id, irq]);
        entry_count += 1;
    }

    // LINT0 takes the 8259 (ExtINT) on the bootstrap CPU, LINT1 is NMI everywhere.
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INTERRUPT_EXTINT]);
    entries.extend_from_slice(&INTERRUPT_CONFORMING.to_le_bytes());
    entries.extend_from_slice(&[ISA_BUS_ID, 0, 0, 0]);
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INTERRUPT_NMI]);
    entries.extend_from_slice(&INTERRUPT_CONFORMING.to_le_bytes());
    entries.extend_from_slice(&[ISA_BUS_ID, 0, ALL_LAPICS, 1]);
    entry_count += 2;

    let config_len = CONFIG_HEADER_LEN + entries.len();
    let mut config = Vec::with_capacity(config_len);
    config.extend_from_slice(b"PCMP");
    config.extend_from_slice(&(config_len as u16).to_le_bytes());
    config.extend_from_slice(&[SPEC_REVISION, 0]); // checksum patched below
    config.extend_from_slice(b"TERN    ");
    config.extend_from_slice(b"MICROVM     ");
    config.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    config.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    config.extend_from_slice(&entry_count.to_le_bytes());
    config.extend_from_slice(&(APIC_ADDR as u32).to_le_bytes());
    config.extend_from_slice(&[0; 4]); // extended table length, checksum, reserved
    config.extend_from_slice(&entries);
    config[7] = checksum(&config);

    let config_addr = base + FLOATING_POINTER_LEN as u64;
    let mut table = Vec::with_capacity(FLOATING_POINTER_LEN + config_len);
    table.extend_from_slice(b"_MP_");
    table.extend_from_slice(&(config_addr as u32).to_le_bytes());
    table.extend_from_slice(&[1, SPEC_REVISION, 0, 0, 0, 0, 0, 0]);
    table[10] = checksum(&table);
    table.extend_from_slice(&config);
    Ok(table)
}

/// Write the MP table for `num_cpus` vCPUs at the start of the EBDA.
pub fn write_mptable(mem: &GuestMemory, num_cpus: u8) -> Result<(), MpTableError> {
    let table = build_mptable(num_cpus, EBDA_START)?;
    // MAX_VCPUS is chosen so this holds; keep it checked where the two meet.
    debug_assert!(EBDA_START + table.len() as u64 <= EBDA_END);
    mem.write_slice(&table, GuestAddress(EBDA_START)).map_err(MpTableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROCESSOR_ENTRY_LEN: usize = 20;
    const SMALL_ENTRY_LEN: usize = 8;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |sum, byte| sum.wrapping_add(*byte))
    }

    fn entry_count(table: &[u8]) -> u16 {
        let config = &table[FLOATING_POINTER_LEN..];
        u16::from_le_bytes([config[34], config[35]])
    }

    #[test]
    fn checksums_balance() {
        for cpus in [1, 2, 7, MAX_VCPUS] {
            let table = build_mptable(cpus, EBDA_START).unwrap();
            assert_eq!(sum(&table[..FLOATING_POINTER_LEN]), 0, "floating pointer, {cpus} cpus");
            assert_eq!(sum(&table[FLOATING_POINTER_LEN..]), 0, "config table, {cpus} cpus");
        }
    }

    #[test]
    fn layout_points_at_the_config_table() {
        let table = build_mptable(2, EBDA_START).unwrap();
        assert_eq!(&table[..4], b"_MP_");
        let physptr = u32::from_le_bytes(table[4..8].try_into().unwrap());
        assert_eq!(u64::from(physptr), EBDA_START + 16);
        assert_eq!(&table[16..20], b"PCMP");
        let config_len = u16::from_le_bytes([table[20], table[21]]) as usize;
        assert_eq!(config_len, table.len() - FLOATING_POINTER_LEN);
        // 2 processors + bus + IOAPIC + 24 IO interrupts + 2 local interrupts.
        assert_eq!(entry_count(&table), 2 + 1 + 1 + 24 + 2);
    }

    #[test]
    fn processors_and_ioapic_ids() {
        let table = build_mptable(3, EBDA_START).unwrap();
        let entries = &table[FLOATING_POINTER_LEN + CONFIG_HEADER_LEN..];
        for cpu in 0..3usize {
            let entry = &entries[cpu * PROCESSOR_ENTRY_LEN..];
            assert_eq!(entry[0], ENTRY_PROCESSOR);
            assert_eq!(entry[1], cpu as u8);
            assert_eq!(entry[3] & CPU_BOOTSTRAP != 0, cpu == 0);
        }
        let ioapic = &entries[3 * PROCESSOR_ENTRY_LEN + SMALL_ENTRY_LEN..];
        assert_eq!(ioapic[0], ENTRY_IOAPIC);
        assert_eq!(ioapic[1], 3);
        assert_eq!(u32::from_le_bytes(ioapic[4..8].try_into().unwrap()), 0xfec0_0000);
    }

    #[test]
    fn largest_table_fits_in_the_ebda() {
        let table = build_mptable(MAX_VCPUS, EBDA_START).unwrap();
        assert!(EBDA_START + table.len() as u64 <= EBDA_END);
    }

    #[test]
    fn rejects_bad_vcpu_counts() {
        assert!(matches!(build_mptable(0, EBDA_START), Err(MpTableError::VcpuCount(0))));
        assert!(matches!(build_mptable(MAX_VCPUS + 1, EBDA_START), Err(MpTableError::VcpuCount(_))));
    }

    #[test]
    fn writes_into_guest_memory() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_mptable(&mem, 2).unwrap();
        let mut signature = [0u8; 4];
        mem.read_slice(&mut signature, GuestAddress(EBDA_START)).unwrap();
        assert_eq!(&signature, b"_MP_");
    }
}
