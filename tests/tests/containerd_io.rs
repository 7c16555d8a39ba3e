//! FIFO I/O guarantees and cleanup of `containerd-shim-tern-v2`, end to end through a real
//! containerd and `ctr` (each test starts its own containerd, see `tern_tests::containerd`):
//!
//! - 50 MiB of stdout arrives byte-identical when the reader opens late (`ctr run -d`, the
//!   process starts writing after ctr's reader is gone, `ctr task attach` reads it later);
//! - a stdout reader that stalls (a foreground `ctr run` whose own stdout nobody reads) blocks
//!   neither `ctr task kill` nor the exit (STOPPED) nor `ctr task delete`, and what was written
//!   arrives as a gapless prefix;
//! - a foreground `ctr run` whose consumer starts reading after the process exited gets every
//!   byte (ctr closes its FIFO ends once it has the exit status);
//! - stdin EOF through CloseIO (`ctr run` with piped stdin) after byte-exact forwarding, and
//!   after interactive use (a line, its echo, a pause, five times, then EOF);
//! - a SIGKILLed shim, and a guest kernel panic, end with the task stopped and nothing left:
//!   no shim process, mount, socket, run directory, bundle, or open FIFO.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tern_tests::containerd::{ctr_run_args, stderr, stdout, TestContainerd, NAMESPACE};

/// One `ctr run` includes a VM boot, which is slow under the nested runner's emulation.
const RUN_LIMIT: Duration = Duration::from_secs(180);
/// Bound for task operations that must not depend on a consumer: kill, delete.
const TASK_OP_LIMIT: Duration = Duration::from_secs(60);
/// 50 MiB.
const LATE_ATTACH_BYTES: usize = 50 << 20;

/// KVM guard plus containerd availability; `None` means skip.
fn setup(test: &str) -> Option<TestContainerd> {
    tern_tests::containerd::containerd_for_test(test)
}

/// `ctr` against the test containerd, not yet run.
fn ctr_command(ctrd: &TestContainerd, args: &[&str]) -> Command {
    let mut cmd = Command::new("ctr");
    cmd.arg("--address").arg(ctrd.address()).arg("--namespace").arg(NAMESPACE).args(args);
    cmd
}

/// A background `ctr`, killed if the test ends early.
struct Background(Option<Child>);

