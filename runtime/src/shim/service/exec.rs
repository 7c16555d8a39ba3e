//! Exec processes (containerd's `Exec` + `Start`/`State`/`Kill`/`Wait`/`Delete`/`CloseIO`
//! with an exec id): extra processes inside a running container, run by the agent with
//! libcontainer's tenant builder so they share the init's namespaces, root and cgroup.
//!
//! Each has its own FIFOs ([`ProcessIo`], the same rules as the init's), its own exit watch,
//! and events `TaskExecAdded` (on `Exec`) → `TaskExecStarted` (on `Start`) → `TaskExit`
//! with the exec id. `Delete` of an exec publishes nothing (as runc's shim).

use containerd_shim::api;
use containerd_shim::TtrpcResult;
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::protobuf::MessageField;
use containerd_shim_protos::ttrpc::Code;
use tern_protocol::ContainerExecRequest;
use tokio::sync::watch;

use super::{blocking, deliver_output, internal, not_found, rpc_error, ExitInfo, Phase, TaskService, LOST_EXIT_STATUS};
use crate::agent::AgentClient;
use crate::sandbox::error_chain;
use crate::shim::errdefs::agent_error;
use crate::shim::io::{ProcessIo, StdioPaths};

/// One exec process of a container.
pub(super) struct ExecProcess {
    /// The OCI `process` object (JSON) containerd sent.
    process: String,
    stdio: StdioPaths,
    io: ProcessIo,
    pub(super) pid: u32,
    phase: Phase,
    exit_tx: watch::Sender<Option<ExitInfo>>,
}

/// The agent's process-table id of exec `exec_id` of container `id`. Container ids are single
/// path components, so this can never be a container's own id.
pub(super) fn agent_id(id: &str, exec_id: &str) -> String {
    format!("{id}/{exec_id}")
}

impl TaskService {
    fn with_exec<T>(
        &self,
        id: &str,
        exec_id: &str,
        f: impl FnOnce(&mut ExecProcess) -> TtrpcResult<T>,
    ) -> TtrpcResult<T> {
        self.with_container(id, |c| {
            let e = c.execs.get_mut(exec_id).ok_or_else(|| not_found(&format!("exec {exec_id} of container {id}")))?;
            f(e)
        })
    }

    /// `Exec`: register the process and open its FIFOs; it starts on `Start`.
    pub(super) async fn exec_add(&self, req: api::ExecProcessRequest) -> TtrpcResult<()> {
        let (id, exec_id) = (req.id.clone(), req.exec_id.clone());
        if exec_id.is_empty() || exec_id.contains('/') {
            return Err(rpc_error(Code::INVALID_ARGUMENT, format!("bad exec id {exec_id:?}")));
        }
        let process = match req.spec.as_ref() {
            Some(any) => String::from_utf8(any.value.clone())
                .map_err(|_| rpc_error(Code::INVALID_ARGUMENT, "the exec process spec is not UTF-8 JSON"))?,
            None => return Err(rpc_error(Code::INVALID_ARGUMENT, "the exec request has no process spec")),
        };
        serde_json::from_str::<oci_spec::runtime::Process>(&process)
            .map_err(|e| rpc_error(Code::INVALID_ARGUMENT, format!("the exec process spec: {e}")))?;
        self.with_container(&id, |c| {
            if c.phase != Phase::Running {
                return Err(rpc_error(Code::FAILED_PRECONDITION, format!("container {id} is not running")));
            }
            if c.execs.contains_key(&exec_id) {
                return Err(rpc_error(Code::ALREADY_EXISTS, format!("exec {exec_id} already exists")));
            }
            Ok(())
        })?;
        let stdio = StdioPaths { stdin: req.stdin, stdout: req.stdout, stderr: req.stderr, terminal: req.terminal };
        let io = {
            let stdio = stdio.clone();
            blocking(move || ProcessIo::open(&stdio))
                .await?
                .map_err(|e| rpc_error(Code::INVALID_ARGUMENT, format!("stdio: {}", error_chain(&e))))?
        };
        let (exit_tx, _) = watch::channel(None);
        let exec = ExecProcess { process, stdio, io, pid: 0, phase: Phase::Created, exit_tx };
        self.with_container(&id, |c| {
            if c.execs.contains_key(&exec_id) {
                return Err(rpc_error(Code::ALREADY_EXISTS, format!("exec {exec_id} already exists")));
            }
            c.execs.insert(exec_id.clone(), exec);
            Ok(())
        })?;
        self.inner.events.exec_added(&id, &exec_id).await;
        Ok(())
    }

