//! The shim v2 Task service: one microVM per shim (sandbox), booted at the first `Create`;
//! each container's rootfs is a virtio-fs share and its process runs under the guest agent.
//!
//! Life of a container here: `Create` mounts containerd's rootfs at `<bundle>/rootfs`, opens
//! the stdio FIFOs, boots the VM if needed, shares the rootfs with the guest and has the agent
//! mount it, and publishes `TaskCreate`. `Start` asks the agent to create the container and run
//! its process, attaches the streams, publishes `TaskStart`, and starts a waiter that records
//! the exit and publishes `TaskExit`. `Delete` undoes `Create` and publishes `TaskDelete`;
//! `Shutdown` with no container left powers the VM off and ends the shim.
//!
//! Blocking work (the agent client, the VMM, mounts, FIFO opens) runs on tokio's blocking
//! pool. No lock is held across an `.await`, an agent RPC, a share add/remove or other blocking
//! I/O: the state and sandbox mutexes guard only in-memory bookkeeping, and the sandbox is an
//! `Arc<Sandbox>` cloned under a short lock, so a stuck guest request stalls only its own
//! caller, never another Task request or a tokio worker.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tern_sync::LockExt;

use async_trait::async_trait;
use containerd_shim::api;
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Task, TtrpcContext, TtrpcResult};
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::protobuf::MessageField;
use containerd_shim_protos::ttrpc::{self, Code};
use tern_protocol::ContainerSpec;
use tokio::sync::watch;

use super::binds::{self, BindShares};
use super::container::{
    guest_spec, guest_spec_for, host_binds, is_cri_sandbox, load_spec, mount_rootfs, network_namespace, unmount_rootfs,
    ContainerSpecError, GuestAdaptation, HostBind, RootfsMount,
};
use super::errdefs::{self, agent_error};
use super::events::EventSink;
use super::io::{Drained, OutputDrain, ProcessIo, StdioPaths, OUTPUT_DRAIN_IDLE};
use crate::agent::AgentClient;
use crate::config::Config;
use crate::metrics::shim::{SandboxProbe, ShimMetricsServer};
use crate::network::SandboxNetwork;
use crate::sandbox::{error_chain, Sandbox, SandboxDir, SandboxError};
use crate::share::{add_and_mount, AddShareError, PlannedShare};

mod cgroup;
mod exec;
mod reservation;

use reservation::IdReservation;

/// Where container rootfs shares are mounted in the guest: `<this>/<container id>`.
pub const GUEST_CONTAINERS_ROOT: &str = "/run/tern/containers";
/// How long the guest gets to power off on `Shutdown`.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Exit status reported when the agent was lost while waiting (as if SIGKILLed).
const LOST_EXIT_STATUS: u32 = 128 + 9;

fn rpc_error(code: Code, message: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, message.into()))
}

fn not_found(what: &str) -> ttrpc::Error {
    rpc_error(Code::NOT_FOUND, format!("{what}: not found"))
}

fn internal(context: &str, e: &dyn std::error::Error) -> ttrpc::Error {
    rpc_error(Code::INTERNAL, format!("{context}: {}", error_chain(e)))
}

/// `$TERN_TEST_AGENT_STALL`: a test-only hook. When it names a protocol op (`container_stats`)
/// the shim boots its VM with `tern.test_stall=<op>`, and the agent never answers requests of
/// that kind (tests check that one stuck request blocks nothing else).
const TEST_STALL_ENV: &str = "TERN_TEST_AGENT_STALL";

fn test_stall_op() -> Option<String> {
    let op = std::env::var(TEST_STALL_ENV).ok()?;
    // One kernel parameter: an op tag is lowercase letters and underscores.
    (!op.is_empty() && op.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')).then_some(op)
}

/// containerd's signal number as the agent takes it.
fn guest_signal(signal: u32) -> TtrpcResult<i32> {
    i32::try_from(signal).map_err(|_| rpc_error(Code::INVALID_ARGUMENT, format!("bad signal number {signal}")))
}

/// Run blocking work on tokio's blocking pool; a panicked task becomes an INTERNAL error.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> TtrpcResult<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| rpc_error(Code::INTERNAL, format!("blocking task failed: {e}")))
}

