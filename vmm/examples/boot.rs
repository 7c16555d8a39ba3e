//! Boot a guest with tern's VMM and wait for it to end.
//!
//! `boot <kernel> <initrd|-> <vcpus> <memory-MiB> [--timeout SECS] [--console FILE|-]
//!       [--vsock UDS-PATH] [extra kernel args…]`
//!
//! The console goes to stdout unless `--console` names a file. Prints the boot timings and
//! how the VM ended; exits 0 when the guest reset or shut down, 1 on an error, 2 on timeout.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use vmm::{ConsoleOutput, VmConfig, VmExit, Vmm, VsockConfig};

fn usage() -> ExitCode {
    eprintln!(
        "usage: boot <kernel> <initrd|-> <vcpus> <memory-MiB> [--timeout SECS] [--console FILE|-] \
         [--vsock UDS-PATH] [kernel args…]"
    );
    ExitCode::from(1)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 4 {
        return usage();
    }
    let (Ok(vcpus), Ok(memory_mib)) = (args[2].parse::<u8>(), args[3].parse::<u32>()) else {
        return usage();
    };
    let mut timeout = Duration::from_secs(120);
    let mut console = ConsoleOutput::Stdout;
    let mut vsock = None;
    let mut extra = Vec::new();
    let mut rest = args[4..].iter();
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "--timeout" => match rest.next().and_then(|value| value.parse().ok()) {
                Some(secs) => timeout = Duration::from_secs(secs),
                None => return usage(),
            },
            "--console" => match rest.next().map(String::as_str) {
                Some("-") => console = ConsoleOutput::Stdout,
                Some(path) => console = ConsoleOutput::File(PathBuf::from(path)),
                None => return usage(),
            },
            "--vsock" => match rest.next() {
                Some(path) => vsock = Some(VsockConfig { guest_cid: 3, uds_path: PathBuf::from(path) }),
                None => return usage(),
            },
            other => extra.push(other.to_string()),
        }
    }
    let config = VmConfig {
        vcpus,
        memory_mib,
        kernel: PathBuf::from(&args[0]),
        initrd: (args[1] != "-").then(|| PathBuf::from(&args[1])),
        cmdline: extra.join(" "),
        console,
        vsock,
        fs_shares: Vec::new(),
        fs_device: false,
        watch_resync_interval: tern_change_records::DEFAULT_RESYNC_INTERVAL,
        net: Vec::new(),
        seccomp: vmm::api::SeccompMode::Trap,
    };

    let vm = match Vmm::start(config) {
        Ok(vm) => vm,
        Err(err) => {
            eprintln!("boot: cannot start the VM: {}", error_chain(&err));
            return ExitCode::from(1);
        }
    };
    let outcome = vm.wait_timeout(timeout);
    let code = match &outcome {
        None => {
            eprintln!("boot: timed out after {timeout:?}; stopping the VM");
            let stopping = std::time::Instant::now();
            vm.stop();
            eprintln!("boot: stop() took {:?}", stopping.elapsed());
            ExitCode::from(2)
        }
        Some(Ok(exit)) => {
            eprintln!("boot: VM ended: {exit:?}");
            if *exit == VmExit::Stopped {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            }
        }
        Some(Err(err)) => {
            eprintln!("boot: VM failed: {}", error_chain(err));
            ExitCode::from(1)
        }
    };
    let timings = vm.timings();
    if let Some(entry) = timings.vcpus_started {
        eprintln!("boot: VMM start -> kernel entry: {:?}", entry - timings.vmm_start);
        if let Some(exit) = timings.exit {
            eprintln!("boot: kernel entry -> exit: {:?}", exit - entry);
        }
    }
    code
}

/// The error and its sources, joined with ": " (the example has no dependency that does it).
fn error_chain(err: &dyn std::error::Error) -> String {
    std::iter::successors(Some(err), |e| e.source()).map(ToString::to_string).collect::<Vec<_>>().join(": ")
}
