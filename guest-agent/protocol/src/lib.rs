//! The runtime <-> agent protocol: the one definition both sides compile against.
//!
//! Transport: virtio-vsock streams. The agent listens on two ports:
//! - [`AGENT_RPC_PORT`]: request/response RPC. Each message is a [`frame`]: a 4-byte big-endian
//!   length followed by that many bytes of JSON. Requests on one connection are answered in
//!   order; the host opens several connections when it needs concurrency (e.g. a blocking
//!   [`Request::Wait`] beside other calls).
//! - [`AGENT_STREAM_PORT`]: process stdio. The first frame is a [`StreamHello`] naming a process
//!   and one of its streams; the agent answers with one [`Response`] frame ([`Response::Ok`]:
//!   the stream is attached; [`Response::Error`]: it is refused, and why), so a refused stream is
//!   never mistaken for an empty one. After the answer the connection carries raw bytes. For
//!   stdin the host half-closes (shutdown write) to deliver EOF; for stdout/stderr the agent
//!   closes the connection when the process side of the pipe reaches EOF.
//!
//! The first request on an RPC connection should be [`Request::Health`]; the host compares
//! the returned version with [`PROTOCOL_VERSION`] and refuses to talk to a different one.

use serde::{Deserialize, Serialize};
use std::io::{Read, Write};

pub mod frame;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod net;
pub mod watch;

/// Bumped on every incompatible change of the messages below.
pub const PROTOCOL_VERSION: u32 = 8;
/// vsock port of the agent's RPC server.
pub const AGENT_RPC_PORT: u32 = 1024;
/// vsock port on which the agent accepts process stdio streams.
pub const AGENT_STREAM_PORT: u32 = 1025;
/// vsock port on which the agent accepts change-record streams from the VMM's fs watcher
/// (see [`watch`]), and the virtio-fs tag of the VM's one fs device (every share is a
/// subdirectory of it): defined with the change records, the one crate the VMM shares with the agent.
pub use tern_change_records::{AGENT_WATCH_PORT, FS_TAG};
/// Where the agent mounts the virtio-fs device in the guest; share `S` is `<this>/S`.
pub const GUEST_SHARES_ROOT: &str = "/run/tern/shares";
/// Line the agent writes to the console when it is ready to serve (used for boot timing).
pub const READY_MARKER: &str = "TERN-AGENT-READY";
/// Largest frame either side accepts; a larger length prefix is a protocol error.
pub use tern_change_records::MAX_FRAME_LEN;

/// A request from the runtime to the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Is the agent alive, and which protocol does it speak?
    Health,
    /// Start a process. Its stdio is connected through [`AGENT_STREAM_PORT`] streams.
    Exec(ExecRequest),
    /// Block until the process exits; returns [`Response::Exited`].
    Wait { id: String },
    /// Send a signal to the process.
    Signal { id: String, signal: i32 },
    /// Close the process's stdin (EOF) even if no stdin stream was attached.
    CloseStdin { id: String },
    /// Guest-wide statistics.
    Stats,
    /// The stage durations of the last change batches the mirrors applied; returns
    /// [`Response::WatchStages`] (kept out of [`Request::Stats`], which every metrics scrape
    /// asks for).
    WatchStages,
    /// Orderly shutdown: sync, kill remaining processes and power the VM off.
    Shutdown,
    /// Present a virtio-fs share at a guest path (see [`MountRequest`]).
    Mount(MountRequest),
    /// Undo a [`Request::Mount`] at this guest path.
    Unmount { guest_path: String },
    /// Create a container (namespaces, mounts, new root) and start its process, registered
    /// under `id` like an [`Request::Exec`] process: `Wait`, `Signal`, streams work the same.
    StartContainer(ContainerSpec),
    /// Start another process inside a running container (its namespaces, root and cgroup),
    /// registered under `id` like an [`Request::Exec`] process.
    ExecInContainer(ContainerExecRequest),
    /// Set the window size of a terminal process's pty (`TIOCSWINSZ` on the master).
    ResizePty { id: String, rows: u16, cols: u16 },
    /// Freeze every process of container `id` (cgroup v2 freezer); returns once frozen.
    PauseContainer { id: String },
    /// Send a signal to every process in container `id`'s cgroup (`kill --all`), also after
    /// its init has exited (a container sharing a PID namespace can leave processes behind).
    SignalContainer { id: String, signal: i32 },
    /// The guest pids of every process in container `id`'s cgroup; returns [`Response::Pids`].
    ContainerPids { id: String },
    /// Thaw a container frozen by [`Request::PauseContainer`].
    ResumeContainer { id: String },
    /// cgroup v2 statistics of container `id`; returns [`Response::ContainerStats`].
    ContainerStats { id: String },
    /// Apply resource limits to the cgroup of container `id`.
    UpdateContainer { id: String, resources: ResourceUpdate },
    /// Block until the cgroup of container `id` records an OOM kill beyond `seen` kills;
    /// returns [`Response::OomKills`] with the new count. Ends with an error when the
    /// container's cgroup goes away.
    WaitOom { id: String, seen: u64 },
    /// Configure the guest's network from what the host found in the pod's network namespace
    /// (sent once, before the first container starts): NICs found by MAC, renamed, given their
    /// MTU and addresses and brought up; `lo` up; neighbours; routes, link-scope ones first.
    ConfigureNetwork(net::NetworkConfig),
}

