//! Coalescing of host change records into [`ChangeBatch`]es.
//!
//! A kubelet update is a handful of renames within a millisecond; a `tar x` is thousands of
//! events. The watcher pushes every record here and flushes when the burst is over: after
//! [`QUIET_PERIOD`] without a new record, when [`FLUSH_RECORDS`] distinct paths are pending,
//! or when the oldest pending record is [`MAX_DELAY`] old (so a never-ending stream of events
//! cannot postpone delivery forever). Records for the same path within one batch collapse into
//! one (records are hints: the agent re-reads the path anyway), keeping a rename's old path.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use tern_change_records::{ChangeKind, ChangeRecord, MAX_RECORDS_PER_BATCH};

/// A burst is over after this long without a new record.
pub const QUIET_PERIOD: Duration = Duration::from_millis(2);
/// Flush as soon as this many distinct paths are pending (over all shares).
pub const FLUSH_RECORDS: usize = 256;
/// Flush at the latest this long after the first pending record.
pub const MAX_DELAY: Duration = Duration::from_millis(20);

/// What one share's flushed burst turned into. `seq` is assigned by the sender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingBatch {
    pub share: String,
    pub first_change_unix_ns: u64,
    /// Wall clock of the flush (0 until the reader hands the batch to the link).
    pub flush_unix_ns: u64,
    /// True when the burst had more distinct paths than one batch may carry: the agent then
    /// compares the whole share instead.
    pub resync: bool,
    pub records: Vec<ChangeRecord>,
}

#[derive(Debug)]
struct ShareBurst {
    first_change_unix_ns: u64,
    records: Vec<ChangeRecord>,
    index: HashMap<String, usize>,
    too_many: bool,
}

/// Collects records per share until the burst is over.
#[derive(Debug)]
pub struct Coalescer {
    quiet: Duration,
    max_delay: Duration,
    flush_records: usize,
    bursts: BTreeMap<String, ShareBurst>,
    pending: usize,
    first_at: Option<Instant>,
    last_at: Option<Instant>,
}

impl Default for Coalescer {
    fn default() -> Self {
        Self::new(QUIET_PERIOD, MAX_DELAY, FLUSH_RECORDS)
    }
}

impl Coalescer {
    /// A coalescer with explicit thresholds (tests use long ones).
    pub fn new(quiet: Duration, max_delay: Duration, flush_records: usize) -> Self {
        Coalescer {
            quiet,
            max_delay,
            flush_records,
            bursts: BTreeMap::new(),
            pending: 0,
            first_at: None,
            last_at: None,
        }
    }

    /// Note `record` (a change in `share`) at `now` (`unix_ns`: the wall clock).
    pub fn push(&mut self, share: &str, record: ChangeRecord, now: Instant, unix_ns: u64) {
        self.first_at.get_or_insert(now);
        self.last_at = Some(now);
        let burst = self.bursts.entry(share.to_owned()).or_insert_with(|| ShareBurst {
            first_change_unix_ns: unix_ns,
            records: Vec::new(),
            index: HashMap::new(),
            too_many: false,
        });
        if burst.too_many {
            return;
        }
        if let Some(&at) = burst.index.get(&record.path) {
            // The latest kind wins, except that a change never hides that the entry went away
            // (the agent removes only what a record says was removed or renamed away, and a
            // late IN_MODIFY/IN_ATTRIB can follow the IN_DELETE or IN_MOVED_FROM of a name);
            // the position of the first sighting keeps the order. A rename's old path stays
            // known through later changes at the new path (write then rename then write is
            // still a rename), until the entry is removed.
            if let Some(pending) = burst.records.get_mut(at) {
                let went_away = matches!(pending.kind, ChangeKind::Removed | ChangeKind::Moved);
                if !(went_away && record.kind == ChangeKind::Modified) {
                    pending.kind = record.kind;
                }
                if record.kind == ChangeKind::Removed {
                    pending.from = None;
                } else if record.from.is_some() {
                    pending.from = record.from;
                }
            }
            return;
        }
        if burst.records.len() >= MAX_RECORDS_PER_BATCH {
            burst.too_many = true;
            self.pending -= burst.records.len();
            burst.records.clear();
            burst.index.clear();
            return;
        }
        burst.index.insert(record.path.clone(), burst.records.len());
        burst.records.push(record);
        self.pending += 1;
    }

    /// When the pending burst must be flushed at the latest (`None`: nothing pending).
    pub fn deadline(&self) -> Option<Instant> {
        let (first, last) = (self.first_at?, self.last_at?);
        Some((last + self.quiet).min(first + self.max_delay))
    }

    /// Should the pending burst be flushed now?
    pub fn is_due(&self, now: Instant) -> bool {
        if self.bursts.is_empty() {
            return false;
        }
        self.pending >= self.flush_records || self.deadline().is_some_and(|d| now >= d)
    }

