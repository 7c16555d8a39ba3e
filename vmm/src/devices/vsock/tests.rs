//! In-memory tests of the vsock device: the simulated guest in [`super::test_utils`] against
//! real unix sockets on the host side (no KVM).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::connection::CONN_TX_BUF_SIZE;
use super::event_handler::RX_QUEUE;
use super::packet::*;
use super::test_utils::*;
use crate::memory::GuestMemory;

#[test]
fn host_connect_then_data_both_ways() {
    let mut g = Guest::new();
    let (mut host, local) = establish(&mut g);
    host.write_all(b"hello guest").unwrap();
    let (pkt, data) = g.expect_packet();
    assert_eq!((pkt.op, pkt.src_port, pkt.dst_port), (VSOCK_OP_RW, local, GUEST_PORT));
    assert_eq!(data, b"hello guest");
    g.send(rw(local, GUEST_PORT, 10), b"hello host");
    let mut buf = [0u8; 10];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello host");
    assert!(g.interrupts.0.load(Ordering::SeqCst) > 0);
}

#[test]
fn guest_rst_on_request_closes_host_client_without_ok() {
    let mut g = Guest::new();
    let mut host = UnixStream::connect(&g.uds).unwrap();
    host.write_all(b"CONNECT 9\n").unwrap();
    let (req, _) = g.expect_packet();
    assert_eq!(req.op, VSOCK_OP_REQUEST);
    g.send(hdr(VSOCK_OP_RST, req.src_port, 9), &[]);
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = Vec::new();
    assert_eq!(host.read_to_end(&mut buf).unwrap(), 0, "EOF without OK");
    assert_eq!(g.handler.muxer().connection_count(), 0);
}

#[test]
fn bad_connect_lines_are_dropped() {
    let mut g = Guest::new();
    for line in [&b"HELLO\n"[..], b"CONNECT x\n", &[b'A'; 100]] {
        let mut host = UnixStream::connect(&g.uds).unwrap();
        host.write_all(line).unwrap();
        g.expect_nothing();
        host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_closed(&mut host);
    }
    // A client that leaves before finishing its line is dropped too.
    drop(UnixStream::connect(&g.uds).unwrap());
    g.expect_nothing();
    assert_eq!(g.handler.muxer().connection_count(), 0);
}

#[test]
fn guest_rst_gives_host_eof() {
    let mut g = Guest::new();
    let (mut host, local) = establish(&mut g);
    g.send(hdr(VSOCK_OP_RST, local, GUEST_PORT), &[]);
    let mut buf = Vec::new();
    assert_eq!(host.read_to_end(&mut buf).unwrap(), 0);
    g.expect_nothing();
    assert_eq!(g.handler.muxer().connection_count(), 0);
}

#[test]
fn host_half_close_sends_shutdown_send_and_guest_can_still_write() {
    let mut g = Guest::new();
    let (mut host, local) = establish(&mut g);
    host.write_all(b"last words").unwrap();
    host.shutdown(Shutdown::Write).unwrap();
    g.pump();
    let pkts = g.recv();
    assert_eq!(pkts.len(), 2, "{pkts:?}");
    assert_eq!((pkts[0].0.op, pkts[0].1.as_slice()), (VSOCK_OP_RW, &b"last words"[..]));
    assert_eq!((pkts[1].0.op, pkts[1].0.flags), (VSOCK_OP_SHUTDOWN, VSOCK_SHUTDOWN_SEND));
    g.send(rw(local, GUEST_PORT, 5), b"reply");
    let mut buf = [0u8; 5];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"reply");
    // The guest finishes too: both directions done, the device ends it with an RST.
    g.send(Header { flags: VSOCK_SHUTDOWN_BOTH, ..hdr(VSOCK_OP_SHUTDOWN, local, GUEST_PORT) }, &[]);
    let (pkt, _) = g.expect_packet();
    assert_eq!(pkt.op, VSOCK_OP_RST);
    let mut rest = Vec::new();
    assert_eq!(host.read_to_end(&mut rest).unwrap(), 0);
    assert_eq!(g.handler.muxer().connection_count(), 0);
}

