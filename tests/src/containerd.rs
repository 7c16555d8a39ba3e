//! A private containerd for end-to-end tests of `containerd-shim-tern-v2`.
//!
//! [`TestContainerd::start`] runs Debian's `containerd` as a plain background process with its
//! own `config.toml`, root, state and sockets under a temp dir (CRI and the snapshotters that
//! need special file systems disabled), and `target/release` first on its PATH so that
//! `--runtime io.containerd.tern.v2` finds the shim. [`TestContainerd::import_busybox`] builds a
//! one-layer OCI image from busybox-static and imports it.
//!
//! [`TestContainerd::start_with_cri`] enables the CRI plugin instead (its own CNI config, a
//! locally built pause image, tern as runtime handler [`CRI_HANDLER`], netns mounts under the
//! state dir; see [`cri_plugin_config`]) and imports the images into CRI's `k8s.io` namespace;
//! the tests then drive pods with `tern_runtime::cri` on [`TestContainerd::address`].
//!
//! Dropping the instance kills every shim it started, stops containerd, unmounts whatever is
//! left under the temp dir, removes the CNI bridge and the temp dir — also when the test failed.

use std::io::Write;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// containerd namespace the tests use.
pub const NAMESPACE: &str = "tern-test";
/// Name of the image [`TestContainerd::import_busybox`] imports.
pub const BUSYBOX_IMAGE: &str = "docker.io/library/tern-busybox:test";
/// The runtime name of tern's shim.
pub const TERN_RUNTIME: &str = "io.containerd.tern.v2";
/// The snapshotter the tests use: plain copies, no overlay module needed.
pub const SNAPSHOTTER: &str = "native";
/// containerd namespace of the CRI plugin.
pub const CRI_NAMESPACE: &str = "k8s.io";
/// The CRI runtime handler (RuntimeClass handler) that selects tern's shim.
pub const CRI_HANDLER: &str = "tern";
/// The pod sandbox ("pause") image, built locally: no registry is reachable from the tests.
pub const PAUSE_IMAGE: &str = "docker.io/library/tern-pause:test";
/// The pause image's entrypoint: busybox sleeping (for 68 years).
const PAUSE_ENTRYPOINT: &[&str] = &["/bin/sleep", "2147483647"];
/// The bridge the CNI config creates (removed on drop).
const CNI_BRIDGE: &str = "terncni0";
/// busybox applets linked into the test image.
const APPLETS: [&str; 18] = [
    "sh", "echo", "sleep", "cat", "true", "false", "ls", "ps", "id", "env", "hostname", "head", "wc", "yes", "mount",
    "pwd", "seq", "unshare",
];

/// Why containerd cannot be tested here, or `None`.
pub fn containerd_unavailable() -> Option<String> {
    for tool in ["containerd", "ctr"] {
        if which(tool).is_none() {
            return Some(format!("`{tool}` is not installed (make deps installs Debian's containerd)"));
        }
    }
    if !Path::new("/bin/busybox").is_file() {
        return Some("/bin/busybox is missing (busybox-static)".into());
    }
    if !shim_bin().is_file() {
        return Some(format!("{} is missing: run `make build`", shim_bin().display()));
    }
    None
}

/// Whether `test` can run here: a KVM that boots Linux, containerd, and no `extra` reason
/// against it. When it cannot, prints a loud notice and returns false — or, under `CI=true`,
/// fails the test: CI must never pass a test that did not run.
pub fn require_containerd(test: &str, extra: Option<String>) -> bool {
    if !crate::require_linux_kvm(test) {
        return false;
    }
    let Some(reason) = containerd_unavailable().or(extra) else {
        return true;
    };
    let msg = format!("*** {test}: NOT RUN — {reason}");
    assert!(!std::env::var("CI").is_ok_and(|v| v == "true" || v == "1"), "{msg}");
    eprintln!("{msg}");
    false
}

/// For a test that needs containerd: a private containerd with the busybox image imported,
/// or `None` (after a loud notice) when [`require_containerd`] says the test cannot run.
pub fn containerd_for_test(test: &str) -> Option<TestContainerd> {
    if !require_containerd(test, None) {
        return None;
    }
    let ctrd = TestContainerd::start();
    ctrd.import_busybox();
    Some(ctrd)
}

