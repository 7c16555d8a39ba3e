//! `tern boot` (hidden): boot the VMM alone — a kernel, an initramfs whose /init is anything
//! (no tern-agent), shares on the built-in virtio-fs device — with the serial console on
//! stdout, and wait until the guest reboots or powers off. The benchmark uses it to run the
//! very same busybox-script initramfs under tern and under QEMU. With `--netns` the guest also
//! gets the namespace's interfaces as virtio-net devices (their MAC and MTU; with no agent,
//! configuring addresses is left to the guest's /init).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use tern_runtime::config::Config;
use tern_runtime::network::SandboxNetwork;
use vmm::api::{CachePolicy, ConsoleOutput, ShareConfig, VmConfig, VmExit, Vmm};

#[derive(Debug, Args)]
pub struct BootArgs {
    /// Guest kernel (default from config: tern-vmlinux next to this binary).
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Initramfs; its /init runs as PID 1 and should end with `reboot -f`.
    #[arg(long, value_name = "PATH")]
    initrd: PathBuf,
    /// Share HOST_DIR as NAME on the virtio-fs device (tag `tern`; the guest finds it at
    /// `<mountpoint>/NAME`). Repeatable.
    #[arg(long = "share", value_name = "HOST_DIR:NAME")]
    shares: Vec<String>,
    /// Number of vCPUs (default from config).
    #[arg(long, value_name = "N")]
    vcpus: Option<u8>,
    /// Guest memory in MiB (default from config).
    #[arg(long, value_name = "MiB")]
    memory: Option<u32>,
    /// Extra kernel command line (after tern's defaults).
    #[arg(long, value_name = "ARGS", default_value = "")]
    cmdline: String,
    /// Where the serial console goes.
    #[arg(long, value_enum, default_value_t = ConsoleArg::Stdout)]
    console: ConsoleArg,
    /// Connect the VM to the network namespace at PATH (e.g. /run/netns/NAME): one virtio-net
    /// device per addressed interface, as for a pod. The guest's /init configures it.
    #[arg(long, value_name = "PATH")]
    netns: Option<PathBuf>,
    /// Give up (and stop the VM) after this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 3600)]
    timeout: u64,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ConsoleArg {
    Stdout,
    Stderr,
    None,
}

fn parse_share(arg: &str, cache: CachePolicy) -> Result<ShareConfig> {
    let Some((host, name)) = arg.rsplit_once(':') else {
        bail!("--share {arg:?} is not HOST_DIR:NAME");
    };
    Ok(ShareConfig { name: name.to_string(), host_dir: PathBuf::from(host), read_only: false, cache, watch: false })
}

pub fn boot(config: Config, args: BootArgs) -> Result<i32> {
    let cache = config.fs.cache;
    let fs_shares = args.shares.iter().map(|s| parse_share(s, cache)).collect::<Result<Vec<_>>>()?;
    let kernel = args.kernel.clone().unwrap_or_else(|| config.kernel_path());
    // Declared before the VM handle, so it drops after it: its Drop removes the tc state, and
    // the taps go once the VM's fds are closed.
    // (The error names the path.)
    let network = args.netns.as_deref().map(SandboxNetwork::connect).transpose()?;
    let vm = VmConfig {
        vcpus: args.vcpus.unwrap_or(config.vm.vcpus),
        memory_mib: args.memory.unwrap_or(config.vm.memory_mib),
        kernel,
        initrd: Some(args.initrd.clone()),
        cmdline: args.cmdline.clone(),
        console: match args.console {
            ConsoleArg::Stdout => ConsoleOutput::Stdout,
            ConsoleArg::Stderr => ConsoleOutput::Stderr,
            ConsoleArg::None => ConsoleOutput::Discard,
        },
        vsock: None,
        fs_device: !fs_shares.is_empty(),
        watch_resync_interval: tern_protocol::watch::DEFAULT_RESYNC_INTERVAL,
        fs_shares,
        net: network.as_ref().map(SandboxNetwork::vm_devices).unwrap_or_default(),
        seccomp: config.vmm.seccomp,
    };
    let handle = Vmm::start(vm).context("cannot start the VM")?;
    match handle.wait_timeout(Duration::from_secs(args.timeout)) {
        Some(Ok(VmExit::Reset | VmExit::Shutdown)) => Ok(0),
        Some(Ok(VmExit::Stopped)) => bail!("the VM was stopped"),
        Some(Err(e)) => Err(e).context("the VM failed"),
        None => {
            handle.stop();
            bail!("the guest did not reboot within {} s", args.timeout)
        }
    }
}
