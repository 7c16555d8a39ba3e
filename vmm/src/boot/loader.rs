//! Kernel and initramfs loading. The format is told by its magic: an ELF `vmlinux`
//! (`\x7fELF`) is loaded segment by segment at its physical addresses and entered at its
//! 64-bit entry point; a `bzImage` ("HdrS" at 0x202) has its protected-mode part loaded at
//! 1 MiB and is entered at the 64-bit entry, 0x200 past that. Both get `boot_params` in RSI.
//! The initramfs goes as high as the kernel allows, page aligned, below the MMIO gap.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress};

use super::zero_page::InitrdPlacement;
use crate::layout::{HIMEM_START, MMIO_GAP_START, PAGE_SIZE};
use crate::memory::GuestMemory;

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const HDRS_MAGIC: &[u8; 4] = b"HdrS";
const HDRS_OFFSET: usize = 0x202;
/// The 64-bit entry point sits this far into a bzImage's protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// `initrd_addr_max` for kernels that do not say (ELF images; boot protocol < 2.03).
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;

/// A kernel image format tern can boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// An uncompressed ELF `vmlinux`.
    Elf,
    /// A compressed `bzImage`.
    BzImage,
}

/// Errors loading the kernel or the initramfs.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    /// The kernel file could not be opened or read.
    #[error("cannot read kernel image {path}")]
    KernelIo {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// Neither an ELF nor a bzImage.
    #[error("kernel image {path} is neither an ELF vmlinux nor a bzImage")]
    UnknownKernelFormat { path: String },
    /// linux-loader rejected the image (corrupt, truncated, or does not fit in guest memory).
    #[error("cannot load {format:?} kernel image {path}")]
    Kernel {
        path: String,
        format: KernelFormat,
        #[source]
        source: linux_loader::loader::Error,
    },
    /// The initramfs file could not be opened or read.
    #[error("cannot read initramfs {path}")]
    InitrdIo {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The initramfs does not fit between the kernel and the top of usable memory.
    #[error(
        "initramfs {path} ({size} bytes) does not fit in guest memory: \
         {available} bytes free between the kernel and the initramfs ceiling; give the VM more memory"
    )]
    InitrdTooLarge { path: String, size: u64, available: u64 },
}

/// A kernel in guest memory.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// Its format.
    pub format: KernelFormat,
    /// The 64-bit entry point (RIP at the first instruction).
    pub entry: GuestAddress,
    /// First byte past everything the kernel claims, including a bzImage's decompression
    /// space: the initramfs must start at or above it.
    pub end: u64,
    /// Highest address the initramfs may end at (inclusive), from the kernel's header.
    pub initrd_addr_max: u64,
    /// The bzImage's setup header, for the zero page.
    pub setup_header: Option<setup_header>,
}

/// Tell the kernel format from the first bytes of the image.
pub fn detect_format(head: &[u8]) -> Option<KernelFormat> {
    if head.starts_with(ELF_MAGIC) {
        Some(KernelFormat::Elf)
    } else if head.get(HDRS_OFFSET..HDRS_OFFSET + 4) == Some(HDRS_MAGIC.as_slice()) {
        Some(KernelFormat::BzImage)
    } else {
        None
    }
}

fn read_head(file: &mut File) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(HDRS_OFFSET + 4);
    file.by_ref().take((HDRS_OFFSET + 4) as u64).read_to_end(&mut head)?;
    file.seek(SeekFrom::Start(0))?;
    Ok(head)
}

fn align_up(value: u64, align: u64) -> u64 {
    value.div_ceil(align) * align
}

