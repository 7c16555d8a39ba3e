//! `tern run`: boot, run one command with its stdio attached, shut down.
//!
//! SIGINT, SIGTERM, SIGHUP and SIGQUIT go to the command, as with `docker run` (see
//! [`crate::signals`]); a second SIGINT, or a command still running `--stop-timeout` seconds
//! after the first signal, ends the VM at once. Every way out stops the VM and removes the run
//! directory; a run directory left by a `tern` that was SIGKILLed is reaped by the next
//! `tern run` (see `tern_runtime::run_dir`). With `-t` the command runs on a pty in the guest
//! and the host terminal is raw meanwhile (see [`crate::terminal`]).

use crate::signals::{exit_code_of, RunEvent, Signals};
use crate::terminal::{RawMode, WindowSizeRelay};
use anyhow::{Context, Result};
use clap::Args;
use nix::sys::signal::Signal;
use std::io::{IsTerminal, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::mpsc::RecvTimeoutError;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tern_protocol::{ExecRequest, StreamKind};
use tern_runtime::agent::AgentClient;
use tern_runtime::config::Config;
use tern_runtime::network::SandboxNetwork;
use tern_runtime::sandbox::{Sandbox, SandboxDir, SandboxError};
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
    /// Seconds the command gets to exit after tern passed it a signal (SIGINT, SIGTERM,
    /// SIGHUP or SIGQUIT, forwarded as `docker run` does). Past them, or at a second SIGINT,
    /// tern stops the VM and exits with 128 + the number of the first signal (130 for SIGINT,
    /// 143 for SIGTERM). A command that exits in time gives its own status, as always.
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    stop_timeout: u64,
    /// Keep stdin attached, as `docker run -i` does. tern run always passes stdin on (its end
    /// is the command's EOF), so this is the default; with -t it also asks that stdin be a
    /// terminal.
    #[arg(short = 'i', long)]
    interactive: bool,
    /// Run the command on a pseudo-terminal in the guest, as `docker run -t` does: its
    /// stdout and stderr become one stream (tern's stdout). When stdin is a terminal, it is in
    /// raw mode while the command runs, so keys such as ^C and ^D act in the guest as on a
    /// local terminal, and the guest terminal follows its window size. `-it` refuses a stdin
    /// that is no terminal, as docker does; `-t` alone passes such input on through the pty.
    #[arg(short = 't', long)]
    tty: bool,
    /// The command and its arguments.
    #[arg(required = true, last = true, value_name = "CMD")]
    command: Vec<String>,
}

pub fn run(mut config: Config, args: RunArgs) -> Result<i32> {
    if args.tty && args.interactive && !std::io::stdin().is_terminal() {
        // docker's words, before anything is booted.
        anyhow::bail!("the input device is not a TTY (-it needs a terminal on stdin; -t alone takes piped input)");
    }
    // First, while this is the only thread (see `signals`).
    let signals = Signals::catch().context("cannot take over SIGINT, SIGTERM, SIGHUP and SIGQUIT")?;
    apply_flags(&mut config, &args);
    config.validate()?;
    let specs = args.shares.iter().map(|arg| parse_share_arg(arg)).collect::<Result<Vec<_>, _>>()?;
    let shares = plan_shares(&specs, &config.fs)?;
    let vm_shares = shares.iter().map(|s| s.config.clone()).collect();
    // Run directories of `tern run`s and shims that were SIGKILLed (logged one by one). Before
    // connecting: reaping a dead run that used the same namespace disconnects it.
    tern_runtime::run_dir::reap_stale();
    let network = args.netns.as_deref().map(SandboxNetwork::connect).transpose()?;
    let run_dir = SandboxDir::private().context("cannot create the run directory")?;
    let interrupted = || signals.first().map(|signal| format!("{signal} received"));
    let sandbox = match Sandbox::boot_cancellable(&config, vm_shares, false, run_dir, network, &interrupted) {
        Ok(sandbox) => sandbox,
        Err(SandboxError::Cancelled(reason)) => {
            tracing::debug!(%reason, "boot interrupted");
            return Ok(signals.first().map_or(TERN_FAILURE_EXIT, exit_code_of));
        }
        Err(e) => return Err(boot_error(e)),
    };
    let result = mount_shares(&sandbox, &shares).and_then(|()| match signals.first() {
        // A signal before the command started: it never starts.
        Some(signal) => Ok(Ending::Forced { code: exit_code_of(signal), pumps: Vec::new() }),
        None => run_command(&sandbox, &args, &signals),
    });
    let command_exit = Instant::now();
    if !matches!(result, Ok(Ending::Forced { .. })) {
        write_watch_stages(&sandbox);
    }
    match result {
        Ok(Ending::Exited(code)) => {
            shutdown_after_command(sandbox, &args, command_exit);
            Ok(code)
        }
        Ok(Ending::Forced { code, pumps }) => {
            // At once, without the agent: stop the VM; its run directory goes with it. The
            // output streams end with the VM, so their last bytes are written before we exit.
            drop(sandbox);
            join_pumps(pumps);
            Ok(code)
        }
        Err(e) => {
            shutdown_after_command(sandbox, &args, command_exit);
            Err(e)
        }
    }
}

