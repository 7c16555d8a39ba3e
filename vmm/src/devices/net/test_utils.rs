//! Test harness for the virtio-net device: a simulated guest driver posting descriptor chains
//! over a `GuestMemoryMmap`, and a unix datagram socket pair standing in for the tap (it keeps
//! frame boundaries, as a tap does). No KVM, no privileges.
//!
//! The tap's ioctls fail on a socket (ENOTTY), so [`SocketTap`] reads and writes through the
//! real [`Tap`] and records the ioctls instead.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::collections::HashMap;
use std::os::fd::{OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use virtio_bindings::virtio_net::{VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_HDR_F_DATA_VALID};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::event_handler::{NetHandler, TAP_EVENT};
use super::tap::{Tap, TapIo};
use super::{MAX_PACKET_LEN, QUEUE_SIZE, VNET_HDR_LEN};
pub use crate::devices::virtio::test_ring::CountingInterrupt;
use crate::devices::virtio::test_ring::Ring;
use crate::devices::virtio::ActivatedQueue;
use crate::memory::GuestMemory;

pub const QSIZE: u16 = QUEUE_SIZE;
pub const MEM_SIZE: u64 = 0x40_0000;
pub const RX_RING: u64 = 0x0;
pub const TX_RING: u64 = 0x4000;
pub const RX_BUF_BASE: u64 = 0x10_0000;
pub const RX_BUF_STRIDE: u64 = 0x1000;
pub const TX_BUF: u64 = 0x30_0000;
pub const MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 1];
pub const MRG: u64 = 1 << VIRTIO_NET_F_MRG_RXBUF;
pub const EVENT_IDX: u64 = 1 << VIRTIO_RING_F_EVENT_IDX;

/// The real [`Tap`] for reads and writes over a socket; the ioctls are recorded.
pub struct SocketTap {
    pub inner: Tap,
    pub vnet_hdr_size: Mutex<Option<i32>>,
    pub offloads: Mutex<Vec<u32>>,
}

impl TapIo for SocketTap {
    fn raw_fd(&self) -> RawFd {
        self.inner.raw_fd()
    }
    fn read_frame(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.inner.read_frame(buf)
    }
    fn write_frame(&self, frame: &[u8]) -> std::io::Result<usize> {
        self.inner.write_frame(frame)
    }
    fn set_vnet_hdr_size(&self, size: i32) -> std::io::Result<()> {
        *self.vnet_hdr_size.lock().unwrap() = Some(size);
        Ok(())
    }
    fn set_offload(&self, flags: u32) -> std::io::Result<()> {
        self.offloads.lock().unwrap().push(flags);
        Ok(())
    }
}

/// A socket-backed tap and the "host" end of it.
pub fn socket_tap() -> (Arc<SocketTap>, UnixDatagram) {
    let (ours, peer) = UnixDatagram::pair().unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let inner = Tap::new(&OwnedFd::from(ours)).unwrap();
    let tap = SocketTap { inner, vnet_hdr_size: Mutex::new(None), offloads: Mutex::new(Vec::new()) };
    (Arc::new(tap), peer)
}

/// A header with recognisable fields and a garbage `num_buffers` the device must overwrite,
/// then `len` bytes of payload.
pub fn packet(len: usize) -> Vec<u8> {
    let mut p = vec![VIRTIO_NET_HDR_F_DATA_VALID as u8, 0, 0x11, 0, 0x22, 0, 0x33, 0, 0x44, 0, 0xff, 0xff];
    p.extend((0..len).map(|i| (i * 7 % 251) as u8));
    p
}

pub fn new_memory() -> &'static GuestMemory {
    Box::leak(Box::new(GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()))
}

pub fn eventfd() -> EventFd {
    EventFd::new(libc::EFD_NONBLOCK).unwrap()
}

/// A simulated guest driver plus the handler under test, driven by hand.
pub struct Guest {
    pub mem: &'static GuestMemory,
    pub rx: Ring,
    pub tx: Ring,
    pub handler: NetHandler,
    pub interrupts: Arc<CountingInterrupt>,
    pub peer: UnixDatagram,
    /// rx head → (address, length) of its single buffer.
    pub rx_bufs: HashMap<u16, (u64, u32)>,
    pub next_rx_buf: u64,
}

