//! Settling a mirror directory against its share: scan (all of it, or the subtrees a batch
//! of change records names), check the limits, then apply the differences in an order that
//! never shows a half-written update through kubelet's `..data` symlink:
//!
//! 1. directories and regular files, parents first. A file whose host inode is unchanged is
//!    rewritten in place (the container sees IN_MODIFY, as on the host); a new file is created
//!    under its own name (IN_CREATE); a file the host replaced by rename (new inode) is written
//!    to a temporary name and renamed over the old one; a file renamed on the host (same inode
//!    under a new name) is renamed in the mirror (IN_MOVED_TO). Content is compared, not
//!    mtimes, so two writes within one mtime tick are still propagated;
//! 2. symlinks that do not point through `..data` (e.g. inside the timestamped directory);
//! 3. `..data` itself, swapped atomically (symlink to a temporary name, then rename) and only
//!    when everything below its new target was copied;
//! 4. the user-visible symlinks through `..data` (`key -> ..data/key`), as kubelet creates them
//!    after its swap, so they never dangle;
//! 5. removals, deepest first; except that what the share removed below the directory a
//!    `..data` swap just retired is held for a grace period (see [`super::retired`]) and
//!    removed when that is over.
//!
//! Failures of single entries (typically: the host removed a file between the scan and the
//! copy) are warnings: the entry keeps its old state and the next record or resync settles it.

use std::collections::{BTreeSet, HashMap};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::retired::Retired;
use super::tree::{
    check_limits, is_within, join_rel, read_capped, scan_below, Entry, EntryKind, LimitExceeded,
    ScanError, Snapshot,
};

/// The name kubelet's atomic writer swaps to publish an update.
pub const DATA_LINK: &str = "..data";

/// How much of the share to compare.
#[derive(Debug, Clone, Copy)]
pub enum Scope<'a> {
    /// Everything, comparing every file's content (resyncs, poll mode, the first fill).
    Full,
    /// The subtrees named by change records (content compared below them), trusting the
    /// remembered state elsewhere.
    Paths(&'a BTreeSet<String>),
}

/// One change made to the mirror, in the order made (for logs and tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MirrorOp {
    MakeDir(String),
    CreateFile(String),
    RewriteFile(String),
    ReplaceFile(String),
    RenameFile { from: String, to: String },
    SetAttributes(String),
    Symlink(String),
    Remove(String),
}

/// What a sync did.
#[derive(Debug, Default)]
pub struct SyncReport {
    pub ops: Vec<MirrorOp>,
    /// Entries left for a later sync (raced with the host).
    pub deferred: BTreeSet<String>,
}

/// The result of a sync that could run.
#[derive(Debug)]
pub enum SyncOutcome {
    Synced(SyncReport),
    /// The share is past a limit; nothing in the mirror was touched.
    OverLimit(LimitExceeded),
}

/// Why a sync could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("cannot scan the share")]
    Scan(#[source] ScanError),
}

/// Make `mirror` match `share`; `state` is what the mirror holds of the share (updated as
/// entries settle), `retired` what it still holds of directories `..data` no longer publishes.
pub fn sync_mirror(
    share: &Path,
    mirror: &Path,
    state: &mut Snapshot,
    retired: &mut Retired,
    scope: Scope<'_>,
) -> Result<SyncOutcome, SyncError> {
    let (target, roots) = match scope {
        Scope::Full => {
            let mut target = Snapshot::new();
            match scan_below(share, "", &mut target) {
                Ok(()) => {}
                Err(ScanError::OverLimit(limit)) => return Ok(SyncOutcome::OverLimit(limit)),
                Err(e) => return Err(SyncError::Scan(e)),
            }
            (target, None)
        }
        Scope::Paths(hints) => {
            let roots = rescan_roots(state, hints);
            let mut target = state.clone();
            for root in &roots {
                match rescan(share, root, &mut target) {
                    Ok(()) => {}
                    Err(ScanError::OverLimit(limit)) => return Ok(SyncOutcome::OverLimit(limit)),
                    Err(e) => tracing::warn!(path = root, error = %e, "cannot rescan; keeping the mirror's state"),
                }
            }
            (target, Some(roots))
        }
    };
    let (mut target, mut roots) = (target, roots);
    // `..data` links are read last, and always: a scan is not atomic, so a link read before
    // the host emptied the directory it published (kubelet removes it right after a swap), or
    // remembered from an earlier batch, would make that directory look emptied while still
    // published. Read afresh, the link has moved on and the swap below keeps the old one.
    let data_links: BTreeSet<String> = target.keys().chain(state.keys()).filter(|path| is_data_link(path)).cloned().collect();
    for link in data_links {
        if let Err(e) = rescan(share, &link, &mut target) {
            tracing::warn!(path = link, error = %e, "cannot re-read a ..data link");
        }
    }
    // A `..data` that moves must publish a directory scanned after the link was read: kubelet
    // fills the directory before the swap, so that scan is complete. (A directory scanned
    // earlier, or not at all, may be partial or missing.)
    let moved_links: Vec<String> = target
        .iter()
        .filter(|(path, entry)| is_data_link(path) && state.get(*path).map(|e| &e.kind) != Some(&entry.kind))
        .filter_map(|(path, entry)| match &entry.kind {
            EntryKind::Symlink(to) => target_dir(path, to),
            _ => None,
        })
        .collect();
    for dir in moved_links {
        match rescan(share, &dir, &mut target) {
            Ok(()) => {}
            Err(ScanError::OverLimit(limit)) => return Ok(SyncOutcome::OverLimit(limit)),
            Err(e) => tracing::warn!(path = dir, error = %e, "cannot rescan the directory ..data publishes"),
        }
        if let Some(roots) = roots.as_mut() {
            roots.push(dir);
        }
    }
    if let Err(limit) = check_limits(&target) {
        return Ok(SyncOutcome::OverLimit(limit));
    }
    let mut apply = Apply { share, mirror, state, retired, report: SyncReport::default() };
    apply.run(&target, roots.as_deref());
    Ok(SyncOutcome::Synced(apply.report))
}

