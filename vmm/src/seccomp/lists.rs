//! The allowlists, one per [`SeccompRole`]: every syscall a thread of that role may make. The
//! shim is glibc-linked, so the lists name what glibc and Rust's std issue underneath (`openat`
//! for `open`, `newfstatat` and `statx` for `stat`; never `clone3`, since no VMM thread starts
//! threads). They were derived by running the whole KVM and containerd suite with
//! `seccomp = "log"` and reading the kernel's audit records (`type=1326`, which name the thread
//! and the syscall); see tests/README.md.
//!
//! What is *not* here matters as much: no `execve`, `fork`/`clone`, `mount`, `setns`,
//! `unshare`, `ptrace`, `bpf`, `socket` outside the threads that connect to the agent, and
//! `ioctl` only with the request numbers a role needs.

use std::collections::BTreeMap;

use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};

use super::SeccompRole;

/// The rules of one role: syscall number to its argument rules (empty: any arguments).
pub(super) type Rules = BTreeMap<i64, Vec<SeccompRule>>;

/// What every VMM thread does whatever its role: memory (the allocator), locks, the kick and
/// SIGSYS signals' return, time, logging to an already open fd, and leaving the thread (Rust's
/// thread exit releases the signal stack; glibc trims the stack cache).
const COMMON: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_tgkill,
    libc::SYS_getrandom,
    libc::SYS_exit,
];

/// An event loop's own calls: epoll and eventfds.
const EVENT_LOOP: &[i64] =
    &[libc::SYS_epoll_wait, libc::SYS_epoll_pwait, libc::SYS_epoll_ctl, libc::SYS_fcntl, libc::SYS_readv];

/// What a device's activation or reset does on the vCPU thread that wrote the status register.
const VCPU_ACTIVATION: &[i64] = &[libc::SYS_epoll_create1, libc::SYS_epoll_ctl, libc::SYS_fcntl, libc::SYS_dup];

/// Unix sockets to the agent's host side: connecting, streaming, and the hybrid vsock CONNECT
/// handshake.
const UNIX_STREAMS: &[i64] = &[
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_accept4,
    libc::SYS_shutdown,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_poll,
    libc::SYS_ppoll,
];

/// virtio-fs passthrough (fuse-backend-rs): per-request credentials (raw `setresuid` and
/// `setresgid`), reopening through `/proc/self/fd`, the `*at` family, directory reads, data
/// calls, xattrs, and `capget`/`capset` for dropping CAP_FSETID around a write that must clear
/// set-id bits.
const FS_PASSTHROUGH: &[i64] = &[
    libc::SYS_openat,
    libc::SYS_open,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    libc::SYS_statx,
    libc::SYS_getdents64,
    libc::SYS_lseek,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
    libc::SYS_ftruncate,
    libc::SYS_mkdirat,
    libc::SYS_mknodat,
    libc::SYS_symlinkat,
    libc::SYS_linkat,
    libc::SYS_unlinkat,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_readlinkat,
    libc::SYS_fchownat,
    libc::SYS_fchown,
    libc::SYS_fchmodat,
    libc::SYS_fchmod,
    libc::SYS_utimensat,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_setxattr,
    libc::SYS_lsetxattr,
    libc::SYS_fsetxattr,
    libc::SYS_getxattr,
    libc::SYS_lgetxattr,
    libc::SYS_fgetxattr,
    libc::SYS_listxattr,
    libc::SYS_llistxattr,
    libc::SYS_flistxattr,
    libc::SYS_removexattr,
    libc::SYS_lremovexattr,
    libc::SYS_fremovexattr,
    libc::SYS_statfs,
    libc::SYS_fstatfs,
    libc::SYS_setresuid,
    libc::SYS_setresgid,
    libc::SYS_capget,
    libc::SYS_capset,
    libc::SYS_dup,
    libc::SYS_copy_file_range,
    libc::SYS_umask,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
];

/// The fs watcher: inotify, reading the watched trees and their files, and the agent link.
const WATCHER: &[i64] = &[
    libc::SYS_openat2,
    libc::SYS_inotify_init1,
    libc::SYS_inotify_add_watch,
    libc::SYS_inotify_rm_watch,
    libc::SYS_openat,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    libc::SYS_statx,
    libc::SYS_getdents64,
    libc::SYS_lseek,
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_fcntl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_timerfd_settime,
    libc::SYS_timerfd_gettime,
];

/// `ioctl` request numbers: KVM's are all of type 0xAE.
const KVM_IOCTL_TYPE: u64 = 0xAE;
/// `FIONBIO`: std's `set_nonblocking` on sockets.
const FIONBIO: u64 = 0x5421;
/// `FIONREAD`: bytes waiting on a socket.
const FIONREAD: u64 = 0x541B;
/// `FIOCLEX`: std's close-on-exec on a received fd.
const FIOCLEX: u64 = 0x5451;

fn ioctl_request_is(request: u64) -> SeccompRule {
    rule(SeccompCmpOp::Eq, request)
}

fn rule(op: SeccompCmpOp, value: u64) -> SeccompRule {
    // Argument 1 of ioctl is the request; the kernel takes it as an unsigned int.
    let condition = SeccompCondition::new(1, SeccompCmpArgLen::Dword, op, value);
    let condition = condition.unwrap_or_else(|err| unreachable!("argument 1 is a valid index: {err}"));
    SeccompRule::new(vec![condition]).unwrap_or_else(|err| unreachable!("one condition is a valid rule: {err}"))
}

/// `ioctl` restricted to `requests`, plus every KVM ioctl when `kvm`.
fn ioctl_rules(kvm: bool, requests: &[u64]) -> Vec<SeccompRule> {
    let mut rules: Vec<SeccompRule> = requests.iter().copied().map(ioctl_request_is).collect();
    if kvm {
        rules.push(rule(SeccompCmpOp::MaskedEq(0xff00), KVM_IOCTL_TYPE << 8));
    }
    rules
}

/// The allowlist of `role`.
pub(super) fn rules(role: SeccompRole) -> Rules {
    let mut allowed: Vec<i64> = COMMON.to_vec();
    let ioctls = match role {
        // KVM_RUN and the register reads of a failure report. Device activation (DRIVER_OK,
        // written by the guest from a vCPU) registers handlers with the event loops (the vsock
        // muxer's own epoll, duplicated eventfds) and sets a tap's header size and offloads.
        SeccompRole::Vcpu => {
            allowed.extend(VCPU_ACTIVATION);
            ioctl_rules(true, &[libc::TUNSETVNETHDRSZ, libc::TUNSETOFFLOAD])
        }
        SeccompRole::Devices => {
            allowed.extend(EVENT_LOOP);
            allowed.extend(UNIX_STREAMS);
            ioctl_rules(false, &[FIONBIO, FIONREAD, FIOCLEX])
        }
        SeccompRole::Fs => {
            allowed.extend(EVENT_LOOP);
            allowed.extend(FS_PASSTHROUGH);
            ioctl_rules(false, &[FIONBIO, FIOCLEX])
        }
        SeccompRole::Net => {
            allowed.extend(EVENT_LOOP);
            ioctl_rules(false, &[])
        }
        SeccompRole::Console => ioctl_rules(false, &[]),
        SeccompRole::Watcher => {
            allowed.extend(WATCHER);
            allowed.extend(UNIX_STREAMS);
            ioctl_rules(false, &[FIONBIO, FIOCLEX])
        }
    };
    let mut rules: Rules = allowed.into_iter().map(|nr| (nr, Vec::new())).collect();
    if !ioctls.is_empty() {
        rules.insert(libc::SYS_ioctl, ioctls);
    }
    rules
}