impl Guest {
    pub fn new(features: u64) -> Self {
        let mem = new_memory();
        let (rx, tx) = (Ring::new(mem, RX_RING, QSIZE), Ring::new(mem, TX_RING, QSIZE));
        let (tap, peer) = socket_tap();
        let interrupts = Arc::new(CountingInterrupt(AtomicUsize::new(0)));
        let event_idx = features & EVENT_IDX != 0;
        let handler = NetHandler::new(
            "tap-test",
            mem.clone(),
            interrupts.clone(),
            [rx.queue(event_idx), tx.queue(event_idx)],
            [eventfd(), eventfd()],
            tap,
            features,
        );
        Guest { mem, rx, tx, handler, interrupts, peer, rx_bufs: HashMap::new(), next_rx_buf: 0 }
    }

    /// Post `n` rx chains of one `len`-byte buffer each.
    pub fn post_rx(&mut self, n: usize, len: u32) {
        for _ in 0..n {
            let addr = RX_BUF_BASE + (self.next_rx_buf % u64::from(QSIZE)) * RX_BUF_STRIDE;
            self.next_rx_buf += 1;
            let head = self.rx.post(&[(addr, len, true)]);
            self.rx_bufs.insert(head, (addr, len));
        }
    }

    /// The used rx buffers since the last call, with their contents.
    pub fn take_rx(&mut self) -> Vec<Vec<u8>> {
        self.rx
            .used()
            .into_iter()
            .map(|(head, len)| {
                let (addr, cap) = self.rx_bufs[&head];
                assert!(len <= cap, "used length {len} beyond the buffer's {cap}");
                let mut data = vec![0u8; len as usize];
                self.mem.read_slice(&mut data, GuestAddress(addr)).unwrap();
                data
            })
            .collect()
    }

    /// Put `packet` in guest memory and post it as a tx chain (header, then the rest).
    pub fn post_tx_packet(&mut self, packet: &[u8]) -> u16 {
        self.mem.write_slice(packet, GuestAddress(TX_BUF)).unwrap();
        let hdr = VNET_HDR_LEN as u32;
        self.tx.post(&[(TX_BUF, hdr, false), (TX_BUF + u64::from(hdr), packet.len() as u32 - hdr, false)])
    }

    pub fn host_send(&self, packet: &[u8]) {
        assert_eq!(self.peer.send(packet).unwrap(), packet.len());
    }

    pub fn host_recv(&self) -> Vec<u8> {
        let mut buf = vec![0u8; MAX_PACKET_LEN + 1];
        let n = self.peer.recv(&mut buf).unwrap();
        buf.truncate(n);
        buf
    }

    /// Receive and count whatever the device sent so far.
    pub fn host_drain(&self) -> usize {
        self.peer.set_nonblocking(true).unwrap();
        let mut buf = vec![0u8; MAX_PACKET_LEN];
        let mut n = 0;
        while self.peer.recv(&mut buf).is_ok() {
            n += 1;
        }
        self.peer.set_nonblocking(false).unwrap();
        n
    }

    pub fn interrupts(&self) -> usize {
        self.interrupts.0.load(Ordering::SeqCst)
    }
}

/// The payload part (after the header) of a frame spread over `bufs`.
pub fn joined(bufs: &[Vec<u8>]) -> Vec<u8> {
    bufs.concat()
}

/// Whether some epoll set of this process watches `fd` as a net device's tap.
pub fn tap_is_polled(fd: RawFd) -> bool {
    let data = (u64::from(TAP_EVENT) << 32) + fd as u64;
    std::fs::read_dir("/proc/self/fdinfo").unwrap().flatten().any(|entry| {
        let Ok(info) = std::fs::read_to_string(entry.path()) else {
            return false;
        };
        info.lines().filter(|l| l.starts_with("tfd:")).any(|l| {
            let fields: Vec<_> = l.split_whitespace().collect();
            fields.get(1) == Some(&fd.to_string().as_str())
                && fields.get(5).and_then(|d| u64::from_str_radix(d, 16).ok()) == Some(data)
        })
    })
}

pub fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// One activation of the device: rings, kicks and the queues handed over.
pub fn activation(mem: &'static GuestMemory, rx_base: u64, tx_base: u64) -> (Ring, Ring, EventFd, Vec<ActivatedQueue>) {
    let (rx, tx) = (Ring::new(mem, rx_base, QSIZE), Ring::new(mem, tx_base, QSIZE));
    let (rx_kick, tx_kick) = (eventfd(), eventfd());
    let queues = vec![
        ActivatedQueue { queue: rx.queue(false), kick: rx_kick.try_clone().unwrap() },
        ActivatedQueue { queue: tx.queue(false), kick: tx_kick },
    ];
    (rx, tx, rx_kick, queues)
}
