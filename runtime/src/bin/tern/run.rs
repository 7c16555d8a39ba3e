//! `tern run`: boot, run one command with its stdio attached, shut down.

use anyhow::{Context, Result};
use clap::Args;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tern_protocol::{ExecRequest, StreamKind};
use tern_runtime::config::Config;
use tern_runtime::network::SandboxNetwork;
use tern_runtime::sandbox::{Sandbox, SandboxDir};
use tern_runtime::share::{parse_share_arg, plan_shares, PlannedShare};

/// Exit code for failures of tern itself (not of the command).
pub const TERN_FAILURE_EXIT: i32 = 125;
/// How long the guest gets to power off after the command ended.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Process id of the command inside the sandbox.
const MAIN_PROCESS: &str = "main";

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Number of vCPUs (default from config: 1).
    #[arg(long, value_name = "N")]
    vcpus: Option<u8>,
    /// Guest memory in MiB (default from config: 256).
    #[arg(long, value_name = "MiB")]
    memory: Option<u32>,
    /// Guest kernel, ELF vmlinux or bzImage (default: tern-vmlinux next to this binary).
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Initramfs with tern-agent as /init (default: tern-initramfs.cpio next to this binary).
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Write the guest serial console to this file ("stderr" for the terminal).
    #[arg(long, value_name = "PATH")]
    console_log: Option<String>,
    /// Environment variable for the command, KEY=VALUE (repeatable).
    #[arg(short, long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Working directory of the command inside the guest.
    #[arg(short = 'w', long, value_name = "DIR")]
    workdir: Option<String>,
    /// Share host directory HOST at GUEST in the guest (repeatable): HOST:GUEST[:ro|:rw][:watch].
    /// Read-write unless `:ro`. `:watch` (implied for kubelet secret, configMap, projected and
    /// downward-API volumes) makes GUEST a mirror that follows host changes with inotify events.
    #[arg(long = "share", value_name = "HOST:GUEST[:OPTS]")]
    shares: Vec<String>,
    /// Connect the VM to the network namespace at PATH (e.g. /var/run/netns/NAME), as the shim
    /// does for a pod: every interface there that has an address gets a tap mirrored to it with
    /// tc, the guest NIC takes the interface's name, MAC, MTU, addresses and routes. Without
    /// it the guest has `lo` only.
    #[arg(long, value_name = "PATH")]
    netns: Option<PathBuf>,
    /// Print boot timings to stderr: VMM start -> kernel entry -> agent ready -> command exit.
    #[arg(long)]
    timings: bool,
    /// The command and its arguments.
    #[arg(required = true, last = true, value_name = "CMD")]
    command: Vec<String>,
}

pub fn run(mut config: Config, args: RunArgs) -> Result<i32> {
    apply_flags(&mut config, &args);
    config.validate()?;
    let specs = args.shares.iter().map(|arg| parse_share_arg(arg)).collect::<Result<Vec<_>, _>>()?;
    let shares = plan_shares(&specs, &config.fs)?;
    let vm_shares = shares.iter().map(|s| s.config.clone()).collect();
    let network = args.netns.as_deref().map(SandboxNetwork::connect).transpose()?;
    let run_dir = SandboxDir::private().context("cannot create the run directory")?;
    let sandbox = Sandbox::boot_in(&config, vm_shares, false, run_dir, network).map_err(|e| {
        let err = anyhow::Error::new(e).context("cannot boot the microVM");
        match vmm::api::probe_kvm() {
            Ok(p) if p.kind == vmm::api::KvmKind::Pvm => err.context(
                "this host's KVM is kvm_pvm, which cannot boot Linux guests; run tern inside \
                 tests/nested-runner (see `tern check`)",
            ),
            _ => err,
        }
    })?;
    let result = mount_shares(&sandbox, &shares).and_then(|()| run_command(&sandbox, &args));
    let command_exit = Instant::now();
    // Shut down whatever happened to the command: no VM outlives `tern run`.
    if let Err(e) = sandbox_shutdown(sandbox, &args, command_exit) {
        tracing::warn!("VM shutdown: {e:#}");
    }
    result
}

