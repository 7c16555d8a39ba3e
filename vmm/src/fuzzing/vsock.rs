//! vsock tx packets, rx buffers and the muxer's connection state machine: the input mixes
//! guest packets (REQUEST/RESPONSE, RW, credit updates, RST, SHUTDOWN, any header at all),
//! raw tx and rx chains, and host-side traffic on the hybrid unix socket (`CONNECT <port>`
//! lines, data, half-close, close) and on a host listener the guest connects to. Every tx chain
//! must come back with length 0, every used rx buffer must be one the guest posted, at most once
//! (checked until a chain lets the device write the rings themselves, see [`post_chain`]).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{Arc, OnceLock};

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::{post_chain, zeroed_memory, Areas, Input};
use crate::devices::virtio::test_ring::{CountingInterrupt, Ring};
use crate::devices::vsock::event_handler::{VsockHandler, MUXER_EVENT, RX_QUEUE, TX_QUEUE};
use crate::devices::vsock::muxer::Muxer;
use crate::devices::vsock::packet::{HEADER_SIZE, VSOCK_HOST_CID};
use crate::memory::GuestMemory;

const GUEST_CID: u64 = 3;
const MEM_SIZE: usize = 0x20_0000;
const QSIZE: u16 = 64;
const RX_RING: u64 = 0x0;
const TX_RING: u64 = 0x1000;
const EV_RING: u64 = 0x2000;
const RX_BUFS: std::ops::Range<u64> = 0x1_0000..0x9_0000;
const TX_AREA: std::ops::Range<u64> = 0x10_0000..0x1c_0000;
const RAW_RX_AREA: std::ops::Range<u64> = 0x1c_0000..0x20_0000;
/// The host port a guest REQUEST reaches a listener on (`<uds>_<port>`).
const HOST_PORT: u32 = 52;
/// The host-side ports the muxer gives host-initiated connections start here.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
const MAX_OPS: usize = 256;
const MAX_SOCKETS: usize = 16;

