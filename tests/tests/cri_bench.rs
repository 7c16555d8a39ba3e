//! Benchmark (ignored by default; `tests/bench/cri_bench.sh` runs it in the nested runner):
//! N pods (default 10, `TERN_CRI_BENCH_PODS`) started concurrently through containerd's CRI
//! with the project's CRI client — RunPodSandbox + CreateContainer + StartContainer each —
//! for tern's runtime handler and for runc in the same containerd. Reports whether all
//! succeeded, the time until every pod's container has printed its first line (truly running),
//! and host memory per pod (the drop in MemAvailable; for tern also the shims' Rss and Pss: the
//! VMM and the guest's touched memory live in the shim process). Writes
//! `tests/bench/results/cri.{md,json}`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tern_runtime::cri::CriClient;
use tern_tests::containerd::{containerd_unavailable, TestContainerd, BUSYBOX_IMAGE, CRI_HANDLER, PAUSE_IMAGE};
use tern_tests::cri::{container_config, pod_config, read_cri_log, Cri};

/// Everything of one batch must be running by then (emulated CPU, N VMs booting at once).
const BATCH_LIMIT: Duration = Duration::from_secs(900);

#[derive(Debug)]
struct Batch {
    handler: &'static str,
    pods: usize,
    succeeded: usize,
    errors: Vec<String>,
    /// From the first RunPodSandbox to the last container's first log line.
    all_running: Option<Duration>,
    /// Median of per-pod RunPodSandbox → StartContainer returned.
    median_pod_start: Duration,
    mem_available_drop_mib_per_pod: f64,
    /// tern only: summed Rss / Pss of the shims, per pod.
    shim_rss_mib_per_pod: Option<f64>,
    shim_pss_mib_per_pod: Option<f64>,
}

fn meminfo_kib(field: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap();
    text.lines().find_map(|l| l.strip_prefix(field)?.trim().trim_end_matches("kB").trim().parse().ok()).unwrap_or(0)
}