/// For a test that needs containerd's CRI plugin: [`TestContainerd::start_with_cri`], or `None`
/// (after a loud notice; a failure under `CI=true`) when the test cannot run here.
pub fn cri_containerd_for_test(test: &str) -> Option<TestContainerd> {
    let no_cni = (!Path::new("/usr/lib/cni/bridge").is_file())
        .then(|| "/usr/lib/cni/bridge is missing (containernetworking-plugins)".to_owned());
    require_containerd(test, no_cni).then(TestContainerd::start_with_cri)
}

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(tool)).find(|p| p.is_file())
}

/// The shim under test, next to `tern`.
pub fn shim_bin() -> PathBuf {
    crate::tern_bin().with_file_name("containerd-shim-tern-v2")
}

/// `ctr run` arguments for tern's runtime and [`BUSYBOX_IMAGE`]: `flags` (`--rm`, `-d`,
/// `--mount …`) go before the image, `argv` after the container id.
pub fn ctr_run_args<'a>(flags: &[&'a str], id: &'a str, argv: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["run", "--snapshotter", SNAPSHOTTER, "--runtime", TERN_RUNTIME];
    args.extend_from_slice(flags);
    args.extend_from_slice(&[BUSYBOX_IMAGE, id]);
    args.extend_from_slice(argv);
    args
}

/// A running private containerd. See the module docs.
pub struct TestContainerd {
    dir: tempfile::TempDir,
    child: Option<Child>,
    address: PathBuf,
}

/// KVM debugfs statistics [`TestContainerd::shim_report`] quotes.
const KVM_DEBUGFS_STATS: [&str; 12] = [
    "exits",
    "irq_exits",
    "halt_exits",
    "io_exits",
    "mmio_exits",
    "signal_exits",
    "pf_taken",
    "pf_fixed",
    "insn_emulation",
    "irq_injections",
    "nmi_injections",
    "req_event",
];

impl TestContainerd {
    /// Start containerd (CRI disabled) and wait until `ctr version` answers.
    pub fn start() -> TestContainerd {
        TestContainerd::start_with(false, &[])
    }

    /// [`TestContainerd::start`] with `env` added to containerd's environment, which
    /// containerd passes on to the shims it starts (the test-only switches of the shim).
    pub fn start_with_shim_env(env: &[(&str, &str)]) -> TestContainerd {
        TestContainerd::start_with(false, env)
    }

    /// Start containerd with its CRI plugin (see [`cri_plugin_config`]) and import the
    /// busybox and pause images into CRI's namespace (`k8s.io`). The CRI endpoint is
    /// [`TestContainerd::address`].
    pub fn start_with_cri() -> TestContainerd {
        let ctrd = TestContainerd::start_with(true, &[]);
        ctrd.import_cri_images();
        ctrd
    }

