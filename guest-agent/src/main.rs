//! `tern-agent`: PID 1 inside each tern microVM.
//!
//! Boot: mount the basic filesystems, start logging, start the reaper, bind the RPC and stream
//! listeners (vsock ports 1024/1025/1026), print the ready marker on the console, serve forever.
//! With `--unix-dir DIR` it listens on `DIR/rpc.sock` and `DIR/stream.sock` instead and, when
//! not PID 1, skips all system setup: that is how the protocol is tested on a host.

mod cgroups;
mod container;
mod error_code;
mod init;
mod logging;
mod mirror;
mod mounts;
mod process;
mod pty;
mod seccomp;
mod server;
mod stats;
mod streams;
mod transport;
mod watch_events;

use anyhow::Context;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use tern_protocol::{AGENT_RPC_PORT, AGENT_STREAM_PORT, AGENT_WATCH_PORT, READY_MARKER};
use tracing::{error, info, warn};

use crate::logging::LogTarget;
use crate::process::ProcessTable;
use crate::server::{Agent, ShutdownMode};
use crate::transport::{Listener, UNIX_RPC_SOCKET, UNIX_STREAM_SOCKET, UNIX_WATCH_SOCKET};

const USAGE: &str = "usage: tern-agent [--unix-dir DIR]\n\n\
    Without options: listen on vsock ports 1024 (RPC), 1025 (stdio streams) and 1026 (change records).\n\
    --unix-dir DIR   listen on DIR/rpc.sock, DIR/stream.sock and DIR/watch.sock instead (host-side testing)\n\
    watch-events [--stamps] [--echo] DIR...\n\
                          print inotify events of DIRs, one line each (test tool); --stamps\n\
                          appends the guest monotonic clock (ns), --echo also copies each\n\
                          stdin line to stdout as `ECHO line` (the stdio floor)\n\
    Log level: tern.log=<level> on the kernel command line (PID 1), else $TERN_AGENT_LOG.\n\
    Test hook: tern.test_stall=<op> on the kernel command line (PID 1), else $TERN_AGENT_TEST_STALL,\n\
    never answers requests of protocol op <op> (e.g. container_stats).\n";

/// Environment variable with the log level when not running as PID 1.
const LOG_ENV: &str = "TERN_AGENT_LOG";
/// Off PID 1, the `tern.test_stall=<op>` test hook (requests of that op are never answered).
const TEST_STALL_ENV: &str = "TERN_AGENT_TEST_STALL";

#[derive(Debug, Default)]
struct Options {
    unix_dir: Option<PathBuf>,
    /// Arguments we did not understand (as PID 1 the kernel passes stray boot parameters).
    ignored: Vec<String>,
}

enum Parsed {
    Run(Options),
    Exit(ExitCode),
}

fn parse_args(args: impl Iterator<Item = String>, lenient: bool) -> Parsed {
    let mut opts = Options::default();
    let mut args = args;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--unix-dir" => match args.next() {
                Some(dir) => opts.unix_dir = Some(dir.into()),
                None if lenient => opts.ignored.push(arg),
                None => {
                    eprint!("--unix-dir needs a directory\n\n{USAGE}");
                    return Parsed::Exit(ExitCode::from(2));
                }
            },
            "--version" if !lenient => {
                println!("tern-agent {}", env!("CARGO_PKG_VERSION"));
                return Parsed::Exit(ExitCode::SUCCESS);
            }
            "--help" | "-h" if !lenient => {
                print!("{USAGE}");
                return Parsed::Exit(ExitCode::SUCCESS);
            }
            _ if lenient => opts.ignored.push(arg),
            _ => {
                eprint!("unknown argument {arg:?}\n\n{USAGE}");
                return Parsed::Exit(ExitCode::from(2));
            }
        }
    }
    Parsed::Run(opts)
}

fn main() -> ExitCode {
    let pid1 = std::process::id() == 1;
    // PID 1 must never exit over its arguments: that would panic the kernel.
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !pid1 && args.first().map(String::as_str) == Some("watch-events") {
        let Err(e) = watch_events::run(&args[1..]);
        eprintln!("tern-agent watch-events: {e:#}");
        return ExitCode::FAILURE;
    }
    let opts = match parse_args(args.into_iter(), pid1) {
        Parsed::Run(opts) => opts,
        Parsed::Exit(code) => return code,
    };
    if pid1 {
        run_as_pid1(opts)
    } else {
        let complaint = logging::init(std::env::var(LOG_ENV).ok().as_deref(), LogTarget::Stderr);
        if let Some(c) = complaint {
            warn!("{c}");
        }
        match run_agent(&opts, false) {
            Ok(never) => match never {},
            Err(e) => {
                error!("{e:#}");
                eprintln!("tern-agent: {e:#}");
                ExitCode::FAILURE
            }
        }
    }
}

