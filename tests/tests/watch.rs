//! Watchable mounts with a real guest: host changes to a `--share …:watch` directory reach a
//! guest process blocked in inotify, kubelet's atomic-writer updates never expose a dangling
//! `..data`, shares past the limits fall back to a bind mount, and a burst of host events ends
//! with identical trees. One VM boot per test; the host acts while the guest command runs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::time::Duration;
use tern_tests::{require_linux_kvm, LiveTern};

/// One boot plus the guest script, under nested virtualization.
const LIMIT: Duration = Duration::from_secs(300);
/// How long one host change may take to show up in the guest (generous: emulated CPU).
const PROPAGATION: Duration = Duration::from_secs(30);

fn share_arg(host: &Path, guest: &str) -> String {
    format!("{}:{guest}:watch", host.display())
}

/// Kubelet's atomic writer (`atomic_writer.go`): payload in a new timestamped dir,
/// `..data_tmp` renamed over `..data`, user-visible symlinks, old dir removed.
fn kubelet_update(share: &Path, generation: u32, key: &str, value: &str) {
    let ts = format!("..2026_11_26_13_00_00.{generation:09}");
    let old = std::fs::read_link(share.join("..data")).ok();
    std::fs::create_dir(share.join(&ts)).unwrap();
    std::fs::write(share.join(&ts).join(key), value).unwrap();
    symlink(&ts, share.join("..data_tmp")).unwrap();
    std::fs::rename(share.join("..data_tmp"), share.join("..data")).unwrap();
    if std::fs::symlink_metadata(share.join(key)).is_err() {
        symlink(format!("..data/{key}"), share.join(key)).unwrap();
    }
    if let Some(old) = old {
        std::fs::remove_dir_all(share.join(old)).unwrap();
    }
}

#[test]
fn guest_inotify_sees_host_create_modify_rename_delete() {
    if !require_linux_kvm("guest_inotify_sees_host_create_modify_rename_delete") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let share = share_arg(dir.path(), "/mnt/w");
    let script = "/init watch-events /mnt/w & \
        while [ ! -e /mnt/w/done ]; do usleep 20000; done; usleep 300000; kill $!; echo END";
    let mut tern = LiveTern::spawn(&["run", "--share", &share, "--", "sh", "-c", script], &[], LIMIT);
    tern.wait_for(LIMIT, |l| l == "WATCHING");

    let f = dir.path().join("f");
    std::fs::write(&f, "1").unwrap();
    tern.wait_for(PROPAGATION, |l| l == "CREATE f");
    std::fs::write(&f, "22").unwrap();
    tern.wait_for(PROPAGATION, |l| l == "MODIFY f");
    std::fs::rename(&f, dir.path().join("g")).unwrap();
    tern.wait_for(PROPAGATION, |l| l == "MOVED_TO g");
    std::fs::remove_file(dir.path().join("g")).unwrap();
    tern.wait_for(PROPAGATION, |l| l == "DELETE g");
    std::fs::write(dir.path().join("done"), "").unwrap();
    let (code, lines) = tern.finish();
    assert_eq!(code, Some(0), "{lines:?}");
    assert!(lines.iter().any(|l| l == "END"), "{lines:?}");
}

#[test]
fn kubelet_updates_never_expose_a_dangling_data_link() {
    if !require_linux_kvm("kubelet_updates_never_expose_a_dangling_data_link") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    kubelet_update(dir.path(), 0, "key", "v0");
    let share = share_arg(dir.path(), "/mnt/k");
    let script = "n=0; echo READY; \
        while [ ! -e /mnt/k/stop ]; do \
          [ -d /mnt/k/..data/ ] || echo DANGLING; \
          v=$(cat /mnt/k/key 2>&1) || echo BADREAD $v ..data=$(readlink /mnt/k/..data) $(ls -a /mnt/k); \
          case \"$v\" in v[0-9]*) ;; *) echo \"BADVALUE $v\";; esac; \
          n=$((n+1)); \
        done; echo \"SAMPLES $n\"; echo \"FINAL $(cat /mnt/k/key)\"";
    let mut tern = LiveTern::spawn(&["run", "--share", &share, "--", "sh", "-c", script], &[], LIMIT);
    tern.wait_for(LIMIT, |l| l == "READY");
    for generation in 1..=100 {
        kubelet_update(dir.path(), generation, "key", &format!("v{generation}"));
        std::thread::sleep(Duration::from_millis(20));
    }
    std::fs::write(dir.path().join("stop"), "").unwrap();
    let (code, lines) = tern.finish();
    assert_eq!(code, Some(0), "{lines:?}");
    let bad: Vec<&String> = lines.iter().filter(|l| l.starts_with("DANGLING") || l.starts_with("BAD")).collect();
    assert!(bad.is_empty(), "{bad:?}");
    assert!(lines.iter().any(|l| l == "FINAL v100"), "{lines:?}");
    let samples = lines.iter().find_map(|l| l.strip_prefix("SAMPLES ")).and_then(|n| n.parse::<u64>().ok());
    assert!(samples.is_some_and(|n| n > 0), "{lines:?}");
    eprintln!("guest sampled ..data/key {} times during 100 updates", samples.unwrap_or(0));
}