/// A process to run inside a running container (containerd's `Exec`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ContainerExecRequest {
    /// The container to join (its id from [`Request::StartContainer`]).
    pub container_id: String,
    /// Process-table id of the new process; unique within the sandbox.
    pub id: String,
    /// The OCI `process` object (JSON) as containerd sent it; `terminal` selects a pty.
    pub process: String,
    /// Whether the host will attach a stdin stream; when false stdin is /dev/null.
    pub stdin: bool,
}

/// A cgroup v2 limit: a number, or `max` (no limit). A plain `Option` would not do inside
/// an `Option` ("leave alone" vs "unlimited" would both encode as `null`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Limit {
    Max,
    Value(u64),
}

/// cgroup v2 limits to write, already in cgroup v2 units (the host converts from OCI).
/// `None` leaves a file alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ResourceUpdate {
    /// `memory.max` in bytes.
    pub memory_max: Option<Limit>,
    /// `memory.swap.max` in bytes.
    pub memory_swap_max: Option<Limit>,
    /// `cpu.weight` (1..=10000).
    pub cpu_weight: Option<u64>,
    /// `cpu.max`: quota in microseconds and period in microseconds.
    pub cpu_max: Option<(Limit, u64)>,
    /// `pids.max`.
    pub pids_max: Option<Limit>,
    /// `cpuset.cpus` / `cpuset.mems`.
    pub cpuset_cpus: Option<String>,
    pub cpuset_mems: Option<String>,
}

/// A container's cgroup v2 numbers, read from its cgroup directory in the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct CgroupStats {
    /// `cpu.stat` key/value pairs (`usage_usec`, `user_usec`, ...).
    pub cpu_stat: std::collections::BTreeMap<String, u64>,
    /// `memory.current`.
    pub memory_current: u64,
    /// `memory.max` (`None` = max).
    pub memory_max: Option<u64>,
    /// `memory.swap.current` / `memory.swap.max` when swap accounting exists.
    pub swap_current: u64,
    pub swap_max: Option<u64>,
    /// `memory.stat` key/value pairs.
    pub memory_stat: std::collections::BTreeMap<String, u64>,
    /// `memory.events` key/value pairs (`oom`, `oom_kill`, ...).
    pub memory_events: std::collections::BTreeMap<String, u64>,
    /// `pids.current` / `pids.max` (`None` = max).
    pub pids_current: u64,
    pub pids_max: Option<u64>,
    /// `io.stat`, one entry per device.
    pub io: Vec<IoDeviceStat>,
}

/// One line of `io.stat`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct IoDeviceStat {
    pub major: u64,
    pub minor: u64,
    pub rbytes: u64,
    pub wbytes: u64,
    pub rios: u64,
    pub wios: u64,
}

/// A container for the agent to create (with `libcontainer`) and start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ContainerSpec {
    /// Container id, also its process id in the agent's table; a single path component.
    pub id: String,
    /// The OCI runtime spec (`config.json`) as the host adapted it for the guest: `root.path`
    /// is the guest path of the rootfs (a share mounted with [`Request::Mount`]), and what does
    /// not apply inside the VM (host bind mounts, namespace paths, hooks, LSM labels) is
    /// already dropped. `linux.seccomp` is kept: the agent enforces it.
    pub oci_spec: String,
    /// Whether the host will attach a stdin stream; when false stdin is /dev/null.
    pub stdin: bool,
}

