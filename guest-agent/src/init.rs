//! PID 1 duties: the mounts, stdio, hostname, PATH and loopback a minimal guest needs, and the
//! final power-off.
//!
//! Every step is best effort: a missing filesystem type in the guest kernel should cost that
//! one mount, not the agent. Failures are returned as [`InitError`]s for the caller to log,
//! because logging itself only works once /dev and /proc are mounted.

use nix::errno::Errno;
use nix::fcntl::{open, OFlag};
use nix::mount::{mount, MsFlags};
use nix::sys::reboot::{reboot, RebootMode};
use nix::sys::stat::Mode;
use std::path::Path;

use crate::process::DEFAULT_PATH;

/// Hostname of every guest; the pod's own hostname belongs to its containers' UTS namespace.
const HOSTNAME: &str = "tern";

/// Errors of individual PID 1 setup steps (none is fatal).
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("cannot create mount point {path}")]
    MountPoint {
        path: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot mount {fstype} on {path}")]
    Mount {
        fstype: &'static str,
        path: &'static str,
        #[source]
        source: Errno,
    },
    #[error("cannot point stdio at the console")]
    Stdio(#[source] Errno),
    #[error("cannot set the hostname")]
    Hostname(#[source] Errno),
    #[error("cannot bring up the loopback interface")]
    Loopback(#[source] tern_netconf::NetError),
}

/// One filesystem to mount at boot.
struct MountSpec {
    fstype: &'static str,
    path: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
}

/// In order: later mount points live inside earlier filesystems (/dev/pts in devtmpfs,
/// /sys/fs/cgroup in sysfs).
fn boot_mounts() -> [MountSpec; 8] {
    let nosuid_nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    let nosuid_nodev_noexec = nosuid_nodev | MsFlags::MS_NOEXEC;
    [
        MountSpec { fstype: "proc", path: "/proc", flags: nosuid_nodev_noexec, data: None },
        MountSpec { fstype: "sysfs", path: "/sys", flags: nosuid_nodev_noexec, data: None },
        MountSpec { fstype: "devtmpfs", path: "/dev", flags: MsFlags::MS_NOSUID, data: Some("mode=0755") },
        MountSpec {
            fstype: "devpts",
            path: "/dev/pts",
            flags: MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            data: Some("ptmxmode=0666,mode=0620"),
        },
        MountSpec { fstype: "tmpfs", path: "/dev/shm", flags: nosuid_nodev, data: Some("mode=1777") },
        MountSpec { fstype: "tmpfs", path: "/run", flags: nosuid_nodev, data: Some("mode=0755") },
        MountSpec { fstype: "tmpfs", path: "/tmp", flags: nosuid_nodev, data: Some("mode=1777") },
        MountSpec { fstype: "cgroup2", path: "/sys/fs/cgroup", flags: nosuid_nodev_noexec, data: None },
    ]
}

/// Mount the boot filesystems and point stdio at the console. Returns the failures.
pub fn mount_filesystems() -> Vec<InitError> {
    let mut errors = Vec::new();
    for m in boot_mounts() {
        if let Err(source) = std::fs::create_dir_all(m.path) {
            errors.push(InitError::MountPoint { path: m.path, source });
            continue;
        }
        match mount(Some(m.fstype), m.path, Some(m.fstype), m.flags, m.data) {
            // EBUSY: already mounted (e.g. the kernel auto-mounted devtmpfs); that's fine.
            Ok(()) | Err(Errno::EBUSY) => {}
            Err(source) => errors.push(InitError::Mount { fstype: m.fstype, path: m.path, source }),
        }
    }
    if let Err(e) = console_stdio() {
        errors.push(e);
    }
    errors
}

/// Make fds 0/1/2 valid: stdin /dev/null, stdout/stderr the console. If the kernel could not
/// open /dev/console for init they would be closed, and the first sockets we open would land
/// on them, where a stray write (a panic message) would corrupt a host connection.
fn console_stdio() -> Result<(), InitError> {
    let null = open("/dev/null", OFlag::O_RDWR | OFlag::O_CLOEXEC, Mode::empty()).map_err(InitError::Stdio)?;
    nix::unistd::dup2_stdin(&null).map_err(InitError::Stdio)?;
    let console = open("/dev/console", OFlag::O_WRONLY | OFlag::O_NOCTTY | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(InitError::Stdio)?;
    nix::unistd::dup2_stdout(&console).map_err(InitError::Stdio)?;
    nix::unistd::dup2_stderr(&console).map_err(InitError::Stdio)?;
    Ok(())
}

/// Hostname, PATH, loopback and the /dev/fd symlinks. Returns the failures.
pub fn configure_system() -> Vec<InitError> {
    let mut errors = Vec::new();
    if let Err(e) = nix::unistd::sethostname(HOSTNAME) {
        errors.push(InitError::Hostname(e));
    }
    // Still single-threaded here, so changing our own environment is race-free.
    std::env::set_var("PATH", DEFAULT_PATH);
    // Always, so that a sandbox without a pod network (no ConfigureNetwork) still has `lo`.
    if let Err(e) = tern_netconf::guest::loopback_up() {
        errors.push(InitError::Loopback(e));
    }
    // devtmpfs lacks these; shells and some programs expect them.
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        if !Path::new(link).exists() {
            let _ = std::os::unix::fs::symlink(target, link);
        }
    }
    errors
}

/// Read the log level from `tern.log=<level>` on the kernel command line.
pub fn log_level_from_cmdline(cmdline: &str) -> Option<&str> {
    cmdline.split_whitespace().filter_map(|word| word.strip_prefix("tern.log=")).next_back()
}

/// Flush filesystems and reset the machine. The guest kernel runs with `reboot=k`, so this
/// is a keyboard-controller reset, on which the VMM ends the VM. Only returns on failure.
pub fn power_off() -> Errno {
    nix::unistd::sync();
    match reboot(RebootMode::RB_AUTOBOOT) {
        Err(e) => e,
        Ok(never) => match never {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_level_is_read_from_the_cmdline() {
        let line = "console=ttyS0 quiet tern.log=debug reboot=k\n";
        assert_eq!(log_level_from_cmdline(line), Some("debug"));
        assert_eq!(log_level_from_cmdline("console=ttyS0 quiet"), None);
        // The last occurrence wins, as for kernel parameters.
        assert_eq!(log_level_from_cmdline("tern.log=info tern.log=trace"), Some("trace"));
    }

    #[test]
    fn mounts_are_ordered_parent_first() {
        let mounts = boot_mounts();
        for (i, m) in mounts.iter().enumerate() {
            for later in &mounts[i + 1..] {
                assert!(
                    !Path::new(m.path).starts_with(later.path) || m.path == later.path,
                    "{} is mounted before its parent {}",
                    m.path,
                    later.path
                );
            }
        }
    }
}
