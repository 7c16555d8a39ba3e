//! In-memory tests of the virtio-net device, driven through [`super::test_utils`]: frames
//! both ways, hostile chains, buffer starvation, EVENT_IDX, offload negotiation, reset. One test
//! checks that the real [`Tap`] on a socket makes activation fail rather than skip the ioctls.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vm_memory::{Bytes, GuestAddress};

use super::event_handler::{MAX_CHAIN_DESCRIPTORS, RX_QUEUE, TAP_EVENT, TX_QUEUE};
use super::tap::{tap_offload_flags, TapIo};
use super::test_utils::*;
use super::*;
use crate::devices::event_loop::EventLoop;
use crate::devices::virtio::{ActivateError, VirtioDevice};

#[test]
fn rx_without_buffers_stops_reading_the_tap_until_a_kick() {
    let mut g = Guest::new(MRG);
    let p = packet(100);
    g.host_send(&p);
    for _ in 0..3 {
        g.handler.handle(TAP_EVENT);
    }
    assert!(!g.handler.wants_tap_events(), "the tap must leave the epoll set");
    assert!(!g.handler.has_pending_frame(), "no buffers: the tap must not even be read");
    assert!(g.take_rx().is_empty());
    assert_eq!(g.interrupts(), 0);

    g.post_rx(4, 2048);
    g.handler.handle(RX_QUEUE as u32);
    assert!(g.handler.wants_tap_events());
    let got = g.take_rx();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0][VNET_HDR_LEN..], p[VNET_HDR_LEN..]);
    assert_eq!(g.interrupts(), 1);
    let m = g.handler.metrics().snapshot();
    assert_eq!((m.rx_packets, m.rx_bytes, m.rx_drops), (1, 100, 0));
    assert_eq!(m.queue_notifications, vec![0, 0], "the test never wrote the kick eventfds");
}

#[test]
fn tap_frame_spreads_over_mergeable_buffers_with_num_buffers() {
    let mut g = Guest::new(MRG);
    g.post_rx(8, 1024);
    let p = packet(2500);
    g.host_send(&p);
    g.handler.handle(TAP_EVENT);
    let bufs = g.take_rx();
    assert_eq!(bufs.iter().map(Vec::len).collect::<Vec<_>>(), vec![1024, 1024, 464]);
    let frame = joined(&bufs);
    assert_eq!(frame[..10], p[..10], "the tap's header reaches the guest unchanged");
    assert_eq!(u16::from_le_bytes([frame[10], frame[11]]), 3, "num_buffers");
    assert_eq!(frame[VNET_HDR_LEN..], p[VNET_HDR_LEN..]);
    assert_eq!(g.interrupts(), 1);
    assert!(g.handler.wants_tap_events());
}

#[test]
fn without_mergeable_buffers_a_frame_takes_one_chain_and_num_buffers_is_one() {
    let mut g = Guest::new(0);
    g.post_rx(2, 4096);
    let p = packet(1500);
    g.host_send(&p);
    g.host_send(&p);
    g.handler.handle(TAP_EVENT);
    let bufs = g.take_rx();
    assert_eq!(bufs.len(), 2);
    for b in bufs {
        assert_eq!(b.len(), p.len());
        assert_eq!(u16::from_le_bytes([b[10], b[11]]), 1);
        assert_eq!(b[VNET_HDR_LEN..], p[VNET_HDR_LEN..]);
    }
}

#[test]
fn frame_larger_than_the_posted_buffers_waits_for_more_of_them() {
    let mut g = Guest::new(MRG);
    g.post_rx(1, 1024);
    let p = packet(3000);
    g.host_send(&p);
    g.handler.handle(TAP_EVENT);
    assert!(g.handler.has_pending_frame());
    assert!(!g.handler.wants_tap_events());
    assert!(g.take_rx().is_empty(), "no part of a frame is published early");

    g.post_rx(3, 1024);
    g.handler.handle(RX_QUEUE as u32);
    let bufs = g.take_rx();
    assert_eq!(bufs.len(), 3);
    assert_eq!(joined(&bufs)[VNET_HDR_LEN..], p[VNET_HDR_LEN..]);
    assert!(!g.handler.has_pending_frame());
    assert!(g.handler.wants_tap_events());
}

