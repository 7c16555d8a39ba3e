//! Preparing guest memory for the first instruction, in this order: load the kernel (ELF or
//! bzImage), load the initramfs high, write the command line, the zero page with its E820
//! map, the MP table, the boot GDT/IDT and the identity page tables. What the vCPUs need
//! from this (entry point, CPUID, MSRs, registers) is built in [`cpu`] and [`regs`], and handed
//! over as a [`VcpuBootState`] by [`vcpu_boot_state`].

pub mod cmdline;
pub mod cpu;
pub mod loader;
pub mod mptable;
pub mod regs;
pub mod zero_page;

use std::path::Path;

use linux_loader::cmdline::Cmdline;
use vm_memory::GuestAddress;

use crate::layout::CMDLINE_ADDR;
use crate::vstate::kvm::KvmSystem;
use crate::vstate::vcpu::{EntryRegisters, VcpuBootState};
use kvm_bindings::CpuId;

use self::loader::{KernelFormat, LoadedKernel};
use self::zero_page::{InitrdPlacement, ZeroPageInput};
use crate::memory::GuestMemory;
use crate::memory::{ram_end_below_gap, ram_regions};

/// Boot protocol version from which the setup header states the command line limit.
const BOOT_PROTOCOL_CMDLINE_SIZE: u16 = 0x0206;

/// Errors preparing the guest for boot.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// Loading the kernel or the initramfs failed.
    #[error(transparent)]
    Loader(#[from] loader::LoaderError),
    /// The command line is longer than this kernel accepts.
    #[error("kernel command line is {len} bytes; this kernel accepts at most {limit}")]
    CmdlineTooLongForKernel { len: usize, limit: u32 },
    /// The command line could not be written.
    #[error("cannot write the kernel command line into guest memory")]
    CmdlineWrite(#[source] linux_loader::loader::Error),
    /// The zero page could not be built or written.
    #[error(transparent)]
    ZeroPage(#[from] zero_page::ZeroPageError),
    /// The MP table could not be built or written.
    #[error(transparent)]
    MpTable(#[from] mptable::MpTableError),
    /// The boot GDT or page tables could not be written.
    #[error(transparent)]
    Tables(#[from] regs::RegsError),
}

/// What the bootstrap vCPU needs to start the loaded kernel.
#[derive(Debug, Clone, Copy)]
pub struct BootEntry {
    /// The 64-bit entry point.
    pub entry: GuestAddress,
    /// The kernel's format.
    pub format: KernelFormat,
    /// Where the initramfs went.
    pub initrd: Option<InitrdPlacement>,
}

/// Load everything into `mem` for a guest with `num_cpus` vCPUs.
pub fn prepare_guest_memory(
    mem: &GuestMemory,
    kernel_path: &Path,
    initrd_path: Option<&Path>,
    cmdline: &Cmdline,
    num_cpus: u8,
) -> Result<BootEntry, BootError> {
    let kernel: LoadedKernel = loader::load_kernel(mem, kernel_path)?;
    let initrd = match initrd_path {
        Some(path) => Some(loader::load_initrd(mem, path, &kernel, ram_end_below_gap(mem))?),
        None => None,
    };

    let cmdline_len = cmdline
        .as_cstring()
        .map(|text| text.as_bytes().len())
        .map_err(|_| BootError::CmdlineWrite(linux_loader::loader::Error::InvalidCommandLine))?;
    if let Some(header) = &kernel.setup_header {
        let limit = { header.cmdline_size };
        if { header.version } >= BOOT_PROTOCOL_CMDLINE_SIZE && cmdline_len > limit as usize {
            return Err(BootError::CmdlineTooLongForKernel { len: cmdline_len, limit });
        }
    }
    linux_loader::loader::load_cmdline(mem, GuestAddress(CMDLINE_ADDR), cmdline).map_err(BootError::CmdlineWrite)?;

    let e820 = zero_page::build_e820(&ram_regions(mem));
    let params = zero_page::build_boot_params(&ZeroPageInput {
        setup_header: kernel.setup_header,
        cmdline_len,
        initrd,
        e820: &e820,
    })?;
    zero_page::write_zero_page(mem, &params)?;
    mptable::write_mptable(mem, num_cpus)?;
    regs::write_gdt_and_idt(mem)?;
    regs::write_identity_page_tables(mem)?;

    Ok(BootEntry { entry: kernel.entry, format: kernel.format, initrd })
}

/// The boot state of vCPU `index` of `num_cpus`: CPUID from what KVM supports, the boot MSRs,
/// FPU and LAPIC; for the bootstrap vCPU (`entry` given) also the long-mode registers entering
/// the kernel at `entry`.
pub fn vcpu_boot_state(
    kvm: &KvmSystem,
    supported_cpuid: &CpuId,
    index: u8,
    num_cpus: u8,
    entry: Option<u64>,
) -> VcpuBootState {
    let options = cpu::CpuidOptions { apic_id: index, num_cpus, tsc_deadline_timer: kvm.has_tsc_deadline_timer() };
    VcpuBootState {
        cpuid: cpu::vcpu_cpuid(supported_cpuid, &options),
        msrs: cpu::boot_msrs(),
        fpu: regs::boot_fpu(),
        lapic: cpu::lapic_with_lint_pins,
        entry: entry.map(|entry| EntryRegisters { sregs: regs::long_mode_sregs, regs: regs::boot_regs(entry) }),
    }
}
