//! Latency of the RPCs a shim serves (containerd's Task API) and makes (to the guest agent).
//!
//! Process-wide: one shim process serves exactly one sandbox, and the agent client and the
//! Task service are used from many tasks and threads without a handle to pass around. `tern
//! run` records into the same statics and simply never exposes them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::LazyLock;
use std::time::Duration;

use vmm::{AtomicHistogram, HistogramSnapshot};

/// Upper bounds (seconds) of the RPC latency histograms.
pub const RPC_LATENCY_BUCKETS: [f64; 7] = [0.001, 0.005, 0.02, 0.1, 0.5, 2.0, 10.0];

/// Task API methods counted one by one; anything else is `other`.
pub const TASK_RPCS: [&str; 14] = [
    "create", "start", "state", "kill", "delete", "pids", "close_io", "connect", "shutdown", "stats", "update", "exec",
    "wait", "other",
];

/// Agent requests counted one by one (the `op` tags of the protocol); anything else is `other`.
pub const AGENT_RPCS: [&str; 12] = [
    "health",
    "exec",
    "signal",
    "close_stdin",
    "stats",
    "shutdown",
    "mount",
    "unmount",
    "start_container",
    "wait",
    "attach",
    "other",
];

/// Counts and one latency histogram for a set of named RPCs.
#[derive(Debug)]
pub struct RpcMetrics {
    names: &'static [&'static str],
    calls: Vec<AtomicU64>,
    errors: Vec<AtomicU64>,
    latency: AtomicHistogram,
}

/// A copy of [`RpcMetrics`].
#[derive(Debug, Clone, PartialEq)]
pub struct RpcSnapshot {
    /// `(name, calls, errors)` for RPCs called at least once.
    pub calls: Vec<(&'static str, u64, u64)>,
    pub latency: HistogramSnapshot,
}

impl RpcMetrics {
    fn new(names: &'static [&'static str]) -> Self {
        RpcMetrics {
            names,
            calls: names.iter().map(|_| AtomicU64::new(0)).collect(),
            errors: names.iter().map(|_| AtomicU64::new(0)).collect(),
            latency: AtomicHistogram::new(&RPC_LATENCY_BUCKETS),
        }
    }

    /// RPC `name` took `took`. Calls that last as long as a process (`wait`) are counted but
    /// kept out of the histogram, which they would only smear.
    pub fn record(&self, name: &str, took: Duration, ok: bool) {
        let slot = self.names.iter().position(|n| *n == name).unwrap_or(self.names.len() - 1);
        if let Some(c) = self.calls.get(slot) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        if !ok {
            if let Some(c) = self.errors.get(slot) {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
        if name != "wait" {
            self.latency.observe(took);
        }
    }

    pub fn snapshot(&self) -> RpcSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        RpcSnapshot {
            calls: self
                .names
                .iter()
                .zip(self.calls.iter().zip(&self.errors))
                .filter(|(_, (c, _))| get(c) > 0)
                .map(|(n, (c, e))| (*n, get(c), get(e)))
                .collect(),
            latency: self.latency.snapshot(),
        }
    }
}

/// The Task API as served by this shim.
pub static TASK: LazyLock<RpcMetrics> = LazyLock::new(|| RpcMetrics::new(&TASK_RPCS));
/// Requests to the guest agent made by this process.
pub static AGENT: LazyLock<RpcMetrics> = LazyLock::new(|| RpcMetrics::new(&AGENT_RPCS));

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_names_count_as_other_and_wait_skips_the_histogram() {
        let m = RpcMetrics::new(&TASK_RPCS);
        m.record("create", Duration::from_millis(3), true);
        m.record("frobnicate", Duration::from_millis(3), false);
        m.record("wait", Duration::from_secs(100), true);
        let s = m.snapshot();
        assert_eq!(s.calls, vec![("create", 1, 0), ("wait", 1, 0), ("other", 1, 1)]);
        assert_eq!(s.latency.count, 2);
    }
}
