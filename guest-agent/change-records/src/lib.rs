//! The change records tern's VMM sends the guest agent about watchable shares, their framing,
//! and the two names both ends must agree on ([`FS_TAG`], [`AGENT_WATCH_PORT`]). The VMM
//! depends on this crate and on nothing else of the agent's protocol; `tern-protocol`
//! re-exports it.
//!
//! The VMM's fs watcher connects to the agent's [`AGENT_WATCH_PORT`] and sends [`ChangeBatch`]
//! frames ([`send_batch`]; the same [`frame`]s as the agent's RPC). The agent answers nothing on
//! this stream. Records are hints, not a log: the agent settles each touched path by comparing
//! the share with its mirror, so a lost or coalesced record costs nothing as long as a later
//! record or a resync covers the path. After connecting, after an `IN_Q_OVERFLOW`, and on the
//! slow periodic timer, the VMM sends a batch with `resync: true`, and the agent compares the
//! whole share.
//!
//! A batch that reports a kubelet `..data` swap also carries the [`Generation`] the link names,
//! read on the host, where reading it takes microseconds: the agent publishes it without
//! reading the share through virtio-fs, so a secret that changes faster than the guest can
//! read it over FUSE still reaches the mirror, one complete generation at a time.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod frame;

use std::io::{Read, Write};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use frame::{FrameError, MAX_FRAME_LEN};

/// vsock port of the agent's change-record stream.
pub const AGENT_WATCH_PORT: u32 = 1026;
/// virtio-fs tag of the VM's one fs device; every share is a subdirectory of it.
pub const FS_TAG: &str = "tern";
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
    /// Host wall clock when the inotify read that saw the first change of the batch returned
    /// (ns since the Unix epoch): the first stage stamp.
    pub first_change_unix_ns: u64,
    /// Host wall clock when the coalescer flushed the batch (0: unknown). Stage stamps are host
    /// clock only; the agent measures its own stages from its receipt, on its own clock.
    #[serde(default)]
    pub flush_unix_ns: u64,
    /// Host wall clock just before the batch was written to the agent's stream (0: unknown).
    #[serde(default)]
    pub send_unix_ns: u64,
    /// Compare the whole share, not just `records`.
    pub resync: bool,
    pub records: Vec<ChangeRecord>,
    /// What the `..data` links the records name published when the VMM sent the batch (at most
    /// [`MAX_GENERATIONS_PER_BATCH`]; a link the VMM could not read completely has none, and the
    /// agent reads it through the share instead).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub generations: Vec<Generation>,
    /// The regular files and symlinks the records name, as the VMM read them just before
    /// sending (content included, at most [`MAX_CARRIED_BYTES`] in all; what it could not read
    /// beneath the share's root is left out). The agent settles these paths from here instead
    /// of reading the share; a newer batch carries newer content.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entries: Vec<HostEntry>,
}

/// Most file content the [`ChangeBatch::entries`] of one batch carry, in bytes.
pub const MAX_CARRIED_BYTES: u64 = 1 << 20;

/// Most [`Generation`]s one batch carries.
pub const MAX_GENERATIONS_PER_BATCH: usize = 4;
/// Most entries of one [`Generation`] (the directory included).
pub const MAX_GENERATION_ENTRIES: usize = 256;
/// Most file content of one [`Generation`], in bytes: Kubernetes' limit for one secret or
/// configMap.
pub const MAX_GENERATION_BYTES: u64 = 1 << 20;

/// The directory a kubelet `..data` link published, read completely on the host: the link was
/// read, then everything below the directory it names, then the link again, and both reads of
/// the link agreed. Kubelet removes a generation's directory only after `..data` has moved
/// away from it, so nothing was missing from the directory while it was read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Generation {
    /// Increases with every generation the VMM reads, over all shares and connections, for the
    /// VM's lifetime: of two generations of one link, the higher was read later.
    pub order: u64,
    /// The `..data` link itself (share-relative path, [`HostContent::Symlink`]).
    pub link: HostEntry,
    /// The directory the link names and everything below it, parents before children
    /// (share-relative paths).
    pub entries: Vec<HostEntry>,
    /// What the link named in the generations the VMM read before this one, latest first (at
    /// most [`MAX_EARLIER_TARGETS`]): a mirror showing one of them shows an older generation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub earlier: Vec<String>,
}

/// Most earlier link targets a [`Generation`] lists.
pub const MAX_EARLIER_TARGETS: usize = 16;

/// One entry of a share read on the host (of a [`Generation`] or [`ChangeBatch::entries`]),
/// with the host metadata the share shows for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostEntry {
    /// Share-relative path (same rules as [`ChangeRecord::path`]).
    pub path: String,
    /// Permission bits (`mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub ino: u64,
    pub size: u64,
    /// (seconds, nanoseconds)
    pub mtime: (i64, i64),
    pub ctime: (i64, i64),
    pub content: HostContent,
}

