//! A container's host bind mounts as virtio-fs shares of the running sandbox VM (the policy is
//! in [`super::container`]'s module docs): directories get a share each, mounted by the agent
//! under [`GUEST_MOUNTS_ROOT`]`/<container id>/<mount index>` (kubelet secret, configMap,
//! projected and downward-API volumes as watchable mounts, see below); single files are staged under
//! `<bundle>/tern-files/` and reach the guest through one share of that directory, mounted at
//! `…/<container id>/files`. The adapted OCI spec then bind-mounts these guest paths into the
//! container.
//!
//! Everything [`share_binds`] sets up is recorded in a [`BindShares`] and undone by
//! [`unshare_binds`]; a failure half-way undoes what was done before returning.
//!
//! Watchable volumes are shared once per VM: containers of a pod that mount the same secret
//! (same host directory, same access) use one share and one guest mirror
//! ([`WatchableShares`], reference-counted) under `GUEST_MOUNTS_ROOT/watch/<n>`. One host
//! directory watched as two shares would also cost two inotify trees and two mirrors that
//! must stay identical. The table's lock guards only the table: shares are added, mounted,
//! unmounted and removed outside it (two containers racing to share one volume both mount
//! it, the loser undoes its copy and takes a reference on the winner's).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use tern_sync::LockExt;

use super::container::{
    remove_staged_files, stage_file, staged_file_name, BindKind, ContainerSpecError, HostBind, HOST_FILES_DIR,
};
use crate::config::FsSection;
use crate::sandbox::{error_chain, Sandbox};
use crate::share::{add_and_mount, AddShareError, PlannedShare};

/// Where the agent mounts a container's bind shares: `<this>/<container id>/…`.
pub const GUEST_MOUNTS_ROOT: &str = "/run/tern/mounts";