#[test]
fn shares_past_the_limits_fall_back_to_a_bind_mount() {
    if !require_linux_kvm("shares_past_the_limits_fall_back_to_a_bind_mount") {
        return;
    }
    let many = tempfile::tempdir().unwrap();
    for i in 0..16 {
        std::fs::write(many.path().join(format!("f{i:02}")), format!("orig{i}")).unwrap();
    }
    let big = tempfile::tempdir().unwrap();
    std::fs::write(big.path().join("small"), "small").unwrap();
    let (a, b) = (share_arg(many.path(), "/mnt/n"), share_arg(big.path(), "/mnt/b"));
    let script = "echo \"COUNT $(ls /mnt/n | wc -l)\"; echo READY; \
        while [ ! -e /mnt/n/f16 ]; do usleep 20000; done; echo \"SEEN17 $(cat /mnt/n/f00)\"; \
        while [ \"$(cat /mnt/n/f00)\" != changed ]; do usleep 20000; done; echo LATER-CHANGE-VISIBLE; \
        while [ \"$(cat /mnt/b/big 2>/dev/null | wc -c)\" -lt 2097152 ]; do usleep 20000; done; \
        echo \"BIG $(cat /mnt/b/small)\"; \
        while [ ! -e /mnt/b/later ]; do usleep 20000; done; echo \"LATER $(cat /mnt/b/later)\"; \
        grep ' /mnt/' /proc/mounts";
    let mut tern = LiveTern::spawn(&["run", "--share", &a, "--share", &b, "--", "sh", "-c", script], &[], LIMIT);
    tern.wait_for(LIMIT, |l| l == "COUNT 16");
    tern.wait_for(PROPAGATION, |l| l == "READY");
    std::fs::write(many.path().join("f16"), "seventeenth").unwrap();
    // The earlier files stay readable across the switch.
    tern.wait_for(PROPAGATION, |l| l == "SEEN17 orig0");
    std::fs::write(many.path().join("f00"), "changed").unwrap();
    tern.wait_for(PROPAGATION, |l| l == "LATER-CHANGE-VISIBLE");
    std::fs::write(big.path().join("big"), vec![b'x'; 2 << 20]).unwrap();
    tern.wait_for(PROPAGATION, |l| l == "BIG small");
    std::fs::write(big.path().join("later"), "visible").unwrap();
    tern.wait_for(PROPAGATION, |l| l == "LATER visible");
    let (code, lines) = tern.finish();
    assert_eq!(code, Some(0), "{lines:?}");
    // Both guest paths are now virtio-fs bind mounts (on top of their tmpfs mirrors).
    for path in ["/mnt/n", "/mnt/b"] {
        assert!(lines.iter().any(|l| l.contains(&format!(" {path} virtiofs "))), "{path} not bound: {lines:?}");
    }
}