/// Wait, off the runtime, until a process's output has reached its consumer or stalled
/// ([`OutputDrain::wait`]); `then` names what happens next, for the log.
async fn deliver_output(drain: OutputDrain, process: &str, then: &str) {
    match blocking(move || drain.wait(OUTPUT_DRAIN_IDLE)).await {
        Ok(Drained::All) => {}
        Ok(Drained::Stalled { copied, queued, copies_done }) => {
            tracing::warn!(process, copied, queued, copies_done, "output not taken by its consumer; {then} anyway")
        }
        Err(e) => tracing::warn!(process, error = %e, "waiting for the output failed; {then} anyway"),
    }
}

/// How a process ended.
#[derive(Debug, Clone, PartialEq)]
struct ExitInfo {
    status: u32,
    at: Timestamp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Created,
    Running,
    Stopped,
}

/// One container (its init process) of this sandbox.
struct Container {
    bundle: String,
    rootfs: PathBuf,
    /// Whether the shim mounted `rootfs` (then it unmounts it on delete).
    rootfs_mounted: bool,
    share: String,
    guest_rootfs: String,
    spec: ContainerSpec,
    stdio: StdioPaths,
    io: ProcessIo,
    pid: u32,
    phase: Phase,
    exit_tx: watch::Sender<Option<ExitInfo>>,
    /// Exec processes by exec id.
    execs: HashMap<String, exec::ExecProcess>,
    /// Frozen by `Pause` (the init still counts as running).
    paused: bool,
    /// The shares of the spec's host bind mounts (`binds`).
    bind_shares: BindShares,
    /// A CRI pod's sandbox (pause) container.
    cri_sandbox: bool,
}

impl Container {
    fn exit(&self) -> Option<ExitInfo> {
        self.exit_tx.borrow().clone()
    }
}

#[derive(Default)]
struct State {
    containers: HashMap<String, Container>,
    /// Ids whose `Create` is under way (see [`IdReservation`]): taken before anything else, so
    /// a second `Create` of the same id fails at once instead of mounting over the first's rootfs.
    creating: HashSet<String>,
    next_share: u64,
}

struct Inner {
    config: Result<Config, String>,
    /// containerd namespace and sandbox id: they name the VM's run directory (`SandboxDir`).
    namespace: String,
    sandbox_id: String,
    events: EventSink,
    exit: Arc<ExitSignal>,
    /// The sandbox VM, booted by the first `Create`. The mutex is held only to clone or swap
    /// the `Arc` (see [`TaskService::sandbox`]).
    sandbox: Mutex<Option<Arc<Sandbox>>>,
    /// Serializes the first boot: a second `Create` needs the same VM, so it waits for it
    /// (asynchronously; no other request takes this lock).
    boot: tokio::sync::Mutex<()>,
    state: Mutex<State>,
    /// Watchable volume shares, shared by the containers that mount the same volume.
    watchables: binds::WatchableShares,
    /// `<root>/sbs/<sandbox-id>/shim-monitor.sock`, served while the VM runs.
    metrics: Mutex<Option<ShimMetricsServer>>,
}

/// The Task service containerd talks to.
#[derive(Clone)]
pub struct TaskService {
    inner: Arc<Inner>,
}

impl TaskService {
    pub fn new(
        config: Result<Config, String>,
        publisher: RemotePublisher,
        namespace: String,
        sandbox_id: String,
        exit: Arc<ExitSignal>,
    ) -> Self {
        TaskService {
            inner: Arc::new(Inner {
                config,
                namespace: namespace.clone(),
                sandbox_id,
                events: EventSink::new(publisher, namespace),
                exit,
                sandbox: Mutex::new(None),
                boot: tokio::sync::Mutex::new(()),
                state: Mutex::new(State::default()),
                watchables: binds::WatchableShares::default(),
                metrics: Mutex::new(None),
            }),
        }
    }

    fn config(&self) -> TtrpcResult<Config> {
        self.inner.config.clone().map_err(|e| rpc_error(Code::FAILED_PRECONDITION, format!("tern configuration: {e}")))
    }

    /// The running sandbox (a cheap clone: the lock is never held beyond this call).
    fn sandbox(&self) -> TtrpcResult<Arc<Sandbox>> {
        self.inner
            .sandbox
            .lock_unpoisoned()
            .clone()
            .ok_or_else(|| rpc_error(Code::FAILED_PRECONDITION, "the sandbox VM is not running"))
    }

    /// The agent of the running sandbox.
    fn agent(&self) -> TtrpcResult<AgentClient> {
        self.sandbox().map(|s| s.agent().clone())
    }

