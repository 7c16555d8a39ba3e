//! Pod networking through containerd's CRI plugin with Debian's bridge + host-local CNI, as a
//! cluster node would run it: a tern pod's guest `eth0` has the IP that PodSandboxStatus
//! reports and the bridge gateway as its default route; two tern pods and a runc pod reach one
//! another by IP over HTTP; the pod's resolv.conf is CRI's. Removing a pod, and containerd's
//! cleanup after a SIGKILLed shim, leave no tap or tc state in the pod's network namespace.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tern_runtime::cri::api;
use tern_tests::containerd::{TestContainerd, BUSYBOX_IMAGE, CRI_HANDLER, CRI_NAMESPACE};
use tern_tests::cri::{container_config, read_cri_log, wait_log_line, Cri, TestPod};

/// Pod start includes a VM boot under emulation.
const START_LIMIT: Duration = Duration::from_secs(300);
/// The bridge CNI's gateway (see `tern_tests::containerd`'s conflist: 10.88.77.0/24).
const GATEWAY: &str = "10.88.77.1";

struct Pod {
    name: &'static str,
    sandbox: String,
    ip: String,
    log_dir: PathBuf,
    config: api::PodSandboxConfig,
}

fn run_pod(cri: &Cri, ctrd: &TestContainerd, name: &'static str, uid: &str, handler: &str) -> Pod {
    let TestPod { sandbox, config, log_dir } = cri.run_pod(ctrd, name, uid, "net", handler);
    let sb = sandbox.clone();
    let status = cri.call(|c| async move { c.pod_sandbox_status(&sb).await }).unwrap();
    let ip = status.network.map(|n| n.ip).unwrap_or_default();
    assert!(ip.starts_with("10.88.77."), "pod {name} has IP {ip:?}");
    Pod { name, sandbox, ip, log_dir, config }
}

/// Start the `net` container of `pod`: report its address, default route and resolver, serve
/// its name over HTTP on 8080, then fetch every peer's name until each answered (with `nc`:
/// Debian's busybox-static `wget` segfaults when it cannot connect).
fn start_net_container(cri: &Cri, ctrd: &TestContainerd, pod: &Pod, peers: &[&str]) {
    let script = format!(
        "echo \"addr: $(ip -o addr show dev eth0 | grep ' inet ')\"; echo \"route: $(ip route | grep default)\"; \
         echo \"resolv: $(grep nameserver /etc/resolv.conf)\"; mkdir -p /tmp/www; echo {name} > /tmp/www/id; \
         httpd -p 8080 -h /tmp/www; for ip in {peers}; do \
         until r=$(printf 'GET /id HTTP/1.0\\r\\n\\r\\n' | nc -w 3 $ip 8080 2>/dev/null | tail -n 1) && [ -n \"$r\" ]; \
         do sleep 0.5; done; echo \"reached $ip $r\"; done; \
         echo all-reached; exec sleep 100000",
        name = pod.name,
        peers = peers.join(" "),
    );
    let config = container_config("net", BUSYBOX_IMAGE, &["sh", "-c", &script], "net.log", &[]);
    cri.create_and_start(&pod.sandbox, config, pod.config.clone())
        .unwrap_or_else(|e| panic!("{e} (pod {})\n{}", pod.name, ctrd.logs()));
}

/// The network namespace containerd made for `sandbox`, from its bundle's spec.
fn pod_netns(ctrd: &TestContainerd, sandbox: &str) -> PathBuf {
    let bundle = ctrd.dir().join("state/io.containerd.runtime.v2.task").join(CRI_NAMESPACE).join(sandbox);
    let spec: serde_json::Value = serde_json::from_slice(&std::fs::read(bundle.join("config.json")).unwrap()).unwrap();
    let path = spec["linux"]["namespaces"]
        .as_array()
        .and_then(|n| n.iter().find(|ns| ns["type"] == "network"))
        .and_then(|ns| ns["path"].as_str())
        .unwrap_or_else(|| panic!("no network namespace path in {spec}"));
    PathBuf::from(path)
}

/// tern's state in a network namespace: `_tern` links and ingress qdiscs. A namespace that is
/// gone has none.
fn tern_state_in(netns: &Path) -> Vec<String> {
    if !netns.exists() {
        return Vec::new();
    }
    let mut state = Vec::new();
    for (what, args) in [("link", &["ip", "-o", "link", "show"][..]), ("qdisc", &["tc", "qdisc", "show"][..])] {
        let out = Command::new("nsenter").arg(format!("--net={}", netns.display())).args(args).output().unwrap();
        if !out.status.success() {
            // The namespace went between the check and here.
            continue;
        }
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        state.extend(
            text.lines().filter(|l| l.contains("_tern") || l.contains("ingress")).map(|l| format!("{what}: {l}")),
        );
    }
    state
}

