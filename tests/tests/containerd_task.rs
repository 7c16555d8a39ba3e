//! The rest of the Task API through a real containerd and `ctr`: exec processes, terminals
//! and resize, pause/resume, metrics, resource updates and stdin EOF. One detached container
//! hosts most checks, so the number of VM boots stays small (each is slow under the nested
//! runner's emulation).
// Tests may unwrap (common rules); a failed setup step should stop the test right there.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use tern_tests::containerd::{
    ctr_run_args, stderr, stdout, TestContainerd, BUSYBOX_IMAGE, NAMESPACE, SNAPSHOTTER, TERN_RUNTIME,
};

/// One `ctr` call that may include a VM boot.
const LIMIT: Duration = Duration::from_secs(180);

/// KVM guard plus containerd availability; `None` means skip.
fn setup(test: &str) -> Option<TestContainerd> {
    tern_tests::containerd::containerd_for_test(test)
}

/// `ctr` with this containerd's address and namespace, as a shell word list (for `script`).
fn ctr_prefix(ctrd: &TestContainerd) -> String {
    format!("ctr --address {} --namespace {NAMESPACE}", ctrd.dir().join("ctrd.sock").display())
}

/// Run `ctr args` feeding `input` on stdin; killed after `limit`.
fn ctr_with_stdin(ctrd: &TestContainerd, args: &[&str], input: &[u8], limit: Duration) -> Output {
    let mut child = Command::new("ctr")
        .arg("--address")
        .arg(ctrd.dir().join("ctrd.sock"))
        .arg("--namespace")
        .arg(NAMESPACE)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    // Then EOF: ctr closes its FIFO end and calls CloseIO.
    let feeder = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let pid = child.id() as i32;
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if done_rx.recv_timeout(limit).is_err() {
            // SAFETY: kill(2) on our own child, not yet reaped.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    });
    let out = child.wait_with_output().unwrap();
    let _ = done_tx.send(());
    watchdog.join().unwrap();
    feeder.join().unwrap();
    out
}

/// Run a shell command line under `script` (a pty), as `ctr -t` needs a terminal.
fn under_pty(command: &str, limit: Duration) -> Output {
    let mut cmd = Command::new("script");
    cmd.args(["-qec", command, "/dev/null"]);
    tern_tests::containerd::run_bounded(cmd, limit)
}

fn task_status(ctrd: &TestContainerd, id: &str) -> Option<String> {
    let out = ctrd.ctr(&["task", "ls"], LIMIT);
    stdout(&out)
        .lines()
        .find(|l| l.split_whitespace().next() == Some(id))
        .and_then(|l| l.split_whitespace().nth(2).map(str::to_owned))
}

fn wait_status(ctrd: &TestContainerd, id: &str, want: &str, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if task_status(ctrd, id).as_deref() == Some(want) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

/// The value of `name` in `ctr task metrics`' table.
fn metric(table: &str, name: &str) -> Option<u64> {
    table.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        (f.next() == Some(name)).then(|| f.next()?.parse().ok()).flatten()
    })
}

/// Host path of a file in a task's rootfs (the shim mounts it in the bundle; the guest writes
/// through virtio-fs).
fn rootfs_file(ctrd: &TestContainerd, id: &str, rel: &str) -> PathBuf {
    ctrd.dir().join("state/io.containerd.runtime.v2.task").join(NAMESPACE).join(id).join("rootfs").join(rel)
}

fn read_counter(path: &PathBuf) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Send `Update` with `resources_json` (OCI LinuxResources) to the shim of task `id`, through
/// the ttrpc address the shim recorded in the bundle.
fn shim_update(ctrd: &TestContainerd, id: &str, resources_json: &[u8]) {
    use containerd_shim_protos::protobuf::well_known_types::any::Any;
    use containerd_shim_protos::protobuf::MessageField;
    let bundle = ctrd.dir().join("state/io.containerd.runtime.v2.task").join(NAMESPACE).join(id);
    let address = std::fs::read_to_string(bundle.join("address")).unwrap();
    let client = containerd_shim_protos::ttrpc::Client::connect(address.trim()).unwrap();
    let task = containerd_shim_protos::TaskClient::new(client);
    let resources = Any {
        type_url: "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources".into(),
        value: resources_json.to_vec(),
        ..Default::default()
    };
    let req = containerd_shim_protos::api::UpdateTaskRequest {
        id: id.into(),
        resources: MessageField::some(resources),
        ..Default::default()
    };
    let ctx = containerd_shim_protos::ttrpc::context::with_timeout(Duration::from_secs(60).as_nanos() as i64);
    if let Err(e) = task.update(ctx, &req) {
        panic!("Update: {e:?}\n{}", ctrd.logs());
    }
}

