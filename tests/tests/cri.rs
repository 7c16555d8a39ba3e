//! Pods through containerd's CRI plugin with tern as the runtime handler, driven by the
//! project's own CRI client (`tern_runtime::cri`), as kubelet would drive them: a pod of two
//! containers shares one microVM (one shim, one guest boot id), CRI's host bind mounts
//! (`/etc/hostname`, `/etc/hosts`, `/etc/resolv.conf`, `/dev/shm`), volumes (a writable
//! directory, a read-only file, the termination-log file) and a kubelet-style secret volume
//! reach the containers with their access modes, a kubelet update of the secret is seen by the
//! running container, and StopPodSandbox + RemovePodSandbox leave no shim, mount or run
//! directory.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use tern_runtime::cri::api;
use tern_tests::containerd::{TestContainerd, BUSYBOX_IMAGE};
use tern_tests::cri::{container_config, wait_log_line, Cri, SecretVolume, TestPod};

/// A container's first output includes a VM boot (for the first) under emulation.
const START_LIMIT: Duration = Duration::from_secs(240);
/// How long a kubelet secret update may take to reach the container: generous for the emulated
/// CPU, yet well below the 60 s safety-net resync, so only the change-record path can pass.
const PROPAGATION: Duration = Duration::from_secs(20);

/// KVM guard plus containerd/CNI availability; `None` means skip (a failure under `CI=true`).
fn setup(test: &str) -> Option<TestContainerd> {
    tern_tests::containerd::cri_containerd_for_test(test)
}

fn is_boot_id(s: &str) -> bool {
    s.len() == 36 && s.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
}

