//! The diff/apply logic on plain temp dirs: kubelet updates, retired directories' grace,
//! limits, same-tick changes, races.

use super::*;
use std::collections::BTreeMap;
use std::os::unix::fs::symlink;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tern_protocol::watch::{MAX_BYTES, MAX_ENTRIES};

/// A share and its mirror, with the mirror's state.
struct Pair {
    share: tempfile::TempDir,
    mirror: tempfile::TempDir,
    state: Snapshot,
    retired: Retired,
}

impl Pair {
    /// Retired directories go at once, as kubelet removes them on a host.
    fn new() -> Pair {
        Pair::with_grace(Duration::ZERO)
    }

    fn with_grace(grace: Duration) -> Pair {
        Pair {
            share: tempfile::tempdir().unwrap(),
            mirror: tempfile::tempdir().unwrap(),
            state: Snapshot::new(),
            retired: Retired::new(grace),
        }
    }

    fn m(&self, rel: &str) -> PathBuf {
        self.mirror.path().join(rel)
    }

    fn s(&self, rel: &str) -> PathBuf {
        self.share.path().join(rel)
    }

    fn sync(&mut self, scope: Scope<'_>) -> SyncReport {
        match self.try_sync(scope) {
            SyncOutcome::Synced(report) => report,
            SyncOutcome::OverLimit(limit) => panic!("unexpectedly over the limit: {limit}"),
        }
    }

    fn try_sync(&mut self, scope: Scope<'_>) -> SyncOutcome {
        sync_mirror(self.share.path(), self.mirror.path(), &mut self.state, &mut self.retired, scope).unwrap()
    }

    fn sync_paths(&mut self, paths: &[&str]) -> SyncReport {
        self.sync(Scope::Paths(&Hints::removable(paths.iter().copied())))
    }

    fn assert_identical(&self) {
        assert_eq!(tree(self.mirror.path()), tree(self.share.path()));
    }
}

/// path → ("d", mode) | ("f", content, mode) | ("l", target)
fn tree(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![String::new()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(root.join(&dir)).unwrap() {
            let entry = entry.unwrap();
            let rel = join_rel(&dir, entry.file_name().to_str().unwrap());
            let meta = std::fs::symlink_metadata(entry.path()).unwrap();
            let mode = meta.permissions().mode() & 0o7777;
            let desc = if meta.is_dir() {
                stack.push(rel.clone());
                format!("d {mode:o}")
            } else if meta.is_symlink() {
                format!("l {}", std::fs::read_link(entry.path()).unwrap().display())
            } else {
                format!("f {mode:o} {}", String::from_utf8_lossy(&std::fs::read(entry.path()).unwrap()))
            };
            out.insert(rel, desc);
        }
    }
    out
}

