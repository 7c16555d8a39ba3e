//! In-memory harnesses over the real devices, for the fuzz targets in `fuzz/` (feature
//! `fuzzing`) and for the unit tests that replay the committed corpus (`fuzz/corpus/<target>/`).
//!
//! Each harness takes the fuzzer's bytes, plays them as a guest driver would (register
//! accesses, descriptor chains over a `GuestMemoryMmap`, host-side socket traffic) and panics
//! only when an invariant the device promises is broken; a refused request is not a failure.
//! Guest memory is allocated once per harness and zeroed before every input, so an input
//! replays the same way whatever ran before it.
#![allow(clippy::unwrap_used, clippy::expect_used)] // harness setup failing is a harness bug

pub mod fs;
pub mod mmio;
pub mod net;
pub mod vsock;

use std::path::PathBuf;
use std::sync::OnceLock;

use vm_memory::{Bytes, GuestAddress};

use crate::devices::virtio::test_ring::Ring;
use crate::memory::GuestMemory;

/// The fuzzer's bytes, read front to back; past the end every read gives zeros.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Input { data }
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn u8(&mut self) -> u8 {
        let Some((&b, rest)) = self.data.split_first() else { return 0 };
        self.data = rest;
        b
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    pub fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | (u64::from(self.u32()) << 32)
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.data.split_at(n.min(self.data.len()));
        self.data = rest;
        head
    }
}

/// Guest memory of `size` bytes at address 0, shared by every input of one harness (`slot`)
/// and zeroed before each.
fn zeroed_memory(slot: &'static OnceLock<&'static GuestMemory>, size: usize) -> &'static GuestMemory {
    let mem = *slot.get_or_init(|| Box::leak(Box::new(GuestMemory::from_ranges(&[(GuestAddress(0), size)]).unwrap())));
    mem.write_slice(&vec![0u8; size], GuestAddress(0)).unwrap();
    mem
}

/// Where [`post_chain`] puts buffers: readable ones (filled from the input) from `readable`,
/// writable ones from `writable`, each range used front to back and wrapped when full.
pub struct Areas {
    pub readable: std::ops::Range<u64>,
    pub writable: std::ops::Range<u64>,
    pub next_readable: u64,
    pub next_writable: u64,
}

impl Areas {
    pub fn new(readable: std::ops::Range<u64>, writable: std::ops::Range<u64>) -> Self {
        Areas { next_readable: readable.start, next_writable: writable.start, readable, writable }
    }

    pub fn take(next: &mut u64, range: &std::ops::Range<u64>, len: u64) -> u64 {
        if *next + len > range.end {
            *next = range.start;
        }
        let addr = *next;
        *next = (*next + len).min(range.end);
        addr
    }
}

/// Where every harness keeps its rings: the first 64 KiB of guest memory.
pub const RINGS: std::ops::Range<u64> = 0..0x1_0000;

/// Post one chain the input describes: up to `max_desc` descriptors, each readable (its
/// bytes taken from the input) or writable, sometimes with an address and length the fuzzer
/// picks outright (outside guest memory, overlapping the rings, longer than memory). Returns
/// the head, the number of descriptors, and whether a writable one overlaps [`RINGS`]: the
/// device may then write the guest's own rings, as a hostile guest can make it do. The device
/// must survive that, but a harness can no longer expect its rings to hold what it posted.
pub fn post_chain(
    input: &mut Input<'_>,
    mem: &GuestMemory,
    ring: &mut Ring,
    areas: &mut Areas,
    max_desc: u8,
) -> (u16, u16, bool) {
    let count = 1 + input.u8() % max_desc.max(1);
    let mut bufs = Vec::with_capacity(usize::from(count));
    for _ in 0..count {
        let ctl = input.u8();
        let writable = ctl & 1 != 0;
        if ctl & 0x80 != 0 {
            // A raw descriptor.
            bufs.push((input.u64() >> (input.u8() % 64), input.u32(), writable));
            continue;
        }
        let len = u64::from(input.u16());
        if writable {
            let len = len.min(areas.writable.end - areas.writable.start);
            let addr = Areas::take(&mut areas.next_writable, &areas.writable, len);
            bufs.push((addr, len as u32, true));
        } else {
            let bytes = input.bytes(len.min(areas.readable.end - areas.readable.start) as usize);
            let addr = Areas::take(&mut areas.next_readable, &areas.readable, bytes.len() as u64);
            mem.write_slice(bytes, GuestAddress(addr)).unwrap();
            bufs.push((addr, bytes.len() as u32, false));
        }
    }
    let writes_rings = bufs.iter().any(|&(addr, len, writable)| {
        writable && addr < RINGS.end && addr.saturating_add(u64::from(len)) > RINGS.start
    });
    (ring.post(&bufs), u16::from(count), writes_rings)
}

/// Every file of `fuzz/corpus/<target>/`, for the replay tests.
pub fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus").join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {} unreadable: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files.into_iter().map(|p| (p.clone(), std::fs::read(&p).unwrap())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each harness over its committed corpus: what `make test` runs instead of cargo-fuzz.
    #[test]
    fn committed_corpus_replays_without_a_failure() {
        for (target, run) in
            [("mmio", mmio::run as fn(&[u8])), ("virtio_fs", fs::run), ("vsock", vsock::run), ("net", net::run)]
        {
            let files = corpus(target);
            assert!(!files.is_empty(), "no corpus for {target}");
            for (path, data) in files {
                eprintln!("replaying {}", path.display());
                run(&data);
            }
        }
    }
}