impl HostEntry {
    /// The entry at `path` as `meta` (from `lstat`/`fstat` on the host) describes it.
    pub fn from_metadata(path: &str, meta: &std::fs::Metadata, content: HostContent) -> HostEntry {
        use std::os::unix::fs::MetadataExt;
        HostEntry {
            path: path.to_owned(),
            mode: meta.mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
            content,
        }
    }
}

/// What a [`HostEntry`] is, with its content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostContent {
    Dir,
    /// A regular file and its whole content (base64 on the wire).
    File(#[serde(with = "base64_bytes")] Vec<u8>),
    /// A symlink and its target.
    Symlink(String),
}

mod base64_bytes {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        STANDARD.decode(text.as_bytes()).map_err(serde::de::Error::custom)
    }
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

/// Version of the change-batch format; part of the agent protocol's version
/// (`tern_protocol::PROTOCOL_VERSION` moves with it).
pub const CHANGE_BATCH_VERSION: u32 = 3;

/// Is `path` a safe share-relative path: non-empty components, no `.`/`..`, not absolute?
pub fn is_safe_relative_path(path: &str) -> bool {
    !path.is_empty()
        && !path.starts_with('/')
        && !path.contains('\0')
        && path.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
}

/// Errors sending or receiving a [`ChangeBatch`].
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("malformed change batch")]
    Json(#[from] serde_json::Error),
}

/// Send `batch` as one frame.
pub fn send_batch<W: Write>(w: &mut W, batch: &ChangeBatch) -> Result<(), BatchError> {
    Ok(frame::write_frame(w, &serde_json::to_vec(batch)?)?)
}

/// Read one [`ChangeBatch`] frame.
pub fn recv_batch<R: Read>(r: &mut R) -> Result<ChangeBatch, BatchError> {
    Ok(serde_json::from_slice(&frame::read_frame(r)?)?)
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
    fn a_batch_round_trips_through_a_frame() {
        let batch = ChangeBatch {
            share: "s".into(),
            seq: 7,
            first_change_unix_ns: 1,
            flush_unix_ns: 2,
            send_unix_ns: 3,
            resync: false,
            records: vec![ChangeRecord { path: "f".into(), kind: ChangeKind::Created, from: None }],
            generations: Vec::new(),
            entries: Vec::new(),
        };
        let mut wire = Vec::new();
        send_batch(&mut wire, &batch).unwrap();
        assert_eq!(u32::from_be_bytes(wire[..4].try_into().unwrap()) as usize, wire.len() - 4);
        assert_eq!(recv_batch(&mut &wire[..]).unwrap(), batch);
    }

    #[test]
    fn a_generation_round_trips_with_binary_content() {
        let entry = |path: &str, content| HostEntry {
            path: path.into(),
            mode: 0o644,
            uid: 0,
            gid: 0,
            ino: 9,
            size: 3,
            mtime: (1, 2),
            ctime: (3, 4),
            content,
        };
        let generation = Generation {
            order: 5,
            link: entry("..data", HostContent::Symlink("..2026_12_06".into())),
            entries: vec![
                entry("..2026_12_06", HostContent::Dir),
                entry("..2026_12_06/key", HostContent::File(vec![0, 0xff, b'\n'])),
            ],
            earlier: vec!["..2026_12_05".into()],
        };
        let batch = ChangeBatch {
            share: "s".into(),
            seq: 1,
            first_change_unix_ns: 0,
            flush_unix_ns: 0,
            send_unix_ns: 0,
            resync: false,
            records: Vec::new(),
            generations: vec![generation],
            entries: Vec::new(),
        };
        let json = serde_json::to_string(&batch).unwrap();
        assert!(json.contains(r#""file":"AP8K""#), "{json}");
        assert_eq!(serde_json::from_str::<ChangeBatch>(&json).unwrap(), batch);
        // A batch without generations does not spell the field, and one without it decodes.
        let mut plain = batch.clone();
        plain.generations.clear();
        let json = serde_json::to_string(&plain).unwrap();
        assert!(!json.contains("generations"), "{json}");
        assert_eq!(serde_json::from_str::<ChangeBatch>(&json).unwrap(), plain);
        let bad = r#"{"share":"s","seq":1,"first_change_unix_ns":0,"resync":false,"records":[],
            "generations":[{"order":1,"link":{"path":"..data","mode":0,"uid":0,"gid":0,"ino":0,"size":0,
            "mtime":[0,0],"ctime":[0,0],"content":{"file":"not base64!"}},"entries":[]}]}"#;
        assert!(serde_json::from_str::<ChangeBatch>(bad).is_err());
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
