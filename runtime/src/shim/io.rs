//! Process stdio between containerd's FIFOs and the agent's vsock streams, with the FIFO
//! rules Kata learned the hard way:
//!
//! - stdin: the shim opens the FIFO for reading *and* keeps a writer end of its own, so the
//!   reader never sees end-of-file (or an endless HUP) just because containerd's writer has
//!   not arrived yet. Once containerd's writer has delivered data, the shim drops its own
//!   writer: containerd's writer closing is then the EOF (ctr may close it before it can send
//!   `CloseIO`, see `copy_in`). Otherwise EOF reaches the process when containerd asks for it
//!   (`CloseIO`): the shim drops its writer, forwards whatever containerd wrote, and
//!   half-closes the guest stream once containerd's writer is gone too (or has been idle for
//!   [`STDIN_CLOSE_GRACE`] — a writer that lingers after `CloseIO` must not keep stdin open).
//!   `CloseIO` never waits for that: containerd's client closes its writer only after the
//!   `CloseIO` call returns.
//! - stdout/stderr: the shim opens a read end and keeps it until the process is deleted, so
//!   whatever the process writes before containerd opens its side waits in the FIFO instead of
//!   failing with EPIPE, and containerd sees EOF exactly when the process's output ends. A full
//!   FIFO stalls the guest process through the vsock credit (backpressure), it never drops data.
//!   The process's exit is reported, and `Delete` answered, only once its output was read
//!   ([`OutputDrain::wait`]): containerd's client closes its FIFO ends when it deletes the task.
//!
//! Data is copied by one thread per stream, never by polling RPCs. A consumer that stops
//! reading stalls its own copy thread and delays the exit and `Delete` by at most
//! [`OUTPUT_DRAIN_IDLE`] without progress; `Kill` never waits for it, and dropping the
//! [`ProcessIo`] (at `Delete`) releases every copy thread still blocked on a stalled FIFO or on
//! the guest, so none outlives its process.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use tern_protocol::StreamKind;

use crate::agent::{AgentClient, AgentError};

