//! Settling a mirror directory against its share: scan (all of it, or the subtrees a batch
//! of change records names), check the limits, then apply the differences in an order that
//! never shows a half-written update through kubelet's `..data` symlink:
//!
//! 0. each `..data` link is read afresh, last, and the directory it newly publishes is read
//!    after it and checked against a second read of the link (see [`read_published`]): if
//!    the link moved on meanwhile (kubelet published a newer generation and began removing
//!    this one), the newest one is read instead. A batch may carry the generation a link published, read on the host (see
//!    [`tern_protocol::watch::Generation`]): it stands in for reading the link and its directory
//!    through the share, when it is newer than what the mirror shows ([`accepted_generations`]);
//! 1. directories, parents first, and the regular files of the directories `..data` links
//!    publish. A file whose host inode is unchanged is rewritten in place (the container sees
//!    IN_MODIFY, as on the host); a new file is created under its own name (IN_CREATE); a file
//!    the host replaced by rename (new inode) is written to a temporary name and renamed over
//!    the old one; a file renamed on the host (same inode under a new name) is renamed in the
//!    mirror (IN_MOVED_TO). Content is compared, not mtimes, so two writes within one mtime
//!    tick are still propagated;
//! 2. the other symlinks inside those directories;
//! 3. `..data` itself, swapped atomically (symlink to a temporary name, then rename) and only
//!    when everything below its new target was copied;
//! 4. the other regular files and symlinks that do not point through `..data` (after the swap:
//!    what the host did after a kubelet update must not show before it);
//! 5. the user-visible symlinks through `..data` (`key -> ..data/key`), as kubelet creates them
//!    after its swap, so they never dangle;
//! 6. removals, deepest first, of what the records said was removed or renamed away (see
//!    [`Hints`]); except that what the share removed below the directory a `..data` swap just
//!    retired is held for a grace period (see [`super::retired`]) and removed when that is over.
//!
//! Failures of single entries (typically: the host removed a file between the scan and the
//! copy) are warnings: the entry keeps its old state and the next record or resync settles it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tern_protocol::watch::{Generation, HostContent, HostEntry};

use super::retired::Retired;
use super::tree::{
    check_limits, is_within, join_rel, read_capped, scan_below, Entry, EntryKind, LimitExceeded, ScanError, Snapshot,
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
    Paths(&'a Hints),
}

/// What change records said about a share: the paths to settle, and which of them were
/// removed or renamed away.
///
/// Only an entry at or below a `removed` path is removed from the mirror when the share no
/// longer has it. An entry that vanished while the records seen so far only said it changed
/// was removed or renamed after those records were made, and the event that did it has its
/// own record on the way: settling it now would turn the host's `rename(f, g)` into the
/// guest's `unlink(f)` + `create(g)` (the record naming `g` comes later), so it stays until
/// then (or the next resync).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hints {
    /// Paths to rescan and settle.
    pub paths: BTreeSet<String>,
    /// Paths whose records said removed or renamed (either end): these, and everything below
    /// them, may be removed from the mirror.
    pub removed: BTreeSet<String>,
    /// `..data` link → the latest generation the VMM read for it (checked by
    /// [`super::pending::merge_batch`]: every path safe and inside the directory the link names).
    pub generations: BTreeMap<String, Generation>,
    /// Path → the file or symlink the VMM read there for the latest record naming the path
    /// (kept by [`super::pending::merge_batch`] only while no later record names the path).
    pub entries: BTreeMap<String, HostEntry>,
}

