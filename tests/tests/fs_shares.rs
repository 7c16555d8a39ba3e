//! Real-guest tests of virtio-fs shares (`tern run --share`, and hot-added shares through the
//! runtime library). Each test boots one VM and checks several things, to keep boots few.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;
use tern_protocol::{ExecRequest, ExitStatus, MountRequest, StreamKind};
use tern_runtime::config::Config;
use tern_runtime::sandbox::Sandbox;
use tern_tests::{require_linux_kvm, tern, tern_bin, text};
use vmm::api::{CachePolicy, ShareConfig};

/// Generous bound for one boot + command: nested virtualization under TCG is slow.
const BOOT_LIMIT: Duration = Duration::from_secs(300);

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Every path under `root` (except under `skip`) with its kind and content, for "nothing
/// changed" checks.
fn snapshot(root: &Path, skip: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.starts_with(skip) {
                continue;
            }
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let what = if meta.is_dir() {
                stack.push(path.clone());
                "dir".to_string()
            } else if meta.file_type().is_symlink() {
                format!("link {:?}", std::fs::read_link(&path).unwrap())
            } else {
                format!("file {}", hex(&Sha256::digest(std::fs::read(&path).unwrap())))
            };
            out.insert(path.display().to_string(), what);
        }
    }
    out
}

#[test]
fn fs_shares_read_write_read_only_and_two_at_once() {
    // Argument errors come before any boot: a missing host dir is a clear error.
    let (out, _) = tern(&["run", "--share", "/no/such/dir:/x", "--", "true"], b"", BOOT_LIMIT);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(125), "stderr: {stderr}");
    assert!(stderr.contains("/no/such/dir") && stderr.contains("does not exist"), "stderr: {stderr}");
    if !require_linux_kvm("fs_shares_read_write_read_only_and_two_at_once") {
        return;
    }
    let (out, _) = tern(&["run", "--share", "/tmp:/x:rx", "--", "true"], b"", BOOT_LIMIT);
    assert_eq!(out.status.code(), Some(125));
    assert!(text(&out).1.contains("unknown option"), "{}", text(&out).1);

    let rw = tempfile::tempdir().unwrap();
    let ro = tempfile::tempdir().unwrap();
    let input = tern_tests::pseudo_random(5 << 20);
    std::fs::write(rw.path().join("in.bin"), &input).unwrap();
    std::fs::write(ro.path().join("ro.txt"), b"read-only content\n").unwrap();
    let script = r#"
        set -u
        echo "in $(sha256sum /mnt/rw/in.bin | cut -d' ' -f1)"
        head -c 5242880 /dev/urandom > /mnt/rw/out.bin
        sync
        echo "out $(sha256sum /mnt/rw/out.bin | cut -d' ' -f1)"
        echo "ro $(cat /mnt/ro/ro.txt)"
        for target in /mnt/ro /run/tern/shares/s1; do
            echo x 2>&1 > $target/new.txt | sed 's/^/err-create /'
            echo x 2>&1 >> $target/ro.txt | sed 's/^/err-append /'
            rm $target/ro.txt 2>&1 | sed 's/^/err-rm /'
            mkdir $target/d 2>&1 | sed 's/^/err-mkdir /'
            chmod 777 $target/ro.txt 2>&1 | sed 's/^/err-chmod /'
        done
        ls /run/tern/shares | tr '\n' ' '; echo
        echo "ok"
    "#;
    let rw_arg = format!("{}:/mnt/rw", rw.path().display());
    let ro_arg = format!("{}:/mnt/ro:ro", ro.path().display());
    let (out, _) = tern(&["run", "--share", &rw_arg, "--share", &ro_arg, "--", "sh", "-c", script], b"", BOOT_LIMIT);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains(&format!("in {}", hex(&Sha256::digest(&input)))), "stdout: {stdout}");
    let written = std::fs::read(rw.path().join("out.bin")).unwrap();
    assert_eq!(written.len(), 5 << 20);
    assert!(stdout.contains(&format!("out {}", hex(&Sha256::digest(&written)))), "stdout: {stdout}");
    assert!(stdout.contains("ro read-only content"), "stdout: {stdout}");
    // Five refusals through the read-only bind mount and five from the device itself.
    let refusals = stdout.lines().filter(|l| l.starts_with("err-") && l.contains("Read-only file system")).count();
    assert_eq!(refusals, 10, "stdout: {stdout}");
    assert!(stdout.contains("s0 s1"), "stdout: {stdout}");
    assert!(stdout.trim_end().ends_with("ok"), "stdout: {stdout}");
    let names: Vec<_> = std::fs::read_dir(ro.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, ["ro.txt"]);
    assert_eq!(std::fs::read(ro.path().join("ro.txt")).unwrap(), b"read-only content\n");
}