fn proc_kib(pid: i32, file: &str, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/{file}"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

async fn start_pod(
    client: CriClient,
    handler: &'static str,
    index: usize,
    log_root: PathBuf,
) -> Result<(String, PathBuf, Duration), String> {
    let t0 = Instant::now();
    let (name, uid) = (format!("bench-{handler}-{index}"), format!("uid-{handler}-{index}"));
    let log_dir = log_root.join(&name);
    std::fs::create_dir_all(&log_dir).map_err(|e| e.to_string())?;
    let pod = pod_config(&name, &uid, "bench", &log_dir);
    let sandbox = client.run_pod_sandbox(pod.clone(), handler).await.map_err(|e| format!("{name}: {e}"))?;
    let config = container_config("main", BUSYBOX_IMAGE, &["sh", "-c", "echo up; exec sleep 100000"], "main.log", &[]);
    let id = client.create_container(&sandbox, config, pod).await.map_err(|e| format!("{name}: {e}"))?;
    client.start_container(&id).await.map_err(|e| format!("{name}: {e}"))?;
    Ok((sandbox, log_dir.join("main.log"), t0.elapsed()))
}

/// The ids of the pod sandboxes CRI lists for `handler`.
async fn batch_sandboxes(cri: &Cri, handler: &str) -> Vec<String> {
    match cri.client().list_pod_sandboxes().await {
        Ok(all) => all.into_iter().filter(|s| s.runtime_handler == handler).map(|s| s.id).collect(),
        Err(e) => panic!("ListPodSandbox: {e}"),
    }
}

fn run_batch(ctrd: &TestContainerd, cri: &Cri, handler: &'static str, pods: usize) -> Batch {
    let log_root = ctrd.dir().join("bench-logs");
    let avail_before = meminfo_kib("MemAvailable:");
    let t0 = Instant::now();
    let results: Vec<Result<(String, PathBuf, Duration), String>> = cri.block_on(async {
        let tasks: Vec<_> =
            (0..pods).map(|i| tokio::spawn(start_pod(cri.client().clone(), handler, i, log_root.clone()))).collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap_or_else(|e| Err(format!("task: {e}"))));
        }
        out
    });
    let mut errors: Vec<String> = results.iter().filter_map(|r| r.as_ref().err().cloned()).collect();
    let started: Vec<&(String, PathBuf, Duration)> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    // Running = the container printed its first line.
    let deadline = t0 + BATCH_LIMIT;
    let mut pending: Vec<&Path> = started.iter().map(|(_, log, _)| log.as_path()).collect();
    while !pending.is_empty() && Instant::now() < deadline {
        pending.retain(|log| !read_cri_log(log).iter().any(|l| l == "up"));
        std::thread::sleep(Duration::from_millis(50));
    }
    let all_running = t0.elapsed();
    for log in &pending {
        errors.push(format!("{}: no output within {BATCH_LIMIT:?}", log.display()));
    }
    let succeeded = started.len() - pending.len();
    std::thread::sleep(Duration::from_secs(2));
    let avail_after = meminfo_kib("MemAvailable:");
    let per_pod = |kib: u64| kib as f64 / 1024.0 / pods.max(1) as f64;
    let (rss, pss) = if handler == CRI_HANDLER {
        let shims = ctrd.shim_pids();
        eprintln!("{handler}: {} shims for {pods} pods", shims.len());
        let rss: u64 = shims.iter().map(|p| proc_kib(*p, "status", "VmRSS:")).sum();
        let pss: u64 = shims.iter().map(|p| proc_kib(*p, "smaps_rollup", "Pss:")).sum();
        (Some(per_pod(rss)), Some(per_pod(pss)))
    } else {
        (None, None)
    };
    let mut starts: Vec<Duration> = started.iter().map(|(_, _, d)| *d).collect();
    starts.sort();
    let median_pod_start = starts.get(starts.len() / 2).copied().unwrap_or_default();
    // Tear down (concurrently, as kubelet would for a node drain) every pod of this handler that
    // CRI knows, not only those that started: a pod whose container failed to start still has its
    // sandbox, and with it a shim and a VM, until RemovePodSandbox.
    let ids = cri.block_on(batch_sandboxes(cri, handler));
    let unstarted = ids.iter().filter(|id| !started.iter().any(|(s, _, _)| s == *id)).count();
    if unstarted > 0 {
        eprintln!("{handler}: removing {unstarted} pod sandbox(es) whose container did not start");
    }
    cri.block_on(async {
        let tasks: Vec<_> = ids
            .into_iter()
            .map(|id| {
                let c = cri.client().clone();
                tokio::spawn(async move {
                    if let Err(e) = c.stop_pod_sandbox(&id).await {
                        eprintln!("StopPodSandbox {id}: {e}");
                    }
                    if let Err(e) = c.remove_pod_sandbox(&id).await {
                        eprintln!("RemovePodSandbox {id}: {e}");
                    }
                })
            })
            .collect();
        for t in tasks {
            let _ = t.await;
        }
    });
    Batch {
        handler,
        pods,
        succeeded,
        errors,
        all_running: (pending.is_empty() && succeeded == pods).then_some(all_running),
        median_pod_start,
        mem_available_drop_mib_per_pod: per_pod(avail_before.saturating_sub(avail_after)),
        shim_rss_mib_per_pod: rss,
        shim_pss_mib_per_pod: pss,
    }
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map_or("–".to_owned(), |v| format!("{v:.1}"))
}

fn json_opt(v: Option<f64>) -> String {
    v.map_or("null".to_owned(), |v| format!("{v:.2}"))
}

