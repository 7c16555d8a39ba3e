//! The host watcher of watchable shares: inotify on each share's host tree, coalesced into
//! [`ChangeBatch`]es and pushed to the agent on a vsock stream of its own
//! ([`AGENT_WATCH_PORT`]), so the guest's tmpfs mirrors follow the host without polling.
//!
//! Two std threads per VM:
//! - `fs-watch` reads inotify events, keeps one watch per directory of every share (a new
//!   subdirectory gets its watch when its creation is seen, and everything already inside it
//!   is reported as created, since it may predate the watch), pairs the two ends of a rename
//!   by their inotify cookie into one [`ChangeKind::Moved`] record that names the old path
//!   (so the guest can rename instead of guessing), and coalesces records
//!   ([`super::coalesce`]) until a burst is over;
//! - `fs-watch-link` owns the connection to the agent: it connects through the VMM's hybrid
//!   vsock socket (`CONNECT 1026\n` → `OK …\n`), retrying until the agent listens, numbers the
//!   batches (`seq`), and sends a `resync: true` batch for every share after each (re)connect,
//!   after an inotify queue overflow and on a slow periodic timer (the safety net).
//!
//! Records are hints (see [`tern_protocol::watch`]): a lost record is settled by the next
//! resync, so every failure here degrades to "the agent resyncs later", never to an error of
//! the VM.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask, Watches};
use tern_protocol::watch::{is_safe_relative_path, ChangeBatch, ChangeKind, ChangeRecord};
use tern_protocol::AGENT_WATCH_PORT;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::coalesce::{Coalescer, PendingBatch};

/// Most directories watched per share: a watchable mount holds at most 16 entries, so a tree
/// this deep has long fallen back to a bind mount in the guest; we stop adding watches rather
/// than exhaust the host's inotify limits.
const MAX_WATCHED_DIRS_PER_SHARE: usize = 1024;
/// First pause between connection attempts while the agent is not listening yet.
const FIRST_RETRY: Duration = Duration::from_millis(10);
/// Longest pause between connection attempts.
const MAX_RETRY: Duration = Duration::from_millis(500);
/// How long the VMM may take to answer `CONNECT`, and a send may block on a stuck guest.
const LINK_IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest `OK <port>` line accepted from the VMM.
const MAX_HANDSHAKE_LINE: usize = 64;
/// Longest a burst is held open for the new end of a rename whose old end was read. The kernel
/// queues both ends in one rename(2), but a reader can wake between the two, and on a slow
/// (e.g. nested, emulated) host they can be further apart than the coalescer's quiet period;
/// flushing the old end alone would make the guest remove and recreate instead of rename. A
/// rename out of the watched trees has no new end and delays its batch by this much.
const PAIR_WAIT: Duration = Duration::from_millis(20);
/// inotify read buffer (events are at most 16 + NAME_MAX + 1 bytes each).
const EVENT_BUFFER: usize = 64 * 1024;

const TOKEN_INOTIFY: u64 = 0;
const TOKEN_WAKE: u64 = 1;

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

/// One watched directory: which share, and where in it (`""` is the share root).
#[derive(Debug)]
struct WatchedDir {
    share: String,
    rel: String,
    wd: WatchDescriptor,
}

#[derive(Debug)]
struct WatchedShare {
    host_dir: PathBuf,
    dirs: usize,
}

/// Shares and the directory watches that serve them.
struct WatchState {
    watches: Watches,
    shares: BTreeMap<String, WatchedShare>,
    /// Keyed by watch descriptor id.
    dirs: HashMap<i32, WatchedDir>,
}