fn apply_flags(config: &mut Config, args: &RunArgs) {
    if let Some(v) = args.vcpus {
        config.vm.vcpus = v;
    }
    if let Some(m) = args.memory {
        config.vm.memory_mib = m;
    }
    if let Some(k) = &args.kernel {
        config.vm.kernel = Some(k.clone());
    }
    if let Some(i) = &args.initrd {
        config.vm.initrd = Some(i.clone());
    }
    if let Some(c) = &args.console_log {
        config.vm.console_log = c.clone();
    }
}

/// Ask the agent to present every share before the command starts.
fn mount_shares(sandbox: &Sandbox, shares: &[PlannedShare]) -> Result<()> {
    for share in shares {
        sandbox.agent().mount(share.mount.clone()).with_context(|| {
            format!("cannot mount {} at {} in the guest", share.config.host_dir.display(), share.mount.guest_path)
        })?;
    }
    Ok(())
}

fn run_command(sandbox: &Sandbox, args: &RunArgs) -> Result<i32> {
    let agent = sandbox.agent();
    let mut env = vec![
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
        "HOME=/root".to_string(),
    ];
    env.extend(args.env.iter().cloned());
    agent
        .exec(ExecRequest {
            id: MAIN_PROCESS.into(),
            argv: args.command.clone(),
            env,
            cwd: args.workdir.clone(),
            stdin: true,
        })
        .with_context(|| format!("cannot start {:?} in the guest", args.command[0]))?;
    let stdout = agent.attach(MAIN_PROCESS, StreamKind::Stdout)?;
    let stderr = agent.attach(MAIN_PROCESS, StreamKind::Stderr)?;
    let stdin = agent.attach(MAIN_PROCESS, StreamKind::Stdin)?;
    let out_pump = pump_out(stdout, std::io::stdout());
    let err_pump = pump_out(stderr, std::io::stderr());
    // The stdin pump is not joined: a terminal may never reach EOF. It dies with the process.
    pump_stdin(stdin);
    let status = agent.wait(MAIN_PROCESS).context("lost the agent while waiting for the command")?;
    for pump in [out_pump, err_pump] {
        match pump.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("output stream: {e}"),
            Err(_) => tracing::warn!("output stream thread panicked"),
        }
    }
    Ok(status.shell_code())
}

/// Copy a guest output stream to a host writer until the guest closes it.
fn pump_out<W: Write + Send + 'static>(mut from: UnixStream, mut to: W) -> JoinHandle<std::io::Result<()>> {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            to.write_all(&buf[..n])?;
            to.flush()?;
        }
        Ok(())
    })
}

/// Copy host stdin to the guest, then half-close so the process reads EOF.
fn pump_stdin(mut to: UnixStream) {
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        if let Err(e) = std::io::copy(&mut stdin, &mut to) {
            tracing::debug!("stdin stream: {e}");
        }
        let _ = to.shutdown(std::net::Shutdown::Write);
    });
}

fn sandbox_shutdown(sandbox: Sandbox, args: &RunArgs, command_exit: Instant) -> Result<()> {
    let t = sandbox.timeline();
    let exit = sandbox.shutdown(SHUTDOWN_GRACE)?;
    tracing::debug!(?exit, "VM ended");
    if args.timings {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let entry = t.kernel_entry.map(|k| ms(k.duration_since(t.vmm_start)));
        eprintln!(
            "tern timings: vmm_start=0ms kernel_entry={} agent_ready={:.1}ms command_exit={:.1}ms vm_down={:.1}ms",
            entry.map_or("n/a".to_string(), |v| format!("{v:.1}ms")),
            ms(t.agent_ready.duration_since(t.vmm_start)),
            ms(command_exit.duration_since(t.vmm_start)),
            ms(t.vmm_start.elapsed()),
        );
    }
    Ok(())
}
