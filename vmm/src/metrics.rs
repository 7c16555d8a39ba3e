//! What the VMM counts while a VM runs: vCPU exits by reason, queue notifications per virtio
//! device, virtio-fs requests by FUSE opcode with a latency histogram, vsock payload bytes,
//! and per virtio-net device its packets, bytes, drops and refused chains.
//!
//! Plain relaxed atomics, bumped on the hot paths (a vCPU exit, a queue kick, a FUSE request)
//! and read by whoever asks through [`crate::api::VmHandle::metrics`]. The VMM knows nothing
//! of Prometheus or containerd: the runtime turns a [`VmMetricsSnapshot`] into its exposition.
//! Every label set is fixed and small (the exit reasons below, two or three queues per device,
//! at most [`FUSE_OPCODE_SLOTS`] opcodes, one entry per net device configured at boot), so a
//! scrape stays cheap however long the VM runs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tern_sync::LockExt;

/// Why a vCPU left `KVM_RUN`, as counted by `VmMetrics::exits`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExitReason {
    /// Port-I/O read (`KVM_EXIT_IO`, in).
    IoIn,
    /// Port-I/O write (`KVM_EXIT_IO`, out).
    IoOut,
    /// MMIO read.
    MmioRead,
    /// MMIO write (virtio register accesses; queue notifications go to ioeventfds instead).
    MmioWrite,
    /// `HLT` reached userspace.
    Hlt,
    /// Triple fault or shutdown.
    Shutdown,
    /// `KVM_EXIT_SYSTEM_EVENT`.
    SystemEvent,
    /// `KVM_EXIT_INTR` or `KVM_RUN` interrupted by a signal (a kick).
    Interrupted,
    /// Entry failures, internal errors and exits tern does not handle.
    Other,
}

impl ExitReason {
    /// Every reason, in exposition order.
    pub const ALL: [ExitReason; 9] = [
        ExitReason::IoIn,
        ExitReason::IoOut,
        ExitReason::MmioRead,
        ExitReason::MmioWrite,
        ExitReason::Hlt,
        ExitReason::Shutdown,
        ExitReason::SystemEvent,
        ExitReason::Interrupted,
        ExitReason::Other,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ExitReason::IoIn => "io_in",
            ExitReason::IoOut => "io_out",
            ExitReason::MmioRead => "mmio_read",
            ExitReason::MmioWrite => "mmio_write",
            ExitReason::Hlt => "hlt",
            ExitReason::Shutdown => "shutdown",
            ExitReason::SystemEvent => "system_event",
            ExitReason::Interrupted => "interrupted",
            ExitReason::Other => "other",
        }
    }
}

/// Upper bounds (seconds) of the virtio-fs request latency histogram. Few on purpose: the
/// scrape of every sandbox carries them.
pub const FS_LATENCY_BUCKETS: [f64; 7] = [0.000_05, 0.000_2, 0.001, 0.005, 0.02, 0.1, 1.0];
/// FUSE opcodes below this are counted one by one; larger ones (none in FUSE 7.3x) as one slot.
pub const FUSE_OPCODE_SLOTS: usize = 64;

/// A histogram of durations with fixed buckets, lock-free.
#[derive(Debug)]
pub struct AtomicHistogram {
    bounds: &'static [f64],
    /// One slot per bound plus one for "larger than the last bound".
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    sum_ns: AtomicU64,
}

/// A point-in-time copy of an [`AtomicHistogram`].
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// `(upper bound in seconds, observations in this bucket alone)`; the last entry's bound
    /// is `f64::INFINITY`. Counts are per bucket, not cumulative.
    pub buckets: Vec<(f64, u64)>,
    /// Number of observations.
    pub count: u64,
    /// Sum of the observations, in seconds.
    pub sum_secs: f64,
}

impl AtomicHistogram {
    /// An empty histogram over `bounds` (seconds, ascending).
    pub fn new(bounds: &'static [f64]) -> Self {
        AtomicHistogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_ns: AtomicU64::new(0),
        }
    }

    /// Record one duration.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let slot = self.bounds.iter().position(|b| secs <= *b).unwrap_or(self.bounds.len());
        if let Some(bucket) = self.buckets.get(slot) {
            bucket.fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Copy the current values.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let buckets = self
            .bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(self.buckets.iter().map(|b| b.load(Ordering::Relaxed)))
            .collect();
        HistogramSnapshot {
            buckets,
            count: self.count.load(Ordering::Relaxed),
            sum_secs: self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }
}