struct Shared {
    state: Mutex<WatchState>,
    counters: AtomicCounters,
    stop: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, WatchState> {
        // A panicking watcher thread must not take the VMM down with a poisoned lock.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
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

const WATCH_MASK: WatchMask = WatchMask::CREATE
    .union(WatchMask::MODIFY)
    .union(WatchMask::ATTRIB)
    .union(WatchMask::DELETE)
    .union(WatchMask::MOVED_FROM)
    .union(WatchMask::MOVED_TO)
    .union(WatchMask::DONT_FOLLOW)
    .union(WatchMask::ONLYDIR)
    .union(WatchMask::EXCL_UNLINK);

impl Watcher {
    /// Start the watcher threads. Batches go to the agent through the hybrid vsock socket at
    /// `uds_path`; every share is resynced at least every `resync_interval`.
    pub fn start(uds_path: &Path, resync_interval: Duration) -> Result<Watcher, WatchError> {
        let inotify = Inotify::init().map_err(WatchError::Inotify)?;
        let wake = EventFd::new(libc::EFD_NONBLOCK).map_err(WatchError::Wait)?;
        let epoll = Epoll::new().map_err(WatchError::Wait)?;
        for (fd, token) in [(inotify.as_raw_fd(), TOKEN_INOTIFY), (wake.as_raw_fd(), TOKEN_WAKE)] {
            epoll
                .ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, token))
                .map_err(WatchError::Wait)?;
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(WatchState {
                watches: inotify.watches(),
                shares: BTreeMap::new(),
                dirs: HashMap::new(),
            }),
            counters: AtomicCounters::default(),
            stop: AtomicBool::new(false),
        });
        let (outgoing, rx) = mpsc::channel();

        let mut watcher = Watcher { shared: shared.clone(), wake, outgoing: outgoing.clone(), threads: Vec::new() };
        let link = AgentLink { uds_path: uds_path.to_owned(), shared: shared.clone(), resync_interval };
        let thread = std::thread::Builder::new()
            .name("fs-watch-link".into())
            .spawn(move || link.run(rx))
            .map_err(|e| WatchError::Thread("fs-watch-link", e))?;
        watcher.threads.push(thread);
        let events = EventReader {
            inotify,
            epoll,
            shared,
            outgoing,
            coalescer: Coalescer::default(),
            moves: PendingMoves::default(),
        };
        let thread = std::thread::Builder::new()
            .name("fs-watch".into())
            .spawn(move || events.run())
            .map_err(|e| WatchError::Thread("fs-watch", e))?;
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
    watcher: Mutex<Option<Watcher>>,
}

impl ShareWatchers {
    /// `uds_path`: the VM's hybrid vsock socket, if it has a vsock device.
    pub fn new(uds_path: Option<PathBuf>, resync_interval: Duration) -> Self {
        ShareWatchers { uds_path, resync_interval, watcher: Mutex::new(None) }
    }

