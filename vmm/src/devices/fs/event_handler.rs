//! The virtio-fs device's subscriber on the `tern-fs` event loop: it owns the activated queues
//! and hands each request chain, checked first, to the FUSE server.
//!
//! Every chain the guest posts is hostile input. Before the server sees it, a chain must have
//! at most [`MAX_CHAIN_DESCRIPTORS`] descriptors, at most [`MAX_REQUEST_BYTES`] readable and
//! writable bytes, and a FUSE header whose `len` lies between the header size and the readable
//! bytes. A chain that fails gets an error reply (when it has room for one) or is returned
//! unused; either way only that request fails, and every chain goes back to the guest.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use fuse_backend_rs::abi::fuse_abi::{InHeader, OutHeader};
use fuse_backend_rs::api::server::{Server, MAX_BUFFER_SIZE};
use fuse_backend_rs::api::Vfs;
use fuse_backend_rs::transport::{Reader, VirtioFsWriter, Writer};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::ByteValued;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::devices::virtio::{InterruptSignal, INT_VRING};
use crate::memory::GuestMemory;
use crate::metrics::FsMetrics;
use crate::metrics::VmMetrics;

/// Queue indices (virtio 1.2, 5.11.2): FORGETs go on hiprio, everything else on request 0.
pub const HIPRIO_QUEUE: usize = 0;
pub const REQUEST_QUEUE: usize = 1;
/// Longest chain accepted: a 1 MiB request in 4 KiB pages plus headers, with room to spare.
pub const MAX_CHAIN_DESCRIPTORS: usize = 512;
/// Most readable (and most writable) bytes in one chain: the largest FUSE payload the server
/// negotiates plus a page for the headers.
pub const MAX_REQUEST_BYTES: usize = MAX_BUFFER_SIZE as usize + 4096;

const IN_HEADER_LEN: usize = std::mem::size_of::<InHeader>();
const OUT_HEADER_LEN: usize = std::mem::size_of::<OutHeader>();

/// Why a chain was refused before reaching the FUSE server.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    #[error("chain has more than {MAX_CHAIN_DESCRIPTORS} descriptors")]
    TooManyDescriptors,
    #[error("chain has {0} {1} bytes, more than {MAX_REQUEST_BYTES}")]
    TooLarge(usize, &'static str),
    #[error("chain has {0} readable bytes, less than a FUSE header")]
    NoHeader(usize),
    #[error("FUSE header claims {claimed} bytes, chain has {readable} readable")]
    BadHeaderLen { claimed: u32, readable: usize },
    #[error("chain points outside guest memory")]
    BadMemory,
}

type Chain<'a> = DescriptorChain<&'a GuestMemory>;

/// Serves FUSE requests from the guest's queues.
pub struct FsHandler {
    mem: GuestMemory,
    interrupt: Arc<dyn InterruptSignal>,
    queues: [Queue; 2],
    kicks: [EventFd; 2],
    server: Arc<Server<Arc<Vfs>>>,
    /// Set by a device reset: from then on the guest's queue memory is no longer ours to touch.
    stopped: Arc<AtomicBool>,
    metrics: Option<Arc<VmMetrics>>,
}

/// Count descriptors and bytes of a chain without consuming it.
fn check_chain_shape(chain: &Chain<'_>) -> Result<(), ChainError> {
    let (mut count, mut readable, mut writable) = (0usize, 0usize, 0usize);
    for desc in chain.clone() {
        count += 1;
        if count > MAX_CHAIN_DESCRIPTORS {
            return Err(ChainError::TooManyDescriptors);
        }
        let len = desc.len() as usize;
        if desc.is_write_only() {
            writable = writable.saturating_add(len);
        } else {
            readable = readable.saturating_add(len);
        }
    }
    if readable > MAX_REQUEST_BYTES {
        return Err(ChainError::TooLarge(readable, "readable"));
    }
    if writable > MAX_REQUEST_BYTES {
        return Err(ChainError::TooLarge(writable, "writable"));
    }
    Ok(())
}

/// The request's header, checked against the readable bytes.
fn check_header(reader: &Reader<'_>) -> Result<InHeader, ChainError> {
    let readable = reader.available_bytes();
    if readable < IN_HEADER_LEN {
        return Err(ChainError::NoHeader(readable));
    }
    let header: InHeader = reader.clone().read_obj().map_err(|_| ChainError::NoHeader(readable))?;
    if (header.len as usize) < IN_HEADER_LEN || header.len as usize > readable {
        return Err(ChainError::BadHeaderLen { claimed: header.len, readable });
    }
    Ok(header)
}

/// Answer `unique` with `-errno` if the chain has room for a reply header. Returns the bytes
/// written.
fn reply_error(writer: &mut Writer<'_>, unique: u64, errno: i32) -> u32 {
    if writer.available_bytes() < OUT_HEADER_LEN {
        return 0;
    }
    let header = OutHeader { len: OUT_HEADER_LEN as u32, error: -errno, unique };
    match writer.write_all(header.as_slice()) {
        Ok(()) => OUT_HEADER_LEN as u32,
        Err(e) => {
            tracing::debug!(error = %e, "cannot write a virtio-fs error reply");
            0
        }
    }
}

/// Serve one chain; returns the number of bytes written for the used ring.
pub fn serve_chain(server: &Server<Arc<Vfs>>, mem: &GuestMemory, chain: Chain<'_>) -> u32 {
    serve_chain_counted(server, mem, chain, None)
}

