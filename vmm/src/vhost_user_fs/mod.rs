//! The virtio-fs device as a vhost-user-fs backend: the same fuse-backend-rs [`Vfs`] the
//! built-in device serves, exported over a vhost-user unix socket so that another VMM (QEMU's
//! `vhost-user-fs-device` / `vhost-user-fs-pci`) can be the frontend. `tern fs-serve` runs it.
//!
//! Layering: [`VhostUserFsBackend`] is the `VhostUserBackendMut` impl (features, queues,
//! config space) whose queue work is [`process_queue`], pure queue logic over any
//! [`VringT`]; [`VhostUserFsDaemon`] owns the vhost-user-backend daemon (one std thread for
//! the vhost-user protocol, one for the queues) and serves one frontend connection.
//!
//! Guest input is hostile: every chain passes the built-in device's checks
//! ([`serve_chain`]: descriptor count and byte caps, a sane FUSE header, memory bounds); a
//! chain that fails them completes with an error reply or an empty one (the guest sees an
//! I/O error on that request) and the queue keeps going. Nothing the guest sends ends the
//! backend; only errors of our own notification fds stop the queue thread.
//!
//! Features: VERSION_1, INDIRECT_DESC, EVENT_IDX and PROTOCOL_FEATURES; protocol features
//! MQ, CONFIG (the tag; QEMU 7.2 ignores it and warns once) and REPLY_ACK. No DAX window.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::api::Vfs;
use fuse_backend_rs::passthrough::PassthroughFs;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::Listener;
use vhost_user_backend::{VhostUserBackendMut, VhostUserDaemon, VringRwLock, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier};

use crate::devices::fs::event_handler::{serve_chain, HIPRIO_QUEUE};
use crate::devices::fs::policy::ShareFs;
use crate::devices::fs::share::{ShareConfig, ShareError};
use crate::devices::fs::{NUM_QUEUES, QUEUE_SIZE, TAG_LEN};

/// The virtio-fs config space: `tag[36]` then `num_request_queues: le32`.
const CONFIG_LEN: usize = TAG_LEN + 4;

/// Guest memory as the vhost-user frontend shares it.
type SharedMemory = GuestMemoryAtomic<GuestMemoryMmap<()>>;

/// Errors setting up or running the vhost-user-fs backend.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserFsError {
    /// The share cannot be served.
    #[error(transparent)]
    Share(#[from] ShareError),
    /// The tag is empty or longer than the config space allows.
    #[error("tag {0:?} must be 1 to {TAG_LEN} bytes")]
    InvalidTag(String),
    /// The vhost-user daemon could not be created.
    #[error("cannot create the vhost-user daemon: {0}")]
    Daemon(String),
    /// The unix socket could not be created.
    #[error("cannot listen on {path}: {reason}")]
    Listen { path: PathBuf, reason: String },
    /// The vhost-user protocol failed (other than the frontend disconnecting).
    #[error("vhost-user session failed: {0}")]
    Session(String),
}

/// The file tree a vhost-user frontend sees: `share` alone, at the root, behind the same
/// policy (`ShareFs`) as the built-in device's shares.
pub fn share_vfs(share: &ShareConfig) -> Result<Arc<Vfs>, VhostUserFsError> {
    share.validate()?;
    let passthrough_error = |source| ShareError::Passthrough { path: share.host_dir.clone(), source };
    let fs = PassthroughFs::<()>::new(share.passthrough_config()?).map_err(passthrough_error)?;
    fs.import().map_err(passthrough_error)?;
    // The same mount options as the built-in device: both serve a share the same way.
    let vfs = Vfs::new(crate::devices::fs::vfs_options());
    vfs.mount(Box::new(ShareFs::new(fs, share.read_only)), "/").map_err(|err| ShareError::Vfs(format!("{err:?}")))?;
    Ok(Arc::new(vfs))
}

/// The vhost-user-fs backend: a FUSE server over a [`Vfs`] plus the device's config space.
pub struct VhostUserFsBackend {
    server: Arc<Server<Arc<Vfs>>>,
    config: [u8; CONFIG_LEN],
    mem: Option<SharedMemory>,
    event_idx: bool,
}

impl VhostUserFsBackend {
    /// A backend serving `vfs`, announcing `tag` in its config space (frontends such as QEMU
    /// may override it with their own).
    pub fn new(vfs: Arc<Vfs>, tag: &str) -> Result<Self, VhostUserFsError> {
        if tag.is_empty() || tag.len() > TAG_LEN {
            return Err(VhostUserFsError::InvalidTag(tag.to_string()));
        }
        let mut config = [0u8; CONFIG_LEN];
        config[..tag.len()].copy_from_slice(tag.as_bytes());
        config[TAG_LEN..].copy_from_slice(&1u32.to_le_bytes());
        Ok(Self { server: Arc::new(Server::new(vfs)), config, mem: None, event_idx: false })
    }
}

