//! Per-thread seccomp filters and capabilities for the VMM's threads.
//!
//! Every VMM thread is started through [`spawn`], which hardens the new thread before it runs
//! anything else:
//! 1. its capabilities drop to what its [`SeccompRole`] keeps ([`kept_capabilities`]: nothing, but
//!    for the fs thread);
//! 2. its role's filter ([`lists`]) is installed on that thread alone (no TSYNC: the shim's own
//!    tokio threads are not VMM threads), with NO_NEW_PRIVS.
//!
//! The spawner waits for both, so a thread that cannot be hardened never runs. A thread
//! inherits its creator's filter; no VMM thread starts threads (the lists have no `clone`).
//!
//! What a violation does is the [`SeccompMode`]:
//! - `trap`: the kernel skips the syscall and raises SIGSYS on the thread. The handler
//!   ([`on_sigsys`]) counts it, writes one line naming the thread and the syscall number to
//!   stderr, makes the syscall fail with EPERM and wakes the VM's [`ViolationSink`]; the VM
//!   then ends with [`SeccompViolation`] as its error, naming the syscall.
//! - `log`: the kernel lets the syscall run and logs it (an audit record, `type=1326`, with
//!   the thread's name and the syscall number); tern sees nothing.
//! - `off`: no filter and no capability drop.

mod lists;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once, OnceLock};
use std::thread::JoinHandle;

use caps::{CapSet, Capability, CapsHashSet};
use seccompiler::{BpfProgram, SeccompFilter, TargetArch};
use tern_sync::LockExt;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::register_signal_handler;

/// What a VMM thread's filter does with a syscall outside its role's list (the config's
/// `[vmm] seccomp`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SeccompMode {
    /// SIGSYS: the syscall fails, the violation is logged and the VM ends with an error.
    #[default]
    Trap,
    /// The kernel logs the violation and lets the syscall run.
    Log,
    /// No filters (and no capability drops).
    Off,
}

impl std::str::FromStr for SeccompMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "trap" => Ok(SeccompMode::Trap),
            "log" => Ok(SeccompMode::Log),
            "off" => Ok(SeccompMode::Off),
            other => Err(format!("unknown seccomp mode {other:?}: use \"trap\", \"log\" or \"off\"")),
        }
    }
}

impl std::fmt::Display for SeccompMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SeccompMode::Trap => "trap",
            SeccompMode::Log => "log",
            SeccompMode::Off => "off",
        })
    }
}

/// What a VMM thread does, which decides its allowlist and its capabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SeccompRole {
    /// A vCPU's run loop (`tern-vcpu<N>`).
    Vcpu,
    /// The device event loop: vsock (`tern-devices`).
    Devices,
    /// The virtio-fs request loop (`tern-fs`).
    Fs,
    /// The net devices' loop (`tern-net`).
    Net,
    /// The serial console's writer (`tern-console`).
    Console,
    /// The fs watcher's inotify reader and agent link (`tern-fs-watch`, `tern-fs-link`).
    Watcher,
}

impl SeccompRole {
    /// Every role, in metrics order.
    pub const ALL: [SeccompRole; 6] = [
        SeccompRole::Vcpu,
        SeccompRole::Devices,
        SeccompRole::Fs,
        SeccompRole::Net,
        SeccompRole::Console,
        SeccompRole::Watcher,
    ];