#[test]
fn frame_larger_than_the_guest_can_ever_hold_is_dropped_and_counted() {
    // Without mergeable buffers, the frame must fit one chain: it is dropped, the chain kept.
    let mut g = Guest::new(0);
    g.post_rx(1, 1024);
    g.host_send(&packet(3000));
    let small = packet(200);
    g.host_send(&small);
    g.handler.handle(TAP_EVENT);
    let bufs = g.take_rx();
    assert_eq!(bufs.len(), 1);
    assert_eq!(bufs[0][VNET_HDR_LEN..], small[VNET_HDR_LEN..]);
    let m = g.handler.metrics().snapshot();
    assert_eq!((m.rx_drops, m.rx_packets), (1, 1));

    // With them, a frame larger than a full ring of buffers is dropped too.
    let mut g = Guest::new(MRG);
    g.post_rx(usize::from(QSIZE), 16);
    g.host_send(&packet(5000));
    g.host_send(&packet(20));
    g.handler.handle(TAP_EVENT);
    let bufs = g.take_rx();
    assert_eq!(bufs.iter().map(Vec::len).collect::<Vec<_>>(), vec![16, 16]);
    assert_eq!(g.handler.metrics().snapshot().rx_drops, 1);
    assert!(!g.handler.has_pending_frame());
}

#[test]
fn malformed_rx_chains_are_returned_empty_and_counted() {
    let mut g = Guest::new(MRG);
    let readable = g.rx.post(&[(RX_BUF_BASE, 2048, false)]);
    let outside = g.rx.post(&[(MEM_SIZE + 0x1000, 2048, true)]);
    let tiny = g.rx.post(&[(RX_BUF_BASE, 4, true)]);
    g.post_rx(1, 2048);
    let p = packet(64);
    g.host_send(&p);
    g.handler.handle(TAP_EVENT);
    let used = g.rx.used();
    assert_eq!(used.len(), 4);
    assert_eq!(&used[..3], &[(readable, 0), (outside, 0), (tiny, 0)]);
    assert_eq!(used[3].1, p.len() as u32);
    assert_eq!(g.handler.metrics().snapshot().bad_chains, 3);
}

#[test]
fn tx_chain_reaches_the_tap_exactly() {
    let mut g = Guest::new(MRG);
    let p = packet(1400);
    // Header and payload split unevenly over three descriptors.
    g.mem.write_slice(&p, GuestAddress(TX_BUF)).unwrap();
    let head = g.tx.post(&[(TX_BUF, 5, false), (TX_BUF + 5, 700, false), (TX_BUF + 705, p.len() as u32 - 705, false)]);
    g.handler.handle(TX_QUEUE as u32);
    assert_eq!(g.host_recv(), p);
    assert_eq!(g.host_drain(), 0);
    assert_eq!(g.tx.used(), vec![(head, 0)]);
    assert_eq!(g.interrupts(), 1);
    let m = g.handler.metrics().snapshot();
    assert_eq!((m.tx_packets, m.tx_bytes, m.tx_drops, m.bad_chains), (1, 1400, 0, 0));
}

#[test]
fn malformed_tx_chains_fail_alone_and_are_counted() {
    let mut g = Guest::new(MRG);
    let hdr = VNET_HDR_LEN as u32;
    let writable = g.tx.post(&[(TX_BUF, hdr, false), (TX_BUF + 64, 100, true)]);
    let oversized = g.tx.post(&[(TX_BUF, hdr, false), (TX_BUF + 64, (MAX_PACKET_LEN as u32 - hdr) + 1, false)]);
    let many: Vec<_> = (0..=MAX_CHAIN_DESCRIPTORS as u64).map(|i| (TX_BUF + 16 * i, 16, false)).collect();
    let too_many = g.tx.post(&many);
    let outside = g.tx.post(&[(TX_BUF, hdr, false), (MEM_SIZE - 10, 100, false)]);
    let short = g.tx.post(&[(TX_BUF, hdr - 1, false)]);
    let p = packet(300);
    let good = g.post_tx_packet(&p);
    g.handler.handle(TX_QUEUE as u32);

    let heads: Vec<_> =
        g.tx.used()
            .into_iter()
            .map(|(head, len)| {
                assert_eq!(len, 0);
                head
            })
            .collect();
    assert_eq!(heads, vec![writable, oversized, too_many, outside, short, good]);
    assert_eq!(g.host_recv(), p, "the good chain after the bad ones still goes through");
    assert_eq!(g.host_drain(), 0);
    let m = g.handler.metrics().snapshot();
    assert_eq!((m.bad_chains, m.tx_packets, m.tx_drops), (5, 1, 0));
}

