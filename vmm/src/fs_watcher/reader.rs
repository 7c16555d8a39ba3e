//! The event reader (the `tern-fs-watch` thread): inotify events in, coalesced batches out.

use std::ffi::OsStr;
use std::io::ErrorKind;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use inotify::{EventMask, Inotify};
use tern_change_records::{ChangeKind, ChangeRecord};
use vmm_sys_util::epoll::{Epoll, EpollEvent};
use vmm_sys_util::timerfd::TimerFd;

use super::coalesce::{Coalescer, PendingBatch};
use super::moves::{MovedFrom, PendingMoves};
use super::tree::{join_rel, utf8_name, WatchState, WATCH_MASK};
use super::{bump, unix_now_ns, Outgoing, Shared};

/// inotify read buffer (events are at most 16 + NAME_MAX + 1 bytes each).
const EVENT_BUFFER: usize = 64 * 1024;

/// The `tern-fs-watch` thread: inotify events in, coalesced batches out.
pub(super) struct EventReader {
    pub(super) inotify: Inotify,
    pub(super) epoll: Epoll,
    pub(super) shared: Arc<Shared>,
    pub(super) outgoing: Sender<Outgoing>,
    pub(super) coalescer: Coalescer,
    pub(super) moves: PendingMoves,
    /// Wakes the wait when the pending burst is due (re-arming it also clears its expirations,
    /// so it is never read).
    pub(super) timer: TimerFd,
}

impl EventReader {
    pub(super) fn run(mut self) {
        let mut buffer = vec![0u8; EVENT_BUFFER];
        let mut ready = [EpollEvent::default(); 3];
        while !self.shared.stop.load(Ordering::SeqCst) {
            let timeout_ms = self.arm_flush_timer();
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
                let flush_unix_ns = unix_now_ns();
                for batch in self.coalescer.take() {
                    let _ = self.outgoing.send(Outgoing::Batch(PendingBatch { flush_unix_ns, ..batch }));
                }
            }
        }
    }

    /// Arm the flush timer for the pending burst (disarm it when nothing is pending) and return
    /// the epoll timeout: none, since the timer wakes the wait to the nanosecond; epoll's own
    /// timeout, in whole milliseconds, would add up to 1 ms to every batch on top of the quiet
    /// period. Only if the timer cannot be set does the wait fall back to it.
    fn arm_flush_timer(&mut self) -> i32 {
        let deadline = self.flush_at();
        let armed = match deadline {
            None => self.timer.clear(),
            // A zero duration would disarm the timer: a due burst fires at once instead.
            Some(at) => {
                self.timer.reset(at.saturating_duration_since(Instant::now()).max(Duration::from_nanos(1)), None)
            }
        };
        match (armed, deadline) {
            (Ok(()), _) | (Err(_), None) => -1,
            (Err(e), Some(at)) => {
                tracing::debug!(error = %e, "cannot arm the watcher's flush timer");
                let left = at.saturating_duration_since(Instant::now());
                // Round up: waking early would only spin.
                i32::try_from(left.as_micros().div_ceil(1000)).unwrap_or(i32::MAX)
            }
        }
    }

    /// When the pending burst is flushed: when the coalescer says so, but not while the old
    /// end of a rename may still be followed by its new end (see `moves::PAIR_WAIT`).
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
        if let Some(stale) =
            moves.0.insert(event.cookie, MovedFrom { share: share.clone(), path, seen: now, watch_ids })
        {
            stale.unwatch(state);
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
                other.unwatch(state);
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
