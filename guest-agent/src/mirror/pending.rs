//! The work queued for the mirror-sync thread: change batches merged into paths to settle per
//! share, with the renames the watcher paired; an unsafe path or too many paths turn a share's
//! work into a full compare.

use std::collections::BTreeMap;

use tern_protocol::watch::{is_safe_relative_path, ChangeBatch, ChangeKind, HostContent, MAX_RECORDS_PER_BATCH};
use tern_protocol::{WatchStageSample, MAX_WATCH_STAGE_SAMPLES};
use tracing::warn;

use super::moves::Rename;
use super::sync::{generation_dir, Hints};
use super::tree::is_within;

/// Most distinct paths queued for one share before the work becomes a full resync.
const MAX_QUEUED_PATHS: usize = 4 * MAX_RECORDS_PER_BATCH;

/// Work queued by the listeners for the sync thread.
#[derive(Debug, Default)]
pub struct PendingWork {
    pub resync_all: bool,
    pub shares: BTreeMap<String, ShareWork>,
}

#[derive(Debug, Default)]
pub struct ShareWork {
    pub resync: bool,
    /// The paths to settle, and those whose records said removed or renamed away.
    pub hints: Hints,
    /// Renames whose both ends the watcher saw, in the order seen (applied before `paths`
    /// are settled).
    pub renames: Vec<Rename>,
    /// The stage stamps of the batches merged here, reported once they are applied.
    pub received: Vec<WatchStageSample>,
}

