//! Pods through CRI for the tests: a blocking wrapper around `tern_runtime::cri` (the project's
//! own CRI client), pod and container configs shaped like kubelet's, kubelet's secret-volume
//! layout and its atomic update, and a reader for CRI's container log format.

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tern_runtime::cri::{self, api, CriClient};

use crate::containerd::TestContainerd;

/// Per-request deadline: a RunPodSandbox boots a VM, slow under the runner's emulation.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);

/// Bound on one connect + `Version` probe in [`Cri::connect`] and on one `ImageStatus` in
/// [`Cri::wait_image`]: both are local and cheap, so a wedged daemon shows as a failure with
/// containerd's log instead of a [`REQUEST_TIMEOUT`]-long silence.
const PROBE_TIMEOUT: Duration = Duration::from_secs(20);

/// A CRI client with its own tokio runtime, for synchronous tests.
pub struct Cri {
    rt: tokio::runtime::Runtime,
    client: CriClient,
    version: api::VersionResponse,
}

impl Cri {
    /// Connect to `ctrd`'s CRI endpoint and wait until `Version` answers (the CRI plugin may
    /// start serving a moment after containerd's own API).
    pub fn connect(ctrd: &TestContainerd) -> Cri {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("tokio runtime: {e}"));
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let attempt = rt.block_on(async {
                let probe = async {
                    let client = cri::connect_with_timeout(ctrd.address(), REQUEST_TIMEOUT).await?;
                    client.version().await.map(|v| (client, v))
                };
                match tokio::time::timeout(PROBE_TIMEOUT, probe).await {
                    Ok(result) => result.map_err(|e| e.to_string()),
                    Err(_) => Err(format!("no answer to Version within {PROBE_TIMEOUT:?}")),
                }
            });
            match attempt {
                Ok((client, version)) => {
                    eprintln!(
                        "CRI: {} {} (API {})",
                        version.runtime_name, version.runtime_version, version.runtime_api_version
                    );
                    return Cri { rt, client, version };
                }
                Err(e) if Instant::now() < deadline => {
                    eprintln!("CRI not ready yet: {e}");
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(e) => panic!("CRI never answered: {e}\n{}", ctrd.logs()),
            }
        }
    }

    /// Run one client call to completion.
    pub fn call<T, F>(&self, f: impl FnOnce(CriClient) -> F) -> Result<T, cri::CriError>
    where
        F: std::future::Future<Output = Result<T, cri::CriError>>,
    {
        self.rt.block_on(f(self.client.clone()))
    }

    /// CreateContainer of `config` in `sandbox`, then StartContainer; the container's id. The
    /// error names the RPC that failed.
    pub fn create_and_start(
        &self,
        sandbox: &str,
        config: api::ContainerConfig,
        pod: api::PodSandboxConfig,
    ) -> Result<String, cri::CriError> {
        let sandbox = sandbox.to_owned();
        self.rt.block_on(async {
            let id = self.client.create_container(&sandbox, config, pod).await?;
            self.client.start_container(&id).await?;
            Ok(id)
        })
    }

    /// The runtime's `Version` answer (name and version of containerd).
    pub fn version(&self) -> &api::VersionResponse {
        &self.version
    }

    pub fn client(&self) -> &CriClient {
        &self.client
    }

    /// Run a future on this client's runtime (e.g. several pods concurrently).
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// Wait until CRI's image store lists `image` (it learns of imports through events).
    pub fn wait_image(&self, image: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            // The timer must be created inside the runtime: hence the async block.
            let status =
                self.rt.block_on(async { tokio::time::timeout(PROBE_TIMEOUT, self.client.image_status(image)).await });
            match status {
                Ok(Ok(Some(_))) => return,
                Ok(Ok(None)) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
                Err(_) => panic!("CRI did not answer ImageStatus({image}) within {PROBE_TIMEOUT:?}"),
                other => panic!("CRI does not know image {image} after {limit:?}: {other:?}"),
            }
        }
    }
}

/// A pod started through CRI by [`Cri::run_pod`].
pub struct TestPod {
    pub sandbox: String,
    pub config: api::PodSandboxConfig,
    /// The pod's CRI log directory (container logs are relative to it).
    pub log_dir: PathBuf,
}

impl Cri {
    /// [`Cri::run_pod`] with tern's handler.
    pub fn run_tern_pod(&self, ctrd: &TestContainerd, name: &str, uid: &str, namespace: &str) -> TestPod {
        self.run_pod(ctrd, name, uid, namespace, crate::containerd::CRI_HANDLER)
    }