/// Copy buffer per stream.
const COPY_BUF_LEN: usize = 64 * 1024;
/// After `CloseIO`, how long the stdin FIFO may stay empty with containerd's writer still open
/// before the process gets EOF anyway.
pub const STDIN_CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Errors setting up a process's stdio.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    #[error("cannot open the {stream} FIFO {}", path.display())]
    Open {
        stream: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not a FIFO (only FIFO stdio is supported)", .0.display())]
    NotFifo(PathBuf),
    #[error("cannot attach the {0:?} stream of the process")]
    Attach(StreamKind, #[source] AgentError),
    #[error("cannot set up a stdio copy")]
    Setup(#[source] std::io::Error),
    #[error("cannot start a stdio copy thread")]
    Thread(#[source] std::io::Error),
}

/// The stdio paths containerd gave for a process (empty = none).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StdioPaths {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

/// A one-shot signal any number of copy threads can `poll`: the read end of a pipe whose write
/// end the owner drops (the read end then reports POLLHUP forever — no state to reset, no
/// missed wake-up).
#[derive(Debug)]
struct Trigger {
    fire: Option<OwnedFd>,
    watch: Watch,
}

/// The listening side of a [`Trigger`].
#[derive(Debug, Clone)]
struct Watch(Arc<OwnedFd>);

impl Trigger {
    fn new() -> std::io::Result<Trigger> {
        let (rx, tx) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(std::io::Error::from)?;
        Ok(Trigger { fire: Some(tx), watch: Watch(Arc::new(rx)) })
    }

    fn fire(&mut self) {
        self.fire = None;
    }
}

impl Watch {
    fn poll_fd(&self) -> PollFd<'_> {
        PollFd::new(self.0.as_fd(), PollFlags::POLLIN)
    }
}

/// One process's FIFO ends and copy threads. Dropping it closes everything the shim still
/// holds and releases copy threads that are still running (see the module docs).
#[derive(Debug, Default)]
pub struct ProcessIo {
    /// Read end of stdin (non-blocking), handed to its copy thread on [`ProcessIo::connect`].
    stdin_reader: Option<File>,
    /// The shim's own stdin writer (see the module docs); handed to the stdin copy thread,
    /// dropped by [`ProcessIo::close_stdin`] or once containerd's writer has delivered data.
    stdin_keepalive: Option<File>,
    /// Fired by [`ProcessIo::close_stdin`]: the stdin copy forwards what is left, then EOF.
    stdin_close: Option<Trigger>,
    /// A stdin copy thread was started.
    stdin_copying: bool,
    /// Write ends (non-blocking) of stdout/stderr, handed to their copy threads.
    stdout_writer: Option<File>,
    stderr_writer: Option<File>,
    /// Read ends of stdout/stderr held until the process is deleted (shared with
    /// [`OutputDrain`]s, which count the bytes queued in them).
    stdout_keepalive: Option<Arc<File>>,
    stderr_keepalive: Option<Arc<File>>,
    /// Fired on drop: copy threads blocked on a stalled FIFO give up.
    release: Option<Trigger>,
    /// Second handles of the guest streams, shut down on drop so a copy blocked on the guest
    /// side ends too.
    streams: Vec<UnixStream>,
    /// How far each output copy got, for [`ProcessIo::drain`].
    outputs: Vec<Arc<OutputProgress>>,
}

/// How long [`OutputDrain::wait`] waits when no output moves at all: runc's shim gives its
/// copies 2 s at `Delete` as well.
pub const OUTPUT_DRAIN_IDLE: Duration = Duration::from_secs(2);

/// A handle on a process's output copies that waits for them to reach their consumer, held
/// apart from the [`ProcessIo`] (which lives under the shim's state lock).
#[derive(Debug, Clone, Default)]
pub struct OutputDrain {
    /// The shim's read ends of the stdout and stderr FIFOs, to count what is still queued.
    fifos: Vec<Arc<File>>,
    outputs: Vec<Arc<OutputProgress>>,
}

impl OutputDrain {
    /// Wait until the process's output has reached its consumer: until every output copy has
    /// ended and the consumer has emptied the stdout and stderr FIFOs, or until nothing has
    /// moved for `max_idle` (a consumer that stopped reading, none at all, or a child of the
    /// process that keeps its stdout open). The shim waits so before it reports the exit and
    /// again before `Delete` releases the FIFOs: a client acts on the exit at once, and
    /// containerd's client closes its FIFO ends when it deletes the task (ctr closes them as
    /// soon as it has the exit status), so what the copies and the FIFO still held would be
    /// lost. Returns whether everything was delivered, or where it stalled. Blocks: call it
    /// off the async runtime.
    pub fn wait(&self, max_idle: Duration) -> Drained {
        let mut last = None;
        let mut last_move = Instant::now();
        loop {
            let copied: u64 = self.outputs.iter().map(|o| o.copied.load(Ordering::SeqCst)).sum();
            let done = self.outputs.iter().all(|o| o.done.load(Ordering::SeqCst));
            let queued: usize = self.fifos.iter().map(|f| queued_bytes(f)).sum();
            if done && queued == 0 {
                return Drained::All;
            }
            if last != Some((copied, queued)) {
                last = Some((copied, queued));
                last_move = Instant::now();
            } else if last_move.elapsed() >= max_idle {
                return Drained::Stalled { copied, queued, copies_done: done };
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// How [`OutputDrain::wait`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// Every byte the process wrote was read from the FIFOs.
    All,
    /// Nothing moved for the idle bound: `copied` bytes went into the FIFOs, `queued` of them
    /// are still there, and the copies had (not) reached the end of the output.
    Stalled { copied: u64, queued: usize, copies_done: bool },
}

/// What an output copy thread has done so far.
#[derive(Debug, Default)]
struct OutputProgress {
    /// Bytes written to the FIFO (or discarded without one).
    copied: AtomicU64,
    /// The copy ended (guest stream at EOF, failed, or released).
    done: AtomicBool,
}

/// Marks its copy done however the copy thread ends.
struct DoneOnDrop<'a>(&'a OutputProgress);

impl Drop for DoneOnDrop<'_> {
    fn drop(&mut self) {
        self.0.done.store(true, Ordering::SeqCst);
    }
}

/// Bytes queued in a FIFO, read through the shim's own read end.
fn queued_bytes(fifo: &File) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int to `n`; the fd is open for as long as `fifo` lives.
    let rc = unsafe { libc::ioctl(fifo.as_raw_fd(), libc::FIONREAD, &mut n) };
    if rc < 0 {
        0
    } else {
        usize::try_from(n).unwrap_or(0)
    }
}

fn check_fifo(path: &Path, stream: &'static str) -> Result<(), IoError> {
    let meta = std::fs::metadata(path).map_err(|source| IoError::Open { stream, path: path.to_path_buf(), source })?;
    if meta.file_type().is_fifo() {
        Ok(())
    } else {
        Err(IoError::NotFifo(path.to_path_buf()))
    }
}

fn open_end(path: &Path, stream: &'static str, write: bool, nonblock: bool) -> Result<File, IoError> {
    let mut opts = OpenOptions::new();
    if write {
        opts.write(true);
    } else {
        opts.read(true);
    }
    if nonblock {
        opts.custom_flags(libc::O_NONBLOCK);
    }
    opts.open(path).map_err(|source| IoError::Open { stream, path: path.to_path_buf(), source })
}

fn set_nonblocking(file: &File, path: &Path, stream: &'static str) -> Result<(), IoError> {
    let to_io = |e: nix::errno::Errno| IoError::Open { stream, path: path.to_path_buf(), source: e.into() };
    let flags = OFlag::from_bits_truncate(fcntl(file, FcntlArg::F_GETFL).map_err(to_io)?);
    fcntl(file, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).map_err(to_io)?;
    Ok(())
}

/// Open an output FIFO: a read end to keep (non-blocking open never waits), then the write
/// end the copy thread uses (opening it cannot block: a reader exists), made non-blocking so
/// the copy can wait for room *or* for its release.
fn open_output(path: &str, stream: &'static str) -> Result<(Option<File>, Option<Arc<File>>), IoError> {
    if path.is_empty() {
        return Ok((None, None));
    }
    let path = Path::new(path);
    check_fifo(path, stream)?;
    let keepalive = open_end(path, stream, false, true)?;
    let writer = open_end(path, stream, true, false)?;
    set_nonblocking(&writer, path, stream)?;
    Ok((Some(writer), Some(Arc::new(keepalive))))
}

impl ProcessIo {
    /// Open the FIFOs of `paths` as the module docs describe. Never waits for containerd's ends.
    pub fn open(paths: &StdioPaths) -> Result<ProcessIo, IoError> {
        let mut io = ProcessIo::default();
        io.release = Some(Trigger::new().map_err(IoError::Setup)?);
        if !paths.stdin.is_empty() {
            let path = Path::new(&paths.stdin);
            check_fifo(path, "stdin")?;
            io.stdin_reader = Some(open_end(path, "stdin", false, true)?);
            io.stdin_keepalive = Some(open_end(path, "stdin", true, true)?);
            io.stdin_close = Some(Trigger::new().map_err(IoError::Setup)?);
        }
        (io.stdout_writer, io.stdout_keepalive) = open_output(&paths.stdout, "stdout")?;
        (io.stderr_writer, io.stderr_keepalive) = open_output(&paths.stderr, "stderr")?;
        Ok(io)
    }

    /// Whether the process gets a stdin stream.
    pub fn has_stdin(&self) -> bool {
        self.stdin_reader.is_some()
    }

    /// Attach the process's streams in the guest and start copying. Call once, after the
    /// process started; a stream without a FIFO is attached anyway and drained, so the
    /// process never blocks on a full pipe nobody reads.
    pub fn connect(&mut self, agent: &AgentClient, id: &str) -> Result<(), IoError> {
        let attach = |kind| agent.attach(id, kind).map_err(|e| IoError::Attach(kind, e));
        let stdout = attach(StreamKind::Stdout)?;
        let stderr = attach(StreamKind::Stderr)?;
        let stdin = if self.stdin_reader.is_some() { Some(attach(StreamKind::Stdin)?) } else { None };
        self.start_copies(id, stdout, stderr, stdin)
    }

    /// Start the copy threads on already attached guest streams.
    fn start_copies(
        &mut self,
        id: &str,
        stdout: UnixStream,
        stderr: UnixStream,
        stdin: Option<UnixStream>,
    ) -> Result<(), IoError> {
        let release = match &self.release {
            Some(t) => t.watch.clone(),
            None => {
                let t = Trigger::new().map_err(IoError::Setup)?;
                let watch = t.watch.clone();
                self.release = Some(t);
                watch
            }
        };
        for (kind, stream, writer) in [
            (StreamKind::Stdout, stdout, self.stdout_writer.take()),
            (StreamKind::Stderr, stderr, self.stderr_writer.take()),
        ] {
            self.streams.push(stream.try_clone().map_err(IoError::Setup)?);
            let release = release.clone();
            let progress = Arc::new(OutputProgress::default());
            self.outputs.push(progress.clone());
            spawn_copy(format!("{kind:?}-{id}"), move || copy_out(stream, writer, &release, &progress))?;
        }
        if let (Some(stream), Some(reader)) = (stdin, self.stdin_reader.take()) {
            self.streams.push(stream.try_clone().map_err(IoError::Setup)?);
            let close = match &self.stdin_close {
                Some(t) => t.watch.clone(),
                None => {
                    let t = Trigger::new().map_err(IoError::Setup)?;
                    let watch = t.watch.clone();
                    self.stdin_close = Some(t);
                    watch
                }
            };
            let keepalive = self.stdin_keepalive.take();
            spawn_copy(format!("stdin-{id}"), move || copy_in(reader, keepalive, stream, &close, &release))?;
            self.stdin_copying = true;
        }
        Ok(())
    }

    /// A handle that waits for the output copies started so far (see [`OutputDrain::wait`]).
    pub fn output_drain(&self) -> OutputDrain {
        let fifos = [&self.stdout_keepalive, &self.stderr_keepalive].into_iter().flatten().cloned().collect();
        OutputDrain { fifos, outputs: self.outputs.clone() }
    }

    /// Let stdin reach EOF (`CloseIO`): drop the shim's writer and tell the stdin copy to
    /// finish once containerd's data is forwarded. Idempotent; never waits. Returns whether
    /// the shim delivers that EOF itself (a stdin FIFO exists); if not, only the agent can.
    pub fn close_stdin(&mut self) -> bool {
        self.stdin_keepalive = None;
        if let Some(t) = self.stdin_close.as_mut() {
            t.fire();
        }
        self.stdin_copying || self.stdin_reader.is_some()
    }
}

impl Drop for ProcessIo {
    fn drop(&mut self) {
        if let Some(t) = self.release.as_mut() {
            t.fire();
        }
        for stream in &self.streams {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
}

fn spawn_copy(name: String, f: impl FnOnce() + Send + 'static) -> Result<(), IoError> {
    // Detached: a copy ends with its stream or its release; nothing ever joins it.
    std::thread::Builder::new().name(name).spawn(f).map(drop).map_err(IoError::Thread)
}

/// Why a FIFO write stopped.
enum WriteStop {
    /// The process was deleted while the FIFO was full.
    Released,
    Failed(std::io::Error),
}

/// Write all of `data` to a non-blocking FIFO, waiting for room or for `release`.
fn write_fifo(fifo: &mut File, mut data: &[u8], release: &Watch) -> Result<(), WriteStop> {
    while !data.is_empty() {
        match fifo.write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                let mut fds = [PollFd::new(fifo.as_fd(), PollFlags::POLLOUT), release.poll_fd()];
                match poll(&mut fds, PollTimeout::NONE) {
                    Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                    Err(e) => return Err(WriteStop::Failed(e.into())),
                }
                if fds[1].any().unwrap_or(false) {
                    return Err(WriteStop::Released);
                }
            }
            Err(e) => return Err(WriteStop::Failed(e)),
        }
    }
    Ok(())
}

/// Guest output stream → FIFO (or nowhere), then close the FIFO writer: containerd's EOF.
fn copy_out(mut from: UnixStream, mut to: Option<File>, release: &Watch, progress: &OutputProgress) {
    let _done = DoneOnDrop(progress);
    let mut buf = vec![0u8; COPY_BUF_LEN];
    // Bytes read from the guest stream, for the logs: where output stops is where to look.
    let mut copied = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => {
                tracing::debug!(copied, "output stream reached EOF");
                break;
            }
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::debug!(copied, error = %e, "output stream ended");
                break;
            }
        };
        copied += n as u64;
        if let Some(fifo) = to.as_mut() {
            match write_fifo(fifo, &buf[..n], release) {
                Ok(()) => {
                    progress.copied.fetch_add(n as u64, Ordering::SeqCst);
                }
                Err(WriteStop::Released) => {
                    tracing::debug!(copied, "process deleted while its output FIFO was full; dropping the rest");
                    return;
                }
                Err(WriteStop::Failed(e)) => {
                    // Keep draining the stream so the process never blocks on a dead consumer.
                    tracing::warn!(error = %e, "cannot write to the output FIFO; discarding the rest");
                    to = None;
                }
            }
        }
    }
}

