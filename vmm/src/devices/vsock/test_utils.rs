//! Test harness for the vsock device: a simulated guest driver that posts descriptor chains
//! over a `GuestMemoryMmap` and drives a [`VsockHandler`] directly, without KVM or threads.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::connection::CONN_TX_BUF_SIZE;
use super::event_handler::{VsockHandler, RX_QUEUE, TX_QUEUE};
use super::muxer::Muxer;
use super::packet::*;
pub use crate::devices::virtio::test_ring::{CountingInterrupt, Ring};
use crate::memory::GuestMemory;

pub const GUEST_CID: u64 = 3;
pub const QSIZE: u16 = 256;
pub const RX_BUFS: u16 = 64;
pub const RX_DATA_SIZE: u32 = 4096;
pub const MEM_SIZE: u64 = 0x100_0000;
pub const RX_BUF_BASE: u64 = 0x10_0000;
pub const TX_HDR_ADDR: u64 = 0x80_0000;
pub const TX_DATA_ADDR: u64 = 0x81_0000;
pub const MUXER: u32 = 3;

pub fn encode(h: &Header) -> [u8; HEADER_SIZE] {
    let mut b = [0u8; HEADER_SIZE];
    b[0..8].copy_from_slice(&h.src_cid.to_le_bytes());
    b[8..16].copy_from_slice(&h.dst_cid.to_le_bytes());
    b[16..20].copy_from_slice(&h.src_port.to_le_bytes());
    b[20..24].copy_from_slice(&h.dst_port.to_le_bytes());
    b[24..28].copy_from_slice(&h.len.to_le_bytes());
    b[28..30].copy_from_slice(&h.type_.to_le_bytes());
    b[30..32].copy_from_slice(&h.op.to_le_bytes());
    b[32..36].copy_from_slice(&h.flags.to_le_bytes());
    b[36..40].copy_from_slice(&h.buf_alloc.to_le_bytes());
    b[40..44].copy_from_slice(&h.fwd_cnt.to_le_bytes());
    b
}

pub fn decode(b: &[u8]) -> Header {
    let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap());
    Header {
        src_cid: u64_at(0),
        dst_cid: u64_at(8),
        src_port: u32_at(16),
        dst_port: u32_at(20),
        len: u32_at(24),
        type_: u16_at(28),
        op: u16_at(30),
        flags: u32_at(32),
        buf_alloc: u32_at(36),
        fwd_cnt: u32_at(40),
    }
}

/// A simulated guest driver plus the device handler under test.
pub struct Guest {
    pub mem: &'static GuestMemory,
    pub rx: Ring,
    pub tx: Ring,
    pub handler: VsockHandler,
    pub interrupts: Arc<CountingInterrupt>,
    pub uds: PathBuf,
    pub _dir: tempfile::TempDir,
    /// Head index → rx buffer number.
    pub rx_heads: std::collections::HashMap<u16, u16>,
    /// Check after every device call that it wrote guest memory only where a device may
    /// (see [`Guest::handle`]); slow, so only some tests turn it on.
    pub watch_writes: bool,
}

impl Guest {
    pub fn new() -> Self {
        Self::with_rx_buffers(RX_BUFS)
    }

    pub fn with_rx_buffers(n: u16) -> Self {
        let mem: &'static GuestMemory =
            Box::leak(Box::new(GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()));
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vsock.sock");
        let listener = UnixListener::bind(&uds).unwrap();
        listener.set_nonblocking(true).unwrap();
        let rx = Ring::new(mem, 0x0, QSIZE);
        let tx = Ring::new(mem, 0x1_0000, QSIZE);
        let ev = Ring::new(mem, 0x2_0000, QSIZE);
        let interrupts = Arc::new(CountingInterrupt(AtomicUsize::new(0)));
        let muxer = Muxer::new(GUEST_CID, uds.clone(), Arc::new(listener)).unwrap();
        let kick = || EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let handler = VsockHandler::new(
            mem.clone(),
            interrupts.clone(),
            [rx.queue(false), tx.queue(false), ev.queue(false)],
            [kick(), kick(), kick()],
            muxer,
            Arc::new(AtomicBool::new(false)),
        );
        let mut g = Guest {
            mem,
            rx,
            tx,
            handler,
            interrupts,
            uds,
            _dir: dir,
            rx_heads: Default::default(),
            watch_writes: false,
        };
        for i in 0..n {
            g.post_rx(i);
        }
        g
    }

