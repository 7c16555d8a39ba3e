//! A container's cgroup v2 directory in the guest: freezing (pause/resume), statistics,
//! resource updates and OOM-kill watching, by reading and writing the cgroup's files.
//!
//! The directory is found from the container init's `/proc/<pid>/cgroup` (`0::<path>`), so it
//! is whatever libcontainer made of the spec's `cgroupsPath`, and execs that joined the
//! container share it. Everything here works on a directory path, so the logic is tested on
//! plain temp dirs standing in for cgroupfs.

use std::collections::BTreeMap;
use std::io::ErrorKind;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tern_protocol::{CgroupStats, IoDeviceStat, Limit, ResourceUpdate};

/// Where the guest's cgroup v2 hierarchy is mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// How long a freeze or thaw may take before the request fails.
pub const FREEZE_TIMEOUT: Duration = Duration::from_secs(10);
/// Safety-net re-check interval while waiting for events on cgroup files.
const RECHECK: Duration = Duration::from_secs(1);

/// Errors on a container's cgroup; each fails that request only.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cannot read the cgroup of pid {pid}")]
    ProcCgroup {
        pid: i32,
        #[source]
        source: std::io::Error,
    },
    #[error("pid {0} has no cgroup v2 entry")]
    NoUnifiedEntry(i32),
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {value:?} to {}", path.display())]
    Write {
        path: PathBuf,
        value: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{} has an unexpected value {value:?}", path.display())]
    Parse { path: PathBuf, value: String },
    #[error("the cgroup did not reach frozen={frozen} within {timeout:?}")]
    FreezeTimeout { frozen: bool, timeout: Duration },
    #[error("the container's cgroup has no processes left")]
    Empty,
    #[error("cannot watch the cgroup's files")]
    Watch(#[source] nix::Error),
}

/// The cgroup v2 directory of process `pid`.
pub fn cgroup_dir_of(pid: i32) -> Result<PathBuf, CgroupError> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .map_err(|source| CgroupError::ProcCgroup { pid, source })?;
    let rel = unified_path(&text).ok_or(CgroupError::NoUnifiedEntry(pid))?;
    Ok(Path::new(CGROUP_ROOT).join(rel.trim_start_matches('/')))
}

/// The path of the `0::<path>` line of a `/proc/<pid>/cgroup` file.
fn unified_path(proc_cgroup: &str) -> Option<&str> {
    proc_cgroup.lines().find_map(|l| l.strip_prefix("0::"))
}

fn read(dir: &Path, file: &str) -> Result<String, CgroupError> {
    let path = dir.join(file);
    std::fs::read_to_string(&path).map_err(|source| CgroupError::Read { path, source })
}

/// Like [`read`], but a missing file (controller not enabled) is `None`.
fn read_optional(dir: &Path, file: &str) -> Result<Option<String>, CgroupError> {
    match read(dir, file) {
        Ok(s) => Ok(Some(s)),
        Err(CgroupError::Read { source, .. }) if source.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn write(dir: &Path, file: &str, value: &str) -> Result<(), CgroupError> {
    let path = dir.join(file);
    std::fs::write(&path, value).map_err(|source| CgroupError::Write { path, value: value.to_owned(), source })
}

/// `key value` lines (cpu.stat, memory.stat, memory.events, cgroup.events); malformed lines
/// are skipped.
fn flat_keyed(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k.to_owned(), v.trim().parse().ok()?))
        })
        .collect()
}

/// A single number, or `max`.
fn parse_limit(dir: &Path, file: &str, text: &str) -> Result<Option<u64>, CgroupError> {
    let t = text.trim();
    if t == "max" {
        return Ok(None);
    }
    t.parse().map(Some).map_err(|_| CgroupError::Parse { path: dir.join(file), value: t.to_owned() })
}

fn parse_u64(dir: &Path, file: &str, text: &str) -> Result<u64, CgroupError> {
    text.trim().parse().map_err(|_| CgroupError::Parse { path: dir.join(file), value: text.trim().to_owned() })
}

/// `io.stat` lines: `MAJ:MIN rbytes=.. wbytes=.. rios=.. wios=.. ...`.
fn parse_io_stat(text: &str) -> Vec<IoDeviceStat> {
    text.lines()
        .filter_map(|l| {
            let mut fields = l.split_whitespace();
            let (major, minor) = fields.next()?.split_once(':')?;
            let mut dev = IoDeviceStat { major: major.parse().ok()?, minor: minor.parse().ok()?, ..Default::default() };
            for f in fields {
                let Some((k, v)) = f.split_once('=') else { continue };
                let Ok(v) = v.parse() else { continue };
                match k {
                    "rbytes" => dev.rbytes = v,
                    "wbytes" => dev.wbytes = v,
                    "rios" => dev.rios = v,
                    "wios" => dev.wios = v,
                    _ => {}
                }
            }
            Some(dev)
        })
        .collect()
}

