//! Directories `..data` stopped publishing, kept in the mirror for a grace period after the
//! swap. A reader that resolved `key -> ..data/key` through the old `..data` just before the
//! swap still opens a file in the old directory; kubelet removes that directory right after the
//! swap, which on a host leaves a window of microseconds, but a guest vCPU can stall for much
//! longer between the two lookups (nested emulation, a busy host). So the entries the share no
//! longer has below such a directory are *held*: out of the mirror's state (they are not the
//! share's content and never count against the limits), still on the tmpfs, and removed once
//! their own grace is over, by the next sync or the sync thread's timer, so the container's
//! inotify still sees the deletion, just later.

use std::time::{Duration, Instant};

use tern_protocol::watch::MAX_BYTES;

use super::tree::{is_within, EntryKind, Snapshot};

/// How long a directory `..data` stopped publishing stays readable after the swap: far longer
/// than any stall between a reader's lookup of `..data` and of the file below it, short enough
/// that the container sees the old generation go away about when it would on a host.
pub const RETIRE_GRACE: Duration = Duration::from_secs(1);

/// Most tmpfs bytes (whole pages per file) held at once: the mirror's tmpfs must still fit the
/// live content and the copy of a new generation beside it, even for a share at the byte
/// limit updated many times a second. Past it the oldest retired directory goes early.
const MAX_HELD_BYTES: u64 = MAX_BYTES;
/// Most retired directories held at once (each up to the entry limit), for the tmpfs inodes.
pub(super) const MAX_HELD_DIRS: usize = 64;
/// tmpfs allocates whole pages for file content.
const PAGE: u64 = 4096;

/// The retired directories of one mirror, oldest swap first.
#[derive(Debug)]
pub struct Retired {
    /// Grace after each swap (a field so tests can shorten it, also for directories already
    /// retired).
    pub grace: Duration,
    dirs: Vec<RetiredDir>,
}

#[derive(Debug)]
struct RetiredDir {
    /// Share-relative path of the directory the old `..data` published.
    dir: String,
    swapped_at: Instant,
    /// Entries at or below `dir` that the share removed and the mirror still has.
    held: Snapshot,
}

impl Default for Retired {
    fn default() -> Self {
        Retired::new(RETIRE_GRACE)
    }
}

impl Retired {
    pub fn new(grace: Duration) -> Retired {
        Retired { grace, dirs: Vec::new() }
    }

    /// A `..data` link stopped publishing `dir` just now.
    pub fn retire(&mut self, dir: String) {
        let swapped_at = Instant::now();
        match self.dirs.iter().position(|r| r.dir == dir) {
            // Published again and retired again: its grace starts over.
            Some(at) => {
                let mut again = self.dirs.remove(at);
                again.swapped_at = swapped_at;
                self.dirs.push(again);
            }
            None => self.dirs.push(RetiredDir { dir, swapped_at, held: Snapshot::new() }),
        }
    }

    /// If `path` (which the share no longer has) lies in a directory still in its grace, move
    /// its entry from `state` to that directory's held entries and say so.
    pub fn hold(&mut self, path: &str, state: &mut Snapshot) -> bool {
        let now = Instant::now();
        let grace = self.grace;
        let Some(retired) = self.dirs.iter_mut().rev().find(|r| is_within(path, &r.dir) && now < r.swapped_at + grace)
        else {
            return false;
        };
        let Some(entry) = state.remove(path) else {
            return false;
        };
        retired.held.insert(path.to_owned(), entry);
        true
    }

    /// Held entries of directories the share has again (something at or below them is in
    /// `target`): they become mirror state again, to be settled like any other entry.
    pub fn reclaim(&mut self, target: &Snapshot) -> Snapshot {
        let mut back = Snapshot::new();
        self.dirs.retain_mut(|r| {
            let again = !r.held.is_empty() && target.keys().any(|path| is_within(path, &r.dir));
            if again {
                back.append(&mut r.held);
            }
            !again
        });
        back
    }

    /// Held entries to remove now: those of directories whose grace is over, and of the oldest
    /// ones past [`MAX_HELD_BYTES`] / [`MAX_HELD_DIRS`]. Forgets those directories.
    pub fn take_expired(&mut self) -> Snapshot {
        let now = Instant::now();
        let grace = self.grace;
        let mut expired = Snapshot::new();
        self.dirs.retain_mut(|r| {
            let over = now >= r.swapped_at + grace;
            if over {
                expired.append(&mut r.held);
            }
            !over
        });
        while self.dirs.len() > MAX_HELD_DIRS || self.held_bytes() > MAX_HELD_BYTES {
            let mut oldest = self.dirs.remove(0);
            tracing::debug!(dir = oldest.dir, "too much retired content held; removing the oldest early");
            expired.append(&mut oldest.held);
        }
        expired
    }

    /// When the next held entries are due for removal.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.dirs.iter().filter(|r| !r.held.is_empty()).map(|r| r.swapped_at + self.grace).min()
    }

    fn held_bytes(&self) -> u64 {
        let held = self.dirs.iter().flat_map(|r| r.held.values());
        held.filter(|e| e.kind == EntryKind::File).map(|e| e.size.div_ceil(PAGE) * PAGE).sum()
    }

    /// Every held path (for tests and logs).
    #[cfg(test)]
    pub fn held_paths(&self) -> Vec<String> {
        self.dirs.iter().flat_map(|r| r.held.keys().cloned()).collect()
    }
}
