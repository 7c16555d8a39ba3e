//! tern's in-process KVM virtual machine monitor.
//!
//! The runtime links this crate and drives it through [`api`]. Layout: `vstate/` is the only
//! place that talks to KVM; `boot/` loads the kernel and builds the boot structures;
//! `devices/` holds the MMIO bus, the legacy devices and the virtio devices.

pub mod api;
pub mod boot;
pub mod devices;
pub mod vstate;
