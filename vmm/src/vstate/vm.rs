//! The KVM VM: in-kernel irqchip (PIC + IOAPIC + LAPICs) and PIT, guest RAM slots, irqfds
//! that let devices raise interrupts without a VM exit, ioeventfds that turn queue kicks
//! into eventfd signals, and vCPU creation.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{IoEventAddress, VmFd};
use vm_memory::{GuestMemory as _, GuestMemoryRegion as _};
use vmm_sys_util::eventfd::EventFd;

use super::kvm::{KvmError, KvmSystem};
use super::vcpu::Vcpu;
use crate::layout::{KVM_IDENTITY_MAP_ADDR, KVM_TSS_ADDR};
use crate::memory::GuestMemory;

/// Errors setting up the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// Creating the VM failed.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// `KVM_SET_TSS_ADDR` failed.
    #[error("cannot set the KVM TSS address")]
    TssAddress(#[source] kvm_ioctls::Error),
    /// `KVM_SET_IDENTITY_MAP_ADDR` failed.
    #[error("cannot set the KVM identity-map address")]
    IdentityMapAddress(#[source] kvm_ioctls::Error),
    /// `KVM_CREATE_IRQCHIP` failed.
    #[error("cannot create the in-kernel irqchip")]
    CreateIrqchip(#[source] kvm_ioctls::Error),
    /// `KVM_CREATE_PIT2` failed.
    #[error("cannot create the in-kernel PIT")]
    CreatePit(#[source] kvm_ioctls::Error),
    /// Registering a RAM region failed.
    #[error("cannot register guest memory slot {slot} ({size:#x} bytes at {guest_addr:#x}) with KVM")]
    MemoryRegion {
        slot: u32,
        guest_addr: u64,
        size: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A RAM region has no host mapping.
    #[error("guest memory region at {0:#x} has no host mapping")]
    UnmappedRegion(u64),
    /// `KVM_IRQFD` failed.
    #[error("cannot route an eventfd to GSI {gsi}")]
    Irqfd {
        gsi: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    /// `KVM_IOEVENTFD` failed.
    #[error("cannot register an ioeventfd at {addr:#x}")]
    Ioeventfd {
        addr: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
    /// `KVM_CREATE_VCPU` failed.
    #[error("cannot create vCPU {index}")]
    CreateVcpu {
        index: u8,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// A KVM VM with its interrupt controllers.
pub struct Vm {
    fd: VmFd,
    /// Keeps the RAM that KVM's memory slots point into mapped for as long as the VM lives.
    memory: Option<GuestMemory>,
}

impl Vm {
    /// Create a VM with the in-kernel irqchip and PIT.
    pub fn new(kvm: &KvmSystem) -> Result<Vm, VmError> {
        let fd = kvm.create_vm_fd()?;
        fd.set_tss_address(KVM_TSS_ADDR as usize).map_err(VmError::TssAddress)?;
        if kvm.has_identity_map_cap() {
            fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDR).map_err(VmError::IdentityMapAddress)?;
        }
        fd.create_irq_chip().map_err(VmError::CreateIrqchip)?;
        // The speaker port (0x61) is answered in the kernel; nothing to do in userspace.
        let pit_config = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        fd.create_pit2(pit_config).map_err(VmError::CreatePit)?;
        Ok(Vm { fd, memory: None })
    }

    /// Give every region of `mem` to KVM as a memory slot.
    pub fn register_memory(&mut self, mem: &GuestMemory) -> Result<(), VmError> {
        for (slot, region) in mem.iter().enumerate() {
            let guest_addr = region.start_addr().0;
            let size = region.len();
            let host_addr = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|_| VmError::UnmappedRegion(guest_addr))?;
            let slot = slot as u32;
            let memory_region = kvm_userspace_memory_region {
                slot,
                guest_phys_addr: guest_addr,
                memory_size: size,
                userspace_addr: host_addr as u64,
                flags: 0,
            };
            // SAFETY: `host_addr..host_addr + size` is one live mmap owned by `mem`'s region,
            // and `self.memory` keeps a clone of `mem` (sharing the same mappings) until the
            // VM fd is closed, so KVM never sees an unmapped or reused range.
            unsafe { self.fd.set_user_memory_region(memory_region) }.map_err(|source| VmError::MemoryRegion {
                slot,
                guest_addr,
                size,
                source,
            })?;
        }
        self.memory = Some(mem.clone());
        Ok(())
    }

    /// Deliver an interrupt on `gsi` whenever `fd` is written.
    pub fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd.register_irqfd(fd, gsi).map_err(|source| VmError::Irqfd { gsi, source })
    }

    /// Signal `fd` (instead of exiting to userspace) when the guest writes the 32-bit value
    /// `datamatch` at MMIO address `addr`.
    pub fn register_mmio_notify(&self, fd: &EventFd, addr: u64, datamatch: u32) -> Result<(), VmError> {
        self.fd
            .register_ioevent(fd, &IoEventAddress::Mmio(addr), datamatch)
            .map_err(|source| VmError::Ioeventfd { addr, source })
    }

    /// Create vCPU `index` (its APIC id is the same number).
    pub fn create_vcpu(&self, index: u8) -> Result<Vcpu, VmError> {
        let fd = self.fd.create_vcpu(u64::from(index)).map_err(|source| VmError::CreateVcpu { index, source })?;
        Ok(Vcpu::new(index, fd, self.memory.clone()))
    }
}