impl VhostUserBackendMut for VhostUserFsBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        usize::from(QUEUE_SIZE)
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn set_event_idx(&mut self, enabled: bool) {
        self.event_idx = enabled;
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let start = offset as usize;
        match start.checked_add(size as usize) {
            Some(end) if end <= CONFIG_LEN => self.config[start..end].to_vec(),
            // An out-of-range read gets nothing; the vhost crate reports it to the frontend.
            _ => Vec::new(),
        }
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // Without one, the queue thread never leaves epoll and dropping the daemon (which
        // joins it) hangs after the frontend disconnects.
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
            Ok(pair) => Some(pair),
            Err(err) => {
                tracing::error!("cannot create the queue thread's exit event: {err}");
                None
            }
        }
    }

    fn update_memory(&mut self, mem: SharedMemory) -> io::Result<()> {
        self.mem = Some(mem);
        Ok(())
    }

    fn handle_event(
        &mut self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other(format!("unexpected event set {evset:?}")));
        }
        let Some(vring) = vrings.get(usize::from(device_event)) else {
            return Err(io::Error::other(format!("no queue {device_event}")));
        };
        let Some(mem) = &self.mem else {
            // A kick before SET_MEM_TABLE: nothing can be read yet.
            tracing::warn!("queue {device_event} kicked before guest memory was set");
            return Ok(());
        };
        if usize::from(device_event) == HIPRIO_QUEUE {
            tracing::trace!("high-priority queue kicked");
        }
        // Errors here are about our own notification fds, never the guest's data: the
        // caller stops this queue thread on them, which is what must happen.
        if self.event_idx {
            // Process until the guest added nothing new while notifications were off.
            loop {
                vring.disable_notification().map_err(io::Error::other)?;
                process_queue(&self.server, mem, vring)?;
                if !vring.enable_notification().map_err(io::Error::other)? {
                    break;
                }
            }
        } else {
            process_queue(&self.server, mem, vring)?;
        }
        Ok(())
    }
}

/// Serve every available request on `vring`, then notify the guest if it wants to be.
/// Each chain goes through the built-in device's checks ([`serve_chain`]) and always goes
/// back to the guest. Returns the number of requests completed.
pub fn process_queue<V: VringT<SharedMemory>>(
    server: &Server<Arc<Vfs>>,
    mem: &SharedMemory,
    vring: &V,
) -> io::Result<usize> {
    let guard = mem.memory();
    let mem: &GuestMemoryMmap<()> = &guard;
    let mut completed = 0;
    loop {
        // The vring lock is not held while the file server works on a request.
        let Some(chain) = vring.get_mut().get_queue_mut().pop_descriptor_chain(mem) else {
            break;
        };
        let head = chain.head_index();
        let written = serve_chain(server, mem, chain);
        if let Err(err) = vring.add_used(head, written) {
            // Only a used ring outside guest memory does this: no later request can complete.
            tracing::error!("cannot complete virtio-fs descriptor {head}: {err}");
            break;
        }
        completed += 1;
    }
    if completed > 0 && vring.needs_notification().unwrap_or(true) {
        vring.signal_used_queue()?;
    }
    Ok(completed)
}

/// A vhost-user-fs server for one frontend connection.
pub struct VhostUserFsDaemon {
    daemon: VhostUserDaemon<Arc<RwLock<VhostUserFsBackend>>>,
}

impl VhostUserFsDaemon {
    /// A daemon serving `vfs` under `tag`.
    pub fn new(vfs: Arc<Vfs>, tag: &str) -> Result<Self, VhostUserFsError> {
        let backend = Arc::new(RwLock::new(VhostUserFsBackend::new(vfs, tag)?));
        let daemon = VhostUserDaemon::new(
            crate::threads::VHOST_FS.to_string(),
            backend,
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .map_err(|err| VhostUserFsError::Daemon(err.to_string()))?;
        Ok(Self { daemon })
    }

    /// Listen on `socket` (replacing a stale socket file), accept one frontend and serve it
    /// until it disconnects. `on_listening` runs once the socket accepts connections.
    pub fn serve(mut self, socket: &Path, on_listening: impl FnOnce()) -> Result<(), VhostUserFsError> {
        let mut listener = Listener::new(socket, true)
            .map_err(|err| VhostUserFsError::Listen { path: socket.to_path_buf(), reason: err.to_string() })?;
        on_listening();
        self.daemon.start(&mut listener).map_err(|err| VhostUserFsError::Session(err.to_string()))?;
        let result = self.daemon.wait();
        for handler in self.daemon.get_epoll_handlers() {
            handler.send_exit_event();
        }
        match result {
            Ok(()) => Ok(()),
            // A frontend that goes away (QEMU exiting) is the normal end of a session.
            Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
            )) => Ok(()),
            Err(err) => Err(VhostUserFsError::Session(err.to_string())),
        }
    }
}

#[cfg(test)]
mod tests;
