//! The `/dev/kvm` handle: API version and capability checks, the supported CPUID.

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm, VmFd};

/// The only KVM API version there has ever been.
pub const KVM_API_VERSION: i32 = 12;

/// Capabilities tern cannot run without, with the names the error reports.
const REQUIRED_CAPABILITIES: &[(Cap, &str)] = &[
    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
    (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
    (Cap::Pit2, "KVM_CAP_PIT2"),
    (Cap::Irqfd, "KVM_CAP_IRQFD"),
    (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
    (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
];

/// Errors opening or checking KVM.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// `/dev/kvm` is missing or not accessible.
    #[error("cannot open /dev/kvm (is KVM available, and may this user use it?)")]
    Open(#[source] kvm_ioctls::Error),
    /// The kernel speaks another KVM API.
    #[error("KVM API version is {found}, tern needs {KVM_API_VERSION}")]
    ApiVersion { found: i32 },
    /// A capability tern relies on is missing.
    #[error("KVM lacks {0}")]
    MissingCapability(&'static str),
    /// `KVM_GET_SUPPORTED_CPUID` failed.
    #[error("cannot read the CPUID KVM supports")]
    SupportedCpuid(#[source] kvm_ioctls::Error),
    /// `KVM_CREATE_VM` failed.
    #[error("cannot create a KVM VM")]
    CreateVm(#[source] kvm_ioctls::Error),
}

/// What `/dev/kvm` offers, without failing on the first problem (for `tern check`).
#[derive(Debug, Clone)]
pub struct KvmReport {
    /// `KVM_GET_API_VERSION`.
    pub api_version: i32,
    /// Names of required capabilities KVM lacks.
    pub missing_capabilities: Vec<&'static str>,
}

/// Open `/dev/kvm` and report its API version and every missing required capability.
pub fn report() -> Result<KvmReport, KvmError> {
    let kvm = Kvm::new().map_err(KvmError::Open)?;
    let missing_capabilities =
        REQUIRED_CAPABILITIES.iter().filter(|(cap, _)| !kvm.check_extension(*cap)).map(|(_, name)| *name).collect();
    Ok(KvmReport { api_version: kvm.get_api_version(), missing_capabilities })
}

/// An open, checked `/dev/kvm`.
pub struct KvmSystem {
    kvm: Kvm,
}

impl KvmSystem {
    /// Open `/dev/kvm` and check the API version and every capability tern needs.
    pub fn open() -> Result<Self, KvmError> {
        let kvm = Kvm::new().map_err(KvmError::Open)?;
        let found = kvm.get_api_version();
        if found != KVM_API_VERSION {
            return Err(KvmError::ApiVersion { found });
        }
        if let Some((_, name)) = REQUIRED_CAPABILITIES.iter().find(|(cap, _)| !kvm.check_extension(*cap)) {
            return Err(KvmError::MissingCapability(name));
        }
        Ok(KvmSystem { kvm })
    }

    /// The CPUID entries KVM can present to a guest.
    pub fn supported_cpuid(&self) -> Result<CpuId, KvmError> {
        self.kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(KvmError::SupportedCpuid)
    }

    /// The most vCPUs KVM allows in one VM.
    pub fn max_vcpus(&self) -> usize {
        self.kvm.get_max_vcpus()
    }

    /// Whether KVM emulates the LAPIC's TSC-deadline timer mode.
    pub fn has_tsc_deadline_timer(&self) -> bool {
        self.kvm.check_extension(Cap::TscDeadlineTimer)
    }

    /// Whether KVM wants an identity-map page (Intel without unrestricted guest).
    pub(super) fn has_identity_map_cap(&self) -> bool {
        self.kvm.check_extension(Cap::SetIdentityMapAddr)
    }

    pub(super) fn create_vm_fd(&self) -> Result<VmFd, KvmError> {
        self.kvm.create_vm().map_err(KvmError::CreateVm)
    }
}
