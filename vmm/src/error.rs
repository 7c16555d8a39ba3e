//! The one error type of the crate's surface: everything that can go wrong starting or
//! running a VM, with the lower layers' errors as sources.

use std::path::PathBuf;

use crate::boot::cmdline::CmdlineError;
use crate::boot::BootError;
use crate::devices::bus::BusError;
use crate::devices::fs::ShareError;
use crate::memory::MemoryError;
use crate::vstate::kvm::KvmError;
use crate::vstate::vcpu::{VcpuRunError, VcpuSetupError};
use crate::vstate::vm::VmError;

/// Errors starting or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The configuration is unusable as given.
    #[error("invalid VM configuration: {0}")]
    InvalidConfig(String),
    /// KVM is missing or lacks something tern needs.
    #[error("KVM is not usable")]
    Kvm(#[from] KvmError),
    /// Guest RAM could not be created.
    #[error("cannot create guest memory")]
    Memory(#[from] MemoryError),
    /// The VM could not be created or wired up.
    #[error("cannot set up the KVM VM")]
    Vm(#[from] VmError),
    /// The kernel command line is unusable.
    #[error("cannot build the kernel command line")]
    Cmdline(#[from] CmdlineError),
    /// The kernel, initramfs or boot structures could not be loaded.
    #[error("cannot prepare the guest for boot")]
    Boot(#[from] BootError),
    /// A device could not be placed on a bus.
    #[error("cannot place a device on the bus")]
    Bus(#[from] BusError),
    /// A device could not be created.
    #[error("cannot set up the {device} device")]
    Device {
        device: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The serial console's output could not be opened.
    #[error("cannot open the console output {path}")]
    Console {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A vCPU could not be set up.
    #[error("cannot set up a vCPU")]
    VcpuSetup(#[from] VcpuSetupError),
    /// An eventfd for an interrupt or a queue notification could not be created.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// A VMM thread could not be started.
    #[error("cannot start the {0} thread")]
    Thread(&'static str, #[source] std::io::Error),
    /// A share could not be added or removed.
    #[error("cannot change the VM's fs shares")]
    FsShare(#[from] ShareError),
    /// A watchable share's host tree could not be watched.
    #[error("cannot watch a share for changes")]
    Watch(#[from] crate::fs_watcher::WatchError),
    /// The VM has ended; it can no longer be changed.
    #[error("the VM is not running")]
    NotRunning,
    /// A VMM thread made a syscall outside its seccomp allowlist (`[vmm] seccomp = "trap"`).
    #[error("the VM was stopped: {0}")]
    Seccomp(crate::seccomp::SeccompViolation),
    /// A vCPU failed while running the guest.
    #[error("vCPU {index} stopped the VM")]
    Vcpu {
        index: u8,
        #[source]
        source: VcpuRunError,
    },
}
