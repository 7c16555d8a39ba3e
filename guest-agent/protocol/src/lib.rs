//! The runtime <-> agent protocol: the one definition both sides compile against.
//!
//! Transport: virtio-vsock streams. The agent listens on two ports:
//! - [`AGENT_RPC_PORT`]: request/response RPC. Each message is a [`frame`]: a 4-byte big-endian
//!   length followed by that many bytes of JSON. Requests on one connection are answered in
//!   order; the host opens several connections when it needs concurrency (e.g. a blocking
//!   [`Request::Wait`] beside other calls).
//! - [`AGENT_STREAM_PORT`]: process stdio. The first frame is a [`StreamHello`] naming a process
//!   and one of its streams; after it the connection carries raw bytes. For stdin the host
//!   half-closes (shutdown write) to deliver EOF; for stdout/stderr the agent closes the
//!   connection when the process side of the pipe reaches EOF.
//!
//! The first request on an RPC connection should be [`Request::Health`]; the host compares
//! the returned version with [`PROTOCOL_VERSION`] and refuses to talk to a different one.

use serde::{Deserialize, Serialize};
use std::io::{Read, Write};

pub mod frame;
pub mod watch;

/// Bumped on every incompatible change of the messages below.
pub const PROTOCOL_VERSION: u32 = 3;
/// vsock port of the agent's RPC server.
pub const AGENT_RPC_PORT: u32 = 1024;
/// vsock port on which the agent accepts process stdio streams.
pub const AGENT_STREAM_PORT: u32 = 1025;
/// vsock port on which the agent accepts change-record streams from the VMM's fs watcher
/// (see [`watch`]).
pub const AGENT_WATCH_PORT: u32 = 1026;
/// virtio-fs tag of the VM's one fs device; every share is a subdirectory of it.
pub const FS_TAG: &str = "tern";
/// Where the agent mounts the virtio-fs device in the guest; share `S` is `<this>/S`.
pub const GUEST_SHARES_ROOT: &str = "/run/tern/shares";
/// Line the agent writes to the console when it is ready to serve (used for boot timing).
pub const READY_MARKER: &str = "TERN-AGENT-READY";
/// Largest frame either side accepts; a larger length prefix is a protocol error.
pub const MAX_FRAME_LEN: usize = 4 << 20;

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
    /// Orderly shutdown: sync, kill remaining processes and power the VM off.
    Shutdown,
    /// Present a virtio-fs share at a guest path (see [`MountRequest`]).
    Mount(MountRequest),
    /// Undo a [`Request::Mount`] at this guest path.
    Unmount { guest_path: String },
    /// Create a container (namespaces, mounts, new root) and start its process, registered
    /// under `id` like an [`Request::Exec`] process: `Wait`, `Signal`, streams work the same.
    StartContainer(ContainerSpec),
}

/// A container for the agent to create (with `libcontainer`) and start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ContainerSpec {
    /// Container id, also its process id in the agent's table; a single path component.
    pub id: String,
    /// The OCI runtime spec (`config.json`) as the host adapted it for the guest: `root.path`
    /// is the guest path of the rootfs (a share mounted with [`Request::Mount`]), and what does
    /// not apply inside the VM (host bind mounts, namespace paths, hooks, seccomp, LSM labels)
    /// is already dropped.
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
    /// Whether the host will attach a stdin stream; when false stdin is /dev/null.
    pub stdin: bool,
}

/// An answer from the agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Health { protocol_version: u32, agent_version: String },
    Started { pid: i32 },
    Exited(ExitStatus),
    Stats(GuestStats),
    Ok,
    Error { message: String },
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

/// First frame on a stream connection.
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

/// Send one message as a frame.
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
        });
        let mut buf = Vec::new();
        send(&mut buf, &req).unwrap();
        let back: Request = recv(&mut buf.as_slice()).unwrap();
        assert_eq!(back, req);
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