    fn start_with(cri: bool, env: &[(&str, &str)]) -> TestContainerd {
        let dir = tempfile::Builder::new()
            .prefix("tern-ctrd-")
            .tempdir_in("/tmp")
            .unwrap_or_else(|e| panic!("temp dir: {e}"));
        let root = dir.path();
        let address = root.join("ctrd.sock");
        let (cri_disabled, cri_section) = if cri {
            let cni_conf = root.join("cni");
            std::fs::create_dir_all(&cni_conf).unwrap_or_else(|e| panic!("cni conf dir: {e}"));
            std::fs::write(cni_conf.join("10-tern-test.conflist"), cni_conflist(root))
                .unwrap_or_else(|e| panic!("write the CNI config: {e}"));
            ("", cri_plugin_config(root))
        } else {
            ("\"io.containerd.grpc.v1.cri\", ", String::new())
        };
        let config = format!(
            r#"version = 2
root = "{root}/root"
state = "{root}/state"
disabled_plugins = [{cri_disabled}"io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.aufs"]
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[debug]
  level = "info"
[plugins."io.containerd.internal.v1.opt"]
  path = "{root}/opt"
{cri_section}"#,
            root = root.display(),
            sock = address.display()
        );
        std::fs::write(root.join("config.toml"), config).unwrap_or_else(|e| panic!("write config.toml: {e}"));
        // The shim's VM console goes to a file the test prints on failure.
        // `TERN_TEST_GUEST_LOG=<level>` turns up the agent's log (it goes to that console too);
        // the shim's own level follows `RUST_LOG`, which containerd passes on to it.
        let guest_log = match std::env::var("TERN_TEST_GUEST_LOG") {
            Ok(level) if !level.is_empty() => format!("kernel_cmdline = \"tern.log={level}\"\n"),
            _ => String::new(),
        };
        // `TERN_TEST_SECCOMP=<mode>` sets the shims' `[vmm] seccomp` (default: tern's own, "trap").
        let vmm_section = match std::env::var("TERN_TEST_SECCOMP") {
            Ok(mode) if !mode.is_empty() => format!("[vmm]\nseccomp = \"{mode}\"\n"),
            _ => String::new(),
        };
        let tern_config =
            format!("[vm]\nconsole_log = \"{}\"\n{guest_log}{vmm_section}", root.join("console.log").display());
        std::fs::write(root.join("tern.toml"), tern_config).unwrap_or_else(|e| panic!("write tern.toml: {e}"));
        let bin_dir = shim_bin().parent().map(Path::to_path_buf).unwrap_or_default();
        let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
        let log = std::fs::File::create(root.join("containerd.log")).unwrap_or_else(|e| panic!("containerd log: {e}"));
        let child = Command::new("containerd")
            .arg("--config")
            .arg(root.join("config.toml"))
            .env("PATH", path)
            .env("TERN_CONFIG", root.join("tern.toml"))
            .env("TERN_RUN_DIR", root.join("vm"))
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap_or_else(|e| panic!("log fd: {e}")))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start containerd: {e}"));
        let ctrd = TestContainerd { dir, child: Some(child), address };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = ctrd.ctr(&["version"], Duration::from_secs(10));
            if out.status.success() {
                break;
            }
            assert!(Instant::now() < deadline, "containerd did not come up:\n{}", ctrd.logs());
            std::thread::sleep(Duration::from_millis(200));
        }
        ctrd
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// containerd's log and the VM console, for failure messages.
    pub fn logs(&self) -> String {
        let read = |name: &str| std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
        format!("--- containerd.log ---\n{}\n--- console.log ---\n{}", read("containerd.log"), read("console.log"))
    }

    /// containerd's gRPC socket (also the CRI endpoint when CRI is enabled).
    pub fn address(&self) -> &Path {
        &self.address
    }

    /// Run `ctr` against this containerd, killed after `limit`.
    pub fn ctr(&self, args: &[&str], limit: Duration) -> Output {
        self.ctr_in(NAMESPACE, args, limit)
    }

    /// [`TestContainerd::ctr`] in containerd namespace `namespace`.
    pub fn ctr_in(&self, namespace: &str, args: &[&str], limit: Duration) -> Output {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address").arg(&self.address).arg("--namespace").arg(namespace).args(args);
        run_bounded(cmd, limit)
    }

    /// Import the busybox image and the pause image (busybox whose entrypoint sleeps forever)
    /// into CRI's namespace, unpacked for [`SNAPSHOTTER`].
    pub fn import_cri_images(&self) {
        let work = self.dir.path();
        let images = [
            build_image(work, BUSYBOX_IMAGE, None).unwrap_or_else(|e| panic!("build the busybox image: {e}")),
            build_image(work, PAUSE_IMAGE, Some(PAUSE_ENTRYPOINT))
                .unwrap_or_else(|e| panic!("build the pause image: {e}")),
        ];
        for tar in images {
            let out = self.ctr_in(
                CRI_NAMESPACE,
                &["images", "import", "--snapshotter", SNAPSHOTTER, &tar.to_string_lossy()],
                Duration::from_secs(120),
            );
            assert!(out.status.success(), "ctr images import (k8s.io) failed: {}\n{}", stderr(&out), self.logs());
        }
    }

    /// Build the busybox image (see [`build_busybox_image`]) and import it.
    pub fn import_busybox(&self) {
        let tar = build_busybox_image(self.dir.path()).unwrap_or_else(|e| panic!("build the busybox image: {e}"));
        let out = self
            .ctr(&["images", "import", "--snapshotter", SNAPSHOTTER, &tar.to_string_lossy()], Duration::from_secs(120));
        assert!(out.status.success(), "ctr images import failed: {}\n{}", stderr(&out), self.logs());
    }

    /// `ctr run --rm` with tern's runtime; returns ctr's output.
    pub fn run_rm(&self, id: &str, argv: &[&str], limit: Duration) -> Output {
        self.ctr(&ctr_run_args(&["--rm"], id, argv), limit)
    }

    /// Pids of shims serving this containerd.
    pub fn shim_pids(&self) -> Vec<i32> {
        let needle = self.address.to_string_lossy().into_owned();
        let mut pids = Vec::new();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
            let cmdline = String::from_utf8_lossy(&cmdline);
            if cmdline.contains("containerd-shim-tern-v2") && cmdline.contains(&needle) {
                pids.push(pid);
            }
        }
        pids
    }

    /// Wait until no shim of this containerd is left (they exit after their last task).
    pub fn wait_no_shims(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.shim_pids().is_empty() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    /// What this containerd's shims are doing, for failure messages about a stall: every
    /// thread's name, state and kernel wait channel, and from sandbox `sandbox`'s metrics
    /// socket the VM's vCPU-exit and vsock counters, whether its agent answers and its load.
    pub fn shim_report(&self, sandbox: &str) -> String {
        let mut report = String::new();
        for pid in self.shim_pids() {
            report.push_str(&format!("shim {pid} threads (name state wchan):\n"));
            let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten();
            for task in tasks {
                let read = |name: &str| std::fs::read_to_string(task.path().join(name)).unwrap_or_default();
                let stat = read("stat");
                // The state follows the parenthesised name, which may contain spaces.
                let state = stat.rsplit_once(") ").and_then(|(_, rest)| rest.split(' ').next()).unwrap_or("?");
                report.push_str(&format!("  {} {state} {}\n", read("comm").trim_end(), read("wchan")));
            }
        }
        // KVM's own counters (debugfs, where mounted): do vCPU exits still happen inside the
        // kernel while none reaches the VMM? KVM names a VM's directory "<tid>-<fd>" after the
        // thread that created it, which may be gone: every VM is listed.
        {
            let vms = std::fs::read_dir("/sys/kernel/debug/kvm").into_iter().flatten().flatten();
            for vm in vms.filter(|e| e.path().is_dir() && e.file_name().to_string_lossy().contains('-')) {
                let stats: Vec<String> = KVM_DEBUGFS_STATS
                    .iter()
                    .filter_map(|name| {
                        let value = std::fs::read_to_string(vm.path().join(name)).ok()?;
                        Some(format!("{name}={}", value.trim()))
                    })
                    .collect();
                report.push_str(&format!("kvm {}: {}\n", vm.file_name().to_string_lossy(), stats.join(" ")));
            }
        }
        // The shim's metrics socket, asked the way `tern monitor` asks it.
        let root = Path::new(tern_runtime::config::DEFAULT_ROOT_DIR);
        let socket =
            tern_runtime::metrics::sbs::sbs_root(root).join(sandbox).join(tern_runtime::metrics::sbs::MONITOR_SOCKET);
        let metrics =
            tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string()).and_then(
                |rt| {
                    rt.block_on(tern_runtime::metrics::http::get_unix(&socket, "/metrics", Duration::from_secs(10)))
                        .map_err(|e| e.to_string())
                },
            );
        match metrics {
            Ok((_, body)) => {
                report.push_str("sandbox metrics (vCPU exits, vsock, agent up, guest load):\n");
                let body = String::from_utf8_lossy(&body);
                for line in body.lines().filter(|l| {
                    !l.starts_with('#') && ["vsock", "exits", "agent_up", "guest_load"].iter().any(|k| l.contains(k))
                }) {
                    report.push_str(&format!("  {line}\n"));
                }
            }
            Err(e) => report.push_str(&format!("no metrics from {}: {e}\n", socket.display())),
        }
        report
    }

    /// Mount points under this instance's temp dir.
    pub fn mounts_left(&self) -> Vec<String> {
        let prefix = self.dir.path().to_string_lossy().into_owned();
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        info.lines().filter_map(|l| l.split(' ').nth(4)).filter(|m| m.starts_with(&prefix)).map(str::to_owned).collect()
    }
}

