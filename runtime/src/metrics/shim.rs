//! The shim's metrics endpoint: `/metrics` and `/agent-url` over
//! `<root>/sbs/<sandbox-id>/shim-monitor.sock`.
//!
//! A scrape reads the VMM's counters, the host watcher's counters, `/proc/self` and the guest
//! agent's statistics and writes the `tern_hypervisor_*`, `tern_vmm_virtio_*`, `tern_shim_*`,
//! `tern_agent_*`, `tern_guest_*` and `tern_watch_*` families. The agent is asked at most
//! once per [`GUEST_STATS_MAX_AGE`] and for at most [`GUEST_STATS_TIMEOUT`]; when it does not
//! answer, the scrape still succeeds with `tern_agent_up 0` and without guest families.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tern_sync::LockExt;

use tern_protocol::{GuestStats, AGENT_RPC_PORT, WATCH_APPLY_BUCKETS, WATCH_STAGE_BUCKETS};
use tokio::net::UnixListener;
use tokio::task::JoinHandle;
use vmm::api::WatcherCounters;
use vmm::{fuse_opcode_name, HistogramSnapshot, VmMetrics, VmMetricsSnapshot};

use super::exposition::{encode, Family, Labels, Value};
use super::http::{self, Handler, Request, Response, PROMETHEUS_TEXT};
use super::process::{self, ProcessStats};
use super::rpc::{self, RpcSnapshot};
use super::sbs::SbsDir;
use crate::agent::AgentClient;

/// Guest statistics younger than this are served from the cache.
pub const GUEST_STATS_MAX_AGE: Duration = Duration::from_secs(1);
/// How long a scrape waits for the agent's statistics.
pub const GUEST_STATS_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest path `bind(2)` takes for a unix socket (`sun_path` is 108 bytes with the NUL).
/// With the default root a 64-character CRI sandbox id gives 96 bytes.
pub const MAX_SOCKET_PATH: usize = 107;
/// Guest clock ticks per second (USER_HZ is 100 on every Linux tern boots).
const USER_HZ: f64 = 100.0;
/// Names of the aggregate CPU tick fields of /proc/stat, in order.
const CPU_MODES: [&str; 8] = ["user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"];

/// Errors starting the metrics endpoint.
#[derive(Debug, thiserror::Error)]
pub enum MetricsServerError {
    #[error("cannot create the sandbox directory")]
    Dir(#[from] super::sbs::SbsDirError),
    #[error("socket path {} is longer than a unix socket address allows ({MAX_SOCKET_PATH} bytes); shorten shim.root_dir", .0.display())]
    PathTooLong(PathBuf),
    #[error("cannot listen on {}", .0.display())]
    Listen(PathBuf, #[source] std::io::Error),
}

/// What a scrape reads about the sandbox.
#[derive(Clone)]
pub struct SandboxProbe {
    /// Configured vCPUs and guest RAM.
    pub vcpus: u8,
    pub memory_mib: u32,
    pub vm: Arc<VmMetrics>,
    pub agent: AgentClient,
    /// The host watcher's counters (`None` while no watchable share exists).
    pub watcher: Arc<dyn Fn() -> Option<WatcherCounters> + Send + Sync>,
}

/// Everything one scrape writes.
#[derive(Debug, Clone)]
pub struct ShimSnapshot {
    pub vcpus: u8,
    pub memory_mib: u32,
    pub vm: VmMetricsSnapshot,
    pub process: ProcessStats,
    pub task_rpc: RpcSnapshot,
    pub agent_rpc: RpcSnapshot,
    pub watcher: Option<WatcherCounters>,
    /// `None`: the agent did not answer.
    pub guest: Option<GuestStats>,
}

/// The `/metrics` + `/agent-url` handler of one shim.
pub struct ShimEndpoint {
    inner: Arc<EndpointInner>,
}

struct EndpointInner {
    probe: SandboxProbe,
    guest_cache: Mutex<GuestCache>,
}

/// The agent's last statistics, and whether a scrape is asking for new ones. The lock is never
/// held across the agent call: a scrape that finds another one asking serves the last answer.
#[derive(Default)]
struct GuestCache {
    last: Option<(Instant, Option<GuestStats>)>,
    asking: bool,
}

impl ShimEndpoint {
    pub fn new(probe: SandboxProbe) -> Self {
        ShimEndpoint { inner: Arc::new(EndpointInner { probe, guest_cache: Mutex::default() }) }
    }
}

impl EndpointInner {
    /// Gather everything (blocking: reads /proc and may ask the agent).
    fn snapshot(&self) -> ShimSnapshot {
        ShimSnapshot {
            vcpus: self.probe.vcpus,
            memory_mib: self.probe.memory_mib,
            vm: self.probe.vm.snapshot(),
            process: process::read(Path::new("/proc/self")),
            task_rpc: rpc::TASK.snapshot(),
            agent_rpc: rpc::AGENT.snapshot(),
            watcher: (self.probe.watcher)(),
            guest: self.guest_stats(),
        }
    }

    fn guest_stats(&self) -> Option<GuestStats> {
        {
            let mut cache = self.guest_cache.lock_unpoisoned();
            match &cache.last {
                Some((at, stats)) if at.elapsed() < GUEST_STATS_MAX_AGE || cache.asking => return stats.clone(),
                _ => cache.asking = true,
            }
        }
        let stats = match self.probe.agent.stats_within(GUEST_STATS_TIMEOUT) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::debug!(error = %crate::sandbox::error_chain(&e), "guest stats unavailable");
                None
            }
        };
        let mut cache = self.guest_cache.lock_unpoisoned();
        *cache = GuestCache { last: Some((Instant::now(), stats.clone())), asking: false };
        stats
    }