#[test]
fn a_burst_of_10000_host_events_ends_with_identical_trees() {
    if !require_linux_kvm("a_burst_of_10000_host_events_ends_with_identical_trees") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let share = share_arg(dir.path(), "/mnt/d");
    // `done` may be settled in the same pass as the last changes: let that pass finish.
    let script = "echo READY; while [ ! -e /mnt/d/done ]; do usleep 20000; done; sleep 2; \
        cd /mnt/d && for f in $(ls -A); do echo \"ENTRY $f $(sha256sum < $f | cut -c1-64)\"; done; echo END";
    let mut tern = LiveTern::spawn(&["run", "--share", &share, "--", "sh", "-c", script], &[], LIMIT);
    tern.wait_for(LIMIT, |l| l == "READY");
    // Writes, renames and deletes over 12 names: ~20,000 inotify events in all.
    let name = |i: usize| dir.path().join(format!("f{:02}", i % 12));
    let mut ops = 0;
    for i in 0..10_000usize {
        match i % 5 {
            0 | 1 => {
                std::fs::write(name(i), format!("{i}")).unwrap();
            }
            2 => {
                let _ = std::fs::rename(name(i), name(i + 5));
            }
            3 => {
                let _ = std::fs::remove_file(name(i + 7));
            }
            _ => {
                std::fs::write(name(i), format!("{i}-{}", "y".repeat(i % 97))).unwrap();
            }
        }
        ops += 1;
    }
    std::fs::write(dir.path().join("done"), "").unwrap();
    let (code, lines) = tern.finish();
    assert_eq!(code, Some(0), "{lines:?}");
    let guest: BTreeMap<String, String> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("ENTRY "))
        .filter_map(|l| l.split_once(' '))
        .map(|(name, hash)| (name.to_owned(), hash.to_owned()))
        .collect();
    let mut host = BTreeMap::new();
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let entry = entry.unwrap();
        let hash: String =
            Sha256::digest(std::fs::read(entry.path()).unwrap()).iter().map(|b| format!("{b:02x}")).collect();
        host.insert(entry.file_name().to_string_lossy().into_owned(), hash);
    }
    assert_eq!(guest, host, "after {ops} host operations");
}

/// Kubelet's atomic writer with several keys, all holding `value`.
fn kubelet_update_keys(share: &Path, generation: u32, keys: &[&str], value: &str) {
    let ts = format!("..2026_11_26_13_00_00.{generation:09}");
    let old = std::fs::read_link(share.join("..data")).ok();
    std::fs::create_dir(share.join(&ts)).unwrap();
    for key in keys {
        std::fs::write(share.join(&ts).join(key), value).unwrap();
    }
    symlink(&ts, share.join("..data_tmp")).unwrap();
    std::fs::rename(share.join("..data_tmp"), share.join("..data")).unwrap();
    for key in keys {
        if std::fs::symlink_metadata(share.join(key)).is_err() {
            symlink(format!("..data/{key}"), share.join(key)).unwrap();
        }
    }
    if let Some(old) = old {
        std::fs::remove_dir_all(share.join(old)).unwrap();
    }
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    sorted.get((sorted.len().saturating_sub(1)) * p / 100).copied().unwrap_or_default()
}

