//! Shared helpers for tern's integration tests: where the built artifacts are, and the guard
//! that decides whether this host can boot Linux guests.
//!
//! KVM tests call [`require_linux_kvm`] first. Without a KVM that can boot Linux they print a
//! loud notice and return `false` (the test then returns early); with `CI=true` they panic, so
//! CI never passes silently without booting guests. `make test` runs them inside
//! `tests/nested-runner` on hosts whose KVM is `kvm_pvm`.

pub mod containerd;
pub mod cri;
pub mod netns;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use tern_sync::LockExt;

/// The workspace root (parent of this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

/// The `tern` binary under test: `$TERN_BIN`, else `target/release/tern`.
pub fn tern_bin() -> PathBuf {
    std::env::var_os("TERN_BIN").map(PathBuf::from).unwrap_or_else(|| workspace_root().join("target/release/tern"))
}

/// Why this host cannot boot Linux guests, or `None` if it can.
pub fn linux_kvm_unavailable() -> Option<String> {
    if !Path::new("/dev/kvm").exists() {
        return Some("/dev/kvm does not exist".into());
    }
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        return Some(format!("cannot open /dev/kvm: {e}"));
    }
    if Path::new("/sys/module/kvm_pvm").exists() {
        return Some("/dev/kvm is kvm_pvm, which cannot boot unmodified Linux guests".into());
    }
    None
}

/// Guard for tests that boot real guests. See the module docs.
pub fn require_linux_kvm(test: &str) -> bool {
    let Some(reason) = linux_kvm_unavailable() else {
        assert!(tern_bin().is_file(), "{} is missing: run `make build` first", tern_bin().display());
        return true;
    };
    let msg = format!(
        "\n*** {test}: NOT RUN — {reason}.\n*** Run the KVM tests through the nested-virt runner: `make test` (or tests/nested-runner -- cargo test -p tern-tests).\n"
    );
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        panic!("{msg}*** CI=true: a KVM test that cannot boot a guest is a failure.");
    }
    eprintln!("{msg}");
    false
}

/// Run `tern` with `args`, feeding `stdin`, killing it after `limit`. Returns output and elapsed.
pub fn tern(args: &[&str], stdin: &[u8], limit: Duration) -> (Output, Duration) {
    tern_with_env(args, stdin, limit, &[])
}

