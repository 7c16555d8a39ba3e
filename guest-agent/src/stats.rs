//! Guest-wide statistics for `Request::Stats`, read from /proc, plus the agent's own
//! counters of its watchable-mount mirrors ([`watch`]).
//!
//! The parsers take the file contents as strings so they are tested without a /proc.

use std::path::{Path, PathBuf};
use tern_protocol::{AgentProcessStats, DiskStats, GuestStats, NetDevStats, MAX_STATS_DEVICES};

/// Errors collecting statistics.
#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("unexpected format of {file}: {what}")]
    Format { file: &'static str, what: &'static str },
}

/// Read everything from the /proc mounted at `proc_root`.
pub fn collect(proc_root: &Path) -> Result<GuestStats, StatsError> {
    let read = |name: &str| {
        let path = proc_root.join(name);
        std::fs::read_to_string(&path).map_err(|source| StatsError::Read { path, source })
    };
    let mem = parse_meminfo(&read("meminfo")?)?;
    let load_avg = parse_loadavg(&read("loadavg")?)?;
    let cpu = parse_stat(&read("stat")?)?;
    let uptime_secs = parse_uptime(&read("uptime")?)?;
    let tasks = count_tasks(proc_root)?;
    // The rest is best effort: a kernel without block devices or networking has no such
    // files, and the numbers above are what matters most.
    let optional = |name: &str| std::fs::read_to_string(proc_root.join(name)).unwrap_or_default();
    let self_dir = proc_root.join("self");
    Ok(GuestStats {
        mem_total_kib: mem.total_kib,
        mem_free_kib: mem.free_kib,
        mem_available_kib: mem.available_kib,
        load_avg,
        cpus: cpu.cpus,
        cpu_ticks: cpu.ticks,
        tasks,
        uptime_secs,
        mem_cached_kib: mem.cached_kib,
        agent: agent_process(&self_dir),
        disks: parse_diskstats(&optional("diskstats")),
        net: parse_net_dev(&optional("net/dev")),
        watch: tern_protocol::WatchStats {
            mounts_watched: u32::try_from(crate::mirror::watched_mounts()).unwrap_or(u32::MAX),
            ..watch::snapshot()
        },
    })
}

/// The agent's own resource use from `/proc/self` (zeros for what cannot be read).
fn agent_process(self_dir: &Path) -> AgentProcessStats {
    let read = |name: &str| std::fs::read_to_string(self_dir.join(name)).unwrap_or_default();
    let (cpu_user_ticks, cpu_system_ticks, threads) = parse_self_stat(&read("stat")).unwrap_or_default();
    let page_size = page_size();
    let rss_pages = read("statm").split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let fds = std::fs::read_dir(self_dir.join("fd")).map(|d| d.count()).unwrap_or(0);
    AgentProcessStats {
        rss_bytes: rss_pages.saturating_mul(page_size),
        cpu_user_ticks,
        cpu_system_ticks,
        fds: u32::try_from(fds).unwrap_or(u32::MAX),
        threads,
    }
}

fn page_size() -> u64 {
    // SAFETY: sysconf only reads a system constant.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).ok().filter(|s| *s > 0).unwrap_or(4096)
}

/// utime, stime and num_threads from `/proc/<pid>/stat`. The command name (field 2) may hold
/// spaces and parentheses, so fields are counted from the last `)`.
fn parse_self_stat(text: &str) -> Option<(u64, u64, u32)> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3, so field N is fields[N - 3].
    let utime = fields.get(14 - 3)?.parse().ok()?;
    let stime = fields.get(15 - 3)?.parse().ok()?;
    let threads = fields.get(20 - 3)?.parse().ok()?;
    Some((utime, stime, threads))
}

/// Devices of /proc/diskstats that did any I/O (ram and loop devices without I/O are noise).
fn parse_diskstats(text: &str) -> Vec<DiskStats> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
            Some(DiskStats {
                name: (*f.get(2)?).to_owned(),
                reads: num(3)?,
                sectors_read: num(5)?,
                writes: num(7)?,
                sectors_written: num(9)?,
            })
        })
        .filter(|d| d.reads > 0 || d.writes > 0)
        .take(MAX_STATS_DEVICES)
        .collect()
}