    pub fn check(&self) {
        let dev = self.handler.rx_next_used();
        let ring = self.rx.used_idx();
        assert_eq!(dev, ring, "used idx in memory differs from the device's");
    }

    pub fn post_rx(&mut self, i: u16) {
        let hdr = RX_BUF_BASE + u64::from(i) * 0x2000;
        let head = self.rx.post(&[(hdr, HEADER_SIZE as u32, true), (hdr + 0x100, RX_DATA_SIZE, true)]);
        self.rx_heads.insert(head, i);
    }

    /// Send one packet on the tx queue and let the device process it.
    pub fn send(&mut self, hdr: Header, data: &[u8]) {
        assert_eq!(hdr.len as usize, data.len());
        self.mem.write_slice(&encode(&hdr), GuestAddress(TX_HDR_ADDR)).unwrap();
        let mut chain = vec![(TX_HDR_ADDR, HEADER_SIZE as u32, false)];
        if !data.is_empty() {
            self.mem.write_slice(data, GuestAddress(TX_DATA_ADDR)).unwrap();
            chain.push((TX_DATA_ADDR, data.len() as u32, false));
        }
        self.send_chain(&chain);
    }

    pub fn send_chain(&mut self, chain: &[(u64, u32, bool)]) {
        self.check();
        let head = self.tx.post(chain);
        self.check();
        self.handle(TX_QUEUE as u32);
        self.check();
        let used = self.tx.used();
        assert_eq!(used, vec![(head, 0)], "every tx chain comes back");
    }

    /// Let the device handle one wakeup. With [`Guest::watch_writes`], every guest byte it
    /// changed must lie in a used ring or in an rx buffer it returned during this call, within
    /// the header and the payload length it reported: a device that writes anywhere else
    /// corrupts guest memory the driver (and the guest kernel) still uses.
    pub fn handle(&mut self, source: u32) {
        if !self.watch_writes {
            self.handler.handle(source);
            return;
        }
        let mut before = vec![0u8; MEM_SIZE as usize];
        self.mem.read_slice(&mut before, GuestAddress(0)).unwrap();
        let first_new = self.rx.used_idx();
        self.handler.handle(source);
        let mut after = vec![0u8; MEM_SIZE as usize];
        self.mem.read_slice(&mut after, GuestAddress(0)).unwrap();

        let used_ring_bytes = 4 + 8 * u64::from(QSIZE) + 2;
        let ev_used = Ring::used_ring_of(0x2_0000, QSIZE);
        let mut allowed: Vec<std::ops::Range<u64>> =
            [self.rx.used, self.tx.used, ev_used].iter().map(|&used| used..used + used_ring_bytes).collect();
        let mut idx = first_new;
        while idx != self.rx.used_idx() {
            let elem = self.rx.used + 4 + 8 * u64::from(idx % QSIZE);
            let head: u32 = self.mem.read_obj(GuestAddress(elem)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(elem + 4)).unwrap();
            let Some(&i) = self.rx_heads.get(&(head as u16)) else { panic!("used rx head {head} was not posted") };
            let hdr = RX_BUF_BASE + u64::from(i) * 0x2000;
            allowed.push(hdr..hdr + HEADER_SIZE as u64);
            let payload = u64::from(len).saturating_sub(HEADER_SIZE as u64);
            allowed.push(hdr + 0x100..hdr + 0x100 + payload);
            idx = idx.wrapping_add(1);
        }
        for (offset, (a, b)) in before.chunks(8).zip(after.chunks(8)).enumerate() {
            if a == b {
                continue;
            }
            for (j, (x, y)) in a.iter().zip(b).enumerate() {
                let addr = (offset * 8 + j) as u64;
                assert!(
                    x == y || allowed.iter().any(|r| r.contains(&addr)),
                    "the device wrote guest address {addr:#x} ({x:#04x} -> {y:#04x}) outside every used ring \
                     and returned rx buffer (source {source})"
                );
            }
        }
    }

