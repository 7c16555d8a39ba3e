//! `tern`: boot a microVM and run a command in it, or check whether this host can.

mod boot;
mod check;
mod fs_serve;
mod monitor;
mod run;
mod signals;
mod terminal;

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// tern runs workloads inside KVM microVMs whose VMM lives in the tern process itself.
///
/// Configuration comes from --config, $TERN_CONFIG or /etc/tern/config.toml (all optional;
/// see runtime/config.example.toml); flags override it. Logs go to stderr, filtered by
/// RUST_LOG (default: warn).
#[derive(Debug, Parser)]
#[command(name = "tern", version, about, long_about)]
struct Cli {
    /// Config file (TOML). Default: $TERN_CONFIG, else /etc/tern/config.toml if present.
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Boot a microVM, run CMD in it with stdin/stdout/stderr attached, exit with its status.
    ///
    /// The exit code is CMD's, or 128+N when a signal N killed it. The VM is shut down
    /// afterwards in every case. Errors of tern itself exit with 125 (as `docker run` does).
    /// SIGINT, SIGTERM, SIGHUP and SIGQUIT are passed on to CMD (see --stop-timeout).
    /// `tern run -it -- sh` is an interactive shell on a pseudo-terminal (see --tty).
    Run(run::RunArgs),
    /// Check that this host can run tern microVMs, like `kata-runtime check`.
    ///
    /// Prints one pass/fail line per requirement with what to do about failures, and exits
    /// non-zero if any requirement fails.
    Check(check::CheckArgs),
    /// Export a host directory as a vhost-user-fs backend (for QEMU or another VMM).
    ///
    /// The same file server as tern's built-in virtio-fs device, on a vhost-user unix socket:
    /// e.g. `qemu-system-x86_64 ... -object memory-backend-memfd,id=mem,size=256M,share=on
    /// -chardev socket,id=fs0,path=PATH -device vhost-user-fs-pci,chardev=fs0,tag=myfs`, then
    /// `mount -t virtiofs myfs /mnt` in the guest. Serves one frontend connection: exits 0
    /// when the frontend disconnects or on SIGINT/SIGTERM, and removes the socket.
    FsServe(fs_serve::FsServeArgs),
    /// Serve every tern sandbox's metrics in one Prometheus endpoint.
    ///
    /// Watches the sandbox directory (`<shim.root_dir>/sbs`) for shims, scrapes each one's
    /// `shim-monitor.sock` concurrently and labels every series with `sandbox_id` and the pod's
    /// `cri_uid`, `cri_name`, `cri_namespace` from CRI. Endpoints: /metrics
    /// (`?filter_family=PREFIX`), /sandboxes, /agent-url?sandbox=ID.
    Monitor(monitor::MonitorArgs),
    /// Boot a kernel and an initramfs with no agent, console on stdout, until the guest
    /// reboots (for benchmarks and debugging).
    #[command(hide = true)]
    Boot(boot::BootArgs),
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let code = match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tern: {e:#}");
            run::TERN_FAILURE_EXIT
        }
    };
    std::process::exit(code);
}

/// Most open files the file server may need: it keeps one O_PATH fd per inode the guest
/// holds (10,000 files in a directory mean 10,000 fds), so raise the limit as virtiofsd does.
const NOFILE_TARGET: u64 = 1_000_000;

/// Raise RLIMIT_NOFILE to [`NOFILE_TARGET`] (capped by fs.nr_open) when privileged, else the
/// soft limit to the hard one. Failures only cost capacity, so they are logged, not fatal.
fn raise_open_file_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(NOFILE_TARGET);
    let target = NOFILE_TARGET.min(nr_open);
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else { return };
    if soft >= target {
        return;
    }
    if setrlimit(Resource::RLIMIT_NOFILE, target, target.max(hard)).is_err() {
        if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            tracing::warn!("cannot raise the open-file limit from {soft}: {e}");
        }
    }
}

fn dispatch(cli: Cli) -> Result<i32> {
    raise_open_file_limit();
    let config = tern_runtime::config::Config::load(cli.config.as_deref())?;
    match cli.command {
        Command::Run(args) => run::run(config, args),
        Command::Check(args) => check::check(&config, args),
        Command::FsServe(args) => fs_serve::fs_serve(args),
        Command::Monitor(args) => monitor::monitor(&config, args),
        Command::Boot(args) => boot::boot(config, args),
    }
}
