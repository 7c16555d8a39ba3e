//! The shim process as the host sees it (`/proc/self`): memory, CPU time, threads by role,
//! file descriptors by kind. The VMM runs inside this process, so the split is by thread
//! name (the VMM's table of thread names, read with [`vmm::thread_role`]) and by fd target
//! (`anon_inode:kvm-*` and eventfds belong to the VM).

use std::path::Path;

use vmm::{thread_role, ThreadRole};

/// What `/proc/<pid>` says about one process.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProcessStats {
    pub rss_bytes: u64,
    pub cpu_user_secs: f64,
    pub cpu_system_secs: f64,
    pub threads: u64,
    /// Threads running vCPUs.
    pub vcpu_threads: u64,
    /// Other VMM threads (device event loop, watcher, console).
    pub vmm_threads: u64,
    pub fds: u64,
    /// fds of the KVM API (VM, vCPUs).
    pub kvm_fds: u64,
    /// eventfds (irqfds, ioeventfds, wakeups), nearly all the VM's.
    pub eventfds: u64,
}

/// Read the stats of the process whose proc dir is `proc_dir` (`/proc/self`). Unreadable
/// parts stay zero: a scrape must never fail because of one file.
pub fn read(proc_dir: &Path) -> ProcessStats {
    let mut s = ProcessStats::default();
    let ticks = clock_ticks();
    if let Ok(stat) = std::fs::read_to_string(proc_dir.join("stat")) {
        if let Some((utime, stime, threads)) = parse_stat(&stat) {
            s.cpu_user_secs = utime as f64 / ticks;
            s.cpu_system_secs = stime as f64 / ticks;
            s.threads = threads;
        }
    }
    if let Ok(statm) = std::fs::read_to_string(proc_dir.join("statm")) {
        let pages = statm.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        s.rss_bytes = pages.saturating_mul(page_size());
    }
    if let Ok(tasks) = std::fs::read_dir(proc_dir.join("task")) {
        for task in tasks.flatten() {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            match thread_role(comm.trim()) {
                Some(ThreadRole::Vcpu) => s.vcpu_threads += 1,
                Some(ThreadRole::Vmm) => s.vmm_threads += 1,
                None => {}
            }
        }
    }
    if let Ok(fds) = std::fs::read_dir(proc_dir.join("fd")) {
        for fd in fds.flatten() {
            s.fds += 1;
            let target = std::fs::read_link(fd.path()).unwrap_or_default();
            let target = target.to_string_lossy();
            if target.starts_with("anon_inode:kvm") {
                s.kvm_fds += 1;
            } else if target == "anon_inode:[eventfd]" {
                s.eventfds += 1;
            }
        }
    }
    s
}

/// utime, stime (ticks) and num_threads; fields counted from the last `)` of the name.
fn parse_stat(text: &str) -> Option<(u64, u64, u64)> {
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some((f.get(11)?.parse().ok()?, f.get(12)?.parse().ok()?, f.get(17)?.parse().ok()?))
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf only reads a system constant.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

fn page_size() -> u64 {
    // SAFETY: sysconf only reads a system constant.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).ok().filter(|s| *s > 0).unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields() {
        let stat = "7 (a b) c) S 1 7 7 0 -1 0 0 0 0 0 120 30 0 0 20 0 9 0 5 0 0";
        assert_eq!(parse_stat(stat), Some((120, 30, 9)));
    }

    #[test]
    fn counts_threads_by_the_vmm_role_table() {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (started_tx, started) = std::sync::mpsc::channel::<()>();
        // The new thread sets its own name as it starts: wait for it before reading comm.
        let vcpu = std::thread::Builder::new()
            .name("tern-vcpu7".into())
            .spawn(move || {
                let _ = started_tx.send(());
                rx.recv()
            })
            .unwrap();
        started.recv().unwrap();
        let s = read(Path::new("/proc/self"));
        drop(tx);
        let _ = vcpu.join();
        assert!(s.vcpu_threads >= 1, "{s:?}");
    }

    #[test]
    fn reads_this_process() {
        let s = read(Path::new("/proc/self"));
        assert!(s.rss_bytes > 0);
        assert!(s.threads >= 1);
        assert!(s.fds >= 3, "{s:?}");
    }
}
