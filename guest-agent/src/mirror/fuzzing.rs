//! The harness of the `change_records` fuzz target (`fuzz/`, feature `fuzzing` of the agent's
//! library), also run over the committed corpus by the agent's unit tests.
//!
//! The input mixes changes made to the host share (files, directories, symlinks pointing out
//! of the share, kubelet's `..data` layout, renames, removals) with change batches (raw frames
//! decoded as the agent decodes them, or batches with paths holding `..`, absolute paths, NUL
//! bytes, other shares, long record lists, carried generations whose paths or links leave their
//! directory), merged and applied as the mirror-sync thread does:
//! paired renames first, then the named paths, or a full compare. After every step nothing
//! outside the mirror may have been created, changed or removed.

use std::collections::BTreeMap;
use std::io::Cursor;
use std::os::unix::fs::{symlink, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tern_protocol::watch::{ChangeBatch, ChangeKind, ChangeRecord, Generation, HostContent, HostEntry};
use tern_protocol::{frame, recv};

use super::moves::apply_renames;
use super::pending::{merge_batch, PendingWork};
use super::retired::Retired;
use super::sync::{remove_expired, sync_mirror, Scope};
use super::tree::Snapshot;

const SHARE: &str = "s";
const OTHER_SHARE: &str = "t";
const NAMES: [&str; 12] =
    ["a", "d", "b", "..data", "..2026_01", "..2026_02", "key", "up", "abs", "x", "..data_tmp", "e"];
const MAX_OPS: usize = 64;

struct Cursor8<'a>(&'a [u8]);

impl Cursor8<'_> {
    fn u8(&mut self) -> u8 {
        let Some((&b, rest)) = self.0.split_first() else { return 0 };
        self.0 = rest;
        b
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let (head, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        head.to_vec()
    }
    /// A share-relative path of one to three names from [`NAMES`].
    fn path(&mut self) -> String {
        let depth = 1 + usize::from(self.u8() % 3);
        (0..depth).map(|_| NAMES[usize::from(self.u8()) % NAMES.len()]).collect::<Vec<_>>().join("/")
    }
    /// A record path: mostly from [`NAMES`], sometimes hostile.
    fn record_path(&mut self) -> String {
        match self.u8() % 8 {
            0 => "../outside/secret".into(),
            1 => "/etc/passwd".into(),
            2 => format!("{}/../../outside", self.path()),
            3 => {
                let n = usize::from(self.u8() % 32);
                String::from_utf8_lossy(&self.bytes(n)).into_owned()
            }
            4 => format!("{}\0x", self.path()),
            _ => self.path(),
        }
    }
}

/// Path, kind, size, mode, mtime and content of everything under `dir`.
fn tree(dir: &Path) -> BTreeMap<PathBuf, (u32, u64, i64, i64, Vec<u8>)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let p = e.path();
            let Ok(m) = p.symlink_metadata() else { continue };
            let content = if m.is_file() {
                std::fs::read(&p).unwrap_or_default()
            } else if m.is_symlink() {
                std::fs::read_link(&p).map(|t| t.into_os_string().into_encoded_bytes()).unwrap_or_default()
            } else {
                stack.push(p.clone());
                Vec::new()
            };
            out.insert(p, (m.mode(), m.size(), m.mtime(), m.mtime_nsec(), content));
        }
    }
    out
}

/// Whether `rel` below `root` can be reached without passing a symlink (the harness changes
/// the share only inside it, as a host would).
fn inside(root: &Path, rel: &str) -> bool {
    let mut p = root.to_path_buf();
    let parts: Vec<&str> = rel.split('/').collect();
    for part in &parts[..parts.len() - 1] {
        p.push(part);
        match p.symlink_metadata() {
            Ok(m) if m.is_dir() => {}
            _ => return false,
        }
    }
    true
}

/// A change to the host share.
fn change_share(share: &Path, outside: &Path, c: &mut Cursor8<'_>) {
    let rel = c.path();
    if !inside(share, &rel) {
        return;
    }
    let p = share.join(&rel);
    let _ = match c.u8() % 7 {
        0 => write_here(&p, &c.bytes(16)),
        1 => std::fs::create_dir(&p),
        2 => {
            let target = match c.u8() % 5 {
                0 => PathBuf::from("../outside"),
                1 => outside.join("secret"),
                2 => PathBuf::from("..data/key"),
                3 => PathBuf::from("/"),
                _ => PathBuf::from(c.path()),
            };
            symlink(target, &p)
        }
        3 => std::fs::remove_file(&p).or_else(|_| std::fs::remove_dir_all(&p)),
        4 => {
            let to = c.path();
            if inside(share, &to) {
                std::fs::rename(&p, share.join(to))
            } else {
                Ok(())
            }
        }
        5 => {
            // Kubelet's atomic update: a new timestamped directory, `..data` swapped to it.
            let dir = format!("..2026_0{}", c.u8() % 3);
            let _ = std::fs::create_dir(share.join(&dir));
            if !share.join(&dir).symlink_metadata().is_ok_and(|m| m.is_dir()) {
                // A symlink by that name (made by an earlier step) would lead the write out
                // of the share: the host never writes through one.
                return;
            }
            let _ = write_here(&share.join(&dir).join("key"), &c.bytes(8));
            let _ = symlink(&dir, share.join("..data_tmp"));
            std::fs::rename(share.join("..data_tmp"), share.join("..data"))
        }
        _ => write_here(&p, &c.bytes(4096)),
    };
}

