//! End to end through a real containerd: `ctr` → containerd → `containerd-shim-tern-v2` →
//! microVM → container. Each test starts its own containerd (see `tern_tests::containerd`).

use std::time::Duration;

use tern_tests::containerd::{ctr_run_args, stderr, stdout, TestContainerd};

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
    assert_eq!(stdout(&out), "hello\n", "stderr: {}\n{}", stderr(&out), ctrd.logs());
    assert_clean(&ctrd);

    let out = ctrd.run_rm("exit3", &["sh", "-c", "echo to-stderr >&2; exit 3"], RUN_LIMIT);
    assert_eq!(out.status.code(), Some(3), "stderr: {}\n{}", stderr(&out), ctrd.logs());
    assert!(stderr(&out).contains("to-stderr"), "{}\n{}", stderr(&out), ctrd.logs());
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

/// The pids `ctr task ps` lists.
fn task_pids(ctrd: &TestContainerd, id: &str) -> Vec<u32> {
    stdout(&ctrd.ctr(&["task", "ps", id], RUN_LIMIT))
        .lines()
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect()
}

/// Poll `ctr task ls` until task `id` has `status`.
fn wait_status(ctrd: &TestContainerd, id: &str, status: &str, limit: Duration) -> bool {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let tasks = stdout(&ctrd.ctr(&["task", "ls"], RUN_LIMIT));
        if tasks.lines().any(|l| l.starts_with(id) && l.contains(status)) {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn ps_kill_all_wait_delete_of_a_task_with_children() {
    let Some(ctrd) = setup("ps_kill_all_wait_delete_of_a_task_with_children") else { return };
    let ctr = |args: &[&str]| ctrd.ctr(args, RUN_LIMIT);
    // A shell waiting for two sleeps. As PID 1 of its namespace without a handler it ignores
    // SIGTERM, so a plain kill leaves it running; `kill --all` reaches the sleeps too, their
    // end ends the shell's wait and the shell.
    let script = "sleep 1000 & sleep 1000 & wait";
    let out = ctr(&ctr_run_args(&["-d"], "sleeper", &["sh", "-c", script]));
    assert!(out.status.success(), "ctr run -d failed: {}\n{}", stderr(&out), ctrd.logs());
    assert!(
        wait_status(&ctrd, "sleeper", "RUNNING", Duration::from_secs(10)),
        "task ls: {}",
        stdout(&ctr(&["task", "ls"]))
    );

    // ps lists the children as well as the init.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut pids = task_pids(&ctrd, "sleeper");
    while pids.len() < 3 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        pids = task_pids(&ctrd, "sleeper");
    }
    assert_eq!(pids.len(), 3, "ctr task ps should list sh and both sleeps: {pids:?}\n{}", ctrd.logs());

    let out = ctr(&["task", "kill", "--signal", "SIGTERM", "sleeper"]);
    assert!(out.status.success(), "ctr task kill failed: {}\n{}", stderr(&out), ctrd.logs());
    std::thread::sleep(Duration::from_secs(2));
    assert!(wait_status(&ctrd, "sleeper", "RUNNING", Duration::ZERO), "SIGTERM to the init alone should not stop it");
    assert_eq!(task_pids(&ctrd, "sleeper"), pids, "SIGTERM to the init alone should kill no process");

    let out = ctr(&["task", "kill", "--all", "--signal", "SIGTERM", "sleeper"]);
    assert!(out.status.success(), "ctr task kill --all failed: {}\n{}", stderr(&out), ctrd.logs());
    assert!(
        wait_status(&ctrd, "sleeper", "STOPPED", Duration::from_secs(10)),
        "the task did not stop after kill --all SIGTERM\n{}",
        ctrd.logs()
    );
    let out = ctr(&["task", "delete", "sleeper"]);
    assert!(out.status.success(), "ctr task delete failed: {}\n{}", stderr(&out), ctrd.logs());
    let out = ctr(&["container", "delete", "sleeper"]);
    assert!(out.status.success(), "ctr container delete failed: {}", stderr(&out));
    assert_clean(&ctrd);
}

/// `ctr run --with-ns network:PATH` connects the container's VM to that namespace, as CRI does
/// for a pod: the guest has the veth's address and reaches the host end; deleting the
/// container leaves no tap or tc state in the namespace.
#[test]
fn ctr_run_with_a_network_namespace_gets_its_interface() {
    let Some(ctrd) = setup("ctr_run_with_a_network_namespace_gets_its_interface") else { return };
    let net = tern_tests::netns::TestPodNetwork::new("c", 232);
    let with_ns = format!("network:{}", net.path());
    let script = format!("ip -o addr show dev eth0; ping -c 1 -W 10 {}", net.gateway);
    let args = ctr_run_args(&["--rm", "--with-ns", &with_ns], "netns", &["sh", "-c", &script]);
    let out = ctrd.ctr(&args, RUN_LIMIT);
    assert!(out.status.success(), "ctr run failed: {}\nstdout: {}\n{}", stderr(&out), stdout(&out), ctrd.logs());
    assert!(stdout(&out).contains(&format!("inet {}/24", net.pod_ip)), "{}", stdout(&out));
    assert!(stdout(&out).contains("1 packets received"), "{}", stdout(&out));
    assert_clean(&ctrd);
    assert_eq!(net.leftovers(), Vec::<String>::new(), "tern left state in the container's netns");
}