/// Kill, delete and check that the shim (and VM) went away.
fn remove_task(ctrd: &TestContainerd, id: &str) {
    let _ = ctrd.ctr(&["task", "kill", "--signal", "SIGKILL", id], LIMIT);
    assert!(wait_status(ctrd, id, "STOPPED", Duration::from_secs(60)), "{id} did not stop\n{}", ctrd.logs());
    let out = ctrd.ctr(&["task", "delete", id], LIMIT);
    assert!(out.status.success(), "task delete: {}\n{}", stderr(&out), ctrd.logs());
    let out = ctrd.ctr(&["container", "delete", id], LIMIT);
    assert!(out.status.success(), "container delete: {}", stderr(&out));
    assert!(ctrd.wait_no_shims(Duration::from_secs(30)), "a shim outlived its tasks\n{}", ctrd.logs());
}

#[test]
fn task_api_exec_pause_metrics_update_and_stdin_eof() {
    let Some(ctrd) = setup("task_api_exec_pause_metrics_update_and_stdin_eof") else { return };
    let ctr = |args: &[&str]| ctrd.ctr(args, LIMIT);
    let mut events = EventLog::start(&ctrd);
    // The init writes a marker into its rootfs, then counts forever.
    let init = "echo init-wrote > /tmp/marker; i=0; while true; do i=$((i+1)); echo $i > /tmp/count; sleep 0.2; done";
    // ctr's default spec has no /sys/fs/cgroup mount; ask for one to read limits inside.
    let cgroup_mount = "type=cgroup,src=cgroup,dst=/sys/fs/cgroup,options=ro:nosuid:noexec:nodev";
    let out = ctr(&ctr_run_args(&["-d", "--mount", cgroup_mount], "box", &["sh", "-c", init]));
    assert!(out.status.success(), "ctr run -d: {}\n{}", stderr(&out), ctrd.logs());
    let counter = rootfs_file(&ctrd, "box", "tmp/count");
    let deadline = Instant::now() + Duration::from_secs(60);
    while read_counter(&counter).is_none() {
        assert!(Instant::now() < deadline, "the init never counted\n{}", ctrd.logs());
        std::thread::sleep(Duration::from_millis(200));
    }

    // Exec: same root (sees the init's file), same PID namespace (PID 1 is the init's sh).
    let out = ctr(&[
        "task",
        "exec",
        "--exec-id",
        "e1",
        "box",
        "sh",
        "-c",
        "cat /tmp/marker; echo pid=$$; head -c 100 /proc/1/cmdline",
    ]);
    assert!(out.status.success(), "exec: {}\n{}", stderr(&out), ctrd.logs());
    let text = stdout(&out);
    assert!(text.starts_with("init-wrote\npid="), "exec output: {text:?}");
    assert!(!text.contains("pid=1\n"), "the exec is not PID 1: {text:?}");
    assert!(text.contains("init-wrote > /tmp/marker"), "PID 1 of the exec's namespace is the init: {text:?}");
    // Exit codes of execs, and their ids are reusable after delete.
    let out = ctr(&["task", "exec", "--exec-id", "e2", "box", "sh", "-c", "echo err >&2; exit 7"]);
    assert_eq!(out.status.code(), Some(7), "exec exit code: {}\n{}", stderr(&out), ctrd.logs());
    assert!(stderr(&out).contains("err"), "exec stderr: {}", stderr(&out));
    let out = ctr(&["task", "exec", "--exec-id", "e1", "box", "true"]);
    assert!(out.status.success(), "exec id reuse: {}", stderr(&out));

    // A terminal exec: its own pty in the container, sized by ctr's ResizePty.
    let wait_size = r#"while [ "$(busybox stty size)" = "0 0" ]; do sleep 0.1; done"#;
    let script = format!(
        "stty rows 21 cols 77; {} task exec -t --exec-id tt box sh -c '{wait_size}; echo \"exec-tty $(busybox stty size) $(busybox tty)\"'",
        ctr_prefix(&ctrd)
    );
    let out = under_pty(&script, LIMIT);
    assert!(out.status.success(), "ctr task exec -t: {}{}\n{}", stdout(&out), stderr(&out), ctrd.logs());
    assert!(stdout(&out).contains("exec-tty 21 77 /dev/pts/"), "exec -t output: {:?}", stdout(&out));

    // stdin EOF via CloseIO: byte-exact through cat, and cat ends.
    let data: Vec<u8> = (0..256 * 1024u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let out = ctr_with_stdin(&ctrd, &["task", "exec", "--exec-id", "cat", "box", "cat"], &data, LIMIT);
    assert!(out.status.success(), "exec cat: {}\n{}", stderr(&out), ctrd.logs());
    assert!(out.stdout == data, "cat returned {} bytes, want {} identical bytes", out.stdout.len(), data.len());

    // Metrics: real cgroup v2 numbers.
    let out = ctr(&["task", "metrics", "box"]);
    assert!(out.status.success(), "metrics: {}\n{}", stderr(&out), ctrd.logs());
    let table = stdout(&out);
    assert!(metric(&table, "memory.usage").is_some_and(|v| v > 0), "metrics: {table}");
    assert!(metric(&table, "pids.current").is_some_and(|v| v >= 1), "metrics: {table}");
    assert!(metric(&table, "cpu.usage_usec").is_some_and(|v| v > 0), "metrics: {table}");

    // Update (ctr 1.6 has no command for it: straight to the shim, as containerd would
    // send it): the memory limit is what the container's cgroup says.
    shim_update(&ctrd, "box", br#"{"memory":{"limit":67108864},"pids":{"limit":0}}"#);
    let read_max = "p=$(cat /proc/self/cgroup); p=${p#0::}; for f in /sys/fs/cgroup$p/memory.max /sys/fs/cgroup/memory.max; do if [ -r $f ]; then cat $f; exit 0; fi; done; exit 1";
    let out = ctr(&["task", "exec", "--exec-id", "mem", "box", "sh", "-c", read_max]);
    if !out.status.success() {
        let diag = ctr(&[
            "task",
            "exec",
            "--exec-id",
            "diag",
            "box",
            "sh",
            "-c",
            "cat /proc/self/cgroup; mount | grep cgroup; ls /sys/fs/cgroup",
        ]);
        panic!("read memory.max: {}{}\ndiagnostics: {}{}", stdout(&out), stderr(&out), stdout(&diag), stderr(&diag));
    }
    assert_eq!(stdout(&out).trim(), "67108864");
    let table = stdout(&ctr(&["task", "metrics", "box"]));
    assert_eq!(metric(&table, "memory.usage_limit"), Some(67_108_864), "metrics after update: {table}");

    // Past the limit: the OOM killer ends the hog (sort keeps every line in memory) and
    // containerd hears TaskOOM.
    let out = ctr(&[
        "task",
        "exec",
        "--exec-id",
        "hog",
        "box",
        "sh",
        "-c",
        "yes | head -c 50000000 | busybox sort > /dev/null; exit $?",
    ]);
    assert_eq!(out.status.code(), Some(137), "the hog was not OOM-killed: {}{}", stdout(&out), stderr(&out));
    let table = stdout(&ctr(&["task", "metrics", "box"]));
    assert!(metric(&table, "memory.usage_limit").is_some(), "{table}");

    // Pause: PAUSED, and the counter stands still; resume: it moves again.
    let out = ctr(&["task", "pause", "box"]);
    assert!(out.status.success(), "pause: {}\n{}", stderr(&out), ctrd.logs());
    assert_eq!(task_status(&ctrd, "box").as_deref(), Some("PAUSED"));
    let frozen_at = read_counter(&counter);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(read_counter(&counter), frozen_at, "the counter advanced while paused");
    let out = ctr(&["task", "exec", "--exec-id", "late", "box", "true"]);
    assert!(!out.status.success(), "exec into a paused container must fail");
    let out = ctr(&["task", "resume", "box"]);
    assert!(out.status.success(), "resume: {}\n{}", stderr(&out), ctrd.logs());
    assert_eq!(task_status(&ctrd, "box").as_deref(), Some("RUNNING"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while read_counter(&counter) == frozen_at {
        assert!(Instant::now() < deadline, "the counter did not move after resume");
        std::thread::sleep(Duration::from_millis(200));
    }

    // Unsupported requests say so.
    let out = ctr(&["task", "checkpoint", "box"]);
    assert!(!out.status.success(), "checkpoint must be refused");
    assert!(
        stderr(&out).to_lowercase().contains("not implemented") || stderr(&out).contains("not supported"),
        "{}",
        stderr(&out)
    );

    remove_task(&ctrd, "box");

    // Events, in containerd's documented order.
    let log = events.stop();
    let topics: Vec<(&str, &str)> =
        log.lines().filter_map(|l| l.split_whitespace().find(|w| w.starts_with("/tasks/")).map(|t| (t, l))).collect();
    let position = |topic: &str, needle: &str| topics.iter().position(|(t, l)| *t == topic && l.contains(needle));
    let e2 = "\"e2\"";
    let added = position("/tasks/exec-added", e2).unwrap_or_else(|| panic!("no exec-added for e2:\n{log}"));
    let started = position("/tasks/exec-started", e2).unwrap_or_else(|| panic!("no exec-started for e2:\n{log}"));
    let exited = position("/tasks/exit", e2).unwrap_or_else(|| panic!("no exit for e2:\n{log}"));
    assert!(added < started && started < exited, "exec events out of order:\n{log}");
    let paused = position("/tasks/paused", "box").unwrap_or_else(|| panic!("no paused event:\n{log}"));
    let resumed = position("/tasks/resumed", "box").unwrap_or_else(|| panic!("no resumed event:\n{log}"));
    assert!(paused < resumed, "{log}");
    assert!(position("/tasks/oom", "box").is_some(), "no oom event:\n{log}");
}

/// `ctr events` running in the background, its output going to a file.
struct EventLog {
    child: std::process::Child,
    path: PathBuf,
}

impl EventLog {
    fn start(ctrd: &TestContainerd) -> EventLog {
        let path = ctrd.dir().join("events.log");
        let file = std::fs::File::create(&path).unwrap();
        let child = Command::new("ctr")
            .arg("--address")
            .arg(ctrd.dir().join("ctrd.sock"))
            .args(["events"])
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        EventLog { child, path }
    }

    fn stop(&mut self) -> String {
        // Let the last events arrive.
        std::thread::sleep(Duration::from_secs(1));
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::fs::read_to_string(&self.path).unwrap_or_default()
    }
}

impl Drop for EventLog {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn task_api_terminal_and_resize() {
    let Some(ctrd) = setup("task_api_terminal_and_resize") else { return };
    let ctr = ctr_prefix(&ctrd);
    // The process waits for the first size (ctr's initial ResizePty), prints it, then prints
    // the size it has after the next SIGWINCH, which only a later resize can cause.
    let inner = r#"while [ "$(busybox stty size)" = "0 0" ]; do sleep 0.1; done; echo "first $(busybox stty size) $(busybox tty)"; trap 'echo "then $(busybox stty size)"; exit 0' WINCH; while :; do sleep 0.2; done"#;
    let script = format!(
        "stty rows 33 cols 101; {ctr} run -t --rm --snapshotter {SNAPSHOTTER} --runtime {TERN_RUNTIME} {BUSYBOX_IMAGE} tty1 sh -c '{}' & \
         until {ctr} task ls | grep -q '^tty1 .*RUNNING'; do sleep 0.5; done; sleep 4; \
         for s in '40 120' '41 121' '42 122' '43 123'; do set -- $s; stty rows $1 cols $2; sleep 4; done; wait $!",
        inner.replace('\'', r"'\''")
    );
    let out = under_pty(&script, Duration::from_secs(300));
    let text = stdout(&out);
    assert!(out.status.success(), "ctr run -t: {text}\n{}\n{}", stderr(&out), ctrd.logs());
    assert!(text.contains("first 33 101 /dev/"), "the process did not see the initial size: {text:?}");
    let then = text.lines().find_map(|l| l.trim().strip_prefix("then ").map(str::to_owned));
    assert!(
        matches!(then.as_deref(), Some("40 120" | "41 121" | "42 122" | "43 123")),
        "the process did not see the resize: {text:?}"
    );
    assert!(ctrd.wait_no_shims(Duration::from_secs(30)), "a shim outlived its tasks\n{}", ctrd.logs());

    // The init's stdin without a terminal: piped data, then EOF ends cat. The input fits in
    // the FIFO, so ctr reaches EOF before it has a task to send CloseIO to: the shim must
    // still deliver EOF once containerd's writer is gone (as runc's shim does).
    let data: Vec<u8> = (0..64 * 1024u32).map(|i| (i.wrapping_mul(40_503) >> 7) as u8).collect();
    let args = ctr_run_args(&["--rm"], "cat1", &["cat"]);
    let out = ctr_with_stdin(&ctrd, &args, &data, LIMIT);
    assert!(
        out.status.success(),
        "ctr run cat ({} of {} bytes back): {}\n{}",
        out.stdout.len(),
        data.len(),
        stderr(&out),
        ctrd.logs()
    );
    assert!(out.stdout == data, "cat returned {} bytes, want {} identical bytes", out.stdout.len(), data.len());
    assert!(ctrd.wait_no_shims(Duration::from_secs(30)), "a shim outlived its tasks\n{}", ctrd.logs());
}
