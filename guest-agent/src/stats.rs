//! Guest-wide statistics for `Request::Stats`, read from /proc.
//!
//! The parsers take the file contents as strings so they are tested without a /proc.

use std::path::{Path, PathBuf};
use tern_protocol::GuestStats;

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
    Format {
        file: &'static str,
        what: &'static str,
    },
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
    Ok(GuestStats {
        mem_total_kib: mem.total_kib,
        mem_free_kib: mem.free_kib,
        mem_available_kib: mem.available_kib,
        load_avg,
        cpus: cpu.cpus,
        cpu_ticks: cpu.ticks,
        tasks,
        uptime_secs,
    })
}

#[derive(Debug, PartialEq)]
struct MemInfo {
    total_kib: u64,
    free_kib: u64,
    available_kib: u64,
}

fn parse_meminfo(text: &str) -> Result<MemInfo, StatsError> {
    let field = |name: &str| {
        text.lines().find_map(|line| {
            let rest = line.strip_prefix(name)?.strip_prefix(':')?;
            rest.split_whitespace().next()?.parse::<u64>().ok()
        })
    };
    let missing = |what| StatsError::Format {
        file: "meminfo",
        what,
    };
    let total_kib = field("MemTotal").ok_or_else(|| missing("no MemTotal"))?;
    let free_kib = field("MemFree").ok_or_else(|| missing("no MemFree"))?;
    // Kernels before 3.14 lack MemAvailable; free memory is the conservative stand-in.
    let available_kib = field("MemAvailable").unwrap_or(free_kib);
    Ok(MemInfo {
        total_kib,
        free_kib,
        available_kib,
    })
}

fn parse_loadavg(text: &str) -> Result<[f64; 3], StatsError> {
    let bad = StatsError::Format {
        file: "loadavg",
        what: "expected three load averages",
    };
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
                let parsed: Result<Vec<u64>, _> =
                    words.take(CPU_TICK_FIELDS).map(str::parse).collect();
                let parsed = parsed.map_err(|_| StatsError::Format {
                    file: "stat",
                    what: "non-numeric cpu ticks",
                })?;
                ticks = Some(parsed);
            }
            Some(name)
                if name
                    .strip_prefix("cpu")
                    .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit())) =>
            {
                cpus += 1;
            }
            _ => {}
        }
    }
    let ticks = ticks.ok_or(StatsError::Format {
        file: "stat",
        what: "no aggregate cpu line",
    })?;
    Ok(CpuStat { cpus, ticks })
}

fn parse_uptime(text: &str) -> Result<f64, StatsError> {
    text.split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or(StatsError::Format {
            file: "uptime",
            what: "expected seconds since boot",
        })
}

/// Number of processes: the numeric entries of /proc.
fn count_tasks(proc_root: &Path) -> Result<u32, StatsError> {
    let entries = std::fs::read_dir(proc_root).map_err(|source| StatsError::Read {
        path: proc_root.to_owned(),
        source,
    })?;
    let count = entries
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        })
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
        assert_eq!(
            m,
            MemInfo {
                total_kib: 498000,
                free_kib: 400000,
                available_kib: 450000
            }
        );
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
        assert_eq!(
            parse_loadavg("0.50 0.25 0.10 1/80 1234\n").unwrap(),
            [0.5, 0.25, 0.1]
        );
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
