//! Conformance of `tern fs-serve` (tern's virtio-fs file server as a vhost-user-fs backend)
//! against a frontend we did not write: Debian's QEMU (`-M microvm` with
//! `vhost-user-fs-device`) boots tern's guest kernel with a busybox script as /init, which
//! mounts the share with the kernel's own virtio-fs driver, reads a host-prepared file, writes,
//! renames and deletes, and reports what it saw on the serial console.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tern_tests::{require_linux_kvm, tern_bin};

/// One QEMU boot with the share, under nested virtualization.
const QEMU_LIMIT: Duration = Duration::from_secs(180);
/// fs-serve must be listening within this.
const LISTEN_LIMIT: Duration = Duration::from_secs(30);
/// fs-serve must exit this soon after QEMU (the frontend) went away.
const EXIT_LIMIT: Duration = Duration::from_secs(15);
const TAG: &str = "myfs";

/// The guest's /init: every step prints a `@@` marker line the test looks for.
const INIT_SCRIPT: &str = r#"#!/bin/sh
/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /proc /mnt
mount -t proc proc /proc
step() { name=$1; shift; if out=$("$@" 2>&1); then echo "@@$name ok"; else echo "@@$name failed: $out"; fi; }
step MOUNT mount -t virtiofs myfs /mnt
echo "@@SHA $(sha256sum /mnt/input.bin | cut -d' ' -f1)"
echo "@@CAT $(cat /mnt/hello.txt)"
step WRITE sh -c 'echo "written by the guest" > /mnt/guest.txt'
step MKDIR mkdir /mnt/newdir
step RENAME mv /mnt/guest.txt /mnt/newdir/renamed.txt
step UNLINK rm /mnt/delete-me.txt
echo "@@LS $(ls /mnt | tr '\n' ' ')"
echo "@@READBACK $(cat /mnt/newdir/renamed.txt 2>&1)"
sync
step UMOUNT umount /mnt
echo "@@DONE"
reboot -f
"#;

/// Wait for `child` at most `limit`; kill it past that. `None` on timeout.
fn wait_bounded(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Read a child's pipe to the end on a thread.
fn collect(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// The value after marker `@@NAME` in the console output ("" for a bare marker).
fn marker<'a>(console: &'a str, name: &str) -> Option<&'a str> {
    let prefix = format!("@@{name}");
    console.lines().find_map(|l| {
        let rest = l.trim_end_matches('\r').strip_prefix(prefix.as_str())?;
        if rest.is_empty() {
            Some(rest)
        } else {
            rest.strip_prefix(' ')
        }
    })
}

struct GuestRun {
    console: String,
    serve_stderr: String,
    serve_status: Option<ExitStatus>,
    socket_left: bool,
}

/// Start `tern fs-serve` on `share`, boot QEMU against it, and collect what happened.
fn run_guest(work: &Path, share: &Path, read_only: bool) -> GuestRun {
    let socket = work.join(if read_only { "ro.sock" } else { "rw.sock" });
    let mut args = vec![
        "fs-serve".to_string(),
        "--socket".into(),
        socket.display().to_string(),
        "--shared-dir".into(),
        share.display().to_string(),
        "--tag".into(),
        TAG.into(),
    ];
    if read_only {
        args.push("--read-only".into());
    }
    let mut serve = Command::new(tern_bin())
        .args(&args)
        // Its connection and shutdown messages, for the report when the guest gets stuck.
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let serve_stderr = collect(serve.stderr.take().unwrap());
    let deadline = Instant::now() + LISTEN_LIMIT;
    while !socket.exists() {
        if Instant::now() > deadline || serve.try_wait().unwrap().is_some() {
            let _ = serve.kill();
            let _ = serve.wait();
            panic!("fs-serve did not listen on {}: {}", socket.display(), serve_stderr.join().unwrap());
        }
        std::thread::sleep(Duration::from_millis(20));
    }

    let kernel = tern_bin().with_file_name("tern-vmlinux");
    let initrd = tern_tests::busybox_initramfs(work, INIT_SCRIPT);
    let mut qemu = Command::new("qemu-system-x86_64")
        .args(["-M", "microvm,acpi=off,memory-backend=mem", "-accel", "kvm", "-cpu", "host", "-m", "256"])
        .args(["-object", "memory-backend-memfd,id=mem,size=256M,share=on"])
        .arg("-chardev")
        .arg(format!("socket,id=fs0,path={}", socket.display()))
        .args(["-device", &format!("vhost-user-fs-device,chardev=fs0,tag={TAG}")])
        .args(["-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio", "-no-reboot"])
        .arg("-kernel")
        .arg(&kernel)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 quiet reboot=t panic=-1 8250.nr_uarts=1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu-system-x86_64 is installed");
    let console = collect(qemu.stdout.take().unwrap());
    let qemu_stderr = collect(qemu.stderr.take().unwrap());
    let qemu_status = wait_bounded(&mut qemu, QEMU_LIMIT);
    let console = console.join().unwrap();
    let qemu_stderr = qemu_stderr.join().unwrap();
    if qemu_status.is_none() {
        // QEMU is gone (killed): fs-serve should now end on its own; what it said tells
        // whether the frontend ever connected and sent requests.
        let serve_status = wait_bounded(&mut serve, EXIT_LIMIT);
        panic!(
            "QEMU did not finish within {QEMU_LIMIT:?}; console:\n{console}\nqemu stderr:\n{qemu_stderr}\n\
             fs-serve ({serve_status:?}) stderr:\n{}",
            serve_stderr.join().unwrap()
        );
    }

    let serve_status = wait_bounded(&mut serve, EXIT_LIMIT);
    GuestRun {
        console: format!("{console}\n--- qemu stderr ---\n{qemu_stderr}"),
        serve_stderr: serve_stderr.join().unwrap(),
        serve_status,
        socket_left: socket.exists(),
    }
}

