//! Watchable mounts: a share presented to containers as a tmpfs mirror that follows the host,
//! so inotify fires inside the guest as it would on a plain host (virtio-fs alone never tells
//! the guest about host-side changes).
//!
//! A [`WatchableMount`] is a private tmpfs under [`mount::MIRRORS_ROOT`] filled from
//! `GUEST_SHARES_ROOT/<share>` and bind-mounted at the guest path. It is kept fresh by:
//! - change records from the VMM's watcher on [`tern_protocol::AGENT_WATCH_PORT`]
//!   ([`WatchMode::Events`]): each [`ChangeBatch`] names paths to re-read and settle; a
//!   `resync` batch, a gap in `seq` or an undecodable frame compares the whole share;
//! - a full rescan every [`POLL_INTERVAL`] in [`WatchMode::Poll`] (Kata's way, kept as a switch
//!   and as the benchmark baseline);
//! - in event mode, a slow full resync (default [`DEFAULT_RESYNC_INTERVAL`], `tern.watch_resync=
//!   <seconds>` on the kernel command line) as the safety net.
//!
//! One `mirror-sync` thread applies all work, so a mount is never settled twice at once; the
//! listener threads only queue it, merging what arrives while a sync runs. A mount that grows
//! past the limits becomes a bind mount of the share on top of the mirror (the mirror's files
//! are not removed first, so they never disappear), and stops being watched only once that
//! bind mount exists. See [`sync`] for the order in which changes are applied, and
//! [`retired`] for why the directory a `..data` swap retires stays readable for a moment (the
//! sync thread's timer removes it when its grace is over). A `..data` swap that had to wait for
//! its target to be complete is tried again on the same timer within milliseconds, backing off
//! to [`MAX_SWAP_RETRY`], not only at the next record or the periodic resync.

#[cfg(test)]
mod fuzzing;
mod mount;
mod moves;
mod pending;
mod retired;
mod sync;
mod tree;

use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tern_sync::{CondvarExt, LockExt};

use tern_protocol::watch::{is_safe_relative_path, ChangeBatch, DEFAULT_RESYNC_INTERVAL, POLL_INTERVAL};
use tern_protocol::{recv, MountRequest, ProtocolError, WatchMode, WatchStageSample, GUEST_SHARES_ROOT};
use tracing::{debug, info, warn};

use crate::transport::{Connection, Listener};
use mount::MountError;
use pending::{merge_batch, PendingWork};
use retired::Retired;
use sync::{sync_mirror, Hints, Scope, SyncError, SyncOutcome};
use tree::Snapshot;

/// Longest the sync thread sleeps between checks of the poll, resync and retire timers.
const MAX_TIMER_SLEEP: Duration = Duration::from_secs(1);
/// First wait before a deferred `..data` swap is tried again.
const FIRST_SWAP_RETRY: Duration = Duration::from_millis(2);
/// Longest wait between tries of a deferred `..data` swap.
const MAX_SWAP_RETRY: Duration = Duration::from_secs(1);

/// Errors creating or removing a watchable mount.
#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    #[error("invalid watchable mount request: {0}")]
    InvalidRequest(String),
    #[error("share directory {} is not there", path.display())]
    ShareMissing {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} is already a watchable mount")]
    AlreadyMounted(String),
    #[error("{0} is not a watchable mount")]
    NotMounted(String),
    #[error("cannot set up the mounts of the mirror")]
    Mount(#[from] MountError),
    #[error("cannot fill the mirror")]
    Sync(#[from] SyncError),
}

/// How the guest path is presented right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Presentation {
    /// The tmpfs mirror, kept in sync.
    Mirror,
    /// The share grew past a limit: a bind mount of the share sits at the guest path.
    BindFallback,
}

