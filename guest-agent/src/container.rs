//! Containers in the guest, created with youki's `libcontainer` from the OCI spec the host
//! sent (`StartContainer`). The container's init process is registered in the
//! [`ProcessTable`] like any `Exec` process, so `Wait`, `Signal`, `CloseStdin` and the stdio
//! streams work the same for both.
//!
//! For each container the agent writes the spec as `config.json` into a bundle directory of
//! its own ([`BUNDLES_ROOT`]`/<id>`; the rootfs is wherever `root.path` says, normally a
//! virtio-fs share), then builds the container with stdio on pipes, without systemd, and with
//! `no_pivot`: the guest's root is the initramfs, which `pivot_root` cannot leave, so
//! libcontainer moves the rootfs over `/` and chroots instead (runc's `--no-pivot`).
//!
//! # Reaping
//!
//! libcontainer forks an intermediate process and `waitpid`s it itself, and the container's
//! init is re-parented to us (PID 1) when the intermediate exits. Building runs inside
//! [`ProcessTable::spawn_with`], which keeps the reaper from reaping while it runs; the init
//! pid is registered before the reaper may look at it again, so its exit is never lost.
//!
//! # Seccomp
//!
//! libcontainer (its libseccomp feature, libseccomp linked statically) loads the spec's
//! `linux.seccomp` in the container's init and in every exec, where runc does; the agent checks
//! and adapts the profile first ([`crate::seccomp`]), so a profile it cannot enforce fails the
//! start by name.
//!
//! # Execs, terminals, cgroups
//!
//! `ExecInContainer` runs another process in a started container with libcontainer's tenant
//! builder (it joins the init's namespaces, root and cgroup). A process whose OCI `process`
//! says `terminal` gets a pty from libcontainer over a console socket ([`crate::pty`]).
//! [`Containers`] remembers each started container's cgroup v2 directory for pause/resume,
//! statistics, resource updates and OOM watching ([`crate::cgroups`]).

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use tern_sync::LockExt;

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::syscall::syscall::SyscallType;
use libcontainer::workload::default::DefaultExecutor;
use nix::fcntl::OFlag;
use tern_protocol::{CgroupStats, ContainerExecRequest, ContainerSpec, ResourceUpdate};
use tracing::{info, warn};

use crate::cgroups::{self, CgroupError};
use crate::process::{Pipes, ProcessError, ProcessTable};
use crate::pty::{ConsoleSocket, PtyError};

/// Where the agent writes each container's `config.json` (`<this>/<id>/config.json`).
pub const BUNDLES_ROOT: &str = "/run/tern/bundles";
/// libcontainer's state directory (one subdirectory per container).
pub const STATE_ROOT: &str = "/run/tern/libcontainer";