    /// Boot the sandbox VM unless it runs already, connected to `netns` (the network namespace
    /// of the spec that boots it, see [`network_namespace`]; ignored once the VM runs).
    async fn ensure_sandbox(&self, netns: Result<Option<PathBuf>, ContainerSpecError>) -> TtrpcResult<()> {
        let _boot = self.inner.boot.lock().await;
        if self.inner.sandbox.lock_unpoisoned().is_some() {
            return Ok(());
        }
        let netns = netns.map_err(|e| rpc_error(Code::INVALID_ARGUMENT, error_chain(&e)))?;
        let mut config = self.config()?;
        if let Some(op) = test_stall_op() {
            tracing::warn!(op, "test hook: the agent will never answer requests of this kind");
            config.vm.kernel_cmdline.push_str(&format!(" tern.test_stall={op}"));
        }
        // A named run directory: `shim delete` removes it if this process is SIGKILLed.
        let (namespace, sandbox_id) = (self.inner.namespace.clone(), self.inner.sandbox_id.clone());
        let sandbox = blocking(move || {
            // The taps exist before the VM: virtio-mmio devices are fixed at boot.
            let network = netns
                .as_deref()
                .map(SandboxNetwork::connect)
                .transpose()
                .map_err(|e| internal("cannot connect the sandbox to its network", &e))?;
            let dir = SandboxDir::named(&namespace, &sandbox_id)
                .map_err(|e| internal("cannot boot the sandbox VM", &SandboxError::RunDir(e)))?;
            Sandbox::boot_in(&config, Vec::new(), true, dir, network)
                .map_err(|e| internal("cannot boot the sandbox VM", &e))
        })
        .await??;
        tracing::info!(run_dir = %sandbox.run_dir().display(), "sandbox VM ready");
        let probe = self.metrics_probe(&sandbox);
        *self.inner.sandbox.lock_unpoisoned() = Some(Arc::new(sandbox));
        self.start_metrics(probe);
        Ok(())
    }

    /// What the metrics endpoint reads about the sandbox. The sandbox lock is held only to
    /// clone the `Arc`, so a scrape never waits for an RPC.
    fn metrics_probe(&self, sandbox: &Sandbox) -> SandboxProbe {
        let inner = Arc::downgrade(&self.inner);
        let (vcpus, memory_mib) = self.config().map(|c| (c.vm.vcpus, c.vm.memory_mib)).unwrap_or_default();
        SandboxProbe {
            vcpus,
            memory_mib,
            vm: sandbox.vm_metrics(),
            agent: sandbox.agent().clone(),
            watcher: Arc::new(move || {
                let sandbox = inner.upgrade()?.sandbox.lock_unpoisoned().clone()?;
                sandbox.watcher_counters()
            }),
        }
    }

    /// Publish the sandbox directory and its metrics socket; a failure costs only metrics.
    fn start_metrics(&self, probe: SandboxProbe) {
        let Ok(config) = self.config() else { return };
        match ShimMetricsServer::start(&config.shim.root_dir, &self.inner.sandbox_id, probe) {
            Ok(server) => *self.inner.metrics.lock_unpoisoned() = Some(server),
            Err(e) => tracing::warn!(error = %error_chain(&e), "cannot serve sandbox metrics"),
        }
    }

    fn with_container<T>(&self, id: &str, f: impl FnOnce(&mut Container) -> TtrpcResult<T>) -> TtrpcResult<T> {
        let mut state = self.inner.state.lock_unpoisoned();
        let c = state.containers.get_mut(id).ok_or_else(|| not_found(&format!("container {id}")))?;
        f(c)
    }

    /// `Kill` with `all`: every process in the container's cgroup, as `runc kill --all`, also
    /// after its init has exited (containerd's forced delete sends SIGKILL this way). The agent
    /// says NOT_FOUND when the container's cgroup is gone; once the init has exited, a guest
    /// that is gone too (UNAVAILABLE) has nothing left to signal either.
    async fn kill_all(&self, id: &str, signal: u32, phase: Phase) -> TtrpcResult<api::Empty> {
        let signal = guest_signal(signal)?;
        let agent = match self.agent() {
            Ok(agent) => agent,
            // The VM is gone with every process in it.
            Err(_) if phase == Phase::Stopped => return Err(not_found("process already finished")),
            Err(e) => return Err(e),
        };
        let guest_id = id.to_owned();
        match blocking(move || agent.signal_container(&guest_id, signal)).await? {
            Ok(()) => Ok(api::Empty::default()),
            Err(e) if phase == Phase::Stopped && errdefs::code_of(&e) == Code::UNAVAILABLE => {
                tracing::debug!(id, error = %error_chain(&e), "kill --all after the init exited and the guest went");
                Err(not_found("process already finished"))
            }
            Err(e) => Err(agent_error("cannot signal the container's processes", &e)),
        }
    }

