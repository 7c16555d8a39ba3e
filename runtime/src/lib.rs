//! tern's runtime: configuration, the agent client and the sandbox (one microVM with its agent).
//!
//! It reaches the VMM only through `vmm::api` and speaks the agent protocol (`tern-protocol`)
//! as the host side. The `tern` CLI lives in `src/bin/tern/` (one module per subcommand), the
//! containerd shim's entry point in `src/bin/containerd-shim-tern-v2.rs` and its Task service
//! in `src/shim/`.

pub mod agent;
pub mod config;
pub mod cri;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod metrics;
pub mod monitor;
pub mod network;
pub mod run_dir;
pub mod sandbox;
pub mod share;
pub mod shim;
