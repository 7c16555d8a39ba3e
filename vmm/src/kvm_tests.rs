//! Tests against the real `/dev/kvm` with tiny hand-written guests (no Linux): VM and vCPU
//! setup, the run loop's port-I/O dispatch, the i8042 reset, and kicking a spinning or
//! halted vCPU. Without KVM they say so and pass, except under `CI=true`, where that fails.

use std::io::{self, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::boot::regs::{write_gdt_and_idt, write_identity_page_tables};
use crate::boot::vcpu_boot_state;
use crate::devices::bus::{MmioBus, PioBus};
use crate::devices::legacy::{
    ConsoleWriter, I8042ResetPort, SerialConsole, COM1_PORT, COM1_PORT_COUNT, I8042_DATA_PORT, I8042_PORT_COUNT,
};
use crate::lifecycle::VmLifecycle;
use crate::memory::GuestMemory;
use crate::vstate::kvm::KvmSystem;
use crate::vstate::vcpu::{install_kick_handler, VcpuRunContext, VmExit};
use crate::vstate::vm::Vm;

const CODE_ADDR: u64 = 0x1000;

/// Real mode: print "OK\n" on COM1, then pulse the i8042 reset line.
const PRINT_AND_RESET: &[u8] = &[
    0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0xb0, b'O', 0xee, // mov al, 'O'; out dx, al
    0xb0, b'K', 0xee, // mov al, 'K'; out dx, al
    0xb0, b'\n', 0xee, // mov al, '\n'; out dx, al
    0xe4, 0x64, // in al, 0x64 (status must read 0)
    0xe4, 0x80, // in al, 0x80 (unclaimed port: 0xff)
    0xb0, 0xfe, 0xe6, 0x64, // mov al, 0xfe; out 0x64, al
    0xf4, // hlt (not reached)
];
/// Real mode: spin forever.
const SPIN: &[u8] = &[0xeb, 0xfe];
/// Real mode: interrupts off, halt for good (stays inside KVM with the in-kernel LAPIC).
const HALT: &[u8] = &[0xfa, 0xf4, 0xeb, 0xfc];
/// 64-bit: print "L" on COM1, then reset.
const LONG_MODE_PRINT_AND_RESET: &[u8] = &[
    0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0xb0, b'L', 0xee, // mov al, 'L'; out dx, al
    0xb0, 0xfe, 0xe6, 0x64, // mov al, 0xfe; out 0x64, al
    0xf4,
];

fn kvm_or_skip() -> Option<KvmSystem> {
    match KvmSystem::open() {
        Ok(kvm) => Some(kvm),
        Err(err) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("KVM test needs /dev/kvm: {err}")
        }
        Err(err) => {
            eprintln!("skipping: KVM is not usable here ({err})");
            None
        }
    }
}

#[derive(Clone, Default)]
struct CapturedConsole(Arc<Mutex<Vec<u8>>>);