/// Set up the guest, then serve. Never returns: on a fatal error the VM is reset, so the host
/// sees a quick failure instead of a kernel panic or a silent hang.
fn run_as_pid1(opts: Options) -> ! {
    let mount_errors = init::mount_filesystems();
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let complaint = logging::init(init::log_level_from_cmdline(&cmdline), LogTarget::Console);
    for e in mount_errors {
        warn!("{:#}", anyhow::Error::from(e));
    }
    if let Some(c) = complaint {
        warn!("{c}");
    }
    if !opts.ignored.is_empty() {
        info!(args = ?opts.ignored, "ignoring unknown arguments");
    }
    for e in init::configure_system() {
        warn!("{:#}", anyhow::Error::from(e));
    }
    if let Some(interval) = mirror::resync_interval_from_cmdline(&cmdline) {
        mirror::set_resync_interval(interval);
    }
    let Err(e) = run_agent(&opts, true);
    error!("{e:#}");
    let err = init::power_off();
    error!(error = %err, "reboot failed");
    loop {
        std::thread::park();
    }
}

/// Start the reaper and both servers; returns only on a setup failure.
fn run_agent(opts: &Options, pid1: bool) -> anyhow::Result<std::convert::Infallible> {
    let table = Arc::new(ProcessTable::new());
    {
        let table = Arc::clone(&table);
        std::thread::Builder::new()
            .name("reaper".into())
            .spawn(move || table.run_reaper())
            .context("cannot start the reaper thread")?;
    }
    let (rpc, streams, watch) = match &opts.unix_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
            if !pid1 {
                become_subreaper();
            }
            (
                Listener::unix(&dir.join(UNIX_RPC_SOCKET))?,
                Listener::unix(&dir.join(UNIX_STREAM_SOCKET))?,
                Listener::unix(&dir.join(UNIX_WATCH_SOCKET))?,
            )
        }
        None => {
            (Listener::vsock(AGENT_RPC_PORT)?, Listener::vsock(AGENT_STREAM_PORT)?, Listener::vsock(AGENT_WATCH_PORT)?)
        }
    };
    mirror::start_watch_listener(watch).context("cannot start the watch listener")?;
    let mode = if pid1 { ShutdownMode::PowerOff } else { ShutdownMode::ExitProcess };
    // Test hook (see `server::test_stall_from_cmdline`): only PID 1 reads a command line; on a
    // host the protocol tests set `$TERN_AGENT_TEST_STALL` instead.
    let test_stall = if pid1 {
        std::fs::read_to_string("/proc/cmdline").ok().and_then(|c| server::test_stall_from_cmdline(&c))
    } else {
        std::env::var(TEST_STALL_ENV).ok().filter(|op| !op.is_empty())
    };
    let agent = Arc::new(Agent::new(table, mode).with_test_stall(test_stall));
    server::run(agent, rpc, streams, || announce_ready(pid1)).context("cannot start the stream server")
}

/// Off PID 1, adopt orphaned grandchildren like init would, so the host tests exercise the
/// same reaping paths as the guest.
fn become_subreaper() {
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) takes an integer flag and touches no memory.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    if rc != 0 {
        warn!(error = %std::io::Error::last_os_error(), "cannot become a child subreaper");
    }
}

/// Print the ready marker: on the console in a VM (the host times boot by it), else stdout.
fn announce_ready(pid1: bool) {
    let line = format!("{READY_MARKER}\n");
    let written = if pid1 {
        std::fs::OpenOptions::new().write(true).open("/dev/console").and_then(|mut c| c.write_all(line.as_bytes()))
    } else {
        let mut out = std::io::stdout().lock();
        out.write_all(line.as_bytes()).and_then(|()| out.flush())
    };
    if let Err(e) = written {
        warn!(error = %e, "cannot print the ready marker");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> impl Iterator<Item = String> {
        list.iter().map(|s| s.to_string()).collect::<Vec<_>>().into_iter()
    }

    #[test]
    fn unix_dir_is_parsed() {
        let Parsed::Run(opts) = parse_args(args(&["--unix-dir", "/tmp/x"]), false) else {
            panic!("expected to run");
        };
        assert_eq!(opts.unix_dir, Some(PathBuf::from("/tmp/x")));
    }

    #[test]
    fn pid1_ignores_what_it_does_not_understand() {
        let Parsed::Run(opts) = parse_args(args(&["splash", "--help", "--unix-dir"]), true) else {
            panic!("PID 1 must not exit over its arguments");
        };
        assert_eq!(opts.ignored, vec!["splash", "--help", "--unix-dir"]);
    }

    #[test]
    fn unknown_arguments_fail_off_pid1() {
        assert!(matches!(parse_args(args(&["--bogus"]), false), Parsed::Exit(_)));
    }
}