/// Read the statistics of the cgroup at `dir`. Files of controllers that are not enabled
/// there are left at their defaults.
pub fn read_stats(dir: &Path) -> Result<CgroupStats, CgroupError> {
    let mut stats = CgroupStats::default();
    if let Some(t) = read_optional(dir, "cpu.stat")? {
        stats.cpu_stat = flat_keyed(&t);
    }
    if let Some(t) = read_optional(dir, "memory.current")? {
        stats.memory_current = parse_u64(dir, "memory.current", &t)?;
    }
    if let Some(t) = read_optional(dir, "memory.max")? {
        stats.memory_max = parse_limit(dir, "memory.max", &t)?;
    }
    if let Some(t) = read_optional(dir, "memory.swap.current")? {
        stats.swap_current = parse_u64(dir, "memory.swap.current", &t)?;
    }
    if let Some(t) = read_optional(dir, "memory.swap.max")? {
        stats.swap_max = parse_limit(dir, "memory.swap.max", &t)?;
    }
    if let Some(t) = read_optional(dir, "memory.stat")? {
        stats.memory_stat = flat_keyed(&t);
    }
    if let Some(t) = read_optional(dir, "memory.events")? {
        stats.memory_events = flat_keyed(&t);
    }
    if let Some(t) = read_optional(dir, "pids.current")? {
        stats.pids_current = parse_u64(dir, "pids.current", &t)?;
    }
    if let Some(t) = read_optional(dir, "pids.max")? {
        stats.pids_max = parse_limit(dir, "pids.max", &t)?;
    }
    if let Some(t) = read_optional(dir, "io.stat")? {
        stats.io = parse_io_stat(&t);
    }
    Ok(stats)
}

fn limit_text(limit: Limit) -> String {
    match limit {
        Limit::Max => "max".to_owned(),
        Limit::Value(v) => v.to_string(),
    }
}

/// Write the limits of `update` into the cgroup at `dir`.
pub fn apply(dir: &Path, update: &ResourceUpdate) -> Result<(), CgroupError> {
    if let Some(cpus) = &update.cpuset_cpus {
        write(dir, "cpuset.cpus", cpus)?;
    }
    if let Some(mems) = &update.cpuset_mems {
        write(dir, "cpuset.mems", mems)?;
    }
    if let Some(weight) = update.cpu_weight {
        write(dir, "cpu.weight", &weight.to_string())?;
    }
    if let Some((quota, period)) = update.cpu_max {
        write(dir, "cpu.max", &format!("{} {period}", limit_text(quota)))?;
    }
    if let Some(max) = update.memory_max {
        write(dir, "memory.max", &limit_text(max))?;
    }
    if let Some(max) = update.memory_swap_max {
        write(dir, "memory.swap.max", &limit_text(max))?;
    }
    if let Some(max) = update.pids_max {
        write(dir, "pids.max", &limit_text(max))?;
    }
    Ok(())
}

/// The `frozen` value of `cgroup.events`.
fn is_frozen(dir: &Path) -> Result<bool, CgroupError> {
    Ok(flat_keyed(&read(dir, "cgroup.events")?).get("frozen") == Some(&1))
}

/// Freeze (or thaw) the cgroup at `dir` and wait until `cgroup.events` says it is: writing
/// `cgroup.freeze` only starts the transition; tasks stop at their next kernel exit.
pub fn set_frozen(dir: &Path, frozen: bool, timeout: Duration) -> Result<(), CgroupError> {
    let watch = EventWatch::new(dir, "cgroup.events");
    write(dir, "cgroup.freeze", if frozen { "1" } else { "0" })?;
    let deadline = Instant::now() + timeout;
    loop {
        if is_frozen(dir)? == frozen {
            return Ok(());
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(CgroupError::FreezeTimeout { frozen, timeout });
        }
        // Woken by the kernel's file-modified event; the short cap covers a failed watch.
        let cap = if watch.is_ok() { RECHECK } else { Duration::from_millis(10) };
        let wait = (deadline - now).min(cap);
        match &watch {
            Ok(w) => w.wait(wait),
            Err(_) => std::thread::sleep(wait),
        }
    }
}

