//! The virtio-net device's subscriber on the `tern-net` event loop: it owns the activated
//! queues and moves frames between them and the tap.
//!
//! Every chain the guest posts is hostile input. Before a byte moves, a chain must have at most
//! [`MAX_CHAIN_DESCRIPTORS`] descriptors, all of the right direction (device-writable on rx,
//! device-readable on tx), each inside guest memory; a tx chain must hold a virtio-net header
//! and at most [`MAX_PACKET_LEN`] bytes, an rx chain at least a header. The buffers are listed
//! once, when the chain is checked, and only that list is used afterwards, so a guest rewriting
//! its descriptor table meanwhile changes nothing. A bad chain goes back unused (length 0) and
//! is counted; the queue carries on.
//!
//! RX reads the tap only while the guest has buffers posted: without them the handler asks the
//! guest for a kick (`enable_notification`, which with `VIRTIO_RING_F_EVENT_IDX` sets the avail
//! event), keeps the frame it may already have read, and [`NetHandler::wants_tap_events`] turns
//! false so the subscriber takes the tap out of the epoll set until that kick.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory as _};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::tap::TapIo;
use super::{MAX_PACKET_LEN, NUM_QUEUES, VNET_HDR_LEN};
use crate::devices::virtio::{InterruptSignal, INT_VRING};
use crate::memory::GuestMemory;
use crate::metrics::NetMetrics;

/// Queue indices (virtio 1.2, 5.1.2).
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
/// Event data of the tap fd (queue kicks use their queue index).
pub const TAP_EVENT: u32 = 2;
/// Longest chain accepted. Linux uses at most `MAX_SKB_FRAGS + 2` descriptors per frame
/// (19 by default, 47 with the largest `CONFIG_MAX_SKB_FRAGS`).
pub const MAX_CHAIN_DESCRIPTORS: usize = 64;
/// Frames moved per wakeup and direction before the loop serves its other devices.
pub const BUDGET: usize = 256;
/// Offset of `num_buffers` in `virtio_net_hdr_v1`.
const NUM_BUFFERS_OFFSET: usize = 10;

/// Why a chain was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    #[error("chain has more than {MAX_CHAIN_DESCRIPTORS} descriptors")]
    TooManyDescriptors,
    #[error("transmit chain has a device-writable descriptor")]
    WritableInTx,
    #[error("receive chain has a device-readable descriptor")]
    ReadableInRx,
    #[error("transmit chain holds more than {MAX_PACKET_LEN} bytes")]
    TooLarge,
    #[error("chain holds {0} bytes, less than a virtio-net header")]
    TooShort(usize),
    #[error("descriptor of {len} bytes at {addr:#x} lies outside guest memory")]
    OutsideMemory { addr: u64, len: u32 },
}

type Chain<'a> = DescriptorChain<&'a GuestMemory>;
/// One guest buffer, checked to lie in guest memory: (address, length).
type Region = (GuestAddress, usize);

/// Check `chain` and list its buffers in `regions`: device-writable ones for rx (`writable`),
/// readable ones for tx. Returns their total length.
fn chain_regions(
    mem: &GuestMemory,
    chain: Chain<'_>,
    writable: bool,
    regions: &mut Vec<Region>,
) -> Result<usize, ChainError> {
    regions.clear();
    let mut total = 0usize;
    for (count, desc) in chain.enumerate() {
        if count >= MAX_CHAIN_DESCRIPTORS {
            return Err(ChainError::TooManyDescriptors);
        }
        match (writable, desc.is_write_only()) {
            (true, false) => return Err(ChainError::ReadableInRx),
            (false, true) => return Err(ChainError::WritableInTx),
            _ => {}
        }
        let len = desc.len() as usize;
        if len == 0 {
            continue;
        }
        if !mem.check_range(desc.addr(), len) {
            return Err(ChainError::OutsideMemory { addr: desc.addr().0, len: desc.len() });
        }
        total = total.saturating_add(len);
        if !writable && total > MAX_PACKET_LEN {
            return Err(ChainError::TooLarge);
        }
        regions.push((desc.addr(), len));
    }
    if total < VNET_HDR_LEN {
        return Err(ChainError::TooShort(total));
    }
    Ok(total)
}