/// Write a share file as the host does: never through a symlink (`key -> ..data/key` with
/// `..data` pointing out of the share would otherwise lead the write outside it).
fn write_here(p: &Path, content: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file =
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).custom_flags(libc::O_NOFOLLOW).open(p)?;
    file.write_all(content)
}

/// A batch for the agent: decoded from raw bytes as the agent reads its watch port, or built
/// with hostile fields.
fn batch(c: &mut Cursor8<'_>) -> Option<ChangeBatch> {
    if c.u8() & 1 == 0 {
        let n = usize::from(c.u8()) * 4;
        let bytes = c.bytes(n);
        let mut wire = Vec::new();
        frame::write_frame(&mut wire, &bytes).ok()?;
        return recv::<ChangeBatch, _>(&mut Cursor::new(wire)).ok();
    }
    let share = match c.u8() % 6 {
        0 => OTHER_SHARE.into(),
        1 => "../s".into(),
        2 => "s/d".into(),
        3 => String::new(),
        _ => SHARE.into(),
    };
    let count = match c.u8() {
        0xff => 100_000,
        n => usize::from(n % 16),
    };
    let mut records: Vec<ChangeRecord> = Vec::new();
    for i in 0..count {
        if i >= 16 {
            // A long list repeats the records the input spelled out.
            records.push(records[i % 16].clone());
            continue;
        }
        let kind = [ChangeKind::Created, ChangeKind::Modified, ChangeKind::Removed, ChangeKind::Moved]
            [usize::from(c.u8() % 4)];
        let path = c.record_path();
        let from = (kind == ChangeKind::Moved && c.u8() & 1 == 0).then(|| c.record_path());
        records.push(ChangeRecord { path, kind, from });
    }
    Some(ChangeBatch {
        share,
        seq: u64::from(c.u8()),
        first_change_unix_ns: 0,
        flush_unix_ns: 0,
        send_unix_ns: 0,
        resync: c.u8() == 0xff,
        records,
        generations: if c.u8() % 3 == 0 { vec![generation(c)] } else { Vec::new() },
        entries: (0..c.u8() % 3).map(|_| carried_entry(c)).collect(),
    })
}

/// A file or symlink as the VMM would carry it for a record: at a path of [`NAMES`] or a
/// hostile one, with a symlink target out of the share, or a content shorter than its size.
fn carried_entry(c: &mut Cursor8<'_>) -> HostEntry {
    let path = c.record_path();
    let content = match c.u8() % 3 {
        0 => HostContent::Symlink(["../outside", "/etc/passwd", "..data/key"][usize::from(c.u8() % 3)].to_owned()),
        _ => {
            let n = usize::from(c.u8() % 32);
            HostContent::File(c.bytes(n))
        }
    };
    fuzzed_entry(c, path, content)
}

/// A carried entry with fuzzed mode and inode number, and a size that sometimes says one byte
/// more than the content holds.
fn fuzzed_entry(c: &mut Cursor8<'_>, path: String, content: HostContent) -> HostEntry {
    let size = match &content {
        HostContent::File(bytes) => bytes.len() as u64 + u64::from(c.u8() == 0xff),
        _ => 0,
    };
    HostEntry {
        path,
        mode: u32::from(c.u8()) << 1,
        uid: 0,
        gid: 0,
        ino: u64::from(c.u8()),
        size,
        mtime: (0, 0),
        ctime: (0, 0),
        content,
    }
}