    /// The role's name in logs and metrics labels.
    pub fn name(self) -> &'static str {
        match self {
            SeccompRole::Vcpu => "vcpu",
            SeccompRole::Devices => "devices",
            SeccompRole::Fs => "fs",
            SeccompRole::Net => "net",
            SeccompRole::Console => "console",
            SeccompRole::Watcher => "watcher",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The capabilities a role keeps, each with the reason. Every other capability is dropped
/// from the thread's effective, permitted and inheritable sets (and the ambient set is
/// cleared); a capability the process does not have is not kept either.
pub fn kept_capabilities(role: SeccompRole) -> &'static [(Capability, &'static str)] {
    match role {
        SeccompRole::Fs => &[
            (Capability::CAP_CHOWN, "chown on behalf of the guest, and creating files owned by the caller"),
            (Capability::CAP_DAC_OVERRIDE, "opening files as root whatever their mode, as the guest's root expects"),
            (Capability::CAP_DAC_READ_SEARCH, "reading directories and following paths the caller may not search"),
            (Capability::CAP_FOWNER, "chmod, utimes and xattrs on files the host uid does not own"),
            (Capability::CAP_FSETID, "keeping set-id bits on writes and chmod as the guest asks"),
            (Capability::CAP_SETUID, "per-request credentials: setresuid to the guest caller's uid"),
            (Capability::CAP_SETGID, "per-request credentials: setresgid to the guest caller's gid"),
            (Capability::CAP_MKNOD, "mknod of fifos and sockets (device nodes are refused by the policy)"),
            (Capability::CAP_SETFCAP, "setting security.capability xattrs the guest writes"),
        ],
        SeccompRole::Vcpu | SeccompRole::Devices | SeccompRole::Net | SeccompRole::Console | SeccompRole::Watcher => {
            &[]
        }
    }
}

/// [`kept_capabilities`] as a capability mask, the way `/proc/<pid>/task/<tid>/status` shows
/// `CapEff` (for a process that holds them all).
pub fn kept_capability_mask(role: SeccompRole) -> u64 {
    kept_capabilities(role).iter().fold(0, |mask, (cap, _)| mask | cap.bitmask())
}

/// Errors hardening a thread.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The role's filter does not compile (a bug in [`lists`]).
    #[error("cannot build the {role} seccomp filter: {reason}")]
    Build { role: &'static str, reason: String },
    /// The kernel refused the filter.
    #[error("cannot install the {role} seccomp filter: {reason}")]
    Install { role: &'static str, reason: String },
    /// The thread's capabilities could not be dropped.
    #[error("cannot drop the capabilities of the {role} thread: {reason}")]
    Capabilities { role: &'static str, reason: String },
    /// The SIGSYS handler could not be installed.
    #[error("cannot install the SIGSYS handler")]
    Handler(#[source] io::Error),
    /// The filter was installed but a denied syscall went through.
    #[error("the kernel accepted a seccomp filter that did not deny the probe syscall")]
    ProbeNotDenied,
}

/// A violation as the VM reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeccompViolation {
    /// The thread's name (`tern-fs`, `tern-vcpu0`, …), or its tid when unknown.
    pub thread: String,
    /// The syscall number (x86_64).
    pub syscall: i64,
    /// The syscall's name, when libseccomp knows it.
    pub name: Option<String>,
}

impl std::fmt::Display for SeccompViolation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VMM thread {} made syscall {}", self.thread, self.syscall)?;
        if let Some(name) = &self.name {
            write!(f, " ({name})")?;
        }
        f.write_str(", which its seccomp filter forbids")
    }
}

/// Where the SIGSYS handler reports a VM's violations: per-role counters (exported as
/// metrics), the first violation, and the eventfd that wakes whoever ends the VM. The sink
/// lives as long as the VM's metrics (which can outlive the VM), so it holds no fd itself:
/// only the number of one its waker owns, withdrawn when the waker goes.
#[derive(Debug)]
pub struct ViolationSink {
    counts: [AtomicU64; SeccompRole::ALL.len()],
    /// `tid << 32 | syscall` of the first violation; 0 while there is none.
    first: AtomicU64,
    /// The waker's eventfd, or -1.
    notify_fd: AtomicI32,
    /// Thread names by tid, registered as threads are hardened.
    threads: Mutex<HashMap<u32, String>>,
}

impl Default for ViolationSink {
    fn default() -> Self {
        ViolationSink {
            counts: Default::default(),
            first: AtomicU64::new(0),
            notify_fd: AtomicI32::new(-1),
            threads: Mutex::default(),
        }
    }
}

impl ViolationSink {
    /// Violations so far, by role.
    pub fn counts(&self) -> Vec<(SeccompRole, u64)> {
        SeccompRole::ALL.iter().map(|role| (*role, self.counts[role.index()].load(Ordering::Relaxed))).collect()
    }