/// Kubelet's atomic writer, step by step as in `atomic_writer.go`: new timestamped dir with
/// the payload, `..data_tmp` → rename to `..data`, user-visible symlinks, remove old keys and
/// the old dir. Returns the new dir's name.
fn kubelet_update(share: &Path, generation: u32, payload: &[(&str, String)]) -> String {
    let ts = format!("..2026_11_26_13_00_00.{generation:09}");
    let old = std::fs::read_link(share.join("..data")).ok();
    std::fs::create_dir(share.join(&ts)).unwrap();
    for (key, value) in payload {
        std::fs::write(share.join(&ts).join(key), value).unwrap();
        std::fs::set_permissions(share.join(&ts).join(key), std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    symlink(&ts, share.join("..data_tmp")).unwrap();
    std::fs::rename(share.join("..data_tmp"), share.join("..data")).unwrap();
    for (key, _) in payload {
        if std::fs::symlink_metadata(share.join(key)).is_err() {
            symlink(format!("..data/{key}"), share.join(key)).unwrap();
        }
    }
    if let Some(old) = old {
        std::fs::remove_dir_all(share.join(old)).unwrap();
    }
    ts
}

#[test]
fn kubelet_updates_swap_data_only_after_its_target_is_complete() {
    let mut pair = Pair::new();
    kubelet_update(pair.share.path(), 1, &[("user", "alice".into()), ("pass", "one".into())]);
    pair.sync(Scope::Full);
    pair.assert_identical();

    let ts =
        kubelet_update(pair.share.path(), 2, &[("user", "bob".into()), ("pass", "two".into()), ("token", "t".into())]);
    let report = pair.sync_paths(&[
        &ts,
        &format!("{ts}/user"),
        "..data_tmp",
        "..data",
        "token",
        "..2026_11_26_13_00_00.000000001",
    ]);
    pair.assert_identical();

    let pos = |op: &MirrorOp| {
        report.ops.iter().position(|o| o == op).unwrap_or_else(|| panic!("{op:?} missing from {:#?}", report.ops))
    };
    let swap = pos(&MirrorOp::Symlink("..data".into()));
    for key in ["user", "pass", "token"] {
        assert!(pos(&MirrorOp::CreateFile(format!("{ts}/{key}"))) < swap);
    }
    // The new user-visible link comes after the swap (it would dangle before), removals last.
    assert!(pos(&MirrorOp::Symlink("token".into())) > swap);
    let old = "..2026_11_26_13_00_00.000000001";
    assert!(pos(&MirrorOp::Remove(format!("{old}/user"))) > swap);
    assert!(pos(&MirrorOp::Remove(old.into())) > pos(&MirrorOp::Remove(format!("{old}/user"))));
    assert!(report.deferred.is_empty());
    // The swap used kubelet's own temporary name.
    assert!(!pair.mirror.path().join("..data_tmp").exists());
}

#[test]
fn readers_never_fail_during_100_updates() {
    let mut pair = Pair::with_grace(Duration::from_secs(600));
    kubelet_update(pair.share.path(), 0, &[("key", "v0".into())]);
    pair.sync(Scope::Full);
    let mirror = pair.mirror.path().to_owned();
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut reads = 0u64;
            while !stop.load(Ordering::SeqCst) {
                // A read racing a swap may resolve `..data` to the directory the swap retires:
                // that directory stays for its grace, so every read succeeds.
                let published = std::fs::read_link(mirror.join("..data")).expect("..data missing");
                let value = std::fs::read_to_string(mirror.join("key")).expect("key unreadable");
                assert!(value.starts_with('v'), "{value:?}");
                assert!(mirror.join(&published).is_dir(), "..data -> {} dangles", published.display());
                reads += 1;
            }
            reads
        })
    };
    for generation in 1..=100u32 {
        kubelet_update(pair.share.path(), generation, &[("key", format!("v{generation}"))]);
        if generation % 2 == 0 {
            pair.sync(Scope::Full);
        } else {
            pair.sync_paths(&["..data", &format!("..2026_11_26_13_00_00.{generation:09}"), "..data_tmp"]);
        }
    }
    stop.store(true, Ordering::SeqCst);
    assert!(reader.join().unwrap() > 0);
    // The newest retired directories, each with its key, up to the cap on what is held.
    assert_eq!(pair.retired.held_paths().len(), 2 * super::super::retired::MAX_HELD_DIRS);
    assert_eq!(std::fs::read_to_string(pair.m("key")).unwrap(), "v100");
    pair.retired.grace = Duration::ZERO;
    pair.sync(Scope::Full);
    pair.assert_identical();
}

/// `path` and everything the mirror has below it, as `tree` shows it.
fn mirror_below(pair: &Pair, dir: &str) -> Vec<String> {
    tree(pair.mirror.path()).into_keys().filter(|p| is_within(p, dir)).collect()
}

#[test]
fn a_reader_holding_the_old_directory_keeps_reading_through_the_grace() {
    let mut pair = Pair::with_grace(Duration::from_secs(600));
    let first = kubelet_update(pair.share.path(), 1, &[("key", "one".into()), ("other", "o1".into())]);
    pair.sync(Scope::Full);
    // A reader resolved `..data` just before the swap.
    let resolved = pair.m("..data").canonicalize().unwrap();
    let second = kubelet_update(pair.share.path(), 2, &[("key", "two".into()), ("other", "o2".into())]);
    let report = pair.sync_paths(&["..data", "..data_tmp", &second, &first]);
    assert!(report.ops.contains(&MirrorOp::Symlink("..data".into())), "{report:?}");
    assert!(!report.ops.iter().any(|op| matches!(op, MirrorOp::Remove(_))), "{report:?}");
    assert_eq!(std::fs::read_to_string(resolved.join("key")).unwrap(), "one");
    assert_eq!(std::fs::read_to_string(pair.m("key")).unwrap(), "two");
    // Held, not mirror state: not the share's content.
    assert!(!pair.state.keys().any(|p| is_within(p, &first)));
    assert_eq!(pair.retired.held_paths(), [first.clone(), format!("{first}/key"), format!("{first}/other")]);
    // A resync during the grace leaves it alone.
    assert!(pair.sync(Scope::Full).ops.is_empty());
    assert_eq!(std::fs::read_to_string(resolved.join("other")).unwrap(), "o1");

    // Grace over: the next sync removes it, deepest first, as kubelet would have.
    pair.retired.grace = Duration::ZERO;
    let report = pair.sync_paths(&["unrelated"]);
    let removed = [format!("{first}/other"), format!("{first}/key"), first.clone()].map(MirrorOp::Remove);
    assert_eq!(report.ops, removed, "{report:?}");
    pair.assert_identical();
    assert!(pair.retired.held_paths().is_empty() && pair.retired.next_expiry().is_none());

    // The sync thread's timer does the same between syncs.
    pair.retired.grace = Duration::from_secs(600);
    let third = kubelet_update(pair.share.path(), 3, &[("key", "three".into())]);
    pair.sync_paths(&["..data", &third, &second]);
    assert_eq!(mirror_below(&pair, &second).len(), 3);
    assert!(pair.retired.next_expiry().is_some());
    pair.retired.grace = Duration::ZERO;
    let report = remove_expired(pair.share.path(), pair.mirror.path(), &mut pair.state, &mut pair.retired);
    assert_eq!(report.ops.last(), Some(&MirrorOp::Remove(second.clone())), "{report:?}");
    pair.assert_identical();
}