/// Add a batch's work to what is queued: records become paths to settle; a resync, an
/// unsafe path or too many paths become a full compare of the share. `receipt_mono_ns` is when
/// the agent received the batch (guest monotonic clock), for its stage stamps.
pub fn merge_batch(work: &mut PendingWork, batch: ChangeBatch, gap: bool, receipt_mono_ns: u64) {
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
    // What this batch's records name supersedes what earlier batches carried for it.
    for record in &batch.records {
        for named in [Some(&record.path), record.from.as_ref()].into_iter().flatten() {
            share.hints.entries.retain(|path, _| !is_within(path, named));
        }
    }
    for entry in batch.entries {
        let kubelet_internal = entry.path.split('/').any(|c| c.starts_with(".."));
        let plain = matches!(entry.content, HostContent::File(_) | HostContent::Symlink(_));
        let sound = match &entry.content {
            HostContent::File(bytes) => bytes.len() as u64 == entry.size,
            _ => true,
        };
        if is_safe_relative_path(&entry.path) && !kubelet_internal && plain && sound {
            share.hints.entries.insert(entry.path.clone(), entry);
        } else {
            warn!(path = entry.path, "unusable carried entry in a change batch; the share is read instead");
        }
    }
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
            share.renames.push(Rename { from, to: record.path.clone() });
        }
        if matches!(record.kind, ChangeKind::Removed | ChangeKind::Moved) {
            share.hints.removed.insert(record.path.clone());
        }
        share.hints.paths.insert(record.path);
    }
    for generation in batch.generations {
        if generation_dir(&generation).is_none() {
            // The records of the batch still name the link: the share is read instead.
            warn!(link = generation.link.path, "malformed generation in a change batch; ignored");
            continue;
        }
        let link = generation.link.path.clone();
        if share.hints.generations.get(&link).is_none_or(|queued| queued.order < generation.order) {
            share.hints.generations.insert(link, generation);
        }
    }
    if share.hints.paths.len() > MAX_QUEUED_PATHS || share.renames.len() > MAX_QUEUED_PATHS {
        share.resync = true;
    }
    if share.resync {
        share.hints = Hints::default();
        share.renames.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            generations: Vec::new(),
            entries: Vec::new(),
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
    fn the_latest_well_formed_generation_of_a_link_is_queued() {
        use tern_protocol::watch::{Generation, HostContent, HostEntry};
        let entry = |path: &str, content| HostEntry {
            path: path.into(),
            mode: 0o644,
            uid: 0,
            gid: 0,
            ino: 1,
            size: 0,
            mtime: (0, 0),
            ctime: (0, 0),
            content,
        };
        let generation = |order, dir: &str| Generation {
            order,
            link: entry("..data", HostContent::Symlink(dir.into())),
            entries: vec![entry(dir, HostContent::Dir), entry(&format!("{dir}/k"), HostContent::File(vec![]))],
            earlier: Vec::new(),
        };
        let batch = |generations| ChangeBatch {
            share: "s".into(),
            seq: 1,
            first_change_unix_ns: 0,
            flush_unix_ns: 0,
            send_unix_ns: 0,
            resync: false,
            records: Vec::new(),
            generations,
            entries: Vec::new(),
        };
        let mut work = PendingWork::default();
        merge_batch(&mut work, batch(vec![generation(2, "..b")]), false, 0);
        merge_batch(&mut work, batch(vec![generation(1, "..a")]), false, 0);
        assert_eq!(work.shares["s"].hints.generations["..data"].order, 2, "an older one does not replace it");
        let mut escaping = generation(3, "..c");
        escaping.entries[1].path = "..c/../../etc/passwd".into();
        merge_batch(&mut work, batch(vec![escaping]), false, 0);
        assert_eq!(work.shares["s"].hints.generations["..data"].order, 2, "a malformed one is dropped");
        merge_batch(&mut work, batch(vec![generation(4, "..d")]), false, 0);
        assert_eq!(work.shares["s"].hints.generations["..data"].order, 4);
    }

    #[test]
    fn a_later_record_without_content_drops_what_an_earlier_batch_carried() {
        use tern_protocol::watch::{ChangeRecord, HostEntry};
        let entry = |path: &str, content: &[u8]| HostEntry {
            path: path.into(),
            mode: 0o644,
            uid: 0,
            gid: 0,
            ino: 1,
            size: content.len() as u64,
            mtime: (0, 0),
            ctime: (0, 0),
            content: HostContent::File(content.to_vec()),
        };
        let batch = |path: &str, kind, entries| ChangeBatch {
            share: "s".into(),
            seq: 1,
            first_change_unix_ns: 0,
            flush_unix_ns: 0,
            send_unix_ns: 0,
            resync: false,
            records: vec![ChangeRecord { path: path.into(), kind, from: None }],
            generations: Vec::new(),
            entries,
        };
        let mut work = PendingWork::default();
        merge_batch(&mut work, batch("d/f", ChangeKind::Modified, vec![entry("d/f", b"1")]), false, 0);
        merge_batch(&mut work, batch("g", ChangeKind::Modified, vec![entry("g", b"1")]), false, 0);
        merge_batch(&mut work, batch("g", ChangeKind::Modified, vec![entry("g", b"22")]), false, 0);
        assert_eq!(work.shares["s"].hints.entries["g"].size, 2, "the latest content wins");
        merge_batch(&mut work, batch("d", ChangeKind::Removed, Vec::new()), false, 0);
        assert!(!work.shares["s"].hints.entries.contains_key("d/f"), "removed with its directory");
        let mut torn = entry("h", b"abc");
        torn.size = 9;
        let internal = entry("..2026/key", b"k");
        merge_batch(&mut work, batch("h", ChangeKind::Created, vec![torn, internal, entry("../x", b"")]), false, 0);
        assert_eq!(work.shares["s"].hints.entries.keys().collect::<Vec<_>>(), ["g"]);
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
            generations: Vec::new(),
            entries: Vec::new(),
        };
        let mut work = PendingWork::default();
        merge_batch(&mut work, batch("f"), false, 0);
        let queued = &work.shares["s"];
        assert_eq!(queued.hints.paths.iter().map(String::as_str).collect::<Vec<_>>(), ["f", "g"]);
        // Both ends of the rename may be removed from the mirror when the share lacks them.
        assert_eq!(queued.hints.removed.iter().map(String::as_str).collect::<Vec<_>>(), ["f", "g"]);
        assert_eq!(queued.renames, [Rename { from: "f".into(), to: "g".into() }]);
        merge_batch(&mut work, batch("../etc/passwd"), false, 0);
        let queued = &work.shares["s"];
        assert!(queued.resync && queued.hints.paths.is_empty() && queued.renames.is_empty());
    }
}
