//! The process table: spawning processes for `Exec`, reaping every child (the agent is PID 1,
//! so orphans are ours too), and handing out the stdio pipes to stream connections.
//!
//! # Why reaping is gated on spawns
//!
//! The reaper owns `waitpid`; nothing else may reap. But `std::process::Command::spawn` itself
//! reaps a child whose `exec` (or `chdir`) failed, and it *asserts* that this `waitpid`
//! succeeds. A reaper blocked in `waitpid(-1)` would win that race often (the failed child
//! exits at once), std would panic, and with `panic = "abort"` PID 1 would die and take the
//! kernel with it. So the reaper only *peeks* (`waitid(.., WNOWAIT)`), then waits until no spawn
//! is in flight, and reaps under the table lock. Registration happens under that same lock
//! before the gate opens, so a child can never be reaped before its table entry exists: there
//! is no "exited before registration" case left to handle, and an exit for a pid not in the
//! table is an orphan that was re-parented to us.

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::net::Shutdown;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tern_protocol::{ExecRequest, ExitStatus, StreamKind};
use tern_sync::{CondvarExt, LockExt};
use tracing::{debug, info, warn};

use crate::transport::Connection;

/// PATH given to processes whose environment has none (and to the agent itself as PID 1).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Errors of process-table operations; each becomes a `Response::Error` for that request.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("process id must not be empty")]
    EmptyId,
    #[error("process id {0:?} is already in use")]
    DuplicateId(String),
    #[error("argv must not be empty")]
    EmptyArgv,
    #[error("environment entry {0:?} is not KEY=VALUE")]
    BadEnv(String),
    #[error("cwd {path:?}: {reason}")]
    BadCwd { path: String, reason: String },
    #[error("exec {program:?}: {reason}")]
    Spawn { program: String, reason: String },
    #[error("no process with id {0:?}")]
    Unknown(String),
    #[error("process {0:?} has already exited")]
    Exited(String),
    #[error("signal {0} is not a valid signal number")]
    BadSignal(i32),
    #[error("cannot signal process {id:?}: {reason}")]
    Kill { id: String, reason: String },
    #[error("process {0:?} has no terminal")]
    NoTerminal(String),
    #[error("cannot resize the terminal of process {id:?}: {reason}")]
    Resize { id: String, reason: String },
    #[error("cannot give the process a terminal")]
    Terminal(#[source] crate::pty::PtyError),
    #[error("the {stream:?} stream of process {id:?} is not available (already attached, or stdin was not requested)")]
    StreamTaken { id: String, stream: StreamKind },
}

/// One process started by `Exec`.
#[derive(Debug)]
struct Process {
    pid: i32,
    status: Option<ExitStatus>,
    /// A `Wait` has returned the status at least once.
    waited: bool,
    /// `Wait` calls currently blocked on this process; the entry stays while any are.
    waiters: usize,
    /// Pipe ends held until a stream connection takes them. The pipes hold output written
    /// before the host attaches; when full, the process blocks (intended backpressure).
    stdin: Option<File>,
    stdout: Option<File>,
    stderr: Option<File>,
    /// Second handle to an attached stdin stream, so `CloseStdin` can end it.
    stdin_stream: Option<Connection>,
    /// The pty master of a terminal process, kept for `ResizePty` (its I/O handles are
    /// separate descriptors in `stdin`/`stdout`).
    pty: Option<File>,
}

impl Process {
    /// Retire the entry once nobody can need it: the exit was delivered, no `Wait` is still
    /// blocked, and both output pipes were taken by streams (their threads own them now).
    fn retirable(&self) -> bool {
        self.waited && self.waiters == 0 && self.stdout.is_none() && self.stderr.is_none()
    }
}

/// The table proper; all state transitions are methods here so they can be unit-tested
/// without real processes.
#[derive(Debug, Default)]
struct TableState {
    procs: HashMap<String, Process>,
    /// Live (not yet reaped) pids of registered processes.
    by_pid: HashMap<i32, String>,
    /// Ids whose spawn is in flight. While non-empty the reaper must not reap (module docs).
    spawning: HashSet<String>,
    /// Bumped when a child is registered, to wake a reaper that saw ECHILD.
    spawn_generation: u64,
}