impl Hints {
    /// Hints that let every named path be removed (for tests: records of every kind).
    #[cfg(test)]
    pub fn removable<I, S>(paths: I) -> Hints
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let paths: BTreeSet<String> = paths.into_iter().map(Into::into).collect();
        Hints { removed: paths.clone(), paths, ..Hints::default() }
    }

    fn allows_removal(&self, path: &str) -> bool {
        self.removed.iter().any(|root| is_within(path, root))
    }
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
    let mut carried: Vec<(&Generation, String)> = Vec::new();
    let mut plain_contents: HashMap<String, Vec<u8>> = HashMap::new();
    let (mut target, mut roots) = match scope {
        Scope::Full => {
            let mut target = Snapshot::new();
            let mut scanned = scan_below(share, "", &mut target);
            if matches!(scanned, Err(ScanError::OverLimit(_))) {
                // The count may include what the host removed while we listed it: look again
                // before giving up on the mirror for good.
                target.clear();
                scanned = scan_below(share, "", &mut target);
            }
            match scanned {
                Ok(()) => {}
                Err(ScanError::OverLimit(limit)) => return Ok(SyncOutcome::OverLimit(limit)),
                Err(e) => return Err(SyncError::Scan(e)),
            }
            (target, None)
        }
        Scope::Paths(hints) => {
            carried = accepted_generations(share, state, hints);
            // What a carried generation holds is not read through the share at all.
            let covered = |root: &str| carried.iter().any(|(g, dir)| root == g.link.path || is_within(root, dir));
            let mut roots = rescan_roots(state, &hints.paths);
            roots.retain(|root| !covered(root));
            let mut target = state.clone();
            for root in &roots {
                if let Some(entry) = hints.entries.get(root) {
                    // Read on the host for this batch: no need to read the share.
                    target.retain(|path, _| !is_within(path, root));
                    target.insert(root.clone(), carried_entry(entry));
                    if let HostContent::File(bytes) = &entry.content {
                        plain_contents.insert(root.clone(), bytes.clone());
                    }
                    continue;
                }
                match rescan(share, root, &mut target) {
                    Ok(()) => {}
                    Err(ScanError::OverLimit(limit)) => return Ok(SyncOutcome::OverLimit(limit)),
                    Err(e) => tracing::warn!(path = root, error = %e, "cannot rescan; keeping the mirror's state"),
                }
            }
            for (generation, dir) in &carried {
                target.retain(|path, _| !is_within(path, dir));
                for entry in generation.entries.iter().chain([&generation.link]) {
                    target.insert(entry.path.clone(), carried_entry(entry));
                }
                roots.push(dir.clone());
            }
            (target, Some(roots))
        }
    };
    let mut contents = plain_contents;
    contents.extend(carried.iter().flat_map(|(g, _)| &g.entries).filter_map(|e| match &e.content {
        HostContent::File(bytes) => Some((e.path.clone(), bytes.clone())),
        _ => None,
    }));
    // `..data` links are read last, and always (unless a carried generation settles them): a
    // scan is not atomic, so a link read before
    // the host emptied the directory it published (kubelet removes it right after a swap), or
    // remembered from an earlier batch, would make that directory look emptied while still
    // published. Read afresh, the link has moved on and the swap below keeps the old one.
    let data_links: BTreeSet<String> =
        target.keys().chain(state.keys()).filter(|path| is_data_link(path)).cloned().collect();
    let mut unsettled_links = BTreeSet::new();
    for link in data_links {
        if carried.iter().any(|(g, _)| g.link.path == link) {
            continue;
        }
        match read_published(share, &link, state, &mut target) {
            Ok(Published::Unchanged) => {}
            Ok(Published::Moved(dir)) => {
                if let Some(roots) = roots.as_mut() {
                    roots.push(dir);
                }
            }
            Ok(Published::Unsettled(dir)) => {
                if let Some(roots) = roots.as_mut() {
                    roots.push(dir);
                }
                unsettled_links.insert(link);
            }
            Err(ScanError::OverLimit(limit)) => return Ok(SyncOutcome::OverLimit(limit)),
            Err(e) => {
                tracing::warn!(path = link, error = %e, "cannot read what ..data publishes; not swapping it now");
                unsettled_links.insert(link);
            }
        }
    }
    if check_limits(&target).is_err() {
        // A scan is not atomic: it may hold entries the host removed since (superseded kubelet
        // generations above all). Falling back to a bind mount is for good, so count only what
        // is still there.
        let stale: Vec<String> = target.keys().filter(|path| is_gone(share, path)).cloned().collect();
        if !stale.is_empty() {
            tracing::debug!(?stale, "not counting entries the share no longer has");
            target.retain(|path, _| !stale.contains(path));
            // A directory a moved `..data` was to publish is being removed (the host is past
            // it): what is left of it is no longer complete.
            for (link, entry) in target.iter().filter(|(path, _)| is_data_link(path)) {
                let dir = match &entry.kind {
                    EntryKind::Symlink(to) => target_dir(link, to),
                    _ => None,
                };
                if dir.is_some_and(|dir| stale.iter().any(|path| is_within(path, &dir))) {
                    unsettled_links.insert(link.clone());
                }
            }
        }
        if let Err(limit) = check_limits(&target) {
            return Ok(SyncOutcome::OverLimit(limit));
        }
    }
    let removed = match scope {
        Scope::Full => None,
        Scope::Paths(hints) => Some(hints),
    };
    let mut apply =
        Apply { share, mirror, state, retired, removed, unsettled_links, contents, report: SyncReport::default() };
    apply.run(&target, roots.as_deref());
    Ok(SyncOutcome::Synced(apply.report))
}

