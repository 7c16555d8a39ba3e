//! Renames the host watcher saw both ends of ([`tern_protocol::watch::ChangeRecord::from`]),
//! applied to the mirror with rename(2) before the batch's paths are settled, so the
//! container's inotify sees IN_MOVED_FROM/IN_MOVED_TO as on the host even when the content
//! changed in the same burst (which defeats [`super::sync`]'s guess by inode or content). A
//! renamed file whose content changed too is first rewritten in place under its old name (an
//! IN_MODIFY, as the host's write-then-rename), then renamed; the settling that follows finds
//! it up to date.
//!
//! A rename is applied only while the mirror and the share both agree with it: the mirror's
//! state has the old path, the share no longer has it, and the share has the new path as the
//! same kind of entry. Anything else (a chain of renames within one burst, a new parent the
//! mirror does not have yet, a failed rename(2)) is left to the usual settling, which guesses
//! or removes and creates; nothing here is ever fatal.

use std::io::{ErrorKind, Write};
use std::mem::discriminant;
use std::path::Path;

use tern_protocol::watch::is_safe_relative_path;

use super::tree::{is_within, read_capped, Entry, EntryKind, Snapshot};

/// One rename as the watcher reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rename {
    pub from: String,
    pub to: String,
}

/// Kubelet-internal names (`..data`, `..data_tmp`, `..2026_…`) are never renamed here: a
/// `..data` swap must go through [`super::sync`]'s ordering (publish only a complete
/// directory, keep the retired one readable), whatever the records say.
fn is_kubelet_internal(path: &str) -> bool {
    path.split('/').any(|c| c.starts_with(".."))
}

/// Apply `renames` (in the order seen) to the mirror at `mirror` and its `state`; returns the
/// ones applied.
pub fn apply_renames(share: &Path, mirror: &Path, state: &mut Snapshot, renames: &[Rename]) -> Vec<Rename> {
    renames.iter().filter(|r| apply_one(share, mirror, state, r)).cloned().collect()
}

fn apply_one(share: &Path, mirror: &Path, state: &mut Snapshot, rename: &Rename) -> bool {
    let Rename { from, to } = rename;
    let plausible = is_safe_relative_path(from)
        && is_safe_relative_path(to)
        && !is_within(from, to)
        && !is_within(to, from)
        && !is_kubelet_internal(from)
        && !is_kubelet_internal(to);
    if !plausible {
        return false;
    }
    let Some(old) = state.get(from.as_str()) else {
        return false;
    };
    let from_gone = match Entry::read(&share.join(from)) {
        Ok(_) => false,
        Err(e) => e.kind() == ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENOTDIR),
    };
    let new = match Entry::read(&share.join(to)) {
        Ok(Some(new)) if discriminant(&new.kind) == discriminant(&old.kind) => new,
        _ => return false,
    };
    if !from_gone {
        return false;
    }
    if old.kind == EntryKind::File {
        // Write-then-rename is the common order on the host (and what an editor or a config
        // writer does): the content goes in under the old name, so the guest sees IN_MODIFY on
        // it and then the rename, never an unlink and a create.
        rewrite_in_place(&share.join(to), &mirror.join(from));
    }
    if let Err(e) = std::fs::rename(mirror.join(from), mirror.join(to)) {
        tracing::debug!(from, to, error = %e, "cannot rename in the mirror; settling both paths instead");
        return false;
    }
    // rename(2) replaced whatever the mirror had at `to` (a file, or an empty directory).
    state.retain(|path, _| !is_within(path, to));
    let moved: Vec<String> = state.keys().filter(|path| is_within(path, from)).cloned().collect();
    for old_path in moved {
        let Some(mut entry) = state.remove(&old_path) else {
            continue;
        };
        let new_path = format!("{to}{}", &old_path[from.len()..]);
        // The mirror entry now stands for the share's entry at the new path: take over its
        // identity, so the settling compares content and rewrites in place instead of
        // treating it as replaced (the share need not keep inode numbers across a rename).
        let share_entry =
            if new_path == *to { Some(new.clone()) } else { Entry::read(&share.join(&new_path)).ok().flatten() };
        if let Some(current) = share_entry.filter(|e| discriminant(&e.kind) == discriminant(&entry.kind)) {
            entry.ino = current.ino;
        }
        state.insert(new_path, entry);
    }
    true
}