    /// Write to `notify` on every violation, until [`ViolationSink::withdraw_notify`]. One
    /// waker per sink: false if one is already there.
    pub(crate) fn set_notify(&self, notify: &EventFd) -> bool {
        self.notify_fd.compare_exchange(-1, notify.as_raw_fd(), Ordering::SeqCst, Ordering::SeqCst).is_ok()
    }

    /// The waker is going: violations from now on are only counted.
    pub(crate) fn withdraw_notify(&self) {
        self.notify_fd.store(-1, Ordering::SeqCst);
    }

    /// The first violation, if any.
    pub(crate) fn first(&self) -> Option<SeccompViolation> {
        let packed = self.first.load(Ordering::SeqCst);
        if packed == 0 {
            return None;
        }
        let tid = (packed >> 32) as u32;
        let syscall = i64::from(packed as u32);
        let thread = self.threads.lock_unpoisoned().get(&tid).cloned().unwrap_or_else(|| format!("tid {tid}"));
        let name = i32::try_from(syscall).ok().and_then(|nr| libseccomp::ScmpSyscall::from(nr).get_name().ok());
        Some(SeccompViolation { thread, syscall, name })
    }

    /// Called from the SIGSYS handler: only atomics and `write(2)`.
    fn record(&self, role: SeccompRole, tid: u32, syscall: u32) {
        self.counts[role.index()].fetch_add(1, Ordering::Relaxed);
        let packed = (u64::from(tid) << 32) | u64::from(syscall);
        let _ = self.first.compare_exchange(0, packed.max(1), Ordering::SeqCst, Ordering::SeqCst);
        let notify = self.notify_fd.load(Ordering::SeqCst);
        if notify >= 0 {
            let one = 1u64;
            // SAFETY: writes 8 bytes from a live u64 to the waker's eventfd, which stays open
            // until it is withdrawn; write(2) is async-signal-safe and in every role's list.
            unsafe { libc::write(notify, (&one as *const u64).cast(), 8) };
        }
    }
}

/// How a VM's threads are hardened: the mode and where violations go.
#[derive(Debug, Clone)]
pub struct Hardening {
    mode: SeccompMode,
    sink: Arc<ViolationSink>,
}

impl Hardening {
    pub fn new(mode: SeccompMode, sink: Arc<ViolationSink>) -> Self {
        Hardening { mode, sink }
    }

    /// No filters: unit tests that start a device's threads without a VM.
    #[cfg(test)]
    pub(crate) fn off() -> Self {
        Hardening { mode: SeccompMode::Off, sink: Arc::default() }
    }

    /// Trap, as in production, for unit tests that run a device on its real thread: they end
    /// with [`Hardening::assert_no_violation`], so the role's list is tested by real traffic.
    #[cfg(test)]
    pub(crate) fn trap_for_test() -> Self {
        Hardening { mode: SeccompMode::Trap, sink: Arc::default() }
    }

    #[cfg(test)]
    pub(crate) fn assert_no_violation(&self) {
        assert_eq!(self.sink.first(), None, "a hardened thread made a forbidden syscall");
    }
}

/// What the SIGSYS handler needs of the thread it interrupts, set while the thread runs.
struct ThreadState {
    role: SeccompRole,
    tid: u32,
    sink: Arc<ViolationSink>,
}

thread_local! {
    // A plain pointer with a const initializer: reading it needs no lazy initialisation, so
    // the SIGSYS handler can.
    static CURRENT: std::cell::Cell<*const ThreadState> = const { std::cell::Cell::new(std::ptr::null()) };
}

/// Clears [`CURRENT`] when the thread's body ends, before the state it points to goes away.
struct CurrentGuard;

impl Drop for CurrentGuard {
    fn drop(&mut self) {
        CURRENT.with(|current| current.set(std::ptr::null()));
    }
}