#[derive(Debug)]
struct MirrorInner {
    state: Snapshot,
    /// Directories `..data` stopped publishing, kept for their grace.
    retired: Retired,
    presentation: Presentation,
    /// Mounts stacked at the guest path (the mirror's bind, then maybe the fallback).
    layers: u8,
    last_full_sync: Instant,
    /// `..data` swaps the last sync left waiting for their target to be complete: retried on
    /// a short timer, not only at the next record or the periodic resync.
    swap_retry: Option<SwapRetry>,
}

/// A pending retry of deferred `..data` swaps.
#[derive(Debug)]
struct SwapRetry {
    at: Instant,
    /// The wait before this retry (doubled, up to [`MAX_SWAP_RETRY`], while swaps stay deferred).
    wait: Duration,
    links: BTreeSet<String>,
}

impl SwapRetry {
    /// The retry a sync that left `deferred` entries calls for at `now`: none unless a `..data`
    /// link is among them; the wait doubles while the previous retry's swaps stay deferred.
    fn after(previous: Option<&SwapRetry>, deferred: &BTreeSet<String>, now: Instant) -> Option<SwapRetry> {
        let links: BTreeSet<String> = deferred.iter().filter(|p| sync::is_data_link(p)).cloned().collect();
        if links.is_empty() {
            return None;
        }
        let wait = previous.map_or(FIRST_SWAP_RETRY, |r| (r.wait * 2).min(MAX_SWAP_RETRY));
        Some(SwapRetry { at: now + wait, wait, links })
    }
}

/// One watchable mount: a share mirrored into a tmpfs shown at `guest_path`.
#[derive(Debug)]
pub struct WatchableMount {
    share: String,
    share_root: PathBuf,
    guest_path: PathBuf,
    staging: PathBuf,
    read_only: bool,
    mode: WatchMode,
    inner: Mutex<MirrorInner>,
}

impl WatchableMount {
    /// Bring the mirror up to date; never fails (problems are logged and retried later).
    fn settle(&self, scope: Scope<'_>) {
        let mut inner = self.inner.lock_unpoisoned();
        self.settle_locked(&mut inner, scope);
    }

    /// Apply the renames the watcher paired, then settle what `hints` names.
    fn settle_changes(&self, hints: &Hints, renames: &[moves::Rename]) {
        let mut inner = self.inner.lock_unpoisoned();
        if !renames.is_empty() && inner.presentation == Presentation::Mirror {
            let done = moves::apply_renames(&self.share_root, &self.staging, &mut inner.state, renames);
            if !done.is_empty() {
                debug!(guest_path = %self.guest_path.display(), renames = ?done, "renamed in the mirror");
            }
        }
        self.settle_locked(&mut inner, Scope::Paths(hints));
    }

    fn settle_locked(&self, inner: &mut MirrorInner, scope: Scope<'_>) {
        if inner.presentation == Presentation::BindFallback {
            return;
        }
        if matches!(scope, Scope::Full) {
            inner.last_full_sync = Instant::now();
            crate::stats::watch::resynced();
        }
        match sync_mirror(&self.share_root, &self.staging, &mut inner.state, &mut inner.retired, scope) {
            Ok(SyncOutcome::Synced(report)) => {
                inner.swap_retry = SwapRetry::after(inner.swap_retry.as_ref(), &report.deferred, Instant::now());
                if !report.ops.is_empty() || !report.deferred.is_empty() {
                    debug!(guest_path = %self.guest_path.display(), ops = ?report.ops, deferred = ?report.deferred, "mirror settled");
                }
            }
            Ok(SyncOutcome::OverLimit(limit)) => self.fall_back(inner, &limit),
            Err(e) => {
                warn!(guest_path = %self.guest_path.display(), error = %error_chain(&e), "cannot sync the mirror")
            }
        }
    }

