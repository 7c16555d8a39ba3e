//! Cleanup after a shim that died (containerd's `containerd-shim-tern-v2 … delete`).
//!
//! The VM lived inside the shim process, so its vCPU and device threads died with it; what a
//! SIGKILLed shim leaves on the host is only what outlives a process: the container rootfs
//! mount in the bundle, the sandbox's named run directory (vsock socket, `sandbox` file) and
//! the shim's ttrpc socket file under `/run/containerd/s/`. `delete` is a fresh process that
//! knows the bundle, the namespace and the container id; from the bundle's spec it derives the
//! sandbox id, hence the run directory (see [`SandboxDir::named_path`]), and the bundle's
//! `address` file names the socket.
//!
//! Containers of one pod share a shim, and containerd may also run `delete` for a container
//! whose shim is alive (a failed start): the sandbox-wide state is removed only when nothing
//! answers on the shim's socket or on the VM's vsock socket.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use crate::sandbox::SandboxDir;

/// What [`clean_after_dead_shim`] found and removed, for the log and the tests.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Cleaned {
    /// The shim (or its VM) still answers: sandbox-wide state was left alone.
    pub shim_alive: bool,
    pub run_dir_removed: bool,
    pub socket_removed: Option<PathBuf>,
}

/// The unix socket path of a shim address (`unix:///run/containerd/s/<hash>` or a bare path).
fn socket_path(address: &str) -> Option<PathBuf> {
    let path = address.trim().strip_prefix("unix://").unwrap_or(address.trim());
    (!path.is_empty() && path.starts_with('/')).then(|| PathBuf::from(path))
}

/// Whether something accepts connections on the unix socket `path`.
fn answers(path: &Path) -> bool {
    UnixStream::connect(path).is_ok()
}

/// Remove what a dead shim of sandbox `sandbox_id` (namespace `namespace`) left behind, given
/// the bundle of one of its containers. The bundle's own rootfs mount is the caller's (it is
/// per container and safe to undo either way). Never fails: every step is best effort and
/// logged.
pub fn clean_after_dead_shim(bundle: &Path, namespace: &str, sandbox_id: &str) -> Cleaned {
    let mut cleaned = Cleaned::default();
    let run_dir = SandboxDir::named_path(namespace, sandbox_id);
    let socket = std::fs::read_to_string(bundle.join("address")).ok().and_then(|a| socket_path(&a));
    if socket.as_deref().is_some_and(answers) || answers(&run_dir.join(crate::run_dir::VSOCK_SOCKET)) {
        tracing::info!(%sandbox_id, "the sandbox's shim is alive; leaving its state alone");
        cleaned.shim_alive = true;
        return cleaned;
    }
    match SandboxDir::remove_named(namespace, sandbox_id) {
        Ok(removed) => cleaned.run_dir_removed = removed,
        Err(e) => tracing::warn!(path = %run_dir.display(), error = %e, "cannot remove the sandbox run directory"),
    }
    if let Some(socket) = socket {
        match std::fs::remove_file(&socket) {
            Ok(()) => cleaned.socket_removed = Some(socket),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(path = %socket.display(), error = %e, "cannot remove the dead shim's socket"),
        }
    }
    tracing::info!(%sandbox_id, ?cleaned, "cleaned up after a dead shim");
    cleaned
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn socket_paths_of_shim_addresses() {
        assert_eq!(socket_path("unix:///run/containerd/s/ab12\n"), Some(PathBuf::from("/run/containerd/s/ab12")));
        assert_eq!(socket_path("/run/x.sock"), Some(PathBuf::from("/run/x.sock")));
        assert_eq!(socket_path(""), None);
        assert_eq!(socket_path("unix://relative"), None);
    }

    #[test]
    fn a_dead_socket_is_removed_and_a_live_one_kept() {
        let d = tempfile::tempdir().unwrap();
        let bundle = d.path().join("bundle");
        std::fs::create_dir(&bundle).unwrap();
        let socket = d.path().join("shim.sock");
        std::fs::write(bundle.join("address"), format!("unix://{}", socket.display())).unwrap();
        // Unique per test run so the real run base is not disturbed.
        let id = format!("cleanup-test-{}", std::process::id());

        let listener = UnixListener::bind(&socket).unwrap();
        let cleaned = clean_after_dead_shim(&bundle, "tern-unit", &id);
        assert!(cleaned.shim_alive);
        assert!(socket.exists());

        drop(listener); // the shim "dies": its socket file stays, nobody answers
        let cleaned = clean_after_dead_shim(&bundle, "tern-unit", &id);
        assert!(!cleaned.shim_alive);
        assert_eq!(cleaned.socket_removed.as_deref(), Some(socket.as_path()));
        assert!(!socket.exists());
    }
}