    fn agent_url(&self) -> String {
        format!("hvsock://{}:{AGENT_RPC_PORT}\n", self.probe.agent.uds_path().display())
    }
}

#[async_trait::async_trait]
impl Handler for ShimEndpoint {
    async fn handle(&self, request: Request) -> Response {
        match request.path.as_str() {
            "/metrics" => {
                // Reading /proc and asking the agent block: keep them off the async workers.
                let inner = self.inner.clone();
                match tokio::task::spawn_blocking(move || encode(families(&inner.snapshot()))).await {
                    Ok(text) => Response::ok(PROMETHEUS_TEXT, text),
                    Err(e) => Response::error(500, &format!("collecting metrics failed: {e}")),
                }
            }
            "/agent-url" => Response::ok("text/plain; charset=utf-8", self.inner.agent_url()),
            _ => Response::error(404, "endpoints: /metrics, /agent-url"),
        }
    }
}

/// A shim's running metrics endpoint and its sandbox directory.
pub struct ShimMetricsServer {
    dir: SbsDir,
    task: JoinHandle<()>,
}

impl ShimMetricsServer {
    /// Create `<root>/sbs/<sandbox_id>/` and serve `shim-monitor.sock` in it on the current
    /// tokio runtime.
    pub fn start(root: &Path, sandbox_id: &str, probe: SandboxProbe) -> Result<Self, MetricsServerError> {
        let dir = SbsDir::create(root, sandbox_id)?;
        match start(&dir, probe) {
            Ok(task) => Ok(ShimMetricsServer { dir, task }),
            Err(e) => {
                let _ = dir.remove();
                Err(e)
            }
        }
    }

    /// The sandbox directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Stop serving and remove the sandbox directory: for `tern monitor` the sandbox is gone.
    pub fn stop(self) {
        self.task.abort();
        if let Err(e) = self.dir.remove() {
            tracing::warn!(error = %crate::sandbox::error_chain(&e), "cannot remove the sandbox directory");
        }
    }
}

