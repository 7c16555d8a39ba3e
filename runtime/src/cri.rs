//! A small typed client for the Kubernetes Container Runtime Interface (CRI v1) over a unix
//! socket.
//!
//! Two users need it: `tern monitor`, which asks the container manager (containerd's CRI plugin)
//! only for *pod metadata* of sandboxes it already knows from the sandbox directory (Kata's
//! lesson: the sandbox directory is the truth, CRI is a label source), and the integration tests,
//! which drive pods through the same RPCs kubelet uses (RunPodSandbox, CreateContainer, …).
//!
//! The wire types come from the `k8s-cri` crate (generated from the upstream protobuf); they are
//! re-exported as [`api`] so callers build requests without naming the dependency. Every RPC
//! error becomes a [`CriError`] naming the RPC, so a failure in a test or in the monitor's log
//! says which call failed and why.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// The CRI v1 wire types (requests, responses, configs).
pub use k8s_cri::v1 as api;

/// containerd's default socket; its CRI plugin serves on the same socket as containerd's own API.
pub const DEFAULT_CRI_SOCKET: &str = "/run/containerd/containerd.sock";

/// The per-request deadline used by [`connect`]: long enough for a pod start under emulation,
/// short enough that a wedged daemon does not hang a caller forever.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// Errors of the CRI client.
#[derive(Debug, thiserror::Error)]
pub enum CriError {
    /// The socket path does not exist: no daemon, or its CRI plugin is disabled.
    #[error(
        "CRI socket {} does not exist (is containerd running, with its CRI plugin enabled?)",
        .0.display()
    )]
    SocketMissing(PathBuf),
    /// The socket exists but the connection or the HTTP/2 handshake failed.
    #[error("cannot connect to the CRI endpoint {}: {detail}", socket.display())]
    Connect {
        /// The socket that was dialled.
        socket: PathBuf,
        /// The transport error with its whole cause chain.
        detail: String,
    },
    /// The daemon answered the RPC with an error status (or the request timed out).
    #[error("CRI {rpc} failed: {code:?}: {message}")]
    Rpc {
        /// The RPC's name, e.g. `RunPodSandbox`.
        rpc: &'static str,
        /// The gRPC status code.
        code: tonic::Code,
        /// The status message from the daemon.
        message: String,
    },
    /// The daemon answered, but without a field the protocol promises.
    #[error("CRI {rpc} returned no {field}")]
    MissingField {
        /// The RPC's name.
        rpc: &'static str,
        /// The missing field.
        field: &'static str,
    },
}

impl CriError {
    /// The gRPC status code when the daemon answered with an error status.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            CriError::Rpc { code, .. } => Some(*code),
            _ => None,
        }
    }

    fn rpc(rpc: &'static str) -> impl FnOnce(tonic::Status) -> CriError {
        move |status| CriError::Rpc { rpc, code: status.code(), message: status.message().to_string() }
    }
}

/// The Kubernetes identity of a pod, as CRI reports it for one sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodMeta {
    /// The pod's UID (`metadata.uid`).
    pub uid: String,
    /// The pod's name.
    pub name: String,
    /// The pod's namespace.
    pub namespace: String,
    /// Whether the sandbox is in state `SANDBOX_READY`.
    pub ready: bool,
}

impl PodMeta {
    /// The metadata of one `ListPodSandbox` item (empty strings when CRI sent no metadata).
    pub fn from_sandbox(sandbox: &api::PodSandbox) -> PodMeta {
        let md = sandbox.metadata.clone().unwrap_or_default();
        PodMeta {
            uid: md.uid,
            name: md.name,
            namespace: md.namespace,
            ready: sandbox.state == api::PodSandboxState::SandboxReady as i32,
        }
    }
}

/// One pod sandbox as listed by CRI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxInfo {
    /// The sandbox id (containerd's id of the pause container = tern's sandbox id).
    pub id: String,
    /// The pod it belongs to.
    pub meta: PodMeta,
    /// The runtime handler the pod was started with (`""` = the default runtime).
    pub runtime_handler: String,
}