/// Present share `share` (a subdirectory of the fs device, `GUEST_SHARES_ROOT/<share>`) at
/// `guest_path`.
///
/// A plain mount is a bind mount of the share (read-only if `read_only`). A watchable mount is
/// a tmpfs mirror at `guest_path`, kept in sync by change records from the VMM's watcher
/// ([`AGENT_WATCH_PORT`]) — or by polling when `watch_mode` is [`WatchMode::Poll`]; a mirror
/// that grows past [`watch::MAX_ENTRIES`] / [`watch::MAX_BYTES`] becomes a bind mount.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct MountRequest {
    pub share: String,
    pub guest_path: String,
    pub read_only: bool,
    pub watchable: bool,
    pub watch_mode: WatchMode,
}

/// How a watchable mount is kept fresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum WatchMode {
    /// Change records pushed by the VMM's watcher (tern's way).
    #[default]
    Events,
    /// Rescan every [`watch::POLL_INTERVAL`] (Kata's way; the benchmark baseline).
    Poll,
}

/// What to run and how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ExecRequest {
    /// Caller-chosen process id, unique within the sandbox.
    pub id: String,
    /// argv[0] is looked up in PATH when it has no slash.
    pub argv: Vec<String>,
    /// `KEY=VALUE` entries; the process gets exactly these (plus a default PATH if missing).
    pub env: Vec<String>,
    /// Working directory; `/` when `None`.
    pub cwd: Option<String>,
    /// Whether the host will attach a stdin stream; when false stdin is /dev/null (or, with
    /// `terminal`, a terminal nobody types into).
    pub stdin: bool,
    /// Run the process on a new pty of this window size (`tern run -t`): the pty's slave is
    /// its controlling terminal and its stdin, stdout and stderr. Its output comes on the
    /// stdout stream (a terminal has one output), the stderr stream ends at once, and
    /// [`Request::ResizePty`] resizes it. `None`, also when absent (an older runtime): pipes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terminal: Option<WindowSize>,
}

/// A terminal's window size in character cells; 0 for what is not known.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct WindowSize {
    pub rows: u16,
    pub cols: u16,
}

impl Request {
    /// The request's `op` tag on the wire (`container_stats`): its name in errors, metrics and
    /// the agent's `tern.test_stall` hook.
    pub fn op(&self) -> &'static str {
        match self {
            Request::Health => "health",
            Request::Exec(_) => "exec",
            Request::Wait { .. } => "wait",
            Request::Signal { .. } => "signal",
            Request::CloseStdin { .. } => "close_stdin",
            Request::Stats => "stats",
            Request::WatchStages => "watch_stages",
            Request::Shutdown => "shutdown",
            Request::Mount(_) => "mount",
            Request::Unmount { .. } => "unmount",
            Request::StartContainer(_) => "start_container",
            Request::ExecInContainer(_) => "exec_in_container",
            Request::ResizePty { .. } => "resize_pty",
            Request::PauseContainer { .. } => "pause_container",
            Request::SignalContainer { .. } => "signal_container",
            Request::ContainerPids { .. } => "container_pids",
            Request::ResumeContainer { .. } => "resume_container",
            Request::ContainerStats { .. } => "container_stats",
            Request::UpdateContainer { .. } => "update_container",
            Request::WaitOom { .. } => "wait_oom",
            Request::ConfigureNetwork(_) => "configure_network",
        }
    }
}

/// An answer from the agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Health {
        protocol_version: u32,
        agent_version: String,
    },
    Started {
        pid: i32,
    },
    Exited(ExitStatus),
    Stats(GuestStats),
    /// The last [`MAX_WATCH_STAGE_SAMPLES`] applied change batches' stages, oldest first.
    WatchStages {
        batches: Vec<WatchStageSample>,
    },
    ContainerStats(CgroupStats),
    /// Total OOM kills recorded in a container's cgroup so far.
    OomKills {
        count: u64,
    },
    Pids {
        pids: Vec<i32>,
    },
    Ok,
    /// The request failed; `code` says how, for the host to act on (and map to containerd's
    /// errdefs) without reading `message`.
    Error {
        message: String,
        /// Absent in replies from agents before protocol 5: [`ErrorCode::Internal`].
        #[serde(default)]
        code: ErrorCode,
    },
}