/// Bind `<dir>/shim-monitor.sock` (replacing a stale one) and serve it on the current tokio
/// runtime until the returned task is aborted.
pub fn start(dir: &SbsDir, probe: SandboxProbe) -> Result<JoinHandle<()>, MetricsServerError> {
    let socket = dir.monitor_socket();
    if socket.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(MetricsServerError::PathTooLong(socket));
    }
    // A socket left by a killed shim of the same id would make bind fail.
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket).map_err(|e| MetricsServerError::Listen(socket.clone(), e))?;
    let handler: Arc<dyn Handler> = Arc::new(ShimEndpoint::new(probe));
    tracing::info!(socket = %socket.display(), "serving sandbox metrics");
    Ok(tokio::spawn(http::serve_unix(listener, handler)))
}

fn labels<const N: usize>(pairs: [(&'static str, &str); N]) -> Labels {
    pairs.iter().map(|(k, v)| (*k, (*v).to_owned())).collect()
}

fn histogram_from_buckets(bounds: &[f64], counts: &[u64], count: u64, sum_secs: f64) -> HistogramSnapshot {
    let buckets = bounds
        .iter()
        .copied()
        .chain(std::iter::once(f64::INFINITY))
        .zip(counts.iter().copied().chain(std::iter::repeat(0)))
        .collect();
    HistogramSnapshot { buckets, count, sum_secs }
}

/// The families of one scrape, in a fixed order.
pub fn families(s: &ShimSnapshot) -> Vec<Family> {
    let mut out = Vec::with_capacity(64);
    hypervisor(s, &mut out);
    virtio(&s.vm, &mut out);
    shim(s, &mut out);
    guest(s.guest.as_ref(), &mut out);
    watch(s, &mut out);
    out
}

fn hypervisor(s: &ShimSnapshot, out: &mut Vec<Family>) {
    out.push(Family::single("tern_hypervisor_vcpus", "vCPUs of the sandbox VM.", Value::Gauge(f64::from(s.vcpus))));
    out.push(Family::single(
        "tern_hypervisor_guest_memory_bytes",
        "Guest RAM of the sandbox VM (mapped in the shim process).",
        Value::Gauge(f64::from(s.memory_mib) * 1024.0 * 1024.0),
    ));
    let mut exits = Family::new("tern_hypervisor_vm_exits", "vCPU exits to the VMM, by reason.");
    for (reason, n) in &s.vm.exits {
        exits = exits.with(labels([("reason", reason.as_str())]), Value::Counter(*n));
    }
    out.push(exits);
    out.push(
        Family::new(
            "tern_hypervisor_threads",
            "Threads of the in-process VMM: vCPUs and device/watcher/console threads.",
        )
        .with(labels([("kind", "vcpu")]), Value::Gauge(s.process.vcpu_threads as f64))
        .with(labels([("kind", "vmm")]), Value::Gauge(s.process.vmm_threads as f64)),
    );
    out.push(
        Family::new(
            "tern_hypervisor_fds",
            "File descriptors of the VM held by the shim process: KVM (VM, vCPUs) and eventfds.",
        )
        .with(labels([("kind", "kvm")]), Value::Gauge(s.process.kvm_fds as f64))
        .with(labels([("kind", "eventfd")]), Value::Gauge(s.process.eventfds as f64)),
    );
}

fn virtio(vm: &VmMetricsSnapshot, out: &mut Vec<Family>) {
    let mut notes =
        Family::new("tern_vmm_virtio_queue_notifications", "Guest queue notifications (kicks), by device and queue.");
    for (device, queues, names) in [
        ("vsock", &vm.vsock_queue_notifications, &["rx", "tx", "event"][..]),
        ("fs", &vm.fs_queue_notifications, &["hiprio", "request"][..]),
    ] {
        for (i, n) in queues.iter().enumerate() {
            let queue = names.get(i).copied().unwrap_or("other");
            notes = notes.with(labels([("device", device), ("queue", queue)]), Value::Counter(*n));
        }
    }
    for net in &vm.net {
        for (queue, n) in ["rx", "tx"].iter().zip(&net.queue_notifications) {
            notes =
                notes.with(vec![("device", net.device.clone()), ("queue", (*queue).to_owned())], Value::Counter(*n));
        }
    }
    out.push(notes);
    net(vm, out);
    let mut ops = Family::new("tern_vmm_virtio_fs_ops", "virtio-fs requests served, by FUSE opcode.");
    for (op, n) in &vm.fs_ops {
        ops = ops.with(vec![("op", fuse_opcode_name(*op).into_owned())], Value::Counter(*n));
    }
    out.push(ops);
    out.push(Family::single(
        "tern_vmm_virtio_fs_errors",
        "virtio-fs requests refused before the FUSE server or failed in it.",
        Value::Counter(vm.fs_errors),
    ));
    out.push(Family::single(
        "tern_vmm_virtio_fs_op_duration_seconds",
        "Time the FUSE server took per virtio-fs request.",
        Value::Histogram(vm.fs_latency.clone()),
    ));
    out.push(
        Family::new("tern_vmm_virtio_vsock_bytes", "vsock payload bytes, by direction.")
            .with(labels([("direction", "to_guest")]), Value::Counter(vm.vsock_bytes_to_guest))
            .with(labels([("direction", "from_guest")]), Value::Counter(vm.vsock_bytes_from_guest)),
    );
    let mut violations = Family::new(
        "tern_vmm_seccomp_violations",
        "Syscalls a VMM thread made outside its role's seccomp allowlist (mode trap), by role.",
    );
    for (role, n) in &vm.seccomp_violations {
        violations = violations.with(labels([("role", role.name())]), Value::Counter(*n));
    }
    out.push(violations);
}

/// The virtio-net devices, labelled by their host tap (`to_guest` = rx, `from_guest` = tx).
fn net(vm: &VmMetricsSnapshot, out: &mut Vec<Family>) {
    let mut packets =
        Family::new("tern_vmm_virtio_net_packets", "Frames through the virtio-net devices, by device and direction.");
    let mut bytes = Family::new(
        "tern_vmm_virtio_net_bytes",
        "Frame bytes through the virtio-net devices, by device and direction.",
    );
    let mut drops = Family::new(
        "tern_vmm_virtio_net_drops",
        "Frames dropped: from the tap with no room in the guest, or refused by the tap.",
    );
    let mut bad = Family::new(
        "tern_vmm_virtio_net_bad_chains",
        "Malformed descriptor chains a virtio-net device returned unused.",
    );
    for n in &vm.net {
        let by = |direction: &str| vec![("device", n.device.clone()), ("direction", direction.to_owned())];
        packets = packets
            .with(by("to_guest"), Value::Counter(n.rx_packets))
            .with(by("from_guest"), Value::Counter(n.tx_packets));
        bytes =
            bytes.with(by("to_guest"), Value::Counter(n.rx_bytes)).with(by("from_guest"), Value::Counter(n.tx_bytes));
        drops =
            drops.with(by("to_guest"), Value::Counter(n.rx_drops)).with(by("from_guest"), Value::Counter(n.tx_drops));
        bad = bad.with(vec![("device", n.device.clone())], Value::Counter(n.bad_chains));
    }
    out.extend([packets, bytes, drops, bad]);
}

fn rpc_families(out: &mut Vec<Family>, s: &RpcSnapshot, names: [&'static str; 3], helps: [&'static str; 3]) {
    let (mut calls, mut errors) = (Family::new(names[0], helps[0]), Family::new(names[1], helps[1]));
    for (rpc, n, e) in &s.calls {
        calls = calls.with(labels([("rpc", rpc)]), Value::Counter(*n));
        errors = errors.with(labels([("rpc", rpc)]), Value::Counter(*e));
    }
    out.push(calls);
    out.push(errors);
    out.push(Family::single(names[2], helps[2], Value::Histogram(s.latency.clone())));
}

fn shim(s: &ShimSnapshot, out: &mut Vec<Family>) {
    let p = &s.process;
    out.push(Family::single(
        "tern_shim_rss_bytes",
        "Resident memory of the shim process (VMM and touched guest RAM included).",
        Value::Gauge(p.rss_bytes as f64),
    ));
    out.push(
        Family::new("tern_shim_cpu_seconds", "CPU time of the shim process (vCPU threads included), by mode.")
            .with(labels([("mode", "user")]), Value::CounterF(p.cpu_user_secs))
            .with(labels([("mode", "system")]), Value::CounterF(p.cpu_system_secs)),
    );
    out.push(Family::single("tern_shim_threads", "Threads of the shim process.", Value::Gauge(p.threads as f64)));
    out.push(Family::single("tern_shim_fds", "Open file descriptors of the shim process.", Value::Gauge(p.fds as f64)));
    rpc_families(
        out,
        &s.task_rpc,
        ["tern_shim_task_rpcs", "tern_shim_task_rpc_errors", "tern_shim_task_rpc_duration_seconds"],
        [
            "containerd Task API calls served, by RPC.",
            "Task API calls that failed, by RPC.",
            "Time to serve a Task API call (Wait excluded).",
        ],
    );
    rpc_families(
        out,
        &s.agent_rpc,
        ["tern_shim_agent_rpcs", "tern_shim_agent_rpc_errors", "tern_shim_agent_rpc_duration_seconds"],
        [
            "Requests to the guest agent, by request.",
            "Agent requests that failed, by request.",
            "Agent request round trip (Wait excluded).",
        ],
    );
}

fn guest(g: Option<&GuestStats>, out: &mut Vec<Family>) {
    out.push(Family::single(
        "tern_agent_up",
        "Whether the guest agent answered the last stats request.",
        Value::Gauge(if g.is_some() { 1.0 } else { 0.0 }),
    ));
    let Some(g) = g else { return };
    let a = &g.agent;
    out.push(Family::single(
        "tern_agent_rss_bytes",
        "Resident memory of the agent process.",
        Value::Gauge(a.rss_bytes as f64),
    ));
    out.push(
        Family::new("tern_agent_cpu_seconds", "CPU time of the agent process, by mode.")
            .with(labels([("mode", "user")]), Value::CounterF(a.cpu_user_ticks as f64 / USER_HZ))
            .with(labels([("mode", "system")]), Value::CounterF(a.cpu_system_ticks as f64 / USER_HZ)),
    );
    out.push(Family::single("tern_agent_fds", "Open file descriptors of the agent.", Value::Gauge(f64::from(a.fds))));
    out.push(Family::single("tern_agent_threads", "Threads of the agent.", Value::Gauge(f64::from(a.threads))));

    let kib = |v: u64| Value::Gauge(v as f64 * 1024.0);
    out.push(
        Family::new("tern_guest_memory_bytes", "Guest memory from /proc/meminfo, by type.")
            .with(labels([("type", "total")]), kib(g.mem_total_kib))
            .with(labels([("type", "free")]), kib(g.mem_free_kib))
            .with(labels([("type", "available")]), kib(g.mem_available_kib))
            .with(labels([("type", "cached")]), kib(g.mem_cached_kib)),
    );
    let mut cpu = Family::new("tern_guest_cpu_seconds", "Guest CPU time of all CPUs, by mode.");
    for (mode, ticks) in CPU_MODES.iter().zip(&g.cpu_ticks) {
        cpu = cpu.with(labels([("mode", mode)]), Value::CounterF(*ticks as f64 / USER_HZ));
    }
    out.push(cpu);
    out.push(Family::single("tern_guest_cpus", "CPUs the guest kernel sees.", Value::Gauge(f64::from(g.cpus))));
    out.push(
        Family::new("tern_guest_load", "Guest load average, by period.")
            .with(labels([("period", "1m")]), Value::Gauge(g.load_avg[0]))
            .with(labels([("period", "5m")]), Value::Gauge(g.load_avg[1]))
            .with(labels([("period", "15m")]), Value::Gauge(g.load_avg[2])),
    );
    out.push(Family::single("tern_guest_tasks", "Processes in the guest.", Value::Gauge(f64::from(g.tasks))));
    out.push(Family::single("tern_guest_uptime_seconds", "Guest uptime.", Value::Gauge(g.uptime_secs)));
    let (mut disk_ops, mut disk_bytes) = (
        Family::new("tern_guest_disk_ops", "Completed guest block I/O, by device and direction."),
        Family::new("tern_guest_disk_bytes", "Guest block I/O bytes, by device and direction."),
    );
    for d in &g.disks {
        disk_ops = disk_ops
            .with(labels([("device", &d.name), ("op", "read")]), Value::Counter(d.reads))
            .with(labels([("device", &d.name), ("op", "write")]), Value::Counter(d.writes));
        disk_bytes = disk_bytes
            .with(labels([("device", &d.name), ("op", "read")]), Value::Counter(d.sectors_read.saturating_mul(512)))
            .with(
                labels([("device", &d.name), ("op", "write")]),
                Value::Counter(d.sectors_written.saturating_mul(512)),
            );
    }
    out.push(disk_ops);
    out.push(disk_bytes);
    let (mut net_bytes, mut net_packets) = (
        Family::new("tern_guest_network_bytes", "Guest network bytes, by interface and direction."),
        Family::new("tern_guest_network_packets", "Guest network packets, by interface and direction."),
    );
    for n in &g.net {
        net_bytes = net_bytes
            .with(labels([("interface", &n.name), ("direction", "receive")]), Value::Counter(n.rx_bytes))
            .with(labels([("interface", &n.name), ("direction", "transmit")]), Value::Counter(n.tx_bytes));
        net_packets = net_packets
            .with(labels([("interface", &n.name), ("direction", "receive")]), Value::Counter(n.rx_packets))
            .with(labels([("interface", &n.name), ("direction", "transmit")]), Value::Counter(n.tx_packets));
    }
    out.push(net_bytes);
    out.push(net_packets);
}

fn watch(s: &ShimSnapshot, out: &mut Vec<Family>) {
    let w = s.watcher.unwrap_or_default();
    let counter = |name, help, v| Family::single(name, help, Value::Counter(v));
    out.push(counter("tern_watch_records_sent", "Change records the host watcher sent to the agent.", w.records_sent));
    out.push(counter("tern_watch_batches_sent", "Change batches the host watcher sent.", w.batches_sent));
    out.push(counter("tern_watch_resyncs_sent", "Full-resync batches the host watcher sent.", w.resyncs_sent));
    out.push(counter(
        "tern_watch_overflows",
        "inotify queue overflows on the host (each answered by a resync).",
        w.overflows,
    ));
    out.push(counter("tern_watch_connects", "Connections of the host watcher to the agent.", w.connects));
    out.push(counter("tern_watch_send_failures", "Sends of the host watcher that failed.", w.send_failures));
    let Some(g) = s.guest.as_ref() else { return };
    let gw = &g.watch;
    out.push(counter("tern_watch_batches_received", "Change batches the agent received.", gw.batches_received));
    out.push(counter("tern_watch_records_received", "Change records the agent received.", gw.records_received));
    out.push(counter(
        "tern_watch_records_applied",
        "Changed paths the agent settled in its mirrors.",
        gw.records_applied,
    ));
    out.push(counter("tern_watch_guest_resyncs", "Full compares of a share in the guest.", gw.resyncs));
    out.push(counter(
        "tern_watch_bind_fallbacks",
        "Watchable mounts that outgrew the limits and became bind mounts.",
        gw.bind_fallbacks,
    ));
    out.push(Family::single(
        "tern_watch_mounts_watched",
        "Watchable mounts the agent mirrors.",
        Value::Gauge(f64::from(gw.mounts_watched)),
    ));
    out.push(Family::single(
        "tern_watch_apply_latency_seconds",
        "Host change seen → applied in the guest mirror.",
        Value::Histogram(histogram_from_buckets(
            &WATCH_APPLY_BUCKETS,
            &gw.apply_latency_buckets,
            gw.apply_latency_count,
            gw.apply_latency_sum_ns as f64 / 1e9,
        )),
    ));
    let mut stages = Family::new(
        "tern_watch_stage_seconds",
        "Duration of each stage of the watch path, per change batch: host stages on the host clock \
         (from the batch's stamps), guest stages on the guest clock from the agent's receipt.",
    );
    for h in &gw.stages {
        stages = stages.with(
            labels([("stage", h.stage.label())]),
            Value::Histogram(histogram_from_buckets(&WATCH_STAGE_BUCKETS, &h.buckets, h.count, h.sum_ns as f64 / 1e9)),
        );
    }
    out.push(stages);
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_protocol::{DiskStats, NetDevStats};

    fn sample_snapshot(guest: bool) -> ShimSnapshot {
        let vm = VmMetrics::default();
        vm.exit(vmm::ExitReason::MmioWrite);
        vm.fs.request_served(1, Duration::from_micros(80), false);
        vm.vsock.sent_to_guest(42);
        let net = vm.add_net_device("tap0_tern");
        net.rx_frame(1500);
        net.tx_dropped();
        let guest = guest.then(|| GuestStats {
            mem_total_kib: 1000,
            cpu_ticks: vec![1, 2, 3, 4, 5, 6, 7, 8],
            disks: vec![DiskStats { name: "vda".into(), reads: 1, ..Default::default() }],
            net: vec![NetDevStats { name: "lo".into(), rx_bytes: 9, ..Default::default() }],
            ..Default::default()
        });
        ShimSnapshot {
            vcpus: 2,
            memory_mib: 256,
            vm: vm.snapshot(),
            process: process::read(Path::new("/proc/self")),
            task_rpc: rpc::TASK.snapshot(),
            agent_rpc: rpc::AGENT.snapshot(),
            watcher: None,
            guest,
        }
    }

    #[test]
    fn every_family_prefix_is_present_and_small() {
        let text = encode(families(&sample_snapshot(true)));
        for prefix in
            ["tern_hypervisor_", "tern_vmm_virtio_", "tern_shim_", "tern_agent_", "tern_guest_", "tern_watch_"]
        {
            assert!(text.lines().any(|l| l.starts_with(prefix)), "no {prefix} series:\n{text}");
        }
        assert!(text.contains("tern_hypervisor_vm_exits_total{reason=\"mmio_write\"} 1\n"), "{text}");
        assert!(text.contains("tern_vmm_virtio_fs_ops_total{op=\"lookup\"} 1\n"), "{text}");
        assert!(
            text.contains("tern_vmm_virtio_net_bytes_total{device=\"tap0_tern\",direction=\"to_guest\"} 1500\n"),
            "{text}"
        );
        assert!(
            text.contains("tern_vmm_virtio_net_drops_total{device=\"tap0_tern\",direction=\"from_guest\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("tern_vmm_virtio_vsock_bytes_total{direction=\"to_guest\"} 42\n"), "{text}");
        assert!(text.contains("tern_hypervisor_guest_memory_bytes 268435456"), "{text}");
        assert!(text.contains("tern_guest_memory_bytes{type=\"total\"} 1024000"), "{text}");
        assert!(text.contains("tern_guest_disk_ops_total{device=\"vda\",op=\"read\"} 1\n"), "{text}");
        assert!(text.len() < 20 * 1024, "{} bytes", text.len());
    }

    #[test]
    fn a_socket_path_too_long_for_bind_is_refused_clearly() {
        let root = tempfile::tempdir().unwrap();
        let probe = SandboxProbe {
            vcpus: 1,
            memory_mib: 64,
            vm: Arc::new(VmMetrics::default()),
            agent: AgentClient::new("/nonexistent/vsock.sock"),
            watcher: Arc::new(|| None),
        };
        let err = ShimMetricsServer::start(root.path(), &"x".repeat(120), probe).err().unwrap();
        assert!(matches!(err, MetricsServerError::PathTooLong(_)), "{err:?}");
        // The directory it created is removed again.
        assert_eq!(std::fs::read_dir(root.path().join("sbs")).unwrap().count(), 0);
    }

    #[test]
    fn a_silent_agent_leaves_out_guest_families() {
        let text = encode(families(&sample_snapshot(false)));
        assert!(text.contains("tern_agent_up 0.0\n"), "{text}");
        assert!(!text.contains("tern_guest_"), "{text}");
        assert!(text.contains("tern_watch_records_sent_total 0\n"), "{text}");
    }
}