impl Background {
    fn spawn(mut cmd: Command, stdin: Stdio) -> Background {
        cmd.stdin(stdin).stdout(Stdio::piped()).stderr(Stdio::piped());
        Background(Some(cmd.spawn().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))))
    }

    fn child(&mut self) -> &mut Child {
        self.0.as_mut().unwrap()
    }

    /// Wait for the exit with all output; `None` after `limit` (the child is then killed).
    fn finish(mut self, limit: Duration) -> Option<Output> {
        let child = self.0.take().unwrap();
        let pid = child.id() as i32;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        match rx.recv_timeout(limit) {
            Ok(out) => Some(out.unwrap()),
            Err(_) => {
                // SAFETY: kill(2) on our child; its waiter thread has not reaped it.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                None
            }
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `seq 1 n` output, the container side's deterministic, non-periodic data.
fn seq_output(n: u64) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 1..=n {
        out.extend_from_slice(i.to_string().as_bytes());
        out.push(b'\n');
    }
    out
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `got` is what `seq 1 …` prints, cut anywhere (a gapless prefix).
fn is_seq_prefix(got: &[u8]) -> bool {
    let mut expected = 1u64;
    let mut rest = got;
    while let Some(nl) = rest.iter().position(|&b| b == b'\n') {
        if rest[..nl] != *expected.to_string().as_bytes() {
            return false;
        }
        expected += 1;
        rest = &rest[nl + 1..];
    }
    expected.to_string().as_bytes().starts_with(rest)
}

fn task_status(ctrd: &TestContainerd, id: &str) -> Option<String> {
    let tasks = stdout(&ctrd.ctr(&["task", "ls"], TASK_OP_LIMIT));
    tasks
        .lines()
        .find(|l| l.split_whitespace().next() == Some(id))
        .and_then(|l| l.split_whitespace().nth(2).map(str::to_owned))
}

/// Poll until the task reaches `status`; the time it took, or `None` after `limit`.
fn wait_status(ctrd: &TestContainerd, id: &str, status: &str, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if task_status(ctrd, id).as_deref() == Some(status) {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    None
}

/// Bundle directory containerd made for container `id`.
fn bundle_of(ctrd: &TestContainerd, id: &str) -> PathBuf {
    ctrd.dir().join("state/io.containerd.runtime.v2.task").join(NAMESPACE).join(id)
}

/// Sandbox run directories (the shims' `TERN_RUN_DIR` is `<dir>/vm`).
fn run_dirs(ctrd: &TestContainerd) -> Vec<PathBuf> {
    std::fs::read_dir(ctrd.dir().join("vm")).into_iter().flatten().flatten().map(|e| e.path()).collect()
}

/// Processes that have any file under `dir` open.
fn holders_of(dir: &Path) -> Vec<String> {
    let mut holders = Vec::new();
    for proc_entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(fds) = std::fs::read_dir(proc_entry.path().join("fd")) else { continue };
        for fd in fds.flatten() {
            if std::fs::read_link(fd.path()).is_ok_and(|target| target.starts_with(dir)) {
                holders.push(proc_entry.file_name().to_string_lossy().into_owned());
                break;
            }
        }
    }
    holders
}

/// After a sandbox is gone: no shim, no bundle mount, no run directory, no bundle, no task.
fn assert_clean(ctrd: &TestContainerd, id: &str) {
    assert!(ctrd.wait_no_shims(Duration::from_secs(30)), "a shim outlived its tasks\n{}", ctrd.logs());
    let deadline = Instant::now() + Duration::from_secs(30);
    while bundle_of(ctrd, id).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(!bundle_of(ctrd, id).exists(), "bundle of {id} left behind\n{}", ctrd.logs());
    let mounts = ctrd.mounts_left();
    assert!(mounts.is_empty(), "mounts left behind: {mounts:?}");
    assert_eq!(run_dirs(ctrd), Vec::<PathBuf>::new(), "sandbox run directories left behind");
    assert_eq!(task_status(ctrd, id), None, "task {id} still listed");
}

#[test]
fn late_reader_gets_50_mib_of_stdout_byte_identical() {
    let Some(ctrd) = setup("late_reader_gets_50_mib_of_stdout_byte_identical") else { return };
    let fifo_dir = ctrd.dir().join("fifo");
    let fifo_flag = format!("--fifo-dir={}", fifo_dir.display());
    // The process writes nothing until ctr run -d (the first reader) has exited; then 50 MiB
    // of `seq` output, far more than the FIFO, socket and vsock buffers hold, so it blocks
    // until the late reader comes.
    let script = format!("sleep 5; seq 1 9000000 | head -c {LATE_ATTACH_BYTES}");
    let out = ctrd.ctr(&ctr_run_args(&["-d", &fifo_flag], "late", &["sh", "-c", &script]), RUN_LIMIT);
    assert!(out.status.success(), "ctr run -d failed: {}\n{}", stderr(&out), ctrd.logs());
    assert!(out.stdout.is_empty(), "ctr run -d read output before it detached; the test needs a later start");
    std::thread::sleep(Duration::from_secs(15));
    assert_eq!(task_status(&ctrd, "late").as_deref(), Some("RUNNING"), "the writer should be blocked, not done");

    // ctr task attach opens the FIFOs now, reads to EOF and deletes the task.
    let out = ctrd.ctr(&["task", "attach", "late"], Duration::from_secs(600));
    // On failure say how far the data got (a stall in the stream vs. a missed exit), what
    // containerd thinks of the task, and where the shim's threads wait, twice 5 s apart (do
    // the VM's counters still move?).
    if !out.status.success() {
        let first = ctrd.shim_report("late");
        std::thread::sleep(Duration::from_secs(5));
        panic!(
            "ctr task attach failed ({:?}) after {} of {LATE_ATTACH_BYTES} bytes, task {:?}: {}\n\
             --- shim ---\n{first}--- shim 5 s later ---\n{}\n{}",
            out.status,
            out.stdout.len(),
            task_status(&ctrd, "late"),
            stderr(&out),
            ctrd.shim_report("late"),
            ctrd.logs()
        );
    }
    let mut expected = seq_output(9_000_000);
    expected.truncate(LATE_ATTACH_BYTES);
    assert_eq!(
        (out.stdout.len(), sha256_hex(&out.stdout)),
        (expected.len(), sha256_hex(&expected)),
        "late reader's stdout differs from what the process wrote"
    );
    let out = ctrd.ctr(&["container", "delete", "late"], TASK_OP_LIMIT);
    assert!(out.status.success(), "ctr container delete failed: {}", stderr(&out));
    assert_clean(&ctrd, "late");
}

#[test]
fn stalled_stdout_reader_blocks_neither_kill_nor_delete() {
    let Some(ctrd) = setup("stalled_stdout_reader_blocks_neither_kill_nor_delete") else { return };
    // A foreground ctr whose stdout pipe the test never reads: its FIFO copy stalls as soon as
    // the pipe is full, i.e. a reader that holds the FIFO open and stops reading.
    let cmd = ctr_command(&ctrd, &ctr_run_args(&["--rm"], "stall", &["seq", "1", "1000000000"]));
    let mut ctr_run = Background::spawn(cmd, Stdio::null());
    assert!(wait_status(&ctrd, "stall", "RUNNING", RUN_LIMIT).is_some(), "the task never ran\n{}", ctrd.logs());
    std::thread::sleep(Duration::from_secs(5));

    let start = Instant::now();
    let out = ctrd.ctr(&["task", "kill", "--signal", "SIGKILL", "stall"], TASK_OP_LIMIT);
    assert!(out.status.success(), "ctr task kill failed: {}\n{}", stderr(&out), ctrd.logs());
    let killed_in = start.elapsed();
    let stopped_in = wait_status(&ctrd, "stall", "STOPPED", TASK_OP_LIMIT);
    assert!(stopped_in.is_some(), "the task did not stop with its reader stalled\n{}", ctrd.logs());
    let start = Instant::now();
    let out = ctrd.ctr(&["task", "delete", "stall"], TASK_OP_LIMIT);
    assert!(out.status.success(), "ctr task delete failed: {}\n{}", stderr(&out), ctrd.logs());
    let deleted_in = start.elapsed();
    eprintln!("stalled reader: kill {killed_in:?}, stopped after {stopped_in:?}, delete {deleted_in:?}");
    assert!(ctrd.wait_no_shims(Duration::from_secs(30)), "the shim stayed with a stalled reader\n{}", ctrd.logs());

    // The consumer resumes: the foreground ctr drains and ends; what it got is intact.
    let mut ctr_stdout = ctr_run.child().stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut got = Vec::new();
        let _ = ctr_stdout.read_to_end(&mut got);
        let _ = tx.send(got);
    });
    let got = rx.recv_timeout(TASK_OP_LIMIT).expect("the stalled ctr never saw EOF");
    assert!(ctr_run.finish(TASK_OP_LIMIT).is_some(), "ctr run did not end");
    assert!(got.len() >= 64 << 10, "only {} bytes: the reader cannot have stalled on a full FIFO", got.len());
    assert!(is_seq_prefix(&got), "the {} bytes read are not a gapless prefix of the output", got.len());
    let _ = ctrd.ctr(&["container", "delete", "stall"], TASK_OP_LIMIT);
    assert_clean(&ctrd, "stall");
}

