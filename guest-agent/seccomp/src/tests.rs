use serde_json::json;

use super::*;

/// The shape of containerd's default profile for a container without CAP_SYS_ADMIN (1.6,
/// amd64): an allowlist over three architectures that names syscalls x86_64 lacks, `clone`
/// allowed only without namespace flags, `clone3` answered with ENOSYS, `personality` by value.
fn containerd_like() -> serde_json::Value {
    json!({
        "defaultAction": "SCMP_ACT_ERRNO",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": [
            {"names": ["read", "write", "exit_group", "_llseek", "socketcall", "waitpid", "chown32"], "action": "SCMP_ACT_ALLOW"},
            {"names": ["personality"], "action": "SCMP_ACT_ALLOW", "args": [{"index": 0, "value": 0, "op": "SCMP_CMP_EQ"}]},
            {"names": ["personality"], "action": "SCMP_ACT_ALLOW", "args": [{"index": 0, "value": 4294967295u64, "op": "SCMP_CMP_EQ"}]},
            {"names": ["clone"], "action": "SCMP_ACT_ALLOW",
             "args": [{"index": 0, "value": 2114060288u64, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}]},
            {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38},
            {"names": ["socket"], "action": "SCMP_ACT_ALLOW",
             "args": [{"index": 0, "value": 40, "op": "SCMP_CMP_NE"}, {"index": 0, "value": 16, "op": "SCMP_CMP_NE"}]}
        ]
    })
}

fn with(profile: serde_json::Value, f: impl FnOnce(&mut serde_json::Value)) -> serde_json::Value {
    let mut profile = profile;
    f(&mut profile);
    profile
}

#[test]
fn containerds_default_profile_shape_is_accepted() {
    check_profile(&containerd_like()).unwrap();
    check_for_this_kernel(&containerd_like()).unwrap();
}

#[test]
fn an_unknown_syscall_name_is_refused_by_name() {
    let profile =
        with(containerd_like(), |p| p["syscalls"][0]["names"].as_array_mut().unwrap().push(json!("no_such_call")));
    let err = check_profile(&profile).unwrap_err();
    assert!(matches!(&err, ProfileError::UnknownSyscall(n) if n == "no_such_call"), "{err:?}");
    assert!(err.to_string().contains("\"no_such_call\""), "{err}");
    // Also when the rule would be skipped for having the default action.
    let profile =
        json!({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["getpidd"], "action": "SCMP_ACT_ALLOW"}]});
    assert!(matches!(check_profile(&profile), Err(ProfileError::UnknownSyscall(n)) if n == "getpidd"));
}

#[test]
fn notify_and_listeners_are_refused() {
    let profile = with(containerd_like(), |p| p["syscalls"][0]["action"] = json!("SCMP_ACT_NOTIFY"));
    let err = check_profile(&profile).unwrap_err();
    assert!(matches!(err, ProfileError::Notify(_)), "{err:?}");
    assert!(err.to_string().contains("SCMP_ACT_NOTIFY") && err.to_string().contains("read"), "{err}");
    let profile = with(containerd_like(), |p| p["defaultAction"] = json!("SCMP_ACT_NOTIFY"));
    assert!(matches!(check_profile(&profile), Err(ProfileError::Notify(_))));
    let profile = with(containerd_like(), |p| p["listenerPath"] = json!("/run/agent.sock"));
    assert!(matches!(check_profile(&profile), Err(ProfileError::Listener(p)) if p == "/run/agent.sock"));
}

#[test]
fn names_tern_cannot_map_are_refused() {
    let cases: [(&str, serde_json::Value); 5] = [
        ("action", with(containerd_like(), |p| p["syscalls"][0]["action"] = json!("SCMP_ACT_DANCE"))),
        ("arch", with(containerd_like(), |p| p["architectures"][1] = json!("SCMP_ARCH_VAX"))),
        ("flag", with(containerd_like(), |p| p["flags"] = json!(["SECCOMP_FILTER_FLAG_NEW"]))),
        ("op", with(containerd_like(), |p| p["syscalls"][1]["args"][0]["op"] = json!("SCMP_CMP_ABOUT"))),
        ("parse", with(containerd_like(), |p| p["syscalls"][0]["names"] = json!("read"))),
    ];
    for (what, profile) in cases {
        let err = check_profile(&profile).unwrap_err();
        let ok = match what {
            "action" => matches!(&err, ProfileError::UnknownAction { action, .. } if action == "SCMP_ACT_DANCE"),
            "arch" => matches!(&err, ProfileError::UnknownArch(a) if a == "SCMP_ARCH_VAX"),
            "flag" => matches!(&err, ProfileError::UnknownFlag(f) if f == "SECCOMP_FILTER_FLAG_NEW"),
            "op" => {
                matches!(&err, ProfileError::UnknownOperator { op, name } if op == "SCMP_CMP_ABOUT" && name == "personality")
            }
            _ => matches!(&err, ProfileError::Parse(_)),
        };
        assert!(ok, "{what}: {err:?}");
    }
}

#[test]
fn values_libseccomp_would_truncate_or_reject_are_refused() {
    let profile = with(containerd_like(), |p| p["syscalls"][4]["errnoRet"] = json!(65536));
    assert!(matches!(check_profile(&profile), Err(ProfileError::Errno { errno: 65536, .. })));
    let profile = with(containerd_like(), |p| p["defaultErrnoRet"] = json!(70000));
    assert!(matches!(check_profile(&profile), Err(ProfileError::Errno { errno: 70000, .. })));
    let profile = with(containerd_like(), |p| p["syscalls"][1]["args"][0]["index"] = json!(6));
    assert!(matches!(check_profile(&profile), Err(ProfileError::ArgIndex { index: 6, name }) if name == "personality"));
}