/// The share-relative directory `generation` publishes, if the generation is well formed: its
/// link a `..data` link naming a sibling directory, its first entry that directory, every other
/// entry below it, every path safe, every file's content as long as its size says.
pub(super) fn generation_dir(generation: &Generation) -> Option<String> {
    use tern_protocol::watch::is_safe_relative_path;
    let link = &generation.link;
    let HostContent::Symlink(to) = &link.content else {
        return None;
    };
    if !is_safe_relative_path(&link.path) || !is_data_link(&link.path) {
        return None;
    }
    let dir = target_dir(&link.path, Path::new(to)).filter(|_| !to.contains('/'))?;
    let (first, rest) = generation.entries.split_first()?;
    let sound = |e: &HostEntry| {
        is_safe_relative_path(&e.path)
            && match &e.content {
                HostContent::File(bytes) => bytes.len() as u64 == e.size,
                _ => true,
            }
    };
    let well_formed = first.path == dir
        && first.content == HostContent::Dir
        && generation.entries.len() <= tern_protocol::watch::MAX_GENERATION_ENTRIES
        && rest.iter().all(|e| sound(e) && e.path != dir && is_within(&e.path, &dir));
    well_formed.then_some(dir)
}

/// The generations of `hints` to publish as carried, with their directories: those newer than
/// what the mirror's link shows, or else the one the share's link still names. Any other may
/// be older than what the mirror read through the share meanwhile, and is left to the share.
///
/// Newer means: the mirror shows no link; or it shows one of the targets the VMM read before
/// this generation; or the carried link changed later than the one the mirror shows (kubelet
/// makes a new link for every generation, so its ctime on the host clock grows with each; the
/// mirror's state holds the host's ctime, read through the share or carried).
fn accepted_generations<'h>(share: &Path, state: &Snapshot, hints: &'h Hints) -> Vec<(&'h Generation, String)> {
    hints
        .generations
        .values()
        .filter_map(|generation| {
            let dir = generation_dir(generation)?;
            let HostContent::Symlink(to) = &generation.link.content else {
                return None;
            };
            let link = &generation.link.path;
            let newer = match state.get(link) {
                Some(Entry { kind: EntryKind::Symlink(shown), .. }) if shown.as_os_str() == to.as_str() => return None,
                Some(Entry { kind: EntryKind::Symlink(shown), ctime, .. }) => {
                    generation.earlier.iter().any(|t| shown.as_os_str() == t.as_str()) || generation.link.ctime > *ctime
                }
                _ => true,
            };
            let current = || std::fs::read_link(share.join(link)).is_ok_and(|now| now.as_os_str() == to.as_str());
            (newer || current()).then_some((generation, dir))
        })
        .collect()
}

/// A carried entry as the mirror's state records it. Its inode number is left unknown (0):
/// the host's number is not the one the share shows through virtio-fs, so it cannot be
/// compared with an entry read through the share.
fn carried_entry(entry: &HostEntry) -> Entry {
    let kind = match &entry.content {
        HostContent::Dir => EntryKind::Dir,
        HostContent::File(_) => EntryKind::File,
        HostContent::Symlink(to) => EntryKind::Symlink(PathBuf::from(to)),
    };
    Entry {
        kind,
        mode: entry.mode & 0o7777,
        uid: entry.uid,
        gid: entry.gid,
        ino: UNKNOWN_INO,
        size: entry.size,
        mtime: entry.mtime,
        ctime: entry.ctime,
    }
}

/// The inode number of an entry whose number the share did not show (a carried one).
const UNKNOWN_INO: u64 = 0;

/// Are `a` and `b` (entries at one path) the same file, as far as the numbers tell? An unknown
/// number counts as the same file: rewritten in place, not replaced.
fn same_file(a: &Entry, b: &Entry) -> bool {
    a.ino == b.ino || a.ino == UNKNOWN_INO || b.ino == UNKNOWN_INO
}

/// Is `path` gone from the share (or no longer reachable through its parents)?
fn is_gone(share: &Path, path: &str) -> bool {
    match std::fs::symlink_metadata(share.join(path)) {
        Ok(_) => false,
        Err(e) => e.kind() == ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENOTDIR),
    }
}

