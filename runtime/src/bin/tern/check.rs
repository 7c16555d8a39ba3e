//! `tern check`: can this host run tern microVMs? One pass/fail line per requirement.

use anyhow::Result;
use clap::Args;
use std::path::Path;
use tern_runtime::config::Config;
use vmm::api::SeccompMode;
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
    check_pod_networking(&mut r);
    check_container_seccomp(&mut r);
    check_vmm_seccomp(&mut r, config.vmm.seccomp);
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

/// Containers' seccomp profiles: the shim checks them at Create with the libseccomp linked into
/// tern (a small allowlist must compile); the agent loads them in the guest, whose kernel tern
/// builds with CONFIG_SECCOMP_FILTER.
fn check_container_seccomp(r: &mut Report) {
    let probe = serde_json::json!({
        "defaultAction": "SCMP_ACT_ERRNO",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [{"names": ["read", "write", "exit_group"], "action": "SCMP_ACT_ALLOW"}]
    });
    let version = tern_seccomp::libseccomp_version().unwrap_or_else(|| "unknown".to_owned());
    match tern_seccomp::check_profile(&probe) {
        Ok(()) => r.pass(
            "container seccomp",
            &format!("profiles enforced in the guest; checked at Create with libseccomp {version}"),
        ),
        Err(e) => r.fail(
            "container seccomp",
            &format!("libseccomp {version} cannot build a filter: {e}"),
            "rebuild tern with Debian's libseccomp-dev installed (make deps)",
        ),
    }
}

/// The VMM threads' own filters: whether this kernel installs them (a throwaway thread
/// installs one and checks that it denies), and the configured mode.
fn check_vmm_seccomp(r: &mut Report, mode: SeccompMode) {
    if mode == SeccompMode::Off {
        return r.pass(
            "VMM seccomp",
            "off ([vmm] seccomp = \"off\"): VMM threads run unfiltered, with root's capabilities",
        );
    }
    match vmm::api::probe_seccomp() {
        Ok(()) => r.pass(
            "VMM seccomp",
            &format!("{mode}: every VMM thread runs under its role's filter, with capabilities dropped"),
        ),
        Err(e) => r.fail(
            "VMM seccomp",
            &format!("{mode} is configured but this kernel cannot install the filters: {e}"),
            "use a kernel with CONFIG_SECCOMP_FILTER, or set [vmm] seccomp = \"off\" (no VMM confinement)",
        ),
    }
}

fn read_head(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut head = Vec::with_capacity(1024);
    std::fs::File::open(path)?.take(1024).read_to_end(&mut head)?;
    Ok(head)
}

/// The host pieces a networked sandbox needs (`--netns`, every CRI pod): the tun device and
/// the tc qdisc, classifier and action that mirror a pod interface to its tap.
fn check_pod_networking(r: &mut Report) {
    match std::fs::metadata("/dev/net/tun") {
        Ok(m) if std::os::unix::fs::FileTypeExt::is_char_device(&m.file_type()) => {
            r.pass("/dev/net/tun", "taps for pod networks can be created")
        }
        Ok(_) => {
            r.fail("/dev/net/tun", "exists but is not a character device", "recreate it: mknod /dev/net/tun c 10 200")
        }
        Err(e) => r.fail(
            "/dev/net/tun",
            &e.to_string(),
            "load the tun module (modprobe tun) or create the node: mkdir -p /dev/net && mknod /dev/net/tun c 10 200",
        ),
    }
    let kernel_config = kernel_config_text();
    for (module, symbol, what) in [
        ("sch_ingress", "CONFIG_NET_SCH_INGRESS", "tc ingress qdisc"),
        ("cls_u32", "CONFIG_NET_CLS_U32", "tc u32 classifier"),
        ("act_mirred", "CONFIG_NET_ACT_MIRRED", "tc mirred action"),
    ] {
        let name = format!("{what} ({module})");
        match module_state(module, symbol, kernel_config.as_deref()) {
            Some(state) => r.pass(&name, state),
            None => r.fail(
                &name,
                "neither loaded, built in, nor available as a module",
                &format!("modprobe {module}, or use a kernel with {symbol}=y or =m"),
            ),
        }
    }
}

/// How a kernel module is present, if it is: loaded, built in, or loadable on demand.
fn module_state(module: &str, symbol: &str, kernel_config: Option<&str>) -> Option<&'static str> {
    if Path::new("/sys/module").join(module).exists() {
        return Some("loaded");
    }
    let release = kernel_release()?;
    let modules = Path::new("/lib/modules").join(&release);
    let listed = |file: &str| {
        std::fs::read_to_string(modules.join(file)).is_ok_and(|text| {
            text.lines().any(|l| l.rsplit('/').next().is_some_and(|f| f.starts_with(&format!("{module}.ko"))))
        })
    };
    if listed("modules.builtin") {
        return Some("built into the kernel");
    }
    if listed("modules.dep") {
        return Some("available as a module (loaded on first use)");
    }
    let config = kernel_config?;
    if config.lines().any(|l| l == format!("{symbol}=y")) {
        Some("built into the kernel")
    } else if config.lines().any(|l| l == format!("{symbol}=m")) {
        Some("available as a module (loaded on first use)")
    } else {
        None
    }
}

/// The running kernel's configuration, from `/proc/config.gz` (through `zcat`) or `/boot`.
fn kernel_config_text() -> Option<String> {
    if let Ok(out) = std::process::Command::new("zcat").arg("/proc/config.gz").output() {
        if out.status.success() {
            return String::from_utf8(out.stdout).ok();
        }
    }
    std::fs::read_to_string(format!("/boot/config-{}", kernel_release()?)).ok()
}

fn kernel_release() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").ok().map(|r| r.trim().to_owned())
}