#[test]
fn each_superseded_directory_goes_after_its_own_grace() {
    let grace = Duration::from_secs(1);
    let mut pair = Pair::with_grace(grace);
    let first = kubelet_update(pair.share.path(), 1, &[("key", "one".into())]);
    pair.sync(Scope::Full);
    let second = kubelet_update(pair.share.path(), 2, &[("key", "two".into())]);
    pair.sync(Scope::Full);
    std::thread::sleep(grace * 7 / 10);
    let third = kubelet_update(pair.share.path(), 3, &[("key", "three".into())]);
    pair.sync_paths(&["..data", &third, &second]);
    assert_eq!(mirror_below(&pair, &first).len(), 2);
    assert_eq!(mirror_below(&pair, &second).len(), 2);
    std::thread::sleep(grace / 2);
    // The first retirement is past its grace, the second is not.
    pair.sync_paths(&[]);
    assert!(mirror_below(&pair, &first).is_empty());
    assert_eq!(mirror_below(&pair, &second).len(), 2, "removed before its own grace");
    assert_eq!(std::fs::read_to_string(pair.m(&format!("{second}/key"))).unwrap(), "two");
    std::thread::sleep(grace);
    pair.sync_paths(&[]);
    pair.assert_identical();
}

#[test]
fn retired_directories_never_count_against_the_limits() {
    // Seven keys: the timestamped directory, its files, `..data` and seven links are exactly
    // the entry limit, and the big key is more than half the byte limit.
    let payload = |generation: u32| -> Vec<(&'static str, String)> {
        let big = format!("{generation}{}", "x".repeat(MAX_BYTES as usize / 2));
        let mut keys = vec![("big", big)];
        keys.extend(["k1", "k2", "k3", "k4", "k5", "k6"].map(|k| (k, format!("{k}-{generation}"))));
        keys
    };
    let mut pair = Pair::with_grace(Duration::from_secs(600));
    let first = kubelet_update(pair.share.path(), 1, &payload(1));
    pair.sync(Scope::Full);
    assert_eq!(pair.state.len(), MAX_ENTRIES);
    let second = kubelet_update(pair.share.path(), 2, &payload(2));
    assert!(matches!(
        pair.try_sync(Scope::Paths(&Hints::removable(["..data", &second, &first]))),
        SyncOutcome::Synced(_)
    ));
    assert_eq!(mirror_below(&pair, &first).len(), 8, "the old generation is held");
    for _ in 0..2 {
        assert!(matches!(pair.try_sync(Scope::Full), SyncOutcome::Synced(_)));
        assert!(matches!(pair.try_sync(Scope::Paths(&Hints::removable(["k1"]))), SyncOutcome::Synced(_)));
    }
    assert_eq!(pair.state.len(), MAX_ENTRIES);
    assert_eq!(mirror_below(&pair, &first).len(), 8);

    // Two held generations of half a MiB are past the held-content cap: the oldest goes early,
    // so the mirror's tmpfs keeps room for the live content and the next copy.
    let third = kubelet_update(pair.share.path(), 3, &payload(3));
    assert!(matches!(pair.try_sync(Scope::Full), SyncOutcome::Synced(_)));
    assert!(mirror_below(&pair, &first).is_empty());
    assert_eq!(mirror_below(&pair, &second).len(), 8);
    assert_eq!(std::fs::read_to_string(pair.m("k1")).unwrap(), "k1-3");
    assert_eq!(std::fs::read_link(pair.m("..data")).unwrap(), Path::new(&third));
}