/// Remove what `retired` holds past its grace (the sync thread's timer, between syncs).
pub fn remove_expired(share: &Path, mirror: &Path, state: &mut Snapshot, retired: &mut Retired) -> SyncReport {
    let mut apply = Apply { share, mirror, state, retired, report: SyncReport::default() };
    apply.remove_expired();
    apply.report
}

/// The subtrees to rescan for `hints`: for each hinted path its shallowest ancestor the state
/// does not know as a directory (a record about `new/dir/file` may arrive before we know
/// `new/dir`), without roots nested in other roots.
fn rescan_roots(state: &Snapshot, hints: &BTreeSet<String>) -> Vec<String> {
    let mut roots = BTreeSet::new();
    for hint in hints {
        let mut prefix = String::new();
        for component in hint.split('/') {
            prefix = join_rel(&prefix, component);
            let known_dir = state.get(&prefix).is_some_and(|e| e.kind == EntryKind::Dir);
            if !known_dir || prefix.len() == hint.len() {
                break;
            }
        }
        roots.insert(prefix);
    }
    let mut out: Vec<String> = Vec::new();
    for root in roots {
        if !out.iter().any(|r| is_within(&root, r)) {
            out.push(root);
        }
    }
    out
}

/// Replace `root` and everything below it in `target` with what the share holds now.
fn rescan(share: &Path, root: &str, target: &mut Snapshot) -> Result<(), ScanError> {
    let mut fresh = Snapshot::new();
    match Entry::read(&share.join(root)) {
        Ok(Some(entry)) => {
            let is_dir = entry.kind == EntryKind::Dir;
            fresh.insert(root.to_owned(), entry);
            if is_dir {
                scan_below(share, root, &mut fresh)?;
            }
        }
        Ok(None) => {}
        Err(e) if e.kind() == ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENOTDIR) => {}
        Err(source) => return Err(ScanError::Io { path: share.join(root), source }),
    }
    target.retain(|path, _| !is_within(path, root));
    target.extend(fresh);
    Ok(())
}

fn is_data_link(path: &str) -> bool {
    path.rsplit('/').next() == Some(DATA_LINK)
}

fn points_through_data(target: &Path) -> bool {
    target.components().next().is_some_and(|c| c.as_os_str() == DATA_LINK)
}

/// Kubelet-internal names (`..data`, `..2026_…`) are never treated as renames: an inode the
/// host reused must not make us move a file out of the directory `..data` still shows.
fn is_kubelet_internal(path: &str) -> bool {
    path.split('/').any(|c| c.starts_with(".."))
}

fn parent_of(path: &str) -> &str {
    path.rsplit_once('/').map_or("", |(parent, _)| parent)
}

fn name_of(path: &str) -> &str {
    path.rsplit_once('/').map_or(path, |(_, name)| name)
}

struct Apply<'a> {
    share: &'a Path,
    mirror: &'a Path,
    state: &'a mut Snapshot,
    retired: &'a mut Retired,
    report: SyncReport,
}