/// Interfaces of /proc/net/dev (two header lines, then `name: rx… tx…`).
fn parse_net_dev(text: &str) -> Vec<NetDevStats> {
    text.lines()
        .filter_map(|line| {
            let (name, counters) = line.split_once(':')?;
            let f: Vec<u64> = counters.split_whitespace().map(str::parse).collect::<Result<_, _>>().ok()?;
            Some(NetDevStats {
                name: name.trim().to_owned(),
                rx_bytes: *f.first()?,
                rx_packets: *f.get(1)?,
                tx_bytes: *f.get(8)?,
                tx_packets: *f.get(9)?,
            })
        })
        .take(MAX_STATS_DEVICES)
        .collect()
}

/// Counters of the watchable-mount mirrors, bumped by `mirror` and read by [`collect`].
pub mod watch {
    use std::collections::VecDeque;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Mutex;
    use std::time::{SystemTime, UNIX_EPOCH};
    use tern_protocol::{
        WatchStage, WatchStageHistogram, WatchStageSample, WatchStats, MAX_WATCH_STAGE_SAMPLES, WATCH_APPLY_BUCKETS,
        WATCH_STAGE_BUCKETS,
    };
    use tern_sync::LockExt;

    static BATCHES_RECEIVED: AtomicU64 = AtomicU64::new(0);
    static RECORDS_RECEIVED: AtomicU64 = AtomicU64::new(0);
    static RECORDS_APPLIED: AtomicU64 = AtomicU64::new(0);
    static RESYNCS: AtomicU64 = AtomicU64::new(0);
    static BIND_FALLBACKS: AtomicU64 = AtomicU64::new(0);
    /// Oldest host change time (ns since the epoch) of the batches queued but not applied.
    static OLDEST_PENDING_NS: AtomicU64 = AtomicU64::new(0);
    static LATENCY: [AtomicU64; WATCH_APPLY_BUCKETS.len() + 1] =
        [const { AtomicU64::new(0) }; WATCH_APPLY_BUCKETS.len() + 1];
    static LATENCY_COUNT: AtomicU64 = AtomicU64::new(0);
    static LATENCY_SUM_NS: AtomicU64 = AtomicU64::new(0);

    /// One histogram per [`WatchStage`] (in `WatchStage::ALL` order).
    struct StageHistogram {
        buckets: [AtomicU64; WATCH_STAGE_BUCKETS.len() + 1],
        count: AtomicU64,
        sum_ns: AtomicU64,
    }
    static STAGES: [StageHistogram; WatchStage::ALL.len()] = [const {
        StageHistogram {
            buckets: [const { AtomicU64::new(0) }; WATCH_STAGE_BUCKETS.len() + 1],
            count: AtomicU64::new(0),
            sum_ns: AtomicU64::new(0),
        }
    }; WatchStage::ALL.len()];
    /// The last applied batches' stages. Only the mirror-sync thread pushes and a stats
    /// request copies, each for a moment.
    static RECENT: Mutex<VecDeque<WatchStageSample>> = Mutex::new(VecDeque::new());

    fn bump(c: &AtomicU64, by: u64) {
        c.fetch_add(by, Ordering::Relaxed);
    }