#[test]
fn a_retired_directory_the_share_publishes_again_is_settled_normally() {
    let mut pair = Pair::with_grace(Duration::from_secs(600));
    let publish = |share: &Path, dir: &str, files: &[(&str, &str)], old: Option<&str>| {
        std::fs::create_dir(share.join(dir)).unwrap();
        for (name, content) in files {
            std::fs::write(share.join(dir).join(name), content).unwrap();
        }
        symlink(dir, share.join("..data_tmp")).unwrap();
        std::fs::rename(share.join("..data_tmp"), share.join("..data")).unwrap();
        if let Some(old) = old {
            std::fs::remove_dir_all(share.join(old)).unwrap();
        }
    };
    publish(pair.share.path(), "..a", &[("key", "a1"), ("stale", "s")], None);
    pair.sync(Scope::Full);
    publish(pair.share.path(), "..b", &[("key", "b")], Some("..a"));
    pair.sync(Scope::Full);
    assert_eq!(mirror_below(&pair, "..a").len(), 3);
    publish(pair.share.path(), "..a", &[("key", "a2")], Some("..b"));
    pair.sync_paths(&["..data", "..a", "..b"]);
    // `..a` is the share's again: exactly its new content, nothing stale, `..b` held instead.
    assert_eq!(mirror_below(&pair, "..a"), ["..a", "..a/key"]);
    assert_eq!(std::fs::read_to_string(pair.m("..a/key")).unwrap(), "a2");
    assert_eq!(pair.retired.held_paths(), ["..b", "..b/key"]);
    pair.retired.grace = Duration::ZERO;
    pair.sync_paths(&[]);
    pair.assert_identical();
}

