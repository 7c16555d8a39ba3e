//! The agent's servers: accept loops, one thread per connection, and the RPC dispatcher.
//!
//! RPC connections answer requests in order; a blocking `Wait` only blocks its own
//! connection (the host opens more for concurrency). A malformed frame fails that request
//! only; a clean EOF ends the connection quietly.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tern_protocol::{recv, send, ErrorCode, ProtocolError, Request, Response, PROTOCOL_VERSION};
use tracing::{debug, error, info, warn};

use crate::error_code::CodedError;
use crate::process::ProcessTable;
use crate::stats;
use crate::streams::handle_stream_connection;
use crate::transport::{Connection, Listener};

/// How long processes get between SIGTERM and SIGKILL on `Shutdown`.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// What `Shutdown` does after killing the processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownMode {
    /// We are PID 1 in a VM: signal every process, sync and reset the machine.
    PowerOff,
    /// Host-side testing: only our own processes, then exit the agent.
    ExitProcess,
}

/// Shared state of all connections.
#[derive(Debug)]
pub struct Agent {
    table: Arc<ProcessTable>,
    containers: crate::container::Containers,
    shutdown_mode: ShutdownMode,
    shutting_down: AtomicBool,
    /// Test hook: requests with this `op` are never answered (see [`test_stall_from_cmdline`]).
    test_stall: Option<String>,
}

/// The `tern.test_stall=<op>` kernel parameter: a test-only hook that makes the agent stall
/// every request whose protocol `op` is `<op>` (e.g. `container_stats`) forever, so tests can
/// check that one stuck request blocks nothing else on the host. The shim adds it only when
/// `$TERN_TEST_AGENT_STALL` is set (see the README's Tests section).
pub fn test_stall_from_cmdline(cmdline: &str) -> Option<String> {
    cmdline
        .split_whitespace()
        .filter_map(|arg| arg.strip_prefix("tern.test_stall="))
        .next_back()
        .filter(|op| !op.is_empty())
        .map(str::to_owned)
}

impl Agent {
    pub fn new(table: Arc<ProcessTable>, shutdown_mode: ShutdownMode) -> Self {
        Self {
            table,
            containers: Default::default(),
            shutdown_mode,
            shutting_down: AtomicBool::new(false),
            test_stall: None,
        }
    }

    /// Stall requests with protocol op `op` (the `tern.test_stall` test hook).
    pub fn with_test_stall(mut self, op: Option<String>) -> Self {
        if let Some(op) = &op {
            warn!(op, "test hook: requests of this kind will never be answered");
        }
        self.test_stall = op;
        self
    }

    /// Block this connection's thread for good when `req` is the stalled kind (test hook).
    fn stall_if_asked(&self, req: &Request) {
        if self.test_stall.as_deref() == Some(req.op()) {
            warn!(op = req.op(), "test hook: stalling the request");
            loop {
                std::thread::park();
            }
        }
    }

