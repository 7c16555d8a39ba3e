//! A device event loop: a thread running an [`event_manager::EventManager`] that dispatches
//! queue kicks and host sockets to device subscribers. A VM runs one for vsock
//! (`tern-devices`), one for virtio-fs when it has shares (`tern-fs`) and one for its network
//! devices when it has any (`tern-net`), so neither a burst of file-system requests nor network
//! load can delay the agent's channel (RPC, stdio, change records).
//!
//! Devices register their subscribers through an [`EventLoopHandle`], which works from any
//! thread and at any time: before the loop runs (the request waits in the manager's channel)
//! and after (from a vCPU thread handling DRIVER_OK). Requests are fire-and-forget and run in
//! order on the loop thread, so a removal queued before an add is always applied first.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, RemoteEndpoint, SubscriberId, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::seccomp::{Hardening, SeccompRole};

/// A subscriber as the event loop stores it: shared, so its owner can keep a handle to it.
pub type SharedSubscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Errors of the event loop.
#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    /// The event manager could not be created.
    #[error("cannot create the event manager: {0}")]
    Manager(String),
    /// The loop's exit eventfd could not be created.
    #[error("cannot create the exit eventfd")]
    ExitFd(#[source] io::Error),
    /// The request could not be queued (the loop is gone).
    #[error("the device event loop is gone: {0}")]
    Gone(String),
}

impl From<EventLoopError> for io::Error {
    fn from(e: EventLoopError) -> Self {
        io::Error::other(e)
    }
}

/// The device event loop before it runs on its own thread.
pub struct EventLoop {
    manager: EventManager<SharedSubscriber>,
    exit_fd: EventFd,
}

/// A cloneable, `Send` handle that adds and removes subscribers from any thread.
#[derive(Clone)]
pub struct EventLoopHandle {
    endpoint: RemoteEndpoint<SharedSubscriber>,
}

/// Identifies a subscriber added through an [`EventLoopHandle`], for removing it later.
#[derive(Clone, Debug)]
pub struct SubscriberToken {
    // Filled in on the loop thread when the add request runs; requests run in order, so a
    // remove request always finds it set.
    id: Arc<Mutex<Option<SubscriberId>>>,
}

/// The running event loop thread.
pub struct EventLoopThread {
    exit_fd: EventFd,
    thread: Option<JoinHandle<()>>,
}

/// Wakes the loop and makes it return when the exit eventfd is written.
struct ExitSubscriber {
    fd: EventFd,
    exit: Arc<AtomicBool>,
}

impl MutEventSubscriber for ExitSubscriber {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.fd.read();
        self.exit.store(true, Ordering::SeqCst);
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.fd, EventSet::IN)) {
            tracing::error!(error = %e, "event loop cannot watch its exit eventfd");
        }
    }
}

impl EventLoop {
    /// Create an event loop (not yet running).
    pub fn new() -> io::Result<Self> {
        let manager = EventManager::new().map_err(|e| EventLoopError::Manager(e.to_string()))?;
        let exit_fd = EventFd::new(libc::EFD_NONBLOCK).map_err(EventLoopError::ExitFd)?;
        Ok(EventLoop { manager, exit_fd })
    }

    /// A handle to register subscribers, usable before and after [`EventLoop::spawn`].
    pub fn handle(&self) -> EventLoopHandle {
        EventLoopHandle { endpoint: self.manager.remote_endpoint() }
    }

    /// Run the loop on a thread named `name` (Linux keeps the first 15 bytes), hardened as
    /// `role` (see [`crate::seccomp`]).
    pub fn spawn(mut self, name: &str, role: SeccompRole, hardening: &Hardening) -> io::Result<EventLoopThread> {
        let exit = Arc::new(AtomicBool::new(false));
        let thread_fd = self.exit_fd.try_clone()?;
        let subscriber: SharedSubscriber = Arc::new(Mutex::new(ExitSubscriber { fd: thread_fd, exit: exit.clone() }));
        self.manager.add_subscriber(subscriber);
        let mut manager = self.manager;
        let thread_name = name.to_owned();
        let thread = crate::seccomp::spawn(name.into(), role, hardening, move || {
            let mut consecutive_errors = 0u32;
            while !exit.load(Ordering::SeqCst) {
                match manager.run() {
                    Ok(_) => consecutive_errors = 0,
                    Err(e) => {
                        consecutive_errors += 1;
                        tracing::error!(thread = %thread_name, error = %e, "device event loop failed to poll");
                        if consecutive_errors > 100 {
                            tracing::error!(thread = %thread_name, "device event loop gives up");
                            break;
                        }
                    }
                }
            }
            tracing::debug!(thread = %thread_name, "device event loop exits");
        })?;
        Ok(EventLoopThread { exit_fd: self.exit_fd, thread: Some(thread) })
    }
}

impl EventLoopHandle {
    /// Register a subscriber with the loop; its `init` runs on the loop's thread. Never blocks,
    /// so it may be called before the loop runs and from the loop's own thread.
    pub fn add_subscriber(&self, subscriber: SharedSubscriber) -> io::Result<SubscriberToken> {
        let token = SubscriberToken { id: Arc::new(Mutex::new(None)) };
        let slot = token.id.clone();
        self.endpoint
            .fire(move |ops| {
                let id = ops.add_subscriber(subscriber);
                if let Ok(mut slot) = slot.lock() {
                    *slot = Some(id);
                }
            })
            .map_err(|e| EventLoopError::Gone(e.to_string()))?;
        Ok(token)
    }

