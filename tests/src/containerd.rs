//! A private containerd for end-to-end tests of `containerd-shim-tern-v2`.
//!
//! [`TestContainerd::start`] runs Debian's `containerd` as a plain background process with its
//! own `config.toml`, root, state and sockets under a temp dir (CRI and the snapshotters that
//! need special file systems disabled), and `target/release` first on its PATH so that
//! `--runtime io.containerd.tern.v2` finds the shim. [`TestContainerd::import_busybox`] builds a
//! one-layer OCI image from busybox-static and imports it. Dropping the instance kills every
//! shim it started, stops containerd, unmounts whatever is left under the temp dir and removes
//! it — also when the test failed.

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
/// busybox applets linked into the test image.
const APPLETS: [&str; 16] =
    ["sh", "echo", "sleep", "cat", "true", "false", "ls", "ps", "id", "env", "hostname", "head", "wc", "yes", "mount", "pwd"];

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

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(tool)).find(|p| p.is_file())
}

/// The shim under test, next to `tern`.
pub fn shim_bin() -> PathBuf {
    crate::tern_bin().with_file_name("containerd-shim-tern-v2")
}

/// A running private containerd. See the module docs.
pub struct TestContainerd {
    dir: tempfile::TempDir,
    child: Option<Child>,
    address: PathBuf,
}

impl TestContainerd {
    /// Start containerd and wait until `ctr version` answers.
    pub fn start() -> TestContainerd {
        let dir = tempfile::Builder::new().prefix("tern-ctrd-").tempdir_in("/tmp").unwrap_or_else(|e| panic!("temp dir: {e}"));
        let root = dir.path();
        let address = root.join("ctrd.sock");
        let config = format!(
            r#"version = 2
root = "{root}/root"
state = "{root}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.aufs"]
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[debug]
  level = "info"
"#,
            root = root.display(),
            sock = address.display()
        );
        std::fs::write(root.join("config.toml"), config).unwrap_or_else(|e| panic!("write config.toml: {e}"));
        // The shim's VM console goes to a file the test prints on failure.
        let tern_config = format!("[vm]\nconsole_log = \"{}\"\n", root.join("console.log").display());
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

    /// Run `ctr` against this containerd, killed after `limit`.
    pub fn ctr(&self, args: &[&str], limit: Duration) -> Output {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address").arg(&self.address).arg("--namespace").arg(NAMESPACE).args(args);
        run_bounded(cmd, limit)
    }

    /// Build the busybox image (see [`build_busybox_image`]) and import it.
    pub fn import_busybox(&self) {
        let tar = build_busybox_image(self.dir.path()).unwrap_or_else(|e| panic!("build the busybox image: {e}"));
        let out = self.ctr(
            &["images", "import", "--snapshotter", SNAPSHOTTER, &tar.to_string_lossy()],
            Duration::from_secs(120),
        );
        assert!(out.status.success(), "ctr images import failed: {}\n{}", stderr(&out), self.logs());
    }

    /// `ctr run --rm` with tern's runtime; returns ctr's output.
    pub fn run_rm(&self, id: &str, argv: &[&str], limit: Duration) -> Output {
        let mut args = vec!["run", "--rm", "--snapshotter", SNAPSHOTTER, "--runtime", TERN_RUNTIME, BUSYBOX_IMAGE, id];
        args.extend_from_slice(argv);
        self.ctr(&args, limit)
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
        for m in mounts {
            let _ = Command::new("umount").arg("-l").arg(&m).status();
        }
    }
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

/// Build an OCI image archive under `work`: busybox-static rootfs → gzip layer → config,
/// manifest, `index.json` with the `io.containerd.image.name` annotation. Returns its path.
pub fn build_busybox_image(work: &Path) -> std::io::Result<PathBuf> {
    let rootfs = work.join("image-rootfs");
    for dir in ["bin", "dev", "proc", "sys", "etc", "tmp", "root", "run"] {
        std::fs::create_dir_all(rootfs.join(dir))?;
    }
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox"))?;
    for applet in APPLETS {
        symlink("busybox", rootfs.join("bin").join(applet))?;
    }
    std::fs::write(rootfs.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")?;
    std::fs::write(rootfs.join("etc/group"), "root:x:0:\n")?;
    let layer_tar = run_ok(
        Command::new("tar").args(["--numeric-owner", "--owner=0", "--group=0", "--sort=name", "-C"]).arg(&rootfs).args(["-cf", "-", "."]),
    )?;
    let diff_id = format!("sha256:{}", sha256_hex(&layer_tar));
    let mut gzip = Command::new("gzip").args(["-n", "-c"]).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn()?;
    let mut gz_in = gzip.stdin.take().ok_or_else(|| std::io::Error::other("gzip stdin"))?;
    let feeder = std::thread::spawn(move || gz_in.write_all(&layer_tar));
    let gz = gzip.wait_with_output()?.stdout;
    feeder.join().map_err(|_| std::io::Error::other("gzip feeder panicked"))??;

    let layout = work.join("image-layout");
    std::fs::create_dir_all(layout.join("blobs/sha256"))?;
    let (layer_digest, layer_size) = write_blob(&layout, &gz)?;
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{{"Env":["PATH=/bin"],"Cmd":["/bin/sh"],"WorkingDir":"/"}},"rootfs":{{"type":"layers","diff_ids":["{diff_id}"]}}}}"#
    );
    let (config_digest, config_size) = write_blob(&layout, config.as_bytes())?;
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_digest}","size":{config_size}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{layer_digest}","size":{layer_size}}}]}}"#
    );
    let (manifest_digest, manifest_size) = write_blob(&layout, manifest.as_bytes())?;
    let index = format!(
        r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{manifest_digest}","size":{manifest_size},"annotations":{{"io.containerd.image.name":"{BUSYBOX_IMAGE}","org.opencontainers.image.ref.name":"test"}}}}]}}"#
    );
    std::fs::write(layout.join("index.json"), index)?;
    std::fs::write(layout.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)?;
    let archive = work.join("busybox-image.tar");
    run_ok(Command::new("tar").arg("-C").arg(&layout).arg("-cf").arg(&archive).arg("."))?;
    Ok(archive)
}
