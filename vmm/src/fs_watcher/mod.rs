//! The host watcher of watchable shares: inotify on each share's host tree, coalesced into
//! `ChangeBatch`es and pushed to the agent on a vsock stream of its own
//! (`AGENT_WATCH_PORT`), so the guest's tmpfs mirrors follow the host without polling.
//!
//! Two std threads per VM:
//! - `tern-fs-watch` ([`reader`]) reads inotify events, keeps one watch per directory of every share (a new
//!   subdirectory gets its watch when its creation is seen, and everything already inside it
//!   is reported as created, since it may predate the watch), pairs the two ends of a rename
//!   by their inotify cookie into one `ChangeKind::Moved` record that names the old path
//!   (so the guest can rename instead of guessing: [`moves`]), and coalesces records
//!   ([`coalesce`]) until a burst is over; the watches themselves are kept in [`tree`];
//! - `tern-fs-link` ([`link`]) owns the connection to the agent: it connects through the VMM's hybrid
//!   vsock socket (`CONNECT 1026\n` → `OK …\n`), retrying until the agent listens, numbers the
//!   batches (`seq`), and sends a `resync: true` batch for every share after each (re)connect,
//!   after an inotify queue overflow and on a slow periodic timer (the safety net). A batch
//!   reporting a kubelet `..data` swap carries the generation it published, read on the host
//!   just before sending, and the files its records name ([`host_read`]).
//!
//! Records are hints (see [`tern_change_records`]): a lost record is settled by the next
//! resync, so every failure here degrades to "the agent resyncs later", never to an error of
//! the VM.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tern_sync::LockExt;

use inotify::Inotify;
use tern_change_records::is_safe_relative_path;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::seccomp::{Hardening, SeccompRole};

use self::coalesce::{Coalescer, PendingBatch};
use self::link::AgentLink;
use self::moves::PendingMoves;
use self::reader::EventReader;
use self::tree::{WatchState, WatchedShare, WATCH_MASK};

mod coalesce;
mod host_read;
mod link;
mod moves;
mod reader;
mod tree;

const TOKEN_INOTIFY: u64 = 0;
const TOKEN_WAKE: u64 = 1;
const TOKEN_FLUSH: u64 = 2;