/// The host tree both runs start from.
fn prepare_share(dir: &Path) -> Vec<u8> {
    let input = tern_tests::pseudo_random(1 << 20);
    std::fs::write(dir.join("input.bin"), &input).unwrap();
    std::fs::write(dir.join("hello.txt"), "hello from the host").unwrap();
    std::fs::write(dir.join("delete-me.txt"), "doomed").unwrap();
    input
}

fn assert_served_and_exited(run: &GuestRun) {
    let ctx = format!("console:\n{}\nfs-serve stderr:\n{}", run.console, run.serve_stderr);
    assert!(
        matches!(run.serve_status, Some(s) if s.success()),
        "fs-serve did not exit 0 after QEMU left ({:?}); {ctx}",
        run.serve_status
    );
    assert!(!run.socket_left, "fs-serve left its socket behind");
}

#[test]
fn vhost_user_qemu_mounts_reads_and_writes_a_tern_share() {
    if !require_linux_kvm("vhost_user_qemu_mounts_reads_and_writes_a_tern_share") {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let share = work.path().join("share");
    std::fs::create_dir(&share).unwrap();
    let input = prepare_share(&share);

    let run = run_guest(work.path(), &share, false);
    let c = &run.console;
    let ctx = || format!("console:\n{c}\nfs-serve stderr:\n{}", run.serve_stderr);
    assert_eq!(marker(c, "MOUNT"), Some("ok"), "{}", ctx());
    let sha: String = Sha256::digest(&input).iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(marker(c, "SHA"), Some(sha.as_str()), "{}", ctx());
    assert_eq!(marker(c, "CAT"), Some("hello from the host"), "{}", ctx());
    for step in ["WRITE", "MKDIR", "RENAME", "UNLINK", "UMOUNT"] {
        assert_eq!(marker(c, step), Some("ok"), "step {step}; {}", ctx());
    }
    assert_eq!(marker(c, "READBACK"), Some("written by the guest"), "{}", ctx());
    let listed: Vec<&str> = marker(c, "LS").unwrap_or_default().split_whitespace().collect();
    assert_eq!(listed, ["hello.txt", "input.bin", "newdir"], "{}", ctx());
    assert!(marker(c, "DONE").is_some(), "{}", ctx());

    // The host sees the guest's changes.
    assert_eq!(std::fs::read_to_string(share.join("newdir/renamed.txt")).unwrap(), "written by the guest\n");
    assert!(!share.join("guest.txt").exists());
    assert!(!share.join("delete-me.txt").exists());
    assert_eq!(std::fs::read(share.join("input.bin")).unwrap(), input);
    assert_served_and_exited(&run);
}

#[test]
fn vhost_user_qemu_cannot_change_a_read_only_tern_share() {
    if !require_linux_kvm("vhost_user_qemu_cannot_change_a_read_only_tern_share") {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let share = work.path().join("share");
    std::fs::create_dir(&share).unwrap();
    let input = prepare_share(&share);

    let run = run_guest(work.path(), &share, true);
    let c = &run.console;
    let ctx = || format!("console:\n{c}\nfs-serve stderr:\n{}", run.serve_stderr);
    assert_eq!(marker(c, "MOUNT"), Some("ok"), "{}", ctx());
    let sha: String = Sha256::digest(&input).iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(marker(c, "SHA"), Some(sha.as_str()), "{}", ctx());
    for step in ["WRITE", "MKDIR", "UNLINK"] {
        let result = marker(c, step).unwrap_or_default();
        assert!(
            result.starts_with("failed") && result.contains("Read-only file system"),
            "step {step} should be refused with EROFS, got {result:?}; {}",
            ctx()
        );
    }
    assert!(marker(c, "RENAME").unwrap_or_default().starts_with("failed"), "{}", ctx());
    let listed: Vec<&str> = marker(c, "LS").unwrap_or_default().split_whitespace().collect();
    assert_eq!(listed, ["delete-me.txt", "hello.txt", "input.bin"], "{}", ctx());
    assert!(marker(c, "DONE").is_some(), "{}", ctx());

    // Nothing changed on the host.
    let mut names: Vec<_> =
        std::fs::read_dir(&share).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["delete-me.txt", "hello.txt", "input.bin"]);
    assert_eq!(std::fs::read_to_string(share.join("delete-me.txt")).unwrap(), "doomed");
    assert_served_and_exited(&run);
}