/// How often [`read_published`] reads a moving `..data` link and the directory it names
/// before giving up until the next sync. Each round costs one scan of a directory of at most
/// [`tern_protocol::watch::MAX_ENTRIES`] entries; the link only moves again if the host
/// published yet another generation meanwhile.
const PUBLISH_ATTEMPTS: usize = 8;

/// What a `..data` link publishes now, compared with what the mirror shows.
#[derive(Debug, PartialEq, Eq)]
enum Published {
    /// The link is what the mirror has (or is not a link into the share): nothing to swap.
    Unchanged,
    /// The link moved to this directory, and `target` holds a complete scan of it.
    Moved(String),
    /// The link kept moving while its directory was scanned: `target` may hold a partial scan
    /// of this directory, so the swap waits for the next sync.
    Unsettled(String),
}

/// Read the `..data` link at `link` afresh into `target` and, if it moved, scan the directory
/// it publishes into `target` in a way that yields the complete directory.
///
/// Kubelet's atomic writer fills the new directory completely before the rename that
/// publishes it, and removes the old one only after the next rename: so a scan of the
/// directory is complete when the link still names it after the scan (the directory cannot
/// have been emptied during it, and timestamped names are never reused). If the link moved
/// meanwhile, a newer generation was published: skip to that one.
fn read_published(share: &Path, link: &str, state: &Snapshot, target: &mut Snapshot) -> Result<Published, ScanError> {
    rescan(share, link, target)?;
    let mut last = None;
    for _ in 0..PUBLISH_ATTEMPTS {
        let Some(entry) = target.get(link) else {
            return Ok(Published::Unchanged);
        };
        if state.get(link).map(|e| &e.kind) == Some(&entry.kind) {
            return Ok(Published::Unchanged);
        }
        let EntryKind::Symlink(to) = &entry.kind else {
            return Ok(Published::Unchanged);
        };
        let Some(dir) = target_dir(link, to) else {
            return Ok(Published::Unchanged);
        };
        let read = entry.kind.clone();
        rescan(share, &dir, target)?;
        rescan(share, link, target)?;
        if target.get(link).map(|e| &e.kind) == Some(&read) {
            return Ok(Published::Moved(dir));
        }
        tracing::debug!(link, dir, "..data moved on while its directory was read; reading the newer one");
        if !state.contains_key(&dir) {
            // A superseded generation the mirror never had: not worth copying, and a partial
            // scan of it must not count against the limits.
            target.retain(|path, _| !is_within(path, &dir));
        }
        last = Some(dir);
    }
    Ok(last.map_or(Published::Unchanged, Published::Unsettled))
}

/// Remove what `retired` holds past its grace (the sync thread's timer, between syncs).
pub fn remove_expired(share: &Path, mirror: &Path, state: &mut Snapshot, retired: &mut Retired) -> SyncReport {
    let mut apply = Apply::new(share, mirror, state, retired);
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

pub(super) fn is_data_link(path: &str) -> bool {
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
    /// What the records allow to be removed (`None`: a full compare, where the share's
    /// absence of an entry is the whole truth).
    removed: Option<&'a Hints>,
    /// `..data` links whose new target could not be read completely this time.
    unsettled_links: BTreeSet<String>,
    /// File contents carried by the batch's generations (path → content): not read again.
    contents: HashMap<String, Vec<u8>>,
    report: SyncReport,
}

impl<'a> Apply<'a> {
    fn new(share: &'a Path, mirror: &'a Path, state: &'a mut Snapshot, retired: &'a mut Retired) -> Apply<'a> {
        Apply {
            share,
            mirror,
            state,
            retired,
            removed: None,
            unsettled_links: BTreeSet::new(),
            contents: HashMap::new(),
            report: SyncReport::default(),
        }
    }
}