    /// Let the device look at the host sockets.
    pub fn pump(&mut self) {
        self.check();
        self.handle(MUXER);
        self.check();
    }

    /// Collect the packets the device put on the rx queue, re-posting the buffers.
    pub fn recv(&mut self) -> Vec<(Header, Vec<u8>)> {
        let out = self.take_used();
        for &(i, _, _) in &out {
            self.post_rx(i);
        }
        if !out.is_empty() {
            self.handle(RX_QUEUE as u32);
        }
        out.into_iter().map(|(_, h, d)| (h, d)).collect()
    }

    /// Collect used rx buffers without giving them back: (buffer number, header, payload).
    pub fn take_used(&mut self) -> Vec<(u16, Header, Vec<u8>)> {
        let mut out = Vec::new();
        self.check();
        for (head, len) in self.rx.used() {
            let Some(i) = self.rx_heads.remove(&head) else {
                panic!("used rx head {head} (len {len}) was not posted; posted: {:?}", self.rx_heads)
            };
            let addr = RX_BUF_BASE + u64::from(i) * 0x2000;
            let mut hb = [0u8; HEADER_SIZE];
            self.mem.read_slice(&mut hb, GuestAddress(addr)).unwrap();
            let hdr = decode(&hb);
            assert_eq!(len, HEADER_SIZE as u32 + hdr.len);
            let mut data = vec![0u8; hdr.len as usize];
            self.mem.read_slice(&mut data, GuestAddress(addr + 0x100)).unwrap();
            out.push((i, hdr, data));
        }
        out
    }

    /// Pump until a packet shows up (host sockets are synchronous, so this is quick).
    pub fn expect_packet(&mut self) -> (Header, Vec<u8>) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            self.pump();
            let mut pkts = self.recv();
            if !pkts.is_empty() {
                assert_eq!(pkts.len(), 1, "one packet expected, got {pkts:?}");
                return pkts.remove(0);
            }
            assert!(Instant::now() < deadline, "no packet from the device");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    pub fn expect_nothing(&mut self) {
        for _ in 0..5 {
            self.pump();
        }
        let pkts = self.recv();
        assert!(pkts.is_empty(), "unexpected packets {pkts:?}");
    }
}

/// The device closed its end: EOF, or ECONNRESET when it dropped bytes we sent unread.
pub fn assert_closed(host: &mut UnixStream) {
    let mut buf = Vec::new();
    match host.read_to_end(&mut buf) {
        Ok(_) => assert!(buf.is_empty()),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
    }
}

pub fn hdr(op: u16, local_port: u32, peer_port: u32) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: VSOCK_HOST_CID,
        src_port: peer_port,
        dst_port: local_port,
        len: 0,
        type_: VSOCK_TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 1 << 20,
        fwd_cnt: 0,
    }
}

pub fn rw(local_port: u32, peer_port: u32, len: usize) -> Header {
    Header { len: len as u32, ..hdr(VSOCK_OP_RW, local_port, peer_port) }
}

pub const GUEST_PORT: u32 = 1024;

/// Host client connects to guest port 1024 and the guest accepts; returns (stream, host port).
pub fn establish(g: &mut Guest) -> (UnixStream, u32) {
    let mut host = UnixStream::connect(&g.uds).unwrap();
    host.write_all(format!("CONNECT {GUEST_PORT}\n").as_bytes()).unwrap();
    let (req, _) = g.expect_packet();
    assert_eq!(req.op, VSOCK_OP_REQUEST);
    assert_eq!((req.src_cid, req.dst_cid, req.dst_port), (VSOCK_HOST_CID, GUEST_CID, GUEST_PORT));
    assert_eq!(req.type_, VSOCK_TYPE_STREAM);
    assert_eq!(req.buf_alloc, CONN_TX_BUF_SIZE);
    let local = req.src_port;
    g.send(hdr(VSOCK_OP_RESPONSE, local, GUEST_PORT), &[]);
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    while byte[0] != b'\n' {
        host.read_exact(&mut byte).unwrap();
        line.push(byte[0]);
    }
    assert_eq!(String::from_utf8(line).unwrap(), format!("OK {local}\n"));
    (host, local)
}
