//! Real-guest tests for `tern run`: every test here boots the real guest kernel + initramfs on
//! KVM (through tests/nested-runner on hosts whose KVM cannot boot Linux).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use sha2::{Digest, Sha256};
use std::time::Duration;
use tern_tests::{require_linux_kvm, tern, tern_with_env, text};

/// Generous bound for one boot + command: nested virtualization under TCG is slow.
const BOOT_LIMIT: Duration = Duration::from_secs(240);

#[test]
fn echo_hello_prints_and_exits_zero() {
    if !require_linux_kvm("echo_hello_prints_and_exits_zero") {
        return;
    }
    let (out, _) = tern(&["run", "--", "echo", "hello"], b"", BOOT_LIMIT);
    let (stdout, stderr) = text(&out);
    assert_eq!(stdout, "hello\n", "stderr: {stderr}");
    assert_eq!(out.status.code(), Some(0), "stderr: {stderr}");
}

#[test]
fn exit_codes_and_signals_propagate() {
    if !require_linux_kvm("exit_codes_and_signals_propagate") {
        return;
    }
    let (out, _) = tern(&["run", "--", "sh", "-c", "echo to-stderr >&2; exit 7"], b"", BOOT_LIMIT);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(7), "stderr: {stderr}");
    assert_eq!(stdout, "");
    assert!(stderr.contains("to-stderr"), "stderr: {stderr}");

    let (out, _) = tern(&["run", "--", "sh", "-c", "kill -KILL $$"], b"", BOOT_LIMIT);
    assert_eq!(out.status.code(), Some(128 + 9), "stderr: {}", text(&out).1);
}

#[test]
fn vcpus_and_memory_are_what_was_asked() {
    if !require_linux_kvm("vcpus_and_memory_are_what_was_asked") {
        return;
    }
    let (out, _) = tern(
        &["run", "--vcpus", "2", "--memory", "384", "--", "sh", "-c", "nproc; grep MemTotal /proc/meminfo"],
        b"",
        BOOT_LIMIT,
    );
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "stderr: {stderr}");
    let mut lines = stdout.lines();
    assert_eq!(lines.next(), Some("2"), "stdout: {stdout}");
    let kib: u64 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no MemTotal in {stdout:?}"));
    // MemTotal is RAM minus what the kernel reserves for itself: within 20% below the size.
    assert!((384 * 1024 * 8 / 10..=384 * 1024).contains(&kib), "MemTotal {kib} KiB for --memory 384");
}

#[test]
fn ten_mib_through_stdin_comes_back_identical() {
    if !require_linux_kvm("ten_mib_through_stdin_comes_back_identical") {
        return;
    }
    // Deterministic pseudo-random bytes (xorshift) so every byte value appears.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let input: Vec<u8> = (0..10 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 32) as u8
        })
        .collect();
    let (out, _) = tern(&["run", "--", "cat"], &input, BOOT_LIMIT);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out).1);
    assert_eq!(out.stdout.len(), input.len());
    assert_eq!(Sha256::digest(&out.stdout), Sha256::digest(&input));
}

#[test]
fn four_vms_at_once() {
    if !require_linux_kvm("four_vms_at_once") {
        return;
    }
    let handles: Vec<_> = (0..4)
        .map(|i| {
            std::thread::spawn(move || {
                let (out, _) = tern(&["run", "--", "sh", "-c", &format!("echo vm-{i}")], b"", BOOT_LIMIT);
                (i, out)
            })
        })
        .collect();
    for h in handles {
        let (i, out) = h.join().unwrap_or_else(|_| panic!("a VM thread panicked"));
        let (stdout, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(0), "vm {i} stderr: {stderr}");
        assert_eq!(stdout, format!("vm-{i}\n"));
    }
}

#[test]
fn missing_kernel_is_a_clear_error() {
    // No KVM needed for this one: the file check happens before the VM exists.
    let (out, elapsed) = tern(&["run", "--kernel", "/nonexistent/vmlinux", "--", "true"], b"", BOOT_LIMIT);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(125), "stderr: {stderr}");
    assert!(stderr.contains("/nonexistent/vmlinux") && stderr.contains("not found"), "stderr: {stderr}");
    assert!(elapsed < Duration::from_secs(10));
}

#[test]
fn corrupt_kernel_is_a_clear_error() {
    if !require_linux_kvm("corrupt_kernel_is_a_clear_error") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("vmlinux");
    std::fs::write(&bad, b"\x7fELF this is not really a kernel").unwrap();
    let run_dir = dir.path().join("run");
    let (out, elapsed) = tern_with_env(
        &["run", "--kernel", bad.to_str().unwrap(), "--", "true"],
        b"",
        BOOT_LIMIT,
        &[("TERN_RUN_DIR", run_dir.to_str().unwrap())],
    );
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(125), "stderr: {stderr}");
    assert!(stderr.to_lowercase().contains("kernel"), "stderr: {stderr}");
    assert!(elapsed < Duration::from_secs(30), "took {elapsed:?}");
    assert_run_dir_empty(&run_dir);
}

#[test]
fn too_small_memory_is_a_clear_error() {
    if !require_linux_kvm("too_small_memory_is_a_clear_error") {
        return;
    }
    let (out, elapsed) = tern(&["run", "--memory", "4", "--", "true"], b"", BOOT_LIMIT);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(125), "stderr: {stderr}");
    assert!(stderr.to_lowercase().contains("memory"), "stderr: {stderr}");
    assert!(elapsed < Duration::from_secs(30), "took {elapsed:?}");
}

#[test]
fn agent_that_never_answers_times_out_cleanly() {
    if !require_linux_kvm("agent_that_never_answers_times_out_cleanly") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // An /init that says so on the serial console and never starts an agent.
    let initrd = tern_tests::busybox_initramfs(
        dir.path(),
        "#!/bin/sh\n/bin/busybox mkdir -p /dev\n/bin/busybox mount -t devtmpfs dev /dev\n\
         echo 'tern-test: no agent in this guest' > /dev/ttyS0\n/bin/busybox sleep 100000\n",
    );
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "[vm]\nagent_timeout_secs = 20\n").unwrap();
    let run_dir = dir.path().join("run");
    let (out, elapsed) = tern_with_env(
        &["run", "--config", config.to_str().unwrap(), "--initrd", initrd.to_str().unwrap(), "--", "true"],
        b"",
        BOOT_LIMIT,
        &[("TERN_RUN_DIR", run_dir.to_str().unwrap())],
    );
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(125), "stderr: {stderr}");
    // The error says what was tried last and what the guest did: it ran (vCPU exits), and
    // its console, discarded by default, is quoted.
    assert!(stderr.contains("the agent never became ready"), "stderr: {stderr}");
    assert!(stderr.contains("agent did not answer within 20s (last attempt: "), "stderr: {stderr}");
    assert!(stderr.contains("guest console ended with: tern-test: no agent in this guest"), "stderr: {stderr}");
    let exits: u64 = stderr
        .split("guest: ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no vCPU exit count in: {stderr}"));
    assert!(exits > 0, "stderr: {stderr}");
    assert!(elapsed < Duration::from_secs(90), "took {elapsed:?}");
    assert_run_dir_empty(&run_dir);
}

/// Every sandbox run dir under `dir` must be gone after tern exits.
fn assert_run_dir_empty(dir: &std::path::Path) {
    let leftovers: Vec<_> = match std::fs::read_dir(dir) {
        Ok(rd) => rd.filter_map(|e| e.ok()).map(|e| e.path()).collect(),
        Err(_) => Vec::new(),
    };
    assert!(leftovers.is_empty(), "leaked run dirs: {leftovers:?}");
}