#[test]
fn plain_changes_map_to_the_operations_a_host_would_do() {
    let mut pair = Pair::new();
    std::fs::write(pair.s("a"), "1").unwrap();
    let report = pair.sync_paths(&["a"]);
    assert_eq!(report.ops, vec![MirrorOp::CreateFile("a".into())]);

    std::fs::write(pair.s("a"), "22").unwrap();
    assert_eq!(pair.sync_paths(&["a"]).ops, vec![MirrorOp::RewriteFile("a".into())]);

    std::fs::rename(pair.s("a"), pair.s("b")).unwrap();
    assert_eq!(pair.sync_paths(&["a", "b"]).ops, vec![MirrorOp::RenameFile { from: "a".into(), to: "b".into() }]);

    std::fs::write(pair.s(".b.new"), "333").unwrap();
    std::fs::rename(pair.s(".b.new"), pair.s("b")).unwrap();
    assert_eq!(pair.sync_paths(&["b", ".b.new"]).ops, vec![MirrorOp::ReplaceFile("b".into())]);

    std::fs::set_permissions(pair.s("b"), std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(pair.sync_paths(&["b"]).ops, vec![MirrorOp::SetAttributes("b".into())]);

    std::fs::create_dir(pair.s("d")).unwrap();
    std::fs::write(pair.s("d/x"), "x").unwrap();
    // Only the file is hinted; its unknown parent directory is rescanned with it.
    assert_eq!(pair.sync_paths(&["d/x"]).ops, vec![MirrorOp::MakeDir("d".into()), MirrorOp::CreateFile("d/x".into())]);

    std::fs::remove_dir_all(pair.s("d")).unwrap();
    std::fs::remove_file(pair.s("b")).unwrap();
    assert_eq!(
        pair.sync_paths(&["d", "b"]).ops,
        vec![MirrorOp::Remove("d/x".into()), MirrorOp::Remove("d".into()), MirrorOp::Remove("b".into())]
    );
    pair.assert_identical();
    // Nothing changed: nothing to do, even on a full resync.
    assert!(pair.sync(Scope::Full).ops.is_empty());
}

#[test]
fn a_change_within_one_mtime_tick_is_still_propagated() {
    let mut pair = Pair::new();
    std::fs::write(pair.s("f"), "aaaa").unwrap();
    pair.sync(Scope::Full);
    std::fs::write(pair.s("f"), "bbbb").unwrap();
    // Pretend the host's clock did not tick: the remembered metadata equals the new one.
    let now = Entry::read(&pair.s("f")).unwrap().unwrap();
    pair.state.insert("f".into(), now.clone());
    assert_eq!(pair.sync_paths(&["f"]).ops, vec![MirrorOp::RewriteFile("f".into())]);
    assert_eq!(std::fs::read(pair.mirror.path().join("f")).unwrap(), b"bbbb");

    // And a full resync (e.g. the record was lost) compares content too.
    std::fs::write(pair.s("f"), "cccc").unwrap();
    pair.state.insert("f".into(), Entry::read(&pair.s("f")).unwrap().unwrap());
    assert_eq!(pair.sync(Scope::Full).ops, vec![MirrorOp::RewriteFile("f".into())]);
    pair.assert_identical();
}

#[test]
fn the_17th_entry_and_the_big_file_are_over_the_limit_and_leave_the_mirror_alone() {
    let mut pair = Pair::new();
    for i in 0..MAX_ENTRIES {
        std::fs::write(pair.s(&format!("f{i:02}")), "x").unwrap();
    }
    pair.sync(Scope::Full);
    pair.assert_identical();
    std::fs::write(pair.s("f16"), "x").unwrap();
    let before = tree(pair.mirror.path());
    for scope in [Scope::Full, Scope::Paths(&Hints::removable(["f16"]))] {
        let outcome =
            sync_mirror(pair.share.path(), pair.mirror.path(), &mut pair.state, &mut pair.retired, scope).unwrap();
        assert!(matches!(outcome, SyncOutcome::OverLimit(LimitExceeded::Entries)), "{outcome:?}");
    }
    assert_eq!(tree(pair.mirror.path()), before, "prior files must stay");

    let mut pair = Pair::new();
    std::fs::write(pair.s("small"), "x").unwrap();
    pair.sync(Scope::Full);
    std::fs::write(pair.s("big"), vec![b'x'; MAX_BYTES as usize]).unwrap();
    let outcome =
        sync_mirror(pair.share.path(), pair.mirror.path(), &mut pair.state, &mut pair.retired, Scope::Full).unwrap();
    assert!(matches!(outcome, SyncOutcome::OverLimit(LimitExceeded::Bytes(b)) if b == MAX_BYTES + 1), "{outcome:?}");
    assert!(!pair.mirror.path().join("big").exists());
}

#[test]
fn symlink_targets_count_towards_the_byte_limit() {
    let mut snapshot = Snapshot::new();
    let mut entry = Entry::read(Path::new("/")).unwrap().unwrap();
    entry.kind = EntryKind::Symlink(PathBuf::from("x".repeat(10)));
    snapshot.insert("l".into(), entry.clone());
    entry.kind = EntryKind::File;
    entry.size = MAX_BYTES - 10;
    snapshot.insert("f".into(), entry.clone());
    assert_eq!(check_limits(&snapshot), Ok(()));
    entry.size += 1;
    snapshot.insert("f".into(), entry);
    assert_eq!(check_limits(&snapshot), Err(LimitExceeded::Bytes(MAX_BYTES + 1)));
}

#[test]
fn a_file_vanishing_mid_sync_is_deferred_and_blocks_the_data_swap() {
    let mut pair = Pair::new();
    kubelet_update(pair.share.path(), 1, &[("key", "one".into())]);
    pair.sync(Scope::Full);
    let ts = kubelet_update(pair.share.path(), 2, &[("key", "two".into())]);
    // Scan, then lose the file before the copy.
    let mut target = Snapshot::new();
    scan_below(pair.share.path(), "", &mut target).unwrap();
    std::fs::remove_file(pair.s(&format!("{ts}/key"))).unwrap();
    let mut apply = Apply::new(pair.share.path(), pair.mirror.path(), &mut pair.state, &mut pair.retired);
    apply.run(&target, None);
    let report = apply.report;
    assert!(report.deferred.contains(&format!("{ts}/key")), "{report:?}");
    assert!(report.deferred.contains("..data"), "{report:?}");
    // The old generation is still what the container sees.
    assert_eq!(std::fs::read_to_string(pair.mirror.path().join("key")).unwrap(), "one");

    // The host finishes; the next record settles everything.
    std::fs::write(pair.s(&format!("{ts}/key")), "two").unwrap();
    let report = pair.sync_paths(&[&format!("{ts}/key")]);
    assert!(report.deferred.is_empty(), "{report:?}");
    pair.sync(Scope::Full);
    pair.assert_identical();
    assert_eq!(std::fs::read_to_string(pair.mirror.path().join("key")).unwrap(), "two");
}

#[test]
fn racing_host_changes_never_fail_a_sync_and_a_resync_converges() {
    let mut pair = Pair::new();
    let share = pair.share.path().to_owned();
    let stop = Arc::new(AtomicBool::new(false));
    let churn = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let name = share.join(format!("f{}", i % 6));
                let _ = std::fs::write(&name, i.to_string());
                if i % 3 == 0 {
                    let _ = std::fs::remove_file(&name);
                }
                let dir = share.join(format!("d{}", i % 2));
                if i % 5 == 0 {
                    let _ = std::fs::remove_dir_all(&dir);
                } else {
                    let _ = std::fs::create_dir(&dir);
                    let _ = std::fs::write(dir.join("x"), i.to_string());
                }
                i += 1;
            }
        })
    };
    for round in 0..300 {
        let scope_paths = Hints::removable(["f0", "f1", "f2", "d0", "d1/x"]);
        let scope = if round % 2 == 0 { Scope::Full } else { Scope::Paths(&scope_paths) };
        sync_mirror(pair.share.path(), pair.mirror.path(), &mut pair.state, &mut pair.retired, scope)
            .expect("a race must not fail the sync");
    }
    stop.store(true, Ordering::SeqCst);
    churn.join().unwrap();
    pair.sync(Scope::Full);
    pair.assert_identical();
}