#[test]
fn guest_shutdown_send_gives_host_eof_and_host_can_still_write() {
    let mut g = Guest::new();
    let (mut host, local) = establish(&mut g);
    g.send(rw(local, GUEST_PORT, 3), b"bye");
    g.send(Header { flags: VSOCK_SHUTDOWN_SEND, ..hdr(VSOCK_OP_SHUTDOWN, local, GUEST_PORT) }, &[]);
    let mut buf = Vec::new();
    host.read_to_end(&mut buf).unwrap();
    assert_eq!(buf, b"bye");
    host.write_all(b"still here").unwrap();
    let (pkt, data) = g.expect_packet();
    assert_eq!((pkt.op, data.as_slice()), (VSOCK_OP_RW, &b"still here"[..]));
    // Guest data after its own SHUTDOWN(SEND) is a protocol error.
    g.send(rw(local, GUEST_PORT, 1), b"x");
    let (pkt, _) = g.expect_packet();
    assert_eq!(pkt.op, VSOCK_OP_RST);
}

#[test]
fn host_close_resets_the_connection() {
    let mut g = Guest::new();
    let (host, _local) = establish(&mut g);
    drop(host);
    let (pkt, _) = g.expect_packet();
    assert_eq!(pkt.op, VSOCK_OP_RST);
    g.expect_nothing();
    assert_eq!(g.handler.muxer().connection_count(), 0);
}

#[test]
fn host_close_after_half_close_resets_the_connection() {
    let mut g = Guest::new();
    let (host, _local) = establish(&mut g);
    host.shutdown(Shutdown::Write).unwrap();
    let (pkt, _) = g.expect_packet();
    assert_eq!((pkt.op, pkt.flags), (VSOCK_OP_SHUTDOWN, VSOCK_SHUTDOWN_SEND));
    drop(host);
    let (pkt, _) = g.expect_packet();
    assert_eq!(pkt.op, VSOCK_OP_RST);
    assert_eq!(g.handler.muxer().connection_count(), 0);
}

/// Issue 11, bug 1: `tern run` half-closes its stdin stream and closes it right after, so one
/// wakeup sees the EOF and the hang-up together. The guest is idle then (it consumed every line
/// and waits in `read`), so nothing else will wake the device: the end of the stream must
/// reach the guest in that same wakeup, or the process never sees EOF.
#[test]
fn host_eof_with_hangup_reaches_an_idle_guest_in_one_wakeup() {
    let mut g = Guest::new();
    let (mut host, local) = establish(&mut g);
    // Interactive use: a line, delivered and consumed, then silence.
    host.write_all(b"line\n").unwrap();
    let (pkt, data) = g.expect_packet();
    assert_eq!((pkt.op, data.as_slice()), (VSOCK_OP_RW, &b"line\n"[..]));
    g.send(Header { fwd_cnt: 5, ..hdr(VSOCK_OP_CREDIT_UPDATE, local, GUEST_PORT) }, &[]);
    g.expect_nothing();
    // stdin ends: half-close, then close, before the device looks.
    host.shutdown(Shutdown::Write).unwrap();
    drop(host);
    g.pump();
    let ops: Vec<u16> = g.take_used().iter().map(|(_, h, _)| h.op).collect();
    assert_eq!(ops.last(), Some(&VSOCK_OP_RST), "the guest must learn the stream ended; got ops {ops:?}");
    assert_eq!(g.handler.muxer().connection_count(), 0);
}

/// The same with data still unread when the host goes: the data first, then the end.
#[test]
fn host_data_eof_and_hangup_in_one_wakeup_arrive_in_order() {
    let mut g = Guest::new();
    let (mut host, _local) = establish(&mut g);
    host.write_all(b"last line\n").unwrap();
    host.shutdown(Shutdown::Write).unwrap();
    drop(host);
    g.pump();
    let got: Vec<(u16, Vec<u8>)> = g.take_used().into_iter().map(|(_, h, d)| (h.op, d)).collect();
    assert_eq!(got, vec![(VSOCK_OP_RW, b"last line\n".to_vec()), (VSOCK_OP_RST, Vec::new())]);
}