#[test]
fn tx_frames_the_tap_refuses_are_dropped_and_counted() {
    let mut g = Guest::new(MRG);
    let p = packet(60_000);
    // A non-blocking socket takes datagrams until its send buffer is full, then says EAGAIN:
    // the device must drop, never block or retry.
    let sent = 64;
    for _ in 0..sent {
        g.post_tx_packet(&p);
    }
    g.handler.handle(TX_QUEUE as u32);
    assert_eq!(g.tx.used().len(), sent, "every chain comes back");
    let m = g.handler.metrics().snapshot();
    assert!(m.tx_drops > 0, "{m:?}");
    assert_eq!(m.tx_packets + m.tx_drops, sent as u64);
    assert_eq!(g.host_drain() as u64, m.tx_packets);
}

#[test]
fn event_idx_asks_for_a_kick_when_rx_runs_dry_and_honours_used_event() {
    let mut g = Guest::new(MRG | EVENT_IDX);
    g.rx.set_avail_event(0x1234);
    g.host_send(&packet(60));
    g.handler.handle(TAP_EVENT);
    assert!(!g.handler.wants_tap_events());
    assert_eq!(g.rx.avail_event(), 0, "kick me when you post entry 0");

    // The driver wants an interrupt only after the second used buffer.
    g.rx.set_used_event(1);
    g.post_rx(4, 2048);
    g.handler.handle(RX_QUEUE as u32);
    assert_eq!(g.take_rx().len(), 1);
    assert_eq!(g.interrupts(), 0, "used_event not reached: no interrupt");
    g.host_send(&packet(60));
    g.handler.handle(TAP_EVENT);
    assert_eq!(g.take_rx().len(), 1);
    assert_eq!(g.interrupts(), 1);
}

#[test]
fn offload_flags_come_from_acked_guest_features_only() {
    let f = |bits: &[u32]| bits.iter().fold(0u64, |acc, b| acc | (1u64 << b));
    let all_guest = f(&[
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_GUEST_ECN,
        VIRTIO_NET_F_GUEST_UFO,
    ]);
    let host_side = f(&[
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_F_HOST_ECN,
        VIRTIO_NET_F_HOST_UFO,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_F_VERSION_1,
    ]);
    let cases = [
        (0, 0),
        (host_side, 0),
        (f(&[VIRTIO_NET_F_GUEST_CSUM]), libc::TUN_F_CSUM),
        (all_guest, libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN | libc::TUN_F_UFO),
        (
            all_guest | host_side,
            libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN | libc::TUN_F_UFO,
        ),
        (f(&[VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO6]), libc::TUN_F_CSUM | libc::TUN_F_TSO6),
        // The kernel refuses TSO without checksum offload, and ECN without TSO.
        (f(&[VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_UFO]), 0),
        (f(&[VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN]), libc::TUN_F_CSUM),
    ];
    for (acked, expected) in cases {
        assert_eq!(tap_offload_flags(acked), expected, "acked {acked:#x}");
    }
}

#[test]
fn config_space_and_features() {
    let (tap, _peer) = socket_tap();
    let lp = EventLoop::new().unwrap();
    let net = Net::with_tap("tap0", tap, MAC, 1400, lp.handle()).unwrap();
    let mut config = [0u8; 16];
    net.read_config(0, &mut config);
    assert_eq!(&config[..6], &MAC);
    assert_eq!(u16::from_le_bytes([config[6], config[7]]), VIRTIO_NET_S_LINK_UP as u16);
    assert_eq!(u16::from_le_bytes([config[8], config[9]]), 1, "max_virtqueue_pairs");
    assert_eq!(u16::from_le_bytes([config[10], config[11]]), 1400);
    assert_eq!(&config[12..], &[0; 4]);
    let features = net.avail_features();
    for bit in [
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_MTU,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_GUEST_ECN,
        VIRTIO_NET_F_HOST_ECN,
    ] {
        assert_ne!(features & (1 << bit), 0, "feature bit {bit}");
    }
    assert_eq!(features & (1 << VIRTIO_NET_F_CTRL_VQ), 0);
    assert_eq!(net.queue_max_sizes(), &[QSIZE, QSIZE]);

    for (mac, mtu) in [([0u8; 6], 1500), ([0x01, 0, 0, 0, 0, 1], 1500), (MAC, 67)] {
        let (tap, _peer) = socket_tap();
        assert!(Net::with_tap("tap0", tap, mac, mtu, lp.handle()).is_err());
    }
}