#[test]
fn hinted_paths_are_rescanned_from_the_first_unknown_ancestor() {
    let mut state = Snapshot::new();
    let dir = Entry::read(Path::new("/")).unwrap().unwrap();
    state.insert("a".into(), dir.clone());
    state.insert("a/b".into(), dir);
    let hints: BTreeSet<String> = ["a/b/c/d", "a/b/c", "x/y", "a/b"].iter().map(|s| s.to_string()).collect();
    assert_eq!(rescan_roots(&state, &hints), vec!["a/b".to_string(), "x".to_string()]);
}

#[test]
fn a_batch_naming_only_the_old_directory_never_empties_what_data_shows() {
    let mut pair = Pair::new();
    let first = kubelet_update(pair.share.path(), 1, &[("key", "one".into())]);
    pair.sync(Scope::Full);
    kubelet_update(pair.share.path(), 2, &[("key", "two".into())]);
    // The records about the swap were settled earlier (or coalesced): only the removal is named.
    pair.sync_paths(&[&first, &format!("{first}/key")]);
    assert_eq!(std::fs::read_to_string(pair.m("key")).unwrap(), "two");
    pair.assert_identical();
}

#[test]
fn an_entry_gone_before_its_removal_was_reported_stays_until_that_record() {
    let mut pair = Pair::new();
    std::fs::write(pair.s("f"), "1").unwrap();
    pair.sync(Scope::Full);
    // The host writes then renames; the agent settles the write's record after the rename
    // happened, before the rename's record arrives.
    std::fs::write(pair.s("f"), "22").unwrap();
    std::fs::rename(pair.s("f"), pair.s("g")).unwrap();
    let modified = Hints { paths: BTreeSet::from(["f".to_string()]), ..Hints::default() };
    let report = pair.sync(Scope::Paths(&modified));
    assert!(report.ops.is_empty(), "{report:?}");
    assert!(report.deferred.contains("f"), "{report:?}");
    assert_eq!(std::fs::read_to_string(pair.m("f")).unwrap(), "1");
    assert!(pair.state.contains_key("f"));

    // The rename's records: now `f` may go, and it goes as a rename (same mirror inode).
    let ino = |path: &Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(path).unwrap());
    let mirror_ino = ino(&pair.m("f"));
    let renamed = Hints::removable(["f", "g"]);
    let report = pair.sync(Scope::Paths(&renamed));
    assert_eq!(
        report.ops,
        vec![MirrorOp::RenameFile { from: "f".into(), to: "g".into() }, MirrorOp::RewriteFile("g".into())],
        "{report:?}"
    );
    assert_eq!(ino(&pair.m("g")), mirror_ino);
    pair.assert_identical();

    // A removal inside a directory the records named as removed goes at once.
    std::fs::create_dir(pair.s("d")).unwrap();
    std::fs::write(pair.s("d/x"), "x").unwrap();
    pair.sync(Scope::Full);
    std::fs::remove_dir_all(pair.s("d")).unwrap();
    let removed = Hints {
        paths: BTreeSet::from(["d".to_string()]),
        removed: BTreeSet::from(["d".to_string()]),
        ..Hints::default()
    };
    let report = pair.sync(Scope::Paths(&removed));
    assert_eq!(report.ops, vec![MirrorOp::Remove("d/x".into()), MirrorOp::Remove("d".into())]);
    pair.assert_identical();
}

#[test]
fn what_the_host_did_after_a_kubelet_update_shows_after_the_swap() {
    let mut pair = Pair::new();
    kubelet_update(pair.share.path(), 1, &[("key", "one".into())]);
    pair.sync(Scope::Full);
    let ts = kubelet_update(pair.share.path(), 2, &[("key", "two".into())]);
    std::fs::write(pair.s("stop"), "").unwrap();
    // Both settled in one pass (the agent was busy and merged the batches).
    let report = pair.sync_paths(&["..data", "..data_tmp", &ts, "..2026_11_26_13_00_00.000000001", "stop"]);
    let pos = |op: &MirrorOp| {
        report.ops.iter().position(|o| o == op).unwrap_or_else(|| panic!("{op:?} missing from {:#?}", report.ops))
    };
    let swap = pos(&MirrorOp::Symlink("..data".into()));
    assert!(pos(&MirrorOp::CreateFile(format!("{ts}/key"))) < swap);
    assert!(pos(&MirrorOp::CreateFile("stop".into())) > swap, "{:#?}", report.ops);
    pair.assert_identical();
}