fn boot_error(e: SandboxError) -> anyhow::Error {
    let err = anyhow::Error::new(e).context("cannot boot the microVM");
    match vmm::api::probe_kvm() {
        Ok(p) if p.kind == vmm::api::KvmKind::Pvm => err.context(
            "this host's KVM is kvm_pvm, which cannot boot Linux guests; run tern inside \
             tests/nested-runner (see `tern check`)",
        ),
        _ => err,
    }
}

/// Environment variable of the benchmark hook [`write_watch_stages`].
const WATCH_STAGES_ENV: &str = "TERN_WATCH_STAGES_OUT";
/// Small agent requests timed by [`write_watch_stages`].
const AGENT_ROUND_TRIPS: usize = 200;

/// Benchmark hook: with `$TERN_WATCH_STAGES_OUT` set, once the command has ended, time
/// [`AGENT_ROUND_TRIPS`] health requests to the agent (a small agent RPC over vsock, on a fresh
/// connection each, as the shim makes them) and write them with the agent's watch statistics
/// (per-stage histograms) and the last applied batches' stage stamps to that file as JSON.
fn write_watch_stages(sandbox: &Sandbox) {
    let Some(path) = std::env::var_os(WATCH_STAGES_ENV) else {
        return;
    };
    let agent = sandbox.agent();
    let mut round_trips_ns = Vec::with_capacity(AGENT_ROUND_TRIPS);
    for _ in 0..AGENT_ROUND_TRIPS {
        let start = Instant::now();
        if let Err(e) = agent.health() {
            tracing::warn!("agent round trip: {e:#}");
            break;
        }
        round_trips_ns.push(u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX));
    }
    let stages = agent.watch_stages().unwrap_or_else(|e| {
        tracing::warn!("watch stages: {e:#}");
        Vec::new()
    });
    let watch = agent.stats_within(Duration::from_secs(10)).map(|s| s.watch).unwrap_or_else(|e| {
        tracing::warn!("guest statistics: {e:#}");
        Default::default()
    });
    let out = serde_json::json!({ "agent_round_trips_ns": round_trips_ns, "batches": stages, "watch": watch });
    if let Err(e) = std::fs::write(&path, out.to_string()) {
        tracing::warn!("cannot write {}: {e}", PathBuf::from(path).display());
    }
}

/// Shut down whatever happened to the command: no VM outlives `tern run`.
fn shutdown_after_command(sandbox: Sandbox, args: &RunArgs, command_exit: Instant) {
    if let Err(e) = sandbox_shutdown(sandbox, args, command_exit) {
        tracing::warn!("VM shutdown: {e:#}");
    }
}

/// How the command's run ended.
enum Ending {
    /// The command exited with this shell-style code; its output streams are drained.
    Exited(i32),
    /// tern gives up on the command (a second SIGINT, or the stop timeout passed): the VM is
    /// to be stopped at once, then the output pumps joined.
    Forced { code: i32, pumps: Vec<JoinHandle<std::io::Result<()>>> },
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

fn run_command(sandbox: &Sandbox, args: &RunArgs, signals: &Signals) -> Result<Ending> {
    let agent = sandbox.agent();
    let mut env =
        vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(), "HOME=/root".to_string()];
    env.extend(args.env.iter().cloned());
    agent
        .exec(ExecRequest {
            id: MAIN_PROCESS.into(),
            argv: args.command.clone(),
            env,
            cwd: args.workdir.clone(),
            stdin: true,
            // A size of 0x0 when tern's stdio has no terminal: the kernel's default.
            terminal: args.tty.then(|| crate::terminal::window_size().unwrap_or_default()),
        })
        .with_context(|| format!("cannot start {:?} in the guest", args.command[0]))?;
    // With a terminal the stderr stream ends at once: its output is all on stdout.
    let stdout = agent.attach(MAIN_PROCESS, StreamKind::Stdout)?;
    let stderr = agent.attach(MAIN_PROCESS, StreamKind::Stderr)?;
    let stdin = agent.attach(MAIN_PROCESS, StreamKind::Stdin)?;
    // Raw only now: during the boot ^C is still tern's SIGINT, which cancels it.
    let raw_mode = if args.tty { RawMode::enter().context("cannot put the terminal into raw mode")? } else { None };
    let window_sizes = if args.tty {
        let relay = WindowSizeRelay::start(agent.clone(), MAIN_PROCESS)
            .context("cannot start the thread that passes on the window size")?;
        Some(relay)
    } else {
        None
    };
    let out_pump = pump_out(stdout, std::io::stdout());
    let err_pump = pump_out(stderr, std::io::stderr());
    // The stdin pump is not joined: a terminal may never reach EOF. It dies with the process.
    pump_stdin(stdin);
    let waiter = agent.clone();
    let exited = signals.sender();
    std::thread::Builder::new()
        .name("wait".into())
        .spawn(move || {
            let _ = exited.send(RunEvent::Exited(waiter.wait(MAIN_PROCESS)));
        })
        .context("cannot start the thread that waits for the command")?;
    let pumps = vec![out_pump, err_pump];
    let stop_timeout = Duration::from_secs(args.stop_timeout);
    let relayed = relay_signals_until_exit(agent, signals, stop_timeout, window_sizes.as_ref());
    // The terminal is itself again before tern says anything on it.
    drop(raw_mode);
    let code = match relayed? {
        Relayed::Exited(code) => code,
        Relayed::GaveUp { code, why } => {
            eprintln!("tern: {why}");
            return Ok(Ending::Forced { code, pumps });
        }
    };
    join_pumps(pumps);
    Ok(Ending::Exited(code))
}