/// stdin FIFO (non-blocking) → guest stream, then half-close so the process reads EOF. Ends
/// at EOF of the FIFO, after [`STDIN_CLOSE_GRACE`] of silence once `close` fired, or at
/// `release` (then the stream is shut down by the owner anyway).
///
/// `keepalive` is the shim's own writer end. It is dropped when `close` fires *or* as soon as
/// containerd's writer has delivered data: from then on containerd's writer going away is the
/// end of the input, as with runc. ctr arms its `CloseIO` only after the task is created, so
/// input small enough to fit the FIFO (≤ 64 KiB) is written and its writer closed before any
/// `CloseIO` can come — holding the keepalive past that point would leave the process waiting
/// for an EOF nobody sends.
fn copy_in(mut from: File, mut keepalive: Option<File>, mut to: UnixStream, close: &Watch, release: &Watch) {
    let mut buf = vec![0u8; COPY_BUF_LEN];
    let mut closing = false;
    let grace = PollTimeout::try_from(STDIN_CLOSE_GRACE).unwrap_or(PollTimeout::MAX);
    // Bytes forwarded to the guest, for the logs.
    let mut copied = 0u64;
    'copy: loop {
        let (ready, from_ready, released, close_fired) = {
            let mut fds = [PollFd::new(from.as_fd(), PollFlags::POLLIN), release.poll_fd(), close.poll_fd()];
            let watched = if closing { 2 } else { 3 };
            let timeout = if closing { grace } else { PollTimeout::NONE };
            match poll(&mut fds[..watched], timeout) {
                Ok(ready) => {
                    let any = |i: usize| fds.get(i).and_then(PollFd::any).unwrap_or(false);
                    (ready, any(0), any(1), watched == 3 && any(2))
                }
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    tracing::debug!(error = %e, "polling the stdin FIFO failed");
                    break;
                }
            }
        };
        if released {
            tracing::debug!(copied, "stdin: process deleted; its copy ends");
            return;
        }
        if close_fired {
            closing = true;
            keepalive = None;
        }
        if ready == 0 {
            // Only possible while closing: containerd's writer lingers with nothing to send.
            tracing::debug!(copied, "stdin: containerd's writer stayed silent after CloseIO; ending stdin");
            break;
        }
        if !(from_ready || closing) {
            continue;
        }
        loop {
            match from.read(&mut buf) {
                Ok(0) => {
                    tracing::debug!(copied, "stdin FIFO reached EOF");
                    break 'copy;
                }
                Ok(n) => {
                    if keepalive.take().is_some() {
                        tracing::debug!("stdin: containerd's writer delivered data; its close is now EOF");
                    }
                    if let Err(e) = to.write_all(&buf[..n]) {
                        tracing::debug!(copied, error = %e, "stdin stream ended");
                        return;
                    }
                    copied += n as u64;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::debug!(error = %e, "stdin FIFO read failed");
                    break 'copy;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn fifo(dir: &Path, name: &str) -> String {
        let path = dir.join(name);
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        path.to_string_lossy().into_owned()
    }

    fn set_blocking(f: &File) {
        let flags = OFlag::from_bits_truncate(fcntl(f, FcntlArg::F_GETFL).unwrap());
        fcntl(f, FcntlArg::F_SETFL(flags - OFlag::O_NONBLOCK)).unwrap();
    }

    /// Open a FIFO for reading the way containerd does (never blocking the open), then read it
    /// blocking.
    fn open_reader(path: &str) -> File {
        let f = OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path).unwrap();
        set_blocking(&f);
        f
    }

    /// Deterministic, non-periodic test data.
    fn pattern(len: usize) -> Vec<u8> {
        let mut x: u32 = 0x9e37_79b9;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect()
    }

    /// Read `f` to EOF on a thread; `None` if that takes longer than `limit`.
    fn read_to_end_within(mut f: File, limit: Duration) -> Option<Vec<u8>> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut got = Vec::new();
            let _ = f.read_to_end(&mut got);
            let _ = tx.send(got);
        });
        rx.recv_timeout(limit).ok()
    }

    #[test]
    fn output_written_before_the_reader_opens_is_kept() {
        let d = tempfile::tempdir().unwrap();
        let paths = StdioPaths { stdout: fifo(d.path(), "out"), ..Default::default() };
        let mut io = ProcessIo::open(&paths).unwrap();
        // Nobody but the shim has the FIFO open for reading, yet the write succeeds.
        let mut writer = io.stdout_writer.take().unwrap();
        writer.write_all(b"early").unwrap();
        drop(writer);
        // containerd opens late and still reads everything, then EOF.
        let mut late = OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(&paths.stdout).unwrap();
        let mut got = Vec::new();
        late.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"early");
    }

    #[test]
    fn a_late_reader_gets_every_byte_then_eof() {
        let d = tempfile::tempdir().unwrap();
        let paths = StdioPaths { stdout: fifo(d.path(), "out"), stderr: fifo(d.path(), "err"), ..Default::default() };
        let mut io = ProcessIo::open(&paths).unwrap();
        let (guest_out, shim_out) = UnixStream::pair().unwrap();
        let (guest_err, shim_err) = UnixStream::pair().unwrap();
        io.start_copies("late", shim_out, shim_err, None).unwrap();
        drop(guest_err);
        // The "process" writes far more than the FIFO and socket buffers hold...
        let data = pattern(8 << 20);
        let expected = data.clone();
        let writer = std::thread::spawn(move || {
            let mut guest_out = guest_out;
            guest_out.write_all(&data).unwrap();
        });
        // ...and blocks (backpressure) until containerd's side opens, late.
        std::thread::sleep(Duration::from_millis(300));
        assert!(!writer.is_finished(), "8 MiB cannot have fit in the buffers: was output dropped?");
        let got = read_to_end_within(open_reader(&paths.stdout), Duration::from_secs(30)).expect("no EOF");
        writer.join().unwrap();
        assert!(got == expected, "got {} bytes, wanted {} identical ones", got.len(), expected.len());
        let err = read_to_end_within(open_reader(&paths.stderr), Duration::from_secs(10)).expect("no EOF");
        assert!(err.is_empty());
    }

    #[test]
    fn the_drain_waits_for_a_slow_reader_to_take_the_last_byte() {
        let d = tempfile::tempdir().unwrap();
        let paths = StdioPaths { stdout: fifo(d.path(), "out"), stderr: fifo(d.path(), "err"), ..Default::default() };
        let mut io = ProcessIo::open(&paths).unwrap();
        let (mut guest_out, shim_out) = UnixStream::pair().unwrap();
        let (guest_err, shim_err) = UnixStream::pair().unwrap();
        io.start_copies("slow", shim_out, shim_err, None).unwrap();
        drop(guest_err);
        let data = pattern(1 << 20);
        let mut reader = open_reader(&paths.stdout);
        set_blocking(&reader);
        // The process wrote everything and exited; the consumer has read nothing yet.
        let expected = data.clone();
        let writer = std::thread::spawn(move || {
            guest_out.write_all(&data).unwrap();
        });
        let slow = std::thread::spawn(move || {
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            std::thread::sleep(Duration::from_millis(200));
            loop {
                match reader.read(&mut buf) {
                    Ok(0) | Err(_) => return got,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        });
        // The exit (or a Delete) comes at once: the drain holds it until the reader took every byte.
        assert_eq!(io.output_drain().wait(Duration::from_secs(5)), Drained::All, "gave up while the reader still read");
        writer.join().unwrap();
        drop(io);
        let got = slow.join().unwrap();
        assert!(got == expected, "got {} of {} bytes", got.len(), expected.len());

        // A reader that never reads: the drain gives up after the idle bound, not later.
        let paths = StdioPaths { stdout: fifo(d.path(), "out2"), ..Default::default() };
        let mut io = ProcessIo::open(&paths).unwrap();
        let (mut guest_out, shim_out) = UnixStream::pair().unwrap();
        let (_guest_err, shim_err) = UnixStream::pair().unwrap();
        io.start_copies("stalled", shim_out, shim_err, None).unwrap();
        let _stalled = open_reader(&paths.stdout);
        guest_out.write_all(b"never read").unwrap();
        let start = Instant::now();
        assert!(matches!(
            io.output_drain().wait(Duration::from_millis(300)),
            Drained::Stalled { queued: 10, copies_done: false, .. }
        ));
        assert!(start.elapsed() < Duration::from_secs(3), "{:?}", start.elapsed());
    }

    #[test]
    fn a_stalled_reader_does_not_pin_the_copy_after_delete() {
        let d = tempfile::tempdir().unwrap();
        let paths = StdioPaths { stdout: fifo(d.path(), "out"), ..Default::default() };
        let mut io = ProcessIo::open(&paths).unwrap();
        let (guest_out, shim_out) = UnixStream::pair().unwrap();
        let (_guest_err, shim_err) = UnixStream::pair().unwrap();
        io.start_copies("stall", shim_out, shim_err, None).unwrap();
        let stalled = open_reader(&paths.stdout);
        let data = pattern(4 << 20);
        let expected = data.clone();
        let writer = std::thread::spawn(move || {
            let mut guest_out = guest_out;
            // Fails once the shim shuts the stream down at delete.
            let _ = guest_out.write_all(&data);
        });
        std::thread::sleep(Duration::from_millis(300));
        assert!(!writer.is_finished());
        // Delete: the copy thread must let go of the FIFO and of the stream although the reader
        // never read a byte.
        let start = Instant::now();
        drop(io);
        let got = read_to_end_within(stalled, Duration::from_secs(10)).expect("the copy thread still holds the FIFO");
        assert!(start.elapsed() < Duration::from_secs(10));
        assert!(!got.is_empty() && got.len() < expected.len(), "got {} bytes", got.len());
        assert!(expected.starts_with(&got), "what was written before delete must arrive intact");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !writer.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(writer.is_finished(), "the guest side is still blocked after delete");
    }

    /// The stdin FIFO with the copy running, the guest end of its stream and containerd's writer.
    fn stdin_setup(d: &Path) -> (ProcessIo, UnixStream, File, (UnixStream, UnixStream)) {
        let paths = StdioPaths { stdin: fifo(d, "in"), ..Default::default() };
        let mut io = ProcessIo::open(&paths).unwrap();
        let containerd = OpenOptions::new().write(true).open(&paths.stdin).unwrap();
        let (guest_in, shim_in) = UnixStream::pair().unwrap();
        let (out_a, out_b) = UnixStream::pair().unwrap();
        let (err_a, err_b) = UnixStream::pair().unwrap();
        io.start_copies("in", out_b, err_b, Some(shim_in)).unwrap();
        (io, guest_in, containerd, (out_a, err_a))
    }

    fn read_stream_within(mut s: UnixStream, limit: Duration) -> Option<Vec<u8>> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut got = Vec::new();
            let _ = s.read_to_end(&mut got);
            let _ = tx.send(got);
        });
        rx.recv_timeout(limit).ok()
    }

    #[test]
    fn close_io_before_containerd_closes_its_writer_loses_nothing() {
        let d = tempfile::tempdir().unwrap();
        let (mut io, guest_in, mut containerd, _out) = stdin_setup(d.path());
        let data = pattern(1 << 20);
        let reader = {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let _ = tx.send(read_stream_within(guest_in, Duration::from_secs(30)));
            });
            rx
        };
        containerd.write_all(&data).unwrap();
        // containerd's order: CloseIO first, then its writer closes.
        assert!(io.close_stdin());
        std::thread::sleep(Duration::from_millis(100));
        drop(containerd);
        let got = reader.recv().unwrap().expect("the guest never saw EOF");
        assert!(got == data, "got {} of {} bytes", got.len(), data.len());
    }

    #[test]
    fn small_input_whose_writer_closes_before_close_io_still_ends_in_eof() {
        // ctr's order for input that fits the FIFO: write, close its writer, no CloseIO yet.
        let d = tempfile::tempdir().unwrap();
        let (_io, guest_in, mut containerd, _out) = stdin_setup(d.path());
        let data = pattern(4096);
        containerd.write_all(&data).unwrap();
        drop(containerd);
        let got = read_stream_within(guest_in, Duration::from_secs(10)).expect("the guest never saw EOF");
        assert!(got == data, "got {} of {} bytes", got.len(), data.len());
    }

    #[test]
    fn stdin_stays_open_until_close_io_and_a_lingering_writer_cannot_hold_it() {
        let d = tempfile::tempdir().unwrap();
        let (mut io, guest_in, containerd, _out) = stdin_setup(d.path());
        drop(containerd);
        // containerd's writer went away without sending anything: the shim's writer keeps the
        // process from seeing EOF...
        guest_in.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        let mut guest = guest_in;
        let mut byte = [0u8; 2];
        let kind = guest.read(&mut byte).unwrap_err().kind();
        assert!(matches!(kind, ErrorKind::WouldBlock | ErrorKind::TimedOut), "{kind:?}");
        // ...until CloseIO; a writer that reopened and lingers delays EOF only by the grace.
        let lingering = OpenOptions::new().write(true).open(d.path().join("in")).unwrap();
        let start = Instant::now();
        io.close_stdin();
        guest.set_read_timeout(None).unwrap();
        let rest = read_stream_within(guest, STDIN_CLOSE_GRACE * 5).expect("no EOF despite CloseIO");
        assert!(rest.is_empty());
        assert!(start.elapsed() >= STDIN_CLOSE_GRACE / 2, "EOF came before the grace: {:?}", start.elapsed());
        drop(lingering);
    }

    #[test]
    fn a_regular_file_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("f");
        std::fs::write(&file, b"").unwrap();
        let paths = StdioPaths { stdout: file.to_string_lossy().into_owned(), ..Default::default() };
        assert!(matches!(ProcessIo::open(&paths), Err(IoError::NotFifo(_))));
    }
}