    /// The guest's monotonic clock (ns since boot): one clock for the agent and a container's
    /// watcher (`watch-events --stamps`).
    pub fn mono_ns() -> u64 {
        nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
            u64::try_from(t.tv_sec()).unwrap_or(0) * 1_000_000_000 + u64::try_from(t.tv_nsec()).unwrap_or(0)
        })
    }

    fn observe_stage(stage: WatchStage, ns: u64) {
        let Some(h) = WatchStage::ALL.iter().position(|s| *s == stage).and_then(|i| STAGES.get(i)) else {
            return;
        };
        let secs = ns as f64 / 1e9;
        let slot = WATCH_STAGE_BUCKETS.iter().position(|b| secs <= *b).unwrap_or(WATCH_STAGE_BUCKETS.len());
        if let Some(c) = h.buckets.get(slot) {
            bump(c, 1);
        }
        bump(&h.count, 1);
        bump(&h.sum_ns, ns);
    }

    /// Record the stages of one applied batch: its host stamps' differences, and the guest's
    /// own from its receipt.
    pub fn batch_applied(sample: WatchStageSample) {
        if sample.send_unix_ns != 0 {
            observe_stage(WatchStage::ReadToFlush, sample.read_to_flush_ns);
            observe_stage(WatchStage::FlushToSend, sample.flush_to_send_ns);
        }
        observe_stage(
            WatchStage::ReceiptToApplyStart,
            sample.apply_start_mono_ns.saturating_sub(sample.receipt_mono_ns),
        );
        observe_stage(WatchStage::ReceiptToApplied, sample.applied_mono_ns.saturating_sub(sample.receipt_mono_ns));
        let mut recent = RECENT.lock_unpoisoned();
        if recent.len() >= MAX_WATCH_STAGE_SAMPLES {
            recent.pop_front();
        }
        recent.push_back(sample);
    }

    /// A change batch with `records` records arrived from the VMM; its first change was seen
    /// on the host at `first_change_unix_ns` (0: unknown).
    pub fn batch_received(records: usize, first_change_unix_ns: u64) {
        bump(&BATCHES_RECEIVED, 1);
        bump(&RECORDS_RECEIVED, records as u64);
        if first_change_unix_ns != 0 {
            // Keep the oldest pending change: batches merged before one sync count from it.
            let _ = OLDEST_PENDING_NS.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
                (old == 0 || first_change_unix_ns < old).then_some(first_change_unix_ns)
            });
        }
    }

    /// The queued batches were applied (`records` paths settled).
    pub fn applied_pending(records: usize) {
        applied(records, OLDEST_PENDING_NS.swap(0, Ordering::Relaxed));
    }

    /// `records` changed paths were settled; the oldest change was seen on the host at
    /// `first_change_unix_ns` (0: unknown, no latency recorded).
    pub fn applied(records: usize, first_change_unix_ns: u64) {
        bump(&RECORDS_APPLIED, records as u64);
        if first_change_unix_ns == 0 {
            return;
        }
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let now = u64::try_from(now).unwrap_or(u64::MAX);
        // Host and guest clocks may disagree a little; a negative latency counts as zero.
        observe_latency_ns(now.saturating_sub(first_change_unix_ns));
    }

    fn observe_latency_ns(ns: u64) {
        let secs = ns as f64 / 1e9;
        let slot = WATCH_APPLY_BUCKETS.iter().position(|b| secs <= *b).unwrap_or(WATCH_APPLY_BUCKETS.len());
        if let Some(c) = LATENCY.get(slot) {
            bump(c, 1);
        }
        bump(&LATENCY_COUNT, 1);
        bump(&LATENCY_SUM_NS, ns);
    }

    /// A full compare of a share.
    pub fn resynced() {
        bump(&RESYNCS, 1);
    }

    /// A mirror became a bind mount of its share.
    pub fn bind_fallback() {
        bump(&BIND_FALLBACKS, 1);
    }

    /// The stages of the last applied batches, oldest first.
    pub fn recent_stages() -> Vec<WatchStageSample> {
        RECENT.lock_unpoisoned().iter().cloned().collect()
    }

    /// The current values.
    pub fn snapshot() -> WatchStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        WatchStats {
            batches_received: get(&BATCHES_RECEIVED),
            records_received: get(&RECORDS_RECEIVED),
            records_applied: get(&RECORDS_APPLIED),
            resyncs: get(&RESYNCS),
            bind_fallbacks: get(&BIND_FALLBACKS),
            mounts_watched: 0,
            apply_latency_buckets: LATENCY.iter().map(get).collect(),
            apply_latency_count: get(&LATENCY_COUNT),
            apply_latency_sum_ns: get(&LATENCY_SUM_NS),
            stages: WatchStage::ALL
                .iter()
                .zip(STAGES.iter())
                .map(|(stage, h)| WatchStageHistogram {
                    stage: *stage,
                    buckets: h.buckets.iter().map(get).collect(),
                    count: get(&h.count),
                    sum_ns: get(&h.sum_ns),
                })
                .collect(),
        }
    }

    #[cfg(test)]
    #[allow(clippy::unwrap_used)]
    mod tests {
        use super::*;

        #[test]
        fn latency_lands_in_its_bucket() {
            let before = snapshot();
            observe_latency_ns(3_000_000); // 3 ms: first bucket (≤ 5 ms)
            observe_latency_ns(60_000_000_000); // 60 s: past the last bound
            let after = snapshot();
            assert_eq!(after.apply_latency_buckets[0] - before.apply_latency_buckets[0], 1);
            let last = WATCH_APPLY_BUCKETS.len();
            // Other tests share these statics: at least ours landed.
            assert!(after.apply_latency_buckets[last] - before.apply_latency_buckets[last] >= 1);
            assert!(after.apply_latency_count - before.apply_latency_count >= 2);
        }

        #[test]
        fn applying_pending_batches_counts_from_the_oldest_change() {
            let before = snapshot();
            batch_received(2, 1);
            batch_received(3, 0);
            applied_pending(5);
            let after = snapshot();
            assert_eq!(after.batches_received - before.batches_received, 2);
            assert_eq!(after.records_received - before.records_received, 5);
            assert_eq!(after.records_applied - before.records_applied, 5);
            // A change at 1 ns after the epoch is decades old: past the last bucket.
            let last = WATCH_APPLY_BUCKETS.len();
            assert!(after.apply_latency_buckets[last] > before.apply_latency_buckets[last]);
        }
    }
}