#[test]
fn fs_hostile_guest_cannot_escape_its_share() {
    if !require_linux_kvm("fs_hostile_guest_cannot_escape_its_share") {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let share = root.path().join("share");
    let outside = root.path().join("outside");
    std::fs::create_dir_all(&share).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    let marker = format!(
        "TERN-HOST-ONLY-{}-{}",
        std::process::id(),
        hex(&Sha256::digest(root.path().as_os_str().as_encoded_bytes()))[..12].to_owned()
    );
    let secret = outside.join("secret");
    std::fs::write(&secret, &marker).unwrap();
    std::fs::write(share.join("inside.txt"), b"inside\n").unwrap();
    std::os::unix::fs::symlink(&secret, share.join("abs-link")).unwrap();
    std::os::unix::fs::symlink(&outside, share.join("dir-link")).unwrap();
    std::os::unix::fs::symlink("../outside/secret", share.join("rel-link")).unwrap();
    let before = snapshot(root.path(), &share);

    let o = outside.display().to_string();
    let s = secret.display().to_string();
    let script = format!(
        r#"
        try() {{ echo "== $*"; sh -c "$*" 2>&1 | head -c 4096; echo; }}
        R=/run/tern/shares/s0
        try cat $R/../../../etc/shadow
        try cat $R/../../../../../../..{s}
        try ls -la $R/..
        try cat /mnt/s/abs-link
        try cat /mnt/s/rel-link
        try cat /mnt/s/dir-link/secret
        try ls /mnt/s/dir-link/
        try ln -s {s} /mnt/s/guest-link
        try cat /mnt/s/guest-link
        try ln {s} /mnt/s/hard-out
        try ln /mnt/s/abs-link /mnt/s/hard-to-link
        try cat /mnt/s/hard-to-link
        try mknod /mnt/s/sda b 8 0
        try mknod /mnt/s/mem c 1 1
        try mv /mnt/s/inside.txt $R/escaped.txt
        try mv /mnt/s/inside.txt /mnt/s/../escaped.txt
        try mkdir -p {o}
        try "echo planted > /mnt/s/dir-link/planted"
        try "exec 3</mnt/s/inside.txt; cat /proc/self/fd/3; readlink /proc/self/fd/3"
        try ln -s /proc/self/fd/3 /mnt/s/fd-link
        try "exec 3</mnt/s/inside.txt; cat /mnt/s/fd-link"
        try ln -s /proc/1/root/etc /mnt/s/proc-root
        try cat /mnt/s/proc-root/passwd
        echo done
        "#
    );
    let share_arg = format!("{}:/mnt/s", share.display());
    let (out, _) = tern(&["run", "--share", &share_arg, "--", "sh", "-c", &script], b"", BOOT_LIMIT);
    let (stdout, stderr) = text(&out);
    assert!(!stdout.contains(&marker) && !stderr.contains(&marker), "host marker leaked:\n{stdout}\n{stderr}");
    assert_eq!(out.status.code(), Some(0), "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.trim_end().ends_with("done"), "stdout: {stdout}");
    assert_eq!(snapshot(root.path(), &share), before, "something outside the share changed");
    assert_eq!(std::fs::read_to_string(&secret).unwrap(), marker);
    for entry in std::fs::read_dir(&share).unwrap() {
        let entry = entry.unwrap();
        let kind = entry.file_type().unwrap();
        use std::os::unix::fs::FileTypeExt;
        assert!(!kind.is_block_device() && !kind.is_char_device(), "device node {:?} in the share", entry.path());
    }
    assert!(std::fs::symlink_metadata(share.join("guest-link")).unwrap().file_type().is_symlink());
    assert!(!root.path().join("escaped.txt").exists());
}

fn sandbox_config() -> Config {
    let mut c = Config::default();
    let dir = tern_bin().parent().map(|p| p.to_path_buf()).unwrap_or_default();
    c.vm.kernel = Some(dir.join(tern_runtime::config::KERNEL_FILE_NAME));
    c.vm.initrd = Some(dir.join(tern_runtime::config::INITRD_FILE_NAME));
    c
}

/// Run `script` in the guest and return its stdout.
fn guest_sh(sandbox: &Sandbox, id: &str, script: &str) -> String {
    let agent = sandbox.agent();
    let argv = vec!["sh".into(), "-c".into(), script.into()];
    agent.exec(ExecRequest { id: id.into(), argv, ..Default::default() }).expect("exec");
    let mut out = agent.attach(id, StreamKind::Stdout).expect("attach");
    let mut text = String::new();
    std::io::Read::read_to_string(&mut out, &mut text).expect("read stdout");
    assert_eq!(agent.wait(id).expect("wait"), ExitStatus::Code(0), "{script}: {text}");
    text
}

#[test]
fn fs_shares_hot_add_and_remove_on_a_running_guest() {
    if !require_linux_kvm("fs_shares_hot_add_and_remove_on_a_running_guest") {
        return;
    }
    let run_root = tempfile::tempdir().unwrap();
    std::env::set_var("TERN_RUN_DIR", run_root.path());
    let a = tempfile::tempdir().unwrap();
    std::fs::write(a.path().join("a.txt"), b"from a").unwrap();
    let share = |name: &str, dir: &Path| ShareConfig {
        name: name.into(),
        host_dir: dir.to_path_buf(),
        read_only: false,
        cache: CachePolicy::Never,
        watch: false,
    };
    // The device exists without shares so that shares can come later.
    let sandbox = Sandbox::boot_with_shares(&sandbox_config(), Vec::new(), true).expect("boot");
    sandbox.add_fs_share(share("late", a.path())).expect("hot add");
    let mount = MountRequest { share: "late".into(), guest_path: "/srv/late".into(), ..Default::default() };
    sandbox.agent().mount(mount.clone()).expect("mount");
    assert!(sandbox.agent().mount(mount).is_err(), "second mount at the same path");
    let bad = MountRequest { share: "late".into(), guest_path: "/srv/../etc".into(), ..Default::default() };
    assert!(sandbox.agent().mount(bad).is_err());
    let missing = MountRequest { share: "nope".into(), guest_path: "/srv/nope".into(), ..Default::default() };
    assert!(sandbox.agent().mount(missing).is_err());

    let out = guest_sh(&sandbox, "p1", "cat /srv/late/a.txt; echo; echo guest > /srv/late/b.txt");
    assert_eq!(out, "from a\n");
    assert_eq!(std::fs::read(a.path().join("b.txt")).unwrap(), b"guest\n");

    sandbox.agent().unmount("/srv/late").expect("unmount");
    sandbox.remove_fs_share("late").expect("hot remove");
    assert!(sandbox.remove_fs_share("late").is_err());
    let out =
        guest_sh(&sandbox, "p2", "ls /srv/late | wc -l; cat /run/tern/shares/late/a.txt 2>/dev/null || echo gone");
    assert_eq!(out, "0\ngone\n");

    sandbox.shutdown(Duration::from_secs(30)).expect("clean shutdown");
}
