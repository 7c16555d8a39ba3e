//! `tern-netperf`: TCP throughput and request/response latency between two hosts, for the
//! network benchmark (`tests/bench/net_bench.py`). Standard library only, so it links
//! statically and runs as is in a busybox guest, in a runc container and on the host.
//!
//! ```text
//! tern-netperf server PORT
//! tern-netperf client HOST PORT send SECS       host → server throughput
//! tern-netperf client HOST PORT recv SECS       server → host throughput
//! tern-netperf client HOST PORT rr [--count N] [--size BYTES]
//! tern-netperf client HOST PORT stop            the server exits (ends a guest's /init)
//! ```
//!
//! Every client test prints one JSON line on stdout. Failures print
//! `tern-netperf: <what> failed: <cause>` on stderr and exit 1; usage errors exit 2.
//! The wire protocol is in [`protocol`].

mod args;
mod client;
mod protocol;
mod server;
mod stats;

use std::fmt;
use std::process::ExitCode;

use args::{Command, Test};

/// What failed and why, printed as `tern-netperf: <what> failed: <cause>`.
#[derive(Debug)]
pub struct Failure {
    what: String,
    cause: String,
}

impl Failure {
    pub fn new(what: impl Into<String>, cause: impl fmt::Display) -> Failure {
        Failure { what: what.into(), cause: cause.to_string() }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} failed: {}", self.what, self.cause)
    }
}

/// `result.or_failed(|| "what")`: a [`Failure`] naming the step, with the error as its cause.
pub trait OrFailed<T> {
    fn or_failed<S: Into<String>>(self, what: impl FnOnce() -> S) -> Result<T, Failure>;
}

impl<T, E: fmt::Display> OrFailed<T> for Result<T, E> {
    fn or_failed<S: Into<String>>(self, what: impl FnOnce() -> S) -> Result<T, Failure> {
        self.map_err(|e| Failure::new(what(), e))
    }
}

fn run(command: Command) -> Result<(), Failure> {
    match command {
        Command::Help => {
            print!("{}", args::USAGE);
            Ok(())
        }
        Command::Server { port } => server::serve(server::listen(port)?),
        Command::Client { target, test } => {
            let line = match test {
                Test::Send { duration } => client::send(&target, duration)?.to_json("send"),
                Test::Recv { duration } => client::recv(&target, duration)?.to_json("recv"),
                Test::Rr { count, size } => client::request_response(&target, count, size)?.to_json(size),
                Test::Stop => {
                    client::stop(&target)?;
                    r#"{"test":"stop"}"#.to_owned()
                }
            };
            println!("{line}");
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let command = match args::parse(&argv) {
        Ok(command) => command,
        Err(e) => {
            eprintln!("tern-netperf: {e}\n\n{}", args::USAGE);
            return ExitCode::from(2);
        }
    };
    match run(command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tern-netperf: {e}");
            ExitCode::from(1)
        }
    }
}