    /// Answer one request.
    fn handle(&self, req: Request) -> Response {
        // Nothing new starts once the guest is powering off.
        let starts_a_process =
            matches!(req, Request::Exec(_) | Request::StartContainer(_) | Request::ExecInContainer(_));
        if starts_a_process && self.shutting_down.load(Ordering::SeqCst) {
            return shutting_down();
        }
        match req {
            Request::Health => Response::Health {
                protocol_version: PROTOCOL_VERSION,
                agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            },
            Request::Exec(exec) => match self.table.spawn(&exec) {
                Ok(pid) => Response::Started { pid },
                Err(e) => {
                    info!(id = %exec.id, error = %e, "exec failed");
                    error_response(&e)
                }
            },
            Request::Wait { id } => match self.table.wait(&id) {
                Ok(status) => Response::Exited(status),
                Err(e) => error_response(&e),
            },
            Request::Signal { id, signal } => match self.table.signal(&id, signal) {
                Ok(()) => Response::Ok,
                Err(e) => error_response(&e),
            },
            Request::CloseStdin { id } => match self.table.close_stdin(&id) {
                Ok(()) => Response::Ok,
                Err(e) => error_response(&e),
            },
            Request::Stats => match stats::collect(Path::new("/proc")) {
                Ok(stats) => Response::Stats(stats),
                Err(e) => error_response(&e),
            },
            Request::WatchStages => Response::WatchStages { batches: stats::watch::recent_stages() },
            Request::Shutdown => {
                self.shutting_down.store(true, Ordering::SeqCst);
                Response::Ok
            }
            Request::Mount(req) => match crate::mounts::mount_share(&req) {
                Ok(()) => Response::Ok,
                Err(e) => {
                    info!(share = %req.share, guest_path = %req.guest_path, error = %e, "mount failed");
                    error_response(&e)
                }
            },
            Request::Unmount { guest_path } => match crate::mounts::unmount_share(&guest_path) {
                Ok(()) => Response::Ok,
                Err(e) => error_response(&e),
            },
            Request::StartContainer(spec) => match crate::container::start(&self.table, &self.containers, &spec) {
                Ok(pid) => Response::Started { pid },
                Err(e) => {
                    info!(id = %spec.id, error = %e, "container start failed");
                    error_response(&e)
                }
            },
            Request::ExecInContainer(req) => match crate::container::exec(&self.table, &self.containers, &req) {
                Ok(pid) => Response::Started { pid },
                Err(e) => {
                    info!(container = %req.container_id, id = %req.id, error = %e, "exec in container failed");
                    error_response(&e)
                }
            },
            Request::ResizePty { id, rows, cols } => match self.table.resize_pty(&id, rows, cols) {
                Ok(()) => Response::Ok,
                Err(e) => error_response(&e),
            },
            Request::PauseContainer { id } => ok_or_error(self.containers.pause(&id)),
            Request::ResumeContainer { id } => ok_or_error(self.containers.resume(&id)),
            Request::SignalContainer { id, signal } => ok_or_error(self.containers.signal_all(&id, signal)),
            Request::ContainerPids { id } => match self.containers.pids(&id) {
                Ok(pids) => Response::Pids { pids },
                Err(e) => error_response(&e),
            },
            Request::ContainerStats { id } => match self.containers.stats(&id) {
                Ok(stats) => Response::ContainerStats(stats),
                Err(e) => error_response(&e),
            },
            Request::UpdateContainer { id, resources } => ok_or_error(self.containers.update(&id, &resources)),
            Request::WaitOom { id, seen } => match self.containers.wait_oom(&id, seen) {
                Ok(count) => Response::OomKills { count },
                Err(e) => error_response(&e),
            },
            Request::ConfigureNetwork(config) => {
                let result = tern_netconf::guest::configure(&config);
                match &result {
                    Ok(()) => info!(
                        interfaces = %describe_interfaces(&config),
                        routes = config.routes.len(),
                        neighbours = config.neighbors.len(),
                        "network configured"
                    ),
                    Err(e) => warn!(error = %e, "network configuration failed"),
                }
                ok_or_error(result)
            }
        }
    }

    /// Stop everything. Does not return.
    fn shut_down(&self) -> ! {
        warn!("shutting down on request");
        match self.shutdown_mode {
            ShutdownMode::ExitProcess => {
                self.table.terminate_all(SHUTDOWN_GRACE);
                std::process::exit(0);
            }
            ShutdownMode::PowerOff => {
                kill_everything();
                let err = crate::init::power_off();
                // Returning would make PID 1 exit and panic the kernel; nothing left to do
                // but say why and wait for the host to give up on us.
                error!(error = %err, "reboot failed");
                loop {
                    std::thread::park();
                }
            }
        }
    }
}

/// As PID 1: SIGTERM every process in the VM, wait up to the grace period for all children
/// (including re-parented orphans) to be gone, then SIGKILL whatever is left.
fn kill_everything() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    // pid -1: every process except init itself.
    let all = Pid::from_raw(-1);
    let _ = kill(all, Signal::SIGTERM);
    let deadline = Instant::now() + SHUTDOWN_GRACE;
    while Instant::now() < deadline {
        if !crate::process::has_children() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = kill(all, Signal::SIGKILL);
}

/// `eth0 0a:58:0a:58:00:05 mtu 1450 [10.88.0.5/16]`, `;`-separated, for the log.
fn describe_interfaces(config: &tern_protocol::net::NetworkConfig) -> String {
    let described: Vec<String> = config
        .interfaces
        .iter()
        .map(|i| {
            let addresses: Vec<String> = i.addresses.iter().map(ToString::to_string).collect();
            format!("{} {} mtu {} [{}]", i.name, tern_protocol::net::format_mac(&i.mac), i.mtu, addresses.join(", "))
        })
        .collect();
    if described.is_empty() {
        "none (lo only)".to_owned()
    } else {
        described.join("; ")
    }
}

fn ok_or_error<E: CodedError>(result: Result<(), E>) -> Response {
    match result {
        Ok(()) => Response::Ok,
        Err(e) => error_response(&e),
    }
}

/// The error's code (see [`crate::error_code`]) and `message: source: source's source`, so the
/// host sees the root cause.
fn error_response(e: &dyn CodedError) -> Response {
    Response::Error { message: tern_protocol::error_chain(e), code: e.code() }
}

/// The answer to a request that would start something while the agent shuts down.
fn shutting_down() -> Response {
    Response::Error { message: "the agent is shutting down".into(), code: ErrorCode::Unavailable }
}