/// A connected CRI client (runtime and image services over one HTTP/2 connection).
///
/// Cloning is cheap and clones share the connection.
#[derive(Clone)]
pub struct CriClient {
    runtime: RuntimeServiceClient<Channel>,
    image: ImageServiceClient<Channel>,
    socket: PathBuf,
}

impl std::fmt::Debug for CriClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CriClient").field("socket", &self.socket).finish()
    }
}

/// Connects to the CRI endpoint at `socket` with [`DEFAULT_REQUEST_TIMEOUT`] per request.
pub async fn connect(socket: &Path) -> Result<CriClient, CriError> {
    connect_with_timeout(socket, DEFAULT_REQUEST_TIMEOUT).await
}

/// Connects to the CRI endpoint at `socket`; every request fails with `DeadlineExceeded` after
/// `request_timeout` (the monitor uses a short one so a wedged daemon costs one label lookup).
pub async fn connect_with_timeout(socket: &Path, request_timeout: Duration) -> Result<CriClient, CriError> {
    if !socket.exists() {
        return Err(CriError::SocketMissing(socket.to_path_buf()));
    }
    // The URI is required by tonic but unused: the connector below ignores it and dials the
    // unix socket.
    let endpoint =
        Endpoint::from_static("http://[::1]:0").connect_timeout(Duration::from_secs(10)).timeout(request_timeout);
    let path = socket.to_path_buf();
    let channel = endpoint
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
        .map_err(|e| CriError::Connect { socket: socket.to_path_buf(), detail: error_chain(&e) })?;
    tracing::debug!(socket = %socket.display(), "connected to CRI");
    Ok(CriClient {
        runtime: RuntimeServiceClient::new(channel.clone()),
        image: ImageServiceClient::new(channel),
        socket: socket.to_path_buf(),
    })
}

// Errors carry all their sources (tonic's transport error alone says only "transport error").
use crate::sandbox::error_chain;

impl CriClient {
    /// The socket this client is connected to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `Version`: the runtime's name and version (a cheap liveness check).
    pub async fn version(&self) -> Result<api::VersionResponse, CriError> {
        let req = api::VersionRequest { version: "v1".into() };
        Ok(self.runtime.clone().version(req).await.map_err(CriError::rpc("Version"))?.into_inner())
    }

    /// `ListPodSandbox` without a filter: every sandbox CRI knows, ready or not.
    pub async fn list_pod_sandboxes(&self) -> Result<Vec<SandboxInfo>, CriError> {
        let items = self.list_pod_sandbox_raw(None).await?;
        Ok(items
            .iter()
            .map(|s| SandboxInfo {
                id: s.id.clone(),
                meta: PodMeta::from_sandbox(s),
                runtime_handler: s.runtime_handler.clone(),
            })
            .collect())
    }

    /// The pod metadata of sandbox `sandbox_id`, or `None` when CRI does not know it (yet).
    pub async fn pod_metadata(&self, sandbox_id: &str) -> Result<Option<PodMeta>, CriError> {
        let filter = api::PodSandboxFilter { id: sandbox_id.to_string(), ..Default::default() };
        let items = self.list_pod_sandbox_raw(Some(filter)).await?;
        // containerd matches the id filter by prefix: insist on the exact id.
        Ok(items.iter().find(|s| s.id == sandbox_id).map(PodMeta::from_sandbox))
    }

    async fn list_pod_sandbox_raw(
        &self,
        filter: Option<api::PodSandboxFilter>,
    ) -> Result<Vec<api::PodSandbox>, CriError> {
        Ok(self
            .runtime
            .clone()
            .list_pod_sandbox(api::ListPodSandboxRequest { filter })
            .await
            .map_err(CriError::rpc("ListPodSandbox"))?
            .into_inner()
            .items)
    }