/// Errors starting a container; each fails that request only.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error(transparent)]
    Process(#[from] ProcessError),
    #[error("container id {0:?} is not a single path component")]
    InvalidId(String),
    #[error("the OCI spec is not valid JSON")]
    Spec(#[source] serde_json::Error),
    #[error("cannot write the container bundle {}", path.display())]
    Bundle {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create the container's pipes")]
    Pipe(#[source] std::io::Error),
    #[error("libcontainer could not create the container")]
    Create(#[source] libcontainer::error::LibcontainerError),
    #[error("libcontainer could not start the container")]
    Start(#[source] libcontainer::error::LibcontainerError),
    #[error("the created container has no pid")]
    NoPid,
    #[error("the process spec is not valid JSON")]
    ProcessSpec(#[source] serde_json::Error),
    #[error("no started container {0:?}")]
    UnknownContainer(String),
    #[error("container {0:?} is paused")]
    Paused(String),
    #[error("libcontainer could not start the exec process")]
    Exec(#[source] libcontainer::error::LibcontainerError),
    #[error("cannot set up the terminal")]
    Pty(#[from] PtyError),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error("the container's seccomp profile cannot be enforced")]
    Seccomp(#[from] tern_seccomp::ProfileError),
}

/// A started container as the agent tracks it beyond its init process.
#[derive(Debug, Clone)]
struct Started {
    cgroup: PathBuf,
    paused: bool,
}

/// The started containers: their cgroup directories and whether they are paused.
#[derive(Debug, Default)]
pub struct Containers {
    map: Mutex<HashMap<String, Started>>,
}

impl Containers {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Started>> {
        self.map.lock_unpoisoned()
    }

    fn get(&self, id: &str) -> Result<Started, ContainerError> {
        self.lock().get(id).cloned().ok_or_else(|| ContainerError::UnknownContainer(id.to_owned()))
    }

    fn set_paused(&self, id: &str, paused: bool) {
        if let Some(c) = self.lock().get_mut(id) {
            c.paused = paused;
        }
    }

    /// Freeze every process of the container and wait until the kernel says it is frozen.
    pub fn pause(&self, id: &str) -> Result<(), ContainerError> {
        let c = self.get(id)?;
        // Marked first, so an exec racing with the freeze is refused rather than frozen
        // half-way through its setup.
        self.set_paused(id, true);
        if let Err(e) = cgroups::set_frozen(&c.cgroup, true, cgroups::FREEZE_TIMEOUT) {
            let _ = cgroups::set_frozen(&c.cgroup, false, cgroups::FREEZE_TIMEOUT);
            self.set_paused(id, false);
            return Err(e.into());
        }
        info!(id, "container paused");
        Ok(())
    }

    pub fn resume(&self, id: &str) -> Result<(), ContainerError> {
        let c = self.get(id)?;
        cgroups::set_frozen(&c.cgroup, false, cgroups::FREEZE_TIMEOUT)?;
        self.set_paused(id, false);
        info!(id, "container resumed");
        Ok(())
    }

    /// Signal every process in the container's cgroup (`kill --all`); see [`cgroups::signal_all`].
    pub fn signal_all(&self, id: &str, signal: i32) -> Result<(), ContainerError> {
        crate::process::check_signal(signal)?;
        let n = cgroups::signal_all(&self.get(id)?.cgroup, signal)?;
        info!(id, signal, processes = n, "signalled every process of the container");
        Ok(())
    }

    /// Every process in the container's cgroup (and below it), sorted.
    pub fn pids(&self, id: &str) -> Result<Vec<i32>, ContainerError> {
        let mut pids = cgroups::pids_below(&self.get(id)?.cgroup)?;
        pids.sort_unstable();
        Ok(pids)
    }

    pub fn stats(&self, id: &str) -> Result<CgroupStats, ContainerError> {
        Ok(cgroups::read_stats(&self.get(id)?.cgroup)?)
    }

    pub fn update(&self, id: &str, update: &ResourceUpdate) -> Result<(), ContainerError> {
        cgroups::apply(&self.get(id)?.cgroup, update)?;
        info!(id, ?update, "container resources updated");
        Ok(())
    }

    /// Block until the container's cgroup records more than `seen` OOM kills.
    pub fn wait_oom(&self, id: &str, seen: u64) -> Result<u64, ContainerError> {
        Ok(cgroups::wait_oom(&self.get(id)?.cgroup, seen)?)
    }
}

/// Whether an OCI `process` object asks for a terminal.
fn wants_terminal(process: &serde_json::Value) -> bool {
    process.get("terminal").and_then(serde_json::Value::as_bool).unwrap_or(false)
}

/// [`crate::pty::terminal_pipes`], failing as a container start does.
fn terminal_pipes(master: File, stdin: bool) -> Result<Pipes, ContainerError> {
    crate::pty::terminal_pipes(master, stdin).map_err(ContainerError::Pipe)
}

/// A new container process's stdio: a pty whose master the process's runtime sends over a
/// console socket, or three pipes.
enum ProcessStdio {
    Terminal(ConsoleSocket),
    Pipes(StdioPipes),
}

impl ProcessStdio {
    /// A console socket at `console_path` for a terminal, pipes otherwise (stdin only if
    /// `stdin`, else `/dev/null`).
    fn new(terminal: bool, console_path: &Path, stdin: bool) -> Result<Self, ContainerError> {
        Ok(if terminal {
            ProcessStdio::Terminal(ConsoleSocket::bind(console_path)?)
        } else {
            ProcessStdio::Pipes(stdio_pipes(stdin)?)
        })
    }

    /// Give `builder` the process's ends; what the agent keeps comes back.
    fn hand_to(self, builder: ContainerBuilder) -> (ContainerBuilder, AgentStdio) {
        match self {
            ProcessStdio::Terminal(console) => {
                let builder = builder.with_console_socket(Some(console.path()));
                (builder, AgentStdio::Terminal(console))
            }
            ProcessStdio::Pipes(StdioPipes { child: [i, o, e], parent }) => {
                (builder.with_stdin(i).with_stdout(o).with_stderr(e), AgentStdio::Pipes(parent))
            }
        }
    }
}

/// The agent's side of a process's stdio, until the process exists.
enum AgentStdio {
    Terminal(ConsoleSocket),
    Pipes(Pipes),
}

impl AgentStdio {
    /// The agent's ends, once the process has started: for a terminal, the pty master it sent.
    fn into_pipes(self, stdin: bool) -> Result<Pipes, ContainerError> {
        match self {
            AgentStdio::Terminal(console) => console
                .receive_master(crate::pty::MASTER_TIMEOUT)
                .map_err(ContainerError::from)
                .and_then(|master| terminal_pipes(master, stdin)),
            AgentStdio::Pipes(pipes) => Ok(pipes),
        }
    }
}

/// The ends of a non-terminal process's stdio: the container's (child) ends and ours.
struct StdioPipes {
    child: [OwnedFd; 3],
    parent: Pipes,
}

fn stdio_pipes(stdin: bool) -> Result<StdioPipes, ContainerError> {
    let (stdin_child, stdin_parent) = if stdin {
        let (r, w) = pipe()?;
        (r, Some(File::from(w)))
    } else {
        (OwnedFd::from(File::open("/dev/null").map_err(ContainerError::Pipe)?), None)
    };
    let (stdout_parent, stdout_child) = pipe()?;
    let (stderr_parent, stderr_child) = pipe()?;
    Ok(StdioPipes {
        child: [stdin_child, stdout_child, stderr_child],
        parent: Pipes {
            stdin: stdin_parent,
            stdout: Some(File::from(stdout_parent)),
            stderr: Some(File::from(stderr_parent)),
            pty: None,
        },
    })
}

/// Distinguishes the process files of concurrent execs in one bundle.
static EXEC_SEQ: AtomicU64 = AtomicU64::new(0);

/// Start the process of `req` inside its (started, not paused) container.
pub fn exec(table: &ProcessTable, containers: &Containers, req: &ContainerExecRequest) -> Result<i32, ContainerError> {
    if !valid_id(&req.container_id) {
        return Err(ContainerError::InvalidId(req.container_id.clone()));
    }
    let started = containers.get(&req.container_id)?;
    if started.paused {
        return Err(ContainerError::Paused(req.container_id.clone()));
    }
    let mut process: serde_json::Value = serde_json::from_str(&req.process).map_err(ContainerError::ProcessSpec)?;
    let terminal = wants_terminal(&process);
    // The container's seccomp profile applies to the exec too (libcontainer reads it from the
    // container's config.json); only the process's own fields need adapting.
    crate::seccomp::prepare_process(&mut process);
    let bundle = Path::new(BUNDLES_ROOT).join(&req.container_id);
    let seq = EXEC_SEQ.fetch_add(1, Ordering::Relaxed);
    let process_file = bundle.join(format!("exec-{seq}.json"));
    std::fs::write(&process_file, process.to_string())
        .map_err(|source| ContainerError::Bundle { path: process_file.clone(), source })?;
    let stdio = ProcessStdio::new(terminal, &bundle.join(format!("exec-{seq}.sock")), req.stdin)?;
    let result = table.spawn_with(&req.id, || {
        let builder = ContainerBuilder::new(req.container_id.clone(), SyscallType::Linux)
            .with_root_path(STATE_ROOT)
            .map_err(ContainerError::Exec)?
            .with_executor(DefaultExecutor {});
        let (builder, ours) = stdio.hand_to(builder);
        let pid = builder
            .as_tenant()
            .with_process(Some(&process_file))
            .with_detach(true)
            .build()
            .map_err(ContainerError::Exec)?
            .as_raw();
        match ours.into_pipes(req.stdin) {
            Ok(pipes) => Ok((pid, pipes)),
            Err(e) => {
                // Registered anyway would leave a process nobody can talk to: kill it. Its
                // exit is reaped as an orphan.
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
                Err(e)
            }
        }
    });
    let _ = std::fs::remove_file(&process_file);
    let pid = result?;
    info!(container = %req.container_id, id = %req.id, pid, terminal, "exec process started");
    Ok(pid)
}

fn valid_id(id: &str) -> bool {
    let mut components = Path::new(id).components();
    matches!((components.next(), components.next()), (Some(Component::Normal(_)), None)) && !id.contains('/')
}

/// Write the bundle and remove state a previous container of the same id left behind.
fn prepare(spec: &ContainerSpec) -> Result<PathBuf, ContainerError> {
    if !valid_id(&spec.id) {
        return Err(ContainerError::InvalidId(spec.id.clone()));
    }
    // Checked for syntax and the seccomp profile here; libcontainer validates the rest.
    let mut oci: serde_json::Value = serde_json::from_str(&spec.oci_spec).map_err(ContainerError::Spec)?;
    crate::seccomp::prepare_spec(&spec.id, &mut oci)?;
    let bundle = Path::new(BUNDLES_ROOT).join(&spec.id);
    let bundle_err = |source| ContainerError::Bundle { path: bundle.clone(), source };
    std::fs::create_dir_all(&bundle).map_err(bundle_err)?;
    std::fs::create_dir_all(STATE_ROOT).map_err(|source| ContainerError::Bundle { path: STATE_ROOT.into(), source })?;
    std::fs::write(bundle.join("config.json"), oci.to_string()).map_err(bundle_err)?;
    let stale = Path::new(STATE_ROOT).join(&spec.id);
    if stale.exists() {
        warn!(id = %spec.id, "removing stale container state");
        let _ = std::fs::remove_dir_all(&stale);
    }
    Ok(bundle)
}

/// A close-on-exec pipe (libcontainer dups the child ends onto 0–2 in the container).
fn pipe() -> Result<(OwnedFd, OwnedFd), ContainerError> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| ContainerError::Pipe(e.into()))
}

/// Create and start the container of `spec`, registered as `spec.id`; returns its pid.
pub fn start(table: &ProcessTable, containers: &Containers, spec: &ContainerSpec) -> Result<i32, ContainerError> {
    let bundle = prepare(spec)?;
    let oci: serde_json::Value = serde_json::from_str(&spec.oci_spec).map_err(ContainerError::Spec)?;
    let terminal = oci.get("process").is_some_and(wants_terminal);
    let stdio = ProcessStdio::new(terminal, &bundle.join("console.sock"), spec.stdin)?;
    let pid = table.spawn_with(&spec.id, || {
        let builder = ContainerBuilder::new(spec.id.clone(), SyscallType::Linux)
            .with_root_path(STATE_ROOT)
            .map_err(ContainerError::Create)?
            .with_executor(DefaultExecutor {});
        let (builder, ours) = stdio.hand_to(builder);
        let mut container = builder
            .as_init(&bundle)
            .with_systemd(false)
            .with_detach(true)
            .with_no_pivot(true)
            .build()
            .map_err(ContainerError::Create)?;
        let pid = container.pid().ok_or(ContainerError::NoPid)?.as_raw();
        if let Err(e) = container.start() {
            // Do not leave a created container waiting for a start that never comes.
            let _ = container.delete(true);
            return Err(ContainerError::Start(e));
        }
        match ours.into_pipes(spec.stdin) {
            Ok(pipes) => Ok((pid, pipes)),
            Err(e) => {
                let _ = container.delete(true);
                Err(e)
            }
        }
    })?;
    match cgroups::cgroup_dir_of(pid) {
        Ok(cgroup) => {
            containers.lock().insert(spec.id.clone(), Started { cgroup, paused: false });
        }
        // The process may already be gone; then there is nothing to pause or measure.
        Err(e) => warn!(id = %spec.id, error = %e, "cannot find the container's cgroup"),
    }
    info!(id = %spec.id, pid, terminal, "container started");
    Ok(pid)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn ids_must_be_single_components() {
        assert!(valid_id("abc-123"));
        for bad in ["", ".", "..", "a/b", "/abs"] {
            assert!(!valid_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn bad_requests_fail_before_touching_the_guest() {
        let spec = ContainerSpec { id: "../x".into(), oci_spec: "{}".into(), stdin: false };
        assert!(matches!(prepare(&spec), Err(ContainerError::InvalidId(_))));
        let spec = ContainerSpec { id: "x".into(), oci_spec: "{not json".into(), stdin: false };
        assert!(matches!(prepare(&spec), Err(ContainerError::Spec(_))));
        let profile =
            r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["nosuch"], "action": "SCMP_ACT_KILL"}]}"#;
        let oci_spec = format!(r#"{{"linux": {{"seccomp": {profile}}}}}"#);
        let spec = ContainerSpec { id: "x".into(), oci_spec, stdin: false };
        let err = prepare(&spec).unwrap_err();
        assert!(
            matches!(err, ContainerError::Seccomp(tern_seccomp::ProfileError::UnknownSyscall(ref n)) if n == "nosuch")
        );
    }
}
