//! A sandbox: one microVM started in this process plus the client for its agent.
//!
//! Owns a private run directory (the vsock socket lives there); dropping the sandbox stops the
//! VM, joins its threads and removes the directory, so nothing leaks on any exit path.

use crate::agent::{AgentClient, AgentError};
use crate::config::Config;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
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
    #[error("the VM ended before its agent answered ({0}); see the console log")]
    VmGone(String),
    #[error("the agent never became ready")]
    Agent(#[source] AgentError),
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
    vm: VmHandle,
    agent: AgentClient,
    timeline: BootTimeline,
    run_dir: tempfile::TempDir,
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
        let kernel = config.kernel_path();
        let initrd = config.initrd_path();
        if !kernel.is_file() {
            return Err(SandboxError::MissingKernel(kernel));
        }
        if !initrd.is_file() {
            return Err(SandboxError::MissingInitrd(initrd));
        }
        let run_dir = run_dir().map_err(SandboxError::RunDir)?;
        let uds_path = run_dir.path().join("vsock.sock");
        let vm_config = VmConfig {
            vcpus: config.vm.vcpus,
            memory_mib: config.vm.memory_mib,
            kernel,
            initrd: Some(initrd),
            // The agent's periodic resync of watchable mounts follows the same setting.
            cmdline: format!(
                "{} tern.watch_resync={}",
                config.vm.kernel_cmdline, config.fs.resync_interval_secs
            ),
            console: console_output(&config.vm.console_log),
            vsock: Some(VsockConfig { guest_cid: config.vm.guest_cid, uds_path: uds_path.clone() }),
            fs_shares: shares,
            fs_device,
            watch_resync_interval: Duration::from_secs(config.fs.resync_interval_secs),
        };
        let vmm_start = Instant::now();
        let vm = Vmm::start(vm_config).map_err(SandboxError::Start)?;
        let agent = AgentClient::new(uds_path);
        let timeout = Duration::from_secs(config.vm.agent_timeout_secs);
        let ready = agent.wait_ready(timeout, || match vm.wait_timeout(Duration::ZERO) {
            Some(Ok(exit)) => Some(format!("{exit:?}")),
            Some(Err(e)) => Some(error_chain(&e)),
            None => None,
        });
        let agent_ready = Instant::now();
        match ready {
            Ok(version) => tracing::debug!(%version, "agent ready"),
            Err(AgentError::VmGone(reason)) => return Err(SandboxError::VmGone(reason)),
            Err(e) => return Err(SandboxError::Agent(e)),
        }
        let timeline = BootTimeline { vmm_start, kernel_entry: vm.timings().vcpus_started, agent_ready };
        Ok(Sandbox { vm, agent, timeline, run_dir })
    }

    pub fn agent(&self) -> &AgentClient {
        &self.agent
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
    pub fn shutdown(self, grace: Duration) -> Result<VmExit, VmmError> {
        if let Err(e) = self.agent.shutdown() {
            tracing::warn!(error = %e, "agent shutdown request failed; stopping the VM");
            self.vm.stop();
        }
        match self.vm.wait_timeout(grace) {
            Some(result) => result,
            None => {
                tracing::warn!(?grace, "guest did not power off in time; stopping the VM");
                self.vm.stop();
                self.vm.wait()
            }
        }
    }
}

/// A private directory for one sandbox's sockets: under `$TERN_RUN_DIR`, else `/run/tern/vm`
/// when writable, else the temp dir.
fn run_dir() -> std::io::Result<tempfile::TempDir> {
    let base = std::env::var_os("TERN_RUN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/tern/vm"));
    match std::fs::create_dir_all(&base) {
        Ok(()) => tempfile::Builder::new().prefix("vm-").tempdir_in(&base),
        Err(_) => tempfile::Builder::new().prefix("tern-vm-").tempdir(),
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

/// "outer: inner: innermost" for an error and its sources.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}