/// The process writes ~400 KB, which the FIFO, the shim and the vsock window hold between them,
/// and exits while the consumer of ctr's stdout pauses after the first byte; it reads the rest
/// 1.5 s later.
/// ctr (containerd 1.6) closes its FIFO ends as soon as it has the exit status, in
/// `task.Delete`: the shim reports the exit only once the output was read, so nothing is cut
/// off. (A consumer that stays away longer than the shim's idle bound does lose the rest.)
#[test]
fn a_late_consumer_gets_all_output_of_a_process_that_already_exited() {
    let Some(ctrd) = setup("a_late_consumer_gets_all_output_of_a_process_that_already_exited") else { return };
    let lines = 70_000;
    let cmd = ctr_command(&ctrd, &ctr_run_args(&["--rm"], "late-read", &["seq", "1", &lines.to_string()]));
    let mut ctr_run = Background::spawn(cmd, Stdio::null());
    let mut ctr_stdout = ctr_run.child().stdout.take().unwrap();
    // The first byte says the process runs; then the consumer stays away while ctr's pipe
    // and buffer, the FIFO, the shim and the vsock window take the rest and seq exits.
    let reader = std::thread::spawn(move || {
        let mut got = vec![0u8];
        if ctr_stdout.read_exact(&mut got).is_err() {
            return Vec::new();
        }
        std::thread::sleep(Duration::from_millis(1500));
        let _ = ctr_stdout.read_to_end(&mut got);
        got
    });
    let out = ctr_run.finish(RUN_LIMIT).unwrap_or_else(|| panic!("ctr run never ended\n{}", ctrd.logs()));
    let got = reader.join().unwrap();
    assert!(out.status.success(), "ctr run failed: {}\n{}", stderr(&out), ctrd.logs());
    let expected = seq_output(lines);
    assert!(got == expected, "a late consumer lost output: {}\n{}", describe_loss(&expected, &got), ctrd.logs());
    assert_clean(&ctrd, "late-read");
}

