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
    kvm_run, CpuId, Msrs, KVM_EXIT_INTERNAL_ERROR, KVM_EXIT_SHUTDOWN, KVM_SYSTEM_EVENT_CRASH,
    KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use super::kvm::KvmSystem;
use crate::api::VmExit;
use crate::boot::{cpu, regs};
use crate::devices::bus::{MmioBus, PioBus};
use crate::devices::virtio::GuestMemory;
use crate::lifecycle::{VcpuFault, VmLifecycle};
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
    Msrs {
        index: u8,
        set: usize,
        wanted: usize,
    },
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

/// What the run loop needs besides the vCPU itself.
pub struct VcpuRunContext {
    /// The port-I/O bus.
    pub pio: Arc<PioBus>,
    /// The MMIO bus.
    pub mmio: Arc<MmioBus>,
    pub(crate) lifecycle: Arc<VmLifecycle>,
    /// Where exits are counted.
    pub metrics: Arc<VmMetrics>,
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
    let result =
        KICK_HANDLER.get_or_init(|| register_signal_handler(kick_signal(), handle_kick_signal));
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
        Vcpu {
            index,
            fd,
            _memory: memory,
        }
    }

    /// This vCPU's index (and APIC id).
    pub fn index(&self) -> u8 {
        self.index
    }

    /// CPUID, MSRs, FPU and LAPIC for this vCPU; for the bootstrap vCPU also long-mode
    /// registers entering the kernel at `entry`. Application processors wait for the guest's
    /// INIT/SIPI, which resets their registers anyway.
    pub fn configure(
        &self,
        kvm: &KvmSystem,
        supported_cpuid: &CpuId,
        num_cpus: u8,
        entry: Option<u64>,
    ) -> Result<(), VcpuSetupError> {
        let index = self.index;
        let options = cpu::CpuidOptions {
            apic_id: index,
            num_cpus,
            tsc_deadline_timer: kvm.has_tsc_deadline_timer(),
        };
        let cpuid = cpu::vcpu_cpuid(supported_cpuid, &options);
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(|err| VcpuSetupError::Cpuid(index, err))?;

        let msr_entries = cpu::boot_msrs();
        let msrs = Msrs::from_entries(&msr_entries).map_err(|_| VcpuSetupError::MsrList)?;
        let set = self
            .fd
            .set_msrs(&msrs)
            .map_err(|err| VcpuSetupError::MsrsIoctl(index, err))?;
        if set != msr_entries.len() {
            return Err(VcpuSetupError::Msrs {
                index,
                set,
                wanted: msr_entries.len(),
            });
        }

        self.fd
            .set_fpu(&regs::boot_fpu())
            .map_err(|err| VcpuSetupError::Fpu(index, err))?;
        let lapic = self
            .fd
            .get_lapic()
            .map_err(|err| VcpuSetupError::Lapic(index, err))?;
        self.fd
            .set_lapic(&cpu::lapic_with_lint_pins(&lapic))
            .map_err(|err| VcpuSetupError::Lapic(index, err))?;

        if let Some(entry) = entry {
            let sregs = self
                .fd
                .get_sregs()
                .map_err(|err| VcpuSetupError::Sregs(index, err))?;
            self.fd
                .set_sregs(&regs::long_mode_sregs(&sregs))
                .map_err(|err| VcpuSetupError::Sregs(index, err))?;
            self.fd
                .set_regs(&regs::boot_regs(entry))
                .map_err(|err| VcpuSetupError::Regs(index, err))?;
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
        self.fd.set_regs(&kvm_bindings::kvm_regs {
            rip: ip,
            rflags: 2,
            ..Default::default()
        })
    }

    /// Run on a new `tern-vcpu<N>` thread; the result goes to the VM's lifecycle.
    pub fn spawn(mut self, context: VcpuRunContext) -> std::io::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name(format!("tern-vcpu{}", self.index))
            .spawn(move || {
                // The thread inherits its creator's signal mask; the kick must get through.
                if let Err(err) = vmm_sys_util::signal::unblock_signal(kick_signal()) {
                    tracing::warn!("cannot unblock the vCPU kick signal: {err}");
                }
                let index = self.index;
                let result =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run(&context)))
                        .unwrap_or(Err(VcpuRunError::Panicked));
                if let Err(error) = &result {
                    tracing::error!("vCPU {index} failed: {error}");
                }
                context
                    .lifecycle
                    .finish(result.map_err(|error| VcpuFault { index, error }));
            })
    }

    /// The run loop: until the guest resets or shuts down, a fault, or a stop request.
    pub fn run(&mut self, context: &VcpuRunContext) -> Result<VmExit, VcpuRunError> {
        let _registration = KvmRunRegistration::new(self.fd.get_kvm_run());
        loop {
            if context.lifecycle.is_stopping() {
                return Ok(VmExit::Stopped);
            }
            if self.index == 0 {
                context.lifecycle.mark_first_guest_entry();
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
            return VcpuRunError::Internal {
                suberror: 0,
                data: Vec::new(),
            };
        }
        // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the union member
        // the kernel filled in; it is plain integers.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let words = (internal.ndata as usize).min(internal.data.len());
        VcpuRunError::Internal {
            suberror: internal.suberror,
            data: internal.data[..words].to_vec(),
        }
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
            other => ExitAction::Fail(VcpuRunError::UnexpectedExit(format!(
                "system event {other}"
            ))),
        },
        VcpuExit::FailEntry(reason, cpu) => {
            ExitAction::Fail(VcpuRunError::FailEntry { reason, cpu })
        }
        VcpuExit::InternalError => ExitAction::InternalError,
        VcpuExit::Intr => ExitAction::Continue,
        other => ExitAction::Fail(VcpuRunError::UnexpectedExit(format!("{other:?}"))),
    }
}