/// Counters of one virtio device.
#[derive(Debug)]
pub struct DeviceMetrics {
    /// Queue notifications (guest kicks) per queue index, as counted by the ioeventfds.
    queue_notifications: Vec<AtomicU64>,
}

impl DeviceMetrics {
    fn new(queues: usize) -> Self {
        DeviceMetrics { queue_notifications: (0..queues).map(|_| AtomicU64::new(0)).collect() }
    }

    /// Add `kicks` notifications of `queue` (an eventfd read returns how many accumulated).
    pub fn queue_notified(&self, queue: usize, kicks: u64) {
        if let Some(c) = self.queue_notifications.get(queue) {
            c.fetch_add(kicks, Ordering::Relaxed);
        }
    }

    fn snapshot(&self) -> Vec<u64> {
        self.queue_notifications.iter().map(|c| c.load(Ordering::Relaxed)).collect()
    }
}

/// virtio-fs request counters.
#[derive(Debug)]
pub struct FsMetrics {
    /// Queue notifications (hiprio, request).
    pub device: DeviceMetrics,
    ops: Vec<AtomicU64>,
    errors: AtomicU64,
    latency: AtomicHistogram,
}

impl FsMetrics {
    fn new() -> Self {
        FsMetrics {
            device: DeviceMetrics::new(2),
            ops: (0..=FUSE_OPCODE_SLOTS).map(|_| AtomicU64::new(0)).collect(),
            errors: AtomicU64::new(0),
            latency: AtomicHistogram::new(&FS_LATENCY_BUCKETS),
        }
    }

    /// One FUSE request with `opcode` took `took`; `failed` when the server returned an error
    /// (not a FUSE error reply: those are answers).
    pub fn request_served(&self, opcode: u32, took: Duration, failed: bool) {
        let slot = usize::try_from(opcode).unwrap_or(FUSE_OPCODE_SLOTS).min(FUSE_OPCODE_SLOTS);
        if let Some(c) = self.ops.get(slot) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        if failed {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        self.latency.observe(took);
    }

    /// A chain refused before it reached the FUSE server.
    pub fn request_refused(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }
}

/// vsock counters.
#[derive(Debug)]
pub struct VsockMetrics {
    /// Queue notifications (rx, tx, event).
    pub device: DeviceMetrics,
    bytes_to_guest: AtomicU64,
    bytes_from_guest: AtomicU64,
}

impl VsockMetrics {
    fn new() -> Self {
        VsockMetrics {
            device: DeviceMetrics::new(3),
            bytes_to_guest: AtomicU64::new(0),
            bytes_from_guest: AtomicU64::new(0),
        }
    }

    /// Payload bytes of a data packet put in a guest rx buffer.
    pub fn sent_to_guest(&self, bytes: u32) {
        self.bytes_to_guest.fetch_add(u64::from(bytes), Ordering::Relaxed);
    }

    /// Payload bytes of a data packet the guest sent.
    pub fn received_from_guest(&self, bytes: u32) {
        self.bytes_from_guest.fetch_add(u64::from(bytes), Ordering::Relaxed);
    }
}

/// Counters of one virtio-net device. "rx" is host → guest (frames the tap gave us for the
/// guest), "tx" is guest → host; bytes are Ethernet frame bytes, without the virtio-net header.
#[derive(Debug)]
pub struct NetMetrics {
    name: String,
    /// Queue notifications (rx, tx).
    pub device: DeviceMetrics,
    rx_packets: AtomicU64,
    rx_bytes: AtomicU64,
    rx_drops: AtomicU64,
    tx_packets: AtomicU64,
    tx_bytes: AtomicU64,
    tx_drops: AtomicU64,
    bad_chains: AtomicU64,
}

impl NetMetrics {
    /// Zeroed counters of the device named `name` (the host tap's name).
    pub fn new(name: &str) -> Self {
        NetMetrics {
            name: name.to_owned(),
            device: DeviceMetrics::new(2),
            rx_packets: AtomicU64::new(0),
            rx_bytes: AtomicU64::new(0),
            rx_drops: AtomicU64::new(0),
            tx_packets: AtomicU64::new(0),
            tx_bytes: AtomicU64::new(0),
            tx_drops: AtomicU64::new(0),
            bad_chains: AtomicU64::new(0),
        }
    }

