//! Task events to containerd, in the documented order for a container's init process:
//! `TaskCreate` → `TaskStart` → `TaskExit` → `TaskDelete`; for an exec process
//! `TaskExecAdded` → `TaskExecStarted` → `TaskExit` (with the exec id); plus `TaskPaused`,
//! `TaskResumed` and `TaskOOM`. Publishing never fails a task
//! request: the publisher queues and retries, and a lost event is only logged.

use containerd_shim::event::Event;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim_protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskPaused, TaskResumed,
    TaskStart,
};
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::protobuf::MessageField;
use containerd_shim_protos::ttrpc::context::Context;

use super::io::StdioPaths;

/// Sends one sandbox's task events to containerd.
pub struct EventSink {
    publisher: RemotePublisher,
    namespace: String,
}

impl EventSink {
    pub fn new(publisher: RemotePublisher, namespace: String) -> Self {
        EventSink { publisher, namespace }
    }

    async fn send<E: Event + 'static>(&self, event: E) {
        let topic = event.topic();
        if let Err(e) = self.publisher.publish(Context::default(), &topic, &self.namespace, Box::new(event)).await {
            tracing::warn!(%topic, error = %e, "cannot publish an event");
        }
    }

    pub async fn created(&self, id: &str, bundle: &str, stdio: &StdioPaths, pid: u32) {
        self.send(TaskCreate {
            container_id: id.to_owned(),
            bundle: bundle.to_owned(),
            io: MessageField::some(TaskIO {
                stdin: stdio.stdin.clone(),
                stdout: stdio.stdout.clone(),
                stderr: stdio.stderr.clone(),
                terminal: stdio.terminal,
                ..Default::default()
            }),
            pid,
            ..Default::default()
        })
        .await;
    }

    pub async fn started(&self, id: &str, pid: u32) {
        self.send(TaskStart { container_id: id.to_owned(), pid, ..Default::default() }).await;
    }

    /// A container's init ended: `TaskExit` with the container id as `id`.
    pub async fn exited(&self, id: &str, pid: u32, exit_status: u32, exited_at: &Timestamp) {
        self.exec_exited(id, id, pid, exit_status, exited_at).await;
    }

    /// An exec process ended: `TaskExit` with the exec id as `id`.
    pub async fn exec_exited(&self, id: &str, exec_id: &str, pid: u32, exit_status: u32, exited_at: &Timestamp) {
        self.send(TaskExit {
            container_id: id.to_owned(),
            id: exec_id.to_owned(),
            pid,
            exit_status,
            exited_at: MessageField::some(exited_at.clone()),
            ..Default::default()
        })
        .await;
    }

    pub async fn exec_added(&self, id: &str, exec_id: &str) {
        self.send(TaskExecAdded { container_id: id.to_owned(), exec_id: exec_id.to_owned(), ..Default::default() })
            .await;
    }

    pub async fn exec_started(&self, id: &str, exec_id: &str, pid: u32) {
        self.send(TaskExecStarted {
            container_id: id.to_owned(),
            exec_id: exec_id.to_owned(),
            pid,
            ..Default::default()
        })
        .await;
    }

    pub async fn paused(&self, id: &str) {
        self.send(TaskPaused { container_id: id.to_owned(), ..Default::default() }).await;
    }

    pub async fn resumed(&self, id: &str) {
        self.send(TaskResumed { container_id: id.to_owned(), ..Default::default() }).await;
    }

    pub async fn oom(&self, id: &str) {
        self.send(TaskOOM { container_id: id.to_owned(), ..Default::default() }).await;
    }

    pub async fn deleted(&self, id: &str, pid: u32, exit_status: u32, exited_at: &Timestamp) {
        self.send(TaskDelete {
            container_id: id.to_owned(),
            id: id.to_owned(),
            pid,
            exit_status,
            exited_at: MessageField::some(exited_at.clone()),
            ..Default::default()
        })
        .await;
    }
}