impl Apply<'_> {
    /// Apply the differences between the mirror's `state` and `target`, in the order the
    /// module documentation gives.
    fn run(&mut self, target: &Snapshot, roots: Option<&[String]>) {
        let compare_content = |path: &str| roots.is_none_or(|roots| roots.iter().any(|r| is_within(path, r)));
        let reclaimed = self.retired.reclaim(target);
        self.state.extend(reclaimed);
        let mut vanished: HashMap<u64, String> = self
            .state
            .iter()
            .filter(|(path, e)| e.kind == EntryKind::File && !target.contains_key(*path) && !is_kubelet_internal(path))
            .filter(|(_, e)| e.ino != UNKNOWN_INO)
            .map(|(path, e)| (e.ino, path.clone()))
            .collect();
        // What the `..data` links of `target` publish: filled first, so that each swap below
        // happens as early as it can (nothing else the host did after its swap shows before
        // it, e.g. a file created after a kubelet update).
        let publishing: Vec<String> = target
            .iter()
            .filter_map(|(path, entry)| match &entry.kind {
                EntryKind::Symlink(to) if is_data_link(path) => target_dir(path, to),
                _ => None,
            })
            .collect();
        let published_now = |path: &str| publishing.iter().any(|dir| is_within(path, dir));

        for (path, entry) in target {
            match entry.kind {
                EntryKind::Dir => self.settle_dir(path, entry),
                EntryKind::File if published_now(path) => {
                    self.settle_file(path, entry, compare_content(path), &mut vanished)
                }
                _ => {}
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
            if !is_data_link(path) && !points_through_data(to) && published_now(path) {
                self.settle_symlink(path, entry, target);
            }
        }
        for (path, entry, to) in &links {
            if is_data_link(path) {
                self.swap_data_link(path, entry, to, target);
            }
        }
        for (path, entry) in target {
            if entry.kind == EntryKind::File && !published_now(path) {
                self.settle_file(path, entry, compare_content(path), &mut vanished);
            }
        }
        for (path, entry, to) in &links {
            if !is_data_link(path) && !points_through_data(to) && !published_now(path) {
                self.settle_symlink(path, entry, target);
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
            if self.removed.is_some_and(|hints| !hints.allows_removal(&path)) {
                tracing::debug!(path, "gone from the share before its removal was reported; waiting for that record");
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

    /// Swap the `..data` link at `path` to `to`, only once what it publishes is complete in
    /// the mirror; the directory it stops publishing is retired (kept for a grace).
    fn swap_data_link(&mut self, path: &str, entry: &Entry, to: &Path, target: &Snapshot) {
        let published = target_dir(path, to);
        if self.unsettled_links.contains(path) {
            tracing::debug!(link = path, "..data kept moving while it was read; swapping it on the next sync");
            self.report.deferred.insert(path.to_owned());
            return;
        }
        let missing =
            published.as_ref().filter(|dir| self.state.get(dir.as_str()).is_none_or(|e| e.kind != EntryKind::Dir));
        let incomplete = self.report.deferred.iter().find(|d| published.as_deref().is_some_and(|p| is_within(d, p)));
        if let Some(bad) = missing.or(incomplete) {
            tracing::warn!(
                link = path,
                waiting_for = bad.as_str(),
                "not swapping ..data before its target is complete"
            );
            self.report.deferred.insert(path.to_owned());
            return;
        }
        let before = self.state.get(path).map(|e| e.kind.clone());
        self.settle_symlink(path, entry, target);
        let swapped = self.state.get(path).is_some_and(|e| e.kind == entry.kind);
        if let (true, Some(EntryKind::Symlink(old))) = (swapped, before) {
            // Readers may have resolved the old link a moment ago: keep what it published.
            if let Some(old_dir) = target_dir(path, &old).filter(|old_dir| published.as_ref() != Some(old_dir)) {
                self.retired.retire(old_dir);
            }
        }
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

    /// The share's content of file `path`: carried by a generation, or read through the share.
    fn share_content(&self, path: &str) -> std::io::Result<Vec<u8>> {
        match self.contents.get(path) {
            Some(content) => Ok(content.clone()),
            None => read_capped(&self.share.join(path)),
        }
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
            Some(old) if old.kind == EntryKind::File && same_file(&old, entry) => {
                if !compare && !entry.differs_from(&old) {
                    return;
                }
                let content = match self.share_content(path) {
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
                let content = match self.share_content(path) {
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
                let renamed_from =
                    if is_kubelet_internal(path) { None } else { self.find_renamed(path, entry, vanished) };
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
                let content = match self.share_content(path) {
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
        let by_number = (entry.ino != UNKNOWN_INO).then(|| vanished.remove(&entry.ino)).flatten();
        if let Some(from) = by_number.filter(|from| from != path) {
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
        let content = self.share_content(path).ok()?;
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
        let tmp = if target.contains_key(&kubelet_tmp) { temp_sibling(&dst) } else { self.mirror.join(&kubelet_tmp) };
        let _ = std::fs::remove_file(&tmp);
        let made = std::os::unix::fs::symlink(to, &tmp).and_then(|()| {
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