#[test]
fn guest_credit_is_never_exceeded() {
    let mut g = Guest::new();
    let (mut host, local) = establish(&mut g);
    // The guest has room for 1000 bytes only.
    g.send(Header { buf_alloc: 1000, fwd_cnt: 0, ..hdr(VSOCK_OP_CREDIT_UPDATE, local, GUEST_PORT) }, &[]);
    host.write_all(&[7u8; 5000]).unwrap();
    let mut got = 0usize;
    let mut credit_requests = 0;
    for _ in 0..20 {
        g.pump();
        for (pkt, data) in g.recv() {
            match pkt.op {
                VSOCK_OP_RW => got += data.len(),
                VSOCK_OP_CREDIT_REQUEST => credit_requests += 1,
                op => panic!("unexpected op {op}"),
            }
        }
    }
    assert_eq!(got, 1000);
    assert_eq!(credit_requests, 1, "asks once per stall");
    // The guest consumed everything: 1000 more.
    g.send(Header { buf_alloc: 1000, fwd_cnt: 1000, ..hdr(VSOCK_OP_CREDIT_UPDATE, local, GUEST_PORT) }, &[]);
    for _ in 0..20 {
        g.pump();
        for (pkt, data) in g.recv() {
            if pkt.op == VSOCK_OP_RW {
                got += data.len();
            }
        }
    }
    assert_eq!(got, 2000);
}

#[test]
fn credit_request_is_answered() {
    let mut g = Guest::new();
    let (_host, local) = establish(&mut g);
    g.send(hdr(VSOCK_OP_CREDIT_REQUEST, local, GUEST_PORT), &[]);
    let (pkt, _) = g.expect_packet();
    assert_eq!((pkt.op, pkt.buf_alloc, pkt.fwd_cnt), (VSOCK_OP_CREDIT_UPDATE, CONN_TX_BUF_SIZE, 0));
}

