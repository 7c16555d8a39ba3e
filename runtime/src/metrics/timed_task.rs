//! Latency of every Task API call the shim serves: a wrapper around the real service that
//! times each method into [`super::rpc::TASK`], so the service itself carries no metrics code.

use std::future::Future;
use std::time::Instant;

use async_trait::async_trait;
use containerd_shim::api;
use containerd_shim::{Task, TtrpcContext, TtrpcResult};

/// `T` with every Task API call timed.
pub struct TimedTask<T>(pub T);

async fn timed<R>(name: &str, call: impl Future<Output = TtrpcResult<R>>) -> TtrpcResult<R> {
    let started = Instant::now();
    let result = call.await;
    super::rpc::TASK.record(name, started.elapsed(), result.is_ok());
    result
}

#[async_trait]
impl<T: Task + Send + Sync> Task for TimedTask<T> {
    async fn state(&self, ctx: &TtrpcContext, req: api::StateRequest) -> TtrpcResult<api::StateResponse> {
        timed("state", self.0.state(ctx, req)).await
    }

    async fn create(&self, ctx: &TtrpcContext, req: api::CreateTaskRequest) -> TtrpcResult<api::CreateTaskResponse> {
        timed("create", self.0.create(ctx, req)).await
    }

    async fn start(&self, ctx: &TtrpcContext, req: api::StartRequest) -> TtrpcResult<api::StartResponse> {
        timed("start", self.0.start(ctx, req)).await
    }

    async fn delete(&self, ctx: &TtrpcContext, req: api::DeleteRequest) -> TtrpcResult<api::DeleteResponse> {
        timed("delete", self.0.delete(ctx, req)).await
    }

    async fn pids(&self, ctx: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        timed("pids", self.0.pids(ctx, req)).await
    }

    async fn pause(&self, ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        timed("pause", self.0.pause(ctx, req)).await
    }

    async fn resume(&self, ctx: &TtrpcContext, req: api::ResumeRequest) -> TtrpcResult<api::Empty> {
        timed("resume", self.0.resume(ctx, req)).await
    }

    async fn checkpoint(&self, ctx: &TtrpcContext, req: api::CheckpointTaskRequest) -> TtrpcResult<api::Empty> {
        timed("checkpoint", self.0.checkpoint(ctx, req)).await
    }

    async fn kill(&self, ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        timed("kill", self.0.kill(ctx, req)).await
    }

    async fn exec(&self, ctx: &TtrpcContext, req: api::ExecProcessRequest) -> TtrpcResult<api::Empty> {
        timed("exec", self.0.exec(ctx, req)).await
    }

    async fn resize_pty(&self, ctx: &TtrpcContext, req: api::ResizePtyRequest) -> TtrpcResult<api::Empty> {
        timed("resize_pty", self.0.resize_pty(ctx, req)).await
    }

    async fn close_io(&self, ctx: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<api::Empty> {
        timed("close_io", self.0.close_io(ctx, req)).await
    }

    async fn update(&self, ctx: &TtrpcContext, req: api::UpdateTaskRequest) -> TtrpcResult<api::Empty> {
        timed("update", self.0.update(ctx, req)).await
    }

    async fn wait(&self, ctx: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        timed("wait", self.0.wait(ctx, req)).await
    }

    async fn stats(&self, ctx: &TtrpcContext, req: api::StatsRequest) -> TtrpcResult<api::StatsResponse> {
        timed("stats", self.0.stats(ctx, req)).await
    }

    async fn connect(&self, ctx: &TtrpcContext, req: api::ConnectRequest) -> TtrpcResult<api::ConnectResponse> {
        timed("connect", self.0.connect(ctx, req)).await
    }

    async fn shutdown(&self, ctx: &TtrpcContext, req: api::ShutdownRequest) -> TtrpcResult<api::Empty> {
        timed("shutdown", self.0.shutdown(ctx, req)).await
    }
}
