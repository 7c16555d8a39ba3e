//! The register state the bootstrap vCPU starts with: already in 64-bit long mode (as the
//! Linux 64-bit boot protocol requires), on a flat boot GDT, with the first 1 GiB
//! identity-mapped by 2 MiB pages, RSI pointing at the zero page. The tables are written
//! into guest memory below 1 MiB; the values are built here and set by `vstate::vcpu`.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress};

use crate::layout::{BOOT_STACK_POINTER, GDT_ADDR, IDT_ADDR, PDPT_ADDR, PD_ADDR, PML4_ADDR, ZERO_PAGE_ADDR};
use crate::memory::GuestMemory;

const CR0_PE: u64 = 1 << 0;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Page-table entry bits: present, writable, (in a page directory) 2 MiB page.
const PTE_PRESENT_WRITABLE: u64 = 0x3;
const PDE_HUGE_PAGE: u64 = 0x80;

/// RFLAGS with only the always-one bit set: interrupts off.
const RFLAGS_RESERVED_BIT: u64 = 0x2;
/// x87 control word after FINIT.
const FPU_CONTROL_WORD: u16 = 0x37f;
/// MXCSR after reset: all SIMD exceptions masked.
const MXCSR_DEFAULT: u32 = 0x1f80;

/// The boot GDT: null, 64-bit code, data, TSS (all flat). Selectors are `index * 8`.
pub const BOOT_GDT: [u64; 4] =
    [gdt_entry(0, 0, 0), gdt_entry(0xa09b, 0, 0xfffff), gdt_entry(0xc093, 0, 0xfffff), gdt_entry(0x808b, 0, 0xfffff)];
const CODE_INDEX: u16 = 1;
const DATA_INDEX: u16 = 2;
const TSS_INDEX: u16 = 3;

/// Errors writing the boot tables.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// Guest memory below 1 MiB is missing.
    #[error("cannot write the boot {0} into guest memory")]
    Write(&'static str, #[source] vm_memory::GuestMemoryError),
}

/// A GDT descriptor from `flags` (access byte in bits 0–7, flags nibble in bits 12–15),
/// `base` and a 20-bit `limit`.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let flags = flags as u64;
    let base = base as u64;
    let limit = limit as u64;
    ((base & 0xff00_0000) << (56 - 24))
        | ((flags & 0x0000_f0ff) << 40)
        | ((limit & 0x000f_0000) << (48 - 16))
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// The KVM segment register that loading selector `index * 8` of a GDT holding `entry` gives.
pub fn segment_from_gdt(entry: u64, index: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let granularity = ((entry >> 55) & 1) as u8;
    // With 4 KiB granularity the limit counts pages; KVM wants it in bytes.
    let limit = if granularity == 1 { (raw_limit << 12) | 0xfff } else { raw_limit };
    kvm_segment {
        base,
        limit,
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: granularity,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from((entry >> 47) & 1 == 0),
        padding: 0,
    }
}

/// Write the boot GDT and an empty IDT.
pub fn write_gdt_and_idt(mem: &GuestMemory) -> Result<(), RegsError> {
    for (index, entry) in BOOT_GDT.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(GDT_ADDR + 8 * index as u64)).map_err(|err| RegsError::Write("GDT", err))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_ADDR)).map_err(|err| RegsError::Write("IDT", err))
}

/// Write page tables identity-mapping [0, 1 GiB) with 2 MiB pages.
pub fn write_identity_page_tables(mem: &GuestMemory) -> Result<(), RegsError> {
    let write = |value: u64, addr: u64| {
        mem.write_obj(value, GuestAddress(addr)).map_err(|err| RegsError::Write("page tables", err))
    };
    write(PDPT_ADDR | PTE_PRESENT_WRITABLE, PML4_ADDR)?;
    write(PD_ADDR | PTE_PRESENT_WRITABLE, PDPT_ADDR)?;
    for index in 0..512u64 {
        write((index << 21) | PDE_HUGE_PAGE | PTE_PRESENT_WRITABLE, PD_ADDR + index * 8)?;
    }
    Ok(())
}

