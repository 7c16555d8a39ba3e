//! How a running VM ends. The first of these to happen decides the outcome: a vCPU sees the
//! guest reset or shut down, a vCPU fails, a VMM thread breaks its seccomp filter, or the owner
//! calls `stop()`. Recording the outcome
//! raises the stop flag every vCPU checks before re-entering the guest, and kicks each vCPU
//! thread out of `KVM_RUN` with a signal; `join_vcpus` then collects the threads.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tern_sync::{CondvarExt, LockExt};

use crate::vstate::vcpu::{kick_vcpu_thread, VcpuRunError, VcpuSupervisor, VmExit};

/// How long `join_vcpus` keeps kicking a vCPU that has not left `KVM_RUN`.
const VCPU_JOIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause between kicks while waiting for vCPU threads.
const KICK_INTERVAL: Duration = Duration::from_millis(1);

/// A vCPU's failure, as recorded in the outcome.
#[derive(Debug, Clone)]
pub(crate) struct VcpuFault {
    pub index: u8,
    pub error: VcpuRunError,
}

/// What ended a VM that did not end well.
#[derive(Debug, Clone)]
pub(crate) enum VmFault {
    /// A vCPU failed.
    Vcpu(VcpuFault),
    /// A VMM thread made a syscall its seccomp filter forbids (mode `trap`).
    Seccomp(crate::seccomp::SeccompViolation),
}

/// How the VM ended.
pub(crate) type VmOutcome = Result<VmExit, VmFault>;

/// Shared by the VM handle, the vCPU threads and the devices that can end the VM.
#[derive(Default)]
pub(crate) struct VmLifecycle {
    outcome: Mutex<Option<VmOutcome>>,
    ended: Condvar,
    stopping: AtomicBool,
    vcpu_threads: Mutex<Vec<JoinHandle<()>>>,
    first_guest_entry: OnceLock<Instant>,
    exit_time: OnceLock<Instant>,
}

impl VmLifecycle {
    pub fn new() -> Self {
        Self::default()
    }

    /// Record `outcome` unless another came first, and bring every vCPU out of the guest.
    pub fn finish(&self, outcome: VmOutcome) {
        {
            let mut slot = self.outcome.lock_unpoisoned();
            if slot.is_none() {
                let _ = self.exit_time.set(Instant::now());
                *slot = Some(outcome);
            }
        }
        self.stopping.store(true, Ordering::SeqCst);
        self.ended.notify_all();
        self.kick_vcpus();
    }

    /// Whether vCPUs must stop entering the guest.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Called by vCPU 0 right before its first `KVM_RUN`: the kernel's first instruction.
    pub fn mark_first_guest_entry(&self) {
        let _ = self.first_guest_entry.set(Instant::now());
    }

    pub fn first_guest_entry(&self) -> Option<Instant> {
        self.first_guest_entry.get().copied()
    }

    pub fn exit_time(&self) -> Option<Instant> {
        self.exit_time.get().copied()
    }

    /// Hand a started vCPU thread over for kicking and joining.
    pub fn adopt_vcpu_thread(&self, thread: JoinHandle<()>) {
        let stopping = self.is_stopping();
        if stopping {
            // The VM ended while this thread was starting: it may have missed the kick.
            kick_vcpu_thread(&thread);
        }
        self.vcpu_threads.lock_unpoisoned().push(thread);
    }

    fn kick_vcpus(&self) {
        for thread in self.vcpu_threads.lock_unpoisoned().iter().filter(|thread| !thread.is_finished()) {
            kick_vcpu_thread(thread);
        }
    }

    /// Block until the VM ends.
    pub fn wait(&self) -> VmOutcome {
        let mut slot = self.outcome.lock_unpoisoned();
        loop {
            if let Some(outcome) = slot.as_ref() {
                return outcome.clone();
            }
            slot = self.ended.wait_unpoisoned(slot);
        }
    }

    /// Block until the VM ends or `timeout` passes.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<VmOutcome> {
        let deadline = Instant::now() + timeout;
        let mut slot = self.outcome.lock_unpoisoned();
        loop {
            if let Some(outcome) = slot.as_ref() {
                return Some(outcome.clone());
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            slot = self.ended.wait_timeout_unpoisoned(slot, left).0;
        }
    }

    /// Stop (if not already ended) and join every vCPU thread, kicking the ones still in the
    /// guest. A thread that stays stuck past the timeout (blocked in a device) is left
    /// detached rather than hanging the caller.
    pub fn join_vcpus(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        let threads = std::mem::take(&mut *self.vcpu_threads.lock_unpoisoned());
        let deadline = Instant::now() + VCPU_JOIN_TIMEOUT;
        for thread in threads {
            while !thread.is_finished() && Instant::now() < deadline {
                kick_vcpu_thread(&thread);
                std::thread::sleep(KICK_INTERVAL);
            }
            if thread.is_finished() {
                if thread.join().is_err() {
                    tracing::error!("a vCPU thread panicked");
                }
            } else {
                let name = thread.thread().name().unwrap_or("vCPU").to_string();
                tracing::error!("{name} did not stop within {VCPU_JOIN_TIMEOUT:?}; leaving it detached");
            }
        }
    }
}

impl VcpuSupervisor for VmLifecycle {
    fn is_stopping(&self) -> bool {
        VmLifecycle::is_stopping(self)
    }

    fn mark_first_guest_entry(&self) {
        VmLifecycle::mark_first_guest_entry(self)
    }

    fn vcpu_ended(&self, index: u8, result: Result<VmExit, VcpuRunError>) {
        self.finish(result.map_err(|error| VmFault::Vcpu(VcpuFault { index, error })));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_outcome_wins() {
        let lifecycle = VmLifecycle::new();
        assert!(lifecycle.wait_timeout(Duration::from_millis(1)).is_none());
        assert!(!lifecycle.is_stopping());
        lifecycle.finish(Ok(VmExit::Reset));
        lifecycle.finish(Ok(VmExit::Stopped));
        assert!(lifecycle.is_stopping());
        assert!(matches!(lifecycle.wait(), Ok(VmExit::Reset)));
        assert!(matches!(lifecycle.wait_timeout(Duration::ZERO), Some(Ok(VmExit::Reset))));
        assert!(lifecycle.exit_time().is_some());
    }

    #[test]
    fn wait_wakes_when_another_thread_finishes() {
        let lifecycle = std::sync::Arc::new(VmLifecycle::new());
        let finisher = lifecycle.clone();
        let thread = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            finisher.finish(Ok(VmExit::Shutdown));
        });
        assert!(matches!(lifecycle.wait(), Ok(VmExit::Shutdown)));
        thread.join().unwrap();
    }

    #[test]
    fn join_collects_finished_threads() {
        let lifecycle = VmLifecycle::new();
        lifecycle.adopt_vcpu_thread(std::thread::spawn(|| {}));
        lifecycle.join_vcpus();
        assert!(lifecycle.vcpu_threads.lock_unpoisoned().is_empty());
    }
}