    /// `Start` with an exec id.
    pub(super) async fn exec_start(&self, id: &str, exec_id: &str) -> TtrpcResult<api::StartResponse> {
        let (process, mut io) = self.with_exec(id, exec_id, |e| match e.phase {
            Phase::Created => Ok((e.process.clone(), std::mem::take(&mut e.io))),
            _ => Err(rpc_error(Code::FAILED_PRECONDITION, format!("exec {exec_id} was already started"))),
        })?;
        let paused = self.with_container(id, |c| Ok(c.paused))?;
        if paused {
            self.with_exec(id, exec_id, |e| {
                e.io = io;
                Ok(())
            })?;
            return Err(rpc_error(Code::FAILED_PRECONDITION, format!("container {id} is paused")));
        }
        let agent = self.agent()?;
        let guest_id = agent_id(id, exec_id);
        let req =
            ContainerExecRequest { container_id: id.to_owned(), id: guest_id.clone(), process, stdin: io.has_stdin() };
        let started = {
            let (agent, guest_id) = (agent.clone(), guest_id.clone());
            blocking(move || {
                let pid = agent.exec_in_container(req);
                let connected = match &pid {
                    Ok(_) => io.connect(&agent, &guest_id).map_err(|e| internal("cannot connect the exec's stdio", &e)),
                    Err(_) => Ok(()),
                };
                (pid, io, connected)
            })
            .await?
        };
        let (pid, io, connected) = started;
        let pid = match pid {
            Ok(pid) => u32::try_from(pid).unwrap_or_default(),
            Err(e) => {
                // Keep the FIFOs so the exec can still be deleted cleanly.
                self.with_exec(id, exec_id, |ex| {
                    ex.io = io;
                    Ok(())
                })?;
                return Err(agent_error("cannot start the exec process", &e));
            }
        };
        self.with_exec(id, exec_id, |e| {
            e.io = io;
            e.pid = pid;
            e.phase = Phase::Running;
            Ok(())
        })?;
        if let Err(e) = connected {
            tokio::spawn(self.clone().watch_exec_exit(id.to_owned(), exec_id.to_owned(), pid, agent.clone()));
            return Err(self.end_unconnected(id, &guest_id, agent, e).await);
        }
        // TaskExecStarted before any TaskExit the watcher publishes.
        self.inner.events.exec_started(id, exec_id, pid).await;
        tokio::spawn(self.clone().watch_exec_exit(id.to_owned(), exec_id.to_owned(), pid, agent));
        Ok(api::StartResponse { pid, ..Default::default() })
    }

    /// Record the exit of a started exec and publish `TaskExit` with its id.
    async fn watch_exec_exit(self, id: String, exec_id: String, pid: u32, agent: AgentClient) {
        let guest_id = agent_id(&id, &exec_id);
        let status = match blocking(move || agent.wait(&guest_id)).await {
            Ok(Ok(status)) => u32::try_from(status.shell_code()).unwrap_or(LOST_EXIT_STATUS),
            Ok(Err(e)) => {
                tracing::warn!(%id, %exec_id, error = %error_chain(&e), "lost the exec process");
                LOST_EXIT_STATUS
            }
            Err(e) => {
                tracing::warn!(%id, %exec_id, error = %e, "waiting for the exec failed");
                LOST_EXIT_STATUS
            }
        };
        // As for the init: the exit is reported once the output is read.
        if let Ok(drain) = self.with_exec(&id, &exec_id, |e| Ok(e.io.output_drain())) {
            deliver_output(drain, &exec_id, "reporting the exit").await;
        }
        let exit = ExitInfo { status, at: Timestamp::now() };
        let recorded = self.with_exec(&id, &exec_id, |e| {
            e.phase = Phase::Stopped;
            e.exit_tx.send_replace(Some(exit.clone()));
            Ok(())
        });
        if recorded.is_ok() {
            self.inner.events.exec_exited(&id, &exec_id, pid, exit.status, &exit.at).await;
        }
    }