/// Why a request failed: the classes of containerd's errdefs (and gRPC's codes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The process, container, share or mount the request names does not exist (or has
    /// already exited).
    NotFound,
    /// What the request would create exists already (a process id, a mount).
    AlreadyExists,
    /// The request itself is wrong (a bad id, signal, path or spec), whatever the state.
    InvalidArgument,
    /// The request does not fit the current state (the container is paused, the process has
    /// no terminal).
    FailedPrecondition,
    /// The agent cannot serve it now (it is shutting down).
    Unavailable,
    /// The work did not finish in time inside the guest (a freeze, a pty handshake).
    Timeout,
    /// Anything else: a failure of the guest's kernel, libcontainer or the agent. Also what
    /// an unknown code from a newer agent reads as.
    #[default]
    #[serde(other)]
    Internal,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitStatus {
    Code(i32),
    Signal(i32),
}

impl ExitStatus {
    /// The shell convention: the exit code, or 128 + the signal number.
    pub fn shell_code(self) -> i32 {
        match self {
            ExitStatus::Code(c) => c,
            ExitStatus::Signal(s) => 128 + s,
        }
    }
}

/// Which stdio stream a [`AGENT_STREAM_PORT`] connection carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamKind {
    Stdin,
    Stdout,
    Stderr,
}

/// First frame on a stream connection; the agent answers it with [`Response::Ok`] or
/// [`Response::Error`] (an unknown process is `NotFound`, a stream already attached or a stdin
/// the process does not have is `FailedPrecondition`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamHello {
    pub id: String,
    pub stream: StreamKind,
}

/// Guest-wide statistics, read from /proc in the guest.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct GuestStats {
    pub mem_total_kib: u64,
    pub mem_free_kib: u64,
    pub mem_available_kib: u64,
    pub load_avg: [f64; 3],
    pub cpus: u32,
    /// Aggregate CPU time from the first line of /proc/stat, in clock ticks:
    /// user, nice, system, idle, iowait, irq, softirq, steal.
    pub cpu_ticks: Vec<u64>,
    pub tasks: u32,
    pub uptime_secs: f64,
    /// Page cache and buffers (`Cached` + `Buffers` of /proc/meminfo).
    #[serde(default)]
    pub mem_cached_kib: u64,
    /// The agent process itself (`/proc/self`).
    #[serde(default)]
    pub agent: AgentProcessStats,
    /// Block devices with any I/O (`/proc/diskstats`), at most [`MAX_STATS_DEVICES`].
    #[serde(default)]
    pub disks: Vec<DiskStats>,
    /// Network interfaces (`/proc/net/dev`), at most [`MAX_STATS_DEVICES`].
    #[serde(default)]
    pub net: Vec<NetDevStats>,
    /// What the watchable-mount mirrors have done.
    #[serde(default)]
    pub watch: WatchStats,
}

/// Most disks or network interfaces one [`GuestStats`] lists (bounded metrics labels).
pub const MAX_STATS_DEVICES: usize = 16;

/// Resource use of the agent process.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct AgentProcessStats {
    pub rss_bytes: u64,
    /// CPU time in clock ticks (USER_HZ).
    pub cpu_user_ticks: u64,
    pub cpu_system_ticks: u64,
    pub fds: u32,
    pub threads: u32,
}

/// One line of /proc/diskstats.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DiskStats {
    pub name: String,
    pub reads: u64,
    pub sectors_read: u64,
    pub writes: u64,
    pub sectors_written: u64,
}

/// One interface of /proc/net/dev.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NetDevStats {
    pub name: String,
    pub rx_bytes: u64,
    pub rx_packets: u64,
    pub tx_bytes: u64,
    pub tx_packets: u64,
}

/// Upper bounds (seconds) of the host change → guest apply latency histogram.
pub const WATCH_APPLY_BUCKETS: [f64; 6] = [0.005, 0.02, 0.1, 0.5, 2.0, 10.0];

/// Counters of the agent's watchable-mount mirrors.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct WatchStats {
    /// Change batches received from the VMM's watcher.
    pub batches_received: u64,
    /// Change records received.
    pub records_received: u64,
    /// Change records applied to a mirror (settled).
    pub records_applied: u64,
    /// Full compares of a share (resync batches, gaps, timers).
    pub resyncs: u64,
    /// Mirrors that outgrew the limits and became bind mounts.
    pub bind_fallbacks: u64,
    /// Watchable mounts currently mirrored.
    pub mounts_watched: u32,
    /// Host change → applied in the guest: observations per bucket of
    /// [`WATCH_APPLY_BUCKETS`] plus one for larger (not cumulative).
    pub apply_latency_buckets: Vec<u64>,
    pub apply_latency_count: u64,
    pub apply_latency_sum_ns: u64,
    /// One histogram per stage of the watch path (see [`WatchStage`]).
    #[serde(default)]
    pub stages: Vec<WatchStageHistogram>,
}

