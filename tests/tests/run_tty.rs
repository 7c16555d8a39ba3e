//! `tern run -t` on a real terminal (issue 11): the test opens a pty pair, runs
//! `tern run -it -- sh` with the slave as its controlling terminal and stdio, and types into
//! the master as a user would. The guest shell sees the host window size at the start and
//! after a resize (TIOCSWINSZ on the master, SIGWINCH to tern); ^C is a key that interrupts the
//! shell's foreground command, not tern; `exit 7` and ^D end tern with the shell's status; and
//! the terminal's settings are what they were once tern has exited. Without a terminal on
//! stdin, `-t` still works and `-it` is refused, as with docker. Every read is bounded.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use tern_tests::{require_linux_kvm, tern_bin, tern_with_env, text};

/// Bound for one boot until the shell's first prompt: nested virtualization under TCG is slow.
const BOOT_LIMIT: Duration = Duration::from_secs(240);
/// Bound for one command's answer, and for tern's exit once the shell ended.
const STEP_LIMIT: Duration = Duration::from_secs(60);
/// The guest shell's prompt (`PS1`), distinct from anything else on the terminal.
const PROMPT: &str = "tty-prompt> ";

/// `TERN_RUN_DIR` for one test: nothing may be left in it at the end.
struct RunBase(tempfile::TempDir);

impl RunBase {
    fn new() -> RunBase {
        RunBase(tempfile::tempdir().unwrap())
    }

    fn path(&self) -> &str {
        self.0.path().to_str().unwrap()
    }

    fn assert_empty(&self) {
        let left: Vec<PathBuf> = std::fs::read_dir(self.0.path()).unwrap().map(|e| e.unwrap().path()).collect();
        assert_eq!(left, Vec::<PathBuf>::new(), "run directories left behind");
    }
}

/// A pty pair on the host: the test holds the master (the user's side) and keeps a handle to
/// the slave (tern's terminal) to read its settings after tern has gone.
struct HostPty {
    master: File,
    slave: OwnedFd,
}

impl HostPty {
    fn open(rows: u16, cols: u16) -> HostPty {
        let (mut master, mut slave): (RawFd, RawFd) = (-1, -1);
        let size = winsize(rows, cols);
        // SAFETY: openpty writes two descriptors into the two locals; the name pointer may be
        // null, the termios pointer is null (defaults) and `size` is read only.
        let rc = unsafe { libc::openpty(&mut master, &mut slave, std::ptr::null_mut(), std::ptr::null(), &size) };
        assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
        // SAFETY: openpty just opened both descriptors for us; nothing else owns them.
        let (master, slave) = unsafe { (File::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
        HostPty { master, slave }
    }

    /// What a terminal emulator does when its window changes: the kernel sends SIGWINCH to
    /// the terminal's foreground process group (tern).
    fn resize(&self, rows: u16, cols: u16) {
        let size = winsize(rows, cols);
        // SAFETY: TIOCSWINSZ reads one winsize from a pointer valid for the call.
        let rc = unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ, &size) };
        assert_eq!(rc, 0, "TIOCSWINSZ: {}", std::io::Error::last_os_error());
    }

    /// The slave's terminal settings, as comparable fields.
    fn settings(&self) -> Settings {
        // SAFETY: termios is plain data; all-zero is a valid value for tcgetattr to overwrite.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: tcgetattr writes one termios into `t`, valid for the call.
        let rc = unsafe { libc::tcgetattr(self.slave.as_raw_fd(), &mut t) };
        assert_eq!(rc, 0, "tcgetattr: {}", std::io::Error::last_os_error());
        Settings {
            iflag: t.c_iflag,
            oflag: t.c_oflag,
            cflag: t.c_cflag,
            lflag: t.c_lflag,
            line: t.c_line,
            cc: t.c_cc,
            ispeed: t.c_ispeed,
            ospeed: t.c_ospeed,
        }
    }
}

fn winsize(rows: u16, cols: u16) -> libc::winsize {
    libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 }
}

#[derive(Debug, PartialEq, Eq)]
struct Settings {
    iflag: libc::tcflag_t,
    oflag: libc::tcflag_t,
    cflag: libc::tcflag_t,
    lflag: libc::tcflag_t,
    line: libc::cc_t,
    cc: [libc::cc_t; libc::NCCS],
    ispeed: libc::speed_t,
    ospeed: libc::speed_t,
}

