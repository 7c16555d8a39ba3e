//! `tern-agent watch-events DIR…`: print the inotify events of directories, one line per
//! event (`CREATE name`, `MODIFY name`, …), flushed at once. The guest image has no
//! inotify tool of its own (Debian's busybox lacks `inotifyd`); the watchable-mount tests and
//! the latency benchmark use this to observe what a container would see.

use std::io::Write;

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

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

/// Watch `dirs` and print their events forever; returns only on an error.
pub fn run(dirs: &[String]) -> anyhow::Result<std::convert::Infallible> {
    let inotify = Inotify::init(InitFlags::IN_CLOEXEC)?;
    let mask = EVENTS.iter().fold(AddWatchFlags::empty(), |m, (flag, _)| m | *flag);
    for dir in dirs {
        inotify.add_watch(dir.as_str(), mask)?;
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "WATCHING")?;
    out.flush()?;
    loop {
        for event in inotify.read_events()? {
            let name = event.name.as_deref().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            for (flag, label) in EVENTS {
                if event.mask.contains(flag) {
                    writeln!(out, "{label} {name}")?;
                }
            }
        }
        out.flush()?;
    }
}