    /// Share the rootfs with the guest and have the agent mount it at the container's path.
    async fn share_rootfs(&self, share: &str, rootfs: &Path, guest_path: &str) -> TtrpcResult<()> {
        let config = self.config()?;
        let planned = PlannedShare::new(share, rootfs.to_path_buf(), guest_path, false, false, &config.fs);
        let sandbox = self.sandbox()?;
        blocking(move || match add_and_mount(&sandbox, planned) {
            Ok(()) => Ok(()),
            Err(e @ AddShareError::Share { .. }) => Err(internal("cannot share the rootfs with the VM", &e)),
            Err(AddShareError::Mount { source, .. }) => {
                Err(agent_error("cannot mount the rootfs in the guest", &source))
            }
        })
        .await?
    }

    /// Undo `Create`'s host and guest setup for a container already removed from the table.
    async fn teardown(&self, c: Container) {
        let inner = Arc::clone(&self.inner);
        let sandbox = self.inner.sandbox.lock_unpoisoned().clone();
        let result = blocking(move || {
            let Container { share, guest_rootfs, rootfs, rootfs_mounted, io, bind_shares, .. } = c;
            // Closing the FIFO ends the shim held (module docs of `io`).
            drop(io);
            binds::unshare_binds(sandbox.as_deref(), &inner.watchables, bind_shares);
            if let Some(sandbox) = sandbox {
                if let Err(e) = sandbox.agent().unmount(&guest_rootfs) {
                    tracing::warn!(error = %error_chain(&e), "cannot unmount the rootfs in the guest");
                }
                if let Err(e) = sandbox.remove_fs_share(&share) {
                    tracing::warn!(error = %error_chain(&e), "cannot remove the rootfs share");
                }
            }
            if rootfs_mounted {
                unmount_rootfs(&rootfs);
            }
        })
        .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, "container teardown failed");
        }
    }

    /// Share the container's host bind mounts with the VM (see [`binds`]).
    async fn share_binds(
        &self,
        id: &str,
        prefix: &str,
        bundle: &Path,
        host: Vec<HostBind>,
    ) -> TtrpcResult<(HashMap<usize, String>, BindShares)> {
        if host.is_empty() {
            return Ok((HashMap::new(), BindShares::default()));
        }
        let fs = self.config()?.fs;
        let inner = Arc::clone(&self.inner);
        let sandbox = self.sandbox()?;
        let (id, prefix, bundle) = (id.to_owned(), prefix.to_owned(), bundle.to_path_buf());
        blocking(move || {
            binds::share_binds(&sandbox, &inner.watchables, &fs, &id, &prefix, &bundle, &host)
                .map_err(|e| internal("cannot share the container's bind mounts", &e))
        })
        .await?
    }

    /// Guest pids of this VM's running containers: the only `/proc/<pid>/ns/*` paths a spec
    /// may join (a CRI container joins its pod's sandbox namespaces that way).
    fn running_pids(&self) -> Vec<u32> {
        self.inner
            .state
            .lock_unpoisoned()
            .containers
            .values()
            .filter(|c| c.phase == Phase::Running && c.pid != 0)
            .map(|c| c.pid)
            .collect()
    }

    /// Record the exit of a started container and tell containerd.
    async fn watch_exit(self, id: String, pid: u32, agent: AgentClient) {
        let wait_id = id.clone();
        let status = match blocking(move || agent.wait(&wait_id)).await {
            Ok(Ok(status)) => u32::try_from(status.shell_code()).unwrap_or(LOST_EXIT_STATUS),
            Ok(Err(e)) => {
                tracing::warn!(%id, error = %error_chain(&e), "lost the container's process");
                LOST_EXIT_STATUS
            }
            Err(e) => {
                tracing::warn!(%id, error = %e, "waiting for the container failed");
                LOST_EXIT_STATUS
            }
        };
        // The exit is reported once the output is read: clients act on it at once (see
        // `OutputDrain::wait`).
        if let Ok(drain) = self.with_container(&id, |c| Ok(c.io.output_drain())) {
            deliver_output(drain, &id, "reporting the exit").await;
        }
        let exit = ExitInfo { status, at: Timestamp::now() };
        let recorded = self.with_container(&id, |c| {
            c.phase = Phase::Stopped;
            c.exit_tx.send_replace(Some(exit.clone()));
            Ok(())
        });
        if recorded.is_ok() {
            self.inner.events.exited(&id, pid, exit.status, &exit.at).await;
        }
    }

    /// Power the VM off (if it runs) and end the shim.
    async fn stop_sandbox(&self) {
        // Out of the lock first: an `if let` on the guard would hold it across `stop`.
        let metrics = self.inner.metrics.lock_unpoisoned().take();
        if let Some(metrics) = metrics {
            metrics.stop();
        }
        let sandbox = self.inner.sandbox.lock_unpoisoned().take();
        if let Some(sandbox) = sandbox {
            match blocking(move || sandbox.shutdown(SHUTDOWN_GRACE)).await {
                Ok(Ok(exit)) => tracing::info!(?exit, "sandbox VM stopped"),
                Ok(Err(e)) => tracing::warn!(error = %error_chain(&e), "sandbox VM ended with an error"),
                Err(e) => tracing::warn!(error = %e, "stopping the sandbox VM failed"),
            }
        }
    }

    /// A started process whose stdio could not be connected would run unseen, its output lost:
    /// kill it (its exit is recorded as any other, so it can be deleted) and fail the Start with
    /// the cause.
    async fn end_unconnected(&self, id: &str, guest_id: &str, agent: AgentClient, e: ttrpc::Error) -> ttrpc::Error {
        tracing::error!(id, guest_id, "{e:?}; killing the process");
        let guest_id = guest_id.to_owned();
        match blocking(move || agent.signal(&guest_id, libc::SIGKILL)).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => tracing::warn!(id, error = %error_chain(&err), "cannot kill the unconnected process"),
            Err(err) => tracing::warn!(id, error = %err, "cannot kill the unconnected process"),
        }
        e
    }
}