/// `tern` running on the slave of a [`HostPty`] as its controlling terminal, as in a terminal
/// emulator: the test reads what tern shows through the master and types into it.
struct TtyTern {
    child: Child,
    master: File,
    /// Everything read from the master so far, and how far the test has looked at it.
    screen: Vec<u8>,
    cursor: usize,
}

impl TtyTern {
    fn spawn(pty: &HostPty, args: &[&str], run_base: &RunBase) -> TtyTern {
        let stdio = || Stdio::from(pty.slave.try_clone().unwrap());
        let mut cmd = Command::new(tern_bin());
        cmd.args(args).env("TERN_RUN_DIR", run_base.path()).stdin(stdio()).stdout(stdio()).stderr(stdio());
        // SAFETY: the closure only makes async-signal-safe system calls (setsid, ioctl), as
        // code between fork and exec must.
        unsafe {
            cmd.pre_exec(|| {
                // A session of its own whose controlling terminal is the slave (now its stdin),
                // so tern is the terminal's foreground process group and gets its SIGWINCH.
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            })
        };
        let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot spawn {}: {e}", tern_bin().display()));
        TtyTern { child, master: pty.master.try_clone().unwrap(), screen: Vec::new(), cursor: 0 }
    }

    fn type_keys(&mut self, keys: &[u8]) {
        self.master.write_all(keys).unwrap();
    }

    /// Read what the master has within `timeout` (at most one read); false if nothing came.
    fn read_some(&mut self, timeout: Duration) -> bool {
        let mut fds = [libc::pollfd { fd: self.master.as_raw_fd(), events: libc::POLLIN, revents: 0 }];
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: poll reads and writes the one pollfd of `fds`, valid for the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 1, ms) };
        if rc <= 0 || fds[0].revents & libc::POLLIN == 0 {
            return false;
        }
        let mut buf = [0u8; 4096];
        match self.master.read(&mut buf) {
            Ok(n) => {
                self.screen.extend_from_slice(&buf[..n]);
                n > 0
            }
            Err(_) => false,
        }
    }

    /// Wait up to `within` for `text` past the cursor; move the cursor past it if it came.
    fn saw(&mut self, text: &str, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            let unseen = &self.screen[self.cursor..];
            if let Some(at) = unseen.windows(text.len()).position(|w| w == text.as_bytes()) {
                self.cursor += at + text.len();
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            self.read_some(left.min(Duration::from_millis(200)));
        }
    }

    /// [`Self::saw`], or fail with what the terminal showed.
    fn expect(&mut self, text: &str, within: Duration) {
        if !self.saw(text, within) {
            panic!("{text:?} did not show within {within:?}; the terminal showed:\n{}", self.transcript());
        }
    }

    fn transcript(&self) -> String {
        String::from_utf8_lossy(&self.screen).replace('\r', "")
    }

    /// Wait up to `within` for tern to exit, reading the terminal meanwhile.
    fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                while self.read_some(Duration::from_millis(50)) {}
                return status;
            }
            let shown = || self.transcript();
            assert!(Instant::now() < deadline, "tern did not exit in {within:?}; the terminal showed:\n{}", shown());
            self.read_some(Duration::from_millis(100));
        }
    }
}