/// Upper bounds (seconds) of the per-stage watch histograms.
pub const WATCH_STAGE_BUCKETS: [f64; 12] =
    [0.000_1, 0.000_25, 0.000_5, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 2.0];
/// Most recent batches whose stage durations [`Response::WatchStages`] carries.
pub const MAX_WATCH_STAGE_SAMPLES: usize = 256;

/// The stages of the watch path whose durations are measured on one clock. Host stages come
/// from the host stamps a [`watch::ChangeBatch`] carries; guest stages are measured on the
/// guest's monotonic clock from the agent's receipt of the batch. The hop between the two
/// (vsock send → agent receipt) spans two clocks and is not a stage: the benchmark gets it as
/// what is left of the round trip.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WatchStage {
    /// Host inotify read → coalescer flush.
    ReadToFlush,
    /// Coalescer flush → vsock send.
    FlushToSend,
    /// Agent receipt → the mirror's sync starts.
    ReceiptToApplyStart,
    /// Agent receipt → mirror applied (writes and renames done).
    ReceiptToApplied,
}

impl WatchStage {
    /// Every stage, in path order.
    pub const ALL: [WatchStage; 4] = [
        WatchStage::ReadToFlush,
        WatchStage::FlushToSend,
        WatchStage::ReceiptToApplyStart,
        WatchStage::ReceiptToApplied,
    ];

    /// The stage's metrics label.
    pub fn label(self) -> &'static str {
        match self {
            WatchStage::ReadToFlush => "host_read_to_flush",
            WatchStage::FlushToSend => "host_flush_to_send",
            WatchStage::ReceiptToApplyStart => "guest_receipt_to_apply_start",
            WatchStage::ReceiptToApplied => "guest_receipt_to_applied",
        }
    }
}

/// Observations of one [`WatchStage`] per bucket of [`WATCH_STAGE_BUCKETS`] plus one for
/// larger (not cumulative).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchStageHistogram {
    pub stage: WatchStage,
    pub buckets: Vec<u64>,
    pub count: u64,
    pub sum_ns: u64,
}

/// The stage durations of one applied change batch.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct WatchStageSample {
    pub seq: u64,
    /// Host clock: inotify read → coalescer flush, flush → send (ns).
    pub read_to_flush_ns: u64,
    pub flush_to_send_ns: u64,
    /// Host clock: the send stamp (ns since the epoch).
    pub send_unix_ns: u64,
    /// Guest monotonic clock: receipt, sync start and mirror applied (ns since boot).
    pub receipt_mono_ns: u64,
    pub apply_start_mono_ns: u64,
    pub applied_mono_ns: u64,
}