#[test]
fn device_on_its_loop_polls_the_tap_only_with_buffers_and_survives_reset() {
    let mem = new_memory();
    let (tap, peer) = socket_tap();
    let tap_fd = tap.raw_fd();
    let lp = EventLoop::new().unwrap();
    let mut net = Net::with_tap("tap-e2e", tap.clone(), MAC, 1500, lp.handle()).unwrap();
    let hardening = crate::seccomp::Hardening::trap_for_test();
    let thread = lp.spawn("tern-net", crate::seccomp::SeccompRole::Net, &hardening).unwrap();
    let interrupts = Arc::new(CountingInterrupt(AtomicUsize::new(0)));

    let acked = net.avail_features() & !(1u64 << VIRTIO_NET_F_GUEST_UFO);
    net.set_acked_features(acked);
    let (mut rx, _tx, rx_kick, queues) = activation(mem, RX_RING, TX_RING);
    net.activate(mem.clone(), interrupts.clone(), queues).unwrap();
    assert_eq!(*tap.vnet_hdr_size.lock().unwrap(), Some(VNET_HDR_LEN as i32));
    assert_eq!(*tap.offloads.lock().unwrap(), vec![tap_offload_flags(acked)]);

    // No rx buffers: the frame waits in the tap and the tap is not polled (no spinning).
    let p = packet(500);
    peer.send(&p).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    wait_until("the tap to leave the epoll set", || !tap_is_polled(tap_fd));
    assert_eq!(rx.used_idx(), 0);

    // Buffers and a kick: the frame arrives and the tap is polled again.
    for i in 0..8 {
        rx.post(&[(RX_BUF_BASE + i * RX_BUF_STRIDE, 2048, true)]);
    }
    rx_kick.write(1).unwrap();
    wait_until("the frame", || rx.used_idx() == 1);
    assert_eq!(rx.used()[0].1, p.len() as u32);
    wait_until("the tap to be polled", || tap_is_polled(tap_fd));

    // Reset: the handler stops, the tap leaves the epoll set, frames stay queued.
    assert!(net.reset());
    assert_eq!(tap.offloads.lock().unwrap().last(), Some(&0));
    wait_until("the tap to leave the epoll set after reset", || !tap_is_polled(tap_fd));
    peer.send(&p).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(rx.used_idx(), 1, "a reset device touches no guest memory");

    // A new driver with fewer offloads and fresh rings gets the waiting frame.
    net.set_acked_features(MRG | (1 << VIRTIO_F_VERSION_1));
    let (mut rx2, _tx2, rx2_kick, queues) = activation(mem, 0x8000, 0xc000);
    net.activate(mem.clone(), interrupts.clone(), queues).unwrap();
    assert_eq!(*tap.offloads.lock().unwrap(), vec![tap_offload_flags(acked), 0, 0]);
    rx2.post(&[(RX_BUF_BASE, 2048, true)]);
    rx2_kick.write(1).unwrap();
    wait_until("the frame after reactivation", || rx2.used_idx() == 1);
    assert_eq!(rx2.used()[0].1, p.len() as u32);
    assert!(interrupts.0.load(Ordering::SeqCst) >= 2);

    drop(net);
    thread.stop();
    hardening.assert_no_violation();
}

#[test]
fn activation_fails_when_the_tap_rejects_its_ioctls() {
    // The real Tap on a socket: the ioctls fail (ENOTTY), and so must activation.
    let (ours, _peer) = UnixDatagram::pair().unwrap();
    let fd = OwnedFd::from(ours);
    let lp = EventLoop::new().unwrap();
    let mut net = Net::new("not-a-tap", &fd, MAC, 1500, lp.handle()).unwrap();
    // The device made the shared open file non-blocking.
    // SAFETY: F_GETFL on an fd this test owns.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    assert_ne!(flags & libc::O_NONBLOCK, 0);
    net.set_acked_features(1 << VIRTIO_F_VERSION_1);
    let mem = new_memory();
    let (_rx, _tx, _kick, queues) = activation(mem, RX_RING, TX_RING);
    let err = net.activate(mem.clone(), Arc::new(CountingInterrupt(AtomicUsize::new(0))), queues).unwrap_err();
    assert!(matches!(&err, ActivateError::Other(msg) if msg.contains("vnet header size")), "{err}");
    let (_rx, _tx, _kick, mut queues) = activation(mem, RX_RING, TX_RING);
    queues.truncate(1);
    assert!(matches!(
        net.activate(mem.clone(), Arc::new(CountingInterrupt(AtomicUsize::new(0))), queues),
        Err(ActivateError::QueueCount { expected: 2, got: 1 })
    ));
}