    fn lock(&self) -> MutexGuard<'_, Option<Watcher>> {
        self.watcher.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Watch share `name` at `host_dir`, starting the watcher if needed.
    pub fn watch(&self, name: &str, host_dir: &Path) -> Result<(), WatchError> {
        let uds_path = self.uds_path.as_deref().ok_or(WatchError::NoVsock)?;
        let mut watcher = self.lock();
        if watcher.is_none() {
            *watcher = Some(Watcher::start(uds_path, self.resync_interval)?);
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

fn join_rel(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_owned()
    } else {
        format!("{dir}/{name}")
    }
}

fn is_within(path: &str, root: &str) -> bool {
    root.is_empty() || path == root || path.strip_prefix(root).is_some_and(|rest| rest.starts_with('/'))
}

impl WatchState {
    fn watches_insert(&mut self, share: &str, rel: &str, wd: WatchDescriptor) {
        let id = wd.get_watch_descriptor_id();
        self.dirs.insert(id, WatchedDir { share: share.to_owned(), rel: rel.to_owned(), wd });
    }

    /// Add watches below `rel` of `share` (whose own watch exists), calling `created` for
    /// every entry found: it may have been created before its directory was watched.
    fn watch_tree(&mut self, share: &str, rel: &str, created: &mut dyn FnMut(String)) {
        let Some(host_dir) = self.shares.get(share).map(|s| s.host_dir.clone()) else {
            return;
        };
        let mut stack = vec![rel.to_owned()];
        while let Some(dir) = stack.pop() {
            let entries = match std::fs::read_dir(host_dir.join(&dir)) {
                Ok(entries) => entries,
                Err(e) => {
                    // Gone again already: its removal has its own event.
                    tracing::debug!(share, dir, error = %e, "cannot list a watched directory");
                    continue;
                }
            };
            for entry in entries.flatten() {
                let Some(child) = utf8_name(share, &entry.file_name()).map(|n| join_rel(&dir, n)) else {
                    continue;
                };
                created(child.clone());
                if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let dirs = self.shares.get(share).map_or(usize::MAX, |s| s.dirs);
                if dirs >= MAX_WATCHED_DIRS_PER_SHARE {
                    tracing::warn!(share, "too many directories to watch; deeper changes rely on resyncs");
                    continue;
                }
                match self.watches.add(host_dir.join(&child), WATCH_MASK) {
                    Ok(wd) => {
                        self.watches_insert(share, &child, wd);
                        if let Some(s) = self.shares.get_mut(share) {
                            s.dirs += 1;
                        }
                        stack.push(child);
                    }
                    Err(e) => tracing::debug!(share, dir = child, error = %e, "cannot watch a directory"),
                }
            }
        }
    }

    /// Drop the watches of `share` at or below `under` (everything when `None`).
    fn unwatch(&mut self, share: &str, under: Option<&str>) {
        let gone: Vec<i32> = self
            .dirs
            .iter()
            .filter(|(_, d)| d.share == share && under.is_none_or(|u| is_within(&d.rel, u)))
            .map(|(id, _)| *id)
            .collect();
        self.unwatch_ids(&gone);
    }

    /// The watches of `share` at or below `under`.
    fn watch_ids_below(&self, share: &str, under: &str) -> Vec<i32> {
        self.dirs.iter().filter(|(_, d)| d.share == share && is_within(&d.rel, under)).map(|(id, _)| *id).collect()
    }

    /// A watched tree moved from `from` to `to` within its share: the same watches (inotify
    /// follows the inodes) now report under the new path. Returns whether `to` itself is
    /// watched.
    fn move_watches(&mut self, ids: &[i32], from: &str, to: &str) -> bool {
        let mut top = false;
        for id in ids {
            let Some(dir) = self.dirs.get_mut(id) else {
                continue;
            };
            if let Some(rest) = dir.rel.strip_prefix(from).filter(|rest| rest.is_empty() || rest.starts_with('/')) {
                top |= rest.is_empty();
                dir.rel = format!("{to}{rest}");
            }
        }
        top
    }

    /// Drop the watches of a tree that moved away, unless they were found again under a new
    /// path meanwhile (a watch added on the same inode returns the same descriptor).
    fn unwatch_moved_away(&mut self, from: &MovedFrom) {
        let stale: Vec<i32> = from
            .watch_ids
            .iter()
            .copied()
            .filter(|id| self.dirs.get(id).is_some_and(|d| d.share == from.share && is_within(&d.rel, &from.path)))
            .collect();
        self.unwatch_ids(&stale);
    }

    /// Drop the watches `ids` (those still known).
    fn unwatch_ids(&mut self, ids: &[i32]) {
        for id in ids {
            if let Some(dir) = self.dirs.remove(id) {
                // Fails harmlessly when the kernel already dropped it (directory deleted).
                let _ = self.watches.remove(dir.wd);
                if let Some(s) = self.shares.get_mut(&dir.share) {
                    s.dirs = s.dirs.saturating_sub(1);
                }
            }
        }
    }
}

/// The old end of a rename (IN_MOVED_FROM) waiting for its new end (IN_MOVED_TO with the same
/// cookie). The burst waits up to [`PAIR_WAIT`] for it; a pending old end is dropped when the
/// burst is flushed (a rename out of the watched trees never gets a new end).
#[derive(Debug)]
struct MovedFrom {
    share: String,
    path: String,
    seen: Instant,
    /// The watches of a moved directory (and of its subdirectories): they follow the inodes,
    /// so they are renamed with a paired new end and dropped otherwise.
    watch_ids: Vec<i32>,
}

/// Old ends of renames by inotify cookie.
#[derive(Debug, Default)]
struct PendingMoves(HashMap<u32, MovedFrom>);

impl PendingMoves {
    /// Until when the burst waits for the new ends of pending renames.
    fn pair_deadline(&self) -> Option<Instant> {
        self.0.values().map(|from| from.seen + PAIR_WAIT).min()
    }

    /// Forget every unpaired old end; a moved-away directory's watches are dropped (they
    /// would keep reporting under the old path).
    fn expire(&mut self, state: &mut WatchState) {
        for (_, from) in self.0.drain() {
            state.unwatch_moved_away(&from);
        }
    }
}

fn utf8_name<'a>(share: &str, name: &'a OsStr) -> Option<&'a str> {
    let name = name.to_str();
    if name.is_none() {
        tracing::warn!(share, "ignoring a file name that is not UTF-8");
    }
    name
}