    /// Run `work` on the loop's thread, after every request queued before it: device work
    /// that must not run on the caller's thread (a vCPU's filter allows no file access).
    /// Once the loop has ended (VM shutdown) the work is dropped, not run.
    pub fn run_on_loop(&self, work: impl FnOnce() + Send + 'static) {
        if let Err(e) = self.endpoint.fire(move |_ops| work()) {
            tracing::debug!(error = %e, "device event loop already gone; work dropped");
        }
    }

    /// Unregister a subscriber (its fds leave the epoll set) and drop the loop's reference to it.
    /// Once the loop has ended (VM shutdown) this does nothing: the loop's subscribers went
    /// with it.
    pub fn remove_subscriber(&self, token: &SubscriberToken) {
        let slot = token.id.clone();
        let queued = self.endpoint.fire(move |ops| {
            let id = slot.lock().ok().and_then(|mut slot| slot.take());
            if let Some(id) = id {
                if let Err(e) = ops.remove_subscriber(id) {
                    tracing::warn!(error = %e, "cannot remove an event loop subscriber");
                }
            }
        });
        if let Err(e) = queued {
            tracing::debug!(error = %e, "device event loop already gone; nothing to remove");
        }
    }
}

/// A device's handler while it is registered on an event loop: the token to remove it and the
/// flag its handler checks before touching guest memory.
pub struct ActiveHandler {
    token: SubscriberToken,
    stopped: Arc<AtomicBool>,
}

impl EventLoopHandle {
    /// Register a device's handler (see [`EventLoopHandle::add_subscriber`]); `stopped` is the
    /// flag [`EventLoopHandle::deactivate`] sets.
    pub fn activate(&self, handler: SharedSubscriber, stopped: Arc<AtomicBool>) -> io::Result<ActiveHandler> {
        let token = self.add_subscriber(handler)?;
        Ok(ActiveHandler { token, stopped })
    }

    /// A device reset: stop the handler at once (it leaves the guest's queues alone from here
    /// on, even before its removal is processed) and unregister it.
    pub fn deactivate(&self, active: ActiveHandler) {
        active.stopped.store(true, Ordering::SeqCst);
        self.remove_subscriber(&active.token);
    }
}

impl EventLoopThread {
    /// Signal the loop to exit and join its thread.
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        if let Some(thread) = self.thread.take() {
            if let Err(e) = self.exit_fd.write(1) {
                tracing::error!(error = %e, fd = self.exit_fd.as_raw_fd(), "cannot signal the device event loop");
                return;
            }
            if thread.join().is_err() {
                tracing::error!("device event loop thread panicked");
            }
        }
    }
}

impl Drop for EventLoopThread {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    struct Counter {
        fd: EventFd,
        tx: mpsc::Sender<u64>,
    }

    impl MutEventSubscriber for Counter {
        fn process(&mut self, _events: Events, _ops: &mut EventOps) {
            let n = self.fd.read().unwrap_or(0);
            let _ = self.tx.send(n);
        }
        fn init(&mut self, ops: &mut EventOps) {
            ops.add(Events::new(&self.fd, EventSet::IN)).unwrap();
        }
    }

    fn counter() -> (EventFd, SharedSubscriber, mpsc::Receiver<u64>) {
        let fd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let (tx, rx) = mpsc::channel();
        let sub: SharedSubscriber = Arc::new(Mutex::new(Counter { fd: fd.try_clone().unwrap(), tx }));
        (fd, sub, rx)
    }

    #[test]
    fn subscribers_added_before_and_after_spawn_both_run() {
        let lp = EventLoop::new().unwrap();
        let handle = lp.handle();
        let (fd1, sub1, rx1) = counter();
        handle.add_subscriber(sub1).unwrap();
        let thread = lp.spawn("tern-devices", SeccompRole::Devices, &Hardening::off()).unwrap();

        let (fd2, sub2, rx2) = counter();
        let token2 = std::thread::spawn(move || handle.add_subscriber(sub2).unwrap()).join().unwrap();

        fd1.write(3).unwrap();
        assert_eq!(rx1.recv_timeout(Duration::from_secs(5)).unwrap(), 3);
        fd2.write(5).unwrap();
        assert_eq!(rx2.recv_timeout(Duration::from_secs(5)).unwrap(), 5);
        assert!(token2.id.lock().unwrap().is_some());
        thread.stop();
    }

    #[test]
    fn spawn_names_the_thread() {
        struct ThreadName(mpsc::Sender<Option<String>>);
        impl MutEventSubscriber for ThreadName {
            fn process(&mut self, _events: Events, _ops: &mut EventOps) {}
            fn init(&mut self, _ops: &mut EventOps) {
                let _ = self.0.send(std::thread::current().name().map(str::to_owned));
            }
        }
        let lp = EventLoop::new().unwrap();
        let handle = lp.handle();
        let thread = lp.spawn("tern-net", SeccompRole::Net, &Hardening::off()).unwrap();
        let (tx, rx) = mpsc::channel();
        handle.add_subscriber(Arc::new(Mutex::new(ThreadName(tx)))).unwrap();
        // A subscriber's init runs on the loop's thread.
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap().as_deref(), Some("tern-net"));
        thread.stop();
    }

    #[test]
    fn removed_subscriber_gets_no_more_events() {
        let lp = EventLoop::new().unwrap();
        let handle = lp.handle();
        let thread = lp.spawn("tern-devices", SeccompRole::Devices, &Hardening::off()).unwrap();
        let (fd, sub, rx) = counter();
        let token = handle.add_subscriber(sub).unwrap();
        fd.write(1).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), 1);
        handle.remove_subscriber(&token);
        // The Counter (and its Sender) is dropped once the removal ran.
        assert!(rx.recv_timeout(Duration::from_secs(5)).is_err());
        fd.write(1).unwrap();
        thread.stop();
    }
}
