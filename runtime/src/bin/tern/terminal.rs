//! `tern run -t`: the host side of the command's terminal.
//!
//! The command runs on a pty in the guest (`ExecRequest::terminal`; the agent opens it). Here
//! the host terminal on stdin goes into raw mode once the command has started, so every key,
//! ^C and ^D included, reaches the guest's line discipline as a byte and acts there as on a
//! local terminal; the window size is read at the start and again at every SIGWINCH.
//!
//! Raw mode is undone on every way out of `tern run`: [`RawMode`]'s drop, and a panic hook
//! (release builds abort on a panic, so no drop runs then). A SIGKILL leaves the terminal raw,
//! as it does for any program.

use std::io::IsTerminal;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Mutex, Once};
use tern_sync::LockExt;

use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg, Termios};
use tern_protocol::WindowSize;
use tern_runtime::agent::AgentClient;

/// The terminal in raw mode (a descriptor of its own) and the settings raw mode replaced, for
/// whoever restores them first.
static SAVED: Mutex<Option<(OwnedFd, Termios)>> = Mutex::new(None);
static PANIC_HOOK: Once = Once::new();

/// The host terminal in raw mode, restored on drop.
pub struct RawMode(());

impl RawMode {
    /// Put stdin's terminal into raw mode (`cfmakeraw`); `None` when stdin is no terminal.
    pub fn enter() -> std::io::Result<Option<RawMode>> {
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return Ok(None);
        }
        RawMode::enter_on(stdin.as_fd()).map(Some)
    }

    /// Put the terminal `fd` into raw mode. One at a time: the process has one terminal.
    fn enter_on(fd: BorrowedFd<'_>) -> std::io::Result<RawMode> {
        let saved = tcgetattr(fd)?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        PANIC_HOOK.call_once(|| {
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                restore();
                previous(info);
            }));
        });
        let terminal = fd.try_clone_to_owned()?;
        // TCSANOW: what was typed during the boot stays in the input queue for the command.
        tcsetattr(&terminal, SetArg::TCSANOW, &raw)?;
        *SAVED.lock_unpoisoned() = Some((terminal, saved));
        Ok(RawMode(()))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        restore();
    }
}

/// Put back the settings raw mode replaced, once. TCSANOW rather than TCSADRAIN: draining
/// waits for the terminal to take our output, which a pty nobody reads never does.
fn restore() {
    // try_lock: a panic hook must not wait for a lock its own thread may hold.
    let saved = match SAVED.try_lock() {
        Ok(mut saved) => saved.take(),
        Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner().take(),
        Err(std::sync::TryLockError::WouldBlock) => None,
    };
    if let Some((terminal, saved)) = saved {
        if let Err(e) = tcsetattr(&terminal, SetArg::TCSANOW, &saved) {
            tracing::warn!("cannot restore the terminal settings: {e}");
        }
    }
}

/// The window size of the host terminal: stdin's, else stdout's (`… | tern run -t` in a
/// terminal); `None` when neither is a terminal.
pub fn window_size() -> Option<WindowSize> {
    [std::io::stdin().as_fd().as_raw_fd(), std::io::stdout().as_fd().as_raw_fd()].into_iter().find_map(|fd| {
        let mut size = libc::winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
        // SAFETY: TIOCGWINSZ writes one `winsize` into `size`, valid for the call; on a
        // descriptor that is no terminal it fails with ENOTTY and writes nothing.
        let rc = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut size) };
        (rc == 0).then_some(WindowSize { rows: size.ws_row, cols: size.ws_col })
    })
}

/// Passes the host's window size on to the command's pty, from a thread of its own (a slow
/// agent delays no signal). Each [`WindowSizeRelay::changed`] sends the size of that moment;
/// changes that pile up while a resize is under way end in one resize.
pub struct WindowSizeRelay {
    changed: Sender<()>,
}

impl WindowSizeRelay {
    /// Start the thread resizing process `id`'s pty; it ends when the relay is dropped.
    pub fn start(agent: AgentClient, id: &'static str) -> std::io::Result<WindowSizeRelay> {
        let (changed, events) = channel::<()>();
        std::thread::Builder::new().name("window-size".into()).spawn(move || {
            while events.recv().is_ok() {
                while events.try_recv().is_ok() {}
                let Some(size) = window_size() else { continue };
                // Fails when the command has just exited; its exit is on its way.
                if let Err(e) = agent.resize_pty(id, size.rows, size.cols) {
                    tracing::debug!(error = %e, "cannot resize the command's terminal");
                }
            }
        })?;
        Ok(WindowSizeRelay { changed })
    }

    /// The host terminal's window size changed (SIGWINCH).
    pub fn changed(&self) {
        let _ = self.changed.send(());
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use nix::sys::termios::LocalFlags;

    /// Both ways back (the guard's drop and the panic hook's `restore`) in one test: they
    /// share the one saved state.
    #[test]
    fn raw_mode_is_undone_by_the_drop_and_by_the_panic_hook() {
        let pty = nix::pty::openpty(None, None).unwrap();
        let before = tcgetattr(&pty.slave).unwrap();
        let raw = RawMode::enter_on(pty.slave.as_fd()).unwrap();
        let during = tcgetattr(&pty.slave).unwrap();
        assert!(!during.local_flags.intersects(LocalFlags::ICANON | LocalFlags::ECHO | LocalFlags::ISIG));
        drop(raw);
        assert_eq!(tcgetattr(&pty.slave).unwrap(), before);

        let raw = RawMode::enter_on(pty.slave.as_fd()).unwrap();
        std::panic::catch_unwind(|| panic!("a panic while the terminal is raw")).unwrap_err();
        assert_eq!(tcgetattr(&pty.slave).unwrap(), before);
        // Restored once only: the guard finds nothing left to do.
        drop(raw);
        assert_eq!(tcgetattr(&pty.slave).unwrap(), before);
    }
}