fn unix_now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// The `fs-watch` thread: inotify events in, coalesced batches out.
struct EventReader {
    inotify: Inotify,
    epoll: Epoll,
    shared: Arc<Shared>,
    outgoing: Sender<Outgoing>,
    coalescer: Coalescer,
    moves: PendingMoves,
}

impl EventReader {
    fn run(mut self) {
        let mut buffer = vec![0u8; EVENT_BUFFER];
        let mut ready = [EpollEvent::default(); 2];
        while !self.shared.stop.load(Ordering::SeqCst) {
            let timeout_ms = match self.flush_at() {
                None => -1,
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    // Round up: waking early would only spin.
                    i32::try_from(left.as_micros().div_ceil(1000)).unwrap_or(i32::MAX)
                }
            };
            if let Err(e) = self.epoll.wait(timeout_ms, &mut ready) {
                if e.kind() != ErrorKind::Interrupted {
                    tracing::error!(error = %e, "watcher wait failed; stopping the watcher");
                    return;
                }
            }
            self.drain_events(&mut buffer);
            let now = Instant::now();
            if self.coalescer.is_due(now) && self.moves.pair_deadline().is_none_or(|wait| now >= wait) {
                if !self.moves.0.is_empty() {
                    self.moves.expire(&mut self.shared.lock());
                }
                for batch in self.coalescer.take() {
                    let _ = self.outgoing.send(Outgoing::Batch(batch));
                }
            }
        }
    }

    /// When the pending burst is flushed: when the coalescer says so, but not while the old
    /// end of a rename may still be followed by its new end (see [`PAIR_WAIT`]).
    fn flush_at(&self) -> Option<Instant> {
        let due = self.coalescer.deadline()?;
        Some(self.moves.pair_deadline().map_or(due, |wait| due.max(wait)))
    }

    fn drain_events(&mut self, buffer: &mut [u8]) {
        loop {
            let events = match self.inotify.read_events(buffer) {
                Ok(events) => events,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read inotify events");
                    return;
                }
            };
            let now = Instant::now();
            let unix_ns = unix_now_ns();
            let mut state = self.shared.lock();
            let mut overflow = false;
            for event in events {
                if event.mask.contains(EventMask::Q_OVERFLOW) {
                    overflow = true;
                    continue;
                }
                handle_event(&mut state, &mut self.coalescer, &mut self.moves, &event, now, unix_ns);
            }
            if overflow {
                bump(&self.shared.counters.overflows, 1);
                tracing::warn!("inotify queue overflowed; resyncing every share");
                // Watches for directories created meanwhile may be missing: walk again.
                self.moves.expire(&mut state);
                let shares: Vec<String> = state.shares.keys().cloned().collect();
                for share in shares {
                    state.watch_tree(&share, "", &mut |_| {});
                }
                // The resync covers whatever was pending.
                let _ = self.coalescer.take();
                let _ = self.outgoing.send(Outgoing::ResyncAll);
            }
        }
    }
}