/// Pop the next chain; when there is none, ask the guest to kick when it posts one (and look
/// once more, for a chain posted meanwhile).
fn pop_or_enable_notification<'a>(mem: &'a GuestMemory, queue: &mut Queue) -> Option<Chain<'a>> {
    if let Some(chain) = queue.pop_descriptor_chain(mem) {
        return Some(chain);
    }
    match queue.enable_notification(mem) {
        Ok(true) => queue.pop_descriptor_chain(mem),
        Ok(false) => None,
        Err(e) => {
            tracing::debug!(error = %e, "cannot enable virtio-net queue notifications");
            None
        }
    }
}

/// An rx chain taken from the queue, checked, waiting for a frame.
struct RxChain {
    head: u16,
    regions: Vec<Region>,
    capacity: usize,
}

/// What became of a frame read from the tap.
enum Delivery {
    Delivered,
    /// Larger than the guest's buffers can ever hold: dropped.
    Dropped,
    /// Not enough buffers yet: the frame waits for the guest to post more.
    NoRoom,
}

struct RxState {
    /// The frame read from the tap, header first.
    frame: Vec<u8>,
    /// Length of a frame in `frame` not yet delivered.
    pending: Option<usize>,
    /// Chains popped and checked, in avail order.
    held: VecDeque<RxChain>,
    /// Sum of the capacities of `held`.
    held_bytes: usize,
    /// Region lists of used chains, for reuse.
    spare_regions: Vec<Vec<Region>>,
    /// (head, bytes) of the chains one frame fills.
    used_scratch: Vec<(u16, u32)>,
    /// The guest has no room for the next frame: the tap is not read until an rx kick.
    waiting_for_buffers: bool,
    /// Reading the tap failed: not read again until an rx kick.
    tap_failed: bool,
}

struct TxState {
    frame: Vec<u8>,
    regions: Vec<Region>,
    /// The handler kicked its own tx eventfd to resume after [`BUDGET`] frames.
    self_kicked: bool,
}

/// Moves frames between the guest's queues and the tap.
pub struct NetHandler {
    name: String,
    mem: GuestMemory,
    interrupt: Arc<dyn InterruptSignal>,
    queues: [Queue; NUM_QUEUES],
    kicks: [EventFd; NUM_QUEUES],
    tap: Arc<dyn TapIo>,
    mrg_rxbuf: bool,
    /// Set by a device reset: from then on the guest's queue memory is no longer ours to touch.
    stopped: Arc<AtomicBool>,
    metrics: Arc<NetMetrics>,
    rx: RxState,
    tx: TxState,
    /// Queues with used entries not yet signalled.
    used: [bool; NUM_QUEUES],
    /// Whether the tap fd is in the epoll set.
    tap_polled: bool,
}

impl NetHandler {
    /// A handler for the device `name` (for logs) with the queues the driver activated.
    pub fn new(
        name: &str,
        mem: GuestMemory,
        interrupt: Arc<dyn InterruptSignal>,
        queues: [Queue; NUM_QUEUES],
        kicks: [EventFd; NUM_QUEUES],
        tap: Arc<dyn TapIo>,
        acked_features: u64,
    ) -> Self {
        NetHandler {
            name: name.to_owned(),
            mem,
            interrupt,
            queues,
            kicks,
            tap,
            mrg_rxbuf: acked_features & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0,
            stopped: Arc::new(AtomicBool::new(false)),
            metrics: Arc::new(NetMetrics::new(name)),
            rx: RxState {
                frame: vec![0; MAX_PACKET_LEN],
                pending: None,
                held: VecDeque::new(),
                held_bytes: 0,
                spare_regions: Vec::new(),
                used_scratch: Vec::new(),
                waiting_for_buffers: false,
                tap_failed: false,
            },
            tx: TxState { frame: Vec::with_capacity(MAX_PACKET_LEN), regions: Vec::new(), self_kicked: false },
            used: [false; NUM_QUEUES],
            tap_polled: false,
        }
    }