/// Serve one RPC connection until the host closes it.
pub fn handle_rpc_connection(agent: &Agent, mut conn: Connection) {
    loop {
        let req: Request = match recv(&mut conn) {
            Ok(req) => req,
            Err(ProtocolError::Closed) => return,
            Err(ProtocolError::Decode(e)) => {
                // The frame boundary is intact, so the connection can go on.
                debug!(error = %e, "malformed request");
                let reply =
                    Response::Error { message: format!("malformed request: {e}"), code: ErrorCode::InvalidArgument };
                if send(&mut conn, &reply).is_err() {
                    return;
                }
                continue;
            }
            Err(e @ ProtocolError::FrameTooLarge(_)) => {
                // The body was not read, so we no longer know where the next frame starts.
                warn!(error = %e, "oversized request; closing the connection");
                let _ = send(&mut conn, &error_response(&e));
                return;
            }
            Err(e) => {
                debug!(error = %e, "RPC connection failed");
                return;
            }
        };
        debug!(?req, "request");
        let shutdown = matches!(req, Request::Shutdown);
        agent.stall_if_asked(&req);
        let reply = agent.handle(req);
        let sent = send(&mut conn, &reply);
        if shutdown {
            // Shut down even if the host went away before reading the reply.
            agent.shut_down();
        }
        if let Err(e) = sent {
            debug!(error = %e, "cannot send the reply; closing the connection");
            return;
        }
    }
}

/// Accept connections forever, each served on its own thread by `serve`.
pub fn accept_loop<F>(listener: Listener, name: &'static str, serve: F) -> !
where
    F: Fn(Connection) + Send + Sync + 'static,
{
    let serve = Arc::new(serve);
    loop {
        let conn = match listener.accept() {
            Ok(conn) => conn,
            Err(e) => {
                // E.g. EMFILE; pause so a persistent failure doesn't spin the vCPU.
                warn!(listener = name, error = %e, "accept failed");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let serve = Arc::clone(&serve);
        let spawned = std::thread::Builder::new().name(format!("{name}-conn")).spawn(move || serve(conn));
        if let Err(e) = spawned {
            warn!(listener = name, error = %e, "cannot start a connection thread; dropping the connection");
        }
    }
}

/// Run both servers: streams on a new thread, RPC on the calling one. `ready` is called once
/// both are accepting (the listeners were bound by the caller, so connections queue anyway).
pub fn run(
    agent: Arc<Agent>,
    rpc: Listener,
    streams: Listener,
    ready: impl FnOnce(),
) -> std::io::Result<std::convert::Infallible> {
    let table = Arc::clone(&agent.table);
    std::thread::Builder::new()
        .name("stream-accept".into())
        .spawn(move || accept_loop(streams, "stream", move |conn| handle_stream_connection(&table, conn)))?;
    ready();
    accept_loop(rpc, "rpc", move |conn| handle_rpc_connection(&agent, conn))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_messages_carry_the_source_chain_and_the_code() {
        let e = crate::cgroups::CgroupError::Read { path: "/c/x".into(), source: std::io::Error::other("inner") };
        assert_eq!(
            error_response(&e),
            Response::Error { message: "cannot read /c/x: inner".into(), code: ErrorCode::Internal }
        );
    }

    #[test]
    fn the_stall_hook_is_off_unless_the_kernel_command_line_names_an_op() {
        assert_eq!(test_stall_from_cmdline("quiet tern.test_stall=container_stats"), Some("container_stats".into()));
        assert_eq!(test_stall_from_cmdline("quiet tern.test_stall="), None);
        assert_eq!(test_stall_from_cmdline("quiet tern.watch_resync=5"), None);
    }

    #[test]
    fn a_process_the_agent_does_not_know_is_not_found() {
        let agent = Agent::new(Arc::new(ProcessTable::default()), ShutdownMode::ExitProcess);
        for req in [
            Request::Signal { id: "nope".into(), signal: 15 },
            Request::Wait { id: "nope".into() },
            Request::CloseStdin { id: "nope".into() },
            Request::PauseContainer { id: "nope".into() },
            Request::ContainerStats { id: "nope".into() },
        ] {
            let reply = agent.handle(req.clone());
            assert!(matches!(reply, Response::Error { code: ErrorCode::NotFound, .. }), "{req:?}: {reply:?}");
        }
        let reply = agent.handle(Request::Signal { id: "nope".into(), signal: 1234 });
        assert!(matches!(reply, Response::Error { code: ErrorCode::InvalidArgument | ErrorCode::NotFound, .. }));
        agent.shutting_down.store(true, Ordering::SeqCst);
        let exec = tern_protocol::ExecRequest {
            id: "p".into(),
            argv: vec!["true".into()],
            env: vec![],
            cwd: None,
            stdin: false,
            terminal: None,
        };
        assert!(matches!(agent.handle(Request::Exec(exec)), Response::Error { code: ErrorCode::Unavailable, .. }));
    }
}