fn wait_clean(netns: &Path, limit: Duration) -> Vec<String> {
    let deadline = Instant::now() + limit;
    loop {
        let state = tern_state_in(netns);
        if state.is_empty() || Instant::now() >= deadline {
            return state;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn shim_of(ctrd: &TestContainerd, sandbox: &str) -> i32 {
    let pids: Vec<i32> = ctrd
        .shim_pids()
        .into_iter()
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| String::from_utf8_lossy(&c).contains(sandbox))
        })
        .collect();
    assert_eq!(pids.len(), 1, "one shim for sandbox {sandbox}, found {pids:?}");
    pids[0]
}

#[test]
fn tern_and_runc_pods_reach_each_other_and_leave_no_network_state() {
    let test = "tern_and_runc_pods_reach_each_other_and_leave_no_network_state";
    let Some(ctrd) = tern_tests::containerd::cri_containerd_for_test(test) else { return };
    let cri = Cri::connect(&ctrd);
    let logs = || ctrd.logs();

    let a = run_pod(&cri, &ctrd, "tern-a", "6a1b0e00-0000-4000-8000-00000000000a", CRI_HANDLER);
    let b = run_pod(&cri, &ctrd, "tern-b", "6a1b0e00-0000-4000-8000-00000000000b", CRI_HANDLER);
    let r = run_pod(&cri, &ctrd, "runc-r", "6a1b0e00-0000-4000-8000-00000000000c", "runc");
    let netns_a = pod_netns(&ctrd, &a.sandbox);
    let netns_b = pod_netns(&ctrd, &b.sandbox);
    assert!(!tern_state_in(&netns_a).is_empty(), "tern's tap and tc state must be in pod a's netns while it runs");

    start_net_container(&cri, &ctrd, &a, &[&b.ip, &r.ip]);
    start_net_container(&cri, &ctrd, &b, &[&a.ip, &r.ip]);
    start_net_container(&cri, &ctrd, &r, &[&a.ip, &b.ip]);
    for pod in [&a, &b, &r] {
        let log = pod.log_dir.join("net.log");
        wait_log_line(&log, START_LIMIT, &logs, |l| l == "all-reached");
        let lines = read_cri_log(&log);
        let has = |want: &str| lines.iter().any(|l| l.contains(want));
        assert!(has(&format!("inet {}/24", pod.ip)), "{}: eth0 must have the CRI IP {}: {lines:?}", pod.name, pod.ip);
        assert!(has(&format!("route: default via {GATEWAY}")), "{}: default route: {lines:?}", pod.name);
        assert!(has("resolv: nameserver 10.96.0.10"), "{}: the pod's resolv.conf: {lines:?}", pod.name);
        for peer in [&a, &b, &r].into_iter().filter(|p| p.name != pod.name) {
            let want = format!("reached {} {}", peer.ip, peer.name);
            assert!(lines.contains(&want), "{} lacks {want:?}: {lines:?}", pod.name);
        }
    }

    // A SIGKILLed shim: containerd runs `containerd-shim-tern-v2 delete`, which must take tern's
    // tc state off the pod's veth (the taps died with the shim).
    assert!(!tern_state_in(&netns_b).is_empty(), "tern's tc state must be in pod b's netns while it runs");
    let shim_b = shim_of(&ctrd, &b.sandbox);
    // SAFETY: kill(2) on a shim pid this test's containerd started.
    assert_eq!(unsafe { libc::kill(shim_b, libc::SIGKILL) }, 0);
    let left = wait_clean(&netns_b, Duration::from_secs(60));
    assert!(left.is_empty(), "after the SIGKILLed shim's delete, pod b's netns still has {left:?}\n{}", logs());

    // A removed pod leaves nothing either (its netns goes; until then tern's state must be gone).
    cri.remove_pod(&ctrd, &a.sandbox);
    assert_eq!(tern_state_in(&netns_a), Vec::<String>::new(), "pod a's netns after removal");
    cri.remove_pod(&ctrd, &b.sandbox);
    cri.remove_pod(&ctrd, &r.sandbox);
    assert!(ctrd.wait_no_shims(Duration::from_secs(60)), "a shim outlived its pod\n{}", logs());
}
