//! tern's in-process KVM virtual machine monitor.
//!
//! The runtime links this crate and drives it through [`api`]. Layout: `vstate/` is the only
//! place that talks to KVM; `boot/` loads the kernel and builds the boot structures;
//! `devices/` holds the buses, the legacy devices and the virtio devices; `builder`
//! assembles a VM in boot order and `lifecycle` decides how it ends.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod api;
pub mod boot;
mod builder;
pub mod devices;
mod lifecycle;
pub mod metrics;
pub mod vstate;

pub use api::{
    BootTimings, ConsoleOutput, NetConfig, VmConfig, VmExit, VmHandle, Vmm, VmmError, VsockConfig,
};
