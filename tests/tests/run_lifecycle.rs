//! `tern run` driven the way programs and terminals drive it (issue 11): stdin EOF after
//! interactive use, SIGTERM/SIGINT forwarded to the command, the stop timeout, a second
//! SIGINT, a signal during boot, and the run directory of a SIGKILLed `tern run` reaped by the
//! next one. Every test boots real guests (through tests/nested-runner where KVM cannot boot
//! Linux) and checks that the run directory is gone at the end.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tern_tests::{require_linux_kvm, tern_with_env, text, LiveTern};

/// Bound for one boot + command: nested virtualization under TCG is slow.
const BOOT_LIMIT: Duration = Duration::from_secs(240);
/// From stdin's close (or a forwarded signal) to tern's exit. The failures these tests guard
/// against never end; a working run ends within a few seconds even under the runner.
const EXIT_LIMIT: Duration = Duration::from_secs(30);
/// A command that loops until a signal ends it, announcing itself first.
const LOOP: &str = "while :; do sleep 0.1; done";

/// `TERN_RUN_DIR` for one test, and the environment that sets it.
struct RunBase(tempfile::TempDir);

impl RunBase {
    fn new() -> RunBase {
        RunBase(tempfile::tempdir().unwrap())
    }

    fn env(&self) -> [(&str, &str); 1] {
        [("TERN_RUN_DIR", self.0.path().to_str().unwrap())]
    }

    fn entries(&self) -> Vec<PathBuf> {
        match std::fs::read_dir(self.0.path()) {
            Ok(rd) => rd.filter_map(|e| e.ok()).map(|e| e.path()).collect(),
            Err(_) => Vec::new(),
        }
    }

    fn assert_empty(&self, context: &str) {
        assert_eq!(self.entries(), Vec::<PathBuf>::new(), "run directories left behind ({context})");
    }