    /// Take everything pending, one batch per share.
    pub fn take(&mut self) -> Vec<PendingBatch> {
        self.pending = 0;
        self.first_at = None;
        self.last_at = None;
        std::mem::take(&mut self.bursts)
            .into_iter()
            .map(|(share, burst)| PendingBatch {
                share,
                first_change_unix_ns: burst.first_change_unix_ns,
                flush_unix_ns: 0,
                resync: burst.too_many,
                records: burst.records,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn long() -> Coalescer {
        Coalescer::new(Duration::from_millis(2), Duration::from_millis(20), 256)
    }

    fn rec(path: impl Into<String>, kind: ChangeKind) -> ChangeRecord {
        ChangeRecord { path: path.into(), kind, from: None }
    }

    fn moved(to: &str, from: &str) -> ChangeRecord {
        ChangeRecord { path: to.into(), kind: ChangeKind::Moved, from: Some(from.into()) }
    }

    #[test]
    fn a_kubelet_update_is_one_batch_with_one_record_per_path() {
        let mut c = long();
        let t0 = Instant::now();
        let ts = "..2026_11_26_13_00_00.123456789";
        c.push("s", rec(ts, ChangeKind::Created), t0, 7);
        c.push("s", rec(format!("{ts}/key"), ChangeKind::Created), t0, 8);
        c.push("s", rec(format!("{ts}/key"), ChangeKind::Modified), t0, 9);
        c.push("s", rec("..data_tmp", ChangeKind::Created), t0, 10);
        c.push("s", rec("..data_tmp", ChangeKind::Moved), t0, 11);
        c.push("s", rec("..data", ChangeKind::Moved), t0, 12);
        assert!(!c.is_due(t0));
        assert!(c.is_due(t0 + Duration::from_millis(2)));
        let batches = c.take();
        assert_eq!(batches.len(), 1);
        let b = &batches[0];
        assert_eq!(b.first_change_unix_ns, 7);
        assert!(!b.resync);
        let paths: Vec<_> = b.records.iter().map(|r| (r.path.as_str(), r.kind)).collect();
        assert_eq!(
            paths,
            vec![
                (ts, ChangeKind::Created),
                (&*format!("{ts}/key"), ChangeKind::Modified),
                ("..data_tmp", ChangeKind::Moved),
                ("..data", ChangeKind::Moved),
            ]
        );
        assert!(!c.is_due(t0 + Duration::from_secs(1)));
    }

    #[test]
    fn a_rename_keeps_its_old_path_through_later_changes() {
        let mut c = long();
        let t0 = Instant::now();
        c.push("s", rec("f", ChangeKind::Modified), t0, 1);
        c.push("s", rec("f", ChangeKind::Moved), t0, 2);
        c.push("s", moved("g", "f"), t0, 3);
        c.push("s", rec("g", ChangeKind::Modified), t0, 4);
        c.push("s", rec("h", ChangeKind::Created), t0, 5);
        c.push("s", moved("h", "x"), t0, 6);
        c.push("s", rec("h", ChangeKind::Removed), t0, 7);
        let records = c.take().remove(0).records;
        assert_eq!(records, vec![rec("f", ChangeKind::Moved), moved("g", "f"), rec("h", ChangeKind::Removed),]);
    }

    #[test]
    fn a_modify_then_a_rename_stays_a_rename_and_a_late_change_never_hides_a_removal() {
        let mut c = long();
        let t0 = Instant::now();
        // Write then rename: the old name went away, the new one names it.
        c.push("s", rec("f", ChangeKind::Modified), t0, 1);
        c.push("s", rec("f", ChangeKind::Moved), t0, 2);
        c.push("s", moved("g", "f"), t0, 3);
        c.push("s", rec("f", ChangeKind::Modified), t0, 4);
        c.push("s", rec("g", ChangeKind::Modified), t0, 5);
        // Removed, then a late attribute change of the same name.
        c.push("s", rec("x", ChangeKind::Removed), t0, 6);
        c.push("s", rec("x", ChangeKind::Modified), t0, 7);
        // Removed and created again: the new entry is what is there.
        c.push("s", rec("y", ChangeKind::Removed), t0, 8);
        c.push("s", rec("y", ChangeKind::Created), t0, 9);
        c.push("s", rec("y", ChangeKind::Modified), t0, 10);
        let records = c.take().remove(0).records;
        assert_eq!(
            records,
            vec![
                rec("f", ChangeKind::Moved),
                moved("g", "f"),
                rec("x", ChangeKind::Removed),
                rec("y", ChangeKind::Modified),
            ]
        );
    }

    #[test]
    fn quiet_period_restarts_but_max_delay_caps_it() {
        let mut c = long();
        let t0 = Instant::now();
        for i in 0..30u64 {
            c.push("s", rec("f", ChangeKind::Modified), t0 + Duration::from_millis(i), i);
        }
        // Never 2 ms of quiet, but the first record is 20 ms old by t0 + 20 ms.
        assert_eq!(c.deadline(), Some(t0 + Duration::from_millis(20)));
        assert!(c.is_due(t0 + Duration::from_millis(20)));
    }

    #[test]
    fn enough_distinct_paths_flush_at_once() {
        let mut c = Coalescer::new(Duration::from_secs(1), Duration::from_secs(1), 4);
        let t0 = Instant::now();
        for i in 0..4 {
            c.push("s", rec(format!("f{i}"), ChangeKind::Created), t0, 0);
        }
        assert!(c.is_due(t0));
    }

    #[test]
    fn too_many_paths_in_one_share_become_a_resync() {
        let mut c = Coalescer::new(Duration::from_secs(1), Duration::from_secs(1), usize::MAX);
        let t0 = Instant::now();
        for i in 0..=MAX_RECORDS_PER_BATCH {
            c.push("big", rec(format!("f{i}"), ChangeKind::Created), t0, 0);
        }
        c.push("small", rec("x", ChangeKind::Removed), t0, 0);
        let batches = c.take();
        assert_eq!(batches.len(), 2);
        assert_eq!(batches[0].share, "big");
        assert!(batches[0].resync);
        assert!(batches[0].records.is_empty());
        assert_eq!(batches[1].share, "small");
        assert!(!batches[1].resync);
        assert_eq!(batches[1].records.len(), 1);
    }
}
