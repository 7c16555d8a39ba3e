//! vCPUs: setting up their boot state, the run loop on a `tern-vcpu<N>` thread, and kicking
//! a vCPU out of `KVM_RUN`.
//!
//! Kicking: a real-time signal is sent to the vCPU thread. Its handler sets `immediate_exit`
//! in that thread's `kvm_run`, so a kick that lands just before `KVM_RUN` still makes the
//! ioctl return at once (with EINTR) instead of being lost; the loop then sees the stop flag.

use std::cell::Cell;
use std::os::raw::{c_int, c_void};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;

use kvm_bindings::{
    kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_run, kvm_sregs, CpuId, Msrs, KVM_EXIT_INTERNAL_ERROR,
    KVM_EXIT_SHUTDOWN, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::memory::GuestMemory;
use crate::metrics::{ExitReason, VmMetrics};

/// The kick signal is `SIGRTMIN() + VCPU_KICK_SIGNAL_OFFSET`.
pub const VCPU_KICK_SIGNAL_OFFSET: c_int = 0;

/// Errors setting a vCPU up before it runs.
#[derive(Debug, thiserror::Error)]
pub enum VcpuSetupError {
    /// `KVM_SET_CPUID2` failed.
    #[error("cannot set the CPUID of vCPU {0}")]
    Cpuid(u8, #[source] kvm_ioctls::Error),
    /// The MSR list could not be built.
    #[error("cannot build the boot MSR list")]
    MsrList,
    /// `KVM_SET_MSRS` failed or stopped early.
    #[error("cannot set the boot MSRs of vCPU {index} (KVM took {set} of {wanted})")]
    Msrs { index: u8, set: usize, wanted: usize },
    /// `KVM_SET_MSRS` failed outright.
    #[error("cannot set the boot MSRs of vCPU {0}")]
    MsrsIoctl(u8, #[source] kvm_ioctls::Error),
    /// `KVM_GET/SET_SREGS` failed.
    #[error("cannot set the special registers of vCPU {0}")]
    Sregs(u8, #[source] kvm_ioctls::Error),
    /// `KVM_SET_REGS` failed.
    #[error("cannot set the registers of vCPU {0}")]
    Regs(u8, #[source] kvm_ioctls::Error),
    /// `KVM_SET_FPU` failed.
    #[error("cannot set the FPU state of vCPU {0}")]
    Fpu(u8, #[source] kvm_ioctls::Error),
    /// `KVM_GET/SET_LAPIC` failed.
    #[error("cannot set up the local APIC of vCPU {0}")]
    Lapic(u8, #[source] kvm_ioctls::Error),
    /// The kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler")]
    KickSignal(#[source] vmm_sys_util::errno::Error),
}

/// Why a vCPU stopped running the guest against its will.
#[derive(Debug, Clone, thiserror::Error)]
pub enum VcpuRunError {
    /// `KVM_RUN` itself failed.
    #[error("KVM_RUN failed")]
    Run(#[source] kvm_ioctls::Error),
    /// KVM could not continue the guest (for example an instruction it cannot emulate).
    #[error("KVM internal error, suberror {suberror}, data {data:x?}")]
    Internal { suberror: u32, data: Vec<u64> },
    /// The hardware refused to enter the guest.
    #[error("VM entry failed with hardware reason {reason:#x} on host CPU {cpu}")]
    FailEntry { reason: u64, cpu: u32 },
    /// The guest reported a crash (a paravirtual panic notification).
    #[error("the guest reported a crash")]
    GuestCrash,
    /// An exit tern does not handle.
    #[error("unexpected KVM exit {0}")]
    UnexpectedExit(String),
    /// The vCPU thread panicked (a tern bug).
    #[error("the vCPU thread panicked")]
    Panicked,
}

/// How a VM ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmExit {
    /// The guest asked for a reset (i8042 reset command, as with `reboot=k`).
    Reset,
    /// The guest shut down, triple-faulted (as with `reboot=t`) or halted for good.
    Shutdown,
    /// The VM's owner stopped it (`VmHandle::stop`).
    Stopped,
}

/// Where a vCPU sends the guest's port-I/O or MMIO accesses (`devices::bus::Bus` implements
/// it). A trait so that this layer, below the devices, needs nothing from them.
pub trait GuestIoBus: Send + Sync {
    /// A guest read at `addr`; false if no device claims the address.
    fn read(&self, addr: u64, data: &mut [u8]) -> bool;
    /// A guest write at `addr`; false if no device claims the address.
    fn write(&self, addr: u64, data: &[u8]) -> bool;
}

/// What the vCPU threads ask of, and report to, whoever decides how the VM ends
/// (`lifecycle::VmLifecycle`). A trait so that this layer needs nothing above it.
pub trait VcpuSupervisor: Send + Sync {
    /// Whether vCPUs must stop entering the guest.
    fn is_stopping(&self) -> bool;
    /// vCPU 0 is about to enter the guest; the first call is the kernel's first instruction.
    fn mark_first_guest_entry(&self);
    /// vCPU `index` has stopped running the guest, for this reason.
    fn vcpu_ended(&self, index: u8, result: Result<VmExit, VcpuRunError>);
}

/// What the run loop needs besides the vCPU itself.
pub struct VcpuRunContext {
    /// The port-I/O bus.
    pub pio: Arc<dyn GuestIoBus>,
    /// The MMIO bus.
    pub mmio: Arc<dyn GuestIoBus>,
    /// Told how the vCPU ended; asked whether to stop.
    pub supervisor: Arc<dyn VcpuSupervisor>,
    /// Where exits are counted.
    pub metrics: Arc<VmMetrics>,
    /// How the vCPU thread is hardened.
    pub hardening: crate::seccomp::Hardening,
}

/// A vCPU's state before its first instruction, as the boot protocol wants it
/// (`boot::vcpu_boot_state` builds it; [`Vcpu::configure`] hands it to KVM).
pub struct VcpuBootState {
    /// The CPUID the guest sees.
    pub cpuid: CpuId,
    /// MSRs to set.
    pub msrs: Vec<kvm_msr_entry>,
    /// The FPU state.
    pub fpu: kvm_fpu,
    /// Turns the local APIC KVM created into the one the guest starts with.
    pub lapic: fn(&kvm_lapic_state) -> kvm_lapic_state,
    /// For the bootstrap vCPU only: application processors wait for the guest's INIT/SIPI,
    /// which resets their registers anyway.
    pub entry: Option<EntryRegisters>,
}

/// The bootstrap vCPU's registers entering the kernel.
pub struct EntryRegisters {
    /// Turns KVM's special registers into the ones entering the kernel (long mode).
    pub sregs: fn(&kvm_sregs) -> kvm_sregs,
    /// The general registers (entry point, boot parameters, stack).
    pub regs: kvm_regs,
}

/// One virtual CPU.
pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
    /// Keeps guest RAM mapped while this vCPU can still run.
    _memory: Option<GuestMemory>,
}

thread_local! {
    /// This thread's `kvm_run`, for the kick signal handler.
    static THREAD_KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn handle_kick_signal(_: c_int, _: *mut libc::siginfo_t, _: *mut c_void) {
    // Only async-signal-safe work here: a thread-local read (const-initialised, no lazy
    // setup) and one store.
    let run = THREAD_KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: a non-null pointer is this thread's live `kvm_run` mapping: `KvmRunRegistration`
        // sets it while the thread owns its `VcpuFd` and clears it before the fd (and the
        // mapping) can go away. The handler runs on that same thread, so nothing races.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

/// The signal that kicks vCPUs.
pub fn kick_signal() -> c_int {
    SIGRTMIN() + VCPU_KICK_SIGNAL_OFFSET
}

static KICK_HANDLER: OnceLock<Result<(), vmm_sys_util::errno::Error>> = OnceLock::new();

/// Install the kick signal handler (once per process).
pub fn install_kick_handler() -> Result<(), VcpuSetupError> {
    let result = KICK_HANDLER.get_or_init(|| register_signal_handler(kick_signal(), handle_kick_signal));
    (*result).map_err(VcpuSetupError::KickSignal)
}

/// Make `thread` (a vCPU thread) leave `KVM_RUN` soon.
pub fn kick_vcpu_thread(thread: &JoinHandle<()>) {
    // Without the handler the signal's default action would kill the process.
    if install_kick_handler().is_ok() {
        if let Err(err) = thread.kill(kick_signal()) {
            tracing::trace!("kicking a vCPU thread: {err}");
        }
    }
}

/// Publishes this thread's `kvm_run` to the signal handler for as long as it lives.
struct KvmRunRegistration;

impl KvmRunRegistration {
    fn new(run: *mut kvm_run) -> Self {
        THREAD_KVM_RUN.with(|cell| cell.set(run));
        KvmRunRegistration
    }
}

impl Drop for KvmRunRegistration {
    fn drop(&mut self) {
        THREAD_KVM_RUN.with(|cell| cell.set(std::ptr::null_mut()));
    }
}

/// What one exit asks of the loop.
enum ExitAction {
    Continue,
    End(VmExit),
    InternalError,
    Fail(VcpuRunError),
}

impl Vcpu {
    pub(super) fn new(index: u8, fd: VcpuFd, memory: Option<GuestMemory>) -> Self {
        Vcpu { index, fd, _memory: memory }
    }

    /// Hand `state` (CPUID, MSRs, FPU, LAPIC and, for the bootstrap vCPU, the registers
    /// entering the kernel) to KVM.
    pub fn configure(&self, state: &VcpuBootState) -> Result<(), VcpuSetupError> {
        let index = self.index;
        self.fd.set_cpuid2(&state.cpuid).map_err(|err| VcpuSetupError::Cpuid(index, err))?;

        let msrs = Msrs::from_entries(&state.msrs).map_err(|_| VcpuSetupError::MsrList)?;
        let set = self.fd.set_msrs(&msrs).map_err(|err| VcpuSetupError::MsrsIoctl(index, err))?;
        if set != state.msrs.len() {
            return Err(VcpuSetupError::Msrs { index, set, wanted: state.msrs.len() });
        }

        self.fd.set_fpu(&state.fpu).map_err(|err| VcpuSetupError::Fpu(index, err))?;
        let lapic = self.fd.get_lapic().map_err(|err| VcpuSetupError::Lapic(index, err))?;
        self.fd.set_lapic(&(state.lapic)(&lapic)).map_err(|err| VcpuSetupError::Lapic(index, err))?;

        if let Some(entry) = &state.entry {
            let sregs = self.fd.get_sregs().map_err(|err| VcpuSetupError::Sregs(index, err))?;
            self.fd.set_sregs(&(entry.sregs)(&sregs)).map_err(|err| VcpuSetupError::Sregs(index, err))?;
            self.fd.set_regs(&entry.regs).map_err(|err| VcpuSetupError::Regs(index, err))?;
        }
        Ok(())
    }

    /// Test guests start in real mode at `0:ip` instead of a kernel's 64-bit entry.
    #[cfg(test)]
    pub(crate) fn set_real_mode_entry(&self, ip: u64) -> Result<(), kvm_ioctls::Error> {
        let mut sregs = self.fd.get_sregs()?;
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        self.fd.set_sregs(&sregs)?;
        self.fd.set_regs(&kvm_bindings::kvm_regs { rip: ip, rflags: 2, ..Default::default() })
    }

    /// Run on a new `tern-vcpu<N>` thread; the result goes to the context's supervisor.
    pub fn spawn(mut self, context: VcpuRunContext) -> std::io::Result<JoinHandle<()>> {
        let name = crate::threads::vcpu_thread_name(self.index);
        let hardening = context.hardening.clone();
        crate::seccomp::spawn(name, crate::seccomp::SeccompRole::Vcpu, &hardening, move || {
            // The thread inherits its creator's signal mask; the kick must get through.
            if let Err(err) = vmm_sys_util::signal::unblock_signal(kick_signal()) {
                tracing::warn!("cannot unblock the vCPU kick signal: {err}");
            }
            let index = self.index;
            // The release profile has `panic = "abort"`: there a panic ends the process (the
            // shim) before this catch could run, which containerd sees as a dead shim. Builds
            // that unwind (tests, debug builds) get here instead, and must tell the
            // supervisor: a vCPU thread that ended silently would leave `VmHandle::wait`
            // blocked forever.
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run(&context)))
                .unwrap_or(Err(VcpuRunError::Panicked));
            if let Err(error) = &result {
                tracing::error!("vCPU {index} failed: {error}");
            }
            context.supervisor.vcpu_ended(index, result);
        })
    }

    /// The run loop: until the guest resets or shuts down, a fault, or a stop request.
    pub fn run(&mut self, context: &VcpuRunContext) -> Result<VmExit, VcpuRunError> {
        let _registration = KvmRunRegistration::new(self.fd.get_kvm_run());
        loop {
            if context.supervisor.is_stopping() {
                return Ok(VmExit::Stopped);
            }
            if self.index == 0 {
                context.supervisor.mark_first_guest_entry();
            }
            let action = match self.fd.run() {
                Ok(exit) => handle_exit(exit, context),
                Err(err) if err.errno() == libc::EINTR => {
                    // A kick (or a stray signal): clear the flag and let the loop decide.
                    context.metrics.exit(ExitReason::Interrupted);
                    self.fd.set_kvm_immediate_exit(0);
                    ExitAction::Continue
                }
                Err(err) if err.errno() == libc::EAGAIN => ExitAction::Continue,
                Err(err) => ExitAction::Fail(VcpuRunError::Run(err)),
            };
            match action {
                ExitAction::Continue => {}
                ExitAction::End(VmExit::Shutdown) => {
                    // We boot with `reboot=k`, so a shutdown/halt is unusual: say where the
                    // guest was, which is all there is to go on after an early triple fault.
                    let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or_default();
                    let exit_reason = self.fd.get_kvm_run().exit_reason;
                    if exit_reason == KVM_EXIT_SHUTDOWN {
                        // `panic=-1` reboots through the i8042 (a Reset), so this is a crash
                        // the guest could not even report. tests/run-test-binary.py keys on
                        // `exit_reason=8`.
                        tracing::warn!(
                            vcpu = self.index,
                            exit_reason,
                            rip = format_args!("{rip:#x}"),
                            "guest triple fault (KVM_EXIT_SHUTDOWN)"
                        );
                    } else {
                        tracing::info!(
                            vcpu = self.index,
                            exit_reason,
                            rip = format_args!("{rip:#x}"),
                            "guest shut down or halted"
                        );
                    }
                    return Ok(VmExit::Shutdown);
                }
                ExitAction::End(exit) => return Ok(exit),
                ExitAction::InternalError => return Err(self.internal_error()),
                ExitAction::Fail(error) => return Err(error),
            }
        }
    }

    fn internal_error(&mut self) -> VcpuRunError {
        let run = self.fd.get_kvm_run();
        if run.exit_reason != KVM_EXIT_INTERNAL_ERROR {
            return VcpuRunError::Internal { suberror: 0, data: Vec::new() };
        }
        // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the union member
        // the kernel filled in; it is plain integers.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let words = (internal.ndata as usize).min(internal.data.len());
        VcpuRunError::Internal { suberror: internal.suberror, data: internal.data[..words].to_vec() }
    }
}

/// The metrics label of an exit.
fn exit_reason(exit: &VcpuExit<'_>) -> ExitReason {
    match exit {
        VcpuExit::IoIn(..) => ExitReason::IoIn,
        VcpuExit::IoOut(..) => ExitReason::IoOut,
        VcpuExit::MmioRead(..) => ExitReason::MmioRead,
        VcpuExit::MmioWrite(..) => ExitReason::MmioWrite,
        VcpuExit::Hlt => ExitReason::Hlt,
        VcpuExit::Shutdown => ExitReason::Shutdown,
        VcpuExit::SystemEvent(..) => ExitReason::SystemEvent,
        VcpuExit::Intr => ExitReason::Interrupted,
        _ => ExitReason::Other,
    }
}

fn handle_exit(exit: VcpuExit<'_>, context: &VcpuRunContext) -> ExitAction {
    context.metrics.exit(exit_reason(&exit));
    match exit {
        VcpuExit::IoIn(port, data) => {
            if !context.pio.read(u64::from(port), data) {
                tracing::trace!("read from unclaimed port {port:#x}");
                data.fill(0xff);
            }
            ExitAction::Continue
        }
        VcpuExit::IoOut(port, data) => {
            if !context.pio.write(u64::from(port), data) {
                tracing::trace!("write to unclaimed port {port:#x}");
            }
            ExitAction::Continue
        }
        VcpuExit::MmioRead(addr, data) => {
            if !context.mmio.read(addr, data) {
                tracing::trace!("read from unclaimed MMIO {addr:#x}");
                data.fill(0xff);
            }
            ExitAction::Continue
        }
        VcpuExit::MmioWrite(addr, data) => {
            if !context.mmio.write(addr, data) {
                tracing::trace!("write to unclaimed MMIO {addr:#x}");
            }
            ExitAction::Continue
        }
        // With the in-kernel LAPIC, HLT only reaches userspace if the guest halts for good.
        VcpuExit::Hlt => ExitAction::End(VmExit::Shutdown),
        // A triple fault: what Linux does for `reboot=t`, or a guest that crashed hard.
        VcpuExit::Shutdown => ExitAction::End(VmExit::Shutdown),
        VcpuExit::SystemEvent(kind, _) => match kind {
            KVM_SYSTEM_EVENT_SHUTDOWN => ExitAction::End(VmExit::Shutdown),
            KVM_SYSTEM_EVENT_RESET => ExitAction::End(VmExit::Reset),
            KVM_SYSTEM_EVENT_CRASH => ExitAction::Fail(VcpuRunError::GuestCrash),
            other => ExitAction::Fail(VcpuRunError::UnexpectedExit(format!("system event {other}"))),
        },
        VcpuExit::FailEntry(reason, cpu) => ExitAction::Fail(VcpuRunError::FailEntry { reason, cpu }),
        VcpuExit::InternalError => ExitAction::InternalError,
        VcpuExit::Intr => ExitAction::Continue,
        other => ExitAction::Fail(VcpuRunError::UnexpectedExit(format!("{other:?}"))),
    }
}