/// The pipes of a freshly spawned process.
#[derive(Debug, Default)]
pub(crate) struct Pipes {
    pub(crate) stdin: Option<File>,
    pub(crate) stdout: Option<File>,
    pub(crate) stderr: Option<File>,
    /// The pty master of a terminal process (see [`crate::pty`]).
    pub(crate) pty: Option<File>,
}

impl TableState {
    fn reserve(&mut self, id: &str) -> Result<(), ProcessError> {
        if id.is_empty() {
            return Err(ProcessError::EmptyId);
        }
        if self.procs.contains_key(id) || self.spawning.contains(id) {
            return Err(ProcessError::DuplicateId(id.to_owned()));
        }
        self.spawning.insert(id.to_owned());
        Ok(())
    }

    fn abandon(&mut self, id: &str) {
        self.spawning.remove(id);
    }

    fn register(&mut self, id: &str, pid: i32, pipes: Pipes) {
        self.spawning.remove(id);
        self.by_pid.insert(pid, id.to_owned());
        self.procs.insert(
            id.to_owned(),
            Process {
                pid,
                status: None,
                waited: false,
                waiters: 0,
                stdin: pipes.stdin,
                stdout: pipes.stdout,
                stderr: pipes.stderr,
                stdin_stream: None,
                pty: pipes.pty,
            },
        );
        self.spawn_generation = self.spawn_generation.wrapping_add(1);
    }

    fn reap_allowed(&self) -> bool {
        self.spawning.is_empty()
    }

    /// Record a reaped child. Returns the process id, or `None` for an orphan.
    fn record_exit(&mut self, pid: i32, status: ExitStatus) -> Option<String> {
        let id = self.by_pid.remove(&pid)?;
        let proc = self.procs.get_mut(&id)?;
        proc.status = Some(status);
        // Nobody can read stdin any more; don't keep the pipe (and its fd) around.
        proc.stdin = None;
        proc.pty = None;
        Some(id)
    }

    fn retire_if_done(&mut self, id: &str) {
        if self.procs.get(id).is_some_and(Process::retirable) {
            self.procs.remove(id);
        }
    }

    fn take_output(&mut self, id: &str, stream: StreamKind) -> Result<File, ProcessError> {
        let proc = self.procs.get_mut(id).ok_or_else(|| ProcessError::Unknown(id.to_owned()))?;
        let pipe = match stream {
            StreamKind::Stdout => proc.stdout.take(),
            StreamKind::Stderr => proc.stderr.take(),
            StreamKind::Stdin => None,
        };
        let pipe = pipe.ok_or_else(|| ProcessError::StreamTaken { id: id.to_owned(), stream })?;
        self.retire_if_done(id);
        Ok(pipe)
    }
}

/// The shared process table plus the reaper that feeds it.
#[derive(Debug, Default)]
pub struct ProcessTable {
    state: Mutex<TableState>,
    /// Signalled on every state change: exits, registrations, gate openings.
    changed: Condvar,
}

/// Any signal the kernel knows, real-time ones included (nix's `Signal` lacks those), or 0.
pub fn check_signal(signal: i32) -> Result<(), ProcessError> {
    if (0..=libc::SIGRTMAX()).contains(&signal) {
        Ok(())
    } else {
        Err(ProcessError::BadSignal(signal))
    }
}

impl ProcessTable {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, TableState> {
        // A panic aborts the agent (panic = "abort"), so a poisoned lock cannot be observed
        // in practice; and the state stays consistent at every unlock anyway.
        self.state.lock_unpoisoned()
    }

