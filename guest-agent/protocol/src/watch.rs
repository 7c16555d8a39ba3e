//! Change records: how the VMM's fs watcher tells the agent that a watchable share changed.
//!
//! The VMM connects to the agent's [`crate::AGENT_WATCH_PORT`] and sends [`ChangeBatch`]
//! frames (same framing as RPC: [`crate::send`]/[`crate::recv`]). The agent answers nothing on
//! this stream. Records are hints, not a log: the agent settles each touched path by comparing
//! the share with its mirror, so a lost or coalesced record costs nothing as long as a later
//! record or a resync covers the path. After connecting, after an `IN_Q_OVERFLOW`, and on the
//! slow periodic timer, the VMM sends a batch with `resync: true`, and the agent compares the
//! whole share.

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Most entries (files, directories and symlinks, the share root not counted) a watchable
/// mount may hold before it falls back to a bind mount. Kata uses 16 as well: a secret with
/// three keys is nine entries in kubelet's atomic-writer layout.
pub const MAX_ENTRIES: usize = 16;
/// Most bytes a watchable mount may hold: the sum of regular files' sizes plus the length of
/// every symlink's target (directories count 0). Counted the same way on host and guest.
pub const MAX_BYTES: u64 = 1 << 20;
/// Interval of [`crate::WatchMode::Poll`] (Kata's agent polls every 2 s).
pub const POLL_INTERVAL: Duration = Duration::from_secs(2);
/// Default interval of the safety-net full resync in event mode.
pub const DEFAULT_RESYNC_INTERVAL: Duration = Duration::from_secs(60);
/// Most records in one batch; a larger burst is sent as a resync instead.
pub const MAX_RECORDS_PER_BATCH: usize = 256;

/// One coalesced burst of changes in one share.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeBatch {
    /// The share (subdirectory name of the fs device) the paths are relative to.
    pub share: String,
    /// Increases by one per batch on a connection; a gap means lost batches (agent resyncs).
    pub seq: u64,
    /// Host wall clock when the first change of the batch was seen (ns since the Unix epoch),
    /// for change -> apply latency.
    pub first_change_unix_ns: u64,
    /// Compare the whole share, not just `records`.
    pub resync: bool,
    pub records: Vec<ChangeRecord>,
}

/// Something happened at `path` (relative to the share root, `/`-separated, never absolute
/// and never containing `..`: the agent refuses such records).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeRecord {
    pub path: String,
    pub kind: ChangeKind,
    /// For [`ChangeKind::Moved`]: the share-relative path the entry at `path` was renamed
    /// from, when the watcher saw both ends of the rename (same rules as `path`, checked with
    /// [`is_safe_relative_path`]). The old path also gets a record of its own, so an agent
    /// that ignores this field still settles both ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
}

/// What the host watcher saw. Advisory: the agent re-reads the share to settle it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    Created,
    Modified,
    Removed,
    /// Renamed to or from this path (both ends get a record; the new end names the old one
    /// in [`ChangeRecord::from`] when the watcher paired them).
    Moved,
}

/// Is `path` a safe share-relative path: non-empty components, no `.`/`..`, not absolute?
pub fn is_safe_relative_path(path: &str) -> bool {
    !path.is_empty()
        && !path.starts_with('/')
        && !path.contains('\0')
        && path.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_with_and_without_from() {
        let plain = ChangeRecord { path: "f".into(), kind: ChangeKind::Modified, from: None };
        let json = serde_json::to_string(&plain).unwrap();
        assert!(!json.contains("from"), "{json}");
        assert_eq!(serde_json::from_str::<ChangeRecord>(&json).unwrap(), plain);

        let moved = ChangeRecord { path: "d/g".into(), kind: ChangeKind::Moved, from: Some("f".into()) };
        let json = serde_json::to_string(&moved).unwrap();
        assert_eq!(serde_json::from_str::<ChangeRecord>(&json).unwrap(), moved);

        // What an older watcher sends still decodes.
        let old: ChangeRecord = serde_json::from_str(r#"{"path":"g","kind":"moved"}"#).unwrap();
        assert_eq!(old, ChangeRecord { path: "g".into(), kind: ChangeKind::Moved, from: None });
    }

    #[test]
    fn unsafe_paths_are_refused() {
        for bad in ["", "/etc/passwd", "../x", "a/../../b", "a//b", "./a", "a/.", "a\0b"] {
            assert!(!is_safe_relative_path(bad), "{bad:?} accepted");
        }
        for good in ["a", "..data", "..2026_11_26/key", "dir/sub/file"] {
            assert!(is_safe_relative_path(good), "{good:?} refused");
        }
    }
}
