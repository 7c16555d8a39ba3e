//! The typed surface the runtime uses: describe a VM ([`VmConfig`]), start it
//! ([`Vmm::start`]), and drive it through the returned [`VmHandle`]. Errors are values;
//! nothing here panics the caller. Dropping the handle stops the VM and joins its threads.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::boot::cmdline::CmdlineError;
use crate::boot::BootError;
use crate::builder::{self, RunningVm};
use crate::devices::bus::BusError;
pub use crate::devices::legacy::TAIL_BYTES as CONSOLE_TAIL_BYTES;
use crate::devices::legacy::ConsoleTail;
pub use crate::devices::fs::watcher::WatcherCounters;
use crate::devices::fs::watcher::ShareWatchers;
pub use crate::devices::fs::{CachePolicy, ShareConfig, ShareError};
use crate::lifecycle::{VmLifecycle, VmOutcome};
use crate::metrics::VmMetrics;
use crate::vstate::kvm::KvmError;
use crate::vstate::memory::MemoryError;
use crate::vstate::vcpu::{VcpuRunError, VcpuSetupError};
use crate::vstate::vm::VmError;

/// Everything needed to start a VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Number of vCPUs (1 to [`MAX_VCPUS`](crate::boot::layout::MAX_VCPUS)).
    pub vcpus: u8,
    /// Guest RAM in MiB (at least [`MIN_MEMORY_MIB`](crate::boot::layout::MIN_MEMORY_MIB)).
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
    /// with [`VmHandle::add_fs_share`]. The device (one per VM, tag `tern`) exists iff this is
    /// true or `fs_shares` is not empty; a VM without it cannot gain one later, since virtio-mmio
    /// devices are fixed at boot.
    pub fs_device: bool,
    /// How often the host watcher sends a full resync of every watchable share, the safety
    /// net under change records (default [`tern_protocol::watch::DEFAULT_RESYNC_INTERVAL`]).
    pub watch_resync_interval: std::time::Duration,
    /// One virtio-net device per entry, in this order (after vsock and virtio-fs in the
    /// virtio-mmio slots). Their queues run on a `tern-net` thread of their own, started only
    /// when this is not empty.
    pub net: Vec<NetConfig>,
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

/// How a VM ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmExit {
    /// The guest asked for a reset (i8042 reset command, as with `reboot=k`).
    Reset,
    /// The guest shut down, triple-faulted (as with `reboot=t`) or halted for good.
    Shutdown,
    /// [`VmHandle::stop`] ended it.
    Stopped,
}

/// Points in a VM's life, for boot-time measurements.
#[derive(Debug, Clone, Copy)]
pub struct BootTimings {
    /// When [`Vmm::start`] was called.
    pub vmm_start: Instant,
    /// When vCPU 0 first entered the guest (the kernel's first instruction).
    pub vcpus_started: Option<Instant>,
    /// When the VM's outcome was decided.
    pub exit: Option<Instant>,
}

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
    Watch(#[from] crate::devices::fs::watcher::WatchError),
    /// The VM has ended; it can no longer be changed.
    #[error("the VM is not running")]
    NotRunning,
    /// A vCPU failed while running the guest.
    #[error("vCPU {index} stopped the VM")]
    Vcpu {
        index: u8,
        #[source]
        source: VcpuRunError,
    },
}

/// Which KVM implementation the host runs, as far as loaded modules tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvmKind {
    /// Intel VT-x (`kvm_intel`).
    Intel,
    /// AMD SVM (`kvm_amd`).
    Amd,
    /// `kvm_pvm`: a paravirtual KVM that cannot boot unmodified Linux guests.
    Pvm,
    /// None of the above is a loaded module (e.g. KVM built into the kernel).
    Unknown,
}

/// What `/dev/kvm` on this host offers (see [`probe_kvm`]).
#[derive(Debug, Clone)]
pub struct KvmProbe {
    /// KVM API version (tern needs 12).
    pub api_version: i32,
    /// Required capabilities that are missing (empty when all are there).
    pub missing_capabilities: Vec<&'static str>,
    /// The KVM implementation.
    pub kind: KvmKind,
}

/// Inspect the host's KVM without creating a VM, reporting every problem rather than the first.
pub fn probe_kvm() -> Result<KvmProbe, VmmError> {
    let report = crate::vstate::kvm::report()?;
    let module = |name: &str| std::path::Path::new("/sys/module").join(name).exists();
    // kvm_pvm first: a host may load it beside a hardware module that cannot be used.
    let kind = if module("kvm_pvm") {
        KvmKind::Pvm
    } else if module("kvm_intel") {
        KvmKind::Intel
    } else if module("kvm_amd") {
        KvmKind::Amd
    } else {
        KvmKind::Unknown
    };
    Ok(KvmProbe { api_version: report.api_version, missing_capabilities: report.missing_capabilities, kind })
}

/// Starts VMs.
pub struct Vmm;

impl Vmm {
    /// Build and start a VM: its vCPU threads are running the kernel when this returns.
    pub fn start(config: VmConfig) -> Result<VmHandle, VmmError> {
        let vmm_start = Instant::now();
        let lifecycle = Arc::new(VmLifecycle::new());
        let metrics = Arc::new(VmMetrics::default());
        let running = builder::build_and_start(&config, lifecycle.clone(), metrics.clone())?;
        Ok(VmHandle {
            lifecycle,
            console_tail: running.console_tail(),
            running: Mutex::new(Some(running)),
            vmm_start,
            metrics,
        })
    }
}

