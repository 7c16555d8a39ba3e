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

mod mount;
mod moves;
mod retired;
mod sync;
mod tree;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use tern_protocol::watch::{
    is_safe_relative_path, ChangeBatch, ChangeKind, DEFAULT_RESYNC_INTERVAL, MAX_RECORDS_PER_BATCH, POLL_INTERVAL,
};
use tern_protocol::{
    recv, MountRequest, ProtocolError, WatchMode, WatchStageSample, GUEST_SHARES_ROOT, MAX_WATCH_STAGE_SAMPLES,
};
use tracing::{debug, info, warn};

use crate::transport::{Connection, Listener};
use mount::MountError;
use retired::Retired;
use sync::{sync_mirror, Hints, Scope, SyncError, SyncOutcome};
use tree::Snapshot;

/// Longest the sync thread sleeps between checks of the poll, resync and retire timers.
const MAX_TIMER_SLEEP: Duration = Duration::from_secs(1);
/// First wait before a deferred `..data` swap is tried again.
const FIRST_SWAP_RETRY: Duration = Duration::from_millis(2);
/// Longest wait between tries of a deferred `..data` swap.
const MAX_SWAP_RETRY: Duration = Duration::from_secs(1);
/// Most distinct paths queued for one share before the work becomes a full resync.
const MAX_QUEUED_PATHS: usize = 4 * MAX_RECORDS_PER_BATCH;

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

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic in one sync must not stop every later one.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl WatchableMount {
    /// Bring the mirror up to date; never fails (problems are logged and retried later).
    fn settle(&self, scope: Scope<'_>) {
        let mut inner = lock(&self.inner);
        self.settle_locked(&mut inner, scope);
    }

    /// Apply the renames the watcher paired, then settle what `hints` names.
    fn settle_changes(&self, hints: &Hints, renames: &[moves::Rename]) {
        let mut inner = lock(&self.inner);
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
        let mut inner = lock(&self.inner);
        let Some(retry) = inner.swap_retry.as_ref() else {
            return;
        };
        let hints = Hints { paths: retry.links.clone(), removed: BTreeSet::new() };
        self.settle_locked(&mut inner, Scope::Paths(&hints));
    }

    /// When is a deferred `..data` swap to be tried again?
    fn swap_retry_due_in(&self) -> Option<Duration> {
        let inner = lock(&self.inner);
        if inner.presentation == Presentation::BindFallback {
            return None;
        }
        inner.swap_retry.as_ref().map(|r| r.at.saturating_duration_since(Instant::now()))
    }

    /// Remove the retired directories whose grace is over.
    fn remove_retired(&self) {
        let mut inner = lock(&self.inner);
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
        let inner = lock(&self.inner);
        if inner.presentation == Presentation::BindFallback {
            return None;
        }
        inner.retired.next_expiry().map(|at| at.saturating_duration_since(Instant::now()))
    }

    /// Is a periodic full sync due (poll interval or safety-net resync)?
    fn full_sync_due_in(&self, resync: Duration) -> Option<Duration> {
        let inner = lock(&self.inner);
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

/// Work queued by the listeners for the sync thread.
#[derive(Debug, Default)]
struct PendingWork {
    resync_all: bool,
    shares: BTreeMap<String, ShareWork>,
}

#[derive(Debug, Default)]
struct ShareWork {
    resync: bool,
    /// The paths to settle, and those whose records said removed or renamed away.
    hints: Hints,
    /// Renames whose both ends the watcher saw, in the order seen (applied before `paths`
    /// are settled).
    renames: Vec<moves::Rename>,
    /// The stage stamps of the batches merged here, reported once they are applied.
    received: Vec<WatchStageSample>,
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
    let mut inner = lock(&entry.inner);
    {
        let mut mounts = lock(&registry.mounts);
        if mounts.iter().any(|m| m.guest_path == guest_path) {
            return Err(MirrorError::AlreadyMounted(req.guest_path.clone()));
        }
        mounts.push(entry.clone());
    }
    let filled = fill(&entry, &mut inner);
    if let Err(e) = filled {
        lock(&registry.mounts).retain(|m| !Arc::ptr_eq(m, &entry));
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
    lock(&registry().mounts).len()
}

/// Undo [`mount_watchable`] at `guest_path`.
pub fn unmount_watchable(guest_path: &str) -> Result<(), MirrorError> {
    let registry = registry();
    let entry = {
        let mut mounts = lock(&registry.mounts);
        let at = mounts
            .iter()
            .position(|m| m.guest_path == Path::new(guest_path))
            .ok_or_else(|| MirrorError::NotMounted(guest_path.to_owned()))?;
        mounts.remove(at)
    };
    let mut inner = lock(&entry.inner);
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
    lock(&registry.work).resync_all = true;
    registry.wake.notify_one();
}

fn queue_batch(batch: ChangeBatch, gap: bool) {
    let receipt_mono_ns = crate::stats::watch::mono_ns();
    crate::stats::watch::batch_received(batch.records.len(), batch.first_change_unix_ns);
    let registry = registry();
    if gap {
        warn!(seq = batch.seq, "gap in change batches; resyncing every mount");
    }
    merge_batch(&mut lock(&registry.work), batch, gap, receipt_mono_ns);
    registry.wake.notify_one();
}

/// Add a batch's work to what is queued: records become paths to settle; a resync, an
/// unsafe path or too many paths become a full compare of the share.
fn merge_batch(work: &mut PendingWork, batch: ChangeBatch, gap: bool, receipt_mono_ns: u64) {
    work.resync_all |= gap;
    if batch.share.contains('/') || !is_safe_relative_path(&batch.share) {
        warn!(share = batch.share, "change batch for an invalid share name; ignored");
        return;
    }
    let share = work.shares.entry(batch.share).or_default();
    if share.received.len() < MAX_WATCH_STAGE_SAMPLES {
        share.received.push(WatchStageSample {
            seq: batch.seq,
            read_to_flush_ns: batch.flush_unix_ns.saturating_sub(batch.first_change_unix_ns),
            flush_to_send_ns: batch.send_unix_ns.saturating_sub(batch.flush_unix_ns),
            send_unix_ns: batch.send_unix_ns,
            receipt_mono_ns,
            ..WatchStageSample::default()
        });
    }
    share.resync |= batch.resync;
    for record in batch.records {
        let from_is_safe = record.from.as_deref().is_none_or(is_safe_relative_path);
        if !is_safe_relative_path(&record.path) || !from_is_safe {
            // Refused, but the change it stood for must not be lost.
            warn!(path = record.path, from = record.from, "change record with an unsafe path; resyncing the share");
            share.resync = true;
            continue;
        }
        if let Some(from) = record.from {
            // The old path is settled too (its own record may have been coalesced away).
            share.hints.paths.insert(from.clone());
            share.hints.removed.insert(from.clone());
            share.renames.push(moves::Rename { from, to: record.path.clone() });
        }
        if matches!(record.kind, ChangeKind::Removed | ChangeKind::Moved) {
            share.hints.removed.insert(record.path.clone());
        }
        share.hints.paths.insert(record.path);
    }
    if share.hints.paths.len() > MAX_QUEUED_PATHS || share.renames.len() > MAX_QUEUED_PATHS {
        share.resync = true;
    }
    if share.resync {
        share.hints = Hints::default();
        share.renames.clear();
    }
}

/// The `mirror-sync` thread: applies queued work and runs the poll, resync and retire timers.
fn run_sync_thread() {
    let registry = registry();
    loop {
        let work = {
            let mut work = lock(&registry.work);
            if !work.resync_all && work.shares.is_empty() {
                let sleep = next_timer(registry);
                work = registry
                    .wake
                    .wait_timeout(work, sleep)
                    .map(|(guard, _)| guard)
                    .unwrap_or_else(|poisoned| poisoned.into_inner().0);
            }
            std::mem::take(&mut *work)
        };
        let mounts: Vec<Arc<WatchableMount>> = lock(&registry.mounts).clone();
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
    let mounts: Vec<Arc<WatchableMount>> = lock(&registry.mounts).clone();
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

    #[test]
    fn batches_are_merged_and_unsafe_paths_force_a_resync() {
        use tern_protocol::watch::{ChangeKind, ChangeRecord};
        let batch = |share: &str, paths: &[&str], resync| ChangeBatch {
            share: share.into(),
            seq: 1,
            first_change_unix_ns: 0,
            flush_unix_ns: 0,
            send_unix_ns: 0,
            resync,
            records: paths
                .iter()
                .map(|p| ChangeRecord { path: p.to_string(), kind: ChangeKind::Created, from: None })
                .collect(),
        };
        let mut work = PendingWork::default();
        merge_batch(&mut work, batch("s", &["a", "b"], false), false, 0);
        merge_batch(&mut work, batch("s", &["b", "c/d"], false), false, 0);
        let paths: Vec<&str> = work.shares["s"].hints.paths.iter().map(String::as_str).collect();
        assert_eq!(paths, ["a", "b", "c/d"]);
        // Created records allow no removal; a Removed one does.
        assert!(work.shares["s"].hints.removed.is_empty());
        let mut removal = batch("s", &["gone"], false);
        removal.records[0].kind = ChangeKind::Removed;
        merge_batch(&mut work, removal, false, 0);
        assert_eq!(work.shares["s"].hints.removed.iter().map(String::as_str).collect::<Vec<_>>(), ["gone"]);
        assert!(!work.resync_all);

        merge_batch(&mut work, batch("t", &["ok", "../etc/passwd"], false), false, 0);
        assert!(work.shares["t"].resync && work.shares["t"].hints.paths.is_empty());
        merge_batch(&mut work, batch("../x", &["a"], false), true, 0);
        assert!(work.resync_all);
        assert!(!work.shares.contains_key("../x"));
    }

    #[test]
    fn paired_renames_are_queued_and_unsafe_old_paths_force_a_resync() {
        use tern_protocol::watch::{ChangeKind, ChangeRecord};
        let batch = |from: &str| ChangeBatch {
            share: "s".into(),
            seq: 1,
            first_change_unix_ns: 0,
            flush_unix_ns: 0,
            send_unix_ns: 0,
            resync: false,
            records: vec![ChangeRecord { path: "g".into(), kind: ChangeKind::Moved, from: Some(from.into()) }],
        };
        let mut work = PendingWork::default();
        merge_batch(&mut work, batch("f"), false, 0);
        let queued = &work.shares["s"];
        assert_eq!(queued.hints.paths.iter().map(String::as_str).collect::<Vec<_>>(), ["f", "g"]);
        // Both ends of the rename may be removed from the mirror when the share lacks them.
        assert_eq!(queued.hints.removed.iter().map(String::as_str).collect::<Vec<_>>(), ["f", "g"]);
        assert_eq!(queued.renames, [moves::Rename { from: "f".into(), to: "g".into() }]);
        merge_batch(&mut work, batch("../etc/passwd"), false, 0);
        let queued = &work.shares["s"];
        assert!(queued.resync && queued.hints.paths.is_empty() && queued.renames.is_empty());
    }
}
