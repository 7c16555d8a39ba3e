//! The mounts behind a watchable mount: a private tmpfs holding the mirror, bind-mounted at
//! the guest path (read-only if asked), and the bind mount of the share itself that replaces
//! it when the share grows past the limits.

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use std::path::{Path, PathBuf};

/// Where the mirrors' tmpfs instances live (never seen by containers).
pub const MIRRORS_ROOT: &str = "/run/tern/mirrors";
/// tmpfs size: the 1 MiB limit, a temporary copy during a replace, and slack.
const MIRROR_TMPFS_OPTIONS: &str = "mode=0755,size=4m,nr_inodes=4096";

/// Errors of the mount system calls.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("cannot create {}", path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot mount {what} at {}", path.display())]
    Mount {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: nix::errno::Errno,
    },
    #[error("cannot unmount {}", path.display())]
    Unmount {
        path: PathBuf,
        #[source]
        source: nix::errno::Errno,
    },
}

fn create_dir(path: &Path) -> Result<(), MountError> {
    std::fs::create_dir_all(path).map_err(|source| MountError::CreateDir { path: path.to_owned(), source })
}

/// Mount a fresh tmpfs at `staging` (created if missing).
pub fn mount_tmpfs(staging: &Path) -> Result<(), MountError> {
    create_dir(staging)?;
    mount(Some("tmpfs"), staging, Some("tmpfs"), MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some(MIRROR_TMPFS_OPTIONS))
        .map_err(|source| MountError::Mount { what: "the mirror tmpfs", path: staging.to_owned(), source })
}

/// Bind `source` at `target` (created if missing), read-only if `read_only`.
pub fn bind(source: &Path, target: &Path, read_only: bool, what: &'static str) -> Result<(), MountError> {
    create_dir(target)?;
    let failed = |source| MountError::Mount { what, path: target.to_owned(), source };
    mount(Some(source), target, None::<&str>, MsFlags::MS_BIND, None::<&str>).map_err(failed)?;
    if read_only {
        let flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
        if let Err(e) = mount(None::<&str>, target, None::<&str>, flags, None::<&str>) {
            let _ = umount2(target, MntFlags::MNT_DETACH);
            return Err(failed(e));
        }
    }
    Ok(())
}

/// Detach the topmost mount at `path`.
pub fn unmount(path: &Path) -> Result<(), MountError> {
    umount2(path, MntFlags::MNT_DETACH).map_err(|source| MountError::Unmount { path: path.to_owned(), source })
}