/// Errors sharing a container's bind mounts.
#[derive(Debug, thiserror::Error)]
pub enum BindShareError {
    #[error(transparent)]
    Stage(#[from] ContainerSpecError),
    #[error(transparent)]
    Share(#[from] AddShareError),
}

/// What [`share_binds`] set up for one container.
#[derive(Debug, Default)]
pub struct BindShares {
    /// (share name, guest mount path), in the order they were made.
    mounts: Vec<(String, String)>,
    /// `<bundle>/tern-files` when files were staged there.
    files_dir: Option<PathBuf>,
    /// References taken on watchable shares.
    watchable: Vec<WatchKey>,
}

/// A watchable share is identified by its host directory and its access mode.
type WatchKey = (PathBuf, bool);

#[derive(Debug)]
struct WatchEntry {
    share: String,
    guest_path: String,
    refs: usize,
}

/// The VM's watchable shares, shared by every container that mounts the same volume.
#[derive(Debug, Default)]
pub struct WatchableShares {
    inner: Mutex<WatchTable>,
}

#[derive(Debug, Default)]
struct WatchTable {
    entries: HashMap<WatchKey, WatchEntry>,
    next: u64,
}

impl WatchableShares {
    fn lock(&self) -> MutexGuard<'_, WatchTable> {
        self.inner.lock_unpoisoned()
    }

    /// Share and mount `bind` unless an equal watchable share exists; take a reference and
    /// return its guest path.
    fn acquire(&self, sandbox: &Sandbox, fs: &FsSection, bind: &HostBind) -> Result<String, BindShareError> {
        let key = (bind.source.clone(), bind.read_only);
        let n = {
            let mut table = self.lock();
            if let Some(entry) = table.entries.get_mut(&key) {
                entry.refs += 1;
                return Ok(entry.guest_path.clone());
            }
            table.next += 1;
            table.next
        };
        let share = format!("w{n}");
        let guest_path = format!("{GUEST_MOUNTS_ROOT}/watch/{n}");
        let planned = PlannedShare::new(&share, bind.source.clone(), &guest_path, bind.read_only, true, fs);
        add_and_mount(sandbox, planned)?;
        let mut table = self.lock();
        if let Some(entry) = table.entries.get_mut(&key) {
            // Another container shared the same volume meanwhile: use its share.
            entry.refs += 1;
            let theirs = entry.guest_path.clone();
            drop(table);
            unmount_and_remove(sandbox, &share, &guest_path);
            return Ok(theirs);
        }
        table.entries.insert(key, WatchEntry { share, guest_path: guest_path.clone(), refs: 1 });
        Ok(guest_path)
    }

    /// Drop a reference; the last one unmounts and removes the share.
    fn release(&self, sandbox: Option<&Sandbox>, key: &WatchKey) {
        let removed = {
            let mut table = self.lock();
            let Some(entry) = table.entries.get_mut(key) else { return };
            entry.refs -= 1;
            if entry.refs > 0 {
                return;
            }
            table.entries.remove(key)
        };
        // Out of the table: a new `acquire` of the same volume makes a new share meanwhile.
        if let (Some(entry), Some(sandbox)) = (removed, sandbox) {
            unmount_and_remove(sandbox, &entry.share, &entry.guest_path);
        }
    }
}

impl BindShares {
    /// The share names (for logs and tests).
    pub fn shares(&self) -> impl Iterator<Item = &str> {
        self.mounts.iter().map(|(s, _)| s.as_str())
    }
}

/// Share `binds` of container `id` with `sandbox`'s VM. `prefix` makes share names unique in
/// the VM (`<prefix>m<index>`, `<prefix>f`). Returns spec mount index → guest source path (for
/// [`super::container::GuestAdaptation::binds`]) and the record for [`unshare_binds`].
/// Blocking.
pub fn share_binds(
    sandbox: &Sandbox,
    watchables: &WatchableShares,
    fs: &FsSection,
    id: &str,
    prefix: &str,
    bundle: &Path,
    binds: &[HostBind],
) -> Result<(HashMap<usize, String>, BindShares), BindShareError> {
    let mut done = BindShares::default();
    match share_binds_inner(sandbox, watchables, fs, id, prefix, bundle, binds, &mut done) {
        Ok(map) => Ok((map, done)),
        Err(e) => {
            unshare_binds(Some(sandbox), watchables, done);
            Err(e)
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn share_binds_inner(
    sandbox: &Sandbox,
    watchables: &WatchableShares,
    fs: &FsSection,
    id: &str,
    prefix: &str,
    bundle: &Path,
    binds: &[HostBind],
    done: &mut BindShares,
) -> Result<HashMap<usize, String>, BindShareError> {
    let base = format!("{GUEST_MOUNTS_ROOT}/{id}");
    let mut sources = HashMap::new();
    let mut planned = Vec::new();
    let files_dir = bundle.join(HOST_FILES_DIR);
    let files_guest = format!("{base}/files");
    for bind in binds {
        match bind.kind {
            BindKind::Dir if bind.watchable => {
                let guest_path = watchables.acquire(sandbox, fs, bind)?;
                done.watchable.push((bind.source.clone(), bind.read_only));
                sources.insert(bind.index, guest_path);
            }
            BindKind::Dir => {
                let share = format!("{prefix}m{}", bind.index);
                let guest_path = format!("{base}/{}", bind.index);
                planned.push(PlannedShare::new(share, bind.source.clone(), &guest_path, bind.read_only, false, fs));
                sources.insert(bind.index, guest_path);
            }
            BindKind::File => {
                done.files_dir = Some(files_dir.clone());
                stage_file(&files_dir, bind)?;
                sources.insert(bind.index, format!("{files_guest}/{}", staged_file_name(bind)));
            }
        }
    }
    if done.files_dir.is_some() {
        let share = format!("{prefix}f");
        // Read-only files are read-only bind mounts on the host already; the container's bind
        // repeats it. Never cached: kubelet and CRI rewrite these files in place.
        planned.push(PlannedShare::new(share, files_dir, files_guest, false, false, fs).uncached());
    }
    for p in planned {
        let (share, guest_path) = (p.mount.share.clone(), p.mount.guest_path.clone());
        add_and_mount(sandbox, p)?;
        done.mounts.push((share, guest_path));
    }
    Ok(sources)
}

/// Unmount `guest_path` in the guest, then remove `share` from the VM (errors logged).
fn unmount_and_remove(sandbox: &Sandbox, share: &str, guest_path: &str) {
    if let Err(e) = sandbox.agent().unmount(guest_path) {
        tracing::warn!(%guest_path, error = %error_chain(&e), "cannot unmount a bind share in the guest");
    }
    if let Err(e) = sandbox.remove_fs_share(share) {
        tracing::warn!(%share, error = %error_chain(&e), "cannot remove a bind share");
    }
}

/// Undo [`share_binds`]: unmount in the guest (newest first), remove the shares, release the
/// watchable shares, unstage the files. Without a sandbox (the VM is gone) only the host side is cleaned. Blocking; errors
/// are logged, never returned (teardown continues).
pub fn unshare_binds(sandbox: Option<&Sandbox>, watchables: &WatchableShares, shares: BindShares) {
    if let Some(sandbox) = sandbox {
        for (share, guest_path) in shares.mounts.iter().rev() {
            unmount_and_remove(sandbox, share, guest_path);
        }
    }
    for key in &shares.watchable {
        watchables.release(sandbox, key);
    }
    if let Some(dir) = shares.files_dir {
        remove_staged_files(&dir);
    }
}
