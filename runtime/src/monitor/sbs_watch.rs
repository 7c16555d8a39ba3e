//! Following `<root>/sbs` with inotify: the set of sandbox directories in it is the set of
//! sandboxes.
//!
//! A thread waits for the directory to exist (polling its path), watches it for entries
//! created, deleted or moved, and after every batch of events (and every
//! [`RESCAN_INTERVAL`]) re-reads the directory and reconciles: events only say *when* to
//! look, the listing says *what* is there, so a missed or overflowed event costs nothing. If
//! the directory itself goes, every sandbox goes with it and the thread waits again.
//!
//! A directory removed and recreated at once is not left to `IN_DELETE_SELF`: while anything
//! pins the old inode (a unix socket still bound below it, say) the kernel may send that event
//! only when the inode is finally evicted. So every wake-up and every poll tick compares the
//! watched inode with the one the path names now, and a replaced directory is followed anew
//! within one [`POLL_INTERVAL`] (kata#3550's failure class: never lose sandboxes for a rescan).

use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

use super::Sandboxes;
use crate::metrics::sbs::valid_sandbox_id;

/// How often a missing directory is looked for, and the stop flag checked.
const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// Safety-net rescan even without events.
const RESCAN_INTERVAL: Duration = Duration::from_secs(10);

/// The watcher thread; stopped and joined on drop.
pub struct SbsWatcher {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl SbsWatcher {
    /// Start following `sbs_root` into `sandboxes`.
    pub fn start(sbs_root: PathBuf, sandboxes: Arc<Sandboxes>) -> std::io::Result<SbsWatcher> {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new().name("sbs-watch".into()).spawn(move || run(&sbs_root, &sandboxes, &stop))?
        };
        Ok(SbsWatcher { stop, thread: Some(thread) })
    }
}

impl Drop for SbsWatcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sandbox ids: the subdirectories of `dir` with valid names.
pub fn list_sandbox_dirs(dir: &Path) -> std::io::Result<Vec<String>> {
    let mut ids = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if !entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            continue;
        }
        if let Some(name) = entry.file_name().to_str() {
            if valid_sandbox_id(name) {
                ids.push(name.to_owned());
            }
        }
    }
    ids.sort();
    Ok(ids)
}

fn run(sbs_root: &Path, sandboxes: &Sandboxes, stop: &AtomicBool) {
    let mut waiting_logged = false;
    while !stop.load(Ordering::SeqCst) {
        if !sbs_root.is_dir() {
            if !waiting_logged {
                tracing::info!(dir = %sbs_root.display(), "waiting for the sandbox directory to appear");
                waiting_logged = true;
            }
            sandboxes.reconcile(sbs_root, &[]);
            std::thread::sleep(POLL_INTERVAL);
            continue;
        }
        waiting_logged = false;
        if let Err(e) = follow(sbs_root, sandboxes, stop) {
            tracing::warn!(dir = %sbs_root.display(), error = %e, "watching the sandbox directory failed; retrying");
            std::thread::sleep(POLL_INTERVAL);
        }
    }
}

/// Watch an existing `sbs_root` until it goes away, stop is set, or an error.
fn follow(sbs_root: &Path, sandboxes: &Sandboxes, stop: &AtomicBool) -> std::io::Result<()> {
    let inotify = Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK)?;
    let flags = AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_DELETE_SELF
        | AddWatchFlags::IN_MOVE_SELF
        | AddWatchFlags::IN_ONLYDIR;
    inotify.add_watch(sbs_root, flags)?;
    // The inode the watch is on (a path swapped between add_watch and here is caught at the
    // first tick: the listing below reads the new directory, the identity check re-follows it).
    let watched = DirIdentity::of(sbs_root)?;
    // Entries that existed before the watch.
    sandboxes.reconcile(sbs_root, &list_sandbox_dirs(sbs_root)?);
    let mut since_rescan = Duration::ZERO;
    let timeout = PollTimeout::try_from(POLL_INTERVAL.as_millis() as i32).unwrap_or(PollTimeout::NONE);
    while !stop.load(Ordering::SeqCst) {
        let mut fds = [PollFd::new(inotify.as_fd(), PollFlags::POLLIN)];
        let ready = poll(&mut fds, timeout).map_err(std::io::Error::from)?;
        let mut gone = false;
        if ready > 0 {
            match inotify.read_events() {
                Ok(events) => {
                    gone = events.iter().any(|e| {
                        e.mask.intersects(
                            AddWatchFlags::IN_DELETE_SELF | AddWatchFlags::IN_MOVE_SELF | AddWatchFlags::IN_IGNORED,
                        )
                    });
                }
                Err(nix::errno::Errno::EAGAIN) => {}
                Err(e) => return Err(e.into()),
            }
        }
        match DirIdentity::of(sbs_root) {
            Ok(now) if now == watched && !gone => {}
            // Replaced by another directory, or the watch ended: follow the path anew (its
            // listing reconciles, keeping the metadata of sandboxes that are still there).
            Ok(_) => return Ok(()),
            // Gone: every sandbox goes with it.
            Err(_) => {
                sandboxes.reconcile(sbs_root, &[]);
                return Ok(());
            }
        }
        if ready == 0 {
            since_rescan += POLL_INTERVAL;
            if since_rescan < RESCAN_INTERVAL {
                continue;
            }
        }
        since_rescan = Duration::ZERO;
        match list_sandbox_dirs(sbs_root) {
            Ok(ids) => sandboxes.reconcile(sbs_root, &ids),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                sandboxes.reconcile(sbs_root, &[]);
                return Ok(());
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Which directory a path names: device and inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DirIdentity {
    dev: u64,
    ino: u64,
}

impl DirIdentity {
    fn of(path: &Path) -> std::io::Result<DirIdentity> {
        let meta = std::fs::metadata(path)?;
        if !meta.is_dir() {
            return Err(std::io::Error::new(std::io::ErrorKind::NotADirectory, "not a directory"));
        }
        Ok(DirIdentity { dev: meta.dev(), ino: meta.ino() })
    }
}
