//! Watcher tests against a fake hybrid vsock socket: a unix listener that answers
//! `CONNECT 1026` with `OK` and collects the change batches, as the agent would see them.

use super::*;
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::sync::mpsc::Receiver;
use std::time::Instant;

use tern_change_records::{ChangeBatch, ChangeKind, ChangeRecord, HostContent, AGENT_WATCH_PORT};

/// A fake VMM vsock socket with the agent listening on the watch port.
struct FakeAgent {
    batches: Receiver<ChangeBatch>,
    _dir: tempfile::TempDir,
    uds: PathBuf,
}

fn fake_agent() -> FakeAgent {
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("vsock.sock");
    serve_at(dir, uds)
}

fn serve_at(dir: tempfile::TempDir, uds: PathBuf) -> FakeAgent {
    let listener = UnixListener::bind(&uds).unwrap();
    let (tx, batches) = mpsc::channel();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut line = Vec::new();
                let mut byte = [0u8; 1];
                while conn.read(&mut byte).unwrap_or(0) == 1 && byte[0] != b'\n' {
                    line.push(byte[0]);
                }
                assert_eq!(line, format!("CONNECT {AGENT_WATCH_PORT}").into_bytes());
                conn.write_all(b"OK 1073741824\n").unwrap();
                while let Ok(batch) = tern_change_records::recv_batch(&mut conn) {
                    if tx.send(batch).is_err() {
                        return;
                    }
                }
            });
        }
    });
    FakeAgent { batches, _dir: dir, uds }
}

impl FakeAgent {
    /// Batches until one has `pred` true, within 5 s.
    fn until(&self, mut pred: impl FnMut(&ChangeBatch) -> bool) -> Vec<ChangeBatch> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let batch = self.batches.recv_timeout(left).unwrap_or_else(|_| panic!("timed out; saw {seen:#?}"));
            let done = pred(&batch);
            seen.push(batch);
            if done {
                return seen;
            }
        }
    }
}

fn paths(batches: &[ChangeBatch]) -> BTreeSet<String> {
    batches.iter().flat_map(|b| b.records.iter().map(|r| r.path.clone())).collect()
}