    /// Count packets, bytes, drops and kicks in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<NetMetrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// The flag a device reset sets to stop this handler.
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stopped.clone()
    }

    #[cfg(test)]
    /// The handler's counters.
    pub fn metrics(&self) -> &NetMetrics {
        &self.metrics
    }

    /// Whether the tap should be polled: not while the guest has no room for a frame, nor after
    /// a read error, until the next rx kick.
    pub fn wants_tap_events(&self) -> bool {
        !self.rx.waiting_for_buffers && !self.rx.tap_failed
    }

    #[cfg(test)]
    /// Whether a frame read from the tap waits for guest buffers.
    pub fn has_pending_frame(&self) -> bool {
        self.rx.pending.is_some()
    }

    /// Handle one wakeup: `source` is a queue index or [`TAP_EVENT`].
    pub fn handle(&mut self, source: u32) {
        match source {
            s if s == RX_QUEUE as u32 => {
                self.drain_kick(RX_QUEUE);
                // New buffers: read the tap again, even after it failed.
                self.rx.tap_failed = false;
            }
            s if s == TX_QUEUE as u32 => {
                self.drain_kick(TX_QUEUE);
                self.process_tx();
            }
            TAP_EVENT => {}
            other => {
                tracing::warn!(device = %self.name, other, "unexpected virtio-net event source")
            }
        }
        self.process_rx();
        self.notify_used();
    }

    fn drain_kick(&mut self, queue: usize) {
        let Some(kick) = self.kicks.get(queue) else {
            return;
        };
        // EAGAIN only means no kick was pending.
        if let Ok(kicks) = kick.read() {
            let own = u64::from(queue == TX_QUEUE && std::mem::take(&mut self.tx.self_kicked));
            self.metrics.device.queue_notified(queue, kicks.saturating_sub(own));
        }
    }

    /// Send every tx chain the guest posted (up to [`BUDGET`] per call).
    pub fn process_tx(&mut self) {
        let mut sent = 0;
        loop {
            let queue = &mut self.queues[TX_QUEUE];
            if let Err(e) = queue.disable_notification(&self.mem) {
                tracing::debug!(device = %self.name, error = %e, "cannot disable virtio-net tx notifications");
            }
            let mut popped = false;
            while let Some(chain) = queue.pop_descriptor_chain(&self.mem) {
                if self.stopped.load(Ordering::Relaxed) {
                    // Reset meanwhile: the queue is no longer ours.
                    return;
                }
                popped = true;
                let head = chain.head_index();
                self.tx.transmit(&self.mem, chain, &*self.tap, &self.metrics, &self.name);
                // Every chain goes back, even a refused one, or the guest leaks the buffer.
                if let Err(e) = queue.add_used(&self.mem, head, 0) {
                    tracing::warn!(device = %self.name, error = %e, "cannot return a virtio-net tx buffer");
                }
                self.used[TX_QUEUE] = true;
                sent += 1;
                if sent >= BUDGET {
                    self.resume_tx_later();
                    return;
                }
            }
            // A chain posted after the last pop but before notifications were back on would
            // otherwise wait for the guest's next kick. A round that popped nothing ends the
            // loop even then: a lying avail index must not keep us here.
            match queue.enable_notification(&self.mem) {
                Ok(true) if popped => continue,
                Ok(_) => break,
                Err(e) => {
                    tracing::debug!(device = %self.name, error = %e, "cannot enable virtio-net tx notifications");
                    break;
                }
            }
        }
    }

    /// After [`BUDGET`] frames, come back through the event loop instead of looping on.
    fn resume_tx_later(&mut self) {
        self.tx.self_kicked = true;
        if let Err(e) = self.kicks[TX_QUEUE].write(1) {
            self.tx.self_kicked = false;
            tracing::warn!(device = %self.name, error = %e, "cannot requeue virtio-net tx work");
            // Then at least let the guest's next post kick us.
            let _ = self.queues[TX_QUEUE].enable_notification(&self.mem);
        }
    }

    /// Move frames from the tap to the guest while it has buffers (up to [`BUDGET`] per call).
    pub fn process_rx(&mut self) {
        self.rx.waiting_for_buffers = false;
        for _ in 0..BUDGET {
            if self.stopped.load(Ordering::Relaxed) {
                // Reset meanwhile: the queue is no longer ours.
                return;
            }
            let len = match self.rx.pending {
                Some(len) => len,
                None => {
                    if self.rx.tap_failed {
                        return;
                    }
                    // Read the tap only while the guest has somewhere to put the frame.
                    if !self.refill_rx(VNET_HDR_LEN) {
                        self.rx.waiting_for_buffers = true;
                        return;
                    }
                    let Some(len) = self.read_tap() else { return };
                    self.rx.pending = Some(len);
                    len
                }
            };
            match self.deliver(len) {
                Delivery::Delivered => {
                    self.rx.pending = None;
                    self.metrics.rx_frame(len - VNET_HDR_LEN);
                }
                Delivery::Dropped => {
                    self.rx.pending = None;
                    self.metrics.rx_dropped();
                    tracing::debug!(device = %self.name, len, "frame larger than the guest's rx buffers dropped");
                }
                Delivery::NoRoom => {
                    self.rx.waiting_for_buffers = true;
                    return;
                }
            }
        }
    }

    /// Read one frame into `rx.frame`; `None` when the tap has nothing (or failed).
    fn read_tap(&mut self) -> Option<usize> {
        for _ in 0..BUDGET {
            match self.tap.read_frame(&mut self.rx.frame) {
                Ok(0) => {
                    tracing::warn!(device = %self.name, "the tap reported end of file");
                    self.rx.tap_failed = true;
                    return None;
                }
                Ok(len) if len < VNET_HDR_LEN => {
                    tracing::debug!(device = %self.name, len, "frame without a virtio-net header dropped");
                    self.metrics.rx_dropped();
                }
                Ok(len) => return Some(len),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!(device = %self.name, error = %e, "cannot read the tap; retrying after the next rx kick");
                    self.rx.tap_failed = true;
                    return None;
                }
            }
        }
        // Only runts: leave the rest to the next wakeup (the tap stays readable).
        None
    }

    /// Bytes the held chains can take for one frame: all of them with mergeable buffers, the
    /// first one without.
    fn held_capacity(&self) -> usize {
        if self.mrg_rxbuf {
            self.rx.held_bytes
        } else {
            self.rx.held.front().map_or(0, |c| c.capacity)
        }
    }

    /// Take rx chains from the queue until the held ones can take `need` bytes. Returns false
    /// when the queue runs dry first (or more chains would not help).
    fn refill_rx(&mut self, need: usize) -> bool {
        let queue_size = usize::from(self.queues[RX_QUEUE].size());
        // Bounded: each pass takes one chain from a ring of `queue_size` entries.
        for _ in 0..=queue_size {
            if self.held_capacity() >= need {
                return true;
            }
            // Without mergeable buffers a frame fits the first chain or nothing.
            if (!self.mrg_rxbuf && !self.rx.held.is_empty()) || self.rx.held.len() >= queue_size {
                return false;
            }
            let Some(chain) = pop_or_enable_notification(&self.mem, &mut self.queues[RX_QUEUE]) else {
                return false;
            };
            let head = chain.head_index();
            let mut regions = self.rx.spare_regions.pop().unwrap_or_default();
            match chain_regions(&self.mem, chain, true, &mut regions) {
                Ok(capacity) => {
                    self.rx.held_bytes += capacity;
                    self.rx.held.push_back(RxChain { head, regions, capacity });
                }
                Err(e) => {
                    tracing::debug!(device = %self.name, error = %e, "virtio-net rx chain refused");
                    self.metrics.bad_chain();
                    self.rx.spare_regions.push(regions);
                    if let Err(e) = self.queues[RX_QUEUE].add_used(&self.mem, head, 0) {
                        tracing::warn!(device = %self.name, error = %e, "cannot return a virtio-net rx buffer");
                    }
                    self.used[RX_QUEUE] = true;
                }
            }
        }
        // The guest kept posting bad chains: make sure its next post still kicks us.
        if let Err(e) = self.queues[RX_QUEUE].enable_notification(&self.mem) {
            tracing::debug!(device = %self.name, error = %e, "cannot enable virtio-net rx notifications");
        }
        self.held_capacity() >= need
    }

    /// Put the frame of `len` bytes in `rx.frame` into held chains, if they can take it.
    fn deliver(&mut self, len: usize) -> Delivery {
        if self.refill_rx(len) {
            self.write_frame(len);
            return Delivery::Delivered;
        }
        let ring_full = self.rx.held.len() >= usize::from(self.queues[RX_QUEUE].size());
        if (!self.mrg_rxbuf && !self.rx.held.is_empty()) || ring_full {
            Delivery::Dropped
        } else {
            Delivery::NoRoom
        }
    }

    /// Copy the frame into as many held chains as it needs and publish them as used, all at
    /// once, so no other used entry falls between a frame's buffers.
    fn write_frame(&mut self, len: usize) {
        let RxState { frame, held, held_bytes, spare_regions, used_scratch, .. } = &mut self.rx;
        let mut chains = 0usize;
        let mut left = len;
        for chain in held.iter() {
            chains += 1;
            if chain.capacity >= left {
                break;
            }
            left -= chain.capacity;
        }
        // At most one chain per queue entry, so this fits a u16.
        let num_buffers = u16::try_from(chains).unwrap_or(u16::MAX);
        frame[NUM_BUFFERS_OFFSET..VNET_HDR_LEN].copy_from_slice(&num_buffers.to_le_bytes());

        let mut offset = 0;
        let mut failed = false;
        used_scratch.clear();
        for _ in 0..chains {
            let Some(chain) = held.pop_front() else { break };
            *held_bytes -= chain.capacity;
            let mut written = 0usize;
            for &(addr, region_len) in &chain.regions {
                if offset >= len {
                    break;
                }
                let n = region_len.min(len - offset);
                if let Err(e) = self.mem.write_slice(&frame[offset..offset + n], addr) {
                    tracing::warn!(device = %self.name, error = %e, "cannot write a frame to guest memory");
                    failed = true;
                }
                offset += n;
                written += n;
            }
            used_scratch.push((chain.head, u32::try_from(written).unwrap_or(0)));
            let mut regions = chain.regions;
            regions.clear();
            spare_regions.push(regions);
        }
        for &(head, written) in used_scratch.iter() {
            // A chain that could not be filled goes back empty: the driver drops it alone.
            let written = if failed { 0 } else { written };
            if let Err(e) = self.queues[RX_QUEUE].add_used(&self.mem, head, written) {
                tracing::warn!(device = %self.name, error = %e, "cannot return a virtio-net rx buffer");
            }
        }
        self.used[RX_QUEUE] = true;
    }

    /// Signal the queues that got used entries, as far as the driver wants to hear of them.
    fn notify_used(&mut self) {
        for queue in [RX_QUEUE, TX_QUEUE] {
            if !std::mem::take(&mut self.used[queue]) {
                continue;
            }
            // If the used ring cannot be read, notify anyway: a spurious interrupt is harmless.
            if self.queues[queue].needs_notification(&self.mem).unwrap_or(true) {
                if let Err(e) = self.interrupt.trigger(INT_VRING) {
                    tracing::warn!(device = %self.name, error = %e, "cannot signal the virtio-net interrupt");
                }
            }
        }
    }

    /// Put the tap in or out of the epoll set, as [`NetHandler::wants_tap_events`] says.
    fn sync_tap_interest(&mut self, ops: &mut EventOps) {
        let want = self.wants_tap_events();
        if want == self.tap_polled {
            return;
        }
        let events = Events::with_data_raw(self.tap.raw_fd(), TAP_EVENT, EventSet::IN);
        let result = if want { ops.add(events) } else { ops.remove(events) };
        match result {
            Ok(()) => self.tap_polled = want,
            Err(e) => {
                tracing::error!(device = %self.name, want, error = %e, "cannot change the tap's epoll registration")
            }
        }
    }
}