    /// Put a bind mount of the share on top of the mirror. The mirror's files stay until the
    /// bind mount covers them; the mount is marked unwatched only once the bind succeeded.
    fn fall_back(&self, inner: &mut MirrorInner, limit: &tree::LimitExceeded) {
        info!(guest_path = %self.guest_path.display(), share = self.share, %limit, "share outgrew its watchable mount; binding the share instead");
        match mount::bind(&self.share_root, &self.guest_path, self.read_only, "the share (watch fallback)") {
            Ok(()) => {
                crate::stats::watch::bind_fallback();
                inner.layers += 1;
                inner.presentation = Presentation::BindFallback;
            }
            Err(e) => {
                warn!(guest_path = %self.guest_path.display(), error = %error_chain(&e), "bind fallback failed; will retry")
            }
        }
    }

    /// Try the deferred `..data` swaps again (their links are settled afresh, which rescans
    /// what they publish).
    fn retry_swaps(&self) {
        let mut inner = self.inner.lock_unpoisoned();
        let Some(retry) = inner.swap_retry.as_ref() else {
            return;
        };
        let hints = Hints { paths: retry.links.clone(), ..Hints::default() };
        self.settle_locked(&mut inner, Scope::Paths(&hints));
    }

    /// When is a deferred `..data` swap to be tried again?
    fn swap_retry_due_in(&self) -> Option<Duration> {
        let inner = self.inner.lock_unpoisoned();
        if inner.presentation == Presentation::BindFallback {
            return None;
        }
        inner.swap_retry.as_ref().map(|r| r.at.saturating_duration_since(Instant::now()))
    }

    /// Remove the retired directories whose grace is over.
    fn remove_retired(&self) {
        let mut inner = self.inner.lock_unpoisoned();
        let inner = &mut *inner;
        if inner.presentation == Presentation::BindFallback {
            return;
        }
        let report = sync::remove_expired(&self.share_root, &self.staging, &mut inner.state, &mut inner.retired);
        if !report.ops.is_empty() || !report.deferred.is_empty() {
            debug!(guest_path = %self.guest_path.display(), ops = ?report.ops, deferred = ?report.deferred, "retired directories removed");
        }
    }

    /// When are retired directories due for removal (none while the share is bound instead)?
    fn retired_due_in(&self) -> Option<Duration> {
        let inner = self.inner.lock_unpoisoned();
        if inner.presentation == Presentation::BindFallback {
            return None;
        }
        inner.retired.next_expiry().map(|at| at.saturating_duration_since(Instant::now()))
    }

    /// Is a periodic full sync due (poll interval or safety-net resync)?
    fn full_sync_due_in(&self, resync: Duration) -> Option<Duration> {
        let inner = self.inner.lock_unpoisoned();
        if inner.presentation == Presentation::BindFallback {
            return None;
        }
        let interval = match self.mode {
            WatchMode::Poll => POLL_INTERVAL,
            WatchMode::Events => resync,
        };
        Some((inner.last_full_sync + interval).saturating_duration_since(Instant::now()))
    }
}

struct Registry {
    mounts: Mutex<Vec<Arc<WatchableMount>>>,
    work: Mutex<PendingWork>,
    wake: Condvar,
    resync_secs: AtomicU64,
    next_id: AtomicU64,
}

fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    static SYNC_THREAD: OnceLock<()> = OnceLock::new();
    let registry = REGISTRY.get_or_init(|| Registry {
        mounts: Mutex::new(Vec::new()),
        work: Mutex::new(PendingWork::default()),
        wake: Condvar::new(),
        resync_secs: AtomicU64::new(DEFAULT_RESYNC_INTERVAL.as_secs()),
        next_id: AtomicU64::new(0),
    });
    SYNC_THREAD.get_or_init(|| {
        if let Err(e) = std::thread::Builder::new().name("mirror-sync".into()).spawn(run_sync_thread) {
            warn!(error = %e, "cannot start the mirror sync thread; watchable mounts stay as first filled");
        }
    });
    registry
}

/// Set the safety-net resync interval of event-mode mounts.
pub fn set_resync_interval(interval: Duration) {
    registry().resync_secs.store(interval.as_secs().max(1), Ordering::Relaxed);
}

