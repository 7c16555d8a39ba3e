//! The names of the VMM's threads, in one table. A thread's role is read back from its name
//! (`/proc/<pid>/task/<tid>/comm`, which the kernel cuts at 15 bytes, so every name here fits),
//! for example by the runtime's process metrics: read roles with [`thread_role`], never by
//! guessing at prefixes.
//!
//! Every thread of a VM is started through `seccomp::spawn` and runs under the seccomp filter
//! and capabilities of its role (`ps -T -p <shim pid>` shows the names;
//! `/proc/<pid>/task/<tid>/status` the `Seccomp:` mode and `CapEff`).
//!
//! | name | thread | started by | seccomp role |
//! |---|---|---|---|
//! | `tern-vcpu<N>` | vCPU `N`'s run loop | `vstate::vcpu::Vcpu::spawn` | `vcpu` |
//! | `tern-devices` | the device event loop (vsock) | `builder` | `devices` |
//! | `tern-fs` | the virtio-fs request loop (only with an fs device) | `builder` | `fs` |
//! | `tern-net` | the net devices' event loop (only with net devices) | `builder` | `net` |
//! | `tern-console` | the serial console's writer | `devices::legacy::ConsoleWriter` | `console` |
//! | `tern-fs-watch` | the fs watcher's inotify reader | `fs_watcher` | `watcher` |
//! | `tern-fs-link` | the fs watcher's link to the agent | `fs_watcher` | `watcher` |
//! | `tern-vhost-fs` | the vhost-user-fs daemon's worker (`tern fs-serve`) | `vhost_user_fs` | none |

/// Prefix of a vCPU thread's name; the vCPU index follows.
const VCPU_PREFIX: &str = "tern-vcpu";
/// The device event loop.
pub(crate) const DEVICES: &str = "tern-devices";
/// The virtio-fs device's event loop: file-system requests never wait behind vsock, nor vsock
/// (agent RPC, stdio, change records) behind them.
pub(crate) const FS: &str = "tern-fs";
/// The net devices' event loop.
pub(crate) const NET: &str = "tern-net";
/// The serial console's writer.
pub(crate) const CONSOLE: &str = "tern-console";
/// The fs watcher's inotify reader.
pub(crate) const FS_WATCH: &str = "tern-fs-watch";
/// The fs watcher's link to the agent.
pub(crate) const FS_LINK: &str = "tern-fs-link";
/// The vhost-user-fs daemon's worker.
pub(crate) const VHOST_FS: &str = "tern-vhost-fs";

/// Every VMM thread other than the vCPUs.
const VMM_THREADS: [&str; 7] = [DEVICES, FS, NET, CONSOLE, FS_WATCH, FS_LINK, VHOST_FS];

/// What a thread of a process that runs the VMM does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadRole {
    /// Runs a vCPU.
    Vcpu,
    /// Another VMM thread (event loops, console, fs watcher, vhost-user worker).
    Vmm,
}

/// The name of vCPU `index`'s thread.
pub(crate) fn vcpu_thread_name(index: u8) -> String {
    format!("{VCPU_PREFIX}{index}")
}

/// The role of the thread named `name` (a `comm`), `None` for a thread the VMM did not start.
pub fn thread_role(name: &str) -> Option<ThreadRole> {
    let is_vcpu = name
        .strip_prefix(VCPU_PREFIX)
        .is_some_and(|index| !index.is_empty() && index.bytes().all(|b| b.is_ascii_digit()));
    if is_vcpu {
        Some(ThreadRole::Vcpu)
    } else if VMM_THREADS.contains(&name) {
        Some(ThreadRole::Vmm)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `comm` keeps 15 bytes: a longer name would read back cut and match nothing.
    const COMM_LEN: usize = 15;

    #[test]
    fn every_name_survives_comm_and_reads_back_as_its_role() {
        for name in VMM_THREADS {
            assert!(name.len() <= COMM_LEN, "{name} is cut in comm");
            assert_eq!(thread_role(name), Some(ThreadRole::Vmm), "{name}");
        }
        let last_vcpu = vcpu_thread_name(u8::MAX);
        assert!(last_vcpu.len() <= COMM_LEN);
        assert_eq!(thread_role(&last_vcpu), Some(ThreadRole::Vcpu));
        assert_eq!(thread_role(&vcpu_thread_name(0)), Some(ThreadRole::Vcpu));
    }

    #[test]
    fn other_threads_have_no_role() {
        for name in ["tokio-runtime-w", "tern-vcpu", "tern-vcpux", "tern-events", "vm-monitor", "fs-watch", ""] {
            assert_eq!(thread_role(name), None, "{name}");
        }
    }
}