#[test]
fn a_data_link_that_moves_during_the_scan_never_publishes_a_partial_directory() {
    // The host publishes generation after generation (removing each old directory right
    // after the swap, key first) while the mirror settles; after every sync, what the mirror's
    // `..data` shows must be a complete generation.
    let mut pair = Pair::with_grace(Duration::from_secs(600));
    kubelet_update(pair.share.path(), 0, &[("key", "v0".into()), ("other", "o0".into())]);
    pair.sync(Scope::Full);
    let share = pair.share.path().to_owned();
    let stop = Arc::new(AtomicBool::new(false));
    let published = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let writer = {
        let (stop, published) = (stop.clone(), published.clone());
        std::thread::spawn(move || {
            let mut generation = 1u32;
            while !stop.load(Ordering::SeqCst) && generation < 20_000 {
                kubelet_update(
                    &share,
                    generation,
                    &[("key", format!("v{generation}")), ("other", format!("o{generation}"))],
                );
                published.store(generation, Ordering::SeqCst);
                generation += 1;
            }
            generation
        })
    };
    let mut swaps = 0;
    let mut last = std::fs::read_link(pair.m("..data")).unwrap();
    // Many syncs, over many generations (whichever takes longer).
    let mut round = 0;
    while round < 400 || (published.load(Ordering::SeqCst) < 2000 && round < 20_000) {
        round += 1;
        if round % 3 == 0 {
            pair.sync(Scope::Full);
        } else {
            // What a batch names: the links and whatever timestamped directories exist now.
            let mut names: Vec<String> = vec!["..data".into(), "..data_tmp".into()];
            if let Ok(entries) = std::fs::read_dir(pair.share.path()) {
                names.extend(entries.flatten().filter_map(|e| e.file_name().to_str().map(str::to_owned)));
            }
            pair.sync(Scope::Paths(&Hints::removable(names)));
        }
        check_published(&pair, &mut last, &mut swaps);
    }
    stop.store(true, Ordering::SeqCst);
    let generations = writer.join().unwrap();
    assert!(generations > 1);
    assert!(swaps > 0, "the mirror never swapped ..data");
    pair.retired.grace = Duration::ZERO;
    pair.sync(Scope::Full);
    pair.assert_identical();

    /// The published directory holds both keys of one generation.
    fn check_published(pair: &Pair, last: &mut PathBuf, swaps: &mut u32) {
        let published = std::fs::read_link(pair.m("..data")).unwrap();
        let key = std::fs::read_to_string(pair.m(&format!("{}/key", published.display())));
        let other = std::fs::read_to_string(pair.m(&format!("{}/other", published.display())));
        let (Ok(key), Ok(other)) = (key, other) else {
            panic!(
                "..data -> {} is incomplete: {:?}",
                published.display(),
                mirror_below(pair, published.to_str().unwrap())
            );
        };
        assert_eq!(key.strip_prefix('v'), other.strip_prefix('o'), "{key} / {other}");
        if published != *last {
            *swaps += 1;
            *last = published;
        }
    }
}

/// The generation `..data` publishes now, read as the VMM reads it for a batch (a flat
/// kubelet directory).
fn carry(share: &Path, order: u64, earlier: &[&str]) -> Generation {
    let entry = |path: &str, content| {
        HostEntry::from_metadata(path, &std::fs::symlink_metadata(share.join(path)).unwrap(), content)
    };
    let to = std::fs::read_link(share.join("..data")).unwrap().to_str().unwrap().to_owned();
    let mut entries = vec![entry(&to, HostContent::Dir)];
    let mut names: Vec<String> =
        std::fs::read_dir(share.join(&to)).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    for name in names {
        let path = format!("{to}/{name}");
        entries.push(entry(&path, HostContent::File(std::fs::read(share.join(&path)).unwrap())));
    }
    Generation {
        order,
        link: entry("..data", HostContent::Symlink(to)),
        entries,
        earlier: earlier.iter().map(|t| t.to_string()).collect(),
    }
}

fn carrying(paths: &[&str], generation: Generation) -> Hints {
    let mut hints = Hints::removable(paths.iter().copied());
    hints.generations.insert(generation.link.path.clone(), generation);
    hints
}

