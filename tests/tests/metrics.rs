//! Metrics end to end: real shims under a private containerd publish
//! `<root>/sbs/<id>/shim-monitor.sock`, and `tern monitor` (a real process) finds them through
//! that directory, scrapes them and serves one exposition that Python's `prometheus_client`
//! parser must accept.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tern_tests::containerd::{ctr_run_args, stderr, TestContainerd, CRI_HANDLER, PAUSE_IMAGE};
use tern_tests::cri::{pod_config, Cri};

fn setup(test: &str) -> Option<TestContainerd> {
    tern_tests::containerd::containerd_for_test(test)
}

/// Point the shims' `shim.root_dir` at a private directory (shims read the config file when
/// they start, so appending before the first container is enough). The directory is short and
/// under /run: `<root>/sbs/<64-hex CRI id>/shim-monitor.sock` must fit a unix socket path
/// (108 bytes), which a root under the test's temp dir would not. Removed on drop.
fn private_root(ctrd: &TestContainerd) -> tempfile::TempDir {
    let root = tempfile::Builder::new().prefix("tm").tempdir_in("/run").unwrap();
    let mut f = std::fs::OpenOptions::new().append(true).open(ctrd.dir().join("tern.toml")).unwrap();
    writeln!(f, "\n[shim]\nroot_dir = \"{}\"", root.path().display()).unwrap();
    root
}

/// A process serving HTTP on `addr` (`tern monitor`, Prometheus), killed on drop.
struct HttpProcess {
    child: Child,
    addr: String,
}

impl HttpProcess {
    /// Start `tern monitor` on a free port, watching `sbs`.
    fn monitor(sbs: &Path) -> HttpProcess {
        HttpProcess::monitor_with_cri(sbs, None)
    }

    /// [`HttpProcess::monitor`] asking the CRI endpoint at `cri` for pod labels.
    fn monitor_with_cri(sbs: &Path, cri: Option<&Path>) -> HttpProcess {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let addr = format!("127.0.0.1:{port}");
        let child = Command::new(tern_tests::tern_bin())
            .args(["monitor", "--listen", &addr, "--scrape-timeout", "3000", "--sbs-root"])
            .arg(sbs)
            .arg("--cri-socket")
            .arg(cri.unwrap_or(Path::new("")))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let m = HttpProcess { child, addr };
        let deadline = Instant::now() + Duration::from_secs(20);
        while m.get("/sandboxes").is_none() {
            assert!(Instant::now() < deadline, "tern monitor did not come up");
            std::thread::sleep(Duration::from_millis(100));
        }
        m
    }

    /// GET `path`: status and body, `None` if the connection failed.
    fn get(&self, path: &str) -> Option<(u16, String)> {
        let mut s = TcpStream::connect(&self.addr).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(60))).ok()?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").ok()?;
        let mut raw = String::new();
        s.read_to_string(&mut raw).ok()?;
        let (head, body) = raw.split_once("\r\n\r\n")?;
        let status = head.split(' ').nth(1)?.parse().ok()?;
        Some((status, body.to_owned()))
    }

    fn sandbox_ids(&self) -> Vec<String> {
        let (_, body) = self.get("/sandboxes").unwrap_or_default();
        body.split("\"sandbox_id\":\"").skip(1).filter_map(|s| s.split('"').next()).map(str::to_owned).collect()
    }

    fn wait_for_ids(&self, want: &[&str], within: Duration) -> Vec<String> {
        self.wait_for_ids_or(want, within, String::new)
    }

    /// [`Self::wait_for_ids`] whose panic ends with `context()` (what was awaited, logs).
    fn wait_for_ids_or(&self, want: &[&str], within: Duration, context: impl Fn() -> String) -> Vec<String> {
        let deadline = Instant::now() + within;
        loop {
            let mut ids = self.sandbox_ids();
            ids.sort();
            if ids == want {
                return ids;
            }
            assert!(Instant::now() < deadline, "waited {within:?}: sandboxes {ids:?}, wanted {want:?}{}", context());
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for HttpProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Parse `text` with `prometheus_client.parser` and return, per family name, the sum of its
/// samples' values for `sandbox_id` (families without that label are skipped).
fn parse_with_prometheus_client(text: &str, sandbox_id: &str) -> std::collections::HashMap<String, f64> {
    let script = r#"
import sys
from prometheus_client.parser import text_string_to_metric_families
want = sys.argv[1]
for fam in text_string_to_metric_families(sys.stdin.read()):
    total, seen = 0.0, False
    for s in fam.samples:
        if s.labels.get("sandbox_id") == want:
            total += s.value; seen = True
    if seen:
        print(f"{fam.name} {total}")
"#;
    // Debian's interpreter: `make deps` installs python3-prometheus-client for it.
    let mut child = Command::new("/usr/bin/python3")
        .args(["-c", script, sandbox_id])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "prometheus_client rejected the exposition: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let (n, v) = l.split_once(' ')?;
            Some((n.to_owned(), v.parse().ok()?))
        })
        .collect()
}