/// Load the kernel at `path` into `mem`.
pub fn load_kernel(mem: &GuestMemory, path: &Path) -> Result<LoadedKernel, LoaderError> {
    let display = path.display().to_string();
    let io_error = |source| LoaderError::KernelIo { path: display.clone(), source };
    let mut file = File::open(path).map_err(io_error)?;
    let head = read_head(&mut file).map_err(io_error)?;
    let format = detect_format(&head).ok_or_else(|| LoaderError::UnknownKernelFormat { path: display.clone() })?;
    let load_error = |source| LoaderError::Kernel { path: display.clone(), format, source };
    let himem = Some(GuestAddress(HIMEM_START));

    match format {
        KernelFormat::Elf => {
            let result = Elf::load(mem, None, &mut file, himem).map_err(load_error)?;
            Ok(LoadedKernel {
                format,
                entry: result.kernel_load,
                end: result.kernel_end,
                initrd_addr_max: DEFAULT_INITRD_ADDR_MAX,
                setup_header: None,
            })
        }
        KernelFormat::BzImage => {
            let result = BzImage::load(mem, Some(GuestAddress(HIMEM_START)), &mut file, himem).map_err(load_error)?;
            let header = result.setup_header.unwrap_or_default();
            // The decompressor unpacks into `init_size` bytes at the kernel's preferred
            // address (or where it was loaded, if relocatable and lower); keep the initramfs
            // clear of all of it.
            let init_size = u64::from(header.init_size);
            let load = result.kernel_load.0;
            let decompression_end = load.max(header.pref_address) + init_size;
            let initrd_addr_max = match header.initrd_addr_max {
                0 => DEFAULT_INITRD_ADDR_MAX,
                max => u64::from(max),
            };
            Ok(LoadedKernel {
                format,
                entry: GuestAddress(load + BZIMAGE_64BIT_ENTRY_OFFSET),
                end: result.kernel_end.max(decompression_end),
                initrd_addr_max,
                setup_header: Some(header),
            })
        }
    }
}

/// Where an initramfs of `size` bytes goes: the highest page-aligned address such that it
/// ends below both `ram_end` (exclusive) and the kernel's `initrd_addr_max` (inclusive),
/// without dipping into the kernel. `None` if it does not fit.
pub fn place_initrd(size: u64, kernel: &LoadedKernel, ram_end: u64) -> Option<u64> {
    let ceiling = ram_end.min(kernel.initrd_addr_max.saturating_add(1)).min(MMIO_GAP_START);
    let start = ceiling.checked_sub(size)? / PAGE_SIZE * PAGE_SIZE;
    (start >= align_up(kernel.end, PAGE_SIZE)).then_some(start)
}