fn handle_event(
    state: &mut WatchState,
    coalescer: &mut Coalescer,
    moves: &mut PendingMoves,
    event: &inotify::Event<&OsStr>,
    now: Instant,
    unix_ns: u64,
) {
    let id = event.wd.get_watch_descriptor_id();
    if event.mask.contains(EventMask::IGNORED) {
        if let Some(dir) = state.dirs.remove(&id) {
            if let Some(s) = state.shares.get_mut(&dir.share) {
                s.dirs = s.dirs.saturating_sub(1);
            }
        }
        return;
    }
    let Some(dir) = state.dirs.get(&id) else {
        return;
    };
    // Events about the watched directory itself are reported by its parent's watch.
    let Some(name) = event.name else {
        return;
    };
    let share = dir.share.clone();
    let Some(path) = utf8_name(&share, name).map(|n| join_rel(&dir.rel, n)) else {
        return;
    };
    let mask = event.mask;
    let is_dir = mask.contains(EventMask::ISDIR);
    let push = |coalescer: &mut Coalescer, path: String, kind, from| {
        coalescer.push(&share, ChangeRecord { path, kind, from }, now, unix_ns);
    };
    if mask.contains(EventMask::MOVED_FROM) {
        // The old end gets a plain record (agents that do not pair still settle it); the new
        // end names it if it shows up. A directory's watches stay until then.
        push(coalescer, path.clone(), ChangeKind::Moved, None);
        let watch_ids = if is_dir { state.watch_ids_below(&share, &path) } else { Vec::new() };
        if let Some(stale) = moves.0.insert(event.cookie, MovedFrom { share: share.clone(), path, seen: now, watch_ids }) {
            state.unwatch_moved_away(&stale);
        }
        return;
    }
    if mask.contains(EventMask::MOVED_TO) {
        match moves.0.remove(&event.cookie) {
            Some(from) if from.share == share => {
                let watched = is_dir && state.move_watches(&from.watch_ids, &from.path, &path);
                push(coalescer, path.clone(), ChangeKind::Moved, Some(from.path));
                if watched || !is_dir {
                    return;
                }
                // The directory was not watched under its old name: watch it now.
            }
            Some(other) => {
                // Moved between shares: the new share's walk below watches it afresh.
                state.unwatch_moved_away(&other);
                push(coalescer, path.clone(), ChangeKind::Moved, None);
            }
            None => push(coalescer, path.clone(), ChangeKind::Moved, None),
        }
    } else {
        let kind = if mask.contains(EventMask::CREATE) {
            ChangeKind::Created
        } else if mask.contains(EventMask::DELETE) {
            ChangeKind::Removed
        } else {
            ChangeKind::Modified
        };
        push(coalescer, path.clone(), kind, None);
    }
    if is_dir && mask.intersects(EventMask::CREATE | EventMask::MOVED_TO) {
        let host = state.shares.get(&share).map(|s| s.host_dir.join(&path));
        match host.map(|h| state.watches.add(h, WATCH_MASK)) {
            Some(Ok(wd)) => {
                state.watches_insert(&share, &path, wd);
                if let Some(s) = state.shares.get_mut(&share) {
                    s.dirs += 1;
                }
                state.watch_tree(&share, &path, &mut |child| push(coalescer, child, ChangeKind::Created, None));
            }
            Some(Err(e)) => tracing::debug!(share, path, error = %e, "cannot watch a new directory"),
            None => {}
        }
    }
}

/// The `fs-watch-link` thread: the connection to the agent's watch port.
struct AgentLink {
    uds_path: PathBuf,
    shared: Arc<Shared>,
    resync_interval: Duration,
}

