//! Client side of the agent protocol over the VMM's hybrid vsock socket.
//!
//! The VMM exposes the guest's vsock as a unix socket: connect, write `CONNECT <port>\n`, read
//! `OK <host-port>\n`, and the socket is now a stream to the guest port. Before the agent
//! listens the VMM closes the socket instead of answering `OK`; [`AgentClient::wait_ready`]
//! retries until the agent answers or a deadline passes.

use std::io::ErrorKind;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tern_protocol::{
    CgroupStats, ContainerExecRequest, ContainerSpec, ErrorCode, ExecRequest, ExitStatus, GuestStats, MountRequest,
    ProtocolError, Request, ResourceUpdate, Response, StreamHello, StreamKind, AGENT_RPC_PORT, AGENT_STREAM_PORT,
    PROTOCOL_VERSION,
};
use vmm::hybrid_vsock::HybridVsockError;

/// Timeout for one non-blocking RPC (everything but `Wait`).
const RPC_TIMEOUT: Duration = Duration::from_secs(30);
/// Timeout for starting a container or an exec in one: libcontainer's namespace, mount and
/// cgroup setup is the guest's heaviest request. In the nested runner with ten pods booting
/// at once it took over 30 s (a CRI pod failed on it); Kata allows 60 s by default.
const CONTAINER_START_TIMEOUT: Duration = Duration::from_secs(120);
/// Pause between connection attempts while the guest is booting.
const RETRY_INTERVAL: Duration = Duration::from_millis(10);
/// How long one readiness probe waits for the guest to accept or refuse a connection. A live
/// guest kernel answers a vsock request at once; a dead or wedged one never does, and the
/// caller must get to re-check the VM rather than block on it.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Errors talking to the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot connect to the VM's vsock socket {path}")]
    Connect { path: PathBuf, source: std::io::Error },
    #[error("guest refused vsock port {0} (nothing listening)")]
    Refused(u32),
    #[error("unexpected vsock handshake reply {0:?}")]
    Handshake(String),
    #[error("the VM did not answer a connection to vsock port {port} within {after:?}")]
    ConnectTimeout { port: u32, after: Duration },
    #[error("agent speaks protocol version {got}, this runtime speaks {PROTOCOL_VERSION}")]
    Version { got: u32 },
    #[error("agent did not answer within {waited:?} (last attempt: {last})")]
    NotReady { waited: Duration, last: String },
    #[error("the VM ended before its agent answered ({0})")]
    VmGone(String),
    #[error("agent protocol error")]
    Protocol(#[from] ProtocolError),
    #[error("agent I/O failed")]
    Io(#[from] std::io::Error),
    #[error("the agent did not answer {request} within {after:?}")]
    Timeout { request: &'static str, after: Duration },
    /// The agent answered with an error; `code` classifies it (see `shim::errdefs`).
    #[error("agent refused the request: {message}")]
    Remote { code: ErrorCode, message: String },
    #[error("agent sent an unexpected reply: {0}")]
    Unexpected(String),
}

/// Talks to one guest's agent through the VMM's hybrid vsock unix socket.
#[derive(Debug, Clone)]
pub struct AgentClient {
    uds_path: PathBuf,
}

/// The value `$pattern` binds in the response `$call` returns, or that response as
/// [`AgentError::Unexpected`] if it is another one.
macro_rules! answer {
    ($call:expr, $pattern:pat => $value:expr) => {
        match $call? {
            $pattern => Ok($value),
            other => Err(AgentError::Unexpected(format!("{other:?}"))),
        }
    };
}

impl AgentClient {
    pub fn new(uds_path: impl Into<PathBuf>) -> Self {
        AgentClient { uds_path: uds_path.into() }
    }

    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    /// Open a stream to `port` in the guest.
    pub fn connect(&self, port: u32) -> Result<UnixStream, AgentError> {
        self.connect_within(port, RPC_TIMEOUT)
    }

    /// Open a stream to `port`, waiting at most `timeout` for the guest's answer.
    fn connect_within(&self, port: u32, timeout: Duration) -> Result<UnixStream, AgentError> {
        vmm::hybrid_vsock::connect(&self.uds_path, port, timeout).map_err(|e| match e {
            HybridVsockError::Socket { path, source } => AgentError::Connect { path, source },
            HybridVsockError::Refused(port) => AgentError::Refused(port),
            HybridVsockError::Handshake(line) => AgentError::Handshake(line),
            HybridVsockError::Timeout { port, after } => AgentError::ConnectTimeout { port, after },
            HybridVsockError::Io(e) => AgentError::Io(e),
        })
    }

    /// Retry [`Request::Health`] until the agent answers, `timeout` passes, or `give_up()` says
    /// the VM is gone ([`AgentError::VmGone`]). Checks the protocol version.
    pub fn wait_ready(
        &self,
        timeout: Duration,
        mut give_up: impl FnMut() -> Option<String>,
    ) -> Result<String, AgentError> {
        let start = Instant::now();
        loop {
            if let Some(reason) = give_up() {
                return Err(AgentError::VmGone(reason));
            }
            let last = match self.probe_health() {
                Ok(version) => return Ok(version),
                Err(e @ AgentError::Version { .. }) => return Err(e),
                Err(e) => {
                    tracing::trace!(error = %e, "agent not ready yet");
                    e
                }
            };
            if start.elapsed() >= timeout {
                let last = crate::sandbox::error_chain(&last);
                return Err(AgentError::NotReady { waited: timeout, last });
            }
            std::thread::sleep(RETRY_INTERVAL);
        }
    }

    /// One request, one response, on a fresh connection.
    pub fn call(&self, req: &Request) -> Result<Response, AgentError> {
        self.call_within(req, RPC_TIMEOUT)
    }

    /// [`Self::call`] with a bound on connecting and on the answer (`Wait` has no bound on
    /// the answer: it lasts as long as the process).
    fn call_within(&self, req: &Request, timeout: Duration) -> Result<Response, AgentError> {
        let started = Instant::now();
        let result = self.call_within_unmeasured(req, timeout);
        crate::metrics::rpc::AGENT.record(request_name(req), started.elapsed(), result.is_ok());
        result
    }

    fn call_within_unmeasured(&self, req: &Request, timeout: Duration) -> Result<Response, AgentError> {
        let mut sock = self.connect_within(AGENT_RPC_PORT, timeout)?;
        // Waits last as long as what they wait for.
        if !matches!(req, Request::Wait { .. } | Request::WaitOom { .. }) {
            sock.set_read_timeout(Some(timeout))?;
        }
        tern_protocol::send(&mut sock, req)?;
        read_answer(&mut sock, request_name(req), timeout)
    }

    /// Health check; returns the agent's version string.
    pub fn health(&self) -> Result<String, AgentError> {
        self.health_within(RPC_TIMEOUT)
    }

    fn probe_health(&self) -> Result<String, AgentError> {
        self.health_within(PROBE_TIMEOUT)
    }

    fn health_within(&self, timeout: Duration) -> Result<String, AgentError> {
        let call = self.call_within(&Request::Health, timeout);
        let (got, version) = answer!(call, Response::Health { protocol_version: p, agent_version: v } => (p, v))?;
        if got != PROTOCOL_VERSION {
            return Err(AgentError::Version { got });
        }
        Ok(version)
    }

    /// Start a process; returns its guest pid.
    pub fn exec(&self, req: ExecRequest) -> Result<i32, AgentError> {
        answer!(self.call(&Request::Exec(req)), Response::Started { pid } => pid)
    }

    /// Create a container and start its process (registered under `spec.id`); returns its
    /// guest pid.
    pub fn start_container(&self, spec: ContainerSpec) -> Result<i32, AgentError> {
        let call = self.call_within(&Request::StartContainer(spec), CONTAINER_START_TIMEOUT);
        answer!(call, Response::Started { pid } => pid)
    }

    /// Start a process inside a running container; returns its guest pid.
    pub fn exec_in_container(&self, req: ContainerExecRequest) -> Result<i32, AgentError> {
        let call = self.call_within(&Request::ExecInContainer(req), CONTAINER_START_TIMEOUT);
        answer!(call, Response::Started { pid } => pid)
    }

    /// Set the window size of a terminal process.
    pub fn resize_pty(&self, id: &str, rows: u16, cols: u16) -> Result<(), AgentError> {
        self.expect_ok(&Request::ResizePty { id: id.to_owned(), rows, cols })
    }

    /// Freeze a container (returns once the kernel reports it frozen).
    pub fn pause_container(&self, id: &str) -> Result<(), AgentError> {
        self.expect_ok(&Request::PauseContainer { id: id.to_owned() })
    }

    /// Signal every process of a container, not just its init (`kill --all`).
    pub fn signal_container(&self, id: &str, signal: i32) -> Result<(), AgentError> {
        self.expect_ok(&Request::SignalContainer { id: id.to_owned(), signal })
    }

    /// The guest pids of every process in a container.
    pub fn container_pids(&self, id: &str) -> Result<Vec<i32>, AgentError> {
        answer!(self.call(&Request::ContainerPids { id: id.to_owned() }), Response::Pids { pids } => pids)
    }

    pub fn resume_container(&self, id: &str) -> Result<(), AgentError> {
        self.expect_ok(&Request::ResumeContainer { id: id.to_owned() })
    }

    /// cgroup v2 statistics of a container.
    pub fn container_stats(&self, id: &str) -> Result<CgroupStats, AgentError> {
        answer!(self.call(&Request::ContainerStats { id: id.to_owned() }), Response::ContainerStats(s) => s)
    }

    /// Apply resource limits to a container's cgroup.
    pub fn update_container(&self, id: &str, resources: ResourceUpdate) -> Result<(), AgentError> {
        self.expect_ok(&Request::UpdateContainer { id: id.to_owned(), resources })
    }

    /// Block until the container's cgroup has more than `seen` OOM kills; returns the count.
    pub fn wait_oom(&self, id: &str, seen: u64) -> Result<u64, AgentError> {
        answer!(self.call(&Request::WaitOom { id: id.to_owned(), seen }), Response::OomKills { count } => count)
    }

    /// Deliver EOF on the process's stdin.
    pub fn close_stdin(&self, id: &str) -> Result<(), AgentError> {
        self.expect_ok(&Request::CloseStdin { id: id.to_string() })
    }

    /// Block until the process exits.
    pub fn wait(&self, id: &str) -> Result<ExitStatus, AgentError> {
        answer!(self.call(&Request::Wait { id: id.to_string() }), Response::Exited(status) => status)
    }

    pub fn signal(&self, id: &str, signal: i32) -> Result<(), AgentError> {
        self.expect_ok(&Request::Signal { id: id.to_string(), signal })
    }

    pub fn stats(&self) -> Result<GuestStats, AgentError> {
        self.stats_within(RPC_TIMEOUT)
    }

    /// [`Self::stats`], giving up after `timeout` (metrics scrapes must stay fast).
    pub fn stats_within(&self, timeout: Duration) -> Result<GuestStats, AgentError> {
        answer!(self.call_within(&Request::Stats, timeout), Response::Stats(s) => s)
    }

    /// The stage durations of the last change batches the agent applied, oldest first.
    pub fn watch_stages(&self) -> Result<Vec<tern_protocol::WatchStageSample>, AgentError> {
        answer!(self.call(&Request::WatchStages), Response::WatchStages { batches } => batches)
    }

    /// Present a virtio-fs share at a guest path.
    pub fn mount(&self, req: MountRequest) -> Result<(), AgentError> {
        self.expect_ok(&Request::Mount(req))
    }

    /// Undo [`AgentClient::mount`] at `guest_path`.
    pub fn unmount(&self, guest_path: &str) -> Result<(), AgentError> {
        self.expect_ok(&Request::Unmount { guest_path: guest_path.to_string() })
    }

    /// Configure the guest's NICs, addresses, neighbours and routes (before any container).
    pub fn configure_network(&self, config: &tern_protocol::net::NetworkConfig) -> Result<(), AgentError> {
        self.expect_ok(&Request::ConfigureNetwork(config.clone()))
    }

    /// Ask the agent to power the guest off.
    pub fn shutdown(&self) -> Result<(), AgentError> {
        self.expect_ok(&Request::Shutdown)
    }

    /// Attach to one stdio stream of process `id`. The agent answers the hello before any byte of
    /// the stream: a refused stream (unknown process, stream already taken) is an error here, not
    /// an empty stream.
    pub fn attach(&self, id: &str, stream: StreamKind) -> Result<UnixStream, AgentError> {
        let started = Instant::now();
        let result = self.attach_unmeasured(id, stream);
        crate::metrics::rpc::AGENT.record("attach", started.elapsed(), result.is_ok());
        result
    }

    fn attach_unmeasured(&self, id: &str, stream: StreamKind) -> Result<UnixStream, AgentError> {
        let mut sock = self.connect_within(AGENT_STREAM_PORT, RPC_TIMEOUT)?;
        sock.set_read_timeout(Some(RPC_TIMEOUT))?;
        tern_protocol::send(&mut sock, &StreamHello { id: id.to_string(), stream })?;
        match read_answer(&mut sock, "attach", RPC_TIMEOUT)? {
            Response::Ok => {}
            other => return Err(AgentError::Unexpected(format!("{other:?}"))),
        }
        // The stream itself is read for as long as the process writes.
        sock.set_read_timeout(None)?;
        Ok(sock)
    }

    fn expect_ok(&self, req: &Request) -> Result<(), AgentError> {
        answer!(self.call(req), Response::Ok => ())
    }
}

/// Read the agent's answer to `request` on `sock`, whose read timeout is `timeout`: an answer
/// later than that (EAGAIN on the socket) is a Timeout naming the request, an error answer is
/// [`AgentError::Remote`].
fn read_answer(sock: &mut UnixStream, request: &'static str, timeout: Duration) -> Result<Response, AgentError> {
    match tern_protocol::recv(sock) {
        Ok(Response::Error { message, code }) => Err(AgentError::Remote { code, message }),
        Ok(resp) => Ok(resp),
        Err(ProtocolError::Io(e)) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            Err(AgentError::Timeout { request, after: timeout })
        }
        Err(e) => Err(e.into()),
    }
}

/// The metrics name of a request: its protocol `op` tag.
fn request_name(req: &Request) -> &'static str {
    req.op()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixListener;

    fn fake_vmm(reply: &'static [u8]) -> (tempfile::TempDir, AgentClient, std::thread::JoinHandle<()>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vsock.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 64];
            let n = s.read(&mut buf).unwrap();
            assert_eq!(&buf[..n], b"CONNECT 1024\n");
            s.write_all(reply).unwrap();
        });
        (dir, AgentClient::new(path), t)
    }

    /// A fake VMM that takes the CONNECT line, sends `handshake` if any, and then holds the
    /// connection open without another byte until the returned sender is used.
    fn silent_vmm(
        handshake: Option<&'static [u8]>,
    ) -> (tempfile::TempDir, AgentClient, std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vsock.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 64];
            let _ = s.read(&mut buf).unwrap();
            if let Some(line) = handshake {
                s.write_all(line).unwrap();
            }
            let _ = done_rx.recv();
        });
        (dir, AgentClient::new(path), done_tx, t)
    }

    #[test]
    fn an_agent_that_never_answers_is_a_timeout_naming_the_request() {
        // The handshake succeeds; the request gets no answer.
        let (_dir, client, done_tx, t) = silent_vmm(Some(b"OK 1073741824\n"));
        let err = client.call_within(&Request::Stats, Duration::from_millis(200)).unwrap_err();
        assert!(matches!(err, AgentError::Timeout { request: "stats", .. }), "{err:?}");
        assert_eq!(err.to_string(), "the agent did not answer stats within 200ms");
        done_tx.send(()).unwrap();
        t.join().unwrap();
    }

    #[test]
    fn an_unanswered_connect_is_a_timeout_naming_the_port() {
        let (_dir, client, done_tx, t) = silent_vmm(None);
        let err = client.connect_within(AGENT_RPC_PORT, Duration::from_millis(200)).unwrap_err();
        assert!(matches!(err, AgentError::ConnectTimeout { port: 1024, .. }), "{err:?}");
        assert_eq!(err.to_string(), "the VM did not answer a connection to vsock port 1024 within 200ms");
        done_tx.send(()).unwrap();
        t.join().unwrap();
    }

    #[test]
    fn closed_handshake_means_refused() {
        let (_d, client, t) = fake_vmm(b"");
        assert!(matches!(client.connect(AGENT_RPC_PORT), Err(AgentError::Refused(1024))));
        t.join().unwrap();
    }

    #[test]
    fn garbage_handshake_is_an_error() {
        let (_d, client, t) = fake_vmm(b"NOPE\n");
        assert!(matches!(client.connect(AGENT_RPC_PORT), Err(AgentError::Handshake(_))));
        t.join().unwrap();
    }

    #[test]
    fn ok_handshake_leaves_stream_bytes_unread() {
        let (_d, client, t) = fake_vmm(b"OK 1073741824\nDATA");
        let mut s = client.connect(AGENT_RPC_PORT).unwrap();
        t.join().unwrap();
        let mut rest = String::new();
        s.read_to_string(&mut rest).unwrap();
        assert_eq!(rest, "DATA");
    }

    /// A guest end of the stream port: takes the VMM handshake and the hello, then answers
    /// `answer` (or closes without one when it is `None`) followed by `data`.
    fn fake_stream_port(
        answer: Option<Response>,
        data: &'static [u8],
    ) -> (tempfile::TempDir, AgentClient, std::thread::JoinHandle<()>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vsock.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut line = [0u8; 13];
            s.read_exact(&mut line).unwrap();
            assert_eq!(&line, b"CONNECT 1025\n");
            s.write_all(b"OK 1073741824\n").unwrap();
            let hello: StreamHello = tern_protocol::recv(&mut s).unwrap();
            assert_eq!(hello, StreamHello { id: "p".into(), stream: StreamKind::Stdout });
            if let Some(answer) = answer {
                tern_protocol::send(&mut s, &answer).unwrap();
                s.write_all(data).unwrap();
            }
        });
        (dir, AgentClient::new(path), t)
    }

    #[test]
    fn an_attached_stream_starts_after_the_answer() {
        let (_d, client, t) = fake_stream_port(Some(Response::Ok), b"hello\n");
        let mut s = client.attach("p", StreamKind::Stdout).unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).unwrap();
        assert_eq!(out, b"hello\n");
        t.join().unwrap();
    }

    #[test]
    fn a_refused_stream_is_an_error_not_an_empty_stream() {
        let refusal = Response::Error { message: "no process with id \"p\"".into(), code: ErrorCode::NotFound };
        let (_d, client, t) = fake_stream_port(Some(refusal), b"");
        let err = client.attach("p", StreamKind::Stdout).unwrap_err();
        assert!(
            matches!(&err, AgentError::Remote { code: ErrorCode::NotFound, message } if message.contains("\"p\"")),
            "{err:?}"
        );
        t.join().unwrap();
    }

    #[test]
    fn a_stream_closed_without_an_answer_is_an_error() {
        let (_d, client, t) = fake_stream_port(None, b"");
        let err = client.attach("p", StreamKind::Stdout).unwrap_err();
        assert!(matches!(err, AgentError::Protocol(ProtocolError::Closed)), "{err:?}");
        t.join().unwrap();
    }
}