/// Give the mirror file at `dst` the content of the share file at `src`, in place (one
/// IN_MODIFY), if it differs. A failure only leaves the content to the settling that follows.
fn rewrite_in_place(src: &Path, dst: &Path) {
    let content = match read_capped(src) {
        Ok(content) => content,
        Err(e) => {
            tracing::debug!(path = %src.display(), error = %e, "cannot read a renamed share file; settling it later");
            return;
        }
    };
    if std::fs::read(dst).ok().as_deref() == Some(content.as_slice()) {
        return;
    }
    let written =
        std::fs::OpenOptions::new().write(true).truncate(true).open(dst).and_then(|mut f| f.write_all(&content));
    if let Err(e) = written {
        tracing::debug!(path = %dst.display(), error = %e, "cannot rewrite a mirror file before renaming it");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mirror::retired::Retired;
    use crate::mirror::sync::{sync_mirror, Hints, MirrorOp, Scope, SyncOutcome};

    struct Pair {
        share: tempfile::TempDir,
        mirror: tempfile::TempDir,
        state: Snapshot,
        retired: Retired,
    }

    impl Pair {
        fn new() -> Pair {
            Pair {
                share: tempfile::tempdir().unwrap(),
                mirror: tempfile::tempdir().unwrap(),
                state: Snapshot::new(),
                retired: Retired::default(),
            }
        }

        fn sync(&mut self, paths: &[&str]) -> Vec<MirrorOp> {
            let hints = Hints::removable(paths.iter().copied());
            let scope = if paths.is_empty() { Scope::Full } else { Scope::Paths(&hints) };
            match sync_mirror(self.share.path(), self.mirror.path(), &mut self.state, &mut self.retired, scope) {
                Ok(SyncOutcome::Synced(report)) => report.ops,
                other => panic!("sync failed: {other:?}"),
            }
        }

        fn rename(&mut self, from: &str, to: &str) -> Vec<Rename> {
            let renames = [Rename { from: from.into(), to: to.into() }];
            apply_renames(self.share.path(), self.mirror.path(), &mut self.state, &renames)
        }

        fn read(&self, rel: &str) -> Option<String> {
            std::fs::read_to_string(self.mirror.path().join(rel)).ok()
        }
    }

    #[test]
    fn a_file_modified_and_renamed_in_one_burst_is_rewritten_then_renamed() {
        let mut p = Pair::new();
        std::fs::write(p.share.path().join("f"), "1").unwrap();
        p.sync(&[]);
        let ino = |path: &Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(path).unwrap());
        let mirror_ino = ino(&p.mirror.path().join("f"));

        // Content and name change together: the guess (same inode or same content) fails.
        let tmp = p.share.path().join("new");
        std::fs::write(&tmp, "22").unwrap();
        std::fs::rename(&tmp, p.share.path().join("f")).unwrap();
        std::fs::rename(p.share.path().join("f"), p.share.path().join("g")).unwrap();

        assert_eq!(p.rename("f", "g").len(), 1);
        // Rewritten in place before the rename: nothing left for the settling.
        assert_eq!(p.read("g").as_deref(), Some("22"));
        assert!(p.sync(&["f", "g"]).is_empty());
        assert_eq!(p.read("f"), None);
        assert_eq!(p.read("g").as_deref(), Some("22"));
        // The mirror's file was renamed, not recreated: the guest saw MOVED_FROM/MOVED_TO.
        assert_eq!(ino(&p.mirror.path().join("g")), mirror_ino);
        assert!(p.sync(&[]).is_empty());
    }

    #[test]
    fn a_directory_rename_moves_the_tree_and_its_state() {
        let mut p = Pair::new();
        std::fs::create_dir_all(p.share.path().join("a/sub")).unwrap();
        std::fs::write(p.share.path().join("a/sub/k"), "v").unwrap();
        std::fs::create_dir(p.share.path().join("b")).unwrap();
        p.sync(&[]);
        std::fs::rename(p.share.path().join("a"), p.share.path().join("b/c")).unwrap();
        std::fs::write(p.share.path().join("b/c/sub/k"), "v2").unwrap();

        assert_eq!(p.rename("a", "b/c").len(), 1);
        assert!(p.state.contains_key("b/c/sub/k") && !p.state.contains_key("a"));
        let ops = p.sync(&["a", "b/c"]);
        assert_eq!(ops, vec![MirrorOp::RewriteFile("b/c/sub/k".into())]);
        assert_eq!(p.read("b/c/sub/k").as_deref(), Some("v2"));
        assert!(p.sync(&[]).is_empty());
    }

    #[test]
    fn renames_the_share_and_mirror_disagree_with_are_left_to_the_sync() {
        let mut p = Pair::new();
        for name in ["f", "h", "..data_tmp"] {
            std::fs::write(p.share.path().join(name), name).unwrap();
        }
        p.sync(&[]);
        // The share still has the old path.
        std::fs::copy(p.share.path().join("f"), p.share.path().join("g")).unwrap();
        assert!(p.rename("f", "g").is_empty());
        // The new path is gone already.
        std::fs::rename(p.share.path().join("h"), p.share.path().join("x")).unwrap();
        std::fs::remove_file(p.share.path().join("x")).unwrap();
        assert!(p.rename("h", "x").is_empty());
        // The mirror never had the old path; unsafe or kubelet-internal paths.
        assert!(p.rename("nope", "g").is_empty());
        assert!(p.rename("../f", "g").is_empty());
        std::fs::rename(p.share.path().join("..data_tmp"), p.share.path().join("..data")).unwrap();
        assert!(p.rename("..data_tmp", "..data").is_empty());
        assert_eq!(p.read("f").as_deref(), Some("f"));
        p.sync(&[]);
        assert_eq!(p.read("g").as_deref(), Some("f"));
    }
}