/// Errors starting the watcher or adding a share.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// The inotify instance could not be created.
    #[error("cannot create an inotify instance")]
    Inotify(#[source] std::io::Error),
    /// The epoll set or wake-up eventfd could not be created.
    #[error("cannot set up the watcher's event wait")]
    Wait(#[source] std::io::Error),
    /// A watcher thread could not be started.
    #[error("cannot start the {0} thread")]
    Thread(&'static str, #[source] std::io::Error),
    /// The share name is empty or contains `/`, `.` or `..` components.
    #[error("invalid share name {0:?}")]
    InvalidName(String),
    /// A share of that name is already watched.
    #[error("share {0:?} is already watched")]
    DuplicateShare(String),
    /// The share's host directory is, contains or lies inside another watched share's:
    /// inotify gives one watch per directory inode, so two shares cannot both own it.
    #[error("share {share:?} overlaps watched share {other:?} ({}): watchable shares must be disjoint", path.display())]
    Overlap { share: String, other: String, path: PathBuf },
    /// No share of that name is watched.
    #[error("share {0:?} is not watched")]
    UnknownShare(String),
    /// Change records travel over vsock; this VM has no vsock device.
    #[error("watching a share needs the VM's vsock device")]
    NoVsock,
    /// The share's host directory could not be watched.
    #[error("cannot watch {}", path.display())]
    AddWatch {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What the watcher has done so far (for metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WatcherCounters {
    /// Change records sent to the agent.
    pub records_sent: u64,
    /// Batches sent (with or without `resync`).
    pub batches_sent: u64,
    /// Batches sent with `resync: true`.
    pub resyncs_sent: u64,
    /// inotify queue overflows (each answered with a resync of every share).
    pub overflows: u64,
    /// Successful connections to the agent's watch port.
    pub connects: u64,
    /// Sends that failed and dropped the connection.
    pub send_failures: u64,
}

#[derive(Debug, Default)]
struct AtomicCounters {
    records_sent: AtomicU64,
    batches_sent: AtomicU64,
    resyncs_sent: AtomicU64,
    overflows: AtomicU64,
    connects: AtomicU64,
    send_failures: AtomicU64,
}

impl AtomicCounters {
    fn snapshot(&self) -> WatcherCounters {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        WatcherCounters {
            records_sent: get(&self.records_sent),
            batches_sent: get(&self.batches_sent),
            resyncs_sent: get(&self.resyncs_sent),
            overflows: get(&self.overflows),
            connects: get(&self.connects),
            send_failures: get(&self.send_failures),
        }
    }
}

fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

/// Work for the link thread.
#[derive(Debug)]
enum Outgoing {
    Batch(PendingBatch),
    Resync(String),
    ResyncAll,
    Stop,
}

struct Shared {
    state: Mutex<WatchState>,
    counters: AtomicCounters,
    stop: AtomicBool,
    /// The last `order` stamped on a generation read for a batch.
    generation_order: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, WatchState> {
        // A panicking watcher thread must not take the VMM down with a poisoned lock.
        self.state.lock_unpoisoned()
    }
}

/// The watcher of one VM's watchable shares. Dropping it stops and joins its threads.
pub struct Watcher {
    shared: Arc<Shared>,
    wake: EventFd,
    outgoing: Sender<Outgoing>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watcher").field("counters", &self.counters()).finish()
    }
}

impl Watcher {
    /// Start the watcher threads. Batches go to the agent through the hybrid vsock socket at
    /// `uds_path`; every share is resynced at least every `resync_interval`.
    pub fn start(uds_path: &Path, resync_interval: Duration, hardening: &Hardening) -> Result<Watcher, WatchError> {
        let inotify = Inotify::init().map_err(WatchError::Inotify)?;
        let wake = EventFd::new(libc::EFD_NONBLOCK).map_err(WatchError::Wait)?;
        let timer = TimerFd::new().map_err(|e| WatchError::Wait(std::io::Error::from_raw_os_error(e.errno())))?;
        let epoll = Epoll::new().map_err(WatchError::Wait)?;
        let fds =
            [(inotify.as_raw_fd(), TOKEN_INOTIFY), (wake.as_raw_fd(), TOKEN_WAKE), (timer.as_raw_fd(), TOKEN_FLUSH)];
        for (fd, token) in fds {
            epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, token)).map_err(WatchError::Wait)?;
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(WatchState { watches: inotify.watches(), shares: BTreeMap::new(), dirs: HashMap::new() }),
            counters: AtomicCounters::default(),
            stop: AtomicBool::new(false),
            generation_order: AtomicU64::new(0),
        });
        let (outgoing, rx) = mpsc::channel();

        let mut watcher = Watcher { shared: shared.clone(), wake, outgoing: outgoing.clone(), threads: Vec::new() };
        let link = AgentLink {
            uds_path: uds_path.to_owned(),
            shared: shared.clone(),
            resync_interval,
            history: std::cell::RefCell::default(),
        };
        let thread =
            crate::seccomp::spawn(crate::threads::FS_LINK.into(), SeccompRole::Watcher, hardening, move || {
                link.run(rx)
            })
            .map_err(|e| WatchError::Thread(crate::threads::FS_LINK, e))?;
        watcher.threads.push(thread);
        let events = EventReader {
            inotify,
            epoll,
            shared,
            outgoing,
            coalescer: Coalescer::default(),
            moves: PendingMoves::default(),
            timer,
        };
        let thread =
            crate::seccomp::spawn(crate::threads::FS_WATCH.into(), SeccompRole::Watcher, hardening, move || {
                events.run()
            })
            .map_err(|e| WatchError::Thread(crate::threads::FS_WATCH, e))?;
        watcher.threads.push(thread);
        Ok(watcher)
    }

    /// Watch `host_dir` (recursively) as share `name`; the agent is told to resync it.
    pub fn add_share(&self, name: &str, host_dir: &Path) -> Result<(), WatchError> {
        if name.contains('/') || !is_safe_relative_path(name) {
            return Err(WatchError::InvalidName(name.to_owned()));
        }
        {
            let mut state = self.shared.lock();
            if state.shares.contains_key(name) {
                return Err(WatchError::DuplicateShare(name.to_owned()));
            }
            // One inotify watch per directory inode: a directory in two shares would report
            // to only one of them, and the other would go stale until its resync.
            let real = std::fs::canonicalize(host_dir).unwrap_or_else(|_| host_dir.to_owned());
            if let Some((other, _)) = state.shares.iter().find(|(_, s)| {
                let theirs = std::fs::canonicalize(&s.host_dir).unwrap_or_else(|_| s.host_dir.clone());
                real.starts_with(&theirs) || theirs.starts_with(&real)
            }) {
                return Err(WatchError::Overlap { share: name.to_owned(), other: other.clone(), path: real });
            }
            // The root must be watchable; failures deeper down are races we log and survive.
            let root = state
                .watches
                .add(host_dir, WATCH_MASK)
                .map_err(|source| WatchError::AddWatch { path: host_dir.to_owned(), source })?;
            state.watches_insert(name, "", root);
            state.shares.insert(name.to_owned(), WatchedShare { host_dir: host_dir.to_owned(), dirs: 1 });
            state.watch_tree(name, "", &mut |_| {});
        }
        let _ = self.outgoing.send(Outgoing::Resync(name.to_owned()));
        Ok(())
    }

    /// Stop watching share `name`.
    pub fn remove_share(&self, name: &str) -> Result<(), WatchError> {
        let mut state = self.shared.lock();
        if state.shares.remove(name).is_none() {
            return Err(WatchError::UnknownShare(name.to_owned()));
        }
        state.unwatch(name, None);
        Ok(())
    }

    #[cfg(test)]
    /// The names of the watched shares.
    pub fn shares(&self) -> Vec<String> {
        self.shared.lock().shares.keys().cloned().collect()
    }

    /// What the watcher has done so far.
    pub fn counters(&self) -> WatcherCounters {
        self.shared.counters.snapshot()
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = self.wake.write(1);
        let _ = self.outgoing.send(Outgoing::Stop);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// The watcher of one VM, started when the first watchable share is added (a VM without
/// watchable shares runs no watcher threads).
#[derive(Debug)]
pub struct ShareWatchers {
    uds_path: Option<PathBuf>,
    resync_interval: Duration,
    hardening: Hardening,
    watcher: Mutex<Option<Watcher>>,
}

impl ShareWatchers {
    /// `uds_path`: the VM's hybrid vsock socket, if it has a vsock device.
    pub fn new(uds_path: Option<PathBuf>, resync_interval: Duration, hardening: Hardening) -> Self {
        ShareWatchers { uds_path, resync_interval, hardening, watcher: Mutex::new(None) }
    }

    fn lock(&self) -> MutexGuard<'_, Option<Watcher>> {
        self.watcher.lock_unpoisoned()
    }

    /// Watch share `name` at `host_dir`, starting the watcher if needed.
    pub fn watch(&self, name: &str, host_dir: &Path) -> Result<(), WatchError> {
        let uds_path = self.uds_path.as_deref().ok_or(WatchError::NoVsock)?;
        let mut watcher = self.lock();
        if watcher.is_none() {
            *watcher = Some(Watcher::start(uds_path, self.resync_interval, &self.hardening)?);
        }
        match watcher.as_ref() {
            Some(w) => w.add_share(name, host_dir),
            None => Err(WatchError::UnknownShare(name.to_owned())),
        }
    }

    /// Stop watching share `name`; a share that was not watched is fine.
    pub fn unwatch(&self, name: &str) {
        if let Some(w) = self.lock().as_ref() {
            let _ = w.remove_share(name);
        }
    }

    /// The watcher's counters, if it was started.
    pub fn counters(&self) -> Option<WatcherCounters> {
        self.lock().as_ref().map(Watcher::counters)
    }

    /// Stop and join the watcher threads (also done on drop).
    pub fn stop(&self) {
        let watcher = self.lock().take();
        drop(watcher);
    }
}

fn unix_now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests;
