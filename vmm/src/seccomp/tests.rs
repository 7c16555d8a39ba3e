use std::sync::mpsc;

use super::*;

/// The `Seccomp:` and `CapEff:` lines of thread `tid` of this process, read from outside it
/// (a filtered thread may not open files).
fn status_of(tid: i32) -> (String, String) {
    let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).unwrap();
    let field =
        |key: &str| status.lines().find_map(|l| l.strip_prefix(key)).map(|v| v.trim().to_owned()).unwrap_or_default();
    (field("Seccomp:"), field("CapEff:"))
}

/// Run `body` on a thread hardened as `role`; returns its result and the thread's status,
/// read while the thread still runs.
fn on_hardened_thread<T: Send + 'static>(
    role: SeccompRole,
    hardening: &Hardening,
    body: impl FnOnce() -> T + Send + 'static,
) -> (T, (String, String)) {
    let (tx, rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let thread = spawn(format!("test-{}", role.name()), role, hardening, move || {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        let _ = tx.send((body(), tid));
        let _ = release_rx.recv();
    })
    .unwrap();
    let (result, tid) = rx.recv().unwrap();
    let status = status_of(tid);
    drop(release_tx);
    thread.join().unwrap();
    (result, status)
}

/// `getpgrp` as the thread sees it: its result and errno.
fn getpgrp() -> (i64, Option<i32>) {
    // SAFETY: getpgrp has no preconditions.
    let ret = unsafe { libc::syscall(libc::SYS_getpgrp) };
    (ret, io::Error::last_os_error().raw_os_error())
}

#[test]
fn every_role_and_mode_compiles() {
    for role in SeccompRole::ALL {
        for mode in [SeccompMode::Trap, SeccompMode::Log] {
            assert!(filter(role, mode).unwrap().is_some_and(|p| !p.is_empty()), "{role:?} {mode:?}");
        }
        assert!(filter(role, SeccompMode::Off).unwrap().is_none());
    }
}

#[test]
fn modes_parse_and_print() {
    for mode in [SeccompMode::Trap, SeccompMode::Log, SeccompMode::Off] {
        assert_eq!(mode.to_string().parse::<SeccompMode>().unwrap(), mode);
    }
    assert!("kill".parse::<SeccompMode>().unwrap_err().contains("\"trap\""));
    assert_eq!(SeccompMode::default(), SeccompMode::Trap);
}

#[test]
fn trap_fails_the_syscall_counts_it_names_it_and_wakes_the_sink() {
    let sink = Arc::new(ViolationSink::default());
    let notify = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    assert!(sink.set_notify(&notify));
    assert!(!sink.set_notify(&notify), "one waker per sink");
    let hardening = Hardening::new(SeccompMode::Trap, sink.clone());
    let ((denied, allowed), status) = on_hardened_thread(SeccompRole::Console, &hardening, || {
        let denied = getpgrp();
        // SAFETY: getpid has no preconditions; it is in every list.
        let allowed = unsafe { libc::getpid() };
        (denied, allowed)
    });
    assert_eq!(status.0, "2", "the thread runs under a filter");
    assert_eq!(denied, (-1, Some(libc::EPERM)));
    assert_eq!(allowed, std::process::id() as i32);

    let counts: HashMap<SeccompRole, u64> = sink.counts().into_iter().collect();
    assert_eq!(counts[&SeccompRole::Console], 1);
    assert_eq!(counts.values().sum::<u64>(), 1);
    let violation = sink.first().expect("the violation is recorded");
    assert_eq!(violation.thread, "test-console");
    assert_eq!(violation.syscall, libc::SYS_getpgrp);
    assert_eq!(violation.name.as_deref(), Some("getpgrp"));
    assert!(violation.to_string().contains("test-console made syscall 111 (getpgrp)"), "{violation}");
    assert_eq!(notify.read().unwrap(), 1, "the waker's eventfd was written");
    sink.withdraw_notify();
    // SAFETY: gettid has no preconditions.
    assert_eq!(status_of(unsafe { libc::gettid() }).0, "0", "the test's own thread is not filtered");
}

#[test]
fn log_lets_the_syscall_run_and_off_installs_nothing() {
    let sink = Arc::new(ViolationSink::default());
    let ((ret, _), status) =
        on_hardened_thread(SeccompRole::Net, &Hardening::new(SeccompMode::Log, sink.clone()), getpgrp);
    assert_eq!(status.0, "2");
    assert!(ret > 0, "getpgrp ran: {ret}");
    assert!(sink.first().is_none());

    let ((ret, _), status) = on_hardened_thread(SeccompRole::Net, &Hardening::off(), getpgrp);
    assert_eq!(status.0, "0");
    assert!(ret > 0);
}

#[test]
fn threads_keep_only_their_roles_capabilities() {
    let permitted = caps::read(None, CapSet::Permitted).unwrap();
    let hardening = Hardening::new(SeccompMode::Trap, Arc::default());
    for role in [SeccompRole::Vcpu, SeccompRole::Devices, SeccompRole::Net, SeccompRole::Console, SeccompRole::Watcher]
    {
        let ((), (seccomp, cap_eff)) = on_hardened_thread(role, &hardening, || ());
        assert_eq!((seccomp.as_str(), cap_eff.as_str()), ("2", "0000000000000000"), "{role:?}");
    }
    let ((kept, effective), _) = on_hardened_thread(SeccompRole::Fs, &hardening, || {
        (caps::read(None, CapSet::Permitted).unwrap(), caps::read(None, CapSet::Effective).unwrap())
    });
    let expected: CapsHashSet =
        kept_capabilities(SeccompRole::Fs).iter().map(|(cap, _)| *cap).filter(|cap| permitted.contains(cap)).collect();
    assert_eq!(kept, expected);
    assert_eq!(effective, expected);
    if permitted.contains(&Capability::CAP_SYS_ADMIN) {
        assert!(kept.contains(&Capability::CAP_SETUID), "as root the fs thread keeps what passthrough needs");
        assert!(!kept.contains(&Capability::CAP_SYS_ADMIN));
    }
}

#[test]
fn the_fs_list_allows_passthrough_credentials_and_the_vcpu_list_only_kvm_ioctls() {
    let hardening = Hardening::new(SeccompMode::Trap, Arc::default());
    let (creds, _) = on_hardened_thread(SeccompRole::Fs, &hardening, || {
        // SAFETY: setting the thread's ids to what they are changes nothing.
        unsafe { libc::syscall(libc::SYS_setresuid, -1, libc::geteuid(), -1) }
    });
    assert_eq!(creds, 0);
    let sink = Arc::new(ViolationSink::default());
    let (ioctl, _) = on_hardened_thread(SeccompRole::Vcpu, &Hardening::new(SeccompMode::Trap, sink.clone()), || {
        let mut pending: libc::c_int = 0;
        // SAFETY: FIONREAD on stdin writes one int to a live local.
        let ret = unsafe { libc::ioctl(libc::STDIN_FILENO, libc::FIONREAD, &mut pending) };
        (ret, io::Error::last_os_error().raw_os_error())
    });
    assert_eq!(ioctl, (-1, Some(libc::EPERM)));
    assert_eq!(sink.first().unwrap().name.as_deref(), Some("ioctl"));
}

#[test]
fn the_probe_passes_on_this_kernel() {
    probe().unwrap();
}

/// A hardened thread whose heap grows and shrinks (as `tern-devices` does with vsock buffers)
/// makes glibc's malloc read nothing: `spawn` settled its lazy file reads beforehand.
#[test]
fn a_hardened_threads_heap_may_grow_and_shrink() {
    let sink = Arc::new(ViolationSink::default());
    let hardening = Hardening::new(SeccompMode::Trap, sink.clone());
    let ((), _) = on_hardened_thread(SeccompRole::Devices, &hardening, || {
        for _ in 0..4 {
            let mut blocks: Vec<Vec<u8>> = (0..64).map(|_| Vec::with_capacity(48 << 10)).collect();
            while let Some(block) = blocks.pop() {
                drop(std::hint::black_box(block));
            }
        }
    });
    assert_eq!(sink.first(), None);
}
