//! Terminal processes. A container's pty master comes back from libcontainer over a console
//! socket (runc's `--console-socket` protocol: the container creates the pty from its own
//! devpts, makes the slave its controlling terminal and stdio, and sends the master with
//! `SCM_RIGHTS`); a plain `Exec` with `terminal` (`tern run -t`) gets one the agent opens
//! itself ([`open_pty`]). Either way the agent keeps the master: its output travels on the
//! process's stdout stream (a tty has no separate stderr), stdin is written into it, and
//! `ResizePty` is a `TIOCSWINSZ` on it.

use std::fs::File;
use std::io::{ErrorKind, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixAddr};
use tern_protocol::WindowSize;

use crate::process::Pipes;

/// How long the container gets to send its pty master after it was built.
pub const MASTER_TIMEOUT: Duration = Duration::from_secs(20);

/// Errors setting up or driving a pty.
#[derive(Debug, thiserror::Error)]
pub enum PtyError {
    #[error("cannot create the console socket {}", path.display())]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the container did not send its pty master within {0:?}")]
    Timeout(Duration),
    #[error("receiving the pty master failed")]
    Receive(#[source] std::io::Error),
    #[error("the console socket message carried no file descriptor")]
    NoFd,
    #[error("cannot set the window size")]
    Resize(#[source] Errno),
    #[error("cannot open a pty")]
    Open(#[source] std::io::Error),
}

/// A new pty of `size` (left at the kernel's 0x0 when `size` is 0x0): its master and its
/// slave, both close-on-exec from the start, so a process spawned meanwhile by another
/// thread holds neither (a stray slave would keep the master from seeing the hang-up).
pub fn open_pty(size: WindowSize) -> Result<(File, File), PtyError> {
    use nix::fcntl::OFlag;
    use nix::pty::{grantpt, posix_openpt, unlockpt};
    let open_err = |e: Errno| PtyError::Open(e.into());
    let master = posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC).map_err(open_err)?;
    grantpt(&master).map_err(open_err)?;
    unlockpt(&master).map_err(open_err)?;
    let name = nix::pty::ptsname_r(&master).map_err(open_err)?;
    // O_NOCTTY: the agent must not become the terminal's session; the child claims it.
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(&name)
        .map_err(PtyError::Open)?;
    let master = File::from(OwnedFd::from(master));
    if size != WindowSize::default() {
        set_window_size(&master, size.rows, size.cols)?;
    }
    Ok((master, slave))
}

/// A listening console socket; removed from the file system on drop.
#[derive(Debug)]
pub struct ConsoleSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl ConsoleSocket {
    /// Listen at `path` (a stale socket file there is replaced).
    pub fn bind(path: &Path) -> Result<ConsoleSocket, PtyError> {
        let bind_err = |source| PtyError::Bind { path: path.to_path_buf(), source };
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(bind_err(e)),
        }
        let listener = UnixListener::bind(path).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        Ok(ConsoleSocket { listener, path: path.to_path_buf() })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accept the container's connection and receive the pty master from it.
    pub fn receive_master(&self, timeout: Duration) -> Result<File, PtyError> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match self.listener.accept() {
                Ok((stream, _)) => break stream,
                Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {
                    if Instant::now() >= deadline {
                        return Err(PtyError::Timeout(timeout));
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(PtyError::Receive(e)),
            }
        };
        // The connection was made by libcontainer in the parent, before the container sent
        // anything: wait for the message itself with a bounded read.
        let remaining = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        stream.set_nonblocking(false).map_err(PtyError::Receive)?;
        stream.set_read_timeout(Some(remaining)).map_err(PtyError::Receive)?;
        receive_fd(&stream)
    }
}

impl Drop for ConsoleSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Receive one message with one `SCM_RIGHTS` fd.
fn receive_fd(stream: &UnixStream) -> Result<File, PtyError> {
    let mut name = [0u8; 256];
    let mut iov = [IoSliceMut::new(&mut name)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let msg = loop {
        match recvmsg::<UnixAddr>(stream.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC) {
            Ok(msg) => break msg,
            Err(Errno::EINTR) => continue,
            Err(Errno::EAGAIN) => return Err(PtyError::Timeout(MASTER_TIMEOUT)),
            Err(e) => return Err(PtyError::Receive(e.into())),
        }
    };
    let mut received: Vec<RawFd> = Vec::new();
    for cmsg in msg.cmsgs().map_err(|e| PtyError::Receive(e.into()))? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            received.extend(fds);
        }
    }
    let mut fds = received.into_iter().map(|fd| {
        // SAFETY: the kernel just installed this descriptor in our table for us (SCM_RIGHTS);
        // nothing else owns it.
        unsafe { OwnedFd::from_raw_fd(fd) }
    });
    let master = fds.next().ok_or(PtyError::NoFd)?;
    // Any extra descriptors are closed as `fds` drops.
    Ok(File::from(master))
}

/// The pipes of a terminal process: the master carries output (as stdout) and input. A
/// terminal has no separate stderr; its stderr stream is an empty one (a pipe whose writer
/// is already closed), so a host that attaches all three streams just sees EOF there.
pub(crate) fn terminal_pipes(master: File, stdin: bool) -> std::io::Result<Pipes> {
    let input = if stdin { Some(master.try_clone()?) } else { None };
    let output = master.try_clone()?;
    let (empty, writer) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    drop(writer);
    Ok(Pipes { stdin: input, stdout: Some(output), stderr: Some(File::from(empty)), pty: Some(master) })
}

/// Set the window size of the terminal whose master is `master`; the kernel sends SIGWINCH
/// to the terminal's foreground process group.
pub fn set_window_size(master: &File, rows: u16, cols: u16) -> Result<(), PtyError> {
    let size = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCSWINSZ reads one `winsize` from the pointer, which is valid for the call.
    let rc = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &size) };
    Errno::result(rc).map(drop).map_err(PtyError::Resize)
}