/// `tern.watch_resync=<seconds>` from the kernel command line.
pub fn resync_interval_from_cmdline(cmdline: &str) -> Option<Duration> {
    cmdline
        .split_whitespace()
        .filter_map(|arg| arg.strip_prefix("tern.watch_resync="))
        .next_back()
        .and_then(|secs| secs.parse::<u64>().ok())
        .filter(|secs| *secs > 0)
        .map(Duration::from_secs)
}

fn validate(req: &MountRequest) -> Result<PathBuf, MirrorError> {
    if req.share.contains('/') || !is_safe_relative_path(&req.share) {
        return Err(MirrorError::InvalidRequest(format!("share name {:?}", req.share)));
    }
    let guest_path = PathBuf::from(&req.guest_path);
    let normal = guest_path.is_absolute()
        && guest_path.components().all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
    if !normal || guest_path == Path::new("/") {
        return Err(MirrorError::InvalidRequest(format!("guest path {:?}", req.guest_path)));
    }
    Ok(guest_path)
}

/// Present share `req.share` at `req.guest_path` as a watchable mirror (or, if the share is
/// already past the limits, as a bind mount of the share).
pub fn mount_watchable(req: &MountRequest) -> Result<(), MirrorError> {
    let guest_path = validate(req)?;
    let registry = registry();
    let share_root = Path::new(GUEST_SHARES_ROOT).join(&req.share);
    match std::fs::metadata(&share_root) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => {
            let source = std::io::Error::from(std::io::ErrorKind::NotADirectory);
            return Err(MirrorError::ShareMissing { path: share_root, source });
        }
        Err(source) => return Err(MirrorError::ShareMissing { path: share_root, source }),
    }
    let id = registry.next_id.fetch_add(1, Ordering::Relaxed);
    let staging = Path::new(mount::MIRRORS_ROOT).join(format!("m{id}"));
    let entry = Arc::new(WatchableMount {
        share: req.share.clone(),
        share_root,
        guest_path: guest_path.clone(),
        staging: staging.clone(),
        read_only: req.read_only,
        mode: req.watch_mode,
        inner: Mutex::new(MirrorInner {
            state: Snapshot::new(),
            retired: Retired::default(),
            presentation: Presentation::Mirror,
            layers: 0,
            last_full_sync: Instant::now(),
            swap_retry: None,
        }),
    });
    // Registered (and locked) before the first fill, so a batch arriving meanwhile is applied
    // right after it instead of being lost.
    let mut inner = entry.inner.lock_unpoisoned();
    {
        let mut mounts = registry.mounts.lock_unpoisoned();
        if mounts.iter().any(|m| m.guest_path == guest_path) {
            return Err(MirrorError::AlreadyMounted(req.guest_path.clone()));
        }
        mounts.push(entry.clone());
    }
    let filled = fill(&entry, &mut inner);
    if let Err(e) = filled {
        registry.mounts.lock_unpoisoned().retain(|m| !Arc::ptr_eq(m, &entry));
        let _ = mount::unmount(&staging);
        let _ = std::fs::remove_dir(&staging);
        return Err(e);
    }
    info!(share = req.share, guest_path = req.guest_path, mode = ?req.watch_mode, presentation = ?inner.presentation, "watchable mount ready");
    Ok(())
}

/// Mount the tmpfs, copy the share, then show the mirror at the guest path.
fn fill(entry: &WatchableMount, inner: &mut MirrorInner) -> Result<(), MirrorError> {
    mount::mount_tmpfs(&entry.staging)?;
    inner.last_full_sync = Instant::now();
    match sync_mirror(&entry.share_root, &entry.staging, &mut inner.state, &mut inner.retired, Scope::Full)? {
        SyncOutcome::Synced(_) => {
            mount::bind(&entry.staging, &entry.guest_path, entry.read_only, "the mirror")?;
            inner.layers = 1;
        }
        SyncOutcome::OverLimit(limit) => {
            info!(share = entry.share, %limit, "share is past the watchable limits; binding it instead");
            mount::bind(&entry.share_root, &entry.guest_path, entry.read_only, "the share (watch fallback)")?;
            crate::stats::watch::bind_fallback();
            inner.layers = 1;
            inner.presentation = Presentation::BindFallback;
        }
    }
    Ok(())
}

