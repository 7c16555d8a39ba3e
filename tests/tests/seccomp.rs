//! A container's OCI seccomp profile is enforced inside the guest, as runc enforces it on a
//! plain host: `ctr run --seccomp` (containerd's default profile), a CRI container with
//! `RuntimeDefault`, a custom profile with a chosen `errnoRet`, no profile at all, and a profile
//! naming a syscall that does not exist (refused at Create, by name).
//!
//! The syscall the default profile denies although the container's capabilities allow it:
//! `unshare(CLONE_NEWUSER)` (`busybox unshare -U true`). Creating a user namespace needs no
//! capability at all, so the kernel grants it to the container; containerd's default profile
//! allows `unshare` only to containers holding CAP_SYS_ADMIN (which neither `ctr run` nor CRI
//! give), so the filter answers EPERM. The same command in the same image without a profile
//! succeeds, which proves the EPERM comes from the filter and not from a missing capability.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use tern_runtime::cri::api;
use tern_tests::containerd::{ctr_run_args, stderr, stdout, TestContainerd, BUSYBOX_IMAGE};
use tern_tests::cri::{container_config, wait_log_line, Cri, TestPod};

/// One `ctr run` includes a VM boot, which is slow under the nested runner's emulation.
const RUN_LIMIT: Duration = Duration::from_secs(180);

/// Prints the seccomp and no_new_privs state of the container's process, then tries to create
/// a user namespace and says how that went.
/// `sleep 0 &` makes sh fork (glibc's fork is a `clone` without namespace flags): the default
/// profile's masked `clone` rule must let it through. (That the same rule refuses namespace
/// flags is checked against libseccomp in `tern-seccomp`'s unit tests; busybox has no applet
/// that passes them to `clone`.)
const PROBE: &str =
    "cat /proc/self/status; unshare -U true; echo \"unshare=$?\"; sleep 0 & wait $!; echo \"forked=$?\"";

/// After the last task of a sandbox is gone, its shim (and VM) must be gone too, and no
/// mount may be left behind.
fn assert_clean(ctrd: &TestContainerd) {
    assert!(ctrd.wait_no_shims(Duration::from_secs(20)), "a shim outlived its tasks\n{}", ctrd.logs());
    let mounts: Vec<String> = ctrd.mounts_left().into_iter().filter(|m| m.contains("/state/")).collect();
    assert!(mounts.is_empty(), "bundle mounts left behind: {mounts:?}");
}

/// The value of `field` in a `/proc/<pid>/status` dump (`Seccomp`, `NoNewPrivs`).
fn status_field<'a>(lines: impl IntoIterator<Item = &'a str>, field: &str) -> Option<String> {
    let prefix = format!("{field}:");
    lines.into_iter().find_map(|l| l.strip_prefix(&prefix).map(|v| v.trim().to_owned()))
}

/// `ctr run --rm` of [`BUSYBOX_IMAGE`] with `extra` flags before the image.
fn ctr_run(ctrd: &TestContainerd, id: &str, extra: &[&str], argv: &[&str]) -> std::process::Output {
    let mut flags = vec!["--rm"];
    flags.extend_from_slice(extra);
    ctrd.ctr(&ctr_run_args(&flags, id, argv), RUN_LIMIT)
}

