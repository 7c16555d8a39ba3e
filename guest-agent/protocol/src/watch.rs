//! Change records: how the VMM's fs watcher tells the agent that a watchable share changed.
//! The records and their framing are defined in `tern-change-records` (re-exported here), the
//! one crate the VMM shares with the agent; the limits below are the agent's and runtime's.

use std::time::Duration;

pub use tern_change_records::{
    is_safe_relative_path, ChangeBatch, ChangeKind, ChangeRecord, Generation, HostContent, HostEntry,
    DEFAULT_RESYNC_INTERVAL, MAX_GENERATION_ENTRIES, MAX_RECORDS_PER_BATCH,
};

/// Most entries (files, directories and symlinks, the share root not counted) a watchable
/// mount may hold before it falls back to a bind mount. Kata uses 16 as well: a secret with
/// three keys is nine entries in kubelet's atomic-writer layout.
pub const MAX_ENTRIES: usize = 16;
/// Most bytes a watchable mount may hold: the sum of regular files' sizes plus the length of
/// every symlink's target (directories count 0). Counted the same way on host and guest.
pub const MAX_BYTES: u64 = 1 << 20;
/// Interval of [`crate::WatchMode::Poll`] (Kata's agent polls every 2 s).
pub const POLL_INTERVAL: Duration = Duration::from_secs(2);