impl Drop for TtyTern {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_shell(pty: &HostPty, base: &RunBase) -> TtyTern {
    let ps1 = format!("PS1={PROMPT}");
    let mut tern = TtyTern::spawn(pty, &["run", "-it", "-e", &ps1, "--", "sh"], base);
    tern.expect(PROMPT, BOOT_LIMIT);
    tern
}

#[test]
fn shell_on_a_pty_follows_the_window_and_takes_ctrl_c_as_a_key() {
    if !require_linux_kvm("shell_on_a_pty_follows_the_window_and_takes_ctrl_c_as_a_key") {
        return;
    }
    let base = RunBase::new();
    let pty = HostPty::open(31, 97);
    let before = pty.settings();
    let mut tern = start_shell(&pty, &base);

    // Raw while the command runs: no echo, no line editing, no signals from keys on the host.
    let raw = pty.settings();
    assert_eq!(raw.lflag & (libc::ICANON | libc::ECHO | libc::ISIG), 0, "the host terminal is not raw");

    // The window size tern found at the start.
    tern.type_keys(b"stty size\r");
    tern.expect("31 97\r\n", STEP_LIMIT);
    tern.expect(PROMPT, STEP_LIMIT);

    // A resize reaches the guest terminal through SIGWINCH -> ResizePty; it is asynchronous to
    // what the shell runs next, so ask until it shows.
    pty.resize(42, 120);
    let mut resized = false;
    for _ in 0..10 {
        tern.type_keys(b"stty size\r");
        if tern.saw("42 120\r\n", Duration::from_secs(5)) {
            resized = true;
            break;
        }
    }
    assert!(resized, "the guest never saw 42x120; the terminal showed:\n{}", tern.transcript());
    tern.expect(PROMPT, STEP_LIMIT);

    // ^C is a byte for the guest's line discipline: SIGINT for the shell's foreground job
    // (sleep), while the shell and tern go on.
    tern.type_keys(b"sleep 100\r");
    tern.expect("sleep 100", STEP_LIMIT);
    // Give the shell time to make sleep its foreground job; repeat ^C should one get there
    // before it did (the shell itself only redraws its prompt then).
    std::thread::sleep(Duration::from_secs(2));
    let mut interrupted = false;
    for _ in 0..3 {
        tern.type_keys(b"\x03");
        if tern.saw(PROMPT, Duration::from_secs(15)) {
            interrupted = true;
            break;
        }
    }
    assert!(interrupted, "^C did not end sleep; the terminal showed:\n{}", tern.transcript());
    tern.type_keys(b"echo status=$?\r");
    tern.expect("status=130\r\n", STEP_LIMIT);
    tern.expect(PROMPT, STEP_LIMIT);

    tern.type_keys(b"exit 7\r");
    let status = tern.wait_exit(STEP_LIMIT);
    assert_eq!(status.code(), Some(7), "the terminal showed:\n{}", tern.transcript());
    assert_eq!(pty.settings(), before, "tern left the terminal's settings changed");
    base.assert_empty();
}

#[test]
fn ctrl_d_at_an_empty_prompt_ends_the_shell_and_tern() {
    if !require_linux_kvm("ctrl_d_at_an_empty_prompt_ends_the_shell_and_tern") {
        return;
    }
    let base = RunBase::new();
    let pty = HostPty::open(24, 80);
    let before = pty.settings();
    let mut tern = start_shell(&pty, &base);
    tern.type_keys(b"\x04");
    let status = tern.wait_exit(STEP_LIMIT);
    assert_eq!(status.code(), Some(0), "the terminal showed:\n{}", tern.transcript());
    assert_eq!(pty.settings(), before, "tern left the terminal's settings changed");
    base.assert_empty();
}

#[test]
fn tty_without_a_terminal_on_stdin_works_with_t_and_is_refused_with_it() {
    if !require_linux_kvm("tty_without_a_terminal_on_stdin_works_with_t_and_is_refused_with_it") {
        return;
    }
    let base = RunBase::new();
    let env = [("TERN_RUN_DIR", base.path())];
    // docker's rule: -it needs a terminal on stdin; refused before anything boots.
    let (out, elapsed) = tern_with_env(&["run", "-it", "--", "true"], b"", BOOT_LIMIT, &env);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(125), "stderr: {stderr}");
    assert!(stderr.contains("the input device is not a TTY"), "stderr: {stderr}");
    assert!(elapsed < Duration::from_secs(10), "refusing took {elapsed:?}: did it boot?");

    // -t alone: a pty in the guest fed from the pipe; stdout and stderr are one stream.
    let script = "tty; echo to-stderr >&2; read line; echo got:$line; exit 3";
    let (out, _) = tern_with_env(&["run", "-t", "--", "sh", "-c", script], b"hello\n", BOOT_LIMIT, &env);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(3), "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains("/dev/pts/"), "stdout: {stdout}");
    assert!(stdout.contains("to-stderr\r\n"), "stdout: {stdout}");
    assert!(stdout.contains("got:hello\r\n"), "stdout: {stdout}");
    assert!(!stderr.contains("to-stderr"), "stderr: {stderr}");
    base.assert_empty();
}
