//! Rename pairing: the old end of a rename waits, by inotify cookie, for its new end, so the
//! two become one `Moved` record that names the old path.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::tree::{is_within, WatchState};

/// Longest a burst is held open for the new end of a rename whose old end was read. The kernel
/// queues both ends in one rename(2), but a reader can wake between the two, and on a slow
/// (e.g. nested, emulated) host they can be further apart than the coalescer's quiet period;
/// flushing the old end alone would make the guest remove and recreate instead of rename. A
/// rename out of the watched trees has no new end and delays its batch by this much.
const PAIR_WAIT: Duration = Duration::from_millis(20);
/// The old end of a rename (IN_MOVED_FROM) waiting for its new end (IN_MOVED_TO with the same
/// cookie). The burst waits up to [`PAIR_WAIT`] for it; a pending old end is dropped when the
/// burst is flushed (a rename out of the watched trees never gets a new end).
#[derive(Debug)]
pub(super) struct MovedFrom {
    pub(super) share: String,
    pub(super) path: String,
    pub(super) seen: Instant,
    /// The watches of a moved directory (and of its subdirectories): they follow the inodes,
    /// so they are renamed with a paired new end and dropped otherwise.
    pub(super) watch_ids: Vec<i32>,
}

impl MovedFrom {
    /// Drop the watches of a tree that moved away, unless they were found again under a new
    /// path meanwhile (a watch added on the same inode returns the same descriptor).
    pub(super) fn unwatch(&self, state: &mut WatchState) {
        let stale: Vec<i32> = self
            .watch_ids
            .iter()
            .copied()
            .filter(|id| state.dirs.get(id).is_some_and(|d| d.share == self.share && is_within(&d.rel, &self.path)))
            .collect();
        state.unwatch_ids(&stale);
    }
}

/// Old ends of renames by inotify cookie.
#[derive(Debug, Default)]
pub(super) struct PendingMoves(pub(super) HashMap<u32, MovedFrom>);

impl PendingMoves {
    /// Until when the burst waits for the new ends of pending renames.
    pub(super) fn pair_deadline(&self) -> Option<Instant> {
        self.0.values().map(|from| from.seen + PAIR_WAIT).min()
    }

    /// Forget every unpaired old end; a moved-away directory's watches are dropped (they
    /// would keep reporting under the old path).
    pub(super) fn expire(&mut self, state: &mut WatchState) {
        for (_, from) in self.0.drain() {
            from.unwatch(state);
        }
    }
}
