//! Per-vCPU CPU state besides registers: the CPUID table (KVM's supported set with this
//! vCPU's APIC id and the VM's topology patched in), the boot MSRs, and the local APIC's
//! LINT pins. Built here as plain data; `vstate::vcpu` hands it to KVM.

use kvm_bindings::{kvm_cpuid_entry2, kvm_lapic_state, kvm_msr_entry, CpuId};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMETERS: u32 = 0x4;
const LEAF_EXTENDED_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXTENDED_TOPOLOGY: u32 = 0x1f;
const LEAF_AMD_ADDRESS_SIZES: u32 = 0x8000_0008;
const LEAF_AMD_EXTENDED_APIC_ID: u32 = 0x8000_001e;

const ECX_TSC_DEADLINE: u32 = 1 << 24;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
/// Topology level types in leaf 0xb/0x1f ECX[15:8].
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled, default memory type write-back.
const MTRR_ENABLE_WRITE_BACK: u64 = (1 << 11) | 6;

const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const APIC_DELIVERY_MODE_MASK: u32 = 0x700;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Bits needed to number `count` items (ceil(log2(count))).
fn id_bits(count: u32) -> u32 {
    count.max(1).next_power_of_two().trailing_zeros()
}

/// What the VM's CPUID should say beyond what KVM reports as supported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuidOptions {
    /// This vCPU's APIC id.
    pub apic_id: u8,
    /// vCPUs in the VM.
    pub num_cpus: u8,
    /// KVM emulates the LAPIC's TSC-deadline mode (`KVM_CAP_TSC_DEADLINE_TIMER`). It is not
    /// in `KVM_GET_SUPPORTED_CPUID`; without it the guest calibrates the LAPIC timer against
    /// the PIT, which is slow and, under nested emulation, fails outright.
    pub tsc_deadline_timer: bool,
}

/// Patch `entry` for one vCPU (one core per vCPU, one thread per core, one package).
fn patch_cpuid_entry(entry: &mut kvm_cpuid_entry2, options: &CpuidOptions) {
    let apic = u32::from(options.apic_id);
    let num_cpus = options.num_cpus;
    let cpus = u32::from(num_cpus);
    match entry.function {
        LEAF_FEATURES => {
            // EBX: [31:24] initial APIC id, [23:16] logical processors per package.
            entry.ebx = (entry.ebx & 0x0000_ffff) | (apic << 24) | (cpus << 16);
            entry.ecx |= ECX_HYPERVISOR;
            if options.tsc_deadline_timer {
                entry.ecx |= ECX_TSC_DEADLINE;
            }
            if num_cpus > 1 {
                entry.edx |= EDX_HTT;
            } else {
                entry.edx &= !EDX_HTT;
            }
        }
        // Cache type 0 ends the list of caches.
        LEAF_CACHE_PARAMETERS if entry.eax & 0x1f != 0 => {
            // EAX: [31:26] cores per package - 1, [25:14] logical processors sharing the
            // cache - 1 (the last level is shared by every vCPU, the others are per core).
            let cache_level = (entry.eax >> 5) & 0x7;
            let sharing = if cache_level >= 3 { cpus - 1 } else { 0 };
            entry.eax = (entry.eax & 0x3fff) | ((cpus - 1) << 26) | (sharing << 14);
        }
        LEAF_EXTENDED_TOPOLOGY | LEAF_V2_EXTENDED_TOPOLOGY => {
            entry.edx = apic;
            match entry.index {
                0 => {
                    entry.eax = 0;
                    entry.ebx = 1;
                    entry.ecx = LEVEL_TYPE_SMT << 8;
                }
                1 => {
                    entry.eax = id_bits(cpus);
                    entry.ebx = cpus;
                    entry.ecx = (LEVEL_TYPE_CORE << 8) | 1;
                }
                index => {
                    entry.eax = 0;
                    entry.ebx = 0;
                    entry.ecx = index;
                }
            }
        }
        LEAF_AMD_ADDRESS_SIZES => {
            // ECX: [7:0] cores - 1, [15:12] APIC id bits (0: derive from [7:0]).
            entry.ecx = (entry.ecx & !0xf0ff) | (cpus - 1);
        }
        LEAF_AMD_EXTENDED_APIC_ID => {
            entry.eax = apic;
            // EBX: [7:0] core id, [15:8] threads per core - 1. ECX: node 0, one node.
            entry.ebx = apic & 0xff;
            entry.ecx = 0;
        }
        _ => {}
    }
}

