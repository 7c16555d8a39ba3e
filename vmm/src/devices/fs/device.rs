//! The virtio-fs [`VirtioDevice`] and the share table behind it.
//!
//! One device per VM (tag [`FS_TAG`](super::FS_TAG)); its root is a fuse-backend-rs
//! [`Vfs`] whose top level holds one directory per share, each a [`ShareFs`] mounted at
//! `/<name>`. [`FsShares`] adds and removes shares on a running VM; the guest sees a new share
//! on its next lookup of the name.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use tern_sync::LockExt;

use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::api::{Vfs, VfsOptions};
use fuse_backend_rs::passthrough::PassthroughFs;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_FS;

use super::event_handler::FsHandler;
use super::policy::ShareFs;
use super::share::{validate_share_name, ShareConfig, ShareError};
use super::{NUM_QUEUES, QUEUE_SIZE, TAG_LEN};
use crate::devices::event_loop::EventLoopHandle;
use crate::devices::virtio::core::{DeviceCore, QueueDevice};
use crate::devices::virtio::{ActivateError, ActivatedQueue, InterruptSignal};
use crate::memory::GuestMemory;
use crate::metrics::VmMetrics;

const QUEUE_SIZES: [u16; NUM_QUEUES] = [QUEUE_SIZE; NUM_QUEUES];
/// Size of `struct virtio_fs_config`: `u8 tag[36]; le32 num_request_queues`.
const CONFIG_LEN: usize = TAG_LEN + 4;

/// The shares of one VM and the tree the guest sees them in. Shared by the device (which
/// serves the tree) and the VM handle (which changes it).
pub struct FsShares {
    vfs: Arc<Vfs>,
    shares: Mutex<BTreeMap<String, ShareConfig>>,
}

/// Mount options of the root [`Vfs`] (also the vhost-user backend's): no DAX window, no
/// writeback cache, real opens.
pub(crate) fn vfs_options() -> VfsOptions {
    let mut opts = VfsOptions {
        no_open: false,
        no_opendir: false,
        no_writeback: true,
        killpriv_v2: false,
        ..VfsOptions::default()
    };
    opts.out_opts.remove(fuse_backend_rs::api::filesystem::FsOptions::PERFILE_DAX);
    opts
}

impl FsShares {
    /// An empty share tree.
    pub fn new() -> Self {
        FsShares { vfs: Arc::new(Vfs::new(vfs_options())), shares: Mutex::new(BTreeMap::new()) }
    }

    /// The tree the device serves.
    pub(crate) fn vfs(&self) -> Arc<Vfs> {
        self.vfs.clone()
    }

    fn table(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, ShareConfig>> {
        // A panic elsewhere cannot leave the map half-updated: every update is one insert/remove.
        self.shares.lock_unpoisoned()
    }

    /// Serve `share.host_dir` at `/<share.name>` of the device.
    pub fn add(&self, share: ShareConfig) -> Result<(), ShareError> {
        share.validate()?;
        let mut table = self.table();
        if table.contains_key(&share.name) {
            return Err(ShareError::Duplicate(share.name));
        }
        let passthrough_error = |source| ShareError::Passthrough { path: share.host_dir.clone(), source };
        let fs = PassthroughFs::<()>::new(share.passthrough_config()?).map_err(passthrough_error)?;
        fs.import().map_err(passthrough_error)?;
        let fs = ShareFs::new(fs, share.read_only);
        self.vfs.mount(Box::new(fs), &format!("/{}", share.name)).map_err(|e| ShareError::Vfs(format!("{e:?}")))?;
        tracing::debug!(name = %share.name, host_dir = ?share.host_dir, read_only = share.read_only, "fs share added");
        table.insert(share.name.clone(), share);
        Ok(())
    }

    /// Stop serving share `name`. Guest inodes of it fail from now on; its directory stays in
    /// the tree, empty, so a later share of the same name reuses it.
    pub fn remove(&self, name: &str) -> Result<ShareConfig, ShareError> {
        validate_share_name(name)?;
        let mut table = self.table();
        if !table.contains_key(name) {
            return Err(ShareError::Unknown(name.to_owned()));
        }
        self.vfs.umount(&format!("/{name}")).map_err(|e| ShareError::Vfs(format!("{e:?}")))?;
        tracing::debug!(name, "fs share removed");
        table.remove(name).ok_or_else(|| ShareError::Unknown(name.to_owned()))
    }

    /// The shares, by name.
    pub fn list(&self) -> Vec<ShareConfig> {
        self.table().values().cloned().collect()
    }
}

impl Default for FsShares {
    fn default() -> Self {
        FsShares::new()
    }
}

/// The virtio-fs device: one hiprio queue and one request queue, served on the `tern-fs` event loop.
pub struct VirtioFs {
    shares: Arc<FsShares>,
    core: DeviceCore,
    metrics: Option<Arc<VmMetrics>>,
}

impl VirtioFs {
    /// Count this device's queue notifications and requests in `metrics`.
    pub fn set_metrics(&mut self, metrics: Arc<VmMetrics>) {
        self.metrics = Some(metrics);
    }

    /// A device with tag `tag` (at most [`TAG_LEN`] bytes) serving `shares`.
    pub fn new(tag: &str, shares: Arc<FsShares>, events: EventLoopHandle) -> Result<Self, ShareError> {
        if tag.is_empty() || tag.len() > TAG_LEN || tag.contains('\0') {
            return Err(ShareError::InvalidName(tag.to_owned()));
        }
        let mut config = [0u8; CONFIG_LEN];
        config[..tag.len()].copy_from_slice(tag.as_bytes());
        let request_queues = (NUM_QUEUES - 1) as u32;
        config[TAG_LEN..].copy_from_slice(&request_queues.to_le_bytes());
        let core = DeviceCore::new("virtio-fs", &config, &QUEUE_SIZES, 1 << VIRTIO_F_VERSION_1, events);
        Ok(VirtioFs { shares, core, metrics: None })
    }
}

impl QueueDevice for VirtioFs {
    const DEVICE_TYPE: u32 = VIRTIO_ID_FS;

    fn core(&self) -> &DeviceCore {
        &self.core
    }

    fn core_mut(&mut self) -> &mut DeviceCore {
        &mut self.core
    }

    fn start(
        &mut self,
        mem: GuestMemory,
        interrupt: Arc<dyn InterruptSignal>,
        queues: Vec<ActivatedQueue>,
    ) -> Result<(), ActivateError> {
        let [hiprio, request] = self.core.queues::<NUM_QUEUES>(queues)?;
        let stopped = Arc::new(AtomicBool::new(false));
        let handler = FsHandler::new(
            mem,
            interrupt,
            [hiprio.queue, request.queue],
            [hiprio.kick, request.kick],
            Arc::new(Server::new(self.shares.vfs())),
            stopped.clone(),
        )
        .with_metrics(self.metrics.clone());
        self.core.start(handler, stopped)?;
        tracing::debug!("virtio-fs device activated");
        Ok(())
    }

    fn on_reset(&mut self) {
        // Forget the old driver's session (handles, inodes) so the next INIT is accepted. On
        // the fs thread, after the handler's removal and before any later activation: the
        // passthrough re-opens each share's root, which a vCPU thread (where the guest's reset
        // arrives) may not do.
        let vfs = self.shares.vfs();
        self.core.events().run_on_loop(move || fuse_backend_rs::api::filesystem::FileSystem::destroy(&*vfs));
    }
}