impl Apply<'_> {
    fn run(&mut self, target: &Snapshot, roots: Option<&[String]>) {
        let compare_content = |path: &str| roots.is_none_or(|roots| roots.iter().any(|r| is_within(path, r)));
        let reclaimed = self.retired.reclaim(target);
        self.state.extend(reclaimed);
        let mut vanished: HashMap<u64, String> = self
            .state
            .iter()
            .filter(|(path, e)| e.kind == EntryKind::File && !target.contains_key(*path) && !is_kubelet_internal(path))
            .map(|(path, e)| (e.ino, path.clone()))
            .collect();

        for (path, entry) in target {
            match entry.kind {
                EntryKind::Dir => self.settle_dir(path, entry),
                EntryKind::File => self.settle_file(path, entry, compare_content(path), &mut vanished),
                EntryKind::Symlink(_) => {}
            }
        }
        let links: Vec<(&String, &Entry, &PathBuf)> = target
            .iter()
            .filter_map(|(path, entry)| match &entry.kind {
                EntryKind::Symlink(to) => Some((path, entry, to)),
                _ => None,
            })
            .collect();
        for (path, entry, to) in &links {
            if !is_data_link(path) && !points_through_data(to) {
                self.settle_symlink(path, entry, target);
            }
        }
        for (path, entry, to) in &links {
            if is_data_link(path) {
                let published = target_dir(path, to);
                let missing = published.as_ref().filter(|dir| self.state.get(dir.as_str()).is_none_or(|e| e.kind != EntryKind::Dir));
                let incomplete = self.report.deferred.iter().find(|d| published.as_deref().is_some_and(|p| is_within(d, p)));
                if let Some(bad) = missing.or(incomplete) {
                    tracing::warn!(link = path.as_str(), waiting_for = bad.as_str(), "not swapping ..data before its target is complete");
                    self.report.deferred.insert((*path).clone());
                    continue;
                }
                let before = self.state.get(path.as_str()).map(|e| e.kind.clone());
                self.settle_symlink(path, entry, target);
                let swapped = self.state.get(path.as_str()).is_some_and(|e| e.kind == entry.kind);
                if let (true, Some(EntryKind::Symlink(old))) = (swapped, before) {
                    // Readers may have resolved the old link a moment ago: keep what it published.
                    if let Some(old_dir) = target_dir(path, &old).filter(|old_dir| published.as_ref() != Some(old_dir)) {
                        self.retired.retire(old_dir);
                    }
                }
            }
        }
        for (path, entry, to) in &links {
            if !is_data_link(path) && points_through_data(to) {
                self.settle_symlink(path, entry, target);
            }
        }
        // What a `..data` link whose swap waits (its new target is incomplete) still publishes
        // stays, although the share removed it.
        let still_published: Vec<String> = self
            .state
            .iter()
            .filter_map(|(path, e)| match (&e.kind, target.get(path).map(|t| &t.kind)) {
                (EntryKind::Symlink(current), Some(EntryKind::Symlink(to))) if is_data_link(path) && to != current => {
                    target_dir(path, current)
                }
                _ => None,
            })
            .collect();
        let gone: Vec<String> = self.state.keys().filter(|p| !target.contains_key(*p)).rev().cloned().collect();
        for path in gone {
            if still_published.iter().any(|p| is_within(&path, p)) {
                self.report.deferred.insert(path);
                continue;
            }
            if self.retired.hold(&path, self.state) {
                continue;
            }
            self.remove(&path);
        }
        self.remove_expired();
    }

    /// Remove the held entries whose grace is over, deepest first.
    fn remove_expired(&mut self) {
        for (path, entry) in self.retired.take_expired().into_iter().rev() {
            self.state.insert(path.clone(), entry);
            self.remove(&path);
        }
    }

    fn defer(&mut self, path: &str, what: &str, error: &dyn std::fmt::Display) {
        tracing::warn!(path, error = %error, "{what}; leaving it for the next record or resync");
        self.report.deferred.insert(path.to_owned());
    }

    /// Remove what the mirror has at `path` (a directory too, unless `keep_dir`), with the
    /// state of everything below it.
    fn clear_conflict(&mut self, path: &str, keep_dir: bool) {
        let dst = self.mirror.join(path);
        let Ok(meta) = std::fs::symlink_metadata(&dst) else {
            return;
        };
        if keep_dir && meta.is_dir() {
            return;
        }
        let result = if meta.is_dir() { std::fs::remove_dir_all(&dst) } else { std::fs::remove_file(&dst) };
        if let Err(e) = result {
            tracing::warn!(path, error = %e, "cannot remove a conflicting mirror entry");
        }
        self.state.retain(|p, _| !is_within(p, path));
    }

    fn settle_dir(&mut self, path: &str, entry: &Entry) {
        let dst = self.mirror.join(path);
        let known = self.state.get(path).cloned();
        if known.as_ref().is_none_or(|k| k.kind != EntryKind::Dir) {
            self.clear_conflict(path, true);
            match std::fs::create_dir(&dst) {
                Ok(()) => self.report.ops.push(MirrorOp::MakeDir(path.to_owned())),
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
                Err(e) => return self.defer(path, "cannot create a mirror directory", &e),
            }
        }
        if known.as_ref().is_none_or(|k| (k.mode, k.uid, k.gid) != (entry.mode, entry.uid, entry.gid)) {
            set_attributes(&dst, entry);
            if known.is_some() {
                self.report.ops.push(MirrorOp::SetAttributes(path.to_owned()));
            }
        }
        self.state.insert(path.to_owned(), entry.clone());
    }

    fn settle_file(&mut self, path: &str, entry: &Entry, compare: bool, vanished: &mut HashMap<u64, String>) {
        let dst = self.mirror.join(path);
        let known = self.state.get(path).cloned();
        match known {
            Some(old) if old.kind == EntryKind::File && old.ino == entry.ino => {
                if !compare && !entry.differs_from(&old) {
                    return;
                }
                let content = match read_capped(&self.share.join(path)) {
                    Ok(content) => content,
                    Err(e) => return self.defer(path, "cannot read a changed share file", &e),
                };
                if std::fs::read(&dst).ok().as_deref() != Some(content.as_slice()) {
                    let written = std::fs::OpenOptions::new()
                        .write(true)
                        .truncate(true)
                        .create(true)
                        .open(&dst)
                        .and_then(|mut f| f.write_all(&content));
                    if let Err(e) = written {
                        return self.defer(path, "cannot rewrite a mirror file", &e);
                    }
                    self.report.ops.push(MirrorOp::RewriteFile(path.to_owned()));
                }
                if (old.mode, old.uid, old.gid) != (entry.mode, entry.uid, entry.gid) {
                    set_attributes(&dst, entry);
                    self.report.ops.push(MirrorOp::SetAttributes(path.to_owned()));
                }
                self.state.insert(path.to_owned(), entry.clone());
            }
            Some(old) if old.kind == EntryKind::File => {
                // The host put a new file in place by rename: so do we.
                let content = match read_capped(&self.share.join(path)) {
                    Ok(content) => content,
                    Err(e) => return self.defer(path, "cannot read a replaced share file", &e),
                };
                let tmp = temp_sibling(&dst);
                if let Err(e) = write_new(&tmp, &content, entry).and_then(|()| std::fs::rename(&tmp, &dst)) {
                    let _ = std::fs::remove_file(&tmp);
                    return self.defer(path, "cannot replace a mirror file", &e);
                }
                self.report.ops.push(MirrorOp::ReplaceFile(path.to_owned()));
                self.state.insert(path.to_owned(), entry.clone());
            }
            known => {
                if known.is_some() {
                    self.clear_conflict(path, false);
                }
                let renamed_from = if is_kubelet_internal(path) { None } else { self.find_renamed(path, entry, vanished) };
                if let Some(from) = renamed_from {
                    if std::fs::rename(self.mirror.join(&from), &dst).is_ok() {
                        self.report.ops.push(MirrorOp::RenameFile { from: from.clone(), to: path.to_owned() });
                        if let Some(old) = self.state.remove(&from) {
                            self.state.insert(path.to_owned(), old);
                        }
                        // Now the same inode under the new name: settle content and mode.
                        return self.settle_file(path, entry, true, vanished);
                    }
                }
                let content = match read_capped(&self.share.join(path)) {
                    Ok(content) => content,
                    Err(e) => return self.defer(path, "cannot read a new share file", &e),
                };
                if let Err(e) = write_new(&dst, &content, entry) {
                    return self.defer(path, "cannot create a mirror file", &e);
                }
                self.report.ops.push(MirrorOp::CreateFile(path.to_owned()));
                self.state.insert(path.to_owned(), entry.clone());
            }
        }
    }

    /// The vanished file `path` was renamed from: same inode, or (virtio-fs need not keep
    /// inode numbers across a rename) same size and content.
    fn find_renamed(&self, path: &str, entry: &Entry, vanished: &mut HashMap<u64, String>) -> Option<String> {
        if let Some(from) = vanished.remove(&entry.ino).filter(|from| from != path) {
            return Some(from);
        }
        let candidates: Vec<(u64, String)> = vanished
            .iter()
            .filter(|(_, from)| self.state.get(from.as_str()).is_some_and(|e| e.size == entry.size))
            .map(|(ino, from)| (*ino, from.clone()))
            .collect();
        if candidates.is_empty() {
            return None;
        }
        let content = read_capped(&self.share.join(path)).ok()?;
        let (ino, from) = candidates
            .into_iter()
            .find(|(_, from)| std::fs::read(self.mirror.join(from)).ok().as_deref() == Some(content.as_slice()))?;
        vanished.remove(&ino);
        Some(from)
    }

    fn settle_symlink(&mut self, path: &str, entry: &Entry, target: &Snapshot) {
        let EntryKind::Symlink(to) = &entry.kind else {
            return;
        };
        let dst = self.mirror.join(path);
        let current = std::fs::read_link(&dst).ok();
        if current.as_ref() == Some(to) && self.state.get(path).is_some_and(|k| k.kind == entry.kind) {
            self.state.insert(path.to_owned(), entry.clone());
            return;
        }
        if self.state.get(path).is_some_and(|k| k.kind == EntryKind::Dir) || dst.is_dir() && current.is_none() {
            self.clear_conflict(path, false);
        }
        // Kubelet's own temporary name when free, so the container sees what it would on a host.
        let name = name_of(path);
        let kubelet_tmp = join_rel(parent_of(path), &format!("{name}_tmp"));
        let tmp = if target.contains_key(&kubelet_tmp) {
            temp_sibling(&dst)
        } else {
            self.mirror.join(&kubelet_tmp)
        };
        let _ = std::fs::remove_file(&tmp);
        let made = std::os::unix::fs::symlink(to, &tmp)
            .and_then(|()| {
                let _ = std::os::unix::fs::lchown(&tmp, Some(entry.uid), Some(entry.gid));
                std::fs::rename(&tmp, &dst)
            });
        if let Err(e) = made {
            let _ = std::fs::remove_file(&tmp);
            return self.defer(path, "cannot place a mirror symlink", &e);
        }
        self.report.ops.push(MirrorOp::Symlink(path.to_owned()));
        self.state.insert(path.to_owned(), entry.clone());
    }

    fn remove(&mut self, path: &str) {
        let dst = self.mirror.join(path);
        let result = match std::fs::symlink_metadata(&dst) {
            Ok(meta) if meta.is_dir() => std::fs::remove_dir(&dst).or_else(|_| std::fs::remove_dir_all(&dst)),
            Ok(_) => std::fs::remove_file(&dst),
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => self.report.ops.push(MirrorOp::Remove(path.to_owned())),
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return self.defer(path, "cannot remove a mirror entry", &e),
        }
        self.state.remove(path);
    }
}

