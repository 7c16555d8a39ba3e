//! The public API against the real `/dev/kvm`, with hand-made ELF "kernels" of a few
//! instructions that run from the 64-bit entry state `Vmm::start` sets up: boot, every way
//! a VM ends, configuration errors, and no threads, fds or sockets left behind. Linux
//! guests are tested in the top-level `tests/` crate (they need the nested runner here).
//! Without KVM this says so and passes, except under `CI=true`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmm::api::{CachePolicy, ShareConfig, ShareError};
use vmm::{ConsoleOutput, VmConfig, VmExit, Vmm, VmmError, VsockConfig};

const ENTRY: u64 = 0x10_0000;

/// Print "L" on COM1, then pulse the i8042 reset line.
const PRINT_AND_RESET: &[u8] = &[
    0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0xb0, b'L', 0xee, // mov al, 'L'; out dx, al
    0xb0, 0xfe, 0xe6, 0x64, // mov al, 0xfe; out 0x64, al
    0xf4, // hlt
];
/// Spin forever.
const SPIN: &[u8] = &[0xeb, 0xfe];
/// An invalid opcode with a one-entry IDT: #UD, #GP, #DF all miss the IDT: triple fault.
const TRIPLE_FAULT: &[u8] = &[0x0f, 0x0b];

fn kvm_usable() -> bool {
    match std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(_) => true,
        Err(err) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("KVM test needs /dev/kvm: {err}")
        }
        Err(err) => {
            eprintln!("skipping: /dev/kvm is not usable here ({err})");
            false
        }
    }
}

/// A minimal ELF64 executable: one PT_LOAD segment holding `code` at physical `ENTRY`.
fn elf_kernel(dir: &Path, name: &str, code: &[u8]) -> PathBuf {
    const EHDR_LEN: u64 = 64;
    const PHDR_LEN: u64 = 56;
    let code_offset = EHDR_LEN + PHDR_LEN;
    let mut image = Vec::new();
    image.extend_from_slice(b"\x7fELF\x02\x01\x01\x00");
    image.extend_from_slice(&[0; 8]);
    image.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    image.extend_from_slice(&0x3eu16.to_le_bytes()); // EM_X86_64
    image.extend_from_slice(&1u32.to_le_bytes());
    image.extend_from_slice(&ENTRY.to_le_bytes()); // e_entry
    image.extend_from_slice(&EHDR_LEN.to_le_bytes()); // e_phoff
    image.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    image.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    image.extend_from_slice(&(EHDR_LEN as u16).to_le_bytes());
    image.extend_from_slice(&(PHDR_LEN as u16).to_le_bytes());
    image.extend_from_slice(&1u16.to_le_bytes()); // e_phnum
    image.extend_from_slice(&[0; 6]); // e_shentsize, e_shnum, e_shstrndx
    image.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    image.extend_from_slice(&5u32.to_le_bytes()); // R+X
    image.extend_from_slice(&code_offset.to_le_bytes());
    image.extend_from_slice(&ENTRY.to_le_bytes()); // p_vaddr
    image.extend_from_slice(&ENTRY.to_le_bytes()); // p_paddr
    image.extend_from_slice(&(code.len() as u64).to_le_bytes());
    image.extend_from_slice(&(code.len() as u64).to_le_bytes());
    image.extend_from_slice(&0x1000u64.to_le_bytes());
    image.extend_from_slice(code);
    let path = dir.join(name);
    std::fs::write(&path, image).unwrap();
    path
}

fn config(kernel: PathBuf, vcpus: u8) -> VmConfig {
    VmConfig {
        vcpus,
        memory_mib: 64,
        kernel,
        initrd: None,
        cmdline: String::new(),
        console: ConsoleOutput::Discard,
        vsock: None,
        fs_shares: Vec::new(),
        fs_device: false,
        watch_resync_interval: tern_change_records::DEFAULT_RESYNC_INTERVAL,
        net: Vec::new(),
        seccomp: vmm::api::SeccompMode::Trap,
    }
}

