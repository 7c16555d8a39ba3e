//! The Linux "zero page" (`struct boot_params`, Documentation/arch/x86/boot.rst): the E820
//! memory map, the command line and initramfs locations, and, for a bzImage, the setup
//! header the image itself carries.

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header, KEEP_SEGMENTS};
use vm_memory::GuestAddress;

use crate::layout::{BIOS_ROM_START, CMDLINE_ADDR, EBDA_END, EBDA_START, HIMEM_START, MMIO_GAP_START, ZERO_PAGE_ADDR};
use crate::memory::GuestMemory;

/// `boot_flag` magic.
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// `header` magic ("HdrS").
const HDRS_MAGIC: u32 = 0x5372_6448;
/// `type_of_loader`: a boot loader without an assigned id.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// The kernel's default physical alignment (`CONFIG_PHYSICAL_ALIGN`).
const KERNEL_ALIGNMENT: u32 = 0x0100_0000;

/// E820 entry types.
pub const E820_RAM: u32 = 1;
/// Reserved (firmware) memory.
pub const E820_RESERVED: u32 = 2;

/// One E820 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// [`E820_RAM`] or [`E820_RESERVED`].
    pub kind: u32,
}

/// Errors writing the zero page.
#[derive(Debug, thiserror::Error)]
pub enum ZeroPageError {
    /// More E820 entries than the zero page holds.
    #[error("{0} memory map entries do not fit in the zero page")]
    TooManyE820Entries(usize),
    /// The guest memory below 1 MiB is missing.
    #[error("cannot write the zero page into guest memory")]
    Write(#[source] linux_loader::configurator::Error),
}

/// The memory map for RAM laid out as `regions` (start, length): conventional memory up to
/// the EBDA, the EBDA and BIOS ROM as reserved, then every byte of RAM from 1 MiB.
pub fn build_e820(regions: &[(u64, u64)]) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry { addr: 0, size: EBDA_START, kind: E820_RAM },
        E820Entry { addr: EBDA_START, size: EBDA_END - EBDA_START, kind: E820_RESERVED },
        E820Entry { addr: BIOS_ROM_START, size: HIMEM_START - BIOS_ROM_START, kind: E820_RESERVED },
    ];
    for &(start, len) in regions {
        let end = start + len;
        let start = start.max(HIMEM_START);
        if end > start {
            map.push(E820Entry { addr: start, size: end - start, kind: E820_RAM });
        }
    }
    map
}

/// Where the initramfs was put.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitrdPlacement {
    /// Guest-physical start (page aligned).
    pub addr: u64,
    /// Size in bytes.
    pub size: u32,
}

/// Everything the zero page records.
pub struct ZeroPageInput<'a> {
    /// The bzImage's setup header; `None` for an ELF vmlinux.
    pub setup_header: Option<setup_header>,
    /// Command line length without its NUL.
    pub cmdline_len: usize,
    /// The loaded initramfs, if any.
    pub initrd: Option<InitrdPlacement>,
    /// The memory map.
    pub e820: &'a [E820Entry],
}

/// The `boot_params` for `input`.
pub fn build_boot_params(input: &ZeroPageInput<'_>) -> Result<boot_params, ZeroPageError> {
    let mut params = boot_params::default();
    match input.setup_header {
        Some(header) => params.hdr = header,
        None => {
            params.hdr.boot_flag = BOOT_FLAG_MAGIC;
            params.hdr.header = HDRS_MAGIC;
            params.hdr.kernel_alignment = KERNEL_ALIGNMENT;
        }
    }
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.loadflags |= KEEP_SEGMENTS as u8;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = input.cmdline_len as u32;
    if let Some(initrd) = input.initrd {
        // The initramfs always sits below the MMIO gap, so 32 bits hold its address.
        debug_assert!(initrd.addr < MMIO_GAP_START);
        params.hdr.ramdisk_image = initrd.addr as u32;
        params.hdr.ramdisk_size = initrd.size;
    }
    if input.e820.len() > params.e820_table.len() {
        return Err(ZeroPageError::TooManyE820Entries(input.e820.len()));
    }
    for (slot, entry) in params.e820_table.iter_mut().zip(input.e820) {
        *slot = boot_e820_entry { addr: entry.addr, size: entry.size, type_: entry.kind };
    }
    params.e820_entries = input.e820.len() as u8;
    Ok(params)
}