/// [`tern`] with extra environment variables.
pub fn tern_with_env(args: &[&str], stdin: &[u8], limit: Duration, env: &[(&str, &str)]) -> (Output, Duration) {
    let start = Instant::now();
    let mut cmd = Command::new(tern_bin());
    cmd.args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot spawn {}: {e}", tern_bin().display()));
    let pid = child.id();
    // Bounded time: a watchdog kills a hung tern so the test fails instead of hanging.
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if done_rx.recv_timeout(limit).is_err() {
            // SAFETY: kill(2) on a pid we spawned; worst case it already exited and was reaped,
            // and the pid has not been recycled yet because we have not waited on it.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    });
    let input = stdin.to_vec();
    let mut child_stdin = child.stdin.take();
    let feeder = std::thread::spawn(move || {
        use std::io::Write;
        if let Some(s) = child_stdin.as_mut() {
            let _ = s.write_all(&input);
        }
        drop(child_stdin);
    });
    let out = child.wait_with_output().unwrap_or_else(|e| panic!("waiting for tern failed: {e}"));
    let _ = done_tx.send(());
    let _ = watchdog.join();
    let _ = feeder.join();
    let elapsed = start.elapsed();
    assert!(elapsed < limit, "tern {args:?} did not finish within {limit:?} and was killed");
    (out, elapsed)
}

/// Lossy stdout/stderr as strings, for assertions and messages.
pub fn text(out: &Output) -> (String, String) {
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// A `tern` process whose stdout is read line by line while it runs, so a test can act on the
/// host while the guest command is still going (e.g. change a watched share). Killed on drop.
pub struct LiveTern {
    child: std::process::Child,
    /// tern's stdin, when spawned with [`LiveTern::spawn_interactive`].
    stdin: Option<std::process::ChildStdin>,
    lines: std::sync::mpsc::Receiver<String>,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
    deadline: Instant,
    seen: Vec<String>,
}

impl LiveTern {
    /// Start `tern args…`; everything must be over within `limit`.
    pub fn spawn(args: &[&str], env: &[(&str, &str)], limit: Duration) -> LiveTern {
        LiveTern::start(args, env, limit, Stdio::null())
    }

    /// [`LiveTern::spawn`] with tern's stdin a pipe the test writes with [`LiveTern::send`]
    /// and closes with [`LiveTern::close_stdin`], as a program driving tern would.
    pub fn spawn_interactive(args: &[&str], env: &[(&str, &str)], limit: Duration) -> LiveTern {
        LiveTern::start(args, env, limit, Stdio::piped())
    }

    fn start(args: &[&str], env: &[(&str, &str)], limit: Duration, stdin: Stdio) -> LiveTern {
        use std::io::{BufRead, Read};
        let mut cmd = Command::new(tern_bin());
        cmd.args(args).stdin(stdin).stdout(Stdio::piped()).stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot spawn {}: {e}", tern_bin().display()));
        let (tx, lines) = std::sync::mpsc::channel();
        let Some(stdout) = child.stdout.take() else { panic!("tern stdout is not piped") };
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let Some(mut err_pipe) = child.stderr.take() else { panic!("tern stderr is not piped") };
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = err_pipe.read(&mut buf) {
                sink.lock_unpoisoned().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let stdin = child.stdin.take();
        LiveTern { child, stdin, lines, stderr, deadline: Instant::now() + limit, seen: Vec::new() }
    }

    /// tern's pid (for signals).
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Send `signal` to tern.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our child, which has not been waited for (its pid is not reused).
        let rc = unsafe { libc::kill(self.pid(), signal) };
        assert_eq!(rc, 0, "kill({}, {signal}) failed", self.pid());
    }

    /// Write `bytes` to tern's stdin (spawned with [`LiveTern::spawn_interactive`]).
    pub fn send(&mut self, bytes: &[u8]) {
        use std::io::Write;
        let Some(stdin) = self.stdin.as_mut() else { panic!("tern's stdin is not a pipe, or was closed") };
        stdin.write_all(bytes).and_then(|()| stdin.flush()).unwrap_or_else(|e| panic!("writing tern's stdin: {e}"));
    }

    /// Close tern's stdin: the command should read EOF.
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Wait up to `within` for tern to exit; its exit status, or None if it still runs.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The stdout lines seen so far.
    pub fn seen(&self) -> &[String] {
        &self.seen
    }

    /// The next stdout line, `None` at EOF. Panics past the deadline.
    pub fn next_line(&mut self) -> Option<String> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        match self.lines.recv_timeout(left) {
            Ok(line) => {
                self.seen.push(line.clone());
                Some(line)
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => None,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                panic!("timed out; stdout so far:\n{}\nstderr:\n{}", self.seen.join("\n"), self.stderr())
            }
        }
    }

    /// Read lines until one satisfies `pred` (returned). Panics at EOF or past `within`.
    pub fn wait_for(&mut self, within: Duration, mut pred: impl FnMut(&str) -> bool) -> String {
        let deadline = Instant::now() + within;
        let saved = self.deadline;
        self.deadline = self.deadline.min(deadline);
        loop {
            match self.next_line() {
                Some(line) if pred(&line) => {
                    self.deadline = saved;
                    return line;
                }
                Some(_) => {}
                None => panic!("tern ended early; stdout:\n{}\nstderr:\n{}", self.seen.join("\n"), self.stderr()),
            }
        }
    }

    /// Wait for the exit; returns the exit code and every stdout line seen.
    pub fn finish(mut self) -> (Option<i32>, Vec<String>) {
        while self.next_line().is_some() {}
        let status = loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                break status;
            }
            assert!(Instant::now() < self.deadline, "tern did not exit in time; stderr:\n{}", self.stderr());
            std::thread::sleep(Duration::from_millis(20));
        };
        (status.code(), std::mem::take(&mut self.seen))
    }

    /// What tern wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock_unpoisoned().clone()
    }
}

impl Drop for LiveTern {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A guest initramfs for tests that boot without tern's agent: busybox-static as `/bin/busybox`
/// (with `/bin/sh`) and `init_script` as `/init`, packed into `<work>/initramfs.cpio`.
#[allow(clippy::unwrap_used, clippy::expect_used)] // test setup: a failure here is the test failing
pub fn busybox_initramfs(work: &Path, init_script: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let root = work.join("initramfs-root");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox-static is installed");
    std::os::unix::fs::symlink("busybox", root.join("bin/sh")).unwrap();
    let init = root.join("init");
    std::fs::write(&init, init_script).unwrap();
    std::fs::set_permissions(&init, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = work.join("initramfs.cpio");
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!("cd '{}' && find . | cpio -o -H newc --quiet > '{}'", root.display(), out.display()))
        .status()
        .unwrap();
    assert!(status.success(), "cpio failed");
    out
}

/// Deterministic pseudo-random bytes (xorshift) in which every byte value appears: test data
/// whose corruption, loss or reordering a checksum comparison will notice.
pub fn pseudo_random(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}