    /// Wait until tern created its run directory (it blocks the signals first).
    fn wait_for_run_dir(&self, within: Duration) -> PathBuf {
        let deadline = Instant::now() + within;
        loop {
            if let Some(dir) = self.entries().into_iter().find(|p| is_vm_dir(p)) {
                return dir;
            }
            assert!(Instant::now() < deadline, "tern never created its run directory");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn is_vm_dir(path: &Path) -> bool {
    path.file_name().is_some_and(|n| n.to_string_lossy().starts_with("vm-"))
}

/// Issue 11, bug 1: a program writes a line and reads its echo five times, then closes
/// stdin; `cat` must see EOF and tern must exit. Before the fix, 5 of 5 such runs hung: the
/// vsock device lost the end of the stream when tern's half-close and close came together.
#[test]
fn stdin_eof_after_interactive_use_ends_the_command() {
    if !require_linux_kvm("stdin_eof_after_interactive_use_ends_the_command") {
        return;
    }
    for round in 1..=3 {
        let base = RunBase::new();
        let mut tern =
            LiveTern::spawn_interactive(&["run", "--", "sh", "-c", "echo READY; exec cat"], &base.env(), BOOT_LIMIT);
        tern.wait_for(BOOT_LIMIT, |l| l == "READY");
        for i in 0..5 {
            let line = format!("line {i} of round {round}");
            tern.send(format!("{line}\n").as_bytes());
            tern.wait_for(EXIT_LIMIT, |l| l == line);
            std::thread::sleep(Duration::from_millis(50));
        }
        tern.close_stdin();
        let closed = Instant::now();
        let status = tern.wait_exit(EXIT_LIMIT).unwrap_or_else(|| {
            panic!("round {round}: tern still runs {EXIT_LIMIT:?} after stdin closed; stderr:\n{}", tern.stderr())
        });
        assert_eq!(status.code(), Some(0), "round {round}; stderr:\n{}", tern.stderr());
        println!("round {round}: exited {:?} after stdin closed", closed.elapsed());
        base.assert_empty(&format!("round {round}"));
    }
}

/// Issue 11, bug 2: SIGTERM goes to the command, which traps it; tern exits with the
/// command's status and removes its run directory.
#[test]
fn sigterm_is_forwarded_and_the_status_follows_the_command() {
    if !require_linux_kvm("sigterm_is_forwarded_and_the_status_follows_the_command") {
        return;
    }
    let base = RunBase::new();
    let script = format!("trap 'echo got TERM; exit 3' TERM; echo READY; {LOOP}");
    let mut tern = LiveTern::spawn(&["run", "--", "sh", "-c", &script], &base.env(), BOOT_LIMIT);
    tern.wait_for(BOOT_LIMIT, |l| l == "READY");
    tern.signal(libc::SIGTERM);
    let status =
        tern.wait_exit(EXIT_LIMIT).unwrap_or_else(|| panic!("tern ignored SIGTERM; stderr:\n{}", tern.stderr()));
    let stderr = tern.stderr();
    let (code, lines) = tern.finish();
    assert_eq!((status.code(), code), (Some(3), Some(3)), "stderr:\n{stderr}");
    assert!(lines.iter().any(|l| l == "got TERM"), "stdout: {lines:?}");
    base.assert_empty("after SIGTERM");

    // A command without a trap dies of the signal: 128 + 15, as in a shell.
    let mut tern = LiveTern::spawn(&["run", "--", "sh", "-c", &format!("echo READY; {LOOP}")], &base.env(), BOOT_LIMIT);
    tern.wait_for(BOOT_LIMIT, |l| l == "READY");
    tern.signal(libc::SIGTERM);
    let status =
        tern.wait_exit(EXIT_LIMIT).unwrap_or_else(|| panic!("tern ignored SIGTERM; stderr:\n{}", tern.stderr()));
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "stderr:\n{}", tern.stderr());
    base.assert_empty("after SIGTERM without a trap");
}

/// A command that ignores SIGTERM: tern stops the VM once `--stop-timeout` has passed and
/// exits with 128 + 15.
#[test]
fn a_command_ignoring_sigterm_is_stopped_after_the_stop_timeout() {
    if !require_linux_kvm("a_command_ignoring_sigterm_is_stopped_after_the_stop_timeout") {
        return;
    }
    let base = RunBase::new();
    let script = format!("trap '' TERM; echo READY; {LOOP}");
    let mut tern = LiveTern::spawn(&["run", "--stop-timeout", "3", "--", "sh", "-c", &script], &base.env(), BOOT_LIMIT);
    tern.wait_for(BOOT_LIMIT, |l| l == "READY");
    let sent = Instant::now();
    tern.signal(libc::SIGTERM);
    let status = tern
        .wait_exit(EXIT_LIMIT)
        .unwrap_or_else(|| panic!("tern did not end the VM after the stop timeout; stderr:\n{}", tern.stderr()));
    let took = sent.elapsed();
    let stderr = tern.stderr();
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "stderr:\n{stderr}");
    assert!(took >= Duration::from_secs(3), "ended after {took:?}, before the stop timeout");
    assert!(stderr.contains("did not exit within 3 s of SIGTERM"), "stderr:\n{stderr}");
    base.assert_empty("after the stop timeout");
}

/// A second SIGINT ends the VM at once, long before the stop timeout.
#[test]
fn a_second_sigint_ends_the_vm_at_once() {
    if !require_linux_kvm("a_second_sigint_ends_the_vm_at_once") {
        return;
    }
    let base = RunBase::new();
    let script = format!("trap '' INT; echo READY; {LOOP}");
    let mut tern =
        LiveTern::spawn(&["run", "--stop-timeout", "600", "--", "sh", "-c", &script], &base.env(), BOOT_LIMIT);
    tern.wait_for(BOOT_LIMIT, |l| l == "READY");
    tern.signal(libc::SIGINT);
    // The command ignores it: tern waits for the command...
    assert!(tern.wait_exit(Duration::from_secs(2)).is_none(), "one SIGINT ended tern; stderr:\n{}", tern.stderr());
    let sent = Instant::now();
    tern.signal(libc::SIGINT);
    let status = tern
        .wait_exit(EXIT_LIMIT)
        .unwrap_or_else(|| panic!("a second SIGINT did not end tern; stderr:\n{}", tern.stderr()));
    assert_eq!(status.code(), Some(128 + libc::SIGINT), "stderr:\n{}", tern.stderr());
    println!("ended {:?} after the second SIGINT", sent.elapsed());
    base.assert_empty("after a second SIGINT");
}

/// A signal while the guest still boots: the command never starts, tern exits with
/// 128 + the signal and its run directory goes.
#[test]
fn a_signal_during_boot_ends_tern_cleanly() {
    if !require_linux_kvm("a_signal_during_boot_ends_tern_cleanly") {
        return;
    }
    let base = RunBase::new();
    let mut tern = LiveTern::spawn(&["run", "--", "echo", "the command ran"], &base.env(), BOOT_LIMIT);
    base.wait_for_run_dir(BOOT_LIMIT);
    tern.signal(libc::SIGTERM);
    let status = tern
        .wait_exit(EXIT_LIMIT)
        .unwrap_or_else(|| panic!("tern ignored SIGTERM while booting; stderr:\n{}", tern.stderr()));
    let stderr = tern.stderr();
    let (_, lines) = tern.finish();
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "stderr:\n{stderr}");
    assert!(lines.is_empty(), "the command ran after the signal: {lines:?}");
    base.assert_empty("after a signal during boot");
}

/// Issue 11, bug 3: a SIGKILLed `tern run` cannot clean up; the next `tern run` reaps its
/// run directory (its owner is gone) and leaves nothing itself.
#[test]
fn the_next_run_reaps_the_dir_of_a_sigkilled_tern() {
    if !require_linux_kvm("the_next_run_reaps_the_dir_of_a_sigkilled_tern") {
        return;
    }
    let base = RunBase::new();
    let mut tern = LiveTern::spawn(&["run", "--", "sh", "-c", &format!("echo READY; {LOOP}")], &base.env(), BOOT_LIMIT);
    tern.wait_for(BOOT_LIMIT, |l| l == "READY");
    let dir = base.wait_for_run_dir(Duration::ZERO);
    let owner = std::fs::read_to_string(dir.join("owner")).expect("the run directory records its owner");
    assert!(owner.starts_with(&format!("{} ", tern.pid())), "owner record {owner:?} for pid {}", tern.pid());
    tern.signal(libc::SIGKILL);
    assert!(tern.wait_exit(EXIT_LIMIT).is_some(), "SIGKILL did not end tern");
    assert!(dir.exists(), "nothing cleaned up yet: SIGKILL runs no destructor");

    let (out, _) = tern_with_env(&["run", "--", "true"], b"", BOOT_LIMIT, &base.env());
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out).1);
    assert!(!dir.exists(), "the next tern run left {} behind", dir.display());
    base.assert_empty("after the next run");
}