/// Write `params` at [`ZERO_PAGE_ADDR`].
pub fn write_zero_page(mem: &GuestMemory, params: &boot_params) -> Result<(), ZeroPageError> {
    let boot_params = BootParams::new::<boot_params>(params, GuestAddress(ZERO_PAGE_ADDR));
    LinuxBootConfigurator::write_bootparams::<GuestMemory>(&boot_params, mem).map_err(ZeroPageError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::FIRST_ADDR_PAST_32BITS;
    use vm_memory::Bytes;

    #[test]
    fn e820_for_low_memory_only() {
        let map = build_e820(&[(0, 128 << 20)]);
        assert_eq!(
            map,
            vec![
                E820Entry { addr: 0, size: 0x9fc00, kind: E820_RAM },
                E820Entry { addr: 0x9fc00, size: 0x400, kind: E820_RESERVED },
                E820Entry { addr: 0xf0000, size: 0x10000, kind: E820_RESERVED },
                E820Entry { addr: 0x10_0000, size: (128 << 20) - 0x10_0000, kind: E820_RAM },
            ]
        );
    }

    #[test]
    fn e820_includes_ram_above_4g() {
        let map = build_e820(&[(0, MMIO_GAP_START), (FIRST_ADDR_PAST_32BITS, 1 << 30)]);
        assert_eq!(map.len(), 5);
        assert_eq!(map[3], E820Entry { addr: HIMEM_START, size: MMIO_GAP_START - HIMEM_START, kind: E820_RAM });
        assert_eq!(map[4], E820Entry { addr: FIRST_ADDR_PAST_32BITS, size: 1 << 30, kind: E820_RAM });
        // No entry overlaps the next one.
        for pair in map.windows(2) {
            assert!(pair[0].addr + pair[0].size <= pair[1].addr);
        }
    }

    #[test]
    fn elf_zero_page_gets_a_synthetic_header() {
        let e820 = build_e820(&[(0, 64 << 20)]);
        let initrd = InitrdPlacement { addr: 0x300_0000, size: 4096 };
        let params = build_boot_params(&ZeroPageInput {
            setup_header: None,
            cmdline_len: 42,
            initrd: Some(initrd),
            e820: &e820,
        })
        .unwrap();
        assert_eq!({ params.hdr.boot_flag }, BOOT_FLAG_MAGIC);
        assert_eq!({ params.hdr.header }, HDRS_MAGIC);
        assert_eq!(params.hdr.type_of_loader, 0xff);
        assert_ne!(params.hdr.loadflags & KEEP_SEGMENTS as u8, 0);
        assert_eq!({ params.hdr.cmd_line_ptr }, CMDLINE_ADDR as u32);
        assert_eq!({ params.hdr.cmdline_size }, 42);
        assert_eq!({ params.hdr.ramdisk_image }, 0x300_0000);
        assert_eq!({ params.hdr.ramdisk_size }, 4096);
        assert_eq!(params.e820_entries, 4);
        assert_eq!({ params.e820_table[3].addr }, HIMEM_START);
    }

    #[test]
    fn bzimage_zero_page_keeps_the_image_header() {
        let header = setup_header {
            setup_sects: 27,
            version: 0x020f,
            loadflags: 0x01,
            init_size: 0x123_4000,
            code32_start: HIMEM_START as u32,
            header: HDRS_MAGIC,
            ..Default::default()
        };
        let e820 = build_e820(&[(0, 64 << 20)]);
        let params = build_boot_params(&ZeroPageInput {
            setup_header: Some(header),
            cmdline_len: 10,
            initrd: None,
            e820: &e820,
        })
        .unwrap();
        assert_eq!(params.hdr.setup_sects, 27);
        assert_eq!({ params.hdr.init_size }, 0x123_4000);
        assert_eq!(params.hdr.loadflags, 0x01 | KEEP_SEGMENTS as u8);
        assert_eq!({ params.hdr.ramdisk_image }, 0);
    }

    #[test]
    fn rejects_oversized_memory_maps() {
        let e820 = vec![E820Entry { addr: 0, size: 1, kind: E820_RAM }; 129];
        let input = ZeroPageInput { setup_header: None, cmdline_len: 0, initrd: None, e820: &e820 };
        assert!(matches!(build_boot_params(&input), Err(ZeroPageError::TooManyE820Entries(129))));
    }

    #[test]
    fn writes_the_zero_page() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let e820 = build_e820(&[(0, 1 << 20)]);
        let params =
            build_boot_params(&ZeroPageInput { setup_header: None, cmdline_len: 0, initrd: None, e820: &e820 })
                .unwrap();
        write_zero_page(&mem, &params).unwrap();
        // `header` sits at offset 0x202 of the zero page.
        let magic: u32 = mem.read_obj(GuestAddress(ZERO_PAGE_ADDR + 0x202)).unwrap();
        assert_eq!(magic, HDRS_MAGIC);
    }
}