/// A generation as the VMM would carry it for a `..data` swap: mostly well formed (a sibling
/// directory of [`NAMES`] with files and symlinks), sometimes with paths that leave the
/// directory or the share, symlinks pointing out, or contents that disagree with their size.
fn generation(c: &mut Cursor8<'_>) -> Generation {
    let entry = fuzzed_entry;
    let link = if c.u8() % 4 == 0 { c.record_path() } else { "..data".to_owned() };
    let to = match c.u8() % 6 {
        0 => "../outside".to_owned(),
        1 => "/".to_owned(),
        2 => c.path(),
        _ => NAMES[usize::from(c.u8()) % NAMES.len()].to_owned(),
    };
    let dir = match link.rsplit_once('/') {
        Some((parent, _)) => format!("{parent}/{to}"),
        None => to.clone(),
    };
    let mut entries = vec![entry(c, dir.clone(), HostContent::Dir)];
    for _ in 0..c.u8() % 5 {
        let path = match c.u8() % 6 {
            0 => c.record_path(),
            _ => format!("{dir}/{}", c.path()),
        };
        let content = match c.u8() % 4 {
            0 => HostContent::Dir,
            1 => HostContent::Symlink(["../outside", "/etc/passwd", "key"][usize::from(c.u8() % 3)].to_owned()),
            _ => {
                let n = usize::from(c.u8() % 32);
                HostContent::File(c.bytes(n))
            }
        };
        entries.push(entry(c, path, content));
    }
    let link = entry(c, link, HostContent::Symlink(to));
    let earlier = (0..c.u8() % 3).map(|_| NAMES[usize::from(c.u8()) % NAMES.len()].to_owned()).collect();
    Generation { order: u64::from(c.u8()), link, entries, earlier }
}

/// Play `data` as share changes and change batches against a fresh mirror.
pub fn change_records(data: &[u8]) {
    let base = tempfile::tempdir().expect("temp dir");
    let share = base.path().join("share");
    let other = base.path().join("other");
    let mirror = base.path().join("mirror");
    let outside = base.path().join("outside");
    for d in [&share, &other, &mirror, &outside, &share.join("d"), &share.join("..2026_01")] {
        std::fs::create_dir_all(d).expect("layout");
    }
    let setup = [
        std::fs::write(share.join("a"), b"a"),
        std::fs::write(share.join("d/b"), b"b"),
        std::fs::write(share.join("..2026_01/key"), b"v1"),
        symlink("..2026_01", share.join("..data")),
        symlink("..data/key", share.join("key")),
        symlink("../outside", share.join("up")),
        symlink(&outside, share.join("abs")),
        std::fs::write(other.join("x"), b"other share"),
        std::fs::write(outside.join("secret"), b"outside the mirror"),
    ];
    assert!(setup.iter().all(Result::is_ok), "layout: {setup:?}");
    let mut names: Vec<_> = std::fs::read_dir(base.path()).expect("base").flatten().map(|e| e.file_name()).collect();
    names.sort();
    let outside_before = tree(&outside);
    let other_before = tree(&other);

    let mut state = Snapshot::new();
    let mut retired = Retired::new(Duration::ZERO);
    let _ = sync_mirror(&share, &mirror, &mut state, &mut retired, Scope::Full);
    let mut c = Cursor8(data);
    for _ in 0..MAX_OPS {
        if c.0.is_empty() {
            break;
        }
        match c.u8() % 5 {
            0 | 1 => change_share(&share, &outside, &mut c),
            2 | 3 => {
                let mut work = PendingWork::default();
                for _ in 0..1 + c.u8() % 3 {
                    if let Some(b) = batch(&mut c) {
                        let gap = c.u8() == 0xff;
                        merge_batch(&mut work, b, gap, 0);
                    }
                }
                // As the sync thread applies it to the mount of share `s`.
                match work.shares.get(SHARE) {
                    Some(s) if !(work.resync_all || s.resync) => {
                        apply_renames(&share, &mirror, &mut state, &s.renames);
                        let _ = sync_mirror(&share, &mirror, &mut state, &mut retired, Scope::Paths(&s.hints));
                    }
                    _ if work.resync_all || work.shares.get(SHARE).is_some_and(|s| s.resync) => {
                        let _ = sync_mirror(&share, &mirror, &mut state, &mut retired, Scope::Full);
                    }
                    _ => {}
                }
            }
            _ => {
                remove_expired(&share, &mirror, &mut state, &mut retired);
            }
        }
        let mut now: Vec<_> = std::fs::read_dir(base.path()).expect("base").flatten().map(|e| e.file_name()).collect();
        now.sort();
        assert_eq!(now, names, "something was created or removed next to the mirror");
        assert_eq!(tree(&outside), outside_before, "the mirror sync changed something outside the mirror");
        assert_eq!(tree(&other), other_before, "the mirror sync changed another share");
    }
}

#[cfg(test)]
mod tests {
    /// The committed corpus (`fuzz/corpus/change_records/`), replayed by `cargo test`.
    #[test]
    fn committed_corpus_replays_without_a_failure() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/change_records");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).expect("corpus dir") {
            let path = entry.expect("corpus entry").path();
            super::change_records(&std::fs::read(&path).expect("corpus file"));
            n += 1;
        }
        assert!(n > 0, "no corpus in {}", dir.display());
    }
}
