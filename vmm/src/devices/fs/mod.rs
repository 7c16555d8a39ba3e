//! The built-in virtio-fs device: one per VM, tag [`FS_TAG`], built on fuse-backend-rs.
//!
//! The device's root is a [`Vfs`](fuse_backend_rs::api::Vfs) whose top level is one directory
//! per share; each share is a passthrough file system over a host directory, wrapped in
//! tern's policy ([`policy::ShareFs`]: read-only shares, no device nodes), and mounted at
//! `/<share-name>`, so shares come and go on a running VM ([`FsShares`]). The guest agent
//! mounts the device at `GUEST_SHARES_ROOT` and presents share `S` from `GUEST_SHARES_ROOT/S`.
//!
//! Layout: [`share`] (what a share is, validation, cache policy), [`policy`] (the per-share
//! file system), [`device`] (the `VirtioDevice` and the share table), [`event_handler`] (queue
//! processing on the `tern-fs` event loop, with the checks every guest chain passes first). The
//! same tree exported as a vhost-user-fs daemon is `crate::vhost_user_fs`; the host watcher of
//! watchable shares is `crate::fs_watcher`.

mod device;
pub mod event_handler;
pub mod policy;
pub mod share;

pub(crate) use device::vfs_options;
pub use device::{FsShares, VirtioFs};
pub use share::{CachePolicy, ShareConfig, ShareError, UnknownCachePolicy};

/// The tag the guest mounts (`mount -t virtiofs tern …`); defined with the change records, the
/// one crate the VMM shares with the agent.
pub use tern_change_records::FS_TAG;
/// Length of the tag field of the config space.
pub const TAG_LEN: usize = 36;
/// Queues: hiprio and one request queue.
pub const NUM_QUEUES: usize = 2;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 1024;

#[cfg(test)]
mod tests;