/// A running (or ended) VM. Owns its threads; dropping it stops and joins everything.
pub struct VmHandle {
    lifecycle: Arc<VmLifecycle>,
    running: Mutex<Option<RunningVm>>,
    vmm_start: Instant,
    metrics: Arc<VmMetrics>,
    console_tail: Arc<ConsoleTail>,
}

fn outcome_to_result(outcome: VmOutcome) -> Result<VmExit, VmmError> {
    outcome.map_err(|fault| VmmError::Vcpu {
        index: fault.index,
        source: fault.error,
    })
}

impl VmHandle {
    /// Block until the VM ends; its threads are joined when this returns.
    pub fn wait(&self) -> Result<VmExit, VmmError> {
        let outcome = self.lifecycle.wait();
        self.tear_down();
        outcome_to_result(outcome)
    }

    /// Like [`wait`](Self::wait), giving up after `timeout` (`None`: still running).
    pub fn wait_timeout(&self, timeout: Duration) -> Option<Result<VmExit, VmmError>> {
        let outcome = self.lifecycle.wait_timeout(timeout)?;
        self.tear_down();
        Some(outcome_to_result(outcome))
    }

    /// Force the VM down and join its threads. Idempotent; if the VM had not ended yet,
    /// [`wait`](Self::wait) then returns [`VmExit::Stopped`].
    pub fn stop(&self) {
        self.lifecycle.finish(Ok(VmExit::Stopped));
        self.tear_down();
    }

    /// Boot timestamps so far.
    pub fn timings(&self) -> BootTimings {
        BootTimings {
            vmm_start: self.vmm_start,
            vcpus_started: self.lifecycle.first_guest_entry(),
            exit: self.lifecycle.exit_time(),
        }
    }

    /// Share a host directory with the running guest at `GUEST_SHARES_ROOT/<share.name>`.
    /// Needs the virtio-fs device ([`VmConfig::fs_device`]); the name must be unused.
    /// A share with `watch` also gets a host watcher pushing change records to the agent.
    pub fn add_fs_share(&self, share: ShareConfig) -> Result<(), VmmError> {
        let shares = self.fs_shares()?;
        let watch = share.watch.then(|| (share.name.clone(), share.host_dir.clone()));
        shares.add(share)?;
        if let Some((name, host_dir)) = watch {
            if let Err(e) = self.watchers()?.watch(&name, &host_dir) {
                let _ = shares.remove(&name);
                return Err(e.into());
            }
        }
        Ok(())
    }

    /// Stop sharing `name`. The guest should unmount it first: its open files fail from now on.
    pub fn remove_fs_share(&self, name: &str) -> Result<(), VmmError> {
        let shares = self.fs_shares()?;
        self.watchers()?.unwatch(name);
        shares.remove(name)?;
        Ok(())
    }

    /// The last bytes (up to [`CONSOLE_TAIL_BYTES`]) the guest wrote to its serial console,
    /// whatever [`VmConfig::console`] says; readable after the VM ended. For error reports.
    pub fn console_tail(&self) -> String {
        self.console_tail.text()
    }

    /// The VM's counters (vCPU exits, queue notifications, fs requests, vsock bytes, traffic
    /// per net device). They stay readable after the VM ended.
    pub fn metrics(&self) -> Arc<VmMetrics> {
        self.metrics.clone()
    }

    /// What the host watcher of watchable shares has done (`None`: no watcher running).
    pub fn watcher_counters(&self) -> Option<WatcherCounters> {
        self.watchers().ok()?.counters()
    }

    fn watchers(&self) -> Result<Arc<ShareWatchers>, VmmError> {
        let running = self.running.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        Ok(running.as_ref().ok_or(VmmError::NotRunning)?.watchers())
    }

    /// The shares of the running VM, by name.
    pub fn fs_shares_list(&self) -> Result<Vec<ShareConfig>, VmmError> {
        Ok(self.fs_shares()?.list())
    }

    fn fs_shares(&self) -> Result<Arc<crate::devices::fs::FsShares>, VmmError> {
        let running = self.running.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let vm = running.as_ref().ok_or(VmmError::NotRunning)?;
        vm.fs_shares().ok_or(VmmError::FsShare(ShareError::NoDevice))
    }

    /// Join the vCPUs, stop the event loop and release devices, memory and the VM, once.
    /// Concurrent callers wait here until it is done.
    fn tear_down(&self) {
        let mut running = self
            .running
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(vm) = running.take() {
            self.lifecycle.join_vcpus();
            vm.shut_down();
        }
    }
}

impl Drop for VmHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn handle_and_config_cross_threads() {
        assert_send_sync::<VmHandle>();
        assert_send_sync::<VmConfig>();
        assert_send_sync::<VmmError>();
    }

    #[test]
    fn vcpu_faults_become_errors() {
        let fault = crate::lifecycle::VcpuFault {
            index: 1,
            error: VcpuRunError::GuestCrash,
        };
        let err = outcome_to_result(Err(fault)).unwrap_err();
        assert!(matches!(
            err,
            VmmError::Vcpu {
                index: 1,
                source: VcpuRunError::GuestCrash
            }
        ));
        assert_eq!(err.to_string(), "vCPU 1 stopped the VM");
    }
}