/// Load the initramfs at `path` as high as [`place_initrd`] allows.
pub fn load_initrd(
    mem: &GuestMemory,
    path: &Path,
    kernel: &LoadedKernel,
    ram_end: u64,
) -> Result<InitrdPlacement, LoaderError> {
    let display = path.display().to_string();
    let io_error = |source| LoaderError::InitrdIo { path: display.clone(), source };
    let mut file = File::open(path).map_err(io_error)?;
    let size = file.metadata().map_err(io_error)?.len();
    let too_large = || LoaderError::InitrdTooLarge {
        path: display.clone(),
        size,
        available: ram_end
            .min(kernel.initrd_addr_max.saturating_add(1))
            .saturating_sub(align_up(kernel.end, PAGE_SIZE)),
    };
    let size32 = u32::try_from(size).map_err(|_| too_large())?;
    let addr = place_initrd(size, kernel, ram_end).ok_or_else(too_large)?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize).map_err(|err| match err {
        vm_memory::GuestMemoryError::IOError(source) => LoaderError::InitrdIo { path: display.clone(), source },
        other => LoaderError::InitrdIo { path: display.clone(), source: std::io::Error::other(other) },
    })?;
    Ok(InitrdPlacement { addr, size: size32 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn memory(mib: usize) -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), mib << 20)]).unwrap()
    }

    fn file_with(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(bytes).unwrap();
        file
    }

    fn bzimage_head() -> Vec<u8> {
        let mut image = vec![0u8; 0x400];
        image[HDRS_OFFSET..HDRS_OFFSET + 4].copy_from_slice(HDRS_MAGIC);
        image
    }

    fn elf_kernel(end: u64) -> LoadedKernel {
        LoadedKernel {
            format: KernelFormat::Elf,
            entry: GuestAddress(0x100_0000),
            end,
            initrd_addr_max: DEFAULT_INITRD_ADDR_MAX,
            setup_header: None,
        }
    }

    #[test]
    fn detects_formats_by_magic() {
        assert_eq!(detect_format(b"\x7fELF\x02\x01\x01"), Some(KernelFormat::Elf));
        assert_eq!(detect_format(&bzimage_head()), Some(KernelFormat::BzImage));
        assert_eq!(detect_format(b"MZ this is not a kernel"), None);
        assert_eq!(detect_format(&[]), None);
        assert_eq!(detect_format(&bzimage_head()[..HDRS_OFFSET + 2]), None);
    }

    #[test]
    fn missing_kernel_is_an_io_error() {
        let err = load_kernel(&memory(64), Path::new("/nonexistent/vmlinux")).unwrap_err();
        assert!(matches!(err, LoaderError::KernelIo { .. }), "{err:?}");
    }

    #[test]
    fn garbage_kernel_is_an_unknown_format() {
        let file = file_with(&[0x55u8; 4096]);
        let err = load_kernel(&memory(64), file.path()).unwrap_err();
        assert!(matches!(err, LoaderError::UnknownKernelFormat { .. }), "{err:?}");
    }

    #[test]
    fn truncated_elf_is_a_load_error() {
        let file = file_with(b"\x7fELF\x02\x01\x01\x00");
        let err = load_kernel(&memory(64), file.path()).unwrap_err();
        assert!(matches!(err, LoaderError::Kernel { format: KernelFormat::Elf, .. }), "{err:?}");
    }

    #[test]
    fn corrupt_bzimage_is_a_load_error() {
        // "HdrS" but no LOADED_HIGH flag and a zero version: not a loadable bzImage.
        let file = file_with(&bzimage_head());
        let err = load_kernel(&memory(64), file.path()).unwrap_err();
        assert!(matches!(err, LoaderError::Kernel { format: KernelFormat::BzImage, .. }), "{err:?}");
    }

    #[test]
    fn truncated_bzimage_is_a_load_error() {
        let mut image = bzimage_head();
        image[0x1f1] = 200; // setup_sects: the setup code claims more than the file holds
        image[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        image[0x211] = 0x01; // LOADED_HIGH
        image[0x214..0x218].copy_from_slice(&(HIMEM_START as u32).to_le_bytes());
        let file = file_with(&image);
        let err = load_kernel(&memory(64), file.path()).unwrap_err();
        assert!(matches!(err, LoaderError::Kernel { format: KernelFormat::BzImage, .. }), "{err:?}");
    }

    #[test]
    fn initrd_goes_high_and_page_aligned() {
        let kernel = elf_kernel(0x200_0000);
        let ram_end = 64 << 20;
        let addr = place_initrd(10_000, &kernel, ram_end).unwrap();
        assert_eq!(addr % PAGE_SIZE, 0);
        assert!(addr + 10_000 <= ram_end);
        assert!(ram_end - (addr + 10_000) < PAGE_SIZE);
    }

    #[test]
    fn initrd_respects_initrd_addr_max() {
        let mut kernel = elf_kernel(0x200_0000);
        kernel.initrd_addr_max = 0x0fff_ffff;
        let addr = place_initrd(0x1000, &kernel, 1 << 30).unwrap();
        assert_eq!(addr, 0x1000_0000 - 0x1000);
    }

    #[test]
    fn initrd_must_not_overlap_the_kernel() {
        let kernel = elf_kernel(60 << 20);
        assert_eq!(place_initrd(8 << 20, &kernel, 64 << 20), None);
        assert!(place_initrd(4 << 20, &kernel, 64 << 20).is_some());
        assert_eq!(place_initrd(u64::MAX, &kernel, 64 << 20), None);
    }

    #[test]
    fn oversized_initrd_file_is_rejected_with_sizes() {
        let file = file_with(&vec![0u8; 2 << 20]);
        let kernel = elf_kernel(63 << 20);
        let err = load_initrd(&memory(64), file.path(), &kernel, 64 << 20).unwrap_err();
        match err {
            LoaderError::InitrdTooLarge { size, available, .. } => {
                assert_eq!(size, 2 << 20);
                assert_eq!(available, 1 << 20);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn initrd_bytes_land_in_guest_memory() {
        let file = file_with(b"070701 cpio bytes");
        let kernel = elf_kernel(0x200_0000);
        let mem = memory(64);
        let placement = load_initrd(&mem, file.path(), &kernel, 64 << 20).unwrap();
        let mut buf = [0u8; 6];
        mem.read_slice(&mut buf, GuestAddress(placement.addr)).unwrap();
        assert_eq!(&buf, b"070701");
        assert_eq!(placement.size, 17);
    }
}