    /// Wait for the busybox and pause images, then RunPodSandbox of pod `namespace/name` (uid
    /// `uid`) with runtime handler `handler`; its log directory is
    /// `<ctrd dir>/logs/<ns>_<name>_<uid>`.
    pub fn run_pod(&self, ctrd: &TestContainerd, name: &str, uid: &str, namespace: &str, handler: &str) -> TestPod {
        self.wait_image(crate::containerd::BUSYBOX_IMAGE, Duration::from_secs(30));
        self.wait_image(crate::containerd::PAUSE_IMAGE, Duration::from_secs(30));
        let log_dir = ctrd.dir().join("logs").join(format!("{namespace}_{name}_{uid}"));
        std::fs::create_dir_all(&log_dir).unwrap_or_else(|e| panic!("pod log dir: {e}"));
        let config = pod_config(name, uid, namespace, &log_dir);
        let (pod, handler) = (config.clone(), handler.to_owned());
        let sandbox = self
            .call(|c| async move { c.run_pod_sandbox(pod, &handler).await })
            .unwrap_or_else(|e| panic!("RunPodSandbox {name}: {e}\n{}", ctrd.logs()));
        TestPod { sandbox, config, log_dir }
    }

    /// [`Cri::remove_pod`], then wait until no shim is left (the pod's was the last).
    pub fn stop_and_remove(&self, ctrd: &TestContainerd, sandbox: &str) {
        self.remove_pod(ctrd, sandbox);
        assert!(ctrd.wait_no_shims(Duration::from_secs(60)), "the pod's shim outlived the pod\n{}", ctrd.logs());
    }

    /// StopPodSandbox and RemovePodSandbox.
    pub fn remove_pod(&self, ctrd: &TestContainerd, sandbox: &str) {
        let sb = sandbox.to_owned();
        self.call(|c| async move { c.stop_pod_sandbox(&sb).await })
            .unwrap_or_else(|e| panic!("StopPodSandbox: {e}\n{}", ctrd.logs()));
        let sb = sandbox.to_owned();
        self.call(|c| async move { c.remove_pod_sandbox(&sb).await })
            .unwrap_or_else(|e| panic!("RemovePodSandbox: {e}\n{}", ctrd.logs()));
    }
}

fn namespaces(pid: api::NamespaceMode) -> api::NamespaceOption {
    api::NamespaceOption {
        network: api::NamespaceMode::Pod as i32,
        pid: pid as i32,
        ipc: api::NamespaceMode::Pod as i32,
        ..Default::default()
    }
}

