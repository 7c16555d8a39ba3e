//! End to end through a real containerd: `ctr` → containerd → `containerd-shim-tern-v2` →
//! microVM → container. Each test starts its own containerd (see `tern_tests::containerd`).

use std::time::Duration;

use tern_tests::containerd::{stderr, stdout, TestContainerd, SNAPSHOTTER, TERN_RUNTIME, BUSYBOX_IMAGE};

/// One `ctr run` includes a VM boot, which is slow under the nested runner's emulation.
const RUN_LIMIT: Duration = Duration::from_secs(180);

/// KVM guard plus containerd availability; `None` means skip.
fn setup(test: &str) -> Option<TestContainerd> {
    tern_tests::containerd::containerd_for_test(test)
}

/// After the last task of a sandbox is gone, its shim (and VM) must be gone too, and no
/// mount may be left behind.
fn assert_clean(ctrd: &TestContainerd) {
    assert!(ctrd.wait_no_shims(Duration::from_secs(20)), "a shim outlived its tasks\n{}", ctrd.logs());
    let mounts: Vec<String> = ctrd.mounts_left().into_iter().filter(|m| m.contains("/state/")).collect();
    assert!(mounts.is_empty(), "bundle mounts left behind: {mounts:?}");
}

#[test]
fn ctr_run_prints_output_and_exit_codes() {
    let Some(ctrd) = setup("ctr_run_prints_output_and_exit_codes") else { return };
    let out = ctrd.run_rm("echo", &["echo", "hello"], RUN_LIMIT);
    assert!(out.status.success(), "ctr run failed: {}\n{}", stderr(&out), ctrd.logs());
    assert_eq!(stdout(&out), "hello\n");
    assert_clean(&ctrd);

    let out = ctrd.run_rm("exit3", &["sh", "-c", "echo to-stderr >&2; exit 3"], RUN_LIMIT);
    assert_eq!(out.status.code(), Some(3), "stderr: {}\n{}", stderr(&out), ctrd.logs());
    assert!(stderr(&out).contains("to-stderr"), "{}", stderr(&out));
    assert_clean(&ctrd);
}

#[test]
fn container_sees_its_own_root_and_pid_namespace() {
    let Some(ctrd) = setup("container_sees_its_own_root_and_pid_namespace") else { return };
    // PID 1 in its namespace, busybox as its root, the image's PATH.
    let out = ctrd.run_rm("ns", &["sh", "-c", "echo pid=$$; ls /bin/busybox; echo $PATH"], RUN_LIMIT);
    assert!(out.status.success(), "ctr run failed: {}\n{}", stderr(&out), ctrd.logs());
    assert_eq!(stdout(&out), "pid=1\n/bin/busybox\n/bin\n");
    assert_clean(&ctrd);
}

#[test]
fn kill_wait_delete_of_a_sleeping_task() {
    let Some(ctrd) = setup("kill_wait_delete_of_a_sleeping_task") else { return };
    let ctr = |args: &[&str]| ctrd.ctr(args, RUN_LIMIT);
    let out = ctr(&["run", "-d", "--snapshotter", SNAPSHOTTER, "--runtime", TERN_RUNTIME, BUSYBOX_IMAGE, "sleeper", "sleep", "1000"]);
    assert!(out.status.success(), "ctr run -d failed: {}\n{}", stderr(&out), ctrd.logs());
    let tasks = stdout(&ctr(&["task", "ls"]));
    assert!(tasks.lines().any(|l| l.starts_with("sleeper") && l.contains("RUNNING")), "task ls: {tasks}");

    let out = ctr(&["task", "kill", "--signal", "SIGKILL", "sleeper"]);
    assert!(out.status.success(), "ctr task kill failed: {}\n{}", stderr(&out), ctrd.logs());
    let mut stopped = false;
    for _ in 0..100 {
        let tasks = stdout(&ctr(&["task", "ls"]));
        if tasks.lines().any(|l| l.starts_with("sleeper") && l.contains("STOPPED")) {
            stopped = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(stopped, "the task did not stop after SIGKILL\n{}", ctrd.logs());
    let out = ctr(&["task", "delete", "sleeper"]);
    assert!(out.status.success(), "ctr task delete failed: {}\n{}", stderr(&out), ctrd.logs());
    let out = ctr(&["container", "delete", "sleeper"]);
    assert!(out.status.success(), "ctr container delete failed: {}", stderr(&out));
    assert_clean(&ctrd);
}
