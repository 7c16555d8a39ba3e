//! `tern check`: can this host run tern microVMs? One pass/fail line per requirement.

use anyhow::Result;
use clap::Args;
use std::path::Path;
use tern_runtime::config::Config;
use vmm::api::{probe_kvm, KvmKind};

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Only print failures.
    #[arg(short, long)]
    quiet: bool,
}

struct Report {
    quiet: bool,
    failures: usize,
}

impl Report {
    fn pass(&self, what: &str, detail: &str) {
        if !self.quiet {
            println!("PASS  {what}: {detail}");
        }
    }

    fn fail(&mut self, what: &str, detail: &str, fix: &str) {
        self.failures += 1;
        println!("FAIL  {what}: {detail}\n      -> {fix}");
    }
}

pub fn check(config: &Config, args: CheckArgs) -> Result<i32> {
    let mut r = Report { quiet: args.quiet, failures: 0 };
    match probe_kvm() {
        Err(e) => r.fail(
            "/dev/kvm",
            &tern_runtime::sandbox::error_chain(&e),
            "load kvm_intel or kvm_amd, enable virtualization in firmware, and run as a user with access to /dev/kvm",
        ),
        Ok(kvm) => {
            r.pass("/dev/kvm", "opened read-write");
            if kvm.api_version == 12 {
                r.pass("KVM API version", "12");
            } else {
                r.fail("KVM API version", &kvm.api_version.to_string(), "tern needs KVM API version 12");
            }
            if kvm.missing_capabilities.is_empty() {
                r.pass("KVM capabilities", "irqchip, PIT2, irqfd, ioeventfd, user memory, immediate exit");
            } else {
                r.fail(
                    "KVM capabilities",
                    &format!("missing {}", kvm.missing_capabilities.join(", ")),
                    "use a newer host kernel",
                );
            }
            match kvm.kind {
                KvmKind::Pvm => r.fail(
                    "KVM can boot Linux guests",
                    "this host's KVM is kvm_pvm, which cannot boot unmodified Linux guests",
                    "run tern inside the nested-virt runner: tests/nested-runner -- tern run -- CMD",
                ),
                KvmKind::Intel | KvmKind::Amd => {
                    r.pass("KVM can boot Linux guests", &format!("{:?} hardware virtualization", kvm.kind))
                }
                KvmKind::Unknown => r.pass(
                    "KVM can boot Linux guests",
                    "no kvm_intel/kvm_amd/kvm_pvm module found; assuming a built-in hardware KVM",
                ),
            }
        }
    }
    check_guest_file(&mut r, "guest kernel", &config.kernel_path(), GuestFile::Kernel);
    check_guest_file(&mut r, "initramfs", &config.initrd_path(), GuestFile::Initrd);
    if r.failures == 0 {
        if !r.quiet {
            println!("tern can run microVMs on this host");
        }
        Ok(0)
    } else {
        println!("{} check(s) failed", r.failures);
        Ok(1)
    }
}

enum GuestFile {
    Kernel,
    Initrd,
}

fn check_guest_file(r: &mut Report, what: &str, path: &Path, kind: GuestFile) {
    let fix = match kind {
        GuestFile::Kernel => "run `make kernel` (or set vm.kernel in the config / --kernel)",
        GuestFile::Initrd => "run `make initramfs` (or set vm.initrd in the config / --initrd)",
    };
    let head = match read_head(path) {
        Ok(h) => h,
        Err(e) => return r.fail(what, &format!("{}: {e}", path.display()), fix),
    };
    let ok = match kind {
        GuestFile::Kernel => head.starts_with(b"\x7fELF") || head.get(0x202..0x206) == Some(b"HdrS"),
        GuestFile::Initrd => head.starts_with(b"070701") || head.starts_with(&[0x1f, 0x8b]),
    };
    if ok {
        r.pass(what, &path.display().to_string());
    } else {
        let expected = match kind {
            GuestFile::Kernel => "an ELF vmlinux or a bzImage",
            GuestFile::Initrd => "a newc cpio archive (optionally gzip-compressed)",
        };
        r.fail(what, &format!("{} is not {expected}", path.display()), fix);
    }
}

fn read_head(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut head = Vec::with_capacity(1024);
    std::fs::File::open(path)?.take(1024).read_to_end(&mut head)?;
    Ok(head)
}