#[test]
fn ctr_default_profile_filters_the_container_and_no_profile_does_not() {
    let Some(ctrd) = tern_tests::containerd::containerd_for_test(
        "ctr_default_profile_filters_the_container_and_no_profile_does_not",
    ) else {
        return;
    };
    // Without a profile: no filter, and the user namespace is created.
    let out = ctr_run(&ctrd, "plain", &[], &["sh", "-c", PROBE]);
    let (text, err) = (stdout(&out), stderr(&out));
    assert!(out.status.success(), "ctr run failed: {err}\n{}", ctrd.logs());
    assert_eq!(status_field(text.lines(), "Seccomp").as_deref(), Some("0"), "{text}");
    assert!(text.lines().any(|l| l == "unshare=0"), "unshare -U must work without a profile: {text}\n{err}");
    assert_clean(&ctrd);

    // containerd's default profile: mode 2 (filter), loaded after NO_NEW_PRIVS (ctr's spec sets
    // noNewPrivileges); unshare is refused with EPERM. That sh could fork `cat` and `unshare`
    // at all shows the profile's masked `clone` rule is loaded as runc loads it.
    let out = ctr_run(&ctrd, "filtered", &["--seccomp"], &["sh", "-c", PROBE]);
    let (text, err) = (stdout(&out), stderr(&out));
    assert!(out.status.success(), "ctr run --seccomp failed: {err}\n{}", ctrd.logs());
    assert_eq!(status_field(text.lines(), "Seccomp").as_deref(), Some("2"), "{text}");
    assert_eq!(status_field(text.lines(), "NoNewPrivs").as_deref(), Some("1"), "{text}");
    assert!(text.lines().any(|l| l == "unshare=1"), "unshare -U must fail under the default profile: {text}\n{err}");
    assert!(text.lines().any(|l| l == "forked=0"), "sh must be able to fork under the default profile: {text}\n{err}");
    assert!(err.contains("unshare(0x10000000): Operation not permitted"), "expected EPERM from unshare: {err}");
    assert_clean(&ctrd);
}

