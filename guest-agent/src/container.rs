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

use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::{Component, Path, PathBuf};

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::syscall::syscall::SyscallType;
use libcontainer::workload::default::DefaultExecutor;
use nix::fcntl::OFlag;
use tern_protocol::ContainerSpec;
use tracing::{info, warn};

use crate::process::{Pipes, ProcessError, ProcessTable};

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
    // Only checked for syntax here; libcontainer validates the content.
    serde_json::from_str::<serde_json::Value>(&spec.oci_spec).map_err(ContainerError::Spec)?;
    let bundle = Path::new(BUNDLES_ROOT).join(&spec.id);
    let bundle_err = |source| ContainerError::Bundle { path: bundle.clone(), source };
    std::fs::create_dir_all(&bundle).map_err(bundle_err)?;
    std::fs::create_dir_all(STATE_ROOT).map_err(|source| ContainerError::Bundle { path: STATE_ROOT.into(), source })?;
    std::fs::write(bundle.join("config.json"), &spec.oci_spec).map_err(bundle_err)?;
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
pub fn start(table: &ProcessTable, spec: &ContainerSpec) -> Result<i32, ContainerError> {
    let bundle = prepare(spec)?;
    let (stdin_child, stdin_parent) = if spec.stdin {
        let (r, w) = pipe()?;
        (r, Some(File::from(w)))
    } else {
        (OwnedFd::from(File::open("/dev/null").map_err(ContainerError::Pipe)?), None)
    };
    let (stdout_parent, stdout_child) = pipe()?;
    let (stderr_parent, stderr_child) = pipe()?;
    let pid = table.spawn_with(&spec.id, || {
        let mut container = ContainerBuilder::new(spec.id.clone(), SyscallType::Linux)
            .with_root_path(STATE_ROOT)
            .map_err(ContainerError::Create)?
            .with_executor(DefaultExecutor {})
            .with_stdin(stdin_child)
            .with_stdout(stdout_child)
            .with_stderr(stderr_child)
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
        let pipes =
            Pipes { stdin: stdin_parent, stdout: Some(File::from(stdout_parent)), stderr: Some(File::from(stderr_parent)) };
        Ok((pid, pipes))
    })?;
    info!(id = %spec.id, pid, "container started");
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
    }
}
