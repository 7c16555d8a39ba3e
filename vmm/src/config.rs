//! What a VM is made of, as the runtime describes it to [`crate::api::Vmm::start`].

use std::path::PathBuf;

use crate::devices::fs::ShareConfig;

/// Everything needed to start a VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Number of vCPUs (1 to [`MAX_VCPUS`](crate::api::MAX_VCPUS)).
    pub vcpus: u8,
    /// Guest RAM in MiB (at least [`MIN_MEMORY_MIB`](crate::api::MIN_MEMORY_MIB)).
    pub memory_mib: u32,
    /// Guest kernel: an ELF `vmlinux` or a `bzImage`.
    pub kernel: PathBuf,
    /// Initramfs (a cpio archive, optionally compressed).
    pub initrd: Option<PathBuf>,
    /// Extra kernel arguments, appended after tern's defaults and the device entries.
    pub cmdline: String,
    /// Where the serial console goes.
    pub console: ConsoleOutput,
    /// The vsock device, if any.
    pub vsock: Option<VsockConfig>,
    /// Host directories shared with the guest at boot through the virtio-fs device.
    pub fs_shares: Vec<ShareConfig>,
    /// Create the virtio-fs device even without shares, so that shares can be added later
    /// with `VmHandle::add_fs_share`. The device (one per VM, tag `tern`) exists iff this is
    /// true or `fs_shares` is not empty; a VM without it cannot gain one later, since virtio-mmio
    /// devices are fixed at boot.
    pub fs_device: bool,
    /// How often the host watcher sends a full resync of every watchable share, the safety
    /// net under change records (default [`tern_change_records::DEFAULT_RESYNC_INTERVAL`]).
    pub watch_resync_interval: std::time::Duration,
    /// One virtio-net device per entry, in this order (after vsock and virtio-fs in the
    /// virtio-mmio slots). Their queues run on a `tern-net` thread of their own, started only
    /// when this is not empty.
    pub net: Vec<NetConfig>,
    /// What a VMM thread's seccomp filter does with a syscall outside its role's allowlist
    /// (see [`crate::seccomp`]); every VMM thread is filtered unless this is `Off`.
    pub seccomp: crate::seccomp::SeccompMode,
}

impl VmConfig {
    /// Whether the VM gets a virtio-fs device (see [`VmConfig::fs_device`]).
    pub fn has_fs_device(&self) -> bool {
        self.fs_device || !self.fs_shares.is_empty()
    }
}

/// Destination of the guest's serial console.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleOutput {
    /// The VMM process's standard output.
    Stdout,
    /// The VMM process's standard error.
    Stderr,
    /// Appended to a file (created if missing).
    File(PathBuf),
    /// Thrown away.
    Discard,
}

/// A virtio-vsock device whose host side is a unix socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's context id (3 or more; 0–2 are reserved).
    pub guest_cid: u32,
    /// Host unix socket: clients connect and send `CONNECT <port>\n`.
    pub uds_path: PathBuf,
}

/// A virtio-net device backed by a host tap.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// The tap, opened by the caller with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` (in the pod's
    /// netns). The device keeps a duplicate and makes the open file non-blocking; on activation
    /// it sets the vnet header size (12) and the offloads the guest acked.
    pub tap: std::sync::Arc<std::os::fd::OwnedFd>,
    /// The guest interface's MAC address (unicast).
    pub mac: [u8; 6],
    /// The guest interface's MTU (68 or more).
    pub mtu: u16,
    /// The host tap's name: used in logs and as the `device` label of the net metrics, so
    /// unique within a VM.
    pub name: String,
}