    fn wait_changed<'a>(&self, guard: MutexGuard<'a, TableState>) -> MutexGuard<'a, TableState> {
        self.changed.wait_unpoisoned(guard)
    }

    /// Start a process and register it; returns its pid.
    pub fn spawn(&self, req: &ExecRequest) -> Result<i32, ProcessError> {
        let (mut cmd, terminal) = build_command(req)?;
        self.lock().reserve(&req.id)?;
        // The reservation closes the reap gate until we register or abandon below.
        let spawned = cmd.spawn();
        // Our copies of a terminal's slave go with `cmd`: the master sees the hang-up once
        // the process side alone closed it.
        drop(cmd);
        let mut state = self.lock();
        let result = match spawned {
            Ok(mut child) => {
                let pid = child.id() as i32;
                let pipes = match terminal {
                    Some(pipes) => pipes,
                    None => Pipes {
                        stdin: child.stdin.take().map(|p| File::from(OwnedFd::from(p))),
                        stdout: child.stdout.take().map(|p| File::from(OwnedFd::from(p))),
                        stderr: child.stderr.take().map(|p| File::from(OwnedFd::from(p))),
                        pty: None,
                    },
                };
                // Dropping `child` neither waits nor kills: the reaper owns the exit status.
                drop(child);
                state.register(&req.id, pid, pipes);
                info!(id = %req.id, pid, argv = ?req.argv, "process started");
                Ok(pid)
            }
            Err(e) => {
                state.abandon(&req.id);
                let program = req.argv.first().cloned().unwrap_or_default();
                Err(ProcessError::Spawn { program, reason: errno_text(&e) })
            }
        };
        drop(state);
        self.changed.notify_all();
        result
    }

    /// Register a process started by `start` (which must not reap it): the id is reserved
    /// and the reap gate closed while `start` runs, as in [`Self::spawn`]. `start` returns
    /// the child's pid and its pipes; on error it must already have reaped any child it made.
    pub(crate) fn spawn_with<E: From<ProcessError>>(
        &self,
        id: &str,
        start: impl FnOnce() -> Result<(i32, Pipes), E>,
    ) -> Result<i32, E> {
        self.lock().reserve(id)?;
        let started = start();
        let mut state = self.lock();
        let result = match started {
            Ok((pid, pipes)) => {
                state.register(id, pid, pipes);
                Ok(pid)
            }
            Err(e) => {
                state.abandon(id);
                Err(e)
            }
        };
        drop(state);
        self.changed.notify_all();
        result
    }

    /// Block until the process exits and return how it ended.
    pub fn wait(&self, id: &str) -> Result<ExitStatus, ProcessError> {
        let mut state = self.lock();
        let mut registered_as_waiter = false;
        let status = loop {
            let Some(proc) = state.procs.get_mut(id) else {
                return Err(ProcessError::Unknown(id.to_owned()));
            };
            if let Some(status) = proc.status {
                proc.waited = true;
                if registered_as_waiter {
                    proc.waiters -= 1;
                }
                break status;
            }
            if !registered_as_waiter {
                proc.waiters += 1;
                registered_as_waiter = true;
            }
            state = self.wait_changed(state);
        };
        state.retire_if_done(id);
        Ok(status)
    }

    /// Send `signal` (0 only checks that the process is alive).
    pub fn signal(&self, id: &str, signal: i32) -> Result<(), ProcessError> {
        check_signal(signal)?;
        // Held across kill(): the reaper can't reap this pid meanwhile, so it can't be reused.
        let state = self.lock();
        let proc = state.procs.get(id).ok_or_else(|| ProcessError::Unknown(id.to_owned()))?;
        if proc.status.is_some() {
            return Err(ProcessError::Exited(id.to_owned()));
        }
        // SAFETY: kill(2) takes two integers and touches no memory.
        let rc = unsafe { libc::kill(proc.pid, signal) };
        Errno::result(rc).map(drop).map_err(|e| ProcessError::Kill { id: id.to_owned(), reason: e.desc().to_owned() })
    }

    /// Deliver EOF on stdin: drop the pipe, or end an attached stdin stream. Idempotent.
    pub fn close_stdin(&self, id: &str) -> Result<(), ProcessError> {
        let mut state = self.lock();
        let proc = state.procs.get_mut(id).ok_or_else(|| ProcessError::Unknown(id.to_owned()))?;
        if proc.stdin.take().is_some() {
            // No stream ever took stdin. A pipe's EOF comes with the drop above; a terminal
            // stays open, so it gets its EOF character.
            if let Some(master) = &proc.pty {
                if let Err(e) = crate::pty::send_eof(master, false) {
                    debug!(id, error = %e, "cannot send EOF to the terminal");
                }
            }
        }
        if let Some(conn) = proc.stdin_stream.take() {
            // Makes the stream thread's read return 0, so it drops the pipe itself.
            if let Err(e) = conn.shutdown(Shutdown::Read) {
                debug!(id, error = %e, "shutting down the stdin stream failed");
            }
        }
        Ok(())
    }

    /// Set the window size of a terminal process.
    pub fn resize_pty(&self, id: &str, rows: u16, cols: u16) -> Result<(), ProcessError> {
        let state = self.lock();
        let proc = state.procs.get(id).ok_or_else(|| ProcessError::Unknown(id.to_owned()))?;
        if proc.status.is_some() {
            return Err(ProcessError::Exited(id.to_owned()));
        }
        let master = proc.pty.as_ref().ok_or_else(|| ProcessError::NoTerminal(id.to_owned()))?;
        crate::pty::set_window_size(master, rows, cols)
            .map_err(|e| ProcessError::Resize { id: id.to_owned(), reason: e.to_string() })
    }

    /// Hand the stdout or stderr pipe to a stream connection (once per stream).
    pub fn take_output(&self, id: &str, stream: StreamKind) -> Result<File, ProcessError> {
        self.lock().take_output(id, stream)
    }

    /// Hand the stdin pipe to a stream connection; `conn` is kept so `CloseStdin` can end it.
    /// Also returns the pid, to pass back to [`Self::stdin_detached`]. `None`: the process has
    /// exited (its stdin went with it), so the stream is accepted with nothing to feed: a short
    /// command may well end before the host attaches its stdin, and that is no error.
    pub fn take_stdin(&self, id: &str, conn: Connection) -> Result<Option<(File, i32)>, ProcessError> {
        let mut state = self.lock();
        let proc = state.procs.get_mut(id).ok_or_else(|| ProcessError::Unknown(id.to_owned()))?;
        if proc.status.is_some() && proc.stdin.is_none() {
            return Ok(None);
        }
        let pipe = proc
            .stdin
            .take()
            .ok_or_else(|| ProcessError::StreamTaken { id: id.to_owned(), stream: StreamKind::Stdin })?;
        proc.stdin_stream = Some(conn);
        Ok(Some((pipe, proc.pid)))
    }

    /// The stdin stream of process `id` (with `pid`) ended; forget its connection handle.
    /// The pid check matters if the entry was retired and the id reused meanwhile.
    pub fn stdin_detached(&self, id: &str, pid: i32) {
        if let Some(proc) = self.lock().procs.get_mut(id).filter(|p| p.pid == pid) {
            proc.stdin_stream = None;
        }
    }

    /// Pids of registered processes that have not exited yet.
    pub fn live_pids(&self) -> Vec<i32> {
        self.lock().by_pid.keys().copied().collect()
    }

    /// Reap children forever. Run on a dedicated thread; nothing else may call `waitpid`.
    pub fn run_reaper(&self) -> ! {
        loop {
            let generation = self.lock().spawn_generation;
            // Peek only: block until some child is a zombie, without reaping it (module docs).
            match wait_for_zombie() {
                Ok(()) => self.reap_ready(),
                Err(Errno::EINTR) => {}
                Err(Errno::ECHILD) => {
                    // No children at all: sleep until a spawn registers one.
                    let mut state = self.lock();
                    while state.spawn_generation == generation {
                        state = self.wait_changed(state);
                    }
                }
                Err(e) => {
                    warn!(error = %e, "waitid failed");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    /// Reap every zombie child once no spawn is in flight.
    fn reap_ready(&self) {
        let mut state = self.lock();
        while !state.reap_allowed() {
            state = self.wait_changed(state);
        }
        loop {
            let (pid, status) = match reap_one() {
                Ok(Some(reaped)) => reaped,
                Ok(None) | Err(Errno::ECHILD) => break,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    warn!(error = %e, "waitpid failed");
                    break;
                }
            };
            match state.record_exit(pid, status) {
                Some(id) => info!(id, pid, ?status, "process exited"),
                None => debug!(pid, ?status, "reaped an orphan"),
            }
        }
        drop(state);
        self.changed.notify_all();
    }

    /// SIGTERM every live process, give them `grace` to exit, then SIGKILL the rest.
    pub fn terminate_all(&self, grace: Duration) {
        for pid in self.live_pids() {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        let deadline = Instant::now() + grace;
        let mut state = self.lock();
        while !state.by_pid.is_empty() {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            let (next, _) = self.changed.wait_timeout_unpoisoned(state, deadline - now);
            state = next;
        }
        for pid in state.by_pid.keys() {
            let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
        }
    }
}

// Raw libc rather than nix for the wait calls: nix turns a status it cannot express as its
// `Signal` enum (a process killed by a real-time signal) into EINVAL, which would lose the
// exit of a reaped child or spin on an unreapable-looking zombie.

/// Block until some child is a zombie, without reaping it.
fn wait_for_zombie() -> Result<(), Errno> {
    // SAFETY: siginfo_t is plain data, so all-zero is a valid value.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid only writes into `info`, a valid exclusively borrowed siginfo_t.
    let rc = unsafe { libc::waitid(libc::P_ALL, 0, &mut info, libc::WEXITED | libc::WNOWAIT) };
    Errno::result(rc).map(drop)
}

/// Reap one zombie child if there is one.
fn reap_one() -> Result<Option<(i32, ExitStatus)>, Errno> {
    loop {
        let mut raw = 0;
        // SAFETY: waitpid only writes the status into `raw`, a valid local.
        let pid = Errno::result(unsafe { libc::waitpid(-1, &mut raw, libc::WNOHANG) })?;
        if pid == 0 {
            return Ok(None);
        }
        // Without WUNTRACED/WCONTINUED every status is an exit or a death by signal.
        if let Some(status) = decode_wait_status(raw) {
            return Ok(Some((pid, status)));
        }
    }
}

/// Whether any child (reaped or not) is left; used to end the shutdown grace period early.
pub fn has_children() -> bool {
    // SAFETY: as in `wait_for_zombie`.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    let flags = libc::WEXITED | libc::WNOHANG | libc::WNOWAIT;
    // SAFETY: as in `wait_for_zombie`; WNOHANG makes it return at once.
    let rc = unsafe { libc::waitid(libc::P_ALL, 0, &mut info, flags) };
    Errno::result(rc) != Err(Errno::ECHILD)
}

fn decode_wait_status(raw: i32) -> Option<ExitStatus> {
    if libc::WIFEXITED(raw) {
        Some(ExitStatus::Code(libc::WEXITSTATUS(raw)))
    } else if libc::WIFSIGNALED(raw) {
        Some(ExitStatus::Signal(libc::WTERMSIG(raw)))
    } else {
        None
    }
}

/// Validate the request and build the command, before anything is reserved. A terminal
/// process comes with the agent's side of its pty.
fn build_command(req: &ExecRequest) -> Result<(Command, Option<Pipes>), ProcessError> {
    let Some((program, args)) = req.argv.split_first() else {
        return Err(ProcessError::EmptyArgv);
    };
    let cwd = req.cwd.as_deref().unwrap_or("/");
    // std reports a failed chdir with the same errno as a failed exec; check here so the
    // message names the directory rather than the program.
    match std::fs::metadata(cwd) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(ProcessError::BadCwd { path: cwd.to_owned(), reason: "Not a directory".into() }),
        Err(e) => return Err(ProcessError::BadCwd { path: cwd.to_owned(), reason: errno_text(&e) }),
    }
    let mut cmd = Command::new(program);
    cmd.args(args).env_clear().current_dir(Path::new(cwd));
    let mut saw_path = false;
    for entry in &req.env {
        match entry.split_once('=') {
            Some((key, value)) if !key.is_empty() => {
                saw_path |= key == "PATH";
                cmd.env(key, value);
            }
            _ => return Err(ProcessError::BadEnv(entry.clone())),
        }
    }
    if !saw_path {
        // Also what std searches argv[0] in, since the child's PATH is set explicitly.
        cmd.env("PATH", DEFAULT_PATH);
    }
    let Some(size) = req.terminal else {
        cmd.stdin(if req.stdin { Stdio::piped() } else { Stdio::null() }).stdout(Stdio::piped()).stderr(Stdio::piped());
        return Ok((cmd, None));
    };
    let (master, slave) = crate::pty::open_pty(size).map_err(ProcessError::Terminal)?;
    let open_err = |e| ProcessError::Terminal(crate::pty::PtyError::Open(e));
    cmd.stdin(slave.try_clone().map_err(open_err)?).stdout(slave.try_clone().map_err(open_err)?).stderr(slave);
    // SAFETY: `claim_terminal` only makes async-signal-safe system calls, as a closure run
    // between fork and exec must.
    unsafe { cmd.pre_exec(claim_terminal) };
    let pipes = crate::pty::terminal_pipes(master, req.stdin).map_err(open_err)?;
    Ok((cmd, Some(pipes)))
}

/// In the child, before exec: a session of its own whose controlling terminal is the pty on
/// its stdin, so the terminal's ^C, ^Z and hang-up reach it and its job control works.
fn claim_terminal() -> std::io::Result<()> {
    // SAFETY: setsid(2) takes no arguments and touches no memory.
    if unsafe { libc::setsid() } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: TIOCSCTTY takes an integer argument (0: do not steal it from another session).
    if unsafe { libc::ioctl(libc::STDIN_FILENO, libc::TIOCSCTTY, 0) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// "No such file or directory" rather than "No such file or directory (os error 2)".
fn errno_text(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => Errno::from_raw(n).desc().to_owned(),
        None => e.to_string(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn registered(state: &mut TableState, id: &str, pid: i32) {
        state.reserve(id).unwrap();
        let pipes = Pipes {
            stdin: Some(File::open("/dev/null").unwrap()),
            stdout: Some(File::open("/dev/null").unwrap()),
            stderr: Some(File::open("/dev/null").unwrap()),
            pty: None,
        };
        state.register(id, pid, pipes);
    }

    #[test]
    fn wait_statuses_decode_including_realtime_signals() {
        assert_eq!(decode_wait_status(3 << 8), Some(ExitStatus::Code(3)));
        assert_eq!(decode_wait_status(9), Some(ExitStatus::Signal(9)));
        assert_eq!(decode_wait_status(0x80 | 11), Some(ExitStatus::Signal(11))); // core dumped
        assert_eq!(decode_wait_status(40), Some(ExitStatus::Signal(40))); // SIGRTMIN+6
        assert_eq!(decode_wait_status(0x137f), None); // stopped by SIGSTOP
    }

    #[test]
    fn reservation_closes_the_reap_gate_until_registered() {
        let mut state = TableState::default();
        assert!(state.reap_allowed());
        state.reserve("a").unwrap();
        assert!(!state.reap_allowed());
        state.register("a", 100, Pipes::default());
        assert!(state.reap_allowed());
    }

    #[test]
    fn failed_spawn_opens_the_gate_and_frees_the_id() {
        let mut state = TableState::default();
        state.reserve("a").unwrap();
        state.abandon("a");
        assert!(state.reap_allowed());
        state.reserve("a").unwrap();
    }

    #[test]
    fn duplicate_and_empty_ids_are_refused() {
        let mut state = TableState::default();
        state.reserve("a").unwrap();
        assert!(matches!(state.reserve("a"), Err(ProcessError::DuplicateId(_))));
        state.register("a", 1, Pipes::default());
        assert!(matches!(state.reserve("a"), Err(ProcessError::DuplicateId(_))));
        assert!(matches!(state.reserve(""), Err(ProcessError::EmptyId)));
    }

    #[test]
    fn exit_of_a_registered_pid_is_recorded_and_drops_stdin() {
        let mut state = TableState::default();
        registered(&mut state, "a", 42);
        assert_eq!(state.record_exit(42, ExitStatus::Code(3)).as_deref(), Some("a"));
        let proc = &state.procs["a"];
        assert_eq!(proc.status, Some(ExitStatus::Code(3)));
        assert!(proc.stdin.is_none());
        assert!(state.by_pid.is_empty());
    }

    #[test]
    fn exit_of_an_unknown_pid_is_an_orphan_and_not_kept() {
        let mut state = TableState::default();
        registered(&mut state, "a", 42);
        assert_eq!(state.record_exit(7, ExitStatus::Signal(9)), None);
        // A later process that reuses pid 7 must not inherit the orphan's status.
        registered(&mut state, "b", 7);
        assert_eq!(state.procs["b"].status, None);
    }

    #[test]
    fn entry_retires_only_after_wait_and_both_outputs_taken() {
        let mut state = TableState::default();
        registered(&mut state, "a", 42);
        state.record_exit(42, ExitStatus::Code(0));
        state.take_output("a", StreamKind::Stdout).unwrap();
        state.procs.get_mut("a").unwrap().waited = true;
        state.retire_if_done("a");
        assert!(state.procs.contains_key("a"), "stderr still unread");
        state.take_output("a", StreamKind::Stderr).unwrap();
        assert!(!state.procs.contains_key("a"));
    }

    #[test]
    fn entry_with_a_blocked_waiter_is_kept() {
        let mut state = TableState::default();
        registered(&mut state, "a", 42);
        state.take_output("a", StreamKind::Stdout).unwrap();
        state.take_output("a", StreamKind::Stderr).unwrap();
        let proc = state.procs.get_mut("a").unwrap();
        proc.waited = true;
        proc.waiters = 1;
        state.retire_if_done("a");
        assert!(state.procs.contains_key("a"));
    }

    #[test]
    fn output_streams_attach_once() {
        let mut state = TableState::default();
        registered(&mut state, "a", 42);
        state.take_output("a", StreamKind::Stdout).unwrap();
        assert!(matches!(state.take_output("a", StreamKind::Stdout), Err(ProcessError::StreamTaken { .. })));
        assert!(matches!(state.take_output("zz", StreamKind::Stderr), Err(ProcessError::Unknown(_))));
    }

    #[test]
    fn a_terminal_process_gets_a_pty_of_the_size_asked_as_its_controlling_terminal() {
        use std::io::Read;
        let req = ExecRequest {
            id: "t".into(),
            argv: ["sh", "-c", "stty size; echo probe > /dev/tty && echo has-ctty; echo to-stderr >&2"]
                .map(String::from)
                .to_vec(),
            stdin: true,
            terminal: Some(tern_protocol::WindowSize { rows: 31, cols: 97 }),
            ..Default::default()
        };
        let (mut cmd, pipes) = build_command(&req).unwrap();
        let pipes = pipes.unwrap();
        let mut child = cmd.spawn().unwrap();
        drop(cmd);
        assert!(child.wait().unwrap().success());
        // Every slave handle is closed now: the master reads what is left, then EIO.
        let mut out = Vec::new();
        let mut buf = [0u8; 1024];
        let mut master = pipes.stdout.unwrap();
        while let Ok(n @ 1..) = master.read(&mut buf) {
            out.extend_from_slice(&buf[..n]);
        }
        let out = String::from_utf8_lossy(&out);
        assert!(out.contains("31 97\r\n"), "{out:?}");
        assert!(out.contains("probe\r\nhas-ctty\r\nto-stderr\r\n"), "{out:?}");
        // A terminal has one output: the stderr stream is empty.
        let mut err = Vec::new();
        pipes.stderr.unwrap().read_to_end(&mut err).unwrap();
        assert_eq!(err, b"");
        assert!(pipes.stdin.is_some() && pipes.pty.is_some());
    }

    #[test]
    fn bad_requests_are_refused_before_spawning() {
        let req = |argv: &[&str], env: &[&str], cwd: Option<&str>| ExecRequest {
            id: "x".into(),
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: env.iter().map(|s| s.to_string()).collect(),
            cwd: cwd.map(str::to_owned),
            stdin: false,
            terminal: None,
        };
        assert!(matches!(build_command(&req(&[], &[], None)), Err(ProcessError::EmptyArgv)));
        assert!(matches!(build_command(&req(&["true"], &["NOEQUALS"], None)), Err(ProcessError::BadEnv(_))));
        assert!(matches!(build_command(&req(&["true"], &["=v"], None)), Err(ProcessError::BadEnv(_))));
        let err = build_command(&req(&["true"], &[], Some("/nonexistent-dir"))).unwrap_err();
        assert_eq!(err.to_string(), "cwd \"/nonexistent-dir\": No such file or directory");
        assert!(build_command(&req(&["true"], &["A=b=c"], Some("/"))).is_ok());
    }
}