/// KVM's supported CPUID with one vCPU's identity and the VM's topology patched in.
pub fn vcpu_cpuid(supported: &CpuId, options: &CpuidOptions) -> CpuId {
    let mut cpuid = supported.clone();
    for entry in cpuid.as_mut_slice() {
        patch_cpuid_entry(entry, options);
    }
    cpuid
}

/// The MSRs every vCPU boots with.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    let msr = |index, data| kvm_msr_entry { index, data, ..Default::default() };
    vec![
        msr(MSR_IA32_SYSENTER_CS, 0),
        msr(MSR_IA32_SYSENTER_ESP, 0),
        msr(MSR_IA32_SYSENTER_EIP, 0),
        msr(MSR_STAR, 0),
        msr(MSR_CSTAR, 0),
        msr(MSR_KERNEL_GS_BASE, 0),
        msr(MSR_SYSCALL_MASK, 0),
        msr(MSR_LSTAR, 0),
        msr(MSR_IA32_TSC, 0),
        msr(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        msr(MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WRITE_BACK),
    ]
}

fn lapic_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[offset + i] as u8);
    u32::from_le_bytes(bytes)
}

fn set_lapic_reg(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, byte) in value.to_le_bytes().into_iter().enumerate() {
        lapic.regs[offset + i] = byte as std::os::raw::c_char;
    }
}