impl TxState {
    /// Check one tx chain, gather its frame and write it to the tap. A bad chain or a frame the
    /// tap refuses is counted and dropped.
    fn transmit(&mut self, mem: &GuestMemory, chain: Chain<'_>, tap: &dyn TapIo, metrics: &NetMetrics, name: &str) {
        let len = match chain_regions(mem, chain, false, &mut self.regions) {
            Ok(len) => len,
            Err(e) => {
                tracing::debug!(device = %name, error = %e, "virtio-net tx chain refused");
                metrics.bad_chain();
                return;
            }
        };
        // `len` is at most MAX_PACKET_LEN, the capacity: no reallocation.
        self.frame.resize(len, 0);
        let mut offset = 0;
        for &(addr, region_len) in &self.regions {
            if let Err(e) = mem.read_slice(&mut self.frame[offset..offset + region_len], addr) {
                tracing::debug!(device = %name, error = %e, "virtio-net tx chain unreadable");
                metrics.bad_chain();
                return;
            }
            offset += region_len;
        }
        match tap.write_frame(&self.frame) {
            Ok(written) if written == len => metrics.tx_frame(len - VNET_HDR_LEN),
            Ok(written) => {
                tracing::debug!(device = %name, len, written, "the tap took part of a frame");
                metrics.tx_dropped();
            }
            Err(e) => {
                // EAGAIN included: the frame is dropped, never retried (TCP resends).
                tracing::trace!(device = %name, error = %e, "the tap refused a frame");
                metrics.tx_dropped();
            }
        }
    }
}

impl MutEventSubscriber for NetHandler {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if self.stopped.load(Ordering::SeqCst) {
            // The device was reset and our removal is queued; stop this fd from firing again.
            let _ = ops.remove(events);
            return;
        }
        let source = events.data();
        let set = events.event_set();
        if source == TAP_EVENT && set.intersects(EventSet::ERROR | EventSet::HANG_UP) && !set.contains(EventSet::IN) {
            // Polled again it would fire at once, forever: wait for the next rx kick.
            tracing::warn!(device = %self.name, "the tap reported an error; retrying after the next rx kick");
            self.rx.tap_failed = true;
        } else if set.intersects(EventSet::ERROR) {
            tracing::warn!(device = %self.name, source, "virtio-net event source reported an error");
        }
        self.handle(source);
        self.sync_tap_interest(ops);
    }

    fn init(&mut self, ops: &mut EventOps) {
        for (index, kick) in self.kicks.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(kick, index as u32, EventSet::IN)) {
                tracing::error!(device = %self.name, index, error = %e, "cannot watch a virtio-net queue kick");
            }
        }
        // Chains posted before we were registered, and frames already waiting in the tap.
        self.process_tx();
        self.process_rx();
        self.notify_used();
        self.sync_tap_interest(ops);
    }
}
