//! `tern fs-serve`: export a host directory as a vhost-user-fs backend, the same file server
//! as tern's built-in virtio-fs device, for another VMM (e.g. QEMU) to use.

use std::path::{Path, PathBuf};
use std::sync::mpsc;

use anyhow::{Context, Result};
use clap::Args;
use nix::sys::signal::{SigSet, Signal};
use vmm::api::{CachePolicy, ShareConfig};
use vmm::{share_vfs, VhostUserFsDaemon};

#[derive(Debug, Args)]
pub struct FsServeArgs {
    /// Unix socket to listen on. A stale socket file there is replaced; the socket is removed
    /// when fs-serve exits.
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// Host directory to export. Guest requests never resolve outside it.
    #[arg(long, value_name = "DIR")]
    shared_dir: PathBuf,
    /// Tag announced in the device's config space (1 to 36 bytes). QEMU's
    /// vhost-user-fs devices announce their own `tag=` instead.
    #[arg(long, value_name = "T", default_value = "tern")]
    tag: String,
    /// Refuse every change from the guest (EROFS).
    #[arg(long)]
    read_only: bool,
    /// What the guest may cache: `never` (every read and stat goes to the host), `auto`
    /// (close-to-open, 1 s metadata timeouts) or `always` (for trees only this guest changes).
    #[arg(long, value_name = "POLICY", default_value = "auto")]
    cache: CachePolicy,
}

/// How serving ended.
enum Ending {
    Disconnected(Result<()>),
    Signal(Signal),
}

pub fn fs_serve(args: FsServeArgs) -> Result<i32> {
    // SIGINT/SIGTERM are taken by a waiting thread, not a handler: block them before any
    // thread starts so every thread inherits the mask.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals.thread_block().context("cannot block SIGINT/SIGTERM")?;

    let share = ShareConfig {
        // Only the built-in device's tree uses share names; the tag is checked below.
        name: "fs-serve".into(),
        host_dir: args.shared_dir.clone(),
        read_only: args.read_only,
        cache: args.cache,
        watch: false,
    };
    let vfs = share_vfs(&share).with_context(|| format!("cannot export {}", args.shared_dir.display()))?;
    let daemon = VhostUserFsDaemon::new(vfs, &args.tag).context("cannot start the vhost-user backend")?;

    let (ended_tx, ended_rx) = mpsc::channel();
    let signal_tx = ended_tx.clone();
    std::thread::Builder::new()
        .name("fs-serve signals".into())
        .spawn(move || {
            if let Ok(signal) = signals.wait() {
                let _ = signal_tx.send(Ending::Signal(signal));
            }
        })
        .context("cannot start the signal thread")?;
    let socket = args.socket.clone();
    let mode = if args.read_only { "read-only" } else { "read-write" };
    let shared_dir = args.shared_dir.clone();
    std::thread::Builder::new()
        .name("fs-serve".into())
        .spawn(move || {
            let result = daemon.serve(&socket, || {
                eprintln!("tern fs-serve: serving {} ({mode}) on {}", shared_dir.display(), socket.display());
            });
            let _ = ended_tx.send(Ending::Disconnected(result.map_err(anyhow::Error::from)));
        })
        .context("cannot start the vhost-user thread")?;

    let ending = ended_rx.recv().context("fs-serve threads ended unexpectedly")?;
    remove_socket(&args.socket);
    match ending {
        Ending::Disconnected(result) => {
            result?;
            tracing::info!("frontend disconnected");
        }
        Ending::Signal(signal) => tracing::info!("stopping on {signal}"),
    }
    Ok(0)
}

fn remove_socket(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => tracing::warn!("cannot remove {}: {err}", path.display()),
    }
}