#[test]
fn a_carried_generation_is_published_although_the_share_already_removed_it() {
    let mut pair = Pair::new();
    let ts1 = kubelet_update(pair.share.path(), 1, &[("user", "alice".into())]);
    pair.sync(Scope::Full);
    // Past one tick of the coarse clock that stamps ctimes.
    std::thread::sleep(Duration::from_millis(20));
    let ts2 = kubelet_update(pair.share.path(), 2, &[("user", "bob".into())]);
    // The VMM never read ts1 (the mirror got it from a full compare): the carried link's later
    // ctime tells that ts2 is newer.
    let g2 = carry(pair.share.path(), 1, &[]);
    // The host moves on and removes the generation the batch carries before the agent syncs:
    // read through the share, ts2 could never be published.
    let ts3 = kubelet_update(pair.share.path(), 3, &[("user", "carol".into())]);
    let report = pair.sync(Scope::Paths(&carrying(&["..data", "..data_tmp", &ts1, &ts2, &format!("{ts2}/user")], g2)));
    assert_eq!(std::fs::read_link(pair.m("..data")).unwrap(), Path::new(&ts2), "{report:#?}");
    assert_eq!(std::fs::read_to_string(pair.m("user")).unwrap(), "bob");
    assert!(!pair.m(&ts1).exists(), "the superseded generation goes at once (grace 0)");
    let swap = report.ops.iter().position(|o| *o == MirrorOp::Symlink("..data".into())).unwrap();
    let created = report.ops.iter().position(|o| *o == MirrorOp::CreateFile(format!("{ts2}/user"))).unwrap();
    assert!(created < swap, "{:#?}", report.ops);

    // The next batch carries ts3, naming ts2 among the earlier ones: the mirror catches up.
    let g3 = carry(pair.share.path(), 2, &[&ts2, &ts1]);
    pair.sync(Scope::Paths(&carrying(&["..data", &ts2, &ts3], g3)));
    pair.assert_identical();

    // A late batch carrying ts2 again is older than what the mirror shows: refused.
    let mut late = carry(pair.share.path(), 3, &[]);
    late.link.content = HostContent::Symlink(ts2.clone());
    for e in &mut late.entries {
        e.path = e.path.replacen(&ts3, &ts2, 1);
    }
    pair.sync(Scope::Paths(&carrying(&["..data"], late)));
    assert_eq!(std::fs::read_link(pair.m("..data")).unwrap(), Path::new(&ts3));
    pair.assert_identical();
}

#[test]
fn malformed_generations_are_not_carried() {
    let pair = Pair::new();
    kubelet_update(pair.share.path(), 1, &[("user", "alice".into())]);
    let good = carry(pair.share.path(), 1, &[]);
    assert!(generation_dir(&good).is_some());
    let bad = |f: &dyn Fn(&mut Generation)| {
        let mut g = good.clone();
        f(&mut g);
        generation_dir(&g)
    };
    assert_eq!(bad(&|g| g.link.path = "key".into()), None, "not a ..data link");
    assert_eq!(bad(&|g| g.link.content = HostContent::Symlink("../outside".into())), None);
    assert_eq!(bad(&|g| g.link.content = HostContent::Symlink("/etc".into())), None);
    assert_eq!(bad(&|g| g.entries[1].path = "../escape".into()), None);
    assert_eq!(bad(&|g| g.entries[1].path = "user".into()), None, "outside the generation's directory");
    assert_eq!(bad(&|g| g.entries[1].size += 1), None, "content shorter than its size");
    assert_eq!(bad(&|g| g.entries.remove(0).path.clear()), None, "the directory itself missing");
}

#[test]
fn a_carried_file_is_settled_from_the_batch_not_from_the_share() {
    use std::os::unix::fs::MetadataExt;
    let mut pair = Pair::new();
    std::fs::write(pair.s("f"), "one").unwrap();
    pair.sync(Scope::Full);
    std::fs::write(pair.s("f"), "two").unwrap();
    let meta = std::fs::symlink_metadata(pair.s("f")).unwrap();
    let carried = HostEntry {
        path: "f".into(),
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
        // The host's number, not the one the share shows through virtio-fs.
        ino: meta.ino() + 1000,
        size: 3,
        mtime: (meta.mtime(), meta.mtime_nsec()),
        ctime: (meta.ctime(), meta.ctime_nsec()),
        content: HostContent::File(b"two".to_vec()),
    };
    // The share is made unreadable for the sync: only the carried content can arrive.
    std::fs::remove_file(pair.s("f")).unwrap();
    let mut hints = Hints::removable(["f"]);
    hints.removed.clear();
    hints.entries.insert("f".into(), carried);
    let report = pair.sync(Scope::Paths(&hints));
    assert_eq!(std::fs::read_to_string(pair.m("f")).unwrap(), "two", "{report:#?}");
    assert_eq!(report.ops, [MirrorOp::RewriteFile("f".into())], "rewritten in place (IN_MODIFY), not replaced");
}