/// How many watchable mounts exist (for the agent's statistics).
pub fn watched_mounts() -> usize {
    registry().mounts.lock_unpoisoned().len()
}

/// Undo [`mount_watchable`] at `guest_path`.
pub fn unmount_watchable(guest_path: &str) -> Result<(), MirrorError> {
    let registry = registry();
    let entry = {
        let mut mounts = registry.mounts.lock_unpoisoned();
        let at = mounts
            .iter()
            .position(|m| m.guest_path == Path::new(guest_path))
            .ok_or_else(|| MirrorError::NotMounted(guest_path.to_owned()))?;
        mounts.remove(at)
    };
    let mut inner = entry.inner.lock_unpoisoned();
    while inner.layers > 0 {
        mount::unmount(&entry.guest_path)?;
        inner.layers -= 1;
    }
    mount::unmount(&entry.staging)?;
    let _ = std::fs::remove_dir(&entry.staging);
    Ok(())
}

/// Accept change-record streams from the VMM on `listener` (on a thread of its own).
pub fn start_watch_listener(listener: Listener) -> std::io::Result<()> {
    let _ = registry();
    std::thread::Builder::new()
        .name("watch-accept".into())
        .spawn(move || crate::server::accept_loop(listener, "watch", handle_watch_connection))?;
    Ok(())
}

/// Read batches from one watcher connection until it closes, queueing their work.
pub fn handle_watch_connection(mut conn: Connection) {
    let mut last_seq: Option<u64> = None;
    loop {
        match recv::<ChangeBatch, _>(&mut conn) {
            Ok(batch) => {
                let gap = last_seq.is_some_and(|last| batch.seq != last.wrapping_add(1));
                last_seq = Some(batch.seq);
                queue_batch(batch, gap);
            }
            Err(ProtocolError::Closed) => return,
            Err(ProtocolError::Decode(e)) => {
                // The frame boundary held but a batch is lost: compare everything.
                warn!(error = %e, "undecodable change batch; resyncing every mount");
                queue_resync_all();
            }
            Err(e) => {
                debug!(error = %e, "watch connection ended");
                return;
            }
        }
    }
}

fn queue_resync_all() {
    let registry = registry();
    registry.work.lock_unpoisoned().resync_all = true;
    registry.wake.notify_one();
}

fn queue_batch(batch: ChangeBatch, gap: bool) {
    let receipt_mono_ns = crate::stats::watch::mono_ns();
    crate::stats::watch::batch_received(batch.records.len(), batch.first_change_unix_ns);
    let registry = registry();
    if gap {
        warn!(seq = batch.seq, "gap in change batches; resyncing every mount");
    }
    merge_batch(&mut registry.work.lock_unpoisoned(), batch, gap, receipt_mono_ns);
    registry.wake.notify_one();
}

