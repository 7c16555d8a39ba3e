//! The vsock device's subscriber on the device event loop: it owns the activated queues and
//! the muxer, and moves packets between them when a queue is kicked or a host fd is ready.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use virtio_vsock::packet::VsockPacket;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::muxer::Muxer;
use super::packet::{Header, HEADER_SIZE, MAX_PKT_DATA, VSOCK_OP_RW};
use crate::devices::virtio::{InterruptSignal, INT_VRING};
use crate::memory::GuestMemory;
use crate::metrics::VmMetrics;

/// Queue indices (virtio 1.2, 5.10.2).
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
pub const EVENT_QUEUE: usize = 2;
/// Event data of the muxer's epoll fd (queue kicks use their queue index).
pub const MUXER_EVENT: u32 = 3;

/// Moves packets between the guest's queues and the muxer.
pub struct VsockHandler {
    mem: GuestMemory,
    interrupt: Arc<dyn InterruptSignal>,
    queues: [Queue; 3],
    kicks: [EventFd; 3],
    muxer: Muxer,
    /// Set by a device reset: from then on the guest's queue memory is no longer ours to touch.
    stopped: Arc<AtomicBool>,
    metrics: Option<Arc<VmMetrics>>,
}

impl VsockHandler {
    pub fn new(
        mem: GuestMemory,
        interrupt: Arc<dyn InterruptSignal>,
        queues: [Queue; 3],
        kicks: [EventFd; 3],
        muxer: Muxer,
        stopped: Arc<AtomicBool>,
    ) -> Self {
        VsockHandler { mem, interrupt, queues, kicks, muxer, stopped, metrics: None }
    }

    /// Count queue notifications and payload bytes in `metrics`.
    pub fn with_metrics(mut self, metrics: Option<Arc<VmMetrics>>) -> Self {
        self.metrics = metrics;
        self
    }

    /// The muxer (tests drive it directly).
    #[cfg(test)]
    pub fn muxer(&self) -> &Muxer {
        &self.muxer
    }

    #[cfg(any(test, feature = "fuzzing"))]
    pub fn rx_next_used(&self) -> u16 {
        self.queues[RX_QUEUE].next_used()
    }

    /// Handle one wakeup: `source` is a queue index or the muxer.
    pub fn handle(&mut self, source: u32) {
        let mut tx_used = false;
        match source {
            s if s == RX_QUEUE as u32 => self.drain_kick(RX_QUEUE),
            s if s == TX_QUEUE as u32 => {
                self.drain_kick(TX_QUEUE);
                tx_used = self.process_tx();
            }
            // The device never posts events (they exist for transport resets on migration).
            s if s == EVENT_QUEUE as u32 => self.drain_kick(EVENT_QUEUE),
            MUXER_EVENT => self.muxer.process_host_events(),
            other => tracing::warn!(other, "unexpected vsock event source"),
        }
        let rx_used = self.process_rx();
        if tx_used {
            self.notify(TX_QUEUE);
        }
        if rx_used {
            self.notify(RX_QUEUE);
        }
    }

    fn drain_kick(&mut self, queue: usize) {
        if let Some(kick) = self.kicks.get(queue) {
            // EAGAIN only means no kick was pending.
            if let (Ok(kicks), Some(m)) = (kick.read(), &self.metrics) {
                m.vsock.device.queue_notified(queue, kicks);
            }
        }
    }

    /// Consume every tx chain the guest posted. Returns whether any was used.
    pub fn process_tx(&mut self) -> bool {
        let mut used = false;
        let [_, txq, _] = &mut self.queues;
        while let Some(mut chain) = txq.pop_descriptor_chain(&self.mem) {
            let head = chain.head_index();
            match VsockPacket::from_tx_virtq_chain(&self.mem, &mut chain, MAX_PKT_DATA) {
                Ok(pkt) => {
                    let hdr = Header::of(&pkt);
                    if let (VSOCK_OP_RW, Some(m)) = (hdr.op, &self.metrics) {
                        m.vsock.received_from_guest(hdr.len);
                    }
                    self.muxer.send_pkt(&hdr, pkt.data_slice());
                }
                Err(e) => tracing::debug!(error = %e, "malformed vsock tx chain dropped"),
            }
            // Every chain goes back, even a malformed one, or the guest leaks the buffer.
            if let Err(e) = txq.add_used(&self.mem, head, 0) {
                tracing::warn!(error = %e, "cannot return a vsock tx buffer");
            }
            used = true;
        }
        used
    }

    /// Fill guest rx buffers while the muxer has packets. Returns whether any was used.
    pub fn process_rx(&mut self) -> bool {
        let mut used = false;
        let [rxq, _, _] = &mut self.queues;
        while self.muxer.has_pending_rx() {
            let Some(mut chain) = rxq.pop_descriptor_chain(&self.mem) else { break };
            let head = chain.head_index();
            let used_len = match VsockPacket::from_rx_virtq_chain(&self.mem, &mut chain, MAX_PKT_DATA) {
                Ok(mut pkt) => match self.muxer.recv_pkt(pkt.data_slice()) {
                    Some(hdr) => match hdr.write_to(&mut pkt) {
                        Ok(()) => {
                            if let (VSOCK_OP_RW, Some(m)) = (hdr.op, &self.metrics) {
                                m.vsock.sent_to_guest(hdr.len);
                            }
                            HEADER_SIZE as u32 + hdr.len
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot write a vsock rx header");
                            0
                        }
                    },
                    None => {
                        // Nothing to send after all: leave the buffer for later.
                        rxq.go_to_previous_position();
                        break;
                    }
                },
                Err(e) => {
                    tracing::debug!(error = %e, "malformed vsock rx chain returned unused");
                    0
                }
            };
            if let Err(e) = rxq.add_used(&self.mem, head, used_len) {
                tracing::warn!(error = %e, "cannot return a vsock rx buffer");
            }
            used = true;
        }
        used
    }

    fn notify(&mut self, queue: usize) {
        let Some(q) = self.queues.get_mut(queue) else { return };
        // If the used ring cannot be read, notify anyway: a spurious interrupt is harmless.
        if q.needs_notification(&self.mem).unwrap_or(true) {
            if let Err(e) = self.interrupt.trigger(INT_VRING) {
                tracing::warn!(error = %e, "cannot signal the vsock interrupt");
            }
        }
    }
}

impl MutEventSubscriber for VsockHandler {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if self.stopped.load(Ordering::SeqCst) {
            // The device was reset and our removal is queued; stop this fd from firing again.
            let _ = ops.remove(events);
            return;
        }
        if events.event_set().intersects(EventSet::ERROR) {
            tracing::warn!(source = events.data(), "vsock event source reported an error");
        }
        self.handle(events.data());
    }

    fn init(&mut self, ops: &mut EventOps) {
        for (index, kick) in self.kicks.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(kick, index as u32, EventSet::IN)) {
                tracing::error!(index, error = %e, "cannot watch a vsock queue kick");
            }
        }
        if let Err(e) = ops.add(Events::with_data_raw(self.muxer.epoll_fd(), MUXER_EVENT, EventSet::IN)) {
            tracing::error!(error = %e, "cannot watch the vsock muxer");
        }
        // Kicks that arrived before we were registered are still counted in the eventfds, but
        // process once anyway so nothing waits on a missed edge.
        let tx_used = self.process_tx();
        let rx_used = self.process_rx();
        if tx_used {
            self.notify(TX_QUEUE);
        }
        if rx_used {
            self.notify(RX_QUEUE);
        }
    }
}