#[test]
fn monitor_follows_real_shims_through_the_sandbox_directory() {
    let Some(ctrd) = setup("monitor_follows_real_shims_through_the_sandbox_directory") else { return };
    let root = private_root(&ctrd);
    let sbs = root.path().join("sbs");
    // Started before any sandbox (and before the directory exists).
    let early = HttpProcess::monitor(&sbs);
    let ctr = |args: &[&str]| ctrd.ctr(args, Duration::from_secs(300));
    let out = ctr(&ctr_run_args(&["-d"], "mon1", &["sleep", "1000"]));
    assert!(out.status.success(), "ctr run -d failed: {}\n{}", stderr(&out), ctrd.logs());
    assert!(
        sbs.join("mon1/shim-monitor.sock").exists(),
        "no shim-monitor.sock after the task started\n{}",
        ctrd.logs()
    );
    early.wait_for_ids(&["mon1"], Duration::from_secs(30));

    let started = Instant::now();
    let (status, text) = early.get("/metrics").unwrap();
    let took = started.elapsed();
    assert_eq!(status, 200, "{text}");
    eprintln!("scrape of 1 sandbox: {took:?}, {} bytes", text.len());
    let families = parse_with_prometheus_client(&text, "mon1");
    for prefix in ["tern_hypervisor_", "tern_vmm_virtio_", "tern_shim_", "tern_agent_", "tern_guest_", "tern_watch_"] {
        assert!(families.keys().any(|k| k.starts_with(prefix)), "no {prefix} family for mon1:\n{text}");
    }
    let nonzero = |name: &str| families.get(name).copied().unwrap_or(0.0) > 0.0;
    // The parser strips `_total` from counter family names.
    for name in [
        "tern_hypervisor_vm_exits",
        "tern_vmm_virtio_fs_ops",
        "tern_vmm_virtio_vsock_bytes",
        "tern_shim_rss_bytes",
        "tern_guest_memory_bytes",
        "tern_guest_tasks",
        "tern_agent_rss_bytes",
        "tern_agent_up",
        "tern_shim_task_rpcs",
    ] {
        assert!(nonzero(name), "{name} is zero or missing: {:?}\n{text}", families.get(name));
    }
    assert!(text.contains("tern_monitor_scrape_failures_total 0\n"), "{text}");

    // A stale socket (a directory whose socket nobody serves) costs one failure, fast.
    let stale_dir = sbs.join("stale-sandbox");
    std::fs::create_dir_all(&stale_dir).unwrap();
    let stale = std::os::unix::net::UnixListener::bind(stale_dir.join("shim-monitor.sock")).unwrap();
    early.wait_for_ids(&["mon1", "stale-sandbox"], Duration::from_secs(10));
    let started = Instant::now();
    let (status, text) = early.get("/metrics").unwrap();
    assert_eq!(status, 200);
    assert!(started.elapsed() < Duration::from_secs(10), "scrape with a stale socket took {:?}", started.elapsed());
    assert!(text.contains("tern_monitor_scrape_failures_total 1\n"), "{text}");
    assert!(text.contains("sandbox_id=\"mon1\""), "{text}");
    drop(stale);
    std::fs::remove_dir_all(&stale_dir).unwrap();

    // Started after the sandbox: the same set.
    let late = HttpProcess::monitor(&sbs);
    assert_eq!(
        late.wait_for_ids(&["mon1"], Duration::from_secs(10)),
        early.wait_for_ids(&["mon1"], Duration::from_secs(10))
    );
    let (status, url) = late.get("/agent-url?sandbox=mon1").unwrap();
    assert_eq!(status, 200);
    assert!(url.starts_with("hvsock://") && url.trim_end().ends_with(":1024"), "{url}");

    // A real Prometheus scrapes the monitor and answers a query for a tern_ series.
    if let Some(answer) = query_through_prometheus(&late, "tern_hypervisor_vcpus") {
        assert!(answer.contains("\"sandbox_id\":\"mon1\""), "{answer}");
    }

    // Deleting the task ends the shim and removes the sandbox directory.
    let out = ctr(&["task", "kill", "--signal", "SIGKILL", "mon1"]);
    assert!(out.status.success(), "ctr task kill failed: {}", stderr(&out));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = ctr(&["task", "delete", "mon1"]);
        if out.status.success() {
            break;
        }
        assert!(Instant::now() < deadline, "ctr task delete failed: {}", stderr(&out));
        std::thread::sleep(Duration::from_millis(500));
    }
    let _ = ctr(&["container", "delete", "mon1"]);
    early.wait_for_ids(&[], Duration::from_secs(60));
    late.wait_for_ids(&[], Duration::from_secs(10));
    assert!(!sbs.join("mon1").exists(), "sandbox directory left behind");
}