impl Write for CapturedConsole {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

struct TinyVm {
    lifecycle: Arc<VmLifecycle>,
    console: CapturedConsole,
    metrics: Arc<crate::metrics::VmMetrics>,
    // Dropped after the vCPU threads are joined.
    _vm: Vm,
}

/// A one-vCPU VM with COM1 and the i8042 on the port bus, running `code` from `CODE_ADDR`
/// (real mode) or, with `long_mode`, from the kernel entry path of `Vcpu::configure`.
fn start_tiny_vm(kvm: &KvmSystem, code: &[u8], long_mode: bool) -> TinyVm {
    install_kick_handler().unwrap();
    let memory = GuestMemory::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
    memory.write_slice(code, GuestAddress(CODE_ADDR)).unwrap();
    let mut vm = Vm::new(kvm).unwrap();
    vm.register_memory(&memory).unwrap();

    let lifecycle = Arc::new(VmLifecycle::new());
    let console = CapturedConsole::default();
    let mut pio = PioBus::new();
    let serial_irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    vm.register_irqfd(&serial_irq, 4).unwrap();
    let serial = SerialConsole::new(
        serial_irq,
        ConsoleWriter::spawn(Box::new(console.clone()), &crate::seccomp::Hardening::trap_for_test()).unwrap(),
    );
    pio.insert(COM1_PORT, COM1_PORT_COUNT, Arc::new(Mutex::new(serial))).unwrap();
    let resetter = lifecycle.clone();
    let reset = I8042ResetPort::new(move || resetter.finish(Ok(VmExit::Reset)));
    pio.insert(I8042_DATA_PORT, I8042_PORT_COUNT, Arc::new(Mutex::new(reset))).unwrap();

    let vcpu = vm.create_vcpu(0).unwrap();
    if long_mode {
        write_gdt_and_idt(&memory).unwrap();
        write_identity_page_tables(&memory).unwrap();
        let cpuid = kvm.supported_cpuid().unwrap();
        vcpu.configure(&vcpu_boot_state(kvm, &cpuid, 0, 1, Some(CODE_ADDR))).unwrap();
    } else {
        vcpu.set_real_mode_entry(CODE_ADDR).unwrap();
    }
    let metrics = Arc::new(crate::metrics::VmMetrics::default());
    let context = VcpuRunContext {
        pio: Arc::new(pio),
        mmio: Arc::new(MmioBus::new()),
        supervisor: lifecycle.clone(),
        metrics: metrics.clone(),
        hardening: crate::seccomp::Hardening::trap_for_test(),
    };
    lifecycle.adopt_vcpu_thread(vcpu.spawn(context).unwrap());
    TinyVm { lifecycle, console, metrics, _vm: vm }
}

fn console_text(vm: &TinyVm) -> String {
    String::from_utf8_lossy(&vm.console.0.lock().unwrap()).into_owned()
}

#[test]
fn real_mode_guest_prints_and_resets() {
    let Some(kvm) = kvm_or_skip() else { return };
    let vm = start_tiny_vm(&kvm, PRINT_AND_RESET, false);
    let outcome = vm.lifecycle.wait_timeout(Duration::from_secs(10)).expect("guest did not reset in time");
    assert!(matches!(outcome, Ok(VmExit::Reset)), "{outcome:?}");
    vm.lifecycle.join_vcpus();
    // The console thread delivers asynchronously.
    let deadline = Instant::now() + Duration::from_secs(2);
    while console_text(&vm) != "OK\n" && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(console_text(&vm), "OK\n");
    // Three characters and the reset command: at least four port writes reached the VMM.
    let exits = vm.metrics.snapshot().exits;
    let io_out = exits.iter().find(|(r, _)| *r == crate::metrics::ExitReason::IoOut).map_or(0, |(_, n)| *n);
    assert!(io_out >= 4, "{exits:?}");
}

#[test]
fn stop_kicks_a_spinning_vcpu() {
    let Some(kvm) = kvm_or_skip() else { return };
    let vm = start_tiny_vm(&kvm, SPIN, false);
    std::thread::sleep(Duration::from_millis(50));
    assert!(vm.lifecycle.wait_timeout(Duration::ZERO).is_none(), "spinning guest ended by itself");
    let started = Instant::now();
    vm.lifecycle.finish(Ok(VmExit::Stopped));
    vm.lifecycle.join_vcpus();
    assert!(started.elapsed() < Duration::from_secs(2), "stop took {:?}", started.elapsed());
    assert!(matches!(vm.lifecycle.wait(), Ok(VmExit::Stopped)));
}

#[test]
fn stop_kicks_a_halted_vcpu() {
    let Some(kvm) = kvm_or_skip() else { return };
    let vm = start_tiny_vm(&kvm, HALT, false);
    std::thread::sleep(Duration::from_millis(50));
    let started = Instant::now();
    vm.lifecycle.finish(Ok(VmExit::Stopped));
    vm.lifecycle.join_vcpus();
    assert!(started.elapsed() < Duration::from_secs(2), "stop took {:?}", started.elapsed());
    // Whether HLT stayed in KVM or came out as a shutdown, the VM is over.
    assert!(vm.lifecycle.wait().is_ok());
}

#[test]
fn long_mode_boot_state_runs_64_bit_code() {
    let Some(kvm) = kvm_or_skip() else { return };
    let vm = start_tiny_vm(&kvm, LONG_MODE_PRINT_AND_RESET, true);
    let outcome = vm.lifecycle.wait_timeout(Duration::from_secs(10)).expect("guest did not reset in time");
    vm.lifecycle.join_vcpus();
    assert!(matches!(outcome, Ok(VmExit::Reset)), "{outcome:?}");
    let deadline = Instant::now() + Duration::from_secs(2);
    while console_text(&vm) != "L" && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(console_text(&vm), "L");
}