/// The pids in the cgroup at `dir` and in every cgroup below it. A cgroup removed while
/// being walked counts as empty.
pub fn pids_below(dir: &Path) -> Result<Vec<i32>, CgroupError> {
    let mut pids = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        if let Some(procs) = read_optional(&d, "cgroup.procs")? {
            pids.extend(procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
        }
        let entries = match std::fs::read_dir(&d) {
            Ok(entries) => entries,
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            Err(source) => return Err(CgroupError::Read { path: d, source }),
        };
        dirs.extend(entries.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).map(|e| e.path()));
    }
    Ok(pids)
}

/// Send `signal` to every process in the cgroup at `dir` and below it, as `runc kill --all`
/// does, and return how many there were. SIGKILL goes through `cgroup.kill`, which the kernel
/// applies atomically, forks in flight included. Any other signal is sent with the cgroup
/// frozen, so no process can fork a child that misses it; a cgroup the user paused stays
/// frozen (its processes get the signal when resumed).
pub fn signal_all(dir: &Path, signal: i32) -> Result<usize, CgroupError> {
    if signal == libc::SIGKILL && dir.join("cgroup.kill").exists() {
        let n = pids_below(dir)?.len();
        write(dir, "cgroup.kill", "1")?;
        return Ok(n);
    }
    let was_frozen = is_frozen(dir)?;
    if !was_frozen {
        set_frozen(dir, true, FREEZE_TIMEOUT)?;
    }
    let signalled = pids_below(dir).map(|pids| {
        pids.iter()
            // SAFETY: kill(2) takes two integers and touches no memory. (Frozen processes
            // cannot exit, so the pids just read still name them.)
            .filter(|&&pid| unsafe { libc::kill(pid, signal) } == 0)
            .count()
    });
    if !was_frozen {
        set_frozen(dir, false, FREEZE_TIMEOUT)?;
    }
    signalled
}

/// OOM kills recorded so far (`oom_kill` of `memory.events`; 0 without the memory controller).
pub fn oom_kills(dir: &Path) -> Result<u64, CgroupError> {
    Ok(read_optional(dir, "memory.events")?.map_or(0, |t| flat_keyed(&t).get("oom_kill").copied().unwrap_or(0)))
}

/// Block until the cgroup at `dir` has recorded more than `seen` OOM kills (returns the new
/// count), or has no processes left ([`CgroupError::Empty`]).
pub fn wait_oom(dir: &Path, seen: u64) -> Result<u64, CgroupError> {
    let events = EventWatch::new(dir, "memory.events").map_err(CgroupError::Watch)?;
    let populated = EventWatch::new(dir, "cgroup.events").map_err(CgroupError::Watch)?;
    loop {
        let count = oom_kills(dir)?;
        if count > seen {
            return Ok(count);
        }
        match read_optional(dir, "cgroup.events")? {
            Some(t) if flat_keyed(&t).get("populated") != Some(&0) => {}
            // Gone, or empty: nothing can be OOM-killed any more.
            _ => return Err(CgroupError::Empty),
        }
        EventWatch::wait_any(&[&events, &populated], RECHECK);
    }
}

/// An inotify watch for the kernel's "file modified" notifications on one cgroup file.
struct EventWatch {
    inotify: Inotify,
}