#[async_trait]
impl Task for TaskService {
    async fn create(&self, _ctx: &TtrpcContext, req: api::CreateTaskRequest) -> TtrpcResult<api::CreateTaskResponse> {
        let id = req.id.clone();
        if id.is_empty() {
            return Err(rpc_error(Code::INVALID_ARGUMENT, "container id must not be empty"));
        }
        // First, before any mount or share: released on every early return below.
        let reservation = IdReservation::take(&self.inner, &id)?;
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let bundle = PathBuf::from(&req.bundle);
        let rootfs = bundle.join("rootfs");
        let mounts: Vec<RootfsMount> = req
            .rootfs
            .iter()
            .map(|m| RootfsMount { fs_type: m.type_.clone(), source: m.source.clone(), options: m.options.clone() })
            .collect();
        // Unmounts again on every early return below.
        let mut guard = RootfsGuard { path: rootfs.clone(), armed: !mounts.is_empty() };
        let (spec, host_bind_mounts, unusable_binds) = {
            let (bundle, rootfs) = (bundle.clone(), rootfs.clone());
            blocking(move || {
                let spec = load_spec(&bundle)?;
                let (host, unusable) = host_binds(&spec)?;
                std::fs::create_dir_all(&rootfs)
                    .map_err(|e| ContainerSpecError::MountRootfs { target: rootfs.clone(), message: e.to_string() })?;
                mount_rootfs(&mounts, &rootfs)?;
                Ok::<_, ContainerSpecError>((spec, host, unusable))
            })
            .await?
            .map_err(|e| rpc_error(Code::INVALID_ARGUMENT, error_chain(&e)))?
        };
        let io = {
            let stdio = stdio.clone();
            blocking(move || ProcessIo::open(&stdio))
                .await?
                .map_err(|e| rpc_error(Code::INVALID_ARGUMENT, format!("stdio: {}", error_chain(&e))))?
        };
        let guest_rootfs = format!("{GUEST_CONTAINERS_ROOT}/{id}");
        // Refuse a spec the guest cannot run before booting or sharing anything.
        guest_spec(&spec, &guest_rootfs).map_err(|e| rpc_error(Code::INVALID_ARGUMENT, error_chain(&e)))?;
        let share = {
            let mut state = self.inner.state.lock_unpoisoned();
            state.next_share += 1;
            format!("c{}", state.next_share)
        };
        self.ensure_sandbox(network_namespace(&spec)).await?;
        let (bind_sources, bind_shares) = self.share_binds(&id, &share, &bundle, host_bind_mounts).await?;
        if let Err(e) = self.share_rootfs(&share, &rootfs, &guest_rootfs).await {
            let inner = Arc::clone(&self.inner);
            let sandbox = self.inner.sandbox.lock_unpoisoned().clone();
            let _ = blocking(move || binds::unshare_binds(sandbox.as_deref(), &inner.watchables, bind_shares)).await;
            return Err(e);
        }
        let rootfs_mounted = guard.armed;
        guard.armed = false;
        let adapt = GuestAdaptation { binds: bind_sources, joinable_pids: self.running_pids() };
        let adapted = guest_spec_for(&spec, &guest_rootfs, &adapt);
        if let Ok((_, dropped)) = &adapted {
            if !dropped.is_empty() || !unusable_binds.is_empty() {
                tracing::info!(%id, ?dropped, ?unusable_binds, "parts of the OCI spec do not apply inside the VM and were dropped");
            }
        }
        let oci_spec = adapted.as_ref().map(|(json, _)| json.clone()).unwrap_or_default();
        let guest = ContainerSpec { id: id.clone(), oci_spec, stdin: io.has_stdin() };
        let (exit_tx, _) = watch::channel(None);
        let container = Container {
            bundle: req.bundle.clone(),
            rootfs,
            rootfs_mounted,
            share,
            guest_rootfs,
            spec: guest,
            stdio: stdio.clone(),
            io,
            pid: 0,
            phase: Phase::Created,
            exit_tx,
            execs: HashMap::new(),
            paused: false,
            bind_shares,
            cri_sandbox: is_cri_sandbox(&spec),
        };
        if let Err(e) = adapted {
            self.teardown(container).await;
            return Err(rpc_error(Code::INVALID_ARGUMENT, error_chain(&e)));
        }
        reservation.commit(container);
        self.inner.events.created(&id, &req.bundle, &stdio, 0).await;
        Ok(api::CreateTaskResponse { pid: 0, ..Default::default() })
    }

