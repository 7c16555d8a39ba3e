//! The guest-physical memory map tern sets up on x86_64. Everything the VMM writes before
//! the first instruction lives below 1 MiB; the kernel goes at or above 1 MiB; devices live
//! in the 32-bit MMIO gap, which guest RAM skips.

/// Boot GDT (4 entries: null, code, data, TSS).
pub const GDT_ADDR: u64 = 0x500;
/// Boot IDT (a single empty entry: interrupts stay off until the kernel sets its own).
pub const IDT_ADDR: u64 = 0x520;
/// The Linux zero page (`struct boot_params`), passed in RSI.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer (the stack grows down, below the page tables).
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapping page tables: PML4, one PDPT, one page directory of 2 MiB pages.
pub const PML4_ADDR: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPT_ADDR: u64 = 0xa000;
/// Page directory covering the first 1 GiB with 2 MiB pages.
pub const PD_ADDR: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Room for the command line, including its terminating NUL (x86 `COMMAND_LINE_SIZE`).
pub const CMDLINE_CAPACITY: usize = 2048;
/// Start of the extended BIOS data area; the MP table lives here, as on a PC.
pub const EBDA_START: u64 = 0x9fc00;
/// End of conventional memory (the VGA hole starts here).
pub const EBDA_END: u64 = 0xa0000;
/// The BIOS ROM area, reported reserved so the kernel scans but does not allocate it.
pub const BIOS_ROM_START: u64 = 0xf0000;
/// Where the kernel proper goes (and where RAM above the legacy area starts).
pub const HIMEM_START: u64 = 0x10_0000;
/// The 32-bit MMIO gap: [MMIO_GAP_START, 4 GiB) holds devices, the IOAPIC and the LAPIC.
pub const MMIO_GAP_START: u64 = 0xd000_0000;
/// First address past 32 bits; RAM that does not fit below the gap continues here.
pub const FIRST_ADDR_PAST_32BITS: u64 = 1 << 32;
/// Default IOAPIC base.
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// Default local APIC base.
pub const APIC_ADDR: u64 = 0xfee0_0000;
/// KVM's three-page TSS region (Intel without unrestricted guest needs it), in the gap.
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
/// KVM's identity-map page, just below the TSS.
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;
/// First virtio-mmio window; each device gets `VIRTIO_MMIO_WINDOW` bytes.
pub const VIRTIO_MMIO_BASE: u64 = MMIO_GAP_START;
/// Size of one virtio-mmio register window.
pub const VIRTIO_MMIO_WINDOW: u64 = 0x1000;
/// First interrupt line handed to virtio devices (0–4 are the PIT, keyboard, cascade, COM2, COM1).
pub const VIRTIO_FIRST_IRQ: u32 = 5;
/// Last IOAPIC pin.
pub const MAX_IRQ: u32 = 23;
/// Guest memory smaller than this cannot hold a kernel, its decompression space and an initramfs.
pub const MIN_MEMORY_MIB: u32 = 64;
/// vCPUs the MP table (which must fit in the 1 KiB of the EBDA) can describe.
pub const MAX_VCPUS: u8 = 32;
/// Guest page size.
pub const PAGE_SIZE: u64 = 0x1000;