    /// The device's name (the host tap's name).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A frame of `bytes` went into the guest's rx buffers.
    pub fn rx_frame(&self, bytes: usize) {
        self.rx_packets.fetch_add(1, Ordering::Relaxed);
        self.rx_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// A frame from the tap was dropped (too large for the guest's buffers, or malformed).
    pub fn rx_dropped(&self) {
        self.rx_drops.fetch_add(1, Ordering::Relaxed);
    }

    /// A guest frame of `bytes` was written to the tap.
    pub fn tx_frame(&self, bytes: usize) {
        self.tx_packets.fetch_add(1, Ordering::Relaxed);
        self.tx_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// A well-formed guest frame the tap did not take (EAGAIN or any other write error).
    pub fn tx_dropped(&self) {
        self.tx_drops.fetch_add(1, Ordering::Relaxed);
    }

    /// A descriptor chain (rx or tx) refused as malformed and returned unused.
    pub fn bad_chain(&self) {
        self.bad_chains.fetch_add(1, Ordering::Relaxed);
    }

    /// Copy the counters.
    pub fn snapshot(&self) -> NetMetricsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        NetMetricsSnapshot {
            device: self.name.clone(),
            queue_notifications: self.device.snapshot(),
            rx_packets: get(&self.rx_packets),
            rx_bytes: get(&self.rx_bytes),
            rx_drops: get(&self.rx_drops),
            tx_packets: get(&self.tx_packets),
            tx_bytes: get(&self.tx_bytes),
            tx_drops: get(&self.tx_drops),
            bad_chains: get(&self.bad_chains),
        }
    }
}

/// A point-in-time copy of one device's [`NetMetrics`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetMetricsSnapshot {
    /// The device's name (the host tap's name): the `device` label.
    pub device: String,
    /// Queue notifications, by queue index (0 rx, 1 tx).
    pub queue_notifications: Vec<u64>,
    /// Frames put in guest rx buffers.
    pub rx_packets: u64,
    /// Bytes of those frames (without the virtio-net header).
    pub rx_bytes: u64,
    /// Frames from the tap that were dropped.
    pub rx_drops: u64,
    /// Guest frames written to the tap.
    pub tx_packets: u64,
    /// Bytes of those frames (without the virtio-net header).
    pub tx_bytes: u64,
    /// Well-formed guest frames the tap refused.
    pub tx_drops: u64,
    /// Malformed descriptor chains (rx and tx) returned unused.
    pub bad_chains: u64,
}

/// Everything one VM counts. Shared (`Arc`) by the vCPU threads, the device handlers and the
/// VM handle.
#[derive(Debug)]
pub struct VmMetrics {
    exits: [AtomicU64; ExitReason::ALL.len()],
    /// The virtio-fs device's counters (zero when the VM has none).
    pub fs: FsMetrics,
    /// The vsock device's counters (zero when the VM has none).
    pub vsock: VsockMetrics,
    /// One entry per virtio-net device, in device order; filled while the VM is built.
    net: Mutex<Vec<Arc<NetMetrics>>>,
    /// Where the VM's hardened threads report seccomp violations (counted per role).
    pub seccomp: Arc<crate::seccomp::ViolationSink>,
}

impl Default for VmMetrics {
    fn default() -> Self {
        VmMetrics {
            exits: Default::default(),
            fs: FsMetrics::new(),
            vsock: VsockMetrics::new(),
            net: Mutex::new(Vec::new()),
            seccomp: Arc::default(),
        }
    }
}

/// A point-in-time copy of [`VmMetrics`], for exposition.
#[derive(Debug, Clone, PartialEq)]
pub struct VmMetricsSnapshot {
    /// `(reason, exits)` for every [`ExitReason`].
    pub exits: Vec<(ExitReason, u64)>,
    /// virtio-fs queue notifications, by queue index (0 hiprio, 1 request).
    pub fs_queue_notifications: Vec<u64>,
    /// `(FUSE opcode, requests)` for opcodes seen at least once; opcode
    /// `FUSE_OPCODE_SLOTS` stands for every larger one.
    pub fs_ops: Vec<(u32, u64)>,
    /// virtio-fs requests that failed in the server or were refused.
    pub fs_errors: u64,
    /// Latency of virtio-fs requests in the FUSE server.
    pub fs_latency: HistogramSnapshot,
    /// vsock queue notifications, by queue index (0 rx, 1 tx, 2 event).
    pub vsock_queue_notifications: Vec<u64>,
    /// vsock payload bytes host → guest.
    pub vsock_bytes_to_guest: u64,
    /// vsock payload bytes guest → host.
    pub vsock_bytes_from_guest: u64,
    /// Per virtio-net device, in device order (empty without net devices).
    pub net: Vec<NetMetricsSnapshot>,
    /// `(role, violations)` of the seccomp filters, for every role (mode `trap` only: in `log`
    /// mode the kernel logs them and tern does not see them).
    pub seccomp_violations: Vec<(crate::seccomp::SeccompRole, u64)>,
}

impl VmMetrics {
    /// Count one vCPU exit.
    pub fn exit(&self, reason: ExitReason) {
        let slot = ExitReason::ALL.iter().position(|r| *r == reason).unwrap_or(ExitReason::ALL.len() - 1);
        if let Some(c) = self.exits.get(slot) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counters for a new virtio-net device named `name` (the host tap's name), included in
    /// every later snapshot.
    pub fn add_net_device(&self, name: &str) -> Arc<NetMetrics> {
        let metrics = Arc::new(NetMetrics::new(name));
        self.net_devices().push(metrics.clone());
        metrics
    }

    fn net_devices(&self) -> std::sync::MutexGuard<'_, Vec<Arc<NetMetrics>>> {
        // Every update is one push: a panic elsewhere cannot leave the list half-changed.
        self.net.lock_unpoisoned()
    }

    /// Copy every counter.
    pub fn snapshot(&self) -> VmMetricsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        VmMetricsSnapshot {
            exits: ExitReason::ALL.iter().copied().zip(self.exits.iter().map(get)).collect(),
            fs_queue_notifications: self.fs.device.snapshot(),
            fs_ops: self
                .fs
                .ops
                .iter()
                .enumerate()
                .filter_map(|(op, c)| {
                    let n = get(c);
                    (n > 0).then(|| (u32::try_from(op).unwrap_or(u32::MAX), n))
                })
                .collect(),
            fs_errors: get(&self.fs.errors),
            fs_latency: self.fs.latency.snapshot(),
            vsock_queue_notifications: self.vsock.device.snapshot(),
            vsock_bytes_to_guest: get(&self.vsock.bytes_to_guest),
            vsock_bytes_from_guest: get(&self.vsock.bytes_from_guest),
            net: self.net_devices().iter().map(|m| m.snapshot()).collect(),
            seccomp_violations: self.seccomp.counts(),
        }
    }
}

/// Name of a FUSE opcode, for labels (`"op_<n>"` for ones tern does not name).
pub fn fuse_opcode_name(opcode: u32) -> std::borrow::Cow<'static, str> {
    let name = match opcode {
        1 => "lookup",
        2 => "forget",
        3 => "getattr",
        4 => "setattr",
        5 => "readlink",
        6 => "symlink",
        8 => "mknod",
        9 => "mkdir",
        10 => "unlink",
        11 => "rmdir",
        12 => "rename",
        13 => "link",
        14 => "open",
        15 => "read",
        16 => "write",
        17 => "statfs",
        18 => "release",
        20 => "fsync",
        21 => "setxattr",
        22 => "getxattr",
        23 => "listxattr",
        24 => "removexattr",
        25 => "flush",
        26 => "init",
        27 => "opendir",
        28 => "readdir",
        29 => "releasedir",
        30 => "fsyncdir",
        31 => "getlk",
        32 => "setlk",
        33 => "setlkw",
        34 => "access",
        35 => "create",
        36 => "interrupt",
        37 => "bmap",
        38 => "destroy",
        39 => "ioctl",
        40 => "poll",
        41 => "notify_reply",
        42 => "batch_forget",
        43 => "fallocate",
        44 => "readdirplus",
        45 => "rename2",
        46 => "lseek",
        47 => "copy_file_range",
        48 => "setupmapping",
        49 => "removemapping",
        50 => "syncfs",
        51 => "tmpfile",
        52 => "statx",
        _ if opcode as usize >= FUSE_OPCODE_SLOTS => "other",
        _ => return std::borrow::Cow::Owned(format!("op_{opcode}")),
    };
    std::borrow::Cow::Borrowed(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_per_bucket_and_sum_in_seconds() {
        let h = AtomicHistogram::new(&FS_LATENCY_BUCKETS);
        h.observe(Duration::from_micros(10));
        h.observe(Duration::from_micros(10));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(5));
        let s = h.snapshot();
        assert_eq!(s.count, 4);
        assert_eq!(s.buckets.len(), FS_LATENCY_BUCKETS.len() + 1);
        assert_eq!(s.buckets[0], (0.000_05, 2));
        assert_eq!(s.buckets[3], (0.005, 1));
        assert_eq!(s.buckets.last(), Some(&(f64::INFINITY, 1)));
        assert!((s.sum_secs - 5.00302).abs() < 1e-9, "{}", s.sum_secs);
    }