/// `current` with LINT0 delivering ExtINT (the 8259) and LINT1 delivering NMI, as on a PC.
pub fn lapic_with_lint_pins(current: &kvm_lapic_state) -> kvm_lapic_state {
    let mut lapic = *current;
    for (offset, mode) in [(APIC_LVT_LINT0, APIC_MODE_EXTINT), (APIC_LVT_LINT1, APIC_MODE_NMI)] {
        let value = lapic_reg(&lapic, offset);
        set_lapic_reg(&mut lapic, offset, (value & !APIC_DELIVERY_MODE_MASK) | (mode << 8));
    }
    lapic
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 { function, index, ..Default::default() }
    }

    fn supported() -> CpuId {
        let mut leaf1 = entry(LEAF_FEATURES, 0);
        leaf1.ebx = 0xff00_0800; // a host APIC id, CLFLUSH size 8
        let mut l3 = entry(LEAF_CACHE_PARAMETERS, 3);
        l3.eax = (3 << 5) | 0x3;
        let mut l1 = entry(LEAF_CACHE_PARAMETERS, 0);
        l1.eax = (1 << 5) | 0x1;
        CpuId::from_entries(&[
            leaf1,
            l1,
            entry(LEAF_CACHE_PARAMETERS, 4),
            l3,
            entry(LEAF_EXTENDED_TOPOLOGY, 0),
            entry(LEAF_EXTENDED_TOPOLOGY, 1),
            entry(LEAF_EXTENDED_TOPOLOGY, 2),
            entry(LEAF_AMD_ADDRESS_SIZES, 0),
            entry(LEAF_AMD_EXTENDED_APIC_ID, 0),
        ])
        .unwrap()
    }

    fn options(apic_id: u8, num_cpus: u8) -> CpuidOptions {
        CpuidOptions { apic_id, num_cpus, tsc_deadline_timer: true }
    }

    fn find(cpuid: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *cpuid.as_slice().iter().find(|e| e.function == function && e.index == index).unwrap()
    }

    #[test]
    fn leaf1_carries_apic_id_and_hypervisor_bit() {
        let cpuid = vcpu_cpuid(&supported(), &options(3, 4));
        let leaf1 = find(&cpuid, LEAF_FEATURES, 0);
        assert_eq!(leaf1.ebx >> 24, 3);
        assert_eq!((leaf1.ebx >> 16) & 0xff, 4);
        assert_eq!(leaf1.ebx & 0xffff, 0x0800);
        assert_ne!(leaf1.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(leaf1.edx & EDX_HTT, 0);
        assert_ne!(leaf1.ecx & ECX_TSC_DEADLINE, 0);
        let single = CpuidOptions { apic_id: 0, num_cpus: 1, tsc_deadline_timer: false };
        let single = find(&vcpu_cpuid(&supported(), &single), LEAF_FEATURES, 0);
        assert_eq!(single.edx & EDX_HTT, 0);
        assert_eq!(single.ecx & ECX_TSC_DEADLINE, 0);
    }

    #[test]
    fn extended_topology_describes_one_core_per_vcpu() {
        let cpuid = vcpu_cpuid(&supported(), &options(2, 3));
        let smt = find(&cpuid, LEAF_EXTENDED_TOPOLOGY, 0);
        assert_eq!((smt.eax, smt.ebx, smt.ecx >> 8, smt.edx), (0, 1, LEVEL_TYPE_SMT, 2));
        let core = find(&cpuid, LEAF_EXTENDED_TOPOLOGY, 1);
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (2, 3, 0x201, 2));
        let end = find(&cpuid, LEAF_EXTENDED_TOPOLOGY, 2);
        assert_eq!((end.ebx, end.ecx & 0xff00), (0, 0));
    }

    #[test]
    fn cache_and_amd_leaves_count_cores() {
        let cpuid = vcpu_cpuid(&supported(), &options(1, 2));
        let l1 = find(&cpuid, LEAF_CACHE_PARAMETERS, 0);
        assert_eq!((l1.eax >> 26, (l1.eax >> 14) & 0xfff), (1, 0));
        let l3 = find(&cpuid, LEAF_CACHE_PARAMETERS, 3);
        assert_eq!((l3.eax >> 26, (l3.eax >> 14) & 0xfff, l3.eax & 0x3fff), (1, 1, (3 << 5) | 3));
        assert_eq!(find(&cpuid, LEAF_CACHE_PARAMETERS, 4).eax, 0);
        assert_eq!(find(&cpuid, LEAF_AMD_ADDRESS_SIZES, 0).ecx & 0xff, 1);
        assert_eq!(find(&cpuid, LEAF_AMD_EXTENDED_APIC_ID, 0).eax, 1);
    }

    #[test]
    fn id_bits_rounds_up() {
        assert_eq!([1, 2, 3, 4, 5, 32].map(id_bits), [0, 1, 2, 2, 3, 5]);
    }

    #[test]
    fn lint_pins_get_extint_and_nmi() {
        let mut lapic = kvm_lapic_state { regs: [0; 1024] };
        set_lapic_reg(&mut lapic, APIC_LVT_LINT0, 0x0001_0700);
        let lapic = lapic_with_lint_pins(&lapic);
        assert_eq!(lapic_reg(&lapic, APIC_LVT_LINT0), 0x0001_0700);
        assert_eq!(lapic_reg(&lapic, APIC_LVT_LINT1), 0x400);
    }

    #[test]
    fn boot_msrs_enable_fast_strings_and_write_back() {
        let msrs = boot_msrs();
        let value = |index| msrs.iter().find(|m| m.index == index).unwrap().data;
        assert_eq!(value(MSR_IA32_MISC_ENABLE), 1);
        assert_eq!(value(MSR_MTRR_DEF_TYPE), 0x806);
    }
}