/// `si_syscall` of a SIGSYS `siginfo_t` (x86_64): after signo, errno, code and padding comes
/// `_sigsys { void *_call_addr; int _syscall; unsigned int _arch; }`.
#[repr(C)]
struct SigsysInfo {
    signo: libc::c_int,
    errno: libc::c_int,
    code: libc::c_int,
    _pad: libc::c_int,
    call_addr: *mut libc::c_void,
    syscall: libc::c_int,
    arch: libc::c_uint,
}

/// A `fmt::Write` into a stack buffer: the handler must not allocate.
struct StackLine {
    buf: [u8; 160],
    len: usize,
}

impl std::fmt::Write for StackLine {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let take = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + take].copy_from_slice(&s.as_bytes()[..take]);
        self.len += take;
        Ok(())
    }
}

/// The SIGSYS handler: see the module docs. Async-signal-safe: a thread-local read, atomics,
/// formatting into a stack buffer and `write(2)`.
extern "C" fn on_sigsys(_signal: libc::c_int, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SIGSYS (SA_SIGINFO), laid out as
    // `SigsysInfo` on x86_64.
    let syscall = unsafe { (*info.cast::<SigsysInfo>()).syscall };
    let mut line = StackLine { buf: [0; 160], len: 0 };
    let state = CURRENT.with(|current| current.get());
    // SAFETY: CURRENT points at the `ThreadState` on this thread's stack while its body runs
    // and is cleared before that state is dropped.
    match unsafe { state.as_ref() } {
        Some(state) => {
            state.sink.record(state.role, state.tid, syscall as u32);
            let _ = writeln!(
                line,
                "tern: seccomp: VMM thread {} (role {}) made forbidden syscall {syscall}: EPERM; the VM ends",
                state.tid,
                state.role.name()
            );
        }
        None => {
            let _ = writeln!(line, "tern: seccomp: a filtered thread made forbidden syscall {syscall}");
        }
    }
    // SAFETY: writes the formatted bytes to stderr; write(2) is async-signal-safe.
    unsafe { libc::write(libc::STDERR_FILENO, line.buf.as_ptr().cast(), line.len) };
    // SAFETY: `context` is the interrupted thread's ucontext; the syscall's return value is
    // its rax, which the kernel restores on return from the handler.
    unsafe {
        let context = &mut *context.cast::<libc::ucontext_t>();
        context.uc_mcontext.gregs[libc::REG_RAX as usize] = -i64::from(libc::EPERM);
    }
}

/// Install the SIGSYS handler (once per process), as the vCPU kick handler is installed.
fn install_sigsys_handler() -> Result<(), SeccompError> {
    static SIGSYS_HANDLER: OnceLock<Result<(), vmm_sys_util::errno::Error>> = OnceLock::new();
    let result = SIGSYS_HANDLER.get_or_init(|| register_signal_handler(libc::SIGSYS, on_sigsys));
    (*result).map_err(|err| SeccompError::Handler(io::Error::from_raw_os_error(err.errno())))
}

/// glibc's malloc reads two files lazily, once per process, on whichever thread first needs
/// them, and a filtered VMM thread may not open files:
/// - the first time a heap of a thread arena shrinks, it reads
///   `/proc/sys/vm/overcommit_memory` (seen on `tern-devices` after 10 MiB of stdin: its vsock
///   buffers came and went);
/// - the first time a thread needs a ninth arena, it calls `get_nprocs()`, which reads
///   `/sys/devices/system/cpu/online`.
///
/// Both are settled here, once, before the first hardened thread starts: a throwaway thread
/// grows and shrinks a heap of its own, and the arena limit is set to glibc's own default (8
/// arenas per CPU) unless the environment sets it (`MALLOC_ARENA_MAX`, `glibc.malloc.arena_max`).
fn settle_malloc() {
    static SETTLED: Once = Once::new();
    SETTLED.call_once(|| {
        // 32 blocks of 32 KiB: below the mmap threshold, so they come from the thread's own
        // heap; freed newest first, they merge into its top, and the heap is trimmed.
        let shrink = std::thread::spawn(|| {
            let mut blocks: Vec<Vec<u8>> = (0..32).map(|_| Vec::with_capacity(32 << 10)).collect();
            while let Some(block) = blocks.pop() {
                drop(std::hint::black_box(block));
            }
        });
        if shrink.join().is_err() {
            tracing::warn!("the malloc warm-up thread panicked");
        }
        let tunables = std::env::var("GLIBC_TUNABLES").unwrap_or_default();
        if std::env::var_os("MALLOC_ARENA_MAX").is_some() || tunables.contains("malloc.arena_max") {
            return;
        }
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        let limit = libc::c_int::try_from(cpus.saturating_mul(8)).unwrap_or(libc::c_int::MAX);
        // SAFETY: mallopt only sets a malloc parameter; M_ARENA_MAX takes any positive count.
        if unsafe { libc::mallopt(libc::M_ARENA_MAX, limit) } != 1 {
            tracing::warn!(limit, "cannot set malloc's arena limit; a VMM thread may trip its filter in malloc");
        }
    });
}