#[test]
fn close_io_ends_stdin_after_every_byte() {
    let Some(ctrd) = setup("close_io_ends_stdin_after_every_byte") else { return };
    let input = tern_tests::pseudo_random(1 << 20);
    // ctr copies its stdin to the FIFO and, at EOF, calls CloseIO before closing its writer.
    let cmd = ctr_command(&ctrd, &ctr_run_args(&["--rm"], "cat", &["sh", "-c", "cat; echo; echo stdin-eof"]));
    let mut ctr_run = Background::spawn(cmd, Stdio::piped());
    let mut stdin = ctr_run.child().stdin.take().unwrap();
    let feed = input.clone();
    let feeder = std::thread::spawn(move || stdin.write_all(&feed));
    let out = ctr_run.finish(RUN_LIMIT).unwrap_or_else(|| panic!("cat never saw EOF\n{}", ctrd.logs()));
    feeder.join().unwrap().unwrap();
    assert!(out.status.success(), "ctr run failed: {}\n{}", stderr(&out), ctrd.logs());
    let mut expected = input;
    expected.extend_from_slice(b"\nstdin-eof\n");
    assert!(
        out.stdout == expected,
        "stdin did not come back byte-exact before EOF: {}\n--- ctr stderr ---\n{}\n{}",
        describe_loss(&expected, &out.stdout),
        stderr(&out),
        ctrd.logs()
    );
    assert_clean(&ctrd, "cat");
}

/// How long the guest kernel waits, after a vsock socket is closed, for the host to end the
/// connection before it resets the connection itself (`VSOCK_CLOSE_TIMEOUT`, 8 s in Linux).
const GUEST_VSOCK_CLOSE_TIMEOUT: Duration = Duration::from_secs(8);