    async fn start(&self, _ctx: &TtrpcContext, req: api::StartRequest) -> TtrpcResult<api::StartResponse> {
        if !req.exec_id.is_empty() {
            return self.exec_start(&req.id, &req.exec_id).await;
        }
        let id = req.id.clone();
        let (spec, mut io) = self.with_container(&id, |c| match c.phase {
            Phase::Created => Ok((c.spec.clone(), std::mem::take(&mut c.io))),
            _ => Err(rpc_error(Code::FAILED_PRECONDITION, format!("container {id} was already started"))),
        })?;
        let agent = self.agent()?;
        let started = {
            let agent = agent.clone();
            let id = id.clone();
            blocking(move || {
                let pid = agent.start_container(spec).map_err(|e| agent_error("cannot start the container", &e))?;
                let connected =
                    io.connect(&agent, &id).map_err(|e| internal("cannot connect the container's stdio", &e));
                Ok::<_, ttrpc::Error>((pid, io, connected))
            })
            .await?
        };
        let (pid, io, connected) = match started {
            Ok(s) => s,
            Err(e) => {
                // Leave it as a created container that can still be deleted.
                return Err(e);
            }
        };
        let pid = u32::try_from(pid).unwrap_or_default();
        self.with_container(&id, |c| {
            c.io = io;
            c.pid = pid;
            c.phase = Phase::Running;
            Ok(())
        })?;
        if let Err(e) = connected {
            tokio::spawn(self.clone().watch_exit(id.clone(), pid, agent.clone()));
            return Err(self.end_unconnected(&id, &id, agent, e).await);
        }
        // TaskStart before any TaskExit the watcher publishes.
        self.inner.events.started(&id, pid).await;
        tokio::spawn(self.clone().watch_exit(id.clone(), pid, agent.clone()));
        tokio::spawn(self.clone().watch_oom(id.clone(), agent.clone()));
        Ok(api::StartResponse { pid, ..Default::default() })
    }

