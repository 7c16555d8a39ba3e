//! Network namespace files: telling one from anything else, refusing the host's, and running
//! work inside one on a thread of its own.
//!
//! `setns(2)` moves only the calling thread, and a tokio task may hop threads at any await, so
//! the work runs on a dedicated std thread that enters the namespace, does everything, and ends:
//! nothing else ever runs inside the pod's namespace.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::sched::{setns, CloneFlags};

use crate::NetError;

/// The host's network namespace (PID 1's), and ours should /proc/1 not be readable.
const HOST_NETNS: &str = "/proc/1/ns/net";
const OWN_NETNS: &str = "/proc/self/ns/net";

/// Open `path` and make sure it is a network namespace other than the host's.
pub(crate) fn open_netns(path: &Path) -> Result<File, NetError> {
    let metadata = match std::fs::metadata(path) {
        Ok(metadata) => metadata,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(NetError::NetnsMissing { path: path.to_path_buf() })
        }
        Err(source) => return Err(NetError::OpenNetns { path: path.to_path_buf(), source }),
    };
    // Namespace files (nsfs inodes, bind-mounted or under /proc) are regular files; checking
    // first keeps us from opening a FIFO or a device.
    if !metadata.is_file() {
        return Err(NetError::NotANetns { path: path.to_path_buf() });
    }
    let file = File::open(path).map_err(|source| NetError::OpenNetns { path: path.to_path_buf(), source })?;
    // SAFETY: NS_GET_NSTYPE takes no argument and only reads the descriptor, which `file`
    // keeps open for the duration of the call.
    let nstype = unsafe { libc::ioctl(file.as_raw_fd(), libc::NS_GET_NSTYPE) };
    if nstype != libc::CLONE_NEWNET {
        // ENOTTY: not a namespace file at all; another value: another kind of namespace.
        return Err(NetError::NotANetns { path: path.to_path_buf() });
    }
    let opened = file.metadata().map_err(|source| NetError::OpenNetns { path: path.to_path_buf(), source })?;
    let host = std::fs::metadata(HOST_NETNS).or_else(|_| std::fs::metadata(OWN_NETNS));
    if let Ok(host) = host {
        if (host.dev(), host.ino()) == (opened.dev(), opened.ino()) {
            return Err(NetError::HostNetns { path: path.to_path_buf() });
        }
    }
    Ok(file)
}

/// Run `work` on a new thread inside the network namespace `netns` (opened from `path`), and
/// wait for it. The thread ends with the work.
pub(crate) fn in_netns<T, F>(path: &Path, netns: File, work: F) -> Result<T, NetError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, NetError> + Send + 'static,
{
    let path: PathBuf = path.to_path_buf();
    let worker = std::thread::Builder::new()
        .name("tern-netns".into())
        .spawn(move || {
            setns(&netns, CloneFlags::CLONE_NEWNET).map_err(|source| NetError::EnterNetns { path, source })?;
            drop(netns);
            work()
        })
        .map_err(NetError::SpawnWorker)?;
    worker.join().map_err(|_| NetError::WorkerPanicked)?
}