#[test]
fn ctr_custom_profile_returns_its_errno_and_unknown_names_fail_create() {
    let Some(ctrd) = tern_tests::containerd::containerd_for_test(
        "ctr_custom_profile_returns_its_errno_and_unknown_names_fail_create",
    ) else {
        return;
    };
    // Everything allowed except sethostname, which answers ENOMSG (42): an errno no kernel
    // path of sethostname returns (without CAP_SYS_ADMIN the kernel itself would say EPERM).
    let profile = ctrd.dir().join("errno-profile.json");
    let json = r#"{"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [{"names": ["sethostname"], "action": "SCMP_ACT_ERRNO", "errnoRet": 42}]}"#;
    std::fs::write(&profile, json).unwrap();
    let profile_arg = profile.to_string_lossy().into_owned();
    let script = "cat /proc/self/status; hostname tern-x; echo \"hostname=$?\"";
    let out = ctr_run(&ctrd, "errno", &["--seccomp", "--seccomp-profile", &profile_arg], &["sh", "-c", script]);
    let (text, err) = (stdout(&out), stderr(&out));
    assert!(out.status.success(), "ctr run failed: {err}\n{}", ctrd.logs());
    assert_eq!(status_field(text.lines(), "Seccomp").as_deref(), Some("2"), "{text}");
    assert!(text.lines().any(|l| l == "hostname=1"), "{text}\n{err}");
    let enomsg = std::io::Error::from_raw_os_error(42).to_string();
    let enomsg = enomsg.split(" (os error").next().unwrap();
    assert_eq!(enomsg, "No message of desired type");
    assert!(err.contains(&format!("sethostname: {enomsg}")), "sethostname must fail with errno 42 exactly: {err}");
    assert_clean(&ctrd);

    // A name libseccomp knows on no architecture: Create fails and says which.
    let bad = ctrd.dir().join("bad-profile.json");
    std::fs::write(&bad, json.replace(r#"["sethostname"]"#, r#"["sethostname", "tern_no_such_syscall"]"#)).unwrap();
    let bad_arg = bad.to_string_lossy().into_owned();
    let out = ctr_run(&ctrd, "unknown", &["--seccomp", "--seccomp-profile", &bad_arg], &["true"]);
    let err = stderr(&out);
    assert!(!out.status.success(), "a profile with an unknown syscall must not run: {}", stdout(&out));
    assert!(err.contains("\"tern_no_such_syscall\""), "the error must name the syscall: {err}");
    assert!(err.contains("seccomp"), "{err}");
    let _ = ctrd.ctr(&["container", "delete", "unknown"], RUN_LIMIT);
    assert_clean(&ctrd);
}

#[test]
fn cri_runtime_default_filters_the_container() {
    let test = "cri_runtime_default_filters_the_container";
    let Some(ctrd) = tern_tests::containerd::cri_containerd_for_test(test) else { return };
    let cri = Cri::connect(&ctrd);
    let logs = || ctrd.logs();
    let TestPod { sandbox, config: pod, log_dir } =
        cri.run_tern_pod(&ctrd, "filtered", "0f6c1b0e-5b1c-4d0e-9a57-00000000c0a1", "tern");

    let script = format!("{PROBE}; echo done; exec sleep 100000");
    let mut config = container_config("probe", BUSYBOX_IMAGE, &["sh", "-c", &script], "probe.log", &[]);
    let security = config.linux.as_mut().unwrap().security_context.as_mut().unwrap();
    security.seccomp = Some(api::SecurityProfile {
        profile_type: api::security_profile::ProfileType::RuntimeDefault as i32,
        localhost_ref: String::new(),
    });
    cri.create_and_start(&sandbox, config, pod.clone()).unwrap_or_else(|e| panic!("{e}\n{}", logs()));

    let log = log_dir.join("probe.log");
    wait_log_line(&log, Duration::from_secs(240), &logs, |l| l == "done");
    let lines = tern_tests::cri::read_cri_log(&log);
    assert_eq!(status_field(lines.iter().map(String::as_str), "Seccomp").as_deref(), Some("2"), "{lines:?}");
    // A pod without allowPrivilegeEscalation=false has no NO_NEW_PRIVS: the filter was loaded
    // before the capabilities were dropped, as runc does.
    assert_eq!(status_field(lines.iter().map(String::as_str), "NoNewPrivs").as_deref(), Some("0"), "{lines:?}");
    assert!(lines.iter().any(|l| l == "unshare=1"), "unshare -U must fail under RuntimeDefault: {lines:?}");
    assert!(lines.iter().any(|l| l.contains("Operation not permitted")), "{lines:?}");
    cri.stop_and_remove(&ctrd, &sandbox);
}

/// `(name, Seccomp, NoNewPrivs, CapEff)` of every thread of process `pid` named like a VMM
/// thread (`tern-…`).
fn vmm_threads(pid: i32) -> Vec<(String, String, String, u64)> {
    let mut threads = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let Ok(comm) = std::fs::read_to_string(task.path().join("comm")) else { continue };
        let comm = comm.trim().to_owned();
        if vmm::thread_role(&comm).is_none() {
            continue;
        }
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else { continue };
        let field = |name| status_field(status.lines(), name).unwrap_or_default();
        let cap_eff = u64::from_str_radix(&field("CapEff"), 16).unwrap();
        threads.push((comm, field("Seccomp"), field("NoNewPrivs"), cap_eff));
    }
    threads.sort();
    threads
}

/// Every VMM thread of a pod's shim runs under its role's filter, while the VM carries real
/// work: container stdio, a share (the rootfs), a watchable mount that changes, and network
/// traffic. vCPUs, device loop, net, console and watcher threads hold no capability; the fs
/// thread holds exactly what the design keeps for passthrough.
#[test]
fn cri_pod_vmm_threads_run_filtered_with_their_roles_capabilities() {
    let test = "cri_pod_vmm_threads_run_filtered_with_their_roles_capabilities";
    let Some(ctrd) = tern_tests::containerd::cri_containerd_for_test(test) else { return };
    let cri = Cri::connect(&ctrd);
    let logs = || ctrd.logs();
    let uid = "0f6c1b0e-5b1c-4d0e-9a57-00000000c0a2";
    let mut secret = tern_tests::cri::SecretVolume::create(
        &ctrd.dir().join("kubelet/pods").join(uid),
        "token",
        &[("key", "generation-1")],
    );
    let TestPod { sandbox, config: pod, log_dir } = cri.run_tern_pod(&ctrd, "hardened", uid, "tern");
    // Frames to the bridge gateway (ARP, then a TCP SYN nobody answers) cross tern-net.
    let script = "nc -w 2 10.88.77.1 80 </dev/null; echo net-tried; \
                  while :; do echo \"secret=$(cat /etc/secret/key)\"; sleep 0.2; done";
    let config = container_config(
        "work",
        BUSYBOX_IMAGE,
        &["sh", "-c", script],
        "work.log",
        &[(secret.dir(), "/etc/secret", true)],
    );
    cri.create_and_start(&sandbox, config, pod.clone()).unwrap_or_else(|e| panic!("{e}\n{}", logs()));
    let log = log_dir.join("work.log");
    wait_log_line(&log, Duration::from_secs(240), &logs, |l| l == "net-tried");
    wait_log_line(&log, Duration::from_secs(60), &logs, |l| l == "secret=generation-1");
    secret.update(&[("key", "generation-2")]);
    wait_log_line(&log, Duration::from_secs(60), &logs, |l| l == "secret=generation-2");

    let shims = ctrd.shim_pids();
    assert_eq!(shims.len(), 1, "one shim expected: {shims:?}");
    let threads = vmm_threads(shims[0]);
    let names: Vec<&str> = threads.iter().map(|t| t.0.as_str()).collect();
    for expected in
        ["tern-vcpu0", "tern-devices", "tern-fs", "tern-net", "tern-console", "tern-fs-watch", "tern-fs-link"]
    {
        assert!(names.contains(&expected), "no {expected} thread in the shim: {threads:?}");
    }
    let fs_caps = vmm::api::kept_capability_mask(vmm::api::SeccompRole::Fs);
    for (name, seccomp, no_new_privs, cap_eff) in &threads {
        assert_eq!((seccomp.as_str(), no_new_privs.as_str()), ("2", "1"), "{name} is not filtered: {threads:?}");
        let expected = if name == "tern-fs" { fs_caps } else { 0 };
        assert_eq!(*cap_eff, expected, "{name}'s CapEff is {cap_eff:#x}, the design says {expected:#x}");
    }
    // The shim's own threads (tokio, the VM monitor) are not VMM threads and stay unfiltered.
    let main_status = std::fs::read_to_string(format!("/proc/{}/status", shims[0])).unwrap();
    assert_eq!(status_field(main_status.lines(), "Seccomp").as_deref(), Some("0"));
    cri.stop_and_remove(&ctrd, &sandbox);
}

/// The test-only switch makes the fs thread issue a forbidden syscall (`getpgrp`) when the
/// guest looks up a chosen name: the shim logs the thread and the syscall, the VM ends with an
/// error saying so, containerd sees the task exit, and nothing is left behind.
#[test]
fn a_vmm_seccomp_violation_ends_the_vm_and_the_task() {
    let test = "a_vmm_seccomp_violation_ends_the_vm_and_the_task";
    if !tern_tests::containerd::require_containerd(test, None) {
        return;
    }
    let ctrd = TestContainerd::start_with_shim_env(&[("TERN_TEST_SECCOMP_VIOLATION", "fs:lookup:tern-violate")]);
    ctrd.import_busybox();
    // The lookup of /tern-violate goes to the rootfs share on tern-fs; the VM ends while the
    // container sleeps, long before the sleep would.
    let started = std::time::Instant::now();
    let out = ctr_run(&ctrd, "violator", &[], &["sh", "-c", "echo before; ls /tern-violate; exec sleep 600"]);
    let (text, err) = (stdout(&out), stderr(&out));
    assert!(started.elapsed() < Duration::from_secs(170), "ctr run waited for the sleep: {text}\n{err}");
    assert!(!out.status.success(), "the task must not exit 0 after its VM died: {text}\n{err}");
    assert!(text.contains("before"), "{text}\n{err}\n{}", ctrd.logs());
    let log = ctrd.logs();
    assert!(log.contains("seccomp violation"), "the shim must log the violation:\n{log}");
    assert!(log.contains("tern-fs") && log.contains("getpgrp"), "the log must name the thread and syscall:\n{log}");
    assert!(
        log.contains("VMM thread tern-fs made syscall 111 (getpgrp), which its seccomp filter forbids"),
        "the VM's error must say why it ended:\n{log}"
    );
    assert_clean(&ctrd);
    let run_dirs: Vec<_> = std::fs::read_dir(ctrd.dir().join("vm")).map(|d| d.flatten().count()).into_iter().collect();
    assert!(run_dirs.iter().all(|n| *n == 0), "run dirs left behind: {run_dirs:?}");
}