#[test]
fn connect_sends_a_resync_and_changes_arrive_coalesced() {
    let agent = fake_agent();
    let share = tempfile::tempdir().unwrap();
    let watcher = Watcher::start(&agent.uds, Duration::from_secs(3600), &Hardening::trap_for_test()).unwrap();
    watcher.add_share("secret", share.path()).unwrap();
    let first = agent.until(|b| b.resync);
    assert_eq!(first.last().unwrap().share, "secret");

    // A kubelet atomic-writer update.
    let ts = share.path().join("..2026_11_26_13_00_00.1");
    std::fs::create_dir(&ts).unwrap();
    std::fs::write(ts.join("key"), "v1").unwrap();
    std::os::unix::fs::symlink("..2026_11_26_13_00_00.1", share.path().join("..data_tmp")).unwrap();
    std::fs::rename(share.path().join("..data_tmp"), share.path().join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/key", share.path().join("key")).unwrap();
    let got = agent.until(|b| b.records.iter().any(|r| r.path == "key"));
    let seen = paths(&got);
    for p in ["..2026_11_26_13_00_00.1", "..2026_11_26_13_00_00.1/key", "..data", "key"] {
        assert!(seen.contains(p), "{p} missing from {seen:?}");
    }
    // The batch that reports the swap carries the generation it published, read on the host.
    let generation = got.iter().flat_map(|b| &b.generations).next().expect("no generation carried");
    assert_eq!(generation.link.path, "..data");
    assert_eq!(generation.link.content, HostContent::Symlink("..2026_11_26_13_00_00.1".into()));
    let key = generation.entries.iter().find(|e| e.path == "..2026_11_26_13_00_00.1/key").unwrap();
    assert_eq!(key.content, HostContent::File(b"v1".to_vec()));
    // A handful of operations: a batch or two, not one per event.
    assert!(got.iter().filter(|b| !b.resync).count() <= 3, "{got:#?}");
    let seqs: Vec<u64> = got.iter().map(|b| b.seq).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");

    // A file in a subdirectory created after the watch: the new directory got its own watch.
    std::fs::write(ts.join("later"), "x").unwrap();
    agent.until(|b| b.records.iter().any(|r| r.path == "..2026_11_26_13_00_00.1/later"));

    // A plain file travels with its content.
    std::fs::write(share.path().join("plain"), "content").unwrap();
    let got = agent.until(|b| b.entries.iter().any(|e| e.path == "plain"));
    let entry = got.iter().flat_map(|b| &b.entries).find(|e| e.path == "plain").unwrap();
    assert_eq!(entry.content, HostContent::File(b"content".to_vec()));

    std::fs::remove_file(share.path().join("key")).unwrap();
    let got = agent.until(|b| b.records.iter().any(|r| r.path == "key"));
    let record = got.iter().flat_map(|b| &b.records).rfind(|r| r.path == "key").unwrap();
    assert_eq!(record.kind, ChangeKind::Removed);

    let c = watcher.counters();
    assert!(c.connects >= 1 && c.resyncs_sent >= 1 && c.records_sent >= 5, "{c:?}");
}

#[test]
fn watcher_retries_until_the_agent_listens_and_resyncs_each_share() {
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("vsock.sock");
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let watcher = Watcher::start(&uds, Duration::from_secs(3600), &Hardening::trap_for_test()).unwrap();
    watcher.add_share("a", a.path()).unwrap();
    watcher.add_share("b", b.path()).unwrap();
    assert!(matches!(watcher.add_share("a", b.path()), Err(WatchError::DuplicateShare(_))));
    assert!(matches!(watcher.add_share("../x", b.path()), Err(WatchError::InvalidName(_))));
    // The same directory, or one inside another share, cannot be watched twice.
    assert!(matches!(watcher.add_share("a2", a.path()), Err(WatchError::Overlap { .. })));
    std::fs::create_dir(b.path().join("sub")).unwrap();
    assert!(matches!(watcher.add_share("b-sub", &b.path().join("sub")), Err(WatchError::Overlap { .. })));
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(watcher.counters().connects, 0);

    // The "agent" starts listening late.
    let agent = serve_at(dir, uds);
    let mut resynced = BTreeSet::new();
    agent.until(|batch| {
        if batch.resync {
            resynced.insert(batch.share.clone());
        }
        resynced.len() == 2
    });
    watcher.remove_share("a").unwrap();
    assert!(matches!(watcher.remove_share("a"), Err(WatchError::UnknownShare(_))));
    assert_eq!(watcher.shares(), vec!["b".to_string()]);
    std::fs::write(a.path().join("ignored"), "x").unwrap();
    std::fs::write(b.path().join("seen"), "x").unwrap();
    let got = agent.until(|batch| batch.records.iter().any(|r| r.path == "seen"));
    assert!(got.iter().all(|batch| batch.share == "b"), "{got:#?}");
}

#[test]
fn periodic_resync_is_the_safety_net() {
    let agent = fake_agent();
    let share = tempfile::tempdir().unwrap();
    let watcher = Watcher::start(&agent.uds, Duration::from_millis(50), &Hardening::trap_for_test()).unwrap();
    watcher.add_share("s", share.path()).unwrap();
    let mut resyncs = 0;
    agent.until(|b| {
        resyncs += usize::from(b.resync);
        resyncs >= 3
    });
}

#[test]
fn a_burst_ends_with_every_path_reported() {
    let agent = fake_agent();
    let share = tempfile::tempdir().unwrap();
    let watcher = Watcher::start(&agent.uds, Duration::from_secs(3600), &Hardening::trap_for_test()).unwrap();
    watcher.add_share("s", share.path()).unwrap();
    agent.until(|b| b.resync);
    for i in 0..2000 {
        std::fs::write(share.path().join(format!("f{}", i % 10)), i.to_string()).unwrap();
    }
    std::fs::write(share.path().join("last"), "done").unwrap();
    let got = agent.until(|b| b.resync || b.records.iter().any(|r| r.path == "last"));
    let seen = paths(&got);
    assert!(got.iter().any(|b| b.resync) || (0..10).all(|i| seen.contains(&format!("f{i}"))), "{seen:?}");
    // Coalesced: far fewer batches than the 4,000 events.
    assert!(got.len() < 400, "{} batches", got.len());
}

/// Every record for `path` in `batches`, in order.
fn records_for<'a>(batches: &'a [ChangeBatch], path: &str) -> Vec<&'a ChangeRecord> {
    batches.iter().flat_map(|b| &b.records).filter(|r| r.path == path).collect()
}

#[test]
fn both_ends_of_a_rename_are_paired_by_cookie() {
    let agent = fake_agent();
    let share = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let watcher = Watcher::start(&agent.uds, Duration::from_secs(3600), &Hardening::trap_for_test()).unwrap();
    watcher.add_share("s", share.path()).unwrap();
    agent.until(|b| b.resync);

    // Modified, then renamed, within one burst: the new end names the old one.
    std::fs::write(share.path().join("f"), "1").unwrap();
    std::fs::write(share.path().join("f"), "22").unwrap();
    std::fs::rename(share.path().join("f"), share.path().join("g")).unwrap();
    let got = agent.until(|b| b.records.iter().any(|r| r.path == "g"));
    let g = records_for(&got, "g");
    assert_eq!(g.last().map(|r| (r.kind, r.from.as_deref())), Some((ChangeKind::Moved, Some("f"))), "{got:#?}");
    // The old end keeps a record of its own, for agents that do not pair.
    assert_eq!(records_for(&got, "f").last().map(|r| r.kind), Some(ChangeKind::Moved), "{got:#?}");

    // Renames into and out of the share have one end only: plain hints.
    std::fs::write(outside.path().join("in"), "x").unwrap();
    std::fs::rename(outside.path().join("in"), share.path().join("in")).unwrap();
    let got = agent.until(|b| b.records.iter().any(|r| r.path == "in"));
    assert_eq!(records_for(&got, "in").last().map(|r| (r.kind, r.from.clone())), Some((ChangeKind::Moved, None)));
    std::fs::rename(share.path().join("g"), outside.path().join("g")).unwrap();
    let got = agent.until(|b| b.records.iter().any(|r| r.path == "g"));
    assert_eq!(records_for(&got, "g").last().map(|r| (r.kind, r.from.clone())), Some((ChangeKind::Moved, None)));
}

