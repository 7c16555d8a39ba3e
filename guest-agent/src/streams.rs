//! Process stdio over stream connections (`AGENT_STREAM_PORT`).
//!
//! A connection starts with a [`StreamHello`] frame naming a process and one of its streams;
//! the agent answers it ([`Response::Ok`], or [`Response::Error`] saying why the stream is
//! refused), then the connection carries raw bytes. stdout/stderr: the pipe is copied to the
//! connection until the process side reaches EOF, then the connection is closed. stdin: the
//! connection is copied into the pipe until the host half-closes, then the pipe is dropped so
//! the process sees EOF; a process that has already exited gets its stdin stream accepted and
//! closed at once.
//! A broken connection only ends that stream; the agent goes on.

use std::fs::File;
use std::io::{self, ErrorKind, Read, Write};
use std::net::Shutdown;
use tern_protocol::{recv, send, ProtocolError, Response, StreamHello, StreamKind};
use tracing::{debug, warn};

use crate::error_code::CodedError;
use crate::process::{ProcessError, ProcessTable};
use crate::transport::Connection;

/// Copy buffer size: large, so a busy stream costs few syscalls (and vsock packets).
const COPY_BUF_LEN: usize = 64 * 1024;

/// Serve one stream connection to its end.
pub fn handle_stream_connection(table: &ProcessTable, mut conn: Connection) {
    let hello: StreamHello = match recv(&mut conn) {
        Ok(hello) => hello,
        Err(ProtocolError::Closed) => return,
        Err(e) => {
            warn!(error = %e, "bad stream hello; closing the stream");
            return;
        }
    };
    let StreamHello { id, stream } = hello;
    if stream == StreamKind::Stdin {
        let handle = match conn.try_clone() {
            Ok(handle) => handle,
            Err(e) => {
                warn!(id, error = %e, "cannot clone the stdin stream; closing it");
                return;
            }
        };
        let Some(taken) = answer(&mut conn, &id, stream, table.take_stdin(&id, handle)) else { return };
        if let Some((pipe, pid)) = taken {
            let mut received = 0u64;
            match pump_stdin(&mut conn, pipe, &mut received) {
                Ok(()) => debug!(id, received, "stdin stream reached EOF"),
                Err(e) => debug!(id, received, error = %e, "stdin stream ended early"),
            }
            table.stdin_detached(&id, pid);
        } else {
            debug!(id, "stdin stream of a process that has exited; closing it");
        }
        let _ = conn.shutdown(Shutdown::Both);
    } else if let Some(pipe) = answer(&mut conn, &id, stream, table.take_output(&id, stream)) {
        let mut sent = 0u64;
        match pump_output(pipe, &mut conn, &mut sent) {
            Ok(()) => debug!(id, ?stream, sent, "stream reached EOF"),
            Err(e) => debug!(id, ?stream, sent, error = %e, "stream broken; closing it"),
        }
        // Deliver EOF even if the host still holds its end open for reading.
        let _ = conn.shutdown(Shutdown::Both);
    }
}

/// Answer the hello: `Ok` when the stream was handed over, the error (with its code) when it is
/// refused. `None` means the connection ends here: refused, or the host is already gone (a
/// pipe taken for it then closes, as it would had the host attached and gone).
fn answer<T>(conn: &mut Connection, id: &str, stream: StreamKind, taken: Result<T, ProcessError>) -> Option<T> {
    let (reply, taken) = match taken {
        Ok(taken) => (Response::Ok, Some(taken)),
        Err(e) => {
            warn!(id, ?stream, error = %e, "refusing stream");
            (Response::Error { message: tern_protocol::error_chain(&e), code: e.code() }, None)
        }
    };
    if let Err(e) = send(conn, &reply) {
        debug!(id, ?stream, error = %e, "cannot answer the stream hello; closing the stream");
        return None;
    }
    taken
}

/// Copy a process's output pipe to the connection until the pipe reaches EOF; `sent` counts
/// the bytes written to the connection.
fn pump_output(mut pipe: File, conn: &mut Connection, sent: &mut u64) -> io::Result<()> {
    let mut buf = vec![0u8; COPY_BUF_LEN];
    loop {
        let n = match pipe.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        conn.write_all(&buf[..n])?;
        *sent += n as u64;
    }
    // Dropping `pipe` on an error closes the read end: a process still writing gets EPIPE or
    // SIGPIPE, as it would in any pipeline whose reader went away.
}

/// Copy the connection into the stdin pipe until the host half-closes (or the process closed
/// its stdin). The pipe is dropped on return, which is what delivers EOF to the process; a
/// terminal stays open without it, so there the terminal's EOF character is sent instead.
/// `received` counts the bytes written to the pipe.
fn pump_stdin(conn: &mut impl Read, mut pipe: File, received: &mut u64) -> io::Result<()> {
    let mut buf = vec![0u8; COPY_BUF_LEN];
    let mut line_pending = false;
    loop {
        let n = match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        pipe.write_all(&buf[..n])?;
        *received += n as u64;
        line_pending = buf[n - 1] != b'\n';
    }
    if nix::unistd::isatty(&pipe).unwrap_or(false) {
        crate::pty::send_eof(&pipe, line_pending)?;
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn stdin_ends_with_eof_for_a_pipe_and_for_a_terminal() {
        // A pipe: the data, then EOF because the write end is dropped.
        let (rx, tx) = nix::unistd::pipe().unwrap();
        let mut received = 0;
        pump_stdin(&mut &b"to a pipe"[..], File::from(tx), &mut received).unwrap();
        assert_eq!(received, 9);
        let mut got = Vec::new();
        File::from(rx).read_to_end(&mut got).unwrap();
        assert_eq!(got, b"to a pipe");

        // A terminal (our copy of the master is not its last handle): an unfinished line,
        // then EOF as the terminal's reader sees it.
        let pty = nix::pty::openpty(None, None).unwrap();
        let master = File::from(pty.master);
        let mut attrs = nix::sys::termios::tcgetattr(&master).unwrap();
        attrs.local_flags.remove(nix::sys::termios::LocalFlags::ECHO);
        nix::sys::termios::tcsetattr(&master, nix::sys::termios::SetArg::TCSANOW, &attrs).unwrap();
        pump_stdin(&mut &b"line 1\npartial"[..], master.try_clone().unwrap(), &mut 0).unwrap();
        // Canonical reads: "line 1\n", "partial", then 0 (EOF) while the master is still open.
        let got = crate::pty::tests::reads_until_eof(pty.slave);
        assert_eq!(got, [b"line 1\n".to_vec(), b"partial".to_vec(), vec![]]);
        drop(master);
    }
}