/// Output the process has written and the agent has sent off is delivered even when nobody
/// reads it until after the guest gave up on the closed stream: the process writes more than
/// the FIFO and the socket and copy buffers behind the device hold (so the device keeps the
/// rest), exits, and the reader attaches only after the guest's close timeout sent its reset.
#[test]
fn output_outlives_the_guest_closing_its_stream() {
    let Some(ctrd) = setup("output_outlives_the_guest_closing_its_stream") else { return };
    let fifo_dir = ctrd.dir().join("fifo");
    let fifo_flag = format!("--fifo-dir={}", fifo_dir.display());
    // 398,895 bytes: more than the FIFO, the shim's copy buffer and its socket hold (~0.23 MiB),
    // less than that plus the device's 256 KiB window, so the agent sends the last byte and
    // closes its stream with nobody reading.
    let lines = 70_000;
    let out = ctrd.ctr(&ctr_run_args(&["-d", &fifo_flag], "pause", &["seq", "1", &lines.to_string()]), RUN_LIMIT);
    assert!(out.status.success(), "ctr run -d failed: {}\n{}", stderr(&out), ctrd.logs());
    assert!(wait_status(&ctrd, "pause", "STOPPED", RUN_LIMIT).is_some(), "seq never ended\n{}", ctrd.logs());
    std::thread::sleep(GUEST_VSOCK_CLOSE_TIMEOUT * 2);

    let out = ctrd.ctr(&["task", "attach", "pause"], TASK_OP_LIMIT);
    assert!(out.status.success(), "ctr task attach failed: {}\n{}", stderr(&out), ctrd.logs());
    let expected = seq_output(lines);
    assert!(
        out.stdout == expected,
        "output lost behind a late reader: {}\n{}",
        describe_loss(&expected, &out.stdout),
        ctrd.logs()
    );
    let _ = ctrd.ctr(&["task", "delete", "pause"], TASK_OP_LIMIT);
    let out = ctrd.ctr(&["container", "delete", "pause"], TASK_OP_LIMIT);
    assert!(out.status.success(), "ctr container delete failed: {}", stderr(&out));
    assert_clean(&ctrd, "pause");
}

/// Where `got` departs from `expected`: its length, whether it ends like `expected` does, the
/// offset of the first differing byte, and whether the rest is missing (a prefix), a hole (the
/// tail realigns with `expected` further on) or something else.
fn describe_loss(expected: &[u8], got: &[u8]) -> String {
    let first_diff = expected.iter().zip(got).position(|(a, b)| a != b).unwrap_or(expected.len().min(got.len()));
    let tail = &expected[expected.len().saturating_sub(11)..];
    let mut report = format!(
        "got {} of {} bytes (sha256 {} vs {}), ends like the expected output ({:?}): {}, first difference at offset {}",
        got.len(),
        expected.len(),
        sha256_hex(got),
        sha256_hex(expected),
        String::from_utf8_lossy(tail),
        got.ends_with(tail),
        first_diff
    );
    let rest = &got[first_diff..];
    if rest.is_empty() {
        report.push_str(&format!(", a prefix: the last {} bytes are missing", expected.len() - got.len()));
        return report;
    }
    // The shortest hole after which the output goes on with `expected` to its end.
    let probe = &rest[..rest.len().min(64)];
    let realigned = (first_diff..expected.len())
        .find(|&at| expected[at..].starts_with(probe))
        .map(|at| (at, expected[at..].starts_with(rest) && at + rest.len() == expected.len()));
    match realigned {
        Some((at, true)) => report.push_str(&format!(
            ", a hole: bytes {first_diff}..{at} ({} bytes) are missing, everything after them arrived",
            at - first_diff
        )),
        Some((at, false)) => {
            let agree = expected[at..].iter().zip(rest).take_while(|(a, b)| a == b).count();
            report.push_str(&format!(
                ", a hole of {} bytes at {first_diff}: the output resumes at expected offset {at} and agrees for {agree} \
                 bytes, then differs again (output offset {})",
                at - first_diff,
                first_diff + agree
            ));
        }
        None => report.push_str(&format!(
            ", the {} bytes from there on are found nowhere later in the expected output (first: {:02x?})",
            rest.len(),
            &rest[..rest.len().min(16)]
        )),
    }
    report
}