    /// `RunPodSandbox` with `config` on runtime handler `handler` (`""` = default); returns the
    /// sandbox id.
    pub async fn run_pod_sandbox(&self, config: api::PodSandboxConfig, handler: &str) -> Result<String, CriError> {
        let req = api::RunPodSandboxRequest { config: Some(config), runtime_handler: handler.to_string() };
        let id = self
            .runtime
            .clone()
            .run_pod_sandbox(req)
            .await
            .map_err(CriError::rpc("RunPodSandbox"))?
            .into_inner()
            .pod_sandbox_id;
        if id.is_empty() {
            return Err(CriError::MissingField { rpc: "RunPodSandbox", field: "pod_sandbox_id" });
        }
        Ok(id)
    }

    /// `PodSandboxStatus` of `sandbox_id`.
    pub async fn pod_sandbox_status(&self, sandbox_id: &str) -> Result<api::PodSandboxStatus, CriError> {
        let req = api::PodSandboxStatusRequest { pod_sandbox_id: sandbox_id.to_string(), verbose: false };
        self.runtime
            .clone()
            .pod_sandbox_status(req)
            .await
            .map_err(CriError::rpc("PodSandboxStatus"))?
            .into_inner()
            .status
            .ok_or(CriError::MissingField { rpc: "PodSandboxStatus", field: "status" })
    }

    /// `StopPodSandbox`: stops every container of the pod and the sandbox itself.
    pub async fn stop_pod_sandbox(&self, sandbox_id: &str) -> Result<(), CriError> {
        let req = api::StopPodSandboxRequest { pod_sandbox_id: sandbox_id.to_string() };
        self.runtime.clone().stop_pod_sandbox(req).await.map_err(CriError::rpc("StopPodSandbox"))?;
        Ok(())
    }

    /// `RemovePodSandbox`: removes the (stopped) pod and its containers.
    pub async fn remove_pod_sandbox(&self, sandbox_id: &str) -> Result<(), CriError> {
        let req = api::RemovePodSandboxRequest { pod_sandbox_id: sandbox_id.to_string() };
        self.runtime.clone().remove_pod_sandbox(req).await.map_err(CriError::rpc("RemovePodSandbox"))?;
        Ok(())
    }

    /// `CreateContainer` in sandbox `sandbox_id`; `sandbox_config` must be the config the
    /// sandbox was started with. Returns the container id.
    pub async fn create_container(
        &self,
        sandbox_id: &str,
        config: api::ContainerConfig,
        sandbox_config: api::PodSandboxConfig,
    ) -> Result<String, CriError> {
        let req = api::CreateContainerRequest {
            pod_sandbox_id: sandbox_id.to_string(),
            config: Some(config),
            sandbox_config: Some(sandbox_config),
        };
        let id = self
            .runtime
            .clone()
            .create_container(req)
            .await
            .map_err(CriError::rpc("CreateContainer"))?
            .into_inner()
            .container_id;
        if id.is_empty() {
            return Err(CriError::MissingField { rpc: "CreateContainer", field: "container_id" });
        }
        Ok(id)
    }

    /// `StartContainer`.
    pub async fn start_container(&self, container_id: &str) -> Result<(), CriError> {
        let req = api::StartContainerRequest { container_id: container_id.to_string() };
        self.runtime.clone().start_container(req).await.map_err(CriError::rpc("StartContainer"))?;
        Ok(())
    }

    /// `StopContainer`, killing after `timeout_s` seconds.
    pub async fn stop_container(&self, container_id: &str, timeout_s: i64) -> Result<(), CriError> {
        let req = api::StopContainerRequest { container_id: container_id.to_string(), timeout: timeout_s };
        self.runtime.clone().stop_container(req).await.map_err(CriError::rpc("StopContainer"))?;
        Ok(())
    }

    /// `RemoveContainer`.
    pub async fn remove_container(&self, container_id: &str) -> Result<(), CriError> {
        let req = api::RemoveContainerRequest { container_id: container_id.to_string() };
        self.runtime.clone().remove_container(req).await.map_err(CriError::rpc("RemoveContainer"))?;
        Ok(())
    }