/// A pod sandbox config as kubelet sends it: metadata, hostname, log directory, DNS (so CRI
/// writes resolv.conf itself), pod-level network and IPC, per-container PID namespaces.
pub fn pod_config(name: &str, uid: &str, namespace: &str, log_dir: &Path) -> api::PodSandboxConfig {
    api::PodSandboxConfig {
        metadata: Some(api::PodSandboxMetadata {
            name: name.to_owned(),
            uid: uid.to_owned(),
            namespace: namespace.to_owned(),
            attempt: 0,
        }),
        hostname: name.to_owned(),
        log_directory: log_dir.to_string_lossy().into_owned(),
        dns_config: Some(api::DnsConfig {
            servers: vec!["10.96.0.10".to_owned()],
            searches: vec![format!("{namespace}.svc.cluster.local")],
            options: vec!["ndots:5".to_owned()],
        }),
        labels: [("app".to_owned(), name.to_owned())].into(),
        linux: Some(api::LinuxPodSandboxConfig {
            security_context: Some(api::LinuxSandboxSecurityContext {
                namespace_options: Some(namespaces(api::NamespaceMode::Container)),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A container config: `image`, `argv` as the command, log at `log_path` (relative to the
/// pod's log directory), `mounts` as (host path, container path, read-only).
pub fn container_config(
    name: &str,
    image: &str,
    argv: &[&str],
    log_path: &str,
    mounts: &[(&Path, &str, bool)],
) -> api::ContainerConfig {
    api::ContainerConfig {
        metadata: Some(api::ContainerMetadata { name: name.to_owned(), attempt: 0 }),
        image: Some(api::ImageSpec { image: image.to_owned(), ..Default::default() }),
        command: argv.iter().map(|s| (*s).to_owned()).collect(),
        log_path: log_path.to_owned(),
        mounts: mounts
            .iter()
            .map(|(host, container, ro)| api::Mount {
                container_path: (*container).to_owned(),
                host_path: host.to_string_lossy().into_owned(),
                readonly: *ro,
                ..Default::default()
            })
            .collect(),
        linux: Some(api::LinuxContainerConfig {
            security_context: Some(api::LinuxContainerSecurityContext {
                namespace_options: Some(namespaces(api::NamespaceMode::Container)),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A secret volume laid out exactly as kubelet's atomic writer does it:
/// `<pod dir>/volumes/kubernetes.io~secret/<name>/` holding `..<timestamp>/` with the payload,
/// `..data` → that directory, and one user-visible symlink `<key>` → `..data/<key>` per key.
pub struct SecretVolume {
    dir: PathBuf,
    generation: u32,
}

impl SecretVolume {
    pub fn create(pod_dir: &Path, name: &str, payload: &[(&str, &str)]) -> SecretVolume {
        let dir = pod_dir.join("volumes/kubernetes.io~secret").join(name);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("secret dir: {e}"));
        let mut volume = SecretVolume { dir, generation: 0 };
        volume.update(payload);
        volume
    }

    /// The volume directory (what kubelet hands CRI as the mount's host path).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Kubelet's update: payload into a new timestamped dir, `..data_tmp` renamed over
    /// `..data`, missing user-visible symlinks created, the old payload dir removed.
    pub fn update(&mut self, payload: &[(&str, &str)]) {
        self.generation += 1;
        let ts = format!("..2026_11_26_15_00_00.{:09}", self.generation);
        let new = self.dir.join(&ts);
        std::fs::create_dir(&new).unwrap_or_else(|e| panic!("payload dir: {e}"));
        for (key, value) in payload {
            std::fs::write(new.join(key), value).unwrap_or_else(|e| panic!("payload: {e}"));
        }
        let old = std::fs::read_link(self.dir.join("..data")).ok();
        symlink(&ts, self.dir.join("..data_tmp")).unwrap_or_else(|e| panic!("..data_tmp: {e}"));
        std::fs::rename(self.dir.join("..data_tmp"), self.dir.join("..data")).unwrap_or_else(|e| panic!("..data: {e}"));
        for (key, _) in payload {
            if std::fs::symlink_metadata(self.dir.join(key)).is_err() {
                symlink(format!("..data/{key}"), self.dir.join(key)).unwrap_or_else(|e| panic!("key link: {e}"));
            }
        }
        if let Some(old) = old {
            std::fs::remove_dir_all(self.dir.join(old)).unwrap_or_else(|e| panic!("old payload: {e}"));
        }
    }
}

/// The content of every complete line of a CRI container log
/// (`<RFC3339 time> <stdout|stderr> <F|P> <content>`; partial `P` lines are joined).
pub fn read_cri_log(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut lines = Vec::new();
    let mut partial = String::new();
    for line in text.lines() {
        let mut fields = line.splitn(4, ' ');
        let (Some(_time), Some(_stream), Some(tag), content) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        partial.push_str(content.unwrap_or(""));
        if tag == "F" {
            lines.push(std::mem::take(&mut partial));
        }
    }
    lines
}

/// Wait until the log at `path` has a line satisfying `want`; returns it. Panics with the log
/// and `context` after `limit`.
pub fn wait_log_line(
    path: &Path,
    limit: Duration,
    context: &dyn Fn() -> String,
    want: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(line) = read_cri_log(path).into_iter().find(|l| want(l)) {
            return line;
        }
        if Instant::now() >= deadline {
            panic!(
                "no matching line in {} after {limit:?}; log:\n{:?}\n{}",
                path.display(),
                read_cri_log(path),
                context()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cri_log_lines_are_parsed_and_partials_joined() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c.log");
        std::fs::write(
            &p,
            "2026-11-26T15:00:00.1Z stdout F hello world\n\
             2026-11-26T15:00:00.2Z stdout P par\n\
             2026-11-26T15:00:00.3Z stdout F tial\n\
             2026-11-26T15:00:00.4Z stderr F \n",
        )
        .unwrap();
        assert_eq!(read_cri_log(&p), ["hello world", "partial", ""]);
    }

    #[test]
    fn secret_volume_is_laid_out_like_kubelet() {
        let d = tempfile::tempdir().unwrap();
        let mut v = SecretVolume::create(d.path(), "tok", &[("key", "v1")]);
        assert_eq!(v.dir(), d.path().join("volumes/kubernetes.io~secret/tok"));
        let data = std::fs::read_link(v.dir().join("..data")).unwrap();
        assert!(data.to_string_lossy().starts_with("..2026_"), "{data:?}");
        assert_eq!(std::fs::read_link(v.dir().join("key")).unwrap(), Path::new("..data/key"));
        assert_eq!(std::fs::read_to_string(v.dir().join("key")).unwrap(), "v1");
        v.update(&[("key", "v2")]);
        assert_eq!(std::fs::read_to_string(v.dir().join("key")).unwrap(), "v2");
        assert!(!v.dir().join(&data).exists(), "old payload dir must be gone");
        let entries = std::fs::read_dir(v.dir()).unwrap().count();
        assert_eq!(entries, 3, "payload dir, ..data, key");
    }
}