/// The `mirror-sync` thread: applies queued work and runs the poll, resync and retire timers.
fn run_sync_thread() {
    let registry = registry();
    loop {
        let work = {
            let mut work = registry.work.lock_unpoisoned();
            if !work.resync_all && work.shares.is_empty() {
                let sleep = next_timer(registry);
                work = registry.wake.wait_timeout_unpoisoned(work, sleep).0;
            }
            std::mem::take(&mut *work)
        };
        let mounts: Vec<Arc<WatchableMount>> = registry.mounts.lock_unpoisoned().clone();
        for m in mounts.iter().filter(|m| m.mode == WatchMode::Events) {
            let share = work.shares.get(&m.share);
            let apply_start_mono_ns = crate::stats::watch::mono_ns();
            if work.resync_all || share.is_some_and(|s| s.resync) {
                m.settle(Scope::Full);
            } else if let Some(share) = share {
                m.settle_changes(&share.hints, &share.renames);
            }
            if let Some(share) = share {
                let applied_mono_ns = crate::stats::watch::mono_ns();
                for sample in &share.received {
                    crate::stats::watch::batch_applied(WatchStageSample {
                        apply_start_mono_ns,
                        applied_mono_ns,
                        ..sample.clone()
                    });
                }
            }
        }
        if !work.shares.is_empty() {
            crate::stats::watch::applied_pending(work.shares.values().map(|s| s.hints.paths.len()).sum());
        }
        let resync = Duration::from_secs(registry.resync_secs.load(Ordering::Relaxed));
        for m in &mounts {
            if m.full_sync_due_in(resync).is_some_and(|left| left.is_zero()) {
                m.settle(Scope::Full);
            }
            if m.retired_due_in().is_some_and(|left| left.is_zero()) {
                m.remove_retired();
            }
            if m.swap_retry_due_in().is_some_and(|left| left.is_zero()) {
                m.retry_swaps();
            }
        }
    }
}

/// How long until the next poll, resync or retired directory's removal is due (at most
/// [`MAX_TIMER_SLEEP`]).
fn next_timer(registry: &Registry) -> Duration {
    let resync = Duration::from_secs(registry.resync_secs.load(Ordering::Relaxed));
    let mounts: Vec<Arc<WatchableMount>> = registry.mounts.lock_unpoisoned().clone();
    mounts
        .iter()
        .flat_map(|m| [m.full_sync_due_in(resync), m.retired_due_in(), m.swap_retry_due_in()])
        .flatten()
        .min()
        .unwrap_or(MAX_TIMER_SLEEP)
        .min(MAX_TIMER_SLEEP)
}

use tern_protocol::error_chain;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resync_interval_comes_from_the_cmdline() {
        assert_eq!(resync_interval_from_cmdline("quiet tern.watch_resync=5"), Some(Duration::from_secs(5)));
        assert_eq!(resync_interval_from_cmdline("tern.watch_resync=0"), None);
        assert_eq!(resync_interval_from_cmdline("quiet"), None);
    }

    #[test]
    fn a_deferred_data_swap_is_retried_within_milliseconds_backing_off() {
        let now = Instant::now();
        let deferred = |paths: &[&str]| paths.iter().map(|p| p.to_string()).collect::<BTreeSet<String>>();
        // Entries waiting for a record are not retried on a timer.
        assert!(SwapRetry::after(None, &deferred(&["gone", "d/f"]), now).is_none());
        let first = SwapRetry::after(None, &deferred(&["..data", "f"]), now).unwrap();
        assert_eq!((first.at, first.wait), (now + FIRST_SWAP_RETRY, FIRST_SWAP_RETRY));
        assert_eq!(first.links, deferred(&["..data"]));
        let mut retry = first;
        for _ in 0..20 {
            retry = SwapRetry::after(Some(&retry), &deferred(&["sub/..data"]), now).unwrap();
        }
        assert_eq!(retry.wait, MAX_SWAP_RETRY);
        // Once the swap happened, no more retries.
        assert!(SwapRetry::after(Some(&retry), &deferred(&[]), now).is_none());
    }

    #[test]
    fn requests_are_validated() {
        let ok =
            MountRequest { share: "s".into(), guest_path: "/etc/secret".into(), watchable: true, ..Default::default() };
        assert!(validate(&ok).is_ok());
        for (share, path) in [("../s", "/x"), ("a/b", "/x"), ("", "/x"), ("s", "rel"), ("s", "/a/../b"), ("s", "/")] {
            let req = MountRequest { share: share.into(), guest_path: path.into(), ..Default::default() };
            assert!(matches!(validate(&req), Err(MirrorError::InvalidRequest(_))), "{share:?} {path:?}");
        }
    }
}