    pub(super) fn exec_state(&self, id: &str, exec_id: &str, bundle: &str) -> TtrpcResult<api::StateResponse> {
        self.with_exec(id, exec_id, |e| {
            let status = match e.phase {
                Phase::Created => api::Status::CREATED,
                Phase::Running => api::Status::RUNNING,
                Phase::Stopped => api::Status::STOPPED,
            };
            let exit = e.exit_tx.borrow().clone();
            Ok(api::StateResponse {
                id: id.to_owned(),
                exec_id: exec_id.to_owned(),
                bundle: bundle.to_owned(),
                pid: e.pid,
                status: status.into(),
                stdin: e.stdio.stdin.clone(),
                stdout: e.stdio.stdout.clone(),
                stderr: e.stdio.stderr.clone(),
                terminal: e.stdio.terminal,
                exit_status: exit.as_ref().map_or(0, |x| x.status),
                exited_at: exit.map_or(MessageField::none(), |x| MessageField::some(x.at)),
                ..Default::default()
            })
        })
    }

    pub(super) async fn exec_kill(&self, id: &str, exec_id: &str, signal: u32) -> TtrpcResult<()> {
        let phase = self.with_exec(id, exec_id, |e| Ok(e.phase))?;
        match phase {
            Phase::Stopped => return Err(not_found("process already finished")),
            Phase::Created => return Err(rpc_error(Code::FAILED_PRECONDITION, "the exec was not started")),
            Phase::Running => {}
        }
        let signal = super::guest_signal(signal)?;
        let agent = self.agent()?;
        let guest_id = agent_id(id, exec_id);
        // An exec that ended since the check above is NOT_FOUND from the agent.
        blocking(move || agent.signal(&guest_id, signal))
            .await?
            .map_err(|e| agent_error("cannot signal the exec process", &e))
    }

    pub(super) async fn exec_wait(&self, id: &str, exec_id: &str) -> TtrpcResult<api::WaitResponse> {
        let mut rx = self.with_exec(id, exec_id, |e| Ok(e.exit_tx.subscribe()))?;
        let exit = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| rpc_error(Code::NOT_FOUND, format!("exec {exec_id} was deleted")))?
            .clone()
            .ok_or_else(|| rpc_error(Code::INTERNAL, "exit status missing"))?;
        Ok(api::WaitResponse { exit_status: exit.status, exited_at: MessageField::some(exit.at), ..Default::default() })
    }

    pub(super) async fn exec_delete(&self, id: &str, exec_id: &str) -> TtrpcResult<api::DeleteResponse> {
        let exec = self.with_container(id, |c| {
            let e = c.execs.get(exec_id).ok_or_else(|| not_found(&format!("exec {exec_id}")))?;
            if e.phase == Phase::Running {
                return Err(rpc_error(Code::FAILED_PRECONDITION, format!("exec {exec_id} is still running")));
            }
            c.execs.remove(exec_id).ok_or_else(|| not_found(exec_id))
        })?;
        let exit = exec.exit_tx.borrow().clone().unwrap_or(ExitInfo { status: 0, at: Timestamp::now() });
        let pid = exec.pid;
        // The output reaches its consumer first; closing the FIFO ends the shim held and
        // dropping may touch files: both off the runtime.
        deliver_output(exec.io.output_drain(), exec_id, "deleting").await;
        blocking(move || drop(exec)).await?;
        Ok(api::DeleteResponse {
            pid,
            exit_status: exit.status,
            exited_at: MessageField::some(exit.at),
            ..Default::default()
        })
    }

    pub(super) async fn exec_close_io(&self, id: &str, exec_id: &str) -> TtrpcResult<()> {
        let (shim_delivers_eof, phase) = self.with_exec(id, exec_id, |e| Ok((e.io.close_stdin(), e.phase)))?;
        if !shim_delivers_eof && phase == Phase::Running {
            let agent = self.agent()?;
            let guest_id = agent_id(id, exec_id);
            if let Err(e) = blocking(move || agent.close_stdin(&guest_id)).await? {
                tracing::debug!(error = %error_chain(&e), "close stdin in the guest");
            }
        }
        Ok(())
    }

    /// The agent id of a process for `ResizePty` (the init's or an exec's).
    pub(super) fn guest_process_id(&self, id: &str, exec_id: &str) -> TtrpcResult<String> {
        if exec_id.is_empty() {
            self.with_container(id, |_| Ok(id.to_owned()))
        } else {
            self.with_exec(id, exec_id, |_| Ok(agent_id(id, exec_id)))
        }
    }
}