/// The compiled filter of `role` under `mode` (`None` for [`SeccompMode::Off`]).
fn filter(role: SeccompRole, mode: SeccompMode) -> Result<Option<BpfProgram>, SeccompError> {
    let mismatch = match mode {
        SeccompMode::Off => return Ok(None),
        SeccompMode::Trap => seccompiler::SeccompAction::Trap,
        SeccompMode::Log => seccompiler::SeccompAction::Log,
    };
    let build = |reason: String| SeccompError::Build { role: role.name(), reason };
    let filter =
        SeccompFilter::new(lists::rules(role), mismatch, seccompiler::SeccompAction::Allow, TargetArch::x86_64)
            .map_err(|err| build(err.to_string()))?;
    BpfProgram::try_from(filter).map(Some).map_err(|err| build(err.to_string()))
}

/// Drop the calling thread's capabilities to what `role` keeps.
fn drop_capabilities(role: SeccompRole) -> Result<(), SeccompError> {
    let fail = |err: caps::errors::CapsError| SeccompError::Capabilities { role: role.name(), reason: err.to_string() };
    let permitted = caps::read(None, CapSet::Permitted).map_err(fail)?;
    let kept: CapsHashSet =
        kept_capabilities(role).iter().map(|(cap, _)| *cap).filter(|cap| permitted.contains(cap)).collect();
    caps::clear(None, CapSet::Ambient).map_err(fail)?;
    caps::set(None, CapSet::Inheritable, &CapsHashSet::new()).map_err(fail)?;
    caps::set(None, CapSet::Effective, &kept).map_err(fail)?;
    caps::set(None, CapSet::Permitted, &kept).map_err(fail)
}

/// Harden the calling thread as `role`: capabilities, then the filter.
fn harden_current_thread(
    role: SeccompRole,
    mode: SeccompMode,
    program: Option<&BpfProgram>,
) -> Result<(), SeccompError> {
    if mode == SeccompMode::Off {
        return Ok(());
    }
    drop_capabilities(role)?;
    if let Some(program) = program {
        seccompiler::apply_filter(program)
            .map_err(|err| SeccompError::Install { role: role.name(), reason: err.to_string() })?;
    }
    Ok(())
}

/// Start a VMM thread named `name` that runs `body` hardened as `role`. Returns once the
/// thread is hardened; if it cannot be, the thread ends without running `body` and the error
/// comes back here.
pub fn spawn<F>(name: String, role: SeccompRole, hardening: &Hardening, body: F) -> io::Result<JoinHandle<()>>
where
    F: FnOnce() + Send + 'static,
{
    let mode = hardening.mode;
    let program = filter(role, mode).map_err(io::Error::other)?;
    if mode == SeccompMode::Trap {
        install_sigsys_handler().map_err(io::Error::other)?;
    }
    if mode != SeccompMode::Off {
        settle_malloc();
    }
    let sink = hardening.sink.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
    let thread_name = name.clone();
    let thread = std::thread::Builder::new().name(name).spawn(move || {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() } as u32;
        sink.threads.lock_unpoisoned().insert(tid, thread_name);
        let state = ThreadState { role, tid, sink };
        CURRENT.with(|current| current.set(&state));
        let _clear = CurrentGuard;
        let hardened = harden_current_thread(role, mode, program.as_ref());
        let ok = hardened.is_ok();
        let _ = ready_tx.send(hardened);
        drop(program);
        if ok {
            test_hook_start(role);
            body();
        }
    })?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(thread),
        Ok(Err(err)) => {
            let _ = thread.join();
            Err(io::Error::other(err))
        }
        Err(_) => {
            let _ = thread.join();
            Err(io::Error::other("the VMM thread ended before it was hardened"))
        }
    }
}

