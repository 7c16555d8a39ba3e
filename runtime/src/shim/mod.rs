//! `containerd-shim-tern-v2`: containerd's shim v2 with the VMM in the shim process.
//!
//! containerd runs the binary three ways (the shim v2 protocol): `start` spawns the long-lived
//! shim (one per sandbox) and prints its ttrpc address; the shim itself serves the Task API
//! ([`service`]); `delete` cleans up after a shim that died. One shim = one sandbox = one
//! microVM, booted at the first `Create`.

pub mod binds;
pub mod cleanup;
pub mod container;
pub mod errdefs;
pub mod events;
pub mod io;
pub mod resources;
pub mod service;

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim::asynchronous::{spawn, ExitSignal, Shim};
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Config as ShimConfig, Error as ShimError, Flags, StartOpts};
use containerd_shim_protos::api::DeleteResponse;
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::protobuf::MessageField;

use crate::config::Config;
use crate::metrics::timed_task::TimedTask;
use service::TaskService;

/// The runtime name containerd knows this shim by.
pub const RUNTIME_ID: &str = "io.containerd.tern.v2";
/// OCI annotation naming the pod sandbox a CRI container belongs to.
const CRI_SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
/// Exit status `delete` reports for a task whose shim died (as if SIGKILLed).
const DEAD_SHIM_EXIT_STATUS: u32 = 128 + 9;

/// The shim's lifecycle half (start, delete, wait); the Task API is [`TaskService`].
pub struct TernShim {
    exit: Arc<ExitSignal>,
    namespace: String,
    /// The container id containerd ran this binary for.
    id: String,
    bundle: String,
}

#[async_trait]
impl Shim for TernShim {
    type T = TimedTask<TaskService>;

    async fn new(_runtime_id: &str, args: &Flags, config: &mut ShimConfig) -> Self {
        // The shim starts no child processes that need reaping (the VM is in-process), and a
        // reaper would steal the mount helper's exit status from the containerd-shim crate.
        config.no_reaper = true;
        config.no_sub_reaper = true;
        TernShim {
            exit: Arc::new(ExitSignal::default()),
            namespace: args.namespace.clone(),
            id: args.id.clone(),
            bundle: args.bundle.clone(),
        }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> Result<String, ShimError> {
        // Run directories of shims and `tern run`s that died without cleaning up (SIGKILL)
        // and whose `delete` never came: only those whose owner process is really gone.
        crate::run_dir::reap_stale();
        // Containers of one pod share a shim (and a VM); others get their own.
        let grouping = sandbox_id_of_bundle(Path::new(".")).unwrap_or_else(|| opts.id.clone());
        let address = spawn(opts, &grouping, Vec::new()).await?;
        if let Err(e) = std::fs::write("address", &address) {
            tracing::warn!(error = %e, "cannot record the shim address in the bundle");
        }
        Ok(address)
    }

    async fn delete_shim(&mut self) -> Result<DeleteResponse, ShimError> {
        // The shim died: its VM died with it (it was in-process). What can remain on the host
        // is the rootfs mount in the bundle, the sandbox's run directory and the shim's socket.
        let bundle = if self.bundle.is_empty() { Path::new(".") } else { Path::new(&self.bundle) };
        container::unmount_rootfs(&bundle.join("rootfs"));
        // Single-file bind sources staged for the guest (see `binds`).
        container::remove_staged_files(&bundle.join(container::HOST_FILES_DIR));
        let sandbox_id = sandbox_id_of_bundle(bundle).unwrap_or_else(|| self.id.clone());
        let cleaned = cleanup::clean_after_dead_shim(bundle, &self.namespace, &sandbox_id);
        // The taps died with the shim; the tc state it added to the pod's interfaces did not.
        // Only the sandbox's own bundle names its netns (a pod's app containers name /proc paths).
        if !cleaned.shim_alive {
            let spec = container::load_spec(bundle).ok();
            let netns = spec.and_then(|spec| container::network_namespace(&spec).ok().flatten());
            if let Some(netns) = netns.filter(|p| !p.starts_with("/proc")) {
                crate::network::clean_dead_sandbox_network(&netns);
            }
        }
        // The sandbox directory (metrics socket): `tern monitor` drops the sandbox when it goes.
        if let Ok(config) = Config::load(None) {
            if let Err(e) = crate::metrics::sbs::remove_sandbox_dir(&config.shim.root_dir, &sandbox_id) {
                tracing::warn!(error = %crate::sandbox::error_chain(&e), "cannot remove the sandbox directory");
            }
        }
        Ok(DeleteResponse {
            exit_status: DEAD_SHIM_EXIT_STATUS,
            exited_at: MessageField::some(Timestamp::now()),
            ..Default::default()
        })
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> TimedTask<TaskService> {
        let config = Config::load(None).map_err(|e| crate::sandbox::error_chain(&e));
        // The shim runs in the bundle of the container it was started for: its sandbox id names
        // the sandbox (the same grouping as `start_shim`).
        let sandbox_id = sandbox_id_of_bundle(Path::new(".")).unwrap_or_else(|| self.id.clone());
        TimedTask(TaskService::new(config, publisher, self.namespace.clone(), sandbox_id, Arc::clone(&self.exit)))
    }
}

/// The CRI sandbox id from `<bundle>/config.json`, if any.
fn sandbox_id_of_bundle(bundle: &Path) -> Option<String> {
    let spec = container::load_spec(bundle).ok()?;
    spec.annotations().as_ref()?.get(CRI_SANDBOX_ID).cloned()
}
