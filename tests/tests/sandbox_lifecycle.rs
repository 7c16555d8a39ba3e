//! The runtime library in-process: boot a sandbox, use it, shut it down, and check that no
//! thread, fd or run directory is left behind in this process.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::time::Duration;
use tern_protocol::{ErrorCode, ExecRequest, ExitStatus, StreamKind};
use tern_runtime::agent::AgentError;
use tern_runtime::config::Config;
use tern_runtime::sandbox::Sandbox;
use tern_tests::{require_linux_kvm, tern_bin};

fn count(dir: &str) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

/// This process's open fds and what each points at.
fn open_fds() -> Vec<String> {
    let mut fds: Vec<String> = std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.flatten()
                .map(|e| {
                    let target = std::fs::read_link(e.path()).map(|t| t.display().to_string()).unwrap_or_default();
                    format!("{} -> {target}", e.file_name().to_string_lossy())
                })
                .collect()
        })
        .unwrap_or_default();
    fds.sort();
    fds
}

fn config() -> Config {
    let mut c = Config::default();
    let dir = tern_bin().parent().map(|p| p.to_path_buf()).unwrap_or_default();
    c.vm.kernel = Some(dir.join(tern_runtime::config::KERNEL_FILE_NAME));
    c.vm.initrd = Some(dir.join(tern_runtime::config::INITRD_FILE_NAME));
    c
}

#[test]
fn boot_exec_stats_shutdown_leaves_nothing_behind() {
    if !require_linux_kvm("boot_exec_stats_shutdown_leaves_nothing_behind") {
        return;
    }
    let run_root = tempfile::tempdir().unwrap();
    std::env::set_var("TERN_RUN_DIR", run_root.path());
    let threads_before = count("/proc/self/task");
    let fds_before = open_fds();

    let sandbox = Sandbox::boot(&config()).expect("sandbox boots");
    let agent = sandbox.agent();
    let stats = agent.stats().expect("stats");
    assert!(stats.mem_total_kib > 100 * 1024, "{stats:?}");
    assert_eq!(stats.cpus, 1, "{stats:?}");

    agent
        .exec(ExecRequest { id: "p".into(), argv: vec!["sleep".into(), "1000".into()], ..Default::default() })
        .expect("exec");
    agent.signal("p", 15).expect("signal");
    assert_eq!(agent.wait("p").expect("wait"), ExitStatus::Signal(15));

    let err = agent
        .exec(ExecRequest { id: "q".into(), argv: vec!["/no/such/binary".into()], ..Default::default() })
        .expect_err("exec of a missing binary fails");
    assert!(err.to_string().contains("refused"), "{err}");

    // A stream for an unknown process is refused, by name, without harming the agent.
    let err = agent.attach("nope", StreamKind::Stdout).expect_err("a stream of an unknown process is refused");
    assert!(
        matches!(&err, AgentError::Remote { code: ErrorCode::NotFound, message } if message.contains("nope")),
        "{err:?}"
    );
    agent.health().expect("agent still healthy");

    let run_dir = sandbox.run_dir().to_path_buf();
    let exit = sandbox.shutdown(Duration::from_secs(30)).expect("clean shutdown");
    println!("VM ended with {exit:?}");
    assert!(!run_dir.exists(), "run dir {} leaked", run_dir.display());
    assert_eq!(count(run_root.path().to_str().unwrap()), 0);
    // Threads are joined by the time shutdown returns; fds closed.
    assert_eq!(count("/proc/self/task"), threads_before, "leaked threads");
    let fds_after = open_fds();
    assert_eq!(fds_after.len(), fds_before.len(), "leaked fds: before {fds_before:?}, after {fds_after:?}");
}