#[test]
fn a_renamed_directory_keeps_reporting_under_its_new_path() {
    let agent = fake_agent();
    let share = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(share.path().join("a/sub")).unwrap();
    let watcher = Watcher::start(&agent.uds, Duration::from_secs(3600), &Hardening::trap_for_test()).unwrap();
    watcher.add_share("s", share.path()).unwrap();
    agent.until(|b| b.resync);

    std::fs::create_dir(share.path().join("b")).unwrap();
    agent.until(|b| b.records.iter().any(|r| r.path == "b"));
    std::fs::rename(share.path().join("a"), share.path().join("b/c")).unwrap();
    let got = agent.until(|b| b.records.iter().any(|r| r.path == "b/c"));
    let moved = records_for(&got, "b/c");
    assert_eq!(moved.last().map(|r| (r.kind, r.from.as_deref())), Some((ChangeKind::Moved, Some("a"))), "{got:#?}");

    // The watches moved with the tree: changes inside report the new paths, never the old.
    std::fs::write(share.path().join("b/c/sub/file"), "x").unwrap();
    std::fs::write(share.path().join("b/c/top"), "x").unwrap();
    let got = agent.until(|b| b.records.iter().any(|r| r.path == "b/c/top"));
    let seen = paths(&got);
    assert!(seen.contains("b/c/sub/file"), "{seen:?}");
    assert!(!seen.iter().any(|p| p.starts_with("a/") || p == "a"), "{seen:?}");

    // Moving the directory out of the share drops its watches once the burst is over.
    let outside = tempfile::tempdir().unwrap();
    std::fs::rename(share.path().join("b/c"), outside.path().join("c")).unwrap();
    agent.until(|b| b.records.iter().any(|r| r.path == "b/c"));
    std::fs::write(outside.path().join("c/sub/late"), "x").unwrap();
    std::fs::write(share.path().join("marker"), "x").unwrap();
    let got = agent.until(|b| b.records.iter().any(|r| r.path == "marker"));
    let seen = paths(&got);
    assert!(!seen.iter().any(|p| p.contains("late")), "{seen:?}");
}

#[test]
fn a_directory_renamed_into_a_brand_new_one_stays_watched() {
    let agent = fake_agent();
    let share = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(share.path().join("a/sub")).unwrap();
    let watcher = Watcher::start(&agent.uds, Duration::from_secs(3600), &Hardening::trap_for_test()).unwrap();
    watcher.add_share("s", share.path()).unwrap();
    agent.until(|b| b.resync);

    // `b` may be walked before or after the rename: either way `b/c` ends up watched, and the
    // old end's expiry must not drop the watches the walk found again.
    std::fs::create_dir(share.path().join("b")).unwrap();
    std::fs::rename(share.path().join("a"), share.path().join("b/c")).unwrap();
    agent.until(|b| b.records.iter().any(|r| r.path == "b/c"));
    std::thread::sleep(Duration::from_millis(50));
    std::fs::write(share.path().join("b/c/sub/file"), "x").unwrap();
    agent.until(|b| b.records.iter().any(|r| r.path == "b/c/sub/file"));
}

#[test]
fn every_batch_carries_its_host_stage_stamps_in_order() {
    let agent = fake_agent();
    let share = tempfile::tempdir().unwrap();
    let watcher = Watcher::start(&agent.uds, Duration::from_secs(3600), &Hardening::trap_for_test()).unwrap();
    watcher.add_share("s", share.path()).unwrap();
    agent.until(|b| b.resync);
    let before = unix_now_ns();
    std::fs::write(share.path().join("f"), "x").unwrap();
    let got = agent.until(|b| b.records.iter().any(|r| r.path == "f"));
    let batch = got.last().unwrap();
    // inotify read, coalescer flush, vsock send: one host clock, in path order.
    assert!(before <= batch.first_change_unix_ns, "{batch:?}");
    assert!(batch.first_change_unix_ns <= batch.flush_unix_ns, "{batch:?}");
    assert!(batch.flush_unix_ns <= batch.send_unix_ns, "{batch:?}");
    // The flush follows the quiet period, not a whole extra millisecond of epoll timeout on
    // top: well under 1 s here, and at least the quiet period.
    let read_to_flush = Duration::from_nanos(batch.flush_unix_ns - batch.first_change_unix_ns);
    assert!(read_to_flush >= coalesce::QUIET_PERIOD, "{read_to_flush:?}");
    assert!(read_to_flush < Duration::from_secs(1), "{read_to_flush:?}");
}
