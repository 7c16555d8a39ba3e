//! Process stdio between containerd's FIFOs and the agent's vsock streams, with the FIFO
//! rules Kata learned the hard way:
//!
//! - stdin: the shim opens the FIFO for reading *and* keeps a writer end of its own, so the
//!   reader never sees end-of-file (or an endless HUP) just because containerd's writer went
//!   away or has not arrived yet. EOF reaches the process when containerd asks for it
//!   (`CloseIO`): then the shim drops its writer and the reader ends once containerd's is
//!   gone too.
//! - stdout/stderr: the shim opens a read end and keeps it until the process is deleted, so
//!   whatever the process writes before containerd opens its side waits in the FIFO instead of
//!   failing with EPIPE, and containerd sees EOF exactly when the process's output ends.
//!
//! Data is copied by one thread per stream, never by polling RPCs; a consumer that stops
//! reading only stalls its own copy thread, never an RPC.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use tern_protocol::StreamKind;

use crate::agent::{AgentClient, AgentError};

/// Copy buffer per stream.
const COPY_BUF_LEN: usize = 64 * 1024;

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

/// One process's FIFO ends. Dropping it closes everything the shim still holds.
#[derive(Debug, Default)]
pub struct ProcessIo {
    /// Read end of stdin, handed to its copy thread on [`ProcessIo::connect`].
    stdin_reader: Option<File>,
    /// The shim's own stdin writer (see the module docs); dropped by [`ProcessIo::close_stdin`].
    stdin_keepalive: Option<File>,
    /// Write ends of stdout/stderr, handed to their copy threads.
    stdout_writer: Option<File>,
    stderr_writer: Option<File>,
    /// Read ends of stdout/stderr held until the process is deleted.
    stdout_keepalive: Option<File>,
    stderr_keepalive: Option<File>,
}

fn check_fifo(path: &Path, stream: &'static str) -> Result<(), IoError> {
    let meta =
        std::fs::metadata(path).map_err(|source| IoError::Open { stream, path: path.to_path_buf(), source })?;
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

fn set_blocking(file: &File, path: &Path, stream: &'static str) -> Result<(), IoError> {
    let to_io = |e: nix::errno::Errno| IoError::Open { stream, path: path.to_path_buf(), source: e.into() };
    let flags = OFlag::from_bits_truncate(fcntl(file, FcntlArg::F_GETFL).map_err(to_io)?);
    fcntl(file, FcntlArg::F_SETFL(flags - OFlag::O_NONBLOCK)).map_err(to_io)?;
    Ok(())
}

/// Open an output FIFO: a read end to keep (non-blocking open never waits), then the write
/// end the copy thread uses (opening it cannot block: a reader exists).
fn open_output(path: &str, stream: &'static str) -> Result<(Option<File>, Option<File>), IoError> {
    if path.is_empty() {
        return Ok((None, None));
    }
    let path = Path::new(path);
    check_fifo(path, stream)?;
    let keepalive = open_end(path, stream, false, true)?;
    let writer = open_end(path, stream, true, false)?;
    Ok((Some(writer), Some(keepalive)))
}

impl ProcessIo {
    /// Open the FIFOs of `paths` as the module docs describe. Blocking, but never waits for
    /// containerd's ends.
    pub fn open(paths: &StdioPaths) -> Result<ProcessIo, IoError> {
        let mut io = ProcessIo::default();
        if !paths.stdin.is_empty() {
            let path = Path::new(&paths.stdin);
            check_fifo(path, "stdin")?;
            let reader = open_end(path, "stdin", false, true)?;
            io.stdin_keepalive = Some(open_end(path, "stdin", true, true)?);
            set_blocking(&reader, path, "stdin")?;
            io.stdin_reader = Some(reader);
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
        for (kind, writer) in
            [(StreamKind::Stdout, self.stdout_writer.take()), (StreamKind::Stderr, self.stderr_writer.take())]
        {
            let stream = agent.attach(id, kind).map_err(|e| IoError::Attach(kind, e))?;
            spawn_copy(format!("{kind:?}-{id}"), move || copy_out(stream, writer))?;
        }
        if let Some(reader) = self.stdin_reader.take() {
            let stream = agent.attach(id, StreamKind::Stdin).map_err(|e| IoError::Attach(StreamKind::Stdin, e))?;
            spawn_copy(format!("stdin-{id}"), move || copy_in(reader, stream))?;
        }
        Ok(())
    }

    /// Let stdin reach EOF once containerd's writer is closed (`CloseIO`). Idempotent.
    pub fn close_stdin(&mut self) {
        self.stdin_keepalive = None;
    }
}

fn spawn_copy(name: String, f: impl FnOnce() + Send + 'static) -> Result<(), IoError> {
    // Detached: a copy ends with its stream; nothing must ever wait for a stalled consumer.
    std::thread::Builder::new().name(name).spawn(f).map(drop).map_err(IoError::Thread)
}

/// Guest output stream → FIFO (or nowhere), then close the FIFO writer: containerd's EOF.
fn copy_out(mut from: UnixStream, mut to: Option<File>) {
    let mut buf = vec![0u8; COPY_BUF_LEN];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::debug!(error = %e, "output stream ended");
                break;
            }
        };
        if let Some(fifo) = to.as_mut() {
            if let Err(e) = fifo.write_all(&buf[..n]) {
                tracing::warn!(error = %e, "cannot write to the output FIFO; discarding the rest");
                to = None;
            }
        }
    }
}

/// stdin FIFO → guest stream, then half-close so the process reads EOF.
fn copy_in(mut from: File, mut to: UnixStream) {
    let mut buf = vec![0u8; COPY_BUF_LEN];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::debug!(error = %e, "stdin FIFO read failed");
                break;
            }
        };
        if let Err(e) = to.write_all(&buf[..n]) {
            tracing::debug!(error = %e, "stdin stream ended");
            return;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn fifo(dir: &Path, name: &str) -> String {
        let path = dir.join(name);
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        path.to_string_lossy().into_owned()
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
    fn stdin_reader_sees_no_eof_until_close_stdin() {
        let d = tempfile::tempdir().unwrap();
        let paths = StdioPaths { stdin: fifo(d.path(), "in"), ..Default::default() };
        let mut io = ProcessIo::open(&paths).unwrap();
        let mut containerd = OpenOptions::new().write(true).open(&paths.stdin).unwrap();
        containerd.write_all(b"x").unwrap();
        drop(containerd);
        let mut reader = io.stdin_reader.take().unwrap();
        let mut byte = [0u8; 1];
        assert_eq!(reader.read(&mut byte).unwrap(), 1);
        // containerd's writer is gone, but ours keeps the reader from seeing EOF...
        set_nonblocking_for_test(&reader);
        assert_eq!(reader.read(&mut byte).unwrap_err().kind(), ErrorKind::WouldBlock);
        // ...until CloseIO.
        io.close_stdin();
        assert_eq!(reader.read(&mut byte).unwrap(), 0);
    }

    fn set_nonblocking_for_test(f: &File) {
        let flags = OFlag::from_bits_truncate(fcntl(f, FcntlArg::F_GETFL).unwrap());
        fcntl(f, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).unwrap();
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
