//! The signals `tern run` takes for its command: SIGINT, SIGTERM, SIGHUP and SIGQUIT, and
//! SIGWINCH for `-t`.
//!
//! The default action of the first four would kill tern before it stopped its VM and removed
//! its run directory. So [`Signals::catch`] blocks them in the calling thread before any other
//! thread exists (every thread tern starts later inherits the mask) and one thread takes them
//! with `sigwait`, recording the first and sending each one to the run loop as a [`RunEvent`].
//! SIGWINCH (ignored by default) is taken the same way, but is no signal for the command: it
//! becomes [`RunEvent::WindowChanged`] and counts as no "first signal".
//! Processes tern spawns start with an empty mask (std resets it).

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;

use nix::sys::signal::{SigSet, Signal};
use tern_protocol::ExitStatus;
use tern_runtime::agent::AgentError;

/// What the run loop waits for.
pub enum RunEvent {
    /// tern received one of the forwarded signals.
    Signal(Signal),
    /// The command ended (or the agent was lost while waiting for it).
    Exited(Result<ExitStatus, AgentError>),
    /// The host terminal's window size changed (SIGWINCH).
    WindowChanged,
}

/// The forwarded signals, blocked and taken by a thread of their own.
pub struct Signals {
    events: Receiver<RunEvent>,
    sender: Sender<RunEvent>,
    /// The first signal received (0: none yet), for code that cannot wait on `events`.
    first: Arc<AtomicI32>,
}

/// The signals forwarded to the command, as `docker run` does.
pub const FORWARDED: [Signal; 4] = [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP, Signal::SIGQUIT];

impl Signals {
    /// Block [`FORWARDED`] and SIGWINCH in this thread and start the thread that takes
    /// them. Call before any other thread is started, or that thread would still die of them.
    pub fn catch() -> std::io::Result<Signals> {
        let mut set = SigSet::empty();
        for signal in FORWARDED {
            set.add(signal);
        }
        set.add(Signal::SIGWINCH);
        set.thread_block().map_err(std::io::Error::from)?;
        let (sender, events) = channel();
        let first = Arc::new(AtomicI32::new(0));
        let relay = sender.clone();
        let seen = Arc::clone(&first);
        // Detached: it lives as long as the process, blocked in sigwait.
        std::thread::Builder::new().name("signals".into()).spawn(move || loop {
            match set.wait() {
                Ok(Signal::SIGWINCH) => {
                    let _ = relay.send(RunEvent::WindowChanged);
                }
                Ok(signal) => {
                    tracing::debug!(?signal, "signal received");
                    let _ = seen.compare_exchange(0, signal as i32, Ordering::SeqCst, Ordering::SeqCst);
                    // Nobody listens once the run loop is over: the signal was recorded.
                    let _ = relay.send(RunEvent::Signal(signal));
                }
                Err(e) => tracing::warn!(error = %e, "sigwait failed"),
            }
        })?;
        Ok(Signals { events, sender, first })
    }

    /// The first signal received so far.
    pub fn first(&self) -> Option<Signal> {
        Signal::try_from(self.first.load(Ordering::SeqCst)).ok()
    }

    /// A sender into the run loop's event channel (for the thread waiting for the command).
    pub fn sender(&self) -> Sender<RunEvent> {
        self.sender.clone()
    }

    pub fn events(&self) -> &Receiver<RunEvent> {
        &self.events
    }
}

/// The exit code of a shell whose child died of `signal`: 128 + its number.
pub fn exit_code_of(signal: Signal) -> i32 {
    128 + signal as i32
}
