//! Conversions between containerd's view of a task's resources and the guest's cgroup v2:
//! OCI `LinuxResources` (what `Update` carries, as JSON in a typeurl `Any`) to the cgroup v2
//! values the agent writes, and the agent's cgroup numbers to containerd's
//! `io.containerd.cgroups.v2.Metrics` (what `Stats` returns and `ctr task metrics` prints).
//! The unit conversions follow runc's (`cpu.shares` → `cpu.weight`, memory+swap → swap).

use containerd_shim_protos::cgroups_v2::metrics::{
    CPUStat, IOEntry, IOStat, MemoryEvents, MemoryStat, Metrics, PidsStat,
};
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::{Message, MessageField};
use oci_spec::runtime::LinuxResources;
use tern_protocol::{CgroupStats, Limit, ResourceUpdate};

/// The typeurl containerd decodes `Stats` replies by.
pub const CGROUPS_V2_METRICS_URL: &str = "io.containerd.cgroups.v2.Metrics";
/// cgroup v2's default `cpu.max` period.
const DEFAULT_CPU_PERIOD: u64 = 100_000;

/// Errors converting resources.
#[derive(Debug, thiserror::Error)]
pub enum ResourceError {
    #[error("the resources are not OCI LinuxResources JSON")]
    Decode(#[source] serde_json::Error),
    #[error("cannot encode the metrics")]
    Encode(#[source] containerd_shim_protos::protobuf::Error),
}

/// An OCI limit (negative = unlimited) as a cgroup v2 limit.
fn oci_limit(v: i64) -> Limit {
    u64::try_from(v).map_or(Limit::Max, Limit::Value)
}

/// runc's `ConvertCPUSharesToCgroupV2Value`: shares 2..=262144 onto weight 1..=10000.
fn cpu_weight(shares: u64) -> u64 {
    if shares == 0 {
        return 0;
    }
    1 + (shares.clamp(2, 262_144) - 2) * 9999 / 262_142
}

/// Decode the JSON `LinuxResources` of an `Update` request into cgroup v2 values.
pub fn resource_update(json: &[u8]) -> Result<ResourceUpdate, ResourceError> {
    let r: LinuxResources = serde_json::from_slice(json).map_err(ResourceError::Decode)?;
    let mut u = ResourceUpdate::default();
    if let Some(mem) = r.memory() {
        u.memory_max = mem.limit().map(oci_limit);
        // OCI's swap is memory+swap; cgroup v2's swap.max is swap alone.
        u.memory_swap_max = match (mem.swap(), mem.limit()) {
            (Some(swap), _) if swap < 0 => Some(Limit::Max),
            (Some(swap), Some(limit)) if limit >= 0 => Some(Limit::Value(u64::try_from(swap - limit).unwrap_or(0))),
            _ => None,
        };
    }
    if let Some(cpu) = r.cpu() {
        u.cpu_weight = cpu.shares().filter(|s| *s != 0).map(cpu_weight);
        if cpu.quota().is_some() || cpu.period().is_some() {
            let quota = cpu.quota().map_or(Limit::Max, oci_limit);
            let quota = if quota == Limit::Value(0) { Limit::Max } else { quota };
            u.cpu_max = Some((quota, cpu.period().filter(|p| *p != 0).unwrap_or(DEFAULT_CPU_PERIOD)));
        }
        u.cpuset_cpus = cpu.cpus().clone().filter(|s| !s.is_empty());
        u.cpuset_mems = cpu.mems().clone().filter(|s| !s.is_empty());
    }
    if let Some(pids) = r.pids() {
        // 0 means "not set" in OCI's Go encoding; negative is unlimited.
        u.pids_max = match pids.limit() {
            0 => None,
            l => Some(oci_limit(l)),
        };
    }
    Ok(u)
}

/// `None` (max) as containerd reports it: the largest value.
fn limit_value(v: Option<u64>) -> u64 {
    v.unwrap_or(u64::MAX)
}

/// containerd's cgroup v2 metrics for the agent's numbers.
pub fn metrics(s: &CgroupStats) -> Metrics {
    let cpu = |k: &str| s.cpu_stat.get(k).copied().unwrap_or(0);
    let mem = |k: &str| s.memory_stat.get(k).copied().unwrap_or(0);
    let ev = |k: &str| s.memory_events.get(k).copied().unwrap_or(0);
    Metrics {
        pids: MessageField::some(PidsStat {
            current: s.pids_current,
            limit: limit_value(s.pids_max),
            ..Default::default()
        }),
        cpu: MessageField::some(CPUStat {
            usage_usec: cpu("usage_usec"),
            user_usec: cpu("user_usec"),
            system_usec: cpu("system_usec"),
            nr_periods: cpu("nr_periods"),
            nr_throttled: cpu("nr_throttled"),
            throttled_usec: cpu("throttled_usec"),
            nr_bursts: cpu("nr_bursts"),
            burst_usec: cpu("burst_usec"),
            ..Default::default()
        }),
        memory: MessageField::some(MemoryStat {
            anon: mem("anon"),
            file: mem("file"),
            kernel_stack: mem("kernel_stack"),
            slab: mem("slab"),
            sock: mem("sock"),
            shmem: mem("shmem"),
            file_mapped: mem("file_mapped"),
            file_dirty: mem("file_dirty"),
            file_writeback: mem("file_writeback"),
            anon_thp: mem("anon_thp"),
            inactive_anon: mem("inactive_anon"),
            active_anon: mem("active_anon"),
            inactive_file: mem("inactive_file"),
            active_file: mem("active_file"),
            unevictable: mem("unevictable"),
            slab_reclaimable: mem("slab_reclaimable"),
            slab_unreclaimable: mem("slab_unreclaimable"),
            pgfault: mem("pgfault"),
            pgmajfault: mem("pgmajfault"),
            workingset_refault: mem("workingset_refault_anon")
                + mem("workingset_refault_file")
                + mem("workingset_refault"),
            workingset_activate: mem("workingset_activate_anon")
                + mem("workingset_activate_file")
                + mem("workingset_activate"),
            workingset_nodereclaim: mem("workingset_nodereclaim"),
            pgrefill: mem("pgrefill"),
            pgscan: mem("pgscan"),
            pgsteal: mem("pgsteal"),
            pgactivate: mem("pgactivate"),
            pgdeactivate: mem("pgdeactivate"),
            pglazyfree: mem("pglazyfree"),
            pglazyfreed: mem("pglazyfreed"),
            thp_fault_alloc: mem("thp_fault_alloc"),
            thp_collapse_alloc: mem("thp_collapse_alloc"),
            usage: s.memory_current,
            usage_limit: limit_value(s.memory_max),
            swap_usage: s.swap_current,
            swap_limit: limit_value(s.swap_max),
            ..Default::default()
        }),
        memory_events: MessageField::some(MemoryEvents {
            low: ev("low"),
            high: ev("high"),
            max: ev("max"),
            oom: ev("oom"),
            oom_kill: ev("oom_kill"),
            oom_group_kill: ev("oom_group_kill"),
            ..Default::default()
        }),
        io: MessageField::some(IOStat {
            usage: s
                .io
                .iter()
                .map(|d| IOEntry {
                    major: d.major,
                    minor: d.minor,
                    rbytes: d.rbytes,
                    wbytes: d.wbytes,
                    rios: d.rios,
                    wios: d.wios,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// [`metrics`] packed as the typeurl `Any` containerd expects from `Stats`.
pub fn metrics_any(s: &CgroupStats) -> Result<Any, ResourceError> {
    let value = metrics(s).write_to_bytes().map_err(ResourceError::Encode)?;
    Ok(Any { type_url: CGROUPS_V2_METRICS_URL.to_owned(), value, ..Default::default() })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn ctr_update_memory_limit_becomes_memory_max() {
        // What `ctr task update --memory-limit 67108864` sends.
        let u = resource_update(br#"{"memory":{"limit":67108864}}"#).unwrap();
        assert_eq!(u.memory_max, Some(Limit::Value(64 << 20)));
        assert_eq!(u.memory_swap_max, None);
        assert_eq!((u.cpu_max, u.cpu_weight, u.pids_max), (None, None, None));
    }

    #[test]
    fn cpu_and_pids_follow_runc_conversions() {
        let u = resource_update(
            br#"{"cpu":{"shares":1024,"quota":50000,"period":100000},"pids":{"limit":-1},
            "memory":{"limit":1048576,"swap":3145728}}"#,
        )
        .unwrap();
        assert_eq!(u.cpu_weight, Some(39)); // runc: 1024 shares → weight 39
        assert_eq!(u.cpu_max, Some((Limit::Value(50_000), 100_000)));
        assert_eq!(u.pids_max, Some(Limit::Max));
        assert_eq!(u.memory_swap_max, Some(Limit::Value(2 << 20)));
        let u = resource_update(br#"{"cpu":{"quota":-1}}"#).unwrap();
        assert_eq!(u.cpu_max, Some((Limit::Max, DEFAULT_CPU_PERIOD)));
        assert_eq!(cpu_weight(2), 1);
        assert_eq!(cpu_weight(262_144), 10_000);
    }

    #[test]
    fn garbage_resources_are_an_error() {
        assert!(matches!(resource_update(b"{not json"), Err(ResourceError::Decode(_))));
    }

    #[test]
    fn metrics_round_trip_through_the_any() {
        let mut s = CgroupStats { memory_current: 123, pids_current: 2, pids_max: Some(10), ..Default::default() };
        s.cpu_stat.insert("usage_usec".into(), 77);
        s.memory_events.insert("oom_kill".into(), 1);
        let any = metrics_any(&s).unwrap();
        assert_eq!(any.type_url, "io.containerd.cgroups.v2.Metrics");
        let back = Metrics::parse_from_bytes(&any.value).unwrap();
        assert_eq!(back.memory.usage, 123);
        assert_eq!(back.memory.usage_limit, u64::MAX);
        assert_eq!((back.pids.current, back.pids.limit), (2, 10));
        assert_eq!(back.cpu.usage_usec, 77);
        assert_eq!(back.memory_events.oom_kill, 1);
    }
}