fn share(name: &str, host_dir: &Path) -> ShareConfig {
    ShareConfig {
        name: name.into(),
        host_dir: host_dir.to_path_buf(),
        read_only: false,
        cache: CachePolicy::Auto,
        watch: false,
    }
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

fn boots_prints_and_resets(dir: &Path) {
    let console = dir.join("console.log");
    let uds = dir.join("vsock.sock");
    let initrd = dir.join("initrd");
    let _ = std::fs::remove_file(&console); // the console file is appended to
    std::fs::File::create(&initrd).unwrap().write_all(b"070701 not really a cpio").unwrap();
    let vm = Vmm::start(VmConfig {
        initrd: Some(initrd),
        console: ConsoleOutput::File(console.clone()),
        vsock: Some(VsockConfig { guest_cid: 3, uds_path: uds.clone() }),
        cmdline: "tern.test=1".into(),
        fs_shares: vec![share("boot", dir)],
        ..config(elf_kernel(dir, "reset.elf", PRINT_AND_RESET), 2)
    })
    .unwrap();
    // Shares change while the VM exists (until wait() tears it down), typed errors otherwise.
    vm.add_fs_share(share("late", dir)).unwrap();
    assert!(matches!(vm.add_fs_share(share("late", dir)), Err(VmmError::FsShare(ShareError::Duplicate(_)))));
    assert!(matches!(vm.add_fs_share(share("a/b", dir)), Err(VmmError::FsShare(ShareError::InvalidName(_)))));
    assert!(matches!(vm.remove_fs_share("nope"), Err(VmmError::FsShare(ShareError::Unknown(_)))));
    vm.remove_fs_share("late").unwrap();
    assert_eq!(vm.fs_shares_list().unwrap().len(), 1);
    let exit = vm.wait_timeout(Duration::from_secs(10)).expect("guest did not reset in time").unwrap();
    assert_eq!(exit, VmExit::Reset);
    let timings = vm.timings();
    let entered = timings.vcpus_started.expect("vCPU 0 never entered the guest");
    assert!(timings.vmm_start <= entered && Some(entered) <= timings.exit);
    drop(vm);
    assert_eq!(std::fs::read_to_string(&console).unwrap(), "L");
    assert!(!uds.exists(), "vsock socket left behind");
}

fn stop_ends_a_running_guest(dir: &Path) {
    let vm = Vmm::start(config(elf_kernel(dir, "spin.elf", SPIN), 2)).unwrap();
    assert!(vm.wait_timeout(Duration::from_millis(200)).is_none(), "spinning guest ended by itself");
    let started = Instant::now();
    vm.stop();
    assert!(started.elapsed() < Duration::from_secs(2), "stop took {:?}", started.elapsed());
    assert_eq!(vm.wait().unwrap(), VmExit::Stopped);
    vm.stop(); // idempotent
    assert_eq!(vm.wait().unwrap(), VmExit::Stopped);
}

fn drop_stops_a_running_guest(dir: &Path) {
    let vm = Vmm::start(config(elf_kernel(dir, "spin2.elf", SPIN), 1)).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    drop(vm);
}

fn triple_fault_is_a_shutdown(dir: &Path) {
    let vm = Vmm::start(config(elf_kernel(dir, "fault.elf", TRIPLE_FAULT), 1)).unwrap();
    match vm.wait_timeout(Duration::from_secs(10)).expect("guest did not fault in time") {
        Ok(exit) => assert_eq!(exit, VmExit::Shutdown),
        // kvm_pvm emulates real-mode/long-mode transitions; report, don't hide, any difference.
        Err(err) => panic!("triple fault gave an error: {err:?}"),
    }
}

fn bad_configurations_are_errors(dir: &Path) {
    let kernel = elf_kernel(dir, "ok.elf", PRINT_AND_RESET);
    let err = |config: VmConfig| Vmm::start(config).err().expect("bad configuration started");

    assert!(matches!(err(config(kernel.clone(), 0)), VmmError::InvalidConfig(_)));
    assert!(matches!(err(config(kernel.clone(), 200)), VmmError::InvalidConfig(_)));
    assert!(matches!(err(VmConfig { memory_mib: 16, ..config(kernel.clone(), 1) }), VmmError::Memory(_)));
    assert!(matches!(err(config(dir.join("missing"), 1)), VmmError::Boot(_)));
    let garbage = dir.join("garbage");
    std::fs::write(&garbage, vec![0x90u8; 8192]).unwrap();
    assert!(matches!(err(config(garbage, 1)), VmmError::Boot(_)));
    let huge_initrd = dir.join("huge-initrd");
    std::fs::File::create(&huge_initrd).unwrap().set_len(80 << 20).unwrap();
    let error = err(VmConfig { initrd: Some(huge_initrd), ..config(kernel.clone(), 1) });
    assert!(matches!(error, VmmError::Boot(_)), "{error:?}");
    let cid = VsockConfig { guest_cid: 2, uds_path: dir.join("x.sock") };
    assert!(matches!(err(VmConfig { vsock: Some(cid), ..config(kernel.clone(), 1) }), VmmError::InvalidConfig(_)));
    assert!(matches!(
        err(VmConfig { fs_shares: vec![share("s0", &dir.join("missing-dir"))], ..config(kernel.clone(), 1) }),
        VmmError::FsShare(ShareError::HostDirMissing { .. })
    ));
    let no_fs = Vmm::start(config(kernel.clone(), 1)).unwrap();
    assert!(matches!(no_fs.add_fs_share(share("s0", dir)), Err(VmmError::FsShare(ShareError::NoDevice))));
    no_fs.stop();
    assert!(matches!(no_fs.add_fs_share(share("s0", dir)), Err(VmmError::NotRunning)));
    let bad_cmdline = VmConfig { cmdline: "a\nb".into(), ..config(kernel, 1) };
    assert!(matches!(err(bad_cmdline), VmmError::Cmdline(_)));
}

/// One test so the thread and fd counts are not disturbed by tests running alongside.
#[test]
fn tiny_guests_through_the_public_api() {
    if !kvm_usable() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // A first VM warms up process-wide state (the kick signal handler).
    boots_prints_and_resets(dir.path());
    let (fds, thread_count) = (open_fds(), threads());

    boots_prints_and_resets(dir.path());
    stop_ends_a_running_guest(dir.path());
    drop_stops_a_running_guest(dir.path());
    triple_fault_is_a_shutdown(dir.path());
    bad_configurations_are_errors(dir.path());

    assert_eq!(open_fds(), fds, "file descriptors leaked");
    assert_eq!(threads(), thread_count, "threads leaked");
}
