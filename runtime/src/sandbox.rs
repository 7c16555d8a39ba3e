//! A sandbox: one microVM started in this process plus the client for its agent.
//!
//! Owns a run directory ([`SandboxDir`]: the vsock socket lives there); dropping the sandbox
//! stops the VM, joins its threads and removes the directory, so nothing leaks on any exit
//! path of this process. A process that is SIGKILLed runs no destructor: that is why every
//! run directory records its owner process, so the next `tern run` or shim `start` reaps it
//! (see [`crate::run_dir`]), and why the shim's sandboxes use a *named* directory whose path
//! follows from the sandbox's namespace and id, which containerd's `shim delete` (a new
//! process) can find and remove at once.

use crate::agent::{AgentClient, AgentError};
use crate::config::Config;
use crate::network::SandboxNetwork;
pub use crate::run_dir::SandboxDir;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tern_sync::LockExt;
use vmm::api::{ConsoleOutput, ShareConfig, VmConfig, VmExit, VmHandle, Vmm, VmmError, VsockConfig};

/// Errors creating or running a sandbox.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("guest kernel {0} not found (build it with `make kernel`, or set vm.kernel / --kernel)")]
    MissingKernel(PathBuf),
    #[error("initramfs {0} not found (build it with `make initramfs`, or set vm.initrd / --initrd)")]
    MissingInitrd(PathBuf),
    #[error("cannot create the sandbox run directory")]
    RunDir(#[source] std::io::Error),
    #[error("cannot start the VM")]
    Start(#[source] VmmError),
    #[error("the VM ended before its agent answered ({reason}); {report}")]
    VmGone { reason: String, report: GuestReport },
    #[error("the guest could not configure its network")]
    ConfigureNetwork(#[source] AgentError),
    #[error("the boot was cancelled ({0})")]
    Cancelled(String),
    #[error("the agent never became ready ({report})")]
    Agent {
        report: GuestReport,
        #[source]
        source: AgentError,
    },
}

/// Console lines a [`GuestReport`] quotes.
const REPORT_CONSOLE_LINES: usize = 8;
/// Characters of one quoted console line.
const REPORT_LINE_CHARS: usize = 160;

/// What a guest whose agent never answered had done: enough to tell a guest that never ran
/// (no exits), one whose vsock driver never came up (no vsock kicks) and one that printed a
/// panic (its last console lines, kept even when the console is discarded).
#[derive(Debug)]
pub struct GuestReport(String);

impl GuestReport {
    fn of(vm: &VmHandle) -> GuestReport {
        use vmm::ExitReason;
        let m = vm.metrics().snapshot();
        let exits: u64 = m.exits.iter().map(|(_, n)| n).sum();
        let virtio: u64 = m
            .exits
            .iter()
            .filter(|(r, _)| matches!(r, ExitReason::MmioRead | ExitReason::MmioWrite))
            .map(|(_, n)| n)
            .sum();
        let kicks: Vec<String> = m.vsock_queue_notifications.iter().map(u64::to_string).collect();
        GuestReport(format!(
            "guest: {exits} vCPU exits, {virtio} of them virtio register accesses; vsock queue kicks \
             rx/tx/event {}; {} vsock bytes from the guest; {}",
            kicks.join("/"),
            m.vsock_bytes_from_guest,
            console_excerpt(&vm.console_tail()),
        ))
    }
}

impl std::fmt::Display for GuestReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The last non-empty console lines, on one line ("console: a | b | c").
fn console_excerpt(tail: &str) -> String {
    let lines: Vec<&str> = tail.lines().map(str::trim_end).filter(|l| !l.trim().is_empty()).collect();
    if lines.is_empty() {
        return "the guest console is empty".to_string();
    }
    let quoted: Vec<String> = lines[lines.len().saturating_sub(REPORT_CONSOLE_LINES)..]
        .iter()
        .map(|l| l.chars().filter(|c| !c.is_control()).take(REPORT_LINE_CHARS).collect())
        .collect();
    format!("guest console ended with: {}", quoted.join(" | "))
}

/// Timestamps of one boot, for `--timings` and the benchmark.
#[derive(Debug, Clone, Copy)]
pub struct BootTimeline {
    pub vmm_start: Instant,
    pub kernel_entry: Option<Instant>,
    pub agent_ready: Instant,
}

/// A running microVM with a ready agent.
pub struct Sandbox {
    // Field order matters: the VM must stop before the run dir (holding its socket) goes.
    // Shared with the VM monitor thread (see `spawn_vm_monitor`).
    vm: Arc<VmHandle>,
    /// Joined once the VM has ended, so no thread outlives the sandbox. In a mutex so that
    /// [`Sandbox::shutdown`] works on a shared sandbox (the shim's `Arc<Sandbox>`); taken out
    /// before joining, never held across the join.
    monitor: Mutex<Option<std::thread::JoinHandle<()>>>,
    agent: AgentClient,
    timeline: BootTimeline,
    /// Held only to be dropped, after the VM (fields drop in order): the VM's taps must be
    /// closed before the namespace is disconnected.
    _network: Option<SandboxNetwork>,
    run_dir: SandboxDir,
}

impl Sandbox {
    /// Boot a VM as `config` says and wait until its agent answers a health check.
    pub fn boot(config: &Config) -> Result<Sandbox, SandboxError> {
        Sandbox::boot_with_shares(config, Vec::new(), false)
    }

    /// [`Sandbox::boot`] with host directories shared from the start. With `fs_device` the
    /// virtio-fs device exists even without shares, so [`Sandbox::add_fs_share`] works later.
    pub fn boot_with_shares(
        config: &Config,
        shares: Vec<ShareConfig>,
        fs_device: bool,
    ) -> Result<Sandbox, SandboxError> {
        let run_dir = SandboxDir::private().map_err(SandboxError::RunDir)?;
        Sandbox::boot_in(config, shares, fs_device, run_dir, None)
    }

    /// [`Sandbox::boot_with_shares`] in a given run directory (the shim's named one), with the
    /// pod network's taps as the VM's NICs; the agent configures them before this returns.
    pub fn boot_in(
        config: &Config,
        shares: Vec<ShareConfig>,
        fs_device: bool,
        run_dir: SandboxDir,
        network: Option<SandboxNetwork>,
    ) -> Result<Sandbox, SandboxError> {
        Sandbox::boot_cancellable(config, shares, fs_device, run_dir, network, &|| None)
    }

    /// [`Sandbox::boot_in`], giving up with [`SandboxError::Cancelled`] (the VM stopped, its
    /// run directory removed) as soon as `cancelled` returns a reason while the guest boots:
    /// `tern run` interrupted by a signal.
    pub fn boot_cancellable(
        config: &Config,
        shares: Vec<ShareConfig>,
        fs_device: bool,
        run_dir: SandboxDir,
        network: Option<SandboxNetwork>,
        cancelled: &dyn Fn() -> Option<String>,
    ) -> Result<Sandbox, SandboxError> {
        let kernel = config.kernel_path();
        let initrd = config.initrd_path();
        if !kernel.is_file() {
            return Err(SandboxError::MissingKernel(kernel));
        }
        if !initrd.is_file() {
            return Err(SandboxError::MissingInitrd(initrd));
        }
        if let Some(network) = network.as_ref().filter(|n| !n.is_empty()) {
            // Should this process be SIGKILLed, whoever reaps the directory disconnects it.
            run_dir.record_netns(network.netns()).map_err(SandboxError::RunDir)?;
        }
        let uds_path = run_dir.path().join(crate::run_dir::VSOCK_SOCKET);
        let vm_config = VmConfig {
            vcpus: config.vm.vcpus,
            memory_mib: config.vm.memory_mib,
            kernel,
            initrd: Some(initrd),
            // The agent's periodic resync of watchable mounts follows the same setting.
            cmdline: format!("{} tern.watch_resync={}", config.vm.kernel_cmdline, config.fs.resync_interval_secs),
            console: console_output(&config.vm.console_log),
            vsock: Some(VsockConfig { guest_cid: config.vm.guest_cid, uds_path: uds_path.clone() }),
            fs_shares: shares,
            fs_device,
            watch_resync_interval: Duration::from_secs(config.fs.resync_interval_secs),
            net: network.as_ref().map(SandboxNetwork::vm_devices).unwrap_or_default(),
            seccomp: config.vmm.seccomp,
        };
        let vmm_start = Instant::now();
        let vm = Vmm::start(vm_config).map_err(SandboxError::Start)?;
        let agent = AgentClient::new(uds_path);
        let timeout = Duration::from_secs(config.vm.agent_timeout_secs);
        let mut cancel_reason = None;
        let ready = agent.wait_ready(timeout, || {
            if let Some(reason) = cancelled() {
                cancel_reason = Some(reason.clone());
                return Some(reason);
            }
            match vm.wait_timeout(Duration::ZERO) {
                Some(Ok(exit)) => Some(format!("{exit:?}")),
                Some(Err(e)) => Some(error_chain(&e)),
                None => None,
            }
        });
        let agent_ready = Instant::now();
        if let Some(reason) = cancel_reason {
            // Dropping the handle stops the VM; the run directory goes after it.
            drop(vm);
            return Err(SandboxError::Cancelled(reason));
        }
        match ready {
            Ok(version) => tracing::debug!(%version, "agent ready"),
            Err(AgentError::VmGone(reason)) => {
                return Err(SandboxError::VmGone { reason, report: GuestReport::of(&vm) })
            }
            Err(source) => {
                let report = GuestReport::of(&vm);
                return Err(SandboxError::Agent { report, source });
            }
        }
        if let Some(network) = network.as_ref().filter(|n| !n.is_empty()) {
            agent.configure_network(network.guest_config()).map_err(SandboxError::ConfigureNetwork)?;
            tracing::debug!(netns = %network.netns().display(), "guest network configured");
        }
        let timeline = BootTimeline { vmm_start, kernel_entry: vm.timings().vcpus_started, agent_ready };
        let vm = Arc::new(vm);
        let monitor = spawn_vm_monitor(Arc::clone(&vm));
        Ok(Sandbox { vm, monitor: Mutex::new(monitor), agent, timeline, _network: network, run_dir })
    }

    pub fn agent(&self) -> &AgentClient {
        &self.agent
    }

    /// The VM's counters (vCPU exits, virtio queues, fs requests, vsock bytes), for metrics.
    pub fn vm_metrics(&self) -> std::sync::Arc<vmm::VmMetrics> {
        self.vm.metrics()
    }

    /// The host watcher's counters, while a watchable share exists.
    pub fn watcher_counters(&self) -> Option<vmm::api::WatcherCounters> {
        self.vm.watcher_counters()
    }

    pub fn timeline(&self) -> BootTimeline {
        self.timeline
    }

    pub fn run_dir(&self) -> &Path {
        self.run_dir.path()
    }

    /// Share another host directory with the running guest (then ask the agent to mount it).
    pub fn add_fs_share(&self, share: ShareConfig) -> Result<(), VmmError> {
        self.vm.add_fs_share(share)
    }

    /// Stop sharing `name` (after the agent unmounted it).
    pub fn remove_fs_share(&self, name: &str) -> Result<(), VmmError> {
        self.vm.remove_fs_share(name)
    }

    /// Ask the agent to power off and wait up to `grace` for the VM to end; force it otherwise.
    /// Takes `&self` so a shared sandbox can be stopped while a straggling request still holds
    /// a reference (that request then fails on the dead VM).
    pub fn shutdown(&self, grace: Duration) -> Result<VmExit, VmmError> {
        if let Err(e) = self.agent.shutdown() {
            tracing::warn!(error = %e, "agent shutdown request failed; stopping the VM");
            self.vm.stop();
        }
        let exit = match self.vm.wait_timeout(grace) {
            Some(result) => result,
            None => {
                tracing::warn!(?grace, "guest did not power off in time; stopping the VM");
                self.vm.stop();
                self.vm.wait()
            }
        };
        self.join_monitor();
        // The VM is gone, and its socket with it: the run directory goes now, not only when the
        // last reference to a shared sandbox drops (the shim may exit before that).
        self.run_dir.remove();
        exit
    }

    /// Wait for the monitor thread, which ends right after the VM (call once the VM ended).
    fn join_monitor(&self) {
        let monitor = self.monitor.lock_unpoisoned().take();
        if let Some(monitor) = monitor {
            if monitor.join().is_err() {
                tracing::warn!("the VM monitor thread panicked");
            }
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // The monitor thread holds the handle too; stopping here keeps "dropping the sandbox
        // stops the VM" true and lets that thread end.
        self.vm.stop();
        self.join_monitor();
    }
}

/// Watch the VM from a thread of its own: when the guest ends by itself (a kernel panic
/// resets it, a triple fault, a vCPU error), tear the VM down at once. That closes the host
/// ends of every vsock connection, so an agent call blocked on the dead guest (the shim's
/// `Wait`) fails now instead of hanging forever.
fn spawn_vm_monitor(vm: Arc<VmHandle>) -> Option<std::thread::JoinHandle<()>> {
    let spawned = std::thread::Builder::new().name("vm-monitor".into()).spawn(move || match vm.wait() {
        Ok(exit) => tracing::info!(?exit, "the VM ended"),
        Err(e) => tracing::warn!(error = %error_chain(&e), "the VM ended with an error"),
    });
    match spawned {
        Ok(handle) => Some(handle),
        Err(e) => {
            tracing::warn!(error = %e, "cannot start the VM monitor thread; a dead guest is noticed only on shutdown");
            None
        }
    }
}

fn console_output(setting: &str) -> ConsoleOutput {
    match setting {
        "" => ConsoleOutput::Discard,
        "stderr" => ConsoleOutput::Stderr,
        "stdout" => ConsoleOutput::Stdout,
        path => ConsoleOutput::File(PathBuf::from(path)),
    }
}

pub use tern_protocol::error_chain;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn console_excerpt_quotes_the_last_lines_on_one_line() {
        assert_eq!(console_excerpt(""), "the guest console is empty");
        assert_eq!(console_excerpt("\r\n  \n"), "the guest console is empty");
        let tail: String = (1..=20).map(|i| format!("line {i}\r\n")).collect();
        let excerpt = console_excerpt(&tail);
        assert_eq!(
            excerpt,
            "guest console ended with: line 13 | line 14 | line 15 | line 16 | line 17 | line 18 | line 19 | line 20"
        );
        // Control characters go; long lines are cut.
        assert_eq!(console_excerpt("\u{1b}[0mok\tdone\n"), "guest console ended with: [0mokdone");
        let long = format!("{}\n", "x".repeat(500));
        assert_eq!(console_excerpt(&long), format!("guest console ended with: {}", "x".repeat(160)));
    }
}
