//! Tree bookkeeping: the watched shares, one inotify watch per directory of each, and what
//! becomes of the watches when directories are created, moved or removed.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::path::PathBuf;

use inotify::{WatchDescriptor, WatchMask, Watches};

/// Most directories watched per share: a watchable mount holds at most 16 entries, so a tree
/// this deep has long fallen back to a bind mount in the guest; we stop adding watches rather
/// than exhaust the host's inotify limits.
const MAX_WATCHED_DIRS_PER_SHARE: usize = 1024;
pub(super) const WATCH_MASK: WatchMask = WatchMask::CREATE
    .union(WatchMask::MODIFY)
    .union(WatchMask::ATTRIB)
    .union(WatchMask::DELETE)
    .union(WatchMask::MOVED_FROM)
    .union(WatchMask::MOVED_TO)
    .union(WatchMask::DONT_FOLLOW)
    .union(WatchMask::ONLYDIR)
    .union(WatchMask::EXCL_UNLINK);

/// One watched directory: which share, and where in it (`""` is the share root).
#[derive(Debug)]
pub(super) struct WatchedDir {
    pub(super) share: String,
    pub(super) rel: String,
    pub(super) wd: WatchDescriptor,
}

#[derive(Debug)]
pub(super) struct WatchedShare {
    pub(super) host_dir: PathBuf,
    pub(super) dirs: usize,
}

/// Shares and the directory watches that serve them.
pub(super) struct WatchState {
    pub(super) watches: Watches,
    pub(super) shares: BTreeMap<String, WatchedShare>,
    /// Keyed by watch descriptor id.
    pub(super) dirs: HashMap<i32, WatchedDir>,
}

pub(super) fn join_rel(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_owned()
    } else {
        format!("{dir}/{name}")
    }
}

pub(super) fn is_within(path: &str, root: &str) -> bool {
    root.is_empty() || path == root || path.strip_prefix(root).is_some_and(|rest| rest.starts_with('/'))
}

impl WatchState {
    pub(super) fn watches_insert(&mut self, share: &str, rel: &str, wd: WatchDescriptor) {
        let id = wd.get_watch_descriptor_id();
        self.dirs.insert(id, WatchedDir { share: share.to_owned(), rel: rel.to_owned(), wd });
    }

    /// Add watches below `rel` of `share` (whose own watch exists), calling `created` for
    /// every entry found: it may have been created before its directory was watched.
    pub(super) fn watch_tree(&mut self, share: &str, rel: &str, created: &mut dyn FnMut(String)) {
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
    pub(super) fn unwatch(&mut self, share: &str, under: Option<&str>) {
        let gone: Vec<i32> = self
            .dirs
            .iter()
            .filter(|(_, d)| d.share == share && under.is_none_or(|u| is_within(&d.rel, u)))
            .map(|(id, _)| *id)
            .collect();
        self.unwatch_ids(&gone);
    }

    /// The watches of `share` at or below `under`.
    pub(super) fn watch_ids_below(&self, share: &str, under: &str) -> Vec<i32> {
        self.dirs.iter().filter(|(_, d)| d.share == share && is_within(&d.rel, under)).map(|(id, _)| *id).collect()
    }

    /// A watched tree moved from `from` to `to` within its share: the same watches (inotify
    /// follows the inodes) now report under the new path. Returns whether `to` itself is
    /// watched.
    pub(super) fn move_watches(&mut self, ids: &[i32], from: &str, to: &str) -> bool {
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

    /// Drop the watches `ids` (those still known).
    pub(super) fn unwatch_ids(&mut self, ids: &[i32]) {
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

pub(super) fn utf8_name<'a>(share: &str, name: &'a OsStr) -> Option<&'a str> {
    let name = name.to_str();
    if name.is_none() {
        tracing::warn!(share, "ignoring a file name that is not UTF-8");
    }
    name
}