    #[test]
    fn snapshot_counts_exits_ops_and_bytes() {
        let m = VmMetrics::default();
        m.exit(ExitReason::MmioWrite);
        m.exit(ExitReason::MmioWrite);
        m.exit(ExitReason::IoOut);
        m.fs.request_served(1, Duration::from_micros(30), false);
        m.fs.request_served(1000, Duration::from_micros(30), true);
        m.fs.request_refused();
        m.fs.device.queue_notified(1, 3);
        m.fs.device.queue_notified(7, 3);
        m.vsock.sent_to_guest(100);
        m.vsock.received_from_guest(7);
        let s = m.snapshot();
        let exits: std::collections::HashMap<_, _> = s.exits.iter().copied().collect();
        assert_eq!(exits[&ExitReason::MmioWrite], 2);
        assert_eq!(exits[&ExitReason::IoOut], 1);
        assert_eq!(exits[&ExitReason::Hlt], 0);
        assert_eq!(s.fs_ops, vec![(1, 1), (FUSE_OPCODE_SLOTS as u32, 1)]);
        assert_eq!(s.fs_errors, 2);
        assert_eq!(s.fs_latency.count, 2);
        assert_eq!(s.fs_queue_notifications, vec![0, 3]);
        assert_eq!((s.vsock_bytes_to_guest, s.vsock_bytes_from_guest), (100, 7));
    }