    async fn state(&self, _ctx: &TtrpcContext, req: api::StateRequest) -> TtrpcResult<api::StateResponse> {
        if !req.exec_id.is_empty() {
            let bundle = self.with_container(&req.id, |c| Ok(c.bundle.clone()))?;
            return self.exec_state(&req.id, &req.exec_id, &bundle);
        }
        self.with_container(&req.id, |c| {
            let status = match c.phase {
                Phase::Created => api::Status::CREATED,
                Phase::Running if c.paused => api::Status::PAUSED,
                Phase::Running => api::Status::RUNNING,
                Phase::Stopped => api::Status::STOPPED,
            };
            let exit = c.exit();
            Ok(api::StateResponse {
                id: req.id.clone(),
                bundle: c.bundle.clone(),
                pid: c.pid,
                status: status.into(),
                stdin: c.stdio.stdin.clone(),
                stdout: c.stdio.stdout.clone(),
                stderr: c.stdio.stderr.clone(),
                terminal: c.stdio.terminal,
                exit_status: exit.as_ref().map_or(0, |e| e.status),
                exited_at: exit.map_or(MessageField::none(), |e| MessageField::some(e.at)),
                ..Default::default()
            })
        })
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        if !req.exec_id.is_empty() {
            self.exec_kill(&req.id, &req.exec_id, req.signal).await?;
            return Ok(api::Empty::default());
        }
        let phase = self.with_container(&req.id, |c| Ok(c.phase))?;
        if req.all && phase != Phase::Created {
            return self.kill_all(&req.id, req.signal, phase).await;
        }
        match phase {
            Phase::Stopped => return Err(not_found("process already finished")),
            Phase::Created => {
                return Err(rpc_error(Code::FAILED_PRECONDITION, "the container was not started"));
            }
            Phase::Running => {}
        }
        let agent = self.agent()?;
        let signal = guest_signal(req.signal)?;
        let id = req.id.clone();
        // A process that ended since the check above is NOT_FOUND from the agent.
        blocking(move || agent.signal(&id, signal))
            .await?
            .map_err(|e| agent_error("cannot signal the container", &e))?;
        Ok(api::Empty::default())
    }

