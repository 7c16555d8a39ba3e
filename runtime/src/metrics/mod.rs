//! Metrics: what each shim exposes about its sandbox, and how.
//!
//! Each shim serves `/metrics` (Prometheus text) and `/agent-url` on
//! `<root>/sbs/<sandbox-id>/shim-monitor.sock` ([`sbs`], [`shim`]); `tern monitor`
//! (`crate::monitor`) finds the sockets through that directory and aggregates them.
//! [`http`] is the small HTTP/1.1 layer both use, [`exposition`] the text encoder,
//! [`rpc`] the process-wide RPC latency counters ([`timed_task`] times the Task API),
//! [`process`] the shim's `/proc/self`.

pub mod exposition;
pub mod http;
pub mod process;
pub mod rpc;
pub mod sbs;
pub mod shim;
pub mod timed_task;