#[test]
fn flags_are_checked_against_the_running_kernel_only_in_the_guest() {
    let profile =
        with(containerd_like(), |p| p["flags"] = json!(["SECCOMP_FILTER_FLAG_LOG", "SECCOMP_FILTER_FLAG_SPEC_ALLOW"]));
    check_profile(&profile).unwrap();
    check_for_this_kernel(&profile).unwrap();
    // libseccomp 2.5 (Debian 12) cannot set WAIT_KILLABLE_RECV: an error naming the flag,
    // never a filter without it.
    let profile = with(containerd_like(), |p| p["flags"] = json!(["SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV"]));
    check_profile(&profile).unwrap();
    if libseccomp::ScmpVersion::current().is_ok_and(|v| (v.major, v.minor) < (2, 6)) {
        let err = check_for_this_kernel(&profile).unwrap_err();
        assert!(err.to_string().contains("SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV"), "{err}");
    }
}

#[test]
fn masked_eq_operands_are_swapped_into_libcontainers_order() {
    let original = containerd_like();
    let mut spec = original.clone();
    assert_eq!(masked_eq_for_libcontainer(&mut spec), 1);
    let arg = &spec["syscalls"][3]["args"][0];
    assert_eq!((arg["value"].as_u64(), arg["valueTwo"].as_u64()), (Some(0), Some(2114060288)));
    // What libcontainer 0.7 builds from the rewritten arg (MaskedEqual(valueTwo), datum value) is
    // what runc builds from the original (mask value, datum valueTwo).
    let libcontainer = ScmpArgCompare::new(0, ScmpCompareOp::MaskedEqual(2114060288), 0);
    let runc = comparisons(&Rule::deserialize(&original["syscalls"][3]).unwrap(), "clone").unwrap();
    assert_eq!(runc, vec![(0, libcontainer)]);
    // Other comparisons are left alone.
    assert_eq!(spec["syscalls"][1], original["syscalls"][1]);
    assert_eq!(masked_eq_for_libcontainer(&mut json!({"defaultAction": "SCMP_ACT_ALLOW"})), 0);
}

const CHILD_ENV: &str = "TERN_SECCOMP_TEST_CHILD";

/// The filter [`build`] makes, loaded in a child test process (a filter cannot be removed):
/// the chosen errno values come back exactly, argument comparisons select, the rest runs.
#[test]
fn a_loaded_filter_returns_the_profiles_errno_values() {
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new(exe)
        .args(["--ignored", "--exact", "tests::loaded_filter_child", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1")
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.contains("1 passed"), "{text}");
}

/// -errno of a raw syscall with up to two arguments, or its return value.
fn raw(nr: libc::c_long, a: libc::c_long, b: libc::c_long) -> i64 {
    // SAFETY: getppid, getpid, umask, unshare and kill take no pointers; kill only signals ourselves.
    let r = unsafe { libc::syscall(nr, a, b) };
    if r == -1 {
        -i64::from(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    } else {
        r
    }
}

#[test]
#[ignore = "run by a_loaded_filter_returns_the_profiles_errno_values in a child process"]
fn loaded_filter_child() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let profile = json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86"],
        "syscalls": [
            {"names": ["getppid"], "action": "SCMP_ACT_ERRNO", "errnoRet": 42},
            {"names": ["_llseek"], "action": "SCMP_ACT_ERRNO"},
            {"names": ["kill"], "action": "SCMP_ACT_ERRNO", "errnoRet": 43, "args": [{"index": 1, "value": 0, "op": "SCMP_CMP_EQ"}]},
            {"names": ["umask"], "action": "SCMP_ACT_ERRNO", "errnoRet": 44,
             "args": [{"index": 0, "value": 0o070, "valueTwo": 0o020, "op": "SCMP_CMP_MASKED_EQ"}]},
            // containerd's clone rule, on unshare: only flags without CLONE_NEW* match.
            {"names": ["unshare"], "action": "SCMP_ACT_ERRNO", "errnoRet": 46,
             "args": [{"index": 0, "value": 2114060288u64, "op": "SCMP_CMP_MASKED_EQ"}]}
        ]
    });
    let pid = libc::c_long::from(std::process::id());
    assert!(raw(libc::SYS_getppid, 0, 0) > 0);
    // libseccomp sets NO_NEW_PRIVS itself (SCMP_FLTATR_CTL_NNP defaults to on): no privilege needed.
    build(&profile, Kernel::Running).unwrap().load().unwrap();
    assert_eq!(raw(libc::SYS_getppid, 0, 0), -42);
    assert_eq!(raw(libc::SYS_getpid, 0, 0), pid, "not in the profile: the default action");
    // Only signal 0 (the existence probe) is refused; SIGCONT to ourselves does nothing.
    assert_eq!(raw(libc::SYS_kill, pid, 0), -43);
    assert_eq!(raw(libc::SYS_kill, pid, libc::c_long::from(libc::SIGCONT)), 0);
    // (mode & 070) == 020 is refused, other modes pass.
    assert_eq!(raw(libc::SYS_umask, 0o022, 0), -44);
    assert!(raw(libc::SYS_umask, 0o007, 0) >= 0);
    assert_eq!(raw(libc::SYS_unshare, 0, 0), -46);
    // Not matched (the kernel refuses a user namespace to a multi-threaded process: EINVAL);
    // libcontainer's own operand order would have matched it too (see masked_eq_for_libcontainer).
    assert_eq!(raw(libc::SYS_unshare, libc::c_long::from(libc::CLONE_NEWUSER), 0), -i64::from(libc::EINVAL));
}