    async fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        if !req.exec_id.is_empty() {
            return self.exec_wait(&req.id, &req.exec_id).await;
        }
        let mut rx = self.with_container(&req.id, |c| Ok(c.exit_tx.subscribe()))?;
        let exit = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| rpc_error(Code::NOT_FOUND, format!("container {} was deleted", req.id)))?
            .clone();
        let exit = exit.ok_or_else(|| rpc_error(Code::INTERNAL, "exit status missing"))?;
        Ok(api::WaitResponse { exit_status: exit.status, exited_at: MessageField::some(exit.at), ..Default::default() })
    }

    async fn delete(&self, _ctx: &TtrpcContext, req: api::DeleteRequest) -> TtrpcResult<api::DeleteResponse> {
        if !req.exec_id.is_empty() {
            return self.exec_delete(&req.id, &req.exec_id).await;
        }
        let c = {
            let mut state = self.inner.state.lock_unpoisoned();
            let c = state.containers.get(&req.id).ok_or_else(|| not_found(&format!("container {}", req.id)))?;
            if c.phase == Phase::Running {
                return Err(rpc_error(Code::FAILED_PRECONDITION, format!("container {} is still running", req.id)));
            }
            state.containers.remove(&req.id).ok_or_else(|| not_found(&req.id))?
        };
        let pid = c.pid;
        let exit = c.exit().unwrap_or(ExitInfo { status: 0, at: Timestamp::now() });
        if c.cri_sandbox {
            // CRI removes a pod's containers before its sandbox; the VM stops at the
            // `Shutdown` that follows once nothing is left.
            let left: Vec<String> = self.inner.state.lock_unpoisoned().containers.keys().cloned().collect();
            if !left.is_empty() {
                tracing::warn!(sandbox = %req.id, ?left, "pod sandbox deleted before its containers");
            }
        }
        // What the process wrote reaches its consumer before the FIFO ends are released.
        deliver_output(c.io.output_drain(), &req.id, "deleting").await;
        self.teardown(c).await;
        self.inner.events.deleted(&req.id, pid, exit.status, &exit.at).await;
        Ok(api::DeleteResponse {
            pid,
            exit_status: exit.status,
            exited_at: MessageField::some(exit.at),
            ..Default::default()
        })
    }

    async fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        let (tracked, phase) = self.with_container(&req.id, |c| {
            let tracked = std::iter::once(c.pid).chain(c.execs.values().map(|e| e.pid)).filter(|p| *p != 0);
            Ok((tracked.collect::<Vec<_>>(), c.phase))
        })?;
        // Every process in the container's cgroup, as runc lists them (children of the init
        // and of execs too); the processes the shim started when the guest cannot say.
        let mut pids = tracked;
        if let (Phase::Running, Ok(agent)) = (phase, self.agent()) {
            let id = req.id.clone();
            match blocking(move || agent.container_pids(&id)).await? {
                Ok(all) => pids = all.into_iter().filter_map(|p| u32::try_from(p).ok()).collect(),
                Err(e) => {
                    tracing::warn!(id = %req.id, error = %error_chain(&e), "cannot list the container's processes")
                }
            }
        }
        let processes = pids
            .into_iter()
            .map(|pid| containerd_shim_protos::types::task::ProcessInfo { pid, ..Default::default() })
            .collect();
        Ok(api::PidsResponse { processes, ..Default::default() })
    }

    async fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<api::Empty> {
        if !req.exec_id.is_empty() {
            self.exec_close_io(&req.id, &req.exec_id).await?;
            return Ok(api::Empty::default());
        }
        // With a stdin FIFO the shim's copy delivers EOF itself after forwarding what
        // containerd wrote (module docs of `io`); asking the agent as well could cut that off.
        let shim_delivers_eof = self.with_container(&req.id, |c| Ok(c.io.close_stdin()))?;
        if let (false, Ok(agent)) = (shim_delivers_eof, self.agent()) {
            let id = req.id.clone();
            let phase = self.with_container(&req.id, |c| Ok(c.phase))?;
            if phase == Phase::Running {
                let closed = blocking(move || agent.close_stdin(&id)).await?;
                if let Err(e) = closed {
                    tracing::debug!(error = %error_chain(&e), "close stdin in the guest");
                }
            }
        }
        Ok(api::Empty::default())
    }

    async fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> TtrpcResult<api::Empty> {
        self.exec_add(req).await?;
        Ok(api::Empty::default())
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, req: api::ResizePtyRequest) -> TtrpcResult<api::Empty> {
        let guest_id = self.guest_process_id(&req.id, &req.exec_id)?;
        let agent = self.agent()?;
        let rows = u16::try_from(req.height).unwrap_or(u16::MAX);
        let cols = u16::try_from(req.width).unwrap_or(u16::MAX);
        blocking(move || agent.resize_pty(&guest_id, rows, cols))
            .await?
            .map_err(|e| agent_error("cannot resize the terminal", &e))?;
        Ok(api::Empty::default())
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        self.pause_container(&req.id).await?;
        Ok(api::Empty::default())
    }

    async fn resume(&self, _ctx: &TtrpcContext, req: api::ResumeRequest) -> TtrpcResult<api::Empty> {
        self.resume_container(&req.id).await?;
        Ok(api::Empty::default())
    }

    async fn stats(&self, _ctx: &TtrpcContext, req: api::StatsRequest) -> TtrpcResult<api::StatsResponse> {
        self.container_stats(&req.id).await
    }

    async fn update(&self, _ctx: &TtrpcContext, req: api::UpdateTaskRequest) -> TtrpcResult<api::Empty> {
        self.update_container(req).await?;
        Ok(api::Empty::default())
    }

    async fn checkpoint(&self, _ctx: &TtrpcContext, _req: api::CheckpointTaskRequest) -> TtrpcResult<api::Empty> {
        Err(rpc_error(Code::UNIMPLEMENTED, "checkpoint is not supported by tern (no CRIU inside the VM)"))
    }

    async fn connect(&self, _ctx: &TtrpcContext, req: api::ConnectRequest) -> TtrpcResult<api::ConnectResponse> {
        let task_pid = self.inner.state.lock_unpoisoned().containers.get(&req.id).map_or(0, |c| c.pid);
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            ..Default::default()
        })
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, _req: api::ShutdownRequest) -> TtrpcResult<api::Empty> {
        let busy = {
            let state = self.inner.state.lock_unpoisoned();
            !state.containers.is_empty() || !state.creating.is_empty()
        };
        if busy {
            // containerd asks after every delete; the shim stays while it serves containers
            // (or creates one: a direct client may race a `Create` with the `Shutdown`).
            return Ok(api::Empty::default());
        }
        self.stop_sandbox().await;
        self.inner.exit.signal();
        Ok(api::Empty::default())
    }
}

/// Unmounts a rootfs the shim mounted unless disarmed (`Create` failing half-way).
struct RootfsGuard {
    path: PathBuf,
    armed: bool,
}

impl Drop for RootfsGuard {
    fn drop(&mut self) {
        if self.armed {
            unmount_rootfs(&self.path);
        }
    }
}