#[test]
#[ignore = "benchmark: tests/bench/cri_bench.sh runs it in the nested runner"]
fn cri_bench_concurrent_pods() {
    if !tern_tests::require_linux_kvm("cri_bench_concurrent_pods") {
        return;
    }
    if let Some(reason) = containerd_unavailable() {
        panic!("cri_bench_concurrent_pods: {reason}");
    }
    let pods: usize = std::env::var("TERN_CRI_BENCH_PODS").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    let ctrd = TestContainerd::start_with_cri();
    let cri = Cri::connect(&ctrd);
    cri.wait_image(BUSYBOX_IMAGE, Duration::from_secs(30));
    cri.wait_image(PAUSE_IMAGE, Duration::from_secs(30));
    let mut batches = Vec::new();
    for handler in [CRI_HANDLER, "runc"] {
        let batch = run_batch(&ctrd, &cri, handler, pods);
        eprintln!("{batch:?}");
        batches.push(batch);
        // The tern shims (and their VMs) must all be gone before the next batch measures.
        assert!(ctrd.wait_no_shims(Duration::from_secs(120)), "tern shims outlived their pods\n{}", ctrd.logs());
    }

    let mut md = format!(
        "# {pods} pods started concurrently through CRI (containerd {}), tern vs runc\n\n\
         Each pod: RunPodSandbox + CreateContainer + StartContainer of one busybox container (`echo up; sleep`), \
         all pods at once; *all running* = until every container's first log line. Memory per pod: drop in \
         the host's MemAvailable while all pods run; for tern also the shims' Rss / Pss (VMM + touched guest memory, \
         one shim per pod). Nested runner (emulated CPU): compare ratios only.\n\n\
         | runtime | succeeded | all running (s) | median pod start (s) | MemAvailable drop / pod (MiB) | shim Rss / pod (MiB) | shim Pss / pod (MiB) |\n\
         |---|---|---|---|---|---|---|\n",
        cri.version().runtime_version
    );
    let mut json_items = Vec::new();
    for b in &batches {
        md.push_str(&format!(
            "| {} | {}/{} | {} | {:.2} | {:.1} | {} | {} |\n",
            b.handler,
            b.succeeded,
            b.pods,
            b.all_running.map_or("–".to_owned(), |d| format!("{:.2}", d.as_secs_f64())),
            b.median_pod_start.as_secs_f64(),
            b.mem_available_drop_mib_per_pod,
            fmt_opt(b.shim_rss_mib_per_pod),
            fmt_opt(b.shim_pss_mib_per_pod),
        ));
        let errors: Vec<String> = b.errors.iter().map(|e| format!("{e:?}")).collect();
        json_items.push(format!(
            r#"{{"runtime": "{}", "pods": {}, "succeeded": {}, "all_running_s": {}, "median_pod_start_s": {:.3}, "mem_available_drop_mib_per_pod": {:.2}, "shim_rss_mib_per_pod": {}, "shim_pss_mib_per_pod": {}, "errors": [{}]}}"#,
            b.handler,
            b.pods,
            b.succeeded,
            b.all_running.map_or("null".to_owned(), |d| format!("{:.3}", d.as_secs_f64())),
            b.median_pod_start.as_secs_f64(),
            b.mem_available_drop_mib_per_pod,
            json_opt(b.shim_rss_mib_per_pod),
            json_opt(b.shim_pss_mib_per_pod),
            errors.join(", ")
        ));
    }
    if let [tern, runc] = &batches[..] {
        if let (Some(t), Some(r)) = (tern.all_running, runc.all_running) {
            md.push_str(&format!("\nall running, tern / runc: {:.2}×\n", t.as_secs_f64() / r.as_secs_f64()));
        }
    }
    for b in &batches {
        for e in &b.errors {
            md.push_str(&format!("\n- {} error: {e}", b.handler));
        }
    }
    md.push('\n');
    let results = tern_tests::workspace_root().join("tests/bench/results");
    std::fs::create_dir_all(&results).unwrap();
    std::fs::write(results.join("cri.md"), &md).unwrap();
    std::fs::write(results.join("cri.json"), format!("[\n  {}\n]\n", json_items.join(",\n  "))).unwrap();
    println!("{md}");
    let tern = &batches[0];
    assert_eq!(tern.succeeded, pods, "tern: not every pod ran: {:?}", tern.errors);
}