impl Drop for TestContainerd {
    fn drop(&mut self) {
        for pid in self.shim_pids() {
            // SAFETY: kill(2) on a shim of our own containerd (matched by its socket address).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on the containerd we spawned and have not reaped yet.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        // Deepest first, so nested mounts go before their parents.
        let mut mounts = self.mounts_left();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        // Bounded like every other command here: a cleanup that hangs would hide the test's result.
        for m in mounts {
            let mut umount = Command::new("umount");
            umount.arg("-l").arg(&m);
            run_cleanup_command(umount, Duration::from_secs(10));
        }
        if Path::new("/sys/class/net").join(CNI_BRIDGE).exists() {
            let mut ip = Command::new("ip");
            ip.args(["link", "delete", CNI_BRIDGE]);
            run_cleanup_command(ip, Duration::from_secs(10));
        }
    }
}

/// The CRI plugin's section of containerd's config: everything under `root`, the `native`
/// snapshotter, no cgroup, AppArmor or OOM-score needs (the runner has no systemd and may
/// not allow them), the pause image built by [`TestContainerd::import_cri_images`], CNI
/// plugins from Debian's `containernetworking-plugins`, a random streaming port, and tern
/// registered as runtime handler [`CRI_HANDLER`] (runc stays the default, for comparisons).
pub fn cri_plugin_config(root: &Path) -> String {
    format!(
        r#"[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  disable_cgroup = true
  disable_apparmor = true
  restrict_oom_score_adj = true
  enable_selinux = false
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "{SNAPSHOTTER}"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.{CRI_HANDLER}]
      runtime_type = "{TERN_RUNTIME}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{root}/cni"
    max_conf_num = 1
"#,
        root = root.display()
    )
}