/// End the input of the terminal whose master is `master`, as a user's ^D would: closing our
/// copy of the master is not EOF for the process (the terminal stays open). In canonical mode
/// the terminal's EOF character ends the input; after an unfinished line (`line_pending`) the
/// first one only hands that line over, so a second one follows. Without canonical mode the
/// terminal has no EOF, and nothing is sent (returns false).
pub fn send_eof(master: &File, line_pending: bool) -> std::io::Result<bool> {
    use nix::sys::termios::{tcgetattr, LocalFlags, SpecialCharacterIndices};
    let attrs = tcgetattr(master)?;
    if !attrs.local_flags.contains(LocalFlags::ICANON) {
        return Ok(false);
    }
    let eof = attrs.control_chars[SpecialCharacterIndices::VEOF as usize];
    let (both, one) = ([eof, eof], [eof]);
    let mut out = master;
    std::io::Write::write_all(&mut out, if line_pending { &both[..] } else { &one[..] })?;
    Ok(true)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod tests {
    use super::*;
    use nix::sys::socket::{sendmsg, ControlMessage};
    use std::io::IoSlice;

    /// What a canonical-mode reader of the slave gets: each read's bytes, up to EOF (a read
    /// of 0), or the reads so far if none comes within 2 s.
    pub(crate) fn reads_until_eof(slave: OwnedFd) -> Vec<Vec<u8>> {
        use std::io::Read;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut slave = File::from(slave);
            let mut buf = [0u8; 256];
            loop {
                let n = slave.read(&mut buf).unwrap_or(0);
                let _ = tx.send(buf[..n].to_vec());
                if n == 0 {
                    return;
                }
            }
        });
        let mut reads = Vec::new();
        while let Ok(r) = rx.recv_timeout(Duration::from_secs(2)) {
            let end = r.is_empty();
            reads.push(r);
            if end {
                break;
            }
        }
        reads
    }

    #[test]
    fn send_eof_ends_a_canonical_terminal_reader_after_a_full_or_partial_line() {
        for (input, line_pending, want) in [
            (&b"abc\n"[..], false, vec![b"abc\n".to_vec(), vec![]]),
            (&b"abc"[..], true, vec![b"abc".to_vec(), vec![]]),
            (&b""[..], false, vec![vec![]]),
        ] {
            let pty = nix::pty::openpty(None, None).unwrap();
            let master = File::from(pty.master);
            // No echo: the master would otherwise fill with it.
            let mut attrs = nix::sys::termios::tcgetattr(&master).unwrap();
            attrs.local_flags.remove(nix::sys::termios::LocalFlags::ECHO);
            nix::sys::termios::tcsetattr(&master, nix::sys::termios::SetArg::TCSANOW, &attrs).unwrap();
            std::io::Write::write_all(&mut &master, input).unwrap();
            assert!(send_eof(&master, line_pending).unwrap());
            assert_eq!(reads_until_eof(pty.slave), want, "input {input:?}");
        }
        // Raw mode has no EOF character: nothing is sent.
        let pty = nix::pty::openpty(None, None).unwrap();
        let master = File::from(pty.master);
        let mut attrs = nix::sys::termios::tcgetattr(&master).unwrap();
        nix::sys::termios::cfmakeraw(&mut attrs);
        nix::sys::termios::tcsetattr(&master, nix::sys::termios::SetArg::TCSANOW, &attrs).unwrap();
        assert!(!send_eof(&master, false).unwrap());
    }

    #[test]
    fn master_travels_over_the_console_socket_and_resizes() {
        let d = tempfile::tempdir().unwrap();
        let sock = ConsoleSocket::bind(&d.path().join("console.sock")).unwrap();
        let pty = nix::pty::openpty(None, None).unwrap();
        // Play libcontainer's part: connect, send the master with its name.
        let client = UnixStream::connect(sock.path()).unwrap();
        let fds = [pty.master.as_raw_fd()];
        sendmsg::<UnixAddr>(
            client.as_raw_fd(),
            &[IoSlice::new(b"/dev/ptmx")],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        let master = sock.receive_master(Duration::from_secs(5)).unwrap();
        set_window_size(&master, 33, 101).unwrap();
        let mut size = libc::winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
        // SAFETY: TIOCGWINSZ writes one winsize into `size`.
        let rc = unsafe { libc::ioctl(pty.slave.as_raw_fd(), libc::TIOCGWINSZ, &mut size) };
        assert_eq!(rc, 0);
        assert_eq!((size.ws_row, size.ws_col), (33, 101));
        let path = sock.path().to_path_buf();
        drop(sock);
        assert!(!path.exists());
    }

    #[test]
    fn a_silent_container_times_out() {
        let d = tempfile::tempdir().unwrap();
        let sock = ConsoleSocket::bind(&d.path().join("c.sock")).unwrap();
        assert!(matches!(sock.receive_master(Duration::from_millis(30)), Err(PtyError::Timeout(_))));
    }
}