/// Errors reading or writing protocol messages.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("connection I/O failed")]
    Io(#[from] std::io::Error),
    #[error("frame of {0} bytes exceeds the {MAX_FRAME_LEN}-byte limit")]
    FrameTooLarge(usize),
    #[error("malformed message")]
    Decode(#[from] serde_json::Error),
    #[error("peer closed the connection")]
    Closed,
}

impl From<tern_change_records::FrameError> for ProtocolError {
    fn from(err: tern_change_records::FrameError) -> Self {
        use tern_change_records::FrameError;
        match err {
            FrameError::Io(err) => ProtocolError::Io(err),
            FrameError::TooLarge(len) => ProtocolError::FrameTooLarge(len),
            FrameError::Closed => ProtocolError::Closed,
        }
    }
}

/// Send one message as a frame.
/// "outer: inner: innermost" for an error and its sources: how errors read in logs and in
/// [`Response::Error`] messages on both sides of the protocol.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

pub fn send<T: Serialize, W: Write>(w: &mut W, msg: &T) -> Result<(), ProtocolError> {
    let body = serde_json::to_vec(msg)?;
    frame::write_frame(w, &body)
}

/// Receive one message; [`ProtocolError::Closed`] on a clean EOF before the frame.
pub fn recv<T: for<'de> Deserialize<'de>, R: Read>(r: &mut R) -> Result<T, ProtocolError> {
    let body = frame::read_frame(r)?;
    Ok(serde_json::from_slice(&body)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trips() {
        let req = Request::Exec(ExecRequest {
            id: "p1".into(),
            argv: vec!["echo".into(), "hi".into()],
            env: vec!["A=B".into()],
            cwd: Some("/tmp".into()),
            stdin: true,
            terminal: Some(WindowSize { rows: 24, cols: 80 }),
        });
        let mut buf = Vec::new();
        send(&mut buf, &req).unwrap();
        let back: Request = recv(&mut buf.as_slice()).unwrap();
        assert_eq!(back, req);
    }

    #[test]
    fn exec_without_a_terminal_reads_and_writes_as_before() {
        // What a runtime from before `terminal` sends: pipes.
        let old = br#"{"op":"exec","id":"p","argv":["true"],"env":[],"cwd":null,"stdin":false}"#;
        let req: Request = serde_json::from_slice(old).unwrap();
        let Request::Exec(exec) = &req else { panic!("not an exec: {req:?}") };
        assert_eq!(exec.terminal, None);
        // And no pty is asked for in a field an older agent would not know.
        assert_eq!(serde_json::to_vec(&req).unwrap(), old.to_vec());
    }

    #[test]
    fn container_request_round_trips() {
        let req = Request::StartContainer(ContainerSpec {
            id: "c1".into(),
            oci_spec: r#"{"ociVersion":"1.0.2"}"#.into(),
            stdin: true,
        });
        let mut buf = Vec::new();
        send(&mut buf, &req).unwrap();
        let back: Request = recv(&mut buf.as_slice()).unwrap();
        assert_eq!(back, req);
    }

    #[test]
    fn resource_update_keeps_unlimited_apart_from_unchanged() {
        let req = Request::UpdateContainer {
            id: "c".into(),
            resources: ResourceUpdate {
                memory_max: Some(Limit::Max),
                pids_max: Some(Limit::Value(64)),
                cpu_max: Some((Limit::Value(50_000), 100_000)),
                ..Default::default()
            },
        };
        let mut buf = Vec::new();
        send(&mut buf, &req).unwrap();
        let back: Request = recv(&mut buf.as_slice()).unwrap();
        assert_eq!(back, req);
        let Request::UpdateContainer { resources, .. } = back else { panic!() };
        assert_eq!(resources.memory_swap_max, None);
    }

    #[test]
    fn error_codes_cross_the_wire_and_old_or_unknown_codes_read_as_internal() {
        let reply = Response::Error { message: "no process with id \"x\"".into(), code: ErrorCode::NotFound };
        let mut buf = Vec::new();
        send(&mut buf, &reply).unwrap();
        assert!(String::from_utf8_lossy(&buf).contains(r#""code":"not_found""#));
        assert_eq!(recv::<Response, _>(&mut buf.as_slice()).unwrap(), reply);
        // An agent before protocol 5 sends no code.
        let old: Response = serde_json::from_str(r#"{"result":"error","message":"boom"}"#).unwrap();
        assert_eq!(old, Response::Error { message: "boom".into(), code: ErrorCode::Internal });
        // A code this side does not know yet.
        let newer: Response = serde_json::from_str(r#"{"result":"error","message":"m","code":"data_loss"}"#).unwrap();
        assert_eq!(newer, Response::Error { message: "m".into(), code: ErrorCode::Internal });
    }

    #[test]
    fn op_is_the_wire_tag() {
        let reqs = [
            Request::Health,
            Request::Stats,
            Request::WatchStages,
            Request::ContainerStats { id: "c".into() },
            Request::PauseContainer { id: "c".into() },
            Request::WaitOom { id: "c".into(), seen: 0 },
            Request::ResizePty { id: "p".into(), rows: 1, cols: 1 },
            Request::Unmount { guest_path: "/m".into() },
        ];
        for req in reqs {
            let json: serde_json::Value = serde_json::to_value(&req).unwrap();
            assert_eq!(json["op"], req.op(), "{req:?}");
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut buf = Vec::new();
        frame::write_frame(&mut buf, b"{not json").unwrap();
        assert!(matches!(recv::<Request, _>(&mut buf.as_slice()), Err(ProtocolError::Decode(_))));
    }

    #[test]
    fn shell_code_convention() {
        assert_eq!(ExitStatus::Code(3).shell_code(), 3);
        assert_eq!(ExitStatus::Signal(9).shell_code(), 137);
    }
}
