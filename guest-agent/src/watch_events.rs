//! `tern-agent watch-events [--stamps] [--echo] DIR…`: print the inotify events of directories,
//! one line per event (`CREATE name`, `MODIFY name`, …), flushed at once. The guest image has
//! no inotify tool of its own (Debian's busybox lacks `inotifyd`); the watchable-mount tests and
//! the latency benchmark use this to observe what a container would see.
//!
//! `--stamps` appends the guest's monotonic clock (ns) at the read that returned the event, the
//! clock of the agent's stage stamps, so the benchmark can place "seen by a watcher" after
//! "mirror applied". `--echo` also copies every stdin line to stdout as `ECHO line`: the
//! round trip of the stdio path the events travel back on, in the same process and boot.

use std::io::{BufRead, Write};
use std::sync::{Arc, Mutex};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tern_sync::LockExt;

/// Events reported, by the names printed.
const EVENTS: [(AddWatchFlags, &str); 7] = [
    (AddWatchFlags::IN_CREATE, "CREATE"),
    (AddWatchFlags::IN_MODIFY, "MODIFY"),
    (AddWatchFlags::IN_ATTRIB, "ATTRIB"),
    (AddWatchFlags::IN_DELETE, "DELETE"),
    (AddWatchFlags::IN_MOVED_FROM, "MOVED_FROM"),
    (AddWatchFlags::IN_MOVED_TO, "MOVED_TO"),
    (AddWatchFlags::IN_Q_OVERFLOW, "OVERFLOW"),
];

/// Watch the directories in `args` and print their events forever; returns only on an error.
pub fn run(args: &[String]) -> anyhow::Result<std::convert::Infallible> {
    let stamps = args.iter().any(|a| a == "--stamps");
    let echo = args.iter().any(|a| a == "--echo");
    let dirs = args.iter().filter(|a| !a.starts_with("--"));
    let inotify = Inotify::init(InitFlags::IN_CLOEXEC)?;
    let mask = EVENTS.iter().fold(AddWatchFlags::empty(), |m, (flag, _)| m | *flag);
    for dir in dirs {
        inotify.add_watch(dir.as_str(), mask)?;
    }
    let out = Arc::new(Mutex::new(std::io::stdout()));
    let print = |out: &Mutex<std::io::Stdout>, text: &str| -> std::io::Result<()> {
        let mut out = out.lock_unpoisoned();
        out.write_all(text.as_bytes())?;
        out.flush()
    };
    if echo {
        let out = out.clone();
        std::thread::Builder::new().name("echo".into()).spawn(move || {
            for line in std::io::stdin().lock().lines() {
                let Ok(line) = line else { return };
                if print(&out, &format!("ECHO {line}\n")).is_err() {
                    return;
                }
            }
        })?;
    }
    print(&out, "WATCHING\n")?;
    loop {
        let events = inotify.read_events()?;
        let stamp = if stamps { format!(" {}", crate::stats::watch::mono_ns()) } else { String::new() };
        let mut text = String::new();
        for event in events {
            let name = event.name.as_deref().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            for (flag, label) in EVENTS {
                if event.mask.contains(flag) {
                    text.push_str(&format!("{label} {name}{stamp}\n"));
                }
            }
        }
        print(&out, &text)?;
    }
}