/// Play `data` as guest packets and host socket traffic on a fresh device.
pub fn run(data: &[u8]) {
    static MEM: OnceLock<&'static GuestMemory> = OnceLock::new();
    let mem = zeroed_memory(&MEM, MEM_SIZE);
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("vsock.sock");
    let listener = UnixListener::bind(&uds).unwrap();
    listener.set_nonblocking(true).unwrap();
    let guest_listener = UnixListener::bind(format!("{}_{HOST_PORT}", uds.display())).unwrap();
    guest_listener.set_nonblocking(true).unwrap();
    let mut rx = Ring::new(mem, RX_RING, QSIZE);
    let mut tx = Ring::new(mem, TX_RING, QSIZE);
    let ev = Ring::new(mem, EV_RING, QSIZE);
    let muxer = Muxer::new(GUEST_CID, uds.clone(), Arc::new(listener)).unwrap();
    let kick = || EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let mut handler = VsockHandler::new(
        mem.clone(),
        Arc::new(CountingInterrupt(AtomicUsize::new(0))),
        [rx.queue(false), tx.queue(false), ev.queue(false)],
        [kick(), kick(), kick()],
        muxer,
        Arc::new(AtomicBool::new(false)),
    );
    let mut tx_areas = Areas::new(TX_AREA, TX_AREA);
    let mut rx_areas = Areas::new(RAW_RX_AREA, RAW_RX_AREA);
    // Posted rx heads not yet used, and how many chains are posted on each ring.
    let mut rx_posted: HashMap<u16, (u32, u16)> = HashMap::new();
    let mut next_rx_buf = 0u64;
    // Descriptors the device holds on each ring: the rings hand descriptors out in a circle and
    // the device returns chains in order, so at most QSIZE may be out at once.
    let (mut rx_in_flight, mut tx_in_flight) = (0u16, 0u16);
    let mut tx_posted: HashMap<u16, u16> = HashMap::new();
    let mut hosts: Vec<UnixStream> = Vec::new();
    let mut input = Input::new(data);
    // Whether the rings still hold only what the harness wrote.
    let mut rings_trusted = true;

    for _ in 0..MAX_OPS {
        if input.is_empty() {
            break;
        }
        match input.u8() % 11 {
            // A guest packet with a header the input writes, biased to reach live connections.
            0..=2 if tx_in_flight + 2 <= QSIZE => {
                let ctl = input.u8();
                let mut hdr = [0u8; HEADER_SIZE];
                hdr[0..8].copy_from_slice(&GUEST_CID.to_le_bytes());
                hdr[8..16].copy_from_slice(&VSOCK_HOST_CID.to_le_bytes());
                hdr[16..20].copy_from_slice(&(1024 + u32::from(input.u8() % 4)).to_le_bytes());
                let dst = match input.u8() % 4 {
                    0 => HOST_PORT,
                    1 | 2 => FIRST_LOCAL_PORT + u32::from(input.u8() % 8),
                    _ => input.u32(),
                };
                hdr[20..24].copy_from_slice(&dst.to_le_bytes());
                hdr[28..30].copy_from_slice(&1u16.to_le_bytes());
                hdr[30..32].copy_from_slice(&u16::from(input.u8() % 9).to_le_bytes());
                hdr[32..36].copy_from_slice(&u32::from(input.u8() % 4).to_le_bytes());
                hdr[36..40].copy_from_slice(&input.u32().to_le_bytes());
                hdr[40..44].copy_from_slice(&input.u32().to_le_bytes());
                if ctl & 1 != 0 {
                    // Anything at all in the header.
                    let raw = input.bytes(HEADER_SIZE);
                    hdr[..raw.len()].copy_from_slice(raw);
                }
                let n = usize::from(input.u16()) % 8192;
                let payload = input.bytes(n).to_vec();
                let len = if ctl & 2 != 0 { input.u32() } else { payload.len() as u32 };
                hdr[24..28].copy_from_slice(&len.to_le_bytes());
                let hdr_addr = Areas::take(&mut tx_areas.next_readable, &TX_AREA, HEADER_SIZE as u64);
                mem.write_slice(&hdr, GuestAddress(hdr_addr)).unwrap();
                let mut chain = vec![(hdr_addr, HEADER_SIZE as u32, false)];
                if !payload.is_empty() {
                    let addr = Areas::take(&mut tx_areas.next_readable, &TX_AREA, payload.len() as u64);
                    mem.write_slice(&payload, GuestAddress(addr)).unwrap();
                    chain.push((addr, payload.len() as u32, false));
                }
                let head = tx.post(&chain);
                tx_posted.insert(head, chain.len() as u16);
                tx_in_flight += chain.len() as u16;
                handler.handle(TX_QUEUE as u32);
            }
            3 if tx_in_flight + 6 <= QSIZE => {
                let (head, n, writes_rings) = post_chain(&mut input, mem, &mut tx, &mut tx_areas, 6);
                rings_trusted &= !writes_rings;
                tx_posted.insert(head, n);
                tx_in_flight += n;
                handler.handle(TX_QUEUE as u32);
            }
            // Well-formed rx buffers: a header descriptor and a data descriptor.
            4 => {
                for _ in 0..1 + input.u8() % 8 {
                    if rx_in_flight + 2 > QSIZE {
                        break;
                    }
                    let base = RX_BUFS.start + (next_rx_buf % 64) * 0x2000;
                    next_rx_buf += 1;
                    let data_len = u32::from(input.u16()) % 0x1f00;
                    let head = rx.post(&[(base, HEADER_SIZE as u32, true), (base + 0x100, data_len, true)]);
                    assert!(rx_posted.insert(head, (HEADER_SIZE as u32 + data_len, 2)).is_none());
                    rx_in_flight += 2;
                }
                handler.handle(RX_QUEUE as u32);
            }
            5 if rx_in_flight + 4 <= QSIZE => {
                let (head, n, writes_rings) = post_chain(&mut input, mem, &mut rx, &mut rx_areas, 4);
                rings_trusted &= !writes_rings;
                assert!(rx_posted.insert(head, (u32::MAX, n)).is_none());
                rx_in_flight += n;
                handler.handle(RX_QUEUE as u32);
            }
            // A host client on the hybrid socket: a CONNECT line, or any bytes at all.
            6 if hosts.len() < MAX_SOCKETS => {
                let Ok(mut s) = UnixStream::connect(&uds) else { continue };
                s.set_nonblocking(true).unwrap();
                let line = if input.u8() & 1 == 0 {
                    format!("CONNECT {}\n", 1024 + u32::from(input.u8() % 4)).into_bytes()
                } else {
                    let n = usize::from(input.u8());
                    input.bytes(n).to_vec()
                };
                let _ = s.write_all(&line);
                hosts.push(s);
                handler.handle(MUXER_EVENT);
            }
            // A host stream writes, half-closes or closes.
            7 if !hosts.is_empty() => {
                let i = usize::from(input.u8()) % hosts.len();
                match input.u8() % 4 {
                    0 => {
                        let _ = hosts[i].shutdown(Shutdown::Write);
                    }
                    1 => {
                        hosts.swap_remove(i);
                    }
                    _ => {
                        let n = usize::from(input.u16()) % 16384;
                        let bytes = input.bytes(n);
                        let _ = hosts[i].write(bytes);
                    }
                }
                handler.handle(MUXER_EVENT);
            }
            // The host accepts what the guest connected to its listener.
            8 => {
                while let Ok((s, _)) = guest_listener.accept() {
                    if hosts.len() >= MAX_SOCKETS {
                        break;
                    }
                    s.set_nonblocking(true).unwrap();
                    hosts.push(s);
                }
                handler.handle(MUXER_EVENT);
            }
            // The host reads what arrived.
            9 => {
                let mut buf = [0u8; 4096];
                for s in &mut hosts {
                    while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
                }
                handler.handle(MUXER_EVENT);
            }
            _ => handler.handle(MUXER_EVENT),
        }
        if !rings_trusted {
            // Nothing is returned to the harness from here on, so nothing is posted twice.
            continue;
        }
        for (head, len) in tx.used() {
            assert_eq!(len, 0, "tx chain {head} came back with a length");
            tx_in_flight -= tx_posted.remove(&head).expect("used tx head was posted");
        }
        for (head, len) in rx.used() {
            let Some((cap, n)) = rx_posted.remove(&head) else {
                panic!("rx head {head} used but not posted (or used twice)")
            };
            assert!(len <= cap, "rx head {head} used for {len} bytes, it holds {cap}");
            rx_in_flight -= n;
        }
        assert_eq!(handler.rx_next_used(), rx.used_idx(), "rx used index in memory differs from the device's");
    }
}