/// A bridge + host-local network with the bridge as the pods' gateway and default route, as a
/// node's CNI config has it (tern connects the pod's VM to the namespace CRI sets up with it);
/// IPAM state under `root`.
fn cni_conflist(root: &Path) -> String {
    format!(
        r#"{{"cniVersion": "0.4.0", "name": "tern-test", "plugins": [
  {{"type": "bridge", "bridge": "{CNI_BRIDGE}", "isGateway": true, "ipMasq": false,
    "ipam": {{"type": "host-local", "ranges": [[{{"subnet": "10.88.77.0/24"}}]], "routes": [{{"dst": "0.0.0.0/0"}}],
             "dataDir": "{root}/cni-ipam"}}}}
]}}
"#,
        root = root.display()
    )
}

/// A cleanup command for `Drop`: bounded by `limit` (then killed), output discarded, and it
/// never panics (a panic while a failed test unwinds would abort and lose its report).
fn run_cleanup_command(mut cmd: Command, limit: Duration) {
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    let Ok(mut child) = cmd.spawn() else { return };
    let deadline = Instant::now() + limit;
    while matches!(child.try_wait(), Ok(None)) {
        if Instant::now() >= deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.wait();
}

/// Run a command with a time limit; a hung command is killed and reported as failed.
pub fn run_bounded(mut cmd: Command, limit: Duration) -> Output {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let pid = child.id() as i32;
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if done_rx.recv_timeout(limit).is_err() {
            // SAFETY: kill(2) on our child, not yet waited for, so its pid is not reused.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    });
    let out = child.wait_with_output().unwrap_or_else(|e| panic!("waiting for {cmd:?}: {e}"));
    let _ = done_tx.send(());
    let _ = watchdog.join();
    out
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn sha256_hex(data: &[u8]) -> String {
    let digest = Sha256::digest(data);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Write `data` as a blob of the OCI layout at `layout`; returns (digest, size).
fn write_blob(layout: &Path, data: &[u8]) -> std::io::Result<(String, usize)> {
    let hex = sha256_hex(data);
    std::fs::write(layout.join("blobs/sha256").join(&hex), data)?;
    Ok((format!("sha256:{hex}"), data.len()))
}

fn run_ok(cmd: &mut Command) -> std::io::Result<Vec<u8>> {
    let out = cmd.output()?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr))));
    }
    Ok(out.stdout)
}