#[derive(Debug, PartialEq)]
struct MemInfo {
    total_kib: u64,
    free_kib: u64,
    available_kib: u64,
    cached_kib: u64,
}

fn parse_meminfo(text: &str) -> Result<MemInfo, StatsError> {
    let field = |name: &str| {
        text.lines().find_map(|line| {
            let rest = line.strip_prefix(name)?.strip_prefix(':')?;
            rest.split_whitespace().next()?.parse::<u64>().ok()
        })
    };
    let missing = |what| StatsError::Format { file: "meminfo", what };
    let total_kib = field("MemTotal").ok_or_else(|| missing("no MemTotal"))?;
    let free_kib = field("MemFree").ok_or_else(|| missing("no MemFree"))?;
    // Kernels before 3.14 lack MemAvailable; free memory is the conservative stand-in.
    let available_kib = field("MemAvailable").unwrap_or(free_kib);
    let cached_kib = field("Cached").unwrap_or(0).saturating_add(field("Buffers").unwrap_or(0));
    Ok(MemInfo { total_kib, free_kib, available_kib, cached_kib })
}

fn parse_loadavg(text: &str) -> Result<[f64; 3], StatsError> {
    let bad = StatsError::Format { file: "loadavg", what: "expected three load averages" };
    let mut fields = text.split_whitespace().map(str::parse::<f64>);
    let mut next = || fields.next().and_then(Result::ok);
    match (next(), next(), next()) {
        (Some(a), Some(b), Some(c)) => Ok([a, b, c]),
        _ => Err(bad),
    }
}

#[derive(Debug, PartialEq)]
struct CpuStat {
    cpus: u32,
    /// user, nice, system, idle, iowait, irq, softirq, steal (fewer on very old kernels).
    ticks: Vec<u64>,
}

/// The aggregate `cpu` line has these eight counters before guest/guest_nice.
const CPU_TICK_FIELDS: usize = 8;

fn parse_stat(text: &str) -> Result<CpuStat, StatsError> {
    let mut ticks = None;
    let mut cpus = 0u32;
    for line in text.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("cpu") => {
                let parsed: Result<Vec<u64>, _> = words.take(CPU_TICK_FIELDS).map(str::parse).collect();
                let parsed = parsed.map_err(|_| StatsError::Format { file: "stat", what: "non-numeric cpu ticks" })?;
                ticks = Some(parsed);
            }
            Some(name) if name.strip_prefix("cpu").is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit())) => {
                cpus += 1;
            }
            _ => {}
        }
    }
    let ticks = ticks.ok_or(StatsError::Format { file: "stat", what: "no aggregate cpu line" })?;
    Ok(CpuStat { cpus, ticks })
}

fn parse_uptime(text: &str) -> Result<f64, StatsError> {
    text.split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or(StatsError::Format { file: "uptime", what: "expected seconds since boot" })
}