/// Lines of a child's stdout, as they come (a reader thread feeds the channel).
fn line_channel(out: impl Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// Issue 11, bug 1 through the shim's CloseIO path: `ctr run` with stdin attached (always, in
/// the ctr 1.6 Debian ships; `-i` in later ones) driven as a program drives it — a line
/// written and its echo read, five times with pauses, then stdin closed — ends.
/// Also, the shim's `start` reaps a run directory whose owner died without cleaning up.
#[test]
fn interactive_stdin_then_close_ends_ctr_run() {
    let Some(ctrd) = setup("interactive_stdin_then_close_ends_ctr_run") else { return };
    let stale = ctrd.dir().join("vm/sb-0123456789abcdef01234567");
    std::fs::create_dir_all(&stale).unwrap();
    let mut dead = Command::new("true").spawn().unwrap();
    let dead_pid = dead.id();
    dead.wait().unwrap();
    std::fs::write(stale.join("owner"), format!("{dead_pid} 1\n")).unwrap();

    let cmd = ctr_command(&ctrd, &ctr_run_args(&["--rm"], "interactive", &["sh", "-c", "echo READY; exec cat"]));
    let mut ctr_run = Background::spawn(cmd, Stdio::piped());
    let mut stdin = ctr_run.child().stdin.take().unwrap();
    let lines = line_channel(ctr_run.child().stdout.take().unwrap());
    let expect = |want: &str, within: Duration| match lines.recv_timeout(within) {
        Ok(line) => assert_eq!(line, want),
        Err(e) => panic!("no {want:?} from ctr run ({e})\n{}", ctrd.logs()),
    };
    expect("READY", RUN_LIMIT);
    for i in 0..5 {
        let line = format!("line {i}");
        stdin.write_all(format!("{line}\n").as_bytes()).unwrap();
        stdin.flush().unwrap();
        expect(&line, TASK_OP_LIMIT);
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(stdin);
    let out = ctr_run
        .finish(TASK_OP_LIMIT)
        .unwrap_or_else(|| panic!("ctr run still runs after its stdin closed\n{}", ctrd.logs()));
    assert!(out.status.success(), "ctr run failed: {}\n{}", stderr(&out), ctrd.logs());
    assert!(!stale.exists(), "the shim's start left the dead owner's run directory");
    assert_clean(&ctrd, "interactive");
}

#[test]
fn sigkill_of_the_shim_leaves_nothing_behind() {
    let Some(ctrd) = setup("sigkill_of_the_shim_leaves_nothing_behind") else { return };
    let fifo_dir = ctrd.dir().join("fifo");
    let fifo_flag = format!("--fifo-dir={}", fifo_dir.display());
    let cmd = ctr_command(&ctrd, &ctr_run_args(&["--rm", &fifo_flag], "victim", &["sleep", "1000"]));
    let ctr_run = Background::spawn(cmd, Stdio::null());
    assert!(wait_status(&ctrd, "victim", "RUNNING", RUN_LIMIT).is_some(), "the task never ran\n{}", ctrd.logs());

    // What a live sandbox has: one shim, its socket, a run directory with the vsock socket,
    // the rootfs mounted in the bundle.
    let pids = ctrd.shim_pids();
    assert_eq!(pids.len(), 1, "shims: {pids:?}");
    let bundle = bundle_of(&ctrd, "victim");
    let address = std::fs::read_to_string(bundle.join("address")).expect("the shim's address in the bundle");
    let socket = PathBuf::from(address.trim().trim_start_matches("unix://"));
    assert!(socket.exists(), "no shim socket at {}", socket.display());
    let dirs = run_dirs(&ctrd);
    assert!(
        dirs.len() == 1 && dirs[0].join("vsock.sock").exists(),
        "expected one sandbox run directory with the vsock socket: {dirs:?}"
    );
    let rootfs = bundle.join("rootfs").to_string_lossy().into_owned();
    assert!(ctrd.mounts_left().contains(&rootfs), "rootfs not mounted: {:?}", ctrd.mounts_left());

    // SAFETY: kill(2) on the shim of our own containerd (matched by its socket address).
    assert_eq!(unsafe { libc::kill(pids[0], libc::SIGKILL) }, 0);

    // containerd notices the dead shim, runs `shim delete` and reports the task gone; ctr run
    // ends (its Wait fails) and removes the container.
    let out = ctr_run.finish(RUN_LIMIT).unwrap_or_else(|| panic!("ctr run hung after the shim died\n{}", ctrd.logs()));
    assert!(!out.status.success(), "ctr run succeeded although its shim was killed");
    let _ = ctrd.ctr(&["task", "delete", "victim"], TASK_OP_LIMIT);
    let _ = ctrd.ctr(&["container", "delete", "victim"], TASK_OP_LIMIT);
    assert_clean(&ctrd, "victim");
    let status = std::fs::read_to_string(format!("/proc/{}/status", pids[0])).unwrap_or_default();
    assert!(status.is_empty() || status.contains("State:\tZ"), "the shim (and its VM threads) still run:\n{status}");
    assert!(!socket.exists(), "the dead shim's socket {} was left behind", socket.display());
    // The FIFOs are ctr's (it made them and removes them itself unless it fails, as here, and
    // for runc alike); nothing may still hold them open.
    assert_eq!(holders_of(&fifo_dir), Vec::<String>::new(), "processes still hold the task's FIFOs");
}

#[test]
fn guest_kernel_panic_stops_the_task_and_cleans_up() {
    let Some(ctrd) = setup("guest_kernel_panic_stops_the_task_and_cleans_up") else { return };
    // The guest kernel has no magic SysRq, so the container panics it the other way a
    // workload can: `vm.panic_on_oom` (through a proc mount of its own, /proc/sys being
    // read-only in the container) and a tmpfs filled past the guest's memory.
    let script = "mount -t proc proc /root && echo 1 > /root/sys/vm/panic_on_oom && \
                  mount -t tmpfs -o size=100% fill /tmp && cat /dev/zero > /tmp/fill; echo survived";
    let out = ctrd.ctr(&ctr_run_args(&["-d", "--cap-add", "CAP_SYS_ADMIN"], "panic", &["sh", "-c", script]), RUN_LIMIT);
    assert!(out.status.success(), "ctr run -d failed: {}\n{}", stderr(&out), ctrd.logs());
    let stopped = wait_status(&ctrd, "panic", "STOPPED", RUN_LIMIT);
    assert!(stopped.is_some(), "the task did not stop after the guest panicked\n{}", ctrd.logs());
    let console = std::fs::read_to_string(ctrd.dir().join("console.log")).unwrap_or_default();
    assert!(console.contains("Kernel panic"), "the guest did not panic; console:\n{console}\n{}", ctrd.logs());
    let out = ctrd.ctr(&["task", "delete", "panic"], TASK_OP_LIMIT);
    assert!(out.status.success(), "ctr task delete failed: {}\n{}", stderr(&out), ctrd.logs());
    // The exit is reported as a kill (137), not as success: the workload did not finish.
    assert!(
        stderr(&out).contains("137") || stdout(&out).contains("137"),
        "expected exit 137 from ctr task delete: {} {}",
        stdout(&out),
        stderr(&out)
    );
    let out = ctrd.ctr(&["container", "delete", "panic"], TASK_OP_LIMIT);
    assert!(out.status.success(), "ctr container delete failed: {}", stderr(&out));
    assert_clean(&ctrd, "panic");
}

#[test]
fn seq_prefix_check_rejects_gaps() {
    let all = seq_output(2000);
    assert!(is_seq_prefix(&all));
    assert!(is_seq_prefix(&all[..1234]));
    assert!(is_seq_prefix(b""));
    let mut gap = all.clone();
    gap.drain(100..110);
    assert!(!is_seq_prefix(&gap));
}