/// The share-relative directory a `..data` link at `link` publishes, if it points inside
/// the share.
fn target_dir(link: &str, to: &Path) -> Option<String> {
    let to = to.to_str()?;
    (!to.starts_with('/') && to.split('/').all(|c| !c.is_empty() && c != "." && c != ".."))
        .then(|| join_rel(parent_of(link), to))
}

fn temp_sibling(dst: &Path) -> PathBuf {
    let name = dst.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    dst.with_file_name(format!(".{name}.tern-tmp"))
}

/// Create (or truncate) `path` with `content` and the entry's mode and owner, changing
/// attributes only where creation did not get them right (each change is an IN_ATTRIB the
/// container would not see on a host).
fn write_new(path: &Path, content: &[u8], entry: &Entry) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(entry.mode).open(path)?;
    file.write_all(content)?;
    let meta = file.metadata()?;
    drop(file);
    if meta.mode() & 0o7777 != entry.mode || (meta.uid(), meta.gid()) != (entry.uid, entry.gid) {
        set_attributes(path, entry);
    }
    Ok(())
}

/// Copy mode and owner; failures (e.g. not root in host tests) only cost fidelity.
fn set_attributes(path: &Path, entry: &Entry) {
    if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(entry.mode)) {
        tracing::debug!(path = %path.display(), error = %e, "cannot set the mode of a mirror entry");
    }
    if let Err(e) = std::os::unix::fs::lchown(path, Some(entry.uid), Some(entry.gid)) {
        tracing::debug!(path = %path.display(), error = %e, "cannot set the owner of a mirror entry");
    }
}

#[cfg(test)]
#[path = "sync_tests.rs"]
mod tests;
