//! Log output: `tracing` to the serial console in the guest, to stderr on a host.
//!
//! The default level is `warn` because every byte written to the guest's 8250 console costs a
//! VM exit; `tern.log=<level>` on the kernel command line turns up the detail when debugging.

use nix::time::{clock_gettime, ClockId};
use std::fs::OpenOptions;
use std::sync::Mutex;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime;
use tracing_subscriber::fmt::writer::BoxMakeWriter;

/// Level used when none (or an unparsable one) is configured.
pub const DEFAULT_LEVEL: LevelFilter = LevelFilter::WARN;

/// Where log lines go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogTarget {
    /// /dev/console (falls back to stderr if it cannot be opened).
    Console,
    Stderr,
}

/// Install the global subscriber. `level` is a string such as `debug`; returns a complaint
/// about it for the caller to log once logging works.
pub fn init(level: Option<&str>, target: LogTarget) -> Option<String> {
    let (filter, complaint) = match level.map(str::parse::<LevelFilter>) {
        None => (DEFAULT_LEVEL, None),
        Some(Ok(filter)) => (filter, None),
        Some(Err(_)) => (DEFAULT_LEVEL, level.map(|l| format!("unknown log level {l:?}; using {DEFAULT_LEVEL}"))),
    };
    let writer = match target {
        LogTarget::Console => match OpenOptions::new().write(true).open("/dev/console") {
            Ok(console) => BoxMakeWriter::new(Mutex::new(console)),
            Err(_) => BoxMakeWriter::new(std::io::stderr),
        },
        LogTarget::Stderr => BoxMakeWriter::new(std::io::stderr),
    };
    let installed = tracing_subscriber::fmt()
        .with_max_level(filter)
        .with_ansi(false)
        .with_timer(BootTime)
        .with_target(false)
        .with_writer(writer)
        .try_init();
    // Only fails if a subscriber exists already, which leaves logging working anyway.
    drop(installed);
    complaint
}

/// Seconds since boot, like the kernel's own log prefix, so agent and kernel lines line up.
struct BootTime;

impl FormatTime for BootTime {
    fn format_time(&self, w: &mut Writer<'_>) -> std::fmt::Result {
        match clock_gettime(ClockId::CLOCK_BOOTTIME) {
            Ok(t) => write!(w, "[{:5}.{:06}]", t.tv_sec(), t.tv_nsec() / 1000),
            Err(_) => write!(w, "[?]"),
        }
    }
}