/// [`serve_chain`], counting the request (opcode, latency, failures) in `metrics`.
pub fn serve_chain_counted(
    server: &Server<Arc<Vfs>>,
    mem: &GuestMemory,
    chain: Chain<'_>,
    metrics: Option<&FsMetrics>,
) -> u32 {
    let refused = || {
        if let Some(m) = metrics {
            m.request_refused();
        }
    };
    if let Err(e) = check_chain_shape(&chain) {
        tracing::debug!(error = %e, "virtio-fs chain refused");
        refused();
        // Not even an error reply: a chain this shape is not from a well-behaved driver.
        return 0;
    }
    let reader = match Reader::from_descriptor_chain(mem, chain.clone()) {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(error = ?e, "{}", ChainError::BadMemory);
            refused();
            return 0;
        }
    };
    let mut writer: Writer<'_> = match VirtioFsWriter::new(mem, chain) {
        Ok(w) => w.into(),
        Err(e) => {
            tracing::debug!(error = ?e, "{}", ChainError::BadMemory);
            refused();
            return 0;
        }
    };
    let header = match check_header(&reader) {
        Ok(h) => h,
        Err(e) => {
            tracing::debug!(error = %e, "malformed virtio-fs request");
            refused();
            // The unique id is only trustworthy if the header was read at all.
            let unique = match e {
                ChainError::BadHeaderLen { .. } => reader.clone().read_obj::<InHeader>().map_or(0, |h| h.unique),
                _ => 0,
            };
            return if unique == 0 { 0 } else { reply_error(&mut writer, unique, libc::EINVAL) };
        }
    };
    tracing::trace!(
        opcode = header.opcode,
        unique = header.unique,
        nodeid = header.nodeid,
        len = header.len,
        "virtio-fs request"
    );
    let started = std::time::Instant::now();
    let result = server.handle_message(reader, writer, None, None);
    if let Some(m) = metrics {
        m.request_served(header.opcode, started.elapsed(), result.is_err());
    }
    match result {
        Ok(written) => u32::try_from(written).unwrap_or(0),
        Err(e) => {
            tracing::debug!(opcode = header.opcode, error = ?e, "virtio-fs request failed");
            0
        }
    }
}

impl FsHandler {
    pub fn new(
        mem: GuestMemory,
        interrupt: Arc<dyn InterruptSignal>,
        queues: [Queue; 2],
        kicks: [EventFd; 2],
        server: Arc<Server<Arc<Vfs>>>,
        stopped: Arc<AtomicBool>,
    ) -> Self {
        FsHandler { mem, interrupt, queues, kicks, server, stopped, metrics: None }
    }

    /// Count queue notifications and requests in `metrics`.
    pub fn with_metrics(mut self, metrics: Option<Arc<VmMetrics>>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Serve every chain posted on `queue`. Returns whether any was used.
    pub fn process_queue(&mut self, queue: usize) -> bool {
        let Some(q) = self.queues.get_mut(queue) else { return false };
        let mut used = false;
        while let Some(chain) = q.pop_descriptor_chain(&self.mem) {
            let head = chain.head_index();
            let len = serve_chain_counted(&self.server, &self.mem, chain, self.metrics.as_deref().map(|m| &m.fs));
            // Every chain goes back, even a refused one, or the guest leaks the buffer.
            if let Err(e) = q.add_used(&self.mem, head, len) {
                tracing::warn!(error = %e, "cannot return a virtio-fs buffer");
            }
            used = true;
        }
        used
    }

    fn handle(&mut self, queue: usize) {
        if let Some(kick) = self.kicks.get(queue) {
            // EAGAIN only means no kick was pending.
            if let (Ok(kicks), Some(m)) = (kick.read(), &self.metrics) {
                m.fs.device.queue_notified(queue, kicks);
            }
        }
        if self.process_queue(queue) {
            self.notify(queue);
        }
    }

    fn notify(&mut self, queue: usize) {
        let Some(q) = self.queues.get_mut(queue) else { return };
        // If the used ring cannot be read, notify anyway: a spurious interrupt is harmless.
        if q.needs_notification(&self.mem).unwrap_or(true) {
            if let Err(e) = self.interrupt.trigger(INT_VRING) {
                tracing::warn!(error = %e, "cannot signal the virtio-fs interrupt");
            }
        }
    }
}

impl MutEventSubscriber for FsHandler {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if self.stopped.load(Ordering::SeqCst) {
            // The device was reset and our removal is queued; stop this fd from firing again.
            let _ = ops.remove(events);
            return;
        }
        if events.event_set().intersects(EventSet::ERROR) {
            tracing::warn!(source = events.data(), "virtio-fs event source reported an error");
        }
        match events.data() {
            q if q == HIPRIO_QUEUE as u32 => self.handle(HIPRIO_QUEUE),
            q if q == REQUEST_QUEUE as u32 => self.handle(REQUEST_QUEUE),
            other => tracing::warn!(other, "unexpected virtio-fs event source"),
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        for (index, kick) in self.kicks.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(kick, index as u32, EventSet::IN)) {
                tracing::error!(index, error = %e, "cannot watch a virtio-fs queue kick");
            }
        }
        // Requests posted before we were registered: serve them now.
        for queue in [HIPRIO_QUEUE, REQUEST_QUEUE] {
            if self.process_queue(queue) {
                self.notify(queue);
            }
        }
    }
}