/// Build the busybox OCI image archive ([`BUSYBOX_IMAGE`]) under `work`; see [`build_image`].
pub fn build_busybox_image(work: &Path) -> std::io::Result<PathBuf> {
    build_image(work, BUSYBOX_IMAGE, None)
}

/// Build an OCI image archive named `name` under `work`: busybox-static rootfs → gzip layer →
/// config (with `entrypoint` if given), manifest, `index.json` with the
/// `io.containerd.image.name` annotation. Returns its path.
pub fn build_image(work: &Path, name: &str, entrypoint: Option<&[&str]>) -> std::io::Result<PathBuf> {
    let slug: String = name.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    let rootfs = work.join("image-rootfs");
    for dir in ["bin", "dev", "proc", "sys", "etc", "tmp", "root", "run"] {
        std::fs::create_dir_all(rootfs.join(dir))?;
    }
    if !rootfs.join("bin/busybox").exists() {
        std::fs::copy("/bin/busybox", rootfs.join("bin/busybox"))?;
        for applet in APPLETS {
            symlink("busybox", rootfs.join("bin").join(applet))?;
        }
    }
    std::fs::write(rootfs.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")?;
    std::fs::write(rootfs.join("etc/group"), "root:x:0:\n")?;
    let layer_tar = run_ok(
        Command::new("tar")
            .args(["--numeric-owner", "--owner=0", "--group=0", "--sort=name", "-C"])
            .arg(&rootfs)
            .args(["-cf", "-", "."]),
    )?;
    let diff_id = format!("sha256:{}", sha256_hex(&layer_tar));
    let mut gzip = Command::new("gzip").args(["-n", "-c"]).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn()?;
    let mut gz_in = gzip.stdin.take().ok_or_else(|| std::io::Error::other("gzip stdin"))?;
    let feeder = std::thread::spawn(move || gz_in.write_all(&layer_tar));
    let gz = gzip.wait_with_output()?.stdout;
    feeder.join().map_err(|_| std::io::Error::other("gzip feeder panicked"))??;

    let layout = work.join(format!("image-layout-{slug}"));
    std::fs::create_dir_all(layout.join("blobs/sha256"))?;
    let (layer_digest, layer_size) = write_blob(&layout, &gz)?;
    let (entrypoint, cmd) = match entrypoint {
        Some(argv) => (serde_json_array(argv), "[]".to_owned()),
        None => ("null".to_owned(), r#"["/bin/sh"]"#.to_owned()),
    };
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{{"Env":["PATH=/bin"],"Entrypoint":{entrypoint},"Cmd":{cmd},"WorkingDir":"/"}},"rootfs":{{"type":"layers","diff_ids":["{diff_id}"]}}}}"#
    );
    let (config_digest, config_size) = write_blob(&layout, config.as_bytes())?;
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_digest}","size":{config_size}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{layer_digest}","size":{layer_size}}}]}}"#
    );
    let (manifest_digest, manifest_size) = write_blob(&layout, manifest.as_bytes())?;
    let index = format!(
        r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{manifest_digest}","size":{manifest_size},"annotations":{{"io.containerd.image.name":"{name}","org.opencontainers.image.ref.name":"test"}}}}]}}"#
    );
    std::fs::write(layout.join("index.json"), index)?;
    std::fs::write(layout.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)?;
    let archive = work.join(format!("{slug}.tar"));
    run_ok(Command::new("tar").arg("-C").arg(&layout).arg("-cf").arg(&archive).arg("."))?;
    Ok(archive)
}

/// A JSON array of plain strings (no quotes or backslashes in the test's arguments).
fn serde_json_array(items: &[&str]) -> String {
    let quoted: Vec<String> = items.iter().map(|i| format!("{i:?}")).collect();
    format!("[{}]", quoted.join(","))
}