    #[test]
    fn net_devices_are_snapshotted_in_order_with_their_names() {
        let m = VmMetrics::default();
        assert!(m.snapshot().net.is_empty());
        let a = m.add_net_device("tap0");
        let b = m.add_net_device("tap1");
        a.rx_frame(60);
        a.rx_dropped();
        a.device.queue_notified(1, 2);
        b.tx_frame(1500);
        b.tx_frame(40);
        b.tx_dropped();
        b.bad_chain();
        let s = m.snapshot();
        assert_eq!(s.net.len(), 2);
        assert_eq!((s.net[0].device.as_str(), s.net[0].rx_packets, s.net[0].rx_bytes), ("tap0", 1, 60));
        assert_eq!((s.net[0].rx_drops, s.net[0].queue_notifications.clone()), (1, vec![0, 2]));
        assert_eq!((s.net[1].device.as_str(), s.net[1].tx_packets, s.net[1].tx_bytes), ("tap1", 2, 1540));
        assert_eq!((s.net[1].tx_drops, s.net[1].bad_chains), (1, 1));
    }

    #[test]
    fn opcode_names() {
        assert_eq!(fuse_opcode_name(1), "lookup");
        assert_eq!(fuse_opcode_name(7), "op_7");
        assert_eq!(fuse_opcode_name(64), "other");
    }
}