#[test]
fn blocked_host_buffers_up_to_credit_without_loss() {
    let mut g = Guest::new();
    let (mut host, local) = establish(&mut g);
    // The host does not read: the guest fills exactly the advertised credit.
    let payload: Vec<u8> = (0..CONN_TX_BUF_SIZE).map(|i| (i % 251) as u8).collect();
    for chunk in payload.chunks(MAX_PKT_DATA as usize) {
        g.send(rw(local, GUEST_PORT, chunk.len()), chunk);
    }
    let buffered = g
        .handler
        .muxer()
        .connection(&super::muxer::ConnKey { local_port: local, peer_port: GUEST_PORT })
        .unwrap()
        .buffered();
    assert!(buffered > 0, "the socket buffer should have filled up");
    // Now the host reads; EPOLLOUT flushes the rest and a credit update tells the guest.
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let reader = std::thread::spawn(move || {
        let mut got = vec![0u8; CONN_TX_BUF_SIZE as usize];
        host.read_exact(&mut got).unwrap();
        (host, got)
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut fwd = 0;
    while fwd < CONN_TX_BUF_SIZE {
        g.pump();
        for (pkt, _) in g.recv() {
            assert_eq!(pkt.op, VSOCK_OP_CREDIT_UPDATE);
            fwd = pkt.fwd_cnt;
        }
        assert!(Instant::now() < deadline, "buffered bytes never reached the host");
        std::thread::sleep(Duration::from_millis(1));
    }
    let (_host, got) = reader.join().unwrap();
    assert_eq!(got, payload);
}

/// A guest that closes its socket resets the connection on its own once its close timeout
/// passes (8 s in Linux), whether or not the host took everything yet. What the guest sent
/// before its RST was accepted by the device: the host still reads every byte, then EOF, and
/// the guest hears nothing more of the connection and may reuse its port at once.
#[test]
fn guest_reset_after_shutdown_still_delivers_what_it_sent() {
    let mut g = Guest::new();
    let (mut host, local) = establish(&mut g);
    // The host does not read: the guest fills the advertised credit, most of it stays buffered.
    let payload = pattern(CONN_TX_BUF_SIZE as usize, 7);
    for chunk in payload.chunks(MAX_PKT_DATA as usize) {
        g.send(rw(local, GUEST_PORT, chunk.len()), chunk);
    }
    let key = super::muxer::ConnKey { local_port: local, peer_port: GUEST_PORT };
    let buffered = g.handler.muxer().connection(&key).unwrap().buffered();
    assert!(buffered > 0, "the socket buffer should have filled up");
    g.send(Header { flags: VSOCK_SHUTDOWN_BOTH, ..hdr(VSOCK_OP_SHUTDOWN, local, GUEST_PORT) }, &[]);
    // Credit updates the device sent while the guest was still there.
    for (pkt, _) in g.recv() {
        assert_eq!(pkt.op, VSOCK_OP_CREDIT_UPDATE, "{pkt:?}");
    }
    g.send(hdr(VSOCK_OP_RST, local, GUEST_PORT), &[]);
    assert!(g.handler.muxer().connection(&key).is_none(), "the guest's port is free again");
    assert_eq!(g.handler.muxer().connection_count(), 1, "the connection still delivers to the host");

    // The host reads late; the device flushes on EPOLLOUT and ends with EOF.
    host.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let reader = std::thread::spawn(move || {
        let mut got = Vec::new();
        let end = host.read_to_end(&mut got);
        (end.map(drop), got)
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while g.handler.muxer().connection_count() > 0 {
        g.pump();
        assert!(g.recv().is_empty(), "nothing may go to a guest that reset the connection");
        assert!(Instant::now() < deadline, "the buffered bytes never reached the host");
        std::thread::sleep(Duration::from_millis(1));
    }
    let (end, got) = reader.join().unwrap();
    assert!(end.is_ok(), "the host must see EOF, not an error: {end:?}");
    assert!(got == payload, "the host got {} of {} bytes", got.len(), payload.len());
    g.expect_nothing();
}

/// A host that goes away while a reset connection drains ends it; nothing is left behind.
#[test]
fn draining_connection_ends_when_the_host_goes() {
    let mut g = Guest::new();
    let (host, local) = establish(&mut g);
    let chunk = vec![3u8; MAX_PKT_DATA as usize];
    for _ in 0..(CONN_TX_BUF_SIZE / MAX_PKT_DATA) {
        g.send(rw(local, GUEST_PORT, chunk.len()), &chunk);
    }
    g.recv();
    g.send(hdr(VSOCK_OP_RST, local, GUEST_PORT), &[]);
    assert_eq!(g.handler.muxer().connection_count(), 1);
    drop(host);
    let deadline = Instant::now() + Duration::from_secs(5);
    while g.handler.muxer().connection_count() > 0 {
        g.pump();
        assert!(Instant::now() < deadline, "the draining connection outlived its host stream");
        std::thread::sleep(Duration::from_millis(1));
    }
    g.expect_nothing();
}

#[test]
fn guest_overrunning_credit_is_reset() {
    let mut g = Guest::new();
    let (_host, local) = establish(&mut g);
    let chunk = vec![1u8; MAX_PKT_DATA as usize];
    // Nobody reads the host side: past the advertised window the guest is cheating.
    let mut reset = false;
    for _ in 0..(2 * CONN_TX_BUF_SIZE / MAX_PKT_DATA + 8) {
        g.send(rw(local, GUEST_PORT, chunk.len()), &chunk);
        if g.recv().iter().any(|(p, _)| p.op == VSOCK_OP_RST) {
            reset = true;
            break;
        }
    }
    assert!(reset);
    assert!(g.handler.muxer().connection_count() == 0);
}

#[test]
fn rx_without_buffers_keeps_data_until_the_next_kick() {
    let mut g = Guest::new();
    let (mut host, _local) = establish(&mut g);
    let mut taken = Vec::new();
    // Each write fills one rx buffer; the guest does not give them back.
    for _ in 0..RX_BUFS {
        host.write_all(&[5u8; 100]).unwrap();
        g.pump();
        taken.extend(g.take_used());
    }
    assert_eq!(taken.len(), RX_BUFS as usize);
    host.write_all(b"more").unwrap();
    for _ in 0..5 {
        g.pump();
    }
    assert!(g.take_used().is_empty(), "no buffers, nothing delivered");
    for (i, _, _) in taken {
        g.post_rx(i);
    }
    g.handle(RX_QUEUE as u32);
    let pkts = g.recv();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].0.op, VSOCK_OP_RW);
    assert_eq!(pkts[0].1, b"more");
}

/// Deterministic test data.
fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).max(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

#[test]
fn large_transfers_both_ways_are_byte_exact() {
    transfer_both_ways(16 << 20, false);
}

/// A transfer both ways in which the host stops reading for a while (the guest runs out of
/// credit, the device buffers, credit requests and updates follow), checking after every
/// device call that it wrote guest memory only in used rings and returned rx buffers.
#[test]
fn device_writes_guest_memory_only_where_allowed() {
    transfer_both_ways(1 << 20, true);
}

fn transfer_both_ways(size: usize, watch_writes: bool) {
    const SIZE_LIMIT: usize = 16 << 20;
    const GUEST_BUF_ALLOC: u32 = 256 * 1024;
    assert!(size <= SIZE_LIMIT);
    let mut g = Guest::new();
    g.watch_writes = watch_writes;
    let (host, local) = establish(&mut g);
    let to_guest = pattern(size, 1);
    let to_host = pattern(size, 2);

    let mut host_reader = host.try_clone().unwrap();
    let mut host_writer = host;
    let expected_to_guest = to_guest.clone();
    let writer = std::thread::spawn(move || {
        host_writer.write_all(&expected_to_guest).unwrap();
        host_writer.shutdown(Shutdown::Write).unwrap();
    });
    let reader = std::thread::spawn(move || {
        let mut got = vec![0u8; size / 4];
        host_reader.read_exact(&mut got).unwrap();
        // A host that stops reading for a while: the device buffers up to its credit.
        std::thread::sleep(Duration::from_millis(500));
        host_reader.read_to_end(&mut got).unwrap();
        got
    });

    let mut received = Vec::with_capacity(size);
    let mut sent = 0usize;
    // The device's window for guest data, from its latest header.
    let (mut dev_buf_alloc, mut dev_fwd_cnt) = (CONN_TX_BUF_SIZE, 0u32);
    let mut guest_fwd_cnt = 0u32;
    let mut host_eof = false;
    let mut shut_sent = false;
    let mut reset = false;
    let mut credit_ran_out = false;
    let deadline = Instant::now() + Duration::from_secs(120);
    while !reset {
        assert!(Instant::now() < deadline, "transfer stalled: {} received, {} sent", received.len(), sent);
        g.pump();
        let mut progressed = false;
        for (pkt, data) in g.recv() {
            progressed = true;
            assert_eq!((pkt.src_port, pkt.dst_port), (local, GUEST_PORT));
            dev_buf_alloc = pkt.buf_alloc;
            dev_fwd_cnt = pkt.fwd_cnt;
            match pkt.op {
                VSOCK_OP_RW => {
                    assert!(!host_eof, "data after SHUTDOWN");
                    received.extend_from_slice(&data);
                    // The device never has more in flight than we allowed.
                    assert!(received.len() as u32 - guest_fwd_cnt <= GUEST_BUF_ALLOC);
                }
                VSOCK_OP_SHUTDOWN => {
                    assert_eq!(pkt.flags, VSOCK_SHUTDOWN_SEND);
                    host_eof = true;
                }
                VSOCK_OP_CREDIT_UPDATE | VSOCK_OP_CREDIT_REQUEST => {}
                VSOCK_OP_RST => reset = true,
                op => panic!("unexpected op {op}"),
            }
        }
        // The guest application consumed everything: tell the device.
        if received.len() as u32 != guest_fwd_cnt {
            guest_fwd_cnt = received.len() as u32;
            g.send(
                Header {
                    buf_alloc: GUEST_BUF_ALLOC,
                    fwd_cnt: guest_fwd_cnt,
                    ..hdr(VSOCK_OP_CREDIT_UPDATE, local, GUEST_PORT)
                },
                &[],
            );
        }
        // Guest writes, within the device's advertised credit.
        let credit = dev_buf_alloc - (sent as u32 - dev_fwd_cnt);
        let n = (credit as usize).min(MAX_PKT_DATA as usize).min(size - sent);
        credit_ran_out |= credit == 0;
        if n > 0 {
            let h = Header { buf_alloc: GUEST_BUF_ALLOC, fwd_cnt: guest_fwd_cnt, ..rw(local, GUEST_PORT, n) };
            g.send(h, &to_host[sent..sent + n]);
            sent += n;
            progressed = true;
        } else if sent == size && !shut_sent {
            g.send(Header { flags: VSOCK_SHUTDOWN_SEND, ..hdr(VSOCK_OP_SHUTDOWN, local, GUEST_PORT) }, &[]);
            shut_sent = true;
        }
        if !progressed {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    writer.join().unwrap();
    let got = reader.join().unwrap();
    assert!(host_eof);
    assert_eq!(received.len(), size);
    assert!(received == to_guest, "guest received corrupted data");
    assert_eq!(got.len(), size);
    assert!(got == to_host, "host received corrupted data");
    assert_eq!(g.handler.muxer().connection_count(), 0);
    if watch_writes {
        assert!(credit_ran_out, "the host's pause never used up the guest's credit");
    }
}

#[test]
fn guest_initiated_connection_reaches_the_port_socket() {
    let mut g = Guest::new();
    let mut path = g.uds.clone().into_os_string();
    path.push("_5000");
    let listener = UnixListener::bind(&path).unwrap();
    g.send(hdr(VSOCK_OP_REQUEST, 5000, 777), &[]);
    let (pkt, _) = g.expect_packet();
    assert_eq!((pkt.op, pkt.src_port, pkt.dst_port), (VSOCK_OP_RESPONSE, 5000, 777));
    let (mut host, _) = listener.accept().unwrap();
    g.send(rw(5000, 777, 4), b"ping");
    let mut buf = [0u8; 4];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");
    host.write_all(b"pong").unwrap();
    let (pkt, data) = g.expect_packet();
    assert_eq!((pkt.op, data.as_slice()), (VSOCK_OP_RW, &b"pong"[..]));
    // A second REQUEST for the same pair is a protocol error.
    g.send(hdr(VSOCK_OP_REQUEST, 5000, 777), &[]);
    let (pkt, _) = g.expect_packet();
    assert_eq!(pkt.op, VSOCK_OP_RST);
}

#[test]
fn guest_connection_to_nothing_is_refused() {
    let mut g = Guest::new();
    g.send(hdr(VSOCK_OP_REQUEST, 5001, 778), &[]);
    let (pkt, _) = g.expect_packet();
    assert_eq!((pkt.op, pkt.src_port, pkt.dst_port, pkt.dst_cid), (VSOCK_OP_RST, 5001, 778, GUEST_CID));
    assert_eq!(g.handler.muxer().connection_count(), 0);
}

#[test]
fn hostile_headers_are_dropped_or_reset() {
    let mut g = Guest::new();
    // Wrong source CID (spoofing) and wrong destination: silently dropped.
    g.send(Header { src_cid: 99, ..hdr(VSOCK_OP_REQUEST, 5002, 1) }, &[]);
    g.send(Header { dst_cid: 7, ..hdr(VSOCK_OP_REQUEST, 5002, 1) }, &[]);
    g.expect_nothing();
    // Data for no connection, unknown type: RST.
    g.send(rw(5002, 1, 3), b"abc");
    let (pkt, _) = g.expect_packet();
    assert_eq!(pkt.op, VSOCK_OP_RST);
    g.send(Header { type_: 2, ..hdr(VSOCK_OP_REQUEST, 5002, 1) }, &[]);
    let (pkt, _) = g.expect_packet();
    assert_eq!(pkt.op, VSOCK_OP_RST);
    // An RST for no connection is not answered.
    g.send(hdr(VSOCK_OP_RST, 5002, 1), &[]);
    g.expect_nothing();
    // Unknown op on a live connection: RST, and the host side sees EOF.
    let (mut host, local) = establish(&mut g);
    g.send(hdr(99, local, GUEST_PORT), &[]);
    let (pkt, _) = g.expect_packet();
    assert_eq!(pkt.op, VSOCK_OP_RST);
    let mut buf = Vec::new();
    assert_eq!(host.read_to_end(&mut buf).unwrap(), 0);
}

#[test]
fn malformed_tx_chains_are_returned_without_effect() {
    let mut g = Guest::new();
    let (mut host, local) = establish(&mut g);
    let good = encode(&rw(local, GUEST_PORT, 100));
    g.mem.write_slice(&good, GuestAddress(TX_HDR_ADDR)).unwrap();
    // Descriptor outside guest memory.
    g.send_chain(&[(MEM_SIZE + 0x1000, HEADER_SIZE as u32, false)]);
    g.send_chain(&[(TX_HDR_ADDR, HEADER_SIZE as u32, false), (u64::MAX - 10, 100, false)]);
    // Header descriptor too short.
    g.send_chain(&[(TX_HDR_ADDR, 20, false)]);
    // Device-writable where the device must only read.
    g.send_chain(&[(TX_HDR_ADDR, HEADER_SIZE as u32, true)]);
    g.send_chain(&[(TX_HDR_ADDR, HEADER_SIZE as u32, false), (TX_DATA_ADDR, 100, true)]);
    // Header len larger than the data buffer, and a missing data descriptor.
    g.send_chain(&[(TX_HDR_ADDR, HEADER_SIZE as u32, false), (TX_DATA_ADDR, 50, false)]);
    g.send_chain(&[(TX_HDR_ADDR, HEADER_SIZE as u32, false)]);
    // An oversized len.
    let huge = encode(&Header { len: MAX_PKT_DATA + 1, ..rw(local, GUEST_PORT, 0) });
    g.mem.write_slice(&huge, GuestAddress(TX_HDR_ADDR)).unwrap();
    g.send_chain(&[(TX_HDR_ADDR, HEADER_SIZE as u32, false), (TX_DATA_ADDR, MAX_PKT_DATA + 1, false)]);
    g.expect_nothing();
    // The connection is untouched by all of that.
    g.send(rw(local, GUEST_PORT, 2), b"ok");
    let mut buf = [0u8; 2];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ok");
}

#[test]
fn malformed_rx_chains_are_returned_empty() {
    let mut g = Guest::with_rx_buffers(0);
    let bad_ro = g.rx.post(&[(RX_BUF_BASE, HEADER_SIZE as u32, false), (RX_BUF_BASE + 0x100, 4096, true)]);
    let bad_short = g.rx.post(&[(RX_BUF_BASE, 8, true)]);
    let bad_outside = g.rx.post(&[(RX_BUF_BASE, HEADER_SIZE as u32, true), (MEM_SIZE - 16, 4096, true)]);
    let good = g.rx.post(&[(RX_BUF_BASE, HEADER_SIZE as u32, true), (RX_BUF_BASE + 0x100, 4096, true)]);
    // A request to a port nobody listens on makes the device owe the guest an RST.
    g.send(hdr(VSOCK_OP_REQUEST, 6000, 1), &[]);
    let used = g.rx.used();
    assert_eq!(used, vec![(bad_ro, 0), (bad_short, 0), (bad_outside, 0), (good, HEADER_SIZE as u32)]);
    let mut hb = [0u8; HEADER_SIZE];
    g.mem.read_slice(&mut hb, GuestAddress(RX_BUF_BASE)).unwrap();
    assert_eq!(decode(&hb).op, VSOCK_OP_RST);
}

#[test]
fn vsock_device_through_mmio_and_event_loop() {
    use crate::devices::bus::BusDevice;
    use crate::devices::event_loop::EventLoop;
    use crate::devices::virtio::mmio::MmioTransport;
    use virtio_bindings::virtio_config::*;

    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    let mem: &'static GuestMemory =
        Box::leak(Box::new(GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()));
    let event_loop = EventLoop::new().unwrap();
    let device = super::Vsock::new(GUEST_CID, &uds, event_loop.handle()).unwrap();
    assert!(super::Vsock::new(2, &dir.path().join("x"), event_loop.handle()).is_err());
    let hardening = crate::seccomp::Hardening::trap_for_test();
    let thread = event_loop.spawn("tern-devices", crate::seccomp::SeccompRole::Devices, &hardening).unwrap();
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let kicks: Vec<EventFd> = (0..3).map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap()).collect();
    let mut t = MmioTransport::new(
        Box::new(device),
        mem.clone(),
        irq.try_clone().unwrap(),
        kicks.iter().map(|k| k.try_clone().unwrap()).collect(),
    );
    let w = |t: &mut MmioTransport, off: u64, v: u32| t.write(off, &v.to_le_bytes());
    let r = |t: &mut MmioTransport, off: u64| {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    };
    assert_eq!(r(&mut t, 0x008), 19);
    let mut cid = [0u8; 8];
    t.read(0x100, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), GUEST_CID);
    let up = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;
    w(&mut t, 0x070, VIRTIO_CONFIG_S_ACKNOWLEDGE);
    w(&mut t, 0x070, up);
    w(&mut t, 0x024, 1);
    w(&mut t, 0x020, 1); // VIRTIO_F_VERSION_1 is bit 32
    w(&mut t, 0x070, up | VIRTIO_CONFIG_S_FEATURES_OK);
    let mut rings = Vec::new();
    for q in 0..3u32 {
        let ring = Ring::new(mem, u64::from(q) * 0x1_0000, QSIZE);
        w(&mut t, 0x030, q);
        assert_eq!(r(&mut t, 0x034), 256);
        w(&mut t, 0x038, u32::from(QSIZE));
        let (d, a, u) = (ring.desc, ring.avail, ring.used);
        w(&mut t, 0x080, d as u32);
        w(&mut t, 0x090, a as u32);
        w(&mut t, 0x0a0, u as u32);
        w(&mut t, 0x044, 1);
        rings.push(ring);
    }
    w(&mut t, 0x070, up | VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK);
    assert_eq!(r(&mut t, 0x070) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    // Post an rx buffer and kick it through the MMIO notify register.
    rings[0].post(&[(RX_BUF_BASE, HEADER_SIZE as u32, true), (RX_BUF_BASE + 0x100, 4096, true)]);
    w(&mut t, 0x050, 0);
    let mut host = UnixStream::connect(&uds).unwrap();
    host.write_all(b"CONNECT 52\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let used = loop {
        let used = rings[0].used();
        if !used.is_empty() {
            break used;
        }
        assert!(Instant::now() < deadline, "the guest never saw the REQUEST");
        std::thread::sleep(Duration::from_millis(5));
    };
    assert_eq!(used[0].1, HEADER_SIZE as u32);
    let mut hb = [0u8; HEADER_SIZE];
    mem.read_slice(&mut hb, GuestAddress(RX_BUF_BASE)).unwrap();
    let req = decode(&hb);
    assert_eq!((req.op, req.dst_port, req.dst_cid), (VSOCK_OP_REQUEST, 52, GUEST_CID));
    assert_ne!(r(&mut t, 0x060) & 1, 0, "used buffer interrupt");
    assert!(irq.read().unwrap() >= 1);
    // Reset: the connection goes away and the host client sees EOF.
    w(&mut t, 0x070, 0);
    host.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = Vec::new();
    assert_eq!(host.read_to_end(&mut buf).unwrap(), 0);
    drop(t);
    assert!(!uds.exists(), "the device removes its socket");
    thread.stop();
    hardening.assert_no_violation();
}
