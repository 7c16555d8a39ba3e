//! tern's runtime: configuration, the agent client and the sandbox (one microVM with its agent).
//!
//! This crate is the only one that knows both the VMM (`vmm`) and the agent protocol
//! (`tern-protocol`). The `tern` CLI lives in `src/bin/tern.rs` and `src/cli/`.

pub mod agent;
pub mod config;
pub mod cri;
pub mod metrics;
pub mod monitor;
pub mod network;
pub mod run_dir;
pub mod sandbox;
pub mod share;
pub mod shim;
