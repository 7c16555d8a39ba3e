//! virtio-net tx chains and rx buffers: the guest posts frames (well-formed or raw chains)
//! and receive buffers of any shape, the host side of a socket standing in for the tap sends
//! frames of any length. Every used rx buffer must be one the guest posted, at most once, and
//! filled no further than it holds (checked until a chain lets the device write the rings
//! themselves, see [`post_chain`]); every frame on the tap fits the largest packet.

use std::collections::HashMap;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, OnceLock};

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::{post_chain, zeroed_memory, Areas, Input};
use crate::devices::net::event_handler::{NetHandler, RX_QUEUE, TAP_EVENT, TX_QUEUE};
use crate::devices::net::test_utils::{socket_tap, EVENT_IDX, MRG};
use crate::devices::net::{MAX_PACKET_LEN, VNET_HDR_LEN};
use crate::devices::virtio::test_ring::{CountingInterrupt, Ring};
use crate::memory::GuestMemory;

const MEM_SIZE: usize = 0x20_0000;
const QSIZE: u16 = 256;
const RX_RING: u64 = 0x0;
const TX_RING: u64 = 0x4000;
const TX_AREA: std::ops::Range<u64> = 0x1_0000..0x8_0000;
const RX_AREA: std::ops::Range<u64> = 0x8_0000..0x20_0000;
const MAX_OPS: usize = 256;

/// Play `data` as guest tx/rx traffic and host frames on a fresh device.
pub fn run(data: &[u8]) {
    static MEM: OnceLock<&'static GuestMemory> = OnceLock::new();
    let mem = zeroed_memory(&MEM, MEM_SIZE);
    let mut input = Input::new(data);
    // Whether the rings still hold only what the harness wrote.
    let mut rings_trusted = true;
    let flags = input.u8();
    let features = if flags & 1 != 0 { MRG } else { 0 } | if flags & 2 != 0 { EVENT_IDX } else { 0 };
    let event_idx = features & EVENT_IDX != 0;
    let mut rx = Ring::new(mem, RX_RING, QSIZE);
    let mut tx = Ring::new(mem, TX_RING, QSIZE);
    let (tap, peer) = socket_tap();
    peer.set_nonblocking(true).unwrap();
    let mut handler = NetHandler::new(
        "tap-fuzz",
        mem.clone(),
        Arc::new(CountingInterrupt(AtomicUsize::new(0))),
        [rx.queue(event_idx), tx.queue(event_idx)],
        [EventFd::new(libc::EFD_NONBLOCK).unwrap(), EventFd::new(libc::EFD_NONBLOCK).unwrap()],
        tap,
        features,
    );
    let mut tx_areas = Areas::new(TX_AREA, TX_AREA);
    let mut rx_areas = Areas::new(RX_AREA, RX_AREA);
    let mut rx_posted: HashMap<u16, (u64, u16)> = HashMap::new();
    // Descriptors the device holds on each ring: the rings hand descriptors out in a circle and
    // the device returns chains in order, so at most QSIZE may be out at once.
    let (mut rx_in_flight, mut tx_in_flight) = (0u16, 0u16);
    let mut tx_posted: HashMap<u16, u16> = HashMap::new();
    let mut frame = vec![0u8; MAX_PACKET_LEN + 16];

    for _ in 0..MAX_OPS {
        if input.is_empty() {
            break;
        }
        match input.u8() % 9 {
            // A frame: the vnet header and the payload, split over up to three descriptors.
            0..=2 if tx_in_flight + 3 <= QSIZE => {
                let mut packet = input.bytes(VNET_HDR_LEN).to_vec();
                packet.resize(VNET_HDR_LEN, 0);
                let len = usize::from(input.u16()) % 2048;
                packet.extend_from_slice(input.bytes(len));
                let addr = Areas::take(&mut tx_areas.next_readable, &TX_AREA, packet.len() as u64);
                mem.write_slice(&packet, GuestAddress(addr)).unwrap();
                let total = packet.len() as u64;
                let a = u64::from(input.u16()) % (total + 1);
                let b = a + u64::from(input.u16()) % (total - a + 1);
                let chain: Vec<_> = [(0, a), (a, b), (b, total)]
                    .into_iter()
                    .filter(|(s, e)| e > s)
                    .map(|(s, e)| (addr + s, (e - s) as u32, false))
                    .collect();
                if chain.is_empty() {
                    continue;
                }
                let head = tx.post(&chain);
                tx_posted.insert(head, chain.len() as u16);
                tx_in_flight += chain.len() as u16;
                handler.handle(TX_QUEUE as u32);
            }
            3 if tx_in_flight + 8 <= QSIZE => {
                let (head, n, writes_rings) = post_chain(&mut input, mem, &mut tx, &mut tx_areas, 8);
                rings_trusted &= !writes_rings;
                tx_posted.insert(head, n);
                tx_in_flight += n;
                handler.handle(TX_QUEUE as u32);
            }
            // Receive buffers of one or two writable descriptors.
            4 => {
                for _ in 0..1 + input.u8() % 8 {
                    if rx_in_flight + 2 > QSIZE {
                        break;
                    }
                    let mut bufs = Vec::new();
                    for _ in 0..1 + input.u8() % 2 {
                        let len = u64::from(input.u16()) % 0x1_0000 + 1;
                        let addr = Areas::take(&mut rx_areas.next_writable, &RX_AREA, len);
                        bufs.push((addr, len as u32, true));
                    }
                    let cap = bufs.iter().map(|b| u64::from(b.1)).sum();
                    let head = rx.post(&bufs);
                    assert!(rx_posted.insert(head, (cap, bufs.len() as u16)).is_none());
                    rx_in_flight += bufs.len() as u16;
                }
                handler.handle(RX_QUEUE as u32);
            }
            5 if rx_in_flight + 4 <= QSIZE => {
                let (head, n, writes_rings) = post_chain(&mut input, mem, &mut rx, &mut rx_areas, 4);
                rings_trusted &= !writes_rings;
                assert!(rx_posted.insert(head, (u64::MAX, n)).is_none());
                rx_in_flight += n;
                handler.handle(RX_QUEUE as u32);
            }
            // The host sends a frame (up to past the largest packet).
            6 => {
                let len = if input.u8() == 0xff { MAX_PACKET_LEN + 8 } else { usize::from(input.u16()) % 4096 };
                let mut bytes = input.bytes(len).to_vec();
                bytes.resize(len, 0x5a);
                let _ = peer.send(&bytes);
                handler.handle(TAP_EVENT);
            }
            // The host reads what the guest sent.
            7 => {
                while let Ok(n) = peer.recv(&mut frame) {
                    assert!(n <= MAX_PACKET_LEN, "a frame of {n} bytes reached the tap");
                }
            }
            _ => handler.handle(TAP_EVENT),
        }
        if !rings_trusted {
            // Nothing is returned to the harness from here on, so nothing is posted twice.
            continue;
        }
        for (head, _) in tx.used() {
            tx_in_flight -= tx_posted.remove(&head).expect("used tx head was posted");
        }
        for (head, len) in rx.used() {
            let Some((cap, n)) = rx_posted.remove(&head) else {
                panic!("rx head {head} used but not posted (or used twice)")
            };
            assert!(u64::from(len) <= cap, "rx head {head} used for {len} bytes, it holds {cap}");
            rx_in_flight -= n;
        }
    }
    while let Ok(n) = peer.recv(&mut frame) {
        assert!(n <= MAX_PACKET_LEN, "a frame of {n} bytes reached the tap");
    }
}
