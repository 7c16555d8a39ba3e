//! A share's tree as the mirror sees it: share-relative paths with the host metadata that
//! tells whether an entry changed, scanned with a budget so a huge share costs at most
//! [`MAX_ENTRIES`] + 1 lookups before it is declared over the limit.

use std::collections::BTreeMap;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use tern_protocol::watch::{MAX_BYTES, MAX_ENTRIES};

/// What kind of entry, with a symlink's target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    Dir,
    File,
    Symlink(PathBuf),
}

/// One entry of a share (or of what the mirror holds of it), with the host metadata seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub kind: EntryKind,
    /// Permission bits (`mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub ino: u64,
    pub size: u64,
    /// (seconds, nanoseconds); compared together with size, ctime and inode, never alone.
    pub mtime: (i64, i64),
    pub ctime: (i64, i64),
}

impl Entry {
    /// The entry at `path` (not following a final symlink); `None` for special files, which
    /// a secret or configMap never holds and the mirror skips.
    pub fn read(path: &Path) -> io::Result<Option<Entry>> {
        let meta = std::fs::symlink_metadata(path)?;
        let ft = meta.file_type();
        let kind = if ft.is_dir() {
            EntryKind::Dir
        } else if ft.is_file() {
            EntryKind::File
        } else if ft.is_symlink() {
            EntryKind::Symlink(std::fs::read_link(path)?)
        } else {
            return Ok(None);
        };
        Ok(Some(Entry {
            kind,
            mode: meta.mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }))
    }

    /// Bytes this entry counts towards [`MAX_BYTES`]: a file's size, a symlink target's
    /// length, 0 for a directory.
    pub fn counted_bytes(&self) -> u64 {
        match &self.kind {
            EntryKind::Dir => 0,
            EntryKind::File => self.size,
            EntryKind::Symlink(target) => target.as_os_str().len() as u64,
        }
    }

    /// Did the host change this entry since `older` was seen (by size, mtime, ctime, inode
    /// and mode, never mtime alone)?
    pub fn differs_from(&self, older: &Entry) -> bool {
        self != older
    }
}

/// Share-relative path (`a/b`, no leading `/`) → entry. The share root is not in it.
pub type Snapshot = BTreeMap<String, Entry>;

/// How far past the limits a share is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LimitExceeded {
    #[error("more than {MAX_ENTRIES} entries")]
    Entries,
    #[error("{0} bytes, more than the {MAX_BYTES}-byte limit")]
    Bytes(u64),
}

/// Errors scanning a share.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("share is over the watchable limits: {0}")]
    OverLimit(LimitExceeded),
    #[error("cannot read {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// `dir/name`, or `name` at the root.
pub fn join_rel(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_owned()
    } else {
        format!("{dir}/{name}")
    }
}

/// Is `path` equal to `root` or below it?
pub fn is_within(path: &str, root: &str) -> bool {
    root.is_empty() || path == root || path.strip_prefix(root).is_some_and(|rest| rest.starts_with('/'))
}

/// Add everything below directory `rel` of `share_root` to `into`, failing as soon as `into`
/// holds more than [`MAX_ENTRIES`] entries. Entries that vanish while we look are skipped
/// (their removal has a record of its own); `rel` itself vanishing is an error only for the
/// share root.
pub fn scan_below(share_root: &Path, rel: &str, into: &mut Snapshot) -> Result<(), ScanError> {
    let mut stack = vec![rel.to_owned()];
    while let Some(dir) = stack.pop() {
        let host_dir = share_root.join(&dir);
        let entries = match std::fs::read_dir(&host_dir) {
            Ok(entries) => entries,
            Err(e) if dir.is_empty() => return Err(ScanError::Io { path: host_dir, source: e }),
            Err(e) => {
                tracing::warn!(dir, error = %e, "directory vanished while scanning the share");
                continue;
            }
        };
        for entry in entries {
            let entry = match entry {
                Ok(entry) => entry,
                Err(e) => {
                    tracing::warn!(dir, error = %e, "cannot list the share");
                    continue;
                }
            };
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                tracing::warn!(dir, "skipping a file name that is not UTF-8");
                continue;
            };
            let rel = join_rel(&dir, &name);
            let found = match Entry::read(&entry.path()) {
                Ok(Some(found)) => found,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(path = rel, error = %e, "entry vanished while scanning the share");
                    continue;
                }
            };
            if found.kind == EntryKind::Dir {
                stack.push(rel.clone());
            }
            into.insert(rel, found);
            if into.len() > MAX_ENTRIES {
                return Err(ScanError::OverLimit(LimitExceeded::Entries));
            }
        }
    }
    Ok(())
}

/// Check a complete snapshot against the limits.
pub fn check_limits(snapshot: &Snapshot) -> Result<(), LimitExceeded> {
    if snapshot.len() > MAX_ENTRIES {
        return Err(LimitExceeded::Entries);
    }
    let bytes: u64 = snapshot.values().map(Entry::counted_bytes).sum();
    if bytes > MAX_BYTES {
        return Err(LimitExceeded::Bytes(bytes));
    }
    Ok(())
}

/// Read a share file for copying, at most one byte past [`MAX_BYTES`] (a file that grew past
/// the limit is caught by the next scan).
pub fn read_capped(path: &Path) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let mut content = Vec::new();
    std::fs::File::open(path)?.take(MAX_BYTES + 1).read_to_end(&mut content)?;
    Ok(content)
}
