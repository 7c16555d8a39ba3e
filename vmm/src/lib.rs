//! tern's in-process KVM virtual machine monitor.
//!
//! The runtime links this crate and drives it through [`api`]; the few other items it needs are
//! re-exported here by name. Layers, each using only those below it (`scripts/module-deps.py`
//! checks that there is no cycle):
//!
//! 1. `layout` (the guest-physical address map), `memory` (guest RAM), `metrics` (counters),
//!    `threads` (the names of the VMM's threads) and `seccomp` (their filters and capabilities);
//! 2. `vstate`: the only place that talks to KVM (system, VM, vCPUs and their run loop);
//! 3. `boot`: loads the kernel and builds the boot structures and the vCPUs' boot state;
//! 4. `devices`: the buses, the legacy devices, the virtio-mmio transport and the virtio devices;
//!    `fs_watcher`, the host watcher of watchable shares, sits beside them (it needs none);
//! 5. `builder` assembles a VM in boot order and `lifecycle` decides how it ends, from the
//!    `config` the runtime gives and with the `error` type of the surface;
//! 6. [`api`]; `vhost_user_fs`, the same file tree exported as a vhost-user-fs daemon
//!    (`tern fs-serve`), is a surface of its own on top of `devices::fs`.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod api;
mod boot;
mod builder;
mod config;
mod devices;
mod error;
mod fs_watcher;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod hybrid_vsock;
#[cfg(test)]
mod kvm_tests;
mod layout;
mod lifecycle;
mod memory;
mod metrics;
mod seccomp;
mod threads;
mod vhost_user_fs;
mod vstate;

pub use api::{BootTimings, ConsoleOutput, NetConfig, VmConfig, VmExit, VmHandle, Vmm, VmmError, VsockConfig};
/// The VM's counters as [`VmHandle::metrics`] gives them, and the histogram type the runtime's
/// own metrics reuse.
pub use metrics::{fuse_opcode_name, AtomicHistogram, ExitReason, HistogramSnapshot, VmMetrics, VmMetricsSnapshot};
/// The role of a VMM thread, read from its name (for the runtime's process metrics).
pub use threads::{thread_role, ThreadRole};
/// `tern fs-serve`: a share's file tree served to a vhost-user frontend.
pub use vhost_user_fs::{share_vfs, VhostUserFsDaemon, VhostUserFsError};
