//! Shares in the guest: mounting the VM's virtio-fs device at `GUEST_SHARES_ROOT` (once, on
//! the first `Mount`), and presenting one share at a guest path — a bind mount of
//! `GUEST_SHARES_ROOT/<share>` (remounted read-only for read-only shares) for plain mounts,
//! a mirror ([`crate::mirror`]) for watchable ones.
//!
//! Requests come from the host runtime, which is trusted, but are still checked: guest paths
//! must be absolute and free of `..`, share names single path components.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use tern_sync::LockExt;

use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use tern_protocol::{MountRequest, FS_TAG, GUEST_SHARES_ROOT};
use tracing::{debug, info};

use crate::mirror::{self, MirrorError};

/// Errors presenting or removing a share.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("guest path {0:?} must be absolute, not `/`, and free of `..`")]
    InvalidGuestPath(String),
    #[error("share name {0:?} is not a single path component")]
    InvalidShare(String),
    #[error("this VM has no virtio-fs device (tag {FS_TAG:?})")]
    NoDevice,
    #[error("cannot mount the virtio-fs device at {GUEST_SHARES_ROOT}")]
    Device(#[source] Errno),
    #[error("cannot create {}", path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("share {0:?} is not present on the virtio-fs device")]
    ShareMissing(String),
    #[error("{0} already has a share mounted")]
    AlreadyMounted(String),
    #[error("cannot bind {} onto {}", from.display(), to.display())]
    Bind {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("cannot make {} read-only", path.display())]
    ReadOnly {
        path: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("cannot unmount {}", path.display())]
    Unmount {
        path: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("watchable mount failed")]
    Mirror(#[from] MirrorError),
}

/// Agent-wide mount state: whether the device is mounted and the plain mounts by guest path.
#[derive(Default)]
struct MountTable {
    device_mounted: bool,
    plain: BTreeMap<PathBuf, String>,
}

static TABLE: Mutex<MountTable> = Mutex::new(MountTable { device_mounted: false, plain: BTreeMap::new() });

fn table() -> MutexGuard<'static, MountTable> {
    TABLE.lock_unpoisoned()
}

/// An absolute path other than `/`, without `..` components.
pub fn validate_guest_path(path: &str) -> Result<PathBuf, MountError> {
    let p = Path::new(path);
    let ok = p.is_absolute()
        && p.components().any(|c| matches!(c, Component::Normal(_)))
        && !p.components().any(|c| matches!(c, Component::ParentDir))
        && !path.contains('\0');
    if ok {
        Ok(p.components().collect())
    } else {
        Err(MountError::InvalidGuestPath(path.to_owned()))
    }
}

/// A share name is one directory entry of the device.
pub fn validate_share_name(name: &str) -> Result<(), MountError> {
    let ok = !name.is_empty() && name != "." && name != ".." && !name.chars().any(|c| c == '/' || c.is_control());
    if ok {
        Ok(())
    } else {
        Err(MountError::InvalidShare(name.to_owned()))
    }
}

/// Mount the virtio-fs device at `GUEST_SHARES_ROOT` unless that was done already.
pub fn ensure_shares_root() -> Result<(), MountError> {
    let mut table = table();
    if table.device_mounted {
        return Ok(());
    }
    std::fs::create_dir_all(GUEST_SHARES_ROOT)
        .map_err(|source| MountError::CreateDir { path: GUEST_SHARES_ROOT.into(), source })?;
    match mount(Some(FS_TAG), GUEST_SHARES_ROOT, Some("virtiofs"), MsFlags::empty(), None::<&str>) {
        // EBUSY: mounted already (e.g. by an earlier agent run in host tests).
        Ok(()) | Err(Errno::EBUSY) => {}
        // The kernel's answer for a tag no device has.
        Err(Errno::ENOENT) | Err(Errno::ENODEV) => return Err(MountError::NoDevice),
        Err(e) => return Err(MountError::Device(e)),
    }
    info!(root = GUEST_SHARES_ROOT, "virtio-fs device mounted");
    table.device_mounted = true;
    Ok(())
}

/// Present `req.share` at `req.guest_path`.
pub fn mount_share(req: &MountRequest) -> Result<(), MountError> {
    let guest_path = validate_guest_path(&req.guest_path)?;
    validate_share_name(&req.share)?;
    ensure_shares_root()?;
    if req.watchable {
        return Ok(mirror::mount_watchable(req)?);
    }
    let source = Path::new(GUEST_SHARES_ROOT).join(&req.share);
    if !source.is_dir() {
        return Err(MountError::ShareMissing(req.share.clone()));
    }
    let mut table = table();
    if table.plain.contains_key(&guest_path) {
        return Err(MountError::AlreadyMounted(req.guest_path.clone()));
    }
    std::fs::create_dir_all(&guest_path)
        .map_err(|source| MountError::CreateDir { path: guest_path.clone(), source })?;
    mount(Some(&source), &guest_path, None::<&str>, MsFlags::MS_BIND, None::<&str>).map_err(|e| MountError::Bind {
        from: source.clone(),
        to: guest_path.clone(),
        source: e,
    })?;
    if req.read_only {
        // A bind mount takes MS_RDONLY only on a remount of the bind itself.
        let flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
        if let Err(e) = mount(None::<&str>, &guest_path, None::<&str>, flags, None::<&str>) {
            let _ = umount2(&guest_path, MntFlags::MNT_DETACH);
            return Err(MountError::ReadOnly { path: guest_path, source: e });
        }
    }
    debug!(share = req.share, guest_path = req.guest_path, read_only = req.read_only, "share bind-mounted");
    table.plain.insert(guest_path, req.share.clone());
    Ok(())
}

/// Undo [`mount_share`] at `guest_path`, whichever kind of mount it was.
pub fn unmount_share(guest_path: &str) -> Result<(), MountError> {
    let path = validate_guest_path(guest_path)?;
    let mut table = table();
    if !table.plain.contains_key(&path) {
        drop(table);
        return Ok(mirror::unmount_watchable(guest_path)?);
    }
    match umount2(&path, MntFlags::empty()) {
        Ok(()) => {}
        // Busy (a process has a file open there): detach now, the kernel finishes later.
        Err(Errno::EBUSY) => {
            umount2(&path, MntFlags::MNT_DETACH).map_err(|source| MountError::Unmount { path: path.clone(), source })?
        }
        Err(source) => return Err(MountError::Unmount { path, source }),
    }
    table.plain.remove(&path);
    debug!(guest_path, "share unmounted");
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn guest_paths_are_absolute_without_dotdot() {
        assert_eq!(validate_guest_path("/data").unwrap(), PathBuf::from("/data"));
        assert_eq!(validate_guest_path("/a//b/./c/").unwrap(), PathBuf::from("/a/b/c"));
        for bad in ["", "/", "//", "data", "/a/../etc", "/..", "./x", "/a\0b"] {
            assert!(matches!(validate_guest_path(bad), Err(MountError::InvalidGuestPath(_))), "{bad:?}");
        }
    }

    #[test]
    fn share_names_are_one_component() {
        assert!(validate_share_name("s0").is_ok());
        for bad in ["", ".", "..", "a/b", "/", "a\nb"] {
            assert!(validate_share_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn unmounting_an_unknown_path_is_an_error_not_a_panic() {
        assert!(unmount_share("/never/mounted/here").is_err());
        assert!(matches!(unmount_share("relative"), Err(MountError::InvalidGuestPath(_))));
    }
}