/// Have a real Prometheus server scrape `monitor` and return what its HTTP API answers for
/// `query` once the answer holds a series (`None` when Prometheus is not installed).
fn query_through_prometheus(monitor: &HttpProcess, query: &str) -> Option<String> {
    let Some(prometheus) =
        ["/usr/bin/prometheus", "/usr/local/bin/prometheus"].into_iter().map(PathBuf::from).find(|p| p.is_file())
    else {
        let msg =
            "*** prometheus is not installed (make deps installs Debian's prometheus): real-Prometheus check NOT RUN";
        assert!(!std::env::var("CI").is_ok_and(|v| v == "true" || v == "1"), "{msg}");
        eprintln!("{msg}");
        return None;
    };
    let dir = tempfile::Builder::new().prefix("tern-prom-").tempdir_in("/tmp").unwrap();
    std::fs::write(
        dir.path().join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: tern\n    static_configs:\n      - targets: ['{}']\n",
            monitor.addr
        ),
    )
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let listen = format!("127.0.0.1:{port}");
    let child = Command::new(prometheus)
        .arg(format!("--config.file={}", dir.path().join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
        .arg(format!("--web.listen-address={listen}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("prometheus.log")).unwrap())
        .spawn()
        .unwrap();
    let api = HttpProcess { child, addr: listen };
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        if let Some((200, body)) = api.get(&format!("/api/v1/query?query={query}")) {
            if body.contains("\"status\":\"success\"") && body.contains("\"__name__\"") {
                return Some(body);
            }
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never returned {query}:\n{}",
            std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Median and maximum of `rounds` timings of `get`, which returns the response size.
fn time_rounds(rounds: usize, mut get: impl FnMut() -> usize) -> (Duration, Duration, usize) {
    let mut times = Vec::new();
    let mut size = 0;
    for _ in 0..rounds {
        let started = Instant::now();
        size = get();
        times.push(started.elapsed());
    }
    times.sort();
    (times[times.len() / 2], times[times.len() - 1], size)
}

/// One `GET /metrics` from a shim's own socket (what the monitor does for each sandbox).
fn scrape_shim(socket: &Path) -> usize {
    let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    raw.len()
}

/// Scrape cost for `n` sandboxes, as one line of the results table: the monitor's aggregate
/// response, and for comparison one shim's own answer (the monitor's per-sandbox floor).
fn measure(monitor: &HttpProcess, shim_socket: &Path, n: usize, rounds: usize) -> String {
    let (median, max, size) = time_rounds(rounds, || {
        let (status, text) = monitor.get("/metrics").unwrap();
        assert_eq!(status, 200);
        text.len()
    });
    let (shim_median, _, _) = time_rounds(rounds, || scrape_shim(shim_socket));
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    format!(
        "| {n} | {:.1} | {:.1} | {:.1} | {:.2} | {size} | {:.1} |\n",
        ms(median),
        ms(max),
        ms(shim_median),
        median.as_secs_f64() / shim_median.as_secs_f64(),
        size as f64 / n as f64 / 1024.0
    )
}

#[test]
fn monitor_scrapes_ten_sandboxes_in_one_response() {
    ten_sandboxes("monitor_scrapes_ten_sandboxes_in_one_response", false);
}

/// `make bench` (tests/bench/run.sh): scrape latency and size for 1 and 10 sandboxes, into
/// tests/bench/results/metrics_scrape.md.
#[test]
#[ignore = "benchmark: run by `make bench`"]
fn metrics_scrape_bench() {
    ten_sandboxes("metrics_scrape_bench", true);
}

/// Ten real sandboxes under one monitor: all ten in one parseable response, each with its agent
/// up; with `bench`, the scrape cost measured at 1 and at 10 sandboxes.
fn ten_sandboxes(test: &str, bench: bool) {
    let Some(ctrd) = setup(test) else { return };
    // Ten VMs in the runner's 2 GiB: give each less RAM than the default.
    let config = std::fs::read_to_string(ctrd.dir().join("tern.toml")).unwrap().replacen(
        "[vm]\n",
        "[vm]\nmemory_mib = 128\n",
        1,
    );
    std::fs::write(ctrd.dir().join("tern.toml"), config).unwrap();
    let root = private_root(&ctrd);
    let sbs = root.path().join("sbs");
    let monitor = HttpProcess::monitor(&sbs);
    let ctr = |args: &[&str]| ctrd.ctr(args, Duration::from_secs(300));
    let first_socket = sbs.join("ten0").join("shim-monitor.sock");
    let mut ids: Vec<String> = Vec::new();
    let mut table = String::from(
        "| sandboxes | median ms | max ms | one shim's own /metrics, median ms | monitor / one shim | bytes | KiB per sandbox |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for i in 0..10 {
        let id = format!("ten{i}");
        let out = ctr(&ctr_run_args(&["-d"], &id, &["sleep", "1000"]));
        assert!(out.status.success(), "ctr run -d {id} failed: {}\n{}", stderr(&out), ctrd.logs());
        ids.push(id);
        if i == 0 && bench {
            monitor.wait_for_ids(&["ten0"], Duration::from_secs(30));
            table.push_str(&measure(&monitor, &first_socket, 1, 11));
        }
    }
    let want: Vec<&str> = ids.iter().map(String::as_str).collect();
    monitor.wait_for_ids(&want, Duration::from_secs(30));
    if bench {
        table.push_str(&measure(&monitor, &first_socket, 10, 11));
        let results = tern_tests::workspace_root().join("tests/bench/results/metrics_scrape.md");
        let note = "Measured by `make bench` inside the nested-virt runner (TCG outer VM, nested KVM): absolute \
                    times are emulated. 11 scrapes per row; a shim's answer includes one guest-agent Stats \
                    RPC over vsock (cached for 1 s).\n\n";
        std::fs::write(&results, format!("# tern monitor scrape cost\n\n{note}{table}")).unwrap();
        eprintln!("{table}");
    }
    let (_, text) = monitor.get("/metrics").unwrap();
    for id in &ids {
        let families = parse_with_prometheus_client(&text, id);
        assert!(families.get("tern_agent_up").copied() == Some(1.0), "{id}: agent not up in the scrape:\n{text}");
    }
    assert!(text.contains("tern_monitor_running_shims 10"), "{text}");
    for id in &ids {
        let _ = ctr(&["task", "kill", "--signal", "SIGKILL", id]);
    }
    for id in &ids {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !ctr(&["task", "delete", id]).status.success() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(500));
        }
        let _ = ctr(&["container", "delete", id]);
    }
    monitor.wait_for_ids(&[], Duration::from_secs(60));
}

/// Timestamped progress lines for a long test. They go straight to the process's stderr (not
/// through libtest's capture), so the runner's console shows how far a test got even when it
/// is killed before it ends; `[+12.3s 19:04:05]` is the time since the test started and the
/// UTC wall clock (to line up with containerd.log and the monitor's log).
struct Progress {
    started: Instant,
    test: &'static str,
}

impl Progress {
    fn new(test: &'static str) -> Progress {
        let p = Progress { started: Instant::now(), test };
        p.step("start");
        p
    }

    fn step(&self, what: &str) {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
        let (h, m, s) = (now / 3600 % 24, now / 60 % 60, now % 60);
        let line =
            format!("[{} +{:.1}s {h:02}:{m:02}:{s:02}] {what}\n", self.test, self.started.elapsed().as_secs_f64());
        let _ = std::io::stderr().write_all(line.as_bytes());
    }
}

/// Says when a test's cleanup (the drops after its body, also after a panic) has finished, so a
/// hang in a `Drop` shows up as a missing "cleanup done" line. Declare it first: locals drop in
/// reverse order, so it drops last.
struct CleanupDone<'a>(&'a Progress);

impl Drop for CleanupDone<'_> {
    fn drop(&mut self) {
        let how = if std::thread::panicking() { " (after a panic)" } else { "" };
        self.0.step(&format!("cleanup done{how}"));
    }
}

/// Run one CRI call, bounded by `limit` (tighter than the client's own 300 s per request, which
/// is sized for the slowest boot anywhere), and panic naming `step` when it fails or runs out.
fn cri_step<T, F>(
    cri: &Cri,
    ctrd: &TestContainerd,
    progress: &Progress,
    step: &str,
    limit: Duration,
    f: impl FnOnce(tern_runtime::cri::CriClient) -> F,
) -> T
where
    F: std::future::Future<Output = Result<T, tern_runtime::cri::CriError>>,
{
    progress.step(&format!("{step}: calling (limit {limit:?})"));
    let started = Instant::now();
    let call = f(cri.client().clone());
    match cri.block_on(async { tokio::time::timeout(limit, call).await }) {
        Ok(Ok(v)) => {
            progress.step(&format!("{step}: done in {:.1}s", started.elapsed().as_secs_f64()));
            v
        }
        Ok(Err(e)) => {
            progress.step(&format!("{step}: failed after {:.1}s", started.elapsed().as_secs_f64()));
            panic!("{step} failed after {:?}: {e}\n{}", started.elapsed(), ctrd.logs())
        }
        Err(_) => {
            progress.step(&format!("{step}: no answer within {limit:?}"));
            panic!("{step}: no answer within {limit:?}\n{}", ctrd.logs())
        }
    }
}

/// Every wait below is bounded and names its step when it runs out; progress lines on stderr
/// show where a run that is killed from outside had got to.
#[test]
fn monitor_labels_a_cri_pod_with_its_metadata() {
    let progress = Progress::new("monitor_labels_a_cri_pod");
    let _cleanup = CleanupDone(&progress);
    progress.step("starting containerd with CRI and importing the images");
    let Some(ctrd) = tern_tests::containerd::cri_containerd_for_test("monitor_labels_a_cri_pod_with_its_metadata")
    else {
        return;
    };
    let root = private_root(&ctrd);
    let sbs = root.path().join("sbs");
    progress.step("connecting to CRI");
    let cri = Cri::connect(&ctrd);
    progress.step("waiting for CRI to list the pause image");
    cri.wait_image(PAUSE_IMAGE, Duration::from_secs(30));
    // Started before the pod, and with CRI not there at first: its `--cri-socket` is a path
    // that becomes a link to containerd's socket only after the monitor has listed the pod's
    // sandbox. So the monitor must show the sandbox without pod labels first (never drop it
    // for not being known to CRI) and label it once CRI answers.
    progress.step("starting tern monitor --cri-socket (CRI not reachable yet)");
    let cri_link = ctrd.dir().join("cri-later.sock");
    let monitor = HttpProcess::monitor_with_cri(&sbs, Some(&cri_link));
    let (name, uid, ns) = ("metrics-pod", "5d1f7a52-0000-4c1e-9f00-00000000beef", "tern-metrics");
    let log_dir = ctrd.dir().join("logs").join(format!("{ns}_{name}_{uid}"));
    std::fs::create_dir_all(&log_dir).unwrap();
    let pod = pod_config(name, uid, ns, &log_dir);
    // One VM boot: ~5 s in the runner, and the shim gives the agent 60 s before it fails the
    // request; CNI setup and the pause container come on top.
    let sandbox = cri_step(&cri, &ctrd, &progress, "RunPodSandbox", Duration::from_secs(150), |c| async move {
        c.run_pod_sandbox(pod, CRI_HANDLER).await
    });
    progress.step(&format!("sandbox {sandbox}: waiting for the monitor to list it"));
    monitor.wait_for_ids_or(&[sandbox.as_str()], Duration::from_secs(60), || {
        format!(" (the pod's sandbox to appear)\n{}", ctrd.logs())
    });
    // Two of the monitor's CRI retry rounds (2 s each) without CRI: listed, scraped, unlabelled.
    std::thread::sleep(Duration::from_secs(5));
    let (_, list) = monitor.get("/sandboxes").expect("GET /sandboxes from tern monitor failed");
    assert!(list.contains(&format!("\"sandbox_id\":\"{sandbox}\"")) && list.contains("\"cri_uid\":null"), "{list}");
    let (_, text) = monitor.get("/metrics?filter_family=tern_hypervisor_vcpus").expect("GET /metrics failed");
    let unlabelled =
        format!("tern_hypervisor_vcpus{{sandbox_id=\"{sandbox}\",cri_uid=\"\",cri_name=\"\",cri_namespace=\"\"}}");
    assert!(text.contains(&unlabelled), "no {unlabelled} in:\n{text}");
    progress.step("unlabelled while CRI is away; linking the CRI socket");
    std::os::unix::fs::symlink(ctrd.address(), &cri_link).unwrap();
    let labels = format!("sandbox_id=\"{sandbox}\",cri_uid=\"{uid}\",cri_name=\"{name}\",cri_namespace=\"{ns}\"");
    progress.step("waiting for the CRI labels on tern_hypervisor_vcpus");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, text) = monitor
            .get("/metrics?filter_family=tern_hypervisor")
            .unwrap_or_else(|| panic!("GET /metrics from tern monitor failed\n{}", ctrd.logs()));
        assert_eq!(status, 200, "{text}");
        if text.contains(&format!("tern_hypervisor_vcpus{{{labels}}}")) {
            assert!(!text.contains("tern_shim_"), "filter_family let other families through:\n{text}");
            break;
        }
        assert!(Instant::now() < deadline, "no series with {labels} within 60 s:\n{text}\n{}", ctrd.logs());
        std::thread::sleep(Duration::from_millis(500));
    }
    progress.step("labelled; checking /sandboxes");
    let (_, list) = monitor.get("/sandboxes").expect("GET /sandboxes from tern monitor failed");
    assert!(list.contains(&format!("\"cri_uid\":\"{uid}\"")), "{list}");

    let sb = sandbox.clone();
    cri_step(&cri, &ctrd, &progress, "StopPodSandbox", Duration::from_secs(90), |c| async move {
        c.stop_pod_sandbox(&sb).await
    });
    let sb = sandbox.clone();
    cri_step(&cri, &ctrd, &progress, "RemovePodSandbox", Duration::from_secs(45), |c| async move {
        c.remove_pod_sandbox(&sb).await
    });
    progress.step("waiting for the monitor to drop the sandbox");
    monitor
        .wait_for_ids_or(&[], Duration::from_secs(60), || format!(" (the pod's sandbox to go away)\n{}", ctrd.logs()));
    progress.step("stopping tern monitor");
    drop(monitor);
    progress.step("dropping the CRI client");
    drop(cri);
    progress.step("stopping containerd");
    drop(ctrd);
}