/// For 60 s a 3-key secret is updated 50 times a second while another watchable share takes a
/// 10,000-file burst. A guest reader resolves `..data` once per pass and reads the three keys
/// through it, as a program that wants one consistent generation does: it must never find
/// `..data` dangling or a key missing, never see the three keys disagree, and never see a
/// generation older than one it saw before. A generation may be skipped (the mirror publishes
/// what the share holds when it syncs, as kubelet's own readers may miss a quick succession of
/// updates), but the last one arrives, and both final trees equal the host's.
#[test]
fn a_secret_updated_50_times_a_second_during_a_10000_file_burst_stays_ordered_and_whole() {
    if !require_linux_kvm("a_secret_updated_50_times_a_second_during_a_10000_file_burst_stays_ordered_and_whole") {
        return;
    }
    const KEYS: [&str; 3] = ["username", "password", "token"];
    const RUN: Duration = Duration::from_secs(60);
    const PERIOD: Duration = Duration::from_millis(20);
    let secret = tempfile::tempdir().unwrap();
    kubelet_update_keys(secret.path(), 0, &KEYS, "0");
    let burst = tempfile::tempdir().unwrap();
    let (k, b) = (share_arg(secret.path(), "/mnt/k"), share_arg(burst.path(), "/mnt/b"));
    let script = "last=0; n=0; echo READY; \
        while [ ! -e /mnt/k/stop ]; do \
          d=$(readlink /mnt/k/..data) || { echo DANGLING; continue; }; \
          [ -d /mnt/k/$d ] || { echo DANGLING $d; continue; }; \
          u=$(cat /mnt/k/$d/username) && p=$(cat /mnt/k/$d/password) && t=$(cat /mnt/k/$d/token) \
            || { [ -d /mnt/k/$d ] && echo MISSING $d $(ls -a /mnt/k/$d); continue; }; \
          [ \"$u\" = \"$p\" ] && [ \"$p\" = \"$t\" ] || echo TORN $u $p $t; \
          [ \"$u\" -ge \"$last\" ] || echo BACKWARDS $u after $last; \
          [ \"$u\" -gt \"$last\" ] && echo SEEN $u; last=$u; n=$((n+1)); \
        done; echo \"PASSES $n\"; \
        while [ ! -e /mnt/b/done ]; do usleep 20000; done; sleep 2; \
        for f in $(ls -A /mnt/b); do echo \"BURST $f $(sha256sum < /mnt/b/$f | cut -c1-64)\"; done; \
        echo \"FINAL $(cat /mnt/k/username) $(cat /mnt/k/password) $(cat /mnt/k/token)\"";
    let limit = LIMIT + RUN;
    let mut tern = LiveTern::spawn(&["run", "--share", &k, "--share", &b, "--", "sh", "-c", script], &[], limit);
    tern.wait_for(LIMIT, |l| l == "READY");

    let start = std::time::Instant::now();
    let (secret_dir, burst_dir) = (secret.path().to_owned(), burst.path().to_owned());
    let writer = std::thread::spawn(move || {
        let mut written = Vec::new();
        let mut generation = 0u32;
        while start.elapsed() < RUN {
            generation += 1;
            let at = std::time::Instant::now();
            kubelet_update_keys(&secret_dir, generation, &KEYS, &generation.to_string());
            written.push(at);
            let next = start + PERIOD * generation;
            std::thread::sleep(next.saturating_duration_since(std::time::Instant::now()));
        }
        std::fs::write(secret_dir.join("stop"), "").unwrap();
        written
    });
    // The burst, a few seconds in: 10,000 files created, rewritten and removed over 12 names.
    let burster = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(5));
        let name = |i: usize| burst_dir.join(format!("f{:02}", i % 12));
        for i in 0..10_000usize {
            match i % 4 {
                0 | 1 => std::fs::write(name(i), format!("{i}")).unwrap(),
                2 => drop(std::fs::remove_file(name(i + 5))),
                _ => std::fs::write(name(i), format!("{i}-{}", "y".repeat(i % 97))).unwrap(),
            }
        }
        std::fs::write(burst_dir.join("done"), "").unwrap();
    });
    let mut seen_at: Vec<(u32, std::time::Instant)> = Vec::new();
    loop {
        let line = tern.next_line().unwrap_or_else(|| panic!("tern ended early: {:?}", tern.seen()));
        if let Some(generation) = line.strip_prefix("SEEN ").and_then(|g| g.parse().ok()) {
            seen_at.push((generation, std::time::Instant::now()));
        }
        if line.starts_with("PASSES ") {
            break;
        }
    }
    let written = writer.join().unwrap();
    burster.join().unwrap();
    let (code, lines) = tern.finish();
    assert_eq!(code, Some(0), "{lines:?}");
    let bad: Vec<&String> = lines
        .iter()
        .filter(|l| ["DANGLING", "MISSING", "TORN", "BACKWARDS"].iter().any(|p| l.starts_with(p)))
        .collect();
    assert!(bad.is_empty(), "{} bad reads, first: {:?}", bad.len(), &bad[..bad.len().min(10)]);
    let last = written.len();
    assert!(lines.iter().any(|l| *l == format!("FINAL {last} {last} {last}")), "last generation {last}: {lines:?}");

    let guest: BTreeMap<String, String> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("BURST "))
        .filter_map(|l| l.split_once(' '))
        .map(|(name, hash)| (name.to_owned(), hash.to_owned()))
        .collect();
    let mut host = BTreeMap::new();
    for entry in std::fs::read_dir(burst.path()).unwrap() {
        let entry = entry.unwrap();
        let hash: String =
            Sha256::digest(std::fs::read(entry.path()).unwrap()).iter().map(|b| format!("{b:02x}")).collect();
        host.insert(entry.file_name().to_string_lossy().into_owned(), hash);
    }
    assert_eq!(guest, host, "the burst share's final tree");

    // Update -> first pass of the guest reader that saw it (includes the reader's own pass time
    // and the stdout trip back).
    let mut latency: Vec<Duration> = seen_at
        .iter()
        .filter_map(|(g, at)| written.get((*g as usize).checked_sub(1)?).map(|w| at.saturating_duration_since(*w)))
        .collect();
    latency.sort();
    eprintln!(
        "{last} updates in {RUN:?}; the guest reader saw {} generations; update -> seen p50 {:?}, p99 {:?}, max {:?}",
        seen_at.len(),
        percentile(&latency, 50),
        percentile(&latency, 99),
        latency.last().copied().unwrap_or_default(),
    );
    assert!(!latency.is_empty());
}