/// Every entry left in the shims' run directory (`TERN_RUN_DIR`).
fn run_dirs_left(ctrd: &TestContainerd) -> Vec<String> {
    std::fs::read_dir(ctrd.dir().join("vm"))
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

#[test]
fn cri_pod_of_two_containers_shares_one_vm_and_sees_secret_updates() {
    let test = "cri_pod_of_two_containers_shares_one_vm_and_sees_secret_updates";
    let Some(ctrd) = setup(test) else { return };
    let cri = Cri::connect(&ctrd);
    let logs = || ctrd.logs();

    let (name, uid, ns) = ("web", "0f6c1b0e-5b1c-4d0e-9a57-000000000001", "tern");
    let pod_dir = ctrd.dir().join("kubelet/pods").join(uid);
    let mut secret = SecretVolume::create(&pod_dir, "token", &[("key", "generation-1")]);
    // Volumes of the peer: a writable directory (an emptyDir), a read-only single file and
    // kubelet's per-container termination-log file (written by the container).
    let data = pod_dir.join("volumes/kubernetes.io~empty-dir/data");
    std::fs::create_dir_all(&data).unwrap();
    let app_conf = pod_dir.join("app.conf");
    std::fs::write(&app_conf, "mode=fast\n").unwrap();
    let termination_log = pod_dir.join("containers/peer/termination-log");
    std::fs::create_dir_all(termination_log.parent().unwrap()).unwrap();
    std::fs::write(&termination_log, "").unwrap();

    let started = Instant::now();
    let TestPod { sandbox, config: pod, log_dir } = cri.run_tern_pod(&ctrd, name, uid, ns);
    eprintln!("RunPodSandbox (after the images): {:?}", started.elapsed());
    let sb = sandbox.clone();
    let meta = cri.call(|c| async move { c.pod_metadata(&sb).await }).unwrap();
    let meta = meta.unwrap_or_else(|| panic!("CRI does not list sandbox {sandbox}"));
    assert_eq!((meta.name.as_str(), meta.uid.as_str(), meta.namespace.as_str(), meta.ready), (name, uid, ns, true));

    // The reader prints the guest's boot id once, then the secret five times a second.
    let reader = container_config(
        "reader",
        BUSYBOX_IMAGE,
        &["sh", "-c", "cat /proc/sys/kernel/random/boot_id; while :; do cat /etc/secret/key; echo; sleep 0.2; done"],
        "reader.log",
        &[(secret.dir(), "/etc/secret", true)],
    );
    // The peer reports the boot id and what CRI's host bind mounts and the pod's shared UTS
    // namespace give it, then sleeps.
    let peer = container_config(
        "peer",
        BUSYBOX_IMAGE,
        &[
            "sh",
            "-c",
            "cat /proc/sys/kernel/random/boot_id; echo \"uts=$(hostname)\"; echo \"hostname-file=$(cat /etc/hostname)\"; \
             echo \"resolv=$(grep nameserver /etc/resolv.conf)\"; echo \"hosts=$(grep -c localhost /etc/hosts)\"; \
             echo shm > /dev/shm/probe && echo \"shm=$(cat /dev/shm/probe)\"; \
             echo from-guest > /data/out && echo data-written; \
             echo \"conf=$(cat /etc/app.conf)\"; (echo x >> /etc/app.conf) 2>/dev/null || echo conf-ro; \
             (echo x > /etc/secret/new) 2>/dev/null || echo secret-ro; \
             echo \"secret=$(cat /etc/secret/key)\"; \
             echo bye > /dev/termination-log && echo ready; exec sleep 100000",
        ],
        "peer.log",
        &[
            (data.as_path(), "/data", false),
            (app_conf.as_path(), "/etc/app.conf", true),
            (termination_log.as_path(), "/dev/termination-log", false),
            (secret.dir(), "/etc/secret", true),
        ],
    );
    let mut ids = Vec::new();
    for config in [reader, peer] {
        let id = cri.create_and_start(&sandbox, config, pod.clone()).unwrap_or_else(|e| panic!("{e}\n{}", logs()));
        ids.push(id);
    }
    eprintln!("pod with two containers started: {:?}", started.elapsed());

    let reader_log = log_dir.join("reader.log");
    let peer_log = log_dir.join("peer.log");
    let reader_boot = wait_log_line(&reader_log, START_LIMIT, &logs, is_boot_id);
    let peer_boot = wait_log_line(&peer_log, START_LIMIT, &logs, is_boot_id);
    let host_boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    assert_eq!(reader_boot, peer_boot, "the pod's containers run in different kernels");
    assert_ne!(reader_boot, host_boot.trim(), "the containers run in the host kernel, not in a VM");
    let shims = ctrd.shim_pids();
    assert_eq!(shims.len(), 1, "one tern shim per pod expected, found {shims:?}");

    // CRI's bind mounts and the pod's UTS namespace, as seen by the peer.
    wait_log_line(&peer_log, START_LIMIT, &logs, |l| l == "ready");
    let peer_lines = tern_tests::cri::read_cri_log(&peer_log);
    // CRI copies the host's /etc/hosts for the pod.
    let host_hosts = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
    let hosts = format!("hosts={}", host_hosts.lines().filter(|l| l.contains("localhost")).count());
    let wants = [
        "uts=web",
        "hostname-file=web",
        "resolv=nameserver 10.96.0.10",
        &hosts,
        "shm=shm",
        "data-written",
        "conf=mode=fast",
        "conf-ro",
        "secret-ro",
        "secret=generation-1",
    ];
    for want in wants {
        assert!(peer_lines.iter().any(|l| l == want), "peer lacks {want:?}: {peer_lines:?}\n{}", logs());
    }
    // Writes through rw binds land in the host's files; read-only ones changed nothing.
    assert_eq!(std::fs::read_to_string(data.join("out")).unwrap(), "from-guest\n");
    assert_eq!(std::fs::read_to_string(&termination_log).unwrap(), "bye\n");
    assert_eq!(std::fs::read_to_string(&app_conf).unwrap(), "mode=fast\n");
    assert!(!secret.dir().join("new").exists());

    // The secret: first generation, then a kubelet-style atomic update.
    wait_log_line(&reader_log, START_LIMIT, &logs, |l| l == "generation-1");
    let updated = Instant::now();
    secret.update(&[("key", "generation-2")]);
    wait_log_line(&reader_log, PROPAGATION, &logs, |l| l == "generation-2");
    eprintln!("secret update visible in the container after {:?}", updated.elapsed());
    // The container never saw a torn or empty read around the swap (it reads every 0.2 s).
    let lines = tern_tests::cri::read_cri_log(&reader_log);
    let bad: Vec<_> = lines.iter().skip(1).filter(|l| *l != "generation-1" && *l != "generation-2").collect();
    assert!(bad.is_empty(), "unexpected secret reads: {bad:?}");

    for id in &ids {
        let cid = id.clone();
        let status = cri.call(|c| async move { c.container_status(&cid).await }).unwrap();
        assert_eq!(status.state, api::ContainerState::ContainerRunning as i32, "{status:?}");
    }

    cri.stop_and_remove(&ctrd, &sandbox);
    let sb = sandbox.clone();
    assert_eq!(cri.call(|c| async move { c.pod_metadata(&sb).await }).unwrap(), None);
    let mounts = ctrd.mounts_left();
    assert!(mounts.is_empty(), "mounts left behind: {mounts:?}");
    let left = run_dirs_left(&ctrd);
    assert!(left.is_empty(), "sandbox run directories left behind: {left:?}");
}
