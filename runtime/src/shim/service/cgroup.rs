//! Task requests served from the container's cgroup in the guest: `Pause`/`Resume` (the
//! cgroup v2 freezer), `Stats` (cgroup v2 numbers as containerd's v2 `Metrics`), `Update`
//! (OCI resources written as cgroup v2 limits), and the OOM watch behind `TaskOOM`.

use containerd_shim::api;
use containerd_shim::TtrpcResult;
use containerd_shim_protos::protobuf::MessageField;
use containerd_shim_protos::ttrpc::Code;

use super::{blocking, internal, rpc_error, Phase, TaskService};
use crate::agent::AgentClient;
use crate::sandbox::error_chain;
use crate::shim::errdefs::agent_error;
use crate::shim::resources::{metrics_any, resource_update};

impl TaskService {
    /// The agent, for a request that needs the container's process running.
    fn running_container_agent(&self, id: &str) -> TtrpcResult<AgentClient> {
        let phase = self.with_container(id, |c| Ok(c.phase))?;
        if phase != Phase::Running {
            return Err(rpc_error(Code::FAILED_PRECONDITION, format!("container {id} is not running")));
        }
        self.agent()
    }

    pub(super) async fn pause_container(&self, id: &str) -> TtrpcResult<()> {
        let agent = self.running_container_agent(id)?;
        let guest_id = id.to_owned();
        blocking(move || agent.pause_container(&guest_id))
            .await?
            .map_err(|e| agent_error("cannot pause the container", &e))?;
        self.with_container(id, |c| {
            c.paused = true;
            Ok(())
        })?;
        self.inner.events.paused(id).await;
        Ok(())
    }

    pub(super) async fn resume_container(&self, id: &str) -> TtrpcResult<()> {
        let agent = self.running_container_agent(id)?;
        let guest_id = id.to_owned();
        blocking(move || agent.resume_container(&guest_id))
            .await?
            .map_err(|e| agent_error("cannot resume the container", &e))?;
        self.with_container(id, |c| {
            c.paused = false;
            Ok(())
        })?;
        self.inner.events.resumed(id).await;
        Ok(())
    }

    pub(super) async fn container_stats(&self, id: &str) -> TtrpcResult<api::StatsResponse> {
        let agent = self.running_container_agent(id)?;
        let guest_id = id.to_owned();
        let stats = blocking(move || agent.container_stats(&guest_id))
            .await?
            .map_err(|e| agent_error("cannot read the container's cgroup", &e))?;
        let any = metrics_any(&stats).map_err(|e| internal("cannot encode the metrics", &e))?;
        Ok(api::StatsResponse { stats: MessageField::some(any), ..Default::default() })
    }

    pub(super) async fn update_container(&self, req: api::UpdateTaskRequest) -> TtrpcResult<()> {
        let resources =
            req.resources.as_ref().ok_or_else(|| rpc_error(Code::INVALID_ARGUMENT, "the update has no resources"))?;
        let update =
            resource_update(&resources.value).map_err(|e| rpc_error(Code::INVALID_ARGUMENT, error_chain(&e)))?;
        let agent = self.running_container_agent(&req.id)?;
        let guest_id = req.id.clone();
        blocking(move || agent.update_container(&guest_id, update))
            .await?
            .map_err(|e| agent_error("cannot update the container's resources", &e))
    }

    /// Publish `TaskOOM` each time the container's cgroup records a new OOM kill; ends when
    /// the cgroup has no processes left (or the agent is gone).
    pub(super) async fn watch_oom(self, id: String, agent: AgentClient) {
        let mut seen = 0;
        loop {
            let (agent, guest_id) = (agent.clone(), id.clone());
            match blocking(move || agent.wait_oom(&guest_id, seen)).await {
                Ok(Ok(count)) => {
                    tracing::info!(%id, count, "OOM kill in the container");
                    seen = count;
                    self.inner.events.oom(&id).await;
                }
                Ok(Err(e)) => {
                    tracing::debug!(%id, error = %error_chain(&e), "OOM watch ended");
                    return;
                }
                Err(e) => {
                    tracing::debug!(%id, error = %e, "OOM watch ended");
                    return;
                }
            }
        }
    }
}