/// Number of processes: the numeric entries of /proc.
fn count_tasks(proc_root: &Path) -> Result<u32, StatsError> {
    let entries =
        std::fs::read_dir(proc_root).map_err(|source| StatsError::Read { path: proc_root.to_owned(), source })?;
    let count = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_str().is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())))
        .count();
    Ok(u32::try_from(count).unwrap_or(u32::MAX))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const MEMINFO: &str = "MemTotal:         498000 kB\nMemFree:          400000 kB\n\
                           MemAvailable:     450000 kB\nBuffers:               0 kB\n";
    const STAT: &str = "cpu  10 1 20 300 4 0 2 0 0 0\ncpu0 5 1 10 150 2 0 1 0 0 0\n\
                        cpu1 5 0 10 150 2 0 1 0 0 0\nintr 1234 0\nctxt 99\nprocs_running 1\n";

    #[test]
    fn meminfo() {
        let m = parse_meminfo(MEMINFO).unwrap();
        assert_eq!(m, MemInfo { total_kib: 498000, free_kib: 400000, available_kib: 450000, cached_kib: 0 });
    }

    #[test]
    fn meminfo_without_available_falls_back_to_free() {
        let m = parse_meminfo("MemTotal: 10 kB\nMemFree: 4 kB\n").unwrap();
        assert_eq!(m.available_kib, 4);
    }

    #[test]
    fn meminfo_does_not_confuse_prefixed_names() {
        // "MemTotalX" must not satisfy "MemTotal".
        assert!(parse_meminfo("MemTotalX: 1 kB\nMemFree: 4 kB\n").is_err());
    }

    #[test]
    fn loadavg() {
        assert_eq!(parse_loadavg("0.50 0.25 0.10 1/80 1234\n").unwrap(), [0.5, 0.25, 0.1]);
        assert!(parse_loadavg("0.50 x\n").is_err());
        assert!(parse_loadavg("").is_err());
    }

    #[test]
    fn stat_counts_cpus_and_takes_eight_ticks() {
        let s = parse_stat(STAT).unwrap();
        assert_eq!(s.cpus, 2);
        assert_eq!(s.ticks, vec![10, 1, 20, 300, 4, 0, 2, 0]);
    }

    #[test]
    fn stat_without_cpu_line_is_an_error() {
        assert!(parse_stat("intr 1\n").is_err());
        assert!(parse_stat("cpu 1 x 3\n").is_err());
    }

    #[test]
    fn uptime() {
        assert_eq!(parse_uptime("123.45 200.00\n").unwrap(), 123.45);
        assert!(parse_uptime("\n").is_err());
    }

    #[test]
    fn self_stat_counts_from_the_last_paren() {
        let stat = "42 (tern (agent) x) S 0 1 1 0 -1 4194560 10 0 0 0 7 3 0 0 20 0 5 0 1 0 0";
        assert_eq!(parse_self_stat(stat), Some((7, 3, 5)));
        assert_eq!(parse_self_stat("garbage"), None);
    }

    #[test]
    fn diskstats_keep_devices_with_io() {
        let text = "   1       0 ram0 0 0 0 0 0 0 0 0 0 0 0
 254 0 vda 10 0 80 5 4 0 32 1 0 6 6
";
        let disks = parse_diskstats(text);
        assert_eq!(disks.len(), 1);
        assert_eq!(disks[0].name, "vda");
        assert_eq!((disks[0].reads, disks[0].sectors_read, disks[0].writes, disks[0].sectors_written), (10, 80, 4, 32));
    }

    #[test]
    fn net_dev_skips_headers() {
        let text = "Inter-|   Receive |  Transmit\n face |bytes packets\n".to_owned()
            + "    lo:     120       2    0    0    0     0          0         0      120       2    0    0    0     0       0          0\n";
        let net = parse_net_dev(&text);
        assert_eq!(net.len(), 1);
        assert_eq!(
            (net[0].name.as_str(), net[0].rx_bytes, net[0].rx_packets, net[0].tx_bytes, net[0].tx_packets),
            ("lo", 120, 2, 120, 2)
        );
    }

    #[test]
    fn collect_from_a_fake_proc() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        std::fs::write(p.join("meminfo"), MEMINFO).unwrap();
        std::fs::write(p.join("loadavg"), "1.00 2.00 3.00 1/2 3\n").unwrap();
        std::fs::write(p.join("stat"), STAT).unwrap();
        std::fs::write(p.join("uptime"), "5.5 1.0\n").unwrap();
        for d in ["1", "42", "self", "sys"] {
            std::fs::create_dir(p.join(d)).unwrap();
        }
        let s = collect(p).unwrap();
        assert_eq!(s.tasks, 2);
        assert_eq!(s.cpus, 2);
        assert_eq!(s.load_avg, [1.0, 2.0, 3.0]);
        assert_eq!(s.uptime_secs, 5.5);
        assert_eq!(s.mem_total_kib, 498000);
    }
}
