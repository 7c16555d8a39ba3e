//! The guest driver's side of split queues, for the devices' unit tests over in-memory guest
//! memory. Descriptors go through virtio-queue's `MockSplitQueue`; the rings are laid out
//! here, because the mock places its used ring over the upper half of its avail ring (it sizes
//! the avail ring in elements, not bytes), which corrupts both once more than half the ring
//! has been posted.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::sync::atomic::{AtomicUsize, Ordering};

use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::InterruptSignal;
use crate::memory::GuestMemory;

/// An interrupt line that counts its triggers.
#[derive(Default)]
pub struct CountingInterrupt(pub AtomicUsize);

impl InterruptSignal for CountingInterrupt {
    fn trigger(&self, _status_bits: u32) -> std::io::Result<()> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// One split queue of `size` entries at `desc`, as the driver sees it.
pub struct Ring {
    pub mock: MockSplitQueue<'static, GuestMemory>,
    pub mem: &'static GuestMemory,
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub next_desc: u16,
    pub avail_idx: u16,
    pub next_used: u16,
}

impl Ring {
    /// A queue of `size` entries at `base`, its indexes and event slots zeroed.
    pub fn new(mem: &'static GuestMemory, base: u64, size: u16) -> Self {
        let avail = base + 16 * u64::from(size);
        let used = Ring::used_ring_of(base, size);
        for addr in [avail, avail + 2, avail + 4 + 2 * u64::from(size), used, used + 2, used + 4 + 8 * u64::from(size)]
        {
            mem.write_obj(0u16, GuestAddress(addr)).unwrap();
        }
        let mock = MockSplitQueue::create(mem, GuestAddress(base), size);
        Ring { mock, mem, size, desc: base, avail, used, next_desc: 0, avail_idx: 0, next_used: 0 }
    }

    /// Where [`Ring::new`] puts the used ring of a queue of `size` entries at `base`.
    pub fn used_ring_of(base: u64, size: u16) -> u64 {
        let avail = base + 16 * u64::from(size);
        (avail + 6 + 2 * u64::from(size) + 3) & !3
    }

    /// Post a chain of (addr, len, device-writable) buffers; returns the head index.
    pub fn post(&mut self, bufs: &[(u64, u32, bool)]) -> u16 {
        let size = self.size;
        let head = self.next_desc;
        for (i, &(addr, len, write)) in bufs.iter().enumerate() {
            let idx = (head + i as u16) % size;
            let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
            if i + 1 < bufs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let desc = SplitDescriptor::new(addr, len, flags, (idx + 1) % size);
            self.mock.desc_table().store(idx, RawDescriptor::from(desc)).unwrap();
        }
        self.next_desc = (head + bufs.len() as u16) % size;
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % size);
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2)).unwrap();
        head
    }

    pub fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(self.used + 2)).unwrap()
    }

    /// Used entries since the last call: (head, len).
    pub fn used(&mut self) -> Vec<(u16, u32)> {
        let idx = self.used_idx();
        let mut out = Vec::new();
        while self.next_used != idx {
            let elem = self.used + 4 + 8 * u64::from(self.next_used % self.size);
            let id: u32 = self.mem.read_obj(GuestAddress(elem)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(elem + 4)).unwrap();
            out.push((id as u16, len));
            self.next_used = self.next_used.wrapping_add(1);
        }
        out
    }

    /// With EVENT_IDX: where the device says the driver should kick next.
    pub fn avail_event(&self) -> u16 {
        self.mem.read_obj(GuestAddress(self.used + 4 + 8 * u64::from(self.size))).unwrap()
    }

    pub fn set_avail_event(&self, idx: u16) {
        self.mem.write_obj(idx, GuestAddress(self.used + 4 + 8 * u64::from(self.size))).unwrap();
    }

    /// With EVENT_IDX: interrupt me only once the used index passes `idx`.
    pub fn set_used_event(&self, idx: u16) {
        self.mem.write_obj(idx, GuestAddress(self.avail + 4 + 2 * u64::from(self.size))).unwrap();
    }

    /// The device's view of this ring, ready.
    pub fn queue(&self, event_idx: bool) -> Queue {
        let mut q = Queue::new(self.size).unwrap();
        q.set_size(self.size);
        q.set_desc_table_address(Some(self.desc as u32), Some((self.desc >> 32) as u32));
        q.set_avail_ring_address(Some(self.avail as u32), Some((self.avail >> 32) as u32));
        q.set_used_ring_address(Some(self.used as u32), Some((self.used >> 32) as u32));
        q.set_event_idx(event_idx);
        q.set_ready(true);
        q
    }
}