impl EventWatch {
    fn new(dir: &Path, file: &str) -> Result<EventWatch, nix::Error> {
        let inotify = Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK)?;
        inotify.add_watch(&dir.join(file), AddWatchFlags::IN_MODIFY)?;
        Ok(EventWatch { inotify })
    }

    /// Wait for an event or `timeout`, then drain the queue.
    fn wait(&self, timeout: Duration) {
        Self::wait_any(&[self], timeout);
    }

    fn wait_any(watches: &[&EventWatch], timeout: Duration) {
        let mut fds: Vec<PollFd<'_>> =
            watches.iter().map(|w| PollFd::new(w.inotify.as_fd(), PollFlags::POLLIN)).collect();
        let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
        let _ = poll(&mut fds, PollTimeout::from(ms));
        for w in watches {
            // Non-blocking: EAGAIN once drained.
            while w.inotify.read_events().is_ok_and(|e| !e.is_empty()) {}
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn unified_path_is_the_zero_line() {
        assert_eq!(unified_path("0::/tern-test/c1\n"), Some("/tern-test/c1"));
        assert_eq!(unified_path("1:name=systemd:/x\n0::/\n"), Some("/"));
        assert_eq!(unified_path("1:cpu:/x\n"), None);
    }

    fn fake_cgroup() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        let files = [
            ("cpu.stat", "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_periods 0\n"),
            ("memory.current", "4096\n"),
            ("memory.max", "max\n"),
            ("memory.stat", "anon 100\nfile 200\nbogus line here\n"),
            ("memory.events", "low 0\nhigh 0\nmax 2\noom 1\noom_kill 1\n"),
            ("pids.current", "3\n"),
            ("pids.max", "64\n"),
            ("io.stat", "254:0 rbytes=10 wbytes=20 rios=1 wios=2 dbytes=0 dios=0\n"),
            ("cgroup.events", "populated 1\nfrozen 0\n"),
        ];
        for (f, c) in files {
            std::fs::write(d.path().join(f), c).unwrap();
        }
        d
    }

    #[test]
    fn signal_all_reaches_every_process_below_the_cgroup() {
        use std::os::unix::process::ExitStatusExt;
        let d = fake_cgroup();
        // Already frozen (as by a pause): no freeze or thaw is attempted on these plain files.
        std::fs::write(d.path().join("cgroup.events"), "populated 1\nfrozen 1\n").unwrap();
        let spawn = || std::process::Command::new("sleep").arg("100").spawn().unwrap();
        let (mut top, mut nested) = (spawn(), spawn());
        std::fs::write(d.path().join("cgroup.procs"), format!("{}\n", top.id())).unwrap();
        std::fs::create_dir_all(d.path().join("sub/inner")).unwrap();
        std::fs::write(d.path().join("sub/inner/cgroup.procs"), format!("{}\n", nested.id())).unwrap();

        assert_eq!(signal_all(d.path(), libc::SIGTERM).unwrap(), 2);
        assert_eq!(top.wait().unwrap().signal(), Some(libc::SIGTERM));
        assert_eq!(nested.wait().unwrap().signal(), Some(libc::SIGTERM));
        // Still frozen as the user left it.
        assert!(is_frozen(d.path()).unwrap());
    }

    #[test]
    fn stats_are_read_from_the_cgroup_files() {
        let d = fake_cgroup();
        let s = read_stats(d.path()).unwrap();
        assert_eq!(s.cpu_stat["usage_usec"], 1500);
        assert_eq!(s.memory_current, 4096);
        assert_eq!(s.memory_max, None);
        assert_eq!(s.memory_stat.len(), 2);
        assert_eq!(s.memory_events["oom_kill"], 1);
        assert_eq!((s.pids_current, s.pids_max), (3, Some(64)));
        assert_eq!(s.io, vec![IoDeviceStat { major: 254, minor: 0, rbytes: 10, wbytes: 20, rios: 1, wios: 2 }]);
        // A controller that is not enabled (no swap files) leaves defaults.
        assert_eq!((s.swap_current, s.swap_max), (0, None));
    }

    #[test]
    fn garbage_in_a_number_file_is_an_error_not_a_panic() {
        let d = fake_cgroup();
        std::fs::write(d.path().join("memory.current"), "lots\n").unwrap();
        assert!(matches!(read_stats(d.path()), Err(CgroupError::Parse { .. })));
    }

    #[test]
    fn updates_write_cgroup_v2_syntax() {
        let d = fake_cgroup();
        let update = ResourceUpdate {
            memory_max: Some(Limit::Value(64 << 20)),
            cpu_max: Some((Limit::Max, 100_000)),
            pids_max: Some(Limit::Max),
            cpu_weight: Some(39),
            ..Default::default()
        };
        apply(d.path(), &update).unwrap();
        let get = |f: &str| std::fs::read_to_string(d.path().join(f)).unwrap();
        assert_eq!(get("memory.max"), "67108864");
        assert_eq!(get("cpu.max"), "max 100000");
        assert_eq!(get("pids.max"), "max");
        assert_eq!(get("cpu.weight"), "39");
        assert!(!d.path().join("memory.swap.max").exists(), "untouched limits are not written");
    }

    #[test]
    fn freeze_waits_for_the_events_file() {
        let d = fake_cgroup();
        let dir = d.path().to_path_buf();
        // Play the kernel: acknowledge the freeze a little later.
        let kernel = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            std::fs::write(dir.join("cgroup.events"), "populated 1\nfrozen 1\n").unwrap();
        });
        set_frozen(d.path(), true, Duration::from_secs(5)).unwrap();
        kernel.join().unwrap();
        assert_eq!(std::fs::read_to_string(d.path().join("cgroup.freeze")).unwrap(), "1");
        let err = set_frozen(d.path(), false, Duration::from_millis(50)).unwrap_err();
        assert!(matches!(err, CgroupError::FreezeTimeout { frozen: false, .. }));
    }

    #[test]
    fn oom_wait_returns_new_kills_and_ends_when_empty() {
        let d = fake_cgroup();
        assert_eq!(wait_oom(d.path(), 0).unwrap(), 1);
        std::fs::write(d.path().join("cgroup.events"), "populated 0\nfrozen 0\n").unwrap();
        assert!(matches!(wait_oom(d.path(), 1), Err(CgroupError::Empty)));
    }
}