    /// `ContainerStatus` of `container_id`.
    pub async fn container_status(&self, container_id: &str) -> Result<api::ContainerStatus, CriError> {
        let req = api::ContainerStatusRequest { container_id: container_id.to_string(), verbose: false };
        self.runtime
            .clone()
            .container_status(req)
            .await
            .map_err(CriError::rpc("ContainerStatus"))?
            .into_inner()
            .status
            .ok_or(CriError::MissingField { rpc: "ContainerStatus", field: "status" })
    }

    /// `ListContainers` of one sandbox (`Some(id)`) or of all (`None`).
    pub async fn list_containers(&self, sandbox_id: Option<&str>) -> Result<Vec<api::Container>, CriError> {
        let filter = sandbox_id.map(|id| api::ContainerFilter { pod_sandbox_id: id.to_string(), ..Default::default() });
        Ok(self
            .runtime
            .clone()
            .list_containers(api::ListContainersRequest { filter })
            .await
            .map_err(CriError::rpc("ListContainers"))?
            .into_inner()
            .containers)
    }

    /// `ImageStatus` of `image`: `None` when the image is not present.
    pub async fn image_status(&self, image: &str) -> Result<Option<api::Image>, CriError> {
        let req = api::ImageStatusRequest {
            image: Some(api::ImageSpec { image: image.to_string(), ..Default::default() }),
            verbose: false,
        };
        Ok(self.image.clone().image_status(req).await.map_err(CriError::rpc("ImageStatus"))?.into_inner().image)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_socket_is_a_clear_error() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("nope.sock");
        let err = rt.block_on(connect(&sock)).unwrap_err();
        assert!(matches!(err, CriError::SocketMissing(ref p) if p == &sock), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains(&sock.display().to_string()), "{msg}");
        assert!(msg.contains("does not exist"), "{msg}");
    }

    #[test]
    fn a_socket_nobody_listens_on_is_a_connect_error() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("stale.sock");
        // Bind and drop the listener: the socket file stays, nobody accepts (ECONNREFUSED).
        drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
        let err = rt.block_on(connect(&sock)).unwrap_err();
        match &err {
            CriError::Connect { socket, detail } => {
                assert_eq!(socket, &sock);
                assert!(detail.to_lowercase().contains("refused"), "{detail}");
            }
            other => panic!("expected a connect error, got {other:?}"),
        }
    }

    #[test]
    fn a_non_grpc_peer_fails_the_rpc_not_the_process() {
        // A listener that accepts and closes immediately: the HTTP/2 handshake or the first RPC
        // must fail with an error, never hang or panic.
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("closer.sock");
        rt.block_on(async {
            let listener = tokio::net::UnixListener::bind(&sock).unwrap();
            tokio::spawn(async move {
                while let Ok((s, _)) = listener.accept().await {
                    drop(s);
                }
            });
            match connect_with_timeout(&sock, Duration::from_secs(5)).await {
                Err(CriError::Connect { .. }) => {}
                Err(other) => panic!("unexpected error kind: {other:?}"),
                Ok(client) => {
                    let err = client.version().await.unwrap_err();
                    assert!(matches!(err, CriError::Rpc { rpc: "Version", .. }), "{err:?}");
                }
            }
        });
    }

    #[test]
    fn pod_meta_from_sandbox() {
        let sb = api::PodSandbox {
            id: "abc".into(),
            metadata: Some(api::PodSandboxMetadata {
                name: "web".into(),
                uid: "u-1".into(),
                namespace: "prod".into(),
                attempt: 0,
            }),
            state: api::PodSandboxState::SandboxNotready as i32,
            ..Default::default()
        };
        let m = PodMeta::from_sandbox(&sb);
        assert_eq!(m, PodMeta { uid: "u-1".into(), name: "web".into(), namespace: "prod".into(), ready: false });
        let ready = api::PodSandbox { state: api::PodSandboxState::SandboxReady as i32, ..sb };
        assert!(PodMeta::from_sandbox(&ready).ready);
    }
}