/// Long-mode special registers, starting from what KVM reports (`current`).
pub fn long_mode_sregs(current: &kvm_sregs) -> kvm_sregs {
    let mut sregs = *current;
    let code = segment_from_gdt(BOOT_GDT[CODE_INDEX as usize], CODE_INDEX);
    let data = segment_from_gdt(BOOT_GDT[DATA_INDEX as usize], DATA_INDEX);
    let tss = segment_from_gdt(BOOT_GDT[TSS_INDEX as usize], TSS_INDEX);

    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (std::mem::size_of_val(&BOOT_GDT) - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = (std::mem::size_of::<u64>() - 1) as u16;

    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;

    sregs.cr3 = PML4_ADDR;
    sregs.cr4 |= CR4_PAE;
    sregs.cr0 |= CR0_PE | CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    sregs
}

/// General registers for entering the kernel at `entry`.
pub fn boot_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_ADDR,
        rflags: RFLAGS_RESERVED_BIT,
        ..Default::default()
    }
}

/// The FPU as after FINIT, SSE exceptions masked.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu { fcw: FPU_CONTROL_WORD, mxcsr: MXCSR_DEFAULT, ..Default::default() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode_to_flat_segments() {
        let code = segment_from_gdt(BOOT_GDT[1], 1);
        assert_eq!(code.selector, 0x8);
        assert_eq!((code.base, code.limit), (0, 0xffff_ffff));
        assert_eq!((code.l, code.db, code.g, code.present, code.s, code.type_), (1, 0, 1, 1, 1, 0xb));
        let data = segment_from_gdt(BOOT_GDT[2], 2);
        assert_eq!(data.selector, 0x10);
        assert_eq!((data.l, data.db, data.type_, data.unusable), (0, 1, 0x3, 0));
        let tss = segment_from_gdt(BOOT_GDT[3], 3);
        assert_eq!((tss.selector, tss.s, tss.type_), (0x18, 0, 0xb));
        let null = segment_from_gdt(BOOT_GDT[0], 0);
        assert_eq!(null.unusable, 1);
    }

    #[test]
    fn gdt_entry_packs_base_and_limit() {
        let entry = gdt_entry(0x0093, 0x1234_5678, 0xabcde);
        let segment = segment_from_gdt(entry, 5);
        assert_eq!(segment.base, 0x1234_5678);
        assert_eq!(segment.limit, 0xabcde);
        assert_eq!(segment.g, 0);
    }

    #[test]
    fn long_mode_sregs_enable_paging() {
        let sregs = long_mode_sregs(&kvm_sregs::default());
        assert_eq!(sregs.cr0 & (CR0_PE | CR0_PG), CR0_PE | CR0_PG);
        assert_ne!(sregs.cr4 & CR4_PAE, 0);
        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(sregs.cr3, PML4_ADDR);
        assert_eq!(sregs.gdt.limit, 31);
        assert_eq!(sregs.cs.selector, 0x8);
        assert_eq!(sregs.ss.selector, 0x10);
    }

    #[test]
    fn page_tables_identity_map_the_first_gigabyte() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_identity_page_tables(&mem).unwrap();
        write_gdt_and_idt(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_ADDR)).unwrap();
        assert_eq!(pml4, PDPT_ADDR | 0x3);
        let pdpt: u64 = mem.read_obj(GuestAddress(PDPT_ADDR)).unwrap();
        assert_eq!(pdpt, PD_ADDR | 0x3);
        let last: u64 = mem.read_obj(GuestAddress(PD_ADDR + 511 * 8)).unwrap();
        assert_eq!(last, (511 << 21) | 0x83);
        let code: u64 = mem.read_obj(GuestAddress(GDT_ADDR + 8)).unwrap();
        assert_eq!(code, BOOT_GDT[1]);
    }

    #[test]
    fn boot_regs_point_at_the_zero_page() {
        let regs = boot_regs(0x100_0000);
        assert_eq!((regs.rip, regs.rsi, regs.rflags), (0x100_0000, ZERO_PAGE_ADDR, 2));
        let fpu = boot_fpu();
        assert_eq!((fpu.fcw, fpu.mxcsr), (0x37f, 0x1f80));
    }
}
