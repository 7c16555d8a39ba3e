//! The typed surface the runtime uses: describe a VM ([`VmConfig`]), start it
//! ([`Vmm::start`]), and drive it through the returned [`VmHandle`]. Errors are values;
//! nothing here panics the caller. Dropping the handle stops the VM and joins its threads.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tern_sync::LockExt;

use crate::builder::{self, RunningVm};
pub use crate::config::{ConsoleOutput, NetConfig, VmConfig, VsockConfig};
pub use crate::devices::fs::{CachePolicy, ShareConfig, ShareError, UnknownCachePolicy};
use crate::devices::legacy::ConsoleTail;
pub use crate::devices::legacy::TAIL_BYTES as CONSOLE_TAIL_BYTES;
pub use crate::error::VmmError;
use crate::fs_watcher::ShareWatchers;
pub use crate::fs_watcher::WatcherCounters;
pub use crate::layout::{MAX_VCPUS, MIN_MEMORY_MIB};
use crate::lifecycle::{VmFault, VmLifecycle, VmOutcome};
use crate::metrics::VmMetrics;
pub use crate::seccomp::{
    kept_capabilities, kept_capability_mask, probe as probe_seccomp, SeccompError, SeccompMode, SeccompRole,
    SeccompViolation,
};
pub use crate::vstate::vcpu::VmExit;

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
    outcome.map_err(|fault| match fault {
        VmFault::Vcpu(fault) => VmmError::Vcpu { index: fault.index, source: fault.error },
        VmFault::Seccomp(violation) => VmmError::Seccomp(violation),
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

    /// Bytes of console output lost because [`VmConfig::console`]'s destination could not keep
    /// up (the guest never waits for its console).
    pub fn console_dropped_bytes(&self) -> u64 {
        self.console_tail.dropped_bytes()
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
        let running = self.running.lock_unpoisoned();
        Ok(running.as_ref().ok_or(VmmError::NotRunning)?.watchers())
    }

    /// The shares of the running VM, by name.
    pub fn fs_shares_list(&self) -> Result<Vec<ShareConfig>, VmmError> {
        Ok(self.fs_shares()?.list())
    }

    fn fs_shares(&self) -> Result<Arc<crate::devices::fs::FsShares>, VmmError> {
        let running = self.running.lock_unpoisoned();
        let vm = running.as_ref().ok_or(VmmError::NotRunning)?;
        vm.fs_shares().ok_or(VmmError::FsShare(ShareError::NoDevice))
    }

    /// Join the vCPUs, stop the event loop and release devices, memory and the VM, once.
    /// Concurrent callers wait here until it is done.
    fn tear_down(&self) {
        let mut running = self.running.lock_unpoisoned();
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
    use crate::vstate::vcpu::VcpuRunError;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn handle_and_config_cross_threads() {
        assert_send_sync::<VmHandle>();
        assert_send_sync::<VmConfig>();
        assert_send_sync::<VmmError>();
    }

    #[test]
    fn vcpu_faults_become_errors() {
        let fault = crate::lifecycle::VcpuFault { index: 1, error: VcpuRunError::GuestCrash };
        let err = outcome_to_result(Err(VmFault::Vcpu(fault))).unwrap_err();
        assert!(matches!(err, VmmError::Vcpu { index: 1, source: VcpuRunError::GuestCrash }));
        assert_eq!(err.to_string(), "vCPU 1 stopped the VM");
    }
}