/// What [`relay_signals_until_exit`] saw.
enum Relayed {
    /// The command exited with this shell-style code.
    Exited(i32),
    /// tern gives up on the command (`why`); exit with `code` once the VM is stopped.
    GaveUp { code: i32, why: String },
}

/// Forward every signal tern gets to the command until it exits; give up on it at a second
/// SIGINT or `stop_timeout` after the first signal. Window size changes go to `window_sizes`
/// when the command has a terminal.
fn relay_signals_until_exit(
    agent: &AgentClient,
    signals: &Signals,
    stop_timeout: Duration,
    window_sizes: Option<&WindowSizeRelay>,
) -> Result<Relayed> {
    let mut first: Option<(Signal, Instant)> = None;
    let mut interrupts = 0u32;
    loop {
        let event = match first {
            None => signals.events().recv().ok(),
            Some((signal, since)) => {
                match signals.events().recv_timeout(stop_timeout.saturating_sub(since.elapsed())) {
                    Ok(event) => Some(event),
                    Err(RecvTimeoutError::Timeout) => {
                        return Ok(Relayed::GaveUp {
                            code: exit_code_of(signal),
                            why: format!(
                                "the command did not exit within {} s of {signal}; stopping the VM",
                                stop_timeout.as_secs()
                            ),
                        });
                    }
                    Err(RecvTimeoutError::Disconnected) => None,
                }
            }
        };
        // `signals` holds a sender itself, so the channel cannot disconnect.
        let Some(event) = event else { anyhow::bail!("the signal channel closed") };
        match event {
            RunEvent::Exited(status) => {
                let status = status.context("lost the agent while waiting for the command")?;
                return Ok(Relayed::Exited(status.shell_code()));
            }
            RunEvent::Signal(signal) => {
                let (first_signal, _) = *first.get_or_insert((signal, Instant::now()));
                if signal == Signal::SIGINT {
                    interrupts += 1;
                    if interrupts >= 2 {
                        return Ok(Relayed::GaveUp {
                            code: exit_code_of(first_signal),
                            why: "interrupted twice; stopping the VM".into(),
                        });
                    }
                }
                forward(agent, signal);
            }
            RunEvent::WindowChanged => {
                if let Some(relay) = window_sizes {
                    relay.changed();
                }
            }
        }
    }
}

/// Pass `signal` to the command, from a thread of its own: a stuck agent must delay neither
/// the stop timeout nor a second SIGINT.
fn forward(agent: &AgentClient, signal: Signal) {
    let agent = agent.clone();
    let spawned = std::thread::Builder::new().name("forward-signal".into()).spawn(move || {
        // Fails when the command has just exited; its exit is on its way to the run loop.
        if let Err(e) = agent.signal(MAIN_PROCESS, signal as i32) {
            tracing::debug!(?signal, error = %e, "cannot forward the signal");
        }
    });
    if let Err(e) = spawned {
        tracing::warn!(?signal, error = %e, "cannot start a thread to forward the signal");
    }
}

fn join_pumps(pumps: Vec<JoinHandle<std::io::Result<()>>>) {
    for pump in pumps {
        match pump.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("output stream: {e}"),
            Err(_) => tracing::warn!("output stream thread panicked"),
        }
    }
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