/// Whether this kernel installs seccomp filters that deny: a throwaway thread installs a
/// filter returning EXDEV for `getppid`, calls it, and reports. Also checks the kernel has
/// the actions the modes use.
pub fn probe() -> Result<(), SeccompError> {
    let actions = std::fs::read_to_string("/proc/sys/kernel/seccomp/actions_avail").unwrap_or_default();
    for action in ["trap", "log"] {
        if !actions.split_whitespace().any(|a| a == action) {
            return Err(SeccompError::Install {
                role: "probe",
                reason: format!("the kernel lacks the seccomp action {action:?} (actions_avail: {actions:?})"),
            });
        }
    }
    let rules = [(libc::SYS_getppid, Vec::new())].into_iter().collect();
    let filter = SeccompFilter::new(
        rules,
        seccompiler::SeccompAction::Allow,
        seccompiler::SeccompAction::Errno(libc::EXDEV as u32),
        TargetArch::x86_64,
    )
    .and_then(BpfProgram::try_from)
    .map_err(|err| SeccompError::Build { role: "probe", reason: err.to_string() })?;
    let probe = std::thread::spawn(move || -> Result<(), SeccompError> {
        seccompiler::apply_filter(&filter)
            .map_err(|err| SeccompError::Install { role: "probe", reason: err.to_string() })?;
        // SAFETY: getppid has no preconditions.
        let ret = unsafe { libc::syscall(libc::SYS_getppid) };
        let errno = io::Error::last_os_error().raw_os_error();
        if ret == -1 && errno == Some(libc::EXDEV) {
            Ok(())
        } else {
            Err(SeccompError::ProbeNotDenied)
        }
    });
    probe.join().unwrap_or(Err(SeccompError::ProbeNotDenied))
}

/// The test-only switch `TERN_TEST_SECCOMP_VIOLATION`, read once. Its value makes one VMM
/// thread issue a syscall no list allows (`getpgrp`, which changes nothing):
/// - `<role>:start`: the thread of that role, right after it is hardened;
/// - `fs:lookup:<name>`: the fs thread, when the guest looks up `<name>` in a share.
///
/// Only tests set it; see tests/README.md.
fn test_switch() -> Option<&'static str> {
    static SWITCH: OnceLock<Option<String>> = OnceLock::new();
    SWITCH.get_or_init(|| std::env::var("TERN_TEST_SECCOMP_VIOLATION").ok()).as_deref()
}

fn violate_for_test(role: SeccompRole, point: &str) {
    tracing::warn!(role = role.name(), point, "TERN_TEST_SECCOMP_VIOLATION: making a forbidden syscall");
    // SAFETY: getpgrp has no preconditions and changes nothing.
    unsafe { libc::syscall(libc::SYS_getpgrp) };
}

fn test_hook_start(role: SeccompRole) {
    if test_switch().and_then(|s| s.strip_suffix(":start")) == Some(role.name()) {
        violate_for_test(role, "start");
    }
}

/// The fs thread's hook: see [`test_switch`].
pub(crate) fn test_hook_lookup(name: &[u8]) {
    if test_switch().and_then(|s| s.strip_prefix("fs:lookup:")).is_some_and(|wanted| wanted.as_bytes() == name) {
        violate_for_test(SeccompRole::Fs, "lookup");
    }
}

#[cfg(test)]
mod tests;