impl AgentLink {
    fn run(self, rx: Receiver<Outgoing>) {
        let mut conn: Option<UnixStream> = None;
        let mut seq = 0u64;
        let mut retry = FIRST_RETRY;
        let mut next_attempt = Instant::now();
        let mut next_resync = Instant::now() + self.resync_interval;
        loop {
            if self.shared.stop.load(Ordering::SeqCst) {
                return;
            }
            let now = Instant::now();
            if conn.is_none() && now >= next_attempt {
                match connect_watch_port(&self.uds_path) {
                    Ok(stream) => {
                        tracing::debug!("connected to the agent's watch port");
                        bump(&self.shared.counters.connects, 1);
                        retry = FIRST_RETRY;
                        seq = 0;
                        conn = Some(stream);
                        // Whatever happened while disconnected is unknown: compare everything.
                        self.resync_all(&mut conn, &mut seq);
                        next_resync = Instant::now() + self.resync_interval;
                    }
                    Err(e) => {
                        tracing::trace!(error = %e, "agent watch port not ready");
                        next_attempt = now + retry;
                        retry = (retry * 2).min(MAX_RETRY);
                    }
                }
            }
            let wake_at = if conn.is_none() { next_resync.min(next_attempt) } else { next_resync };
            let timeout = wake_at.saturating_duration_since(Instant::now());
            match rx.recv_timeout(timeout) {
                Ok(Outgoing::Stop) | Err(RecvTimeoutError::Disconnected) => return,
                Ok(Outgoing::Batch(batch)) => {
                    self.send(&mut conn, &mut seq, batch);
                }
                Ok(Outgoing::Resync(share)) => {
                    self.send(&mut conn, &mut seq, resync_batch(share));
                }
                Ok(Outgoing::ResyncAll) => self.resync_all(&mut conn, &mut seq),
                Err(RecvTimeoutError::Timeout) => {
                    if Instant::now() >= next_resync {
                        self.resync_all(&mut conn, &mut seq);
                        next_resync = Instant::now() + self.resync_interval;
                    }
                }
            }
            if conn.is_none() && next_attempt > Instant::now() + retry {
                next_attempt = Instant::now();
            }
        }
    }

    fn resync_all(&self, conn: &mut Option<UnixStream>, seq: &mut u64) {
        let shares: Vec<String> = self.shared.lock().shares.keys().cloned().collect();
        for share in shares {
            self.send(conn, seq, resync_batch(share));
        }
    }

    /// Send one batch; without a connection it is dropped (the resync after the next connect
    /// covers it). A failed send drops the connection.
    fn send(&self, conn: &mut Option<UnixStream>, seq: &mut u64, batch: PendingBatch) {
        let Some(stream) = conn.as_mut() else {
            return;
        };
        *seq += 1;
        let records = batch.records.len() as u64;
        let resync = batch.resync;
        let message = ChangeBatch {
            share: batch.share,
            seq: *seq,
            first_change_unix_ns: batch.first_change_unix_ns,
            resync,
            records: batch.records,
        };
        let counters = &self.shared.counters;
        match tern_protocol::send(stream, &message) {
            Ok(()) => {
                bump(&counters.batches_sent, 1);
                bump(&counters.records_sent, records);
                if resync {
                    bump(&counters.resyncs_sent, 1);
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "cannot send a change batch; reconnecting");
                bump(&counters.send_failures, 1);
                *conn = None;
            }
        }
    }
}

fn resync_batch(share: String) -> PendingBatch {
    PendingBatch { share, first_change_unix_ns: unix_now_ns(), resync: true, records: Vec::new() }
}

/// Open a stream to the agent's watch port through the hybrid vsock socket.
fn connect_watch_port(uds_path: &Path) -> std::io::Result<UnixStream> {
    let mut sock = UnixStream::connect(uds_path)?;
    sock.set_read_timeout(Some(LINK_IO_TIMEOUT))?;
    sock.set_write_timeout(Some(LINK_IO_TIMEOUT))?;
    sock.write_all(format!("CONNECT {AGENT_WATCH_PORT}\n").as_bytes())?;
    // Byte by byte: nothing after the newline is ours to consume.
    let mut line = Vec::with_capacity(16);
    let mut byte = [0u8; 1];
    loop {
        match sock.read(&mut byte) {
            Ok(0) => return Err(std::io::Error::new(ErrorKind::ConnectionRefused, "agent is not listening")),
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) if line.len() >= MAX_HANDSHAKE_LINE => {
                return Err(std::io::Error::new(ErrorKind::InvalidData, "vsock handshake reply too long"))
            }
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    if !line.starts_with(b"OK ") {
        return Err(std::io::Error::new(ErrorKind::InvalidData, "unexpected vsock handshake reply"));
    }
    Ok(sock)
}

#[cfg(test)]
#[path = "watcher_tests.rs"]
mod tests;
